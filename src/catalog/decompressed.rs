//! Parquet column chunks kept decompressed.
//!
//! Most Parquet files are written with Snappy or Zstandard, and every page a
//! scan reads is decompressed again at every query: for the TPC-H queries,
//! decompressing (and zeroing the buffers it fills) takes a fifth of a
//! scan's CPU, and the same files stored uncompressed are read 1.2× faster.
//! Yet many columns hardly shrink: dictionary and run-length encoding have
//! already taken what Snappy would.
//!
//! The chunks scans read are therefore decompressed once, in the background
//! (on the threads of the lowest priority that decode row groups for
//! lookups), and kept: page by page, each page's header rewritten to say it
//! is as long as its values and without the checksum of its compressed
//! bytes. A scan whose file has chunks kept reads that file through a
//! [`DecompressedReader`]: to the Parquet reader the file's footer says that
//! those chunks are stored uncompressed, past the end of the file (their
//! pages where they are in the kept chunk, in the page index too), and
//! reads there are answered with slices of the kept chunks; everything else
//! is read from the file as before. A chunk kept is read no differently
//! from one stored uncompressed, so the values read are the file's. Where
//! DataFusion splits a large file into byte ranges read at once, each row
//! group is read by the range that holds its first column's first page, so
//! there the first column of the row groups a range reads is read as
//! stored.
//!
//! A chunk is kept under the version of its file the listing saw (location,
//! size, modification time, e-tag, version), so a file rewritten is read
//! afresh. The cache holds at most `limits.page_cache` bytes (256 MiB unless
//! configured; 0 turns it off); the chunks read least go first. A chunk is
//! kept only if it is read more often than those it would push out, and one
//! turned away is not decompressed again for a minute: a file larger than
//! the cache, scanned again and again, keeps the part the cache holds
//! rather than decompressing the rest at every scan only to drop it. Only
//! Snappy and Zstandard chunks are kept; a chunk whose pages cannot be read
//! (a page type or header this reader does not know, a size that does not
//! add up) is left as stored, and read as it is.

use std::collections::HashSet;
use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::{
    FileScanConfig, FileScanConfigBuilder, ParquetFileReaderFactory, ParquetSource,
};
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::Result;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::metrics::{Count, ExecutionPlanMetricsSet, MetricBuilder};
use futures::FutureExt;
use futures::future::BoxFuture;
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::AsyncFileReader;
use parquet::basic::Compression;
use parquet::errors::ParquetError;
use parquet::file::metadata::{PageIndexPolicy, ParquetMetaData};
use parquet::file::page_index::offset_index::{OffsetIndexMetaData, PageLocation};

use super::hot_row_groups::{RowGroupKey, warmer, warmers};
use super::listed_version::one_part;

/// A column chunk of a file, as the listing saw the file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ChunkKey {
    row_group: RowGroupKey,
    column: usize,
}

/// A column chunk decompressed: its pages laid end to end, each with its
/// header rewritten.
#[derive(Debug)]
struct Decompressed {
    data: Bytes,
    pages: Vec<PageSpan>,
    /// Where the first data page starts in `data`.
    first_data_page: u64,
    /// Whether the first page is the chunk's dictionary.
    dictionary: bool,
}

/// Where a page is in the stored chunk, and where it is (header included)
/// in the decompressed one; offsets from each chunk's start.
#[derive(Debug, Clone, Copy)]
struct PageSpan {
    stored: u64,
    start: u64,
    length: u64,
}

impl Decompressed {
    /// The page that starts `stored` bytes into the stored chunk.
    fn page_at(&self, stored: u64) -> Option<&PageSpan> {
        self.pages
            .binary_search_by_key(&stored, |page| page.stored)
            .ok()
            .map(|index| &self.pages[index])
    }
}

/// The decompressed chunks, shared by every product of the gateway.
static CHUNKS: OnceLock<moka::sync::Cache<ChunkKey, Arc<Decompressed>>> = OnceLock::new();

fn chunk_cache(bytes: u64) -> moka::sync::Cache<ChunkKey, Arc<Decompressed>> {
    moka::sync::Cache::builder()
        .max_capacity(bytes)
        .weigher(|_, chunk: &Arc<Decompressed>| {
            let size = chunk.data.len() + chunk.pages.len() * std::mem::size_of::<PageSpan>();
            u32::try_from(size).unwrap_or(u32::MAX)
        })
        .build()
}

/// Sets how many bytes of decompressed column chunks the gateway keeps.
/// Only the first setting counts (the gateway's, at start); 0 keeps none.
pub fn set_page_cache(bytes: u64) {
    let _ = CHUNKS.set(chunk_cache(bytes));
}

fn chunks() -> &'static moka::sync::Cache<ChunkKey, Arc<Decompressed>> {
    CHUNKS.get_or_init(|| chunk_cache(crate::config::Limits::default().page_cache))
}

/// The bytes of decompressed column chunks the gateway keeps now.
pub fn page_cache_bytes() -> u64 {
    CHUNKS.get().map_or(0, |cache| {
        cache.run_pending_tasks();
        cache.weighted_size()
    })
}

/// The chunks being decompressed into the cache now.
static WARMING: Mutex<Option<HashSet<ChunkKey>>> = Mutex::new(None);

/// How long a chunk the cache turned away is not decompressed again.
const TURNED_AWAY_FOR: Duration = Duration::from_secs(60);

