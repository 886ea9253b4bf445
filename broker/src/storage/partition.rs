//! A partition's log: an ordered list of segments, the last one active.
//!
//! One appender at a time (the append lock); readers never take it. Readers see a batch only once
//! all of its bytes are in the mapping: the end offset is published last (release store, acquire
//! load). Syncs run on the flusher thread and never hold the append lock while waiting for disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use cairn_protocol::record_batch::validate_for_append;

use super::config::TopicConfig;
use super::error::{Result, StorageError};
use super::recovery::{recover_partition, RecoveredLog};
use super::segment::{sync_dir, Segment, LOG_HEADER_LEN};
use super::Shared;

/// The last batch appended by an idempotent producer (producer id >= 0), for deduplication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ProducerState {
    epoch: i16,
    base_sequence: i32,
    record_count: i32,
    base_offset: u64,
}

/// Producers remembered per partition; the least recently seen are forgotten past this.
const PRODUCERS_MAX: usize = 10_000;

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendInfo {
    /// Offset given to the batch's first record.
    pub base_offset: u64,
    /// The batch repeated the last batch of its producer (same producer id, epoch and
    /// sequence): nothing was appended, and the offsets are those of the original.
    pub duplicate: bool,
    /// Offset after the batch's last record (the new log end).
    pub next_offset: u64,
    /// Broker time of the append, ms since the epoch.
    pub append_time_ms: i64,
    /// First offset still in the log.
    pub log_start_offset: u64,
}

/// Whole batches read from a partition.
#[derive(Debug, Clone, Default)]
pub struct ReadResult {
    /// Zero-copy slices of the segment mappings; concatenated they are whole batches.
    pub chunks: Vec<Bytes>,
    /// First offset in the log.
    pub log_start_offset: u64,
    /// Offset after the last record.
    pub log_end_offset: u64,
    /// Later segments hold records past these: a read returns one segment's batches, so
    /// reading again at once returns more (a fetch short of `min_bytes` need not wait).
    pub more_after: bool,
}

impl ReadResult {
    /// Bytes read.
    pub fn len(&self) -> usize {
        self.chunks.iter().map(Bytes::len).sum()
    }

    /// `true` when nothing was read.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What retention removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionOutcome {
    /// Segments deleted.
    pub segments: usize,
    /// Bytes deleted.
    pub bytes: u64,
}

#[derive(Debug)]
struct Appender {
    /// Allocated length of the active segment's file.
    allocated: u64,
    /// Next preallocation step.
    prealloc_step: u64,
    /// Sealed segments whose indexes and trim the flusher has yet to persist.
    pending_seal: Vec<Arc<Segment>>,
    /// A segment file was created since the last directory fsync.
    dir_dirty: bool,
    /// Idempotent producers' last batches, by producer id.
    producers: HashMap<i64, ProducerState>,
}

/// One topic-partition's log.
#[derive(Debug)]
pub struct PartitionLog {
    topic: String,
    partition: u32,
    dir: PathBuf,
    config: TopicConfig,
    shared: Arc<Shared>,
    segments: RwLock<Arc<Vec<Arc<Segment>>>>,
    appender: Mutex<Appender>,
    sync_lock: Mutex<()>,
    log_start: AtomicU64,
    end_offset: AtomicU64,
    durable_offset: AtomicU64,
    /// When unsynced data first appeared (ms), 0 when everything is synced.
    dirty_since_ms: AtomicI64,
    poisoned: AtomicBool,
    /// Its topic was deleted ([`PartitionLog::destroy`]): a produce or fetch that looked it up
    /// just before hears of an unknown topic, not of a storage fault.
    deleted: AtomicBool,
}

