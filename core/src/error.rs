//! The error model: every error answers the caller's two questions —
//! *can a retry help?* and *did it happen?* ([`Outcome`]).
//!
//! Driver errors appear only as `#[source]`; adapters map them in their own
//! `error.rs` (see `docs/errors.md`).

use std::time::Duration;

use crate::model::{IntentId, RecordId, SagaId};

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
    /// The caller's own step in a transaction's commit failed (with an error
    /// that is not a transient database error): the transaction rolled back,
    /// nothing was written.
    #[error("the transaction's caller step failed: {source}")]
    StepFailed {
        /// The caller's error.
        #[source]
        source: BoxError,
    },
    /// The saga whose step this commit is no longer belongs to the caller
    /// (recovery or an abort took it over): the commit did not apply.
    #[error("saga {saga} is fenced: it is no longer owned by this call")]
    SagaFenced {
        /// The saga.
        saga: SagaId,
    },
    /// The prepare was refused: the active vector collection is no longer
    /// the one of the intent's generation (a re-index switched it), or a
    /// switch is in progress. Nothing was written; refresh the index state
    /// and retry.
    #[error("the active vector collection moved (now generation {generation}{}): refresh and retry", if *.switching { ", switch in progress" } else { "" })]
    IndexMoved {
        /// The store's current generation.
        generation: u64,
        /// A switch is in progress (prepares resume when it ends).
        switching: bool,
    },
    /// A migration call conflicts with the open migration: another target,
    /// or a driver whose lease is still live holds it, or the caller no
    /// longer holds it. Nothing was written.
    #[error("re-index conflict: {message}")]
    MigrationConflict {
        /// What conflicts.
        message: String,
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
            | Self::SagaFenced { .. }
            | Self::StepFailed { .. }
            | Self::Aborted { .. }
            | Self::IdempotencyKeyTaken { .. }
            | Self::IndexMoved { .. }
            | Self::MigrationConflict { .. }
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
    /// A re-index request is invalid (its target, dimension or source).
    #[error("re-index: {0}")]
    Reindex(String),
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
    /// A transaction without parts.
    #[error("the transaction has no parts")]
    EmptyTransaction,
    /// A part of a transaction is invalid.
    #[error("part #{part}: {error}")]
    InPart {
        /// Position of the part in the transaction.
        part: usize,
        /// What is wrong with it.
        error: Box<ValidationError>,
    },
    /// Two parts of one transaction upsert the same id.
    #[error("part #{part}: record {id} is already upserted by an earlier part")]
    UpsertedTwice {
        /// The later part.
        part: usize,
        /// The id.
        id: RecordId,
    },
    /// The transaction's caller step runs on another connection type than the
    /// metadata store's (or the store runs no caller steps).
    #[error("{}", match store {
        Some(store) => format!("the transaction's step runs on {step}, but the metadata store's connection is {store}"),
        None => format!("the transaction's step runs on {step}, but this metadata store runs no caller steps"),
    })]
    StepUnsupported {
        /// The step's connection type.
        step: &'static str,
        /// The store's connection type, if it runs caller steps.
        store: Option<&'static str>,
    },
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
    /// The caller's own step in a transaction failed; the transaction rolled
    /// back and nothing of it was applied. The caller's error is the source.
    #[error("the transaction's caller step failed: {source}")]
    StepFailed {
        /// The caller's error.
        #[source]
        source: BoxError,
    },
    /// The saga was taken over by another process (recovery, an abort) while
    /// this call drove it; this call's step did not apply and it stopped.
    #[error("saga {0} was taken over by another process; this call stopped driving it")]
    SagaFenced(SagaId),
    /// The saga could not be driven to its end now (a store failed, a
    /// compensation failed, a step's outcome is unknown): it stays journaled
    /// — its state says where it is — and recovery finishes it, forward or
    /// backward, after its lease. Whether its effects stand is therefore
    /// unknown until then; do not start it again.
    #[error("saga {saga} is unfinished (recovery will finish it): {source}")]
    SagaUnfinished {
        /// The saga.
        saga: SagaId,
        /// Why it stopped.
        #[source]
        source: Box<CoordinatorError>,
    },
    /// A caller action of a saga failed.
    #[error("{0}")]
    Action(#[source] BoxError),
    /// No saga definition of this name is registered with the coordinator.
    #[error("no saga named {0:?} is registered")]
    UnknownSaga(String),
    /// No saga with this id is journaled.
    #[error("saga {0} does not exist")]
    SagaNotFound(SagaId),
    /// The saga is past its pivot step (or already ended): it can only go
    /// forward, it cannot be aborted.
    #[error("saga {0} cannot be aborted: {1}")]
    CannotAbort(SagaId, &'static str),
    /// The embedder failed (a re-index's re-embedding); nothing of the
    /// failed chunk was written to the target.
    #[error("embedder: {0}")]
    Embed(#[source] EmbedError),
    /// A re-index could not switch now (saga steps hold commits, or the
    /// writes outran every catch-up round); the old collection stays
    /// active and a re-run continues.
    #[error("re-index could not switch: {0}")]
    ReindexBlocked(String),
}

impl CoordinatorError {
    /// Did the call take effect?
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::OutcomeUnknown { .. } => Outcome::Unknown,
            Self::SagaUnfinished { .. } => Outcome::Unknown,
            _ => Outcome::NotApplied,
        }
    }
    /// Can the caller retry the same call (with the same idempotency key)?
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Metadata(MetadataError::IndexMoved { .. }) => true,
            Self::Metadata(e) => e.is_retryable(),
            Self::Index(e) => e.is_retryable(),
            Self::Embed(e) => e.is_retryable(),
            Self::ReindexBlocked(_) => true,
            Self::DeadlineExceeded(_) | Self::Fenced(_) | Self::OutcomeUnknown { .. } => true,
            // Recovery finishes it; starting it again would start another.
            Self::SagaUnfinished { .. } => false,
            Self::Invalid(_)
            | Self::IdempotencyKeyReused { .. }
            | Self::Config(_)
            | Self::StepFailed { .. }
            | Self::SagaFenced(_)
            | Self::Action(_)
            | Self::UnknownSaga(_)
            | Self::SagaNotFound(_)
            | Self::CannotAbort(..) => false,
        }
    }
}

