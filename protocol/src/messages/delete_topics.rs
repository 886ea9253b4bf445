//! DeleteTopics (key 3). Deleting a topic removes its data from disk.
//!
//! ```text
//! request:  topics array<string>
//! response: topics array<{ name string, error u16, message nullable_string }>
//! ```

use super::create_topics::TopicResult;
use crate::api::{ApiKey, Decode, Encode, Request};
use crate::error::DecodeError;
use crate::wire::{WireReader, WireWriter};

/// DeleteTopics request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeleteTopicsRequest {
    /// Names of the topics to delete.
    pub topics: Vec<String>,
}

/// DeleteTopics response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeleteTopicsResponse {
    /// One result per requested topic, in request order.
    pub topics: Vec<TopicResult>,
}

impl Encode for DeleteTopicsRequest {
    fn encode(&self, w: &mut WireWriter) {
        w.count(self.topics.len());
        for t in &self.topics {
            w.string(t);
        }
    }
}
impl Decode for DeleteTopicsRequest {
    fn decode(r: &mut WireReader) -> Result<Self, DecodeError> {
        Ok(DeleteTopicsRequest { topics: r.array(2, WireReader::string)? })
    }
}
impl Request for DeleteTopicsRequest {
    const API_KEY: ApiKey = ApiKey::DeleteTopics;
    type Response = DeleteTopicsResponse;
}
impl Encode for DeleteTopicsResponse {
    fn encode(&self, w: &mut WireWriter) {
        w.count(self.topics.len());
        for t in &self.topics {
            t.put(w);
        }
    }
}
impl Decode for DeleteTopicsResponse {
    fn decode(r: &mut WireReader) -> Result<Self, DecodeError> {
        Ok(DeleteTopicsResponse { topics: r.array(6, TopicResult::get)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error_code::ErrorCode;
    use crate::messages::test_support::round_trip;

    #[test]
    fn delete_topics_round_trips() {
        round_trip(&DeleteTopicsRequest { topics: vec!["a".into()] });
        round_trip(&DeleteTopicsResponse {
            topics: vec![TopicResult { name: "a".into(), error: ErrorCode::UnknownTopicOrPartition, message: None }],
        });
    }
}
