//! The workloads: produce, consume, and end-to-end latency at a fixed rate.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};

use cairn_client::{
    Acks, Admin, ConnectionConfig, Consumer, ConsumerConfig, Error, ErrorCode, NewTopic, Offset, Producer,
    ProducerConfig, ProducerRecord, RecordMetadata,
};

use crate::latency::{curve, histogram, percentiles};
use crate::report::Report;

/// Options shared by every workload.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Broker address.
    pub broker: String,
    /// Topic (created if missing).
    pub topic: String,
    /// Partitions of the topic: created with these (1 if `None`); a topic that exists must have
    /// as many, when given.
    pub partitions: Option<u32>,
    /// Concurrent producers, each with its own connection.
    pub producers: usize,
    /// Concurrent consumers, each with its own connection.
    pub consumers: usize,
    /// Records to measure (warm-up excluded); `None` runs for `duration`.
    pub messages: Option<u64>,
    /// How long to run when `messages` is not set.
    pub duration: Duration,
    /// Record value size in bytes.
    pub size: usize,
    /// Producer batch size.
    pub batch_bytes: usize,
    /// Producer linger.
    pub linger: Duration,
    /// Producer acks.
    pub acks: Acks,
    /// Fixed total send rate in records/s (`None` = as fast as possible).
    pub rate: Option<u64>,
    /// Number of distinct keys (0 = keyless).
    pub keys: u64,
    /// Unmeasured warm-up: records per producer (produce, e2e), or records a throwaway
    /// consumer reads first (consume).
    pub warmup: u64,
    /// Print progress while running.
    pub progress: bool,
    /// The command line, for the report.
    pub command: String,
}

fn conn(opts: &Opts, name: &str) -> ConnectionConfig {
    ConnectionConfig {
        broker: opts.broker.clone(),
        client_id: name.into(),
        request_timeout: Duration::from_secs(60),
        ..ConnectionConfig::default()
    }
}

