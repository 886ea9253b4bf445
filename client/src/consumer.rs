//! The consumer: explicit assignment or group membership, seeking, long-poll fetching with the
//! next fetch already in flight, commits, and a `Stream` of records.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;
use tokio::task::JoinHandle;
use tokio_util::task::AbortOnDropHandle;

use cairn_protocol::messages::fetch::{FetchGroup, FetchPartition, FetchRequest, FetchResponse, FetchTopic};
use cairn_protocol::messages::groups::{HeartbeatRequest, JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest};
use cairn_protocol::messages::list_offsets::{
    ListOffsetsPartition, ListOffsetsRequest, ListOffsetsResponse, ListOffsetsTopic, EARLIEST_TIMESTAMP,
    LATEST_TIMESTAMP,
};
use cairn_protocol::messages::metadata::MetadataRequest;
use cairn_protocol::messages::offsets::{
    OffsetCommitPartition, OffsetCommitRequest, OffsetCommitTopic, OffsetFetchRequest, OffsetFetchTopic,
};
use cairn_protocol::record_batch::{BatchSplitter, RecordBatch, RecordIter};
use cairn_protocol::{ErrorCode, Header};

use crate::connection::{Connection, ConnectionConfig};
use crate::error::{Error, Result};

/// Where to start reading a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offset {
    /// The first offset still in the log.
    Earliest,
    /// The log end: only records produced from now on.
    Latest,
    /// An exact offset.
    At(i64),
    /// The first record with a timestamp at or after this (ms since the epoch).
    Timestamp(i64),
}

/// Consumer settings.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Broker connection.
    pub connection: ConnectionConfig,
    /// Consumer group for [`Consumer::subscribe`] and commits.
    pub group: Option<String>,
    /// Static membership id: a restarting member gets its partitions back without a rebalance.
    /// An older process still running with the same id is fenced: its `poll` fails with
    /// `FENCED_INSTANCE_ID`.
    pub group_instance_id: Option<String>,
    /// A member silent for this long is removed from the group. Default 10 s.
    pub session_timeout: Duration,
    /// How long a rebalance waits for members to rejoin: the time a member has to finish the
    /// records of its last `poll` and poll again once a rebalance starts (its heartbeats keep
    /// its session meanwhile). Default 30 s.
    pub rebalance_timeout: Duration,
    /// Where to start when the group has no committed offset (or the offset is out of range).
    /// Default [`Offset::Earliest`]: an agent must not miss state changes.
    pub auto_offset_reset: Offset,
    /// Commit, periodically, before a rebalance and on close, the positions of records returned
    /// by earlier polls (processing a batch and calling `poll` again marks it done:
    /// at-least-once). Default true.
    pub auto_commit: bool,
    /// Auto-commit period. Default 5 s.
    pub auto_commit_interval: Duration,
    /// Longest a fetch is parked at the broker waiting for data. Default 500 ms.
    pub fetch_max_wait: Duration,
    /// Bytes a fetch waits for. Default 1.
    pub fetch_min_bytes: u32,
    /// Upper bound on a fetch response's records. Default 50 MiB.
    pub fetch_max_bytes: u32,
    /// Upper bound per partition per fetch (a larger first batch still comes whole). Default
    /// 256 KiB: a response that fits in a core's L2 cache is still there when `poll` decodes it
    /// (1 MiB responses made a single-partition consumer ~12% slower).
    pub partition_fetch_max_bytes: u32,
    /// Most records one `poll` returns (the rest of a fetch waits, undecoded, for the next
    /// polls). Small enough that a poll's records stay in the CPU cache while they are
    /// processed. Default 500, as Kafka's `max.poll.records`.
    pub max_poll_records: usize,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            connection: ConnectionConfig::default(),
            group: None,
            group_instance_id: None,
            session_timeout: Duration::from_secs(10),
            rebalance_timeout: Duration::from_secs(30),
            auto_offset_reset: Offset::Earliest,
            auto_commit: true,
            auto_commit_interval: Duration::from_secs(5),
            fetch_max_wait: Duration::from_millis(500),
            fetch_min_bytes: 1,
            fetch_max_bytes: 50 * 1024 * 1024,
            partition_fetch_max_bytes: 256 * 1024,
            max_poll_records: 500,
        }
    }
}

/// A consumed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRecord {
    /// Topic (shared by every record of the topic: no allocation per record).
    pub topic: Arc<str>,
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: i64,
    /// Timestamp, ms since the epoch.
    pub timestamp: i64,
    /// Key.
    pub key: Option<Bytes>,
    /// Value.
    pub value: Option<Bytes>,
    /// Headers.
    pub headers: Vec<Header>,
}

type TopicPartition = (String, u32);

/// Next offsets to consume, per partition: what a commit stores.
type Offsets = BTreeMap<TopicPartition, i64>;

/// Batches fetched for one partition and not yet handed out by `poll`.
#[derive(Debug)]
struct Fetched {
    topic: Arc<str>,
    key: TopicPartition,
    /// The first offset not yet handed out.
    next: i64,
    batches: VecDeque<RecordBatch>,
    /// The batch being decoded.
    current: Option<RecordIter<RecordBatch>>,
}

/// A fetch in flight and the offsets it asked for.
type InFlightFetch = (JoinHandle<Result<FetchResponse>>, BTreeMap<TopicPartition, i64>);

/// An empty answer this quick was not parked by the broker (`parked_fetches_max`): the next
/// fetch waits out the rest of `fetch_max_wait` instead of asking again at once.
const UNPARKED_ANSWER_MAX: Duration = Duration::from_millis(100);

/// A ListOffsets lookup under way, with the partitions it asks about and the seek each was for.
type Lookup = (JoinHandle<Result<ListOffsetsResponse>>, Vec<(TopicPartition, Offset)>);

