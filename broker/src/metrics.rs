//! Prometheus metrics and the HTTP endpoints `/metrics`, `/healthz` and `/readyz`.
//!
//! Hot paths record through handles registered once (no allocation, no map lookup); per-partition
//! gauges are refreshed by a background task, with the number of per-partition series capped by
//! `metrics_partition_series_max` (past the cap, series aggregate per topic with
//! `partition="all"`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::Full;
use hyper::body::Bytes as HttpBytes;
use hyper::{Request, Response, StatusCode};
use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use cairn_protocol::ApiKey;

use crate::server::stall::StallGuard;
use crate::server::Broker;

/// Histogram buckets of `cairn_request_duration_seconds`: 50 µs to 10 s.
pub const REQUEST_BUCKETS: &[f64] =
    &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Histogram buckets of `cairn_flush_duration_seconds`.
pub const FLUSH_BUCKETS: &[f64] = &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0];

/// A gauge not set for this long leaves `/metrics`. Every live gauge is set at least every second
/// ([`refresh_gauges`], and the storage maintenance thread for disk space) or, for the build
/// information and the start time, just before every render of `/metrics`, so only the series of
/// deleted topics and partitions and of forgotten groups go: a deleted topic must not keep
/// reporting its last lag to an alert.
pub const GAUGE_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often [`keep_up`] folds recorded histogram samples into their buckets.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The recorder's settings: histogram buckets and the idle timeout of gauges.
///
/// # Errors
/// Never in practice (the bucket lists are not empty).
pub fn builder() -> anyhow::Result<PrometheusBuilder> {
    Ok(PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full("cairn_request_duration_seconds".into()), REQUEST_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full("cairn_flush_duration_seconds".into()), FLUSH_BUCKETS)?
        .idle_timeout(metrics_util::MetricKindMask::GAUGE, Some(GAUGE_IDLE_TIMEOUT)))
}

/// Installs the global recorder and returns the handle that renders `/metrics`; later calls
/// in the same process return the same handle. Run [`keep_up`] beside it.
///
/// # Errors
/// When another recorder is already installed.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    static INSTALLED: std::sync::Mutex<Option<PrometheusHandle>> = std::sync::Mutex::new(None);
    let mut installed = INSTALLED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(handle) = installed.as_ref() {
        return Ok(handle.clone());
    }
    let handle = builder()?.install_recorder()?;
    let _ = START_TIME.set(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()));
    publish_build_info();
    describe();
    register_counters();
    *installed = Some(handle.clone());
    Ok(handle)
}

/// Folds recorded histogram samples into their buckets every `every` until `shutdown`. Without
/// it every sample (one per request) is kept until the next scrape: a broker nobody scrapes
/// would grow by eight bytes per request for ever.
pub async fn keep_up(handle: PrometheusHandle, every: Duration, shutdown: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => handle.run_upkeep(),
        }
    }
}

/// When the recorder was installed, that is when the broker process started.
static START_TIME: std::sync::OnceLock<f64> = std::sync::OnceLock::new();

fn publish_build_info() {
    metrics::gauge!("cairn_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    if let Some(t) = START_TIME.get() {
        metrics::gauge!("cairn_start_time_seconds").set(*t);
    }
}

/// Every `kind` of `cairn_storage_errors_total`: [`crate::storage::StorageError::kind`]'s
/// values and `fsync`.
pub const STORAGE_ERROR_KINDS: [&str; 10] = [
    "offset_out_of_range",
    "storage_full",
    "invalid_batch",
    "io",
    "read_only",
    "poisoned",
    "topic",
    "config",
    "closed",
    "fsync",
];

