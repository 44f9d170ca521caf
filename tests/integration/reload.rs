//! Config reload: a valid config replaces catalog, policies and users at
//! once; a broken one is rejected and the running config stays; queries in
//! flight finish on the config they started with.

use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::sql::{CommandStatementQuery, ProstMessageExt};
use futures::TryStreamExt;
use tonic::Code;

use crate::fixture::{TestServer, assert_status, edit, row_count};

const CUSTOMERS: &str = "SELECT c_custkey, c_region FROM crm.customer";

#[tokio::test]
async fn a_broken_reload_keeps_the_running_config() {
    let server = TestServer::start().await;
    let mut alice = server.login("alice").await;
    let before = row_count(&alice.query(CUSTOMERS).await.unwrap());
    assert!(before > 0);
    let gateway_file = server.dir.path().join("meshgate.toml");
    let crm = server.dir.path().join("domains/crm.toml");
    let good_gateway = std::fs::read_to_string(&gateway_file).unwrap();
    let good_crm = std::fs::read_to_string(&crm).unwrap();

    // Each broken edit would, if applied, lock alice out: its rejection is
    // what keeps her answer the same.
    let broken: [(&std::path::Path, &str, &str, &str); 3] = [
        (
            &gateway_file,
            "[limits]",
            "[[auth.users]\nname = \"alice\"\n[limits]",
            "meshgate.toml",
        ),
        (
            &crm,
            "access = \"has_group('analyst') OR has_group('crm')\"",
            "access = \"has_group('crm')",
            "crm.toml",
        ),
        (
            &gateway_file,
            "keys/jwks.json",
            "keys/no-such-jwks.json",
            "no-such-jwks.json",
        ),
    ];
    for (file, from, to, named) in broken {
        edit(file, from, to);
        let error = server.gateway.reload().await.unwrap_err().to_string();
        assert!(error.contains(named), "{error}");
        assert_eq!(
            row_count(&alice.query(CUSTOMERS).await.unwrap()),
            before,
            "after the rejected reload ({error})"
        );
        std::fs::write(&gateway_file, &good_gateway).unwrap();
        std::fs::write(&crm, &good_crm).unwrap();
    }

    // A config whose every product fails to open (here: the data is gone)
    // would empty the mesh: rejected too.
    let data = server.dir.path().join("data");
    let target = std::fs::read_link(&data).unwrap();
    std::fs::remove_file(&data).unwrap();
    let error = server.gateway.reload().await.unwrap_err().to_string();
    assert!(error.contains("publishes no product"), "{error}");
    std::os::unix::fs::symlink(target, &data).unwrap();
    assert_eq!(row_count(&alice.query(CUSTOMERS).await.unwrap()), before);

    // A policy that no longer compiles fails closed: its product is
    // withdrawn (never served with the old or without a policy), the rest
    // of the mesh takes the new config.
    edit(
        &crm,
        "OR has_group('crm')\"\nrow_filter",
        "OR\"\nrow_filter",
    );
    let reloaded = server.gateway.reload().await.unwrap();
    let problems: Vec<String> = reloaded.problems.iter().map(ToString::to_string).collect();
    assert!(
        problems[0].starts_with("crm.customer") && problems[0].contains("does not compile"),
        "{problems:?}"
    );
    // The views over it go with it.
    assert!(
        problems[1..]
            .iter()
            .all(|p| p.contains("reads `crm.customer`")),
        "{problems:?}"
    );
    let error = alice.query(CUSTOMERS).await.unwrap_err();
    assert_eq!(error.code(), Code::NotFound, "{error}");
    assert!(alice.query("SELECT * FROM crm.nation").await.is_ok());
    server.stop().await;
}

#[tokio::test]
async fn a_reload_that_revokes_access_denies_the_next_query_and_running_ones_finish() {
    let server = TestServer::start().await;
    let mut alice = server.login("alice").await;
    let mut bob = server.login("bob").await;
    let alice_rows = row_count(&alice.query(CUSTOMERS).await.unwrap());
    assert!(alice_rows > 0);

    // A query of alice's is running (executed, nothing read yet) when the
    // crm team withdraws the analysts' access.
    let info = alice
        .flight_info(
            CommandStatementQuery {
                query: CUSTOMERS.into(),
                transaction_id: None,
            }
            .as_any(),
        )
        .await
        .unwrap();
    let request = alice.request(info.endpoint[0].ticket.clone().unwrap());
    let running = alice.inner.do_get(request).await.unwrap().into_inner();

    edit(
        &server.dir.path().join("domains/crm.toml"),
        "access = \"has_group('analyst') OR has_group('crm')\"",
        "access = \"has_group('crm')\"",
    );
    let reloaded = server.gateway.reload().await.unwrap();
    assert!(reloaded.problems.is_empty(), "{:?}", reloaded.problems);

    // The running query finishes on the config it started with.
    let batches: Vec<_> = FlightRecordBatchStream::new_from_flight_data(
        running.map_err(|e| arrow_flight::error::FlightError::Tonic(Box::new(e))),
    )
    .try_collect()
    .await
    .unwrap();
    assert_eq!(row_count(&batches), alice_rows);

    // The next query, with the same token, does not see the product.
    for client in [&mut alice, &mut bob] {
        let error = client.query(CUSTOMERS).await.unwrap_err();
        assert_status(&error, Code::NotFound, "crm.customer");
    }
    // Other products are still served, and the crm team still reads it.
    assert!(alice.query("SELECT * FROM crm.nation").await.is_ok());
    let mut carol = server.login("carol").await;
    assert!(row_count(&carol.query(CUSTOMERS).await.unwrap()) > alice_rows);
    server.stop().await;
}

#[tokio::test]
async fn a_reload_that_removes_a_user_or_a_group_applies_to_tokens_already_issued() {
    let server = TestServer::start().await;
    let mut alice = server.login("alice").await;
    let mut bob = server.login("bob").await;
    assert!(alice.query(CUSTOMERS).await.is_ok());
    assert!(bob.query(CUSTOMERS).await.is_ok());

    // alice leaves the company; bob leaves the analysts.
    let gateway_file = server.dir.path().join("meshgate.toml");
    let text = std::fs::read_to_string(&gateway_file).unwrap();
    let start = text.find("[[auth.users]]\nname = \"alice\"").unwrap();
    let end = start + 1 + text[start + 1..].find("[[auth.users]]").unwrap();
    let text = format!("{}{}", &text[..start], &text[end..]);
    let text = text.replace(
        "groups = [\"analyst\", \"pii_reader\"]",
        "groups = [\"pii_reader\"]",
    );
    std::fs::write(&gateway_file, text).unwrap();
    server.gateway.reload().await.unwrap();

    let error = alice.query(CUSTOMERS).await.unwrap_err();
    assert_status(&error, Code::Unauthenticated, "alice");
    let error = bob.query(CUSTOMERS).await.unwrap_err();
    assert_eq!(error.code(), Code::NotFound, "{error}");
    assert!(
        server
            .client()
            .await
            .handshake_basic("alice", "alice-demo")
            .await
            .is_err()
    );
    // A token from an identity provider says who its holder is: untouched.
    let mut external = server
        .as_identity("alice", &["analyst"], &[("region", "EUROPE")])
        .await;
    assert!(external.query(CUSTOMERS).await.is_ok());
    server.stop().await;
}
