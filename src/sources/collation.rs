//! Strings ordered by their bytes in the SQL sent to PostgreSQL.
//!
//! meshgate orders strings by their bytes, as Arrow and DataFusion do. A
//! PostgreSQL column orders them by its collation, in most databases a
//! language's (`en_US.UTF-8`, ICU): there `'_x' < 'a' < 'B'`, here
//! `'B' < '_x' < 'a'`. A sort, a range comparison or a `min` / `max` sent to
//! PostgreSQL would answer otherwise than the same query run here, and an
//! answer would depend on what was pushed down. So the SQL sent writes each
//! string they order with `COLLATE "C"`, PostgreSQL's byte order (as Trino
//! does for PostgreSQL string pushdown). Equality needs none: a
//! deterministic collation tells two strings equal only when their bytes
//! are.
//!
//! The rewrite marks those strings with [`collate_c`], a function never run:
//! the unparser's PostgreSQL dialect writes it as `COLLATE "C"`
//! ([`marker_to_sql`]).

use std::sync::{Arc, LazyLock};

use arrow::datatypes::DataType;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DFSchema, ExprSchema};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::expr::{AggregateFunction, ScalarFunction};
use datafusion::logical_expr::{
    Between, BinaryExpr, ColumnarValue, Expr, ExprSchemable, LogicalPlan, Operator,
    ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, SortExpr, Volatility,
};
use datafusion::sql::unparser::Unparser;
use sqlparser::ast;

const COLLATE_C: &str = "meshgate_collate_c";

/// `string COLLATE "C"`, for the unparser only.
#[derive(Debug, PartialEq, Eq, Hash)]
struct CollateC {
    signature: Signature,
}

impl ScalarUDFImpl for CollateC {
    fn name(&self) -> &str {
        COLLATE_C
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        Ok(arg_types.first().cloned().unwrap_or(DataType::Utf8))
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        Err(DataFusionError::Internal(
            "COLLATE \"C\" is only written into SQL sent to PostgreSQL".into(),
        ))
    }
}

static COLLATE_C_UDF: LazyLock<Arc<ScalarUDF>> = LazyLock::new(|| {
    Arc::new(ScalarUDF::new_from_impl(CollateC {
        signature: Signature::any(1, Volatility::Immutable),
    }))
});

/// `expr` marked to be sent as `expr COLLATE "C"`.
fn collate_c(expr: Expr) -> Expr {
    Expr::ScalarFunction(ScalarFunction::new_udf(
        Arc::clone(&COLLATE_C_UDF),
        vec![expr],
    ))
}

