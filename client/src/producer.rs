//! The batching producer.
//!
//! `send` puts a record into its partition's open batch and returns at once with a [`Delivery`]
//! handle; a sender task ships a batch when it is full (`batch_bytes_max`) or old
//! (`linger`). Memory is bounded: `send` waits while `buffer_bytes_max` bytes are unsent or
//! unacknowledged. Each partition has at most one batch in flight, so retries (with backoff, up to
//! `delivery_timeout`) never reorder a partition; different partitions are in flight together.

use std::collections::{HashMap, VecDeque};
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Notify, Semaphore};

use cairn_protocol::messages::metadata::MetadataRequest;
use cairn_protocol::messages::produce::{ProducePartition, ProduceRequest, ProduceTopic};
use cairn_protocol::record::record_len_upper_bound;
use cairn_protocol::record_batch::BATCH_HEADER_LEN;
use cairn_protocol::{Acks, BatchPayload, ErrorCode, Header, RecordBatchBuilder};

use crate::connection::{is_later, Connection, ConnectionConfig};
use crate::error::{Error, Result};
use crate::partitioner::partition_for_key;

/// Producer settings.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// Broker connection.
    pub connection: ConnectionConfig,
    /// Durability required before a record counts as delivered. Default `leader`.
    pub acks: Acks,
    /// Largest batch sent (must not exceed the broker's `batch_bytes_max`). Default 512 KiB.
    pub batch_bytes_max: usize,
    /// How long a batch may wait to fill up. Default 5 ms.
    pub linger: Duration,
    /// Bytes of records buffered or in flight before `send` waits. Default 64 MiB.
    pub buffer_bytes_max: usize,
    /// Give up on a record this long after `send` returned it (retries stop then; batches
    /// waiting behind a failing one expire unsent). Default 120 s.
    pub delivery_timeout: Duration,
    /// First retry delay; doubles up to 1 s. Default 100 ms.
    pub retry_backoff: Duration,
    /// Produce requests in flight at once (one batch per partition each). Default 16.
    pub in_flight_requests_max: usize,
    /// Largest produce request: batches of many partitions are packed into one request up to
    /// this size (a single larger batch still goes, alone). The broker holds each request in
    /// memory until it is stored, so this bounds its memory per producer connection. Keep it
    /// below the broker's `frame_bytes_max` (16 MiB). Default 1 MiB, as Kafka's
    /// `max.request.size`.
    pub request_bytes_max: usize,
    /// How old a topic's partition count may get before it is fetched again, so that records
    /// reach partitions added since (a topic recreated with more, say). A partition reported
    /// missing by the broker makes it fetched at once. Default 5 min, as Kafka's
    /// `metadata.max.age.ms`.
    pub metadata_max_age: Duration,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            connection: ConnectionConfig::default(),
            acks: Acks::Leader,
            batch_bytes_max: 512 * 1024,
            linger: Duration::from_millis(5),
            buffer_bytes_max: 64 * 1024 * 1024,
            delivery_timeout: Duration::from_secs(120),
            retry_backoff: Duration::from_millis(100),
            in_flight_requests_max: 16,
            request_bytes_max: 1024 * 1024,
            metadata_max_age: Duration::from_secs(300),
        }
    }
}

impl ProducerConfig {
    /// Sets [`ProducerConfig::linger`] in milliseconds, Kafka's `linger.ms`:
    /// `ProducerConfig::default().linger_ms(2)`.
    pub fn linger_ms(mut self, ms: u64) -> Self {
        self.linger = Duration::from_millis(ms);
        self
    }
}

/// A record to send.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerRecord {
    /// Topic (shared: cloning a record or a topic name costs no allocation).
    pub topic: Arc<str>,
    /// Explicit partition; otherwise chosen from the key (or sticky round-robin without one).
    pub partition: Option<u32>,
    /// Optional key.
    pub key: Option<Bytes>,
    /// Optional value.
    pub value: Option<Bytes>,
    /// Headers.
    pub headers: Vec<Header>,
    /// Create time in ms since the epoch; now if unset.
    pub timestamp: Option<i64>,
}

impl ProducerRecord {
    /// A record with a value.
    pub fn new(topic: impl Into<Arc<str>>, value: impl Into<Bytes>) -> ProducerRecord {
        ProducerRecord { topic: topic.into(), value: Some(value.into()), ..ProducerRecord::default() }
    }
    /// Sets the key.
    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }
    /// Sets an explicit partition.
    pub fn partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }
    /// Adds a header.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push(Header { key: key.into(), value: Some(value.into()) });
        self
    }
    /// Sets the timestamp.
    pub fn timestamp(mut self, ms: i64) -> Self {
        self.timestamp = Some(ms);
        self
    }
}

/// Where a delivered record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordMetadata {
    /// Partition.
    pub partition: u32,
    /// Offset (-1 with `acks = none`: the broker does not say).
    pub offset: i64,
}

/// A batch's base offset, or why it failed for good (the error as it happened: a broker code,
/// a timeout, a lost connection...).
type Outcome = std::result::Result<i64, Error>;

#[derive(Debug)]
struct BatchResult {
    partition: u32,
    /// The outcome and when it became known.
    outcome: OnceLock<(Outcome, Instant)>,
    done: Notify,
}

impl BatchResult {
    fn complete(&self, outcome: Outcome) {
        let _ = self.outcome.set((outcome, Instant::now()));
        self.done.notify_waiters();
    }

    /// Waits until the batch is acknowledged or has failed for good.
    async fn finished(&self) -> &(Outcome, Instant) {
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(outcome) = self.outcome.get() {
                return outcome;
            }
            notified.await;
        }
    }
}

/// The outcome of one `send`: await it (it is `IntoFuture`) for the record's partition and
/// offset, or drop it if you do not care.
#[derive(Debug)]
pub struct Delivery {
    batch: Arc<BatchResult>,
    index: u32,
}

impl Delivery {
    /// Waits until the record is acknowledged (per the producer's acks) or has failed for good.
    ///
    /// # Errors
    /// The broker's error, or, once the delivery timeout has passed, the last attempt's error:
    /// [`Error::Timeout`] for a request the broker did not answer, [`Error::Disconnected`] or
    /// [`Error::Connect`] for a lost connection.
    pub async fn wait(self) -> Result<RecordMetadata> {
        self.wait_timed().await.0
    }

    /// As [`Delivery::wait`], with the moment the outcome became known: when the
    /// acknowledgement arrived, or when the record failed for good. A caller that awaits
    /// deliveries one after another (a latency sampler, say) gets the time each one finished,
    /// not the time it got round to it. Acknowledgements of different partitions can come back
    /// in any order.
    ///
    /// # Errors
    /// As [`Delivery::wait`].
    pub async fn wait_timed(self) -> (Result<RecordMetadata>, Instant) {
        let (outcome, at) = self.batch.finished().await;
        let result = match outcome {
            Ok(base) => Ok(RecordMetadata {
                partition: self.batch.partition,
                offset: if *base < 0 { -1 } else { base + i64::from(self.index) },
            }),
            Err(e) => Err(e.duplicate()),
        };
        (result, *at)
    }
}

