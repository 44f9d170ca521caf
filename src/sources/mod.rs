//! SQL and Flight SQL sources: PostgreSQL, SQLite and remote Flight SQL
//! servers (DESIGN §5).
//!
//! A product of such a source is a [`RemoteTable`]. Reading it sends the
//! source one SQL statement; [`pushdown`] makes that statement carry whole
//! sub-plans (filters, projections, aggregates, sorts, limits, joins among
//! the source's tables), with the caller's row filter and masks inside a
//! fenced subquery the caller's own predicates cannot reach into.

mod alike;
mod collation;
mod convert;
mod flight;
mod join_keys;
mod postgres;
pub(crate) mod pushdown;
mod scopes;
mod sqlite;
mod table;
mod tls;
mod unparse;

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::error::DataFusionError;
use datafusion::execution::SendableRecordBatchStream;

pub(crate) use pushdown::RemoteJoinKeys;
pub use pushdown::{RemoteExec, SourcePlanner, SourcePushdown};
pub use table::RemoteTable;

use crate::config::{SourceOptions, StorageConfig};

/// Field metadata discovery gives a column the source must read as text
/// for its values to compare as meshgate compares them; it is taken off
/// the product's schema.
pub(crate) const READ_AS_TEXT: &str = "meshgate.read_as_text";

/// How a SQLite table numbers its rows (see [`Source::rowid`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rowid {
    /// The name SQL reads the rowid by: `rowid`, or `_rowid_` or `oid`
    /// where a column takes that name.
    pub(crate) name: &'static str,
    /// The column that is the rowid (an `INTEGER PRIMARY KEY`), if any.
    pub(crate) key: Option<String>,
}

/// The SQL dialect a source speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Sqlite,
    /// Any Flight SQL server: ANSI-quoted identifiers, standard functions.
    FlightSql,
}

impl Dialect {
    /// The unparser that writes SQL in this dialect.
    pub(crate) fn unparser_dialect(
        self,
    ) -> &'static dyn datafusion::sql::unparser::dialect::Dialect {
        match self {
            Dialect::Postgres => &unparse::POSTGRES,
            Dialect::Sqlite => &unparse::SQLITE,
            Dialect::FlightSql => &unparse::FLIGHT_SQL,
        }
    }

    /// The parser for SQL written in this dialect.
    pub(crate) fn parser_dialect(self) -> Box<dyn sqlparser::dialect::Dialect> {
        match self {
            Dialect::Postgres => Box::new(sqlparser::dialect::PostgreSqlDialect {}),
            Dialect::Sqlite => Box::new(sqlparser::dialect::SQLiteDialect {}),
            Dialect::FlightSql => Box::new(sqlparser::dialect::GenericDialect {}),
        }
    }

    /// Whether the source keeps a subquery with `OFFSET 0` closed: it neither
    /// merges it into the outer query nor pushes outer predicates into it.
    /// PostgreSQL and SQLite do; a remote Flight SQL engine may not.
    pub(crate) fn fences_subqueries(self) -> bool {
        matches!(self, Dialect::Postgres | Dialect::Sqlite)
    }

    fn label(self) -> &'static str {
        match self {
            Dialect::Postgres => "postgres",
            Dialect::Sqlite => "sqlite",
            Dialect::FlightSql => "flight_sql",
        }
    }
}

/// What a source failure says: which storage, and why. The query's error
/// adds the product.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {}", cause.text)]
pub struct SourceError {
    pub context: String,
    pub cause: Cause,
}

/// Why a source failed.
#[derive(Debug)]
pub struct Cause {
    pub text: String,
    /// The source ran the statement and failed on its data (an overflow, a
    /// value out of range), as the query would have failed here: the
    /// caller's error, not the source's.
    pub data: bool,
}

impl From<String> for Cause {
    fn from(text: String) -> Self {
        Self { text, data: false }
    }
}

impl From<&str> for Cause {
    fn from(text: &str) -> Self {
        text.to_string().into()
    }
}

impl SourceError {
    pub fn into_datafusion(self) -> DataFusionError {
        DataFusionError::External(Box::new(self))
    }
}

/// Why a table's schema could not be discovered.
#[derive(Debug, Clone)]
pub enum Discovery {
    /// The source could not be reached: it may come back.
    Unreachable(String),
    /// The source answered: the table is missing, unreadable, or the
    /// credentials are refused.
    Refused(String),
}

impl fmt::Display for Discovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Discovery::Unreachable(m) | Discovery::Refused(m) => f.write_str(m),
        }
    }
}

/// A connection-level driver for one storage.
enum Driver {
    Postgres(Arc<postgres::PostgresSource>),
    Sqlite(sqlite::SqliteSource),
    Flight(flight::FlightSource),
}

/// One SQL or Flight SQL storage of a domain, shared by its products.
pub struct Source {
    /// `domain.storage`, for messages and EXPLAIN.
    pub name: String,
    pub dialect: Dialect,
    pub options: SourceOptions,
    driver: Driver,
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Source")
            .field("name", &self.name)
            .field("dialect", &self.dialect)
            .finish_non_exhaustive()
    }
}

/// The caller's bearer token, for sources that forward it.
#[derive(Debug, Clone)]
pub struct ForwardedToken(pub Arc<str>);

