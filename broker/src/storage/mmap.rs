//! Memory mappings of segment log files: the only `unsafe` code in the broker.
//!
//! A [`LogMap`] maps a segment's `.log` file read-only. The active segment is mapped with a fixed
//! capacity that may exceed the file's current length; the appender extends the file with
//! `fallocate` and writes batches with `pwritev` (into the same page cache), so the mapping sees
//! them, and no reader ever touches a page past the end of the file (which would raise SIGBUS).
//!
//! Soundness rests on one rule that the partition log upholds: readers only read bytes below
//! the published length (release store after the write, acquire load before the read), and
//! bytes below it are never written again while the segment is live (recovery truncates only
//! before any reader exists).
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
}

impl LogMap {
    /// Maps `capacity` bytes of `file` read-only. The file may be shorter: only the part within
    /// its length may be read.
    pub(crate) fn read_only(file: &File, capacity: usize) -> io::Result<LogMap> {
        let raw = MmapOptions::new().len(capacity.max(1)).map_raw_read_only(file)?;
        Ok(LogMap { raw, capacity })
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
    fn positional_writes_become_visible_through_shared_bytes_that_outlive_the_file() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        file.set_len(4096).unwrap();
        let map = Arc::new(LogMap::read_only(&file, 1 << 20).unwrap());
        file.write_all_at(b"hello", 10).unwrap();
        let b = shared_bytes(&map, 10, 5);
        drop(map);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(&b[..], b"hello");
    }
}
