//! The Flight SQL front end: a thin adapter that decodes each command, calls
//! the typed core (auth, query), and encodes the answer. No planning and no
//! policy live here.

mod auth_layer;
mod bindings;
mod do_get;
mod encode;
mod handle;
mod metadata;
mod routes;
mod running;
mod status;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{Schema, SchemaRef};
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionBeginSavepointRequest, ActionBeginSavepointResult, ActionBeginTransactionRequest,
    ActionBeginTransactionResult, ActionCancelQueryRequest, ActionCancelQueryResult,
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, ActionCreatePreparedSubstraitPlanRequest,
    ActionEndSavepointRequest, ActionEndTransactionRequest, Any, Command, CommandGetCatalogs,
    CommandGetCrossReference, CommandGetDbSchemas, CommandGetExportedKeys, CommandGetImportedKeys,
    CommandGetPrimaryKeys, CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables,
    CommandGetXdbcTypeInfo, CommandPreparedStatementQuery, CommandPreparedStatementUpdate,
    CommandStatementIngest, CommandStatementQuery, CommandStatementSubstraitPlan,
    CommandStatementUpdate, DoPutPreparedStatementResult, ProstMessageExt, SqlInfo,
    TicketStatementQuery,
};
use arrow_flight::{
    Action, CancelFlightInfoRequest, CancelFlightInfoResult, CancelStatus, FlightData,
    FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse, IpcMessage,
    RenewFlightEndpointRequest, SchemaAsIpc, Ticket,
};
use futures::{Stream, StreamExt, TryStreamExt};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

pub use auth_layer::AuthLayer;
use handle::{StatementHandle, single_parameter_row};
pub use routes::FlightServer;
use status::ProtocolError;

use crate::auth::{AuthenticatorRef, CallerIdentity};
use crate::catalog::CATALOG_NAME;
use crate::query::{CallerSession, PreparedQuery, QueryEngine, QueryError};
use crate::sources::ForwardedToken;

/// Largest gRPC message accepted from clients (parameter uploads).
const MAX_DECODING_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

/// The Flight SQL service of one gateway.
#[derive(Debug, Clone)]
pub struct MeshFlightService {
    authenticator: AuthenticatorRef,
    engine: Arc<QueryEngine>,
    /// One permit per password check allowed to run at once.
    logins: Arc<tokio::sync::Semaphore>,
    /// The query streams being read now, for cancels.
    running: Arc<running::RunningStreams>,
    /// Parameters bound to prepared handles, for clients that reuse them.
    bindings: bindings::LastBindings,
}

type FlightDataStream = <MeshFlightService as FlightService>::DoGetStream;

/// A DoGet answer as the messages it is sent as (see `do_get`).
type MessageStream = Pin<Box<dyn Stream<Item = Result<encode::Message, Status>> + Send>>;