impl PartitionLog {
    /// Opens (recovering if needed) or creates the partition in `dir`.
    pub(crate) fn open(
        topic: &str,
        partition: u32,
        dir: PathBuf,
        config: TopicConfig,
        shared: Arc<Shared>,
        recovery: Option<(bool, u64)>,
    ) -> Result<(PartitionLog, RecoveredLog)> {
        std::fs::create_dir_all(&dir).map_err(|e| StorageError::io("create directory", &dir, e))?;
        let capacity = Self::capacity(&config);
        let recovered = recover_partition(&dir, capacity, &shared, recovery, shared.now_ms())?;
        let active = recovered.segments.last().expect("recovery leaves at least one segment");
        let end = active.next_offset();
        let start = recovered.segments[0].base_offset;
        let log = PartitionLog {
            topic: topic.to_owned(),
            partition,
            dir,
            config,
            segments: RwLock::new(Arc::new(recovered.segments.clone())),
            appender: Mutex::new(Appender {
                allocated: recovered.allocated,
                prealloc_step: shared.config.preallocate_bytes_min,
                pending_seal: Vec::new(),
                dir_dirty: false,
                producers: producer_states(&recovered.segments),
            }),
            shared,
            sync_lock: Mutex::new(()),
            log_start: AtomicU64::new(start),
            end_offset: AtomicU64::new(end),
            durable_offset: AtomicU64::new(end),
            dirty_since_ms: AtomicI64::new(0),
            poisoned: AtomicBool::new(false),
            deleted: AtomicBool::new(false),
        };
        Ok((log, recovered))
    }

    fn capacity(config: &TopicConfig) -> u64 {
        config.segment_bytes.max(LOG_HEADER_LEN + u64::from(config.batch_bytes_max))
    }

    /// Topic name.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Partition index.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// The partition's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The topic configuration in force.
    pub fn config(&self) -> &TopicConfig {
        &self.config
    }

    /// First offset still in the log.
    pub fn log_start_offset(&self) -> u64 {
        self.log_start.load(Ordering::Acquire)
    }

    /// Offset the next record will get.
    pub fn log_end_offset(&self) -> u64 {
        self.end_offset.load(Ordering::Acquire)
    }

    /// Every offset below this is on stable storage.
    pub fn durable_offset(&self) -> u64 {
        self.durable_offset.load(Ordering::Acquire)
    }

    /// Bytes of batches in all segments.
    pub fn size_bytes(&self) -> u64 {
        self.segments().iter().map(|s| s.data_bytes()).sum()
    }

    /// Number of segments.
    pub fn segment_count(&self) -> usize {
        self.segments().len()
    }

    /// Segments holding a mapping or an index in memory (for the open-segments budget).
    pub(crate) fn mapped_segments(&self) -> Vec<Arc<Segment>> {
        // An index in memory counts too: segments recovery scanned hold one without a mapping.
        self.segments().iter().filter(|s| s.is_mapped() || (s.is_sealed() && s.has_index())).cloned().collect()
    }

    pub(crate) fn segments(&self) -> Arc<Vec<Arc<Segment>>> {
        Arc::clone(&self.segments.read().expect("segments lock"))
    }

    fn name(&self) -> String {
        format!("{}-{}", self.topic, self.partition)
    }

