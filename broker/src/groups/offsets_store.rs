//! Committed offsets, stored durably in the internal topic `__consumer_offsets`.
//!
//! Each commit appends one record per partition and is acknowledged only after an fsync.
//!
//! ```text
//! key:   version u8 (1) | group_len u16 | group | topic_len u16 | topic | partition u32   (BE)
//! value: offset i64 | commit_timestamp_ms i64 | metadata_len u16 (0xFFFF = null) | metadata
//!        a null value deletes the entry (a deleted topic's offsets)
//! ```
//!
//! On start the log is replayed (last record per key wins). When the log grows past
//! `offsets_snapshot_bytes`, the current state is rewritten at the end of the log in a fresh
//! segment and every earlier segment is deleted, so the log stays proportional to the number of
//! committed partitions, not to the number of commits.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use cairn_protocol::record_batch::{BatchHeader, BatchSplitter, RecordBatch, RecordBatchBuilder};

use crate::storage::{LogStore, PartitionLog, StorageError, TopicConfig};

/// Name of the internal topic.
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";

/// `(group, topic, partition)`.
pub(crate) type OffsetKey = (String, String, u32);

/// One committed offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Committed {
    pub(crate) offset: i64,
    pub(crate) commit_timestamp_ms: i64,
    pub(crate) metadata: Option<String>,
}

/// Opens (creating) the offsets topic and replays it.
pub(crate) fn open(store: &LogStore) -> Result<(Arc<PartitionLog>, BTreeMap<OffsetKey, Committed>), StorageError> {
    let log = match store.partition(OFFSETS_TOPIC, 0) {
        Some(p) => p,
        None => {
            let mut config: TopicConfig = store.config().topic_defaults();
            config.retention_ms = None;
            config.retention_bytes = None;
            config.segment_bytes = 64 * 1024 * 1024;
            store.create_topic(OFFSETS_TOPIC, 1, config)?.partitions[0].clone()
        }
    };
    let mut state = BTreeMap::new();
    let mut next = log.log_start_offset();
    let end = log.log_end_offset();
    while next < end {
        let read = match log.read(next, 4 * 1024 * 1024) {
            Ok(read) => read,
            Err(e) if is_unreadable(&e) => {
                // No batch boundary can be found after the damage: go on at the next segment.
                let resume = log.segments().iter().map(|s| s.base_offset).find(|&b| b > next).unwrap_or(end);
                skipped_damage(next, resume, &e.to_string());
                next = resume;
                continue;
            }
            Err(e) => return Err(e),
        };
        if read.is_empty() {
            break;
        }
        for chunk in read.chunks {
            let mut batches = BatchSplitter::new(chunk);
            while let Some(raw) = batches.next_raw() {
                let (checked, header) = match raw {
                    Ok(bytes) => (RecordBatch::new(bytes.clone()), BatchHeader::parse(&bytes).ok()),
                    Err(e) => (Err(e), None),
                };
                let batch = match checked {
                    Ok(batch) => batch,
                    Err(e) => {
                        // Its offsets are as the segment's reader walked them; what the CRC
                        // covers is not to be trusted. Never step back, never past the log end.
                        let after = header.map_or(next + 1, |h| h.next_offset().max(0) as u64);
                        let resume = after.clamp(next + 1, end);
                        skipped_damage(next, resume, &e.to_string());
                        next = resume;
                        continue;
                    }
                };
                for record in batch.records() {
                    let record = match record {
                        Ok(record) => record,
                        Err(e) => {
                            let resume = (batch.header().next_offset().max(0) as u64).clamp(next + 1, end);
                            skipped_damage(next, resume, &e.to_string());
                            next = resume;
                            break;
                        }
                    };
                    if record.offset < next as i64 {
                        continue;
                    }
                    next = record.offset as u64 + 1;
                    let Some(key) = record.key.as_deref().and_then(decode_key) else {
                        tracing::warn!(offset = record.offset, "skipping unreadable committed-offset record");
                        continue;
                    };
                    match record.value.as_deref().map(decode_value) {
                        None => {
                            state.remove(&key);
                        }
                        Some(Some(v)) => {
                            state.insert(key, v);
                        }
                        Some(None) => {
                            tracing::warn!(offset = record.offset, "skipping unreadable committed-offset value")
                        }
                    }
                }
            }
        }
    }
    Ok((log, state))
}

/// Whether `e` is a read that found bytes it could not take apart as batches (damage on disk),
/// as opposed to a failure of the disk or the system.
fn is_unreadable(e: &StorageError) -> bool {
    matches!(e, StorageError::Io { source, .. } if source.kind() == std::io::ErrorKind::InvalidData)
}

/// Logs and counts a damaged stretch `[from, resume)` of the offsets log skipped at startup.
/// The commits in it are lost: their groups resume from an earlier commit of theirs (records are
/// delivered again) or, with none, from `auto_offset_reset`.
fn skipped_damage(from: u64, resume: u64, error: &str) {
    tracing::error!(
        topic = OFFSETS_TOPIC,
        from_offset = from,
        resume_offset = resume,
        error,
        "damaged committed-offset batch skipped; the commits in it are lost"
    );
    metrics::counter!("cairn_committed_offsets_damaged_batches_total").increment(1);
}

