//! Row groups that lookups read again and again, kept decoded.
//!
//! A point lookup in a Parquet file reads little: its filter keeps one row
//! group by the statistics, and one page of each column by the page index.
//! Yet each column's dictionary page and the page holding the row are
//! decompressed and decoded whole: up to a megabyte each with the usual
//! writer settings, several milliseconds of work for one row, at every
//! lookup. A scan whose filters keep at most [`HOT_ROW_GROUPS`] of its
//! files' row groups (and not all of them) is planned as a [`HotScan`]
//! instead: it reads those row groups' columns from a cache of decoded
//! column chunks and evaluates the filters over the decoded rows.
//!
//! A scan whose chunks are not all cached yet is planned as DataFusion
//! plans it, and the row groups it keeps are decoded into the cache in the
//! background (a task a row group, about one a core at once, on threads of
//! the lowest priority): the first lookups into a row group cost what they
//! did, not the decoding of the row group whole, and the decoding does not
//! hold up the lookups that run meanwhile.
//!
//! A chunk is cached under the version of its file the listing saw
//! (location, size, modification time, e-tag, version) and the type it is
//! read as, so a file rewritten is read afresh. The cache holds at most
//! `limits.row_group_cache` bytes (512 MiB unless configured; 0 turns hot
//! scans off); the chunks read least go first.
//!
//! A chunk that holds its values in ascending order (a file written in the
//! order of its key) is marked so when it is decoded, and a comparison of
//! such a column with a constant narrows the rows the filters are
//! evaluated over to one run, found by binary search ([`in_order`]).

mod in_order;

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use arrow::array::{ArrayRef, AsArray, RecordBatch, RecordBatchOptions};
use arrow::compute::{concat_batches, filter_record_batch};
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef};
use chrono::{DateTime, Utc};
use datafusion::catalog::Session;
use datafusion::common::DFSchema;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::config::ConfigOptions;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::parquet::{ParquetAccessPlan, RowGroupAccessPlanFilter};
use datafusion::datasource::physical_plan::{
    FileScanConfig, FileSource, ParquetFileMetrics, ParquetFileReaderFactory, ParquetSource,
};
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::Expr;
use datafusion::logical_expr::utils::conjunction;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::projection::ProjectionExprs;
use datafusion::physical_expr::utils::{
    collect_columns, conjunction as conjunction_physical, reassign_expr_columns,
};
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_optimizer::pruning::PruningPredicateBuilder;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::filter_pushdown::{
    ChildPushdownResult, FilterPushdownPhase, FilterPushdownPropagation, PushedDown,
};
use datafusion::physical_plan::metrics::{
    BaselineMetrics, Count, ExecutionPlanMetricsSet, MetricBuilder, MetricsSet,
};
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::statistics::{StatisticsArgs, StatisticsContext};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, ExecutionPlanProperties, Partitioning,
    PlanProperties, Statistics, displayable, replace_children_if_necessary,
};
use futures::TryStreamExt;
use object_store::ObjectMeta;
use object_store::ObjectStore;
use object_store::path::Path;
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::AsyncFileReader;
use parquet::arrow::{ParquetRecordBatchStreamBuilder, ProjectionMask, parquet_to_arrow_schema};
use parquet::file::metadata::ParquetMetaData;

use super::decompressed::with_decompressed_chunks;
use super::parquet::footer;
use crate::policy::PolicyExec;

/// A scan is read from decoded row groups when its filters keep at most
/// this many row groups of its files.
const HOT_ROW_GROUPS: usize = 2;

/// ... and those row groups hold at most this many rows: decoding a chunk
/// whole costs about as much per row as a scan.
const HOT_ROWS: i64 = 1 << 20;

/// Footers are read at planning only for products of at most this many
/// files.
const HOT_FILES: usize = 64;

/// A row group of a file, as the listing saw the file: its location,
/// size, modification time, e-tag and version, and the row group's index.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct RowGroupKey {
    location: Path,
    size: u64,
    last_modified: DateTime<Utc>,
    e_tag: Option<String>,
    version: Option<String>,
    row_group: usize,
}

impl RowGroupKey {
    /// `row_group` of `file`, as the listing saw the file.
    pub(super) fn new(file: &ObjectMeta, row_group: usize) -> Self {
        Self {
            location: file.location.clone(),
            size: file.size,
            last_modified: file.last_modified,
            e_tag: file.e_tag.clone(),
            version: file.version.clone(),
            row_group,
        }
    }
}

/// A column chunk as read: its row group, the column's name in the file
/// and the type it is read as.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ChunkKey {
    row_group: RowGroupKey,
    column: String,
    data_type: DataType,
}

/// A decoded column chunk, and whether it holds its values in ascending
/// order (see [`in_order`]).
#[derive(Debug, Clone)]
struct Chunk {
    values: ArrayRef,
    ascending: bool,
}

impl Chunk {
    fn new(values: ArrayRef) -> Self {
        let ascending = in_order::ascending(values.as_ref());
        Self { values, ascending }
    }
}

/// The decoded column chunks, shared by every product of the gateway.
static CHUNKS: OnceLock<moka::sync::Cache<ChunkKey, Chunk>> = OnceLock::new();

/// A cache of decoded column chunks holding at most `bytes`.
fn chunk_cache(bytes: u64) -> moka::sync::Cache<ChunkKey, Chunk> {
    moka::sync::Cache::builder()
        .max_capacity(bytes)
        .weigher(|_, chunk: &Chunk| {
            u32::try_from(chunk.values.get_array_memory_size()).unwrap_or(u32::MAX)
        })
        .build()
}

