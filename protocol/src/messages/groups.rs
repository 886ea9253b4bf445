//! Consumer group membership: JoinGroup (9), Heartbeat (10), LeaveGroup (11), ListGroups (12),
//! DescribeGroups (13).
//!
//! Unlike Kafka's classic protocol, the broker computes the assignment itself; a join returns
//! the member's partitions directly.
//!
//! ```text
//! JoinGroup request:  group_id string | member_id string (empty = new member)
//!                     group_instance_id nullable_string (static membership)
//!                     session_timeout_ms u32 | rebalance_timeout_ms u32
//!                     topics array<string>
//! JoinGroup response: error u16 | generation_id i32 | member_id string
//!                     heartbeat_interval_ms u32
//!                     assignment array<{ topic string, partitions array<u32> }>
//! Heartbeat request:  group_id string | member_id string | generation_id i32
//! Heartbeat response: error u16        (REBALANCE_IN_PROGRESS: stop fetching and rejoin)
//! LeaveGroup request: group_id string | member_id string
//! LeaveGroup response: error u16
//! ListGroups request: (empty)
//! ListGroups response: groups array<{ group_id string, state string, members u32 }>
//! DescribeGroups request:  groups array<string>
//! DescribeGroups response: groups array<{
//!     error u16, group_id string, state string, generation_id i32,
//!     members array<{ member_id string, group_instance_id nullable_string, client_id string,
//!                     assignment array<{ topic string, partitions array<u32> }> }>,
//!     offsets array<{ topic string, partition u32, committed_offset i64 (-1 = none),
//!                     log_end_offset i64, lag i64 (-1 = unknown) }> }>
//! ```

use super::{get_error, put_error};
use crate::api::{ApiKey, Decode, Encode, Request};
use crate::error::DecodeError;
use crate::error_code::ErrorCode;
use crate::wire::{WireReader, WireWriter};

/// Partitions of one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPartitions {
    /// Topic name.
    pub topic: String,
    /// Partition indexes.
    pub partitions: Vec<u32>,
}

impl TopicPartitions {
    fn put_all(w: &mut WireWriter, all: &[TopicPartitions]) {
        w.count(all.len());
        for t in all {
            w.string(&t.topic);
            w.count(t.partitions.len());
            for p in &t.partitions {
                w.u32(*p);
            }
        }
    }
    fn get_all(r: &mut WireReader) -> Result<Vec<TopicPartitions>, DecodeError> {
        r.array(6, |r| Ok(TopicPartitions { topic: r.string()?, partitions: r.array(4, WireReader::u32)? }))
    }
}

/// JoinGroup request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinGroupRequest {
    /// Group id.
    pub group_id: String,
    /// Member id from an earlier join, or empty for a new member.
    pub member_id: String,
    /// Stable id for static membership: a restarting member with the same id gets its
    /// partitions back without a rebalance.
    pub group_instance_id: Option<String>,
    /// A member that sends no heartbeat for this long is removed.
    pub session_timeout_ms: u32,
    /// How long a rebalance waits for members to rejoin.
    pub rebalance_timeout_ms: u32,
    /// Topics the member subscribes to.
    pub topics: Vec<String>,
}

/// JoinGroup response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinGroupResponse {
    /// Outcome.
    pub error: ErrorCode,
    /// Generation of the assignment.
    pub generation_id: i32,
    /// The member's id (assigned on first join).
    pub member_id: String,
    /// How often to heartbeat.
    pub heartbeat_interval_ms: u32,
    /// The member's partitions in this generation.
    pub assignment: Vec<TopicPartitions>,
}

/// Heartbeat request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatRequest {
    /// Group id.
    pub group_id: String,
    /// Member id.
    pub member_id: String,
    /// Generation the member believes is current.
    pub generation_id: i32,
}

/// LeaveGroup request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaveGroupRequest {
    /// Group id.
    pub group_id: String,
    /// Member id.
    pub member_id: String,
}

/// Response carrying only an error code (Heartbeat, LeaveGroup).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorOnlyResponse {
    /// Outcome.
    pub error: ErrorCode,
}

/// ListGroups request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListGroupsRequest;

/// ListGroups response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListGroupsResponse {
    /// Known groups.
    pub groups: Vec<GroupListing>,
}

/// One group in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupListing {
    /// Group id.
    pub group_id: String,
    /// `empty`, `rebalancing` or `stable`.
    pub state: String,
    /// Live members.
    pub members: u32,
}

/// DescribeGroups request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DescribeGroupsRequest {
    /// Group ids.
    pub groups: Vec<String>,
}

/// DescribeGroups response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DescribeGroupsResponse {
    /// One entry per requested group.
    pub groups: Vec<GroupDescription>,
}

