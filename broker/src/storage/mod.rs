//! The storage engine: a memory-mapped, segmented log per topic-partition.
//!
//! Synchronous code with no sockets and no async: handlers translate protocol requests into
//! calls on [`LogStore`] and [`PartitionLog`].
//!
//! Data directory layout:
//!
//! ```text
//! <data_dir>/
//!   .lock                     advisory lock: one broker per data directory
//!   topics.json               topic names, partition counts and configs (atomically replaced)
//!   recovery-points           checkpoint of per-partition recovery points (see checkpoint.rs)
//!   clean-shutdown            present only between a clean shutdown and the next start
//!   <topic>-<partition>/      one directory per partition
//!     00000000000000000000.log / .index / .timeindex
//! ```

mod checkpoint;
mod config;
mod disk;
mod error;
mod flusher;
mod index;
mod mmap;
mod partition;
mod recovery;
mod segment;
#[cfg(test)]
mod tests;
mod topics;
pub(crate) use topics::validate_name as validate_topic_name;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

pub use config::{CleanupPolicy, StorageConfig, TopicConfig};
pub use disk::DiskMonitor;
pub use error::{Result, StorageError};
pub use flusher::FlushDone;
pub use partition::{AppendInfo, PartitionLog, ReadResult, RetentionOutcome};

use flusher::FlushRequest;
use segment::Segment;

/// A source of wall-clock time in ms since the epoch (injectable for tests).
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(segment::now_ms_wall)
}

/// Scans the bytes of a `.log` segment file the way recovery does (header, then each batch's
/// length, magic, attributes, CRC32C and offset sequence, stopping at the first zero length or
/// damaged batch). Returns `(valid_len, next_offset)`. For fuzzing and offline tools.
pub fn scan_log_bytes(data: &[u8], base_offset: u64) -> (u64, u64) {
    let scan = segment::scan_log(data, base_offset, 4096, 1 << 20);
    (scan.valid_len, scan.next_offset)
}

/// A topic and its partitions.
#[derive(Debug)]
pub struct Topic {
    /// Topic name.
    pub name: String,
    /// Effective configuration.
    pub config: TopicConfig,
    /// Partitions, index = partition number.
    pub partitions: Vec<Arc<PartitionLog>>,
    /// Internal topics (names starting with `__`) are hidden from normal listings.
    pub internal: bool,
}

/// What opening the store found and did.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    /// Whether the last stop was clean (no scan needed).
    pub clean: bool,
    /// Partitions opened.
    pub partitions: usize,
    /// Segments whose batches were scanned.
    pub scanned_segments: usize,
    /// Bytes of torn or corrupt data cut.
    pub truncated_bytes: u64,
    /// Time taken.
    pub duration: Duration,
}

/// State shared by every partition of a store.
pub(crate) struct Shared {
    pub(crate) config: StorageConfig,
    pub(crate) disk: DiskMonitor,
    clock: Clock,
    tick: AtomicU64,
    /// Test hook: make the next data sync fail as an fsync error would.
    #[cfg(test)]
    pub(crate) fail_next_sync: AtomicBool,
    /// Test hook: runs once in a sync, between its check of the log end and its marking the
    /// partition clean.
    #[cfg(test)]
    #[allow(clippy::type_complexity)]
    pub(crate) before_marking_clean: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Test hook: runs once when retention deletes segments, after the segment list was swapped
    /// and before the files are deleted, as a slow unlink or directory fsync would take.
    #[cfg(test)]
    #[allow(clippy::type_complexity)]
    pub(crate) while_deleting_segments: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn now_ms(&self) -> i64 {
        (self.clock)()
    }

    /// Marks a segment as just used (for least-recently-used eviction).
    pub(crate) fn touch(&self, seg: &Segment) {
        seg.last_used.store(self.tick.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
    }

    pub(crate) fn note_mapped(&self, seg: &Segment) {
        self.touch(seg);
    }
}

pub(crate) struct StoreInner {
    dir: PathBuf,
    pub(crate) shared: Arc<Shared>,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    /// Serialises topic creation and deletion (metadata file writes).
    admin: Mutex<()>,
    flush_tx: Sender<FlushRequest>,
    closed: AtomicBool,
}

impl StoreInner {
    pub(crate) fn partitions(&self) -> Vec<Arc<PartitionLog>> {
        let topics = self.topics.read().expect("topics lock");
        topics.values().flat_map(|t| t.partitions.iter().cloned()).collect()
    }

