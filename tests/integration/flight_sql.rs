//! The Flight SQL surface (DESIGN §6): every RPC, as a client sees it.

use std::sync::Arc;

use arrow::array::{Array, AsArray, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema, UInt32Type};
use arrow::ipc::convert::try_schema_from_ipc_buffer;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::sql::{
    ActionBeginTransactionRequest, ActionCancelQueryRequest, ActionCancelQueryResult,
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, ActionCreatePreparedSubstraitPlanRequest, Any,
    CommandGetCatalogs, CommandGetCrossReference, CommandGetDbSchemas, CommandGetExportedKeys,
    CommandGetImportedKeys, CommandGetPrimaryKeys, CommandGetSqlInfo, CommandGetTableTypes,
    CommandGetTables, CommandGetXdbcTypeInfo, CommandPreparedStatementQuery,
    CommandStatementUpdate, DoPutPreparedStatementResult, ProstMessageExt, SqlInfo,
};
use arrow_flight::{
    CancelFlightInfoRequest, CancelFlightInfoResult, CancelStatus, FlightDescriptor, PutResult,
    RenewFlightEndpointRequest,
};
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use tonic::Code;

use crate::fixture::{TestClient, TestServer, assert_status, pretty, row_count, statement};

fn strings(batches: &[RecordBatch], column: &str) -> Vec<String> {
    batches
        .iter()
        .flat_map(|b| {
            let array = b.column_by_name(column).unwrap().as_string::<i32>().clone();
            (0..array.len()).map(move |i| array.value(i).to_string())
        })
        .collect()
}

#[tokio::test]
async fn catalogs_schemas_and_table_types_list_the_mesh() {
    let server = TestServer::start().await;
    let mut client = server.login("alice").await;

    let (_, catalogs) = client
        .command(CommandGetCatalogs {}.as_any())
        .await
        .unwrap();
    assert_eq!(strings(&catalogs, "catalog_name"), ["mesh"]);

    let all = CommandGetDbSchemas {
        catalog: None,
        db_schema_filter_pattern: None,
    };
    let (_, schemas) = client.command(all.as_any()).await.unwrap();
    assert_eq!(
        strings(&schemas, "db_schema_name"),
        ["crm", "sales", "supply", "support"]
    );
    let filtered = CommandGetDbSchemas {
        catalog: Some("mesh".into()),
        db_schema_filter_pattern: Some("s%".into()),
    };
    let (_, schemas) = client.command(filtered.as_any()).await.unwrap();
    assert_eq!(
        strings(&schemas, "db_schema_name"),
        ["sales", "supply", "support"]
    );
    let elsewhere = CommandGetDbSchemas {
        catalog: Some("other".into()),
        db_schema_filter_pattern: None,
    };
    let (_, schemas) = client.command(elsewhere.as_any()).await.unwrap();
    assert_eq!(row_count(&schemas), 0);

    let (_, types) = client
        .command(CommandGetTableTypes {}.as_any())
        .await
        .unwrap();
    assert_eq!(strings(&types, "table_type"), ["TABLE", "VIEW"]);
    server.stop().await;
}

/// GetTables with no filter and with schemas: the answer, and its
/// `domain.product` names in order.
pub(crate) async fn table_names(client: &mut TestClient) -> (Vec<RecordBatch>, Vec<String>) {
    let command = CommandGetTables {
        catalog: None,
        db_schema_filter_pattern: None,
        table_name_filter_pattern: None,
        table_types: vec![],
        include_schema: true,
    };
    let (_, tables) = client.command(command.as_any()).await.unwrap();
    let names = strings(&tables, "db_schema_name")
        .into_iter()
        .zip(strings(&tables, "table_name"))
        .map(|(s, t)| format!("{s}.{t}"))
        .collect();
    (tables, names)
}

