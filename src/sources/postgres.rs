//! PostgreSQL sources: a small connection pool, schema discovery from the
//! catalog, and rows streamed in batches of the plan's Arrow types.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{
    ArrayBuilder, ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Float32Builder,
    Float64Builder, Int16Builder, Int32Builder, Int64Builder, StringBuilder,
    Time64MicrosecondBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Timelike, Utc};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::sync::{Semaphore, mpsc};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::types::{FromSql, Type};
use tokio_postgres::{Client, NoTls, Row, Socket};

use super::convert::{BATCH_ROWS, conform};
use super::{Cause, Discovery, SourceError};
use crate::config::SourceOptions;

pub(super) struct PostgresSource {
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    idle: Mutex<Vec<Client>>,
    slots: Arc<Semaphore>,
    connect_timeout: Duration,
}

impl PostgresSource {
    pub(super) fn new(url: &str, options: &SourceOptions) -> Result<Self, String> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| format!("invalid PostgreSQL URL: {e}"))?;
        // `sslmode=require`, or a CA file: TLS, with the server's
        // certificate verified. Otherwise plain TCP.
        let tls = if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require
            || options.ca_file.is_some()
        {
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
            Some(tokio_postgres_rustls::MakeRustlsConnect::new(
                super::tls::client_config(options.ca_file.as_deref())?,
            ))
        } else {
            None
        };
        config.connect_timeout(options.connect_timeout);
        config.application_name("meshgate");
        Ok(Self {
            config,
            tls,
            idle: Mutex::new(Vec::new()),
            slots: Arc::new(Semaphore::new(options.pool_size)),
            connect_timeout: options.connect_timeout,
        })
    }

    async fn connect(&self) -> Result<Client, Discovery> {
        match &self.tls {
            Some(tls) => open(&self.config, tls.clone(), self.connect_timeout).await,
            None => open(&self.config, NoTls, self.connect_timeout).await,
        }
    }

    /// An open connection: an idle one, else a new one.
    async fn client(&self) -> Result<(Client, bool), Discovery> {
        loop {
            let Some(client) = self.idle.lock().pop() else {
                break;
            };
            if !client.is_closed() {
                return Ok((client, true));
            }
        }
        Ok((self.connect().await?, false))
    }

    fn give_back(&self, client: Client) {
        if !client.is_closed() {
            self.idle.lock().push(client);
        }
    }

    /// The planner's estimate of the rows of `table` (`pg_class.reltuples`,
    /// kept by `ANALYZE` and autovacuum); `None` for a table never analyzed
    /// or a view.
    pub(super) async fn table_rows(&self, table: &[String]) -> Option<u64> {
        let _slot = self.slots.acquire().await.ok()?;
        let (client, _) = self.client().await.ok()?;
        let row = client
            .query_opt(
                "SELECT c.reltuples::float8 FROM pg_catalog.pg_class c \
                 WHERE c.oid = to_regclass($1::text) AND c.relkind IN ('r', 'p', 'm')",
                &[&super::quoted_name(table)],
            )
            .await
            .ok()?;
        // A connection that failed is not given back.
        self.give_back(client);
        let rows: f64 = row?.get(0);
        (rows >= 0.0).then_some(rows as u64)
    }

    pub(super) async fn table_schema(&self, table: &[String]) -> Result<SchemaRef, Discovery> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| Discovery::Refused("the source is closed".to_string()))?;
        let (client, _) = self.client().await?;
        let rows = client
            .query(
                "SELECT a.attname::text, a.atttypid::int8, a.atttypmod::int4 \
                 FROM pg_catalog.pg_attribute a \
                 WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped \
                 ORDER BY a.attnum",
                &[&super::quoted_name(table)],
            )
            .await
            .map_err(|e| Discovery::Refused(describe(&e)))?;
        self.give_back(client);
        let mut fields = Vec::with_capacity(rows.len());
        for row in rows {
            let name: String = row.get(0);
            let oid: i64 = row.get(1);
            let typmod: i32 = row.get(2);
            let data_type = arrow_type(oid, typmod).ok_or_else(|| {
                Discovery::Refused(format!("column `{name}` has a PostgreSQL type (oid {oid}) meshgate cannot read; publish a view that casts it"))
            })?;
            let field = Field::new(name, data_type, true);
            // `char(n)`, `json` and `jsonb` compare otherwise than their text.
            fields.push(if matches!(oid, 1042 | 114 | 3802) {
                field.with_metadata(
                    [(super::READ_AS_TEXT.to_string(), String::new())]
                        .into_iter()
                        .collect(),
                )
            } else {
                field
            });
        }
        if fields.is_empty() {
            return Err(Discovery::Refused(format!(
                "table {} has no columns",
                table.join(".")
            )));
        }
        Ok(Arc::new(Schema::new(fields)))
    }

    pub(super) fn execute(
        self: &Arc<Self>,
        sql: String,
        schema: SchemaRef,
        context: String,
    ) -> SendableRecordBatchStream {
        let (tx, rx) = mpsc::channel(2);
        let source = Arc::clone(self);
        let task_schema = Arc::clone(&schema);
        tokio::spawn(async move {
            if let Err(cause) = source.stream_rows(&sql, &task_schema, &tx).await {
                let error = SourceError { context, cause };
                let _ = tx.send(Err(error.into_datafusion())).await;
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Box::pin(RecordBatchStreamAdapter::new(schema, stream))
    }

    async fn stream_rows(
        &self,
        sql: &str,
        schema: &SchemaRef,
        tx: &mpsc::Sender<datafusion::error::Result<arrow::array::RecordBatch>>,
    ) -> Result<(), Cause> {
        let _slot = tokio::select! {
            slot = self.slots.acquire() => slot.map_err(|_| "the source is closed".to_string())?,
            () = tx.closed() => return Ok(()),
        };
        let (mut client, reused) = self.client().await.map_err(|e| e.to_string())?;
        let rows = match client.query_raw(sql, std::iter::empty::<i32>()).await {
            Ok(rows) => rows,
            // A pooled connection the server has since closed: once more on
            // a new one (nothing was read yet).
            Err(_) if reused => {
                client = self.connect().await.map_err(|e| e.to_string())?;
                client
                    .query_raw(sql, std::iter::empty::<i32>())
                    .await
                    .map_err(|e| failure(&e))?
            }
            Err(e) => return Err(failure(&e)),
        };
        let mut rows = std::pin::pin!(rows);
        let mut batch: Option<RowBatch> = None;
        loop {
            let next = tokio::select! {
                next = rows.next() => next,
                () = tx.closed() => {
                    // The query was cancelled or timed out: stop the server's work.
                    let cancel = client.cancel_token();
                    let tls = self.tls.clone();
                    tokio::spawn(async move {
                        match tls {
                            Some(tls) => { let _ = cancel.cancel_query(tls).await; }
                            None => { let _ = cancel.cancel_query(NoTls).await; }
                        }
                    });
                    return Ok(());
                }
            };
            let Some(row) = next else { break };
            let row = row.map_err(|e| failure(&e))?;
            let builder = batch.get_or_insert_with(|| RowBatch::new(&row));
            builder.push(&row)?;
            if builder.rows >= BATCH_ROWS {
                let full = batch.take().expect("batch is set").finish(schema)?;
                if tx.send(Ok(full)).await.is_err() {
                    return Ok(());
                }
            }
        }
        if let Some(rest) = batch.take() {
            let rest = rest.finish(schema)?;
            let _ = tx.send(Ok(rest)).await;
        }
        self.give_back(client);
        Ok(())
    }
}

/// A new connection, its protocol driven by a task of its own. A server
/// that answers with an error (a refused login) refuses; any other failure
/// leaves the server unreachable, for now.
async fn open<T>(
    config: &tokio_postgres::Config,
    tls: T,
    timeout: Duration,
) -> Result<Client, Discovery>
where
    T: MakeTlsConnect<Socket>,
    T::Stream: Send + 'static,
    T::TlsConnect: Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    let (client, connection) = tokio::time::timeout(timeout, config.connect(tls))
        .await
        .map_err(|_| Discovery::Unreachable(format!("no connection within {timeout:?}")))?
        .map_err(|e| match e.as_db_error() {
            Some(_) => Discovery::Refused(describe(&e)),
            None => Discovery::Unreachable(describe(&e)),
        })?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "PostgreSQL connection ended");
        }
    });
    // `date_trunc` of a `timestamptz` truncates in the session's time
    // zone; meshgate's timestamps with a time zone are read as UTC.
    client
        .batch_execute("SET TIME ZONE 'UTC'")
        .await
        .map_err(|e| Discovery::Refused(describe(&e)))?;
    Ok(client)
}