/// Chunks the cache turned away lately (it keeps a chunk only if the chunk
/// is read more often than those it would push out): decompressing one
/// again only to see it turned away again is work for nothing. A scan of a
/// file larger than the cache would otherwise decompress, at every scan,
/// each chunk the cache does not hold, and drop it.
fn turned_away() -> &'static moka::sync::Cache<ChunkKey, ()> {
    static TURNED_AWAY: OnceLock<moka::sync::Cache<ChunkKey, ()>> = OnceLock::new();
    TURNED_AWAY.get_or_init(|| {
        // At most 65 536 keys (some 20 MiB): past that, the chunks turned
        // away longest ago may be tried again sooner.
        moka::sync::Cache::builder()
            .max_capacity(1 << 16)
            .time_to_live(TURNED_AWAY_FOR)
            .build()
    })
}

/// Chunks decompressed into the cache in the background so far, kept or
/// turned away.
static DECOMPRESSED: AtomicU64 = AtomicU64::new(0);

/// How many column chunks have been decompressed for the cache so far.
pub fn page_cache_decompressions() -> u64 {
    DECOMPRESSED.load(Ordering::Relaxed)
}

/// `plan`, a Parquet scan, reading its files' chunks from the cache where
/// they are kept (and keeping those it reads); any other plan as it is.
pub(super) fn with_decompressed_chunks(plan: Arc<dyn ExecutionPlan>) -> Arc<dyn ExecutionPlan> {
    if chunks().policy().max_capacity() == Some(0) {
        return plan;
    }
    let Some(config) = plan
        .downcast_ref::<DataSourceExec>()
        .and_then(|exec| exec.data_source().downcast_ref::<FileScanConfig>())
    else {
        return plan;
    };
    let Some(source) = config.file_source().downcast_ref::<ParquetSource>() else {
        return plan;
    };
    let Some(inner) = source.parquet_file_reader_factory().cloned() else {
        return plan;
    };
    let source = source
        .clone()
        .with_parquet_file_reader_factory(Arc::new(DecompressedReaders { inner }));
    let config = FileScanConfigBuilder::from(config.clone())
        .with_source(Arc::new(source))
        .build();
    DataSourceExec::from_data_source(config)
}

/// Readers that answer reads of kept chunks from the cache (see the
/// module's documentation); `inner` reads the files.
struct DecompressedReaders {
    inner: Arc<dyn ParquetFileReaderFactory>,
}

impl fmt::Debug for DecompressedReaders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecompressedReaders")
            .field("inner", &self.inner)
            .finish()
    }
}

impl ParquetFileReaderFactory for DecompressedReaders {
    fn create_reader(
        &self,
        partition_index: usize,
        file: PartitionedFile,
        metadata_size_hint: Option<usize>,
        metrics: &ExecutionPlanMetricsSet,
    ) -> Result<Box<dyn AsyncFileReader + Send>> {
        let kept_bytes_read = MetricBuilder::new(metrics)
            .with_new_label("filename", file.object_meta.location.to_string())
            .counter("decompressed_bytes_kept_read", partition_index);
        let inner =
            self.inner
                .create_reader(partition_index, file.clone(), metadata_size_hint, metrics)?;
        Ok(Box::new(DecompressedReader {
            inner,
            files: Arc::clone(&self.inner),
            file,
            slots: None,
            kept_bytes_read,
        }))
    }
}

/// One file's reader: kept chunks from the cache, the rest from the file.
struct DecompressedReader {
    inner: Box<dyn AsyncFileReader + Send>,
    /// Readers of the files, for chunks decompressed in the background.
    files: Arc<dyn ParquetFileReaderFactory>,
    file: PartitionedFile,
    /// Where the file's chunks can be shown, once its footer was read.
    slots: Option<Arc<Slots>>,
    kept_bytes_read: Count,
}

/// Where each chunk the cache could keep is shown when it is kept: past
/// the end of the stored file, in a slot of its own that only its file's
/// footer decides (so that every reader of the file, whichever footer it
/// was given, finds a kept chunk at the same place).
#[derive(Debug)]
struct Slots {
    /// Where the stored file ends: reads below come from the file.
    stored_end: u64,
    /// The slots, in order of where they start.
    slots: Vec<Slot>,
    /// For each stored chunk, in order of where it starts, its slot.
    by_stored: Vec<usize>,
}

#[derive(Debug, Clone)]
struct Slot {
    /// Where the chunk is shown when kept.
    start: u64,
    /// The most bytes it may take decompressed.
    size: u64,
    /// Where it is stored.
    stored: Range<u64>,
    row_group: usize,
    column: usize,
    codec: Compression,
}

/// Whether chunks compressed with `codec` are kept.
fn keepable(codec: Compression) -> bool {
    matches!(codec, Compression::SNAPPY | Compression::ZSTD(_))
}

impl Slots {
    /// The slots of the chunks of the file `footer` describes, `stored_end`
    /// bytes long.
    fn new(footer: &ParquetMetaData, stored_end: u64) -> Self {
        let mut slots = Vec::new();
        let mut next = stored_end;
        for (row_group, group) in footer.row_groups().iter().enumerate() {
            for (column, chunk) in group.columns().iter().enumerate() {
                if !keepable(chunk.compression()) {
                    continue;
                }
                let (start, length) = chunk.byte_range();
                // Its pages' values and headers, with room for each header
                // to grow (a longer size, at most 4 bytes a page).
                let uncompressed = u64::try_from(chunk.uncompressed_size()).unwrap_or(0);
                let size = uncompressed
                    .saturating_add(uncompressed / 64)
                    .saturating_add(4096);
                let Some(end) = next.checked_add(size) else {
                    continue;
                };
                slots.push(Slot {
                    start: next,
                    size,
                    stored: start..start.saturating_add(length),
                    row_group,
                    column,
                    codec: chunk.compression(),
                });
                next = end;
            }
        }
        let mut by_stored: Vec<usize> = (0..slots.len()).collect();
        by_stored.sort_by_key(|&slot| slots[slot].stored.start);
        Self {
            stored_end,
            slots,
            by_stored,
        }
    }

