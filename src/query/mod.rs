//! Queries: parse and guard the SQL, plan it in the caller's session, bind
//! parameters, and execute it into a stream of wire-typed batches.

mod ahead;
mod bounded;
mod checked_constants;
mod checked_sum;
mod guard;
mod join_filters;
mod join_sides;
mod kernels;
mod key_bitmap;
mod pass_through;
mod recursion;
mod selectivity;
mod session;
mod shapes;
mod shared_subplans;
mod stack;
#[cfg(test)]
pub(crate) mod testing;
mod window_arithmetic;
mod wire;
mod yielding;

use std::collections::HashMap;
use std::future::Future as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{ParamValues, ScalarValue};
use datafusion::config::ConfigOptions;
use datafusion::error::DataFusionError;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::execution::session_state::SessionState;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::{DFParserBuilder, Statement as DataFusionStatement};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use futures::{Stream, StreamExt};

pub use recursion::DEFAULT_MAX_RECURSION_DEPTH;
pub(crate) use session::base_session_state;
pub use session::engine_config;
pub use wire::{to_wire_batch, wire_schema, wire_type};

use crate::audit::{AuditLogRef, AuditRecord};
use crate::auth::CallerIdentity;
use crate::catalog::{Mesh, MeshCatalog, ProductData, ProductName, ReadLog};
use crate::config::Limits;
use crate::metrics::{FinishedQuery, Metrics};
use crate::policy::render_plan;
use crate::sources::{ForwardedToken, SourceError};
use shapes::{ShapeCache, Shapes};

/// Why a query could not run. Messages are safe to show the caller.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The statement is not allowed: meshgate is read-only and sandboxed.
    #[error("{0}")]
    Refused(String),
    /// The SQL does not parse.
    #[error("SQL syntax error: {0}")]
    Syntax(String),
    /// A product (or other object) the caller named does not exist for them.
    #[error("{0}")]
    NotFound(String),
    /// The query is not valid: unknown column, type mismatch, unsupported SQL.
    #[error("{0}")]
    Invalid(String),
    /// Bound parameters do not fit the statement.
    #[error("parameters: {0}")]
    Parameters(String),
    /// The query failed while running because of its data (division by zero,
    /// a failing cast, overflow).
    #[error("query failed: {0}")]
    Execution(String),
    #[error("resources exhausted: {0}")]
    ResourcesExhausted(String),
    #[error("query exceeded its time limit of {0:?}")]
    Timeout(Duration),
    /// A source could not be read.
    #[error("source unavailable: {0}")]
    Source(String),
    /// The gateway is shutting down: running queries finish, new ones go
    /// to another replica.
    #[error("the gateway is shutting down: no new queries are accepted; retry on another replica")]
    ShuttingDown,
    /// A fault of meshgate itself.
    #[error("internal error: {0}")]
    Internal(String),
}

impl QueryError {
    /// The kind of error, as the metrics count it.
    pub fn kind(&self) -> &'static str {
        match self {
            QueryError::Refused(_) => "refused",
            QueryError::Syntax(_) => "syntax",
            QueryError::NotFound(_) => "not_found",
            QueryError::Invalid(_) => "invalid",
            QueryError::Parameters(_) => "parameters",
            QueryError::Execution(_) => "execution",
            QueryError::ResourcesExhausted(_) => "resources_exhausted",
            QueryError::Timeout(_) => "timeout",
            QueryError::Source(_) => "source",
            QueryError::ShuttingDown => "shutting_down",
            QueryError::Internal(_) => "internal",
        }
    }
}

impl From<DataFusionError> for QueryError {
    fn from(error: DataFusionError) -> Self {
        classify(&error)
    }
}

/// Classifies a DataFusion error by its root cause.
fn classify(error: &DataFusionError) -> QueryError {
    let root = error.find_root();
    match root {
        DataFusionError::SQL(e, _) => QueryError::Syntax(parser_message(e)),
        DataFusionError::Plan(message) => {
            if message.contains("not found") && message.starts_with("table ") {
                QueryError::NotFound(message.clone())
            } else {
                QueryError::Invalid(message.clone())
            }
        }
        DataFusionError::SchemaError(e, _) => QueryError::Invalid(
            // The caller cannot change the engine's settings.
            e.to_string().replace(
                " or disable the datafusion.sql_parser.enable_ident_normalization configuration",
                "",
            ),
        ),
        DataFusionError::NotImplemented(message) => {
            QueryError::Invalid(format!("not supported: {message}"))
        }
        DataFusionError::ResourcesExhausted(message) => {
            QueryError::ResourcesExhausted(message.clone())
        }
        DataFusionError::ArrowError(e, _) => classify_arrow(e),
        DataFusionError::ObjectStore(e) => QueryError::Source(e.to_string()),
        DataFusionError::IoError(e) => QueryError::Source(e.to_string()),
        DataFusionError::ParquetError(e) => QueryError::Source(e.to_string()),
        DataFusionError::Execution(message) => QueryError::Execution(message.clone()),
        DataFusionError::Configuration(message) => QueryError::Invalid(message.clone()),
        DataFusionError::External(e) if let Some(source) = e.downcast_ref::<SourceError>() => {
            if source.cause.data {
                QueryError::Execution(e.to_string())
            } else {
                QueryError::Source(e.to_string())
            }
        }
        DataFusionError::External(e)
            if e.downcast_ref::<regex::Error>().is_some()
                || e.downcast_ref::<regex_syntax::Error>().is_some() =>
        {
            QueryError::Invalid(format!("invalid regular expression: {e}"))
        }
        other => QueryError::Internal(other.to_string()),
    }
}

