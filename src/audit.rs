//! The audit log: one JSON line per query, successful or not (DESIGN §3.9).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditOutput {
    Stdout,
    Stderr,
    File(PathBuf),
    Off,
}

/// One query, as the audit log records it.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    /// RFC 3339, UTC.
    pub time: String,
    pub user: String,
    /// The client's address, when known.
    pub client: Option<String>,
    pub sql: String,
    /// Products the query read, `domain.product`.
    pub products: Vec<String>,
    /// Ids of the policy rules that restricted what the caller saw.
    pub policies: Vec<String>,
    pub rows: u64,
    pub duration_ms: f64,
    /// `ok`, `error` or `cancelled`.
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What the caller was told of what they read (a deprecated version).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Writes audit records, one JSON object a line.
pub struct AuditLog {
    sink: Option<Mutex<Box<dyn Write + Send>>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("enabled", &self.sink.is_some())
            .finish()
    }
}

pub type AuditLogRef = Arc<AuditLog>;

impl AuditLog {
    pub fn open(output: &AuditOutput) -> std::io::Result<Self> {
        let sink: Option<Box<dyn Write + Send>> = match output {
            AuditOutput::Stdout => Some(Box::new(std::io::stdout())),
            AuditOutput::Stderr => Some(Box::new(std::io::stderr())),
            AuditOutput::File(path) => Some(Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            )),
            AuditOutput::Off => None,
        };
        Ok(Self {
            sink: sink.map(Mutex::new),
        })
    }

    pub fn record(&self, record: &AuditRecord) {
        let Some(sink) = &self.sink else {
            return;
        };
        match serde_json::to_string(record) {
            Ok(line) => {
                let mut sink = sink.lock();
                if writeln!(sink, "{line}")
                    .and_then(|()| sink.flush())
                    .is_err()
                {
                    tracing::warn!("cannot write the audit log");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode an audit record"),
        }
    }
}