    /// Writes the recovery points: durable offsets while running, end offsets at clean close.
    pub(crate) fn write_checkpoint(&self, at_close: bool) -> Result<()> {
        let points: Vec<_> = self
            .partitions()
            .iter()
            .map(|p| {
                let offset = if at_close { p.log_end_offset() } else { p.durable_offset() };
                (p.topic().to_owned(), p.partition(), offset)
            })
            .collect();
        checkpoint::write(&self.dir, &points)
    }

    /// Unmaps the least recently used segments while more than the budget are mapped.
    pub(crate) fn enforce_segment_budget(&self) -> usize {
        let max = self.shared.config.open_segments_max;
        let mut mapped: Vec<Arc<Segment>> = self.partitions().iter().flat_map(|p| p.mapped_segments()).collect();
        if mapped.len() <= max {
            return 0;
        }
        let target = max - max / 10;
        mapped.sort_by_key(|s| s.last_used.load(Ordering::Relaxed));
        let excess = mapped.len() - target;
        let mut evicted = 0;
        for seg in mapped.into_iter().take(excess) {
            if seg.evict() {
                evicted += 1;
            }
        }
        tracing::debug!(evicted, "unmapped cold segments to stay within open_segments_max");
        evicted
    }
}

/// All topics and partitions of one data directory.
pub struct LogStore {
    inner: Arc<StoreInner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stop_maintenance: Sender<()>,
    _lock: std::fs::File,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").field("dir", &self.inner.dir).finish_non_exhaustive()
    }
}

impl LogStore {
    /// Opens the store in `dir` (creating it), recovering every partition, and starts the
    /// flusher and maintenance threads.
    ///
    /// # Errors
    /// Invalid config, another broker holding the directory, or I/O failures during recovery.
    pub fn open(dir: &Path, config: StorageConfig, clock: Clock) -> Result<(LogStore, RecoveryReport)> {
        config.validate()?;
        let started = std::time::Instant::now();
        std::fs::create_dir_all(dir).map_err(|e| StorageError::io("create directory", dir, e))?;
        let lock = lock_dir(dir)?;
        let disk = DiskMonitor::new(dir, config.disk_free_bytes_min);
        let shared = Arc::new(Shared {
            config,
            disk,
            clock,
            tick: AtomicU64::new(1),
            #[cfg(test)]
            fail_next_sync: AtomicBool::new(false),
            #[cfg(test)]
            before_marking_clean: std::sync::Mutex::new(None),
            #[cfg(test)]
            while_deleting_segments: std::sync::Mutex::new(None),
        });
        let clean = checkpoint::was_clean(dir);
        let points = checkpoint::read(dir);
        let mut report = RecoveryReport { clean, ..Default::default() };
        let metas = topics::load(dir)?;
        let jobs: Vec<(usize, u32)> =
            metas.iter().enumerate().flat_map(|(t, m)| (0..m.partitions).map(move |p| (t, p))).collect();
        let mut opened = parallel_map(&jobs, shared.config.recovery_threads, |&(t, p)| {
            let meta = &metas[t];
            let recovery = points.get(&(meta.name.clone(), p)).map(|r| (clean, *r));
            let pdir = dir.join(format!("{}-{p}", meta.name));
            PartitionLog::open(&meta.name, p, pdir, meta.config.clone(), Arc::clone(&shared), recovery)
        })?
        .into_iter();
        let mut topics = BTreeMap::new();
        for meta in metas {
            let mut partitions = Vec::with_capacity(meta.partitions as usize);
            for (log, rec) in opened.by_ref().take(meta.partitions as usize) {
                report.partitions += 1;
                report.scanned_segments += rec.scanned_segments;
                report.truncated_bytes += rec.truncated_bytes;
                partitions.push(Arc::new(log));
            }
            let internal = meta.name.starts_with("__");
            topics.insert(
                meta.name.clone(),
                Arc::new(Topic { name: meta.name, config: meta.config, partitions, internal }),
            );
        }
        checkpoint::clear_clean(dir)?;
        let (flush_tx, flush_rx) = crossbeam_channel::unbounded();
        let inner = Arc::new(StoreInner {
            dir: dir.to_owned(),
            shared,
            topics: RwLock::new(topics),
            admin: Mutex::new(()),
            flush_tx,
            closed: AtomicBool::new(false),
        });
        inner.enforce_segment_budget();
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(1);
        let threads = vec![
            spawn("cairn-flusher", {
                let weak = Arc::downgrade(&inner);
                move || flusher::run(flush_rx, weak)
            })?,
            spawn("cairn-maintenance", {
                let weak = Arc::downgrade(&inner);
                move || maintenance(stop_rx, weak)
            })?,
        ];
        report.duration = started.elapsed();
        Ok((LogStore { inner, threads: Mutex::new(threads), stop_maintenance: stop_tx, _lock: lock }, report))
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Broker-wide storage settings.
    pub fn config(&self) -> &StorageConfig {
        &self.inner.shared.config
    }

    /// The disk monitor (free space, floor).
    pub fn disk(&self) -> &DiskMonitor {
        &self.inner.shared.disk
    }

    /// A topic by name.
    pub fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        self.inner.topics.read().expect("topics lock").get(name).cloned()
    }

