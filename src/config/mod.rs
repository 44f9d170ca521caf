//! Configuration: the gateway file and the domain files it names, loaded into
//! validated types (addresses, durations, byte sizes, Arrow types, resolved
//! storage locations) so that nothing downstream re-checks a raw string.

mod interpolate;
mod raw;
mod units;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use arrow::datatypes::DataType;
use url::Url;

pub use units::{ByteSize, HumanDuration};

/// A config problem, always naming the file and the key it is about.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    /// The file the problem was found in.
    pub file: PathBuf,
    /// What is wrong, starting with the key when there is one.
    pub message: String,
}

impl ConfigError {
    fn new(file: &Path, message: impl Into<String>) -> Self {
        Self {
            file: file.to_path_buf(),
            message: message.into(),
        }
    }
}

/// The whole mesh as configured: gateway settings plus every domain.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// The gateway file this was loaded from.
    pub gateway_file: PathBuf,
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub limits: Limits,
    pub governance: Governance,
    pub audit: crate::audit::AuditOutput,
    pub domains: Vec<DomainConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub flight_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    pub tls: Option<TlsConfig>,
    /// After SIGTERM or Ctrl-C, how long running queries and streams may
    /// take to finish before the process exits anyway (default 30 s).
    pub shutdown_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub issuer: String,
    pub audience: String,
    pub hs256_secret: Option<String>,
    pub jwks_file: Option<PathBuf>,
    pub token_ttl: Duration,
    pub groups_claim: String,
    pub users: Vec<LocalUser>,
}

/// A user that may log in with a password through the Flight handshake.
#[derive(Debug, Clone)]
pub struct LocalUser {
    pub name: String,
    /// An argon2 PHC string, as printed by `meshgate hash-password`.
    pub password_hash: String,
    pub groups: Vec<String>,
    pub attributes: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub query_timeout: Duration,
    pub memory_per_query: Option<u64>,
    /// Memory all running queries together may hold (their pools' sum).
    /// Read when the gateway starts.
    pub gateway_memory: u64,
    pub max_concurrent_queries: usize,
    /// Queries one user may run at once (default: no limit of its own).
    pub max_concurrent_queries_per_user: Option<usize>,
    /// Longest SQL text accepted, in bytes.
    pub max_sql_length: usize,
    /// Iterations a recursive query (`WITH RECURSIVE`) may run.
    pub max_recursion_depth: u64,
    /// Bytes of decoded Parquet column chunks kept for lookups that read
    /// few row groups (0: none). Read when the gateway starts.
    pub row_group_cache: u64,
    /// Bytes of decompressed Parquet column chunks kept for scans (0:
    /// none). Read when the gateway starts.
    pub page_cache: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            query_timeout: Duration::from_secs(300),
            memory_per_query: None,
            gateway_memory: default_gateway_memory(),
            max_concurrent_queries: 64,
            max_concurrent_queries_per_user: None,
            max_sql_length: 256 * 1024,
            max_recursion_depth: crate::query::DEFAULT_MAX_RECURSION_DEPTH,
            row_group_cache: 512 << 20,
            page_cache: 256 << 20,
        }
    }
}

