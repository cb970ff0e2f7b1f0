//! Maps qdrant-client's errors (gRPC statuses, mostly) and update results into
//! [`IndexError`]: can a retry help, and did the request take effect?
//!
//! | gRPC code | error | retryable | outcome of a write |
//! |---|---|---|---|
//! | Unavailable with a connect error in its source chain | `Transient` | yes | `NotApplied` |
//! | Internal "Failed to connect to …" (qdrant-client's reconnect) | `Transient` | yes | `Unknown` (see below) |
//! | Unavailable, DeadlineExceeded, Internal, Cancelled, Unknown, Aborted, ResourceExhausted | `Transient` (+ `retry_after`) | yes | `Unknown` |
//! | InvalidArgument, OutOfRange | `InvalidInput` | no | `NotApplied` |
//! | NotFound | `CollectionNotFound` | no | `NotApplied` |
//! | PermissionDenied, Unauthenticated | `Unauthorized` | no | `NotApplied` |
//! | anything else (FailedPrecondition, AlreadyExists, Unimplemented, DataLoss, …) | `Permanent` | no | `NotApplied` |
//!
//! A read never has an effect, so its outcome is always `NotApplied`.
//!
//! Why a transient error of a write is `Unknown` even when the server answered:
//! qdrant-client re-sends a points request once, on a fresh connection, after
//! Internal / Unavailable / Cancelled / Unknown, and reports only the last
//! attempt; the first may have been applied. Its reconnect failure is a bare
//! `Status::internal("Failed to connect to …")` whose source chain was turned
//! into text, so it cannot be told apart from a refusal before anything was
//! sent. Only a status that still carries tonic's `ConnectError` proves that
//! nothing left the client.
//!
//! `retry_after` comes from the `retry-after` response metadata, in seconds,
//! which Qdrant sets on ResourceExhausted (rate limiting) and qdrant-client also
//! reads.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use qdrant_client::QdrantError;
use qdrant_client::qdrant::{PointsOperationResponse, UpdateStatus};
use tandem_core::{IndexError, Outcome};
use tonic::{Code, Status};

/// Whether the failed request could have changed the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// A read (retrieve, count, scroll, search, collection info): never has an effect.
    Read,
    /// A write (upsert, delete, create collection or index).
    Write,
}

/// The metadata key Qdrant puts the rate-limit back-off in (whole seconds).
pub const RETRY_AFTER: &str = "retry-after";

/// Classifies an error of qdrant-client.
pub fn classify(err: QdrantError, op: Op, collection: &str) -> IndexError {
    match err {
        QdrantError::ResponseError { status }
        | QdrantError::ResourceExhaustedError { status, .. } => {
            classify_status(status, op, collection)
        }
        QdrantError::InvalidUri(e) => IndexError::Config {
            message: format!("invalid Qdrant URL: {e}"),
        },
        QdrantError::ConversionError(message) => IndexError::InvalidInput {
            message,
            source: None,
        },
        e @ QdrantError::JsonToPayload(_) => IndexError::InvalidInput {
            message: e.to_string(),
            source: Some(Box::new(e)),
        },
        // Raised by the client before or after the exchange (local I/O, decoding
        // a reply): keep the write's outcome open.
        #[allow(unreachable_patterns)]
        other => IndexError::Permanent {
            outcome: outcome_of(op, false),
            message: other.to_string(),
            source: Some(Box::new(other)),
        },
    }
}

/// Classifies a gRPC status (see the table in the module documentation).
pub fn classify_status(status: Status, op: Op, collection: &str) -> IndexError {
    let message = describe(&status);
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Internal
        | Code::Cancelled
        | Code::Unknown
        | Code::Aborted
        | Code::ResourceExhausted => {
            let not_sent = status.code() == Code::Unavailable && connect_failed(&status);
            IndexError::Transient {
                outcome: outcome_of(op, not_sent),
                retry_after: retry_after(&status),
                message,
                source: Some(Box::new(status)),
            }
        }
        Code::InvalidArgument | Code::OutOfRange => IndexError::InvalidInput {
            message,
            source: Some(Box::new(status)),
        },
        Code::NotFound => IndexError::CollectionNotFound {
            collection: collection.to_owned(),
        },
        Code::PermissionDenied | Code::Unauthenticated => IndexError::Unauthorized { message },
        _ => IndexError::Permanent {
            outcome: Outcome::NotApplied,
            message,
            source: Some(Box::new(status)),
        },
    }
}

/// Checks the result of a `wait=true` write: only `Completed` means applied.
/// Anything else (`Acknowledged`, `WaitTimeout`, `ClockRejected`, an unknown
/// status, no result at all) is a transient error with outcome `Unknown`: the
/// write may still land.
pub fn check_update(response: &PointsOperationResponse, what: &str) -> Result<(), IndexError> {
    let status = response.result.as_ref().map(|r| r.status);
    if status == Some(UpdateStatus::Completed as i32) {
        return Ok(());
    }
    let name = status
        .map(|s| match UpdateStatus::try_from(s) {
            Ok(known) => known.as_str_name().to_owned(),
            Err(_) => format!("unknown status {s}"),
        })
        .unwrap_or_else(|| "no result".to_owned());
    Err(IndexError::Transient {
        outcome: Outcome::Unknown,
        retry_after: None,
        message: format!("{what} was not confirmed as applied (update status: {name})"),
        source: Some(Box::new(NotCompleted(name))),
    })
}

