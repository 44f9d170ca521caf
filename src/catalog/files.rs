//! File products on object storage: Parquet, CSV, newline-delimited JSON and
//! Arrow IPC, one file or a directory of files, as DataFusion listing tables.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::file_format::FileFormat as DataFusionFileFormat;
use datafusion::datasource::file_format::arrow::ArrowFormat;
use datafusion::datasource::file_format::csv::CsvFormat;
use datafusion::datasource::file_format::json::JsonFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::DataFusionError;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_plan::ExecutionPlan;
use object_store::ObjectStoreExt;
use url::Url;

use super::parquet::ParquetProduct;
use super::unopened::UnopenedFiles;
use crate::config::{ColumnContract, CsvOptions, FileFormat};

/// Where a file product's files are and how they are read.
#[derive(Debug, Clone)]
pub(crate) struct FileProduct {
    pub url: Url,
    pub format: FileFormat,
    pub csv: CsvOptions,
    pub declared: Vec<ColumnContract>,
    pub policy_columns: Vec<PolicyColumn>,
}

/// Why a file product did not open.
pub(super) enum OpenError {
    /// Its store did not answer (a network error, an outage).
    Unreachable(DataFusionError),
    /// Its files are not what the product says.
    Refused(String),
}

impl From<String> for OpenError {
    fn from(reason: String) -> Self {
        OpenError::Refused(reason)
    }
}

/// How long the mesh waits for a product's files while it loads: a store
/// that drops packets rather than refusing them would otherwise hold the
/// load for its client's every retry (minutes).
const OPEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Opens a file product: infers the files' schema and, when the product
/// declares columns, checks them against it and exposes exactly those
/// columns. A product whose store does not answer (within
/// [`OPEN_TIMEOUT`]) is published from its declared columns, when they
/// give every column its policies read, and opened at its first query once
/// the store is back.
pub(crate) async fn open_file_product(
    state: &dyn Session,
    product: &FileProduct,
) -> Result<Arc<dyn TableProvider>, String> {
    open_file_product_within(state, product, OPEN_TIMEOUT).await
}

async fn open_file_product_within(
    state: &dyn Session,
    product: &FileProduct,
    timeout: std::time::Duration,
) -> Result<Arc<dyn TableProvider>, String> {
    let opened = tokio::time::timeout(timeout, open_files(state, product))
        .await
        .unwrap_or_else(|_| {
            Err(OpenError::Unreachable(DataFusionError::IoError(
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the store gave no answer within {} s",
                        timeout.as_secs_f32()
                    ),
                ),
            )))
        });
    match opened {
        Ok(table) => Ok(table),
        Err(OpenError::Refused(reason)) => Err(reason),
        Err(OpenError::Unreachable(error)) => {
            let reason = format!("cannot read the files' schema: {}", root_message(&error));
            UnopenedFiles::publish(product, &reason).map_err(|why| format!("{reason}{why}"))
        }
    }
}