/// Creates the topic if it does not exist, and returns its partitions. One that exists is used
/// as it is, unless `--partitions` asks for another partition count: a run must not report on a
/// layout other than the one its command line names.
pub async fn ensure_topic(opts: &Opts) -> anyhow::Result<Vec<u32>> {
    let admin = Admin::connect(conn(opts, "cairn-bench")).await?;
    match admin.create_topic(NewTopic::new(opts.topic.clone(), opts.partitions.unwrap_or(1))).await {
        Ok(()) | Err(Error::Broker { code: ErrorCode::TopicAlreadyExists, .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let partitions: Vec<u32> =
        admin.describe_topic(&opts.topic).await?.partitions.iter().map(|p| p.partition).collect();
    check_partitions(opts, partitions.len())?;
    Ok(partitions)
}

/// Fails if `--partitions` asks for another count than the topic's `has`: a run must not
/// report on a layout its command line does not name.
fn check_partitions(opts: &Opts, has: usize) -> anyhow::Result<()> {
    match opts.partitions {
        Some(asked) if has != asked as usize => anyhow::bail!(
            "topic {} exists with {has} partitions, not the {asked} that --partitions asks for: \
             use another --topic, or delete it first (cairn topic delete {})",
            opts.topic,
            opts.topic
        ),
        _ => Ok(()),
    }
}

fn now_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// Counts progress and samples throughput once a second.
struct Meter {
    count: AtomicU64,
    done: AtomicBool,
    timeline: Mutex<Vec<f64>>,
}

impl Meter {
    fn new() -> Arc<Meter> {
        Arc::new(Meter { count: AtomicU64::new(0), done: AtomicBool::new(false), timeline: Mutex::new(Vec::new()) })
    }

    fn spawn(self: &Arc<Meter>, total: Option<u64>, show: bool, label: &str) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let bar = (show && tty).then(|| {
            let pb = total.map_or_else(ProgressBar::new_spinner, ProgressBar::new);
            pb.set_style(
                ProgressStyle::with_template("{spinner} {msg} [{elapsed_precise}] {bar:40} {pos}/{len} ({per_sec})")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            pb.set_message(label.to_owned());
            pb
        });
        let label = label.to_owned();
        tokio::spawn(async move {
            let mut last = 0;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let mut secs = 0;
            while !me.done.load(Ordering::Acquire) {
                tick.tick().await;
                secs += 1;
                let now = me.count.load(Ordering::Relaxed);
                let rate = (now - last) as f64;
                last = now;
                me.timeline.lock().expect("timeline").push(rate);
                match &bar {
                    Some(pb) => pb.set_position(now),
                    None if show => {
                        eprintln!("[{secs:>4}s] {label}: {now} records, {rate:.0} records/s")
                    }
                    None => {}
                }
            }
            if let Some(pb) = bar {
                pb.finish_and_clear();
            }
        })
    }

    fn finish(&self) -> Vec<f64> {
        self.done.store(true, Ordering::Release);
        self.timeline.lock().expect("timeline").clone()
    }
}

/// The value every record of a run carries. Static, so that sharing it costs nothing per record
/// (a reference-counted buffer would add two atomic operations to every send): one small
/// allocation per run is never freed.
fn value_of(size: usize) -> Bytes {
    let value: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
    Bytes::from_static(Box::leak(value.into_boxed_slice()))
}

async fn producers(opts: &Opts) -> anyhow::Result<Vec<Producer>> {
    let mut out = Vec::with_capacity(opts.producers);
    for i in 0..opts.producers {
        let config = ProducerConfig {
            connection: conn(opts, &format!("bench-producer-{i}")),
            acks: opts.acks,
            batch_bytes_max: opts.batch_bytes,
            linger: opts.linger,
            ..ProducerConfig::default()
        };
        out.push(Producer::connect(config).await?);
    }
    Ok(out)
}

/// What a set of producers sends, and where it reports.
#[derive(Clone)]
struct SendPlan {
    opts: Opts,
    /// Records to send over all producers; `None` sends until `deadline`.
    count: Option<u64>,
    deadline: Option<Instant>,
    /// Total records/s over all producers; `None` is as fast as possible.
    rate: Option<f64>,
    /// Where to record the delivery latency of every 64th record.
    hist: Option<Arc<Mutex<Histogram<u64>>>>,
    meter: Option<Arc<Meter>>,
    /// Stamp the (intended) send time into the first 8 bytes of each value.
    stamp: bool,
    /// The keys records cycle through (empty: keyless), made once per run before any clock
    /// starts and shared by every producer.
    keys: Arc<[Bytes]>,
}

impl SendPlan {
    fn new(opts: &Opts, count: Option<u64>, keys: &Arc<[Bytes]>) -> SendPlan {
        SendPlan {
            opts: opts.clone(),
            count,
            deadline: None,
            rate: None,
            hist: None,
            meter: None,
            stamp: false,
            keys: Arc::clone(keys),
        }
    }
}

/// The `--keys` distinct keys of a run.
fn keys_of(opts: &Opts) -> Arc<[Bytes]> {
    (0..opts.keys).map(|k| Bytes::from(format!("key-{k}"))).collect()
}

/// Starts sending. As fast as possible, each producer gets its own task and an equal share of
/// `count`. At a fixed rate, one OS thread drives every producer round robin and waits for each
/// record's slot with a precise sleep: tokio's timers tick in whole milliseconds, which alone
/// would add up to a millisecond to every paced record's measured latency, and one thread per
/// producer would spend the two cores on wake-ups.
fn start_senders(producers: Vec<Producer>, plan: SendPlan) -> Vec<tokio::task::JoinHandle<anyhow::Result<u64>>> {
    if plan.rate.is_none() {
        let n = producers.len().max(1) as u64;
        // Exactly `count` in all: the first `count % n` producers send one more.
        let share = |i: u64| plan.count.map(|c| c / n + u64::from(i < c % n));
        return producers
            .into_iter()
            .enumerate()
            .map(|(i, p)| tokio::spawn(send_records(vec![p], SendPlan { count: share(i as u64), ..plan.clone() })))
            .collect();
    }
    let handle = tokio::runtime::Handle::current();
    vec![tokio::task::spawn_blocking(move || {
        // Wake from sleeps on time, not up to the default 50 µs late.
        let _ = rustix::thread::set_current_timer_slack(std::num::NonZeroU64::new(1));
        handle.block_on(send_records(producers, plan))
    })]
}

/// Shortest sleep of a pacing thread: records whose slots are closer together than this go out
/// together, up to this late (the delay counts in their latency, which is measured from the
/// schedule). Keeps a thread pacing 200,000 records/s from spending a core on wake-ups.
const PACING_QUANTUM: Duration = Duration::from_micros(50);

/// Blocks the calling thread (a pacing thread, never a runtime worker) until `at`.
fn pace_until(at: Instant) {
    let now = Instant::now();
    if at > now {
        std::thread::sleep((at - now).max(PACING_QUANTUM));
    }
}

/// A sampled record's delivery: its outcome and when that became known.
type TimedDelivery = Pin<Box<dyn Future<Output = (cairn_client::Result<RecordMetadata>, Instant)> + Send>>;

/// Records the latency of each sampled delivery, from its send (or scheduled send) to its
/// acknowledgement, and the first error. Deliveries are awaited in send order, but each is
/// charged up to its own acknowledgement: partitions are acknowledged in any order, and a record
/// acknowledged early must not be charged while one sent before it is still out.
async fn sample<F>(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(Instant, F)>,
    hist: Arc<Mutex<Histogram<u64>>>,
    first_error: Arc<Mutex<Option<String>>>,
) where
    F: Future<Output = (cairn_client::Result<RecordMetadata>, Instant)>,
{
    while let Some((sent, delivery)) = rx.recv().await {
        match delivery.await {
            (Ok(_), at) => {
                let us = at.saturating_duration_since(sent).as_micros().max(1) as u64;
                let _ = hist.lock().expect("histogram").record(us);
            }
            (Err(e), _) => {
                first_error.lock().expect("first error").get_or_insert_with(|| e.to_string());
            }
        }
    }
}

/// The sending loop: record `i` goes to producer `i % producers`. Samples the delivery latency
/// of every 64th record (see [`sample`]).
async fn send_records(producers: Vec<Producer>, plan: SendPlan) -> anyhow::Result<u64> {
    let SendPlan { opts, count, deadline, rate, hist, meter, stamp, keys } = plan;
    let value = value_of(opts.size);
    let topic: std::sync::Arc<str> = std::sync::Arc::from(opts.topic.as_str());
    let mut samplers = Vec::new();
    let mut samples = Vec::new();
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    if let Some(h) = &hist {
        for _ in &producers {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, TimedDelivery)>();
            samplers.push(tokio::spawn(sample(rx, Arc::clone(h), Arc::clone(&first_error))));
            samples.push(tx);
        }
    }
    let n = producers.len() as u64;
    // Progress is counted in steps of 256 records when unpaced (a shared counter per record
    // would cost the send loop), one by one at a rate (whose records are far apart).
    let step = if rate.is_some() { 1 } else { 256 };
    let start = Instant::now();
    let mut i = 0u64;
    loop {
        if count.is_some_and(|c| i >= c) || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        // At a fixed rate, latency counts from the schedule, so that a stalled sender cannot
        // hide it (coordinated omission is corrected).
        let intended = rate.map(|r| start + Duration::from_secs_f64(i as f64 / r));
        if let Some(at) = intended {
            pace_until(at); // only paced loops run here, on their own thread
        }
        let mut record = ProducerRecord { topic: std::sync::Arc::clone(&topic), ..ProducerRecord::default() };
        record.value = Some(if stamp {
            let lag = intended.map_or(0, |at| Instant::now().saturating_duration_since(at).as_nanos() as u64);
            let mut v = value.to_vec();
            v[..8].copy_from_slice(&(now_nanos() - lag).to_be_bytes());
            Bytes::from(v)
        } else {
            value.clone()
        });
        if !keys.is_empty() {
            record.key = Some(keys[(i % keys.len() as u64) as usize].clone());
        }
        let which = (i % n) as usize;
        let d = producers[which].send(record).await?;
        if let Some(tx) = samples.get(which).filter(|_| (i / n) % 64 == 0) {
            let _ = tx.send((intended.unwrap_or_else(Instant::now), Box::pin(d.wait_timed())));
        }
        i += 1;
        if let Some(m) = meter.as_ref().filter(|_| i % step == 0) {
            m.count.fetch_add(step, Ordering::Relaxed);
        }
    }
    if let Some(m) = &meter {
        m.count.fetch_add(i % step, Ordering::Relaxed);
    }
    for p in &producers {
        p.flush().await?;
    }
    drop(samples);
    for s in samplers {
        let _ = s.await;
    }
    // Records the broker refused are not throughput: a run with any is a failed run.
    let failed: u64 = producers.iter().map(Producer::failed_records).sum();
    if failed > 0 {
        let why = first_error.lock().expect("first error").take();
        anyhow::bail!(
            "{failed} of {i} records were not delivered ({})",
            why.map_or_else(
                || "none of them was sampled; see the broker's log".to_owned(),
                |e| format!("first sampled error: {e}")
            )
        );
    }
    for p in &producers {
        p.close().await?;
    }
    Ok(i)
}

/// Records a run sends: `--messages`, or at a fixed rate every record scheduled within
/// `--duration` (the run ends when the last is sent, however late: records held up by a stall
/// count with their full latency; stopping at the clock would drop exactly those), or `None`
/// to send as fast as possible until the duration ends.
fn paced_count(opts: &Opts) -> Option<u64> {
    match (opts.messages, opts.rate) {
        (Some(n), _) => Some(n),
        (None, Some(rate)) => Some((rate as f64 * opts.duration.as_secs_f64()).round() as u64),
        (None, None) => None,
    }
}

/// Produce as fast as possible (or at `rate`); latency = send to acknowledgement.
pub async fn produce(opts: &Opts) -> anyhow::Result<Report> {
    ensure_topic(opts).await?;
    let keys = keys_of(opts);
    if opts.warmup > 0 {
        let warm = producers(opts).await?;
        let n = warm.len() as u64;
        for t in start_senders(warm, SendPlan::new(opts, Some(opts.warmup * n), &keys)) {
            t.await??;
        }
    }
    let list = producers(opts).await?;
    let hist = Arc::new(Mutex::new(histogram()));
    let meter = Meter::new();
    let ticker = meter.spawn(paced_count(opts), opts.progress, "produce");
    let start = Instant::now();
    let plan = SendPlan {
        deadline: (opts.messages.is_none() && opts.rate.is_none()).then(|| start + opts.duration),
        rate: opts.rate.map(|r| r as f64),
        hist: Some(Arc::clone(&hist)),
        meter: Some(Arc::clone(&meter)),
        ..SendPlan::new(opts, paced_count(opts), &keys)
    };
    let tasks = start_senders(list, plan);
    let f = Finish { tasks, start, meter, ticker, hist, value_bytes: None };
    finish(opts, "produce", "send to acknowledgement, every 64th record", f).await
}

/// What a finished throughput run needs to become a report.
struct Finish {
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<u64>>>,
    start: Instant,
    meter: Arc<Meter>,
    ticker: tokio::task::JoinHandle<()>,
    hist: Arc<Mutex<Histogram<u64>>>,
    /// Value bytes the workers counted; `None`: every record's value is `--size` bytes.
    value_bytes: Option<Arc<AtomicU64>>,
}

/// Waits for the workers, stops the meter, and builds the report.
async fn finish(opts: &Opts, workload: &str, measures: &str, f: Finish) -> anyhow::Result<Report> {
    let mut records = 0;
    for t in f.tasks {
        records += t.await??;
    }
    let elapsed = f.start.elapsed().as_secs_f64();
    let timeline = f.meter.finish();
    let _ = f.ticker.await;
    let bytes = f.value_bytes.map_or(records * opts.size as u64, |b| b.load(Ordering::Relaxed));
    let h = f.hist.lock().expect("histogram");
    Ok(report(opts, workload, (records, bytes), elapsed, &h, measures, timeline))
}

/// `counted` is records and their value bytes.
fn report(
    opts: &Opts,
    workload: &str,
    counted: (u64, u64),
    elapsed: f64,
    h: &Histogram<u64>,
    measures: &str,
    timeline: Vec<f64>,
) -> Report {
    let (records, bytes) = counted;
    Report {
        command: opts.command.clone(),
        workload: workload.to_owned(),
        records,
        bytes,
        elapsed_secs: elapsed,
        records_per_sec: records as f64 / elapsed.max(1e-9),
        mb_per_sec: bytes as f64 / 1e6 / elapsed.max(1e-9),
        latency_us: percentiles(h),
        latency_measures: measures.to_owned(),
        timeline,
        curve: curve(h),
    }
}

/// The e2e rate when `--rate` is not given, records/s.
pub const E2E_RATE: u64 = 10_000;

/// Consume the topic from offset 0; latency = duration of each poll. A throwaway consumer reads
/// the first `warmup` records before the measured ones start, again from offset 0.
pub async fn consume(opts: &Opts) -> anyhow::Result<Report> {
    let admin = Admin::connect(conn(opts, "cairn-bench")).await?;
    let info = admin.describe_topic(&opts.topic).await?;
    check_partitions(opts, info.partitions.len())?;
    let available: i64 = info.partitions.iter().map(|p| p.end_offset - p.start_offset).sum();
    let want = opts.messages.unwrap_or(available as u64).min(available as u64);
    if want == 0 {
        anyhow::bail!("topic {} is empty: produce first (cairn-bench produce --topic {})", opts.topic, opts.topic);
    }
    if opts.warmup > 0 {
        let config = ConsumerConfig { connection: conn(opts, "bench-consumer-warmup"), ..ConsumerConfig::default() };
        let mut warm = Consumer::connect(config).await?;
        warm.assign(&opts.topic, None).await?;
        warm.seek_all(Offset::Earliest);
        let mut got = 0u64;
        while got < opts.warmup.min(available as u64) {
            got += warm.poll(Duration::from_secs(5)).await?.len() as u64;
        }
        warm.close().await?;
    }
    let parts: Vec<u32> = info.partitions.iter().map(|p| p.partition).collect();
    let n = consumers_for(opts, parts.len());
    let hist = Arc::new(Mutex::new(histogram()));
    let value_bytes = Arc::new(AtomicU64::new(0));
    let meter = Meter::new();
    let ticker = meter.spawn(Some(want), opts.progress, "consume");
    let start = Instant::now();
    let mut tasks = Vec::new();
    let owned: Vec<Vec<u32>> =
        (0..n).map(|c| parts.iter().copied().filter(|p| *p as usize % n == c).collect()).collect();
    let available: Vec<u64> = owned
        .iter()
        .map(|mine| {
            let held = info.partitions.iter().filter(|p| mine.contains(&p.partition));
            held.map(|p| (p.end_offset - p.start_offset) as u64).sum()
        })
        .collect();
    for (c, (mine, target)) in owned.into_iter().zip(split_wanted(&available, want)).enumerate() {
        let config =
            ConsumerConfig { connection: conn(opts, &format!("bench-consumer-{c}")), ..ConsumerConfig::default() };
        let (topic, hist, meter) = (opts.topic.clone(), Arc::clone(&hist), Arc::clone(&meter));
        let value_bytes = Arc::clone(&value_bytes);
        tasks.push(tokio::spawn(async move {
            let mut consumer = Consumer::connect(config).await?;
            consumer.assign(&topic, Some(mine)).await?;
            consumer.seek_all(Offset::Earliest);
            let mut got = 0u64;
            while got < target {
                let t = Instant::now();
                let batch = consumer.poll(Duration::from_secs(5)).await?;
                let _ = hist.lock().expect("histogram").record(t.elapsed().as_micros().max(1) as u64);
                got += batch.len() as u64;
                let bytes: usize = batch.iter().map(|r| r.value.as_ref().map_or(0, Bytes::len)).sum();
                value_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                meter.count.fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            Ok::<u64, anyhow::Error>(got)
        }));
    }
    let f = Finish { tasks, start, meter, ticker, hist, value_bytes: Some(value_bytes) };
    finish(opts, "consume", "duration of each poll", f).await
}

/// Consumers a run uses: `--consumers`, at most one per partition (a consumer without a
/// partition would read nothing), said on stderr when that is fewer.
fn consumers_for(opts: &Opts, partitions: usize) -> usize {
    let n = opts.consumers.max(1).min(partitions.max(1));
    if n < opts.consumers {
        eprintln!(
            "note: {} consumers asked for; {} has {partitions} partitions, so {n} run",
            opts.consumers, opts.topic
        );
    }
    n
}

/// Splits `want` records over consumers that can read `available` records each, in proportion
/// to what each can read: the shares add up to `want` (when that much is available) and none
/// exceeds its consumer's records, so uneven partitions neither stop a run short nor leave a
/// consumer waiting for records that are not there.
fn split_wanted(available: &[u64], want: u64) -> Vec<u64> {
    let total: u64 = available.iter().sum();
    let want = want.min(total);
    if total == 0 {
        return vec![0; available.len()];
    }
    let mut shares: Vec<u64> =
        available.iter().map(|&a| (u128::from(want) * u128::from(a) / u128::from(total)) as u64).collect();
    // Rounding down leaves fewer than one record per consumer; hand those to whoever has room.
    let mut left = want - shares.iter().sum::<u64>();
    for (share, &a) in shares.iter_mut().zip(available) {
        let more = left.min(a - *share);
        *share += more;
        left -= more;
    }
    shares
}

/// Producers send at a fixed total rate with the intended send time in the value; consumers
/// tailing the topic measure arrival. Latency = arrival - intended send time. First, `warmup`
/// records per producer go the same way at the same rate, from producers of their own, and
/// what they measured is discarded once every one of them has arrived.
pub async fn e2e(opts: &Opts) -> anyhow::Result<Report> {
    if opts.size < 8 {
        anyhow::bail!("e2e needs --size of at least 8 bytes (the timestamp)");
    }
    let parts = ensure_topic(opts).await?;
    let rate = opts.rate.unwrap_or(E2E_RATE);
    let total = opts.messages.unwrap_or((rate as f64 * opts.duration.as_secs_f64()) as u64);
    let n = consumers_for(opts, parts.len());
    let keys = keys_of(opts);
    let hist = Arc::new(Mutex::new(histogram()));
    let meter = Meter::new();
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut consumers = Vec::new();
    for c in 0..n {
        let mine: Vec<u32> = parts.iter().copied().filter(|p| *p as usize % n == c).collect();
        let config = ConsumerConfig {
            connection: conn(opts, &format!("bench-consumer-{c}")),
            fetch_max_wait: Duration::from_millis(500),
            ..ConsumerConfig::default()
        };
        let mut consumer = Consumer::connect(config).await?;
        consumer.assign(&opts.topic, Some(mine)).await?;
        consumer.seek_all(Offset::Latest);
        // Resolve the start position before producers begin.
        consumer.poll(Duration::from_millis(10)).await?;
        let (hist, meter, received, stop) =
            (Arc::clone(&hist), Arc::clone(&meter), Arc::clone(&received), Arc::clone(&stop));
        consumers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Acquire) {
                let batch = consumer.poll(Duration::from_millis(200)).await?;
                let now = now_nanos();
                let mut h = hist.lock().expect("histogram");
                for r in &batch {
                    if let Some(v) = r.value.as_deref().filter(|v| v.len() >= 8) {
                        let sent = u64::from_be_bytes(v[..8].try_into().expect("8 bytes"));
                        let _ = h.record((now.saturating_sub(sent) / 1000).max(1));
                    }
                }
                drop(h);
                // The meter first: once `received` shows the warm-up arrived, its count is
                // complete and can be reset.
                meter.count.fetch_add(batch.len() as u64, Ordering::Relaxed);
                received.fetch_add(batch.len() as u64, Ordering::Release);
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    if opts.warmup > 0 {
        let warm = producers(opts).await?;
        let count = opts.warmup * warm.len() as u64;
        let plan = SendPlan { rate: Some(rate as f64), stamp: true, ..SendPlan::new(opts, Some(count), &keys) };
        let mut sent = 0;
        for t in start_senders(warm, plan) {
            sent += t.await??;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while received.load(Ordering::Acquire) < sent && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if received.load(Ordering::Acquire) < sent {
            anyhow::bail!(
                "warm-up: {} of {sent} records did not arrive within 10 s",
                sent - received.load(Ordering::Relaxed)
            );
        }
        hist.lock().expect("histogram").reset();
        received.store(0, Ordering::Relaxed);
        meter.count.store(0, Ordering::Relaxed);
    }
    let ticker = meter.spawn(Some(total), opts.progress, "e2e");
    let list = producers(opts).await?;
    let start = Instant::now();
    let plan = SendPlan { rate: Some(rate as f64), stamp: true, ..SendPlan::new(opts, Some(total), &keys) };
    let tasks = start_senders(list, plan);
    let mut sent = 0;
    for t in tasks {
        sent += t.await??;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Release);
    for c in consumers {
        c.await??;
    }
    let timeline = meter.finish();
    let _ = ticker.await;
    let got = received.load(Ordering::Relaxed);
    if got < sent {
        eprintln!("warning: {} of {sent} records did not arrive within 10 s", sent - got);
    }
    let h = hist.lock().expect("histogram");
    Ok(report(
        opts,
        "e2e",
        (got, got * opts.size as u64),
        elapsed,
        &h,
        "intended send time to consumer arrival (coordinated omission corrected)",
        timeline,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_sample_acknowledged_early_is_charged_up_to_its_own_acknowledgement() {
        let hist = Arc::new(Mutex::new(histogram()));
        let first_error = Arc::default();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, TimedDelivery)>();
        let sent = Instant::now();
        let meta = RecordMetadata { partition: 0, offset: 0 };
        // Sent first, acknowledged 100 ms later.
        let _ = tx.send((
            sent,
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                (Ok(meta), Instant::now())
            }),
        ));
        // Sent with it, to another partition, and acknowledged 5 ms after: the sampler gets to
        // it only after the first.
        let _ = tx.send((sent, Box::pin(async move { (Ok(meta), sent + Duration::from_millis(5)) })));
        drop(tx);
        sample(rx, Arc::clone(&hist), first_error).await;
        let h = hist.lock().unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h.min(), 5_000, "charged until the earlier sample finished");
        assert!(h.max() >= 100_000);
    }

    #[test]
    fn uneven_partitions_still_read_the_whole_topic() {
        // Three consumers over partitions of 10, 10 and 1 records: an even split (7 each)
        // read 15 of 21.
        assert_eq!(split_wanted(&[10, 10, 1], 21), vec![10, 10, 1]);
        assert_eq!(split_wanted(&[10, 10, 1], 11).iter().sum::<u64>(), 11);
    }

    #[test]
    fn shares_add_up_and_never_exceed_what_is_there() {
        let cases: &[(&[u64], u64)] =
            &[(&[0, 5], 5), (&[3, 0, 4], 100), (&[1, 1, 1], 2), (&[7, 0, 0], 0), (&[u64::MAX / 4, 9], 1_000), (&[], 3)];
        for &(available, want) in cases {
            let shares = split_wanted(available, want);
            assert_eq!(shares.len(), available.len());
            assert_eq!(shares.iter().sum::<u64>(), want.min(available.iter().sum()), "{available:?} {want}");
            assert!(shares.iter().zip(available).all(|(s, a)| s <= a), "{available:?} {want}: {shares:?}");
        }
    }
}
