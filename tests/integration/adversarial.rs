//! The adversarial suite: attempts to see hidden rows, denied columns or
//! unmasked values through every SQL path, each with its exact outcome.
//! Data and policies: see `policies.rs` (an EU analyst sees ids 1 and 2;
//! hidden rows have `divisor = 0` and non-numeric `code`s).

use arrow_flight::sql::{CommandGetTables, ProstMessageExt};
use tonic::Code;

use crate::fixture::{TestClient, TestServer, pretty};
use crate::policies::hr_server;

/// Who runs a case.
#[derive(Clone, Copy)]
enum Who {
    /// groups [analyst], region EU
    Eu,
    /// a `region` attribute crafted to break out of a string literal
    QuoteInjection,
    /// a `region` attribute with a statement separator and a DROP
    SemicolonInjection,
    /// a `region` attribute that is SQL text
    ExpressionInjection,
    /// group `Analyst`: membership is case-sensitive
    WrongCaseGroup,
    /// group `analyst-revoked`: membership is exact
    PrefixGroup,
}

enum Expect {
    /// The pretty-printed result, exactly.
    Rows(&'static str),
    /// An error of this code whose message contains the text.
    Error(Code, &'static str),
    /// A result whose text contains each of the first and none of the second.
    Text(&'static [&'static str], &'static [&'static str]),
}

struct Case {
    name: &'static str,
    who: Who,
    sql: &'static str,
    expect: Expect,
}

const EMPTY_ID: &str = "++\n++";

use Expect::{Error, Rows, Text};
use Who::*;

