//! Statements built to exhaust the stack (long operator chains, deep
//! nesting) are refused or answered; the server never goes down.

use tonic::Code;

use crate::fixture::{TestServer, assert_status, pretty};

#[test]
fn deep_and_long_expressions_never_take_the_server_down() {
    // The production runtime (deep worker stacks), as `meshgate serve` uses.
    let runtime = meshgate::server::runtime_builder().build().unwrap();
    runtime.block_on(async {
        let server = TestServer::start().await;
        let mut client = server.unrestricted().await;

        // Just under the limit: answered.
        let sum = format!("SELECT {} AS n", vec!["1"; 500].join(" + "));
        let rows = client.query(&sum).await.unwrap();
        assert!(pretty(&rows).contains("| 500 |"), "{}", pretty(&rows));
        let chain = format!(
            "SELECT count(*) AS n FROM crm.nation WHERE n_nationkey{} > 0",
            " + 1".repeat(200)
        );
        let rows = client.query(&chain).await.unwrap();
        assert!(pretty(&rows).contains("| 25 |"), "{}", pretty(&rows));

        // Over it, or nested past the parser's limit: refused, clearly.
        let refused = [
            (
                format!("SELECT {}", vec!["1"; 5000].join(" + ")),
                "too complex",
            ),
            (
                format!(
                    "SELECT count(*) FROM crm.nation WHERE {}",
                    (0..20_000)
                        .map(|i| format!("n_nationkey = {i}"))
                        .collect::<Vec<_>>()
                        .join(" OR ")
                ),
                "exceeds the limit",
            ),
            (
                format!(
                    "SELECT count(*) FROM crm.nation WHERE {}",
                    (0..2_000)
                        .map(|i| format!("n_nationkey <> {i}"))
                        .collect::<Vec<_>>()
                        .join(" AND ")
                ),
                "too complex",
            ),
            (
                format!("SELECT {}1{}", "(".repeat(5000), ")".repeat(5000)),
                "nested too deeply",
            ),
            (format!("SELECT {}1", "- ".repeat(5000)), "too complex"),
            (
                format!(
                    "SELECT * FROM {}crm.nation{}",
                    "(SELECT * FROM ".repeat(300),
                    ")".repeat(300)
                ),
                "nested too deeply",
            ),
        ];
        for (sql, reason) in refused {
            let error = client.query(&sql).await.unwrap_err();
            assert_status(&error, Code::InvalidArgument, reason);
        }

        // A long IN list is fine.
        let in_list = format!(
            "SELECT count(*) AS n FROM crm.nation WHERE n_nationkey IN ({})",
            (0..20_000)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        assert!(pretty(&client.query(&in_list).await.unwrap()).contains("| 25 |"));
        assert!(client.query("SELECT 1").await.is_ok());
        server.stop().await;
    });
}

/// A long query of the unrestricted user, started and left unread: it
/// holds its permits until the returned stream is dropped.
async fn hold_a_running_query(server: &TestServer) -> tonic::Streaming<arrow_flight::FlightData> {
    use arrow_flight::sql::{CommandStatementQuery, ProstMessageExt};
    use futures::StreamExt;

    let mut client = server.unrestricted().await;
    let command = CommandStatementQuery {
        query: "SELECT value FROM range(1000000000)".into(),
        transaction_id: None,
    };
    let info = client.flight_info(command.as_any()).await.unwrap();
    let request = client.request(info.endpoint[0].ticket.clone().unwrap());
    let mut running = client.inner.do_get(request).await.unwrap().into_inner();
    assert!(running.next().await.is_some());
    running
}

async fn limited_server(limits: &str) -> TestServer {
    let limits = limits.to_string();
    TestServer::start_with(move |dir| {
        crate::fixture::edit(
            &dir.join("meshgate.toml"),
            "query_timeout = \"5m\"\nmax_concurrent_queries = 64",
            &limits,
        );
    })
    .await
}

#[tokio::test]
async fn a_query_over_the_memory_limit_fails_cleanly_and_the_next_succeeds() {
    let server = limited_server("query_timeout = \"5m\"\nmemory_per_query = \"4MiB\"").await;
    let mut client = server.unrestricted().await;
    // array_agg cannot spill: 3 million values do not fit in 4 MiB.
    let error = client
        .query("SELECT array_length(array_agg(value)) FROM range(3000000)")
        .await
        .unwrap_err();
    assert_status(&error, Code::ResourceExhausted, "resources exhausted");
    // A sort that does not fit (8 MB of values) spills to disk and succeeds.
    let sorted = client
        .query("SELECT value FROM range(1000000) ORDER BY value DESC")
        .await
        .unwrap();
    assert_eq!(crate::fixture::row_count(&sorted), 1_000_000);
    use arrow::array::AsArray;
    let first = sorted[0]
        .column(0)
        .as_primitive::<arrow::datatypes::Int64Type>()
        .value(0);
    assert_eq!(first, 999_999);
    let rows = client
        .query("SELECT count(*) AS n FROM crm.region")
        .await
        .unwrap();
    assert!(pretty(&rows).contains("| 5 |"));
    server.stop().await;
}

#[tokio::test]
async fn the_query_timeout_fires() {
    let server = limited_server("query_timeout = \"1s\"\nmax_concurrent_queries = 64").await;
    let mut client = server.unrestricted().await;
    let started = std::time::Instant::now();
    let error = client
        .query("SELECT count(*) FROM range(100000000000)")
        .await
        .unwrap_err();
    assert_status(&error, Code::DeadlineExceeded, "time limit of 1s");
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    assert!(client.query("SELECT 1").await.is_ok());
    server.stop().await;
}

#[tokio::test]
async fn queries_past_the_concurrency_limit_wait_then_fail_clearly() {
    let server = limited_server("query_timeout = \"1s\"\nmax_concurrent_queries = 1").await;
    let running = hold_a_running_query(&server).await;

    let mut second = server.unrestricted().await;
    let error = second.query("SELECT 1").await.unwrap_err();
    assert_status(&error, Code::ResourceExhausted, "already running");

    drop(running);
    let mut answered = false;
    for _ in 0..50 {
        if second.query("SELECT 1").await.is_ok() {
            answered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        answered,
        "the slot is freed when the first stream goes away"
    );
    server.stop().await;
}

const FAULTS_DOMAIN: &str = r#"
name = "faults"
description = "A product whose file the test breaks"

[storage.files]
type = "object_store"
url = "file://../faultdata"

[[products]]
name = "customer"
storage = "files"
location = "customer.parquet"
format = "parquet"
"#;

#[tokio::test]
async fn a_corrupt_or_missing_file_fails_naming_the_product_and_others_answer() {
    let server = TestServer::start_with(|dir| {
        let data = dir.join("faultdata");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::copy(
            crate::fixture::demo_data().join("data/crm/customer.parquet"),
            data.join("customer.parquet"),
        )
        .unwrap();
        std::fs::write(dir.join("domains/faults.toml"), FAULTS_DOMAIN).unwrap();
    })
    .await;
    let mut client = server.unrestricted().await;
    let count = "SELECT count(*) AS n, sum(c_acctbal) AS s FROM faults.customer";
    let before = pretty(&client.query(count).await.unwrap());
    assert!(before.contains("1500"), "{before}");

    // Corrupt: the middle of the file overwritten, footer kept.
    let file = server.dir.path().join("faultdata/customer.parquet");
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle..middle + 4096].fill(0xAB);
    let footer = bytes.len() - 8;
    bytes[footer - 64..footer].fill(0xCD);
    std::fs::write(&file, &bytes).unwrap();
    let error = client.query(count).await.unwrap_err();
    assert_status(&error, Code::Unavailable, "faults.customer");
    // Another product answers on the same connection.
    let nations = pretty(
        &client
            .query("SELECT count(*) AS n FROM crm.nation")
            .await
            .unwrap(),
    );
    assert!(nations.contains("25"), "{nations}");

    // Missing: an error naming the product and the file, not an empty table.
    std::fs::remove_file(&file).unwrap();
    let error = client.query(count).await.unwrap_err();
    assert_status(&error, Code::Unavailable, "faults.customer");
    assert!(error.message().contains("customer.parquet"), "{error:?}");
    assert!(error.message().contains("not found"), "{error:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_user_past_their_own_limit_waits_then_fails_while_others_run() {
    let server = limited_server(
        "query_timeout = \"1s\"\nmax_concurrent_queries = 64\nmax_concurrent_queries_per_user = 1",
    )
    .await;
    let running = hold_a_running_query(&server).await;

    // The same user, on another connection: refused after waiting.
    let mut again = server.unrestricted().await;
    let error = again.query("SELECT 1").await.unwrap_err();
    assert_eq!(error.code(), Code::ResourceExhausted, "{error:?}");
    assert!(
        error.message().contains(
            "user `root` already runs 1 queries (limits.max_concurrent_queries_per_user)"
        ),
        "{}",
        error.message()
    );
    // Another user runs meanwhile.
    let mut other = server.as_identity("olga", &["analyst"], &[]).await;
    let answer = pretty(&other.query("SELECT 1 AS one").await.unwrap());
    assert!(answer.contains("| 1 "), "{answer}");

    // When the first query ends, the user runs again.
    drop(running);
    let mut answered = false;
    for _ in 0..50 {
        if again.query("SELECT 1").await.is_ok() {
            answered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(answered, "the user's permit was not released");
    server.stop().await;
}

#[tokio::test]
async fn functions_whose_result_grows_with_an_argument_stop_before_they_run() {
    let server = TestServer::start().await;
    let mut client = server.login("alice").await;
    // Each would allocate gigabytes from a few bytes of SQL.
    for (sql, function) in [
        ("SELECT repeat('x', 2147483647) AS s", "repeat()"),
        ("SELECT lpad('x', 2000000000, 'y') AS s", "lpad()"),
        ("SELECT rpad('x', 2000000000) AS s", "rpad()"),
        (
            "SELECT replace(repeat('x', 10000000), '', repeat('y', 100)) AS s",
            "replace()",
        ),
        (
            "SELECT regexp_replace(repeat('x', 10000000), '', repeat('y', 20), 'g') AS s",
            "regexp_replace()",
        ),
        ("SELECT array_repeat(1, 1000000000) AS a", "array_repeat()"),
        (
            "SELECT array_repeat(array_repeat(1, 30000), 30000) AS a",
            "array_repeat()",
        ),
        (
            "SELECT array_resize([1], 1000000000, 0) AS a",
            "array_resize()",
        ),
        (
            "SELECT generate_series(1, 10000000000) AS a",
            "generate_series()",
        ),
        ("SELECT range(10000000000) AS a", "range()"),
        (
            "SELECT generate_series(TIMESTAMP '2000-01-01', TIMESTAMP '2030-01-01', INTERVAL '1 second') AS a",
            "generate_series()",
        ),
        (
            "SELECT levenshtein(repeat('a', 100000), repeat('b', 100000)) AS d",
            "levenshtein()",
        ),
        // Small per row, but not over a whole batch of rows.
        (
            "SELECT max(length(repeat(c_comment, 200000))) AS n FROM crm.customer",
            "repeat()",
        ),
    ] {
        let error = client.query(sql).await.unwrap_err();
        assert_eq!(error.code(), Code::ResourceExhausted, "{sql}: {error:?}");
        assert!(
            error.message().contains(function)
                && (error.message().contains("256.0 MiB") || error.message().contains("268435456")),
            "{sql}: {}",
            error.message()
        );
    }
    // The same functions, at sizes a query asks for.
    let rows = client
        .query(
            "SELECT length(repeat('ab', 1000)) AS r, lpad('7', 3, '0') AS l, \
             replace('abcabc', 'b', 'XX') AS p, regexp_replace('hello', 'l', 'L', 'g') AS x, \
             array_length(array_repeat(1, 1000)) AS a, array_length(array_resize([1], 5, 0)) AS z, \
             array_length(generate_series(1, 100000)) AS g, \
             array_length(generate_series(DATE '2020-01-01', DATE '2020-12-31', INTERVAL '1 day')) AS d, \
             levenshtein('kitten', 'sitting') AS v",
        )
        .await
        .unwrap();
    let text = pretty(&rows);
    for cell in [
        "| 2000 |",
        "| 007 |",
        "| aXXcaXXc |",
        "| heLLo |",
        "| 1000 |",
        "| 5 ",
        "| 100000 |",
        "| 366 |",
        "| 3 |",
    ] {
        assert!(text.contains(cell), "{cell} in {text}");
    }
    let rows = client
        .query(
            "SELECT sum(length(lpad(c_name, 40, '*'))) = 40 * count(*) AS padded FROM crm.customer",
        )
        .await
        .unwrap();
    assert!(pretty(&rows).contains("| true "), "{}", pretty(&rows));
    // A pattern that does not compile is the caller's mistake.
    let error = client
        .query("SELECT regexp_replace('a', '(', 'b') AS s")
        .await
        .unwrap_err();
    assert_status(&error, Code::InvalidArgument, "invalid regular expression");
    for sql in [
        "SELECT count(*) FROM crm.customer WHERE c_comment ~ '('",
        "SELECT count(*) FROM crm.customer WHERE regexp_like(c_comment, '(')",
    ] {
        let error = client.query(sql).await.unwrap_err();
        assert_status(&error, Code::InvalidArgument, "invalid regular expression");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_recursive_query_stops_after_its_iterations_limit() {
    let server = limited_server("query_timeout = \"5m\"\nmax_recursion_depth = 50").await;
    let mut client = server.login("alice").await;
    // Never runs dry: stopped at the limit, not at the timeout.
    let started = std::time::Instant::now();
    let error = client
        .query("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r")
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::ResourceExhausted, "{error:?}");
    assert!(
        error.message().contains("ran 50 iterations")
            && error.message().contains("limits.max_recursion_depth"),
        "{}",
        error.message()
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    // 49 iterations that yield a row and the one that yields none: within.
    let rows = client
        .query("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 50) SELECT count(*) AS c, max(n) AS m FROM r")
        .await
        .unwrap();
    assert!(pretty(&rows).contains("| 50 | 50 |"), "{}", pretty(&rows));
    let error = client
        .query("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 51) SELECT count(*) FROM r")
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::ResourceExhausted, "{error:?}");
    // Each run of the query counts afresh, and a recursive query nested in
    // another counts its own iterations.
    for _ in 0..2 {
        let rows = client
            .query(
                "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 40) \
                 SELECT count(*) AS c, (WITH RECURSIVE q(m) AS (SELECT 1 UNION ALL SELECT m + 1 FROM q WHERE m < 45) \
                 SELECT count(*) FROM q) AS d FROM r",
            )
            .await
            .unwrap();
        assert!(pretty(&rows).contains("| 40 | 45 |"), "{}", pretty(&rows));
    }
    server.stop().await;
}

#[tokio::test]
async fn the_gateway_memory_bounds_every_query_even_with_a_larger_own_limit() {
    let server = limited_server(
        "query_timeout = \"5m\"\ngateway_memory = \"4MiB\"\nmemory_per_query = \"1GiB\"",
    )
    .await;
    let mut client = server.unrestricted().await;
    // array_agg cannot spill: 3 million values fit the query's own limit,
    // not the gateway's.
    let error = client
        .query("SELECT array_length(array_agg(value)) FROM range(3000000)")
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::ResourceExhausted, "{error:?}");
    // A sort over the gateway's memory spills and succeeds.
    let sorted = client
        .query("SELECT value FROM range(1000000) ORDER BY value DESC")
        .await
        .unwrap();
    assert_eq!(crate::fixture::row_count(&sorted), 1_000_000);
    let rows = client
        .query("SELECT count(*) AS n FROM crm.region")
        .await
        .unwrap();
    assert!(pretty(&rows).contains("| 5 |"));
    // Nothing is left held once the queries are over.
    let http = server.serve_http().await;
    let (_, metrics) = http.get("/metrics", None).await;
    http.stop().await;
    assert!(
        metrics.contains("meshgate_memory_reserved_bytes 0"),
        "{}",
        metrics
            .lines()
            .filter(|line| line.contains("memory"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    server.stop().await;
}

#[tokio::test]
async fn a_join_that_multiplies_rows_stops_at_the_timeout() {
    let server = limited_server("query_timeout = \"2s\"").await;
    let mut client = server.login("alice").await;
    // Every probe row matches all 300 000 build rows: one probe batch is
    // 2.4 billion joined rows, a minute of work without reading the input.
    let started = std::time::Instant::now();
    let error = client
        .query(
            "SELECT count(*) FROM range(100000) a JOIN range(300000) b \
             ON a.value % 1 = b.value % 1",
        )
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::DeadlineExceeded, "{error:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "stopped after {:?}",
        started.elapsed()
    );
    // The cores are free again: a query runs at once.
    let rows = client
        .query("SELECT count(*) AS n FROM crm.region")
        .await
        .unwrap();
    assert!(pretty(&rows).contains("| 5 |"));
    server.stop().await;
}
