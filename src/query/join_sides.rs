//! Hash joins built on the side with fewer rows when the planner's byte
//! estimates point the other way by mistake.
//!
//! DataFusion's join selection builds a hash join on the side estimated
//! smaller, comparing estimated bytes before rows. Some byte estimates are
//! not scaled with the rows: a semi join's output keeps the byte size of
//! the columns of its whole input, so the 60 000 estimated rows of TPC-H
//! q21's `EXISTS` join counted as 95 MB, more than the 5.9M rows of
//! `lineitem` it is anti-joined with, and the anti join was built on the
//! 5.9M rows (a 164 MB hash table) and probed with 73 000.
//! [`RowCountJoinSides`] runs after join selection and builds a partitioned
//! hash join on the other side when its build side is estimated to hold at
//! least ten times the rows of its probe side.

use std::sync::Arc;

use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::config::ConfigOptions;
use datafusion::error::Result;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
use datafusion::physical_plan::statistics::{StatisticsArgs, StatisticsContext};

/// How many times the probe side's estimated rows the build side must hold
/// for the join to be built on the probe side instead: far enough apart
/// that wider rows on the probe side are unlikely to make up the
/// difference.
const ROWS_APART: usize = 10;

/// Swaps the sides of partitioned hash joins whose build side is estimated
/// to hold far more rows than the probe side. Runs right after join
/// selection, before joins hand their filters down.
#[derive(Debug, Default)]
pub(super) struct RowCountJoinSides;

impl PhysicalOptimizerRule for RowCountJoinSides {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        plan.transform_up(|node| {
            let Some(join) = node.downcast_ref::<HashJoinExec>() else {
                return Ok(Transformed::no(node));
            };
            if *join.partition_mode() != PartitionMode::Partitioned
                || !join.join_type().supports_swap()
            {
                return Ok(Transformed::no(node));
            }
            let (Some(build), Some(probe)) =
                (estimated_rows(join.left()), estimated_rows(join.right()))
            else {
                return Ok(Transformed::no(node));
            };
            if build < probe.saturating_mul(ROWS_APART) {
                return Ok(Transformed::no(node));
            }
            Ok(Transformed::yes(
                join.swap_inputs(PartitionMode::Partitioned)?,
            ))
        })
        .map(|transformed| transformed.data)
    }

    fn name(&self) -> &str {
        "row_count_join_sides"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// The estimated rows of `plan`'s output, when there is an estimate.
pub(super) fn estimated_rows(plan: &Arc<dyn ExecutionPlan>) -> Option<usize> {
    StatisticsContext::new()
        .compute(plan.as_ref(), &StatisticsArgs::new())
        .ok()?
        .num_rows
        .get_value()
        .copied()
}

#[cfg(test)]
mod tests {
    use arrow::array::AsArray;
    use arrow::datatypes::Int64Type;
    use datafusion::common::JoinType;
    use datafusion::common::tree_node::TreeNodeRecursion;
    use datafusion::execution::SessionStateBuilder;
    use datafusion::physical_optimizer::optimizer::PhysicalOptimizer;
    use datafusion::prelude::{ParquetReadOptions, SessionContext};

    use super::*;
    use crate::query::session::{engine_config, physical_optimizer_rules};
    use crate::query::testing::{plan_and_run, write_int64_columns};

    /// Rows of `facts`: four per key, one for each `sup` 0..4.
    const FACTS: i64 = 40_000;

    /// The day of fact `i`: scattered over 0..FACTS.
    fn day(i: i64) -> i64 {
        i * 7919 % FACTS
    }

    /// Writes `name`.parquet with the Int64 `columns` into `dir`.
    fn write(dir: &std::path::Path, name: &str, columns: &[(&str, Vec<i64>)]) {
        write_int64_columns(&dir.join(format!("{name}.parquet")), columns, None);
    }

    /// A session over `facts` and `chosen` with `rules`, on two partitions,
    /// every join partitioned.
    async fn session(
        dir: &std::path::Path,
        rules: Vec<Arc<dyn PhysicalOptimizerRule + Send + Sync>>,
    ) -> SessionContext {
        let mut config = engine_config().with_target_partitions(2);
        let options = config.options_mut();
        options.optimizer.repartition_file_min_size = 1;
        options.optimizer.hash_join_single_partition_threshold = 0;
        options.optimizer.hash_join_single_partition_threshold_rows = 0;
        let state = SessionStateBuilder::new()
            .with_config(config)
            .with_default_features()
            .with_physical_optimizer_rules(rules)
            .build();
        let ctx = SessionContext::new_with_state(state);
        for table in ["facts", "chosen"] {
            let path = dir.join(format!("{table}.parquet"));
            ctx.register_parquet(table, path.to_string_lossy(), ParquetReadOptions::new())
                .await
                .expect("register");
        }
        ctx
    }

    /// The answer of the query shaped like TPC-H q21, and the type of its
    /// anti join as it ran (`LeftAnti`: built on the rows the `EXISTS`
    /// kept; `RightAnti`: built on the facts of the `NOT EXISTS`).
    async fn waiting(ctx: &SessionContext) -> (i64, JoinType) {
        let sql = "SELECT count(*) FROM chosen c JOIN facts f1 ON c.key = f1.key \
            WHERE EXISTS (SELECT 1 FROM facts f2 WHERE f2.key = f1.key AND f2.sup <> f1.sup) \
            AND NOT EXISTS (SELECT 1 FROM facts f3 \
                WHERE f3.key = f1.key AND f3.sup <> f1.sup AND f3.day < 20000)";
        let (plan, batches) = plan_and_run(ctx, sql).await;
        let mut anti = Vec::new();
        plan.apply(|node| {
            if let Some(join) = node.downcast_ref::<HashJoinExec>()
                && matches!(join.join_type(), JoinType::LeftAnti | JoinType::RightAnti)
            {
                anti.push(*join.join_type());
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .expect("walk");
        assert_eq!(anti.len(), 1, "one anti join: {anti:?}");
        let count = batches[0].column(0).as_primitive::<Int64Type>().value(0);
        (count, anti[0])
    }

    #[tokio::test]
    async fn an_anti_join_is_built_on_its_side_with_fewer_rows() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(
            dir.path(),
            "facts",
            &[
                ("key", (0..FACTS).map(|i| i / 4).collect()),
                ("sup", (0..FACTS).map(|i| i % 4).collect()),
                ("day", (0..FACTS).map(day).collect()),
            ],
        );
        let chosen: Vec<i64> = (0..200).map(|i| i * 37 % (FACTS / 4)).collect();
        write(dir.path(), "chosen", &[("key", chosen.clone())]);
        // By hand: the facts of the chosen keys none of whose other three
        // facts falls before day 20 000 (the EXISTS holds for every fact).
        let expected = chosen
            .iter()
            .flat_map(|key| (key * 4..key * 4 + 4).map(move |i| (*key, i)))
            .filter(|(key, i)| {
                (key * 4..key * 4 + 4).all(|other| other == *i || day(other) >= 20_000)
            })
            .count() as i64;
        assert!(expected > 0, "some facts wait");

        // DataFusion's own rules build the anti join on the facts: the
        // EXISTS join's estimate keeps the bytes of all the facts it reads.
        let plain = session(dir.path(), PhysicalOptimizer::new().rules).await;
        assert_eq!(waiting(&plain).await, (expected, JoinType::RightAnti));

        let meshgate = session(dir.path(), physical_optimizer_rules()).await;
        assert_eq!(waiting(&meshgate).await, (expected, JoinType::LeftAnti));
    }
}