impl IntoFuture for Delivery {
    type Output = Result<RecordMetadata>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<RecordMetadata>> + Send>>;
    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.wait())
    }
}

#[derive(Debug)]
struct OpenBatch {
    builder: RecordBatchBuilder,
    created: Instant,
    result: Arc<BatchResult>,
    reserved: usize,
}

#[derive(Debug)]
struct SealedBatch {
    /// The batch; values of 512 bytes or more are referenced where the caller put them, not
    /// copied (the batch holds their `Bytes` until it is acknowledged).
    payload: BatchPayload,
    /// `payload.len()`.
    len: usize,
    result: Arc<BatchResult>,
    records: usize,
    reserved: usize,
    /// When its first record was sent: `delivery_timeout` counts from here, so batches queued
    /// behind a failing one expire with it instead of each getting a timeout of its own.
    created: Instant,
    attempts: u32,
    /// The last failed attempt's error, reported if the batch expires before the next one.
    last_error: Option<Error>,
    not_before: Instant,
}

/// A topic and partition.
type TopicPartition = (Arc<str>, u32);

/// A batch ready to go, with its topic and partition.
type Sendable = (TopicPartition, SealedBatch);

#[derive(Debug, Default)]
struct PartitionQueue {
    /// Sequence number of the next batch's first record (idempotent producer).
    next_sequence: i32,
    open: Option<OpenBatch>,
    ready: VecDeque<SealedBatch>,
    in_flight: bool,
    /// Bytes the last batch sealed here copied into its buffer (0 before the first), to size the
    /// next one's buffer.
    last_batch_bytes: usize,
    /// Pieces of the last batch sealed here (values sent by reference and what lies between).
    last_batch_pieces: usize,
    /// Outcome of the last batch sealed here. A partition's batches finish in order (one in
    /// flight, a retry before anything later), so `flush` waits for this one only.
    last_sealed: Option<Arc<BatchResult>>,
}

impl PartitionQueue {
    /// Buffer to reserve for a new batch: room for a quarter more than the last batch here
    /// copied into its buffer (values sent by reference do not count), within `max`; 256 bytes
    /// for the first. A buffer that turns out too small grows as records are added.
    ///
    /// Reserving `max` for every batch would cost a large, page-faulting allocation per batch
    /// where partitions get a record or two each (many partitions, keyed). A floor of 1 KiB was
    /// too much as well: with values of 512 bytes or more sent by reference, a batch of 13
    /// records copies some 300 bytes, and the 1,000-partition benchmark keeps 100,000 open
    /// batches. Its load generator peaked at 520-565 MB with that floor and 415-430 MB with
    /// this one, and spent 20% less CPU, most of it the kernel clearing fresh pages.
    fn batch_capacity(&self, max: usize) -> usize {
        let want = if self.last_batch_bytes == 0 { 256 } else { self.last_batch_bytes + self.last_batch_bytes / 4 };
        want.next_power_of_two().clamp(256, max)
    }
}

/// Per-topic state: partition count (from metadata), sticky partition, per-partition queues.
#[derive(Debug)]
struct TopicQueues {
    name: Arc<str>,
    /// Partitions records are spread over (`queues` may be longer: a topic that shrank keeps
    /// the queues of partitions it lost until they drain).
    partitions: u32,
    sticky: u32,
    /// Indexed by partition.
    queues: Vec<PartitionQueue>,
    /// When `partitions` is to be fetched again, if records were sent to it since the last fetch
    /// began (`sent`): a topic nobody sends to any more is not asked about (it may be deleted, and
    /// with `auto_create_topics` each ask would create it again).
    refresh_at: Instant,
    sent: bool,
    /// A fetch of it is under way.
    refreshing: bool,
    /// The broker reported a partition of it missing while a fetch was under way: fetch again
    /// once that one is done, as its answer may predate the change.
    refresh_again: bool,
    /// Fetches that failed in a row (they back off, doubling, up to `metadata_max_age`).
    refresh_failures: u32,
    /// Number of the metadata request whose answer set `partitions`: an answer to an earlier
    /// request that comes in later (a periodic fetch racing one made by `send`) is older and
    /// must not take back a count the topic has since changed to.
    count_from: u32,
}

impl TopicQueues {
    fn new(name: Arc<str>, partitions: u32, refresh_at: Instant, count_from: u32) -> TopicQueues {
        TopicQueues {
            name,
            partitions,
            sticky: (now_ms() as u32) % partitions,
            queues: (0..partitions).map(|_| PartitionQueue::default()).collect(),
            refresh_at,
            sent: false,
            refreshing: false,
            refresh_again: false,
            refresh_failures: 0,
            count_from,
        }
    }

    /// Takes the partition count answered to metadata request `number`, unless the count
    /// came from a later request already.
    fn take_count(&mut self, number: u32, partitions: u32) {
        if !is_later(number, self.count_from) {
            return;
        }
        self.count_from = number;
        if partitions != self.partitions {
            tracing::info!(topic = %self.name, from = self.partitions, to = partitions, "partition count changed");
        }
        self.resize(partitions);
    }

    /// Takes a partition count fetched again.
    fn resize(&mut self, partitions: u32) {
        if partitions as usize > self.queues.len() {
            self.queues.resize_with(partitions as usize, PartitionQueue::default);
        }
        self.partitions = partitions;
        if self.sticky >= partitions {
            self.sticky = 0;
        }
    }
}

/// Producers write to few topics: a short vector beats hashing the name for every record.
#[derive(Debug, Default)]
struct State {
    topics: Vec<TopicQueues>,
    flushing: usize,
}

impl State {
    fn topic_index(&self, name: &Arc<str>) -> Option<usize> {
        self.topics.iter().position(|t| Arc::ptr_eq(&t.name, name) || t.name == *name)
    }

    fn topic_mut(&mut self, name: &Arc<str>) -> Option<&mut TopicQueues> {
        let i = self.topic_index(name)?;
        Some(&mut self.topics[i])
    }

    fn queue(&mut self, tp: &TopicPartition) -> Option<&mut PartitionQueue> {
        self.topic_mut(&tp.0)?.queues.get_mut(tp.1 as usize)
    }
}

/// The producer's buffer (`buffer_bytes_max`) as byte permits. Sends waiting for space are
/// served first come, first served (a later small record never overtakes a waiting large one,
/// which a stream of small records could otherwise starve), as Kafka's buffer pool does.
#[derive(Debug)]
struct Memory {
    permits: Semaphore,
}

impl Memory {
    fn new(max: usize) -> Memory {
        Memory { permits: Semaphore::new(max) }
    }

