//! Parquet products, and reading their low-cardinality string columns as
//! dictionaries. A string column stored dictionary-encoded (a region, a
//! status, a tenant: what row filters are usually written over) can be
//! decoded straight into `Dictionary(Int32, Utf8)`, which costs about half
//! of decoding it into string views, and a comparison with a constant then
//! runs once per distinct value rather than once per row. Policies ask for
//! it for the columns their row filter alone reads (see
//! `PolicyTable::scan`); every other read sees the product's own types.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow::datatypes::{Field, Fields, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::stats::Precision;
use datafusion::common::{Statistics, TableReference};
use datafusion::config::TableParquetOptions;
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::file_format::file_compression_type::FileCompressionType;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTableUrl};
use datafusion::datasource::physical_plan::parquet::metadata::DFParquetMetadata;
use datafusion::datasource::physical_plan::{
    FileScanConfig, FileScanConfigBuilder, FileSinkConfig, FileSource, ParquetSource,
};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::table_schema::TableSchema;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_expr::LexRequirement;
use datafusion::physical_expr_common::sort_expr::LexOrdering;
use datafusion::physical_plan::ExecutionPlan;
use futures::TryStreamExt;
use object_store::{ObjectMeta, ObjectStore};
use parquet::arrow::parquet_to_arrow_schema;
use parquet::file::metadata::ParquetMetaData;

use super::files::listing_table;
use super::hot_row_groups::hot_or_planned;
use super::listed_version::ListedVersionReaders;
use super::stored_values::{
    Condition, StoredValues, dictionary_len, is_dictionary_encoded, is_string, top_level_leaf,
};
use crate::policy::{DictionaryScan, ScanRequest, WhereTrue, dictionary_type};

/// A Parquet product: its listing table, and the means to scan it with
/// some string columns read as dictionaries.
#[derive(Debug)]
pub(crate) struct ParquetProduct {
    table: Arc<dyn TableProvider>,
    url: ListingTableUrl,
    options: TableParquetOptions,
    extension: String,
    /// The string columns stored dictionary-encoded in every file the
    /// product had when it was opened: only these are worth reading as
    /// dictionaries (a column whose values overflowed the dictionary would
    /// be hashed back into one, row by row). Files written since may differ;
    /// they are read correctly either way.
    dictionary_encoded: BTreeSet<usize>,
    /// How many distinct values each of those columns holds, as the files'
    /// dictionary pages tell (when they are small): what the planner
    /// estimates an equality's selectivity from (see `query::selectivity`).
    distinct_counts: BTreeMap<usize, usize>,
    /// What the files show of their columns' values.
    values: StoredValues,
    /// Conditions recently not shown true for every row: not tried again
    /// for a while (a row filter that hides rows would otherwise cost a
    /// second listing of the files at each scan).
    not_shown: moka::sync::Cache<String, ()>,
}

/// How long a condition not shown true is not tried again.
const NOT_SHOWN_TTL: std::time::Duration = std::time::Duration::from_secs(30);

impl ParquetProduct {
    /// Wraps `table`, the listing of the Parquet files at `url` (files
    /// ending in `extension`) read with `options`.
    pub(crate) async fn new(
        state: &dyn Session,
        table: Arc<dyn TableProvider>,
        url: ListingTableUrl,
        options: TableParquetOptions,
        extension: &str,
    ) -> Self {
        let (dictionary_encoded, distinct_counts) =
            dictionary_encoded_columns(state, &url, extension, &table.schema())
                .await
                .unwrap_or_default();
        Self {
            table,
            url,
            options,
            extension: extension.to_string(),
            dictionary_encoded,
            distinct_counts,
            values: StoredValues::new(),
            not_shown: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(NOT_SHOWN_TTL)
                .build(),
        }
    }

    /// Scans as `request` says, with each of its `dictionaries` that every
    /// file stored dictionary-encoded (when the product was opened) read as
    /// a dictionary, and, given a `proof`, has it shown over the files read.
    async fn scan_as(
        &self,
        state: &dyn Session,
        request: &ScanRequest,
        proof: Option<Arc<Proof>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let projection = Some(&request.projection);
        let chosen: Vec<usize> = request
            .dictionaries
            .intersection(&self.dictionary_encoded)
            .copied()
            .collect();
        if chosen.is_empty() && proof.is_none() {
            let plan = self
                .table
                .scan(state, projection, &request.filters, request.limit)
                .await?;
            let plan = with_distinct_counts(plan, &self.distinct_counts);
            return Ok(hot_or_planned(state, plan, &request.filters).await);
        }
        let schema = self.table.schema();
        let fields: Fields = schema
            .fields()
            .iter()
            .enumerate()
            .map(|(index, field)| {
                if chosen.contains(&index) {
                    Arc::new(field.as_ref().clone().with_data_type(dictionary_type()))
                } else {
                    Arc::clone(field)
                }
            })
            .collect();
        let schema = Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()));
        // Statistics cached for a reading with dictionaries are kept apart
        // from those of the product's own types.
        let url = if chosen.is_empty() {
            self.url.clone()
        } else {
            self.url
                .clone()
                .with_table_ref(TableReference::bare(format!("dictionaries {chosen:?}")))
        };
        let format = DictionaryParquet {
            inner: ParquetFormat::default().with_options(self.options.clone()),
            proof,
        };
        let options =
            ListingOptions::new(Arc::new(format)).with_file_extension(self.extension.clone());
        let plan = listing_table(state, url, options, schema)?
            .scan(state, projection, &request.filters, request.limit)
            .await?;
        let plan = with_distinct_counts(plan, &self.distinct_counts);
        Ok(hot_or_planned(state, plan, &request.filters).await)
    }
}

