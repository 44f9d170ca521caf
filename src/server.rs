//! Serving: opening a gateway from its config and running the Flight SQL
//! endpoint until shutdown.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

use crate::audit::AuditLog;
use crate::auth::{AuthError, Authenticator, AuthenticatorRef};
use crate::catalog::{Mesh, PublicationProblem};
use crate::config::MeshConfig;
use crate::flight::{AuthLayer, MeshFlightService};
use crate::query::QueryEngine;

/// Stack of the runtime's threads. Admitted statements can still nest
/// hundreds of levels deep, and plans and expressions are cloned, dropped and
/// evaluated recursively on these threads; only touched pages are committed.
const THREAD_STACK_BYTES: usize = 64 * 1024 * 1024;

/// The runtime meshgate serves on: multi-threaded, with deep stacks.
pub fn runtime_builder() -> tokio::runtime::Builder {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.thread_stack_size(THREAD_STACK_BYTES).enable_all();
    builder
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("auth: {0}")]
    Auth(#[from] AuthError),
    #[error("catalog: {0}")]
    Catalog(String),
    #[error("cannot listen: {0}")]
    Io(#[from] std::io::Error),
    #[error("server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// An opened gateway: authenticator and query engine over the mesh.
#[derive(Debug)]
pub struct Gateway {
    pub config: MeshConfig,
    pub authenticator: AuthenticatorRef,
    pub engine: Arc<QueryEngine>,
    /// Products that could not be published, and why.
    pub problems: Vec<PublicationProblem>,
}

impl Gateway {
    pub async fn open(config: MeshConfig) -> Result<Self, ServerError> {
        let authenticator = Arc::new(Authenticator::new(&config.auth)?);
        let (mesh, problems) = Mesh::open(&config).await.map_err(ServerError::Catalog)?;
        for problem in &problems {
            tracing::error!(product = %problem.product, reason = %problem.reason, "product not published");
        }
        let audit = Arc::new(
            AuditLog::open(&config.audit)
                .map_err(|e| ServerError::Catalog(format!("audit.output: cannot open: {e}")))?,
        );
        let engine = Arc::new(QueryEngine::new(
            Arc::new(mesh),
            config.limits.clone(),
            audit,
            config.governance.admin_groups.clone(),
        ));
        Ok(Self {
            config,
            authenticator,
            engine,
            problems,
        })
    }

    /// Serves `/healthz`, `/readyz` and Prometheus `/metrics` on `listener`
    /// until `shutdown` completes.
    pub async fn serve_http(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        use axum::http::StatusCode;
        use axum::routing::get;
        let engine = Arc::clone(&self.engine);
        let ready = Arc::clone(&self.engine);
        let router = axum::Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route(
                "/readyz",
                get(move || async move {
                    let products = ready.mesh().products().count();
                    if products > 0 {
                        (
                            StatusCode::OK,
                            format!("ready: {products} products published\n"),
                        )
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "not ready: no product is published\n".to_string(),
                        )
                    }
                }),
            )
            .route(
                "/metrics",
                get(move || async move {
                    let products = engine.mesh().products().count();
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        engine.metrics().render(products),
                    )
                }),
            );
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await?;
        Ok(())
    }

    /// Serves Flight SQL on `listener` until `shutdown` completes.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServerError> {
        let service =
            MeshFlightService::new(Arc::clone(&self.authenticator), Arc::clone(&self.engine));
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .http2_adaptive_window(Some(true))
            .layer(AuthLayer::new(Arc::clone(&self.authenticator)))
            .add_service(service.into_server())
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
            .await?;
        Ok(())
    }
}
