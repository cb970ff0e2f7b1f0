//! The coordinator's call order and decisions, against mockall mocks of both
//! ports: every expected port call is declared (in a strict `Sequence` where the
//! order matters), and every call the protocol forbids is declared `.times(0)`
//! or simply not declared (mockall panics on any undeclared call).
//!
//! Time is paused (`start_paused`), so backoff sleeps and deadlines are instant.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::error::Error as _;

use async_trait::async_trait;
use futures::FutureExt;
use mockall::{Sequence, mock};
use serde_json::{Value, json};
use tandem_core::{
    BoxError, CommitPart, CommitStep, CommitSummary, ConnectionType, Coordinator,
    CoordinatorConfig, CoordinatorError, DeleteCommit, DeleteSelector, Distance, Filter,
    IdempotencyRecord, IndexError, IndexGate, IndexQuery, Intent, IntentId, IntentKind,
    IntentState, MetadataError, MetadataRepo, NewIntent, NewRecord, Outcome, OwnerToken, Page,
    Point, PointId, PointInfo, RecordId, RetryPolicy, RowRef, RowWrite, SagaContext,
    SagaDefinition, SagaFence, SagaId, SagaRecord, SagaState, Scope, ScoredPoint, SearchQuery,
    Settlement, SqlStep, StepDefinition, StepKind, StepState, StoredRecord, Transaction,
    TransactionCommit, TransactionCommitResult, UndoImage, UpsertCommit, ValidationError,
    VectorIndex, WriteOptions,
};

// mockall cannot mock an async_trait method taking `Option<&T>` (the argument's
// lifetime gets tied to `&self`), so each mock implements a mirror of its port
// with those options owned, and the port is implemented for the mock by
// forwarding. Every other argument is passed through as is, except a
// transaction's commit (owned as a `TxCommit`) and its index gate (awaited by
// the forwarding, as the trait's default `commit_upsert_gated` does).

/// A [`TransactionCommit`] owned, as the mirror passes it to the mock.
#[derive(Clone)]
struct TxCommit {
    parts: Vec<CommitPart>,
    step: Option<Arc<dyn CommitStep>>,
    hold: bool,
    saga: Option<SagaFence>,
}

impl TxCommit {
    fn of(commit: &TransactionCommit<'_>) -> Self {
        Self {
            parts: commit.parts.to_vec(),
            step: commit.step.clone(),
            hold: commit.hold,
            saga: commit.saga,
        }
    }
}

impl std::fmt::Debug for TxCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxCommit")
            .field("parts", &self.parts)
            .field("step", &self.step.as_ref().map(|s| s.connection()))
            .field("hold", &self.hold)
            .field("saga", &self.saga)
            .finish()
    }
}

/// [`MetadataRepo`] with owned optional arguments.
#[async_trait]
trait RepoCalls {
    async fn prepare(&self, intent: &NewIntent) -> Result<(), MetadataError>;
    async fn commit_upsert(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        rows: &[RowWrite],
        idempotency: Option<IdempotencyRecord>,
    ) -> Result<UpsertCommit, MetadataError>;
    async fn commit_delete(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        selector: &DeleteSelector,
        idempotency: Option<IdempotencyRecord>,
    ) -> Result<DeleteCommit, MetadataError>;
    async fn settle(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        fence: OwnerToken,
    ) -> Result<Settlement, MetadataError>;
    async fn resolve(&self, intent: IntentId, owner: OwnerToken) -> Result<bool, MetadataError>;
    async fn resolve_many(
        &self,
        intents: &[IntentId],
        owner: OwnerToken,
    ) -> Result<usize, MetadataError>;
    async fn claim_expired(
        &self,
        now_ms: i64,
        owner: OwnerToken,
        lease_deadline_ms: i64,
        limit: usize,
    ) -> Result<Vec<Intent>, MetadataError>;
    async fn record_failure(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        message: &str,
    ) -> Result<(), MetadataError>;
    async fn referenced_points(
        &self,
        points: &[PointId],
    ) -> Result<HashSet<PointId>, MetadataError>;
    async fn rows_by_points(&self, points: &[PointId]) -> Result<Vec<StoredRecord>, MetadataError>;
    async fn get(&self, ids: &[RecordId]) -> Result<Vec<StoredRecord>, MetadataError>;
    async fn lookup_idempotency(
        &self,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, MetadataError>;
    async fn scan_refs(
        &self,
        scope: Option<Scope>,
        after: Option<RecordId>,
        limit: usize,
    ) -> Result<Page<RowRef, RecordId>, MetadataError>;
    async fn list_intents(&self, limit: usize) -> Result<Vec<Intent>, MetadataError>;
    async fn count_by_scope(&self) -> Result<BTreeMap<Scope, u64>, MetadataError>;
    fn commit_step_connection(&self) -> Option<ConnectionType>;
    async fn commit_transaction(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        commit: TxCommit,
        idempotency: Option<IdempotencyRecord>,
    ) -> Result<TransactionCommitResult, MetadataError>;
    async fn undo_images(&self, intent: IntentId) -> Result<Vec<UndoImage>, MetadataError>;
    async fn saga_save(
        &self,
        saga: &SagaRecord,
        fence: Option<OwnerToken>,
    ) -> Result<Vec<Intent>, MetadataError>;
}

mock! {
    Repo {}
    #[async_trait]
    impl RepoCalls for Repo {
        async fn prepare(&self, intent: &NewIntent) -> Result<(), MetadataError>;
        async fn commit_upsert(
            &self,
            intent: IntentId,
            owner: OwnerToken,
            rows: &[RowWrite],
            idempotency: Option<IdempotencyRecord>,
        ) -> Result<UpsertCommit, MetadataError>;
        async fn commit_delete(
            &self,
            intent: IntentId,
            owner: OwnerToken,
            selector: &DeleteSelector,
            idempotency: Option<IdempotencyRecord>,
        ) -> Result<DeleteCommit, MetadataError>;
        async fn settle(
            &self,
            intent: IntentId,
            owner: OwnerToken,
            fence: OwnerToken,
        ) -> Result<Settlement, MetadataError>;
        async fn resolve(&self, intent: IntentId, owner: OwnerToken) -> Result<bool, MetadataError>;
        async fn resolve_many(
            &self,
            intents: &[IntentId],
            owner: OwnerToken,
        ) -> Result<usize, MetadataError>;
        async fn claim_expired(
            &self,
            now_ms: i64,
            owner: OwnerToken,
            lease_deadline_ms: i64,
            limit: usize,
        ) -> Result<Vec<Intent>, MetadataError>;
        async fn record_failure(
            &self,
            intent: IntentId,
            owner: OwnerToken,
            message: &str,
        ) -> Result<(), MetadataError>;
        async fn referenced_points(
            &self,
            points: &[PointId],
        ) -> Result<HashSet<PointId>, MetadataError>;
        async fn rows_by_points(
            &self,
            points: &[PointId],
        ) -> Result<Vec<StoredRecord>, MetadataError>;
        async fn get(&self, ids: &[RecordId]) -> Result<Vec<StoredRecord>, MetadataError>;
        async fn lookup_idempotency(
            &self,
            key: &str,
        ) -> Result<Option<IdempotencyRecord>, MetadataError>;
        async fn scan_refs(
            &self,
            scope: Option<Scope>,
            after: Option<RecordId>,
            limit: usize,
        ) -> Result<Page<RowRef, RecordId>, MetadataError>;
        async fn list_intents(&self, limit: usize) -> Result<Vec<Intent>, MetadataError>;
        async fn count_by_scope(&self) -> Result<BTreeMap<Scope, u64>, MetadataError>;
        fn commit_step_connection(&self) -> Option<ConnectionType>;
        async fn commit_transaction(
            &self,
            intent: IntentId,
            owner: OwnerToken,
            commit: TxCommit,
            idempotency: Option<IdempotencyRecord>,
        ) -> Result<TransactionCommitResult, MetadataError>;
        async fn undo_images(&self, intent: IntentId) -> Result<Vec<UndoImage>, MetadataError>;
        async fn saga_save(
            &self,
            saga: &SagaRecord,
            fence: Option<OwnerToken>,
        ) -> Result<Vec<Intent>, MetadataError>;
    }
}

#[async_trait]
impl MetadataRepo for MockRepo {
    async fn prepare(&self, intent: &NewIntent) -> Result<(), MetadataError> {
        RepoCalls::prepare(self, intent).await
    }
    async fn commit_upsert(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        rows: &[RowWrite],
        idempotency: Option<&IdempotencyRecord>,
    ) -> Result<UpsertCommit, MetadataError> {
        RepoCalls::commit_upsert(self, intent, owner, rows, idempotency.cloned()).await
    }
    async fn commit_delete(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        selector: &DeleteSelector,
        idempotency: Option<&IdempotencyRecord>,
    ) -> Result<DeleteCommit, MetadataError> {
        RepoCalls::commit_delete(self, intent, owner, selector, idempotency.cloned()).await
    }
    async fn settle(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        fence: OwnerToken,
    ) -> Result<Settlement, MetadataError> {
        RepoCalls::settle(self, intent, owner, fence).await
    }
    async fn resolve(&self, intent: IntentId, owner: OwnerToken) -> Result<bool, MetadataError> {
        RepoCalls::resolve(self, intent, owner).await
    }
    async fn resolve_many(
        &self,
        intents: &[IntentId],
        owner: OwnerToken,
    ) -> Result<usize, MetadataError> {
        RepoCalls::resolve_many(self, intents, owner).await
    }
    async fn claim_expired(
        &self,
        now_ms: i64,
        owner: OwnerToken,
        lease_deadline_ms: i64,
        limit: usize,
    ) -> Result<Vec<Intent>, MetadataError> {
        RepoCalls::claim_expired(self, now_ms, owner, lease_deadline_ms, limit).await
    }
    async fn record_failure(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        message: &str,
    ) -> Result<(), MetadataError> {
        RepoCalls::record_failure(self, intent, owner, message).await
    }
    async fn referenced_points(
        &self,
        points: &[PointId],
    ) -> Result<HashSet<PointId>, MetadataError> {
        RepoCalls::referenced_points(self, points).await
    }
    async fn rows_by_points(&self, points: &[PointId]) -> Result<Vec<StoredRecord>, MetadataError> {
        RepoCalls::rows_by_points(self, points).await
    }
    async fn get(&self, ids: &[RecordId]) -> Result<Vec<StoredRecord>, MetadataError> {
        RepoCalls::get(self, ids).await
    }
    async fn lookup_idempotency(
        &self,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, MetadataError> {
        RepoCalls::lookup_idempotency(self, key).await
    }
    async fn scan_refs(
        &self,
        scope: Option<&Scope>,
        after: Option<RecordId>,
        limit: usize,
    ) -> Result<Page<RowRef, RecordId>, MetadataError> {
        RepoCalls::scan_refs(self, scope.cloned(), after, limit).await
    }
    async fn list_intents(&self, limit: usize) -> Result<Vec<Intent>, MetadataError> {
        RepoCalls::list_intents(self, limit).await
    }
    async fn count_by_scope(&self) -> Result<BTreeMap<Scope, u64>, MetadataError> {
        RepoCalls::count_by_scope(self).await
    }
    fn commit_step_connection(&self) -> Option<ConnectionType> {
        RepoCalls::commit_step_connection(self)
    }
    async fn commit_transaction(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        commit: &TransactionCommit<'_>,
        idempotency: Option<&IdempotencyRecord>,
        gate: &IndexGate,
    ) -> Result<TransactionCommitResult, MetadataError> {
        // A store that keeps no transaction open while the index is written
        // (the memory store): wait for the write's decision, then commit.
        if !gate.wait().await {
            return Err(MetadataError::Aborted { intent });
        }
        RepoCalls::commit_transaction(
            self,
            intent,
            owner,
            TxCommit::of(commit),
            idempotency.cloned(),
        )
        .await
    }
    async fn undo_images(&self, intent: IntentId) -> Result<Vec<UndoImage>, MetadataError> {
        RepoCalls::undo_images(self, intent).await
    }
    async fn saga_save(
        &self,
        saga: &SagaRecord,
        fence: Option<OwnerToken>,
    ) -> Result<Vec<Intent>, MetadataError> {
        RepoCalls::saga_save(self, saga, fence).await
    }
}

/// [`VectorIndex`] with owned optional arguments.
#[async_trait]
trait IndexCalls {
    fn dimension(&self) -> usize;
    fn distance(&self) -> Distance;
    async fn upsert(&self, points: &[Point]) -> Result<(), IndexError>;
    async fn delete(&self, ids: &[PointId]) -> Result<(), IndexError>;
    async fn retrieve(&self, ids: &[PointId]) -> Result<Vec<PointInfo>, IndexError>;
    async fn search(&self, query: &IndexQuery) -> Result<Vec<ScoredPoint>, IndexError>;
    async fn count(&self, scope: Option<Scope>) -> Result<u64, IndexError>;
    async fn scroll(
        &self,
        scope: Option<Scope>,
        offset: Option<PointId>,
        limit: usize,
    ) -> Result<Page<PointInfo, PointId>, IndexError>;
}

mock! {
    Index {}
    #[async_trait]
    impl IndexCalls for Index {
        fn dimension(&self) -> usize;
        fn distance(&self) -> Distance;
        async fn upsert(&self, points: &[Point]) -> Result<(), IndexError>;
        async fn delete(&self, ids: &[PointId]) -> Result<(), IndexError>;
        async fn retrieve(&self, ids: &[PointId]) -> Result<Vec<PointInfo>, IndexError>;
        async fn search(&self, query: &IndexQuery) -> Result<Vec<ScoredPoint>, IndexError>;
        async fn count(&self, scope: Option<Scope>) -> Result<u64, IndexError>;
        async fn scroll(
            &self,
            scope: Option<Scope>,
            offset: Option<PointId>,
            limit: usize,
        ) -> Result<Page<PointInfo, PointId>, IndexError>;
    }
}

#[async_trait]
impl VectorIndex for MockIndex {
    fn dimension(&self) -> usize {
        IndexCalls::dimension(self)
    }
    fn distance(&self) -> Distance {
        IndexCalls::distance(self)
    }
    async fn upsert(&self, points: &[Point]) -> Result<(), IndexError> {
        IndexCalls::upsert(self, points).await
    }
    async fn delete(&self, ids: &[PointId]) -> Result<(), IndexError> {
        IndexCalls::delete(self, ids).await
    }
    async fn retrieve(&self, ids: &[PointId]) -> Result<Vec<PointInfo>, IndexError> {
        IndexCalls::retrieve(self, ids).await
    }
    async fn search(&self, query: &IndexQuery) -> Result<Vec<ScoredPoint>, IndexError> {
        IndexCalls::search(self, query).await
    }
    async fn count(&self, scope: Option<&Scope>) -> Result<u64, IndexError> {
        IndexCalls::count(self, scope.cloned()).await
    }
    async fn scroll(
        &self,
        scope: Option<&Scope>,
        offset: Option<PointId>,
        limit: usize,
    ) -> Result<Page<PointInfo, PointId>, IndexError> {
        IndexCalls::scroll(self, scope.cloned(), offset, limit).await
    }
}

/// The index mock, except that `upsert` never returns once the mock has seen
/// the call: a write still in flight when the call's deadline passes. (mockall's
/// async expectations return immediately, so hanging needs this wrapper.)
struct HangingUpsert(MockIndex);

#[async_trait]
impl VectorIndex for HangingUpsert {
    fn dimension(&self) -> usize {
        VectorIndex::dimension(&self.0)
    }
    fn distance(&self) -> Distance {
        VectorIndex::distance(&self.0)
    }
    async fn upsert(&self, points: &[Point]) -> Result<(), IndexError> {
        VectorIndex::upsert(&self.0, points).await?;
        std::future::pending().await
    }
    async fn delete(&self, ids: &[PointId]) -> Result<(), IndexError> {
        VectorIndex::delete(&self.0, ids).await
    }
    async fn retrieve(&self, ids: &[PointId]) -> Result<Vec<PointInfo>, IndexError> {
        VectorIndex::retrieve(&self.0, ids).await
    }
    async fn search(&self, query: &IndexQuery) -> Result<Vec<ScoredPoint>, IndexError> {
        VectorIndex::search(&self.0, query).await
    }
    async fn count(&self, scope: Option<&Scope>) -> Result<u64, IndexError> {
        VectorIndex::count(&self.0, scope).await
    }
    async fn scroll(
        &self,
        scope: Option<&Scope>,
        offset: Option<PointId>,
        limit: usize,
    ) -> Result<Page<PointInfo, PointId>, IndexError> {
        VectorIndex::scroll(&self.0, scope, offset, limit).await
    }
}

const DIM: usize = 3;

/// A value a mock closure captures for the test (or a later closure) to read.
struct Slot<T>(Arc<Mutex<Option<T>>>);

impl<T> Clone for Slot<T> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<T: Clone> Slot<T> {
    fn new() -> Self {
        Self(Arc::new(Mutex::new(None)))
    }
    fn set(&self, value: T) {
        *self.0.lock().unwrap() = Some(value);
    }
    fn get(&self) -> T {
        self.0
            .lock()
            .unwrap()
            .clone()
            .expect("the mock was not called yet")
    }
}

/// Small backoff so that retries stay well inside every deadline.
fn config() -> CoordinatorConfig {
    CoordinatorConfig {
        retry: RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(10),
        },
        ..CoordinatorConfig::default()
    }
}

fn index_mock() -> MockIndex {
    let mut index = MockIndex::new();
    // The collection's shape is configuration, read for validation; it is not a
    // call into the store.
    index.expect_dimension().return_const(DIM);
    index.expect_distance().return_const(Distance::Cosine);
    index
}

fn coordinator<V: VectorIndex>(repo: MockRepo, index: V) -> Coordinator<MockRepo, V> {
    Coordinator::new(repo, index, config()).unwrap()
}

fn record(n: u8) -> NewRecord {
    NewRecord::new("catalog", format!("doc {n}"), vec![1.0, f32::from(n), 0.5])
        .with_id(RecordId::new_v7())
        .with_metadata(json!({ "n": n }))
}

fn intent_row(
    id: IntentId,
    state: IntentState,
    owner: OwnerToken,
    point_ids: Vec<PointId>,
    summary: Option<CommitSummary>,
) -> Intent {
    Intent {
        id,
        kind: IntentKind::Upsert,
        state,
        owner,
        lease_deadline_ms: 0,
        point_ids,
        summary,
        attempts: 0,
        last_error: None,
        created_ms: 0,
    }
}

fn stored(point_id: PointId, scope: &str) -> StoredRecord {
    StoredRecord {
        id: RecordId::new_v7(),
        scope: Scope::new(scope),
        content: "c".into(),
        metadata: serde_json::Map::new(),
        point_id,
        version: 1,
        vector: None,
    }
}

fn hit(id: PointId, score: f32) -> ScoredPoint {
    ScoredPoint {
        id,
        record_id: RecordId::new_v7(),
        score,
    }
}

fn points(n: usize) -> Vec<PointId> {
    (0..n).map(|_| PointId::new_v7()).collect()
}

fn summary(inserted: u64, updated: u64, deleted: u64) -> CommitSummary {
    CommitSummary {
        inserted,
        updated,
        deleted,
    }
}

/// Expects `prepare` (in `seq`) and captures the intent it was given.
fn expect_prepare(repo: &mut MockRepo, seq: &mut Sequence) -> Slot<NewIntent> {
    let slot = Slot::new();
    let s = slot.clone();
    repo.expect_prepare()
        .times(1)
        .in_sequence(seq)
        .returning(move |i| {
            s.set(i.clone());
            Ok(())
        });
    slot
}

/// Expects one successful `index.upsert` (in `seq`) of exactly the prepared
/// points, and captures the points written.
fn expect_index_write(
    index: &mut MockIndex,
    seq: &mut Sequence,
    prepared: &Slot<NewIntent>,
) -> Slot<Vec<Point>> {
    let slot = Slot::new();
    let s = slot.clone();
    let p = prepared.clone();
    index
        .expect_upsert()
        .times(1)
        .in_sequence(seq)
        .withf(move |pts| pts.iter().map(|x| x.id).collect::<Vec<_>>() == p.get().point_ids)
        .returning(move |pts| {
            s.set(pts.to_vec());
            Ok(())
        });
    slot
}

/// Expects `resolve` (in `seq`) of the prepared intent under the owner `owner`
/// returns (read when the call happens).
fn expect_resolve(
    repo: &mut MockRepo,
    seq: &mut Sequence,
    prepared: &Slot<NewIntent>,
    owner: impl Fn() -> OwnerToken + Send + 'static,
) {
    let p = prepared.clone();
    repo.expect_resolve()
        .times(1)
        .in_sequence(seq)
        .withf(move |intent, o| *intent == p.get().id && *o == owner())
        .returning(|_, _| Ok(true));
}

fn new_points_of(prepared: &Slot<NewIntent>) -> impl Fn(&[PointId]) -> bool + Send + 'static {
    let p = prepared.clone();
    move |ids| ids == p.get().point_ids.as_slice()
}

