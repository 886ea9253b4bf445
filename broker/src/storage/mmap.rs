//! Memory mappings of segment log files: the only `unsafe` code in the broker.
//!
//! A [`LogMap`] maps a segment's `.log` file. The active segment is mapped writable with a fixed
//! capacity that may exceed the file's current length; the appender extends the file with
//! `fallocate` before it writes into a new region, so no access ever touches a page past the end
//! of the file (which would raise SIGBUS). Sealed segments are mapped read-only.
//!
//! Soundness rests on two rules that the partition log upholds:
//! 1. the single appender writes only bytes at or after the published length, and
//! 2. readers read only bytes below the published length (release store / acquire load).
//!
//! So a byte range is never written while a shared slice of it exists.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use memmap2::{MmapOptions, MmapRaw};

/// A mapping of one segment's log file.
#[derive(Debug)]
pub(crate) struct LogMap {
    raw: MmapRaw,
    capacity: usize,
    writable: bool,
}

impl LogMap {
    /// Maps `capacity` bytes of `file` for reading and writing. The file may be shorter: only
    /// the part within the file's length may be touched.
    pub(crate) fn writable(file: &File, capacity: usize) -> io::Result<LogMap> {
        let raw = MmapOptions::new().len(capacity).map_raw(file)?;
        Ok(LogMap { raw, capacity, writable: true })
    }

    /// Maps the first `len` bytes of `file` read-only.
    pub(crate) fn read_only(file: &File, len: usize) -> io::Result<LogMap> {
        let raw = MmapOptions::new().len(len.max(1)).map_raw_read_only(file)?;
        Ok(LogMap { raw, capacity: len, writable: false })
    }

    /// Copies `data` into the mapping at `pos`.
    ///
    /// The caller guarantees that `pos..pos + data.len()` lies within the file's allocated length
    /// and above the published length (no reader can see it yet).
    ///
    /// # Panics
    /// If the mapping is read-only or the range exceeds the mapping: both are programming errors.
    pub(crate) fn write(&self, pos: usize, data: &[u8]) {
        assert!(self.writable, "write into a read-only mapping");
        assert!(pos.checked_add(data.len()).is_some_and(|end| end <= self.capacity), "write past the mapping");
        // SAFETY: the range is inside the mapping (checked above) and inside the file's allocated
        // length (caller's contract), so the pages exist. No shared slice of this range exists,
        // because readers only look below the published length and the range is above it; the
        // appender is the only writer (it holds the partition's append lock).
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.raw.as_mut_ptr().add(pos), data.len());
        }
    }

    /// A shared view of `start..start + len`.
    ///
    /// The caller guarantees that the range is below the published length, so it is fully written
    /// and never written again while the mapping lives.
    ///
    /// # Panics
    /// If the range exceeds the mapping.
    pub(crate) fn slice(&self, start: usize, len: usize) -> &[u8] {
        assert!(start.checked_add(len).is_some_and(|end| end <= self.capacity), "read past the mapping");
        if len == 0 {
            return &[];
        }
        // SAFETY: in bounds (checked above); the bytes are published and immutable from now on
        // (caller's contract), and the mapping outlives the returned borrow of `self`.
        unsafe { std::slice::from_raw_parts(self.raw.as_ptr().add(start), len) }
    }

    /// Schedules and waits for write-back of `start..start + len` (msync with MS_SYNC).
    pub(crate) fn sync_range(&self, start: usize, len: usize) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.raw.flush_range(start, len)
    }
}

/// A zero-copy [`Bytes`] owner: keeps the mapping alive while any slice of it is in use, even
/// after the segment's file was deleted or the segment was unmapped from the log's cache.
struct MapSlice {
    map: Arc<LogMap>,
    start: usize,
    len: usize,
}

impl AsRef<[u8]> for MapSlice {
    fn as_ref(&self) -> &[u8] {
        self.map.slice(self.start, self.len)
    }
}

/// Wraps a published range of a mapping as [`Bytes`] without copying.
pub(crate) fn shared_bytes(map: &Arc<LogMap>, start: usize, len: usize) -> Bytes {
    // Check the range once here; `as_ref` re-checks but can then never fail.
    let _ = map.slice(start, len);
    Bytes::from_owner(MapSlice { map: Arc::clone(map), start, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_become_visible_through_shared_bytes_and_outlive_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        file.set_len(4096).unwrap();
        let map = Arc::new(LogMap::writable(&file, 1 << 20).unwrap());
        map.write(10, b"hello");
        let b = shared_bytes(&map, 10, 5);
        drop(map);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(&b[..], b"hello");
    }
}
