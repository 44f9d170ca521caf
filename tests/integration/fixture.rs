//! One test server per test: the demo mesh (at a small scale, generated once
//! per target directory) on port 0, and a raw Flight client that returns
//! gRPC statuses as they are.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::sql::{Any, CommandStatementQuery, ProstMessageExt};
use arrow_flight::{Action, FlightDescriptor, FlightInfo, HandshakeRequest, Ticket};
use base64::Engine;
use futures::TryStreamExt;
use meshgate::config::MeshConfig;
use meshgate::server::Gateway;
use prost::Message;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::{Request, Status};

pub(crate) const SECRET: &str = "integration-test-secret-0123456789";
pub(crate) const SCALE: f64 = 0.01;

/// The demo data at [`SCALE`], generated once and shared by every test.
pub(crate) fn demo_data() -> PathBuf {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let dir = base.join(format!("meshgate-demo-sf{SCALE}"));
    if meshgate::demo::data_marker(&dir, SCALE).exists() {
        return dir;
    }
    // Generate aside and move into place, so parallel test processes never
    // see a half-written directory.
    let scratch = base.join(format!("meshgate-demo-scratch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    meshgate::demo::ensure_demo_data(&scratch, SCALE).expect("generate demo data");
    if meshgate::demo::data_marker(&dir, SCALE).exists() {
        let _ = std::fs::remove_dir_all(&scratch);
    } else {
        let _ = std::fs::remove_dir_all(&dir);
        if std::fs::rename(&scratch, &dir).is_err() {
            let _ = std::fs::remove_dir_all(&scratch);
        }
    }
    assert!(meshgate::demo::data_marker(&dir, SCALE).exists());
    dir
}

/// A directory holding the demo config and (a link to) the demo data.
pub(crate) fn demo_config_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    meshgate::demo::write_demo_config(dir.path()).unwrap();
    std::os::unix::fs::symlink(demo_data().join("data"), dir.path().join("data")).unwrap();
    dir
}

/// When a file was last modified, in UNIX seconds.
pub(crate) fn modified_seconds(path: &Path) -> f64 {
    std::fs::metadata(path)
        .unwrap()
        .modified()
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Replaces text in a config file.
pub(crate) fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} has no {from:?}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

/// A running gateway over the demo mesh.
pub(crate) struct TestServer {
    pub(crate) addr: std::net::SocketAddr,
    /// The config directory, removed when the server is dropped.
    pub(crate) dir: tempfile::TempDir,
    pub(crate) gateway: Arc<Gateway>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    /// The demo mesh with the test secret and the test JWKS.
    pub(crate) async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// As [`TestServer::start`], after `customize` has edited the config dir.
    pub(crate) async fn start_with(customize: impl FnOnce(&Path)) -> Self {
        let dir = demo_config_dir();
        let keys = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/keys/jwks.json");
        let gateway_file = dir.path().join("meshgate.toml");
        let text = std::fs::read_to_string(&gateway_file).unwrap().replace(
            "hs256_secret = \"${MESHGATE_JWT_SECRET:-meshgate-demo-secret-do-not-use-in-production}\"",
            &format!("hs256_secret = \"{SECRET}\"\njwks_file = \"{}\"", keys.display()),
        );
        let text = text.replace("output = \"stdout\"", "output = \"audit.jsonl\"");
        std::fs::write(&gateway_file, text).unwrap();
        customize(dir.path());

        let config = MeshConfig::load(&gateway_file).expect("test config loads");
        let gateway = Arc::new(Gateway::open(config).await.expect("gateway opens"));
        assert!(gateway.problems.is_empty(), "{:?}", gateway.problems);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, signal) = oneshot::channel::<()>();
        let serving = Arc::clone(&gateway);
        let task = tokio::spawn(async move {
            serving
                .serve(listener, async {
                    let _ = signal.await;
                })
                .await
                .expect("server runs");
        });
        Self {
            addr,
            dir,
            gateway,
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    pub(crate) async fn client(&self) -> TestClient {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        TestClient {
            inner: FlightServiceClient::new(channel),
            authorization: None,
        }
    }

    /// A client logged in as a demo user through Handshake.
    pub(crate) async fn login(&self, user: &str) -> TestClient {
        let mut client = self.client().await;
        let token = client
            .handshake_basic(user, &format!("{user}-demo"))
            .await
            .expect("demo user logs in");
        client.authorization = Some(format!("Bearer {token}"));
        client
    }

    /// A client holding a token minted for any identity.
    pub(crate) async fn as_identity(
        &self,
        user: &str,
        groups: &[&str],
        attributes: &[(&str, &str)],
    ) -> TestClient {
        let identity = meshgate::auth::CallerIdentity {
            user: user.to_string(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            attributes: attributes
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let token = self.gateway.authenticator.mint(&identity).unwrap();
        self.client().await.with_token(&token)
    }

    /// A caller whom no demo policy restricts.
    pub(crate) async fn unrestricted(&self) -> TestClient {
        self.as_identity(
            "root",
            &["analyst", "crm", "compliance", "pii_reader", "supply"],
            &[],
        )
        .await
    }

    /// The audit records written so far.
    pub(crate) fn audit_records(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.dir.path().join("audit.jsonl")).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Serves the HTTP endpoint on a free port until the returned handle
    /// is stopped.
    pub(crate) async fn serve_http(&self) -> HttpEndpoint {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gateway = Arc::clone(&self.gateway);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            gateway
                .serve_http(listener, async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        HttpEndpoint { addr, stop, task }
    }

    pub(crate) async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

/// A running HTTP endpoint of a test server.
pub(crate) struct HttpEndpoint {
    pub(crate) addr: std::net::SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpEndpoint {
    /// `GET path` with an optional `Authorization` header: status and body.
    pub(crate) async fn get(&self, path: &str, authorization: Option<&str>) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let auth = authorization
            .map(|a| format!("Authorization: {a}\r\n"))
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

    pub(crate) async fn stop(self) {
        self.stop.send(()).unwrap();
        self.task.await.unwrap();
    }
}

/// A Flight client that shows statuses as the server sent them.
pub(crate) struct TestClient {
    pub(crate) inner: FlightServiceClient<Channel>,
    /// The `authorization` header sent with each call.
    pub(crate) authorization: Option<String>,
}

impl TestClient {
    pub(crate) fn with_token(mut self, token: &str) -> Self {
        self.authorization = Some(format!("Bearer {token}"));
        self
    }

    pub(crate) fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.parse().unwrap());
        }
        request
    }

    /// Handshake with Basic credentials (unpadded base64, as ADBC sends them).
    pub(crate) async fn handshake_basic(
        &mut self,
        user: &str,
        password: &str,
    ) -> Result<String, Status> {
        let encoded =
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(format!("{user}:{password}"));
        let mut request = Request::new(futures::stream::iter([HandshakeRequest::default()]));
        request
            .metadata_mut()
            .insert("authorization", format!("Basic {encoded}").parse().unwrap());
        let response = self.inner.handshake(request).await?;
        let header = response
            .metadata()
            .get("authorization")
            .expect("handshake answers with an authorization header")
            .to_str()
            .unwrap()
            .to_string();
        let mut stream = response.into_inner();
        let message = stream.message().await?.expect("one handshake response");
        let token = header
            .strip_prefix("Bearer ")
            .expect("a bearer token")
            .to_string();
        assert_eq!(message.payload, token.as_bytes());
        Ok(token)
    }

    pub(crate) async fn flight_info(&mut self, command: Any) -> Result<FlightInfo, Status> {
        let descriptor = FlightDescriptor::new_cmd(command.encode_to_vec());
        let request = self.request(descriptor);
        Ok(self.inner.get_flight_info(request).await?.into_inner())
    }

    pub(crate) async fn fetch(&mut self, ticket: Ticket) -> Result<Vec<RecordBatch>, Status> {
        let request = self.request(ticket);
        let stream = self.inner.do_get(request).await?.into_inner();
        FlightRecordBatchStream::new_from_flight_data(stream.map_err(Into::into))
            .try_collect()
            .await
            .map_err(|e| match e {
                arrow_flight::error::FlightError::Tonic(status) => *status,
                other => Status::internal(other.to_string()),
            })
    }

    /// GetFlightInfo then DoGet of endpoint 0; checks the schemas agree.
    pub(crate) async fn command(
        &mut self,
        command: Any,
    ) -> Result<(FlightInfo, Vec<RecordBatch>), Status> {
        let info = self.flight_info(command).await?;
        assert_eq!(info.endpoint.len(), 1, "one endpoint per query");
        assert!(info.endpoint[0].location.is_empty(), "no locations to dial");
        let ticket = info.endpoint[0].ticket.clone().expect("a ticket");
        let batches = self.fetch(ticket).await?;
        let schema = info.clone().try_decode_schema().unwrap();
        for batch in &batches {
            assert_eq!(
                batch.schema().as_ref(),
                &schema,
                "DoGet schema equals FlightInfo schema"
            );
            assert!(batch.num_rows() > 0, "no empty batches mid-stream");
        }
        Ok((info, batches))
    }

    pub(crate) async fn query(&mut self, sql: &str) -> Result<Vec<RecordBatch>, Status> {
        Ok(self.command(statement(sql)).await?.1)
    }

    pub(crate) async fn action(
        &mut self,
        kind: &str,
        body: Vec<u8>,
    ) -> Result<Vec<bytes::Bytes>, Status> {
        let request = self.request(Action::new(kind, body));
        let stream = self.inner.do_action(request).await?.into_inner();
        let results: Vec<arrow_flight::Result> = stream.try_collect().await?;
        Ok(results.into_iter().map(|r| r.body).collect())
    }
}

/// Pretty-printed rows, for comparing results as tables.
/// The query's rows, pretty-printed; a failure fails the test, naming the SQL.
pub(crate) async fn rows(client: &mut TestClient, sql: &str) -> String {
    match client.query(sql).await {
        Ok(batches) => pretty(&batches),
        Err(status) => panic!("{sql}: {status:?}"),
    }
}

pub(crate) fn pretty(batches: &[RecordBatch]) -> String {
    arrow::util::pretty::pretty_format_batches(batches)
        .unwrap()
        .to_string()
}

/// A statement query, as the command of a FlightDescriptor.
pub(crate) fn statement(sql: &str) -> Any {
    CommandStatementQuery {
        query: sql.into(),
        transaction_id: None,
    }
    .as_any()
}

/// Asserts that `status` has `code` and a message containing `text`.
#[track_caller]
pub(crate) fn assert_status(status: &Status, code: tonic::Code, text: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(text), "{status:?}");
}

pub(crate) fn row_count(batches: &[RecordBatch]) -> usize {
    batches.iter().map(RecordBatch::num_rows).sum()
}
