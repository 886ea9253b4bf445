//! Arbitrary bytes through the record-batch validator and record iterator.
#![no_main]

use cairn_protocol::record_batch::{validate_for_append, BatchSplitter};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = validate_for_append(data, 1 << 20);
    for batch in BatchSplitter::new(bytes::Bytes::copy_from_slice(data)).flatten() {
        for record in batch.records() {
            let _ = record;
        }
    }
});
