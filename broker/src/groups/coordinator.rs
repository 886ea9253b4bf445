//! The group coordinator: membership, generations, assignment, and committed offsets.
//!
//! Protocol (eager rebalancing, assignment computed by the broker):
//! 1. A member joins (JoinGroup). A new member, a changed subscription, a member leaving or a
//!    session expiring starts a rebalance: the group enters `rebalancing` and every fetch or
//!    heartbeat on behalf of the group answers `REBALANCE_IN_PROGRESS`.
//! 2. Every member rejoins. When all have (or the rebalance timeout passes, which removes the
//!    stragglers), the generation is bumped, partitions are assigned and each pending join gets
//!    its member's partitions.
//! 3. Fetches and commits carry the generation; a stale one gets `ILLEGAL_GENERATION`, and a
//!    fetch for a partition the member does not own gets `NOT_ASSIGNED`. So two live members never
//!    read the same partition in the same generation.
//!
//! Static members (`group_instance_id`) keep their assignment across restarts: a new incarnation
//! that rejoins a stable group with an unchanged subscription takes over the member's partitions
//! under a new member id, without a rebalance, and the old id is fenced.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use cairn_protocol::messages::groups::{
    GroupDescription, GroupListing, JoinGroupRequest, JoinGroupResponse, MemberDescription, PartitionLag,
    TopicPartitions,
};
use cairn_protocol::ErrorCode;

use super::assignor::{assign, Assignment};
use super::offsets_store::{self, Committed, OffsetKey};
use super::GroupConfig;
use crate::storage::{LogStore, PartitionLog, StorageError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Empty,
    Rebalancing,
    Stable,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Empty => "empty",
            State::Rebalancing => "rebalancing",
            State::Stable => "stable",
        }
    }
}

#[derive(Debug)]
struct Member {
    instance_id: Option<String>,
    client_id: String,
    topics: Vec<String>,
    session_timeout: Duration,
    rebalance_timeout: Duration,
    last_seen: Instant,
    /// Has (re)joined during the current rebalance.
    joined: bool,
}

#[derive(Debug)]
struct Group {
    state: State,
    generation: i32,
    members: BTreeMap<String, Member>,
    assignment: Assignment,
    rebalance_deadline: Option<Instant>,
    changed: Arc<Notify>,
}

impl Group {
    fn new() -> Group {
        Group {
            state: State::Empty,
            generation: 0,
            members: BTreeMap::new(),
            assignment: Assignment::new(),
            rebalance_deadline: None,
            changed: Arc::new(Notify::new()),
        }
    }

    fn start_rebalance(&mut self, now: Instant, max: Duration) {
        if self.state != State::Rebalancing {
            let timeout = self.members.values().map(|m| m.rebalance_timeout).max().unwrap_or(max).min(max);
            self.state = State::Rebalancing;
            self.rebalance_deadline = Some(now + timeout);
            for m in self.members.values_mut() {
                m.joined = false;
            }
            self.changed.notify_waiters();
        }
    }

    /// After members left or expired: an empty group is reset (new generation, no assignment),
    /// otherwise the survivors rebalance.
    fn members_changed(&mut self, now: Instant, max: Duration) {
        if self.members.is_empty() {
            self.state = State::Empty;
            self.assignment.clear();
            self.generation += 1;
            self.changed.notify_waiters();
        } else {
            self.start_rebalance(now, max);
        }
    }

    fn owns(&self, member: &str, topic: &str, partition: u32) -> bool {
        self.assignment.get(member).is_some_and(|tps| tps.iter().any(|(t, p)| t == topic && *p == partition))
    }
}

/// Committed offsets, and how many partitions each group has committed, so that the number of
/// groups with offsets is known without a scan. Read through `Deref`; changed only through
/// [`CommittedOffsets::insert`] and [`CommittedOffsets::remove`], which keep the count.
struct CommittedOffsets {
    by_key: BTreeMap<OffsetKey, Committed>,
    per_group: HashMap<String, usize>,
}

impl CommittedOffsets {
    fn new(by_key: BTreeMap<OffsetKey, Committed>) -> Self {
        let mut per_group: HashMap<String, usize> = HashMap::new();
        for (group, _, _) in by_key.keys() {
            *per_group.entry(group.clone()).or_default() += 1;
        }
        CommittedOffsets { by_key, per_group }
    }

    fn insert(&mut self, key: OffsetKey, value: Committed) {
        // A partition committed before (the usual case) only changes its value.
        if let Some(slot) = self.by_key.get_mut(&key) {
            *slot = value;
            return;
        }
        match self.per_group.get_mut(&key.0) {
            Some(n) => *n += 1,
            None => {
                self.per_group.insert(key.0.clone(), 1);
            }
        }
        self.by_key.insert(key, value);
    }

    fn remove(&mut self, key: &OffsetKey) {
        if self.by_key.remove(key).is_some() {
            if let Some(n) = self.per_group.get_mut(&key.0) {
                *n -= 1;
                if *n == 0 {
                    self.per_group.remove(&key.0);
                }
            }
        }
    }

    /// Whether `group` has committed anything.
    fn has_group(&self, group: &str) -> bool {
        self.per_group.contains_key(group)
    }

    /// Number of groups with committed offsets.
    fn groups(&self) -> usize {
        self.per_group.len()
    }

    /// The groups with committed offsets, each once, without walking their partitions.
    fn group_names(&self) -> impl Iterator<Item = &String> {
        self.per_group.keys()
    }
}

impl std::ops::Deref for CommittedOffsets {
    type Target = BTreeMap<OffsetKey, Committed>;

    fn deref(&self) -> &Self::Target {
        &self.by_key
    }
}

struct Inner {
    groups: HashMap<String, Group>,
    committed: CommittedOffsets,
    /// When each group that had members since the broker started lost its last one (wall
    /// clock, ms): committed offsets expire counting from there or from their last commit.
    emptied_ms: HashMap<String, i64>,
    /// When the broker started (wall clock, ms): the emptied time of groups not seen since.
    started_ms: i64,
}

/// The consumer group coordinator of this broker.
pub struct Coordinator {
    config: GroupConfig,
    inner: Mutex<Inner>,
    offsets_log: Arc<PartitionLog>,
    /// Serialises appends to the offsets log with the in-memory update, so both see the same order.
    commit_lock: Mutex<()>,
    next_member: AtomicU64,
    /// Size of the offsets log right after the last compaction (0 before the first).
    snapshot_len: AtomicU64,
    /// A compaction is running: until it has synced and deleted the old segments, the log is
    /// still past the threshold, and every commit acknowledged meanwhile would start another.
    compacting: AtomicBool,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator").field("config", &self.config).finish_non_exhaustive()
    }
}

/// `(topic, partition, Some((offset, metadata, commit_timestamp_ms)))`, `None` when nothing is committed.
pub type CommittedEntry = (String, u32, Option<OffsetAndMetadata>);

/// `(offset, metadata, commit_timestamp_ms)` of a committed offset.
pub type OffsetAndMetadata = (i64, Option<String>, i64);

/// One partition of an OffsetCommit: `(topic, partition, offset, metadata)`, borrowed from the
/// request (a name copied per partition would let a small request take gigabytes).
pub type CommitEntry<'a> = (&'a str, u32, i64, Option<&'a str>);

/// A commit that was appended and must become durable before it is acknowledged.
pub(crate) struct PendingCommit {
    pub(crate) log: Arc<PartitionLog>,
    pub(crate) offset: u64,
}

