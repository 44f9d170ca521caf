//! Showing a condition over one column true for every row of a Parquet
//! file from what the file says of that column without reading it: its
//! dictionary pages and its statistics. A scan then need not read the column
//! at all, nor check the condition.
//!
//! - A string column stored dictionary-encoded in every data page of a row
//!   group holds only values of that row group's dictionary page. When a
//!   file's row groups all store it so, with no NULL (their statistics
//!   count them), a deterministic condition over that column alone is true
//!   for every row when it is true for each value of the dictionary pages.
//!   Only those pages are read (a few bytes per row group for the
//!   low-cardinality columns row filters are written over).
//! - A column of integers, decimals, dates or timestamps lies, in each row
//!   group, between the least and greatest values its statistics give. A
//!   condition true over one interval of values (comparisons of the column
//!   with constants, joined by `AND`) is true for every row of a row group
//!   with no NULL when it is true for those two values.
//!
//! What a file shows is kept per file version; each query only evaluates
//! its conditions over it.

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, StringArray};
use arrow::compute::{cast, concat};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use bytes::{Buf, Bytes};
use datafusion::catalog::Session;
use datafusion::common::DFSchema;
use datafusion::error::Result;
use datafusion::logical_expr::{Expr, Operator};
use datafusion::physical_expr::PhysicalExpr;
use object_store::{ObjectMeta, ObjectStore};
use parquet::arrow::arrow_reader::statistics::StatisticsConverter;
use parquet::arrow::parquet_to_arrow_schema;
use parquet::basic::{Encoding, Type as PhysicalType};
use parquet::column::page::{Page, PageReader};
use parquet::errors::ParquetError;
use parquet::file::metadata::{ColumnChunkMetaData, ParquetMetaData};
use parquet::file::page_index::offset_index::PageLocation;
use parquet::file::reader::{ChunkReader, Length};
use parquet::file::serialized_reader::SerializedPageReader;
use parquet::schema::types::SchemaDescriptor;

use super::listed_version::read_listed;
use super::parquet::footer;

/// The most distinct values kept for one column of one file; a column with
/// more is not worth comparing value by value at each query.
const MOST_VALUES: usize = 65_536;

/// The most bytes of distinct values kept for one column of one file.
const MOST_VALUE_BYTES: usize = 4 << 20;

/// The bytes of values kept for all files of a product.
const CACHE_BYTES: u64 = 64 << 20;

/// One version of a file (as its listing describes it), and a column of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FileColumn {
    location: object_store::path::Path,
    size: u64,
    last_modified: Option<i64>,
    e_tag: Option<String>,
    version: Option<String>,
    column: String,
}

impl FileColumn {
    fn new(file: &ObjectMeta, column: &str) -> Self {
        Self {
            location: file.location.clone(),
            size: file.size,
            last_modified: file.last_modified.timestamp_nanos_opt(),
            e_tag: file.e_tag.clone(),
            version: file.version.clone(),
            column: column.to_string(),
        }
    }
}

/// What a file shows of the values of one of its columns, none of them NULL.
#[derive(Debug, Clone)]
enum Shown {
    /// Every distinct value (and perhaps some values no row holds), as
    /// `Utf8`.
    Values(ArrayRef),
    /// Each row group's least and greatest values (or bounds of them), of
    /// the column's type in the file.
    Bounds(ArrayRef),
}

impl Shown {
    fn array(&self) -> &ArrayRef {
        match self {
            Shown::Values(array) | Shown::Bounds(array) => array,
        }
    }
}

/// What files show of their columns' values, per file version (see
/// [`stored_values`]).
#[derive(Debug, Clone)]
pub(crate) struct StoredValues {
    cache: moka::sync::Cache<FileColumn, Option<Shown>>,
}

impl StoredValues {
    pub(crate) fn new() -> Self {
        Self {
            cache: moka::sync::Cache::builder()
                .max_capacity(CACHE_BYTES)
                .weigher(|_, shown: &Option<Shown>| {
                    let bytes = shown
                        .as_ref()
                        .map_or(0, |shown| shown.array().get_array_memory_size());
                    u32::try_from(bytes).unwrap_or(u32::MAX).max(1)
                })
                .build(),
        }
    }

