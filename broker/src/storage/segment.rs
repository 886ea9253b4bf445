//! One segment of a partition log: a `.log` file of record batches and its sparse indexes.
//!
//! `.log` file:
//!
//! ```text
//! offset  size  field
//!      0     8  magic "CAIRNLOG"
//!      8     4  format version (u32 BE, 1)
//!     12     4  reserved (0)
//!     16     -  RecordBatch v2 batches back to back, exactly as produced, base offsets stamped
//!  len..cap     zeros: preallocated space of the active segment (a zero length ends the scan)
//! ```
//!
//! Files are named by the segment's base offset, 20 digits: `00000000000000000042.log`,
//! `.index`, `.timeindex`. The active segment's log is preallocated with `fallocate` and mapped;
//! its index lives in memory and is written to disk when the segment is sealed or at clean
//! shutdown (after an unclean stop the active segment is always rescanned, so an on-disk index
//! for it would never be trusted anyway). Sealed segments are mapped and their indexes loaded on
//! first use, and can be evicted again to stay within the open-segments budget.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use cairn_protocol::record_batch::{check_batch, peek_total_len, RecordBatch, BATCH_HEADER_LEN};

use super::error::{Result, StorageError};
use super::index::{read_index_file, SegmentIndex};
use super::mmap::{shared_bytes, LogMap};

/// Length of the `.log` file header.
pub(crate) const LOG_HEADER_LEN: u64 = 16;
const LOG_MAGIC: &[u8; 8] = b"CAIRNLOG";
const LOG_VERSION: u32 = 1;

/// File name stem of a segment.
pub(crate) fn segment_stem(base_offset: u64) -> String {
    format!("{base_offset:020}")
}

/// Parses a `.log` file name into its base offset.
pub(crate) fn parse_log_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".log")?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

fn log_header() -> [u8; LOG_HEADER_LEN as usize] {
    let mut h = [0u8; LOG_HEADER_LEN as usize];
    h[..8].copy_from_slice(LOG_MAGIC);
    h[8..12].copy_from_slice(&LOG_VERSION.to_be_bytes());
    h
}

/// Fields of a stored batch header needed to navigate a segment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StoredBatch {
    pub(crate) base_offset: u64,
    pub(crate) last_offset: u64,
    pub(crate) total_len: u64,
    pub(crate) max_timestamp: i64,
}

/// Reads the navigation fields of the batch at `pos` of `data`, if they are in bounds and sane.
pub(crate) fn stored_batch_at(data: &[u8], pos: u64) -> Option<StoredBatch> {
    let pos = usize::try_from(pos).ok()?;
    let rest = data.get(pos..)?;
    if rest.len() < BATCH_HEADER_LEN {
        return None;
    }
    let total = peek_total_len(rest)?;
    if total < BATCH_HEADER_LEN as i64 || total as usize > rest.len() {
        return None;
    }
    let base = i64::from_be_bytes(rest[0..8].try_into().ok()?);
    let delta = i32::from_be_bytes(rest[23..27].try_into().ok()?);
    let max_ts = i64::from_be_bytes(rest[35..43].try_into().ok()?);
    if base < 0 || delta < 0 {
        return None;
    }
    Some(StoredBatch {
        base_offset: base as u64,
        last_offset: base as u64 + delta as u64,
        total_len: total as u64,
        max_timestamp: max_ts,
    })
}

/// Why a scan of a segment's batches stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ScanStop {
    /// A zero length or the end of the bytes: the normal end of a log.
    End,
    /// A batch was cut short or failed its checks; the log is cut here.
    Damaged(String),
}

/// The outcome of scanning a segment from its start.
#[derive(Debug)]
pub(crate) struct ScanOutcome {
    pub(crate) valid_len: u64,
    pub(crate) next_offset: u64,
    pub(crate) index: SegmentIndex,
    pub(crate) stop: ScanStop,
    pub(crate) batches: u64,
}

