//! Sessions: one DataFusion session per caller and request, holding catalog
//! `mesh` as that caller sees it. Settings are fixed here and cannot be
//! changed from SQL.

use std::num::NonZeroUsize;
use std::sync::Arc;

use datafusion::catalog::MemoryCatalogProviderList;
use datafusion::execution::SessionState;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::memory_pool::{
    FairSpillPool, MemoryConsumer, MemoryLimit, MemoryPool, MemoryReservation, TrackConsumersPool,
};
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_optimizer::optimizer::PhysicalOptimizer;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::auth::CallerIdentity;
use crate::catalog::{CATALOG_NAME, Mesh, MeshCatalog, ReadLog, SerialHotScans};
use crate::config::Limits;
use crate::metrics::Metrics;
use crate::sources::{ForwardedToken, SourcePlanner, SourcePushdown};

use super::bounded;
use super::checked_constants::CheckedConstants;
use super::checked_sum;
use super::join_filters::SelectiveJoinFilters;
use super::join_sides::RowCountJoinSides;
use super::kernels::ExpressionKernels;
use super::recursion::{BoundedRecursion, RecursionLimit};
use super::selectivity::StringFilterSelectivity;
use super::shared_subplans::SharedSubplans;
use super::window_arithmetic::WindowArithmeticBelow;
use super::yielding::YieldingJoins;

/// The schema unqualified names resolve in; it holds no products, so every
/// product is named `domain.product` (or `mesh.domain.product`).
const DEFAULT_SCHEMA: &str = "public";

/// Session state with meshgate's settings and no catalog.
pub(crate) fn base_session_state(runtime: Arc<RuntimeEnv>) -> SessionState {
    session_state(runtime, None)
}

/// The engine settings meshgate plans and runs every query with (the
/// end-to-end benchmark runs embedded DataFusion with the same ones).
pub fn engine_config() -> SessionConfig {
    let mut config = SessionConfig::new();
    let options = config.options_mut();
    // Twice as many partitions as cores: while one partition's task waits
    // (on a read, or on a full repartition channel), another has work for
    // the core. On 2 cores, 4 partitions took 0.95 of the TPC-H time of 2.
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    options.execution.target_partitions = 2 * cores;
    // Plain Utf8/Binary: what Flight SQL clients read, with no conversion
    // cost. (A file whose own Arrow schema records views, as tpchgen's
    // files do, is still read as views; they are converted for the wire in
    // each partition of the plan, see `wire::converted_in_partitions`.)
    options.execution.parquet.schema_force_view_types = false;
    options.sql_parser.map_string_types_to_utf8view = false;
    // Filters run above the Parquet scan: evaluating them while decoding
    // costs 10-15% of TPC-H time on these files. Row groups and pages are
    // still pruned by their statistics and the page index.
    options.execution.parquet.pushdown_filters = false;
    // Build sides up to 16 MB are joined without repartitioning. A side
    // behind a policy barrier is judged by its coarse size (a power of two,
    // within √2 of the real one): the margin keeps the TPC-H build sides that
    // fit without policies (up to 9.6 MB) fitting with them.
    options.optimizer.hash_join_single_partition_threshold = 16 * 1024 * 1024;
    // A build side of up to 4096 distinct keys hands the probe side's scan
    // its keys as a list (rather than its hash table), which the scan can
    // judge and, when sparse, evaluate while decoding (`join_filters`).
    options
        .optimizer
        .hash_join_inlist_pushdown_max_distinct_values = 4096;
    options.optimizer.hash_join_inlist_pushdown_max_size = 1024 * 1024;
    config
}

/// Session state with meshgate's settings, sized for a per-query memory limit.
fn session_state(runtime: Arc<RuntimeEnv>, memory_limit: Option<u64>) -> SessionState {
    let mut config = engine_config()
        .with_information_schema(false)
        .with_create_default_catalog_and_schema(false)
        .with_default_catalog_and_schema(CATALOG_NAME, DEFAULT_SCHEMA);
    // Each partition's sort reserves memory to merge its spilled runs;
    // under a small memory limit, all of them together reserve a quarter
    // of it rather than 10 MB each (which could take the whole limit and
    // fail the sort instead of spilling it).
    if let Some(limit) = memory_limit {
        let partitions = config.options().execution.target_partitions.max(1) as u64;
        let share = usize::try_from(limit / 4 / partitions).unwrap_or(usize::MAX);
        let reservation = &mut config.options_mut().execution.sort_spill_reservation_bytes;
        *reservation = (*reservation).min(share);
    }
    let mut state = SessionStateBuilder::new()
        .with_config(config)
        .with_runtime_env(runtime)
        .with_default_features()
        .with_analyzer_rule(Arc::new(CheckedConstants))
        .with_optimizer_rule(Arc::new(SourcePushdown))
        .with_optimizer_rule(Arc::new(WindowArithmeticBelow))
        .with_physical_optimizer_rules(physical_optimizer_rules())
        .with_query_planner(Arc::new(SourcePlanner))
        .build();
    bounded::register(&mut state).expect("a bounded function registers under its own names");
    checked_sum::register(&mut state).expect("sum registers under its own name");
    state
}

