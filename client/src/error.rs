//! The client's one error type.

use cairn_protocol::{BatchError, DecodeError, ErrorCode};

/// Everything that can go wrong talking to a broker. [`Error::is_retriable`] says whether the
/// same operation may succeed if tried again.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Could not connect.
    #[error("cannot connect to broker {addr}: {source}")]
    Connect {
        /// The broker address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The connection failed or was closed while a request was outstanding.
    #[error("connection to broker {addr} lost: {detail}")]
    Disconnected {
        /// The broker address.
        addr: String,
        /// What happened.
        detail: String,
    },
    /// The request did not complete in time.
    #[error("{operation} timed out after {ms} ms")]
    Timeout {
        /// What timed out.
        operation: &'static str,
        /// The timeout.
        ms: u64,
    },
    /// The broker answered with an error.
    #[error("broker error {code}{}", message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Broker {
        /// The wire error code.
        code: ErrorCode,
        /// The broker's details, if any.
        message: Option<String>,
    },
    /// The broker's answer could not be decoded.
    #[error("malformed response from broker: {0}")]
    Protocol(#[from] DecodeError),
    /// A fetched record batch is invalid.
    #[error("invalid record batch from broker: {0}")]
    Batch(#[from] BatchError),
    /// The topic does not exist.
    #[error("unknown topic {0}")]
    UnknownTopic(String),
    /// The caller passed something invalid (configuration, partition, record too large...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The producer or consumer was closed.
    #[error("closed")]
    Closed,
}

impl Error {
    /// Whether retrying the same operation may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Disconnected { .. } | Error::Timeout { .. } => true,
            Error::Broker { code, .. } => code.is_retriable(),
            _ => false,
        }
    }

    /// The broker error code, if this is a broker error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Broker { code, .. } => Some(*code),
            _ => None,
        }
    }

    pub(crate) fn broker(code: ErrorCode, message: Option<String>) -> Error {
        Error::Broker { code, message }
    }

    /// An owned copy of this error, for an outcome that more than one caller reads (every
    /// record of a failed batch). An I/O cause keeps its kind and text.
    pub(crate) fn duplicate(&self) -> Error {
        match self {
            Error::Connect { addr, source } => {
                Error::Connect { addr: addr.clone(), source: std::io::Error::new(source.kind(), source.to_string()) }
            }
            Error::Disconnected { addr, detail } => Error::Disconnected { addr: addr.clone(), detail: detail.clone() },
            Error::Timeout { operation, ms } => Error::Timeout { operation, ms: *ms },
            Error::Broker { code, message } => Error::Broker { code: *code, message: message.clone() },
            Error::Protocol(e) => Error::Protocol(e.clone()),
            Error::Batch(e) => Error::Batch(e.clone()),
            Error::UnknownTopic(t) => Error::UnknownTopic(t.clone()),
            Error::InvalidArgument(m) => Error::InvalidArgument(m.clone()),
            Error::Closed => Error::Closed,
        }
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;