    /// Whether `condition` is true for every row of `file`. What cannot be
    /// shown (a column stored otherwise, a NULL, a condition that fails on
    /// a value) is not.
    pub(crate) async fn holds_in(
        &self,
        state: &dyn Session,
        store: &dyn ObjectStore,
        file: &ObjectMeta,
        condition: &Condition,
    ) -> bool {
        let key = FileColumn::new(file, &condition.column);
        let shown = match self.cache.get(&key) {
            Some(shown) => shown,
            // A file that cannot be read now shows nothing (and is tried
            // again next time); the scan reports why when it reads it.
            None => match stored_values(state, store, file, &condition.column).await {
                Ok(shown) => {
                    self.cache.insert(key, shown.clone());
                    shown
                }
                Err(_) => None,
            },
        };
        let values = match &shown {
            Some(Shown::Values(values)) => values,
            Some(Shown::Bounds(bounds)) if condition.is_one_interval => bounds,
            _ => return false,
        };
        condition.is_true_for_each(values).unwrap_or(false)
    }
}

/// A condition over one column, compiled to be evaluated over that column's
/// values alone.
#[derive(Debug)]
pub(crate) struct Condition {
    column: String,
    /// The one column, of the product's type.
    schema: SchemaRef,
    predicate: Arc<dyn PhysicalExpr>,
    /// Whether the values it keeps form one interval (see
    /// [`is_one_interval`]), so that row-group bounds can show it.
    is_one_interval: bool,
}

impl Condition {
    /// `condition` over `column`, a column of `product`.
    pub(crate) fn new(
        state: &dyn Session,
        product: &Schema,
        condition: &Expr,
        column: &str,
    ) -> Result<Self> {
        let data_type = product.field_with_name(column)?.data_type();
        let schema = Arc::new(Schema::new(vec![Field::new(
            column,
            data_type.clone(),
            true,
        )]));
        let predicate = state
            .create_physical_expr(condition.clone(), &DFSchema::try_from(Arc::clone(&schema))?)?;
        Ok(Self {
            column: column.to_string(),
            is_one_interval: is_one_interval(condition, column, data_type),
            schema,
            predicate,
        })
    }

    /// Whether it is true (not false, not NULL) for each of `values`.
    /// String values are cast to the column's string type; bounds must be
    /// of its type.
    fn is_true_for_each(&self, values: &ArrayRef) -> Result<bool> {
        let data_type = self.schema.field(0).data_type();
        let values = match values.data_type() {
            DataType::Utf8 if is_string(data_type) => cast(values, data_type)?,
            stored if stored == data_type => Arc::clone(values),
            _ => return Ok(false),
        };
        let batch = RecordBatch::try_new(Arc::clone(&self.schema), vec![values])?;
        let result = self
            .predicate
            .evaluate(&batch)?
            .into_array(batch.num_rows())?;
        let Some(result) = result.as_any().downcast_ref::<BooleanArray>() else {
            return Ok(false);
        };
        Ok(result.true_count() == result.len())
    }
}

/// Whether the values where `condition` is true form one interval: it
/// compares `column` with constants of its own type `data_type` (so that
/// nothing is cast, and the comparison orders values as statistics do) by
/// `=`, `<`, `<=`, `>`, `>=` or `BETWEEN`, and joins such comparisons with
/// `AND`.
fn is_one_interval(condition: &Expr, column: &str, data_type: &DataType) -> bool {
    let is_column = |e: &Expr| matches!(e, Expr::Column(c) if c.name == column);
    let is_constant = |e: &Expr| matches!(e, Expr::Literal(value, _) if !value.is_null() && value.data_type() == *data_type);
    match condition {
        Expr::BinaryExpr(binary) if binary.op == Operator::And => {
            is_one_interval(&binary.left, column, data_type)
                && is_one_interval(&binary.right, column, data_type)
        }
        Expr::BinaryExpr(binary) => {
            matches!(
                binary.op,
                Operator::Eq | Operator::Lt | Operator::LtEq | Operator::Gt | Operator::GtEq
            ) && ((is_column(&binary.left) && is_constant(&binary.right))
                || (is_constant(&binary.left) && is_column(&binary.right)))
        }
        Expr::Between(between) => {
            !between.negated
                && is_column(&between.expr)
                && is_constant(&between.low)
                && is_constant(&between.high)
        }
        _ => false,
    }
}

