//! Aggregates a query computes twice, computed once.
//!
//! DataFusion plans each reference to a common table expression or view as
//! a copy of its plan, so a `WITH` query that reads its CTE twice runs it
//! twice: TPC-H q15 aggregates a quarter of `lineitem` by supplier once to
//! join the suppliers with and once more for the largest revenue.
//! [`SharedSubplans`] finds the aggregates that occur more than once in a
//! plan, the same operators over the same files with the same expressions,
//! and replaces each occurrence with a [`SharedSubplan`]: the first to run
//! a partition runs it on its own task and keeps its batches, counted
//! against the query's memory pool, and every occurrence answers from them;
//! the batches are let go once every occurrence has taken them.
//!
//! Only aggregates that produce their final values are shared: their
//! output is complete only at their end anyway, so keeping it costs no
//! streaming, and it is usually far smaller than what they read. And only
//! those that read files: the display of a file scan names all it reads,
//! while a remote source's request may differ in what it does not show.
//! The rule runs before hash joins hand their dynamic filters down, which a
//! shared aggregate does not take: one occurrence's filter would otherwise
//! hide rows from the others. Plans of recursive queries, which run parts
//! of themselves again, are left alone.

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::sync::Arc;

use datafusion::common::internal_err;
use datafusion::common::runtime::SpawnedTask;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::config::ConfigOptions;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, displayable};
use futures::future::{BoxFuture, Shared};
use futures::{FutureExt, StreamExt, TryStreamExt};
use parking_lot::Mutex;

use arrow::record_batch::RecordBatch;

/// The leaves a shared subplan may read: file scans, whose display names
/// every file, column and predicate they read.
const FILE_SCANS: [&str; 2] = ["DataSourceExec", "HotScan"];

/// Replaces aggregates that occur more than once in a plan with
/// [`SharedSubplan`]s that compute them once. Runs just before hash joins
/// push their dynamic filters down.
#[derive(Debug, Default)]
pub(super) struct SharedSubplans;

