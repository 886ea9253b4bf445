//! OffsetCommit (key 7) and OffsetFetch (key 8): a group's committed offsets.
//!
//! A committed offset is the next offset to consume (Kafka's convention).
//!
//! ```text
//! OffsetCommit request:  group_id string | member_id string | generation_id i32
//!                        topics array<{ name string,
//!                                       partitions array<{ partition u32, offset i64,
//!                                                          metadata nullable_string }> }>
//!   generation_id -1 with an empty member_id commits outside group membership
//!   (a consumer that assigns partitions itself); otherwise both must be current.
//! OffsetCommit response: topics array<{ name string,
//!                                       partitions array<{ partition u32, error u16 }> }>
//!
//! OffsetFetch request:   group_id string
//!                        topics nullable_array<{ name string, partitions array<u32> }>
//!                        (null = every partition the group has committed)
//! OffsetFetch response:  topics array<{ name string,
//!                                       partitions array<{ partition u32, error u16,
//!                                                          offset i64 (-1 = no commit),
//!                                                          metadata nullable_string,
//!                                                          commit_timestamp_ms i64 }> }>
//! ```
//!
//! A commit is acknowledged only after it is fsynced to the broker's internal offsets log.

use super::{get_error, put_error};
use crate::api::{ApiKey, Decode, Encode, Request};
use crate::error::DecodeError;
use crate::error_code::ErrorCode;
use crate::wire::{WireReader, WireWriter};

/// OffsetCommit request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetCommitRequest {
    /// Group id.
    pub group_id: String,
    /// Member id, or empty for a commit outside membership.
    pub member_id: String,
    /// Generation, or -1 for a commit outside membership.
    pub generation_id: i32,
    /// Offsets per topic.
    pub topics: Vec<OffsetCommitTopic>,
}

/// Offsets for one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetCommitTopic {
    /// Topic name.
    pub name: String,
    /// Per partition.
    pub partitions: Vec<OffsetCommitPartition>,
}

/// One committed offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetCommitPartition {
    /// Partition index.
    pub partition: u32,
    /// Next offset to consume.
    pub offset: i64,
    /// Free-form metadata stored with the offset.
    pub metadata: Option<String>,
}

/// OffsetCommit response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OffsetCommitResponse {
    /// Per topic.
    pub topics: Vec<PartitionErrors>,
}

/// Per-partition error codes of one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionErrors {
    /// Topic name.
    pub name: String,
    /// `(partition, error)`.
    pub partitions: Vec<(u32, ErrorCode)>,
}

/// OffsetFetch request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetFetchRequest {
    /// Group id.
    pub group_id: String,
    /// Partitions to read; `None` for everything the group committed.
    pub topics: Option<Vec<OffsetFetchTopic>>,
}

/// Partitions of one topic to read offsets for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetFetchTopic {
    /// Topic name.
    pub name: String,
    /// Partition indexes.
    pub partitions: Vec<u32>,
}

/// OffsetFetch response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OffsetFetchResponse {
    /// Per topic.
    pub topics: Vec<OffsetFetchTopicResponse>,
}

/// Committed offsets of one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetFetchTopicResponse {
    /// Topic name.
    pub name: String,
    /// Per partition.
    pub partitions: Vec<OffsetFetchPartitionResponse>,
}

/// One committed offset, or -1 when the group has none for the partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetFetchPartitionResponse {
    /// Partition index.
    pub partition: u32,
    /// Outcome.
    pub error: ErrorCode,
    /// Next offset to consume, or -1.
    pub offset: i64,
    /// Metadata stored with the commit.
    pub metadata: Option<String>,
    /// When the commit was stored, ms since the epoch (-1 when none).
    pub commit_timestamp_ms: i64,
}

impl Encode for OffsetCommitRequest {
    fn encode(&self, w: &mut WireWriter) {
        w.string(&self.group_id);
        w.string(&self.member_id);
        w.i32(self.generation_id);
        w.count(self.topics.len());
        for t in &self.topics {
            w.string(&t.name);
            w.count(t.partitions.len());
            for p in &t.partitions {
                w.u32(p.partition);
                w.i64(p.offset);
                w.nullable_string(p.metadata.as_deref());
            }
        }
    }
}
impl Decode for OffsetCommitRequest {
    fn decode(r: &mut WireReader) -> Result<Self, DecodeError> {
        Ok(OffsetCommitRequest {
            group_id: r.string()?,
            member_id: r.string()?,
            generation_id: r.i32()?,
            topics: r.array(6, |r| {
                Ok(OffsetCommitTopic {
                    name: r.string()?,
                    partitions: r.array(14, |r| {
                        Ok(OffsetCommitPartition {
                            partition: r.u32()?,
                            offset: r.i64()?,
                            metadata: r.nullable_string()?,
                        })
                    })?,
                })
            })?,
        })
    }
}
impl Request for OffsetCommitRequest {
    const API_KEY: ApiKey = ApiKey::OffsetCommit;
    type Response = OffsetCommitResponse;
}