/// Sets how many bytes of decoded column chunks the gateway keeps. Only the
/// first setting counts (the gateway's, at start); a cache set to 0 bytes
/// keeps nothing and no scan is planned hot.
pub fn set_row_group_cache(bytes: u64) {
    let _ = CHUNKS.set(chunk_cache(bytes));
}

/// The cache, at its default size when none was set.
fn chunks() -> &'static moka::sync::Cache<ChunkKey, Chunk> {
    CHUNKS.get_or_init(|| chunk_cache(crate::config::Limits::default().row_group_cache))
}

/// The row groups being decoded into the cache now.
static WARMING: Mutex<BTreeSet<RowGroupKey>> = Mutex::new(BTreeSet::new());

/// The bytes of decoded column chunks the gateway keeps now.
pub fn row_group_cache_bytes() -> u64 {
    CHUNKS.get().map_or(0, |cache| {
        cache.run_pending_tasks();
        cache.weighted_size()
    })
}

/// `plan`, a scan of a Parquet product with `filters`, as a [`HotScan`]
/// when the filters keep few of its files' row groups and their chunks are
/// cached; otherwise `plan` (and the row groups kept are decoded into the
/// cache in the background).
pub(super) async fn hot_or_planned(
    state: &dyn Session,
    plan: Arc<dyn ExecutionPlan>,
    filters: &[Expr],
) -> Arc<dyn ExecutionPlan> {
    match HotScan::try_new(state, &plan, filters).await {
        Some(hot) if hot.reads.cached() => Arc::new(hot),
        Some(hot) => {
            hot.reads.warm();
            with_decompressed_chunks(plan)
        }
        None => with_decompressed_chunks(plan),
    }
}

/// A file a [`HotScan`] reads, and how.
#[derive(Debug, Clone)]
struct FileRead {
    file: PartitionedFile,
    metadata: Arc<ParquetMetaData>,
    /// The row groups the filters keep.
    row_groups: Vec<usize>,
    /// The file's Arrow schema, with the columns read in the scan's types.
    schema: SchemaRef,
    /// For each column the scan reads (in [`HotScan::read`] order), its
    /// index in `schema`.
    columns: Vec<usize>,
}

impl FileRead {
    /// `row_group` of this file, as the listing saw the file.
    fn row_group(&self, row_group: usize) -> RowGroupKey {
        RowGroupKey::new(&self.file.object_meta, row_group)
    }

    /// The cache's keys of the columns read from `row_group`.
    fn keys(&self, row_group: usize) -> Vec<ChunkKey> {
        self.columns
            .iter()
            .map(|&index| {
                let field = self.schema.field(index);
                ChunkKey {
                    row_group: self.row_group(row_group),
                    column: field.name().clone(),
                    data_type: field.data_type().clone(),
                }
            })
            .collect()
    }

    /// Whether every column read from `row_group` is cached.
    fn cached(&self, row_group: usize) -> bool {
        self.keys(row_group)
            .iter()
            .all(|key| chunks().contains_key(key))
    }

    /// How the columns of `read` are read from `file`, and the row groups
    /// that `predicate` (over the product's schema) keeps by their
    /// statistics; with how many row groups the file has.
    async fn pruned(
        state: &dyn Session,
        store: &dyn ObjectStore,
        file: PartitionedFile,
        read: &Schema,
        predicate: &Arc<dyn PhysicalExpr>,
        metrics: &ExecutionPlanMetricsSet,
    ) -> Option<(Self, usize)> {
        let metadata = footer(state, store, &file.object_meta).await.ok()?;
        let (schema, columns) = read_schema(&file, &metadata, read)?;
        let file_predicate = reassign_expr_columns(Arc::clone(predicate), &schema).ok()?;
        // A filter that cannot prune keeps every row group.
        let pruning = PruningPredicateBuilder::new()
            .with_file_schema(Arc::clone(&schema))
            .with_max_in_list_size(state.config_options().execution.parquet.max_in_list_size)
            .build(file_predicate)?;
        let groups = metadata.row_groups();
        let mut access = RowGroupAccessPlanFilter::new(ParquetAccessPlan::new_all(groups.len()));
        let file_metrics = ParquetFileMetrics::new(0, file.object_meta.location.as_ref(), metrics);
        access.prune_by_statistics(
            &schema,
            metadata.file_metadata().schema_descr(),
            groups,
            &pruning,
            &file_metrics,
        );
        let row_groups = access.build().row_group_indexes();
        let count = groups.len();
        Some((
            Self {
                file,
                metadata,
                row_groups,
                schema,
                columns,
            },
            count,
        ))
    }
}

/// A Parquet scan that reads the few row groups its filters keep from
/// decoded column chunks (see the module's documentation).
#[derive(Debug)]
pub(crate) struct HotScan {
    /// The scan as DataFusion planned it: what EXPLAIN shows, and the
    /// statistics.
    planned: Arc<dyn ExecutionPlan>,
    reads: Arc<HotReads>,
    /// How many row groups the filters keep, of how many.
    kept: usize,
    total: usize,
    properties: Arc<PlanProperties>,
}

/// What a [`HotScan`] reads.
#[derive(Debug, Clone)]
struct HotReads {
    factory: Arc<dyn ParquetFileReaderFactory>,
    files: Vec<FileRead>,
    /// The columns decoded: those the filters and the projection read.
    read: SchemaRef,
    /// The filters, over `read`, with the dynamic filters of the operators
    /// above (a join's keys, a TopK's bound) as they are when the scan runs.
    predicate: Arc<dyn PhysicalExpr>,
    /// The scan's projection, over `read`.
    projection: ProjectionExprs,
    /// The scan's output schema.
    schema: SchemaRef,
    metrics: ExecutionPlanMetricsSet,
}

