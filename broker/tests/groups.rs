//! Consumer group tests against the real broker binary.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_client::{Connection, Consumer, ConsumerConfig, ErrorCode, NewTopic, Offset, Producer, ProducerRecord};
use cairn_protocol::messages::groups::{HeartbeatRequest, JoinGroupRequest};
use cairn_protocol::messages::offsets::{OffsetCommitPartition, OffsetCommitRequest, OffsetCommitTopic};
use common::{run, sibling_bin, signal, TestBroker};

async fn produce(broker: &TestBroker, topic: &str, partitions: u32, n: u32) {
    let producer = Producer::connect(broker.producer_config()).await.unwrap();
    for i in 0..n {
        producer.send(ProducerRecord::new(topic, format!("{i}")).partition(i % partitions)).await.unwrap();
    }
    producer.close().await.unwrap();
}

/// Polls until `n` records have arrived (within 30 s).
async fn read_records(c: &mut Consumer, n: usize) {
    let mut seen = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen < n {
        assert!(Instant::now() < deadline, "read {seen} of {n} records");
        seen += c.poll(Duration::from_millis(200)).await.unwrap().len();
    }
}

fn member_config(broker: &TestBroker, group: &str) -> ConsumerConfig {
    ConsumerConfig {
        group: Some(group.into()),
        session_timeout: Duration::from_secs(3),
        rebalance_timeout: Duration::from_secs(10),
        auto_commit_interval: Duration::from_millis(200),
        fetch_max_wait: Duration::from_millis(200),
        ..broker.consumer_config()
    }
}

type Seen = Arc<Mutex<Vec<(usize, u32, i64)>>>;

#[test]
fn three_members_on_six_partitions_get_two_each_and_no_record_is_seen_by_two_members() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(180), async {
        broker.admin().await.create_topic(NewTopic::new("six", 6)).await.unwrap();
        let seen: Seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let assignments = Arc::new(Mutex::new(BTreeMap::<usize, Vec<(String, u32)>>::new()));
        let mut members = Vec::new();
        for m in 0..3 {
            let config = member_config(&broker, "trio");
            let (seen, stop, assignments) = (Arc::clone(&seen), Arc::clone(&stop), Arc::clone(&assignments));
            members.push(tokio::spawn(async move {
                let mut c = Consumer::connect(config).await.unwrap();
                c.subscribe(&["six"]).await.unwrap();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for r in c.poll(Duration::from_millis(200)).await.unwrap() {
                        seen.lock().unwrap().push((m, r.partition, r.offset));
                    }
                    assignments.lock().unwrap().insert(m, c.assignment());
                }
                c.close().await.unwrap();
            }));
        }
        // Wait for a stable group of three, then produce.
        let admin = broker.admin().await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let g = admin.describe_group("trio").await;
            if let Ok(g) = g {
                let sizes: Vec<usize> = g.members.iter().map(|m| m.assignment.values().map(Vec::len).sum()).collect();
                if g.state == "stable" && sizes == vec![2, 2, 2] {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "the group never settled with 2 partitions each");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        produce(&broker, "six", 6, 6000).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while seen.lock().unwrap().len() < 6000 {
            assert!(Instant::now() < deadline, "only {} of 6000 consumed", seen.lock().unwrap().len());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for m in members {
            m.await.unwrap();
        }
        let seen = seen.lock().unwrap();
        let mut by_record: HashMap<(u32, i64), usize> = HashMap::new();
        for (m, p, o) in seen.iter() {
            if let Some(other) = by_record.insert((*p, *o), *m) {
                panic!("record {p}/{o} seen by member {other} and member {m}");
            }
        }
        assert_eq!(by_record.len(), 6000, "every record consumed");
        let per_member: BTreeMap<usize, BTreeSet<u32>> = seen.iter().fold(BTreeMap::new(), |mut acc, (m, p, _)| {
            acc.entry(*m).or_default().insert(*p);
            acc
        });
        assert!(per_member.values().all(|ps| ps.len() == 2), "{per_member:?}");
    });
}

