//! Persisted topic metadata: `topics.json`, replaced atomically on every change.
//!
//! ```json
//! { "format": "cairn-topics", "version": 1,
//!   "topics": [ { "name": "events", "partitions": 3, "config": { ...TopicConfig... } } ] }
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::config::TopicConfig;
use super::error::{Result, StorageError};
use super::segment::write_atomic;
use super::Topic;

const FILE: &str = "topics.json";
const FORMAT: &str = "cairn-topics";

/// One topic's persisted metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TopicMeta {
    pub(crate) name: String,
    pub(crate) partitions: u32,
    pub(crate) config: TopicConfig,
}

impl TopicMeta {
    pub(crate) fn of(t: &Topic) -> TopicMeta {
        TopicMeta { name: t.name.clone(), partitions: t.partitions.len() as u32, config: t.config.clone() }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TopicsFile {
    format: String,
    version: u32,
    topics: Vec<TopicMeta>,
}

/// Checks a topic name: 1-249 characters from `[A-Za-z0-9._-]`, not `.` or `..`.
///
/// # Errors
/// [`StorageError::InvalidTopicName`].
pub(crate) fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(StorageError::InvalidTopicName(name.to_owned()))
    }
}

/// Loads the topic list (empty when the file does not exist yet).
pub(crate) fn load(dir: &Path) -> Result<Vec<TopicMeta>> {
    let path = dir.join(FILE);
    let raw = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StorageError::io("read", &path, e)),
    };
    let file: TopicsFile =
        serde_json::from_slice(&raw).map_err(|e| StorageError::InvalidConfig(format!("{}: {e}", path.display())))?;
    if file.format != FORMAT || file.version != 1 {
        return Err(StorageError::InvalidConfig(format!(
            "{}: unsupported format {:?} version {}",
            path.display(),
            file.format,
            file.version
        )));
    }
    Ok(file.topics)
}

/// Replaces the topic list atomically.
pub(crate) fn save(dir: &Path, topics: &[TopicMeta]) -> Result<()> {
    let file = TopicsFile { format: FORMAT.into(), version: 1, topics: topics.to_vec() };
    let raw = serde_json::to_vec_pretty(&file).map_err(|e| StorageError::InvalidConfig(e.to_string()))?;
    write_atomic(&dir.join(FILE), &raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_follow_the_rules() {
        for ok in ["a", "events.v1", "A_b-9", &"x".repeat(249)] {
            validate_name(ok).unwrap();
        }
        for bad in ["", ".", "..", "a/b", "sp ace", "ü", &"x".repeat(250)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }
}
