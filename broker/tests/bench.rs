//! The `cairn-bench` load generator against the real broker binary: its JSON report, and runs
//! that must fail rather than report figures that are not true.

mod common;

use std::process::Command;

use cairn_client::{NewTopic, Producer, ProducerRecord};
use common::{sibling_bin, TestBroker};

fn bench(broker: &TestBroker, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(sibling_bin("cairn-bench", "cairn-bench"))
        .args(args)
        .env("CAIRN_BROKER", broker.addr.to_string())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn produce_and_consume_report_the_json_keys_scripts_read() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    let args = ["produce", "--topic", "j", "--messages", "3000", "--size", "200", "--warmup", "0", "--json"];
    let (code, out, err) = bench(&broker, &args);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["records"], 3000);
    assert!(v["records_per_sec"].as_f64().unwrap() > 0.0);
    assert!(v["mb_per_sec"].as_f64().unwrap() > 0.0);
    for key in ["p50", "p90", "p99", "p999", "max"] {
        assert!(v["latency_us"][key].as_f64().unwrap() > 0.0, "latency_us.{key} in {out}");
    }
    assert!(v["latency_us"]["p50"].as_f64().unwrap() <= v["latency_us"]["max"].as_f64().unwrap());
    assert!(v["command"].as_str().unwrap().contains("produce --topic j --messages 3000"), "{out}");

    let (code, out, err) = bench(&broker, &["consume", "--topic", "j", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["records"], 3000, "consume reads the whole topic");
    assert_eq!(v["bytes"], 3000 * 200, "the bytes read, not records times --size: {out}");
}

#[test]
fn runs_send_what_their_command_line_says_or_fail() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    // --messages is the total, whatever the number of producers.
    let args = ["produce", "--topic", "n", "--messages", "10", "--producers", "4", "--warmup", "0", "--json"];
    let (code, out, err) = bench(&broker, &args);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["records"], 10, "{out}");
    // The topic exists with 1 partition: a run asking for 4 must not report on 1.
    let args = ["produce", "--topic", "n", "--partitions", "4", "--messages", "10", "--warmup", "0"];
    let (code, _, err) = bench(&broker, &args);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("exists with 1 partitions, not the 4"), "{err}");
    // Nor a consume asking for 4.
    let (code, _, err) = bench(&broker, &["consume", "--topic", "n", "--partitions", "4", "--warmup", "0"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("exists with 1 partitions, not the 4"), "{err}");
    // Without --partitions, an existing topic is used as it is.
    let (code, _, err) = bench(&broker, &["produce", "--topic", "n", "--messages", "10", "--warmup", "0"]);
    assert_eq!(code, 0, "{err}");
    // Options that would be ignored are refused.
    let (code, _, err) = bench(&broker, &["consume", "--topic", "n", "--rate", "100"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--rate"), "{err}");
    let (code, _, err) = bench(&broker, &["produce", "--keys", "2000000", "--messages", "10"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn warm_ups_run_first_and_count_in_no_figure() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    // e2e: 500 warm-up records at the rate, then 1,000 measured ones; both reach the log.
    let args = ["e2e", "--topic", "w", "--rate", "1000", "--messages", "1000", "--warmup", "500", "--json"];
    let (code, out, err) = bench(&broker, &args);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["records"], 1000, "the warm-up is not counted: {out}");
    let mut end = 0i64;
    common::run(std::time::Duration::from_secs(30), async {
        let info = broker.admin().await.describe_topic("w").await.unwrap();
        end = info.partitions.iter().map(|p| p.end_offset).sum();
    });
    assert_eq!(end, 1500, "the warm-up was sent");
    // consume: a throwaway consumer reads first; the measured one still reads the whole topic.
    let (code, out, err) = bench(&broker, &["consume", "--topic", "w", "--warmup", "700", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["records"], 1500, "{out}");
}

#[test]
fn several_consumers_read_the_whole_topic_from_uneven_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    common::run(std::time::Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("uneven", 3)).await.unwrap();
        let producer = Producer::connect(broker.producer_config()).await.unwrap();
        // Larger partitions than one poll returns, so that a consumer stops at its share.
        let value = bytes::Bytes::from(vec![b'x'; 1024]);
        for (partition, count) in [(0, 3000), (1, 3000), (2, 10)] {
            for _ in 0..count {
                producer.send(ProducerRecord::new("uneven", value.clone()).partition(partition)).await.unwrap();
            }
        }
        producer.close().await.unwrap();
    });
    let (code, out, err) = bench(&broker, &["consume", "--topic", "uneven", "--consumers", "3", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["records"], 6010, "every record, not three even thirds: {out}");
}

#[test]
fn a_run_whose_records_the_broker_refuses_fails_instead_of_reporting_them_as_throughput() {
    let dir = tempfile::tempdir().unwrap();
    // Batches over the broker's batch_bytes_max are refused (not retriable).
    let broker = TestBroker::start(dir.path(), "[storage]\nbatch_bytes_max = 65536\n");
    let args = ["produce", "--topic", "big", "--messages", "200", "--size", "100000", "--warmup", "0", "--json"];
    let (code, out, err) = bench(&broker, &args);
    assert_ne!(code, 0, "a run of refused records reported success: {out}");
    assert!(err.contains("200 of 200 records were not delivered"), "{err}");
    assert!(err.contains("BATCH_TOO_LARGE") || err.contains("too large"), "{err}");
}

#[test]
fn a_zero_rate_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    let (code, _, err) = bench(&broker, &["produce", "--rate", "0", "--messages", "10"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--rate"), "{err}");
}

#[test]
fn a_paced_run_sends_every_record_scheduled_within_its_duration() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    let args = ["produce", "--topic", "paced", "--rate", "2000", "--duration", "1", "--warmup", "0", "--json"];
    let (code, out, err) = bench(&broker, &args);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["records"], 2000, "{out}");
}