/// Scans `data` (a whole `.log` file or mapping) from the header: checks each batch's length,
/// magic, attributes and CRC32C and that its base offset continues the sequence, and rebuilds the
/// indexes. Stops at the first zero length (the preallocated tail) or damaged batch.
pub(crate) fn scan_log(data: &[u8], base_offset: u64, interval: u32, entries_max: usize) -> ScanOutcome {
    let mut out = ScanOutcome {
        valid_len: LOG_HEADER_LEN,
        next_offset: base_offset,
        index: SegmentIndex::default(),
        stop: ScanStop::End,
        batches: 0,
    };
    if data.len() < LOG_HEADER_LEN as usize || data[..8] != LOG_MAGIC[..] {
        out.stop = ScanStop::Damaged("missing or bad segment header".into());
        out.valid_len = 0;
        return out;
    }
    let mut pos = LOG_HEADER_LEN as usize;
    loop {
        let rest = &data[pos..];
        let Some(total) = peek_total_len(rest) else {
            if rest.iter().any(|b| *b != 0) {
                out.stop = ScanStop::Damaged(format!("torn batch header at byte {pos}"));
            }
            return out;
        };
        if total == 12 && rest[..12].iter().all(|b| *b == 0) {
            return out;
        }
        if total < BATCH_HEADER_LEN as i64 || total as usize > rest.len() {
            out.stop = ScanStop::Damaged(format!("batch at byte {pos} has impossible length {total}"));
            return out;
        }
        let batch = &rest[..total as usize];
        let header = match check_batch(batch) {
            Ok(h) => h,
            Err(e) => {
                out.stop = ScanStop::Damaged(format!("batch at byte {pos}: {e}"));
                return out;
            }
        };
        if header.base_offset != out.next_offset as i64 || header.last_offset_delta < 0 {
            out.stop = ScanStop::Damaged(format!(
                "batch at byte {pos} has base offset {}, expected {}",
                header.base_offset, out.next_offset
            ));
            return out;
        }
        let rel = out.next_offset - base_offset;
        let (Ok(rel), Ok(p)) = (u32::try_from(rel), u32::try_from(pos)) else {
            out.stop = ScanStop::Damaged(format!("batch at byte {pos} does not fit the index"));
            return out;
        };
        if !out.index.on_batch(rel, p, total as u32, header.max_timestamp, interval, entries_max) {
            // Written under a larger index budget than today's: the rebuilt index gets sparser
            // toward the end; the batch is good.
            out.index.on_batch_unindexed(total as u32, header.max_timestamp);
        }
        out.next_offset = header.next_offset() as u64;
        pos += total as usize;
        out.valid_len = pos as u64;
        out.batches += 1;
    }
}

/// One segment.
#[derive(Debug)]
pub(crate) struct Segment {
    pub(crate) base_offset: u64,
    log_path: PathBuf,
    index_path: PathBuf,
    time_path: PathBuf,
    /// Idempotent producers' last batches as of the segment's end, written when its seal is
    /// finished (see `producers_at_end`).
    producers_path: PathBuf,
    /// The encoded producer states taken when the segment was sealed by a roll, until they are
    /// written to `producers_path`.
    producers_at_end: std::sync::Mutex<Option<Vec<u8>>>,
    /// Bytes of complete batches, header included (published with release ordering).
    len: AtomicU64,
    /// Offset after the last complete batch.
    next_offset: AtomicU64,
    /// Largest record timestamp, `i64::MIN` when empty.
    max_timestamp: AtomicI64,
    /// Bytes known to be on stable storage.
    synced_len: AtomicU64,
    /// When the segment was created (ms since the epoch), for `segment_ms`.
    pub(crate) created_ms: i64,
    /// Capacity of the writable mapping while active.
    capacity: u64,
    sealed: AtomicBool,
    seal_finished: AtomicBool,
    /// Index files left by a clean close that could not be removed when the segment became
    /// active again (a read-only filesystem); removed before the first append.
    stale_index_files: AtomicBool,
    map: RwLock<Option<Arc<LogMap>>>,
    /// Write handle of the active segment (appender only); evicted with the mapping.
    writer: std::sync::Mutex<Option<File>>,
    index: RwLock<Option<SegmentIndex>>,
    /// Tick of last use, for evicting cold segments.
    pub(crate) last_used: AtomicU64,
}

