//! The catalog API over gRPC (a client generated from the proto) and over
//! HTTP JSON: each caller sees the products, columns and masks their
//! policies give them, with owners, lineage and freshness.

use std::sync::Arc;

use meshgate::api::proto;
use meshgate::api::proto::catalog_service_client::CatalogServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    let modified = std::fs::metadata(server.dir.path().join("data/crm/customer.parquet"))
        .unwrap()
        .modified()
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
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

async fn http_get(addr: std::net::SocketAddr, path: &str, bearer: Option<&str>) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = bearer
        .map(|b| format!("Authorization: {b}\r\n"))
        .unwrap_or_default();
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: meshgate\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

#[tokio::test]
async fn the_http_json_api_answers_what_the_grpc_api_answers() {
    let server = TestServer::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let gateway = Arc::clone(&server.gateway);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let http = tokio::spawn(async move {
        gateway
            .serve_http(listener, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });

    for user in ["alice", "dave"] {
        let (mut grpc, bearer) = catalog(&server, user).await;
        let listed = grpc
            .list_products(proto::ListProductsRequest::default())
            .await
            .unwrap()
            .into_inner();
        let (status, body) = http_get(addr, "/api/v1/products", Some(&bearer)).await;
        assert_eq!(status, 200, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json, serde_json::to_value(&listed).unwrap());

        let domains = grpc
            .list_domains(proto::ListDomainsRequest {})
            .await
            .unwrap()
            .into_inner();
        let (_, body) = http_get(addr, "/api/v1/domains", Some(&bearer)).await;
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json, serde_json::to_value(&domains).unwrap());
    }

    let (mut alice, bearer) = catalog(&server, "alice").await;
    for name in ["crm.customer", "sales.revenue_by_nation"] {
        let one = product(&mut alice, name).await.unwrap();
        let (status, body) =
            http_get(addr, &format!("/api/v1/products/{name}"), Some(&bearer)).await;
        assert_eq!(status, 200, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json, serde_json::to_value(&one).unwrap());
    }
    let (status, body) = http_get(
        addr,
        "/api/v1/products?domain=crm&search=nation",
        Some(&bearer),
    )
    .await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["products"].as_array().unwrap().len(), 1, "{json}");
    assert_eq!(json["products"][0]["name"], "crm.nation");

    let (status, body) = http_get(addr, "/api/v1/products", None).await;
    assert_eq!(status, 401, "{body}");
    let (mut dave, dave_bearer) = catalog(&server, "dave").await;
    assert!(product(&mut dave, "crm.customer").await.is_err());
    let (status, _) = http_get(addr, "/api/v1/products/crm.customer", Some(&dave_bearer)).await;
    assert_eq!(status, 404);
    let (status, body) = http_get(addr, "/api/v1/products?colour=red", Some(&bearer)).await;
    assert_eq!(status, 400, "{body}");

    stop.send(()).unwrap();
    http.await.unwrap();
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
