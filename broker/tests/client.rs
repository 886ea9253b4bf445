//! Client library tests against the real broker binary.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cairn_client::partitioner::partition_for_key;
use cairn_client::{Acks, Consumer, ConsumerConfig, Error, NewTopic, Offset, Producer, ProducerConfig, ProducerRecord};
use common::{run, signal, TestBroker};

#[test]
fn a_hundred_thousand_records_arrive_exactly_once_in_order_and_keys_keep_their_partition() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(240), async {
        broker.admin().await.create_topic(NewTopic::new("many", 4)).await.unwrap();
        let producer = Producer::connect(broker.producer_config()).await.unwrap();
        let mut deliveries = Vec::new();
        for i in 0..100_000u64 {
            let key = format!("key-{}", i % 100);
            let d = producer.send(ProducerRecord::new("many", i.to_string()).key(key.clone())).await.unwrap();
            if i % 97 == 0 {
                deliveries.push((key, d));
            }
        }
        producer.flush().await.unwrap();
        assert_eq!(producer.outstanding(), 0);
        for (key, d) in deliveries {
            let meta = d.await.unwrap();
            assert_eq!(meta.partition, partition_for_key(key.as_bytes(), 4), "same key, same partition, always");
        }
        producer.close().await.unwrap();

        let mut consumer = Consumer::connect(broker.consumer_config()).await.unwrap();
        consumer.assign("many", None).await.unwrap();
        consumer.seek_all(Offset::Earliest);
        let mut seen = vec![false; 100_000];
        let mut last_offset: HashMap<u32, i64> = HashMap::new();
        let mut last_per_key: HashMap<String, u64> = HashMap::new();
        let mut total = 0;
        while total < 100_000 {
            let records = consumer.poll(Duration::from_secs(5)).await.unwrap();
            assert!(records.len() <= 500, "max_poll_records (default 500) bounds a poll: {}", records.len());
            for r in records {
                let i: u64 = std::str::from_utf8(r.value.as_deref().unwrap()).unwrap().parse().unwrap();
                assert!(!seen[i as usize], "record {i} delivered twice");
                seen[i as usize] = true;
                let prev = last_offset.insert(r.partition, r.offset);
                assert!(prev.is_none_or(|p| p + 1 == r.offset), "offsets are dense and in order per partition");
                let key = String::from_utf8(r.key.unwrap().to_vec()).unwrap();
                assert_eq!(r.partition, partition_for_key(key.as_bytes(), 4));
                let prev = last_per_key.insert(key, i);
                assert!(prev.is_none_or(|p| p < i), "per-key order is send order");
                total += 1;
            }
        }
        assert!(seen.iter().all(|s| *s));
        assert!(consumer.poll(Duration::from_millis(200)).await.unwrap().is_empty(), "nothing extra");
    });
}

#[test]
fn values_sent_by_reference_and_copied_ones_arrive_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(120), async {
        broker.admin().await.create_topic(NewTopic::new("mixed", 2)).await.unwrap();
        let producer = Producer::connect(broker.producer_config()).await.unwrap();
        // Sizes on both sides of the 512-byte line, so that batches mix referenced values and
        // values copied in, and a referenced value follows a copied one and the other way round.
        let sizes = [0usize, 100, 511, 512, 513, 1024, 4000, 100_000, 7, 600];
        let value = |i: usize| -> Vec<u8> { (0..sizes[i % sizes.len()]).map(|j| (i * 31 + j) as u8).collect() };
        let mut deliveries = Vec::new();
        for i in 0..500 {
            let record = ProducerRecord::new("mixed", value(i)).key(format!("k{}", i % 7)).header("i", i.to_string());
            deliveries.push(producer.send(record).await.unwrap());
        }
        producer.flush().await.unwrap();
        for d in deliveries {
            d.await.expect("the broker stored the batch (its CRC and lengths check out)");
        }
        producer.close().await.unwrap();

        let mut consumer = Consumer::connect(broker.consumer_config()).await.unwrap();
        consumer.assign("mixed", None).await.unwrap();
        consumer.seek_all(Offset::Earliest);
        let mut seen = 0;
        while seen < 500 {
            for r in consumer.poll(Duration::from_secs(5)).await.unwrap() {
                let i: usize = std::str::from_utf8(r.headers[0].value.as_deref().unwrap()).unwrap().parse().unwrap();
                assert_eq!(r.value.as_deref().unwrap(), &value(i)[..], "record {i}'s value");
                assert_eq!(r.key.as_deref().unwrap(), format!("k{}", i % 7).as_bytes());
                seen += 1;
            }
        }
        assert!(consumer.poll(Duration::from_millis(200)).await.unwrap().is_empty(), "nothing extra");
    });
}

