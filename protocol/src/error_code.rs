//! The wire error codes shared by broker and client.
//!
//! Codes are stable: a retired code is never reused for another meaning. Add new codes at the end.

/// A stable, numeric error code carried in responses.
///
/// `0` means success. Each code has a short upper-case name (used in logs and `PROTOCOL.md`), a
/// human message, and a flag that says whether retrying the same request can succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// No error.
    None = 0,
    /// The broker hit an unexpected internal error; its log says more.
    Unknown = 1,
    /// The request could not be decoded or is inconsistent.
    InvalidRequest = 2,
    /// The API or API version is not supported by the broker.
    UnsupportedVersion = 3,
    /// The topic or partition does not exist.
    UnknownTopicOrPartition = 4,
    /// The offset is below the log start or above the log end.
    OffsetOutOfRange = 5,
    /// A record batch failed its length, magic, attribute or CRC32C check.
    CorruptBatch = 6,
    /// A record batch or request is larger than the configured limit.
    BatchTooLarge = 7,
    /// The disk is full or below the configured free-space floor.
    StorageFull = 8,
    /// A disk operation failed (I/O error, failed fsync).
    StorageError = 9,
    /// A topic with that name already exists.
    TopicAlreadyExists = 10,
    /// The topic name is empty, too long, or uses characters outside `[A-Za-z0-9._-]`.
    InvalidTopicName = 11,
    /// The partition count is zero or above the broker's limit.
    InvalidPartitions = 12,
    /// A topic config key is unknown or its value is invalid.
    InvalidConfig = 13,
    /// The request did not complete within its timeout.
    RequestTimedOut = 14,
    /// This broker is not the coordinator for the group.
    NotCoordinator = 15,
    /// The group generation in the request is not the current one.
    IllegalGeneration = 16,
    /// The member id is not known to the group.
    UnknownMemberId = 17,
    /// The group is rebalancing; the member must rejoin.
    RebalanceInProgress = 18,
    /// The session timeout is outside the broker's allowed range.
    InvalidSessionTimeout = 19,
    /// The group does not exist.
    GroupIdNotFound = 20,
    /// The broker is shutting down and takes no new work.
    ShuttingDown = 21,
    /// A broker resource limit was hit (connections, parked fetches, in-flight requests).
    ResourceLimit = 22,
    /// The partition is not assigned to this group member in the current generation.
    NotAssigned = 23,
    /// The group id is empty or too long.
    InvalidGroupId = 24,
    /// The offset metadata string is longer than the broker allows.
    OffsetMetadataTooLarge = 25,
    /// A newer incarnation of this static member (same `group_instance_id`) has joined; this
    /// one must stop.
    FencedInstanceId = 26,
}

impl ErrorCode {
    /// Every code, in numeric order.
    pub const ALL: [ErrorCode; 27] = [
        ErrorCode::None,
        ErrorCode::Unknown,
        ErrorCode::InvalidRequest,
        ErrorCode::UnsupportedVersion,
        ErrorCode::UnknownTopicOrPartition,
        ErrorCode::OffsetOutOfRange,
        ErrorCode::CorruptBatch,
        ErrorCode::BatchTooLarge,
        ErrorCode::StorageFull,
        ErrorCode::StorageError,
        ErrorCode::TopicAlreadyExists,
        ErrorCode::InvalidTopicName,
        ErrorCode::InvalidPartitions,
        ErrorCode::InvalidConfig,
        ErrorCode::RequestTimedOut,
        ErrorCode::NotCoordinator,
        ErrorCode::IllegalGeneration,
        ErrorCode::UnknownMemberId,
        ErrorCode::RebalanceInProgress,
        ErrorCode::InvalidSessionTimeout,
        ErrorCode::GroupIdNotFound,
        ErrorCode::ShuttingDown,
        ErrorCode::ResourceLimit,
        ErrorCode::NotAssigned,
        ErrorCode::InvalidGroupId,
        ErrorCode::OffsetMetadataTooLarge,
        ErrorCode::FencedInstanceId,
    ];

    /// The code for a number, or `None` if the number is not a known code (a newer broker).
    pub fn from_u16(code: u16) -> Option<ErrorCode> {
        Self::ALL.get(usize::from(code)).copied()
    }

    /// The numeric value sent on the wire.
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// `true` for [`ErrorCode::None`].
    pub fn is_ok(self) -> bool {
        self == ErrorCode::None
    }