impl MeshFlightService {
    pub fn new(authenticator: AuthenticatorRef, engine: Arc<QueryEngine>) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        Self {
            authenticator,
            engine,
            logins: Arc::new(tokio::sync::Semaphore::new(cores.max(2))),
            running: Arc::default(),
            bindings: bindings::LastBindings::default(),
        }
    }

    /// The gRPC server for this service. Wrap it in [`AuthLayer`].
    pub fn into_server(self) -> FlightServer {
        let generated = FlightServiceServer::new(self.clone())
            .max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE);
        FlightServer::new(generated, self)
    }

    /// The messages answering a DoGet: a query's straight from its batches,
    /// any other ticket's through [`FlightService::do_get`].
    async fn do_get_messages(&self, request: Request<Ticket>) -> Result<MessageStream, Status> {
        let ticket = request.get_ref().ticket.clone();
        let Some(handle) = statement_handle(&ticket)? else {
            let messages = self.do_get(request).await?.into_inner();
            return Ok(Box::pin(messages.map_ok(encode::Message::from)));
        };
        let caller = caller(&request)?;
        let (session, bound) = self.plan_handle(&handle, &request).await?;
        let messages = self.query_messages(session, bound).await?;
        Ok(self.running.track(&caller.user, ticket, messages))
    }

    /// GetSchema: the schema of a statement (placeholders allowed) or of a
    /// prepared statement, planned but not prepared for execution; for any
    /// other command, the schema of its FlightInfo.
    async fn schema_of(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<arrow_flight::SchemaResult>, Status> {
        let caller = caller(&request)?;
        let any = Any::decode(request.get_ref().cmd.as_ref())
            .map_err(|e| undecodable("the command", e))?;
        let schema = if let Some(query) = any
            .unpack::<CommandStatementQuery>()
            .map_err(|e| undecodable("the command", e))?
        {
            let session = self.session_for(&caller, &request);
            schema_bytes(&session.prepare(&query.query).await?.result_schema())?
        } else if let Some(command) = any
            .unpack::<CommandPreparedStatementQuery>()
            .map_err(|e| undecodable("the command", e))?
        {
            let (_, bound) = self
                .plan_handle(&command.prepared_statement_handle, &request)
                .await?;
            schema_bytes(&bound.result_schema())?
        } else {
            FlightService::get_flight_info(self, request)
                .await?
                .into_inner()
                .schema
        };
        Ok(Response::new(arrow_flight::SchemaResult { schema }))
    }

    /// Stops `caller`'s running queries of the tickets of `info`; NOT_FOUND
    /// when none of them is running here.
    fn cancel(&self, info: &FlightInfo, caller: &CallerIdentity) -> Result<(), Status> {
        let mut stopped = 0;
        for ticket in info.endpoint.iter().filter_map(|e| e.ticket.as_ref()) {
            check_ticket_owner(&ticket.ticket, caller)?;
            stopped += self.running.cancel(&caller.user, &ticket.ticket);
        }
        if stopped == 0 {
            return Err(ProtocolError::NotRunning(
                "no query of this FlightInfo is running on this gateway: it has ended, or has not \
                 been fetched yet"
                    .into(),
            )
            .into());
        }
        Ok(())
    }

    /// The caller's session for `request`: the client it came from and the
    /// token it forwards to the sources.
    fn session_for<T>(&self, caller: &CallerIdentity, request: &Request<T>) -> CallerSession {
        self.engine
            .session(caller, request.remote_addr())
            .with_token(token(request))
    }

    /// Plans a statement handle for the request's caller, parameters bound.
    async fn plan_handle<T>(
        &self,
        handle_bytes: &[u8],
        request: &Request<T>,
    ) -> Result<(CallerSession, PreparedQuery), Status> {
        let caller = caller(request)?;
        let handle = StatementHandle::decode_for(handle_bytes, &caller)?;
        let session = self.session_for(&caller, request);
        let prepared = session.prepare(&handle.sql).await?;
        let bound = prepared.bind(handle.parameter_values()?)?;
        Ok((session, bound))
    }

    /// Executes a planned query into the messages of its Flight stream.
    async fn query_messages(
        &self,
        session: CallerSession,
        query: PreparedQuery,
    ) -> Result<MessageStream, Status> {
        let warnings = session.warnings();
        for warning in &warnings {
            tracing::warn!(%warning, "deprecated product read");
        }
        let stream = session.execute(query).await?;
        let schema = stream.schema();
        let sent = stream.bytes_sent();
        let batches = stream.map_err(Status::from);
        // Warnings travel as the app metadata of the stream's first message.
        let notice = (!warnings.is_empty()).then(|| format!("warning: {}", warnings.join("; ")));
        let messages = encode_messages(schema, batches, notice)?;
        // Counted as each message leaves, before the stream's end (and the
        // query's record) is reached.
        Ok(Box::pin(messages.inspect_ok(move |message| {
            let bytes = message.header.len() + message.body_len();
            sent.fetch_add(bytes as u64, std::sync::atomic::Ordering::Relaxed);
        })))
    }

    /// The same, as the Flight data of the trait's DoGet methods (DoGet
    /// itself is answered by `do_get`, from the messages).
    async fn stream_query(
        &self,
        session: CallerSession,
        query: PreparedQuery,
    ) -> Result<Response<FlightDataStream>, Status> {
        Ok(as_flight_data(self.query_messages(session, query).await?))
    }
}

/// The caller's bearer token, for sources that forward it.
fn token<T>(request: &Request<T>) -> Option<ForwardedToken> {
    request.extensions().get::<ForwardedToken>().cloned()
}