    /// Waits for `bytes` of buffer (never more than the buffer holds: `send` refuses records
    /// over `batch_bytes_max`, which is at most `buffer_bytes_max`). [`Error::Closed`] once
    /// the producer closes, also for a send already waiting.
    async fn acquire(&self, bytes: usize) -> Result<()> {
        let n = u32::try_from(bytes).map_err(|_| Error::InvalidArgument(format!("record of {bytes} bytes")))?;
        let permit = self.permits.acquire_many(n).await.map_err(|_| Error::Closed)?;
        permit.forget(); // given back by `release`, once the record's batch is done
        Ok(())
    }

    fn release(&self, bytes: usize) {
        self.permits.add_permits(bytes);
    }

    /// Refuses every wait from now on, including those already waiting.
    fn close(&self) {
        self.permits.close();
    }
}

/// Buffer bytes a `send` holds until its record is added to a batch.
struct Reserved<'a> {
    memory: &'a Memory,
    bytes: usize,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.memory.release(self.bytes);
        }
    }
}

/// One `flush` in progress (linger is off while any is).
struct Flushing<'a>(&'a Inner);

impl Drop for Flushing<'_> {
    fn drop(&mut self) {
        self.0.state.lock().expect("producer state").flushing -= 1;
    }
}

#[derive(Debug)]
struct Inner {
    config: ProducerConfig,
    conn: Connection,
    state: Mutex<State>,
    /// Random id stamped into every batch: with per-partition sequence numbers it lets the
    /// broker recognise a retried batch it already stored.
    producer_id: i64,
    wake: Notify,
    memory: Memory,
    requests: Arc<Semaphore>,
    outstanding: AtomicUsize,
    /// Records whose delivery failed for good.
    failed: AtomicU64,
    closed: AtomicBool,
}

/// A batching, pipelining producer. Cheap to clone; clones share batches and the connection.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// # let broker = cairn_broker::EmbeddedBroker::start(dir.path())?;
/// # tokio::runtime::Runtime::new()?.block_on(async {
/// use cairn_client::{ConnectionConfig, Producer, ProducerConfig, ProducerRecord};
/// let connection = ConnectionConfig::default(); // 127.0.0.1:7070
/// # let connection = ConnectionConfig { broker: broker.addr().to_string(), ..connection };
/// # let admin = cairn_client::Admin::connect(connection.clone()).await?;
/// # admin.create_topic(cairn_client::NewTopic::new("events", 3)).await?;
/// let producer = Producer::connect(ProducerConfig { connection, ..ProducerConfig::default() }).await?;
/// let delivery = producer.send(ProducerRecord::new("events", "task 17 -> done").key("task-17")).await?;
/// let meta = delivery.await?;
/// println!("stored at partition {} offset {}", meta.partition, meta.offset);
/// # assert_eq!(meta.offset, 0);
/// producer.close().await?;
/// # Ok::<_, cairn_client::Error>(()) })?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Producer {
    inner: Arc<Inner>,
    /// Dropped with the last clone: the sender then delivers what is left and stops.
    _handle: Arc<Handle>,
}

/// Closes the producer when the last [`Producer`] clone is dropped without [`Producer::close`]:
/// the sender task holds the shared state too and would otherwise wait (and keep its
/// connection) for ever.
#[derive(Debug)]
struct Handle(Arc<Inner>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Release);
        self.0.memory.close();
        self.0.wake.notify_one();
    }
}

impl Producer {
    fn from_inner(inner: Arc<Inner>) -> Producer {
        Producer { _handle: Arc::new(Handle(Arc::clone(&inner))), inner }
    }
}

impl Producer {
    /// Connects and starts the sender task.
    ///
    /// # Errors
    /// Invalid settings or an unreachable broker.
    pub async fn connect(config: ProducerConfig) -> Result<Producer> {
        if config.batch_bytes_max < 1024 || config.buffer_bytes_max < config.batch_bytes_max {
            return Err(Error::InvalidArgument("batch_bytes_max must be >= 1024 and <= buffer_bytes_max".into()));
        }
        if config.buffer_bytes_max > Semaphore::MAX_PERMITS {
            return Err(Error::InvalidArgument(format!("buffer_bytes_max must be <= {}", Semaphore::MAX_PERMITS)));
        }
        if config.request_bytes_max < 1024 {
            return Err(Error::InvalidArgument("request_bytes_max must be >= 1024".into()));
        }
        let conn = Connection::connect(config.connection.clone()).await?;
        let inner = Arc::new(Inner {
            memory: Memory::new(config.buffer_bytes_max),
            requests: Arc::new(Semaphore::new(config.in_flight_requests_max.max(1))),
            config,
            conn,
            state: Mutex::new(State::default()),
            producer_id: random_producer_id(),
            wake: Notify::new(),
            outstanding: AtomicUsize::new(0),
            failed: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        });
        tokio::spawn(sender(Arc::clone(&inner)));
        Ok(Producer::from_inner(inner))
    }

    /// Asks the broker for `topic`'s partition count and records it: a topic seen for the first
    /// time gets its queues, a known one grows to the count (as a periodic refresh would).
    async fn fetch_partition_count(&self, topic: &Arc<str>) -> Result<()> {
        let (number, resp) =
            self.inner.conn.request_numbered(&MetadataRequest { topics: Some(vec![topic.to_string()]) }).await?;
        let t = resp.topics.into_iter().next().ok_or_else(|| Error::UnknownTopic(topic.to_string()))?;
        if !t.error.is_ok() || t.partitions.is_empty() {
            return Err(Error::UnknownTopic(topic.to_string()));
        }
        let n = t.partitions.len() as u32;
        let mut state = self.inner.state.lock().expect("producer state");
        match state.topic_mut(topic) {
            Some(known) => known.take_count(number, n),
            None => {
                let refresh_at = after(Instant::now(), self.inner.config.metadata_max_age);
                state.topics.push(TopicQueues::new(Arc::clone(topic), n, refresh_at, number));
            }
        }
        Ok(())
    }

    /// The state, locked, and the index of `topic` in it, if its metadata is known.
    fn lock_if_known(&self, topic: &Arc<str>) -> Option<(std::sync::MutexGuard<'_, State>, usize)> {
        let state = self.inner.state.lock().expect("producer state");
        let i = state.topic_index(topic)?;
        Some((state, i))
    }

