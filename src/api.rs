//! The catalog API (`proto/meshgate/catalog/v1/catalog.proto`): which
//! products exist for a caller, what they mean, who owns them, how fresh
//! they are, and what the caller sees of them. Served over gRPC on the
//! Flight port and as JSON on the HTTP endpoint; both answer with the same
//! messages, built here. A product the caller may not see is absent.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::auth::{AuthenticatorRef, CallerIdentity};
use crate::catalog::ProductData;
use crate::config::DomainKind;
use crate::policy::ColumnView;
use crate::query::{QueryEngine, VisibleProduct};

/// The generated messages, server and client.
#[allow(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    clippy::clone_on_ref_ptr
)]
pub mod proto {
    tonic::include_proto!("meshgate.catalog.v1");
}

use proto::catalog_service_server::{CatalogService, CatalogServiceServer};

/// Why a catalog request failed. The text is safe to show the caller.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Invalid(String),
}

impl From<ApiError> for tonic::Status {
    fn from(error: ApiError) -> Self {
        let message = error.to_string();
        match error {
            ApiError::NotFound(_) => tonic::Status::not_found(message),
            ApiError::PermissionDenied(_) => tonic::Status::permission_denied(message),
            ApiError::Invalid(_) => tonic::Status::invalid_argument(message),
        }
    }
}

/// An expression as SQL text (literals quoted), for people to read.
pub fn sql_text(expr: &datafusion::logical_expr::Expr) -> String {
    datafusion::sql::unparser::expr_to_sql(expr)
        .map(|sql| sql.to_string())
        .unwrap_or_else(|_| expr.to_string())
}

/// The catalog of one gateway, for one caller at a time.
#[derive(Debug, Clone)]
pub struct Catalog {
    engine: Arc<QueryEngine>,
    authenticator: AuthenticatorRef,
}

fn domain_kind(kind: DomainKind) -> &'static str {
    match kind {
        DomainKind::SourceAligned => "source-aligned",
        DomainKind::ConsumerAligned => "consumer-aligned",
        DomainKind::Shared => "shared",
    }
}

impl Catalog {
    pub fn new(engine: Arc<QueryEngine>, authenticator: AuthenticatorRef) -> Self {
        Self {
            engine,
            authenticator,
        }
    }

    /// The domains in which the caller sees a product.
    pub async fn domains(&self, caller: &CallerIdentity) -> Vec<proto::Domain> {
        let (mesh, visible) = self.engine.visible(caller).await;
        mesh.domains
            .values()
            .filter_map(|domain| {
                let products = visible
                    .iter()
                    .filter(|v| v.name.domain == domain.config.name)
                    .count();
                (products > 0).then(|| proto::Domain {
                    name: domain.config.name.clone(),
                    owner: domain.config.owner.clone().unwrap_or_default(),
                    kind: domain_kind(domain.config.kind).to_string(),
                    description: domain.config.description.clone().unwrap_or_default(),
                    products: u32::try_from(products).unwrap_or(u32::MAX),
                })
            })
            .collect()
    }

    /// Summaries of the products the caller sees that pass `filter`.
    pub async fn products(
        &self,
        caller: &CallerIdentity,
        filter: &proto::ListProductsRequest,
    ) -> Vec<proto::Product> {
        let (mesh, visible) = self.engine.visible(caller).await;
        let search = filter.search.to_lowercase();
        let wanted = visible.iter().filter(|v| {
            let config = &v.product.config;
            (filter.domain.is_empty() || v.name.domain == filter.domain)
                && (filter.tag.is_empty() || config.tags.contains(&filter.tag))
                && (filter.owner.is_empty() || owner(&mesh, v) == filter.owner)
                && (search.is_empty()
                    || v.name.to_string().to_lowercase().contains(&search)
                    || config
                        .description
                        .as_deref()
                        .is_some_and(|d| d.to_lowercase().contains(&search)))
        });
        let described = wanted.map(|v| {
            let mesh = Arc::clone(&mesh);
            async move { summary(&mesh, v, mesh.last_modified(&v.product).await) }
        });
        futures::future::join_all(described).await
    }

