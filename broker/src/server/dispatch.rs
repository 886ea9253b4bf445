//! Decodes a request frame and routes it to its handler.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use cairn_protocol::api::encode_error_response;
use cairn_protocol::messages::api_versions::ApiVersionsResponse;
use cairn_protocol::{decode_request, encode_response, Acks, AnyRequest, DecodeError, ErrorCode, HeaderError};

use super::Broker;
use crate::handlers;

/// What the connection should do with a request.
pub(crate) enum Reply {
    /// Send this response now (in order).
    Now(Vec<Bytes>),
    /// Send the response when this future delivers it (still in order); `None` if the handler
    /// failed without answering. The connection's writer polls it in place, so the wake-up
    /// that completes it (a produce for a parked fetch, a sync for acks = all) goes straight
    /// to the task that writes the response.
    Later(LaterReply),
    /// Carry out this work before reading the next request of the connection, then send what
    /// it answers (in order; `None`: close). For requests whose effects later requests may
    /// depend on and that run off the runtime (topic creation and deletion): pipelined behind
    /// them, a produce must find the topic created, a second deletion the topic gone.
    InOrder(LaterReply),
    /// No response (produce with acks = none).
    Nothing,
    /// Close the connection (the frame could not even be attributed).
    Close,
    /// The request names topics that `auto_create_topics` creates. Creating one syncs files and
    /// waits for other topic administration, so it must not run on a runtime worker: the
    /// connection creates them on the blocking pool, reading nothing else meanwhile (requests
    /// keep their order), then dispatches the request again with `may_create` off.
    CreateTopics(Vec<String>),
}

/// A response that a handler delivers later.
pub(crate) type LaterReply = Pin<Box<dyn Future<Output = Option<Vec<Bytes>>> + Send>>;

/// Decodes and serves one request frame. `received` is when the connection read it: a request
/// dispatched again after creating topics counts its duration from there.
pub(crate) fn dispatch(
    broker: &Arc<Broker>,
    frame: Bytes,
    peer: SocketAddr,
    may_create: bool,
    received: Instant,
) -> Reply {
    let started = received;
    let (header, request) = match decode_request(frame) {
        Ok(r) => r,
        Err(HeaderError::Unreadable(e)) => {
            tracing::warn!(%peer, error = %e, "closing connection: request header unreadable");
            return Reply::Close;
        }
        Err(HeaderError::Invalid { correlation_id, error }) => {
            let code = match error {
                DecodeError::UnknownApiKey(_) | DecodeError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
                _ => ErrorCode::InvalidRequest,
            };
            tracing::info!(%peer, correlation_id, error = %error, "rejecting request");
            metrics::counter!("cairn_requests_total", "api" => "unknown", "result" => code.name()).increment(1);
            return Reply::Now(encode_error_response(correlation_id, code, &error.to_string()));
        }
    };
    let corr = header.correlation_id;
    let api = request.api_key();
    if broker.shutdown.is_cancelled() {
        broker.requests.record(api, Some(ErrorCode::ShuttingDown.name()), started.elapsed());
        // Not even a refusal for a Produce with acks = 0: it expects no answer at all.
        if matches!(&request, AnyRequest::Produce(r) if r.acks == Acks::None) {
            return Reply::Nothing;
        }
        return Reply::Now(encode_error_response(corr, ErrorCode::ShuttingDown, "the broker is shutting down"));
    }
    let ctx = handlers::Ctx { broker: Arc::clone(broker), corr, started, api, client_id: header.client_id, may_create };
    match request {
        AnyRequest::ApiVersions(_) => {
            ctx.done(None);
            Reply::Now(encode_response(corr, &ApiVersionsResponse::supported(env!("CARGO_PKG_VERSION"))))
        }
        AnyRequest::Metadata(r) => handlers::topics::metadata(ctx, r),
        AnyRequest::CreateTopics(r) => handlers::topics::create_topics(ctx, r),
        AnyRequest::DeleteTopics(r) => handlers::topics::delete_topics(ctx, r),
        AnyRequest::Produce(r) => handlers::produce::produce(ctx, r),
        AnyRequest::Fetch(r) => handlers::fetch::fetch(ctx, r),
        AnyRequest::ListOffsets(r) => handlers::list_offsets::list_offsets(ctx, r),
        AnyRequest::OffsetCommit(r) => handlers::groups::offset_commit(ctx, r),
        AnyRequest::OffsetFetch(r) => handlers::groups::offset_fetch(ctx, r),
        AnyRequest::JoinGroup(r) => handlers::groups::join_group(ctx, r),
        AnyRequest::Heartbeat(r) => handlers::groups::heartbeat(ctx, r),
        AnyRequest::LeaveGroup(r) => handlers::groups::leave_group(ctx, r),
        AnyRequest::ListGroups(_) => handlers::groups::list_groups(ctx),
        AnyRequest::DescribeGroups(r) => handlers::groups::describe_groups(ctx, r),
    }
}

