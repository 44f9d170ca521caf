//! Selective join filters applied row by row, chosen when a scan starts.
//!
//! A hash join hands the scan on its probe side a dynamic filter: the build
//! side's key bounds and its keys (a list of them when the build side is
//! small, a hash table otherwise). meshgate reads Parquet with
//! `pushdown_filters` off, so the scan prunes row groups and pages with it
//! and decodes every remaining row of every column; the join then drops the
//! rows whose key the build side lacks. When the build side's keys are few
//! against the probe column's range of values (200 part keys out of
//! 200 000), nearly every row decoded is dropped. Evaluating the filter while
//! decoding pays only then: for a filter most rows pass, it is work the join
//! does again.
//!
//! Which case holds is known only once the build side is in, which is when
//! the join first polls its probe side. [`SelectiveJoinFilters`] wraps each
//! Parquet scan whose predicate holds a hash join's filter in a
//! [`JoinFilteredScan`]. At its first poll it looks at what each of those
//! filters that is final has become and, if one is a key list sparse
//! enough, runs the scan with that list evaluated row by row ahead of the
//! scan's own predicate. The other dynamic filters are left out of that scan (they only
//! ever skip rows the operators above drop anyway). Otherwise the scan runs
//! as planned. A key list that reaches its scan through other joins (a join
//! high in the plan filtering a scan below a join nearer to it) is evaluated
//! while decoding even when denser: the rows it drops there would otherwise
//! go through every join in between first. Hash joins start reading their
//! build sides at once, so such a scan (on the build side of a join below)
//! can start before the join above has its keys; when that join is built on
//! one partition from few rows, the scan waits a moment for its list.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, OnceLock};

use datafusion::common::ScalarValue;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::config::ConfigOptions;
use datafusion::datasource::physical_plan::{
    FileScanConfig, FileScanConfigBuilder, FileSource, ParquetSource,
};
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::Operator;
use datafusion::physical_expr::expressions::{
    BinaryExpr, CaseExpr, Column, DynamicFilterPhysicalExpr, InListExpr, IsNullExpr, Literal,
};
use datafusion::physical_expr::utils::{conjunction, split_conjunction};
use datafusion::physical_expr::{PhysicalExpr, ScalarFunctionExpr};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::joins::{HashJoinExec, PartitionMode};
use datafusion::physical_plan::statistics::{StatisticsArgs, StatisticsContext};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::{FutureExt, TryStreamExt};

use super::join_sides::estimated_rows;
use super::key_bitmap::key_bitmap;

/// A key list is evaluated row by row when its distinct keys are at most
/// this share of the integers in the probe column's range: a probe row then
/// passes about that often. (Measured on TPC-H: a list of 4% of the supplier
/// keys checked against `partsupp` while decoding made the scan slower than
/// decoding it whole; 0.1% of the part keys against `lineitem` halved q17.)
const SPARSE_KEYS: f64 = 0.03;

/// The bound for a key list that reaches its scan through other joins: the
/// rows it drops there would otherwise go through those joins (and the
/// repartitioning between them) before the join that made the list drops
/// them. (Measured on TPC-H q7: 2 of the 25 nation keys checked while
/// decoding `supplier`, whose joins with `lineitem`, `orders` and
/// `customer` then carry a twelfth of the rows.)
const CARRIED_KEYS: f64 = 0.25;

/// How long a scan's first poll waits for the key lists it awaits (see
/// [`Carried::awaited`]) to be final. Those come from joins higher up whose
/// build sides are small, and each is final once every partition of its
/// join has been polled and has its build side in, which is usually a
/// millisecond or two after the scan is first polled: hash joins start
/// reading their build sides all at once, before the joins above them hand
/// down their filters.
const CARRIED_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// Each scan's address, and the join filters that reach it through at least
/// one other join.
type CarriedFilters = HashMap<usize, Carried>;

/// The join filters that reach a scan through at least one other join.
#[derive(Debug, Clone, Default)]
struct Carried {
    /// Their identities.
    ids: Arc<HashSet<u64>>,
    /// Those the scan waits for, briefly, before it chooses: the filters of
    /// joins built on one partition from few enough rows to hand down a key
    /// list.
    awaited: Arc<HashSet<u64>>,
}

