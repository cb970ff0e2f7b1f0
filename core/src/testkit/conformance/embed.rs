//! The [`Embedder`] conformance cases, one per contract bullet.

use crate::embed::Embedder;

/// Texts of distinct words, so that any embedder (the lexical hash one too)
/// gives them different vectors.
fn texts(n: usize) -> Vec<String> {
    const WORDS: [&str; 16] = [
        "red", "wool", "scarf", "running", "shoes", "kitchen", "knife", "garden", "hose", "winter",
        "hat", "steel", "table", "lamp", "paper", "river",
    ];
    (0..n)
        .map(|i| {
            format!(
                "{} {} item{i}",
                WORDS[i % WORDS.len()],
                WORDS[(i / WORDS.len() + 7 * i + 3) % WORDS.len()]
            )
        })
        .collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 {
        return if na == nb { 1.0 } else { 0.0 };
    }
    dot / (na * nb)
}

/// "The same up to float noise" (a model server may batch differently).
const SAME: f32 = 0.999;

async fn embed<E: Embedder + ?Sized>(e: &E, texts: &[String], what: &str) -> Vec<Vec<f32>> {
    match e.embed(texts).await {
        Ok(v) => v,
        Err(err) => panic!("{what}: embed of {} texts failed: {err}", texts.len()),
    }
}

/// Each text of `texts` embedded alone, with a check that they differ (else
/// the order could not be seen).
async fn singles<E: Embedder + ?Sized>(e: &E, texts: &[String]) -> Vec<Vec<f32>> {
    let mut out = Vec::with_capacity(texts.len());
    for t in texts {
        let mut v = embed(e, std::slice::from_ref(t), "a single text").await;
        assert_eq!(v.len(), 1, "one text must give one vector");
        out.push(v.remove(0));
    }
    for i in 0..out.len() {
        for j in 0..i {
            assert!(
                cosine(&out[i], &out[j]) < SAME,
                "texts {:?} and {:?} got the same vector: the order cannot be checked \
                 (give the embedder more dimensions)",
                texts[i],
                texts[j]
            );
        }
    }
    out
}

fn assert_in_order(got: &[Vec<f32>], singles: &[Vec<f32>], texts: &[String]) {
    assert_eq!(got.len(), texts.len(), "one vector per text");
    for (i, (g, s)) in got.iter().zip(singles).enumerate() {
        let c = cosine(g, s);
        assert!(
            c >= SAME,
            "vector #{i} is not the vector of text #{i} {:?} (cosine {c} with it alone)",
            texts[i]
        );
    }
}

/// `describes_itself`: a positive dimension, stable, and a model name.
pub async fn describes_itself<E: Embedder + ?Sized>(e: &E) {
    let dim = e.dimension();
    assert!(dim >= 1, "the dimension must be at least 1");
    assert!(!e.model().is_empty(), "the model must be named");
    let _ = embed(e, &texts(2), "describes_itself").await;
    assert_eq!(e.dimension(), dim, "the dimension changed after a call");
}

/// `embed_returns_one_vector_per_text_in_order`.
pub async fn embed_returns_one_vector_per_text_in_order<E: Embedder + ?Sized>(e: &E) {
    let texts = texts(5);
    let alone = singles(e, &texts).await;
    let got = embed(e, &texts, "five texts").await;
    assert_in_order(&got, &alone, &texts);
    // And reversed: the answer follows the call's order, not some other one.
    let reversed: Vec<String> = texts.iter().rev().cloned().collect();
    let alone_rev: Vec<Vec<f32>> = alone.iter().rev().cloned().collect();
    let got = embed(e, &reversed, "five texts, reversed").await;
    assert_in_order(&got, &alone_rev, &reversed);
}

/// `embed_vectors_have_the_dimension`.
pub async fn embed_vectors_have_the_dimension<E: Embedder + ?Sized>(e: &E) {
    let got = embed(e, &texts(7), "seven texts").await;
    assert_eq!(got.len(), 7);
    for (i, v) in got.iter().enumerate() {
        assert_eq!(
            v.len(),
            e.dimension(),
            "vector #{i} has the wrong dimension"
        );
        assert!(
            v.iter().all(|x| x.is_finite()),
            "vector #{i} has a non-finite component"
        );
    }
}

/// `embed_empty_call_is_empty`.
pub async fn embed_empty_call_is_empty<E: Embedder + ?Sized>(e: &E) {
    let got = embed(e, &[], "no texts").await;
    assert!(got.is_empty(), "no texts must give no vectors");
}

/// `embed_repeated_texts_agree`.
pub async fn embed_repeated_texts_agree<E: Embedder + ?Sized>(e: &E) {
    let t = texts(2);
    let call = vec![t[0].clone(), t[1].clone(), t[0].clone()];
    let got = embed(e, &call, "a repeated text").await;
    assert_eq!(got.len(), 3);
    let c = cosine(&got[0], &got[2]);
    assert!(
        c >= SAME,
        "the same text got different vectors (cosine {c})"
    );
    assert!(
        cosine(&got[0], &got[1]) < SAME,
        "different texts got the same vector"
    );
}

/// `embed_many_texts_keeps_order`: 300 texts, more than one request carries
/// with the default [`BatchLimits`](crate::embed::BatchLimits) (128).
pub async fn embed_many_texts_keeps_order<E: Embedder + ?Sized>(e: &E) {
    let texts = texts(300);
    let got = embed(e, &texts, "300 texts").await;
    assert_eq!(got.len(), texts.len(), "one vector per text");
    // Spot checks against single calls: the first, last and a few between.
    for i in [0, 1, 127, 128, 129, 200, 299] {
        let alone = embed(e, std::slice::from_ref(&texts[i]), "a single text").await;
        let c = cosine(&got[i], &alone[0]);
        assert!(
            c >= SAME,
            "vector #{i} of 300 is not text #{i}'s (cosine {c})"
        );
    }
}