    /// Adds a record to its partition's batch. Waits only when the buffer is full
    /// (backpressure). The returned [`Delivery`] resolves once the record is acknowledged.
    ///
    /// # Errors
    /// Unknown topic, invalid partition, a record larger than a batch, or a closed producer.
    pub async fn send(&self, record: ProducerRecord) -> Result<Delivery> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let timestamp = record.timestamp.unwrap_or_else(now_ms_coarse);
        let key = record.key.as_deref();
        let value = record.value.as_deref();
        let size = record_len_upper_bound(key, value, &record.headers);
        if size + BATCH_HEADER_LEN > inner.config.batch_bytes_max {
            return Err(Error::InvalidArgument(format!(
                "record of {size} bytes does not fit in batch_bytes_max {}",
                inner.config.batch_bytes_max
            )));
        }
        inner.memory.acquire(size).await?;
        // Given back on every early return, and if the caller drops this future while it waits
        // for metadata; the record's batch takes it over once the record is added.
        let mut reserved = Reserved { memory: &inner.memory, bytes: size };
        // One lock per record: the topic's partition count is looked up under the same lock
        // that appends, and metadata is fetched (without the lock) only the first time.
        // A partition past the known count may be one the topic gained since (recreated with
        // more): the broker is asked once before the record is refused.
        let mut asked = false;
        let (mut state, index) = loop {
            if let Some((state, i)) = self.lock_if_known(&record.topic) {
                if asked || record.partition.is_none_or(|p| p < state.topics[i].partitions) {
                    break (state, i);
                }
            }
            asked = true;
            self.fetch_partition_count(&record.topic).await?;
        };
        // Checked again under the lock the sender takes to decide to stop: a send that waited
        // for metadata while close() ran must not queue a record nothing will ever send.
        if inner.closed.load(Ordering::Acquire) {
            drop(state);
            return Err(Error::Closed);
        }
        let topic = &mut state.topics[index];
        topic.sent = true;
        let count = topic.partitions;
        if let Some(p) = record.partition {
            if p >= count {
                drop(state);
                return Err(Error::InvalidArgument(format!(
                    "partition {p} does not exist: {} has {count}",
                    record.topic
                )));
            }
        }
        let partition = match (record.partition, key) {
            (Some(p), _) => p,
            (None, Some(k)) => partition_for_key(k, count),
            (None, None) => topic.sticky,
        };
        let queue = &mut topic.queues[partition as usize];
        let mut sealed = false;
        if queue.open.as_ref().is_some_and(|o| o.builder.size_bytes() + size > inner.config.batch_bytes_max) {
            seal(queue, Instant::now());
            sealed = true;
        }
        let sequence = queue.next_sequence;
        let producer_id = inner.producer_id;
        let capacity = queue.batch_capacity(inner.config.batch_bytes_max);
        let open = queue.open.get_or_insert_with(|| OpenBatch {
            builder: RecordBatchBuilder::with_capacity(capacity)
                .producer(producer_id, 0, sequence)
                .pieces_hint(queue.last_batch_pieces + queue.last_batch_pieces / 4),
            created: Instant::now(),
            result: Arc::new(BatchResult { partition, outcome: OnceLock::new(), done: Notify::new() }),
            reserved: 0,
        });
        let first = open.builder.is_empty();
        let index = open.builder.len() as u32;
        open.builder.push_shared(timestamp, key, record.value.as_ref(), &record.headers);
        open.reserved += size;
        reserved.bytes = 0; // now the batch's
        let delivery = Delivery { batch: Arc::clone(&open.result), index };
        inner.outstanding.fetch_add(1, Ordering::AcqRel);
        if open.builder.size_bytes() + 64 >= inner.config.batch_bytes_max {
            seal(queue, Instant::now());
            sealed = true;
        }
        if sealed && record.partition.is_none() && key.is_none() && count > 1 {
            topic.sticky = (partition + 1) % count;
        }
        drop(state);
        if sealed || first {
            inner.wake.notify_one();
        }
        Ok(delivery)
    }

    /// Records whose delivery has failed for good since the producer was created (each one's
    /// [`Delivery`] has the error): a cheap check for a caller that does not await every
    /// delivery, such as a load generator after [`Producer::flush`].
    pub fn failed_records(&self) -> u64 {
        self.inner.failed.load(Ordering::Relaxed)
    }

    /// Sends everything buffered now and waits until every record sent so far is acknowledged
    /// or has failed.
    ///
    /// # Errors
    /// None today; reserved for a closed connection.
    pub async fn flush(&self) -> Result<()> {
        let inner = &self.inner;
        // The newest batch of every partition, as of now; records sent later (by clones of
        // this producer) are not waited for.
        let newest: Vec<Arc<BatchResult>> = {
            let mut state = inner.state.lock().expect("producer state");
            state.flushing += 1;
            let now = Instant::now();
            let mut newest = Vec::new();
            for q in state.topics.iter_mut().flat_map(|t| t.queues.iter_mut()) {
                seal(q, now);
                newest.extend(q.last_sealed.as_ref().filter(|r| r.outcome.get().is_none()).map(Arc::clone));
            }
            newest
        };
        // Ended on return and if the caller drops this future: linger applies again.
        let _flushing = Flushing(inner);
        inner.wake.notify_one();
        for batch in newest {
            batch.finished().await;
        }
        Ok(())
    }

    /// Refuses sends from here on (on every clone: they fail with [`Error::Closed`]), waits
    /// until every record sent before is acknowledged or has failed, and stops the sender.
    ///
    /// # Errors
    /// As [`Producer::flush`].
    pub async fn close(&self) -> Result<()> {
        // Closed first, then flushed: a clone's send racing close() is either refused or part
        // of the flush, never accepted after it (as Kafka's close).
        self.inner.closed.store(true, Ordering::Release);
        // Sends waiting for buffer space give up now, not once space frees.
        self.inner.memory.close();
        self.flush().await?;
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Records sent but not yet acknowledged or failed.
    pub fn outstanding(&self) -> usize {
        self.inner.outstanding.load(Ordering::Acquire)
    }
}

/// Moves the open batch to the ready queue; it may be sent from `now` on. Callers pass the clock
/// reading their decisions are based on: a later reading would make the batch look not yet
/// sendable to the `collect` pass that sealed it, delaying it by a timer tick.
fn seal(queue: &mut PartitionQueue, now: Instant) {
    if let Some(open) = queue.open.take() {
        queue.last_sealed = Some(Arc::clone(&open.result));
        let records = open.builder.len();
        queue.last_batch_bytes = open.builder.inline_bytes();
        queue.last_batch_pieces = open.builder.pieces();
        queue.next_sequence = queue.next_sequence.wrapping_add(records as i32) & i32::MAX;
        queue.ready.push_back(SealedBatch {
            len: open.builder.size_bytes(),
            payload: open.builder.build_payload(),
            result: open.result,
            records,
            reserved: open.reserved,
            created: open.created,
            last_error: None,
            attempts: 0,
            not_before: now,
        });
    }
}

/// A random non-negative producer id (clock nanos mixed with the process id and an address).
fn random_producer_id() -> i64 {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let local = 0u8;
    let mut x = nanos ^ (u64::from(std::process::id()) << 32) ^ (&local as *const u8 as u64);
    // splitmix64 finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (x & (i64::MAX as u64)) as i64
}

/// Wall-clock ms from the coarse clock (a few ns instead of a full clock read per record; its
/// resolution, a few ms, is finer than Kafka clients' usual timestamp use).
fn now_ms_coarse() -> i64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
    t.tv_sec * 1000 + t.tv_nsec / 1_000_000
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// What one pass of the sender found to do.
#[derive(Debug, Default)]
struct Pass {
    /// At most one batch per partition.
    batches: Vec<Sendable>,
    /// When to look again, if nothing wakes the sender before.
    next: Option<Instant>,
    /// Topics whose partition count is to be fetched again.
    refresh: Vec<Arc<str>>,
}

