//! Request frames as the connection reads them: [`FrameCodec`] plus an answer for a request
//! over `frame_bytes_max`.
//!
//! The length prefix says where the next frame starts, so an oversized request need not cost
//! the connection: its head (the request header and, for a Produce, the `acks` byte) is kept so
//! that it can be answered with `BATCH_TOO_LARGE`, and the rest of its bytes are read and
//! dropped as they arrive, never buffered. A client whose producer packs more than the broker
//! takes then gets a typed error instead of a connection it would take for lost and retry on.

use bytes::{Buf, Bytes, BytesMut};
use tokio_util::codec::Decoder;

use cairn_protocol::codec::FRAME_PREFIX_LEN;
use cairn_protocol::{ApiKey, FrameCodec, FrameError};

/// The request header's fixed part: api_key u16, api_version u16, correlation_id u32.
const FIXED_HEADER_LEN: usize = 8;

/// What the connection reads next.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// A whole request payload.
    Request(Bytes),
    /// A request over the limit: its first bytes (header, client id and one body byte, or as
    /// many as it has), kept to answer it. The rest is being dropped.
    Oversized {
        /// The announced payload length.
        len: u64,
        /// The broker's `frame_bytes_max`.
        max: u32,
        /// The payload's first bytes.
        head: Bytes,
    },
}

/// [`FrameCodec`] that hands over an oversized request's head instead of failing.
#[derive(Debug)]
pub(crate) struct RequestCodec {
    frames: FrameCodec,
    /// Bytes of an oversized request still to drop.
    discard: u64,
}

impl RequestCodec {
    pub(crate) fn new(frame_bytes_max: u32) -> RequestCodec {
        RequestCodec { frames: FrameCodec::new(frame_bytes_max), discard: 0 }
    }

    /// True while the rest of an oversized request is being dropped: a frame is in progress.
    pub(crate) fn discarding(&self) -> bool {
        self.discard > 0
    }

    /// Drops what has arrived of the oversized request; true once all of it has.
    fn drop_arrived(&mut self, src: &mut BytesMut) -> bool {
        let n = self.discard.min(src.len() as u64);
        src.advance(n as usize);
        self.discard -= n;
        self.discard == 0
    }
}

/// How many payload bytes an oversized request's head needs, given what has arrived (`payload`,
/// without the prefix), or `None` if that is not known yet. Only a request with a known API is
/// answered: anything else (an HTTP or TLS client on the wrong port, garbage) is cut off.
fn head_len(len: u64, payload: &[u8]) -> Option<Result<usize, ()>> {
    let have = |n: usize| payload.len() >= n;
    if !have(2) {
        return None;
    }
    let api = u16::from_be_bytes([payload[0], payload[1]]);
    let Some(api) = ApiKey::from_u16(api) else {
        return Some(Err(()));
    };
    let id_at = FIXED_HEADER_LEN;
    if !have(id_at + 2) {
        return None;
    }
    let id_len = usize::from(u16::from_be_bytes([payload[id_at], payload[id_at + 1]]));
    if id_len == usize::from(u16::MAX) {
        return Some(Err(())); // no null client id: the header is invalid
    }
    // A Produce also needs its first body byte, acks: with acks = 0 nothing is answered.
    let want = id_at + 2 + id_len + usize::from(api == ApiKey::Produce);
    Some(Ok(want.min(usize::try_from(len).unwrap_or(usize::MAX))))
}

impl Decoder for RequestCodec {
    type Item = Incoming;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Incoming>, FrameError> {
        if self.discard > 0 && !self.drop_arrived(src) {
            return Ok(None);
        }
        match self.frames.decode(src) {
            Ok(Some(frame)) => Ok(Some(Incoming::Request(frame))),
            Ok(None) => Ok(None),
            Err(FrameError::TooLarge { len, max }) => {
                // `src` still starts with the prefix; the payload follows as it arrives.
                let payload = &src[FRAME_PREFIX_LEN..];
                let want = match head_len(len, payload) {
                    None => return Ok(None),
                    Some(Err(())) => return Err(FrameError::TooLarge { len, max }),
                    Some(Ok(want)) if payload.len() < want => return Ok(None),
                    Some(Ok(want)) => want,
                };
                src.advance(FRAME_PREFIX_LEN);
                let head = src.split_to(want).freeze();
                self.discard = len - want as u64;
                self.drop_arrived(src);
                Ok(Some(Incoming::Oversized { len, max, head }))
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    /// An oversized frame's first bytes: prefix, header, client id, then `body`.
    fn oversized(len: u32, api: u16, client_id: &str, body: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u32(len);
        b.put_u16(api);
        b.put_u16(0);
        b.put_u32(42);
        b.put_u16(client_id.len() as u16);
        b.put_slice(client_id.as_bytes());
        b.put_slice(body);
        b
    }

    #[test]
    fn an_oversized_request_is_handed_over_by_its_head_and_the_rest_dropped() {
        let mut codec = RequestCodec::new(1024);
        let mut buf = oversized(5000, ApiKey::Produce as u16, "app", &[1]);
        let head_len = buf.len() - FRAME_PREFIX_LEN;
        buf.put_bytes(7, 100);
        let Some(Incoming::Oversized { len: 5000, max: 1024, head }) = codec.decode(&mut buf).unwrap() else {
            panic!("expected the oversized request's head");
        };
        assert_eq!(head.len(), head_len);
        assert!(buf.is_empty() && codec.discarding(), "what arrived of the rest is dropped");
        // The rest arrives in pieces, then the next request follows.
        let mut rest = 5000 - head_len - 100;
        while rest > 0 {
            let n = rest.min(1500);
            buf.put_bytes(7, n);
            assert!(codec.decode(&mut buf).unwrap().is_none());
            rest -= n;
        }
        assert!(!codec.discarding());
        buf.put_u32(3);
        buf.put_slice(b"abc");
        assert!(matches!(codec.decode(&mut buf).unwrap(), Some(Incoming::Request(f)) if &f[..] == b"abc"));
    }

    #[test]
    fn an_oversized_head_is_waited_for_until_it_has_arrived() {
        let mut codec = RequestCodec::new(1024);
        let whole = oversized(5000, ApiKey::Produce as u16, "client", &[0]);
        for cut in 4..whole.len() {
            let mut buf = BytesMut::from(&whole[..cut]);
            assert!(codec.decode(&mut buf).unwrap().is_none(), "head cut at {cut}");
            assert_eq!(buf.len(), cut, "nothing consumed before the head is whole");
        }
        let mut buf = whole.clone();
        assert!(matches!(codec.decode(&mut buf).unwrap(), Some(Incoming::Oversized { .. })));
    }

    #[test]
    fn an_oversized_frame_that_is_no_known_request_is_cut_off() {
        let mut codec = RequestCodec::new(1024);
        // "GET / HTTP/1.1": a length of 1.2 GB and no API this protocol knows.
        let mut http = BytesMut::from(&b"GET / HTTP/1.1\r\n"[..]);
        assert!(matches!(codec.decode(&mut http), Err(FrameError::TooLarge { .. })));
        let mut null_id = oversized(5000, ApiKey::Metadata as u16, "", &[]);
        null_id[12..14].copy_from_slice(&[0xff, 0xff]);
        assert!(matches!(codec.decode(&mut null_id), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn a_frame_within_the_limit_passes_through() {
        let mut codec = RequestCodec::new(1024);
        let mut buf = BytesMut::from(&[0u8, 0, 0, 2, 9, 9][..]);
        assert!(matches!(codec.decode(&mut buf).unwrap(), Some(Incoming::Request(f)) if f[..] == [9, 9]));
    }
}