/// A failed statement's cause: a data exception (SQLSTATE class 22: a
/// value out of range, an overflow) is the query's own failure.
fn failure(error: &tokio_postgres::Error) -> Cause {
    Cause {
        text: describe(error),
        data: error
            .as_db_error()
            .is_some_and(|db| db.code().code().starts_with("22")),
    }
}

/// The cause of a PostgreSQL error, with the server's own message when it
/// sent one.
fn describe(error: &tokio_postgres::Error) -> String {
    if let Some(db) = error.as_db_error() {
        return format!("PostgreSQL: {} ({})", db.message(), db.code().code());
    }
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    message
}

/// The Arrow type meshgate reads a PostgreSQL column type as.
fn arrow_type(oid: i64, typmod: i32) -> Option<DataType> {
    Some(match oid {
        16 => DataType::Boolean,
        20 => DataType::Int64,
        21 => DataType::Int16,
        23 => DataType::Int32,
        26 => DataType::Int64,
        700 => DataType::Float32,
        701 => DataType::Float64,
        1700 => {
            if typmod >= 4 {
                let packed = typmod - 4;
                let precision = u8::try_from((packed >> 16) & 0xffff).ok()?;
                let scale = i8::try_from(packed & 0xffff).ok()?;
                if precision <= 38 {
                    DataType::Decimal128(precision, scale)
                } else {
                    DataType::Float64
                }
            } else {
                DataType::Decimal128(38, 10)
            }
        }
        18 | 19 | 25 | 1042 | 1043 | 2950 | 114 | 3802 => DataType::Utf8,
        17 => DataType::Binary,
        1082 => DataType::Date32,
        1083 => DataType::Time64(TimeUnit::Microsecond),
        1114 => DataType::Timestamp(TimeUnit::Microsecond, None),
        1184 => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        _ => return None,
    })
}