#[test]
fn send_waits_when_the_buffer_is_full_and_resumes_when_space_frees() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(120), async {
        broker.admin().await.create_topic(NewTopic::new("bp", 1)).await.unwrap();
        let config =
            ProducerConfig { buffer_bytes_max: 64 * 1024, batch_bytes_max: 16 * 1024, ..broker.producer_config() };
        let producer = Producer::connect(config).await.unwrap();
        let value = vec![b'v'; 1000];
        // Learn the topic's metadata first; then freeze the broker so nothing is acknowledged
        // and the buffer cannot drain.
        producer.send(ProducerRecord::new("bp", value.clone())).await.unwrap().await.unwrap();
        signal(&broker, "STOP");
        let mut sent = 0;
        let blocked = loop {
            let send = producer.send(ProducerRecord::new("bp", value.clone()));
            match tokio::time::timeout(Duration::from_millis(500), send).await {
                Ok(r) => {
                    r.unwrap();
                    sent += 1;
                    assert!(sent < 200, "send never waited: buffer is unbounded");
                }
                Err(_) => break sent,
            }
        };
        assert!((50..=70).contains(&blocked), "about 64 KiB of 1 KB records buffered, got {blocked}");
        signal(&broker, "CONT");
        let d = producer.send(ProducerRecord::new("bp", value.clone())).await.unwrap();
        d.await.unwrap();
        producer.close().await.unwrap();
    });
}

#[test]
fn acks_none_send_waits_for_the_socket_and_flush_for_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(120), async {
        let admin = broker.admin().await;
        admin.create_topic(NewTopic::new("none", 1)).await.unwrap();
        let config = ProducerConfig {
            acks: Acks::None,
            buffer_bytes_max: 64 * 1024,
            batch_bytes_max: 16 * 1024,
            ..broker.producer_config()
        };
        let producer = Producer::connect(config).await.unwrap();
        let value = vec![b'v'; 1000];
        producer.send(ProducerRecord::new("none", value.clone())).await.unwrap().await.unwrap();
        // A frozen broker reads nothing: once the socket's buffers are full, the producer's
        // buffer must fill too and `send` wait, not queue requests without bound.
        signal(&broker, "STOP");
        let mut sent = 1;
        loop {
            let send = producer.send(ProducerRecord::new("none", value.clone()));
            match tokio::time::timeout(Duration::from_millis(500), send).await {
                Ok(r) => {
                    r.unwrap();
                    sent += 1;
                    assert!(sent < 100_000, "send never waited: 100 MB queued for a broker that reads nothing");
                }
                Err(_) => break,
            }
        }
        signal(&broker, "CONT");
        producer.close().await.unwrap();
        // Everything `send` took was written before close returned.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let end = admin.describe_topic("none").await.unwrap().partitions[0].end_offset;
            if end == sent {
                break;
            }
            assert!(Instant::now() < deadline, "{end} of {sent} records arrived");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

#[test]
fn a_delivery_that_times_out_says_it_timed_out_and_names_the_broker_when_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("slow", 1)).await.unwrap();
        let mut config = broker.producer_config();
        config.connection.request_timeout = Duration::from_millis(200);
        config.delivery_timeout = Duration::from_millis(600);
        config.retry_backoff = Duration::from_millis(50);
        let producer = Producer::connect(config).await.unwrap();
        producer.send(ProducerRecord::new("slow", "first")).await.unwrap().await.unwrap();
        // A broker that stops answering: every attempt times out, and so does the delivery.
        signal(&broker, "STOP");
        let err = producer.send(ProducerRecord::new("slow", "late")).await.unwrap().await.unwrap_err();
        signal(&broker, "CONT");
        assert!(matches!(err, Error::Timeout { operation: "produce", .. }), "{err:?}");
        // A broker that is gone: the connection is lost, and the error says to which broker.
        producer.send(ProducerRecord::new("slow", "after")).await.unwrap().await.unwrap();
        broker.kill9();
        let err = producer.send(ProducerRecord::new("slow", "lost")).await.unwrap().await.unwrap_err();
        match &err {
            Error::Disconnected { addr, .. } | Error::Connect { addr, .. } => {
                assert_eq!(addr, &broker.addr.to_string(), "{err}")
            }
            other => panic!("expected a lost connection, got {other:?}"),
        }
    });
}

