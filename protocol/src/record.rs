//! Records inside a RecordBatch v2, and the zig-zag varints they are made of.
//!
//! ```text
//! record:
//!   length          varint   bytes that follow, up to the end of the headers
//!   attributes      i8       unused, 0
//!   timestampDelta  varlong  timestamp - batch first timestamp
//!   offsetDelta     varint   offset - batch base offset
//!   keyLength       varint   -1 = null key
//!   key             bytes
//!   valueLength     varint   -1 = null value
//!   value           bytes
//!   headerCount     varint
//!   headers:        keyLength varint, key UTF-8, valueLength varint (-1 = null), value bytes
//! ```

use bytes::{BufMut, Bytes, BytesMut};

use crate::record_batch::BatchError;

/// One header of a record: a UTF-8 key and an optional value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Header key.
    pub key: String,
    /// Header value; `None` is a null value, distinct from an empty one.
    pub value: Option<Bytes>,
}

/// A record as read from a batch, with its absolute offset and timestamp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The record's offset in its partition.
    pub offset: i64,
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
    /// Optional key (zero-copy slice of the batch).
    pub key: Option<Bytes>,
    /// Optional value (zero-copy slice of the batch).
    pub value: Option<Bytes>,
    /// Headers in the order they were written.
    pub headers: Vec<Header>,
}

/// Bytes a zig-zag varint of `v` takes.
pub fn varint_len(v: i32) -> usize {
    varlong_len(i64::from(v))
}

/// Bytes a zig-zag varlong of `v` takes.
pub fn varlong_len(v: i64) -> usize {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    let mut n = 1;
    while z >= 0x80 {
        z >>= 7;
        n += 1;
    }
    n
}

/// Appends a zig-zag varint.
pub fn put_varint(out: &mut BytesMut, v: i32) {
    put_varlong(out, i64::from(v));
}

/// Appends a zig-zag varlong.
pub fn put_varlong(out: &mut BytesMut, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.put_u8((z as u8) | 0x80);
        z >>= 7;
    }
    out.put_u8(z as u8);
}

/// A cursor over a record area that reads varints and slices without ever running past its end.
pub(crate) struct RecordCursor<'a> {
    buf: &'a [u8],
    pub(crate) pos: usize,
    end: usize,
}

impl<'a> RecordCursor<'a> {
    pub(crate) fn new(buf: &'a [u8], pos: usize, end: usize) -> Self {
        RecordCursor { buf, pos, end }
    }

    fn malformed(&self, index: usize, detail: &'static str) -> BatchError {
        BatchError::MalformedRecord { index, detail }
    }

    #[inline(always)]
    pub(crate) fn varlong(&mut self, index: usize, max_bytes: usize) -> Result<i64, BatchError> {
        // Fast paths: most deltas fit in one byte, most lengths in one or two.
        match *self.buf.get(self.pos..self.end).unwrap_or_default() {
            [b0, ..] if b0 < 0x80 => {
                self.pos += 1;
                Ok(i64::from(b0 >> 1) ^ -i64::from(b0 & 1))
            }
            [b0, b1, ..] if b1 < 0x80 => {
                self.pos += 2;
                let z = u64::from(b0 & 0x7f) | (u64::from(b1) << 7);
                Ok(((z >> 1) as i64) ^ -((z & 1) as i64))
            }
            _ => self.varlong_slow(index, max_bytes),
        }
    }

