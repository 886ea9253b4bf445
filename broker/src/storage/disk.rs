//! Free-space tracking for the data disk.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::error::{Result, StorageError};

/// Tracks free space on the data directory's filesystem and enforces the free-space floor.
///
/// The free byte count is refreshed by the maintenance thread every second and after each
/// segment preallocation (a roll's too); appends only read an atomic.
#[derive(Debug)]
pub struct DiskMonitor {
    dir: PathBuf,
    floor_bytes: u64,
    free_bytes: AtomicU64,
    /// Test hook: pretend this many bytes are free (u64::MAX = off).
    pub(super) override_free: AtomicU64,
    /// The last `statvfs` failed: the failure was logged once and is not logged again every
    /// second until it works again.
    failing: AtomicBool,
}

impl DiskMonitor {
    pub(crate) fn new(dir: &Path, floor_bytes: u64) -> DiskMonitor {
        let m = DiskMonitor {
            dir: dir.to_owned(),
            floor_bytes,
            free_bytes: AtomicU64::new(u64::MAX),
            override_free: AtomicU64::new(u64::MAX),
            failing: AtomicBool::new(false),
        };
        m.refresh();
        m
    }

    /// Re-reads free space from the filesystem.
    pub fn refresh(&self) {
        let forced = self.override_free.load(Ordering::Relaxed);
        let free = if forced != u64::MAX {
            forced
        } else {
            match rustix::fs::statvfs(&self.dir) {
                Ok(s) => {
                    if self.failing.swap(false, Ordering::Relaxed) {
                        tracing::info!(dir = %self.dir.display(), "statvfs works again; free space is tracked");
                    }
                    s.f_bavail.saturating_mul(s.f_frsize)
                }
                Err(e) => {
                    if !self.failing.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            dir = %self.dir.display(),
                            error = %e,
                            free_bytes = self.free_bytes(),
                            "statvfs failed; free space is not tracked until it works again (logged once)"
                        );
                    }
                    return;
                }
            }
        };
        self.free_bytes.store(free, Ordering::Relaxed);
        metrics::gauge!("cairn_disk_free_bytes").set(free as f64);
    }

    /// Free bytes at the last refresh.
    pub fn free_bytes(&self) -> u64 {
        self.free_bytes.load(Ordering::Relaxed)
    }

    /// The configured floor.
    pub fn floor_bytes(&self) -> u64 {
        self.floor_bytes
    }

    /// Fails with [`StorageError::StorageFull`] while free space is below the floor.
    ///
    /// # Errors
    /// As above.
    pub fn check(&self) -> Result<()> {
        let free = self.free_bytes();
        if free < self.floor_bytes {
            // Space may have come back since the last refresh.
            self.refresh();
            let free = self.free_bytes();
            if free < self.floor_bytes {
                return Err(StorageError::StorageFull { free_bytes: free, floor_bytes: self.floor_bytes });
            }
        }
        Ok(())
    }

    /// Test and fault-injection hook: report `free` bytes instead of the real figure
    /// (`None` restores the real one).
    pub fn set_free_bytes_override(&self, free: Option<u64>) {
        self.override_free.store(free.unwrap_or(u64::MAX), Ordering::Relaxed);
        self.refresh();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// What the broker logged while `f` ran on this thread.
    fn logged(f: impl FnOnce()) -> String {
        #[derive(Clone)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink(Arc::default());
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = sink.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    /// The maintenance thread refreshes every second: a data directory that has gone away must
    /// not put a warning in the log every second.
    #[test]
    fn a_failing_statvfs_is_logged_once_and_its_recovery_once() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let monitor = DiskMonitor::new(&data, 0);
        let known = monitor.free_bytes();
        std::fs::remove_dir(&data).unwrap();
        let failing = logged(|| (0..5).for_each(|_| monitor.refresh()));
        assert_eq!(failing.matches("statvfs failed").count(), 1, "{failing}");
        assert_eq!(monitor.free_bytes(), known, "the last figure is kept");
        std::fs::create_dir(&data).unwrap();
        let back = logged(|| (0..3).for_each(|_| monitor.refresh()));
        assert_eq!(back.matches("statvfs works again").count(), 1, "{back}");
        let again = logged(|| monitor.refresh());
        assert!(again.is_empty(), "{again}");
    }
}