/// Takes at most one sendable batch per partition, and the topics due for a metadata refresh.
/// Batches past `delivery_timeout` that wait behind no request fail here, unsent.
fn collect(inner: &Inner) -> Pass {
    let mut expired = Vec::new();
    let found = collect_locked(inner, &mut expired);
    let timeout = inner.config.delivery_timeout;
    for mut b in expired {
        let why = b.last_error.take();
        let why = why.unwrap_or(Error::Timeout { operation: "produce delivery", ms: timeout.as_millis() as u64 });
        finish(inner, b, Err(why));
    }
    found
}

fn collect_locked(inner: &Inner, expired: &mut Vec<SealedBatch>) -> Pass {
    let mut state = inner.state.lock().expect("producer state");
    // Read the clock under the lock: every batch seen here was created before it.
    let now = Instant::now();
    let flushing = state.flushing > 0 || inner.closed.load(Ordering::Acquire);
    let mut out = Vec::new();
    let mut next: Option<Instant> = None;
    let mut refresh = Vec::new();
    let mut budget = inner.config.request_bytes_max;
    for topic in state.topics.iter_mut() {
        if topic.refresh_at <= now && topic.sent && !topic.refreshing {
            topic.refreshing = true;
            topic.sent = false;
            refresh.push(Arc::clone(&topic.name));
        }
        for (partition, q) in topic.queues.iter_mut().enumerate() {
            if q.in_flight {
                continue;
            }
            if q.ready.is_empty() {
                if let Some(open) = &q.open {
                    let due = after(open.created, inner.config.linger);
                    if flushing || due <= now {
                        seal(q, now);
                    } else {
                        next = Some(next.map_or(due, |n| n.min(due)));
                    }
                }
            }
            while q.ready.front().is_some_and(|b| now >= after(b.created, inner.config.delivery_timeout)) {
                expired.extend(q.ready.pop_front());
            }
            let Some(front) = q.ready.front() else { continue };
            if front.not_before > now {
                next = Some(next.map_or(front.not_before, |n| n.min(front.not_before)));
                continue;
            }
            if front.len > budget && !out.is_empty() {
                next = Some(now);
                continue;
            }
            let batch = q.ready.pop_front().expect("front exists");
            budget = budget.saturating_sub(batch.len);
            // One batch per partition in flight, for acks=none too: until it is written to the
            // connection, a later batch could overtake it (and the broker would refuse the
            // earlier one's now older sequence, silently with acks=none).
            q.in_flight = true;
            out.push(((Arc::clone(&topic.name), partition as u32), batch));
        }
    }
    Pass { batches: out, next, refresh }
}

async fn sender(inner: Arc<Inner>) {
    loop {
        let Pass { batches, next, refresh } = collect(&inner);
        if !refresh.is_empty() {
            tokio::spawn(refresh_metadata(Arc::clone(&inner), refresh));
        }
        if batches.is_empty() {
            // Under the state lock, so that no send can slip a record in after this check.
            let done = {
                let _state = inner.state.lock().expect("producer state");
                inner.closed.load(Ordering::Acquire) && inner.outstanding.load(Ordering::Acquire) == 0
            };
            if done {
                return;
            }
            let wake = inner.wake.notified();
            match next {
                Some(at) => {
                    let _ = tokio::time::timeout_at(at.into(), wake).await;
                }
                None => {
                    let _ = tokio::time::timeout(Duration::from_millis(100), wake).await;
                }
            }
            continue;
        }
        let Ok(permit) = Arc::clone(&inner.requests).acquire_owned().await else {
            return;
        };
        let inner2 = Arc::clone(&inner);
        tokio::spawn(async move {
            send_request(&inner2, batches).await;
            drop(permit);
            inner2.wake.notify_one();
        });
    }
}

/// Fetches the partition counts of `topics` again. A topic that grew gets queues for its new
/// partitions, and keyed records spread over all of them from then on. A failed fetch keeps the
/// count it had and is tried again after `retry_backoff`.
async fn refresh_metadata(inner: Arc<Inner>, topics: Vec<Arc<str>>) {
    let request = MetadataRequest { topics: Some(topics.iter().map(|t| t.to_string()).collect()) };
    let fetched = inner.conn.request_numbered(&request).await;
    let now = Instant::now();
    let mut state = inner.state.lock().expect("producer state");
    for name in &topics {
        let Some(topic) = state.topic_mut(name) else { continue };
        topic.refreshing = false;
        let again = std::mem::take(&mut topic.refresh_again);
        let found = fetched.as_ref().ok().and_then(|(number, resp)| {
            let t = resp.topics.iter().find(|t| *t.name == **name && t.error.is_ok() && !t.partitions.is_empty());
            t.map(|t| (*number, t.partitions.len() as u32))
        });
        match found {
            Some((number, partitions)) => {
                topic.take_count(number, partitions);
                topic.refresh_failures = 0;
                topic.refresh_at = after(now, inner.config.metadata_max_age);
            }
            None => {
                // Tried again only while records are still sent to it, backing off.
                let backoff =
                    doubled(inner.config.retry_backoff, topic.refresh_failures, inner.config.metadata_max_age);
                topic.refresh_failures += 1;
                topic.refresh_at = after(now, backoff);
            }
        }
        if again {
            topic.refresh_at = now;
            topic.sent = true;
        }
    }
}

