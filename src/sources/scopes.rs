//! A check that the SQL written for a source names only columns in scope.
//!
//! DataFusion's unparser writes some plans as statements whose names do
//! not resolve: a projection over a join that selects `a.id` and `b.id`
//! becomes a derived table with two columns named `id` that the query
//! around it reads as `id` (SQLite takes the first, PostgreSQL refuses),
//! and a decorrelated subquery's aggregate is read as
//! `__scalar_sq_1."avg(b.n)"` from a derived table that names it
//! otherwise. A statement that fails this check is not sent: the sub-plan
//! runs in meshgate, its parts sent on their own.

use std::collections::HashSet;
use std::ops::ControlFlow;

use sqlparser::ast::{
    Expr, GroupByExpr, JoinConstraint, JoinOperator, Query, Select, SelectItem, SetExpr, Statement,
    TableFactor, Visit, Visitor,
};

/// Whether every column `statement` reads through a derived table is one
/// that derived table has, and has once.
pub(super) fn well_scoped(statement: &Statement) -> bool {
    statement.visit(&mut Scopes).is_continue()
}

struct Scopes;

impl Visitor for Scopes {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        let SetExpr::Select(select) = query.body.as_ref() else {
            return ControlFlow::Continue(());
        };
        let derived = derived_tables(select)?;
        let mut exprs: Vec<&Expr> = Vec::new();
        for item in &select.projection {
            match item {
                SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                    exprs.push(e)
                }
                _ => {}
            }
        }
        exprs.extend(select.selection.as_ref());
        exprs.extend(select.having.as_ref());
        if let GroupByExpr::Expressions(group, _) = &select.group_by {
            exprs.extend(group);
        }
        for table in &select.from {
            for join in &table.joins {
                if let Some(JoinConstraint::On(on)) = join_constraint(&join.join_operator) {
                    exprs.push(on);
                }
            }
        }
        if let Some(order) = &query.order_by
            && let sqlparser::ast::OrderByKind::Expressions(keys) = &order.kind
        {
            exprs.extend(keys.iter().map(|k| &k.expr));
        }
        for expr in exprs {
            sqlparser::ast::visit_expressions(expr, |e| match e {
                Expr::CompoundIdentifier(parts) => match parts.as_slice() {
                    [table, column] => match derived.iter().find(|(n, _)| *n == table.value) {
                        Some((_, columns)) if !columns.contains(column.value.as_str()) => {
                            ControlFlow::Break(())
                        }
                        _ => ControlFlow::Continue(()),
                    },
                    _ => ControlFlow::Continue(()),
                },
                _ => ControlFlow::Continue(()),
            })?;
        }
        ControlFlow::Continue(())
    }
}

fn join_constraint(operator: &JoinOperator) -> Option<&JoinConstraint> {
    match operator {
        JoinOperator::Join(c)
        | JoinOperator::Inner(c)
        | JoinOperator::Left(c)
        | JoinOperator::LeftOuter(c)
        | JoinOperator::Right(c)
        | JoinOperator::RightOuter(c)
        | JoinOperator::FullOuter(c)
        | JoinOperator::Semi(c)
        | JoinOperator::LeftSemi(c)
        | JoinOperator::RightSemi(c)
        | JoinOperator::Anti(c)
        | JoinOperator::LeftAnti(c)
        | JoinOperator::RightAnti(c) => Some(c),
        _ => None,
    }
}

/// The named derived tables `select` reads, each with the names of its
/// columns; breaks when one has two columns of one name.
fn derived_tables(select: &Select) -> ControlFlow<(), Vec<(&str, HashSet<&str>)>> {
    let mut derived = Vec::new();
    let relations = select
        .from
        .iter()
        .flat_map(|t| std::iter::once(&t.relation).chain(t.joins.iter().map(|j| &j.relation)));
    for relation in relations {
        let TableFactor::Derived {
            subquery,
            alias: Some(alias),
            ..
        } = relation
        else {
            continue;
        };
        if !alias.columns.is_empty() {
            continue;
        }
        let SetExpr::Select(inner) = subquery.body.as_ref() else {
            continue;
        };
        let mut columns = HashSet::new();
        let mut known = true;
        for item in &inner.projection {
            let name = match item {
                SelectItem::ExprWithAlias { alias, .. } => alias.value.as_str(),
                SelectItem::UnnamedExpr(Expr::Identifier(ident)) => ident.value.as_str(),
                SelectItem::UnnamedExpr(Expr::CompoundIdentifier(parts)) => match parts.last() {
                    Some(last) => last.value.as_str(),
                    None => continue,
                },
                // A name the database makes up, which nothing meshgate
                // writes reads.
                SelectItem::UnnamedExpr(_) => continue,
                // `*`: columns not known here.
                _ => {
                    known = false;
                    break;
                }
            };
            if !columns.insert(name) {
                return ControlFlow::Break(());
            }
        }
        if known {
            derived.push((alias.name.value.as_str(), columns));
        }
    }
    ControlFlow::Continue(derived)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scoped(sql: &str) -> bool {
        let dialect = sqlparser::dialect::PostgreSqlDialect {};
        let statement = sqlparser::parser::Parser::parse_sql(&dialect, sql)
            .unwrap()
            .pop()
            .unwrap();
        well_scoped(&statement)
    }

    #[test]
    fn columns_read_through_derived_tables_must_be_theirs_and_unique() {
        assert!(scoped(
            "SELECT p.id, e AS l FROM (SELECT length(p.name) AS e, p.id FROM t AS p) AS p ORDER BY p.id"
        ));
        assert!(scoped(
            "SELECT p.id FROM (SELECT p.id FROM t AS p WHERE p.other = 1) AS p"
        ));
        assert!(scoped(
            "SELECT a.id, b.x FROM t AS a JOIN u AS b ON a.id = b.id"
        ));
        // Two columns named `id`.
        assert!(!scoped(
            "SELECT id, count(id) FROM (SELECT a.id, b.id FROM t AS a JOIN t AS b ON a.n < b.n) AS d GROUP BY id"
        ));
        // A column the derived table names otherwise.
        assert!(!scoped(
            r#"SELECT t.id FROM t JOIN (SELECT avg(b.n), b.name FROM t AS b GROUP BY b.name) AS sq ON t.name = sq.name WHERE t.n > sq."avg(b.n)""#
        ));
        assert!(!scoped(
            "SELECT d.id FROM (SELECT p.x FROM t AS p) AS d ORDER BY d.id"
        ));
    }
}