/// A committed-offset lookup under way, and the partitions it asks for.
type Placing = (JoinHandle<Result<Offsets>>, Vec<TopicPartition>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Position {
    /// Assigned by a join: starts at the group's committed offset, once looked up (else at
    /// `auto_offset_reset`).
    Committed,
    Resolve(Offset),
    At(i64),
}

#[derive(Debug)]
struct Membership {
    group: String,
    member_id: String,
    generation: i32,
    topics: Vec<String>,
    rejoin: Arc<AtomicBool>,
    /// The heartbeat task of the current generation (aborted when dropped).
    heartbeat: Option<AbortOnDropHandle<()>>,
}

/// What a JoinGroup task brings: the answer, and the heartbeats it started on success (at once,
/// so that the member stays alive however long the caller takes to come back to `poll`).
type Joined = (JoinGroupResponse, Option<AbortOnDropHandle<()>>);

/// A consumer. Not `Clone`: one owner polls it.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// # let broker = cairn_broker::EmbeddedBroker::start(dir.path())?;
/// # tokio::runtime::Runtime::new()?.block_on(async {
/// use cairn_client::{ConnectionConfig, Consumer, ConsumerConfig, Offset};
/// let connection = ConnectionConfig::default(); // 127.0.0.1:7070
/// # let connection = ConnectionConfig { broker: broker.addr().to_string(), ..connection };
/// # let admin = cairn_client::Admin::connect(connection.clone()).await?;
/// # admin.create_topic(cairn_client::NewTopic::new("events", 3)).await?;
/// let mut consumer = Consumer::connect(ConsumerConfig { connection, ..ConsumerConfig::default() }).await?;
/// consumer.assign("events", None).await?;
/// consumer.seek_all(Offset::Earliest);
/// let records = consumer.poll(std::time::Duration::from_secs(1)).await?;
/// for r in records {
///     println!("{}@{}: {:?}", r.partition, r.offset, r.value);
/// }
/// # Ok::<_, cairn_client::Error>(()) })?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Consumer {
    config: ConsumerConfig,
    conn: Connection,
    /// Fetches only: the broker answers a connection's requests in order, so a commit, join or
    /// offset lookup sent behind a parked fetch would wait up to `fetch_max_wait` for it.
    fetch_conn: Connection,
    positions: BTreeMap<TopicPartition, Position>,
    /// Next offset after the last record handed out, per partition: what a commit stores.
    returned: BTreeMap<TopicPartition, i64>,
    /// Fetched batches not yet handed out, per partition, in fetch order.
    pending: VecDeque<Fetched>,
    /// An error found while decoding, reported once the records before it are handed out.
    deferred: Option<Error>,
    in_flight: Option<InFlightFetch>,
    /// Positions being looked up: `poll` waits for the answer only until its own timeout, and a
    /// later `poll` takes it up.
    lookup: Option<Lookup>,
    /// The committed offsets of partitions a join assigned being looked up: likewise. Kept
    /// here, and the partitions in `positions`, so that a `poll` dropped while it waits loses
    /// nothing (the partitions were owned and never read).
    placing: Option<Placing>,
    /// Some position may still be [`Position::Committed`]: set by a join, cleared once they are
    /// all placed, so that `poll` need not look through every position each time.
    unplaced: bool,
    /// A JoinGroup under way (a rebalance waits for every member): likewise waited for by `poll`
    /// only until its timeout.
    joining: Option<JoinHandle<Result<Joined>>>,
    /// JoinGroups only: the broker holds one until every member has rejoined, and answers a
    /// connection's requests in order, so on `conn` it would hold commits and lookups too.
    join_conn: Connection,
    /// When the last fetch went out.
    fetch_sent: Instant,
    /// Fetches sent: each starts at a different topic and partition (see `start_fetch`).
    fetches: usize,
    /// How long the next fetch waits before it goes out: set after an empty answer that came at
    /// once (the broker could not park the fetch: `parked_fetches_max`),
    /// so that an idle consumer asks about as often as a parked fetch would have answered.
    fetch_delay: Option<Duration>,
    membership: Option<Membership>,
    last_commit: Instant,
    /// What the last [`Consumer::commit`] stored: an auto-commit with nothing new is skipped.
    committed: BTreeMap<TopicPartition, i64>,
    /// The auto-commit under way, with the offsets it carries: `poll` does not wait for it (a
    /// commit the broker is slow to answer would hold `poll` past its timeout), and one goes out
    /// at a time. A commit the caller makes waits for it first, so that it cannot land after
    /// (and overwrite) a later one.
    auto_committing: Option<(JoinHandle<Result<()>>, Offsets)>,
}

impl Consumer {
    /// Connects.
    ///
    /// # Errors
    /// An unreachable broker.
    pub async fn connect(config: ConsumerConfig) -> Result<Consumer> {
        let conn = Connection::connect(config.connection.clone()).await?;
        let fetch_conn = Connection::new(config.connection.clone());
        let join_conn = Connection::new(config.connection.clone());
        Ok(Consumer {
            config,
            fetch_conn,
            conn,
            positions: BTreeMap::new(),
            returned: BTreeMap::new(),
            pending: VecDeque::new(),
            deferred: None,
            in_flight: None,
            lookup: None,
            placing: None,
            unplaced: false,
            joining: None,
            join_conn,
            fetch_sent: Instant::now(),
            fetches: 0,
            fetch_delay: None,
            membership: None,
            last_commit: Instant::now(),
            committed: BTreeMap::new(),
            auto_committing: None,
        })
    }

    async fn partitions_of(&self, topic: &str) -> Result<u32> {
        let resp = self.conn.request(&MetadataRequest { topics: Some(vec![topic.to_owned()]) }).await?;
        match resp.topics.into_iter().next() {
            Some(t) if t.error.is_ok() => Ok(t.partitions.len() as u32),
            _ => Err(Error::UnknownTopic(topic.to_owned())),
        }
    }

    /// Reads `partitions` of `topic` (all of them when `None`), starting at
    /// `auto_offset_reset` unless [`Consumer::seek`] says otherwise.
    ///
    /// # Errors
    /// Unknown topic or partition.
    pub async fn assign(&mut self, topic: &str, partitions: Option<Vec<u32>>) -> Result<()> {
        let count = self.partitions_of(topic).await?;
        let list = partitions.unwrap_or_else(|| (0..count).collect());
        for p in list {
            if p >= count {
                return Err(Error::InvalidArgument(format!("partition {p} does not exist: {topic} has {count}")));
            }
            let key = (topic.to_owned(), p);
            // Starting over: records fetched before are not handed out first (as for a seek).
            self.pending.retain(|f| f.key != key);
            self.positions.insert(key, Position::Resolve(self.config.auto_offset_reset));
        }
        self.cancel_fetch();
        Ok(())
    }

