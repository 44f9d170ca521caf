//! TLS: the Flight endpoint over TLS and mutual TLS, a central gateway
//! reaching a domain gateway over `grpc+tls://`, and PostgreSQL over TLS
//! with the server's certificate verified. Certificates are made with
//! `openssl` for each test.

use std::path::{Path, PathBuf};
use std::process::Command;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::fixture::{TestClient, TestServer, rows};

/// A CA, a server certificate for localhost / 127.0.0.1 and a client
/// certificate, all signed by the CA, in `dir`.
pub(crate) struct Certs {
    pub(crate) ca: PathBuf,
    pub(crate) server_cert: PathBuf,
    pub(crate) server_key: PathBuf,
    pub(crate) client_cert: PathBuf,
    pub(crate) client_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

pub(crate) fn make_certs(dir: &Path) -> Certs {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=meshgate test CA",
        ],
    );
    for (name, cn, ext) in [
        (
            "server",
            "localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ),
        ("client", "alice", "extendedKeyUsage=clientAuth"),
    ] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    }
    Certs {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    }
}

fn with_tls(dir: &Path, certs: &Certs, mutual: bool) {
    let gateway = dir.join("meshgate.toml");
    let text = std::fs::read_to_string(&gateway).unwrap();
    let mut tls = format!(
        "[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        certs.server_cert.display(),
        certs.server_key.display()
    );
    if mutual {
        tls.push_str(&format!("client_ca_file = \"{}\"\n", certs.ca.display()));
    }
    // The table goes right after [server]'s keys.
    let text = text.replacen("\n[auth]", &format!("\n{tls}\n[auth]"), 1);
    std::fs::write(gateway, text).unwrap();
}

async fn tls_client(
    server: &TestServer,
    certs: &Certs,
    client_cert: bool,
) -> Result<TestClient, String> {
    let mut config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&certs.ca).unwrap()))
        .domain_name("localhost");
    if client_cert {
        config = config.identity(Identity::from_pem(
            std::fs::read(&certs.client_cert).unwrap(),
            std::fs::read(&certs.client_key).unwrap(),
        ));
    }
    let channel = Channel::from_shared(format!("https://localhost:{}", server.addr.port()))
        .unwrap()
        .tls_config(config)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(TestClient {
        inner: arrow_flight::flight_service_client::FlightServiceClient::new(channel),
        authorization: None,
    })
}

async fn login(client: &mut TestClient, user: &str) -> Result<(), String> {
    let token = client
        .handshake_basic(user, &format!("{user}-demo"))
        .await
        .map_err(|e| format!("{e:?}"))?;
    client.authorization = Some(format!("Bearer {token}"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flight_endpoint_serves_tls_and_mutual_tls() {
    let scratch = tempfile::tempdir().unwrap();
    let certs = make_certs(scratch.path());

    let server = TestServer::start_with(|dir| with_tls(dir, &certs, false)).await;
    let mut client = tls_client(&server, &certs, false).await.unwrap();
    login(&mut client, "alice").await.unwrap();
    let nations = rows(&mut client, "SELECT count(*) AS n FROM crm.nation").await;
    assert!(nations.contains("25"), "{nations}");
    // Plain gRPC is not answered.
    if let Ok(channel) = Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
    {
        let mut plain = TestClient {
            inner: arrow_flight::flight_service_client::FlightServiceClient::new(channel),
            authorization: None,
        };
        assert!(plain.handshake_basic("alice", "alice-demo").await.is_err());
    }
    server.stop().await;

    let server = TestServer::start_with(|dir| with_tls(dir, &certs, true)).await;
    // Without a client certificate the TLS handshake fails.
    let refused = match tls_client(&server, &certs, false).await {
        Err(_) => true,
        Ok(mut client) => login(&mut client, "alice").await.is_err(),
    };
    assert!(refused, "a client without a certificate was served");
    let mut client = tls_client(&server, &certs, true).await.unwrap();
    login(&mut client, "alice").await.unwrap();
    let nations = rows(&mut client, "SELECT count(*) AS n FROM crm.nation").await;
    assert!(nations.contains("25"), "{nations}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_central_gateway_reaches_a_domain_gateway_over_tls() {
    let scratch = tempfile::tempdir().unwrap();
    let certs = make_certs(scratch.path());
    let domain = TestServer::start_with(|dir| with_tls(dir, &certs, false)).await;
    let port = domain.addr.port();
    let ca = certs.ca.clone();
    let central = TestServer::start_with(move |dir| {
        let remote = crate::federation::remote_crm_domain(&format!(
            "url = \"grpc+tls://localhost:{port}\"\nca_file = \"{}\"",
            ca.display()
        ));
        std::fs::write(dir.join("domains/remote.toml"), remote).unwrap();
    })
    .await;
    let mut alice = central.login("alice").await;
    let regions = rows(&mut alice, "SELECT DISTINCT c_region FROM remote.customer").await;
    assert!(
        regions.contains("EUROPE") && regions.lines().count() == 5,
        "{regions}"
    );
    central.stop().await;
    domain.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_verifies_the_server_certificate() {
    let scratch = tempfile::tempdir().unwrap();
    let certs = make_certs(scratch.path());
    let pg = crate::pg::Postgres::start();
    pg.execute("CREATE TABLE accounts (id bigint, owner text); INSERT INTO accounts VALUES (1, 'ann'), (2, 'bob');")
        .await;
    // From now on the server takes TLS connections only.
    pg.require_tls(&certs.server_cert, &certs.server_key);

    let domain = |url: &str, ca: Option<&Path>| {
        let ca = ca
            .map(|p| format!("ca_file = \"{}\"\n", p.display()))
            .unwrap_or_default();
        format!(
            "name = \"bank\"\nowner = \"bank@acme.example\"\n\n[storage.pg]\ntype = \"postgres\"\nurl = \"{url}\"\nconnect_timeout = \"2s\"\n{ca}\n[[products]]\nname = \"accounts\"\nstorage = \"pg\"\ntable = \"public.accounts\"\n"
        )
    };
    let url = format!("{}?sslmode=require", pg.url());
    let ca = certs.ca.clone();
    let text = domain(&url, Some(&ca));
    let server = TestServer::start_with(move |dir| {
        std::fs::write(dir.join("domains/bank.toml"), text).unwrap();
    })
    .await;
    let mut carol = server.login("carol").await;
    let owners = rows(&mut carol, "SELECT owner FROM bank.accounts ORDER BY id").await;
    assert!(owners.contains("ann") && owners.contains("bob"), "{owners}");
    server.stop().await;

    // Without TLS, or trusting no CA that signed the server, nothing is read.
    for (url, ca) in [
        (pg.url(), None),
        (url.clone(), Some(certs.client_cert.clone())),
    ] {
        let dir = crate::fixture::demo_config_dir();
        std::fs::write(
            dir.path().join("domains/bank.toml"),
            domain(&url, ca.as_deref()),
        )
        .unwrap();
        let config = meshgate::config::MeshConfig::load(&dir.path().join("meshgate.toml")).unwrap();
        let gateway = meshgate::server::Gateway::open(config).await.unwrap();
        let problems: Vec<String> = gateway.problems.iter().map(|p| p.to_string()).collect();
        assert!(
            problems.iter().any(|p| p.contains("bank.accounts")),
            "{url}: {problems:#?}"
        );
    }
}
