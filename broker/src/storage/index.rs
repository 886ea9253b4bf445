//! Sparse offset and time indexes of a segment, in memory and on disk.
//!
//! `.index` file:
//!
//! ```text
//! offset  size  field
//!      0     8  magic "CAIRNIDX"
//!      8     4  format version (u32 BE, 1)
//!     12     4  reserved (0)
//!     16   8*n  entries: relative offset u32 BE, byte position in the .log u32 BE
//! ```
//!
//! `.timeindex` file:
//!
//! ```text
//! offset  size  field
//!      0     8  magic "CAIRNTIX"
//!      8     4  format version (u32 BE, 1)
//!     12     4  reserved (0)
//!     16     8  largest record timestamp in the segment (i64 BE; i64::MIN when empty)
//!     24  12*n  entries: timestamp i64 BE, relative offset u32 BE
//! ```
//!
//! A time entry `(t, r)` means: every record before relative offset `r` has a timestamp `<= t`.
//! Index files are written when a segment is sealed and at clean shutdown. They are never trusted
//! blindly: [`OffsetIndex::validate`] checks them against the log, and recovery rebuilds them
//! from the log whenever they disagree.

use std::io;
use std::path::Path;

/// Length of an index file header.
pub(crate) const INDEX_HEADER_LEN: usize = 16;
/// Length of a time index file header (the index header plus the segment's max timestamp).
pub(crate) const TIME_HEADER_LEN: usize = 24;
/// Bytes per offset index entry.
pub(crate) const OFFSET_ENTRY_LEN: usize = 8;
/// Bytes per time index entry.
pub(crate) const TIME_ENTRY_LEN: usize = 12;
const _: () = assert!(OFFSET_ENTRY_LEN == 8 && TIME_ENTRY_LEN == 12);

const OFFSET_MAGIC: &[u8; 8] = b"CAIRNIDX";
const TIME_MAGIC: &[u8; 8] = b"CAIRNTIX";
const FORMAT_VERSION: u32 = 1;

/// One sparse offset index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OffsetEntry {
    /// Offset relative to the segment's base offset.
    pub(crate) rel: u32,
    /// Byte position of the batch holding that offset (its first byte).
    pub(crate) pos: u32,
}

/// One time index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimeEntry {
    /// Largest timestamp of every record before `rel`.
    pub(crate) timestamp: i64,
    /// Relative offset of the first batch after those records.
    pub(crate) rel: u32,
}

/// Both sparse indexes of a segment, plus the state needed to extend them.
#[derive(Debug, Clone, Default)]
pub(crate) struct SegmentIndex {
    pub(crate) offsets: Vec<OffsetEntry>,
    pub(crate) times: Vec<TimeEntry>,
    bytes_since_entry: u64,
    max_timestamp_before: Option<i64>,
}

impl SegmentIndex {
    /// Records that a batch `[rel, ..]` with `max_timestamp` is about to be written at `pos`,
    /// adding entries every `interval` bytes. Returns `false` (and adds nothing) when an entry is
    /// due but the index already holds `entries_max` entries: the segment must roll.
    pub(crate) fn on_batch(
        &mut self,
        rel: u32,
        pos: u32,
        len: u32,
        max_timestamp: i64,
        interval: u32,
        entries_max: usize,
    ) -> bool {
        let due = self.offsets.is_empty() || self.bytes_since_entry >= u64::from(interval);
        if due {
            if self.offsets.len() >= entries_max {
                return false;
            }
            self.offsets.push(OffsetEntry { rel, pos });
            if let Some(before) = self.max_timestamp_before {
                if self.times.last().is_none_or(|t| before > t.timestamp) {
                    self.times.push(TimeEntry { timestamp: before, rel });
                }
            }
            self.bytes_since_entry = 0;
        }
        self.bytes_since_entry += u64::from(len);
        self.max_timestamp_before = Some(self.max_timestamp_before.map_or(max_timestamp, |m| m.max(max_timestamp)));
        true
    }

