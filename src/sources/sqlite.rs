//! SQLite sources: a database file opened read-only, queried on blocking
//! threads, rows converted to the plan's Arrow types.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{
    ArrayBuilder, ArrayRef, BinaryBuilder, BooleanBuilder, Float64Builder, Int64Builder,
    RecordBatch, StringBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};
use tokio::sync::mpsc;

use super::convert::{BATCH_ROWS, conform};
use super::{Cause, Discovery, Rowid, SourceError};

pub(super) struct SqliteSource {
    path: PathBuf,
}

impl SqliteSource {
    pub(super) fn new(path: PathBuf) -> Self {
        Self { path }
    }

    fn open(path: &std::path::Path) -> Result<Connection, String> {
        if !path.is_file() {
            return Err(format!("database file {} does not exist", path.display()));
        }
        let connection = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        connection
            .busy_timeout(Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        Ok(connection)
    }

    /// About how many rows `table` holds: its largest rowid, which a table
    /// that rows are only added to keeps equal to its count, read from the
    /// end of its b-tree. `None` for a view or a table without rowids.
    pub(super) async fn table_rows(&self, table: &[String]) -> Option<u64> {
        let path = self.path.clone();
        let table = table.to_vec();
        tokio::task::spawn_blocking(move || {
            let connection = Self::open(&path).ok()?;
            let rowid = rowid_of(&connection, &table)?;
            let rows: Option<i64> = connection
                .query_row(
                    &format!(
                        "SELECT max({}) FROM {}",
                        rowid.name,
                        super::quoted_name(&table)
                    ),
                    [],
                    |row| row.get(0),
                )
                .ok()?;
            Some(rows.unwrap_or(0).max(0) as u64)
        })
        .await
        .ok()
        .flatten()
    }

    /// How `table`'s rows are numbered: `None` for a view or a table
    /// without rowids.
    pub(super) async fn rowid(&self, table: &[String]) -> Option<Rowid> {
        let path = self.path.clone();
        let table = table.to_vec();
        tokio::task::spawn_blocking(move || rowid_of(&Self::open(&path).ok()?, &table))
            .await
            .ok()
            .flatten()
    }

    /// The columns of `table` that SQLite can find its rows by: the first
    /// column of each of its indexes that covers every row (not partial),
    /// and an `INTEGER PRIMARY KEY`, which is the rowid itself. `None` when
    /// the catalog cannot be read.
    pub(super) async fn indexed_columns(&self, table: &[String]) -> Option<HashSet<String>> {
        let path = self.path.clone();
        let (schema, name) = schema_and_name(table)?;
        tokio::task::spawn_blocking(move || {
            let connection = Self::open(&path).ok()?;
            let mut statement = connection
                .prepare(
                    "SELECT info.name FROM pragma_index_list(?1, ?2) AS list \
                     JOIN pragma_index_info(list.name, ?2) AS info \
                     WHERE info.seqno = 0 AND list.partial = 0 AND info.name IS NOT NULL \
                     UNION \
                     SELECT name FROM pragma_table_info(?1, ?2) \
                     WHERE pk = 1 AND upper(type) = 'INTEGER' \
                     AND (SELECT count(*) FROM pragma_table_info(?1, ?2) WHERE pk > 0) = 1",
                )
                .ok()?;
            let columns = statement
                .query_map([&name, &schema], |row| row.get::<_, String>(0))
                .ok()?
                .collect::<Result<HashSet<_>, _>>()
                .ok()?;
            Some(columns)
        })
        .await
        .ok()
        .flatten()
    }

    pub(super) async fn table_schema(&self, table: &[String]) -> Result<SchemaRef, Discovery> {
        let path = self.path.clone();
        let table = table.to_vec();
        tokio::task::spawn_blocking(move || {
            let connection = Self::open(&path)?;
            let (schema, name) = schema_and_name(&table)
                .ok_or_else(|| format!("`{}` is not a SQLite table name", table.join(".")))?;
            let mut statement = connection
                .prepare("SELECT name, type FROM pragma_table_info(?1, ?2) ORDER BY cid")
                .map_err(|e| e.to_string())?;
            let columns = statement
                .query_map([&name, &schema], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
                })
                .map_err(|e| e.to_string())?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?;
            if columns.is_empty() {
                return Err(format!("no table or view `{}`", table.join(".")));
            }
            let fields: Vec<Field> = columns
                .into_iter()
                .map(|(name, declared)| Field::new(name, declared_type(&declared), true))
                .collect();
            Ok(Arc::new(Schema::new(fields)) as SchemaRef)
        })
        .await
        .map_err(|e| format!("schema discovery failed: {e}"))
        .and_then(|r| r)
        .map_err(Discovery::Refused)
    }

