//! Parquet files read with plain string types. A file whose embedded Arrow
//! schema stores strings or binaries as views (as DataFusion and tpchgen
//! write them) is decoded straight into `Utf8` / `Binary`, the types its
//! product exposes, rather than into views that each batch then copies again.

use std::sync::Arc;

use arrow::datatypes::{DataType, FieldRef, Fields, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::common::Statistics;
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::file_format::file_compression_type::FileCompressionType;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::parquet::metadata::DFParquetMetadata;
use datafusion::datasource::physical_plan::{FileScanConfig, FileSinkConfig, FileSource};
use datafusion::datasource::table_schema::TableSchema;
use datafusion::error::Result;
use datafusion::physical_expr::LexRequirement;
use datafusion::physical_expr_common::sort_expr::LexOrdering;
use datafusion::physical_plan::ExecutionPlan;
use object_store::{ObjectMeta, ObjectStore};
use parquet::arrow::parquet_to_arrow_schema;

/// DataFusion's Parquet format, with each file's view types read as plain ones.
#[derive(Debug)]
pub(crate) struct PlainParquet {
    inner: ParquetFormat,
    /// The schema each file is read with, by path, for the version of the
    /// file (size and modification time) it was worked out for.
    schemas: moka::sync::Cache<object_store::path::Path, FileSchema>,
}

#[derive(Debug, Clone)]
struct FileSchema {
    size: u64,
    last_modified: chrono::DateTime<chrono::Utc>,
    plain: Option<SchemaRef>,
}

impl PlainParquet {
    pub(crate) fn new(inner: ParquetFormat) -> Self {
        Self {
            inner,
            schemas: moka::sync::Cache::new(4096),
        }
    }

    /// The Arrow schema to read `file` with, when its own names view types:
    /// the same with each view type plain. Worked out once for each version
    /// of a file (its size and modification time). A file whose footer cannot
    /// be read gets no schema, and the scan reports why.
    async fn read_schema(
        &self,
        state: &dyn Session,
        store: &dyn ObjectStore,
        file: &ObjectMeta,
    ) -> Option<SchemaRef> {
        if let Some(known) = self.schemas.get(&file.location)
            && known.size == file.size
            && known.last_modified == file.last_modified
        {
            return known.plain;
        }
        let plain = file_plain_schema(state, store, file, self.inner.metadata_size_hint())
            .await
            .ok()?;
        self.schemas.insert(
            file.location.clone(),
            FileSchema {
                size: file.size,
                last_modified: file.last_modified,
                plain: plain.clone(),
            },
        );
        plain
    }
}

/// `file`'s own Arrow schema with each view type plain, or `None` when it has
/// none. The footer comes from the metadata cache the scan reads it from.
async fn file_plain_schema(
    state: &dyn Session,
    store: &dyn ObjectStore,
    file: &ObjectMeta,
    metadata_size_hint: Option<usize>,
) -> Result<Option<SchemaRef>> {
    let metadata = DFParquetMetadata::new(store, file)
        .with_metadata_size_hint(metadata_size_hint)
        .with_file_metadata_cache(Some(
            state.runtime_env().cache_manager.get_file_metadata_cache(),
        ))
        .fetch_metadata()
        .await?;
    let footer = metadata.file_metadata();
    let stored = Arc::new(parquet_to_arrow_schema(
        footer.schema_descr(),
        footer.key_value_metadata(),
    )?);
    let plain = plain_schema(&stored);
    Ok((!Arc::ptr_eq(&plain, &stored)).then_some(plain))
}

/// `schema` with every view type in it made plain.
pub(crate) fn plain_schema(schema: &SchemaRef) -> SchemaRef {
    let fields: Fields = schema.fields().iter().map(plain_field).collect();
    if fields == *schema.fields() {
        Arc::clone(schema)
    } else {
        Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()))
    }
}

/// The field with every view type in it, however nested, made plain.
fn plain_field(field: &FieldRef) -> FieldRef {
    match plain_type(field.data_type()) {
        Some(data_type) => Arc::new(field.as_ref().clone().with_data_type(data_type)),
        None => Arc::clone(field),
    }
}

/// `data_type` with its view types made plain, or `None` when it has none.
fn plain_type(data_type: &DataType) -> Option<DataType> {
    match data_type {
        DataType::Utf8View => Some(DataType::Utf8),
        DataType::BinaryView => Some(DataType::Binary),
        DataType::List(item) => plain_type(item.data_type())
            .map(|inner| DataType::List(Arc::new(item.as_ref().clone().with_data_type(inner)))),
        DataType::LargeList(item) => plain_type(item.data_type()).map(|inner| {
            DataType::LargeList(Arc::new(item.as_ref().clone().with_data_type(inner)))
        }),
        DataType::FixedSizeList(item, size) => plain_type(item.data_type()).map(|inner| {
            DataType::FixedSizeList(Arc::new(item.as_ref().clone().with_data_type(inner)), *size)
        }),
        DataType::Struct(fields) => {
            let plain: Fields = fields.iter().map(plain_field).collect();
            (plain != *fields).then_some(DataType::Struct(plain))
        }
        DataType::Map(entries, sorted) => plain_type(entries.data_type()).map(|inner| {
            DataType::Map(
                Arc::new(entries.as_ref().clone().with_data_type(inner)),
                *sorted,
            )
        }),
        _ => None,
    }
}

