//! Sub-plan pushdown: the largest parts of a query that read one SQL source
//! become one statement in its dialect, run by a [`RemoteExec`].
//!
//! After DataFusion's own optimizer, [`SourcePushdown`] walks the logical
//! plan bottom-up. A scan of a source's table starts a group; a filter,
//! projection, aggregate, sort, limit, alias or join whose inputs all belong
//! to one group, and whose expressions the source understands, joins it.
//! Each group's topmost node is unparsed to SQL and replaced by a
//! [`RemoteQuery`] node.
//!
//! Policies travel with the SQL. A product the caller reads under a row
//! filter or masks is sent as a fenced subquery:
//!
//! ```sql
//! (SELECT c_name, '***' AS c_phone FROM crm.customer WHERE c_region = 'EUROPE' OFFSET 0)
//! ```
//!
//! `OFFSET 0` keeps PostgreSQL and SQLite from merging the subquery or
//! pushing the caller's predicates into it, so nothing the caller wrote runs
//! on a row the row filter hides, as with the [`crate::policy::PolicyExec`]
//! barrier. A Flight SQL remote gives no such guarantee: there a product
//! under a row filter is sent alone, and everything above it runs here.

use std::any::Any;
use std::collections::HashSet;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::ControlFlow;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::common::stats::Precision;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, DFSchema, DFSchemaRef, Statistics, TableReference};
use datafusion::config::ConfigOptions;
use datafusion::datasource::source_as_provider;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::context::QueryPlanner;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::{
    Expr, Extension, FetchType, JoinType, LogicalPlan, Projection, SkipType, TableScan,
    UserDefinedLogicalNode, UserDefinedLogicalNodeCore,
};
use datafusion::optimizer::{OptimizerConfig, OptimizerRule};
use datafusion::physical_expr::expressions::DynamicFilterPhysicalExpr;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::filter_pushdown::{
    ChildPushdownResult, FilterPushdownPhase, FilterPushdownPropagation,
};
use datafusion::physical_plan::joins::HashJoinExec;
use datafusion::physical_plan::metrics::{BaselineMetrics, ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::replace_children_if_necessary;
use datafusion::physical_plan::statistics::StatisticsArgs;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
};
use datafusion::physical_planner::{DefaultPhysicalPlanner, ExtensionPlanner, PhysicalPlanner};
use datafusion::sql::unparser::Unparser;
use futures::{FutureExt, StreamExt, TryStreamExt};
use sqlparser::ast::{
    GroupByExpr, LimitClause, ObjectName, OrderByKind, Query, Select, SelectItem, SetExpr,
    Statement, TableFactor, VisitMut, VisitorMut,
};

use super::alike::expr_pushable;
use super::join_keys::{KeyColumns, KeyCondition};
use super::{Dialect, ForwardedToken, RemoteTable, Source};
use crate::policy::{ColumnView, PolicyTable};

/// The optimizer rule that sends sub-plans to their sources.
#[derive(Debug, Default)]
pub struct SourcePushdown;

impl OptimizerRule for SourcePushdown {
    fn name(&self) -> &str {
        "meshgate_source_pushdown"
    }

    fn supports_rewrite(&self) -> bool {
        true
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> Result<Transformed<LogicalPlan>> {
        push_down(plan).map(Transformed::yes)
    }
}

/// `plan` with each sub-plan that one source can run sent there, in the plan
/// itself and in every subquery its expressions hold (an uncorrelated
/// scalar subquery stays a subquery until it is executed).
fn push_down(plan: LogicalPlan) -> Result<LogicalPlan> {
    let plan = plan
        .transform_up(|node| {
            node.map_subqueries(|subquery| match subquery {
                LogicalPlan::Subquery(mut subquery) => {
                    let inner = Arc::unwrap_or_clone(subquery.subquery);
                    subquery.subquery = Arc::new(push_down(inner)?);
                    Ok(Transformed::yes(LogicalPlan::Subquery(subquery)))
                }
                other => Ok(Transformed::no(other)),
            })
        })?
        .data;
    let (plan, group) = visit(plan)?;
    Ok(match group {
        Some(group) => group.into_remote(plan),
        None => plan,
    })
}

/// A table of a source as it appears in the SQL sent there.
#[derive(Debug, Clone)]
struct Leaf {
    /// The name the scan has in meshgate's plan.
    table: TableReference,
    /// What replaces that name in the SQL sent.
    sent: TableFactor,
    /// What replaces it in the SQL shown to a caller: the product's name
    /// in place of its policy.
    shown: TableFactor,
    /// Whether the product is read under a row filter the source cannot
    /// fence: nothing above it may be sent.
    unfenced: bool,
    product: String,
    /// About how many rows the table holds.
    rows: Option<u64>,
    /// The columns the source finds the table's rows by, where it needs
    /// them to join (see [`join_served`]); `None` where it does not.
    indexed: Option<Arc<HashSet<String>>>,
    /// What replaces the name in the SQL sent for each part, where the
    /// table is read in parts (see [`RemoteTable::sent_in_parts`]); empty
    /// where it is read whole.
    parts: Vec<TableFactor>,
    /// The column that is the table's rowid, which a condition on the
    /// rowid's range leaves to narrow the rows read as it did.
    rowid_key: Option<String>,
}

/// Nodes whose whole subtree can be sent to one source.
#[derive(Debug, Clone)]
struct Group {
    source: Arc<Source>,
    leaves: Vec<Leaf>,
}

impl Group {
    fn merge(mut self, other: Group) -> Option<Group> {
        if !Arc::ptr_eq(&self.source, &other.source) {
            return None;
        }
        self.leaves.extend(other.leaves);
        // Column references are written `table.column`: two different
        // tables of one name would be ambiguous.
        for (i, a) in self.leaves.iter().enumerate() {
            for b in &self.leaves[i + 1..] {
                if a.table.table() == b.table.table() && a.table != b.table {
                    return None;
                }
            }
        }
        Some(self)
    }

