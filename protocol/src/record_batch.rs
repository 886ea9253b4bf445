//! Kafka's RecordBatch v2 (magic 2), byte for byte.
//!
//! ```text
//! offset  size  field                 notes
//!      0     8  baseOffset            i64; assigned by the broker (outside the CRC)
//!      8     4  batchLength           i32; bytes after this field
//!     12     4  partitionLeaderEpoch  i32; -1 when unknown (outside the CRC)
//!     16     1  magic                 i8; always 2
//!     17     4  crc                   u32; CRC32C of bytes 21..end
//!     21     2  attributes            i16; bits 0-2 compression, 3 timestamp type,
//!                                     4 transactional, 5 control, 6 delete horizon, 7-15 unused
//!     23     4  lastOffsetDelta       i32
//!     27     8  baseTimestamp         i64; first timestamp, ms since the epoch
//!     35     8  maxTimestamp          i64
//!     43     8  producerId            i64; -1 when not idempotent
//!     51     2  producerEpoch         i16
//!     53     4  baseSequence          i32
//!     57     4  recordCount           i32
//!     61     -  records               see [`crate::record`]
//! ```
//!
//! Cairn sends no compressed batches yet; decoding rejects compression codecs and unknown
//! attribute bits with a typed error instead of misreading them.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::record::{put_record_head, put_record_tail, record_body_len, scan_record, Header, Record, RecordCursor};
use crate::wire::SHARED_CHUNK_BYTES_MIN;

/// Bytes of the fixed batch header, up to the first record.
pub const BATCH_HEADER_LEN: usize = 61;
/// Bytes before `batchLength` counts: baseOffset and batchLength themselves.
pub const LOG_OVERHEAD: usize = 12;
/// The only supported magic value.
pub const MAGIC_V2: i8 = 2;

const BASE_OFFSET_AT: usize = 0;
const LENGTH_AT: usize = 8;
const LEADER_EPOCH_AT: usize = 12;
const MAGIC_AT: usize = 16;
const CRC_AT: usize = 17;
const ATTRIBUTES_AT: usize = 21;
const LAST_OFFSET_DELTA_AT: usize = 23;
const BASE_TIMESTAMP_AT: usize = 27;
const MAX_TIMESTAMP_AT: usize = 35;
const PRODUCER_ID_AT: usize = 43;
const PRODUCER_EPOCH_AT: usize = 51;
const BASE_SEQUENCE_AT: usize = 53;
const RECORD_COUNT_AT: usize = 57;
const _: () = assert!(RECORD_COUNT_AT + 4 == BATCH_HEADER_LEN);

/// Attribute bits 0-2: compression codec.
pub const ATTR_COMPRESSION_MASK: u16 = 0x07;
/// Attribute bit 3: timestamps are log-append time rather than create time.
pub const ATTR_TIMESTAMP_TYPE: u16 = 0x08;
/// Attribute bit 4: part of a transaction.
pub const ATTR_TRANSACTIONAL: u16 = 0x10;
/// Attribute bit 5: a control batch.
pub const ATTR_CONTROL: u16 = 0x20;
/// Attribute bit 6: the batch carries a delete horizon (set by compaction).
pub const ATTR_DELETE_HORIZON: u16 = 0x40;
/// Every attribute bit Kafka defines; the rest must be zero.
pub const ATTR_KNOWN_BITS: u16 = 0x7f;