/// Committed offsets past their partition's log end: after a power loss cut records that had
/// been read and committed (the log is synced every `flush_interval_ms`, a commit before it is
/// acknowledged). Left there, the next records produced would take those offsets again and the
/// group would skip them. Moves each back to the log end; returns the moved entries.
fn move_back_to_log_ends(
    store: &LogStore,
    committed: &mut BTreeMap<OffsetKey, Committed>,
    now_ms: i64,
) -> Vec<(OffsetKey, Option<Committed>)> {
    let mut moved = Vec::new();
    for (key, c) in committed.iter_mut() {
        let (group, topic, partition) = key;
        let Some(end) = store.partition(topic, *partition).map(|log| log.log_end_offset() as i64) else {
            continue;
        };
        if c.offset > end {
            tracing::warn!(group = %group, topic = %topic, partition, committed = c.offset, log_end_offset = end,
                "committed offset is past the log end (records lost in a crash); moved back to the log end");
            metrics::counter!("cairn_committed_offsets_reset_total").increment(1);
            c.offset = end;
            c.commit_timestamp_ms = now_ms;
            moved.push((key.clone(), Some(c.clone())));
        }
    }
    moved
}

impl Coordinator {
    /// Opens the coordinator: creates or replays `__consumer_offsets`.
    ///
    /// # Errors
    /// Storage failures reading or creating the offsets log.
    pub fn open(store: &LogStore, config: GroupConfig) -> Result<Coordinator, StorageError> {
        let (offsets_log, mut committed) = offsets_store::open(store)?;
        tracing::info!(committed = committed.len(), "loaded committed offsets");
        let moved = move_back_to_log_ends(store, &mut committed, crate::storage::system_clock()());
        if !moved.is_empty() {
            // Stored, so that a later restart (when new records have filled the offsets again)
            // does not bring the old position back.
            offsets_store::append(&offsets_log, &moved, crate::storage::system_clock()())?;
            offsets_log.sync()?;
        }
        Ok(Coordinator {
            config,
            inner: Mutex::new(Inner {
                groups: HashMap::new(),
                committed: CommittedOffsets::new(committed),
                emptied_ms: HashMap::new(),
                started_ms: crate::storage::system_clock()(),
            }),
            offsets_log,
            commit_lock: Mutex::new(()),
            next_member: AtomicU64::new(1),
            snapshot_len: AtomicU64::new(0),
            compacting: AtomicBool::new(false),
        })
    }

    fn new_member_id(&self, client_id: &str) -> String {
        let n = self.next_member.fetch_add(1, Ordering::Relaxed);
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let prefix: String = client_id.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(32).collect();
        format!("{}-{:x}-{n}", if prefix.is_empty() { "member" } else { &prefix }, nanos & 0xffff_ffff)
    }

    /// Handles a join: registers the member and waits for the rebalance it takes part in.
    pub async fn join(&self, mut req: JoinGroupRequest, client_id: String, store: &LogStore) -> JoinGroupResponse {
        let fail = |error, member_id: String| JoinGroupResponse {
            error,
            generation_id: -1,
            member_id,
            heartbeat_interval_ms: 0,
            assignment: Vec::new(),
        };
        if req.group_id.is_empty() || req.group_id.len() > 249 {
            return fail(ErrorCode::InvalidGroupId, req.member_id);
        }
        let c = &self.config;
        // Every rebalance copies and sorts the members' topic lists under the groups lock: a
        // member may not bring an unbounded one (a 16 MiB request holds millions of names).
        if req.topics.len() > c.member_topics_max {
            return fail(ErrorCode::ResourceLimit, req.member_id);
        }
        req.topics.sort_unstable();
        req.topics.dedup();
        if req.topics.iter().any(|t| crate::storage::validate_topic_name(t).is_err()) {
            return fail(ErrorCode::InvalidTopicName, req.member_id);
        }
        if req.session_timeout_ms < c.session_timeout_ms_min || req.session_timeout_ms > c.session_timeout_ms_max {
            return fail(ErrorCode::InvalidSessionTimeout, req.member_id);
        }
        let session_timeout = Duration::from_millis(u64::from(req.session_timeout_ms));
        let rebalance_timeout =
            Duration::from_millis(u64::from(req.rebalance_timeout_ms.clamp(1, c.rebalance_timeout_ms_max)));
        let max_rebalance = Duration::from_millis(u64::from(c.rebalance_timeout_ms_max));
        let member_id;
        {
            let mut inner = self.inner.lock().expect("groups lock");
            if !inner.groups.contains_key(&req.group_id) && inner.groups.len() >= c.groups_max {
                return fail(ErrorCode::ResourceLimit, req.member_id);
            }
            let group = inner.groups.entry(req.group_id.clone()).or_insert_with(Group::new);
            let now = Instant::now();
            let existing = match &req.group_instance_id {
                Some(inst) => {
                    let holder = group
                        .members
                        .iter()
                        .find(|(_, m)| m.instance_id.as_ref() == Some(inst))
                        .map(|(id, _)| id.clone());
                    match holder {
                        // The holder itself, rejoining.
                        Some(id) if id == req.member_id => Some(id),
                        // A new incarnation (a restart, no member id yet): it takes over the
                        // member, assignment included, under a new id, and the old id is gone,
                        // so an old process that still runs cannot read those partitions too.
                        Some(old) if req.member_id.is_empty() => {
                            let id = self.new_member_id(&client_id);
                            let member = group.members.remove(&old).expect("holder present");
                            group.members.insert(id.clone(), member);
                            if let Some(parts) = group.assignment.remove(&old) {
                                group.assignment.insert(id.clone(), parts);
                            }
                            tracing::info!(group = %req.group_id, instance = %inst, old_member = %old, member = %id,
                                "static member rejoined under a new member id; the old one is fenced");
                            Some(id)
                        }
                        // An older incarnation, replaced since.
                        Some(_) => return fail(ErrorCode::FencedInstanceId, req.member_id),
                        None => None,
                    }
                }
                None if !req.member_id.is_empty() => {
                    if !group.members.contains_key(&req.member_id) {
                        return fail(ErrorCode::UnknownMemberId, req.member_id);
                    }
                    Some(req.member_id.clone())
                }
                None => None,
            };
            match existing {
                Some(id) => {
                    let m = group.members.get_mut(&id).expect("member present");
                    let changed = m.topics != req.topics;
                    m.topics = req.topics.clone();
                    m.last_seen = now;
                    m.session_timeout = session_timeout;
                    m.rebalance_timeout = rebalance_timeout;
                    m.client_id = client_id;
                    if group.state == State::Stable && !changed {
                        // Nothing changed: hand back the current assignment, no rebalance.
                        return self.joined_response(group, &id, ErrorCode::None);
                    }
                    if changed {
                        group.start_rebalance(now, max_rebalance);
                    }
                    group.members.get_mut(&id).expect("member present").joined = true;
                    member_id = id;
                }
                None => {
                    if group.members.len() >= c.members_per_group_max {
                        return fail(ErrorCode::ResourceLimit, String::new());
                    }
                    let id = self.new_member_id(&client_id);
                    group.members.insert(
                        id.clone(),
                        Member {
                            instance_id: req.group_instance_id.clone(),
                            client_id,
                            topics: req.topics.clone(),
                            session_timeout,
                            rebalance_timeout,
                            last_seen: now,
                            joined: true,
                        },
                    );
                    let was_rebalancing = group.state == State::Rebalancing;
                    group.start_rebalance(now, max_rebalance);
                    if !was_rebalancing {
                        // start_rebalance cleared every flag; the newcomer has joined.
                        group.members.get_mut(&id).expect("member present").joined = true;
                    }
                    member_id = id;
                }
            }
            tracing::info!(group = %req.group_id, member = %member_id, generation = group.generation, "member joined; rebalancing");
            Self::maybe_complete(group, store, now);
        }
        // Wait for the rebalance to complete (bounded by its deadline, enforced by the reaper).
        loop {
            let notify = {
                let mut inner = self.inner.lock().expect("groups lock");
                let Some(group) = inner.groups.get_mut(&req.group_id) else {
                    return fail(ErrorCode::UnknownMemberId, member_id);
                };
                if !group.members.contains_key(&member_id) {
                    return fail(ErrorCode::UnknownMemberId, member_id);
                }
                if group.state == State::Stable {
                    return self.joined_response(group, &member_id, ErrorCode::None);
                }
                if let Some(m) = group.members.get_mut(&member_id) {
                    // Re-arm after a rebalance restarted while we waited.
                    m.joined = true;
                    m.last_seen = Instant::now();
                }
                Self::maybe_complete(group, store, Instant::now());
                if group.state == State::Stable {
                    return self.joined_response(group, &member_id, ErrorCode::None);
                }
                Arc::clone(&group.changed)
            };
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Re-check after arming, then wait (the reaper also wakes us at the deadline).
            let stable = {
                let inner = self.inner.lock().expect("groups lock");
                inner.groups.get(&req.group_id).is_some_and(|g| g.state == State::Stable)
            };
            if !stable {
                let _ = tokio::time::timeout(Duration::from_millis(500), notified).await;
            }
        }
    }