impl HotScan {
    async fn try_new(
        state: &dyn Session,
        plan: &Arc<dyn ExecutionPlan>,
        filters: &[Expr],
    ) -> Option<Self> {
        if chunks().policy().max_capacity() == Some(0) {
            return None;
        }
        let exec = plan.downcast_ref::<DataSourceExec>()?;
        let config = exec.data_source().downcast_ref::<FileScanConfig>()?;
        let source = config.file_source().downcast_ref::<ParquetSource>()?;
        if !config.table_partition_cols().is_empty()
            || !config.output_ordering.is_empty()
            || config.limit.is_some()
        {
            return None;
        }
        let factory = Arc::clone(source.parquet_file_reader_factory()?);
        let table = Arc::clone(config.file_schema());
        let predicate = state
            .create_physical_expr(
                conjunction(filters.iter().cloned())?,
                &DFSchema::try_from(Arc::clone(&table)).ok()?,
            )
            .ok()?;

        // The columns read: the filters' and the projection's.
        let projection = match source.projection() {
            Some(projection) => projection.clone(),
            None => ProjectionExprs::from_indices(
                &(0..table.fields().len()).collect::<Vec<_>>(),
                &table,
            ),
        };
        let mut indices: BTreeSet<usize> = projection.column_indices().into_iter().collect();
        indices.extend(collect_columns(&predicate).iter().map(|c| c.index()));
        let read = Arc::new(Schema::new(
            indices
                .iter()
                .map(|&i| table.fields().get(i).cloned())
                .collect::<Option<Fields>>()?,
        ));
        let scan_predicate = reassign_expr_columns(Arc::clone(&predicate), &read).ok()?;
        let projection = projection
            .try_map_exprs(|expr| reassign_expr_columns(expr, &read))
            .ok()?;
        let projected = projection.make_projector(&read).ok()?;
        let types = |schema: &Schema| -> Vec<DataType> {
            schema
                .fields()
                .iter()
                .map(|f| f.data_type().clone())
                .collect()
        };
        if types(projected.output_schema()) != types(&plan.schema()) {
            return None;
        }

        // The files, each once (a large one is split into byte ranges).
        let mut files: Vec<PartitionedFile> = Vec::new();
        for file in config.file_groups.iter().flat_map(|group| group.iter()) {
            if !files
                .iter()
                .any(|f| f.object_meta.location == file.object_meta.location)
            {
                let mut file = file.clone();
                file.range = None;
                files.push(file);
            }
        }
        if files.len() > HOT_FILES {
            return None;
        }
        let store = state
            .runtime_env()
            .object_store(&config.object_store_url)
            .ok()?;
        let metrics = ExecutionPlanMetricsSet::new();
        let (mut reads, mut kept, mut total, mut rows) = (Vec::new(), 0, 0, 0);
        for file in files {
            let (file, row_groups) =
                FileRead::pruned(state, store.as_ref(), file, &read, &predicate, &metrics).await?;
            total += row_groups;
            kept += file.row_groups.len();
            rows += file
                .row_groups
                .iter()
                .map(|&g| file.metadata.row_group(g).num_rows())
                .sum::<i64>();
            if kept > HOT_ROW_GROUPS || rows > HOT_ROWS {
                return None;
            }
            if !file.row_groups.is_empty() {
                reads.push(file);
            }
        }
        if kept == total {
            return None;
        }
        let properties = Arc::new(PlanProperties::new(
            datafusion::physical_expr::EquivalenceProperties::new(plan.schema()),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Final,
            Boundedness::Bounded,
        ));
        Some(Self {
            planned: Arc::clone(plan),
            reads: Arc::new(HotReads {
                factory,
                files: reads,
                read,
                predicate: scan_predicate,
                projection,
                schema: plan.schema(),
                metrics,
            }),
            kept,
            total,
            properties,
        })
    }
}

impl HotReads {
    /// The rows the scan answers: those of the row groups kept that pass
    /// the filters, projected.
    async fn rows(&self, partition: usize) -> Result<Vec<RecordBatch>> {
        let baseline = BaselineMetrics::new(&self.metrics, partition);
        let decoded = MetricBuilder::new(&self.metrics).counter("column_chunks_decoded", partition);
        let cached = MetricBuilder::new(&self.metrics).counter("column_chunks_cached", partition);
        let evaluated = MetricBuilder::new(&self.metrics).counter("rows_evaluated", partition);
        let projector = self.projection.make_projector(&self.read)?;
        let mut batches = Vec::new();
        for file in &self.files {
            for &row_group in &file.row_groups {
                let chunks = self.chunks(file, row_group, (&decoded, &cached)).await?;
                let _timer = baseline.elapsed_compute().timer();
                let columns: Vec<ArrayRef> = chunks.iter().map(|c| Arc::clone(&c.values)).collect();
                let batch = RecordBatch::try_new(Arc::clone(&self.read), columns)?;
                // Only the rows that the comparisons with the columns held
                // in order leave are evaluated.
                let kept = in_order::rows_kept(
                    &self.predicate,
                    batch.columns(),
                    |i| chunks[i].ascending,
                    batch.num_rows(),
                );
                if kept.is_empty() {
                    continue;
                }
                let batch = batch.slice(kept.start, kept.len());
                evaluated.add(batch.num_rows());
                let passes = self
                    .predicate
                    .evaluate(&batch)?
                    .into_array(batch.num_rows())?;
                let batch = filter_record_batch(&batch, passes.as_boolean())?;
                if batch.num_rows() == 0 {
                    continue;
                }
                let projected = projector.project_batch(&batch)?;
                let batch = RecordBatch::try_new_with_options(
                    Arc::clone(&self.schema),
                    projected.columns().to_vec(),
                    &RecordBatchOptions::new().with_row_count(Some(projected.num_rows())),
                )?;
                baseline.record_output(batch.num_rows());
                batches.push(batch);
            }
        }
        baseline.done();
        Ok(batches)
    }

