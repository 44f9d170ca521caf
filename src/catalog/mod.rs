//! The catalog: data products resolved to DataFusion table providers, served
//! to callers as catalog `mesh` with one schema per domain and one table per
//! product.

mod decompressed;
mod files;
mod hot_row_groups;
mod listed_version;
mod parquet;
mod stored_values;
mod unopened;
mod views;

pub use decompressed::{page_cache_bytes, page_cache_decompressions, set_page_cache};
pub(crate) use files::{PolicyColumn, check_contract, with_policy_columns};
pub(crate) use hot_row_groups::SerialHotScans;
pub use hot_row_groups::{row_group_cache_bytes, set_row_group_cache};

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Weak};

use parking_lot::RwLock;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{
    CatalogProvider, CatalogProviderList, MemoryCatalogProviderList, SchemaProvider, TableProvider,
};
use datafusion::datasource::ViewTable;
use datafusion::error::{DataFusionError, Result as DataFusionResult};
use datafusion::execution::SessionState;
use datafusion::execution::cache::cache_manager::CacheManagerConfig;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use futures::StreamExt;
use object_store::ObjectStore;
use url::Url;

use crate::auth::CallerIdentity;
use crate::config::{
    DomainConfig, MeshConfig, PolicyConfig, ProductConfig, ProductSource, StorageConfig,
    TagPolicyConfig,
};
use crate::policy::{CallerProductView, PolicyTable, ProductPolicy, compile_product_policy};
use crate::sources::{RemoteTable, Source};

/// The catalog name every product lives under.
pub const CATALOG_NAME: &str = "mesh";

/// `domain.product`, the address of a data product.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProductName {
    pub domain: String,
    pub product: String,
}

impl fmt::Display for ProductName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.domain, self.product)
    }
}

/// How a product produces rows.
#[derive(Debug, Clone)]
pub enum ProductData {
    /// A source table, shared by every caller.
    Table(Arc<dyn TableProvider>),
    /// A consumer-aligned product, planned in each caller's session.
    View { sql: String },
}

/// A published data product.
#[derive(Debug, Clone)]
pub struct Product {
    pub name: ProductName,
    pub config: ProductConfig,
    /// The schema as published (before any caller's policies).
    pub schema: SchemaRef,
    pub data: ProductData,
    /// The product's policies, compiled against its schema.
    pub policy: ProductPolicy,
    /// Bound policies by caller. The key is the whole identity (user, groups,
    /// attributes), so a view is never shared between callers whose
    /// policies could differ; a reload builds a new mesh and new caches.
    views: moka::sync::Cache<CallerIdentity, Arc<CallerProductView>>,
}

/// Callers whose bound policies stay cached per product.
const VIEW_CACHE_ENTRIES: u64 = 10_000;

fn view_cache() -> moka::sync::Cache<CallerIdentity, Arc<CallerProductView>> {
    moka::sync::Cache::builder()
        .max_capacity(VIEW_CACHE_ENTRIES)
        .time_to_idle(std::time::Duration::from_secs(600))
        .build()
}

impl Product {
    /// Whether the column at `index` of the schema is published (and not
    /// there only for the product's policies to read).
    pub fn publishes(&self, index: usize) -> bool {
        !self.policy.policy_only.contains(&index)
    }

    /// What `caller` may see of this product. A policy that cannot be bound
    /// for the caller hides the product (fail closed).
    pub fn view_for(&self, caller: &CallerIdentity) -> Arc<CallerProductView> {
        if let Some(view) = self.views.get(caller) {
            return view;
        }
        let view = Arc::new(match self.policy.for_caller(caller, &self.schema) {
            Ok(view) => view,
            Err(error) => {
                tracing::warn!(product = %self.name, user = %caller.user, %error, "policy could not be bound; product hidden");
                CallerProductView {
                    visible: false,
                    row_filter: None,
                    columns: Vec::new(),
                    applied: Vec::new(),
                }
            }
        });
        self.views.insert(caller.clone(), Arc::clone(&view));
        view
    }
}

/// A domain with the products it publishes.
#[derive(Debug, Clone)]
pub struct Domain {
    pub config: DomainConfig,
    pub products: BTreeMap<String, Arc<Product>>,
}

/// A product that could not be published, and why.
#[derive(Debug, Clone)]
pub struct PublicationProblem {
    pub product: ProductName,
    pub file: std::path::PathBuf,
    pub reason: String,
}

impl fmt::Display for PublicationProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.product,
            self.file.display(),
            self.reason
        )
    }
}