    /// `plan` as one remote query; when it cannot be written in the
    /// source's dialect, `plan` runs here and its inputs go on their own.
    fn into_remote(self, plan: LogicalPlan) -> LogicalPlan {
        match RemoteQuery::try_new(&plan, &self) {
            Ok(node) => LogicalPlan::Extension(Extension {
                node: Arc::new(node),
            }),
            Err(error) => {
                tracing::debug!(%error, "sub-plan stays in meshgate");
                let inputs = plan.clone().map_children(|input| {
                    let pushed = push_down(input.clone()).unwrap_or(input);
                    Ok(Transformed::yes(pushed))
                });
                match inputs {
                    Ok(pushed) => pushed.data,
                    Err(_) => plan,
                }
            }
        }
    }
}

/// Rewrites the children of `plan`, and tells whether `plan` itself can go
/// to a source.
fn visit(plan: LogicalPlan) -> Result<(LogicalPlan, Option<Group>)> {
    if let LogicalPlan::TableScan(scan) = &plan {
        let group = leaf_group(scan);
        return Ok((plan, group));
    }
    if matches!(plan, LogicalPlan::Extension(_)) || plan.inputs().is_empty() {
        return Ok((plan, None));
    }
    let mut children = Vec::new();
    let mut groups = Vec::new();
    for child in plan.inputs() {
        let (child, group) = visit(child.clone())?;
        children.push(child);
        groups.push(group);
    }
    let merged = if node_pushable(&plan) {
        groups
            .iter()
            .cloned()
            .try_fold(None::<Group>, |acc, g| {
                let g = g?;
                match acc {
                    None => Some(Some(g)),
                    Some(acc) => acc.merge(g).map(Some),
                }
            })
            .flatten()
            .filter(|g| {
                expressions_pushable(&plan, g.source.dialect)
                    && !g.leaves.iter().any(|l| l.unfenced)
                    && join_served(&plan, g)
            })
    } else {
        None
    };
    if let Some(group) = merged {
        return Ok((
            plan.with_new_exprs(plan.expressions(), children)?,
            Some(group),
        ));
    }
    // This node stays here: each child that can go to a source goes alone.
    let children = children
        .into_iter()
        .zip(groups)
        .map(|(child, group)| match group {
            Some(group) => group.into_remote(child),
            None => child,
        })
        .collect();
    Ok((plan.with_new_exprs(plan.expressions(), children)?, None))
}

/// A scan of a source's table, as a group of one.
fn leaf_group(scan: &TableScan) -> Option<Group> {
    let provider = source_as_provider(&scan.source).ok()?;
    let any: &dyn Any = provider.as_ref();
    if let Some(table) = any.downcast_ref::<RemoteTable>() {
        if !table.source.options.pushdown {
            return None;
        }
        let dialect = table.source.dialect;
        let alias = scan.table_name.table();
        let sent = parse_factor(&table.sent_from(alias), dialect)?;
        let stats = table.stats();
        let parts = table
            .sent_in_parts(alias, &stats)
            .iter()
            .map(|part| parse_factor(part, dialect))
            .collect::<Option<_>>()?;
        return Some(Group {
            source: Arc::clone(&table.source),
            leaves: vec![Leaf {
                table: scan.table_name.clone(),
                shown: sent.clone(),
                sent,
                unfenced: false,
                product: table.product.clone(),
                rows: stats.rows,
                indexed: stats.indexed,
                parts,
                rowid_key: stats.rowid.and_then(|rowid| rowid.key),
            }],
        });
    }
    let policed = any.downcast_ref::<PolicyTable>()?;
    let (inner, row_filter, columns) = policed.parts();
    let table = (inner.as_ref() as &dyn Any).downcast_ref::<RemoteTable>()?;
    let stats = table.stats();
    if !table.source.options.pushdown {
        return None;
    }
    let dialect = table.source.dialect;
    let unparser = Unparser::new(dialect.unparser_dialect());
    let schema = table.schema_ref();
    let columns_schema = DFSchema::try_from(schema.as_ref().clone()).ok()?;
    let mut select = Vec::new();
    for (index, view) in columns {
        let name = quote(schema.field(*index).name());
        match view {
            ColumnView::Plain => select.push(name),
            ColumnView::Masked { expr, .. } => {
                if !expr_pushable(expr, &columns_schema, dialect) {
                    return None;
                }
                let expr = super::collation::for_source(expr.clone(), schema, dialect).ok()?;
                let sql = unparser.expr_to_sql(&expr).ok()?;
                select.push(format!("{sql} AS {name}"));
            }
            ColumnView::Denied => {}
        }
    }
    let read = table.remote.last().map_or("t", String::as_str);
    let mut fenced = String::new();
    if let Some(filter) = row_filter {
        if !expr_pushable(filter, &columns_schema, dialect) {
            return None;
        }
        let filter = super::collation::for_source(filter.clone(), schema, dialect).ok()?;
        let sql = unparser.expr_to_sql(&filter).ok()?;
        fenced.push_str(&format!(" WHERE {sql}"));
        match dialect {
            Dialect::Postgres => fenced.push_str(" OFFSET 0"),
            Dialect::Sqlite => fenced.push_str(" LIMIT -1 OFFSET 0"),
            Dialect::FlightSql => {}
        }
    }
    let alias = quote(scan.table_name.table());
    let fence = |from: &str| {
        let select = select.join(", ");
        parse_factor(
            &format!("(SELECT {select} FROM {from}{fenced}) AS {alias}"),
            dialect,
        )
    };
    let sent = fence(&table.sent_from(read))?;
    // Under a row filter the table is read whole: how many parts it is
    // read in would tell the caller how large it is.
    let parts = match row_filter {
        Some(_) => Vec::new(),
        None => table
            .sent_in_parts(read, &stats)
            .iter()
            .map(|part| fence(part))
            .collect::<Option<_>>()?,
    };
    let shown = parse_factor(
        &format!(
            "{} AS {alias}",
            quote(&format!("{} (under policy)", table.product))
        ),
        dialect,
    )?;
    Some(Group {
        source: Arc::clone(&table.source),
        leaves: vec![Leaf {
            table: scan.table_name.clone(),
            sent,
            shown,
            unfenced: row_filter.is_some() && !dialect.fences_subqueries(),
            product: table.product.clone(),
            rows: stats.rows.map(|rows| {
                if row_filter.is_some() {
                    filtered(rows)
                } else {
                    rows
                }
            }),
            indexed: stats.indexed.map(|indexed| {
                // A fence the source keeps (a row filter's) is read whole,
                // without its table's indexes; a masked column is a value
                // computed from the column.
                let usable = indexed
                    .iter()
                    .filter(|name| {
                        row_filter.is_none()
                            && columns.iter().any(|(index, view)| {
                                matches!(view, ColumnView::Plain)
                                    && schema.field(*index).name() == *name
                            })
                    })
                    .cloned()
                    .collect();
                Arc::new(usable)
            }),
            parts,
            rowid_key: stats.rowid.and_then(|rowid| rowid.key),
        }],
    })
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// The table factor of `SELECT * FROM <factor>`.
fn parse_factor(factor: &str, dialect: Dialect) -> Option<TableFactor> {
    let sql = format!("SELECT * FROM {factor}");
    let parser_dialect = dialect.parser_dialect();
    let mut statements =
        sqlparser::parser::Parser::parse_sql(parser_dialect.as_ref(), &sql).ok()?;
    let Some(Statement::Query(query)) = statements.pop() else {
        return None;
    };
    let sqlparser::ast::SetExpr::Select(select) = *query.body else {
        return None;
    };
    select.from.into_iter().next().map(|t| t.relation)
}

/// Whether the source can run `plan`'s own operation (its inputs aside).
fn node_pushable(plan: &LogicalPlan) -> bool {
    match plan {
        LogicalPlan::Projection(_)
        | LogicalPlan::Filter(_)
        | LogicalPlan::Sort(_)
        | LogicalPlan::SubqueryAlias(_) => true,
        LogicalPlan::Aggregate(aggregate) => {
            // GROUPING SETS, ROLLUP and CUBE stay here.
            !aggregate
                .group_expr
                .iter()
                .any(|e| matches!(e, Expr::GroupingSet(_)))
        }
        LogicalPlan::Limit(limit) => {
            matches!(limit.get_skip_type(), Ok(SkipType::Literal(_)))
                && matches!(limit.get_fetch_type(), Ok(FetchType::Literal(_)))
        }
        LogicalPlan::Join(join) => {
            matches!(
                join.join_type,
                JoinType::Inner | JoinType::Left | JoinType::Right | JoinType::Full
            ) && join.null_equality == datafusion::common::NullEquality::NullEqualsNothing
        }
        _ => false,
    }
}

fn expressions_pushable(plan: &LogicalPlan, dialect: Dialect) -> bool {
    // An empty select list (a count over a subquery whose columns nothing
    // reads) is PostgreSQL's alone.
    if let LogicalPlan::Projection(projection) = plan
        && projection.expr.is_empty()
        && dialect != Dialect::Postgres
    {
        return false;
    }
    let Some(schema) = super::collation::expression_schema(plan) else {
        return plan.expressions().is_empty();
    };
    plan.expressions()
        .iter()
        .all(|expr| expr_pushable(expr, &schema, dialect))
}

/// Rows a join's side may hold for the join to go to a source without an
/// index serving it: whatever plan the source makes, it is cheap.
const SMALL_JOIN_SIDE: u64 = 16_384;

/// Whether the source joins `plan`'s inputs well, when `plan` is a join of
/// `group`'s tables. SQLite joins by looping over one side and looking each
/// row's match up in the other, by an index or by one it builds for the
/// query over the whole table, whose size it does not know (a `partsupp` of
/// 800 000 rows indexed once per query took longer than reading it here).
/// So a join goes to SQLite when an index serves one of its keys (for an
/// outer join, a key of its right side, the one SQLite looks up), or when
/// both its sides are small; otherwise each side is sent alone and joined
/// here, with the keys of the side built first sent to the other. Any other node, and
/// every join of a source that joins without indexes, is served.
fn join_served(plan: &LogicalPlan, group: &Group) -> bool {
    let LogicalPlan::Join(join) = plan else {
        return true;
    };
    if group.leaves.iter().all(|leaf| leaf.indexed.is_none()) {
        return true;
    }
    let small = |side: &LogicalPlan| {
        estimated_rows(side, &group.leaves).is_some_and(|rows| rows <= SMALL_JOIN_SIDE)
    };
    if small(&join.left) && small(&join.right) {
        return true;
    }
    let indexed = |side: &LogicalPlan, key: &Expr| {
        let Expr::Column(column) = key else {
            return false;
        };
        let Some((table, name)) = column_origin(side, column) else {
            return false;
        };
        group.leaves.iter().any(|leaf| {
            leaf.table == table
                && leaf
                    .indexed
                    .as_ref()
                    .is_none_or(|indexed| indexed.contains(&name))
        })
    };
    join.on.iter().any(|(left, right)| {
        indexed(&join.right, right)
            || (join.join_type == JoinType::Inner && indexed(&join.left, left))
    })
}

/// The table and column of a scan that `column` of `plan` is, passed up
/// unchanged (renamed at most); `None` for a computed one.
fn column_origin(plan: &LogicalPlan, column: &Column) -> Option<(TableReference, String)> {
    match plan {
        LogicalPlan::TableScan(scan) => {
            let own = column
                .relation
                .as_ref()
                .is_none_or(|relation| *relation == scan.table_name);
            (own && scan.projected_schema.has_column(column))
                .then(|| (scan.table_name.clone(), column.name.clone()))
        }
        LogicalPlan::SubqueryAlias(alias) => {
            let index = alias.schema.index_of_column(column).ok()?;
            let (qualifier, field) = alias.input.schema().qualified_field(index);
            column_origin(&alias.input, &Column::new(qualifier.cloned(), field.name()))
        }
        LogicalPlan::Projection(projection) => {
            let index = projection.schema.index_of_column(column).ok()?;
            let mut expr = projection.expr.get(index)?;
            while let Expr::Alias(alias) = expr {
                expr = &alias.expr;
            }
            let Expr::Column(inner) = expr else {
                return None;
            };
            column_origin(&projection.input, inner)
        }
        LogicalPlan::Filter(_) | LogicalPlan::Sort(_) | LogicalPlan::Limit(_) => {
            column_origin(plan.inputs().first()?, column)
        }
        LogicalPlan::Join(join) if join.left.schema().has_column(column) => {
            column_origin(&join.left, column)
        }
        LogicalPlan::Join(join) => column_origin(&join.right, column),
        _ => None,
    }
}

/// A sub-plan sent to a source as one SQL statement.
#[derive(Debug, Clone)]
pub(crate) struct RemoteQuery {
    source: Arc<Source>,
    sql: String,
    shown: String,
    products: String,
    schema: DFSchemaRef,
    /// About how many rows the statement answers.
    rows: Option<u64>,
    /// Whether the statement reads more than one table.
    joins: bool,
    /// The statements that read it in parts, each a part of its table, to
    /// run at once; empty where it is read by `sql` whole.
    parts: Vec<String>,
}

impl PartialEq for RemoteQuery {
    fn eq(&self, other: &Self) -> bool {
        self.sql == other.sql && Arc::ptr_eq(&self.source, &other.source)
    }
}

impl Eq for RemoteQuery {}

impl PartialOrd for RemoteQuery {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        self.sql.partial_cmp(&other.sql)
    }
}

impl Hash for RemoteQuery {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.sql.hash(state);
    }
}