    fn joined_response(&self, group: &Group, member_id: &str, error: ErrorCode) -> JoinGroupResponse {
        let session = group.members.get(member_id).map_or(Duration::from_secs(10), |m| m.session_timeout);
        JoinGroupResponse {
            error,
            generation_id: group.generation,
            member_id: member_id.to_owned(),
            heartbeat_interval_ms: (session.as_millis() / 3).max(100) as u32,
            assignment: to_topic_partitions(group.assignment.get(member_id).map(Vec::as_slice).unwrap_or(&[])),
        }
    }

    /// Completes the rebalance if every member has rejoined or the deadline passed. The
    /// subscribed topics' partition counts are read from `store` now, not when a join arrived:
    /// a topic created during the rebalance (whose `topic_changed` found it running) is in it.
    fn maybe_complete(group: &mut Group, store: &LogStore, now: Instant) {
        if group.state != State::Rebalancing {
            return;
        }
        let all_joined = group.members.values().all(|m| m.joined);
        let expired = group.rebalance_deadline.is_some_and(|d| now >= d);
        if !all_joined && !expired {
            return;
        }
        if expired && !all_joined {
            let stragglers: Vec<String> =
                group.members.iter().filter(|(_, m)| !m.joined).map(|(id, _)| id.clone()).collect();
            for id in stragglers {
                tracing::warn!(member = %id, "removed from group: did not rejoin within the rebalance timeout");
                group.members.remove(&id);
            }
        }
        let subscriptions: BTreeMap<String, Vec<String>> =
            group.members.iter().map(|(id, m)| (id.clone(), m.topics.clone())).collect();
        let partitions: HashMap<String, u32> = subscriptions
            .values()
            .flatten()
            .filter_map(|t| store.topic(t).map(|topic| (t.clone(), topic.partitions.len() as u32)))
            .collect();
        group.assignment = assign(&subscriptions, &partitions, &group.assignment);
        group.generation += 1;
        group.state = if group.members.is_empty() { State::Empty } else { State::Stable };
        group.rebalance_deadline = None;
        for m in group.members.values_mut() {
            m.joined = false;
            m.last_seen = now;
        }
        tracing::info!(generation = group.generation, members = group.members.len(), "rebalance complete");
        group.changed.notify_waiters();
    }

