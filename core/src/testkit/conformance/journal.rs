//! The [`MetadataRepo`] conformance cases of transactions, held commits and
//! the saga journal, one per contract bullet.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::future::{BoxFuture, join_all};
use serde_json::json;

use super::metadata::{
    ALL, CLAIM_NOW_MS, FAR_FUTURE_MS, assert_row_is, committed, fresh_scope, get_one, idempotency,
    intent_of, new_intent, ok, points_of, prepared, rewrite, row, row_with_metadata,
};
use crate::error::{BoxError, MetadataError, Outcome};
use crate::model::{
    CommitPart, CommitSummary, DeleteSelector, IntentId, IntentKind, IntentState, NewIntent,
    OwnerToken, PointId, RecordId, RowWrite, SagaFence, SagaId, StoredRecordImage,
    TransactionCommit, TransactionCommitResult, UndoImage,
};
use crate::ports::{IndexGate, MetadataRepo};
use crate::saga::{SagaRecord, SagaState, StepKind, StepRecord, StepState};
use crate::transaction::{CommitStep, ConnectionType};

fn held(parts: &[CommitPart]) -> TransactionCommit<'_> {
    TransactionCommit {
        hold: true,
        ..TransactionCommit::of(parts)
    }
}

/// Every new point the parts' upserts write.
fn new_points(parts: &[CommitPart]) -> Vec<PointId> {
    parts
        .iter()
        .flat_map(|p| match p {
            CommitPart::Upsert(rows) => points_of(rows),
            _ => Vec::new(),
        })
        .collect()
}

async fn commit_parts<M: MetadataRepo + ?Sized>(
    repo: &M,
    commit: &TransactionCommit<'_>,
) -> (NewIntent, Result<TransactionCommitResult, MetadataError>) {
    let intent = prepared(repo, IntentKind::Transaction, new_points(commit.parts)).await;
    let result = repo
        .commit_transaction(intent.id, intent.owner, commit, None, &IndexGate::passed())
        .await;
    (intent, result)
}

fn as_set<T: Ord + Copy>(items: &[T]) -> BTreeSet<T> {
    items.iter().copied().collect()
}

// ---------------------------------------------------------- transactions

/// `commit_transaction_applies_parts_in_order`: each part has the effect of
/// the matching single commit, in order, in one transaction.
pub async fn commit_transaction_applies_parts_in_order<M: MetadataRepo + ?Sized>(repo: &M) {
    let scope = fresh_scope("tx-order");
    let a = row(&scope, 1);
    let b = row(&scope, 2);
    let d = row_with_metadata(&scope, json!({ "item": "x" }));
    committed(repo, &[a.clone(), b.clone(), d.clone()]).await;
    // A deleted then upserted again; C new; B updated; D deleted by metadata;
    // E written and deleted within the unit.
    let a2 = rewrite(&a, &scope, 10);
    let c = row(&scope, 3);
    let b2 = rewrite(&b, &scope, 20);
    let e = row(&scope, 5);
    let parts = vec![
        CommitPart::Delete(DeleteSelector::Ids(vec![a.id])),
        CommitPart::Upsert(vec![a2.clone(), c.clone()]),
        CommitPart::Upsert(vec![b2.clone()]),
        CommitPart::Delete(DeleteSelector::MetadataEq {
            scope: scope.clone(),
            key: "item".into(),
            value: json!("x"),
        }),
        CommitPart::Upsert(vec![e.clone()]),
        CommitPart::Delete(DeleteSelector::Ids(vec![e.id])),
    ];
    let (intent, result) = commit_parts(repo, &TransactionCommit::of(&parts)).await;
    let result = ok(result, "commit_transaction");
    assert_eq!(
        result.summary,
        CommitSummary {
            inserted: 3,
            updated: 1,
            deleted: 3
        },
        "A and E deleted and inserted, C inserted, B updated, D deleted"
    );
    let garbage = as_set(&[a.point_id, b.point_id, d.point_id, e.point_id]);
    assert_eq!(as_set(&result.garbage), garbage);
    assert_eq!(result.garbage.len(), garbage.len(), "a point listed twice");
    assert_row_is(&get_one(repo, a.id).await.expect("A again"), &a2, 1);
    assert_row_is(&get_one(repo, c.id).await.expect("C"), &c, 1);
    assert_row_is(&get_one(repo, b.id).await.expect("B"), &b2, 2);
    assert!(get_one(repo, d.id).await.is_none(), "D not deleted");
    assert!(get_one(repo, e.id).await.is_none(), "E not deleted");
    let stored = intent_of(repo, intent.id).await;
    assert_eq!(stored.state, IntentState::Committed);
    assert_eq!(as_set(&stored.point_ids), garbage);
    let live = ok(
        repo.referenced_points(&[a2.point_id, c.point_id, b2.point_id, e.point_id])
            .await,
        "referenced_points",
    );
    assert_eq!(
        live,
        [a2.point_id, c.point_id, b2.point_id].into_iter().collect()
    );
}