#[test]
fn keyed_records_reach_the_partitions_of_a_topic_recreated_with_more() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        let admin = broker.admin().await;
        admin.create_topic(NewTopic::new("grows", 2)).await.unwrap();
        let config = ProducerConfig { metadata_max_age: Duration::from_millis(200), ..broker.producer_config() };
        let producer = Producer::connect(config).await.unwrap();
        producer.send(ProducerRecord::new("grows", "before").key("k")).await.unwrap().await.unwrap();
        admin.delete_topic("grows").await.unwrap();
        admin.create_topic(NewTopic::new("grows", 8)).await.unwrap();
        // Within a few refreshes, every key goes where eight partitions put it.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut misplaced = 0;
            for i in 0..64 {
                let key = format!("key-{i}");
                let sent = producer.send(ProducerRecord::new("grows", "after").key(key.clone())).await.unwrap();
                let meta = sent.await.unwrap();
                misplaced += usize::from(meta.partition != partition_for_key(key.as_bytes(), 8));
            }
            if misplaced == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "{misplaced} of 64 keys still go where two partitions put them");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        producer.close().await.unwrap();
    });
}

#[test]
fn acks_all_records_survive_a_kill_and_the_producer_carries_on_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = TestBroker::start(dir.path(), "");
    let addr = broker.addr;
    let config = ProducerConfig { acks: Acks::All, ..broker.producer_config() };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let producer = rt.block_on(async {
        broker.admin().await.create_topic(NewTopic::new("durable", 2)).await.unwrap();
        let producer = Producer::connect(config).await.unwrap();
        let mut ds = Vec::new();
        for i in 0..5000 {
            ds.push(producer.send(ProducerRecord::new("durable", format!("before-{i}"))).await.unwrap());
        }
        for d in ds {
            d.await.unwrap();
        }
        producer
    });
    broker.kill9();
    let broker = TestBroker::start_on(dir.path(), "", &addr.to_string());
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(120), async {
            let mut ds = Vec::new();
            for i in 0..5000 {
                ds.push(producer.send(ProducerRecord::new("durable", format!("after-{i}"))).await.unwrap());
            }
            for d in ds {
                d.await.expect("the producer reconnects and retries");
            }
            producer.close().await.unwrap();
            let mut consumer = Consumer::connect(broker.consumer_config()).await.unwrap();
            consumer.assign("durable", None).await.unwrap();
            consumer.seek_all(Offset::Earliest);
            let mut values = std::collections::HashSet::new();
            loop {
                let batch = consumer.poll(Duration::from_secs(2)).await.unwrap();
                if batch.is_empty() {
                    break;
                }
                for r in batch {
                    values.insert(String::from_utf8(r.value.unwrap().to_vec()).unwrap());
                }
            }
            for i in 0..5000 {
                assert!(values.contains(&format!("before-{i}")), "acknowledged before-{i} lost");
                assert!(values.contains(&format!("after-{i}")), "acknowledged after-{i} lost");
            }
        })
        .await
        .expect("time limit");
    });
}

#[test]
fn unknown_topics_and_unreachable_brokers_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        let producer = Producer::connect(broker.producer_config()).await.unwrap();
        match producer.send(ProducerRecord::new("missing", "x")).await {
            Err(Error::UnknownTopic(t)) => assert_eq!(t, "missing"),
            other => panic!("{other:?}"),
        }
        let mut unreachable = broker.producer_config();
        unreachable.connection.broker = "127.0.0.1:1".into();
        let err = Producer::connect(unreachable).await.unwrap_err();
        assert!(matches!(err, Error::Connect { .. }), "{err}");
        assert!(err.is_retriable());
    });
}