    /// The slot `range` (past the stored file's end) reads from.
    fn shown(&self, range: &Range<u64>) -> Option<&Slot> {
        let at = self.slots.partition_point(|slot| slot.start <= range.start);
        let slot = &self.slots[at.checked_sub(1)?];
        (range.end <= slot.start + slot.size).then_some(slot)
    }

    /// The slot of the stored chunk `range` (of the stored file) reads.
    fn stored(&self, range: &Range<u64>) -> Option<&Slot> {
        let at = self
            .by_stored
            .partition_point(|&slot| self.slots[slot].stored.start <= range.start);
        let slot = &self.slots[self.by_stored[at.checked_sub(1)?]];
        (range.end <= slot.stored.end).then_some(slot)
    }
}

impl fmt::Debug for DecompressedReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecompressedReader")
            .field("file", &self.file.object_meta.location)
            .finish_non_exhaustive()
    }
}

impl DecompressedReader {
    fn key(&self, slot: &Slot) -> ChunkKey {
        ChunkKey {
            row_group: RowGroupKey::new(&self.file.object_meta, slot.row_group),
            column: slot.column,
        }
    }

    /// The file's slots, from its stored footer `footer` (read now when
    /// not given).
    async fn slots(
        &mut self,
        footer: Option<&ParquetMetaData>,
    ) -> parquet::errors::Result<Arc<Slots>> {
        if let Some(slots) = &self.slots {
            return Ok(Arc::clone(slots));
        }
        let slots = match footer {
            Some(footer) => Slots::new(footer, self.file.object_meta.size),
            None => Slots::new(
                &*self.inner.get_metadata(None).await?,
                self.file.object_meta.size,
            ),
        };
        let slots = Arc::new(slots);
        self.slots = Some(Arc::clone(&slots));
        Ok(slots)
    }

    /// The file's footer, with the chunks kept shown stored uncompressed in
    /// their slots.
    async fn footer(
        &mut self,
        options: Option<&ArrowReaderOptions>,
    ) -> parquet::errors::Result<Arc<ParquetMetaData>> {
        let stored = self.inner.get_metadata(options).await?;
        let slots = self.slots(Some(&stored)).await?;
        // DataFusion reads a row group in the part of a file split into
        // byte ranges that holds its first column's first page: a first
        // column shown past the end of the file would be read by none. So
        // where the file is split, the row groups this part reads show
        // their first column as stored.
        let read_here = |row_group: usize| {
            let (Some(range), Some(first)) = (
                self.file.range.as_ref(),
                stored
                    .row_groups()
                    .get(row_group)
                    .and_then(|group| group.columns().first()),
            ) else {
                return false;
            };
            let offset = first
                .dictionary_page_offset()
                .unwrap_or_else(|| first.data_page_offset());
            (range.start..range.end).contains(&offset)
        };
        let kept: Vec<(&Slot, Arc<Decompressed>)> = slots
            .slots
            .iter()
            .filter(|slot| slot.column != 0 || !read_here(slot.row_group))
            .filter_map(|slot| Some((slot, chunks().get(&self.key(slot))?)))
            .collect();
        if kept.is_empty() {
            return Ok(stored);
        }
        // The page index locates pages: it is read now, so that it shows
        // the kept pages where they are read (read later, it would show
        // them where they are stored).
        let indexed = stored
            .row_groups()
            .iter()
            .flat_map(|group| group.columns())
            .any(|chunk| chunk.offset_index_offset().is_some());
        let stored = if indexed && stored.offset_index().is_none() {
            let options = options
                .cloned()
                .unwrap_or_default()
                .with_page_index_policy(PageIndexPolicy::Optional);
            self.inner.get_metadata(Some(&options)).await?
        } else {
            stored
        };
        if indexed && stored.offset_index().is_none() {
            return Ok(stored);
        }
        Ok(Arc::new(shown_uncompressed(&stored, &kept)?))
    }

    /// `ranges` of the file as a footer shows it.
    async fn read(&mut self, ranges: Vec<Range<u64>>) -> parquet::errors::Result<Vec<Bytes>> {
        // A reader may be given a footer read by another (DataFusion reads
        // bloom filters with one reader and the rows with a fresh one).
        let slots = self.slots(None).await?;
        let mut parts: Vec<Option<Bytes>> = vec![None; ranges.len()];
        let mut stored = Vec::new();
        for (index, range) in ranges.iter().enumerate() {
            if range.start >= slots.stored_end {
                let part = self.kept(&slots, range).await?;
                self.kept_bytes_read.add(part.len());
                parts[index] = Some(part);
            } else {
                if let Some(slot) = slots.stored(range) {
                    self.keep(slot);
                }
                stored.push(index);
            }
        }
        if !stored.is_empty() {
            let wanted = stored.iter().map(|&index| ranges[index].clone()).collect();
            let read = self.inner.get_byte_ranges(wanted).await?;
            if read.len() != stored.len() {
                return Err(ParquetError::General(
                    "a read returned another number of ranges than asked".into(),
                ));
            }
            for (index, part) in stored.into_iter().zip(read) {
                parts[index] = Some(part);
            }
        }
        Ok(parts.into_iter().flatten().collect())
    }