#[test]
fn a_vanished_member_loses_its_partitions_after_the_session_timeout_and_nothing_after_its_last_commit_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(180), async {
        broker.admin().await.create_topic(NewTopic::new("four", 4)).await.unwrap();
        produce(&broker, "four", 4, 400).await;
        // A joins alone, consumes some, commits, and vanishes (no leave, no more heartbeats).
        let mut a =
            Consumer::connect(ConsumerConfig { auto_commit: false, ..member_config(&broker, "pair") }).await.unwrap();
        a.subscribe(&["four"]).await.unwrap();
        let mut a_seen = Vec::new();
        while a_seen.len() < 400 {
            a_seen.extend(a.poll(Duration::from_secs(1)).await.unwrap());
        }
        // A processed (and commits) only the first 25 + p records of each partition p.
        let committed: BTreeMap<u32, i64> = (0..4u32).map(|p| (p, 25 + i64::from(p))).collect();
        let offsets: BTreeMap<(String, u32), i64> =
            committed.iter().map(|(p, o)| (("four".to_string(), *p), *o)).collect();
        a.commit_offsets(&offsets).await.unwrap();
        let vanished_at = Instant::now();
        drop(a);
        // B joins; the group waits for A until its session expires, then B owns everything.
        let mut b = Consumer::connect(member_config(&broker, "pair")).await.unwrap();
        b.subscribe(&["four"]).await.unwrap();
        let mut b_seen: BTreeMap<u32, Vec<i64>> = BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while b_seen.values().map(Vec::len).sum::<usize>() < 400 - committed.values().sum::<i64>() as usize {
            assert!(Instant::now() < deadline, "B did not take over A's partitions");
            for r in b.poll(Duration::from_secs(1)).await.unwrap() {
                b_seen.entry(r.partition).or_default().push(r.offset);
            }
        }
        assert!(vanished_at.elapsed() >= Duration::from_secs(2), "A's partitions moved only after its session timeout");
        assert_eq!(b.assignment().len(), 4);
        for p in 0..4u32 {
            let start = committed.get(&p).copied().unwrap_or(0);
            let offsets = &b_seen[&p];
            assert_eq!(offsets.first().copied(), Some(start), "partition {p}: B starts at A's last commit");
            assert_eq!(offsets.len() as i64, 100 - start, "partition {p}: nothing skipped, nothing repeated");
        }
        b.close().await.unwrap();
    });
}

#[test]
fn committed_offsets_are_exactly_those_acknowledged_after_a_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = TestBroker::start(dir.path(), "");
    let mut want = BTreeMap::new();
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("c", 3)).await.unwrap();
        produce(&broker, "c", 3, 300).await;
        let mut c =
            Consumer::connect(ConsumerConfig { group: Some("solo".into()), ..broker.consumer_config() }).await.unwrap();
        c.assign("c", None).await.unwrap();
        for round in 1..=20i64 {
            let offsets: BTreeMap<(String, u32), i64> =
                (0..3).map(|p| (("c".to_string(), p), round * 3 + i64::from(p))).collect();
            c.commit_offsets(&offsets).await.unwrap();
            want = offsets;
        }
    });
    broker.kill9();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        let g = broker.admin().await.describe_group("solo").await.unwrap();
        let got: BTreeMap<(String, u32), i64> =
            g.partitions.iter().map(|p| ((p.topic.clone(), p.partition), p.committed.unwrap())).collect();
        assert_eq!(got, want);
    });
}

#[test]
fn a_commit_from_a_stale_generation_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("s", 2)).await.unwrap();
        let conn = Connection::connect(broker.connection()).await.unwrap();
        let join = |member: &str| JoinGroupRequest {
            group_id: "stale".into(),
            member_id: member.into(),
            group_instance_id: None,
            session_timeout_ms: 10_000,
            rebalance_timeout_ms: 5_000,
            topics: vec!["s".into()],
        };
        let first = conn.request(&join("")).await.unwrap();
        assert_eq!(first.error, ErrorCode::None);
        let commit = |gen: i32| OffsetCommitRequest {
            group_id: "stale".into(),
            member_id: first.member_id.clone(),
            generation_id: gen,
            topics: vec![OffsetCommitTopic {
                name: "s".into(),
                partitions: vec![OffsetCommitPartition { partition: 0, offset: 1, metadata: None }],
            }],
        };
        let ok = conn.request(&commit(first.generation_id)).await.unwrap();
        assert_eq!(ok.topics[0].partitions[0].1, ErrorCode::None);
        // A second member joins; the first rejoins: a new generation.
        let other = Connection::connect(broker.connection()).await.unwrap();
        let second = tokio::spawn(async move { other.request(&join("")).await.unwrap() });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let again = conn.request(&join(&first.member_id)).await.unwrap();
        let second = second.await.unwrap();
        assert!(again.generation_id > first.generation_id);
        assert_eq!(second.generation_id, again.generation_id);
        let stale = conn.request(&commit(first.generation_id)).await.unwrap();
        assert_eq!(stale.topics[0].partitions[0].1, ErrorCode::IllegalGeneration);
    });
}

#[test]
fn lag_reported_by_cairn_group_describe_is_produced_minus_committed() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("lag", 2)).await.unwrap();
        produce(&broker, "lag", 2, 200).await;
        let mut c = Consumer::connect(ConsumerConfig { group: Some("lagger".into()), ..broker.consumer_config() })
            .await
            .unwrap();
        c.assign("lag", None).await.unwrap();
        c.seek_all(Offset::Earliest);
        let offsets = BTreeMap::from([(("lag".to_string(), 0), 30), (("lag".to_string(), 1), 95)]);
        c.commit_offsets(&offsets).await.unwrap();
    });
    let out = std::process::Command::new(sibling_bin("cairn-client", "cairn"))
        .args(["--broker", &broker.addr.to_string(), "group", "describe", "lagger", "--format", "json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let g: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let lags: Vec<(i64, i64, i64)> = g["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["committed"].as_i64().unwrap(), p["end"].as_i64().unwrap(), p["lag"].as_i64().unwrap()))
        .collect();
    assert_eq!(lags, vec![(30, 100, 70), (95, 100, 5)]);
    let table = std::process::Command::new(sibling_bin("cairn-client", "cairn"))
        .args(["--broker", &broker.addr.to_string(), "group", "describe", "lagger"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("LAG")
            && text.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["lag", "0", "30", "100", "70", "-"]),
        "{text}"
    );
}

