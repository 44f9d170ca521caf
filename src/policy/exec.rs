//! The policy barrier: one physical operator that applies a product's row
//! filter and masks to the raw rows of its input (the row filter only when
//! the filter right below does not already hold it). It accepts no limit or
//! projection from above, and no filter but the dynamic filters DataFusion
//! derives from visible rows (see `gather_filters_for_pushdown`), and is
//! shown in EXPLAIN as a leaf, so nothing the caller writes runs on, or
//! reports about, rows it hides.
//!
//! Its statistics are a row-count estimate for join planning and nothing
//! else: never exact (no answer is computed from them: the aggregate
//! statistics rule uses exact ones only), rounded to the nearest power of two, and
//! with no column statistics but a coarse size and a coarse distinct count
//! (no minimum, maximum or null count).

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, RecordBatchOptions};
use arrow::compute::{filter_record_batch, prep_null_mask_filter};
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::stats::Precision;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{ColumnStatistics, Statistics};
use datafusion::config::ConfigOptions;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::interval_arithmetic::Interval;
use datafusion::physical_expr::expressions::{Column as ColumnExpr, DynamicFilterPhysicalExpr};
use datafusion::physical_expr::utils::split_conjunction;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::filter_pushdown::{
    ChildFilterDescription, ChildPushdownResult, FilterDescription, FilterPushdownPhase,
    FilterPushdownPropagation,
};
use datafusion::physical_plan::metrics::{BaselineMetrics, ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::statistics::{ChildStats, StatisticsArgs};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, PlanProperties,
};
use futures::StreamExt;

