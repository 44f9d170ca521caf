//! The Arrow Flight SQL JDBC driver's call sequence, replayed: what it sends
//! on connect, while a tool browses, and for every statement (its jar is not
//! reachable from here to run it directly).

use arrow::array::{Array, AsArray, UnionArray};
use arrow::datatypes::UInt32Type;
use arrow::ipc::convert::try_schema_from_ipc_buffer;
use arrow_flight::sql::{
    CommandGetCatalogs, CommandGetDbSchemas, CommandGetExportedKeys, CommandGetImportedKeys,
    CommandGetPrimaryKeys, CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables,
    CommandPreparedStatementQuery, ProstMessageExt,
};
use tonic::Code;

use crate::fixture::{TestServer, row_count};
use crate::flight_sql::{close_prepared, create_prepared};

/// Union child ids of SqlInfo values, by the spec.
const STRING: i8 = 0;
const BOOL: i8 = 1;
const BIGINT: i8 = 2;
const INT32_BITMASK: i8 = 3;
const STRING_LIST: i8 = 4;
const INT32_TO_INT32_LIST_MAP: i8 = 5;

#[tokio::test]
async fn jdbc_connect_browse_and_query_sequence_is_answered() {
    let server = TestServer::start().await;
    // Connect: one handshake message with padded Basic credentials.
    let mut client = server.client().await;
    let mut request = tonic::Request::new(futures::stream::iter([
        arrow_flight::HandshakeRequest::default(),
    ]));
    request.metadata_mut().insert(
        "authorization",
        "Basic Y2Fyb2w6Y2Fyb2wtZGVtbw==".parse().unwrap(),
    );
    let response = client.inner.handshake(request).await.unwrap();
    let bearer = response
        .metadata()
        .get("authorization")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    client.authorization = Some(bearer);

    // GetSqlInfo with no filter, cached by the driver: every standard code,
    // each with the union type the spec gives it.
    let (_, info) = client
        .command(CommandGetSqlInfo { info: vec![] }.as_any())
        .await
        .unwrap();
    let batch = &info[0];
    let codes = batch.column(0).as_primitive::<UInt32Type>();
    let values = batch
        .column(1)
        .as_any()
        .downcast_ref::<UnionArray>()
        .unwrap();
    let type_of = |code: u32| {
        (0..codes.len())
            .find(|&i| codes.value(i) == code)
            .map(|i| values.type_id(i))
            .unwrap_or_else(|| panic!("SqlInfo {code} is missing"))
    };
    for (code, expected) in [
        (0, STRING),
        (1, STRING),
        (2, STRING),
        (3, BOOL),
        (4, BOOL),
        (5, BOOL),
        (6, STRING),
        (7, STRING),
        (8, INT32_BITMASK),
        (9, BOOL),
        (10, BOOL),
        (11, BOOL),
        (100, INT32_BITMASK),
        (101, INT32_BITMASK),
        (500, BOOL),
        (501, BOOL),
        (502, BOOL),
        (503, INT32_BITMASK),
        (504, STRING),
        (505, INT32_BITMASK),
        (506, BOOL),
        (507, INT32_BITMASK),
        (508, STRING_LIST),
        (509, STRING_LIST),
        (510, STRING_LIST),
        (511, STRING_LIST),
        (512, STRING_LIST),
        (513, STRING),
        (514, STRING),
        (515, BOOL),
        (516, BOOL),
        (517, INT32_TO_INT32_LIST_MAP),
        (518, BOOL),
        (519, BOOL),
        (520, BOOL),
        (521, BOOL),
        (522, INT32_BITMASK),
        (523, BOOL),
        (524, BOOL),
        (525, INT32_BITMASK),
        (526, INT32_BITMASK),
        (527, BOOL),
        (528, INT32_BITMASK),
        (529, STRING),
        (530, STRING),
        (531, STRING),
        (532, BOOL),
        (533, INT32_BITMASK),
        (534, INT32_BITMASK),
        (535, INT32_BITMASK),
        (536, BOOL),
        (537, BOOL),
        (538, INT32_BITMASK),
        (539, BOOL),
        (540, INT32_BITMASK),
        (556, BOOL),
        (562, INT32_BITMASK),
        (563, BOOL),
        (564, INT32_BITMASK),
        (565, BOOL),
        (566, BOOL),
        (567, INT32_BITMASK),
        (568, INT32_BITMASK),
        (569, INT32_BITMASK),
        (570, INT32_BITMASK),
        (571, INT32_BITMASK),
        (572, BOOL),
        (573, BOOL),
        (574, BOOL),
        (575, BOOL),
        (576, BOOL),
    ] {
        assert_eq!(type_of(code), expected, "SqlInfo {code}");
    }
    for code in 541..=561 {
        if code != 556 {
            assert_eq!(type_of(code), BIGINT, "SqlInfo {code}");
        }
    }

    // Browsing: no filters anywhere.
    let (_, catalogs) = client
        .command(CommandGetCatalogs {}.as_any())
        .await
        .unwrap();
    assert_eq!(row_count(&catalogs), 1);
    let (_, schemas) = client
        .command(
            CommandGetDbSchemas {
                catalog: None,
                db_schema_filter_pattern: None,
            }
            .as_any(),
        )
        .await
        .unwrap();
    // carol (crm, compliance) sees crm, sales and support, not supply.
    assert_eq!(row_count(&schemas), 3);
    let tables = CommandGetTables {
        catalog: None,
        db_schema_filter_pattern: None,
        table_name_filter_pattern: None,
        table_types: vec![],
        include_schema: true,
    };
    let (_, tables) = client.command(tables.as_any()).await.unwrap();
    assert_eq!(row_count(&tables), 7);
    let schemas = tables[0]
        .column_by_name("table_schema")
        .unwrap()
        .as_binary::<i32>();
    for index in 0..schemas.len() {
        assert!(
            !try_schema_from_ipc_buffer(schemas.value(index))
                .unwrap()
                .fields()
                .is_empty()
        );
    }
    let (_, types) = client
        .command(CommandGetTableTypes {}.as_any())
        .await
        .unwrap();
    assert_eq!(row_count(&types), 2);
    for command in [
        CommandGetPrimaryKeys {
            catalog: Some("mesh".into()),
            db_schema: Some("crm".into()),
            table: "customer".into(),
        }
        .as_any(),
        CommandGetImportedKeys {
            catalog: Some("mesh".into()),
            db_schema: Some("crm".into()),
            table: "customer".into(),
        }
        .as_any(),
        CommandGetExportedKeys {
            catalog: Some("mesh".into()),
            db_schema: Some("crm".into()),
            table: "customer".into(),
        }
        .as_any(),
    ] {
        let (info, rows) = client.command(command).await.unwrap();
        assert_eq!(row_count(&rows), 0);
        assert!(!info.try_decode_schema().unwrap().fields().is_empty());
    }

    // Every statement is prepared; a query has a dataset schema and no
    // parameters, and runs through GetFlightInfo + DoGet.
    let prepared = create_prepared(
        &mut client,
        "SELECT r_name FROM crm.region ORDER BY r_regionkey",
    )
    .await
    .unwrap();
    assert!(
        !try_schema_from_ipc_buffer(&prepared.dataset_schema)
            .unwrap()
            .fields()
            .is_empty()
    );
    assert!(
        try_schema_from_ipc_buffer(&prepared.parameter_schema)
            .unwrap()
            .fields()
            .is_empty()
    );
    let command = CommandPreparedStatementQuery {
        prepared_statement_handle: prepared.prepared_statement_handle.clone(),
    };
    let (_, rows) = client.command(command.as_any()).await.unwrap();
    assert_eq!(row_count(&rows), 5);
    close_prepared(&mut client, prepared.prepared_statement_handle).await;
    // An update fails at prepare, with a message a tool can show.
    let refused = create_prepared(&mut client, "UPDATE crm.region SET r_name = 'x'")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("read-only"),
        "{}",
        refused.message()
    );
    server.stop().await;
}
