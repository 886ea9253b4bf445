//! Writes Cairn-encoded batches for every case of `tests/golden/manifest.json` into a directory,
//! as `<case>.cairn.bin`, so that `golden.py verify` can check them with kafka-python.
//!
//! ```text
//! cargo run -p cairn-protocol --example golden_encode -- OUT_DIR
//! python3 protocol/tests/golden/golden.py verify OUT_DIR/*.cairn.bin
//! ```

use std::path::PathBuf;

use bytes::Bytes;
use cairn_protocol::{Header, RecordBatchBuilder};
use serde_json::Value;

fn hex(v: &Value) -> Option<Vec<u8>> {
    let s = v.as_str()?;
    Some((0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect())
}

fn main() {
    let out = PathBuf::from(std::env::args().nth(1).expect("usage: golden_encode OUT_DIR"));
    let manifest_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/manifest.json");
    let manifest: Value = serde_json::from_slice(&std::fs::read(manifest_path).expect("manifest")).expect("json");
    std::fs::create_dir_all(&out).expect("create output dir");
    for case in manifest["cases"].as_array().expect("cases") {
        let mut b = RecordBatchBuilder::new();
        for r in case["records"].as_array().expect("records") {
            let headers: Vec<Header> = r["headers"]
                .as_array()
                .expect("headers")
                .iter()
                .map(|h| Header { key: h[0].as_str().expect("key").to_owned(), value: hex(&h[1]).map(Bytes::from) })
                .collect();
            b.push(
                r["timestamp"].as_i64().expect("ts"),
                hex(&r["key"]).as_deref(),
                hex(&r["value"]).as_deref(),
                &headers,
            );
        }
        let name = case["name"].as_str().expect("name");
        std::fs::write(out.join(format!("{name}.cairn.bin")), b.build()).expect("write");
    }
}
