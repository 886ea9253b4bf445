//! Wire protocol and server tests against the real `cairn-broker` binary.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_client::{Connection, Consumer, NewTopic, Offset, Producer, ProducerRecord};
use cairn_protocol::api::{decode_response, encode_request, Request};
use cairn_protocol::messages::api_versions::{ApiVersionsRequest, ApiVersionsResponse};
use cairn_protocol::messages::fetch::{FetchPartition, FetchRequest, FetchResponse, FetchTopic};
use cairn_protocol::messages::groups::DescribeGroupsRequest;
use cairn_protocol::messages::metadata::{MetadataRequest, MetadataResponse};
use cairn_protocol::messages::produce::{ProducePartition, ProduceRequest, ProduceResponse, ProduceTopic};
use cairn_protocol::record_batch::BatchSplitter;
use cairn_protocol::{Acks, ErrorCode, RecordBatchBuilder, WireWriter};
use common::{run, TestBroker};

fn batch(values: &[&str]) -> Bytes {
    let mut b = RecordBatchBuilder::new();
    for v in values {
        b.push(1_700_000_000_000, None, Some(v.as_bytes()), &[]);
    }
    b.build()
}

fn produce_req(topic: &str, acks: Acks, records: Bytes) -> ProduceRequest {
    ProduceRequest {
        acks,
        timeout_ms: 10_000,
        topics: vec![ProduceTopic {
            name: topic.into(),
            partitions: vec![ProducePartition { partition: 0, records: records.into() }],
        }],
    }
}

fn fetch_req(topic: &str, offset: i64, max_wait_ms: u32) -> FetchRequest {
    FetchRequest {
        max_wait_ms,
        min_bytes: 1,
        max_bytes: 1 << 20,
        group: None,
        topics: vec![FetchTopic {
            name: topic.into(),
            partitions: vec![FetchPartition { partition: 0, fetch_offset: offset, partition_max_bytes: 1 << 20 }],
        }],
    }
}

/// Appends one request's frame to `buf`, for requests written to a socket in one go.
fn put_request<R: Request>(buf: &mut Vec<u8>, id: u32, client: &str, request: &R) {
    for chunk in encode_request(id, client, request) {
        buf.extend_from_slice(&chunk);
    }
}

fn values(resp: &FetchResponse) -> Vec<(i64, String)> {
    let p = &resp.topics[0].partitions[0];
    assert_eq!(p.error, ErrorCode::None);
    BatchSplitter::new(p.records_bytes())
        .flat_map(|b| b.unwrap().records().map(|r| r.unwrap()).collect::<Vec<_>>())
        .map(|r| (r.offset, String::from_utf8(r.value.unwrap().to_vec()).unwrap()))
        .collect()
}

#[test]
fn produce_and_fetch_round_trip_for_every_acks_level() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("t", 1)).await.unwrap();
        let conn = Connection::connect(broker.connection()).await.unwrap();
        conn.send_only(&produce_req("t", Acks::None, batch(&["a0", "a1"]))).await.unwrap();
        let r = conn.request(&produce_req("t", Acks::Leader, batch(&["b0"]))).await.unwrap();
        assert_eq!(r.topics[0].partitions[0].error, ErrorCode::None);
        assert_eq!(r.topics[0].partitions[0].base_offset, 2, "acks=none was appended before, in order");
        let r = conn.request(&produce_req("t", Acks::All, batch(&["c0", "c1", "c2"]))).await.unwrap();
        assert_eq!(r.topics[0].partitions[0].base_offset, 3);
        let got = values(&conn.request(&fetch_req("t", 0, 0)).await.unwrap());
        let want: Vec<(i64, String)> =
            ["a0", "a1", "b0", "c0", "c1", "c2"].iter().enumerate().map(|(i, v)| (i as i64, v.to_string())).collect();
        assert_eq!(got, want);
        // An offset inside a batch returns that batch; the client skips what it did not ask for.
        let got = values(&conn.request(&fetch_req("t", 4, 0)).await.unwrap());
        assert_eq!(got.first().map(|x| x.0), Some(3));
        // Internal topics are written by the broker only.
        let r = conn.request(&produce_req("__consumer_offsets", Acks::Leader, batch(&["forged"]))).await.unwrap();
        assert_eq!(r.topics[0].partitions[0].error, ErrorCode::InvalidTopicName);
        // Past the end: OFFSET_OUT_OF_RANGE with the valid range.
        let resp = conn.request(&fetch_req("t", 99, 0)).await.unwrap();
        let p = &resp.topics[0].partitions[0];
        assert_eq!((p.error, p.log_start_offset, p.log_end_offset), (ErrorCode::OffsetOutOfRange, 0, 6));
    });
}

#[test]
fn ten_thousand_pipelined_requests_are_answered_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(120), async {
        broker.admin().await.create_topic(NewTopic::new("p", 1)).await.unwrap();
    });
    let mut s = TcpStream::connect(broker.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut buf = Vec::new();
        for id in 1..=10_000u32 {
            put_request(&mut buf, id, "pipeline", &produce_req("p", Acks::Leader, batch(&["x"])));
        }
        w.write_all(&buf).unwrap();
    });
    let mut reader = std::io::BufReader::new(&mut s);
    for id in 1..=10_000u32 {
        let mut len = [0u8; 4];
        reader.read_exact(&mut len).unwrap();
        let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
        reader.read_exact(&mut frame).unwrap();
        let (corr, body) = decode_response::<ProduceResponse>(Bytes::from(frame)).unwrap();
        assert_eq!(corr, id, "responses come back in request order");
        assert_eq!(body.unwrap().topics[0].partitions[0].base_offset, i64::from(id) - 1);
    }
    writer.join().unwrap();
}

#[test]
fn responses_ready_before_a_parked_fetch_are_not_held_back_by_it() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("h", 1)).await.unwrap();
    });
    // Five quick requests, then a fetch that parks for 30 s, in one write: the five answers are
    // owed before the fetch's and must go out now, not when the fetch ends.
    let mut buf = Vec::new();
    for id in 1..=5u32 {
        put_request(&mut buf, id, "held", &ApiVersionsRequest);
    }
    put_request(&mut buf, 6, "held", &fetch_req("h", 0, 30_000));
    let mut s = TcpStream::connect(broker.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&buf).unwrap();
    for id in 1..=5u32 {
        let frame = read_frame(&mut s).expect("an answer owed before the parked fetch arrives while it is parked");
        let (corr, body) = decode_response::<ApiVersionsResponse>(frame).unwrap();
        assert_eq!(corr, id);
        body.unwrap();
    }
}

