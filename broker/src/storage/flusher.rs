//! Group commit: one thread makes appends durable for everyone waiting.
//!
//! Producers with `acks=all` send a [`FlushRequest`] after appending. The flusher takes every
//! request that is waiting, syncs each partition involved once, and answers all of them; requests
//! that arrive while a sync runs are served together by the next round. Between requests it
//! syncs partitions whose unsynced data is older than their `flush_interval_ms`, and periodically
//! writes the recovery-point checkpoint.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::error::{Result, StorageError};
use super::partition::PartitionLog;
use super::StoreInner;

/// Called once with the outcome of a durability wait.
pub type FlushDone = Box<dyn FnOnce(Result<()>) + Send>;

/// A request to make a partition durable up to an offset.
pub(crate) enum FlushRequest {
    /// Sync `partition` until `offset` (exclusive) is durable, then call `done`.
    Sync { partition: Arc<PartitionLog>, offset: u64, done: FlushDone },
    /// Stop the thread.
    Stop,
}

const TICK: Duration = Duration::from_millis(50);

/// The flusher thread's loop.
pub(crate) fn run(rx: Receiver<FlushRequest>, store: Weak<StoreInner>) {
    let mut last_checkpoint = Instant::now();
    loop {
        let first = match rx.recv_timeout(TICK) {
            Ok(r) => Some(r),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut batch: Vec<FlushRequest> = first.into_iter().collect();
        batch.extend(rx.try_iter());
        let stop = batch.iter().any(|r| matches!(r, FlushRequest::Stop));
        serve(batch);
        let Some(store) = store.upgrade() else { return };
        if stop {
            return;
        }
        let now = store.shared.now_ms();
        for p in store.partitions() {
            if p.flush_due(now) {
                if let Err(e) = p.sync() {
                    tracing::error!(topic = p.topic(), partition = p.partition(), error = %e, "periodic flush failed");
                }
            }
        }
        if last_checkpoint.elapsed() >= Duration::from_millis(store.shared.config.checkpoint_interval_ms) {
            last_checkpoint = Instant::now();
            match store.write_checkpoint(false) {
                Ok(()) => {}
                // Expected while the disk is read-only; said once at startup.
                Err(e @ StorageError::ReadOnly { .. }) => {
                    tracing::debug!(error = %e, "no checkpoint on a read-only disk")
                }
                Err(e) => tracing::error!(error = %e, "writing the recovery checkpoint failed"),
            }
        }
    }
}

/// Syncs each partition once and answers every waiter.
fn serve(batch: Vec<FlushRequest>) {
    type Waiting = (Arc<PartitionLog>, Vec<(u64, FlushDone)>);
    let mut by_partition: HashMap<*const PartitionLog, Waiting> = HashMap::new();
    for req in batch {
        if let FlushRequest::Sync { partition, offset, done } = req {
            by_partition
                .entry(Arc::as_ptr(&partition))
                .or_insert_with(|| (Arc::clone(&partition), Vec::new()))
                .1
                .push((offset, done));
        }
    }
    for (_, (partition, waiters)) in by_partition {
        let result = partition.sync();
        for (offset, done) in waiters {
            done(match &result {
                Ok(durable) if *durable >= offset => Ok(()),
                Ok(durable) => Err(StorageError::Io {
                    op: "sync",
                    path: partition.dir().to_owned(),
                    source: std::io::Error::other(format!("durable offset {durable} is below {offset}")),
                }),
                // Its topic was deleted: the producer hears of an unknown topic.
                Err(StorageError::UnknownTopic(topic)) => Err(StorageError::UnknownTopic(topic.clone())),
                Err(e) => Err(StorageError::Io {
                    op: "sync",
                    path: partition.dir().to_owned(),
                    source: std::io::Error::other(e.to_string()),
                }),
            });
        }
    }
}
