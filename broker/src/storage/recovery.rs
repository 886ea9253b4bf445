//! Opening a partition's segments after a clean or an unclean stop.
//!
//! After a clean shutdown every segment was sealed, trimmed and had its indexes written; the
//! recovery point equals the log end and nothing is scanned (the active segment's tail after its
//! last index entry is checked, at most one index interval). After an unclean stop, segments from
//! the one holding the last checkpointed recovery point onward are scanned batch by batch (length,
//! magic, CRC32C, offset sequence); the log is cut at the first torn or corrupt batch, later
//! segments are removed, indexes of scanned segments are rebuilt, and the cut is logged.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use cairn_protocol::record_batch::check_batch;

use super::error::{Result, StorageError};
use super::index::{read_index_file, time_index_max_timestamp, SegmentIndex, TIME_HEADER_LEN};
use super::mmap::LogMap;
use super::segment::{
    parse_log_name, scan_log, stored_batch_at, sync_dir, sync_log_file, ScanStop, Segment, LOG_HEADER_LEN,
};
use super::Shared;

/// The recovered segments of one partition, and what recovery had to do.
#[derive(Debug)]
pub(crate) struct RecoveredLog {
    pub(crate) segments: Vec<Arc<Segment>>,
    /// Allocated length of the active segment's file.
    pub(crate) allocated: u64,
    /// Bytes of torn or corrupt data cut from the log.
    pub(crate) truncated_bytes: u64,
    /// Segments whose batches were scanned.
    pub(crate) scanned_segments: usize,
}

/// Opens the segments in `dir`. `recovery` is `(clean, recovery_point)` from the store's
/// checkpoint, or `None` when the partition has no checkpoint entry.
pub(crate) fn recover_partition(
    dir: &Path,
    capacity: u64,
    shared: &Shared,
    recovery: Option<(bool, u64)>,
    now_ms: i64,
) -> Result<RecoveredLog> {
    let interval = shared.config.index_interval_bytes;
    let entries_max = shared.config.index_entries_max();
    let mut bases = list_segments(dir)?;
    if bases.is_empty() {
        let (seg, allocated) = Segment::create(dir, 0, capacity, shared.config.preallocate_bytes_min, now_ms)?;
        sync_dir(dir)?;
        return Ok(RecoveredLog { segments: vec![Arc::new(seg)], allocated, truncated_bytes: 0, scanned_segments: 0 });
    }
    bases.sort_unstable();
    // A newest segment without even its header was being created when the broker stopped (or
    // its creation failed on a full disk): it holds nothing. Cutting it would write to a disk
    // that may have no room left; the segment before it is the active one instead.
    while let [.., _, newest] = bases[..] {
        let doomed = Segment::existing(dir, newest, capacity);
        match std::fs::metadata(doomed.log_path()) {
            Ok(m) if m.len() < LOG_HEADER_LEN => {
                doomed.delete_files()?;
                tracing::warn!(segment = %doomed.log_path().display(), "removed an empty segment left by an interrupted roll");
                bases.pop();
            }
            _ => break,
        }
    }
    let (clean, point) = recovery.unwrap_or((false, 0));
    let scan_from = if clean { bases.len() } else { bases.partition_point(|b| *b <= point).saturating_sub(1) };
    let mut out = RecoveredLog {
        segments: Vec::with_capacity(bases.len()),
        allocated: 0,
        truncated_bytes: 0,
        scanned_segments: 0,
    };
    let last = bases.len() - 1;
    let mut i = 0;
    while i < bases.len() {
        let seg = Segment::existing(dir, bases[i], capacity);
        let file_len =
            std::fs::metadata(seg.log_path()).map_err(|e| StorageError::io("stat", seg.log_path(), e))?.len();
        // A segment longer than today's segment_bytes (a topics.json edited by hand) is mapped
        // whole; the next append rolls it.
        let seg = if file_len > capacity { Segment::existing(dir, bases[i], file_len) } else { seg };
        let next_base = bases.get(i + 1).copied();
        let trusted = i < scan_from
            && if i == last {
                restore_clean_active(&seg, file_len, point, interval)?
            } else {
                restore_sealed(&seg, file_len, next_base)?
            };
        if !trusted {
            out.scanned_segments += 1;
            let (ok, cut) = scan_and_restore(&seg, file_len, next_base, i == last, interval, entries_max)?;
            out.truncated_bytes += cut;
            if !ok {
                // Everything after a damaged segment follows a hole: remove it.
                for later in &bases[i + 1..] {
                    let doomed = Segment::existing(dir, *later, capacity);
                    let len = std::fs::metadata(doomed.log_path()).map(|m| m.len()).unwrap_or(0);
                    out.truncated_bytes += len.saturating_sub(LOG_HEADER_LEN);
                    doomed.delete_files()?;
                    tracing::warn!(segment = %doomed.log_path().display(), "removed a segment after a cut in the log");
                }
                bases.truncate(i + 1);
                out.segments.push(Arc::new(seg));
                break;
            }
        }
        out.segments.push(Arc::new(seg));
        i += 1;
    }
    let active = out.segments.last().expect("at least one segment");
    active.unseal();
    out.allocated =
        std::fs::metadata(active.log_path()).map_err(|e| StorageError::io("stat", active.log_path(), e))?.len();
    if out.truncated_bytes > 0 {
        metrics::counter!("cairn_recovery_truncated_bytes_total").increment(out.truncated_bytes);
        tracing::warn!(dir = %dir.display(), truncated_bytes = out.truncated_bytes, log_end_offset = active.next_offset(),
            "recovery cut a torn or corrupt tail");
    }
    sync_dir(dir)?;
    Ok(out)
}

