//! Bounded readers and writers for the primitive wire types.
//!
//! | type              | encoding                                                      |
//! |-------------------|---------------------------------------------------------------|
//! | `u8`..`u64`, `i*` | big-endian, fixed width                                       |
//! | `bool`            | one byte, `0` or `1`                                          |
//! | `string`          | `u16` length, then that many UTF-8 bytes                      |
//! | `nullable_string` | `u16` length, `0xFFFF` = null, then UTF-8 bytes               |
//! | `bytes`           | `u32` length, then that many bytes                            |
//! | `nullable_bytes`  | `u32` length, `0xFFFF_FFFF` = null, then bytes                |
//! | `array<T>`        | `u32` count, then the elements                                |
//! | `nullable_array`  | `u32` count, `0xFFFF_FFFF` = null, then the elements          |
//!
//! [`WireReader`] never reads past the end of its buffer and never allocates more elements than the
//! remaining bytes could hold: a peer that claims `u32::MAX` elements gets an error, not an abort.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::DecodeError;

/// Marker for a null `u16`-length string.
pub const NULL_U16: u16 = u16::MAX;
/// Marker for a null `u32`-length byte string or array.
pub const NULL_U32: u32 = u32::MAX;

/// Reads wire primitives from a frame held as [`Bytes`]; byte fields are zero-copy slices of it.
#[derive(Debug, Clone)]
pub struct WireReader {
    buf: Bytes,
    pos: usize,
}

impl WireReader {
    /// Reads from the start of `buf`.
    pub fn new(buf: Bytes) -> Self {
        WireReader { buf, pos: 0 }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Current position from the start of the buffer.
    pub fn position(&self) -> usize {
        self.pos
    }

    fn take(&mut self, need: usize) -> Result<&[u8], DecodeError> {
        let have = self.remaining();
        if need > have {
            return Err(DecodeError::UnexpectedEnd { offset: self.pos, need, have });
        }
        let start = self.pos;
        self.pos += need;
        Ok(&self.buf[start..start + need])
    }

    fn take_array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let slice = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        Ok(out)
    }

    /// Reads a `u8`.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take_array::<1>()?[0])
    }
    /// Reads a big-endian `u16`.
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take_array()?))
    }
    /// Reads a big-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take_array()?))
    }
    /// Reads a big-endian `i32`.
    pub fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.take_array()?))
    }
    /// Reads a big-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take_array()?))
    }
    /// Reads a big-endian `i64`.
    pub fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.take_array()?))
    }
    /// Reads a `bool` (`0` or `1`; anything else is an error).
    pub fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(DecodeError::InvalidValue { field: "bool", value: i64::from(other) }),
        }
    }

    /// Reads a `string`.
    pub fn string(&mut self) -> Result<String, DecodeError> {
        let len = self.u16()?;
        if len == NULL_U16 {
            return Err(DecodeError::InvalidValue { field: "string length", value: -1 });
        }
        self.utf8(usize::from(len))
    }

    /// Reads a `nullable_string`.
    pub fn nullable_string(&mut self) -> Result<Option<String>, DecodeError> {
        let len = self.u16()?;
        if len == NULL_U16 {
            return Ok(None);
        }
        self.utf8(usize::from(len)).map(Some)
    }

    fn utf8(&mut self, len: usize) -> Result<String, DecodeError> {
        let offset = self.pos;
        let raw = self.take(len)?;
        std::str::from_utf8(raw).map(str::to_owned).map_err(|_| DecodeError::InvalidUtf8 { offset })
    }

    /// Reads `bytes` as a zero-copy slice of the frame.
    pub fn bytes(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u32()?;
        if len == NULL_U32 {
            return Err(DecodeError::InvalidValue { field: "bytes length", value: -1 });
        }
        self.slice(len as usize)
    }

    /// Reads `nullable_bytes` as a zero-copy slice of the frame.
    pub fn nullable_bytes(&mut self) -> Result<Option<Bytes>, DecodeError> {
        let len = self.u32()?;
        if len == NULL_U32 {
            return Ok(None);
        }
        self.slice(len as usize).map(Some)
    }

    /// Takes the next `len` bytes as a zero-copy slice.
    pub fn slice(&mut self, len: usize) -> Result<Bytes, DecodeError> {
        let have = self.remaining();
        if len > have {
            return Err(DecodeError::UnexpectedEnd { offset: self.pos, need: len, have });
        }
        let out = self.buf.slice(self.pos..self.pos + len);
        self.pos += len;
        Ok(out)
    }

    /// Reads an `array<T>` whose elements take at least `min_element_bytes` each on the wire.
    ///
    /// The count is checked against the remaining bytes before anything is allocated.
    pub fn array<T>(
        &mut self,
        min_element_bytes: usize,
        mut element: impl FnMut(&mut WireReader) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, DecodeError> {
        let count = self.u32()?;
        if count == NULL_U32 {
            return Err(DecodeError::InvalidValue { field: "array count", value: -1 });
        }
        self.array_body(count, min_element_bytes, &mut element)
    }

    /// Reads a `nullable_array<T>`; see [`WireReader::array`].
    pub fn nullable_array<T>(
        &mut self,
        min_element_bytes: usize,
        mut element: impl FnMut(&mut WireReader) -> Result<T, DecodeError>,
    ) -> Result<Option<Vec<T>>, DecodeError> {
        let count = self.u32()?;
        if count == NULL_U32 {
            return Ok(None);
        }
        self.array_body(count, min_element_bytes, &mut element).map(Some)
    }

    fn array_body<T>(
        &mut self,
        count: u32,
        min_element_bytes: usize,
        element: &mut impl FnMut(&mut WireReader) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, DecodeError> {
        let count = count as usize;
        let need = count.saturating_mul(min_element_bytes.max(1));
        if need > self.remaining() {
            return Err(DecodeError::UnexpectedEnd { offset: self.pos, need, have: self.remaining() });
        }
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            out.push(element(self)?);
        }
        Ok(out)
    }

    /// Fails unless every byte was consumed.
    pub fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::TrailingBytes { extra }),
        }
    }
}