/// Wraps the Parquet scans that receive hash joins' dynamic filters. Runs
/// after DataFusion's own rules, once the joins have pushed their filters
/// down.
#[derive(Debug, Default)]
pub(super) struct SelectiveJoinFilters;

impl PhysicalOptimizerRule for SelectiveJoinFilters {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        // The dynamic filters hash joins make, by their identity (a filter
        // pushed down into a scan keeps the identity of the one its join
        // holds), and those that reach each scan through another join.
        let mut joins = HashSet::new();
        let mut carried = CarriedFilters::new();
        let listed = config
            .optimizer
            .hash_join_inlist_pushdown_max_distinct_values;
        find_join_filters(&plan, &[], listed, &mut joins, &mut carried);
        let joins = Arc::new(joins);
        plan.transform_up(|node| {
            let through = carried.get(&address(&node)).cloned().unwrap_or_default();
            Ok(match JoinFilteredScan::over(&node, &joins, through) {
                Some(scan) => Transformed::yes(Arc::new(scan) as Arc<dyn ExecutionPlan>),
                None => Transformed::no(node),
            })
        })
        .map(|transformed| transformed.data)
    }

    fn name(&self) -> &str {
        "selective_join_filters"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// Records the filters of the hash joins at or below `node` in `joins` and,
/// for each Parquet scan, those that reach it through another join in
/// `carried`. `above` holds the filters of the hash joins above `node`, each
/// with whether a join lies between that one and `node` and whether its
/// join hands down a key list (is built on one partition from at most
/// `listed` estimated rows).
fn find_join_filters(
    node: &Arc<dyn ExecutionPlan>,
    above: &[Above],
    listed: usize,
    joins: &mut HashSet<u64>,
    carried: &mut CarriedFilters,
) {
    if batch_parquet_scan(node).is_some() {
        let through = || above.iter().filter(|filter| filter.through);
        let ids = through().map(|filter| filter.id).collect();
        let awaited = through()
            .filter(|filter| filter.listed)
            .map(|filter| filter.id)
            .collect();
        carried.insert(
            address(node),
            Carried {
                ids: Arc::new(ids),
                awaited: Arc::new(awaited),
            },
        );
        return;
    }
    let mut below = above.to_vec();
    if let Some(join) = node.downcast_ref::<HashJoinExec>() {
        for filter in &mut below {
            filter.through = true;
        }
        let lists = *join.partition_mode() == PartitionMode::CollectLeft
            && estimated_rows(join.left()).is_some_and(|rows| rows <= listed);
        let made = node.dynamic_expressions_produced();
        let ids: Vec<u64> = made
            .iter()
            .filter_map(|filter| filter.expression_id())
            .collect();
        joins.extend(&ids);
        below.extend(ids.into_iter().map(|id| Above {
            id,
            through: false,
            listed: lists,
        }));
    }
    for child in node.children() {
        find_join_filters(child, &below, listed, joins, carried);
    }
}

/// A join filter on the way down to the scans, as [`find_join_filters`]
/// sees it.
#[derive(Debug, Clone, Copy)]
struct Above {
    id: u64,
    /// Whether a join lies between the filter's join and the node.
    through: bool,
    /// Whether the filter's join hands down a key list.
    listed: bool,
}

/// A plan node's identity within one plan.
fn address(node: &Arc<dyn ExecutionPlan>) -> usize {
    Arc::as_ptr(node).cast::<()>() as usize
}

/// A Parquet scan that decides, when first polled, whether a join filter it
/// was handed is selective enough to evaluate while decoding.
#[derive(Debug, Clone)]
pub(super) struct JoinFilteredScan {
    /// The scan as planned: batches decoded whole, dynamic filters used for
    /// pruning only.
    scan: Arc<dyn ExecutionPlan>,
    /// The identities of the plan's join filters.
    join_ids: Arc<HashSet<u64>>,
    /// Those of them that reach the scan through another join.
    carried: Carried,
    /// The scan chosen at the first poll of any partition. Every partition
    /// runs that one scan: the partitions of a scan share its files out
    /// among themselves, so each must be a partition of the same one.
    chosen: Arc<OnceLock<Arc<dyn ExecutionPlan>>>,
}

impl JoinFilteredScan {
    /// `node` wrapped, if it is a Parquet scan decoding whole batches whose
    /// predicate holds at least one of the join filters `join_ids` names.
    fn over(
        node: &Arc<dyn ExecutionPlan>,
        join_ids: &Arc<HashSet<u64>>,
        carried: Carried,
    ) -> Option<Self> {
        let (_, source) = batch_parquet_scan(node)?;
        (!conjuncts(source, join_ids).joins.is_empty()).then(|| Self {
            scan: Arc::clone(node),
            join_ids: Arc::clone(join_ids),
            carried,
            chosen: Arc::default(),
        })
    }

    /// The smallest and largest value of an integer column the scan reads,
    /// from its statistics.
    fn domain(&self, column: &Column) -> Option<(i128, i128)> {
        let statistics = StatisticsContext::new()
            .compute(self.scan.as_ref(), &StatisticsArgs::new())
            .ok()?;
        let index = self.scan.schema().index_of(column.name()).ok()?;
        let column = statistics.column_statistics.get(index)?;
        Some((
            integer(column.min_value.get_value()?)?,
            integer(column.max_value.get_value()?)?,
        ))
    }

    /// Waits, for at most [`CARRIED_WAIT`], until the join filters the scan
    /// awaits are final. Only the first poll waits: the choice is made once
    /// for every partition.
    async fn wait_for_carried(&self) {
        if self.chosen.get().is_some() || self.carried.awaited.is_empty() {
            return;
        }
        let Some((_, source)) = batch_parquet_scan(&self.scan) else {
            return;
        };
        let joins = conjuncts(source, &self.join_ids).joins;
        let waits = joins
            .iter()
            .filter(|filter| {
                filter
                    .expression_id()
                    .is_some_and(|id| self.carried.awaited.contains(&id))
            })
            .filter_map(|filter| filter.downcast_ref::<DynamicFilterPhysicalExpr>())
            .map(DynamicFilterPhysicalExpr::wait_complete);
        // Not final in time: the scan goes without them.
        let _ = tokio::time::timeout(CARRIED_WAIT, futures::future::join_all(waits)).await;
    }

    /// The scan every partition runs, chosen at the first call.
    fn chosen(&self) -> Result<Arc<dyn ExecutionPlan>> {
        if let Some(scan) = self.chosen.get() {
            return Ok(Arc::clone(scan));
        }
        let scan = self.choose()?;
        Ok(Arc::clone(self.chosen.get_or_init(|| scan)))
    }

    /// The scan to run now: with the sparse key lists of the join filters
    /// that are final evaluated row by row, or as planned when none is.
    fn choose(&self) -> Result<Arc<dyn ExecutionPlan>> {
        let Some((config, source)) = batch_parquet_scan(&self.scan) else {
            return Ok(Arc::clone(&self.scan));
        };
        let Conjuncts { joins, fixed } = conjuncts(source, &self.join_ids);
        let mut selective = Vec::new();
        let joins = joins
            .iter()
            .filter_map(|filter| filter.downcast_ref::<DynamicFilterPhysicalExpr>());
        for filter in joins {
            // A filter not final yet is left to prune what it can.
            if filter.wait_complete().now_or_never().is_none() {
                continue;
            }
            let bound = match filter.expression_id() {
                Some(id) if self.carried.ids.contains(&id) => CARRIED_KEYS,
                _ => SPARSE_KEYS,
            };
            let domain = |column: &Column| self.domain(column);
            if let Some(expr) = sparse_keys(&filter.current()?, &domain, bound) {
                selective.push(expr);
            }
        }
        if selective.is_empty() {
            return Ok(Arc::clone(&self.scan));
        }
        // The key lists first: the scan's own conjuncts are then evaluated
        // only on the rows they keep. Other dynamic filters are left out.
        let predicate = conjunction(selective.into_iter().chain(fixed));
        let source = source
            .clone()
            .with_pushdown_filters(true)
            .with_predicate(predicate);
        let config = FileScanConfigBuilder::from(config.clone())
            .with_source(Arc::new(source))
            .build();
        Ok(DataSourceExec::from_data_source(config))
    }
}

/// The configuration and source of `node`, if it is a Parquet scan that
/// decodes whole batches.
fn batch_parquet_scan(node: &Arc<dyn ExecutionPlan>) -> Option<(&FileScanConfig, &ParquetSource)> {
    let exec = node.downcast_ref::<DataSourceExec>()?;
    let config = exec.data_source().downcast_ref::<FileScanConfig>()?;
    let source = config.file_source().downcast_ref::<ParquetSource>()?;
    (!source.table_parquet_options().global.pushdown_filters).then_some((config, source))
}

/// A scan predicate's conjuncts, sorted (a TopK's or an aggregate's
/// dynamic filter is in neither list).
#[derive(Default)]
struct Conjuncts {
    /// The join filters ([`DynamicFilterPhysicalExpr`]s).
    joins: Vec<Arc<dyn PhysicalExpr>>,
    /// The conjuncts that are not dynamic filters.
    fixed: Vec<Arc<dyn PhysicalExpr>>,
}

/// The conjuncts of `source`'s predicate, with the join filters `join_ids`
/// names.
fn conjuncts(source: &ParquetSource, join_ids: &HashSet<u64>) -> Conjuncts {
    let mut conjuncts = Conjuncts::default();
    let Some(predicate) = source.filter() else {
        return conjuncts;
    };
    for conjunct in split_conjunction(&predicate) {
        if conjunct
            .downcast_ref::<DynamicFilterPhysicalExpr>()
            .is_none()
        {
            conjuncts.fixed.push(Arc::clone(conjunct));
        } else if conjunct
            .expression_id()
            .is_some_and(|id| join_ids.contains(&id))
        {
            conjuncts.joins.push(Arc::clone(conjunct));
        }
    }
    conjuncts
}

impl DisplayAs for JoinFilteredScan {
    fn fmt_as(&self, _format: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // After a run, EXPLAIN ANALYZE says which scan ran.
        match self.chosen.get() {
            None => write!(f, "JoinFilteredScan"),
            Some(chosen) if Arc::ptr_eq(chosen, &self.scan) => {
                write!(
                    f,
                    "JoinFilteredScan: join keys checked while decoding=false"
                )
            }
            Some(_) => write!(f, "JoinFilteredScan: join keys checked while decoding=true"),
        }
    }
}

impl ExecutionPlan for JoinFilteredScan {
    fn name(&self) -> &str {
        "JoinFilteredScan"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.scan.properties()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.scan]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return Err(DataFusionError::Internal(
                "JoinFilteredScan takes exactly one input".into(),
            ));
        }
        let child = children.swap_remove(0);
        Ok(
            match Self::over(&child, &self.join_ids, self.carried.clone()) {
                Some(scan) => Arc::new(scan),
                None => child,
            },
        )
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        // Nothing is decided before the first poll. A hash join polls its
        // probe side once its build side is in and its filter final; a scan
        // polled sooner (on the build side of another join, read ahead while
        // that join's own build side is read) goes without that join's
        // filter: waiting for it would keep the two from being read at once.
        // Only the key lists of small build sides of joins higher up are
        // waited for, briefly.
        let this = self.clone();
        let chosen = futures::stream::once(async move {
            this.wait_for_carried().await;
            this.chosen()?.execute(partition, context)
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.scan.schema(),
            chosen.try_flatten(),
        )))
    }
}

