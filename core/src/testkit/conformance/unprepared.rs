//! The [`MetadataRepo`] conformance cases of commits that create their own
//! intent ([`TransactionCommit::create_intent`]) and of
//! [`settle_unprepared`](MetadataRepo::settle_unprepared), one per contract
//! bullet. Only a deferred upsert commits this way, so a store whose
//! [`deferred_indexing`](MetadataRepo::deferred_indexing) is `false` skips
//! them (each says so on stdout).

use super::metadata::{
    FAR_FUTURE_MS, assert_fenced, fresh_scope, get_one, intent_of, new_intent, ok, row,
};
use crate::MetadataError;
use crate::model::{
    CommitPart, CommitSummary, IntentKind, IntentState, NewIntent, OwnerToken, RowWrite,
    Settlement, TransactionCommit, TransactionCommitResult,
};
use crate::ports::{IndexGate, MetadataRepo};

/// The lease end a created intent is handed over at.
const RELEASE_AT: i64 = FAR_FUTURE_MS - 1;

fn skipped<M: MetadataRepo + ?Sized>(repo: &M, case: &str) -> bool {
    if repo.deferred_indexing() {
        return false;
    }
    println!("{case}: skipped, the store has no deferred indexing");
    true
}

/// A deferred write of `rows` that creates `intent`, committed with `owner`.
async fn commit_creating<M: MetadataRepo + ?Sized>(
    repo: &M,
    intent: &NewIntent,
    owner: OwnerToken,
    rows: &[RowWrite],
) -> Result<TransactionCommitResult, MetadataError> {
    let parts = [CommitPart::Defer {
        rows: rows.to_vec(),
        now_ms: 1_000,
    }];
    let commit = TransactionCommit {
        release_at_ms: Some(RELEASE_AT),
        create_intent: Some(intent),
        ..TransactionCommit::of(&parts)
    };
    repo.commit_transaction(intent.id, owner, &commit, None, &IndexGate::passed())
        .await
}

/// `commit_transaction_creates_intent`: with `create_intent` and no intent of
/// that id, the commit inserts it (owned by `owner`) and commits it with the
/// parts, in one transaction; repeated, it returns the recorded result and
/// writes nothing again; if the intent exists owned by another token (a
/// settlement's fence), it fails with `Fenced` and writes nothing.
pub async fn commit_transaction_creates_intent<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "commit_transaction_creates_intent") {
        return;
    }
    let scope = fresh_scope("create-intent");
    let a = row(&scope, 1);
    let intent = new_intent(IntentKind::Upsert, Vec::new(), FAR_FUTURE_MS);
    let first = ok(
        commit_creating(repo, &intent, intent.owner, std::slice::from_ref(&a)).await,
        "commit creating its intent",
    );
    let inserted = CommitSummary {
        inserted: 1,
        updated: 0,
        deleted: 0,
    };
    assert_eq!(first.summary, inserted);
    let stored = intent_of(repo, intent.id).await;
    assert_eq!(stored.state, IntentState::Committed);
    assert_eq!(stored.owner, intent.owner, "the committing token owns it");
    assert_eq!(stored.kind, IntentKind::Upsert);
    assert_eq!(
        stored.lease_deadline_ms, RELEASE_AT,
        "handed over as the commit said"
    );
    assert_eq!(get_one(repo, a.id).await.expect("the row").version, 1);

    // Repeated (a retry after a lost reply): the recorded result, nothing
    // written again.
    let again = ok(
        commit_creating(repo, &intent, intent.owner, std::slice::from_ref(&a)).await,
        "repeated commit",
    );
    assert_eq!(again.summary, inserted);
    assert_eq!(
        get_one(repo, a.id).await.expect("the row").version,
        1,
        "a repeated commit applied again"
    );

    // An intent of that id owned by another token: fenced, nothing written.
    let b = row(&scope, 2);
    let other = new_intent(IntentKind::Upsert, Vec::new(), FAR_FUTURE_MS);
    ok(repo.prepare(&other).await, "prepare");
    let stranger = NewIntent {
        owner: OwnerToken::new_random(),
        ..other.clone()
    };
    let err = commit_creating(repo, &stranger, stranger.owner, std::slice::from_ref(&b))
        .await
        .expect_err("a commit creating an intent another token owns");
    assert_fenced(err, other.id, "commit creating a taken intent");
    assert!(get_one(repo, b.id).await.is_none(), "a fenced commit wrote");
    assert_eq!(intent_of(repo, other.id).await.owner, other.owner);
}

