//! CreateTopics (key 2).
//!
//! ```text
//! request:  topics array<{ name string, partitions u32,
//!                          configs array<{ key string, value string }> }>
//! response: topics array<{ name string, error u16, message nullable_string }>
//! ```
//!
//! Config keys (all optional; the broker's defaults apply): `retention_ms` (-1 = forever),
//! `retention_bytes` (-1 = unlimited), `segment_bytes`, `segment_ms`, `flush_interval_ms`,
//! `cleanup_policy` (`delete` or `compact`), `batch_bytes_max`.

use super::{get_error, put_error, ConfigEntry};
use crate::api::{ApiKey, Decode, Encode, Request};
use crate::error::DecodeError;
use crate::error_code::ErrorCode;
use crate::wire::{WireReader, WireWriter};

/// CreateTopics request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CreateTopicsRequest {
    /// Topics to create.
    pub topics: Vec<CreatableTopic>,
}

/// One topic to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatableTopic {
    /// Name: 1-249 characters from `[A-Za-z0-9._-]`.
    pub name: String,
    /// Number of partitions (at least 1).
    pub partitions: u32,
    /// Topic configuration overrides.
    pub configs: Vec<ConfigEntry>,
}

/// Result for one topic of a CreateTopics or DeleteTopics request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicResult {
    /// Topic name.
    pub name: String,
    /// Outcome.
    pub error: ErrorCode,
    /// Details for humans when `error` is not `NONE`.
    pub message: Option<String>,
}

impl TopicResult {
    pub(crate) fn put(&self, w: &mut WireWriter) {
        w.string(&self.name);
        put_error(w, self.error);
        w.message(self.message.as_deref());
    }
    pub(crate) fn get(r: &mut WireReader) -> Result<Self, DecodeError> {
        Ok(TopicResult { name: r.string()?, error: get_error(r)?, message: r.nullable_string()? })
    }
}

/// CreateTopics response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CreateTopicsResponse {
    /// One result per requested topic, in request order.
    pub topics: Vec<TopicResult>,
}

impl Encode for CreateTopicsRequest {
    fn encode(&self, w: &mut WireWriter) {
        w.count(self.topics.len());
        for t in &self.topics {
            w.string(&t.name);
            w.u32(t.partitions);
            w.count(t.configs.len());
            for c in &t.configs {
                c.put(w);
            }
        }
    }
}
impl Decode for CreateTopicsRequest {
    fn decode(r: &mut WireReader) -> Result<Self, DecodeError> {
        let topics = r.array(10, |r| {
            Ok(CreatableTopic { name: r.string()?, partitions: r.u32()?, configs: r.array(4, ConfigEntry::get)? })
        })?;
        Ok(CreateTopicsRequest { topics })
    }
}
impl Request for CreateTopicsRequest {
    const API_KEY: ApiKey = ApiKey::CreateTopics;
    type Response = CreateTopicsResponse;
}

impl Encode for CreateTopicsResponse {
    fn encode(&self, w: &mut WireWriter) {
        w.count(self.topics.len());
        for t in &self.topics {
            t.put(w);
        }
    }
}
impl Decode for CreateTopicsResponse {
    fn decode(r: &mut WireReader) -> Result<Self, DecodeError> {
        Ok(CreateTopicsResponse { topics: r.array(6, TopicResult::get)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::test_support::round_trip;

    #[test]
    fn create_topics_round_trips() {
        round_trip(&CreateTopicsRequest {
            topics: vec![CreatableTopic {
                name: "t".into(),
                partitions: 3,
                configs: vec![ConfigEntry { key: "segment_bytes".into(), value: "1048576".into() }],
            }],
        });
        round_trip(&CreateTopicsResponse {
            topics: vec![
                TopicResult { name: "t".into(), error: ErrorCode::None, message: None },
                TopicResult { name: "u".into(), error: ErrorCode::TopicAlreadyExists, message: Some("exists".into()) },
            ],
        });
    }
}