/// What a consumer needs to find and trust a product but the config does
/// not say: an owner (the product's, or its domain's) and a description.
/// These are warnings: the product is still published.
pub fn metadata_warnings(config: &MeshConfig) -> Vec<PublicationProblem> {
    let mut warnings = Vec::new();
    for domain in &config.domains {
        for product in &domain.products {
            let mut warn = |reason: String| {
                warnings.push(PublicationProblem {
                    product: ProductName {
                        domain: domain.name.clone(),
                        product: product.name.clone(),
                    },
                    file: domain.file.clone(),
                    reason,
                })
            };
            if product.owner.is_none() && domain.owner.is_none() {
                warn(format!(
                    "no owner: add `owner = \"team@example.com\"` to the product or to the domain `{}`, so that consumers know whom to ask",
                    domain.name
                ));
            }
            if let Some(day) = product.sunset.filter(|_| product.is_sunset()) {
                warn(format!(
                    "past its sunset ({day}): no longer served; remove it from the config"
                ));
            }
            if product
                .description
                .as_deref()
                .is_none_or(|d| d.trim().is_empty())
            {
                warn(
                    "no description: add `description = \"...\"` saying what one row is, so that consumers can find and read it"
                        .to_string(),
                );
            }
        }
    }
    warnings
}

/// Every published product, and the runtime that reaches their storage.
#[derive(Debug)]
pub struct Mesh {
    pub domains: BTreeMap<String, Domain>,
    /// The products each published view reads.
    pub lineage: BTreeMap<ProductName, std::collections::BTreeSet<ProductName>>,
    runtime: Arc<RuntimeEnv>,
    /// The last probe of the sources, reused for [`SOURCE_PROBE_TTL`].
    source_probe: tokio::sync::Mutex<Option<(std::time::Instant, SourceStates)>>,
}

/// Whether each source answered its probe: `(source, Ok or why not)`.
pub type SourceStates = Vec<(String, Result<(), String>)>;

/// How long a probe of the sources is reused: readiness checks and scrapes
/// that come often cost one probe per source at most this often.
const SOURCE_PROBE_TTL: std::time::Duration = std::time::Duration::from_secs(5);