/// The statement handle a query ticket (a statement's or a prepared
/// statement's) carries; none for the tickets of metadata commands.
fn statement_handle(ticket: &[u8]) -> Result<Option<bytes::Bytes>, Status> {
    let any = Any::decode(ticket).map_err(|e| undecodable("the ticket", e))?;
    if let Some(ticket) = any
        .unpack::<TicketStatementQuery>()
        .map_err(|e| undecodable("the ticket", e))?
    {
        return Ok(Some(ticket.statement_handle));
    }
    Ok(any
        .unpack::<CommandPreparedStatementQuery>()
        .map_err(|e| undecodable("the ticket", e))?
        .map(|command| command.prepared_statement_handle))
}

/// `what` (a ticket, a command) is not the message it should be.
fn undecodable(what: &str, error: impl std::fmt::Display) -> Status {
    ProtocolError::BadRequest(format!("{what} does not decode: {error}")).into()
}

/// Refuses a query ticket issued to someone other than `caller`, as DoGet
/// does.
fn check_ticket_owner(ticket: &[u8], caller: &CallerIdentity) -> Result<(), Status> {
    if let Some(handle) = statement_handle(ticket)? {
        StatementHandle::decode_for(&handle, caller)?;
    }
    Ok(())
}

/// The identity the auth layer attached to the request.
fn caller<T>(request: &Request<T>) -> Result<CallerIdentity, Status> {
    request
        .extensions()
        .get::<CallerIdentity>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no verified caller on this request"))
}

/// Column metadata key of Flight SQL for a column's description.
const REMARKS: &str = "ARROW:FLIGHT:SQL:REMARKS";

/// The product's schema as the caller sees it, each column that the
/// product's contract describes carrying its description as remarks.
fn with_remarks(product: &crate::query::VisibleProduct) -> arrow::datatypes::Schema {
    let contract = &product.product.config.columns;
    let fields: Vec<arrow::datatypes::Field> = product
        .schema
        .fields()
        .iter()
        .map(|field| {
            let described = contract
                .iter()
                .find(|c| c.name == *field.name())
                .and_then(|c| c.description.clone());
            match described {
                Some(remarks) => {
                    let mut metadata = field.metadata().clone();
                    metadata.insert(REMARKS.to_string(), remarks);
                    field.as_ref().clone().with_metadata(metadata)
                }
                None => field.as_ref().clone(),
            }
        })
        .collect();
    arrow::datatypes::Schema::new_with_metadata(fields, product.schema.metadata().clone())
}

/// How long a login waits for a password-check slot.
const LOGIN_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// `batches` as Flight messages, `app_metadata` on the first.
fn encode_messages(
    schema: SchemaRef,
    batches: impl Stream<Item = Result<RecordBatch, Status>> + Send + 'static,
    app_metadata: Option<String>,
) -> Result<MessageStream, Status> {
    let mut encoder = encode::FlightEncoder::new(&schema).map_err(encoding)?;
    let first = encoder.schema(&schema, app_metadata.map(bytes::Bytes::from));
    let rest = batches
        .map(move |batch| encoder.batch(&batch?).map_err(encoding))
        .map_ok(|messages| futures::stream::iter(messages.into_iter().map(Ok)))
        .try_flatten();
    Ok(Box::pin(
        futures::stream::once(async { Ok(first) }).chain(rest),
    ))
}

/// `batches` as Flight data, `app_metadata` on the first message.
fn encode_stream(
    schema: SchemaRef,
    batches: impl Stream<Item = Result<RecordBatch, Status>> + Send + 'static,
    app_metadata: Option<String>,
) -> Result<Response<FlightDataStream>, Status> {
    Ok(as_flight_data(encode_messages(
        schema,
        batches,
        app_metadata,
    )?))
}

/// `messages` as the Flight data of the trait's DoGet methods, each body
/// joined into one buffer.
fn as_flight_data(messages: MessageStream) -> Response<FlightDataStream> {
    Response::new(Box::pin(messages.map_ok(FlightData::from)))
}

fn single_batch(batch: RecordBatch) -> Result<Response<FlightDataStream>, Status> {
    encode_stream(
        batch.schema(),
        futures::stream::once(async { Ok(batch) }),
        None,
    )
}

fn schema_bytes(schema: &Schema) -> Result<bytes::Bytes, Status> {
    let IpcMessage(bytes) = SchemaAsIpc::new(schema, &IpcWriteOptions::default())
        .try_into()
        .map_err(|e: arrow::error::ArrowError| ProtocolError::Encoding(e.to_string()))?;
    Ok(bytes)
}