/// A name repeated in one request is answered once: a Metadata request of a few kilobytes
/// naming a 1,000-partition topic 5,000 times made the broker build 5,000 descriptions (about
/// 110 MB), and DescribeGroups likewise.
#[test]
fn names_repeated_in_a_metadata_or_describe_groups_request_are_answered_once() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("wide", 1000)).await.unwrap();
        let conn = Connection::connect(broker.connection()).await.unwrap();
        let mut names = vec!["wide".to_string(); 5000];
        names.push("other".into());
        names.push("wide".into());
        let resp = conn.request(&MetadataRequest { topics: Some(names) }).await.unwrap();
        let answered: Vec<&str> = resp.topics.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(answered, ["wide", "other"]);
        assert_eq!(resp.topics[0].partitions.len(), 1000);
        let groups = vec!["g".to_string(); 5000];
        let resp = conn.request(&DescribeGroupsRequest { groups }).await.unwrap();
        assert_eq!(resp.groups.len(), 1);
    });
}

/// The idle timeout holds also while the connection's reader waits for room in a full
/// in-flight queue: fetches that park for long (and cannot be satisfied) filled it, the reader
/// stopped checking, and the connection kept its parked-fetch slots as long as they asked.
#[test]
fn a_connection_whose_in_flight_queue_is_full_still_closes_when_idle() {
    let dir = tempfile::tempdir().unwrap();
    let broker =
        TestBroker::start(dir.path(), "idle_timeout_ms = 1000\nframe_timeout_ms = 1000\nconnection_in_flight_max = 1");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("quiet", 1)).await.unwrap();
    });
    let mut buf = Vec::new();
    for id in 1..=4u32 {
        let req = FetchRequest { min_bytes: u32::MAX, ..fetch_req("quiet", 0, 60_000) };
        put_request(&mut buf, id, "parked", &req);
    }
    let mut s = TcpStream::connect(broker.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(&buf).unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest); // returns at EOF, or errors at the read timeout
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(15), "the idle connection stayed open {waited:?}");
}

/// With `auto_create_topics`, a produce or a Metadata request naming a new topic creates it
/// (off the runtime, by its connection) and is then served; requests pipelined behind it keep
/// their order.
#[test]
fn auto_created_topics_are_served_to_the_request_that_named_them_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "auto_create_topics = true\ndefault_partitions = 3");
    let mut buf = Vec::new();
    put_request(&mut buf, 1, "auto", &produce_req("fresh", Acks::Leader, batch(&["a"])));
    put_request(&mut buf, 2, "auto", &produce_req("fresh", Acks::Leader, batch(&["b", "c"])));
    put_request(&mut buf, 3, "auto", &MetadataRequest { topics: Some(vec!["other".into(), "fresh".into()]) });
    let mut s = TcpStream::connect(broker.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&buf).unwrap();
    for (id, base) in [(1u32, 0i64), (2, 1)] {
        let (corr, body) = decode_response::<ProduceResponse>(read_frame(&mut s).unwrap()).unwrap();
        assert_eq!(corr, id);
        let p = &body.unwrap().topics[0].partitions[0];
        assert_eq!((p.error, p.base_offset), (ErrorCode::None, base), "request {id}");
    }
    let (corr, body) = decode_response::<MetadataResponse>(read_frame(&mut s).unwrap()).unwrap();
    assert_eq!(corr, 3);
    let topics = body.unwrap().topics;
    let shape: Vec<(&str, ErrorCode, usize)> =
        topics.iter().map(|t| (t.name.as_str(), t.error, t.partitions.len())).collect();
    assert_eq!(shape, [("other", ErrorCode::None, 3), ("fresh", ErrorCode::None, 3)]);
}

/// Requests pipelined on one connection take effect in their order, also those carried out
/// off the runtime (topic creation and deletion): a produce sent right behind the CreateTopics
/// of its topic finds the topic, and a DeleteTopics behind that produce removes it after.
#[test]
fn pipelined_topic_administration_takes_effect_in_request_order() {
    use cairn_protocol::messages::create_topics::{CreatableTopic, CreateTopicsRequest, CreateTopicsResponse};
    use cairn_protocol::messages::delete_topics::{DeleteTopicsRequest, DeleteTopicsResponse};
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    let create =
        CreateTopicsRequest { topics: vec![CreatableTopic { name: "piped".into(), partitions: 4, configs: vec![] }] };
    let mut buf = Vec::new();
    put_request(&mut buf, 1, "piped", &create);
    put_request(&mut buf, 2, "piped", &produce_req("piped", Acks::Leader, batch(&["a"])));
    put_request(&mut buf, 3, "piped", &DeleteTopicsRequest { topics: vec!["piped".into()] });
    put_request(&mut buf, 4, "piped", &MetadataRequest { topics: Some(vec!["piped".into()]) });
    let mut s = TcpStream::connect(broker.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&buf).unwrap();
    let (_, created) = decode_response::<CreateTopicsResponse>(read_frame(&mut s).unwrap()).unwrap();
    assert_eq!(created.unwrap().topics[0].error, ErrorCode::None);
    let (_, produced) = decode_response::<ProduceResponse>(read_frame(&mut s).unwrap()).unwrap();
    assert_eq!(produced.unwrap().topics[0].partitions[0].error, ErrorCode::None, "the produce ran before the create");
    let (_, deleted) = decode_response::<DeleteTopicsResponse>(read_frame(&mut s).unwrap()).unwrap();
    assert_eq!(deleted.unwrap().topics[0].error, ErrorCode::None);
    let (_, meta) = decode_response::<MetadataResponse>(read_frame(&mut s).unwrap()).unwrap();
    assert_eq!(meta.unwrap().topics[0].error, ErrorCode::UnknownTopicOrPartition, "the delete ran after the metadata");
}