/// `settle_unprepared_fences_absent`: with no intent of that id, the intent
/// is inserted owned by `fence` and reported `NotCommitted`; a late commit
/// creating it with `owner` then fails with `Fenced` and writes nothing, and
/// one with `fence` commits.
pub async fn settle_unprepared_fences_absent<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "settle_unprepared_fences_absent") {
        return;
    }
    let scope = fresh_scope("settle-unprepared");
    let a = row(&scope, 1);
    let intent = new_intent(IntentKind::Upsert, Vec::new(), FAR_FUTURE_MS);
    let fence = OwnerToken::new_random();
    match ok(
        repo.settle_unprepared(&intent, intent.owner, fence).await,
        "settle_unprepared",
    ) {
        Settlement::NotCommitted(settled) => {
            assert_eq!(settled.id, intent.id);
            assert_eq!(settled.state, IntentState::Prepared);
            assert_eq!(settled.owner, fence, "the fence must own it");
        }
        other => panic!("expected NotCommitted, got {other:?}"),
    }
    let stored = intent_of(repo, intent.id).await;
    assert_eq!((stored.state, stored.owner), (IntentState::Prepared, fence));

    let err = commit_creating(repo, &intent, intent.owner, std::slice::from_ref(&a))
        .await
        .expect_err("the late commit must be fenced");
    assert_fenced(err, intent.id, "late commit after settle_unprepared");
    assert!(get_one(repo, a.id).await.is_none(), "a fenced commit wrote");

    // Settling again (a retried settlement) changes nothing.
    match ok(
        repo.settle_unprepared(&intent, intent.owner, fence).await,
        "settle_unprepared again",
    ) {
        Settlement::NotCommitted(settled) => assert_eq!(settled.owner, fence),
        other => panic!("expected NotCommitted, got {other:?}"),
    }

    // The fence may commit (the caller's retry).
    let done = ok(
        commit_creating(repo, &intent, fence, std::slice::from_ref(&a)).await,
        "commit by the fence",
    );
    assert_eq!(done.summary.inserted, 1);
    assert_eq!(
        intent_of(repo, intent.id).await.state,
        IntentState::Committed
    );
    assert!(get_one(repo, a.id).await.is_some());
}

/// `settle_unprepared_committed`: an intent the commit created is reported
/// `Committed`, unchanged.
pub async fn settle_unprepared_committed<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "settle_unprepared_committed") {
        return;
    }
    let scope = fresh_scope("settle-unprepared-committed");
    let a = row(&scope, 1);
    let intent = new_intent(IntentKind::Upsert, Vec::new(), FAR_FUTURE_MS);
    ok(
        commit_creating(repo, &intent, intent.owner, std::slice::from_ref(&a)).await,
        "commit creating its intent",
    );
    let before = intent_of(repo, intent.id).await;
    let fence = OwnerToken::new_random();
    match ok(
        repo.settle_unprepared(&intent, intent.owner, fence).await,
        "settle_unprepared",
    ) {
        Settlement::Committed(settled) => {
            assert_eq!(settled.state, IntentState::Committed);
            assert_eq!(
                settled.owner, intent.owner,
                "a committed intent keeps its owner"
            );
            assert_eq!(settled.summary, before.summary);
        }
        other => panic!("expected Committed, got {other:?}"),
    }
    assert_eq!(
        intent_of(repo, intent.id).await,
        before,
        "settle changed it"
    );
}
