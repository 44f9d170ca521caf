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
//! wrapping.

use std::any::Any;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arrow::array::{ArrayRef, AsArray, BooleanArray};
use arrow::compute::kernels::aggregate::sum_checked;
use arrow::datatypes::{ArrowNativeTypeOp, ArrowPrimitiveType, DataType, Int64Type, UInt64Type};
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

/// The exact sum of a column of `BIGINT` or `BIGINT UNSIGNED` values.
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
        Ok(match args.return_field.data_type() {
            DataType::Int64 => Box::new(SumAccumulator::<Int64Type>::new(type_name)),
            _ => Box::new(SumAccumulator::<UInt64Type>::new(type_name)),
        })
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<arrow::datatypes::FieldRef>> {
        self.inner.state_fields(args)
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
        let data_type = args.return_field.data_type().clone();
        let overflowed = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&overflowed);
        let inner = match data_type {
            DataType::Int64 => flagging_sum::<Int64Type>(&data_type, flag),
            _ => flagging_sum::<UInt64Type>(&data_type, flag),
        };
        Ok(Box::new(CheckedGroups {
            inner,
            overflowed,
            type_name,
        }))
    }

    fn create_sliding_accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        let type_name = summed_integer(&args);
        let inner = self.inner.create_sliding_accumulator(args)?;
        Ok(match type_name {
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

/// DataFusion's grouped sum of `T` values, its additions wrapping as
/// DataFusion's do and setting `overflowed` when one does.
fn flagging_sum<T>(data_type: &DataType, overflowed: Arc<AtomicBool>) -> Box<dyn GroupsAccumulator>
where
    T: ArrowPrimitiveType + Send,
{
    Box::new(PrimitiveGroupsAccumulator::<T, _>::new(
        data_type,
        move |sum: &mut T::Native, value: T::Native| match sum.add_checked(value) {
            Ok(added) => *sum = added,
            Err(_) => {
                *sum = sum.add_wrapping(value);
                overflowed.store(true, Ordering::Relaxed);
            }
        },
    ))
}

/// The sum of a column's values, failing when it passes its type's range.
struct SumAccumulator<T: ArrowPrimitiveType> {
    sum: Option<T::Native>,
    type_name: &'static str,
}

impl<T: ArrowPrimitiveType> fmt::Debug for SumAccumulator<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SumAccumulator")
            .field("sum", &self.sum)
            .finish()
    }
}

impl<T: ArrowPrimitiveType> SumAccumulator<T> {
    fn new(type_name: &'static str) -> Self {
        Self {
            sum: None,
            type_name,
        }
    }

    fn add(&mut self, values: &ArrayRef) -> Result<()> {
        let Some(sum) =
            sum_checked(values.as_primitive::<T>()).map_err(|_| overflow(self.type_name))?
        else {
            return Ok(());
        };
        self.sum = Some(match self.sum {
            Some(before) => before
                .add_checked(sum)
                .map_err(|_| overflow(self.type_name))?,
            None => sum,
        });
        Ok(())
    }

    fn value(&self) -> Result<ScalarValue> {
        ScalarValue::new_primitive::<T>(self.sum, &T::DATA_TYPE)
    }
}

impl<T: ArrowPrimitiveType> Accumulator for SumAccumulator<T> {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        values.first().map_or(Ok(()), |values| self.add(values))
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.update_batch(states)
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![self.value()?])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        self.value()
    }

    fn size(&self) -> usize {
        size_of_val(self)
    }
}

/// DataFusion's `sum(DISTINCT ...)` of integers, failing when the sum of
/// the distinct values passes their type's range: they are added exactly
/// once more as the sum is given.
#[derive(Debug)]
struct CheckedDistinct {
    inner: Box<dyn Accumulator>,
    type_name: &'static str,
}

impl Accumulator for CheckedDistinct {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        self.inner.update_batch(values)
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

/// DataFusion's grouped sum, whose additions note when one wraps: each
/// batch that wrapped fails the query.
struct CheckedGroups {
    inner: Box<dyn GroupsAccumulator>,
    overflowed: Arc<AtomicBool>,
    type_name: &'static str,
}

impl fmt::Debug for CheckedGroups {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckedGroups")
            .field("type", &self.type_name)
            .finish_non_exhaustive()
    }
}

impl CheckedGroups {
    fn checked(&self, result: Result<()>) -> Result<()> {
        result?;
        if self.overflowed.load(Ordering::Relaxed) {
            return Err(overflow(self.type_name));
        }
        Ok(())
    }
}

impl GroupsAccumulator for CheckedGroups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        let result = self
            .inner
            .update_batch(values, group_indices, opt_filter, total_num_groups);
        self.checked(result)
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        let result = self
            .inner
            .merge_batch(values, group_indices, total_num_groups);
        self.checked(result)
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        self.inner.evaluate(emit_to)
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        self.inner.state(emit_to)
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        self.inner.convert_to_state(values, opt_filter)
    }

    fn size(&self) -> usize {
        self.inner.size()
    }
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
        let schema = Arc::new(Schema::new(vec![
            Field::new("x", DataType::Int64, true),
            Field::new("g", DataType::Int32, false),
            Field::new("u", DataType::UInt64, false),
        ]));
        let batches: Vec<Vec<RecordBatch>> = partitions
            .into_iter()
            .map(|rows| {
                let columns: Vec<ArrayRef> = vec![
                    Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
                    Arc::new(Int32Array::from_iter_values(rows.iter().map(|r| r.1))),
                    Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.2))),
                ];
                vec![RecordBatch::try_new(Arc::clone(&schema), columns).expect("batch")]
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
        ] {
            let error = "sum() passed the range of BIGINT";
            assert_fails_where_it_wrapped(&wrapping, &checked, sql, error).await;
        }
        for sql in [
            // MAX, 1 and -1 add up to MAX.
            "SELECT sum(DISTINCT x), sum(DISTINCT g) FROM t",
            // Each frame's sum fits, though a running one would pass MAX as
            // row 3 enters before row 2 leaves.
            "SELECT g, sum(x) OVER (ORDER BY g ROWS BETWEEN CURRENT ROW AND CURRENT ROW) FROM t ORDER BY g",
            "SELECT g, sum(x) OVER (ORDER BY g ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) FROM t WHERE g >= 3 ORDER BY g",
        ] {
            assert_answers_alike(&wrapping, &checked, sql).await;
        }
    }
}
