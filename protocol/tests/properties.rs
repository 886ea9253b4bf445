//! Property tests: decoding never panics on any input, and every message round-trips.

use bytes::Bytes;
use cairn_protocol::messages::fetch::FetchResponse;
use cairn_protocol::messages::produce::{ProducePartition, ProduceRequest, ProduceTopic};
use cairn_protocol::record_batch::{check_batch, validate_for_append, BatchSplitter, RecordBatch};
use cairn_protocol::{decode_request, decode_response, encode_request, Acks, BatchPayload, Header, RecordBatchBuilder};
use proptest::prelude::*;

fn arb_header() -> impl Strategy<Value = Header> {
    ("[a-zA-Z0-9éü._-]{0,12}", proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)))
        .prop_map(|(key, value)| Header { key, value: value.map(Bytes::from) })
}

type ArbRecord = (i64, Option<Vec<u8>>, Option<Vec<u8>>, Vec<Header>);

fn arb_record() -> impl Strategy<Value = ArbRecord> {
    (
        0i64..4_000_000_000_000,
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..400)),
        proptest::collection::vec(arb_header(), 0..4),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn decoding_arbitrary_bytes_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        let bytes = Bytes::from(data);
        let _ = decode_request(bytes.clone());
        let _ = decode_response::<FetchResponse>(bytes.clone());
        let _ = check_batch(&bytes);
        let _ = validate_for_append(&bytes, 1 << 20);
        for b in BatchSplitter::new(bytes.clone()).flatten() {
            for r in b.records() {
                let _ = r;
            }
        }
        if let Ok(b) = RecordBatch::new(bytes) {
            let _ = b.records().count();
        }
    }

    #[test]
    fn built_batches_validate_and_decode_to_what_was_pushed(records in proptest::collection::vec(arb_record(), 1..30)) {
        let mut b = RecordBatchBuilder::new();
        for (ts, k, v, h) in &records {
            b.push(*ts, k.as_deref(), v.as_deref(), h);
        }
        let bytes = b.build();
        validate_for_append(&bytes, 1 << 20).unwrap();
        let batch = RecordBatch::new(bytes).unwrap();
        let got: Vec<_> = batch.records().collect::<Result<_, _>>().unwrap();
        prop_assert_eq!(got.len(), records.len());
        for (i, (r, (ts, k, v, h))) in got.iter().zip(&records).enumerate() {
            prop_assert_eq!(r.offset, i as i64);
            prop_assert_eq!(r.timestamp, *ts);
            prop_assert_eq!(r.key.as_deref(), k.as_deref());
            prop_assert_eq!(r.value.as_deref(), v.as_deref());
            prop_assert_eq!(&r.headers, h);
        }
    }

    #[test]
    fn batches_with_referenced_values_are_byte_identical_to_copied_ones(
        records in proptest::collection::vec(
            (
                0i64..4_000_000_000_000,
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..1500)),
                proptest::collection::vec(arb_header(), 0..3),
            ),
            1..20,
        ),
        corr in any::<u32>(),
    ) {
        let mut copied = RecordBatchBuilder::new().producer(7, 0, 3);
        let mut shared = RecordBatchBuilder::with_capacity(64).producer(7, 0, 3).pieces_hint(3);
        let mut shared_too = RecordBatchBuilder::new().producer(7, 0, 3);
        for (ts, k, v, h) in &records {
            let v = v.clone().map(Bytes::from);
            copied.push(*ts, k.as_deref(), v.as_deref(), h);
            shared.push_shared(*ts, k.as_deref(), v.as_ref(), h);
            shared_too.push_shared(*ts, k.as_deref(), v.as_ref(), h);
        }
        prop_assert_eq!(shared.size_bytes(), copied.size_bytes());
        prop_assert!(shared.inline_bytes() <= copied.inline_bytes());
        let want = copied.build();
        prop_assert_eq!(&shared_too.build(), &want, "build() copies referenced values in");
        let payload = shared.build_payload();
        prop_assert_eq!(payload.len(), want.len());
        prop_assert_eq!(&payload.contiguous(), &want);
        validate_for_append(&payload.contiguous(), 1 << 20).unwrap();
        // And through a produce request: the pieces arrive as the one batch.
        let req = ProduceRequest {
            acks: Acks::Leader,
            timeout_ms: 1000,
            topics: vec![ProduceTopic { name: "t".into(), partitions: vec![ProducePartition { partition: 0, records: payload }] }],
        };
        let frame: Vec<u8> = encode_request(corr, "prop", &req).iter().flat_map(|c| c.iter().copied()).collect();
        let (_, decoded) = decode_request(Bytes::from(frame[4..].to_vec())).unwrap();
        let cairn_protocol::AnyRequest::Produce(decoded) = decoded else { panic!("not a produce request") };
        prop_assert_eq!(decoded.topics[0].partitions[0].records.contiguous(), want.clone());
        prop_assert_eq!(&decoded.topics[0].partitions[0].records, &BatchPayload::from(want), "equal by bytes, however cut");
    }

    #[test]
    fn any_single_byte_flip_in_a_batch_is_detected(records in proptest::collection::vec(arb_record(), 1..5), at in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut b = RecordBatchBuilder::new();
        for (ts, k, v, h) in &records {
            b.push(*ts, k.as_deref(), v.as_deref(), h);
        }
        let mut bytes = b.build().to_vec();
        // Bytes 0..16 (base offset, length, leader epoch) are outside the CRC by design.
        let i = 16 + at.index(bytes.len() - 16);
        bytes[i] ^= 1 << bit;
        prop_assert!(validate_for_append(&bytes, 1 << 20).is_err());
    }

    #[test]
    fn produce_requests_round_trip_through_the_frame_format(
        corr in any::<u32>(),
        names in proptest::collection::vec("[a-z]{1,10}", 1..4),
        acks in prop::sample::select(vec![Acks::None, Acks::Leader, Acks::All]),
    ) {
        let req = ProduceRequest {
            acks,
            timeout_ms: 1000,
            topics: names.iter().map(|n| ProduceTopic {
                name: n.clone(),
                partitions: vec![ProducePartition { partition: 3, records: Bytes::from_static(b"not validated here").into() }],
            }).collect(),
        };
        let chunks = encode_request(corr, "prop", &req);
        let frame: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        let (header, decoded) = decode_request(Bytes::from(frame[4..].to_vec())).unwrap();
        prop_assert_eq!(header.correlation_id, corr);
        prop_assert_eq!(decoded, cairn_protocol::AnyRequest::Produce(req));
    }
}