    /// Appends one record batch (exactly as the producer encoded it) after validating its length,
    /// CRC and records; stamps the next offset into its header. Not durable until synced.
    ///
    /// # Errors
    /// [`StorageError::InvalidBatch`] (nothing written), [`StorageError::StorageFull`] (nothing
    /// written), [`StorageError::Poisoned`] after a failed sync, or an I/O error.
    pub fn append(&self, batch: &[u8]) -> Result<AppendInfo> {
        let header = validate_for_append(batch, self.config.batch_bytes_max as usize)?;
        self.check_deleted()?;
        if self.poisoned.load(Ordering::Acquire) {
            return Err(StorageError::Poisoned(self.name()));
        }
        self.shared.disk.check()?;
        let now = self.shared.now_ms();
        let len = batch.len() as u64;
        let count = header.record_count as u64;
        let mut ap = self.appender.lock().expect("append lock");
        // Deleted while this waited for the lock: nothing may be written into its files.
        self.check_deleted()?;
        let base = self.end_offset.load(Ordering::Acquire);
        if header.producer_id >= 0 {
            if let Some(last) = ap.producers.get(&header.producer_id) {
                let same = last.epoch == header.producer_epoch && last.base_sequence == header.base_sequence;
                if same && last.record_count == header.record_count {
                    // A retry of a batch that is already stored (its acknowledgement was lost).
                    return Ok(AppendInfo {
                        base_offset: last.base_offset,
                        duplicate: true,
                        next_offset: last.base_offset + count,
                        append_time_ms: now,
                        log_start_offset: self.log_start_offset(),
                    });
                }
                let older = last.epoch == header.producer_epoch
                    && header.base_sequence.wrapping_sub(last.base_sequence) < 0
                    && last.base_sequence.wrapping_sub(header.base_sequence) < (1 << 30);
                if older {
                    return Err(StorageError::InvalidBatch(cairn_protocol::BatchError::UnsupportedFeature(
                        "sequence older than the producer's last stored batch (duplicate of an earlier batch)",
                    )));
                }
            }
        }
        let mut active = Arc::clone(self.segments().last().expect("at least one segment"));
        if self.needs_roll(&active, len, count, now) {
            active = self.roll(&mut ap, now)?;
        }
        let end_pos = active.len() + len;
        if end_pos > ap.allocated {
            let step = ap.prealloc_step;
            let target = end_pos.max(ap.allocated + step).min(active.capacity());
            active.allocate(target)?;
            ap.allocated = target;
            ap.prealloc_step = (step * 2).min(self.shared.config.preallocate_bytes_max);
            self.shared.disk.refresh();
        }
        self.shared.note_mapped(&active);
        let rel = (base - active.base_offset) as u32;
        let pos = active.len();
        let interval = self.shared.config.index_interval_bytes;
        let entries_max = self.shared.config.index_entries_max();
        active.write_batch(batch, base)?;
        let indexed = active.with_index_mut(|idx| {
            idx.on_batch(rel, pos as u32, len as u32, header.max_timestamp, interval, entries_max)
        });
        debug_assert!(indexed, "needs_roll checks for a full index");

        if header.producer_id >= 0 {
            remember_producer(
                &mut ap.producers,
                header.producer_id,
                ProducerState {
                    epoch: header.producer_epoch,
                    base_sequence: header.base_sequence,
                    record_count: header.record_count,
                    base_offset: base,
                },
            );
        }
        active.publish(pos + len, base + count, header.max_timestamp);
        self.end_offset.store(base + count, Ordering::Release);
        let _ = self.dirty_since_ms.compare_exchange(0, now.max(1), Ordering::AcqRel, Ordering::Relaxed);
        drop(ap);
        Ok(AppendInfo {
            base_offset: base,
            duplicate: false,
            next_offset: base + count,
            append_time_ms: now,
            log_start_offset: self.log_start_offset(),
        })
    }

    fn needs_roll(&self, active: &Segment, len: u64, count: u64, now: i64) -> bool {
        if active.is_empty() {
            return false;
        }
        let entries_max = self.shared.config.index_entries_max();
        active.len() + len > self.config.segment_bytes
            || now.saturating_sub(active.created_ms) >= self.config.segment_ms as i64
            || active.with_index_mut(|idx| idx.is_full(entries_max))
            || active.next_offset() + count - active.base_offset > u64::from(u32::MAX)
    }

    /// Seals the active segment and starts a new one at the log end. The flusher persists the
    /// sealed segment's indexes and trims it.
    fn roll(&self, ap: &mut Appender, now: i64) -> Result<Arc<Segment>> {
        // Deleted (checked under the append lock, which destroy takes): its directory may
        // already belong to a topic of the same name created since.
        self.check_deleted()?;
        let base = self.end_offset.load(Ordering::Acquire);
        let cfg = &self.shared.config;
        // A partition that filled a segment is busy: start the next one with the step it had
        // reached instead of at the minimum. Each extension is a metadata change that makes
        // the next fdatasync commit the filesystem journal; eleven of them right after every
        // roll showed up as acks=all latency spikes.
        let prealloc = ap.prealloc_step.max(cfg.preallocate_bytes_min);
        let (seg, allocated) = Segment::create(&self.dir, base, Self::capacity(&self.config), prealloc, now)?;
        // The preallocation took up to `preallocate_bytes_max`: appends are held to the floor
        // from the new figure, not from the last periodic one.
        self.shared.disk.refresh();
        let seg = Arc::new(seg);
        self.shared.note_mapped(&seg);
        let mut segments = self.segments.write().expect("segments lock");
        let mut next = Vec::clone(&segments);
        if let Some(old) = next.last() {
            old.seal();
            // Its producer states let a restart start from here instead of scanning the log.
            old.set_producers_at_end(encode_producers(&ap.producers));
            ap.pending_seal.push(Arc::clone(old));
        }
        next.push(Arc::clone(&seg));
        *segments = Arc::new(next);
        ap.allocated = allocated;
        ap.dir_dirty = true;
        // The sealed segment's seal is finished by the next sync; on an idle partition only the
        // flusher will run one, and it looks only at partitions marked dirty.
        let _ = self.dirty_since_ms.compare_exchange(0, now.max(1), Ordering::AcqRel, Ordering::Relaxed);
        tracing::debug!(partition = %self.name(), base_offset = base, "rolled to a new segment");
        Ok(seg)
    }