    /// Joins the configured group subscribed to `topics`; the broker assigns partitions. Called
    /// again, it changes the subscription: the member commits what it returned (with
    /// auto-commit) and rejoins under the same member id.
    ///
    /// # Errors
    /// No group configured, or the join failed.
    pub async fn subscribe(&mut self, topics: &[&str]) -> Result<()> {
        let group =
            self.config.group.clone().ok_or_else(|| Error::InvalidArgument("subscribe needs a group".into()))?;
        for t in topics {
            self.partitions_of(t).await?;
        }
        let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
        if self.joining.is_some() {
            // Finish the join under way first: the member id it brings is this member's.
            let _ = self.rejoin(None).await;
        }
        match self.membership.as_mut() {
            Some(m) => {
                m.topics = topics;
                m.rejoin.store(true, Ordering::Release);
                self.before_rebalance().await;
            }
            None => {
                self.membership = Some(Membership {
                    group,
                    member_id: String::new(),
                    generation: -1,
                    topics,
                    rejoin: Arc::new(AtomicBool::new(true)),
                    heartbeat: None,
                })
            }
        }
        self.rejoin(None).await.map(|_| ())
    }

    /// The partitions currently assigned.
    pub fn assignment(&self) -> Vec<(String, u32)> {
        self.positions.keys().cloned().collect()
    }

    /// Moves the position of one assigned partition.
    pub fn seek(&mut self, topic: &str, partition: u32, to: Offset) {
        let key = (topic.to_owned(), partition);
        if self.positions.contains_key(&key) {
            self.positions.insert(key.clone(), Position::Resolve(to));
            self.pending.retain(|f| f.key != key);
            self.cancel_fetch();
        }
    }

    /// Moves the position of every assigned partition.
    pub fn seek_all(&mut self, to: Offset) {
        for p in self.positions.values_mut() {
            *p = Position::Resolve(to);
        }
        self.pending.clear();
        self.deferred = None;
        self.cancel_fetch();
    }

    /// Each partition's position, as Kafka's: the offset of the next record `poll` will
    /// return. Records fetched but not yet handed out (a poll returns at most
    /// `max_poll_records`) are not past it. `None` while a seek is still to be resolved.
    pub fn positions(&self) -> BTreeMap<(String, u32), Option<i64>> {
        // The earliest records held for a partition come first in `pending`.
        let mut held: BTreeMap<&TopicPartition, i64> = BTreeMap::new();
        for f in &self.pending {
            held.entry(&f.key).or_insert(f.next);
        }
        self.positions
            .iter()
            .map(|(k, p)| {
                let at = match p {
                    Position::At(o) => Some(*o),
                    Position::Resolve(_) | Position::Committed => None,
                };
                (k.clone(), held.get(k).copied().or(at))
            })
            .collect()
    }

    /// Drops the fetch and the position lookup under way: what they bring may no longer fit
    /// the positions (a seek, a new assignment).
    fn cancel_fetch(&mut self) {
        if let Some((h, _)) = self.in_flight.take() {
            h.abort();
        }
        if let Some((h, _)) = self.lookup.take() {
            h.abort();
        }
        if let Some((h, _)) = self.placing.take() {
            h.abort();
        }
    }

    /// Joins the group again (or for the first time) and takes the new assignment. The
    /// JoinGroup runs as a task: with a `deadline`, this waits for it only until then and returns
    /// `Ok(false)` if it is still under way (a later call takes it up); without one, until it ends.
    async fn rejoin(&mut self, deadline: Option<Instant>) -> Result<bool> {
        if self.joining.is_none() {
            let Some(m) = self.membership.as_mut() else {
                return Ok(true);
            };
            if let Some(h) = m.heartbeat.take() {
                h.abort();
            }
            let req = JoinGroupRequest {
                group_id: m.group.clone(),
                member_id: m.member_id.clone(),
                group_instance_id: self.config.group_instance_id.clone(),
                session_timeout_ms: self.config.session_timeout.as_millis() as u32,
                rebalance_timeout_ms: self.config.rebalance_timeout.as_millis() as u32,
                topics: m.topics.clone(),
            };
            let conn = self.join_conn.clone();
            let wait = self.config.rebalance_timeout;
            let flag = Arc::clone(&m.rejoin);
            let heartbeat_conn = self.config.connection.clone();
            self.joining = Some(tokio::spawn(async move {
                let resp = conn.request_with(&req, wait).await?;
                let heartbeat = resp.error.is_ok().then(|| {
                    // Cleared before the heartbeats start, so that one reporting the next
                    // rebalance cannot be overwritten.
                    flag.store(false, Ordering::Release);
                    start_heartbeat(Connection::new(heartbeat_conn), &req.group_id, &resp, flag)
                });
                Ok((resp, heartbeat))
            }));
        }
        let Some(handle) = self.joining.as_mut() else {
            return Ok(true);
        };
        let Some(joined) = wait_for(handle, deadline).await else {
            return Ok(false); // the rebalance goes on
        };
        self.joining = None;
        let (resp, heartbeat) = joined.map_err(|e| self.task_failed(e))??;
        let Some(m) = self.membership.as_mut() else {
            return Ok(true);
        };
        let group = m.group.clone();
        match resp.error {
            ErrorCode::None => {}
            ErrorCode::UnknownMemberId => {
                m.member_id.clear();
                return Err(Error::broker(ErrorCode::UnknownMemberId, Some("rejoin as a new member".into())));
            }
            code => return Err(Error::broker(code, None)),
        }
        m.member_id = resp.member_id.clone();
        m.generation = resp.generation_id;
        m.heartbeat = heartbeat;
        tracing::info!(group = %group, member = %m.member_id, generation = m.generation, "joined group");
        // New assignment: committed offsets, else auto_offset_reset.
        self.cancel_fetch();
        self.pending.clear();
        self.deferred = None;
        self.positions.clear();
        self.returned.clear();
        for tp in resp.assignment.iter().flat_map(|tp| tp.partitions.iter().map(move |p| (tp.topic.clone(), *p))) {
            self.positions.insert(tp, Position::Committed);
            self.unplaced = true;
        }
        self.place_committed(deadline).await
    }

