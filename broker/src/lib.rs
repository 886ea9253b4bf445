//! The Cairn broker: a memory-mapped, segmented commit log per topic-partition behind a
//! length-framed TCP protocol, with Prometheus metrics.
//!
//! - [`storage`]: the synchronous storage engine (segments, indexes, recovery, retention).
//! - [`server`]: the TCP server, connections and request dispatch.
//! - [`groups`]: consumer group membership and committed offsets.
//! - [`metrics`]: Prometheus metrics and the health endpoints.
//! - [`config`]: the configuration file and its defaults.
//! - [`EmbeddedBroker`]: a broker inside the calling process, for tests and examples.

pub mod config;
mod embedded;
pub mod groups;
mod handlers;
pub mod metrics;
pub mod server;
pub mod storage;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::BrokerConfig;
pub use crate::embedded::EmbeddedBroker;
use crate::groups::Coordinator;
use crate::server::Broker;
use crate::storage::{system_clock, LogStore};

/// Runs a broker until `shutdown` is cancelled, then shuts down gracefully: stops accepting,
/// finishes in-flight requests (bounded by `shutdown_timeout_ms`), syncs and checkpoints every
/// log so that the next start needs no recovery scan.
///
/// Prints one line to stdout once both listeners are bound:
/// `cairn-broker listening on ADDR metrics on ADDR`.
///
/// # Errors
/// Configuration, bind, or storage failures at start; a failed clean close at the end.
pub async fn run(config: BrokerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let started = start(config, shutdown).await?;
    println!("cairn-broker listening on {} metrics on {}", started.listen_addr(), started.metrics_addr());
    started.serve().await
}

/// A broker whose listeners are bound and whose logs are recovered: clients can connect (they
/// are accepted once [`Started::serve`] runs), and the health endpoint reports it ready.
///
/// Dropping it without [`Started::serve`] stops the broker's background tasks and closes the
/// metrics listener, without the clean close of the logs that `serve` ends with (the next start
/// recovers them).
#[derive(Debug)]
pub struct Started {
    broker: Arc<Broker>,
    listener: tokio::net::TcpListener,
    listen: SocketAddr,
    metrics: SocketAddr,
    /// Cancels the broker's own token (a child of the caller's) when dropped.
    stop_tasks: tokio_util::sync::DropGuard,
}

impl Started {
    /// The client listener's address (with the port the system chose, for a port of 0).
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// The metrics and health listener's address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics
    }

    /// Serves clients until the `shutdown` given to [`start`] is cancelled, then shuts down as
    /// [`run`] describes.
    ///
    /// # Errors
    /// A failed clean close of the logs.
    pub async fn serve(self) -> anyhow::Result<()> {
        let Started { broker, listener, stop_tasks, .. } = self;
        server::serve(Arc::clone(&broker), listener).await;
        tracing::info!("closing logs");
        let closer = Arc::clone(&broker);
        tokio::task::spawn_blocking(move || closer.store.close()).await?.context("closing the log store")?;
        tracing::info!("shutdown complete");
        drop(stop_tasks);
        Ok(())
    }
}