// ---------------------------------------------------------------------------
// Upsert: the happy paths
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn an_insert_prepares_then_writes_the_index_then_commits_then_resolves() {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();
    let records = vec![record(1), record(2)];
    let ids: Vec<RecordId> = records.iter().map(|r| r.id.unwrap()).collect();

    let prepared = expect_prepare(&mut repo, &mut seq);
    let written = expect_index_write(&mut index, &mut seq, &prepared);
    let p = prepared.clone();
    let committed_rows = Slot::new();
    let rows_slot = committed_rows.clone();
    repo.expect_commit_upsert()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |intent, owner, _, idem| {
            *intent == p.get().id && *owner == p.get().owner && idem.is_none()
        })
        .returning(move |_, _, rows, _| {
            rows_slot.set(rows.to_vec());
            Ok(UpsertCommit {
                summary: summary(2, 0, 0),
                old_point_ids: vec![],
            })
        });
    // No old points: nothing to clean up in the index.
    index.expect_delete().times(0);
    let p = prepared.clone();
    expect_resolve(&mut repo, &mut seq, &prepared, move || p.get().owner);

    let c = coordinator(repo, index);
    let report = c.upsert(records.clone()).await.unwrap();

    let intent = prepared.get();
    assert_eq!(intent.kind, IntentKind::Upsert);
    assert_eq!(intent.point_ids.len(), 2);
    assert_eq!(
        intent.point_ids.iter().collect::<HashSet<_>>().len(),
        2,
        "every record gets its own point"
    );
    assert_eq!(report.intent, intent.id);
    assert_eq!(report.ids, ids);
    assert_eq!((report.inserted, report.updated), (2, 0));
    assert_eq!(report.deferred_cleanup, 0);
    assert!(!report.replayed);

    // The points carry the records; the rows reference exactly those points.
    let written = written.get();
    let rows = committed_rows.get();
    for ((point, row), rec) in written.iter().zip(&rows).zip(&records) {
        assert_eq!(point.record_id, rec.id.unwrap());
        assert_eq!(point.scope, rec.scope);
        assert_eq!(point.vector, rec.vector);
        assert_eq!(row.id, rec.id.unwrap());
        assert_eq!(row.point_id, point.id);
        assert_eq!(row.content, rec.content);
        assert_eq!(
            serde_json::Value::Object(row.metadata.clone()),
            rec.metadata
        );
    }
}

#[tokio::test(start_paused = true)]
async fn an_update_deletes_exactly_the_old_points_the_commit_returned_then_resolves() {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();
    let old = points(2);

    let prepared = expect_prepare(&mut repo, &mut seq);
    expect_index_write(&mut index, &mut seq, &prepared);
    let old_ret = old.clone();
    repo.expect_commit_upsert()
        .times(1)
        .in_sequence(&mut seq)
        .returning(move |_, _, _, _| {
            Ok(UpsertCommit {
                summary: summary(1, 2, 0),
                old_point_ids: old_ret.clone(),
            })
        });
    let old_expected = old.clone();
    index
        .expect_delete()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |ids| ids == old_expected.as_slice())
        .returning(|_| Ok(()));
    let p = prepared.clone();
    expect_resolve(&mut repo, &mut seq, &prepared, move || p.get().owner);

    let c = coordinator(repo, index);
    let report = c
        .upsert(vec![record(1), record(2), record(3)])
        .await
        .unwrap();
    assert_eq!((report.inserted, report.updated), (1, 2));
    assert_eq!(report.deferred_cleanup, 0);
    assert!(
        prepared.get().point_ids.iter().all(|p| !old.contains(p)),
        "copy-on-write: the new points are fresh ids"
    );
}

#[tokio::test(start_paused = true)]
async fn a_large_batch_is_written_in_one_index_call_per_chunk_and_one_commit() {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();
    let prepared = expect_prepare(&mut repo, &mut seq);
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let s = sizes.clone();
    index
        .expect_upsert()
        .times(3)
        .in_sequence(&mut seq)
        .returning(move |pts| {
            s.lock().unwrap().push(pts.len());
            Ok(())
        });
    repo.expect_commit_upsert()
        .times(1)
        .in_sequence(&mut seq)
        .withf(|_, _, rows, _| rows.len() == 5)
        .returning(|_, _, _, _| {
            Ok(UpsertCommit {
                summary: summary(5, 0, 0),
                old_point_ids: vec![],
            })
        });
    let p = prepared.clone();
    expect_resolve(&mut repo, &mut seq, &prepared, move || p.get().owner);

    let mut cfg = config();
    cfg.limits.index_chunk = 2;
    let c = Coordinator::new(repo, index, cfg).unwrap();
    let report = c.upsert((1..=5).map(record).collect()).await.unwrap();
    assert_eq!(report.inserted, 5);
    let mut sizes = sizes.lock().unwrap().clone();
    sizes.sort_unstable();
    assert_eq!(sizes, vec![1, 2, 2], "⌈5/2⌉ index calls");
}

// ---------------------------------------------------------------------------
// Upsert: failures before the commit
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_failed_prepare_writes_nothing_to_the_index() {
    let mut repo = MockRepo::new();
    let mut index = index_mock();
    repo.expect_prepare().times(1).returning(|_| {
        Err(MetadataError::permanent(
            "relation tandem_intents does not exist",
        ))
    });
    index.expect_upsert().times(0);
    index.expect_delete().times(0);
    repo.expect_commit_upsert().times(0);
    repo.expect_resolve().times(0);

    let c = coordinator(repo, index);
    let err = c.upsert(vec![record(1)]).await.unwrap_err();
    assert!(matches!(err, CoordinatorError::Metadata(_)), "{err:?}");
    assert_eq!(err.outcome(), Outcome::NotApplied);
}