/// The part of a join filter worth evaluating row by row: its key list when
/// that is sparse (at most `bound` of the integers; see [`SPARSE_KEYS`] and
/// [`CARRIED_KEYS`]) within the range of the probe
/// column's values (`domain`, from the scan's statistics, where known) and
/// its own. A partitioned join's filter routes
/// each key to its partition's list (`CASE hash(key) % n WHEN i THEN ...`);
/// any key of any partition's list may pass, so their union is a filter too,
/// and one a scan can prune with.
fn sparse_keys(
    filter: &Arc<dyn PhysicalExpr>,
    domain: &dyn Fn(&Column) -> Option<(i128, i128)>,
    bound: f64,
) -> Option<Arc<dyn PhysicalExpr>> {
    // A join that needs the probe rows with a null key says so: `key IS
    // NULL OR filter`.
    if let Some(or) = filter.downcast_ref::<BinaryExpr>()
        && *or.op() == Operator::Or
        && null_checks(or.left())
    {
        let keys = sparse_keys(or.right(), domain, bound)?;
        return Some(Arc::new(BinaryExpr::new(
            Arc::clone(or.left()),
            Operator::Or,
            keys,
        )));
    }
    let branches: Vec<&Arc<dyn PhysicalExpr>> = match filter.downcast_ref::<CaseExpr>() {
        Some(case) => {
            if case.expr().is_none() || !is_false(case.else_expr()?) {
                return None;
            }
            case.when_then_expr()
                .iter()
                .map(|(_, then)| then)
                .filter(|then| !is_false(then))
                .collect()
        }
        None => vec![filter],
    };
    let mut keys = KeySpread::default();
    let mut lists = Vec::with_capacity(branches.len());
    for branch in branches {
        let list = split_conjunction(branch)
            .into_iter()
            .find_map(|conjunct| conjunct.downcast_ref::<InListExpr>())?;
        let column = keyed_column(list)?;
        if list.negated() {
            return None;
        }
        keys.add(list)?;
        if let Some((min, max)) = domain(column) {
            keys.widen(min, max);
        }
        lists.push(with_key_bitmap(branch));
    }
    if !keys.sparse(bound) {
        return None;
    }
    lists
        .into_iter()
        .reduce(|left, right| Arc::new(BinaryExpr::new(left, Operator::Or, right)))
}