    /// `range` of a kept chunk: from the cache, or, when the chunk has left
    /// it since the footer showing it was read, decompressed again (to the
    /// same bytes).
    async fn kept(&mut self, slots: &Slots, range: &Range<u64>) -> parquet::errors::Result<Bytes> {
        let outside = || {
            ParquetError::General(format!(
                "a read of bytes {range:?} of {} falls outside its chunks",
                self.file.object_meta.location
            ))
        };
        let slot = slots.shown(range).ok_or_else(outside)?;
        let key = self.key(slot);
        let chunk = match chunks().get(&key) {
            Some(chunk) => chunk,
            None => {
                let stored = self.inner.get_bytes(slot.stored.clone()).await?;
                let chunk = decompress(&stored, slot.codec, slot.size)
                    .filter(|chunk| chunk.data.len() as u64 <= slot.size)
                    .ok_or_else(|| {
                        ParquetError::General(format!(
                            "a column chunk of {} no longer decompresses as it did",
                            self.file.object_meta.location
                        ))
                    })?;
                let chunk = Arc::new(chunk);
                chunks().insert(key, Arc::clone(&chunk));
                chunk
            }
        };
        let (from, to) = (range.start - slot.start, range.end - slot.start);
        if to > chunk.data.len() as u64 {
            return Err(outside());
        }
        Ok(chunk.data.slice(from as usize..to as usize))
    }

    /// Decompresses the chunk of `slot` into the cache, in the background,
    /// unless it is kept or being kept.
    fn keep(&self, slot: &Slot) {
        let key = self.key(slot);
        if chunks().contains_key(&key) || turned_away().contains_key(&key) {
            return;
        }
        {
            let mut warming = WARMING.lock().unwrap_or_else(|e| e.into_inner());
            if !warming.get_or_insert_with(HashSet::new).insert(key.clone()) {
                return;
            }
        }
        let Some(runtime) = warmer() else {
            forget(&key);
            return;
        };
        let (files, file, slot) = (Arc::clone(&self.files), self.file.clone(), slot.clone());
        runtime.spawn(async move {
            let _done = Kept(key.clone());
            // One chunk a core is read and decompressed at once: a scan of
            // a large file asks for all of its chunks, and each holds its
            // stored and its decompressed bytes while it is worked on.
            let Ok(_turn) = turns().acquire().await else {
                return;
            };
            let metrics = ExecutionPlanMetricsSet::new();
            let stored = match files.create_reader(0, file, None, &metrics) {
                Ok(mut reader) => reader.get_bytes(slot.stored.clone()).await,
                Err(error) => Err(ParquetError::External(Box::new(error))),
            };
            match stored {
                Ok(stored) => match decompress(&stored, slot.codec, slot.size) {
                    Some(chunk) if chunk.data.len() as u64 <= slot.size => {
                        DECOMPRESSED.fetch_add(1, Ordering::Relaxed);
                        chunks().insert(key.clone(), Arc::new(chunk));
                        // The cache decides whether it keeps the chunk
                        // when it applies the insertion.
                        chunks().run_pending_tasks();
                        if !chunks().contains_key(&key) {
                            turned_away().insert(key, ());
                        }
                    }
                    _ => tracing::debug!(?key, "column chunk not kept: its pages were not read"),
                },
                Err(error) => tracing::debug!(?key, %error, "column chunk not kept"),
            }
        });
    }
}

/// Turns to decompress a chunk in the background: one a core.
fn turns() -> &'static tokio::sync::Semaphore {
    static TURNS: OnceLock<tokio::sync::Semaphore> = OnceLock::new();
    TURNS.get_or_init(|| tokio::sync::Semaphore::new(warmers()))
}

/// Takes a chunk off [`WARMING`].
fn forget(key: &ChunkKey) {
    if let Some(warming) = WARMING.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        warming.remove(key);
    }
}

/// Takes a chunk off [`WARMING`] when its task ends, however it ends.
struct Kept(ChunkKey);

impl Drop for Kept {
    fn drop(&mut self) {
        forget(&self.0);
    }
}

