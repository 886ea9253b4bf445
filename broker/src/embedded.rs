//! A broker inside the calling process, for tests and examples: the same broker as
//! `cairn-broker`, on loopback ports the system chooses, with its own runtime thread.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::config::BrokerConfig;

/// A broker running on a thread of its own in this process. Dropping it shuts the broker down
/// cleanly (as SIGTERM does `cairn-broker`) and waits for that.
///
/// Metrics are process-wide: the broker installs the global `metrics` recorder (so the
/// process cannot install another), and the series of two embedded brokers in one process mix.
///
/// ```
/// # fn main() -> anyhow::Result<()> {
/// let dir = tempfile::tempdir()?;
/// let broker = cairn_broker::EmbeddedBroker::start(dir.path())?;
/// println!("clients connect to {}", broker.addr());
/// broker.stop()?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
    metrics_addr: SocketAddr,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl EmbeddedBroker {
    /// Starts a broker with the default configuration on `data_dir`, listening on
    /// `127.0.0.1` with ports the system chooses; returns once it accepts clients.
    ///
    /// # Errors
    /// As [`crate::start`]: an unusable data directory, no port to bind, or another `metrics`
    /// recorder already installed in the process.
    pub fn start(data_dir: &Path) -> anyhow::Result<EmbeddedBroker> {
        EmbeddedBroker::start_with(BrokerConfig {
            data_dir: data_dir.to_path_buf(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..BrokerConfig::default()
        })
    }

    /// Starts a broker with `config` (a port of 0 gets one the system chooses); returns once it
    /// accepts clients.
    ///
    /// # Errors
    /// As [`crate::start`].
    pub fn start_with(config: BrokerConfig) -> anyhow::Result<EmbeddedBroker> {
        let shutdown = CancellationToken::new();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cairn-embedded")
            .enable_all()
            .build()
            .context("building the embedded broker's runtime")?;
        let (tx, rx) = std::sync::mpsc::channel();
        let token = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name("cairn-embedded".into())
            .spawn(move || {
                runtime.block_on(async move {
                    match crate::start(config, token).await {
                        Ok(started) => {
                            let _ = tx.send(Ok((started.listen_addr(), started.metrics_addr())));
                            started.serve().await
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e)); // reported by start_with, not by the thread
                            Ok(())
                        }
                    }
                })
            })
            .context("spawning the embedded broker's thread")?;
        match rx.recv() {
            Ok(Ok((addr, metrics_addr))) => Ok(EmbeddedBroker { addr, metrics_addr, shutdown, thread: Some(thread) }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            // The thread ended without a word: it panicked.
            Err(_) => {
                let _ = thread.join();
                Err(anyhow::anyhow!("the embedded broker's thread panicked at start"))
            }
        }
    }

    /// Where clients connect, for `ConnectionConfig::broker`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The metrics and health listener.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// Shuts the broker down cleanly and waits for it.
    ///
    /// # Errors
    /// A failed clean close of the logs.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        match self.thread.take().map(std::thread::JoinHandle::join) {
            None => Ok(()),
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(anyhow::anyhow!("the embedded broker's thread panicked")),
        }
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            tracing::error!(error = %e, "embedded broker: unclean stop");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serves_on_a_chosen_port_and_stops_cleanly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let broker = EmbeddedBroker::start(dir.path()).expect("start");
        assert_ne!(broker.addr().port(), 0);
        let addr = broker.addr();
        std::net::TcpStream::connect(addr).expect("connect");
        broker.stop().expect("clean stop");
        assert!(std::net::TcpStream::connect(addr).is_err(), "still listening after stop");
        // The directory is left closed and unlocked: a second broker starts on it.
        drop(EmbeddedBroker::start(dir.path()).expect("restart on the same directory"));
    }

    #[test]
    fn a_bad_data_dir_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").expect("write");
        let err = EmbeddedBroker::start(&file).expect_err("a file is not a data directory");
        assert!(format!("{err:#}").contains("data directory"), "{err:#}");
    }
}