/// A group's members, assignment and offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDescription {
    /// Outcome (`GROUP_ID_NOT_FOUND` for a group with no members and no commits).
    pub error: ErrorCode,
    /// Group id.
    pub group_id: String,
    /// `empty`, `rebalancing` or `stable`.
    pub state: String,
    /// Current generation.
    pub generation_id: i32,
    /// Live members.
    pub members: Vec<MemberDescription>,
    /// Committed offsets and lag per partition.
    pub offsets: Vec<PartitionLag>,
}

/// One group member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberDescription {
    /// Member id.
    pub member_id: String,
    /// Static instance id, if any.
    pub group_instance_id: Option<String>,
    /// Client id from the member's requests.
    pub client_id: String,
    /// Assigned partitions.
    pub assignment: Vec<TopicPartitions>,
}

/// Committed offset, log end and lag of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    /// Topic name.
    pub topic: String,
    /// Partition index.
    pub partition: u32,
    /// Committed offset, or -1 when none.
    pub committed_offset: i64,
    /// Log end offset.
    pub log_end_offset: i64,
    /// `log_end_offset - committed_offset`, or -1 when there is no commit.
    pub lag: i64,
}

impl Encode for JoinGroupRequest {
    fn encode(&self, w: &mut WireWriter) {
        w.string(&self.group_id);
        w.string(&self.member_id);
        w.nullable_string(self.group_instance_id.as_deref());
        w.u32(self.session_timeout_ms);
        w.u32(self.rebalance_timeout_ms);
        w.count(self.topics.len());
        for t in &self.topics {
            w.string(t);
        }
    }
}
impl Decode for JoinGroupRequest {
    fn decode(r: &mut WireReader) -> Result<Self, DecodeError> {
        Ok(JoinGroupRequest {
            group_id: r.string()?,
            member_id: r.string()?,
            group_instance_id: r.nullable_string()?,
            session_timeout_ms: r.u32()?,
            rebalance_timeout_ms: r.u32()?,
            topics: r.array(2, WireReader::string)?,
        })
    }
}
impl Request for JoinGroupRequest {
    const API_KEY: ApiKey = ApiKey::JoinGroup;
    type Response = JoinGroupResponse;
}
impl Encode for JoinGroupResponse {
    fn encode(&self, w: &mut WireWriter) {
        put_error(w, self.error);
        w.i32(self.generation_id);
        w.string(&self.member_id);
        w.u32(self.heartbeat_interval_ms);
        TopicPartitions::put_all(w, &self.assignment);
    }
}
impl Decode for JoinGroupResponse {
    fn decode(r: &mut WireReader) -> Result<Self, DecodeError> {
        Ok(JoinGroupResponse {
            error: get_error(r)?,
            generation_id: r.i32()?,
            member_id: r.string()?,
            heartbeat_interval_ms: r.u32()?,
            assignment: TopicPartitions::get_all(r)?,
        })
    }
}

impl Encode for HeartbeatRequest {
    fn encode(&self, w: &mut WireWriter) {
        w.string(&self.group_id);
        w.string(&self.member_id);
        w.i32(self.generation_id);
    }
}
impl Decode for HeartbeatRequest {
    fn decode(r: &mut WireReader) -> Result<Self, DecodeError> {
        Ok(HeartbeatRequest { group_id: r.string()?, member_id: r.string()?, generation_id: r.i32()? })
    }
}
impl Request for HeartbeatRequest {
    const API_KEY: ApiKey = ApiKey::Heartbeat;
    type Response = ErrorOnlyResponse;
}

impl Encode for LeaveGroupRequest {
    fn encode(&self, w: &mut WireWriter) {
        w.string(&self.group_id);
        w.string(&self.member_id);
    }
}
impl Decode for LeaveGroupRequest {
    fn decode(r: &mut WireReader) -> Result<Self, DecodeError> {
        Ok(LeaveGroupRequest { group_id: r.string()?, member_id: r.string()? })
    }
}
impl Request for LeaveGroupRequest {
    const API_KEY: ApiKey = ApiKey::LeaveGroup;
    type Response = ErrorOnlyResponse;
}

impl Encode for ErrorOnlyResponse {
    fn encode(&self, w: &mut WireWriter) {
        put_error(w, self.error);
    }
}
impl Decode for ErrorOnlyResponse {
    fn decode(r: &mut WireReader) -> Result<Self, DecodeError> {
        Ok(ErrorOnlyResponse { error: get_error(r)? })
    }
}

