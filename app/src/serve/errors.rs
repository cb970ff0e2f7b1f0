//! Every error the HTTP API answers, as JSON with a stable `code`.
//!
//! Each body says what the client should do: `retryable` (can the same call,
//! with the same `Idempotency-Key`, succeed later?) and `outcome`
//! (`not_applied`: nothing of the call happened or ever will; `unknown`: it
//! may have — retry with the same key to learn which). For coordinator errors
//! both come from [`CoordinatorError::is_retryable`] and
//! [`CoordinatorError::outcome`], so the API cannot drift from the library's
//! error model (`docs/errors.md`). The table of codes is in `docs/serve.md`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tandem_core::{CoordinatorError, IndexError, MetadataError, Outcome, ValidationError};
use utoipa::ToSchema;

use crate::error::{Redactor, one_line};

/// Whether the call took effect, as the API says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ApiOutcome {
    /// Nothing of the call happened, and nothing ever will.
    NotApplied,
    /// It may have happened: retry with the same `Idempotency-Key` to learn.
    Unknown,
}

impl From<Outcome> for ApiOutcome {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::NotApplied => ApiOutcome::NotApplied,
            Outcome::Unknown => ApiOutcome::Unknown,
        }
    }
}

/// The body of every error response.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ApiError {
    /// Stable machine-readable code (see `docs/serve.md`).
    pub code: &'static str,
    /// What went wrong, for people (no secrets).
    pub message: String,
    /// Whether the same call (same `Idempotency-Key`) may succeed later.
    pub retryable: bool,
    /// Whether the call took effect.
    pub outcome: ApiOutcome,
    /// The offending field, as a path (`records[2].vector`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Line of the offending JSON (1-based).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    /// Column of the offending JSON (1-based).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<u32>,
    /// The intent of a write whose outcome is unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intent: Option<String>,
    /// The HTTP status (not serialized).
    #[serde(skip)]
    pub status: StatusCode,
}

