//! The generated data set: the same records go to every protocol of a pass.

use serde_json::json;
use tandem_core::{NewRecord, RecordId, Scope};

/// The scope of the `i`-th record of a pass.
pub fn scope_name(i: usize, scopes: usize) -> String {
    format!("bench-{}", i % scopes.max(1))
}

/// A unit vector of `dim` pseudo-random components (never zero, so cosine
/// accepts it).
pub fn vector(rng: &mut fastrand::Rng, dim: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..dim).map(|_| rng.f32() * 2.0 - 1.0).collect();
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    for x in &mut v {
        *x /= norm;
    }
    v[0] += 1e-3; // never exactly zero, whatever the draw
    v
}

/// `n` records with fresh ids (UUIDv7), cut into batches of `batch` records.
/// Deterministic in `seed` except for the ids.
pub fn batches(
    n: usize,
    batch: usize,
    dim: usize,
    scopes: usize,
    seed: u64,
) -> Vec<Vec<NewRecord>> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let records: Vec<NewRecord> = (0..n)
        .map(|i| {
            let item = rng.u32(0..1000);
            NewRecord::new(
                Scope::new(scope_name(i, scopes)),
                format!(
                    "Record {i} of the generated catalog: item {item}, a short product \
                     description of the kind an application embeds and searches."
                ),
                vector(&mut rng, dim),
            )
            .with_id(RecordId::new_v7())
            .with_metadata(json!({ "item": item, "kind": "doc", "lang": "en" }))
        })
        .collect();
    let mut out = Vec::with_capacity(n.div_ceil(batch.max(1)));
    let mut rest = records.into_iter();
    loop {
        let chunk: Vec<NewRecord> = rest.by_ref().take(batch.max(1)).collect();
        if chunk.is_empty() {
            return out;
        }
        out.push(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_every_record_once_with_unit_vectors() {
        let b = batches(25, 10, 8, 3, 1);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), vec![10, 10, 5]);
        let mut ids: Vec<_> = b.iter().flatten().map(|r| r.id.unwrap()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 25);
        for r in b.iter().flatten() {
            assert_eq!(r.vector.len(), 8);
            let norm: f32 = r.vector.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 0.01, "{norm}");
        }
        assert_eq!(b[0][4].scope.as_str(), "bench-1");
    }
}
