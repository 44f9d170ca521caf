//! `sum` of integers that fails on overflow.
//!
//! DataFusion adds up a `BIGINT` column with wrapping arithmetic: a sum
//! past the largest `BIGINT` answers a negative number, a wrong value given
//! as right, where PostgreSQL (which sums into `NUMERIC`), Trino and DuckDB
//! (into `HUGEINT`) answer right or fail. The `sum` registered here is
//! DataFusion's, but for the sums of integers (every signed integer type is
//! summed as `BIGINT`, every unsigned one as `BIGINT UNSIGNED`) whose
//! accumulators, grouped or not, `DISTINCT` or not, over sliding window
//! frames or not, fail the query with an overflow error instead of
//! wrapping. Sums are kept exact, in 128 bits (partial sums travel between
//! the stages of an aggregation as `DECIMAL(38, 0)`), and checked when they
//! are given: values that pass the range on the way and come back
//! (`MAX`, `1`, `-1`) add up to what they are.

use std::any::Any;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, BooleanArray, PrimitiveArray};
use arrow::compute::cast;
use arrow::datatypes::{
    ArrowPrimitiveType, DataType, Decimal128Type, Field, FieldRef, Int64Type, UInt64Type,
};
use datafusion::common::{DataFusionError, Result, ScalarValue};
use datafusion::execution::{FunctionRegistry, SessionState};
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::AggregateOrderSensitivity;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Documentation, EmitTo, Expr, GroupsAccumulator,
    Operator, ReversedUDAF, SetMonotonicity, Signature, StatisticsArgs,
};
use datafusion_functions_aggregate_common::aggregate::groups_accumulator::prim_op::PrimitiveGroupsAccumulator;

/// Registers `sum` with integer sums checked for overflow, in place of
/// DataFusion's.
pub(super) fn register(state: &mut SessionState) -> Result<()> {
    let Some(sum) = state.aggregate_functions().get("sum").cloned() else {
        return Ok(());
    };
    let checked = CheckedSum {
        inner: Arc::clone(sum.inner()),
    };
    state.register_udaf(Arc::new(AggregateUDF::new_from_impl(checked)))?;
    Ok(())
}

/// DataFusion's `sum`, with its integer sums checked for overflow.
#[derive(Debug)]
struct CheckedSum {
    inner: Arc<dyn AggregateUDFImpl>,
}

impl PartialEq for CheckedSum {
    fn eq(&self, other: &Self) -> bool {
        self.inner.dyn_eq(&*other.inner as &dyn Any)
    }
}

impl Eq for CheckedSum {}

impl Hash for CheckedSum {
    fn hash<H: Hasher>(&self, state: &mut H) {
        "checked".hash(state);
        self.inner.dyn_hash(state);
    }
}

/// The SQL name of the integer type `args` sums, if it sums integers.
fn summed_type(args: &AccumulatorArgs) -> Option<&'static str> {
    match args.return_field.data_type() {
        DataType::Int64 => Some("BIGINT"),
        DataType::UInt64 => Some("BIGINT UNSIGNED"),
        _ => None,
    }
}

/// The SQL name of the integer type `args` sums value by value (not
/// `DISTINCT`), if it sums integers.
fn summed_integer(args: &AccumulatorArgs) -> Option<&'static str> {
    summed_type(args).filter(|_| !args.is_distinct)
}

/// The exact sum of a column of `BIGINT` or `BIGINT UNSIGNED` values, or
/// of exact partial sums (`EXACT_STATE`). 128 bits hold the sum of 2^64
/// values of 64 bits.
fn exact_sum(values: &ArrayRef) -> i128 {
    fn sum<T: ArrowPrimitiveType>(values: &ArrayRef) -> i128
    where
        T::Native: Into<i128>,
    {
        values
            .as_primitive::<T>()
            .iter()
            .flatten()
            .map(Into::into)
            .sum()
    }
    match values.data_type() {
        DataType::Int64 => sum::<Int64Type>(values),
        DataType::UInt64 => sum::<UInt64Type>(values),
        DataType::Decimal128(..) => sum::<Decimal128Type>(values),
        _ => 0,
    }
}

/// Whether `sum` is a value of the type named `type_name`.
fn fits(sum: i128, type_name: &str) -> bool {
    if type_name == "BIGINT" {
        i64::try_from(sum).is_ok()
    } else {
        u64::try_from(sum).is_ok()
    }
}

fn overflow(type_name: &str) -> DataFusionError {
    DataFusionError::ArrowError(
        Box::new(arrow::error::ArrowError::ArithmeticOverflow(format!(
            "sum() passed the range of {type_name}"
        ))),
        None,
    )
}

