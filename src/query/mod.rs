//! Queries: parse and guard the SQL, plan it in the caller's session, bind
//! parameters, and execute it into a stream of wire-typed batches.

mod guard;
mod session;
mod wire;

use std::collections::HashMap;
use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;
use datafusion::common::{ParamValues, ScalarValue};
use datafusion::error::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::DFParserBuilder;
use datafusion::sql::sqlparser::dialect::GenericDialect;
use futures::{Stream, StreamExt};

pub(crate) use session::base_session_state;
pub use wire::{to_wire_batch, wire_schema, wire_type};

use crate::auth::CallerIdentity;
use crate::catalog::{Mesh, ProductData, ProductName};
use crate::config::Limits;

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
    /// A fault of meshgate itself.
    #[error("internal error: {0}")]
    Internal(String),
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
        DataFusionError::SchemaError(e, _) => QueryError::Invalid(e.to_string()),
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
}

/// Plans and runs queries over a mesh.
#[derive(Debug)]
pub struct QueryEngine {
    mesh: Arc<Mesh>,
    limits: Limits,
}

impl QueryEngine {
    pub fn new(mesh: Arc<Mesh>, limits: Limits) -> Self {
        Self { mesh, limits }
    }

    pub fn mesh(&self) -> &Arc<Mesh> {
        &self.mesh
    }

    /// A session for one caller and one request.
    pub fn session(&self, caller: &CallerIdentity) -> CallerSession {
        CallerSession {
            context: session::caller_context(&self.mesh),
            caller: caller.clone(),
            limits: self.limits.clone(),
        }
    }

    /// The domains the caller can see, in name order.
    pub fn visible_domains(&self, _caller: &CallerIdentity) -> Vec<String> {
        self.mesh.domains.keys().cloned().collect()
    }

    /// The products the caller can see, in name order.
    pub fn visible_products(&self, _caller: &CallerIdentity) -> Vec<VisibleProduct> {
        self.mesh
            .products()
            .map(|product| VisibleProduct {
                name: product.name.clone(),
                table_type: match product.data {
                    ProductData::Table(_) => "TABLE",
                    ProductData::View { .. } => "VIEW",
                },
                description: product.config.description.clone(),
                schema: wire_schema(&product.schema),
            })
            .collect()
    }
}

/// A planned statement, with its placeholders still unbound.
#[derive(Debug, Clone)]
pub struct PreparedQuery {
    plan: LogicalPlan,
    /// The placeholder types, in order (`$1`, `$2`, ...); `Null` when the
    /// planner could not infer one.
    parameter_types: Vec<DataType>,
}

impl PreparedQuery {
    /// The schema of the result rows, as sent on the wire.
    pub fn result_schema(&self) -> SchemaRef {
        wire_schema(self.plan.schema().as_arrow())
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
            plan,
            parameter_types: Vec::new(),
        })
    }
}

/// One caller's session.
pub struct CallerSession {
    context: SessionContext,
    caller: CallerIdentity,
    limits: Limits,
}

impl std::fmt::Debug for CallerSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallerSession")
            .field("caller", &self.caller.user)
            .finish_non_exhaustive()
    }
}

impl CallerSession {
    pub fn caller(&self) -> &CallerIdentity {
        &self.caller
    }

    /// Parses, guards and plans `sql`.
    pub async fn prepare(&self, sql: &str) -> Result<PreparedQuery, QueryError> {
        if sql.len() > self.limits.max_sql_length {
            return Err(QueryError::Refused(format!(
                "SQL text of {} bytes exceeds the limit of {} bytes",
                sql.len(),
                self.limits.max_sql_length
            )));
        }
        let state = self.context.state();
        let recursion_limit = state.config().options().sql_parser.recursion_limit.get();
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
        let plan = state.statement_to_plan(statement).await?;
        datafusion::execution::context::SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false)
            .verify_plan(&plan)
            .map_err(|e| QueryError::Refused(e.find_root().to_string()))?;
        let parameter_types = parameter_types(&plan)?;
        Ok(PreparedQuery {
            plan,
            parameter_types,
        })
    }

    /// Executes a fully bound query. The stream yields wire-typed, non-empty
    /// batches and fails with [`QueryError::Timeout`] past the query timeout.
    pub async fn execute(&self, query: PreparedQuery) -> Result<QueryStream, QueryError> {
        if query.parameter_count() > 0 {
            return Err(QueryError::Parameters(format!(
                "the statement has {} unbound placeholder(s): bind values first",
                query.parameter_count()
            )));
        }
        let schema = query.result_schema();
        let started = Instant::now();
        let timeout = self.limits.query_timeout;
        let planning = async {
            let state = self.context.state();
            let physical = state.create_physical_plan(&query.plan).await?;
            datafusion::physical_plan::execute_stream(physical, state.task_ctx())
        };
        let inner = tokio::time::timeout(timeout, planning)
            .await
            .map_err(|_| QueryError::Timeout(timeout))??;
        Ok(QueryStream {
            inner,
            schema,
            deadline: tokio::time::Instant::from_std(started + timeout),
            timeout,
            sleep: None,
        })
    }
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

/// The result rows of a query, as wire-typed batches.
pub struct QueryStream {
    inner: SendableRecordBatchStream,
    schema: SchemaRef,
    deadline: tokio::time::Instant,
    timeout: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
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
}

impl Stream for QueryStream {
    type Item = Result<RecordBatch, QueryError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let deadline = self.deadline;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.as_mut().poll(cx).is_ready() {
            let timeout = self.timeout;
            return Poll::Ready(Some(Err(QueryError::Timeout(timeout))));
        }
        loop {
            match self.inner.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(batch))) => {
                    // Old JDBC drivers stop at the first empty batch.
                    if batch.num_rows() == 0 {
                        continue;
                    }
                    let schema = Arc::clone(&self.schema);
                    return Poll::Ready(Some(
                        to_wire_batch(batch, &schema).map_err(|e| classify_arrow(&e)),
                    ));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(classify(&e)))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
