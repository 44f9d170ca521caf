//! Kernels swapped into the expressions of physical plans: faster ones for
//! what DataFusion evaluates slowly, decimal arithmetic on values that fit
//! in 64 bits ([`decimal`]) and conjunctions of conditions that pass few
//! rows ([`conjunction`]), each answering the same; and checked ones for
//! integer arithmetic and negation ([`negation`]), which DataFusion wraps
//! around on overflow. Each displays as the expression it replaces.

mod conjunction;
mod decimal;
mod negation;

use std::sync::Arc;

use arrow::datatypes::Schema;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::config::ConfigOptions;
use datafusion::error::Result;
use datafusion::logical_expr::Operator;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::BinaryExpr;
use datafusion::physical_expr::{LexOrdering, PhysicalSortExpr};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateInputMode, PhysicalGroupBy};
use datafusion::physical_plan::filter::{FilterExec, FilterExecBuilder};
use datafusion::physical_plan::joins::utils::JoinFilter;
use datafusion::physical_plan::joins::{
    HashJoinExec, NestedLoopJoinExec, NestedLoopJoinExecBuilder,
};
use datafusion::physical_plan::projection::{ProjectionExec, ProjectionExpr};
use datafusion::physical_plan::sorts::sort::SortExec;

use conjunction::conjunction_of;
use decimal::narrow_decimal;
use negation::checked_negative;

/// A rule that swaps kernels into the expressions of a plan's operators.
#[derive(Debug, Clone, Copy)]
pub(super) struct ExpressionKernels {
    name: &'static str,
    swap: Swap,
    /// Whether sort keys, grouping expressions and join conditions are
    /// rewritten too.
    sorts_groups_and_joins: bool,
}

/// An expression with another kernel, or `None` to leave it be.
type Swap = fn(&Arc<dyn PhysicalExpr>, &Schema) -> Option<Arc<dyn PhysicalExpr>>;

impl ExpressionKernels {
    /// Swaps faster kernels into the expressions that projections, filters
    /// and the first stage of aggregates evaluate: [`NarrowDecimal`](decimal::NarrowDecimal) for
    /// decimal `+`, `-` and `*`, and [`Conjunction`](conjunction::Conjunction) for `AND`s. Runs
    /// after the other rules: it changes how values are computed, not the
    /// plan.
    pub(super) const FASTER: ExpressionKernels = ExpressionKernels {
        name: "expression_kernels",
        swap: faster_kernel,
        // A sort, aggregate or join made anew after the other rules would
        // lose the dynamic filters they pushed into the scans for it.
        sorts_groups_and_joins: false,
    };

    /// Swaps checked kernels into the integer `+`, `-`, `*` and negations
    /// that projections, filters, sorts, joins (keys and conditions) and
    /// the first stage of aggregates (grouping and arguments) evaluate.
    /// Runs first, on the plan as planned: later rules move projections
    /// into the scans below them, where they are out of reach, and keep
    /// the kernels of the expressions they move.
    pub(super) const CHECKED: ExpressionKernels = ExpressionKernels {
        name: "checked_integers",
        swap: checked_kernel,
        sorts_groups_and_joins: true,
    };
}