fn parser_message(error: &datafusion::sql::sqlparser::parser::ParserError) -> String {
    use datafusion::sql::sqlparser::parser::ParserError;
    match error {
        ParserError::ParserError(message) | ParserError::TokenizerError(message) => message.clone(),
        ParserError::RecursionLimitExceeded => {
            "the statement is nested too deeply (recursion limit exceeded)".into()
        }
    }
}

fn classify_arrow(error: &ArrowError) -> QueryError {
    match error {
        ArrowError::DivideByZero
        | ArrowError::CastError(_)
        | ArrowError::ParseError(_)
        | ArrowError::ComputeError(_)
        | ArrowError::ArithmeticOverflow(_)
        | ArrowError::InvalidArgumentError(_) => QueryError::Execution(error.to_string()),
        ArrowError::IoError(..) => QueryError::Source(error.to_string()),
        _ => QueryError::Internal(error.to_string()),
    }
}

/// A product as one caller sees it, for metadata answers.
#[derive(Debug, Clone)]
pub struct VisibleProduct {
    pub name: ProductName,
    /// `TABLE` or `VIEW`.
    pub table_type: &'static str,
    pub description: Option<String>,
    /// The wire schema of the product for this caller.
    pub schema: SchemaRef,
    /// The product as published (config, policies), not for the caller's eyes.
    pub product: Arc<crate::catalog::Product>,
}

/// Plans and runs queries over a mesh. The mesh (catalog and policies) and
/// the admin groups are replaced together by [`QueryEngine::replace`]; a
/// session keeps the ones it was made with.
#[derive(Debug)]
pub struct QueryEngine {
    current: parking_lot::RwLock<Arc<Published>>,
    limits: Limits,
    audit: AuditLogRef,
    metrics: Arc<Metrics>,
    /// The memory every query takes from (`limits.gateway_memory`).
    memory: Arc<dyn datafusion::execution::memory_pool::MemoryPool>,
    /// One permit per query allowed to run at once.
    running: Arc<tokio::sync::Semaphore>,
    /// Per user, one permit per query that user may run at once.
    per_user: Arc<PerUser>,
    /// Set at shutdown: running queries finish, new ones are refused.
    draining: Arc<AtomicBool>,
}

/// What one config publishes.
#[derive(Debug)]
struct Published {
    mesh: Arc<Mesh>,
    /// Groups whose members see EXPLAIN ANALYZE below policy barriers.
    admin_groups: Vec<String>,
    /// The state each session over `mesh` is cloned from.
    template: SessionState,
    /// Statements planned over `mesh`, so that the requests of one query
    /// (prepare, describe, fetch) plan it once.
    plans: PlanCache,
    /// The shapes of statements planned over `mesh`, so that statements
    /// differing only in their constants are planned once.
    shapes: ShapeCache,
}

/// How long a planned statement is reused.
const PLAN_TTL: Duration = Duration::from_secs(10);

/// Planned statements kept per published mesh.
const PLAN_CACHE_ENTRIES: u64 = 512;

/// Statements planned recently, for whom they were planned. A plan holds the
/// caller's view of the mesh (products resolved, policies bound), so it is
/// reused only for the same identity (user, groups, attributes) and bearer
/// token and the same SQL text, and only within the published mesh it was
/// planned over: a reload starts with no plans. Time-dependent expressions
/// are evaluated when the plan is optimized, at each execution.
type PlanCache = moka::sync::Cache<PlanKey, Arc<CachedPlan>>;

