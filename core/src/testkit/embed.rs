//! Embedders for tests: [`TextVectorEmbedder`], deterministic and
//! model-free, and [`FaultyEmbedder`], which wraps any embedder to fail,
//! delay or break its answers on request and counts its calls.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use crate::embed::Embedder;
use crate::error::EmbedError;

/// A deterministic unit vector for `text` in `dim` dimensions: components
/// drawn from a generator seeded with the text's SHA-256. Different texts get
/// (nearly) orthogonal vectors; the same text always the same one. Used by
/// [`TextVectorEmbedder`] and by the OpenAI-compatible test server.
pub fn text_vector(text: &str, dim: usize) -> Vec<f32> {
    let digest = Sha256::digest(text.as_bytes());
    let mut seed = u64::from_le_bytes(digest[..8].try_into().unwrap_or([0; 8]));
    let mut v: Vec<f32> = (0..dim)
        .map(|_| {
            // SplitMix64: a fixed generator, so vectors never change with a
            // dependency's version.
            seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = seed;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            // Uniform in [-1, 1).
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// An [`Embedder`] of [`text_vector`]s: every text, even an empty one, gets
/// its vector.
#[derive(Clone, Debug)]
pub struct TextVectorEmbedder {
    dim: usize,
}

impl TextVectorEmbedder {
    /// Vectors of `dim` dimensions.
    pub fn new(dim: usize) -> Self {
        Self { dim }
    }
}

#[async_trait]
impl Embedder for TextVectorEmbedder {
    fn dimension(&self) -> usize {
        self.dim
    }
    fn model(&self) -> &str {
        "text-vector"
    }
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        Ok(texts.iter().map(|t| text_vector(t, self.dim)).collect())
    }
}

/// Wraps an embedder: fails chosen calls with chosen errors, delays calls,
/// or drops the last vector of each answer; records each call's size and
/// the most calls in flight at once.
#[derive(Debug)]
pub struct FaultyEmbedder<E> {
    inner: E,
    next_errors: Mutex<VecDeque<EmbedError>>,
    on_call: Mutex<Vec<(usize, Option<EmbedError>)>>,
    delay: Duration,
    drop_last: bool,
    calls: AtomicUsize,
    sizes: Mutex<Vec<usize>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl<E: Embedder> FaultyEmbedder<E> {
    /// Wraps `inner`, with no fault.
    pub fn new(inner: E) -> Self {
        Self {
            inner,
            next_errors: Mutex::new(VecDeque::new()),
            on_call: Mutex::new(Vec::new()),
            delay: Duration::ZERO,
            drop_last: false,
            calls: AtomicUsize::new(0),
            sizes: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        }
    }

    /// Every call first sleeps this long (tokio's clock).
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Every answer loses its last vector (a broken service).
    pub fn dropping_last_vector(mut self) -> Self {
        self.drop_last = true;
        self
    }

    /// The next call not yet failed fails with `error` (queued in order).
    pub fn fail_next(&self, error: EmbedError) {
        lock(&self.next_errors).push_back(error);
    }

    /// Call number `n` (1-based, counting every call) fails with `error`.
    pub fn fail_on_call(&self, n: usize, error: EmbedError) {
        lock(&self.on_call).push((n, Some(error)));
    }

    /// The wrapped embedder.
    pub fn inner(&self) -> &E {
        &self.inner
    }

    /// Calls so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// The number of texts of each call, in the order they started.
    pub fn request_sizes(&self) -> Vec<usize> {
        lock(&self.sizes).clone()
    }

    /// The most calls that were in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl<E: Embedder> Embedder for FaultyEmbedder<E> {
    fn dimension(&self) -> usize {
        self.inner.dimension()
    }
    fn model(&self) -> &str {
        self.inner.model()
    }
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        lock(&self.sizes).push(texts.len());
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let _guard = InFlight(&self.in_flight);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let planned = lock(&self.on_call)
            .iter_mut()
            .find(|(call, e)| *call == n && e.is_some())
            .and_then(|(_, e)| e.take());
        if let Some(e) = planned.or_else(|| lock(&self.next_errors).pop_front()) {
            return Err(e);
        }
        let mut vectors = self.inner.embed(texts).await?;
        if self.drop_last {
            vectors.pop();
        }
        Ok(vectors)
    }
}
