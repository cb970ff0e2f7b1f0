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

use async_trait::async_trait;
use mockall::{Sequence, mock};
use serde_json::json;
use tandem_core::{
    CommitSummary, Coordinator, CoordinatorConfig, CoordinatorError, DeleteCommit, DeleteSelector,
    Distance, Filter, IdempotencyRecord, IndexError, IndexQuery, Intent, IntentId, IntentKind,
    IntentState, MetadataError, MetadataRepo, NewIntent, NewRecord, Outcome, OwnerToken, Page,
    Point, PointId, PointInfo, RecordId, RetryPolicy, RowRef, RowWrite, Scope, ScoredPoint,
    SearchQuery, Settlement, StoredRecord, UpsertCommit, ValidationError, VectorIndex,
    WriteOptions,
};

// mockall cannot mock an async_trait method taking `Option<&T>` (the argument's
// lifetime gets tied to `&self`), so each mock implements a mirror of its port
// with those options owned, and the port is implemented for the mock by
// forwarding. Every other argument is passed through as is.

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
async fn recovery_deletes_only_unreferenced_points_then_resolves_and_claims_again_after_a_full_batch()
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
    let (c, id_a) = (claimer.clone(), a.id);
    repo.expect_resolve()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |intent, owner| *intent == id_a && *owner == c.get())
        .returning(|_, _| Ok(true));
    // Intent b names no point: no lookup, no index call, just resolve.
    let (c, id_b) = (claimer.clone(), b.id);
    repo.expect_resolve()
        .times(1)
        .in_sequence(&mut seq)
        .withf(move |intent, owner| *intent == id_b && *owner == c.get())
        .returning(|_, _| Ok(true));
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
    repo.expect_resolve()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_, _| Ok(true));

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