/// Why a record batch is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// Fewer bytes than the header or the declared length need.
    #[error("batch is truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// `batchLength` does not match the bytes given or is impossible.
    #[error("batchLength {declared} does not match the {actual} bytes after it")]
    LengthMismatch {
        /// Value of the batchLength field.
        declared: i64,
        /// Bytes actually present after the field.
        actual: usize,
    },
    /// The batch is larger than allowed.
    #[error("batch of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Batch size in bytes.
        len: usize,
        /// Configured limit.
        max: usize,
    },
    /// The magic byte is not 2.
    #[error("unsupported magic {0}: only RecordBatch v2 (magic 2) is supported")]
    UnsupportedMagic(i8),
    /// The stored CRC32C does not match the bytes.
    #[error("CRC32C mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    CrcMismatch {
        /// CRC in the header.
        stored: u32,
        /// CRC of the bytes.
        computed: u32,
    },
    /// Attribute bits outside the ones Kafka defines are set.
    #[error("unknown attribute bits set: {0:#06x}")]
    UnknownAttributes(u16),
    /// The batch is compressed; Cairn does not support compression yet.
    #[error("compression codec {0} is not supported")]
    UnsupportedCompression(u8),
    /// The batch is transactional, a control batch, or carries a delete horizon.
    #[error("unsupported batch feature: {0}")]
    UnsupportedFeature(&'static str),
    /// `recordCount` is not positive or disagrees with the records present.
    #[error("record count {declared} does not match the {found} records present")]
    RecordCountMismatch {
        /// Count in the header.
        declared: i64,
        /// Records found.
        found: usize,
    },
    /// A record's offset (base offset plus its delta) is past `i64::MAX`: a damaged base offset,
    /// which the CRC does not cover.
    #[error("base offset {base_offset} plus offset delta {delta} is past the largest offset")]
    OffsetOverflow {
        /// Base offset in the header.
        base_offset: i64,
        /// The record's offset delta.
        delta: i32,
    },
    /// `lastOffsetDelta` disagrees with the records.
    #[error("lastOffsetDelta {declared} does not match the record count {count}")]
    LastOffsetDeltaMismatch {
        /// Value in the header.
        declared: i32,
        /// Record count.
        count: i32,
    },
    /// A record's offset delta is not its position in the batch.
    #[error("record {index} has offset delta {delta}; produced batches need dense deltas")]
    OffsetDeltaGap {
        /// Record position in the batch.
        index: usize,
        /// Delta found.
        delta: i32,
    },
    /// The header's max timestamp is not the largest of its records' (create time).
    #[error("maxTimestamp {declared} is not the records' largest timestamp {records}")]
    MaxTimestampMismatch {
        /// Value in the header.
        declared: i64,
        /// Largest record timestamp.
        records: i64,
    },
    /// A record is malformed.
    #[error("record {index} is malformed: {detail}")]
    MalformedRecord {
        /// Record position in the batch.
        index: usize,
        /// What is wrong.
        detail: &'static str,
    },
}

fn be_i64(b: &[u8], at: usize) -> i64 {
    i64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn be_i32(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}

/// The fixed header of a record batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Offset of the first record.
    pub base_offset: i64,
    /// Bytes after the batchLength field.
    pub batch_length: i32,
    /// Partition leader epoch (-1 when unknown).
    pub partition_leader_epoch: i32,
    /// Magic byte (2).
    pub magic: i8,
    /// Stored CRC32C.
    pub crc: u32,
    /// Attribute bits.
    pub attributes: u16,
    /// Offset of the last record relative to `base_offset`.
    pub last_offset_delta: i32,
    /// Timestamp of the first record.
    pub base_timestamp: i64,
    /// Largest timestamp in the batch.
    pub max_timestamp: i64,
    /// Producer id (-1 when not idempotent).
    pub producer_id: i64,
    /// Producer epoch.
    pub producer_epoch: i16,
    /// Sequence number of the first record.
    pub base_sequence: i32,
    /// Number of records.
    pub record_count: i32,
}

impl BatchHeader {
    /// Parses the 61-byte header. Only checks that the bytes are there.
    ///
    /// # Errors
    /// [`BatchError::Truncated`] when `buf` is shorter than the header.
    pub fn parse(buf: &[u8]) -> Result<BatchHeader, BatchError> {
        if buf.len() < BATCH_HEADER_LEN {
            return Err(BatchError::Truncated { need: BATCH_HEADER_LEN, have: buf.len() });
        }
        Ok(BatchHeader {
            base_offset: be_i64(buf, BASE_OFFSET_AT),
            batch_length: be_i32(buf, LENGTH_AT),
            partition_leader_epoch: be_i32(buf, LEADER_EPOCH_AT),
            magic: buf[MAGIC_AT] as i8,
            crc: be_u32(buf, CRC_AT),
            attributes: be_i16(buf, ATTRIBUTES_AT) as u16,
            last_offset_delta: be_i32(buf, LAST_OFFSET_DELTA_AT),
            base_timestamp: be_i64(buf, BASE_TIMESTAMP_AT),
            max_timestamp: be_i64(buf, MAX_TIMESTAMP_AT),
            producer_id: be_i64(buf, PRODUCER_ID_AT),
            producer_epoch: be_i16(buf, PRODUCER_EPOCH_AT),
            base_sequence: be_i32(buf, BASE_SEQUENCE_AT),
            record_count: be_i32(buf, RECORD_COUNT_AT),
        })
    }

    /// Total bytes of the batch on the wire and on disk.
    pub fn total_len(&self) -> usize {
        LOG_OVERHEAD + self.batch_length.max(0) as usize
    }

    /// Offset of the last record.
    pub fn last_offset(&self) -> i64 {
        self.base_offset + i64::from(self.last_offset_delta)
    }

