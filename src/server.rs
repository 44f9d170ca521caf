//! Serving: opening a gateway from its config and running the Flight SQL
//! endpoint until shutdown.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use crate::audit::AuditLog;
use crate::auth::{AuthError, Authenticator, AuthenticatorRef};
use crate::catalog::{Mesh, PublicationProblem};
use crate::config::MeshConfig;
use crate::flight::{AuthLayer, MeshFlightService};
use crate::query::QueryEngine;

mod coalesce;

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
    /// Published products that lack what consumers need (owner, description).
    pub warnings: Vec<PublicationProblem>,
}

impl Gateway {
    pub async fn open(config: MeshConfig) -> Result<Self, ServerError> {
        let authenticator = Arc::new(Authenticator::new(&config.auth)?);
        // Unreadable certificate files fail the start, not the first client.
        if let Some(tls) = &config.server.tls {
            server_tls(tls)?;
        }
        crate::catalog::set_row_group_cache(config.limits.row_group_cache);
        crate::catalog::set_page_cache(config.limits.page_cache);
        let (mesh, problems) = Mesh::open(&config).await.map_err(ServerError::Catalog)?;
        for problem in &problems {
            tracing::error!(product = %problem.product, reason = %problem.reason, "product not published");
        }
        let warnings = crate::catalog::metadata_warnings(&config);
        for warning in &warnings {
            tracing::warn!(product = %warning.product, reason = %warning.reason, "product published without what consumers need");
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
        engine.metrics().config_loaded();
        Ok(Self {
            config,
            authenticator,
            engine,
            problems,
            warnings,
        })
    }

    /// Loads the config file again and, when it is valid, publishes its
    /// catalog, policies and users in place of the current ones. A config
    /// that does not load, or that would publish nothing while products are
    /// published now, is rejected and the current one stays. Queries already
    /// running finish on the config they started with.
    pub async fn reload(&self) -> Result<Reloaded, ServerError> {
        let result = self.try_reload().await;
        self.engine.metrics().config_reloaded(result.is_ok());
        match &result {
            Ok(reloaded) => tracing::info!(
                products = reloaded.products,
                refused = reloaded.problems.len(),
                "config reloaded"
            ),
            Err(e) => {
                tracing::error!(error = %e, "config reload rejected; the current config stays")
            }
        }
        result
    }

    async fn try_reload(&self) -> Result<Reloaded, ServerError> {
        let config = MeshConfig::load(&self.config.gateway_file)?;
        let (mesh, problems) = Mesh::open(&config).await.map_err(ServerError::Catalog)?;
        let products = mesh.products().count();
        let published = self.engine.mesh().products().count();
        if products == 0 && published > 0 {
            let reasons: Vec<String> = problems.iter().map(ToString::to_string).collect();
            return Err(ServerError::Catalog(format!(
                "the new config publishes no product (refused: {}); the {published} products published now stay",
                if reasons.is_empty() {
                    "none".to_string()
                } else {
                    reasons.join("; ")
                }
            )));
        }
        for (section, changed) in [
            ("[server]", config.server != self.config.server),
            ("[limits]", config.limits != self.config.limits),
            ("[audit]", config.audit != self.config.audit),
        ] {
            if changed {
                tracing::warn!(
                    "config reload: changes to {section} take effect at the next restart"
                );
            }
        }
        self.authenticator.reload(&config.auth)?;
        self.engine
            .replace(Arc::new(mesh), config.governance.admin_groups.clone());
        for problem in &problems {
            tracing::error!(product = %problem.product, reason = %problem.reason, "product not published");
        }
        Ok(Reloaded {
            products,
            problems,
            files: config_files(&config),
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
        let catalog =
            crate::api::Catalog::new(Arc::clone(&self.engine), Arc::clone(&self.authenticator));
        let authenticator = Arc::clone(&self.authenticator);
        let router = axum::Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .nest("/api/v1", api_routes(catalog, authenticator))
            .route(
                "/readyz",
                get(move || async move {
                    // Ready when a config is loaded and publishes products;
                    // each source's state is listed (a source that is down
                    // fails only its own products).
                    let mesh = ready.mesh();
                    let products = mesh.products().count();
                    let draining = ready.is_draining();
                    let mut body = if draining {
                        "not ready: shutting down\n".to_string()
                    } else if products > 0 {
                        format!("ready: {products} products published\n")
                    } else {
                        "not ready: no product is published\n".to_string()
                    };
                    for (source, state) in mesh.probe_sources().await {
                        match state {
                            Ok(()) => body.push_str(&format!("source {source}: reachable\n")),
                            Err(e) => {
                                body.push_str(&format!("source {source}: unreachable: {e}\n"))
                            }
                        }
                    }
                    let status = if products > 0 && !draining {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    (status, body)
                }),
            )
            .route(
                "/metrics",
                get(move || async move {
                    let mesh = engine.mesh();
                    let (freshness, sources) =
                        futures::join!(mesh.freshness(), mesh.probe_sources());
                    let sources: Vec<(String, bool)> = sources
                        .into_iter()
                        .map(|(name, state)| (name, state.is_ok()))
                        .collect();
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        engine
                            .metrics()
                            .render(mesh.products().count(), &freshness, &sources),
                    )
                }),
            );
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await?;
        Ok(())
    }

    /// Serves Flight SQL on `listener`. When `shutdown` completes the
    /// gateway drains: the listening socket closes (new connections are
    /// refused), new queries are refused, running queries stream to their
    /// end, and connections stay open a moment longer so that clients can
    /// close their statements; then every connection is closed and this
    /// returns. (The caller bounds the whole by `server.shutdown_timeout`.)
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
        // Each connection's writes are gathered (see `coalesce`): without
        // it, a streamed result leaves in 16 KiB writes.
        let incoming = futures::StreamExt::map(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            |accepted| accepted.map(coalesce::Coalescing::new),
        );
        let (stop_accepting, accepting) = tokio::sync::watch::channel(false);
        let engine = Arc::clone(&self.engine);
        let drained = async move {
            shutdown.await;
            engine.start_draining();
            let _ = stop_accepting.send(true);
            wait_until_idle(&engine).await;
        };
        builder
            .http2_adaptive_window(Some(true))
            .layer(AuthLayer::new(Arc::clone(&self.authenticator)))
            .add_service(service.into_server())
            .add_service(
                crate::api::Catalog::new(Arc::clone(&self.engine), Arc::clone(&self.authenticator))
                    .into_server(),
            )
            .serve_with_incoming_shutdown(until_draining(incoming, accepting), drained)
            .await?;
        Ok(())
    }
}

/// The catalog API as JSON: `GET /api/v1/domains`, `GET /api/v1/products`
/// (query parameters `domain`, `tag`, `owner`, `search`), `GET
/// /api/v1/products/{domain.product}`, with the caller's bearer token.
fn api_routes(catalog: crate::api::Catalog, authenticator: AuthenticatorRef) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route("/domains", get(json_api::domains))
        .route("/products", get(json_api::products))
        .route("/products/{name}", get(json_api::product))
        .with_state(json_api::ApiState {
            catalog,
            authenticator,
        })
}

/// The handlers of the JSON catalog API.
mod json_api {
    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, StatusCode, Uri};
    use axum::response::{IntoResponse, Response};