    /// Places partitions waiting for their committed offset ([`Position::Committed`]) with one
    /// OffsetFetch, run as a task: with a `deadline`, waited for only until then (`Ok(false)`
    /// if still under way; a later call takes it up). Without a committed offset, a partition
    /// starts at `auto_offset_reset`. On an error the partitions keep waiting, and the next call
    /// asks again.
    async fn place_committed(&mut self, deadline: Option<Instant>) -> Result<bool> {
        if self.placing.is_none() {
            let Some(group) = self.membership.as_ref().map(|m| m.group.clone()) else {
                return Ok(true);
            };
            let asked: Vec<TopicPartition> =
                self.positions.iter().filter(|(_, p)| **p == Position::Committed).map(|(tp, _)| tp.clone()).collect();
            if asked.is_empty() {
                self.unplaced = false;
                return Ok(true);
            }
            let conn = self.conn.clone();
            let tps = asked.clone();
            let task = tokio::spawn(async move { committed_offsets(&conn, &group, &tps).await });
            self.placing = Some((task, asked));
        }
        let Some((handle, _)) = self.placing.as_mut() else {
            return Ok(true);
        };
        let Some(joined) = wait_for(handle, deadline).await else {
            return Ok(false); // still under way
        };
        let (_, asked) = self.placing.take().expect("a placing");
        let committed = joined.map_err(|e| self.task_failed(e))??;
        let group = self.membership.as_ref().map(|m| m.group.clone()).unwrap_or_default();
        for tp in asked {
            if self.positions.get(&tp) != Some(&Position::Committed) {
                continue; // sought elsewhere, or unassigned, since the lookup went out
            }
            let pos = match committed.get(&tp) {
                Some(o) if *o >= 0 => Position::At(*o),
                _ => {
                    tracing::info!(group = %group, topic = %tp.0, partition = tp.1, reset = ?self.config.auto_offset_reset,
                        "no committed offset; starting from auto_offset_reset");
                    Position::Resolve(self.config.auto_offset_reset)
                }
            };
            self.positions.insert(tp, pos);
        }
        self.unplaced = false;
        Ok(true)
    }

    /// The error for a request task that ended without an answer (it panicked or was aborted).
    fn task_failed(&self, e: tokio::task::JoinError) -> Error {
        Error::Disconnected { addr: self.config.connection.broker.clone(), detail: e.to_string() }
    }

    /// Places partitions whose position is a seek: exact offsets at once, the others with one
    /// ListOffsets request for all of them (one round trip, not one a partition). Waits for the
    /// answer until `deadline`; if it has not come by then, a later call takes it up. A
    /// partition the broker refuses keeps its `Resolve` and the others are placed all the same;
    /// the first refusal is returned in `Ok(Some(_))`, to be reported after the others' records.
    /// Connection failures are `Err`.
    async fn resolve_positions(&mut self, deadline: Instant) -> Result<Option<Error>> {
        if self.lookup.is_none() {
            let mut topics: Vec<ListOffsetsTopic> = Vec::new();
            let mut asked = Vec::new();
            let mut exact = Vec::new();
            for ((topic, partition), p) in &self.positions {
                let (timestamp, wanted) = match *p {
                    Position::At(_) | Position::Committed => continue,
                    Position::Resolve(Offset::At(o)) => {
                        exact.push(((topic.clone(), *partition), o));
                        continue;
                    }
                    Position::Resolve(o @ Offset::Earliest) => (EARLIEST_TIMESTAMP, o),
                    Position::Resolve(o @ Offset::Latest) => (LATEST_TIMESTAMP, o),
                    Position::Resolve(o @ Offset::Timestamp(t)) => (t, o),
                };
                asked.push(((topic.clone(), *partition), wanted));
                let part = ListOffsetsPartition { partition: *partition, timestamp };
                match topics.last_mut().filter(|t| t.name == *topic) {
                    Some(t) => t.partitions.push(part),
                    None => topics.push(ListOffsetsTopic { name: topic.clone(), partitions: vec![part] }),
                }
            }
            for (tp, at) in exact {
                self.positions.insert(tp, Position::At(at));
            }
            if asked.is_empty() {
                return Ok(None);
            }
            let conn = self.conn.clone();
            let sent = tokio::spawn(async move { conn.request(&ListOffsetsRequest { topics }).await });
            self.lookup = Some((sent, asked));
        }
        let Some((handle, _)) = self.lookup.as_mut() else {
            return Ok(None);
        };
        // Waited for even when other partitions could be fetched meanwhile: the next fetch then
        // covers every partition (a fetch that parked without them would hold them back).
        let Some(joined) = wait_for(handle, Some(deadline)).await else {
            return Ok(None); // still under way
        };
        let (_, asked) = self.lookup.take().expect("a lookup");
        let Ok(answer) = joined else {
            return Ok(None); // the task failed: asked again next time
        };
        let mut answered = BTreeMap::new();
        for t in answer?.topics {
            for p in t.partitions {
                answered.insert((t.name.clone(), p.partition), p);
            }
        }
        let mut refused = None;
        for ((topic, partition), wanted) in asked {
            let key = (topic, partition);
            if self.positions.get(&key) != Some(&Position::Resolve(wanted)) {
                continue; // sought elsewhere, or unassigned, since the lookup went out
            }
            match answered.remove(&key) {
                Some(p) if p.error.is_ok() => {
                    self.positions.insert(key, Position::At(p.offset));
                }
                Some(p) => {
                    refused.get_or_insert(Error::broker(p.error, Some(format!("{}-{}", key.0, key.1))));
                }
                None => {
                    refused.get_or_insert(Error::UnknownTopic(key.0));
                }
            }
        }
        Ok(refused)
    }

