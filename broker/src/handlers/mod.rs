//! Request handlers: translate protocol messages into storage and group operations.

pub(crate) mod fetch;
pub(crate) mod groups;
pub(crate) mod list_offsets;
pub(crate) mod produce;
pub(crate) mod topics;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use cairn_protocol::record_batch::BatchError;
use cairn_protocol::{encode_response, ApiKey, Encode, ErrorCode};

use crate::server::Broker;
pub(crate) use crate::server::Reply;
use crate::storage::StorageError;

/// Everything a handler needs about the request it serves.
pub(crate) struct Ctx {
    pub(crate) broker: Arc<Broker>,
    pub(crate) corr: u32,
    pub(crate) started: Instant,
    pub(crate) api: ApiKey,
    pub(crate) client_id: String,
    /// Whether a missing topic may be auto-created ([`Reply::CreateTopics`]); off once the
    /// connection has tried.
    pub(crate) may_create: bool,
}

impl Ctx {
    /// Records the request's metrics.
    pub(crate) fn done(&self, error: Option<ErrorCode>) {
        self.broker.requests.record(
            self.api,
            error.filter(|e| !e.is_ok()).map(ErrorCode::name),
            self.started.elapsed(),
        );
    }

    /// Encodes a response now.
    pub(crate) fn reply<B: Encode>(&self, body: &B, error: Option<ErrorCode>) -> Reply {
        self.done(error);
        Reply::Now(encode_response(self.corr, body))
    }

    /// Runs `f` on the blocking pool (file I/O) and replies with its result. The connection
    /// reads its next request only once `f` is done ([`Reply::InOrder`]).
    pub(crate) fn reply_blocking<B, F>(self, f: F) -> Reply
    where
        B: Encode + Send + 'static,
        F: FnOnce(&Broker) -> (B, Option<ErrorCode>) + Send + 'static,
    {
        let broker = Arc::clone(&self.broker);
        Reply::InOrder(Box::pin(async move {
            match tokio::task::spawn_blocking(move || f(&broker)).await {
                Ok((body, error)) => {
                    self.done(error);
                    Some(encode_response(self.corr, &body))
                }
                Err(e) => {
                    tracing::error!(error = %e, api = self.api.name(), "handler panicked");
                    self.done(Some(ErrorCode::Unknown));
                    Some(cairn_protocol::encode_error_response(self.corr, ErrorCode::Unknown, "internal error"))
                }
            }
        }))
    }

    /// Replies later with whatever `fut` produces. The future runs in the connection's writer
    /// when the responses before it have been written; if the connection closes first, it is
    /// dropped (so it must not own anything that needs it to finish).
    pub(crate) fn reply_later<B, Fut>(self, fut: Fut) -> Reply
    where
        B: Encode + Send + 'static,
        Fut: std::future::Future<Output = (B, Option<ErrorCode>)> + Send + 'static,
    {
        Reply::Later(Box::pin(async move {
            let (body, error) = fut.await;
            self.done(error);
            Some(encode_response(self.corr, &body))
        }))
    }
}

/// The wire error code for a storage error, and a message for the client.
pub(crate) fn storage_error_code(e: &StorageError) -> ErrorCode {
    match e {
        StorageError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
        StorageError::StorageFull { .. } => ErrorCode::StorageFull,
        StorageError::InvalidBatch(BatchError::TooLarge { .. }) => ErrorCode::BatchTooLarge,
        StorageError::InvalidBatch(_) => ErrorCode::CorruptBatch,
        StorageError::Io { .. } | StorageError::Poisoned(_) | StorageError::ReadOnly { .. } => ErrorCode::StorageError,
        StorageError::TopicExists(_) => ErrorCode::TopicAlreadyExists,
        StorageError::UnknownTopic(_) => ErrorCode::UnknownTopicOrPartition,
        StorageError::InvalidTopicName(_) => ErrorCode::InvalidTopicName,
        StorageError::InvalidConfig(_) => ErrorCode::InvalidConfig,
        StorageError::Closed => ErrorCode::ShuttingDown,
    }
}

/// Counts records in a buffer of whole batches (reads each header's record count).
pub(crate) fn count_records(chunks: &[Bytes]) -> u64 {
    let mut n = 0u64;
    for chunk in chunks {
        let mut pos = 0usize;
        while pos + 61 <= chunk.len() {
            let len = i32::from_be_bytes([chunk[pos + 8], chunk[pos + 9], chunk[pos + 10], chunk[pos + 11]]);
            if len <= 0 {
                break;
            }
            n += u64::from(u32::from_be_bytes([chunk[pos + 57], chunk[pos + 58], chunk[pos + 59], chunk[pos + 60]]));
            pos += 12 + len as usize;
        }
    }
    n
}

/// First error in a list of codes, for metrics.
pub(crate) fn first_error(codes: impl IntoIterator<Item = ErrorCode>) -> Option<ErrorCode> {
    codes.into_iter().find(|c| !c.is_ok())
}

/// Each name once, in the order first named: a request repeating a name is answered once for
/// it (otherwise a few kilobytes naming a large topic thousands of times would make the broker
/// build a response of hundreds of megabytes).
pub(crate) fn distinct<'a>(names: impl IntoIterator<Item = &'a str>) -> impl Iterator<Item = &'a str> {
    let mut seen = std::collections::HashSet::new();
    names.into_iter().filter(move |n| seen.insert(*n))
}
