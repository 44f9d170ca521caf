//! Remote Flight SQL sources: any Flight SQL server, another meshgate
//! included. With `forward_token`, each query carries the caller's own
//! bearer token, so the remote enforces its policies for that caller.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow_flight::sql::client::FlightSqlServiceClient;
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

use super::convert::conform;
use super::{Cause, Discovery, ForwardedToken, SourceError};
use crate::config::{FlightAuth, SourceOptions};

pub(super) struct FlightSource {
    channel: Channel,
    auth: FlightAuth,
}

impl FlightSource {
    pub(super) fn new(
        url: &str,
        options: &SourceOptions,
        auth: FlightAuth,
    ) -> Result<Self, String> {
        let address = if let Some(rest) = url
            .strip_prefix("grpc://")
            .or_else(|| url.strip_prefix("grpc+tcp://"))
        {
            format!("http://{rest}")
        } else if let Some(rest) = url.strip_prefix("grpc+tls://") {
            format!("https://{rest}")
        } else {
            url.to_string()
        };
        let tls = address.starts_with("https://");
        let mut endpoint = Endpoint::from_shared(address)
            .map_err(|e| format!("invalid Flight SQL URL `{url}`: {e}"))?
            .connect_timeout(options.connect_timeout)
            .tcp_nodelay(true);
        if tls {
            let config = match &options.ca_file {
                Some(path) => {
                    let pem = std::fs::read(path)
                        .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
                    tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(pem))
                }
                None => tonic::transport::ClientTlsConfig::new().with_native_roots(),
            };
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| format!("TLS to `{url}`: {e}"))?;
        }
        Ok(Self {
            channel: endpoint.connect_lazy(),
            auth,
        })
    }

    pub(super) async fn table_schema(&self, table: &[String]) -> Result<SchemaRef, Discovery> {
        if self.auth.forward_token && self.auth.token.is_none() && self.auth.username.is_none() {
            return Err(Discovery::Unreachable(
                "with `forward_token` and no credentials of its own, meshgate cannot discover the remote schema: declare the product's `columns`"
                    .into(),
            ));
        }
        let mut client = connect(self.channel.clone(), &self.auth, None)
            .await
            .map_err(Discovery::Refused)?;
        let sql = format!("SELECT * FROM {}", super::quoted_name(table));
        let info = client.execute(sql, None).await.map_err(|e| {
            let text = message(&e);
            if text.contains("Unavailable") || text.contains("transport error") {
                Discovery::Unreachable(text)
            } else {
                Discovery::Refused(text)
            }
        })?;
        let schema = info
            .try_decode_schema()
            .map_err(|e| Discovery::Refused(e.to_string()))?;
        Ok(Arc::new(schema))
    }

    pub(super) fn execute(
        &self,
        sql: String,
        schema: SchemaRef,
        context: String,
        token: Option<ForwardedToken>,
    ) -> SendableRecordBatchStream {
        let (tx, rx) = mpsc::channel(2);
        let task_schema = Arc::clone(&schema);
        let channel = self.channel.clone();
        let auth = self.auth.clone();
        let error_tx = tx.clone();
        // The client is built inside the task: a handshake is I/O.
        let fetch = async move {
            let mut client = connect(channel, &auth, token.as_ref()).await?;
            let info = client.execute(sql, None).await.map_err(|e| failure(&e))?;
            for endpoint in info.endpoint {
                let ticket = endpoint
                    .ticket
                    .ok_or("the remote sent an endpoint without a ticket")?;
                let mut stream = client.do_get(ticket).await.map_err(|e| failure(&e))?;
                loop {
                    let next = tokio::select! {
                        next = stream.next() => next,
                        () = tx.closed() => return Ok(()),
                    };
                    let Some(batch) = next else { break };
                    let batch = batch.map_err(|e| failure(&e))?;
                    let rows = batch.num_rows();
                    let batch = conform(&task_schema, batch.columns().to_vec(), rows)
                        .map_err(|e| e.to_string())?;
                    if tx.send(Ok(batch)).await.is_err() {
                        return Ok(());
                    }
                }
            }
            Ok::<(), Cause>(())
        };
        tokio::spawn(async move {
            if let Err(cause) = fetch.await {
                let error = SourceError { context, cause };
                let _ = error_tx.send(Err(error.into_datafusion())).await;
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Box::pin(RecordBatchStreamAdapter::new(schema, stream))
    }
}

/// A client on `channel`, authenticated as configured, or as the caller.
async fn connect(
    channel: Channel,
    auth: &FlightAuth,
    token: Option<&ForwardedToken>,
) -> Result<FlightSqlServiceClient<Channel>, String> {
    let mut client = FlightSqlServiceClient::new(channel);
    if auth.forward_token {
        let token = token.ok_or("the caller has no bearer token to forward")?;
        client.set_token(token.0.to_string());
    } else if let Some(token) = &auth.token {
        client.set_token(token.clone());
    } else if let (Some(user), Some(password)) = (&auth.username, &auth.password) {
        client
            .handshake(user, password)
            .await
            .map_err(|e| format!("login refused: {}", message(&e)))?;
    }
    Ok(client)
}

/// A failed call's cause: the remote's `INVALID_ARGUMENT` (its query
/// failed on its data, or it refused the statement) is the query's own
/// failure, not the source's.
fn failure(error: &impl std::fmt::Display) -> Cause {
    let text = message(error);
    let data = text.starts_with("InvalidArgument");
    Cause { text, data }
}

/// The remote's own message for a failed call, without transport noise.
fn message(error: &impl std::fmt::Display) -> String {
    let text = error.to_string();
    // tonic statuses arrive as "... status: Unavailable, message: \"...\" ..."
    if let Some(start) = text.find("message: \"") {
        let rest = &text[start + 10..];
        if let Some(end) = rest.find("\", ") {
            let code = text
                .find("status: ")
                .map(|s| {
                    text[s + 8..]
                        .split(',')
                        .next()
                        .unwrap_or_default()
                        .to_string()
                })
                .unwrap_or_default();
            return format!("{code}: {}", &rest[..end])
                .trim_start_matches(": ")
                .to_string();
        }
        // or as "Tonic error: code: '<description>', message: \"...\"".
        if let Some(said) = rest.strip_suffix('"')
            && let Some(code) = described_code(&text)
        {
            return format!("{code:?}: {said}");
        }
    }
    text
}

/// The gRPC code whose description `text` quotes as `code: '...'`.
fn described_code(text: &str) -> Option<tonic::Code> {
    let start = text.find("code: '")? + 7;
    let description = &text[start..start + text[start..].find('\'')?];
    (0..=16)
        .map(tonic::Code::from)
        .find(|code| code.description() == description)
}
