//! meshgate is read-only and sandboxed (DESIGN §3.8, §6): every statement
//! that is not a query, and every way of reading files or URLs, is refused
//! with a clear InvalidArgument, in plain statements and prepared ones; so
//! are table modifiers the planner does not carry out.

use tonic::Code;

use crate::fixture::TestServer;
use crate::flight_sql::create_prepared;

const REFUSED: &[(&str, &str)] = &[
    ("INSERT INTO sales.orders VALUES (1)", "INSERT is refused"),
    (
        "UPDATE sales.orders SET o_comment = 'x'",
        "UPDATE is refused",
    ),
    ("DELETE FROM sales.orders", "DELETE is refused"),
    ("CREATE TABLE t (a INT)", "CREATE is refused"),
    ("CREATE VIEW v AS SELECT 1", "CREATE is refused"),
    ("DROP TABLE sales.orders", "DROP is refused"),
    (
        "ALTER TABLE sales.orders ADD COLUMN x INT",
        "ALTER is refused",
    ),
    (
        "CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '/etc/passwd'",
        "CREATE EXTERNAL TABLE is refused",
    ),
    ("COPY (SELECT 1) TO '/tmp/out.csv'", "COPY is refused"),
    ("COPY sales.orders TO '/tmp/out.parquet'", "COPY is refused"),
    ("SET datafusion.execution.batch_size = 1", "SET is refused"),
    ("RESET datafusion.execution.batch_size", "RESET is refused"),
    ("SHOW TABLES", "SHOW is not supported"),
    ("PREPARE p AS SELECT 1", "PREPARE is not supported"),
    ("SELECT * FROM read_parquet('/etc/passwd')", "read_parquet"),
    ("SELECT * FROM read_csv('/etc/passwd')", "read_csv"),
    (
        "SELECT * FROM crm.region WHERE r_name IN (SELECT * FROM read_json('x.json'))",
        "read_json",
    ),
    ("SELECT read_file('/etc/passwd')", "read_file"),
    ("SELECT * FROM '/etc/passwd'", "looks like a file or URL"),
    (
        "SELECT * FROM 'data/crm/nation.csv'",
        "looks like a file or URL",
    ),
    (
        "SELECT * FROM \"s3://bucket/key.parquet\"",
        "looks like a file or URL",
    ),
    ("SELECT 1; SELECT 2", "one SQL statement per request"),
    ("EXPLAIN DELETE FROM sales.orders", "DELETE is refused"),
    ("BEGIN", "refused"),
];

/// Statements the planner would answer with something other than what they
/// ask for: refused as unsupported.
const UNSUPPORTED: &[(&str, &str)] = &[
    (
        "SELECT count(*) FROM crm.region TABLESAMPLE (10 PERCENT)",
        "TABLESAMPLE is not supported",
    ),
    (
        "SELECT count(*) FROM (SELECT * FROM crm.region) TABLESAMPLE BERNOULLI (50)",
        "TABLESAMPLE is not supported",
    ),
    (
        "SELECT * FROM generate_series(1, 3) WITH ORDINALITY",
        "WITH ORDINALITY is not supported",
    ),
];

fn assert_refused(sql: &str, reason: &str, error: tonic::Status) {
    assert_eq!(error.code(), Code::InvalidArgument, "{sql}: {error:?}");
    assert!(
        error.message().contains(reason),
        "{sql}: {}",
        error.message()
    );
}

#[tokio::test]
async fn every_write_and_file_access_is_refused_as_a_statement() {
    let server = TestServer::start().await;
    let mut client = server.login("alice").await;
    for (sql, reason) in REFUSED.iter().chain(UNSUPPORTED) {
        assert_refused(sql, reason, client.query(sql).await.unwrap_err());
    }
    server.stop().await;
}

#[tokio::test]
async fn every_write_and_file_access_is_refused_at_prepare() {
    let server = TestServer::start().await;
    let mut client = server.login("alice").await;
    for (sql, reason) in REFUSED.iter().chain(UNSUPPORTED) {
        let error = create_prepared(&mut client, sql).await.unwrap_err();
        assert_refused(sql, reason, error);
    }
    server.stop().await;
}

#[tokio::test]
async fn explain_of_a_query_is_allowed() {
    let server = TestServer::start().await;
    let mut client = server.login("alice").await;
    let rows = client
        .query("EXPLAIN SELECT count(*) FROM sales.orders WHERE o_orderkey < 100")
        .await
        .unwrap();
    assert!(crate::fixture::pretty(&rows).contains("plan"));
    server.stop().await;
}
