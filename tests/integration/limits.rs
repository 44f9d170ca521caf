//! Statements built to exhaust the stack (long operator chains, deep
//! nesting) are refused or answered; the server never goes down.

use tonic::Code;

use crate::fixture::{TestServer, pretty};

#[test]
fn deep_and_long_expressions_never_take_the_server_down() {
    // The production runtime (deep worker stacks), as `meshgate serve` uses.
    let runtime = meshgate::server::runtime_builder().build().unwrap();
    runtime.block_on(async {
        let server = TestServer::start().await;
        let mut client = server.unrestricted().await;

        // Just under the limit: answered.
        let sum = format!("SELECT {} AS n", vec!["1"; 1000].join(" + "));
        let rows = client.query(&sum).await.unwrap();
        assert!(pretty(&rows).contains("| 1000 |"), "{}", pretty(&rows));
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
            assert_eq!(error.code(), Code::InvalidArgument, "{error:?}");
            assert!(error.message().contains(reason), "{}", error.message());
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
