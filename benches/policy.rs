//! What policy enforcement costs: building a caller's session (and listing
//! the domains it sees), planning a three-product join (as alice: row
//! filter, masks, denial), and running the demo join end to end (as a crm
//! reader, who sees every row through masks and a denial, so both sides do
//! the same work), each with the demo's policies and without any. Run with
//! `cargo bench --bench policy`.
//!
//! The demo data (scale factor `MESHGATE_BENCH_SCALE`, default 0.1) is
//! generated once under `target/meshgate-bench-demo`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use datafusion::physical_plan::ExecutionPlan;
use futures::StreamExt;
use meshgate::auth::CallerIdentity;
use meshgate::config::MeshConfig;
use meshgate::server::Gateway;

const JOIN: &str = "SELECT n.n_name, count(*) AS orders, sum(o.o_totalprice) AS revenue \
    FROM sales.orders o \
    JOIN crm.customer c ON o.o_custkey = c.c_custkey \
    JOIN crm.nation n ON c.c_nationkey = n.n_nationkey \
    GROUP BY n.n_name ORDER BY revenue DESC";

fn demo_dir() -> PathBuf {
    let scale: f64 = std::env::var("MESHGATE_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.1);
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("target/meshgate-bench-demo-sf{scale}"));
    meshgate::demo::write_demo_config(&dir).unwrap();
    meshgate::demo::ensure_demo_data(&dir, scale).unwrap();
    dir
}

/// The demo config with its policies, or a copy with every policy (and
/// every `pii` tag) removed.
fn config(dir: &Path, policies: bool) -> MeshConfig {
    let mut config = MeshConfig::load(&dir.join("meshgate.toml")).unwrap();
    config.audit = meshgate::audit::AuditOutput::Off;
    if !policies {
        config.governance.tag_policies.clear();
        for domain in &mut config.domains {
            domain.policies.clear();
            // A `pii` column no policy protects is not published: with
            // the policies gone, the tags go too.
            for product in &mut domain.products {
                for column in &mut product.columns {
                    column.tags.retain(|tag| tag != "pii");
                }
            }
        }
    }
    config
}

fn alice() -> CallerIdentity {
    CallerIdentity {
        user: "alice".into(),
        groups: vec!["analyst".into()],
        attributes: [("region".to_string(), "EUROPE".to_string())].into(),
    }
}

/// Sees every row (the `crm` group lifts the row filter) but still gets the
/// masks and the denial: the end-to-end comparison does the same work.
fn crm_reader() -> CallerIdentity {
    CallerIdentity {
        user: "cory".into(),
        groups: vec!["crm".into()],
        attributes: Default::default(),
    }
}

/// The join's text, made distinct by `n`: the gateway reuses a plan for the
/// same caller and text for a few seconds, and a benchmark of planning must
/// plan.
fn join(n: u64) -> String {
    format!("{JOIN} -- {n}")
}

/// Plans `sql` for `caller`: session, logical and physical plan.
async fn plan(gateway: &Gateway, caller: &CallerIdentity, sql: &str) -> Arc<dyn ExecutionPlan> {
    let session = gateway.engine.session(caller, None);
    let prepared = session.prepare(sql).await.unwrap();
    session.physical_plan(&prepared).await.unwrap()
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = demo_dir();
    let gateways: Vec<(&str, Arc<Gateway>)> =
        [("with_policies", true), ("without_policies", false)]
            .into_iter()
            .map(|(name, policies)| {
                let gateway = runtime
                    .block_on(Gateway::open(config(&dir, policies)))
                    .unwrap();
                (name, Arc::new(gateway))
            })
            .collect();
    let caller = alice();

    // A session's DataFusion state is built when it is first used: listing
    // the domains the caller sees builds it.
    let mut group = c.benchmark_group("session");
    for (name, gateway) in &gateways {
        group.bench_function(*name, |b| {
            b.iter(|| gateway.engine.visible_domains(&caller))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("plan_3_product_join");
    let mut n = 0u64;
    for (name, gateway) in &gateways {
        group.bench_function(*name, |b| {
            b.iter(|| {
                n += 1;
                runtime.block_on(plan(gateway, &caller, &join(n)))
            })
        });
    }
    // The same statement again: the caller's plan is reused (physical
    // planning remains).
    let (_, with_policies) = &gateways[0];
    group.bench_function("with_policies_plan_reused", |b| {
        b.iter(|| runtime.block_on(plan(with_policies, &caller, JOIN)))
    });
    // A caller never seen before: the policies are bound, not found cached.
    let mut fresh = 0u64;
    group.bench_function("with_policies_first_query_of_a_caller", |b| {
        b.iter(|| {
            fresh += 1;
            let caller = CallerIdentity {
                user: format!("alice-{fresh}"),
                ..alice()
            };
            runtime.block_on(plan(with_policies, &caller, JOIN))
        })
    });
    group.finish();

    let caller = crm_reader();
    let mut group = c.benchmark_group("demo_join_end_to_end");
    group.sample_size(20);
    for (name, gateway) in &gateways {
        group.bench_function(*name, |b| {
            b.iter(|| {
                n += 1;
                let sql = join(n);
                runtime.block_on(async {
                    let session = gateway.engine.session(&caller, None);
                    let prepared = session.prepare(&sql).await.unwrap();
                    let mut stream = session.execute(prepared).await.unwrap();
                    let mut rows = 0;
                    while let Some(batch) = stream.next().await {
                        rows += batch.unwrap().num_rows();
                    }
                    rows
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