/// How long an object store's probe waits for its listing (with the
/// store's own retries).
const STORE_PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl Mesh {
    /// Opens every product of `config`. Products that cannot be opened are
    /// left out and reported; the rest of the mesh is published.
    pub async fn open(config: &MeshConfig) -> Result<(Self, Vec<PublicationProblem>), String> {
        // A directory is listed at each scan, so that files added to a
        // product (or rewritten) are read by the next query; each file's
        // footer and statistics stay cached while its size and modification
        // time stay the same.
        let runtime = RuntimeEnvBuilder::new()
            .with_cache_manager(CacheManagerConfig::default().with_list_files_cache_limit(0))
            .build_arc()
            .map_err(|e| format!("cannot build the query runtime: {e}"))?;
        // Each bucket is one store: storages naming it must agree on its
        // options. A store that cannot be set up withdraws its products.
        let mut stores: BTreeMap<String, (&BTreeMap<String, String>, String)> = BTreeMap::new();
        let mut broken_stores: BTreeMap<(&str, &str), String> = BTreeMap::new();
        for domain in &config.domains {
            for (name, storage) in &domain.storage {
                let StorageConfig::ObjectStore { url, options } = storage else {
                    continue;
                };
                let root = store_root(url);
                let registered = match stores.get(&root) {
                    Some((first, there)) if *first != options => Err(format!(
                        "`{root}` is also storage {there}, with other options: \
                         the storages of one bucket share its options"
                    )),
                    Some(_) => Ok(()),
                    None => register_store(&runtime, url, options).map(|()| {
                        let here = format!("`{name}` of {}", domain.file.display());
                        stores.insert(root, (options, here));
                    }),
                };
                if let Err(reason) = registered {
                    broken_stores.insert((&domain.name, name), reason);
                }
            }
        }
        let state = crate::query::base_session_state(Arc::clone(&runtime));
        let mut sources: BTreeMap<(String, String), Result<Arc<Source>, String>> = BTreeMap::new();
        for domain in &config.domains {
            for (name, storage) in &domain.storage {
                if let Some(source) = Source::new(&domain.name, name, storage) {
                    sources.insert((domain.name.clone(), name.clone()), source);
                }
            }
        }

        // Products open concurrently: each may wait on a remote store or
        // database (and on its retries when that is down).
        let storage = StorageAccess {
            state: &state,
            sources: &sources,
            broken: &broken_stores,
        };
        let mut opening = Vec::new();
        for domain in &config.domains {
            for product in &domain.products {
                opening.push(storage.open_product(domain, product));
            }
        }
        let opened: Vec<Result<(SchemaRef, ProductData), String>> = futures::stream::iter(opening)
            .buffered(PRODUCTS_OPENED_AT_ONCE)
            .collect()
            .await;
        let mut opened = opened.into_iter();
        let mut problems = Vec::new();
        let mut domains = BTreeMap::new();
        for domain_config in &config.domains {
            let mut products = BTreeMap::new();
            for (product, opened) in domain_config.products.iter().zip(opened.by_ref()) {
                let name = ProductName {
                    domain: domain_config.name.clone(),
                    product: product.name.clone(),
                };
                match opened {
                    Ok((schema, data)) => {
                        products.insert(
                            product.name.clone(),
                            Arc::new(Product {
                                name,
                                config: product.clone(),
                                schema,
                                data,
                                policy: ProductPolicy::default(),
                                views: view_cache(),
                            }),
                        );
                    }
                    Err(reason) => problems.push(PublicationProblem {
                        product: name,
                        file: domain_config.file.clone(),
                        reason,
                    }),
                }
            }
            domains.insert(
                domain_config.name.clone(),
                Domain {
                    config: domain_config.clone(),
                    products,
                },
            );
        }

        // Tables' policies first: a view reading a product withdrawn for its
        // policies is withdrawn with it; then the views' own policies.
        let mut mesh = Self {
            domains,
            lineage: BTreeMap::new(),
            runtime,
            source_probe: tokio::sync::Mutex::new(None),
        };
        compile_policies(&mut mesh, config, &mut problems, |p| {
            matches!(p.data, ProductData::Table(_))
        });
        views::resolve_views(&mut mesh, &mut problems).await;
        compile_policies(&mut mesh, config, &mut problems, |p| {
            matches!(p.data, ProductData::View { .. })
        });
        Ok((mesh, problems))
    }

    /// The runtime (object stores, memory pool) queries run in.
    pub fn runtime(&self) -> Arc<RuntimeEnv> {
        Arc::clone(&self.runtime)
    }

    pub fn product(&self, domain: &str, product: &str) -> Option<&Arc<Product>> {
        self.domains.get(domain)?.products.get(product)
    }

    /// Whether each SQL or Flight SQL source answers (one of its products'
    /// tables is looked up: connection, login and table, bounded by its
    /// connect timeout), and each cloud object store (its prefix is listed,
    /// bounded by [`STORE_PROBE_TIMEOUT`]); all at once. A probe is reused
    /// for a few seconds, so frequent checks cost the sources nothing more.
    pub async fn probe_sources(&self) -> SourceStates {
        let mut last = self.source_probe.lock().await;
        if let Some((at, states)) = last.as_ref()
            && at.elapsed() < SOURCE_PROBE_TTL
        {
            return states.clone();
        }
        let mut probes: BTreeMap<String, (Arc<Source>, Vec<String>)> = BTreeMap::new();
        for product in self.products() {
            if let ProductData::Table(table) = &product.data
                && let Some(remote) = table.downcast_ref::<RemoteTable>()
            {
                probes
                    .entry(remote.source.name.clone())
                    .or_insert_with(|| (Arc::clone(&remote.source), remote.remote.clone()));
            }
        }
        let probes = probes
            .into_iter()
            .map(|(name, (source, table))| async move {
                let answer = source.table_schema(&table).await;
                (name, answer.map(|_| ()).map_err(|e| e.to_string()))
            });
        let stores = self.domains.values().flat_map(|domain| {
            domain
                .config
                .storage
                .iter()
                .filter_map(move |(name, storage)| {
                    let StorageConfig::ObjectStore { url, .. } = storage else {
                        return None;
                    };
                    is_cloud_store(url).then_some(async move {
                        let name = format!("{}.{name}", domain.config.name);
                        (name, self.probe_store(url).await)
                    })
                })
        });
        let (mut states, stores) = futures::join!(
            futures::future::join_all(probes),
            futures::future::join_all(stores)
        );
        states.extend(stores);
        *last = Some((std::time::Instant::now(), states.clone()));
        states
    }

    /// Whether the object store at `url` lists its prefix.
    async fn probe_store(&self, url: &Url) -> Result<(), String> {
        let store = self
            .runtime
            .object_store(ObjectStoreUrl::parse(store_root(url)).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
        let prefix = object_store::path::Path::from(url.path());
        match tokio::time::timeout(
            STORE_PROBE_TIMEOUT,
            store.list_with_delimiter(Some(&prefix)),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "no answer within {} s",
                STORE_PROBE_TIMEOUT.as_secs()
            )),
        }
    }

    /// When `product`'s data last changed, UNIX seconds, where its source
    /// can tell (file products: the newest file's modification time).
    pub async fn last_modified(&self, product: &Product) -> Option<f64> {
        match &product.config.source {
            ProductSource::Files { url, .. } => {
                let look = files::last_modified(&self.runtime, url);
                tokio::time::timeout(std::time::Duration::from_secs(2), look)
                    .await
                    .ok()
                    .flatten()
            }
            _ => None,
        }
    }

    /// What can be told of each product's freshness: its SLA, and for file
    /// products when their files last changed.
    pub async fn freshness(&self) -> Vec<crate::metrics::Freshness> {
        let products = self.products().map(|product| async move {
            crate::metrics::Freshness {
                product: product.name.to_string(),
                last_modified: self.last_modified(product).await,
                sla_seconds: product.config.freshness.map(|f| f.as_secs_f64()),
            }
        });
        futures::future::join_all(products).await
    }

    /// Every product, in name order.
    pub fn products(&self) -> impl Iterator<Item = &Arc<Product>> {
        self.domains.values().flat_map(|d| d.products.values())
    }
}

