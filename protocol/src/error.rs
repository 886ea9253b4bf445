//! Decoding errors of the wire layer.

use crate::record_batch::BatchError;

/// Why a frame or message could not be decoded.
///
/// Every variant says where decoding stopped so that an operator reading a log line can tell a
/// truncated frame from a lying length prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message ended before a field did.
    #[error("unexpected end of frame at byte {offset}: need {need}, have {have}")]
    UnexpectedEnd {
        /// Byte position in the message where the field starts.
        offset: usize,
        /// Bytes the field needs.
        need: usize,
        /// Bytes left in the message.
        have: usize,
    },
    /// A string field holds bytes that are not UTF-8.
    #[error("string at byte {offset} is not valid UTF-8")]
    InvalidUtf8 {
        /// Byte position of the string's first byte.
        offset: usize,
    },
    /// A field holds a value outside its documented range.
    #[error("invalid value for {field}: {value}")]
    InvalidValue {
        /// Which field.
        field: &'static str,
        /// The value found, rendered for humans.
        value: i64,
    },
    /// The message has bytes left after its last field.
    #[error("{extra} unexpected trailing bytes after the message")]
    TrailingBytes {
        /// How many bytes were left over.
        extra: usize,
    },
    /// The API key in a request header is not one we know.
    #[error("unknown api key {0}")]
    UnknownApiKey(u16),
    /// The API version is outside the range this side supports.
    #[error("api {api} version {version} is not supported (supported: {min}..={max})")]
    UnsupportedVersion {
        /// The API's name.
        api: &'static str,
        /// Version asked for.
        version: u16,
        /// Lowest supported version.
        min: u16,
        /// Highest supported version.
        max: u16,
    },
    /// A record batch inside the message is malformed.
    #[error("record batch: {0}")]
    Batch(#[from] BatchError),
}
