//! # cairn-client
//!
//! The async client for Cairn: a batching [`Producer`], a tailing [`Consumer`] (explicit
//! partitions or a consumer group), and [`Admin`] operations; plus the `cairn` command-line tool.
//!
//! ```no_run
//! # async fn demo() -> cairn_client::Result<()> {
//! use cairn_client::{Admin, ConnectionConfig, Consumer, ConsumerConfig, NewTopic, Producer, ProducerConfig, ProducerRecord};
//! let admin = Admin::connect(ConnectionConfig::default()).await?;
//! admin.create_topic(NewTopic::new("agent-state", 3)).await?;
//!
//! let producer = Producer::connect(ProducerConfig::default()).await?;
//! producer.send(ProducerRecord::new("agent-state", "done").key("task-17")).await?.await?;
//!
//! let mut consumer = Consumer::connect(ConsumerConfig::default()).await?;
//! consumer.assign("agent-state", None).await?;
//! let records = consumer.poll(std::time::Duration::from_secs(1)).await?;
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
