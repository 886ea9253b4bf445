//! Storage settings: broker-wide defaults and per-topic overrides.

use std::num::NonZeroU64;

use serde::{Deserialize, Serialize};

use super::error::{Result, StorageError};

/// Largest allowed segment: index positions are `u32`.
pub const SEGMENT_BYTES_MAX: u64 = 2 * 1024 * 1024 * 1024 - 1;

/// Per-topic log settings. Every field has a broker-wide default in [`StorageConfig`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    /// Roll the active segment when it would exceed this many bytes. Default 1 GiB.
    pub segment_bytes: u64,
    /// Roll the active segment when it is older than this. Default 7 days.
    pub segment_ms: u64,
    /// Delete sealed segments whose newest record is older than this; `None` keeps forever.
    /// Default 7 days.
    pub retention_ms: Option<NonZeroU64>,
    /// Delete the oldest sealed segments while the partition is larger than this; `None` is
    /// unlimited (the default).
    pub retention_bytes: Option<NonZeroU64>,
    /// Upper bound on how long acknowledged-but-unsynced (acks=leader) data stays unsynced.
    /// Default 1000 ms.
    pub flush_interval_ms: u64,
    /// `delete` (default) or `compact`.
    pub cleanup_policy: CleanupPolicy,
    /// Largest record batch accepted. Default 1 MiB.
    pub batch_bytes_max: u32,
}

/// What happens to old data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CleanupPolicy {
    /// Delete whole segments past retention.
    Delete,
    /// Keep the latest record per key. Accepted and stored; compaction itself is not implemented
    /// yet, so such topics behave as `delete` with the same retention.
    Compact,
}

impl CleanupPolicy {
    /// Name as used in configs.
    pub fn as_str(self) -> &'static str {
        match self {
            CleanupPolicy::Delete => "delete",
            CleanupPolicy::Compact => "compact",
        }
    }
}

impl TopicConfig {
    /// Checks ranges.
    ///
    /// # Errors
    /// [`StorageError::InvalidConfig`] naming the bad setting.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(StorageError::InvalidConfig(m));
        if self.segment_bytes < 4096 || self.segment_bytes > SEGMENT_BYTES_MAX {
            return bad(format!("segment_bytes must be 4096..={SEGMENT_BYTES_MAX}, got {}", self.segment_bytes));
        }
        if self.batch_bytes_max < 128 || u64::from(self.batch_bytes_max) > self.segment_bytes {
            return bad(format!(
                "batch_bytes_max must be 128..=segment_bytes ({}), got {}",
                self.segment_bytes, self.batch_bytes_max
            ));
        }
        if self.segment_ms == 0 {
            return bad("segment_ms must be positive".into());
        }
        if self.flush_interval_ms == 0 {
            return bad("flush_interval_ms must be positive".into());
        }
        Ok(())
    }

    /// Applies one `key = value` override (CreateTopics configs).
    ///
    /// # Errors
    /// [`StorageError::InvalidConfig`] for unknown keys or unparsable values.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let num = |v: &str| -> Result<i64> {
            v.trim().parse::<i64>().map_err(|_| StorageError::InvalidConfig(format!("{key}: {v:?} is not a number")))
        };
        let positive = |v: &str| -> Result<u64> {
            let n = num(v)?;
            u64::try_from(n)
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| StorageError::InvalidConfig(format!("{key} must be positive, got {n}")))
        };
        let optional = |v: &str| -> Result<Option<NonZeroU64>> {
            match num(v)? {
                -1 => Ok(None),
                n => NonZeroU64::new(u64::try_from(n).unwrap_or(0))
                    .map(Some)
                    .ok_or_else(|| StorageError::InvalidConfig(format!("{key} must be positive or -1, got {n}"))),
            }
        };
        match key {
            "segment_bytes" => self.segment_bytes = positive(value)?,
            "segment_ms" => self.segment_ms = positive(value)?,
            "retention_ms" => self.retention_ms = optional(value)?,
            "retention_bytes" => self.retention_bytes = optional(value)?,
            "flush_interval_ms" => self.flush_interval_ms = positive(value)?,
            "batch_bytes_max" => {
                self.batch_bytes_max = u32::try_from(positive(value)?)
                    .map_err(|_| StorageError::InvalidConfig("batch_bytes_max is too large".into()))?
            }
            "cleanup_policy" => {
                self.cleanup_policy = match value {
                    "delete" => CleanupPolicy::Delete,
                    "compact" => CleanupPolicy::Compact,
                    other => {
                        return Err(StorageError::InvalidConfig(format!(
                            "cleanup_policy must be delete or compact, got {other:?}"
                        )))
                    }
                }
            }
            other => return Err(StorageError::InvalidConfig(format!("unknown topic config key {other:?}"))),
        }
        Ok(())
    }

    /// The settings as `key = value` pairs (Metadata responses).
    pub fn entries(&self) -> Vec<(String, String)> {
        let opt = |v: Option<NonZeroU64>| v.map_or("-1".to_owned(), |v| v.to_string());
        vec![
            ("segment_bytes".into(), self.segment_bytes.to_string()),
            ("segment_ms".into(), self.segment_ms.to_string()),
            ("retention_ms".into(), opt(self.retention_ms)),
            ("retention_bytes".into(), opt(self.retention_bytes)),
            ("flush_interval_ms".into(), self.flush_interval_ms.to_string()),
            ("cleanup_policy".into(), self.cleanup_policy.as_str().into()),
            ("batch_bytes_max".into(), self.batch_bytes_max.to_string()),
        ]
    }
}