/// The columns a table product (files or a SQL source) with declared
/// columns reads without publishing them: those its policies read (in row
/// filters and masks), which must be in its storage, and those the views of
/// its domain name, where the storage holds them. No caller sees them; a
/// row filter works on raw values, and the domain's views build on them.
fn policy_columns(
    product: &ProductConfig,
    domain: &DomainConfig,
) -> Result<Vec<PolicyColumn>, String> {
    if product.columns.is_empty() || matches!(product.source, ProductSource::View { .. }) {
        return Ok(Vec::new());
    }
    let mut read: BTreeMap<String, Option<String>> = BTreeMap::new();
    for (index, policy) in domain
        .policies
        .iter()
        .enumerate()
        .filter(|(_, p)| p.product == product.name)
    {
        let masks = policy.columns.iter().filter_map(|(column, rule)| {
            Some((format!("columns.{column}.mask"), rule.mask.as_ref()?))
        });
        let expressions = policy
            .row_filter
            .as_ref()
            .map(|sql| ("row_filter".to_string(), sql))
            .into_iter()
            .chain(masks);
        for (key, sql) in expressions {
            let read_by = format!("policies[{index}].{key}");
            let names = crate::policy::columns_read(sql)
                .map_err(|e| format!("policy does not compile: {read_by}: {e}"))?;
            for name in names {
                read.entry(name).or_insert_with(|| Some(read_by.clone()));
            }
        }
    }
    for view in &domain.products {
        if let ProductSource::View { sql } = &view.source {
            // A view that does not parse is withdrawn with its own reason.
            for name in views::names_in(sql).unwrap_or_default() {
                read.entry(name).or_insert(None);
            }
        }
    }
    Ok(read
        .into_iter()
        .filter(|(name, _)| !product.columns.iter().any(|c| &c.name == name))
        .map(|(name, read_by)| PolicyColumn { name, read_by })
        .collect())
}

/// Compiles each product's policies; a product whose policies do not compile
/// is withdrawn, never served without them.
fn compile_policies(
    mesh: &mut Mesh,
    config: &MeshConfig,
    problems: &mut Vec<PublicationProblem>,
    which: impl Fn(&Product) -> bool,
) {
    for domain_config in &config.domains {
        let Some(domain) = mesh.domains.get_mut(&domain_config.name) else {
            continue;
        };
        let mut withdrawn = Vec::new();
        for (name, product) in domain.products.iter_mut().filter(|(_, p)| which(p)) {
            let policies: Vec<_> = domain_config
                .policies
                .iter()
                .enumerate()
                .filter(|(_, p)| &p.product == name)
                .collect();
            if let Some(reason) =
                unprotected_pii(&product.config, &policies, &config.governance.tag_policies)
            {
                withdrawn.push((name.clone(), reason));
                continue;
            }
            match compile_product_policy(
                &domain_config.name,
                &product.config,
                &product.schema,
                &policies,
                &config.governance.tag_policies,
                config.governance.default_access,
            ) {
                Ok(policy) => {
                    let product = Arc::make_mut(product);
                    product.policy = policy;
                    product.views = view_cache();
                }
                Err(reason) => {
                    withdrawn.push((name.clone(), format!("policy does not compile: {reason}")))
                }
            }
        }
        for (name, reason) in withdrawn {
            if let Some(product) = domain.products.remove(&name) {
                problems.push(PublicationProblem {
                    product: product.name.clone(),
                    file: domain_config.file.clone(),
                    reason,
                });
            }
        }
    }
}