    use crate::api::proto;
    use crate::auth::{AuthError, AuthenticatorRef, CallerIdentity};

    #[derive(Clone)]
    pub(super) struct ApiState {
        pub(super) catalog: crate::api::Catalog,
        pub(super) authenticator: AuthenticatorRef,
    }

    fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response {
        let body = serde_json::to_string_pretty(value).unwrap_or_else(|_| "{}".into());
        (
            status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body + "\n",
        )
            .into_response()
    }

    fn error(status: StatusCode, message: String) -> Response {
        json(status, &serde_json::json!({ "error": message }))
    }

    /// The caller the `Authorization` header names.
    fn caller(state: &ApiState, headers: &HeaderMap) -> Result<CallerIdentity, AuthError> {
        let header = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        state.authenticator.authenticate_header(header)
    }

    fn unauthorized(e: AuthError) -> Response {
        error(StatusCode::UNAUTHORIZED, e.to_string())
    }

    pub(super) async fn domains(State(state): State<ApiState>, headers: HeaderMap) -> Response {
        match caller(&state, &headers) {
            Ok(caller) => {
                let domains = state.catalog.domains(&caller).await;
                json(StatusCode::OK, &proto::ListDomainsResponse { domains })
            }
            Err(e) => unauthorized(e),
        }
    }