fn is_string(expr: &Expr, schema: &dyn ExprSchema) -> bool {
    matches!(
        expr.get_type(schema),
        Ok(DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
    )
}

/// `expr` in byte order when it is a string.
fn in_byte_order(expr: Expr, schema: &dyn ExprSchema) -> Expr {
    if is_string(&expr, schema) {
        collate_c(expr)
    } else {
        expr
    }
}

/// `expr` with the strings its range comparisons, `BETWEEN`s, `min`s and
/// `max`s order in byte order. A type that cannot be told leaves its
/// expression as it is.
fn byte_order_expr(expr: Expr, schema: &DFSchema) -> Result<Expr> {
    let marked = |e: Expr| in_byte_order(e, schema);
    expr.transform_up(|e| {
        Ok(match e {
            Expr::BinaryExpr(BinaryExpr { left, op, right })
                if matches!(
                    op,
                    Operator::Lt | Operator::LtEq | Operator::Gt | Operator::GtEq
                ) && (is_string(&left, schema) || is_string(&right, schema)) =>
            {
                Transformed::yes(Expr::BinaryExpr(BinaryExpr {
                    left: Box::new(marked(*left)),
                    op,
                    right: Box::new(marked(*right)),
                }))
            }
            Expr::Between(between) if is_string(&between.expr, schema) => {
                let Between {
                    expr,
                    negated,
                    low,
                    high,
                } = between;
                Transformed::yes(Expr::Between(Between {
                    expr: Box::new(marked(*expr)),
                    negated,
                    low: Box::new(marked(*low)),
                    high: Box::new(marked(*high)),
                }))
            }
            Expr::AggregateFunction(AggregateFunction { func, mut params })
                if matches!(func.name(), "min" | "max")
                    && params.args.iter().any(|a| is_string(a, schema)) =>
            {
                params.args = params.args.into_iter().map(marked).collect();
                Transformed::yes(Expr::AggregateFunction(AggregateFunction { func, params }))
            }
            other => Transformed::no(other),
        })
    })
    .map(|t| t.data)
}

/// `expr`, written over the columns of `schema`, as a source of `dialect`
/// is sent it.
pub(crate) fn for_source(
    expr: Expr,
    schema: &arrow::datatypes::Schema,
    dialect: super::Dialect,
) -> Result<Expr> {
    if dialect != super::Dialect::Postgres {
        return Ok(expr);
    }
    byte_order_expr(expr, &DFSchema::try_from(schema.clone())?)
}

/// `plan` as a source of `dialect` is sent it: for PostgreSQL, every sort
/// key, range comparison, `min` and `max` over strings in byte order. Each
/// node's schema is kept: the names of its columns do not change.
pub(crate) fn plan_for_source(plan: LogicalPlan, dialect: super::Dialect) -> Result<LogicalPlan> {
    if dialect != super::Dialect::Postgres {
        return Ok(plan);
    }
    plan.transform_up(|node| {
        let Some(schema) = expression_schema(&node) else {
            return Ok(Transformed::no(node));
        };
        let node = match node {
            LogicalPlan::Sort(mut sort) => {
                sort.expr = sort
                    .expr
                    .into_iter()
                    .map(|key| SortExpr {
                        expr: in_byte_order(key.expr, schema.as_ref()),
                        ..key
                    })
                    .collect();
                LogicalPlan::Sort(sort)
            }
            other => other,
        };
        node.map_expressions(|e| byte_order_expr(e, &schema).map(Transformed::yes))
    })
    .map(|t| t.data)
}

/// The schema a node's expressions are written over: its input's, both
/// sides' for a join (its own schema), the whole table's for a scan's
/// filters.
pub(super) fn expression_schema(node: &LogicalPlan) -> Option<Arc<DFSchema>> {
    match node {
        LogicalPlan::Join(join) => Some(Arc::clone(&join.schema)),
        LogicalPlan::TableScan(scan) => {
            DFSchema::try_from_qualified_schema(scan.table_name.clone(), &scan.source.schema())
                .ok()
                .map(Arc::new)
        }
        other => match other.inputs().as_slice() {
            [input] => Some(Arc::clone(input.schema())),
            _ => None,
        },
    }
}

/// [`collate_c`] as PostgreSQL reads it, `string COLLATE "C"`; `None` for
/// any other function.
pub(super) fn marker_to_sql(
    unparser: &Unparser,
    func_name: &str,
    args: &[Expr],
) -> Result<Option<ast::Expr>> {
    if func_name != COLLATE_C {
        return Ok(None);
    }
    let [arg] = args else {
        return Err(DataFusionError::Internal(format!(
            "{COLLATE_C} takes one argument"
        )));
    };
    // A literal is text already. Anything else is cast: a column read
    // as a string may be a `uuid` or `jsonb`, which take no collation,
    // and whose text is what meshgate orders.
    let sql = match unparser.expr_to_sql(arg)? {
        literal @ ast::Expr::Value(_) => literal,
        other => ast::Expr::Cast {
            kind: ast::CastKind::Cast,
            expr: Box::new(other),
            data_type: ast::DataType::Text,
            array: false,
            format: None,
        },
    };
    Ok(Some(ast::Expr::Collate {
        expr: Box::new(sql),
        collation: ast::ObjectName::from(vec![ast::Ident::with_quote('"', "C")]),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{Field, Schema};
    use datafusion::functions_aggregate::expr_fn::max;
    use datafusion::logical_expr::{col, lit};

    fn schema() -> DFSchema {
        DFSchema::try_from(Schema::new(vec![
            Field::new("name", DataType::Utf8, true),
            Field::new("id", DataType::Int64, true),
        ]))
        .unwrap()
    }

    fn sent(expr: Expr) -> String {
        let expr = byte_order_expr(expr, &schema()).unwrap();
        Unparser::new(super::super::Dialect::Postgres.unparser_dialect())
            .expr_to_sql(&expr)
            .unwrap()
            .to_string()
    }

    #[test]
    fn string_orderings_are_sent_in_byte_order_and_the_rest_as_written() {
        assert_eq!(
            sent(col("name").lt(lit("b"))),
            r#"(CAST("name" AS TEXT) COLLATE "C" < 'b' COLLATE "C")"#
        );
        assert_eq!(
            sent(col("name").between(lit("a"), lit("m"))),
            r#"(CAST("name" AS TEXT) COLLATE "C" BETWEEN 'a' COLLATE "C" AND 'm' COLLATE "C")"#
        );
        assert_eq!(
            sent(max(col("name"))),
            r#"max(CAST("name" AS TEXT) COLLATE "C")"#
        );
        assert_eq!(sent(col("name").eq(lit("b"))), r#"("name" = 'b')"#);
        assert_eq!(sent(col("id").lt(lit(3))), r#"("id" < 3)"#);
        assert_eq!(sent(max(col("id"))), r#"max("id")"#);
    }
}
