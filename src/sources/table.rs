//! A product that names a table (or view) of a SQL or Flight SQL source.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::DFSchema;
use datafusion::error::Result;
use datafusion::logical_expr::utils::conjunction;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::sql::unparser::Unparser;

use super::alike::expr_pushable;
use super::join_keys::KeyColumns;
use super::pushdown::RemoteExec;
use super::{Dialect, Discovery, Rowid, Source, quoted_name, table_parts};
use crate::catalog::{PolicyColumn, check_contract, with_policy_columns};
use crate::config::ColumnContract;
use crate::policy::unqualified;

/// A source's table as a product. Scanned alone it sends the source the
/// columns, filters and limit of the scan; [`super::SourcePushdown`] sends
/// larger sub-plans.
#[derive(Debug)]
pub struct RemoteTable {
    pub source: Arc<Source>,
    /// `domain.product`.
    pub product: String,
    /// The table's name in the source, in parts.
    pub remote: Vec<String>,
    schema: SchemaRef,
    /// Columns the source reads as `text` (see [`RemoteTable::sent_from`]).
    read_as_text: HashSet<String>,
    /// What the source tells of the table for planning (see
    /// [`RemoteTable::stats`]).
    stats: LiveStats,
    /// The columns whose join keys compare in the source as here.
    key_columns: KeyColumns,
}

