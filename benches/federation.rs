//! What pushdown buys: a selective query on a 1.2M-row PostgreSQL product,
//! with sub-plan pushdown and with it disabled (`pushdown = false`: the
//! source is asked only for the columns), side by side in one run. Prints
//! the rows each side received from PostgreSQL. Run with
//! `cargo bench --bench federation` (needs PostgreSQL 15 binaries).

#[path = "../tests/integration/pg.rs"]
#[allow(dead_code, unreachable_pub)]
mod pg;

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use datafusion::physical_plan::ExecutionPlan;
use futures::StreamExt;
use meshgate::auth::CallerIdentity;
use meshgate::config::MeshConfig;
use meshgate::server::Gateway;

const ROWS: u64 = 1_200_000;

fn domain(url: &str) -> String {
    format!(
        r#"
name = "bench"
owner = "bench@acme.example"

[storage.pushed]
type = "postgres"
url = "{url}"

[storage.raw]
type = "postgres"
url = "{url}"
pushdown = false

[[products]]
name = "events"
storage = "pushed"
table = "public.events"

[[products]]
name = "events_raw"
storage = "raw"
table = "public.events"
"#
    )
}

const GATEWAY: &str = r#"
domains = ["domains/*.toml"]
[auth]
issuer = "meshgate"
audience = "meshgate"
hs256_secret = "federation-bench-secret-0123456789"
[audit]
output = "off"
"#;

fn analyst() -> CallerIdentity {
    CallerIdentity {
        user: "bench".into(),
        groups: vec!["analyst".into()],
        attributes: Default::default(),
    }
}

/// Runs `sql` to the end: rows returned, and rows the source sent.
async fn run(gateway: &Gateway, sql: &str) -> (usize, usize) {
    let session = gateway.engine.session(&analyst(), None);
    let prepared = session.prepare(sql).await.unwrap();
    let plan = session.physical_plan(&prepared).await.unwrap();
    let mut stream =
        datafusion::physical_plan::execute_stream(Arc::clone(&plan), Default::default()).unwrap();
    let mut rows = 0;
    while let Some(batch) = stream.next().await {
        rows += batch.unwrap().num_rows();
    }
    (rows, source_rows(plan.as_ref()))
}

fn source_rows(plan: &dyn ExecutionPlan) -> usize {
    let own = if plan.name() == "RemoteExec" {
        plan.metrics().and_then(|m| m.output_rows()).unwrap_or(0)
    } else {
        0
    };
    own + plan
        .children()
        .iter()
        .map(|c| source_rows(c.as_ref()))
        .sum::<usize>()
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let pg = pg::Postgres::start();
    runtime.block_on(pg.execute(&format!(
        "CREATE TABLE events AS
           SELECT g AS id, g % 1000 AS account, (g % 10000) / 100.0 AS amount, md5(g::text) AS note
           FROM generate_series(1, {ROWS}) g;
         CREATE INDEX ON events (account);
         ANALYZE events;"
    )));
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("domains")).unwrap();
    std::fs::write(dir.path().join("meshgate.toml"), GATEWAY).unwrap();
    std::fs::write(dir.path().join("domains/bench.toml"), domain(&pg.url())).unwrap();
    let config = MeshConfig::load(&dir.path().join("meshgate.toml")).unwrap();
    let gateway = runtime.block_on(Gateway::open(config)).unwrap();
    assert!(gateway.problems.is_empty(), "{:?}", gateway.problems);

    let pushed = "SELECT id, amount FROM bench.events WHERE account = 42";
    let raw = "SELECT id, amount FROM bench.events_raw WHERE account = 42";
    let (rows, sent) = runtime.block_on(run(&gateway, pushed));
    let (raw_rows, raw_sent) = runtime.block_on(run(&gateway, raw));
    assert_eq!(rows, raw_rows);
    println!(
        "selective query on {ROWS} rows: {rows} result rows; PostgreSQL sent {sent} rows with pushdown, {raw_sent} without"
    );

    let mut group = c.benchmark_group("postgres_selective_query");
    group.sample_size(10);
    group.bench_function("pushdown", |b| {
        b.iter(|| runtime.block_on(run(&gateway, pushed)))
    });
    group.bench_function("no_pushdown", |b| {
        b.iter(|| runtime.block_on(run(&gateway, raw)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