/// A FlightInfo with one endpoint (no location: reuse this connection) whose
/// ticket is `ticket`; records unknown, so no count is disclosed before the
/// query runs.
fn flight_info(
    schema: &Schema,
    ticket: Any,
    descriptor: FlightDescriptor,
) -> Result<Response<FlightInfo>, Status> {
    let info = FlightInfo::new()
        .try_with_schema(schema)
        .map_err(|e| ProtocolError::Encoding(e.to_string()))?
        .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(ticket.encode_to_vec())))
        .with_descriptor(descriptor)
        .with_total_records(-1)
        .with_total_bytes(-1);
    Ok(Response::new(info))
}

fn no_transactions() -> Status {
    ProtocolError::Unsupported(
        "transactions are not supported: meshgate is read-only, and each statement reads the data \
         as it is when the statement runs"
            .into(),
    )
    .into()
}

fn no_substrait() -> Status {
    ProtocolError::Unsupported("Substrait plans are not accepted: send the query as SQL".into())
        .into()
}

fn read_only(what: &str) -> Status {
    ProtocolError::ReadOnly(format!("{what} is refused: meshgate is read-only")).into()
}

/// Session actions of the Flight protocol, answered with their own messages.
mod session_actions {
    use std::collections::HashMap;

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct SetSessionOptionsRequest {
        #[prost(map = "string, bytes", tag = "1")]
        pub session_options: HashMap<String, Vec<u8>>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct SetSessionOptionsResult {
        #[prost(map = "string, message", tag = "1")]
        pub errors: HashMap<String, SessionOptionError>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct SessionOptionError {
        /// `INVALID_NAME` = 1: meshgate has no client-settable options.
        #[prost(int32, tag = "1")]
        pub value: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub(super) struct CloseSessionResult {
        /// `CLOSED` = 1.
        #[prost(int32, tag = "1")]
        pub status: i32,
    }
}

#[tonic::async_trait]
impl FlightSqlService for MeshFlightService {
    type FlightService = MeshFlightService;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<
        Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>,
        Status,
    > {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let authenticator = Arc::clone(&self.authenticator);
        // argon2 is deliberately slow and takes 19 MiB per check: a few run
        // at once, off the async workers, so that a burst of logins (or a
        // flood of bad ones) queues instead of exhausting memory.
        let slot = tokio::time::timeout(LOGIN_WAIT, Arc::clone(&self.logins).acquire_owned())
            .await
            .map_err(|_| Status::resource_exhausted("too many logins at once; try again"))?
            .map_err(|_| Status::unavailable("the gateway is shutting down"))?;
        let (_, token) = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            authenticator.login(header.as_deref())
        })
        .await
        .map_err(|_| Status::internal("login was interrupted"))??;
        let answer = HandshakeResponse {
            protocol_version: 0,
            payload: token.clone().into(),
        };
        let stream: Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>> =
            Box::pin(futures::stream::iter([Ok(answer)]));
        let mut response = Response::new(stream);
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| Status::internal("minted token is not a valid header value"))?;
        response.metadata_mut().insert("authorization", value);
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let caller = caller(&request)?;
        let session = self.session_for(&caller, &request);
        let prepared = session.prepare(&query.query).await?;
        if prepared.parameter_count() > 0 {
            return Err(QueryError::Parameters(
                "the statement has placeholders: use a prepared statement and bind values".into(),
            )
            .into());
        }
        session.plan_ahead(&prepared);
        let handle = StatementHandle::new(&caller, &query.query).encode();
        let ticket = TicketStatementQuery {
            statement_handle: handle,
        };
        flight_info(
            &prepared.result_schema(),
            ticket.as_any(),
            request.into_inner(),
        )
    }

