//! Federation (DESIGN §5): PostgreSQL, SQLite and remote Flight SQL
//! products next to the demo's Parquet ones, with sub-plan pushdown checked
//! against what a real PostgreSQL server logged, faults, and a mesh of two
//! gateways forwarding the caller's token.
//!
//! The `ledger` domain keeps TPC-H orders and customers in PostgreSQL, plus
//! `people`, whose hidden rows carry `divisor = 0`: a caller's expression
//! evaluated on a hidden row fails the query. `geo` keeps the nations in
//! SQLite.

use std::path::Path;
use std::time::Duration;

use tonic::Code;

use crate::fixture::{TestClient, TestServer, assert_status, demo_data, pretty, rows};
use crate::pg::{Postgres, read_parquet};

fn ledger_domain(url: &str) -> String {
    format!(
        r#"
name = "ledger"
owner = "ledger@acme.example"
description = "Orders and customers in PostgreSQL"

[storage.pg]
type = "postgres"
url = "{url}"
connect_timeout = "2s"

[[products]]
name = "orders"
storage = "pg"
table = "tpch.orders"
columns = [
  {{ name = "o_orderkey", type = "Int64" }},
  {{ name = "o_custkey", type = "Int64" }},
  {{ name = "o_orderstatus", type = "Utf8" }},
  {{ name = "o_totalprice", type = "Decimal128(15, 2)" }},
  {{ name = "o_orderdate", type = "Date32" }},
  {{ name = "o_clerk", type = "Utf8" }},
]

[[products]]
name = "customer"
storage = "pg"
table = "tpch.customer"

[[products]]
name = "people"
storage = "pg"
table = "tpch.people"

[[products]]
name = "words"
storage = "pg"
table = "tpch.words"
columns = [{{ name = "word", type = "Utf8" }}, {{ name = "id", type = "Utf8" }}]

[[policies]]
product = "orders"
row_filter = "o_orderstatus = 'F' OR has_group('crm')"
columns.o_clerk = {{ mask = "'***'", unless = "has_group('crm')" }}

[[policies]]
product = "people"
row_filter = "region = user_attr('region')"
"#
    )
}

const GEO_DOMAIN: &str = r#"
name = "geo"
owner = "geo@acme.example"
description = "Nations in SQLite"

[storage.local]
type = "sqlite"
path = "../geo.sqlite"

[[products]]
name = "nation"
storage = "local"
table = "nation"
"#;

/// Domain `remote`: the customers of a crm domain gateway reached with the
/// caller's own token, through the storage settings `connection` (its url
/// and TLS options).
pub(crate) fn remote_crm_domain(connection: &str) -> String {
    format!(
        r#"
name = "remote"
owner = "platform@acme.example"
description = "The crm domain's gateway"

[storage.crm]
type = "flight_sql"
{connection}
forward_token = true

[[products]]
name = "customer"
storage = "crm"
table = "crm.customer"
columns = [
  {{ name = "c_custkey", type = "Int64" }},
  {{ name = "c_name", type = "Utf8" }},
  {{ name = "c_region", type = "Utf8" }},
]
"#
    )
}

/// A PostgreSQL server with the ledger tables.
async fn ledger_postgres() -> Postgres {
    let pg = Postgres::start();
    pg.execute("CREATE SCHEMA tpch").await;
    let data = demo_data().join("data");
    pg.load("tpch.orders", &read_parquet(&data.join("sales/orders")))
        .await;
    pg.load(
        "tpch.customer",
        &read_parquet(&data.join("crm/customer.parquet")),
    )
    .await;
    pg.execute(
        "CREATE TABLE tpch.people (id bigint, name text, region text, divisor bigint);
         INSERT INTO tpch.people VALUES
           (1, 'Ann', 'EU', 1), (2, 'Bob', 'EU', 2), (3, 'Cid', 'US', 0), (4, 'Dee', 'US', 0);",
    )
    .await;
    // Words ordered by ICU's root collation in PostgreSQL: `_x`, `a`, `B`, `c`.
    pg.execute(
        "CREATE TABLE tpch.words (word text COLLATE \"und-x-icu\", id uuid);
         INSERT INTO tpch.words VALUES
           ('a', '00000000-0000-0000-0000-00000000000a'),
           ('B', '00000000-0000-0000-0000-00000000000b'),
           ('_x', '00000000-0000-0000-0000-00000000000c'),
           ('c', '00000000-0000-0000-0000-00000000000d');",
    )
    .await;
    pg
}

/// The nations of the demo's CSV in a SQLite file.
fn write_geo(path: &Path) {
    let csv = std::fs::read_to_string(demo_data().join("data/crm/nation.csv")).unwrap();
    let db = rusqlite::Connection::open(path).unwrap();
    db.execute_batch(
        "CREATE TABLE nation (n_nationkey INTEGER, n_name TEXT, n_regionkey INTEGER, n_comment TEXT)",
    )
    .unwrap();
    let mut reader = csv.lines();
    let header = reader.next().unwrap();
    assert!(header.starts_with("n_nationkey"), "{header}");
    let mut rdr =
        arrow::csv::ReaderBuilder::new(std::sync::Arc::new(arrow::datatypes::Schema::new(vec![
            arrow::datatypes::Field::new("k", arrow::datatypes::DataType::Int64, false),
            arrow::datatypes::Field::new("n", arrow::datatypes::DataType::Utf8, false),
            arrow::datatypes::Field::new("r", arrow::datatypes::DataType::Int64, false),
            arrow::datatypes::Field::new("c", arrow::datatypes::DataType::Utf8, true),
        ])))
        .with_header(true)
        .build(std::io::Cursor::new(csv.clone()))
        .unwrap();
    let batch = rdr.next().unwrap().unwrap();
    use arrow::array::AsArray;
    let keys = batch
        .column(0)
        .as_primitive::<arrow::datatypes::Int64Type>();
    let names = batch.column(1).as_string::<i32>();
    let regions = batch
        .column(2)
        .as_primitive::<arrow::datatypes::Int64Type>();
    let comments = batch.column(3).as_string::<i32>();
    for i in 0..batch.num_rows() {
        db.execute(
            "INSERT INTO nation VALUES (?1, ?2, ?3, ?4)",
            rusqlite::params![
                keys.value(i),
                names.value(i),
                regions.value(i),
                comments.value(i)
            ],
        )
        .unwrap();
    }
}

async fn federated_server(pg: &Postgres) -> TestServer {
    let url = pg.url();
    TestServer::start_with(move |dir| {
        std::fs::write(dir.join("domains/ledger.toml"), ledger_domain(&url)).unwrap();
        std::fs::write(dir.join("domains/geo.toml"), GEO_DOMAIN).unwrap();
        write_geo(&dir.join("geo.sqlite"));
    })
    .await
}

/// The SQL statements PostgreSQL received that mention `needle`.
fn received(pg: &Postgres, needle: &str) -> Vec<String> {
    pg.statements()
        .into_iter()
        .filter(|s| s.contains(needle))
        .collect()
}