#[test]
fn auto_commit_covers_only_records_returned_by_earlier_polls() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("ac", 1)).await.unwrap();
        produce(&broker, "ac", 1, 10).await;
        let config = ConsumerConfig {
            auto_commit: true,
            auto_commit_interval: Duration::ZERO,
            partition_fetch_max_bytes: 1, // one batch per fetch
            ..member_config(&broker, "ac-group")
        };
        let mut c = Consumer::connect(config).await.unwrap();
        c.subscribe(&["ac"]).await.unwrap();
        let mut first = Vec::new();
        while first.is_empty() {
            first = c.poll(Duration::from_secs(2)).await.unwrap();
        }
        let committed =
            || async { broker.admin().await.describe_group("ac-group").await.unwrap().partitions[0].committed };
        assert_eq!(committed().await, None, "records being handed out are not committed yet");
        // Producing more and polling again marks the first batch processed.
        produce(&broker, "ac", 1, 5).await;
        let _ = c.poll(Duration::from_secs(2)).await.unwrap();
        let last = first.last().unwrap().offset;
        // The next poll sent the commit; it lands without waiting for another.
        let deadline = Instant::now() + Duration::from_secs(10);
        while committed().await != Some(last + 1) {
            assert!(Instant::now() < deadline, "the next poll committed what the first returned");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        c.close().await.unwrap();
    });
}

/// A rebalance waits for every member, up to the rebalance timeout, and a member's `poll`
/// must still return by its own timeout meanwhile: the join goes on in the background and a
/// later poll takes the new assignment up.
#[test]
fn a_rebalance_waiting_for_a_silent_member_does_not_hold_poll_past_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(120), async {
        broker.admin().await.create_topic(NewTopic::new("slowjoin", 3)).await.unwrap();
        let mut a = Consumer::connect(member_config(&broker, "slowjoin-group")).await.unwrap();
        a.subscribe(&["slowjoin"]).await.unwrap();
        // B joins, then never polls again: the next rebalance waits for it until its
        // rebalance timeout (15 s) has passed.
        let silent = ConsumerConfig {
            session_timeout: Duration::from_secs(15),
            rebalance_timeout: Duration::from_secs(15),
            ..member_config(&broker, "slowjoin-group")
        };
        let b_joined = tokio::spawn(async move {
            let mut b = Consumer::connect(silent).await.unwrap();
            b.subscribe(&["slowjoin"]).await.unwrap();
            b
        });
        while !b_joined.is_finished() {
            let _ = a.poll(Duration::from_millis(100)).await;
        }
        let b = b_joined.await.unwrap();
        // C's join starts the rebalance that waits for B.
        let c_config = member_config(&broker, "slowjoin-group");
        let c_joined = tokio::spawn(async move {
            let mut c = Consumer::connect(c_config).await.unwrap();
            c.subscribe(&["slowjoin"]).await.unwrap();
            c
        });
        tokio::time::sleep(Duration::from_millis(1500)).await; // A's heartbeat hears of it
        for i in 0..6 {
            let started = Instant::now();
            let polled = tokio::time::timeout(Duration::from_secs(5), a.poll(Duration::from_millis(300))).await;
            assert!(polled.is_ok(), "poll {i} (300 ms) still waited for the rebalance after {:?}", started.elapsed());
        }
        // The broker answers a connection's requests in order: the join it holds must not hold
        // the member's other requests (a commit, a metadata lookup) behind it.
        let offsets: BTreeMap<(String, u32), i64> = [(("slowjoin".to_string(), 0), 0)].into();
        let committed = tokio::time::timeout(Duration::from_secs(5), a.commit_offsets(&offsets)).await;
        assert!(committed.is_ok(), "a commit waited behind the join the broker holds");
        // Once B is dropped from the group, the join completes. A does not poll for longer than
        // its session timeout: its heartbeats must have started with the join, or the group
        // drops A too and rebalances again.
        let c = c_joined.await.unwrap();
        let generation = broker.admin().await.describe_group("slowjoin-group").await.unwrap().generation;
        tokio::time::sleep(Duration::from_secs(5)).await; // A's session timeout is 3 s
        let after = broker.admin().await.describe_group("slowjoin-group").await.unwrap().generation;
        assert_eq!(after, generation, "the group rebalanced again: A was silent after its join");
        let deadline = Instant::now() + Duration::from_secs(30);
        while a.assignment().is_empty() || a.assignment().len() + c.assignment().len() != 3 {
            assert!(Instant::now() < deadline, "A never got its new assignment: {:?}", a.assignment());
            let _ = a.poll(Duration::from_millis(100)).await;
        }
        drop(b);
    });
}