impl PhysicalOptimizerRule for SharedSubplans {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if plan.exists(|node| Ok(node.name() == "RecursiveQueryExec"))? {
            return Ok(plan);
        }
        // Every candidate's occurrences; then the ones met first from the
        // top, an occurrence inside another not counted.
        let mut seen: HashMap<String, usize> = HashMap::new();
        plan.apply(|node| {
            if let Some(print) = fingerprint(node) {
                *seen.entry(print).or_default() += 1;
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
        if seen.values().all(|&count| count < 2) {
            return Ok(plan);
        }
        let mut outermost: HashMap<String, usize> = HashMap::new();
        plan.apply(|node| {
            let Some(print) = fingerprint(node).filter(|print| seen[print] > 1) else {
                return Ok(TreeNodeRecursion::Continue);
            };
            *outermost.entry(print).or_default() += 1;
            Ok(TreeNodeRecursion::Jump)
        })?;
        let shared: HashMap<String, Arc<SharedResults>> = outermost
            .into_iter()
            .filter(|(_, count)| *count > 1)
            .map(|(print, count)| (print, Arc::new(SharedResults::new(count))))
            .collect();
        if shared.is_empty() {
            return Ok(plan);
        }
        plan.transform_down(|node| {
            let Some(results) = fingerprint(&node).and_then(|print| shared.get(&print)) else {
                return Ok(Transformed::no(node));
            };
            let shared = SharedSubplan::new(node, Arc::clone(results));
            Ok(Transformed::new(
                Arc::new(shared),
                true,
                TreeNodeRecursion::Jump,
            ))
        })
        .map(|transformed| transformed.data)
    }

    fn name(&self) -> &str {
        "shared_subplans"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// What identifies the subplan at `node` if it may be shared: an aggregate
/// producing final values over file scans only, with no dynamic filter or
/// pending scalar subquery in it. Every operator's display, its
/// expressions in full (some displays leave them out) and its output
/// schema, in order.
fn fingerprint(node: &Arc<dyn ExecutionPlan>) -> Option<String> {
    let aggregate = node.downcast_ref::<AggregateExec>()?;
    if !matches!(
        aggregate.mode(),
        AggregateMode::Final
            | AggregateMode::FinalPartitioned
            | AggregateMode::Single
            | AggregateMode::SinglePartitioned
    ) {
        return None;
    }
    let mut print = String::new();
    let mut shareable = true;
    let mut reads = false;
    node.apply(|operator| {
        if operator.children().is_empty() {
            reads = true;
            shareable &= FILE_SCANS.contains(&operator.name());
        }
        let _ = write!(
            print,
            "{}\n{:?}\n",
            displayable(operator.as_ref()).one_line(),
            operator.schema()
        );
        operator.apply_expressions(&mut |expr: &Arc<dyn PhysicalExpr>| {
            let _ = writeln!(print, "{expr:?}");
            Ok(TreeNodeRecursion::Continue)
        })?;
        Ok(if shareable {
            TreeNodeRecursion::Continue
        } else {
            TreeNodeRecursion::Stop
        })
    })
    .ok()?;
    let unsettled = ["DynamicFilter", "scalar_subquery", "ScalarSubquery"]
        .iter()
        .any(|pending| print.contains(pending));
    (shareable && reads && !unsettled).then_some(print)
}

/// One partition's batches, and the memory they are counted as.
struct Batches {
    batches: Vec<RecordBatch>,
    _reservation: MemoryReservation,
}

type SharedBatches = Shared<BoxFuture<'static, Result<Arc<Batches>, Arc<DataFusionError>>>>;

/// The results the occurrences of one subplan share, by partition: each
/// partition's run, started by the first occurrence that asks for it, and
/// how many occurrences have yet to take it.
#[derive(Debug)]
struct SharedResults {
    occurrences: usize,
    partitions: Mutex<HashMap<usize, (SharedBatches, usize)>>,
}

impl SharedResults {
    fn new(occurrences: usize) -> Self {
        Self {
            occurrences,
            partitions: Mutex::new(HashMap::new()),
        }
    }

    /// Partition `partition` of `input`'s run, shared with the other
    /// occurrences; the last one to take it leaves nothing behind.
    fn take(
        &self,
        input: &Arc<dyn ExecutionPlan>,
        partition: usize,
        context: &Arc<TaskContext>,
    ) -> SharedBatches {
        let mut partitions = self.partitions.lock();
        let (run, left) = partitions.entry(partition).or_insert_with(|| {
            (
                run(Arc::clone(input), partition, Arc::clone(context)),
                self.occurrences,
            )
        });
        let run = run.clone();
        *left -= 1;
        if *left == 0 {
            partitions.remove(&partition);
        }
        run
    }
}

/// Runs `partition` of `input` on a task of its own, which goes on however
/// the occurrences waiting for it are polled, and is stopped when all of
/// them are dropped.
fn run(
    input: Arc<dyn ExecutionPlan>,
    partition: usize,
    context: Arc<TaskContext>,
) -> SharedBatches {
    let task = async move {
        let reservation = MemoryConsumer::new(format!("SharedSubplan[{partition}]"))
            .register(context.memory_pool());
        let task = SpawnedTask::spawn(async move {
            let mut stream = input.execute(partition, context)?;
            let mut batches = Vec::new();
            while let Some(batch) = stream.next().await {
                let batch = batch?;
                reservation.try_grow(batch.get_array_memory_size())?;
                batches.push(batch);
            }
            Ok(Arc::new(Batches {
                batches,
                _reservation: reservation,
            }))
        });
        match task.join_unwind().await {
            Ok(result) => result.map_err(Arc::new),
            Err(error) => Err(Arc::new(DataFusionError::ExecutionJoin(Box::new(error)))),
        }
    };
    task.boxed().shared()
}

/// One occurrence of a subplan whose results are shared with its other
/// occurrences.
#[derive(Debug)]
pub(super) struct SharedSubplan {
    input: Arc<dyn ExecutionPlan>,
    results: Arc<SharedResults>,
}

impl SharedSubplan {
    fn new(input: Arc<dyn ExecutionPlan>, results: Arc<SharedResults>) -> Self {
        Self { input, results }
    }
}

impl DisplayAs for SharedSubplan {
    fn fmt_as(&self, _format: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SharedSubplan: computed once for {} occurrences",
            self.results.occurrences
        )
    }
}

impl ExecutionPlan for SharedSubplan {
    fn name(&self) -> &str {
        "SharedSubplan"
    }

    super::pass_through::pass_through_methods!();

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return internal_err!("SharedSubplan takes exactly one input");
        }
        Ok(Arc::new(Self::new(
            children.swap_remove(0),
            Arc::clone(&self.results),
        )))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let run = self.results.take(&self.input, partition, &context);
        let batches = futures::stream::once(run).map(|batches| match batches {
            Ok(batches) => Ok(futures::stream::iter(
                batches.batches.clone().into_iter().map(Ok),
            )),
            Err(error) => Err(DataFusionError::Shared(error)),
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.input.schema(),
            batches.try_flatten(),
        )))
    }
}

