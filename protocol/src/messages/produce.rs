//! Produce (key 4): append record batches.
//!
//! ```text
//! request:  acks u8 (0 none, 1 leader, 2 all) | timeout_ms u32
//!           topics array<{ name string,
//!                          partitions array<{ partition u32, records bytes }> }>
//! response: topics array<{ name string,
//!                          partitions array<{ partition u32, error u16, message nullable_string,
//!                                             base_offset i64, log_append_time_ms i64,
//!                                             log_start_offset i64 }> }>
//! ```
//!
//! `records` holds exactly one RecordBatch v2. With `acks = 0` the broker sends no response at
//! all; the client learns nothing about the outcome. With `acks = 2` the response is sent only
//! after the batch is covered by an fsync, or `timeout_ms` expires (`REQUEST_TIMED_OUT`).

use super::{get_error, put_error};
use crate::api::{ApiKey, Decode, Encode, Request};
use crate::error::DecodeError;
use crate::error_code::ErrorCode;
use crate::record_batch::BatchPayload;
use crate::wire::{WireReader, WireWriter, SHARED_CHUNK_BYTES_MIN};

/// How durable a write must be before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Acks {
    /// No acknowledgement at all: fire and forget.
    None,
    /// Acknowledged once in the broker's page cache: survives a broker crash, not a power loss.
    #[default]
    Leader,
    /// Acknowledged once covered by an fsync: survives a power loss.
    All,
}

impl Acks {
    /// Wire value.
    pub fn as_u8(self) -> u8 {
        match self {
            Acks::None => 0,
            Acks::Leader => 1,
            Acks::All => 2,
        }
    }

    /// From the wire value.
    pub fn from_u8(v: u8) -> Option<Acks> {
        match v {
            0 => Some(Acks::None),
            1 => Some(Acks::Leader),
            2 => Some(Acks::All),
            _ => None,
        }
    }
}

/// Produce request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProduceRequest {
    /// Durability required before the response.
    pub acks: Acks,
    /// How long the broker may wait for durability.
    pub timeout_ms: u32,
    /// Data per topic.
    pub topics: Vec<ProduceTopic>,
}

/// Produce data for one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProduceTopic {
    /// Topic name.
    pub name: String,
    /// Data per partition.
    pub partitions: Vec<ProducePartition>,
}

/// One record batch for one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducePartition {
    /// Partition index.
    pub partition: u32,
    /// One RecordBatch v2: decoded, a zero-copy slice of the request frame; from a producer,
    /// possibly in pieces (large values referenced, not copied).
    pub records: BatchPayload,
}

/// Produce response.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProduceResponse {
    /// Results per topic, in request order.
    pub topics: Vec<ProduceTopicResponse>,
}

/// Produce results for one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProduceTopicResponse {
    /// Topic name.
    pub name: String,
    /// Per-partition results, in request order.
    pub partitions: Vec<ProducePartitionResponse>,
}

/// Produce result for one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducePartitionResponse {
    /// Partition index.
    pub partition: u32,
    /// Outcome.
    pub error: ErrorCode,
    /// Details for humans when `error` is not `NONE`.
    pub message: Option<String>,
    /// Offset assigned to the batch's first record (-1 on error).
    pub base_offset: i64,
    /// Broker time of the append in ms since the epoch (-1 on error).
    pub log_append_time_ms: i64,
    /// The partition's log start offset.
    pub log_start_offset: i64,
}

impl ProducePartitionResponse {
    /// A failed result.
    pub fn error(partition: u32, error: ErrorCode, message: Option<String>) -> Self {
        ProducePartitionResponse {
            partition,
            error,
            message,
            base_offset: -1,
            log_append_time_ms: -1,
            log_start_offset: -1,
        }
    }
}