/// The tag that marks personal data: a column carrying it must be masked or
/// denied by some policy, or its product is not published.
const PII_TAG: &str = "pii";

/// Why `product` may not be published for its `pii` columns: the first
/// declared column tagged `pii` that no policy masks or denies, neither a
/// policy of the product nor a tag policy of `[governance]`.
fn unprotected_pii(
    product: &ProductConfig,
    policies: &[(usize, &PolicyConfig)],
    tag_policies: &[TagPolicyConfig],
) -> Option<String> {
    let tag_covers = tag_policies
        .iter()
        .any(|t| t.tag == PII_TAG && (t.deny || t.mask.is_some()));
    if tag_covers {
        return None;
    }
    let column = product.columns.iter().find(|column| {
        column.tags.iter().any(|t| t == PII_TAG)
            && !policies.iter().any(|(_, policy)| {
                policy
                    .columns
                    .get(&column.name)
                    .is_some_and(|rule| rule.deny || rule.mask.is_some())
            })
    })?;
    Some(format!(
        "column `{name}` is tagged `{PII_TAG}` but no policy masks or denies it: add \
         `columns.{name} = {{ mask = \"...\" }}` (or `{{ deny = true }}`) to a [[policies]] \
         entry for product `{product}`, or a [[governance.tag_policies]] entry for tag `{PII_TAG}`",
        name = column.name,
        product = product.name,
    ))
}

/// How many products the mesh opens at once.
const PRODUCTS_OPENED_AT_ONCE: usize = 8;

/// What products reach their storage through while the mesh loads: the
/// session over the runtime's object stores, the SQL and Flight SQL
/// sources, and the object stores that could not be set up.
#[derive(Clone, Copy)]
struct StorageAccess<'a> {
    state: &'a SessionState,
    sources: &'a BTreeMap<(String, String), Result<Arc<Source>, String>>,
    /// Object stores that could not be set up, by domain and storage name.
    broken: &'a BTreeMap<(&'a str, &'a str), String>,
}

impl StorageAccess<'_> {
    /// Opens one product: its schema and data, or why it is not published.
    async fn open_product(
        self,
        domain: &DomainConfig,
        product: &ProductConfig,
    ) -> Result<(SchemaRef, ProductData), String> {
        let policy_columns = policy_columns(product, domain)?;
        match &product.source {
            ProductSource::Files { storage, .. }
                if let Some(reason) =
                    self.broken.get(&(domain.name.as_str(), storage.as_str())) =>
            {
                Err(format!("storage `{storage}`: {reason}"))
            }
            ProductSource::Files {
                url, format, csv, ..
            } => files::open_file_product(
                self.state,
                &files::FileProduct {
                    url: url.clone(),
                    format: *format,
                    csv: csv.clone(),
                    declared: product.columns.clone(),
                    policy_columns,
                },
            )
            .await
            .map(|table| (table.schema(), ProductData::Table(table))),
            ProductSource::Table { storage, table } => {
                match self.sources.get(&(domain.name.clone(), storage.clone())) {
                    Some(Ok(source)) => {
                        let name = ProductName {
                            domain: domain.name.clone(),
                            product: product.name.clone(),
                        };
                        let table = RemoteTable::open(
                            Arc::clone(source),
                            name.to_string(),
                            table,
                            &product.columns,
                            &policy_columns,
                        )
                        .await?;
                        let table: Arc<dyn TableProvider> = Arc::new(table);
                        Ok((table.schema(), ProductData::Table(table)))
                    }
                    Some(Err(error)) => Err(format!("storage `{storage}`: {error}")),
                    None => Err(format!(
                        "storage `{storage}` is object storage: give `location` and `format`, not `table`"
                    )),
                }
            }
            // Views are checked once every table is open.
            ProductSource::View { sql } => Ok((
                Arc::new(arrow::datatypes::Schema::empty()),
                ProductData::View {
                    // SQL that does not tokenize fails where it is planned.
                    sql: crate::policy::without_current_user_parentheses(sql)
                        .unwrap_or_else(|_| sql.clone()),
                },
            )),
        }
    }
}

/// Whether `url` is in a cloud object store (S3, GCS, Azure), which has a
/// bucket and can be down, rather than on local disk or in memory.
fn is_cloud_store(url: &Url) -> bool {
    matches!(url.scheme(), "s3" | "gs" | "az")
}