#[tokio::test(start_paused = true)]
async fn a_permanent_index_failure_never_commits_and_compensates_the_new_points() {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();

    let prepared = expect_prepare(&mut repo, &mut seq);
    index
        .expect_upsert()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| {
            Err(IndexError::InvalidInput {
                message: "bad payload".into(),
                source: None,
            })
        });
    repo.expect_commit_upsert().times(0);
    index
        .expect_delete()
        .times(1)
        .in_sequence(&mut seq)
        .withf(new_points_of(&prepared))
        .returning(|_| Ok(()));
    let p = prepared.clone();
    expect_resolve(&mut repo, &mut seq, &prepared, move || p.get().owner);

    let c = coordinator(repo, index);
    let err = c.upsert(vec![record(1), record(2)]).await.unwrap_err();
    assert!(
        matches!(
            err,
            CoordinatorError::Index(IndexError::InvalidInput { .. })
        ),
        "{err:?}"
    );
    assert_eq!(err.outcome(), Outcome::NotApplied);
    assert!(!err.is_retryable());
}

#[tokio::test(start_paused = true)]
async fn a_transient_index_failure_is_retried_until_the_write_succeeds() {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();
    let calls = Arc::new(AtomicUsize::new(0));

    let prepared = expect_prepare(&mut repo, &mut seq);
    let n = calls.clone();
    let p = prepared.clone();
    index
        .expect_upsert()
        .times(3)
        .in_sequence(&mut seq)
        .withf(move |pts| pts.iter().map(|x| x.id).collect::<Vec<_>>() == p.get().point_ids)
        .returning(move |_| {
            if n.fetch_add(1, Ordering::SeqCst) < 2 {
                Err(IndexError::transient("unavailable"))
            } else {
                Ok(())
            }
        });
    repo.expect_commit_upsert()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _, _, _| {
            Ok(UpsertCommit {
                summary: summary(1, 0, 0),
                old_point_ids: vec![],
            })
        });
    index.expect_delete().times(0);
    let p = prepared.clone();
    expect_resolve(&mut repo, &mut seq, &prepared, move || p.get().owner);

    let c = coordinator(repo, index);
    let report = c.upsert(vec![record(1)]).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 3, "two failures, one success");
    assert_eq!(report.inserted, 1);
}

#[tokio::test(start_paused = true)]
async fn an_index_write_hanging_past_the_deadline_is_compensated_but_its_intent_left_to_recovery() {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();

    let prepared = expect_prepare(&mut repo, &mut seq);
    // The mock sees the call; the wrapper then never answers.
    expect_index_write(&mut index, &mut seq, &prepared);
    repo.expect_commit_upsert().times(0);
    index
        .expect_delete()
        .times(1)
        .in_sequence(&mut seq)
        .withf(new_points_of(&prepared))
        .returning(|_| Ok(()));
    // The write may still land after the compensation: only recovery, after the
    // lease, may resolve the intent.
    repo.expect_resolve().times(0);

    let c = coordinator(repo, HangingUpsert(index));
    let started = tokio::time::Instant::now();
    let err = c.upsert(vec![record(1)]).await.unwrap_err();
    assert!(
        matches!(err, CoordinatorError::DeadlineExceeded(d) if d == config().call_deadline),
        "{err:?}"
    );
    assert_eq!(err.outcome(), Outcome::NotApplied);
    assert!(started.elapsed() >= config().call_deadline);
}

fn unknown_outcome(message: &str) -> IndexError {
    IndexError::Transient {
        outcome: Outcome::Unknown,
        retry_after: None,
        message: message.into(),
        source: None,
    }
}

#[tokio::test(start_paused = true)]
async fn an_index_write_with_an_attempt_that_may_still_land_names_its_points_in_a_guard_before_the_commit()
 {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();
    let calls = Arc::new(AtomicUsize::new(0));

    let prepared = expect_prepare(&mut repo, &mut seq);
    let n = calls.clone();
    let p = prepared.clone();
    index
        .expect_upsert()
        .times(2)
        .in_sequence(&mut seq)
        .withf(move |pts| pts.iter().map(|x| x.id).collect::<Vec<_>>() == p.get().point_ids)
        .returning(move |_| {
            if n.fetch_add(1, Ordering::SeqCst) == 0 {
                Err(unknown_outcome(
                    "a proxy answered 502; the request may still arrive",
                ))
            } else {
                Ok(())
            }
        });
    // The guard: another intent naming the same new points, recorded before
    // the commit and left for recovery (its lease outlives any request).
    let guard = Slot::new();
    let (g, p) = (guard.clone(), prepared.clone());
    repo.expect_prepare()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |i| i.id != p.get().id && i.point_ids == p.get().point_ids)
        .returning(move |i| {
            g.set(i.clone());
            Ok(())
        });
    repo.expect_commit_upsert()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _, _, _| {
            Ok(UpsertCommit {
                summary: summary(1, 0, 0),
                old_point_ids: vec![],
            })
        });
    index.expect_delete().times(0);
    // Only the call's own intent is resolved; the guard is not.
    let p = prepared.clone();
    expect_resolve(&mut repo, &mut seq, &prepared, move || p.get().owner);

    let c = coordinator(repo, index);
    let report = c.upsert(vec![record(1)]).await.unwrap();
    assert_eq!(report.inserted, 1);
    let (guard, prepared) = (guard.get(), prepared.get());
    assert_eq!(guard.kind, IntentKind::Upsert);
    assert_ne!(guard.owner, prepared.owner);
    assert!(guard.lease_deadline_ms >= prepared.lease_deadline_ms);
}

#[tokio::test(start_paused = true)]
async fn an_index_write_failing_with_unknown_outcomes_is_compensated_but_its_intent_left_to_recovery()
 {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();

    let prepared = expect_prepare(&mut repo, &mut seq);
    let p = prepared.clone();
    index
        .expect_upsert()
        .times(config().retry.max_attempts as usize)
        .in_sequence(&mut seq)
        .withf(move |pts| pts.iter().map(|x| x.id).collect::<Vec<_>>() == p.get().point_ids)
        .returning(|_| {
            Err(unknown_outcome(
                "answered Unavailable, still delivered later",
            ))
        });
    repo.expect_commit_upsert().times(0);
    index
        .expect_delete()
        .times(1)
        .in_sequence(&mut seq)
        .withf(new_points_of(&prepared))
        .returning(|_| Ok(()));
    // A request may land after the compensation: only recovery, after the
    // lease, may resolve the intent.
    repo.expect_resolve().times(0);

    let c = coordinator(repo, index);
    let err = c.upsert(vec![record(1)]).await.unwrap_err();
    assert!(matches!(err, CoordinatorError::Index(_)), "{err:?}");
    // Nothing was committed: the call did not happen, whatever the index saw.
    assert_eq!(err.outcome(), Outcome::NotApplied);
}

// ---------------------------------------------------------------------------
// Upsert: the commit
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_commit_failing_transiently_before_applying_is_retried_with_the_same_owner_token() {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();
    let owners = Arc::new(Mutex::new(Vec::new()));

    let prepared = expect_prepare(&mut repo, &mut seq);
    expect_index_write(&mut index, &mut seq, &prepared);
    let o = owners.clone();
    repo.expect_commit_upsert()
        .times(1)
        .in_sequence(&mut seq)
        .returning(move |_, owner, _, _| {
            o.lock().unwrap().push(owner);
            Err(MetadataError::transient(
                "could not serialize access (40001)",
            ))
        });
    let o = owners.clone();
    repo.expect_commit_upsert()
        .times(1)
        .in_sequence(&mut seq)
        .returning(move |_, owner, _, _| {
            o.lock().unwrap().push(owner);
            Ok(UpsertCommit {
                summary: summary(1, 0, 0),
                old_point_ids: vec![],
            })
        });
    index.expect_delete().times(0);
    repo.expect_settle().times(0);
    let p = prepared.clone();
    expect_resolve(&mut repo, &mut seq, &prepared, move || p.get().owner);

    let c = coordinator(repo, index);
    let report = c.upsert(vec![record(1)]).await.unwrap();
    assert_eq!(report.inserted, 1);
    let owner = prepared.get().owner;
    assert_eq!(*owners.lock().unwrap(), vec![owner, owner]);
}

#[tokio::test(start_paused = true)]
async fn a_commit_failing_permanently_is_not_retried_and_the_new_points_are_deleted() {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();

    let prepared = expect_prepare(&mut repo, &mut seq);
    expect_index_write(&mut index, &mut seq, &prepared);
    repo.expect_commit_upsert()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _, _, _| {
            Err(MetadataError::InvalidInput {
                message: "value too long".into(),
                source: None,
            })
        });
    repo.expect_settle().times(0);
    index
        .expect_delete()
        .times(1)
        .in_sequence(&mut seq)
        .withf(new_points_of(&prepared))
        .returning(|_| Ok(()));
    let p = prepared.clone();
    expect_resolve(&mut repo, &mut seq, &prepared, move || p.get().owner);

    let c = coordinator(repo, index);
    let err = c.upsert(vec![record(1)]).await.unwrap_err();
    assert!(
        matches!(
            err,
            CoordinatorError::Metadata(MetadataError::InvalidInput { .. })
        ),
        "{err:?}"
    );
    assert_eq!(err.outcome(), Outcome::NotApplied);
    assert!(!err.is_retryable());
}

#[tokio::test(start_paused = true)]
async fn an_ambiguous_commit_is_settled_first_and_settled_committed_means_success_and_cleanup() {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();
    let old = points(1);

    let prepared = expect_prepare(&mut repo, &mut seq);
    expect_index_write(&mut index, &mut seq, &prepared);
    repo.expect_commit_upsert()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _, _, _| Err(MetadataError::ambiguous("connection reset during COMMIT")));
    let p = prepared.clone();
    let old_listed = old.clone();
    repo.expect_settle()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |intent, owner, fence| {
            *intent == p.get().id && *owner == p.get().owner && fence != owner
        })
        .returning(move |intent, owner, _| {
            Ok(Settlement::Committed(intent_row(
                intent,
                IntentState::Committed,
                owner,
                old_listed.clone(),
                Some(summary(0, 1, 0)),
            )))
        });
    // The sequence puts the cleanup strictly after settle returned.
    let old_expected = old.clone();
    index
        .expect_delete()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |ids| ids == old_expected.as_slice())
        .returning(|_| Ok(()));
    let p = prepared.clone();
    expect_resolve(&mut repo, &mut seq, &prepared, move || p.get().owner);

    let c = coordinator(repo, index);
    let report = c.upsert(vec![record(1)]).await.unwrap();
    assert_eq!((report.inserted, report.updated), (0, 1));
    assert_eq!(report.deferred_cleanup, 0);
}

#[tokio::test(start_paused = true)]
async fn an_ambiguous_commit_settled_not_committed_is_retried_under_the_fence_token() {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();
    let fence = Slot::<OwnerToken>::new();

    let prepared = expect_prepare(&mut repo, &mut seq);
    expect_index_write(&mut index, &mut seq, &prepared);
    let p = prepared.clone();
    repo.expect_commit_upsert()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |_, owner, _, _| *owner == p.get().owner)
        .returning(|_, _, _, _| Err(MetadataError::ambiguous("server closed the connection")));
    let f = fence.clone();
    let p = prepared.clone();
    repo.expect_settle()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |_, owner, _| *owner == p.get().owner)
        .returning(move |intent, _, new_owner| {
            f.set(new_owner);
            Ok(Settlement::NotCommitted(intent_row(
                intent,
                IntentState::Prepared,
                new_owner,
                vec![],
                None,
            )))
        });
    index.expect_delete().times(0);
    let f = fence.clone();
    repo.expect_commit_upsert()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |_, owner, _, _| *owner == f.get())
        .returning(|_, _, _, _| {
            Ok(UpsertCommit {
                summary: summary(1, 0, 0),
                old_point_ids: vec![],
            })
        });
    let f = fence.clone();
    expect_resolve(&mut repo, &mut seq, &prepared, move || f.get());

    let c = coordinator(repo, index);
    let report = c.upsert(vec![record(1)]).await.unwrap();
    assert_eq!(report.inserted, 1);
    assert_ne!(fence.get(), prepared.get().owner);
}