impl RemoteQuery {
    fn try_new(plan: &LogicalPlan, group: &Group) -> Result<Self> {
        let dialect = group.source.dialect;
        let projected = with_projection(limits_above_scans(sorts_under_limits(plan.clone())?)?)?;
        let projected = computed_columns_named(projected)?;
        let projected = super::collation::plan_for_source(projected, dialect)?;
        let mut statement = Unparser::new(dialect.unparser_dialect()).plan_to_sql(&projected)?;
        let _ = statement.visit(&mut OrderOutside);
        let _ = statement.visit(&mut DerivedNamedAsRead);
        if dialect == Dialect::Sqlite {
            let _ = statement.visit(&mut OffsetWithLimit);
        }
        if !super::scopes::well_scoped(&statement) {
            return Err(DataFusionError::Plan(format!(
                "the statement written names columns out of scope: {statement}"
            )));
        }
        let sent = replace_leaves(statement.clone(), &group.leaves, |l| &l.sent)?;
        let parts = statements_in_parts(plan, &group.leaves, &statement)?;
        let shown = replace_leaves(statement, &group.leaves, |l| &l.shown)?;
        let mut products: Vec<&str> = group.leaves.iter().map(|l| l.product.as_str()).collect();
        products.sort_unstable();
        products.dedup();
        Ok(Self {
            source: Arc::clone(&group.source),
            sql: sent.to_string(),
            shown: shown.to_string(),
            products: products.join(", "),
            schema: Arc::clone(plan.schema()),
            rows: estimated_rows(plan, &group.leaves),
            joins: group.leaves.len() > 1,
            parts,
        })
    }
}