/// A finished auto-commit is taken up by the next poll even when that poll starts with the
/// task's scheduling budget spent (polling its handle would then say "not ready"): it must not
/// be mistaken for a failure and sent again.
#[test]
fn a_finished_auto_commit_is_taken_up_whatever_the_task_budget() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("budget", 1)).await.unwrap();
        produce(&broker, "budget", 1, 10).await;
        let config = ConsumerConfig { auto_commit_interval: Duration::ZERO, ..member_config(&broker, "budget-group") };
        let mut c = Consumer::connect(config).await.unwrap();
        c.assign("budget", None).await.unwrap();
        read_records(&mut c, 10).await;
        let _ = c.poll(Duration::from_millis(50)).await.unwrap(); // sends the commit
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let group = broker.admin().await.describe_group("budget-group").await.unwrap();
            if group.partitions.first().and_then(|p| p.committed) == Some(10) {
                break;
            }
            assert!(Instant::now() < deadline, "the auto-commit never landed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let commits = || broker.metric(r#"cairn_requests_total{api="offset_commit",result="ok"}"#).unwrap_or(0.0);
        let before = commits();
        // Spend the budget of this task poll (it is renewed only when the task yields).
        tokio::task::yield_now().await;
        while tokio::task::coop::has_budget_remaining() {
            tokio::task::consume_budget().await;
        }
        let _ = c.poll(Duration::from_millis(50)).await.unwrap();
        let _ = c.poll(Duration::from_millis(50)).await.unwrap();
        assert_eq!(commits(), before, "nothing new was returned, so nothing is committed again");
    });
}

/// A poll must return by its timeout even when the broker does not answer its auto-commit:
/// the commit goes out in the background and lands once the broker answers.
#[test]
fn an_auto_commit_the_broker_does_not_answer_does_not_hold_poll_past_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(90), async {
        broker.admin().await.create_topic(NewTopic::new("stalled", 1)).await.unwrap();
        produce(&broker, "stalled", 1, 10).await;
        let mut config =
            ConsumerConfig { auto_commit_interval: Duration::ZERO, ..member_config(&broker, "stalled-group") };
        config.connection.request_timeout = Duration::from_secs(30);
        let mut c = Consumer::connect(config).await.unwrap();
        c.assign("stalled", None).await.unwrap();
        read_records(&mut c, 10).await;
        signal(&broker, "STOP");
        let started = Instant::now();
        let polled = tokio::time::timeout(Duration::from_secs(10), c.poll(Duration::from_millis(300))).await;
        let waited = started.elapsed();
        signal(&broker, "CONT");
        assert!(polled.is_ok(), "poll(300 ms) still waited for its auto-commit after {waited:?}");
        // Once resumed, the broker has a backlog (the commit's sync among it): a describe that
        // fails meanwhile is asked again, and reported if the commit never shows.
        let deadline = Instant::now() + Duration::from_secs(45);
        let mut last_error = None;
        loop {
            let committed = match broker.admin().await.describe_group("stalled-group").await {
                Ok(group) => group.partitions.first().and_then(|p| p.committed),
                Err(e) => {
                    last_error = Some(e.to_string());
                    None
                }
            };
            if committed == Some(10) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the auto-commit never landed: {committed:?} (last describe error: {last_error:?})"
            );
            let _ = c.poll(Duration::from_millis(100)).await;
        }
        c.close().await.unwrap();
    });
}

#[test]
fn commit_covers_exactly_the_records_polls_returned_when_polls_end_mid_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("mid", 2)).await.unwrap();
        produce(&broker, "mid", 2, 20).await;
        // Polls of 3 end inside a fetch's batches and sometimes span both partitions.
        let config = ConsumerConfig { auto_commit: false, max_poll_records: 3, ..member_config(&broker, "mid-group") };
        let mut c = Consumer::connect(config).await.unwrap();
        c.subscribe(&["mid"]).await.unwrap();
        let mut next = [0i64; 2];
        let mut seen = 0;
        while seen < 20 {
            let records = c.poll(Duration::from_secs(2)).await.unwrap();
            assert!(records.len() <= 3);
            for r in &records {
                assert_eq!(r.offset, next[r.partition as usize], "dense and in order per partition");
                next[r.partition as usize] += 1;
            }
            seen += records.len();
            if records.is_empty() {
                continue;
            }
            c.commit().await.unwrap();
            let group = broker.admin().await.describe_group("mid-group").await.unwrap();
            for p in &group.partitions {
                let expected = (next[p.partition as usize] > 0).then_some(next[p.partition as usize]);
                assert_eq!(p.committed, expected, "partition {} after {seen} records", p.partition);
            }
        }
        c.close().await.unwrap();
    });
}