/// Applies a row filter, then computes the caller's columns.
#[derive(Debug)]
pub struct PolicyExec {
    product: String,
    input: Arc<dyn ExecutionPlan>,
    row_filter: Option<Arc<dyn PhysicalExpr>>,
    /// One expression per output column, over the input's columns.
    columns: Vec<Arc<dyn PhysicalExpr>>,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl PolicyExec {
    pub fn new(
        product: String,
        input: Arc<dyn ExecutionPlan>,
        row_filter: Option<Arc<dyn PhysicalExpr>>,
        columns: Vec<Arc<dyn PhysicalExpr>>,
        schema: SchemaRef,
    ) -> Self {
        let properties = PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            input.output_partitioning().clone(),
            input.pipeline_behavior(),
            input.boundedness(),
        );
        Self {
            product,
            input,
            row_filter,
            columns,
            schema,
            properties: Arc::new(properties),
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }

    /// The product this barrier protects.
    pub fn product(&self) -> &str {
        &self.product
    }
}

impl DisplayAs for PolicyExec {
    fn fmt_as(&self, _format: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The policy's expressions are not shown: they may hold other
        // callers' conditions or values the caller must not see.
        write!(f, "PolicyExec: product={}", self.product)
    }
}

impl ExecutionPlan for PolicyExec {
    fn name(&self) -> &str {
        "PolicyExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        datafusion::physical_plan::execution_plan::apply_expression_roots(
            self.row_filter.iter().chain(self.columns.iter()),
            f,
        )
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return Err(DataFusionError::Internal(
                "PolicyExec takes exactly one input".into(),
            ));
        }
        Ok(Arc::new(Self::new(
            self.product.clone(),
            children.swap_remove(0),
            self.row_filter.clone(),
            self.columns.clone(),
            Arc::clone(&self.schema),
        )))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        // When the filter below holds each conjunct of the row filter, every
        // row it lets through satisfies the row filter (a filter keeps only
        // the rows its whole predicate is true for): evaluating it again
        // would hide nothing more. The check reads the plan as it runs, after
        // every optimizer rule, so a filter taken away or changed by one
        // leaves the barrier applying the row filter itself.
        let row_filter = self
            .row_filter
            .clone()
            .filter(|row_filter| !filter_below_holds(&self.input, row_filter));
        let input = self.input.execute(partition, context)?;
        let columns = self.columns.clone();
        let schema = Arc::clone(&self.schema);
        let metrics = BaselineMetrics::new(&self.metrics, partition);
        let output = Arc::clone(&schema);
        let stream = input.filter_map(move |batch| {
            let result = batch.and_then(|batch| {
                let timer = metrics.elapsed_compute().timer();
                let result = apply(&batch, row_filter.as_ref(), &columns, &output);
                timer.done();
                result
            });
            let keep = match &result {
                Ok(batch) => {
                    metrics.record_output(batch.num_rows());
                    batch.num_rows() > 0
                }
                Err(_) => true,
            };
            futures::future::ready(keep.then_some(result))
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    /// Passes down the row filter, for pruning, and of the filters from
    /// above only the dynamic filters DataFusion derives at run time
    /// from a join's build side, a TopK or an aggregate, and only when each
    /// reads nothing but columns the caller sees unmasked: such a filter
    /// compares a raw column with values the caller's own query produced, so
    /// it never fails and only skips rows that could not appear in the
    /// answer. Everything else stays above the barrier.
    fn gather_filters_for_pushdown(
        &self,
        phase: FilterPushdownPhase,
        parent_filters: Vec<Arc<dyn PhysicalExpr>>,
        _config: &ConfigOptions,
    ) -> Result<FilterDescription> {
        let plain: HashSet<usize> = self
            .columns
            .iter()
            .enumerate()
            .filter(|(_, expr)| expr.downcast_ref::<ColumnExpr>().is_some())
            .map(|(index, _)| index)
            .collect();
        let passes = |filter: &Arc<dyn PhysicalExpr>| {
            filter.downcast_ref::<DynamicFilterPhysicalExpr>().is_some()
                && filter.children().iter().all(|child| {
                    child
                        .downcast_ref::<ColumnExpr>()
                        .is_some_and(|column| plain.contains(&column.index()))
                })
        };
        let mut child = if phase == FilterPushdownPhase::Post && parent_filters.iter().all(passes) {
            ChildFilterDescription::from_child_with_allowed_indices(
                &parent_filters,
                plain,
                &self.input,
            )?
        } else {
            ChildFilterDescription::all_unsupported(&parent_filters)
        };
        // The row filter is offered to the scan, to prune row groups and
        // pages by their statistics; this operator still applies it to
        // every row whatever the scan does with it. When the filter under
        // the barrier already holds it (after the caller's filters, so that
        // it is evaluated on the rows they keep), that filter takes it to
        // the scan; offered again, it would be put first.
        if phase == FilterPushdownPhase::Pre
            && let Some(row_filter) = &self.row_filter
            && !filter_below_holds(&self.input, row_filter)
        {
            child = child.with_self_filter(Arc::clone(row_filter));
        }
        Ok(FilterDescription::new().with_child(child))
    }

    fn handle_child_pushdown_result(
        &self,
        _phase: FilterPushdownPhase,
        child_pushdown_result: ChildPushdownResult,
        _config: &ConfigOptions,
    ) -> Result<FilterPushdownPropagation<Arc<dyn ExecutionPlan>>> {
        Ok(FilterPushdownPropagation::if_all(child_pushdown_result))
    }

    fn child_stats_requests(&self, partition: Option<usize>) -> Vec<ChildStats> {
        vec![ChildStats::At(partition)]
    }

    fn statistics_from_inputs(
        &self,
        input_stats: &[Arc<Statistics>],
        _args: &StatisticsArgs,
    ) -> Result<Arc<Statistics>> {
        let Some(input) = input_stats.first() else {
            return Ok(Arc::new(Statistics::new_unknown(&self.schema)));
        };
        let num_rows = match input.num_rows.get_value() {
            Some(&rows) => Precision::Inexact(coarse(rows)),
            None => Precision::Absent,
        };
        // The size of what leaves the barrier: its output columns, not the
        // input's (which holds the row filter's columns too), when each
        // output column's size is known; else the input's size.
        let output_bytes = self
            .columns
            .iter()
            .zip(self.schema.fields())
            .map(|(expr, field)| exact_byte_size(expr, field.data_type(), input))
            .sum::<Option<usize>>();
        let total_byte_size = match output_bytes.or(input.total_byte_size.get_value().copied()) {
            Some(bytes) => Precision::Inexact(coarse(bytes)),
            None => Precision::Absent,
        };
        Ok(Arc::new(Statistics {
            num_rows,
            total_byte_size,
            column_statistics: self
                .columns
                .iter()
                .zip(self.schema.fields())
                .map(|(expr, field)| ColumnStatistics {
                    byte_size: column_byte_size(expr, field.data_type(), input),
                    distinct_count: distinct_count(expr, input),
                    ..ColumnStatistics::new_unknown()
                })
                .collect(),
        }))
    }
}

/// Whether `input` is a filter that holds each conjunct of `predicate` and
/// passes its input's columns through as they are (so that the predicate's
/// columns and the filter's name the same ones).
fn filter_below_holds(input: &Arc<dyn ExecutionPlan>, predicate: &Arc<dyn PhysicalExpr>) -> bool {
    input.downcast_ref::<FilterExec>().is_some_and(|filter| {
        if filter.projection().is_some() || filter.schema() != filter.input().schema() {
            return false;
        }
        let held = split_conjunction(filter.predicate());
        split_conjunction(predicate)
            .into_iter()
            .all(|conjunct| held.contains(&conjunct))
    })
}

/// The input's statistics of the column `expr` passes through unchanged.
fn passed_through<'a>(
    expr: &Arc<dyn PhysicalExpr>,
    input: &'a Statistics,
) -> Option<&'a ColumnStatistics> {
    expr.downcast_ref::<ColumnExpr>()
        .and_then(|column| input.column_statistics.get(column.index()))
}

