//! Topic and group administration.

use std::collections::BTreeMap;

use cairn_protocol::messages::create_topics::{CreatableTopic, CreateTopicsRequest};
use cairn_protocol::messages::delete_topics::DeleteTopicsRequest;
use cairn_protocol::messages::groups::{DescribeGroupsRequest, GroupDescription, GroupListing, ListGroupsRequest};
use cairn_protocol::messages::list_offsets::{ListOffsetsPartition, ListOffsetsRequest, ListOffsetsTopic};
use cairn_protocol::messages::metadata::MetadataRequest;
use cairn_protocol::messages::ConfigEntry;
use cairn_protocol::ErrorCode;
use serde::Serialize;

use crate::connection::{Connection, ConnectionConfig};
use crate::error::{Error, Result};

/// Settings for a new topic. Unset fields take the broker's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewTopic {
    /// Topic name: 1-249 characters from `[A-Za-z0-9._-]`.
    pub name: String,
    /// Number of partitions (default 1).
    pub partitions: u32,
    /// `retention_ms`: -1 keeps forever.
    pub retention_ms: Option<i64>,
    /// `retention_bytes` per partition: -1 is unlimited.
    pub retention_bytes: Option<i64>,
    /// `segment_bytes`.
    pub segment_bytes: Option<u64>,
    /// `flush_interval_ms`.
    pub flush_interval_ms: Option<u64>,
    /// `cleanup_policy`: `delete` or `compact`.
    pub cleanup_policy: Option<String>,
    /// `batch_bytes_max`: largest batch the topic accepts (at most `segment_bytes`).
    pub batch_bytes_max: Option<u32>,
}

impl NewTopic {
    /// A topic with `partitions` partitions and default settings.
    pub fn new(name: impl Into<String>, partitions: u32) -> NewTopic {
        NewTopic { name: name.into(), partitions, ..NewTopic::default() }
    }

    fn configs(&self) -> Vec<ConfigEntry> {
        let mut out = Vec::new();
        let mut add = |k: &str, v: Option<String>| {
            if let Some(value) = v {
                out.push(ConfigEntry { key: k.to_owned(), value });
            }
        };
        add("retention_ms", self.retention_ms.map(|v| v.to_string()));
        add("retention_bytes", self.retention_bytes.map(|v| v.to_string()));
        add("segment_bytes", self.segment_bytes.map(|v| v.to_string()));
        add("flush_interval_ms", self.flush_interval_ms.map(|v| v.to_string()));
        add("cleanup_policy", self.cleanup_policy.clone());
        add("batch_bytes_max", self.batch_bytes_max.map(|v| v.to_string()));
        out
    }
}

/// A topic as the broker describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopicInfo {
    /// Name.
    pub name: String,
    /// Internal topics are hidden from [`Admin::list_topics`].
    pub internal: bool,
    /// Effective configuration.
    pub config: BTreeMap<String, String>,
    /// Partitions with their offsets.
    pub partitions: Vec<PartitionInfo>,
}

/// A partition's offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PartitionInfo {
    /// Partition index.
    pub partition: u32,
    /// First offset still in the log.
    pub start_offset: i64,
    /// Offset the next record will get.
    pub end_offset: i64,
}

/// A group as the broker describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupInfo {
    /// Group id.
    pub group: String,
    /// `empty`, `rebalancing` or `stable`.
    pub state: String,
    /// Generation.
    pub generation: i32,
    /// Members and their partitions.
    pub members: Vec<MemberInfo>,
    /// Per partition: committed offset, log end, lag.
    pub partitions: Vec<PartitionLagInfo>,
}

/// One member of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemberInfo {
    /// Member id.
    pub member_id: String,
    /// Static instance id.
    pub instance_id: Option<String>,
    /// Client id.
    pub client_id: String,
    /// `topic -> partitions`.
    pub assignment: BTreeMap<String, Vec<u32>>,
}

/// Committed offset and lag of one partition (`None` when nothing is committed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionLagInfo {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// Committed offset (next to consume).
    pub committed: Option<i64>,
    /// Log end offset.
    pub end: i64,
    /// `end - committed`.
    pub lag: Option<i64>,
}

/// Administrative operations.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// # let broker = cairn_broker::EmbeddedBroker::start(dir.path())?;
/// # tokio::runtime::Runtime::new()?.block_on(async {
/// use cairn_client::{Admin, ConnectionConfig, NewTopic};
/// let connection = ConnectionConfig::default(); // 127.0.0.1:7070
/// # let connection = ConnectionConfig { broker: broker.addr().to_string(), ..connection };
/// let admin = Admin::connect(connection).await?;
/// admin.create_topic(NewTopic::new("events", 3)).await?;
/// for t in admin.list_topics().await? {
///     println!("{} has {} partitions", t.name, t.partitions.len());
/// }
/// # assert_eq!(admin.list_topics().await?.len(), 1);
/// # Ok::<_, cairn_client::Error>(()) })?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Admin {
    conn: Connection,
}

impl Admin {
    /// Connects to a broker.
    ///
    /// # Errors
    /// When the broker is unreachable.
    pub async fn connect(config: ConnectionConfig) -> Result<Admin> {
        Ok(Admin { conn: Connection::connect(config).await? })
    }

    /// Uses an existing connection.
    pub fn with_connection(conn: Connection) -> Admin {
        Admin { conn }
    }