const CASES: &[Case] = &[
    // Error side channels: each would fail on a hidden row.
    Case {
        name: "division by zero in WHERE",
        who: Eu,
        sql: "SELECT id FROM hr.employees WHERE 10 / divisor >= 5 ORDER BY id",
        expect: Rows("+----+\n| id |\n+----+\n| 1  |\n| 2  |\n+----+"),
    },
    Case {
        name: "division by zero in SELECT",
        who: Eu,
        sql: "SELECT id, 10 / divisor AS q FROM hr.employees ORDER BY id",
        expect: Rows(
            "+----+----+\n| id | q  |\n+----+----+\n| 1  | 10 |\n| 2  | 5  |\n+----+----+",
        ),
    },
    Case {
        name: "division by zero in ORDER BY",
        who: Eu,
        sql: "SELECT id FROM hr.employees ORDER BY 10 / divisor",
        expect: Rows("+----+\n| id |\n+----+\n| 2  |\n| 1  |\n+----+"),
    },
    Case {
        name: "division by zero in an aggregate",
        who: Eu,
        sql: "SELECT sum(10 / divisor) AS s FROM hr.employees",
        expect: Rows("+----+\n| s  |\n+----+\n| 15 |\n+----+"),
    },
    Case {
        name: "division by zero in a JOIN condition",
        who: Eu,
        sql: "SELECT a.id FROM hr.employees a JOIN hr.employees b ON 10 / a.divisor = 10 / b.divisor ORDER BY 1",
        expect: Rows("+----+\n| id |\n+----+\n| 1  |\n| 2  |\n+----+"),
    },
    // Dynamic filters (from a join's build side, a TopK) pass the barrier
    // only over plain columns; one over `10 / divisor` must stay above it.
    Case {
        name: "division by zero in a join key probed by a dynamic filter",
        who: Eu,
        sql: "SELECT e.id FROM (VALUES (10), (5)) v(q) JOIN hr.employees e ON v.q = 10 / e.divisor ORDER BY 1",
        expect: Rows("+----+\n| id |\n+----+\n| 1  |\n| 2  |\n+----+"),
    },
    Case {
        name: "division by zero in a TopK sort key",
        who: Eu,
        sql: "SELECT id FROM hr.employees ORDER BY 10 / divisor LIMIT 1",
        expect: Rows("+----+\n| id |\n+----+\n| 2  |\n+----+"),
    },
    Case {
        name: "a join on a plain column never reaches a hidden row",
        who: Eu,
        sql: "SELECT e.id FROM (VALUES (1), (3), (4)) v(k) JOIN hr.employees e ON e.id = v.k ORDER BY 1",
        expect: Rows("+----+\n| id |\n+----+\n| 1  |\n+----+"),
    },
    Case {
        name: "failing cast in WHERE",
        who: Eu,
        sql: "SELECT id FROM hr.employees WHERE CAST(code AS BIGINT) = 2",
        expect: Rows("+----+\n| id |\n+----+\n| 2  |\n+----+"),
    },
    Case {
        name: "failing cast in an aggregate",
        who: Eu,
        sql: "SELECT sum(CAST(code AS BIGINT)) AS s FROM hr.employees",
        expect: Rows("+---+\n| s |\n+---+\n| 3 |\n+---+"),
    },
    Case {
        name: "CASE trick in WHERE",
        who: Eu,
        sql: "SELECT count(*) AS n FROM hr.employees WHERE CASE WHEN region <> 'EU' THEN CAST(code AS BIGINT) ELSE 1 END = 1",
        expect: Rows("+---+\n| n |\n+---+\n| 2 |\n+---+"),
    },
    Case {
        name: "CASE trick in ORDER BY",
        who: Eu,
        sql: "SELECT id FROM hr.employees ORDER BY CASE WHEN salary > 250 THEN 1 / 0 ELSE id END",
        expect: Rows("+----+\n| id |\n+----+\n| 1  |\n| 2  |\n+----+"),
    },
    Case {
        name: "CASE trick in an aggregate",
        who: Eu,
        sql: "SELECT max(CASE WHEN id > 2 THEN 1 / 0 ELSE id END) AS m FROM hr.employees",
        expect: Rows("+---+\n| m |\n+---+\n| 2 |\n+---+"),
    },
    Case {
        name: "CASE trick in a JOIN with another product",
        who: Eu,
        sql: "SELECT count(*) AS n FROM hr.employees e JOIN crm.region r ON r.r_regionkey = CASE WHEN e.region = 'US' THEN 1 / 0 ELSE 0 END",
        expect: Rows("+---+\n| n |\n+---+\n| 2 |\n+---+"),
    },
    Case {
        name: "division by zero in HAVING",
        who: Eu,
        sql: "SELECT dept FROM hr.employees GROUP BY dept HAVING sum(10 / divisor) > 0 ORDER BY dept",
        expect: Rows("+------+\n| dept |\n+------+\n| eng  |\n| ops  |\n+------+"),
    },
    Case {
        name: "division by zero in a window",
        who: Eu,
        sql: "SELECT id, sum(10 / divisor) OVER () AS s FROM hr.employees ORDER BY id",
        expect: Rows(
            "+----+----+\n| id | s  |\n+----+----+\n| 1  | 15 |\n| 2  | 15 |\n+----+----+",
        ),
    },
    Case {
        name: "division by zero in FILTER",
        who: Eu,
        sql: "SELECT count(*) FILTER (WHERE 10 / divisor > 0) AS n FROM hr.employees",
        expect: Rows("+---+\n| n |\n+---+\n| 2 |\n+---+"),
    },
    // Aggregates and counts.
    Case {
        name: "count(*) counts visible rows only",
        who: Eu,
        sql: "SELECT count(*) AS n FROM hr.employees",
        expect: Rows("+---+\n| n |\n+---+\n| 2 |\n+---+"),
    },
    Case {
        name: "count distinct",
        who: Eu,
        sql: "SELECT count(DISTINCT region) AS n FROM hr.employees",
        expect: Rows("+---+\n| n |\n+---+\n| 1 |\n+---+"),
    },
    Case {
        name: "min and max are not taken from statistics",
        who: Eu,
        sql: "SELECT min(id) AS lo, max(id) AS hi FROM hr.employees",
        expect: Rows("+----+----+\n| lo | hi |\n+----+----+\n| 1  | 2  |\n+----+----+"),
    },
    Case {
        name: "point lookup of a hidden row",
        who: Eu,
        sql: "SELECT id FROM hr.employees WHERE id = 3",
        expect: Rows(EMPTY_ID),
    },
    Case {
        name: "EXISTS probe for a hidden row",
        who: Eu,
        sql: "SELECT count(*) AS n FROM crm.region WHERE EXISTS (SELECT 1 FROM hr.employees WHERE name = 'Cid')",
        expect: Rows("+---+\n| n |\n+---+\n| 0 |\n+---+"),
    },
    // Joins.
    Case {
        name: "self-join",
        who: Eu,
        sql: "SELECT count(*) AS n FROM hr.employees a JOIN hr.employees b ON a.id <> b.id",
        expect: Rows("+---+\n| n |\n+---+\n| 2 |\n+---+"),
    },
    Case {
        name: "join with a product under other policies",
        who: Eu,
        sql: "SELECT e.name, r.r_name FROM hr.employees e JOIN crm.region r ON r.r_regionkey = e.id ORDER BY e.id",
        expect: Rows(
            "+------+---------+\n| name | r_name  |\n+------+---------+\n| Ann  | AMERICA |\n| Bob  | ASIA    |\n+------+---------+",
        ),
    },
    // Set operations.
    Case {
        name: "UNION",
        who: Eu,
        sql: "SELECT name FROM hr.employees UNION SELECT name FROM hr.employees ORDER BY name",
        expect: Rows("+------+\n| name |\n+------+\n| Ann  |\n| Bob  |\n+------+"),
    },
    Case {
        name: "INTERSECT probe",
        who: Eu,
        sql: "SELECT id FROM (VALUES (1), (3), (5)) v(id) INTERSECT SELECT id FROM hr.employees",
        expect: Rows("+----+\n| id |\n+----+\n| 1  |\n+----+"),
    },
    Case {
        name: "EXCEPT probe",
        who: Eu,
        sql: "SELECT id FROM (VALUES (1), (3), (5)) v(id) EXCEPT SELECT id FROM hr.employees ORDER BY id",
        expect: Rows("+----+\n| id |\n+----+\n| 3  |\n| 5  |\n+----+"),
    },
    // CTEs.
    Case {
        name: "CTE with a failing expression",
        who: Eu,
        sql: "WITH e AS (SELECT * FROM hr.employees WHERE 10 / divisor > 0) SELECT count(*) AS n FROM e",
        expect: Rows("+---+\n| n |\n+---+\n| 2 |\n+---+"),
    },
    Case {
        name: "CTE named like the product",
        who: Eu,
        sql: "WITH employees AS (SELECT 99 AS id) SELECT count(*) AS n FROM hr.employees",
        expect: Rows("+---+\n| n |\n+---+\n| 2 |\n+---+"),
    },
    Case {
        name: "recursive CTE joined to the product",
        who: Eu,
        sql: "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT count(*) AS n FROM r JOIN hr.employees e ON e.id = r.n",
        expect: Rows("+---+\n| n |\n+---+\n| 2 |\n+---+"),
    },
    // Views.
    Case {
        name: "a view applies the caller's policies",
        who: Eu,
        sql: "SELECT region, n, total FROM hr.eng_headcount",
        expect: Rows(
            "+--------+---+-------+\n| region | n | total |\n+--------+---+-------+\n| EU     | 1 | 100   |\n+--------+---+-------+",
        ),
    },
    Case {
        name: "division by zero over a view",
        who: Eu,
        sql: "SELECT region FROM hr.eng_headcount WHERE 100 / total = 1",
        expect: Rows("+--------+\n| region |\n+--------+\n| EU     |\n+--------+"),
    },
    // Identifiers.
    Case {
        name: "unquoted names are case-insensitive",
        who: Eu,
        sql: "SELECT count(*) AS n FROM HR.EMPLOYEES",
        expect: Rows("+---+\n| n |\n+---+\n| 2 |\n+---+"),
    },
    Case {
        name: "catalog-qualified name",
        who: Eu,
        sql: "SELECT count(*) AS n FROM mesh.hr.employees",
        expect: Rows("+---+\n| n |\n+---+\n| 2 |\n+---+"),
    },
    Case {
        name: "quoted names are exact",
        who: Eu,
        sql: "SELECT count(*) FROM \"HR\".\"Employees\"",
        expect: Error(Code::NotFound, "table 'mesh.HR.Employees' not found"),
    },
    Case {
        name: "an invisible product does not exist",
        who: Eu,
        sql: "SELECT count(*) FROM hr.salaries_secret",
        expect: Error(Code::NotFound, "table 'mesh.hr.salaries_secret' not found"),
    },
    Case {
        name: "an invisible product in a subquery",
        who: Eu,
        sql: "SELECT count(*) FROM hr.employees WHERE id IN (SELECT id FROM hr.salaries_secret)",
        expect: Error(Code::NotFound, "table 'mesh.hr.salaries_secret' not found"),
    },
    // Denied columns under every spelling.
    Case {
        name: "SELECT * omits a denied column",
        who: Eu,
        sql: "SELECT * FROM hr.employees WHERE id = 1",
        expect: Rows(
            "+----+------+--------+--------+------------------+------+---------+------+\n| id | name | region | salary | email            | dept | divisor | code |\n+----+------+--------+--------+------------------+------+---------+------+\n| 1  | Ann  | EU     | 100    | ***@acme.example | eng  | 1       | 1    |\n+----+------+--------+--------+------------------+------+---------+------+",
        ),
    },
    Case {
        name: "denied column, qualified",
        who: Eu,
        sql: "SELECT e.ssn FROM hr.employees e",
        expect: Error(Code::InvalidArgument, "No field named e.ssn"),
    },
    Case {
        name: "denied column in WHERE",
        who: Eu,
        sql: "SELECT id FROM hr.employees WHERE ssn IS NOT NULL",
        expect: Error(Code::InvalidArgument, "No field named ssn"),
    },
    Case {
        name: "denied column in USING",
        who: Eu,
        sql: "SELECT a.id FROM hr.employees a JOIN hr.employees b USING (ssn)",
        expect: Error(Code::InvalidArgument, "ssn"),
    },
    Case {
        name: "denied column in ORDER BY",
        who: Eu,
        sql: "SELECT id FROM hr.employees ORDER BY ssn",
        expect: Error(Code::InvalidArgument, "No field named ssn"),
    },
    // Masked columns.
    Case {
        name: "masked column compared with a raw value",
        who: Eu,
        sql: "SELECT count(*) AS n FROM hr.employees WHERE email = 'ann@acme.example'",
        expect: Rows("+---+\n| n |\n+---+\n| 0 |\n+---+"),
    },
    Case {
        name: "masked column in GROUP BY",
        who: Eu,
        sql: "SELECT email, count(*) AS n FROM hr.employees GROUP BY email",
        expect: Rows(
            "+------------------+---+\n| email            | n |\n+------------------+---+\n| ***@acme.example | 2 |\n+------------------+---+",
        ),
    },
    Case {
        name: "masked column as a JOIN key",
        who: Eu,
        sql: "SELECT count(*) AS n FROM hr.employees a JOIN hr.employees b ON a.email = b.email",
        expect: Rows("+---+\n| n |\n+---+\n| 4 |\n+---+"),
    },
    Case {
        name: "masked column with LIKE",
        who: Eu,
        sql: "SELECT count(*) AS n FROM hr.employees WHERE email LIKE 'a%'",
        expect: Rows("+---+\n| n |\n+---+\n| 0 |\n+---+"),
    },
    Case {
        name: "masked column through a function",
        who: Eu,
        sql: "SELECT sum(length(email)) AS n FROM hr.employees",
        expect: Rows("+----+\n| n  |\n+----+\n| 32 |\n+----+"),
    },
    // Identity: attribute values are literals, groups are exact.
    Case {
        name: "attribute with quotes",
        who: QuoteInjection,
        sql: "SELECT count(*) AS n FROM hr.employees",
        expect: Rows("+---+\n| n |\n+---+\n| 0 |\n+---+"),
    },
    Case {
        name: "attribute with a semicolon and a DROP",
        who: SemicolonInjection,
        sql: "SELECT count(*) AS n FROM hr.employees",
        expect: Rows("+---+\n| n |\n+---+\n| 0 |\n+---+"),
    },
    Case {
        name: "attribute holding SQL",
        who: ExpressionInjection,
        sql: "SELECT count(*) AS n FROM hr.employees",
        expect: Rows("+---+\n| n |\n+---+\n| 0 |\n+---+"),
    },
    Case {
        name: "group membership is case-sensitive",
        who: WrongCaseGroup,
        sql: "SELECT count(*) FROM hr.employees",
        expect: Error(Code::NotFound, "table 'mesh.hr.employees' not found"),
    },
    Case {
        name: "group membership is exact",
        who: PrefixGroup,
        sql: "SELECT count(*) FROM hr.employees",
        expect: Error(Code::NotFound, "table 'mesh.hr.employees' not found"),
    },
    // Refused statements and file access.
    Case {
        name: "DELETE",
        who: Eu,
        sql: "DELETE FROM hr.employees",
        expect: Error(Code::InvalidArgument, "DELETE is refused"),
    },
    Case {
        name: "UPDATE",
        who: Eu,
        sql: "UPDATE hr.employees SET salary = 0",
        expect: Error(Code::InvalidArgument, "UPDATE is refused"),
    },
    Case {
        name: "INSERT",
        who: Eu,
        sql: "INSERT INTO hr.employees SELECT * FROM hr.employees",
        expect: Error(Code::InvalidArgument, "INSERT is refused"),
    },
    Case {
        name: "DROP",
        who: Eu,
        sql: "DROP TABLE hr.employees",
        expect: Error(Code::InvalidArgument, "DROP is refused"),
    },
    Case {
        name: "COPY",
        who: Eu,
        sql: "COPY hr.employees TO '/tmp/employees.csv'",
        expect: Error(Code::InvalidArgument, "COPY is refused"),
    },
    Case {
        name: "SET",
        who: Eu,
        sql: "SET datafusion.execution.target_partitions = 1",
        expect: Error(Code::InvalidArgument, "SET is refused"),
    },
    Case {
        name: "CREATE EXTERNAL TABLE",
        who: Eu,
        sql: "CREATE EXTERNAL TABLE t STORED AS PARQUET LOCATION 'hrdata/employees.parquet'",
        expect: Error(Code::InvalidArgument, "CREATE EXTERNAL TABLE is refused"),
    },
    Case {
        name: "file-reading table function",
        who: Eu,
        sql: "SELECT * FROM read_parquet('hrdata/employees.parquet')",
        expect: Error(Code::InvalidArgument, "read_parquet"),
    },
    Case {
        name: "file path as a table",
        who: Eu,
        sql: "SELECT * FROM 'hrdata/employees.parquet'",
        expect: Error(Code::InvalidArgument, "looks like a file"),
    },
    Case {
        name: "information_schema is refused",
        who: Eu,
        sql: "SELECT * FROM information_schema.columns",
        expect: Error(Code::InvalidArgument, "information_schema is not available"),
    },
    Case {
        name: "a column named in the wrong case",
        who: Eu,
        sql: "SELECT \"NAME\" FROM hr.employees",
        expect: Error(Code::InvalidArgument, "Column names are case sensitive"),
    },
    // EXPLAIN.
    Case {
        name: "EXPLAIN stops at the barrier",
        who: Eu,
        sql: "EXPLAIN SELECT * FROM hr.employees WHERE 10 / divisor > 0",
        expect: Text(
            &["PolicyExec: product=hr.employees"],
            &[
                "DataSourceExec",
                "salary < 450",
                "employees.parquet",
                "hr_admin",
                "region = ",
            ],
        ),
    },
    Case {
        name: "EXPLAIN ANALYZE shows no hidden counts",
        who: Eu,
        sql: "EXPLAIN ANALYZE SELECT * FROM hr.employees",
        expect: Text(
            &["PolicyExec: product=hr.employees, metrics=[output_rows=2"],
            &[
                "output_rows=5",
                "output_rows=4",
                "row_groups",
                "bytes_scanned",
                "DataSourceExec",
            ],
        ),
    },
];

