//! # Cairn wire protocol
//!
//! A pure codec: bytes in, bytes out. Sockets live in `cairn-broker` and `cairn-client`.
//!
//! Every message travels in a frame:
//!
//! ```text
//! +----------------+------------------------------------------------------------+
//! | length: u32 BE | payload (length bytes, at most frame_bytes_max, 16 MiB)    |
//! +----------------+------------------------------------------------------------+
//!
//! request payload:  api_key u16 | api_version u16 | correlation_id u32 | client_id string | body
//! response payload: correlation_id u32 | error_code u16 | body (or message string on error)
//! ```
//!
//! Integers are big-endian. Requests on one connection may be pipelined; the broker answers in
//! request order, except that `Produce` with `acks = 0` gets no answer. Record data is Kafka's
//! RecordBatch v2, byte for byte ([`record_batch`]). `PROTOCOL.md` at the repository root
//! specifies every message.
//!
//! Decoding never panics, whatever the input, and never allocates more elements than the frame
//! could hold. An element in memory can take up to about twelve times its smallest encoding (an
//! empty string's 2 bytes become a 24-byte `String`), so a decoded request is bounded by about
//! twelve times its frame.

pub mod api;
pub mod codec;
pub mod error;
pub mod error_code;
pub mod io;
pub mod messages;
pub mod record;
pub mod record_batch;
pub mod wire;

pub use api::{
    decode_body, decode_request_header, decode_response, encode_error_response, encode_request, encode_response,
    ApiKey, Decode, Encode, HeaderError, Request, RequestHeader, ResponseError,
};
pub use codec::{FrameCodec, FrameError, FRAME_BYTES_MAX_DEFAULT};
pub use error::DecodeError;
pub use error_code::ErrorCode;
pub use messages::produce::Acks;
pub use record::{Header, Record};
pub use record_batch::{BatchError, BatchHeader, BatchPayload, RecordBatch, RecordBatchBuilder};
pub use wire::{WireReader, WireWriter};

use messages::{
    api_versions::ApiVersionsRequest,
    create_topics::CreateTopicsRequest,
    delete_topics::DeleteTopicsRequest,
    fetch::FetchRequest,
    groups::{DescribeGroupsRequest, HeartbeatRequest, JoinGroupRequest, LeaveGroupRequest, ListGroupsRequest},
    list_offsets::ListOffsetsRequest,
    metadata::MetadataRequest,
    offsets::{OffsetCommitRequest, OffsetFetchRequest},
    produce::ProduceRequest,
};

/// Any decoded request body.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum AnyRequest {
    ApiVersions(ApiVersionsRequest),
    Metadata(MetadataRequest),
    CreateTopics(CreateTopicsRequest),
    DeleteTopics(DeleteTopicsRequest),
    Produce(ProduceRequest),
    Fetch(FetchRequest),
    ListOffsets(ListOffsetsRequest),
    OffsetCommit(OffsetCommitRequest),
    OffsetFetch(OffsetFetchRequest),
    JoinGroup(JoinGroupRequest),
    Heartbeat(HeartbeatRequest),
    LeaveGroup(LeaveGroupRequest),
    ListGroups(ListGroupsRequest),
    DescribeGroups(DescribeGroupsRequest),
}

impl AnyRequest {
    /// Decodes the body of a request whose header was already read.
    ///
    /// # Errors
    /// [`DecodeError::UnknownApiKey`], [`DecodeError::UnsupportedVersion`], or any body error.
    pub fn decode(header: &RequestHeader, body: WireReader) -> Result<AnyRequest, DecodeError> {
        let key = ApiKey::from_u16(header.api_key).ok_or(DecodeError::UnknownApiKey(header.api_key))?;
        // ApiVersions has one layout in every version, so any client can negotiate with it.
        if key != ApiKey::ApiVersions {
            key.check_version(header.api_version)?;
        }
        Ok(match key {
            ApiKey::ApiVersions => AnyRequest::ApiVersions(decode_body(body)?),
            ApiKey::Metadata => AnyRequest::Metadata(decode_body(body)?),
            ApiKey::CreateTopics => AnyRequest::CreateTopics(decode_body(body)?),
            ApiKey::DeleteTopics => AnyRequest::DeleteTopics(decode_body(body)?),
            ApiKey::Produce => AnyRequest::Produce(decode_body(body)?),
            ApiKey::Fetch => AnyRequest::Fetch(decode_body(body)?),
            ApiKey::ListOffsets => AnyRequest::ListOffsets(decode_body(body)?),
            ApiKey::OffsetCommit => AnyRequest::OffsetCommit(decode_body(body)?),
            ApiKey::OffsetFetch => AnyRequest::OffsetFetch(decode_body(body)?),
            ApiKey::JoinGroup => AnyRequest::JoinGroup(decode_body(body)?),
            ApiKey::Heartbeat => AnyRequest::Heartbeat(decode_body(body)?),
            ApiKey::LeaveGroup => AnyRequest::LeaveGroup(decode_body(body)?),
            ApiKey::ListGroups => AnyRequest::ListGroups(decode_body(body)?),
            ApiKey::DescribeGroups => AnyRequest::DescribeGroups(decode_body(body)?),
        })
    }

    /// The API of this request.
    pub fn api_key(&self) -> ApiKey {
        match self {
            AnyRequest::ApiVersions(_) => ApiKey::ApiVersions,
            AnyRequest::Metadata(_) => ApiKey::Metadata,
            AnyRequest::CreateTopics(_) => ApiKey::CreateTopics,
            AnyRequest::DeleteTopics(_) => ApiKey::DeleteTopics,
            AnyRequest::Produce(_) => ApiKey::Produce,
            AnyRequest::Fetch(_) => ApiKey::Fetch,
            AnyRequest::ListOffsets(_) => ApiKey::ListOffsets,
            AnyRequest::OffsetCommit(_) => ApiKey::OffsetCommit,
            AnyRequest::OffsetFetch(_) => ApiKey::OffsetFetch,
            AnyRequest::JoinGroup(_) => ApiKey::JoinGroup,
            AnyRequest::Heartbeat(_) => ApiKey::Heartbeat,
            AnyRequest::LeaveGroup(_) => ApiKey::LeaveGroup,
            AnyRequest::ListGroups(_) => ApiKey::ListGroups,
            AnyRequest::DescribeGroups(_) => ApiKey::DescribeGroups,
        }
    }
}

/// Decodes a whole request frame payload: header, then body. Used by the broker and fuzz targets.
///
/// # Errors
/// [`HeaderError`] when the header is unreadable, or the correlation id with the body's error.
pub fn decode_request(frame: bytes::Bytes) -> Result<(RequestHeader, AnyRequest), HeaderError> {
    let (header, body) = decode_request_header(frame)?;
    match AnyRequest::decode(&header, body) {
        Ok(req) => Ok((header, req)),
        Err(error) => Err(HeaderError::Invalid { correlation_id: header.correlation_id, error }),
    }
}
