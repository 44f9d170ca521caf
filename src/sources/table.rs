//! A product that names a table (or view) of a SQL or Flight SQL source.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
use super::{Dialect, Discovery, Source, quoted_name, table_parts};
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
    /// About how many rows the table holds (see [`RemoteTable::rows`]).
    rows: RowEstimate,
    /// The columns the source finds rows by, where it needs them to join
    /// (see [`Source::indexed_columns`]).
    pub(crate) indexed: Option<Arc<HashSet<String>>>,
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

        let rows = RowEstimate::new(source.table_rows(&remote).await, ROWS_REREAD);
        let indexed = source.indexed_columns(&remote).await.map(Arc::new);
        Ok(Self {
            source,
            product,
            remote,
            schema,
            read_as_text,
            rows,
            indexed,
            key_columns,
        })
    }

    /// About how many rows the table holds: read when the product was
    /// opened, and read again in the background when a plan asks more than
    /// [`ROWS_REREAD`] after the last read, so that the size joins are
    /// planned by follows a table that grows or shrinks while the gateway
    /// runs.
    pub(crate) fn rows(&self) -> Option<u64> {
        let source = Arc::clone(&self.source);
        let remote = self.remote.clone();
        self.rows
            .current(move || async move { source.table_rows(&remote).await })
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
        if fields.iter().all(|field| read(field).is_none()) {
            return format!("{table} AS {alias}");
        }
        let columns: Vec<String> = fields
            .iter()
            .map(|field| {
                read(field).unwrap_or_else(|| quoted_name(std::slice::from_ref(field.name())))
            })
            .collect();
        format!("(SELECT {} FROM {table}) AS {alias}", columns.join(", "))
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
        let mut sql = format!("SELECT {columns} FROM {}", self.sent_from(self.name()));
        if !sent.is_empty() {
            sql.push_str(&format!(" WHERE {}", sent.join(" AND ")));
        }
        if let Some(limit) = limit.filter(|_| kept.is_empty() && self.source.options.pushdown) {
            sql.push_str(&format!(" LIMIT {limit}"));
        }
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
        let rows = self.rows().map(|rows| {
            let rows = if sent.is_empty() {
                rows
            } else {
                super::pushdown::filtered(rows)
            };
            limit.map_or(rows, |limit| rows.min(limit as u64))
        });
        let exec: Arc<dyn ExecutionPlan> = Arc::new(
            RemoteExec::new(
                Arc::clone(&self.source),
                sql.clone(),
                sql,
                self.product.clone(),
                exec_schema,
            )
            .with_estimated_rows(rows)
            .with_key_columns(self.key_columns.clone()),
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

/// How long a table's row estimate is used before it is read again.
const ROWS_REREAD: Duration = Duration::from_secs(300);

/// An estimate of a table's rows that is read again, in the background,
/// when it is asked for after it is `every` old. A read that fails keeps
/// the estimate before it.
#[derive(Debug)]
struct RowEstimate {
    /// The rows, shared with the read running in the background;
    /// `u64::MAX` when unknown.
    rows: Arc<AtomicU64>,
    /// When the estimate was last read (or a read was started).
    read_at: parking_lot::Mutex<Instant>,
    every: Duration,
}

impl RowEstimate {
    fn new(rows: Option<u64>, every: Duration) -> Self {
        Self {
            rows: Arc::new(AtomicU64::new(rows.unwrap_or(u64::MAX))),
            read_at: parking_lot::Mutex::new(Instant::now()),
            every,
        }
    }

    /// The estimate as it is; when it is older than `every`, `read` is
    /// started on the current runtime (one read at a time) to replace it.
    fn current<F, R>(&self, read: R) -> Option<u64>
    where
        R: FnOnce() -> F,
        F: Future<Output = Option<u64>> + Send + 'static,
    {
        {
            let mut read_at = self.read_at.lock();
            if read_at.elapsed() >= self.every
                && let Ok(runtime) = tokio::runtime::Handle::try_current()
            {
                *read_at = Instant::now();
                let rows = Arc::clone(&self.rows);
                let read = read();
                runtime.spawn(async move {
                    if let Some(read) = read.await {
                        rows.store(read.min(u64::MAX - 1), Ordering::Relaxed);
                    }
                });
            }
        }
        let rows = self.rows.load(Ordering::Relaxed);
        (rows != u64::MAX).then_some(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_row_estimate_is_read_again_once_it_is_old() {
        let reads = Arc::new(AtomicU64::new(0));
        let read = |answer: Option<u64>| {
            let reads = Arc::clone(&reads);
            move || {
                reads.fetch_add(1, Ordering::Relaxed);
                async move { answer }
            }
        };
        let reads_made = || reads.load(Ordering::Relaxed);
        let settle = || tokio::time::sleep(Duration::from_millis(20));
        let estimate = RowEstimate::new(Some(10), Duration::from_millis(100));
        // Fresh: answered as it is, nothing read.
        assert_eq!(estimate.current(read(Some(99))), Some(10));
        settle().await;
        assert_eq!(estimate.current(read(Some(99))), Some(10));
        assert_eq!(reads_made(), 0);
        // Old: answered as it is while it is read again, then replaced,
        // and fresh again.
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(estimate.current(read(Some(1000))), Some(10));
        settle().await;
        assert_eq!(estimate.current(read(Some(5))), Some(1000));
        assert_eq!(reads_made(), 1);
        // A read that fails keeps the estimate before it.
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(estimate.current(read(None)), Some(1000));
        settle().await;
        assert_eq!(estimate.current(read(Some(7))), Some(1000));
        assert_eq!(reads_made(), 2);
        // Unknown when opened: learned by the next read.
        let unknown = RowEstimate::new(None, Duration::ZERO);
        assert_eq!(unknown.current(read(Some(3))), None);
        settle().await;
        assert_eq!(unknown.current(read(Some(4))), Some(3));
        // Without a runtime to read on, it is answered as it is.
        let estimate = Arc::new(RowEstimate::new(Some(8), Duration::ZERO));
        let answered = std::thread::spawn({
            let estimate = Arc::clone(&estimate);
            move || estimate.current(|| async { Some(9) })
        })
        .join()
        .unwrap();
        assert_eq!(answered, Some(8));
    }
}