/// An error of an [`Embedder`](crate::Embedder) call. Embedding has no side
/// effect, so the one question it answers is *can a retry help?*
/// ([`is_retryable`](Self::is_retryable)), and after how long
/// ([`retry_after`](Self::retry_after)).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmbedError {
    /// A transient failure (connection refused or reset, timeout, a 5xx
    /// answer): a retry may succeed, after `retry_after` when the server said so.
    #[error("embedding service unavailable: {message}")]
    Transient {
        /// How long the server asked us to wait.
        retry_after: Option<Duration>,
        /// What went wrong, without secrets.
        message: String,
        /// The driver's error.
        #[source]
        source: Option<BoxError>,
    },
    /// The service is rate limiting us (HTTP 429): retry after `retry_after`
    /// (or a backoff when the server did not say).
    #[error("embedding service rate limited the request{}: {message}", retry_after_text(*.retry_after))]
    RateLimited {
        /// How long the server asked us to wait (`Retry-After`).
        retry_after: Option<Duration>,
        /// What the server said, without secrets.
        message: String,
    },
    /// The service refused the texts (too long, empty, not embeddable):
    /// permanent for these texts. `index` is the text's position in the call,
    /// when known.
    #[error("embedding service rejected the input{}: {message}", index_text(*.index))]
    InvalidInput {
        /// The offending text's position in the call, when known.
        index: Option<usize>,
        /// What was wrong.
        message: String,
    },
    /// The credentials were refused (HTTP 401/403): permanent until the
    /// configuration changes.
    #[error("embedding service refused the credentials: {message}")]
    Unauthorized {
        /// What the server said, without secrets.
        message: String,
    },
    /// The service answered, but not with what the contract requires (wrong
    /// number of vectors, wrong dimension, non-finite values, unreadable
    /// body): permanent — the model or the configuration is wrong, and a
    /// retry would get the same answer.
    #[error("embedding service broke the protocol: {0}")]
    Protocol(ProtocolViolation),
    /// Any other permanent failure (unknown model, misconfiguration).
    #[error("embedding service failure: {message}")]
    Permanent {
        /// What went wrong, without secrets.
        message: String,
        /// The driver's error.
        #[source]
        source: Option<BoxError>,
    },
}