/// `commit_transaction_fenced_by_owner`: another owner's token fails with
/// `Fenced` and writes nothing.
pub async fn commit_transaction_fenced_by_owner<M: MetadataRepo + ?Sized>(repo: &M) {
    let scope = fresh_scope("tx-fenced");
    let a = row(&scope, 1);
    committed(repo, std::slice::from_ref(&a)).await;
    let c = row(&scope, 2);
    let parts = vec![
        CommitPart::Upsert(vec![c.clone()]),
        CommitPart::Delete(DeleteSelector::Ids(vec![a.id])),
    ];
    let intent = prepared(
        repo,
        IntentKind::Transaction,
        points_of(std::slice::from_ref(&c)),
    )
    .await;
    let err = repo
        .commit_transaction(
            intent.id,
            OwnerToken::new_random(),
            &TransactionCommit::of(&parts),
            None,
            &IndexGate::passed(),
        )
        .await
        .expect_err("a commit by another owner must be fenced");
    assert!(
        matches!(err, MetadataError::Fenced { intent: i } if i == intent.id),
        "expected Fenced, got {err:?}"
    );
    assert!(get_one(repo, c.id).await.is_none(), "C was written");
    assert_row_is(&get_one(repo, a.id).await.expect("A kept"), &a, 1);
    assert_eq!(
        intent_of(repo, intent.id).await.state,
        IntentState::Prepared
    );
}

/// A live saga owned by `owner` (`lease` its deadline).
fn saga_record(owner: OwnerToken, state: SagaState, lease: i64) -> SagaRecord {
    SagaRecord {
        id: SagaId::new_random(),
        name: "conformance".into(),
        input: json!({ "n": 1 }),
        state,
        steps: Vec::new(),
        owner,
        lease_deadline_ms: lease,
        attempts: 0,
        last_error: None,
        created_ms: super::metadata::now_ms(),
        updated_ms: super::metadata::now_ms(),
    }
}

async fn created<M: MetadataRepo + ?Sized>(repo: &M, saga: SagaRecord) -> SagaRecord {
    ok(repo.saga_save(&saga, None).await, "saga_save (create)");
    saga
}

/// `commit_transaction_fenced_by_saga`: a missing, ended or foreign saga
/// fence fails with `SagaFenced` and writes nothing.
pub async fn commit_transaction_fenced_by_saga<M: MetadataRepo + ?Sized>(repo: &M) {
    let scope = fresh_scope("tx-saga-fence");
    let driver = OwnerToken::new_random();
    let live = created(repo, saga_record(driver, SagaState::Running, FAR_FUTURE_MS)).await;
    let mut ended = created(repo, saga_record(driver, SagaState::Running, FAR_FUTURE_MS)).await;
    ended.state = SagaState::Done;
    ok(
        repo.saga_save(&ended, Some(driver)).await,
        "saga_save (end)",
    );
    let fences = [
        (live.id, OwnerToken::new_random(), "another owner"),
        (SagaId::new_random(), driver, "a missing saga"),
        (ended.id, driver, "an ended saga"),
    ];
    for (saga, owner, what) in fences {
        let c = row(&scope, 1);
        let parts = vec![CommitPart::Upsert(vec![c.clone()])];
        let commit = TransactionCommit {
            saga: Some(SagaFence { saga, owner }),
            ..held(&parts)
        };
        let (intent, result) = commit_parts(repo, &commit).await;
        let err = result.expect_err(what);
        assert!(
            matches!(err, MetadataError::SagaFenced { saga: s } if s == saga),
            "{what}: expected SagaFenced, got {err:?}"
        );
        assert_eq!(err.outcome(), Outcome::NotApplied);
        assert!(get_one(repo, c.id).await.is_none(), "{what}: C was written");
        assert_eq!(
            intent_of(repo, intent.id).await.state,
            IntentState::Prepared
        );
    }
    // The driver that owns the live saga commits.
    let c = row(&scope, 2);
    let parts = vec![CommitPart::Upsert(vec![c.clone()])];
    let commit = TransactionCommit {
        saga: Some(SagaFence {
            saga: live.id,
            owner: driver,
        }),
        ..held(&parts)
    };
    ok(
        commit_parts(repo, &commit).await.1,
        "commit by the saga's driver",
    );
    assert_row_is(&get_one(repo, c.id).await.expect("C"), &c, 1);
}

/// `commit_transaction_is_idempotent`: a repeated commit returns the recorded
/// result and changes nothing.
pub async fn commit_transaction_is_idempotent<M: MetadataRepo + ?Sized>(repo: &M) {
    let scope = fresh_scope("tx-idempotent");
    let a = row(&scope, 1);
    committed(repo, std::slice::from_ref(&a)).await;
    let a2 = rewrite(&a, &scope, 2);
    let c = row(&scope, 3);
    let parts = vec![CommitPart::Upsert(vec![a2.clone(), c.clone()])];
    let (intent, first) = commit_parts(repo, &TransactionCommit::of(&parts)).await;
    let first = ok(first, "commit_transaction");
    let again = ok(
        repo.commit_transaction(
            intent.id,
            intent.owner,
            &TransactionCommit::of(&parts),
            None,
            &IndexGate::passed(),
        )
        .await,
        "repeated commit_transaction",
    );
    assert_eq!(again.summary, first.summary);
    assert_eq!(as_set(&again.garbage), as_set(&first.garbage));
    assert_row_is(&get_one(repo, a.id).await.expect("A"), &a2, 2);
    assert_row_is(&get_one(repo, c.id).await.expect("C"), &c, 1);
}