/// A request read before the idle timeout closed its connection was carried out, so it is
/// answered: the response waits for room in the full queue, then the connection closes.
#[test]
fn a_connection_closed_while_idle_still_answers_every_request_it_read() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "idle_timeout_ms = 300\nconnection_in_flight_max = 1");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("kept", 1)).await.unwrap();
    });
    let mut buf = Vec::new();
    let parked = FetchRequest { min_bytes: u32::MAX, ..fetch_req("kept", 0, 2_000) };
    put_request(&mut buf, 1, "idle", &parked);
    for (id, value) in [(2u32, "a"), (3, "x")] {
        put_request(&mut buf, id, "idle", &produce_req("kept", Acks::Leader, batch(&[value])));
    }
    let mut s = TcpStream::connect(broker.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&buf).unwrap();
    let (corr, _) = decode_response::<FetchResponse>(read_frame(&mut s).expect("the fetch is answered")).unwrap();
    assert_eq!(corr, 1);
    for (id, base) in [(2u32, 0i64), (3, 1)] {
        let frame = read_frame(&mut s).unwrap_or_else(|| panic!("request {id}, stored, was not answered"));
        let (corr, body) = decode_response::<ProduceResponse>(frame).unwrap();
        assert_eq!(corr, id);
        assert_eq!(body.unwrap().topics[0].partitions[0].base_offset, base);
    }
    assert!(closed_by_broker(&mut s));
}

/// `fetch_wait_max_ms` bounds how long any fetch parks, whatever it asks for.
#[test]
fn a_fetch_parks_no_longer_than_fetch_wait_max_ms() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "fetch_wait_max_ms = 300");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("idle", 1)).await.unwrap();
        let conn = Connection::connect(broker.connection()).await.unwrap();
        let started = Instant::now();
        let resp = conn.request(&fetch_req("idle", 0, 30_000)).await.unwrap();
        let waited = started.elapsed();
        assert_eq!(resp.topics[0].partitions[0].error, ErrorCode::None);
        assert!(waited < Duration::from_secs(10), "a 30 s fetch was held {waited:?}");
    });
}

/// A fetch that names no partition has nothing to wait for: it is answered, empty, and the
/// connection goes on (it used to panic the connection's task while parking on no partition).
#[test]
fn a_fetch_naming_no_partition_is_answered_and_the_connection_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    let empty = FetchRequest { max_wait_ms: 500, min_bytes: 1, max_bytes: 1 << 20, group: None, topics: vec![] };
    let no_partitions =
        FetchRequest { topics: vec![FetchTopic { name: "none".into(), partitions: vec![] }], ..empty.clone() };
    let mut buf = Vec::new();
    for (id, req) in [(1u32, &empty), (2, &no_partitions)] {
        put_request(&mut buf, id, "empty", req);
    }
    put_request(&mut buf, 3, "empty", &ApiVersionsRequest);
    let mut s = TcpStream::connect(broker.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&buf).unwrap();
    for id in 1..=2u32 {
        let frame = read_frame(&mut s).expect("the empty fetch is answered");
        let (corr, body) = decode_response::<FetchResponse>(frame).unwrap();
        assert_eq!(corr, id);
        assert!(body.unwrap().topics.iter().all(|t| t.partitions.is_empty()));
    }
    let frame = read_frame(&mut s).expect("the connection goes on");
    let (corr, body) = decode_response::<ApiVersionsResponse>(frame).unwrap();
    assert_eq!(corr, 3);
    body.unwrap();
    assert!(!broker.log_text().contains("panicked"), "{}", broker.log_text());
}

#[test]
fn past_parked_fetches_max_a_fetch_answers_at_once_and_a_finished_park_frees_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "parked_fetches_max = 1\n");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("s", 1)).await.unwrap();
        let conn = Connection::connect(broker.connection()).await.unwrap();
        let parks = |offset: i64| {
            let conn = conn.clone();
            tokio::spawn(
                async move { conn.request_with(&fetch_req("s", offset, 45_000), Duration::from_secs(60)).await },
            )
        };
        let first = parks(0);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!first.is_finished(), "the first fetch takes the only slot and parks");
        // The only slot is taken: this one answers at once, empty, instead of waiting 45 s.
        let other = Connection::connect(broker.connection()).await.unwrap();
        let fetch = fetch_req("s", 0, 45_000);
        let refused = other.request_with(&fetch, Duration::from_secs(60));
        let refused = tokio::time::timeout(Duration::from_secs(20), refused).await.expect("answered at once").unwrap();
        assert!(values(&refused).is_empty());
        // A produce ends the parked fetch and its slot comes back: the next fetch parks again.
        other.request(&produce_req("s", Acks::Leader, batch(&["one"]))).await.unwrap();
        assert_eq!(values(&first.await.unwrap().unwrap()), vec![(0, "one".to_string())]);
        let second = parks(1);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!second.is_finished(), "the freed slot lets the next fetch park");
        other.request(&produce_req("s", Acks::Leader, batch(&["two"]))).await.unwrap();
        assert_eq!(values(&second.await.unwrap().unwrap()), vec![(1, "two".to_string())]);
    });
}

#[test]
fn a_parked_fetch_is_woken_by_a_produce_long_before_max_wait() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("w", 1)).await.unwrap();
        let conn = Connection::connect(broker.connection()).await.unwrap();
        let fetcher = conn.clone();
        let started = Instant::now();
        let parked =
            tokio::spawn(
                async move { fetcher.request_with(&fetch_req("w", 0, 45_000), Duration::from_secs(60)).await },
            );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!parked.is_finished(), "the fetch parks while there is no data");
        let other = Connection::connect(broker.connection()).await.unwrap();
        other.request(&produce_req("w", Acks::Leader, batch(&["wake"]))).await.unwrap();
        let resp = parked.await.unwrap().unwrap();
        assert_eq!(values(&resp), vec![(0, "wake".to_string())]);
        assert!(started.elapsed() < Duration::from_secs(40), "woken by the produce, not by max_wait_ms");
    });
}

#[test]
fn a_fetch_short_of_min_bytes_at_a_segment_end_is_answered_at_once() {
    // A read returns one segment's batches. When the next segment holds more, waiting cannot
    // bring the response closer to min_bytes (each new produce wakes it to the same read), so
    // the broker answers at once, as Kafka does, instead of at max_wait every segment.
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        let topic = NewTopic { segment_bytes: Some(4096), batch_bytes_max: Some(4096), ..NewTopic::new("seg", 1) };
        broker.admin().await.create_topic(topic).await.unwrap();
        let conn = Connection::connect(broker.connection()).await.unwrap();
        let big = "x".repeat(3000);
        for _ in 0..2 {
            let r = conn.request(&produce_req("seg", Acks::Leader, batch(&[&big]))).await.unwrap();
            assert_eq!(r.topics[0].partitions[0].error, ErrorCode::None);
        }
        let fetch = FetchRequest { min_bytes: 5000, ..fetch_req("seg", 0, 30_000) };
        let started = Instant::now();
        let resp = conn.request_with(&fetch, Duration::from_secs(60)).await.unwrap();
        assert_eq!(values(&resp).len(), 1, "one segment's batch");
        assert!(started.elapsed() < Duration::from_secs(20), "answered after {:?}", started.elapsed());
        // At the last segment, short of min_bytes, it still parks.
        let fetch = FetchRequest { min_bytes: 5000, ..fetch_req("seg", 1, 500) };
        let started = Instant::now();
        let resp = conn.request_with(&fetch, Duration::from_secs(60)).await.unwrap();
        assert_eq!(values(&resp).len(), 1);
        assert!(started.elapsed() >= Duration::from_millis(400), "parked: {:?}", started.elapsed());
    });
}