    /// Offset after the last record.
    pub fn next_offset(&self) -> i64 {
        self.last_offset() + 1
    }

    /// Compression codec bits (0 = none).
    pub fn compression(&self) -> u8 {
        (self.attributes & ATTR_COMPRESSION_MASK) as u8
    }
}

/// Reads the total length of the batch starting at `buf[0]` from its first 12 bytes, if present.
///
/// Returns `None` when fewer than 12 bytes are available. A non-positive or absurd length is
/// returned as is; callers check it against what they hold.
pub fn peek_total_len(buf: &[u8]) -> Option<i64> {
    if buf.len() < LOG_OVERHEAD {
        return None;
    }
    Some(LOG_OVERHEAD as i64 + i64::from(be_i32(buf, LENGTH_AT)))
}

/// CRC32C over the part of the batch the CRC covers (attributes to the end).
pub fn compute_crc(batch: &[u8]) -> u32 {
    crc32c::crc32c(&batch[ATTRIBUTES_AT..])
}

/// Overwrites the base offset of a batch in place; the CRC does not cover it.
///
/// # Panics
/// If `batch` is shorter than 8 bytes.
pub fn set_base_offset(batch: &mut [u8], base_offset: i64) {
    batch[BASE_OFFSET_AT..BASE_OFFSET_AT + 8].copy_from_slice(&base_offset.to_be_bytes());
}

/// Checks one whole batch (exactly `buf`): header, length, magic, attributes, CRC32C, and that
/// its offsets fit in an `i64`.
///
/// This is the check recovery and readers use; it does not walk the records.
///
/// # Errors
/// The first problem found, as a [`BatchError`].
pub fn check_batch(buf: &[u8]) -> Result<BatchHeader, BatchError> {
    let header = BatchHeader::parse(buf)?;
    let declared = i64::from(header.batch_length);
    if declared < (BATCH_HEADER_LEN - LOG_OVERHEAD) as i64 || declared as usize != buf.len() - LOG_OVERHEAD {
        return Err(BatchError::LengthMismatch { declared, actual: buf.len() - LOG_OVERHEAD });
    }
    if header.magic != MAGIC_V2 {
        return Err(BatchError::UnsupportedMagic(header.magic));
    }
    let computed = compute_crc(buf);
    if computed != header.crc {
        return Err(BatchError::CrcMismatch { stored: header.crc, computed });
    }
    if header.attributes & !ATTR_KNOWN_BITS != 0 {
        return Err(BatchError::UnknownAttributes(header.attributes & !ATTR_KNOWN_BITS));
    }
    if header.compression() != 0 {
        return Err(BatchError::UnsupportedCompression(header.compression()));
    }
    // Not covered by the CRC: a damaged base offset must not overflow `next_offset`.
    if header.base_offset.checked_add(i64::from(header.last_offset_delta)).and_then(|l| l.checked_add(1)).is_none() {
        return Err(BatchError::OffsetOverflow { base_offset: header.base_offset, delta: header.last_offset_delta });
    }
    Ok(header)
}

/// Full validation of a batch a producer sent: everything [`check_batch`] checks, plus a size
/// limit, no transactional/control/delete-horizon bits, a positive record count that matches the
/// records, dense offset deltas `0..count`, and every record well-formed.
///
/// # Errors
/// The first problem found, as a [`BatchError`].
pub fn validate_for_append(buf: &[u8], batch_bytes_max: usize) -> Result<BatchHeader, BatchError> {
    if buf.len() > batch_bytes_max {
        return Err(BatchError::TooLarge { len: buf.len(), max: batch_bytes_max });
    }
    let header = check_batch(buf)?;
    if header.attributes & ATTR_TRANSACTIONAL != 0 {
        return Err(BatchError::UnsupportedFeature("transactional batches"));
    }
    if header.attributes & ATTR_CONTROL != 0 {
        return Err(BatchError::UnsupportedFeature("control batches"));
    }
    if header.attributes & ATTR_DELETE_HORIZON != 0 {
        return Err(BatchError::UnsupportedFeature("delete horizon"));
    }
    if header.record_count <= 0 {
        return Err(BatchError::RecordCountMismatch { declared: header.record_count.into(), found: 0 });
    }
    if header.last_offset_delta != header.record_count - 1 {
        return Err(BatchError::LastOffsetDeltaMismatch {
            declared: header.last_offset_delta,
            count: header.record_count,
        });
    }
    let mut cur = RecordCursor::new(buf, BATCH_HEADER_LEN, buf.len());
    let count = header.record_count as usize;
    // Each record takes at least 7 bytes; a count the bytes cannot hold is a mismatch.
    if count > (buf.len() - BATCH_HEADER_LEN) / 7 {
        return Err(BatchError::RecordCountMismatch { declared: count as i64, found: 0 });
    }
    let mut max_delta = i64::MIN;
    for index in 0..count {
        if cur.pos >= buf.len() {
            return Err(BatchError::RecordCountMismatch { declared: count as i64, found: index });
        }
        let span = scan_record(&mut cur, index, false)?;
        if span.offset_delta != index as i32 {
            return Err(BatchError::OffsetDeltaGap { index, delta: span.offset_delta });
        }
        max_delta = max_delta.max(span.timestamp_delta);
    }
    if cur.pos != buf.len() {
        return Err(BatchError::MalformedRecord { index: count, detail: "bytes after the last record" });
    }
    // Create-time batches: the broker indexes and retains by the header's max timestamp, so it
    // must be the records' own (log-append-time batches get theirs from the broker).
    let records_max = header.base_timestamp.wrapping_add(max_delta);
    if header.attributes & ATTR_TIMESTAMP_TYPE == 0 && header.max_timestamp != records_max {
        return Err(BatchError::MaxTimestampMismatch { declared: header.max_timestamp, records: records_max });
    }
    Ok(header)
}