#[test]
fn a_restarted_static_member_gets_its_partitions_back_without_a_rebalance() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("st", 2)).await.unwrap();
        let join = |member: &str, instance: Option<&str>, topics: &[&str]| JoinGroupRequest {
            group_id: "static".into(),
            member_id: member.into(),
            group_instance_id: instance.map(Into::into),
            session_timeout_ms: 10_000,
            rebalance_timeout_ms: 5_000,
            topics: topics.iter().map(|t| t.to_string()).collect(),
        };
        let heartbeat = |member: &str, generation: i32| HeartbeatRequest {
            group_id: "static".into(),
            member_id: member.into(),
            generation_id: generation,
        };
        // A static member and a dynamic one share the topic's two partitions.
        let a = Connection::connect(broker.connection()).await.unwrap();
        let first = a.request(&join("", Some("agent-a"), &["st"])).await.unwrap();
        assert_eq!(first.error, ErrorCode::None);
        let b = Connection::connect(broker.connection()).await.unwrap();
        let b_join = tokio::spawn(async move {
            let r = b.request(&join("", None, &["st"])).await.unwrap();
            (b, r)
        });
        // The newcomer's join starts a rebalance; a heartbeat tells agent-a to rejoin.
        while a.request(&heartbeat(&first.member_id, first.generation_id)).await.unwrap().error == ErrorCode::None {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let a_now = a.request(&join(&first.member_id, Some("agent-a"), &["st"])).await.unwrap();
        let (b, b_now) = b_join.await.unwrap();
        assert_eq!((a_now.error, b_now.error), (ErrorCode::None, ErrorCode::None));
        assert_eq!(a_now.generation_id, b_now.generation_id);
        let generation = a_now.generation_id;
        assert_eq!(a_now.assignment.iter().map(|t| t.partitions.len()).sum::<usize>(), 1);

        // agent-a's process hangs or dies (no LeaveGroup) and a new one starts with the same
        // instance id and no member id: same partitions, same generation, a new member id.
        let restarted = Connection::connect(broker.connection()).await.unwrap();
        let back = restarted.request(&join("", Some("agent-a"), &["st"])).await.unwrap();
        assert_eq!(back.error, ErrorCode::None);
        assert_ne!(back.member_id, first.member_id, "the new incarnation gets a member id of its own");
        assert_eq!(back.generation_id, generation, "no rebalance");
        assert_eq!(back.assignment, a_now.assignment, "its partitions come back");
        // The old incarnation, if it still runs, is fenced: its member id is gone, and joining
        // again with it under the same instance id is refused, so it cannot take the
        // partitions back and read them alongside the new one.
        assert_eq!(
            a.request(&heartbeat(&first.member_id, generation)).await.unwrap().error,
            ErrorCode::UnknownMemberId
        );
        let zombie = a.request(&join(&first.member_id, Some("agent-a"), &["st"])).await.unwrap();
        assert_eq!(zombie.error, ErrorCode::FencedInstanceId);
        drop(a);
        // The other member was not disturbed.
        assert_eq!(b.request(&heartbeat(&b_now.member_id, generation)).await.unwrap().error, ErrorCode::None);
        assert_eq!(restarted.request(&heartbeat(&back.member_id, generation)).await.unwrap().error, ErrorCode::None);

        // A changed subscription is a real change: that does rebalance.
        broker.admin().await.create_topic(NewTopic::new("st2", 1)).await.unwrap();
        let b_rejoin = tokio::spawn(async move {
            while b.request(&heartbeat(&b_now.member_id, generation)).await.unwrap().error == ErrorCode::None {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let r = b.request(&join(&b_now.member_id, None, &["st"])).await.unwrap();
            (b, r)
        });
        let changed = restarted.request(&join("", Some("agent-a"), &["st", "st2"])).await.unwrap();
        let (_b, b_after) = b_rejoin.await.unwrap();
        assert_eq!(changed.error, ErrorCode::None);
        assert!(changed.generation_id > generation, "a new subscription starts a new generation");
        assert_eq!(b_after.generation_id, changed.generation_id);
    });
}

/// A TCP proxy in front of the broker that cuts the client's connection at the first request
/// with API key `cut_at` (that request never reaches the broker); later connections pass.
async fn cutting_proxy(broker: std::net::SocketAddr, cut_at: u16) -> (std::net::SocketAddr, Arc<AtomicBool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cut = Arc::new(AtomicBool::new(false));
    let cut2 = Arc::clone(&cut);
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else { return };
            let upstream = tokio::net::TcpStream::connect(broker).await.unwrap();
            let cut = Arc::clone(&cut2);
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut ur, mut uw) = upstream.into_split();
                let back = tokio::spawn(async move { tokio::io::copy(&mut ur, &mut cw).await });
                loop {
                    let mut len = [0u8; 4];
                    if cr.read_exact(&mut len).await.is_err() {
                        break;
                    }
                    let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
                    if cr.read_exact(&mut frame).await.is_err() {
                        break;
                    }
                    let api_key = u16::from_be_bytes([frame[0], frame[1]]);
                    if api_key == cut_at && !cut.swap(true, Ordering::AcqRel) {
                        break; // drops both sides of this connection
                    }
                    if uw.write_all(&len).await.is_err() || uw.write_all(&frame).await.is_err() {
                        break;
                    }
                }
                back.abort();
            });
        }
    });
    (addr, cut)
}