#[test]
fn deleting_a_topic_answers_the_fetches_parked_on_it_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        let admin = broker.admin().await;
        admin.create_topic(NewTopic::new("gone", 1)).await.unwrap();
        let conn = Connection::connect(broker.connection()).await.unwrap();
        let started = Instant::now();
        let parked =
            tokio::spawn(
                async move { conn.request_with(&fetch_req("gone", 0, 30_000), Duration::from_secs(60)).await },
            );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!parked.is_finished(), "the fetch parks while there is no data");
        admin.delete_topic("gone").await.unwrap();
        let resp = parked.await.unwrap().unwrap();
        assert_eq!(resp.topics[0].partitions[0].error, ErrorCode::UnknownTopicOrPartition);
        assert!(started.elapsed() < Duration::from_secs(20), "answered after {:?}", started.elapsed());
    });
}

#[test]
fn sigterm_exits_zero_and_a_restart_keeps_topics_and_data_without_a_recovery_scan() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        let admin = broker.admin().await;
        admin.create_topic(NewTopic::new("keep", 2)).await.unwrap();
        let producer = Producer::connect(broker.producer_config()).await.unwrap();
        for i in 0..1000 {
            producer.send(ProducerRecord::new("keep", format!("v{i}")).partition(i % 2)).await.unwrap();
        }
        producer.close().await.unwrap();
    });
    assert_eq!(broker.terminate(), Some(0), "graceful shutdown exits 0");
    assert!(broker.log_text().contains("shutdown complete"));
    let broker = TestBroker::start(dir.path(), "");
    let log = broker.log_text();
    let line = log.lines().find(|l| l.contains("storage recovered")).expect("recovery line");
    assert!(line.contains("clean=true") && line.contains("scanned_segments=0"), "{line}");
    run(Duration::from_secs(60), async {
        let topic = broker.admin().await.describe_topic("keep").await.unwrap();
        assert_eq!(topic.partitions.iter().map(|p| p.end_offset).sum::<i64>(), 1000);
        let mut consumer = Consumer::connect(broker.consumer_config()).await.unwrap();
        consumer.assign("keep", None).await.unwrap();
        consumer.seek_all(Offset::Earliest);
        let mut n = 0;
        while n < 1000 {
            n += consumer.poll(Duration::from_secs(5)).await.unwrap().len();
        }
        assert_eq!(n, 1000);
    });
}

fn raw_frame(api_key: u16, correlation_id: u32, body: &[u8]) -> Vec<u8> {
    let mut w = WireWriter::new();
    w.u16(api_key);
    w.u16(0);
    w.u32(correlation_id);
    w.string("raw");
    w.raw(body);
    w.finish_contiguous().to_vec()
}

/// Reads one response frame (or `None` if the broker closed the connection).
fn read_frame(s: &mut TcpStream) -> Option<Bytes> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut frame).ok()?;
    Some(Bytes::from(frame))
}

fn closed_by_broker(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(0) | Err(_))
}

#[test]
fn a_fetch_stays_within_fetch_bytes_max_whatever_its_partition_max_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "fetch_bytes_max = 1048576\n");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("cap", 1)).await.unwrap();
        let conn = Connection::connect(broker.connection()).await.unwrap();
        let value = "v".repeat(60 * 1024);
        for _ in 0..48 {
            // 48 batches of 60 KiB: 2.9 MiB in all.
            conn.request(&produce_req("cap", Acks::Leader, batch(&[value.as_str()]))).await.unwrap();
        }
        for (max_bytes, partition_max_bytes) in [(u32::MAX, u32::MAX), (1 << 30, 1 << 30), (100, u32::MAX)] {
            let mut req = fetch_req("cap", 0, 0);
            req.max_bytes = max_bytes;
            req.topics[0].partitions[0].partition_max_bytes = partition_max_bytes;
            let resp = conn.request(&req).await.unwrap();
            let got = values(&resp).len();
            let bytes = resp.topics[0].partitions[0].records_bytes().len();
            let cap = (max_bytes as usize).min(1 << 20);
            assert!(got >= 1, "at least one batch, for progress");
            assert!(
                bytes <= cap.max(62 * 1024),
                "max_bytes {max_bytes}, partition_max_bytes {partition_max_bytes}: {bytes} bytes ({got} batches)"
            );
        }
    });
}