async fn send_request(inner: &Arc<Inner>, mut batches: Vec<Sendable>) {
    let mut by_topic: Vec<ProduceTopic> = Vec::new();
    for ((topic, partition), b) in batches.iter_mut() {
        b.attempts += 1;
        let part = ProducePartition { partition: *partition, records: b.payload.clone() };
        match by_topic.iter_mut().find(|t| *t.name == **topic) {
            Some(t) => t.partitions.push(part),
            None => by_topic.push(ProduceTopic { name: topic.to_string(), partitions: vec![part] }),
        }
    }
    // The broker's timer starts when the request arrives, after this side's: asked for the
    // whole request timeout, its REQUEST_TIMED_OUT would come just after this side had given up
    // and closed the connection (failing every request in flight on it). Nine tenths of it
    // leave the answer time to arrive.
    let request_timeout = inner.config.connection.request_timeout;
    let timeout_ms = (request_timeout - request_timeout / 10).as_millis().min(u128::from(u32::MAX)) as u32;
    let req = ProduceRequest { acks: inner.config.acks, timeout_ms, topics: by_topic };
    if inner.config.acks == Acks::None {
        let result = inner.conn.send_only(&req).await;
        for (tp, b) in batches {
            let outcome = match &result {
                Ok(()) => Ok(-1),
                Err(e) => Err(e.duplicate()),
            };
            complete(inner, &tp, b, outcome);
        }
        return;
    }
    match inner.conn.request(&req).await {
        Ok(mut resp) => {
            // Matched by the response's own names and the batches' topics: no allocation per
            // partition.
            let outcomes: Vec<(ErrorCode, Option<String>, i64)> = {
                let mut results: HashMap<(&str, u32), (ErrorCode, Option<String>, i64)> = HashMap::new();
                for t in &mut resp.topics {
                    for p in &mut t.partitions {
                        results.insert((t.name.as_str(), p.partition), (p.error, p.message.take(), p.base_offset));
                    }
                }
                batches
                    .iter()
                    .map(|(tp, _)| {
                        results.remove(&(&*tp.0, tp.1)).unwrap_or((
                            ErrorCode::Unknown,
                            Some("no result for partition".into()),
                            -1,
                        ))
                    })
                    .collect()
            };
            for ((tp, b), (code, message, base)) in batches.into_iter().zip(outcomes) {
                if code == ErrorCode::UnknownTopicOrPartition {
                    refresh_soon(inner, &tp.0);
                }
                if code.is_ok() {
                    complete(inner, &tp, b, Ok(base));
                } else if code.is_retriable() {
                    retry(inner, tp, b, broker_error(code, message));
                } else {
                    complete(inner, &tp, b, Err(broker_error(code, message)));
                }
            }
        }
        Err(e) => {
            for (tp, b) in batches {
                if e.is_retriable() {
                    retry(inner, tp, b, e.duplicate());
                } else {
                    complete(inner, &tp, b, Err(e.duplicate()));
                }
            }
        }
    }
}

/// Has the sender fetch `topic`'s partition count on its next pass: the broker no longer knows
/// one of its partitions (deleted, or recreated with fewer).
fn refresh_soon(inner: &Inner, topic: &Arc<str>) {
    if let Some(t) = inner.state.lock().expect("producer state").topic_mut(topic) {
        t.refresh_at = t.refresh_at.min(Instant::now());
        t.sent = true;
        t.refresh_again = t.refreshing;
    }
}

/// `base` doubled `times` times, at most `cap`: the backoff of retries and of metadata fetches.
fn doubled(base: Duration, times: u32, cap: Duration) -> Duration {
    base.saturating_mul(1 << times.min(16)).min(cap)
}

/// `at + d`, or a century later where that does not fit (a timeout of `Duration::MAX` means
/// never; adding it as such would panic, under the state lock).
fn after(at: Instant, d: Duration) -> Instant {
    at.checked_add(d).unwrap_or_else(|| at + Duration::from_secs(100 * 365 * 86_400))
}

/// A broker's error for one partition, with the code's own text when the broker sent none.
fn broker_error(code: ErrorCode, message: Option<String>) -> Error {
    Error::broker(code, Some(message.unwrap_or_else(|| code.message().to_owned())))
}

fn retry(inner: &Arc<Inner>, tp: TopicPartition, mut b: SealedBatch, why: Error) {
    let backoff = doubled(inner.config.retry_backoff, b.attempts.saturating_sub(1), Duration::from_secs(1));
    let retry_at = Instant::now() + backoff;
    if retry_at >= after(b.created, inner.config.delivery_timeout) {
        // No attempt left before the deadline: fail now, with this attempt's error.
        complete(inner, &tp, b, Err(why));
        return;
    }
    tracing::debug!(topic = %tp.0, partition = tp.1, attempt = b.attempts, error = %why, "retrying batch");
    b.not_before = retry_at;
    let mut state = inner.state.lock().expect("producer state");
    match state.queue(&tp) {
        Some(q) => {
            b.last_error = Some(why);
            q.ready.push_front(b);
            q.in_flight = false;
        }
        None => {
            drop(state);
            finish(inner, b, Err(why));
        }
    }
}

/// Ends a batch's last attempt: its outcome first, then its partition may send the next one.
/// The other order let the next batch be sent and finish before this one's outcome was set,
/// so that a flush waiting for the partition's newest batch could return while this one was
/// still pending.
fn complete(inner: &Inner, tp: &TopicPartition, b: SealedBatch, outcome: Outcome) {
    finish(inner, b, outcome);
    release_partition(inner, tp);
}

fn release_partition(inner: &Inner, tp: &TopicPartition) {
    if let Some(q) = inner.state.lock().expect("producer state").queue(tp) {
        q.in_flight = false;
    }
}