#[cfg(test)]
mod tests {
    use datafusion::execution::SessionStateBuilder;
    use datafusion::physical_optimizer::optimizer::PhysicalOptimizer;
    use datafusion::physical_plan::metrics::MetricValue;
    use datafusion::prelude::{ParquetReadOptions, SessionContext};

    use super::*;
    use crate::query::session::{engine_config, physical_optimizer_rules};
    use crate::query::testing::{plan_and_run, session_with_rules, write_int64_columns};

    /// Rows of `facts`.
    const FACTS: i64 = 30_000;

    async fn session(
        dir: &std::path::Path,
        rules: Vec<Arc<dyn PhysicalOptimizerRule + Send + Sync>>,
    ) -> SessionContext {
        let ctx = session_with_rules(rules);
        let path = dir.join("facts.parquet");
        ctx.register_parquet("facts", path.to_string_lossy(), ParquetReadOptions::new())
            .await
            .expect("register");
        ctx
    }

    /// The answer of `sql`, how many `SharedSubplan`s its plan holds, and
    /// how many rows its file scans read, with `rules`.
    async fn run(
        dir: &std::path::Path,
        rules: Vec<Arc<dyn PhysicalOptimizerRule + Send + Sync>>,
        sql: &str,
    ) -> (String, usize, usize) {
        let ctx = session(dir, rules).await;
        let (plan, batches) = plan_and_run(&ctx, sql).await;
        let (mut shared, mut scanned) = (0, 0);
        plan.apply(|node| {
            shared += usize::from(node.name() == "SharedSubplan");
            if node.name() == "DataSourceExec" {
                for metric in node
                    .metrics()
                    .into_iter()
                    .flat_map(|m| m.iter().cloned().collect::<Vec<_>>())
                {
                    if let MetricValue::OutputRows(rows) = metric.value() {
                        scanned += rows.value();
                    }
                }
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .expect("walk");
        let answer = arrow::util::pretty::pretty_format_batches(&batches)
            .expect("format")
            .to_string();
        (answer, shared, scanned)
    }

    fn write_facts(dir: &std::path::Path) {
        write_int64_columns(
            &dir.join("facts.parquet"),
            &[
                ("grp", (0..FACTS).map(|i| i * 7919 % 97).collect()),
                ("day", (0..FACTS).map(|i| i % 365).collect()),
                ("amount", (0..FACTS).map(|i| i * 31 % 1000).collect()),
            ],
            Some(4096),
        );
    }

    /// A CTE read twice is aggregated once, and answers as when it is
    /// aggregated twice: read by a scalar subquery and the query (TPC-H
    /// q15's shape), and joined with itself (its two reads run at once).
    #[tokio::test]
    async fn an_aggregate_read_twice_is_computed_once() {
        let dir = tempfile::tempdir().expect("dir");
        write_facts(dir.path());
        for sql in [
            "WITH totals AS (SELECT grp, sum(amount) AS total FROM facts \
             WHERE day < 200 GROUP BY grp) \
             SELECT grp, total FROM totals \
             WHERE total >= (SELECT max(total) FROM totals) - 2000 ORDER BY grp",
            "WITH totals AS (SELECT day, sum(amount) AS total FROM facts GROUP BY day) \
             SELECT a.day, a.total, b.total FROM totals a JOIN totals b ON a.day = b.day + 1 \
             ORDER BY a.day",
        ] {
            let (plain, plain_shared, plain_scanned) =
                run(dir.path(), PhysicalOptimizer::new().rules, sql).await;
            let (answer, shared, scanned) = run(dir.path(), physical_optimizer_rules(), sql).await;
            assert_eq!(plain_shared, 0);
            assert_eq!(shared, 2, "both references share one run: {sql}");
            assert_eq!(answer, plain, "{sql}");
            assert!(answer.lines().count() > 5, "{answer}");
            assert_eq!(
                plain_scanned,
                2 * FACTS as usize,
                "without sharing the file is read twice"
            );
            assert_eq!(scanned, FACTS as usize, "the file is read once: {sql}");
        }
    }

    /// Aggregates that differ anywhere (here the filter below them) are not
    /// shared, and a plan with one occurrence is left as it is.
    #[tokio::test]
    async fn different_aggregates_are_not_shared() {
        let dir = tempfile::tempdir().expect("dir");
        write_facts(dir.path());
        for sql in [
            "SELECT a.grp, a.total, b.total FROM \
             (SELECT grp, sum(amount) AS total FROM facts WHERE day < 200 GROUP BY grp) a JOIN \
             (SELECT grp, sum(amount) AS total FROM facts WHERE day < 201 GROUP BY grp) b \
             ON a.grp = b.grp ORDER BY a.grp",
            "SELECT grp, sum(amount) FROM facts GROUP BY grp ORDER BY grp",
        ] {
            let (plain, _, plain_scanned) =
                run(dir.path(), PhysicalOptimizer::new().rules, sql).await;
            let (answer, shared, scanned) = run(dir.path(), physical_optimizer_rules(), sql).await;
            assert_eq!(shared, 0, "{sql}");
            assert_eq!(answer, plain, "{sql}");
            assert_eq!(scanned, plain_scanned, "{sql}");
        }
    }

    /// A run that fails (here: out of the query's memory) fails every
    /// occurrence with its error, and the query ends.
    #[tokio::test]
    async fn a_failed_run_fails_the_query_with_its_error() {
        use datafusion::execution::memory_pool::GreedyMemoryPool;
        use datafusion::execution::runtime_env::RuntimeEnvBuilder;
        use datafusion::physical_plan::collect;

        let dir = tempfile::tempdir().expect("dir");
        write_facts(dir.path());
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(GreedyMemoryPool::new(16 * 1024)))
            .build_arc()
            .expect("runtime");
        let state = SessionStateBuilder::new()
            .with_config(engine_config().with_target_partitions(2))
            .with_runtime_env(runtime)
            .with_default_features()
            .with_physical_optimizer_rules(physical_optimizer_rules())
            .build();
        let ctx = SessionContext::new_with_state(state);
        let path = dir.path().join("facts.parquet");
        ctx.register_parquet("facts", path.to_string_lossy(), ParquetReadOptions::new())
            .await
            .expect("register");
        let sql = "WITH totals AS (SELECT day, sum(amount) AS total FROM facts GROUP BY day) \
                   SELECT a.day, a.total, b.total FROM totals a JOIN totals b ON a.day = b.day + 1";
        let plan = ctx
            .sql(sql)
            .await
            .expect("sql")
            .create_physical_plan()
            .await
            .expect("plan");
        let mut shared = 0;
        plan.apply(|node| {
            shared += usize::from(node.name() == "SharedSubplan");
            Ok(TreeNodeRecursion::Continue)
        })
        .expect("walk");
        assert_eq!(shared, 2);
        let outcome = tokio::time::timeout(
            std::time::Duration::from_secs(60),
            collect(plan, ctx.task_ctx()),
        )
        .await
        .expect("the query ends");
        let error = outcome.expect_err("16 KiB is too little memory");
        assert!(
            error
                .find_root()
                .to_string()
                .contains("Resources exhausted"),
            "{error}"
        );
    }
}
