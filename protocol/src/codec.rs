//! The length-prefixed frame codec.
//!
//! ```text
//! +----------------+---------------------------+
//! | length: u32 BE | payload: `length` bytes   |
//! +----------------+---------------------------+
//! ```
//!
//! Decoding happens in two steps (is a whole frame here? then hand it over) and the length is
//! checked against [`FrameCodec::frame_bytes_max`] before any byte of the frame is buffered.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// Default upper bound on a frame's payload: 16 MiB.
pub const FRAME_BYTES_MAX_DEFAULT: u32 = 16 * 1024 * 1024;

/// Length of the frame's length prefix.
pub const FRAME_PREFIX_LEN: usize = 4;

/// Why reading or writing a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer announced a frame larger than allowed; the connection cannot be resynchronised.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: u64,
        /// Configured limit.
        max: u32,
    },
    /// The socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// A `tokio_util` codec for length-prefixed frames with a size limit.
///
/// Decoded items are the payloads (without the prefix). Encoded items are a list of chunks whose
/// concatenation is the payload.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    frame_bytes_max: u32,
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(FRAME_BYTES_MAX_DEFAULT)
    }
}

impl FrameCodec {
    /// A codec that rejects payloads longer than `frame_bytes_max`.
    pub fn new(frame_bytes_max: u32) -> Self {
        FrameCodec { frame_bytes_max }
    }

    /// The configured limit.
    pub fn frame_bytes_max(&self) -> u32 {
        self.frame_bytes_max
    }
}

impl Decoder for FrameCodec {
    type Item = Bytes;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Bytes>, FrameError> {
        if src.len() < FRAME_PREFIX_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
        if len > self.frame_bytes_max {
            return Err(FrameError::TooLarge { len: u64::from(len), max: self.frame_bytes_max });
        }
        let total = FRAME_PREFIX_LEN + len as usize;
        if src.len() < total {
            // No up-front reservation for the whole frame: memory grows with the bytes that
            // actually arrive, so a peer announcing large frames and trickling bytes holds
            // only what it sent.
            return Ok(None);
        }
        src.advance(FRAME_PREFIX_LEN);
        Ok(Some(src.split_to(len as usize).freeze()))
    }
}

impl Encoder<Vec<Bytes>> for FrameCodec {
    type Error = FrameError;

    /// Encodes a payload given as chunks. Chunks produced by [`crate::WireWriter::finish`] already
    /// carry their prefix; use [`FrameCodec::encode_prefixed`] for those.
    fn encode(&mut self, payload: Vec<Bytes>, dst: &mut BytesMut) -> Result<(), FrameError> {
        let len: usize = payload.iter().map(Bytes::len).sum();
        if len > self.frame_bytes_max as usize {
            return Err(FrameError::TooLarge { len: len as u64, max: self.frame_bytes_max });
        }
        dst.reserve(FRAME_PREFIX_LEN + len);
        dst.put_u32(len as u32);
        for chunk in payload {
            dst.extend_from_slice(&chunk);
        }
        Ok(())
    }
}

impl FrameCodec {
    /// Copies chunks that already start with their length prefix into `dst`, checking the limit.
    ///
    /// # Errors
    /// [`FrameError::TooLarge`] when the payload is over the limit.
    pub fn encode_prefixed(&self, chunks: &[Bytes], dst: &mut BytesMut) -> Result<(), FrameError> {
        let len: usize = chunks.iter().map(Bytes::len).sum();
        let payload = len.saturating_sub(FRAME_PREFIX_LEN);
        if payload > self.frame_bytes_max as usize {
            return Err(FrameError::TooLarge { len: payload as u64, max: self.frame_bytes_max });
        }
        dst.reserve(len);
        for chunk in chunks {
            dst.extend_from_slice(chunk);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_frame_waits_for_more_bytes() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::from(&[0u8, 0, 0, 5, 1, 2][..]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(&[3, 4, 5, 9]);
        assert_eq!(&codec.decode(&mut buf).unwrap().unwrap()[..], &[1, 2, 3, 4, 5]);
        assert_eq!(&buf[..], &[9]);
    }

    #[test]
    fn an_oversized_length_is_rejected_before_reserving_memory() {
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::from(&[0xffu8, 0xff, 0xff, 0xff][..]);
        let cap_before = buf.capacity();
        let err = codec.decode(&mut buf).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len: 4_294_967_295, max: 1024 }));
        assert_eq!(buf.capacity(), cap_before);
    }

    #[test]
    fn encode_then_decode_round_trips() {
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        codec.encode(vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cd")], &mut buf).unwrap();
        assert_eq!(&codec.decode(&mut buf).unwrap().unwrap()[..], b"abcd");
    }
}