impl RemoteTable {
    /// Discovers the table's schema and checks it against the declared
    /// columns. Without credentials of its own, a token-forwarding Flight
    /// SQL source takes the declared columns as the schema.
    pub(crate) async fn open(
        source: Arc<Source>,
        product: String,
        table: &str,
        declared: &[ColumnContract],
        policy_columns: &[PolicyColumn],
    ) -> Result<Self, String> {
        let remote = table_parts(table)?;
        let mut read_as_text = HashSet::new();
        let mut key_columns = KeyColumns::unknown(source.dialect);
        let schema = match source.table_schema(&remote).await {
            Ok(found) => {
                key_columns = KeyColumns::of_table(source.dialect, &found);
                let (found, as_text) = without_read_hints(&found);
                read_as_text = as_text;
                let published = contract_schema(&found, declared, source.dialect)?;
                with_policy_columns(&published, &found, policy_columns, "the source table")?
            }
            // The types of columns that only policies read are the
            // source's to tell.
            Err(Discovery::Unreachable(error)) if !policy_columns.is_empty() => {
                return Err(format!(
                    "{error} (its policies read {}, which are not declared: declare them, \
                     denied, to publish the product while its source is down)",
                    policy_columns
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            // A source that is down does not withdraw a product whose
            // contract gives its schema: queries fail until it is back.
            Err(Discovery::Unreachable(error)) if !declared.is_empty() => {
                tracing::warn!(%product, %error, "source unreachable; product published from its declared columns");
                declared_schema(declared)
            }
            Err(error) => return Err(error.to_string()),
        };

        let stats = LiveStats::new(TableStats::read(&source, &remote).await, STATS_REREAD);
        Ok(Self {
            source,
            product,
            remote,
            schema,
            read_as_text,
            stats,
            key_columns,
        })
    }

    /// What the source tells of the table for planning: read when the
    /// product was opened, and read again in the background when a plan
    /// asks more than [`STATS_REREAD`] after the last read, so that joins
    /// are planned by the size and the indexes the table has now.
    pub(crate) fn stats(&self) -> TableStats {
        let source = Arc::clone(&self.source);
        let remote = self.remote.clone();
        self.stats
            .current(move || async move { TableStats::read(&source, &remote).await })
    }

    pub(crate) fn schema_ref(&self) -> &SchemaRef {
        &self.schema
    }

    /// The table's own name in the source, without its schema.
    pub(crate) fn name(&self) -> &str {
        self.remote.last().map_or("t", String::as_str)
    }

    /// The table as the `FROM` of the SQL sent to the source reads it,
    /// named `alias`.
    ///
    /// SQLite compares text with each column's collation: under `COLLATE
    /// NOCASE` `'a' = 'A'`, under `COLLATE RTRIM` `'a ' = 'a'`, and sorts,
    /// groups, `DISTINCT`, `min`, `max`, `IN` and joins follow; meshgate
    /// compares bytes. So SQLite reads the product's columns through a
    /// subquery that gives each one that is not a number `COLLATE BINARY`:
    /// a row filter sent there hides what it hides here. SQLite merges
    /// the subquery into the statement around it, and an index of a column
    /// with the default collation still serves.
    ///
    /// PostgreSQL compares a `char(n)` ignoring its padding and a `jsonb`
    /// as JSON; meshgate reads both as text. So those columns are read as
    /// `text` (a `char(n)` without its padding), and compare the same in
    /// both places.
    pub(crate) fn sent_from(&self, alias: &str) -> String {
        self.sent_from_where(alias, None)
    }

    /// [`RemoteTable::sent_from`], the table's rows kept to those that
    /// meet `condition` (SQL of the source's table, not of `alias`).
    fn sent_from_where(&self, alias: &str, condition: Option<&str>) -> String {
        let table = quoted_name(&self.remote);
        let alias = quoted_name(&[alias.to_string()]);
        let read = |field: &Field| -> Option<String> {
            let name = quoted_name(std::slice::from_ref(field.name()));
            match self.source.dialect {
                Dialect::Sqlite => {
                    let data_type = field.data_type();
                    (!data_type.is_numeric() && *data_type != DataType::Boolean)
                        .then(|| format!("{name} COLLATE BINARY AS {name}"))
                }
                Dialect::Postgres => self
                    .read_as_text
                    .contains(field.name())
                    .then(|| format!("CAST({name} AS TEXT) AS {name}")),
                Dialect::FlightSql => None,
            }
        };
        let fields = self.schema.fields();
        let filter = condition.map(|c| format!(" WHERE {c}")).unwrap_or_default();
        if fields.iter().all(|field| read(field).is_none()) {
            return match condition {
                None => format!("{table} AS {alias}"),
                Some(_) => format!("(SELECT * FROM {table}{filter}) AS {alias}"),
            };
        }
        let columns: Vec<String> = fields
            .iter()
            .map(|field| {
                read(field).unwrap_or_else(|| quoted_name(std::slice::from_ref(field.name())))
            })
            .collect();
        format!(
            "(SELECT {} FROM {table}{filter}) AS {alias}",
            columns.join(", ")
        )
    }

    /// The table read in parts that together read each row once, each part
    /// as [`RemoteTable::sent_from`] reads the whole: where the source is
    /// SQLite, which runs a statement on one thread, and the table is large
    /// enough, the parts are ranges of its rowids, which SQLite seeks to in
    /// its b-tree, so that statements reading the parts at once each scan a
    /// share of the table. `stats` are the table's; empty where the table
    /// is read whole.
    pub(crate) fn sent_in_parts(&self, alias: &str, stats: &TableStats) -> Vec<String> {
        let (Some(rowid), Some(rows)) = (&stats.rowid, stats.rows) else {
            return Vec::new();
        };
        let parts = rowid_ranges(rowid.name, rows, read_parts());
        parts
            .iter()
            .map(|condition| self.sent_from_where(alias, Some(condition)))
            .collect()
    }
}

/// `found` without the hints discovery gives a column to read it as text
/// ([`super::READ_AS_TEXT`]), and the names of those columns.
fn without_read_hints(found: &Schema) -> (Schema, HashSet<String>) {
    let mut as_text = HashSet::new();
    let fields: Vec<Field> = found
        .fields()
        .iter()
        .map(|field| {
            let mut metadata = field.metadata().clone();
            if metadata.remove(super::READ_AS_TEXT).is_some() {
                as_text.insert(field.name().clone());
            }
            field.as_ref().clone().with_metadata(metadata)
        })
        .collect();
    (Schema::new(fields), as_text)
}

fn declared_schema(declared: &[ColumnContract]) -> SchemaRef {
    Arc::new(Schema::new(
        declared
            .iter()
            .map(|c| Field::new(&c.name, c.data_type.clone(), true))
            .collect::<Vec<_>>(),
    ))
}

/// The product's schema: the declared columns, whose types the source must
/// hold (SQLite's declared types are only affinities: there the contract's
/// type is what values are read as). Values are converted to the declared
/// types as they are read.
fn contract_schema(
    found: &Schema,
    declared: &[ColumnContract],
    dialect: Dialect,
) -> Result<SchemaRef, String> {
    if declared.is_empty() {
        return Ok(Arc::new(found.clone()));
    }
    check_contract(
        found,
        declared,
        dialect != Dialect::Sqlite,
        "the source table",
    )?;
    Ok(declared_schema(declared))
}

#[async_trait]
impl TableProvider for RemoteTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        let schema = DFSchema::try_from(self.schema.as_ref().clone())?;
        Ok(filters
            .iter()
            .map(|f| {
                if self.source.options.pushdown
                    && expr_pushable(&unqualified(f), &schema, self.source.dialect)
                {
                    TableProviderFilterPushDown::Exact
                } else {
                    TableProviderFilterPushDown::Unsupported
                }
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let dialect = self.source.dialect;
        let unparser = Unparser::new(dialect.unparser_dialect());
        // Filters the source is sent; any other is applied here.
        let mut sent = Vec::new();
        let mut kept = Vec::new();
        for filter in filters {
            let written = super::collation::for_source(unqualified(filter), &self.schema, dialect)
                .and_then(|f| unparser.expr_to_sql(&f));
            match written {
                Ok(sql) if self.source.options.pushdown => sent.push(sql.to_string()),
                _ => kept.push(filter.clone()),
            }
        }
        // The columns read: the projection's, and those the kept filters need.
        let mut indices: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..self.schema.fields().len()).collect(),
        };
        let output_len = indices.len();
        for filter in &kept {
            for column in filter.column_refs() {
                if let Ok(i) = self.schema.index_of(&column.name)
                    && !indices.contains(&i)
                {
                    indices.push(i);
                }
            }
        }
        let read = Arc::new(self.schema.project(&indices)?);
        let columns = if indices.is_empty() {
            "1".to_string()
        } else {
            indices
                .iter()
                .map(|&i| quoted_name(&[self.schema.field(i).name().clone()]))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let statement = |from: &str| {
            let mut sql = format!("SELECT {columns} FROM {from}");
            if !sent.is_empty() {
                sql.push_str(&format!(" WHERE {}", sent.join(" AND ")));
            }
            if let Some(limit) = limit.filter(|_| kept.is_empty() && self.source.options.pushdown) {
                sql.push_str(&format!(" LIMIT {limit}"));
            }
            sql
        };
        let sql = statement(&self.sent_from(self.name()));
        let stats = self.stats();
        // Read in parts where the source is asked for more than columns,
        // and where no index could narrow the rows read: by a filter sent,
        // or by join keys sent later on a column read.
        let key = stats.rowid.as_ref().and_then(|rowid| rowid.key.as_deref());
        let filtered: Vec<String> = filters
            .iter()
            .flat_map(|filter| filter.column_refs())
            .map(|column| column.name.clone())
            .collect();
        let narrowed = stats.indexed.as_deref().is_none_or(|indexed| {
            indices
                .iter()
                .map(|&i| self.schema.field(i).name())
                .chain(filtered.iter())
                .any(|column| index_narrows(indexed, key, column))
        });
        let parts: Vec<String> = if !self.source.options.pushdown || limit.is_some() || narrowed {
            Vec::new()
        } else {
            self.sent_in_parts(self.name(), &stats)
                .iter()
                .map(|from| statement(from))
                .collect()
        };
        let exec_schema = if indices.is_empty() {
            // `SELECT 1`: one placeholder column, dropped below.
            Arc::new(Schema::new(vec![Field::new(
                "placeholder",
                DataType::Int64,
                true,
            )]))
        } else {
            Arc::clone(&read)
        };
        let rows = stats
            .rows
            .map(|rows| super::pushdown::scanned(rows, !sent.is_empty(), limit));
        let exec: Arc<dyn ExecutionPlan> = Arc::new(
            RemoteExec::new(
                Arc::clone(&self.source),
                sql.clone(),
                sql,
                self.product.clone(),
                exec_schema,
            )
            .with_estimated_rows(rows)
            .with_key_columns(self.key_columns.clone())
            .with_parts(parts),
        );
        let exec: Arc<dyn ExecutionPlan> = match conjunction(kept) {
            Some(predicate) => {
                let df_schema = DFSchema::try_from(read.as_ref().clone())?;
                let predicate = state.create_physical_expr(unqualified(&predicate), &df_schema)?;
                Arc::new(FilterExec::try_new(predicate, exec)?)
            }
            None => exec,
        };
        if indices.len() == output_len && !indices.is_empty() {
            return Ok(exec);
        }
        // Drop the columns only the filters needed (or the placeholder).
        let exec_schema = exec.schema();
        let keep: Vec<(Arc<dyn datafusion::physical_expr::PhysicalExpr>, String)> = (0..output_len)
            .map(|i| {
                let name = exec_schema.field(i).name().clone();
                (
                    Arc::new(datafusion::physical_expr::expressions::Column::new(
                        &name, i,
                    )) as _,
                    name,
                )
            })
            .collect();
        Ok(Arc::new(
            datafusion::physical_plan::projection::ProjectionExec::try_new(keep, exec)?,
        ))
    }
}

/// The rows a part of a table read in parts holds at least (see
/// [`RemoteTable::sent_in_parts`]): a part's statement costs a connection
/// and a thread, worth it when SQLite scans this many rows or more.
const PART_ROWS: u64 = 100_000;

/// Whether an index could narrow the rows SQLite reads by `column`, of a
/// table whose `indexed` columns and rowid `key` are these: a column of an
/// index other than the rowid's own, which a range of rowids would have
/// SQLite scan the range instead of seek by.
pub(crate) fn index_narrows(indexed: &HashSet<String>, key: Option<&str>, column: &str) -> bool {
    indexed.contains(column) && key != Some(column)
}

/// Parts a table is read in at most: one a core, up to 8.
fn read_parts() -> u64 {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8) as u64)
}

/// Conditions on `rowid` (the name SQL reads it by) that split the rowids
/// of a table of about `rows` rows (its largest rowid) into at most
/// `parts` ranges of at least [`PART_ROWS`]: the first range is open below
/// and the last above, so the conditions hold for every row between them
/// once, whatever the table holds now. Empty when the table is not that
/// large.
fn rowid_ranges(rowid: &str, rows: u64, parts: u64) -> Vec<String> {
    let parts = parts.min(rows / PART_ROWS);
    if parts < 2 {
        return Vec::new();
    }
    let bounds: Vec<u64> = (1..parts).map(|i| rows * i / parts).collect();
    (0..bounds.len() + 1)
        .map(
            |i| match (i.checked_sub(1).map(|j| bounds[j]), bounds.get(i)) {
                (None, Some(high)) => format!("{rowid} <= {high}"),
                (Some(low), Some(high)) => format!("{rowid} > {low} AND {rowid} <= {high}"),
                (Some(low), None) => format!("{rowid} > {low}"),
                (None, None) => unreachable!("at least two parts"),
            },
        )
        .collect()
}

/// How long a table's statistics are used before they are read again.
const STATS_REREAD: Duration = Duration::from_secs(300);

/// What a source tells of a table for planning.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct TableStats {
    /// About how many rows it holds ([`Source::table_rows`]).
    pub(crate) rows: Option<u64>,
    /// The columns the source finds its rows by, where it needs them to
    /// join ([`Source::indexed_columns`]).
    pub(crate) indexed: Option<Arc<HashSet<String>>>,
    /// How a SQLite table numbers its rows ([`Source::rowid`]).
    pub(crate) rowid: Option<Rowid>,
}

