//! The operator's HTTP endpoint: health, readiness and Prometheus metrics.

use arrow_flight::sql::{CommandPreparedStatementQuery, CommandStatementQuery, ProstMessageExt};

use crate::fixture::{HttpEndpoint, TestServer};

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The TPC-H regions named in a pretty-printed table.
fn regions_in(table: &str) -> Vec<&'static str> {
    ["EUROPE", "AMERICA", "ASIA", "AFRICA", "MIDDLE EAST"]
        .into_iter()
        .filter(|region| table.contains(&format!(" {region} ")))
        .collect()
}

/// The series of counter `name` for each of `values` of `label`, as the
/// endpoint tells them now.
async fn counters<const N: usize>(
    http: &HttpEndpoint,
    name: &str,
    label: &str,
    values: [&str; N],
) -> [f64; N] {
    let (_, text) = http.get("/metrics", None).await;
    values.map(|value| metric(&text, &format!("{name}{{{label}=\"{value}\"}}")).unwrap())
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let server = TestServer::start().await;
    let http = server.serve_http().await;

    assert_eq!(http.get("/healthz", None).await, (200, "ok\n".to_string()));
    let (status, body) = http.get("/readyz", None).await;
    assert_eq!(status, 200);
    assert!(body.contains("10 products published"), "{body}");
    assert!(
        body.contains("source support.helpdesk: reachable"),
        "{body}"
    );

    let (_, before) = http.get("/metrics", None).await;
    // Each listed metric is present before any query.
    for name in [
        "meshgate_active_queries",
        "meshgate_memory_reserved_bytes",
        "meshgate_process_resident_memory_bytes",
        "meshgate_products_published",
        "meshgate_rows_returned_total",
        "meshgate_bytes_returned_total",
        "meshgate_query_duration_seconds_count",
        "meshgate_config_loaded_timestamp_seconds",
        "meshgate_product_freshness_sla_seconds{product=\"crm.customer\"}",
    ] {
        assert!(
            metric(&before, name).is_some(),
            "{name} missing from\n{before}"
        );
    }
    assert_eq!(metric(&before, "meshgate_products_published"), Some(10.0));
    assert_eq!(
        metric(
            &before,
            "meshgate_product_freshness_sla_seconds{product=\"crm.customer\"}"
        ),
        Some(86400.0)
    );
    // Freshness of a file product: its file's modification time.
    let modified =
        crate::fixture::modified_seconds(&server.dir.path().join("data/crm/customer.parquet"));
    let published = metric(
        &before,
        "meshgate_product_last_modified_timestamp_seconds{product=\"crm.customer\"}",
    )
    .expect("crm.customer's modification time");
    assert!(
        (published - modified).abs() < 0.01,
        "{published} vs {modified}"
    );
    let age = metric(
        &before,
        "meshgate_product_freshness_seconds{product=\"crm.customer\"}",
    )
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        age >= 0.0 && (now - modified - age).abs() < 60.0,
        "age {age}"
    );

    let mut client = server.unrestricted().await;
    client.query("SELECT * FROM crm.region").await.unwrap();
    client.query("SELECT 1 / 0").await.unwrap_err();
    client.query("SELECT * FROM crm.nope").await.unwrap_err();
    client
        .query("SELECT count(*) FROM support.tickets")
        .await
        .unwrap();
    let (status, text) = http.get("/metrics", None).await;
    assert_eq!(status, 200);
    for (name, value) in [
        ("meshgate_queries_total{outcome=\"ok\"}", 2.0),
        ("meshgate_queries_total{outcome=\"error\"}", 2.0),
        ("meshgate_query_errors_total{kind=\"execution\"}", 1.0),
        ("meshgate_query_errors_total{kind=\"not_found\"}", 1.0),
        (
            "meshgate_product_queries_total{product=\"crm.region\",outcome=\"ok\"}",
            1.0,
        ),
        (
            "meshgate_domain_queries_total{domain=\"support\",outcome=\"ok\"}",
            1.0,
        ),
        (
            "meshgate_product_rows_returned_total{product=\"crm.region\"}",
            5.0,
        ),
        ("meshgate_rows_returned_total", 6.0),
        ("meshgate_active_queries", 0.0),
        ("meshgate_query_duration_seconds_count", 4.0),
        (
            "meshgate_source_request_duration_seconds_count{source=\"support.helpdesk\"}",
            1.0,
        ),
        (
            "meshgate_source_errors_total{source=\"support.helpdesk\"}",
            0.0,
        ),
        ("meshgate_source_up{source=\"support.helpdesk\"}", 1.0),
    ] {
        assert_eq!(metric(&text, name), Some(value), "{name} in\n{text}");
    }
    // Bytes: the Arrow IPC messages of both answers, the schema included.
    let bytes = metric(&text, "meshgate_bytes_returned_total").unwrap();
    let region_bytes = metric(
        &text,
        "meshgate_product_bytes_returned_total{product=\"crm.region\"}",
    )
    .unwrap();
    assert!(region_bytes > 100.0 && bytes > region_bytes, "{text}");

    // A client that goes away mid-query frees its query and its memory: a
    // large aggregation reserves memory while it runs, and gives it back.
    let command = CommandStatementQuery {
        query: "SELECT value, count(*) FROM range(100000000) GROUP BY value".into(),
        transaction_id: None,
    };
    let info = client.flight_info(command.as_any()).await.unwrap();
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let request = client.request(ticket);
    let stream = client.inner.do_get(request).await.unwrap().into_inner();
    let mut peak = 0.0f64;
    for _ in 0..500 {
        let (_, text) = http.get("/metrics", None).await;
        assert_eq!(
            metric(&text, "meshgate_active_queries"),
            Some(1.0),
            "{text}"
        );
        peak = peak.max(metric(&text, "meshgate_memory_reserved_bytes").unwrap());
        if peak > 1e6 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(peak > 1e6, "memory in use never rose: {peak}");
    drop(stream);
    let mut settled = None;
    for _ in 0..200 {
        let (_, text) = http.get("/metrics", None).await;
        let active = metric(&text, "meshgate_active_queries");
        let memory = metric(&text, "meshgate_memory_reserved_bytes");
        if active == Some(0.0) && memory == Some(0.0) {
            settled = Some(text);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let text = settled.expect("the dropped query kept running or kept its memory");
    assert_eq!(
        metric(&text, "meshgate_queries_total{outcome=\"cancelled\"}"),
        Some(1.0),
        "{text}"
    );

    http.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn a_statement_with_other_constants_is_bound_into_its_shapes_plan_under_the_same_policies() {
    let server = TestServer::start().await;
    let http = server.serve_http().await;
    let plans = async || {
        counters(
            &http,
            "meshgate_plans_total",
            "outcome",
            ["planned", "reused", "rebound"],
        )
        .await
    };
    // Two customers, one in Europe and one elsewhere, as the crm team sees them.
    let mut crm = server.as_identity("cory", &["crm"], &[]).await;
    let keys = crate::fixture::rows(
        &mut crm,
        "SELECT min(c_custkey) FROM crm.customer GROUP BY c_region = 'EUROPE' ORDER BY 1",
    )
    .await;
    let keys: Vec<i64> = keys
        .lines()
        .filter_map(|line| line.trim_matches(|c| c == '|' || c == ' ').parse().ok())
        .collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    let lookup =
        |key: i64| format!("SELECT c_custkey, c_region FROM crm.customer WHERE c_custkey = {key}");
    let region_of = async |client: &mut crate::fixture::TestClient, key: i64| {
        let out = crate::fixture::rows(client, &lookup(key)).await;
        regions_in(&out).first().map(|region| region.to_string())
    };
    let before = plans().await;
    let mut eu = server
        .as_identity("sam", &["analyst"], &[("region", "EUROPE")])
        .await;
    let mut found = Vec::new();
    for key in &keys {
        found.push(region_of(&mut eu, *key).await);
    }
    // The analyst's row filter holds for the rebound statement: one of the
    // two customers is theirs, the other is not shown.
    assert_eq!(
        found
            .iter()
            .filter(|r| r.as_deref() == Some("EUROPE"))
            .count(),
        1,
        "{found:?}"
    );
    assert_eq!(found.iter().filter(|r| r.is_none()).count(), 1, "{found:?}");
    let after = plans().await;
    assert_eq!(after[0] - before[0], 1.0, "the shape is planned once");
    assert_eq!(after[2] - before[2], 1.0, "the second lookup is rebound");
    // Another caller's lookups are planned for them, and see what they may.
    let mut crm_found = Vec::new();
    for key in &keys {
        crm_found.push(region_of(&mut crm, *key).await);
    }
    assert!(crm_found.iter().all(Option::is_some), "{crm_found:?}");
    assert_eq!(plans().await[0] - after[0], 1.0);
    http.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn a_querys_physical_plan_is_made_while_the_client_asks_where_to_fetch_and_run_once() {
    let server = TestServer::start().await;
    let http = server.serve_http().await;
    let made = async || {
        counters(
            &http,
            "meshgate_physical_plans_total",
            "made",
            ["ahead", "at_start"],
        )
        .await
    };
    let regions = |batches: &[arrow::array::RecordBatch]| {
        let mut regions = regions_in(&crate::fixture::pretty(batches));
        regions.sort();
        (crate::fixture::row_count(batches), regions)
    };
    let sql = "SELECT c_custkey, c_region FROM crm.customer WHERE c_custkey < 200";
    let mut eu = server
        .as_identity("sam", &["analyst"], &[("region", "EUROPE")])
        .await;

    // As ADBC and JDBC do: prepare, ask for the flight info, fetch.
    let prepared = crate::flight_sql::create_prepared(&mut eu, sql)
        .await
        .unwrap();
    let command = CommandPreparedStatementQuery {
        prepared_statement_handle: prepared.prepared_statement_handle,
    };
    let before = made().await;
    let (info, batches) = eu.command(command.as_any()).await.unwrap();
    let first = regions(&batches);
    assert!(first.0 > 0, "{first:?}");
    assert_eq!(first.1, ["EUROPE"], "the analyst's row filter holds");
    let after = made().await;
    assert_eq!(
        after[0] - before[0],
        1.0,
        "planned ahead: {before:?} {after:?}"
    );
    assert_eq!(after[1] - before[1], 0.0, "{before:?} {after:?}");

    // The plan made ahead ran once: fetching the ticket again plans anew.
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let again = eu.fetch(ticket).await.unwrap();
    assert_eq!(regions(&again), first);
    let later = made().await;
    assert_eq!(later[0] - after[0], 0.0, "{after:?} {later:?}");
    assert_eq!(later[1] - after[1], 1.0, "{after:?} {later:?}");

    // As pyarrow does, for another caller: the flight info, then the fetch.
    // Their plan is made for them, with their own policies.
    let mut crm = server.as_identity("cory", &["crm"], &[]).await;
    let theirs = crm.query(sql).await.unwrap();
    let (rows, seen) = regions(&theirs);
    assert!(rows > first.0 && seen.len() > 1, "{rows} {seen:?}");
    let end = made().await;
    assert_eq!(end[0] - later[0], 1.0, "{later:?} {end:?}");
    assert_eq!(end[1] - later[1], 0.0, "{later:?} {end:?}");

    http.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn a_plan_is_reused_by_the_same_callers_next_request_only() {
    let server = TestServer::start().await;
    let http = server.serve_http().await;
    let plans = async || {
        counters(
            &http,
            "meshgate_plans_total",
            "outcome",
            ["planned", "reused"],
        )
        .await
    };
    assert_eq!(plans().await, [0.0, 0.0]);
    let sql = "SELECT * FROM crm.region";
    let mut eu = server
        .as_identity("sam", &["analyst"], &[("region", "EU")])
        .await;
    // GetFlightInfo plans the statement; DoGet runs that plan.
    let first = eu.query(sql).await.unwrap();
    assert_eq!(plans().await, [1.0, 1.0]);
    let again = eu.query(sql).await.unwrap();
    assert_eq!(plans().await, [1.0, 3.0]);
    assert_eq!(first, again);
    // The same user name with other attributes, or another statement, is
    // planned afresh.
    let mut us = server
        .as_identity("sam", &["analyst"], &[("region", "US")])
        .await;
    us.query(sql).await.unwrap();
    assert_eq!(plans().await, [2.0, 4.0]);
    eu.query("SELECT r_name FROM crm.region").await.unwrap();
    assert_eq!(plans().await, [3.0, 5.0]);
    // A statement that does not plan leaves nothing to reuse.
    eu.query("SELECT * FROM crm.nope").await.unwrap_err();
    eu.query("SELECT * FROM crm.nope").await.unwrap_err();
    assert_eq!(plans().await, [3.0, 5.0]);
    http.stop().await;
    server.stop().await;
}
