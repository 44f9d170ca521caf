//! The Flight service's gRPC server: which calls the generated Flight SQL
//! server answers and which are answered here.
//!
//! DoGet streams its messages itself (see [`super::do_get`]). GetSchema and
//! ListActions are answered here because the generated dispatch cannot be
//! told how: it has no GetSchema, and it lists a fixed set of actions,
//! transactions and Substrait plans among them. The Flight calls meshgate
//! has no use for are refused with a message that says what to use. Every
//! other call goes to the generated server, whose statuses pass unchanged
//! but for one: a request that does not decode is answered with the debug
//! form of the decoder's error, which a sentence replaces.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use arrow_flight::flight_service_server::FlightServiceServer;
use arrow_flight::{ActionType, Empty, FlightDescriptor, SchemaResult};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use tonic::server::{Grpc, NamedService, ServerStreamingService, UnaryService};
use tonic::{Code, Status};
use tonic_prost::ProstCodec;
use tower_service::Service;

use super::{MAX_DECODING_MESSAGE_SIZE, MeshFlightService, do_get};

const SERVICE: &str = "/arrow.flight.protocol.FlightService/";

/// The Flight service's gRPC server (see the module's documentation).
#[derive(Debug, Clone)]
pub struct FlightServer {
    generated: FlightServiceServer<MeshFlightService>,
    service: Arc<MeshFlightService>,
}

impl FlightServer {
    pub(super) fn new(
        generated: FlightServiceServer<MeshFlightService>,
        service: MeshFlightService,
    ) -> Self {
        Self {
            generated,
            service: Arc::new(service),
        }
    }
}

impl NamedService for FlightServer {
    const NAME: &'static str = <FlightServiceServer<MeshFlightService> as NamedService>::NAME;
}

type Answer = BoxFuture<'static, Result<http::Response<tonic::body::Body>, Infallible>>;

impl Service<http::Request<tonic::body::Body>> for FlightServer {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Service::<http::Request<tonic::body::Body>>::poll_ready(&mut self.generated, cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let service = Arc::clone(&self.service);
        let method = request.uri().path().strip_prefix(SERVICE).unwrap_or("");
        match method {
            "DoGet" => Box::pin(async move { Ok(do_get::respond(&service, request).await) }),
            "GetSchema" => {
                Box::pin(async move { Ok(grpc().unary(GetSchema(service), request).await) })
            }
            "ListActions" => {
                Box::pin(async move { Ok(grpc().server_streaming(ListActions, request).await) })
            }
            "ListFlights" => refuse(
                "ListFlights is not supported: list the products with Flight SQL's GetTables",
            ),
            "PollFlightInfo" => refuse(
                "PollFlightInfo is not supported: GetFlightInfo answers at once, and the query \
                 runs when its ticket is fetched",
            ),
            "DoExchange" => refuse(
                "DoExchange is not supported: meshgate is read-only; query with Flight SQL \
                 commands",
            ),
            _ => {
                let answer = self.generated.call(request);
                Box::pin(async move { answer.await.map(with_clear_decode_errors) })
            }
        }
    }
}

/// tonic's handling of one call's messages, encoded with prost.
fn grpc<T, U>() -> Grpc<ProstCodec<T, U>>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    Grpc::new(ProstCodec::default()).max_decoding_message_size(MAX_DECODING_MESSAGE_SIZE)
}

fn refuse(message: &str) -> Answer {
    let status = Status::unimplemented(message);
    Box::pin(async move { Ok(status.into_http()) })
}

/// The generated server answers a request whose command or action body does
/// not decode with `DecodeError { description: .., stack: [] }`.
fn with_clear_decode_errors(
    mut response: http::Response<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    let undecodable = Status::from_header_map(response.headers()).is_some_and(|status| {
        status.code() == Code::InvalidArgument && status.message().starts_with("DecodeError {")
    });
    if undecodable {
        let clear = Status::invalid_argument(
            "the request does not decode: its command or action body is not the Flight SQL \
             message the call takes",
        );
        // Replaces the status headers; the message is plain ASCII.
        let _ = clear.add_header(response.headers_mut());
    }
    response
}

/// GetSchema: the schema a command's FlightInfo carries.
struct GetSchema(Arc<MeshFlightService>);

impl UnaryService<FlightDescriptor> for GetSchema {
    type Response = SchemaResult;
    type Future = BoxFuture<'static, Result<tonic::Response<SchemaResult>, Status>>;

    fn call(&mut self, request: tonic::Request<FlightDescriptor>) -> Self::Future {
        let service = Arc::clone(&self.0);
        Box::pin(async move { service.schema_of(request).await })
    }
}

/// ListActions: the actions DoAction takes.
struct ListActions;

/// Each action DoAction takes, with what it does.
const ACTIONS: [(&str, &str); 8] = [
    (
        "CreatePreparedStatement",
        "Plans a statement and answers with its handle and schemas \
         (ActionCreatePreparedStatementRequest → ActionCreatePreparedStatementResult)",
    ),
    (
        "ClosePreparedStatement",
        "Closes a prepared statement (ActionClosePreparedStatementRequest)",
    ),
    (
        "CancelFlightInfo",
        "Stops the caller's running fetches of a FlightInfo's tickets \
         (CancelFlightInfoRequest → CancelFlightInfoResult)",
    ),
    (
        "CancelQuery",
        "The same, as Flight SQL's older action (ActionCancelQueryRequest → \
         ActionCancelQueryResult)",
    ),
    (
        "RenewFlightEndpoint",
        "Answers with the endpoint as it is: tickets do not expire \
         (RenewFlightEndpointRequest → FlightEndpoint)",
    ),
    (
        "SetSessionOptions",
        "Answers that no option can be set (SetSessionOptionsRequest → \
         SetSessionOptionsResult)",
    ),
    (
        "GetSessionOptions",
        "Answers with no options (GetSessionOptionsRequest → GetSessionOptionsResult)",
    ),
    (
        "CloseSession",
        "Answers CLOSED (CloseSessionRequest → CloseSessionResult)",
    ),
];

impl ServerStreamingService<Empty> for ListActions {
    type Response = ActionType;
    type ResponseStream = BoxStream<'static, Result<ActionType, Status>>;
    type Future = BoxFuture<'static, Result<tonic::Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, _request: tonic::Request<Empty>) -> Self::Future {
        let actions = ACTIONS.map(|(name, description)| {
            Ok(ActionType {
                r#type: name.to_string(),
                description: description.to_string(),
            })
        });
        let stream: Self::ResponseStream = Box::pin(futures::stream::iter(actions));
        Box::pin(async move { Ok(tonic::Response::new(stream)) })
    }
}