/// Connects and asks for the API versions until the broker answers (it closes connections past
/// `connections_max` at once); panics if it never does within `limit`.
fn wait_until_a_connection_is_served(addr: std::net::SocketAddr, limit: Duration, why: &str) -> Duration {
    let started = Instant::now();
    let mut request = Vec::new();
    put_request(&mut request, 1, "probe", &ApiVersionsRequest);
    loop {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        if s.write_all(&request).is_ok() && read_frame(&mut s).is_some() {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "{why}: no connection served for {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A connection that the broker serves (once the connection before it gave its slot back).
fn take_the_slot(addr: std::net::SocketAddr) -> TcpStream {
    let started = Instant::now();
    loop {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for chunk in encode_request(1, "slot", &ApiVersionsRequest) {
            s.write_all(&chunk).unwrap();
        }
        if read_frame(&mut s).is_some() {
            return s;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the only connection slot never came free");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_parked_fetch_of_a_client_that_left_does_not_keep_its_connection_slot() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "connections_max = 1\nframe_timeout_ms = 1000\n");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("gone", 1)).await.unwrap();
    });
    wait_until_a_connection_is_served(broker.addr, Duration::from_secs(20), "after the admin client left");
    // A fetch that may park for 49 days on an empty partition, then the client leaves.
    let mut s = take_the_slot(broker.addr);
    for chunk in encode_request(2, "leaver", &fetch_req("gone", 0, u32::MAX)) {
        s.write_all(&chunk).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut probe = TcpStream::connect(broker.addr).unwrap();
    probe.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(closed_by_broker(&mut probe), "the parked fetch's connection holds the only slot");
    drop(s);
    let took =
        wait_until_a_connection_is_served(broker.addr, Duration::from_secs(20), "after the fetching client left");
    eprintln!("the slot came back {took:?} after the client left");
}

#[test]
fn a_client_that_stops_reading_is_disconnected_and_its_slot_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "connections_max = 1\nframe_timeout_ms = 1000\n");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("big", 1)).await.unwrap();
    });
    run(Duration::from_secs(60), async {
        // One connection at a time here, and the admin's slot comes back only once the broker
        // has seen it close: hold the slot (answered) before producing.
        let conn = loop {
            let conn = Connection::connect(broker.connection()).await.unwrap();
            if conn.request(&ApiVersionsRequest).await.is_ok() {
                break conn;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let value = "x".repeat(64 * 1024);
        for _ in 0..16 {
            let values: Vec<&str> = vec![value.as_str(); 15];
            conn.request(&produce_req("big", Acks::Leader, batch(&values))).await.unwrap();
        }
    });
    wait_until_a_connection_is_served(broker.addr, Duration::from_secs(20), "after the producer left");
    // 64 fetches of up to 1 MiB each, never read: far more than the socket buffers hold.
    let mut s = take_the_slot(broker.addr);
    for id in 2..66u32 {
        for chunk in encode_request(id, "stalled", &fetch_req("big", 0, 0)) {
            s.write_all(&chunk).unwrap();
        }
    }
    let mut probe = TcpStream::connect(broker.addr).unwrap();
    probe.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(closed_by_broker(&mut probe), "the stalled connection holds the only slot");
    let took = wait_until_a_connection_is_served(broker.addr, Duration::from_secs(20), "while a client stalls");
    eprintln!("the stalled client was cut off and its slot came back after {took:?}");
    drop(s);
}

#[test]
fn hostile_inputs_are_answered_or_cut_off_while_another_client_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(120), async {
        let admin = broker.admin().await;
        admin.create_topic(NewTopic::new("ok", 1)).await.unwrap();
        admin.create_topic(NewTopic::new("crc", 1)).await.unwrap();
        let good_conn = broker.connection();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = std::sync::Arc::clone(&stop);
        // A well-behaved client produces and consumes throughout.
        let good = tokio::spawn(async move {
            let conn = Connection::connect(good_conn).await.unwrap();
            let mut offset = 0i64;
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                let r = conn.request(&produce_req("ok", Acks::Leader, batch(&["good"]))).await.unwrap();
                assert_eq!(r.topics[0].partitions[0].error, ErrorCode::None);
                let f = conn.request(&fetch_req("ok", offset, 1000)).await.unwrap();
                offset += values(&f).len() as i64;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            offset
        });
        let addr = broker.addr;
        tokio::task::spawn_blocking(move || {
            let timeout = Some(Duration::from_secs(20));
            // Random bytes.
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(timeout).unwrap();
            let mut junk = vec![0u8; 64 * 1024];
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            for b in junk.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            let _ = s.write_all(&junk);
            assert!(closed_by_broker(&mut s), "random bytes: connection cut off");

            // A 4 GiB length prefix and no API this protocol knows: cut off before anything is
            // allocated.
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(timeout).unwrap();
            s.write_all(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0]).unwrap();
            assert!(closed_by_broker(&mut s), "4 GiB prefix: connection cut off");
            // An HTTP client on the wrong port ("GET " reads as a 1.2 GB length).
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(timeout).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: cairn\r\n\r\n").unwrap();
            assert!(closed_by_broker(&mut s), "HTTP request: connection cut off");

            // A truncated frame, then the client goes away.
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(&[0, 0, 0, 100, 1, 2, 3]).unwrap();
            drop(s);

            // An unknown API: UNSUPPORTED_VERSION, and the connection stays usable.
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(timeout).unwrap();
            s.write_all(&raw_frame(999, 7, &[])).unwrap();
            let frame = read_frame(&mut s).expect("an answer, not a hang-up");
            let (corr, body) = decode_response::<ProduceResponse>(frame).unwrap();
            assert_eq!(corr, 7);
            assert_eq!(body.unwrap_err().code, ErrorCode::UnsupportedVersion);
            // A malformed body with a readable correlation id: INVALID_REQUEST.
            s.write_all(&raw_frame(4, 8, &[9, 9])).unwrap();
            let (corr, body) = decode_response::<ProduceResponse>(read_frame(&mut s).unwrap()).unwrap();
            assert_eq!(corr, 8);
            assert_eq!(body.unwrap_err().code, ErrorCode::InvalidRequest);

            // A batch with a bad CRC: CORRUPT_BATCH, nothing appended.
            let mut bad = batch(&["corrupt me"]).to_vec();
            let last = bad.len() - 1;
            bad[last] ^= 0x55;
            let req = encode_request(9, "raw", &produce_req("crc", Acks::Leader, Bytes::from(bad)));
            for c in req {
                s.write_all(&c).unwrap();
            }
            let (_, body) = decode_response::<ProduceResponse>(read_frame(&mut s).unwrap()).unwrap();
            let p = &body.unwrap().topics[0].partitions[0];
            assert_eq!(p.error, ErrorCode::CorruptBatch, "{:?}", p.message);
        })
        .await
        .unwrap();
        let crc = broker.admin().await.describe_topic("crc").await.unwrap();
        assert_eq!(crc.partitions[0].end_offset, 0, "nothing appended from the bad batch");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let consumed = good.await.unwrap();
        assert!(consumed > 0, "the good client kept producing and consuming");
    });
    assert!(broker.is_running(), "the broker survived");
}

