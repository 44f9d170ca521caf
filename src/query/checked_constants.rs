//! Integer arithmetic on constants, checked for overflow.
//!
//! The optimizer folds an expression of constants by evaluating it with
//! DataFusion's wrapping kernels: `SELECT 9223372036854775807 + 1` would
//! answer the smallest `BIGINT`, a wrong value given as right, where
//! PostgreSQL, Trino and DuckDB fail the query. The same operations over
//! rows fail on overflow (see `kernels::checked_integer`). This analyzer
//! rule, run after type coercion and so before any folding, folds each
//! integer `+`, `-` and `*` of two constants itself, with checked
//! arithmetic, and each cast of an integer constant to another integer
//! type (so that `CAST(2147483647 AS INT) + CAST(1 AS INT)` is an `INT`
//! sum of constants): an overflow fails the query with the error the rows'
//! kernels give. Whatever does not fold is left to the optimizer as it was.

use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode};
use datafusion::common::{Result, ScalarValue};
use datafusion::logical_expr::expr::{BinaryExpr, Cast};
use datafusion::logical_expr::expr_rewriter::NamePreserver;
use datafusion::logical_expr::{Expr, LogicalPlan, Operator};
use datafusion::optimizer::AnalyzerRule;

/// Folds integer arithmetic on constants with checked arithmetic (see the
/// module's documentation).
#[derive(Debug, Default)]
pub(super) struct CheckedConstants;

impl AnalyzerRule for CheckedConstants {
    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> Result<LogicalPlan> {
        plan.transform_up_with_subqueries(|plan| {
            // An expression folded keeps its name: the plan's schema
            // holds the names of its output columns.
            let names = NamePreserver::new(&plan);
            plan.map_expressions(|expr| {
                let name = names.save(&expr);
                Ok(expr
                    .transform_up(fold)?
                    .update_data(|expr| name.restore(expr)))
            })
        })
        .data()
    }

    fn name(&self) -> &str {
        "checked_constants"
    }
}

/// `expr` folded into a constant, if it is an integer operation on
/// integer constants; an error if that operation overflows.
fn fold(expr: Expr) -> Result<Transformed<Expr>> {
    let folded = match &expr {
        Expr::Cast(Cast { expr, field })
            if field.data_type().is_integer() && field.metadata().is_empty() =>
        {
            // A value out of the type's range is left for the cast to
            // report as it does.
            integer(expr).and_then(|value| value.cast_to(field.data_type()).ok())
        }
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => match (integer(left), integer(right)) {
            (Some(left), Some(right)) if left.data_type() == right.data_type() => match op {
                Operator::Plus => Some(left.add_checked(right)?),
                Operator::Minus => Some(left.sub_checked(right)?),
                Operator::Multiply => Some(left.mul_checked(right)?),
                _ => None,
            },
            _ => None,
        },
        _ => None,
    };
    Ok(match folded {
        Some(value) => Transformed::yes(Expr::Literal(value, None)),
        None => Transformed::no(expr),
    })
}

/// The value of `expr` if it is an integer constant with no metadata.
fn integer(expr: &Expr) -> Option<&ScalarValue> {
    match expr {
        Expr::Literal(value, None) if value.data_type().is_integer() => Some(value),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Int64Array, RecordBatch};
    use datafusion::physical_optimizer::optimizer::PhysicalOptimizer;
    use datafusion::prelude::SessionContext;

    use super::*;
    use crate::query::testing::{
        answer, assert_answers_alike, assert_fails_where_it_wrapped, session_over,
    };

    /// A session over table `t` (one BIGINT column `x`: 1, 2, 3), with
    /// the rule or without.
    fn session(checked: bool) -> SessionContext {
        let x: ArrayRef = Arc::new(Int64Array::from(vec![1, 2, 3]));
        let table = RecordBatch::try_from_iter([("x", x)]).expect("batch");
        let ctx = session_over(PhysicalOptimizer::new().rules, &table);
        if checked {
            ctx.add_analyzer_rule(Arc::new(CheckedConstants));
        }
        ctx
    }

    #[tokio::test]
    async fn constant_integer_arithmetic_that_overflows_fails_rather_than_wrapping() {
        let wrapping = session(false);
        let checked = session(true);
        for sql in [
            "SELECT 9223372036854775807 + 1",
            "SELECT -9223372036854775807 - 2",
            "SELECT 4611686018427387904 * 2",
            "SELECT CAST(2147483647 AS INT) + CAST(1 AS INT)",
            "SELECT CAST(-128 AS TINYINT) * CAST(-1 AS TINYINT)",
            // Nested, in a filter, in a subquery, beside a column.
            "SELECT (9223372036854775807 - 1) + 2",
            "SELECT x FROM t WHERE x < 9223372036854775807 + 1",
            "SELECT x FROM t WHERE x IN (SELECT 9223372036854775807 * 3)",
            "SELECT x + (9223372036854775807 + 1) FROM t",
        ] {
            // DataFusion folds them with wrapping kernels.
            assert_fails_where_it_wrapped(&wrapping, &checked, sql, "Overflow").await;
        }
        for sql in [
            "SELECT 9223372036854775806 + 1, -9223372036854775807 - 1, 3037000499 * 3037000499",
            "SELECT CAST(2147483646 AS INT) + CAST(1 AS INT), CAST(-64 AS TINYINT) * CAST(2 AS TINYINT)",
            "SELECT x * (2 + 3) - 1 FROM t WHERE x > 1 - 1 ORDER BY x",
            "SELECT CAST(NULL AS BIGINT) + 1, 1.5 + 2, 7 / 2, 7 % 2",
        ] {
            assert_answers_alike(&wrapping, &checked, sql).await;
        }
        // A cast out of the type's range fails as it did.
        let sql = "SELECT CAST(3000000000 AS INT) + CAST(1 AS INT)";
        let expected = answer(&wrapping, sql).await.expect_err(sql).to_string();
        let error = answer(&checked, sql).await.expect_err(sql).to_string();
        assert!(error.contains("3000000000"), "{error}");
        assert!(expected.contains("3000000000"), "{expected}");
    }
}