/// Opens a file product, telling an unreachable store from files that
/// break the product's contract.
pub(super) async fn open_files(
    state: &dyn Session,
    product: &FileProduct,
) -> Result<Arc<dyn TableProvider>, OpenError> {
    let FileProduct {
        url,
        format,
        csv,
        declared,
        policy_columns,
    } = product;
    let format = *format;
    let table_url = ListingTableUrl::parse(url.as_str()).map_err(|e| e.to_string())?;
    let parquet_options = state.default_table_options().parquet;
    let file_format: Arc<dyn DataFusionFileFormat> = match format {
        // The session's Parquet options.
        FileFormat::Parquet => {
            Arc::new(ParquetFormat::default().with_options(parquet_options.clone()))
        }
        FileFormat::Csv => Arc::new(
            CsvFormat::default()
                .with_has_header(csv.has_header)
                .with_delimiter(csv.delimiter)
                .with_quote(csv.quote),
        ),
        FileFormat::Json => Arc::new(JsonFormat::default()),
        FileFormat::Arrow => Arc::new(ArrowFormat),
    };
    // A directory holds the files of the product's format; a single file is
    // taken whatever its extension.
    let extension = if table_url.is_collection() {
        format.extension()
    } else {
        ""
    };
    let options = ListingOptions::new(file_format).with_file_extension(extension);
    let listing = ListingTableConfig::new(table_url.clone()).with_listing_options(options.clone());
    let inferred = listing
        .infer_schema(state)
        .await
        .map_err(|e| match e.find_root() {
            DataFusionError::ObjectStore(inner)
                if !matches!(**inner, object_store::Error::NotFound { .. }) =>
            {
                OpenError::Unreachable(e)
            }
            _ => OpenError::Refused(format!(
                "cannot read the files' schema: {}",
                root_message(&e)
            )),
        })?;
    let file_schema = inferred
        .file_schema
        .clone()
        .ok_or_else(|| "no schema could be inferred".to_string())?;
    if file_schema.fields().is_empty() {
        return Err(format!("no {} files found", extension_label(format)).into());
    }

    if format == FileFormat::Csv && !declared.is_empty() {
        // A CSV file's fields are read by position: the table reads every
        // field of a line, and the declared columns are picked out of them.
        let (read, picked) = csv_columns(&file_schema, declared, policy_columns, csv.has_header)?;
        let table = listing_table(state, table_url, options, read).map_err(|e| e.to_string())?;
        return Ok(DeclaredColumns::over(table, picked)?);
    }
    let schema = if declared.is_empty() {
        file_schema
    } else {
        let published = contract_schema(&file_schema, declared, format)?;
        with_policy_columns(&published, &file_schema, policy_columns, "the files")?
    };
    let table =
        listing_table(state, table_url.clone(), options, schema).map_err(|e| e.to_string())?;
    Ok(match format {
        FileFormat::Parquet => {
            Arc::new(ParquetProduct::new(state, table, table_url, parquet_options, extension).await)
        }
        _ => table,
    })
}

/// How the CSV files of a product with declared columns are read: the
/// schema of a whole line (each field in its place, declared ones in their
/// declared types, the others as text, which always parses), and where in
/// it each declared column is, then each of `policy_columns`. With a header
/// that names every declared column (in any case, when that is not
/// ambiguous), the columns are found by name; otherwise they name the
/// fields in order: all of them with a header, the first ones without.
fn csv_columns(
    file_schema: &Schema,
    declared: &[ColumnContract],
    policy_columns: &[PolicyColumn],
    has_header: bool,
) -> Result<(SchemaRef, Vec<usize>), String> {
    let fields = file_schema.fields();
    let by_name: Option<Vec<usize>> = has_header
        .then(|| {
            declared
                .iter()
                .map(|c| header_field(file_schema.fields().iter(), &c.name))
                .collect()
        })
        .flatten();
    let picked: Vec<usize> = match by_name {
        Some(picked) => picked,
        None if declared.len() == fields.len()
            || (!has_header && declared.len() < fields.len()) =>
        {
            (0..declared.len()).collect()
        }
        None if has_header => {
            let unnamed = declared
                .iter()
                .find(|c| header_field(file_schema.fields().iter(), &c.name).is_none())
                .map_or("", |c| c.name.as_str());
            return Err(format!(
                "declared column `{unnamed}` is not in the files' header (columns there: {}): \
                 name each declared column in the header, or declare one column for each of \
                 its {} fields to name them in order",
                field_names(file_schema),
                fields.len()
            ));
        }
        None => {
            return Err(format!(
                "{} columns are declared but the files' lines have {} fields (they have no header: \
                 the declared columns name the fields in order)",
                declared.len(),
                fields.len()
            ));
        }
    };
    let mut read: Vec<Field> = fields
        .iter()
        .map(|field| Field::new(field.name(), DataType::Utf8, true))
        .collect();
    for (column, &index) in declared.iter().zip(&picked) {
        read[index] = Field::new(&column.name, column.data_type.clone(), true);
    }
    // Fields no column is declared for keep their inferred names, unless a
    // declared column has taken the name.
    for (index, field) in read.iter_mut().enumerate() {
        if !picked.contains(&index) {
            let mut name = field.name().clone();
            while declared.iter().any(|c| c.name == name) {
                name.push('_');
            }
            *field = Field::new(name, DataType::Utf8, true);
        }
    }
    let mut picked = picked;
    for column in policy_columns {
        let index = header_field(read.iter(), &column.name).filter(|i| !picked.contains(i));
        let Some(index) = index else {
            column.missing(&Schema::new(read.clone()), "the files")?;
            continue;
        };
        read[index] = Field::new(&column.name, DataType::Utf8, true);
        picked.push(index);
    }
    Ok((Arc::new(Schema::new(read)), picked))
}