/// The statements that read `plan` in parts, one for each part of its
/// table (see [`RemoteTable::sent_in_parts`]), from `statement` as written
/// with the table's name: where `plan` reads one table and only filters
/// and projects its rows, so that the parts' answers together are the
/// whole's; and where no index SQLite could narrow the rows read by (for a
/// filter of the plan, or for join keys sent later on a column it answers)
/// would give way to a scan of a range of rowids. Empty otherwise.
fn statements_in_parts(
    plan: &LogicalPlan,
    leaves: &[Leaf],
    statement: &Statement,
) -> Result<Vec<String>> {
    let [leaf] = leaves else {
        return Ok(Vec::new());
    };
    let Some(indexed) = leaf.indexed.as_deref().filter(|_| !leaf.parts.is_empty()) else {
        return Ok(Vec::new());
    };
    // The columns the statement answers (join keys may be sent on any)
    // and those its expressions read.
    let mut columns: Vec<String> = plan
        .schema()
        .fields()
        .iter()
        .map(|field| field.name().clone())
        .collect();
    let mut whole = false;
    plan.apply(|node| {
        let read = |exprs: &[Expr], columns: &mut Vec<String>| {
            let refs = exprs.iter().flat_map(|expr| expr.column_refs());
            columns.extend(refs.map(|column| column.name.clone()));
        };
        Ok(match node {
            LogicalPlan::Projection(_) | LogicalPlan::Filter(_) | LogicalPlan::SubqueryAlias(_) => {
                read(&node.expressions(), &mut columns);
                TreeNodeRecursion::Continue
            }
            LogicalPlan::TableScan(scan) => {
                whole |= scan.fetch.is_some();
                read(&scan.filters, &mut columns);
                TreeNodeRecursion::Continue
            }
            _ => {
                whole = true;
                TreeNodeRecursion::Stop
            }
        })
    })?;
    whole |= columns
        .iter()
        .any(|column| super::table::index_narrows(indexed, leaf.rowid_key.as_deref(), column));
    if whole {
        return Ok(Vec::new());
    }
    (0..leaf.parts.len())
        .map(|part| {
            replace_leaves(statement.clone(), leaves, |l| &l.parts[part]).map(|s| s.to_string())
        })
        .collect()
}

/// The share of a table's rows a filter is taken to keep, where nothing
/// better is known.
const FILTER_KEEPS: f64 = 0.1;

/// About how many of `rows` a filter keeps.
pub(crate) fn filtered(rows: u64) -> u64 {
    ((rows as f64 * FILTER_KEEPS).ceil() as u64).max(1)
}

/// About how many of a table's `rows` a scan reads, with filters or not
/// and up to a limit.
pub(crate) fn scanned(rows: u64, filters: bool, limit: Option<usize>) -> u64 {
    let rows = if filters { filtered(rows) } else { rows };
    limit.map_or(rows, |limit| rows.min(limit as u64))
}

/// About how many rows `plan` answers, from the rows of its tables
/// (`leaves`): enough to tell a dimension table's few rows, or a
/// selective filter's, from a fact table's many when a join chooses the
/// side to build on. A filter keeps a tenth; a join of keys yields the
/// rows of its larger side; an aggregate, a tenth of its input (one row
/// without groups); a limit, at most its count. `None` when a table's
/// rows are unknown.
fn estimated_rows(plan: &LogicalPlan, leaves: &[Leaf]) -> Option<u64> {
    let input = |plan: &LogicalPlan| -> Option<u64> {
        plan.inputs()
            .into_iter()
            .map(|input| estimated_rows(input, leaves))
            .try_fold(0_u64, |most, rows| Some(most.max(rows?)))
    };
    Some(match plan {
        LogicalPlan::TableScan(scan) => {
            let leaf = leaves.iter().find(|leaf| leaf.table == scan.table_name)?;
            scanned(leaf.rows?, !scan.filters.is_empty(), scan.fetch)
        }
        LogicalPlan::Filter(_) => filtered(input(plan)?),
        LogicalPlan::Aggregate(aggregate) if aggregate.group_expr.is_empty() => 1,
        LogicalPlan::Aggregate(_) => filtered(input(plan)?),
        LogicalPlan::Limit(limit) => match limit.get_fetch_type().ok()? {
            FetchType::Literal(Some(fetch)) => input(plan)?.min(fetch as u64),
            _ => input(plan)?,
        },
        LogicalPlan::Union(_) => plan
            .inputs()
            .into_iter()
            .map(|input| estimated_rows(input, leaves))
            .try_fold(0_u64, |sum, rows| Some(sum.saturating_add(rows?)))?,
        _ => input(plan)?,
    })
}

/// `plan` with no row limit on a sort right under a limit. DataFusion gives
/// such a sort the rows the limit needs, `skip + fetch`; the unparser
/// writes the sort's count as the statement's `LIMIT` in place of the
/// limit's, so `ORDER BY id LIMIT 2 OFFSET 1` would be sent as `LIMIT 3
/// OFFSET 1`. The limit above bounds the rows alone.
fn sorts_under_limits(plan: LogicalPlan) -> Result<LogicalPlan> {
    plan.transform_up(|node| match node {
        LogicalPlan::Limit(mut limit) => match Arc::unwrap_or_clone(limit.input) {
            LogicalPlan::Sort(mut sort) if sort.fetch.is_some() => {
                sort.fetch = None;
                limit.input = Arc::new(LogicalPlan::Sort(sort));
                Ok(Transformed::yes(LogicalPlan::Limit(limit)))
            }
            input => {
                limit.input = Arc::new(input);
                Ok(Transformed::no(LogicalPlan::Limit(limit)))
            }
        },
        other => Ok(Transformed::no(other)),
    })
    .map(|t| t.data)
}

