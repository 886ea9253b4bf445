//! The recovery-point checkpoint and the clean-shutdown marker.
//!
//! `recovery-points` (in the data directory):
//!
//! ```text
//! offset  size  field
//!      0     8  magic "CAIRNRCP"
//!      8     4  format version (u32 BE, 1)
//!     12     4  entry count n (u32 BE)
//!     16     -  n entries: topic name length u16 BE, topic name, partition u32 BE, offset u64 BE
//!    end-4   4  CRC32C of everything before it (u32 BE)
//! ```
//!
//! A partition's recovery point is an offset below which everything is on stable storage with
//! finished segments; after an unclean stop, only segments from the one holding it are scanned.
//! `clean-shutdown` is an empty file written last by a clean shutdown and removed at startup.

use std::collections::HashMap;
use std::path::Path;

use super::error::{Result, StorageError};
use super::segment::{sync_dir, write_atomic};

/// File name of the checkpoint.
pub(crate) const CHECKPOINT_FILE: &str = "recovery-points";
/// File name of the clean-shutdown marker.
pub(crate) const CLEAN_MARKER: &str = "clean-shutdown";
const MAGIC: &[u8; 8] = b"CAIRNRCP";

/// Writes the checkpoint atomically.
pub(crate) fn write(dir: &Path, points: &[(String, u32, u64)]) -> Result<()> {
    let mut out = Vec::with_capacity(20 + points.len() * 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&1u32.to_be_bytes());
    out.extend_from_slice(&(points.len() as u32).to_be_bytes());
    for (topic, partition, offset) in points {
        out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        out.extend_from_slice(topic.as_bytes());
        out.extend_from_slice(&partition.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    write_atomic(&dir.join(CHECKPOINT_FILE), &out)
}

/// Reads the checkpoint. A missing or damaged file yields an empty map (everything is scanned).
pub(crate) fn read(dir: &Path) -> HashMap<(String, u32), u64> {
    let path = dir.join(CHECKPOINT_FILE);
    let Ok(buf) = std::fs::read(&path) else {
        return HashMap::new();
    };
    match parse(&buf) {
        Some(m) => m,
        None => {
            tracing::warn!(path = %path.display(), "recovery checkpoint is damaged; every segment will be scanned");
            HashMap::new()
        }
    }
}

fn parse(buf: &[u8]) -> Option<HashMap<(String, u32), u64>> {
    if buf.len() < 20 || &buf[..8] != MAGIC || buf[8..12] != 1u32.to_be_bytes() {
        return None;
    }
    let (body, crc) = buf.split_at(buf.len() - 4);
    if crc32c::crc32c(body) != u32::from_be_bytes(crc.try_into().ok()?) {
        return None;
    }
    let n = u32::from_be_bytes(body[12..16].try_into().ok()?) as usize;
    let mut pos = 16;
    let mut out = HashMap::with_capacity(n.min(body.len() / 14));
    for _ in 0..n {
        let len = u16::from_be_bytes(body.get(pos..pos + 2)?.try_into().ok()?) as usize;
        pos += 2;
        let topic = std::str::from_utf8(body.get(pos..pos + len)?).ok()?.to_owned();
        pos += len;
        let partition = u32::from_be_bytes(body.get(pos..pos + 4)?.try_into().ok()?);
        let offset = u64::from_be_bytes(body.get(pos + 4..pos + 12)?.try_into().ok()?);
        pos += 12;
        out.insert((topic, partition), offset);
    }
    (pos == body.len()).then_some(out)
}

/// Whether the last stop was clean.
pub(crate) fn was_clean(dir: &Path) -> bool {
    dir.join(CLEAN_MARKER).exists()
}

/// Writes the clean-shutdown marker durably.
pub(crate) fn mark_clean(dir: &Path) -> Result<()> {
    write_atomic(&dir.join(CLEAN_MARKER), b"")
}

/// Removes the marker durably, so that a later crash is not mistaken for a clean stop.
pub(crate) fn clear_clean(dir: &Path) -> Result<()> {
    let path = dir.join(CLEAN_MARKER);
    match std::fs::remove_file(&path) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        // Read-only: nothing will be written, so the marker cannot go stale.
        Err(e) if super::error::is_read_only(&e) => Ok(()),
        Err(e) => Err(StorageError::io("remove", &path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_round_trip_and_damage_means_scan_everything() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &[("a".into(), 0, 10), ("b-c".into(), 3, 7)]).unwrap();
        let m = read(dir.path());
        assert_eq!(m[&("a".to_string(), 0)], 10);
        assert_eq!(m[&("b-c".to_string(), 3)], 7);
        let path = dir.path().join(CHECKPOINT_FILE);
        let mut b = std::fs::read(&path).unwrap();
        b[17] ^= 1;
        std::fs::write(&path, b).unwrap();
        assert!(read(dir.path()).is_empty());
    }
}