impl Encode for ProduceRequest {
    fn encode(&self, w: &mut WireWriter) {
        // Size the copied bytes and the chunks first: a batch of large values is many pieces.
        let (mut copied, mut chunks) = (9, 1);
        for t in &self.topics {
            copied += 6 + t.name.len();
            for p in &t.partitions {
                copied += 8;
                for part in p.records.parts() {
                    if part.len() < SHARED_CHUNK_BYTES_MIN {
                        copied += part.len();
                    } else {
                        chunks += 2;
                    }
                }
            }
        }
        w.reserve(copied, chunks);
        w.u8(self.acks.as_u8());
        w.u32(self.timeout_ms);
        w.count(self.topics.len());
        for t in &self.topics {
            w.string(&t.name);
            w.count(t.partitions.len());
            for p in &t.partitions {
                w.u32(p.partition);
                w.bytes_parts(p.records.parts());
            }
        }
    }
}
impl Decode for ProduceRequest {
    fn decode(r: &mut WireReader) -> Result<Self, DecodeError> {
        let acks = r.u8()?;
        let acks = Acks::from_u8(acks).ok_or(DecodeError::InvalidValue { field: "acks", value: acks.into() })?;
        let timeout_ms = r.u32()?;
        let topics = r.array(6, |r| {
            Ok(ProduceTopic {
                name: r.string()?,
                partitions: r.array(8, |r| {
                    Ok(ProducePartition { partition: r.u32()?, records: BatchPayload::Contiguous(r.bytes()?) })
                })?,
            })
        })?;
        Ok(ProduceRequest { acks, timeout_ms, topics })
    }
}
impl Request for ProduceRequest {
    const API_KEY: ApiKey = ApiKey::Produce;
    type Response = ProduceResponse;
}

impl Encode for ProduceResponse {
    fn encode(&self, w: &mut WireWriter) {
        w.count(self.topics.len());
        for t in &self.topics {
            w.string(&t.name);
            w.count(t.partitions.len());
            for p in &t.partitions {
                w.u32(p.partition);
                put_error(w, p.error);
                w.message(p.message.as_deref());
                w.i64(p.base_offset);
                w.i64(p.log_append_time_ms);
                w.i64(p.log_start_offset);
            }
        }
    }
}
impl Decode for ProduceResponse {
    fn decode(r: &mut WireReader) -> Result<Self, DecodeError> {
        let topics = r.array(6, |r| {
            Ok(ProduceTopicResponse {
                name: r.string()?,
                partitions: r.array(32, |r| {
                    Ok(ProducePartitionResponse {
                        partition: r.u32()?,
                        error: get_error(r)?,
                        message: r.nullable_string()?,
                        base_offset: r.i64()?,
                        log_append_time_ms: r.i64()?,
                        log_start_offset: r.i64()?,
                    })
                })?,
            })
        })?;
        Ok(ProduceResponse { topics })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::test_support::round_trip;
    use bytes::Bytes;

    #[test]
    fn produce_round_trips() {
        round_trip(&ProduceRequest {
            acks: Acks::All,
            timeout_ms: 5000,
            topics: vec![ProduceTopic {
                name: "t".into(),
                partitions: vec![ProducePartition { partition: 1, records: Bytes::from_static(b"batch").into() }],
            }],
        });
        round_trip(&ProduceResponse {
            topics: vec![ProduceTopicResponse {
                name: "t".into(),
                partitions: vec![
                    ProducePartitionResponse {
                        partition: 1,
                        error: ErrorCode::None,
                        message: None,
                        base_offset: 7,
                        log_append_time_ms: 1,
                        log_start_offset: 0,
                    },
                    ProducePartitionResponse::error(2, ErrorCode::CorruptBatch, Some("crc".into())),
                ],
            }],
        });
    }

    #[test]
    fn a_message_quoting_a_longest_topic_name_is_cut_not_a_panic() {
        // A produce to an internal topic is refused with a message that quotes its name, and a
        // name may be up to 65,534 bytes: name plus text is longer than a string field holds.
        let name = format!("__{}", "é".repeat(32_749)); // 65,500 bytes
        let message = format!("topic {name} is internal and cannot be written by producers");
        let response = ProduceResponse {
            topics: vec![ProduceTopicResponse {
                name: name.clone(),
                partitions: vec![ProducePartitionResponse::error(0, ErrorCode::InvalidTopicName, Some(message))],
            }],
        };
        let mut w = WireWriter::new();
        response.encode(&mut w);
        let mut r = WireReader::new(w.finish_contiguous().slice(4..));
        let back = ProduceResponse::decode(&mut r).unwrap();
        assert_eq!(back.topics[0].name, name);
        let got = back.topics[0].partitions[0].message.clone().unwrap();
        assert!(got.len() <= crate::wire::MESSAGE_BYTES_MAX && got.starts_with("topic __é"), "{}", got.len());
    }

    #[test]
    fn unknown_acks_is_a_decode_error() {
        let mut w = WireWriter::new();
        w.u8(9);
        w.u32(0);
        w.count(0);
        let mut r = WireReader::new(w.finish_contiguous().slice(4..));
        assert!(ProduceRequest::decode(&mut r).is_err());
    }
}