/// Creates every counter that counts rare events, at 0, so that it is scraped before its first
/// event: PromQL's `increase()` cannot see a series' first sample, and a counter that appears
/// at 1 would hide its first error from alerts and dashboards.
fn register_counters() {
    for kind in STORAGE_ERROR_KINDS {
        metrics::counter!("cairn_storage_errors_total", "kind" => kind).increment(0);
    }
    for name in [
        "cairn_recovery_truncated_bytes_total",
        "cairn_connections_refused_total",
        "cairn_parked_fetches_refused_total",
        "cairn_http_connections_refused_total",
        "cairn_committed_offsets_reset_total",
        "cairn_committed_offsets_expired_total",
        "cairn_committed_offsets_damaged_batches_total",
    ] {
        metrics::counter!(name).increment(0);
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("cairn_produce_records_total", "Records appended, per topic");
    describe_counter!("cairn_produce_bytes_total", Unit::Bytes, "Record batch bytes appended, per topic");
    describe_counter!("cairn_fetch_records_total", "Records returned by fetches, per topic");
    describe_counter!("cairn_fetch_bytes_total", Unit::Bytes, "Record batch bytes returned by fetches, per topic");
    describe_counter!("cairn_requests_total", "Requests handled, by API and result (ok or an error name)");
    describe_histogram!("cairn_request_duration_seconds", Unit::Seconds, "Time from request decoded to response ready");
    describe_gauge!("cairn_topic_partitions", "Partitions of the topic");
    describe_gauge!("cairn_partition_log_end_offset", "Offset the next record will get");
    describe_gauge!("cairn_partition_log_start_offset", "First offset still in the log");
    describe_gauge!("cairn_partition_size_bytes", Unit::Bytes, "Bytes of record batches in the partition");
    describe_gauge!("cairn_partition_segments", "Segments in the partition");
    describe_gauge!("cairn_consumer_group_committed_offset", "Committed offset (next to consume)");
    describe_gauge!("cairn_consumer_group_lag", "Log end offset minus committed offset");
    describe_gauge!("cairn_consumer_group_members", "Live members of the group");
    describe_gauge!("cairn_connections", "Open client connections");
    describe_histogram!("cairn_flush_duration_seconds", Unit::Seconds, "Duration of one partition sync (fdatasync)");
    describe_counter!("cairn_recovery_truncated_bytes_total", Unit::Bytes, "Torn or corrupt bytes cut by recovery");
    describe_counter!("cairn_storage_errors_total", "Storage errors by kind");
    describe_gauge!("cairn_disk_free_bytes", Unit::Bytes, "Free bytes on the data disk");
    describe_gauge!("cairn_build_info", "Build information");
    describe_gauge!("cairn_start_time_seconds", Unit::Seconds, "Unix time the broker process started");
    describe_counter!(
        "cairn_http_connections_refused_total",
        "Metrics listener connections closed at accept: metrics_connections_max reached"
    );
    describe_counter!(
        "cairn_connections_refused_total",
        "Client connections closed at accept: connections_max reached"
    );
    describe_counter!(
        "cairn_parked_fetches_refused_total",
        "Fetches answered at once instead of waiting: parked_fetches_max reached"
    );
    describe_counter!(
        "cairn_committed_offsets_reset_total",
        "Committed offsets found past their partition's log end at startup and reset to it"
    );
    describe_counter!(
        "cairn_committed_offsets_damaged_batches_total",
        "Damaged batches of __consumer_offsets skipped at startup (the commits in them are lost)"
    );
    describe_counter!(
        "cairn_committed_offsets_expired_total",
        "Committed offsets of empty groups removed after offsets_retention_ms"
    );
}

/// Pre-registered per-API handles for the request hot path.
#[derive(Debug)]
pub struct RequestMetrics {
    ok: Vec<Counter>,
    duration: Vec<Histogram>,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        RequestMetrics {
            ok: ApiKey::ALL
                .iter()
                .map(|k| metrics::counter!("cairn_requests_total", "api" => k.name(), "result" => "ok"))
                .collect(),
            duration: ApiKey::ALL
                .iter()
                .map(|k| metrics::histogram!("cairn_request_duration_seconds", "api" => k.name()))
                .collect(),
        }
    }
}

impl RequestMetrics {
    /// Records one request's outcome and duration. `error` is `None` for success.
    pub fn record(&self, api: ApiKey, error: Option<&'static str>, elapsed: Duration) {
        let i = api as usize;
        match error {
            None => self.ok[i].increment(1),
            Some(name) => metrics::counter!("cairn_requests_total", "api" => api.name(), "result" => name).increment(1),
        }
        self.duration[i].record(elapsed.as_secs_f64());
    }
}

/// Per-topic throughput counters.
#[derive(Debug, Clone)]
pub struct TopicMetrics {
    /// `cairn_produce_records_total{topic}`.
    pub produce_records: Counter,
    /// `cairn_produce_bytes_total{topic}`.
    pub produce_bytes: Counter,
    /// `cairn_fetch_records_total{topic}`.
    pub fetch_records: Counter,
    /// `cairn_fetch_bytes_total{topic}`.
    pub fetch_bytes: Counter,
}

