//! Cross-checks our RecordBatch v2 codec against kafka-python, an independent implementation.
//!
//! `tests/golden/*.kafka-python.bin` were written by kafka-python from `tests/golden/manifest.json`
//! (`python3 protocol/tests/golden/golden.py generate`; CI re-runs `golden.py check`). We must
//! decode them to exactly the manifest's records, and our builder must produce the same bytes.
//! The one field that may differ is partitionLeaderEpoch (bytes 12..16, outside the CRC):
//! kafka-python writes 0, Cairn writes -1 as the Java client does.

use std::path::PathBuf;

use bytes::Bytes;
use cairn_protocol::record_batch::{validate_for_append, RecordBatch, RecordBatchBuilder};
use cairn_protocol::Header;
use serde_json::Value;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn hex(v: &Value) -> Option<Vec<u8>> {
    let s = v.as_str()?;
    Some((0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect())
}

/// `(timestamp, key, value, headers)` of one manifest record.
type GoldenRecord = (i64, Option<Vec<u8>>, Option<Vec<u8>>, Vec<Header>);

struct Case {
    name: String,
    records: Vec<GoldenRecord>,
}

fn cases() -> Vec<Case> {
    let manifest: Value = serde_json::from_slice(&std::fs::read(golden_dir().join("manifest.json")).unwrap()).unwrap();
    manifest["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().unwrap().to_owned(),
            records: c["records"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    let headers = r["headers"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|h| Header { key: h[0].as_str().unwrap().to_owned(), value: hex(&h[1]).map(Bytes::from) })
                        .collect();
                    (r["timestamp"].as_i64().unwrap(), hex(&r["key"]), hex(&r["value"]), headers)
                })
                .collect(),
        })
        .collect()
}

/// Builds a case's batch with Cairn's builder.
fn build(case: &Case) -> Bytes {
    let mut b = RecordBatchBuilder::new();
    for (ts, key, value, headers) in &case.records {
        b.push(*ts, key.as_deref(), value.as_deref(), headers);
    }
    b.build()
}

#[test]
fn batches_written_by_kafka_python_decode_to_the_manifest_records() {
    let cases = cases();
    assert!(cases.len() >= 6, "the manifest should cover at least six cases");
    for case in &cases {
        let path = golden_dir().join(format!("{}.kafka-python.bin", case.name));
        let bytes = Bytes::from(std::fs::read(&path).unwrap());
        validate_for_append(&bytes, 1 << 20).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let batch = RecordBatch::new(bytes).unwrap();
        let records: Vec<_> = batch.records().collect::<Result<_, _>>().unwrap();
        assert_eq!(records.len(), case.records.len(), "{}", case.name);
        for (i, (got, (ts, key, value, headers))) in records.iter().zip(&case.records).enumerate() {
            assert_eq!(got.offset, i as i64, "{} record {i}", case.name);
            assert_eq!(got.timestamp, *ts, "{} record {i}", case.name);
            assert_eq!(got.key.as_deref(), key.as_deref(), "{} record {i}", case.name);
            assert_eq!(got.value.as_deref(), value.as_deref(), "{} record {i}", case.name);
            assert_eq!(&got.headers, headers, "{} record {i}", case.name);
        }
    }
}

#[test]
fn our_builder_reproduces_kafka_python_byte_for_byte_except_the_leader_epoch() {
    for case in &cases() {
        let theirs = std::fs::read(golden_dir().join(format!("{}.kafka-python.bin", case.name))).unwrap();
        let ours = build(case);
        assert_eq!(ours.len(), theirs.len(), "{}: length", case.name);
        assert_eq!(&ours[..12], &theirs[..12], "{}: base offset and length", case.name);
        assert_eq!(&ours[12..16], &(-1i32).to_be_bytes(), "{}: our leader epoch", case.name);
        assert_eq!(&ours[16..], &theirs[16..], "{}: magic, CRC, header and records", case.name);
    }
}
