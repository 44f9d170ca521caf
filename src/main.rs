//! The `meshgate` command: serve, check, and the helpers around them.

use std::io::{BufRead, IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use meshgate::auth::{Authenticator, CallerIdentity, hash_password};
use meshgate::config::MeshConfig;
use meshgate::demo;
use meshgate::server::Gateway;

/// mimalloc gives freed memory back to the system a few milliseconds after
/// it is freed (see `meshgate::allocator`): with the system allocator,
/// memory freed by short-lived worker threads (argon2's 19 MiB per login,
/// query buffers) stays resident in per-thread arenas.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "meshgate",
    version,
    about = "A federated SQL gateway for a data mesh (Arrow Flight SQL)"
)]
struct Cli {
    /// Log lines as text or as JSON objects (one per line).
    #[arg(
        long,
        global = true,
        value_enum,
        env = "MESHGATE_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the mesh over Flight SQL. Without --config, serves the demo mesh.
    Serve {
        /// The gateway config file (meshgate.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Listen here instead of `server.flight_addr` (port 0 picks a free port).
        #[arg(long)]
        flight_addr: Option<SocketAddr>,
        /// Serve /healthz, /readyz and /metrics here instead of `server.http_addr`.
        #[arg(long)]
        http_addr: Option<SocketAddr>,
        /// Scale factor of the demo data generated on first start.
        #[arg(long, default_value_t = demo::DEFAULT_DEMO_SCALE)]
        demo_scale: f64,
    },
    /// Validate the config and show what would be published.
    Check {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Fail on warnings too (a product without owner or description).
        #[arg(long)]
        strict: bool,
        #[arg(long, default_value_t = demo::DEFAULT_DEMO_SCALE)]
        demo_scale: f64,
    },
    /// Hash a password (read from stdin) for `[[auth.users]]`.
    HashPassword,
    /// Mint a bearer token for a local user, with the configured secret.
    Token {
        #[arg(long)]
        user: String,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Show what a user would see of a product: columns, masks, row filter.
    ExplainAccess {
        /// A local user of the config, or any user name with --group/--attr.
        #[arg(long)]
        user: String,
        /// The product, `domain.product`.
        #[arg(long)]
        product: String,
        /// Groups of a user who is not in [[auth.users]] (repeatable).
        #[arg(long = "group")]
        groups: Vec<String>,
        /// Attributes `name=value` of a user who is not in [[auth.users]] (repeatable).
        #[arg(long = "attr")]
        attributes: Vec<String>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// List the products you can see, through the catalog API of a running
    /// gateway.
    Products {
        /// Only the products of this domain.
        #[arg(long)]
        domain: Option<String>,
        /// The gateway, `grpc://host:port` or `grpc+tls://host:port`
        /// (default: `server.flight_addr` of --config, or 127.0.0.1:50051).
        #[arg(long)]
        endpoint: Option<String>,
        /// A bearer token.
        #[arg(long, env = "MESHGATE_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Log in as this local user instead (password on stdin).
        #[arg(long, conflicts_with = "token")]
        user: Option<String>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Write the demo mesh (config and data) into a directory.
    Demo {
        dir: PathBuf,
        #[arg(long, default_value_t = demo::DEFAULT_DEMO_SCALE)]
        scale: f64,
    },
}

fn main() -> ExitCode {
    meshgate::allocator::configure();
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    let runtime = match meshgate::server::runtime_builder().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<ExitCode, String> {
    match command {
        Command::Serve {
            config,
            flight_addr,
            http_addr,
            demo_scale,
        } => serve(config, flight_addr, http_addr, demo_scale).await,
        Command::Check {
            config,
            strict,
            demo_scale,
        } => check(config, strict, demo_scale).await,
        Command::HashPassword => {
            let password = read_password()?;
            println!("{}", hash_password(&password));
            Ok(ExitCode::SUCCESS)
        }
        Command::Token { user, config } => {
            let config = load_config(config, None)?;
            let authenticator = Authenticator::new(&config.auth).map_err(|e| e.to_string())?;
            let token = if config.auth.hs256_secret.is_none() {
                return Err("minting needs auth.hs256_secret in the config".into());
            } else if config.auth.users.iter().any(|u| u.name == user) {
                authenticator.mint_for_local_user(&user)
            } else {
                authenticator.mint(&CallerIdentity {
                    user,
                    groups: Vec::new(),
                    attributes: Default::default(),
                })
            }
            .map_err(|e| e.to_string())?;
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
        Command::ExplainAccess {
            user,
            product,
            groups,
            attributes,
            config,
        } => {
            let config = load_config(config, Some(demo::DEFAULT_DEMO_SCALE))?;
            let identity = match config.auth.users.iter().find(|u| u.name == user) {
                Some(local) if groups.is_empty() && attributes.is_empty() => CallerIdentity {
                    user: local.name.clone(),
                    groups: local.groups.clone(),
                    attributes: local.attributes.clone(),
                },
                _ => CallerIdentity {
                    user,
                    groups,
                    attributes: attributes
                        .iter()
                        .map(|pair| {
                            pair.split_once('=')
                                .map(|(k, v)| (k.to_string(), v.to_string()))
                                .ok_or_else(|| format!("--attr `{pair}`: write name=value"))
                        })
                        .collect::<Result<_, _>>()?,
                },
            };
            let gateway = Gateway::open(config).await.map_err(|e| e.to_string())?;
            print!("{}", explain_access(&gateway, &identity, &product)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Products {
            domain,
            endpoint,
            token,
            user,
            config,
        } => {
            let endpoint = match (endpoint, config) {
                (Some(endpoint), _) => endpoint,
                (None, Some(config)) => {
                    let config = MeshConfig::load(&config).map_err(|e| e.to_string())?;
                    let scheme = if config.server.tls.is_some() {
                        "grpc+tls"
                    } else {
                        "grpc"
                    };
                    format!("{scheme}://{}", config.server.flight_addr)
                }
                (None, None) => "grpc://127.0.0.1:50051".to_string(),
            };
            let channel = connect(&endpoint).await?;
            let token = match (token, user) {
                (Some(token), _) => token,
                (None, Some(user)) => login(channel.clone(), &user, &read_password()?).await?,
                (None, None) => {
                    return Err("give --token (or MESHGATE_TOKEN), or --user to log in".into());
                }
            };
            print!("{}", list_products(channel, &token, domain).await?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { dir, scale } => {
            let config = demo::write_demo_config(&dir).map_err(|e| e.to_string())?;
            demo::ensure_demo_data(&dir, scale)?;
            println!(
                "demo mesh written; serve it with: meshgate serve --config {}",
                config.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A channel to a gateway at `grpc://` or `grpc+tls://` (system roots).
async fn connect(endpoint: &str) -> Result<tonic::transport::Channel, String> {
    let (url, tls) = if let Some(rest) = endpoint.strip_prefix("grpc+tls://") {
        (format!("https://{rest}"), true)
    } else if let Some(rest) = endpoint.strip_prefix("grpc://") {
        (format!("http://{rest}"), false)
    } else {
        return Err(format!(
            "--endpoint `{endpoint}`: write grpc://host:port or grpc+tls://host:port"
        ));
    };
    let mut channel = tonic::transport::Channel::from_shared(url)
        .map_err(|e| format!("--endpoint `{endpoint}`: {e}"))?
        .connect_timeout(std::time::Duration::from_secs(10));
    if tls {
        channel = channel
            .tls_config(tonic::transport::ClientTlsConfig::new().with_native_roots())
            .map_err(|e| e.to_string())?;
    }
    channel
        .connect()
        .await
        .map_err(|e| format!("cannot reach {endpoint}: {e}"))
}

/// The bearer token a local user gets from the Flight handshake.
async fn login(
    channel: tonic::transport::Channel,
    user: &str,
    password: &str,
) -> Result<String, String> {
    use base64::Engine;
    let mut client = arrow_flight::flight_service_client::FlightServiceClient::new(channel);
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let mut request = tonic::Request::new(futures::stream::iter([
        arrow_flight::HandshakeRequest::default(),
    ]));
    request.metadata_mut().insert(
        "authorization",
        format!("Basic {basic}")
            .parse()
            .map_err(|_| "the user name cannot be sent in a header".to_string())?,
    );
    let response = client
        .handshake(request)
        .await
        .map_err(|e| format!("login: {}", e.message()))?;
    response
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(meshgate::auth::bearer_token)
        .map(str::to_string)
        .ok_or_else(|| "login: the gateway sent no token".to_string())
}

/// The products the token's holder sees, one per line.
async fn list_products(
    channel: tonic::transport::Channel,
    token: &str,
    domain: Option<String>,
) -> Result<String, String> {
    use meshgate::api::proto;
    use std::fmt::Write as _;
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}")
        .parse()
        .map_err(|_| "the token cannot be sent in a header".to_string())?;
    let mut client = proto::catalog_service_client::CatalogServiceClient::with_interceptor(
        channel,
        move |mut request: tonic::Request<()>| {
            request
                .metadata_mut()
                .insert("authorization", bearer.clone());
            Ok(request)
        },
    );
    let products = client
        .list_products(proto::ListProductsRequest {
            domain: domain.unwrap_or_default(),
            ..Default::default()
        })
        .await
        .map_err(|e| e.message().to_string())?
        .into_inner()
        .products;
    let width = products.iter().map(|p| p.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for product in &products {
        let freshness = if product.freshness_sla_seconds > 0.0 {
            format!(
                " [fresh within {}]",
                seconds_text(product.freshness_sla_seconds)
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "{:<width$}  {:<5}  {:<28}  {}{freshness}",
            product.name, product.kind, product.owner, product.description
        );
    }
    let _ = writeln!(out, "{} product(s)", products.len());
    Ok(out)
}

fn seconds_text(seconds: f64) -> String {
    let seconds = seconds as u64;
    match seconds {
        s if s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Reads a password from stdin: prompted on a terminal, one line otherwise.
fn read_password() -> Result<String, String> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("password: ");
        std::io::stderr().flush().ok();
    }
    let mut line = String::new();
    stdin
        .lock()
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let password = line.trim_end_matches(['\n', '\r']).to_string();
    if password.is_empty() {
        return Err("empty password".into());
    }
    Ok(password)
}

/// The config to use: the given file, or the demo mesh (generated if needed).
fn load_config(config: Option<PathBuf>, demo_scale: Option<f64>) -> Result<MeshConfig, String> {
    let path = match config {
        Some(path) => path,
        None => {
            let dir = demo_dir()?;
            if let Some(scale) = demo_scale
                && demo::ensure_demo_data(&dir, scale)?
            {
                eprintln!(
                    "generated the demo data (scale factor {scale}) in {}",
                    dir.join("data").display()
                );
            }
            dir.join("meshgate.toml")
        }
    };
    MeshConfig::load(&path).map_err(|e| e.to_string())
}

/// `config/demo` in the working directory (a checkout), or the embedded demo
/// written to the user's data directory.
fn demo_dir() -> Result<PathBuf, String> {
    let local = Path::new("config/demo");
    if local.join("meshgate.toml").exists() {
        return Ok(local.to_path_buf());
    }
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .ok_or("cannot find a directory for the demo mesh: set HOME or pass --config")?;
    let dir = base.join("meshgate/demo");
    demo::write_demo_config(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

/// How often the config files are checked for changes.
const CONFIG_POLL: std::time::Duration = std::time::Duration::from_secs(2);

async fn serve(
    config: Option<PathBuf>,
    flight_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
    demo_scale: f64,
) -> Result<ExitCode, String> {
    let is_demo = config.is_none();
    let config = load_config(config, Some(demo_scale))?;
    let addr = flight_addr.unwrap_or(config.server.flight_addr);
    let http_addr = http_addr.or(config.server.http_addr);
    let gateway = std::sync::Arc::new(Gateway::open(config).await.map_err(|e| e.to_string())?);
    // SIGHUP or an edited config file reloads catalog, policies and users.
    tokio::spawn(meshgate::server::reload_on_change(
        std::sync::Arc::clone(&gateway),
        CONFIG_POLL,
    ));
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(http_addr) = http_addr {
        let listener = tokio::net::TcpListener::bind(http_addr)
            .await
            .map_err(|e| format!("cannot listen on {http_addr}: {e}"))?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        eprintln!("meshgate HTTP (/healthz /readyz /metrics) on http://{local}");
        let http = std::sync::Arc::clone(&gateway);
        tokio::spawn(async move {
            let shutdown = async {
                let _ = http_stopped.await;
            };
            if let Err(e) = http.serve_http(listener, shutdown).await {
                tracing::error!(error = %e, "HTTP endpoint failed");
            }
        });
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let products = gateway.engine.mesh().products().count();
    let scheme = if gateway.config.server.tls.is_some() {
        "grpc+tls"
    } else {
        "grpc"
    };
    println!(
        "meshgate listening on {scheme}://{local} (Flight SQL), {products} products published"
    );
    if is_demo {
        println!("demo users: alice/alice-demo, bob/bob-demo, carol/carol-demo, dave/dave-demo");
        println!(
            "connect: adbc_driver_flightsql.dbapi.connect(\"grpc://{local}\", db_kwargs={{\"username\": \"alice\", \"password\": \"alice-demo\"}})"
        );
    }
    std::io::stdout().flush().ok();
    // On SIGTERM or Ctrl-C the endpoint stops accepting connections and
    // running queries and streams finish, for up to `shutdown_timeout`.
    let grace = gateway.config.server.shutdown_timeout;
    let (signalled, on_signal) = tokio::sync::oneshot::channel::<()>();
    let serve = gateway.serve(listener, async move {
        shutdown_signal().await;
        let _ = signalled.send(());
    });
    let deadline = async move {
        if on_signal.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        served = serve => served.map_err(|e| e.to_string())?,
        () = deadline => {
            let running = gateway.engine.metrics().active_queries();
            tracing::warn!(
                running,
                "shutdown: queries still running after {grace:?}; stopping them"
            );
        }
    }
    let _ = stop_http.send(());
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutting down");
}

async fn check(config: Option<PathBuf>, strict: bool, demo_scale: f64) -> Result<ExitCode, String> {
    let config = load_config(config, Some(demo_scale))?;
    let gateway = Gateway::open(config).await.map_err(|e| e.to_string())?;
    let mesh = gateway.engine.mesh();
    for domain in mesh.domains.values() {
        println!(
            "domain {} ({})",
            domain.config.name,
            domain.config.file.display()
        );
        for product in domain.products.values() {
            let (published, policy_only): (Vec<_>, Vec<_>) = product
                .schema
                .fields()
                .iter()
                .enumerate()
                .partition(|(index, _)| product.publishes(*index));
            let columns = |fields: Vec<(usize, &arrow::datatypes::FieldRef)>| -> Vec<String> {
                fields
                    .iter()
                    .map(|(_, f)| format!("{} {}", f.name(), f.data_type()))
                    .collect()
            };
            let policy_only = columns(policy_only);
            let mut line = format!(
                "  publish {}: {}",
                product.name,
                columns(published).join(", ")
            );
            if !policy_only.is_empty() {
                line.push_str(&format!(
                    " (unpublished, for its policies and its domain's views: {})",
                    policy_only.join(", ")
                ));
            }
            println!("{line}");
        }
    }
    for warning in &gateway.warnings {
        println!("  warn {warning}");
    }
    for problem in &gateway.problems {
        println!("  refuse {problem}");
    }
    if !gateway.problems.is_empty() {
        println!(
            "{} product(s) would not be published",
            gateway.problems.len()
        );
        Ok(ExitCode::FAILURE)
    } else if strict && !gateway.warnings.is_empty() {
        println!(
            "{} warning(s), and --strict fails on warnings",
            gateway.warnings.len()
        );
        Ok(ExitCode::FAILURE)
    } else {
        println!(
            "ok: {} products would be published{}",
            mesh.products().count(),
            match gateway.warnings.len() {
                0 => String::new(),
                n => format!(" ({n} warning(s))"),
            }
        );
        Ok(ExitCode::SUCCESS)
    }
}

/// What `identity` sees of `product`, as text.
fn explain_access(
    gateway: &Gateway,
    identity: &CallerIdentity,
    product: &str,
) -> Result<String, String> {
    use meshgate::policy::ColumnView;
    use std::fmt::Write as _;
    let (domain, name) = product
        .split_once('.')
        .ok_or_else(|| format!("--product `{product}`: write domain.product"))?;
    let mesh = gateway.engine.mesh();
    let found = mesh
        .product(domain, name)
        .ok_or_else(|| format!("no published product `{product}`"))?;
    let view = found.view_for(identity);
    let mut out = String::new();
    let attributes: Vec<String> = identity
        .attributes
        .iter()
        .map(|(k, v)| format!("{k}={v:?}"))
        .collect();
    let _ = writeln!(
        out,
        "user {} (groups: [{}]; attributes: [{}])",
        identity.user,
        identity.groups.join(", "),
        attributes.join(", ")
    );
    if !view.visible {
        let _ = writeln!(
            out,
            "product {product}: not visible (it does not exist for this user)"
        );
        return Ok(out);
    }
    let _ = writeln!(out, "product {product}: visible");
    match &view.row_filter {
        Some(filter) => {
            let _ = writeln!(out, "row filter: {}", meshgate::api::sql_text(filter));
        }
        None => {
            let _ = writeln!(out, "row filter: none (every row)");
        }
    }
    let _ = writeln!(out, "columns:");
    let columns = found.schema.fields().iter().zip(&view.columns).enumerate();
    for (_, (field, column)) in columns.filter(|(index, _)| found.publishes(*index)) {
        let how = match column {
            ColumnView::Plain => "visible".to_string(),
            ColumnView::Masked { expr, data_type } => {
                format!("masked as {} ({data_type})", meshgate::api::sql_text(expr))
            }
            ColumnView::Denied => "denied (absent)".to_string(),
        };
        let _ = writeln!(
            out,
            "  {:<24} {:<24} {how}",
            field.name(),
            field.data_type().to_string()
        );
    }
    if !view.applied.is_empty() {
        let _ = writeln!(out, "policies applied:");
        for id in &view.applied {
            let _ = writeln!(out, "  {id}");
        }
    }
    Ok(out)
}