/// The field of a CSV header that names `name`: the one spelled alike, or
/// else the only one alike but for case.
fn header_field<'a, F: AsRef<Field> + 'a>(
    header: impl Iterator<Item = &'a F> + Clone,
    name: &str,
) -> Option<usize> {
    if let Some(index) = header.clone().position(|f| f.as_ref().name() == name) {
        return Some(index);
    }
    let mut alike = header
        .enumerate()
        .filter(|(_, f)| f.as_ref().name().eq_ignore_ascii_case(name))
        .map(|(index, _)| index);
    match (alike.next(), alike.next()) {
        (Some(index), None) => Some(index),
        _ => None,
    }
}

fn field_names(schema: &Schema) -> String {
    schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The listing table of the files at `url` with `schema`.
pub(super) fn listing_table(
    state: &dyn Session,
    url: ListingTableUrl,
    options: ListingOptions,
    schema: SchemaRef,
) -> datafusion::error::Result<Arc<dyn TableProvider>> {
    let config = ListingTableConfig::new(url.clone())
        .with_listing_options(options)
        .with_schema(schema);
    // Each file's statistics are computed once, not at each scan: the
    // runtime's cache keeps them until the file changes.
    let table: Arc<dyn TableProvider> = Arc::new(
        ListingTable::try_new(config)?
            .with_cache(state.runtime_env().cache_manager.get_file_statistic_cache()),
    );
    if url.is_collection() {
        Ok(table)
    } else {
        Ok(Arc::new(SingleFile {
            table,
            table_url: url,
        }))
    }
}

/// A product stored as one file. A listing that finds no file reads as an
/// empty table; a product whose file has gone is an error instead.
#[derive(Debug)]
struct SingleFile {
    table: Arc<dyn TableProvider>,
    table_url: ListingTableUrl,
}

#[async_trait]
impl TableProvider for SingleFile {
    fn schema(&self) -> SchemaRef {
        self.table.schema()
    }

    fn table_type(&self) -> TableType {
        self.table.table_type()
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::error::Result<Vec<TableProviderFilterPushDown>> {
        self.table.supports_filters_pushdown(filters)
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let plan = self.table.scan(state, projection, filters, limit).await?;
        // The listing looked the file up; only when it did not find it
        // there (and listed whatever the path holds instead) is the file
        // looked up again, to fail as missing.
        if !reads_only(&plan, self.table_url.prefix()) {
            let store = state.runtime_env().object_store(&self.table_url)?;
            store.head(self.table_url.prefix()).await?;
        }
        Ok(plan)
    }
}

/// Some of a table's columns, in an order of their own: the declared
/// columns of a product whose files hold more, or hold them in another
/// order. Filters and limits pass through (the names are the table's).
#[derive(Debug)]
struct DeclaredColumns {
    table: Arc<dyn TableProvider>,
    schema: SchemaRef,
    /// The table's column of each of this one's.
    picked: Vec<usize>,
}

impl DeclaredColumns {
    /// `table`'s columns `picked`, or `table` itself when that is all of
    /// them in order.
    fn over(
        table: Arc<dyn TableProvider>,
        picked: Vec<usize>,
    ) -> Result<Arc<dyn TableProvider>, String> {
        let all = table.schema();
        if picked.iter().copied().eq(0..all.fields().len()) {
            return Ok(table);
        }
        let schema = Arc::new(all.project(&picked).map_err(|e| e.to_string())?);
        Ok(Arc::new(Self {
            table,
            schema,
            picked,
        }))
    }
}

#[async_trait]
impl TableProvider for DeclaredColumns {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        self.table.table_type()
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> datafusion::error::Result<Vec<TableProviderFilterPushDown>> {
        self.table.supports_filters_pushdown(filters)
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let columns: Vec<usize> = match projection {
            Some(projection) => projection
                .iter()
                .map(|&i| {
                    self.picked.get(i).copied().ok_or_else(|| {
                        DataFusionError::Internal(format!("no column {i} to project"))
                    })
                })
                .collect::<datafusion::error::Result<_>>()?,
            None => self.picked.clone(),
        };
        self.table.scan(state, Some(&columns), filters, limit).await
    }
}

/// Whether `plan` is a scan of the file at `location` alone.
fn reads_only(plan: &Arc<dyn ExecutionPlan>, location: &object_store::path::Path) -> bool {
    plan.downcast_ref::<DataSourceExec>()
        .and_then(|exec| exec.data_source().downcast_ref::<FileScanConfig>())
        .is_some_and(|config| {
            let mut files = config
                .file_groups
                .iter()
                .flat_map(|group| group.iter())
                .peekable();
            files.peek().is_some() && files.all(|file| &file.object_meta.location == location)
        })
}

/// When the files at `url` last changed (the newest modification time of
/// the file, or of the files in the directory), in UNIX seconds.
pub(crate) async fn last_modified(
    runtime: &datafusion::execution::runtime_env::RuntimeEnv,
    url: &Url,
) -> Option<f64> {
    use futures::TryStreamExt;
    let table_url = ListingTableUrl::parse(url.as_str()).ok()?;
    let store = runtime.object_store(&table_url).ok()?;
    let newest = if table_url.is_collection() {
        store
            .list(Some(table_url.prefix()))
            .try_fold(
                None,
                |newest: Option<chrono::DateTime<chrono::Utc>>, meta| async move {
                    Ok(Some(
                        newest.map_or(meta.last_modified, |n| n.max(meta.last_modified)),
                    ))
                },
            )
            .await
            .ok()??
    } else {
        store.head(table_url.prefix()).await.ok()?.last_modified
    };
    Some(newest.timestamp_micros() as f64 / 1e6)
}

fn extension_label(format: FileFormat) -> &'static str {
    match format {
        FileFormat::Parquet => "Parquet",
        FileFormat::Csv => "CSV",
        FileFormat::Json => "JSON",
        FileFormat::Arrow => "Arrow IPC",
    }
}

/// The schema a product exposes under its declared columns. Self-describing
/// formats (Parquet, Arrow) keep the files' types, which must match the
/// contract; text formats (CSV, JSON) are parsed into the declared types.
fn contract_schema(
    file_schema: &Schema,
    declared: &[ColumnContract],
    format: FileFormat,
) -> Result<SchemaRef, String> {
    let self_describing = matches!(format, FileFormat::Parquet | FileFormat::Arrow);
    let found = check_contract(file_schema, declared, self_describing, "the files")?;
    let fields: Vec<Field> = if self_describing {
        // Parquet's large strings and binaries are read as the plain ones
        // declared (views stay views: they become plain for the wire
        // anyway). Arrow files are read as they are stored.
        found
            .into_iter()
            .zip(declared)
            .map(
                |(field, column)| match (field.data_type(), &column.data_type) {
                    (DataType::LargeUtf8, DataType::Utf8)
                    | (DataType::LargeBinary, DataType::Binary)
                        if format == FileFormat::Parquet =>
                    {
                        field
                            .as_ref()
                            .clone()
                            .with_data_type(column.data_type.clone())
                    }
                    _ => field.as_ref().clone(),
                },
            )
            .collect()
    } else {
        declared
            .iter()
            .map(|c| Field::new(&c.name, c.data_type.clone(), true))
            .collect()
    };
    Ok(Arc::new(Schema::new(fields)))
}

/// The stored field of each declared column: every declared column must be
/// there and, when `typed`, hold a type that satisfies the declared one.
/// `holder` names where the data is (`the files`, `the source table`).
pub(crate) fn check_contract<'a>(
    stored: &'a Schema,
    declared: &[ColumnContract],
    typed: bool,
    holder: &str,
) -> Result<Vec<&'a Field>, String> {
    declared
        .iter()
        .map(|column| {
            let Ok(found) = stored.field_with_name(&column.name) else {
                return Err(format!(
                    "declared column `{}` is missing from {holder} (columns there: {})",
                    column.name,
                    field_names(stored)
                ));
            };
            if typed && !type_satisfies(found.data_type(), &column.data_type) {
                return Err(format!(
                    "column `{}` is declared {} but is {} in {holder}",
                    column.name,
                    column.data_type,
                    found.data_type()
                ));
            }
            Ok(found)
        })
        .collect()
}

