//! Sessions: one DataFusion session per caller and request, holding catalog
//! `mesh` as that caller sees it. Settings are fixed here and cannot be
//! changed from SQL.

use std::sync::Arc;

use datafusion::execution::SessionState;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::auth::CallerIdentity;
use crate::catalog::{CATALOG_NAME, Mesh, MeshCatalog, ReadLog};

/// The schema unqualified names resolve in; it holds no products, so every
/// product is named `domain.product` (or `mesh.domain.product`).
const DEFAULT_SCHEMA: &str = "public";

/// Session state with meshgate's settings and no catalog.
pub(crate) fn base_session_state(runtime: Arc<RuntimeEnv>) -> SessionState {
    let mut config = SessionConfig::new()
        .with_information_schema(false)
        .with_create_default_catalog_and_schema(false)
        .with_default_catalog_and_schema(CATALOG_NAME, DEFAULT_SCHEMA);
    {
        let options = config.options_mut();
        // Plain Utf8/Binary: what Flight SQL clients read, with no conversion cost.
        options.execution.parquet.schema_force_view_types = false;
        options.sql_parser.map_string_types_to_utf8view = false;
        options.execution.parquet.pushdown_filters = true;
        options.execution.parquet.reorder_filters = true;
    }
    SessionStateBuilder::new()
        .with_config(config)
        .with_runtime_env(runtime)
        .with_default_features()
        .build()
}

/// A session in which `mesh` resolves products for one caller, and the
/// catalog it resolves them through.
pub(crate) fn caller_context(
    mesh: &Arc<Mesh>,
    caller: Arc<CallerIdentity>,
    reads: Arc<parking_lot::Mutex<ReadLog>>,
) -> (SessionContext, Arc<MeshCatalog>) {
    let context = SessionContext::new_with_state(base_session_state(mesh.runtime()));
    let catalog = Arc::new(MeshCatalog::new(
        Arc::clone(mesh),
        caller,
        context.state_weak_ref(),
        reads,
    ));
    context.register_catalog(CATALOG_NAME, Arc::clone(&catalog) as _);
    (context, catalog)
}