/// Waits until no chunk is being decompressed into the cache.
#[cfg(test)]
pub(crate) async fn kept() {
    while WARMING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .is_some_and(|warming| !warming.is_empty())
    {
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// `stored` with the chunks `kept` shown stored uncompressed, each at the
/// start of its slot. A chunk whose page index does not match its pages is
/// shown as stored.
fn shown_uncompressed(
    stored: &ParquetMetaData,
    kept: &[(&Slot, Arc<Decompressed>)],
) -> parquet::errors::Result<ParquetMetaData> {
    let mut offset_index = stored.offset_index().cloned();
    let mut groups: Vec<_> = stored.row_groups().to_vec();
    for (slot, chunk) in kept {
        let (row_group, column) = (slot.row_group, slot.column);
        let group = &groups[row_group];
        let meta = &group.columns()[column];
        let stored_start = meta.byte_range().0;
        let (Ok(length), Ok(start), Ok(first)) = (
            i64::try_from(chunk.data.len()),
            i64::try_from(slot.start),
            i64::try_from(slot.start + chunk.first_data_page),
        ) else {
            continue;
        };
        // The page index, where there is one, must locate every page.
        let locations = match offset_index
            .as_ref()
            .and_then(|index| index.get(row_group)?.get(column))
        {
            Some(index) => {
                let moved: Option<Vec<PageLocation>> = index
                    .page_locations()
                    .iter()
                    .map(|location| {
                        let stored = u64::try_from(location.offset)
                            .ok()?
                            .checked_sub(stored_start)?;
                        let page = chunk.page_at(stored)?;
                        Some(PageLocation {
                            offset: i64::try_from(slot.start + page.start).ok()?,
                            compressed_page_size: i32::try_from(page.length).ok()?,
                            first_row_index: location.first_row_index,
                        })
                    })
                    .collect();
                match moved {
                    Some(moved) => Some(moved),
                    None => continue,
                }
            }
            None => None,
        };
        let shown = meta
            .clone()
            .into_builder()
            .set_compression(Compression::UNCOMPRESSED)
            .set_total_compressed_size(length)
            .set_total_uncompressed_size(length)
            .set_dictionary_page_offset(chunk.dictionary.then_some(start))
            .set_data_page_offset(first)
            .set_index_page_offset(None)
            .build()?;
        let mut columns = group.columns().to_vec();
        columns[column] = shown;
        groups[row_group] = group
            .clone()
            .into_builder()
            .set_column_metadata(columns)
            .build()?;
        if let (Some(locations), Some(index)) = (locations, offset_index.as_mut()) {
            let old = &index[row_group][column];
            index[row_group][column] = OffsetIndexMetaData {
                page_locations: locations,
                unencoded_byte_array_data_bytes: old.unencoded_byte_array_data_bytes().cloned(),
            };
        }
    }
    Ok(stored
        .clone()
        .into_builder()
        .set_row_groups(groups)
        .set_offset_index(offset_index)
        .build())
}

/// A stored column chunk's pages decompressed, each behind its header
/// rewritten; `None` when a page cannot be read so.
fn decompress(stored: &[u8], codec: Compression, size: u64) -> Option<Decompressed> {
    let mut data = SystemBuffer::zeroed(usize::try_from(size).ok()?)?;
    let mut pages = Vec::new();
    let mut first_data_page = None;
    let mut dictionary = false;
    let mut snappy = snap::raw::Decoder::new();
    let mut at = 0;
    while at < stored.len() {
        let header = PageHeader::read(&stored[at..])?;
        let payload_start = at.checked_add(header.length)?;
        let payload = stored.get(payload_start..payload_start.checked_add(header.compressed)?)?;
        let start = data.len;
        data.extend(&header.rewritten)?;
        let body = data.len;
        let (plain, packed) = match header.kind {
            PageKind::Dictionary | PageKind::Data => (&[][..], payload),
            PageKind::DataV2 {
                levels,
                values_compressed,
            } => {
                if levels > payload.len() {
                    return None;
                }
                let (levels, values) = payload.split_at(levels);
                if values_compressed {
                    (levels, values)
                } else {
                    (payload, &[][..])
                }
            }
        };
        data.extend(plain)?;
        let wanted = header.uncompressed.checked_sub(plain.len())?;
        if wanted > 0 {
            let out = data.spare(wanted)?;
            let written = match codec {
                Compression::SNAPPY => snappy.decompress(packed, out).ok()?,
                Compression::ZSTD(_) => zstd::bulk::decompress_to_buffer(packed, out).ok()?,
                _ => return None,
            };
            if written != wanted {
                return None;
            }
            data.len += wanted;
        }
        if data.len - body != header.uncompressed {
            return None;
        }
        match header.kind {
            PageKind::Dictionary if pages.is_empty() => dictionary = true,
            PageKind::Dictionary => return None,
            _ => {
                first_data_page.get_or_insert(start as u64);
            }
        }
        pages.push(PageSpan {
            stored: at as u64,
            start: start as u64,
            length: (data.len - start) as u64,
        });
        at = payload_start + header.compressed;
    }
    Some(Decompressed {
        first_data_page: first_data_page?,
        data: Bytes::from_owner(data),
        pages,
        dictionary,
    })
}

/// Zeroed memory of its own, filled from the start: what a kept chunk is
/// held in. On Unix it is mapped for the chunk alone and unmapped when the
/// chunk is dropped from the cache, so its memory goes back to the system
/// at once (the gateway's allocator, and the C library's for blocks it
/// takes from its heap, keep what is freed for reuse), and the pages of its
/// slot that a chunk does not fill are never touched.
struct SystemBuffer {
    pointer: std::ptr::NonNull<u8>,
    capacity: usize,
    /// How many bytes are filled.
    len: usize,
}

// SAFETY: the buffer owns its memory, written only through `&mut self`.
unsafe impl Send for SystemBuffer {}
// SAFETY: as above; `&self` only reads.
unsafe impl Sync for SystemBuffer {}

impl SystemBuffer {
    #[cfg(unix)]
    fn zeroed(capacity: usize) -> Option<Self> {
        let capacity = capacity.max(1);
        // SAFETY: an anonymous private mapping of `capacity` bytes, which
        // the kernel fills with zeros; its result is checked.
        let pointer = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                capacity,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if pointer == libc::MAP_FAILED {
            return None;
        }
        Some(Self {
            pointer: std::ptr::NonNull::new(pointer.cast())?,
            capacity,
            len: 0,
        })
    }

    #[cfg(not(unix))]
    fn zeroed(capacity: usize) -> Option<Self> {
        let layout = std::alloc::Layout::from_size_align(capacity.max(1), 64).ok()?;
        // SAFETY: the layout's size is not zero.
        let pointer = unsafe { std::alloc::alloc_zeroed(layout) };
        Some(Self {
            pointer: std::ptr::NonNull::new(pointer)?,
            capacity: layout.size(),
            len: 0,
        })
    }

    /// The next `length` bytes, not filled yet; `None` past the capacity.
    fn spare(&mut self, length: usize) -> Option<&mut [u8]> {
        let end = self.len.checked_add(length)?;
        if end > self.capacity {
            return None;
        }
        // SAFETY: `len..end` lies within the block, which is initialized
        // (zeroed), and `&mut self` borrows it exclusively.
        Some(unsafe { std::slice::from_raw_parts_mut(self.pointer.as_ptr().add(self.len), length) })
    }

    /// Appends `bytes`; `None` past the capacity.
    fn extend(&mut self, bytes: &[u8]) -> Option<()> {
        self.spare(bytes.len())?.copy_from_slice(bytes);
        self.len += bytes.len();
        Some(())
    }
}

impl AsRef<[u8]> for SystemBuffer {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the first `len` bytes of the block are initialized.
        unsafe { std::slice::from_raw_parts(self.pointer.as_ptr(), self.len) }
    }
}

impl Drop for SystemBuffer {
    #[cfg(unix)]
    fn drop(&mut self) {
        // SAFETY: the mapping was made with this address and length, and
        // is unmapped once.
        unsafe { libc::munmap(self.pointer.as_ptr().cast(), self.capacity) };
    }

    #[cfg(not(unix))]
    fn drop(&mut self) {
        // SAFETY: the block was allocated with this layout (checked when it
        // was), and is freed once.
        unsafe {
            std::alloc::dealloc(
                self.pointer.as_ptr(),
                std::alloc::Layout::from_size_align_unchecked(self.capacity, 64),
            )
        }
    }
}

/// The kinds of page a chunk may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PageKind {
    Data,
    Dictionary,
    /// A version 2 data page: its levels (`levels` bytes) are never
    /// compressed, its values only when `values_compressed`.
    DataV2 {
        levels: usize,
        values_compressed: bool,
    },
}