    fn start_fetch(&mut self) {
        if self.in_flight.is_some() || self.positions.is_empty() {
            return;
        }
        let mut offsets = BTreeMap::new();
        let mut topics: Vec<FetchTopic> = Vec::new();
        for ((t, p), pos) in &self.positions {
            let Position::At(o) = pos else { continue };
            offsets.insert((t.clone(), *p), *o);
            let fp = FetchPartition {
                partition: *p,
                fetch_offset: *o,
                partition_max_bytes: self.config.partition_fetch_max_bytes,
            };
            match topics.iter_mut().find(|x| &x.name == t) {
                Some(x) => x.partitions.push(fp),
                None => topics.push(FetchTopic { name: t.clone(), partitions: vec![fp] }),
            }
        }
        if topics.is_empty() {
            return; // every partition is still to be placed: nothing to fetch
        }
        // The broker fills a response in request order until `fetch_max_bytes` is spent: asked
        // in the same order every time, partitions late in it would wait until those before
        // them had caught up. Each fetch starts one further along instead.
        let turn = self.fetches;
        self.fetches = self.fetches.wrapping_add(1);
        let n = topics.len();
        topics.rotate_left(turn % n);
        for t in &mut topics {
            let n = t.partitions.len();
            t.partitions.rotate_left(turn % n);
        }
        let group = self.membership.as_ref().map(|m| FetchGroup {
            group_id: m.group.clone(),
            member_id: m.member_id.clone(),
            generation_id: m.generation,
        });
        let req = FetchRequest {
            max_wait_ms: self.config.fetch_max_wait.as_millis() as u32,
            min_bytes: self.config.fetch_min_bytes,
            max_bytes: self.config.fetch_max_bytes,
            group,
            topics,
        };
        let conn = self.fetch_conn.clone();
        let extra = self.config.fetch_max_wait;
        let delay = self.fetch_delay.take().unwrap_or_default();
        self.fetch_sent = Instant::now() + delay;
        let fetch = async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            conn.request_with(&req, extra).await
        };
        self.in_flight = Some((tokio::spawn(fetch), offsets));
    }

    /// Returns the records available now, or waits up to `timeout` for some. The next fetch is
    /// sent before this returns, so the following call usually finds data waiting.
    ///
    /// # Errors
    /// Connection errors after the broker stays unreachable, group errors, or broker errors.
    pub async fn poll(&mut self, timeout: Duration) -> Result<Vec<ConsumerRecord>> {
        let deadline = Instant::now() + timeout;
        if !self.membership.as_ref().is_some_and(|m| m.rejoin.load(Ordering::Acquire)) {
            // Calling poll means the records returned before were processed, also when there
            // is nothing new to hand out.
            self.maybe_auto_commit();
        }
        loop {
            // A join under way may have cleared the flag already: its answer is still to be taken.
            let rejoin =
                self.joining.is_some() || self.membership.as_ref().is_some_and(|m| m.rejoin.load(Ordering::Acquire));
            // Partitions a join assigned whose committed offsets are still to be looked up (an
            // earlier poll was dropped or timed out while it waited, or the lookup failed).
            if rejoin || self.unplaced {
                let step = if rejoin {
                    if self.joining.is_none() {
                        self.before_rebalance().await;
                    }
                    self.rejoin(Some(deadline)).await
                } else {
                    self.place_committed(Some(deadline)).await
                };
                match step {
                    Ok(true) => {}
                    Ok(false) => return Ok(Vec::new()), // the rebalance goes on; a later poll joins
                    Err(e) => {
                        let churn =
                            matches!(e.code(), Some(ErrorCode::UnknownMemberId | ErrorCode::RebalanceInProgress));
                        if !e.is_retriable() && !churn {
                            return Err(e);
                        }
                        // Retried until the timeout; then the caller hears why nothing came (a
                        // rebalance still going on is not a failure).
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            return if churn { Ok(Vec::new()) } else { Err(e) };
                        }
                        tracing::info!(error = %e, "rejoin or committed-offset lookup failed; retrying");
                        tokio::time::sleep(left.min(Duration::from_millis(100))).await;
                        continue;
                    }
                }
            }
            if !self.pending.is_empty() {
                // Calling poll again means the records returned before were processed: commit
                // those (at-least-once), never the ones about to be handed out.
                self.maybe_auto_commit();
                let out = self.take_records()?;
                if out.is_empty() {
                    continue;
                }
                return Ok(out);
            }
            if let Some(e) = self.deferred.take() {
                return Err(e);
            }
            let refused = self.resolve_positions(deadline).await?;
            self.start_fetch();
            if let Some(e) = refused {
                // After the records of the partitions that could be resolved, if any.
                self.deferred.get_or_insert(e);
            }
            let Some((handle, _)) = self.in_flight.as_mut() else {
                if self.lookup.is_some() && Instant::now() < deadline {
                    continue; // every position is being looked up: wait for that
                }
                // Nothing assigned: wait out the timeout (a group may assign later).
                let left = deadline.saturating_duration_since(Instant::now());
                tokio::time::sleep(left.min(Duration::from_millis(100))).await;
                if Instant::now() >= deadline {
                    return Ok(Vec::new());
                }
                continue;
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let result = match tokio::time::timeout(left, handle).await {
                Err(_) => return Ok(Vec::new()),
                Ok(r) => r,
            };
            let (_, offsets) = self.in_flight.take().expect("in flight");
            let response = match result {
                Ok(Ok(r)) => r,
                Ok(Err(e)) if e.is_retriable() => {
                    // Retried until the timeout; a broker that stays unreachable that long is
                    // reported (the error is retriable: poll again to carry on).
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, "fetch failed; retrying");
                    tokio::time::sleep(left.min(Duration::from_millis(100))).await;
                    continue;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => continue,
            };
            self.absorb(response, &offsets)?;
            if self.deferred.is_none() {
                self.start_fetch(); // if absorbing did not (nothing to fetch from before)
            }
            if self.pending.is_empty() && self.deferred.is_none() && Instant::now() >= deadline {
                return Ok(Vec::new());
            }
        }
    }

    /// Takes a fetch response. The batch headers alone (CRC-checked) say where each partition
    /// continues, so the next fetch goes out before any record is decoded: the broker prepares
    /// it while this side decodes. Records are decoded as `poll` hands them out.
    fn absorb(&mut self, response: FetchResponse, offsets: &BTreeMap<TopicPartition, i64>) -> Result<()> {
        let mut broken: Option<Error> = None;
        let pending_before = self.pending.len();
        // Whether any partition's answer was an error or no longer wanted (a seek): the delay
        // below is only for a fetch that was plainly answered early with nothing.
        let mut unusual = false;
        for t in response.topics {
            let topic: Arc<str> = Arc::from(t.name.as_str());
            for p in t.partitions {
                let key = (t.name.clone(), p.partition);
                let Some(Position::At(pos)) = self.positions.get(&key).copied() else {
                    unusual = true;
                    continue;
                };
                if offsets.get(&key) != Some(&pos) {
                    unusual = true;
                    continue; // a seek happened while this fetch was in flight
                }
                unusual |= !p.error.is_ok();
                match p.error {
                    ErrorCode::None => {}
                    ErrorCode::OffsetOutOfRange => {
                        tracing::warn!(topic = %t.name, partition = p.partition, offset = pos, log_start = p.log_start_offset,
                            log_end = p.log_end_offset, reset = ?self.config.auto_offset_reset, "offset out of range; resetting");
                        self.positions.insert(key, Position::Resolve(self.config.auto_offset_reset));
                        continue;
                    }
                    // A deleted topic's partition: the broker rebalances the group without it.
                    ErrorCode::RebalanceInProgress
                    | ErrorCode::IllegalGeneration
                    | ErrorCode::UnknownMemberId
                    | ErrorCode::NotAssigned
                    | ErrorCode::UnknownTopicOrPartition
                        if self.membership.is_some() =>
                    {
                        if let Some(m) = &self.membership {
                            m.rejoin.store(true, Ordering::Release);
                        }
                        continue;
                    }
                    // Reported once this response's other partitions are taken in: returned
                    // at once, it threw their records away, and a partition that fails every
                    // fetch (a deleted topic under `assign`, a corrupt batch) starved every
                    // partition after it for good. Its position stays, so it is tried again.
                    code => {
                        broken.get_or_insert(Error::broker(code, Some(format!("fetch {}-{}", t.name, p.partition))));
                        continue;
                    }
                }
                let mut batches = VecDeque::new();
                let mut next = pos;
                for batch in BatchSplitter::new(p.records_bytes()) {
                    match batch {
                        Ok(b) => {
                            next = next.max(b.header().next_offset());
                            batches.push_back(b);
                        }
                        // Keep what came before; the position stays at the broken batch, so
                        // the next poll fetches it again and reports it again.
                        Err(e) => {
                            broken.get_or_insert(e.into());
                            break;
                        }
                    }
                }
                self.positions.insert(key.clone(), Position::At(next));
                if !batches.is_empty() {
                    self.pending.push_back(Fetched {
                        topic: Arc::clone(&topic),
                        key,
                        next: pos,
                        batches,
                        current: None,
                    });
                }
            }
        }
        let waited = self.fetch_sent.elapsed();
        let wait = self.config.fetch_max_wait;
        // At once means within a round trip or so: an answer the broker parked until its own
        // cap (`fetch_wait_max_ms`) also comes before `fetch_max_wait`, and waiting out the rest
        // after it would leave no fetch parked, so new records would wait for the delay.
        let at_once = waited < wait / 2 && waited < UNPARKED_ANSWER_MAX;
        if self.pending.len() == pending_before && !unusual && broken.is_none() && at_once {
            self.fetch_delay = Some(wait - waited);
        }
        match broken {
            None => self.start_fetch(),
            Some(e) => self.deferred = Some(e),
        }
        Ok(())
    }

    /// Decodes and hands out up to `max_poll_records` pending records. A malformed record
    /// ends its partition's pending records; the position goes back to it and the error is
    /// returned (after the records before it, if there are any). Each partition's position
    /// after its last record handed out is noted for `commit` as it goes.
    fn take_records(&mut self) -> Result<Vec<ConsumerRecord>> {
        let max = self.config.max_poll_records.max(1);
        let mut out = Vec::with_capacity(max.min(4096));
        // Whether records of the front partition were handed out and not yet noted.
        let mut unnoted = false;
        while out.len() < max {
            let Some(f) = self.pending.front_mut() else { break };
            let iter = match &mut f.current {
                Some(iter) => iter,
                None => match f.batches.pop_front() {
                    Some(b) => f.current.insert(b.into_records()),
                    None => {
                        if std::mem::take(&mut unnoted) {
                            self.returned.insert(f.key.clone(), f.next);
                        }
                        self.pending.pop_front();
                        continue;
                    }
                },
            };
            match iter.next() {
                None => f.current = None,
                Some(Ok(record)) if record.offset < f.next => {}
                Some(Ok(record)) => {
                    unnoted = true;
                    f.next = record.offset + 1;
                    out.push(ConsumerRecord {
                        topic: Arc::clone(&f.topic),
                        partition: f.key.1,
                        offset: record.offset,
                        timestamp: record.timestamp,
                        key: record.key,
                        value: record.value,
                        headers: record.headers,
                    });
                }
                Some(Err(e)) => {
                    let f = self.pending.pop_front().expect("front exists");
                    if std::mem::take(&mut unnoted) {
                        self.returned.insert(f.key.clone(), f.next);
                    }
                    // Resume at the first record not returned, with a fresh fetch.
                    self.cancel_fetch();
                    self.positions.insert(f.key, Position::At(f.next));
                    if out.is_empty() {
                        return Err(e.into());
                    }
                    self.deferred = Some(e.into());
                    break;
                }
            }
        }
        if unnoted {
            if let Some(f) = self.pending.front() {
                self.returned.insert(f.key.clone(), f.next);
            }
        }
        Ok(out)
    }

    async fn before_rebalance(&mut self) {
        if self.config.auto_commit {
            if let Err(e) = self.commit().await {
                tracing::info!(error = %e, "commit before rebalance failed; records since the last commit may be redelivered");
            }
        }
        self.cancel_fetch();
        self.pending.clear();
        self.deferred = None;
    }

    /// Starts an auto-commit when one is due, without waiting for it (see `auto_committing`).
    fn maybe_auto_commit(&mut self) {
        if !self.config.auto_commit || self.config.group.is_none() {
            return;
        }
        if self.auto_committing.as_ref().is_some_and(|(h, _)| !h.is_finished()) {
            return;
        }
        if let Some((h, offsets)) = self.auto_committing.take() {
            // Finished, so this does not wait; unconstrained, because a task that has spent its
            // scheduling budget would otherwise be told "not ready".
            match futures::FutureExt::now_or_never(tokio::task::unconstrained(h)) {
                Some(result) => self.note_auto_commit(result, offsets),
                None => tracing::warn!("a finished auto-commit had no outcome; it is sent again"),
            }
        }
        if self.last_commit.elapsed() < self.config.auto_commit_interval || self.returned == self.committed {
            return;
        }
        let offsets = self.returned.clone();
        self.last_commit = Instant::now();
        match self.commit_request(&offsets) {
            Ok(Some(request)) => {
                let conn = self.conn.clone();
                let sent = tokio::spawn(async move { send_commit(&conn, request).await });
                self.auto_committing = Some((sent, offsets));
            }
            Ok(None) => self.committed = offsets,
            Err(e) => tracing::warn!(error = %e, "auto-commit failed"),
        }
    }

    /// Takes the outcome of an auto-commit.
    fn note_auto_commit(&mut self, result: std::result::Result<Result<()>, tokio::task::JoinError>, offsets: Offsets) {
        match result {
            Ok(Ok(())) => self.committed = offsets,
            Ok(Err(e)) => tracing::warn!(error = %e, "auto-commit failed"),
            Err(e) => tracing::warn!(error = %e, "auto-commit task failed"),
        }
    }

    /// Waits for the auto-commit under way, if any (bounded by the request timeout).
    async fn finish_auto_commit(&mut self) {
        if let Some((h, offsets)) = self.auto_committing.take() {
            let result = h.await;
            self.note_auto_commit(result, offsets);
        }
    }

    /// Commits, for every partition, the offset after the last record returned by `poll`
    /// (durable at the broker before this returns).
    ///
    /// # Errors
    /// No group configured, a stale generation (`ILLEGAL_GENERATION`), or connection errors.
    pub async fn commit(&mut self) -> Result<()> {
        let returned = self.returned.clone();
        self.commit_offsets(&returned).await?;
        self.committed = returned;
        Ok(())
    }

    /// Commits explicit offsets (each the next offset to consume) for the configured group.
    ///
    /// # Errors
    /// As [`Consumer::commit`].
    pub async fn commit_offsets(&mut self, offsets: &BTreeMap<(String, u32), i64>) -> Result<()> {
        self.finish_auto_commit().await;
        let request = self.commit_request(offsets)?;
        self.last_commit = Instant::now();
        match request {
            Some(request) => send_commit(&self.conn, request).await,
            None => Ok(()),
        }
    }

    /// The request that commits `offsets` for the configured group as its current member
    /// (`None` for no offsets).
    fn commit_request(&self, offsets: &Offsets) -> Result<Option<OffsetCommitRequest>> {
        let group = self.config.group.clone().ok_or_else(|| Error::InvalidArgument("commit needs a group".into()))?;
        if offsets.is_empty() {
            return Ok(None);
        }
        let mut topics: Vec<OffsetCommitTopic> = Vec::new();
        for ((t, p), o) in offsets {
            let part = OffsetCommitPartition { partition: *p, offset: *o, metadata: None };
            match topics.iter_mut().find(|x| &x.name == t) {
                Some(x) => x.partitions.push(part),
                None => topics.push(OffsetCommitTopic { name: t.clone(), partitions: vec![part] }),
            }
        }
        let (member_id, generation_id) = match &self.membership {
            Some(m) => (m.member_id.clone(), m.generation),
            None => (String::new(), -1),
        };
        Ok(Some(OffsetCommitRequest { group_id: group, member_id, generation_id, topics }))
    }

    /// Commits (with auto-commit), leaves the group so its partitions move at once, and stops.
    ///
    /// # Errors
    /// The commit's error; the group is left regardless.
    pub async fn close(mut self) -> Result<()> {
        if self.joining.is_some() {
            // Its answer may bring a member id the group already counts: take it (within the
            // request timeout) so that the leave below removes that member at once.
            let _ = tokio::time::timeout(self.config.connection.request_timeout, self.rejoin(None)).await;
            if let Some(h) = self.joining.take() {
                h.abort();
            }
        }
        let committed =
            if self.config.auto_commit && self.config.group.is_some() { self.commit().await } else { Ok(()) };
        self.cancel_fetch();
        if let Some(m) = self.membership.take() {
            drop(m.heartbeat);
            if !m.member_id.is_empty() {
                let _ = self.conn.request(&LeaveGroupRequest { group_id: m.group, member_id: m.member_id }).await;
            }
        }
        committed
    }

    /// Turns the consumer into a `Stream` of records (`while let Some(r) = stream.next().await`).
    pub fn into_stream(self) -> impl Stream<Item = Result<ConsumerRecord>> {
        futures::stream::unfold((self, VecDeque::new()), |(mut consumer, mut pending)| async move {
            loop {
                if let Some(r) = pending.pop_front() {
                    return Some((Ok(r), (consumer, pending)));
                }
                match consumer.poll(Duration::from_secs(1)).await {
                    Ok(batch) => pending.extend(batch),
                    Err(e) => return Some((Err(e), (consumer, pending))),
                }
            }
        })
    }
}