#[test]
fn polls_hand_out_a_fetch_in_max_poll_records_pieces_and_a_seek_drops_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("pieces", 1)).await.unwrap();
        let producer = Producer::connect(broker.producer_config()).await.unwrap();
        for i in 0..100u64 {
            drop(producer.send(ProducerRecord::new("pieces", i.to_string())).await.unwrap());
        }
        producer.close().await.unwrap();

        let config = ConsumerConfig { max_poll_records: 7, ..broker.consumer_config() };
        let mut consumer = Consumer::connect(config).await.unwrap();
        consumer.assign("pieces", None).await.unwrap();
        consumer.seek_all(Offset::Earliest);
        let offsets = |rs: &[cairn_client::ConsumerRecord]| rs.iter().map(|r| r.offset).collect::<Vec<_>>();
        let first = consumer.poll(Duration::from_secs(5)).await.unwrap();
        assert_eq!(offsets(&first), (0..7).collect::<Vec<_>>(), "one fetch, handed out 7 at a time");
        let second = consumer.poll(Duration::from_secs(5)).await.unwrap();
        assert_eq!(offsets(&second), (7..14).collect::<Vec<_>>());
        // Records already fetched but not handed out are dropped by a seek.
        consumer.seek("pieces", 0, Offset::At(3));
        let mut next = 3;
        while next < 100 {
            let rs = consumer.poll(Duration::from_secs(5)).await.unwrap();
            assert!(!rs.is_empty() && rs.len() <= 7, "{}", rs.len());
            for r in rs {
                assert_eq!(r.offset, next, "dense, in order, from the seek on");
                next += 1;
            }
        }
        assert!(consumer.poll(Duration::from_millis(200)).await.unwrap().is_empty());

        // Assigning a partition again starts it over (auto_offset_reset, Earliest here): the
        // records fetched before are not handed out first.
        consumer.seek("pieces", 0, Offset::At(50));
        assert_eq!(offsets(&consumer.poll(Duration::from_secs(5)).await.unwrap()), (50..57).collect::<Vec<_>>());
        consumer.assign("pieces", None).await.unwrap();
        let again = consumer.poll(Duration::from_secs(5)).await.unwrap();
        assert_eq!(offsets(&again), (0..7).collect::<Vec<_>>(), "stale records after assign");
    });
}

#[test]
fn acks_none_keeps_a_partitions_order_and_loses_nothing_on_a_healthy_broker() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(120), async {
        broker.admin().await.create_topic(NewTopic::new("fire", 1)).await.unwrap();
        let producer = Producer::connect(ProducerConfig {
            acks: Acks::None,
            batch_bytes_max: 16 * 1024,
            ..broker.producer_config()
        })
        .await
        .unwrap();
        let n = 200_000u64;
        for i in 0..n {
            producer.send(ProducerRecord::new("fire", format!("{i:08}")).partition(0)).await.unwrap();
        }
        producer.close().await.unwrap();
        let mut consumer = Consumer::connect(broker.consumer_config()).await.unwrap();
        consumer.assign("fire", None).await.unwrap();
        consumer.seek_all(Offset::Earliest);
        let mut next = 0u64;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while next < n {
            assert!(std::time::Instant::now() < deadline, "only {next} of {n} records arrived");
            for r in consumer.poll(Duration::from_millis(500)).await.unwrap() {
                let i: u64 = std::str::from_utf8(r.value.as_deref().unwrap()).unwrap().parse().unwrap();
                assert_eq!(
                    i, next,
                    "record {i} at offset {}, expected {next}: order changed or records lost",
                    r.offset
                );
                next += 1;
            }
        }
    });
}

#[test]
fn a_send_racing_close_is_either_refused_or_delivered_never_left_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(120), async {
        broker.admin().await.create_topic(NewTopic::new("late", 1)).await.unwrap();
        for round in 0..20 {
            let producer = Producer::connect(broker.producer_config()).await.unwrap();
            let other = producer.clone();
            // The first send to a topic waits for its metadata: close() runs meanwhile.
            let send = tokio::spawn(async move { other.send(ProducerRecord::new("late", "x")).await });
            producer.close().await.unwrap();
            let outcome = tokio::time::timeout(Duration::from_secs(10), async {
                match send.await.unwrap() {
                    Ok(delivery) => delivery.await.map(|_| "delivered"),
                    Err(Error::Closed) => Ok("refused"),
                    Err(e) => Err(e),
                }
            })
            .await;
            assert!(matches!(outcome, Ok(Ok(_))), "round {round}: {outcome:?}");
        }
    });
}