#[tokio::test(start_paused = true)]
async fn an_ambiguous_commit_that_cannot_be_settled_before_the_deadline_reports_an_unknown_outcome_without_compensating()
 {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();
    let committed_at = Slot::<tokio::time::Instant>::new();
    let settles = Arc::new(Mutex::new(Vec::new()));

    let prepared = expect_prepare(&mut repo, &mut seq);
    expect_index_write(&mut index, &mut seq, &prepared);
    let at = committed_at.clone();
    repo.expect_commit_upsert()
        .times(1)
        .in_sequence(&mut seq)
        .returning(move |_, _, _, _| {
            at.set(tokio::time::Instant::now());
            Err(MetadataError::ambiguous("connection lost during COMMIT"))
        });
    // Not in the sequence (mockall sequences need exact counts); the times it
    // was called at prove it came after the commit.
    let (p, n) = (prepared.clone(), settles.clone());
    repo.expect_settle()
        .times(1..)
        .withf(move |intent, owner, _| *intent == p.get().id && *owner == p.get().owner)
        .returning(move |_, _, _| {
            n.lock().unwrap().push(tokio::time::Instant::now());
            Err(MetadataError::transient("connection refused"))
        });
    // The commit may have happened: deleting the new points could leave
    // committed rows without vectors; resolving could orphan them.
    index.expect_delete().times(0);
    repo.expect_resolve().times(0);

    // Attempts never run out: only the deadline ends the settling.
    let mut cfg = config();
    cfg.retry.max_attempts = u32::MAX;
    let c = Coordinator::new(repo, index, cfg.clone()).unwrap();
    let err = c.upsert(vec![record(1)]).await.unwrap_err();
    match &err {
        CoordinatorError::OutcomeUnknown { intent, .. } => assert_eq!(*intent, prepared.get().id),
        other => panic!("expected OutcomeUnknown, got {other:?}"),
    }
    assert_eq!(err.outcome(), Outcome::Unknown);

    let settles = settles.lock().unwrap().clone();
    assert!(settles.len() > 1, "settle is retried");
    let (first, last) = (settles[0], *settles.last().unwrap());
    assert!(first >= committed_at.get());
    // It stops when the next backoff (≤ max_backoff) would cross the deadline
    // (timers have millisecond resolution, so the last try may fall on it).
    let spent = last - first;
    assert!(
        spent + cfg.retry.max_backoff >= cfg.cleanup_deadline && spent <= cfg.cleanup_deadline,
        "settling gave up after {spent:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_ambiguous_commit_settled_not_committed_with_no_attempts_left_is_rolled_back_under_the_fence()
 {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();
    let fence = Slot::<OwnerToken>::new();

    let prepared = expect_prepare(&mut repo, &mut seq);
    expect_index_write(&mut index, &mut seq, &prepared);
    repo.expect_commit_upsert()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _, _, _| Err(MetadataError::ambiguous("connection reset")));
    let f = fence.clone();
    repo.expect_settle()
        .times(1)
        .in_sequence(&mut seq)
        .returning(move |intent, _, new_owner| {
            f.set(new_owner);
            Ok(Settlement::NotCommitted(intent_row(
                intent,
                IntentState::Prepared,
                new_owner,
                vec![],
                None,
            )))
        });
    // Settled: it did not happen, so the new points are garbage now.
    index
        .expect_delete()
        .times(1)
        .in_sequence(&mut seq)
        .withf(new_points_of(&prepared))
        .returning(|_| Ok(()));
    let f = fence.clone();
    expect_resolve(&mut repo, &mut seq, &prepared, move || f.get());

    let mut cfg = config();
    cfg.retry.max_attempts = 1;
    let c = Coordinator::new(repo, index, cfg).unwrap();
    let err = c.upsert(vec![record(1)]).await.unwrap_err();
    assert!(matches!(err, CoordinatorError::Metadata(_)), "{err:?}");
    assert_eq!(
        err.outcome(),
        Outcome::NotApplied,
        "the settlement decided it"
    );
}

#[tokio::test(start_paused = true)]
async fn an_ambiguous_commit_whose_intent_recovery_took_over_is_fenced_without_compensation() {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();

    let prepared = expect_prepare(&mut repo, &mut seq);
    expect_index_write(&mut index, &mut seq, &prepared);
    repo.expect_commit_upsert()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _, _, _| Err(MetadataError::ambiguous("connection reset")));
    // Not committed, but owned by neither the call nor its fence: recovery's.
    repo.expect_settle()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|intent, _, _| {
            Ok(Settlement::NotCommitted(intent_row(
                intent,
                IntentState::Prepared,
                OwnerToken::new_random(),
                vec![],
                None,
            )))
        });
    index.expect_delete().times(0);
    repo.expect_resolve().times(0);

    let c = coordinator(repo, index);
    let err = c.upsert(vec![record(1)]).await.unwrap_err();
    assert!(
        matches!(err, CoordinatorError::Fenced(id) if id == prepared.get().id),
        "{err:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_fenced_commit_is_reported_without_compensation_or_resolve() {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();

    let prepared = expect_prepare(&mut repo, &mut seq);
    expect_index_write(&mut index, &mut seq, &prepared);
    repo.expect_commit_upsert()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|intent, _, _, _| Err(MetadataError::Fenced { intent }));
    repo.expect_settle().times(0);
    index.expect_delete().times(0);
    repo.expect_resolve().times(0);

    let c = coordinator(repo, index);
    let err = c.upsert(vec![record(1)]).await.unwrap_err();
    assert!(
        matches!(err, CoordinatorError::Fenced(id) if id == prepared.get().id),
        "{err:?}"
    );
    assert_eq!(err.outcome(), Outcome::NotApplied);
}

#[tokio::test(start_paused = true)]
async fn cleanup_failing_after_the_commit_still_succeeds_and_defers_the_old_points() {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();
    let old = points(2);

    let prepared = expect_prepare(&mut repo, &mut seq);
    expect_index_write(&mut index, &mut seq, &prepared);
    let old_ret = old.clone();
    repo.expect_commit_upsert()
        .times(1)
        .in_sequence(&mut seq)
        .returning(move |_, _, _, _| {
            Ok(UpsertCommit {
                summary: summary(0, 2, 0),
                old_point_ids: old_ret.clone(),
            })
        });
    // Retried up to max_attempts, then given up.
    let old_expected = old.clone();
    index
        .expect_delete()
        .times(config().retry.max_attempts as usize)
        .in_sequence(&mut seq)
        .withf(move |ids| ids == old_expected.as_slice())
        .returning(|_| Err(IndexError::transient("unavailable")));
    repo.expect_resolve().times(0);

    let c = coordinator(repo, index);
    let report = c.upsert(vec![record(1), record(2)]).await.unwrap();
    assert_eq!(report.updated, 2);
    assert_eq!(report.deferred_cleanup, 2);
}

// ---------------------------------------------------------------------------
// Idempotency keys
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_key_taken_by_a_concurrent_call_compensates_then_replays_its_outcome() {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();
    let given = Slot::<IdempotencyRecord>::new();
    let winner = IntentId::new_v7();
    let winner_ids = vec![RecordId::new_v7()];

    repo.expect_lookup_idempotency()
        .times(1)
        .in_sequence(&mut seq)
        .withf(|key| key == "order-7")
        .returning(|_| Ok(None));
    let prepared = expect_prepare(&mut repo, &mut seq);
    expect_index_write(&mut index, &mut seq, &prepared);
    let g = given.clone();
    repo.expect_commit_upsert()
        .times(1)
        .in_sequence(&mut seq)
        .returning(move |_, _, _, idem| {
            let idem = idem.expect("the key goes with the commit");
            g.set(idem.clone());
            Err(MetadataError::IdempotencyKeyTaken {
                key: idem.key.clone(),
            })
        });
    index
        .expect_delete()
        .times(1)
        .in_sequence(&mut seq)
        .withf(new_points_of(&prepared))
        .returning(|_| Ok(()));
    let p = prepared.clone();
    expect_resolve(&mut repo, &mut seq, &prepared, move || p.get().owner);
    let g = given.clone();
    let outcome_ids = winner_ids.clone();
    repo.expect_lookup_idempotency()
        .times(1)
        .in_sequence(&mut seq)
        .withf(|key| key == "order-7")
        .returning(move |key| {
            Ok(Some(IdempotencyRecord {
                key: key.to_owned(),
                request_hash: g.get().request_hash,
                outcome: json!({
                    "intent": winner,
                    "ids": outcome_ids,
                    "inserted": 0,
                    "updated": 0,
                    "deferred_cleanup": 0,
                }),
                summary: summary(1, 0, 0),
            }))
        });

    let c = coordinator(repo, index);
    let report = c
        .upsert_with(vec![record(1)], &WriteOptions::idempotent("order-7"))
        .await
        .unwrap();
    assert!(report.replayed);
    assert_eq!(report.intent, winner);
    assert_eq!(report.ids, winner_ids);
    assert_eq!(report.inserted, 1);
    assert_eq!(given.get().key, "order-7");
}

#[tokio::test(start_paused = true)]
async fn a_recorded_key_replays_the_same_request_and_rejects_a_different_one_without_writing() {
    let mut repo = MockRepo::new();
    let mut index = index_mock();
    let recorded = Slot::<IdempotencyRecord>::new();
    let records = vec![record(1)];

    // The first call, with the key, writes and records it.
    let mut seq = Sequence::new();
    repo.expect_lookup_idempotency()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Ok(None));
    let prepared = expect_prepare(&mut repo, &mut seq);
    expect_index_write(&mut index, &mut seq, &prepared);
    let r = recorded.clone();
    repo.expect_commit_upsert()
        .times(1)
        .in_sequence(&mut seq)
        .returning(move |_, _, _, idem| {
            r.set(idem.expect("the key goes with the commit"));
            Ok(UpsertCommit {
                summary: summary(1, 0, 0),
                old_point_ids: vec![],
            })
        });
    let p = prepared.clone();
    expect_resolve(&mut repo, &mut seq, &prepared, move || p.get().owner);
    // Later calls find it, as the store recorded it (with the commit's summary);
    // nothing more may be prepared, written or committed (the `times(1)` above).
    let r = recorded.clone();
    repo.expect_lookup_idempotency()
        .times(2)
        .in_sequence(&mut seq)
        .returning(move |_| {
            let mut rec = r.get();
            rec.summary = summary(1, 0, 0);
            Ok(Some(rec))
        });
    index.expect_delete().times(0);

    let c = coordinator(repo, index);
    let opts = WriteOptions::idempotent("k-1");
    let first = c.upsert_with(records.clone(), &opts).await.unwrap();
    assert!(!first.replayed);

    let again = c.upsert_with(records.clone(), &opts).await.unwrap();
    assert!(again.replayed);
    assert_eq!(again.intent, first.intent);
    assert_eq!(again.ids, first.ids);
    assert_eq!(again.inserted, 1);

    let err = c.upsert_with(vec![record(2)], &opts).await.unwrap_err();
    assert!(
        matches!(&err, CoordinatorError::IdempotencyKeyReused { key } if key == "k-1"),
        "{err:?}"
    );
    assert!(!err.is_retryable());
}

// ---------------------------------------------------------------------------
// Delete
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_delete_commits_then_deletes_the_returned_points_then_resolves() {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();
    let gone = points(3);
    let selector = DeleteSelector::MetadataEq {
        scope: Scope::new("catalog"),
        key: "item".into(),
        value: json!("rejected"),
    };

    let prepared = expect_prepare(&mut repo, &mut seq);
    index.expect_upsert().times(0);
    let p = prepared.clone();
    let sel = selector.clone();
    let gone_ret = gone.clone();
    repo.expect_commit_delete()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |intent, owner, s, idem| {
            *intent == p.get().id && *owner == p.get().owner && *s == sel && idem.is_none()
        })
        .returning(move |_, _, _, _| {
            Ok(DeleteCommit {
                summary: summary(0, 0, 3),
                point_ids: gone_ret.clone(),
            })
        });
    let gone_expected = gone.clone();
    index
        .expect_delete()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |ids| ids == gone_expected.as_slice())
        .returning(|_| Ok(()));
    let p = prepared.clone();
    expect_resolve(&mut repo, &mut seq, &prepared, move || p.get().owner);

    let c = coordinator(repo, index);
    let report = c.delete(selector).await.unwrap();
    let intent = prepared.get();
    assert_eq!(intent.kind, IntentKind::Delete);
    assert!(intent.point_ids.is_empty(), "a delete writes no new point");
    assert_eq!(report.intent, intent.id);
    assert_eq!(report.deleted, 3);
    assert_eq!(report.deferred_cleanup, 0);
}

#[tokio::test(start_paused = true)]
async fn a_delete_whose_commit_fails_resolves_its_intent_and_touches_no_point() {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();

    let prepared = expect_prepare(&mut repo, &mut seq);
    repo.expect_commit_delete()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _, _, _| Err(MetadataError::permanent("permission denied")));
    index.expect_delete().times(0);
    let p = prepared.clone();
    expect_resolve(&mut repo, &mut seq, &prepared, move || p.get().owner);

    let c = coordinator(repo, index);
    let err = c
        .delete(DeleteSelector::Ids(vec![RecordId::new_v7()]))
        .await
        .unwrap_err();
    assert!(matches!(err, CoordinatorError::Metadata(_)), "{err:?}");
    assert_eq!(err.outcome(), Outcome::NotApplied);
}

#[tokio::test(start_paused = true)]
async fn a_delete_with_an_ambiguous_commit_settles_before_deleting_any_point() {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();
    let gone = points(2);

    let prepared = expect_prepare(&mut repo, &mut seq);
    repo.expect_commit_delete()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _, _, _| Err(MetadataError::ambiguous("connection lost during COMMIT")));
    let listed = gone.clone();
    let p = prepared.clone();
    repo.expect_settle()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |intent, owner, _| *intent == p.get().id && *owner == p.get().owner)
        .returning(move |intent, owner, _| {
            Ok(Settlement::Committed(Intent {
                kind: IntentKind::Delete,
                ..intent_row(
                    intent,
                    IntentState::Committed,
                    owner,
                    listed.clone(),
                    Some(summary(0, 0, 2)),
                )
            }))
        });
    let expected = gone.clone();
    index
        .expect_delete()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |ids| ids == expected.as_slice())
        .returning(|_| Ok(()));
    let p = prepared.clone();
    expect_resolve(&mut repo, &mut seq, &prepared, move || p.get().owner);

    let c = coordinator(repo, index);
    let report = c
        .delete(DeleteSelector::Scope(Scope::new("catalog")))
        .await
        .unwrap();
    assert_eq!(report.deleted, 2);
    assert_eq!(report.deferred_cleanup, 0);
}