    pub(super) fn execute(
        &self,
        sql: String,
        schema: SchemaRef,
        context: String,
    ) -> SendableRecordBatchStream {
        let (tx, rx) = mpsc::channel(2);
        let path = self.path.clone();
        let task_schema = Arc::clone(&schema);
        let watcher_tx = tx.clone();
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let result = Self::open(&path)
                .map_err(Cause::from)
                .and_then(|connection| {
                    // A cancelled or timed-out query interrupts SQLite's work.
                    let interrupt = connection.get_interrupt_handle();
                    let (done, finished) = tokio::sync::oneshot::channel::<()>();
                    runtime.spawn(async move {
                        tokio::select! {
                            () = watcher_tx.closed() => interrupt.interrupt(),
                            _ = finished => {}
                        }
                    });
                    let result = stream_rows(&connection, &sql, &task_schema, &tx);
                    let _ = done.send(());
                    result
                });
            if let Err(cause) = result {
                let error = SourceError { context, cause };
                let _ = tx.blocking_send(Err(error.into_datafusion()));
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Box::pin(RecordBatchStreamAdapter::new(schema, stream))
    }
}

/// The schema (`main` when not named) and the name of a table named by
/// `table`'s one or two parts.
fn schema_and_name(table: &[String]) -> Option<(String, String)> {
    match table {
        [name] => Some(("main".to_string(), name.clone())),
        [schema, name] => Some((schema.clone(), name.clone())),
        _ => None,
    }
}

/// How the rows of `table` are numbered, where it is a table with rowids:
/// the first of SQLite's names for the rowid that no column of the table
/// takes (a column named `rowid` hides the rowid under that name), and the
/// column that is the rowid itself (an `INTEGER PRIMARY KEY`), if any.
fn rowid_of(connection: &Connection, table: &[String]) -> Option<Rowid> {
    let (schema, name) = schema_and_name(table)?;
    let (kind, without_rowid): (String, bool) = connection
        .query_row(
            "SELECT type, wr FROM pragma_table_list WHERE name = ?1 AND schema = ?2",
            [&name, &schema],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .ok()?;
    if kind != "table" || without_rowid {
        return None;
    }
    let mut statement = connection
        .prepare("SELECT name, type, pk FROM pragma_table_info(?1, ?2)")
        .ok()?;
    let columns = statement
        .query_map([&name, &schema], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, i64>(2)?,
            ))
        })
        .ok()?
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    let rowid_name = ["rowid", "_rowid_", "oid"].into_iter().find(|candidate| {
        !columns
            .iter()
            .any(|(column, ..)| column.eq_ignore_ascii_case(candidate))
    })?;
    let keys: Vec<&(String, String, i64)> = columns.iter().filter(|(.., pk)| *pk > 0).collect();
    let key = match keys.as_slice() {
        [(column, declared, _)] if declared.eq_ignore_ascii_case("INTEGER") => Some(column.clone()),
        _ => None,
    };
    Some(Rowid {
        name: rowid_name,
        key,
    })
}