/// `commit_transaction_records_idempotency_key`: the key is recorded with the
/// commit's summary; a key already taken fails and writes nothing.
pub async fn commit_transaction_records_idempotency_key<M: MetadataRepo + ?Sized>(repo: &M) {
    let scope = fresh_scope("tx-key");
    let key = format!("tx-key-{}", scope.as_str());
    let c = row(&scope, 1);
    let parts = vec![CommitPart::Upsert(vec![c.clone()])];
    let intent = prepared(
        repo,
        IntentKind::Transaction,
        points_of(std::slice::from_ref(&c)),
    )
    .await;
    let record = idempotency(&key);
    ok(
        repo.commit_transaction(
            intent.id,
            intent.owner,
            &TransactionCommit::of(&parts),
            Some(&record),
            &IndexGate::passed(),
        )
        .await,
        "commit_transaction",
    );
    let found =
        ok(repo.lookup_idempotency(&key).await, "lookup_idempotency").expect("the key is recorded");
    assert_eq!(found.request_hash, record.request_hash);
    assert_eq!(found.outcome, record.outcome);
    assert_eq!(found.summary.inserted, 1);
    // The same key with another commit.
    let d = row(&scope, 2);
    let parts = vec![CommitPart::Upsert(vec![d.clone()])];
    let other = prepared(
        repo,
        IntentKind::Transaction,
        points_of(std::slice::from_ref(&d)),
    )
    .await;
    let err = repo
        .commit_transaction(
            other.id,
            other.owner,
            &TransactionCommit::of(&parts),
            Some(&record),
            &IndexGate::passed(),
        )
        .await
        .expect_err("a taken key must fail the commit");
    assert!(
        matches!(err, MetadataError::IdempotencyKeyTaken { .. }),
        "expected IdempotencyKeyTaken, got {err:?}"
    );
    assert!(get_one(repo, d.id).await.is_none(), "D was written");
    assert_eq!(intent_of(repo, other.id).await.state, IntentState::Prepared);
}

/// `commit_transaction_all_or_nothing`: a failing part writes nothing of any
/// part.
pub async fn commit_transaction_all_or_nothing<M: MetadataRepo + ?Sized>(repo: &M) {
    let scope = fresh_scope("tx-atomic");
    let a = row(&scope, 1);
    let b = row(&scope, 2);
    committed(repo, &[a.clone(), b.clone()]).await;
    let c = row(&scope, 3);
    // The second upsert reuses a point another record references.
    let bad = RowWrite {
        point_id: a.point_id,
        ..row(&scope, 4)
    };
    let parts = vec![
        CommitPart::Delete(DeleteSelector::Ids(vec![b.id])),
        CommitPart::Upsert(vec![c.clone()]),
        CommitPart::Upsert(vec![bad.clone()]),
    ];
    let (intent, result) = commit_parts(repo, &TransactionCommit::of(&parts)).await;
    let err = result.expect_err("a part that breaks a constraint must fail the commit");
    assert_eq!(err.outcome(), Outcome::NotApplied, "{err:?}");
    assert!(get_one(repo, c.id).await.is_none(), "C was written");
    assert!(
        get_one(repo, bad.id).await.is_none(),
        "the bad row was written"
    );
    assert_row_is(&get_one(repo, b.id).await.expect("B kept"), &b, 1);
    assert_row_is(&get_one(repo, a.id).await.expect("A kept"), &a, 1);
    assert_eq!(
        intent_of(repo, intent.id).await.state,
        IntentState::Prepared
    );
}

/// A step that runs on a given connection type without touching it, counts
/// its runs, and fails if told to.
struct ProbeStep {
    connection: ConnectionType,
    runs: Arc<AtomicUsize>,
    fail: bool,
}

impl CommitStep for ProbeStep {
    fn connection(&self) -> ConnectionType {
        self.connection
    }
    fn run<'c>(&'c self, _conn: &'c mut (dyn Any + Send)) -> BoxFuture<'c, Result<(), BoxError>> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let fail = self.fail;
        Box::pin(async move {
            if fail {
                Err("the caller's step refused".into())
            } else {
                Ok(())
            }
        })
    }
}

