//! ApiVersions (key 0): which APIs and versions each side supports.
//!
//! Its layout never changes across versions, so a client can always ask it first.
//!
//! ```text
//! request:  (empty)
//! response: apis array<{ api_key u16, min_version u16, max_version u16 }>
//!           broker_version string
//! ```

use crate::api::{ApiKey, Decode, Encode, Request};
use crate::error::DecodeError;
use crate::wire::{WireReader, WireWriter};

/// ApiVersions request (no fields).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApiVersionsRequest;

/// One supported API range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiVersionRange {
    /// Raw API key.
    pub api_key: u16,
    /// Lowest supported version.
    pub min_version: u16,
    /// Highest supported version.
    pub max_version: u16,
}

/// ApiVersions response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiVersionsResponse {
    /// Supported APIs.
    pub apis: Vec<ApiVersionRange>,
    /// The broker's version string.
    pub broker_version: String,
}

impl ApiVersionsResponse {
    /// The ranges this build supports, for every API.
    pub fn supported(broker_version: &str) -> Self {
        let apis = ApiKey::ALL
            .iter()
            .map(|k| {
                let (min_version, max_version) = k.supported_versions();
                ApiVersionRange { api_key: *k as u16, min_version, max_version }
            })
            .collect();
        ApiVersionsResponse { apis, broker_version: broker_version.to_owned() }
    }

    /// The peer's range for an API, if it supports it.
    pub fn range(&self, key: ApiKey) -> Option<ApiVersionRange> {
        self.apis.iter().copied().find(|a| a.api_key == key as u16)
    }
}

impl Encode for ApiVersionsRequest {
    fn encode(&self, _w: &mut WireWriter) {}
}
impl Decode for ApiVersionsRequest {
    fn decode(_r: &mut WireReader) -> Result<Self, DecodeError> {
        Ok(ApiVersionsRequest)
    }
}
impl Request for ApiVersionsRequest {
    const API_KEY: ApiKey = ApiKey::ApiVersions;
    type Response = ApiVersionsResponse;
}

impl Encode for ApiVersionsResponse {
    fn encode(&self, w: &mut WireWriter) {
        w.count(self.apis.len());
        for a in &self.apis {
            w.u16(a.api_key);
            w.u16(a.min_version);
            w.u16(a.max_version);
        }
        w.string(&self.broker_version);
    }
}
impl Decode for ApiVersionsResponse {
    fn decode(r: &mut WireReader) -> Result<Self, DecodeError> {
        let apis =
            r.array(6, |r| Ok(ApiVersionRange { api_key: r.u16()?, min_version: r.u16()?, max_version: r.u16()? }))?;
        Ok(ApiVersionsResponse { apis, broker_version: r.string()? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::test_support::round_trip;

    #[test]
    fn api_versions_round_trips() {
        round_trip(&ApiVersionsResponse::supported("0.1.0"));
    }
}