impl Published {
    fn new(
        mesh: Arc<Mesh>,
        admin_groups: Vec<String>,
        limits: &Limits,
        metrics: &Arc<Metrics>,
    ) -> Self {
        let template = session::template_state(&mesh, limits, metrics);
        Self {
            mesh,
            admin_groups,
            template,
            plans: moka::sync::Cache::builder()
                .max_capacity(PLAN_CACHE_ENTRIES)
                .time_to_live(PLAN_TTL)
                .build(),
            shapes: shapes::shape_cache(PLAN_CACHE_ENTRIES, PLAN_TTL),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PlanKey {
    caller: Arc<CallerIdentity>,
    token: Option<Arc<str>>,
    sql: Arc<str>,
}

/// A planned statement and what planning it read (for the audit log).
#[derive(Debug)]
struct CachedPlan {
    query: PreparedQuery,
    reads: ReadLog,
}

impl QueryEngine {
    pub fn new(
        mesh: Arc<Mesh>,
        limits: Limits,
        audit: AuditLogRef,
        admin_groups: Vec<String>,
    ) -> Self {
        let metrics = Arc::new(Metrics::default());
        let published = Published::new(mesh, admin_groups, &limits, &metrics);
        Self {
            current: parking_lot::RwLock::new(Arc::new(published)),
            audit,
            metrics,
            memory: session::spilling_pool(limits.gateway_memory),
            running: Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent_queries)),
            per_user: Arc::new(PerUser::new(limits.max_concurrent_queries_per_user)),
            limits,
            draining: Arc::new(AtomicBool::new(false)),
        }
    }

    /// From now on, new queries are refused; running ones go on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Publishes `mesh` and `admin_groups` for every later session, at once.
    pub fn replace(&self, mesh: Arc<Mesh>, admin_groups: Vec<String>) {
        let published = Published::new(mesh, admin_groups, &self.limits, &self.metrics);
        *self.current.write() = Arc::new(published);
    }

    /// The gateway's query metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The mesh published now.
    pub fn mesh(&self) -> Arc<Mesh> {
        Arc::clone(&self.current.read().mesh)
    }

    /// A session for one caller and one request.
    pub fn session(&self, caller: &CallerIdentity, client: Option<SocketAddr>) -> CallerSession {
        let published = Arc::clone(&self.current.read());
        let runtime = session::query_runtime(
            &published.mesh.runtime(),
            &self.memory,
            self.limits.memory_per_query,
            &self.metrics,
        );
        let is_admin = published.admin_groups.iter().any(|g| caller.has_group(g));
        CallerSession {
            context: LazyContext {
                published,
                caller: Arc::new(caller.clone()),
                token: None,
                reads: Arc::default(),
                built: Arc::default(),
            },
            runtime,
            is_admin,
            client,
            limits: self.limits.clone(),
            audit: Arc::clone(&self.audit),
            metrics: Arc::clone(&self.metrics),
            running: Arc::clone(&self.running),
            per_user: Arc::clone(&self.per_user),
            draining: Arc::clone(&self.draining),
        }
    }

    /// The domains the caller can see (those with a product they can see).
    pub fn visible_domains(&self, caller: &CallerIdentity) -> Vec<String> {
        let session = self.session(caller, None);
        datafusion::catalog::CatalogProvider::schema_names(session.context.catalog().as_ref())
    }

    /// The products the caller can see, with their schemas as the caller
    /// sees them (denied columns absent, masked columns typed by their mask).
    pub async fn visible_products(&self, caller: &CallerIdentity) -> Vec<VisibleProduct> {
        self.visible(caller).await.1
    }

    /// The mesh published now, and the products of it the caller can see.
    pub async fn visible(&self, caller: &CallerIdentity) -> (Arc<Mesh>, Vec<VisibleProduct>) {
        let session = self.session(caller, None);
        let mut visible = Vec::new();
        let mesh = &session.context.published.mesh;
        for (domain, entry) in &mesh.domains {
            for name in session.context.catalog().visible_products(domain) {
                let Some(product) = entry.products.get(&name) else {
                    continue;
                };
                // A view that does not plan for this caller is not usable by them.
                let Ok(Some(table)) = session.context.catalog().product_table(domain, &name).await
                else {
                    continue;
                };
                visible.push(VisibleProduct {
                    name: product.name.clone(),
                    table_type: match product.data {
                        ProductData::Table(_) => "TABLE",
                        ProductData::View { .. } => "VIEW",
                    },
                    description: product.config.description.clone(),
                    schema: wire_schema(&table.schema()),
                    product: Arc::clone(product),
                });
            }
        }
        (Arc::clone(mesh), visible)
    }

    /// Whether `caller` is in one of the admin groups.
    pub fn is_admin(&self, caller: &CallerIdentity) -> bool {
        let published = Arc::clone(&self.current.read());
        published.admin_groups.iter().any(|g| caller.has_group(g))
    }
}

/// EXPLAIN, with or without ANALYZE, rendered by meshgate so that nothing
/// below a policy barrier is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Explain {
    Plan,
    Analyze,
}

/// A planned statement, with its placeholders still unbound.
#[derive(Debug, Clone)]
pub struct PreparedQuery {
    sql: Arc<str>,
    plan: LogicalPlan,
    explain: Option<(Explain, SchemaRef)>,
    /// The placeholder types, in order (`$1`, `$2`, ...); `Null` when the
    /// planner could not infer one.
    parameter_types: Vec<DataType>,
    /// Its physical plan made ahead: kept with a statement's plan in the
    /// plan cache, none for a plan bound with values (see [`ahead`]).
    ahead: Option<Arc<ahead::PlanAhead>>,
}

impl PreparedQuery {
    /// The schema of the result rows, as sent on the wire.
    pub fn result_schema(&self) -> SchemaRef {
        match &self.explain {
            Some((_, schema)) => wire_schema(schema),
            None => wire_schema(self.plan.schema().as_arrow()),
        }
    }

    /// One field per placeholder, named by position.
    pub fn parameter_schema(&self) -> SchemaRef {
        Arc::new(Schema::new(
            self.parameter_types
                .iter()
                .enumerate()
                .map(|(i, t)| Field::new(format!("${}", i + 1), t.clone(), true))
                .collect::<Vec<_>>(),
        ))
    }

    pub fn parameter_count(&self) -> usize {
        self.parameter_types.len()
    }