#[test]
fn a_member_whose_offset_fetch_fails_after_joining_still_reads_its_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(120), async {
        broker.admin().await.create_topic(NewTopic::new("cut", 1)).await.unwrap();
        produce(&broker, "cut", 1, 10).await;
        let (proxy, cut) = cutting_proxy(broker.addr, 8 /* OffsetFetch */).await;
        let mut config = member_config(&broker, "cut-group");
        config.connection.broker = proxy.to_string();
        config.auto_offset_reset = Offset::Earliest;
        let mut consumer = Consumer::connect(config).await.unwrap();
        // Joined, but the connection is lost while fetching the committed offsets.
        let joined = consumer.subscribe(&["cut"]).await;
        assert!(cut.load(Ordering::Acquire), "the proxy cut the offset fetch");
        assert!(joined.is_err(), "the lost connection is reported");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = 0;
        while seen < 10 {
            assert!(
                Instant::now() < deadline,
                "the member owns its partition but read {seen} of 10 records (assignment {:?})",
                consumer.assignment()
            );
            seen += consumer.poll(Duration::from_millis(500)).await.unwrap().len();
        }
    });
}

/// Cuts the log of `topic-0` (one segment) after its first `keep` batches, as a power loss that
/// took the rest of the page cache would.
fn cut_log_after_batches(data: &std::path::Path, topic: &str, keep: usize) {
    let path = data.join(format!("{topic}-0")).join("00000000000000000000.log");
    let bytes = std::fs::read(&path).unwrap();
    let mut pos = 16; // segment header
    for _ in 0..keep {
        let len = u32::from_be_bytes(bytes[pos + 8..pos + 12].try_into().unwrap()) as usize;
        pos += 12 + len;
    }
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(pos as u64).unwrap();
}

#[test]
fn a_committed_offset_past_a_log_cut_by_a_crash_moves_back_to_the_log_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("lost", 1)).await.unwrap();
        let producer = Producer::connect(broker.producer_config()).await.unwrap();
        for i in 0..10 {
            // One batch per record.
            producer
                .send(ProducerRecord::new("lost", format!("{i}")).partition(0))
                .await
                .unwrap()
                .wait()
                .await
                .unwrap();
        }
        let mut c = Consumer::connect(ConsumerConfig { group: Some("ahead".into()), ..broker.consumer_config() })
            .await
            .unwrap();
        c.assign("lost", None).await.unwrap();
        c.commit_offsets(&BTreeMap::from([(("lost".to_string(), 0), 10)])).await.unwrap();
    });
    broker.kill9();
    // The power went out too: records 6..10 never reached the disk; the commit (synced) did.
    cut_log_after_batches(&dir.path().join("data"), "lost", 6);
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        // New records take offsets 6..10 again; a consumer resuming at 10 would skip them.
        produce(&broker, "lost", 1, 4).await;
        let g = broker.admin().await.describe_group("ahead").await.unwrap();
        assert_eq!(g.partitions[0].committed, Some(6), "the committed offset moved back to the log end at start");
    });
    assert!(broker.log_text().contains("past the log end"), "the move is logged");
}

/// Commits offset 1 for partition 0 of "ghost" (a topic that does not exist) and partitions 0
/// and 7 of "real" (which has one); returns each answer as (topic, partition, code).
async fn commit_ghost_and_real(
    conn: &Connection,
    group: &str,
    member: &str,
    generation: i32,
) -> Vec<(String, u32, ErrorCode)> {
    let part = |partition| OffsetCommitPartition { partition, offset: 1, metadata: None };
    let request = OffsetCommitRequest {
        group_id: group.into(),
        member_id: member.into(),
        generation_id: generation,
        topics: vec![
            OffsetCommitTopic { name: "ghost".into(), partitions: vec![part(0)] },
            OffsetCommitTopic { name: "real".into(), partitions: vec![part(0), part(7)] },
        ],
    };
    let resp = conn.request(&request).await.unwrap();
    resp.topics.iter().flat_map(|t| t.partitions.iter().map(move |(p, c)| (t.name.clone(), *p, *c))).collect()
}

#[test]
fn offsets_of_partitions_that_do_not_exist_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("real", 1)).await.unwrap();
        let conn = Connection::connect(broker.connection()).await.unwrap();
        let codes = commit_ghost_and_real(&conn, "outside", "", -1).await;
        assert_eq!(
            codes,
            vec![
                ("ghost".to_string(), 0, ErrorCode::UnknownTopicOrPartition),
                ("real".to_string(), 0, ErrorCode::None),
                ("real".to_string(), 7, ErrorCode::UnknownTopicOrPartition),
            ]
        );
        let g = broker.admin().await.describe_group("outside").await.unwrap();
        let stored: Vec<(String, u32)> = g.partitions.iter().map(|p| (p.topic.clone(), p.partition)).collect();
        assert_eq!(stored, vec![("real".to_string(), 0)], "only the real partition's offset is stored");
    });
}