/// Base offsets of the `.log` files in `dir`; removes leftover temp files.
fn list_segments(dir: &Path) -> Result<Vec<u64>> {
    let mut bases = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| StorageError::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StorageError::io("list", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(base) = parse_log_name(name) {
            bases.push(base);
        } else if name.ends_with(".tmp") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(bases)
}

/// A sealed segment before the recovery point: trust its length and take its max timestamp from
/// the time index header. Returns `false` when that header is unusable (then it is scanned).
fn restore_sealed(seg: &Segment, file_len: u64, next_base: Option<u64>) -> Result<bool> {
    let (_, time_path) = seg.index_paths();
    let Some(next) = next_base else {
        return Ok(false);
    };
    let Some(max_ts) = read_time_header(time_path)? else {
        return Ok(false);
    };
    seg.restore(file_len, next, max_ts, None);
    Ok(true)
}

fn read_time_header(path: &Path) -> Result<Option<Option<i64>>> {
    use std::os::unix::fs::FileExt;
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StorageError::io("open", path, e)),
    };
    let mut buf = [0u8; TIME_HEADER_LEN];
    match file.read_exact_at(&mut buf, 0) {
        Ok(()) => Ok(time_index_max_timestamp(&buf)),
        Err(_) => Ok(None),
    }
}

/// The active segment after a clean shutdown: load its indexes, then walk (and CRC-check) the
/// batches after the last index entry to the end of the trimmed file. The result must end
/// exactly at the file's end and at the checkpointed recovery point; otherwise it is scanned.
fn restore_clean_active(seg: &Segment, file_len: u64, point: u64, interval: u32) -> Result<bool> {
    if file_len == LOG_HEADER_LEN {
        if point != seg.base_offset {
            return Ok(false);
        }
        seg.restore(LOG_HEADER_LEN, seg.base_offset, None, Some(SegmentIndex::default()));
        return Ok(true);
    }
    let (index_path, time_path) = seg.index_paths();
    let offsets = read_index_file(index_path).map_err(|e| StorageError::io("read", index_path, e))?;
    let times = read_index_file(time_path).map_err(|e| StorageError::io("read", time_path, e))?;
    let Some(mut idx) = SegmentIndex::decode(&offsets, &times) else {
        return Ok(false);
    };
    let file = File::open(seg.log_path()).map_err(|e| StorageError::io("open", seg.log_path(), e))?;
    let map = LogMap::read_only(&file, file_len as usize).map_err(|e| StorageError::io("mmap", seg.log_path(), e))?;
    let data = map.slice(0, file_len as usize);
    let last = *idx.offsets.last().expect("decode rejects empty indexes");
    let mut pos = u64::from(last.pos);
    let mut next = seg.base_offset + u64::from(last.rel);
    while pos < file_len {
        let Some(b) = stored_batch_at(data, pos) else {
            return Ok(false);
        };
        if b.base_offset != next || check_batch(&data[pos as usize..(pos + b.total_len) as usize]).is_err() {
            return Ok(false);
        }
        next = b.last_offset + 1;
        pos += b.total_len;
    }
    if pos != file_len || next != point {
        return Ok(false);
    }
    idx.set_bytes_since_entry(file_len - u64::from(last.pos));
    let _ = interval;
    let max_ts = idx.max_timestamp();
    seg.restore(file_len, next, max_ts, Some(idx));
    Ok(true)
}