/// Rows of one batch, one builder per column in the type PostgreSQL sent.
struct RowBatch {
    columns: Vec<ColumnBuilder>,
    rows: usize,
}

enum ColumnBuilder {
    Bool(BooleanBuilder),
    I16(Int16Builder),
    I32(Int32Builder),
    I64(Int64Builder),
    Oid(Int64Builder),
    F32(Float32Builder),
    F64(Float64Builder),
    Text(StringBuilder),
    Numeric(StringBuilder),
    Other(StringBuilder),
    Bytes(BinaryBuilder),
    Date(Date32Builder),
    Time(Time64MicrosecondBuilder),
    Timestamp(TimestampMicrosecondBuilder),
    TimestampTz(TimestampMicrosecondBuilder),
    Unsupported(String),
}

impl RowBatch {
    fn new(row: &Row) -> Self {
        let columns = row
            .columns()
            .iter()
            .map(|c| ColumnBuilder::for_type(c.type_()))
            .collect();
        Self { columns, rows: 0 }
    }

    fn push(&mut self, row: &Row) -> Result<(), String> {
        for (index, column) in self.columns.iter_mut().enumerate() {
            column
                .push(row, index)
                .map_err(|e| format!("column {}: {e}", row.columns()[index].name()))?;
        }
        self.rows += 1;
        Ok(())
    }

    fn finish(self, schema: &SchemaRef) -> Result<arrow::array::RecordBatch, String> {
        let rows = self.rows;
        let columns: Vec<ArrayRef> = self.columns.into_iter().map(|c| c.finish()).collect();
        conform(schema, columns, rows).map_err(|e| e.to_string())
    }
}