/// `branch` with its key list answered from a bitmap where one can be (see
/// [`key_bitmap`]).
fn with_key_bitmap(branch: &Arc<dyn PhysicalExpr>) -> Arc<dyn PhysicalExpr> {
    conjunction(
        split_conjunction(branch)
            .into_iter()
            .map(|conjunct| key_bitmap(conjunct).unwrap_or_else(|| Arc::clone(conjunct))),
    )
}

/// The column whose values a key list looks up: the list's own, or for a
/// list of composite keys (`struct(a, b) IN (...)`, a join on two columns)
/// the first of them, whose spread then stands for the keys'.
fn keyed_column(list: &InListExpr) -> Option<&Column> {
    let expr = list.expr();
    if let Some(column) = expr.downcast_ref::<Column>() {
        return Some(column);
    }
    let function = expr.downcast_ref::<ScalarFunctionExpr>()?;
    if function.name() != "struct" {
        return None;
    }
    function.args().first()?.downcast_ref::<Column>()
}

/// `key IS NULL`, or several of them joined by OR.
fn null_checks(expr: &Arc<dyn PhysicalExpr>) -> bool {
    if expr.downcast_ref::<IsNullExpr>().is_some() {
        return true;
    }
    expr.downcast_ref::<BinaryExpr>().is_some_and(|or| {
        *or.op() == Operator::Or && null_checks(or.left()) && null_checks(or.right())
    })
}

