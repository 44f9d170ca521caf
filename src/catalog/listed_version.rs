//! Reads pinned to the version of a file that its listing saw.
//!
//! A scan lists a product's files when it is planned and reads them when it
//! runs. A file rewritten in place between the two would otherwise be read
//! as it is now, with the footer cached for the version listed. Where a scan
//! relies on what the listed version holds (a condition shown true for every
//! row of it is left out, see `stored_values`), what it reads is checked to
//! come from that version, and a file changed since fails the query rather
//! than being read unchecked.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::ParquetFileReaderFactory;
use datafusion::error::Result;
use datafusion::physical_plan::metrics::{Count, ExecutionPlanMetricsSet, MetricBuilder};
use futures::FutureExt;
use futures::future::BoxFuture;
use object_store::{GetOptions, GetRange, ObjectMeta, ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::AsyncFileReader;
use parquet::errors::ParquetError;
use parquet::file::metadata::ParquetMetaData;

/// `range` of `file`, as the listing that produced `file` saw it: an error
/// if the file has changed since.
pub(super) async fn read_listed(
    store: &dyn ObjectStore,
    file: &ObjectMeta,
    range: Range<u64>,
) -> object_store::Result<Bytes> {
    let options = GetOptions {
        range: Some(GetRange::Bounded(range)),
        if_match: file.e_tag.clone(),
        version: file.version.clone(),
        ..GetOptions::default()
    };
    store.get_opts(&file.location, options).await?.bytes().await
}

/// Readers of Parquet files whose every data read is checked to come from
/// the listed version. Footers come from `footers` (with its metadata
/// cache); a footer of another version cannot be combined with data of the
/// listed one, since the data reads would fail.
pub(super) struct ListedVersionReaders {
    footers: Arc<dyn ParquetFileReaderFactory>,
    store: Arc<dyn ObjectStore>,
}

impl ListedVersionReaders {
    pub(super) fn new(
        footers: Arc<dyn ParquetFileReaderFactory>,
        store: Arc<dyn ObjectStore>,
    ) -> Self {
        Self { footers, store }
    }
}

impl fmt::Debug for ListedVersionReaders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListedVersionReaders")
            .field("footers", &self.footers)
            .field("store", &self.store.to_string())
            .finish()
    }
}

impl ParquetFileReaderFactory for ListedVersionReaders {
    fn create_reader(
        &self,
        partition_index: usize,
        file: PartitionedFile,
        metadata_size_hint: Option<usize>,
        metrics: &ExecutionPlanMetricsSet,
    ) -> Result<Box<dyn AsyncFileReader + Send>> {
        let listed = file.object_meta.clone();
        let bytes_scanned = MetricBuilder::new(metrics)
            .with_new_label("filename", listed.location.to_string())
            .counter("bytes_scanned", partition_index);
        let footer =
            self.footers
                .create_reader(partition_index, file, metadata_size_hint, metrics)?;
        Ok(Box::new(ListedVersionReader {
            footer,
            store: Arc::clone(&self.store),
            listed,
            bytes_scanned,
        }))
    }
}

/// One file's reader: the footer through the cache, the data from the
/// listed version.
struct ListedVersionReader {
    footer: Box<dyn AsyncFileReader + Send>,
    store: Arc<dyn ObjectStore>,
    listed: ObjectMeta,
    bytes_scanned: Count,
}

impl fmt::Debug for ListedVersionReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListedVersionReader")
            .field("listed", &self.listed)
            .finish_non_exhaustive()
    }
}

impl ListedVersionReader {
    /// What a failed read means for the query: a file that is no longer
    /// the version listed is said so.
    fn error(&self, error: object_store::Error) -> ParquetError {
        match error {
            object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. } => {
                self.changed()
            }
            other => ParquetError::External(Box::new(other)),
        }
    }

    /// The file is no longer the version listed.
    fn changed(&self) -> ParquetError {
        ParquetError::General(format!(
            "{} changed while the query read it (it is no longer the version \
             listed when the query was planned); run the query again",
            self.listed.location
        ))
    }

    /// `ranges` of the file, read as the store reads several (one request
    /// each, or coalesced), then checked to be of the version listed: the
    /// file is looked up once more after the reads, so a version replaced
    /// before or while they ran is seen (versions are told apart by e-tag,
    /// or by modification time and size; a file only ever moves on to new
    /// versions). A read that names the version itself (one precondition
    /// per request) costs two requests a range on a local file system, and
    /// was 6% of TPC-H time there.
    async fn read(&mut self, ranges: &[Range<u64>]) -> parquet::errors::Result<Vec<Bytes>> {
        let parts = self
            .store
            .get_ranges(&self.listed.location, ranges)
            .await
            .map_err(|e| self.error(e))?;
        let now = self
            .store
            .head(&self.listed.location)
            .await
            .map_err(|e| self.error(e))?;
        if !same_version(&self.listed, &now) {
            return Err(self.changed());
        }
        self.bytes_scanned
            .add(parts.iter().map(Bytes::len).sum::<usize>());
        Ok(parts)
    }
}

/// Whether `now` describes the same version of a file as `listed`.
fn same_version(listed: &ObjectMeta, now: &ObjectMeta) -> bool {
    let tagged = match (&listed.e_tag, &now.e_tag) {
        (Some(listed), Some(now)) => listed == now,
        _ => listed.last_modified == now.last_modified && listed.size == now.size,
    };
    let versioned = match (&listed.version, &now.version) {
        (Some(listed), Some(now)) => listed == now,
        _ => true,
    };
    tagged && versioned
}

impl AsyncFileReader for ListedVersionReader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        async move {
            let mut parts = self.read(std::slice::from_ref(&range)).await?;
            parts
                .pop()
                .ok_or_else(|| ParquetError::General("a read returned nothing".into()))
        }
        .boxed()
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<Range<u64>>,
    ) -> BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        async move { self.read(&ranges).await }.boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        self.footer.get_metadata(options)
    }
}