/// A column a product's policies read that the product does not publish.
#[derive(Debug, Clone)]
pub(crate) struct PolicyColumn {
    pub name: String,
    /// The first policy expression that reads it (`policies[0].row_filter`);
    /// none when only views of the product's domain name it (they may name
    /// a column the storage does not hold: one of their own aliases).
    pub read_by: Option<String>,
}

impl PolicyColumn {
    /// Where `stored` lacks the column: an error when a policy reads it.
    fn missing(&self, stored: &Schema, holder: &str) -> Result<(), String> {
        let Some(read_by) = &self.read_by else {
            return Ok(());
        };
        Err(format!(
            "policy does not compile: {} reads column `{}`, which is neither declared nor in {holder} (columns there: {})",
            read_by,
            self.name,
            field_names(stored)
        ))
    }
}

/// `published` followed by `policy_columns` as `stored` holds them.
pub(crate) fn with_policy_columns(
    published: &Schema,
    stored: &Schema,
    policy_columns: &[PolicyColumn],
    holder: &str,
) -> Result<SchemaRef, String> {
    let mut fields: Vec<Field> = published
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    for column in policy_columns {
        match stored.field_with_name(&column.name) {
            Ok(field) => fields.push(Field::new(&column.name, field.data_type().clone(), true)),
            Err(_) => column.missing(stored, holder)?,
        }
    }
    Ok(Arc::new(Schema::new(fields)))
}