/// DataFusion's physical optimizer rules, with integer arithmetic checked
/// for overflow (first, before projections move into scans), filters on strings given a
/// selectivity before joins are chosen, partitioned joins built on the side
/// with far fewer rows once they are, and join filters chosen at run time
/// once the joins have pushed them down, aggregates that occur twice
/// computed once, faster kernels for decimal arithmetic and
/// conjunctions, lookups read from decoded row groups run in one
/// partition, recursive queries stopped after a number of iterations, and
/// joins that yield their thread as they emit.
pub(super) fn physical_optimizer_rules() -> Vec<Arc<dyn PhysicalOptimizerRule + Send + Sync>> {
    let mut rules = PhysicalOptimizer::new().rules;
    rules.insert(0, Arc::new(ExpressionKernels::CHECKED));
    let join_selection = rules
        .iter()
        .position(|rule| rule.name() == "join_selection")
        .unwrap_or(0);
    rules.insert(join_selection + 1, Arc::new(RowCountJoinSides));
    rules.insert(join_selection, Arc::new(StringFilterSelectivity));
    let dynamic_filters = rules
        .iter()
        .position(|rule| rule.name() == "FilterPushdown(Post)")
        .unwrap_or(rules.len());
    rules.insert(dynamic_filters, Arc::new(SharedSubplans));
    rules.push(Arc::new(SelectiveJoinFilters));
    rules.push(Arc::new(crate::sources::RemoteJoinKeys));
    rules.push(Arc::new(ExpressionKernels::FASTER));
    rules.push(Arc::new(SerialHotScans));
    rules.push(Arc::new(BoundedRecursion));
    rules.push(Arc::new(YieldingJoins));
    rules
}

/// A memory pool of `limit` bytes (the gateway's, or a query's own):
/// operators that can spill share it equally and spill under pressure; the
/// others fail their query with a resources-exhausted error naming the
/// largest consumers.
pub(crate) fn spilling_pool(limit: u64) -> Arc<dyn MemoryPool> {
    Arc::new(TrackConsumersPool::new(
        FairSpillPool::new(usize::try_from(limit).unwrap_or(usize::MAX)),
        NonZeroUsize::new(3).expect("3 is not zero"),
    ))
}

/// The runtime of one query: the mesh's object stores, caches and spill
/// directory, and the gateway's memory pool, within a pool of the query's
/// own when a per-query limit is set. What the pool holds is counted in
/// the gateway's metrics.
pub(crate) fn query_runtime(
    mesh: &Arc<RuntimeEnv>,
    gateway: &Arc<dyn MemoryPool>,
    memory_limit: Option<u64>,
    metrics: &Arc<Metrics>,
) -> Arc<RuntimeEnv> {
    let pool: Arc<dyn MemoryPool> = match memory_limit {
        Some(limit) => Arc::new(WithinGateway {
            query: spilling_pool(limit),
            gateway: Arc::clone(gateway),
        }),
        None => Arc::clone(gateway),
    };
    Arc::new(RuntimeEnv {
        memory_pool: Arc::new(CountedPool {
            inner: pool,
            metrics: Arc::clone(metrics),
        }),
        disk_manager: Arc::clone(&mesh.disk_manager),
        cache_manager: Arc::clone(&mesh.cache_manager),
        object_store_registry: Arc::clone(&mesh.object_store_registry),
    })
}

/// A query's own pool, whose memory is also taken from the gateway's: a
/// reservation grows only if both pools allow it.
#[derive(Debug)]
struct WithinGateway {
    query: Arc<dyn MemoryPool>,
    gateway: Arc<dyn MemoryPool>,
}

impl std::fmt::Display for WithinGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} within {}", self.query, self.gateway)
    }
}

impl MemoryPool for WithinGateway {
    fn name(&self) -> &str {
        self.query.name()
    }

    fn register(&self, consumer: &MemoryConsumer) {
        self.query.register(consumer);
        self.gateway.register(consumer);
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        self.query.unregister(consumer);
        self.gateway.unregister(consumer);
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        self.query.grow(reservation, additional);
        self.gateway.grow(reservation, additional);
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        self.query.shrink(reservation, shrink);
        self.gateway.shrink(reservation, shrink);
    }