impl ApiError {
    /// An error that did not apply and cannot succeed on retry.
    pub fn rejected(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retryable: false,
            outcome: ApiOutcome::NotApplied,
            field: None,
            line: None,
            column: None,
            intent: None,
            status,
        }
    }

    /// Names the offending field.
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// 401: no or a wrong bearer token.
    pub fn unauthorized(message: &str) -> Self {
        Self::rejected(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 404 for an unknown path.
    pub fn not_found(path: &str) -> Self {
        Self::rejected(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no such endpoint: {path} (see /api/v1/openapi.json)"),
        )
    }

    /// The request ran longer than the service's request timeout. A write may
    /// still complete (it runs on without its client): its outcome is unknown.
    pub fn timeout(write: bool, secs: f64) -> Self {
        Self {
            retryable: true,
            outcome: if write {
                ApiOutcome::Unknown
            } else {
                ApiOutcome::NotApplied
            },
            ..Self::rejected(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                if write {
                    format!(
                        "no answer within the request timeout of {secs} s; the write may still \
                         complete: retry with the same Idempotency-Key to learn its outcome"
                    )
                } else {
                    format!("no answer within the request timeout of {secs} s")
                },
            )
        }
    }

    /// The service is shutting down and accepts no new call.
    pub fn shutting_down() -> Self {
        Self {
            retryable: true,
            ..Self::rejected(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                "the service is shutting down; retry against another replica or after the restart",
            )
        }
    }

    /// A coordinator error, redacted.
    pub fn from_coordinator(error: &CoordinatorError, redactor: &Redactor) -> Self {
        let (status, code, field) = classify(error);
        Self {
            code,
            message: one_line(error, redactor),
            retryable: error.is_retryable(),
            outcome: error.outcome().into(),
            field,
            line: None,
            column: None,
            intent: match error {
                CoordinatorError::OutcomeUnknown { intent, .. } => Some(intent.to_string()),
                _ => None,
            },
            status,
        }
    }
}

/// Status, code and offending field of a coordinator error.
fn classify(error: &CoordinatorError) -> (StatusCode, &'static str, Option<String>) {
    use StatusCode as S;
    let unprocessable = S::UNPROCESSABLE_ENTITY;
    match error {
        CoordinatorError::Invalid(v) => {
            let record = |i: &usize| Some(format!("records[{i}]"));
            match v {
                ValidationError::EmptyBatch => (S::BAD_REQUEST, "empty_batch", None),
                ValidationError::BatchTooLarge { .. } => {
                    (S::PAYLOAD_TOO_LARGE, "batch_too_large", None)
                }
                ValidationError::DimensionMismatch { index, .. } => (
                    unprocessable,
                    "dimension_mismatch",
                    Some(format!("records[{index}].vector")),
                ),
                ValidationError::NonFiniteVector { index, position } => (
                    unprocessable,
                    "non_finite_vector",
                    Some(format!("records[{index}].vector[{position}]")),
                ),
                ValidationError::ZeroVector { index } => (
                    unprocessable,
                    "zero_vector",
                    Some(format!("records[{index}].vector")),
                ),
                ValidationError::DuplicateId { index, .. } => (
                    unprocessable,
                    "duplicate_id",
                    Some(format!("records[{index}].id")),
                ),
                ValidationError::MetadataNotObject { index, .. } => (
                    unprocessable,
                    "metadata_not_object",
                    Some(format!("records[{index}].metadata")),
                ),
                ValidationError::EmptyScope { index } => {
                    (unprocessable, "empty_scope", record(index))
                }
                ValidationError::ScopeTooLong { index, .. } => {
                    (unprocessable, "scope_too_long", record(index))
                }
                _ => (unprocessable, "invalid_request", None),
            }
        }
        CoordinatorError::IdempotencyKeyReused { .. } => {
            (S::CONFLICT, "idempotency_key_reused", None)
        }
        CoordinatorError::Metadata(e) => match e {
            MetadataError::Transient { .. } => {
                (S::SERVICE_UNAVAILABLE, "metadata_unavailable", None)
            }
            MetadataError::InvalidInput { .. } => {
                (unprocessable, "rejected_by_metadata_store", None)
            }
            MetadataError::IdempotencyKeyTaken { .. } => {
                (S::CONFLICT, "idempotency_key_in_use", None)
            }
            _ => (S::INTERNAL_SERVER_ERROR, "metadata_store_failure", None),
        },
        CoordinatorError::Index(e) => match e {
            IndexError::Transient { .. } => (S::SERVICE_UNAVAILABLE, "index_unavailable", None),
            IndexError::InvalidInput { .. } => (unprocessable, "rejected_by_index", None),
            IndexError::CollectionNotFound { .. } => {
                (S::SERVICE_UNAVAILABLE, "collection_not_found", None)
            }
            IndexError::Unauthorized { .. } => (S::BAD_GATEWAY, "index_unauthorized", None),
            IndexError::Config { .. } => (S::INTERNAL_SERVER_ERROR, "index_misconfigured", None),
            _ => (S::INTERNAL_SERVER_ERROR, "index_failure", None),
        },
        CoordinatorError::DeadlineExceeded(_) => {
            (S::SERVICE_UNAVAILABLE, "deadline_exceeded", None)
        }
        CoordinatorError::Fenced(_) => (S::SERVICE_UNAVAILABLE, "fenced", None),
        CoordinatorError::OutcomeUnknown { .. } => {
            (S::SERVICE_UNAVAILABLE, "outcome_unknown", None)
        }
        CoordinatorError::Config(_) => (S::INTERNAL_SERVER_ERROR, "configuration", None),
        _ => (S::INTERNAL_SERVER_ERROR, "internal", None),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status;
        let mut response = (status, axum::Json(&self)).into_response();
        let headers = response.headers_mut();
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tandem\""),
            );
        }
        if self.retryable && status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tandem_core::IntentId;

    fn api(e: CoordinatorError) -> ApiError {
        ApiError::from_coordinator(&e, &Redactor::default())
    }

    #[test]
    fn retryable_and_outcome_are_the_coordinators() {
        let cases = [
            CoordinatorError::Invalid(ValidationError::EmptyBatch),
            CoordinatorError::IdempotencyKeyReused { key: "k".into() },
            CoordinatorError::Metadata(MetadataError::transient("down")),
            CoordinatorError::Metadata(MetadataError::permanent("no table")),
            CoordinatorError::Index(IndexError::ambiguous("lost")),
            CoordinatorError::Index(IndexError::CollectionNotFound {
                collection: "c".into(),
            }),
            CoordinatorError::DeadlineExceeded(Duration::from_secs(1)),
            CoordinatorError::Fenced(IntentId::new_random()),
            CoordinatorError::OutcomeUnknown {
                intent: IntentId::new_random(),
                source: Box::new(CoordinatorError::DeadlineExceeded(Duration::from_secs(1))),
            },
            CoordinatorError::Config("x".into()),
        ];
        for e in cases {
            let a = ApiError::from_coordinator(&e, &Redactor::default());
            assert_eq!(a.retryable, e.is_retryable(), "{e}");
            assert_eq!(a.outcome, ApiOutcome::from(e.outcome()), "{e}");
            assert!(!a.code.is_empty());
            // Client errors are never retryable; retryable errors are 503s.
            if a.status.is_client_error() {
                assert!(!a.retryable, "{e}");
            }
            if a.retryable {
                assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{e}");
            }
        }
    }

    #[test]
    fn unknown_outcomes_name_their_intent_and_validation_names_the_field() {
        let intent = IntentId::new_random();
        let a = api(CoordinatorError::OutcomeUnknown {
            intent,
            source: Box::new(CoordinatorError::DeadlineExceeded(Duration::from_secs(1))),
        });
        assert_eq!(
            (a.code, a.outcome, a.intent.clone()),
            (
                "outcome_unknown",
                ApiOutcome::Unknown,
                Some(intent.to_string())
            )
        );
        let a = api(CoordinatorError::Invalid(
            ValidationError::DimensionMismatch {
                index: 3,
                expected: 4,
                got: 2,
            },
        ));
        assert_eq!(a.code, "dimension_mismatch");
        assert_eq!(a.field.as_deref(), Some("records[3].vector"));
        assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    }

    #[test]
    fn messages_are_redacted() {
        let mut r = Redactor::default();
        r.add("hunter2-secret");
        let a = ApiError::from_coordinator(
            &CoordinatorError::Metadata(MetadataError::transient(
                "cannot connect as app:hunter2-secret@db",
            )),
            &r,
        );
        assert!(!a.message.contains("hunter2"), "{}", a.message);
    }
}