    /// Binds positional values, cast to the placeholders' types.
    pub fn bind(&self, values: Vec<ScalarValue>) -> Result<PreparedQuery, QueryError> {
        if values.len() != self.parameter_types.len() {
            return Err(QueryError::Parameters(format!(
                "the statement has {} placeholder(s) but {} value(s) were bound",
                self.parameter_types.len(),
                values.len()
            )));
        }
        if values.is_empty() {
            return Ok(self.clone());
        }
        let values = values
            .into_iter()
            .zip(&self.parameter_types)
            .enumerate()
            .map(|(index, (value, wanted))| {
                if wanted.is_null() || &value.data_type() == wanted {
                    Ok(value)
                } else {
                    value.cast_to(wanted).map_err(|e| {
                        QueryError::Parameters(format!(
                            "value {} for ${} cannot be read as {wanted}: {}",
                            value,
                            index + 1,
                            e.find_root()
                        ))
                    })
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let plan = self
            .plan
            .clone()
            .with_param_values(ParamValues::from(values))
            .map_err(|e| QueryError::Parameters(e.find_root().to_string()))?;
        Ok(PreparedQuery {
            sql: Arc::clone(&self.sql),
            plan,
            explain: self.explain.clone(),
            parameter_types: Vec::new(),
            ahead: None,
        })
    }
}

/// One caller's session, on the mesh published when it was made.
pub struct CallerSession {
    /// The caller, what their statements read, and their DataFusion session
    /// over the published mesh.
    context: LazyContext,
    /// What the query runs in: the mesh's stores and caches, and the memory
    /// pool its limit applies to.
    runtime: Arc<RuntimeEnv>,
    /// Sees EXPLAIN below policy barriers.
    is_admin: bool,
    client: Option<SocketAddr>,
    limits: Limits,
    audit: AuditLogRef,
    metrics: Arc<Metrics>,
    running: Arc<tokio::sync::Semaphore>,
    per_user: Arc<PerUser>,
    draining: Arc<AtomicBool>,
}

/// The per-user concurrency limit: a semaphore per user seen recently.
#[derive(Debug)]
struct PerUser {
    limit: Option<usize>,
    users: moka::sync::Cache<String, Arc<tokio::sync::Semaphore>>,
}

impl PerUser {
    fn new(limit: Option<usize>) -> Self {
        Self {
            limit,
            users: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(3600))
                .build(),
        }
    }

    /// The user's semaphore, when a per-user limit is set.
    fn semaphore(&self, user: &str) -> Option<Arc<tokio::sync::Semaphore>> {
        let limit = self.limit?;
        Some(self.users.get_with(user.to_string(), || {
            Arc::new(tokio::sync::Semaphore::new(limit))
        }))
    }
}

/// A caller's DataFusion session over one published mesh, and the catalog it
/// resolves products through, built on first use: a request whose statement
/// (or its shape) was planned moments ago, and whose physical plan was made
/// ahead, builds neither. Its clones (the planning thread's, the plan made
/// ahead's) share what one of them builds.
#[derive(Clone)]
struct LazyContext {
    /// The mesh, the state sessions over it start from, and the statements
    /// and shapes planned over it.
    published: Arc<Published>,
    caller: Arc<CallerIdentity>,
    /// The caller's bearer token, for sources that forward it.
    token: Option<ForwardedToken>,
    /// What the caller's statements read: the products and policies for
    /// the audit log, and deprecation warnings.
    reads: Arc<parking_lot::Mutex<ReadLog>>,
    built: Arc<OnceLock<(SessionContext, Arc<MeshCatalog>)>>,
}

impl LazyContext {
    /// The caller's session, built on first use.
    fn session(&self) -> &SessionContext {
        &self.build().0
    }

    /// The catalog the caller's session resolves products through.
    fn catalog(&self) -> &Arc<MeshCatalog> {
        &self.build().1
    }

    fn build(&self) -> &(SessionContext, Arc<MeshCatalog>) {
        self.built.get_or_init(|| {
            session::caller_context(
                &self.published.template,
                &self.published.mesh,
                Arc::clone(&self.caller),
                self.token.clone(),
                Arc::clone(&self.reads),
            )
        })
    }
}

impl std::fmt::Debug for CallerSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallerSession")
            .field("caller", &self.context.caller.user)
            .finish_non_exhaustive()
    }
}

impl CallerSession {
    /// What the caller should be told of the products their planned
    /// queries read (a deprecated version and its sunset).
    pub fn warnings(&self) -> Vec<String> {
        self.context.reads.lock().warnings.iter().cloned().collect()
    }

    /// The caller's bearer token, sent on by sources that forward it. Set
    /// before the session plans anything.
    pub fn with_token(mut self, token: Option<ForwardedToken>) -> Self {
        debug_assert!(self.context.built.get().is_none(), "the session was built");
        self.context.token = token;
        self
    }

    /// Parses, guards and plans `sql`. A failure is audited.
    pub async fn prepare(&self, sql: &str) -> Result<PreparedQuery, QueryError> {
        let started = Instant::now();
        let result = if self.draining.load(Ordering::SeqCst) {
            Err(QueryError::ShuttingDown)
        } else if sql.len() > self.limits.max_sql_length {
            Err(QueryError::Refused(format!(
                "SQL text of {} bytes exceeds the limit of {} bytes",
                sql.len(),
                self.limits.max_sql_length
            )))
        } else {
            self.plan(sql).await
        };
        if let Err(error) = &result {
            self.audit(sql, started, "error", Some(error));
        }
        result
    }

    /// Plans `sql` for this caller, or reuses the plan made for the same
    /// caller, token and text over the same mesh moments ago, or binds its
    /// constants into the plan made for its shape (see [`shapes`]).
    async fn plan(&self, sql: &str) -> Result<PreparedQuery, QueryError> {
        let token = self
            .context
            .token
            .as_ref()
            .map(|token| Arc::clone(&token.0));
        let key = PlanKey {
            caller: Arc::clone(&self.context.caller),
            token: token.clone(),
            sql: sql.into(),
        };
        let published = &self.context.published;
        if let Some(cached) = published.plans.get(&key) {
            self.metrics.statement_planned(true);
            self.context.reads.lock().merge(&cached.reads);
            return Ok(cached.query.clone());
        }
        let context = self.context.clone();
        let text = sql.to_string();
        let shapes = Shapes {
            cache: published.shapes.clone(),
            caller: Arc::clone(&self.context.caller),
            token,
            reads: Arc::clone(&self.context.reads),
        };
        // Planning counts against the query's time limit: a statement
        // that plans too long gets its answer at the limit.
        let timeout = self.limits.query_timeout;
        let planning =
            stack::on_planning_stack(async move { plan_sql(&context, &text, &shapes).await });
        let (mut query, rebound) = match tokio::time::timeout(timeout, planning).await {
            Ok(result) => result?,
            Err(_) => return Err(QueryError::Timeout(timeout)),
        };
        if rebound {
            self.metrics.statement_rebound();
        } else {
            self.metrics.statement_planned(false);
        }
        query.ahead = Some(Arc::default());
        let reads = self.context.reads.lock().clone();
        published.plans.insert(
            key,
            Arc::new(CachedPlan {
                query: query.clone(),
                reads,
            }),
        );
        Ok(query)
    }