    /// Expires members whose session lapsed and completes rebalances past their deadline.
    /// Called periodically by the broker.
    pub fn tick(&self, store: &LogStore) {
        let now = Instant::now();
        let now_ms = crate::storage::system_clock()();
        let max = Duration::from_millis(u64::from(self.config.rebalance_timeout_ms_max));
        let mut inner = self.inner.lock().expect("groups lock");
        for (name, group) in inner.groups.iter_mut() {
            let expired: Vec<String> = group
                .members
                .iter()
                .filter(|(_, m)| {
                    !(group.state == State::Rebalancing && m.joined)
                        && now.duration_since(m.last_seen) > m.session_timeout
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in &expired {
                tracing::warn!(group = %name, member = %id, "member session expired; rebalancing");
                group.members.remove(id);
            }
            if !expired.is_empty() {
                group.members_changed(now, max);
            }
            Self::maybe_complete(group, store, now);
        }
        // Forget membership state of groups nobody belongs to (their commits stay, until they
        // expire: see `expire_offsets`).
        let Inner { groups, emptied_ms, committed, .. } = &mut *inner;
        groups.retain(|name, g| {
            // Only a group with offsets needs its emptied time (bounded by the offsets, then).
            if g.members.is_empty() && committed.has_group(name) {
                emptied_ms.insert(name.clone(), now_ms);
            }
            !g.members.is_empty()
        });
    }

    /// Heartbeat: keeps the member alive and tells it whether to rejoin.
    pub fn heartbeat(&self, group_id: &str, member_id: &str, generation: i32) -> ErrorCode {
        let mut inner = self.inner.lock().expect("groups lock");
        let Some(group) = inner.groups.get_mut(group_id) else {
            return ErrorCode::UnknownMemberId;
        };
        let state = group.state;
        let current = group.generation;
        let Some(m) = group.members.get_mut(member_id) else {
            return ErrorCode::UnknownMemberId;
        };
        m.last_seen = Instant::now();
        if state == State::Rebalancing {
            return ErrorCode::RebalanceInProgress;
        }
        if generation != current {
            return ErrorCode::IllegalGeneration;
        }
        ErrorCode::None
    }

    /// A clean leave: the member's partitions move at once.
    pub fn leave(&self, group_id: &str, member_id: &str) -> ErrorCode {
        let max = Duration::from_millis(u64::from(self.config.rebalance_timeout_ms_max));
        let mut inner = self.inner.lock().expect("groups lock");
        let Some(group) = inner.groups.get_mut(group_id) else {
            return ErrorCode::UnknownMemberId;
        };
        if group.members.remove(member_id).is_none() {
            return ErrorCode::UnknownMemberId;
        }
        tracing::info!(group = %group_id, member = %member_id, "member left");
        group.assignment.remove(member_id);
        group.members_changed(Instant::now(), max);
        ErrorCode::None
    }

    /// Whether a member may fetch a partition now.
    pub fn check_fetch(
        &self,
        group_id: &str,
        member_id: &str,
        generation: i32,
        topic: &str,
        partition: u32,
    ) -> ErrorCode {
        let inner = self.inner.lock().expect("groups lock");
        owner_check(inner.groups.get(group_id), member_id, generation, topic, partition, true)
    }

    fn check_commit(
        &self,
        inner: &Inner,
        group_id: &str,
        member_id: &str,
        generation: i32,
        topic: &str,
        partition: u32,
    ) -> ErrorCode {
        let group = inner.groups.get(group_id);
        if generation == -1 && member_id.is_empty() {
            // A commit outside membership is only allowed while no member owns anything.
            return match group {
                Some(g) if !g.members.is_empty() => ErrorCode::UnknownMemberId,
                _ => ErrorCode::None,
            };
        }
        // A member may commit during a rebalance, with its current generation, for what it owns.
        owner_check(group, member_id, generation, topic, partition, false)
    }

    /// Validates and appends commits. Returns per-partition codes and, if anything was appended,
    /// what must become durable before the acknowledgement. Partitions missing from `store` are
    /// refused under the commit lock, which topic deletion takes to forget a topic's offsets:
    /// a commit that raced a deletion is either forgotten with the topic or refused.
    pub(crate) fn commit(
        &self,
        store: &LogStore,
        group_id: &str,
        member_id: &str,
        generation: i32,
        entries: &[CommitEntry<'_>],
        now_ms: i64,
    ) -> Result<(Vec<ErrorCode>, Option<PendingCommit>), StorageError> {
        if group_id.is_empty() || group_id.len() > 249 {
            return Ok((vec![ErrorCode::InvalidGroupId; entries.len()], None));
        }
        let _serial = self.commit_lock.lock().expect("commit lock");
        let mut codes = Vec::with_capacity(entries.len());
        let mut accepted: Vec<(OffsetKey, Option<Committed>)> = Vec::new();
        // A partition named more than once is stored once, with its last offset: what is
        // appended is bounded by the partitions that exist, not by the request's length.
        let mut slot: HashMap<(&str, u32), usize> = HashMap::new();
        {
            let inner = self.inner.lock().expect("groups lock");
            // A group without members that would be new to the offsets, past groups_max: each
            // took memory and a place in every snapshot, without limit.
            let over_limit = !inner.groups.contains_key(group_id)
                && !inner.committed.has_group(group_id)
                && inner.committed.groups() >= self.config.groups_max;
            for &(topic, partition, offset, metadata) in entries {
                let mut code = self.check_commit(&inner, group_id, member_id, generation, topic, partition);
                if code.is_ok() && over_limit {
                    code = ErrorCode::ResourceLimit;
                }
                if code.is_ok() && store.partition(topic, partition).is_none() {
                    code = ErrorCode::UnknownTopicOrPartition;
                }
                if code.is_ok() && metadata.is_some_and(|m| m.len() > self.config.offset_metadata_bytes_max) {
                    code = ErrorCode::OffsetMetadataTooLarge;
                }
                if code.is_ok() && offset < 0 {
                    code = ErrorCode::InvalidRequest;
                }
                if code.is_ok() {
                    let value =
                        Some(Committed { offset, commit_timestamp_ms: now_ms, metadata: metadata.map(str::to_owned) });
                    match slot.get(&(topic, partition)) {
                        Some(&i) => accepted[i].1 = value,
                        None => {
                            slot.insert((topic, partition), accepted.len());
                            accepted.push(((group_id.to_owned(), topic.to_owned(), partition), value));
                        }
                    }
                }
                codes.push(code);
            }
        }
        if accepted.is_empty() {
            return Ok((codes, None));
        }
        let next_offset = offsets_store::append(&self.offsets_log, &accepted, now_ms)?;
        let mut inner = self.inner.lock().expect("groups lock");
        for (key, value) in accepted {
            if let Some(v) = value {
                inner.committed.insert(key, v);
            }
        }
        Ok((codes, Some(PendingCommit { log: Arc::clone(&self.offsets_log), offset: next_offset })))
    }

    /// Everything a group has committed.
    pub fn committed(&self, group_id: &str) -> Vec<CommittedEntry> {
        let inner = self.inner.lock().expect("groups lock");
        inner
            .committed
            .range((group_id.to_owned(), String::new(), 0)..)
            .take_while(|((g, _, _), _)| g == group_id)
            .map(|((_, t, p), c)| (t.clone(), *p, Some((c.offset, c.metadata.clone(), c.commit_timestamp_ms))))
            .collect()
    }

    /// What a group has committed for the given partitions of one topic, in their order.
    pub fn committed_of(&self, group_id: &str, topic: &str, partitions: &[u32]) -> Vec<Option<OffsetAndMetadata>> {
        // One key for the whole topic: no key allocated per partition under the lock (the
        // handler asks for each partition once per request).
        let mut key = (group_id.to_owned(), topic.to_owned(), 0);
        let inner = self.inner.lock().expect("groups lock");
        partitions
            .iter()
            .map(|&p| {
                key.2 = p;
                inner.committed.get(&key).map(|c| (c.offset, c.metadata.clone(), c.commit_timestamp_ms))
            })
            .collect()
    }

    /// A topic was created or deleted: every group with a member subscribed to it rebalances,
    /// so that assignments take in a new topic's partitions and drop a deleted one's (whose
    /// fetches would otherwise fail for ever).
    pub fn topic_changed(&self, topic: &str) {
        let max = Duration::from_millis(u64::from(self.config.rebalance_timeout_ms_max));
        let now = Instant::now();
        let mut inner = self.inner.lock().expect("groups lock");
        for (name, group) in inner.groups.iter_mut() {
            if group.members.values().any(|m| m.topics.iter().any(|t| t == topic)) {
                tracing::info!(group = %name, topic, "subscribed topic created or deleted; rebalancing");
                group.start_rebalance(now, max);
            }
        }
    }

    /// Drops the committed offsets of groups without members whose last commit and last member
    /// are both older than `offsets_retention_ms` (memory and log). Returns how many went.
    ///
    /// Decided and removed under both locks: a commit cannot slip in between, and a join that
    /// comes after sees the group without offsets (its members start at `auto_offset_reset`).
    /// The removals are appended to the offsets log and synced (blocking: call it off the
    /// runtime's threads), so that a crash cannot bring back offsets a consumer has already
    /// been told are gone.
    pub fn expire_offsets(&self, now_ms: i64) -> usize {
        let retention = i64::try_from(self.config.offsets_retention_ms).unwrap_or(i64::MAX);
        let serial = self.commit_lock.lock().expect("commit lock");
        let doomed: Vec<(OffsetKey, Option<Committed>)> = {
            let mut guard = self.inner.lock().expect("groups lock");
            let Inner { groups, committed, emptied_ms, started_ms } = &mut *guard;
            // Each group's last commit.
            let mut last: BTreeMap<&str, i64> = BTreeMap::new();
            for ((group, _, _), c) in committed.iter() {
                let at = last.entry(group.as_str()).or_insert(i64::MIN);
                *at = (*at).max(c.commit_timestamp_ms);
            }
            // Emptied times matter only while a group has offsets.
            emptied_ms.retain(|group, _| last.contains_key(group.as_str()));
            let expired: BTreeSet<String> = last
                .into_iter()
                .filter(|(group, at)| {
                    // A group is forgotten (and its emptied time taken) by the ticker; until
                    // then, even without members, it counts as live.
                    let live = groups.contains_key(*group);
                    let emptied = emptied_ms.get(*group).copied().unwrap_or(*started_ms);
                    !live && now_ms.saturating_sub((*at).max(emptied)) >= retention
                })
                .map(|(group, _)| group.to_owned())
                .collect();
            let doomed: Vec<_> =
                committed.keys().filter(|(g, _, _)| expired.contains(g)).map(|k| (k.clone(), None)).collect();
            for (key, _) in &doomed {
                committed.remove(key);
            }
            for group in &expired {
                emptied_ms.remove(group);
                tracing::info!(group = %group, retention_ms = retention,
                    "committed offsets expired: no members and no commits within the retention");
            }
            doomed
        };
        if doomed.is_empty() {
            return 0;
        }
        metrics::counter!("cairn_committed_offsets_expired_total").increment(doomed.len() as u64);
        if let Err(e) = offsets_store::append(&self.offsets_log, &doomed, now_ms) {
            tracing::error!(error = %e,
                "could not record expired committed offsets; they return after a restart and expire again");
            return doomed.len();
        }
        drop(serial);
        if let Err(e) = self.offsets_log.sync() {
            tracing::error!(error = %e, "could not sync expired committed offsets");
        }
        doomed.len()
    }

    /// Drops committed offsets of a deleted topic (memory and log), and its partitions from every
    /// group's current assignment: a member still holds its position in the deleted topic and
    /// commits it before it rejoins (with the generation that is ending). Accepted, that position
    /// would become the group's start in a topic recreated under the same name, skipping its
    /// first records; refused (`NOT_ASSIGNED`), the recreated topic is read from
    /// `auto_offset_reset`.
    pub fn forget_topic(&self, topic: &str) {
        let _serial = self.commit_lock.lock().expect("commit lock");
        let doomed: Vec<(OffsetKey, Option<Committed>)> = {
            let mut inner = self.inner.lock().expect("groups lock");
            for group in inner.groups.values_mut() {
                for owned in group.assignment.values_mut() {
                    owned.retain(|(t, _)| t != topic);
                }
            }
            inner.committed.keys().filter(|(_, t, _)| t == topic).map(|k| (k.clone(), None)).collect()
        };
        if doomed.is_empty() {
            return;
        }
        let now = crate::storage::system_clock()();
        if let Err(e) = offsets_store::append(&self.offsets_log, &doomed, now) {
            tracing::error!(topic, error = %e, "could not record removal of a deleted topic's offsets");
            return;
        }
        let mut inner = self.inner.lock().expect("groups lock");
        for (k, _) in doomed {
            inner.committed.remove(&k);
        }
    }

    /// Every group with members or commits.
    pub fn list(&self) -> Vec<GroupListing> {
        let inner = self.inner.lock().expect("groups lock");
        let mut names: BTreeSet<String> = inner.groups.keys().cloned().collect();
        names.extend(inner.committed.group_names().cloned());
        names
            .into_iter()
            .map(|g| {
                let (state, members) =
                    inner.groups.get(&g).map_or((State::Empty, 0), |gr| (gr.state, gr.members.len()));
                GroupListing { group_id: g, state: state.name().to_owned(), members: members as u32 }
            })
            .collect()
    }

    /// Members, assignment, committed offsets and lag of a group.
    pub fn describe(&self, group_id: &str, store: &LogStore) -> GroupDescription {
        let inner = self.inner.lock().expect("groups lock");
        let group = inner.groups.get(group_id);
        let mut partitions: BTreeSet<(String, u32)> = inner
            .committed
            .range((group_id.to_owned(), String::new(), 0)..)
            .take_while(|((g, _, _), _)| g == group_id)
            .map(|((_, t, p), _)| (t.clone(), *p))
            .collect();
        if let Some(g) = group {
            for m in g.members.values() {
                for t in &m.topics {
                    if let Some(topic) = store.topic(t) {
                        partitions.extend((0..topic.partitions.len() as u32).map(|p| (t.clone(), p)));
                    }
                }
            }
        }
        if group.is_none() && partitions.is_empty() {
            return GroupDescription {
                error: ErrorCode::GroupIdNotFound,
                group_id: group_id.to_owned(),
                state: "dead".into(),
                generation_id: -1,
                members: Vec::new(),
                offsets: Vec::new(),
            };
        }
        let offsets = partitions
            .into_iter()
            .map(|(topic, partition)| {
                let committed =
                    inner.committed.get(&(group_id.to_owned(), topic.clone(), partition)).map_or(-1, |c| c.offset);
                let end = store.partition(&topic, partition).map_or(-1, |p| p.log_end_offset() as i64);
                let lag = if committed < 0 || end < 0 { -1 } else { (end - committed).max(0) };
                PartitionLag { topic, partition, committed_offset: committed, log_end_offset: end, lag }
            })
            .collect();
        GroupDescription {
            error: ErrorCode::None,
            group_id: group_id.to_owned(),
            state: group.map_or(State::Empty, |g| g.state).name().to_owned(),
            generation_id: group.map_or(0, |g| g.generation),
            members: group
                .map(|g| {
                    g.members
                        .iter()
                        .map(|(id, m)| MemberDescription {
                            member_id: id.clone(),
                            group_instance_id: m.instance_id.clone(),
                            client_id: m.client_id.clone(),
                            assignment: to_topic_partitions(g.assignment.get(id).map(Vec::as_slice).unwrap_or(&[])),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            offsets,
        }
    }

    /// Publishes committed offset, lag and member gauges. Per partition while there is room
    /// for `series_max` partition series; past that, each (group, topic) gets one series with
    /// `partition="all"` holding the sums (as the partition gauges do), so that no group's lag
    /// is left out.
    pub fn publish_metrics(&self, store: &LogStore, series_max: usize) {
        let inner = self.inner.lock().expect("groups lock");
        let mut series = 0usize;
        let mut entries = inner.committed.iter().peekable();
        while let Some(((group, topic), _)) = entries.peek().map(|((g, t, _), c)| ((g.clone(), t.clone()), c)) {
            // This (group, topic)'s partitions that still exist, with their lag.
            let mut block = Vec::new();
            while let Some(((_, _, partition), c)) = entries.next_if(|((g, t, _), _)| *g == group && *t == topic) {
                if let Some(log) = store.partition(&topic, *partition) {
                    block.push((*partition, c.offset, (log.log_end_offset() as i64 - c.offset).max(0)));
                }
            }
            if series + block.len() <= series_max {
                series += block.len();
                for (partition, offset, lag) in block {
                    let labels =
                        [("group", group.clone()), ("topic", topic.clone()), ("partition", partition.to_string())];
                    metrics::gauge!("cairn_consumer_group_committed_offset", &labels).set(offset as f64);
                    metrics::gauge!("cairn_consumer_group_lag", &labels).set(lag as f64);
                }
            } else if !block.is_empty() {
                let labels = [("group", group.clone()), ("topic", topic.clone()), ("partition", "all".to_owned())];
                let offsets: i64 = block.iter().map(|(_, o, _)| o).sum();
                let lag: i64 = block.iter().map(|(_, _, l)| l).sum();
                metrics::gauge!("cairn_consumer_group_committed_offset", &labels).set(offsets as f64);
                metrics::gauge!("cairn_consumer_group_lag", &labels).set(lag as f64);
            }
        }
        let mut names: BTreeSet<&String> = inner.groups.keys().collect();
        names.extend(inner.committed.group_names());
        for g in names {
            let members = inner.groups.get(g).map_or(0, |gr| gr.members.len());
            metrics::gauge!("cairn_consumer_group_members", "group" => g.clone()).set(members as f64);
        }
    }

    /// Keeps the offsets log from growing without bound: past `snapshot_bytes`, and once it is
    /// at least twice as large as right after the last compaction, rewrites the current state
    /// into a fresh segment and deletes every earlier segment. The doubling keeps the rewrite's
    /// cost proportional to the commits since the last one, even when the live state alone is
    /// larger than `snapshot_bytes`. Returns whether it compacted; a call made while another
    /// compaction runs returns `false` at once.
    ///
    /// # Errors
    /// Storage failures; the old segments are kept then.
    pub fn compact_offsets(&self, snapshot_bytes: u64) -> Result<bool, StorageError> {
        let due = || {
            let threshold = snapshot_bytes.max(self.snapshot_len.load(Ordering::Acquire).saturating_mul(2));
            self.offsets_log.size_bytes() >= threshold
        };
        if !due() || self.compacting.swap(true, Ordering::AcqRel) {
            return Ok(false);
        }
        /// Clears `compacting` on every way out, errors included.
        struct Running<'a>(&'a AtomicBool);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _running = Running(&self.compacting);
        // Again: a compaction that finished between the check above and the flag has moved it.
        if !due() {
            return Ok(false);
        }
        let (state, start) = {
            // The snapshot must precede every commit made after it was taken; the sync need not
            // hold commits up (they run on the server's threads), as it also covers them.
            let _serial = self.commit_lock.lock().expect("commit lock");
            let state: Vec<(OffsetKey, Option<Committed>)> = {
                let inner = self.inner.lock().expect("groups lock");
                inner.committed.iter().map(|(k, v)| (k.clone(), Some(v.clone()))).collect()
            };
            let start = self.offsets_log.roll_now()?;
            offsets_store::append(&self.offsets_log, &state, crate::storage::system_clock()())?;
            (state, start)
        };
        self.offsets_log.sync()?;
        let removed = self.offsets_log.delete_segments_below(start)?;
        self.snapshot_len.store(self.offsets_log.size_bytes(), Ordering::Release);
        tracing::info!(
            entries = state.len(),
            segments = removed.segments,
            bytes = removed.bytes,
            "compacted committed offsets"
        );
        Ok(true)
    }
}

/// The member exists, its generation is current (and, for fetches, no rebalance is under way),
/// and it owns the partition.
fn owner_check(
    group: Option<&Group>,
    member_id: &str,
    generation: i32,
    topic: &str,
    partition: u32,
    fetching: bool,
) -> ErrorCode {
    let Some(group) = group else { return ErrorCode::UnknownMemberId };
    if !group.members.contains_key(member_id) {
        return ErrorCode::UnknownMemberId;
    }
    if fetching && group.state == State::Rebalancing {
        return ErrorCode::RebalanceInProgress;
    }
    if generation != group.generation {
        return ErrorCode::IllegalGeneration;
    }
    if !group.owns(member_id, topic, partition) {
        return ErrorCode::NotAssigned;
    }
    ErrorCode::None
}

fn to_topic_partitions(tps: &[(String, u32)]) -> Vec<TopicPartitions> {
    let mut out: Vec<TopicPartitions> = Vec::new();
    for (t, p) in tps {
        match out.last_mut() {
            Some(last) if &last.topic == t => last.partitions.push(*p),
            _ => out.push(TopicPartitions { topic: t.clone(), partitions: vec![*p] }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{system_clock, StorageConfig};

    /// A join of a new member of `group`, subscribing to `topics`.
    fn new_member(group: &str, topics: Vec<&str>) -> JoinGroupRequest {
        JoinGroupRequest {
            group_id: group.into(),
            member_id: String::new(),
            group_instance_id: None,
            session_timeout_ms: 10_000,
            rebalance_timeout_ms: 10_000,
            topics: topics.into_iter().map(str::to_owned).collect(),
        }
    }

    fn commit_outside_membership(c: &Coordinator, store: &LogStore, group: &str, n: u32, metadata: usize) {
        let m = "m".repeat(metadata);
        let entries: Vec<_> = (0..n).map(|p| ("t", p, 1, Some(m.as_str()))).collect();
        let (codes, pending) = c.commit(store, group, "", -1, &entries, 1).unwrap();
        assert!(codes.iter().all(|c| c.is_ok()), "{codes:?}");
        pending.unwrap().log.sync().unwrap();
    }

    #[tokio::test]
    async fn offsets_of_groups_without_members_expire_after_the_retention_and_stay_gone() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = LogStore::open(dir.path(), StorageConfig::default(), system_clock()).unwrap();
        store.create_topic("t", 2, StorageConfig::default().topic_defaults()).unwrap();
        let config = GroupConfig { offsets_retention_ms: 1_000, ..GroupConfig::default() };
        let c = Coordinator::open(&store, config.clone()).unwrap();
        let started = c.inner.lock().unwrap().started_ms;
        let commit = |group: &str, at: i64| {
            let entries = vec![("t", 0, 5, None), ("t", 1, 7, None)];
            let (codes, _) = c.commit(&store, group, "", -1, &entries, at).unwrap();
            assert!(codes.iter().all(|c| c.is_ok()), "{codes:?}");
        };
        // Committed long ago, but the broker only just started: the clock runs from the start.
        commit("idle", 1);
        commit("recent", started + 900);
        commit("live", 1);
        let join = new_member("live", vec!["t"]);
        assert_eq!(c.join(join, "c".into(), &store).await.error, ErrorCode::None);
        assert_eq!(c.expire_offsets(started + 999), 0, "within the retention of the start");
        assert_eq!(c.expire_offsets(started + 1_000), 2, "the idle group's two offsets");
        assert!(c.committed("idle").is_empty());
        assert_eq!(c.committed("recent").len(), 2, "its last commit is within the retention");
        assert_eq!(c.expire_offsets(started + 1_899), 0);
        assert_eq!(c.expire_offsets(started + 1_900), 2, "the recent group's, a retention after its commit");
        assert_eq!(c.expire_offsets(started + 100_000), 0, "a group with a member keeps its offsets");
        assert_eq!(c.committed("live").len(), 2);
        // The removals are in the log, synced: a restart does not bring the offsets back.
        assert_eq!(c.offsets_log.durable_offset(), c.offsets_log.log_end_offset());
        drop(c);
        let c = Coordinator::open(&store, config).unwrap();
        assert!(c.committed("idle").is_empty());
        assert!(c.committed("recent").is_empty());
        assert_eq!(c.committed("live").len(), 2);
    }

    #[tokio::test]
    async fn a_topic_created_while_a_rebalance_runs_is_in_its_assignment() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = LogStore::open(dir.path(), StorageConfig::default(), system_clock()).unwrap();
        store.create_topic("a", 2, StorageConfig::default().topic_defaults()).unwrap();
        let c = Coordinator::open(&store, GroupConfig::default()).unwrap();
        let member = || JoinGroupRequest { rebalance_timeout_ms: 200, ..new_member("g", vec!["a", "n"]) };
        assert_eq!(c.join(member(), "c".into(), &store).await.error, ErrorCode::None);
        // A second member starts a rebalance that the first never rejoins, so the second's own
        // wait completes it at the deadline. Meanwhile "n" is created; its topic_changed finds
        // the group rebalancing already. The second member's join arrived before "n" existed.
        let (second, ()) = tokio::join!(c.join(member(), "c".into(), &store), async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            store.create_topic("n", 4, StorageConfig::default().topic_defaults()).unwrap();
            c.topic_changed("n");
        });
        assert_eq!(second.error, ErrorCode::None);
        let assigned: Vec<u32> =
            second.assignment.iter().filter(|t| t.topic == "n").flat_map(|t| t.partitions.clone()).collect();
        assert_eq!(assigned, vec![0, 1, 2, 3], "every partition of the new topic is assigned");
    }

    #[tokio::test]
    async fn a_group_whose_last_member_left_keeps_its_offsets_for_a_retention_from_then() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = LogStore::open(dir.path(), StorageConfig::default(), system_clock()).unwrap();
        store.create_topic("t", 1, StorageConfig::default().topic_defaults()).unwrap();
        let c =
            Coordinator::open(&store, GroupConfig { offsets_retention_ms: 1_000, ..GroupConfig::default() }).unwrap();
        let (codes, _) = c.commit(&store, "g", "", -1, &[("t", 0, 5, None)], 1).unwrap();
        assert!(codes[0].is_ok());
        // Time enough since the start that, counted from the start, the offsets would expire.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let join = new_member("g", vec!["t"]);
        let joined = c.join(join, "c".into(), &store).await;
        assert_eq!(joined.error, ErrorCode::None);
        let far = system_clock()() + 3_600_000;
        assert_eq!(c.expire_offsets(far), 0, "a group with a member keeps its offsets");
        let before = system_clock()();
        assert_eq!(c.leave("g", &joined.member_id), ErrorCode::None);
        assert_eq!(c.expire_offsets(far), 0, "the last member left, but the ticker has not seen it yet");
        c.tick(&store);
        let after = system_clock()();
        assert_eq!(c.expire_offsets(before + 999), 0, "within the retention of the leave");
        assert_eq!(c.expire_offsets(after + 1_000), 1);
    }

    #[test]
    fn compaction_waits_for_the_log_to_double_before_rewriting_it_again() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = LogStore::open(dir.path(), StorageConfig::default(), system_clock()).unwrap();
        store.create_topic("t", 100, StorageConfig::default().topic_defaults()).unwrap();
        let c = Coordinator::open(&store, GroupConfig::default()).unwrap();
        // A live state of about 400 KiB, larger than the snapshot threshold used here.
        commit_outside_membership(&c, &store, "g", 100, 4000);
        let snapshot_bytes = 64 * 1024;
        assert!(c.compact_offsets(snapshot_bytes).unwrap(), "past the threshold: compacted");
        // One more small commit: the log is still about the size of the live state.
        commit_outside_membership(&c, &store, "g", 1, 10);
        assert!(!c.compact_offsets(snapshot_bytes).unwrap(), "a commit must not rewrite the whole state each time");
        // Once the log has doubled since the snapshot, it is compacted again.
        commit_outside_membership(&c, &store, "g", 100, 4000);
        assert!(c.compact_offsets(snapshot_bytes).unwrap());
    }

    /// A coordinator with 100 partitions committed (about 400 KiB, past a 64 KiB snapshot
    /// threshold), and the offsets log's end offset after them.
    fn hundred_committed_partitions() -> (tempfile::TempDir, LogStore, Arc<Coordinator>, u64) {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = LogStore::open(dir.path(), StorageConfig::default(), system_clock()).unwrap();
        store.create_topic("t", 100, StorageConfig::default().topic_defaults()).unwrap();
        let c = Arc::new(Coordinator::open(&store, GroupConfig::default()).unwrap());
        commit_outside_membership(&c, &store, "g", 100, 4000);
        let before = c.offsets_log.log_end_offset();
        (dir, store, c, before)
    }

    /// Starts a compaction on its own thread and returns once it has appended its snapshot (one
    /// record per committed partition after `before`); with syncs held, it then waits there.
    fn compaction_up_to_its_sync(
        c: &Arc<Coordinator>,
        before: u64,
    ) -> std::thread::JoinHandle<Result<bool, StorageError>> {
        let compactor = {
            let c = Arc::clone(c);
            std::thread::spawn(move || c.compact_offsets(64 * 1024))
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while c.offsets_log.log_end_offset() < before + 100 {
            assert!(Instant::now() < deadline, "compaction never appended its snapshot");
            std::thread::sleep(Duration::from_millis(5));
        }
        compactor
    }

    #[test]
    fn a_compaction_asked_for_while_one_runs_is_skipped_not_run_again() {
        let (_dir, _store, c, before) = hundred_committed_partitions();
        let slow_disk = c.offsets_log.hold_syncs();
        let first = compaction_up_to_its_sync(&c, before);
        // Every acknowledged commit asks for a compaction; the log is still past the threshold
        // until the running one has synced and deleted the old segments.
        let (tx, rx) = std::sync::mpsc::channel();
        let second = {
            let c = Arc::clone(&c);
            std::thread::spawn(move || tx.send(c.compact_offsets(64 * 1024).map_err(|e| e.to_string())).unwrap())
        };
        let outcome = rx.recv_timeout(Duration::from_secs(10));
        drop(slow_disk);
        second.join().unwrap();
        assert_eq!(outcome.expect("the second compaction waited for the first"), Ok(false));
        assert!(first.join().unwrap().unwrap(), "the first compacted");
        assert_eq!(c.offsets_log.log_end_offset(), before + 100, "one snapshot, not two");
    }

    #[test]
    fn commits_go_on_while_compaction_waits_for_its_sync() {
        let (dir, store, c, before) = hundred_committed_partitions();
        // A disk that takes its time: the compaction's sync waits until `slow_disk` is dropped.
        let slow_disk = c.offsets_log.hold_syncs();
        let compactor = compaction_up_to_its_sync(&c, before);
        let codes = std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::channel();
            let (c, store) = (&c, &store);
            scope.spawn(move || {
                let entries = vec![("t", 7, 0, None)];
                tx.send(c.commit(store, "h", "", -1, &entries, 2).map(|(codes, _)| codes)).unwrap();
            });
            // Commits run on the server's runtime threads: one waiting out a compaction's fsync
            // would stall every connection on that thread.
            let codes = rx.recv_timeout(Duration::from_secs(10));
            drop(slow_disk);
            codes
        });
        let codes = codes.expect("a commit waited for the compaction's sync").unwrap();
        assert_eq!(codes, vec![ErrorCode::None]);
        assert!(compactor.join().unwrap().unwrap(), "compacted");
        c.offsets_log.sync().unwrap();
        // The commit made during the compaction survives it, after the snapshot.
        drop(c);
        drop(store);
        let (store, _) = LogStore::open(dir.path(), StorageConfig::default(), system_clock()).unwrap();
        let c = Coordinator::open(&store, GroupConfig::default()).unwrap();
        // (Offsets past the empty partitions' ends come back at their ends, 0.)
        let got = c.committed("h");
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].2.as_ref().map(|e| e.0), Some(0));
        assert_eq!(c.committed("g").len(), 100, "the snapshot's entries");
    }

    /// Commits group "a", then group "b", then three large commits of group "c" (one batch each),
    /// and closes the store cleanly. The next open trusts the log up to its last index entry,
    /// after the first two: damage there is found by whoever reads it, not by recovery. Returns
    /// the offsets log's file.
    fn two_commits_then_clean_close(dir: &std::path::Path) -> std::path::PathBuf {
        let (store, _) = LogStore::open(dir, StorageConfig::default(), system_clock()).unwrap();
        store.create_topic("t", 2, StorageConfig::default().topic_defaults()).unwrap();
        let c = Coordinator::open(&store, GroupConfig::default()).unwrap();
        let large = "m".repeat(4000);
        for group in ["a", "b", "c", "c", "c"] {
            let entries: Vec<CommitEntry<'_>> = if group == "c" {
                vec![("t", 0, 0, Some(large.as_str())), ("t", 1, 0, Some(large.as_str()))]
            } else {
                vec![("t", 0, 0, Some(group))]
            };
            let (codes, pending) = c.commit(&store, group, "", -1, &entries, 1).unwrap();
            assert!(codes.iter().all(|c| c.is_ok()), "{codes:?}");
            pending.unwrap().log.sync().unwrap();
        }
        drop(c);
        store.close().unwrap();
        dir.join(format!("{}-0", offsets_store::OFFSETS_TOPIC)).join(format!("{:020}.log", 0))
    }

