//! The TCP server: shared broker state, the accept loop, connections and graceful shutdown.

mod connection;
mod dispatch;
mod frames;
pub(crate) mod stall;

pub(crate) use dispatch::Reply;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::BrokerConfig;
use crate::groups::Coordinator;
use crate::metrics::{Health, RequestMetrics, TopicMetrics};
use crate::storage::LogStore;

/// State shared by every connection.
#[derive(Debug)]
pub struct Broker {
    /// Effective configuration.
    pub config: BrokerConfig,
    /// The log store.
    pub store: LogStore,
    /// Consumer group coordinator.
    pub groups: Coordinator,
    /// Cancelled when shutdown begins.
    pub shutdown: CancellationToken,
    /// Readiness as reported by `/readyz`.
    pub health: Arc<Health>,
    /// Open client connections.
    pub connections: AtomicUsize,
    pub(crate) parked_fetches: AtomicUsize,
    pub(crate) requests: RequestMetrics,
    /// Per topic, per partition: woken when the partition gets data. Looked up by `&str`, so
    /// the produce path allocates nothing to wake fetchers.
    notifiers: RwLock<HashMap<String, Vec<Arc<Notify>>>>,
    topic_metrics: RwLock<HashMap<String, TopicMetrics>>,
}

impl Broker {
    /// Wraps an opened store.
    pub fn new(config: BrokerConfig, store: LogStore, groups: Coordinator, health: Arc<Health>) -> Broker {
        Broker {
            config,
            store,
            groups,
            shutdown: health.shutdown.clone(),
            health,
            connections: AtomicUsize::new(0),
            parked_fetches: AtomicUsize::new(0),
            requests: RequestMetrics::default(),
            notifiers: RwLock::new(HashMap::new()),
            topic_metrics: RwLock::new(HashMap::new()),
        }
    }

    /// The notifier woken whenever `topic`/`partition` gets new data.
    pub(crate) fn notifier(&self, topic: &str, partition: u32) -> Arc<Notify> {
        if let Some(n) =
            self.notifiers.read().expect("notifiers lock").get(topic).and_then(|v| v.get(partition as usize))
        {
            return Arc::clone(n);
        }
        let mut all = self.notifiers.write().expect("notifiers lock");
        let list = all.entry(topic.to_owned()).or_default();
        while list.len() <= partition as usize {
            list.push(Arc::new(Notify::new()));
        }
        Arc::clone(&list[partition as usize])
    }

    /// Wakes fetches parked on a partition.
    pub(crate) fn notify_append(&self, topic: &str, partition: u32) {
        if let Some(n) =
            self.notifiers.read().expect("notifiers lock").get(topic).and_then(|v| v.get(partition as usize))
        {
            n.notify_waiters();
        }
    }

    /// Wakes every fetch parked on a deleted topic (each reads again and answers
    /// `UNKNOWN_TOPIC_OR_PARTITION` at once) and drops the topic's notifiers.
    pub(crate) fn notify_deleted(&self, topic: &str) {
        let removed = self.notifiers.write().expect("notifiers lock").remove(topic);
        for n in removed.iter().flatten() {
            n.notify_waiters();
        }
    }

    /// Throughput counters of a topic.
    pub(crate) fn topic_metrics(&self, topic: &str) -> TopicMetrics {
        if let Some(m) = self.topic_metrics.read().expect("topic metrics lock").get(topic) {
            return m.clone();
        }
        self.topic_metrics
            .write()
            .expect("topic metrics lock")
            .entry(topic.to_owned())
            .or_insert_with(|| TopicMetrics::new(topic))
            .clone()
    }
}

/// Accepts connections until shutdown, then waits (bounded by `shutdown_timeout_ms`) for the
/// open connections to finish their in-flight requests.
pub async fn serve(broker: Arc<Broker>, listener: TcpListener) {
    let tracker = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(broker.config.connections_max));
    loop {
        let accepted = tokio::select! {
            _ = broker.shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and similar: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!(%peer, limit = broker.config.connections_max, "connection refused: connections_max reached");
            metrics::counter!("cairn_connections_refused_total").increment(1);
            drop(stream);
            continue;
        };
        let broker = Arc::clone(&broker);
        tracker.spawn(async move {
            let _counted = Counted::new(&broker.connections);
            connection::run(Arc::clone(&broker), stream, peer).await;
            drop(permit);
        });
    }
    drop(listener);
    tracker.close();
    let grace = Duration::from_millis(broker.config.shutdown_timeout_ms);
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(open = tracker.len(), "shutdown timeout: abandoning connections still open");
    }
}

/// One open connection in [`Broker::connections`], counted until dropped: when the connection
/// ends, also by a panic in its task (the `cairn_connections` gauge would otherwise stay up).
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn new(count: &'a AtomicUsize) -> Counted<'a> {
        count.fetch_add(1, Ordering::Relaxed);
        Counted(count)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Binds the client listener.
///
/// # Errors
/// When the address cannot be bound.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_task_that_panics_is_no_longer_counted() {
        let count = Arc::new(AtomicUsize::new(0));
        let inner = Arc::clone(&count);
        let task = tokio::spawn(async move {
            let _counted = Counted::new(&inner);
            assert_eq!(inner.load(Ordering::Relaxed), 1);
            panic!("a bug in a connection task");
        });
        assert!(task.await.unwrap_err().is_panic());
        assert_eq!(count.load(Ordering::Relaxed), 0);
    }
}