    /// Whether every chunk the scan reads is cached.
    fn cached(&self) -> bool {
        self.files
            .iter()
            .all(|file| file.row_groups.iter().all(|&group| file.cached(group)))
    }

    /// Decodes the chunks the scan reads into the cache, in the background:
    /// a task for each row group not cached whole and not being decoded
    /// already.
    fn warm(&self) {
        let Some(runtime) = warmer() else {
            return;
        };
        for file in &self.files {
            for &row_group in &file.row_groups {
                if file.cached(row_group) {
                    continue;
                }
                let warming = file.row_group(row_group);
                let mut underway = WARMING.lock().unwrap_or_else(|e| e.into_inner());
                // At most one row group a core is decoded at once; a row
                // group left out is taken up by a later lookup into it.
                if underway.len() >= warmers() || !underway.insert(warming.clone()) {
                    continue;
                }
                drop(underway);
                let (reads, file) = (self.clone(), file.clone());
                runtime.spawn(async move {
                    let _done = Warmed(warming);
                    let counts = (Count::new(), Count::new());
                    if let Err(error) = reads.chunks(&file, row_group, (&counts.0, &counts.1)).await
                    {
                        tracing::debug!(file = %file.file.object_meta.location, row_group, %error, "row group not cached");
                    }
                });
            }
        }
    }

    /// The columns `self.read` of `row_group` of `file`: from the cache, or
    /// decoded (and then cached).
    async fn chunks(
        &self,
        file: &FileRead,
        row_group: usize,
        (decoded, cached): (&Count, &Count),
    ) -> Result<Vec<Chunk>> {
        let keys = file.keys(row_group);
        let mut columns: Vec<Option<Chunk>> = keys.iter().map(|key| chunks().get(key)).collect();
        let missing: Vec<usize> = (0..columns.len())
            .filter(|&i| columns[i].is_none())
            .collect();
        cached.add(columns.len() - missing.len());
        if !missing.is_empty() {
            let roots: Vec<usize> = missing.iter().map(|&i| file.columns[i]).collect();
            let batch = self.decode(file, row_group, &roots).await?;
            decoded.add(missing.len());
            for i in missing {
                let name = file.schema.field(file.columns[i]).name();
                let column =
                    Chunk::new(Arc::clone(batch.column_by_name(name).ok_or_else(|| {
                        DataFusionError::Internal(format!("column {name} was not decoded"))
                    })?));
                chunks().insert(keys[i].clone(), column.clone());
                columns[i] = Some(column);
            }
        }
        Ok(columns.into_iter().flatten().collect())
    }

    /// Columns `roots` (indices in `file.schema`) of `row_group`, decoded
    /// whole.
    async fn decode(
        &self,
        file: &FileRead,
        row_group: usize,
        roots: &[usize],
    ) -> Result<RecordBatch> {
        let reader: Box<dyn AsyncFileReader> =
            self.factory
                .create_reader(0, file.file.clone(), None, &self.metrics)?;
        let options = ArrowReaderOptions::new().with_schema(Arc::clone(&file.schema));
        let builder = ParquetRecordBatchStreamBuilder::new_with_options(reader, options).await?;
        let mask = ProjectionMask::roots(builder.parquet_schema(), roots.iter().copied());
        let rows = file.metadata.row_group(row_group).num_rows();
        let stream = builder
            .with_row_groups(vec![row_group])
            .with_projection(mask)
            .with_batch_size(usize::try_from(rows).unwrap_or(usize::MAX).max(1))
            .build()?;
        let schema = Arc::clone(stream.schema());
        let batches: Vec<RecordBatch> = stream.try_collect().await?;
        Ok(concat_batches(&schema, &batches)?)
    }
}

/// The runtime row groups are decoded on in the background: a thread for
/// each row group decoded at once, each at the lowest scheduling priority, so that decoding takes only
/// the CPU that queries leave (a lookup that wakes does not wait for a
/// decode to yield its core). `None` when no runtime could be started;
/// then the caller's runtime is used, when there is one.
pub(super) fn warmer() -> Option<tokio::runtime::Handle> {
    static WARMER: OnceLock<Option<tokio::runtime::Runtime>> = OnceLock::new();
    let started = WARMER.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(warmers())
            .thread_name("meshgate-warmer")
            .on_thread_start(lowest_priority)
            .enable_all()
            .build()
            .map_err(|error| tracing::warn!(%error, "no background decoding runtime"))
            .ok()
    });
    match started {
        Some(runtime) => Some(runtime.handle().clone()),
        None => tokio::runtime::Handle::try_current().ok(),
    }
}

/// Gives the calling thread the lowest scheduling priority (nice 19). On
/// Linux a thread's priority is its own; elsewhere this does nothing.
fn lowest_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority only read their arguments and change
    // the calling thread's scheduling priority.
    unsafe {
        let thread = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, thread as libc::id_t, 19);
    }
}