/// `plan`, a scan of the product's files, with the distinct counts of the
/// columns in `counts` (by index in the product's schema) among its
/// statistics where they have none.
fn with_distinct_counts(
    plan: Arc<dyn ExecutionPlan>,
    counts: &BTreeMap<usize, usize>,
) -> Arc<dyn ExecutionPlan> {
    let Some(config) = plan
        .downcast_ref::<DataSourceExec>()
        .and_then(|exec| exec.data_source().downcast_ref::<FileScanConfig>())
    else {
        return plan;
    };
    let mut statistics = config.statistics();
    let mut added = false;
    for (&index, &count) in counts {
        if let Some(column) = statistics.column_statistics.get_mut(index)
            && column.distinct_count == Precision::Absent
        {
            column.distinct_count = Precision::Inexact(count);
            added = true;
        }
    }
    if !added {
        return plan;
    }
    let config = FileScanConfigBuilder::from(config.clone())
        .with_statistics(statistics)
        .build();
    DataSourceExec::from_data_source(config)
}

/// Conditions a scan leaves out, to be shown true for every row of every
/// file it reads, each over the one string column named beside it (see
/// `stored_values`). Whether they were is known once the scan is planned.
#[derive(Debug)]
struct Proof {
    conditions: Vec<(Expr, String)>,
    /// The product's schema: the types the conditions are compiled for.
    schema: SchemaRef,
    values: StoredValues,
    /// For each condition, whether it was shown over every file.
    shown: parking_lot::Mutex<Option<Vec<bool>>>,
}

/// `table` as a [`DictionaryScan`], when it is a Parquet product.
pub(crate) fn as_dictionary_scan(
    table: &Arc<dyn TableProvider>,
) -> Option<Arc<dyn DictionaryScan>> {
    let any: Arc<dyn Any + Send + Sync> = Arc::clone(table) as _;
    any.downcast::<ParquetProduct>()
        .ok()
        .map(|product| product as Arc<dyn DictionaryScan>)
}

#[async_trait]
impl DictionaryScan for ParquetProduct {
    async fn scan_with_dictionaries(
        &self,
        state: &dyn Session,
        request: &ScanRequest,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.scan_as(state, request, None).await
    }

    async fn scan_where_true(
        &self,
        state: &dyn Session,
        request: &ScanRequest,
        conditions: &[(Expr, String)],
    ) -> Result<WhereTrue> {
        let may_hold: Vec<bool> = conditions
            .iter()
            .map(|(condition, _)| !self.not_shown.contains_key(&condition.to_string()))
            .collect();
        if may_hold.iter().any(|&may| !may) {
            return Ok(WhereTrue::Shown(may_hold));
        }
        let proof = Arc::new(Proof {
            conditions: conditions.to_vec(),
            schema: self.table.schema(),
            values: self.values.clone(),
            shown: parking_lot::Mutex::new(None),
        });
        let scan = self.scan_as(state, request, Some(Arc::clone(&proof))).await;
        // Shown over the very files the plan reads, or not used at all (a
        // listing that found no file shows nothing either).
        let shown = proof.shown.lock().take();
        match shown {
            Some(shown) if shown.iter().all(|&holds| holds) => scan.map(WhereTrue::Scan),
            Some(shown) => {
                for ((condition, _), holds) in conditions.iter().zip(&shown) {
                    if !holds {
                        self.not_shown.insert(condition.to_string(), ());
                    }
                }
                Ok(WhereTrue::Shown(shown))
            }
            None => Ok(WhereTrue::Shown(vec![false; conditions.len()])),
        }
    }
}

#[async_trait]
impl TableProvider for ParquetProduct {
    fn schema(&self) -> SchemaRef {
        self.table.schema()
    }

    fn table_type(&self) -> TableType {
        self.table.table_type()
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        self.table.supports_filters_pushdown(filters)
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let plan = self.table.scan(state, projection, filters, limit).await?;
        let plan = with_distinct_counts(plan, &self.distinct_counts);
        Ok(hot_or_planned(state, plan, filters).await)
    }
}

/// The columns of `schema` that hold strings and are stored
/// dictionary-encoded in every row group of every file at `url`, and of
/// those, how many distinct values each holds, estimated from the
/// dictionary pages of the first row groups (when every one read is small).
async fn dictionary_encoded_columns(
    state: &dyn Session,
    url: &ListingTableUrl,
    extension: &str,
    schema: &Schema,
) -> Result<(BTreeSet<usize>, BTreeMap<usize, usize>)> {
    let mut candidates: BTreeSet<usize> = schema
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, field)| is_string(field.data_type()))
        .map(|(index, _)| index)
        .collect();
    // For each candidate, the (distinct values, rows) of each row group
    // counted; `None` once one could not be counted.
    let mut counted: BTreeMap<usize, Option<Vec<(usize, usize)>>> = BTreeMap::new();
    let mut rows = 0;
    let mut counted_rows = 0;
    let mut groups_counted = 0;
    let store = state.runtime_env().object_store(url)?;
    let mut files = url.list_all_files(state, store.as_ref(), extension).await?;
    while let Some(file) = files.try_next().await? {
        if candidates.is_empty() {
            break;
        }
        let metadata = footer(state, store.as_ref(), &file).await?;
        let columns = metadata.file_metadata().schema_descr();
        rows += usize::try_from(metadata.file_metadata().num_rows()).unwrap_or(0);
        let mut leaves = BTreeMap::new();
        candidates.retain(|&index| {
            let Some(leaf) = top_level_leaf(columns, schema.field(index).name()) else {
                return false;
            };
            leaves.insert(index, leaf);
            metadata
                .row_groups()
                .iter()
                .all(|row_group| is_dictionary_encoded(row_group.column(leaf)))
        });
        for row_group in metadata.row_groups() {
            if groups_counted == ROW_GROUPS_COUNTED {
                break;
            }
            groups_counted += 1;
            let group_rows = usize::try_from(row_group.num_rows()).unwrap_or(0);
            counted_rows += group_rows;
            for &index in &candidates {
                let entry = counted.entry(index).or_insert_with(|| Some(Vec::new()));
                let Some(groups) = entry else {
                    continue;
                };
                let chunk = row_group.column(leaves[&index]);
                // A page too large to count, or one that cannot be read,
                // leaves the column without an estimate.
                match dictionary_len(store.as_ref(), &file, chunk).await {
                    Ok(Some(count)) => groups.push((count, group_rows)),
                    Ok(None) | Err(_) => *entry = None,
                }
            }
        }
    }
    let distinct = counted
        .into_iter()
        .filter(|(index, _)| candidates.contains(index))
        .filter_map(|(index, groups)| {
            let count = distinct_estimate(&groups?, counted_rows, rows)?;
            Some((index, count))
        })
        .collect();
    Ok((candidates, distinct))
}