/// What a page's header says, and the header rewritten for the page
/// decompressed.
#[derive(Debug)]
struct PageHeader {
    /// The stored header's length.
    length: usize,
    kind: PageKind,
    uncompressed: usize,
    compressed: usize,
    rewritten: Vec<u8>,
}

/// Thrift compact protocol's field types (those a page header holds).
mod compact {
    pub(super) const TRUE: u8 = 1;
    pub(super) const FALSE: u8 = 2;
    pub(super) const BYTE: u8 = 3;
    pub(super) const I16: u8 = 4;
    pub(super) const I32: u8 = 5;
    pub(super) const I64: u8 = 6;
    pub(super) const DOUBLE: u8 = 7;
    pub(super) const BINARY: u8 = 8;
    pub(super) const LIST: u8 = 9;
    pub(super) const SET: u8 = 10;
    pub(super) const MAP: u8 = 11;
    pub(super) const STRUCT: u8 = 12;
}

impl PageHeader {
    /// Reads the header at the start of `bytes` (Parquet's `PageHeader`, in
    /// Thrift's compact protocol): fields 1 (type), 2 (uncompressed size),
    /// 3 (compressed size), 4 (CRC), 8 (the version 2 data page header).
    /// The rewritten header says the page is as long as its values and has
    /// no CRC; every other field is copied as it is.
    fn read(bytes: &[u8]) -> Option<Self> {
        let mut reader = Compact { bytes, at: 0 };
        let mut rewritten = Vec::with_capacity(64);
        let (mut page_type, mut uncompressed, mut compressed) = (None, None, None);
        let mut v2 = None;
        let (mut last_read, mut last_written) = (0_i16, 0_i16);
        while let Some((id, kind)) = reader.field(last_read)? {
            last_read = id;
            let value = reader.at;
            match (id, kind) {
                (1, compact::I32) => page_type = Some(reader.zigzag()?),
                (2, compact::I32) => uncompressed = Some(usize::try_from(reader.zigzag()?).ok()?),
                (3, compact::I32) => compressed = Some(usize::try_from(reader.zigzag()?).ok()?),
                (8, compact::STRUCT) => v2 = Some(reader.data_page_v2()?),
                _ => reader.skip(kind, 0)?,
            }
            if id == 4 {
                continue;
            }
            write_field_header(&mut rewritten, id, kind, last_written);
            last_written = id;
            if id == 3 {
                write_varint(&mut rewritten, zigzag(i64::try_from(uncompressed?).ok()?));
            } else {
                rewritten.extend_from_slice(&bytes[value..reader.at]);
            }
        }
        rewritten.push(0);
        let kind = match page_type? {
            0 => PageKind::Data,
            2 => PageKind::Dictionary,
            3 => {
                let (levels, values_compressed) = v2?;
                PageKind::DataV2 {
                    levels,
                    values_compressed,
                }
            }
            _ => return None,
        };
        Some(Self {
            length: reader.at,
            kind,
            uncompressed: uncompressed?,
            compressed: compressed?,
            rewritten,
        })
    }
}