#[test]
fn a_send_after_close_began_is_refused_so_close_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("closing", 1)).await.unwrap();
        let producer = Producer::connect(broker.producer_config()).await.unwrap();
        producer.send(ProducerRecord::new("closing", "first")).await.unwrap().await.unwrap();
        // The broker stops answering: close() waits in its flush for the second record.
        signal(&broker, "STOP");
        let pending = producer.send(ProducerRecord::new("closing", "second")).await.unwrap();
        let closer = producer.clone();
        let close = tokio::spawn(async move { closer.close().await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let still_closing = !close.is_finished();
        let late = producer.send(ProducerRecord::new("closing", "late")).await;
        signal(&broker, "CONT");
        assert!(still_closing, "close() returned while the broker was stopped");
        assert!(matches!(late, Err(Error::Closed)), "a send after close() began: {late:?}");
        close.await.unwrap().unwrap();
        pending.await.unwrap();
        assert_eq!(producer.outstanding(), 0, "close() returned with records outstanding");
    });
}

#[test]
fn a_record_for_a_partition_the_topic_gained_is_sent_not_refused() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        let admin = broker.admin().await;
        admin.create_topic(NewTopic::new("widens", 2)).await.unwrap();
        let producer = Producer::connect(broker.producer_config()).await.unwrap();
        producer.send(ProducerRecord::new("widens", "before").partition(1)).await.unwrap().await.unwrap();
        admin.delete_topic("widens").await.unwrap();
        admin.create_topic(NewTopic::new("widens", 8)).await.unwrap();
        // The producer still counts two partitions; it asks the broker before refusing.
        let sent = producer.send(ProducerRecord::new("widens", "after").partition(5)).await;
        let meta = sent.expect("partition 5 of 8 refused").await.unwrap();
        assert_eq!(meta.partition, 5);
        let missing = producer.send(ProducerRecord::new("widens", "nowhere").partition(8)).await;
        assert!(matches!(missing, Err(Error::InvalidArgument(_))), "partition 8 of 8: {missing:?}");
        producer.close().await.unwrap();
    });
}

/// The broker's open client connections, from its metrics endpoint.
fn open_connections(broker: &TestBroker) -> f64 {
    broker.metric("cairn_connections").expect("cairn_connections is exported")
}

#[test]
fn a_producer_dropped_without_close_delivers_what_it_had_and_lets_its_connection_go() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(120), async {
        broker.admin().await.create_topic(NewTopic::new("dropped", 1)).await.unwrap();
        let mut deliveries = Vec::new();
        let mut producers = Vec::new();
        for i in 0..20 {
            let producer = Producer::connect(broker.producer_config()).await.unwrap();
            deliveries.push(producer.send(ProducerRecord::new("dropped", format!("{i}"))).await.unwrap());
            producers.push(producer);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while open_connections(&broker) < 20.0 {
            assert!(std::time::Instant::now() < deadline, "the metric never showed the producers' connections");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(producers);
        for d in deliveries {
            tokio::time::timeout(Duration::from_secs(10), d).await.expect("delivered after the drop").unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let now = open_connections(&broker);
            if now == 0.0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{now} connections still open after the producers were dropped"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

#[test]
fn cancelled_sends_and_flushes_give_back_what_they_took() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(120), async {
        broker.admin().await.create_topic(NewTopic::new("cancel", 1)).await.unwrap();
        let producer = Producer::connect(ProducerConfig {
            buffer_bytes_max: 64 * 1024,
            batch_bytes_max: 16 * 1024,
            ..broker.producer_config()
        })
        .await
        .unwrap();
        let value = "v".repeat(1000);
        // Each first send to the topic waits for metadata; the caller gives up on it at once.
        for _ in 0..200 {
            let send = producer.send(ProducerRecord::new("cancel", value.clone()));
            let early = futures::FutureExt::now_or_never(send).map(|r| r.map(|_| "a delivery"));
            assert!(early.is_none(), "the first send waits for metadata, but returned {early:?}");
        }
        let sent = tokio::time::timeout(Duration::from_secs(10), async {
            for _ in 0..100 {
                producer.send(ProducerRecord::new("cancel", value.clone())).await.unwrap();
            }
            producer.flush().await.unwrap();
        })
        .await;
        assert!(sent.is_ok(), "the buffer space taken by cancelled sends never came back");
        producer.close().await.unwrap();

        // A flush given up on must not leave the producer flushing, with linger off, for good.
        let linger = Duration::from_secs(2);
        let producer = Producer::connect(ProducerConfig { linger, ..broker.producer_config() }).await.unwrap();
        let first = producer.send(ProducerRecord::new("cancel", "first")).await.unwrap();
        assert!(futures::FutureExt::now_or_never(producer.flush()).is_none(), "a record is outstanding");
        first.await.unwrap();
        let started = std::time::Instant::now();
        producer.send(ProducerRecord::new("cancel", "second")).await.unwrap().await.unwrap();
        assert!(started.elapsed() >= linger / 2, "the next batch still lingers: sent after {:?}", started.elapsed());
        producer.close().await.unwrap();
    });
}

#[test]
fn flush_waits_for_what_was_sent_before_it_not_for_sends_that_never_stop() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(120), async {
        broker.admin().await.create_topic(NewTopic::new("busy", 4)).await.unwrap();
        let producer = Producer::connect(broker.producer_config()).await.unwrap();
        let mut before = Vec::new();
        for i in 0..1000 {
            before.push(producer.send(ProducerRecord::new("busy", format!("{i}"))).await.unwrap());
        }
        // Another agent sharing the producer sends without a pause.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let busy = {
            let (producer, stop) = (producer.clone(), std::sync::Arc::clone(&stop));
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for _ in 0..1000 {
                        producer.send(ProducerRecord::new("busy", "more")).await.unwrap();
                    }
                    tokio::task::yield_now().await;
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = std::time::Instant::now();
        // Bounded far above what the flush itself needs (milliseconds): without this bound it
        // waited until the busy clone happened to have nothing outstanding (6-16 s).
        let flushed = tokio::time::timeout(Duration::from_secs(5), producer.flush()).await;
        eprintln!("flush under a busy clone took {:?}", started.elapsed());
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        busy.await.unwrap();
        assert!(flushed.is_ok(), "flush waited for records sent after it began");
        for d in before {
            assert!(
                futures::FutureExt::now_or_never(d.wait()).is_some_and(|r| r.is_ok()),
                "every record sent before the flush is acknowledged when it returns"
            );
        }
        producer.close().await.unwrap();
    });
}