/// `commit_transaction_runs_the_step`: the caller's step runs once inside the
/// commit; its failure rolls the whole commit back as `StepFailed`. (What a
/// step writes on a store's own connection is checked by each store's own
/// tests, since it is written in that store's language; a store that runs no
/// steps says so with `commit_step_connection() == None`.)
pub async fn commit_transaction_runs_the_step<M: MetadataRepo + ?Sized>(repo: &M) {
    let Some(connection) = repo.commit_step_connection() else {
        return;
    };
    let scope = fresh_scope("tx-step");
    for fail in [false, true] {
        let runs = Arc::new(AtomicUsize::new(0));
        let step: Arc<dyn CommitStep> = Arc::new(ProbeStep {
            connection,
            runs: runs.clone(),
            fail,
        });
        let c = row(&scope, 1);
        let parts = vec![CommitPart::Upsert(vec![c.clone()])];
        let commit = TransactionCommit {
            step: Some(step),
            ..TransactionCommit::of(&parts)
        };
        let (intent, result) = commit_parts(repo, &commit).await;
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "the step ran a wrong number of times"
        );
        if fail {
            let err = result.expect_err("a failing step must fail the commit");
            assert!(
                matches!(err, MetadataError::StepFailed { .. }),
                "expected StepFailed, got {err:?}"
            );
            assert!(
                get_one(repo, c.id).await.is_none(),
                "C written despite the step"
            );
            assert_eq!(
                intent_of(repo, intent.id).await.state,
                IntentState::Prepared
            );
        } else {
            ok(result, "commit_transaction with a step");
            assert_row_is(&get_one(repo, c.id).await.expect("C"), &c, 1);
        }
    }
}

/// A held commit that updated `a`, deleted `b` and inserted `c`.
struct HeldCommit {
    intent: NewIntent,
    a: RowWrite,
    a2: RowWrite,
    b: RowWrite,
    c: RowWrite,
}

async fn held_commit<M: MetadataRepo + ?Sized>(repo: &M, tag: &str) -> HeldCommit {
    let scope = fresh_scope(tag);
    let a = row(&scope, 1);
    let b = row(&scope, 2);
    committed(repo, &[a.clone(), b.clone()]).await;
    let a2 = rewrite(&a, &scope, 10);
    let c = row(&scope, 3);
    let parts = vec![
        CommitPart::Upsert(vec![a2.clone(), c.clone()]),
        CommitPart::Delete(DeleteSelector::Ids(vec![b.id])),
    ];
    // Its lease has ended: only its being held keeps it from a claim.
    let intent = new_intent(
        IntentKind::Transaction,
        points_of(&[a2.clone(), c.clone()]),
        CLAIM_NOW_MS - 1,
    );
    ok(repo.prepare(&intent).await, "prepare");
    ok(
        repo.commit_transaction(
            intent.id,
            intent.owner,
            &held(&parts),
            None,
            &IndexGate::passed(),
        )
        .await,
        "held commit_transaction",
    );
    HeldCommit {
        intent,
        a,
        a2,
        b,
        c,
    }
}

fn image_of(written: &RowWrite, version: u64) -> StoredRecordImage {
    StoredRecordImage {
        scope: written.scope.clone(),
        content: written.content.clone(),
        metadata: written.metadata.clone(),
        point_id: written.point_id,
        version,
        vector: Some(written.vector.clone()),
        pending: None,
    }
}

/// `commit_transaction_holds`: a held commit's intent is `Held`, never
/// claimed, and keeps one undo image per touched record.
pub async fn commit_transaction_holds<M: MetadataRepo + ?Sized>(repo: &M, keeps_vectors: bool) {
    let h = held_commit(repo, "tx-holds").await;
    let stored = intent_of(repo, h.intent.id).await;
    assert_eq!(stored.state, IntentState::Held);
    assert_eq!(
        as_set(&stored.point_ids),
        as_set(&[h.a.point_id, h.b.point_id]),
        "a held intent lists the points its commit made garbage"
    );
    let claimed = ok(
        repo.claim_expired(CLAIM_NOW_MS, OwnerToken::new_random(), FAR_FUTURE_MS, ALL)
            .await,
        "claim_expired",
    );
    assert!(
        claimed.iter().all(|i| i.id != h.intent.id),
        "a held intent was claimed"
    );
    let mut want = vec![
        UndoImage {
            id: h.a.id,
            before: Some(image_of(&h.a, 1)),
            after_version: Some(2),
        },
        UndoImage {
            id: h.b.id,
            before: Some(image_of(&h.b, 1)),
            after_version: None,
        },
        UndoImage {
            id: h.c.id,
            before: None,
            after_version: Some(1),
        },
    ];
    want.sort_by_key(|i| i.id);
    if !keeps_vectors {
        for image in &mut want {
            if let Some(b) = &mut image.before {
                b.vector = None;
            }
        }
    }
    let images = ok(repo.undo_images(h.intent.id).await, "undo_images");
    assert_eq!(images, want);
    // A held commit is settled as committed.
    let settled = ok(
        repo.settle(h.intent.id, h.intent.owner, OwnerToken::new_random())
            .await,
        "settle",
    );
    assert!(
        matches!(settled, crate::model::Settlement::Committed(ref i) if i.state == IntentState::Held),
        "{settled:?}"
    );
}