/// The scheme and bucket (or container) of a store URL: what the runtime
/// finds its store by.
fn store_root(url: &Url) -> String {
    format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""))
}

/// Registers the store of a storage URL with its options; the environment
/// (`AWS_*`, `GOOGLE_*`, `AZURE_*`) gives what the options leave out.
fn register_store(
    runtime: &RuntimeEnv,
    url: &Url,
    options: &BTreeMap<String, String>,
) -> Result<(), String> {
    use object_store::aws::AmazonS3Builder;
    use object_store::azure::MicrosoftAzureBuilder;
    use object_store::gcp::GoogleCloudStorageBuilder;

    /// The store `builder` makes, given `options` (the config module let
    /// through only keys the store knows).
    fn configured<B, K: std::str::FromStr, S: ObjectStore>(
        builder: B,
        options: &BTreeMap<String, String>,
        with: fn(B, K, String) -> B,
        build: fn(B) -> object_store::Result<S>,
    ) -> object_store::Result<Arc<dyn ObjectStore>> {
        let builder = options
            .iter()
            .fold(builder, |builder, (key, value)| match key.parse() {
                Ok(key) => with(builder, key, value.clone()),
                Err(_) => builder,
            });
        Ok(Arc::new(build(builder)?))
    }
    if url.host_str().is_none_or(str::is_empty) && is_cloud_store(url) {
        return Err(format!("`{url}` names no bucket"));
    }
    let at = url.as_str();
    let store = match url.scheme() {
        "file" => return Ok(()),
        "memory" => Ok(Arc::new(object_store::memory::InMemory::new()) as Arc<dyn ObjectStore>),
        "s3" => configured(
            AmazonS3Builder::from_env().with_url(at),
            options,
            AmazonS3Builder::with_config,
            AmazonS3Builder::build,
        ),
        "gs" => configured(
            GoogleCloudStorageBuilder::from_env().with_url(at),
            options,
            GoogleCloudStorageBuilder::with_config,
            GoogleCloudStorageBuilder::build,
        ),
        "az" => configured(
            MicrosoftAzureBuilder::from_env().with_url(at),
            options,
            MicrosoftAzureBuilder::with_config,
            MicrosoftAzureBuilder::build,
        ),
        other => return Err(format!("unsupported scheme `{other}`")),
    }
    .map_err(|e| format!("cannot configure the store of `{url}`: {e}"))?;
    let root = Url::parse(&store_root(url)).map_err(|e| e.to_string())?;
    runtime.register_object_store(&root, store);
    Ok(())
}

/// What a session read, for the audit log.
#[derive(Debug, Default, Clone)]
pub struct ReadLog {
    pub products: std::collections::BTreeSet<String>,
    pub policies: std::collections::BTreeSet<String>,
    /// What the caller should know of what they read (deprecated versions).
    pub warnings: std::collections::BTreeSet<String>,
}

impl ReadLog {
    /// Adds what `other` records.
    pub fn merge(&mut self, other: &ReadLog) {
        self.products.extend(other.products.iter().cloned());
        self.policies.extend(other.policies.iter().cloned());
        self.warnings.extend(other.warnings.iter().cloned());
    }
}

/// Catalog `mesh` as one caller sees it: products the caller may not access
/// do not exist, and the others are wrapped in the caller's policies.
pub struct MeshCatalog {
    mesh: Arc<Mesh>,
    caller: Arc<CallerIdentity>,
    /// The caller's session, in which view products are planned, so that
    /// views read other products with the caller's own policies.
    session: Weak<RwLock<SessionState>>,
    reads: Arc<parking_lot::Mutex<ReadLog>>,
    /// False only for the mesh's own planning of views at load time.
    enforce_policies: bool,
    /// The view being planned: the products of its domain show it the
    /// unpublished columns its SQL names.
    planning_view: Option<Arc<PlanningView>>,
}

/// A view being planned: its domain and the names its SQL holds.
#[derive(Debug)]
pub(super) struct PlanningView {
    domain: String,
    names: BTreeSet<String>,
}

impl fmt::Debug for MeshCatalog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshCatalog")
            .field("caller", &self.caller.user)
            .finish_non_exhaustive()
    }
}

impl MeshCatalog {
    pub fn new(
        mesh: Arc<Mesh>,
        caller: Arc<CallerIdentity>,
        session: Weak<RwLock<SessionState>>,
        reads: Arc<parking_lot::Mutex<ReadLog>>,
    ) -> Self {
        Self {
            mesh,
            caller,
            session,
            reads,
            enforce_policies: true,
            planning_view: None,
        }
    }

