//! Port wrappers that count and time the calls the coordinator makes, so the
//! report can show metadata round trips and index calls per batch, and where a
//! batch's time goes.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use async_trait::async_trait;
use tandem_core::{
    ChangedRow, ConnectionType, DeleteCommit, DeleteSelector, Distance, IdempotencyRecord,
    IndexCatalog, IndexError, IndexFailure, IndexGate, IndexQuery, IndexState, Intent, IntentId,
    MetadataError, MetadataRepo, Migration, MigrationSpec, NewIntent, OwnerToken, Page,
    PendingFilter, PendingIndex, PendingStats, Point, PointId, PointInfo, RecordId, RowRef,
    RowWrite, SagaCounts, SagaId, SagaRecord, SagaState, Scope, ScoredPoint, Settlement,
    StoredRecord, SwitchOutcome, TransactionCommit, TransactionCommitResult, UndoImage,
    UpsertCommit, VectorIndex,
};

/// Calls counted so far. Cheap to read at any time; the runner takes the
/// difference around each pass.
#[derive(Debug, Default)]
pub struct Counters {
    metadata: AtomicU64,
    index: AtomicU64,
    profile: Mutex<Profile>,
}

/// Per kind of call (`metadata.prepare`, `index.upsert`, `sql.commit`, ...):
/// how many ended and their summed wall time in nanoseconds. Calls that
/// overlap (a gated commit and the index write) each count their own time.
pub type Profile = BTreeMap<&'static str, (u64, u64)>;

/// What happened in `now` since `earlier` (both readings of one [`Counters`]).
pub fn profile_since(now: &Profile, earlier: &Profile) -> Profile {
    now.iter()
        .map(|(k, (n, ns))| {
            let (n0, ns0) = earlier.get(k).copied().unwrap_or_default();
            (*k, (n.saturating_sub(n0), ns.saturating_sub(ns0)))
        })
        .filter(|(_, (n, _))| *n > 0)
        .collect()
}

/// Times one call until dropped (so also when its future is dropped early).
pub struct Timed<'a> {
    counters: &'a Counters,
    what: &'static str,
    started: Instant,
}

