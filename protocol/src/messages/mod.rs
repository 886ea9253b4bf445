//! Request and response bodies, one module per API. Each module's doc is its byte layout.

pub mod api_versions;
pub mod create_topics;
pub mod delete_topics;
pub mod fetch;
pub mod groups;
pub mod list_offsets;
pub mod metadata;
pub mod offsets;
pub mod produce;

use crate::error::DecodeError;
use crate::error_code::ErrorCode;
use crate::wire::{WireReader, WireWriter};

/// Reads an error code; unknown numbers (from a newer peer) become [`ErrorCode::Unknown`].
pub(crate) fn get_error(r: &mut WireReader) -> Result<ErrorCode, DecodeError> {
    Ok(ErrorCode::from_u16(r.u16()?).unwrap_or(ErrorCode::Unknown))
}

/// Writes an error code.
pub(crate) fn put_error(w: &mut WireWriter, e: ErrorCode) {
    w.u16(e.as_u16());
}

/// A `key = value` configuration entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigEntry {
    /// Config key, for example `retention_ms`.
    pub key: String,
    /// Value as text.
    pub value: String,
}

impl ConfigEntry {
    pub(crate) fn put(&self, w: &mut WireWriter) {
        w.string(&self.key);
        w.string(&self.value);
    }
    pub(crate) fn get(r: &mut WireReader) -> Result<Self, DecodeError> {
        Ok(ConfigEntry { key: r.string()?, value: r.string()? })
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use bytes::Bytes;

    use crate::api::{Decode, Encode};
    use crate::wire::{WireReader, WireWriter};

    /// Encodes, decodes, and checks equality and that every byte was consumed.
    pub(crate) fn round_trip<T: Encode + Decode + PartialEq + std::fmt::Debug>(v: &T) {
        let mut w = WireWriter::new();
        v.encode(&mut w);
        let frame: Bytes = w.finish_contiguous().slice(4..);
        let mut r = WireReader::new(frame.clone());
        let back = T::decode(&mut r).unwrap();
        r.finish().unwrap();
        assert_eq!(&back, v);
        // Every strict prefix must fail cleanly (no panic, no success).
        for cut in 0..frame.len() {
            let mut r = WireReader::new(frame.slice(..cut));
            let res = T::decode(&mut r).and_then(|_| r.finish());
            assert!(res.is_err(), "prefix of {cut} bytes decoded");
        }
    }
}