/// `plan` with each scan's row limit as a limit node above it, which the
/// unparser writes as `LIMIT` in the scan's own query.
fn limits_above_scans(plan: LogicalPlan) -> Result<LogicalPlan> {
    plan.transform_up(|node| match node {
        LogicalPlan::TableScan(mut scan) if scan.fetch.is_some() => {
            let fetch = scan.fetch.take();
            let limit =
                datafusion::logical_expr::LogicalPlanBuilder::from(LogicalPlan::TableScan(scan))
                    .limit(0, fetch)?
                    .build()?;
            Ok(Transformed::yes(limit))
        }
        other => Ok(Transformed::no(other)),
    })
    .map(|t| t.data)
}

/// Moves a derived table's `ORDER BY` and `LIMIT` to the query around it.
///
/// The unparser writes a projection over a sort or a limit whose keys it
/// does not select (`SELECT a FROM t ORDER BY b LIMIT 3`) as
/// `SELECT t.a FROM (SELECT t.a, t.b FROM t ORDER BY t.b LIMIT 3) AS derived_limit`,
/// where `t` is out of scope, and where the order the derived table is
/// made in need not be the order its rows leave in. When the outer query
/// only projects, the derived table takes the name of the table it reads
/// and its order and limit move out:
/// `SELECT t.a FROM (SELECT t.a, t.b FROM t) AS t ORDER BY t.b LIMIT 3`.
/// A derived table that groups or computes its columns keeps its order.
struct OrderOutside;

impl VisitorMut for OrderOutside {
    type Break = ();

    fn pre_visit_query(&mut self, query: &mut Query) -> ControlFlow<()> {
        let unordered = match &query.order_by {
            None => true,
            Some(order) => matches!(&order.kind, OrderByKind::Expressions(e) if e.is_empty()),
        };
        let unlimited = match &query.limit_clause {
            None => true,
            Some(LimitClause::LimitOffset {
                limit,
                offset,
                limit_by,
            }) => limit.is_none() && offset.is_none() && limit_by.is_empty(),
            Some(_) => false,
        };
        if !unordered || !unlimited || query.fetch.is_some() {
            return ControlFlow::Continue(());
        }
        let SetExpr::Select(select) = query.body.as_mut() else {
            return ControlFlow::Continue(());
        };
        let only_projects = select.selection.is_none()
            && select.qualify.is_none()
            && select.named_window.is_empty()
            && !groups(select);
        let [from] = select.from.as_mut_slice() else {
            return ControlFlow::Continue(());
        };
        let TableFactor::Derived {
            lateral: false,
            subquery,
            alias: Some(alias),
            ..
        } = &mut from.relation
        else {
            return ControlFlow::Continue(());
        };
        if !only_projects
            || !from.joins.is_empty()
            || !alias.name.value.starts_with("derived_")
            || !alias.columns.is_empty()
            || subquery.fetch.is_some()
        {
            return ControlFlow::Continue(());
        }
        let SetExpr::Select(inner) = subquery.body.as_ref() else {
            return ControlFlow::Continue(());
        };
        // Its columns keep their names outside.
        let selects_columns = inner.projection.iter().all(|item| {
            matches!(
                item,
                SelectItem::Wildcard(_)
                    | SelectItem::UnnamedExpr(
                        sqlparser::ast::Expr::Identifier(_)
                            | sqlparser::ast::Expr::CompoundIdentifier(_),
                    )
            )
        });
        let Some(name) = read_name(inner) else {
            return ControlFlow::Continue(());
        };
        if !selects_columns || groups(inner) {
            return ControlFlow::Continue(());
        }
        alias.name = name;
        query.order_by = subquery.order_by.take();
        query.limit_clause = subquery.limit_clause.take();
        ControlFlow::Continue(())
    }
}

/// Names a derived table as the table it reads.
///
/// The unparser writes a projection over another (DataFusion's common
/// subexpressions) as `SELECT p.id, e AS l FROM (SELECT length(p.name) AS
/// e, p.id FROM t AS p) AS derived_projection`, where the outer query names
/// the columns by the table inside, out of its scope. Named `p`, the
/// derived table puts them back in scope: its columns bear those names.
/// Derived tables are renamed innermost first, so that one over another
/// takes the name the inner one took.
struct DerivedNamedAsRead;

impl VisitorMut for DerivedNamedAsRead {
    type Break = ();

    fn post_visit_query(&mut self, query: &mut Query) -> ControlFlow<()> {
        let SetExpr::Select(select) = query.body.as_mut() else {
            return ControlFlow::Continue(());
        };
        let [from] = select.from.as_mut_slice() else {
            return ControlFlow::Continue(());
        };
        let TableFactor::Derived {
            subquery,
            alias: Some(alias),
            ..
        } = &mut from.relation
        else {
            return ControlFlow::Continue(());
        };
        if !from.joins.is_empty()
            || !alias.name.value.starts_with("derived_")
            || !alias.columns.is_empty()
        {
            return ControlFlow::Continue(());
        }
        if let SetExpr::Select(inner) = subquery.body.as_ref()
            && let Some(name) = read_name(inner)
        {
            alias.name = name;
        }
        ControlFlow::Continue(())
    }
}

/// The name `select` reads its one table (or derived table) by, when it
/// reads one and joins nothing.
fn read_name(select: &Select) -> Option<sqlparser::ast::Ident> {
    let [read] = select.from.as_slice() else {
        return None;
    };
    if !read.joins.is_empty() {
        return None;
    }
    match &read.relation {
        TableFactor::Table {
            alias: Some(alias), ..
        }
        | TableFactor::Derived {
            alias: Some(alias), ..
        } => Some(alias.name.clone()),
        TableFactor::Table {
            name, alias: None, ..
        } => name.0.last().and_then(|part| part.as_ident()).cloned(),
        _ => None,
    }
}

/// Gives an `OFFSET` without a `LIMIT` the `LIMIT -1` SQLite requires.
struct OffsetWithLimit;

impl VisitorMut for OffsetWithLimit {
    type Break = ();

    fn pre_visit_query(&mut self, query: &mut Query) -> ControlFlow<()> {
        if let Some(LimitClause::LimitOffset {
            limit: limit @ None,
            offset: Some(_),
            ..
        }) = &mut query.limit_clause
        {
            *limit = Some(sqlparser::ast::Expr::value(sqlparser::ast::Value::Number(
                "-1".to_string(),
                false,
            )));
        }
        ControlFlow::Continue(())
    }
}