/// A column's size from the input's statistics, before it is made coarse:
/// a column passed through has its input's size; one of a fixed-width type
/// otherwise, that width times the input's rows.
fn exact_byte_size(
    expr: &Arc<dyn PhysicalExpr>,
    data_type: &DataType,
    input: &Statistics,
) -> Option<usize> {
    passed_through(expr, input)
        .and_then(|stats| stats.byte_size.get_value().copied())
        .or_else(|| {
            data_type
                .primitive_width()
                .zip(input.num_rows.get_value())
                .map(|(width, &rows)| rows.saturating_mul(width))
        })
}

/// A column's size as the planner may know it behind the barrier, coarse as
/// the row count: what the planner weighs to pick a join's build side.
fn column_byte_size(
    expr: &Arc<dyn PhysicalExpr>,
    data_type: &DataType,
    input: &Statistics,
) -> Precision<usize> {
    match exact_byte_size(expr, data_type, input) {
        Some(bytes) => Precision::Inexact(coarse(bytes)),
        None => Precision::Absent,
    }
}

/// How many distinct values a column passed through may hold, as the
/// planner may know it behind the barrier: the input's distinct count
/// rounded to a power of two, or else the size of the input's value range
/// (capped by its row count), so that a join on a key is not planned as if
/// every key were unique. The range's bounds themselves stay behind.
fn distinct_count(expr: &Arc<dyn PhysicalExpr>, input: &Statistics) -> Precision<usize> {
    let Some(stats) = passed_through(expr, input) else {
        return Precision::Absent;
    };
    let from_range = || {
        let min = stats.min_value.get_value()?;
        let max = stats.max_value.get_value()?;
        let range = Interval::try_new(min.clone(), max.clone())
            .ok()?
            .cardinality()?;
        let range = usize::try_from(range).unwrap_or(usize::MAX);
        Some(match input.num_rows.get_value() {
            Some(&rows) => range.min(rows),
            None => range,
        })
    };
    match stats
        .distinct_count
        .get_value()
        .copied()
        .or_else(from_range)
    {
        Some(count) => Precision::Inexact(coarse(count)),
        None => Precision::Absent,
    }
}

/// A count or size as the planner may know it behind the barrier: the power
/// of two nearest to it (within a factor of √2), enough to order the sides of
/// a join. Rounding always up would make every product behind a barrier look
/// up to twice its size, and a build side that fits under the single-partition
/// threshold without policies would no longer fit with them.
pub(crate) fn coarse(value: usize) -> usize {
    let value = value.max(1);
    let Some(above) = value.checked_next_power_of_two() else {
        return 1 << (usize::BITS - 1);
    };
    let below = above / 2;
    // Nearest in ratio: `above / value` against `value / below`.
    if below > 0 && (above as u128) * (below as u128) > (value as u128) * (value as u128) {
        below
    } else {
        above
    }
}