    /// Creates a topic.
    ///
    /// # Errors
    /// [`Error::Broker`] with `TOPIC_ALREADY_EXISTS`, `INVALID_TOPIC_NAME`, `INVALID_CONFIG`, ...
    pub async fn create_topic(&self, topic: NewTopic) -> Result<()> {
        let req = CreateTopicsRequest {
            topics: vec![CreatableTopic {
                name: topic.name.clone(),
                partitions: topic.partitions.max(1),
                configs: topic.configs(),
            }],
        };
        let resp = self.conn.request(&req).await?;
        let r = resp
            .topics
            .into_iter()
            .next()
            .ok_or_else(|| Error::broker(ErrorCode::Unknown, Some("empty response".into())))?;
        if r.error.is_ok() {
            Ok(())
        } else {
            Err(Error::broker(r.error, r.message))
        }
    }

    /// Deletes a topic and its data.
    ///
    /// # Errors
    /// [`Error::UnknownTopic`] or another broker error.
    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        let resp = self.conn.request(&DeleteTopicsRequest { topics: vec![name.to_owned()] }).await?;
        let r = resp
            .topics
            .into_iter()
            .next()
            .ok_or_else(|| Error::broker(ErrorCode::Unknown, Some("empty response".into())))?;
        match r.error {
            ErrorCode::None => Ok(()),
            ErrorCode::UnknownTopicOrPartition => Err(Error::UnknownTopic(name.to_owned())),
            code => Err(Error::broker(code, r.message)),
        }
    }

    /// Every non-internal topic, sorted by name.
    ///
    /// # Errors
    /// Connection or broker errors.
    pub async fn list_topics(&self) -> Result<Vec<TopicInfo>> {
        let resp = self.conn.request(&MetadataRequest { topics: None }).await?;
        Ok(resp.topics.into_iter().filter(|t| !t.internal).map(to_info).collect())
    }

    /// One topic.
    ///
    /// # Errors
    /// [`Error::UnknownTopic`] or connection errors.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicInfo> {
        let resp = self.conn.request(&MetadataRequest { topics: Some(vec![name.to_owned()]) }).await?;
        let t = resp.topics.into_iter().next().ok_or_else(|| Error::UnknownTopic(name.to_owned()))?;
        match t.error {
            ErrorCode::None => Ok(to_info(t)),
            ErrorCode::UnknownTopicOrPartition => Err(Error::UnknownTopic(name.to_owned())),
            code => Err(Error::broker(code, None)),
        }
    }

    /// The first offset with a timestamp `>=` `timestamp_ms` in each partition of `topic`
    /// (the log end where none is that late).
    ///
    /// # Errors
    /// Unknown topic or connection errors.
    pub async fn offsets_for_timestamp(
        &self,
        topic: &str,
        partitions: &[u32],
        timestamp_ms: i64,
    ) -> Result<Vec<(u32, i64)>> {
        let req = ListOffsetsRequest {
            topics: vec![ListOffsetsTopic {
                name: topic.to_owned(),
                partitions: partitions
                    .iter()
                    .map(|p| ListOffsetsPartition { partition: *p, timestamp: timestamp_ms })
                    .collect(),
            }],
        };
        let resp = self.conn.request(&req).await?;
        let mut out = Vec::new();
        for t in resp.topics {
            for p in t.partitions {
                match p.error {
                    ErrorCode::None => out.push((p.partition, p.offset)),
                    ErrorCode::UnknownTopicOrPartition => return Err(Error::UnknownTopic(topic.to_owned())),
                    code => return Err(Error::broker(code, None)),
                }
            }
        }
        Ok(out)
    }

    /// Every consumer group.
    ///
    /// # Errors
    /// Connection errors.
    pub async fn list_groups(&self) -> Result<Vec<GroupListing>> {
        Ok(self.conn.request(&ListGroupsRequest).await?.groups)
    }

    /// A group's members, committed offsets and lag.
    ///
    /// # Errors
    /// `GROUP_ID_NOT_FOUND` or connection errors.
    pub async fn describe_group(&self, group: &str) -> Result<GroupInfo> {
        let resp = self.conn.request(&DescribeGroupsRequest { groups: vec![group.to_owned()] }).await?;
        let g: GroupDescription = resp
            .groups
            .into_iter()
            .next()
            .ok_or_else(|| Error::broker(ErrorCode::Unknown, Some("empty response".into())))?;
        if !g.error.is_ok() {
            return Err(Error::broker(g.error, Some(format!("group {group}"))));
        }
        Ok(GroupInfo {
            group: g.group_id,
            state: g.state,
            generation: g.generation_id,
            members: g
                .members
                .into_iter()
                .map(|m| MemberInfo {
                    member_id: m.member_id,
                    instance_id: m.group_instance_id,
                    client_id: m.client_id,
                    assignment: m.assignment.into_iter().map(|tp| (tp.topic, tp.partitions)).collect(),
                })
                .collect(),
            partitions: g
                .offsets
                .into_iter()
                .map(|o| PartitionLagInfo {
                    topic: o.topic,
                    partition: o.partition,
                    committed: (o.committed_offset >= 0).then_some(o.committed_offset),
                    end: o.log_end_offset,
                    lag: (o.lag >= 0).then_some(o.lag),
                })
                .collect(),
        })
    }
}

fn to_info(t: cairn_protocol::messages::metadata::TopicMetadata) -> TopicInfo {
    TopicInfo {
        name: t.name,
        internal: t.internal,
        config: t.configs.into_iter().map(|c| (c.key, c.value)).collect(),
        partitions: t
            .partitions
            .into_iter()
            .map(|p| PartitionInfo {
                partition: p.partition,
                start_offset: p.log_start_offset,
                end_offset: p.log_end_offset,
            })
            .collect(),
    }
}
