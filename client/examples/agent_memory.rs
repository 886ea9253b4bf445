//! Agent memory on a Cairn topic.
//!
//! A producer agent appends keyed state-change events ("task 17 -> done"); a consumer agent
//! replays the topic from offset 0 into an in-memory map, then tails live changes and keeps the
//! map current. Because events with the same key land in the same partition, per-task order is
//! preserved, and replaying the log always rebuilds the same memory.
//!
//! Run a broker (`cargo run --release -p cairn-broker`), then:
//!
//! ```text
//! cargo run -p cairn-client --example agent_memory
//! ```
//!
//! Set `CAIRN_BROKER` to use another broker than 127.0.0.1:7070.

use std::collections::BTreeMap;
use std::time::Duration;

use cairn_client::{
    Acks, Admin, ConnectionConfig, Consumer, ConsumerConfig, ConsumerRecord, Error, ErrorCode, NewTopic, Offset,
    Producer, ProducerConfig, ProducerRecord,
};

const TOPIC: &str = "agent-memory";

/// The consumer agent's memory: task id -> latest state.
#[derive(Debug, Default)]
struct Memory {
    tasks: BTreeMap<String, String>,
    applied: u64,
}

impl Memory {
    fn apply(&mut self, r: &ConsumerRecord) {
        let (Some(key), Some(value)) = (&r.key, &r.value) else {
            return;
        };
        let task = String::from_utf8_lossy(key).into_owned();
        let state = String::from_utf8_lossy(value).into_owned();
        self.tasks.insert(task, state);
        self.applied += 1;
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let broker = std::env::var("CAIRN_BROKER").unwrap_or_else(|_| "127.0.0.1:7070".into());
    let connection = ConnectionConfig { broker, client_id: "agent-memory".into(), ..ConnectionConfig::default() };

    let admin = Admin::connect(connection.clone()).await?;
    match admin.create_topic(NewTopic::new(TOPIC, 3)).await {
        Ok(()) | Err(Error::Broker { code: ErrorCode::TopicAlreadyExists, .. }) => {}
        Err(e) => return Err(e),
    }

    // The producer agent: every state change is an event keyed by task id.
    let producer = Producer::connect(ProducerConfig {
        connection: connection.clone(),
        acks: Acks::All,
        ..ProducerConfig::default()
    })
    .await?;
    for (task, state) in [("task-17", "todo"), ("task-4", "todo"), ("task-17", "in-progress"), ("task-17", "done")] {
        let meta = producer.send(ProducerRecord::new(TOPIC, state).key(task)).await?.await?;
        println!("producer: {task} -> {state}   (partition {}, offset {})", meta.partition, meta.offset);
    }

    // The consumer agent: replay from offset 0 to rebuild memory.
    let mut consumer = Consumer::connect(ConsumerConfig { connection, ..ConsumerConfig::default() }).await?;
    consumer.assign(TOPIC, None).await?;
    consumer.seek_all(Offset::Earliest);
    let mut memory = Memory::default();
    loop {
        let records = consumer.poll(Duration::from_millis(500)).await?;
        if records.is_empty() {
            break;
        }
        records.iter().for_each(|r| memory.apply(r));
    }
    println!("consumer: replayed {} events; memory = {:?}", memory.applied, memory.tasks);

    // Then tail live changes: the producer keeps working while the consumer follows.
    let live = tokio::spawn(async move {
        for (task, state) in [("task-4", "in-progress"), ("task-9", "todo"), ("task-4", "done")] {
            tokio::time::sleep(Duration::from_millis(200)).await;
            producer.send(ProducerRecord::new(TOPIC, state).key(task)).await?.await?;
        }
        producer.close().await
    });
    let mut live_seen = 0;
    while live_seen < 3 {
        for r in consumer.poll(Duration::from_secs(2)).await? {
            memory.apply(&r);
            live_seen += 1;
            println!(
                "consumer: live {} -> {}",
                String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()),
                String::from_utf8_lossy(r.value.as_deref().unwrap_or_default())
            );
        }
    }
    live.await.map_err(|e| Error::InvalidArgument(e.to_string()))??;
    println!("consumer: memory = {:?}", memory.tasks);
    Ok(())
}
