//! Recursive queries stopped after `limits.max_recursion_depth` iterations.
//!
//! DataFusion runs the recursive term of a `WITH RECURSIVE` query again and
//! again until an iteration yields no row: a term that never runs dry
//! (`SELECT n + 1 FROM r`) runs until the query times out, a core busy the
//! whole time. [`BoundedRecursion`] puts a counter around each recursive
//! query's terms: running the static term (the start of the query) sets it
//! to zero, and each run of the recursive term (one iteration) counts one;
//! the iteration past the limit fails the query with a resources-exhausted
//! error that says so.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use datafusion::common::internal_err;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::config::ConfigOptions;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::recursive_query::RecursiveQueryExec;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, replace_children_if_necessary,
};

/// Iterations a recursive query may run where no limit is configured.
pub const DEFAULT_MAX_RECURSION_DEPTH: u64 = 1000;

/// The iterations each recursive query of a session may run, kept in the
/// session's settings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecursionLimit(pub u64);

/// Counts the iterations of every recursive query in a plan (see the
/// module's documentation).
#[derive(Debug, Default)]
pub(super) struct BoundedRecursion;

impl PhysicalOptimizerRule for BoundedRecursion {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            let Some(recursive) = node.downcast_ref::<RecursiveQueryExec>() else {
                return Ok(Transformed::no(node));
            };
            let counted = |input: &Arc<dyn ExecutionPlan>| {
                input.downcast_ref::<Iterations>().map_or_else(
                    || Arc::clone(input),
                    |iterations| Arc::clone(&iterations.input),
                )
            };
            let count = Arc::new(AtomicU64::new(0));
            let terms: Vec<Arc<dyn ExecutionPlan>> = vec![
                Arc::new(Iterations {
                    input: counted(recursive.static_term()),
                    count: Arc::clone(&count),
                    term: Term::Static,
                }),
                Arc::new(Iterations {
                    input: counted(recursive.recursive_term()),
                    count,
                    term: Term::Recursive,
                }),
            ];
            Ok(Transformed::new(
                replace_children_if_necessary(Arc::clone(&node), terms)?,
                true,
                TreeNodeRecursion::Continue,
            ))
        })
        .map(|transformed| transformed.data)
    }

    fn name(&self) -> &str {
        "bounded_recursion"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Term {
    /// Runs once, when the recursive query starts.
    Static,
    /// Runs once an iteration.
    Recursive,
}

/// One term of a recursive query, counting its runs.
#[derive(Debug)]
struct Iterations {
    input: Arc<dyn ExecutionPlan>,
    /// Iterations since the query started, shared by both terms (and by
    /// the copies DataFusion makes of the recursive term each iteration).
    count: Arc<AtomicU64>,
    term: Term,
}

impl DisplayAs for Iterations {
    fn fmt_as(&self, _format: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.term {
            Term::Static => write!(f, "RecursionStart"),
            Term::Recursive => write!(f, "RecursionStep"),
        }
    }
}

impl ExecutionPlan for Iterations {
    fn name(&self) -> &str {
        "Iterations"
    }

    super::pass_through::pass_through_methods!();

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return internal_err!("a recursive query's term takes exactly one input");
        }
        Ok(Arc::new(Self {
            input: children.swap_remove(0),
            count: Arc::clone(&self.count),
            term: self.term,
        }))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        match self.term {
            Term::Static => self.count.store(0, Ordering::Relaxed),
            Term::Recursive => {
                let limit = context
                    .session_config()
                    .get_extension::<RecursionLimit>()
                    .map_or(DEFAULT_MAX_RECURSION_DEPTH, |limit| limit.0);
                let iteration = self.count.fetch_add(1, Ordering::Relaxed) + 1;
                if iteration > limit {
                    return Err(DataFusionError::ResourcesExhausted(format!(
                        "a recursive query ran {limit} iterations without ending \
                         (limits.max_recursion_depth): give its recursive part a \
                         condition that stops it"
                    )));
                }
            }
        }
        self.input.execute(partition, context)
    }
}
