#!/usr/bin/env python3
"""Golden RecordBatch v2 files from kafka-python, an independent Kafka client.

manifest.json (next to this script) lists the cases: each is a list of records with a
timestamp, a key and a value (hex, or null), and headers ([key, hex-or-null] pairs). Every case
is one uncompressed, non-transactional batch with producer id, epoch and base sequence -1 and
record offsets 0..n-1.

Subcommands:

  generate [--out DIR]  build each case with kafka-python's DefaultRecordBatchBuilder and write
                        DIR/<name>.kafka-python.bin (DIR defaults to this script's folder).
  verify FILE...        parse each file with kafka-python, check its CRC32C, header fields and
                        every record against the case named by the file's stem before the first
                        '.' (so <name>.kafka-python.bin and e.g. <name>.cairn.bin both map to
                        <name>). Prints one line per good file, then "golden: N passed, M failed";
                        exits 1 if any file failed.
  check                 regenerate into a temporary folder and byte-compare with the committed
                        .kafka-python.bin files; exits 1 if they differ.

Known encoding difference: kafka-python writes partitionLeaderEpoch (bytes 12..16, outside the
CRC) as 0, Cairn's RecordBatchBuilder as -1. verify does not check that field, so it accepts both.
Null header values are supported by kafka-python (written as length -1) and are covered.

Requires Python 3.11 and kafka-python (pip install kafka-python); the committed files were made
with the version named in the manifest's "generator" field.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
from kafka.record.memory_records import MemoryRecords

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "manifest.json"
SUFFIX = ".kafka-python.bin"
BATCH_SIZE = 1 << 30  # large enough that the builder never refuses a record


def load_cases() -> dict[str, list[dict]]:
    """Case name -> records, with hex fields decoded to bytes."""
    manifest = json.loads(MANIFEST.read_text(encoding="utf-8"))
    unhex = lambda s: None if s is None else bytes.fromhex(s)
    cases = {}
    for case in manifest["cases"]:
        cases[case["name"]] = [
            {
                "timestamp": r["timestamp"],
                "key": unhex(r["key"]),
                "value": unhex(r["value"]),
                "headers": [(k, unhex(v)) for k, v in r["headers"]],
            }
            for r in case["records"]
        ]
    return cases


def build(records: list[dict]) -> bytes:
    """One batch holding `records` at offsets 0..n-1, as kafka-python encodes it."""
    builder = DefaultRecordBatchBuilder(
        magic=2, compression_type=0, is_transactional=0, producer_id=-1,
        producer_epoch=-1, base_sequence=-1, batch_size=BATCH_SIZE)
    for offset, r in enumerate(records):
        meta = builder.append(offset, timestamp=r["timestamp"], key=r["key"],
                              value=r["value"], headers=r["headers"])
        if meta is None:
            raise RuntimeError(f"builder refused record {offset}")
    return bytes(builder.build())


def generate(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, records in load_cases().items():
        path = out / (name + SUFFIX)
        path.write_bytes(build(records))
        written.append(path)
    return written


def verify_one(path: Path, cases: dict[str, list[dict]]) -> str:
    """Checks one file; returns a summary line or raises ValueError describing the mismatch."""
    name = path.name.split(".", 1)[0]
    if name not in cases:
        raise ValueError(f"no case named {name!r} in {MANIFEST.name}")
    want = cases[name]
    data = path.read_bytes()
    batches = MemoryRecords(data)
    if not batches.has_next():
        raise ValueError("no complete batch in the file")
    batch = batches.next_batch()
    if batches.has_next() or batches.valid_bytes() != len(data):
        raise ValueError("file holds more than exactly one batch")
    if not isinstance(batch, DefaultRecordBatch) or batch.magic != 2:
        raise ValueError(f"magic is {batch.magic}, expected 2")
    if not batch.validate_crc():
        raise ValueError(f"CRC32C mismatch (stored {batch.crc:#010x})")
    expect_header = {
        "base_offset": 0,
        "attributes": 0,
        "last_offset_delta": len(want) - 1,
        "first_timestamp": want[0]["timestamp"],
        "max_timestamp": max(r["timestamp"] for r in want),
        "producer_id": -1,
        "producer_epoch": -1,
        "base_sequence": -1,
        "records_count": len(want),
    }
    for field, expected in expect_header.items():
        got = getattr(batch, field)
        if got != expected:
            raise ValueError(f"header {field} is {got}, expected {expected}")
    got_records = list(batch)  # kafka-python also fails on bytes left after the last record
    if len(got_records) != len(want):
        raise ValueError(f"{len(got_records)} records, expected {len(want)}")
    for offset, (got, exp) in enumerate(zip(got_records, want)):
        actual = {"offset": got.offset, "timestamp": got.timestamp, "key": got.key,
                  "value": got.value, "headers": [(k, v) for k, v in got.headers]}
        expected = {"offset": offset, **exp}
        for field in actual:
            if actual[field] != expected[field]:
                raise ValueError(f"record {offset} {field} is {actual[field]!r}, "
                                 f"expected {expected[field]!r}")
    return (f"ok {path.name}: {len(want)} records, {len(data)} bytes, "
            f"crc {batch.crc:#010x}, leader epoch {batch.leader_epoch}")


def verify(paths: list[Path]) -> int:
    cases = load_cases()
    passed = failed = 0
    for path in paths:
        try:
            print(verify_one(path, cases))
            passed += 1
        except Exception as e:  # any parse error from kafka-python is a failure of that file
            print(f"FAIL {path}: {type(e).__name__}: {e}", file=sys.stderr)
            failed += 1
    print(f"golden: {passed} passed, {failed} failed")
    return 1 if failed else 0


def check() -> int:
    committed = {p.name for p in HERE.glob("*" + SUFFIX)}
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        for fresh in generate(Path(tmp)):
            old = HERE / fresh.name
            committed.discard(fresh.name)
            if not old.exists():
                problems.append(f"{fresh.name}: missing; run `golden.py generate`")
            elif old.read_bytes() != fresh.read_bytes():
                problems.append(f"{fresh.name}: committed bytes differ from a fresh build")
    problems += [f"{name}: no such case in {MANIFEST.name}" for name in sorted(committed)]
    if problems:
        from importlib.metadata import version
        generator = json.loads(MANIFEST.read_text(encoding="utf-8"))["generator"]
        print("golden check FAILED (installed kafka-python " + version("kafka-python")
              + f", manifest says {generator}):", file=sys.stderr)
        for p in problems:
            print("  " + p, file=sys.stderr)
        return 1
    print(f"golden check: {len(load_cases())} files match")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    gen = sub.add_parser("generate", help="write <name>.kafka-python.bin for every case")
    gen.add_argument("--out", type=Path, default=HERE, help="output folder (default: this folder)")
    ver = sub.add_parser("verify", help="check batch files against the manifest")
    ver.add_argument("files", nargs="+", type=Path)
    sub.add_parser("check", help="regenerate and compare with the committed files")
    args = parser.parse_args()
    if args.cmd == "generate":
        for path in generate(args.out):
            print(f"wrote {path}")
        return 0
    if args.cmd == "verify":
        return verify(args.files)
    return check()


if __name__ == "__main__":
    sys.exit(main())
