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
use std::fs::File;
use std::io::ErrorKind;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::ParquetFileReaderFactory;
use datafusion::error::Result;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::physical_plan::metrics::{Count, ExecutionPlanMetricsSet, MetricBuilder};
use futures::FutureExt;
use futures::future::BoxFuture;
use object_store::local::LocalFileSystem;
use object_store::{
    GetOptions, GetRange, OBJECT_STORE_COALESCE_DEFAULT, ObjectMeta, ObjectStore, coalesce_ranges,
};
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::AsyncFileReader;
use parquet::errors::ParquetError;
use parquet::file::metadata::ParquetMetaData;

/// `range` of `file`, as the listing that produced `file` saw it: an error
/// if the file has changed since. The request names the version: by its
/// e-tag, or, where the store gives none, as not modified since the
/// listing's modification time (and by the store's version id, where it
/// keeps versions).
pub(super) async fn read_listed(
    store: &dyn ObjectStore,
    file: &ObjectMeta,
    range: Range<u64>,
) -> object_store::Result<Bytes> {
    let options = GetOptions {
        range: Some(GetRange::Bounded(range)),
        if_match: file.e_tag.clone(),
        if_unmodified_since: file.e_tag.is_none().then_some(file.last_modified),
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
    files: Files,
}

/// Where the data of the files is read from.
enum Files {
    /// The object store, each request naming the listed version.
    Store(Arc<dyn ObjectStore>),
    /// The local file system, directly (see `LocalFile`); the store's
    /// paths are its paths.
    Local(LocalFileSystem),
}

impl ListedVersionReaders {
    /// Readers of the files of `store`, found at `url`.
    pub(super) fn new(
        footers: Arc<dyn ParquetFileReaderFactory>,
        store: Arc<dyn ObjectStore>,
        url: &ObjectStoreUrl,
    ) -> Self {
        // Read directly where a file is read at an offset without a shared
        // cursor (Unix); elsewhere through the store.
        let files = if cfg!(unix) && url.as_str().starts_with("file://") {
            Files::Local(LocalFileSystem::new())
        } else {
            Files::Store(store)
        };
        Self { footers, files }
    }
}

impl fmt::Debug for ListedVersionReaders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListedVersionReaders")
            .field("footers", &self.footers)
            .field("local", &matches!(self.files, Files::Local(_)))
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
        let data = match &self.files {
            Files::Store(store) => Data::Store(Arc::clone(store)),
            Files::Local(files) => Data::Local(LocalFile {
                path: files.path_to_filesystem(&listed.location)?,
                open: None,
            }),
        };
        let footer =
            self.footers
                .create_reader(partition_index, file, metadata_size_hint, metrics)?;
        Ok(Box::new(ListedVersionReader {
            footer,
            data,
            listed,
            bytes_scanned,
        }))
    }
}

/// One file's reader: the footer through the cache, the data from the
/// listed version.
struct ListedVersionReader {
    footer: Box<dyn AsyncFileReader + Send>,
    data: Data,
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

    /// `ranges` of the file, checked to be of the version listed. From a
    /// store, nearby ranges are coalesced and some requests run in
    /// parallel (as the store reads several), each naming the listed
    /// version (`read_listed`): a version replaced before or while they
    /// ran fails them, with no request more.
    async fn read(&mut self, ranges: &[Range<u64>]) -> parquet::errors::Result<Vec<Bytes>> {
        let parts = match &mut self.data {
            Data::Local(file) => match file.read(&self.listed, ranges).await {
                Ok(Some(parts)) => parts,
                Ok(None) => return Err(self.changed()),
                Err(error) => {
                    return Err(ParquetError::General(format!(
                        "cannot read {}: {error}",
                        self.listed.location
                    )));
                }
            },
            Data::Store(store) => {
                let listed = &self.listed;
                let read = |range| read_listed(store.as_ref(), listed, range);
                coalesce_ranges(ranges, read, OBJECT_STORE_COALESCE_DEFAULT)
                    .await
                    .map_err(|e| self.error(e))?
            }
        };
        self.bytes_scanned
            .add(parts.iter().map(Bytes::len).sum::<usize>());
        Ok(parts)
    }
}

/// Where one file's data is read from (see [`Files`]).
enum Data {
    Store(Arc<dyn ObjectStore>),
    Local(LocalFile),
}

/// A file on the local file system, opened at its first read and kept
/// open: every later read is of the file the first one opened, even if
/// another is renamed over its path. Each batch of reads ends with a look
/// at the open file's modification time and size, in the same trip to the
/// blocking pool as the reads; they must still be the listing's, so a file
/// replaced before it was opened, or written while it was open, is seen.
/// Reading through the store would open and look up the file for every
/// range, in two trips (6% of governed TPC-H time when it was measured).
struct LocalFile {
    path: PathBuf,
    open: Option<Arc<File>>,
}

impl LocalFile {
    /// `ranges` of the file, or `None` if it is no longer the version
    /// `listed`.
    async fn read(
        &mut self,
        listed: &ObjectMeta,
        ranges: &[Range<u64>],
    ) -> std::io::Result<Option<Vec<Bytes>>> {
        let path = self.path.clone();
        let open = self.open.clone();
        let size = listed.size;
        let modified = SystemTime::from(listed.last_modified);
        let ranges = ranges.to_vec();
        let read = tokio::task::spawn_blocking(move || {
            let file = match open {
                Some(file) => file,
                None => match File::open(&path) {
                    Ok(file) => Arc::new(file),
                    Err(error) if error.kind() == ErrorKind::NotFound => return Ok(None),
                    Err(error) => return Err(error),
                },
            };
            let parts: std::io::Result<Vec<Bytes>> = ranges
                .into_iter()
                .map(|range| {
                    let mut part = vec![0; (range.end - range.start) as usize];
                    read_at(&file, &mut part, range.start)?;
                    Ok(Bytes::from(part))
                })
                .collect();
            let now = file.metadata()?;
            if now.len() != size || now.modified()? != modified {
                return Ok(None);
            }
            Ok(Some((file, parts?)))
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(read.map(|(file, parts)| {
            self.open = Some(file);
            parts
        }))
    }
}

/// Fills `part` with the bytes of `file` from `offset`.
#[cfg(unix)]
fn read_at(file: &File, part: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, part, offset)
}

/// Not called: off Unix, local files are read through the store (see
/// `ListedVersionReaders::new`).
#[cfg(not(unix))]
fn read_at(_: &File, _: &mut [u8], _: u64) -> std::io::Result<()> {
    Err(ErrorKind::Unsupported.into())
}

/// The one part a read of one range returned.
pub(super) fn one_part(mut parts: Vec<Bytes>) -> parquet::errors::Result<Bytes> {
    parts
        .pop()
        .ok_or_else(|| ParquetError::General("a read returned nothing".into()))
}

impl AsyncFileReader for ListedVersionReader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        async move { one_part(self.read(std::slice::from_ref(&range)).await?) }.boxed()
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
