//! Serving: opening a gateway from its config and running the Flight SQL
//! endpoint until shutdown.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

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
    #[error("server.tls: {0}")]
    Tls(String),
}

/// The Flight endpoint's TLS settings: the server's certificate and key,
/// and, for mutual TLS, the CA that signs client certificates.
fn server_tls(
    tls: &crate::config::TlsConfig,
) -> Result<tonic::transport::ServerTlsConfig, ServerError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| ServerError::Tls(format!("{}: {e}", path.display())))
    };
    let identity =
        tonic::transport::Identity::from_pem(read(&tls.cert_file)?, read(&tls.key_file)?);
    let mut config = tonic::transport::ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &tls.client_ca_file {
        config = config.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
    }
    Ok(config)
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
        // Unreadable certificate files fail the start, not the first client.
        if let Some(tls) = &config.server.tls {
            server_tls(tls)?;
        }
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
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &self.config.server.tls {
            builder = builder
                .tls_config(server_tls(tls)?)
                .map_err(|e| ServerError::Tls(e.to_string()))?;
        }
        // Without TCP_NODELAY on each accepted connection, a small answer
        // waits for the client's delayed ACK: about 40 ms per query.
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        builder
            .http2_adaptive_window(Some(true))
            .layer(AuthLayer::new(Arc::clone(&self.authenticator)))
            .add_service(service.into_server())
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await?;
        Ok(())
    }
}