/// Whether stored data of type `actual` satisfies a declared type: equal, or
/// the same family of strings or binaries.
pub(crate) fn type_satisfies(actual: &DataType, declared: &DataType) -> bool {
    use DataType::*;
    actual == declared
        || matches!(
            (declared, actual),
            (Utf8, LargeUtf8 | Utf8View) | (Binary, LargeBinary | BinaryView)
        )
}

/// The innermost message of a DataFusion error, without the wrapping layers.
pub(crate) fn root_message(error: &DataFusionError) -> String {
    error.find_root().to_string()
}

/// A context that lists product directories at each scan, with the Parquet
/// product of `dir` as `name`, and its file `file` read by DataFusion alone
/// as `plain`.
#[cfg(test)]
pub(super) async fn parquet_product_context(
    dir: &std::path::Path,
    name: &str,
    file: &str,
) -> (datafusion::prelude::SessionContext, Arc<dyn TableProvider>) {
    let ctx = crate::query::testing::relisting_context();
    let url = Url::from_directory_path(dir).expect("url");
    let product = open_file_product(
        &ctx.state(),
        &FileProduct {
            url,
            format: FileFormat::Parquet,
            csv: CsvOptions::default(),
            declared: Vec::new(),
            policy_columns: Vec::new(),
        },
    )
    .await
    .expect("product");
    ctx.register_table(name, Arc::clone(&product))
        .expect("register");
    ctx.register_parquet(
        "plain",
        dir.join(file).to_str().expect("path"),
        Default::default(),
    )
    .await
    .expect("register plain");
    (ctx, product)
}

#[cfg(test)]
mod tests {
    use datafusion::prelude::SessionContext;

    use super::*;

    fn column(name: &str, data_type: DataType) -> ColumnContract {
        ColumnContract {
            name: name.into(),
            data_type,
            tags: Vec::new(),
            description: None,
        }
    }

    /// The product of the CSV file holding `text`, under `declared`.
    async fn csv_product(
        text: &str,
        csv: CsvOptions,
        declared: &[ColumnContract],
    ) -> Result<(SessionContext, tempfile::TempDir), String> {
        csv_product_reading(text, csv, declared, &[]).await
    }

    /// The same, with columns its policies read.
    async fn csv_product_reading(
        text: &str,
        csv: CsvOptions,
        declared: &[ColumnContract],
        policy_columns: &[&str],
    ) -> Result<(SessionContext, tempfile::TempDir), String> {
        let policy_columns: Vec<PolicyColumn> = policy_columns
            .iter()
            .map(|name| PolicyColumn {
                name: name.to_string(),
                read_by: Some("policies[0].row_filter".into()),
            })
            .collect();
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("rows.csv");
        std::fs::write(&path, text).expect("write");
        let url = Url::from_file_path(&path).expect("url");
        let ctx = SessionContext::new();
        let product = open_file_product(
            &ctx.state(),
            &FileProduct {
                url,
                format: FileFormat::Csv,
                csv,
                declared: declared.to_vec(),
                policy_columns,
            },
        )
        .await?;
        ctx.register_table("p", product).expect("register");
        Ok((ctx, dir))
    }

    /// The rows `sql` answers, each value as text.
    async fn rows(ctx: &SessionContext, sql: &str) -> Vec<Vec<String>> {
        let batches = ctx.sql(sql).await.expect(sql).collect().await.expect(sql);
        let mut rows = Vec::new();
        for batch in batches {
            for row in 0..batch.num_rows() {
                rows.push(
                    batch
                        .columns()
                        .iter()
                        .map(|column| {
                            arrow::util::display::array_value_to_string(column, row).expect("value")
                        })
                        .collect(),
                );
            }
        }
        rows
    }