/// How many row groups may be decoded into the cache at once (and how many
/// threads decode them): one a core, and at least the row groups one hot
/// scan reads. Counted once: finding the cores reads the process's cgroup
/// files, and this is asked on every lookup planned as DataFusion plans it.
pub(super) fn warmers() -> usize {
    static WARMERS: OnceLock<usize> = OnceLock::new();
    *WARMERS.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(HOT_ROW_GROUPS, usize::from)
            .max(HOT_ROW_GROUPS)
    })
}

/// Takes a row group off [`WARMING`] when its task ends, however it ends.
struct Warmed(RowGroupKey);

impl Drop for Warmed {
    fn drop(&mut self) {
        WARMING
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.0);
    }
}

/// Waits until no row group is being decoded into the cache.
#[cfg(test)]
pub(crate) async fn warmed() {
    while !WARMING.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// The Arrow schema to read `file` with, so that each column of `read` is
/// decoded in its type there, and each one's index in it; `None` when a
/// column is missing or stored in a type not read as `read`'s directly.
fn read_schema(
    file: &PartitionedFile,
    metadata: &ParquetMetaData,
    read: &Schema,
) -> Option<(SchemaRef, Vec<usize>)> {
    let stored = match &file.arrow_schema {
        Some(schema) => Arc::clone(schema),
        None => {
            let footer = metadata.file_metadata();
            Arc::new(
                parquet_to_arrow_schema(footer.schema_descr(), footer.key_value_metadata()).ok()?,
            )
        }
    };
    let mut fields: Vec<Field> = stored.fields().iter().map(|f| f.as_ref().clone()).collect();
    let mut columns = Vec::with_capacity(read.fields().len());
    for wanted in read.fields() {
        let index = stored.index_of(wanted.name()).ok()?;
        if !decodes_as(stored.field(index).data_type(), wanted.data_type()) {
            return None;
        }
        fields[index] = fields[index]
            .clone()
            .with_data_type(wanted.data_type().clone());
        columns.push(index);
    }
    Some((
        Arc::new(Schema::new_with_metadata(fields, stored.metadata().clone())),
        columns,
    ))
}

/// Whether a column stored as `stored` is decoded as `wanted` directly, as
/// DataFusion reads it.
fn decodes_as(stored: &DataType, wanted: &DataType) -> bool {
    use DataType::*;
    match (stored, wanted) {
        (stored, wanted) if stored == wanted => true,
        (Utf8 | LargeUtf8, Utf8View) | (Binary | LargeBinary, BinaryView) => true,
        (Utf8 | LargeUtf8, Dictionary(key, value)) => **key == Int32 && **value == Utf8,
        _ => false,
    }
}

impl DisplayAs for HotScan {
    fn fmt_as(&self, _format: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "HotScan: row_groups={} of {}, from decoded column chunks, predicate={}, scan={}",
            self.kept,
            self.total,
            self.reads.predicate,
            displayable(self.planned.as_ref())
                .one_line()
                .to_string()
                .trim_end()
        )
    }
}

impl ExecutionPlan for HotScan {
    fn name(&self) -> &str {
        "HotScan"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        Vec::new()
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        f(&self.reads.predicate)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.is_empty() {
            Ok(self)
        } else {
            Err(DataFusionError::Internal("HotScan takes no inputs".into()))
        }
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "HotScan has one partition, not {}",
                partition + 1
            )));
        }
        let reads = Arc::clone(&self.reads);
        let rows = futures::stream::once(async move { reads.rows(partition).await })
            .map_ok(|batches| futures::stream::iter(batches.into_iter().map(Ok)))
            .try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(self.schema(), rows)))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.reads.metrics.clone_inner())
    }

    /// Takes the dynamic filters of the operators above, as a Parquet scan
    /// does: each is evaluated over the rows decoded, with the others.
    fn handle_child_pushdown_result(
        &self,
        phase: FilterPushdownPhase,
        child_pushdown_result: ChildPushdownResult,
        _config: &ConfigOptions,
    ) -> Result<FilterPushdownPropagation<Arc<dyn ExecutionPlan>>> {
        let filters = child_pushdown_result.parent_filters;
        if phase != FilterPushdownPhase::Post {
            return Ok(FilterPushdownPropagation::with_parent_pushdown_result(
                vec![PushedDown::No; filters.len()],
            ));
        }
        let mut taken = vec![Arc::clone(&self.reads.predicate)];
        let pushed = filters
            .into_iter()
            .map(|filter| {
                match self
                    .reads
                    .projection
                    .unproject_expr(&filter.filter)
                    .and_then(|filter| reassign_expr_columns(filter, &self.reads.read))
                {
                    Ok(filter) => {
                        taken.push(filter);
                        PushedDown::Yes
                    }
                    Err(_) => PushedDown::No,
                }
            })
            .collect();
        let reads = HotReads {
            predicate: conjunction_physical(taken),
            ..HotReads::clone(&self.reads)
        };
        let scan = Self {
            planned: Arc::clone(&self.planned),
            reads: Arc::new(reads),
            kept: self.kept,
            total: self.total,
            properties: Arc::clone(&self.properties),
        };
        Ok(
            FilterPushdownPropagation::with_parent_pushdown_result(pushed)
                .with_updated_node(Arc::new(scan) as Arc<dyn ExecutionPlan>),
        )
    }

    fn statistics_from_inputs(
        &self,
        _input_stats: &[Arc<Statistics>],
        _args: &StatisticsArgs,
    ) -> Result<Arc<Statistics>> {
        StatisticsContext::new().compute(self.planned.as_ref(), &StatisticsArgs::new())
    }
}