/// The first half of [`run`]: validates the configuration, binds both listeners (a port of 0
/// gets one the system chooses), recovers the logs and committed offsets, and marks the broker
/// ready. The metrics recorder is process-wide: brokers started in one process share it (and
/// their series mix). Cancelling `shutdown` stops the broker; a failed start stops what it had
/// started, without cancelling `shutdown`.
///
/// # Errors
/// Configuration, bind, or storage failures; another `metrics` recorder already installed in
/// the process.
pub async fn start(config: BrokerConfig, shutdown: CancellationToken) -> anyhow::Result<Started> {
    // The broker's tasks follow a token of their own: cancelled with the caller's, and by this
    // guard if the start fails or the result is dropped unserved.
    let shutdown = shutdown.child_token();
    let stop_tasks = shutdown.clone().drop_guard();
    config.validate()?;
    let prometheus = metrics::install().context("installing the metrics recorder")?;
    let metrics_listener = metrics::bind(config.metrics_listen)
        .await
        .with_context(|| format!("binding metrics_listen {}", config.metrics_listen))?;
    let listener = server::bind(config.listen).await.with_context(|| format!("binding listen {}", config.listen))?;
    // Health endpoints answer during recovery: alive, not yet ready.
    let health = Arc::new(metrics::Health { ready: false.into(), shutdown: shutdown.clone() });
    let metrics_local = metrics_listener.local_addr()?;
    tokio::spawn(metrics::keep_up(prometheus.clone(), metrics::UPKEEP_INTERVAL, shutdown.clone()));
    let http_limits = metrics::HttpLimits {
        connections_max: config.metrics_connections_max,
        timeout: Duration::from_millis(config.metrics_timeout_ms),
    };
    tokio::spawn(metrics::serve_http(metrics_listener, prometheus, Arc::clone(&health), http_limits));

    let dir = config.data_dir.clone();
    let storage_config = config.storage.clone();
    let (store, report) = tokio::task::spawn_blocking(move || LogStore::open(&dir, storage_config, system_clock()))
        .await?
        .with_context(|| format!("opening data directory {}", config.data_dir.display()))?;
    tracing::info!(
        clean = report.clean,
        partitions = report.partitions,
        scanned_segments = report.scanned_segments,
        truncated_bytes = report.truncated_bytes,
        took_ms = report.duration.as_millis() as u64,
        "storage recovered"
    );
    let groups = Coordinator::open(&store, config.groups.clone()).context("opening committed offsets")?;
    let broker = Arc::new(Broker::new(config, store, groups, Arc::clone(&health)));

    let local = listener.local_addr()?;
    tokio::spawn(metrics::refresh_gauges(Arc::clone(&broker)));
    tokio::spawn(group_ticker(Arc::clone(&broker)));
    // The listener is bound and the logs are recovered: clients can connect from here on.
    health.ready.store(true, std::sync::atomic::Ordering::Release);
    tracing::info!(listen = %local, metrics = %metrics_local, "accepting clients");
    Ok(Started { broker, listener, listen: local, metrics: metrics_local, stop_tasks })
}

async fn group_ticker(broker: Arc<Broker>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let retention_check = Duration::from_millis(broker.config.groups.offsets_retention_check_interval_ms);
    let mut next_retention_check = tokio::time::Instant::now() + retention_check;
    loop {
        tokio::select! {
            _ = broker.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        broker.groups.tick(&broker.store);
        if tokio::time::Instant::now() >= next_retention_check {
            // It syncs what it removes: off the runtime's threads, and one at a time.
            let expirer = Arc::clone(&broker);
            let _ = tokio::task::spawn_blocking(move || expirer.groups.expire_offsets(system_clock()())).await;
            next_retention_check = tokio::time::Instant::now() + retention_check;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reports whether something still accepts connections on `port` after up to 5 s.
    async fn still_listening(port: u16) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            if std::time::Instant::now() >= deadline {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
    }

    #[tokio::test]
    async fn a_failed_start_stops_what_it_started_and_leaves_the_token_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let not_a_dir = dir.path().join("file");
        std::fs::write(&not_a_dir, b"x").expect("write");
        let port = free_port();
        let config = BrokerConfig {
            data_dir: not_a_dir,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], port)),
            ..BrokerConfig::default()
        };
        let token = CancellationToken::new();
        assert!(start(config, token.clone()).await.is_err());
        assert!(!token.is_cancelled());
        assert!(!still_listening(port).await, "the metrics listener outlived a failed start");
    }

    #[tokio::test]
    async fn a_started_broker_dropped_unserved_stops_its_tasks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = BrokerConfig {
            data_dir: dir.path().to_path_buf(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..BrokerConfig::default()
        };
        let started = start(config, CancellationToken::new()).await.expect("start");
        let port = started.metrics_addr().port();
        drop(started);
        assert!(!still_listening(port).await, "the metrics listener outlived its dropped broker");
    }
}