fn stream_rows(
    connection: &Connection,
    sql: &str,
    schema: &SchemaRef,
    tx: &mpsc::Sender<datafusion::error::Result<RecordBatch>>,
) -> Result<(), Cause> {
    let mut statement = connection.prepare(sql).map_err(failure)?;
    if statement.column_count() != schema.fields().len() {
        return Err(format!(
            "SQLite returns {} columns where {} were expected",
            statement.column_count(),
            schema.fields().len()
        )
        .into());
    }
    let mut rows = statement.query([]).map_err(failure)?;
    let mut batch = Batch::new(schema);
    while let Some(row) = rows.next().map_err(failure)? {
        for (index, column) in batch.columns.iter_mut().enumerate() {
            let value = row.get_ref(index).map_err(|e| e.to_string())?;
            // A value that does not fit its column: a stored value the
            // product's type cannot hold, or arithmetic SQLite took out of
            // the integers on overflow. Either is the data's failure.
            column.push(value).map_err(|e| Cause {
                text: format!("column `{}`: {e}", schema.field(index).name()),
                data: true,
            })?;
        }
        batch.rows += 1;
        if batch.rows >= BATCH_ROWS {
            let full = std::mem::replace(&mut batch, Batch::new(schema)).finish(schema)?;
            if tx.blocking_send(Ok(full)).is_err() {
                return Ok(());
            }
        }
    }
    if batch.rows > 0 {
        let _ = tx.blocking_send(Ok(batch.finish(schema)?));
    }
    Ok(())
}

/// A failed statement's cause: an integer overflow (in `sum`) is the
/// query's own failure.
fn failure(error: rusqlite::Error) -> Cause {
    let text = format!("SQLite: {error}");
    let data = matches!(&error, rusqlite::Error::SqliteFailure(_, Some(message)) if message == "integer overflow");
    Cause { text, data }
}

/// The Arrow type of a column declared with `declared` (SQLite's type
/// affinity rules, plus the common date and decimal spellings).
fn declared_type(declared: &str) -> DataType {
    let upper = declared.to_ascii_uppercase();
    if upper.contains("INT") {
        DataType::Int64
    } else if upper.contains("CHAR") || upper.contains("CLOB") || upper.contains("TEXT") {
        DataType::Utf8
    } else if upper.contains("BLOB") {
        DataType::Binary
    } else if upper.contains("REAL") || upper.contains("FLOA") || upper.contains("DOUB") {
        DataType::Float64
    } else if upper.contains("BOOL") {
        DataType::Boolean
    } else if upper.contains("DATETIME") || upper.contains("TIMESTAMP") {
        DataType::Timestamp(TimeUnit::Microsecond, None)
    } else if upper.contains("DATE") {
        DataType::Date32
    } else if upper.starts_with("DECIMAL") || upper.starts_with("NUMERIC") {
        decimal_type(&upper).unwrap_or(DataType::Float64)
    } else {
        DataType::Utf8
    }
}

/// `DECIMAL(p, s)` as Decimal128(p, s).
fn decimal_type(upper: &str) -> Option<DataType> {
    let inner = upper.split_once('(')?.1.strip_suffix(')')?;
    let (precision, scale) = inner.split_once(',')?;
    let precision: u8 = precision.trim().parse().ok()?;
    let scale: i8 = scale.trim().parse().ok()?;
    (1..=38)
        .contains(&precision)
        .then_some(DataType::Decimal128(precision, scale))
}

struct Batch {
    columns: Vec<Column>,
    rows: usize,
}

/// One column's values, gathered as the nearest of SQLite's storage
/// classes; [`conform`] casts them to the plan's type.
enum Column {
    Bool(BooleanBuilder),
    Int(Int64Builder),
    Float(Float64Builder),
    Text(StringBuilder),
    /// Decimal text at the column's scale (SQLite keeps decimals as REAL).
    Decimal(StringBuilder, usize),
    Blob(BinaryBuilder),
}

impl Batch {
    fn new(schema: &SchemaRef) -> Self {
        let columns = schema
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                DataType::Boolean => Column::Bool(BooleanBuilder::new()),
                DataType::Int8
                | DataType::Int16
                | DataType::Int32
                | DataType::Int64
                | DataType::UInt8
                | DataType::UInt16
                | DataType::UInt32
                | DataType::UInt64 => Column::Int(Int64Builder::new()),
                DataType::Float16 | DataType::Float32 | DataType::Float64 => {
                    Column::Float(Float64Builder::new())
                }
                DataType::Binary | DataType::LargeBinary | DataType::BinaryView => {
                    Column::Blob(BinaryBuilder::new())
                }
                DataType::Decimal128(_, scale) => {
                    Column::Decimal(StringBuilder::new(), usize::try_from(*scale).unwrap_or(0))
                }
                _ => Column::Text(StringBuilder::new()),
            })
            .collect();
        Self { columns, rows: 0 }
    }

    fn finish(self, schema: &SchemaRef) -> Result<RecordBatch, String> {
        let columns: Vec<ArrayRef> = self
            .columns
            .into_iter()
            .map(|column| match column {
                Column::Bool(mut b) => ArrayBuilder::finish(&mut b),
                Column::Int(mut b) => ArrayBuilder::finish(&mut b),
                Column::Float(mut b) => ArrayBuilder::finish(&mut b),
                Column::Text(mut b) | Column::Decimal(mut b, _) => ArrayBuilder::finish(&mut b),
                Column::Blob(mut b) => ArrayBuilder::finish(&mut b),
            })
            .collect();
        conform(schema, columns, self.rows).map_err(|e| e.to_string())
    }
}

