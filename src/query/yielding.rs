//! Joins that give their thread back while they emit.
//!
//! A query is stopped (at its timeout, or when its client goes away) by
//! dropping its tasks, which takes effect when a task next yields to the
//! scheduler. DataFusion makes the scans at the leaves of a plan yield, but
//! a join can emit batch after batch from one batch of its input: a probe
//! batch of 8 192 rows whose key matches 100 000 rows on the build side
//! emits 800 million rows without reading its input again, and a task doing
//! so (with an aggregate above it, nothing in between to wait on) does not
//! yield until it is done, minutes later, past its timeout, its client long
//! gone. [`YieldingJoins`] puts a [`CooperativeExec`] above every join: each
//! batch a join emits counts against its task's scheduling budget, and a
//! task that has used its budget yields, so a stopped query stops within a
//! few batches.

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::config::ConfigOptions;
use datafusion::error::Result;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::coop::CooperativeExec;

/// The operators that can emit more rows than they read.
const JOINS: [&str; 6] = [
    "HashJoinExec",
    "NestedLoopJoinExec",
    "CrossJoinExec",
    "SortMergeJoinExec",
    "SymmetricHashJoinExec",
    "PiecewiseMergeJoinExec",
];

/// Puts a [`CooperativeExec`] above every join (see the module's
/// documentation). Runs last, so that the other rules see joins as they are.
#[derive(Debug, Default)]
pub(super) struct YieldingJoins;

impl PhysicalOptimizerRule for YieldingJoins {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            if !JOINS.contains(&node.name()) {
                return Ok(Transformed::no(node));
            }
            Ok(Transformed::yes(
                Arc::new(CooperativeExec::new(node)) as Arc<dyn ExecutionPlan>
            ))
        })
        .map(|transformed| transformed.data)
    }

    fn name(&self) -> &str {
        "yielding_joins"
    }

    fn schema_check(&self) -> bool {
        true
    }
}