    /// Executes a fully bound query. The stream yields wire-typed, non-empty
    /// batches, fails with [`QueryError::Timeout`] past the query timeout,
    /// and writes the audit record when it ends or is dropped.
    pub async fn execute(&self, query: PreparedQuery) -> Result<QueryStream, QueryError> {
        let started = Instant::now();
        let schema = query.result_schema();
        let result = match self.admit().await {
            Ok(_) if self.draining.load(Ordering::SeqCst) => Err(QueryError::ShuttingDown),
            Ok(permit) => self
                .start(&query, &schema, started)
                .await
                .map(|inner| (inner, permit)),
            Err(error) => Err(error),
        };
        match result {
            Ok((inner, permit)) => Ok(QueryStream {
                _permit: permit,
                _active: ActiveQuery::start(Arc::clone(&self.metrics)),
                inner,
                schema,
                deadline: tokio::time::Instant::from_std(started + self.limits.query_timeout),
                timeout: self.limits.query_timeout,
                sleep: None,
                audit: Some(PendingAudit {
                    session: self.audit_context(&query.sql),
                    started,
                    rows: 0,
                    bytes: Arc::new(AtomicU64::new(0)),
                    failure: None,
                    finished: false,
                }),
            }),
            Err(error) => {
                let error = match error {
                    QueryError::Source(message) => {
                        QueryError::Source(naming_products(&self.context.reads.lock(), message))
                    }
                    other => other,
                };
                self.audit(&query.sql, started, "error", Some(&error));
                Err(error)
            }
        }
    }

    /// Waits for a turn to run, at most the query timeout: at most
    /// `limits.max_concurrent_queries` queries run at once.
    async fn admit(&self) -> Result<Admission, QueryError> {
        let timeout = self.limits.query_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let user = match self.per_user.semaphore(&self.context.caller.user) {
            Some(semaphore) => Some(
                acquire(semaphore, deadline, || {
                    format!(
                        "user `{}` already runs {} queries (limits.max_concurrent_queries_per_user) and none finished within {timeout:?}; try again later",
                        self.context.caller.user,
                        self.limits
                            .max_concurrent_queries_per_user
                            .unwrap_or_default()
                    )
                })
                .await?,
            ),
            None => None,
        };
        let gateway = acquire(Arc::clone(&self.running), deadline, || {
            format!(
                "{} queries are already running (limits.max_concurrent_queries) and none finished within {timeout:?}; try again later",
                self.limits.max_concurrent_queries
            )
        })
        .await?;
        Ok(Admission {
            _gateway: gateway,
            _user: user,
        })
    }

    /// Plans `query` (or takes the plan made ahead) and runs it, its rows
    /// converted to `schema`, the wire schema.
    async fn start(
        &self,
        query: &PreparedQuery,
        schema: &SchemaRef,
        started: Instant,
    ) -> Result<SendableRecordBatchStream, QueryError> {
        if query.parameter_count() > 0 {
            return Err(QueryError::Parameters(format!(
                "the statement has {} unbound placeholder(s): bind values first",
                query.parameter_count()
            )));
        }
        let timeout = self.limits.query_timeout;
        let planning = async {
            let ahead = match &query.ahead {
                Some(ahead) => ahead.take().await,
                None => None,
            };
            self.metrics.physical_plan_made(ahead.is_some());
            if let Some(made) = ahead {
                return Ok(datafusion::physical_plan::execute_stream(
                    wire::converted_in_partitions(made.plan, schema),
                    self.task_context(made.context),
                )?);
            }
            let state = query_state(self.context.session(), &query.plan);
            let physical = state.create_physical_plan(&query.plan).await?;
            match &query.explain {
                None => Ok(datafusion::physical_plan::execute_stream(
                    wire::converted_in_partitions(physical, schema),
                    self.task_context(TaskContext::from(&state)),
                )?),
                Some((mode, schema)) => {
                    if *mode == Explain::Analyze {
                        // Run to completion so that metrics are complete.
                        let mut stream = datafusion::physical_plan::execute_stream(
                            Arc::clone(&physical),
                            self.task_context(TaskContext::from(&state)),
                        )?;
                        while let Some(batch) = stream.next().await {
                            batch?;
                        }
                    }
                    let logical = state.optimize(&query.plan)?;
                    Ok(explain_stream(
                        schema,
                        &logical.display_indent().to_string(),
                        &render_plan(&physical, *mode == Explain::Analyze, !self.is_admin),
                    )?)
                }
            }
        };
        match tokio::time::timeout(timeout.saturating_sub(started.elapsed()), planning).await {
            Ok(result) => result,
            Err(_) => Err(QueryError::Timeout(timeout)),
        }
    }