/// Broker-wide storage settings (`[storage]` in the config file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Default segment size. Default 1 GiB.
    pub segment_bytes: u64,
    /// Default segment age before a roll. Default 7 days.
    pub segment_ms: u64,
    /// Bytes between sparse index entries. Default 4096.
    pub index_interval_bytes: u32,
    /// Largest index per segment (entries = this / 8); a full index rolls the segment. Default 10 MiB.
    pub index_bytes_max: u32,
    /// Default time retention in ms, -1 for forever. Default 7 days.
    pub retention_ms: i64,
    /// Default size retention per partition in bytes, -1 for unlimited (default).
    pub retention_bytes: i64,
    /// How often retention runs. Default 60 s.
    pub retention_check_interval_ms: u64,
    /// Default bound on how long unsynced data may stay unsynced. Default 1000 ms.
    pub flush_interval_ms: u64,
    /// Default largest batch. Default 1 MiB.
    pub batch_bytes_max: u32,
    /// Appends are refused with STORAGE_FULL while the data disk has less free space. Default 100 MiB.
    pub disk_free_bytes_min: u64,
    /// Budget of mapped segments across all partitions; cold ones are unmapped and reopened
    /// lazily. Default 2048.
    pub open_segments_max: usize,
    /// How often recovery points are checkpointed. Default 5 s.
    pub checkpoint_interval_ms: u64,
    /// First preallocation of a new active segment; doubles up to `preallocate_bytes_max`.
    /// Default 64 KiB.
    pub preallocate_bytes_min: u64,
    /// Largest preallocation step. Default 64 MiB.
    pub preallocate_bytes_max: u64,
    /// Threads that open (and after an unclean stop, scan and sync) partitions at startup.
    /// Startup waits mostly on fsyncs, which the filesystem commits together when they are
    /// concurrent, so more threads than cores pay off. Default 8.
    pub recovery_threads: usize,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            segment_bytes: 1 << 30,
            segment_ms: 7 * 24 * 3600 * 1000,
            index_interval_bytes: 4096,
            index_bytes_max: 10 * 1024 * 1024,
            retention_ms: 7 * 24 * 3600 * 1000,
            retention_bytes: -1,
            retention_check_interval_ms: 60_000,
            flush_interval_ms: 1000,
            batch_bytes_max: 1 << 20,
            disk_free_bytes_min: 100 * 1024 * 1024,
            open_segments_max: 2048,
            checkpoint_interval_ms: 5000,
            preallocate_bytes_min: 64 * 1024,
            preallocate_bytes_max: 64 * 1024 * 1024,
            recovery_threads: 8,
        }
    }
}

impl StorageConfig {
    /// The topic defaults these settings imply.
    pub fn topic_defaults(&self) -> TopicConfig {
        let opt = |v: i64| u64::try_from(v).ok().and_then(NonZeroU64::new);
        TopicConfig {
            segment_bytes: self.segment_bytes,
            segment_ms: self.segment_ms,
            retention_ms: opt(self.retention_ms),
            retention_bytes: opt(self.retention_bytes),
            flush_interval_ms: self.flush_interval_ms,
            cleanup_policy: CleanupPolicy::Delete,
            batch_bytes_max: self.batch_bytes_max,
        }
    }

    /// Checks ranges.
    ///
    /// # Errors
    /// [`StorageError::InvalidConfig`] naming the bad setting.
    pub fn validate(&self) -> Result<()> {
        self.topic_defaults().validate()?;
        let bad = |m: &str| Err(StorageError::InvalidConfig(m.into()));
        if self.index_interval_bytes == 0 {
            return bad("index_interval_bytes must be positive");
        }
        if (self.index_bytes_max as usize) < 8 * 16 {
            return bad("index_bytes_max must be at least 128");
        }
        if self.open_segments_max < 16 {
            return bad("open_segments_max must be at least 16");
        }
        if self.preallocate_bytes_min < 4096 || self.preallocate_bytes_max < self.preallocate_bytes_min {
            return bad("preallocate_bytes_min must be >= 4096 and <= preallocate_bytes_max");
        }
        if !(1..=256).contains(&self.recovery_threads) {
            return bad("recovery_threads must be between 1 and 256");
        }
        if self.retention_check_interval_ms == 0 || self.checkpoint_interval_ms == 0 {
            return bad("retention_check_interval_ms and checkpoint_interval_ms must be positive");
        }
        Ok(())
    }

    /// Index entries per segment.
    pub fn index_entries_max(&self) -> usize {
        self.index_bytes_max as usize / super::index::OFFSET_ENTRY_LEN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_overrides_parse_and_unknown_keys_are_rejected() {
        let mut c = StorageConfig::default().topic_defaults();
        c.set("retention_ms", "-1").unwrap();
        assert_eq!(c.retention_ms, None);
        c.set("retention_bytes", "1000").unwrap();
        assert_eq!(c.retention_bytes.map(NonZeroU64::get), Some(1000));
        c.set("cleanup_policy", "compact").unwrap();
        assert!(c.set("retention.ms", "1").is_err());
        assert!(c.set("segment_bytes", "0").is_err());
        assert!(c.set("segment_bytes", "abc").is_err());
        c.set("segment_bytes", "100").unwrap();
        assert!(c.validate().is_err(), "segment smaller than 4096");
    }
}