impl Segment {
    fn paths(dir: &Path, base_offset: u64) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
        let stem = segment_stem(base_offset);
        (
            dir.join(format!("{stem}.log")),
            dir.join(format!("{stem}.index")),
            dir.join(format!("{stem}.timeindex")),
            dir.join(format!("{stem}.producers")),
        )
    }

    fn new(dir: &Path, base_offset: u64, capacity: u64, created_ms: i64) -> Segment {
        let (log_path, index_path, time_path, producers_path) = Self::paths(dir, base_offset);
        Segment {
            base_offset,
            log_path,
            index_path,
            time_path,
            producers_path,
            producers_at_end: std::sync::Mutex::new(None),
            len: AtomicU64::new(LOG_HEADER_LEN),
            next_offset: AtomicU64::new(base_offset),
            max_timestamp: AtomicI64::new(i64::MIN),
            synced_len: AtomicU64::new(LOG_HEADER_LEN),
            created_ms,
            capacity,
            sealed: AtomicBool::new(false),
            seal_finished: AtomicBool::new(false),
            stale_index_files: AtomicBool::new(false),
            map: RwLock::new(None),
            writer: std::sync::Mutex::new(None),
            index: RwLock::new(None),
            last_used: AtomicU64::new(0),
        }
    }

    /// Creates a new, empty active segment: writes the header, preallocates `prealloc` bytes and
    /// maps `capacity` bytes. Returns the segment and the allocated file length.
    pub(crate) fn create(
        dir: &Path,
        base_offset: u64,
        capacity: u64,
        prealloc: u64,
        now_ms: i64,
    ) -> Result<(Segment, u64)> {
        let seg = Segment::new(dir, base_offset, capacity, now_ms);
        #[cfg(test)]
        disk_model::forget(&seg.log_path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&seg.log_path)
            .map_err(|e| StorageError::io("create", &seg.log_path, e))?;
        let allocated = prealloc.clamp(LOG_HEADER_LEN, capacity);
        let set_up = (|| {
            fallocate(&file, &seg.log_path, allocated)?;
            file.write_all_at(&log_header(), 0).map_err(|e| StorageError::io("write header", &seg.log_path, e))?;
            LogMap::read_only(&file, capacity as usize).map_err(|e| StorageError::io("mmap", &seg.log_path, e))
        })();
        let map = match set_up {
            Ok(map) => map,
            Err(e) => {
                // A full disk refuses the allocation: the empty file must not stay behind as the
                // partition's newest segment.
                let _ = std::fs::remove_file(&seg.log_path);
                return Err(e);
            }
        };
        *seg.map.write().expect("segment map lock") = Some(Arc::new(map));
        *seg.index.write().expect("segment index lock") = Some(SegmentIndex::default());
        // Remove index files left by an earlier incarnation of this base offset.
        let _ = std::fs::remove_file(&seg.index_path);
        let _ = std::fs::remove_file(&seg.time_path);
        let _ = std::fs::remove_file(&seg.producers_path);
        Ok((seg, allocated))
    }

    /// A segment found on disk, not yet opened. `len` and `next_offset` are filled in by
    /// recovery or by [`Segment::restore`].
    pub(crate) fn existing(dir: &Path, base_offset: u64, capacity: u64) -> Segment {
        let seg = Segment::new(dir, base_offset, capacity, now_ms_wall());
        seg.sealed.store(true, Ordering::Relaxed);
        seg.seal_finished.store(true, Ordering::Relaxed);
        seg
    }

    /// Sets the published state after recovery.
    pub(crate) fn restore(&self, len: u64, next_offset: u64, max_timestamp: Option<i64>, index: Option<SegmentIndex>) {
        self.len.store(len, Ordering::Release);
        self.synced_len.store(len, Ordering::Release);
        self.next_offset.store(next_offset, Ordering::Release);
        self.max_timestamp.store(max_timestamp.unwrap_or(i64::MIN), Ordering::Release);
        *self.index.write().expect("segment index lock") = index;
    }

    pub(crate) fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Published length in bytes (header included).
    pub(crate) fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    /// Bytes of batches (header excluded).
    pub(crate) fn data_bytes(&self) -> u64 {
        self.len().saturating_sub(LOG_HEADER_LEN)
    }

    /// `true` when the segment holds no batch.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() <= LOG_HEADER_LEN
    }

    /// Offset after the last batch.
    pub(crate) fn next_offset(&self) -> u64 {
        self.next_offset.load(Ordering::Acquire)
    }

    /// Largest record timestamp, if any batch is present.
    pub(crate) fn max_timestamp(&self) -> Option<i64> {
        Some(self.max_timestamp.load(Ordering::Acquire)).filter(|t| *t != i64::MIN)
    }

    /// Paths of the index files.
    pub(crate) fn index_paths(&self) -> (&Path, &Path) {
        (&self.index_path, &self.time_path)
    }

    /// Turns a segment found on disk into the active one (writable mapping from now on). Its
    /// index files, if a clean close left them, are removed: the segment will grow past the
    /// length they describe, and recovery must not take them as proof of a finished seal. The
    /// caller makes the removal durable (a directory sync). Where they cannot be removed (a
    /// read-only filesystem, which refuses appends anyway), the first append removes them.
    pub(crate) fn unseal(&self) {
        if let Err(e) = self.remove_index_files() {
            tracing::warn!(segment = %self.log_path.display(), error = %e, "could not remove the active segment's index files; the first append will");
            self.stale_index_files.store(true, Ordering::Release);
        }
        self.map.write().expect("segment map lock").take();
        self.sealed.store(false, Ordering::Release);
        self.seal_finished.store(false, Ordering::Release);
    }

    fn remove_index_files(&self) -> Result<()> {
        // The producer states describe the segment's old end, which appends will move.
        remove_files("remove", &[&self.index_path, &self.time_path, &self.producers_path])
    }

    /// Whether the flusher has persisted this sealed segment's indexes and trimmed it.
    pub(crate) fn is_seal_finished(&self) -> bool {
        self.seal_finished.load(Ordering::Acquire)
    }

    pub(crate) fn is_sealed(&self) -> bool {
        self.sealed.load(Ordering::Acquire)
    }

    pub(crate) fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the segment holds a mapping or a file handle (counts against the budget).
    /// Whether the index is in memory.
    pub(crate) fn has_index(&self) -> bool {
        self.index.read().expect("segment index lock").is_some()
    }

    pub(crate) fn is_mapped(&self) -> bool {
        self.map.read().expect("segment map lock").is_some()
            || self.writer.lock().expect("segment writer lock").is_some()
    }

    /// The mapping, opening it if it was evicted.
    pub(crate) fn mapping(&self) -> Result<Arc<LogMap>> {
        if let Some(m) = self.map.read().expect("segment map lock").as_ref() {
            return Ok(Arc::clone(m));
        }
        let mut slot = self.map.write().expect("segment map lock");
        if let Some(m) = slot.as_ref() {
            return Ok(Arc::clone(m));
        }
        let sealed = self.is_sealed();
        let file = OpenOptions::new()
            .read(true)
            // The mapping is read-only; so is the descriptor (works on a read-only filesystem).
            .open(&self.log_path)
            .map_err(|e| StorageError::io("open", &self.log_path, e))?;
        let map = if sealed {
            let len = file.metadata().map_err(|e| StorageError::io("stat", &self.log_path, e))?.len();
            LogMap::read_only(&file, len as usize)
        } else {
            LogMap::read_only(&file, self.capacity as usize)
        }
        .map_err(|e| StorageError::io("mmap", &self.log_path, e))?;
        let map = Arc::new(map);
        *slot = Some(Arc::clone(&map));
        Ok(map)
    }

    /// Drops the mapping and (for sealed segments) the in-memory index. Readers holding slices
    /// keep the old mapping alive. Returns whether anything was released.
    pub(crate) fn evict(&self) -> bool {
        let had_writer = self.writer.lock().expect("segment writer lock").take().is_some();
        let had_map = self.map.write().expect("segment map lock").take().is_some() || had_writer;
        let had_index = self.is_sealed() && self.index.write().expect("segment index lock").take().is_some();
        had_map || had_index
    }

    /// Runs `f` with the index, loading it (and rebuilding it from the log if the files disagree
    /// with the log) if it is not in memory.
    pub(crate) fn with_index<T>(
        &self,
        interval: u32,
        entries_max: usize,
        f: impl FnOnce(&SegmentIndex) -> T,
    ) -> Result<T> {
        if let Some(idx) = self.index.read().expect("segment index lock").as_ref() {
            return Ok(f(idx));
        }
        let loaded = self.load_index(interval, entries_max)?;
        let mut slot = self.index.write().expect("segment index lock");
        let idx = slot.get_or_insert(loaded);
        Ok(f(idx))
    }

    /// Appender-only: mutates the in-memory index of the active segment.
    pub(crate) fn with_index_mut<T>(&self, f: impl FnOnce(&mut SegmentIndex) -> T) -> T {
        let mut slot = self.index.write().expect("segment index lock");
        f(slot.get_or_insert_with(SegmentIndex::default))
    }

    /// Loads the index files and checks them against the log: right header and entry size,
    /// ordered entries, every position inside the log, and the last entry pointing at a batch
    /// whose base offset matches. Anything else: rebuild from the log and rewrite the files.
    fn load_index(&self, interval: u32, entries_max: usize) -> Result<SegmentIndex> {
        let offsets = read_index_file(&self.index_path).map_err(|e| StorageError::io("read", &self.index_path, e))?;
        let times = read_index_file(&self.time_path).map_err(|e| StorageError::io("read", &self.time_path, e))?;
        let map = self.mapping()?;
        let len = self.len();
        let data = map.slice(0, len as usize);
        if let Some(idx) = SegmentIndex::decode(&offsets, &times) {
            if self.index_agrees(&idx, data) {
                return Ok(idx);
            }
        }
        tracing::warn!(segment = %self.log_path.display(), "index files disagree with the log; rebuilding them");
        let scan = scan_log(data, self.base_offset, interval, entries_max);
        if scan.valid_len != len || scan.next_offset != self.next_offset() {
            return Err(StorageError::Io {
                op: "rebuild index",
                path: self.log_path.clone(),
                source: std::io::Error::other(format!(
                    "log changed under us: scan ends at byte {} offset {}, expected byte {len} offset {}",
                    scan.valid_len,
                    scan.next_offset,
                    self.next_offset()
                )),
            });
        }
        // Index files tell recovery that the file length can be trusted, so only a finished
        // seal (the preallocated tail trimmed) may write them; a pending seal writes its own.
        if self.is_seal_finished() {
            // Keep the rebuilt index in memory even if it cannot be written (a full disk).
            if let Err(e) = self.write_index_files(&scan.index) {
                tracing::warn!(segment = %self.log_path.display(), error = %e, "could not persist the rebuilt index; keeping it in memory");
            }
        }
        Ok(scan.index)
    }

    fn index_agrees(&self, idx: &SegmentIndex, data: &[u8]) -> bool {
        let len = data.len() as u64;
        let next = self.next_offset();
        let Some(first) = idx.offsets.first() else {
            return false;
        };
        let Some(last) = idx.offsets.last() else {
            return false;
        };
        if u64::from(first.pos) != LOG_HEADER_LEN || first.rel != 0 {
            return false;
        }
        if u64::from(last.pos) >= len || self.base_offset + u64::from(last.rel) >= next {
            return false;
        }
        if idx.times.iter().any(|t| self.base_offset + u64::from(t.rel) >= next) {
            return false;
        }
        matches!(stored_batch_at(data, u64::from(last.pos)), Some(b) if b.base_offset == self.base_offset + u64::from(last.rel))
    }

    /// Writes both index files atomically (temp file, fsync, rename) from `idx`.
    pub(crate) fn write_index_files(&self, idx: &SegmentIndex) -> Result<()> {
        write_atomic(&self.index_path, &idx.encode_offsets())?;
        write_atomic(&self.time_path, &idx.encode_times())
    }

    /// Appender-only: writes a batch at the current end with its base offset stamped, in one
    /// `pwritev` into the page cache. The caller has checked allocation. Not yet visible to
    /// readers, who read the same pages zero-copy through the mapping.
    ///
    /// Why not a memcpy into the mapping: the first write fault on each preallocated page makes
    /// the kernel zero the page before the copy overwrites it; profiling showed that zeroing at
    /// 45% of the broker's CPU while producing. A full-page `pwritev` skips it.
    pub(crate) fn write_batch(&self, batch: &[u8], base_offset: u64) -> Result<u64> {
        let pos = self.len();
        let mut writer = self.writer.lock().expect("segment writer lock");
        if self.stale_index_files.load(Ordering::Acquire) {
            self.remove_index_files()?;
            if let Some(dir) = self.log_path.parent() {
                sync_dir(dir)?;
            }
            self.stale_index_files.store(false, Ordering::Release);
        }
        if writer.is_none() {
            let file = OpenOptions::new()
                .write(true)
                .open(&self.log_path)
                .map_err(|e| StorageError::io("open", &self.log_path, e))?;
            *writer = Some(file);
        }
        let file = writer.as_ref().expect("opened above");
        let stamped = base_offset.to_be_bytes();
        let slices = [std::io::IoSlice::new(&stamped), std::io::IoSlice::new(&batch[8..])];
        let written =
            rustix::io::pwritev(file, &slices, pos).map_err(|e| StorageError::io("write", &self.log_path, e.into()))?;
        if written < batch.len() {
            // A short write: finish the rest with plain positional writes.
            let mut whole = Vec::with_capacity(batch.len());
            whole.extend_from_slice(&stamped);
            whole.extend_from_slice(&batch[8..]);
            file.write_all_at(&whole[written..], pos + written as u64)
                .map_err(|e| StorageError::io("write", &self.log_path, e))?;
        }
        Ok(pos)
    }

    /// Appender-only: publishes a written batch to readers.
    pub(crate) fn publish(&self, new_len: u64, next_offset: u64, max_timestamp: i64) {
        self.max_timestamp.fetch_max(max_timestamp, Ordering::AcqRel);
        self.next_offset.store(next_offset, Ordering::Release);
        self.len.store(new_len, Ordering::Release);
    }

    /// Marks the segment sealed: no more appends.
    pub(crate) fn seal(&self) {
        self.sealed.store(true, Ordering::Release);
        self.writer.lock().expect("segment writer lock").take();
    }

    /// Makes every published byte durable: `fdatasync` of the log file (which covers every dirty
    /// page of the file, however it was written). Called by the flusher, never by the appender.
    pub(crate) fn sync(&self) -> Result<()> {
        let len = self.len();
        let synced = self.synced_len.load(Ordering::Acquire);
        if len <= synced {
            return Ok(());
        }
        let handle = self.writer.lock().expect("segment writer lock").as_ref().map(File::try_clone);
        let file = match handle {
            Some(Ok(f)) => f,
            _ => File::open(&self.log_path).map_err(|e| StorageError::io("open", &self.log_path, e))?,
        };
        sync_log_file(&file, &self.log_path, false)?;
        self.synced_len.fetch_max(len, Ordering::AcqRel);
        Ok(())
    }

    /// Finishes sealing on the flusher: persists the index files and trims the preallocated tail.
    /// Readers never look past the published length, so the trim is safe under their mappings.
    pub(crate) fn finish_seal(&self, interval: u32, entries_max: usize) -> Result<()> {
        self.sync()?;
        self.persist_index(interval, entries_max)
    }

    /// Trims the preallocated tail and writes the index files. Best effort: the batches are
    /// already durable, so a failure here (a full disk, typically) leaves the index in memory,
    /// the segment unfinished (retention will not delete it yet), and the caller retries later.
    ///
    /// The trim is durable before the index files are written: recovery trusts a sealed segment's
    /// file length when its time index exists, so that index must never outlive a longer file.
    pub(crate) fn persist_index(&self, interval: u32, entries_max: usize) -> Result<()> {
        let file = OpenOptions::new()
            .write(true)
            .open(&self.log_path)
            .map_err(|e| StorageError::io("open", &self.log_path, e))?;
        file.set_len(self.len()).map_err(|e| StorageError::io("trim", &self.log_path, e))?;
        sync_log_file(&file, &self.log_path, true)?;
        self.with_index(interval, entries_max, |idx| self.write_index_files(idx))??;
        let producers = self.producers_at_end.lock().expect("producer states").clone();
        if let Some(producers) = producers {
            write_atomic(&self.producers_path, &producers)?;
            self.producers_at_end.lock().expect("producer states").take();
        }
        self.seal_finished.store(true, Ordering::Release);
        Ok(())
    }

    /// Keeps the encoded producer states as of this segment's end (taken by the roll that seals
    /// it), to be written with its index files when the seal is finished.
    pub(crate) fn set_producers_at_end(&self, encoded: Vec<u8>) {
        *self.producers_at_end.lock().expect("producer states") = Some(encoded);
    }

    /// The producer states as of this segment's end, if its seal wrote them.
    pub(crate) fn read_producers_at_end(&self) -> Option<Vec<u8>> {
        std::fs::read(&self.producers_path).ok()
    }

    /// Cuts the log file to `len` bytes (recovery, before any reader exists): drops a torn or
    /// corrupt tail together with whatever stale bytes followed it.
    pub(crate) fn truncate_file(&self, len: u64) -> Result<()> {
        self.map.write().expect("segment map lock").take();
        // Producer states written for the old end may name batches the cut removes: a restart
        // then starts from an earlier segment's and scans this one.
        remove_files("remove", &[&self.producers_path])?;
        let file = OpenOptions::new()
            .write(true)
            .open(&self.log_path)
            .map_err(|e| StorageError::io("open", &self.log_path, e))?;
        file.set_len(len).map_err(|e| StorageError::io("truncate", &self.log_path, e))?;
        sync_log_file(&file, &self.log_path, true)
    }

    /// Extends the active log file to `new_len` bytes of allocated space.
    pub(crate) fn allocate(&self, new_len: u64) -> Result<()> {
        let file = OpenOptions::new()
            .write(true)
            .open(&self.log_path)
            .map_err(|e| StorageError::io("open", &self.log_path, e))?;
        fallocate(&file, &self.log_path, new_len)
    }

    /// Reads whole batches starting with the one that holds `offset`, up to `max_bytes` (the
    /// first batch is always whole), never past `end` (the partition's published end).
    pub(crate) fn read(
        &self,
        offset: u64,
        max_bytes: u64,
        end: u64,
        interval: u32,
        entries_max: usize,
    ) -> Result<Option<Bytes>> {
        let rel = u32::try_from(offset.saturating_sub(self.base_offset)).unwrap_or(u32::MAX);
        let start = self.with_index(interval, entries_max, |idx| idx.floor(rel).map(|e| u64::from(e.pos)))?;
        let map = self.mapping()?;
        let len = self.len();
        let data = map.slice(0, len as usize);
        let mut pos = start.unwrap_or(LOG_HEADER_LEN);
        let mut first = None;
        while pos < len {
            let Some(b) = stored_batch_at(data, pos) else {
                return Err(self.corrupt(pos));
            };
            if b.base_offset >= end {
                break;
            }
            if first.is_none() {
                if b.last_offset >= offset {
                    first = Some(pos);
                }
            } else if pos + b.total_len - first.unwrap_or(pos) > max_bytes {
                break;
            }
            pos += b.total_len;
        }
        Ok(first.filter(|f| *f < pos).map(|f| shared_bytes(&map, f as usize, (pos - f) as usize)))
    }

    /// First `(offset, timestamp)` in this segment whose record timestamp is `>= timestamp`.
    pub(crate) fn find_timestamp(
        &self,
        timestamp: i64,
        end: u64,
        interval: u32,
        entries_max: usize,
    ) -> Result<Option<(u64, i64)>> {
        let start_rel = self.with_index(interval, entries_max, |idx| idx.time_floor(timestamp))?;
        let start_offset = self.base_offset + u64::from(start_rel.unwrap_or(0));
        let rel = u32::try_from(start_offset - self.base_offset).unwrap_or(u32::MAX);
        let start = self.with_index(interval, entries_max, |idx| idx.floor(rel).map(|e| u64::from(e.pos)))?;
        let map = self.mapping()?;
        let len = self.len();
        let data = map.slice(0, len as usize);
        let mut pos = start.unwrap_or(LOG_HEADER_LEN);
        while pos < len {
            let Some(b) = stored_batch_at(data, pos) else {
                return Err(self.corrupt(pos));
            };
            if b.base_offset >= end {
                break;
            }
            if b.max_timestamp >= timestamp {
                let bytes = shared_bytes(&map, pos as usize, b.total_len as usize);
                let batch = RecordBatch::new(bytes).map_err(|_| self.corrupt(pos))?;
                for record in batch.records() {
                    let record = record.map_err(|_| self.corrupt(pos))?;
                    if record.timestamp >= timestamp {
                        return Ok(Some((record.offset as u64, record.timestamp)));
                    }
                }
            }
            pos += b.total_len;
        }
        Ok(None)
    }

    fn corrupt(&self, pos: u64) -> StorageError {
        StorageError::Io {
            op: "read",
            path: self.log_path.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, format!("unreadable batch at byte {pos}")),
        }
    }

    /// Deletes the segment's files. Mappings held by readers stay valid.
    pub(crate) fn delete_files(&self) -> Result<()> {
        #[cfg(test)]
        disk_model::forget(&self.log_path);
        remove_files("delete", &[&self.log_path, &self.index_path, &self.time_path, &self.producers_path])
    }
}