#[cfg(test)]
mod tests {
    use cairn_protocol::api::encode_request;
    use cairn_protocol::messages::metadata::MetadataRequest;

    use super::*;
    use crate::config::BrokerConfig;
    use crate::groups::Coordinator;
    use crate::metrics::Health;
    use crate::storage::{system_clock, LogStore};

    /// A broker on `dir`, not serving, and the frame of a Metadata request naming `topic`.
    fn broker_and_metadata_frame(dir: &std::path::Path, auto_create_topics: bool, topic: &str) -> (Arc<Broker>, Bytes) {
        let config = BrokerConfig { data_dir: dir.to_owned(), auto_create_topics, ..BrokerConfig::default() };
        let (store, _) = LogStore::open(dir, config.storage.clone(), system_clock()).unwrap();
        let groups = Coordinator::open(&store, config.groups.clone()).unwrap();
        let health = Arc::new(Health { ready: true.into(), shutdown: Default::default() });
        let broker = Arc::new(Broker::new(config, store, groups, health));
        let chunks = encode_request(1, "test", &MetadataRequest { topics: Some(vec![topic.into()]) });
        (broker, Bytes::from(chunks.concat()).slice(4..))
    }

    /// PROTOCOL 6.5: a Produce with `acks = 0` gets no response, for success or failure. One
    /// that arrived as shutdown began got `SHUTTING_DOWN`, and a client matching responses by
    /// position would have taken it for the answer to a later request.
    #[test]
    fn an_acks_0_produce_gets_no_answer_while_the_broker_shuts_down() {
        use cairn_protocol::messages::produce::{ProducePartition, ProduceRequest, ProduceTopic};
        let dir = tempfile::tempdir().unwrap();
        let (broker, _) = broker_and_metadata_frame(dir.path(), false, "t");
        broker.shutdown.cancel();
        let produce = |acks| {
            let mut b = cairn_protocol::RecordBatchBuilder::new();
            b.push(1, None, Some(b"v"), &[]);
            let partitions = vec![ProducePartition { partition: 0, records: b.build().into() }];
            let request =
                ProduceRequest { acks, timeout_ms: 1000, topics: vec![ProduceTopic { name: "t".into(), partitions }] };
            Bytes::from(encode_request(2, "test", &request).concat()).slice(4..)
        };
        let peer = "127.0.0.1:1".parse().unwrap();
        assert!(matches!(dispatch(&broker, produce(Acks::None), peer, false, Instant::now()), Reply::Nothing));
        assert!(matches!(dispatch(&broker, produce(Acks::Leader), peer, false, Instant::now()), Reply::Now(_)));
    }

    /// A request served after its connection created topics for it counts the creation in its
    /// duration: the clock starts when the request was read, not when it is dispatched again.
    #[test]
    fn a_request_dispatched_again_counts_its_duration_from_when_it_was_read() {
        let dir = tempfile::tempdir().unwrap();
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let (broker, frame) = broker_and_metadata_frame(dir.path(), false, "made");
            let read_at = Instant::now() - std::time::Duration::from_millis(500); // then the creation
            let reply = dispatch(&broker, frame, "127.0.0.1:1".parse().unwrap(), false, read_at);
            assert!(matches!(reply, Reply::Now(_)));
        });
        let text = handle.render();
        let sum: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix(r#"cairn_request_duration_seconds_sum{api="metadata"} "#))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metadata duration in {text}"));
        assert!(sum >= 0.5, "the request's duration left out the 500 ms before it was dispatched: {sum}");
    }

    /// Creating a topic syncs files and waits for other topic administration (a large topic
    /// being created holds the lock for seconds): a request naming a topic to auto-create must
    /// hand the creation to its connection, not do it on the runtime worker dispatching it.
    #[test]
    fn a_request_naming_a_topic_to_auto_create_does_not_create_it_on_the_dispatching_thread() {
        let dir = tempfile::tempdir().unwrap();
        let (broker, frame) = broker_and_metadata_frame(dir.path(), true, "fresh");
        let admin = broker.store.hold_admin(); // another client's creation under way
        let (tx, rx) = std::sync::mpsc::channel();
        let dispatcher = Arc::clone(&broker);
        let again = frame.clone();
        std::thread::spawn(move || {
            let reply = dispatch(&dispatcher, frame, "127.0.0.1:1".parse().unwrap(), true, Instant::now());
            let _ = tx.send(matches!(reply, Reply::CreateTopics(ref names) if names == &["fresh".to_string()]));
        });
        let handed_over = rx.recv_timeout(std::time::Duration::from_secs(10));
        drop(admin);
        assert_eq!(handed_over, Ok(true), "dispatch waited for the admin lock or created the topic itself");
        assert!(broker.store.topic("fresh").is_none());
        // Once the connection has tried, the request is served as it stands.
        let reply = dispatch(&broker, again, "127.0.0.1:1".parse().unwrap(), false, Instant::now());
        assert!(matches!(reply, Reply::Now(_)));
    }
}
