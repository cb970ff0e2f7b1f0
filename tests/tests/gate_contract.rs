//! What the coordinator does when a store breaks `commit_upsert_gated`'s
//! contract and commits although the index write it waited for failed: the
//! rows are committed, so the call must not report "not applied" (I3), and
//! nothing may be compensated — it reports an unknown outcome instead.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use tandem_adapters::memory::{InMemoryMetadataRepo, InMemoryVectorIndex};
use tandem_core::testkit::faults::{Call, Fault, FaultController, FaultyVectorIndex, Rule};
use tandem_core::{
    Coordinator, CoordinatorError, DeleteCommit, DeleteSelector, Distance, IdempotencyRecord,
    IndexGate, Intent, IntentId, MetadataError, MetadataRepo, NewIntent, NewRecord, Outcome,
    OwnerToken, Page, PointId, RecordId, RowRef, RowWrite, Scope, Settlement, StoredRecord,
    UpsertCommit,
};

/// A store whose gated commit ignores the gate (a broken adapter).
struct GateBlind(InMemoryMetadataRepo);

#[async_trait]
impl MetadataRepo for GateBlind {
    async fn prepare(&self, intent: &NewIntent) -> Result<(), MetadataError> {
        self.0.prepare(intent).await
    }
    async fn commit_upsert(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        rows: &[RowWrite],
        idempotency: Option<&IdempotencyRecord>,
    ) -> Result<UpsertCommit, MetadataError> {
        self.0.commit_upsert(intent, owner, rows, idempotency).await
    }
    async fn commit_upsert_gated(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        rows: &[RowWrite],
        idempotency: Option<&IdempotencyRecord>,
        _gate: &IndexGate,
    ) -> Result<UpsertCommit, MetadataError> {
        self.0.commit_upsert(intent, owner, rows, idempotency).await
    }
    async fn commit_delete(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        selector: &DeleteSelector,
        idempotency: Option<&IdempotencyRecord>,
    ) -> Result<DeleteCommit, MetadataError> {
        self.0
            .commit_delete(intent, owner, selector, idempotency)
            .await
    }
    async fn settle(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        fence: OwnerToken,
    ) -> Result<Settlement, MetadataError> {
        self.0.settle(intent, owner, fence).await
    }
    async fn resolve(&self, intent: IntentId, owner: OwnerToken) -> Result<bool, MetadataError> {
        self.0.resolve(intent, owner).await
    }
    async fn claim_expired(
        &self,
        now_ms: i64,
        owner: OwnerToken,
        lease_deadline_ms: i64,
        limit: usize,
    ) -> Result<Vec<Intent>, MetadataError> {
        self.0
            .claim_expired(now_ms, owner, lease_deadline_ms, limit)
            .await
    }
    async fn record_failure(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        message: &str,
    ) -> Result<(), MetadataError> {
        self.0.record_failure(intent, owner, message).await
    }
    async fn referenced_points(
        &self,
        points: &[PointId],
    ) -> Result<HashSet<PointId>, MetadataError> {
        self.0.referenced_points(points).await
    }
    async fn rows_by_points(&self, points: &[PointId]) -> Result<Vec<StoredRecord>, MetadataError> {
        self.0.rows_by_points(points).await
    }
    async fn get(&self, ids: &[RecordId]) -> Result<Vec<StoredRecord>, MetadataError> {
        self.0.get(ids).await
    }
    async fn lookup_idempotency(
        &self,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, MetadataError> {
        self.0.lookup_idempotency(key).await
    }
    async fn scan_refs(
        &self,
        scope: Option<&Scope>,
        after: Option<RecordId>,
        limit: usize,
    ) -> Result<Page<RowRef, RecordId>, MetadataError> {
        self.0.scan_refs(scope, after, limit).await
    }
    async fn list_intents(&self, limit: usize) -> Result<Vec<Intent>, MetadataError> {
        self.0.list_intents(limit).await
    }
    async fn count_by_scope(&self) -> Result<BTreeMap<Scope, u64>, MetadataError> {
        self.0.count_by_scope().await
    }
}

#[tokio::test]
async fn a_store_that_commits_past_a_failed_gate_gets_an_unknown_outcome_not_a_rollback() {
    let index = Arc::new(InMemoryVectorIndex::new(3, Distance::Cosine));
    let ctl = FaultController::new(1);
    ctl.add(Rule::always(Call::IndexUpsert, Fault::Reject));
    let c = Coordinator::new(
        GateBlind(InMemoryMetadataRepo::new()),
        FaultyVectorIndex::new(index.clone(), ctl.clone()),
        tandem_core::CoordinatorConfig::default(),
    )
    .expect("config");
    let err = c
        .upsert(vec![NewRecord::new("s", "a", vec![1.0, 0.0, 0.0])])
        .await
        .expect_err("the index write failed");
    assert!(
        matches!(err, CoordinatorError::OutcomeUnknown { .. }),
        "{err:?}"
    );
    assert_eq!(err.outcome(), Outcome::Unknown);
    // The row is committed, and nothing was compensated: the only index
    // calls were the rejected upserts.
    assert_eq!(c.repo().0.count_by_scope().await.unwrap().len(), 1);
    assert_eq!(ctl.invocations(Call::IndexDelete), 0, "{:?}", ctl.calls());
}

#[tokio::test]
async fn with_the_default_gate_a_failed_index_write_is_not_applied_and_compensated() {
    let index = Arc::new(InMemoryVectorIndex::new(3, Distance::Cosine));
    let ctl = FaultController::new(1);
    ctl.add(Rule::always(Call::IndexUpsert, Fault::Reject));
    let c = Coordinator::new(
        InMemoryMetadataRepo::new(),
        FaultyVectorIndex::new(index.clone(), ctl.clone()),
        tandem_core::CoordinatorConfig::default(),
    )
    .expect("config");
    let err = c
        .upsert(vec![NewRecord::new("s", "a", vec![1.0, 0.0, 0.0])])
        .await
        .expect_err("the index write failed");
    assert_eq!(err.outcome(), Outcome::NotApplied, "{err:?}");
    assert!(c.repo().count_by_scope().await.unwrap().is_empty());
    assert!(c.repo().list_intents(10).await.unwrap().is_empty());
    assert_eq!(ctl.invocations(Call::IndexDelete), 1, "compensated");
}