/// The row groups (the first ones listed) whose dictionary pages are read
/// to count distinct values.
const ROW_GROUPS_COUNTED: usize = 16;

/// A column's distinct count from its row groups' (distinct values, rows),
/// read over `counted_rows` of the product's `rows`: a column whose values
/// repeat within each row group is taken to hold the same values in each
/// (the most any holds); one whose values hardly repeat, different values
/// in each (their sum, scaled to all rows).
fn distinct_estimate(groups: &[(usize, usize)], counted_rows: usize, rows: usize) -> Option<usize> {
    let most = groups.iter().map(|&(count, _)| count).max()?;
    let repeats = groups
        .iter()
        .all(|&(count, group_rows)| count.saturating_mul(2) <= group_rows);
    if repeats {
        return Some(most);
    }
    let sum: usize = groups.iter().map(|&(count, _)| count).sum();
    let scaled = (sum as f64) * (rows as f64) / (counted_rows.max(1) as f64);
    Some((scaled as usize).clamp(1, rows.max(1)))
}

/// A file's footer, through the runtime's metadata cache (the cache scans
/// read footers from).
pub(super) async fn footer(
    state: &dyn Session,
    store: &dyn ObjectStore,
    file: &ObjectMeta,
) -> Result<Arc<ParquetMetaData>> {
    DFParquetMetadata::new(store, file)
        .with_file_metadata_cache(Some(
            state.runtime_env().cache_manager.get_file_metadata_cache(),
        ))
        .fetch_metadata()
        .await
}

/// DataFusion's Parquet format, reading each file's string columns that the
/// table declares `Dictionary(Int32, Utf8)` as dictionaries, decoded from
/// the file's own dictionary encoding (rather than read as strings and cast);
/// with a proof, planning a scan only when it is shown over every file read.
#[derive(Debug)]
struct DictionaryParquet {
    inner: ParquetFormat,
    proof: Option<Arc<Proof>>,
}

impl DictionaryParquet {
    /// The Arrow schema to read `file` with: its own, with each string
    /// column that `table` declares a dictionary read as one. A file whose
    /// footer cannot be read gets none, and the scan reports why.
    async fn file_schema(
        &self,
        state: &dyn Session,
        store: &dyn ObjectStore,
        file: &ObjectMeta,
        table: &Schema,
    ) -> Option<SchemaRef> {
        let metadata = footer(state, store, file).await.ok()?;
        let footer = metadata.file_metadata();
        let stored =
            parquet_to_arrow_schema(footer.schema_descr(), footer.key_value_metadata()).ok()?;
        let fields: Fields = stored
            .fields()
            .iter()
            .map(|field| {
                let wanted = table
                    .field_with_name(field.name())
                    .is_ok_and(|f| *f.data_type() == dictionary_type());
                if wanted && is_string(field.data_type()) {
                    Arc::new(Field::clone(field).with_data_type(dictionary_type()))
                } else {
                    Arc::clone(field)
                }
            })
            .collect();
        Some(Arc::new(Schema::new_with_metadata(
            fields,
            stored.metadata().clone(),
        )))
    }
}

#[async_trait]
impl FileFormat for DictionaryParquet {
    fn get_ext(&self) -> String {
        self.inner.get_ext()
    }

    fn get_ext_with_compression(&self, compression: &FileCompressionType) -> Result<String> {
        self.inner.get_ext_with_compression(compression)
    }

    fn compression_type(&self) -> Option<FileCompressionType> {
        self.inner.compression_type()
    }

    async fn infer_schema(
        &self,
        state: &dyn Session,
        store: &Arc<dyn ObjectStore>,
        objects: &[ObjectMeta],
    ) -> Result<SchemaRef> {
        self.inner.infer_schema(state, store, objects).await
    }

    async fn infer_stats(
        &self,
        state: &dyn Session,
        store: &Arc<dyn ObjectStore>,
        table_schema: SchemaRef,
        object: &ObjectMeta,
    ) -> Result<Statistics> {
        self.inner
            .infer_stats(state, store, table_schema, object)
            .await
    }

    async fn infer_ordering(
        &self,
        state: &dyn Session,
        store: &Arc<dyn ObjectStore>,
        table_schema: SchemaRef,
        object: &ObjectMeta,
    ) -> Result<Option<LexOrdering>> {
        self.inner
            .infer_ordering(state, store, table_schema, object)
            .await
    }

    async fn infer_stats_and_ordering(
        &self,
        state: &dyn Session,
        store: &Arc<dyn ObjectStore>,
        table_schema: SchemaRef,
        object: &ObjectMeta,
    ) -> Result<datafusion::datasource::file_format::FileMeta> {
        self.inner
            .infer_stats_and_ordering(state, store, table_schema, object)
            .await
    }