    /// Reads whole batches from `offset`, up to `max_bytes` (the first batch is always whole).
    /// Reading at the log end returns nothing.
    ///
    /// # Errors
    /// [`StorageError::OffsetOutOfRange`] below the log start or above the log end.
    pub fn read(&self, offset: u64, max_bytes: u64) -> Result<ReadResult> {
        self.check_deleted()?;
        match self.read_segments(offset, max_bytes) {
            // Deleted under the reader: its segments were unmapped and removed.
            Err(_) if self.deleted.load(Ordering::Acquire) => Err(self.unknown()),
            r => r,
        }
    }

    /// [`PartitionLog::read`] of a partition that is not deleted.
    fn read_segments(&self, offset: u64, max_bytes: u64) -> Result<ReadResult> {
        let end = self.log_end_offset();
        let start = self.log_start_offset();
        let out_of_range = || StorageError::OffsetOutOfRange { offset, log_start: start, log_end: end };
        if offset < start || offset > end {
            return Err(out_of_range());
        }
        let mut result =
            ReadResult { chunks: Vec::new(), log_start_offset: start, log_end_offset: end, more_after: false };
        if offset == end {
            return Ok(result);
        }
        let segments = self.segments();
        if segments.first().is_some_and(|s| s.base_offset > offset) {
            // Retention deleted the segment holding `offset` since the log start was read: the
            // reader must hear so, not be served the new first segment's batches.
            return Err(StorageError::OffsetOutOfRange {
                offset,
                log_start: self.log_start_offset(),
                log_end: self.log_end_offset(),
            });
        }
        let i = segments.partition_point(|s| s.base_offset <= offset).saturating_sub(1);
        let interval = self.shared.config.index_interval_bytes;
        let entries_max = self.shared.config.index_entries_max();
        for seg in &segments[i..] {
            if seg.next_offset() <= offset {
                continue;
            }
            self.shared.touch(seg);
            match seg.read(offset, max_bytes, end, interval, entries_max) {
                Ok(Some(bytes)) => {
                    result.chunks.push(bytes);
                    // A sealed segment ends before the log does.
                    result.more_after = seg.next_offset() < end;
                    break;
                }
                Ok(None) => continue,
                // Retention may delete a segment between our snapshot and opening it.
                Err(e) if self.log_start_offset() > offset => {
                    tracing::debug!(error = %e, "segment deleted under a reader");
                    return Err(StorageError::OffsetOutOfRange {
                        offset,
                        log_start: self.log_start_offset(),
                        log_end: self.log_end_offset(),
                    });
                }
                Err(e) => return Err(e),
            }
        }
        Ok(result)
    }

    /// The first offset whose record timestamp is `>= timestamp`, with that timestamp; `None` if
    /// no record is that late.
    ///
    /// # Errors
    /// I/O errors reading segments.
    pub fn offset_for_timestamp(&self, timestamp: i64) -> Result<Option<(u64, i64)>> {
        let interval = self.shared.config.index_interval_bytes;
        let entries_max = self.shared.config.index_entries_max();
        // Retention may delete segments of the list taken here while the lookup runs; then the
        // answer is in a later one, maybe one the list does not hold yet: look again.
        for _ in 0..3 {
            // The list first, then the end: an end read before the list could be below every
            // segment of it (appends and retention ran in between), and each would find nothing.
            let segments = self.segments();
            let end = self.log_end_offset();
            let mut deleted_under_us = false;
            for seg in segments.iter() {
                if seg.max_timestamp().is_none_or(|m| m < timestamp) {
                    continue;
                }
                match seg.find_timestamp(timestamp, end, interval, entries_max) {
                    Ok(Some(found)) => return Ok(Some(found)),
                    Ok(None) => {}
                    Err(e) if seg.next_offset() <= self.log_start_offset() => {
                        tracing::debug!(error = %e, "segment deleted under a timestamp lookup");
                        deleted_under_us = true;
                    }
                    Err(e) => return Err(e),
                }
            }
            if !deleted_under_us {
                return Ok(None);
            }
        }
        Err(StorageError::Io {
            op: "timestamp lookup",
            path: self.dir.clone(),
            source: std::io::Error::other("segments kept being deleted under the lookup; try again"),
        })
    }