/// Largest batch written to the offsets log (well under the default `batch_bytes_max`).
const OFFSETS_BATCH_BYTES: usize = 256 * 1024;

/// Encodes commits (a `None` value deletes) as record batches of at most about
/// [`OFFSETS_BATCH_BYTES`] each, so a large commit or snapshot never exceeds the batch limit.
fn encode_batches(entries: &[(OffsetKey, Option<Committed>)], now_ms: i64) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut b = RecordBatchBuilder::with_capacity(4096);
    for (key, value) in entries {
        let k = encode_key(key);
        let v = value.as_ref().map(encode_value);
        if !b.is_empty() && b.size_bytes() + k.len() + v.as_ref().map_or(0, Bytes::len) + 32 > OFFSETS_BATCH_BYTES {
            out.push(std::mem::replace(&mut b, RecordBatchBuilder::with_capacity(4096)).build());
        }
        b.push(now_ms, Some(&k), v.as_deref(), &[]);
    }
    if !b.is_empty() {
        out.push(b.build());
    }
    out
}

/// Appends `entries` (a `None` value deletes) to the offsets log, in batches under the limit.
/// Returns the offset after the last one; not synced.
///
/// # Errors
/// The append's storage error; batches before it stay appended.
pub(crate) fn append(
    log: &PartitionLog,
    entries: &[(OffsetKey, Option<Committed>)],
    now_ms: i64,
) -> Result<u64, StorageError> {
    let mut next = log.log_end_offset();
    for batch in encode_batches(entries, now_ms) {
        next = log.append(&batch)?.next_offset;
    }
    Ok(next)
}

fn encode_key((group, topic, partition): &OffsetKey) -> Bytes {
    let mut k = BytesMut::with_capacity(9 + group.len() + topic.len());
    k.put_u8(1);
    k.put_u16(group.len() as u16);
    k.put_slice(group.as_bytes());
    k.put_u16(topic.len() as u16);
    k.put_slice(topic.as_bytes());
    k.put_u32(*partition);
    k.freeze()
}

fn encode_value(c: &Committed) -> Bytes {
    let meta = c.metadata.as_deref();
    let mut v = BytesMut::with_capacity(18 + meta.map_or(0, str::len));
    v.put_i64(c.offset);
    v.put_i64(c.commit_timestamp_ms);
    match meta {
        None => v.put_u16(u16::MAX),
        Some(m) => {
            v.put_u16(m.len() as u16);
            v.put_slice(m.as_bytes());
        }
    }
    v.freeze()
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if b.len() < n {
        return None;
    }
    let (head, rest) = b.split_at(n);
    *b = rest;
    Some(head)
}

fn take_str(b: &mut &[u8]) -> Option<String> {
    let len = u16::from_be_bytes(take(b, 2)?.try_into().ok()?) as usize;
    String::from_utf8(take(b, len)?.to_vec()).ok()
}

fn decode_key(mut b: &[u8]) -> Option<OffsetKey> {
    if take(&mut b, 1)? != [1] {
        return None;
    }
    let group = take_str(&mut b)?;
    let topic = take_str(&mut b)?;
    let partition = u32::from_be_bytes(take(&mut b, 4)?.try_into().ok()?);
    b.is_empty().then_some((group, topic, partition))
}

fn decode_value(mut b: &[u8]) -> Option<Committed> {
    let offset = i64::from_be_bytes(take(&mut b, 8)?.try_into().ok()?);
    let commit_timestamp_ms = i64::from_be_bytes(take(&mut b, 8)?.try_into().ok()?);
    let len = u16::from_be_bytes(take(&mut b, 2)?.try_into().ok()?);
    let metadata =
        if len == u16::MAX { None } else { Some(String::from_utf8(take(&mut b, len as usize)?.to_vec()).ok()?) };
    b.is_empty().then_some(Committed { offset, commit_timestamp_ms, metadata })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_round_trip() {
        let key = ("g".to_string(), "t-1".to_string(), 7);
        assert_eq!(decode_key(&encode_key(&key)), Some(key));
        for metadata in [None, Some(String::new()), Some("note".to_string())] {
            let c = Committed { offset: 42, commit_timestamp_ms: 5, metadata };
            assert_eq!(decode_value(&encode_value(&c)), Some(c));
        }
        assert_eq!(decode_value(&[1, 2, 3]), None);
    }

    #[test]
    fn large_commits_and_snapshots_split_into_batches_under_the_limit() {
        let meta = "m".repeat(4000);
        let entries: Vec<(OffsetKey, Option<Committed>)> = (0..1000u32)
            .map(|p| {
                let c = Committed { offset: i64::from(p), commit_timestamp_ms: 1, metadata: Some(meta.clone()) };
                (("g".to_string(), "t".to_string(), p), Some(c))
            })
            .collect();
        let batches = encode_batches(&entries, 5);
        assert!(batches.len() > 1);
        let mut records = 0;
        for b in &batches {
            let h = cairn_protocol::record_batch::validate_for_append(b, 1 << 20).unwrap();
            records += h.record_count;
        }
        assert_eq!(records, 1000);
    }
}