#[test]
fn poll_reports_a_broker_that_stays_unreachable_instead_of_returning_nothing_for_ever() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("gone", 1)).await.unwrap();
        let producer = Producer::connect(broker.producer_config()).await.unwrap();
        producer.send(ProducerRecord::new("gone", "v")).await.unwrap().await.unwrap();
        producer.close().await.unwrap();
        let mut consumer = Consumer::connect(broker.consumer_config()).await.unwrap();
        consumer.assign("gone", None).await.unwrap();
        let mut got = 0;
        while got < 1 {
            got += consumer.poll(Duration::from_secs(2)).await.unwrap().len();
        }
        broker.kill9();
        let started = Instant::now();
        let err = loop {
            assert!(started.elapsed() < Duration::from_secs(10), "poll kept returning nothing");
            match consumer.poll(Duration::from_millis(300)).await {
                Ok(records) => assert!(records.is_empty()),
                Err(e) => break e,
            }
        };
        assert!(matches!(err, Error::Connect { .. } | Error::Disconnected { .. }), "{err:?}");
        assert!(err.is_retriable());
    });
}

#[test]
fn a_partition_that_fails_its_fetches_does_not_starve_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(90), async {
        // Deleted before the first poll, its start offset cannot be looked up; deleted after,
        // its fetches fail.
        for (round, polled_before) in [false, true].into_iter().enumerate() {
            let (failing, flowing) = (format!("a-fails-{round}"), format!("b-flows-{round}"));
            let admin = broker.admin().await;
            admin.create_topic(NewTopic::new(failing.as_str(), 1)).await.unwrap();
            admin.create_topic(NewTopic::new(flowing.as_str(), 1)).await.unwrap();
            let mut consumer = Consumer::connect(broker.consumer_config()).await.unwrap();
            // The failing topic's partition comes first in every request.
            consumer.assign(&failing, None).await.unwrap();
            consumer.assign(&flowing, None).await.unwrap();
            consumer.seek_all(Offset::Earliest);
            if polled_before {
                assert!(consumer.poll(Duration::from_millis(100)).await.unwrap().is_empty());
            }
            admin.delete_topic(&failing).await.unwrap();
            let producer = Producer::connect(broker.producer_config()).await.unwrap();
            for i in 0..50 {
                producer.send(ProducerRecord::new(flowing.as_str(), i.to_string())).await.unwrap();
            }
            producer.flush().await.unwrap();
            let (mut read, mut errors) = (0, 0);
            let deadline = Instant::now() + Duration::from_secs(20);
            while read < 50 {
                assert!(Instant::now() < deadline, "round {round}: read {read} of 50 records ({errors} poll errors)");
                match consumer.poll(Duration::from_millis(100)).await {
                    Ok(records) => read += records.len(),
                    Err(e) if is_unknown_topic(&e) => errors += 1,
                    Err(e) => panic!("unexpected error {e:?}"),
                }
            }
            // The failing partition is still reported, after the others' records.
            for _ in 0..5 {
                match consumer.poll(Duration::from_millis(100)).await {
                    Ok(records) => assert!(records.is_empty(), "{} records more than were sent", records.len()),
                    Err(e) if is_unknown_topic(&e) => errors += 1,
                    Err(e) => panic!("unexpected error {e:?}"),
                }
            }
            assert!(errors > 0, "round {round}: the deleted topic's partition was never reported");
        }
    });
}

