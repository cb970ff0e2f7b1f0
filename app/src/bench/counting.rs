//! Port wrappers that count the calls the coordinator makes, so the report can
//! show metadata round trips and index calls per batch.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use tandem_core::{
    DeleteCommit, DeleteSelector, Distance, IdempotencyRecord, IndexError, IndexGate, IndexQuery,
    Intent, IntentId, MetadataError, MetadataRepo, NewIntent, OwnerToken, Page, Point, PointId,
    PointInfo, RecordId, RowRef, RowWrite, Scope, ScoredPoint, Settlement, StoredRecord,
    UpsertCommit, VectorIndex,
};

/// Calls counted so far. Cheap to read at any time; the runner takes the
/// difference around each pass.
#[derive(Debug, Default)]
pub struct Counters {
    metadata: AtomicU64,
    index: AtomicU64,
}

/// A reading of [`Counters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Calls {
    /// Metadata round trips: port calls (Tandem) or SQL statements (raw, naive).
    pub metadata: u64,
    /// Index calls.
    pub index: u64,
}

impl Calls {
    /// What happened between `earlier` and `self`.
    pub fn since(self, earlier: Calls) -> Calls {
        Calls {
            metadata: self.metadata.saturating_sub(earlier.metadata),
            index: self.index.saturating_sub(earlier.index),
        }
    }
}

impl Counters {
    /// The counts now.
    pub fn read(&self) -> Calls {
        Calls {
            metadata: self.metadata.load(Ordering::Relaxed),
            index: self.index.load(Ordering::Relaxed),
        }
    }

    /// One metadata round trip (a port call, or one SQL statement of a baseline).
    pub fn metadata_call(&self) {
        self.metadata.fetch_add(1, Ordering::Relaxed);
    }

    fn index_call(&self) {
        self.index.fetch_add(1, Ordering::Relaxed);
    }
}

/// A [`MetadataRepo`] that counts every call, then forwards it.
pub struct CountingRepo<M> {
    inner: M,
    counters: Arc<Counters>,
}

impl<M> CountingRepo<M> {
    /// Counts `inner`'s calls into `counters`.
    pub fn new(inner: M, counters: Arc<Counters>) -> Self {
        Self { inner, counters }
    }
}

/// A [`VectorIndex`] that counts every call, then forwards it.
pub struct CountingIndex<V> {
    inner: V,
    counters: Arc<Counters>,
}

impl<V> CountingIndex<V> {
    /// Counts `inner`'s calls into `counters`.
    pub fn new(inner: V, counters: Arc<Counters>) -> Self {
        Self { inner, counters }
    }
}