    /// Starts making `query`'s physical plan on a task of its own, for the
    /// fetch of its rows that the client makes next (see [`ahead`]). A
    /// statement with placeholders, or bound with values, or an EXPLAIN, is
    /// planned when it runs.
    pub fn plan_ahead(&self, query: &PreparedQuery) {
        let Some(ahead) = &query.ahead else { return };
        if query.parameter_count() > 0 || query.explain.is_some() {
            return;
        }
        // The caller's session too is built on the task, if this request
        // did not need it.
        let planning = || {
            let context = self.context.clone();
            let plan = query.plan.clone();
            async move { ahead::Planned::make(query_state(context.session(), &plan), &plan).await }
        };
        ahead.start(planning, self.limits.query_timeout);
    }

    /// The physical plan of a bound query (of the explained query, for EXPLAIN).
    pub async fn physical_plan(
        &self,
        query: &PreparedQuery,
    ) -> Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>, QueryError> {
        Ok(query_state(self.context.session(), &query.plan)
            .create_physical_plan(&query.plan)
            .await?)
    }

    /// The context a query runs in: `context`'s settings and functions,
    /// this session's runtime (the memory pool its limit applies to).
    fn task_context(&self, context: TaskContext) -> Arc<TaskContext> {
        Arc::new(context.with_runtime(Arc::clone(&self.runtime)))
    }

    fn audit_context(&self, sql: &str) -> AuditContext {
        AuditContext {
            log: Arc::clone(&self.audit),
            metrics: Arc::clone(&self.metrics),
            user: self.context.caller.user.clone(),
            client: self.client.map(|c| c.to_string()),
            sql: sql.to_string(),
            reads: Arc::clone(&self.context.reads),
        }
    }

    fn audit(
        &self,
        sql: &str,
        started: Instant,
        outcome: &'static str,
        error: Option<&QueryError>,
    ) {
        self.audit_context(sql).write(Finished {
            started,
            rows: 0,
            bytes: 0,
            outcome,
            error: error.map(|e| (e.kind(), e.to_string())),
        });
    }
}

/// Parses, guards and plans one statement in `context`, through its shape
/// when it has a usable one: the plan, and whether it was bound into the
/// plan of a shape planned before.
async fn plan_sql(
    context: &LazyContext,
    sql: &str,
    shapes: &Shapes,
) -> Result<(PreparedQuery, bool), QueryError> {
    let statement = parse_statement(context.published.template.config_options(), sql)?;
    if let Some(planned) = shapes.plan(|| context.session(), &statement, sql).await {
        return Ok(planned);
    }
    Ok((
        plan_statement(context.session(), statement, sql).await?,
        false,
    ))
}

/// Parses and guards the one statement of `sql`, under the parser limits of
/// `options`.
fn parse_statement(options: &ConfigOptions, sql: &str) -> Result<DataFusionStatement, QueryError> {
    guard::check_complexity(sql)?;
    // `current_user()` is written as the function it is in policies, and
    // callers may write it so too.
    let rewritten;
    let sql = if contains_ignoring_case(sql, "current_user") {
        rewritten =
            crate::policy::without_current_user_parentheses(sql).map_err(QueryError::Syntax)?;
        rewritten.as_str()
    } else {
        sql
    };
    let recursion_limit = options.sql_parser.recursion_limit.get();
    let mut statements = DFParserBuilder::new(sql)
        .with_dialect(&GenericDialect {})
        .with_recursion_limit(recursion_limit)
        .build()
        .and_then(|mut parser| parser.parse_statements())
        .map_err(|e| match classify(&e) {
            QueryError::Syntax(message) => QueryError::Syntax(message),
            other => QueryError::Syntax(other.to_string()),
        })?;
    let mut statement = match (statements.pop_front(), statements.is_empty()) {
        (Some(statement), true) => statement,
        (None, _) => return Err(QueryError::Syntax("no SQL statement was given".into())),
        (Some(_), false) => {
            return Err(QueryError::Refused(
                "one SQL statement per request: several were given".into(),
            ));
        }
    };
    guard::check_and_normalize(&mut statement)?;
    Ok(statement)
}

/// Whether `text` holds `word`, in any ASCII case.
fn contains_ignoring_case(text: &str, word: &str) -> bool {
    text.as_bytes()
        .windows(word.len())
        .any(|window| window.eq_ignore_ascii_case(word.as_bytes()))
}

/// Plans one parsed and guarded statement (whose text is `sql`) in `context`.
async fn plan_statement(
    context: &SessionContext,
    statement: DataFusionStatement,
    sql: &str,
) -> Result<PreparedQuery, QueryError> {
    let state = context.state();
    let plan = state.statement_to_plan(statement).await?;
    datafusion::execution::context::SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
        .verify_plan(&plan)
        .map_err(|e| QueryError::Refused(e.find_root().to_string()))?;
    let (plan, explain) = match plan {
        LogicalPlan::Explain(explain) => {
            let schema = Arc::new(explain.schema.as_arrow().clone());
            (explain.plan.as_ref().clone(), Some((Explain::Plan, schema)))
        }
        LogicalPlan::Analyze(analyze) => {
            let schema = Arc::new(analyze.schema.as_arrow().clone());
            (
                analyze.input.as_ref().clone(),
                Some((Explain::Analyze, schema)),
            )
        }
        plan => (plan, None),
    };
    let parameter_types = parameter_types(&plan)?;
    Ok(PreparedQuery {
        sql: Arc::from(sql),
        plan,
        explain,
        parameter_types,
        ahead: None,
    })
}