fn apply(
    batch: &RecordBatch,
    row_filter: Option<&Arc<dyn PhysicalExpr>>,
    columns: &[Arc<dyn PhysicalExpr>],
    schema: &SchemaRef,
) -> Result<RecordBatch> {
    let visible = match row_filter {
        Some(predicate) => {
            let mask = predicate.evaluate(batch)?.into_array(batch.num_rows())?;
            let mask = mask
                .as_any()
                .downcast_ref::<BooleanArray>()
                .ok_or_else(|| DataFusionError::Internal("row filter is not boolean".into()))?;
            // NULL hides the row, as false does.
            let mask = if mask.null_count() > 0 {
                prep_null_mask_filter(mask)
            } else {
                mask.clone()
            };
            if mask.true_count() == batch.num_rows() {
                batch.clone()
            } else {
                filter_record_batch(batch, &mask)?
            }
        }
        None => batch.clone(),
    };
    let arrays = columns
        .iter()
        .map(|expr| expr.evaluate(&visible)?.into_array(visible.num_rows()))
        .collect::<Result<Vec<ArrayRef>>>()?;
    Ok(RecordBatch::try_new_with_options(
        Arc::clone(schema),
        arrays,
        &RecordBatchOptions::new().with_row_count(Some(visible.num_rows())),
    )?)
}

#[cfg(test)]
mod tests {
    use arrow::array::{AsArray, Int64Array};
    use arrow::datatypes::{Field, Int64Type, Schema};
    use datafusion::common::ScalarValue;
    use datafusion::datasource::memory::MemorySourceConfig;
    use datafusion::logical_expr::Operator;
    use datafusion::physical_expr::expressions::{binary, lit};
    use datafusion::physical_plan::collect;
    use datafusion::physical_plan::filter::FilterExecBuilder;

    use super::*;