    pub(super) async fn products(
        State(state): State<ApiState>,
        headers: HeaderMap,
        uri: Uri,
    ) -> Response {
        let caller = match caller(&state, &headers) {
            Ok(caller) => caller,
            Err(e) => return unauthorized(e),
        };
        let mut filter = proto::ListProductsRequest::default();
        for (key, value) in url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
            let value = value.into_owned();
            match key.as_ref() {
                "domain" => filter.domain = value,
                "tag" => filter.tag = value,
                "owner" => filter.owner = value,
                "search" => filter.search = value,
                other => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("unknown parameter `{other}`: use domain, tag, owner or search"),
                    );
                }
            }
        }
        let products = state.catalog.products(&caller, &filter).await;
        json(StatusCode::OK, &proto::ListProductsResponse { products })
    }

    pub(super) async fn product(
        State(state): State<ApiState>,
        headers: HeaderMap,
        Path(name): Path<String>,
    ) -> Response {
        let caller = match caller(&state, &headers) {
            Ok(caller) => caller,
            Err(e) => return unauthorized(e),
        };
        match state.catalog.product(&caller, &name).await {
            Ok(found) => json(StatusCode::OK, &found),
            Err(e) => error(StatusCode::NOT_FOUND, e.to_string()),
        }
    }
}

/// How long connections stay open after the last running query ended, for
/// clients to close their statements (ADBC closes its prepared statement
/// right after reading the last batch).
const DRAIN_LINGER: Duration = Duration::from_millis(500);

/// Returns once no query has run for [`DRAIN_LINGER`].
async fn wait_until_idle(engine: &QueryEngine) {
    loop {
        if engine.metrics().active_queries() == 0 {
            tokio::time::sleep(DRAIN_LINGER).await;
            if engine.metrics().active_queries() == 0 {
                return;
            }
        } else {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The accepted connections of `incoming` until `draining` turns true; then
/// the listening socket is closed (new connections are refused at once) and
/// the stream waits, without ending, for the server's shutdown signal.
fn until_draining<S, T, E>(
    incoming: S,
    draining: tokio::sync::watch::Receiver<bool>,
) -> impl futures::Stream<Item = Result<T, E>>
where
    S: futures::Stream<Item = Result<T, E>> + Unpin,
{
    use futures::StreamExt;
    futures::stream::unfold(
        (Some(incoming), draining),
        |(mut incoming, mut draining)| async move {
            loop {
                let Some(accepting) = incoming.as_mut() else {
                    std::future::pending::<()>().await;
                    continue;
                };
                let next = tokio::select! {
                    next = accepting.next() => Some(next),
                    _ = draining.wait_for(|d| *d) => None,
                };
                match next {
                    Some(next) => return next.map(|item| (item, (incoming, draining))),
                    None => incoming = None,
                }
            }
        },
    )
}

/// What a successful reload published.
#[derive(Debug)]
pub struct Reloaded {
    pub products: usize,
    /// Products of the new config that could not be published, and why.
    pub problems: Vec<PublicationProblem>,
    /// The files the new config is made of.
    pub files: Vec<PathBuf>,
}

/// The files a config is made of: the gateway file, the domain files and
/// the JWKS file.
pub fn config_files(config: &MeshConfig) -> Vec<PathBuf> {
    let mut files = vec![config.gateway_file.clone()];
    files.extend(config.domains.iter().map(|d| d.file.clone()));
    files.extend(config.auth.jwks_file.clone());
    files
}

/// What a file looks like from outside: changed when either part changes.
fn stamp(path: &PathBuf) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Reloads `gateway` on SIGHUP and whenever one of its config files changes
/// (checked every `poll`), for as long as the future is polled.
pub async fn reload_on_change(gateway: Arc<Gateway>, poll: Duration) {
    let mut files = config_files(&gateway.config);
    let mut stamps: Vec<_> = files.iter().map(stamp).collect();
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        let hangup_received = async {
            #[cfg(unix)]
            if let Some(hangup) = hangup.as_mut() {
                hangup.recv().await;
                return;
            }
            std::future::pending::<()>().await
        };
        let signalled = tokio::select! {
            () = hangup_received => true,
            () = tokio::time::sleep(poll) => false,
        };
        if signalled {
            tracing::info!("SIGHUP: reloading the config");
        } else {
            let now: Vec<_> = files.iter().map(stamp).collect();
            if now == stamps {
                continue;
            }
            // An editor may write a file in several steps: let it finish.
            tokio::time::sleep(Duration::from_millis(200)).await;
            tracing::info!("a config file changed: reloading the config");
        }
        stamps = files.iter().map(stamp).collect();
        if let Ok(reloaded) = gateway.reload().await {
            files = reloaded.files;
            stamps = files.iter().map(stamp).collect();
        }
    }
}