    /// Upper-case name, as used in `PROTOCOL.md` and logs.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::None => "NONE",
            ErrorCode::Unknown => "UNKNOWN",
            ErrorCode::InvalidRequest => "INVALID_REQUEST",
            ErrorCode::UnsupportedVersion => "UNSUPPORTED_VERSION",
            ErrorCode::UnknownTopicOrPartition => "UNKNOWN_TOPIC_OR_PARTITION",
            ErrorCode::OffsetOutOfRange => "OFFSET_OUT_OF_RANGE",
            ErrorCode::CorruptBatch => "CORRUPT_BATCH",
            ErrorCode::BatchTooLarge => "BATCH_TOO_LARGE",
            ErrorCode::StorageFull => "STORAGE_FULL",
            ErrorCode::StorageError => "STORAGE_ERROR",
            ErrorCode::TopicAlreadyExists => "TOPIC_ALREADY_EXISTS",
            ErrorCode::InvalidTopicName => "INVALID_TOPIC_NAME",
            ErrorCode::InvalidPartitions => "INVALID_PARTITIONS",
            ErrorCode::InvalidConfig => "INVALID_CONFIG",
            ErrorCode::RequestTimedOut => "REQUEST_TIMED_OUT",
            ErrorCode::NotCoordinator => "NOT_COORDINATOR",
            ErrorCode::IllegalGeneration => "ILLEGAL_GENERATION",
            ErrorCode::UnknownMemberId => "UNKNOWN_MEMBER_ID",
            ErrorCode::RebalanceInProgress => "REBALANCE_IN_PROGRESS",
            ErrorCode::InvalidSessionTimeout => "INVALID_SESSION_TIMEOUT",
            ErrorCode::GroupIdNotFound => "GROUP_ID_NOT_FOUND",
            ErrorCode::ShuttingDown => "SHUTTING_DOWN",
            ErrorCode::ResourceLimit => "RESOURCE_LIMIT",
            ErrorCode::NotAssigned => "NOT_ASSIGNED",
            ErrorCode::InvalidGroupId => "INVALID_GROUP_ID",
            ErrorCode::OffsetMetadataTooLarge => "OFFSET_METADATA_TOO_LARGE",
            ErrorCode::FencedInstanceId => "FENCED_INSTANCE_ID",
        }
    }

    /// A one-line message for humans.
    pub fn message(self) -> &'static str {
        match self {
            ErrorCode::None => "success",
            ErrorCode::Unknown => "unexpected broker error; see the broker log",
            ErrorCode::InvalidRequest => "the request is malformed or inconsistent",
            ErrorCode::UnsupportedVersion => "the broker does not support this API or API version",
            ErrorCode::UnknownTopicOrPartition => "the topic or partition does not exist",
            ErrorCode::OffsetOutOfRange => "the offset is outside the partition's log",
            ErrorCode::CorruptBatch => "the record batch failed validation (length, magic, attributes or CRC32C)",
            ErrorCode::BatchTooLarge => "the record batch is larger than the broker allows",
            ErrorCode::StorageFull => "the broker's disk is full or below its free-space floor",
            ErrorCode::StorageError => "the broker failed to read or write its disk",
            ErrorCode::TopicAlreadyExists => "a topic with this name already exists",
            ErrorCode::InvalidTopicName => "topic names are 1-249 characters from [A-Za-z0-9._-]",
            ErrorCode::InvalidPartitions => "the partition count is zero or above the broker's limit",
            ErrorCode::InvalidConfig => "a topic config key is unknown or its value is invalid",
            ErrorCode::RequestTimedOut => "the request did not complete in time",
            ErrorCode::NotCoordinator => "this broker is not the group's coordinator",
            ErrorCode::IllegalGeneration => "the group generation is stale; rejoin the group",
            ErrorCode::UnknownMemberId => "the group does not know this member; rejoin the group",
            ErrorCode::RebalanceInProgress => "the group is rebalancing; rejoin the group",
            ErrorCode::InvalidSessionTimeout => "the session timeout is outside the broker's allowed range",
            ErrorCode::GroupIdNotFound => "the group does not exist",
            ErrorCode::ShuttingDown => "the broker is shutting down",
            ErrorCode::ResourceLimit => "a broker resource limit was reached; retry later",
            ErrorCode::NotAssigned => "the partition is not assigned to this member",
            ErrorCode::InvalidGroupId => "group ids are 1-249 characters",
            ErrorCode::OffsetMetadataTooLarge => "the offset metadata is longer than the broker allows",
            ErrorCode::FencedInstanceId => {
                "a newer member with the same group_instance_id has joined the group; this one is fenced"
            }
        }
    }

    /// Whether sending the same request again may succeed without the caller changing anything.
    pub fn is_retriable(self) -> bool {
        matches!(
            self,
            ErrorCode::RequestTimedOut
                | ErrorCode::ShuttingDown
                | ErrorCode::ResourceLimit
                | ErrorCode::NotCoordinator
                | ErrorCode::StorageFull
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.name(), self.as_u16(), self.message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_its_number() {
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(code.as_u16() as usize, i);
            assert_eq!(ErrorCode::from_u16(code.as_u16()), Some(*code));
        }
        assert_eq!(ErrorCode::from_u16(ErrorCode::ALL.len() as u16), None);
    }

    #[test]
    fn names_are_unique() {
        let mut names: Vec<_> = ErrorCode::ALL.iter().map(|c| c.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ErrorCode::ALL.len());
    }
}