/// What `file` shows of column `column` (a top-level column), read from its
/// footer and, for strings, its dictionary pages: `None` when it shows
/// nothing worth keeping (see [`Shown`]).
async fn stored_values(
    state: &dyn Session,
    store: &dyn ObjectStore,
    file: &ObjectMeta,
    column: &str,
) -> Result<Option<Shown>> {
    let metadata = footer(state, store, file).await?;
    let columns = metadata.file_metadata().schema_descr();
    let Some(leaf) = top_level_leaf(columns, column) else {
        return Ok(None);
    };
    // The type the file's reader gives the column, so that a value is the
    // same whether read here or by a scan.
    let footer_schema = metadata.file_metadata();
    let stored = parquet_to_arrow_schema(
        footer_schema.schema_descr(),
        footer_schema.key_value_metadata(),
    )?;
    let Ok(field) = stored.field_with_name(column) else {
        return Ok(None);
    };
    if is_string(field.data_type())
        && columns.column(leaf).physical_type() == PhysicalType::BYTE_ARRAY
    {
        return dictionary_values(store, file, &metadata, leaf).await;
    }
    if is_ordered(field.data_type()) {
        return row_group_bounds(&metadata, &stored, column);
    }
    Ok(None)
}

/// The leaf of a file's schema that is top-level column `name`.
pub(super) fn top_level_leaf(columns: &SchemaDescriptor, name: &str) -> Option<usize> {
    (0..columns.num_columns()).find(|&leaf| columns.column(leaf).path().parts() == [name])
}

/// Whether every data page of a column chunk is dictionary-encoded (so its
/// dictionary page holds every value).
pub(super) fn is_dictionary_encoded(chunk: &ColumnChunkMetaData) -> bool {
    chunk.dictionary_page_offset().is_some()
        && chunk.page_encoding_stats_mask().is_some_and(|mask| {
            mask.is_only(Encoding::RLE_DICTIONARY) || mask.is_only(Encoding::PLAIN_DICTIONARY)
        })
}

pub(super) fn is_string(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    )
}

/// Types whose statistics order values as comparisons do (floating point
/// is not one: statistics leave NaN out).
fn is_ordered(data_type: &DataType) -> bool {
    data_type.is_integer()
        || matches!(
            data_type,
            DataType::Decimal32(..)
                | DataType::Decimal64(..)
                | DataType::Decimal128(..)
                | DataType::Decimal256(..)
                | DataType::Date32
                | DataType::Date64
                | DataType::Timestamp(..)
        )
}

/// Each row group's least and greatest values of `column`, from the
/// statistics, when every row group counts no NULL in it. A row group
/// without statistics gives NULL bounds, which show nothing.
fn row_group_bounds(
    metadata: &ParquetMetaData,
    stored: &Schema,
    column: &str,
) -> Result<Option<Shown>> {
    let converter =
        StatisticsConverter::try_new(column, stored, metadata.file_metadata().schema_descr())?;
    let nulls = converter.row_group_null_counts(metadata.row_groups())?;
    if nulls.null_count() > 0 || nulls.values().iter().any(|&count| count > 0) {
        return Ok(None);
    }
    let least = converter.row_group_mins(metadata.row_groups())?;
    let greatest = converter.row_group_maxes(metadata.row_groups())?;
    Ok(Some(Shown::Bounds(concat(&[&least, &greatest])?)))
}

/// The distinct values of the string column at `leaf`, as `Utf8`, when the
/// footer shows that every row group stores it dictionary-encoded in every
/// data page and holds no NULL in it: read from the dictionary pages alone.
/// `None` when that is not so, or when there are too many values to be
/// worth keeping.
async fn dictionary_values(
    store: &dyn ObjectStore,
    file: &ObjectMeta,
    metadata: &ParquetMetaData,
    leaf: usize,
) -> Result<Option<Shown>> {
    let mut values: BTreeSet<Bytes> = BTreeSet::new();
    let mut bytes = 0;
    for row_group in metadata.row_groups() {
        let chunk = row_group.column(leaf);
        let dictionary_only = is_dictionary_encoded(chunk);
        let no_null = chunk
            .statistics()
            .and_then(|statistics| statistics.null_count_opt())
            == Some(0);
        if !dictionary_only || !no_null {
            return Ok(None);
        }
        if row_group.num_rows() == 0 {
            continue;
        }
        for value in dictionary(store, file, chunk).await? {
            let len = value.len();
            if values.insert(value) {
                bytes += len;
            }
            if values.len() > MOST_VALUES || bytes > MOST_VALUE_BYTES {
                return Ok(None);
            }
        }
    }
    let mut strings = Vec::with_capacity(values.len());
    for value in &values {
        match std::str::from_utf8(value) {
            Ok(text) => strings.push(text),
            Err(_) => return Ok(None),
        }
    }
    Ok(Some(Shown::Values(Arc::new(StringArray::from(strings)))))
}

