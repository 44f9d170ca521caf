//! Queries over the mesh: names (DESIGN §1), formats, joins across domains.

use datafusion::prelude::{CsvReadOptions, JsonReadOptions, ParquetReadOptions, SessionContext};
use tonic::Code;

use crate::fixture::{TestServer, assert_status, demo_data, pretty, row_count};

/// The same question asked of the files directly, with DataFusion alone.
async fn direct(sql: &str) -> String {
    let data = demo_data().join("data");
    let context = SessionContext::new();
    let path = |p: &str| data.join(p).to_string_lossy().to_string();
    context
        .register_parquet(
            "orders",
            path("sales/orders/"),
            ParquetReadOptions::default(),
        )
        .await
        .unwrap();
    context
        .register_parquet(
            "customer",
            path("crm/customer.parquet"),
            ParquetReadOptions::default(),
        )
        .await
        .unwrap();
    context
        .register_csv("nation", path("crm/nation.csv"), CsvReadOptions::default())
        .await
        .unwrap();
    context
        .register_json(
            "supplier",
            path("supply/supplier.json"),
            JsonReadOptions::default(),
        )
        .await
        .unwrap();
    let batches = context.sql(sql).await.unwrap().collect().await.unwrap();
    pretty(&batches)
}

#[tokio::test]
async fn a_join_across_three_domains_and_three_formats_matches_the_files() {
    let server = TestServer::start().await;
    let mut client = server.unrestricted().await;
    // Parquet (a directory and a file), CSV and newline-delimited JSON.
    let through_gateway = "SELECT n.n_name, count(*) AS orders, sum(o.o_totalprice) AS revenue \
        FROM sales.orders o \
        JOIN crm.customer c ON o.o_custkey = c.c_custkey \
        JOIN crm.nation n ON c.c_nationkey = n.n_nationkey \
        WHERE n.n_nationkey IN (SELECT s_nationkey FROM supply.supplier WHERE s_acctbal > 0) \
        GROUP BY n.n_name ORDER BY orders DESC, n.n_name";
    let rows = client.query(through_gateway).await.unwrap();
    assert!(row_count(&rows) > 5);
    let expected = direct(
        &through_gateway
            .replace("sales.orders", "orders")
            .replace("crm.customer", "customer")
            .replace("crm.nation", "nation")
            .replace("supply.supplier", "supplier"),
    )
    .await;
    assert_eq!(pretty(&rows), expected);
    server.stop().await;
}

#[tokio::test]
async fn arrow_ipc_and_view_products_are_readable() {
    let server = TestServer::start().await;
    let mut client = server.unrestricted().await;
    let rows = client
        .query("SELECT count(*) AS n, count(DISTINCT ps_suppkey) AS suppliers FROM supply.partsupp")
        .await
        .unwrap();
    // TPC-H: 4 suppliers per part, 200 000 parts per scale factor.
    let parts = (200_000.0 * crate::fixture::SCALE) as i64;
    assert_eq!(
        pretty(&rows),
        format!(
            "+------+-----------+\n| n    | suppliers |\n+------+-----------+\n| {} | {}       |\n+------+-----------+",
            parts * 4,
            (10_000.0 * crate::fixture::SCALE) as i64
        )
    );
    let view = client
        .query("SELECT sum(orders) AS orders FROM sales.revenue_by_nation")
        .await
        .unwrap();
    let orders = client
        .query("SELECT count(*) AS orders FROM sales.orders")
        .await
        .unwrap();
    assert_eq!(pretty(&view), pretty(&orders));
    server.stop().await;
}

#[tokio::test]
async fn product_names_follow_sql_identifier_rules() {
    let server = TestServer::start().await;
    let mut client = server.login("alice").await;
    for name in [
        "crm.region",
        "mesh.crm.region",
        "CRM.Region",
        "\"crm\".\"region\"",
        "MESH.crm.REGION",
    ] {
        let rows = client
            .query(&format!("SELECT count(*) FROM {name}"))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(row_count(&rows), 1, "{name}");
    }
    for name in [
        "\"CRM\".\"Region\"",
        "crm.regions",
        "nowhere.region",
        "other.crm.region",
        "region",
    ] {
        let error = client
            .query(&format!("SELECT count(*) FROM {name}"))
            .await
            .unwrap_err();
        assert_status(&error, Code::NotFound, "not found");
    }
    server.stop().await;
}

#[tokio::test]
async fn bad_sql_gets_the_parser_message_and_unknown_columns_are_invalid() {
    let server = TestServer::start().await;
    let mut client = server.login("alice").await;
    let error = client.query("SELEC 1").await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().starts_with("SQL syntax error: Expected"),
        "{}",
        error.message()
    );
    let error = client
        .query("SELECT no_such_column FROM crm.region")
        .await
        .unwrap_err();
    assert_status(&error, Code::InvalidArgument, "no_such_column");
    // A name quoted in the wrong case: the engine's hint, without the
    // engine setting the caller cannot change.
    let error = client
        .query("SELECT \"R_NAME\" FROM crm.region")
        .await
        .unwrap_err();
    assert_status(&error, Code::InvalidArgument, "double quotes");
    assert!(!error.message().contains("datafusion."), "{error:?}");
    let error = client.query("SELECT 1/0").await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
    let error = client.query("").await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    let deep = format!("SELECT {}1{}", "(".repeat(5000), ")".repeat(5000));
    let error = client.query(&deep).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
    // The server is still there.
    assert_eq!(row_count(&client.query("SELECT 1").await.unwrap()), 1);
    server.stop().await;
}