    #[inline(never)]
    fn varlong_slow(&mut self, index: usize, max_bytes: usize) -> Result<i64, BatchError> {
        let mut z: u64 = 0;
        for i in 0..max_bytes {
            if self.pos >= self.end {
                return Err(self.malformed(index, "varint runs past the end of the record"));
            }
            let b = self.buf[self.pos];
            self.pos += 1;
            z |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(((z >> 1) as i64) ^ -((z & 1) as i64));
            }
        }
        Err(self.malformed(index, "varint is too long"))
    }

    #[inline(always)]
    pub(crate) fn varint(&mut self, index: usize) -> Result<i32, BatchError> {
        let v = self.varlong(index, 5)?;
        i32::try_from(v).map_err(|_| self.malformed(index, "varint out of i32 range"))
    }

    #[inline(always)]
    fn u8(&mut self, index: usize) -> Result<u8, BatchError> {
        if self.pos >= self.end {
            return Err(self.malformed(index, "record ends before its attributes"));
        }
        self.pos += 1;
        Ok(self.buf[self.pos - 1])
    }

    /// A length-prefixed field: returns its byte range, `None` for a null (-1) length.
    // This and the readers above are always inlined: as calls, their results came back
    // through memory and every record paid store-forwarding stalls reading them.
    #[inline(always)]
    fn field(&mut self, index: usize) -> Result<Option<(usize, usize)>, BatchError> {
        let len = self.varint(index)?;
        if len == -1 {
            return Ok(None);
        }
        let len = usize::try_from(len).map_err(|_| self.malformed(index, "negative field length"))?;
        if len > self.end - self.pos {
            return Err(self.malformed(index, "field runs past the end of the record"));
        }
        let start = self.pos;
        self.pos += len;
        Ok(Some((start, self.pos)))
    }
}

/// A byte range `start..end` within the batch.
pub(crate) type Span = (usize, usize);

/// Positions of one header: key range and optional value range.
pub(crate) type HeaderSpan = (usize, usize, Option<Span>);

/// Positions of one record's parts within the batch, as found by [`scan_record`].
pub(crate) struct RecordSpan {
    pub(crate) timestamp_delta: i64,
    pub(crate) offset_delta: i32,
    pub(crate) key: Option<(usize, usize)>,
    pub(crate) value: Option<(usize, usize)>,
    pub(crate) headers: Vec<HeaderSpan>,
}

/// Reads one record starting at `cur.pos`, checking every length against the record's own length
/// and the record area's end. With `keep_headers = false` header positions are validated but not
/// collected (no allocation on the validation path).
#[inline]
pub(crate) fn scan_record(
    cur: &mut RecordCursor<'_>,
    index: usize,
    keep_headers: bool,
) -> Result<RecordSpan, BatchError> {
    let len = cur.varint(index)?;
    let len = usize::try_from(len).map_err(|_| cur.malformed(index, "negative record length"))?;
    if len > cur.end - cur.pos {
        return Err(cur.malformed(index, "record length runs past the end of the batch"));
    }
    let record_end = cur.pos + len;
    let mut rc = RecordCursor::new(cur.buf, cur.pos, record_end);
    let _attributes = rc.u8(index)?;
    let timestamp_delta = rc.varlong(index, 10)?;
    let offset_delta = rc.varint(index)?;
    let key = rc.field(index)?;
    let value = rc.field(index)?;
    let header_count = rc.varint(index)?;
    let header_count = usize::try_from(header_count).map_err(|_| cur.malformed(index, "negative header count"))?;
    // Each header takes at least two bytes; never allocate more than the record could hold.
    if header_count > (record_end - rc.pos) / 2 {
        return Err(cur.malformed(index, "header count larger than the record"));
    }
    let mut headers = if keep_headers && header_count > 0 { Vec::with_capacity(header_count) } else { Vec::new() };
    for _ in 0..header_count {
        let k = rc.field(index)?.ok_or_else(|| cur.malformed(index, "null header key"))?;
        if std::str::from_utf8(&cur.buf[k.0..k.1]).is_err() {
            return Err(cur.malformed(index, "header key is not UTF-8"));
        }
        let v = rc.field(index)?;
        if keep_headers {
            headers.push((k.0, k.1, v));
        }
    }
    if rc.pos != record_end {
        return Err(cur.malformed(index, "record length does not match its fields"));
    }
    cur.pos = record_end;
    Ok(RecordSpan { timestamp_delta, offset_delta, key, value, headers })
}

/// An upper bound on the bytes one record takes in a batch (length prefix included), whatever
/// its timestamp and offset deltas: for sizing buffers before the record's position is known.
pub fn record_len_upper_bound(key: Option<&[u8]>, value: Option<&[u8]>, headers: &[Header]) -> usize {
    // Deltas of 0 take one byte each; the largest take 10 (varlong) and 5 (varint).
    record_body_len(0, 0, key, value, headers) + 9 + 4 + 5
}