/// What an audit record needs from the session that ran the query.
struct AuditContext {
    log: AuditLogRef,
    metrics: Arc<Metrics>,
    user: String,
    client: Option<String>,
    sql: String,
    reads: Arc<parking_lot::Mutex<ReadLog>>,
}

/// How a query ended.
struct Finished {
    started: Instant,
    rows: u64,
    bytes: u64,
    outcome: &'static str,
    /// The kind of error and its message.
    error: Option<(&'static str, String)>,
}

impl AuditContext {
    fn write(&self, finished: Finished) {
        let Finished {
            started,
            rows,
            bytes,
            outcome,
            error,
        } = finished;
        let reads = self.reads.lock().clone();
        let products: Vec<String> = reads.products.iter().cloned().collect();
        self.metrics.query_finished(FinishedQuery {
            outcome,
            error_kind: error.as_ref().map(|(kind, _)| *kind),
            products: &products,
            rows,
            bytes,
            seconds: started.elapsed().as_secs_f64(),
        });
        self.log.record(&AuditRecord {
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            user: self.user.clone(),
            client: self.client.clone(),
            sql: audit_text(&self.sql),
            products: reads.products.into_iter().collect(),
            policies: reads.policies.into_iter().collect(),
            rows,
            duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            outcome,
            error: error.map(|(_, message)| message),
            warnings: reads.warnings.into_iter().collect(),
        });
    }
}

/// SQL as the audit log keeps it: whole up to 16 KiB, then cut with a note.
fn audit_text(sql: &str) -> String {
    const KEEP: usize = 16 * 1024;
    if sql.len() <= KEEP {
        return sql.to_string();
    }
    let mut end = KEEP;
    while !sql.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... [{} bytes in all]", &sql[..end], sql.len())
}

/// The audit record of a running query, written when its stream ends.
struct PendingAudit {
    session: AuditContext,
    started: Instant,
    rows: u64,
    /// Bytes sent, counted by the wire encoder.
    bytes: Arc<AtomicU64>,
    failure: Option<(&'static str, String)>,
    finished: bool,
}

impl Drop for PendingAudit {
    fn drop(&mut self) {
        let outcome = match (&self.failure, self.finished) {
            (Some(_), _) => "error",
            (None, true) => "ok",
            (None, false) => "cancelled",
        };
        self.session.write(Finished {
            started: self.started,
            rows: self.rows,
            bytes: self.bytes.load(Ordering::Relaxed),
            outcome,
            error: self.failure.take(),
        });
    }
}

/// Rows a batch, read from the files, of a query that reads its rows as
/// they are (see [`RowsRead`]).
const STREAM_BATCH_ROWS: usize = 32 * 1024;

/// How a plan reads the rows of its tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowsRead {
    /// As they are: projected, sorted and limited only (a whole product, a
    /// page).
    AsTheyAre,
    /// As they are, with at least one filter (a lookup, a filtered read).
    Filtered,
    /// Joined, aggregated, or combined otherwise.
    Combined,
}

/// The session state `plan` is planned and run with in `context`.
fn query_state(context: &SessionContext, plan: &LogicalPlan) -> SessionState {
    let mut state = context.state();
    let rows = rows_read(plan);
    if rows == RowsRead::Combined {
        return state;
    }
    // Rows that go from the files to the client as they are read are
    // read in larger batches: a 6M-row product streamed to ADBC took
    // the gateway 10-15% and the client 7-17% less CPU time, and 0.80-0.91
    // of the time, than in batches of 8 192 rows (lookups: no change).
    // Joins and aggregates keep the engine's batches.
    let config = state.config_mut();
    *config = std::mem::take(config).with_batch_size(STREAM_BATCH_ROWS);
    if rows == RowsRead::Filtered {
        // Late materialization: the filter's columns are decoded first,
        // the others only for the rows that pass. It pays for lookups and
        // filtered reads; behind joins and aggregates, decoding whole
        // pages and filtering after is faster on typical files.
        config.options_mut().execution.parquet.pushdown_filters = true;
    }
    state
}

/// How `plan` reads the rows of its tables.
fn rows_read(plan: &LogicalPlan) -> RowsRead {
    let mut filtered = false;
    let mut simple = true;
    let _ = plan.apply_with_subqueries(|node| {
        match node {
            LogicalPlan::Filter(_) => filtered = true,
            LogicalPlan::TableScan(scan) => filtered |= !scan.filters.is_empty(),
            LogicalPlan::Projection(_)
            | LogicalPlan::Sort(_)
            | LogicalPlan::Limit(_)
            | LogicalPlan::SubqueryAlias(_) => {}
            _ => simple = false,
        }
        Ok(if simple {
            TreeNodeRecursion::Continue
        } else {
            TreeNodeRecursion::Stop
        })
    });
    match (simple, filtered) {
        (false, _) => RowsRead::Combined,
        (true, true) => RowsRead::Filtered,
        (true, false) => RowsRead::AsTheyAre,
    }
}

/// The two rows of an EXPLAIN answer.
fn explain_stream(
    schema: &SchemaRef,
    logical: &str,
    physical: &str,
) -> datafusion::error::Result<SendableRecordBatchStream> {
    use arrow::array::StringArray;
    let batch = RecordBatch::try_new(
        Arc::clone(schema),
        vec![
            Arc::new(StringArray::from(vec!["logical_plan", "physical_plan"])),
            Arc::new(StringArray::from(vec![logical, physical])),
        ],
    )?;
    Ok(Box::pin(
        datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(
            Arc::clone(schema),
            futures::stream::iter([Ok(batch)]),
        ),
    ))
}

fn parameter_types(plan: &LogicalPlan) -> Result<Vec<DataType>, QueryError> {
    let types: HashMap<String, Option<DataType>> = plan.get_parameter_types()?;
    let mut numbered = Vec::with_capacity(types.len());
    for (name, data_type) in types {
        let position = name
            .strip_prefix('$')
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| *n >= 1)
            .ok_or_else(|| {
                QueryError::Invalid(format!(
                    "placeholder `{name}` is not positional: use `?` or `$1`, `$2`, ..."
                ))
            })?;
        numbered.push((position, data_type.unwrap_or(DataType::Null)));
    }
    numbered.sort_by_key(|(position, _)| *position);
    for (expected, (position, _)) in numbered.iter().enumerate() {
        if *position != expected + 1 {
            return Err(QueryError::Invalid(format!(
                "placeholders must be numbered from $1 without gaps; ${} is missing",
                expected + 1
            )));
        }
    }
    Ok(numbered.into_iter().map(|(_, t)| t).collect())
}