/// The update status a write ended with, when it was not `Completed`.
#[derive(Debug)]
pub struct NotCompleted(pub String);

impl fmt::Display for NotCompleted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "update status {} is not Completed", self.0)
    }
}

impl StdError for NotCompleted {}

/// Marks an error of one chunk of a multi-chunk write whose other chunks may
/// have been applied: the call as a whole then has outcome `Unknown`, whatever
/// the chunk's own error said.
pub fn partially_applied(err: IndexError, applied: usize, total: usize) -> IndexError {
    let note = format!("{applied} of {total} chunks were applied before the failure");
    match err {
        IndexError::Transient {
            retry_after,
            message,
            source,
            ..
        } => IndexError::Transient {
            outcome: Outcome::Unknown,
            retry_after,
            message: format!("{message} ({note})"),
            source,
        },
        IndexError::Permanent {
            message, source, ..
        } => IndexError::Permanent {
            outcome: Outcome::Unknown,
            message: format!("{message} ({note})"),
            source,
        },
        other => IndexError::Permanent {
            outcome: Outcome::Unknown,
            message: format!("{other} ({note})"),
            source: Some(Box::new(other)),
        },
    }
}

fn outcome_of(op: Op, not_sent: bool) -> Outcome {
    match op {
        Op::Read => Outcome::NotApplied,
        Op::Write if not_sent => Outcome::NotApplied,
        Op::Write => Outcome::Unknown,
    }
}

fn describe(status: &Status) -> String {
    if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        format!("{:?}: {}", status.code(), status.message())
    }
}

/// Whether tonic failed to establish the connection, so nothing was sent.
fn connect_failed(status: &Status) -> bool {
    let mut source = status.source();
    while let Some(e) = source {
        if e.is::<tonic::ConnectError>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// The server's `retry-after`, in seconds (integer or decimal).
fn retry_after(status: &Status) -> Option<Duration> {
    let value = status.metadata().get(RETRY_AFTER)?.to_str().ok()?;
    let secs: f64 = value.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(86_400.0)))
}

#[cfg(test)]
mod tests {
    use qdrant_client::qdrant::UpdateResult;

    use super::*;

    const C: &str = "records";

    fn write(status: Status) -> IndexError {
        classify_status(status, Op::Write, C)
    }

    fn assert_transient_unknown(err: &IndexError) {
        assert!(err.is_retryable(), "{err:?}");
        assert_eq!(err.outcome(), Outcome::Unknown, "{err:?}");
    }

    #[test]
    fn unavailable_after_sending_is_transient_unknown() {
        let err = write(Status::unavailable("shard unavailable"));
        assert_transient_unknown(&err);
        assert!(err.to_string().contains("shard unavailable"), "{err}");
    }

    #[test]
    fn deadline_exceeded_is_transient_unknown() {
        assert_transient_unknown(&write(Status::deadline_exceeded("timeout")));
    }

    #[test]
    fn internal_is_transient_unknown() {
        assert_transient_unknown(&write(Status::internal("service error")));
    }

    #[test]
    fn cancelled_is_transient_unknown() {
        // tonic reports its own request timeout as Cancelled("Timeout expired").
        assert_transient_unknown(&write(Status::cancelled("Timeout expired")));
    }

    #[test]
    fn unknown_is_transient_unknown() {
        assert_transient_unknown(&write(Status::unknown("h2 protocol error")));
    }

    #[test]
    fn resource_exhausted_honours_retry_after() {
        let mut status = Status::resource_exhausted("rate limit");
        status
            .metadata_mut()
            .insert(RETRY_AFTER, "3".parse().unwrap());
        let err = write(status);
        assert_transient_unknown(&err);
        assert_eq!(err.retry_after(), Some(Duration::from_secs(3)));

        let mut status = Status::resource_exhausted("rate limit");
        status
            .metadata_mut()
            .insert(RETRY_AFTER, "0.25".parse().unwrap());
        assert_eq!(
            write(status).retry_after(),
            Some(Duration::from_millis(250))
        );

        let mut status = Status::resource_exhausted("rate limit");
        status
            .metadata_mut()
            .insert(RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(write(status).retry_after(), None);
        assert_eq!(
            write(Status::resource_exhausted("no hint")).retry_after(),
            None
        );
    }

    #[test]
    fn resource_exhausted_through_the_client_error_keeps_retry_after() {
        let mut status = Status::resource_exhausted("rate limit");
        status
            .metadata_mut()
            .insert(RETRY_AFTER, "2".parse().unwrap());
        // The client's own conversion, as used on every response.
        let err = QdrantError::from(status);
        assert!(matches!(err, QdrantError::ResourceExhaustedError { .. }));
        let err = classify(err, Op::Write, C);
        assert_eq!(err.retry_after(), Some(Duration::from_secs(2)));
    }

    #[test]
    fn connect_error_in_source_chain_is_not_applied() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let status = Status::from_error(Box::new(tonic::ConnectError(Box::new(io))));
        assert_eq!(status.code(), Code::Unavailable);
        let err = write(status);
        assert!(err.is_retryable());
        assert_eq!(err.outcome(), Outcome::NotApplied);
    }