impl AggregateUDFImpl for CheckedSum {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        if args.is_distinct {
            let type_name = summed_type(&args);
            let inner = self.inner.accumulator(args)?;
            return Ok(match type_name {
                Some(type_name) => Box::new(CheckedDistinct { inner, type_name }),
                None => inner,
            });
        }
        let Some(type_name) = summed_integer(&args) else {
            return self.inner.accumulator(args);
        };
        Ok(Box::new(SumAccumulator {
            sum: None,
            data_type: args.return_field.data_type().clone(),
            type_name,
        }))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        let exact = !args.is_distinct
            && matches!(
                args.return_field.data_type(),
                DataType::Int64 | DataType::UInt64
            );
        let fields = self.inner.state_fields(args)?;
        if !exact {
            return Ok(fields);
        }
        // The partial sum, exact.
        Ok(fields
            .iter()
            .map(|field| Arc::new(Field::new(field.name(), EXACT_STATE.clone(), true)) as FieldRef)
            .collect())
    }

    fn groups_accumulator_supported(&self, args: AccumulatorArgs) -> bool {
        self.inner.groups_accumulator_supported(args)
    }

    fn create_groups_accumulator(
        &self,
        args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        let Some(type_name) = summed_integer(&args) else {
            return self.inner.create_groups_accumulator(args);
        };
        Ok(Box::new(ExactGroups {
            inner: PrimitiveGroupsAccumulator::new(&EXACT_STATE, add_exact),
            data_type: args.return_field.data_type().clone(),
            type_name,
        }))
    }

    fn create_sliding_accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        let distinct = args.is_distinct;
        let type_name = summed_type(&args);
        let inner = self.inner.create_sliding_accumulator(args)?;
        Ok(match type_name {
            Some(type_name) if distinct => Box::new(CheckedDistinct { inner, type_name }),
            Some(type_name) => Box::new(CheckedSliding {
                inner,
                sum: 0,
                type_name,
            }),
            None => inner,
        })
    }

    fn order_sensitivity(&self) -> AggregateOrderSensitivity {
        self.inner.order_sensitivity()
    }

    fn simplify_expr_op_literal(
        &self,
        agg_function: &AggregateFunction,
        arg: &Expr,
        op: Operator,
        lit: &Expr,
        arg_is_left: bool,
    ) -> Result<Option<Expr>> {
        self.inner
            .simplify_expr_op_literal(agg_function, arg, op, lit, arg_is_left)
    }

    fn reverse_expr(&self) -> ReversedUDAF {
        match self.inner.reverse_expr() {
            // The same function, this one.
            ReversedUDAF::Identical => ReversedUDAF::Identical,
            ReversedUDAF::NotSupported | ReversedUDAF::Reversed(_) => ReversedUDAF::NotSupported,
        }
    }

    fn value_from_stats(&self, statistics_args: &StatisticsArgs) -> Option<ScalarValue> {
        self.inner.value_from_stats(statistics_args)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }

    fn set_monotonicity(&self, data_type: &DataType) -> SetMonotonicity {
        self.inner.set_monotonicity(data_type)
    }
}

/// The type partial sums of integers travel in between the stages of an
/// aggregation: the exact sum, which may lie past the summed type's range
/// until the values still to come bring it back.
const EXACT_STATE: DataType = DataType::Decimal128(38, 0);

/// [`exact_sum`] of `values`, or `None` when every value is null.
fn exact_sum_of(values: &ArrayRef) -> Option<i128> {
    (values.null_count() < values.len()).then(|| exact_sum(values))
}

/// `sum` as a value of `data_type` (`BIGINT` or `BIGINT UNSIGNED`), or an
/// overflow error when it lies outside its range.
fn summed_value(sum: Option<i128>, data_type: &DataType, type_name: &str) -> Result<ScalarValue> {
    let Some(sum) = sum else {
        return ScalarValue::try_from(data_type);
    };
    match data_type {
        DataType::UInt64 => u64::try_from(sum)
            .map(|sum| ScalarValue::UInt64(Some(sum)))
            .map_err(|_| overflow(type_name)),
        _ => i64::try_from(sum)
            .map(|sum| ScalarValue::Int64(Some(sum)))
            .map_err(|_| overflow(type_name)),
    }
}

/// The sum of a column of integers, exact as it runs, failing when it is
/// given outside its type's range.
#[derive(Debug)]
struct SumAccumulator {
    sum: Option<i128>,
    /// `BIGINT` or `BIGINT UNSIGNED`.
    data_type: DataType,
    type_name: &'static str,
}