/// A decoded record batch over shared bytes; records are read lazily and zero-copy.
#[derive(Debug, Clone)]
pub struct RecordBatch {
    bytes: Bytes,
    header: BatchHeader,
}

impl RecordBatch {
    /// Checks `bytes` (exactly one batch) with [`check_batch`] and wraps it.
    ///
    /// # Errors
    /// As [`check_batch`].
    pub fn new(bytes: Bytes) -> Result<RecordBatch, BatchError> {
        let header = check_batch(&bytes)?;
        Ok(RecordBatch { bytes, header })
    }

    /// The header.
    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// The batch's bytes.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// Iterates the records; each item is an error if that record is malformed.
    pub fn records(&self) -> RecordIter<&RecordBatch> {
        RecordIter { batch: self, pos: BATCH_HEADER_LEN, index: 0, failed: false }
    }

    /// Iterates the records, owning the batch (to decode some now and the rest later).
    pub fn into_records(self) -> RecordIter<RecordBatch> {
        RecordIter { batch: self, pos: BATCH_HEADER_LEN, index: 0, failed: false }
    }
}

/// Iterator over the records of a [`RecordBatch`], borrowed or owned.
#[derive(Debug)]
pub struct RecordIter<B> {
    batch: B,
    pos: usize,
    index: usize,
    failed: bool,
}

impl<B: std::borrow::Borrow<RecordBatch>> Iterator for RecordIter<B> {
    type Item = Result<Record, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        let batch: &RecordBatch = self.batch.borrow();
        let count = batch.header.record_count.max(0) as usize;
        if self.failed || self.index >= count {
            return None;
        }
        let bytes = &batch.bytes;
        if self.pos >= bytes.len() {
            self.failed = true;
            return Some(Err(BatchError::RecordCountMismatch { declared: count as i64, found: self.index }));
        }
        let mut cur = RecordCursor::new(bytes, self.pos, bytes.len());
        let span = match scan_record(&mut cur, self.index, true) {
            Ok(span) => span,
            Err(e) => {
                self.failed = true;
                return Some(Err(e));
            }
        };
        self.pos = cur.pos;
        self.index += 1;
        let slice = |r: Option<(usize, usize)>| r.map(|(a, b)| bytes.slice(a..b));
        let headers = if span.headers.is_empty() {
            Vec::new()
        } else {
            span.headers
                .into_iter()
                .map(|(a, b, v)| Header { key: String::from_utf8_lossy(&bytes[a..b]).into_owned(), value: slice(v) })
                .collect()
        };
        let h = &batch.header;
        // The base offset is outside the CRC: a damaged one must not overflow into a panic.
        let Some(offset) = h.base_offset.checked_add(i64::from(span.offset_delta)) else {
            self.failed = true;
            return Some(Err(BatchError::OffsetOverflow { base_offset: h.base_offset, delta: span.offset_delta }));
        };
        // With log-append time, every record carries the batch's max timestamp (Kafka's rule).
        let timestamp = if h.attributes & ATTR_TIMESTAMP_TYPE != 0 {
            h.max_timestamp
        } else {
            h.base_timestamp.wrapping_add(span.timestamp_delta)
        };
        Some(Ok(Record { offset, timestamp, key: slice(span.key), value: slice(span.value), headers }))
    }
}