    #[tokio::test]
    async fn declared_csv_columns_are_found_by_the_header_in_any_order() {
        let text = "id,name,city\n1,x,Paris\n2,y,Rome\n";
        let declared = [
            column("city", DataType::Utf8),
            column("id", DataType::Int64),
        ];
        let (ctx, _dir) = csv_product(text, CsvOptions::default(), &declared)
            .await
            .expect("published");
        assert_eq!(
            ctx.table("p").await.expect("table").schema().field_names(),
            ["p.city", "p.id"]
        );
        assert_eq!(
            rows(&ctx, "SELECT * FROM p ORDER BY id").await,
            [["Paris", "1"], ["Rome", "2"]]
        );
        assert_eq!(
            rows(&ctx, "SELECT id FROM p WHERE city = 'Rome'").await,
            [["2"]]
        );
        // Two text columns in another order than the file's: each keeps
        // its own values.
        let text = "a,b\nA1,B1\n";
        let declared = [column("b", DataType::Utf8), column("a", DataType::Utf8)];
        let (ctx, _dir) = csv_product(text, CsvOptions::default(), &declared)
            .await
            .expect("published");
        assert_eq!(rows(&ctx, "SELECT * FROM p").await, [["B1", "A1"]]);
    }

    #[tokio::test]
    async fn a_header_that_does_not_name_the_declared_columns_leaves_them_in_order() {
        // Names differ only in case: found by name, in the declared order.
        let text = "ID,Full Name\n1,Ann\n";
        let declared = [
            column("full name", DataType::Utf8),
            column("id", DataType::Int64),
        ];
        let (ctx, _dir) = csv_product(text, CsvOptions::default(), &declared)
            .await
            .expect("published");
        assert_eq!(rows(&ctx, "SELECT * FROM p").await, [["Ann", "1"]]);
        // Names the header does not hold, one for each field: in order.
        let declared = [
            column("id", DataType::Int64),
            column("full_name", DataType::Utf8),
        ];
        let (ctx, _dir) = csv_product(text, CsvOptions::default(), &declared)
            .await
            .expect("published");
        assert_eq!(
            rows(&ctx, "SELECT full_name, id FROM p").await,
            [["Ann", "1"]]
        );
    }

    #[tokio::test]
    async fn a_csv_file_may_hold_columns_no_one_declared() {
        // The undeclared `note` would not parse as a number: it is never
        // parsed as one.
        let text = "id,note,name\n1,n/a,x\n2,7,y\n";
        let (ctx, _dir) = csv_product(
            text,
            CsvOptions::default(),
            &[column("name", DataType::Utf8)],
        )
        .await
        .expect("published");
        assert_eq!(
            rows(&ctx, "SELECT * FROM p ORDER BY name").await,
            [["x"], ["y"]]
        );
        let Err(missing) = csv_product(
            text,
            CsvOptions::default(),
            &[column("city", DataType::Utf8)],
        )
        .await
        else {
            panic!("published");
        };
        assert!(
            missing.contains("declared column `city` is not in the files' header"),
            "{missing}"
        );
    }

    #[tokio::test]
    async fn declared_columns_name_the_fields_of_a_csv_file_without_header() {
        let headerless = CsvOptions {
            has_header: false,
            delimiter: b';',
            ..CsvOptions::default()
        };
        let text = "1;a b;2024-01-01\n2;\"c;d\";2024-02-01\n";
        let declared = [
            column("id", DataType::Int64),
            column("name", DataType::Utf8),
            column("day", DataType::Date32),
        ];
        let (ctx, _dir) = csv_product(text, headerless.clone(), &declared)
            .await
            .expect("published");
        assert_eq!(
            rows(&ctx, "SELECT name, day FROM p WHERE id > 1").await,
            [["c;d", "2024-02-01"]]
        );
        // Fewer columns than fields: the first ones, even when a declared
        // name is one the reader would have given another field.
        let (ctx, _dir) = csv_product(
            text,
            headerless.clone(),
            &[column("column_2", DataType::Int64)],
        )
        .await
        .expect("published");
        assert_eq!(
            rows(&ctx, "SELECT * FROM p ORDER BY 1").await,
            [["1"], ["2"]]
        );
        let too_many = [declared.as_slice(), &[column("extra", DataType::Utf8)]].concat();
        let Err(refused) = csv_product(text, headerless, &too_many).await else {
            panic!("published");
        };
        assert!(
            refused.contains("4 columns are declared but the files' lines have 3 fields"),
            "{refused}"
        );
    }