/// `commit_transaction_restores`: a restore puts each record back as its
/// image says, and leaves alone a record changed since.
pub async fn commit_transaction_restores<M: MetadataRepo + ?Sized>(repo: &M) {
    let h = held_commit(repo, "tx-restores").await;
    let images = ok(repo.undo_images(h.intent.id).await, "undo_images");
    let parts = vec![CommitPart::Restore(images.clone())];
    let (intent, result) = commit_parts(repo, &TransactionCommit::of(&parts)).await;
    let result = ok(result, "restore");
    assert!(result.conflicts.is_empty(), "{:?}", result.conflicts);
    assert_eq!(
        result.summary,
        CommitSummary {
            inserted: 1,
            updated: 1,
            deleted: 1
        },
        "B back, A back, C gone"
    );
    assert_eq!(
        as_set(&result.garbage),
        as_set(&[h.a2.point_id, h.c.point_id])
    );
    assert_eq!(
        as_set(&intent_of(repo, intent.id).await.point_ids),
        as_set(&[h.a2.point_id, h.c.point_id])
    );
    assert_row_is(&get_one(repo, h.a.id).await.expect("A back"), &h.a, 3);
    assert_row_is(&get_one(repo, h.b.id).await.expect("B back"), &h.b, 2);
    assert!(get_one(repo, h.c.id).await.is_none(), "C not deleted");

    // Changed since: left alone, reported.
    let h = held_commit(repo, "tx-restores-conflict").await;
    let images = ok(repo.undo_images(h.intent.id).await, "undo_images");
    let a3 = rewrite(&h.a, &h.a.scope, 30);
    committed(repo, std::slice::from_ref(&a3)).await;
    let parts = vec![CommitPart::Restore(images)];
    let (_, result) = commit_parts(repo, &TransactionCommit::of(&parts)).await;
    let result = ok(result, "restore with a conflict");
    assert_eq!(result.conflicts, vec![h.a.id]);
    assert_row_is(&get_one(repo, h.a.id).await.expect("A"), &a3, 3);
    assert_row_is(&get_one(repo, h.b.id).await.expect("B back"), &h.b, 2);
    assert!(get_one(repo, h.c.id).await.is_none(), "C not deleted");
}

/// `commit_transaction_gated`: a failed gate aborts the commit, which writes
/// nothing; a passed one commits.
pub async fn commit_transaction_gated<M: MetadataRepo + ?Sized>(repo: &M) {
    let scope = fresh_scope("tx-gated");
    let c = row(&scope, 1);
    let parts = vec![CommitPart::Upsert(vec![c.clone()])];
    let intent = prepared(
        repo,
        IntentKind::Transaction,
        points_of(std::slice::from_ref(&c)),
    )
    .await;
    let err = repo
        .commit_transaction(
            intent.id,
            intent.owner,
            &TransactionCommit::of(&parts),
            None,
            &IndexGate::failed(),
        )
        .await
        .expect_err("a failed gate must abort");
    assert!(
        matches!(err, MetadataError::Aborted { intent: i } if i == intent.id),
        "expected Aborted, got {err:?}"
    );
    assert!(
        get_one(repo, c.id).await.is_none(),
        "C written past a failed gate"
    );
    assert_eq!(
        intent_of(repo, intent.id).await.state,
        IntentState::Prepared
    );
    ok(
        repo.commit_transaction(
            intent.id,
            intent.owner,
            &TransactionCommit::of(&parts),
            None,
            &IndexGate::passed(),
        )
        .await,
        "commit after the gate passed",
    );
    assert_row_is(&get_one(repo, c.id).await.expect("C"), &c, 1);
}

// ------------------------------------------------------------ saga journal

/// `saga_save_creates`: a new saga reads back exactly as saved.
pub async fn saga_save_creates<M: MetadataRepo + ?Sized>(repo: &M) {
    let mut saga = saga_record(OwnerToken::new_random(), SagaState::Running, FAR_FUTURE_MS);
    saga.steps.push(StepRecord {
        name: "first".into(),
        kind: StepKind::Tandem,
        state: StepState::Started,
        pivot: false,
        key: "k".into(),
        intent: Some(IntentId::new_random()),
        output: Some(json!({ "ok": true })),
        conflicts: vec![RecordId::new_random()],
    });
    saga.last_error = Some("an error".into());
    let saga = created(repo, saga).await;
    let read = ok(repo.saga_get(saga.id).await, "saga_get").expect("the saga");
    assert_eq!(read, saga);
    assert!(
        ok(repo.saga_get(SagaId::new_random()).await, "saga_get").is_none(),
        "a missing saga was found"
    );
}

/// `saga_save_create_is_idempotent`: creating an existing saga changes nothing.
pub async fn saga_save_create_is_idempotent<M: MetadataRepo + ?Sized>(repo: &M) {
    let saga = created(
        repo,
        saga_record(OwnerToken::new_random(), SagaState::Running, FAR_FUTURE_MS),
    )
    .await;
    let mut other = saga.clone();
    other.owner = OwnerToken::new_random();
    other.state = SagaState::Compensating;
    ok(
        repo.saga_save(&other, None).await,
        "saga_save (create again)",
    );
    assert_eq!(ok(repo.saga_get(saga.id).await, "saga_get"), Some(saga));
}

