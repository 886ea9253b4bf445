//! Metadata (key 1): topics, their partitions, log offsets and configuration.
//!
//! ```text
//! request:  topics nullable_array<string>          null = every topic
//! response: topics array<{
//!             error u16, name string, internal bool,
//!             configs array<{ key string, value string }>,
//!             partitions array<{ partition u32, error u16,
//!                                log_start_offset i64, log_end_offset i64 }> }>
//! ```
//!
//! A named topic that does not exist comes back with `UNKNOWN_TOPIC_OR_PARTITION` and no
//! partitions.

use super::{get_error, put_error, ConfigEntry};
use crate::api::{ApiKey, Decode, Encode, Request};
use crate::error::DecodeError;
use crate::error_code::ErrorCode;
use crate::wire::{WireReader, WireWriter};

/// Metadata request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MetadataRequest {
    /// Topics to describe; `None` for all of them.
    pub topics: Option<Vec<String>>,
}

/// Metadata response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MetadataResponse {
    /// One entry per topic.
    pub topics: Vec<TopicMetadata>,
}

/// A topic's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicMetadata {
    /// Per-topic error (for example unknown topic).
    pub error: ErrorCode,
    /// Topic name.
    pub name: String,
    /// Internal topics (for example committed offsets) are hidden from normal listings.
    pub internal: bool,
    /// Effective topic configuration.
    pub configs: Vec<ConfigEntry>,
    /// Partitions in order.
    pub partitions: Vec<PartitionMetadata>,
}

/// A partition's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionMetadata {
    /// Partition index.
    pub partition: u32,
    /// Per-partition error.
    pub error: ErrorCode,
    /// First offset still in the log.
    pub log_start_offset: i64,
    /// Offset the next record will get.
    pub log_end_offset: i64,
}

impl Encode for MetadataRequest {
    fn encode(&self, w: &mut WireWriter) {
        match &self.topics {
            None => w.u32(crate::wire::NULL_U32),
            Some(t) => {
                w.count(t.len());
                for name in t {
                    w.string(name);
                }
            }
        }
    }
}
impl Decode for MetadataRequest {
    fn decode(r: &mut WireReader) -> Result<Self, DecodeError> {
        Ok(MetadataRequest { topics: r.nullable_array(2, WireReader::string)? })
    }
}
impl Request for MetadataRequest {
    const API_KEY: ApiKey = ApiKey::Metadata;
    type Response = MetadataResponse;
}

impl Encode for MetadataResponse {
    fn encode(&self, w: &mut WireWriter) {
        w.count(self.topics.len());
        for t in &self.topics {
            put_error(w, t.error);
            w.string(&t.name);
            w.bool(t.internal);
            w.count(t.configs.len());
            for c in &t.configs {
                c.put(w);
            }
            w.count(t.partitions.len());
            for p in &t.partitions {
                w.u32(p.partition);
                put_error(w, p.error);
                w.i64(p.log_start_offset);
                w.i64(p.log_end_offset);
            }
        }
    }
}
impl Decode for MetadataResponse {
    fn decode(r: &mut WireReader) -> Result<Self, DecodeError> {
        let topics = r.array(13, |r| {
            Ok(TopicMetadata {
                error: get_error(r)?,
                name: r.string()?,
                internal: r.bool()?,
                configs: r.array(4, ConfigEntry::get)?,
                partitions: r.array(22, |r| {
                    Ok(PartitionMetadata {
                        partition: r.u32()?,
                        error: get_error(r)?,
                        log_start_offset: r.i64()?,
                        log_end_offset: r.i64()?,
                    })
                })?,
            })
        })?;
        Ok(MetadataResponse { topics })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::test_support::round_trip;

    #[test]
    fn metadata_round_trips() {
        round_trip(&MetadataRequest { topics: None });
        round_trip(&MetadataRequest { topics: Some(vec!["a".into(), "b.c".into()]) });
        round_trip(&MetadataResponse {
            topics: vec![TopicMetadata {
                error: ErrorCode::None,
                name: "events".into(),
                internal: false,
                configs: vec![ConfigEntry { key: "retention_ms".into(), value: "1000".into() }],
                partitions: vec![PartitionMetadata {
                    partition: 0,
                    error: ErrorCode::None,
                    log_start_offset: 3,
                    log_end_offset: 10,
                }],
            }],
        });
    }
}