fn finish(inner: &Inner, b: SealedBatch, outcome: Outcome) {
    if outcome.is_err() {
        inner.failed.fetch_add(b.records as u64, Ordering::Relaxed);
    }
    // Counted out before the result wakes anyone (a flush, a `Delivery`), which may run on
    // another thread and read `outstanding` at once.
    inner.memory.release(b.reserved);
    inner.outstanding.fetch_sub(b.records, Ordering::AcqRel);
    b.result.complete(outcome);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls `f` once.
    fn poll_once<F: Future + Unpin>(f: &mut F) -> std::task::Poll<F::Output> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        Pin::new(f).poll(&mut cx)
    }

    #[tokio::test]
    async fn buffer_space_goes_to_sends_in_the_order_they_waited() {
        let memory = Memory::new(100);
        memory.acquire(60).await.unwrap();
        let mut large = Box::pin(memory.acquire(50));
        assert!(poll_once(&mut large).is_pending());
        // 30 more would fit, but the send that waited first is served first: a stream of
        // small records must not starve a large one.
        let mut small = Box::pin(memory.acquire(30));
        assert!(poll_once(&mut small).is_pending(), "a later, smaller send overtook a waiting one");
        memory.release(60);
        assert!(poll_once(&mut large).is_ready());
        assert!(poll_once(&mut small).is_ready());
    }

    #[test]
    fn linger_ms_sets_the_linger() {
        let config = ProducerConfig::default().linger_ms(2);
        assert_eq!(config.linger, Duration::from_millis(2));
        assert_eq!(ProducerConfig::default().linger_ms(0).linger, Duration::ZERO);
    }

    /// A producer that knows `topic` already and has not connected (nothing here sends).
    fn offline(config: ProducerConfig, topic: &Arc<str>, partitions: u32) -> Producer {
        let state = State {
            topics: vec![TopicQueues::new(
                Arc::clone(topic),
                partitions,
                Instant::now() + Duration::from_secs(3600),
                0,
            )],
            flushing: 0,
        };
        let inner = Arc::new(Inner {
            memory: Memory::new(config.buffer_bytes_max),
            requests: Arc::new(Semaphore::new(1)),
            conn: Connection::new(config.connection.clone()),
            config,
            state: Mutex::new(state),
            producer_id: 1,
            wake: Notify::new(),
            outstanding: AtomicUsize::new(0),
            failed: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        });
        Producer::from_inner(inner)
    }

    #[tokio::test]
    async fn a_broker_that_answers_at_its_produce_timeout_is_heard_before_the_request_times_out() {
        use cairn_protocol::io::write_all_vectored;
        use cairn_protocol::messages::produce::{ProducePartitionResponse, ProduceResponse, ProduceTopicResponse};
        use cairn_protocol::{decode_request, encode_response, AnyRequest, FrameCodec};
        use futures::StreamExt;
        // A broker whose syncs stall: it answers REQUEST_TIMED_OUT once the request's own
        // timeout has passed, a few milliseconds late, as a broker does.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (rd, wr) = socket.into_split();
                    let wr = Arc::new(tokio::sync::Mutex::new(wr));
                    let mut frames = tokio_util::codec::FramedRead::new(rd, FrameCodec::new(1 << 20));
                    while let Some(Ok(frame)) = frames.next().await {
                        let Ok((header, AnyRequest::Produce(req))) = decode_request(frame) else { continue };
                        let wr = Arc::clone(&wr);
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_millis(u64::from(req.timeout_ms) + 5)).await;
                            let partition = |p: &ProducePartition| ProducePartitionResponse {
                                partition: p.partition,
                                error: ErrorCode::RequestTimedOut,
                                message: None,
                                base_offset: -1,
                                log_append_time_ms: -1,
                                log_start_offset: 0,
                            };
                            let topics = req
                                .topics
                                .iter()
                                .map(|t| ProduceTopicResponse {
                                    name: t.name.clone(),
                                    partitions: t.partitions.iter().map(partition).collect(),
                                })
                                .collect();
                            let mut out = encode_response(header.correlation_id, &ProduceResponse { topics });
                            let _ = write_all_vectored(&mut *wr.lock().await, &mut out).await;
                        });
                    }
                });
            }
        });
        let config = ProducerConfig {
            connection: ConnectionConfig {
                broker: addr,
                request_timeout: Duration::from_millis(300),
                ..ConnectionConfig::default()
            },
            acks: Acks::All,
            // One attempt: the retry's backoff would end past the deadline.
            delivery_timeout: Duration::from_millis(350),
            ..ProducerConfig::default()
        };
        let topic: Arc<str> = Arc::from("t");
        let p = offline(config, &topic, 1);
        tokio::spawn(sender(Arc::clone(&p.inner)));
        let err = p.send(ProducerRecord::new(Arc::clone(&topic), "v")).await.unwrap().await.unwrap_err();
        assert!(matches!(err, Error::Broker { code: ErrorCode::RequestTimedOut, .. }), "{err:?}");
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "the connection was kept");
    }

    #[test]
    fn a_finished_delivery_is_no_longer_counted_as_outstanding() {
        // Whoever a completed batch wakes (a flush, a `Delivery`) must find its records counted
        // out already: the flusher runs on another thread from the one finishing the batch.
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let topic: Arc<str> = Arc::from("t");
        let p = offline(ProducerConfig { linger: Duration::ZERO, ..ProducerConfig::default() }, &topic, 1);
        let inner = Arc::clone(&p.inner);
        let seen = runtime.block_on(async {
            let mut counted_after_finish = 0;
            for _ in 0..20_000 {
                let delivery = p.send(ProducerRecord::new(Arc::clone(&topic), "v")).await.unwrap();
                let Pass { mut batches, .. } = collect(&inner);
                let (tp, batch) = batches.pop().expect("one batch");
                let waiter = {
                    let p = p.clone();
                    tokio::spawn(async move {
                        delivery.await.unwrap();
                        p.outstanding()
                    })
                };
                tokio::task::yield_now().await;
                release_partition(&inner, &tp);
                finish(&inner, batch, Ok(0));
                counted_after_finish += waiter.await.unwrap();
            }
            counted_after_finish
        });
        assert_eq!(seen, 0, "records still counted as outstanding after their delivery completed");
    }

    #[test]
    fn retries_back_off_as_the_readme_says_doubling_up_to_the_cap() {
        let ms = Duration::from_millis;
        // The n-th retry waits retry_backoff * 2^(n-1), capped at 1 s.
        let waits: Vec<Duration> = (0..8).map(|n| doubled(ms(10), n, Duration::from_secs(1))).collect();
        assert_eq!(waits, vec![ms(10), ms(20), ms(40), ms(80), ms(160), ms(320), ms(640), ms(1000)]);
        assert_eq!(doubled(ms(100), u32::MAX, Duration::MAX), ms(100) * 65_536, "no overflow");
    }

    /// Makes `topic`'s partition count due for a fetch.
    fn refresh_due(p: &Producer, topic: &Arc<str>) {
        p.inner.state.lock().unwrap().topic_mut(topic).unwrap().refresh_at = Instant::now();
    }

    #[tokio::test]
    async fn only_topics_still_sent_to_have_their_partition_count_fetched_again() {
        let topic: Arc<str> = Arc::from("t");
        let p = offline(ProducerConfig::default(), &topic, 1);
        refresh_due(&p, &topic);
        // A topic nobody sends to (deleted, maybe): no metadata request for it, ever.
        assert!(collect(&p.inner).refresh.is_empty());
        let _delivery = p.send(ProducerRecord::new(Arc::clone(&topic), "v")).await.unwrap();
        assert_eq!(collect(&p.inner).refresh, vec![Arc::clone(&topic)]);
        assert!(collect(&p.inner).refresh.is_empty(), "one fetch at a time");
    }

    #[tokio::test]
    async fn a_missing_partition_reported_during_a_fetch_is_fetched_again_after_it() {
        // A broker address nothing listens on: the fetch fails at once.
        let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = unused.local_addr().unwrap().to_string();
        drop(unused);
        let config = ProducerConfig {
            connection: ConnectionConfig { broker: addr, ..ConnectionConfig::default() },
            ..ProducerConfig::default()
        };
        let topic: Arc<str> = Arc::from("t");
        let p = offline(config, &topic, 1);
        let _delivery = p.send(ProducerRecord::new(Arc::clone(&topic), "v")).await.unwrap();
        refresh_due(&p, &topic);
        assert_eq!(collect(&p.inner).refresh.len(), 1, "a fetch starts");
        // The broker answers UNKNOWN_TOPIC_OR_PARTITION while that fetch is under way.
        refresh_soon(&p.inner, &topic);
        refresh_metadata(Arc::clone(&p.inner), vec![Arc::clone(&topic)]).await;
        assert_eq!(collect(&p.inner).refresh.len(), 1, "fetched again at once, not after a backoff");
    }

    #[tokio::test]
    async fn an_older_partition_count_answered_last_does_not_replace_a_newer_one() {
        use cairn_protocol::io::write_all_vectored;
        use cairn_protocol::messages::metadata::{MetadataResponse, PartitionMetadata, TopicMetadata};
        use cairn_protocol::{decode_request, encode_response, AnyRequest, FrameCodec};
        use futures::StreamExt;
        // A periodic fetch asks first, while the topic has 4 partitions; the topic is then
        // recreated with 8 and a send asks again. The older answer is handled last: here the
        // broker holds it back until the newer one is taken; in a client, the task that
        // awaits it may simply run later.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let first_asked = Arc::new(Notify::new());
        let asked = Arc::clone(&first_asked);
        let older_may_go = Arc::new(Notify::new());
        let go = Arc::clone(&older_may_go);
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let (rd, mut wr) = socket.into_split();
            let mut frames = tokio_util::codec::FramedRead::new(rd, FrameCodec::new(1 << 20));
            let answer = |id: u32, partitions: u32| {
                let partitions = (0..partitions)
                    .map(|partition| PartitionMetadata {
                        partition,
                        error: ErrorCode::None,
                        log_start_offset: 0,
                        log_end_offset: 0,
                    })
                    .collect();
                let topic = TopicMetadata {
                    error: ErrorCode::None,
                    name: "t".into(),
                    internal: false,
                    configs: vec![],
                    partitions,
                };
                encode_response(id, &MetadataResponse { topics: vec![topic] })
            };
            let mut ids = Vec::new();
            while ids.len() < 2 {
                let frame = frames.next().await.unwrap().unwrap();
                if let Ok((header, AnyRequest::Metadata(_))) = decode_request(frame) {
                    ids.push(header.correlation_id);
                    asked.notify_one();
                }
            }
            write_all_vectored(&mut wr, &mut answer(ids[1], 8)).await.unwrap();
            go.notified().await;
            write_all_vectored(&mut wr, &mut answer(ids[0], 4)).await.unwrap();
            let _ = frames.next().await; // keep the connection until the client is done
        });
        let config = ProducerConfig {
            connection: ConnectionConfig { broker: addr, ..ConnectionConfig::default() },
            ..ProducerConfig::default()
        };
        let topic: Arc<str> = Arc::from("t");
        let p = offline(config, &topic, 4);
        let periodic = tokio::spawn(refresh_metadata(Arc::clone(&p.inner), vec![Arc::clone(&topic)]));
        first_asked.notified().await;
        p.fetch_partition_count(&topic).await.unwrap();
        assert_eq!(p.inner.state.lock().unwrap().topics[0].partitions, 8);
        older_may_go.notify_one();
        periodic.await.unwrap();
        let state = p.inner.state.lock().unwrap();
        assert_eq!(state.topics[0].partitions, 8, "the newer answer stands");
    }

    #[tokio::test]
    async fn timeouts_of_duration_max_mean_never_and_do_not_panic() {
        let topic: Arc<str> = Arc::from("t");
        let config = ProducerConfig {
            delivery_timeout: Duration::MAX,
            metadata_max_age: Duration::MAX,
            linger: Duration::MAX,
            ..ProducerConfig::default()
        };
        let p = offline(config, &topic, 1);
        let _delivery = p.send(ProducerRecord::new(Arc::clone(&topic), "v")).await.unwrap();
        let Pass { batches, next, .. } = collect(&p.inner);
        assert!(batches.is_empty(), "lingering");
        assert!(next.is_some());
    }

    #[tokio::test]
    async fn a_batch_whose_linger_has_passed_goes_out_in_the_pass_that_seals_it() {
        let topic: Arc<str> = Arc::from("t");
        let p = offline(ProducerConfig { linger: Duration::ZERO, ..ProducerConfig::default() }, &topic, 1);
        for _ in 0..100 {
            let _delivery = p.send(ProducerRecord::new(Arc::clone(&topic), "v")).await.unwrap();
            let Pass { batches, next, .. } = collect(&p.inner);
            assert_eq!(batches.len(), 1, "the batch must go now, not at the next timer tick ({next:?})");
            release_partition(&p.inner, &batches[0].0);
        }
    }

    #[tokio::test]
    async fn a_lingering_batch_waits_until_its_linger_has_passed() {
        let topic: Arc<str> = Arc::from("t");
        let linger = Duration::from_millis(200);
        let p = offline(ProducerConfig { linger, ..ProducerConfig::default() }, &topic, 1);
        let before = Instant::now();
        let _delivery = p.send(ProducerRecord::new(Arc::clone(&topic), "v")).await.unwrap();
        let Pass { batches, next, .. } = collect(&p.inner);
        assert!(batches.is_empty());
        let next = next.expect("a time to look again");
        assert!(next >= before + linger && next <= Instant::now() + linger, "look again when the linger ends");
    }

    #[tokio::test]
    async fn batches_queued_behind_a_failing_one_expire_with_it_not_one_after_another() {
        let topic: Arc<str> = Arc::from("t");
        let delivery_timeout = Duration::from_millis(300);
        let config = ProducerConfig {
            // Nothing listens there: every attempt fails at once, and is retried.
            connection: ConnectionConfig { broker: "127.0.0.1:1".into(), ..ConnectionConfig::default() },
            linger: Duration::from_secs(3600),
            delivery_timeout,
            ..ProducerConfig::default()
        };
        let p = offline(config, &topic, 1);
        let mut deliveries = Vec::new();
        for _ in 0..20 {
            deliveries.push(p.send(ProducerRecord::new(Arc::clone(&topic), "v")).await.unwrap());
            seal(&mut p.inner.state.lock().unwrap().topics[0].queues[0], Instant::now());
        }
        let started = Instant::now();
        tokio::spawn(sender(Arc::clone(&p.inner)));
        for d in deliveries {
            assert!(d.await.is_err(), "nothing can deliver");
        }
        // The timeout counts from `send`, as Kafka's delivery.timeout.ms: the twenty batches
        // fail together, not 20 timeouts after the first send (6 s).
        assert!(started.elapsed() < delivery_timeout * 10, "took {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn a_delivery_awaited_late_says_when_it_finished() {
        let batch = Arc::new(BatchResult { partition: 3, outcome: OnceLock::new(), done: Notify::new() });
        let delivery = Delivery { batch: Arc::clone(&batch), index: 2 };
        batch.complete(Ok(40));
        let finished = Instant::now();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (result, at) = delivery.wait_timed().await;
        assert_eq!(result.unwrap(), RecordMetadata { partition: 3, offset: 42 });
        assert!(at <= finished, "the acknowledgement's time, not the wait's");
    }

    #[test]
    fn batch_buffers_are_sized_from_the_last_batch_of_the_partition() {
        let mut q = PartitionQueue::default();
        assert_eq!(q.batch_capacity(512 * 1024), 256, "first batch");
        q.last_batch_bytes = 1100;
        assert_eq!(q.batch_capacity(512 * 1024), 2048, "a partition that gets a record or two");
        q.last_batch_bytes = 300;
        assert_eq!(q.batch_capacity(512 * 1024), 512, "values sent by reference: the heads only");
        q.last_batch_bytes = 512 * 1024 - 10;
        assert_eq!(q.batch_capacity(512 * 1024), 512 * 1024, "full batches: the maximum");
        q.last_batch_bytes = 10;
        assert_eq!(q.batch_capacity(512 * 1024), 256, "never below 256 bytes");
    }
}