/// The largest dictionary page read only to count its values.
const MOST_COUNTED_DICTIONARY_BYTES: u64 = 256 << 10;

/// How many values the dictionary page of a column chunk stored
/// dictionary-encoded in every data page holds (its distinct values), when
/// the page is small enough to be worth reading for that; `None` otherwise.
pub(super) async fn dictionary_len(
    store: &dyn ObjectStore,
    file: &ObjectMeta,
    chunk: &ColumnChunkMetaData,
) -> Result<Option<usize>> {
    let small = dictionary_page_bytes(chunk)
        .is_ok_and(|bytes| bytes.end - bytes.start <= MOST_COUNTED_DICTIONARY_BYTES);
    if !is_dictionary_encoded(chunk) || !small {
        return Ok(None);
    }
    Ok(Some(dictionary(store, file, chunk).await?.len()))
}

/// Where a column chunk's dictionary page lies in its file: before the
/// first data page.
fn dictionary_page_bytes(chunk: &ColumnChunkMetaData) -> parquet::errors::Result<Range<u64>> {
    let (start, _) = chunk.byte_range();
    let end = u64::try_from(chunk.data_page_offset())
        .map_err(|_| ParquetError::General("a negative data page offset".into()))?;
    if end <= start {
        return Err(ParquetError::General(
            "no room for a dictionary page".into(),
        ));
    }
    Ok(start..end)
}

/// The values of a column chunk's dictionary page, read from the file
/// version the listing saw (a file changed since is an error).
async fn dictionary(
    store: &dyn ObjectStore,
    file: &ObjectMeta,
    chunk: &ColumnChunkMetaData,
) -> Result<Vec<Bytes>> {
    let range = dictionary_page_bytes(chunk)?;
    let start = range.start;
    let bytes = read_listed(store, file, range).await?;
    let reader = Arc::new(FileSlice { start, bytes });
    // The page locations name the first data page; what lies before it is
    // the dictionary page, which the reader returns (decompressed) first.
    let first_data_page = PageLocation {
        offset: chunk.data_page_offset(),
        compressed_page_size: 0,
        first_row_index: 0,
    };
    let mut pages = SerializedPageReader::new(
        reader,
        chunk,
        usize::try_from(chunk.num_values()).unwrap_or(0),
        Some(vec![first_data_page]),
    )?;
    match pages.get_next_page()? {
        Some(Page::DictionaryPage {
            buf,
            num_values,
            encoding: Encoding::PLAIN | Encoding::PLAIN_DICTIONARY,
            ..
        }) => Ok(plain_byte_arrays(buf, num_values)?),
        _ => Err(ParquetError::General("no dictionary page of byte arrays".into()).into()),
    }
}

/// `count` PLAIN-encoded byte arrays: each a little-endian `u32` length,
/// then that many bytes.
fn plain_byte_arrays(mut buf: Bytes, count: u32) -> parquet::errors::Result<Vec<Bytes>> {
    let mut values = Vec::with_capacity(count as usize);
    for _ in 0..count {
        if buf.remaining() < 4 {
            return Err(ParquetError::EOF("a truncated dictionary page".into()));
        }
        let len = buf.get_u32_le() as usize;
        if buf.remaining() < len {
            return Err(ParquetError::EOF("a truncated dictionary page".into()));
        }
        values.push(buf.split_to(len));
    }
    Ok(values)
}

/// Bytes read from a file at offset `start`, addressed by file offsets.
struct FileSlice {
    start: u64,
    bytes: Bytes,
}

impl FileSlice {
    fn slice(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        let offset = start
            .checked_sub(self.start)
            .and_then(|offset| usize::try_from(offset).ok())
            .filter(|&offset| offset <= self.bytes.len() && length <= self.bytes.len() - offset)
            .ok_or_else(|| ParquetError::EOF("a read outside the dictionary page".into()))?;
        Ok(self.bytes.slice(offset..offset + length))
    }
}

impl Length for FileSlice {
    fn len(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }
}

impl ChunkReader for FileSlice {
    type T = bytes::buf::Reader<Bytes>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        let rest = usize::try_from(self.len().saturating_sub(start)).unwrap_or(0);
        Ok(self.slice(start, rest)?.reader())
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        self.slice(start, length)
    }
}
