//! Group APIs: JoinGroup, Heartbeat, LeaveGroup, ListGroups, DescribeGroups, OffsetCommit,
//! OffsetFetch.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use cairn_protocol::messages::groups::{
    DescribeGroupsRequest, DescribeGroupsResponse, ErrorOnlyResponse, HeartbeatRequest, JoinGroupRequest,
    JoinGroupResponse, LeaveGroupRequest, ListGroupsResponse,
};
use cairn_protocol::messages::offsets::{
    OffsetCommitRequest, OffsetCommitResponse, OffsetFetchPartitionResponse, OffsetFetchRequest, OffsetFetchResponse,
    OffsetFetchTopicResponse, PartitionErrors,
};
use cairn_protocol::ErrorCode;

use super::{distinct, first_error, storage_error_code, Ctx, Reply};
use crate::groups::{CommitEntry, OffsetAndMetadata};

pub(crate) fn join_group(ctx: Ctx, req: JoinGroupRequest) -> Reply {
    let broker = Arc::clone(&ctx.broker);
    let client_id = ctx.client_id.clone();
    ctx.reply_later(async move {
        let member_id = req.member_id.clone();
        // A join may wait for a rebalance for up to rebalance_timeout_ms: not through shutdown.
        let response = tokio::select! {
            r = broker.groups.join(req, client_id, &broker.store) => r,
            _ = broker.shutdown.cancelled() => JoinGroupResponse {
                error: ErrorCode::ShuttingDown,
                generation_id: -1,
                member_id,
                heartbeat_interval_ms: 0,
                assignment: Vec::new(),
            },
        };
        let error = Some(response.error);
        (response, error)
    })
}

pub(crate) fn heartbeat(ctx: Ctx, req: HeartbeatRequest) -> Reply {
    let error = ctx.broker.groups.heartbeat(&req.group_id, &req.member_id, req.generation_id);
    ctx.reply(&ErrorOnlyResponse { error }, Some(error))
}

pub(crate) fn leave_group(ctx: Ctx, req: LeaveGroupRequest) -> Reply {
    let error = ctx.broker.groups.leave(&req.group_id, &req.member_id);
    ctx.reply(&ErrorOnlyResponse { error }, Some(error))
}

pub(crate) fn list_groups(ctx: Ctx) -> Reply {
    let response = ListGroupsResponse { groups: ctx.broker.groups.list() };
    ctx.reply(&response, None)
}

pub(crate) fn describe_groups(ctx: Ctx, req: DescribeGroupsRequest) -> Reply {
    let groups = distinct(req.groups.iter().map(String::as_str))
        .map(|g| ctx.broker.groups.describe(g, &ctx.broker.store))
        .collect();
    let response = DescribeGroupsResponse { groups };
    ctx.reply(&response, None)
}