    /// Test hook: holds off every sync of this partition while the guard lives, as a slow disk would.
    #[cfg(test)]
    pub(crate) fn hold_syncs(&self) -> std::sync::MutexGuard<'_, ()> {
        self.sync_lock.lock().expect("sync lock")
    }

    /// Makes everything appended so far durable: finishes pending seals, fsyncs the directory if
    /// a segment was created, msyncs the active segment. Returns the new durable offset.
    ///
    /// A failure poisons the partition: after a failed fsync the kernel may have dropped dirty
    /// pages, so nothing written since the last good sync can be trusted to be on disk.
    ///
    /// # Errors
    /// The sync failure, or [`StorageError::Poisoned`] if an earlier sync failed.
    pub fn sync(&self) -> Result<u64> {
        let _serial = self.sync_lock.lock().expect("sync lock");
        self.check_deleted()?;
        if self.poisoned.load(Ordering::Acquire) {
            return Err(StorageError::Poisoned(self.name()));
        }
        let target = self.log_end_offset();
        let (pending, dir_dirty, active) = {
            let mut ap = self.appender.lock().expect("append lock");
            if self.durable_offset() >= target && ap.pending_seal.is_empty() && !ap.dir_dirty {
                return Ok(self.durable_offset());
            }
            let active = Arc::clone(self.segments().last().expect("at least one segment"));
            (std::mem::take(&mut ap.pending_seal), std::mem::take(&mut ap.dir_dirty), active)
        };
        let started = std::time::Instant::now();
        let interval = self.shared.config.index_interval_bytes;
        let entries_max = self.shared.config.index_entries_max();
        // Data syncs are critical: a failure poisons the partition. Index files of sealed
        // segments are best effort and retried at the next sync (the data is already durable).
        let mut unfinished = Vec::new();
        let result = (|| {
            #[cfg(test)]
            if self.shared.fail_next_sync.swap(false, Ordering::AcqRel) {
                return Err(StorageError::io("fdatasync", self.dir.clone(), std::io::Error::from_raw_os_error(5)));
            }
            for seg in &pending {
                seg.sync()?;
            }
            if dir_dirty {
                sync_dir(&self.dir)?;
            }
            active.sync()
        })();
        if result.is_ok() {
            for seg in pending {
                if let Err(e) = seg.persist_index(interval, entries_max) {
                    metrics::counter!("cairn_storage_errors_total", "kind" => e.kind()).increment(1);
                    tracing::warn!(segment = %seg.log_path().display(), error = %e, "could not persist a sealed segment's index; will retry");
                    unfinished.push(seg);
                }
            }
        }
        let seals_left = !unfinished.is_empty();
        if seals_left {
            self.appender.lock().expect("append lock").pending_seal.splice(0..0, unfinished);
        }
        metrics::histogram!("cairn_flush_duration_seconds").record(started.elapsed().as_secs_f64());
        if let Err(e) = result {
            self.poisoned.store(true, Ordering::Release);
            metrics::counter!("cairn_storage_errors_total", "kind" => "fsync").increment(1);
            tracing::error!(partition = %self.name(), error = %e, "sync failed; partition is read-only until restart");
            return Err(e);
        }
        self.durable_offset.fetch_max(target, Ordering::AcqRel);
        let now = self.shared.now_ms().max(1);
        // Decided under the append lock, which appends and rolls hold while they mark the
        // partition dirty: one landing between this check and the mark would otherwise be
        // undone, and the flusher would not look at the partition again until the next append.
        // Unfinished seals (and a roll since `pending` was taken) keep it dirty too.
        let ap = self.appender.lock().expect("append lock");
        let still_dirty = self.log_end_offset() > target || !ap.pending_seal.is_empty() || ap.dir_dirty;
        #[cfg(test)]
        if let Some(hook) = self.shared.before_marking_clean.lock().expect("hook").take() {
            hook();
        }
        self.dirty_since_ms.store(if still_dirty { now } else { 0 }, Ordering::Release);
        drop(ap);
        Ok(target)
    }

    /// Whether unsynced data is older than the topic's `flush_interval_ms` at `now_ms`.
    pub(crate) fn flush_due(&self, now_ms: i64) -> bool {
        // A partition whose sync failed stays dirty but cannot be synced again until restart:
        // retried on every pass, the failure would be logged many times a second.
        if self.poisoned.load(Ordering::Acquire) {
            return false;
        }
        let since = self.dirty_since_ms.load(Ordering::Acquire);
        since != 0 && now_ms - since >= self.config.flush_interval_ms as i64
    }

    /// Deletes sealed segments past the topic's retention (by their newest record's timestamp,
    /// or beyond `retention_bytes`), oldest first. If the active segment alone breaches
    /// retention, rolls it so it can go next time. Never blocks appends for long: only the
    /// segment list swap takes a lock.
    ///
    /// # Errors
    /// I/O errors deleting files or rolling.
    pub fn apply_retention(&self, now_ms: i64) -> Result<RetentionOutcome> {
        self.check_deleted()?;
        let segments = self.segments();
        let total: u64 = segments.iter().map(|s| s.data_bytes()).sum();
        // A segment's age: its newest record timestamp, or when it was created (opened, after a
        // restart) if its batches carry none (-1, Kafka's NO_TIMESTAMP), which would otherwise
        // read as expired at once. Nor does a segment of `i64::MIN` timestamps (read back as no
        // timestamp at all) count as never expiring: retention would stop at it for good.
        let newest = |s: &Segment| s.max_timestamp().filter(|t| *t >= 0).unwrap_or(s.created_ms);
        let expired =
            |s: &Segment| self.config.retention_ms.is_some_and(|r| newest(s).saturating_add(r.get() as i64) < now_ms);
        let mut remaining = total;
        let mut doomed = 0;
        for seg in &segments[..segments.len() - 1] {
            let over_size = self.config.retention_bytes.is_some_and(|r| remaining > r.get());
            if !(expired(seg) || over_size) || !seg.is_seal_finished() {
                break;
            }
            remaining -= seg.data_bytes();
            doomed += 1;
        }
        let outcome = self.remove_leading_segments(doomed)?;
        if outcome.segments > 0 {
            tracing::info!(partition = %self.name(), segments = outcome.segments, bytes = outcome.bytes,
                log_start_offset = self.log_start_offset(), "retention deleted segments");
        }
        let segments = self.segments();
        let active = segments.last().expect("at least one segment");
        let active_breaches = !active.is_empty()
            && (expired(active) || self.config.retention_bytes.is_some_and(|r| active.data_bytes() > r.get()));
        if active_breaches {
            let mut ap = self.appender.lock().expect("append lock");
            let current = Arc::clone(self.segments().last().expect("at least one segment"));
            if Arc::ptr_eq(&current, active) {
                self.roll(&mut ap, now_ms)?;
            }
        }
        Ok(outcome)
    }

    /// Seals the active segment now (if it holds data) and returns the base offset of the new one.
    ///
    /// # Errors
    /// I/O errors creating the new segment.
    pub fn roll_now(&self) -> Result<u64> {
        let mut ap = self.appender.lock().expect("append lock");
        let active = Arc::clone(self.segments().last().expect("at least one segment"));
        if !active.is_empty() {
            self.roll(&mut ap, self.shared.now_ms())?;
        }
        Ok(self.log_end_offset())
    }

    /// Deletes every segment that ends at or before `offset` (whole segments only; their seals
    /// must be finished, so call [`PartitionLog::sync`] first) and moves the log start.
    ///
    /// # Errors
    /// I/O errors deleting files.
    pub fn delete_segments_below(&self, offset: u64) -> Result<RetentionOutcome> {
        let segments = self.segments();
        let doomed = segments[..segments.len() - 1]
            .iter()
            .take_while(|s| s.next_offset() <= offset && s.is_seal_finished())
            .count();
        self.remove_leading_segments(doomed)
    }

    /// Removes the first `count` segments (never the active one): swaps the segment list,
    /// moves the log start, then deletes their files. Readers holding them keep their mappings.
    fn remove_leading_segments(&self, count: usize) -> Result<RetentionOutcome> {
        if count == 0 {
            return Ok(RetentionOutcome::default());
        }
        // Under the sync lock, which destroy takes first: a partition whose topic was deleted
        // (and maybe created again, with new files at the same paths) deletes nothing, and a
        // deletion under way finishes before destroy starts. Appends do not take it, so they go
        // on while files are unlinked and the directory synced; the append lock is held only
        // for the swap of the segment list (same order as `sync`: sync lock, then append lock).
        let _serial = self.sync_lock.lock().expect("sync lock");
        let removed: Vec<Arc<Segment>> = {
            let _ap = self.appender.lock().expect("append lock");
            self.check_deleted()?;
            let mut list = self.segments.write().expect("segments lock");
            let count = count.min(list.len() - 1);
            let next: Vec<_> = list[count..].to_vec();
            let removed = list[..count].to_vec();
            self.log_start.store(next[0].base_offset, Ordering::Release);
            *list = Arc::new(next);
            removed
        };
        #[cfg(test)]
        if let Some(hook) = self.shared.while_deleting_segments.lock().expect("hook").take() {
            hook();
        }
        let mut outcome = RetentionOutcome::default();
        for seg in removed {
            outcome.segments += 1;
            outcome.bytes += seg.data_bytes();
            seg.evict();
            seg.delete_files()?;
        }
        sync_dir(&self.dir)?;
        Ok(outcome)
    }

    /// Clean shutdown of this partition: sync everything, persist the active segment's indexes
    /// and trim its preallocated tail. Returns the log end offset, which becomes its recovery point.
    ///
    /// # Errors
    /// Sync or I/O failures.
    pub(crate) fn close(&self) -> Result<u64> {
        self.sync()?;
        let _ap = self.appender.lock().expect("append lock");
        let active = Arc::clone(self.segments().last().expect("at least one segment"));
        let interval = self.shared.config.index_interval_bytes;
        let entries_max = self.shared.config.index_entries_max();
        active.seal();
        active.finish_seal(interval, entries_max)?;
        Ok(self.log_end_offset())
    }

    /// The error for a partition whose topic was deleted.
    fn unknown(&self) -> StorageError {
        StorageError::UnknownTopic(self.topic.clone())
    }

    fn check_deleted(&self) -> Result<()> {
        if self.deleted.load(Ordering::Acquire) {
            return Err(self.unknown());
        }
        Ok(())
    }

    /// Unmaps every segment and deletes the partition's directory (topic deletion).
    pub(crate) fn destroy(&self) -> Result<()> {
        // A sync under way works on files by path once it has let appends go on: it must finish
        // first, or it could cut or index the files of a topic created again at the same paths.
        // Same order as `sync` (sync lock, then append lock).
        let _serial = self.sync_lock.lock().expect("sync lock");
        let _ap = self.appender.lock().expect("append lock");
        self.deleted.store(true, Ordering::Release);
        self.poisoned.store(true, Ordering::Release);
        for seg in self.segments().iter() {
            seg.evict();
        }
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StorageError::io("delete directory", &self.dir, e)),
        }
    }
}