/// Byte fields at least this long are sent as their own chunk instead of being copied.
pub const SHARED_CHUNK_BYTES_MIN: usize = 512;

/// Writes wire primitives into a growing buffer; large [`Bytes`] fields are kept as separate chunks
/// so that record data goes from the storage mapping to the socket without a copy.
///
/// The first four bytes are reserved for the frame's length prefix, filled by [`WireWriter::finish`].
#[derive(Debug)]
pub struct WireWriter {
    head: BytesMut,
    chunks: Vec<Bytes>,
    len: usize,
}

impl Default for WireWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl WireWriter {
    /// A writer for one frame.
    pub fn new() -> Self {
        Self::with_capacity(64)
    }

    /// A writer whose first buffer has room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        let mut head = BytesMut::with_capacity(capacity.max(4));
        head.put_u32(0);
        WireWriter { head, chunks: Vec::new(), len: 4 }
    }

    /// Bytes written so far, including the 4-byte length prefix.
    pub fn len(&self) -> usize {
        self.len
    }

    /// `true` when nothing but the length prefix has been written.
    pub fn is_empty(&self) -> bool {
        self.len == 4
    }

    /// Writes a `u8`.
    pub fn u8(&mut self, v: u8) {
        self.head.put_u8(v);
        self.len += 1;
    }
    /// Writes a big-endian `u16`.
    pub fn u16(&mut self, v: u16) {
        self.head.put_u16(v);
        self.len += 2;
    }
    /// Writes a big-endian `u32`.
    pub fn u32(&mut self, v: u32) {
        self.head.put_u32(v);
        self.len += 4;
    }
    /// Writes a big-endian `i32`.
    pub fn i32(&mut self, v: i32) {
        self.head.put_i32(v);
        self.len += 4;
    }
    /// Writes a big-endian `u64`.
    pub fn u64(&mut self, v: u64) {
        self.head.put_u64(v);
        self.len += 8;
    }
    /// Writes a big-endian `i64`.
    pub fn i64(&mut self, v: i64) {
        self.head.put_i64(v);
        self.len += 8;
    }
    /// Writes a `bool`.
    pub fn bool(&mut self, v: bool) {
        self.u8(u8::from(v));
    }

    /// Writes a `string`. Strings longer than `u16::MAX - 1` bytes are a programming error.
    ///
    /// # Panics
    /// If `s` is 65,535 bytes or longer; callers validate lengths before encoding.
    pub fn string(&mut self, s: &str) {
        let len = u16::try_from(s.len()).ok().filter(|l| *l != NULL_U16);
        let len = len.expect("string field longer than 65534 bytes");
        self.u16(len);
        self.raw(s.as_bytes());
    }

    /// Writes a `nullable_string`.
    ///
    /// # Panics
    /// As [`WireWriter::string`].
    pub fn nullable_string(&mut self, s: Option<&str>) {
        match s {
            None => self.u16(NULL_U16),
            Some(s) => self.string(s),
        }
    }

    /// Writes a `nullable_string` that carries text for humans (an error message), cut at a
    /// character boundary to [`MESSAGE_BYTES_MAX`]. Messages often quote what the request sent
    /// (a topic name of up to 65,534 bytes), so unlike [`WireWriter::string`] this never panics.
    pub fn message(&mut self, s: Option<&str>) {
        self.nullable_string(s.map(cut_message));
    }

    /// Makes room for `bytes` more copied bytes and `chunks` more chunks, so that a message of
    /// many small and large fields is encoded with one allocation of each kind.
    pub fn reserve(&mut self, bytes: usize, chunks: usize) {
        self.head.reserve(bytes);
        self.chunks.reserve(chunks);
    }

    /// Writes `bytes`; long values become their own chunk (no copy).
    pub fn bytes(&mut self, b: &Bytes) {
        self.u32(u32::try_from(b.len()).expect("bytes field over 4 GiB"));
        self.shared(b);
    }

    /// Writes `bytes` whose value is the concatenation of `parts`, without copying large parts.
    pub fn bytes_parts(&mut self, parts: &[Bytes]) {
        let total: usize = parts.iter().map(Bytes::len).sum();
        self.u32(u32::try_from(total).expect("bytes field over 4 GiB"));
        for part in parts {
            self.shared(part);
        }
    }

    /// Writes `nullable_bytes`.
    pub fn nullable_bytes(&mut self, b: Option<&Bytes>) {
        match b {
            None => self.u32(NULL_U32),
            Some(b) => self.bytes(b),
        }
    }

    /// Writes an array count.
    pub fn count(&mut self, n: usize) {
        self.u32(u32::try_from(n).expect("array longer than u32::MAX"));
    }

    /// Writes raw bytes (copied).
    pub fn raw(&mut self, b: &[u8]) {
        self.head.extend_from_slice(b);
        self.len += b.len();
    }

    fn shared(&mut self, b: &Bytes) {
        if b.len() < SHARED_CHUNK_BYTES_MIN {
            self.raw(b);
            return;
        }
        if !self.head.is_empty() {
            self.chunks.push(self.head.split().freeze());
        }
        self.chunks.push(b.clone());
        self.len += b.len();
    }

    /// Completes the frame: fills in the length prefix and returns the chunks in order.
    ///
    /// # Panics
    /// If the frame is larger than `u32::MAX` bytes.
    pub fn finish(mut self) -> Vec<Bytes> {
        if !self.head.is_empty() {
            self.chunks.push(self.head.split().freeze());
        }
        let body = u32::try_from(self.len - 4).expect("frame over 4 GiB");
        let first = self.chunks.first_mut().expect("the length prefix is always present");
        let mut with_len = BytesMut::from(&first[..]);
        with_len[..4].copy_from_slice(&body.to_be_bytes());
        *first = with_len.freeze();
        self.chunks
    }

    /// Completes the frame and copies it into one contiguous buffer (tests and small frames).
    pub fn finish_contiguous(self) -> Bytes {
        let chunks = self.finish();
        if chunks.len() == 1 {
            return chunks.into_iter().next().expect("one chunk");
        }
        let mut out = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
        for c in chunks {
            out.extend_from_slice(&c);
        }
        out.freeze()
    }
}