    /// One product in full, as the caller sees it.
    pub async fn product(
        &self,
        caller: &CallerIdentity,
        name: &str,
    ) -> Result<proto::Product, ApiError> {
        let (mesh, visible) = self.engine.visible(caller).await;
        let Some(found) = visible.iter().find(|v| v.name.to_string() == name) else {
            return Err(ApiError::NotFound(format!(
                "no product `{name}` (write `domain.product`)"
            )));
        };
        let mut product = summary(&mesh, found, mesh.last_modified(&found.product).await);
        let view = found.product.view_for(caller);
        product.columns = found
            .schema
            .fields()
            .iter()
            .map(|field| {
                let contract = found
                    .product
                    .config
                    .columns
                    .iter()
                    .find(|c| c.name == *field.name());
                let masked = found
                    .product
                    .schema
                    .index_of(field.name())
                    .ok()
                    .and_then(|i| view.columns.get(i))
                    .is_some_and(|c| matches!(c, ColumnView::Masked { .. }));
                proto::Column {
                    name: field.name().clone(),
                    r#type: field.data_type().to_string(),
                    nullable: field.is_nullable(),
                    description: contract
                        .and_then(|c| c.description.clone())
                        .unwrap_or_default(),
                    tags: contract.map(|c| c.tags.clone()).unwrap_or_default(),
                    masked,
                }
            })
            .collect();
        if let ProductData::View { sql } = &found.product.data {
            product.sql = sql.clone();
            // Lineage names only products the caller can see.
            let seen: BTreeSet<String> = visible.iter().map(|v| v.name.to_string()).collect();
            product.reads = mesh
                .lineage
                .get(&found.name)
                .into_iter()
                .flatten()
                .map(ToString::to_string)
                .filter(|r| seen.contains(r))
                .collect();
        }
        Ok(product)
    }

    /// What a user sees of a product: the caller, or for a caller in an
    /// admin group, anyone.
    pub async fn explain_access(
        &self,
        caller: &CallerIdentity,
        request: &proto::ExplainAccessRequest,
    ) -> Result<proto::ExplainAccessResponse, ApiError> {
        let about_caller = (request.user.is_empty() || request.user == caller.user)
            && request.groups.is_empty()
            && request.attributes.is_empty();
        let is_admin = self.engine.is_admin(caller);
        let identity = if about_caller {
            caller.clone()
        } else if !is_admin {
            return Err(ApiError::PermissionDenied(
                "explaining another user's access needs an admin group (governance.admin_groups)"
                    .into(),
            ));
        } else if request.groups.is_empty() && request.attributes.is_empty() {
            self.authenticator
                .local_user(&request.user)
                .ok_or_else(|| {
                    ApiError::NotFound(format!(
                        "`{}` is not a local user: give their groups and attributes",
                        request.user
                    ))
                })?
        } else {
            CallerIdentity {
                user: request.user.clone(),
                groups: request.groups.clone(),
                attributes: request
                    .attributes
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            }
        };
        let (domain, name) = request
            .product
            .split_once('.')
            .ok_or_else(|| ApiError::Invalid("product: write `domain.product`".into()))?;
        let mesh = self.engine.mesh();
        let product = mesh.product(domain, name).filter(|p| {
            // A caller who is no admin learns nothing of products they do
            // not see themselves.
            is_admin || p.view_for(caller).visible
        });
        let Some(product) = product else {
            return Err(ApiError::NotFound(format!(
                "no product `{}`",
                request.product
            )));
        };
        let view = product.view_for(&identity);
        let mut answer = proto::ExplainAccessResponse {
            user: identity.user.clone(),
            visible: view.visible,
            ..Default::default()
        };
        if !view.visible {
            return Ok(answer);
        }
        answer.row_filter = view.row_filter.as_ref().map(sql_text).unwrap_or_default();
        answer.columns = product
            .schema
            .fields()
            .iter()
            .zip(&view.columns)
            .enumerate()
            .filter(|(index, _)| product.publishes(*index))
            .map(|(_, (field, column))| {
                let (access, mask) = match column {
                    ColumnView::Plain => ("visible", String::new()),
                    ColumnView::Masked { expr, .. } => ("masked", sql_text(expr)),
                    ColumnView::Denied => ("denied", String::new()),
                };
                proto::ColumnAccess {
                    name: field.name().clone(),
                    access: access.to_string(),
                    mask,
                }
            })
            .collect();
        answer.policies = view.applied.clone();
        Ok(answer)
    }