#[test]
fn a_request_over_frame_bytes_max_is_answered_and_the_connection_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "frame_bytes_max = 65536\n[storage]\nbatch_bytes_max = 32768\n");
    run(Duration::from_secs(60), async {
        let admin = broker.admin().await;
        admin.create_topic(NewTopic::new("big", 1)).await.unwrap();
        // One batch of 100 KB: over the frame limit, not only the batch limit.
        let values: Vec<String> = (0..100).map(|i| format!("{i:01000}")).collect();
        let big = batch(&values.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(big.len() > 65536);
        let addr = broker.addr;
        tokio::task::spawn_blocking(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut bytes = Vec::new();
            put_request(&mut bytes, 1, "raw", &produce_req("big", Acks::Leader, big.clone()));
            // With acks = 0 nothing is answered, and the connection still goes on.
            put_request(&mut bytes, 2, "raw", &produce_req("big", Acks::None, big));
            put_request(&mut bytes, 3, "raw", &ApiVersionsRequest {});
            s.write_all(&bytes).unwrap();
            let (corr, body) = decode_response::<ProduceResponse>(read_frame(&mut s).expect("an answer")).unwrap();
            assert_eq!(corr, 1);
            let err = body.unwrap_err();
            assert_eq!(err.code, ErrorCode::BatchTooLarge);
            assert!(err.message.contains("frame_bytes_max of 65536"), "{}", err.message);
            let (corr, body) = decode_response::<ApiVersionsResponse>(read_frame(&mut s).expect("an answer")).unwrap();
            assert_eq!(corr, 3, "the next request read is the one after both oversized ones");
            assert!(body.is_ok());
        })
        .await
        .unwrap();
        let big = admin.describe_topic("big").await.unwrap();
        assert_eq!(big.partitions[0].end_offset, 0, "nothing stored");

        // The producer gets a typed error at once, instead of taking the cut-off connection for
        // a lost one and retrying until its delivery timeout.
        let config = cairn_client::ProducerConfig {
            batch_bytes_max: 1024 * 1024,
            delivery_timeout: Duration::from_secs(600),
            ..broker.producer_config()
        };
        let producer = Producer::connect(config).await.unwrap();
        let d = producer.send(ProducerRecord::new("big", vec![7u8; 100_000])).await.unwrap();
        let err = d.wait().await.unwrap_err();
        assert!(matches!(err, cairn_client::Error::Broker { code: ErrorCode::BatchTooLarge, .. }), "{err}");
        producer.close().await.unwrap();
    });
    assert!(broker.metric("cairn_requests_total{api=\"unknown\",result=\"FRAME_TOO_LARGE\"}").unwrap() >= 3.0);
}

/// A request that names one long topic for many partitions: answering it must not copy the name
/// once per partition (20,000 copies of 60 KB would be 1.2 GB from a frame of a few hundred KB).
#[test]
fn a_long_topic_name_for_many_partitions_is_not_copied_per_partition() {
    use cairn_protocol::messages::offsets::{
        OffsetCommitPartition, OffsetCommitRequest, OffsetCommitTopic, OffsetFetchRequest, OffsetFetchTopic,
    };
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    let parts = 20_000u32;
    let long = "t".repeat(60_000);
    run(Duration::from_secs(60), async {
        let conn = Connection::new(broker.connection());
        let fetch = OffsetFetchRequest {
            group_id: "g".into(),
            topics: Some(vec![OffsetFetchTopic { name: long.clone(), partitions: (0..parts).collect() }]),
        };
        let r = conn.request(&fetch).await.unwrap();
        assert_eq!(r.topics.iter().map(|t| t.partitions.len()).sum::<usize>(), parts as usize);
        let commit = OffsetCommitRequest {
            group_id: "g".into(),
            member_id: String::new(),
            generation_id: -1,
            topics: vec![OffsetCommitTopic {
                name: long.clone(),
                partitions: (0..parts)
                    .map(|p| OffsetCommitPartition { partition: p, offset: 1, metadata: None })
                    .collect(),
            }],
        };
        let r = conn.request(&commit).await.unwrap();
        assert!(r.topics[0].partitions.iter().all(|(_, e)| *e == ErrorCode::UnknownTopicOrPartition));
        let internal = ProduceRequest {
            acks: Acks::Leader,
            timeout_ms: 1000,
            topics: vec![ProduceTopic {
                name: format!("__{long}"),
                partitions: (0..parts)
                    .map(|p| ProducePartition { partition: p, records: Bytes::new().into() })
                    .collect(),
            }],
        };
        let r = conn.request(&internal).await.unwrap();
        assert!(r.topics[0].partitions.iter().all(|p| p.error == ErrorCode::InvalidTopicName));
    });
    let peak = broker.peak_rss_bytes();
    assert!(peak < 256 << 20, "the broker's resident memory peaked at {} MiB", peak >> 20);
}

/// An OffsetFetch that names the same partition over and over is answered once per partition:
/// each answer carries the commit's metadata (up to 4 KiB), so a 16 MiB request naming one
/// partition four million times made the broker build some 17 GB of answers under the groups
/// lock, and then a response frame over 4 GiB.
#[test]
fn an_offset_fetch_answers_a_partition_named_many_times_once() {
    use cairn_protocol::messages::offsets::{
        OffsetCommitPartition, OffsetCommitRequest, OffsetCommitTopic, OffsetFetchRequest, OffsetFetchTopic,
    };
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(30), async {
        broker.admin().await.create_topic(NewTopic::new("t", 2)).await.unwrap();
        let conn = Connection::new(broker.connection());
        let commit = OffsetCommitRequest {
            group_id: "g".into(),
            member_id: String::new(),
            generation_id: -1,
            topics: vec![OffsetCommitTopic {
                name: "t".into(),
                partitions: vec![OffsetCommitPartition { partition: 0, offset: 7, metadata: Some("m".repeat(4096)) }],
            }],
        };
        let r = conn.request(&commit).await.unwrap();
        assert_eq!(r.topics[0].partitions[0].1, ErrorCode::None);
        let fetch = OffsetFetchRequest {
            group_id: "g".into(),
            topics: Some(vec![
                OffsetFetchTopic { name: "t".into(), partitions: vec![0; 50] },
                OffsetFetchTopic { name: "t".into(), partitions: vec![0, 1, 0] },
                OffsetFetchTopic { name: "t".into(), partitions: vec![0] },
            ]),
        };
        let r = conn.request(&fetch).await.unwrap();
        let answered: Vec<(&str, u32, i64)> = r
            .topics
            .iter()
            .flat_map(|t| t.partitions.iter().map(|p| (t.name.as_str(), p.partition, p.offset)))
            .collect();
        assert_eq!(answered, vec![("t", 0, 7), ("t", 1, -1)], "each partition once, where it first appears");
    });
}

