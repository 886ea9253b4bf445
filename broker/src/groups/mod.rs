//! Consumer groups: membership with server-side partition assignment, and committed offsets.

mod assignor;
mod coordinator;
mod offsets_store;

use serde::{Deserialize, Serialize};

pub use coordinator::{CommitEntry, CommittedEntry, Coordinator, OffsetAndMetadata};
pub use offsets_store::OFFSETS_TOPIC;

/// Consumer group settings (`[groups]` in the config file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GroupConfig {
    /// Smallest session timeout a member may ask for. Default 1,000 ms.
    pub session_timeout_ms_min: u32,
    /// Largest session timeout a member may ask for. Default 300,000 ms.
    pub session_timeout_ms_max: u32,
    /// Largest rebalance timeout a member may ask for. Default 300,000 ms.
    pub rebalance_timeout_ms_max: u32,
    /// Longest metadata string stored with a committed offset. Default 4,096 bytes.
    pub offset_metadata_bytes_max: usize,
    /// Most groups with members the broker tracks, and most groups with committed offsets (a
    /// commit outside membership for a group new to the offsets past it fails with
    /// `RESOURCE_LIMIT`). Default 10,000.
    pub groups_max: usize,
    /// Most members per group. Default 1,000.
    pub members_per_group_max: usize,
    /// Most topics one member may subscribe to; a join with more fails with `RESOURCE_LIMIT`.
    /// Default 10,000.
    pub member_topics_max: usize,
    /// When the committed-offsets log grows past this, it is rewritten as a snapshot and the old
    /// segments are deleted. Default 64 MiB.
    pub offsets_snapshot_bytes: u64,
    /// How long an OffsetCommit waits for its fsync, counted from its arrival, before it
    /// answers `REQUEST_TIMED_OUT` (Kafka's `offsets.commit.timeout.ms`). Default 5,000 ms, as
    /// Kafka's: well below clients' 30 s request timeout, so that they hear the answer instead
    /// of timing out first.
    pub offsets_commit_timeout_ms: u64,
    /// A group without members loses its committed offsets once this long has passed since its
    /// last commit and since its last member left (Kafka's `offsets.retention.minutes`), so that
    /// groups nobody uses any more do not pile up. Default 604,800,000 ms (7 days).
    pub offsets_retention_ms: u64,
    /// How often expired offsets are looked for. Default 600,000 ms (10 min).
    pub offsets_retention_check_interval_ms: u64,
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            session_timeout_ms_min: 1_000,
            session_timeout_ms_max: 300_000,
            rebalance_timeout_ms_max: 300_000,
            offset_metadata_bytes_max: 4096,
            groups_max: 10_000,
            members_per_group_max: 1_000,
            member_topics_max: 10_000,
            offsets_snapshot_bytes: 64 * 1024 * 1024,
            offsets_commit_timeout_ms: 5_000,
            offsets_retention_ms: 7 * 24 * 3_600_000,
            offsets_retention_check_interval_ms: 600_000,
        }
    }
}

impl GroupConfig {
    /// Checks ranges.
    ///
    /// # Errors
    /// A message naming the bad key.
    pub fn validate(&self) -> Result<(), String> {
        if self.session_timeout_ms_min == 0 || self.session_timeout_ms_min > self.session_timeout_ms_max {
            return Err("groups.session_timeout_ms_min must be 1..=session_timeout_ms_max".into());
        }
        if self.rebalance_timeout_ms_max == 0 {
            return Err("groups.rebalance_timeout_ms_max must be positive".into());
        }
        if self.offsets_commit_timeout_ms == 0 {
            return Err("groups.offsets_commit_timeout_ms must be positive".into());
        }
        if self.offsets_retention_ms == 0 || self.offsets_retention_check_interval_ms == 0 {
            return Err(
                "groups.offsets_retention_ms and groups.offsets_retention_check_interval_ms must be positive".into()
            );
        }
        if self.groups_max == 0 || self.members_per_group_max == 0 || self.member_topics_max == 0 {
            return Err(
                "groups.groups_max, groups.members_per_group_max and groups.member_topics_max must be positive".into(),
            );
        }
        Ok(())
    }
}
