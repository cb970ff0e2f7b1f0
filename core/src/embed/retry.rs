//! [`RetryingEmbedder`]: retries an embedder's retryable errors.

use std::time::Duration;

use async_trait::async_trait;

use super::Embedder;
use crate::config::RetryPolicy;
use crate::error::EmbedError;

/// Retries the calls of an [`Embedder`] that fail with a retryable error
/// ([`EmbedError::is_retryable`]: transient failures and rate limiting), up to
/// the policy's `max_attempts` in all.
///
/// The wait before retry *n* is [`RetryPolicy::backoff`]: full jitter under a
/// cap that doubles per retry, and never shorter than the server's
/// `Retry-After` ([`EmbedError::retry_after`]). A server asking for more than
/// [`max_retry_after`](Self::with_max_retry_after) (default 60 s) is not
/// waited for: the error is returned at once, so a call never sleeps for an
/// hour because a quota ran out. Permanent errors are returned at once. The
/// last error is returned when the attempts are used up.
///
/// Embedding has no side effect, so retrying is always safe.
#[derive(Debug)]
pub struct RetryingEmbedder<E> {
    inner: E,
    policy: RetryPolicy,
    max_retry_after: Duration,
}

impl<E: Embedder> RetryingEmbedder<E> {
    /// The default longest `Retry-After` waited for.
    pub const DEFAULT_MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

    /// Wraps `inner`, retrying as `policy` says (`max_attempts` 1: no retry).
    pub fn new(inner: E, policy: RetryPolicy) -> Self {
        Self {
            inner,
            policy,
            max_retry_after: Self::DEFAULT_MAX_RETRY_AFTER,
        }
    }

    /// Gives up at once when the server asks to wait longer than `max`.
    pub fn with_max_retry_after(mut self, max: Duration) -> Self {
        self.max_retry_after = max;
        self
    }

    /// The wrapped embedder.
    pub fn inner(&self) -> &E {
        &self.inner
    }

    /// The retry policy.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }
}

#[async_trait]
impl<E: Embedder> Embedder for RetryingEmbedder<E> {
    fn dimension(&self) -> usize {
        self.inner.dimension()
    }

    fn model(&self) -> &str {
        self.inner.model()
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut attempt = 1u32;
        loop {
            let e = match self.inner.embed(texts).await {
                Ok(vectors) => return Ok(vectors),
                Err(e) => e,
            };
            let hint = e.retry_after();
            if !e.is_retryable()
                || attempt >= self.policy.max_attempts
                || hint.is_some_and(|h| h > self.max_retry_after)
            {
                return Err(e);
            }
            let wait = self.policy.backoff(attempt, hint);
            tracing::warn!(
                model = self.inner.model(),
                texts = texts.len(),
                "embedding failed ({e}); retry {attempt} of {} in {:.2} s",
                self.policy.max_attempts - 1,
                wait.as_secs_f64()
            );
            metrics::counter!("tandem_embed_retries_total").increment(1);
            // tokio's clock, so that tests with paused time see the waits.
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }
}