    /// The gRPC service, to be wrapped in the authentication layer.
    pub fn into_server(self) -> CatalogServiceServer<Self> {
        CatalogServiceServer::new(self)
    }
}

/// The product's owner, or its domain's.
fn owner(mesh: &crate::catalog::Mesh, visible: &VisibleProduct) -> String {
    visible
        .product
        .config
        .owner
        .clone()
        .or_else(|| {
            mesh.domains
                .get(&visible.name.domain)
                .and_then(|d| d.config.owner.clone())
        })
        .unwrap_or_default()
}

/// Every field of a product but its columns, SQL and lineage.
fn summary(
    mesh: &crate::catalog::Mesh,
    visible: &VisibleProduct,
    last_modified: Option<f64>,
) -> proto::Product {
    let config = &visible.product.config;
    proto::Product {
        name: visible.name.to_string(),
        domain: visible.name.domain.clone(),
        description: config.description.clone().unwrap_or_default(),
        owner: owner(mesh, visible),
        kind: match visible.product.data {
            ProductData::Table(_) => "table",
            ProductData::View { .. } => "view",
        }
        .to_string(),
        version: config.version.clone().unwrap_or_default(),
        tags: config.tags.clone(),
        freshness_sla_seconds: config.freshness.map_or(0.0, |f| f.as_secs_f64()),
        last_modified_seconds: last_modified.unwrap_or_default(),
        sunset: config.sunset.map(|d| d.to_string()).unwrap_or_default(),
        successor: config.successor.clone().unwrap_or_default(),
        ..Default::default()
    }
}

fn caller<T>(request: &tonic::Request<T>) -> Result<CallerIdentity, tonic::Status> {
    request
        .extensions()
        .get::<CallerIdentity>()
        .cloned()
        .ok_or_else(|| tonic::Status::unauthenticated("no verified caller on this request"))
}

#[tonic::async_trait]
impl CatalogService for Catalog {
    async fn list_domains(
        &self,
        request: tonic::Request<proto::ListDomainsRequest>,
    ) -> Result<tonic::Response<proto::ListDomainsResponse>, tonic::Status> {
        let caller = caller(&request)?;
        Ok(tonic::Response::new(proto::ListDomainsResponse {
            domains: self.domains(&caller).await,
        }))
    }

    async fn list_products(
        &self,
        request: tonic::Request<proto::ListProductsRequest>,
    ) -> Result<tonic::Response<proto::ListProductsResponse>, tonic::Status> {
        let caller = caller(&request)?;
        Ok(tonic::Response::new(proto::ListProductsResponse {
            products: self.products(&caller, request.get_ref()).await,
        }))
    }

    async fn get_product(
        &self,
        request: tonic::Request<proto::GetProductRequest>,
    ) -> Result<tonic::Response<proto::Product>, tonic::Status> {
        let caller = caller(&request)?;
        Ok(tonic::Response::new(
            self.product(&caller, &request.get_ref().name).await?,
        ))
    }

    async fn explain_access(
        &self,
        request: tonic::Request<proto::ExplainAccessRequest>,
    ) -> Result<tonic::Response<proto::ExplainAccessResponse>, tonic::Status> {
        let caller = caller(&request)?;
        Ok(tonic::Response::new(
            Catalog::explain_access(self, &caller, request.get_ref()).await?,
        ))
    }
}