#[test]
fn a_fetch_reads_a_partition_named_many_times_once() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(30), async {
        broker.admin().await.create_topic(NewTopic::new("t", 2)).await.unwrap();
        let producer = Producer::connect(broker.producer_config()).await.unwrap();
        producer.send(ProducerRecord::new("t", "r").partition(0)).await.unwrap().wait().await.unwrap();
        let conn = Connection::new(broker.connection());
        let at = |partition, fetch_offset| FetchPartition { partition, fetch_offset, partition_max_bytes: 1 << 20 };
        let mut fetch = fetch_req("t", 0, 0);
        // A parked fetch of one partition named a million times woke a million waiters and
        // re-read it a million times on every append; each is now read once, where it first
        // appears (as OffsetFetch answers repeats).
        fetch.topics = vec![
            FetchTopic { name: "t".into(), partitions: vec![at(0, 0); 50] },
            FetchTopic { name: "t".into(), partitions: vec![at(0, 1), at(1, 0), at(0, 0)] },
            FetchTopic { name: "t".into(), partitions: vec![at(1, 0)] },
        ];
        let r: FetchResponse = conn.request(&fetch).await.unwrap();
        let answered: Vec<(&str, u32, usize)> = r
            .topics
            .iter()
            .flat_map(|t| t.partitions.iter().map(|p| (t.name.as_str(), p.partition, p.records.len())))
            .collect();
        assert_eq!(answered.len(), 2, "each partition once, where it first appears: {answered:?}");
        assert_eq!((answered[0].0, answered[0].1), ("t", 0));
        assert!(answered[0].2 > 0, "read from its first fetch_offset, 0");
        assert_eq!(answered[1], ("t", 1, 0));
    });
}

#[test]
fn health_endpoints_and_metrics_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    let (status, _) = broker.http_get("/healthz");
    assert!(status.contains("200"), "{status}");
    let (status, _) = broker.http_get("/readyz");
    assert!(status.contains("200"), "{status}");
    let (_, body) = broker.http_get("/metrics");
    assert!(body.contains("cairn_build_info"), "{body}");
}

#[test]
fn metrics_connections_are_capped_and_a_silent_one_gives_its_slot_back() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "metrics_connections_max = 1\nmetrics_timeout_ms = 1000\n");
    // Takes the only slot and sends nothing.
    let mut silent = TcpStream::connect(broker.metrics).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    // The next one is closed at accept, without an answer.
    let mut refused = TcpStream::connect(broker.metrics).unwrap();
    refused.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = refused.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut answer = Vec::new();
    let _ = refused.read_to_end(&mut answer);
    assert!(answer.is_empty(), "past metrics_connections_max: {}", String::from_utf8_lossy(&answer));
    // The silent connection is closed once metrics_timeout_ms passes without a request...
    let mut buf = [0u8; 64];
    let closed = silent.read(&mut buf);
    assert!(
        matches!(&closed, Ok(0)) || closed.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the silent connection was not closed: {closed:?}"
    );
    // ...and its slot serves the next scrape, which counts the refusal. The slot is given back
    // when the connection's task ends, just after the close this client saw: a scrape that
    // comes in between is refused too, and counted.
    let started = Instant::now();
    let mut refusals = 1;
    let body = loop {
        let mut s = TcpStream::connect(broker.metrics).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut out = String::new();
        match s.read_to_string(&mut out) {
            Ok(_) if out.starts_with("HTTP/1.1 200") => break out,
            Ok(_) if out.is_empty() => refusals += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => refusals += 1,
            other => panic!("unexpected answer to a scrape: {other:?} {out}"),
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the silent connection's slot never came back");
        std::thread::sleep(Duration::from_millis(20));
    };
    let want = format!("cairn_http_connections_refused_total {refusals}\n");
    assert!(body.contains(&want), "{want} in {body}");
}