/// Three quarters of the memory this process may use: the machine's, or
/// its container's (cgroup) limit when that is lower. A query that would
/// take the rest fails (or spills) instead of the system ending the
/// gateway, every other query with it. Without either figure, no bound.
fn default_gateway_memory() -> u64 {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let meminfo = read("/proc/meminfo").and_then(|info| {
        let line = info.lines().find(|line| line.starts_with("MemTotal:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    });
    // cgroup v2, then v1 (which reports a huge number when unlimited).
    let container = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .into_iter()
    .find_map(|path| read(path)?.trim().parse::<u64>().ok());
    match [meminfo, container].into_iter().flatten().min() {
        Some(total) => total / 4 * 3,
        None => u64::MAX,
    }
}

/// Who may read a product that has no `access` policy of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultAccess {
    Authenticated,
    Deny,
}

#[derive(Debug, Clone)]
pub struct Governance {
    pub default_access: DefaultAccess,
    /// Members see EXPLAIN ANALYZE in full, below policy barriers too.
    pub admin_groups: Vec<String>,
    pub tag_policies: Vec<TagPolicyConfig>,
}

#[derive(Debug, Clone)]
pub struct TagPolicyConfig {
    pub tag: String,
    pub mask: Option<String>,
    pub deny: bool,
    pub unless: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainKind {
    SourceAligned,
    ConsumerAligned,
    Shared,
}

/// One domain: its storage, its products and its policies.
#[derive(Debug, Clone)]
pub struct DomainConfig {
    pub name: String,
    pub file: PathBuf,
    pub owner: Option<String>,
    pub kind: DomainKind,
    pub description: Option<String>,
    pub storage: BTreeMap<String, StorageConfig>,
    pub products: Vec<ProductConfig>,
    pub policies: Vec<PolicyConfig>,
}

/// Where a domain keeps data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageConfig {
    /// Files under a URL (`file:///abs/dir`, `s3://bucket/prefix`,
    /// `gs://bucket/prefix`, `az://container/prefix`, `memory://name`), and
    /// the options of its cloud store (endpoint, region, credentials), keyed
    /// as `object_store` names them.
    ObjectStore {
        url: Url,
        options: BTreeMap<String, String>,
    },
    /// A PostgreSQL database (`postgres://user:pass@host:port/db`).
    Postgres { url: String, options: SourceOptions },
    /// A SQLite database file, opened read-only.
    Sqlite {
        path: PathBuf,
        options: SourceOptions,
    },
    /// Any Flight SQL server, another meshgate included.
    FlightSql {
        url: String,
        options: SourceOptions,
        auth: FlightAuth,
    },
}

/// Settings shared by SQL and Flight SQL sources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceOptions {
    /// Send whole sub-plans to the source (default); when false, the source
    /// is only asked for the columns a query reads.
    pub pushdown: bool,
    /// Connections kept open to the source.
    pub pool_size: usize,
    pub connect_timeout: Duration,
    /// PEM certificates that sign the source's TLS certificate (default:
    /// the system's roots).
    pub ca_file: Option<PathBuf>,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            pushdown: true,
            pool_size: 8,
            connect_timeout: Duration::from_secs(5),
            ca_file: None,
        }
    }
}

/// How meshgate authenticates to a remote Flight SQL server.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FlightAuth {
    /// Send each caller's own bearer token, so that the remote enforces its
    /// policies for that caller.
    pub forward_token: bool,
    /// Basic credentials, exchanged through the handshake.
    pub username: Option<String>,
    pub password: Option<String>,
    /// A fixed bearer token.
    pub token: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    Parquet,
    Csv,
    Json,
    Arrow,
}

impl FileFormat {
    /// The file extension that marks files of this format inside a directory.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Parquet => ".parquet",
            Self::Csv => ".csv",
            Self::Json => ".json",
            Self::Arrow => ".arrow",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvOptions {
    pub has_header: bool,
    pub delimiter: u8,
    pub quote: u8,
}

impl Default for CsvOptions {
    fn default() -> Self {
        Self {
            has_header: true,
            delimiter: b',',
            quote: b'"',
        }
    }
}

/// How a product gets its rows.
#[derive(Debug, Clone)]
pub enum ProductSource {
    /// Files of one format: `url` is a file or a directory (ending in `/`).
    Files {
        storage: String,
        url: Url,
        format: FileFormat,
        csv: CsvOptions,
    },
    /// A table (or view) of a SQL or Flight SQL source.
    Table { storage: String, table: String },
    /// A consumer-aligned product: SQL over other products.
    View { sql: String },
}

/// A column of a product's contract.
#[derive(Debug, Clone)]
pub struct ColumnContract {
    pub name: String,
    pub data_type: DataType,
    pub tags: Vec<String>,
    pub description: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ProductConfig {
    pub name: String,
    pub description: Option<String>,
    pub version: Option<String>,
    pub owner: Option<String>,
    pub tags: Vec<String>,
    pub source: ProductSource,
    pub freshness: Option<Duration>,
    /// The last day a deprecated version is served (UTC); a product with a
    /// sunset is deprecated.
    pub sunset: Option<chrono::NaiveDate>,
    /// The product that replaces a deprecated one, `domain.product`.
    pub successor: Option<String>,
    pub columns: Vec<ColumnContract>,
}

/// The policy text of a product as configured; compiled by the policy layer.
impl ProductConfig {
    /// Past its sunset date (UTC): no longer served.
    pub fn is_sunset(&self) -> bool {
        self.sunset
            .is_some_and(|day| chrono::Utc::now().date_naive() > day)
    }