/// Longest error message put on the wire; longer ones are cut (see [`WireWriter::message`]).
pub const MESSAGE_BYTES_MAX: usize = 4096;

/// `s` cut at a character boundary to at most [`MESSAGE_BYTES_MAX`] bytes.
pub fn cut_message(s: &str) -> &str {
    let mut cut = s.len().min(MESSAGE_BYTES_MAX);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    &s[..cut]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_array_count_is_rejected_before_allocating() {
        let mut w = WireWriter::new();
        w.u32(u32::MAX - 1);
        let frame = w.finish_contiguous().slice(4..);
        let mut r = WireReader::new(frame);
        let err = r.array(4, |r| r.u32()).unwrap_err();
        assert!(matches!(err, DecodeError::UnexpectedEnd { .. }), "{err}");
    }

    #[test]
    fn strings_and_bytes_round_trip_and_large_bytes_stay_shared() {
        let big = Bytes::from(vec![7u8; 4096]);
        let mut w = WireWriter::new();
        w.string("hello");
        w.nullable_string(None);
        w.bytes(&big);
        w.i64(-5);
        let chunks = w.finish();
        assert_eq!(chunks.len(), 3, "the large field is its own chunk");
        assert_eq!(chunks[1].as_ptr(), big.as_ptr(), "no copy of the large field");
        let mut all = BytesMut::new();
        for c in &chunks {
            all.extend_from_slice(c);
        }
        let all = all.freeze();
        assert_eq!(u32::from_be_bytes(all[..4].try_into().unwrap()) as usize, all.len() - 4);
        let mut r = WireReader::new(all.slice(4..));
        assert_eq!(r.string().unwrap(), "hello");
        assert_eq!(r.nullable_string().unwrap(), None);
        assert_eq!(r.bytes().unwrap(), big);
        assert_eq!(r.i64().unwrap(), -5);
        r.finish().unwrap();
    }

    #[test]
    fn invalid_utf8_is_a_typed_error() {
        let mut r = WireReader::new(Bytes::from_static(&[0, 2, 0xff, 0xfe]));
        assert_eq!(r.string().unwrap_err(), DecodeError::InvalidUtf8 { offset: 2 });
    }
}
