//! EXPLAIN output that stops at policy barriers: what lies below a
//! [`PolicyExec`] (the source scan, its pruning predicates and metrics such as
//! rows read or row groups pruned) describes rows the caller may not see,
//! so a barrier is shown as a leaf.

use std::fmt::Write;
use std::sync::Arc;

use datafusion::physical_plan::{ExecutionPlan, displayable};

use super::PolicyExec;

/// The physical plan, one operator a line, indented; with metrics after
/// EXPLAIN ANALYZE. Unless `redact` is false (for administrators), policy
/// barriers are shown as leaves.
pub fn render_plan(plan: &Arc<dyn ExecutionPlan>, with_metrics: bool, redact: bool) -> String {
    let mut out = String::new();
    render(plan.as_ref(), 0, with_metrics, redact, &mut out);
    out
}

fn render(
    plan: &dyn ExecutionPlan,
    depth: usize,
    with_metrics: bool,
    redact: bool,
    out: &mut String,
) {
    let mut line = displayable(plan).one_line().to_string();
    // Administrators see the statement a source received, policies included.
    if !redact
        && let Some(remote) =
            (plan as &dyn std::any::Any).downcast_ref::<crate::sources::RemoteExec>()
    {
        line = format!("{}, sent={}", line.trim_end(), remote.sql());
    }
    let _ = write!(out, "{:indent$}{}", "", line.trim_end(), indent = depth * 2);
    if with_metrics && let Some(metrics) = plan.metrics() {
        let metrics = metrics
            .aggregate_by_name()
            .sorted_for_display()
            .timestamps_removed();
        let _ = write!(out, ", metrics=[{metrics}]");
    }
    out.push('\n');
    if redact
        && (plan as &dyn std::any::Any)
            .downcast_ref::<PolicyExec>()
            .is_some()
    {
        return;
    }
    for child in plan.children() {
        render(child.as_ref(), depth + 1, with_metrics, redact, out);
    }
}