impl SumAccumulator {
    fn add(&mut self, values: &ArrayRef) {
        if let Some(sum) = exact_sum_of(values) {
            self.sum = Some(self.sum.unwrap_or(0).wrapping_add(sum));
        }
    }
}

impl Accumulator for SumAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        if let Some(values) = values.first() {
            self.add(values);
        }
        Ok(())
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.update_batch(states)
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![ScalarValue::new_primitive::<Decimal128Type>(
            self.sum,
            &EXACT_STATE,
        )?])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        summed_value(self.sum, &self.data_type, self.type_name)
    }

    fn size(&self) -> usize {
        size_of_val(self)
    }
}

/// DataFusion's `sum(DISTINCT ...)` of integers, over the rows of a group
/// or of a sliding window frame, failing when the sum of the distinct
/// values passes their type's range: they are added exactly once more as
/// the sum is given.
#[derive(Debug)]
struct CheckedDistinct {
    inner: Box<dyn Accumulator>,
    type_name: &'static str,
}

impl Accumulator for CheckedDistinct {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        self.inner.update_batch(values)
    }

    fn retract_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        self.inner.retract_batch(values)
    }

    fn supports_retract_batch(&self) -> bool {
        self.inner.supports_retract_batch()
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.inner.merge_batch(states)
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        self.inner.state()
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let sum = self.inner.evaluate()?;
        if sum.is_null() {
            return Ok(sum);
        }
        // The state is the list of the distinct values.
        if let Some(ScalarValue::List(values)) = self.inner.state()?.first()
            && !fits(exact_sum(values.values()), self.type_name)
        {
            return Err(overflow(self.type_name));
        }
        Ok(sum)
    }

    fn size(&self) -> usize {
        self.inner.size()
    }
}

/// DataFusion's sum over a sliding window frame of integers, failing when
/// a frame's sum passes their type's range. Rows enter the frame before
/// those it leaves go, so a running sum in the type itself could pass its
/// range on the way to a sum that fits: the exact one is kept alongside.
#[derive(Debug)]
struct CheckedSliding {
    inner: Box<dyn Accumulator>,
    sum: i128,
    type_name: &'static str,
}

impl Accumulator for CheckedSliding {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        self.sum += values.first().map_or(0, exact_sum);
        self.inner.update_batch(values)
    }

    fn retract_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        self.sum -= values.first().map_or(0, exact_sum);
        self.inner.retract_batch(values)
    }

    fn supports_retract_batch(&self) -> bool {
        self.inner.supports_retract_batch()
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.sum += states.first().map_or(0, exact_sum);
        self.inner.merge_batch(states)
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        self.inner.state()
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let sum = self.inner.evaluate()?;
        if !sum.is_null() && !fits(self.sum, self.type_name) {
            return Err(overflow(self.type_name));
        }
        Ok(sum)
    }

    fn size(&self) -> usize {
        self.inner.size() + size_of::<i128>()
    }
}

/// DataFusion's grouped sum, over the values made exact (`EXACT_STATE`),
/// each group's sum checked when it is given.
struct ExactGroups {
    inner: PrimitiveGroupsAccumulator<Decimal128Type, fn(&mut i128, i128)>,
    /// `BIGINT` or `BIGINT UNSIGNED`.
    data_type: DataType,
    type_name: &'static str,
}

impl fmt::Debug for ExactGroups {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExactGroups")
            .field("type", &self.type_name)
            .finish_non_exhaustive()
    }
}

/// Adds `value` to the exact `sum` (which 128 bits hold, see
/// [`exact_sum_of`]).
fn add_exact(sum: &mut i128, value: i128) {
    *sum = sum.wrapping_add(value);
}

/// `values` (integers) as `EXACT_STATE`.
fn exact(values: &[ArrayRef]) -> Result<Vec<ArrayRef>> {
    values
        .iter()
        .map(|values| Ok(cast(values, &EXACT_STATE)?))
        .collect()
}

impl GroupsAccumulator for ExactGroups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.inner
            .update_batch(&exact(values)?, group_indices, opt_filter, total_num_groups)
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        self.inner
            .merge_batch(values, group_indices, total_num_groups)
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let sums = self.inner.evaluate(emit_to)?;
        let sums = sums.as_primitive::<Decimal128Type>();
        let type_name = self.type_name;
        Ok(match self.data_type {
            DataType::UInt64 => Arc::new(in_range::<UInt64Type>(sums, type_name)?),
            _ => Arc::new(in_range::<Int64Type>(sums, type_name)?),
        })
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        self.inner.state(emit_to)
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        self.inner.convert_to_state(&exact(values)?, opt_filter)
    }

    fn size(&self) -> usize {
        self.inner.size()
    }
}