async fn client_for(server: &TestServer, who: Who) -> TestClient {
    match who {
        Eu => {
            server
                .as_identity("erin", &["analyst"], &[("region", "EU")])
                .await
        }
        QuoteInjection => {
            server
                .as_identity("q", &["analyst"], &[("region", "EU' OR '1'='1")])
                .await
        }
        SemicolonInjection => {
            server
                .as_identity(
                    "s",
                    &["analyst"],
                    &[("region", "EU'; DROP TABLE hr.employees; --")],
                )
                .await
        }
        ExpressionInjection => {
            server
                .as_identity("x", &["analyst"], &[("region", "region")])
                .await
        }
        WrongCaseGroup => {
            server
                .as_identity("w", &["Analyst"], &[("region", "EU")])
                .await
        }
        PrefixGroup => {
            server
                .as_identity("p", &["analyst-revoked"], &[("region", "EU")])
                .await
        }
    }
}

#[tokio::test]
async fn adversarial_queries_have_exact_outcomes() {
    assert!(CASES.len() >= 40, "{} cases", CASES.len());
    let server = hr_server().await;
    let mut failures = Vec::new();
    for case in CASES {
        let mut client = client_for(&server, case.who).await;
        let outcome = client.query(case.sql).await;
        let problem = match (&case.expect, outcome) {
            (Rows(expected), Ok(batches)) => {
                let actual = pretty(&batches);
                (actual.trim() != expected.trim())
                    .then(|| format!("expected\n{expected}\ngot\n{actual}"))
            }
            (Error(code, text), Err(status)) => (status.code() != *code
                || !status.message().contains(text))
            .then(|| format!("expected {code:?} containing {text:?}, got {status:?}")),
            (Text(present, absent), Ok(batches)) => {
                let actual = pretty(&batches);
                let missing: Vec<_> = present.iter().filter(|p| !actual.contains(*p)).collect();
                let leaked: Vec<_> = absent.iter().filter(|a| actual.contains(*a)).collect();
                (!missing.is_empty() || !leaked.is_empty())
                    .then(|| format!("missing {missing:?}, leaked {leaked:?} in\n{actual}"))
            }
            (_, Ok(batches)) => Some(format!("expected an error, got\n{}", pretty(&batches))),
            (_, Err(status)) => Some(format!("unexpected error {status:?}")),
        };
        if let Some(problem) = problem {
            failures.push(format!("{} ({}): {problem}", case.name, case.sql));
        }
    }
    // The data is untouched by all of the above.
    let mut admin = server.as_identity("hana", &["hr", "hr_admin"], &[]).await;
    assert_eq!(
        crate::fixture::row_count(&admin.query("SELECT * FROM hr.employees").await.unwrap()),
        4
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n\n")
    );
    server.stop().await;
}