impl TableStats {
    async fn read(source: &Source, table: &[String]) -> Self {
        Self {
            rows: source.table_rows(table).await,
            indexed: source.indexed_columns(table).await.map(Arc::new),
            rowid: source.rowid(table).await,
        }
    }

    /// Takes what `read` tells; what it does not (a read that failed)
    /// stays as the read before told it.
    fn updated(&mut self, read: TableStats) {
        if read.rows.is_some() {
            self.rows = read.rows;
        }
        if read.indexed.is_some() {
            self.indexed = read.indexed;
        }
        if read.rowid.is_some() {
            self.rowid = read.rowid;
        }
    }
}

/// A table's statistics, read again in the background when they are asked
/// for after they are `every` old.
#[derive(Debug)]
struct LiveStats {
    /// Shared with the read running in the background.
    stats: Arc<parking_lot::RwLock<TableStats>>,
    /// When the statistics were last read (or a read was started).
    read_at: parking_lot::Mutex<Instant>,
    every: Duration,
}

impl LiveStats {
    fn new(stats: TableStats, every: Duration) -> Self {
        Self {
            stats: Arc::new(parking_lot::RwLock::new(stats)),
            read_at: parking_lot::Mutex::new(Instant::now()),
            every,
        }
    }

    /// The statistics as they are; when they are older than `every`, `read`
    /// is started on the current runtime (one read at a time) to update
    /// them.
    fn current<F, R>(&self, read: R) -> TableStats
    where
        R: FnOnce() -> F,
        F: Future<Output = TableStats> + Send + 'static,
    {
        {
            let mut read_at = self.read_at.lock();
            if read_at.elapsed() >= self.every
                && let Ok(runtime) = tokio::runtime::Handle::try_current()
            {
                *read_at = Instant::now();
                let stats = Arc::clone(&self.stats);
                let read = read();
                runtime.spawn(async move {
                    let read = read.await;
                    stats.write().updated(read);
                });
            }
        }
        self.stats.read().clone()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    fn stats(rows: Option<u64>, indexed: &[&str]) -> TableStats {
        TableStats {
            rows,
            indexed: (!indexed.is_empty())
                .then(|| Arc::new(indexed.iter().map(|c| c.to_string()).collect())),
            rowid: None,
        }
    }

    #[test]
    fn rowid_ranges_read_every_row_once() {
        assert!(rowid_ranges("rowid", 199_999, 4).is_empty());
        assert!(rowid_ranges("rowid", 10_000_000, 1).is_empty());
        assert_eq!(
            rowid_ranges("rowid", 250_000, 8),
            ["rowid <= 125000", "rowid > 125000"]
        );
        assert_eq!(
            rowid_ranges("_rowid_", 900_000, 3),
            [
                "_rowid_ <= 300000",
                "_rowid_ > 300000 AND _rowid_ <= 600000",
                "_rowid_ > 600000"
            ]
        );
    }

    #[tokio::test]
    async fn table_stats_are_read_again_once_they_are_old() {
        let reads = Arc::new(AtomicU64::new(0));
        let read = |answer: TableStats| {
            let reads = Arc::clone(&reads);
            move || {
                reads.fetch_add(1, Ordering::Relaxed);
                async move { answer }
            }
        };
        let reads_made = || reads.load(Ordering::Relaxed);
        let settle = || tokio::time::sleep(Duration::from_millis(20));
        let old = || tokio::time::sleep(Duration::from_millis(120));
        let live = LiveStats::new(stats(Some(10), &["id"]), Duration::from_millis(100));
        // Fresh: answered as they are, nothing read.
        assert_eq!(
            live.current(read(stats(Some(99), &[]))),
            stats(Some(10), &["id"])
        );
        settle().await;
        assert_eq!(
            live.current(read(stats(Some(99), &[]))),
            stats(Some(10), &["id"])
        );
        assert_eq!(reads_made(), 0);
        // Old: answered as they are while they are read again, then
        // replaced (an index made since included), and fresh again.
        old().await;
        let grown = stats(Some(1000), &["id", "parent"]);
        assert_eq!(live.current(read(grown.clone())), stats(Some(10), &["id"]));
        settle().await;
        assert_eq!(live.current(read(stats(Some(5), &[]))), grown);
        assert_eq!(reads_made(), 1);
        // A read that fails keeps what the one before told.
        old().await;
        assert_eq!(live.current(read(stats(None, &[]))), grown);
        settle().await;
        assert_eq!(live.current(read(stats(Some(7), &[]))), grown);
        assert_eq!(reads_made(), 2);
        // Unknown when opened: learned by the next read.
        let unknown = LiveStats::new(TableStats::default(), Duration::ZERO);
        assert_eq!(
            unknown.current(read(stats(Some(3), &[]))),
            TableStats::default()
        );
        settle().await;
        assert_eq!(unknown.current(read(stats(Some(4), &[]))).rows, Some(3));
        // Without a runtime to read on, they are answered as they are.
        let live = Arc::new(LiveStats::new(stats(Some(8), &[]), Duration::ZERO));
        let answered = std::thread::spawn({
            let live = Arc::clone(&live);
            move || live.current(|| async { stats(Some(9), &[]) })
        })
        .join()
        .unwrap();
        assert_eq!(answered.rows, Some(8));
    }
}
