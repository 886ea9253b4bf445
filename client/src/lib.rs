//! # cairn-client
//!
//! The async client for Cairn: a batching [`Producer`], a tailing [`Consumer`] (explicit
//! partitions or a consumer group), and [`Admin`] operations; plus the `cairn` command-line tool.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let broker = cairn_broker::EmbeddedBroker::start(dir.path())?;
//! # tokio::runtime::Runtime::new()?.block_on(async {
//! use cairn_client::{Admin, ConnectionConfig, Consumer, ConsumerConfig, NewTopic, Producer, ProducerConfig, ProducerRecord};
//! let connection = ConnectionConfig::default(); // 127.0.0.1:7070
//! # let connection = ConnectionConfig { broker: broker.addr().to_string(), ..connection };
//! let admin = Admin::connect(connection.clone()).await?;
//! admin.create_topic(NewTopic::new("agent-state", 3)).await?;
//!
//! let producer = Producer::connect(ProducerConfig { connection: connection.clone(), ..ProducerConfig::default() }).await?;
//! producer.send(ProducerRecord::new("agent-state", "done").key("task-17")).await?.await?;
//!
//! let mut consumer = Consumer::connect(ConsumerConfig { connection, ..ConsumerConfig::default() }).await?;
//! consumer.assign("agent-state", None).await?;
//! let records = consumer.poll(std::time::Duration::from_secs(5)).await?;
//! # assert_eq!(records.len(), 1);
//! # Ok::<_, cairn_client::Error>(()) })?;
//! # Ok(()) }
//! ```
//!
//! Errors are one enum, [`Error`]; [`Error::is_retriable`] says whether trying again can help.
//! Connections reconnect on the next request after a broker restart, and every request has a
//! timeout.

pub mod admin;
pub mod connection;
pub mod consumer;
pub mod error;
pub mod partitioner;
pub mod producer;

pub use admin::{Admin, GroupInfo, MemberInfo, NewTopic, PartitionInfo, PartitionLagInfo, TopicInfo};
pub use cairn_protocol::{Acks, ErrorCode, Header};
pub use connection::{Connection, ConnectionConfig};
pub use consumer::{Consumer, ConsumerConfig, ConsumerRecord, Offset};
pub use error::{Error, Result};
pub use producer::{Delivery, Producer, ProducerConfig, ProducerRecord, RecordMetadata};