    /// What a reader of a deprecated version is told.
    pub fn deprecation(&self, name: &str) -> Option<String> {
        let day = self.sunset?;
        Some(match &self.successor {
            Some(successor) => {
                format!("{name} is deprecated and served until {day}; read {successor} instead")
            }
            None => format!("{name} is deprecated and served until {day}"),
        })
    }
}

#[derive(Debug, Clone)]
pub struct PolicyConfig {
    pub product: String,
    pub access: Option<String>,
    pub row_filter: Option<String>,
    pub columns: BTreeMap<String, ColumnPolicyConfig>,
}

#[derive(Debug, Clone)]
pub struct ColumnPolicyConfig {
    pub mask: Option<String>,
    pub deny: bool,
    pub unless: Option<String>,
}

const DEFAULT_FLIGHT_ADDR: &str = "127.0.0.1:50051";

impl MeshConfig {
    /// Loads the gateway file and every domain file its `domains` globs match.
    pub fn load(gateway_file: &Path) -> Result<Self, ConfigError> {
        Self::load_with_env(gateway_file, |name| std::env::var(name).ok())
    }

    /// As [`MeshConfig::load`], reading `${VAR}` values through `env`.
    pub fn load_with_env(
        gateway_file: &Path,
        env: impl Fn(&str) -> Option<String> + Copy,
    ) -> Result<Self, ConfigError> {
        let gateway: raw::GatewayFile = read_toml(gateway_file, env)?;
        let base = parent_dir(gateway_file);
        let file = gateway_file;

        let flight_addr = parse_addr(
            file,
            "server.flight_addr",
            gateway
                .server
                .flight_addr
                .as_deref()
                .unwrap_or(DEFAULT_FLIGHT_ADDR),
        )?;
        let http_addr = gateway
            .server
            .http_addr
            .as_deref()
            .map(|a| parse_addr(file, "server.http_addr", a))
            .transpose()?;
        let shutdown_timeout = match &gateway.server.shutdown_timeout {
            Some(t) => parse_duration(file, "server.shutdown_timeout", t)?,
            None => Duration::from_secs(30),
        };
        let tls = gateway.server.tls.map(|t| TlsConfig {
            cert_file: base.join(t.cert_file),
            key_file: base.join(t.key_file),
            client_ca_file: t.client_ca_file.map(|p| base.join(p)),
        });

        let auth = load_auth(file, &base, gateway.auth)?;
        let limits = load_limits(file, gateway.limits)?;
        let governance = load_governance(file, gateway.governance)?;
        let audit = match gateway.audit.output.as_deref() {
            None | Some("stdout") => crate::audit::AuditOutput::Stdout,
            Some("stderr") => crate::audit::AuditOutput::Stderr,
            Some("off") => crate::audit::AuditOutput::Off,
            Some("") => {
                return Err(ConfigError::new(file, "audit.output: must not be empty"));
            }
            Some(path) => crate::audit::AuditOutput::File(base.join(path)),
        };

        let mut domains: Vec<DomainConfig> = Vec::new();
        for (index, pattern) in gateway.domains.iter().enumerate() {
            let full = base.join(pattern);
            let full = full.to_string_lossy();
            let paths = glob::glob(&full).map_err(|e| {
                ConfigError::new(
                    file,
                    format!("domains[{index}]: bad pattern `{pattern}`: {e}"),
                )
            })?;
            let mut matched = 0;
            let mut paths: Vec<PathBuf> = paths.filter_map(Result::ok).collect();
            paths.sort();
            for path in paths {
                matched += 1;
                let domain = load_domain(&path, env)?;
                if let Some(other) = domains.iter().find(|d| d.name == domain.name) {
                    return Err(ConfigError::new(
                        &path,
                        format!(
                            "name: domain `{}` is already defined in {}",
                            domain.name,
                            other.file.display()
                        ),
                    ));
                }
                domains.push(domain);
            }
            if matched == 0 {
                return Err(ConfigError::new(
                    file,
                    format!("domains[{index}]: pattern `{pattern}` matches no file"),
                ));
            }
        }

        Ok(Self {
            gateway_file: gateway_file.to_path_buf(),
            server: ServerConfig {
                flight_addr,
                http_addr,
                tls,
                shutdown_timeout,
            },
            auth,
            limits,
            governance,
            audit,
            domains,
        })
    }
}

fn parent_dir(file: &Path) -> PathBuf {
    let parent = file.parent().unwrap_or(Path::new("."));
    if parent.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        parent.to_path_buf()
    }
}

fn read_toml<T: serde::de::DeserializeOwned>(
    file: &Path,
    env: impl Fn(&str) -> Option<String>,
) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| ConfigError::new(file, format!("cannot read: {e}")))?;
    let text = interpolate::interpolate(&text, env).map_err(|e| ConfigError::new(file, e))?;
    toml::from_str(&text).map_err(|e| ConfigError::new(file, e.to_string().trim_end().to_string()))
}