    /// This catalog, as the view of `domain` with `sql` reads it.
    pub(super) fn planning_view(self, domain: &str, sql: &str) -> Self {
        Self {
            planning_view: Some(Arc::new(PlanningView {
                domain: domain.to_string(),
                names: views::names_in(sql).unwrap_or_default(),
            })),
            ..self
        }
    }

    /// The catalog with every product as published, for planning views when
    /// the mesh loads. Never given to a caller.
    pub(super) fn unrestricted(mesh: Arc<Mesh>, session: Weak<RwLock<SessionState>>) -> Self {
        let nobody = Arc::new(CallerIdentity {
            user: String::new(),
            groups: Vec::new(),
            attributes: Default::default(),
        });
        Self {
            enforce_policies: false,
            ..Self::new(mesh, nobody, session, Default::default())
        }
    }

    fn domain_schema(&self, name: &str) -> DomainSchema {
        DomainSchema {
            mesh: Arc::clone(&self.mesh),
            caller: Arc::clone(&self.caller),
            domain: name.to_string(),
            session: Weak::clone(&self.session),
            reads: Arc::clone(&self.reads),
            enforce_policies: self.enforce_policies,
            planning_view: self.planning_view.clone(),
        }
    }

    /// The products of `domain` the caller can see, in name order.
    pub fn visible_products(&self, domain: &str) -> Vec<String> {
        self.domain_schema(domain).table_names()
    }

    /// A product's table as the caller sees it, if they can.
    pub async fn product_table(
        &self,
        domain: &str,
        product: &str,
    ) -> DataFusionResult<Option<Arc<dyn TableProvider>>> {
        self.domain_schema(domain).table(product).await
    }
}

impl CatalogProvider for MeshCatalog {
    fn schema_names(&self) -> Vec<String> {
        self.mesh
            .domains
            .keys()
            .filter(|d| !self.visible_products(d).is_empty())
            .cloned()
            .collect()
    }

    fn schema(&self, name: &str) -> Option<Arc<dyn SchemaProvider>> {
        // Every name resolves, so that an unknown domain and a domain the
        // caller cannot see give the same "table not found".
        Some(Arc::new(self.domain_schema(name)))
    }
}

/// One domain's products as tables, for one caller.
struct DomainSchema {
    mesh: Arc<Mesh>,
    caller: Arc<CallerIdentity>,
    domain: String,
    session: Weak<RwLock<SessionState>>,
    reads: Arc<parking_lot::Mutex<ReadLog>>,
    enforce_policies: bool,
    planning_view: Option<Arc<PlanningView>>,
}

impl fmt::Debug for DomainSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DomainSchema")
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

impl DomainSchema {
    fn visible(&self, name: &str) -> Option<(&Arc<Product>, Arc<CallerProductView>)> {
        // A version past its sunset date is no longer served.
        let product = self
            .mesh
            .product(&self.domain, name)
            .filter(|p| !p.config.is_sunset())?;
        let view = if self.enforce_policies {
            product.view_for(&self.caller)
        } else {
            Arc::new(product.policy.unrestricted(product.schema.fields().len()))
        };
        let view = match &self.planning_view {
            Some(planning) if planning.domain == self.domain && view.visible => Arc::new(
                product
                    .policy
                    .for_view(&view, &product.schema, &planning.names),
            ),
            _ => view,
        };
        view.visible.then_some((product, view))
    }
}

