//! Arbitrary bytes through the frame codec and the request decoder: never a panic, never an
//! allocation beyond the input.
#![no_main]

use bytes::BytesMut;
use cairn_protocol::{decode_request, FrameCodec};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut codec = FrameCodec::new(1 << 20);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = codec.decode(&mut buf) {
        let _ = decode_request(frame);
    }
    // The input as one bare frame payload, too.
    let _ = decode_request(bytes::Bytes::copy_from_slice(data));
});