fn parse_addr(file: &Path, key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|e| {
        ConfigError::new(
            file,
            format!("{key}: `{value}` is not a socket address ({e})"),
        )
    })
}

fn source_options(
    file: &Path,
    key: &str,
    pushdown: Option<bool>,
    connect_timeout: Option<String>,
) -> Result<SourceOptions, ConfigError> {
    let mut options = SourceOptions::default();
    if let Some(pushdown) = pushdown {
        options.pushdown = pushdown;
    }
    if let Some(timeout) = connect_timeout {
        options.connect_timeout =
            parse_duration(file, &format!("{key}.connect_timeout"), &timeout)?;
    }
    Ok(options)
}

fn parse_duration(file: &Path, key: &str, value: &str) -> Result<Duration, ConfigError> {
    HumanDuration::from_str(value)
        .map(|d| d.0)
        .map_err(|e| ConfigError::new(file, format!("{key}: {e}")))
}

fn load_auth(file: &Path, base: &Path, auth: raw::AuthSection) -> Result<AuthConfig, ConfigError> {
    if auth.hs256_secret.is_none() && auth.jwks_file.is_none() {
        return Err(ConfigError::new(
            file,
            "auth: set `hs256_secret`, `jwks_file` or both, so that tokens can be checked",
        ));
    }
    if let Some(secret) = &auth.hs256_secret
        && secret.len() < 16
    {
        return Err(ConfigError::new(
            file,
            "auth.hs256_secret: must be at least 16 bytes long",
        ));
    }
    let token_ttl = match &auth.token_ttl {
        Some(ttl) => parse_duration(file, "auth.token_ttl", ttl)?,
        None => Duration::from_secs(3600),
    };
    let mut users: Vec<LocalUser> = Vec::with_capacity(auth.users.len());
    for (index, user) in auth.users.into_iter().enumerate() {
        let key = format!("auth.users[{index}]");
        if user.name.is_empty() {
            return Err(ConfigError::new(
                file,
                format!("{key}.name: must not be empty"),
            ));
        }
        if users.iter().any(|u| u.name == user.name) {
            return Err(ConfigError::new(
                file,
                format!("{key}.name: user `{}` is listed twice", user.name),
            ));
        }
        if !user.password_hash.starts_with("$argon2") {
            return Err(ConfigError::new(
                file,
                format!(
                    "{key}.password_hash: not an argon2 hash (make one with `meshgate hash-password`)"
                ),
            ));
        }
        users.push(LocalUser {
            name: user.name,
            password_hash: user.password_hash,
            groups: user.groups,
            attributes: user.attributes,
        });
    }
    Ok(AuthConfig {
        issuer: auth.issuer,
        audience: auth.audience,
        hs256_secret: auth.hs256_secret,
        jwks_file: auth.jwks_file.map(|p| base.join(p)),
        token_ttl,
        groups_claim: auth.groups_claim.unwrap_or_else(|| "groups".into()),
        users,
    })
}

