//! Planning runs on threads of its own with a large stack. Planners walk
//! expression trees recursively, and a statement near the complexity limit
//! nests deeply; on a small runtime worker stack an overflow would abort the
//! whole process. A panic while planning ends only that statement.
//!
//! A thread that planned quickly is kept for the next statement: starting
//! one per statement (a clone, a 256 MiB mapping, fresh stack pages) cost
//! more than planning a small query.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc;

use parking_lot::Mutex;

use super::QueryError;

/// Stack of a planning thread. Only the pages a plan touches are committed.
const PLANNING_STACK_BYTES: usize = 256 * 1024 * 1024;

/// Idle planning threads kept beyond this many exit.
const MAX_IDLE_PLANNERS: usize = 16;

/// A thread whose statement planned this long, or panicked, exits after
/// it: a deep plan may have committed much of its stack, which an idle
/// thread would keep, and starting a thread is small beside such a plan.
const RETIRE_AFTER: std::time::Duration = std::time::Duration::from_millis(50);

type Job = Box<dyn FnOnce() + Send>;

/// Idle planning threads, each waiting on its own channel.
static IDLE: Mutex<Vec<mpsc::Sender<Job>>> = Mutex::new(Vec::new());

/// Runs `future` to completion on a planning thread, within the current
/// runtime (its blocking pool and timers stay available).
pub(crate) async fn on_planning_stack<T, F>(future: F) -> Result<T, QueryError>
where
    F: Future<Output = Result<T, QueryError>> + Send + 'static,
    T: Send + 'static,
{
    let runtime = tokio::runtime::Handle::current();
    let (done, result) = tokio::sync::oneshot::channel();
    run(Box::new(move || {
        let _ = done.send(runtime.block_on(future));
    }))?;
    result
        .await
        .map_err(|_| QueryError::Internal("planning failed unexpectedly".into()))?
}

/// Hands `job` to an idle planning thread, or starts one.
fn run(mut job: Job) -> Result<(), QueryError> {
    loop {
        let Some(idle) = IDLE.lock().pop() else { break };
        match idle.send(job) {
            Ok(()) => return Ok(()),
            // That thread has exited; take the job back and try another.
            Err(mpsc::SendError(returned)) => job = returned,
        }
    }
    let (sender, jobs) = mpsc::channel::<Job>();
    sender
        .send(job)
        .expect("the receiver is alive until the thread starts");
    std::thread::Builder::new()
        .name("meshgate-planner".into())
        .stack_size(PLANNING_STACK_BYTES)
        .spawn(move || planner(&sender, &jobs))
        .map(drop)
        .map_err(|e| QueryError::Internal(format!("cannot start a planning thread: {e}")))
}

/// A planning thread: runs jobs until it is not needed any more.
fn planner(me: &mpsc::Sender<Job>, jobs: &mpsc::Receiver<Job>) {
    while let Ok(job) = jobs.recv() {
        let started = std::time::Instant::now();
        // A panic drops the job's reply channel, which its caller reports.
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(job));
        if outcome.is_err() || started.elapsed() > RETIRE_AFTER {
            return;
        }
        let mut idle = IDLE.lock();
        if idle.len() >= MAX_IDLE_PLANNERS {
            return;
        }
        idle.push(me.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits until a planning thread is idle.
    async fn an_idle_planner() {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while IDLE.lock().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "no planning thread became idle"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// The thread a statement is planned on.
    async fn planning_thread() -> std::thread::Thread {
        on_planning_stack(async { Ok(std::thread::current()) })
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_planning_thread_is_reused_and_one_that_panicked_or_planned_long_is_not() {
        let first = planning_thread().await;
        assert_eq!(first.name(), Some("meshgate-planner"));
        an_idle_planner().await;
        let next = planning_thread().await;
        assert_eq!(
            next.id(),
            first.id(),
            "the idle thread planned the next statement"
        );
        an_idle_planner().await;
        let failed: Result<(), QueryError> =
            on_planning_stack(async { panic!("a planner bug") }).await;
        assert!(matches!(failed, Err(QueryError::Internal(_))), "{failed:?}");
        let after_panic = planning_thread().await;
        assert_ne!(after_panic.id(), first.id(), "a thread that panicked exits");
        an_idle_planner().await;
        let slow = on_planning_stack(async move {
            std::thread::sleep(RETIRE_AFTER * 2);
            Ok(std::thread::current())
        })
        .await
        .unwrap();
        assert_eq!(slow.id(), after_panic.id());
        let after_slow = planning_thread().await;
        assert_ne!(
            after_slow.id(),
            slow.id(),
            "a thread that planned long exits"
        );
        // A deep recursion fits in the planning stack (not in a worker's).
        fn depth(n: u64) -> u64 {
            let pad = std::hint::black_box([n; 64]);
            if n == 0 {
                0
            } else {
                1 + depth(n - 1) + pad[0] - n
            }
        }
        let deep = on_planning_stack(async { Ok(depth(50_000)) })
            .await
            .unwrap();
        assert_eq!(deep, 50_000);
    }
}