#[async_trait]
impl<M: MetadataRepo> MetadataRepo for CountingRepo<M> {
    async fn prepare(&self, intent: &NewIntent) -> Result<(), MetadataError> {
        self.counters.metadata_call();
        self.inner.prepare(intent).await
    }
    async fn commit_upsert(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        rows: &[RowWrite],
        idempotency: Option<&IdempotencyRecord>,
    ) -> Result<UpsertCommit, MetadataError> {
        self.counters.metadata_call();
        self.inner
            .commit_upsert(intent, owner, rows, idempotency)
            .await
    }
    async fn commit_upsert_gated(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        rows: &[RowWrite],
        idempotency: Option<&IdempotencyRecord>,
        gate: &IndexGate,
    ) -> Result<UpsertCommit, MetadataError> {
        self.counters.metadata_call();
        self.inner
            .commit_upsert_gated(intent, owner, rows, idempotency, gate)
            .await
    }
    async fn commit_delete(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        selector: &DeleteSelector,
        idempotency: Option<&IdempotencyRecord>,
    ) -> Result<DeleteCommit, MetadataError> {
        self.counters.metadata_call();
        self.inner
            .commit_delete(intent, owner, selector, idempotency)
            .await
    }
    async fn settle(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        fence: OwnerToken,
    ) -> Result<Settlement, MetadataError> {
        self.counters.metadata_call();
        self.inner.settle(intent, owner, fence).await
    }
    async fn resolve(&self, intent: IntentId, owner: OwnerToken) -> Result<bool, MetadataError> {
        self.counters.metadata_call();
        self.inner.resolve(intent, owner).await
    }
    async fn claim_expired(
        &self,
        now_ms: i64,
        owner: OwnerToken,
        lease_deadline_ms: i64,
        limit: usize,
    ) -> Result<Vec<Intent>, MetadataError> {
        self.counters.metadata_call();
        self.inner
            .claim_expired(now_ms, owner, lease_deadline_ms, limit)
            .await
    }
    async fn record_failure(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        message: &str,
    ) -> Result<(), MetadataError> {
        self.counters.metadata_call();
        self.inner.record_failure(intent, owner, message).await
    }
    async fn referenced_points(
        &self,
        points: &[PointId],
    ) -> Result<HashSet<PointId>, MetadataError> {
        self.counters.metadata_call();
        self.inner.referenced_points(points).await
    }
    async fn rows_by_points(&self, points: &[PointId]) -> Result<Vec<StoredRecord>, MetadataError> {
        self.counters.metadata_call();
        self.inner.rows_by_points(points).await
    }
    async fn get(&self, ids: &[RecordId]) -> Result<Vec<StoredRecord>, MetadataError> {
        self.counters.metadata_call();
        self.inner.get(ids).await
    }
    async fn lookup_idempotency(
        &self,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, MetadataError> {
        self.counters.metadata_call();
        self.inner.lookup_idempotency(key).await
    }
    async fn scan_refs(
        &self,
        scope: Option<&Scope>,
        after: Option<RecordId>,
        limit: usize,
    ) -> Result<Page<RowRef, RecordId>, MetadataError> {
        self.counters.metadata_call();
        self.inner.scan_refs(scope, after, limit).await
    }
    async fn list_intents(&self, limit: usize) -> Result<Vec<Intent>, MetadataError> {
        self.counters.metadata_call();
        self.inner.list_intents(limit).await
    }
    async fn count_by_scope(&self) -> Result<BTreeMap<Scope, u64>, MetadataError> {
        self.counters.metadata_call();
        self.inner.count_by_scope().await
    }
}

#[async_trait]
impl<V: VectorIndex> VectorIndex for CountingIndex<V> {
    fn dimension(&self) -> usize {
        self.inner.dimension()
    }
    fn distance(&self) -> Distance {
        self.inner.distance()
    }
    async fn upsert(&self, points: &[Point]) -> Result<(), IndexError> {
        self.counters.index_call();
        self.inner.upsert(points).await
    }
    async fn delete(&self, ids: &[PointId]) -> Result<(), IndexError> {
        self.counters.index_call();
        self.inner.delete(ids).await
    }
    async fn retrieve(&self, ids: &[PointId]) -> Result<Vec<PointInfo>, IndexError> {
        self.counters.index_call();
        self.inner.retrieve(ids).await
    }
    async fn search(&self, query: &IndexQuery) -> Result<Vec<ScoredPoint>, IndexError> {
        self.counters.index_call();
        self.inner.search(query).await
    }
    async fn count(&self, scope: Option<&Scope>) -> Result<u64, IndexError> {
        self.counters.index_call();
        self.inner.count(scope).await
    }
    async fn scroll(
        &self,
        scope: Option<&Scope>,
        offset: Option<PointId>,
        limit: usize,
    ) -> Result<Page<PointInfo, PointId>, IndexError> {
        self.counters.index_call();
        self.inner.scroll(scope, offset, limit).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_adapters::memory::{InMemoryMetadataRepo, InMemoryVectorIndex};
    use tandem_core::{Coordinator, CoordinatorConfig, NewRecord};

    #[tokio::test]
    async fn an_upsert_batch_costs_three_metadata_calls_and_one_index_call() {
        let counters = Arc::new(Counters::default());
        let c = Coordinator::new(
            CountingRepo::new(InMemoryMetadataRepo::new(), counters.clone()),
            CountingIndex::new(
                InMemoryVectorIndex::new(3, Distance::Cosine),
                counters.clone(),
            ),
            CoordinatorConfig::default(),
        )
        .unwrap();
        for n in [1usize, 10, 200] {
            let before = counters.read();
            let batch = (0..n)
                .map(|i| NewRecord::new("s", format!("r{i}"), vec![1.0, i as f32, 0.5]))
                .collect();
            c.upsert(batch).await.unwrap();
            let calls = counters.read().since(before);
            // prepare, commit, resolve; one index upsert (n <= one chunk).
            assert_eq!(
                calls,
                Calls {
                    metadata: 3,
                    index: 1
                },
                "batch of {n}"
            );
        }
    }
}
