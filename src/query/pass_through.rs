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
