//! The catalog API over gRPC (a client generated from the proto) and over
//! HTTP JSON: each caller sees the products, columns and masks their
//! policies give them, with owners, lineage and freshness.

use meshgate::api::proto;
use meshgate::api::proto::catalog_service_client::CatalogServiceClient;
use tonic::Code;
use tonic::service::Interceptor;
use tonic::transport::Channel;

use crate::fixture::TestServer;

#[derive(Clone)]
struct Bearer(String);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.parse().unwrap());
        Ok(request)
    }
}

type Client =
    CatalogServiceClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

/// A catalog client holding the token a demo user gets at login.
async fn catalog(server: &TestServer, user: &str) -> (Client, String) {
    let flight = server.login(user).await;
    let bearer = flight.authorization.clone().unwrap();
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (
        CatalogServiceClient::with_interceptor(channel, Bearer(bearer.clone())),
        bearer,
    )
}

async fn names(client: &mut Client, filter: proto::ListProductsRequest) -> Vec<String> {
    let listed = client.list_products(filter).await.unwrap().into_inner();
    listed.products.into_iter().map(|p| p.name).collect()
}

async fn product(client: &mut Client, name: &str) -> Result<proto::Product, tonic::Status> {
    client
        .get_product(proto::GetProductRequest { name: name.into() })
        .await
        .map(tonic::Response::into_inner)
}

fn column<'a>(product: &'a proto::Product, name: &str) -> Option<&'a proto::Column> {
    product.columns.iter().find(|c| c.name == name)
}