#[async_trait]
impl SchemaProvider for DomainSchema {
    fn table_names(&self) -> Vec<String> {
        self.mesh
            .domains
            .get(&self.domain)
            .map(|d| {
                d.products
                    .keys()
                    .filter(|name| self.visible(name).is_some())
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn table(&self, name: &str) -> DataFusionResult<Option<Arc<dyn TableProvider>>> {
        let Some((product, view)) = self.visible(name) else {
            return Ok(None);
        };
        {
            let mut reads = self.reads.lock();
            reads.products.insert(product.name.to_string());
            reads.policies.extend(view.applied.iter().cloned());
            if let Some(warning) = product.config.deprecation(&product.name.to_string()) {
                reads.warnings.insert(warning);
            }
        }
        let table = match &product.data {
            ProductData::Table(table) => Arc::clone(table),
            ProductData::View { sql } => {
                let session = self.session.upgrade().ok_or_else(|| {
                    DataFusionError::Internal("the caller's session has ended".into())
                })?;
                // The view reads its own domain's unpublished columns.
                let catalog = MeshCatalog {
                    mesh: Arc::clone(&self.mesh),
                    caller: Arc::clone(&self.caller),
                    session: Weak::clone(&self.session),
                    reads: Arc::clone(&self.reads),
                    enforce_policies: self.enforce_policies,
                    planning_view: None,
                }
                .planning_view(&product.name.domain, sql);
                let catalogs = MemoryCatalogProviderList::new();
                catalogs.register_catalog(CATALOG_NAME.to_string(), Arc::new(catalog));
                let state = datafusion::execution::SessionStateBuilder::new_from_existing(
                    session.read().clone(),
                )
                .with_catalog_list(Arc::new(catalogs))
                .build();
                let plan = state.create_logical_plan(sql).await.map_err(|e| {
                    DataFusionError::Plan(format!(
                        "view product {} cannot be planned: {}",
                        product.name,
                        e.find_root()
                    ))
                })?;
                Arc::new(ViewTable::new(plan, Some(sql.clone())))
            }
        };
        let dictionaries = parquet::as_dictionary_scan(&table);
        Ok(Some(PolicyTable::wrap(
            product.name.to_string(),
            table,
            dictionaries,
            &view,
        )))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.visible(name).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect()
    }

    fn url(text: &str) -> Url {
        Url::parse(text).expect("url")
    }

    #[test]
    fn cloud_stores_are_set_up_from_their_options() {
        let runtime = RuntimeEnv::default();
        let s3 = options(&[
            ("endpoint", "http://127.0.0.1:9000"),
            ("allow_http", "true"),
            ("region", "eu-west-1"),
        ]);
        register_store(&runtime, &url("s3://lake/crm/"), &s3).expect("s3");
        let gcs = options(&[("skip_signature", "true")]);
        register_store(&runtime, &url("gs://bucket/x/"), &gcs).expect("gcs");
        let azure = options(&[("account_name", "acme"), ("use_emulator", "true")]);
        register_store(&runtime, &url("az://container/"), &azure).expect("azure");
        for root in ["s3://lake", "gs://bucket", "az://container"] {
            let found = runtime.object_store(ObjectStoreUrl::parse(root).expect("root"));
            assert!(found.is_ok(), "{root}");
        }

        let bad = options(&[("allow_http", "maybe")]);
        let error = register_store(&runtime, &url("s3://other/"), &bad).unwrap_err();
        assert!(
            error.starts_with("cannot configure the store of `s3://other/`"),
            "{error}"
        );
        let error = register_store(&runtime, &url("s3:///x/"), &BTreeMap::new()).unwrap_err();
        assert!(error.contains("names no bucket"), "{error}");
    }

    #[tokio::test]
    async fn storages_of_one_bucket_that_disagree_withdraw_the_later_ones_products() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::create_dir_all(dir.path().join("domains")).expect("domains");
        std::fs::write(
            dir.path().join("meshgate.toml"),
            "domains = [\"domains/*.toml\"]\n[auth]\nissuer = \"m\"\naudience = \"m\"\n\
             hs256_secret = \"0123456789abcdef0123\"\n",
        )
        .expect("gateway");
        let storage = |name: &str, region: &str| {
            format!(
                "[storage.{name}]\ntype = \"object_store\"\nurl = \"s3://lake/{name}\"\n\
                 options = {{ region = \"{region}\", endpoint = \"http://127.0.0.1:1\", \
                 allow_http = true }}\n"
            )
        };
        let product = |name: &str| {
            format!(
                "[[products]]\nname = \"{name}\"\nstorage = \"{name}\"\nlocation = \"f.parquet\"\n\
                 format = \"parquet\"\n"
            )
        };
        let domain = format!(
            "name = \"d\"\n{}{}{}{}",
            storage("one", "eu-west-1"),
            storage("two", "us-east-1"),
            product("one"),
            product("two"),
        );
        std::fs::write(dir.path().join("domains/d.toml"), domain).expect("domain");
        let config = MeshConfig::load(&dir.path().join("meshgate.toml")).expect("config");
        let (_, problems) = Mesh::open(&config).await.expect("mesh");
        let two = problems
            .iter()
            .find(|p| p.product.product == "two")
            .expect("two is refused");
        assert!(
            two.reason
                .starts_with("storage `two`: `s3://lake` is also storage `one`")
                && two.reason.contains("share its options"),
            "{}",
            two.reason
        );
        // `one` is set up, and refused only for its files (nothing answers).
        let one = problems.iter().find(|p| p.product.product == "one");
        assert!(
            one.is_none_or(|p| !p.reason.contains("share its options")),
            "{one:?}"
        );
    }
}