impl Column {
    fn push(&mut self, value: ValueRef<'_>) -> Result<(), String> {
        match (self, value) {
            (Column::Bool(b), ValueRef::Null) => b.append_null(),
            (Column::Int(b), ValueRef::Null) => b.append_null(),
            (Column::Float(b), ValueRef::Null) => b.append_null(),
            (Column::Text(b) | Column::Decimal(b, _), ValueRef::Null) => b.append_null(),
            (Column::Decimal(b, _), ValueRef::Integer(i)) => b.append_value(i.to_string()),
            (Column::Decimal(b, scale), ValueRef::Real(f)) => {
                b.append_value(format!("{f:.prec$}", prec = *scale));
            }
            (Column::Decimal(b, _), ValueRef::Text(t)) => {
                b.append_value(std::str::from_utf8(t).map_err(|e| e.to_string())?);
            }
            (Column::Blob(b), ValueRef::Null) => b.append_null(),
            (Column::Bool(b), ValueRef::Integer(i)) => b.append_value(i != 0),
            (Column::Int(b), ValueRef::Integer(i)) => b.append_value(i),
            (Column::Float(b), ValueRef::Integer(i)) => b.append_value(i as f64),
            (Column::Float(b), ValueRef::Real(f)) => b.append_value(f),
            (Column::Text(b), ValueRef::Integer(i)) => b.append_value(i.to_string()),
            (Column::Text(b), ValueRef::Real(f)) => b.append_value(f.to_string()),
            (Column::Text(b), ValueRef::Text(t)) => {
                b.append_value(std::str::from_utf8(t).map_err(|e| e.to_string())?);
            }
            (Column::Blob(b), ValueRef::Blob(bytes)) => b.append_value(bytes),
            (Column::Int(b), ValueRef::Text(t)) => {
                let text = std::str::from_utf8(t).map_err(|e| e.to_string())?;
                b.append_value(
                    text.trim()
                        .parse()
                        .map_err(|_| format!("`{text}` is not an integer"))?,
                );
            }
            (Column::Float(b), ValueRef::Text(t)) => {
                let text = std::str::from_utf8(t).map_err(|e| e.to_string())?;
                b.append_value(
                    text.trim()
                        .parse()
                        .map_err(|_| format!("`{text}` is not a number"))?,
                );
            }
            (_, value) => {
                return Err(format!(
                    "a SQLite {:?} value does not fit this column",
                    value.data_type()
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declared_types_follow_affinity() {
        assert_eq!(declared_type("INTEGER"), DataType::Int64);
        assert_eq!(declared_type("varchar(25)"), DataType::Utf8);
        assert_eq!(declared_type("DOUBLE PRECISION"), DataType::Float64);
        assert_eq!(declared_type("DECIMAL(15,2)"), DataType::Decimal128(15, 2));
        assert_eq!(declared_type("DATE"), DataType::Date32);
        assert_eq!(
            declared_type("DATETIME"),
            DataType::Timestamp(TimeUnit::Microsecond, None)
        );
        assert_eq!(declared_type(""), DataType::Utf8);
    }

    #[tokio::test]
    async fn indexed_columns_are_those_an_index_leads_with() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("indexed.sqlite");
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                "CREATE TABLE t (id INTEGER PRIMARY KEY, a INTEGER, b INTEGER, c TEXT,
                                 d INTEGER, e INTEGER, f INTEGER UNIQUE);
                 CREATE INDEX t_ab ON t (a, b);
                 CREATE INDEX t_c_partial ON t (c) WHERE c IS NOT NULL;
                 CREATE INDEX t_d_expr ON t (d + 1);
                 CREATE TABLE pair (x BIGINT, y BIGINT, PRIMARY KEY (x, y));
                 CREATE TABLE wide (k BIGINT PRIMARY KEY, v TEXT) WITHOUT ROWID;
                 CREATE TABLE bare (k INTEGER, v TEXT);
                 CREATE TABLE two_keys (k INTEGER, j INTEGER, PRIMARY KEY (k, j));",
            )
            .unwrap();
        let source = SqliteSource::new(path);
        let indexed = |table: &str| {
            let source = &source;
            let table = vec![table.to_string()];
            async move {
                let mut columns: Vec<String> = source
                    .indexed_columns(&table)
                    .await
                    .unwrap()
                    .into_iter()
                    .collect();
                columns.sort();
                columns
            }
        };
        // The rowid, the first column of (a, b), a UNIQUE column; not b,
        // nor a partial index's column, nor an expression's.
        assert_eq!(indexed("t").await, ["a", "f", "id"]);
        assert_eq!(indexed("pair").await, ["x"]);
        assert_eq!(indexed("wide").await, ["k"]);
        assert!(indexed("bare").await.is_empty());
        // A composite INTEGER key is not the rowid, but has its index.
        assert_eq!(indexed("two_keys").await, ["k"]);
        let qualified = vec!["main".to_string(), "t".to_string()];
        assert!(source.indexed_columns(&qualified).await.is_some());
    }

    #[tokio::test]
    async fn rowids_are_read_by_a_name_no_column_takes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rowid.sqlite");
        Connection::open(&path)
            .unwrap()
            .execute_batch(
                "CREATE TABLE plain (a INTEGER, b TEXT);
                 CREATE TABLE keyed (id integer PRIMARY KEY, b TEXT);
                 CREATE TABLE big_key (id BIGINT PRIMARY KEY, b TEXT);
                 CREATE TABLE shadow (RowId INTEGER, b TEXT);
                 CREATE TABLE shadows (rowid INTEGER, _rowid_ INTEGER, b TEXT);
                 CREATE TABLE all_shadowed (rowid INTEGER, _rowid_ INTEGER, oid INTEGER);
                 CREATE TABLE wide (k INTEGER PRIMARY KEY, v TEXT) WITHOUT ROWID;
                 CREATE VIEW seen AS SELECT * FROM plain;
                 INSERT INTO plain VALUES (1, 'x'), (2, 'y'), (7, 'z');
                 INSERT INTO shadow (RowId, b) VALUES (9, 'x'), (8, 'y');",
            )
            .unwrap();
        let source = SqliteSource::new(path);
        let table = |name: &str| vec![name.to_string()];
        let rowid = |name: &'static str, key: Option<&str>| {
            Some(Rowid {
                name,
                key: key.map(str::to_string),
            })
        };
        assert_eq!(source.rowid(&table("plain")).await, rowid("rowid", None));
        assert_eq!(
            source.rowid(&table("keyed")).await,
            rowid("rowid", Some("id"))
        );
        // Only `INTEGER` itself makes a key the rowid.
        assert_eq!(source.rowid(&table("big_key")).await, rowid("rowid", None));
        assert_eq!(source.rowid(&table("shadow")).await, rowid("_rowid_", None));
        assert_eq!(source.rowid(&table("shadows")).await, rowid("oid", None));
        assert_eq!(source.rowid(&table("all_shadowed")).await, None);
        assert_eq!(source.rowid(&table("wide")).await, None);
        assert_eq!(source.rowid(&table("seen")).await, None);
        assert_eq!(source.rowid(&table("missing")).await, None);
        let qualified = vec!["main".to_string(), "plain".to_string()];
        assert_eq!(source.rowid(&qualified).await, rowid("rowid", None));
        // Row counts by the rowid, not by a column that takes its name;
        // none for a view, which has no rowids of its own.
        assert_eq!(source.table_rows(&table("plain")).await, Some(3));
        assert_eq!(source.table_rows(&table("shadow")).await, Some(2));
        assert_eq!(source.table_rows(&table("seen")).await, None);
    }
}