#[tokio::test]
async fn get_tables_lists_products_with_their_schemas() {
    let server = TestServer::start().await;
    let mut client = server.login("alice").await;
    let (tables, names) = table_names(&mut client).await;
    assert_eq!(
        names,
        [
            "crm.customer",
            "crm.nation",
            "crm.region",
            "sales.lineitem",
            "sales.orders",
            "sales.revenue_by_nation",
            "supply.part",
            "supply.partsupp",
            "supply.supplier",
            "support.tickets"
        ]
    );
    let types = strings(&tables, "table_type");
    assert_eq!(types[5], "VIEW");
    assert_eq!(types[4], "TABLE");

    let schemas = tables[0]
        .column_by_name("table_schema")
        .unwrap()
        .as_binary::<i32>();
    let nation = try_schema_from_ipc_buffer(schemas.value(1)).unwrap();
    assert_eq!(
        nation,
        Schema::new(vec![
            Field::new("n_nationkey", DataType::Int64, true),
            Field::new("n_name", DataType::Utf8, true),
            Field::new("n_regionkey", DataType::Int64, true),
            Field::new("n_comment", DataType::Utf8, true),
        ])
    );
    // A column the product's contract describes carries the description
    // as Flight SQL remarks.
    let customer = try_schema_from_ipc_buffer(schemas.value(0)).unwrap();
    assert_eq!(
        customer
            .field_with_name("c_region")
            .unwrap()
            .metadata()
            .get("ARROW:FLIGHT:SQL:REMARKS")
            .map(String::as_str),
        Some("The region of the customer's nation")
    );
    assert!(
        customer
            .field_with_name("c_name")
            .unwrap()
            .metadata()
            .is_empty()
    );
    let orders = try_schema_from_ipc_buffer(schemas.value(4)).unwrap();
    assert_eq!(
        orders.field_with_name("o_totalprice").unwrap().data_type(),
        &DataType::Decimal128(15, 2)
    );
    assert_eq!(
        orders.field_with_name("o_comment").unwrap().data_type(),
        &DataType::Utf8
    );

    // Filters: a name pattern and a table type; without include_schema.
    let command = CommandGetTables {
        catalog: Some("mesh".into()),
        db_schema_filter_pattern: Some("sales".into()),
        table_name_filter_pattern: Some("%order%".into()),
        table_types: vec!["TABLE".into()],
        include_schema: false,
    };
    let (info, tables) = client.command(command.as_any()).await.unwrap();
    assert_eq!(strings(&tables, "table_name"), ["orders"]);
    assert!(
        info.try_decode_schema()
            .unwrap()
            .field_with_name("table_schema")
            .is_err()
    );
    server.stop().await;
}

#[tokio::test]
async fn sql_info_describes_a_read_only_server() {
    let server = TestServer::start().await;
    let mut client = server.login("alice").await;
    let command = CommandGetSqlInfo {
        info: vec![
            SqlInfo::FlightSqlServerName as u32,
            SqlInfo::FlightSqlServerReadOnly as u32,
            SqlInfo::FlightSqlServerTransaction as u32,
            SqlInfo::SqlIdentifierQuoteChar as u32,
        ],
    };
    let (info, batches) = client.command(command.as_any()).await.unwrap();
    let schema = info.try_decode_schema().unwrap();
    assert_eq!(schema.field(0).name(), "info_name");
    assert_eq!(schema.field(0).data_type(), &DataType::UInt32);
    assert!(matches!(schema.field(1).data_type(), DataType::Union(_, _)));
    let names: Vec<u32> = batches[0]
        .column(0)
        .as_primitive::<UInt32Type>()
        .values()
        .to_vec();
    assert_eq!(names, [0, 3, 8, 504]);
    let text = pretty(&batches);
    assert!(
        text.contains("| 0         | {string_value=meshgate} |"),
        "{text}"
    );
    assert!(
        text.contains("| 3         | {bool_value=true}       |"),
        "{text}"
    );
    assert!(
        text.contains("| 504       | {string_value=\"}        |"),
        "{text}"
    );

    // With no filter (as JDBC asks), every standard code is answered.
    let (_, all) = client
        .command(CommandGetSqlInfo { info: vec![] }.as_any())
        .await
        .unwrap();
    assert!(row_count(&all) >= 90, "{} codes", row_count(&all));
    server.stop().await;
}