    fn flip_byte(path: &std::path::Path, at: u64) {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
        let mut b = [0u8];
        f.seek(SeekFrom::Start(at)).unwrap();
        f.read_exact(&mut b).unwrap();
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&[b[0] ^ 0x5a]).unwrap();
        f.sync_all().unwrap();
    }

    #[test]
    fn a_damaged_commit_in_the_offsets_log_is_skipped_and_the_rest_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let log = two_commits_then_clean_close(dir.path());
        // A byte of group "a"'s record (after the 16-byte file header and the 61-byte batch
        // header): the batch fails its CRC. The broker used to refuse to start.
        flip_byte(&log, 16 + 61 + 10);
        let (store, _) = LogStore::open(dir.path(), StorageConfig::default(), system_clock()).unwrap();
        let c = Coordinator::open(&store, GroupConfig::default()).expect("starts despite the damaged batch");
        assert!(c.committed("a").is_empty(), "the damaged commit is not served");
        let b = c.committed("b");
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].2.as_ref().map(|e| (e.0, e.1.clone())), Some((0, Some("b".to_string()))));
        // Commits go on, after the damaged batch, and are there after the next start.
        let (codes, pending) = c.commit(&store, "a", "", -1, &[("t", 0, 0, Some("again"))], 2).unwrap();
        assert!(codes[0].is_ok());
        pending.unwrap().log.sync().unwrap();
        drop(c);
        store.close().unwrap();
        drop(store);
        let (store, _) = LogStore::open(dir.path(), StorageConfig::default(), system_clock()).unwrap();
        let c = Coordinator::open(&store, GroupConfig::default()).unwrap();
        assert_eq!(c.committed("a")[0].2.as_ref().and_then(|e| e.1.clone()), Some("again".to_string()));
        assert_eq!(c.committed("b").len(), 1);
        assert_eq!(c.committed("c").len(), 2);
    }

    #[test]
    fn an_unreadable_stretch_of_the_offsets_log_is_skipped_and_the_broker_starts() {
        let dir = tempfile::tempdir().unwrap();
        let log = two_commits_then_clean_close(dir.path());
        // The first batch's length field: no batch boundary after it can be found in this
        // segment, so the rest of it is skipped.
        flip_byte(&log, 16 + 8);
        let (store, _) = LogStore::open(dir.path(), StorageConfig::default(), system_clock()).unwrap();
        let c = Coordinator::open(&store, GroupConfig::default()).expect("starts despite the damaged segment");
        assert!(c.committed("a").is_empty());
        assert!(c.committed("b").is_empty());
        assert!(c.committed("c").is_empty());
        let (codes, pending) = c.commit(&store, "b", "", -1, &[("t", 0, 0, None)], 2).unwrap();
        assert!(codes[0].is_ok());
        pending.unwrap().log.sync().unwrap();
    }

    #[tokio::test]
    async fn commits_outside_membership_cannot_add_groups_past_groups_max() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = LogStore::open(dir.path(), StorageConfig::default(), system_clock()).unwrap();
        store.create_topic("t", 2, StorageConfig::default().topic_defaults()).unwrap();
        let c = Coordinator::open(&store, GroupConfig { groups_max: 2, ..GroupConfig::default() }).unwrap();
        let commit = |group: &str, member: &str, generation: i32| {
            c.commit(&store, group, member, generation, &[("t", 0, 0, None)], 1).unwrap().0[0]
        };
        assert_eq!(commit("a", "", -1), ErrorCode::None);
        assert_eq!(commit("b", "", -1), ErrorCode::None);
        // Each new group id took memory and a place in every snapshot, without limit.
        assert_eq!(commit("c", "", -1), ErrorCode::ResourceLimit);
        assert!(c.committed("c").is_empty());
        assert_eq!(commit("a", "", -1), ErrorCode::None, "a group with offsets commits on");
        // A group with members (within groups_max of its own) commits whatever the count.
        let joined = c.join(new_member("live", vec!["t"]), "c".into(), &store).await;
        assert_eq!(joined.error, ErrorCode::None);
        assert_eq!(commit("live", &joined.member_id, joined.generation_id), ErrorCode::None);
        // Once a group's offsets are gone, its place is free again.
        store.delete_topic("t").unwrap();
        c.forget_topic("t");
        store.create_topic("t", 2, StorageConfig::default().topic_defaults()).unwrap();
        assert_eq!(commit("c", "", -1), ErrorCode::None);
    }

    #[test]
    fn a_partition_named_many_times_in_one_commit_is_stored_once_with_its_last_offset() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = LogStore::open(dir.path(), StorageConfig::default(), system_clock()).unwrap();
        store.create_topic("t", 2, StorageConfig::default().topic_defaults()).unwrap();
        let c = Coordinator::open(&store, GroupConfig::default()).unwrap();
        let before = c.offsets_log.log_end_offset();
        let mut entries: Vec<CommitEntry<'_>> = (0..10_000).map(|i| ("t", 0, i, None)).collect();
        entries.push(("t", 1, 3, None));
        let (codes, _) = c.commit(&store, "g", "", -1, &entries, 1).unwrap();
        assert_eq!(codes.len(), entries.len());
        assert!(codes.iter().all(|c| c.is_ok()), "every occurrence is answered");
        assert_eq!(c.offsets_log.log_end_offset() - before, 2, "one record per partition");
        let got = c.committed_of("g", "t", &[1, 0, 0]);
        let offsets: Vec<_> = got.iter().map(|e| e.as_ref().map(|e| e.0)).collect();
        assert_eq!(offsets, vec![Some(3), Some(9_999), Some(9_999)]);
    }

    #[test]
    fn a_commit_that_reaches_the_lock_after_its_topic_was_deleted_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = LogStore::open(dir.path(), StorageConfig::default(), system_clock()).unwrap();
        store.create_topic("t", 1, StorageConfig::default().topic_defaults()).unwrap();
        let c = Coordinator::open(&store, GroupConfig::default()).unwrap();
        // The handler saw the partition; then DeleteTopics ran in full before the commit took
        // the commit lock.
        store.delete_topic("t").unwrap();
        c.forget_topic("t");
        let entries = vec![("t", 0, 50_000, None)];
        let (codes, pending) = c.commit(&store, "g", "", -1, &entries, 1).unwrap();
        assert_eq!(codes, vec![ErrorCode::UnknownTopicOrPartition]);
        assert!(pending.is_none(), "nothing appended");
        // Left there, a recreated "t" would have its first 50,000 records skipped by the group.
        assert!(c.committed("g").is_empty());
    }

    #[tokio::test]
    async fn a_join_with_too_many_or_empty_topic_names_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = LogStore::open(dir.path(), StorageConfig::default(), system_clock()).unwrap();
        let c = Coordinator::open(&store, GroupConfig { member_topics_max: 3, ..GroupConfig::default() }).unwrap();
        let join = |topics| new_member("g", topics);
        let r = c.join(join(vec!["a", "b", "c", "d"]), "c".into(), &store).await;
        assert_eq!(r.error, ErrorCode::ResourceLimit);
        let r = c.join(join(vec!["a", ""]), "c".into(), &store).await;
        assert_eq!(r.error, ErrorCode::InvalidTopicName);
        assert!(c.list().is_empty(), "no group was created for a refused join");
    }

    #[test]
    fn past_the_series_cap_lag_is_summed_per_group_and_topic_not_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = LogStore::open(dir.path(), StorageConfig::default(), system_clock()).unwrap();
        let topic = store.create_topic("t", 2, StorageConfig::default().topic_defaults()).unwrap();
        for p in &topic.partitions {
            let mut b = cairn_protocol::RecordBatchBuilder::new();
            for _ in 0..10 {
                b.push(1_700_000_000_000, None, Some(b"v"), &[]);
            }
            p.append(&b.build()).unwrap();
        }
        let c = Coordinator::open(&store, GroupConfig::default()).unwrap();
        for g in ["a", "b"] {
            let entries = vec![("t", 0, 1, None), ("t", 1, 2, None)];
            let (codes, pending) = c.commit(&store, g, "", -1, &entries, 1).unwrap();
            assert!(codes.iter().all(|c| c.is_ok()), "{codes:?}");
            pending.unwrap().log.sync().unwrap();
        }
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        // Room for two partition series: group a's, then group b's lag summed (9 + 8).
        metrics::with_local_recorder(&recorder, || c.publish_metrics(&store, 2));
        let page = recorder.handle().render();
        let lag = |group: &str, partition: &str| {
            let series =
                format!("cairn_consumer_group_lag{{group=\"{group}\",topic=\"t\",partition=\"{partition}\"}} ");
            page.lines().find_map(|l| l.strip_prefix(&series)).map(|v| v.parse::<f64>().unwrap())
        };
        assert_eq!((lag("a", "0"), lag("a", "1")), (Some(9.0), Some(8.0)), "{page}");
        assert_eq!(lag("b", "all"), Some(17.0), "{page}");
        assert_eq!(lag("b", "0"), None, "{page}");
    }
}
