//! Integer arithmetic in window functions, computed below the window.
//!
//! DataFusion evaluates a window function's arguments and its `PARTITION
//! BY` and `ORDER BY` expressions inside the window operator, where the
//! checked kernels (see `kernels`) do not reach: `sum(x + 2) OVER ()` with
//! `x` near the largest `BIGINT` would answer a wrapped, negative sum. This
//! rule computes each such expression that holds integer arithmetic in a
//! projection below the window, where it is checked as any other
//! projection's, and hands the window the projected column. The window's
//! output keeps its columns and their names.

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, DFSchema, Result};
use datafusion::logical_expr::expr::{Sort, WindowFunction};
use datafusion::logical_expr::{Expr, ExprSchemable, LogicalPlan, Operator, Projection, Window};
use datafusion::optimizer::{ApplyOrder, OptimizerConfig, OptimizerRule};

#[derive(Debug)]
pub(super) struct WindowArithmeticBelow;

impl OptimizerRule for WindowArithmeticBelow {
    fn name(&self) -> &str {
        "window_arithmetic_below"
    }

    fn apply_order(&self) -> Option<ApplyOrder> {
        Some(ApplyOrder::BottomUp)
    }

    fn supports_rewrite(&self) -> bool {
        true
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> Result<Transformed<LogicalPlan>> {
        let LogicalPlan::Window(window) = plan else {
            return Ok(Transformed::no(plan));
        };
        let input = window.input.schema();
        let mut below = Below {
            input,
            moved: Vec::new(),
        };
        let mut window_expr = Vec::with_capacity(window.window_expr.len());
        for (index, expr) in window.window_expr.iter().enumerate() {
            let Expr::WindowFunction(function) = unaliased(expr) else {
                window_expr.push(expr.clone());
                continue;
            };
            let moved_before = below.moved.len();
            let rewritten = below.window_function(function)?;
            if below.moved.len() == moved_before {
                window_expr.push(expr.clone());
                continue;
            }
            // Under the name the window's output gave it.
            let (qualifier, field) = window.schema.qualified_field(input.fields().len() + index);
            window_expr.push(
                Expr::WindowFunction(Box::new(rewritten))
                    .alias_qualified(qualifier.cloned(), field.name()),
            );
        }
        if below.moved.is_empty() {
            return Ok(Transformed::no(LogicalPlan::Window(window)));
        }
        let mut projected: Vec<Expr> = input.columns().into_iter().map(Expr::Column).collect();
        projected.append(&mut below.moved);
        let projection = Projection::try_new(projected, Arc::clone(&window.input))?;
        let moved = Window::try_new(window_expr, Arc::new(LogicalPlan::Projection(projection)))?;
        // The window's own columns, without those computed for it.
        let kept = window
            .schema
            .columns()
            .into_iter()
            .map(Expr::Column)
            .collect();
        let restored = Projection::try_new(kept, Arc::new(LogicalPlan::Window(moved)))?;
        Ok(Transformed::yes(LogicalPlan::Projection(restored)))
    }
}

/// `expr` without the aliases around it.
fn unaliased(expr: &Expr) -> &Expr {
    match expr {
        Expr::Alias(alias) => unaliased(&alias.expr),
        other => other,
    }
}

/// The expressions moved below one window, and the schema they read.
struct Below<'a> {
    input: &'a DFSchema,
    moved: Vec<Expr>,
}