/// Splits a buffer of concatenated batches (a fetch response's records) into batches.
///
/// A partial batch at the end (a fetch may be cut at `max_bytes`) is not an error: it is skipped,
/// as Kafka consumers do. A batch that fails [`check_batch`] is returned as an error.
#[derive(Debug)]
pub struct BatchSplitter {
    bytes: Bytes,
    pos: usize,
}

impl BatchSplitter {
    /// Splits `bytes`.
    pub fn new(bytes: Bytes) -> Self {
        BatchSplitter { bytes, pos: 0 }
    }

    /// The next batch's bytes as its length field delimits them, not yet checked: for a caller
    /// that must know where a batch that fails its checks was (to skip it and go on). An
    /// impossible length ends the split, as with [`Iterator::next`].
    pub fn next_raw(&mut self) -> Option<Result<Bytes, BatchError>> {
        let rest = &self.bytes[self.pos..];
        let total = peek_total_len(rest)?;
        if total < BATCH_HEADER_LEN as i64 {
            self.pos = self.bytes.len();
            return Some(Err(BatchError::LengthMismatch { declared: total - LOG_OVERHEAD as i64, actual: rest.len() }));
        }
        let total = total as usize;
        if total > rest.len() {
            return None;
        }
        let batch = self.bytes.slice(self.pos..self.pos + total);
        self.pos += total;
        Some(Ok(batch))
    }
}

impl Iterator for BatchSplitter {
    type Item = Result<RecordBatch, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_raw().map(|raw| raw.and_then(RecordBatch::new))
    }
}

/// One record batch as a producer sends it: a single buffer, or pieces in order whose
/// concatenation is the batch (large values are referenced where the caller keeps them, not
/// copied; see [`RecordBatchBuilder::push_shared`]). Decoded batches are always contiguous.
/// Two payloads are equal when their bytes are, however they are cut.
#[derive(Debug, Clone)]
pub enum BatchPayload {
    /// The whole batch in one buffer.
    Contiguous(Bytes),
    /// The batch in pieces, in order; the first holds the header.
    Parts(Arc<[Bytes]>),
}

impl BatchPayload {
    /// Total bytes.
    pub fn len(&self) -> usize {
        match self {
            BatchPayload::Contiguous(b) => b.len(),
            BatchPayload::Parts(parts) => parts.iter().map(Bytes::len).sum(),
        }
    }

    /// `true` when there are no bytes at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The pieces in order (one for a contiguous batch).
    pub fn parts(&self) -> &[Bytes] {
        match self {
            BatchPayload::Contiguous(b) => std::slice::from_ref(b),
            BatchPayload::Parts(parts) => parts,
        }
    }

    /// The batch in one buffer: free for a contiguous batch, a copy of the pieces otherwise.
    pub fn contiguous(&self) -> Bytes {
        match self {
            BatchPayload::Contiguous(b) => b.clone(),
            BatchPayload::Parts(parts) => {
                let mut all = BytesMut::with_capacity(self.len());
                for p in parts.iter() {
                    all.extend_from_slice(p);
                }
                all.freeze()
            }
        }
    }
}

impl PartialEq for BatchPayload {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (BatchPayload::Contiguous(a), BatchPayload::Contiguous(b)) => a == b,
            _ => self.len() == other.len() && self.contiguous() == other.contiguous(),
        }
    }
}

impl Eq for BatchPayload {}

impl From<Bytes> for BatchPayload {
    fn from(b: Bytes) -> Self {
        BatchPayload::Contiguous(b)
    }
}

/// Builds an uncompressed RecordBatch v2 incrementally.
///
/// Records are encoded as they are pushed; [`RecordBatchBuilder::build`] fills in the header and
/// CRC. The base offset is written as 0; the broker assigns the real one. Values pushed with
/// [`RecordBatchBuilder::push_shared`] that are [`SHARED_CHUNK_BYTES_MIN`] bytes or longer are
/// referenced instead of copied; [`RecordBatchBuilder::build_payload`] then returns the batch in
/// pieces, ready for a vectored write.
#[derive(Debug)]
pub struct RecordBatchBuilder {
    /// Bytes being encoded now (the whole batch while no value is referenced).
    buf: BytesMut,
    /// Once a value is referenced: the first piece, which holds the header.
    head: Option<BytesMut>,
    /// The pieces after `head`, in order: referenced values and the encoded bytes between them.
    parts: Vec<Bytes>,
    /// Bytes in `head` and `parts`.
    parts_len: usize,
    /// Bytes encoded into the builder's own buffers (referenced values not counted).
    inline_len: usize,
    /// Room to reserve in `parts` when the first value is referenced.
    parts_hint: usize,
    count: i32,
    base_timestamp: i64,
    max_timestamp: i64,
    producer_id: i64,
    producer_epoch: i16,
    base_sequence: i32,
}

