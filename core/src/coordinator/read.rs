//! The read path: search with the read guard.

use std::collections::HashMap;

use tokio::time::Instant;
use tracing::{Instrument, info_span};

use super::validate::{check_filter, check_vector};
use super::{Bug, Coordinator, SearchQuery};
use crate::error::{CoordinatorError, ValidationError};
use crate::model::{PointId, SearchHit, StoredRecord};
use crate::ports::{IndexQuery, MetadataRepo, VectorIndex};

/// The most candidates one search asks the index for.
const MAX_FETCH: usize = 10_000;

impl<M: MetadataRepo, V: VectorIndex> Coordinator<M, V> {
    /// The `k` nearest committed, current records.
    ///
    /// Queries the index (over-fetching), then keeps only hits whose point is the
    /// one a committed row references now — so a search never returns a record
    /// that is uncommitted, rolled back, deleted or superseded, even before
    /// recovery has run. If too many candidates were filtered out it asks the
    /// index again for more.
    pub async fn search(&self, query: &SearchQuery) -> Result<Vec<SearchHit>, CoordinatorError> {
        if query.k == 0 {
            return Err(ValidationError::Invalid("k must be at least 1".into()).into());
        }
        check_vector(
            &query.vector,
            0,
            self.index.dimension(),
            self.index.distance(),
        )?;
        check_filter(&query.filter, &self.config.limits)?;
        let span = info_span!("tandem.search", k = query.k);
        self.search_inner(query).instrument(span).await
    }

    async fn search_inner(&self, query: &SearchQuery) -> Result<Vec<SearchHit>, CoordinatorError> {
        let deadline = Instant::now() + self.config.call_deadline;
        let mut fetch = query
            .k
            .saturating_mul(self.config.search_overfetch)
            .min(MAX_FETCH)
            .max(query.k);
        loop {
            let started = Instant::now();
            let index_query = IndexQuery {
                vector: query.vector.clone(),
                limit: fetch,
                filter: query.filter.clone(),
                score_threshold: query.score_threshold,
            };
            let hits = self
                .index_call("index.search", deadline, || self.index.search(&index_query))
                .await?;
            metrics::histogram!("tandem_phase_seconds", "op" => "search", "phase" => "index")
                .record(started.elapsed().as_secs_f64());
            let exhausted = hits.len() < fetch;
            let points: Vec<PointId> = hits.iter().map(|h| h.id).collect();

            let started = Instant::now();
            let rows: HashMap<PointId, StoredRecord> = if self.bug(Bug::UnguardedSearch) {
                let ids: Vec<_> = hits.iter().map(|h| h.record_id).collect();
                let by_id: HashMap<_, _> = self
                    .metadata_call("metadata.get", deadline, || self.repo.get(&ids))
                    .await?
                    .into_iter()
                    .map(|r| (r.id, r))
                    .collect();
                hits.iter()
                    .filter_map(|h| {
                        by_id.get(&h.record_id).map(|r| {
                            let record = StoredRecord {
                                point_id: h.id,
                                ..r.clone()
                            };
                            (h.id, record)
                        })
                    })
                    .collect()
            } else {
                self.metadata_call("metadata.rows_by_points", deadline, || {
                    self.repo.rows_by_points(&points)
                })
                .await?
                .into_iter()
                .map(|r| (r.point_id, r))
                .collect()
            };
            metrics::histogram!("tandem_phase_seconds", "op" => "search", "phase" => "guard")
                .record(started.elapsed().as_secs_f64());

            let mut out = Vec::with_capacity(query.k);
            for h in &hits {
                if let Some(record) = rows.get(&h.id)
                    && query.filter.matches(&record.scope, &record.metadata)
                {
                    out.push(SearchHit {
                        record: record.clone(),
                        score: h.score,
                    });
                    if out.len() == query.k {
                        break;
                    }
                }
            }
            if out.len() == query.k || exhausted || fetch >= MAX_FETCH {
                return Ok(out);
            }
            fetch = fetch.saturating_mul(4).min(MAX_FETCH);
        }
    }
}
