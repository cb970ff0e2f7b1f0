//! The error model: every error answers the caller's two questions —
//! *can a retry help?* and *did it happen?* ([`Outcome`]).
//!
//! Driver errors appear only as `#[source]`; adapters map them in their own
//! `error.rs` (see `docs/errors.md`).

use std::time::Duration;

use crate::model::{IntentId, RecordId};

/// A boxed driver error, kept as the `source` of a port error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Whether the operation that failed may have taken effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It definitely did not happen.
    NotApplied,
    /// It may have happened (the request was sent; the reply was lost).
    Unknown,
}

/// An error of a [`MetadataRepo`](crate::MetadataRepo) call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetadataError {
    /// A transient failure (connection, serialization failure, deadlock, lock or
    /// statement timeout, too many connections): a retry may succeed.
    /// `outcome` is `Unknown` when the failure hit while COMMIT was in flight.
    #[error("metadata store unavailable ({outcome:?}): {message}")]
    Transient {
        /// Did it happen?
        outcome: Outcome,
        /// What went wrong, without secrets.
        message: String,
        /// The driver's error.
        #[source]
        source: Option<BoxError>,
    },
    /// The intent is no longer owned by the caller's token (recovery took it
    /// over, or an ambiguous commit was settled): the commit did not apply.
    #[error("intent {intent} is fenced: it is no longer owned by this call")]
    Fenced {
        /// The intent.
        intent: IntentId,
    },
    /// The idempotency key was recorded by another commit first.
    #[error("idempotency key {key:?} was recorded by a concurrent call")]
    IdempotencyKeyTaken {
        /// The key.
        key: String,
    },
    /// The store rejected the data (constraint, value too long, invalid text):
    /// permanent, nothing written.
    #[error("metadata store rejected the input: {message}")]
    InvalidInput {
        /// What was wrong.
        message: String,
        /// The driver's error.
        #[source]
        source: Option<BoxError>,
    },
    /// A gated commit ([`MetadataRepo::commit_upsert_gated`](crate::MetadataRepo::commit_upsert_gated))
    /// was abandoned because the index write it waited for failed: nothing
    /// was written.
    #[error("commit of intent {intent} abandoned: the index write it waited for failed")]
    Aborted {
        /// The intent.
        intent: IntentId,
    },
    /// A permanent failure (schema missing, permission denied, misconfiguration).
    #[error("metadata store failure ({outcome:?}): {message}")]
    Permanent {
        /// Did it happen?
        outcome: Outcome,
        /// What went wrong, without secrets.
        message: String,
        /// The driver's error.
        #[source]
        source: Option<BoxError>,
    },
}

impl MetadataError {
    /// A transient error that did not apply.
    pub fn transient(message: impl Into<String>) -> Self {
        Self::Transient {
            outcome: Outcome::NotApplied,
            message: message.into(),
            source: None,
        }
    }
    /// A transient error with unknown outcome (commit in flight).
    pub fn ambiguous(message: impl Into<String>) -> Self {
        Self::Transient {
            outcome: Outcome::Unknown,
            message: message.into(),
            source: None,
        }
    }
    /// A permanent error that did not apply.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::Permanent {
            outcome: Outcome::NotApplied,
            message: message.into(),
            source: None,
        }
    }
    /// Can a retry help?
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Transient { .. })
    }
    /// Did it happen?
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::Transient { outcome, .. } | Self::Permanent { outcome, .. } => *outcome,
            Self::Fenced { .. }
            | Self::Aborted { .. }
            | Self::IdempotencyKeyTaken { .. }
            | Self::InvalidInput { .. } => Outcome::NotApplied,
        }
    }
}

/// An error of a [`VectorIndex`](crate::VectorIndex) call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IndexError {
    /// A transient failure (unavailable, deadline, internal, resource exhausted):
    /// a retry may succeed, after `retry_after` when the server said so.
    #[error("vector index unavailable ({outcome:?}): {message}")]
    Transient {
        /// Did it happen? `Unknown` once the request may have been sent.
        outcome: Outcome,
        /// How long the server asked us to wait.
        retry_after: Option<Duration>,
        /// What went wrong, without secrets.
        message: String,
        /// The driver's error.
        #[source]
        source: Option<BoxError>,
    },
    /// The index rejected the request (wrong dimension, bad payload): permanent.
    #[error("vector index rejected the input: {message}")]
    InvalidInput {
        /// What was wrong.
        message: String,
        /// The driver's error.
        #[source]
        source: Option<BoxError>,
    },
    /// The collection does not exist.
    #[error("collection not found: {collection}")]
    CollectionNotFound {
        /// The collection's name.
        collection: String,
    },
    /// The credentials were refused.
    #[error("vector index refused the credentials: {message}")]
    Unauthorized {
        /// What the server said, without secrets.
        message: String,
    },
    /// The collection exists with another layout, or the index is misconfigured.
    #[error("vector index misconfigured: {message}")]
    Config {
        /// What is wrong.
        message: String,
    },
    /// Any other permanent failure.
    #[error("vector index failure ({outcome:?}): {message}")]
    Permanent {
        /// Did it happen?
        outcome: Outcome,
        /// What went wrong, without secrets.
        message: String,
        /// The driver's error.
        #[source]
        source: Option<BoxError>,
    },
}

