//! ListOffsets (key 6): earliest, latest, or first offset at or after a timestamp.
//!
//! ```text
//! request:  topics array<{ name string, partitions array<{ partition u32, timestamp i64 }> }>
//!           timestamp: -1 = latest (log end), -2 = earliest (log start), >= 0 = ms since epoch
//! response: topics array<{ name string,
//!                          partitions array<{ partition u32, error u16,
//!                                             timestamp i64, offset i64 }> }>
//! ```
//!
//! For a timestamp query the answer is the first offset whose record timestamp is `>=` the
//! timestamp, with that record's timestamp; if no record is that late, the log end offset and
//! timestamp -1.

use super::{get_error, put_error};
use crate::api::{ApiKey, Decode, Encode, Request};
use crate::error::DecodeError;
use crate::error_code::ErrorCode;
use crate::wire::{WireReader, WireWriter};

/// Special timestamp: the log end offset.
pub const LATEST_TIMESTAMP: i64 = -1;
/// Special timestamp: the log start offset.
pub const EARLIEST_TIMESTAMP: i64 = -2;

/// ListOffsets request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListOffsetsRequest {
    /// Queries per topic.
    pub topics: Vec<ListOffsetsTopic>,
}

/// Queries for one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListOffsetsTopic {
    /// Topic name.
    pub name: String,
    /// `(partition, timestamp)` queries.
    pub partitions: Vec<ListOffsetsPartition>,
}

/// One query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListOffsetsPartition {
    /// Partition index.
    pub partition: u32,
    /// [`LATEST_TIMESTAMP`], [`EARLIEST_TIMESTAMP`], or ms since the epoch.
    pub timestamp: i64,
}

/// ListOffsets response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListOffsetsResponse {
    /// Answers per topic.
    pub topics: Vec<ListOffsetsTopicResponse>,
}

/// Answers for one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListOffsetsTopicResponse {
    /// Topic name.
    pub name: String,
    /// Per partition.
    pub partitions: Vec<ListOffsetsPartitionResponse>,
}

/// One answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListOffsetsPartitionResponse {
    /// Partition index.
    pub partition: u32,
    /// Outcome.
    pub error: ErrorCode,
    /// Timestamp of the record found, or -1.
    pub timestamp: i64,
    /// The offset, or -1 on error.
    pub offset: i64,
}

impl Encode for ListOffsetsRequest {
    fn encode(&self, w: &mut WireWriter) {
        w.count(self.topics.len());
        for t in &self.topics {
            w.string(&t.name);
            w.count(t.partitions.len());
            for p in &t.partitions {
                w.u32(p.partition);
                w.i64(p.timestamp);
            }
        }
    }
}
impl Decode for ListOffsetsRequest {
    fn decode(r: &mut WireReader) -> Result<Self, DecodeError> {
        let topics = r.array(6, |r| {
            Ok(ListOffsetsTopic {
                name: r.string()?,
                partitions: r.array(12, |r| Ok(ListOffsetsPartition { partition: r.u32()?, timestamp: r.i64()? }))?,
            })
        })?;
        Ok(ListOffsetsRequest { topics })
    }
}
impl Request for ListOffsetsRequest {
    const API_KEY: ApiKey = ApiKey::ListOffsets;
    type Response = ListOffsetsResponse;
}
impl Encode for ListOffsetsResponse {
    fn encode(&self, w: &mut WireWriter) {
        w.count(self.topics.len());
        for t in &self.topics {
            w.string(&t.name);
            w.count(t.partitions.len());
            for p in &t.partitions {
                w.u32(p.partition);
                put_error(w, p.error);
                w.i64(p.timestamp);
                w.i64(p.offset);
            }
        }
    }
}
impl Decode for ListOffsetsResponse {
    fn decode(r: &mut WireReader) -> Result<Self, DecodeError> {
        let topics = r.array(6, |r| {
            Ok(ListOffsetsTopicResponse {
                name: r.string()?,
                partitions: r.array(22, |r| {
                    Ok(ListOffsetsPartitionResponse {
                        partition: r.u32()?,
                        error: get_error(r)?,
                        timestamp: r.i64()?,
                        offset: r.i64()?,
                    })
                })?,
            })
        })?;
        Ok(ListOffsetsResponse { topics })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::test_support::round_trip;

    #[test]
    fn list_offsets_round_trips() {
        round_trip(&ListOffsetsRequest {
            topics: vec![ListOffsetsTopic {
                name: "t".into(),
                partitions: vec![ListOffsetsPartition { partition: 0, timestamp: EARLIEST_TIMESTAMP }],
            }],
        });
        round_trip(&ListOffsetsResponse {
            topics: vec![ListOffsetsTopicResponse {
                name: "t".into(),
                partitions: vec![ListOffsetsPartitionResponse {
                    partition: 0,
                    error: ErrorCode::None,
                    timestamp: -1,
                    offset: 12,
                }],
            }],
        });
    }
}