/// Removes files, those already gone included; `op` names the step in an error.
fn remove_files(op: &'static str, paths: &[&Path]) -> Result<()> {
    for path in paths {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StorageError::io(op, path, e)),
        }
    }
    Ok(())
}

/// Extends `file` to at least `len` bytes of allocated (not sparse) space.
pub(crate) fn fallocate(file: &File, path: &Path, len: u64) -> Result<()> {
    let current = file.metadata().map_err(|e| StorageError::io("stat", path, e))?.len();
    if current >= len {
        return Ok(());
    }
    rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), current, len - current).map_err(|e| {
        let e = std::io::Error::from(e);
        StorageError::io("fallocate", path, e)
    })
}

/// Flushes a segment's log file to stable storage: `fdatasync`, or `fsync` when `metadata`
/// changed too. Under test, records what reached the disk for the power-loss model.
pub(crate) fn sync_log_file(file: &File, path: &Path, metadata: bool) -> Result<()> {
    let (what, result) = if metadata { ("fsync", file.sync_all()) } else { ("fdatasync", file.sync_data()) };
    result.map_err(|e| StorageError::io(what, path, e))?;
    #[cfg(test)]
    disk_model::synced(path, file.metadata().map_or(0, |m| m.len()));
    Ok(())
}

/// Writes `data` to `path` atomically: temp file, fsync, rename, fsync of the directory.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("{}.tmp", path.extension().and_then(|e| e.to_str()).unwrap_or("")));
    let mut f = File::create(&tmp).map_err(|e| StorageError::io("create", &tmp, e))?;
    f.write_all(data).map_err(|e| StorageError::io("write", &tmp, e))?;
    f.sync_all().map_err(|e| StorageError::io("fsync", &tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| StorageError::io("rename", path, e))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// fsyncs a directory so that entries created or renamed in it survive a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    match File::open(dir).and_then(|d| d.sync_all()) {
        Ok(()) => Ok(()),
        // Nothing can have changed in a directory on a read-only filesystem.
        Err(e) if super::error::is_read_only(&e) => Ok(()),
        Err(e) => Err(StorageError::io("fsync directory", dir, e)),
    }
}

/// Wall-clock milliseconds since the epoch.
pub(crate) fn now_ms_wall() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// What reached stable storage, by file, as the tests' power-loss model sees it: the length of
/// each log file at its last successful sync. Independent of what the storage engine believes.
#[cfg(test)]
pub(crate) mod disk_model {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    static DURABLE: Mutex<Option<HashMap<PathBuf, u64>>> = Mutex::new(None);

    /// A sync of `path` succeeded while the file was `len` bytes long.
    pub(crate) fn synced(path: &Path, len: u64) {
        DURABLE.lock().unwrap().get_or_insert_with(HashMap::new).insert(path.to_owned(), len);
    }

    /// `path` was created afresh (or removed): nothing of it is durable yet.
    pub(crate) fn forget(path: &Path) {
        DURABLE.lock().unwrap().get_or_insert_with(HashMap::new).remove(path);
    }

    /// Bytes of `path` a power loss keeps; 0 when it was never synced.
    pub(crate) fn durable_len(path: &Path) -> u64 {
        DURABLE.lock().unwrap().as_ref().and_then(|m| m.get(path).copied()).unwrap_or(0)
    }
}