/// `saga_save_fenced_by_owner`: another token, or a missing saga, is fenced.
pub async fn saga_save_fenced_by_owner<M: MetadataRepo + ?Sized>(repo: &M) {
    let owner = OwnerToken::new_random();
    let saga = created(repo, saga_record(owner, SagaState::Running, FAR_FUTURE_MS)).await;
    let mut changed = saga.clone();
    changed.state = SagaState::Compensating;
    let err = repo
        .saga_save(&changed, Some(OwnerToken::new_random()))
        .await
        .expect_err("a save by another owner must be fenced");
    assert!(
        matches!(err, MetadataError::SagaFenced { saga: s } if s == saga.id),
        "expected SagaFenced, got {err:?}"
    );
    assert_eq!(
        ok(repo.saga_get(saga.id).await, "saga_get"),
        Some(saga.clone())
    );
    let missing = saga_record(owner, SagaState::Running, FAR_FUTURE_MS);
    let err = repo
        .saga_save(&missing, Some(owner))
        .await
        .expect_err("saving a missing saga must be fenced");
    assert!(matches!(err, MetadataError::SagaFenced { .. }), "{err:?}");
    // The owner's save applies.
    ok(repo.saga_save(&changed, Some(owner)).await, "saga_save");
    assert_eq!(ok(repo.saga_get(saga.id).await, "saga_get"), Some(changed));
}

/// `saga_save_hands_over`: the owner's save naming a new owner hands the
/// saga over: afterwards the old token's saves and step commits are fenced,
/// the new token's apply.
pub async fn saga_save_hands_over<M: MetadataRepo + ?Sized>(repo: &M) {
    let scope = fresh_scope("saga-hand-over");
    let old = OwnerToken::new_random();
    let saga = created(repo, saga_record(old, SagaState::Running, FAR_FUTURE_MS)).await;
    let mut handed = saga.clone();
    handed.owner = OwnerToken::new_random();
    handed.state = SagaState::Compensating;
    ok(
        repo.saga_save(&handed, Some(old)).await,
        "saga_save (hand over)",
    );
    assert_eq!(
        ok(repo.saga_get(saga.id).await, "saga_get"),
        Some(handed.clone())
    );
    // The old token: its save and its step commit are fenced.
    let err = repo
        .saga_save(&saga, Some(old))
        .await
        .expect_err("a save by the old owner must be fenced");
    assert!(
        matches!(err, MetadataError::SagaFenced { saga: s } if s == saga.id),
        "expected SagaFenced, got {err:?}"
    );
    let c = row(&scope, 1);
    let parts = vec![CommitPart::Upsert(vec![c.clone()])];
    let commit = TransactionCommit {
        saga: Some(SagaFence {
            saga: saga.id,
            owner: old,
        }),
        ..held(&parts)
    };
    let (intent, result) = commit_parts(repo, &commit).await;
    let err = result.expect_err("a step commit under the old token must be fenced");
    assert!(
        matches!(err, MetadataError::SagaFenced { saga: s } if s == saga.id),
        "expected SagaFenced, got {err:?}"
    );
    assert!(get_one(repo, c.id).await.is_none(), "C was written");
    assert_eq!(
        intent_of(repo, intent.id).await.state,
        IntentState::Prepared
    );
    // The new token: both apply.
    let commit = TransactionCommit {
        saga: Some(SagaFence {
            saga: saga.id,
            owner: handed.owner,
        }),
        ..held(&parts)
    };
    ok(
        commit_parts(repo, &commit).await.1,
        "commit by the new owner",
    );
    assert_row_is(&get_one(repo, c.id).await.expect("C"), &c, 1);
    let mut next = handed.clone();
    next.last_error = Some("compensating".into());
    ok(
        repo.saga_save(&next, Some(handed.owner)).await,
        "saga_save (new owner)",
    );
    assert_eq!(ok(repo.saga_get(saga.id).await, "saga_get"), Some(next));
}

/// `saga_save_terminal_releases_held`: a terminal save releases the held
/// intents its steps name; a live save releases nothing.
pub async fn saga_save_terminal_releases_held<M: MetadataRepo + ?Sized>(repo: &M) {
    let h = held_commit(repo, "saga-release").await;
    let owner = OwnerToken::new_random();
    let mut saga = created(repo, saga_record(owner, SagaState::Running, FAR_FUTURE_MS)).await;
    saga.steps.push(StepRecord {
        name: "step".into(),
        kind: StepKind::Tandem,
        state: StepState::Done,
        pivot: false,
        key: "k".into(),
        intent: Some(h.intent.id),
        output: None,
        conflicts: Vec::new(),
    });
    let released = ok(repo.saga_save(&saga, Some(owner)).await, "live save");
    assert!(released.is_empty(), "a live save released {released:?}");
    assert_eq!(intent_of(repo, h.intent.id).await.state, IntentState::Held);
    saga.state = SagaState::Done;
    saga.lease_deadline_ms = FAR_FUTURE_MS - 1;
    let released = ok(repo.saga_save(&saga, Some(owner)).await, "terminal save");
    assert_eq!(released.len(), 1, "{released:?}");
    let intent = &released[0];
    assert_eq!(intent.id, h.intent.id);
    assert_eq!(intent.state, IntentState::Committed);
    assert_eq!(intent.owner, owner);
    assert_eq!(intent.lease_deadline_ms, FAR_FUTURE_MS - 1);
    assert_eq!(
        as_set(&intent.point_ids),
        as_set(&[h.a.point_id, h.b.point_id])
    );
    assert_eq!(&intent_of(repo, h.intent.id).await, intent);
    assert!(
        ok(repo.undo_images(h.intent.id).await, "undo_images").is_empty(),
        "undo images kept after the release"
    );
}

