//! Metadata, CreateTopics and DeleteTopics.

use cairn_protocol::messages::create_topics::{CreateTopicsRequest, CreateTopicsResponse, TopicResult};
use cairn_protocol::messages::delete_topics::{DeleteTopicsRequest, DeleteTopicsResponse};
use cairn_protocol::messages::metadata::{MetadataRequest, MetadataResponse, PartitionMetadata, TopicMetadata};
use cairn_protocol::messages::ConfigEntry;
use cairn_protocol::ErrorCode;

use super::produce::topics_to_create;
use super::{distinct, first_error, storage_error_code, Ctx, Reply};
use crate::storage::Topic;

fn describe(t: &Topic) -> TopicMetadata {
    TopicMetadata {
        error: ErrorCode::None,
        name: t.name.clone(),
        internal: t.internal,
        configs: t.config.entries().into_iter().map(|(key, value)| ConfigEntry { key, value }).collect(),
        partitions: t
            .partitions
            .iter()
            .map(|p| PartitionMetadata {
                partition: p.partition(),
                error: ErrorCode::None,
                log_start_offset: p.log_start_offset() as i64,
                log_end_offset: p.log_end_offset() as i64,
            })
            .collect(),
    }
}

pub(crate) fn metadata(ctx: Ctx, req: MetadataRequest) -> Reply {
    if let Some(names) = &req.topics {
        let missing = topics_to_create(&ctx, names.iter().map(String::as_str));
        if !missing.is_empty() {
            return Reply::CreateTopics(missing);
        }
    }
    let topics = match &req.topics {
        None => ctx.broker.store.topics().iter().map(|t| describe(t)).collect(),
        Some(names) => distinct(names.iter().map(String::as_str))
            .map(|name| match ctx.broker.store.topic(name) {
                Some(t) => describe(&t),
                None => TopicMetadata {
                    error: ErrorCode::UnknownTopicOrPartition,
                    name: name.to_owned(),
                    internal: false,
                    configs: Vec::new(),
                    partitions: Vec::new(),
                },
            })
            .collect(),
    };
    let response = MetadataResponse { topics };
    let error = first_error(response.topics.iter().map(|t| t.error));
    ctx.reply(&response, error)
}

pub(crate) fn create_topics(ctx: Ctx, req: CreateTopicsRequest) -> Reply {
    ctx.reply_blocking(move |broker| {
        let topics: Vec<TopicResult> = req
            .topics
            .iter()
            .map(|t| {
                let fail = |error: ErrorCode, message: String| TopicResult {
                    name: t.name.clone(),
                    error,
                    message: Some(message),
                };
                if t.partitions == 0 || t.partitions > broker.config.partitions_max {
                    return fail(
                        ErrorCode::InvalidPartitions,
                        format!("partitions must be 1..={}, got {}", broker.config.partitions_max, t.partitions),
                    );
                }
                if t.name.starts_with("__") {
                    return fail(
                        ErrorCode::InvalidTopicName,
                        "names starting with __ are reserved for internal topics".into(),
                    );
                }
                let mut config = broker.store.config().topic_defaults();
                for c in &t.configs {
                    if let Err(e) = config.set(&c.key, &c.value) {
                        return fail(ErrorCode::InvalidConfig, e.to_string());
                    }
                }
                match broker.store.create_topic(&t.name, t.partitions, config) {
                    Ok(_) => {
                        tracing::info!(topic = %t.name, partitions = t.partitions, "created topic");
                        broker.groups.topic_changed(&t.name);
                        TopicResult { name: t.name.clone(), error: ErrorCode::None, message: None }
                    }
                    Err(e) => fail(storage_error_code(&e), e.to_string()),
                }
            })
            .collect();
        let error = first_error(topics.iter().map(|t| t.error));
        (CreateTopicsResponse { topics }, error)
    })
}

pub(crate) fn delete_topics(ctx: Ctx, req: DeleteTopicsRequest) -> Reply {
    ctx.reply_blocking(move |broker| {
        let topics: Vec<TopicResult> = req
            .topics
            .iter()
            .map(|name| {
                if name.starts_with("__") {
                    return TopicResult {
                        name: name.clone(),
                        error: ErrorCode::InvalidTopicName,
                        message: Some("internal topics cannot be deleted".into()),
                    };
                }
                match broker.store.delete_topic(name) {
                    Ok(()) => {
                        tracing::info!(topic = %name, "deleted topic");
                        broker.notify_deleted(name);
                        broker.groups.forget_topic(name);
                        broker.groups.topic_changed(name);
                        TopicResult { name: name.clone(), error: ErrorCode::None, message: None }
                    }
                    Err(e) => {
                        TopicResult { name: name.clone(), error: storage_error_code(&e), message: Some(e.to_string()) }
                    }
                }
            })
            .collect();
        let error = first_error(topics.iter().map(|t| t.error));
        (DeleteTopicsResponse { topics }, error)
    })
}