#[tokio::test]
async fn xdbc_type_info_and_key_rpcs_are_well_formed() {
    let server = TestServer::start().await;
    let mut client = server.login("alice").await;
    let (_, types) = client
        .command(CommandGetXdbcTypeInfo { data_type: None }.as_any())
        .await
        .unwrap();
    let names = strings(&types, "type_name");
    for expected in ["BIGINT", "VARCHAR", "DECIMAL", "DATE", "TIMESTAMP"] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }

    let primary = CommandGetPrimaryKeys {
        catalog: None,
        db_schema: Some("sales".into()),
        table: "orders".into(),
    };
    let (info, rows) = client.command(primary.as_any()).await.unwrap();
    assert_eq!(row_count(&rows), 0);
    let schema = info.try_decode_schema().unwrap();
    assert_eq!(schema.field(2).name(), "table_name");
    assert_eq!(schema.field(5).name(), "key_sequence");

    let keys: [Any; 3] = [
        CommandGetExportedKeys {
            catalog: None,
            db_schema: None,
            table: "orders".into(),
        }
        .as_any(),
        CommandGetImportedKeys {
            catalog: None,
            db_schema: None,
            table: "orders".into(),
        }
        .as_any(),
        CommandGetCrossReference {
            pk_catalog: None,
            pk_db_schema: None,
            pk_table: "customer".into(),
            fk_catalog: None,
            fk_db_schema: None,
            fk_table: "orders".into(),
        }
        .as_any(),
    ];
    for command in keys {
        let (info, rows) = client.command(command).await.unwrap();
        assert_eq!(row_count(&rows), 0);
        let schema = info.try_decode_schema().unwrap();
        assert_eq!(schema.fields().len(), 13);
        assert_eq!(schema.field(11).name(), "update_rule");
    }
    server.stop().await;
}

pub(crate) async fn create_prepared(
    client: &mut TestClient,
    sql: &str,
) -> Result<ActionCreatePreparedStatementResult, tonic::Status> {
    let request = ActionCreatePreparedStatementRequest {
        query: sql.into(),
        transaction_id: None,
    };
    let bodies = client
        .action("CreatePreparedStatement", request.as_any().encode_to_vec())
        .await?;
    let any = Any::decode(bodies[0].as_ref()).unwrap();
    Ok(any.unpack().unwrap().unwrap())
}

pub(crate) async fn close_prepared(client: &mut TestClient, handle: bytes::Bytes) {
    let close = ActionClosePreparedStatementRequest {
        prepared_statement_handle: handle,
    };
    client
        .action("ClosePreparedStatement", close.as_any().encode_to_vec())
        .await
        .unwrap();
}

pub(crate) async fn bind(
    client: &mut TestClient,
    handle: bytes::Bytes,
    parameters: RecordBatch,
) -> Result<bytes::Bytes, tonic::Status> {
    let command = CommandPreparedStatementQuery {
        prepared_statement_handle: handle,
    };
    let descriptor = FlightDescriptor::new_cmd(command.as_any().encode_to_vec());
    let flight_data: Vec<_> = FlightDataEncoderBuilder::new()
        .with_flight_descriptor(Some(descriptor))
        .build(futures::stream::iter([Ok(parameters)]))
        .try_collect()
        .await
        .unwrap();
    let request = client.request(futures::stream::iter(flight_data));
    let results: Vec<PutResult> = client
        .inner
        .do_put(request)
        .await?
        .into_inner()
        .try_collect()
        .await?;
    let result = DoPutPreparedStatementResult::decode(results[0].app_metadata.as_ref()).unwrap();
    Ok(result.prepared_statement_handle.unwrap())
}

pub(crate) fn one_int64(value: i64) -> RecordBatch {
    RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new("0", DataType::Int64, true)])),
        vec![Arc::new(Int64Array::from(vec![value]))],
    )
    .unwrap()
}

