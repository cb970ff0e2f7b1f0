//! The embedding port: texts in, vectors out.
//!
//! An [`Embedder`] turns a batch of texts into one vector each. Backends (a
//! model server speaking the OpenAI-compatible API, the lexical hash
//! embedding) implement it in `tandem-adapters`; the two wrappers here add
//! what every remote embedder needs and no adapter should decide alone:
//!
//! - [`RetryingEmbedder`] retries retryable errors with full-jitter backoff
//!   ([`RetryPolicy`]), never sooner than the server's `Retry-After`;
//! - [`BatchingEmbedder`] splits a call into requests of bounded count and
//!   bytes and runs at most a set number at once.
//!
//! Compose them as `BatchingEmbedder<RetryingEmbedder<Adapter>>`: each request
//! is retried on its own, and a retry waits without holding up the others'
//! results. See `docs/embeddings.md`.

mod batch;
mod retry;

use async_trait::async_trait;

pub use batch::{BatchLimits, BatchingEmbedder};
pub use retry::RetryingEmbedder;

pub use crate::config::RetryPolicy;
use crate::error::{EmbedError, ProtocolViolation};

/// Turns texts into vectors of a fixed dimension.
///
/// Object safe and `Send + Sync`: share one as `Arc<dyn Embedder>`.
///
/// Errors are classified as for the stores: [`EmbedError::is_retryable`] says
/// whether a retry can help ([`Transient`](EmbedError::Transient),
/// [`RateLimited`](EmbedError::RateLimited)) and
/// [`EmbedError::retry_after`] how long the server asked to wait. An adapter
/// maps its service's failures to them and does not retry itself (wrap it in
/// a [`RetryingEmbedder`]); each adapter's own tests check its mapping.
///
/// Each method's doc ends with its **Contract**; every bullet has a case in
/// the conformance suite (`tandem_core::testkit::conformance`, feature
/// `testkit`, macro [`embedder_conformance!`](crate::embedder_conformance)),
/// named after it.
#[async_trait]
pub trait Embedder: Send + Sync {
    /// The length of every vector this embedder returns. It must equal the
    /// collection's dimension.
    ///
    /// Contract:
    /// - `describes_itself`: at least 1, and the same for the embedder's
    ///   lifetime; [`model`](Self::model) is not empty.
    fn dimension(&self) -> usize;

    /// What produces the vectors (a model name, or `hash`), for messages
    /// and for recording which model embedded a collection.
    fn model(&self) -> &str;

    /// The vectors of `texts`: one per text, in the same order.
    ///
    /// The call has no side effect, so a failed call may be repeated freely.
    /// On error no vector is returned: a caller never gets part of a batch.
    ///
    /// Contract:
    /// - `embed_returns_one_vector_per_text_in_order`: `texts.len()`
    ///   vectors; the i-th is text i's (the same, up to float noise, as that
    ///   text embedded alone).
    /// - `embed_vectors_have_the_dimension`: every vector has
    ///   [`dimension`](Self::dimension) components, all finite.
    /// - `embed_empty_call_is_empty`: no texts, no vectors (and no error).
    /// - `embed_repeated_texts_agree`: a text given twice in one call gets
    ///   the same vector twice (up to float noise).
    /// - `embed_many_texts_keeps_order`: a call with more texts than one
    ///   request carries (see [`BatchingEmbedder`]) still returns every
    ///   vector, in order.
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError>;
}

/// Checks an answer against the contract: one vector per text, each of
/// `dimension` finite components. Adapters call it on what their service
/// returned, so that a broken answer is a [`EmbedError::Protocol`] error and
/// never reaches a store.
pub fn check_vectors(
    texts: usize,
    dimension: usize,
    vectors: &[Vec<f32>],
) -> Result<(), EmbedError> {
    if vectors.len() != texts {
        return Err(EmbedError::Protocol(ProtocolViolation::WrongCount {
            expected: texts,
            got: vectors.len(),
        }));
    }
    for (index, v) in vectors.iter().enumerate() {
        if v.len() != dimension {
            return Err(EmbedError::Protocol(ProtocolViolation::WrongDimension {
                index,
                expected: dimension,
                got: v.len(),
            }));
        }
        if let Some(position) = v.iter().position(|x| !x.is_finite()) {
            return Err(EmbedError::Protocol(ProtocolViolation::NonFinite {
                index,
                position,
            }));
        }
    }
    Ok(())
}

macro_rules! forward_embedder {
    ($($ptr:tt)*) => {
        #[async_trait]
        impl<T: Embedder + ?Sized> Embedder for $($ptr)*<T> {
            fn dimension(&self) -> usize {
                (**self).dimension()
            }
            fn model(&self) -> &str {
                (**self).model()
            }
            async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
                (**self).embed(texts).await
            }
        }
    };
}

forward_embedder!(std::sync::Arc);
forward_embedder!(Box);

#[async_trait]
impl<T: Embedder + ?Sized> Embedder for &T {
    fn dimension(&self) -> usize {
        (**self).dimension()
    }
    fn model(&self) -> &str {
        (**self).model()
    }
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        (**self).embed(texts).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_vectors_names_the_first_violation() {
        assert!(check_vectors(2, 2, &[vec![1.0, 0.0], vec![0.0, 1.0]]).is_ok());
        let count = check_vectors(3, 2, &[vec![1.0, 0.0]]).unwrap_err();
        assert!(matches!(
            count,
            EmbedError::Protocol(ProtocolViolation::WrongCount {
                expected: 3,
                got: 1
            })
        ));
        let dim = check_vectors(2, 2, &[vec![1.0, 0.0], vec![1.0]]).unwrap_err();
        assert!(matches!(
            dim,
            EmbedError::Protocol(ProtocolViolation::WrongDimension {
                index: 1,
                expected: 2,
                got: 1
            })
        ));
        let nan = check_vectors(1, 3, &[vec![1.0, 0.0, f32::NAN]]).unwrap_err();
        assert!(matches!(
            nan,
            EmbedError::Protocol(ProtocolViolation::NonFinite {
                index: 0,
                position: 2
            })
        ));
        assert!(!nan.is_retryable());
    }

    #[test]
    fn the_port_is_object_safe() {
        fn takes(_: &std::sync::Arc<dyn Embedder>) {}
        let _ = takes;
    }
}
