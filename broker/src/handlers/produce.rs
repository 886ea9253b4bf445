//! Produce: validate and append each partition's batch; answer per the requested acks.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use cairn_protocol::messages::produce::{
    ProducePartitionResponse, ProduceRequest, ProduceResponse, ProduceTopicResponse,
};
use cairn_protocol::{Acks, ErrorCode};

use super::{distinct, first_error, storage_error_code, Ctx, Reply};
use crate::server::Broker;
use crate::storage::{PartitionLog, StorageError};

struct Waiter {
    topic: usize,
    partition: usize,
    rx: oneshot::Receiver<Result<(), StorageError>>,
}

pub(crate) fn produce(ctx: Ctx, req: ProduceRequest) -> Reply {
    let missing = topics_to_create(&ctx, req.topics.iter().map(|t| t.name.as_str()));
    if !missing.is_empty() {
        return Reply::CreateTopics(missing);
    }
    let broker = &ctx.broker;
    let mut response = ProduceResponse { topics: Vec::with_capacity(req.topics.len()) };
    let mut waiters = Vec::new();
    for (ti, t) in req.topics.iter().enumerate() {
        if t.name.starts_with("__") {
            // Internal topics (committed offsets) are written by the broker only. The message
            // does not repeat the name, which the response carries once per topic: copied per
            // partition, a long name would make a small request take gigabytes.
            let message = Some("the topic is internal: the broker writes it, clients may not".to_owned());
            let partitions = t
                .partitions
                .iter()
                .map(|p| ProducePartitionResponse::error(p.partition, ErrorCode::InvalidTopicName, message.clone()))
                .collect();
            response.topics.push(ProduceTopicResponse { name: t.name.clone(), partitions });
            continue;
        }
        let topic = broker.store.topic(&t.name);
        let metrics = topic.as_ref().map(|_| broker.topic_metrics(&t.name));
        let mut partitions = Vec::with_capacity(t.partitions.len());
        for (pi, p) in t.partitions.iter().enumerate() {
            let Some(log) = topic.as_ref().and_then(|topic| topic.partitions.get(p.partition as usize)) else {
                partitions.push(ProducePartitionResponse::error(p.partition, ErrorCode::UnknownTopicOrPartition, None));
                continue;
            };
            match log.append(&p.records.contiguous()) {
                Ok(info) => {
                    if info.duplicate {
                        // A producer retry of a batch already stored: answered, not stored again.
                        tracing::debug!(topic = %t.name, partition = p.partition, base_offset = info.base_offset, "duplicate batch from a producer retry");
                    } else {
                        if let Some(m) = &metrics {
                            m.produce_records.increment(info.next_offset - info.base_offset);
                            m.produce_bytes.increment(p.records.len() as u64);
                        }
                        broker.notify_append(&t.name, p.partition);
                    }
                    if req.acks == Acks::All {
                        waiters.push(wait_durable(&ctx, log, info.next_offset, ti, pi));
                    }
                    partitions.push(ProducePartitionResponse {
                        partition: p.partition,
                        error: ErrorCode::None,
                        message: None,
                        base_offset: info.base_offset as i64,
                        log_append_time_ms: info.append_time_ms,
                        log_start_offset: info.log_start_offset as i64,
                    });
                }
                Err(e) => {
                    let code = storage_error_code(&e);
                    if !matches!(e, StorageError::InvalidBatch(_)) {
                        metrics::counter!("cairn_storage_errors_total", "kind" => e.kind()).increment(1);
                    }
                    tracing::debug!(topic = %t.name, partition = p.partition, error = %e, "produce rejected");
                    partitions.push(ProducePartitionResponse::error(p.partition, code, Some(e.to_string())));
                }
            }
        }
        response.topics.push(ProduceTopicResponse { name: t.name.clone(), partitions });
    }
    let error = first_error(response.topics.iter().flat_map(|t| t.partitions.iter().map(|p| p.error)));
    if req.acks == Acks::None {
        ctx.done(error);
        return Reply::Nothing;
    }
    if waiters.is_empty() {
        return ctx.reply(&response, error);
    }
    let timeout = Duration::from_millis(u64::from(req.timeout_ms.max(1)));
    // The deadline counts from now: the future below is first polled only once the responses
    // pipelined before it have been written, which a stalled sync can hold up.
    let deadline = tokio::time::Instant::now() + timeout;
    ctx.reply_later(async move {
        for w in waiters {
            let outcome = tokio::time::timeout_at(deadline, w.rx).await;
            let (code, message) = match outcome {
                Ok(Ok(Ok(()))) => continue,
                Ok(Ok(Err(e))) => (storage_error_code(&e), e.to_string()),
                Ok(Err(_)) => (ErrorCode::StorageError, "the flusher stopped before syncing".to_owned()),
                Err(_) => {
                    (ErrorCode::RequestTimedOut, format!("not durable within timeout_ms {}", timeout.as_millis()))
                }
            };
            let p = &mut response.topics[w.topic].partitions[w.partition];
            *p = ProducePartitionResponse::error(p.partition, code, Some(message));
        }
        let error = first_error(response.topics.iter().flat_map(|t| t.partitions.iter().map(|p| p.error)));
        (response, error)
    })
}

fn wait_durable(ctx: &Ctx, log: &Arc<PartitionLog>, offset: u64, topic: usize, partition: usize) -> Waiter {
    let (tx, rx) = oneshot::channel();
    ctx.broker.store.sync_async(
        Arc::clone(log),
        offset,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    Waiter { topic, partition, rx }
}

/// The topics among `names` that `auto_create_topics` would create for this request, each once;
/// empty when there are none or the connection has already tried.
pub(crate) fn topics_to_create<'a>(ctx: &Ctx, names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let broker = &ctx.broker;
    if !ctx.may_create || !broker.config.auto_create_topics {
        return Vec::new();
    }
    distinct(names)
        .filter(|name| !name.starts_with("__") && broker.store.topic(name).is_none())
        .map(str::to_owned)
        .collect()
}

/// Creates topics with the broker's defaults (`auto_create_topics`). Blocking: files are
/// created and synced, and other topic administration may hold the store's lock.
pub(crate) fn auto_create_topics(broker: &Broker, names: &[String]) {
    let config = broker.store.config().topic_defaults();
    for name in names {
        match broker.store.create_topic(name, broker.config.default_partitions, config.clone()) {
            Ok(_) => {
                tracing::info!(topic = %name, partitions = broker.config.default_partitions, "auto-created topic");
                broker.groups.topic_changed(name);
            }
            Err(StorageError::TopicExists(_)) => {}
            Err(e) => tracing::warn!(topic = %name, error = %e, "auto-creating topic failed"),
        }
    }
}
