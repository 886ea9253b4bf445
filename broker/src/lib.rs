//! The Cairn broker: a memory-mapped, segmented commit log per topic-partition behind a
//! length-framed TCP protocol, with Prometheus metrics.
//!
//! - [`storage`]: the synchronous storage engine (segments, indexes, recovery, retention).

pub mod storage;