impl IndexError {
    /// A transient error that did not apply.
    pub fn transient(message: impl Into<String>) -> Self {
        Self::Transient {
            outcome: Outcome::NotApplied,
            retry_after: None,
            message: message.into(),
            source: None,
        }
    }
    /// A transient error with unknown outcome.
    pub fn ambiguous(message: impl Into<String>) -> Self {
        Self::Transient {
            outcome: Outcome::Unknown,
            retry_after: None,
            message: message.into(),
            source: None,
        }
    }
    /// Can a retry help?
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Transient { .. })
    }
    /// Did it happen?
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::Transient { outcome, .. } | Self::Permanent { outcome, .. } => *outcome,
            _ => Outcome::NotApplied,
        }
    }
    /// How long the server asked to wait before a retry.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Transient { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Why the coordinator rejected a request before writing anything.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// The batch has no records.
    #[error("the batch is empty")]
    EmptyBatch,
    /// The batch has more records than the configured limit.
    #[error("the batch has {len} records; the limit is {max}")]
    BatchTooLarge {
        /// Records in the batch.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A vector's length differs from the collection's dimension.
    #[error("record #{index}: vector has dimension {got}; the collection expects {expected}")]
    DimensionMismatch {
        /// Position in the batch.
        index: usize,
        /// The collection's dimension.
        expected: usize,
        /// The vector's length.
        got: usize,
    },
    /// A vector holds NaN or an infinity.
    #[error("record #{index}: vector component {position} is not finite")]
    NonFiniteVector {
        /// Position in the batch.
        index: usize,
        /// Position in the vector.
        position: usize,
    },
    /// A cosine vector with zero length cannot be normalised.
    #[error("record #{index}: vector is all zeros, which has no direction")]
    ZeroVector {
        /// Position in the batch.
        index: usize,
    },
    /// The same id appears twice in one batch.
    #[error("record #{index}: id {id} appears more than once in the batch")]
    DuplicateId {
        /// Position of the second occurrence.
        index: usize,
        /// The id.
        id: RecordId,
    },
    /// Metadata is not a JSON object.
    #[error("record #{index}: metadata must be a JSON object, got {found}")]
    MetadataNotObject {
        /// Position in the batch.
        index: usize,
        /// The JSON type found.
        found: &'static str,
    },
    /// The scope is empty.
    #[error("record #{index}: scope must not be empty")]
    EmptyScope {
        /// Position in the batch (0 for selectors and filters).
        index: usize,
    },
    /// The scope is longer than allowed.
    #[error("record #{index}: scope is {len} bytes; the limit is {max}")]
    ScopeTooLong {
        /// Position in the batch.
        index: usize,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A delete by ids with no ids, or a search with k = 0.
    #[error("{0}")]
    Invalid(String),
}

/// The error of a [`Coordinator`](crate::Coordinator) operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoordinatorError {
    /// The request was invalid; nothing was written.
    #[error("invalid request: {0}")]
    Invalid(#[from] ValidationError),
    /// The idempotency key was used before with a different request.
    #[error("idempotency key {key:?} was already used for a different request")]
    IdempotencyKeyReused {
        /// The key.
        key: String,
    },
    /// The metadata store failed and the call did not apply (retries exhausted,
    /// or a permanent error).
    #[error("metadata store: {0}")]
    Metadata(#[source] MetadataError),
    /// The index failed and the call did not apply; new points were compensated
    /// or left to recovery, and are never visible.
    #[error("vector index: {0}")]
    Index(#[source] IndexError),
    /// The call's deadline passed before its commit; nothing of it is visible.
    #[error("deadline of {0:?} exceeded before the commit; nothing was applied")]
    DeadlineExceeded(Duration),
    /// Recovery took the call's intent over before it could commit: not applied.
    #[error("intent {0} was taken over by recovery before the commit; nothing was applied")]
    Fenced(IntentId),
    /// The commit's outcome could not be learned (the metadata store stayed
    /// unreachable). The write is all-or-nothing either way; recovery finishes it.
    #[error("outcome of intent {intent} is unknown: {source}")]
    OutcomeUnknown {
        /// The intent, to look up later.
        intent: IntentId,
        /// Why it could not be settled.
        #[source]
        source: Box<CoordinatorError>,
    },
    /// The coordinator is misconfigured.
    #[error("configuration: {0}")]
    Config(String),
}

impl CoordinatorError {
    /// Did the call take effect?
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::OutcomeUnknown { .. } => Outcome::Unknown,
            _ => Outcome::NotApplied,
        }
    }
    /// Can the caller retry the same call (with the same idempotency key)?
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Metadata(e) => e.is_retryable(),
            Self::Index(e) => e.is_retryable(),
            Self::DeadlineExceeded(_) | Self::Fenced(_) | Self::OutcomeUnknown { .. } => true,
            Self::Invalid(_) | Self::IdempotencyKeyReused { .. } | Self::Config(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_answers_both_questions() {
        assert!(MetadataError::transient("x").is_retryable());
        assert_eq!(MetadataError::ambiguous("x").outcome(), Outcome::Unknown);
        assert!(!MetadataError::permanent("x").is_retryable());
        let fenced = MetadataError::Fenced {
            intent: IntentId::new_random(),
        };
        assert!(!fenced.is_retryable());
        assert_eq!(fenced.outcome(), Outcome::NotApplied);
        assert!(IndexError::ambiguous("x").is_retryable());
        assert_eq!(IndexError::ambiguous("x").outcome(), Outcome::Unknown);
        assert!(
            !IndexError::CollectionNotFound {
                collection: "c".into()
            }
            .is_retryable()
        );
        let unknown = CoordinatorError::OutcomeUnknown {
            intent: IntentId::new_random(),
            source: Box::new(CoordinatorError::DeadlineExceeded(Duration::from_secs(1))),
        };
        assert_eq!(unknown.outcome(), Outcome::Unknown);
        assert!(!CoordinatorError::Invalid(ValidationError::EmptyBatch).is_retryable());
    }
}
