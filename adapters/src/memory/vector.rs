//! [`InMemoryVectorIndex`]: an exact (brute-force) vector index in process memory.

use std::collections::{BTreeMap, HashSet};
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use tandem_core::{
    Distance, IndexError, IndexQuery, Page, Point, PointId, PointInfo, Scope, ScoredPoint,
    VectorIndex,
};

/// A [`VectorIndex`] that keeps points in memory and searches exhaustively.
///
/// Scores follow the port: cosine similarity for [`Distance::Cosine`], the dot
/// product for [`Distance::Dot`], and the *negated* Euclidean distance for
/// [`Distance::Euclid`], so that higher is better for all three. Search is exact,
/// which makes it a reference for what approximate backends should return.
/// `scroll` lists points in point id order.
#[derive(Debug)]
pub struct InMemoryVectorIndex {
    dimension: usize,
    distance: Distance,
    points: Mutex<BTreeMap<PointId, Point>>,
}

impl InMemoryVectorIndex {
    /// An empty index of vectors of `dimension` components, compared by `distance`.
    pub fn new(dimension: usize, distance: Distance) -> Self {
        Self {
            dimension,
            distance,
            points: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<PointId, Point>> {
        // Writes validate the whole batch before touching the map, so a poisoned
        // lock still guards a consistent map.
        self.points.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn check_vector(&self, what: &str, vector: &[f32]) -> Result<(), IndexError> {
        if vector.len() != self.dimension {
            return Err(invalid(format!(
                "{what}: vector has dimension {}; the collection expects {}",
                vector.len(),
                self.dimension
            )));
        }
        if let Some(position) = vector.iter().position(|x| !x.is_finite()) {
            return Err(invalid(format!(
                "{what}: vector component {position} is not finite"
            )));
        }
        Ok(())
    }
}

fn invalid(message: String) -> IndexError {
    IndexError::InvalidInput {
        message,
        source: None,
    }
}

fn info(point: &Point) -> PointInfo {
    PointInfo {
        id: point.id,
        record_id: point.record_id,
        scope: point.scope.clone(),
        written_at_ms: point.written_at_ms,
    }
}

/// The score of `candidate` for `query` under `distance` (higher is better).
/// Accumulates in `f64` so that near-ties order the same way as a reference
/// computation would.
pub(crate) fn score(distance: Distance, query: &[f32], candidate: &[f32]) -> f32 {
    let pairs = query
        .iter()
        .zip(candidate)
        .map(|(&a, &b)| (f64::from(a), f64::from(b)));
    let value = match distance {
        Distance::Dot => pairs.map(|(a, b)| a * b).sum::<f64>(),
        Distance::Euclid => -pairs.map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt(),
        Distance::Cosine => {
            let (dot, qq, cc) = pairs.fold((0.0, 0.0, 0.0), |(dot, qq, cc), (a, b)| {
                (dot + a * b, qq + a * a, cc + b * b)
            });
            let norms = qq.sqrt() * cc.sqrt();
            // A zero vector has no direction; like an index that normalises on
            // write, it is orthogonal to everything.
            if norms == 0.0 { 0.0 } else { dot / norms }
        }
    };
    value as f32
}

#[async_trait]
impl VectorIndex for InMemoryVectorIndex {
    fn dimension(&self) -> usize {
        self.dimension
    }

    fn distance(&self) -> Distance {
        self.distance
    }

    async fn upsert(&self, points: &[Point]) -> Result<(), IndexError> {
        // Validate the whole batch first: a rejected batch writes nothing.
        for (index, point) in points.iter().enumerate() {
            self.check_vector(&format!("point #{index} ({})", point.id), &point.vector)?;
        }
        let mut map = self.lock();
        for point in points {
            map.insert(point.id, point.clone());
        }
        Ok(())
    }

    async fn delete(&self, ids: &[PointId]) -> Result<(), IndexError> {
        let mut map = self.lock();
        for id in ids {
            map.remove(id);
        }
        Ok(())
    }

    async fn retrieve(&self, ids: &[PointId]) -> Result<Vec<PointInfo>, IndexError> {
        let map = self.lock();
        let mut seen = HashSet::new();
        Ok(ids
            .iter()
            .filter(|id| seen.insert(**id))
            .filter_map(|id| map.get(id).map(info))
            .collect())
    }

    async fn search(&self, query: &IndexQuery) -> Result<Vec<ScoredPoint>, IndexError> {
        self.check_vector("query", &query.vector)?;
        let map = self.lock();
        let mut hits: Vec<ScoredPoint> = map
            .values()
            .filter(|p| query.filter.matches(&p.scope, &p.metadata))
            .map(|p| ScoredPoint {
                id: p.id,
                record_id: p.record_id,
                score: score(self.distance, &query.vector, &p.vector),
            })
            .filter(|hit| query.score_threshold.is_none_or(|t| hit.score >= t))
            .collect();
        drop(map);
        // Best first; equal scores in point id order so results are reproducible.
        hits.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.id.cmp(&b.id)));
        hits.truncate(query.limit);
        Ok(hits)
    }

    async fn count(&self, scope: Option<&Scope>) -> Result<u64, IndexError> {
        let map = self.lock();
        let count = match scope {
            None => map.len(),
            Some(scope) => map.values().filter(|p| &p.scope == scope).count(),
        };
        Ok(count as u64)
    }

    async fn scroll(
        &self,
        scope: Option<&Scope>,
        offset: Option<PointId>,
        limit: usize,
    ) -> Result<Page<PointInfo, PointId>, IndexError> {
        if limit == 0 {
            // An empty page would either end the listing early or never advance it.
            return Err(invalid("scroll: limit must be at least 1".to_owned()));
        }
        let map = self.lock();
        let start = offset.map_or(Bound::Unbounded, Bound::Included);
        let mut matching = map
            .range((start, Bound::Unbounded))
            .map(|(_, p)| p)
            .filter(|p| scope.is_none_or(|s| &p.scope == s));
        let items: Vec<PointInfo> = matching.by_ref().take(limit).map(info).collect();
        let next = matching.next().map(|p| p.id);
        Ok(Page { items, next })
    }
}