/// A reader of Thrift's compact protocol.
struct Compact<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Compact<'_> {
    fn byte(&mut self) -> Option<u8> {
        let byte = *self.bytes.get(self.at)?;
        self.at += 1;
        Some(byte)
    }

    fn advance(&mut self, length: u64) -> Option<()> {
        let end = self.at.checked_add(usize::try_from(length).ok()?)?;
        (end <= self.bytes.len()).then(|| self.at = end)
    }

    fn varint(&mut self) -> Option<u64> {
        let mut value = 0_u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    fn zigzag(&mut self) -> Option<i64> {
        let value = self.varint()?;
        Some(((value >> 1) as i64) ^ -((value & 1) as i64))
    }

    /// The next field's id and type; `None` at the end of the struct.
    fn field(&mut self, last: i16) -> Option<Option<(i16, u8)>> {
        let byte = self.byte()?;
        if byte == 0 {
            return Some(None);
        }
        let (delta, kind) = (byte >> 4, byte & 0x0f);
        let id = if delta == 0 {
            i16::try_from(self.zigzag()?).ok()?
        } else {
            last.checked_add(i16::from(delta))?
        };
        Some(Some((id, kind)))
    }

    /// Skips a value of `kind` (a field's: a boolean's value is its type).
    fn skip(&mut self, kind: u8, depth: usize) -> Option<()> {
        if depth > 32 {
            return None;
        }
        match kind {
            compact::TRUE | compact::FALSE => Some(()),
            compact::BYTE => self.byte().map(drop),
            compact::I16 | compact::I32 | compact::I64 => self.varint().map(drop),
            compact::DOUBLE => self.advance(8),
            compact::BINARY => {
                let length = self.varint()?;
                self.advance(length)
            }
            compact::LIST | compact::SET => {
                let header = self.byte()?;
                let mut count = u64::from(header >> 4);
                if count == 15 {
                    count = self.varint()?;
                }
                for _ in 0..count {
                    self.element(header & 0x0f, depth)?;
                }
                Some(())
            }
            compact::MAP => {
                let count = self.varint()?;
                if count > 0 {
                    let kinds = self.byte()?;
                    for _ in 0..count {
                        self.element(kinds >> 4, depth)?;
                        self.element(kinds & 0x0f, depth)?;
                    }
                }
                Some(())
            }
            compact::STRUCT => {
                let mut last = 0;
                while let Some((id, kind)) = self.field(last)? {
                    self.skip(kind, depth + 1)?;
                    last = id;
                }
                Some(())
            }
            _ => None,
        }
    }

    /// Skips an element of a list, set or map (a boolean there is a byte).
    fn element(&mut self, kind: u8, depth: usize) -> Option<()> {
        match kind {
            compact::TRUE | compact::FALSE => self.byte().map(drop),
            _ => self.skip(kind, depth + 1),
        }
    }

    /// A `DataPageHeaderV2`: the bytes of its levels (fields 5 and 6) and
    /// whether its values are compressed (field 7, true when absent).
    fn data_page_v2(&mut self) -> Option<(usize, bool)> {
        let (mut levels, mut compressed) = (0_usize, true);
        let mut last = 0;
        while let Some((id, kind)) = self.field(last)? {
            last = id;
            match (id, kind) {
                (5 | 6, compact::I32) => {
                    levels = levels.checked_add(usize::try_from(self.zigzag()?).ok()?)?;
                }
                (7, compact::TRUE) => compressed = true,
                (7, compact::FALSE) => compressed = false,
                _ => self.skip(kind, 1)?,
            }
        }
        Some((levels, compressed))
    }
}

fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn write_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A field's header: the id as a delta from the last field's when it fits.
fn write_field_header(out: &mut Vec<u8>, id: i16, kind: u8, last: i16) {
    match id.checked_sub(last) {
        Some(delta @ 1..=15) => out.push(((delta as u8) << 4) | kind),
        _ => {
            out.push(kind);
            write_varint(out, zigzag(i64::from(id)));
        }
    }
}

