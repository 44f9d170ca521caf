//! The one place where errors become gRPC statuses. User errors are logged at
//! info, faults at warn; the message sent is the error's own safe text.

use tonic::{Code, Status};

use crate::auth::AuthError;
use crate::query::QueryError;

/// How an error is logged: a caller's mistake at info, a fault at warn,
/// each under a label.
enum Logged {
    Info(&'static str),
    Warn(&'static str),
    Not,
}

/// The status of `code` carrying `message`, logged as `logged` says.
fn status(code: Code, message: String, logged: Logged) -> Status {
    match logged {
        Logged::Info(label) => tracing::info!(%message, "{label}"),
        Logged::Warn(label) => tracing::warn!(%message, "{label}"),
        Logged::Not => {}
    }
    Status::new(code, message)
}

impl From<QueryError> for Status {
    fn from(error: QueryError) -> Self {
        use Logged::{Info, Not, Warn};
        let (code, logged) = match &error {
            QueryError::Refused(_)
            | QueryError::Syntax(_)
            | QueryError::Invalid(_)
            | QueryError::Parameters(_)
            | QueryError::Execution(_) => (Code::InvalidArgument, Info("query rejected")),
            QueryError::NotFound(_) => (Code::NotFound, Info("query rejected")),
            QueryError::ResourcesExhausted(_) => (Code::ResourceExhausted, Warn("query failed")),
            QueryError::Timeout(_) => (Code::DeadlineExceeded, Info("query timed out")),
            QueryError::Source(_) => (Code::Unavailable, Warn("source failed")),
            QueryError::ShuttingDown => (Code::Unavailable, Not),
            QueryError::Internal(_) => (Code::Internal, Warn("internal error")),
        };
        status(code, error.to_string(), logged)
    }
}

impl From<AuthError> for Status {
    fn from(error: AuthError) -> Self {
        use Logged::{Info, Warn};
        let (code, logged) = match &error {
            AuthError::MissingCredentials
            | AuthError::MalformedHeader(_)
            | AuthError::InvalidToken(_)
            | AuthError::BadPassword => (Code::Unauthenticated, Info("authentication failed")),
            AuthError::Minting(_) | AuthError::Keys(_) => {
                (Code::Internal, Warn("authentication fault"))
            }
        };
        status(code, error.to_string(), logged)
    }
}

/// Errors of the Flight protocol itself: undecodable handles, bad uploads.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProtocolError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    WrongCaller(String),
    #[error("{0}")]
    ReadOnly(String),
    #[error("encoding failed: {0}")]
    Encoding(String),
    /// A request in a form the server does not take (a compressed one).
    #[error("{0}")]
    Unsupported(String),
    /// An answer too large for the protocol to carry.
    #[error("{0}")]
    TooLarge(String),
    /// A query stopped by its caller's cancel.
    #[error("{0}")]
    Cancelled(String),
    /// A request about a query that is not running here.
    #[error("{0}")]
    NotRunning(String),
}

impl From<ProtocolError> for Status {
    fn from(error: ProtocolError) -> Self {
        use Logged::{Info, Warn};
        let (code, logged) = match &error {
            ProtocolError::BadRequest(_) | ProtocolError::ReadOnly(_) => {
                (Code::InvalidArgument, Info("request rejected"))
            }
            ProtocolError::WrongCaller(_) => (Code::PermissionDenied, Info("request rejected")),
            ProtocolError::Encoding(_) => (Code::Internal, Warn("encoding fault")),
            ProtocolError::Unsupported(_) => (Code::Unimplemented, Info("request rejected")),
            ProtocolError::TooLarge(_) => (Code::ResourceExhausted, Info("answer too large")),
            ProtocolError::Cancelled(_) => (Code::Cancelled, Info("query cancelled")),
            ProtocolError::NotRunning(_) => (Code::NotFound, Info("request rejected")),
        };
        status(code, error.to_string(), logged)
    }
}