/// Whether `select` groups its rows: GROUP BY, HAVING or DISTINCT.
fn groups(select: &Select) -> bool {
    select.having.is_some()
        || select.distinct.is_some()
        || !matches!(&select.group_by, GroupByExpr::Expressions(e, m) if e.is_empty() && m.is_empty())
}

/// `plan` with an explicit projection, which fixes the statement's columns
/// and their order, placed below any sort and limit at its top. An
/// aggregate gets one too: written alone, its aggregates would come before
/// its grouping columns, which its rows hold first.
fn with_projection(plan: LogicalPlan) -> Result<LogicalPlan> {
    match plan {
        LogicalPlan::Projection(_) => Ok(plan),
        LogicalPlan::Limit(_) | LogicalPlan::Sort(_) => {
            let input = plan.inputs()[0].clone();
            let input = with_projection(input)?;
            plan.with_new_exprs(plan.expressions(), vec![input])
        }
        _ => Ok(LogicalPlan::Projection(Projection::try_new(
            plan.schema()
                .columns()
                .into_iter()
                .map(Expr::Column)
                .collect(),
            Arc::new(plan),
        )?)),
    }
}

/// `plan` with each column that a projection over an aggregate or a window
/// hands on named as the plan names it. The unparser writes such a column
/// as the aggregate or window function it holds (`count(1)`), which, in a
/// derived table, the statement around it would read by a name no column
/// has (`"count(Int64(1))"`): `HAVING count(*) > 0` without the grouping
/// column in the select list, say, filters a derived table so.
fn computed_columns_named(plan: LogicalPlan) -> Result<LogicalPlan> {
    plan.transform_up(|node| {
        let LogicalPlan::Projection(projection) = node else {
            return Ok(Transformed::no(node));
        };
        if !matches!(
            projection.input.as_ref(),
            LogicalPlan::Aggregate(_) | LogicalPlan::Window(_)
        ) || projection.expr.iter().all(|e| matches!(e, Expr::Alias(_)))
        {
            return Ok(Transformed::no(LogicalPlan::Projection(projection)));
        }
        let named = projection
            .expr
            .iter()
            .enumerate()
            .map(|(index, expr)| match expr {
                Expr::Alias(_) => expr.clone(),
                _ => {
                    let (qualifier, field) = projection.schema.qualified_field(index);
                    expr.clone()
                        .alias_qualified(qualifier.cloned(), field.name())
                }
            })
            .collect();
        let named = Projection::try_new(named, Arc::clone(&projection.input))?;
        Ok(Transformed::yes(LogicalPlan::Projection(named)))
    })
    .map(|t| t.data)
}

/// Replaces each leaf's name in `statement` by what the source reads.
fn replace_leaves(
    mut statement: Statement,
    leaves: &[Leaf],
    factor: impl Fn(&Leaf) -> &TableFactor,
) -> Result<Statement> {
    struct Replace<'a, F> {
        leaves: &'a [Leaf],
        factor: F,
        replaced: usize,
    }
    impl<F: Fn(&Leaf) -> &TableFactor> VisitorMut for Replace<'_, F> {
        type Break = ();
        // After its children: the replacement, which reads the source's
        // table by a name that may be the product's own, is not visited.
        fn post_visit_table_factor(&mut self, table: &mut TableFactor) -> ControlFlow<()> {
            let TableFactor::Table { name, alias, .. } = table else {
                return ControlFlow::Continue(());
            };
            let Some(leaf) = self.leaves.iter().find(|l| names_table(name, &l.table)) else {
                return ControlFlow::Continue(());
            };
            let mut replacement = (self.factor)(leaf).clone();
            if let Some(alias) = alias.clone() {
                match &mut replacement {
                    TableFactor::Table { alias: a, .. } | TableFactor::Derived { alias: a, .. } => {
                        *a = Some(alias);
                    }
                    _ => {}
                }
            }
            *table = replacement;
            self.replaced += 1;
            ControlFlow::Continue(())
        }
    }
    let mut visitor = Replace {
        leaves,
        factor,
        replaced: 0,
    };
    let _ = statement.visit(&mut visitor);
    if visitor.replaced == 0 {
        return Err(DataFusionError::Plan(
            "no source table found in the unparsed statement".into(),
        ));
    }
    Ok(statement)
}

fn names_table(name: &ObjectName, table: &TableReference) -> bool {
    let parts: Vec<&str> = name
        .0
        .iter()
        .filter_map(|p| p.as_ident().map(|i| i.value.as_str()))
        .collect();
    let expected = table.to_vec();
    parts.len() == expected.len() && parts.iter().zip(&expected).all(|(a, b)| *a == b)
}

impl UserDefinedLogicalNodeCore for RemoteQuery {
    fn name(&self) -> &str {
        "RemoteQuery"
    }

    fn inputs(&self) -> Vec<&LogicalPlan> {
        Vec::new()
    }

    fn schema(&self) -> &DFSchemaRef {
        &self.schema
    }

    fn expressions(&self) -> Vec<Expr> {
        Vec::new()
    }

    fn prevent_predicate_push_down_columns(&self) -> HashSet<String> {
        self.schema.columns().into_iter().map(|c| c.name).collect()
    }

    fn fmt_for_explain(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "RemoteQuery: source={} sql={}",
            self.source.name, self.shown
        )
    }

    fn with_exprs_and_inputs(&self, _exprs: Vec<Expr>, _inputs: Vec<LogicalPlan>) -> Result<Self> {
        Ok(self.clone())
    }

    fn supports_limit_pushdown(&self) -> bool {
        false
    }
}

/// Plans [`RemoteQuery`] nodes as [`RemoteExec`]s.
#[derive(Debug, Default)]
pub struct SourcePlanner;

#[async_trait]
impl ExtensionPlanner for SourcePlanner {
    async fn plan_extension(
        &self,
        _planner: &dyn PhysicalPlanner,
        node: &dyn UserDefinedLogicalNode,
        _logical_inputs: &[&LogicalPlan],
        _physical_inputs: &[Arc<dyn ExecutionPlan>],
        _session: &dyn Session,
        _planning_ctx: &PhysicalPlanningContext,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        let Some(query) = node.as_any().downcast_ref::<RemoteQuery>() else {
            return Ok(None);
        };
        Ok(Some(Arc::new(
            RemoteExec::new(
                Arc::clone(&query.source),
                query.sql.clone(),
                query.shown.clone(),
                query.products.clone(),
                Arc::new(query.schema.as_arrow().clone()),
            )
            .with_estimated_rows(query.rows)
            .with_keys_fenced(query.joins && query.source.dialect == Dialect::Sqlite)
            .with_parts(query.parts.clone()),
        )))
    }
}