#[tokio::test]
async fn prepared_parameters_reach_only_visible_rows() {
    let server = hr_server().await;
    let mut eu = client_for(&server, Eu).await;
    let prepared = crate::flight_sql::create_prepared(
        &mut eu,
        "SELECT name FROM hr.employees WHERE id = ? OR name = ?",
    )
    .await
    .unwrap();
    let cases: [(i64, &str, &str); 3] = [
        (1, "nobody", "Ann"),
        (3, "Dee", ""),
        (0, "x' OR '1'='1", ""),
    ];
    for (id, name, expected) in cases {
        let parameters = arrow::array::RecordBatch::try_new(
            std::sync::Arc::new(arrow::datatypes::Schema::new(vec![
                arrow::datatypes::Field::new("0", arrow::datatypes::DataType::Int64, true),
                arrow::datatypes::Field::new("1", arrow::datatypes::DataType::Utf8, true),
            ])),
            vec![
                std::sync::Arc::new(arrow::array::Int64Array::from(vec![id])),
                std::sync::Arc::new(arrow::array::StringArray::from(vec![name])),
            ],
        )
        .unwrap();
        let handle = crate::flight_sql::bind(
            &mut eu,
            prepared.prepared_statement_handle.clone(),
            parameters,
        )
        .await
        .unwrap();
        let command = arrow_flight::sql::CommandPreparedStatementQuery {
            prepared_statement_handle: handle,
        };
        let (_, batches) = eu.command(command.as_any()).await.unwrap();
        let text = pretty(&batches);
        if expected.is_empty() {
            assert_eq!(
                crate::fixture::row_count(&batches),
                0,
                "{id} {name}: {text}"
            );
        } else {
            assert!(text.contains(expected), "{id} {name}: {text}");
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn metadata_rpcs_omit_invisible_products_and_denied_columns() {
    let server = hr_server().await;
    for (who, expect_employees) in [(Eu, true), (WrongCaseGroup, false), (PrefixGroup, false)] {
        let mut client = client_for(&server, who).await;
        let command = CommandGetTables {
            catalog: None,
            db_schema_filter_pattern: Some("hr".into()),
            table_name_filter_pattern: None,
            table_types: vec![],
            include_schema: true,
        };
        let (_, batches) = client.command(command.as_any()).await.unwrap();
        let text = pretty(&batches);
        assert!(!text.contains("salaries_secret"), "{text}");
        assert_eq!(text.contains("| employees "), expect_employees, "{text}");
        if expect_employees {
            use arrow::array::{Array, AsArray};
            let schemas = batches[0]
                .column_by_name("table_schema")
                .unwrap()
                .as_binary::<i32>();
            for index in 0..schemas.len() {
                let schema =
                    arrow::ipc::convert::try_schema_from_ipc_buffer(schemas.value(index)).unwrap();
                assert!(schema.field_with_name("ssn").is_err(), "{schema:?}");
            }
        }
    }
    server.stop().await;
}