#[test]
fn group_errors_come_before_unknown_partitions_in_an_offset_commit() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("real", 1)).await.unwrap();
        let conn = Connection::connect(broker.connection()).await.unwrap();
        let codes = |group: &'static str, member: &'static str, generation: i32| {
            let conn = &conn;
            async move {
                let answered = commit_ghost_and_real(conn, group, member, generation).await;
                answered.into_iter().map(|(_, _, c)| c).collect::<Vec<ErrorCode>>()
            }
        };
        // PROTOCOL 6.8: the group id, then membership, then whether the partition exists. A
        // fenced member that commits for a deleted topic must still learn that it was fenced.
        assert_eq!(codes("", "", -1).await, vec![ErrorCode::InvalidGroupId; 3]);
        assert_eq!(codes("g", "nobody", 3).await, vec![ErrorCode::UnknownMemberId; 3]);
    });
}

#[test]
fn a_join_waiting_for_a_rebalance_does_not_hold_up_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = TestBroker::start(dir.path(), "shutdown_timeout_ms = 120000\n");
    let join = |member: &str| JoinGroupRequest {
        group_id: "slow".into(),
        member_id: member.into(),
        group_instance_id: None,
        session_timeout_ms: 60_000,
        rebalance_timeout_ms: 120_000,
        topics: vec!["w".into()],
    };
    // One runtime for the whole test: the clients must outlive the broker's shutdown.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (_a, waiting) = rt.block_on(async {
        broker.admin().await.create_topic(NewTopic::new("w", 2)).await.unwrap();
        let a = Connection::connect(broker.connection()).await.unwrap();
        assert_eq!(a.request(&join("")).await.unwrap().error, ErrorCode::None);
        // A second member starts a rebalance that waits up to 120 s for the first to rejoin.
        let b = Connection::connect(broker.connection()).await.unwrap();
        let waiting = tokio::spawn(async move { b.request_with(&join(""), Duration::from_secs(200)).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "the join waits for the rebalance");
        (a, waiting)
    });
    let started = Instant::now();
    assert_eq!(broker.terminate(), Some(0), "a clean exit");
    eprintln!("exited {:?} after SIGTERM", started.elapsed());
    rt.block_on(async move {
        let answer = tokio::time::timeout(Duration::from_secs(30), waiting).await.unwrap().unwrap();
        let code = answer.map(|r| r.error).unwrap_or(ErrorCode::ShuttingDown);
        assert_eq!(code, ErrorCode::ShuttingDown, "the waiting join is told the broker is going away");
    });
}

#[test]
fn deleting_a_subscribed_topic_rebalances_its_groups_and_the_other_topic_keeps_flowing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(120), async {
        let admin = broker.admin().await;
        admin.create_topic(NewTopic::new("keep", 1)).await.unwrap();
        admin.create_topic(NewTopic::new("gone", 1)).await.unwrap();
        produce(&broker, "keep", 1, 5).await;
        produce(&broker, "gone", 1, 5).await;
        let mut c = Consumer::connect(member_config(&broker, "two-topics")).await.unwrap();
        c.subscribe(&["keep", "gone"]).await.unwrap();
        read_records(&mut c, 10).await;
        admin.delete_topic("gone").await.unwrap();
        produce(&broker, "keep", 1, 5).await;
        let mut after = 0;
        let mut errors = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        while after < 5 {
            assert!(
                Instant::now() < deadline,
                "read {after} of 5 new records after the deletion ({errors} poll errors)"
            );
            match c.poll(Duration::from_millis(200)).await {
                Ok(records) => after += records.len(),
                Err(_) => errors += 1,
            }
        }
        assert_eq!(c.assignment(), vec![("keep".to_string(), 0)], "the deleted topic's partition is gone");
        assert_eq!(errors, 0, "a member rejoins instead of failing its polls");
    });
}

#[test]
fn a_topic_deleted_and_recreated_under_a_member_is_read_from_its_start() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(120), async {
        let admin = broker.admin().await;
        admin.create_topic(NewTopic::new("reborn", 1)).await.unwrap();
        produce(&broker, "reborn", 1, 100).await;
        let mut c = Consumer::connect(member_config(&broker, "rebirth")).await.unwrap();
        c.subscribe(&["reborn"]).await.unwrap();
        read_records(&mut c, 100).await;
        // While the member is not polling, the topic goes and comes back with more records than
        // the member had read of the old one. Its next poll commits its position in the old
        // topic before it rejoins: that must not become its position in the new one.
        admin.delete_topic("reborn").await.unwrap();
        admin.create_topic(NewTopic::new("reborn", 1)).await.unwrap();
        produce(&broker, "reborn", 1, 200).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        let first = loop {
            assert!(Instant::now() < deadline, "nothing read from the recreated topic");
            if let Ok(records) = c.poll(Duration::from_millis(200)).await {
                if let Some(r) = records.first() {
                    break r.offset;
                }
            }
        };
        assert_eq!(first, 0, "the recreated topic is read from its start, not from the old position");
    });
}