/// `saga_claim_takes_only_expired_live`: only live sagas whose lease ended
/// are claimed.
pub async fn saga_claim_takes_only_expired_live<M: MetadataRepo + ?Sized>(repo: &M) {
    let now = CLAIM_NOW_MS;
    let owner = OwnerToken::new_random();
    let running = created(repo, saga_record(owner, SagaState::Running, now - 10)).await;
    let compensating = created(repo, saga_record(owner, SagaState::Compensating, now - 1)).await;
    let young = created(repo, saga_record(owner, SagaState::Running, now + 1)).await;
    let mut done = created(repo, saga_record(owner, SagaState::Running, now - 10)).await;
    done.state = SagaState::Done;
    done.lease_deadline_ms = now - 10;
    ok(repo.saga_save(&done, Some(owner)).await, "end a saga");
    let claimed = ok(
        repo.saga_claim(now, OwnerToken::new_random(), now + 600_000, ALL)
            .await,
        "saga_claim",
    );
    let ids: HashSet<SagaId> = claimed.iter().map(|s| s.id).collect();
    assert!(ids.contains(&running.id), "the expired running saga");
    assert!(
        ids.contains(&compensating.id),
        "the expired compensating saga"
    );
    assert!(
        !ids.contains(&young.id),
        "a saga whose lease runs was claimed"
    );
    assert!(!ids.contains(&done.id), "an ended saga was claimed");
}

/// `saga_claim_transfers_ownership`: claimed sagas have the new owner, lease
/// and attempts + 1; the old owner is fenced.
pub async fn saga_claim_transfers_ownership<M: MetadataRepo + ?Sized>(repo: &M) {
    let now = CLAIM_NOW_MS;
    let old = OwnerToken::new_random();
    let saga = created(repo, saga_record(old, SagaState::Running, now - 5)).await;
    let recovery = OwnerToken::new_random();
    let claimed = ok(
        repo.saga_claim(now, recovery, now + 30_000, ALL).await,
        "saga_claim",
    );
    let mine = claimed
        .iter()
        .find(|s| s.id == saga.id)
        .expect("the expired saga is claimed");
    assert_eq!(
        (mine.owner, mine.lease_deadline_ms, mine.attempts),
        (recovery, now + 30_000, 1)
    );
    assert_eq!(
        ok(repo.saga_get(saga.id).await, "saga_get").as_ref(),
        Some(mine)
    );
    let err = repo
        .saga_save(&saga, Some(old))
        .await
        .expect_err("the old owner must be fenced");
    assert!(matches!(err, MetadataError::SagaFenced { .. }), "{err:?}");
}

/// `saga_claim_is_exclusive`: concurrent claims never return the same saga.
pub async fn saga_claim_is_exclusive<M: MetadataRepo + ?Sized>(repo: &M) {
    let now = CLAIM_NOW_MS;
    let mut ours = HashSet::new();
    for n in 0..12 {
        let saga = saga_record(OwnerToken::new_random(), SagaState::Running, now - 100 - n);
        ours.insert(created(repo, saga).await.id);
    }
    let owners: Vec<OwnerToken> = (0..4).map(|_| OwnerToken::new_random()).collect();
    let mut claimed_by: BTreeMap<SagaId, OwnerToken> = BTreeMap::new();
    for _round in 0..4 {
        let results = join_all(
            owners
                .iter()
                .map(|o| repo.saga_claim(now, *o, now + 600_000, 2)),
        )
        .await;
        for (owner, result) in owners.iter().zip(results) {
            for saga in ok(result, "concurrent saga_claim") {
                assert_eq!(saga.owner, *owner);
                if let Some(previous) = claimed_by.insert(saga.id, *owner) {
                    panic!("saga {} claimed by {previous} and by {owner}", saga.id);
                }
            }
        }
    }
    for id in &ours {
        let owner = claimed_by
            .get(id)
            .unwrap_or_else(|| panic!("saga {id} never claimed"));
        let read = ok(repo.saga_get(*id).await, "saga_get").expect("saga");
        assert_eq!((read.owner, read.attempts), (*owner, 1));
    }
}