/// EXPLAIN ANALYZE of `sql`: each source's statement as shown, and the rows
/// it sent.
async fn remote_reads(client: &mut TestClient, sql: &str) -> Vec<(String, usize)> {
    let text = rows(client, &format!("EXPLAIN ANALYZE {sql}")).await;
    text.lines()
        .filter(|l| l.contains("RemoteExec:"))
        .map(|l| {
            let rows = l
                .split("output_rows=")
                .nth(1)
                .and_then(|r| {
                    r.split(|c: char| !c.is_ascii_digit())
                        .next()
                        .map(|d| d.parse().unwrap())
                })
                .unwrap_or_else(|| panic!("no output_rows in {l}"));
            (l.trim().to_string(), rows)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_across_postgres_sqlite_and_parquet_honours_each_callers_policies() {
    let pg = ledger_postgres().await;
    let server = federated_server(&pg).await;
    let federated = "SELECT n.n_name, count(*) AS orders, sum(o.o_totalprice) AS total
        FROM ledger.orders o
        JOIN crm.customer c ON o.o_custkey = c.c_custkey
        JOIN geo.nation n ON c.c_nationkey = n.n_nationkey
        GROUP BY n.n_name ORDER BY n.n_name";
    // The same question over the demo's Parquet and CSV copies, with each
    // caller's policies written out by hand.
    let reference = |filter: &str| {
        format!(
            "SELECT n.n_name, count(*) AS orders, sum(o.o_totalprice) AS total
             FROM sales.orders o
             JOIN crm.customer c ON o.o_custkey = c.c_custkey
             JOIN crm.nation n ON c.c_nationkey = n.n_nationkey
             WHERE {filter}
             GROUP BY n.n_name ORDER BY n.n_name"
        )
    };
    let mut root = server.unrestricted().await;
    for (user, filter) in [
        ("alice", "c.c_region = 'EUROPE' AND o.o_orderstatus = 'F'"),
        ("bob", "c.c_region = 'AMERICA' AND o.o_orderstatus = 'F'"),
        ("carol", "true"),
    ] {
        let mut client = server.login(user).await;
        let got = rows(&mut client, federated).await;
        let expected = rows(&mut root, &reference(filter)).await;
        assert_eq!(got, expected, "{user}");
        assert!(got.lines().count() > 4, "{user}: {got}");
    }
    // Masks travel with the rows: analysts see the clerk masked.
    let mut alice = server.login("alice").await;
    let clerks = rows(&mut alice, "SELECT DISTINCT o_clerk FROM ledger.orders").await;
    assert!(
        clerks.contains("***") && !clerks.contains("Clerk#"),
        "{clerks}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_receives_the_work_and_sends_only_result_rows() {
    let pg = ledger_postgres().await;
    let server = federated_server(&pg).await;
    let mut carol = server.login("carol").await;

    // (a) a selective filter and a projection
    let reads = remote_reads(
        &mut carol,
        "SELECT o_orderkey, o_totalprice FROM ledger.orders WHERE o_orderkey = 7",
    )
    .await;
    assert_eq!(reads.len(), 1, "{reads:?}");
    assert_eq!(reads[0].1, 1, "{reads:?}");
    let sent = received(&pg, "\"o_orderkey\" = 7");
    assert!(!sent.is_empty(), "{:#?}", pg.statements());
    assert!(
        sent.iter()
            .all(|s| !s.contains("o_comment") && !s.contains("o_clerk")),
        "{sent:#?}"
    );

    // (b) an aggregate
    let reads = remote_reads(
        &mut carol,
        "SELECT o_orderstatus, count(*) AS n FROM ledger.orders GROUP BY o_orderstatus",
    )
    .await;
    assert_eq!(reads.len(), 1, "{reads:?}");
    assert_eq!(reads[0].1, 3, "three statuses: {reads:?}");
    assert!(
        !received(&pg, "GROUP BY \"orders\".\"o_orderstatus\"").is_empty()
            || !received(&pg, "GROUP BY").is_empty(),
        "{:#?}",
        pg.statements()
    );

    // (c) a join of two PostgreSQL products
    let reads = remote_reads(
        &mut carol,
        "SELECT c.c_name, sum(o.o_totalprice) AS total FROM ledger.orders o
         JOIN ledger.customer c ON o.o_custkey = c.c_custkey
         WHERE c.c_custkey < 4 GROUP BY c.c_name",
    )
    .await;
    assert_eq!(
        reads.len(),
        1,
        "one statement for the whole query: {reads:?}"
    );
    assert!(reads[0].1 <= 3, "{reads:?}");
    let joins: Vec<String> = received(&pg, "JOIN")
        .into_iter()
        .filter(|s| s.contains("tpch") && s.contains("customer") && s.contains("orders"))
        .collect();
    assert!(!joins.is_empty(), "{:#?}", pg.statements());

    // (d) a limit
    let reads = remote_reads(&mut carol, "SELECT o_orderkey FROM ledger.orders LIMIT 5").await;
    assert_eq!(reads[0].1, 5, "{reads:?}");
    assert!(
        !received(&pg, "LIMIT 5").is_empty(),
        "{:#?}",
        pg.statements()
    );

    // (e) a join of two PostgreSQL products inside a scalar subquery, which
    // stays a subquery until it runs: it too goes as one statement, and
    // the answer is that of the same question asked with a derived table.
    let average = "SELECT avg(o.o_totalprice) AS a FROM ledger.orders o
         JOIN ledger.customer c ON o.o_custkey = c.c_custkey WHERE c.c_custkey < 4";
    let subquery = format!(
        "SELECT o_orderkey FROM ledger.orders WHERE o_totalprice > ({average})
         ORDER BY o_orderkey LIMIT 3"
    );
    let reads = remote_reads(&mut carol, &subquery).await;
    let joins: Vec<&(String, usize)> = reads
        .iter()
        .filter(|(line, _)| line.contains("JOIN"))
        .collect();
    assert_eq!(joins.len(), 1, "the subquery's join, sent whole: {reads:?}");
    let derived = format!(
        "SELECT o_orderkey FROM ledger.orders, ({average}) t WHERE o_totalprice > t.a
         ORDER BY o_orderkey LIMIT 3"
    );
    let got = rows(&mut carol, &subquery).await;
    assert_eq!(got, rows(&mut carol, &derived).await);
    assert_eq!(got.lines().filter(|l| l.contains('|')).count(), 4, "{got}");

    // EXPLAIN shows the statement the source receives.
    let explain = rows(
        &mut carol,
        "EXPLAIN SELECT o_orderkey FROM ledger.orders WHERE o_orderkey = 42",
    )
    .await;
    assert!(
        explain.contains("RemoteExec: source=ledger.pg") && explain.contains("= 42"),
        "{explain}"
    );
    server.stop().await;
}

/// A join between two sources sends the keys of its build side to the
/// source on its probe side: PostgreSQL is asked for the customers of the
/// one nation SQLite found, and sends only those; with a policy fenced in
/// the statement, the answer is still the caller's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_sends_its_keys_to_the_source_it_probes() {
    let pg = ledger_postgres().await;
    // Its four rows known, `people` is the side a join with the 25 nations
    // builds on.
    pg.execute("ANALYZE tpch.people").await;
    let server = federated_server(&pg).await;
    let mut root = server.unrestricted().await;
    let mut carol = server.login("carol").await;

    let federated = "SELECT c.c_custkey, c.c_name FROM geo.nation n
        JOIN ledger.customer c ON c.c_nationkey = n.n_nationkey
        WHERE n.n_name = 'GERMANY' ORDER BY c.c_custkey";
    let reference = "SELECT c.c_custkey, c.c_name FROM crm.nation n
        JOIN crm.customer c ON c.c_nationkey = n.n_nationkey
        WHERE n.n_name = 'GERMANY' ORDER BY c.c_custkey";
    let got = rows(&mut carol, federated).await;
    assert_eq!(got, rows(&mut root, reference).await);
    let customers = got.lines().filter(|l| l.contains("Customer#")).count();
    assert!(customers > 0, "{got}");
    // GERMANY's key is 7.
    let sent = received(&pg, "\"meshgate_keyed\"");
    assert!(
        sent.iter()
            .any(|s| s.contains("customer") && s.contains("IN (7)")),
        "{:#?}",
        pg.statements()
    );
    let reads = remote_reads(&mut carol, federated).await;
    let (line, read) = reads
        .iter()
        .find(|(line, _)| line.contains("ledger.pg"))
        .unwrap_or_else(|| panic!("{reads:?}"));
    assert_eq!(*read, customers, "only the nation's customers: {line}");
    assert!(
        line.contains("join keys sent=[c_nationkey: 1 keys]"),
        "{line}"
    );
    // Administrators see the statement as it was sent, keys and all.
    let mut ops = server.as_identity("ops", &["platform"], &[]).await;
    let plan = rows(&mut ops, &format!("EXPLAIN ANALYZE {federated}")).await;
    assert!(
        plan.contains("sent=WITH \"meshgate_keyed\"") && plan.contains("IN (7)"),
        "{plan}"
    );

    // Orders under alice's row filter and mask, probed with the keys of
    // the nation's customers: the keys apply to what leaves the fence that
    // holds her policy.
    let mut alice = server.login("alice").await;
    let federated = "SELECT o.o_orderkey, o.o_orderstatus, o.o_clerk FROM geo.nation n
        JOIN ledger.customer c ON c.c_nationkey = n.n_nationkey
        JOIN ledger.orders o ON o.o_custkey = c.c_custkey
        WHERE n.n_name = 'GERMANY' ORDER BY o.o_orderkey";
    let reference = "SELECT o.o_orderkey, o.o_orderstatus, '***' AS o_clerk FROM crm.nation n
        JOIN crm.customer c ON c.c_nationkey = n.n_nationkey
        JOIN sales.orders o ON o.o_custkey = c.c_custkey
        WHERE n.n_name = 'GERMANY' AND o.o_orderstatus = 'F' ORDER BY o.o_orderkey";
    let got = rows(&mut alice, federated).await;
    assert_eq!(got, rows(&mut root, reference).await);
    assert!(
        got.lines().filter(|l| l.contains("***")).count() > 1,
        "{got}"
    );
    assert!(
        received(&pg, "\"meshgate_keyed\"").iter().any(|s| {
            let (keyed, keys) = s.split_once(" SELECT * FROM ").unwrap();
            keyed.contains("\"orders\" WHERE (\"o_orderstatus\" = 'F') OFFSET 0")
                && keys.contains(" IN (")
        }),
        "{:#?}",
        pg.statements()
    );

    // A sort with a limit above the join hands the statement its own
    // filter too, final only once every row is read: the statement goes
    // without it rather than wait for it.
    let federated = "SELECT c.c_custkey, c.c_acctbal FROM geo.nation n
        JOIN ledger.customer c ON c.c_nationkey = n.n_nationkey
        WHERE n.n_name = 'GERMANY' ORDER BY c.c_acctbal DESC, c.c_custkey LIMIT 3";
    let reference = federated.replace("geo.", "crm.").replace("ledger.", "crm.");
    let started = std::time::Instant::now();
    let got = rows(&mut carol, federated).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(got, rows(&mut root, &reference).await);
    assert_eq!(
        got.lines().filter(|l| l.starts_with("| ")).count(),
        4,
        "{got}"
    );

    // The other way round: SQLite is sent the keys of the people erin may
    // see (1 and 2), not those of the rows her row filter hides (3, 4).
    let mut erin = server
        .as_identity("erin", &["analyst"], &[("region", "EU")])
        .await;
    let federated = "SELECT p.id, n.n_name FROM ledger.people p
        JOIN geo.nation n ON n.n_nationkey = p.id ORDER BY p.id";
    let got = rows(&mut erin, federated).await;
    let reference = "SELECT n_nationkey AS id, n_name FROM crm.nation
        WHERE n_nationkey IN (1, 2) ORDER BY n_nationkey";
    assert_eq!(got, rows(&mut root, reference).await);
    let reads = remote_reads(&mut erin, federated).await;
    let (line, read) = reads
        .iter()
        .find(|(line, _)| line.contains("geo.local"))
        .unwrap_or_else(|| panic!("{reads:?}"));
    assert_eq!(*read, 2, "{line}");
    assert!(
        line.contains("join keys sent=[n_nationkey: 2 keys]"),
        "{line}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strings_sent_to_postgres_are_ordered_by_their_bytes_as_here() {
    let pg = ledger_postgres().await;
    // The column's own collation orders otherwise.
    let native: Vec<String> = pg
        .client()
        .await
        .query("SELECT word FROM tpch.words ORDER BY word", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(native, ["_x", "a", "B", "c"]);
    let server = federated_server(&pg).await;
    let mut client = server.login("alice").await;
    let words = |text: String| -> Vec<String> {
        text.lines()
            .skip(3)
            .filter(|l| l.starts_with("| "))
            .map(|l| l.trim_matches(|c| c == '|' || c == ' ').to_string())
            .collect()
    };
    for (sql, expected) in [
        (
            "SELECT word FROM ledger.words ORDER BY word",
            vec!["B", "_x", "a", "c"],
        ),
        (
            "SELECT word FROM ledger.words ORDER BY word DESC LIMIT 2",
            vec!["c", "a"],
        ),
        (
            "SELECT word FROM ledger.words WHERE word < 'a' ORDER BY word",
            vec!["B", "_x"],
        ),
        (
            "SELECT word FROM ledger.words WHERE word BETWEEN 'B' AND 'Z'",
            vec!["B"],
        ),
        ("SELECT min(word) FROM ledger.words", vec!["B"]),
        (
            "SELECT max(word) FROM ledger.words WHERE word <> 'c'",
            vec!["a"],
        ),
        // A uuid is read, and ordered, as its text.
        (
            "SELECT word FROM ledger.words ORDER BY id DESC LIMIT 3",
            vec!["c", "_x", "B"],
        ),
        (
            "SELECT max(id) FROM ledger.words WHERE id < '00000000-0000-0000-0000-00000000000c'",
            vec!["00000000-0000-0000-0000-00000000000b"],
        ),
    ] {
        assert_eq!(words(rows(&mut client, sql).await), expected, "{sql}");
    }
    // Sent to PostgreSQL, not done here.
    for sent in ["ORDER BY", "LIMIT 2", "min(", "< 'a'", "<= 'Z'"] {
        assert!(
            received(&pg, sent)
                .iter()
                .any(|s| s.contains("COLLATE \"C\"")),
            "{sent}: {:#?}",
            pg.statements()
        );
    }
    // An equality keeps the column's own collation, and its indexes.
    assert!(
        !received(&pg, r#"("words"."word" <> 'c')"#).is_empty(),
        "{:#?}",
        pg.statements()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_are_sent_fenced_and_caller_predicates_never_see_hidden_rows() {
    let pg = ledger_postgres().await;
    let server = federated_server(&pg).await;
    let mut eu = server
        .as_identity("erin", &["analyst"], &[("region", "EU")])
        .await;
    // Adding 1 - divisor to the largest BIGINT overflows on every hidden
    // (US) row, in PostgreSQL as here; 10 / divisor fails on them here.
    let overflows = "9223372036854775807 + (1 - divisor) > 0";
    let got = rows(
        &mut eu,
        &format!("SELECT name FROM ledger.people WHERE {overflows} ORDER BY name"),
    )
    .await;
    assert!(got.contains("Ann") && got.contains("Bob"), "{got}");
    assert!(!got.contains("Cid") && !got.contains("Dee"), "{got}");
    assert!(
        received(&pg, "9223372036854775807 + (1 - ")
            .iter()
            .any(|s| s.contains("OFFSET 0") && s.contains("'EU'")),
        "{:#?}",
        pg.statements()
    );
    let got = rows(
        &mut eu,
        "SELECT count(*) AS n, sum(10 / divisor) AS s FROM ledger.people",
    )
    .await;
    assert!(got.contains("| 2 | 15 |"), "{got}");
    // The row filter went to PostgreSQL inside a fenced subquery.
    let fenced = received(&pg, "OFFSET 0");
    assert!(
        fenced
            .iter()
            .any(|s| s.contains("'EU'") && s.contains("people")),
        "{:#?}",
        pg.statements()
    );
    // A leakproof filter of the caller runs below the barrier only, here as
    // a WHERE around the fenced subquery; a limit waits for it.
    let got = rows(
        &mut eu,
        "SELECT name FROM ledger.people WHERE name <> 'Bob' ORDER BY name",
    )
    .await;
    assert!(got.contains("Ann") && !got.contains("Bob"), "{got}");
    assert!(!got.contains("Cid") && !got.contains("Dee"), "{got}");
    // Whether PostgreSQL received a statement holding `text` with the EU
    // row filter inside its fence.
    let sent_fenced = |text: &str| {
        received(&pg, text)
            .iter()
            .any(|s| s.contains("OFFSET 0") && s.contains("'EU'"))
    };
    assert!(sent_fenced("'Bob'"), "{:#?}", pg.statements());
    let got = rows(
        &mut eu,
        "SELECT name FROM ledger.people WHERE name <> 'Ann' LIMIT 1",
    )
    .await;
    assert!(got.contains("Bob") && !got.contains("Ann"), "{got}");
    // Inside a scalar subquery, sent to PostgreSQL as a statement of its
    // own, the policy holds too: the largest id is that of the caller's
    // rows (Bob's), not Dee's.
    let got = rows(
        &mut eu,
        "SELECT name FROM ledger.people WHERE id = (SELECT max(id) FROM ledger.people)",
    )
    .await;
    assert!(got.contains("Bob") && !got.contains("Dee"), "{got}");
    assert!(sent_fenced("max("), "{:#?}", pg.statements());
    // The caller does not see the policy in EXPLAIN.
    let explain = rows(&mut eu, "EXPLAIN SELECT name FROM ledger.people").await;
    assert!(
        explain.contains("RemoteExec") && !explain.contains("'EU'"),
        "{explain}"
    );
    // A US analyst sees the US rows, whose divisor is 0: the errors are
    // theirs, in PostgreSQL and here.
    let mut us = server
        .as_identity("uma", &["analyst"], &[("region", "US")])
        .await;
    let status = us
        .query(&format!("SELECT name FROM ledger.people WHERE {overflows}"))
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, "bigint out of range");
    let status = us
        .query("SELECT name FROM ledger.people WHERE 10 / divisor > 1")
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, "Divide by zero");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_fails_fails_only_its_queries_and_recovers() {
    let pg = ledger_postgres().await;
    let server = federated_server(&pg).await;
    let mut carol = server.login("carol").await;
    let count = "SELECT count(*) AS n FROM ledger.orders";
    let before = rows(&mut carol, count).await;

    // Stopped before the query.
    pg.stop();
    let status = carol.query(count).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("ledger.orders") && status.message().contains("ledger.pg"),
        "{status:?}"
    );
    // Other domains answer on the same connection.
    let other = rows(&mut carol, "SELECT count(*) AS n FROM crm.customer").await;
    assert!(other.contains("1500"), "{other}");
    let sqlite = rows(&mut carol, "SELECT count(*) AS n FROM geo.nation").await;
    assert!(sqlite.contains("25"), "{sqlite}");

    // Back again: the gateway reconnects.
    pg.start_again();
    assert_eq!(rows(&mut carol, count).await, before);

    // Stopped during a query: a long self-join is cut off, and nothing hangs.
    let mut slow = server.login("carol").await;
    let running = tokio::spawn(async move {
        slow.query(
            "SELECT count(*) FROM ledger.orders a JOIN ledger.orders b ON a.o_custkey <> b.o_custkey",
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    pg.stop();
    let result = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the query ends when its source goes away")
        .unwrap();
    let status = result.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    pg.start_again();
    assert_eq!(rows(&mut carol, count).await, before);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_unreachable_hosts_are_named() {
    let pg = ledger_postgres().await;
    // A refused login withdraws the products, saying why.
    let wrong = pg.url().replace(crate::pg::PASSWORD, "not-the-password");
    let dir = crate::fixture::demo_config_dir();
    std::fs::write(
        dir.path().join("domains/ledger.toml"),
        ledger_domain(&wrong),
    )
    .unwrap();
    let config = meshgate::config::MeshConfig::load(&dir.path().join("meshgate.toml")).unwrap();
    let gateway = meshgate::server::Gateway::open(config).await.unwrap();
    let problems: Vec<String> = gateway.problems.iter().map(|p| p.to_string()).collect();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("ledger.orders") && p.contains("password authentication failed")),
        "{problems:#?}"
    );

    // An unreachable host: a product with declared columns is published and
    // its queries fail quickly, naming it; the rest of the mesh answers.
    let nobody = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://meshgate:x@127.0.0.1:{nobody}/postgres");
    let server = TestServer::start_with(move |dir| {
        let domain = ledger_domain(&url).replace(
            "[[products]]\nname = \"customer\"",
            "[[products]]\nname = \"customer_unused\"\ncolumns = [{ name = \"c_custkey\", type = \"Int64\" }]",
        ).replace(
            "[[products]]\nname = \"people\"",
            "[[products]]\nname = \"people_unused\"\ncolumns = [{ name = \"id\", type = \"Int64\" }]",
        ).replace("product = \"people\"", "product = \"people_unused\"")
         .replace("row_filter = \"region = user_attr('region')\"", "row_filter = \"id > 0\"");
        std::fs::write(dir.join("domains/ledger.toml"), domain).unwrap();
    })
    .await;
    let mut carol = server.login("carol").await;
    let started = std::time::Instant::now();
    let status = carol
        .query("SELECT count(*) FROM ledger.orders")
        .await
        .unwrap_err();
    assert_status(&status, Code::Unavailable, "ledger.orders");
    assert!(started.elapsed() < Duration::from_secs(10));
    let other = rows(&mut carol, "SELECT count(*) AS n FROM crm.customer").await;
    assert!(other.contains("1500"), "{other}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_central_gateway_forwards_the_callers_token_to_the_domain_gateway() {
    // The crm domain's own gateway, with its policies (alice: EUROPE only).
    let domain = TestServer::start().await;
    let address = domain.addr;
    let central = TestServer::start_with(move |dir| {
        let remote = remote_crm_domain(&format!("url = \"grpc://{address}\""));
        std::fs::write(dir.join("domains/remote.toml"), remote).unwrap();
    })
    .await;

    let mut alice_central = central.login("alice").await;
    let regions = rows(
        &mut alice_central,
        "SELECT DISTINCT c_region FROM remote.customer",
    )
    .await;
    assert!(regions.contains("EUROPE"), "{regions}");
    assert_eq!(regions.lines().count(), 5, "one region only: {regions}");

    let count = "SELECT count(*) AS n FROM remote.customer";
    let mut alice_domain = domain.login("alice").await;
    assert_eq!(
        rows(&mut alice_central, count).await,
        rows(&mut alice_domain, "SELECT count(*) AS n FROM crm.customer").await
    );
    let mut carol_central = central.login("carol").await;
    let all = rows(&mut carol_central, count).await;
    assert!(all.contains("1500"), "{all}");
    // An order sent to the remote is the order the rows arrive in.
    let mut carol_domain = domain.login("carol").await;
    for sql in [
        "SELECT c_custkey FROM {} ORDER BY c_name DESC",
        "SELECT c_custkey FROM {} ORDER BY c_name DESC LIMIT 3",
    ] {
        assert_eq!(
            rows(&mut carol_central, &sql.replace("{}", "remote.customer")).await,
            rows(&mut carol_domain, &sql.replace("{}", "crm.customer")).await,
            "{sql}"
        );
    }

    // An overflow in the remote's query is the caller's failure.
    let status = carol_central
        .query("SELECT c_custkey * 9223372036854775807 AS k FROM remote.customer")
        .await
        .unwrap_err();
    assert_status(
        &status,
        Code::InvalidArgument,
        "(flight_sql)): InvalidArgument: query failed: Arithmetic overflow",
    );

    // The domain gateway gone: its products fail, the rest answers.
    domain.stop().await;
    let status = carol_central.query(count).await.unwrap_err();
    assert_status(&status, Code::Unavailable, "remote.customer");
    let local = rows(&mut carol_central, "SELECT count(*) AS n FROM crm.customer").await;
    assert!(local.contains("1500"), "{local}");
    central.stop().await;
}

/// Appends a `[[products]]` table to `domain` for each (name, storage,
/// table).
fn push_products(domain: &mut String, products: &[(&str, &str, &str)]) {
    for (name, storage, table) in products {
        domain.push_str(&format!(
            "\n[[products]]\nname = \"{name}\"\nstorage = \"{storage}\"\ntable = \"{table}\"\n"
        ));
    }
}

/// Domain `lab`: one SQLite table and one PostgreSQL table, each published
/// twice, through a storage that pushes work down and through one that
/// does not (`w` / `w_here`, `p` / `p_here`).
fn lab_domain(url: &str) -> String {
    let mut domain = format!(
        r#"
name = "lab"
owner = "lab@acme.example"
description = "The same tables read with pushdown and without"

[storage.lite]
type = "sqlite"
path = "../lab.sqlite"

[storage.lite_here]
type = "sqlite"
path = "../lab.sqlite"
pushdown = false

[storage.pg]
type = "postgres"
url = "{url}"

[storage.pg_here]
type = "postgres"
url = "{url}"
pushdown = false
"#
    );
    push_products(
        &mut domain,
        &[
            ("w", "lite", "w"),
            ("w_here", "lite_here", "w"),
            ("guarded", "lite", "w"),
            ("p", "pg", "lab.w"),
            ("p_here", "pg_here", "lab.w"),
            ("pgw", "pg", "lab.pgw"),
        ],
    );
    domain.push_str("\n[[policies]]\nproduct = \"guarded\"\nrow_filter = \"padded = 'a'\"\n");
    domain.push_str("\n[[policies]]\nproduct = \"pgw\"\nrow_filter = \"n > 0\"\n");
    domain
}

/// The query's answer as meshgate computes it with pushdown (`{t}` the
/// pushed product) and without: the same rows in the same order, or the
/// same kind of failure.
async fn assert_alike(client: &mut TestClient, sql: &str, pushed: &str, here: &str) {
    let with = client.query(&sql.replace("{t}", pushed)).await;
    let without = client.query(&sql.replace("{t}", here)).await;
    match (with, without) {
        (Ok(with), Ok(without)) => {
            assert_eq!(pretty(&with), pretty(&without), "{sql} on {pushed}")
        }
        (Err(with), Err(without)) => {
            assert_eq!(
                with.code(),
                without.code(),
                "{sql} on {pushed}: {with:?} / {without:?}"
            )
        }
        (with, without) => panic!("{sql} on {pushed}: {with:?} / {without:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_answer_what_meshgate_would_answer_itself() {
    // SQLite compares text with each column's collation; PostgreSQL's
    // functions and operators differ from DataFusion's at the edges.
    let pg = Postgres::start();
    pg.execute(
        "CREATE SCHEMA lab;
         CREATE TABLE lab.w (id bigint, name text, c text COLLATE \"C\", plain text,
                             x double precision, n bigint, ts timestamptz,
                             code char(3), doc jsonb, amount numeric(10, 2));
         INSERT INTO lab.w VALUES
           (1, 'alice', 'ǅ', 'Ärger', 5.5, 7, '2024-03-01 22:30:00+00', 'a', '{\"a\":1}', 1.25),
           (2, 'Alice', 'ß', 'ärger', 2.5, -7, '2024-03-02 01:00:00+00', 'bc', '[1, 2]', -2.50),
           (3, 'ALICE', 'İx', 'straße', -5.5, 0, '2024-03-02 20:00:00+00', 'xyz', NULL, 0),
           (4, 'bob', 'x', 'Zebra', 1.0, 3, NULL, NULL, '{\"b\": [true]}', NULL),
           (5, 'Bob', NULL, 'apple', NULL, NULL, NULL, 'a  ', '2', 3.33);
         CREATE VIEW lab.pgw AS SELECT * FROM lab.w;
         ALTER DATABASE postgres SET timezone = 'Asia/Kolkata';",
    )
    .await;
    let url = pg.url();
    let server = TestServer::start_with(move |dir| {
        std::fs::write(dir.join("domains/lab.toml"), lab_domain(&url)).unwrap();
        let db = rusqlite::Connection::open(dir.join("lab.sqlite")).unwrap();
        db.execute_batch(
            "CREATE TABLE w (id INTEGER, name TEXT COLLATE NOCASE, padded TEXT COLLATE RTRIM,
                             plain TEXT, x REAL, n INTEGER);
             CREATE INDEX w_name ON w (name);
             INSERT INTO w VALUES
               (1, 'alice', 'a', 'Ärger', 5.5, 7),
               (2, 'Alice', 'a  ', 'ärger', 2.5, -7),
               (3, 'ALICE', 'b', 'straße', -5.5, 0),
               (4, 'bob', 'a ', 'Zebra', 1.0, 3),
               (5, 'Bob', 'c', 'apple', NULL, NULL);",
        )
        .unwrap();
    })
    .await;
    let mut carol = server.login("carol").await;

    for sql in [
        "SELECT id FROM {t} WHERE name = 'alice' ORDER BY id",
        "SELECT id FROM {t} WHERE name <> 'alice' ORDER BY id",
        "SELECT id FROM {t} WHERE name IN ('alice', 'bob') ORDER BY id",
        "SELECT id FROM {t} WHERE name < 'B' ORDER BY id",
        "SELECT id FROM {t} WHERE name BETWEEN 'a' AND 'b' ORDER BY id",
        "SELECT id FROM {t} WHERE padded = 'a' ORDER BY id",
        "SELECT count(DISTINCT name) AS k FROM {t}",
        "SELECT name, count(*) AS k FROM {t} GROUP BY name ORDER BY name",
        "SELECT DISTINCT padded FROM {t} ORDER BY padded",
        "SELECT min(name) AS lo, max(name) AS hi FROM {t}",
        "SELECT id FROM {t} ORDER BY name, id",
        "SELECT id FROM {t} ORDER BY name DESC LIMIT 2",
        "SELECT a.id AS a, b.id AS b FROM {t} a JOIN {t} b ON a.name = b.name ORDER BY a, b",
        "SELECT id, upper(plain) AS u, lower(plain) AS l FROM {t} ORDER BY id",
        "SELECT id, x % 2 AS m FROM {t} ORDER BY id",
        "SELECT id, n / 0 AS q FROM {t} ORDER BY id",
        "SELECT id FROM {t} WHERE x / 2 > 1 ORDER BY id",
        "SELECT id, CAST(x AS BIGINT) AS i FROM {t} ORDER BY id",
        "SELECT id, n * 9223372036854775807 AS big FROM {t} ORDER BY id",
        "SELECT id FROM {t} WHERE 9223372036854775807 + n > 0 ORDER BY id",
        "SELECT id FROM {t} WHERE -n > 0 ORDER BY id",
    ] {
        assert_alike(&mut carol, sql, "lab.w", "lab.w_here").await;
    }
    // Statements the unparser writes with names out of scope run here.
    for sql in [
        "SELECT id, name FROM {t} ORDER BY id LIMIT 2 OFFSET 1",
        "SELECT id FROM {t} ORDER BY id OFFSET 3",
        "SELECT count(*) AS k FROM (SELECT DISTINCT name FROM {t}) s",
        "SELECT a.id, count(b.id) AS k FROM {t} a LEFT JOIN {t} b ON a.n < b.n GROUP BY a.id ORDER BY a.id",
        "SELECT id FROM {t} a WHERE n >= (SELECT avg(n) FROM {t} b WHERE b.name = a.name) ORDER BY id",
        "SELECT id, length(plain) AS l, character_length(plain) AS cl FROM {t} ORDER BY id",
        // An aggregate sent alone, under a window: its columns in its order.
        "SELECT g, sum(sum(n) + 1) OVER (ORDER BY g) AS s FROM (SELECT id % 2 AS g, n FROM {t}) q GROUP BY g ORDER BY g",
        "SELECT id, sum(n + 1) OVER (PARTITION BY id % 2 ORDER BY id) AS s FROM {t} ORDER BY id",
        // Aggregates and windows in a derived table, read by their names.
        "SELECT count(*) AS c, max(id) AS m FROM {t} GROUP BY n HAVING count(*) > 0 ORDER BY c, m",
        "SELECT id FROM (SELECT id, sum(n) OVER () AS s FROM {t}) q WHERE s > 0 ORDER BY id",
    ] {
        assert_alike(&mut carol, sql, "lab.w", "lab.w_here").await;
        assert_alike(&mut carol, sql, "lab.p", "lab.p_here").await;
    }
    // The collation is the query's, and the filter still went to SQLite.
    let plan = rows(
        &mut carol,
        "EXPLAIN SELECT id FROM lab.w WHERE name = 'alice'",
    )
    .await;
    assert!(
        plan.contains("COLLATE BINARY") && plan.contains("WHERE"),
        "{plan}"
    );
    // A row filter sent to SQLite hides what it hides here: `padded = 'a'`
    // keeps `'a'`, not the `'a  '` and `'a '` of `COLLATE RTRIM`.
    for (sql, expected) in [
        ("SELECT id FROM lab.guarded ORDER BY id", "| 1  |"),
        (
            "SELECT count(*) AS k FROM lab.guarded WHERE name = 'alice'",
            "| 1 |",
        ),
    ] {
        let got = rows(&mut carol, sql).await;
        assert_eq!(got.lines().count(), 5, "{sql}: {got}");
        assert!(got.contains(expected), "{sql}: {got}");
    }

    for sql in [
        "SELECT id, upper(plain) AS u, lower(plain) AS l, upper(c) AS uc FROM {t} ORDER BY id",
        "SELECT id, x % 2 AS m FROM {t} ORDER BY id",
        "SELECT id, x / 0 AS q FROM {t} ORDER BY id",
        "SELECT id, CAST(x AS BIGINT) AS i FROM {t} ORDER BY id",
        "SELECT id, regexp_replace(name, 'a|al', 'X') AS r FROM {t} ORDER BY id",
        "SELECT id, date_trunc('day', ts) AS d FROM {t} ORDER BY id",
        "SELECT id, n * 9223372036854775807 AS big FROM {t} ORDER BY id",
        "SELECT id FROM {t} WHERE c < 'b' ORDER BY name DESC",
        "SELECT id, code, length(code) AS l FROM {t} ORDER BY id",
        "SELECT id FROM {t} WHERE code = 'a' ORDER BY id",
        "SELECT id FROM {t} WHERE code IN ('a  ', 'bc') ORDER BY id",
        "SELECT id FROM {t} WHERE doc = '{\"a\": 1}' ORDER BY id",
        "SELECT id FROM {t} WHERE doc = '{\"a\":1}' ORDER BY id",
        "SELECT id, doc FROM {t} WHERE doc <> '2' ORDER BY doc",
        "SELECT id, sqrt(x) AS s FROM {t} WHERE x >= 0 ORDER BY id",
        "SELECT id, ln(x) AS l FROM {t} ORDER BY id",
        "SELECT avg(amount) AS a FROM {t} WHERE id IN (1, 2, 3)",
        "SELECT id % 2 AS g, avg(amount) AS a, sum(amount) AS s FROM {t} GROUP BY id % 2 ORDER BY g",
    ] {
        assert_alike(&mut carol, sql, "lab.p", "lab.p_here").await;
    }
    // A product named as the table it reads, under a policy and with a
    // column read as text: the SQL sent reads the table inside the fence.
    let got = rows(&mut carol, "SELECT id, code FROM lab.pgw ORDER BY id").await;
    assert!(
        got.contains("| 1  | a    |") && got.contains("| 4  |      |") && got.lines().count() == 6,
        "{got}"
    );
    // A square root PostgreSQL computes as meshgate does is sent.
    assert!(!received(&pg, "sqrt(").is_empty(), "{:#?}", pg.statements());
    // PostgreSQL truncated the timestamps itself, in UTC.
    assert!(
        !received(&pg, "date_trunc('day'").is_empty(),
        "{:#?}",
        pg.statements()
    );
    // An overflow in PostgreSQL is the query's failure, not the source's.
    let status = carol
        .query("SELECT n * 9223372036854775807 AS big FROM lab.p")
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, "out of range");
    server.stop().await;
}

/// The shape of DESIGN.md's `crm.customers`: the product declares some
/// columns, its row filter and a mask read others.
const STAFF_PRODUCT: &str = r#"
[[products]]
name = "staff"
storage = "pg"
table = "tpch.people"
columns = [{ name = "id", type = "Int64" }, { name = "name", type = "Utf8" }]

[[policies]]
product = "staff"
row_filter = "region = user_attr('region') OR has_group('hr_admin')"
columns.name = { mask = "CASE WHEN divisor > 1 THEN '***' ELSE name END" }

[[products]]
name = "staff_by_region"
sql = "SELECT region, count(*) AS n FROM ledger.staff GROUP BY region"

[[products]]
name = "all_staff"
sql = "SELECT * FROM ledger.staff"
"#;

/// Another domain's view of the unpublished column.
const STAFF_ELSEWHERE: &str = r#"
name = "outside"
owner = "x@acme.example"
description = "Reads what ledger does not publish"

[[products]]
name = "regions"
sql = "SELECT DISTINCT region FROM ledger.staff"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_read_columns_the_product_does_not_publish() {
    let pg = ledger_postgres().await;
    let url = pg.url();
    let server = TestServer::start_with(move |dir| {
        let domain = ledger_domain(&url) + STAFF_PRODUCT;
        std::fs::write(dir.join("domains/ledger.toml"), domain).unwrap();
    })
    .await;
    let mut eu = server
        .as_identity("erin", &["analyst"], &[("region", "EU")])
        .await;
    let got = rows(&mut eu, "SELECT * FROM ledger.staff ORDER BY id").await;
    assert_eq!(
        got.trim(),
        "+----+------+\n| id | name |\n+----+------+\n| 1  | Ann  |\n| 2  | ***  |\n+----+------+"
    );
    assert!(
        received(&pg, "tpch")
            .iter()
            .any(|s| s.contains("region") && s.contains("'EU'")),
        "the row filter runs in PostgreSQL: {:#?}",
        pg.statements()
    );
    // The columns the policies read do not exist for any caller, not even
    // one the row filter lets see every row.
    let mut admin = server.as_identity("hana", &["hr_admin"], &[]).await;
    assert_eq!(
        crate::fixture::row_count(&admin.query("SELECT id FROM ledger.staff").await.unwrap()),
        4
    );
    for column in ["region", "divisor"] {
        for client in [&mut eu, &mut admin] {
            let status = client
                .query(&format!("SELECT {column} FROM ledger.staff"))
                .await
                .unwrap_err();
            let never = client
                .query("SELECT never_was FROM ledger.staff")
                .await
                .unwrap_err();
            assert_eq!(status.code(), never.code());
            assert_eq!(
                status.message().replace(column, "never_was"),
                never.message(),
                "{column}"
            );
        }
    }
    let schema = crate::policies::table_schema(&mut eu, "ledger", "staff").await;
    assert_eq!(crate::policies::field_names(&schema), ["id", "name"]);
    // A view of the same domain builds on the unpublished column, under
    // the caller's row filter; `*` is what the product publishes.
    let sql = "SELECT * FROM ledger.staff_by_region ORDER BY region";
    let got = rows(&mut eu, sql).await;
    assert!(
        got.contains("| EU     | 2 |") && !got.contains("US"),
        "{got}"
    );
    let got = rows(&mut admin, sql).await;
    assert!(
        got.contains("| EU     | 2 |") && got.contains("| US     | 2 |"),
        "{got}"
    );
    let schema = crate::policies::table_schema(&mut eu, "ledger", "all_staff").await;
    assert_eq!(crate::policies::field_names(&schema), ["id", "name"]);
    server.stop().await;

    // Another domain's view does not see it, and is not published.
    let dir = crate::fixture::demo_config_dir();
    let domain = ledger_domain(&pg.url()) + STAFF_PRODUCT;
    std::fs::write(dir.path().join("domains/ledger.toml"), domain).unwrap();
    std::fs::write(dir.path().join("domains/outside.toml"), STAFF_ELSEWHERE).unwrap();
    let config = meshgate::config::MeshConfig::load(&dir.path().join("meshgate.toml")).unwrap();
    let gateway = meshgate::server::Gateway::open(config).await.unwrap();
    let problems: Vec<String> = gateway.problems.iter().map(ToString::to_string).collect();
    assert!(
        matches!(problems.as_slice(), [p] if p.starts_with("outside.regions") && p.contains("No field named region")),
        "{problems:?}"
    );
}

/// Domain `depot`: SQLite tables of 20 000 rows each, `parts` and `stock`
/// without indexes, `keyed_parts` with its key as the rowid, `guarded`
/// the same under a row filter, and `parts_here` and `stock_here` read
/// without pushdown.
/// Domain `name` over the SQLite file `file` (beside the domains'
/// directory), read through a storage that pushes work down (`lite`) and
/// through one that does not (`lite_here`), with `products`.
fn sqlite_domain(name: &str, file: &str, products: &[(&str, &str, &str)]) -> String {
    let mut domain = format!(
        r#"
name = "{name}"
owner = "{name}@acme.example"

[storage.lite]
type = "sqlite"
path = "../{file}"

[storage.lite_here]
type = "sqlite"
path = "../{file}"
pushdown = false
"#
    );
    push_products(&mut domain, products);
    domain
}

fn depot_domain() -> String {
    let mut domain = sqlite_domain(
        "depot",
        "depot.sqlite",
        &[
            ("parts", "lite", "parts"),
            ("keyed_parts", "lite", "keyed_parts"),
            ("guarded", "lite", "keyed_parts"),
            ("stock", "lite", "stock"),
            ("parts_here", "lite_here", "parts"),
            ("stock_here", "lite_here", "stock"),
        ],
    );
    domain.push_str("\n[[policies]]\nproduct = \"guarded\"\nrow_filter = \"p_id > 100\"\n");
    domain
}

fn write_depot(path: &Path) {
    rusqlite::Connection::open(path)
        .unwrap()
        .execute_batch(
            "CREATE TABLE parts (p_id INTEGER, p_name TEXT);
             CREATE TABLE keyed_parts (p_id INTEGER PRIMARY KEY, p_name TEXT);
             CREATE TABLE stock (s_part INTEGER, qty INTEGER);
             INSERT INTO parts WITH RECURSIVE n(i) AS
               (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000)
               SELECT i, 'part ' || i FROM n;
             INSERT INTO keyed_parts SELECT * FROM parts;
             -- Every part's stock but the last hundred's, and stock of
             -- parts that do not exist.
             INSERT INTO stock SELECT p_id + 100, p_id % 50 FROM parts;",
        )
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_is_sent_the_joins_an_index_serves() {
    let server = TestServer::start_with(|dir| {
        std::fs::write(dir.join("domains/depot.toml"), depot_domain()).unwrap();
        write_depot(&dir.join("depot.sqlite"));
    })
    .await;
    let mut carol = server.login("carol").await;
    let mut root = server.unrestricted().await;

    // (query, whether SQLite runs its join): each answers as the same
    // query joined here, from tables read without pushdown.
    let cases = [
        // Neither key indexed: SQLite would index one side for the query.
        (
            "SELECT count(*) AS n, sum(s.qty) AS q FROM depot.stock s
             JOIN depot.parts p ON p.p_id = s.s_part WHERE p.p_name IN ('part 150', 'part 1500', 'part 15000')",
            false,
        ),
        // The parts found by their rowid, either way round.
        (
            "SELECT count(*) AS n, sum(s.qty) AS q FROM depot.stock s
             JOIN depot.keyed_parts p ON p.p_id = s.s_part WHERE p.p_name IN ('part 150', 'part 1500', 'part 15000')",
            true,
        ),
        (
            "SELECT count(*) AS n, sum(s.qty) AS q FROM depot.keyed_parts p
             JOIN depot.stock s ON s.s_part = p.p_id WHERE s.qty = 7",
            true,
        ),
        // An outer join looks up its right side.
        (
            "SELECT count(*) AS n, count(p.p_name) AS named FROM depot.stock s
             LEFT JOIN depot.keyed_parts p ON p.p_id = s.s_part",
            true,
        ),
        (
            "SELECT count(*) AS n, count(s.qty) AS stocked FROM depot.keyed_parts p
             LEFT JOIN depot.stock s ON s.s_part = p.p_id",
            false,
        ),
        // A row filter's fence is read whole, without the table's index.
        (
            "SELECT count(*) AS n, sum(s.qty) AS q FROM depot.stock s
             JOIN depot.guarded p ON p.p_id = s.s_part",
            false,
        ),
        // Small sides: any plan is cheap.
        (
            "SELECT count(*) AS n FROM depot.stock s JOIN depot.parts p ON p.p_id = s.s_part
             WHERE s.qty = 7 AND p.p_id < 5000",
            true,
        ),
    ];
    for (sql, joined_there) in cases {
        let here = sql
            .replace(
                "depot.guarded p",
                "(SELECT * FROM depot.parts_here WHERE p_id > 100) p",
            )
            .replace("depot.keyed_parts", "depot.parts_here")
            .replace("depot.parts ", "depot.parts_here ")
            .replace("depot.stock", "depot.stock_here");
        let got = rows(&mut carol, sql).await;
        assert_eq!(got, rows(&mut root, &here).await, "{sql}");
        let reads = remote_reads(&mut carol, sql).await;
        let statements = reads
            .iter()
            .filter(|(line, _)| line.contains("depot.lite"))
            .count();
        if joined_there {
            assert_eq!(statements, 1, "{sql}: {reads:#?}");
            assert!(reads[0].0.contains(" JOIN "), "{sql}: {reads:#?}");
        } else {
            assert_eq!(statements, 2, "{sql}: {reads:#?}");
        }
    }
    server.stop().await;
}

/// Domain `yard`: SQLite tables of 250 000 rows, each published through a
/// storage that pushes work down and through one that does not.
fn yard_domain() -> String {
    let mut domain = sqlite_domain(
        "yard",
        "yard.sqlite",
        &[
            ("readings", "lite", "readings"),
            ("events", "lite", "events"),
            ("shadowed", "lite", "shadowed"),
            ("recent", "lite", "recent"),
            ("guarded", "lite", "readings"),
            ("masked", "lite", "readings"),
            ("readings_here", "lite_here", "readings"),
            ("events_here", "lite_here", "events"),
            ("shadowed_here", "lite_here", "shadowed"),
            ("recent_here", "lite_here", "recent"),
        ],
    );
    domain.push_str(
        r#"
[[policies]]
product = "guarded"
row_filter = "val % 3 = 0"

[[policies]]
product = "masked"
columns.note = { mask = "upper(note)" }
"#,
    );
    domain
}

fn write_yard(path: &Path) {
    rusqlite::Connection::open(path)
        .unwrap()
        .execute_batch(
            "CREATE TABLE readings (kind INTEGER, val INTEGER, note TEXT);
             CREATE INDEX readings_kind ON readings (kind);
             CREATE TABLE events (e_id INTEGER PRIMARY KEY, val INTEGER);
             -- A column that takes the rowid's first name.
             CREATE TABLE shadowed (rowid INTEGER, val INTEGER);
             CREATE TABLE recent (val INTEGER);
             INSERT INTO readings WITH RECURSIVE n(i) AS
               (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 250000)
               SELECT i % 1000, i, 'reading ' || i FROM n;
             -- Rowids with gaps and past the largest's share.
             INSERT INTO events SELECT val * 3, val FROM readings;
             INSERT INTO shadowed SELECT 1, val FROM readings;
             INSERT INTO recent SELECT val FROM readings WHERE val <= 150000;",
        )
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_sqlite_tables_are_read_in_parts_at_once() {
    let server = TestServer::start_with(|dir| {
        std::fs::write(dir.join("domains/yard.toml"), yard_domain()).unwrap();
        write_yard(&dir.join("yard.sqlite"));
    })
    .await;
    // An administrator, who sees the reads below policies too.
    let mut ops = server.as_identity("ops", &["platform"], &[]).await;
    let mut root = server.unrestricted().await;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    // (query, whether it is read in parts): each answers the rows of the
    // same query read whole, without pushdown.
    let cases = [
        // Read and filtered whole: the parts.
        (
            "SELECT val, note FROM yard.readings WHERE val % 997 = 5",
            true,
        ),
        (
            "SELECT e_id, val FROM yard.events WHERE val % 997 = 5",
            true,
        ),
        // The rowid's own column, narrowed by its range.
        ("SELECT e_id FROM yard.events WHERE e_id > 700000", true),
        ("SELECT val FROM yard.shadowed WHERE val % 997 = 5", true),
        // Masks computed in each part.
        (
            "SELECT val, note FROM yard.masked WHERE val % 997 = 5",
            true,
        ),
        // Under a row filter: read whole, as the number of parts would
        // tell how large the table is.
        ("SELECT val FROM yard.guarded WHERE val % 997 = 5", false),
        // An index narrows the rows read: read whole.
        (
            "SELECT val FROM yard.readings WHERE kind BETWEEN 3 AND 4",
            false,
        ),
        // Join keys may be sent on an indexed column: read whole.
        (
            "SELECT kind, val FROM yard.readings WHERE val % 997 = 5",
            false,
        ),
        // The source aggregates, sorts or limits: one statement.
        (
            "SELECT val % 13 AS k, count(*) AS n FROM yard.events GROUP BY 1",
            false,
        ),
        (
            "SELECT val FROM yard.events WHERE val % 997 = 5 ORDER BY val",
            false,
        ),
        // Fewer rows than two parts' worth.
        ("SELECT val FROM yard.recent WHERE val % 997 = 5", false),
    ];
    for (sql, in_parts) in cases {
        let here = sql
            .replace("yard.readings", "yard.readings_here")
            .replace("yard.events", "yard.events_here")
            .replace("yard.shadowed", "yard.shadowed_here")
            .replace("yard.recent", "yard.recent_here")
            .replace(
                "yard.guarded",
                "(SELECT * FROM yard.readings_here WHERE val % 3 = 0)",
            )
            .replace(
                "yard.masked",
                "(SELECT kind, val, upper(note) AS note FROM yard.readings_here)",
            );
        let sorted = |text: String| {
            let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
            lines.sort();
            lines
        };
        let got = sorted(rows(&mut ops, sql).await);
        assert!(got.len() > 10, "{sql}: {got:?}");
        assert_eq!(got, sorted(rows(&mut root, &here).await), "{sql}");
        let reads = remote_reads(&mut ops, sql).await;
        let parted: Vec<&str> = reads
            .iter()
            .map(|(line, _)| line.as_str())
            .filter(|line| line.contains("read in 2 parts by rowid"))
            .collect();
        let expected = usize::from(in_parts && cores >= 2);
        assert_eq!(parted.len(), expected, "{sql}: {reads:#?}");
        // The statements sent, each a range of the rowids: the first one
        // open below, the last open above.
        if let [line] = parted.as_slice() {
            let rowid = if sql.contains("shadowed") {
                "_rowid_"
            } else {
                "rowid"
            };
            let sent = line.split(", sent=").nth(1).unwrap();
            assert_eq!(sent.matches(&format!("{rowid} <= ")).count(), 1, "{line}");
            assert_eq!(sent.matches(&format!("{rowid} > ")).count(), 1, "{line}");
        }
    }
    server.stop().await;
}