#[tokio::test]
async fn each_caller_sees_their_own_catalog() {
    let server = TestServer::start().await;
    let (mut alice, _) = catalog(&server, "alice").await;
    let (mut bob, _) = catalog(&server, "bob").await;
    let (mut carol, _) = catalog(&server, "carol").await;
    let (mut dave, _) = catalog(&server, "dave").await;

    // Listing: dave (supply) sees supply and the unrestricted reference
    // data, not customers or sales; carol (crm) sees no supply product.
    let all = proto::ListProductsRequest::default();
    let dave_sees = names(&mut dave, all.clone()).await;
    assert_eq!(
        dave_sees,
        [
            "crm.nation",
            "crm.region",
            "supply.part",
            "supply.partsupp",
            "supply.supplier"
        ]
    );
    let carol_sees = names(&mut carol, all.clone()).await;
    assert!(carol_sees.contains(&"crm.customer".to_string()));
    assert!(
        !carol_sees.iter().any(|n| n.starts_with("supply.")),
        "{carol_sees:?}"
    );
    let domains = dave
        .list_domains(proto::ListDomainsRequest {})
        .await
        .unwrap();
    let domains: Vec<_> = domains
        .into_inner()
        .domains
        .into_iter()
        .map(|d| d.name)
        .collect();
    assert_eq!(domains, ["crm", "supply"]);

    // Filters: domain, tag-free text search, owner.
    let crm = names(
        &mut alice,
        proto::ListProductsRequest {
            domain: "crm".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(crm, ["crm.customer", "crm.nation", "crm.region"]);
    let found = names(
        &mut alice,
        proto::ListProductsRequest {
            search: "REVENUE".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(found, ["sales.revenue_by_nation"]);
    let owned = names(
        &mut alice,
        proto::ListProductsRequest {
            owner: "sales-data@acme.example".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        owned,
        ["sales.lineitem", "sales.orders", "sales.revenue_by_nation"]
    );

    // One product as each caller sees it: denied columns absent, masks flagged.
    let as_alice = product(&mut alice, "crm.customer").await.unwrap();
    assert_eq!(as_alice.owner, "crm-data@acme.example");
    assert_eq!(as_alice.kind, "table");
    assert_eq!(as_alice.description, "One row per customer");
    assert!(column(&as_alice, "c_acctbal").is_none());
    let phone = column(&as_alice, "c_phone").unwrap();
    assert!(phone.masked && phone.tags == ["pii"], "{phone:?}");
    assert!(!column(&as_alice, "c_name").unwrap().masked);
    assert_eq!(
        column(&as_alice, "c_region").unwrap().description,
        "The region of the customer's nation"
    );
    let as_bob = product(&mut bob, "crm.customer").await.unwrap();
    assert!(!column(&as_bob, "c_phone").unwrap().masked);
    let as_carol = product(&mut carol, "crm.customer").await.unwrap();
    assert_eq!(
        column(&as_carol, "c_acctbal").unwrap().r#type,
        "Decimal128(15, 2)"
    );

    // A product a caller may not see does not exist for them.
    let hidden = product(&mut dave, "crm.customer").await.unwrap_err();
    let missing = product(&mut dave, "crm.nope").await.unwrap_err();
    assert_eq!(hidden.code(), Code::NotFound);
    assert_eq!(
        hidden.message().replace("customer", "nope"),
        missing.message()
    );

    // Freshness: the SLA and the file's modification time.
    let modified =
        crate::fixture::modified_seconds(&server.dir.path().join("data/crm/customer.parquet"));
    assert_eq!(as_alice.freshness_sla_seconds, 86400.0);
    assert!((as_alice.last_modified_seconds - modified).abs() < 0.01);

    // Lineage of a view product.
    let view = product(&mut alice, "sales.revenue_by_nation")
        .await
        .unwrap();
    assert_eq!(view.kind, "view");
    assert!(view.sql.contains("GROUP BY n.n_name"), "{}", view.sql);
    assert_eq!(view.reads, ["crm.customer", "crm.nation", "sales.orders"]);
    assert_eq!(view.last_modified_seconds, 0.0);
    server.stop().await;
}

#[tokio::test]
async fn explain_access_for_oneself_and_for_others_as_an_admin() {
    let server = TestServer::start().await;
    let (mut alice, _) = catalog(&server, "alice").await;
    let own = alice
        .explain_access(proto::ExplainAccessRequest {
            product: "crm.customer".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(own.user, "alice");
    assert!(own.visible);
    assert!(own.row_filter.contains("'EUROPE'"), "{}", own.row_filter);
    let access = |answer: &proto::ExplainAccessResponse, column: &str| {
        answer
            .columns
            .iter()
            .find(|c| c.name == column)
            .map(|c| c.access.clone())
    };
    assert_eq!(access(&own, "c_acctbal").as_deref(), Some("denied"));
    assert_eq!(access(&own, "c_phone").as_deref(), Some("masked"));

    let other = proto::ExplainAccessRequest {
        product: "crm.customer".into(),
        user: "carol".into(),
        ..Default::default()
    };
    let refused = alice.explain_access(other.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused}");

    // A member of an admin group explains anyone's access.
    let admin_token = server
        .gateway
        .authenticator
        .mint(&meshgate::auth::CallerIdentity {
            user: "ops".into(),
            groups: vec!["platform".into()],
            attributes: Default::default(),
        })
        .unwrap();
    let channel = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut admin =
        CatalogServiceClient::with_interceptor(channel, Bearer(format!("Bearer {admin_token}")));
    let carol = admin.explain_access(other).await.unwrap().into_inner();
    assert_eq!(carol.user, "carol");
    assert!(carol.visible && carol.row_filter.is_empty(), "{carol:?}");
    assert_eq!(access(&carol, "c_acctbal").as_deref(), Some("visible"));
    server.stop().await;
}

#[tokio::test]
async fn the_http_json_api_answers_what_the_grpc_api_answers() {
    let server = TestServer::start().await;
    let http = server.serve_http().await;

    for user in ["alice", "dave"] {
        let (mut grpc, bearer) = catalog(&server, user).await;
        let listed = grpc
            .list_products(proto::ListProductsRequest::default())
            .await
            .unwrap()
            .into_inner();
        let (status, body) = http.get("/api/v1/products", Some(&bearer)).await;
        assert_eq!(status, 200, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json, serde_json::to_value(&listed).unwrap());

        let domains = grpc
            .list_domains(proto::ListDomainsRequest {})
            .await
            .unwrap()
            .into_inner();
        let (_, body) = http.get("/api/v1/domains", Some(&bearer)).await;
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json, serde_json::to_value(&domains).unwrap());
    }

    let (mut alice, bearer) = catalog(&server, "alice").await;
    for name in ["crm.customer", "sales.revenue_by_nation"] {
        let one = product(&mut alice, name).await.unwrap();
        let (status, body) = http
            .get(&format!("/api/v1/products/{name}"), Some(&bearer))
            .await;
        assert_eq!(status, 200, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json, serde_json::to_value(&one).unwrap());
    }
    let (status, body) = http
        .get("/api/v1/products?domain=crm&search=nation", Some(&bearer))
        .await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["products"].as_array().unwrap().len(), 1, "{json}");
    assert_eq!(json["products"][0]["name"], "crm.nation");

    let (status, body) = http.get("/api/v1/products", None).await;
    assert_eq!(status, 401, "{body}");
    let (mut dave, dave_bearer) = catalog(&server, "dave").await;
    assert!(product(&mut dave, "crm.customer").await.is_err());
    let (status, _) = http
        .get("/api/v1/products/crm.customer", Some(&dave_bearer))
        .await;
    assert_eq!(status, 404);
    let (status, body) = http.get("/api/v1/products?colour=red", Some(&bearer)).await;
    assert_eq!(status, 400, "{body}");

    http.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn the_products_command_lists_through_the_api() {
    let server = TestServer::start().await;
    let endpoint = format!("grpc://{}", server.addr);
    let token = server
        .gateway
        .authenticator
        .mint_for_local_user("dave")
        .unwrap();
    let run = move |args: Vec<String>, stdin: &'static str| {
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_meshgate"))
                .arg("products")
                .args(args)
                .env_remove("MESHGATE_TOKEN")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(stdin.as_bytes())
                .unwrap();
            child.wait_with_output().unwrap()
        })
    };
    let output = run(
        vec![
            "--endpoint".into(),
            endpoint.clone(),
            "--token".into(),
            token,
        ],
        "",
    )
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("supply.part") && stdout.contains("supply-chain@acme.example"));
    assert!(!stdout.contains("crm.customer"), "{stdout}");
    assert!(stdout.contains("5 product(s)"), "{stdout}");

    // Logged in as alice (password on stdin), one domain.
    let output = run(
        vec![
            "--endpoint".into(),
            endpoint,
            "--user".into(),
            "alice".into(),
            "--domain".into(),
            "crm".into(),
        ],
        "alice-demo\n",
    )
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("crm.customer") && stdout.contains("[fresh within 24h]"),
        "{stdout}"
    );
    assert!(stdout.contains("3 product(s)"), "{stdout}");
    server.stop().await;
}

#[tokio::test]
async fn a_deprecated_version_warns_until_its_sunset_then_is_gone() {
    use arrow_flight::sql::{CommandStatementQuery, ProstMessageExt};
    use futures::StreamExt;

    let server = TestServer::start_with(|dir| {
        let sales = dir.join("domains/sales.toml");
        let text = std::fs::read_to_string(&sales).unwrap();
        let versions = r#"
[[products]]
name = "orders_v1"
description = "One row per order (version 1)"
version = "1.0.0"
storage = "lake"
location = "orders/"
format = "parquet"
sunset = "2099-12-31"
successor = "sales.orders"

[[products]]
name = "orders_v0"
description = "One row per order (version 0)"
storage = "lake"
location = "orders/"
format = "parquet"
sunset = "2001-01-01"
"#;
        std::fs::write(&sales, format!("{text}\n{versions}")).unwrap();
    })
    .await;
    let past: Vec<String> = server
        .gateway
        .warnings
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        past.iter()
            .any(|w| w.starts_with("sales.orders_v0") && w.contains("past its sunset (2001-01-01)")),
        "{past:?}"
    );

    let mut alice = server.login("alice").await;
    let current = crate::fixture::rows(&mut alice, "SELECT count(*) AS n FROM sales.orders").await;
    let sql = "SELECT count(*) AS n FROM sales.orders_v1";
    // The version is served, and the first message of its stream says it
    // is deprecated.
    let info = alice
        .flight_info(
            CommandStatementQuery {
                query: sql.into(),
                transaction_id: None,
            }
            .as_any(),
        )
        .await
        .unwrap();
    let request = alice.request(info.endpoint[0].ticket.clone().unwrap());
    let mut messages = alice.inner.do_get(request).await.unwrap().into_inner();
    let first = messages.next().await.unwrap().unwrap();
    let warning = String::from_utf8(first.app_metadata.to_vec()).unwrap();
    assert_eq!(
        warning,
        "warning: sales.orders_v1 is deprecated and served until 2099-12-31; read sales.orders instead"
    );
    while messages.next().await.is_some() {}
    assert_eq!(crate::fixture::rows(&mut alice, sql).await, current);
    let audited = server.audit_records();
    let record = audited.iter().rev().find(|r| r["sql"] == sql).unwrap();
    assert_eq!(
        record["warnings"][0],
        "sales.orders_v1 is deprecated and served until 2099-12-31; read sales.orders instead"
    );
    let plain = audited
        .iter()
        .find(|r| r["sql"] == "SELECT count(*) AS n FROM sales.orders")
        .unwrap();
    assert!(plain.get("warnings").is_none(), "{plain}");

    // Past its sunset, a version does not exist.
    let gone = alice
        .query("SELECT count(*) FROM sales.orders_v0")
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone}");

    let (mut catalog, _) = catalog(&server, "alice").await;
    let v1 = product(&mut catalog, "sales.orders_v1").await.unwrap();
    assert_eq!(
        (v1.sunset.as_str(), v1.successor.as_str()),
        ("2099-12-31", "sales.orders")
    );
    assert!(
        product(&mut catalog, "sales.orders")
            .await
            .unwrap()
            .sunset
            .is_empty()
    );
    assert_eq!(
        product(&mut catalog, "sales.orders_v0")
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let listed = names(&mut catalog, proto::ListProductsRequest::default()).await;
    assert!(listed.contains(&"sales.orders_v1".to_string()));
    assert!(!listed.contains(&"sales.orders_v0".to_string()));
    server.stop().await;
}