    async fn create_physical_plan(
        &self,
        state: &dyn Session,
        mut conf: FileScanConfig,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let store = state
            .runtime_env()
            .object_store(conf.object_store_url.clone())?;
        if let Some(proof) = &self.proof {
            // Compiled once for all files; one that does not compile is
            // not shown.
            let conditions: Vec<Option<Condition>> = proof
                .conditions
                .iter()
                .map(|(condition, column)| {
                    Condition::new(state, &proof.schema, condition, column).ok()
                })
                .collect();
            let mut shown: Vec<bool> = conditions.iter().map(Option::is_some).collect();
            for file in conf.file_groups.iter().flat_map(|group| group.iter()) {
                for (condition, holds) in conditions.iter().zip(shown.iter_mut()) {
                    if let (Some(condition), true) = (condition, *holds) {
                        *holds = proof
                            .values
                            .holds_in(state, store.as_ref(), &file.object_meta, condition)
                            .await;
                    }
                }
            }
            let all = shown.iter().all(|&holds| holds);
            *proof.shown.lock() = Some(shown);
            if !all {
                return Err(DataFusionError::Plan(
                    "the conditions left out are not shown to hold".into(),
                ));
            }
        }
        let table = Arc::clone(conf.file_schema());
        for group in &mut conf.file_groups {
            for index in 0..group.len() {
                let file = &mut group[index];
                if file.arrow_schema.is_none() {
                    file.arrow_schema = self
                        .file_schema(state, store.as_ref(), &file.object_meta, &table)
                        .await;
                }
            }
        }
        let url = conf.object_store_url.clone();
        let plan = self.inner.create_physical_plan(state, conf).await?;
        if self.proof.is_none() {
            return Ok(plan);
        }
        // The conditions left out were shown over the versions listed: the
        // scan reads those versions or fails.
        pinned_to_listed_versions(plan, store, &url)
    }

    async fn create_writer_physical_plan(
        &self,
        input: Arc<dyn ExecutionPlan>,
        state: &dyn Session,
        conf: FileSinkConfig,
        order_requirements: Option<LexRequirement>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.inner
            .create_writer_physical_plan(input, state, conf, order_requirements)
            .await
    }

    fn file_source(&self, table_schema: TableSchema) -> Arc<dyn FileSource> {
        self.inner.file_source(table_schema)
    }
}

/// `plan`, a Parquet scan, with every data read checked to come from the
/// version of the file its listing saw (see `listed_version`).
fn pinned_to_listed_versions(
    plan: Arc<dyn ExecutionPlan>,
    store: Arc<dyn ObjectStore>,
    url: &ObjectStoreUrl,
) -> Result<Arc<dyn ExecutionPlan>> {
    let not_parquet = || DataFusionError::Internal("a Parquet scan was expected".into());
    let exec = plan
        .downcast_ref::<DataSourceExec>()
        .ok_or_else(not_parquet)?;
    let config = exec
        .data_source()
        .downcast_ref::<FileScanConfig>()
        .ok_or_else(not_parquet)?;
    let source = config
        .file_source()
        .downcast_ref::<ParquetSource>()
        .ok_or_else(not_parquet)?;
    let footers = source
        .parquet_file_reader_factory()
        .cloned()
        .ok_or_else(not_parquet)?;
    let source = source
        .clone()
        .with_parquet_file_reader_factory(Arc::new(ListedVersionReaders::new(footers, store, url)));
    let config = FileScanConfigBuilder::from(config.clone())
        .with_source(Arc::new(source))
        .build();
    Ok(DataSourceExec::from_data_source(config))
}

#[cfg(test)]
mod tests {
    use arrow::array::{ArrayRef, AsArray, Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Int64Type};
    use datafusion::common::ScalarValue;
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    use datafusion::physical_plan::{collect, displayable};
    use datafusion::prelude::{SessionConfig, SessionContext, col, lit};
    use parquet::arrow::ArrowWriter;
    use parquet::file::properties::WriterProperties;

    use datafusion::physical_plan::statistics::{StatisticsArgs, StatisticsContext};

    use super::*;
    use crate::config::{CsvOptions, FileFormat};
    use crate::policy::{CallerProductView, PolicyTable};
    use crate::query::testing::physical_plan;