// ---------------------------------------------------------------------------
// Recovery
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn recovery_deletes_only_unreferenced_points_then_resolves_the_batch_and_claims_again_when_it_was_full()
 {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();
    let mut cfg = config();
    cfg.recovery_batch = 2;
    let lease_ms = i64::try_from(cfg.lease.as_millis()).unwrap();

    let named = points(3);
    let a = intent_row(
        IntentId::new_v7(),
        IntentState::Prepared,
        OwnerToken::new_random(),
        named.clone(),
        None,
    );
    let b = Intent {
        kind: IntentKind::Delete,
        ..intent_row(
            IntentId::new_v7(),
            IntentState::Committed,
            OwnerToken::new_random(),
            vec![],
            None,
        )
    };
    let claimer = Slot::<OwnerToken>::new();

    let (ret_a, ret_b, c) = (a.clone(), b.clone(), claimer.clone());
    repo.expect_claim_expired()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |now, _, lease_until, limit| *lease_until == now + lease_ms && *limit == 2)
        .returning(move |_, owner, lease_until, _| {
            c.set(owner);
            Ok(vec![
                Intent {
                    owner,
                    lease_deadline_ms: lease_until,
                    ..ret_a.clone()
                },
                Intent {
                    owner,
                    lease_deadline_ms: lease_until,
                    ..ret_b.clone()
                },
            ])
        });
    let (asked, still_referenced) = (named.clone(), named[1]);
    repo.expect_referenced_points()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |pts| pts == asked.as_slice())
        .returning(move |_| Ok(HashSet::from([still_referenced])));
    let garbage = vec![named[0], named[2]];
    index
        .expect_delete()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |ids| ids == garbage.as_slice())
        .returning(|_| Ok(()));
    // One resolve for the whole batch (intent b named no point), under the
    // claim's token.
    let (c, ids) = (claimer.clone(), vec![a.id, b.id]);
    repo.expect_resolve_many()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |intents, owner| intents == ids.as_slice() && *owner == c.get())
        .returning(|intents, _| Ok(intents.len()));
    repo.expect_resolve().times(0);
    // A full batch: there may be more.
    repo.expect_claim_expired()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _, _, _| Ok(vec![]));
    repo.expect_record_failure().times(0);

    let c = Coordinator::new(repo, index, cfg).unwrap();
    let report = c.recover().await.unwrap();
    assert_eq!(report.claimed, 2);
    assert_eq!(report.resolved, 2);
    assert_eq!(report.points_deleted, 2);
    assert_eq!(report.failed, 0);
    assert_ne!(
        claimer.get(),
        a.owner,
        "recovery claims under its own token"
    );
}

#[tokio::test(start_paused = true)]
async fn recovery_claims_once_when_the_first_batch_is_not_full() {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();
    let mut cfg = config();
    cfg.recovery_batch = 2;
    let old = points(1);

    let intent = intent_row(
        IntentId::new_v7(),
        IntentState::Committed,
        OwnerToken::new_random(),
        old.clone(),
        Some(summary(0, 1, 0)),
    );
    let ret = intent.clone();
    repo.expect_claim_expired()
        .times(1)
        .in_sequence(&mut seq)
        .returning(move |_, owner, _, _| {
            Ok(vec![Intent {
                owner,
                ..ret.clone()
            }])
        });
    repo.expect_referenced_points()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Ok(HashSet::new()));
    let o = old.clone();
    index
        .expect_delete()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |ids| ids == o.as_slice())
        .returning(|_| Ok(()));
    repo.expect_resolve_many()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|intents, _| Ok(intents.len()));

    let c = Coordinator::new(repo, index, cfg).unwrap();
    let report = c.recover().await.unwrap();
    assert_eq!(
        (report.claimed, report.resolved, report.points_deleted),
        (1, 1, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn recovery_leaves_an_intent_whose_garbage_cannot_be_deleted_and_records_why() {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();
    let intent = intent_row(
        IntentId::new_v7(),
        IntentState::Prepared,
        OwnerToken::new_random(),
        points(2),
        None,
    );
    let claimer = Slot::<OwnerToken>::new();

    let (ret, c) = (intent.clone(), claimer.clone());
    repo.expect_claim_expired()
        .times(1)
        .in_sequence(&mut seq)
        .returning(move |_, owner, _, _| {
            c.set(owner);
            Ok(vec![Intent {
                owner,
                ..ret.clone()
            }])
        });
    repo.expect_referenced_points()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Ok(HashSet::new()));
    index
        .expect_delete()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| {
            Err(IndexError::CollectionNotFound {
                collection: "c".into(),
            })
        });
    repo.expect_resolve().times(0);
    repo.expect_resolve_many().times(0);
    let (c, id) = (claimer.clone(), intent.id);
    repo.expect_record_failure()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |i, owner, message| {
            *i == id && *owner == c.get() && message.contains("collection")
        })
        .returning(|_, _, _| Ok(()));

    let c = coordinator(repo, index);
    let report = c.recover().await.unwrap();
    assert_eq!((report.claimed, report.resolved, report.failed), (1, 0, 1));
}

#[tokio::test(start_paused = true)]
async fn recovery_of_a_batch_resolves_only_the_intents_whose_garbage_is_all_deleted() {
    let mut repo = MockRepo::new();
    let mut index = index_mock();
    let mut cfg = config();
    cfg.limits.index_chunk = 1;
    cfg.limits.index_parallelism = 1;
    let (pa, pb) = (PointId::new_v7(), PointId::new_v7());
    let a = intent_row(
        IntentId::new_v7(),
        IntentState::Prepared,
        OwnerToken::new_random(),
        vec![pa],
        None,
    );
    let b = intent_row(
        IntentId::new_v7(),
        IntentState::Prepared,
        OwnerToken::new_random(),
        vec![pb],
        None,
    );
    let (ra, rb) = (a.clone(), b.clone());
    repo.expect_claim_expired()
        .times(1)
        .returning(move |_, owner, _, _| {
            Ok(vec![
                Intent {
                    owner,
                    ..ra.clone()
                },
                Intent {
                    owner,
                    ..rb.clone()
                },
            ])
        });
    repo.expect_referenced_points()
        .times(1)
        .returning(|_| Ok(HashSet::new()));
    // One chunk per point: a's is deleted, b's fails for good.
    index.expect_delete().times(2).returning(move |ids| {
        if ids == [pa] {
            Ok(())
        } else {
            Err(IndexError::CollectionNotFound {
                collection: "c".into(),
            })
        }
    });
    let id_a = a.id;
    repo.expect_resolve_many()
        .times(1)
        .withf(move |intents, _| intents == [id_a])
        .returning(|intents, _| Ok(intents.len()));
    let id_b = b.id;
    repo.expect_record_failure()
        .times(1)
        .withf(move |i, _, _| *i == id_b)
        .returning(|_, _, _| Ok(()));

    let c = Coordinator::new(repo, index, cfg).unwrap();
    let report = c.recover().await.unwrap();
    assert_eq!(
        (
            report.claimed,
            report.resolved,
            report.failed,
            report.points_deleted
        ),
        (2, 1, 1, 1)
    );
}

// ---------------------------------------------------------------------------
// Search: the read guard
// ---------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn search_overfetches_and_drops_hits_whose_point_is_not_a_rows_current_point() {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();
    let mut cfg = config();
    cfg.search_overfetch = 3;
    let cand = points(6);
    let filter = Filter::scope("catalog");

    let (hits, f) = (cand.clone(), filter.clone());
    index
        .expect_search()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |q| q.limit == 2 * 3 && q.filter == f && q.vector == vec![1.0, 0.0, 0.0])
        .returning(move |_| {
            Ok(hits
                .iter()
                .enumerate()
                .map(|(i, p)| hit(*p, 1.0 - i as f32 / 10.0))
                .collect())
        });
    // Only the 2nd and 5th candidates are what a committed row references now:
    // the rest are uncommitted, rolled back, deleted or superseded.
    let (asked, current) = (cand.clone(), [cand[1], cand[4]]);
    repo.expect_rows_by_points()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |pts| pts == asked.as_slice())
        .returning(move |_| Ok(current.iter().map(|p| stored(*p, "catalog")).collect()));

    let c = Coordinator::new(repo, index, cfg).unwrap();
    let query = SearchQuery::new(vec![1.0, 0.0, 0.0], 2).with_filter(filter);
    let found = c.search(&query).await.unwrap();
    let got: Vec<PointId> = found.iter().map(|h| h.record.point_id).collect();
    assert_eq!(got, vec![cand[1], cand[4]]);
    assert_eq!(found[0].score, 0.9);
    assert_eq!(found[1].score, 0.6);
}

#[tokio::test(start_paused = true)]
async fn search_asks_the_index_again_for_more_when_too_few_hits_survive_the_guard() {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();
    let mut cfg = config();
    cfg.search_overfetch = 2;
    let cand = points(5);

    // First round: a full page of 4, only one current.
    let first: Vec<PointId> = cand[..4].to_vec();
    let ret = first.clone();
    index
        .expect_search()
        .times(1)
        .in_sequence(&mut seq)
        .withf(|q| q.limit == 4)
        .returning(move |_| Ok(ret.iter().map(|p| hit(*p, 0.5)).collect()));
    let (asked, keep) = (first.clone(), cand[0]);
    repo.expect_rows_by_points()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |pts| pts == asked.as_slice())
        .returning(move |_| Ok(vec![stored(keep, "catalog")]));
    // Second round: a larger limit; fewer hits than asked, so the index is exhausted.
    let ret = cand.clone();
    index
        .expect_search()
        .times(1)
        .in_sequence(&mut seq)
        .withf(|q| q.limit > 4)
        .returning(move |_| Ok(ret.iter().map(|p| hit(*p, 0.5)).collect()));
    let (asked, keep) = (cand.clone(), [cand[0], cand[3]]);
    repo.expect_rows_by_points()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |pts| pts == asked.as_slice())
        .returning(move |_| Ok(keep.iter().map(|p| stored(*p, "catalog")).collect()));

    let c = Coordinator::new(repo, index, cfg).unwrap();
    let found = c
        .search(&SearchQuery::new(vec![0.0, 1.0, 0.0], 2))
        .await
        .unwrap();
    let got: Vec<PointId> = found.iter().map(|h| h.record.point_id).collect();
    assert_eq!(got, vec![cand[0], cand[3]]);
}

#[tokio::test(start_paused = true)]
async fn search_stops_when_the_index_has_no_more_candidates() {
    let mut repo = MockRepo::new();
    let mut index = index_mock();
    let mut cfg = config();
    cfg.search_overfetch = 2;
    let cand = points(3);
    let ret = cand.clone();
    // Three of the four asked for: the index is exhausted, so one round only.
    index
        .expect_search()
        .times(1)
        .withf(|q| q.limit == 4)
        .returning(move |_| Ok(ret.iter().map(|p| hit(*p, 0.5)).collect()));
    let keep = cand[2];
    repo.expect_rows_by_points()
        .times(1)
        .returning(move |_| Ok(vec![stored(keep, "catalog")]));

    let c = Coordinator::new(repo, index, cfg).unwrap();
    let found = c
        .search(&SearchQuery::new(vec![0.0, 0.0, 1.0], 2))
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].record.point_id, keep);
}

// ---------------------------------------------------------------------------
// Validation: nothing reaches a store
// ---------------------------------------------------------------------------

/// A coordinator whose mocks expect no store call at all (mockall panics on any
/// undeclared call); only the collection's dimension and distance are read.
fn untouchable() -> Coordinator<MockRepo, MockIndex> {
    coordinator(MockRepo::new(), index_mock())
}

#[tokio::test(start_paused = true)]
async fn invalid_batches_are_rejected_before_any_store_call() {
    let id = RecordId::new_v7();
    let cases: Vec<(&str, Vec<NewRecord>)> = vec![
        ("empty batch", vec![]),
        (
            "wrong dimension",
            vec![NewRecord::new("catalog", "c", vec![1.0, 2.0])],
        ),
        (
            "NaN",
            vec![
                record(1),
                NewRecord::new("catalog", "c", vec![1.0, f32::NAN, 0.0]),
            ],
        ),
        (
            "infinity",
            vec![NewRecord::new(
                "catalog",
                "c",
                vec![f32::INFINITY, 1.0, 0.0],
            )],
        ),
        (
            "duplicate ids",
            vec![record(1).with_id(id), record(2).with_id(id)],
        ),
        (
            "metadata not an object",
            vec![record(1).with_metadata(json!("text"))],
        ),
        (
            "empty scope",
            vec![NewRecord::new("", "c", vec![1.0, 0.0, 0.0])],
        ),
        (
            "blank scope",
            vec![NewRecord::new("  ", "c", vec![1.0, 0.0, 0.0])],
        ),
    ];
    for (name, records) in cases {
        let c = untouchable();
        let err = c
            .upsert_with(records, &WriteOptions::idempotent("k"))
            .await
            .unwrap_err();
        let CoordinatorError::Invalid(v) = &err else {
            panic!("{name}: expected a validation error, got {err:?}");
        };
        let expected = match name {
            "empty batch" => matches!(v, ValidationError::EmptyBatch),
            "wrong dimension" => matches!(
                v,
                ValidationError::DimensionMismatch {
                    index: 0,
                    expected: DIM,
                    got: 2
                }
            ),
            "NaN" => matches!(
                v,
                ValidationError::NonFiniteVector {
                    index: 1,
                    position: 1
                }
            ),
            "infinity" => matches!(
                v,
                ValidationError::NonFiniteVector {
                    index: 0,
                    position: 0
                }
            ),
            "duplicate ids" => {
                matches!(v, ValidationError::DuplicateId { index: 1, id: d } if *d == id)
            }
            "metadata not an object" => matches!(v, ValidationError::MetadataNotObject { .. }),
            _ => matches!(v, ValidationError::EmptyScope { index: 0 }),
        };
        assert!(expected, "{name}: got {v:?}");
        assert!(!err.is_retryable(), "{name}");
    }
}