fn remember_producer(map: &mut HashMap<i64, ProducerState>, id: i64, state: ProducerState) {
    map.insert(id, state);
    if map.len() > PRODUCERS_MAX {
        // Forget the producer whose last batch is oldest.
        if let Some(oldest) = map.iter().min_by_key(|(_, s)| s.base_offset).map(|(id, _)| *id) {
            map.remove(&oldest);
        }
    }
}

/// Magic of a `.producers` file: idempotent producers' last batches as of a segment's end.
const PRODUCERS_MAGIC: &[u8; 4] = b"CPS1";
/// Bytes of one entry: producer id, epoch, base sequence, record count, base offset.
const PRODUCER_ENTRY_LEN: usize = 8 + 2 + 4 + 4 + 8;

/// Encodes producer states: magic, count, entries, CRC32C of everything before it.
fn encode_producers(map: &HashMap<i64, ProducerState>) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + map.len() * PRODUCER_ENTRY_LEN + 4);
    out.extend_from_slice(PRODUCERS_MAGIC);
    out.extend_from_slice(&(map.len() as u32).to_be_bytes());
    for (id, s) in map {
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&s.epoch.to_be_bytes());
        out.extend_from_slice(&s.base_sequence.to_be_bytes());
        out.extend_from_slice(&s.record_count.to_be_bytes());
        out.extend_from_slice(&s.base_offset.to_be_bytes());
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