impl Below<'_> {
    /// `function` with each of its arguments, partitioning and ordering
    /// expressions that holds integer arithmetic moved below.
    fn window_function(&mut self, function: &WindowFunction) -> Result<WindowFunction> {
        let mut function = function.clone();
        let params = &mut function.params;
        params.args = std::mem::take(&mut params.args)
            .into_iter()
            .map(|arg| self.moved_if_arithmetic(arg))
            .collect::<Result<_>>()?;
        params.partition_by = std::mem::take(&mut params.partition_by)
            .into_iter()
            .map(|expr| self.moved_if_arithmetic(expr))
            .collect::<Result<_>>()?;
        params.order_by = std::mem::take(&mut params.order_by)
            .into_iter()
            .map(|sort| {
                Ok(Sort {
                    expr: self.moved_if_arithmetic(sort.expr)?,
                    ..sort
                })
            })
            .collect::<Result<_>>()?;
        Ok(function)
    }

    /// `expr`, or a column computed below as `expr`, if it holds integer
    /// arithmetic.
    fn moved_if_arithmetic(&mut self, expr: Expr) -> Result<Expr> {
        if !self.holds_integer_arithmetic(&expr)? {
            return Ok(expr);
        }
        let mut index = self.moved.len();
        let name = loop {
            let name = format!("__window_input_{index}");
            if !self.input.has_column_with_unqualified_name(&name) {
                break name;
            }
            index += 1;
        };
        self.moved.push(expr.alias(&name));
        Ok(Expr::Column(Column::new_unqualified(name)))
    }

    /// Whether `expr` adds, subtracts, multiplies or negates integers
    /// (and reads only the window's input, not an outer query's).
    fn holds_integer_arithmetic(&self, expr: &Expr) -> Result<bool> {
        if expr.exists(|e| Ok(matches!(e, Expr::OuterReferenceColumn(..))))? {
            return Ok(false);
        }
        let integer = |e: &Expr| e.get_type(self.input).is_ok_and(|t| t.is_integer());
        expr.exists(|e| {
            Ok(match e {
                Expr::BinaryExpr(binary) => {
                    matches!(
                        binary.op,
                        Operator::Plus | Operator::Minus | Operator::Multiply
                    ) && integer(e)
                }
                Expr::Negative(_) => integer(e),
                _ => false,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Int32Array, Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::prelude::SessionContext;

    use crate::query::testing::{
        answer, assert_answers_alike, assert_fails_where_it_wrapped, gateway_session,
    };

    /// `t` (`x BIGINT`, `i INT`, `g INT`) in meshgate's session and in
    /// DataFusion's own.
    fn sessions() -> (SessionContext, SessionContext) {
        let x: ArrayRef = Arc::new(Int64Array::from(vec![i64::MAX - 1, 5, -7, 3]));
        let i: ArrayRef = Arc::new(Int32Array::from(vec![i32::MAX, 2, -3, 4]));
        let g: ArrayRef = Arc::new(Int32Array::from(vec![1, 1, 2, 2]));
        let schema = Arc::new(Schema::new(vec![
            Field::new("x", DataType::Int64, false),
            Field::new("i", DataType::Int32, false),
            Field::new("g", DataType::Int32, false),
        ]));
        let table = RecordBatch::try_new(schema, vec![x, i, g]).expect("batch");
        let register = |ctx: &SessionContext| {
            let t = datafusion::datasource::MemTable::try_new(
                table.schema(),
                vec![vec![table.clone()]],
            )
            .expect("table");
            ctx.register_table("t", Arc::new(t)).expect("register");
        };
        let checked = gateway_session();
        register(&checked);
        let wrapping = SessionContext::new();
        register(&wrapping);
        (wrapping, checked)
    }

    #[tokio::test]
    async fn integer_arithmetic_in_window_functions_fails_rather_than_wrapping() {
        let (wrapping, checked) = sessions();
        for sql in [
            "SELECT sum(x + 2) OVER () FROM t",
            "SELECT sum(x + 2) OVER (ORDER BY i) FROM t",
            "SELECT sum(x + 2) OVER (ORDER BY i ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) FROM t",
            "SELECT lag(x + 2) OVER (ORDER BY i) FROM t",
            "SELECT first_value(x * 2) OVER (ORDER BY i) FROM t",
            "SELECT max(i + i) OVER (PARTITION BY g) FROM t",
            "SELECT row_number() OVER (PARTITION BY x + 2) FROM t",
            "SELECT rank() OVER (ORDER BY x * 2) FROM t",
            "SELECT rank() OVER (ORDER BY -(-x - 2)) FROM t",
            "SELECT y FROM (SELECT min(x - -2) OVER (PARTITION BY g ORDER BY i) AS y FROM t) WHERE y > 0",
        ] {
            assert_fails_where_it_wrapped(&wrapping, &checked, sql, "Overflow").await;
        }
    }

    #[tokio::test]
    async fn window_functions_over_arithmetic_that_fits_answer_as_before() {
        let (wrapping, checked) = sessions();
        for sql in [
            "SELECT x, sum(x - 1) OVER (ORDER BY i) FROM t ORDER BY x",
            "SELECT x, lag(i * 2, 1) OVER (PARTITION BY g ORDER BY x), \
             lead(x + 0) OVER (ORDER BY x) AS n FROM t ORDER BY x",
            "SELECT g, rank() OVER (PARTITION BY g + 1 ORDER BY x - 1 DESC) AS r, \
             sum(g * 2) OVER (PARTITION BY g + 1) FROM t ORDER BY g, r",
            "SELECT sum(x - 1) OVER (ORDER BY i), avg(x - 1) OVER (ORDER BY i) FROM t ORDER BY 1",
            "SELECT g, sum(sum(x - 1) + 1) OVER (ORDER BY g) FROM t WHERE x < 100 GROUP BY g ORDER BY g",
        ] {
            assert_answers_alike(&wrapping, &checked, sql).await;
        }
        // The window's columns keep their names.
        let named = answer(
            &checked,
            "SELECT lag(x + 2) OVER (ORDER BY x) FROM t WHERE x < 10",
        )
        .await
        .expect("answer");
        assert!(
            named.contains("lag(t.x + Int64(2)) ORDER BY [t.x ASC NULLS LAST]"),
            "{named}"
        );
    }
}