#[tokio::test]
async fn prepared_statements_bind_parameters_and_rebind() {
    let server = TestServer::start().await;
    let mut client = server.login("alice").await;
    for sql in [
        "SELECT n_name FROM crm.nation WHERE n_nationkey = ?",
        "SELECT n_name FROM crm.nation WHERE n_nationkey = $1",
    ] {
        let prepared = create_prepared(&mut client, sql).await.unwrap();
        let dataset = try_schema_from_ipc_buffer(&prepared.dataset_schema).unwrap();
        assert_eq!(dataset.field(0).name(), "n_name");
        let parameters = try_schema_from_ipc_buffer(&prepared.parameter_schema).unwrap();
        assert_eq!(parameters.fields().len(), 1, "one field per placeholder");
        assert_eq!(parameters.field(0).data_type(), &DataType::Int64);

        // Unbound: a clear error, not a crash.
        let unbound = CommandPreparedStatementQuery {
            prepared_statement_handle: prepared.prepared_statement_handle.clone(),
        };
        let error = client.command(unbound.as_any()).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument);

        for (key, name) in [(6, "FRANCE"), (7, "GERMANY")] {
            let handle = bind(
                &mut client,
                prepared.prepared_statement_handle.clone(),
                one_int64(key),
            )
            .await
            .unwrap();
            let command = CommandPreparedStatementQuery {
                prepared_statement_handle: handle,
            };
            let (_, rows) = client.command(command.as_any()).await.unwrap();
            assert_eq!(strings(&rows, "n_name"), [name]);
        }
        close_prepared(&mut client, prepared.prepared_statement_handle).await;
    }
    server.stop().await;
}

/// The command that runs a prepared statement's handle.
fn run_prepared(handle: &bytes::Bytes) -> Any {
    CommandPreparedStatementQuery {
        prepared_statement_handle: handle.clone(),
    }
    .as_any()
}

#[tokio::test]
async fn a_client_that_keeps_its_prepared_handle_runs_it_with_the_parameters_bound_last() {
    // flightsql-dbapi and older JDBC drivers bind, ignore the handle the
    // bind answers with, and run the handle they prepared.
    let server = TestServer::start().await;
    let mut alice = server.login("alice").await;
    let sql = "SELECT n_name FROM crm.nation WHERE n_nationkey = ?";
    let first = create_prepared(&mut alice, sql).await.unwrap();
    let second = create_prepared(&mut alice, sql).await.unwrap();
    let (first, second) = (
        first.prepared_statement_handle,
        second.prepared_statement_handle,
    );
    assert_ne!(first, second, "each preparation has a handle of its own");
    for (key, name, other_name) in [(6, "FRANCE", "MOZAMBIQUE"), (7, "GERMANY", "PERU")] {
        bind(&mut alice, first.clone(), one_int64(key))
            .await
            .unwrap();
        bind(&mut alice, second.clone(), one_int64(key + 10))
            .await
            .unwrap();
        let (_, rows) = alice.command(run_prepared(&first)).await.unwrap();
        assert_eq!(strings(&rows, "n_name"), [name]);
        let (_, rows) = alice.command(run_prepared(&second)).await.unwrap();
        assert_eq!(strings(&rows, "n_name"), [other_name]);
    }
    // Bound or not, the handle is alice's alone.
    let mut bob = server.login("bob").await;
    let error = bob.command(run_prepared(&first)).await.unwrap_err();
    assert_status(&error, Code::PermissionDenied, "another user");
    // Closed, it no longer runs with what was bound to it.
    close_prepared(&mut alice, first.clone()).await;
    let error = alice.command(run_prepared(&first)).await.unwrap_err();
    assert_status(&error, Code::InvalidArgument, "0 value(s) were bound");
    let (_, rows) = alice.command(run_prepared(&second)).await.unwrap();
    assert_eq!(strings(&rows, "n_name"), ["PERU"]);
    server.stop().await;
}