#[test]
fn a_consumer_whose_fetches_cannot_park_waits_instead_of_asking_again_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // Every fetch that would wait for data is answered at once, empty.
    let broker = TestBroker::start(dir.path(), "parked_fetches_max = 0");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("quiet", 1)).await.unwrap();
        let config = ConsumerConfig { fetch_max_wait: Duration::from_millis(200), ..broker.consumer_config() };
        let mut consumer = Consumer::connect(config).await.unwrap();
        consumer.assign("quiet", None).await.unwrap();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(1) {
            assert!(consumer.poll(Duration::from_millis(250)).await.unwrap().is_empty());
        }
        let refused = broker
            .metric("cairn_parked_fetches_refused_total")
            .expect("cairn_parked_fetches_refused_total is exported");
        // About one a fetch_max_wait, as if each had been parked; not a busy loop.
        assert!(refused <= 20.0, "{refused} fetches in about a second");
    });
}

/// A consumer starting on many partitions looks their offsets up in one request, not in one
/// round trip each.
#[test]
fn a_consumer_looks_up_the_start_of_all_its_partitions_in_one_request() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("wide", 50)).await.unwrap();
        broker.admin().await.create_topic(NewTopic::new("narrow", 2)).await.unwrap();
        let mut consumer = Consumer::connect(broker.consumer_config()).await.unwrap();
        consumer.assign("wide", None).await.unwrap();
        consumer.assign("narrow", None).await.unwrap();
        consumer.seek_all(Offset::Latest);
        consumer.seek("narrow", 1, Offset::At(0));
        assert!(consumer.poll(Duration::from_millis(300)).await.unwrap().is_empty());
        let positions = consumer.positions();
        assert_eq!(positions.len(), 52);
        assert!(positions.values().all(|p| *p == Some(0)), "{positions:?}");
        let lookups = broker
            .metric(r#"cairn_requests_total{api="list_offsets",result="ok"}"#)
            .expect("list_offsets requests are counted");
        assert_eq!(lookups, 1.0, "one lookup for 51 partitions");
    });
}

/// A poll returns by its timeout while the broker does not answer the lookup of a seek's
/// offset; a later poll takes the answer up.
#[test]
fn a_seek_the_broker_does_not_answer_does_not_hold_poll_past_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(90), async {
        broker.admin().await.create_topic(NewTopic::new("sought", 1)).await.unwrap();
        let producer = Producer::connect(broker.producer_config()).await.unwrap();
        for i in 0..5 {
            producer.send(ProducerRecord::new("sought", format!("{i}"))).await.unwrap();
        }
        producer.close().await.unwrap();
        let mut config = broker.consumer_config();
        config.connection.request_timeout = Duration::from_secs(30);
        let mut consumer = Consumer::connect(config).await.unwrap();
        consumer.assign("sought", None).await.unwrap();
        consumer.seek_all(Offset::Earliest);
        signal(&broker, "STOP");
        let started = Instant::now();
        let polled = tokio::time::timeout(Duration::from_secs(10), consumer.poll(Duration::from_millis(300))).await;
        let waited = started.elapsed();
        signal(&broker, "CONT");
        assert!(polled.is_ok(), "poll(300 ms) still waited for the offset lookup after {waited:?}");
        let mut seen = 0;
        let deadline = Instant::now() + Duration::from_secs(20);
        while seen < 5 {
            assert!(Instant::now() < deadline, "read {seen} of 5 records");
            seen += consumer.poll(Duration::from_millis(200)).await.unwrap().len();
        }
    });
}