    /// Records a batch without an entry: for rebuilding the index of a segment written under a
    /// larger budget (`index_bytes_max` or `index_interval_bytes` lowered since) once the budget
    /// is used up. Lookups past the last entry scan forward from it.
    pub(crate) fn on_batch_unindexed(&mut self, len: u32, max_timestamp: i64) {
        self.bytes_since_entry += u64::from(len);
        self.max_timestamp_before = Some(self.max_timestamp_before.map_or(max_timestamp, |m| m.max(max_timestamp)));
    }

    /// After loading from disk: bytes written since the last entry, so entries keep their spacing.
    pub(crate) fn set_bytes_since_entry(&mut self, bytes: u64) {
        self.bytes_since_entry = bytes;
    }

    /// Whether adding one more entry could overflow `entries_max`.
    pub(crate) fn is_full(&self, entries_max: usize) -> bool {
        self.offsets.len() >= entries_max
    }

    /// The largest timestamp seen (from batches recorded with [`SegmentIndex::on_batch`]).
    pub(crate) fn max_timestamp(&self) -> Option<i64> {
        self.max_timestamp_before
    }

    /// Position of the last indexed batch at or before relative offset `rel`, if any.
    pub(crate) fn floor(&self, rel: u32) -> Option<OffsetEntry> {
        let i = self.offsets.partition_point(|e| e.rel <= rel);
        i.checked_sub(1).map(|i| self.offsets[i])
    }

    /// The relative offset to start a timestamp search for `timestamp` from.
    pub(crate) fn time_floor(&self, timestamp: i64) -> Option<u32> {
        let i = self.times.partition_point(|e| e.timestamp < timestamp);
        i.checked_sub(1).map(|i| self.times[i].rel)
    }

    /// Encodes the offset index file.
    pub(crate) fn encode_offsets(&self) -> Vec<u8> {
        let mut out = header(OFFSET_MAGIC, self.offsets.len() * OFFSET_ENTRY_LEN);
        for e in &self.offsets {
            out.extend_from_slice(&e.rel.to_be_bytes());
            out.extend_from_slice(&e.pos.to_be_bytes());
        }
        out
    }

    /// Encodes the time index file.
    pub(crate) fn encode_times(&self) -> Vec<u8> {
        let mut out = header(TIME_MAGIC, 8 + self.times.len() * TIME_ENTRY_LEN);
        out.extend_from_slice(&self.max_timestamp_before.unwrap_or(i64::MIN).to_be_bytes());
        for e in &self.times {
            out.extend_from_slice(&e.timestamp.to_be_bytes());
            out.extend_from_slice(&e.rel.to_be_bytes());
        }
        out
    }

    /// Decodes both index files. Returns `None` if either is missing a valid header, has a
    /// partial entry, or has entries out of order: the caller rebuilds from the log.
    pub(crate) fn decode(offsets: &[u8], times: &[u8]) -> Option<SegmentIndex> {
        let offsets = entries(offsets, OFFSET_MAGIC, INDEX_HEADER_LEN, OFFSET_ENTRY_LEN)?
            .map(|e| OffsetEntry { rel: be_u32(&e[0..4]), pos: be_u32(&e[4..8]) })
            .collect::<Vec<_>>();
        let max_timestamp = time_index_max_timestamp(times)?;
        let times = entries(times, TIME_MAGIC, TIME_HEADER_LEN, TIME_ENTRY_LEN)?
            .map(|e| TimeEntry {
                timestamp: i64::from_be_bytes(e[0..8].try_into().expect("8")),
                rel: be_u32(&e[8..12]),
            })
            .collect::<Vec<_>>();
        let ordered = offsets.windows(2).all(|w| w[0].rel < w[1].rel && w[0].pos < w[1].pos)
            && times.windows(2).all(|w| w[0].timestamp < w[1].timestamp && w[0].rel < w[1].rel);
        if !ordered || offsets.is_empty() {
            return None;
        }
        Some(SegmentIndex { offsets, times, bytes_since_entry: 0, max_timestamp_before: max_timestamp })
    }
}