/// Scans a segment, restores its state from the scan, and cuts the file at the first damage.
/// Returns whether the segment is intact (for a sealed one: ends exactly where the next begins)
/// and how many bytes were cut.
fn scan_and_restore(
    seg: &Segment,
    file_len: u64,
    next_base: Option<u64>,
    is_last: bool,
    interval: u32,
    entries_max: usize,
) -> Result<(bool, u64)> {
    let file = File::open(seg.log_path()).map_err(|e| StorageError::io("open", seg.log_path(), e))?;
    let scan = if file_len == 0 {
        scan_log(&[], seg.base_offset, interval, entries_max)
    } else {
        let map =
            LogMap::read_only(&file, file_len as usize).map_err(|e| StorageError::io("mmap", seg.log_path(), e))?;
        scan_log(map.slice(0, file_len as usize), seg.base_offset, interval, entries_max)
    };
    let clean_end = matches!(scan.stop, ScanStop::End);
    // A sealed segment whose batches reach the next segment's base has lost nothing, whatever
    // follows its last batch: those bytes (a write that failed part-way and was never
    // overwritten before the roll) are cut, and the later segments stay.
    let intact = match next_base {
        Some(next) => scan.next_offset == next,
        None => clean_end,
    };
    let mut cut = 0;
    if !intact || !clean_end {
        cut = damaged_bytes(seg, scan.valid_len, file_len)?;
        tracing::warn!(segment = %seg.log_path().display(), at_byte = scan.valid_len, at_offset = scan.next_offset,
            cut_bytes = cut, reason = ?scan.stop, "cutting the log");
    }
    if scan.valid_len < LOG_HEADER_LEN {
        // No usable header at all: start the segment afresh.
        rewrite_header(seg)?;
        seg.restore(LOG_HEADER_LEN, seg.base_offset, None, Some(SegmentIndex::default()));
        return Ok((intact && is_last, cut));
    }
    let max_ts = scan.index.max_timestamp();
    seg.restore(scan.valid_len, scan.next_offset, max_ts, Some(scan.index));
    // Cut the file after its last good batch. The active segment keeps its preallocated tail
    // only when nothing but zeros follows its last batch: a power loss can lose a page in the
    // middle of the tail, and the zeros read as the normal end, but later pages that did reach
    // the disk would still hold old batches. Appends that happen to end where one of them begins
    // would bring it back at the next recovery.
    let stale = file_len > scan.valid_len
        && (!intact || !is_last || stale_bytes_after(&file, seg.log_path(), scan.valid_len, file_len)?);
    if stale {
        match seg.truncate_file(scan.valid_len) {
            Ok(()) => {}
            // Read-only: the cut cannot be persisted, but readers never look past the
            // recovered length, and nothing can be appended after it either.
            Err(StorageError::ReadOnly { .. }) if !intact => {
                tracing::warn!(segment = %seg.log_path().display(), "read-only filesystem: the cut is not persisted");
            }
            Err(StorageError::ReadOnly { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    // A scanned segment holds bytes written after the last checkpointed sync: after a kill -9
    // they may be only in the page cache. They are served (and a retried idempotent batch among
    // them is acknowledged as a duplicate) as durable from now on, so make them so.
    sync_scanned(&file, seg)?;
    if !is_last && intact {
        // The index is in memory either way; on a full disk the files wait for a later seal.
        if let Err(e) = seg.with_index(interval, entries_max, |idx| seg.write_index_files(idx))? {
            tracing::warn!(segment = %seg.log_path().display(), error = %e, "could not persist a rebuilt index");
        }
    }
    Ok((intact, cut))
}

/// Most bytes of data regions [`stale_bytes_after`] reads before it answers "yes" anyway.
const STALE_CHECK_BYTES: u64 = 1 << 20;

/// Whether anything but zeros follows `from` in the file. `SEEK_DATA` skips the preallocated,
/// never-written tail without reading it; what it reports as data (written blocks, or pages
/// readahead brought in) is read and checked. Past [`STALE_CHECK_BYTES`] of data, or where the
/// filesystem cannot tell, the answer is `true`: the caller then cuts the file, which is always
/// safe, only slower to append to afterwards.
fn stale_bytes_after(file: &File, path: &Path, from: u64, file_len: u64) -> Result<bool> {
    use rustix::fs::{seek, SeekFrom};
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 64 * 1024];
    let mut pos = from;
    let mut budget = STALE_CHECK_BYTES;
    while pos < file_len {
        let start = match seek(file, SeekFrom::Data(pos)) {
            Ok(p) => p,
            Err(rustix::io::Errno::NXIO) => return Ok(false),
            Err(_) => return Ok(true),
        };
        let end = match seek(file, SeekFrom::Hole(start)) {
            Ok(p) => p.min(file_len),
            Err(_) => return Ok(true),
        };
        let mut at = start;
        while at < end {
            if budget == 0 {
                return Ok(true);
            }
            let n = (end - at).min(buf.len() as u64).min(budget) as usize;
            file.read_exact_at(&mut buf[..n], at).map_err(|e| StorageError::io("read", path, e))?;
            if buf[..n].iter().any(|b| *b != 0) {
                return Ok(true);
            }
            at += n as u64;
            budget -= n as u64;
        }
        pos = end.max(start + 1);
    }
    Ok(false)
}

/// `fdatasync` of a scanned segment. Its cost is the dirty pages the kernel still holds for the
/// file, that is the bytes written since the last sync, not the segment's size. On a read-only
/// filesystem nothing can be dirty and there is nothing to do.
fn sync_scanned(file: &File, seg: &Segment) -> Result<()> {
    match sync_log_file(file, seg.log_path(), false) {
        Err(StorageError::ReadOnly { .. }) => Ok(()),
        other => other,
    }
}

/// Bytes from `from` to the last non-zero byte of the file: what a cut really removes (the
/// preallocated zero tail is not data).
fn damaged_bytes(seg: &Segment, from: u64, file_len: u64) -> Result<u64> {
    if file_len <= from {
        return Ok(0);
    }
    let file = File::open(seg.log_path()).map_err(|e| StorageError::io("open", seg.log_path(), e))?;
    let map = LogMap::read_only(&file, file_len as usize).map_err(|e| StorageError::io("mmap", seg.log_path(), e))?;
    let tail = map.slice(from as usize, (file_len - from) as usize);
    Ok(tail.iter().rposition(|b| *b != 0).map_or(0, |p| p as u64 + 1))
}

fn rewrite_header(seg: &Segment) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(seg.log_path())
        .map_err(|e| StorageError::io("open", seg.log_path(), e))?;
    file.set_len(0).map_err(|e| StorageError::io("truncate", seg.log_path(), e))?;
    let mut h = [0u8; LOG_HEADER_LEN as usize];
    h[..8].copy_from_slice(b"CAIRNLOG");
    h[8..12].copy_from_slice(&1u32.to_be_bytes());
    file.write_all_at(&h, 0).map_err(|e| StorageError::io("write header", seg.log_path(), e))?;
    sync_log_file(&file, seg.log_path(), true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn preallocated(dir: &Path, written: &[u8], len: u64) -> File {
        let path = dir.join("seg.log");
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        super::super::segment::fallocate(&file, &path, len).unwrap();
        file.write_all_at(written, 0).unwrap();
        file
    }

    #[test]
    fn a_preallocated_tail_of_zeros_is_not_stale_but_any_byte_after_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg.log");
        let len = 8 << 20;
        let file = preallocated(dir.path(), &[7u8; 10_000], len);
        assert!(!stale_bytes_after(&file, &path, 10_000, len).unwrap());
        assert!(stale_bytes_after(&file, &path, 9_000, len).unwrap(), "the written bytes themselves");
        // A byte far into the tail, past a run of zeros (a page lost in a power loss).
        file.write_all_at(&[1], 5 << 20).unwrap();
        assert!(stale_bytes_after(&file, &path, 10_000, len).unwrap());
        // Within the first page after the end, too.
        let file = preallocated(dir.path(), &[7u8; 10_000], len);
        file.write_all_at(&[1], 10_050).unwrap();
        assert!(stale_bytes_after(&file, &path, 10_000, len).unwrap());
    }

    #[test]
    fn a_tail_read_into_the_page_cache_is_still_found_to_be_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg.log");
        let len = 4 << 20;
        let file = preallocated(dir.path(), &[7u8; 100], len);
        // Reading the tail makes its pages look like data to SEEK_DATA on some filesystems.
        let mut buf = vec![0u8; 512 * 1024];
        file.read_exact_at(&mut buf, 100).unwrap();
        assert!(!stale_bytes_after(&file, &path, 100, len).unwrap());
    }
}