fn load_limits(file: &Path, limits: raw::LimitsSection) -> Result<Limits, ConfigError> {
    let defaults = Limits::default();
    let query_timeout = match &limits.query_timeout {
        Some(t) => parse_duration(file, "limits.query_timeout", t)?,
        None => defaults.query_timeout,
    };
    let bytes = |key: &str, value: &str| {
        ByteSize::from_str(value)
            .map(|b| b.0)
            .map_err(|e| ConfigError::new(file, format!("limits.{key}: {e}")))
    };
    let memory_per_query = limits
        .memory_per_query
        .as_deref()
        .map(|m| bytes("memory_per_query", m))
        .transpose()?;
    let gateway_memory = match limits.gateway_memory.as_deref() {
        Some(size) => bytes("gateway_memory", size)?,
        None => defaults.gateway_memory,
    };
    let row_group_cache = match limits.row_group_cache.as_deref() {
        Some(size) => bytes("row_group_cache", size)?,
        None => defaults.row_group_cache,
    };
    let page_cache = match limits.page_cache.as_deref() {
        Some(size) => bytes("page_cache", size)?,
        None => defaults.page_cache,
    };
    let max_concurrent_queries = limits
        .max_concurrent_queries
        .unwrap_or(defaults.max_concurrent_queries);
    if max_concurrent_queries == 0 {
        return Err(ConfigError::new(
            file,
            "limits.max_concurrent_queries: must be at least 1",
        ));
    }
    if limits.max_recursion_depth == Some(0) {
        return Err(ConfigError::new(
            file,
            "limits.max_recursion_depth: must be at least 1",
        ));
    }
    if limits.max_concurrent_queries_per_user == Some(0) {
        return Err(ConfigError::new(
            file,
            "limits.max_concurrent_queries_per_user: must be at least 1",
        ));
    }
    Ok(Limits {
        query_timeout,
        memory_per_query,
        gateway_memory,
        max_concurrent_queries,
        max_concurrent_queries_per_user: limits.max_concurrent_queries_per_user,
        max_sql_length: limits.max_sql_length.unwrap_or(defaults.max_sql_length),
        max_recursion_depth: limits
            .max_recursion_depth
            .unwrap_or(defaults.max_recursion_depth),
        row_group_cache,
        page_cache,
    })
}

fn load_governance(
    file: &Path,
    governance: raw::GovernanceSection,
) -> Result<Governance, ConfigError> {
    let default_access = match governance.default_access.as_deref() {
        None | Some("authenticated") => DefaultAccess::Authenticated,
        Some("deny") => DefaultAccess::Deny,
        Some(other) => {
            return Err(ConfigError::new(
                file,
                format!(
                    "governance.default_access: `{other}` is not one of `authenticated`, `deny`"
                ),
            ));
        }
    };
    let mut tag_policies = Vec::new();
    for (index, policy) in governance.tag_policies.into_iter().enumerate() {
        if policy.mask.is_none() && !policy.deny {
            return Err(ConfigError::new(
                file,
                format!("governance.tag_policies[{index}]: set `mask` or `deny = true`"),
            ));
        }
        tag_policies.push(TagPolicyConfig {
            tag: policy.tag,
            mask: policy.mask,
            deny: policy.deny,
            unless: policy.unless,
        });
    }
    Ok(Governance {
        default_access,
        admin_groups: governance.admin_groups,
        tag_policies,
    })
}

/// Domain and product names become SQL identifiers; they must resolve unquoted.
fn check_identifier(file: &Path, key: &str, name: &str) -> Result<(), ConfigError> {
    let mut chars = name.chars();
    let valid = matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(ConfigError::new(
            file,
            format!(
                "{key}: `{name}` must be a lowercase SQL identifier (a-z, 0-9, _; not starting with a digit)"
            ),
        ))
    }
}