#[tokio::test]
async fn parameters_of_other_types_are_cast_to_the_placeholder_type() {
    let server = TestServer::start().await;
    let mut client = server.login("alice").await;
    let prepared = create_prepared(
        &mut client,
        "SELECT r_name FROM crm.region WHERE r_regionkey = ? AND r_name <> ?",
    )
    .await
    .unwrap();
    let parameters = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("0", DataType::Utf8, true),
            Field::new("1", DataType::Utf8, true),
        ])),
        vec![
            Arc::new(arrow::array::StringArray::from(vec!["3"])),
            Arc::new(arrow::array::StringArray::from(vec!["AFRICA"])),
        ],
    )
    .unwrap();
    let handle = bind(
        &mut client,
        prepared.prepared_statement_handle.clone(),
        parameters,
    )
    .await
    .unwrap();
    let (_, rows) = client
        .command(
            CommandPreparedStatementQuery {
                prepared_statement_handle: handle,
            }
            .as_any(),
        )
        .await
        .unwrap();
    assert_eq!(strings(&rows, "r_name"), ["EUROPE"]);

    // Too few values, and a value that cannot be cast, fail at bind time.
    let too_few = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new("0", DataType::Utf8, true)])),
        vec![Arc::new(arrow::array::StringArray::from(vec!["3"]))],
    )
    .unwrap();
    let error = bind(
        &mut client,
        prepared.prepared_statement_handle.clone(),
        too_few,
    )
    .await
    .unwrap_err();
    assert_status(
        &error,
        Code::InvalidArgument,
        "2 placeholder(s) but 1 value(s)",
    );
    let uncastable = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("0", DataType::Utf8, true),
            Field::new("1", DataType::Utf8, true),
        ])),
        vec![
            Arc::new(arrow::array::StringArray::from(vec!["three"])),
            Arc::new(arrow::array::StringArray::from(vec!["AFRICA"])),
        ],
    )
    .unwrap();
    let error = bind(&mut client, prepared.prepared_statement_handle, uncastable)
        .await
        .unwrap_err();
    assert_status(&error, Code::InvalidArgument, "value three for $1");
    server.stop().await;
}

#[tokio::test]
async fn writes_through_do_put_are_refused() {
    let server = TestServer::start().await;
    let mut client = server.login("alice").await;
    let command = CommandStatementUpdate {
        query: "DELETE FROM sales.orders".into(),
        transaction_id: None,
    };
    let descriptor = FlightDescriptor::new_cmd(command.as_any().encode_to_vec());
    let data: Vec<_> = FlightDataEncoderBuilder::new()
        .with_flight_descriptor(Some(descriptor))
        .with_schema(Arc::new(Schema::empty()))
        .build(futures::stream::empty())
        .try_collect()
        .await
        .unwrap();
    let request = client.request(futures::stream::iter(data));
    let error = client.inner.do_put(request).await.unwrap_err();
    assert_status(&error, Code::InvalidArgument, "read-only");
    // A DoPut that names no command at all is a clear error too.
    let request = client.request(futures::stream::iter(Vec::<arrow_flight::FlightData>::new()));
    let error = client.inner.do_put(request).await.unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
    server.stop().await;
}

#[tokio::test]
async fn session_actions_are_answered() {
    let server = TestServer::start().await;
    let mut client = server.login("alice").await;
    let closed = client.action("CloseSession", vec![]).await.unwrap();
    assert_eq!(
        closed[0].as_ref(),
        [0x08, 0x01],
        "CloseSessionResult{{status: CLOSED}}"
    );
    let options = client.action("GetSessionOptions", vec![]).await.unwrap();
    assert_eq!(options.len(), 1);
    let unknown = client.action("Frobnicate", vec![]).await.unwrap_err();
    assert_status(&unknown, Code::Unimplemented, "Frobnicate");
    let actions: Vec<_> = client
        .inner
        .list_actions(client.request(arrow_flight::Empty {}))
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    assert!(actions.len() >= 2);
    server.stop().await;
}