/// `saga_take_fences_the_driver`: a take transfers a live saga whatever its
/// lease; an ended or missing saga returns `None`.
pub async fn saga_take_fences_the_driver<M: MetadataRepo + ?Sized>(repo: &M) {
    let driver = OwnerToken::new_random();
    let saga = created(repo, saga_record(driver, SagaState::Running, FAR_FUTURE_MS)).await;
    let aborter = OwnerToken::new_random();
    let taken = ok(
        repo.saga_take(saga.id, aborter, FAR_FUTURE_MS - 5).await,
        "saga_take",
    )
    .expect("a live saga is taken");
    assert_eq!(
        (taken.owner, taken.lease_deadline_ms),
        (aborter, FAR_FUTURE_MS - 5)
    );
    let err = repo
        .saga_save(&saga, Some(driver))
        .await
        .expect_err("the driver must be fenced");
    assert!(matches!(err, MetadataError::SagaFenced { .. }), "{err:?}");
    let mut ended = taken.clone();
    ended.state = SagaState::Compensated;
    ok(repo.saga_save(&ended, Some(aborter)).await, "end it");
    assert!(
        ok(
            repo.saga_take(saga.id, OwnerToken::new_random(), FAR_FUTURE_MS)
                .await,
            "saga_take"
        )
        .is_none(),
        "an ended saga was taken"
    );
    assert_eq!(ok(repo.saga_get(saga.id).await, "saga_get"), Some(ended));
    assert!(
        ok(
            repo.saga_take(SagaId::new_random(), aborter, FAR_FUTURE_MS)
                .await,
            "saga_take"
        )
        .is_none()
    );
}

/// `saga_list_filters_by_state`: only the state asked for, newest first, at
/// most `limit`.
pub async fn saga_list_filters_by_state<M: MetadataRepo + ?Sized>(repo: &M) {
    let owner = OwnerToken::new_random();
    let mut made = Vec::new();
    for n in 0..3_i64 {
        let mut saga = saga_record(owner, SagaState::Running, FAR_FUTURE_MS);
        saga.created_ms = FAR_FUTURE_MS + n;
        made.push(created(repo, saga).await);
    }
    let mut done = made[1].clone();
    done.state = SagaState::Done;
    ok(repo.saga_save(&done, Some(owner)).await, "end one");
    let ours: HashSet<SagaId> = made.iter().map(|s| s.id).collect();
    let all: Vec<SagaId> = ok(repo.saga_list(None, ALL).await, "saga_list")
        .into_iter()
        .map(|s| s.id)
        .filter(|id| ours.contains(id))
        .collect();
    assert_eq!(
        all,
        vec![made[2].id, made[1].id, made[0].id],
        "newest first"
    );
    let running: Vec<SagaId> = ok(
        repo.saga_list(Some(SagaState::Running), ALL).await,
        "saga_list",
    )
    .into_iter()
    .map(|s| s.id)
    .filter(|id| ours.contains(id))
    .collect();
    assert_eq!(running, vec![made[2].id, made[0].id]);
    let done_listed = ok(
        repo.saga_list(Some(SagaState::Done), ALL).await,
        "saga_list",
    );
    assert!(done_listed.iter().any(|s| s.id == made[1].id));
    assert!(done_listed.iter().all(|s| s.state == SagaState::Done));
    assert_eq!(ok(repo.saga_list(None, 1).await, "saga_list").len(), 1);
}

/// `saga_counts_by_state`: every saga counted once, under its state.
pub async fn saga_counts_by_state<M: MetadataRepo + ?Sized>(repo: &M) {
    let before = ok(repo.saga_counts().await, "saga_counts");
    let owner = OwnerToken::new_random();
    created(repo, saga_record(owner, SagaState::Running, FAR_FUTURE_MS)).await;
    created(repo, saga_record(owner, SagaState::Running, FAR_FUTURE_MS)).await;
    let mut failed = created(repo, saga_record(owner, SagaState::Running, FAR_FUTURE_MS)).await;
    failed.state = SagaState::Failed;
    ok(repo.saga_save(&failed, Some(owner)).await, "fail one");
    let after = ok(repo.saga_counts().await, "saga_counts");
    let delta =
        |s: SagaState| after.get(&s).copied().unwrap_or(0) - before.get(&s).copied().unwrap_or(0);
    assert_eq!(delta(SagaState::Running), 2);
    assert_eq!(delta(SagaState::Failed), 1);
    assert_eq!(delta(SagaState::Done), 0);
}

/// `referenced_points_includes_held`: the points a held intent keeps are in
/// use until it is released.
pub async fn referenced_points_includes_held<M: MetadataRepo + ?Sized>(repo: &M) {
    let h = held_commit(repo, "referenced-held").await;
    let unknown = PointId::new_random();
    let asked = [h.a.point_id, h.b.point_id, h.a2.point_id, unknown];
    let in_use = ok(repo.referenced_points(&asked).await, "referenced_points");
    assert_eq!(
        in_use,
        [h.a.point_id, h.b.point_id, h.a2.point_id]
            .into_iter()
            .collect::<HashSet<_>>(),
        "the held points and the current one"
    );
    let owner = OwnerToken::new_random();
    let mut saga = created(repo, saga_record(owner, SagaState::Running, FAR_FUTURE_MS)).await;
    saga.steps.push(StepRecord {
        name: "step".into(),
        kind: StepKind::Tandem,
        state: StepState::Done,
        pivot: false,
        key: "k".into(),
        intent: Some(h.intent.id),
        output: None,
        conflicts: Vec::new(),
    });
    saga.state = SagaState::Done;
    ok(repo.saga_save(&saga, Some(owner)).await, "terminal save");
    let in_use = ok(repo.referenced_points(&asked).await, "referenced_points");
    assert_eq!(
        in_use,
        [h.a2.point_id].into_iter().collect::<HashSet<_>>(),
        "released points are no longer in use"
    );
}