#[test]
fn an_idle_consumer_auto_commits_what_it_has_processed() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("idle", 1)).await.unwrap();
        produce(&broker, "idle", 1, 10).await;
        let config = ConsumerConfig { auto_commit: true, ..member_config(&broker, "idle-group") };
        let mut c = Consumer::connect(config).await.unwrap();
        c.subscribe(&["idle"]).await.unwrap();
        let mut got = 0;
        while got < 10 {
            got += c.poll(Duration::from_secs(2)).await.unwrap().len();
        }
        // Caught up: later polls return nothing, but calling poll says the ten were processed.
        let committed =
            || async { broker.admin().await.describe_group("idle-group").await.unwrap().partitions[0].committed };
        let started = Instant::now();
        while committed().await != Some(10) {
            assert!(started.elapsed() < Duration::from_secs(5), "an idle consumer never committed its last records");
            assert!(c.poll(Duration::from_millis(100)).await.unwrap().is_empty());
        }
        c.close().await.unwrap();
    });
}

#[test]
fn subscribing_again_changes_the_subscription_without_leaving_a_ghost_member() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        let admin = broker.admin().await;
        admin.create_topic(NewTopic::new("sub-a", 1)).await.unwrap();
        admin.create_topic(NewTopic::new("sub-b", 1)).await.unwrap();
        let config = ConsumerConfig {
            session_timeout: Duration::from_secs(15),
            rebalance_timeout: Duration::from_secs(20),
            ..member_config(&broker, "resub")
        };
        let mut c = Consumer::connect(config).await.unwrap();
        c.subscribe(&["sub-a"]).await.unwrap();
        let started = Instant::now();
        c.subscribe(&["sub-a", "sub-b"]).await.unwrap();
        // A second member (the old one, orphaned) would hold up the join until its session
        // timed out (15 s here) and keep a share of the partitions.
        assert!(started.elapsed() < Duration::from_secs(5), "subscribe took {:?}", started.elapsed());
        let group = admin.describe_group("resub").await.unwrap();
        assert_eq!(group.members.len(), 1, "{:?}", group.members);
        let mut assigned = c.assignment();
        assigned.sort();
        assert_eq!(assigned, vec![("sub-a".to_owned(), 0), ("sub-b".to_owned(), 0)]);
        c.close().await.unwrap();
    });
}

#[test]
fn poll_returns_within_its_timeout_while_the_group_refuses_the_member() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "[groups]\nmembers_per_group_max = 1\n");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("full", 1)).await.unwrap();
        let mut a = Consumer::connect(member_config(&broker, "full-group")).await.unwrap();
        a.subscribe(&["full"]).await.unwrap();
        let mut b = Consumer::connect(member_config(&broker, "full-group")).await.unwrap();
        let err = b.subscribe(&["full"]).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::ResourceLimit), "{err}");
        // Every poll returns within its timeout; the refusal surfaces in one of them (on a busy
        // machine the rejoin may not be answered within the first second).
        let deadline = Instant::now() + Duration::from_secs(20);
        let err = loop {
            let polled = tokio::time::timeout(Duration::from_secs(5), b.poll(Duration::from_secs(1))).await;
            match polled.expect("poll(1 s) did not return within 5 s") {
                Err(e) => break e,
                Ok(records) => {
                    assert!(records.is_empty(), "a refused member got records");
                    assert!(Instant::now() < deadline, "the refusal never surfaced in poll");
                }
            }
        };
        assert_eq!(err.code(), Some(ErrorCode::ResourceLimit), "{err}");
        a.close().await.unwrap();
    });
}

/// A member busy with its records when a rebalance starts has `rebalance_timeout` to rejoin,
/// not `session_timeout`: its heartbeats go on meanwhile, and what it commits before rejoining
/// is accepted.
#[test]
fn a_member_busy_for_longer_than_its_session_timeout_during_a_rebalance_keeps_its_membership() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(120), async {
        broker.admin().await.create_topic(NewTopic::new("busy", 2)).await.unwrap();
        produce(&broker, "busy", 2, 10).await;
        let config = ConsumerConfig { auto_commit: false, ..member_config(&broker, "busy-group") };
        let mut a = Consumer::connect(config.clone()).await.unwrap();
        a.subscribe(&["busy"]).await.unwrap();
        read_records(&mut a, 10).await;
        let generation = broker.admin().await.describe_group("busy-group").await.unwrap().generation;
        // B's join starts a rebalance; A is busy for 5 s, past its 3 s session timeout and
        // within its 10 s rebalance timeout.
        let b_joined = tokio::spawn(async move {
            let mut b = Consumer::connect(config).await.unwrap();
            b.subscribe(&["busy"]).await.unwrap();
            b
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        a.commit().await.expect("a member still rebalancing commits what it processed");
        // A's next poll rejoins; the rebalance completes with both members.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !b_joined.is_finished() || a.assignment().len() != 1 {
            assert!(Instant::now() < deadline, "A has {:?} after the rebalance", a.assignment());
            let _ = a.poll(Duration::from_millis(100)).await;
        }
        let b = b_joined.await.unwrap();
        assert_eq!(b.assignment().len(), 1);
        let after = broker.admin().await.describe_group("busy-group").await.unwrap().generation;
        assert_eq!(after, generation + 1, "one rebalance: A was not dropped and made to join again");
    });
}