impl Encode for ListGroupsRequest {
    fn encode(&self, _w: &mut WireWriter) {}
}
impl Decode for ListGroupsRequest {
    fn decode(_r: &mut WireReader) -> Result<Self, DecodeError> {
        Ok(ListGroupsRequest)
    }
}
impl Request for ListGroupsRequest {
    const API_KEY: ApiKey = ApiKey::ListGroups;
    type Response = ListGroupsResponse;
}
impl Encode for ListGroupsResponse {
    fn encode(&self, w: &mut WireWriter) {
        w.count(self.groups.len());
        for g in &self.groups {
            w.string(&g.group_id);
            w.string(&g.state);
            w.u32(g.members);
        }
    }
}
impl Decode for ListGroupsResponse {
    fn decode(r: &mut WireReader) -> Result<Self, DecodeError> {
        Ok(ListGroupsResponse {
            groups: r
                .array(8, |r| Ok(GroupListing { group_id: r.string()?, state: r.string()?, members: r.u32()? }))?,
        })
    }
}

impl Encode for DescribeGroupsRequest {
    fn encode(&self, w: &mut WireWriter) {
        w.count(self.groups.len());
        for g in &self.groups {
            w.string(g);
        }
    }
}
impl Decode for DescribeGroupsRequest {
    fn decode(r: &mut WireReader) -> Result<Self, DecodeError> {
        Ok(DescribeGroupsRequest { groups: r.array(2, WireReader::string)? })
    }
}
impl Request for DescribeGroupsRequest {
    const API_KEY: ApiKey = ApiKey::DescribeGroups;
    type Response = DescribeGroupsResponse;
}
impl Encode for DescribeGroupsResponse {
    fn encode(&self, w: &mut WireWriter) {
        w.count(self.groups.len());
        for g in &self.groups {
            put_error(w, g.error);
            w.string(&g.group_id);
            w.string(&g.state);
            w.i32(g.generation_id);
            w.count(g.members.len());
            for m in &g.members {
                w.string(&m.member_id);
                w.nullable_string(m.group_instance_id.as_deref());
                w.string(&m.client_id);
                TopicPartitions::put_all(w, &m.assignment);
            }
            w.count(g.offsets.len());
            for o in &g.offsets {
                w.string(&o.topic);
                w.u32(o.partition);
                w.i64(o.committed_offset);
                w.i64(o.log_end_offset);
                w.i64(o.lag);
            }
        }
    }
}
impl Decode for DescribeGroupsResponse {
    fn decode(r: &mut WireReader) -> Result<Self, DecodeError> {
        Ok(DescribeGroupsResponse {
            groups: r.array(18, |r| {
                Ok(GroupDescription {
                    error: get_error(r)?,
                    group_id: r.string()?,
                    state: r.string()?,
                    generation_id: r.i32()?,
                    members: r.array(10, |r| {
                        Ok(MemberDescription {
                            member_id: r.string()?,
                            group_instance_id: r.nullable_string()?,
                            client_id: r.string()?,
                            assignment: TopicPartitions::get_all(r)?,
                        })
                    })?,
                    offsets: r.array(30, |r| {
                        Ok(PartitionLag {
                            topic: r.string()?,
                            partition: r.u32()?,
                            committed_offset: r.i64()?,
                            log_end_offset: r.i64()?,
                            lag: r.i64()?,
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
    fn group_messages_round_trip() {
        let tp = vec![TopicPartitions { topic: "t".into(), partitions: vec![0, 2] }];
        round_trip(&JoinGroupRequest {
            group_id: "g".into(),
            member_id: String::new(),
            group_instance_id: Some("agent-1".into()),
            session_timeout_ms: 10_000,
            rebalance_timeout_ms: 30_000,
            topics: vec!["t".into()],
        });
        round_trip(&JoinGroupResponse {
            error: ErrorCode::None,
            generation_id: 4,
            member_id: "m-1".into(),
            heartbeat_interval_ms: 3000,
            assignment: tp.clone(),
        });
        round_trip(&HeartbeatRequest { group_id: "g".into(), member_id: "m".into(), generation_id: 1 });
        round_trip(&LeaveGroupRequest { group_id: "g".into(), member_id: "m".into() });
        round_trip(&ErrorOnlyResponse { error: ErrorCode::RebalanceInProgress });
        round_trip(&ListGroupsResponse {
            groups: vec![GroupListing { group_id: "g".into(), state: "stable".into(), members: 3 }],
        });
        round_trip(&DescribeGroupsRequest { groups: vec!["g".into()] });
        round_trip(&DescribeGroupsResponse {
            groups: vec![GroupDescription {
                error: ErrorCode::None,
                group_id: "g".into(),
                state: "stable".into(),
                generation_id: 2,
                members: vec![MemberDescription {
                    member_id: "m".into(),
                    group_instance_id: None,
                    client_id: "c".into(),
                    assignment: tp,
                }],
                offsets: vec![PartitionLag {
                    topic: "t".into(),
                    partition: 0,
                    committed_offset: 5,
                    log_end_offset: 9,
                    lag: 4,
                }],
            }],
        });
    }
}