impl TopicMetrics {
    /// Registers the handles for `topic`.
    pub fn new(topic: &str) -> TopicMetrics {
        let t = topic.to_owned();
        TopicMetrics {
            produce_records: metrics::counter!("cairn_produce_records_total", "topic" => t.clone()),
            produce_bytes: metrics::counter!("cairn_produce_bytes_total", "topic" => t.clone()),
            fetch_records: metrics::counter!("cairn_fetch_records_total", "topic" => t.clone()),
            fetch_bytes: metrics::counter!("cairn_fetch_bytes_total", "topic" => t),
        }
    }
}

/// Refreshes partition and group gauges every second until shutdown.
pub async fn refresh_gauges(broker: Arc<Broker>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = broker.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        publish_partition_gauges(&broker);
        broker.groups.publish_metrics(&broker.store, broker.config.metrics_partition_series_max);
        metrics::gauge!("cairn_connections").set(broker.connections.load(Ordering::Relaxed) as f64);
    }
}

fn publish_partition_gauges(broker: &Broker) {
    let cap = broker.config.metrics_partition_series_max;
    let mut series = 0usize;
    for topic in broker.store.topics() {
        metrics::gauge!("cairn_topic_partitions", "topic" => topic.name.clone()).set(topic.partitions.len() as f64);
        let per_partition = series + topic.partitions.len() <= cap;
        let (mut end, mut start, mut size, mut segs) = (0u64, 0u64, 0u64, 0usize);
        for p in &topic.partitions {
            if per_partition {
                let part = p.partition().to_string();
                let labels = [("topic", topic.name.clone()), ("partition", part)];
                metrics::gauge!("cairn_partition_log_end_offset", &labels).set(p.log_end_offset() as f64);
                metrics::gauge!("cairn_partition_log_start_offset", &labels).set(p.log_start_offset() as f64);
                metrics::gauge!("cairn_partition_size_bytes", &labels).set(p.size_bytes() as f64);
                metrics::gauge!("cairn_partition_segments", &labels).set(p.segment_count() as f64);
            } else {
                end += p.log_end_offset();
                start += p.log_start_offset();
                size += p.size_bytes();
                segs += p.segment_count();
            }
        }
        if per_partition {
            series += topic.partitions.len();
        } else {
            let labels = [("topic", topic.name.clone()), ("partition", "all".to_owned())];
            metrics::gauge!("cairn_partition_log_end_offset", &labels).set(end as f64);
            metrics::gauge!("cairn_partition_log_start_offset", &labels).set(start as f64);
            metrics::gauge!("cairn_partition_size_bytes", &labels).set(size as f64);
            metrics::gauge!("cairn_partition_segments", &labels).set(segs as f64);
        }
    }
}

/// Liveness and readiness, shared by the HTTP endpoints and the broker. The endpoints answer from
/// the moment the process starts, so an orchestrator sees a broker that is alive but still
/// recovering (`/healthz` 200, `/readyz` 503).
#[derive(Debug, Default)]
pub struct Health {
    /// Recovery is done and the client listener accepts connections.
    pub ready: std::sync::atomic::AtomicBool,
    /// Cancelled when shutdown begins (readiness drops at once).
    pub shutdown: tokio_util::sync::CancellationToken,
}

/// Bounds on the HTTP endpoints' connections.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Connections served at once; more are closed at accept.
    pub connections_max: usize,
    /// Longest wait for a request's headers (also an idle keep-alive connection's), and for a
    /// response write to make progress.
    pub timeout: Duration,
}

/// Serves `/metrics`, `/healthz` and `/readyz` until shutdown, within `limits`: a scraper that
/// connects and sends nothing, or asks for a page and never reads it, holds one of
/// `limits.connections_max` slots for at most `limits.timeout` at a time.
pub async fn serve_http(listener: TcpListener, handle: PrometheusHandle, broker: Arc<Health>, limits: HttpLimits) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.connections_max));
    loop {
        let (stream, peer) = tokio::select! {
            _ = broker.shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            metrics::counter!("cairn_http_connections_refused_total").increment(1);
            tracing::debug!(%peer, max = limits.connections_max, "metrics connection refused: metrics_connections_max reached");
            drop(stream);
            continue;
        };
        let handle = handle.clone();
        let broker = Arc::clone(&broker);
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let handle = handle.clone();
                let broker = Arc::clone(&broker);
                async move { Ok::<_, Infallible>(route(&req, &handle, &broker)) }
            });
            let io = hyper_util::rt::TokioIo::new(StallGuard::new(stream, limits.timeout));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.timeout)
                .serve_connection(io, service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}