/// Runs a plan that only filters, projects and governs the rows of one
/// hot scan in one partition. DataFusion spreads such a scan's rows over
/// the partitions (a round-robin repartition) for the operators above to
/// run in parallel; for the few rows of a lookup, the tasks and channels
/// that takes cost more than those operators, and the answer waits on them.
#[derive(Debug)]
pub(crate) struct SerialHotScans;

impl PhysicalOptimizerRule for SerialHotScans {
    fn optimize(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        _config: &ConfigOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(serial(&plan).unwrap_or(plan))
    }

    fn name(&self) -> &str {
        "SerialHotScans"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// `plan` in one partition, when it is a chain of filters, projections,
/// policy barriers and round-robin repartitions over a hot scan that
/// answers in one partition: the chain without its repartitions.
fn serial(plan: &Arc<dyn ExecutionPlan>) -> Option<Arc<dyn ExecutionPlan>> {
    if plan.downcast_ref::<HotScan>().is_some() {
        return (plan.output_partitioning().partition_count() == 1).then(|| Arc::clone(plan));
    }
    let [child] = plan.children()[..] else {
        return None;
    };
    if let Some(repartition) = plan.downcast_ref::<RepartitionExec>() {
        let round_robin = matches!(repartition.partitioning(), Partitioning::RoundRobinBatch(_));
        return if round_robin { serial(child) } else { None };
    }
    let passes_rows = plan.downcast_ref::<FilterExec>().is_some()
        || plan.downcast_ref::<ProjectionExec>().is_some()
        || plan.downcast_ref::<PolicyExec>().is_some();
    if !passes_rows {
        return None;
    }
    replace_children_if_necessary(Arc::clone(plan), vec![serial(child)?]).ok()
}

#[cfg(test)]
mod tests {
    use arrow::array::{Int64Array, StringArray};
    use arrow::util::pretty::pretty_format_batches;
    use datafusion::catalog::TableProvider;
    use datafusion::common::tree_node::TreeNode;
    use datafusion::prelude::{SessionContext, col, lit};
    use parquet::arrow::ArrowWriter;
    use parquet::file::properties::WriterProperties;

    use super::super::files::parquet_product_context;
    use super::*;
    use crate::catalog::parquet::as_dictionary_scan;
    use crate::policy::{CallerProductView, PolicyTable};
    use crate::query::testing::{physical_plan, plan_and_run, run_plan};

    #[cfg(target_os = "linux")]
    #[test]
    fn row_groups_are_decoded_on_threads_of_the_lowest_priority() {
        let runtime = warmer().expect("a runtime for background decoding");
        let (name, nice) = futures::executor::block_on(runtime.spawn(async {
            let name = std::thread::current().name().map(str::to_string);
            // SAFETY: gettid and getpriority only read the calling thread's state.
            let nice =
                unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
            (name, nice)
        }))
        .expect("the task runs");
        assert_eq!(name.as_deref(), Some("meshgate-warmer"));
        assert_eq!(nice, 19);
    }

    /// Writes `people.parquet` in `dir`: `id` 0..1000 in row groups of 100,
    /// `name` "`prefix` `id`", `region` EU, US or APAC in turn.
    fn write_people(dir: &std::path::Path, prefix: &str) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, false),
            Field::new("region", DataType::Utf8, false),
        ]));
        let ids = 0..1000_i64;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from_iter_values(ids.clone())),
            Arc::new(StringArray::from_iter_values(
                ids.clone().map(|id| format!("{prefix} {id}")),
            )),
            Arc::new(StringArray::from_iter_values(
                ids.map(|id| ["EU", "US", "APAC"][id as usize % 3]),
            )),
        ];
        let batch = RecordBatch::try_new(Arc::clone(&schema), columns).expect("batch");
        let properties = WriterProperties::builder()
            .set_max_row_group_row_count(Some(100))
            .build();
        let out = std::fs::File::create(dir.join("people.parquet")).expect("file");
        let mut writer = ArrowWriter::try_new(out, schema, Some(properties)).expect("writer");
        writer.write(&batch).expect("write");
        writer.close().expect("close");
    }

    /// A new directory holding the people file (names "person N"), with
    /// [`context`] over it.
    async fn people_files() -> (tempfile::TempDir, SessionContext, Arc<dyn TableProvider>) {
        let dir = tempfile::tempdir().expect("tempdir");
        write_people(dir.path(), "person");
        let (ctx, product) = context(dir.path()).await;
        (dir, ctx, product)
    }

    /// A context that lists a product's directory at each scan, with the
    /// people product in `dir` as `people` and its file read by DataFusion
    /// alone as `plain`.
    async fn context(dir: &std::path::Path) -> (SessionContext, Arc<dyn TableProvider>) {
        parquet_product_context(dir, "people", "people.parquet").await
    }

    /// Runs `sql`: its rows as a sorted table, and the hot scans in its plan
    /// (what they show, and their metrics after the run).
    async fn run(ctx: &SessionContext, sql: &str) -> (String, Vec<(String, MetricsSet)>) {
        let (plan, batches) = plan_and_run(ctx, sql).await;
        (sorted_rows(&batches), hot_scans(&plan))
    }

    /// The rows of `batches`, as a sorted table.
    fn sorted_rows(batches: &[RecordBatch]) -> String {
        let mut lines: Vec<String> = pretty_format_batches(batches)
            .expect("format")
            .to_string()
            .lines()
            .filter(|line| line.starts_with("| "))
            .skip(1) // the header
            .map(String::from)
            .collect();
        lines.sort();
        lines.join("\n")
    }

    /// The hot scans in `plan`: what they show, and their metrics.
    fn hot_scans(plan: &Arc<dyn ExecutionPlan>) -> Vec<(String, MetricsSet)> {
        let mut hot = Vec::new();
        plan.apply(|node| {
            if let Some(scan) = node.downcast_ref::<HotScan>() {
                let shown = displayable(node.as_ref()).one_line().to_string();
                hot.push((shown, scan.metrics().expect("metrics")));
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .expect("walk");
        hot
    }

    fn count(metrics: &MetricsSet, name: &str) -> usize {
        metrics
            .sum_by_name(name)
            .map_or(0, |value| value.as_usize())
    }

    /// How many column chunks a hot scan decoded, and how many it took
    /// from the cache.
    fn chunks_read(metrics: &MetricsSet) -> (usize, usize) {
        (
            count(metrics, "column_chunks_decoded"),
            count(metrics, "column_chunks_cached"),
        )
    }

    /// Runs `sql` once, waits for the row groups it keeps to be decoded
    /// into the cache, and runs it again: the rows of both runs, which must
    /// be equal, and the hot scans of the second.
    async fn run_warmed(ctx: &SessionContext, sql: &str) -> (String, Vec<(String, MetricsSet)>) {
        let (first, _) = run(ctx, sql).await;
        warmed().await;
        let (rows, hot) = run(ctx, sql).await;
        assert_eq!(rows, first, "{sql}");
        (rows, hot)
    }

    #[tokio::test]
    async fn a_scan_keeping_few_row_groups_is_read_from_chunks_decoded_in_the_background() {
        let (_dir, ctx, _) = people_files().await;

        // Planned as a Parquet scan while its row group is decoded.
        let lookup = "SELECT id, name FROM people WHERE id = 345";
        let (rows, hot) = run(&ctx, lookup).await;
        assert_eq!(rows, "| 345 | person 345 |");
        assert!(hot.is_empty(), "{hot:?}");
        warmed().await;
        let (rows, hot) = run(&ctx, lookup).await;
        assert_eq!(rows, "| 345 | person 345 |");
        assert_eq!(hot.len(), 1, "{hot:?}");
        assert!(hot[0].0.contains("row_groups=1 of 10"), "{}", hot[0].0);
        assert_eq!(chunks_read(&hot[0].1), (0, 2));

        // The same row group, one more column: planned as a Parquet scan
        // until that column is cached too.
        let other = "SELECT region, name FROM people WHERE id = 301";
        let (rows, hot) = run(&ctx, other).await;
        assert_eq!(rows, "| US     | person 301 |");
        assert!(hot.is_empty(), "{hot:?}");
        let (_, hot) = run_warmed(&ctx, other).await;
        assert_eq!(chunks_read(&hot[0].1), (0, 3));

        // Chunks evicted between planning and running are decoded then.
        let plan = physical_plan(&ctx, lookup).await;
        chunks().invalidate_all();
        let batches = run_plan(&ctx, &plan).await;
        assert_eq!(sorted_rows(&batches), "| 345 | person 345 |");
        let hot = hot_scans(&plan);
        assert_eq!(hot.len(), 1, "{hot:?}");
        assert_eq!(chunks_read(&hot[0].1), (2, 0));
    }

    /// The operators of `plan`, root first, and its partitions.
    fn shape(plan: &Arc<dyn ExecutionPlan>) -> (Vec<String>, usize) {
        let mut names = Vec::new();
        plan.apply(|node| {
            names.push(node.name().to_string());
            Ok(TreeNodeRecursion::Continue)
        })
        .expect("walk");
        (names, plan.output_partitioning().partition_count())
    }

    #[tokio::test]
    async fn filters_are_evaluated_only_over_the_run_of_rows_a_column_in_order_leaves() {
        let (_dir, ctx, _) = people_files().await;
        // Each statement, its rows, and how many rows its filters were
        // evaluated over. `id` is in order in every row group; `region` is
        // not.
        let cases = [
            (
                "SELECT id, name FROM people WHERE id = 345",
                "| 345 | person 345 |",
                1,
            ),
            (
                "SELECT id, region FROM people WHERE id BETWEEN 340 AND 349 AND region = 'EU'",
                "| 342 | EU     |\n| 345 | EU     |\n| 348 | EU     |",
                10,
            ),
            (
                "SELECT id FROM people WHERE id >= 390 AND id < 400 AND region <> 'EU'",
                "| 391 |\n| 392 |\n| 394 |\n| 395 |\n| 397 |\n| 398 |",
                10,
            ),
            // No row in the run: nothing evaluated.
            ("SELECT id FROM people WHERE id > 395 AND id < 396", "", 0),
            // OR is not answered by order: the whole row group is evaluated.
            (
                "SELECT id FROM people WHERE id = 345 OR id = 346",
                "| 345 |\n| 346 |",
                100,
            ),
        ];
        for (sql, want, evaluated) in cases {
            let (rows, hot) = run_warmed(&ctx, sql).await;
            assert_eq!(rows, want, "{sql}");
            assert_eq!(hot.len(), 1, "{sql}: {hot:?}");
            assert_eq!(count(&hot[0].1, "rows_evaluated"), evaluated, "{sql}");
        }
    }

    #[tokio::test]
    async fn a_lookup_read_hot_runs_in_one_partition() {
        // Four partitions, so that DataFusion spreads the rows over them.
        let (_dir, ctx, people) = people_files().await;
        let ctx = SessionContext::new_with_config_rt(
            ctx.copied_config().with_target_partitions(4),
            ctx.runtime_env(),
        );
        ctx.register_table("people", people).expect("register");
        let lookup = "SELECT name, id + 1 AS next FROM people WHERE id = 345 OR id = 360";
        run_warmed(&ctx, lookup).await;
        let plan = physical_plan(&ctx, lookup).await;
        let (before, partitions) = shape(&plan);
        assert!(
            before.contains(&"RepartitionExec".to_string()),
            "{before:?}"
        );
        assert_eq!(partitions, 4);

        let serial = SerialHotScans
            .optimize(Arc::clone(&plan), &ConfigOptions::default())
            .expect("optimize");
        let (after, partitions) = shape(&serial);
        let expected: Vec<String> = before
            .iter()
            .filter(|name| *name != "RepartitionExec")
            .cloned()
            .collect();
        assert_eq!(after, expected);
        assert_eq!(after.last().map(String::as_str), Some("HotScan"));
        assert_eq!(partitions, 1);
        assert_eq!(
            sorted_rows(&run_plan(&ctx, &serial).await),
            "| person 345 | 346  |\n| person 360 | 361  |"
        );

        // Above an aggregate, or over a Parquet scan, the plan is left as it is.
        for sql in [
            "SELECT count(*) FROM people WHERE id = 345",
            "SELECT name FROM people WHERE id > 10",
        ] {
            let plan = physical_plan(&ctx, sql).await;
            let unchanged = SerialHotScans
                .optimize(Arc::clone(&plan), &ConfigOptions::default())
                .expect("optimize");
            assert!(Arc::ptr_eq(&plan, &unchanged), "{sql}");
        }
    }

    #[tokio::test]
    async fn a_hot_scan_answers_as_the_parquet_scan_does() {
        let (_dir, ctx, _) = people_files().await;
        // (filter, whether it is read from decoded row groups)
        let cases = [
            ("id = 345", true),
            ("id BETWEEN 150 AND 260", true),
            ("id BETWEEN 150 AND 360", false),
            ("id = 345 AND region = 'APAC'", true),
            ("id = 345 AND region = 'EU'", true),
            ("id IN (7, 993)", true),
            ("id < 0", true),
            ("id + 1 = 346", false),
            ("region = 'EU'", false),
            ("id >= 500", false),
            ("id = 12 OR name = 'person 990'", true),
            ("id = 12 OR region = 'EU'", false),
        ];
        for (filter, hot) in cases {
            for select in ["*", "name, id * 2 AS twice", "count(*)"] {
                let sql = format!("SELECT {select} FROM people WHERE {filter}");
                let (rows, scans) = run_warmed(&ctx, &sql).await;
                let plain = format!("SELECT {select} FROM plain WHERE {filter}");
                let (expected, _) = run(&ctx, &plain).await;
                assert_eq!(rows, expected, "{sql}");
                assert_eq!(scans.len(), usize::from(hot), "{sql}: {scans:?}");
            }
        }
        let (rows, _) = run(&ctx, "SELECT id FROM people WHERE id BETWEEN 150 AND 260").await;
        assert_eq!(rows.lines().count(), 111);
        // A join's keys reach the hot scan as a dynamic filter.
        let join = "SELECT p.id, p.name FROM (VALUES (7), (8), (345)) v(k) \
                    JOIN {} p ON p.id = v.k WHERE p.id IN (7, 345)";
        let (rows, scans) = run_warmed(&ctx, &join.replace("{}", "people")).await;
        assert_eq!(rows, "| 345 | person 345 |\n| 7   | person 7   |");
        assert_eq!(rows, run(&ctx, &join.replace("{}", "plain")).await.0);
        assert!(scans[0].0.contains("DynamicFilter"), "{scans:?}");
    }

    #[tokio::test]
    async fn a_file_rewritten_is_read_afresh() {
        let (dir, ctx, _) = people_files().await;
        let lookup = "SELECT name FROM people WHERE id = 345";
        let (rows, hot) = run_warmed(&ctx, lookup).await;
        assert_eq!(rows, "| person 345 |");
        assert_eq!(hot.len(), 1, "{hot:?}");
        write_people(dir.path(), "renamed person");
        let (rows, hot) = run(&ctx, lookup).await;
        assert_eq!(rows, "| renamed person 345 |");
        assert!(hot.is_empty(), "{hot:?}");
        let (rows, hot) = run_warmed(&ctx, lookup).await;
        assert_eq!(rows, "| renamed person 345 |");
        assert_eq!(chunks_read(&hot[0].1), (0, 2));
    }

    #[tokio::test]
    async fn behind_a_row_filter_shown_true_or_checked_a_lookup_is_read_hot() {
        let (_dir, ctx, product) = people_files().await;
        let view = |value: &str| {
            lit(datafusion::common::ScalarValue::Utf8View(Some(
                value.into(),
            )))
        };
        // Shown true for every row from the dictionary pages (the scan reads
        // the listed version), then one checked row by row.
        for (row_filter, expected) in [
            (
                col("region").not_eq(view("XX")),
                "| 345 | person 345 | EU     |\n| 346 | person 346 | US     |",
            ),
            (
                col("region").eq(view("EU")),
                "| 345 | person 345 | EU     |",
            ),
        ] {
            let mut caller = CallerProductView::unrestricted(3);
            caller.row_filter = Some(row_filter);
            let dictionaries = as_dictionary_scan(&product);
            let table =
                PolicyTable::wrap("people".into(), Arc::clone(&product), dictionaries, &caller);
            ctx.deregister_table("governed").expect("deregister");
            ctx.register_table("governed", table).expect("register");
            let (rows, hot) =
                run_warmed(&ctx, "SELECT * FROM governed WHERE id IN (345, 346)").await;
            assert_eq!(rows, expected);
            assert_eq!(hot.len(), 1, "{hot:?}");
        }
    }
}