    /// Columns `a` = 1..=6 and `b` = 10, 20, ..., 60.
    fn numbers() -> Result<Arc<dyn ExecutionPlan>> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("a", DataType::Int64, false),
            Field::new("b", DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(Int64Array::from_iter_values(1..=6)),
                Arc::new(Int64Array::from_iter_values((1..=6).map(|n| n * 10))),
            ],
        )?;
        Ok(MemorySourceConfig::try_new_exec(
            &[vec![batch]],
            schema,
            None,
        )?)
    }

    fn compare(
        column: &str,
        op: Operator,
        value: i64,
        input: &Arc<dyn ExecutionPlan>,
    ) -> Arc<dyn PhysicalExpr> {
        let schema = input.schema();
        let index = schema.index_of(column).expect("test column");
        binary(
            Arc::new(ColumnExpr::new(column, index)),
            op,
            lit(value),
            &schema,
        )
        .expect("test expression")
    }

    /// The `a` values a barrier with row filter `a > 2` over `input` returns.
    async fn visible(input: Arc<dyn ExecutionPlan>) -> Result<Vec<i64>> {
        let row_filter = compare("a", Operator::Gt, 2, &input);
        let a: Arc<dyn PhysicalExpr> =
            Arc::new(ColumnExpr::new("a", input.schema().index_of("a")?));
        let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, false)]));
        let barrier = Arc::new(PolicyExec::new(
            "p".into(),
            input,
            Some(row_filter),
            vec![a],
            schema,
        ));
        let batches = collect(barrier, Arc::new(TaskContext::default())).await?;
        Ok(batches
            .iter()
            .flat_map(|batch| {
                batch
                    .column(0)
                    .as_primitive::<Int64Type>()
                    .values()
                    .to_vec()
            })
            .collect())
    }

    #[tokio::test]
    async fn the_barrier_applies_its_row_filter_unless_the_filter_below_holds_it() -> Result<()> {
        let scan = numbers()?;
        let row_filter = compare("a", Operator::Gt, 2, &scan);
        let caller = compare("b", Operator::Lt, 60, &scan);

        // No filter below: the barrier hides a <= 2.
        assert_eq!(visible(Arc::clone(&scan)).await?, vec![3, 4, 5, 6]);

        // A filter below with the caller's condition only: still hidden.
        let callers_only: Arc<dyn ExecutionPlan> =
            Arc::new(FilterExec::try_new(Arc::clone(&caller), Arc::clone(&scan))?);
        assert!(!filter_below_holds(&callers_only, &row_filter));
        assert_eq!(visible(callers_only).await?, vec![3, 4, 5]);

        // The caller's condition and the row filter below: it holds the row
        // filter, and the answer is the same.
        let both = binary(
            Arc::clone(&caller),
            Operator::And,
            Arc::clone(&row_filter),
            &scan.schema(),
        )?;
        let holding: Arc<dyn ExecutionPlan> =
            Arc::new(FilterExec::try_new(both, Arc::clone(&scan))?);
        assert!(filter_below_holds(&holding, &row_filter));
        assert_eq!(visible(holding).await?, vec![3, 4, 5]);

        // A filter that reorders its columns names others at the same
        // positions: it is not taken to hold the row filter.
        let reordered: Arc<dyn ExecutionPlan> = Arc::new(
            FilterExecBuilder::new(Arc::clone(&row_filter), Arc::clone(&scan))
                .apply_projection(Some(vec![1, 0]))?
                .build()?,
        );
        assert!(!filter_below_holds(&reordered, &row_filter));
        Ok(())
    }

    fn key_statistics() -> Statistics {
        Statistics {
            num_rows: Precision::Exact(150_000),
            total_byte_size: Precision::Exact(1_200_000),
            column_statistics: vec![ColumnStatistics {
                null_count: Precision::Exact(0),
                min_value: Precision::Exact(ScalarValue::Int64(Some(1))),
                max_value: Precision::Exact(ScalarValue::Int64(Some(150_000))),
                byte_size: Precision::Exact(1_200_000),
                ..ColumnStatistics::new_unknown()
            }],
        }
    }

    #[test]
    fn a_passed_column_has_a_coarse_size_and_distinct_count_and_no_bounds() {
        let input = key_statistics();
        let key: Arc<dyn PhysicalExpr> = Arc::new(ColumnExpr::new("key", 0));
        let rows = Precision::Inexact(coarse(150_000));
        assert_eq!(rows, Precision::Inexact(131_072));
        // Distinct keys from the range 1..=150000, rounded to a power of two.
        assert_eq!(distinct_count(&key, &input), Precision::Inexact(131_072));
        assert_eq!(
            column_byte_size(&key, &DataType::Int64, &input),
            Precision::Inexact(1_048_576)
        );
        // A range wider than the rows is capped by them.
        let mut sparse = key_statistics();
        sparse.column_statistics[0].max_value = Precision::Exact(ScalarValue::Int64(Some(1 << 40)));
        assert_eq!(distinct_count(&key, &sparse), Precision::Inexact(131_072));
    }

    #[test]
    fn coarse_values_are_the_nearest_power_of_two() {
        let cases = [
            (0, 1),
            (1, 1),
            (3, 4),
            (5, 4),
            (6, 8),
            (1_048_576, 1_048_576),
            (1_482_910, 1_048_576),
            (1_482_911, 2_097_152),
            (6_001_215, 8_388_608),
            (usize::MAX, 1 << (usize::BITS - 1)),
        ];
        for (value, expected) in cases {
            assert_eq!(coarse(value), expected, "coarse({value})");
        }
    }

    #[test]
    fn the_size_leaving_the_barrier_counts_its_output_columns_only() {
        // Input: the key and a wide column only the row filter reads.
        let mut input = key_statistics();
        input.total_byte_size = Precision::Exact(9_200_000);
        input.column_statistics.push(ColumnStatistics {
            byte_size: Precision::Exact(8_000_000),
            ..ColumnStatistics::new_unknown()
        });
        let key: Arc<dyn PhysicalExpr> = Arc::new(ColumnExpr::new("key", 0));
        assert_eq!(
            exact_byte_size(&key, &DataType::Int64, &input),
            Some(1_200_000)
        );
        // A fixed-width computed column: its width for each input row.
        assert_eq!(
            exact_byte_size(&lit(0_i64), &DataType::Int64, &input),
            Some(1_200_000)
        );
        // A computed string has no size known in advance.
        assert_eq!(exact_byte_size(&lit("***"), &DataType::Utf8, &input), None);
    }

    #[test]
    fn a_computed_column_has_only_its_types_width() {
        let input = key_statistics();
        let masked = lit("***");
        assert_eq!(distinct_count(&masked, &input), Precision::Absent);
        assert_eq!(
            column_byte_size(&masked, &DataType::Utf8, &input),
            Precision::Absent
        );
        let zero = lit(0_i64);
        assert_eq!(
            column_byte_size(&zero, &DataType::Int64, &input),
            Precision::Inexact(131_072 * 8)
        );
    }
}