impl ColumnBuilder {
    fn for_type(ty: &Type) -> Self {
        match *ty {
            Type::BOOL => Self::Bool(BooleanBuilder::new()),
            Type::INT2 => Self::I16(Int16Builder::new()),
            Type::INT4 => Self::I32(Int32Builder::new()),
            Type::INT8 => Self::I64(Int64Builder::new()),
            Type::OID => Self::Oid(Int64Builder::new()),
            Type::FLOAT4 => Self::F32(Float32Builder::new()),
            Type::FLOAT8 => Self::F64(Float64Builder::new()),
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
                Self::Text(StringBuilder::new())
            }
            Type::CHAR | Type::UUID | Type::JSON | Type::JSONB => Self::Other(StringBuilder::new()),
            Type::NUMERIC => Self::Numeric(StringBuilder::new()),
            Type::BYTEA => Self::Bytes(BinaryBuilder::new()),
            Type::DATE => Self::Date(Date32Builder::new()),
            Type::TIME => Self::Time(Time64MicrosecondBuilder::new()),
            Type::TIMESTAMP => Self::Timestamp(TimestampMicrosecondBuilder::new()),
            Type::TIMESTAMPTZ => {
                Self::TimestampTz(TimestampMicrosecondBuilder::new().with_timezone("UTC"))
            }
            _ => Self::Unsupported(ty.name().to_string()),
        }
    }

    fn push(&mut self, row: &Row, index: usize) -> Result<(), String> {
        fn get<'a, T: FromSql<'a>>(row: &'a Row, index: usize) -> Result<Option<T>, String> {
            row.try_get::<_, Option<T>>(index)
                .map_err(|e| e.to_string())
        }
        match self {
            Self::Bool(b) => b.append_option(get::<bool>(row, index)?),
            Self::I16(b) => b.append_option(get::<i16>(row, index)?),
            Self::I32(b) => b.append_option(get::<i32>(row, index)?),
            Self::I64(b) => b.append_option(get::<i64>(row, index)?),
            Self::Oid(b) => b.append_option(get::<u32>(row, index)?.map(i64::from)),
            Self::F32(b) => b.append_option(get::<f32>(row, index)?),
            Self::F64(b) => b.append_option(get::<f64>(row, index)?),
            Self::Text(b) => b.append_option(get::<&str>(row, index)?),
            Self::Numeric(b) => b.append_option(get::<Numeric>(row, index)?.map(|n| n.0)),
            Self::Other(b) => b.append_option(get::<OtherText>(row, index)?.map(|t| t.0)),
            Self::Bytes(b) => b.append_option(get::<&[u8]>(row, index)?),
            Self::Date(b) => b.append_option(get::<NaiveDate>(row, index)?.map(|d| {
                let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).expect("the epoch is a date");
                i32::try_from((d - epoch).num_days()).unwrap_or(i32::MAX)
            })),
            Self::Time(b) => b.append_option(get::<NaiveTime>(row, index)?.map(|t| {
                i64::from(t.num_seconds_from_midnight()) * 1_000_000
                    + i64::from(t.nanosecond() / 1000)
            })),
            Self::Timestamp(b) => b.append_option(
                get::<NaiveDateTime>(row, index)?.map(|t| t.and_utc().timestamp_micros()),
            ),
            Self::TimestampTz(b) => {
                b.append_option(get::<DateTime<Utc>>(row, index)?.map(|t| t.timestamp_micros()))
            }
            Self::Unsupported(name) => {
                return Err(format!("PostgreSQL type {name} cannot be read"));
            }
        }
        Ok(())
    }

    fn finish(self) -> ArrayRef {
        fn done(mut b: impl ArrayBuilder) -> ArrayRef {
            b.finish()
        }
        match self {
            Self::Bool(b) => done(b),
            Self::I16(b) => done(b),
            Self::I32(b) => done(b),
            Self::I64(b) | Self::Oid(b) => done(b),
            Self::F32(b) => done(b),
            Self::F64(b) => done(b),
            Self::Text(b) | Self::Numeric(b) | Self::Other(b) => done(b),
            Self::Bytes(b) => done(b),
            Self::Date(b) => done(b),
            Self::Time(b) => done(b),
            Self::Timestamp(b) | Self::TimestampTz(b) => done(b),
            Self::Unsupported(_) => Arc::new(arrow::array::NullArray::new(0)),
        }
    }
}