fn load_domain(
    file: &Path,
    env: impl Fn(&str) -> Option<String>,
) -> Result<DomainConfig, ConfigError> {
    let domain: raw::DomainFile = read_toml(file, env)?;
    let base = parent_dir(file);
    check_identifier(file, "name", &domain.name)?;
    if domain.name == "information_schema" || domain.name == "pg_catalog" {
        return Err(ConfigError::new(
            file,
            format!("name: `{}` is reserved", domain.name),
        ));
    }
    let kind = match domain.kind.as_deref() {
        None | Some("source-aligned") => DomainKind::SourceAligned,
        Some("consumer-aligned") => DomainKind::ConsumerAligned,
        Some("shared") => DomainKind::Shared,
        Some(other) => {
            return Err(ConfigError::new(
                file,
                format!(
                    "kind: `{other}` is not one of `source-aligned`, `consumer-aligned`, `shared`"
                ),
            ));
        }
    };

    let mut storage = BTreeMap::new();
    for (name, entry) in domain.storage {
        let key = format!("storage.{name}");
        let resolved = match entry {
            raw::StorageEntry::ObjectStore { url, options } => {
                let url = resolve_store_url(file, &base, &format!("{key}.url"), &url)?;
                let options = store_options(&url, options)
                    .map_err(|e| ConfigError::new(file, format!("{key}.options: {e}")))?;
                StorageConfig::ObjectStore { url, options }
            }
            raw::StorageEntry::Postgres {
                url,
                pushdown,
                pool_size,
                connect_timeout,
                ca_file,
            } => {
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                    return Err(ConfigError::new(
                        file,
                        format!(
                            "{key}.url: expected `postgres://user:password@host:port/database`"
                        ),
                    ));
                }
                let mut options = source_options(file, &key, pushdown, connect_timeout)?;
                options.ca_file = ca_file.map(|p| base.join(p));
                if let Some(size) = pool_size {
                    if size == 0 {
                        return Err(ConfigError::new(
                            file,
                            format!("{key}.pool_size: must be at least 1"),
                        ));
                    }
                    options.pool_size = size;
                }
                StorageConfig::Postgres { url, options }
            }
            raw::StorageEntry::Sqlite { path, pushdown } => StorageConfig::Sqlite {
                path: base.join(path),
                options: source_options(file, &key, pushdown, None)?,
            },
            raw::StorageEntry::FlightSql {
                url,
                pushdown,
                connect_timeout,
                forward_token,
                ca_file,
                username,
                password,
                token,
            } => {
                if !(url.starts_with("grpc://")
                    || url.starts_with("grpc+tcp://")
                    || url.starts_with("grpc+tls://")
                    || url.starts_with("http://")
                    || url.starts_with("https://"))
                {
                    return Err(ConfigError::new(
                        file,
                        format!("{key}.url: expected `grpc://host:port` or `grpc+tls://host:port`"),
                    ));
                }
                if username.is_some() != password.is_some() {
                    return Err(ConfigError::new(
                        file,
                        format!("{key}: `username` and `password` go together"),
                    ));
                }
                if token.is_some() && username.is_some() {
                    return Err(ConfigError::new(
                        file,
                        format!("{key}: give `token` or `username`/`password`, not both"),
                    ));
                }
                let mut options = source_options(file, &key, pushdown, connect_timeout)?;
                options.ca_file = ca_file.map(|p| base.join(p));
                StorageConfig::FlightSql {
                    url,
                    options,
                    auth: FlightAuth {
                        forward_token: forward_token.unwrap_or(false),
                        username,
                        password,
                        token,
                    },
                }
            }
        };
        storage.insert(name, resolved);
    }

    let mut products: Vec<ProductConfig> = Vec::new();
    for (index, product) in domain.products.into_iter().enumerate() {
        let key = format!("products[{index}]");
        check_identifier(file, &format!("{key}.name"), &product.name)?;
        if products.iter().any(|p| p.name == product.name) {
            return Err(ConfigError::new(
                file,
                format!(
                    "{key}.name: product `{}` is defined twice in domain `{}`",
                    product.name, domain.name
                ),
            ));
        }
        let key = format!("{key} (`{}`)", product.name);
        products.push(load_product(file, &key, &storage, product)?);
    }

    let mut policies = Vec::new();
    for (index, policy) in domain.policies.into_iter().enumerate() {
        let key = format!("policies[{index}]");
        let Some(product) = products.iter().find(|p| p.name == policy.product) else {
            return Err(ConfigError::new(
                file,
                format!(
                    "{key}.product: `{}` is not a product of domain `{}`",
                    policy.product, domain.name
                ),
            ));
        };
        for (column, rule) in &policy.columns {
            if rule.mask.is_none() && !rule.deny {
                return Err(ConfigError::new(
                    file,
                    format!("{key}.columns.{column}: set `mask` or `deny = true`"),
                ));
            }
            if !product.columns.is_empty() && !product.columns.iter().any(|c| &c.name == column) {
                return Err(ConfigError::new(
                    file,
                    format!(
                        "{key}.columns.{column}: product `{}` declares no column `{column}`",
                        product.name
                    ),
                ));
            }
        }
        policies.push(PolicyConfig {
            product: policy.product,
            access: policy.access,
            row_filter: policy.row_filter,
            columns: policy
                .columns
                .into_iter()
                .map(|(name, c)| {
                    (
                        name,
                        ColumnPolicyConfig {
                            mask: c.mask,
                            deny: c.deny,
                            unless: c.unless,
                        },
                    )
                })
                .collect(),
        });
    }

    Ok(DomainConfig {
        name: domain.name,
        file: file.to_path_buf(),
        owner: domain.owner,
        kind,
        description: domain.description,
        storage,
        products,
        policies,
    })
}