#[tokio::test]
async fn view_types_are_converted_and_empty_results_keep_their_schema() {
    let server = TestServer::start().await;
    let mut client = server.login("alice").await;
    let rows = client
        .query("SELECT arrow_cast(r_name, 'Utf8View') AS v, arrow_cast(r_name, 'Dictionary(Int32, Utf8)') AS d FROM crm.region ORDER BY r_regionkey")
        .await
        .unwrap();
    let schema = rows[0].schema();
    assert_eq!(schema.field(0).data_type(), &DataType::Utf8);
    assert_eq!(schema.field(1).data_type(), &DataType::Utf8);
    assert_eq!(strings(&rows, "v")[0], "AFRICA");

    let (info, rows) = client
        .command(statement(
            "SELECT r_name FROM crm.region WHERE r_regionkey < 0",
        ))
        .await
        .unwrap();
    assert_eq!(row_count(&rows), 0);
    assert_eq!(info.total_records, -1);
    let schema = info.try_decode_schema().unwrap();
    assert_eq!(schema.field(0).name(), "r_name");
    server.stop().await;
}

fn statement_descriptor(sql: &str) -> FlightDescriptor {
    FlightDescriptor::new_cmd(statement(sql).encode_to_vec())
}

async fn get_schema(
    client: &mut TestClient,
    descriptor: FlightDescriptor,
) -> Result<Schema, tonic::Status> {
    let request = client.request(descriptor);
    let result = client.inner.get_schema(request).await?.into_inner();
    Ok(Schema::try_from(&result).unwrap())
}