/// `sums` as values of `T`, or an overflow error if one lies outside its
/// range.
fn in_range<T>(sums: &PrimitiveArray<Decimal128Type>, type_name: &str) -> Result<PrimitiveArray<T>>
where
    T: ArrowPrimitiveType,
    T::Native: TryFrom<i128>,
{
    sums.try_unary(|sum| T::Native::try_from(sum).map_err(|_| ()))
        .map_err(|()| overflow(type_name))
}

#[cfg(test)]
mod tests {
    use arrow::array::{Int32Array, Int64Array, RecordBatch, UInt64Array};
    use arrow::datatypes::{Field, Schema};
    use datafusion::datasource::MemTable;
    use datafusion::execution::SessionStateBuilder;
    use datafusion::prelude::SessionContext;

    use super::*;
    use crate::query::testing::{answer, assert_answers_alike, assert_fails_where_it_wrapped};

    /// A session over `t`: `x` BIGINT, `g` INT, `u` BIGINT UNSIGNED, the
    /// rows in two partitions; with `checked`, this module's `sum`.
    fn context(partitions: Vec<Vec<(i64, i32, u64)>>, checked: bool) -> SessionContext {
        context_in_batches(partitions, checked, usize::MAX)
    }

    /// [`context`], each partition's rows in batches of `batch_rows`.
    fn context_in_batches(
        partitions: Vec<Vec<(i64, i32, u64)>>,
        checked: bool,
        batch_rows: usize,
    ) -> SessionContext {
        let schema = Arc::new(Schema::new(vec![
            Field::new("x", DataType::Int64, true),
            Field::new("g", DataType::Int32, false),
            Field::new("u", DataType::UInt64, false),
        ]));
        let batches: Vec<Vec<RecordBatch>> = partitions
            .into_iter()
            .map(|rows| {
                rows.chunks(batch_rows.max(1))
                    .map(|rows| {
                        let columns: Vec<ArrayRef> = vec![
                            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
                            Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.1))),
                            Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.2))),
                        ];
                        RecordBatch::try_new(Arc::clone(&schema), columns).expect("batch")
                    })
                    .collect()
            })
            .collect();
        let mut state = SessionStateBuilder::new()
            .with_config(super::super::session::engine_config().with_target_partitions(2))
            .with_default_features()
            .build();
        if checked {
            register(&mut state).expect("register");
        }
        let ctx = SessionContext::new_with_state(state);
        let table = MemTable::try_new(schema, batches).expect("table");
        ctx.register_table("t", Arc::new(table)).expect("register");
        ctx
    }

    #[tokio::test]
    async fn integer_sums_past_their_type_fail_and_others_answer_as_before() {
        let half = i64::MAX / 2 + 1;
        // Each partition's sum fits; the whole does not (a merge overflows),
        // and group 1's does not within the first partition.
        let rows = vec![
            vec![(half, 1, u64::MAX), (half, 1, 1), (-5, 2, 0)],
            vec![(half, 3, 0), (7, 2, 0)],
        ];
        let wrapping = context(rows.clone(), false);
        let checked = context(rows, true);
        for (sql, type_name) in [
            ("SELECT sum(x) FROM t", "BIGINT"),
            ("SELECT sum(x) FROM t WHERE g <> 2", "BIGINT"),
            ("SELECT g, sum(x) FROM t GROUP BY g", "BIGINT"),
            ("SELECT g % 2, sum(x) FROM t GROUP BY g % 2", "BIGINT"),
            ("SELECT sum(u) FROM t", "BIGINT UNSIGNED"),
            ("SELECT g, sum(u) FROM t GROUP BY g", "BIGINT UNSIGNED"),
        ] {
            // DataFusion's own sum wraps.
            let error = format!("sum() passed the range of {type_name}");
            assert_fails_where_it_wrapped(&wrapping, &checked, sql, &error).await;
        }
        for sql in [
            "SELECT sum(CAST(x AS DECIMAL(38, 0))), sum(CAST(g AS DOUBLE)) FROM t",
            "SELECT g, sum(x - 1), sum(g) FROM t WHERE g = 2 GROUP BY g",
            "SELECT sum(g) FROM t",
            "SELECT sum(DISTINCT g) FROM t",
            "SELECT g, sum(g) OVER (ORDER BY g ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) FROM t ORDER BY g",
            "SELECT sum(x) FROM t WHERE x IS NULL",
        ] {
            assert_answers_alike(&wrapping, &checked, sql).await;
        }
        let exact = answer(&checked, "SELECT sum(x) FROM t WHERE g = 2")
            .await
            .expect("sum");
        assert!(exact.contains("| 2 "), "{exact}");
    }

    /// Grouped sums whose partial aggregation is skipped (each row's value
    /// handed on as its own partial sum) are exact and checked alike.
    #[tokio::test]
    async fn grouped_sums_without_partial_aggregation_are_exact() {
        let max = i64::MAX;
        let rows = vec![
            vec![(max, 1, 0), (1, 1, 0), (max, 2, 0), (5, 3, 0)],
            vec![(-1, 1, 0), (-1, 2, 0), (6, 3, 0), (7, 4, 0)],
        ];
        // A row a batch: the partial aggregation is skipped from the
        // second batch on.
        let wrapping = context_in_batches(rows.clone(), false, 1);
        let checked = context_in_batches(rows, true, 1);
        for ctx in [&wrapping, &checked] {
            for setting in [
                "SET datafusion.execution.skip_partial_aggregation_probe_rows_threshold = 1",
                "SET datafusion.execution.skip_partial_aggregation_probe_ratio_threshold = 0.0",
            ] {
                ctx.sql(setting).await.expect(setting);
            }
        }
        let plan = answer(
            &checked,
            "EXPLAIN ANALYZE SELECT g, sum(x) FROM t GROUP BY g",
        )
        .await
        .expect("explain");
        assert!(!plan.contains("skipped_aggregation_rows=0"), "{plan}");
        assert!(plan.contains("skipped_aggregation_rows="), "{plan}");
        assert_answers_alike(
            &wrapping,
            &checked,
            "SELECT g, sum(x) FROM t GROUP BY g ORDER BY g",
        )
        .await;
        let error = "sum() passed the range of BIGINT";
        let sql = "SELECT g % 2, sum(x) FROM t GROUP BY g % 2";
        assert_fails_where_it_wrapped(&wrapping, &checked, sql, error).await;
    }

    #[tokio::test]
    async fn distinct_sums_and_sliding_window_sums_past_their_type_fail() {
        let max = i64::MAX;
        let rows = vec![vec![(max, 1, 0), (1, 2, 0)], vec![(max, 3, 0), (-1, 4, 0)]];
        let wrapping = context(rows.clone(), false);
        let checked = context(rows, true);
        for sql in [
            // The distinct values MAX and 1. (DataFusion sums one distinct
            // argument over a grouping by it, with the plain sum; two take
            // the distinct accumulators.)
            "SELECT sum(DISTINCT x) FROM t WHERE g < 4",
            "SELECT sum(DISTINCT x), sum(DISTINCT g) FROM t WHERE g < 4",
            "SELECT g < 3, sum(DISTINCT x) FROM t GROUP BY g < 3",
            // Rows 2 and 3's frame: 1 + MAX.
            "SELECT g, sum(x) OVER (ORDER BY g ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) FROM t",
            "SELECT g, sum(DISTINCT x) OVER (ORDER BY g ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) FROM t",
        ] {
            let error = "sum() passed the range of BIGINT";
            assert_fails_where_it_wrapped(&wrapping, &checked, sql, error).await;
        }
        for sql in [
            // MAX, 1 and -1 add up to MAX, though MAX and 1, the first
            // partition's, do not fit.
            "SELECT sum(x) FROM t WHERE g <> 3",
            "SELECT g < 5, sum(x) FROM t WHERE g <> 3 GROUP BY g < 5",
            "SELECT sum(x) FILTER (WHERE g <> 3), count(*) FROM t",
            "SELECT sum(DISTINCT x) FROM t",
            "SELECT sum(DISTINCT x), sum(DISTINCT g) FROM t",
            // Each frame's sum fits, though a running one would pass MAX as
            // row 3 enters before row 2 leaves.
            "SELECT g, sum(x) OVER (ORDER BY g ROWS BETWEEN CURRENT ROW AND CURRENT ROW) FROM t ORDER BY g",
            "SELECT g, sum(x) OVER (ORDER BY g ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) FROM t WHERE g >= 3 ORDER BY g",
            "SELECT g, sum(DISTINCT x) OVER (ORDER BY g ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) FROM t WHERE g >= 3 ORDER BY g",
            "SELECT g, sum(DISTINCT x) OVER (ORDER BY g ROWS BETWEEN CURRENT ROW AND CURRENT ROW) FROM t ORDER BY g",
        ] {
            assert_answers_alike(&wrapping, &checked, sql).await;
        }
    }
}