fn route(
    req: &Request<hyper::body::Incoming>,
    handle: &PrometheusHandle,
    broker: &Health,
) -> Response<Full<HttpBytes>> {
    let text = |status: StatusCode, body: String, ctype: &'static str| {
        Response::builder()
            .status(status)
            .header("content-type", ctype)
            .body(Full::new(HttpBytes::from(body)))
            .unwrap_or_else(|_| Response::new(Full::new(HttpBytes::new())))
    };
    match req.uri().path() {
        "/metrics" => {
            // Also while recovery runs, before the gauge refresher starts.
            publish_build_info();
            text(StatusCode::OK, handle.render(), "text/plain; version=0.0.4")
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/readyz" => {
            if broker.ready.load(Ordering::Acquire) && !broker.shutdown.is_cancelled() {
                text(StatusCode::OK, "ready\n".into(), "text/plain")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into(), "text/plain")
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found: try /metrics, /healthz or /readyz\n".into(), "text/plain"),
    }
}

/// Binds the metrics listener.
///
/// # Errors
/// When the address cannot be bound.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Metric names the broker's sources record, from `counter!("...")`, `gauge!("...")` and
    /// `histogram!("...")` calls.
    fn recorded_names(dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).expect("read broker/src") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                recorded_names(&path, out);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read source");
            for macro_call in ["counter!(", "gauge!(", "histogram!("] {
                for (at, _) in text.match_indices(macro_call) {
                    let rest = text[at + macro_call.len()..].trim_start();
                    let Some(quoted) = rest.strip_prefix('"') else { continue };
                    let name = &quoted[..quoted.find('"').expect("closing quote")];
                    if name.starts_with("cairn_") && !out.iter().any(|n| n == name) {
                        out.push(name.to_owned());
                    }
                }
            }
        }
    }

    /// Counters of rare events are scraped at 0 before their first event, so that `increase()`
    /// sees that event; and the start time is published for the alert rules.
    #[test]
    fn rare_event_counters_and_the_start_time_are_there_from_the_start() {
        let handle = super::install().expect("install");
        let text = handle.render();
        for kind in super::STORAGE_ERROR_KINDS {
            let series = format!("cairn_storage_errors_total{{kind=\"{kind}\"}}");
            assert!(text.contains(&series), "{series} missing from:\n{text}");
        }
        for name in [
            "cairn_recovery_truncated_bytes_total",
            "cairn_connections_refused_total",
            "cairn_committed_offsets_reset_total",
        ] {
            assert!(text.lines().any(|l| l.starts_with(&format!("{name} "))), "{name} missing from:\n{text}");
        }
        let start = text
            .lines()
            .find_map(|l| l.strip_prefix("cairn_start_time_seconds "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .expect("cairn_start_time_seconds");
        assert!(start > 1.7e9, "start time {start}");
        assert!(super::install().is_ok(), "a second install returns the same handle");
    }

    /// Every metric the broker records has a HELP text (`promtool check metrics` flags one
    /// without) and is listed in `ops/metrics.txt`, which the dashboard and alert checks trust.
    #[test]
    fn every_recorded_metric_is_described_and_listed_for_ops() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut names = Vec::new();
        recorded_names(&root.join("src"), &mut names);
        assert!(names.len() >= 20, "found only {names:?}");
        let source = include_str!("metrics.rs");
        let describe = &source[source.find("fn describe()").expect("describe()")..];
        let describe = &describe[..describe.find("\n}\n").expect("end of describe()")];
        let listed = std::fs::read_to_string(root.join("../ops/metrics.txt")).expect("ops/metrics.txt");
        let listed: Vec<&str> = listed.lines().map(str::trim).collect();
        for name in &names {
            assert!(describe.contains(&format!("\"{name}\"")), "{name} has no describe_* call in describe()");
            assert!(listed.contains(&name.as_str()), "{name} is missing from ops/metrics.txt");
        }
        for name in listed.iter().filter(|n| !n.is_empty()) {
            assert!(names.iter().any(|n| n == name), "ops/metrics.txt lists {name}, which the broker never records");
        }
    }
}
