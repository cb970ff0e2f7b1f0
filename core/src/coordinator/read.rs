//! The read path: search with the read guard.

use std::collections::HashMap;

use tokio::time::Instant;
use tracing::{Instrument, info_span};

use super::validate::{check_filter, check_scope, check_vector};
use super::{Bug, Coordinator, SearchQuery};
use crate::error::{CoordinatorError, ValidationError};
use crate::model::{Page, PointId, RecordId, Scope, SearchHit, StoredRecord};
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
        self.refresh_if_stale().await?;
        check_vector(
            &query.vector,
            0,
            self.index().dimension(),
            self.index().distance(),
        )?;
        check_filter(&query.filter, &self.config.limits)?;
        let span = info_span!("tandem.search", k = query.k);
        self.search_inner(query).instrument(span).await
    }

    /// The committed records with these ids, as the metadata store (the source
    /// of truth) holds them now; missing ids are omitted. At most
    /// [`Limits::max_batch`](crate::Limits::max_batch) ids per call. Retried
    /// on transient errors under the call deadline, like every read.
    pub async fn get(&self, ids: &[RecordId]) -> Result<Vec<StoredRecord>, CoordinatorError> {
        if ids.is_empty() {
            return Err(ValidationError::Invalid("get needs at least one id".into()).into());
        }
        let max = self.config.limits.max_batch;
        if ids.len() > max {
            return Err(ValidationError::BatchTooLarge {
                len: ids.len(),
                max,
            }
            .into());
        }
        let deadline = Instant::now() + self.config.call_deadline;
        self.metadata_call("metadata.get", deadline, || self.repo.get(ids))
            .instrument(info_span!("tandem.get", ids = ids.len()))
            .await
    }

    /// The ids of the committed records of `scope`, in id order, one page
    /// of at most `limit` (≤ [`Limits::max_batch`](crate::Limits::max_batch))
    /// after `after`; the page's `next` is the `after` of the next page. For
    /// callers that compare a scope with what they wrote (`tandem ingest
    /// --replace-scope`). A page is read in one statement; the pages of a
    /// scope being written meanwhile reflect the writes committed by then.
    pub async fn record_ids(
        &self,
        scope: &Scope,
        after: Option<RecordId>,
        limit: usize,
    ) -> Result<Page<RecordId, RecordId>, CoordinatorError> {
        check_scope(scope, 0, &self.config.limits)?;
        let max = self.config.limits.max_batch;
        if limit == 0 || limit > max {
            return Err(ValidationError::Invalid(format!(
                "the page size must be between 1 and {max}"
            ))
            .into());
        }
        let deadline = Instant::now() + self.config.call_deadline;
        let page = self
            .metadata_call("metadata.scan_refs", deadline, || {
                self.repo.scan_refs(Some(scope), after, limit)
            })
            .instrument(info_span!("tandem.record_ids", limit))
            .await?;
        Ok(Page {
            items: page.items.into_iter().map(|r| r.id).collect(),
            next: page.next,
        })
    }

    async fn search_inner(&self, query: &SearchQuery) -> Result<Vec<SearchHit>, CoordinatorError> {
        let deadline = Instant::now() + self.config.call_deadline;
        let mut fetch = query
            .k
            .saturating_mul(self.config.search_overfetch)
            .min(MAX_FETCH)
            .max(query.k);
        let index = self.index();
        loop {
            let started = Instant::now();
            let index_query = IndexQuery {
                vector: query.vector.clone(),
                limit: fetch,
                filter: query.filter.clone(),
                score_threshold: query.score_threshold,
            };
            let hits = self
                .index_call("index.search", deadline, || index.search(&index_query))
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