/// Heartbeats of a generation, on their own connection so that long fetches never delay them.
/// A rebalance raises `rejoin` and the heartbeats go on while it lasts, as Kafka's do: they
/// keep the session alive while the caller finishes its records, so that the broker waits for
/// this member's rejoin up to `rebalance_timeout` (not `session_timeout`). Any other error (the
/// rebalance ended, the member was removed) raises `rejoin` if not yet raised and stops them.
fn start_heartbeat(
    conn: Connection,
    group: &str,
    joined: &JoinGroupResponse,
    rejoin: Arc<AtomicBool>,
) -> AbortOnDropHandle<()> {
    let interval = Duration::from_millis(u64::from(joined.heartbeat_interval_ms.max(100)));
    let hb = HeartbeatRequest {
        group_id: group.to_owned(),
        member_id: joined.member_id.clone(),
        generation_id: joined.generation_id,
    };
    AbortOnDropHandle::new(tokio::spawn(async move {
        let mut rebalancing = false;
        loop {
            tokio::time::sleep(interval).await;
            match conn.request(&hb).await {
                Ok(r) if r.error.is_ok() => {}
                Ok(r) if r.error == ErrorCode::RebalanceInProgress => {
                    if !std::mem::replace(&mut rebalancing, true) {
                        tracing::info!("heartbeat: the group is rebalancing; rejoining at the next poll");
                        rejoin.store(true, Ordering::Release);
                    }
                }
                Ok(r) => {
                    // Once the rebalance heard of above has ended, the next generation's join
                    // (which cleared the flag) is this member's: raising it again would start
                    // a needless rebalance.
                    if !rebalancing {
                        tracing::info!(error = %r.error, "heartbeat: rejoining the group");
                        rejoin.store(true, Ordering::Release);
                    }
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
            }
        }
    }))
}

/// Waits for a task the consumer keeps, until `deadline` if there is one; `None` if it is still
/// under way then (the handle stays, for a later call to take up).
async fn wait_for<T>(
    handle: &mut JoinHandle<T>,
    deadline: Option<Instant>,
) -> Option<std::result::Result<T, tokio::task::JoinError>> {
    match deadline {
        Some(d) => tokio::time::timeout(d.saturating_duration_since(Instant::now()), handle).await.ok(),
        None => Some(handle.await),
    }
}

/// The committed offsets of `tps` for `group` (`-1` where there is none).
async fn committed_offsets(conn: &Connection, group: &str, tps: &[TopicPartition]) -> Result<Offsets> {
    let mut topics: Vec<OffsetFetchTopic> = Vec::new();
    for (t, p) in tps {
        match topics.iter_mut().find(|x| &x.name == t) {
            Some(x) => x.partitions.push(*p),
            None => topics.push(OffsetFetchTopic { name: t.clone(), partitions: vec![*p] }),
        }
    }
    let resp = conn.request(&OffsetFetchRequest { group_id: group.to_owned(), topics: Some(topics) }).await?;
    Ok(resp
        .topics
        .into_iter()
        .flat_map(|t| t.partitions.into_iter().map(move |p| ((t.name.clone(), p.partition), p.offset)))
        .collect())
}

/// Sends a commit and checks every partition's answer.
async fn send_commit(conn: &Connection, request: OffsetCommitRequest) -> Result<()> {
    let resp = conn.request(&request).await?;
    for t in resp.topics {
        for (p, code) in t.partitions {
            if !code.is_ok() {
                return Err(Error::broker(code, Some(format!("commit {}-{p}", t.name))));
            }
        }
    }
    Ok(())
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.cancel_fetch();
        if let Some(h) = self.joining.take() {
            h.abort();
        }
        // An auto-commit under way is left to finish (bounded by the request timeout): what it
        // commits was handed out and processed.
        // Dropping the membership stops its heartbeats.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Admin, NewTopic, Producer, ProducerConfig, ProducerRecord};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_poll_dropped_while_a_new_assignment_is_placed_still_reads_every_partition() {
        let dir = tempfile::tempdir().unwrap();
        let broker = cairn_broker::EmbeddedBroker::start(dir.path()).unwrap();
        let connection = ConnectionConfig { broker: broker.addr().to_string(), ..ConnectionConfig::default() };
        let admin = Admin::connect(connection.clone()).await.unwrap();
        admin.create_topic(NewTopic::new("t", 2)).await.unwrap();
        admin.create_topic(NewTopic::new("idle", 1)).await.unwrap();
        let producer =
            Producer::connect(ProducerConfig { connection: connection.clone(), ..ProducerConfig::default() })
                .await
                .unwrap();
        for i in 0..10u32 {
            let mut record = ProducerRecord::new("t", format!("v{i}"));
            record.partition = Some(i % 2);
            producer.send(record).await.unwrap();
        }
        producer.close().await.unwrap();
        let config =
            ConsumerConfig { connection, group: Some("g".into()), auto_commit: false, ..ConsumerConfig::default() };
        let mut c = Consumer::connect(config).await.unwrap();
        c.subscribe(&["t"]).await.unwrap();
        // A rebalance is announced; the committed-offset lookup that follows the join goes on
        // `conn`, which the broker answers in order, behind a fetch parked for 3 s.
        c.membership.as_ref().unwrap().rejoin.store(true, Ordering::Release);
        let conn = c.conn.clone();
        let parked = tokio::spawn(async move {
            let req = FetchRequest {
                max_wait_ms: 3_000,
                min_bytes: 1,
                max_bytes: 1 << 20,
                group: None,
                topics: vec![FetchTopic {
                    name: "idle".into(),
                    partitions: vec![FetchPartition { partition: 0, fetch_offset: 0, partition_max_bytes: 1 << 20 }],
                }],
            };
            conn.request_with(&req, Duration::from_secs(3)).await
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The caller gives up on this poll (a select! or a timeout) while the lookup waits.
        let dropped = tokio::time::timeout(Duration::from_millis(50), c.poll(Duration::from_secs(5))).await;
        assert!(dropped.is_err(), "the poll was meant to be dropped in the lookup");
        // A poll with a short timeout returns while the lookup is still held up.
        assert!(c.poll(Duration::from_millis(100)).await.unwrap().is_empty());
        assert!(!parked.is_finished(), "the lookup was meant to be still held up");
        let _ = parked.await;
        let mut got = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        while got < 10 && Instant::now() < deadline {
            got += c.poll(Duration::from_millis(200)).await.unwrap().len();
        }
        assert_eq!(got, 10, "partitions assigned by the join are read");
        drop(c);
        broker.stop().unwrap();
    }
}