#[tokio::test(start_paused = true)]
async fn invalid_deletes_and_searches_are_rejected_before_any_store_call() {
    let c = untouchable();
    let err = c.delete(DeleteSelector::Ids(vec![])).await.unwrap_err();
    assert!(
        matches!(err, CoordinatorError::Invalid(ValidationError::Invalid(_))),
        "{err:?}"
    );
    let err = c
        .delete(DeleteSelector::Scope(Scope::new("")))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CoordinatorError::Invalid(ValidationError::EmptyScope { .. })
        ),
        "{err:?}"
    );
    let err = c
        .delete(DeleteSelector::MetadataEq {
            scope: Scope::new("catalog"),
            key: String::new(),
            value: json!(1),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, CoordinatorError::Invalid(ValidationError::Invalid(_))),
        "{err:?}"
    );

    let err = c
        .search(&SearchQuery::new(vec![1.0, 0.0, 0.0], 0))
        .await
        .unwrap_err();
    assert!(
        matches!(err, CoordinatorError::Invalid(ValidationError::Invalid(_))),
        "{err:?}"
    );
    let err = c
        .search(&SearchQuery::new(vec![1.0, 0.0], 3))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CoordinatorError::Invalid(ValidationError::DimensionMismatch { .. })
        ),
        "{err:?}"
    );
    let err = c
        .search(&SearchQuery::new(vec![f32::NAN, 0.0, 0.0], 3))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CoordinatorError::Invalid(ValidationError::NonFiniteVector { .. })
        ),
        "{err:?}"
    );
    let err = c
        .search(&SearchQuery::new(vec![1.0, 0.0, 0.0], 3).with_filter(Filter::scope(" ")))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CoordinatorError::Invalid(ValidationError::EmptyScope { .. })
        ),
        "{err:?}"
    );
}

// ---------------------------------------------------------------------------
// Transactions
// ---------------------------------------------------------------------------

/// The connection a caller step runs on, in these cases: what the mock store
/// hands a `SqlStep` inside its commit.
#[derive(Default)]
struct Tables {
    statements: Vec<String>,
}

/// The caller's own error, returned by its step.
#[derive(Debug)]
struct CatalogLocked;

impl std::fmt::Display for CatalogLocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("catalog 17 is locked for publishing")
    }
}

impl std::error::Error for CatalogLocked {}

/// Runs a transaction's caller step as the stores do inside the commit: on
/// the store's connection, a failure becoming `MetadataError::StepFailed` with
/// the caller's error as its source (what the memory store returns for every
/// step error, and PostgreSQL and SQLite for an error that is not a database
/// error). Returns the statements the step ran.
fn run_step(commit: &TxCommit) -> Result<Vec<String>, MetadataError> {
    let step = commit.step.as_ref().expect("the commit carries the step");
    let mut conn = Tables::default();
    step.run(&mut conn)
        .now_or_never()
        .expect("the step awaits nothing")
        .map_err(|source| MetadataError::StepFailed { source })?;
    Ok(conn.statements)
}

/// The rows of an upsert part, if it is one.
fn upsert_rows(part: &CommitPart) -> &[RowWrite] {
    match part {
        CommitPart::Upsert(rows) => rows,
        other => panic!("expected an upsert part, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_transaction_whose_caller_step_fails_commits_nothing_and_deletes_exactly_its_new_points()
{
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();
    let records = vec![record(1), record(2)];
    let ran = Arc::new(Mutex::new(Vec::new()));

    // The step is checked against the store's connection type before anything
    // is written.
    repo.expect_commit_step_connection()
        .times(1)
        .in_sequence(&mut seq)
        .return_const(Some(ConnectionType::of::<Tables>()));
    let prepared = expect_prepare(&mut repo, &mut seq);
    expect_index_write(&mut index, &mut seq, &prepared);
    let p = prepared.clone();
    repo.expect_commit_transaction()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |intent, owner, commit, idem| {
            let rows = upsert_rows(&commit.parts[0]);
            *intent == p.get().id
                && *owner == p.get().owner
                && commit.parts.len() == 1
                && rows.iter().map(|r| r.point_id).collect::<Vec<_>>() == p.get().point_ids
                && commit.step.is_some()
                && !commit.hold
                && commit.saga.is_none()
                && idem.is_none()
        })
        .returning(|_, _, commit, _| {
            // The step runs inside the commit and fails: the transaction
            // rolls back with it (no row, no intent mark, no key).
            let statements = run_step(&commit)?;
            panic!("the step failed, yet it ran {statements:?}")
        });
    // Not applied: the points written for it are garbage, deleted at once...
    index
        .expect_delete()
        .times(1)
        .in_sequence(&mut seq)
        .withf(new_points_of(&prepared))
        .returning(|_| Ok(()));
    // ...and the intent resolved, as nothing of it can land any more.
    let p = prepared.clone();
    expect_resolve(&mut repo, &mut seq, &prepared, move || p.get().owner);

    let step_ran = ran.clone();
    let step = SqlStep::new(move |conn: &mut Tables| {
        let ran = step_ran.clone();
        Box::pin(async move {
            conn.statements
                .push("UPDATE catalogs SET status = 'indexed' WHERE id = 17".into());
            ran.lock().unwrap().push("step".to_owned());
            Err(Box::new(CatalogLocked) as BoxError)
        })
    });
    let tx = Transaction::new().upsert(records).with_step(step);
    let c = coordinator(repo, index);
    let err = c.transact(tx, &WriteOptions::default()).await.unwrap_err();

    assert!(
        matches!(err, CoordinatorError::StepFailed { .. }),
        "{err:?}"
    );
    let source = err.source().expect("the caller's error is the source");
    assert!(
        source.downcast_ref::<CatalogLocked>().is_some(),
        "the source is the caller's own error: {source:?}"
    );
    assert!(err.to_string().contains("catalog 17 is locked"), "{err}");
    assert_eq!(err.outcome(), Outcome::NotApplied);
    assert!(!err.is_retryable(), "the caller's code refused: no retry");
    assert_eq!(*ran.lock().unwrap(), vec!["step"], "the step ran once");
    let intent = prepared.get();
    assert_eq!(intent.kind, IntentKind::Transaction);
    assert_eq!(intent.point_ids.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_transaction_commit_failing_transiently_before_applying_is_retried_with_the_same_intent_owner_and_key()
 {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();
    let old = PointId::new_v7();
    let commits = Arc::new(Mutex::new(Vec::new()));
    let selector = DeleteSelector::MetadataEq {
        scope: Scope::new("catalog"),
        key: "item".into(),
        value: json!("sku-17"),
    };
    let new = record(1).with_metadata(json!({ "item": "sku-17" }));
    let new_id = new.id.unwrap();

    // No caller step: the store's connection type is never asked for.
    repo.expect_lookup_idempotency()
        .times(1)
        .in_sequence(&mut seq)
        .withf(|key| key == "replace-sku-17")
        .returning(|_| Ok(None));
    let prepared = expect_prepare(&mut repo, &mut seq);
    // One index write: the retry commits the points already written.
    expect_index_write(&mut index, &mut seq, &prepared);
    let cm = commits.clone();
    repo.expect_commit_transaction()
        .times(1)
        .in_sequence(&mut seq)
        .returning(move |intent, owner, commit, idem| {
            cm.lock().unwrap().push((intent, owner, commit, idem));
            Err(MetadataError::transient(
                "could not serialize access (40001)",
            ))
        });
    let cm = commits.clone();
    repo.expect_commit_transaction()
        .times(1)
        .in_sequence(&mut seq)
        .returning(move |intent, owner, commit, idem| {
            cm.lock().unwrap().push((intent, owner, commit, idem));
            Ok(TransactionCommitResult {
                summary: summary(1, 0, 1),
                garbage: vec![old],
                conflicts: vec![],
                versions: vec![],
            })
        });
    repo.expect_settle().times(0);
    // The cleanup deletes the deleted row's point — never the new ones: no
    // compensation.
    index
        .expect_delete()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |ids| ids == [old])
        .returning(|_| Ok(()));
    let p = prepared.clone();
    expect_resolve(&mut repo, &mut seq, &prepared, move || p.get().owner);

    let tx = Transaction::new()
        .delete(selector.clone())
        .upsert(vec![new]);
    let c = coordinator(repo, index);
    let report = c
        .transact(tx, &WriteOptions::idempotent("replace-sku-17"))
        .await
        .unwrap();

    let intent = prepared.get();
    assert_eq!(intent.kind, IntentKind::Transaction);
    assert_eq!(report.intent, intent.id);
    assert_eq!(report.ids, vec![vec![], vec![new_id]]);
    assert_eq!((report.inserted, report.updated, report.deleted), (1, 0, 1));
    assert_eq!(report.deferred_cleanup, 0);
    assert!(!report.replayed);

    let commits = commits.lock().unwrap();
    assert_eq!(commits.len(), 2);
    for (i, (id, owner, commit, idem)) in commits.iter().enumerate() {
        assert_eq!(*id, intent.id, "attempt {i}: the same intent");
        assert_eq!(*owner, intent.owner, "attempt {i}: the same owner token");
        assert_eq!(commit.parts.len(), 2, "attempt {i}");
        assert_eq!(commit.parts[0], CommitPart::Delete(selector.clone()));
        let rows = upsert_rows(&commit.parts[1]);
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].id, rows[0].point_id),
            (new_id, intent.point_ids[0])
        );
        assert!(commit.step.is_none() && !commit.hold && commit.saga.is_none());
        let idem = idem.as_ref().expect("the key is recorded with the commit");
        assert_eq!(idem.key, "replace-sku-17");
    }
    assert_eq!(commits[0].3, commits[1].3, "the same idempotency record");
}

// ---------------------------------------------------------------------------
// Sagas
// ---------------------------------------------------------------------------

/// What a saga case observes, in order: every journal write (`saga_save`,
/// described as `save <state> [<step>:<state> ...]`) and every run of a caller
/// action (`run <name>`) or compensation (`undo <name>`); and each save as
/// written, with its fence, and the context each compensation was given.
#[derive(Clone, Default)]
struct SagaLog(Arc<Mutex<SagaSeen>>);

#[derive(Default)]
struct SagaSeen {
    events: Vec<String>,
    saves: Vec<(SagaRecord, Option<OwnerToken>)>,
    undone: Vec<SagaContext>,
}

impl SagaLog {
    fn event(&self, event: String) {
        self.0.lock().unwrap().events.push(event);
    }
    fn saved(&self, saga: &SagaRecord, fence: Option<OwnerToken>) {
        let mut seen = self.0.lock().unwrap();
        let steps: Vec<String> = saga
            .steps
            .iter()
            .map(|s| format!("{}:{:?}", s.name, s.state))
            .collect();
        seen.events
            .push(format!("save {} [{}]", saga.state, steps.join(" ")));
        seen.saves.push((saga.clone(), fence));
    }
    fn events(&self) -> Vec<String> {
        self.0.lock().unwrap().events.clone()
    }
    fn saves(&self) -> Vec<(SagaRecord, Option<OwnerToken>)> {
        self.0.lock().unwrap().saves.clone()
    }
    fn undone(&self) -> Vec<SagaContext> {
        self.0.lock().unwrap().undone.clone()
    }
    /// The saga as first journaled (created).
    fn created(&self) -> SagaRecord {
        self.0.lock().unwrap().saves[0].0.clone()
    }
}

/// Expects `times` journal writes in a row (in `seq`), each logged; none
/// releases anything.
fn expect_saves(repo: &mut MockRepo, seq: &mut Sequence, log: &SagaLog, times: usize) {
    let log = log.clone();
    repo.expect_saga_save()
        .times(times)
        .in_sequence(seq)
        .returning(move |saga, fence| {
            log.saved(saga, fence);
            Ok(Vec::new())
        });
}

/// Checks the journal's fencing: created unfenced, then every write fenced by
/// the token it was created with, all of one saga.
fn assert_fenced_by_creator(log: &SagaLog) {
    let saves = log.saves();
    let created = &saves[0].0;
    assert_eq!(saves[0].1, None, "the first save creates the saga");
    for (i, (saga, fence)) in saves.iter().enumerate().skip(1) {
        assert_eq!(saga.id, created.id, "save {i}");
        assert_eq!(*fence, Some(created.owner), "save {i}: fenced by its owner");
        assert_eq!(saga.owner, created.owner, "save {i}");
    }
}

fn step_key_of(saga: SagaId, step: usize) -> String {
    format!("tandem:saga:{saga}:{step}")
}

/// A caller action `name` that logs its runs and its compensations (and
/// keeps each compensation's context); it fails with `fails` if given.
fn action(name: &'static str, log: &SagaLog, fails: Option<&'static str>) -> StepDefinition {
    let (run_log, undo_log) = (log.clone(), log.clone());
    StepDefinition::action(
        name,
        move |ctx: SagaContext| {
            let log = run_log.clone();
            async move {
                log.event(format!("run {name}"));
                match fails {
                    Some(message) => Err(message.into()),
                    None => Ok(json!({ "did": name, "step": ctx.step })),
                }
            }
        },
        move |ctx: SagaContext| {
            let log = undo_log.clone();
            async move {
                log.event(format!("undo {name}"));
                log.0.lock().unwrap().undone.push(ctx);
                Ok(())
            }
        },
    )
}

/// An irreversible action `name` (a pivot) that logs its runs.
fn pivot(name: &'static str, log: &SagaLog) -> StepDefinition {
    let log = log.clone();
    StepDefinition::irreversible(name, move |_ctx: SagaContext| {
        let log = log.clone();
        async move {
            log.event(format!("run {name}"));
            Ok(json!({ "did": name }))
        }
    })
}