    /// `id` 0..1000; `region` EU, US, APAC or NULL in turn (dictionary
    /// encoded); `note` unique strings stored plain; in two files.
    fn write_people(dir: &std::path::Path) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("region", DataType::Utf8, true),
            Field::new("note", DataType::Utf8, false),
        ]));
        let properties = WriterProperties::builder()
            .set_column_dictionary_enabled("note".into(), false)
            .set_max_row_group_row_count(Some(128))
            .build();
        for (file, ids) in [("a.parquet", 0..600), ("b.parquet", 600..1000)] {
            let regions = ["EU", "US", "APAC"];
            let region: StringArray = ids
                .clone()
                .map(|id| regions.get(id as usize % 4).copied())
                .collect();
            let note: StringArray = ids.clone().map(|id| Some(format!("note {id}"))).collect();
            let columns: Vec<ArrayRef> = vec![
                Arc::new(Int64Array::from_iter_values(ids)),
                Arc::new(region),
                Arc::new(note),
            ];
            let batch = RecordBatch::try_new(Arc::clone(&schema), columns).expect("batch");
            write_file(&dir.join(file), &batch, properties.clone());
        }
    }

    /// Writes `batch` as the Parquet file at `path`.
    pub(super) fn write_file(
        path: &std::path::Path,
        batch: &RecordBatch,
        properties: WriterProperties,
    ) {
        let out = std::fs::File::create(path).expect("file");
        let mut writer =
            ArrowWriter::try_new(out, batch.schema(), Some(properties)).expect("writer");
        writer.write(batch).expect("write");
        writer.close().expect("close");
    }

    /// Runs `sql` over the people product in `dir` behind `row_filter`:
    /// the ids it returns (its first column), the type each Parquet scan
    /// reads `column` as, and the plan.
    pub(super) async fn run(
        ctx: &SessionContext,
        dir: &std::path::Path,
        row_filter: Expr,
        sql: &str,
        column: &str,
    ) -> (Vec<i64>, Vec<DataType>, String) {
        let product = open(ctx, dir).await;
        run_on(ctx, product, row_filter, sql, column).await
    }

    /// The Parquet product of the files in `dir`.
    pub(super) async fn open(
        ctx: &SessionContext,
        dir: &std::path::Path,
    ) -> Arc<dyn TableProvider> {
        open_at(ctx, &url::Url::from_directory_path(dir).expect("url")).await
    }

    /// The Parquet product whose files are at `url`.
    pub(super) async fn open_at(ctx: &SessionContext, url: &url::Url) -> Arc<dyn TableProvider> {
        super::super::files::open_file_product(
            &ctx.state(),
            &super::super::files::FileProduct {
                url: url.clone(),
                format: FileFormat::Parquet,
                csv: CsvOptions::default(),
                declared: Vec::new(),
                policy_columns: Vec::new(),
            },
        )
        .await
        .expect("product")
    }

    /// [`run`] over `product`.
    pub(super) async fn run_on(
        ctx: &SessionContext,
        product: Arc<dyn TableProvider>,
        row_filter: Expr,
        sql: &str,
        column: &str,
    ) -> (Vec<i64>, Vec<DataType>, String) {
        let plan = plan_on(ctx, product, row_filter, sql).await;
        let mut types = Vec::new();
        plan.apply(|node| {
            if node.downcast_ref::<DataSourceExec>().is_some()
                && let Ok(field) = node.schema().field_with_name(column)
            {
                types.push(field.data_type().clone());
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .expect("walk");
        let text = displayable(plan.as_ref()).indent(true).to_string();
        let batches = collect(plan, ctx.task_ctx()).await.expect("run");
        let mut ids: Vec<i64> = batches
            .iter()
            .flat_map(|b| b.column(0).as_primitive::<Int64Type>().values().to_vec())
            .collect();
        ids.sort_unstable();
        (ids, types, text)
    }

    /// The plan of `sql` over `product` as table `people`, behind a barrier
    /// with `row_filter`.
    pub(super) async fn plan_on(
        ctx: &SessionContext,
        product: Arc<dyn TableProvider>,
        row_filter: Expr,
        sql: &str,
    ) -> Arc<dyn ExecutionPlan> {
        let mut view = CallerProductView::unrestricted(product.schema().fields().len());
        view.row_filter = Some(row_filter);
        let dictionaries = as_dictionary_scan(&product);
        let table = PolicyTable::wrap("people".into(), product, dictionaries, &view);
        ctx.deregister_table("people").expect("deregister");
        ctx.register_table("people", table).expect("register");
        physical_plan(ctx, sql).await
    }

    /// The rows the planner expects out of `sql` over `product`, planned
    /// with meshgate's settings and rules, behind a barrier when `barrier`.
    async fn estimated_rows(product: &Arc<dyn TableProvider>, sql: &str, barrier: bool) -> usize {
        let ctx = crate::query::testing::gateway_session();
        let plan = if barrier {
            plan_on(&ctx, Arc::clone(product), lit(true), sql).await
        } else {
            ctx.register_table("people", Arc::clone(product))
                .expect("register");
            physical_plan(&ctx, sql).await
        };
        let statistics = StatisticsContext::new()
            .compute(plan.as_ref(), &StatisticsArgs::new())
            .expect("statistics");
        let plan = displayable(plan.as_ref()).indent(true);
        *statistics
            .num_rows
            .get_value()
            .unwrap_or_else(|| panic!("no row estimate for\n{plan}"))
    }

    #[tokio::test]
    async fn string_columns_count_their_distinct_values_from_dictionary_pages() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_people(dir.path());
        let ctx = SessionContext::new();
        let product = open(&ctx, dir.path()).await;
        let plan = product
            .scan(&ctx.state(), None, &[], None)
            .await
            .expect("scan");
        let statistics = StatisticsContext::new()
            .compute(plan.as_ref(), &StatisticsArgs::new())
            .expect("statistics");
        let distinct: Vec<_> = statistics
            .column_statistics
            .iter()
            .map(|column| column.distinct_count)
            .collect();
        // `id` is no string; `region` holds 3 values (and NULL) in every
        // row group; `note` is stored without a dictionary.
        assert_eq!(
            distinct,
            [Precision::Absent, Precision::Inexact(3), Precision::Absent]
        );

        // 1 000 rows; an equality passes one value in 3, a list of two 2 in
        // 3, its negation 1 in 3; with a condition on `note`, which has no
        // count, that one is taken to pass 20%; conditions on one column
        // pass different rows, on two, independent ones. Behind a barrier, the
        // estimate leaves it rounded to a power of two.
        for (condition, open, behind_barrier) in [
            ("region = 'EU'", 330, 256),
            ("region IN ('EU', 'US')", 670, 512),
            // (Each `<>` is taken as independent of the other.)
            ("region NOT IN ('EU', 'US')", 440, 512),
            ("region <> 'EU'", 670, 512),
            ("region = 'EU' OR region = 'US'", 670, 512),
            ("region = 'EU' OR note = 'note 1'", 200, 256),
            ("region = 'EU' AND note LIKE 'note 1%'", 70, 64),
            // Nothing to estimate from: DataFusion's 20%.
            ("note = 'note 1'", 200, 256),
        ] {
            let sql = format!("SELECT id FROM people WHERE {condition}");
            assert_eq!(
                estimated_rows(&product, &sql, false).await,
                open,
                "{condition}"
            );
            assert_eq!(
                estimated_rows(&product, &sql, true).await,
                behind_barrier,
                "{condition} behind a barrier"
            );
        }
    }

    #[test]
    fn distinct_counts_repeat_across_row_groups_or_add_up() {
        // Values repeating within each row group: the same ones in each.
        assert_eq!(
            distinct_estimate(&[(3, 128), (3, 128), (2, 100)], 356, 1000),
            Some(3)
        );
        // Values hardly repeating: different ones in each, scaled from the
        // rows counted to all.
        assert_eq!(
            distinct_estimate(&[(128, 128), (100, 128)], 256, 1024),
            Some(912)
        );
        // Never more than the rows.
        assert_eq!(distinct_estimate(&[(128, 128)], 128, 100), Some(100));
        assert_eq!(distinct_estimate(&[], 0, 1000), None);
    }

    /// The ids of `write_people` whose region `keep` accepts.
    fn ids_where(keep: impl Fn(Option<&str>) -> bool) -> Vec<i64> {
        let regions = ["EU", "US", "APAC"];
        (0..1000)
            .filter(|id| keep(regions.get(*id as usize % 4).copied()))
            .collect()
    }

    #[tokio::test]
    async fn a_column_the_row_filter_only_compares_is_read_as_a_dictionary() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_people(dir.path());
        for pushdown in [false, true] {
            let mut config = SessionConfig::new();
            config.options_mut().execution.parquet.pushdown_filters = pushdown;
            let ctx = SessionContext::new_with_config(config);
            let path = dir.path();

            // Compared with constants and not selected: a dictionary, and
            // the same rows (NULL regions stay hidden).
            // (Policies compare view columns with view constants.)
            let eu = col("region").eq(lit(ScalarValue::Utf8View(Some("EU".into()))));
            let (ids, types, plan) =
                run(&ctx, path, eu.clone(), "SELECT id FROM people", "region").await;
            assert_eq!(ids, ids_where(|r| r == Some("EU")), "pushdown {pushdown}");
            assert_eq!(types, [dictionary_type()]);
            // Compared as a dictionary, not cast row by row.
            assert!(!plan.contains("CAST(region"), "{plan}");
            let not_us = col("region")
                .not_eq(lit("US"))
                .and(col("region").in_list(vec![lit("EU"), lit("APAC")], false))
                .or(col("region").is_null().and(col("id").lt(lit(4_i64))));
            let (ids, types, plan) = run(
                &ctx,
                path,
                not_us,
                "SELECT id FROM people WHERE id % 2 = 0",
                "region",
            )
            .await;
            assert!(!plan.contains("CAST(region"), "{plan}");
            let expected: Vec<i64> = ids_where(|r| matches!(r, Some("EU" | "APAC")))
                .into_iter()
                .chain([3])
                .filter(|id| id % 2 == 0)
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            assert_eq!(ids, expected);
            assert_eq!(types, [dictionary_type()]);

            // Selected by the caller, or read by their filter: the
            // product's own type.
            let (ids, types, _) = run(
                &ctx,
                path,
                eu.clone(),
                "SELECT id, region FROM people",
                "region",
            )
            .await;
            assert_eq!(ids, ids_where(|r| r == Some("EU")));
            assert_ne!(types, [dictionary_type()]);
            assert_eq!(types.len(), 1);
            let (ids, types, _) = run(
                &ctx,
                path,
                eu.clone(),
                "SELECT id FROM people WHERE region <> 'US'",
                "region",
            )
            .await;
            assert_eq!(ids, ids_where(|r| r == Some("EU")));
            assert_ne!(types, [dictionary_type()]);

            // Read other than by comparing with a constant: its own type.
            let upper = datafusion::functions::string::expr_fn::upper(col("region")).eq(lit("EU"));
            let (ids, types, _) = run(&ctx, path, upper, "SELECT id FROM people", "region").await;
            assert_eq!(ids, ids_where(|r| r == Some("EU")));
            assert_ne!(types, [dictionary_type()]);

            // Stored plain (no dictionary in the files): its own type.
            let note = col("note").lt(lit("note 2"));
            let (ids, types, _) = run(&ctx, path, note, "SELECT id FROM people", "note").await;
            let expected: Vec<i64> = (0..1000)
                .filter(|id| format!("note {id}").as_str() < "note 2")
                .collect();
            assert_eq!(ids, expected);
            assert_ne!(types, [dictionary_type()]);
        }
    }
}