    async fn get_flight_info_prepared_statement(
        &self,
        command: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        // A client may present the handle it prepared after binding to it.
        let command = CommandPreparedStatementQuery {
            prepared_statement_handle: self.bindings.resolve(&command.prepared_statement_handle),
        };
        let (session, bound) = self
            .plan_handle(&command.prepared_statement_handle, &request)
            .await?;
        session.plan_ahead(&bound);
        flight_info(
            &bound.result_schema(),
            command.as_any(),
            request.into_inner(),
        )
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        flight_info(&schema, query.as_any(), request.into_inner())
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        flight_info(&schema, query.as_any(), request.into_inner())
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        flight_info(&schema, query.as_any(), request.into_inner())
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        flight_info(&schema, query.as_any(), request.into_inner())
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder(&metadata::SQL_INFO).schema();
        flight_info(&schema, query.as_any(), request.into_inner())
    }

    async fn get_flight_info_primary_keys(
        &self,
        query: CommandGetPrimaryKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        flight_info(
            &metadata::PRIMARY_KEYS_SCHEMA,
            query.as_any(),
            request.into_inner(),
        )
    }

    async fn get_flight_info_exported_keys(
        &self,
        query: CommandGetExportedKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        flight_info(
            &metadata::FOREIGN_KEYS_SCHEMA,
            query.as_any(),
            request.into_inner(),
        )
    }

    async fn get_flight_info_imported_keys(
        &self,
        query: CommandGetImportedKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        flight_info(
            &metadata::FOREIGN_KEYS_SCHEMA,
            query.as_any(),
            request.into_inner(),
        )
    }

    async fn get_flight_info_cross_reference(
        &self,
        query: CommandGetCrossReference,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        flight_info(
            &metadata::FOREIGN_KEYS_SCHEMA,
            query.as_any(),
            request.into_inner(),
        )
    }

