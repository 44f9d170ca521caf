//! Consumer-aligned products: their dependencies on other products, cycle
//! detection, and their published schemas.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use datafusion::common::TableReference;
use datafusion::prelude::SessionContext;

use super::{CATALOG_NAME, Mesh, MeshCatalog, ProductData, ProductName, PublicationProblem};

/// Plans every view once with full visibility to learn its schema. A view that
/// reads an unknown product, is part of a cycle or does not plan is withdrawn.
pub(super) async fn resolve_views(mesh: &mut Mesh, problems: &mut Vec<PublicationProblem>) {
    let views: Vec<(ProductName, String)> = mesh
        .products()
        .filter_map(|p| match &p.data {
            ProductData::View { sql } => Some((p.name.clone(), sql.clone())),
            ProductData::Table(_) => None,
        })
        .collect();
    if views.is_empty() {
        return;
    }

    let mut state = crate::query::base_session_state(mesh.runtime());
    // Views may call the caller functions, bound when a caller reads them.
    for function in crate::policy::caller_functions() {
        let _ =
            datafusion::execution::FunctionRegistry::register_udf(&mut state, Arc::new(function));
    }
    let mut reads: BTreeMap<ProductName, BTreeSet<ProductName>> = BTreeMap::new();
    let mut withdrawn: BTreeMap<ProductName, String> = BTreeMap::new();
    for (name, sql) in &views {
        match referenced_products(&state, sql, &name.domain) {
            Ok(refs) => {
                reads.insert(name.clone(), refs);
            }
            Err(reason) => {
                withdrawn.insert(name.clone(), reason);
            }
        }
    }
    for (name, refs) in &reads {
        if let Some(path) = find_cycle(name, &reads) {
            withdrawn.insert(
                name.clone(),
                format!(
                    "view is part of a cycle: {}",
                    path.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(" -> ")
                ),
            );
            continue;
        }
        if let Some(missing) = refs
            .iter()
            .find(|r| mesh.product(&r.domain, &r.product).is_none())
        {
            withdrawn.insert(
                name.clone(),
                format!("view reads `{missing}`, which is not published"),
            );
        }
    }
    // A view that reads a withdrawn view is withdrawn too.
    loop {
        let newly: Vec<(ProductName, String)> = reads
            .iter()
            .filter(|(name, _)| !withdrawn.contains_key(*name))
            .filter_map(|(name, refs)| {
                refs.iter().find(|r| withdrawn.contains_key(*r)).map(|r| {
                    (
                        name.clone(),
                        format!("view reads `{r}`, which is not published"),
                    )
                })
            })
            .collect();
        if newly.is_empty() {
            break;
        }
        withdrawn.extend(newly);
    }
    remove_products(mesh, &withdrawn, problems);

    // Plan each remaining view to publish its schema.
    let snapshot = Arc::new(Mesh {
        domains: mesh.domains.clone(),
        lineage: BTreeMap::new(),
        runtime: mesh.runtime(),
        source_probe: tokio::sync::Mutex::new(None),
    });
    let context = SessionContext::new_with_state(state);
    let mut failed = BTreeMap::new();
    for (name, sql) in &views {
        if withdrawn.contains_key(name) {
            continue;
        }
        // Views publish the schema they have for a caller no policy
        // restricts.
        context.register_catalog(
            CATALOG_NAME,
            Arc::new(
                MeshCatalog::unrestricted(Arc::clone(&snapshot), context.state_weak_ref())
                    .planning_view(&name.domain, sql),
            ),
        );
        match context.state().create_logical_plan(sql).await {
            Ok(plan) => {
                let schema = Arc::new(plan.schema().as_arrow().clone());
                if let Some(domain) = mesh.domains.get_mut(&name.domain)
                    && let Some(product) = domain.products.get_mut(&name.product)
                {
                    Arc::make_mut(product).schema = schema;
                }
            }
            Err(e) => {
                failed.insert(
                    name.clone(),
                    format!("view does not plan: {}", e.find_root()),
                );
            }
        }
    }
    remove_products(mesh, &failed, problems);
    reads.retain(|name, _| !withdrawn.contains_key(name) && !failed.contains_key(name));
    mesh.lineage = reads;
}

/// The names a view's SQL holds where an expression may name a column.
pub(super) fn names_in(sql: &str) -> Result<BTreeSet<String>, String> {
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::parser::Parser;

    let statements = Parser::parse_sql(&GenericDialect {}, sql).map_err(|e| e.to_string())?;
    Ok(crate::policy::names_in(&statements))
}

fn remove_products(
    mesh: &mut Mesh,
    withdrawn: &BTreeMap<ProductName, String>,
    problems: &mut Vec<PublicationProblem>,
) {
    for (name, reason) in withdrawn {
        if let Some(domain) = mesh.domains.get_mut(&name.domain)
            && domain.products.remove(&name.product).is_some()
        {
            problems.push(PublicationProblem {
                product: name.clone(),
                file: domain.config.file.clone(),
                reason: reason.clone(),
            });
        }
    }
}

/// The products a view's SQL reads. Names without a domain are refused: a
/// view is read from every domain, so it must say which it means.
fn referenced_products(
    state: &datafusion::execution::SessionState,
    sql: &str,
    own_domain: &str,
) -> Result<BTreeSet<ProductName>, String> {
    let dialect = state.config().options().sql_parser.dialect;
    let statement = state
        .sql_to_statement(sql, &dialect)
        .map_err(|e| format!("view SQL does not parse: {}", e.find_root()))?;
    let references = state
        .resolve_table_references(&statement)
        .map_err(|e| format!("view SQL: {}", e.find_root()))?;
    let mut products = BTreeSet::new();
    for reference in references {
        let (catalog, schema, table) = match &reference {
            TableReference::Full {
                catalog,
                schema,
                table,
            } => (Some(catalog.as_ref()), schema.as_ref(), table.as_ref()),
            TableReference::Partial { schema, table } => (None, schema.as_ref(), table.as_ref()),
            TableReference::Bare { table } => {
                return Err(format!(
                    "view reads `{table}` without a domain; write `{own_domain}.{table}` or `<domain>.{table}`"
                ));
            }
        };
        if catalog.is_some_and(|c| c != CATALOG_NAME) {
            return Err(format!(
                "view reads `{reference}` outside catalog `{CATALOG_NAME}`"
            ));
        }
        products.insert(ProductName {
            domain: schema.to_string(),
            product: table.to_string(),
        });
    }
    Ok(products)
}

/// A path from `start` back to itself through view dependencies, if any.
fn find_cycle(
    start: &ProductName,
    reads: &BTreeMap<ProductName, BTreeSet<ProductName>>,
) -> Option<Vec<ProductName>> {
    fn visit(
        node: &ProductName,
        start: &ProductName,
        reads: &BTreeMap<ProductName, BTreeSet<ProductName>>,
        path: &mut Vec<ProductName>,
        seen: &mut BTreeSet<ProductName>,
    ) -> bool {
        for next in reads.get(node).into_iter().flatten() {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if visit(next, start, reads, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.clone()];
    let mut seen = BTreeSet::new();
    visit(start, start, reads, &mut path, &mut seen).then_some(path)
}
