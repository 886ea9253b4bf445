//! ListOffsets: earliest, latest, or the first offset at or after a timestamp.

use cairn_protocol::messages::list_offsets::{
    ListOffsetsPartitionResponse, ListOffsetsRequest, ListOffsetsResponse, ListOffsetsTopicResponse,
    EARLIEST_TIMESTAMP, LATEST_TIMESTAMP,
};
use cairn_protocol::ErrorCode;

use super::{first_error, storage_error_code, Ctx, Reply};

pub(crate) fn list_offsets(ctx: Ctx, req: ListOffsetsRequest) -> Reply {
    let store = &ctx.broker.store;
    let mut topics = Vec::with_capacity(req.topics.len());
    for t in &req.topics {
        let topic = store.topic(&t.name);
        let partitions = t
            .partitions
            .iter()
            .map(|p| {
                let answer = |error, timestamp, offset| ListOffsetsPartitionResponse {
                    partition: p.partition,
                    error,
                    timestamp,
                    offset,
                };
                let Some(log) = topic.as_ref().and_then(|topic| topic.partitions.get(p.partition as usize)) else {
                    return answer(ErrorCode::UnknownTopicOrPartition, -1, -1);
                };
                match p.timestamp {
                    LATEST_TIMESTAMP => answer(ErrorCode::None, -1, log.log_end_offset() as i64),
                    EARLIEST_TIMESTAMP => answer(ErrorCode::None, -1, log.log_start_offset() as i64),
                    ts if ts < 0 => answer(ErrorCode::InvalidRequest, -1, -1),
                    ts => match log.offset_for_timestamp(ts) {
                        Ok(Some((offset, found))) => answer(ErrorCode::None, found, offset as i64),
                        Ok(None) => answer(ErrorCode::None, -1, log.log_end_offset() as i64),
                        Err(e) => answer(storage_error_code(&e), -1, -1),
                    },
                }
            })
            .collect();
        topics.push(ListOffsetsTopicResponse { name: t.name.clone(), partitions });
    }
    let response = ListOffsetsResponse { topics };
    let error = first_error(response.topics.iter().flat_map(|t| t.partitions.iter().map(|p| p.error)));
    ctx.reply(&response, error)
}
