//! Fetch: read whole batches, zero-copy; park until `min_bytes` arrive or `max_wait_ms` passes.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use cairn_protocol::messages::fetch::{FetchPartitionResponse, FetchRequest, FetchResponse, FetchTopicResponse};
use cairn_protocol::ErrorCode;

use super::{count_records, first_error, storage_error_code, Ctx, Reply};
use crate::server::Broker;
use crate::storage::StorageError;

pub(crate) fn fetch(ctx: Ctx, req: FetchRequest) -> Reply {
    let req = distinct_partitions(req);
    let Read { response, bytes, more } = read_once(&ctx.broker, &req);
    let error = first_error(response.topics.iter().flat_map(|t| t.partitions.iter().map(|p| p.error)));
    let broker = &ctx.broker;
    // A fetch naming no partition has nothing to wait for (and nothing to wake it).
    let nothing_named = req.topics.iter().all(|t| t.partitions.is_empty());
    let satisfied = bytes >= req.min_bytes as usize || more || req.max_wait_ms == 0 || error.is_some() || nothing_named;
    if satisfied {
        record(broker, &response);
        return ctx.reply(&response, error);
    }
    // Park, unless too many fetches are parked already: then answer now (empty), never queue.
    let Some(slot) = ParkedSlot::take(&ctx.broker) else {
        metrics::counter!("cairn_parked_fetches_refused_total").increment(1);
        record(broker, &response);
        return ctx.reply(&response, None);
    };
    // The wait counts from now, not from when the connection's writer first polls the reply
    // (which is after the responses ahead of it).
    let wait = req.max_wait_ms.min(ctx.broker.config.fetch_wait_max_ms);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(u64::from(wait));
    ctx.reply_later(async move {
        let response = park(&slot.0, &req, deadline).await;
        record(&slot.0, &response);
        drop(slot);
        let error = first_error(response.topics.iter().flat_map(|t| t.partitions.iter().map(|p| p.error)));
        (response, error)
    })
}

/// The request with each partition once, where it first appears, and without the later entries
/// of a topic that are left with no partition (OffsetFetch answers repeats the same way). A
/// parked fetch naming one partition a million times would otherwise wait on it a million
/// times over and re-read it as often on every append. Requests without repeats, the usual
/// case, are passed on as they are, and small ones are checked without allocating.
fn distinct_partitions(mut req: FetchRequest) -> FetchRequest {
    if !has_repeats(&req) {
        return req;
    }
    // Which entries stay, decided on borrowed names (a name can be 64 KiB: copying it per
    // partition could turn one request into gigabytes), then applied.
    let (keep, keep_topic): (Vec<bool>, Vec<bool>) = {
        let mut seen = HashSet::new();
        let mut seen_topics = HashSet::new();
        let mut keep = Vec::new();
        let keep_topic = req
            .topics
            .iter()
            .map(|t| {
                let before = keep.len();
                keep.extend(t.partitions.iter().map(|p| seen.insert((t.name.as_str(), p.partition))));
                seen_topics.insert(t.name.as_str()) || keep[before..].contains(&true)
            })
            .collect();
        (keep, keep_topic)
    };
    let (mut keep, mut keep_topic) = (keep.into_iter(), keep_topic.into_iter());
    req.topics.retain_mut(|t| {
        t.partitions.retain(|_| keep.next().unwrap_or(false));
        keep_topic.next().unwrap_or(false)
    });
    req
}

/// Whether a topic or a (topic, partition) appears more than once in `req`.
fn has_repeats(req: &FetchRequest) -> bool {
    let topics = &req.topics;
    let partitions = || topics.iter().flat_map(|t| t.partitions.iter().map(move |p| (t.name.as_str(), p.partition)));
    let total: usize = topics.iter().map(|t| t.partitions.len()).sum();
    if topics.len() <= 16 && total <= 16 {
        // What consumers send: a pairwise look is cheaper than a set.
        let repeated_topic = topics.iter().enumerate().any(|(i, t)| topics[..i].iter().any(|u| u.name == t.name));
        return repeated_topic || partitions().enumerate().any(|(i, tp)| partitions().take(i).any(|up| up == tp));
    }
    let mut names = HashSet::with_capacity(topics.len());
    let mut seen = HashSet::with_capacity(total);
    !topics.iter().all(|t| names.insert(t.name.as_str())) || !partitions().all(|tp| seen.insert(tp))
}