/// Decodes what [`encode_producers`] wrote; `None` for anything damaged.
fn decode_producers(data: &[u8]) -> Option<HashMap<i64, ProducerState>> {
    let (body, crc) = data.split_at_checked(data.len().checked_sub(4)?)?;
    if crc32c::crc32c(body).to_be_bytes() != crc || body.get(..4)? != PRODUCERS_MAGIC {
        return None;
    }
    let count = u32::from_be_bytes(body.get(4..8)?.try_into().ok()?) as usize;
    let entries = &body[8..];
    if entries.len() != count.checked_mul(PRODUCER_ENTRY_LEN)? {
        return None;
    }
    let mut map = HashMap::with_capacity(count);
    for e in entries.chunks_exact(PRODUCER_ENTRY_LEN) {
        let id = i64::from_be_bytes(e[0..8].try_into().ok()?);
        let state = ProducerState {
            epoch: i16::from_be_bytes(e[8..10].try_into().ok()?),
            base_sequence: i32::from_be_bytes(e[10..14].try_into().ok()?),
            record_count: i32::from_be_bytes(e[14..18].try_into().ok()?),
            base_offset: u64::from_be_bytes(e[18..26].try_into().ok()?),
        };
        remember_producer(&mut map, id, state);
    }
    Some(map)
}

