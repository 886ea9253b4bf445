//! API keys, supported version ranges, and request/response framing.
//!
//! ```text
//! request payload:  api_key u16 | api_version u16 | correlation_id u32 | client_id string | body
//! response payload: correlation_id u32 | error_code u16 | (error_code == 0) body
//!                                                       | (error_code != 0) message string
//! ```
//!
//! The response-level error code reports failures that prevent a typed body from being produced
//! (unsupported API or version, undecodable request, broker shutting down). Errors about one topic
//! or partition are reported inside the body, per item.

use bytes::Bytes;

use crate::error::DecodeError;
use crate::error_code::ErrorCode;
use crate::wire::{WireReader, WireWriter};

/// Every API Cairn speaks. Numbers are stable and never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ApiKey {
    /// Which APIs and versions the broker supports.
    ApiVersions = 0,
    /// Topics, partitions and their offsets.
    Metadata = 1,
    /// Create topics.
    CreateTopics = 2,
    /// Delete topics.
    DeleteTopics = 3,
    /// Append record batches.
    Produce = 4,
    /// Read record batches, with long polling.
    Fetch = 5,
    /// Earliest, latest or by-timestamp offsets.
    ListOffsets = 6,
    /// Store committed offsets for a group.
    OffsetCommit = 7,
    /// Read committed offsets of a group.
    OffsetFetch = 8,
    /// Join a consumer group and receive an assignment.
    JoinGroup = 9,
    /// Keep a group membership alive.
    Heartbeat = 10,
    /// Leave a consumer group.
    LeaveGroup = 11,
    /// List consumer groups.
    ListGroups = 12,
    /// Describe consumer groups: members, assignments, committed offsets and lag.
    DescribeGroups = 13,
}

impl ApiKey {
    /// Every API, in numeric order.
    pub const ALL: [ApiKey; 14] = [
        ApiKey::ApiVersions,
        ApiKey::Metadata,
        ApiKey::CreateTopics,
        ApiKey::DeleteTopics,
        ApiKey::Produce,
        ApiKey::Fetch,
        ApiKey::ListOffsets,
        ApiKey::OffsetCommit,
        ApiKey::OffsetFetch,
        ApiKey::JoinGroup,
        ApiKey::Heartbeat,
        ApiKey::LeaveGroup,
        ApiKey::ListGroups,
        ApiKey::DescribeGroups,
    ];

    /// The API for a number, if known.
    pub fn from_u16(v: u16) -> Option<ApiKey> {
        Self::ALL.get(usize::from(v)).copied()
    }

    /// Lower-case name used in metrics labels and logs.
    pub fn name(self) -> &'static str {
        match self {
            ApiKey::ApiVersions => "api_versions",
            ApiKey::Metadata => "metadata",
            ApiKey::CreateTopics => "create_topics",
            ApiKey::DeleteTopics => "delete_topics",
            ApiKey::Produce => "produce",
            ApiKey::Fetch => "fetch",
            ApiKey::ListOffsets => "list_offsets",
            ApiKey::OffsetCommit => "offset_commit",
            ApiKey::OffsetFetch => "offset_fetch",
            ApiKey::JoinGroup => "join_group",
            ApiKey::Heartbeat => "heartbeat",
            ApiKey::LeaveGroup => "leave_group",
            ApiKey::ListGroups => "list_groups",
            ApiKey::DescribeGroups => "describe_groups",
        }
    }

    /// The versions of this API that this build supports (inclusive).
    pub fn supported_versions(self) -> (u16, u16) {
        (0, 0)
    }

    /// Checks a requested version against [`ApiKey::supported_versions`].
    ///
    /// # Errors
    /// [`DecodeError::UnsupportedVersion`] when outside the range.
    pub fn check_version(self, version: u16) -> Result<(), DecodeError> {
        let (min, max) = self.supported_versions();
        if version < min || version > max {
            return Err(DecodeError::UnsupportedVersion { api: self.name(), version, min, max });
        }
        Ok(())
    }
}

/// A message body that can be written to the wire.
pub trait Encode {
    /// Appends the body's fields.
    fn encode(&self, w: &mut WireWriter);
}

/// A message body that can be read from the wire.
pub trait Decode: Sized {
    /// Reads the body's fields. Never panics and never allocates beyond what the bytes can hold.
    ///
    /// # Errors
    /// [`DecodeError`] for any malformed input.
    fn decode(r: &mut WireReader) -> Result<Self, DecodeError>;
}