/// One of `parked_fetches_max` slots, given back when the parked fetch ends, also when it is
/// dropped unfinished because its connection closed.
struct ParkedSlot(Arc<Broker>);

impl ParkedSlot {
    /// Takes a slot, or `None` when `parked_fetches_max` fetches are parked already.
    fn take(broker: &Arc<Broker>) -> Option<ParkedSlot> {
        let slot = ParkedSlot(Arc::clone(broker));
        // Dropping `slot` gives the slot back when there was none to take.
        (broker.parked_fetches.fetch_add(1, Ordering::AcqRel) < broker.config.parked_fetches_max).then_some(slot)
    }
}

impl Drop for ParkedSlot {
    fn drop(&mut self) {
        self.0.parked_fetches.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Waits on the partitions' notifiers until enough bytes are readable, the deadline passes, or
/// the broker shuts down. Every wake re-reads; there is no polling.
async fn park(broker: &Broker, req: &FetchRequest, deadline: tokio::time::Instant) -> FetchResponse {
    let notifiers: Vec<_> = req
        .topics
        .iter()
        .flat_map(|t| t.partitions.iter().map(move |p| broker.notifier(&t.name, p.partition)))
        .collect();
    loop {
        let mut waits: Vec<Pin<Box<tokio::sync::futures::Notified<'_>>>> =
            notifiers.iter().map(|n| Box::pin(n.notified())).collect();
        for w in &mut waits {
            w.as_mut().enable();
        }
        let Read { response, bytes, more } = read_once(broker, req);
        let has_error = response.topics.iter().any(|t| t.partitions.iter().any(|p| !p.error.is_ok()));
        if bytes >= req.min_bytes as usize || more || has_error {
            return response;
        }
        tokio::select! {
            _ = futures::future::select_all(waits) => {}
            _ = tokio::time::sleep_until(deadline) => return read_once(broker, req).response,
            _ = broker.shutdown.cancelled() => return read_once(broker, req).response,
        }
    }
}

/// One read of every partition a fetch names.
struct Read {
    response: FetchResponse,
    /// Record bytes in `response`.
    bytes: usize,
    /// Some partition's read stopped at the end of a segment that later ones follow: more is
    /// readable now than `response` holds, and waiting would only wake to the same read (as
    /// Kafka, a fetch at an earlier segment than the log end's is answered at once).
    more: bool,
}

/// Reads every requested partition once.
fn read_once(broker: &Broker, req: &FetchRequest) -> Read {
    let mut budget = req.max_bytes.min(broker.config.fetch_bytes_max) as u64;
    let mut total = 0usize;
    let mut more = false;
    let mut topics = Vec::with_capacity(req.topics.len());
    for t in &req.topics {
        let topic = broker.store.topic(&t.name);
        let mut partitions = Vec::with_capacity(t.partitions.len());
        for p in &t.partitions {
            let Some(log) = topic.as_ref().and_then(|topic| topic.partitions.get(p.partition as usize)) else {
                partitions.push(FetchPartitionResponse::empty(p.partition, ErrorCode::UnknownTopicOrPartition, -1, -1));
                continue;
            };
            if let Some(g) = &req.group {
                let code = broker.groups.check_fetch(&g.group_id, &g.member_id, g.generation_id, &t.name, p.partition);
                if !code.is_ok() {
                    partitions.push(FetchPartitionResponse::empty(
                        p.partition,
                        code,
                        log.log_start_offset() as i64,
                        log.log_end_offset() as i64,
                    ));
                    continue;
                }
            }
            let start = log.log_start_offset() as i64;
            let end = log.log_end_offset() as i64;
            if p.fetch_offset < 0 {
                partitions.push(FetchPartitionResponse::empty(p.partition, ErrorCode::OffsetOutOfRange, start, end));
                continue;
            }
            // Every partition stays within what is left of the budget; until one has returned
            // records, a partition gets at least its first batch whole (progress). Budget spent:
            // later partitions get nothing this time (but no error).
            let mut max = u64::from(p.partition_max_bytes).min(budget);
            if total == 0 && p.partition_max_bytes > 0 {
                max = max.max(1);
            }
            if max == 0 {
                partitions.push(FetchPartitionResponse::empty(p.partition, ErrorCode::None, start, end));
                continue;
            }
            match log.read(p.fetch_offset as u64, max) {
                Ok(r) => {
                    let n = r.len();
                    total += n;
                    more |= r.more_after;
                    budget = budget.saturating_sub(n as u64);
                    partitions.push(FetchPartitionResponse {
                        partition: p.partition,
                        error: ErrorCode::None,
                        log_start_offset: r.log_start_offset as i64,
                        log_end_offset: r.log_end_offset as i64,
                        records: r.chunks,
                    });
                }
                Err(e) => {
                    if !matches!(e, StorageError::OffsetOutOfRange { .. }) {
                        metrics::counter!("cairn_storage_errors_total", "kind" => e.kind()).increment(1);
                        tracing::warn!(topic = %t.name, partition = p.partition, error = %e, "fetch read failed");
                    }
                    partitions.push(FetchPartitionResponse::empty(
                        p.partition,
                        storage_error_code(&e),
                        log.log_start_offset() as i64,
                        log.log_end_offset() as i64,
                    ));
                }
            }
        }
        topics.push(FetchTopicResponse { name: t.name.clone(), partitions });
    }
    Read { response: FetchResponse { topics }, bytes: total, more }
}

fn record(broker: &Broker, response: &FetchResponse) {
    for t in &response.topics {
        let bytes: usize = t.partitions.iter().map(FetchPartitionResponse::records_len).sum();
        if bytes == 0 {
            continue;
        }
        let records: u64 = t.partitions.iter().map(|p| count_records(&p.records)).sum();
        let m = broker.topic_metrics(&t.name);
        m.fetch_bytes.increment(bytes as u64);
        m.fetch_records.increment(records);
    }
}

#[cfg(test)]
mod tests {
    use cairn_protocol::messages::fetch::{FetchPartition, FetchTopic};

    use super::*;

    /// A request of `(topic, [(partition, fetch_offset)])` entries.
    fn request(topics: &[(&str, &[(u32, i64)])]) -> FetchRequest {
        let topics = topics
            .iter()
            .map(|(name, parts)| FetchTopic {
                name: (*name).into(),
                partitions: parts
                    .iter()
                    .map(|&(partition, fetch_offset)| FetchPartition {
                        partition,
                        fetch_offset,
                        partition_max_bytes: 1,
                    })
                    .collect(),
            })
            .collect();
        FetchRequest { max_wait_ms: 0, min_bytes: 0, max_bytes: 1, group: None, topics }
    }

    #[test]
    fn repeats_are_dropped_where_they_repeat_on_the_small_and_the_large_path() {
        let many: Vec<(u32, i64)> = (0..40).map(|p| (p % 20, i64::from(p))).collect();
        let cases: Vec<(FetchRequest, FetchRequest)> = vec![
            (
                request(&[("a", &[(0, 5), (1, 0)]), ("b", &[(0, 0)])]),
                request(&[("a", &[(0, 5), (1, 0)]), ("b", &[(0, 0)])]),
            ),
            (request(&[("a", &[(0, 5), (0, 9)])]), request(&[("a", &[(0, 5)])])),
            (
                request(&[("a", &[(0, 5)]), ("a", &[(0, 7), (1, 0)]), ("a", &[])]),
                request(&[("a", &[(0, 5)]), ("a", &[(1, 0)])]),
            ),
            (request(&[("a", &[]), ("a", &[])]), request(&[("a", &[])])),
            (request(&[("a", &many)]), request(&[("a", &many[..20])])),
            (request(&[("a", &many[..20]), ("b", &many[..20])]), request(&[("a", &many[..20]), ("b", &many[..20])])),
        ];
        for (asked, want) in cases {
            assert_eq!(distinct_partitions(asked.clone()), want, "{asked:?}");
        }
    }
}