/// The options of a cloud store at `url`, each a key its store knows
/// (`endpoint`, `region`, `access_key_id`, with or without the `aws_`,
/// `google_` or `azure_` prefix).
fn store_options(
    url: &Url,
    options: BTreeMap<String, raw::OptionValue>,
) -> Result<BTreeMap<String, String>, String> {
    use object_store::aws::AmazonS3ConfigKey;
    use object_store::azure::AzureConfigKey;
    use object_store::gcp::GoogleConfigKey;

    let known: fn(&str) -> bool = match url.scheme() {
        _ if options.is_empty() => return Ok(BTreeMap::new()),
        "s3" => |key| key.parse::<AmazonS3ConfigKey>().is_ok(),
        "gs" => |key| key.parse::<GoogleConfigKey>().is_ok(),
        "az" => |key| key.parse::<AzureConfigKey>().is_ok(),
        other => {
            return Err(format!(
                "options are for s3://, gs:// and az:// storage, not {other}://"
            ));
        }
    };
    options
        .into_iter()
        .map(|(key, value)| {
            let lower = key.to_ascii_lowercase();
            if !known(&lower) {
                return Err(format!(
                    "`{key}` is not an option of {}:// storage (such as endpoint, region, \
                     access_key_id, secret_access_key, allow_http)",
                    url.scheme()
                ));
            }
            let value = match value {
                raw::OptionValue::Text(text) => text,
                raw::OptionValue::Flag(flag) => flag.to_string(),
                raw::OptionValue::Number(number) => number.to_string(),
            };
            Ok((lower, value))
        })
        .collect()
}

/// Resolves a storage URL: `file://` paths (and bare paths) relative to the file.
fn resolve_store_url(file: &Path, base: &Path, key: &str, url: &str) -> Result<Url, ConfigError> {
    let local_path = match url.strip_prefix("file://") {
        Some(path) => Some(path),
        None if !url.contains("://") => Some(url),
        None => None,
    };
    let resolved = match local_path {
        Some(path) => {
            let path = Path::new(path);
            let absolute = if path.is_absolute() {
                path.to_path_buf()
            } else {
                std::path::absolute(base.join(path)).map_err(|e| {
                    ConfigError::new(file, format!("{key}: cannot resolve `{url}`: {e}"))
                })?
            };
            Url::from_directory_path(&absolute).map_err(|()| {
                ConfigError::new(file, format!("{key}: `{url}` is not a usable path"))
            })?
        }
        None => {
            let mut parsed = Url::parse(url)
                .map_err(|e| ConfigError::new(file, format!("{key}: `{url}` is not a URL: {e}")))?;
            match parsed.scheme() {
                "s3" | "gs" | "az" | "memory" => {}
                other => {
                    return Err(ConfigError::new(
                        file,
                        format!(
                            "{key}: scheme `{other}://` is not supported (use file://, s3://, gs://, az:// or memory://)"
                        ),
                    ));
                }
            }
            if !parsed.path().ends_with('/') {
                let path = format!("{}/", parsed.path());
                parsed.set_path(&path);
            }
            parsed
        }
    };
    Ok(resolved)
}

fn parse_format(file: &Path, key: &str, format: Option<&str>) -> Result<FileFormat, ConfigError> {
    match format {
        Some("parquet") => Ok(FileFormat::Parquet),
        Some("csv") => Ok(FileFormat::Csv),
        Some("json") | Some("ndjson") => Ok(FileFormat::Json),
        Some("arrow") | Some("ipc") => Ok(FileFormat::Arrow),
        Some(other) => Err(ConfigError::new(
            file,
            format!("{key}.format: `{other}` is not one of parquet, csv, json, arrow"),
        )),
        None => Err(ConfigError::new(
            file,
            format!("{key}.format: file products need a format (parquet, csv, json, arrow)"),
        )),
    }
}

fn single_byte(file: &Path, key: &str, text: Option<&str>, default: u8) -> Result<u8, ConfigError> {
    match text {
        None => Ok(default),
        Some(t) if t.len() == 1 => Ok(t.as_bytes()[0]),
        Some("\\t") => Ok(b'\t'),
        Some(t) => Err(ConfigError::new(
            file,
            format!("{key}: `{t}` must be a single ASCII character"),
        )),
    }
}