/// Rebuilds idempotent producers' last batches at open. A producer's last batch may lie any
/// number of segments back (others kept appending while its acknowledgement was delayed), so
/// this starts from the producer states the newest finished seal wrote, as of its segment's
/// end, and scans the segments after it. Without any (a log whose seals never finished), it
/// scans the last two segments.
fn producer_states(segments: &[Arc<Segment>]) -> HashMap<i64, ProducerState> {
    let sealed = segments.len().saturating_sub(1);
    let snapshot = segments[..sealed]
        .iter()
        .enumerate()
        .rev()
        .find_map(|(i, seg)| seg.read_producers_at_end().and_then(|d| decode_producers(&d)).map(|m| (i, m)));
    let (mut map, from) = match snapshot {
        Some((i, map)) => (map, i + 1),
        None => (HashMap::new(), segments.len().saturating_sub(2)),
    };
    for seg in &segments[from..] {
        let Ok(map_bytes) = seg.mapping() else { continue };
        let len = seg.len() as usize;
        let data = map_bytes.slice(0, len);
        let mut pos = LOG_HEADER_LEN;
        while let Some(b) = super::segment::stored_batch_at(data, pos) {
            let at = pos as usize;
            let id = i64::from_be_bytes(data[at + 43..at + 51].try_into().expect("8 bytes"));
            if id >= 0 {
                let state = ProducerState {
                    epoch: i16::from_be_bytes(data[at + 51..at + 53].try_into().expect("2 bytes")),
                    base_sequence: i32::from_be_bytes(data[at + 53..at + 57].try_into().expect("4 bytes")),
                    record_count: i32::from_be_bytes(data[at + 57..at + 61].try_into().expect("4 bytes")),
                    base_offset: b.base_offset,
                };
                remember_producer(&mut map, id, state);
            }
            pos += b.total_len;
        }
    }
    map
}

#[cfg(test)]
mod producer_file_tests {
    use super::*;

    #[test]
    fn producer_states_round_trip_and_any_damage_is_refused() {
        let mut map = HashMap::new();
        for id in 0..50i64 {
            let state =
                ProducerState { epoch: id as i16, base_sequence: id as i32 * 3, record_count: 7, base_offset: 1 << 40 };
            map.insert(id, state);
        }
        let encoded = encode_producers(&map);
        assert_eq!(decode_producers(&encoded), Some(map.clone()));
        assert_eq!(decode_producers(&encode_producers(&HashMap::new())), Some(HashMap::new()));
        for at in [0, 5, 20, encoded.len() - 1] {
            let mut bad = encoded.clone();
            bad[at] ^= 1;
            assert_eq!(decode_producers(&bad), None, "a flipped bit at {at}");
        }
        for len in [0, 3, 8, encoded.len() - 1] {
            assert_eq!(decode_producers(&encoded[..len]), None, "cut to {len} bytes");
        }
    }
}
