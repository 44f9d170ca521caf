//! Planning runs on threads of its own with a large stack. Planners walk
//! expression trees recursively, and a statement near the complexity limit
//! nests deeply; on a small runtime worker stack an overflow would abort the
//! whole process. A panic while planning ends only the planning thread.

use std::future::Future;

use super::QueryError;

/// Stack of a planning thread. Only the pages a plan touches are committed.
const PLANNING_STACK_BYTES: usize = 256 * 1024 * 1024;

/// Runs `future` to completion on a fresh planning thread, within the
/// current runtime (its blocking pool and timers stay available).
pub(crate) async fn on_planning_stack<T, F>(future: F) -> Result<T, QueryError>
where
    F: Future<Output = Result<T, QueryError>> + Send + 'static,
    T: Send + 'static,
{
    let runtime = tokio::runtime::Handle::current();
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("meshgate-planner".into())
        .stack_size(PLANNING_STACK_BYTES)
        .spawn(move || {
            let _ = done.send(runtime.block_on(future));
        })
        .map_err(|e| QueryError::Internal(format!("cannot start a planning thread: {e}")))?;
    result
        .await
        .map_err(|_| QueryError::Internal("planning failed unexpectedly".into()))?
}
