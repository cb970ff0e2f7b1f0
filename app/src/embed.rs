//! The hash embedding: a deterministic, lexical text embedding for trying
//! Tandem out without a model.
//!
//! Feature hashing ("the hashing trick"): the content is lower-cased and split
//! into words (runs of alphanumeric characters); each word is hashed with
//! XXH3-64; the hash picks a dimension (`h mod dim`) and a sign (the top bit),
//! and the word's count is added there with that sign; the vector is then scaled
//! to unit length. Texts that share words get similar vectors; synonyms and
//! meaning are invisible to it. Real users bring their own vectors.

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
}