impl Source {
    /// A source for `storage`; `None` for object storage. Nothing is
    /// connected yet: a source that is down fails only the products that
    /// read it, when they are opened or queried.
    pub fn new(
        domain: &str,
        storage_name: &str,
        storage: &StorageConfig,
    ) -> Option<Result<Arc<Self>, String>> {
        let name = format!("{domain}.{storage_name}");
        let (dialect, options, driver) = match storage {
            StorageConfig::ObjectStore { .. } => return None,
            StorageConfig::Postgres { url, options } => (
                Dialect::Postgres,
                options.clone(),
                postgres::PostgresSource::new(url, options)
                    .map(|pg| Driver::Postgres(Arc::new(pg))),
            ),
            StorageConfig::Sqlite { path, options } => (
                Dialect::Sqlite,
                options.clone(),
                Ok(Driver::Sqlite(sqlite::SqliteSource::new(path.clone()))),
            ),
            StorageConfig::FlightSql { url, options, auth } => (
                Dialect::FlightSql,
                options.clone(),
                flight::FlightSource::new(url, options, auth.clone()).map(Driver::Flight),
            ),
        };
        Some(driver.map(|driver| {
            Arc::new(Self {
                name,
                dialect,
                options,
                driver,
            })
        }))
    }

    /// `domain.storage (type)`, the context of this source's errors.
    pub fn describe(&self) -> String {
        format!("storage {} ({})", self.name, self.dialect.label())
    }

    fn error(&self, cause: impl fmt::Display) -> SourceError {
        SourceError {
            context: self.describe(),
            cause: cause.to_string().into(),
        }
    }

    /// The schema of `table` as the source reports it, in Arrow types.
    pub async fn table_schema(&self, table: &[String]) -> Result<SchemaRef, Discovery> {
        let timeout = self.options.connect_timeout * 2;
        let discovered = async {
            match &self.driver {
                Driver::Postgres(pg) => pg.table_schema(table).await,
                Driver::Sqlite(sqlite) => sqlite.table_schema(table).await,
                Driver::Flight(flight) => flight.table_schema(table).await,
            }
        };
        match tokio::time::timeout(timeout, discovered).await {
            Ok(result) => result.map_err(|failure| match failure {
                Discovery::Unreachable(cause) => {
                    Discovery::Unreachable(self.error(cause).to_string())
                }
                Discovery::Refused(cause) => Discovery::Refused(self.error(cause).to_string()),
            }),
            Err(_) => Err(Discovery::Unreachable(
                self.error(format!("no answer within {timeout:?}"))
                    .to_string(),
            )),
        }
    }

    /// About how many rows `table` holds, where the source keeps a count or
    /// an estimate it answers at once: for choosing the side of a join to
    /// build on. `None` when it does not, or does not answer in time.
    pub async fn table_rows(&self, table: &[String]) -> Option<u64> {
        let estimated = async {
            match &self.driver {
                Driver::Postgres(pg) => pg.table_rows(table).await,
                Driver::Sqlite(sqlite) => sqlite.table_rows(table).await,
                Driver::Flight(_) => None,
            }
        };
        tokio::time::timeout(self.options.connect_timeout, estimated)
            .await
            .ok()
            .flatten()
    }

    /// The columns of `table` the source finds rows by without reading the
    /// whole table, where it needs them to join well: SQLite joins by
    /// looking rows up (an index, or one it builds for the query), where
    /// PostgreSQL hashes and merges, so `None` for every other source, and
    /// for a SQLite table whose indexes cannot be read in time.
    pub async fn indexed_columns(&self, table: &[String]) -> Option<HashSet<String>> {
        self.sqlite_answer(|sqlite| sqlite.indexed_columns(table))
            .await
    }

    /// How `table` numbers its rows, where the source is SQLite and the
    /// table has rowids: its rows can then be read in ranges of rowids,
    /// each a seek and a scan of part of the table.
    pub(crate) async fn rowid(&self, table: &[String]) -> Option<Rowid> {
        self.sqlite_answer(|sqlite| sqlite.rowid(table)).await
    }

    /// What `ask` learns of a SQLite source within the connect timeout;
    /// `None` for every other source, and where it does not answer in time.
    async fn sqlite_answer<'a, T, F>(
        &'a self,
        ask: impl FnOnce(&'a sqlite::SqliteSource) -> F,
    ) -> Option<T>
    where
        F: std::future::Future<Output = Option<T>> + 'a,
    {
        let Driver::Sqlite(sqlite) = &self.driver else {
            return None;
        };
        tokio::time::timeout(self.options.connect_timeout, ask(sqlite))
            .await
            .ok()
            .flatten()
    }

    /// Runs `sql` in the source, yielding batches of `schema` (the source's
    /// values are converted to it). Errors name the source and `products`.
    pub fn execute(
        self: &Arc<Self>,
        sql: String,
        schema: SchemaRef,
        products: &str,
        token: Option<ForwardedToken>,
    ) -> SendableRecordBatchStream {
        let context = format!("{products} ({})", self.describe());
        match &self.driver {
            Driver::Postgres(pg) => pg.execute(sql, schema, context),
            Driver::Sqlite(sqlite) => sqlite.execute(sql, schema, context),
            Driver::Flight(flight) => flight.execute(sql, schema, context, token),
        }
    }
}

/// Splits a configured table name (`schema.table`, `"Quoted"."Name"`) into
/// its parts.
pub fn table_parts(table: &str) -> Result<Vec<String>, String> {
    let dialect = sqlparser::dialect::GenericDialect {};
    let mut parser = sqlparser::parser::Parser::new(&dialect)
        .try_with_sql(table)
        .map_err(|e| format!("table `{table}`: {e}"))?;
    let name = parser
        .parse_object_name(false)
        .map_err(|e| format!("table `{table}`: {e}"))?;
    if parser.peek_token().token != sqlparser::tokenizer::Token::EOF {
        return Err(format!("table `{table}` is not a table name"));
    }
    Ok(name
        .0
        .iter()
        .filter_map(|part| part.as_ident().map(|i| i.value.clone()))
        .collect())
}

/// The table name quoted for SQL.
pub(crate) fn quoted_name(parts: &[String]) -> String {
    parts
        .iter()
        .map(|p| format!("\"{}\"", p.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(".")
}