fn is_false(expr: &Arc<dyn PhysicalExpr>) -> bool {
    expr.downcast_ref::<Literal>()
        .is_some_and(|literal| literal.value() == &ScalarValue::Boolean(Some(false)))
}

/// The distinct integer keys of a filter and the range they span.
#[derive(Default)]
struct KeySpread {
    keys: HashSet<i128>,
    min: Option<i128>,
    max: Option<i128>,
}

impl KeySpread {
    /// Adds a list's keys; `None` if one is not an integer.
    fn add(&mut self, list: &InListExpr) -> Option<()> {
        for item in list.list() {
            let key = match item.downcast_ref::<Literal>()?.value() {
                // A composite key counts by its first field (see
                // `keyed_column`).
                ScalarValue::Struct(fields) => {
                    integer(&ScalarValue::try_from_array(fields.columns().first()?, 0).ok()?)?
                }
                value => integer(value)?,
            };
            self.keys.insert(key);
            self.min = Some(self.min.map_or(key, |min| min.min(key)));
            self.max = Some(self.max.map_or(key, |max| max.max(key)));
        }
        Some(())
    }

    /// Takes in the range of the values the keys are looked up for.
    fn widen(&mut self, min: i128, max: i128) {
        self.min = Some(self.min.map_or(min, |own| own.min(min)));
        self.max = Some(self.max.map_or(max, |own| own.max(max)));
    }

