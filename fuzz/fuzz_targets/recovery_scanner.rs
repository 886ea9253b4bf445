//! Arbitrary segment file contents through the recovery scanner: it must stop at damage, never
//! panic, and never claim more bytes than it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (valid_len, next_offset) = cairn_broker::storage::scan_log_bytes(data, 1000);
    assert!(valid_len as usize <= data.len());
    assert!(next_offset >= 1000);
});
