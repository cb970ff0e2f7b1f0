//! The hash embedding: a deterministic, lexical text embedding for trying
//! Tandem out without a model, behind the [`Embedder`] port.
//!
//! Feature hashing ("the hashing trick"): the content is lower-cased and split
//! into words (runs of alphanumeric characters); each word is hashed with
//! XXH3-64; the hash picks a dimension (`h mod dim`) and a sign (the top bit),
//! and the word's count is added there with that sign; the vector is then scaled
//! to unit length. Texts that share words get similar vectors; synonyms and
//! meaning are invisible to it. Real users bring their own vectors, or a model
//! (the `openai` module).

use std::num::NonZeroUsize;

use async_trait::async_trait;
use tandem_core::{EmbedError, Embedder};
use xxhash_rust::xxh3::xxh3_64;

/// The hash embedding of `text` in `dim` dimensions, or `None` when the text
/// has no word (its vector would be all zeros, which has no direction).
pub fn hash_embedding(text: &str, dim: usize) -> Option<Vec<f32>> {
    if dim == 0 {
        return None;
    }
    let mut v = vec![0f32; dim];
    let mut words = 0usize;
    for word in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let h = xxh3_64(word.to_lowercase().as_bytes());
        let slot = (h % dim as u64) as usize;
        let sign = if h >> 63 == 1 { -1.0 } else { 1.0 };
        v[slot] += sign;
        words += 1;
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    // Words can cancel out (same slot, opposite signs): still no direction.
    if words == 0 || norm == 0.0 {
        return None;
    }
    v.iter_mut().for_each(|x| *x /= norm);
    Some(v)
}

/// The message of a text that has no hash embedding.
pub const NO_WORDS: &str = "the text has no hash embedding: its vector is all zeros (no words, or \
                            words that cancel out)";

/// [`hash_embedding`] as an [`Embedder`]. Local, instant and deterministic:
/// it never fails except for a text without words, which is
/// [`EmbedError::InvalidInput`] naming the text.
#[derive(Clone, Debug)]
pub struct HashEmbedder {
    dimension: usize,
}

impl HashEmbedder {
    /// The hash embedding in `dimension` dimensions (the collection's).
    pub fn new(dimension: NonZeroUsize) -> Self {
        Self {
            dimension: dimension.get(),
        }
    }
}

#[async_trait]
impl Embedder for HashEmbedder {
    fn dimension(&self) -> usize {
        self.dimension
    }

    fn model(&self) -> &str {
        "hash"
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                hash_embedding(t, self.dimension).ok_or_else(|| EmbedError::InvalidInput {
                    index: Some(i),
                    message: NO_WORDS.to_owned(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn is_deterministic_unit_length_and_case_blind() {
        let a = hash_embedding("Red wool Scarf", 64).unwrap();
        let b = hash_embedding("red WOOL scarf!", 64).unwrap();
        assert_eq!(a, b);
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn shared_words_score_higher_than_unrelated_text() {
        let q = hash_embedding("wool scarf", 256).unwrap();
        let near = hash_embedding("a warm wool scarf for winter", 256).unwrap();
        let far = hash_embedding("stainless steel kitchen knife", 256).unwrap();
        assert!(cosine(&q, &near) > cosine(&q, &far) + 0.2);
    }

    #[test]
    fn text_without_words_has_no_embedding() {
        assert_eq!(hash_embedding("  ... !!", 16), None);
        assert_eq!(hash_embedding("", 16), None);
        assert_eq!(hash_embedding("word", 0), None);
    }

    #[test]
    fn known_texts_have_pinned_embeddings() {
        // Pinned so that a change of hash function (which would silently
        // invalidate every stored hash vector) fails here.
        assert_eq!(
            hash_embedding("tandem", 8).unwrap(),
            vec![-1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        );
        assert_eq!(
            hash_embedding("Tandem keeps stores consistent", 8).unwrap(),
            vec![-0.5, -0.5, -0.5, 0.0, 0.0, 0.0, -0.5, 0.0]
        );
    }

    #[tokio::test]
    async fn the_embedder_gives_the_pinned_vectors_and_names_a_text_without_words() {
        let e = HashEmbedder::new(NonZeroUsize::new(8).unwrap());
        assert_eq!((e.dimension(), e.model()), (8, "hash"));
        let texts = vec!["tandem".to_owned(), "Tandem keeps stores consistent".into()];
        assert_eq!(
            e.embed(&texts).await.unwrap(),
            vec![
                vec![-1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                vec![-0.5, -0.5, -0.5, 0.0, 0.0, 0.0, -0.5, 0.0]
            ]
        );
        let err = e
            .embed(&["words".to_owned(), "...".into()])
            .await
            .unwrap_err();
        match err {
            EmbedError::InvalidInput { index, message } => {
                assert_eq!(index, Some(1));
                assert!(message.contains("all zeros"), "{message}");
            }
            other => panic!("expected InvalidInput, got {other}"),
        }
    }
}
