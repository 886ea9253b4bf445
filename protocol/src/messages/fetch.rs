//! Fetch (key 5): read record batches from many partitions, with long polling.
//!
//! ```text
//! request:  max_wait_ms u32 | min_bytes u32 | max_bytes u32
//!           group u8 (0 = none, 1 = present)
//!             [present] group_id string | member_id string | generation_id i32
//!           topics array<{ name string,
//!                          partitions array<{ partition u32, fetch_offset i64,
//!                                             partition_max_bytes u32 }> }>
//! response: topics array<{ name string,
//!                          partitions array<{ partition u32, error u16,
//!                                             log_start_offset i64, log_end_offset i64,
//!                                             records bytes }> }>
//! ```
//!
//! `records` is zero or more whole RecordBatch v2 back to back; the first batch is always whole
//! even when larger than `partition_max_bytes`, so a consumer always makes progress. The batch
//! containing `fetch_offset` may start before it: consumers skip records below the offset they
//! asked for. When fewer than `min_bytes` are available, the broker parks the request until enough
//! data arrives or `max_wait_ms` passes. With a group context, the broker answers
//! `ILLEGAL_GENERATION`, `UNKNOWN_MEMBER_ID` or `NOT_ASSIGNED` for partitions the member may not
//! read in the current generation, so two live members never consume the same partition.

use bytes::Bytes;

use super::{get_error, put_error};
use crate::api::{ApiKey, Decode, Encode, Request};
use crate::error::DecodeError;
use crate::error_code::ErrorCode;
use crate::wire::{WireReader, WireWriter};

/// Fetch request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchRequest {
    /// Longest time to park the request waiting for `min_bytes`.
    pub max_wait_ms: u32,
    /// Answer as soon as at least this many bytes are available.
    pub min_bytes: u32,
    /// Upper bound on record bytes in the whole response (the first batch is always whole).
    pub max_bytes: u32,
    /// Group membership to check the fetch against, if any.
    pub group: Option<FetchGroup>,
    /// Partitions to read.
    pub topics: Vec<FetchTopic>,
}

/// The member on whose behalf a fetch is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchGroup {
    /// Group id.
    pub group_id: String,
    /// Member id assigned by JoinGroup.
    pub member_id: String,
    /// Generation the assignment came from.
    pub generation_id: i32,
}

/// Partitions of one topic to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchTopic {
    /// Topic name.
    pub name: String,
    /// Partitions.
    pub partitions: Vec<FetchPartition>,
}

/// Where to read one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchPartition {
    /// Partition index.
    pub partition: u32,
    /// First offset wanted.
    pub fetch_offset: i64,
    /// Upper bound on this partition's record bytes (the first batch is always whole).
    pub partition_max_bytes: u32,
}

/// Fetch response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FetchResponse {
    /// Per topic, in request order.
    pub topics: Vec<FetchTopicResponse>,
}

/// Fetch results for one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchTopicResponse {
    /// Topic name.
    pub name: String,
    /// Per partition, in request order.
    pub partitions: Vec<FetchPartitionResponse>,
}

/// Fetch result for one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchPartitionResponse {
    /// Partition index.
    pub partition: u32,
    /// Outcome; with `OFFSET_OUT_OF_RANGE` the offsets below give the valid range.
    pub error: ErrorCode,
    /// First offset in the log.
    pub log_start_offset: i64,
    /// Offset the next record will get.
    pub log_end_offset: i64,
    /// Record batches; when encoding, the concatenation of the parts (sent without copying).
    pub records: Vec<Bytes>,
}

impl FetchPartitionResponse {
    /// A result with no records.
    pub fn empty(partition: u32, error: ErrorCode, log_start_offset: i64, log_end_offset: i64) -> Self {
        FetchPartitionResponse { partition, error, log_start_offset, log_end_offset, records: Vec::new() }
    }

    /// The records as one buffer (copies only if there are several parts).
    pub fn records_bytes(&self) -> Bytes {
        match self.records.len() {
            0 => Bytes::new(),
            1 => self.records[0].clone(),
            _ => Bytes::from(self.records.concat()),
        }
    }