fn retry_after_text(retry_after: Option<Duration>) -> String {
    retry_after
        .map(|d| format!(" (retry after {:.1} s)", d.as_secs_f64()))
        .unwrap_or_default()
}

fn index_text(index: Option<usize>) -> String {
    index.map(|i| format!(" (text #{i})")).unwrap_or_default()
}

/// How an embedding service's answer broke the [`Embedder`](crate::Embedder)
/// contract.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolViolation {
    /// Not one vector per text.
    #[error("{got} vectors for {expected} texts")]
    WrongCount {
        /// Texts sent.
        expected: usize,
        /// Vectors received.
        got: usize,
    },
    /// A vector of another dimension than the embedder's.
    #[error("vector #{index} has dimension {got}; expected {expected}")]
    WrongDimension {
        /// Position of the vector.
        index: usize,
        /// The embedder's (and the collection's) dimension.
        expected: usize,
        /// The vector's length.
        got: usize,
    },
    /// A vector holds NaN or an infinity.
    #[error("vector #{index} component {position} is not finite")]
    NonFinite {
        /// Position of the vector.
        index: usize,
        /// Position in the vector.
        position: usize,
    },
    /// The answer could not be read, or its order could not be established
    /// (a missing, repeated or out-of-range index).
    #[error("{0}")]
    Malformed(String),
}

impl EmbedError {
    /// A transient error without a server hint.
    pub fn transient(message: impl Into<String>) -> Self {
        Self::Transient {
            retry_after: None,
            message: message.into(),
            source: None,
        }
    }
    /// A permanent error.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::Permanent {
            message: message.into(),
            source: None,
        }
    }
    /// Can a retry help? Only for [`Transient`](Self::Transient) and
    /// [`RateLimited`](Self::RateLimited).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Transient { .. } | Self::RateLimited { .. })
    }
    /// How long the server asked to wait before a retry.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Transient { retry_after, .. } | Self::RateLimited { retry_after, .. } => {
                *retry_after
            }
            _ => None,
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

    #[test]
    fn embed_errors_say_whether_a_retry_helps_and_when() {
        let wait = Some(Duration::from_secs(2));
        let limited = EmbedError::RateLimited {
            retry_after: wait,
            message: "slow down".into(),
        };
        assert!(limited.is_retryable());
        assert_eq!(limited.retry_after(), wait);
        assert!(
            limited.to_string().contains("retry after 2.0 s"),
            "{limited}"
        );
        assert!(EmbedError::transient("reset").is_retryable());
        assert_eq!(EmbedError::transient("reset").retry_after(), None);
        for permanent in [
            EmbedError::permanent("no such model"),
            EmbedError::Unauthorized {
                message: "bad key".into(),
            },
            EmbedError::InvalidInput {
                index: Some(3),
                message: "too long".into(),
            },
            EmbedError::Protocol(ProtocolViolation::WrongDimension {
                index: 0,
                expected: 4,
                got: 3,
            }),
        ] {
            assert!(!permanent.is_retryable(), "{permanent}");
            assert_eq!(permanent.retry_after(), None);
        }
        let e = EmbedError::Protocol(ProtocolViolation::WrongCount {
            expected: 3,
            got: 2,
        });
        assert_eq!(
            e.to_string(),
            "embedding service broke the protocol: 2 vectors for 3 texts"
        );
    }
}