#[async_trait]
impl QueryPlanner for SourcePlanner {
    async fn create_physical_plan(
        &self,
        logical_plan: &LogicalPlan,
        session_state: &dyn Session,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        DefaultPhysicalPlanner::with_extension_planners(vec![Arc::new(SourcePlanner)])
            .create_physical_plan(logical_plan, session_state)
            .await
    }
}

/// Runs one SQL statement in a source, with the keys of the joins above it
/// where they are final when it starts (see [`super::join_keys`]).
#[derive(Debug)]
pub struct RemoteExec {
    source: Arc<Source>,
    sql: String,
    shown: String,
    products: String,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
    /// The dynamic filters of the hash joins above whose probe side this is.
    join_filters: Vec<Arc<dyn PhysicalExpr>>,
    /// The keys the statement was sent with, once it was (for EXPLAIN
    /// ANALYZE).
    sent: Arc<OnceLock<Option<KeyCondition>>>,
    /// About how many rows the statement answers.
    rows: Option<u64>,
    /// The output columns whose keys compare in the source as here.
    key_columns: KeyColumns,
    /// Whether the source applies the keys to what the statement answers
    /// rather than plan them into it (see [`RemoteExec::with_keys_fenced`]).
    keys_fenced: bool,
    /// The statements that read `sql`'s answer in parts, one a partition
    /// (see [`RemoteExec::with_parts`]); empty where `sql` is run whole.
    parts: Vec<String>,
}

/// How long a statement waits for the joins above it to have their keys.
/// A join reads its probe side only once it has them, so the wait is over
/// by the time the rows are needed; the bound is a safeguard.
const JOIN_KEYS_WAIT: Duration = Duration::from_secs(30);

impl RemoteExec {
    pub(crate) fn new(
        source: Arc<Source>,
        sql: String,
        shown: String,
        products: String,
        schema: SchemaRef,
    ) -> Self {
        let properties = PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        );
        let key_columns = KeyColumns::unknown(source.dialect);
        Self {
            source,
            sql,
            shown,
            products,
            schema,
            properties: Arc::new(properties),
            metrics: ExecutionPlanMetricsSet::new(),
            join_filters: Vec::new(),
            sent: Arc::default(),
            rows: None,
            key_columns,
            keys_fenced: false,
            parts: Vec::new(),
        }
    }

    /// Read in `parts`, statements whose answers together are `sql`'s, run
    /// at once, one a partition.
    pub(crate) fn with_parts(mut self, parts: Vec<String>) -> Self {
        if parts.len() > 1 {
            let properties = self
                .properties
                .as_ref()
                .clone()
                .with_partitioning(Partitioning::UnknownPartitioning(parts.len()));
            self.properties = Arc::new(properties);
            self.parts = parts;
        }
        self
    }

    /// With the keys applied to what the statement answers. SQLite plans a
    /// join without statistics: told that few rows of one table are wanted,
    /// it may start from that table and index the other for each query,
    /// slower than the join as written (TPC-H q11, one nation's suppliers
    /// sought among 800 000 `partsupp` rows, took twice as long).
    pub(crate) fn with_keys_fenced(mut self, fenced: bool) -> Self {
        self.keys_fenced = fenced;
        self
    }

    /// With the output columns of `INTEGER` affinity, where the source is
    /// SQLite.
    pub(crate) fn with_key_columns(mut self, key_columns: KeyColumns) -> Self {
        self.key_columns = key_columns;
        self
    }

    /// A copy that sends the keys of `join_filters`, not yet run.
    fn with_join_filters(&self, join_filters: Vec<Arc<dyn PhysicalExpr>>) -> Self {
        let mut node = RemoteExec::new(
            Arc::clone(&self.source),
            self.sql.clone(),
            self.shown.clone(),
            self.products.clone(),
            Arc::clone(&self.schema),
        );
        node.join_filters = join_filters;
        node.rows = self.rows;
        node.key_columns = self.key_columns.clone();
        node.keys_fenced = self.keys_fenced;
        node.with_parts(self.parts.clone())
    }

    /// With an estimate of the rows the statement answers, for the joins
    /// above to choose the side they build on.
    pub(crate) fn with_estimated_rows(mut self, rows: Option<u64>) -> Self {
        self.rows = rows;
        self
    }

    /// The statement to send: with the keys of the join filters, once they
    /// are final, where they make a condition a source can be sent.
    async fn statement(
        sql: String,
        schema: SchemaRef,
        join_filters: Vec<Arc<dyn PhysicalExpr>>,
        key_columns: KeyColumns,
        fenced: bool,
        sent: Arc<OnceLock<Option<KeyCondition>>>,
    ) -> String {
        let filters: Vec<&DynamicFilterPhysicalExpr> = join_filters
            .iter()
            .filter_map(|filter| filter.downcast_ref::<DynamicFilterPhysicalExpr>())
            .collect();
        let waits = filters.iter().map(|filter| filter.wait_complete());
        if tokio::time::timeout(JOIN_KEYS_WAIT, futures::future::join_all(waits))
            .await
            .is_err()
        {
            tracing::debug!("a join's keys were not final in time; the statement goes without");
        }
        let condition = filters
            .iter()
            .filter_map(|filter| {
                // A filter not final is not sent.
                filter.wait_complete().now_or_never()?;
                KeyCondition::of(&filter.current().ok()?, &schema)
            })
            .reduce(KeyCondition::and);
        let statement = match &condition {
            Some(condition) => condition.wrap(&sql, &schema, &key_columns, fenced),
            None => sql,
        };
        let _ = sent.set(condition);
        statement
    }

    /// The statement sent (each part's, where the table is read in parts),
    /// policies included, and once it was sent the join keys it carried
    /// (for administrators' EXPLAIN).
    pub fn sql(&self) -> String {
        let sent = |sql: &String| match self.sent.get() {
            Some(Some(condition)) => {
                condition.wrap(sql, &self.schema, &self.key_columns, self.keys_fenced)
            }
            _ => sql.clone(),
        };
        if self.parts.is_empty() {
            return sent(&self.sql);
        }
        self.parts.iter().map(sent).collect::<Vec<_>>().join("; ")
    }
}

impl DisplayAs for RemoteExec {
    fn fmt_as(&self, _format: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RemoteExec: source={} sql={}",
            self.source.name, self.shown
        )?;
        if !self.parts.is_empty() {
            write!(f, ", read in {} parts by rowid", self.parts.len())?;
        }
        if let Some(Some(condition)) = self.sent.get() {
            write!(f, ", join keys sent=[{}]", condition.summary(&self.schema))?;
        }
        Ok(())
    }
}

impl ExecutionPlan for RemoteExec {
    fn name(&self) -> &str {
        "RemoteExec"
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        for filter in &self.join_filters {
            if f(filter)? == TreeNodeRecursion::Stop {
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    }

    /// A plan that is run again (a recursive query's step) is reset: its
    /// joins make their filters afresh, and the statement goes without.
    fn reset_state(self: Arc<Self>) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(self.with_join_filters(Vec::new())))
    }