impl Default for RecordBatchBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl RecordBatchBuilder {
    /// An empty batch with no producer id.
    pub fn new() -> Self {
        Self::with_capacity(1024)
    }

    /// An empty batch whose buffer starts with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        let mut buf = BytesMut::with_capacity(capacity.max(BATCH_HEADER_LEN));
        buf.resize(BATCH_HEADER_LEN, 0);
        RecordBatchBuilder {
            buf,
            head: None,
            parts: Vec::new(),
            parts_len: 0,
            inline_len: BATCH_HEADER_LEN,
            parts_hint: 0,
            count: 0,
            base_timestamp: 0,
            max_timestamp: i64::MIN,
            producer_id: -1,
            producer_epoch: -1,
            base_sequence: -1,
        }
    }

    /// Sets the idempotent-producer fields.
    pub fn producer(mut self, producer_id: i64, producer_epoch: i16, base_sequence: i32) -> Self {
        self.producer_id = producer_id;
        self.producer_epoch = producer_epoch;
        self.base_sequence = base_sequence;
        self
    }

    /// How many pieces to make room for when the first value is referenced (see
    /// [`RecordBatchBuilder::pieces`]); growing the list piece by piece costs an allocation per
    /// doubling.
    pub fn pieces_hint(mut self, pieces: usize) -> Self {
        self.parts_hint = pieces;
        self
    }

    /// Pieces the batch holds beyond its first (0 while no value is referenced): what
    /// [`RecordBatchBuilder::pieces_hint`] wants for a similar batch.
    pub fn pieces(&self) -> usize {
        self.parts.len()
    }

    /// Number of records pushed.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// `true` before the first record.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes the batch would take if built now.
    pub fn size_bytes(&self) -> usize {
        self.parts_len + self.buf.len()
    }

    /// Bytes encoded into the builder's own buffers: [`RecordBatchBuilder::size_bytes`] less the
    /// referenced values. What a buffer for a similar batch needs.
    pub fn inline_bytes(&self) -> usize {
        self.inline_len
    }

    /// Bytes pushing this record would add.
    pub fn record_size(&self, timestamp: i64, key: Option<&[u8]>, value: Option<&[u8]>, headers: &[Header]) -> usize {
        let base = if self.count == 0 { timestamp } else { self.base_timestamp };
        let body = record_body_len(timestamp.wrapping_sub(base), self.count, key, value, headers);
        crate::record::varint_len(body as i32) + body
    }

    /// Records the timestamp of a record about to be pushed.
    fn note_timestamp(&mut self, timestamp: i64) {
        if self.count == 0 {
            self.base_timestamp = timestamp;
        }
        self.max_timestamp = self.max_timestamp.max(timestamp);
    }

    /// Appends a record with the given timestamp (ms since the epoch).
    pub fn push(&mut self, timestamp: i64, key: Option<&[u8]>, value: Option<&[u8]>, headers: &[Header]) {
        self.note_timestamp(timestamp);
        let before = self.buf.len();
        let delta = timestamp.wrapping_sub(self.base_timestamp);
        put_record_head(&mut self.buf, delta, self.count, key, value, headers, true);
        put_record_tail(&mut self.buf, headers);
        self.inline_len += self.buf.len() - before;
        self.count += 1;
    }

    /// Appends a record like [`RecordBatchBuilder::push`], but a value of
    /// [`SHARED_CHUNK_BYTES_MIN`] bytes or more is referenced, not copied: the batch holds a
    /// clone of `value` (a reference count, no copy) until it is dropped.
    pub fn push_shared(&mut self, timestamp: i64, key: Option<&[u8]>, value: Option<&Bytes>, headers: &[Header]) {
        let value = match value {
            Some(v) if v.len() >= SHARED_CHUNK_BYTES_MIN => v,
            other => return self.push(timestamp, key, other.map(|v| &v[..]), headers),
        };
        self.note_timestamp(timestamp);
        let delta = timestamp.wrapping_sub(self.base_timestamp);
        let before = self.buf.len();
        put_record_head(&mut self.buf, delta, self.count, key, Some(value), headers, false);
        let piece = self.buf.split();
        self.inline_len += piece.len() - before;
        self.parts_len += piece.len() + value.len();
        if self.parts.capacity() == 0 {
            self.parts.reserve(self.parts_hint.max(4));
        }
        match self.head {
            None => self.head = Some(piece),
            Some(_) => self.parts.push(piece.freeze()),
        }
        self.parts.push(value.clone());
        let before = self.buf.len();
        put_record_tail(&mut self.buf, headers);
        self.inline_len += self.buf.len() - before;
        self.count += 1;
    }

    /// Writes the header fields (all but the CRC) for a batch of `len` bytes into `b`.
    fn write_header(&self, b: &mut [u8], len: usize) {
        b[BASE_OFFSET_AT..BASE_OFFSET_AT + 8].copy_from_slice(&0i64.to_be_bytes());
        b[LENGTH_AT..LENGTH_AT + 4].copy_from_slice(&((len - LOG_OVERHEAD) as i32).to_be_bytes());
        b[LEADER_EPOCH_AT..LEADER_EPOCH_AT + 4].copy_from_slice(&(-1i32).to_be_bytes());
        b[MAGIC_AT] = MAGIC_V2 as u8;
        b[ATTRIBUTES_AT..ATTRIBUTES_AT + 2].copy_from_slice(&0u16.to_be_bytes());
        b[LAST_OFFSET_DELTA_AT..LAST_OFFSET_DELTA_AT + 4].copy_from_slice(&(self.count - 1).to_be_bytes());
        b[BASE_TIMESTAMP_AT..BASE_TIMESTAMP_AT + 8].copy_from_slice(&self.base_timestamp.to_be_bytes());
        b[MAX_TIMESTAMP_AT..MAX_TIMESTAMP_AT + 8].copy_from_slice(&self.max_timestamp.to_be_bytes());
        b[PRODUCER_ID_AT..PRODUCER_ID_AT + 8].copy_from_slice(&self.producer_id.to_be_bytes());
        b[PRODUCER_EPOCH_AT..PRODUCER_EPOCH_AT + 2].copy_from_slice(&self.producer_epoch.to_be_bytes());
        b[BASE_SEQUENCE_AT..BASE_SEQUENCE_AT + 4].copy_from_slice(&self.base_sequence.to_be_bytes());
        b[RECORD_COUNT_AT..RECORD_COUNT_AT + 4].copy_from_slice(&self.count.to_be_bytes());
    }

    /// Fills in the header and CRC and returns the batch in one buffer (referenced values are
    /// copied in; [`RecordBatchBuilder::build_payload`] avoids that).
    ///
    /// # Panics
    /// If no record was pushed: an empty batch is not valid.
    pub fn build(mut self) -> Bytes {
        assert!(self.count > 0, "a record batch needs at least one record");
        if let Some(head) = self.head.take() {
            let mut all = BytesMut::with_capacity(self.size_bytes());
            all.extend_from_slice(&head);
            for p in self.parts.drain(..) {
                all.extend_from_slice(&p);
            }
            all.extend_from_slice(&self.buf);
            self.parts_len = 0;
            self.buf = all;
        }
        let len = self.buf.len();
        let mut buf = std::mem::take(&mut self.buf);
        self.write_header(&mut buf, len);
        let crc = compute_crc(&buf);
        buf[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
        buf.freeze()
    }

    /// Fills in the header and CRC and returns the batch, in pieces if any value was referenced.
    ///
    /// # Panics
    /// If no record was pushed: an empty batch is not valid.
    pub fn build_payload(mut self) -> BatchPayload {
        let Some(mut head) = self.head.take() else {
            return BatchPayload::Contiguous(self.build());
        };
        assert!(self.count > 0, "a record batch needs at least one record");
        let len = self.size_bytes();
        self.write_header(&mut head, len);
        let mut crc = crc32c::crc32c(&head[ATTRIBUTES_AT..]);
        for p in &self.parts {
            crc = crc32c::crc32c_append(crc, p);
        }
        crc = crc32c::crc32c_append(crc, &self.buf);
        head[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
        let mut out = Vec::with_capacity(self.parts.len() + 2);
        out.push(head.freeze());
        out.append(&mut self.parts);
        if !self.buf.is_empty() {
            out.push(std::mem::take(&mut self.buf).freeze());
        }
        BatchPayload::Parts(out.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Bytes {
        let mut b = RecordBatchBuilder::new();
        b.push(1_700_000_000_000, Some(b"k1"), Some(b"v1"), &[]);
        b.push(
            1_700_000_000_005,
            None,
            Some(b"v2"),
            &[Header { key: "h".into(), value: Some(Bytes::from_static(b"x")) }],
        );
        b.push(1_699_999_999_999, Some(b""), None, &[Header { key: "n".into(), value: None }]);
        b.build()
    }

    /// The header's max timestamp feeds the broker's time index and retention, so it must be
    /// the records' own: a lower one hid records from time lookups, a higher one (or a stray
    /// far-future value) held time retention back.
    #[test]
    fn a_max_timestamp_that_is_not_the_records_is_refused() {
        let good = sample();
        assert!(validate_for_append(&good, 1 << 20).is_ok());
        for wrong in [1_700_000_000_001i64, 1_900_000_000_000] {
            let mut bad = good.to_vec();
            bad[MAX_TIMESTAMP_AT..MAX_TIMESTAMP_AT + 8].copy_from_slice(&wrong.to_be_bytes());
            let crc = compute_crc(&bad);
            bad[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
            assert_eq!(
                validate_for_append(&bad, 1 << 20),
                Err(BatchError::MaxTimestampMismatch { declared: wrong, records: 1_700_000_000_005 })
            );
        }
    }

    #[test]
    fn built_batches_validate_and_read_back() {
        let bytes = sample();
        let h = validate_for_append(&bytes, 1 << 20).unwrap();
        assert_eq!(h.record_count, 3);
        assert_eq!(h.last_offset_delta, 2);
        assert_eq!(h.max_timestamp, 1_700_000_000_005);
        let batch = RecordBatch::new(bytes).unwrap();
        let recs: Vec<_> = batch.records().collect::<Result<_, _>>().unwrap();
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[0].key.as_deref(), Some(&b"k1"[..]));
        assert_eq!(recs[1].key, None);
        assert_eq!(recs[1].headers[0].value.as_deref(), Some(&b"x"[..]));
        assert_eq!(recs[2].timestamp, 1_699_999_999_999);
        assert_eq!(recs[2].value, None);
        assert_eq!(recs[2].headers[0].value, None);
        assert_eq!(recs[2].key.as_deref(), Some(&b""[..]));
    }

    #[test]
    fn stamping_the_base_offset_keeps_the_crc_valid() {
        let mut bytes = BytesMut::from(&sample()[..]);
        set_base_offset(&mut bytes, 42);
        let h = check_batch(&bytes).unwrap();
        assert_eq!(h.base_offset, 42);
        assert_eq!(h.next_offset(), 45);
    }

    #[test]
    fn a_base_offset_whose_records_pass_the_largest_offset_is_refused() {
        // The CRC does not cover the base offset: a damaged one must not make `next_offset`
        // overflow (a panic in a reader, or a position moved to a bogus offset).
        let mut bytes = BytesMut::from(&sample()[..]);
        set_base_offset(&mut bytes, i64::MAX - 1);
        assert!(matches!(check_batch(&bytes), Err(BatchError::OffsetOverflow { .. })), "{:?}", check_batch(&bytes));
        set_base_offset(&mut bytes, i64::MAX - 3);
        assert_eq!(check_batch(&bytes).unwrap().next_offset(), i64::MAX, "the last offset that fits");
    }

    #[test]
    fn a_flipped_byte_fails_the_crc() {
        let mut bytes = BytesMut::from(&sample()[..]);
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        assert!(matches!(check_batch(&bytes), Err(BatchError::CrcMismatch { .. })));
    }

    #[test]
    fn unknown_attribute_bits_are_rejected() {
        let mut bytes = BytesMut::from(&sample()[..]);
        bytes[ATTRIBUTES_AT] = 0x80;
        let crc = compute_crc(&bytes);
        bytes[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(check_batch(&bytes), Err(BatchError::UnknownAttributes(0x8000)));
    }

    #[test]
    fn compressed_batches_are_rejected_with_the_codec() {
        let mut bytes = BytesMut::from(&sample()[..]);
        bytes[ATTRIBUTES_AT + 1] = 0x03;
        let crc = compute_crc(&bytes);
        bytes[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(check_batch(&bytes), Err(BatchError::UnsupportedCompression(3)));
    }

    #[test]
    fn log_append_time_batches_report_the_max_timestamp_for_every_record() {
        let mut bytes = BytesMut::from(&sample()[..]);
        bytes[ATTRIBUTES_AT + 1] = ATTR_TIMESTAMP_TYPE as u8;
        let crc = compute_crc(&bytes);
        bytes[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
        let batch = RecordBatch::new(bytes.freeze()).unwrap();
        for r in batch.records() {
            assert_eq!(r.unwrap().timestamp, 1_700_000_000_005);
        }
    }

    #[test]
    fn the_splitter_skips_a_partial_trailing_batch() {
        let one = sample();
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&one);
        buf.extend_from_slice(&one);
        buf.extend_from_slice(&one[..20]);
        let batches: Vec<_> = BatchSplitter::new(buf.freeze()).collect::<Result<_, _>>().unwrap();
        assert_eq!(batches.len(), 2);
    }
}