impl Encode for OffsetCommitResponse {
    fn encode(&self, w: &mut WireWriter) {
        w.count(self.topics.len());
        for t in &self.topics {
            w.string(&t.name);
            w.count(t.partitions.len());
            for (p, e) in &t.partitions {
                w.u32(*p);
                put_error(w, *e);
            }
        }
    }
}
impl Decode for OffsetCommitResponse {
    fn decode(r: &mut WireReader) -> Result<Self, DecodeError> {
        Ok(OffsetCommitResponse {
            topics: r.array(6, |r| {
                Ok(PartitionErrors { name: r.string()?, partitions: r.array(6, |r| Ok((r.u32()?, get_error(r)?)))? })
            })?,
        })
    }
}

impl Encode for OffsetFetchRequest {
    fn encode(&self, w: &mut WireWriter) {
        w.string(&self.group_id);
        match &self.topics {
            None => w.u32(crate::wire::NULL_U32),
            Some(topics) => {
                w.count(topics.len());
                for t in topics {
                    w.string(&t.name);
                    w.count(t.partitions.len());
                    for p in &t.partitions {
                        w.u32(*p);
                    }
                }
            }
        }
    }
}
impl Decode for OffsetFetchRequest {
    fn decode(r: &mut WireReader) -> Result<Self, DecodeError> {
        Ok(OffsetFetchRequest {
            group_id: r.string()?,
            topics: r.nullable_array(6, |r| {
                Ok(OffsetFetchTopic { name: r.string()?, partitions: r.array(4, WireReader::u32)? })
            })?,
        })
    }
}
impl Request for OffsetFetchRequest {
    const API_KEY: ApiKey = ApiKey::OffsetFetch;
    type Response = OffsetFetchResponse;
}

impl Encode for OffsetFetchResponse {
    fn encode(&self, w: &mut WireWriter) {
        w.count(self.topics.len());
        for t in &self.topics {
            w.string(&t.name);
            w.count(t.partitions.len());
            for p in &t.partitions {
                w.u32(p.partition);
                put_error(w, p.error);
                w.i64(p.offset);
                w.nullable_string(p.metadata.as_deref());
                w.i64(p.commit_timestamp_ms);
            }
        }
    }
}
impl Decode for OffsetFetchResponse {
    fn decode(r: &mut WireReader) -> Result<Self, DecodeError> {
        Ok(OffsetFetchResponse {
            topics: r.array(6, |r| {
                Ok(OffsetFetchTopicResponse {
                    name: r.string()?,
                    partitions: r.array(24, |r| {
                        Ok(OffsetFetchPartitionResponse {
                            partition: r.u32()?,
                            error: get_error(r)?,
                            offset: r.i64()?,
                            metadata: r.nullable_string()?,
                            commit_timestamp_ms: r.i64()?,
                        })
                    })?,
                })
            })?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::test_support::round_trip;

    #[test]
    fn offset_messages_round_trip() {
        round_trip(&OffsetCommitRequest {
            group_id: "g".into(),
            member_id: "m".into(),
            generation_id: 2,
            topics: vec![OffsetCommitTopic {
                name: "t".into(),
                partitions: vec![OffsetCommitPartition { partition: 0, offset: 10, metadata: Some("x".into()) }],
            }],
        });
        round_trip(&OffsetCommitResponse {
            topics: vec![PartitionErrors { name: "t".into(), partitions: vec![(0, ErrorCode::IllegalGeneration)] }],
        });
        round_trip(&OffsetFetchRequest { group_id: "g".into(), topics: None });
        round_trip(&OffsetFetchRequest {
            group_id: "g".into(),
            topics: Some(vec![OffsetFetchTopic { name: "t".into(), partitions: vec![0, 1] }]),
        });
        round_trip(&OffsetFetchResponse {
            topics: vec![OffsetFetchTopicResponse {
                name: "t".into(),
                partitions: vec![OffsetFetchPartitionResponse {
                    partition: 1,
                    error: ErrorCode::None,
                    offset: -1,
                    metadata: None,
                    commit_timestamp_ms: -1,
                }],
            }],
        });
    }
}