    #[tokio::test]
    async fn columns_only_policies_read_follow_the_declared_ones() {
        let text = "id,note,name\n1,n/a,x\n2,7,y\n";
        let declared = [column("name", DataType::Utf8)];
        let (ctx, _dir) = csv_product_reading(text, CsvOptions::default(), &declared, &["id"])
            .await
            .expect("published");
        assert_eq!(
            rows(&ctx, "SELECT * FROM p ORDER BY name").await,
            [["x", "1"], ["y", "2"]]
        );
        let Err(missing) =
            csv_product_reading(text, CsvOptions::default(), &declared, &["region"]).await
        else {
            panic!("published");
        };
        assert!(
            missing.contains(
                "policies[0].row_filter reads column `region`, which is neither declared nor in the files"
            ),
            "{missing}"
        );
    }

    #[tokio::test]
    async fn a_store_that_never_answers_is_waited_for_a_bounded_time() {
        // A server that takes connections and never answers.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        std::thread::spawn(move || {
            let held: Vec<_> = listener.incoming().take(64).collect();
            std::thread::sleep(std::time::Duration::from_secs(60));
            drop(held);
        });
        let ctx = SessionContext::new();
        let store = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name("lake")
            .with_region("eu-west-1")
            .with_endpoint(format!("http://127.0.0.1:{port}"))
            .with_allow_http(true)
            .with_access_key_id("k")
            .with_secret_access_key("s")
            .build()
            .expect("store");
        let bucket = Url::parse("s3://lake").expect("url");
        ctx.runtime_env()
            .register_object_store(&bucket, Arc::new(store));
        let product = |declared: Vec<ColumnContract>| FileProduct {
            url: Url::parse("s3://lake/events/").expect("url"),
            format: FileFormat::Parquet,
            csv: CsvOptions::default(),
            declared,
            policy_columns: Vec::new(),
        };
        let timeout = std::time::Duration::from_millis(500);
        let started = std::time::Instant::now();
        let error = open_file_product_within(&ctx.state(), &product(Vec::new()), timeout)
            .await
            .unwrap_err();
        assert_eq!(
            error,
            "cannot read the files' schema: IO error: the store gave no answer within 0.5 s"
        );
        // Declared columns publish it, to be opened by a later query.
        let declared = vec![column("id", DataType::Int64)];
        let table = open_file_product_within(&ctx.state(), &product(declared), timeout)
            .await
            .expect("published from its declared columns");
        assert_eq!(table.schema().field(0).name(), "id");
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }

    #[tokio::test]
    async fn parquet_large_strings_are_read_as_the_plain_strings_declared() {
        use arrow::array::{Int64Array, LargeStringArray, RecordBatch};

        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("rows.parquet");
        let batch = RecordBatch::try_from_iter([
            ("id", Arc::new(Int64Array::from(vec![1, 2])) as _),
            ("s", Arc::new(LargeStringArray::from(vec!["a", "b"])) as _),
        ])
        .expect("batch");
        let file = std::fs::File::create(&path).expect("file");
        let mut writer =
            parquet::arrow::ArrowWriter::try_new(file, batch.schema(), None).expect("writer");
        writer.write(&batch).expect("write");
        writer.close().expect("close");
        let ctx = crate::query::testing::gateway_session();
        let declared = [column("id", DataType::Int64), column("s", DataType::Utf8)];
        let url = Url::from_file_path(&path).expect("url");
        let product = open_file_product(
            &ctx.state(),
            &FileProduct {
                url,
                format: FileFormat::Parquet,
                csv: CsvOptions::default(),
                declared: declared.to_vec(),
                policy_columns: Vec::new(),
            },
        )
        .await
        .expect("published");
        assert_eq!(product.schema().field(1).data_type(), &DataType::Utf8);
        ctx.register_table("p", product).expect("register");
        assert_eq!(rows(&ctx, "SELECT id FROM p WHERE s = 'b'").await, [["2"]]);
        let types = ctx
            .sql("SELECT s FROM p")
            .await
            .expect("plan")
            .collect()
            .await
            .expect("run")
            .iter()
            .map(|b| b.schema().field(0).data_type().clone())
            .collect::<Vec<_>>();
        assert_eq!(types, [DataType::Utf8]);
    }
}