    #[test]
    fn client_reconnect_failure_is_unknown_for_writes() {
        // What qdrant-client's channel pool returns when (re)connecting fails.
        let status = Status::internal(
            "Failed to connect to http://127.0.0.1:1/: tonic::transport::Error(Transport, ConnectError)",
        );
        assert_transient_unknown(&write(status));
        let status = Status::internal("Failed to connect to http://127.0.0.1:1/");
        let read = classify_status(status, Op::Read, C);
        assert!(read.is_retryable());
        assert_eq!(read.outcome(), Outcome::NotApplied);
    }

    #[test]
    fn reads_are_never_unknown() {
        for status in [
            Status::unavailable("x"),
            Status::internal("x"),
            Status::deadline_exceeded("x"),
            Status::cancelled("x"),
        ] {
            let err = classify_status(status, Op::Read, C);
            assert!(err.is_retryable());
            assert_eq!(err.outcome(), Outcome::NotApplied);
        }
    }

    #[test]
    fn invalid_argument_is_invalid_input() {
        let err = write(Status::invalid_argument(
            "Wrong input: Vector dimension error: expected dim: 4, got 3",
        ));
        assert!(matches!(err, IndexError::InvalidInput { .. }), "{err:?}");
        assert!(!err.is_retryable());
        assert_eq!(err.outcome(), Outcome::NotApplied);
        assert!(err.to_string().contains("expected dim: 4"));
    }

    #[test]
    fn not_found_is_collection_not_found() {
        let err = write(Status::not_found("Collection `records` doesn't exist!"));
        match err {
            IndexError::CollectionNotFound { collection } => assert_eq!(collection, C),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn permission_denied_is_unauthorized() {
        let err = write(Status::permission_denied("Invalid api-key"));
        assert!(matches!(err, IndexError::Unauthorized { .. }), "{err:?}");
        assert!(!err.is_retryable());
    }

    #[test]
    fn unauthenticated_is_unauthorized() {
        let err = write(Status::unauthenticated("Must provide an API key"));
        assert!(matches!(err, IndexError::Unauthorized { .. }), "{err:?}");
        assert!(!err.is_retryable());
    }

    #[test]
    fn other_codes_are_permanent_not_applied() {
        for status in [
            Status::failed_precondition("locked"),
            Status::unimplemented("no such rpc"),
            Status::already_exists("exists"),
            Status::data_loss("checksum"),
        ] {
            let err = write(status);
            assert!(matches!(err, IndexError::Permanent { .. }), "{err:?}");
            assert!(!err.is_retryable());
            assert_eq!(err.outcome(), Outcome::NotApplied);
        }
    }

    fn response(status: Option<i32>) -> PointsOperationResponse {
        PointsOperationResponse {
            result: status.map(|status| UpdateResult {
                operation_id: Some(1),
                status,
            }),
            time: 0.0,
            usage: None,
        }
    }

    #[test]
    fn only_completed_is_success() {
        check_update(&response(Some(UpdateStatus::Completed as i32)), "upsert").unwrap();
        for status in [
            Some(UpdateStatus::WaitTimeout as i32),
            Some(UpdateStatus::Acknowledged as i32),
            Some(UpdateStatus::ClockRejected as i32),
            Some(UpdateStatus::UnknownUpdateStatus as i32),
            Some(99),
            None,
        ] {
            let err = check_update(&response(status), "upsert").unwrap_err();
            assert_transient_unknown(&err);
            assert!(err.to_string().contains("not confirmed"), "{err}");
        }
        let err = check_update(&response(Some(UpdateStatus::WaitTimeout as i32)), "upsert");
        assert!(err.unwrap_err().to_string().contains("WaitTimeout"));
    }

    #[test]
    fn partial_application_makes_the_outcome_unknown() {
        let err = partially_applied(IndexError::transient("down"), 2, 5);
        assert_transient_unknown(&err);
        assert!(err.to_string().contains("2 of 5"));
        let err = partially_applied(
            IndexError::InvalidInput {
                message: "bad payload".into(),
                source: None,
            },
            1,
            3,
        );
        assert!(!err.is_retryable());
        assert_eq!(err.outcome(), Outcome::Unknown);
        assert!(err.to_string().contains("bad payload"));
    }

    #[test]
    fn invalid_uri_is_config() {
        let e = "http://[::1".parse::<tonic::transport::Uri>().unwrap_err();
        let err = classify(QdrantError::InvalidUri(e), Op::Read, C);
        assert!(matches!(err, IndexError::Config { .. }), "{err:?}");
    }
}