#[cfg(test)]
mod shown_conditions {
    use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::DataType;
    use datafusion::common::ScalarValue;
    use datafusion::prelude::{SessionContext, col, lit};
    use parquet::file::properties::WriterProperties;

    use datafusion::physical_plan::{collect, displayable};

    use object_store::local::LocalFileSystem;

    use super::tests::{open, open_at, plan_on, run, run_on, write_file};
    use super::*;
    use crate::query::testing::relisting_context;

    /// Writes `file` in `dir`: `id` over `ids`, `region` as `region(id)`
    /// says, stored dictionary-encoded when `dictionary`, `amount` ten
    /// times `id` (NULL for `id`s in `no_amount`), in row groups of 100 rows.
    fn write_with(
        dir: &std::path::Path,
        file: &str,
        ids: std::ops::Range<i64>,
        region: impl Fn(i64) -> Option<&'static str>,
        dictionary: bool,
        no_amount: &[i64],
    ) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("region", DataType::Utf8, true),
            Field::new("amount", DataType::Int64, true),
        ]));
        let properties = WriterProperties::builder()
            .set_dictionary_enabled(dictionary)
            .set_max_row_group_row_count(Some(100))
            .build();
        let regions: StringArray = ids.clone().map(&region).collect();
        let amounts: Int64Array = ids
            .clone()
            .map(|id| (!no_amount.contains(&id)).then_some(id * 10))
            .collect();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from_iter_values(ids)),
            Arc::new(regions),
            Arc::new(amounts),
        ];
        let batch = RecordBatch::try_new(schema, columns).expect("batch");
        write_file(&dir.join(file), &batch, properties);
    }

    fn write(
        dir: &std::path::Path,
        file: &str,
        ids: std::ops::Range<i64>,
        region: impl Fn(i64) -> Option<&'static str>,
        dictionary: bool,
    ) {
        write_with(dir, file, ids, region, dictionary, &[]);
    }

    /// EU and US in turn, then EU and APAC.
    fn write_regions(dir: &std::path::Path) {
        write(
            dir,
            "a.parquet",
            0..600,
            |id| Some(["EU", "US"][id as usize % 2]),
            true,
        );
        write(
            dir,
            "b.parquet",
            600..1000,
            |id| Some(["EU", "APAC"][id as usize % 2]),
            true,
        );
    }

    /// A directory of `write_regions`'s files, and a context over it.
    fn regions() -> (tempfile::TempDir, SessionContext) {
        let dir = tempfile::tempdir().expect("tempdir");
        write_regions(dir.path());
        (dir, relisting_context())
    }

    /// A string constant as policies compile it (a view).
    fn view(value: &str) -> Expr {
        lit(ScalarValue::Utf8View(Some(value.into())))
    }

    fn region_of(id: i64) -> &'static str {
        match id {
            0..600 => ["EU", "US"][id as usize % 2],
            _ => ["EU", "APAC"][id as usize % 2],
        }
    }

    #[tokio::test]
    async fn a_condition_every_stored_value_meets_is_neither_read_nor_checked() {
        let (dir, ctx) = regions();
        let path = dir.path();
        let all: Vec<i64> = (0..1000).collect();

        let anywhere = col("region").not_eq(view("X-X"));
        let (ids, types, plan) = run(
            &ctx,
            path,
            anywhere.clone(),
            "SELECT id FROM people",
            "region",
        )
        .await;
        assert_eq!(ids, all);
        assert!(types.is_empty(), "{types:?}");
        assert!(!plan.contains("region"), "{plan}");

        // Selected: read, yet not checked. (The constant is one that no
        // temporary directory's name holds.)
        let (ids, types, plan) = run(
            &ctx,
            path,
            anywhere.clone(),
            "SELECT id, region FROM people",
            "region",
        )
        .await;
        assert_eq!(ids, all);
        assert_eq!(types.len(), 1);
        assert!(!plan.contains("X-X"), "{plan}");

        // Beside a condition on another column, which is still checked.
        let listed = col("region")
            .in_list(vec![view("EU"), view("US"), view("APAC")], false)
            .and(col("id").lt(lit(500_i64)));
        let (ids, types, plan) = run(&ctx, path, listed, "SELECT id FROM people", "region").await;
        assert_eq!(ids, (0..500).collect::<Vec<_>>());
        assert!(types.is_empty(), "{types:?}");
        assert!(!plan.contains("region"), "{plan}");

        // Any deterministic condition over the column alone.
        let upper = datafusion::functions::string::expr_fn::upper(col("region"))
            .not_eq(lit("X-X"))
            .and(col("region").is_not_null());
        let (ids, types, _) = run(&ctx, path, upper, "SELECT id FROM people", "region").await;
        assert_eq!(ids, all);
        assert!(types.is_empty(), "{types:?}");
    }

    #[tokio::test]
    async fn a_condition_not_shown_for_every_row_is_checked_row_by_row() {
        let (dir, ctx) = regions();
        let path = dir.path();

        // A stored value fails it.
        let not_us = col("region").not_eq(view("US"));
        let (ids, types, _) = run(&ctx, path, not_us, "SELECT id FROM people", "region").await;
        let expected: Vec<i64> = (0..1000).filter(|&id| region_of(id) != "US").collect();
        assert_eq!(ids, expected);
        assert_eq!(types.len(), 1);

        // Over two columns.
        let either = col("region").eq(view("APAC")).or(col("id").lt(lit(10_i64)));
        let (ids, types, _) = run(&ctx, path, either, "SELECT id FROM people", "region").await;
        let expected: Vec<i64> = (0..1000)
            .filter(|&id| region_of(id) == "APAC" || id < 10)
            .collect();
        assert_eq!(ids, expected);
        assert_eq!(types.len(), 1);

        // Volatile.
        let random = col("region")
            .not_eq(view("X-X"))
            .or(datafusion::functions::math::expr_fn::random().gt(lit(2.0)));
        let (ids, types, _) = run(&ctx, path, random, "SELECT id FROM people", "region").await;
        assert_eq!(ids.len(), 1000);
        assert_eq!(types.len(), 1);

        // A NULL in the column: its rows stay hidden.
        let nulls = tempfile::tempdir().expect("tempdir");
        write(
            nulls.path(),
            "a.parquet",
            0..300,
            |id| (id != 150).then_some("EU"),
            true,
        );
        let anywhere = col("region").not_eq(view("X-X"));
        let (ids, types, _) = run(
            &ctx,
            nulls.path(),
            anywhere.clone(),
            "SELECT id FROM people",
            "region",
        )
        .await;
        assert_eq!(ids, (0..300).filter(|&id| id != 150).collect::<Vec<_>>());
        assert_eq!(types.len(), 1);

        // Stored plain: no dictionary page tells its values.
        let plain = tempfile::tempdir().expect("tempdir");
        write(plain.path(), "a.parquet", 0..300, |_| Some("EU"), false);
        let (ids, types, _) = run(
            &ctx,
            plain.path(),
            anywhere,
            "SELECT id FROM people",
            "region",
        )
        .await;
        assert_eq!(ids, (0..300).collect::<Vec<_>>());
        assert_eq!(types.len(), 1);
    }

    #[tokio::test]
    async fn what_was_shown_holds_only_for_the_files_it_was_shown_on() {
        let (dir, ctx) = regions();
        let path = dir.path();
        // One product throughout, as in a published mesh: what its files
        // showed is kept between queries.
        let people = open(&ctx, path).await;
        let not_hidden = col("region").not_eq(view("HIDDEN"));
        let not_listed = col("region").in_list(vec![view("HIDDEN")], true);
        let sql = "SELECT id FROM people";

        for condition in [&not_hidden, &not_listed] {
            let (ids, types, _) =
                run_on(&ctx, Arc::clone(&people), condition.clone(), sql, "region").await;
            assert_eq!(ids.len(), 1000);
            assert!(types.is_empty());
        }

        // A file added since, with hidden rows.
        write(
            path,
            "c.parquet",
            1000..1100,
            |id| Some(if id % 10 == 0 { "HIDDEN" } else { "EU" }),
            true,
        );
        let (ids, types, _) =
            run_on(&ctx, Arc::clone(&people), not_hidden.clone(), sql, "region").await;
        assert_eq!(ids.len(), 1090);
        assert!(!ids.contains(&1000), "a hidden row was returned");
        assert_eq!(types.len(), 1);

        // The file replaced by one without: shown from its new version (a
        // condition just not shown is not tried again for a while).
        write(path, "c.parquet", 1000..1100, |_| Some("EU"), true);
        let (ids, types, _) =
            run_on(&ctx, Arc::clone(&people), not_listed.clone(), sql, "region").await;
        assert_eq!(ids.len(), 1100);
        assert!(types.is_empty());
        let (ids, types, _) = run_on(&ctx, Arc::clone(&people), not_hidden, sql, "region").await;
        assert_eq!(ids.len(), 1100);
        assert_eq!(types.len(), 1);

        // A file rewritten in place with hidden rows: what its earlier
        // version showed is not used.
        write(
            path,
            "a.parquet",
            0..600,
            |id| Some(if id < 5 { "HIDDEN" } else { "EU" }),
            true,
        );
        let (ids, types, _) = run_on(&ctx, people, not_listed, sql, "region").await;
        assert_eq!(ids.len(), 1095);
        assert!(ids.iter().all(|&id| id >= 5), "a hidden row was returned");
        assert_eq!(types.len(), 1);
    }

    /// Runs `plan`, which must fail for a file changed since it was listed.
    async fn fails_as_changed(plan: Arc<dyn ExecutionPlan>, ctx: &SessionContext, what: &str) {
        let error = collect(plan, ctx.task_ctx()).await.expect_err(what);
        assert!(
            error
                .to_string()
                .contains("changed while the query read it"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_file_rewritten_after_its_condition_was_shown_fails_the_scan_that_left_it_out() {
        // Files read from the local file system directly, and through an
        // object store (here one over the same directory).
        for through_a_store in [false, true] {
            let (dir, ctx) = regions();
            let url = if through_a_store {
                let url = url::Url::parse("files://mesh/").expect("url");
                let store = LocalFileSystem::new_with_prefix(dir.path()).expect("store");
                ctx.runtime_env()
                    .register_object_store(&url, Arc::new(store));
                url
            } else {
                url::Url::from_directory_path(dir.path()).expect("url")
            };
            fails_on_rewritten_files(dir.path(), &ctx, open_at(&ctx, &url).await).await;
        }
    }

    /// Shows a condition over `people`, whose files are in `path`, then
    /// changes them under the scans that left it out.
    async fn fails_on_rewritten_files(
        path: &std::path::Path,
        ctx: &SessionContext,
        people: Arc<dyn TableProvider>,
    ) {
        let not_hidden = col("region").not_eq(view("HIDDEN"));
        let sql = "SELECT id, region FROM people";

        // Planned over the versions listed, which hold no hidden row: the
        // condition is left out.
        let plan = plan_on(ctx, Arc::clone(&people), not_hidden.clone(), sql).await;
        let text = displayable(plan.as_ref()).indent(true).to_string();
        assert!(!text.contains("HIDDEN"), "{text}");

        // Rewritten in place, with hidden rows, before the scan reads it.
        write(
            path,
            "a.parquet",
            0..600,
            |id| Some(if id < 300 { "HIDDEN" } else { "EU" }),
            true,
        );
        fails_as_changed(plan, ctx, "a file changed since it was listed was read").await;

        // Planned again, over the new version: the condition is checked and
        // no hidden row is returned.
        let (ids, types, _) = run_on(ctx, Arc::clone(&people), not_hidden, sql, "region").await;
        assert_eq!(ids, (300..1000).collect::<Vec<_>>());
        assert_eq!(types.len(), 1);

        // Replaced by a file of the very same layout, whose `US` rows now say
        // `ZZ`: read with the footer of the version listed, it would decode.
        write(
            path,
            "a.parquet",
            0..600,
            |id| Some(["EU", "US"][id as usize % 2]),
            true,
        );
        let plan = plan_on(
            ctx,
            Arc::clone(&people),
            col("region").not_eq(view("ZZ")),
            sql,
        )
        .await;
        let staged = tempfile::tempdir_in(path).expect("tempdir");
        write(
            staged.path(),
            "a.parquet",
            0..600,
            |id| Some(["EU", "ZZ"][id as usize % 2]),
            true,
        );
        std::fs::rename(staged.path().join("a.parquet"), path.join("a.parquet")).expect("rename");
        fails_as_changed(plan, ctx, "a file replaced since it was listed was read").await;
    }

    #[tokio::test]
    async fn a_condition_every_row_group_lies_within_is_neither_read_nor_checked() {
        let (dir, ctx) = regions();
        let path = dir.path();
        let sql = "SELECT id FROM people";
        let all: Vec<i64> = (0..1000).collect();

        // Shown by every row group's least and greatest amounts.
        for shown in [
            col("amount").gt_eq(lit(0_i64)),
            col("amount")
                .gt(lit(-1_i64))
                .and(lit(100_000_i64).gt(col("amount"))),
            col("amount").between(lit(0_i64), lit(9_990_i64)),
        ] {
            let (ids, types, plan) = run(&ctx, path, shown.clone(), sql, "amount").await;
            assert_eq!(ids, all, "{shown}");
            assert!(types.is_empty(), "{shown}: {types:?}");
            assert!(!plan.contains("amount"), "{shown}: {plan}");
        }

        // Not so: some amounts fail it, or the values it keeps are not one
        // interval, or its constant is of another type.
        let cases = [
            (
                col("amount").lt(lit(5_000_i64)),
                (0..500).collect::<Vec<_>>(),
            ),
            (col("amount").not_eq(lit(5_i64)), all.clone()),
            (
                col("amount")
                    .gt_eq(lit(0_i64))
                    .or(col("amount").lt(lit(-5_i64))),
                all.clone(),
            ),
            (col("amount").gt_eq(lit(0_i32)), all.clone()),
        ];
        for (condition, expected) in cases {
            let (ids, types, _) = run(&ctx, path, condition.clone(), sql, "amount").await;
            assert_eq!(ids, expected, "{condition}");
            assert_eq!(types.len(), 1, "{condition}");
        }

        // A NULL amount: its row stays hidden.
        let nulls = tempfile::tempdir().expect("tempdir");
        write_with(
            nulls.path(),
            "a.parquet",
            0..300,
            |_| Some("EU"),
            true,
            &[42],
        );
        let (ids, types, _) = run(
            &ctx,
            nulls.path(),
            col("amount").gt_eq(lit(0_i64)),
            sql,
            "amount",
        )
        .await;
        assert_eq!(ids, (0..300).filter(|&id| id != 42).collect::<Vec<_>>());
        assert_eq!(types.len(), 1);
    }
}