/// A `numeric` value as decimal text (binary format: digit count, weight,
/// sign, display scale, then base-10000 digits).
struct Numeric(String);

impl<'a> FromSql<'a> for Numeric {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let word = |i: usize| -> Result<u16, Box<dyn std::error::Error + Sync + Send>> {
            raw.get(i * 2..i * 2 + 2)
                .map(|b| u16::from_be_bytes([b[0], b[1]]))
                .ok_or_else(|| "truncated numeric".into())
        };
        let ndigits = usize::from(word(0)?);
        let weight = i32::from(word(1)? as i16);
        let sign = word(2)?;
        let dscale = usize::from(word(3)?);
        match sign {
            0x0000 | 0x4000 => {}
            0xC000 => return Err("numeric NaN has no Arrow value".into()),
            _ => return Err("numeric infinity has no Arrow value".into()),
        }
        let mut digits = Vec::with_capacity(ndigits);
        for i in 0..ndigits {
            digits.push(word(4 + i)?);
        }
        let mut text = String::new();
        if sign == 0x4000 {
            text.push('-');
        }
        // Integer part: groups 0..=weight.
        if weight < 0 {
            text.push('0');
        } else {
            for group in 0..=weight {
                let d = usize::try_from(group)
                    .ok()
                    .and_then(|g| digits.get(g))
                    .copied()
                    .unwrap_or(0);
                if group == 0 {
                    text.push_str(&d.to_string());
                } else {
                    text.push_str(&format!("{d:04}"));
                }
            }
        }
        if dscale > 0 {
            text.push('.');
            let mut fraction = String::new();
            let mut group = weight + 1;
            while fraction.len() < dscale {
                let d = if group < 0 {
                    0
                } else {
                    usize::try_from(group)
                        .ok()
                        .and_then(|g| digits.get(g))
                        .copied()
                        .unwrap_or(0)
                };
                fraction.push_str(&format!("{d:04}"));
                group += 1;
            }
            fraction.truncate(dscale);
            text.push_str(&fraction);
        }
        Ok(Numeric(text))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::NUMERIC
    }
}

/// `uuid`, `json`, `jsonb` and `"char"` values as text.
struct OtherText(String);

impl<'a> FromSql<'a> for OtherText {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let text = match *ty {
            Type::UUID => {
                let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
                if hex.len() != 32 {
                    return Err("malformed uuid".into());
                }
                format!(
                    "{}-{}-{}-{}-{}",
                    &hex[0..8],
                    &hex[8..12],
                    &hex[12..16],
                    &hex[16..20],
                    &hex[20..]
                )
            }
            Type::JSONB => std::str::from_utf8(raw.get(1..).unwrap_or_default())?.to_string(),
            _ => std::str::from_utf8(raw)?.to_string(),
        };
        Ok(OtherText(text))
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::UUID | Type::JSON | Type::JSONB | Type::CHAR)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numeric(words: &[u16]) -> String {
        let raw: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
        Numeric::from_sql(&Type::NUMERIC, &raw).unwrap().0
    }

    #[test]
    fn numeric_binary_format_reads_as_decimal_text() {
        // 12345.678 = digits [1, 2345, 6780], weight 1, scale 3
        assert_eq!(numeric(&[3, 1, 0, 3, 1, 2345, 6780]), "12345.678");
        // -0.05 = digits [500], weight -1, scale 2
        assert_eq!(numeric(&[1, 0xffff, 0x4000, 2, 500]), "-0.05");
        // 0 with scale 2
        assert_eq!(numeric(&[0, 0, 0, 2]), "0.00");
        // 100000000 = digits [1], weight 2
        assert_eq!(numeric(&[1, 2, 0, 0, 1]), "100000000");
        // 0.00001234 = digits [1234], weight -2
        assert_eq!(numeric(&[1, 0xfffe, 0, 8, 1234]), "0.00001234");
    }
}
