//! Storage errors.

use std::io;
use std::path::PathBuf;

use cairn_protocol::BatchError;

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The offset is outside `log_start..=log_end`.
    #[error("offset {offset} is out of range: the log holds {log_start}..{log_end}")]
    OffsetOutOfRange {
        /// Offset asked for.
        offset: u64,
        /// First offset in the log.
        log_start: u64,
        /// Offset after the last record.
        log_end: u64,
    },
    /// The disk is full or below the free-space floor; nothing was written.
    #[error("storage full: {free_bytes} bytes free, floor is {floor_bytes} bytes")]
    StorageFull {
        /// Free bytes on the data disk when the append was refused.
        free_bytes: u64,
        /// The configured floor.
        floor_bytes: u64,
    },
    /// The batch failed validation; nothing was written.
    #[error("invalid record batch: {0}")]
    InvalidBatch(#[from] BatchError),
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An earlier fsync of this partition failed; its durable state is unknown, so it refuses
    /// appends until the broker restarts and recovers it.
    #[error("partition {0} is read-only after a failed sync; restart the broker to recover it")]
    Poisoned(String),
    /// The topic exists already.
    #[error("topic {0} already exists")]
    TopicExists(String),
    /// No such topic.
    #[error("unknown topic {0}")]
    UnknownTopic(String),
    /// Invalid topic name.
    #[error("invalid topic name {0:?}: use 1-249 characters from [A-Za-z0-9._-], not '.' or '..'")]
    InvalidTopicName(String),
    /// Invalid topic or storage configuration.
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    /// The store is shutting down.
    #[error("the log store is closed")]
    Closed,
    /// The data directory's filesystem is read-only: reads work, writes are refused.
    #[error("{op} {path}: the filesystem is read-only; reads continue, writes are refused until it is writable again")]
    ReadOnly {
        /// What we were doing.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
    },
}

/// Whether an I/O error means the filesystem is read-only.
pub(crate) fn is_read_only(e: &io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::ROFS.raw_os_error())
}

impl StorageError {
    /// Wraps an I/O error with what we were doing and where.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> StorageError {
        if source.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) {
            return StorageError::StorageFull { free_bytes: 0, floor_bytes: 0 };
        }
        if is_read_only(&source) {
            return StorageError::ReadOnly { op, path: path.into() };
        }
        StorageError::Io { op, path: path.into(), source }
    }

    /// A short label for the `cairn_storage_errors_total{kind}` metric.
    pub fn kind(&self) -> &'static str {
        match self {
            StorageError::OffsetOutOfRange { .. } => "offset_out_of_range",
            StorageError::StorageFull { .. } => "storage_full",
            StorageError::InvalidBatch(_) => "invalid_batch",
            StorageError::Io { .. } => "io",
            StorageError::ReadOnly { .. } => "read_only",
            StorageError::Poisoned(_) => "poisoned",
            StorageError::TopicExists(_) | StorageError::UnknownTopic(_) | StorageError::InvalidTopicName(_) => "topic",
            StorageError::InvalidConfig(_) => "config",
            StorageError::Closed => "closed",
        }
    }
}

/// Result alias for storage operations.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;