    /// Record bytes in this result.
    pub fn records_len(&self) -> usize {
        self.records.iter().map(Bytes::len).sum()
    }
}

impl Encode for FetchRequest {
    fn encode(&self, w: &mut WireWriter) {
        w.u32(self.max_wait_ms);
        w.u32(self.min_bytes);
        w.u32(self.max_bytes);
        match &self.group {
            None => w.u8(0),
            Some(g) => {
                w.u8(1);
                w.string(&g.group_id);
                w.string(&g.member_id);
                w.i32(g.generation_id);
            }
        }
        w.count(self.topics.len());
        for t in &self.topics {
            w.string(&t.name);
            w.count(t.partitions.len());
            for p in &t.partitions {
                w.u32(p.partition);
                w.i64(p.fetch_offset);
                w.u32(p.partition_max_bytes);
            }
        }
    }
}
impl Decode for FetchRequest {
    fn decode(r: &mut WireReader) -> Result<Self, DecodeError> {
        let max_wait_ms = r.u32()?;
        let min_bytes = r.u32()?;
        let max_bytes = r.u32()?;
        let group = match r.u8()? {
            0 => None,
            1 => Some(FetchGroup { group_id: r.string()?, member_id: r.string()?, generation_id: r.i32()? }),
            other => return Err(DecodeError::InvalidValue { field: "fetch group flag", value: other.into() }),
        };
        let topics = r.array(6, |r| {
            Ok(FetchTopic {
                name: r.string()?,
                partitions: r.array(16, |r| {
                    Ok(FetchPartition { partition: r.u32()?, fetch_offset: r.i64()?, partition_max_bytes: r.u32()? })
                })?,
            })
        })?;
        Ok(FetchRequest { max_wait_ms, min_bytes, max_bytes, group, topics })
    }
}
impl Request for FetchRequest {
    const API_KEY: ApiKey = ApiKey::Fetch;
    type Response = FetchResponse;
}

impl Encode for FetchResponse {
    fn encode(&self, w: &mut WireWriter) {
        w.count(self.topics.len());
        for t in &self.topics {
            w.string(&t.name);
            w.count(t.partitions.len());
            for p in &t.partitions {
                w.u32(p.partition);
                put_error(w, p.error);
                w.i64(p.log_start_offset);
                w.i64(p.log_end_offset);
                w.bytes_parts(&p.records);
            }
        }
    }
}
impl Decode for FetchResponse {
    fn decode(r: &mut WireReader) -> Result<Self, DecodeError> {
        let topics = r.array(6, |r| {
            Ok(FetchTopicResponse {
                name: r.string()?,
                partitions: r.array(26, |r| {
                    let partition = r.u32()?;
                    let error = get_error(r)?;
                    let log_start_offset = r.i64()?;
                    let log_end_offset = r.i64()?;
                    let records = r.bytes()?;
                    let records = if records.is_empty() { Vec::new() } else { vec![records] };
                    Ok(FetchPartitionResponse { partition, error, log_start_offset, log_end_offset, records })
                })?,
            })
        })?;
        Ok(FetchResponse { topics })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::test_support::round_trip;

    #[test]
    fn fetch_round_trips() {
        round_trip(&FetchRequest {
            max_wait_ms: 500,
            min_bytes: 1,
            max_bytes: 1 << 20,
            group: Some(FetchGroup { group_id: "g".into(), member_id: "m".into(), generation_id: 3 }),
            topics: vec![FetchTopic {
                name: "t".into(),
                partitions: vec![FetchPartition { partition: 0, fetch_offset: 5, partition_max_bytes: 1024 }],
            }],
        });
        round_trip(&FetchResponse {
            topics: vec![FetchTopicResponse {
                name: "t".into(),
                partitions: vec![
                    FetchPartitionResponse {
                        partition: 0,
                        error: ErrorCode::None,
                        log_start_offset: 0,
                        log_end_offset: 9,
                        records: vec![Bytes::from_static(b"abc")],
                    },
                    FetchPartitionResponse::empty(1, ErrorCode::OffsetOutOfRange, 2, 4),
                ],
            }],
        });
    }
}