/// A fetch the broker parked until its `fetch_wait_max_ms` is answered empty long before the
/// consumer's own `fetch_max_wait`; that is not a fetch the broker could not park, so the
/// consumer asks again at once instead of leaving no fetch parked for the rest of its wait.
#[test]
fn a_fetch_cut_short_by_the_brokers_wait_cap_is_followed_by_a_parked_one_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "fetch_wait_max_ms = 200");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("capped", 1)).await.unwrap();
        let config = ConsumerConfig { fetch_max_wait: Duration::from_secs(10), ..broker.consumer_config() };
        let mut consumer = Consumer::connect(config).await.unwrap();
        consumer.assign("capped", None).await.unwrap();
        // A few capped answers come and go.
        assert!(consumer.poll(Duration::from_millis(700)).await.unwrap().is_empty());
        let producer = Producer::connect(broker.producer_config()).await.unwrap();
        producer.send(ProducerRecord::new("capped", "late")).await.unwrap().await.unwrap();
        let sent = Instant::now();
        let mut got = Vec::new();
        while got.is_empty() && sent.elapsed() < Duration::from_secs(20) {
            got = consumer.poll(Duration::from_millis(100)).await.unwrap();
        }
        let waited = sent.elapsed();
        assert_eq!(got.len(), 1);
        assert!(waited < Duration::from_secs(5), "the record waited {waited:?} with no fetch parked");
        producer.close().await.unwrap();
    });
}

fn is_unknown_topic(e: &Error) -> bool {
    matches!(e, Error::UnknownTopic(_) | Error::Broker { code: cairn_client::ErrorCode::UnknownTopicOrPartition, .. })
}

#[test]
fn with_a_small_fetch_budget_every_partition_gets_its_turn() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("wide", 8)).await.unwrap();
        // A backlog of one-record batches on every partition.
        let producer = Producer::connect(broker.producer_config()).await.unwrap();
        for _ in 0..40 {
            for p in 0..8 {
                let record = ProducerRecord::new("wide", vec![b'x'; 1000]).partition(p);
                producer.send(record).await.unwrap().await.unwrap();
            }
        }
        // A fetch carries about four records: the first partition in a request uses it all.
        let config =
            ConsumerConfig { fetch_max_bytes: 4096, partition_fetch_max_bytes: 4096, ..broker.consumer_config() };
        let mut consumer = Consumer::connect(config).await.unwrap();
        consumer.assign("wide", None).await.unwrap();
        let mut seen = std::collections::BTreeSet::new();
        let mut polls = 0;
        let deadline = Instant::now() + Duration::from_secs(20);
        while polls < 8 {
            assert!(Instant::now() < deadline, "{polls} polls with records");
            let records = consumer.poll(Duration::from_millis(200)).await.unwrap();
            if !records.is_empty() {
                polls += 1;
                seen.extend(records.iter().map(|r| r.partition));
            }
        }
        assert!(seen.len() >= 4, "eight fetches read from partitions {seen:?} only");
    });
}

#[test]
fn a_commit_does_not_wait_behind_a_parked_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let broker = TestBroker::start(dir.path(), "");
    run(Duration::from_secs(60), async {
        broker.admin().await.create_topic(NewTopic::new("idle", 1)).await.unwrap();
        let config = ConsumerConfig {
            group: Some("idle-readers".into()),
            fetch_max_wait: Duration::from_secs(10),
            ..broker.consumer_config()
        };
        let mut consumer = Consumer::connect(config).await.unwrap();
        consumer.assign("idle", None).await.unwrap();
        // Leaves a fetch parked at the broker for up to ten seconds.
        assert!(consumer.poll(Duration::from_millis(100)).await.unwrap().is_empty());
        let offsets = std::collections::BTreeMap::from([(("idle".to_string(), 0), 0)]);
        let committed = tokio::time::timeout(Duration::from_secs(5), consumer.commit_offsets(&offsets)).await;
        assert!(committed.expect("the commit waited for the parked fetch").is_ok());
    });
}