#[async_trait]
impl FileFormat for PlainParquet {
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
        for group in &mut conf.file_groups {
            for index in 0..group.len() {
                let file: &mut PartitionedFile = &mut group[index];
                if file.arrow_schema.is_none() {
                    file.arrow_schema = self
                        .read_schema(state, store.as_ref(), &file.object_meta)
                        .await;
                }
            }
        }
        self.inner.create_physical_plan(state, conf).await
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

#[cfg(test)]
mod tests {
    use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray, StringViewArray};
    use arrow::datatypes::Field;
    use datafusion::prelude::SessionContext;
    use object_store::ObjectStoreExt;
    use object_store::local::LocalFileSystem;
    use object_store::path::Path;
    use parquet::arrow::ArrowWriter;

    use super::*;

    /// Writes one column `name` of `values` to a Parquet file, with the
    /// column's Arrow type in its embedded schema, and returns its metadata.
    async fn write(dir: &std::path::Path, file: &str, values: ArrayRef) -> ObjectMeta {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", values.data_type().clone(), true),
        ]));
        let ids: ArrayRef = Arc::new(Int64Array::from_iter_values(0..values.len() as i64));
        let batch = RecordBatch::try_new(Arc::clone(&schema), vec![ids, values]).expect("batch");
        let path = dir.join(file);
        let mut writer =
            ArrowWriter::try_new(std::fs::File::create(&path).expect("file"), schema, None)
                .expect("writer");
        writer.write(&batch).expect("write");
        writer.close().expect("close");
        LocalFileSystem::new()
            .head(&Path::from_filesystem_path(&path).expect("path"))
            .await
            .expect("head")
    }

    #[tokio::test]
    async fn a_file_storing_string_views_is_read_as_plain_strings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let views = write(
            dir.path(),
            "views.parquet",
            Arc::new(StringViewArray::from(vec!["a", "bb"])),
        )
        .await;
        let plain = write(
            dir.path(),
            "plain.parquet",
            Arc::new(StringArray::from(vec!["a", "bb"])),
        )
        .await;
        let state = SessionContext::new().state();
        let store = LocalFileSystem::new();
        let format = PlainParquet::new(ParquetFormat::default());

        let schema = format
            .read_schema(&state, &store, &views)
            .await
            .expect("a schema for the file with views");
        let types: Vec<&DataType> = schema.fields().iter().map(|f| f.data_type()).collect();
        assert_eq!(types, [&DataType::Int64, &DataType::Utf8]);
        // A file already plain needs no schema of its own.
        assert!(format.read_schema(&state, &store, &plain).await.is_none());
        // Worked out once for each version of a file: a rewrite is read again.
        let rewritten = write(
            dir.path(),
            "views.parquet",
            Arc::new(StringArray::from(vec!["a", "bb", "ccc"])),
        )
        .await;
        assert_ne!(rewritten.size, views.size);
        assert!(
            format
                .read_schema(&state, &store, &rewritten)
                .await
                .is_none()
        );
    }

    #[test]
    fn view_types_are_made_plain_however_nested() {
        let item = Arc::new(Field::new("item", DataType::Utf8View, true));
        let cases = [
            (DataType::Utf8View, Some(DataType::Utf8)),
            (DataType::BinaryView, Some(DataType::Binary)),
            (DataType::Utf8, None),
            (DataType::Int64, None),
            (
                DataType::List(Arc::clone(&item)),
                Some(DataType::List(Arc::new(Field::new(
                    "item",
                    DataType::Utf8,
                    true,
                )))),
            ),
            (
                DataType::Struct(Fields::from(vec![
                    Field::new("a", DataType::Int32, false),
                    Field::new("b", DataType::BinaryView, true),
                ])),
                Some(DataType::Struct(Fields::from(vec![
                    Field::new("a", DataType::Int32, false),
                    Field::new("b", DataType::Binary, true),
                ]))),
            ),
            (
                DataType::Struct(Fields::from(vec![Field::new("a", DataType::Utf8, true)])),
                None,
            ),
        ];
        for (data_type, expected) in cases {
            assert_eq!(plain_type(&data_type), expected, "{data_type}");
        }
    }
}