#[tokio::test]
async fn get_schema_answers_with_the_schema_the_rows_would_have() {
    let server = TestServer::start().await;
    let mut alice = server.login("alice").await;
    // A statement: its FlightInfo's schema, the denied column left out.
    let sql = "SELECT * FROM crm.customer";
    let schema = get_schema(&mut alice, statement_descriptor(sql))
        .await
        .unwrap();
    let info = alice.flight_info(statement(sql)).await.unwrap();
    assert_eq!(schema, info.try_decode_schema().unwrap());
    assert!(schema.field_with_name("c_name").is_ok());
    assert!(schema.field_with_name("c_acctbal").is_err(), "{schema:?}");
    // With placeholders, which a statement's FlightInfo refuses.
    let with_placeholder = "SELECT o_orderkey FROM sales.orders WHERE o_orderkey = ?";
    let schema = get_schema(&mut alice, statement_descriptor(with_placeholder))
        .await
        .unwrap();
    assert_eq!(schema.fields().len(), 1);
    assert_eq!(schema.field(0).name(), "o_orderkey");
    // A prepared statement: the dataset schema it was created with.
    let prepared = create_prepared(&mut alice, "SELECT n_name, n_nationkey FROM crm.nation")
        .await
        .unwrap();
    let command = CommandPreparedStatementQuery {
        prepared_statement_handle: prepared.prepared_statement_handle.clone(),
    };
    let prepared_descriptor = FlightDescriptor::new_cmd(command.as_any().encode_to_vec());
    let schema = get_schema(&mut alice, prepared_descriptor.clone())
        .await
        .unwrap();
    assert_eq!(
        schema,
        try_schema_from_ipc_buffer(&prepared.dataset_schema).unwrap()
    );
    // A metadata command: the schema of its FlightInfo.
    let tables = CommandGetTables {
        include_schema: true,
        ..Default::default()
    };
    let schema = get_schema(
        &mut alice,
        FlightDescriptor::new_cmd(tables.as_any().encode_to_vec()),
    )
    .await
    .unwrap();
    let info = alice.flight_info(tables.as_any()).await.unwrap();
    assert_eq!(schema, info.try_decode_schema().unwrap());
    // A product the caller may not see is as missing as one never defined.
    let mut dave = server.login("dave").await;
    let hidden = get_schema(
        &mut dave,
        statement_descriptor("SELECT * FROM support.tickets"),
    )
    .await
    .unwrap_err();
    let never = get_schema(
        &mut dave,
        statement_descriptor("SELECT * FROM support.tockets"),
    )
    .await
    .unwrap_err();
    assert_eq!(hidden.code(), Code::NotFound, "{hidden:?}");
    assert_eq!(
        hidden.message().replace("tickets", "tockets"),
        never.message()
    );
    // Another user's prepared statement is refused, as at DoGet.
    let mut bob = server.login("bob").await;
    let refused = get_schema(&mut bob, prepared_descriptor).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    // Without a token, nothing.
    let mut anonymous = server.client().await;
    let refused = get_schema(&mut anonymous, statement_descriptor("SELECT 1"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    server.stop().await;
}

#[tokio::test]
async fn list_actions_lists_the_actions_do_action_takes() {
    let server = TestServer::start().await;
    let mut client = server.login("alice").await;
    let request = client.request(arrow_flight::Empty {});
    let listed: Vec<String> = client
        .inner
        .list_actions(request)
        .await
        .unwrap()
        .into_inner()
        .map_ok(|action| action.r#type)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(
        listed,
        [
            "CreatePreparedStatement",
            "ClosePreparedStatement",
            "CancelFlightInfo",
            "CancelQuery",
            "RenewFlightEndpoint",
            "SetSessionOptions",
            "GetSessionOptions",
            "CloseSession",
        ]
    );
    // Every listed action is taken: none is answered as unknown.
    for action in &listed {
        if let Err(status) = client.action(action, Vec::new()).await {
            assert!(!status.message().contains("unknown action"), "{status:?}");
        }
    }
    // The Flight SQL actions meshgate does not take are not listed, and
    // are refused with a reason.
    let transaction = ActionBeginTransactionRequest {}.as_any().encode_to_vec();
    let refused = client
        .action("BeginTransaction", transaction)
        .await
        .unwrap_err();
    assert_status(&refused, Code::Unimplemented, "read-only");
    let substrait = ActionCreatePreparedSubstraitPlanRequest::default()
        .as_any()
        .encode_to_vec();
    let refused = client
        .action("CreatePreparedSubstraitPlan", substrait)
        .await
        .unwrap_err();
    assert_status(&refused, Code::Unimplemented, "SQL");
    server.stop().await;
}

#[tokio::test]
async fn requests_meshgate_does_not_take_are_refused_with_what_to_use() {
    let server = TestServer::start().await;
    let mut client = server.login("alice").await;
    // Calls of the Flight protocol with no Flight SQL meaning.
    let request = client.request(arrow_flight::Criteria::default());
    let refused = client.inner.list_flights(request).await.unwrap_err();
    assert_status(&refused, Code::Unimplemented, "GetTables");
    let request = client.request(statement_descriptor("SELECT 1"));
    let refused = client.inner.poll_flight_info(request).await.unwrap_err();
    assert_status(&refused, Code::Unimplemented, "GetFlightInfo");
    // Descriptors without a command, or with one that is not Flight SQL's.
    let path = FlightDescriptor::new_path(vec!["sales".into(), "orders".into()]);
    let refused = client
        .inner
        .get_flight_info(client.request(path))
        .await
        .unwrap_err();
    assert_status(&refused, Code::Unimplemented, "no Flight SQL command");
    let foreign = Any {
        type_url: "type.googleapis.com/acme.Query".into(),
        value: b"SELECT 1".to_vec().into(),
    };
    let refused = client.flight_info(foreign).await.unwrap_err();
    assert_status(&refused, Code::Unimplemented, "acme.Query");
    // A command, an action body or a ticket that does not decode: a
    // sentence, not the decoder's debug output.
    let garbage = FlightDescriptor::new_cmd(b"\xff\xff\xff\x00garbage".to_vec());
    let refused = client
        .inner
        .get_flight_info(client.request(garbage))
        .await
        .unwrap_err();
    let undecodable = client
        .action("CreatePreparedStatement", b"\xff\xfe".to_vec())
        .await
        .unwrap_err();
    for status in [refused, undecodable] {
        assert_status(&status, Code::InvalidArgument, "does not decode");
        assert!(!status.message().contains("DecodeError"), "{status:?}");
    }
    let refused = client
        .fetch(arrow_flight::Ticket::new(Vec::<u8>::new()))
        .await
        .unwrap_err();
    assert_status(&refused, Code::InvalidArgument, "ticket");
    server.stop().await;
}

/// The first record-batch message of a DoGet of `sql`, left unread after
/// it; the FlightInfo it was fetched from.
async fn start_fetch(
    client: &mut TestClient,
    sql: &str,
) -> (
    arrow_flight::FlightInfo,
    tonic::Streaming<arrow_flight::FlightData>,
) {
    let info = client.flight_info(statement(sql)).await.unwrap();
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let request = client.request(ticket);
    let mut stream = client.inner.do_get(request).await.unwrap().into_inner();
    // The schema message, then rows: the query is running.
    for _ in 0..2 {
        assert!(stream.message().await.unwrap().is_some());
    }
    (info, stream)
}

/// How `stream` ends once read to its end: it must fail.
async fn ending(mut stream: tonic::Streaming<arrow_flight::FlightData>) -> tonic::Status {
    loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the stream ended as if its result were complete"),
            Err(status) => return status,
        }
    }
}