fn header(magic: &[u8; 8], body: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(INDEX_HEADER_LEN + body);
    out.extend_from_slice(magic);
    out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes());
    out
}

/// The segment max timestamp stored in a time index header: `None` if the header is invalid,
/// `Some(None)` for an empty segment.
pub(crate) fn time_index_max_timestamp(buf: &[u8]) -> Option<Option<i64>> {
    if buf.len() < TIME_HEADER_LEN || &buf[..8] != TIME_MAGIC || be_u32(&buf[8..12]) != FORMAT_VERSION {
        return None;
    }
    let ts = i64::from_be_bytes(buf[16..24].try_into().expect("8 bytes"));
    Some(Some(ts).filter(|t| *t != i64::MIN))
}

fn entries<'a>(
    buf: &'a [u8],
    magic: &[u8; 8],
    header_len: usize,
    len: usize,
) -> Option<std::slice::ChunksExact<'a, u8>> {
    if buf.len() < header_len || &buf[..8] != magic || be_u32(&buf[8..12]) != FORMAT_VERSION {
        return None;
    }
    let body = &buf[header_len..];
    if body.len() % len != 0 {
        return None;
    }
    Some(body.chunks_exact(len))
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().expect("4 bytes"))
}

/// Reads an index file, treating a missing file as empty (which fails validation).
pub(crate) fn read_index_file(path: &Path) -> io::Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_added_every_interval_and_found_by_floor() {
        let mut idx = SegmentIndex::default();
        let mut pos = 16u32;
        for rel in 0..100u32 {
            assert!(idx.on_batch(rel, pos, 1000, i64::from(rel) * 10, 4096, 1000));
            pos += 1000;
        }
        // One entry for the first batch, then one after every 4096+ bytes (5 batches).
        assert_eq!(idx.offsets.len(), 20);
        assert_eq!(idx.floor(0).unwrap().rel, 0);
        assert_eq!(idx.floor(7).unwrap().rel, 5);
        assert_eq!(idx.floor(99).unwrap().rel, 95);
        // Time entries say "everything before rel is <= timestamp".
        assert_eq!(idx.time_floor(0), None);
        assert_eq!(idx.time_floor(45), Some(5));
        assert_eq!(idx.time_floor(51), Some(5));
        assert_eq!(idx.time_floor(91), Some(10));
    }

    #[test]
    fn index_files_round_trip_and_reject_damage() {
        let mut idx = SegmentIndex::default();
        for rel in 0..10u32 {
            idx.on_batch(rel, 16 + rel * 5000, 5000, 100 + i64::from(rel), 4096, 100);
        }
        let (o, t) = (idx.encode_offsets(), idx.encode_times());
        let back = SegmentIndex::decode(&o, &t).unwrap();
        assert_eq!(back.offsets, idx.offsets);
        assert_eq!(back.times, idx.times);
        assert_eq!(back.max_timestamp(), Some(109));
        assert!(SegmentIndex::decode(&o[..o.len() - 1], &t).is_none(), "partial entry");
        assert!(SegmentIndex::decode(&[], &t).is_none(), "missing file");
        let mut zeroed = o.clone();
        zeroed[INDEX_HEADER_LEN..].fill(0);
        assert!(SegmentIndex::decode(&zeroed, &t).is_none(), "zero-filled entries");
    }

    #[test]
    fn a_full_index_refuses_new_entries() {
        let mut idx = SegmentIndex::default();
        assert!(idx.on_batch(0, 16, 5000, 1, 4096, 1));
        assert!(!idx.on_batch(1, 5016, 5000, 2, 4096, 1));
        assert!(idx.is_full(1));
    }
}