    /// Whether the keys are at most `bound` of the integers in their range.
    fn sparse(&self, bound: f64) -> bool {
        match (self.min, self.max) {
            (Some(min), Some(max)) => {
                let range = (max - min + 1) as f64;
                (self.keys.len() as f64) <= bound * range
            }
            // No key at all: the filter passes nothing.
            _ => self.keys.is_empty(),
        }
    }
}

fn integer(value: &ScalarValue) -> Option<i128> {
    Some(match value {
        ScalarValue::Int8(Some(v)) => i128::from(*v),
        ScalarValue::Int16(Some(v)) => i128::from(*v),
        ScalarValue::Int32(Some(v)) => i128::from(*v),
        ScalarValue::Int64(Some(v)) => i128::from(*v),
        ScalarValue::UInt8(Some(v)) => i128::from(*v),
        ScalarValue::UInt16(Some(v)) => i128::from(*v),
        ScalarValue::UInt32(Some(v)) => i128::from(*v),
        ScalarValue::UInt64(Some(v)) => i128::from(*v),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use arrow::array::AsArray;
    use arrow::datatypes::Int64Type;
    use datafusion::execution::SessionStateBuilder;
    use datafusion::prelude::{ParquetReadOptions, SessionContext};

    use super::*;
    use crate::query::session::engine_config;
    use crate::query::testing::{plan_and_run, write_int64_columns};

    /// Rows in the fact file.
    const FACTS: i64 = 40_000;
    /// The fact file's keys are 0..KEYS, scattered, each five times.
    const KEYS: i64 = 8_000;

    /// Writes `keys` and, beside each, its value (three times the key).
    fn write(path: &std::path::Path, keys: impl Iterator<Item = i64> + Clone) {
        write_columns(
            path,
            &[
                ("key", keys.clone().collect()),
                ("value", keys.map(|key| key * 3).collect()),
            ],
        );
    }

    /// Writes `columns` (name, values) as one Parquet file, in row groups of
    /// 4096 rows.
    fn write_columns(path: &std::path::Path, columns: &[(&str, Vec<i64>)]) {
        write_int64_columns(path, columns, Some(4096));
    }

    /// Plans and runs `sql`, which answers one row of two integers: the plan
    /// as it ran, and the row.
    async fn run_pair(ctx: &SessionContext, sql: &str) -> (Arc<dyn ExecutionPlan>, (i64, i64)) {
        let (plan, batches) = plan_and_run(ctx, sql).await;
        let column = |index: usize| {
            batches[0]
                .column(index)
                .as_primitive::<Int64Type>()
                .value(0)
        };
        (plan, (column(0), column(1)))
    }

    /// A session with meshgate's settings and this rule, two partitions
    /// (the fact file is split between them), joins built on one partition
    /// or on both.
    async fn session(dir: &std::path::Path, collect_left: bool) -> SessionContext {
        let mut config = engine_config().with_target_partitions(2);
        let options = config.options_mut();
        options.optimizer.repartition_file_min_size = 1;
        if !collect_left {
            options.optimizer.hash_join_single_partition_threshold = 0;
            options.optimizer.hash_join_single_partition_threshold_rows = 0;
        }
        let state = SessionStateBuilder::new()
            .with_config(config)
            .with_default_features()
            .with_physical_optimizer_rule(Arc::new(SelectiveJoinFilters))
            .build();
        let ctx = SessionContext::new_with_state(state);
        let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
        for table in ["facts", "sparse", "narrow", "dense"] {
            ctx.register_parquet(
                table,
                path(&format!("{table}.parquet")),
                ParquetReadOptions::new(),
            )
            .await
            .expect("register");
        }
        ctx
    }

    /// Count and sum of the facts whose key `dimension` holds, and whether
    /// the fact scan evaluated the join's filter while decoding.
    async fn join(ctx: &SessionContext, dimension: &str) -> (i64, i64, bool) {
        let sql = format!(
            "SELECT count(*), sum(f.value) FROM facts f JOIN {dimension} d ON f.key = d.key"
        );
        let (plan, (count, sum)) = run_pair(ctx, &sql).await;
        let row_level = checked_while_decoding(&plan);
        assert_eq!(row_level.len(), 1, "one fact scan, wrapped: {row_level:?}");
        (count, sum, row_level[0])
    }

    /// For each wrapped scan of `plan`, as it ran, whether it evaluated a
    /// join's filter while decoding.
    fn checked_while_decoding(plan: &Arc<dyn ExecutionPlan>) -> Vec<bool> {
        let mut row_level = Vec::new();
        plan.apply(|node| {
            if let Some(scan) = node.downcast_ref::<JoinFilteredScan>() {
                let chosen = scan.chosen.get().expect("the scan ran");
                row_level.push(!Arc::ptr_eq(chosen, &scan.scan));
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .expect("walk");
        row_level
    }

    /// The keys of the three dimension tables.
    struct Dimensions {
        sparse: Vec<i64>,
        narrow: Vec<i64>,
        dense: Vec<i64>,
    }

    /// Writes the fact file and the three dimension files into `dir`.
    fn write_tables(dir: &std::path::Path) -> Dimensions {
        // Keys scattered so that every row group spans nearly all of them.
        write(
            &dir.join("facts.parquet"),
            (0..FACTS).map(|i| i * 7919 % KEYS),
        );
        let dimensions = Dimensions {
            // 20 keys: 0.25% of the facts' keys.
            sparse: (0..20).map(|i| i * 397 + 7).collect(),
            // 10 keys in a row: no gap between them, but 0.125% of the facts'.
            narrow: (100..110).collect(),
            // 2000 keys in a row: a quarter of the facts' keys.
            dense: (3000..5000).collect(),
        };
        write(
            &dir.join("sparse.parquet"),
            dimensions.sparse.iter().copied(),
        );
        write(
            &dir.join("narrow.parquet"),
            dimensions.narrow.iter().copied(),
        );
        write(&dir.join("dense.parquet"), dimensions.dense.iter().copied());
        dimensions
    }

    #[tokio::test]
    async fn sparse_key_lists_are_checked_while_decoding_and_dense_ones_are_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let Dimensions {
            sparse,
            narrow,
            dense,
        } = write_tables(dir.path());
        for collect_left in [true, false] {
            let ctx = session(dir.path(), collect_left).await;
            let per_key = FACTS / KEYS;
            let expected = |keys: Vec<i64>| {
                let sum = keys.iter().map(|key| key * 3 * per_key).sum::<i64>();
                (keys.len() as i64 * per_key, sum)
            };

            for (dimension, keys, checked) in [
                ("sparse", sparse.clone(), true),
                ("narrow", narrow.clone(), true),
                ("dense", dense.clone(), false),
            ] {
                let (count, sum, row_level) = join(&ctx, dimension).await;
                let case = format!("{dimension}, collect_left {collect_left}");
                assert_eq!((count, sum), expected(keys), "{case}");
                assert_eq!(row_level, checked, "{case}");
            }
        }
    }

    /// A join on two columns hands down a list of composite keys; its
    /// first column's keys decide whether it is sparse.
    #[tokio::test]
    async fn a_sparse_list_of_composite_keys_is_checked_while_decoding() {
        let dir = tempfile::tempdir().expect("tempdir");
        let Dimensions { sparse, dense, .. } = write_tables(dir.path());
        let per_key = FACTS / KEYS;
        for collect_left in [true, false] {
            let ctx = session(dir.path(), collect_left).await;
            for (dimension, keys, checked) in [("sparse", &sparse, true), ("dense", &dense, false)]
            {
                let sql = format!(
                    "SELECT count(*), sum(f.value) FROM facts f JOIN {dimension} d \
                     ON f.key = d.key AND f.value = d.value"
                );
                let (plan, pair) = run_pair(&ctx, &sql).await;
                let case = format!("{dimension}, collect_left {collect_left}");
                let sum = keys.iter().map(|key| key * 3 * per_key).sum::<i64>();
                assert_eq!(pair, (keys.len() as i64 * per_key, sum), "{case}");
                assert_eq!(checked_while_decoding(&plan), vec![checked], "{case}");
            }
        }
    }

    #[tokio::test]
    async fn a_key_list_that_reaches_its_scan_through_another_join_is_checked_when_denser() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_tables(dir.path());
        // Each of the facts' keys has one of 40 tags; 2 of them are chosen:
        // 5% of the tags, and of the keys.
        let tag = |key: i64| key * 13 % 40;
        write_columns(
            &dir.path().join("tags.parquet"),
            &[
                ("key", (0..KEYS).collect()),
                ("tag", (0..KEYS).map(tag).collect()),
            ],
        );
        write_columns(&dir.path().join("chosen.parquet"), &[("tag", vec![3, 17])]);
        let ctx = session(dir.path(), true).await;
        for table in ["tags", "chosen"] {
            let path = dir.path().join(format!("{table}.parquet"));
            ctx.register_parquet(table, path.to_string_lossy(), ParquetReadOptions::new())
                .await
                .expect("register");
        }
        let sql = "SELECT count(*), sum(f.value) FROM facts f \
                   JOIN tags t ON f.key = t.key JOIN chosen c ON t.tag = c.tag";
        let (plan, answer) = run_pair(&ctx, sql).await;
        let picked: Vec<i64> = (0..FACTS)
            .map(|i| i * 7919 % KEYS)
            .filter(|&key| [3, 17].contains(&tag(key)))
            .collect();
        assert_eq!(
            answer,
            (picked.len() as i64, picked.iter().map(|key| key * 3).sum())
        );
        // The chosen tags reach the tags scan through the join of tags with
        // the facts: checked there. The 400 keys of that join reach the
        // facts scan directly: at 5%, too dense to check.
        let mut checked = Vec::new();
        plan.apply(|node| {
            if let Some(scan) = node.downcast_ref::<JoinFilteredScan>() {
                let file = datafusion::physical_plan::displayable(scan.scan.as_ref())
                    .one_line()
                    .to_string();
                let chosen = scan.chosen.get().expect("the scan ran");
                let table = ["tags", "facts"]
                    .into_iter()
                    .find(|table| file.contains(&format!("{table}.parquet")))
                    .unwrap_or("other");
                checked.push((table, !Arc::ptr_eq(chosen, &scan.scan)));
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .expect("walk");
        checked.sort_unstable();
        assert_eq!(
            checked,
            vec![("facts", false), ("tags", true)],
            "{}",
            datafusion::physical_plan::displayable(plan.as_ref()).indent(true)
        );
    }

    #[tokio::test]
    async fn answers_are_the_same_with_the_choice_and_without() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_tables(dir.path());
        let queries = [
            // A TopK's dynamic filter beside the join's.
            "SELECT f.key, f.value FROM facts f JOIN sparse s ON f.key = s.key \
             ORDER BY f.value DESC, f.key LIMIT 7",
            // Joins over joins: filters on both sides of a join.
            "SELECT count(*), sum(f.value), min(n.key) FROM facts f \
             JOIN dense d ON f.key = d.key JOIN narrow n ON d.key = n.key + 3000",
            "SELECT f.key, count(*) FROM facts f WHERE f.key IN (SELECT key FROM sparse) \
             AND f.key NOT IN (SELECT key + 7 FROM narrow) GROUP BY f.key ORDER BY f.key",
        ];
        for collect_left in [true, false] {
            let with = session(dir.path(), collect_left).await;
            let without =
                SessionContext::new_with_config(engine_config().with_target_partitions(2));
            for table in ["facts", "sparse", "narrow", "dense"] {
                let path = dir.path().join(format!("{table}.parquet"));
                without
                    .register_parquet(table, path.to_string_lossy(), ParquetReadOptions::new())
                    .await
                    .expect("register");
            }
            for sql in queries {
                let answer = |ctx: SessionContext| async move {
                    let (_, batches) = plan_and_run(&ctx, sql).await;
                    arrow::util::pretty::pretty_format_batches(&batches)
                        .expect("format")
                        .to_string()
                };
                let expected = answer(without.clone()).await;
                assert!(
                    expected.lines().count() > 4,
                    "{sql} returns rows:\n{expected}"
                );
                assert_eq!(
                    answer(with.clone()).await,
                    expected,
                    "{sql}, collect_left {collect_left}"
                );
            }
        }
    }
}