#[tokio::test]
async fn cancel_flight_info_stops_the_callers_running_fetch() {
    let server = TestServer::start().await;
    let mut alice = server.login("alice").await;
    // The demo's lineitem is far larger than what HTTP/2 lets the server
    // send ahead of a client that reads nothing more.
    let sql = "SELECT * FROM sales.lineitem";
    let (info, stream) = start_fetch(&mut alice, sql).await;
    let cancel = CancelFlightInfoRequest::new(info).encode_to_vec();
    // Another user cannot cancel it.
    let mut bob = server.login("bob").await;
    let refused = bob
        .action("CancelFlightInfo", cancel.clone())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let answer = alice
        .action("CancelFlightInfo", cancel.clone())
        .await
        .unwrap();
    let result = CancelFlightInfoResult::decode(answer[0].clone()).unwrap();
    assert_eq!(result.status(), CancelStatus::Cancelled);
    let ended = ending(stream).await;
    assert_eq!(ended.code(), Code::Cancelled, "{ended:?}");
    // Nothing of it runs any more.
    let gone = alice.action("CancelFlightInfo", cancel).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    // Audited as cancelled.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let records = server.audit_records();
        if let Some(record) = records.iter().rev().find(|r| r["sql"] == sql) {
            assert_eq!(record["outcome"], "cancelled", "{record}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no audit record");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Flight SQL's older CancelQuery does the same.
    let (info, stream) = start_fetch(&mut alice, "SELECT *, 1 AS again FROM sales.lineitem").await;
    let request = ActionCancelQueryRequest {
        info: info.encode_to_vec().into(),
    };
    let answer = alice
        .action("CancelQuery", request.as_any().encode_to_vec())
        .await
        .unwrap();
    let result: ActionCancelQueryResult = Any::decode(answer[0].clone())
        .unwrap()
        .unpack()
        .unwrap()
        .unwrap();
    assert_eq!(result.result, CancelStatus::Cancelled as i32);
    assert_eq!(ending(stream).await.code(), Code::Cancelled);
    server.stop().await;
}

#[tokio::test]
async fn renew_flight_endpoint_answers_with_the_callers_endpoint() {
    let server = TestServer::start().await;
    let mut alice = server.login("alice").await;
    let info = alice
        .flight_info(statement("SELECT n_name FROM crm.nation"))
        .await
        .unwrap();
    let endpoint = info.endpoint[0].clone();
    let request = RenewFlightEndpointRequest::new(endpoint.clone()).encode_to_vec();
    let answer = alice
        .action("RenewFlightEndpoint", request.clone())
        .await
        .unwrap();
    let renewed = arrow_flight::FlightEndpoint::decode(answer[0].clone()).unwrap();
    assert_eq!(renewed, endpoint);
    let ticket = renewed.ticket.unwrap();
    assert_eq!(row_count(&alice.fetch(ticket).await.unwrap()), 25);
    let mut bob = server.login("bob").await;
    let refused = bob
        .action("RenewFlightEndpoint", request)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    server.stop().await;
}
