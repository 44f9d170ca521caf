//! Statement tickets and prepared-statement handles. They are self-contained
//! (the SQL, its bound parameters, and the user they were issued to), so any
//! replica can serve them; they carry no trust: every use re-authenticates,
//! is refused for another user, and is planned afresh with the caller's view.

use std::io::Cursor;

use arrow::array::RecordBatch;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use bytes::Bytes;
use datafusion::common::ScalarValue;
use prost::Message;

use super::status::ProtocolError;
use crate::auth::CallerIdentity;

const HANDLE_VERSION: u32 = 1;

/// The content of a ticket or prepared-statement handle.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct StatementHandle {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    #[prost(string, tag = "2")]
    pub user: String,
    #[prost(string, tag = "3")]
    pub sql: String,
    /// Bound parameters: one row, as an Arrow IPC stream; empty when unbound.
    #[prost(bytes = "bytes", tag = "4")]
    pub parameters: Bytes,
    /// Random for each prepared statement, so that two preparations of the
    /// same SQL are two handles (see [`super::bindings`]); 0 in tickets.
    #[prost(uint64, tag = "5")]
    pub statement_id: u64,
}

impl StatementHandle {
    pub(crate) fn new(caller: &CallerIdentity, sql: &str) -> Self {
        Self {
            version: HANDLE_VERSION,
            user: caller.user.clone(),
            sql: sql.to_string(),
            parameters: Bytes::new(),
            statement_id: 0,
        }
    }

    /// The handle of a prepared statement: one of its own, even for SQL
    /// prepared before.
    pub(crate) fn prepared(caller: &CallerIdentity, sql: &str) -> Self {
        Self {
            statement_id: rand::random(),
            ..Self::new(caller, sql)
        }
    }

    pub(crate) fn encode(&self) -> Bytes {
        self.encode_to_vec().into()
    }

    /// Decodes a handle and checks that `caller` may use it.
    pub(crate) fn decode_for(bytes: &[u8], caller: &CallerIdentity) -> Result<Self, ProtocolError> {
        let handle = Self::decode(bytes)
            .ok()
            .filter(|h| h.version == HANDLE_VERSION)
            .ok_or_else(|| {
                ProtocolError::BadRequest("unknown or corrupt statement handle".into())
            })?;
        if handle.user != caller.user {
            return Err(ProtocolError::WrongCaller(
                "this statement handle was issued to another user".into(),
            ));
        }
        Ok(handle)
    }

    /// Stores one row of parameter values.
    pub(crate) fn with_parameters(mut self, batch: &RecordBatch) -> Result<Self, ProtocolError> {
        let mut buffer = Vec::new();
        {
            let mut writer = StreamWriter::try_new(&mut buffer, batch.schema_ref())
                .map_err(|e| ProtocolError::Encoding(e.to_string()))?;
            writer
                .write(batch)
                .and_then(|()| writer.finish())
                .map_err(|e| ProtocolError::Encoding(e.to_string()))?;
        }
        self.parameters = buffer.into();
        Ok(self)
    }

    /// The bound values, in placeholder order.
    pub(crate) fn parameter_values(&self) -> Result<Vec<ScalarValue>, ProtocolError> {
        if self.parameters.is_empty() {
            return Ok(Vec::new());
        }
        let corrupt = |e: &dyn std::fmt::Display| {
            ProtocolError::BadRequest(format!("corrupt parameters in statement handle: {e}"))
        };
        let reader = StreamReader::try_new(Cursor::new(self.parameters.as_ref()), None)
            .map_err(|e| corrupt(&e))?;
        let mut batches = reader
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| corrupt(&e))?;
        let batch = batches.pop().ok_or_else(|| corrupt(&"no rows"))?;
        batch
            .columns()
            .iter()
            .map(|column| ScalarValue::try_from_array(column, 0).map_err(|e| corrupt(&e)))
            .collect()
    }
}

/// Reads the single parameter row a client uploads with DoPut.
pub(crate) fn single_parameter_row(
    batches: Vec<RecordBatch>,
) -> Result<RecordBatch, ProtocolError> {
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    if rows != 1 {
        return Err(ProtocolError::BadRequest(format!(
            "bind exactly one row of parameters to a query ({rows} rows were sent)"
        )));
    }
    let batch = batches
        .into_iter()
        .find(|b| b.num_rows() == 1)
        .ok_or_else(|| ProtocolError::BadRequest("no parameter row was sent".into()))?;
    Ok(batch)
}