/// Counts a query as active while its stream lives.
struct ActiveQuery(Arc<Metrics>);

impl ActiveQuery {
    fn start(metrics: Arc<Metrics>) -> Self {
        metrics.query_started();
        Self(metrics)
    }
}

impl Drop for ActiveQuery {
    fn drop(&mut self) {
        self.0.query_stopped();
    }
}

/// The result rows of a query, as wire-typed batches.
pub struct QueryStream {
    _permit: Admission,
    _active: ActiveQuery,
    inner: SendableRecordBatchStream,
    schema: SchemaRef,
    deadline: tokio::time::Instant,
    timeout: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    audit: Option<PendingAudit>,
}

impl std::fmt::Debug for QueryStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryStream")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

impl QueryStream {
    pub fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    /// The counter the wire encoder adds the bytes it sends to; read into
    /// the metrics when the query ends.
    pub fn bytes_sent(&self) -> Arc<AtomicU64> {
        match &self.audit {
            Some(audit) => Arc::clone(&audit.bytes),
            None => Arc::new(AtomicU64::new(0)),
        }
    }

    /// Notes a failure for the audit record and passes it on.
    fn failed(&mut self, error: QueryError) -> QueryError {
        let error = match error {
            QueryError::Source(message) => QueryError::Source(self.naming_products(message)),
            other => other,
        };
        if let Some(audit) = &mut self.audit
            && audit.failure.is_none()
        {
            audit.failure = Some((error.kind(), error.to_string()));
        }
        error
    }
}

/// A permit of `semaphore`, waiting until `deadline` at most; past it, a
/// resources-exhausted error with the message `busy` gives.
async fn acquire(
    semaphore: Arc<tokio::sync::Semaphore>,
    deadline: tokio::time::Instant,
    busy: impl FnOnce() -> String,
) -> Result<tokio::sync::OwnedSemaphorePermit, QueryError> {
    match tokio::time::timeout_at(deadline, semaphore.acquire_owned()).await {
        Ok(Ok(permit)) => Ok(permit),
        Ok(Err(_)) => Err(QueryError::ShuttingDown),
        Err(_) => Err(QueryError::ResourcesExhausted(busy())),
    }
}

/// A query's turn to run: a gateway permit and, under a per-user limit, one
/// of its user's.
#[derive(Debug)]
struct Admission {
    _gateway: tokio::sync::OwnedSemaphorePermit,
    _user: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl QueryStream {
    fn naming_products(&self, message: String) -> String {
        match &self.audit {
            Some(audit) => naming_products(&audit.session.reads.lock(), message),
            None => message,
        }
    }
}

/// A source error that names no product (a corrupt or missing file, an I/O
/// error) prefixed with the products the query reads.
fn naming_products(reads: &ReadLog, message: String) -> String {
    if reads.products.is_empty() || reads.products.iter().any(|p| message.contains(p.as_str())) {
        return message;
    }
    let products: Vec<&str> = reads.products.iter().map(String::as_str).collect();
    format!("reading {}: {message}", products.join(", "))
}

impl Stream for QueryStream {
    type Item = Result<RecordBatch, QueryError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let deadline = self.deadline;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.as_mut().poll(cx).is_ready() {
            let error = QueryError::Timeout(self.timeout);
            return Poll::Ready(Some(Err(self.failed(error))));
        }
        loop {
            match self.inner.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(batch))) => {
                    // Old JDBC drivers stop at the first empty batch.
                    if batch.num_rows() == 0 {
                        continue;
                    }
                    // Every batch leaves in the wire schema, whatever the
                    // plan's operators put on it. A batch converted in its
                    // partition (`wire::converted_in_partitions`) carries
                    // this very schema and passes as it is.
                    let schema = Arc::clone(&self.schema);
                    let converted = to_wire_batch(batch, &schema).map_err(|e| classify_arrow(&e));
                    return Poll::Ready(Some(match converted {
                        Ok(batch) => {
                            if let Some(audit) = &mut self.audit {
                                audit.rows += batch.num_rows() as u64;
                            }
                            Ok(batch)
                        }
                        Err(error) => Err(self.failed(error)),
                    }));
                }
                Poll::Ready(Some(Err(e))) => {
                    let error = classify(&e);
                    return Poll::Ready(Some(Err(self.failed(error))));
                }
                Poll::Ready(None) => {
                    if let Some(audit) = &mut self.audit {
                        audit.finished = true;
                    }
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