pub(crate) fn offset_commit(ctx: Ctx, req: OffsetCommitRequest) -> Reply {
    let broker = Arc::clone(&ctx.broker);
    let entries: Vec<CommitEntry<'_>> = req
        .topics
        .iter()
        .flat_map(|t| t.partitions.iter().map(move |p| (t.name.as_str(), p.partition, p.offset, p.metadata.as_deref())))
        .collect();
    let shape: Vec<(String, Vec<u32>)> =
        req.topics.iter().map(|t| (t.name.clone(), t.partitions.iter().map(|p| p.partition).collect())).collect();
    let now = crate::storage::system_clock()();
    // Offsets of partitions that do not exist are refused (not stored for ever) by the
    // coordinator, after the group checks, in the order PROTOCOL 6.8 gives.
    let (codes, pending) =
        match broker.groups.commit(&broker.store, &req.group_id, &req.member_id, req.generation_id, &entries, now) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(group = %req.group_id, error = %e, "storing committed offsets failed");
                (vec![storage_error_code(&e); entries.len()], None)
            }
        };
    let build = move |codes: Vec<ErrorCode>| {
        let mut it = codes.into_iter();
        let topics = shape
            .into_iter()
            .map(|(name, parts)| PartitionErrors {
                name,
                partitions: parts.into_iter().map(|p| (p, it.next().unwrap_or(ErrorCode::Unknown))).collect(),
            })
            .collect();
        OffsetCommitResponse { topics }
    };
    let Some(pending) = pending else {
        let error = first_error(codes.iter().copied());
        return ctx.reply(&build(codes), error);
    };
    // Acknowledge only once the commit is fsynced. The wait counts from now: the reply below
    // is first polled only once the responses pipelined before it have been written.
    let timeout = Duration::from_millis(broker.config.groups.offsets_commit_timeout_ms);
    let deadline = tokio::time::Instant::now() + timeout;
    let (tx, rx) = oneshot::channel();
    broker.store.sync_async(
        pending.log,
        pending.offset,
        Box::new(move |r| {
            let _ = tx.send(r);
        }),
    );
    ctx.reply_later(async move {
        let outcome = tokio::time::timeout_at(deadline, rx).await;
        let failure = match outcome {
            Ok(Ok(Ok(()))) => None,
            Ok(Ok(Err(e))) => Some(storage_error_code(&e)),
            Ok(Err(_)) => Some(ErrorCode::StorageError),
            Err(_) => Some(ErrorCode::RequestTimedOut),
        };
        let codes: Vec<ErrorCode> = match failure {
            None => codes,
            Some(f) => codes.into_iter().map(|c| if c.is_ok() { f } else { c }).collect(),
        };
        let compactor = Arc::clone(&broker);
        let compacted = tokio::task::spawn_blocking(move || {
            compactor.groups.compact_offsets(compactor.config.groups.offsets_snapshot_bytes)
        })
        .await;
        if let Ok(Err(e)) = compacted {
            tracing::error!(error = %e, "compacting committed offsets failed");
        }
        let error = first_error(codes.iter().copied());
        (build(codes), error)
    })
}

pub(crate) fn offset_fetch(ctx: Ctx, req: OffsetFetchRequest) -> Reply {
    let entry = |partition: u32, committed: Option<OffsetAndMetadata>| {
        let (offset, metadata, ts) = committed.unwrap_or((-1, None, -1));
        OffsetFetchPartitionResponse { partition, error: ErrorCode::None, offset, metadata, commit_timestamp_ms: ts }
    };
    let groups = &ctx.broker.groups;
    let mut topics: Vec<OffsetFetchTopicResponse> = Vec::new();
    match req.topics {
        // Answered topic by topic, as asked, each partition once, where it first appears: an
        // answer carries the commit's metadata (up to 4 KiB), so answering every repeat would
        // let a 16 MiB request of one partition named four million times build gigabytes.
        Some(wanted) => {
            let mut seen_topics = HashSet::new();
            let mut seen = HashSet::new();
            for t in &wanted {
                let first = seen_topics.insert(t.name.as_str());
                let fresh: Vec<u32> =
                    t.partitions.iter().copied().filter(|&p| seen.insert((t.name.as_str(), p))).collect();
                if fresh.is_empty() && !first {
                    continue;
                }
                let found = groups.committed_of(&req.group_id, &t.name, &fresh);
                let partitions = fresh.iter().zip(found).map(|(&p, c)| entry(p, c)).collect();
                topics.push(OffsetFetchTopicResponse { name: t.name.clone(), partitions });
            }
        }
        None => {
            for (topic, partition, committed) in groups.committed(&req.group_id) {
                match topics.last_mut() {
                    Some(t) if t.name == topic => t.partitions.push(entry(partition, committed)),
                    _ => topics
                        .push(OffsetFetchTopicResponse { name: topic, partitions: vec![entry(partition, committed)] }),
                }
            }
        }
    }
    ctx.reply(&OffsetFetchResponse { topics }, None)
}