    async fn get_flight_info_xdbc_type_info(
        &self,
        query: CommandGetXdbcTypeInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder(&metadata::XDBC_TYPE_INFO).schema();
        flight_info(&schema, query.as_any(), request.into_inner())
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<FlightDataStream>, Status> {
        let (session, bound) = self.plan_handle(&ticket.statement_handle, &request).await?;
        self.stream_query(session, bound).await
    }

    async fn do_get_prepared_statement(
        &self,
        command: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<FlightDataStream>, Status> {
        let (session, bound) = self
            .plan_handle(&command.prepared_statement_handle, &request)
            .await?;
        self.stream_query(session, bound).await
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<FlightDataStream>, Status> {
        caller(&request)?;
        let mut builder = query.into_builder();
        builder.append(CATALOG_NAME);
        single_batch(builder.build().map_err(encoding)?)
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<FlightDataStream>, Status> {
        let caller = caller(&request)?;
        let mut builder = query.into_builder();
        for domain in self.engine.visible_domains(&caller) {
            builder.append(CATALOG_NAME, domain);
        }
        single_batch(builder.build().map_err(encoding)?)
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<FlightDataStream>, Status> {
        let caller = caller(&request)?;
        let mut builder = query.into_builder();
        for product in self.engine.visible_products(&caller).await {
            builder
                .append(
                    CATALOG_NAME,
                    &product.name.domain,
                    &product.name.product,
                    product.table_type,
                    &with_remarks(&product),
                )
                .map_err(encoding)?;
        }
        single_batch(builder.build().map_err(encoding)?)
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> Result<Response<FlightDataStream>, Status> {
        caller(&request)?;
        let mut builder = query.into_builder();
        builder.append("TABLE");
        builder.append("VIEW");
        single_batch(builder.build().map_err(encoding)?)
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<Response<FlightDataStream>, Status> {
        caller(&request)?;
        let batch = query
            .into_builder(&metadata::SQL_INFO)
            .build()
            .map_err(encoding)?;
        single_batch(batch)
    }

    async fn do_get_primary_keys(
        &self,
        _query: CommandGetPrimaryKeys,
        request: Request<Ticket>,
    ) -> Result<Response<FlightDataStream>, Status> {
        caller(&request)?;
        single_batch(metadata::empty_batch(&metadata::PRIMARY_KEYS_SCHEMA))
    }

    async fn do_get_exported_keys(
        &self,
        _query: CommandGetExportedKeys,
        request: Request<Ticket>,
    ) -> Result<Response<FlightDataStream>, Status> {
        caller(&request)?;
        single_batch(metadata::empty_batch(&metadata::FOREIGN_KEYS_SCHEMA))
    }

    async fn do_get_imported_keys(
        &self,
        _query: CommandGetImportedKeys,
        request: Request<Ticket>,
    ) -> Result<Response<FlightDataStream>, Status> {
        caller(&request)?;
        single_batch(metadata::empty_batch(&metadata::FOREIGN_KEYS_SCHEMA))
    }

    async fn do_get_cross_reference(
        &self,
        _query: CommandGetCrossReference,
        request: Request<Ticket>,
    ) -> Result<Response<FlightDataStream>, Status> {
        caller(&request)?;
        single_batch(metadata::empty_batch(&metadata::FOREIGN_KEYS_SCHEMA))
    }

    async fn do_get_xdbc_type_info(
        &self,
        query: CommandGetXdbcTypeInfo,
        request: Request<Ticket>,
    ) -> Result<Response<FlightDataStream>, Status> {
        caller(&request)?;
        let batch = query
            .into_builder(&metadata::XDBC_TYPE_INFO)
            .build()
            .map_err(encoding)?;
        single_batch(batch)
    }

    async fn do_put_statement_update(
        &self,
        _command: CommandStatementUpdate,
        _request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        Err(read_only("an update statement"))
    }

    async fn do_put_statement_ingest(
        &self,
        _command: CommandStatementIngest,
        _request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        Err(read_only("bulk ingestion"))
    }

    async fn do_put_prepared_statement_update(
        &self,
        _command: CommandPreparedStatementUpdate,
        _request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        Err(read_only("a prepared update"))
    }

    async fn do_put_substrait_plan(
        &self,
        _command: CommandStatementSubstraitPlan,
        _request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        Err(read_only("a Substrait plan upload"))
    }

    async fn do_put_prepared_statement_query(
        &self,
        command: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        let caller = caller(&request)?;
        let session = self.session_for(&caller, &request);
        let handle = StatementHandle::decode_for(&command.prepared_statement_handle, &caller)?;
        let batches: Vec<RecordBatch> = FlightRecordBatchStream::new_from_flight_data(
            request.into_inner().map_err(FlightError::from),
        )
        .try_collect()
        .await
        .map_err(|e| ProtocolError::BadRequest(format!("cannot read the bound parameters: {e}")))?;
        let row = single_parameter_row(batches)?;
        let handle = handle.with_parameters(&row)?;
        // Check the values against the statement now, so a bad bind fails here.
        session
            .prepare(&handle.sql)
            .await?
            .bind(handle.parameter_values()?)?;
        let bound = handle.encode();
        self.bindings
            .remember(command.prepared_statement_handle, bound.clone());
        Ok(DoPutPreparedStatementResult {
            prepared_statement_handle: Some(bound),
        })
    }

    async fn do_put_error_callback(
        &self,
        _request: Request<PeekableFlightDataStream>,
        error: arrow_flight::sql::server::DoPutError,
    ) -> Result<Response<<Self as FlightService>::DoPutStream>, Status> {
        Err(ProtocolError::BadRequest(format!("DoPut: {error}")).into())
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let caller = caller(&request)?;
        let session = self.session_for(&caller, &request);
        let prepared = session.prepare(&query.query).await?;
        // ADBC and JDBC ask for the flight info and fetch next.
        session.plan_ahead(&prepared);
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: StatementHandle::prepared(&caller, &query.query).encode(),
            dataset_schema: schema_bytes(&prepared.result_schema())?,
            parameter_schema: schema_bytes(&prepared.parameter_schema())?,
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<(), Status> {
        let caller = caller(&request)?;
        // A handle holds its statement; closing checks it and forgets the
        // parameters last bound to it.
        StatementHandle::decode_for(&query.prepared_statement_handle, &caller)?;
        self.bindings.forget(&query.prepared_statement_handle);
        Ok(())
    }

    async fn do_action_cancel_query(
        &self,
        query: ActionCancelQueryRequest,
        request: Request<Action>,
    ) -> Result<ActionCancelQueryResult, Status> {
        let caller = caller(&request)?;
        let info = FlightInfo::decode(query.info)
            .map_err(|_| ProtocolError::BadRequest("malformed CancelQuery request".into()))?;
        self.cancel(&info, &caller)?;
        // `CancelQuery`'s result values are those of `CancelStatus`.
        Ok(ActionCancelQueryResult {
            result: CancelStatus::Cancelled as i32,
        })
    }

    async fn get_flight_info_fallback(
        &self,
        command: Command,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let message = match command.type_url() {
            "" => "the descriptor carries no Flight SQL command: meshgate answers the commands of \
                   Flight SQL (a statement query, a prepared statement, the metadata commands)"
                .to_string(),
            other => format!("`{other}` is not a Flight SQL command meshgate answers"),
        };
        Err(ProtocolError::Unsupported(message).into())
    }

    async fn do_get_fallback(
        &self,
        _request: Request<Ticket>,
        _message: Any,
    ) -> Result<Response<FlightDataStream>, Status> {
        Err(ProtocolError::BadRequest(
            "the ticket is not one meshgate issued: fetch the tickets of a FlightInfo".into(),
        )
        .into())
    }

    async fn do_action_begin_transaction(
        &self,
        _query: ActionBeginTransactionRequest,
        _request: Request<Action>,
    ) -> Result<ActionBeginTransactionResult, Status> {
        Err(no_transactions())
    }

    async fn do_action_end_transaction(
        &self,
        _query: ActionEndTransactionRequest,
        _request: Request<Action>,
    ) -> Result<(), Status> {
        Err(no_transactions())
    }

    async fn do_action_begin_savepoint(
        &self,
        _query: ActionBeginSavepointRequest,
        _request: Request<Action>,
    ) -> Result<ActionBeginSavepointResult, Status> {
        Err(no_transactions())
    }

    async fn do_action_end_savepoint(
        &self,
        _query: ActionEndSavepointRequest,
        _request: Request<Action>,
    ) -> Result<(), Status> {
        Err(no_transactions())
    }

    async fn get_flight_info_substrait_plan(
        &self,
        _query: CommandStatementSubstraitPlan,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Err(no_substrait())
    }

    async fn do_action_create_prepared_substrait_plan(
        &self,
        _query: ActionCreatePreparedSubstraitPlanRequest,
        _request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        Err(no_substrait())
    }

    async fn do_action_fallback(
        &self,
        request: Request<Action>,
    ) -> Result<Response<<Self as FlightService>::DoActionStream>, Status> {
        let caller = caller(&request)?;
        let action = request.into_inner();
        let malformed = |what: &str| ProtocolError::BadRequest(format!("malformed {what} request"));
        let body: Vec<u8> = match action.r#type.as_str() {
            "CancelFlightInfo" => {
                let info = CancelFlightInfoRequest::decode(action.body)
                    .map_err(|_| malformed("CancelFlightInfo"))?
                    .info
                    .ok_or_else(|| malformed("CancelFlightInfo"))?;
                self.cancel(&info, &caller)?;
                CancelFlightInfoResult::new(CancelStatus::Cancelled).encode_to_vec()
            }
            "RenewFlightEndpoint" => {
                let endpoint = RenewFlightEndpointRequest::decode(action.body)
                    .map_err(|_| malformed("RenewFlightEndpoint"))?
                    .endpoint
                    .ok_or_else(|| malformed("RenewFlightEndpoint"))?;
                // Tickets hold no server state and do not expire: the
                // caller's own endpoint is valid as it is.
                if let Some(ticket) = &endpoint.ticket {
                    check_ticket_owner(&ticket.ticket, &caller)?;
                }
                endpoint.encode_to_vec()
            }
            "CloseSession" => session_actions::CloseSessionResult { status: 1 }.encode_to_vec(),
            "GetSessionOptions" => Vec::new(),
            "SetSessionOptions" => {
                let wanted = session_actions::SetSessionOptionsRequest::decode(action.body)
                    .map_err(|_| ProtocolError::BadRequest("malformed SetSessionOptions".into()))?;
                let errors: HashMap<_, _> = wanted
                    .session_options
                    .into_keys()
                    .map(|name| (name, session_actions::SessionOptionError { value: 1 }))
                    .collect();
                session_actions::SetSessionOptionsResult { errors }.encode_to_vec()
            }
            other => {
                return Err(ProtocolError::Unsupported(format!(
                    "unknown action `{other}` (ListActions lists the actions meshgate takes)"
                ))
                .into());
            }
        };
        let result = arrow_flight::Result { body: body.into() };
        Ok(Response::new(Box::pin(futures::stream::iter([Ok(result)]))))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

fn encoding(error: impl std::fmt::Display) -> Status {
    ProtocolError::Encoding(error.to_string()).into()
}