    /// Every topic, sorted by name.
    pub fn topics(&self) -> Vec<Arc<Topic>> {
        self.inner.topics.read().expect("topics lock").values().cloned().collect()
    }

    /// A partition by topic and index.
    pub fn partition(&self, topic: &str, partition: u32) -> Option<Arc<PartitionLog>> {
        self.topic(topic)?.partitions.get(partition as usize).cloned()
    }

    /// Test hook: holds the lock topic administration takes (creation, deletion) while the
    /// guard lives, as a long creation by another client would.
    #[cfg(test)]
    pub(crate) fn hold_admin(&self) -> std::sync::MutexGuard<'_, ()> {
        self.inner.admin.lock().expect("admin lock")
    }

    /// Creates a topic with `partitions` partitions and `config`.
    ///
    /// # Errors
    /// Invalid name or config, an existing topic, or I/O failures.
    pub fn create_topic(&self, name: &str, partitions: u32, config: TopicConfig) -> Result<Arc<Topic>> {
        topics::validate_name(name)?;
        config.validate()?;
        if partitions == 0 {
            return Err(StorageError::InvalidConfig("a topic needs at least one partition".into()));
        }
        let _admin = self.inner.admin.lock().expect("admin lock");
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(StorageError::Closed);
        }
        if self.topic(name).is_some() {
            return Err(StorageError::TopicExists(name.to_owned()));
        }
        let dir = &self.inner.dir;
        let mut logs = Vec::with_capacity(partitions as usize);
        for p in 0..partitions {
            let pdir = dir.join(format!("{name}-{p}"));
            if pdir.exists() {
                // Leftover of an interrupted deletion or creation: start clean.
                std::fs::remove_dir_all(&pdir).map_err(|e| StorageError::io("remove stale directory", &pdir, e))?;
            }
            let (log, _) = PartitionLog::open(name, p, pdir, config.clone(), Arc::clone(&self.inner.shared), None)?;
            logs.push(Arc::new(log));
        }
        segment::sync_dir(dir)?;
        let topic =
            Arc::new(Topic { name: name.to_owned(), config, partitions: logs, internal: name.starts_with("__") });
        let mut all: Vec<topics::TopicMeta> = self.topics().iter().map(|t| topics::TopicMeta::of(t)).collect();
        all.push(topics::TopicMeta::of(&topic));
        topics::save(dir, &all)?;
        self.inner.topics.write().expect("topics lock").insert(name.to_owned(), Arc::clone(&topic));
        self.inner.enforce_segment_budget();
        Ok(topic)
    }

    /// Deletes a topic and its data.
    ///
    /// # Errors
    /// Unknown topic or I/O failures.
    pub fn delete_topic(&self, name: &str) -> Result<()> {
        let _admin = self.inner.admin.lock().expect("admin lock");
        let topic = self.topic(name).ok_or_else(|| StorageError::UnknownTopic(name.to_owned()))?;
        let all: Vec<topics::TopicMeta> =
            self.topics().iter().filter(|t| t.name != name).map(|t| topics::TopicMeta::of(t)).collect();
        topics::save(&self.inner.dir, &all)?;
        self.inner.topics.write().expect("topics lock").remove(name);
        for p in &topic.partitions {
            p.destroy()?;
        }
        segment::sync_dir(&self.inner.dir)
    }

    /// Asks the flusher to make `partition` durable up to `offset` and call `done` then.
    pub fn sync_async(&self, partition: Arc<PartitionLog>, offset: u64, done: FlushDone) {
        if let Err(e) = self.inner.flush_tx.send(FlushRequest::Sync { partition, offset, done }) {
            if let FlushRequest::Sync { done, .. } = e.0 {
                done(Err(StorageError::Closed));
            }
        }
    }

    /// Runs retention on every partition now (the maintenance thread does this periodically).
    pub fn apply_retention(&self) -> RetentionOutcome {
        apply_retention_all(&self.inner)
    }

    /// Unmaps cold segments if more than `open_segments_max` are mapped; returns how many.
    pub fn enforce_segment_budget(&self) -> usize {
        self.inner.enforce_segment_budget()
    }

    /// Clean shutdown: stops the threads, syncs and seals every partition, writes the checkpoint
    /// and the clean-shutdown marker. The next open needs no recovery scan.
    ///
    /// # Errors
    /// The first sync or I/O failure; the marker is then not written, so the next start scans.
    pub fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let _ = self.inner.flush_tx.send(FlushRequest::Stop);
        let _ = self.stop_maintenance.send(());
        for t in self.threads.lock().expect("threads lock").drain(..) {
            let _ = t.join();
        }
        let mut first_error = None;
        let mut read_only = false;
        for p in self.inner.partitions() {
            match p.close() {
                Ok(_) => {}
                // Nothing could be written on a read-only filesystem, so what is on disk is what
                // the last writable run left: the next start recovers from that.
                Err(StorageError::ReadOnly { .. }) => read_only = true,
                Err(e) => {
                    tracing::error!(topic = p.topic(), partition = p.partition(), error = %e, "closing partition failed");
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        let done = self.inner.write_checkpoint(true).and_then(|()| checkpoint::mark_clean(&self.inner.dir));
        match done {
            Err(StorageError::ReadOnly { .. }) => read_only = true,
            other => other?,
        }
        if read_only {
            tracing::warn!(dir = %self.inner.dir.display(), "read-only filesystem: closed without a checkpoint");
        }
        Ok(())
    }
}

impl Drop for LogStore {
    fn drop(&mut self) {
        // Without close() this is an unclean stop: threads end, nothing is marked clean.
        let _ = self.inner.flush_tx.send(FlushRequest::Stop);
        let _ = self.stop_maintenance.try_send(());
        for t in self.threads.lock().expect("threads lock").drain(..) {
            let _ = t.join();
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new().name(name.to_owned()).spawn(f).map_err(|e| StorageError::io("spawn thread", name, e))
}

fn lock_dir(dir: &Path) -> Result<std::fs::File> {
    let path = dir.join(".lock");
    let opened = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path);
    let file = match opened {
        Ok(f) => f,
        // On a read-only filesystem the lock file exists (or nothing can be served anyway):
        // a read-only descriptor can still hold the lock.
        Err(e) if error::is_read_only(&e) => {
            tracing::warn!(dir = %dir.display(), "the data directory is on a read-only filesystem: serving reads only");
            std::fs::File::open(&path).map_err(|e| StorageError::io("open", &path, e))?
        }
        Err(e) => return Err(StorageError::io("open", &path, e)),
    };
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|e| StorageError::Io {
        op: "lock (is another broker using this data directory?)",
        path: path.clone(),
        source: e.into(),
    })?;
    Ok(file)
}

fn apply_retention_all(inner: &StoreInner) -> RetentionOutcome {
    let now = inner.shared.now_ms();
    let mut total = RetentionOutcome::default();
    for p in inner.partitions() {
        match p.apply_retention(now) {
            Ok(o) => {
                total.segments += o.segments;
                total.bytes += o.bytes;
            }
            // Its topic was deleted since the list was taken: nothing to do.
            Err(StorageError::UnknownTopic(_)) => {}
            Err(e) => {
                metrics::counter!("cairn_storage_errors_total", "kind" => e.kind()).increment(1);
                tracing::error!(topic = p.topic(), partition = p.partition(), error = %e, "retention failed");
            }
        }
    }
    total
}

/// `f` over `items` on up to `threads` scoped threads; results in the order of `items`. The
/// first error stops the workers from taking more items and is returned.
fn parallel_map<T: Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> Result<R> + Sync) -> Result<Vec<R>> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let workers = threads.clamp(1, items.len().max(1));
    let mut done: Vec<(usize, Result<R>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| {
                    let mut out = Vec::new();
                    while !failed.load(Ordering::Acquire) {
                        let i = next.fetch_add(1, Ordering::AcqRel);
                        let Some(item) = items.get(i) else { break };
                        let r = f(item);
                        if r.is_err() {
                            failed.store(true, Ordering::Release);
                        }
                        out.push((i, r));
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("recovery worker panicked")).collect()
    });
    done.sort_unstable_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// Background thread: retention, the open-segments budget, and disk free-space refresh.
fn maintenance(stop: Receiver<()>, store: std::sync::Weak<StoreInner>) {
    let mut since_retention = Duration::ZERO;
    let tick = Duration::from_millis(1000);
    loop {
        match stop.recv_timeout(tick) {
            Ok(()) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
        }
        let Some(inner) = store.upgrade() else { return };
        inner.shared.disk.refresh();
        inner.enforce_segment_budget();
        since_retention += tick;
        if since_retention >= Duration::from_millis(inner.shared.config.retention_check_interval_ms) {
            since_retention = Duration::ZERO;
            apply_retention_all(&inner);
        }
    }
}