impl PhysicalOptimizerRule for ExpressionKernels {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        rewrite_plan(plan, *self)
    }

    fn name(&self) -> &str {
        self.name
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// `plan` with the kernels of `kernels` in its operators' expressions.
fn rewrite_plan(
    plan: Arc<dyn ExecutionPlan>,
    kernels: ExpressionKernels,
) -> Result<Arc<dyn ExecutionPlan>> {
    plan.transform_up(|node| {
        rewrite_node(&node, kernels).map(|rewritten| match rewritten {
            Some(rewritten) => Transformed::yes(rewritten),
            None => Transformed::no(node),
        })
    })
    .map(|transformed| transformed.data)
}

/// `node` with the kernels of `kernels` in its expressions, or `None` when
/// none applies (or it is not an operator whose expressions are rewritten).
fn rewrite_node(
    node: &Arc<dyn ExecutionPlan>,
    kernels: ExpressionKernels,
) -> Result<Option<Arc<dyn ExecutionPlan>>> {
    if let Some(projection) = node.downcast_ref::<ProjectionExec>() {
        let Some(exprs) = rewrite_each(
            projection.expr(),
            &projection.input().schema(),
            kernels,
            |projected| &projected.expr,
            |projected, expr| ProjectionExpr::new(expr, projected.alias.clone()),
        )?
        else {
            return Ok(None);
        };
        let rewritten = ProjectionExec::try_new(exprs, Arc::clone(projection.input()))?;
        return Ok(Some(Arc::new(rewritten)));
    }
    if let Some(filter) = node.downcast_ref::<FilterExec>() {
        let predicate = rewrite_expr(filter.predicate(), &filter.input().schema(), kernels)?;
        if !predicate.transformed {
            return Ok(None);
        }
        let rewritten = FilterExecBuilder::from(filter)
            .with_predicate(predicate.data)
            .build()?;
        return Ok(Some(Arc::new(rewritten)));
    }
    if let Some(aggregate) = node.downcast_ref::<AggregateExec>() {
        return rewrite_aggregate(aggregate, kernels);
    }
    if !kernels.sorts_groups_and_joins {
        return Ok(None);
    }
    if let Some(sort) = node.downcast_ref::<SortExec>() {
        return rewrite_sort(sort, kernels);
    }
    if let Some(join) = node.downcast_ref::<HashJoinExec>() {
        return rewrite_hash_join(join, kernels);
    }
    if let Some(join) = node.downcast_ref::<NestedLoopJoinExec>() {
        let Some(filter) = rewrite_join_filter(join.filter(), kernels)? else {
            return Ok(None);
        };
        let rewritten = NestedLoopJoinExecBuilder::from(join)
            .with_filter(Some(filter))
            .build()?;
        return Ok(Some(Arc::new(rewritten)));
    }
    Ok(None)
}

/// `join` with the kernels of `kernels` in its keys and its filter, or `None`
/// when none applies.
fn rewrite_hash_join(
    join: &HashJoinExec,
    kernels: ExpressionKernels,
) -> Result<Option<Arc<dyn ExecutionPlan>>> {
    let (left, right) = (join.left().schema(), join.right().schema());
    let mut changed = false;
    let on = join
        .on()
        .iter()
        .map(|(left_key, right_key)| {
            let left_key = rewrite_expr(left_key, &left, kernels)?;
            let right_key = rewrite_expr(right_key, &right, kernels)?;
            changed |= left_key.transformed || right_key.transformed;
            Ok((left_key.data, right_key.data))
        })
        .collect::<Result<Vec<_>>>()?;
    let filter = rewrite_join_filter(join.filter(), kernels)?;
    if !changed && filter.is_none() {
        return Ok(None);
    }
    let mut builder = join.builder().with_on(on);
    if let Some(filter) = filter {
        builder = builder.with_filter(Some(filter));
    }
    builder.build_exec().map(Some)
}

/// `filter` with the kernels of `kernels` in its condition, or `None` when
/// none applies (or there is no filter).
fn rewrite_join_filter(
    filter: Option<&JoinFilter>,
    kernels: ExpressionKernels,
) -> Result<Option<JoinFilter>> {
    let Some(filter) = filter else {
        return Ok(None);
    };
    let condition = rewrite_expr(filter.expression(), filter.schema(), kernels)?;
    Ok(condition.transformed.then(|| {
        JoinFilter::new(
            condition.data,
            filter.column_indices().to_vec(),
            Arc::clone(filter.schema()),
        )
    }))
}

/// `sort` with the kernels of `kernels` in its keys, or `None` when none
/// applies.
fn rewrite_sort(
    sort: &SortExec,
    kernels: ExpressionKernels,
) -> Result<Option<Arc<dyn ExecutionPlan>>> {
    let keys = rewrite_each(
        sort.expr(),
        &sort.input().schema(),
        kernels,
        |key| &key.expr,
        |key, expr| PhysicalSortExpr::new(expr, key.options),
    )?;
    let Some(keys) = keys.and_then(LexOrdering::new) else {
        return Ok(None);
    };
    let rewritten = SortExec::new(keys, Arc::clone(sort.input()))
        .with_preserve_partitioning(sort.preserve_partitioning())
        .with_fetch(sort.fetch());
    Ok(Some(Arc::new(rewritten)))
}

/// `aggregate` with faster kernels in its functions' arguments, or `None`
/// when none applies. Only a first stage evaluates its arguments on rows;
/// the later ones merge states.
fn rewrite_aggregate(
    aggregate: &AggregateExec,
    kernels: ExpressionKernels,
) -> Result<Option<Arc<dyn ExecutionPlan>>> {
    if aggregate.mode().input_mode() != AggregateInputMode::Raw {
        return Ok(None);
    }
    let schema = aggregate.input().schema();
    let grouped = if kernels.sorts_groups_and_joins {
        rewrite_group_by(aggregate, &schema, kernels)?
    } else {
        None
    };
    let aggregate = grouped.as_ref().unwrap_or(aggregate);
    let mut changed = grouped.is_some();
    let mut functions = Vec::with_capacity(aggregate.aggr_expr().len());
    for function in aggregate.aggr_expr() {
        let expressions = function.all_expressions();
        let mut args = Vec::with_capacity(expressions.args.len());
        let mut rewritten = false;
        for arg in &expressions.args {
            let arg = rewrite_expr(arg, &schema, kernels)?;
            rewritten |= arg.transformed;
            args.push(arg.data);
        }
        let rewritten = rewritten
            .then(|| function.with_new_expressions(args, expressions.order_by_exprs))
            .flatten();
        match rewritten {
            Some(rewritten) => {
                changed = true;
                functions.push(Arc::new(rewritten));
            }
            None => functions.push(Arc::clone(function)),
        }
    }
    Ok(changed
        .then(|| Arc::new(aggregate.with_new_aggr_exprs(functions)) as Arc<dyn ExecutionPlan>))
}

/// `aggregate` (a first stage) with the kernels of `kernels` in its grouping
/// expressions, or `None` when none applies.
fn rewrite_group_by(
    aggregate: &AggregateExec,
    schema: &Schema,
    kernels: ExpressionKernels,
) -> Result<Option<AggregateExec>> {
    let group_by = aggregate.group_expr();
    let Some(exprs) = rewrite_each(
        group_by.expr(),
        schema,
        kernels,
        |(expr, _)| expr,
        |(_, name), expr| (expr, name.clone()),
    )?
    else {
        return Ok(None);
    };
    let group_by = PhysicalGroupBy::new(
        exprs,
        group_by.null_expr().to_vec(),
        group_by.groups().to_vec(),
        group_by.has_grouping_set(),
    );
    let rewritten = AggregateExec::try_new(
        *aggregate.mode(),
        group_by,
        aggregate.aggr_expr().to_vec(),
        aggregate.filter_expr().to_vec(),
        Arc::clone(aggregate.input()),
        aggregate.input_schema(),
    )?
    .with_limit_options(aggregate.limit_options());
    Ok(Some(rewritten))
}

/// Each of `items` remade (by `remake`) with the kernels of `kernels` in
/// its expression (`expr`), or `None` when none applies to any.
fn rewrite_each<T, U>(
    items: &[T],
    schema: &Schema,
    kernels: ExpressionKernels,
    expr: impl Fn(&T) -> &Arc<dyn PhysicalExpr>,
    remake: impl Fn(&T, Arc<dyn PhysicalExpr>) -> U,
) -> Result<Option<Vec<U>>> {
    let mut changed = false;
    let remade = items
        .iter()
        .map(|item| {
            let rewritten = rewrite_expr(expr(item), schema, kernels)?;
            changed |= rewritten.transformed;
            Ok(remake(item, rewritten.data))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(changed.then_some(remade))
}

/// `expr` with the kernels of `kernels` in it.
fn rewrite_expr(
    expr: &Arc<dyn PhysicalExpr>,
    schema: &Schema,
    kernels: ExpressionKernels,
) -> Result<Transformed<Arc<dyn PhysicalExpr>>> {
    Arc::clone(expr).transform_down(|expr| {
        Ok(match (kernels.swap)(&expr, schema) {
            Some(swapped) => Transformed::yes(swapped),
            None => Transformed::no(expr),
        })
    })
}

/// `expr` as a conjunction, if it is an `AND` of conditions, or as a
/// narrow decimal operation, if it is a decimal `+`, `-` or `*`.
fn faster_kernel(expr: &Arc<dyn PhysicalExpr>, schema: &Schema) -> Option<Arc<dyn PhysicalExpr>> {
    if let Some(conjunction) = conjunction_of(expr, schema) {
        return Some(Arc::new(conjunction));
    }
    let binary = expr.downcast_ref::<BinaryExpr>()?;
    narrow_decimal(binary, schema).map(|narrowed| Arc::new(narrowed) as Arc<dyn PhysicalExpr>)
}

/// `expr` failing on overflow, if it is an integer `+`, `-`, `*` or
/// negation that does not already.
fn checked_kernel(expr: &Arc<dyn PhysicalExpr>, schema: &Schema) -> Option<Arc<dyn PhysicalExpr>> {
    if let Some(negation) = checked_negative(expr, schema) {
        return Some(Arc::new(negation));
    }
    let binary = expr.downcast_ref::<BinaryExpr>()?;
    checked_integer(binary, schema).map(|checked| Arc::new(checked) as Arc<dyn PhysicalExpr>)
}

/// `binary` failing on overflow, if it is an integer `+`, `-` or `*` (as
/// `schema` types its operands) that does not already. DataFusion computes
/// these with wrapping kernels: the largest BIGINT plus one would answer
/// the smallest, a wrong value given as right, where PostgreSQL, Trino and
/// DuckDB fail the query. Displays as before.
fn checked_integer(binary: &BinaryExpr, schema: &Schema) -> Option<BinaryExpr> {
    if !matches!(
        binary.op(),
        Operator::Plus | Operator::Minus | Operator::Multiply
    ) {
        return None;
    }
    let integer = |side: &Arc<dyn PhysicalExpr>| {
        side.data_type(schema)
            .is_ok_and(|data_type| data_type.is_integer())
    };
    if !integer(binary.left()) || !integer(binary.right()) {
        return None;
    }
    let checked = BinaryExpr::new(
        Arc::clone(binary.left()),
        *binary.op(),
        Arc::clone(binary.right()),
    )
    .with_fail_on_overflow(true);
    // (Equal when it fails on overflow already.)
    (checked != *binary).then_some(checked)
}

#[cfg(test)]
mod tests {
    use arrow::array::{ArrayRef, Decimal128Array, Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field};
    use datafusion::common::tree_node::TreeNodeRecursion;
    use datafusion::physical_optimizer::optimizer::PhysicalOptimizer;

    use super::conjunction::Conjunction;
    use super::decimal::NarrowDecimal;
    use super::*;
    use crate::query::session::physical_optimizer_rules;
    use crate::query::testing::{
        answer, assert_answers_alike, assert_fails_where_it_wrapped, plan_and_run, session_over,
        session_with_rules,
    };

    /// How many expressions of the kernels `plan` evaluates: narrow decimal
    /// operations and conjunctions.
    fn kernels_in(plan: &Arc<dyn ExecutionPlan>) -> (usize, usize) {
        let (mut narrowed, mut conjunctions) = (0, 0);
        plan.apply(|node| {
            let mut exprs: Vec<Arc<dyn PhysicalExpr>> = Vec::new();
            if let Some(projection) = node.downcast_ref::<ProjectionExec>() {
                exprs.extend(projection.expr().iter().map(|p| Arc::clone(&p.expr)));
            }
            if let Some(filter) = node.downcast_ref::<FilterExec>() {
                exprs.push(Arc::clone(filter.predicate()));
            }
            if let Some(aggregate) = node.downcast_ref::<AggregateExec>() {
                exprs.extend(aggregate.aggr_expr().iter().flat_map(|f| f.expressions()));
            }
            for expr in exprs {
                expr.apply(|e| {
                    narrowed += usize::from(e.downcast_ref::<NarrowDecimal>().is_some());
                    conjunctions += usize::from(e.downcast_ref::<Conjunction>().is_some());
                    Ok(TreeNodeRecursion::Continue)
                })?;
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .expect("walk");
        (narrowed, conjunctions)
    }

    /// A query's projections, filters and first-stage aggregates get the
    /// kernels from the gateway's rules, and answer as without them.
    #[tokio::test]
    async fn gateway_plans_evaluate_with_the_kernels_and_answer_alike() {
        let rows = 10_000i64;
        let decimals = |values: Vec<i128>| -> ArrayRef {
            Arc::new(
                Decimal128Array::from(values)
                    .with_precision_and_scale(15, 2)
                    .expect("decimal type"),
            )
        };
        let price = decimals(
            (0..rows)
                .map(|i| i128::from(100_000 + i * 7919 % 9_000_000))
                .collect(),
        );
        let rate = decimals((0..rows).map(|i| i128::from(i % 11)).collect());
        let day: ArrayRef = Arc::new(Int64Array::from_iter_values(
            (0..rows).map(|i| i * 31 % 365),
        ));
        let schema = Arc::new(Schema::new(vec![
            Field::new("l", DataType::Decimal128(15, 2), false),
            Field::new("r", DataType::Decimal128(15, 2), false),
            Field::new("d", DataType::Int64, false),
        ]));
        let table = RecordBatch::try_new(schema, vec![price, rate, day]).expect("batch");
        let sql = "SELECT r, sum(l * (1 - r)), sum(l * (1 - r) * (1 + r)), count(*) FROM t \
                   WHERE l * r > 1000 AND d >= 30 AND d < 90 AND r <> 0.05 GROUP BY r ORDER BY r";
        let mut answers = Vec::new();
        for rules in [PhysicalOptimizer::new().rules, physical_optimizer_rules()] {
            let ctx = session_over(rules, &table);
            let (plan, batches) = plan_and_run(&ctx, sql).await;
            let answer = arrow::util::pretty::pretty_format_batches(&batches)
                .expect("format")
                .to_string();
            answers.push((kernels_in(&plan), answer));
        }
        assert_eq!(
            answers[0].0,
            (0, 0),
            "DataFusion's own rules leave the plan alone"
        );
        let (narrowed, conjunctions) = answers[1].0;
        assert!(narrowed >= 4, "{narrowed} narrow operations");
        assert_eq!(conjunctions, 1);
        assert_eq!(answers[0].1, answers[1].1);
        assert_eq!(answers[1].1.lines().count(), 4 + 8, "{}", answers[1].1);
    }

    /// Integer `+`, `-` and `*` fail on overflow in projections, filters
    /// and aggregates' arguments, where DataFusion's own kernels wrap; the
    /// values that fit answer as before.
    #[tokio::test]
    async fn integer_arithmetic_moved_into_a_scan_still_fails_on_overflow() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("t.parquet");
        crate::query::testing::write_int64_columns(&path, &[("x", vec![i64::MAX - 1, 5])], None);
        let session = async |rules| {
            let ctx = session_with_rules(rules);
            ctx.register_parquet("t", path.to_string_lossy(), Default::default())
                .await
                .expect("register");
            ctx
        };
        let wrapping = session(PhysicalOptimizer::new().rules).await;
        let checked = session(physical_optimizer_rules()).await;
        for sql in ["SELECT x + 2 FROM t", "SELECT -(-x - 2) AS y FROM t"] {
            // The projection is evaluated by the scan itself.
            let plan = answer(&checked, &format!("EXPLAIN {sql}"))
                .await
                .expect(sql);
            let scan = plan
                .lines()
                .find(|line| line.contains("DataSourceExec"))
                .unwrap_or_default();
            assert!(scan.contains("x@0") && scan.contains(" as "), "{plan}");
            assert!(!plan.contains("ProjectionExec"), "{plan}");
            assert_fails_where_it_wrapped(&wrapping, &checked, sql, "Overflow").await;
        }
    }

    #[tokio::test]
    async fn integer_arithmetic_that_overflows_fails_rather_than_wrapping() {
        use arrow::array::Int32Array;
        let big: ArrayRef = Arc::new(Int64Array::from(vec![i64::MAX - 1, 5, -7]));
        let small: ArrayRef = Arc::new(Int32Array::from(vec![i32::MAX, 2, -3]));
        let schema = Arc::new(Schema::new(vec![
            Field::new("x", DataType::Int64, false),
            Field::new("i", DataType::Int32, false),
        ]));
        let table = RecordBatch::try_new(schema, vec![big, small]).expect("batch");
        let wrapping = session_over(PhysicalOptimizer::new().rules, &table);
        let checked = session_over(physical_optimizer_rules(), &table);
        let overflowing = [
            "SELECT x + 2 FROM t",
            "SELECT x - -2 FROM t",
            "SELECT x * 2 FROM t",
            "SELECT i + i FROM t",
            "SELECT i * CAST(3 AS INT) FROM t",
            "SELECT count(*) FROM t WHERE x + 10 > 0",
            "SELECT max(x + 2), i FROM t GROUP BY i",
            "SELECT x + 2, count(*) FROM t GROUP BY x + 2",
            "SELECT x FROM t ORDER BY x * 2",
            "SELECT i FROM t ORDER BY i + i LIMIT 1",
            // -x - 2 is the smallest BIGINT for x = i64::MAX - 1: it has
            // no negation.
            "SELECT -(-x - 2) FROM t",
            "SELECT count(*) FROM t WHERE -(-x - 2) < 0",
            "SELECT count(*) FROM t a JOIN t b ON a.x + 2 = b.x",
            "SELECT count(*) FROM t a JOIN t b ON a.x = b.x AND a.x * 2 > b.i",
            "SELECT count(b.i) FROM t a LEFT JOIN t b ON a.x = b.x AND a.x * 2 > b.i",
            "SELECT count(*) FROM t a JOIN t b ON a.x * 2 > b.x",
        ];
        for sql in overflowing {
            assert_fails_where_it_wrapped(&wrapping, &checked, sql, "Overflow").await;
        }
        for sql in [
            "SELECT x + 1, x - 1, i - 1, i * 1 FROM t ORDER BY x",
            "SELECT count(*) FROM t WHERE x * 1 > 0 AND i + 1 > 0",
            "SELECT sum(x * 2), min(i + 1) FROM t WHERE x < 100",
            "SELECT -x, -i, -(-x - 1) FROM t ORDER BY -x",
            "SELECT x - 1, count(*) FROM t GROUP BY x - 1 ORDER BY 1",
            "SELECT x FROM t ORDER BY x + 1 DESC LIMIT 2",
            "SELECT a.x, b.i FROM t a JOIN t b ON a.x - 1 = b.x - 1 AND a.i + 1 > b.i ORDER BY 1",
            "SELECT count(*) FROM t a JOIN t b ON a.i * 2 > b.x",
        ] {
            assert_answers_alike(&wrapping, &checked, sql).await;
        }
    }
}
