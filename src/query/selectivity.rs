//! How many rows a filter on strings lets through, as the planner estimates
//! it before choosing joins.
//!
//! DataFusion estimates a filter's selectivity by interval analysis, which
//! covers numbers and dates; a filter on any other type (`p_brand =
//! 'Brand#23' AND p_container = 'MED BOX'`) is taken to pass 20% of the
//! rows, whatever the column holds. The planner then builds a join on the
//! wrong side when that guess is far off: the 200 parts of TPC-H q17 were
//! estimated at 40 000, their join with `lineitem` at a million rows, and
//! the aggregate it is joined with was built instead.
//!
//! Parquet products know how many distinct values their dictionary-encoded
//! string columns hold (from the dictionary pages), and a policy barrier
//! passes that count on, coarsely. [`StringFilterSelectivity`] runs before
//! DataFusion's join selection and gives each such filter the selectivity
//! those counts imply, assuming values equally frequent and conditions
//! independent: `1 / n` for an equality, `k / n` for a list of `k`, the
//! complement for their negations; conditions it cannot estimate count as
//! DataFusion's default (20%) once.

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{ScalarValue, Statistics};
use datafusion::config::ConfigOptions;
use datafusion::error::Result;
use datafusion::logical_expr::Operator;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::{BinaryExpr, Column, InListExpr, Literal};
use datafusion::physical_expr::intervals::utils::check_support;
use datafusion::physical_expr::utils::{collect_columns, split_conjunction};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::filter::{FilterExec, FilterExecBuilder};
use datafusion::physical_plan::statistics::{StatisticsArgs, StatisticsContext};

/// DataFusion's selectivity for a filter it cannot analyse.
const UNKNOWN: f64 = 0.2;

/// Sets the selectivity of filters that interval analysis does not cover
/// from their columns' distinct counts. Runs before join selection.
#[derive(Debug, Default)]
pub(super) struct StringFilterSelectivity;

impl PhysicalOptimizerRule for StringFilterSelectivity {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            let Some(filter) = node.downcast_ref::<FilterExec>() else {
                return Ok(Transformed::no(node));
            };
            let input = filter.input();
            if check_support(filter.predicate(), &input.schema()) {
                return Ok(Transformed::no(node));
            }
            // An estimate that cannot be made leaves the filter as it is.
            let Ok(statistics) =
                StatisticsContext::new().compute(input.as_ref(), &StatisticsArgs::new())
            else {
                return Ok(Transformed::no(node));
            };
            let Some(selectivity) = selectivity(filter.predicate(), &statistics) else {
                return Ok(Transformed::no(node));
            };
            let percent = percent(selectivity);
            if percent == filter.default_selectivity() {
                return Ok(Transformed::no(node));
            }
            let filter = FilterExecBuilder::from(filter)
                .with_default_selectivity(percent)
                .build()?;
            Ok(Transformed::yes(Arc::new(filter) as Arc<dyn ExecutionPlan>))
        })
        .map(|transformed| transformed.data)
    }

    fn name(&self) -> &str {
        "string_filter_selectivity"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// A selectivity as the whole percent a filter takes (at least 1: a filter
/// estimated to pass nothing would be planned as an empty input).
fn percent(selectivity: f64) -> u8 {
    (selectivity * 100.0).round().clamp(1.0, 100.0) as u8
}

/// The share of rows `predicate` passes, when the distinct counts estimate
/// at least one of its conditions.
fn selectivity(predicate: &Arc<dyn PhysicalExpr>, statistics: &Statistics) -> Option<f64> {
    let mut known = None;
    let mut unknown = false;
    for condition in split_conjunction(predicate) {
        match condition_selectivity(condition, statistics) {
            Some(share) => known = Some(known.unwrap_or(1.0) * share),
            None => unknown = true,
        }
    }
    known.map(|share| if unknown { share * UNKNOWN } else { share })
}

/// The share of rows one condition passes: an equality or inequality of a
/// column with a constant, a list of constants, or an OR of conditions
/// each of which is known.
fn condition_selectivity(
    condition: &Arc<dyn PhysicalExpr>,
    statistics: &Statistics,
) -> Option<f64> {
    if let Some(binary) = condition.downcast_ref::<BinaryExpr>() {
        return match binary.op() {
            Operator::Eq | Operator::NotEq => {
                let distinct = column_against_constant(binary.left(), binary.right(), statistics)
                    .or_else(|| {
                    column_against_constant(binary.right(), binary.left(), statistics)
                })?;
                let equal = 1.0 / distinct;
                Some(if *binary.op() == Operator::Eq {
                    equal
                } else {
                    1.0 - equal
                })
            }
            Operator::And => Some(
                condition_selectivity(binary.left(), statistics)?
                    * condition_selectivity(binary.right(), statistics)?,
            ),
            Operator::Or => {
                let left = condition_selectivity(binary.left(), statistics)?;
                let right = condition_selectivity(binary.right(), statistics)?;
                // Conditions on one column (`x = 'a' OR x = 'b'`, which
                // is also what a short `IN` list becomes) are taken to pass
                // different rows; on different columns, independent ones.
                let one_column = {
                    let columns = collect_columns(binary.left());
                    columns.len() == 1 && columns == collect_columns(binary.right())
                };
                Some(if one_column {
                    (left + right).min(1.0)
                } else {
                    left + right - left * right
                })
            }
            _ => None,
        };
    }
    if let Some(literal) = condition.downcast_ref::<Literal>() {
        // What simplifying a row filter can leave: `AND true`.
        return Some(match literal.value() {
            ScalarValue::Boolean(Some(true)) => 1.0,
            _ => 0.0,
        });
    }
    let list = condition.downcast_ref::<InListExpr>()?;
    if !list
        .list()
        .iter()
        .all(|item| item.downcast_ref::<Literal>().is_some())
    {
        return None;
    }
    let distinct = distinct_count(list.expr(), statistics)?;
    let share = (list.list().len() as f64 / distinct).min(1.0);
    Some(if list.negated() { 1.0 - share } else { share })
}

/// The distinct count of `column` when it is a column compared with
/// `constant`, a literal that is not NULL.
fn column_against_constant(
    column: &Arc<dyn PhysicalExpr>,
    constant: &Arc<dyn PhysicalExpr>,
    statistics: &Statistics,
) -> Option<f64> {
    let literal = constant.downcast_ref::<Literal>()?;
    if literal.value().is_null() {
        return None;
    }
    distinct_count(column, statistics)
}

/// How many distinct values the column `expr` holds, from the statistics.
fn distinct_count(expr: &Arc<dyn PhysicalExpr>, statistics: &Statistics) -> Option<f64> {
    let column = expr.downcast_ref::<Column>()?;
    let count = *statistics
        .column_statistics
        .get(column.index())?
        .distinct_count
        .get_value()?;
    (count > 0).then_some(count as f64)
}
