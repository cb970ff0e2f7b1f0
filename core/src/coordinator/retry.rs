//! Bounded retries with exponential backoff and full jitter, under a deadline.

use std::future::Future;

use tokio::time::Instant;

use crate::config::RetryPolicy;
use crate::error::{IndexError, MetadataError, Outcome};

/// What the retry loop needs to know of a port error.
pub(crate) trait PortError: std::fmt::Display {
    fn retryable(&self) -> bool;
    fn outcome_of(&self) -> Outcome;
    fn server_hint(&self) -> Option<std::time::Duration> {
        None
    }
}

impl PortError for MetadataError {
    fn retryable(&self) -> bool {
        self.is_retryable()
    }
    fn outcome_of(&self) -> Outcome {
        self.outcome()
    }
}

impl PortError for IndexError {
    fn retryable(&self) -> bool {
        self.is_retryable()
    }
    fn outcome_of(&self) -> Outcome {
        self.outcome()
    }
    fn server_hint(&self) -> Option<std::time::Duration> {
        self.retry_after()
    }
}

/// Why a step gave up.
#[derive(Debug)]
pub(crate) enum Failed<E> {
    /// The port returned an error that is final (or retries ran out).
    Port(E),
    /// The deadline passed while a call was in flight: its outcome is unknown,
    /// and (over a network) it may still land later.
    Deadline,
}

impl<E: PortError> Failed<E> {
    /// Whether the step may have taken effect.
    pub(crate) fn outcome(&self) -> Outcome {
        match self {
            Failed::Port(e) => e.outcome_of(),
            Failed::Deadline => Outcome::Unknown,
        }
    }
    /// Whether a request of this step may still be in flight.
    pub(crate) fn abandoned(&self) -> bool {
        matches!(self, Failed::Deadline)
    }
}

/// Which failures a step may retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Idempotence {
    /// Repeating the call is harmless: retry transient errors whatever their outcome.
    Idempotent,
    /// Retry only failures that certainly did not apply.
    NotAppliedOnly,
}

/// Runs `call` until it succeeds, fails for good, runs out of attempts, or the
/// deadline passes. Each retry is counted in `tandem_retries_total`.
pub(crate) async fn with_retry<T, E, F, Fut>(
    policy: &RetryPolicy,
    deadline: Instant,
    name: &'static str,
    idempotence: Idempotence,
    mut call: F,
) -> Result<T, Failed<E>>
where
    E: PortError,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        match tokio::time::timeout_at(deadline, call()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => {
                let may_retry = e.retryable()
                    && (idempotence == Idempotence::Idempotent
                        || e.outcome_of() == Outcome::NotApplied)
                    && attempt < policy.max_attempts;
                if !may_retry {
                    return Err(Failed::Port(e));
                }
                let delay = policy.backoff(attempt, e.server_hint());
                if Instant::now() + delay >= deadline {
                    return Err(Failed::Port(e));
                }
                tracing::debug!(call = name, attempt, error = %e, ?delay, "retrying");
                metrics::counter!("tandem_retries_total", "call" => name).increment(1);
                tokio::time::sleep(delay).await;
            }
            Err(_) => {
                tracing::warn!(
                    call = name,
                    attempt,
                    "deadline passed with the call in flight"
                );
                return Err(Failed::Deadline);
            }
        }
    }
}

impl<M: crate::ports::MetadataRepo, V: crate::ports::VectorIndex> super::Coordinator<M, V> {
    /// An idempotent metadata call under the call's deadline, retried.
    pub(crate) async fn metadata_call<T, F, Fut>(
        &self,
        name: &'static str,
        deadline: Instant,
        call: F,
    ) -> Result<T, crate::error::CoordinatorError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, MetadataError>>,
    {
        with_retry(
            &self.config.retry,
            deadline,
            name,
            Idempotence::Idempotent,
            call,
        )
        .await
        .map_err(|f| super::write::metadata_failure(f, self.config.call_deadline))
    }

    /// An idempotent index call under the call's deadline, retried.
    pub(crate) async fn index_call<T, F, Fut>(
        &self,
        name: &'static str,
        deadline: Instant,
        call: F,
    ) -> Result<T, crate::error::CoordinatorError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, IndexError>>,
    {
        with_retry(
            &self.config.retry,
            deadline,
            name,
            Idempotence::Idempotent,
            call,
        )
        .await
        .map_err(|f| super::write::index_failure(f, self.config.call_deadline))
    }
}