/// Encoded size of a record's body (everything after its length varint).
pub(crate) fn record_body_len(
    timestamp_delta: i64,
    offset_delta: i32,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: &[Header],
) -> usize {
    fn field_len(f: Option<&[u8]>) -> usize {
        match f {
            None => varint_len(-1),
            Some(b) => varint_len(b.len() as i32) + b.len(),
        }
    }
    let mut n = 1 + varlong_len(timestamp_delta) + varint_len(offset_delta);
    n += field_len(key) + field_len(value);
    n += varint_len(headers.len() as i32);
    for h in headers {
        n += field_len(Some(h.key.as_bytes())) + field_len(h.value.as_deref());
    }
    n
}

/// Appends a record, length prefix included, up to and including its value (a whole record is
/// this and [`put_record_tail`]); with `value_inline` false the value's bytes
/// are left out (its length is written), for the caller to send them from where they are.
pub(crate) fn put_record_head(
    out: &mut BytesMut,
    timestamp_delta: i64,
    offset_delta: i32,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: &[Header],
    value_inline: bool,
) {
    let body = record_body_len(timestamp_delta, offset_delta, key, value, headers);
    put_varint(out, body as i32);
    out.put_u8(0);
    put_varlong(out, timestamp_delta);
    put_varint(out, offset_delta);
    put_field(out, key);
    match value {
        Some(v) if !value_inline => put_varint(out, v.len() as i32),
        _ => put_field(out, value),
    }
}

/// Appends what follows a record's value: its headers.
pub(crate) fn put_record_tail(out: &mut BytesMut, headers: &[Header]) {
    put_varint(out, headers.len() as i32);
    for h in headers {
        put_field(out, Some(h.key.as_bytes()));
        put_field(out, h.value.as_deref());
    }
}

/// Appends a nullable length-prefixed field.
fn put_field(out: &mut BytesMut, f: Option<&[u8]>) {
    match f {
        None => put_varint(out, -1),
        Some(b) => {
            put_varint(out, b.len() as i32);
            out.put_slice(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_match_kafkas_zigzag_encoding() {
        let cases: [(i64, &[u8]); 6] =
            [(0, &[0x00]), (-1, &[0x01]), (1, &[0x02]), (63, &[0x7e]), (-65, &[0x81, 0x01]), (300, &[0xd8, 0x04])];
        for (v, want) in cases {
            let mut out = BytesMut::new();
            put_varlong(&mut out, v);
            assert_eq!(&out[..], want, "encoding {v}");
            assert_eq!(varlong_len(v), want.len());
            let mut cur = RecordCursor::new(&out, 0, out.len());
            assert_eq!(cur.varlong(0, 10).unwrap(), v);
        }
    }

    #[test]
    fn extreme_varlongs_round_trip() {
        for v in [i64::MIN, i64::MAX, i32::MIN as i64, i32::MAX as i64] {
            let mut out = BytesMut::new();
            put_varlong(&mut out, v);
            let mut cur = RecordCursor::new(&out, 0, out.len());
            assert_eq!(cur.varlong(0, 10).unwrap(), v);
        }
    }

    #[test]
    fn an_unterminated_varint_is_an_error_not_a_panic() {
        let buf = [0xffu8; 12];
        let mut cur = RecordCursor::new(&buf, 0, buf.len());
        assert!(cur.varlong(0, 10).is_err());
        let mut cur = RecordCursor::new(&buf, 0, 3);
        assert!(cur.varint(0).is_err());
    }

    proptest::proptest! {
        /// Every value decodes back whatever bytes follow it, and every strict prefix of its
        /// encoding is an error (never a panic, never a wrong value).
        #[test]
        fn varlongs_decode_exactly_and_truncations_are_errors(v in proptest::prelude::any::<i64>(), tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3)) {
            let mut out = BytesMut::new();
            put_varlong(&mut out, v);
            let n = out.len();
            out.extend_from_slice(&tail);
            let mut cur = RecordCursor::new(&out, 0, out.len());
            proptest::prop_assert_eq!(cur.varlong(0, 10).unwrap(), v);
            proptest::prop_assert_eq!(cur.pos, n);
            for cut in 0..n {
                let mut cur = RecordCursor::new(&out, 0, cut);
                proptest::prop_assert!(cur.varlong(0, 10).is_err());
            }
        }
    }
}
