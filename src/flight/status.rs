//! The one place where errors become gRPC statuses. User errors are logged at
//! info, faults at warn; the message sent is the error's own safe text.

use tonic::Status;

use crate::auth::AuthError;
use crate::query::QueryError;

impl From<QueryError> for Status {
    fn from(error: QueryError) -> Self {
        let message = error.to_string();
        match &error {
            QueryError::Refused(_)
            | QueryError::Syntax(_)
            | QueryError::Invalid(_)
            | QueryError::Parameters(_)
            | QueryError::Execution(_) => {
                tracing::info!(%message, "query rejected");
                Status::invalid_argument(message)
            }
            QueryError::NotFound(_) => {
                tracing::info!(%message, "query rejected");
                Status::not_found(message)
            }
            QueryError::ResourcesExhausted(_) => {
                tracing::warn!(%message, "query failed");
                Status::resource_exhausted(message)
            }
            QueryError::Timeout(_) => {
                tracing::info!(%message, "query timed out");
                Status::deadline_exceeded(message)
            }
            QueryError::Source(_) => {
                tracing::warn!(%message, "source failed");
                Status::unavailable(message)
            }
            QueryError::ShuttingDown => Status::unavailable(message),
            QueryError::Internal(_) => {
                tracing::warn!(%message, "internal error");
                Status::internal(message)
            }
        }
    }
}

impl From<AuthError> for Status {
    fn from(error: AuthError) -> Self {
        let message = error.to_string();
        match &error {
            AuthError::MissingCredentials
            | AuthError::MalformedHeader(_)
            | AuthError::InvalidToken(_)
            | AuthError::BadPassword => {
                tracing::info!(%message, "authentication failed");
                Status::unauthenticated(message)
            }
            AuthError::Minting(_) | AuthError::Keys(_) => {
                tracing::warn!(%message, "authentication fault");
                Status::internal(message)
            }
        }
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
}

impl From<ProtocolError> for Status {
    fn from(error: ProtocolError) -> Self {
        let message = error.to_string();
        match &error {
            ProtocolError::BadRequest(_) | ProtocolError::ReadOnly(_) => {
                tracing::info!(%message, "request rejected");
                Status::invalid_argument(message)
            }
            ProtocolError::WrongCaller(_) => {
                tracing::info!(%message, "request rejected");
                Status::permission_denied(message)
            }
            ProtocolError::Encoding(_) => {
                tracing::warn!(%message, "encoding fault");
                Status::internal(message)
            }
            ProtocolError::Unsupported(_) => {
                tracing::info!(%message, "request rejected");
                Status::unimplemented(message)
            }
            ProtocolError::TooLarge(_) => {
                tracing::info!(%message, "answer too large");
                Status::resource_exhausted(message)
            }
        }
    }
}
