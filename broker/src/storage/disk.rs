//! Free-space tracking for the data disk.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::error::{Result, StorageError};

/// Tracks free space on the data directory's filesystem and enforces the free-space floor.
///
/// The free byte count is refreshed by the maintenance thread every second and after each
/// segment preallocation; appends only read an atomic.
#[derive(Debug)]
pub struct DiskMonitor {
    dir: PathBuf,
    floor_bytes: u64,
    free_bytes: AtomicU64,
    /// Test hook: pretend this many bytes are free (u64::MAX = off).
    override_free: AtomicU64,
}

impl DiskMonitor {
    pub(crate) fn new(dir: &Path, floor_bytes: u64) -> DiskMonitor {
        let m = DiskMonitor {
            dir: dir.to_owned(),
            floor_bytes,
            free_bytes: AtomicU64::new(u64::MAX),
            override_free: AtomicU64::new(u64::MAX),
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
                Ok(s) => s.f_bavail.saturating_mul(s.f_frsize),
                Err(e) => {
                    tracing::warn!(dir = %self.dir.display(), error = %e, "statvfs failed");
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
