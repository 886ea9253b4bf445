//! Broker configuration: a TOML file (unknown keys rejected) overlaid by command-line flags.
//!
//! Every key has a default; `cairn-broker --print-config` prints the effective configuration.
//! `ops/config/cairn.example.toml` documents every key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::groups::GroupConfig;
use crate::storage::StorageConfig;

/// The whole broker configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Client listener. Default `127.0.0.1:7070`.
    pub listen: SocketAddr,
    /// HTTP listener for `/metrics`, `/healthz`, `/readyz`. Default `127.0.0.1:9464`.
    pub metrics_listen: SocketAddr,
    /// Connections the metrics listener serves at once; more are closed at accept
    /// (`cairn_http_connections_refused_total`). Default 64.
    pub metrics_connections_max: usize,
    /// A metrics connection is closed when a request's headers (or, on an idle keep-alive
    /// connection, the next request) take longer than this, or when a response write makes no
    /// progress for this long. Default 10,000 ms.
    pub metrics_timeout_ms: u64,
    /// Data directory. Default `./cairn-data`.
    pub data_dir: PathBuf,
    /// Largest request frame accepted; a larger length prefix closes the connection. Default 16 MiB.
    pub frame_bytes_max: u32,
    /// Concurrent client connections; more are refused (closed at once). Default 10,000.
    pub connections_max: usize,
    /// Requests read ahead per connection before the broker stops reading that socket. Default 256.
    pub connection_in_flight_max: usize,
    /// A connection with no request for this long is closed. Default 600,000 ms.
    pub idle_timeout_ms: u64,
    /// A request frame must arrive completely within this long once its first byte did;
    /// slower clients are disconnected. Default 30,000 ms.
    pub frame_timeout_ms: u64,
    /// Create unknown topics on first produce or metadata request. Default false.
    pub auto_create_topics: bool,
    /// Partitions of auto-created topics. Default 1.
    pub default_partitions: u32,
    /// Most partitions one topic may have. Default 10,000.
    pub partitions_max: u32,
    /// Longest graceful shutdown before in-flight work is abandoned. Default 10,000 ms.
    pub shutdown_timeout_ms: u64,
    /// Most fetches parked waiting for data at once; past it, fetches answer immediately. Default 10,000.
    pub parked_fetches_max: usize,
    /// Longest a fetch may park, whatever `max_wait_ms` it asks for: it is answered (possibly
    /// empty) by then. Default 60,000 ms.
    pub fetch_wait_max_ms: u32,
    /// Upper bound on the record bytes of one fetch response. Default 50 MiB.
    pub fetch_bytes_max: u32,
    /// Per-partition metric series beyond this many aggregate per topic. Default 10,000.
    pub metrics_partition_series_max: usize,
    /// Storage settings.
    pub storage: StorageConfig,
    /// Consumer group settings.
    pub groups: GroupConfig,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            metrics_connections_max: 64,
            metrics_timeout_ms: 10_000,
            data_dir: PathBuf::from("./cairn-data"),
            frame_bytes_max: 16 * 1024 * 1024,
            connections_max: 10_000,
            connection_in_flight_max: 256,
            idle_timeout_ms: 600_000,
            frame_timeout_ms: 30_000,
            auto_create_topics: false,
            default_partitions: 1,
            partitions_max: 10_000,
            shutdown_timeout_ms: 10_000,
            parked_fetches_max: 10_000,
            fetch_wait_max_ms: 60_000,
            fetch_bytes_max: 50 * 1024 * 1024,
            metrics_partition_series_max: 10_000,
            storage: StorageConfig::default(),
            groups: GroupConfig::default(),
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown keys included).
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause, with line and column.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range.
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl BrokerConfig {
    /// Loads a TOML file.
    ///
    /// # Errors
    /// [`ConfigError`] when it cannot be read or parsed.
    pub fn from_file(path: &Path) -> Result<BrokerConfig, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source: Box::new(source) })
    }

    /// Checks every range once at start.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.frame_bytes_max < 1024 {
            return bad("frame_bytes_max must be at least 1024");
        }
        if self.connections_max == 0 || self.connection_in_flight_max == 0 {
            return bad("connections_max and connection_in_flight_max must be positive");
        }
        // Each is a semaphore or queue size: larger would panic when the server starts (or, for
        // the in-flight queue, on every connection), not here.
        let permits_max = tokio::sync::Semaphore::MAX_PERMITS;
        for (key, v) in [
            ("connections_max", self.connections_max),
            ("connection_in_flight_max", self.connection_in_flight_max),
            ("metrics_connections_max", self.metrics_connections_max),
        ] {
            if v > permits_max {
                return Err(ConfigError::Invalid(format!("{key} must be at most {permits_max}")));
            }
        }
        if self.fetch_wait_max_ms == 0 {
            return bad("fetch_wait_max_ms must be positive");
        }
        if self.idle_timeout_ms == 0 || self.frame_timeout_ms == 0 {
            return bad("idle_timeout_ms and frame_timeout_ms must be positive");
        }
        if self.metrics_connections_max == 0 || self.metrics_timeout_ms == 0 {
            return bad("metrics_connections_max and metrics_timeout_ms must be positive");
        }
        if self.default_partitions == 0 || self.default_partitions > self.partitions_max {
            return bad("default_partitions must be 1..=partitions_max");
        }
        // A fetch response is one frame, whose length is a u32. Its records stay within
        // fetch_bytes_max plus one whole batch (which came in a request frame), and its
        // per-partition headers take less than twice the request's.
        if u64::from(self.fetch_bytes_max) + 3 * u64::from(self.frame_bytes_max) >= 1 << 32 {
            return bad(
                "fetch_bytes_max plus three times frame_bytes_max must be below 4 GiB (a fetch response is one frame)",
            );
        }
        if u64::from(self.storage.batch_bytes_max) + 1024 > u64::from(self.frame_bytes_max) {
            return bad("storage.batch_bytes_max must be smaller than frame_bytes_max");
        }
        self.storage.validate().map_err(|e| ConfigError::Invalid(format!("storage: {e}")))?;
        self.groups.validate().map_err(ConfigError::Invalid)
    }

    /// The configuration as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A zero frame timeout cut off any client whose socket was momentarily full; a zero idle
    /// timeout closed every connection at the first tick.
    #[test]
    fn zero_connection_timeouts_are_refused() {
        for c in [
            BrokerConfig { idle_timeout_ms: 0, ..BrokerConfig::default() },
            BrokerConfig { frame_timeout_ms: 0, ..BrokerConfig::default() },
        ] {
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains("idle_timeout_ms and frame_timeout_ms"), "{err}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "listen = \"127.0.0.1:1\"\nflush_intervall_ms = 5\n").unwrap();
        let err = BrokerConfig::from_file(&p).unwrap_err().to_string();
        assert!(err.contains("flush_intervall_ms"), "{err}");
    }

    #[test]
    fn the_example_config_parses_and_matches_the_defaults() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/config/cairn.example.toml");
        let c = BrokerConfig::from_file(&example).unwrap();
        c.validate().unwrap();
        assert_eq!(c, BrokerConfig::default());
    }

    #[test]
    fn a_zero_rebalance_timeout_cap_is_refused_at_start() {
        let mut c = BrokerConfig::default();
        c.groups.rebalance_timeout_ms_max = 0;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("rebalance_timeout_ms_max"), "{err}");
    }

    #[test]
    fn a_stalled_commit_is_answered_before_a_client_with_default_settings_gives_up() {
        // A client that times out first closes its connection (failing everything in flight on
        // it) instead of hearing REQUEST_TIMED_OUT and retrying the commit.
        let broker = std::time::Duration::from_millis(GroupConfig::default().offsets_commit_timeout_ms);
        let client = cairn_client::ConnectionConfig::default().request_timeout;
        assert!(broker * 2 <= client, "broker {broker:?}, client {client:?}");
    }

    #[test]
    fn a_zero_offsets_commit_timeout_is_refused_at_start() {
        let mut c = BrokerConfig::default();
        c.groups.offsets_commit_timeout_ms = 0;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("offsets_commit_timeout_ms"), "{err}");
    }

    #[test]
    fn a_zero_offsets_retention_is_refused_at_start() {
        let mut c = BrokerConfig::default();
        c.groups.offsets_retention_ms = 0;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("offsets_retention_ms"), "{err}");
    }

    #[test]
    fn limits_too_large_to_build_are_refused_at_start() {
        for set in [
            |c: &mut BrokerConfig| c.connections_max = usize::MAX,
            |c: &mut BrokerConfig| c.connection_in_flight_max = usize::MAX,
            |c: &mut BrokerConfig| c.metrics_connections_max = usize::MAX,
        ] {
            let mut c = BrokerConfig::default();
            set(&mut c);
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains("must be at most"), "{err}");
        }
    }

    #[test]
    fn limits_whose_fetch_response_could_pass_4_gib_are_refused_at_start() {
        // A fetch response is one frame, and a frame's length is a u32: encoding a larger one
        // would panic the connection's task.
        let c = BrokerConfig { fetch_bytes_max: u32::MAX, ..BrokerConfig::default() };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("fetch_bytes_max"), "{err}");
        let c = BrokerConfig { frame_bytes_max: 1 << 31, ..BrokerConfig::default() };
        assert!(c.validate().unwrap_err().to_string().contains("frame_bytes_max"));
        let c = BrokerConfig { fetch_bytes_max: 1 << 30, frame_bytes_max: 1 << 29, ..BrokerConfig::default() };
        c.validate().unwrap();
    }

    #[test]
    fn printed_config_parses_back() {
        let c = BrokerConfig::default();
        let back: BrokerConfig = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(back, c);
    }
}