/// A caller action `name` that takes `takes` (tokio time) and counts when it
/// ends; dropped before that, it never counts.
fn slow_action(
    name: &'static str,
    log: &SagaLog,
    takes: Duration,
    ended: Arc<AtomicUsize>,
) -> StepDefinition {
    let (run_log, undo_log) = (log.clone(), log.clone());
    StepDefinition::action(
        name,
        move |_ctx: SagaContext| {
            let (log, ended) = (run_log.clone(), ended.clone());
            async move {
                log.event(format!("run {name}"));
                tokio::time::sleep(takes).await;
                ended.fetch_add(1, Ordering::SeqCst);
                Ok(json!({ "did": name }))
            }
        },
        move |_ctx: SagaContext| {
            let log = undo_log.clone();
            async move {
                log.event(format!("undo {name}"));
                Ok(())
            }
        },
    )
}

/// A coordinator over `repo` with the saga "slow": one [`slow_action`] "a"
/// taking `takes`; and the count of the action's ends.
fn slow_saga(
    repo: MockRepo,
    log: &SagaLog,
    takes: Duration,
) -> (Coordinator<MockRepo, MockIndex>, Arc<AtomicUsize>) {
    let ended = Arc::new(AtomicUsize::new(0));
    let c = coordinator(repo, index_mock());
    c.register_saga(SagaDefinition::new("slow").step(slow_action("a", log, takes, ended.clone())))
        .unwrap();
    (c, ended)
}

#[tokio::test(start_paused = true)]
async fn a_slow_action_renews_its_sagas_lease_every_third_of_it_while_it_runs() {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let log = SagaLog::default();
    // create, started, three renewals (at a third, two thirds and one whole
    // lease into the action), done, then the saga's end.
    expect_saves(&mut repo, &mut seq, &log, 7);
    let lease = config().lease;
    let (c, ended) = slow_saga(repo, &log, lease + lease / 6);
    let started = tokio::time::Instant::now();
    let outcome = c.run_saga("slow", json!({})).await.unwrap();
    assert_eq!(outcome.state, SagaState::Done);
    assert_eq!(
        ended.load(Ordering::SeqCst),
        1,
        "the action ran to its end once"
    );
    assert_eq!(
        started.elapsed(),
        lease + lease / 6,
        "the action was not held up"
    );
    assert_eq!(
        log.events(),
        vec![
            "save running []",
            "save running [a:Started]",
            "run a",
            "save running [a:Started]",
            "save running [a:Started]",
            "save running [a:Started]",
            "save running [a:Done]",
            "save done [a:Done]",
        ]
    );
    // The renewals are journal writes like any other: fenced by the owner.
    assert_fenced_by_creator(&log);
}

#[tokio::test(start_paused = true)]
async fn a_slow_action_whose_lease_renewal_is_fenced_is_dropped_and_the_driver_stops() {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let log = SagaLog::default();
    expect_saves(&mut repo, &mut seq, &log, 2);
    // The first renewal finds the saga taken over (recovery claimed it
    // after this process stalled past the lease, say).
    let fenced_log = log.clone();
    repo.expect_saga_save()
        .times(1)
        .in_sequence(&mut seq)
        .returning(move |saga, fence| {
            fenced_log.saved(saga, fence);
            Err(MetadataError::SagaFenced { saga: saga.id })
        });
    let lease = config().lease;
    let (c, ended) = slow_saga(repo, &log, lease * 2);
    let started = tokio::time::Instant::now();
    let err = c.run_saga("slow", json!({})).await.unwrap_err();
    assert!(
        matches!(err, CoordinatorError::SagaFenced(_)),
        "the driver stops with the fence: {err:?}"
    );
    assert_eq!(started.elapsed(), lease / 3, "stopped at the first renewal");
    // Let the action's own time pass: it was dropped, so it never ends
    // (and it is not compensated here: the saga is the new owner's).
    tokio::time::sleep(lease * 3).await;
    assert_eq!(
        ended.load(Ordering::SeqCst),
        0,
        "the dropped action never ended"
    );
    assert_eq!(
        log.events(),
        vec![
            "save running []",
            "save running [a:Started]",
            "run a",
            "save running [a:Started]",
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_slow_action_whose_lease_cannot_be_renewed_is_dropped_when_the_lease_runs_out() {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let log = SagaLog::default();
    expect_saves(&mut repo, &mut seq, &log, 2);
    // The renewal a third of the lease into the action: the metadata store
    // is unreachable through every retry.
    let failing = log.clone();
    repo.expect_saga_save()
        .times(config().retry.max_attempts as usize)
        .in_sequence(&mut seq)
        .returning(move |_, _| {
            failing.event("renewal failed".into());
            Err(MetadataError::transient("connection refused"))
        });
    // The store is back for what follows: the failed step is compensated.
    expect_saves(&mut repo, &mut seq, &log, 3);
    let lease = config().lease;
    let (c, ended) = slow_saga(repo, &log, lease * 2);
    let started = tokio::time::Instant::now();
    let outcome = c.run_saga("slow", json!({})).await.unwrap();
    // The action began right after the step's `Started` save; with no
    // renewal since, the driver counts its lease as held for two thirds of
    // it from there, and no longer.
    let stopped = started.elapsed();
    assert!(
        stopped >= lease * 2 / 3 && stopped < lease,
        "the driver held on for {stopped:?} with a lease of {lease:?}"
    );
    assert_eq!(outcome.state, SagaState::Compensated);
    tokio::time::sleep(lease * 3).await;
    assert_eq!(
        ended.load(Ordering::SeqCst),
        0,
        "the dropped action never ended"
    );
    let mut expected = vec!["save running []", "save running [a:Started]", "run a"];
    expected.extend(std::iter::repeat_n(
        "renewal failed",
        config().retry.max_attempts as usize,
    ));
    expected.extend([
        "save compensating [a:Started]",
        "undo a",
        "save compensating [a:Compensated]",
        "save compensated [a:Compensated]",
    ]);
    assert_eq!(log.events(), expected);
    let saves = log.saves();
    let why = saves[2].0.last_error.as_deref().unwrap_or_default();
    assert!(
        why.contains("connection refused"),
        "the compensation says why: {why}"
    );
}

const REFUSED: &str = "the storefront refused the new prices (HTTP 422)";

#[tokio::test(start_paused = true)]
async fn a_static_saga_whose_third_action_fails_compensates_every_started_step_last_to_first() {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let log = SagaLog::default();
    // The journal is the only store call: create, then started/done per step,
    // compensating, one write per compensated step, compensated.
    expect_saves(&mut repo, &mut seq, &log, 11);
    repo.expect_undo_images().times(0);

    let c = coordinator(repo, index_mock());
    c.register_saga(
        SagaDefinition::new("reprice")
            .step(action("a", &log, None))
            .step(action("b", &log, None))
            .step(action("c", &log, Some(REFUSED))),
    )
    .unwrap();
    let input = json!({ "catalog": 17 });
    let outcome = c.run_saga("reprice", input.clone()).await.unwrap();

    // The failed step is compensated too, first: an action's error does not
    // prove it had no effect (it may have failed half-way, or timed out after
    // acting), so its compensation runs — given no output, as it "must accept
    // an action that never happened" (`SagaContext::output`; protocol.md: "A
    // failed action is compensated too"). Then the done steps, last to first.
    assert_eq!(
        log.events(),
        vec![
            "save running []",
            "save running [a:Started]",
            "run a",
            "save running [a:Done]",
            "save running [a:Done b:Started]",
            "run b",
            "save running [a:Done b:Done]",
            "save running [a:Done b:Done c:Started]",
            "run c",
            "save compensating [a:Done b:Done c:Started]",
            "undo c",
            "save compensating [a:Done b:Done c:Compensated]",
            "undo b",
            "save compensating [a:Done b:Compensated c:Compensated]",
            "undo a",
            "save compensating [a:Compensated b:Compensated c:Compensated]",
            "save compensated [a:Compensated b:Compensated c:Compensated]",
        ]
    );
    assert_fenced_by_creator(&log);
    let created = log.created();
    let id = created.id;
    assert_eq!((created.name.as_str(), &created.input), ("reprice", &input));
    let why = format!("step \"c\" failed: {REFUSED}");
    let saves = log.saves();
    assert_eq!(saves[6].0.last_error.as_deref(), Some(why.as_str()));
    let last = &saves[10].0;
    for (i, step) in last.steps.iter().enumerate() {
        assert_eq!(step.kind, StepKind::Action);
        assert_eq!(step.key, step_key_of(id, i));
        assert!(!step.pivot);
    }

    // Each compensation got its step's key and its step's output (none for c).
    let undone = log.undone();
    let got: Vec<(usize, String, Option<Value>)> = undone
        .iter()
        .map(|u| (u.step, u.key.clone(), u.output.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (2, step_key_of(id, 2), None),
            (
                1,
                step_key_of(id, 1),
                Some(json!({ "did": "b", "step": 1 }))
            ),
            (
                0,
                step_key_of(id, 0),
                Some(json!({ "did": "a", "step": 0 }))
            ),
        ]
    );

    assert_eq!(outcome.id, id);
    assert_eq!(outcome.state, SagaState::Compensated);
    assert_eq!(outcome.error.as_deref(), Some(why.as_str()));
    assert_eq!(
        outcome.outputs,
        vec![
            json!({ "did": "a", "step": 0 }),
            json!({ "did": "b", "step": 1 }),
            Value::Null
        ]
    );
    assert!(outcome.conflicts.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_saga_step_failing_retryably_after_the_pivot_stays_running_with_its_error_and_compensates_nothing()
 {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let log = SagaLog::default();
    let id = RecordId::new_v7();

    // Create; a started, done; the pivot started, done; the Tandem step started.
    expect_saves(&mut repo, &mut seq, &log, 6);
    let l = log.clone();
    repo.expect_lookup_idempotency()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |key| key == step_key_of(l.created().id, 2))
        .returning(|_| Ok(None));
    // The store is unavailable through every attempt of the step's prepare:
    // nothing of the step was written anywhere.
    repo.expect_prepare()
        .times(config().retry.max_attempts as usize)
        .in_sequence(&mut seq)
        .withf(|i| i.kind == IntentKind::Transaction && i.point_ids.len() == 1)
        .returning(|_| Err(MetadataError::transient("connection refused")));
    // The step's error journaled; the saga stays running.
    expect_saves(&mut repo, &mut seq, &log, 1);
    repo.expect_undo_images().times(0);

    let c = coordinator(repo, index_mock());
    c.register_saga(
        SagaDefinition::new("publish")
            .step(action("a", &log, None))
            .step(pivot("p", &log))
            .step(StepDefinition::tandem("index", move |_ctx| {
                Ok(Transaction::new().upsert(vec![
                    NewRecord::new("catalog", "x", vec![1.0, 0.0, 0.0]).with_id(id),
                ]))
            })),
    )
    .unwrap();
    let err = c.run_saga("publish", json!({})).await.unwrap_err();

    // No compensation at all: past the pivot the saga only goes forward, and
    // recovery retries the step after the lease.
    assert_eq!(
        log.events(),
        vec![
            "save running []",
            "save running [a:Started]",
            "run a",
            "save running [a:Done]",
            "save running [a:Done p:Started]",
            "run p",
            "save running [a:Done p:Done]",
            "save running [a:Done p:Done index:Started]",
            "save running [a:Done p:Done index:Started]",
        ]
    );
    assert_fenced_by_creator(&log);
    let saga = log.created().id;
    let saves = log.saves();
    let last = &saves[6].0;
    assert!(last.steps[1].pivot);
    assert_eq!(last.steps[2].kind, StepKind::Tandem);
    let error = last
        .last_error
        .as_deref()
        .expect("the step's error is journaled");
    assert!(
        error.starts_with("step \"index\" failed:") && error.contains("connection refused"),
        "{error}"
    );

    // The caller learns the saga is unfinished (recovery finishes it), with the
    // store's error under it.
    let CoordinatorError::SagaUnfinished { saga: s, source } = &err else {
        panic!("expected SagaUnfinished, got {err:?}");
    };
    assert_eq!(*s, saga);
    assert!(
        matches!(
            **source,
            CoordinatorError::Metadata(MetadataError::Transient { .. })
        ),
        "{source:?}"
    );
    assert!(!err.is_retryable(), "starting it again would start another");
}

#[tokio::test(start_paused = true)]
async fn a_saga_step_failing_for_good_after_the_pivot_fails_the_saga_and_compensates_nothing() {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let log = SagaLog::default();
    expect_saves(&mut repo, &mut seq, &log, 7);
    repo.expect_undo_images().times(0);

    let c = coordinator(repo, index_mock());
    c.register_saga(
        SagaDefinition::new("publish")
            .step(action("a", &log, None))
            .step(pivot("p", &log))
            .step(action("c", &log, Some(REFUSED))),
    )
    .unwrap();
    let outcome = c.run_saga("publish", json!({})).await.unwrap();

    // An action's own error is hopeless (no retry can help): the saga ends
    // failed, for an operator, and nothing before the pivot is undone.
    assert_eq!(
        log.events(),
        vec![
            "save running []",
            "save running [a:Started]",
            "run a",
            "save running [a:Done]",
            "save running [a:Done p:Started]",
            "run p",
            "save running [a:Done p:Done]",
            "save running [a:Done p:Done c:Started]",
            "run c",
            "save failed [a:Done p:Done c:Started]",
        ]
    );
    assert_fenced_by_creator(&log);
    let why = format!("step \"c\" failed: {REFUSED}");
    let saves = log.saves();
    assert_eq!(saves[6].0.last_error.as_deref(), Some(why.as_str()));
    assert!(log.undone().is_empty());
    assert_eq!(outcome.id, log.created().id);
    assert_eq!(outcome.state, SagaState::Failed);
    assert_eq!(outcome.error.as_deref(), Some(why.as_str()));
}

/// A dynamic saga's first Tandem step whose commit's outcome stays unknown:
/// expects (in `seq`) the saga's creation and the step's start (logged), the
/// key lookup, prepare, index write, a commit whose reply is lost, and a
/// settlement that fails on every attempt — and nothing else (no
/// compensation, no resolve, no journal write). Returns the prepared intent
/// and the idempotency record the commit carried.
fn expect_step_with_unknown_outcome(
    repo: &mut MockRepo,
    index: &mut MockIndex,
    seq: &mut Sequence,
    log: &SagaLog,
) -> (Slot<NewIntent>, Slot<IdempotencyRecord>) {
    expect_saves(repo, seq, log, 2);
    let l = log.clone();
    repo.expect_lookup_idempotency()
        .times(1)
        .in_sequence(seq)
        .withf(move |key| key == step_key_of(l.created().id, 0))
        .returning(|_| Ok(None));
    let prepared = expect_prepare(repo, seq);
    expect_index_write(index, seq, &prepared);
    let record = Slot::new();
    let (p, l, r) = (prepared.clone(), log.clone(), record.clone());
    repo.expect_commit_transaction()
        .times(1)
        .in_sequence(seq)
        .withf(move |intent, owner, commit, idem| {
            let saga = l.created();
            *intent == p.get().id
                && *owner == p.get().owner
                && commit.hold
                && commit.saga
                    == Some(SagaFence {
                        saga: saga.id,
                        owner: saga.owner,
                    })
                && idem
                    .as_ref()
                    .is_some_and(|i| i.key == step_key_of(saga.id, 0))
        })
        .returning(move |_, _, _, idem| {
            r.set(idem.unwrap());
            Err(MetadataError::ambiguous(
                "connection reset after COMMIT was sent",
            ))
        });
    let p = prepared.clone();
    repo.expect_settle()
        .times(config().retry.max_attempts as usize)
        .in_sequence(seq)
        .withf(move |intent, owner, _| *intent == p.get().id && *owner == p.get().owner)
        .returning(|_, _, _| Err(MetadataError::transient("connection refused")));
    (prepared, record)
}

/// Expects (in `seq`) the saga's terminal `Done` write, which releases the
/// held intent `held`, and the release's cleanup: nothing to delete (the step
/// superseded nothing), the intent resolved under the saga's token.
fn expect_finish(repo: &mut MockRepo, seq: &mut Sequence, log: &SagaLog, held: Slot<IntentId>) {
    let (l, h) = (log.clone(), held.clone());
    repo.expect_saga_save()
        .times(1)
        .in_sequence(seq)
        .withf(|saga, _| saga.state == SagaState::Done)
        .returning(move |saga, fence| {
            l.saved(saga, fence);
            Ok(vec![Intent {
                kind: IntentKind::Transaction,
                lease_deadline_ms: saga.lease_deadline_ms,
                ..intent_row(
                    h.get(),
                    IntentState::Committed,
                    saga.owner,
                    vec![],
                    Some(summary(1, 0, 0)),
                )
            }])
        });
    let l = log.clone();
    repo.expect_resolve_many()
        .times(1)
        .in_sequence(seq)
        .withf(move |intents, owner| intents == [held.get()] && *owner == l.created().owner)
        .returning(|intents, _| Ok(intents.len()));
}

/// Registers and begins the dynamic saga "ingest" on `c` and runs its step
/// "batch-0" (one record), whose outcome stays unknown
/// ([`expect_step_with_unknown_outcome`] sets up the calls).
async fn begin_with_an_unknown_step(
    c: &Coordinator<MockRepo, MockIndex>,
) -> tandem_core::SagaRun<'_, MockRepo, MockIndex> {
    c.register_saga(SagaDefinition::dynamic("ingest")).unwrap();
    let mut run = c.begin_saga("ingest", json!({})).await.unwrap();
    let err = run
        .step("batch-0", Transaction::new().upsert(vec![record(1)]))
        .await
        .unwrap_err();
    assert_eq!(err.outcome(), Outcome::Unknown);
    run
}

#[tokio::test(start_paused = true)]
async fn a_dynamic_saga_step_with_an_unknown_outcome_blocks_other_steps_and_is_retried_under_the_same_key()
 {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();
    let log = SagaLog::default();

    let (first, first_key) =
        expect_step_with_unknown_outcome(&mut repo, &mut index, &mut seq, &log);
    // `step("batch-1")` is refused without any store call. The retry of
    // "batch-0": no new journal write (it is journaled started), the same key
    // looked up — not recorded: the first attempt has not committed (were it
    // still to, the key lets only one of the two commits apply)...
    let l = log.clone();
    repo.expect_lookup_idempotency()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |key| key == step_key_of(l.created().id, 0))
        .returning(|_| Ok(None));
    // ...so it is committed now, as a new write under a new intent.
    let second = expect_prepare(&mut repo, &mut seq);
    expect_index_write(&mut index, &mut seq, &second);
    let (p, l, k) = (second.clone(), log.clone(), first_key.clone());
    repo.expect_commit_transaction()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |intent, owner, commit, idem| {
            let saga = l.created();
            let idem = idem.as_ref().expect("the step's key");
            *intent == p.get().id
                && *owner == p.get().owner
                && commit.hold
                && commit.saga
                    == Some(SagaFence {
                        saga: saga.id,
                        owner: saga.owner,
                    })
                && idem.key == step_key_of(saga.id, 0)
                && idem.key == k.get().key
                && idem.request_hash == k.get().request_hash
        })
        .returning(|_, _, _, _| {
            Ok(TransactionCommitResult {
                summary: summary(1, 0, 0),
                garbage: vec![],
                conflicts: vec![],
                versions: vec![],
            })
        });
    // Journaled done, holding the new intent.
    let p = second.clone();
    let l = log.clone();
    repo.expect_saga_save()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |saga, _| {
            saga.steps.len() == 1
                && saga.steps[0].state == StepState::Done
                && saga.steps[0].intent == Some(p.get().id)
        })
        .returning(move |saga, fence| {
            l.saved(saga, fence);
            Ok(Vec::new())
        });
    let held = Slot::new();
    expect_finish(&mut repo, &mut seq, &log, held.clone());
    repo.expect_undo_images().times(0);
    repo.expect_resolve().times(0);
    index.expect_delete().times(0);

    let c = coordinator(repo, index);
    c.register_saga(SagaDefinition::dynamic("ingest")).unwrap();
    let mut run = c
        .begin_saga("ingest", json!({ "file": "f.jsonl" }))
        .await
        .unwrap();
    let batch = record(1);
    let tx = Transaction::new().upsert(vec![batch.clone()]);

    let err = run.step("batch-0", tx.clone()).await.unwrap_err();
    assert!(
        matches!(err, CoordinatorError::OutcomeUnknown { intent, .. } if intent == first.get().id),
        "{err:?}"
    );
    assert_eq!(err.outcome(), Outcome::Unknown);

    let err = run
        .step("batch-1", Transaction::new().upsert(vec![record(2)]))
        .await
        .unwrap_err();
    let CoordinatorError::Config(message) = &err else {
        panic!("expected a refusal, got {err:?}");
    };
    assert!(message.contains("\"batch-0\""), "{message}");

    let report = run.step("batch-0", tx).await.unwrap();
    let (first, second) = (first.get(), second.get());
    assert_ne!(second.id, first.id, "a new write, under a new intent");
    assert_ne!(second.owner, first.owner);
    assert_eq!(report.intent, second.id);
    assert_eq!(report.ids, vec![vec![batch.id.unwrap()]]);
    assert_eq!(report.inserted, 1);
    assert!(!report.replayed);

    held.set(second.id);
    let outcome = run.finish().await.unwrap();
    assert_eq!(outcome.state, SagaState::Done);
    assert_eq!(outcome.id, log.created().id);

    assert_eq!(
        log.events(),
        vec![
            "save running []",
            "save running [batch-0:Started]",
            "save running [batch-0:Done]",
            "save done [batch-0:Done]",
        ]
    );
    assert_fenced_by_creator(&log);
    let saves = log.saves();
    let step = &saves[1].0.steps[0];
    assert_eq!(
        (step.kind, step.key.clone(), step.intent),
        (StepKind::Tandem, step_key_of(outcome.id, 0), None)
    );
    assert_eq!(saves[2].0.steps[0].key, step_key_of(outcome.id, 0));
}