#[test]
fn partition_counts_stay_exact_past_the_series_cap() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "metrics_partition_series_max = 3\n");
    run(Duration::from_secs(60), async {
        let admin = broker.admin().await;
        admin.create_topic(NewTopic::new("narrow", 2)).await.unwrap();
        admin.create_topic(NewTopic::new("wide", 3)).await.unwrap();
        let want = [
            r#"cairn_partition_log_end_offset{topic="narrow",partition="1"}"#,
            r#"cairn_partition_log_end_offset{topic="wide",partition="all"}"#,
            r#"cairn_topic_partitions{topic="narrow"} 2"#,
            r#"cairn_topic_partitions{topic="wide"} 3"#,
        ];
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, body) = broker.http_get("/metrics");
            if want.iter().all(|m| body.contains(m)) {
                break;
            }
            assert!(Instant::now() < deadline, "gauges never appeared:\n{body}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

#[test]
fn a_deleted_topics_gauges_leave_metrics_and_live_ones_stay() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        let admin = broker.admin().await;
        for t in ["kept", "gone"] {
            admin.create_topic(NewTopic::new(t, 1)).await.unwrap();
        }
        let producer = Producer::connect(broker.producer_config()).await.unwrap();
        for t in ["kept", "gone"] {
            producer.send(ProducerRecord::new(t, "x")).await.unwrap().await.unwrap();
        }
        producer.close().await.unwrap();
        let mut c =
            Consumer::connect(cairn_client::ConsumerConfig { group: Some("g".into()), ..broker.consumer_config() })
                .await
                .unwrap();
        let offsets = std::collections::BTreeMap::from([(("kept".to_string(), 0), 0), (("gone".to_string(), 0), 0)]);
        c.commit_offsets(&offsets).await.unwrap();
        let gone =
            [r#"cairn_partition_log_end_offset{topic="gone""#, r#"cairn_consumer_group_lag{group="g",topic="gone""#];
        let kept = [
            r#"cairn_partition_log_end_offset{topic="kept""#,
            r#"cairn_consumer_group_lag{group="g",topic="kept""#,
            "cairn_build_info",
            "cairn_disk_free_bytes",
        ];
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, body) = broker.http_get("/metrics");
            if gone.iter().chain(&kept).all(|m| body.contains(m)) {
                break;
            }
            assert!(Instant::now() < deadline, "gauges never appeared:\n{body}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        admin.delete_topic("gone").await.unwrap();
        // Gauges leave after GAUGE_IDLE_TIMEOUT (10 s) without an update.
        let deleted = Instant::now();
        let deadline = deleted + Duration::from_secs(30);
        loop {
            let (_, body) = broker.http_get("/metrics");
            for m in kept {
                assert!(body.contains(m), "{m} is live and must stay:\n{body}");
            }
            if gone.iter().all(|m| !body.contains(m)) {
                assert!(deleted.elapsed() >= Duration::from_secs(5), "gone too early to be the idle timeout");
                break;
            }
            assert!(Instant::now() < deadline, "a deleted topic's gauges stayed:\n{body}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
}

#[test]
fn unknown_config_keys_and_bad_values_stop_the_broker_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "flush_intervall_ms = 10\n").unwrap();
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_cairn-broker")).arg("--config").arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("flush_intervall_ms"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cairn-broker"))
        .args(["--print-config", "--listen", "127.0.0.1:9999"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("listen = \"127.0.0.1:9999\"") && text.contains("[storage]"), "{text}");
}

/// A broker served in this process, so that a test can reach into its store.
struct InProcess {
    broker: std::sync::Arc<cairn_broker::server::Broker>,
    addr: std::net::SocketAddr,
    served: tokio::task::JoinHandle<()>,
    /// Lets the group-commit thread go again (see [`InProcess::stall_syncs`]).
    release: Option<std::sync::mpsc::Sender<()>>,
}

impl InProcess {
    async fn start(dir: &std::path::Path, groups: cairn_broker::groups::GroupConfig) -> InProcess {
        use cairn_broker::config::BrokerConfig;
        use cairn_broker::groups::Coordinator;
        use cairn_broker::metrics::Health;
        use cairn_broker::server::{self, Broker};
        use cairn_broker::storage::{system_clock, LogStore};
        use std::sync::Arc;

        let config = BrokerConfig { data_dir: dir.to_owned(), groups, ..BrokerConfig::default() };
        let (store, _) = LogStore::open(dir, config.storage.clone(), system_clock()).unwrap();
        store.create_topic("t", 1, config.storage.topic_defaults()).unwrap();
        let groups = Coordinator::open(&store, config.groups.clone()).unwrap();
        let health = Arc::new(Health { ready: true.into(), shutdown: Default::default() });
        let broker = Arc::new(Broker::new(config, store, groups, health));
        let listener = server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = tokio::spawn(server::serve(Arc::clone(&broker), listener));
        InProcess { broker, addr, served, release: None }
    }

    /// Stalls the group-commit thread: it runs each waiter's callback, and this one blocks
    /// until [`InProcess::stop`].
    fn stall_syncs(&mut self) {
        let (release, stalled) = std::sync::mpsc::channel::<()>();
        let partition = self.broker.store.partition("t", 0).unwrap();
        self.broker.store.sync_async(
            partition,
            0,
            Box::new(move |_| {
                let _ = stalled.recv();
            }),
        );
        self.release = Some(release);
    }

    /// Sends `requests` pipelined on one connection, then reads their responses in order;
    /// returns each with the time it arrived, counted from the send.
    async fn pipelined(&self, requests: Vec<Vec<Bytes>>) -> Vec<(Bytes, Duration)> {
        let addr = self.addr;
        tokio::task::spawn_blocking(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let frames: Vec<u8> = requests.iter().flatten().flat_map(|c| c.iter().copied()).collect();
            let started = Instant::now();
            s.write_all(&frames).unwrap();
            (0..requests.len()).map(|_| (read_frame(&mut s).expect("a response"), started.elapsed())).collect()
        })
        .await
        .unwrap()
    }

    async fn stop(mut self) {
        if let Some(release) = self.release.take() {
            let _ = release.send(());
        }
        self.broker.shutdown.cancel();
        self.served.await.unwrap();
        self.broker.store.close().unwrap();
    }
}

/// An acks=all produce's `timeout_ms` counts from when the request arrived, not from when the
/// responses pipelined before it were written: with syncs stalled, eight pipelined requests
/// with a 300 ms timeout all time out after about 300 ms (the last used to wait 8 × 300 ms).
#[test]
fn pipelined_acks_all_requests_each_time_out_after_their_own_timeout_ms() {
    let dir = tempfile::tempdir().unwrap();
    run(Duration::from_secs(60), async move {
        let mut broker = InProcess::start(dir.path(), Default::default()).await;
        broker.stall_syncs();
        let requests = (0..8u32)
            .map(|i| {
                let mut req = produce_req("t", Acks::All, batch(&["v"]));
                req.timeout_ms = 300;
                encode_request(i, "timeouts", &req)
            })
            .collect();
        let responses = broker.pipelined(requests).await;
        for (i, (frame, _)) in responses.iter().enumerate() {
            let (corr, resp) = decode_response::<ProduceResponse>(frame.clone()).unwrap();
            assert_eq!(corr, i as u32);
            assert_eq!(resp.unwrap().topics[0].partitions[0].error, ErrorCode::RequestTimedOut);
        }
        let last = responses.last().unwrap().1;
        assert!(
            last < Duration::from_millis(1_500),
            "the 8th of eight pipelined 300 ms requests answered after {last:?}"
        );
        broker.stop().await;
    });
}

/// The same for OffsetCommit's wait for its fsync (`groups.offsets_commit_timeout_ms`).
#[test]
fn pipelined_offset_commits_each_time_out_after_offsets_commit_timeout_ms() {
    use cairn_protocol::messages::offsets::{
        OffsetCommitPartition, OffsetCommitRequest, OffsetCommitResponse, OffsetCommitTopic,
    };
    let dir = tempfile::tempdir().unwrap();
    run(Duration::from_secs(60), async move {
        let groups = cairn_broker::groups::GroupConfig { offsets_commit_timeout_ms: 300, ..Default::default() };
        let mut broker = InProcess::start(dir.path(), groups).await;
        broker.stall_syncs();
        let requests = (0..8u32)
            .map(|i| {
                let req = OffsetCommitRequest {
                    group_id: "g".into(),
                    member_id: String::new(),
                    generation_id: -1,
                    topics: vec![OffsetCommitTopic {
                        name: "t".into(),
                        partitions: vec![OffsetCommitPartition { partition: 0, offset: 0, metadata: None }],
                    }],
                };
                encode_request(i, "commits", &req)
            })
            .collect();
        let responses = broker.pipelined(requests).await;
        for (i, (frame, _)) in responses.iter().enumerate() {
            let (corr, resp) = decode_response::<OffsetCommitResponse>(frame.clone()).unwrap();
            assert_eq!(corr, i as u32);
            assert_eq!(resp.unwrap().topics[0].partitions[0].1, ErrorCode::RequestTimedOut);
        }
        let last = responses.last().unwrap().1;
        assert!(
            last < Duration::from_millis(1_500),
            "the 8th of eight pipelined 300 ms commits answered after {last:?}"
        );
        broker.stop().await;
    });
}