/// A request type, tied to its API key and response type.
pub trait Request: Encode + Decode {
    /// The API this request belongs to.
    const API_KEY: ApiKey;
    /// The matching response body.
    type Response: Encode + Decode;
}

/// The fixed part of every request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHeader {
    /// Raw API key (may be unknown to this build).
    pub api_key: u16,
    /// Requested API version.
    pub api_version: u16,
    /// Echoed back in the response so that pipelined responses can be matched.
    pub correlation_id: u32,
    /// Free-form client name for logs.
    pub client_id: String,
}

/// Why a request frame could not even be attributed to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// Not even the correlation id is readable: the connection should be closed.
    Unreadable(DecodeError),
    /// The correlation id is known, but the rest of the header is bad.
    Invalid {
        /// The correlation id to answer with.
        correlation_id: u32,
        /// What is wrong.
        error: DecodeError,
    },
}

/// Reads the request header from a frame payload and returns a reader positioned at the body.
///
/// # Errors
/// [`HeaderError`] saying whether the correlation id could be read.
pub fn decode_request_header(frame: Bytes) -> Result<(RequestHeader, WireReader), HeaderError> {
    let mut r = WireReader::new(frame);
    let fixed = (|| Ok::<_, DecodeError>((r.u16()?, r.u16()?, r.u32()?)))();
    let (api_key, api_version, correlation_id) = fixed.map_err(HeaderError::Unreadable)?;
    let client_id = r.string().map_err(|error| HeaderError::Invalid { correlation_id, error })?;
    Ok((RequestHeader { api_key, api_version, correlation_id, client_id }, r))
}

/// Encodes a whole request frame (length prefix included) as chunks.
pub fn encode_request<R: Request>(correlation_id: u32, client_id: &str, request: &R) -> Vec<Bytes> {
    let mut w = WireWriter::with_capacity(128);
    w.u16(R::API_KEY as u16);
    w.u16(R::API_KEY.supported_versions().1);
    w.u32(correlation_id);
    w.string(client_id);
    request.encode(&mut w);
    w.finish()
}

/// Decodes a request body and checks that nothing is left over.
///
/// # Errors
/// [`DecodeError`] for malformed bodies.
pub fn decode_body<T: Decode>(mut r: WireReader) -> Result<T, DecodeError> {
    let body = T::decode(&mut r)?;
    r.finish()?;
    Ok(body)
}

/// Encodes a successful response frame as chunks.
pub fn encode_response<B: Encode>(correlation_id: u32, body: &B) -> Vec<Bytes> {
    let mut w = WireWriter::with_capacity(128);
    w.u32(correlation_id);
    w.u16(ErrorCode::None.as_u16());
    body.encode(&mut w);
    w.finish()
}

/// Encodes a response frame that carries only an error code and message.
pub fn encode_error_response(correlation_id: u32, code: ErrorCode, message: &str) -> Vec<Bytes> {
    let mut w = WireWriter::with_capacity(64 + message.len());
    w.u32(correlation_id);
    w.u16(code.as_u16());
    w.string(crate::wire::cut_message(message));
    w.finish()
}

/// A response-level error: the request failed as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ResponseError {
    /// The code. Unknown numbers from a newer broker map to [`ErrorCode::Unknown`].
    pub code: ErrorCode,
    /// The broker's message.
    pub message: String,
}

/// Reads the correlation id of a response frame payload.
///
/// # Errors
/// [`DecodeError`] when the payload is shorter than four bytes.
pub fn response_correlation_id(frame: &Bytes) -> Result<u32, DecodeError> {
    WireReader::new(frame.clone()).u32()
}

/// Decodes a response frame payload: the correlation id, then either the body or the error.
///
/// # Errors
/// [`DecodeError`] when the frame is malformed.
#[allow(clippy::type_complexity)]
pub fn decode_response<B: Decode>(frame: Bytes) -> Result<(u32, Result<B, ResponseError>), DecodeError> {
    let mut r = WireReader::new(frame);
    let correlation_id = r.u32()?;
    let code = r.u16()?;
    if code != 0 {
        let message = r.string()?;
        let code = ErrorCode::from_u16(code).unwrap_or(ErrorCode::Unknown);
        return Ok((correlation_id, Err(ResponseError { code, message })));
    }
    let body = B::decode(&mut r)?;
    r.finish()?;
    Ok((correlation_id, Ok(body)))
}