#[tokio::test(start_paused = true)]
async fn a_dynamic_saga_step_with_an_unknown_outcome_that_did_commit_is_answered_from_its_key_on_retry()
 {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();
    let log = SagaLog::default();

    let (first, first_key) =
        expect_step_with_unknown_outcome(&mut repo, &mut index, &mut seq, &log);
    // The retry finds the key recorded: the first attempt committed. Nothing
    // is written again (no prepare, no index write, no commit).
    let (l, k) = (log.clone(), first_key.clone());
    repo.expect_lookup_idempotency()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |key| key == step_key_of(l.created().id, 0))
        .returning(move |_| {
            Ok(Some(IdempotencyRecord {
                summary: summary(1, 0, 0),
                ..k.get()
            }))
        });
    let (p, l) = (first.clone(), log.clone());
    repo.expect_saga_save()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |saga, _| {
            saga.steps[0].state == StepState::Done && saga.steps[0].intent == Some(p.get().id)
        })
        .returning(move |saga, fence| {
            l.saved(saga, fence);
            Ok(Vec::new())
        });
    let held = Slot::new();
    expect_finish(&mut repo, &mut seq, &log, held.clone());

    let c = coordinator(repo, index);
    c.register_saga(SagaDefinition::dynamic("ingest")).unwrap();
    let mut run = c.begin_saga("ingest", json!({})).await.unwrap();
    let tx = Transaction::new().upsert(vec![record(1)]);
    let err = run.step("batch-0", tx.clone()).await.unwrap_err();
    assert_eq!(err.outcome(), Outcome::Unknown);

    let report = run.step("batch-0", tx).await.unwrap();
    assert!(report.replayed);
    assert_eq!(report.intent, first.get().id, "the first attempt's intent");
    assert_eq!(report.inserted, 1);

    held.set(first.get().id);
    let outcome = run.finish().await.unwrap();
    assert_eq!(outcome.state, SagaState::Done);
    assert_eq!(
        log.events(),
        vec![
            "save running []",
            "save running [batch-0:Started]",
            "save running [batch-0:Done]",
            "save done [batch-0:Done]",
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn finishing_a_dynamic_saga_whose_step_has_an_unknown_outcome_is_refused_without_a_store_call()
 {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();
    let log = SagaLog::default();
    expect_step_with_unknown_outcome(&mut repo, &mut index, &mut seq, &log);
    // Nothing after the step: no journal write (the saga stays running, its
    // step started, for recovery to settle and compensate after the lease).

    let c = coordinator(repo, index);
    let run = begin_with_an_unknown_step(&c).await;

    let err = run.finish().await.unwrap_err();
    let id = log.created().id;
    let CoordinatorError::SagaUnfinished { saga, source } = &err else {
        panic!("expected SagaUnfinished, got {err:?}");
    };
    assert_eq!(*saga, id);
    assert!(
        matches!(&**source, CoordinatorError::Config(m) if m.contains("unknown")),
        "{source:?}"
    );
    assert_eq!(
        log.events(),
        vec!["save running []", "save running [batch-0:Started]"]
    );
}

#[tokio::test(start_paused = true)]
async fn aborting_a_saga_whose_step_has_an_unknown_outcome_hands_it_to_a_new_token_before_asking_the_key()
 {
    let mut seq = Sequence::new();
    let mut repo = MockRepo::new();
    let mut index = index_mock();
    let log = SagaLog::default();
    expect_step_with_unknown_outcome(&mut repo, &mut index, &mut seq, &log);
    // The abort's first journal write hands the saga over: a new owner
    // token, fenced by the old one — the token the step's commit, perhaps
    // still on its way, carries. Only then is the key asked...
    expect_saves(&mut repo, &mut seq, &log, 1);
    let l = log.clone();
    repo.expect_lookup_idempotency()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |key| key == step_key_of(l.created().id, 0))
        .returning(|_| Ok(None));
    // ...and its absence is final: the step is journaled compensated, then
    // the saga, both under the new token.
    expect_saves(&mut repo, &mut seq, &log, 2);
    repo.expect_undo_images().times(0);
    repo.expect_commit_transaction().times(0);
    index.expect_delete().times(0);

    let c = coordinator(repo, index);
    let run = begin_with_an_unknown_step(&c).await;

    let outcome = run.abort("the caller gave up").await.unwrap();
    assert_eq!(outcome.state, SagaState::Compensated);
    assert_eq!(
        log.events(),
        vec![
            "save running []",
            "save running [batch-0:Started]",
            "save compensating [batch-0:Started]",
            "save compensating [batch-0:Compensated]",
            "save compensated [batch-0:Compensated]",
        ]
    );
    let saves = log.saves();
    let old = log.created().owner;
    let (handed, fence) = &saves[2];
    assert_eq!(
        *fence,
        Some(old),
        "the hand-over is fenced by the old token"
    );
    assert_ne!(handed.owner, old, "and names a new one");
    for (i, (saga, fence)) in saves.iter().enumerate().skip(3) {
        assert_eq!(*fence, Some(handed.owner), "save {i}: under the new token");
        assert_eq!(saga.owner, handed.owner, "save {i}");
    }
}
