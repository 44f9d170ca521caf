//! The TOML shapes of the gateway file and the domain files, exactly as written
//! by people. Unknown keys are refused; nothing here is validated beyond syntax.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GatewayFile {
    #[serde(default)]
    pub domains: Vec<String>,
    #[serde(default)]
    pub server: ServerSection,
    pub auth: AuthSection,
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default)]
    pub governance: GovernanceSection,
    #[serde(default)]
    pub audit: AuditSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditSection {
    /// `stdout`, `stderr`, `off`, or a file path.
    pub output: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServerSection {
    pub flight_addr: Option<String>,
    pub http_addr: Option<String>,
    pub tls: Option<TlsSection>,
    /// How long running queries may take to finish after SIGTERM.
    pub shutdown_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsSection {
    pub cert_file: String,
    pub key_file: String,
    pub client_ca_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuthSection {
    pub issuer: String,
    pub audience: String,
    pub hs256_secret: Option<String>,
    pub jwks_file: Option<String>,
    pub token_ttl: Option<String>,
    pub groups_claim: Option<String>,
    #[serde(default)]
    pub users: Vec<UserEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct UserEntry {
    pub name: String,
    pub password_hash: String,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LimitsSection {
    pub query_timeout: Option<String>,
    pub memory_per_query: Option<String>,
    pub gateway_memory: Option<String>,
    pub max_concurrent_queries: Option<usize>,
    pub max_concurrent_queries_per_user: Option<usize>,
    pub max_sql_length: Option<usize>,
    pub max_recursion_depth: Option<u64>,
    pub row_group_cache: Option<String>,
    pub page_cache: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GovernanceSection {
    pub default_access: Option<String>,
    #[serde(default)]
    pub admin_groups: Vec<String>,
    #[serde(default)]
    pub tag_policies: Vec<TagPolicyEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TagPolicyEntry {
    pub tag: String,
    pub mask: Option<String>,
    #[serde(default)]
    pub deny: bool,
    pub unless: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DomainFile {
    pub name: String,
    pub owner: Option<String>,
    pub kind: Option<String>,
    pub description: Option<String>,
    #[serde(default)]
    pub storage: BTreeMap<String, StorageEntry>,
    #[serde(default)]
    pub products: Vec<ProductEntry>,
    #[serde(default)]
    pub policies: Vec<PolicyEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum StorageEntry {
    ObjectStore {
        url: String,
        #[serde(default)]
        options: BTreeMap<String, OptionValue>,
    },
    Postgres {
        url: String,
        pushdown: Option<bool>,
        pool_size: Option<usize>,
        connect_timeout: Option<String>,
        ca_file: Option<String>,
    },
    Sqlite {
        path: String,
        pushdown: Option<bool>,
    },
    FlightSql {
        url: String,
        pushdown: Option<bool>,
        connect_timeout: Option<String>,
        forward_token: Option<bool>,
        ca_file: Option<String>,
        username: Option<String>,
        password: Option<String>,
        token: Option<String>,
    },
}

/// An object store option: text, or a number or flag written bare.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum OptionValue {
    Text(String),
    Flag(bool),
    Number(i64),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProductEntry {
    pub name: String,
    pub description: Option<String>,
    pub version: Option<String>,
    pub owner: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    pub storage: Option<String>,
    pub table: Option<String>,
    pub location: Option<String>,
    pub format: Option<String>,
    pub csv: Option<CsvEntry>,
    pub sql: Option<String>,
    pub freshness: Option<String>,
    pub sunset: Option<String>,
    pub successor: Option<String>,
    #[serde(default)]
    pub columns: Vec<ColumnEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CsvEntry {
    pub has_header: Option<bool>,
    pub delimiter: Option<String>,
    pub quote: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ColumnEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub data_type: String,
    #[serde(default)]
    pub tags: Vec<String>,
    pub description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PolicyEntry {
    pub product: String,
    pub access: Option<String>,
    pub row_filter: Option<String>,
    #[serde(default)]
    pub columns: BTreeMap<String, ColumnPolicyEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ColumnPolicyEntry {
    pub mask: Option<String>,
    #[serde(default)]
    pub deny: bool,
    pub unless: Option<String>,
}
