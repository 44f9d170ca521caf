//! Authentication of every RPC but Handshake, as a tower layer: the bearer
//! token is verified before the call reaches the service, and the caller's
//! identity travels in the request extensions.

use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::Status;
use tower_layer::Layer;
use tower_service::Service;

use crate::auth::AuthenticatorRef;

/// The one call that may arrive without a token: it is how tokens are obtained.
const HANDSHAKE_PATH: &str = "/arrow.flight.protocol.FlightService/Handshake";

/// Adds bearer authentication to a gRPC service.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    authenticator: AuthenticatorRef,
}

impl AuthLayer {
    pub fn new(authenticator: AuthenticatorRef) -> Self {
        Self { authenticator }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Authenticated<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authenticated {
            inner,
            authenticator: std::sync::Arc::clone(&self.authenticator),
        }
    }
}

/// A service whose requests carry a verified [`crate::auth::CallerIdentity`].
#[derive(Debug, Clone)]
pub struct Authenticated<S> {
    inner: S,
    authenticator: AuthenticatorRef,
}

impl<S, RequestBody> Service<http::Request<RequestBody>> for Authenticated<S>
where
    S: Service<http::Request<RequestBody>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    RequestBody: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<RequestBody>) -> Self::Future {
        if request.uri().path() != HANDSHAKE_PATH {
            let header = request
                .headers()
                .get(http::header::AUTHORIZATION)
                .and_then(|value| value.to_str().ok());
            match self.authenticator.authenticate_header(header) {
                Ok(identity) => {
                    // Kept for sources that forward the caller's own token.
                    let token = header
                        .and_then(crate::auth::bearer_token)
                        .map(|token| crate::sources::ForwardedToken(token.into()));
                    request.extensions_mut().insert(identity);
                    if let Some(token) = token {
                        request.extensions_mut().insert(token);
                    }
                }
                Err(error) => {
                    let status = Status::from(error);
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            }
        }
        // The clone is ready only after poll_ready; call the polled one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move { inner.call(request).await })
    }
}
