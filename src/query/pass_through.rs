//! What an execution plan that passes its one input's rows through
//! unchanged (counted, or computed once and shared) says of them.

use std::sync::Arc;

use datafusion::common::Statistics;
use datafusion::physical_plan::ExecutionPlan;

/// The input's statistics, as the wrapper's own: unknown without them.
pub(super) fn input_statistics(
    input: &Arc<dyn ExecutionPlan>,
    input_stats: &[Arc<Statistics>],
) -> Arc<Statistics> {
    match input_stats.first() {
        Some(statistics) => Arc::clone(statistics),
        None => Arc::new(Statistics::new_unknown(&input.schema())),
    }
}

/// The methods of `ExecutionPlan` in which a plan whose rows are its
/// `input` field's says what its input says: its properties, its one
/// child, no expressions of its own, its input's order kept, no
/// repartitioning wanted, and its input's statistics.
macro_rules! pass_through_methods {
    () => {
        fn properties(&self) -> &::std::sync::Arc<::datafusion::physical_plan::PlanProperties> {
            self.input.properties()
        }

        fn children(
            &self,
        ) -> Vec<&::std::sync::Arc<dyn ::datafusion::physical_plan::ExecutionPlan>> {
            vec![&self.input]
        }

        fn apply_expressions(
            &self,
            _f: &mut dyn FnMut(
                &::std::sync::Arc<dyn ::datafusion::physical_expr::PhysicalExpr>,
            ) -> ::datafusion::error::Result<
                ::datafusion::common::tree_node::TreeNodeRecursion,
            >,
        ) -> ::datafusion::error::Result<::datafusion::common::tree_node::TreeNodeRecursion> {
            Ok(::datafusion::common::tree_node::TreeNodeRecursion::Continue)
        }

        fn maintains_input_order(&self) -> Vec<bool> {
            vec![true]
        }

        fn benefits_from_input_partitioning(&self) -> Vec<bool> {
            vec![false]
        }

        fn statistics_from_inputs(
            &self,
            input_stats: &[::std::sync::Arc<::datafusion::common::Statistics>],
            _args: &::datafusion::physical_plan::statistics::StatisticsArgs,
        ) -> ::datafusion::error::Result<::std::sync::Arc<::datafusion::common::Statistics>> {
            Ok($crate::query::pass_through::input_statistics(
                &self.input,
                input_stats,
            ))
        }
    };
}

pub(super) use pass_through_methods;