    fn try_grow(
        &self,
        reservation: &MemoryReservation,
        additional: usize,
    ) -> datafusion::error::Result<()> {
        self.query.try_grow(reservation, additional)?;
        if let Err(error) = self.gateway.try_grow(reservation, additional) {
            self.query.shrink(reservation, additional);
            return Err(error);
        }
        Ok(())
    }

    fn reserved(&self) -> usize {
        self.query.reserved()
    }

    fn memory_limit(&self) -> MemoryLimit {
        self.query.memory_limit()
    }
}

/// A memory pool that reports what it holds to the gateway's metrics.
#[derive(Debug)]
struct CountedPool {
    inner: Arc<dyn MemoryPool>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Display for CountedPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

fn signed(bytes: usize) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

impl MemoryPool for CountedPool {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn register(&self, consumer: &MemoryConsumer) {
        self.inner.register(consumer);
    }

    fn unregister(&self, consumer: &MemoryConsumer) {
        self.inner.unregister(consumer);
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        self.inner.grow(reservation, additional);
        self.metrics.memory_changed(signed(additional));
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        self.inner.shrink(reservation, shrink);
        self.metrics.memory_changed(-signed(shrink));
    }

    fn try_grow(
        &self,
        reservation: &MemoryReservation,
        additional: usize,
    ) -> datafusion::error::Result<()> {
        self.inner.try_grow(reservation, additional)?;
        self.metrics.memory_changed(signed(additional));
        Ok(())
    }

    fn reserved(&self) -> usize {
        self.inner.reserved()
    }

    fn memory_limit(&self) -> MemoryLimit {
        self.inner.memory_limit()
    }
}

/// The state every caller's session starts from: meshgate's settings and
/// functions over the mesh's runtime, with no catalog. Building one
/// registers every function, so it is built once per published mesh and
/// cloned per request.
pub(crate) fn template_state(mesh: &Mesh, limits: &Limits, metrics: &Arc<Metrics>) -> SessionState {
    // The least a query may be held to: its own limit or the gateway's.
    let memory_limit = limits
        .memory_per_query
        .map_or(limits.gateway_memory, |own| own.min(limits.gateway_memory));
    let mut state = session_state(mesh.runtime(), Some(memory_limit));
    // Sources report their latency here.
    state.config_mut().set_extension(Arc::clone(metrics));
    state
        .config_mut()
        .set_extension(Arc::new(RecursionLimit(limits.max_recursion_depth)));
    state
}

/// A session in which `mesh` resolves products for one caller, and the
/// catalog it resolves them through. `template` comes from
/// [`template_state`] for the same mesh; `token` is the caller's, for
/// sources that forward it.
pub(crate) fn caller_context(
    template: &SessionState,
    mesh: &Arc<Mesh>,
    caller: Arc<CallerIdentity>,
    token: Option<ForwardedToken>,
    reads: Arc<parking_lot::Mutex<ReadLog>>,
) -> (SessionContext, Arc<MeshCatalog>) {
    let mut state = template.clone();
    // The clone shares the template's catalog list: this session's catalog
    // goes into a list of its own.
    state.register_catalog_list(Arc::new(MemoryCatalogProviderList::new()));
    if let Some(token) = token {
        state.config_mut().set_extension(Arc::new(token));
    }
    for function in crate::policy::caller_functions_for(&caller) {
        // Registering replaces; there is nothing it could fail on.
        let _ =
            datafusion::execution::FunctionRegistry::register_udf(&mut state, Arc::new(function));
    }
    let context = SessionContext::new_with_state(state);
    let catalog = Arc::new(MeshCatalog::new(
        Arc::clone(mesh),
        caller,
        context.state_weak_ref(),
        reads,
    ));
    context.register_catalog(CATALOG_NAME, Arc::clone(&catalog) as _);
    (context, catalog)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorts_reserve_a_quarter_of_a_small_memory_limit_between_them() {
        let runtime = Arc::new(RuntimeEnv::default());
        let reserved = |limit| {
            let state = session_state(Arc::clone(&runtime), limit);
            let options = &state.config().options().execution;
            (
                options.sort_spill_reservation_bytes,
                options.target_partitions,
            )
        };
        let (default, _) = reserved(None);
        let (small, partitions) = reserved(Some(32 * 1024 * 1024));
        let quarter = 8 * 1024 * 1024;
        assert!(
            small * partitions <= quarter && small * partitions > quarter - partitions,
            "{small} bytes for each of {partitions} partitions"
        );
        assert_eq!(reserved(Some(8 * 1024 * 1024 * 1024)).0, default);
    }
}