const EVENTS_DOMAIN: &str = r#"
name = "ops"
owner = "ops@acme.example"

[storage.files]
type = "object_store"
url = "file://../opsdata"

[[products]]
name = "events"
storage = "files"
location = "events/"
format = "parquet"

[[policies]]
product = "events"
access = "has_group('analyst')"
"#;

/// Writes `kinds` as a Parquet file of events, its strings stored as views
/// (as DataFusion and tpchgen write them).
fn write_events(path: &std::path::Path, first_id: i64, kinds: &[&str]) {
    use std::sync::Arc;

    use arrow::array::{Int64Array, RecordBatch, StringViewArray};
    use arrow::datatypes::{DataType, Field, Schema};

    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("kind", DataType::Utf8View, false),
    ]));
    let ids = Int64Array::from_iter_values(first_id..first_id + kinds.len() as i64);
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![
            Arc::new(ids),
            Arc::new(StringViewArray::from(kinds.to_vec())),
        ],
    )
    .unwrap();
    // Written aside and renamed, as a writer replacing a file would.
    let partial = path.with_extension("partial");
    let mut writer = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&partial).unwrap(),
        schema,
        None,
    )
    .unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    std::fs::rename(&partial, path).unwrap();
}

#[tokio::test]
async fn files_changed_while_serving_are_read_as_they_are_now() {
    let server = TestServer::start_with(|dir| {
        std::fs::write(dir.join("domains/ops.toml"), EVENTS_DOMAIN).unwrap();
        let events = dir.join("opsdata/events");
        std::fs::create_dir_all(&events).unwrap();
        write_events(&events.join("a.parquet"), 1, &["open", "close", "open"]);
    })
    .await;
    let mut client = server.as_identity("ana", &["analyst"], &[]).await;
    let ask = "SELECT count(*) AS n, count(DISTINCT kind) AS kinds, \
               sum(CASE WHEN kind = 'open' THEN 1 ELSE 0 END) AS opens FROM ops.events";
    let before = pretty(&client.query(ask).await.unwrap());
    assert!(before.contains("| 3 | 2     | 2     |"), "{before}");
    // The strings reach the client as plain Utf8, whatever the files store.
    let rows = client.query("SELECT kind FROM ops.events").await.unwrap();
    assert_eq!(
        rows[0].schema().field(0).data_type(),
        &arrow::datatypes::DataType::Utf8
    );

    // The file rewritten with other rows, and another added: no reload, and
    // the counts (which come from the files' statistics when they can) follow.
    let events = server.dir.path().join("opsdata/events");
    write_events(
        &events.join("a.parquet"),
        1,
        &["open", "retry", "retry", "close", "open"],
    );
    write_events(&events.join("b.parquet"), 100, &["open"]);
    let after = pretty(&client.query(ask).await.unwrap());
    assert!(after.contains("| 6 | 3     | 3     |"), "{after}");
    let only_count = pretty(
        &client
            .query("SELECT count(*) AS n FROM ops.events")
            .await
            .unwrap(),
    );
    assert!(only_count.contains("| 6 |"), "{only_count}");
}

#[tokio::test]
async fn rows_read_as_they_are_stream_in_large_batches() {
    let kinds: Vec<&str> = (0..100_000)
        .map(|i| ["open", "close", "retry"][i % 3])
        .collect();
    let server = TestServer::start_with(|dir| {
        std::fs::write(dir.join("domains/ops.toml"), EVENTS_DOMAIN).unwrap();
        let events = dir.join("opsdata/events");
        std::fs::create_dir_all(&events).unwrap();
        write_events(&events.join("a.parquet"), 1, &kinds);
    })
    .await;
    let mut client = server.as_identity("ana", &["analyst"], &[]).await;
    let sizes = |batches: &[arrow::array::RecordBatch]| -> Vec<usize> {
        batches.iter().map(|batch| batch.num_rows()).collect()
    };
    // One row group of 100 000 rows, read whole and filtered: batches of
    // 32 768 rows (the engine's own are 8 192).
    let whole = client
        .query("SELECT id, kind FROM ops.events")
        .await
        .unwrap();
    assert_eq!(sizes(&whole), [32_768, 32_768, 32_768, 1_696]);
    let filtered = client
        .query("SELECT id FROM ops.events WHERE kind <> 'none'")
        .await
        .unwrap();
    assert_eq!(row_count(&filtered), 100_000);
    assert_eq!(sizes(&filtered)[0], 32_768, "{:?}", sizes(&filtered));
    // An aggregate over the same rows (run in the engine's batches).
    let counted = client
        .query("SELECT kind, count(*) AS n FROM ops.events GROUP BY kind ORDER BY kind")
        .await
        .unwrap();
    assert_eq!(
        pretty(&counted),
        "+-------+-------+\n\
         | kind  | n     |\n\
         +-------+-------+\n\
         | close | 33333 |\n\
         | open  | 33334 |\n\
         | retry | 33333 |\n\
         +-------+-------+"
    );
    server.stop().await;
}