impl Drop for Timed<'_> {
    fn drop(&mut self) {
        let ns = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let mut p = self
            .counters
            .profile
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let e = p.entry(self.what).or_default();
        e.0 += 1;
        e.1 = e.1.saturating_add(ns);
    }
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

    /// The time spent so far, per kind of call.
    pub fn profile(&self) -> Profile {
        self.profile
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// One metadata round trip (a port call, or one SQL statement of a
    /// baseline) named `what`, timed until the guard drops.
    pub fn metadata_call(&self, what: &'static str) -> Timed<'_> {
        self.metadata.fetch_add(1, Ordering::Relaxed);
        self.timed(what)
    }

    fn index_call(&self, what: &'static str) -> Timed<'_> {
        self.index.fetch_add(1, Ordering::Relaxed);
        self.timed(what)
    }

    fn timed(&self, what: &'static str) -> Timed<'_> {
        Timed {
            counters: self,
            what,
            started: Instant::now(),
        }
    }
}

/// A [`MetadataRepo`] that counts every call, then forwards it.
pub struct CountingRepo<M> {
    inner: M,
    counters: Arc<Counters>,
    /// Whether it reports the inner store's re-indexing
    /// ([`MetadataRepo::reindexing`]).
    reindexing: bool,
}

impl<M> CountingRepo<M> {
    /// Counts `inner`'s calls into `counters`. It reports no re-indexing, so
    /// the coordinator over it never reads the index state (the cases
    /// measure the protocol's calls alone, as before re-indexing existed).
    pub fn new(inner: M, counters: Arc<Counters>) -> Self {
        Self {
            inner,
            counters,
            reindexing: false,
        }
    }

    /// Counts `inner`'s calls into `counters` and reports its re-indexing,
    /// as the coordinator sees the store in an application (the re-indexing
    /// cases).
    pub fn with_reindexing(inner: M, counters: Arc<Counters>) -> Self {
        Self {
            inner,
            counters,
            reindexing: true,
        }
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
        let _t = self.counters.metadata_call("metadata.prepare");
        self.inner.prepare(intent).await
    }
    async fn commit_upsert(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        rows: &[RowWrite],
        idempotency: Option<&IdempotencyRecord>,
    ) -> Result<UpsertCommit, MetadataError> {
        let _t = self.counters.metadata_call("metadata.commit_upsert");
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
        let _t = self.counters.metadata_call("metadata.commit_upsert_gated");
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
        let _t = self.counters.metadata_call("metadata.commit_delete");
        self.inner
            .commit_delete(intent, owner, selector, idempotency)
            .await
    }
    fn commit_step_connection(&self) -> Option<ConnectionType> {
        self.inner.commit_step_connection()
    }
    async fn commit_transaction(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        commit: &TransactionCommit<'_>,
        idempotency: Option<&IdempotencyRecord>,
        gate: &IndexGate,
    ) -> Result<TransactionCommitResult, MetadataError> {
        let _t = self.counters.metadata_call("metadata.commit_transaction");
        self.inner
            .commit_transaction(intent, owner, commit, idempotency, gate)
            .await
    }
    async fn undo_images(&self, intent: IntentId) -> Result<Vec<UndoImage>, MetadataError> {
        let _t = self.counters.metadata_call("metadata.undo_images");
        self.inner.undo_images(intent).await
    }
    async fn saga_save(
        &self,
        saga: &SagaRecord,
        fence: Option<OwnerToken>,
    ) -> Result<Vec<Intent>, MetadataError> {
        let _t = self.counters.metadata_call("metadata.saga_save");
        self.inner.saga_save(saga, fence).await
    }
    async fn saga_claim(
        &self,
        now_ms: i64,
        owner: OwnerToken,
        lease_deadline_ms: i64,
        limit: usize,
    ) -> Result<Vec<SagaRecord>, MetadataError> {
        let _t = self.counters.metadata_call("metadata.saga_claim");
        self.inner
            .saga_claim(now_ms, owner, lease_deadline_ms, limit)
            .await
    }
    async fn saga_take(
        &self,
        id: SagaId,
        owner: OwnerToken,
        lease_deadline_ms: i64,
    ) -> Result<Option<SagaRecord>, MetadataError> {
        let _t = self.counters.metadata_call("metadata.saga_take");
        self.inner.saga_take(id, owner, lease_deadline_ms).await
    }
    async fn saga_get(&self, id: SagaId) -> Result<Option<SagaRecord>, MetadataError> {
        let _t = self.counters.metadata_call("metadata.saga_get");
        self.inner.saga_get(id).await
    }
    async fn saga_list(
        &self,
        state: Option<SagaState>,
        limit: usize,
    ) -> Result<Vec<SagaRecord>, MetadataError> {
        let _t = self.counters.metadata_call("metadata.saga_list");
        self.inner.saga_list(state, limit).await
    }
    async fn saga_counts(&self) -> Result<SagaCounts, MetadataError> {
        let _t = self.counters.metadata_call("metadata.saga_counts");
        self.inner.saga_counts().await
    }
    async fn settle(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        fence: OwnerToken,
    ) -> Result<Settlement, MetadataError> {
        let _t = self.counters.metadata_call("metadata.settle");
        self.inner.settle(intent, owner, fence).await
    }
    async fn settle_unprepared(
        &self,
        intent: &NewIntent,
        owner: OwnerToken,
        fence: OwnerToken,
    ) -> Result<Settlement, MetadataError> {
        let _t = self.counters.metadata_call("metadata.settle_unprepared");
        self.inner.settle_unprepared(intent, owner, fence).await
    }
    async fn resolve(&self, intent: IntentId, owner: OwnerToken) -> Result<bool, MetadataError> {
        let _t = self.counters.metadata_call("metadata.resolve");
        self.inner.resolve(intent, owner).await
    }
    async fn resolve_many(
        &self,
        intents: &[IntentId],
        owner: OwnerToken,
    ) -> Result<usize, MetadataError> {
        let _t = self.counters.metadata_call("metadata.resolve_many");
        self.inner.resolve_many(intents, owner).await
    }
    async fn claim_expired(
        &self,
        now_ms: i64,
        owner: OwnerToken,
        lease_deadline_ms: i64,
        limit: usize,
    ) -> Result<Vec<Intent>, MetadataError> {
        let _t = self.counters.metadata_call("metadata.claim_expired");
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
        let _t = self.counters.metadata_call("metadata.record_failure");
        self.inner.record_failure(intent, owner, message).await
    }
    async fn referenced_points(
        &self,
        points: &[PointId],
    ) -> Result<HashSet<PointId>, MetadataError> {
        let _t = self.counters.metadata_call("metadata.referenced_points");
        self.inner.referenced_points(points).await
    }
    async fn rows_by_points(&self, points: &[PointId]) -> Result<Vec<StoredRecord>, MetadataError> {
        let _t = self.counters.metadata_call("metadata.rows_by_points");
        self.inner.rows_by_points(points).await
    }
    async fn get(&self, ids: &[RecordId]) -> Result<Vec<StoredRecord>, MetadataError> {
        let _t = self.counters.metadata_call("metadata.get");
        self.inner.get(ids).await
    }
    async fn lookup_idempotency(
        &self,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, MetadataError> {
        let _t = self.counters.metadata_call("metadata.lookup_idempotency");
        self.inner.lookup_idempotency(key).await
    }
    async fn scan_refs(
        &self,
        scope: Option<&Scope>,
        after: Option<RecordId>,
        limit: usize,
    ) -> Result<Page<RowRef, RecordId>, MetadataError> {
        let _t = self.counters.metadata_call("metadata.scan_refs");
        self.inner.scan_refs(scope, after, limit).await
    }
    async fn list_intents(&self, limit: usize) -> Result<Vec<Intent>, MetadataError> {
        let _t = self.counters.metadata_call("metadata.list_intents");
        self.inner.list_intents(limit).await
    }
    async fn count_by_scope(&self) -> Result<BTreeMap<Scope, u64>, MetadataError> {
        let _t = self.counters.metadata_call("metadata.count_by_scope");
        self.inner.count_by_scope().await
    }
    fn deferred_indexing(&self) -> bool {
        self.inner.deferred_indexing()
    }
    async fn claim_pending(
        &self,
        now_ms: i64,
        claim: OwnerToken,
        claim_until_ms: i64,
        limit: usize,
    ) -> Result<Vec<PendingIndex>, MetadataError> {
        let _t = self.counters.metadata_call("metadata.claim_pending");
        self.inner
            .claim_pending(now_ms, claim, claim_until_ms, limit)
            .await
    }
    async fn record_index_failure(
        &self,
        claim: OwnerToken,
        entries: &[(RecordId, u64)],
        failure: &IndexFailure,
    ) -> Result<usize, MetadataError> {
        let _t = self.counters.metadata_call("metadata.record_index_failure");
        self.inner
            .record_index_failure(claim, entries, failure)
            .await
    }
    async fn list_pending(
        &self,
        filter: PendingFilter,
        after: Option<RecordId>,
        limit: usize,
    ) -> Result<Vec<PendingIndex>, MetadataError> {
        let _t = self.counters.metadata_call("metadata.list_pending");
        self.inner.list_pending(filter, after, limit).await
    }
    async fn pending_for(&self, ids: &[RecordId]) -> Result<Vec<PendingIndex>, MetadataError> {
        let _t = self.counters.metadata_call("metadata.pending_for");
        self.inner.pending_for(ids).await
    }
    async fn retry_dead(&self, ids: Option<&[RecordId]>) -> Result<u64, MetadataError> {
        let _t = self.counters.metadata_call("metadata.retry_dead");
        self.inner.retry_dead(ids).await
    }
    async fn drop_dead(&self, ids: Option<&[RecordId]>) -> Result<u64, MetadataError> {
        let _t = self.counters.metadata_call("metadata.drop_dead");
        self.inner.drop_dead(ids).await
    }
    async fn pending_stats(&self, now_ms: i64) -> Result<PendingStats, MetadataError> {
        let _t = self.counters.metadata_call("metadata.pending_stats");
        self.inner.pending_stats(now_ms).await
    }
    fn reindexing(&self) -> bool {
        self.reindexing && self.inner.reindexing()
    }
    async fn index_state(&self) -> Result<IndexState, MetadataError> {
        let _t = self.counters.metadata_call("metadata.index_state");
        self.inner.index_state().await
    }
    async fn reindex_begin(
        &self,
        spec: &MigrationSpec,
        owner: OwnerToken,
        now_ms: i64,
        lease_until_ms: i64,
    ) -> Result<IndexState, MetadataError> {
        let _t = self.counters.metadata_call("metadata.reindex_begin");
        self.inner
            .reindex_begin(spec, owner, now_ms, lease_until_ms)
            .await
    }
    async fn reindex_scan(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ChangedRow>, MetadataError> {
        let _t = self.counters.metadata_call("metadata.reindex_scan");
        self.inner.reindex_scan(after, limit).await
    }
    async fn reindex_garbage(&self, limit: usize) -> Result<Vec<PointId>, MetadataError> {
        let _t = self.counters.metadata_call("metadata.reindex_garbage");
        self.inner.reindex_garbage(limit).await
    }
    async fn reindex_progress(
        &self,
        owner: OwnerToken,
        cursor: u64,
        copied: u64,
        garbage: &[PointId],
        vectors: &[tandem_core::StagedVector],
        lease_until_ms: i64,
    ) -> Result<IndexState, MetadataError> {
        let _t = self.counters.metadata_call("metadata.reindex_progress");
        self.inner
            .reindex_progress(owner, cursor, copied, garbage, vectors, lease_until_ms)
            .await
    }
    async fn reindex_freeze(
        &self,
        owner: OwnerToken,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<u64, MetadataError> {
        let _t = self.counters.metadata_call("metadata.reindex_freeze");
        self.inner.reindex_freeze(owner, now_ms, until_ms).await
    }
    async fn reindex_switch(
        &self,
        owner: OwnerToken,
        current: &str,
        now_ms: i64,
    ) -> Result<SwitchOutcome, MetadataError> {
        let _t = self.counters.metadata_call("metadata.reindex_switch");
        self.inner.reindex_switch(owner, current, now_ms).await
    }
    async fn reindex_abort(
        &self,
        owner: Option<OwnerToken>,
    ) -> Result<Option<Migration>, MetadataError> {
        let _t = self.counters.metadata_call("metadata.reindex_abort");
        self.inner.reindex_abort(owner).await
    }
    async fn reindex_forget_retired(&self, name: &str) -> Result<bool, MetadataError> {
        let _t = self
            .counters
            .metadata_call("metadata.reindex_forget_retired");
        self.inner.reindex_forget_retired(name).await
    }
}

/// An [`IndexCatalog`] whose collections count their calls: every index it
/// opens or creates is a [`CountingIndex`] over the adapter's, counted into
/// the same counters (the re-indexing cases' target collections).
pub struct CountingCatalog<C> {
    inner: C,
    counters: Arc<Counters>,
}

impl<C> CountingCatalog<C> {
    /// Counts the calls of `inner`'s collections into `counters`.
    pub fn new(inner: C, counters: Arc<Counters>) -> Self {
        Self { inner, counters }
    }
}

#[async_trait]
impl<C> IndexCatalog for CountingCatalog<C>
where
    C: IndexCatalog,
    C::Index: 'static,
{
    type Index = CountingIndex<Arc<dyn VectorIndex>>;

    async fn open(&self, name: &str) -> Result<Self::Index, IndexError> {
        let index = {
            let _t = self.counters.index_call("index.open");
            self.inner.open(name).await?
        };
        Ok(CountingIndex::new(Arc::new(index), self.counters.clone()))
    }

    async fn create(
        &self,
        name: &str,
        dimension: usize,
        distance: Distance,
    ) -> Result<Self::Index, IndexError> {
        let index = {
            let _t = self.counters.index_call("index.create");
            self.inner.create(name, dimension, distance).await?
        };
        Ok(CountingIndex::new(Arc::new(index), self.counters.clone()))
    }

    async fn drop_collection(&self, name: &str) -> Result<bool, IndexError> {
        let _t = self.counters.index_call("index.drop");
        self.inner.drop_collection(name).await
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
        let _t = self.counters.index_call("index.upsert");
        self.inner.upsert(points).await
    }
    async fn delete(&self, ids: &[PointId]) -> Result<(), IndexError> {
        let _t = self.counters.index_call("index.delete");
        self.inner.delete(ids).await
    }
    async fn retrieve(&self, ids: &[PointId]) -> Result<Vec<PointInfo>, IndexError> {
        let _t = self.counters.index_call("index.retrieve");
        self.inner.retrieve(ids).await
    }
    async fn search(&self, query: &IndexQuery) -> Result<Vec<ScoredPoint>, IndexError> {
        let _t = self.counters.index_call("index.search");
        self.inner.search(query).await
    }
    async fn count(&self, scope: Option<&Scope>) -> Result<u64, IndexError> {
        let _t = self.counters.index_call("index.count");
        self.inner.count(scope).await
    }
    async fn scroll(
        &self,
        scope: Option<&Scope>,
        offset: Option<PointId>,
        limit: usize,
    ) -> Result<Page<PointInfo, PointId>, IndexError> {
        let _t = self.counters.index_call("index.scroll");
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

    #[tokio::test]
    async fn a_rebuild_through_the_counting_wrappers_copies_every_row() {
        use tandem_adapters::memory::InMemoryCatalog;
        use tandem_core::{IndexCatalog, ReindexOptions};

        let counters = Arc::new(Counters::default());
        let catalog: Arc<dyn IndexCatalog<Index = CountingIndex<Arc<dyn VectorIndex>>>> = Arc::new(
            CountingCatalog::new(InMemoryCatalog::new(), counters.clone()),
        );
        let first = catalog.create("a", 3, Distance::Cosine).await.unwrap();
        let c = Coordinator::new(
            CountingRepo::with_reindexing(InMemoryMetadataRepo::new(), counters.clone()),
            first,
            CoordinatorConfig::default(),
        )
        .unwrap()
        .with_catalog(catalog.clone(), "a");
        let batch = (0..25)
            .map(|i| NewRecord::new("s", format!("r{i}"), vec![1.0, i as f32, 0.5]))
            .collect();
        c.upsert(batch).await.unwrap();
        let before = counters.read();
        let report = c.reindex(&ReindexOptions::to("b"), &|_| {}).await.unwrap();
        assert!(report.switched);
        assert_eq!(report.copied, 25);
        let calls = counters.read().since(before);
        assert!(calls.metadata > 0 && calls.index > 0, "{calls:?}");
        let profile = counters.profile();
        assert!(
            profile.contains_key("metadata.reindex_switch"),
            "{profile:?}"
        );
        assert!(profile.contains_key("index.create"), "{profile:?}");
        assert_eq!(
            catalog.open("b").await.unwrap().count(None).await.unwrap(),
            25
        );
        // Without re-indexing reported, the coordinator cannot re-index.
        let plain = Coordinator::new(
            CountingRepo::new(InMemoryMetadataRepo::new(), counters.clone()),
            catalog.create("c", 3, Distance::Cosine).await.unwrap(),
            CoordinatorConfig::default(),
        )
        .unwrap()
        .with_catalog(catalog, "c");
        assert!(
            plain
                .reindex(&ReindexOptions::to("d"), &|_| {})
                .await
                .is_err()
        );
    }
}