    /// Takes the dynamic filters DataFusion hands down after planning (of
    /// hash joins, sorts with a limit and aggregates): [`RemoteJoinKeys`]
    /// keeps those of the hash joins this is the probe side of, which are
    /// sent with the statement. The joins still apply them; a remote Flight
    /// SQL server is sent none.
    fn handle_child_pushdown_result(
        &self,
        phase: FilterPushdownPhase,
        child_pushdown_result: ChildPushdownResult,
        _config: &ConfigOptions,
    ) -> Result<FilterPushdownPropagation<Arc<dyn ExecutionPlan>>> {
        let taken: Vec<Arc<dyn PhysicalExpr>> = if phase == FilterPushdownPhase::Post
            && matches!(self.source.dialect, Dialect::Postgres | Dialect::Sqlite)
        {
            child_pushdown_result
                .parent_filters
                .iter()
                .map(|pushed| &pushed.filter)
                .filter(|filter| filter.downcast_ref::<DynamicFilterPhysicalExpr>().is_some())
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        let propagation = FilterPushdownPropagation::all_unsupported(child_pushdown_result);
        if taken.is_empty() {
            return Ok(propagation);
        }
        let filters = self.join_filters.iter().cloned().chain(taken).collect();
        Ok(propagation.with_updated_node(Arc::new(self.with_join_filters(filters))))
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        Vec::new()
    }

    fn with_new_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let sql = match self.parts.get(partition) {
            Some(part) => part.clone(),
            None if partition == 0 && self.parts.is_empty() => self.sql.clone(),
            None => {
                return Err(DataFusionError::Internal(format!(
                    "RemoteExec has no partition {partition}"
                )));
            }
        };
        let token = context
            .session_config()
            .get_extension::<ForwardedToken>()
            .map(|t| t.as_ref().clone());
        let stream: SendableRecordBatchStream = if self.join_filters.is_empty() {
            let _ = self.sent.set(None);
            self.source
                .execute(sql, Arc::clone(&self.schema), &self.products, token)
        } else {
            let statement = Self::statement(
                sql,
                Arc::clone(&self.schema),
                self.join_filters.clone(),
                self.key_columns.clone(),
                self.keys_fenced,
                Arc::clone(&self.sent),
            );
            let (source, schema, products) = (
                Arc::clone(&self.source),
                Arc::clone(&self.schema),
                self.products.clone(),
            );
            let started = futures::stream::once(async move {
                let sql = statement.await;
                Ok::<_, DataFusionError>(source.execute(sql, schema, &products, token))
            });
            Box::pin(RecordBatchStreamAdapter::new(
                Arc::clone(&self.schema),
                started.try_flatten(),
            ))
        };
        // `output_rows` counts the rows the source sent; the gateway's
        // metrics, how long the source took to answer.
        let baseline = BaselineMetrics::new(&self.metrics, partition);
        let gateway = context
            .session_config()
            .get_extension::<crate::metrics::Metrics>();
        let source = self.source.name.clone();
        let started = std::time::Instant::now();
        let mut answered = false;
        let counted = stream.map(move |batch| {
            if !answered {
                answered = true;
                if let Some(metrics) = &gateway {
                    let seconds = started.elapsed().as_secs_f64();
                    metrics.source_request(&source, seconds, batch.is_err());
                }
            }
            if let Ok(batch) = &batch {
                baseline.record_output(batch.num_rows());
            }
            batch
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            counted,
        )))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn statistics_from_inputs(
        &self,
        _input_stats: &[Arc<Statistics>],
        args: &StatisticsArgs,
    ) -> Result<Arc<Statistics>> {
        let mut statistics = Statistics::new_unknown(&self.schema);
        // A part reads about its share.
        let rows = match args.partition() {
            Some(_) if !self.parts.is_empty() => {
                self.rows.map(|rows| rows.div_ceil(self.parts.len() as u64))
            }
            _ => self.rows,
        };
        // Rounded as a policy barrier rounds its estimate: the rows of a
        // table read under a row filter are not the caller's to learn.
        if let Some(rows) = rows.and_then(|rows| usize::try_from(rows).ok()) {
            statistics.num_rows = Precision::Inexact(crate::policy::coarse(rows));
        }
        Ok(Arc::new(statistics))
    }
}

/// Keeps, of the dynamic filters each [`RemoteExec`] was handed, those of
/// the hash joins it is on the probe side of. Such a join reads its probe
/// side only once its build side is in and its filter final, so waiting for
/// the filter costs nothing. The other dynamic filters (a sort's with a
/// limit, an aggregate's) become final only once the source's rows are
/// read: they are dropped, and their operators go without.
#[derive(Debug, Default)]
pub(crate) struct RemoteJoinKeys;

impl PhysicalOptimizerRule for RemoteJoinKeys {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        probed_join_keys(plan, &HashSet::new())
    }

    fn name(&self) -> &str {
        "remote_join_keys"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// `node` with each [`RemoteExec`] below it keeping the filters of the
/// hash joins whose probe side it is on: those above `node` named in
/// `probing`, and those of the joins below.
fn probed_join_keys(
    node: Arc<dyn ExecutionPlan>,
    probing: &HashSet<u64>,
) -> Result<Arc<dyn ExecutionPlan>> {
    if let Some(remote) = node.downcast_ref::<RemoteExec>() {
        let kept: Vec<Arc<dyn PhysicalExpr>> = remote
            .join_filters
            .iter()
            .filter(|filter| {
                filter
                    .expression_id()
                    .is_some_and(|id| probing.contains(&id))
            })
            .cloned()
            .collect();
        return Ok(if kept.len() == remote.join_filters.len() {
            node
        } else {
            Arc::new(remote.with_join_filters(kept))
        });
    }
    let children: Vec<Arc<dyn ExecutionPlan>> = node.children().into_iter().cloned().collect();
    if children.is_empty() {
        return Ok(node);
    }
    let join = node.downcast_ref::<HashJoinExec>().is_some();
    let mut with_own = probing.clone();
    if join {
        with_own.extend(
            node.dynamic_expressions_produced()
                .iter()
                .filter_map(|filter| filter.expression_id()),
        );
    }
    let kept = children
        .into_iter()
        .enumerate()
        .map(|(index, child)| {
            // A hash join's probe side is its second input.
            let ids = if join && index == 1 {
                &with_own
            } else {
                probing
            };
            probed_join_keys(child, ids)
        })
        .collect::<Result<Vec<_>>>()?;
    replace_children_if_necessary(node, kept)
}
