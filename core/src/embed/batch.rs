//! [`BatchingEmbedder`]: bounded requests, bounded concurrency.

use std::sync::Arc;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt, stream};
use tokio::sync::Semaphore;

use super::{Embedder, check_vectors};
use crate::error::EmbedError;

/// How a [`BatchingEmbedder`] cuts calls into requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchLimits {
    /// Most texts in one request.
    pub max_texts: usize,
    /// Most bytes of text (UTF-8) in one request. A single text longer than
    /// this is sent alone (texts are never cut).
    pub max_bytes: usize,
    /// Requests in flight at once, across every call of the embedder.
    pub concurrency: usize,
}

impl Default for BatchLimits {
    /// 128 texts or 1 MiB per request, 4 at once: within what OpenAI (2048
    /// inputs, 300k tokens per request) and the common local servers accept.
    fn default() -> Self {
        Self {
            max_texts: 128,
            max_bytes: 1 << 20,
            concurrency: 4,
        }
    }
}

impl BatchLimits {
    /// Checks that every limit is at least 1.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_texts == 0 || self.max_bytes == 0 || self.concurrency == 0 {
            return Err(
                "embedding batch limits must be positive (max_texts, max_bytes, concurrency)"
                    .into(),
            );
        }
        Ok(())
    }

    /// The ranges of `texts` that make up the requests, in order: each ends
    /// before it would exceed `max_texts` or `max_bytes`, and holds at least
    /// one text.
    pub fn split(&self, texts: &[String]) -> Vec<std::ops::Range<usize>> {
        let mut ranges = Vec::new();
        let mut start = 0;
        let mut bytes = 0usize;
        for (i, t) in texts.iter().enumerate() {
            let full = i - start >= self.max_texts.max(1)
                || (i > start && bytes.saturating_add(t.len()) > self.max_bytes);
            if full {
                ranges.push(start..i);
                start = i;
                bytes = 0;
            }
            bytes = bytes.saturating_add(t.len());
        }
        if start < texts.len() {
            ranges.push(start..texts.len());
        }
        ranges
    }
}

/// Splits each call into requests within [`BatchLimits`] and sends them to
/// the wrapped embedder, at most `concurrency` at once across all calls,
/// putting the vectors back together in the call's order.
///
/// All or nothing: when one request fails, the call fails with its error
/// (requests still in flight are dropped) and returns no vector. An
/// [`EmbedError::InvalidInput`] names the text's position in the whole call.
#[derive(Debug)]
pub struct BatchingEmbedder<E> {
    inner: E,
    limits: BatchLimits,
    permits: Arc<Semaphore>,
}

impl<E: Embedder> BatchingEmbedder<E> {
    /// Wraps `inner`. Limits of 0 are taken as 1.
    pub fn new(inner: E, limits: BatchLimits) -> Self {
        let limits = BatchLimits {
            max_texts: limits.max_texts.max(1),
            max_bytes: limits.max_bytes.max(1),
            concurrency: limits.concurrency.max(1),
        };
        Self {
            permits: Arc::new(Semaphore::new(limits.concurrency)),
            inner,
            limits,
        }
    }

    /// The wrapped embedder.
    pub fn inner(&self) -> &E {
        &self.inner
    }

    /// The limits.
    pub fn limits(&self) -> &BatchLimits {
        &self.limits
    }

    async fn request(&self, texts: &[String], offset: usize) -> Result<Vec<Vec<f32>>, EmbedError> {
        // The semaphore is never closed.
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| EmbedError::permanent("the request limiter was closed"))?;
        let vectors = self.inner.embed(texts).await.map_err(|e| match e {
            EmbedError::InvalidInput {
                index: Some(i),
                message,
            } => EmbedError::InvalidInput {
                index: Some(offset + i),
                message,
            },
            other => other,
        })?;
        check_vectors(texts.len(), self.inner.dimension(), &vectors)?;
        Ok(vectors)
    }
}

#[async_trait]
impl<E: Embedder> Embedder for BatchingEmbedder<E> {
    fn dimension(&self) -> usize {
        self.inner.dimension()
    }

    fn model(&self) -> &str {
        self.inner.model()
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let ranges = self.limits.split(texts);
        let parts: Vec<Vec<Vec<f32>>> = stream::iter(ranges)
            .map(|r| self.request(&texts[r.clone()], r.start))
            .buffered(self.limits.concurrency)
            .try_collect()
            .await?;
        Ok(parts.into_iter().flatten().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_texts: usize, max_bytes: usize) -> BatchLimits {
        BatchLimits {
            max_texts,
            max_bytes,
            concurrency: 1,
        }
    }

    #[test]
    fn split_respects_count_and_bytes_and_never_cuts_a_text() {
        let texts: Vec<String> = ["aaaa", "bb", "cccccccccc", "d", "e", "f"]
            .map(String::from)
            .to_vec();
        assert_eq!(limits(2, 100).split(&texts), vec![0..2, 2..4, 4..6]);
        // 6 bytes at most: "aaaa"+"bb" fit, the 10-byte text goes alone.
        assert_eq!(limits(10, 6).split(&texts), vec![0..2, 2..3, 3..6]);
        assert_eq!(limits(1, 1).split(&texts).len(), 6);
        assert!(limits(3, 3).split(&[]).is_empty());
    }
}