fn load_product(
    file: &Path,
    key: &str,
    storage: &BTreeMap<String, StorageConfig>,
    product: raw::ProductEntry,
) -> Result<ProductConfig, ConfigError> {
    let source = match (&product.sql, &product.storage) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                file,
                format!("{key}: set either `sql` (a view) or `storage`, not both"),
            ));
        }
        (Some(sql), None) => {
            for field in [
                ("table", product.table.is_some()),
                ("location", product.location.is_some()),
                ("format", product.format.is_some()),
            ] {
                if field.1 {
                    return Err(ConfigError::new(
                        file,
                        format!(
                            "{key}.{}: a view product (`sql`) takes no `{}`",
                            field.0, field.0
                        ),
                    ));
                }
            }
            ProductSource::View { sql: sql.clone() }
        }
        (None, None) => {
            return Err(ConfigError::new(
                file,
                format!("{key}: set `storage` (with `table` or `location`) or `sql`"),
            ));
        }
        (None, Some(storage_name)) => {
            let Some(store) = storage.get(storage_name) else {
                let known: Vec<&str> = storage.keys().map(String::as_str).collect();
                return Err(ConfigError::new(
                    file,
                    format!(
                        "{key}.storage: storage `{storage_name}` is not defined in this file (defined: {})",
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
            };
            match store {
                StorageConfig::ObjectStore { url, .. } => {
                    let Some(location) = &product.location else {
                        return Err(ConfigError::new(
                            file,
                            format!(
                                "{key}.location: file products need a `location` (a file or a directory)"
                            ),
                        ));
                    };
                    if product.table.is_some() {
                        return Err(ConfigError::new(
                            file,
                            format!(
                                "{key}.table: object_store products use `location`, not `table`"
                            ),
                        ));
                    }
                    let format = parse_format(file, key, product.format.as_deref())?;
                    let location = location.trim_start_matches('/');
                    if location.split('/').any(|part| part == "..") {
                        return Err(ConfigError::new(
                            file,
                            format!("{key}.location: `..` may not leave the storage root"),
                        ));
                    }
                    let url = url.join(location).map_err(|e| {
                        ConfigError::new(file, format!("{key}.location: `{location}`: {e}"))
                    })?;
                    let csv = match &product.csv {
                        None => CsvOptions::default(),
                        Some(csv) => {
                            if format != FileFormat::Csv {
                                return Err(ConfigError::new(
                                    file,
                                    format!("{key}.csv: only for format = \"csv\""),
                                ));
                            }
                            CsvOptions {
                                has_header: csv.has_header.unwrap_or(true),
                                delimiter: single_byte(
                                    file,
                                    &format!("{key}.csv.delimiter"),
                                    csv.delimiter.as_deref(),
                                    b',',
                                )?,
                                quote: single_byte(
                                    file,
                                    &format!("{key}.csv.quote"),
                                    csv.quote.as_deref(),
                                    b'"',
                                )?,
                            }
                        }
                    };
                    ProductSource::Files {
                        storage: storage_name.clone(),
                        url,
                        format,
                        csv,
                    }
                }
                _ => {
                    let Some(table) = &product.table else {
                        return Err(ConfigError::new(
                            file,
                            format!("{key}.table: products of SQL sources name a `table`"),
                        ));
                    };
                    ProductSource::Table {
                        storage: storage_name.clone(),
                        table: table.clone(),
                    }
                }
            }
        }
    };

    let freshness = product
        .freshness
        .as_deref()
        .map(|f| parse_duration(file, &format!("{key}.freshness"), f))
        .transpose()?;

    let sunset = product
        .sunset
        .as_deref()
        .map(|day| {
            chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d").map_err(|e| {
                ConfigError::new(
                    file,
                    format!("{key}.sunset: `{day}` is not a date ({e}); write YYYY-MM-DD"),
                )
            })
        })
        .transpose()?;

    let mut columns: Vec<ColumnContract> = Vec::new();
    let mut seen = BTreeSet::new();
    for (index, column) in product.columns.into_iter().enumerate() {
        let column_key = format!("{key}.columns[{index}]");
        if !seen.insert(column.name.clone()) {
            return Err(ConfigError::new(
                file,
                format!(
                    "{column_key}.name: column `{}` is declared twice",
                    column.name
                ),
            ));
        }
        let data_type = DataType::from_str(&column.data_type).map_err(|e| {
            ConfigError::new(
                file,
                format!(
                    "{column_key}.type: `{}` is not an Arrow type name ({e}); write e.g. Int64, Utf8, Decimal128(15, 2), Date32",
                    column.data_type
                ),
            )
        })?;
        columns.push(ColumnContract {
            name: column.name,
            data_type,
            tags: column.tags,
            description: column.description,
        });
    }

    Ok(ProductConfig {
        name: product.name,
        description: product.description,
        version: product.version,
        owner: product.owner,
        tags: product.tags,
        source,
        freshness,
        sunset,
        successor: product.successor,
        columns,
    })
}

#[cfg(test)]
mod tests;