impl AsyncFileReader for DecompressedReader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        async move { one_part(self.read(vec![range]).await?) }.boxed()
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<Range<u64>>,
    ) -> BoxFuture<'_, parquet::errors::Result<Vec<Bytes>>> {
        async move { self.read(ranges).await }.boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, parquet::errors::Result<Arc<ParquetMetaData>>> {
        async move { self.footer(options).await }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::util::pretty::pretty_format_batches;
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    use datafusion::prelude::SessionContext;
    use parquet::arrow::ArrowWriter;
    use parquet::basic::ZstdLevel;
    use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterVersion};

    use super::super::files::parquet_product_context;
    use super::*;
    use crate::query::testing::plan_and_run;

    #[test]
    fn a_header_is_rewritten_for_its_page_decompressed_without_its_checksum() {
        let stored = [
            0x15, 0x00, // 1: type, a data page
            0x15, 0xc8, 0x01, // 2: uncompressed size, 100
            0x15, 0x64, // 3: compressed size, 50
            0x15, 0xf6, 0x01, // 4: CRC, 123
            0x1c, // 5: the data page header
            0x15, 0x14, 0x15, 0x00, 0x15, 0x06, 0x15, 0x06, 0x00, // its fields
            0x00, // end
            0xaa, 0xbb, // the page's bytes
        ];
        let header = PageHeader::read(&stored).expect("a header");
        assert_eq!(header.length, stored.len() - 2);
        assert_eq!(header.kind, PageKind::Data);
        assert_eq!((header.uncompressed, header.compressed), (100, 50));
        let rewritten = [
            0x15, 0x00, 0x15, 0xc8, 0x01, // type and uncompressed size
            0x15, 0xc8, 0x01, // compressed size: 100
            0x2c, // 5, two after 3: no CRC
            0x15, 0x14, 0x15, 0x00, 0x15, 0x06, 0x15, 0x06, 0x00, 0x00,
        ];
        assert_eq!(header.rewritten, rewritten);
        // Cut short anywhere, it is not read.
        for end in 0..header.length {
            assert!(PageHeader::read(&stored[..end]).is_none(), "{end}");
        }
    }

    /// Writes `rows.parquet` in `dir`: 3 000 rows in row groups of 1 000
    /// and pages of 100, with a page index, compressed with `codec`, in
    /// data pages of `version`: `id`, `name` (null at every 7th row),
    /// `region` (three values: a dictionary) and `score`.
    fn write_rows(dir: &std::path::Path, codec: Compression, version: WriterVersion) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
            Field::new("region", DataType::Utf8, false),
            Field::new("score", DataType::Float64, false),
        ]));
        let ids = 0..3000_i64;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from_iter_values(ids.clone())),
            Arc::new(StringArray::from_iter(ids.clone().map(|id| {
                (id % 7 != 0).then(|| format!("name {id} of a longer text that compresses"))
            }))),
            Arc::new(StringArray::from_iter_values(
                ids.clone().map(|id| ["EU", "US", "APAC"][id as usize % 3]),
            )),
            Arc::new(Float64Array::from_iter_values(
                ids.map(|id| (id % 97) as f64 / 4.0),
            )),
        ];
        let batch = RecordBatch::try_new(Arc::clone(&schema), columns).expect("batch");
        let properties = WriterProperties::builder()
            .set_compression(codec)
            .set_writer_version(version)
            .set_max_row_group_row_count(Some(1000))
            .set_data_page_row_count_limit(100)
            .set_write_batch_size(50)
            .set_statistics_enabled(EnabledStatistics::Page)
            .build();
        let file = std::fs::File::create(dir.join("rows.parquet")).expect("file");
        let mut writer = ArrowWriter::try_new(file, schema, Some(properties)).expect("writer");
        writer.write(&batch).expect("write");
        writer.close().expect("close");
    }

    /// Runs `sql`: its rows as a table, and the bytes it read from chunks
    /// kept decompressed.
    async fn run(ctx: &SessionContext, sql: &str) -> (String, usize) {
        let (plan, batches) = plan_and_run(ctx, sql).await;
        let mut kept = 0;
        plan.apply(|node| {
            if let Some(metrics) = node.metrics() {
                kept += metrics
                    .sum_by_name("decompressed_bytes_kept_read")
                    .map_or(0, |value| value.as_usize());
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .expect("walk");
        let rows = pretty_format_batches(&batches).expect("format").to_string();
        (rows, kept)
    }

    #[tokio::test]
    async fn chunks_read_again_come_decompressed_and_answer_as_the_file() {
        let files = [
            (Compression::SNAPPY, WriterVersion::PARQUET_1_0),
            (
                Compression::ZSTD(ZstdLevel::default()),
                WriterVersion::PARQUET_2_0,
            ),
        ];
        for (codec, version) in files {
            // Read whole by one task, then split into byte ranges read by
            // three (each row group by the task whose range holds its first
            // column's first page).
            for split in [false, true] {
                let dir = tempfile::tempdir().expect("tempdir");
                write_rows(dir.path(), codec, version);
                let (ctx, _) = parquet_product_context(dir.path(), "rows", "rows.parquet").await;
                let partitions = if split { 3 } else { 1 };
                for setting in [
                    format!("SET datafusion.execution.target_partitions = {partitions}"),
                    "SET datafusion.optimizer.repartition_file_min_size = 1".to_string(),
                ] {
                    ctx.sql(&setting)
                        .await
                        .expect("set")
                        .collect()
                        .await
                        .expect("set");
                }
                let queries = [
                    "SELECT * FROM {} ORDER BY id",
                    // Pages left out by the page index: read by their locations.
                    "SELECT id, name, score FROM {} WHERE id BETWEEN 120 AND 2450 ORDER BY id",
                    "SELECT region, count(name) AS names, sum(score) AS total, min(name) AS least, \
                 max(id) AS top FROM {} WHERE region <> 'EU' GROUP BY region ORDER BY region",
                ];
                for (index, query) in queries.into_iter().enumerate() {
                    let (plain, _) = run(&ctx, &query.replace("{}", "plain")).await;
                    let (first, kept_first) = run(&ctx, &query.replace("{}", "rows")).await;
                    assert_eq!(first, plain, "{codec:?} split {split}: {query}");
                    if index == 0 {
                        assert_eq!(kept_first, 0, "nothing is kept before a first read");
                    }
                    kept().await;
                    let (again, kept_again) = run(&ctx, &query.replace("{}", "rows")).await;
                    assert_eq!(again, plain, "{codec:?} split {split}: {query}");
                    assert!(
                        kept_again > 0,
                        "{codec:?} {query}: nothing read decompressed"
                    );
                }
            }
        }
    }

    #[tokio::test]
    async fn a_chunk_the_cache_turns_away_is_not_decompressed_again_at_once() {
        // Room for the small chunks (`region`'s dictionary and indexes)
        // and not for the others.
        let capacity = 4 << 10;
        set_page_cache(capacity);
        assert_eq!(
            chunks().policy().max_capacity(),
            Some(capacity),
            "the cache was made before this test set it (run one test a process, as nextest does)"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        write_rows(dir.path(), Compression::SNAPPY, WriterVersion::PARQUET_1_0);
        let (ctx, _) = parquet_product_context(dir.path(), "rows", "rows.parquet").await;
        let query = "SELECT * FROM {} ORDER BY id";
        let (plain, _) = run(&ctx, &query.replace("{}", "plain")).await;
        let mut decompressed = Vec::new();
        let mut kept_read = Vec::new();
        for _ in 0..3 {
            let before = page_cache_decompressions();
            let (rows, kept_bytes) = run(&ctx, &query.replace("{}", "rows")).await;
            assert_eq!(rows, plain);
            kept().await;
            decompressed.push(page_cache_decompressions() - before);
            kept_read.push(kept_bytes);
        }
        // Three row groups of four chunks: every one decompressed at the
        // first scan, and none again at the next two, which read the small
        // chunks the cache kept.
        assert_eq!(decompressed, [12, 0, 0]);
        assert_eq!(kept_read[0], 0);
        assert!(
            kept_read[1] > 0 && kept_read[1] == kept_read[2],
            "{kept_read:?}"
        );
    }
}
