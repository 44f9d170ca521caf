//! Physical plans made ahead, while the client asks for the rows.
//!
//! Flight SQL clients reach a query's rows over several requests: ADBC and
//! JDBC create a prepared statement, ask for its flight info, then fetch its
//! ticket; pyarrow's client asks for flight info, then fetches. The first
//! request makes the statement's logical plan. Its physical plan (the scans
//! chosen, the physical optimizer's passes) used to be made when the rows
//! were fetched, while between the requests the gateway sat waiting on the
//! client. A request that tells the client where to fetch the rows now starts
//! the physical plan on a task of its own (see
//! [`super::CallerSession::plan_ahead`]), and the fetch takes it.
//!
//! A plan made ahead is run once: a physical plan holds the state of its run
//! (a hash join's build side, dynamic filters), so the next run of the same
//! statement makes a plan of its own. A plan started more than [`FRESH_FOR`]
//! before the fetch is not used either: it listed the products' files when
//! it was made. A plan made ahead that no query takes is dropped with the
//! statement's cached plan, and stopped if it is still being made.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::execution::session_state::SessionState;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::ExecutionPlan;
use parking_lot::Mutex;
use tokio::task::JoinHandle;

/// How long after it was started a plan made ahead may be taken.
pub(super) const FRESH_FOR: Duration = Duration::from_secs(1);

/// A physical plan made ahead, and the context it runs in: the settings,
/// functions and forwarded token of the session state that made it, so the
/// fetch that takes it builds no session state of its own.
#[derive(Debug)]
pub(super) struct Planned {
    pub(super) plan: Arc<dyn ExecutionPlan>,
    pub(super) context: TaskContext,
}

impl Planned {
    /// The physical plan of `plan` in `state`, and `state`'s task context.
    pub(super) async fn make(state: SessionState, plan: &LogicalPlan) -> Result<Self> {
        Ok(Self {
            plan: state.create_physical_plan(plan).await?,
            context: TaskContext::from(&state),
        })
    }
}

/// The physical plan of one planned statement, made ahead or being made.
/// Shared by the copies of the statement's plan that the plan cache hands
/// out.
#[derive(Debug, Default)]
pub(super) struct PlanAhead(Mutex<Option<Ahead>>);

#[derive(Debug)]
struct Ahead {
    started: Instant,
    task: JoinHandle<Result<Planned>>,
}

impl Ahead {
    fn fresh(&self) -> bool {
        self.started.elapsed() <= FRESH_FOR
    }
}

impl PlanAhead {
    /// Runs the planning that `planning` gives on a task of its own, at
    /// most `timeout` long, unless one was started within [`FRESH_FOR`] and
    /// not taken yet (`planning` is then not called).
    pub(super) fn start<F>(&self, planning: impl FnOnce() -> F, timeout: Duration)
    where
        F: Future<Output = Result<Planned>> + Send + 'static,
    {
        let mut slot = self.0.lock();
        if slot.as_ref().is_some_and(Ahead::fresh) {
            return;
        }
        if let Some(stale) = slot.take() {
            stale.task.abort();
        }
        let planning = planning();
        let task = tokio::spawn(async move {
            tokio::time::timeout(timeout, planning)
                .await
                .unwrap_or_else(|_| {
                    Err(DataFusionError::Execution(format!(
                        "planning took longer than {timeout:?}"
                    )))
                })
        });
        *slot = Some(Ahead {
            started: Instant::now(),
            task,
        });
    }

    /// The plan made ahead, once, waiting for it to be made: `None` when
    /// none was started within [`FRESH_FOR`], or it failed (the query then
    /// plans as it starts, and meets the same error there).
    pub(super) async fn take(&self) -> Option<Planned> {
        let ahead = self.0.lock().take()?;
        if !ahead.fresh() {
            ahead.task.abort();
            return None;
        }
        ahead.task.await.ok()?.ok()
    }
}

impl Drop for PlanAhead {
    fn drop(&mut self) {
        if let Some(ahead) = self.0.get_mut().take() {
            ahead.task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use datafusion::prelude::SessionContext;

    use super::*;

    const NO_LIMIT: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn a_plan_made_ahead_is_taken_once_and_only_while_fresh() {
        let context = SessionContext::new();
        let state = context.state();
        let plan = state.create_logical_plan("SELECT 1 AS one").await.unwrap();
        let planning = || {
            let (state, plan) = (state.clone(), plan.clone());
            async move { Planned::make(state, &plan).await }
        };
        let ahead = PlanAhead::default();
        assert!(ahead.take().await.is_none(), "nothing was started");

        ahead.start(planning, NO_LIMIT);
        // A plan being made, or made and not taken, is not made again.
        ahead.start(
            || -> std::future::Ready<Result<Planned>> { panic!("planned twice") },
            NO_LIMIT,
        );
        let made = ahead.take().await.expect("the plan made ahead");
        assert_eq!(made.plan.schema().field(0).name(), "one");
        assert!(ahead.take().await.is_none(), "a plan made ahead runs once");

        // A plan started longer ago than FRESH_FOR is neither taken nor
        // kept in place of a new one.
        let age = |ahead: &PlanAhead| {
            let mut slot = ahead.0.lock();
            let started = &mut slot.as_mut().unwrap().started;
            *started = started.checked_sub(FRESH_FOR * 2).unwrap();
        };
        ahead.start(planning, NO_LIMIT);
        age(&ahead);
        assert!(ahead.take().await.is_none(), "a stale plan is not taken");
        ahead.start(planning, NO_LIMIT);
        age(&ahead);
        ahead.start(planning, NO_LIMIT);
        assert!(ahead.take().await.is_some(), "a stale plan is made again");
    }
}
