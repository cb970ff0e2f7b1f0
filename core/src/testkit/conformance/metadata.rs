//! The [`MetadataRepo`] conformance cases, one per contract bullet.

use std::collections::{BTreeSet, HashSet};
use std::fmt::Display;

use futures::future::join_all;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::error::MetadataError;
use crate::model::{
    CommitSummary, DeleteSelector, IdempotencyRecord, Intent, IntentId, IntentKind, IntentState,
    Metadata, NewIntent, OwnerToken, PointId, RecordId, RowWrite, Scope, Settlement, StoredRecord,
    UpsertCommit, unix_ms,
};
use crate::ports::{IndexGate, MetadataRepo};

/// A lease that never expires during a test (2100-01-01).
pub(super) const FAR_FUTURE_MS: i64 = 4_102_444_800_000;
/// "Now" for the claim cases: far before any real lease, so that a store holding
/// real intents does not hand those out.
pub(super) const CLAIM_NOW_MS: i64 = 1_000_000_000;
/// A limit large enough to list every intent of a test store.
pub(super) const ALL: usize = 100_000;

pub(super) fn ok<T, E: Display>(result: Result<T, E>, what: &str) -> T {
    match result {
        Ok(value) => value,
        Err(e) => panic!("{what} failed: {e}"),
    }
}

pub(super) fn fresh_scope(tag: &str) -> Scope {
    Scope::new(format!("conformance-{tag}-{}", Uuid::new_v4().simple()))
}

fn object(value: Value) -> Metadata {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

pub(super) fn row(scope: &Scope, n: i64) -> RowWrite {
    RowWrite {
        id: RecordId::new_random(),
        scope: scope.clone(),
        content: format!("content {n}"),
        metadata: object(json!({ "n": n })),
        point_id: PointId::new_random(),
        vector: vec![n as f32, 0.5, -1.0],
    }
}

pub(super) fn row_with_metadata(scope: &Scope, metadata: Value) -> RowWrite {
    RowWrite {
        metadata: object(metadata),
        ..row(scope, 0)
    }
}

/// The same record, rewritten under a fresh point with new content.
pub(super) fn rewrite(old: &RowWrite, scope: &Scope, n: i64) -> RowWrite {
    RowWrite {
        id: old.id,
        ..row(scope, n)
    }
}

pub(super) fn now_ms() -> i64 {
    unix_ms(std::time::SystemTime::now())
}

pub(super) fn new_intent(
    kind: IntentKind,
    point_ids: Vec<PointId>,
    lease_deadline_ms: i64,
) -> NewIntent {
    NewIntent {
        id: IntentId::new_random(),
        kind,
        owner: OwnerToken::new_random(),
        lease_deadline_ms,
        point_ids,
        created_ms: now_ms(),
        generation: 0,
    }
}

pub(super) fn points_of(rows: &[RowWrite]) -> Vec<PointId> {
    rows.iter().map(|r| r.point_id).collect()
}

fn sorted<T: Ord + Clone>(items: &[T]) -> Vec<T> {
    let mut items = items.to_vec();
    items.sort();
    items
}

pub(super) fn idempotency(key: &str) -> IdempotencyRecord {
    IdempotencyRecord {
        key: key.to_owned(),
        request_hash: format!("hash-of-{key}"),
        outcome: json!({ "inserted": 1, "note": "as the first call reported" }),
        summary: CommitSummary::default(),
    }
}

pub(super) fn assert_fenced(err: MetadataError, intent: IntentId, what: &str) {
    match err {
        MetadataError::Fenced { intent: got } => {
            assert_eq!(got, intent, "{what}: fenced error names the wrong intent")
        }
        other => panic!("{what}: expected Fenced, got {other:?}"),
    }
}

pub(super) async fn prepared<M: MetadataRepo + ?Sized>(
    repo: &M,
    kind: IntentKind,
    point_ids: Vec<PointId>,
) -> NewIntent {
    let intent = new_intent(kind, point_ids, FAR_FUTURE_MS);
    ok(repo.prepare(&intent).await, "prepare");
    intent
}

/// Prepares an upsert intent for `rows` and commits them.
pub(super) async fn committed<M: MetadataRepo + ?Sized>(
    repo: &M,
    rows: &[RowWrite],
) -> (NewIntent, UpsertCommit) {
    let intent = prepared(repo, IntentKind::Upsert, points_of(rows)).await;
    let commit = ok(
        repo.commit_upsert(intent.id, intent.owner, rows, None)
            .await,
        "commit_upsert",
    );
    (intent, commit)
}

async fn find_intent<M: MetadataRepo + ?Sized>(repo: &M, id: IntentId) -> Option<Intent> {
    ok(repo.list_intents(ALL).await, "list_intents")
        .into_iter()
        .find(|i| i.id == id)
}

pub(super) async fn intent_of<M: MetadataRepo + ?Sized>(repo: &M, id: IntentId) -> Intent {
    find_intent(repo, id)
        .await
        .unwrap_or_else(|| panic!("intent {id} is not listed"))
}

pub(super) async fn get_one<M: MetadataRepo + ?Sized>(
    repo: &M,
    id: RecordId,
) -> Option<StoredRecord> {
    let mut rows = ok(repo.get(&[id]).await, "get");
    assert!(
        rows.len() <= 1,
        "get returned {} rows for one id",
        rows.len()
    );
    rows.pop()
}

async fn ids_present<M: MetadataRepo + ?Sized>(repo: &M, ids: &[RecordId]) -> BTreeSet<RecordId> {
    ok(repo.get(ids).await, "get")
        .into_iter()
        .map(|r| r.id)
        .collect()
}

pub(super) fn assert_row_is(stored: &StoredRecord, written: &RowWrite, version: u64) {
    assert_eq!(stored.id, written.id);
    assert_eq!(stored.scope, written.scope, "scope of {}", written.id);
    assert_eq!(stored.content, written.content, "content of {}", written.id);
    assert_eq!(
        stored.metadata, written.metadata,
        "metadata of {}",
        written.id
    );
    assert_eq!(stored.point_id, written.point_id, "point of {}", written.id);
    assert_eq!(stored.version, version, "version of {}", written.id);
}

// ---------------------------------------------------------------- prepare

/// `prepare_then_read`: a prepared intent is listed with the given owner, lease,
/// kind and point ids, state `Prepared`, attempts 0.
pub async fn prepare_then_read<M: MetadataRepo + ?Sized>(repo: &M) {
    let upsert = new_intent(
        IntentKind::Upsert,
        vec![
            PointId::new_random(),
            PointId::new_random(),
            PointId::new_random(),
        ],
        FAR_FUTURE_MS - 17,
    );
    let delete = new_intent(IntentKind::Delete, Vec::new(), FAR_FUTURE_MS - 3);
    ok(repo.prepare(&upsert).await, "prepare (upsert)");
    ok(repo.prepare(&delete).await, "prepare (delete)");

    for expected in [&upsert, &delete] {
        let listed = intent_of(repo, expected.id).await;
        assert_eq!(listed.kind, expected.kind, "kind");
        assert_eq!(listed.state, IntentState::Prepared, "state");
        assert_eq!(listed.owner, expected.owner, "owner");
        assert_eq!(
            listed.lease_deadline_ms, expected.lease_deadline_ms,
            "lease"
        );
        assert_eq!(
            sorted(&listed.point_ids),
            sorted(&expected.point_ids),
            "point ids"
        );
        assert_eq!(listed.attempts, 0, "attempts");
        assert_eq!(listed.summary, None, "summary");
        assert_eq!(listed.last_error, None, "last_error");
        assert_eq!(listed.created_ms, expected.created_ms, "created_ms");
    }
}

/// `prepare_is_idempotent`: preparing the same intent again succeeds and
/// changes nothing — not even after the intent was committed.
pub async fn prepare_is_idempotent<M: MetadataRepo + ?Sized>(repo: &M) {
    let scope = fresh_scope("prepare-idem");
    let rows = vec![row(&scope, 1), row(&scope, 2)];
    let intent = new_intent(IntentKind::Upsert, points_of(&rows), FAR_FUTURE_MS);
    ok(repo.prepare(&intent).await, "prepare");
    let first = intent_of(repo, intent.id).await;
    ok(repo.prepare(&intent).await, "prepare again");
    let listed = ok(repo.list_intents(ALL).await, "list_intents");
    assert_eq!(
        listed.iter().filter(|i| i.id == intent.id).count(),
        1,
        "a repeated prepare must not list the intent twice"
    );
    assert_eq!(
        intent_of(repo, intent.id).await,
        first,
        "a repeated prepare changed the intent"
    );

    // Commit (under another intent) the first row, then an update of it under
    // this intent, then replay the prepare (a late duplicate): the committed
    // intent must stay committed, with its swapped point list.
    committed(repo, &rows[..1]).await;
    let update = rewrite(&rows[0], &scope, 3);
    let commit = ok(
        repo.commit_upsert(intent.id, intent.owner, std::slice::from_ref(&update), None)
            .await,
        "commit_upsert",
    );
    let after_commit = intent_of(repo, intent.id).await;
    ok(repo.prepare(&intent).await, "prepare after commit");
    let replayed = intent_of(repo, intent.id).await;
    assert_eq!(
        replayed, after_commit,
        "a repeated prepare reset a committed intent"
    );
    assert_eq!(replayed.state, IntentState::Committed);
    assert_eq!(replayed.point_ids, commit.old_point_ids);
    assert_eq!(commit.old_point_ids, vec![rows[0].point_id]);
}

// ---------------------------------------------------------------- commit_upsert

/// `commit_upsert_inserts_and_updates`: new ids get version 1, existing ids the
/// new point, content, metadata and scope with version + 1; the summary counts
/// both; `old_point_ids` are exactly the previous points of the updated rows.
pub async fn commit_upsert_inserts_and_updates<M: MetadataRepo + ?Sized>(repo: &M) {
    let scope = fresh_scope("upsert");
    let moved_to = fresh_scope("upsert-moved");
    let a = row(&scope, 1);
    let b = row(&scope, 2);
    let (_, first) = committed(repo, &[a.clone(), b.clone()]).await;
    assert_eq!(
        first.summary,
        CommitSummary {
            inserted: 2,
            updated: 0,
            deleted: 0
        }
    );
    assert!(first.old_point_ids.is_empty(), "an insert makes no garbage");
    assert_row_is(&get_one(repo, a.id).await.expect("a inserted"), &a, 1);
    assert_row_is(&get_one(repo, b.id).await.expect("b inserted"), &b, 1);

    // Update a (moving it to another scope, with new metadata) and b, insert c.
    let mut a2 = rewrite(&a, &moved_to, 10);
    a2.metadata = object(json!({ "changed": true, "tags": ["x", "y"] }));
    let b2 = rewrite(&b, &scope, 20);
    let c = row(&scope, 3);
    let (_, second) = committed(repo, &[a2.clone(), c.clone(), b2.clone()]).await;
    assert_eq!(
        second.summary,
        CommitSummary {
            inserted: 1,
            updated: 2,
            deleted: 0
        }
    );
    assert_eq!(
        sorted(&second.old_point_ids),
        sorted(&[a.point_id, b.point_id])
    );
    assert_row_is(&get_one(repo, a.id).await.expect("a updated"), &a2, 2);
    assert_row_is(&get_one(repo, b.id).await.expect("b updated"), &b2, 2);
    assert_row_is(&get_one(repo, c.id).await.expect("c inserted"), &c, 1);

    // A third version of a.
    let a3 = rewrite(&a, &scope, 30);
    let (_, third) = committed(repo, std::slice::from_ref(&a3)).await;
    assert_eq!(third.old_point_ids, vec![a2.point_id]);
    assert_eq!(third.summary.updated, 1);
    assert_row_is(&get_one(repo, a.id).await.expect("a updated again"), &a3, 3);
}

/// `commit_upsert_swaps_intent`: afterwards the intent is `Committed`, lists
/// exactly `old_point_ids`, and carries the summary.
pub async fn commit_upsert_swaps_intent<M: MetadataRepo + ?Sized>(repo: &M) {
    let scope = fresh_scope("swap");
    let a = row(&scope, 1);
    let b = row(&scope, 2);
    let (insert_intent, insert) = committed(repo, &[a.clone(), b.clone()]).await;
    let listed = intent_of(repo, insert_intent.id).await;
    assert_eq!(listed.state, IntentState::Committed);
    assert!(
        listed.point_ids.is_empty(),
        "an insert-only commit leaves no garbage to list"
    );
    assert_eq!(listed.summary, Some(insert.summary));
    assert_eq!(
        listed.owner, insert_intent.owner,
        "a commit keeps the owner"
    );

    let (update_intent, update) = committed(
        repo,
        &[
            rewrite(&a, &scope, 3),
            rewrite(&b, &scope, 4),
            row(&scope, 5),
        ],
    )
    .await;
    let listed = intent_of(repo, update_intent.id).await;
    assert_eq!(listed.state, IntentState::Committed);
    assert_eq!(sorted(&listed.point_ids), sorted(&update.old_point_ids));
    assert_eq!(sorted(&listed.point_ids), sorted(&[a.point_id, b.point_id]));
    assert_eq!(listed.summary, Some(update.summary));
    assert_eq!(listed.kind, IntentKind::Upsert);
}

/// `commit_upsert_fenced_by_owner`: a token that does not own the intent, or a
/// missing intent, fails with `Fenced` and writes nothing.
pub async fn commit_upsert_fenced_by_owner<M: MetadataRepo + ?Sized>(repo: &M) {
    let scope = fresh_scope("fenced");
    let existing = row(&scope, 1);
    committed(repo, std::slice::from_ref(&existing)).await;
    let rows = vec![row(&scope, 2), rewrite(&existing, &scope, 3)];
    let intent = prepared(repo, IntentKind::Upsert, points_of(&rows)).await;
    let before = intent_of(repo, intent.id).await;
    let key = format!("fenced-{}", Uuid::new_v4());

    let err = repo
        .commit_upsert(
            intent.id,
            OwnerToken::new_random(),
            &rows,
            Some(&idempotency(&key)),
        )
        .await
        .expect_err("a commit by a token that does not own the intent must fail");
    assert_fenced(err, intent.id, "commit with a foreign token");

    let missing = IntentId::new_random();
    let err = repo
        .commit_upsert(missing, intent.owner, &rows, None)
        .await
        .expect_err("a commit of a missing intent must fail");
    assert_fenced(err, missing, "commit of a missing intent");

    assert!(
        get_one(repo, rows[0].id).await.is_none(),
        "a fenced commit inserted a row"
    );
    assert_row_is(
        &get_one(repo, existing.id).await.expect("existing row"),
        &existing,
        1,
    );
    assert_eq!(
        intent_of(repo, intent.id).await,
        before,
        "a fenced commit changed the intent"
    );
    assert_eq!(
        ok(repo.lookup_idempotency(&key).await, "lookup_idempotency"),
        None,
        "a fenced commit recorded its idempotency key"
    );
    assert_eq!(
        find_intent(repo, missing).await,
        None,
        "a fenced commit created an intent"
    );
}

/// `commit_upsert_is_idempotent`: repeating a commit that already applied (same
/// intent and owner) returns the recorded result and changes nothing.
pub async fn commit_upsert_is_idempotent<M: MetadataRepo + ?Sized>(repo: &M) {
    let scope = fresh_scope("upsert-idem");
    let a = row(&scope, 1);
    committed(repo, std::slice::from_ref(&a)).await;
    let rows = vec![rewrite(&a, &scope, 2), row(&scope, 3)];
    let intent = prepared(repo, IntentKind::Upsert, points_of(&rows)).await;
    let key = format!("upsert-idem-{}", Uuid::new_v4());
    let record = idempotency(&key);

    let first = ok(
        repo.commit_upsert(intent.id, intent.owner, &rows, Some(&record))
            .await,
        "commit_upsert",
    );
    let intent_after = intent_of(repo, intent.id).await;
    let rows_after = ok(repo.get(&[a.id, rows[1].id]).await, "get");
    let key_after = ok(repo.lookup_idempotency(&key).await, "lookup_idempotency");

    let again = ok(
        repo.commit_upsert(intent.id, intent.owner, &rows, Some(&record))
            .await,
        "repeated commit_upsert",
    );
    assert_eq!(
        again.summary, first.summary,
        "a repeated commit reports another summary"
    );
    assert_eq!(sorted(&again.old_point_ids), sorted(&first.old_point_ids));
    assert_eq!(sorted(&first.old_point_ids), vec![a.point_id]);
    assert_eq!(
        intent_of(repo, intent.id).await,
        intent_after,
        "the intent changed"
    );
    assert_eq!(
        ok(repo.get(&[a.id, rows[1].id]).await, "get"),
        rows_after,
        "rows changed"
    );
    assert_eq!(
        ok(repo.lookup_idempotency(&key).await, "lookup_idempotency"),
        key_after,
        "the idempotency record changed"
    );
}

/// `commit_upsert_records_idempotency_key`: the key is readable afterwards, with
/// its hash and outcome as given and the summary of this commit; a key already
/// recorded fails with `IdempotencyKeyTaken` and writes nothing.
pub async fn commit_upsert_records_idempotency_key<M: MetadataRepo + ?Sized>(repo: &M) {
    let scope = fresh_scope("idem-key");
    let existing = row(&scope, 0);
    committed(repo, std::slice::from_ref(&existing)).await;
    let key = format!("key-{}", Uuid::new_v4());
    let mut record = idempotency(&key);
    // The caller's summary is ignored: the store records what the commit decided.
    record.summary = CommitSummary {
        inserted: 99,
        updated: 99,
        deleted: 99,
    };
    let rows = vec![
        row(&scope, 1),
        row(&scope, 2),
        rewrite(&existing, &scope, 3),
    ];
    let intent = prepared(repo, IntentKind::Upsert, points_of(&rows)).await;
    let commit = ok(
        repo.commit_upsert(intent.id, intent.owner, &rows, Some(&record))
            .await,
        "commit_upsert",
    );
    let recorded = ok(repo.lookup_idempotency(&key).await, "lookup_idempotency")
        .expect("the key must be recorded by the commit");
    assert_eq!(recorded.key, key);
    assert_eq!(recorded.request_hash, record.request_hash);
    assert_eq!(recorded.outcome, record.outcome);
    assert_eq!(recorded.summary, commit.summary);
    assert_eq!(
        recorded.summary,
        CommitSummary {
            inserted: 2,
            updated: 1,
            deleted: 0
        }
    );

    // Another call with the same key: rejected, nothing written.
    let other_rows = vec![row(&scope, 4), rewrite(&existing, &scope, 5)];
    let other = prepared(repo, IntentKind::Upsert, points_of(&other_rows)).await;
    let mut other_record = idempotency(&key);
    other_record.request_hash = "another request".to_owned();
    let err = repo
        .commit_upsert(other.id, other.owner, &other_rows, Some(&other_record))
        .await
        .expect_err("a second commit with a recorded key must fail");
    match err {
        MetadataError::IdempotencyKeyTaken { key: taken } => assert_eq!(taken, key),
        other => panic!("expected IdempotencyKeyTaken, got {other:?}"),
    }
    assert!(
        get_one(repo, other_rows[0].id).await.is_none(),
        "the rejected commit inserted"
    );
    assert_eq!(
        get_one(repo, existing.id)
            .await
            .expect("existing row")
            .point_id,
        rows[2].point_id,
        "the rejected commit updated a row"
    );
    let other_listed = intent_of(repo, other.id).await;
    assert_eq!(
        other_listed.state,
        IntentState::Prepared,
        "the rejected commit's intent moved"
    );
    assert_eq!(sorted(&other_listed.point_ids), sorted(&other.point_ids));
    assert_eq!(
        ok(repo.lookup_idempotency(&key).await, "lookup_idempotency"),
        Some(recorded),
        "the rejected commit overwrote the recorded key"
    );
}

/// `commit_upsert_keeps_vectors_when_configured`: a store that keeps vectors
/// returns them in `get` (the current version's); one that does not returns `None`.
pub async fn commit_upsert_keeps_vectors_when_configured<M: MetadataRepo + ?Sized>(
    repo: &M,
    keeps_vectors: bool,
) {
    let scope = fresh_scope("vectors");
    let mut a = row(&scope, 1);
    a.vector = vec![0.25, -1.5, 3.0, 1e-3];
    committed(repo, std::slice::from_ref(&a)).await;
    let expected = |v: &RowWrite| keeps_vectors.then(|| v.vector.clone());
    let stored = get_one(repo, a.id).await.expect("row");
    assert_eq!(
        stored.vector,
        expected(&a),
        "keeps_vectors = {keeps_vectors}"
    );

    let mut a2 = rewrite(&a, &scope, 2);
    a2.vector = vec![-0.5, 0.0, 2.0, 7.0];
    committed(repo, std::slice::from_ref(&a2)).await;
    let stored = get_one(repo, a.id).await.expect("row");
    assert_eq!(
        stored.vector,
        expected(&a2),
        "keeps_vectors = {keeps_vectors}, after update"
    );
}

// ---------------------------------------------------------------- commit_delete

/// Commits a delete with `selector` and checks that exactly `expected` went.
async fn check_delete<M: MetadataRepo + ?Sized>(
    repo: &M,
    selector: DeleteSelector,
    all: &[RowWrite],
    expected: &[&RowWrite],
) {
    let intent = prepared(repo, IntentKind::Delete, Vec::new()).await;
    let commit = ok(
        repo.commit_delete(intent.id, intent.owner, &selector, None)
            .await,
        "commit_delete",
    );
    let expected_points: Vec<PointId> = expected.iter().map(|r| r.point_id).collect();
    assert_eq!(
        commit.summary,
        CommitSummary {
            inserted: 0,
            updated: 0,
            deleted: expected.len() as u64
        },
        "{selector:?}"
    );
    assert_eq!(
        sorted(&commit.point_ids),
        sorted(&expected_points),
        "{selector:?}"
    );

    let gone: HashSet<RecordId> = expected.iter().map(|r| r.id).collect();
    let ids: Vec<RecordId> = all.iter().map(|r| r.id).collect();
    let kept: BTreeSet<RecordId> = ids
        .iter()
        .filter(|id| !gone.contains(id))
        .copied()
        .collect();
    assert_eq!(
        ids_present(repo, &ids).await,
        kept,
        "{selector:?} deleted the wrong rows"
    );

    let listed = intent_of(repo, intent.id).await;
    assert_eq!(listed.state, IntentState::Committed);
    assert_eq!(sorted(&listed.point_ids), sorted(&expected_points));
    assert_eq!(listed.summary, Some(commit.summary));
    let still_referenced = ok(
        repo.referenced_points(&expected_points).await,
        "referenced_points",
    );
    assert!(
        still_referenced.is_empty(),
        "deleted rows' points still referenced"
    );
}

/// `commit_delete_by_ids`: exactly the listed rows are deleted (missing ids are
/// ignored); `point_ids` are their points.
pub async fn commit_delete_by_ids<M: MetadataRepo + ?Sized>(repo: &M) {
    let scope = fresh_scope("delete-ids");
    let rows: Vec<RowWrite> = (0..4).map(|n| row(&scope, n)).collect();
    committed(repo, &rows).await;
    let selector = DeleteSelector::Ids(vec![rows[0].id, RecordId::new_random(), rows[2].id]);
    check_delete(repo, selector, &rows, &[&rows[0], &rows[2]]).await;
    // Only missing (and already deleted) ids: nothing deleted.
    let selector = DeleteSelector::Ids(vec![RecordId::new_random(), rows[0].id]);
    check_delete(repo, selector, &[rows[1].clone(), rows[3].clone()], &[]).await;
}

/// `commit_delete_by_scope`: exactly the rows of the scope are deleted.
pub async fn commit_delete_by_scope<M: MetadataRepo + ?Sized>(repo: &M) {
    let doomed = fresh_scope("delete-scope");
    let kept = fresh_scope("delete-scope-kept");
    let rows = vec![
        row(&doomed, 1),
        row(&kept, 2),
        row(&doomed, 3),
        row(&kept, 4),
    ];
    committed(repo, &rows).await;
    // A row moved out of the scope is not deleted with it; one moved in is.
    let moved_out = rewrite(&rows[2], &kept, 5);
    let moved_in = rewrite(&rows[3], &doomed, 6);
    committed(repo, &[moved_out.clone(), moved_in.clone()]).await;
    let current = vec![
        rows[0].clone(),
        rows[1].clone(),
        moved_out,
        moved_in.clone(),
    ];
    check_delete(
        repo,
        DeleteSelector::Scope(doomed.clone()),
        &current,
        &[&rows[0], &moved_in],
    )
    .await;
    let counts = ok(repo.count_by_scope().await, "count_by_scope");
    assert_eq!(counts.get(&doomed).copied().unwrap_or(0), 0);
    assert_eq!(counts.get(&kept).copied(), Some(2));
}

/// `commit_delete_by_metadata`: exactly the rows of the scope whose top-level
/// metadata key equals the value (same JSON type) are deleted.
pub async fn commit_delete_by_metadata<M: MetadataRepo + ?Sized>(repo: &M) {
    let scope = fresh_scope("delete-meta");
    let other = fresh_scope("delete-meta-other");
    let rows = vec![
        row_with_metadata(&scope, json!({ "item": "x", "lang": "en" })), // 0: selected
        row_with_metadata(&scope, json!({ "item": "y" })),
        row_with_metadata(&scope, json!({ "item": "x" })), // 2: selected
        row_with_metadata(&other, json!({ "item": "x" })), // other scope
        row_with_metadata(&scope, json!({ "other": "x" })),
        row_with_metadata(&scope, json!({ "item": ["x"] })),
        row_with_metadata(&scope, json!({ "item": { "x": 1 } })),
        row_with_metadata(&scope, json!({ "rank": 7 })), // 7: selected by rank = 7
        row_with_metadata(&scope, json!({ "rank": "7" })),
        row_with_metadata(&scope, json!({ "a.b": "x" })), // 9: selected by "a.b" = "x"
        row_with_metadata(&scope, json!({ "a": { "b": "x" } })),
        row_with_metadata(&scope, json!({ "item": "X" })),
    ];
    committed(repo, &rows).await;
    let select = |key: &str, value: Value| DeleteSelector::MetadataEq {
        scope: scope.clone(),
        key: key.to_owned(),
        value,
    };

    check_delete(
        repo,
        select("item", json!("x")),
        &rows,
        &[&rows[0], &rows[2]],
    )
    .await;
    let rest: Vec<RowWrite> = rows
        .iter()
        .enumerate()
        .filter(|(i, _)| ![0, 2].contains(i))
        .map(|(_, r)| r.clone())
        .collect();
    // Numbers match numbers, not strings.
    check_delete(repo, select("rank", json!(7)), &rest, &[&rows[7]]).await;
    let rest: Vec<RowWrite> = rest.into_iter().filter(|r| r.id != rows[7].id).collect();
    // The key is one top-level key, even with a dot in it.
    check_delete(repo, select("a.b", json!("x")), &rest, &[&rows[9]]).await;
    let rest: Vec<RowWrite> = rest.into_iter().filter(|r| r.id != rows[9].id).collect();
    check_delete(repo, select("missing", json!("x")), &rest, &[]).await;
}

/// `commit_delete_fenced_by_owner`: with a token that does not own the intent,
/// or a missing intent, it fails with `Fenced` and deletes nothing.
pub async fn commit_delete_fenced_by_owner<M: MetadataRepo + ?Sized>(repo: &M) {
    let scope = fresh_scope("delete-fenced");
    let rows = vec![row(&scope, 1), row(&scope, 2)];
    committed(repo, &rows).await;
    let intent = prepared(repo, IntentKind::Delete, Vec::new()).await;
    let before = intent_of(repo, intent.id).await;
    let selector = DeleteSelector::Scope(scope.clone());
    let key = format!("delete-fenced-{}", Uuid::new_v4());

    let err = repo
        .commit_delete(
            intent.id,
            OwnerToken::new_random(),
            &selector,
            Some(&idempotency(&key)),
        )
        .await
        .expect_err("a delete by a token that does not own the intent must fail");
    assert_fenced(err, intent.id, "delete with a foreign token");
    let missing = IntentId::new_random();
    let err = repo
        .commit_delete(missing, intent.owner, &selector, None)
        .await
        .expect_err("a delete with a missing intent must fail");
    assert_fenced(err, missing, "delete of a missing intent");

    let ids: Vec<RecordId> = rows.iter().map(|r| r.id).collect();
    assert_eq!(
        ids_present(repo, &ids).await.len(),
        2,
        "a fenced delete removed rows"
    );
    assert_eq!(
        intent_of(repo, intent.id).await,
        before,
        "a fenced delete changed the intent"
    );
    assert_eq!(
        ok(repo.lookup_idempotency(&key).await, "lookup_idempotency"),
        None
    );
}

/// `commit_delete_is_idempotent`: repeating a delete that already applied (same
/// intent and owner) returns the recorded result and changes nothing — rows
/// written since are not deleted by the replay.
pub async fn commit_delete_is_idempotent<M: MetadataRepo + ?Sized>(repo: &M) {
    let scope = fresh_scope("delete-idem");
    let rows = vec![row(&scope, 1), row(&scope, 2)];
    committed(repo, &rows).await;
    let intent = prepared(repo, IntentKind::Delete, Vec::new()).await;
    let selector = DeleteSelector::Scope(scope.clone());
    let key = format!("delete-idem-{}", Uuid::new_v4());
    let record = idempotency(&key);
    let first = ok(
        repo.commit_delete(intent.id, intent.owner, &selector, Some(&record))
            .await,
        "commit_delete",
    );
    assert_eq!(first.summary.deleted, 2);
    let recorded = ok(repo.lookup_idempotency(&key).await, "lookup_idempotency")
        .expect("the delete records its key");
    assert_eq!(recorded.summary, first.summary);
    let intent_after = intent_of(repo, intent.id).await;

    // A row written into the scope after the delete.
    let later = row(&scope, 3);
    committed(repo, std::slice::from_ref(&later)).await;

    let again = ok(
        repo.commit_delete(intent.id, intent.owner, &selector, Some(&record))
            .await,
        "repeated commit_delete",
    );
    assert_eq!(again.summary, first.summary);
    assert_eq!(sorted(&again.point_ids), sorted(&first.point_ids));
    assert_eq!(sorted(&first.point_ids), sorted(&points_of(&rows)));
    assert_row_is(
        &get_one(repo, later.id)
            .await
            .expect("a replayed delete removed a later row"),
        &later,
        1,
    );
    assert_eq!(intent_of(repo, intent.id).await, intent_after);
    assert_eq!(
        ok(repo.lookup_idempotency(&key).await, "lookup_idempotency"),
        Some(recorded)
    );
}

// ---------------------------------------------------------------- settle

/// `settle_committed`: a committed intent is reported `Committed`, unchanged.
pub async fn settle_committed<M: MetadataRepo + ?Sized>(repo: &M) {
    let scope = fresh_scope("settle-committed");
    let a = row(&scope, 1);
    committed(repo, std::slice::from_ref(&a)).await;
    let (intent, commit) = committed(repo, &[rewrite(&a, &scope, 2)]).await;
    let before = intent_of(repo, intent.id).await;
    let fence = OwnerToken::new_random();
    match ok(repo.settle(intent.id, intent.owner, fence).await, "settle") {
        Settlement::Committed(settled) => {
            assert_eq!(settled.state, IntentState::Committed);
            assert_eq!(
                settled.owner, intent.owner,
                "settling a committed intent fenced it"
            );
            assert_eq!(sorted(&settled.point_ids), sorted(&commit.old_point_ids));
            assert_eq!(settled.summary, Some(commit.summary));
        }
        other => panic!("expected Committed, got {other:?}"),
    }
    assert_eq!(
        intent_of(repo, intent.id).await,
        before,
        "settle changed a committed intent"
    );
    // The owner can still finish it.
    assert!(ok(repo.resolve(intent.id, intent.owner).await, "resolve"));
}

/// `settle_fences_prepared`: a prepared intent owned by `owner` is reported
/// `NotCommitted` and owned by `fence` afterwards, so a commit with `owner`
/// fails with `Fenced`. One owned by another token is reported `NotCommitted`
/// and keeps its owner.
pub async fn settle_fences_prepared<M: MetadataRepo + ?Sized>(repo: &M) {
    let scope = fresh_scope("settle-prepared");
    let rows = vec![row(&scope, 1)];
    let intent = prepared(repo, IntentKind::Upsert, points_of(&rows)).await;
    let fence = OwnerToken::new_random();
    match ok(repo.settle(intent.id, intent.owner, fence).await, "settle") {
        Settlement::NotCommitted(settled) => {
            assert_eq!(settled.state, IntentState::Prepared);
            assert_eq!(
                settled.owner, fence,
                "the settled intent must belong to the fence"
            );
            assert_eq!(sorted(&settled.point_ids), sorted(&intent.point_ids));
        }
        other => panic!("expected NotCommitted, got {other:?}"),
    }
    assert_eq!(intent_of(repo, intent.id).await.owner, fence);
    let err = repo
        .commit_upsert(intent.id, intent.owner, &rows, None)
        .await
        .expect_err("the lost commit must be fenced after settle");
    assert_fenced(err, intent.id, "commit after settle");
    assert!(
        get_one(repo, rows[0].id).await.is_none(),
        "a fenced commit wrote a row"
    );

    // Settling again with the old owner (a stale settler) fences nothing more.
    let late_fence = OwnerToken::new_random();
    match ok(
        repo.settle(intent.id, intent.owner, late_fence).await,
        "settle again",
    ) {
        Settlement::NotCommitted(settled) => assert_eq!(settled.owner, fence),
        other => panic!("expected NotCommitted, got {other:?}"),
    }
    assert_eq!(
        intent_of(repo, intent.id).await.owner,
        fence,
        "a stale settle took the intent"
    );
    // The fence owns it now: it can resolve it.
    assert!(ok(
        repo.resolve(intent.id, fence).await,
        "resolve by the fence"
    ));
}

/// `settle_missing`: a missing intent (never prepared, or resolved) is
/// reported `Missing`.
pub async fn settle_missing<M: MetadataRepo + ?Sized>(repo: &M) {
    let owner = OwnerToken::new_random();
    let settled = ok(
        repo.settle(IntentId::new_random(), owner, OwnerToken::new_random())
            .await,
        "settle",
    );
    assert_eq!(settled, Settlement::Missing);

    let intent = prepared(repo, IntentKind::Upsert, vec![PointId::new_random()]).await;
    assert!(ok(repo.resolve(intent.id, intent.owner).await, "resolve"));
    let settled = ok(
        repo.settle(intent.id, intent.owner, OwnerToken::new_random())
            .await,
        "settle resolved",
    );
    assert_eq!(settled, Settlement::Missing);
    assert_eq!(
        find_intent(repo, intent.id).await,
        None,
        "settle resurrected an intent"
    );
}

// ---------------------------------------------------------------- resolve

/// `resolve_removes_intent`: returns `true` and the intent is gone (prepared or
/// committed); the committed rows stay.
pub async fn resolve_removes_intent<M: MetadataRepo + ?Sized>(repo: &M) {
    let scope = fresh_scope("resolve");
    let intent = prepared(repo, IntentKind::Upsert, vec![PointId::new_random()]).await;
    assert!(ok(
        repo.resolve(intent.id, intent.owner).await,
        "resolve prepared"
    ));
    assert_eq!(
        find_intent(repo, intent.id).await,
        None,
        "a resolved intent is still listed"
    );

    let a = row(&scope, 1);
    let (intent, _) = committed(repo, std::slice::from_ref(&a)).await;
    assert!(ok(
        repo.resolve(intent.id, intent.owner).await,
        "resolve committed"
    ));
    assert_eq!(find_intent(repo, intent.id).await, None);
    assert_row_is(
        &get_one(repo, a.id).await.expect("row outlives its intent"),
        &a,
        1,
    );
}

/// `resolve_is_idempotent`: a missing intent, or one owned by another token,
/// returns `false` and changes nothing.
pub async fn resolve_is_idempotent<M: MetadataRepo + ?Sized>(repo: &M) {
    assert!(
        !ok(
            repo.resolve(IntentId::new_random(), OwnerToken::new_random())
                .await,
            "resolve"
        ),
        "resolving a missing intent returned true"
    );
    let intent = prepared(repo, IntentKind::Delete, vec![PointId::new_random()]).await;
    let before = intent_of(repo, intent.id).await;
    assert!(
        !ok(
            repo.resolve(intent.id, OwnerToken::new_random()).await,
            "resolve (foreign)"
        ),
        "a foreign token resolved the intent"
    );
    assert_eq!(intent_of(repo, intent.id).await, before);
    assert!(ok(repo.resolve(intent.id, intent.owner).await, "resolve"));
    assert!(
        !ok(repo.resolve(intent.id, intent.owner).await, "resolve again"),
        "resolving twice returned true twice"
    );
}

/// Prepares `n` intents that all belong to `owner`.
async fn prepared_by<M: MetadataRepo + ?Sized>(
    repo: &M,
    owner: OwnerToken,
    n: usize,
) -> Vec<NewIntent> {
    let mut intents = Vec::with_capacity(n);
    for _ in 0..n {
        let mut intent = new_intent(
            IntentKind::Upsert,
            vec![PointId::new_random()],
            FAR_FUTURE_MS,
        );
        intent.owner = owner;
        ok(repo.prepare(&intent).await, "prepare");
        intents.push(intent);
    }
    intents
}

/// `resolve_many_removes_only_owned`: exactly the listed intents owned by
/// `owner` are gone afterwards, and their number is returned; intents of
/// another owner, and intents not listed, are untouched.
pub async fn resolve_many_removes_only_owned<M: MetadataRepo + ?Sized>(repo: &M) {
    let owner = OwnerToken::new_random();
    let mine = prepared_by(repo, owner, 3).await;
    let foreign = prepared(repo, IntentKind::Delete, vec![PointId::new_random()]).await;
    let foreign_before = intent_of(repo, foreign.id).await;
    let ids = [mine[0].id, mine[1].id, foreign.id];
    assert_eq!(
        ok(repo.resolve_many(&ids, owner).await, "resolve_many"),
        2,
        "resolve_many counts the owned intents it resolved"
    );
    assert_eq!(find_intent(repo, mine[0].id).await, None);
    assert_eq!(find_intent(repo, mine[1].id).await, None);
    assert_eq!(
        intent_of(repo, foreign.id).await,
        foreign_before,
        "an intent of another owner changed"
    );
    assert!(
        find_intent(repo, mine[2].id).await.is_some(),
        "an intent that was not listed was resolved"
    );
}

/// `resolve_many_is_idempotent`: missing intents are skipped; repeating the
/// call returns 0 and changes nothing.
pub async fn resolve_many_is_idempotent<M: MetadataRepo + ?Sized>(repo: &M) {
    let owner = OwnerToken::new_random();
    let mine = prepared_by(repo, owner, 2).await;
    let ids = [IntentId::new_random(), mine[0].id, mine[1].id];
    assert_eq!(ok(repo.resolve_many(&ids, owner).await, "resolve_many"), 2);
    assert_eq!(
        ok(repo.resolve_many(&ids, owner).await, "resolve_many again"),
        0,
        "resolving twice counted intents twice"
    );
    assert_eq!(
        ok(
            repo.resolve_many(&[], owner).await,
            "resolve_many of nothing"
        ),
        0
    );
}

// ---------------------------------------------------------------- claim_expired

async fn prepared_with_lease<M: MetadataRepo + ?Sized>(repo: &M, lease: i64) -> NewIntent {
    let intent = new_intent(IntentKind::Upsert, vec![PointId::new_random()], lease);
    ok(repo.prepare(&intent).await, "prepare");
    intent
}

/// `claim_takes_only_expired`: intents whose lease has not ended are not claimed.
pub async fn claim_takes_only_expired<M: MetadataRepo + ?Sized>(repo: &M) {
    let now = CLAIM_NOW_MS;
    let expired = [
        prepared_with_lease(repo, now - 1_000).await,
        prepared_with_lease(repo, now - 1).await,
    ];
    let live = [
        prepared_with_lease(repo, now + 1).await,
        prepared_with_lease(repo, now + 60_000).await,
    ];
    // A committed intent whose lease expired is claimed too (its cleanup is unfinished).
    let scope = fresh_scope("claim-expired");
    let rows = vec![row(&scope, 1)];
    let committed_intent = new_intent(IntentKind::Upsert, points_of(&rows), now - 10);
    ok(repo.prepare(&committed_intent).await, "prepare");
    ok(
        repo.commit_upsert(committed_intent.id, committed_intent.owner, &rows, None)
            .await,
        "commit_upsert",
    );

    let recovery = OwnerToken::new_random();
    let claimed = ok(
        repo.claim_expired(now, recovery, now + 600_000, ALL).await,
        "claim",
    );
    let claimed_ids: HashSet<IntentId> = claimed.iter().map(|i| i.id).collect();
    for intent in expired.iter().chain([&committed_intent]) {
        assert!(
            claimed_ids.contains(&intent.id),
            "expired intent {} not claimed",
            intent.id
        );
    }
    for intent in &live {
        assert!(
            !claimed_ids.contains(&intent.id),
            "live intent {} was claimed",
            intent.id
        );
        assert_eq!(intent_of(repo, intent.id).await.owner, intent.owner);
    }
    let claimed_committed = claimed
        .iter()
        .find(|i| i.id == committed_intent.id)
        .expect("claimed");
    assert_eq!(claimed_committed.state, IntentState::Committed);
    // Nothing left to claim at the same instant.
    let again = ok(
        repo.claim_expired(now, OwnerToken::new_random(), now + 1, ALL)
            .await,
        "claim",
    );
    assert!(
        again.iter().all(|i| !claimed_ids.contains(&i.id)),
        "an intent was claimed twice while its new lease was running"
    );
}

/// `claim_transfers_ownership`: claimed intents come back with the new owner,
/// lease and attempts + 1; the old owner's commit is fenced.
pub async fn claim_transfers_ownership<M: MetadataRepo + ?Sized>(repo: &M) {
    let now = CLAIM_NOW_MS;
    let scope = fresh_scope("claim-transfer");
    let rows = vec![row(&scope, 1), row(&scope, 2)];
    let intent = new_intent(IntentKind::Upsert, points_of(&rows), now - 5);
    ok(repo.prepare(&intent).await, "prepare");

    let recovery = OwnerToken::new_random();
    let lease = now + 30_000;
    let claimed = ok(repo.claim_expired(now, recovery, lease, ALL).await, "claim");
    let mine = claimed
        .iter()
        .find(|i| i.id == intent.id)
        .expect("the expired intent is claimed");
    assert_eq!(mine.owner, recovery);
    assert_eq!(mine.lease_deadline_ms, lease);
    assert_eq!(mine.attempts, 1);
    assert_eq!(mine.state, IntentState::Prepared);
    assert_eq!(mine.kind, IntentKind::Upsert);
    assert_eq!(sorted(&mine.point_ids), sorted(&intent.point_ids));
    assert_eq!(
        &intent_of(repo, intent.id).await,
        mine,
        "the listed intent differs"
    );

    let err = repo
        .commit_upsert(intent.id, intent.owner, &rows, None)
        .await
        .expect_err("the old owner's commit must be fenced");
    assert_fenced(err, intent.id, "commit by the old owner");
    assert!(get_one(repo, rows[0].id).await.is_none());

    // When the new lease runs out too, the next claim counts another attempt.
    let second = OwnerToken::new_random();
    let claimed = ok(
        repo.claim_expired(lease + 1, second, lease + 60_000, ALL)
            .await,
        "claim",
    );
    let mine = claimed
        .iter()
        .find(|i| i.id == intent.id)
        .expect("claimed again");
    assert_eq!((mine.owner, mine.attempts), (second, 2));
    assert!(
        !ok(repo.resolve(intent.id, recovery).await, "resolve"),
        "the first claimer resolved"
    );
    assert!(ok(repo.resolve(intent.id, second).await, "resolve"));
}

/// `claim_is_exclusive`: concurrent claims never return the same intent.
pub async fn claim_is_exclusive<M: MetadataRepo + ?Sized>(repo: &M) {
    const INTENTS: usize = 24;
    const CLAIMERS: usize = 4;
    let now = CLAIM_NOW_MS;
    let mut ours = HashSet::new();
    for n in 0..INTENTS {
        ours.insert(prepared_with_lease(repo, now - 100 - n as i64).await.id);
    }
    let owners: Vec<OwnerToken> = (0..CLAIMERS).map(|_| OwnerToken::new_random()).collect();
    // Several rounds of concurrent claims, each taking fewer than all.
    let mut claimed_by: std::collections::HashMap<IntentId, OwnerToken> = Default::default();
    for _round in 0..3 {
        let results = join_all(
            owners
                .iter()
                .map(|owner| repo.claim_expired(now, *owner, now + 600_000, 3)),
        )
        .await;
        for (owner, result) in owners.iter().zip(results) {
            let claimed = ok(result, "concurrent claim");
            assert!(claimed.len() <= 3, "a claim returned more than its limit");
            for intent in claimed {
                assert_eq!(
                    intent.owner, *owner,
                    "a claim returned an intent it does not own"
                );
                if let Some(previous) = claimed_by.insert(intent.id, *owner) {
                    panic!("intent {} claimed by {previous} and by {owner}", intent.id);
                }
            }
        }
    }
    // Whatever remains goes to one last claimer; in all, each was claimed once.
    let last = OwnerToken::new_random();
    for intent in ok(
        repo.claim_expired(now, last, now + 600_000, ALL).await,
        "final claim",
    ) {
        if let Some(previous) = claimed_by.insert(intent.id, last) {
            panic!(
                "intent {} claimed by {previous} and again by the final claim",
                intent.id
            );
        }
    }
    for id in &ours {
        let owner = claimed_by
            .get(id)
            .unwrap_or_else(|| panic!("intent {id} never claimed"));
        let listed = intent_of(repo, *id).await;
        assert_eq!(
            listed.owner, *owner,
            "intent {id} is owned by another claimer"
        );
        assert_eq!(listed.attempts, 1, "intent {id} claimed more than once");
    }
}

/// `claim_respects_limit`: at most `limit` are returned, oldest lease first.
pub async fn claim_respects_limit<M: MetadataRepo + ?Sized>(repo: &M) {
    let now = CLAIM_NOW_MS;
    // Prepared out of lease order, so that creation order does not give the answer.
    let leases = [now - 30, now - 50, now - 10, now - 40, now - 20];
    let mut intents = Vec::new();
    for lease in leases {
        intents.push(prepared_with_lease(repo, lease).await);
    }
    let mut by_lease = intents.clone();
    by_lease.sort_by_key(|i| i.lease_deadline_ms);

    let none = ok(
        repo.claim_expired(now, OwnerToken::new_random(), now + 1_000, 0)
            .await,
        "claim 0",
    );
    assert!(none.is_empty(), "limit 0 claimed {}", none.len());

    let first = ok(
        repo.claim_expired(now, OwnerToken::new_random(), now + 1_000, 2)
            .await,
        "claim 2",
    );
    assert_eq!(first.len(), 2, "limit 2 with five expired intents");
    let first_ids: BTreeSet<IntentId> = first.iter().map(|i| i.id).collect();
    let oldest: BTreeSet<IntentId> = by_lease[..2].iter().map(|i| i.id).collect();
    assert_eq!(first_ids, oldest, "claims take the oldest leases first");

    let rest = ok(
        repo.claim_expired(now, OwnerToken::new_random(), now + 1_000, 10)
            .await,
        "claim 10",
    );
    let rest_ids: BTreeSet<IntentId> = rest.iter().map(|i| i.id).collect();
    let expected: BTreeSet<IntentId> = by_lease[2..].iter().map(|i| i.id).collect();
    assert!(rest.len() <= 10);
    assert!(
        expected.is_subset(&rest_ids),
        "the remaining expired intents were not claimed"
    );
    assert!(rest_ids.is_disjoint(&first_ids));
}

// ---------------------------------------------------------------- record_failure

/// `record_failure_sets_last_error`: the owner's message becomes the intent's
/// `last_error`; another owner's call changes nothing.
pub async fn record_failure_sets_last_error<M: MetadataRepo + ?Sized>(repo: &M) {
    let intent = prepared(repo, IntentKind::Upsert, vec![PointId::new_random()]).await;
    ok(
        repo.record_failure(intent.id, intent.owner, "index unavailable: retry later")
            .await,
        "record_failure",
    );
    let listed = intent_of(repo, intent.id).await;
    assert_eq!(
        listed.last_error.as_deref(),
        Some("index unavailable: retry later")
    );

    ok(
        repo.record_failure(intent.id, OwnerToken::new_random(), "not mine")
            .await,
        "record_failure (foreign)",
    );
    let after = intent_of(repo, intent.id).await;
    assert_eq!(after, listed, "another owner's failure changed the intent");

    ok(
        repo.record_failure(intent.id, intent.owner, "second failure")
            .await,
        "record_failure",
    );
    let after = intent_of(repo, intent.id).await;
    assert_eq!(after.last_error.as_deref(), Some("second failure"));
    assert_eq!(after.state, IntentState::Prepared);
    assert_eq!(after.attempts, listed.attempts);
}

// ---------------------------------------------------------------- reads

/// Commits `a` and `b`, then a new version of `a`, and prepares (but never
/// commits) one more point. Returns (a, a2, b, uncommitted point).
async fn history<M: MetadataRepo + ?Sized>(
    repo: &M,
    tag: &str,
) -> (RowWrite, RowWrite, RowWrite, PointId) {
    let scope = fresh_scope(tag);
    let a = row(&scope, 1);
    let b = row(&scope, 2);
    committed(repo, &[a.clone(), b.clone()]).await;
    let a2 = rewrite(&a, &scope, 3);
    committed(repo, std::slice::from_ref(&a2)).await;
    let pending = PointId::new_random();
    prepared(repo, IntentKind::Upsert, vec![pending]).await;
    (a, a2, b, pending)
}

/// `referenced_points_subset`: exactly the given points that some row
/// references; unknown, superseded and uncommitted points are absent.
pub async fn referenced_points_subset<M: MetadataRepo + ?Sized>(repo: &M) {
    let (a, a2, b, pending) = history(repo, "referenced").await;
    let unknown = PointId::new_random();
    let asked = [a.point_id, a2.point_id, b.point_id, pending, unknown];
    let referenced = ok(repo.referenced_points(&asked).await, "referenced_points");
    assert_eq!(referenced, HashSet::from([a2.point_id, b.point_id]));
    let only_unknown = ok(
        repo.referenced_points(&[unknown, a.point_id]).await,
        "referenced_points",
    );
    assert!(only_unknown.is_empty());
    assert!(ok(repo.referenced_points(&[]).await, "referenced_points").is_empty());
}

/// `rows_by_points_current_only`: a row is returned only for its current point.
pub async fn rows_by_points_current_only<M: MetadataRepo + ?Sized>(repo: &M) {
    let (a, a2, b, pending) = history(repo, "rows-by-points").await;
    let asked = [
        a.point_id,
        pending,
        a2.point_id,
        PointId::new_random(),
        b.point_id,
    ];
    let mut rows = ok(repo.rows_by_points(&asked).await, "rows_by_points");
    rows.sort_by_key(|r| r.id);
    let mut expected = vec![(a2.clone(), 2), (b.clone(), 1)];
    expected.sort_by_key(|(r, _)| r.id);
    assert_eq!(rows.len(), 2, "rows_by_points returned {rows:?}");
    for (stored, (written, version)) in rows.iter().zip(&expected) {
        assert_row_is(stored, written, *version);
    }
    let superseded = ok(
        repo.rows_by_points(&[a.point_id, pending]).await,
        "rows_by_points",
    );
    assert!(
        superseded.is_empty(),
        "superseded/uncommitted points returned rows: {superseded:?}"
    );
}

/// `commit_upsert_gated_passed`: once the gate passed, a gated commit has the
/// result and effects of `commit_upsert` (inserts, updates, the intent's swap).
pub async fn commit_upsert_gated_passed<M: MetadataRepo + ?Sized>(repo: &M) {
    let scope = fresh_scope("gated-passed");
    let a = row(&scope, 1);
    committed(repo, std::slice::from_ref(&a)).await;
    let a2 = rewrite(&a, &scope, 2);
    let b = row(&scope, 3);
    let rows = [a2.clone(), b.clone()];
    let intent = prepared(repo, IntentKind::Upsert, points_of(&rows)).await;
    let commit = ok(
        repo.commit_upsert_gated(intent.id, intent.owner, &rows, None, &IndexGate::passed())
            .await,
        "commit_upsert_gated",
    );
    assert_eq!(
        commit.summary,
        CommitSummary {
            inserted: 1,
            updated: 1,
            deleted: 0
        }
    );
    assert_eq!(commit.old_point_ids, vec![a.point_id]);
    assert_row_is(&get_one(repo, a.id).await.expect("a updated"), &a2, 2);
    assert_row_is(&get_one(repo, b.id).await.expect("b inserted"), &b, 1);
    let stored = intent_of(repo, intent.id).await;
    assert_eq!(stored.state, IntentState::Committed);
    assert_eq!(stored.point_ids, vec![a.point_id]);
}

/// `commit_upsert_gated_failed`: a failed gate aborts the commit, which writes
/// nothing.
pub async fn commit_upsert_gated_failed<M: MetadataRepo + ?Sized>(repo: &M) {
    let scope = fresh_scope("gated-failed");
    let a = row(&scope, 1);
    committed(repo, std::slice::from_ref(&a)).await;
    let a2 = rewrite(&a, &scope, 2);
    let b = row(&scope, 3);
    let rows = [a2, b.clone()];
    let intent = prepared(repo, IntentKind::Upsert, points_of(&rows)).await;
    let err = repo
        .commit_upsert_gated(
            intent.id,
            intent.owner,
            &rows,
            Some(&idempotency(&format!("gated-failed-{}", scope.as_str()))),
            &IndexGate::failed(),
        )
        .await
        .expect_err("a failed gate must abort the commit");
    assert!(
        matches!(err, MetadataError::Aborted { intent: i } if i == intent.id),
        "expected Aborted, got {err:?}"
    );
    assert_eq!(err.outcome(), crate::error::Outcome::NotApplied);
    assert_row_is(&get_one(repo, a.id).await.expect("a kept"), &a, 1);
    assert!(get_one(repo, b.id).await.is_none(), "b was inserted");
    let stored = intent_of(repo, intent.id).await;
    assert_eq!(stored.state, IntentState::Prepared);
    assert_eq!(stored.owner, intent.owner);
    let key = format!("gated-failed-{}", scope.as_str());
    assert!(
        ok(repo.lookup_idempotency(&key).await, "lookup_idempotency").is_none(),
        "the key was recorded"
    );
}

/// `commit_upsert_gated_waits`: until the gate is decided the commit neither
/// returns nor shows any effect to other calls.
pub async fn commit_upsert_gated_waits<M: MetadataRepo + ?Sized>(repo: &M) {
    use std::sync::atomic::{AtomicBool, Ordering};

    let scope = fresh_scope("gated-waits");
    let a = row(&scope, 1);
    committed(repo, std::slice::from_ref(&a)).await;
    let a2 = rewrite(&a, &scope, 2);
    let b = row(&scope, 3);
    let rows = [a2.clone(), b.clone()];
    let intent = prepared(repo, IntentKind::Upsert, points_of(&rows)).await;
    let (opener, gate) = IndexGate::pending();
    let returned = AtomicBool::new(false);
    let commit = async {
        let result = repo
            .commit_upsert_gated(intent.id, intent.owner, &rows, None, &gate)
            .await;
        returned.store(true, Ordering::SeqCst);
        result
    };
    let observer = async {
        // Long enough for a store that overlaps to have run its statements.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(
            !returned.load(Ordering::SeqCst),
            "the commit returned before its gate was decided"
        );
        assert_row_is(&get_one(repo, a.id).await.expect("a"), &a, 1);
        assert!(
            get_one(repo, b.id).await.is_none(),
            "b visible before the gate"
        );
        assert!(
            ok(repo.rows_by_points(&[b.point_id]).await, "rows_by_points").is_empty(),
            "b's point is referenced before the gate"
        );
        let pending = intent_of(repo, intent.id).await;
        assert_eq!(
            pending.state,
            IntentState::Prepared,
            "committed before the gate"
        );
        opener.decide(true);
    };
    let (commit, ()) = tokio::join!(commit, observer);
    let commit = ok(commit, "commit_upsert_gated");
    assert_eq!(commit.old_point_ids, vec![a.point_id]);
    assert_row_is(&get_one(repo, a.id).await.expect("a updated"), &a2, 2);
    assert_row_is(&get_one(repo, b.id).await.expect("b inserted"), &b, 1);
}

/// `rows_by_points_without_vectors`: rows come without their vectors.
pub async fn rows_by_points_without_vectors<M: MetadataRepo + ?Sized>(repo: &M) {
    let scope = fresh_scope("rows-by-points-vectors");
    let mut a = row(&scope, 1);
    a.vector = vec![0.5, -2.0, 1.0, 4.0];
    committed(repo, std::slice::from_ref(&a)).await;
    let rows = ok(repo.rows_by_points(&[a.point_id]).await, "rows_by_points");
    assert_eq!(rows.len(), 1, "rows_by_points returned {rows:?}");
    assert_row_is(&rows[0], &a, 1);
    assert_eq!(rows[0].vector, None, "rows_by_points returned a vector");
}

/// `get_returns_existing`: existing ids are returned, missing ones omitted.
pub async fn get_returns_existing<M: MetadataRepo + ?Sized>(repo: &M) {
    let scope = fresh_scope("get");
    let a = row(&scope, 1);
    let b = row(&scope, 2);
    committed(repo, &[a.clone(), b.clone()]).await;
    let mut got = ok(repo.get(&[b.id, RecordId::new_random(), a.id]).await, "get");
    got.sort_by_key(|r| r.id);
    let mut expected = [a, b];
    expected.sort_by_key(|r| r.id);
    assert_eq!(got.len(), 2, "get returned {got:?}");
    for (stored, written) in got.iter().zip(&expected) {
        assert_row_is(stored, written, 1);
    }
    assert!(ok(repo.get(&[RecordId::new_random()]).await, "get").is_empty());
    assert!(ok(repo.get(&[]).await, "get").is_empty());
}

/// `lookup_idempotency_unknown_key`: an unknown key returns `None`.
pub async fn lookup_idempotency_unknown_key<M: MetadataRepo + ?Sized>(repo: &M) {
    let key = format!("never-used-{}", Uuid::new_v4());
    assert_eq!(
        ok(repo.lookup_idempotency(&key).await, "lookup_idempotency"),
        None
    );
    // A recorded key does not answer for a similar one.
    let scope = fresh_scope("lookup");
    let rows = vec![row(&scope, 1)];
    let intent = prepared(repo, IntentKind::Upsert, points_of(&rows)).await;
    let recorded = format!("recorded-{}", Uuid::new_v4());
    ok(
        repo.commit_upsert(
            intent.id,
            intent.owner,
            &rows,
            Some(&idempotency(&recorded)),
        )
        .await,
        "commit_upsert",
    );
    for similar in [
        format!("{recorded} "),
        recorded.to_uppercase(),
        recorded[..20].to_owned(),
    ] {
        assert_eq!(
            ok(
                repo.lookup_idempotency(&similar).await,
                "lookup_idempotency"
            ),
            None
        );
    }
    assert!(
        ok(
            repo.lookup_idempotency(&recorded).await,
            "lookup_idempotency"
        )
        .is_some()
    );
}

/// `scan_refs_pages_cover_all`: the pages together list every row of the scope
/// exactly once, in record id order.
pub async fn scan_refs_pages_cover_all<M: MetadataRepo + ?Sized>(repo: &M) {
    let scope = fresh_scope("scan");
    let other = fresh_scope("scan-other");
    let mut rows: Vec<RowWrite> = (0..7).map(|n| row(&scope, n)).collect();
    let others: Vec<RowWrite> = (0..3).map(|n| row(&other, n)).collect();
    committed(repo, &rows).await;
    committed(repo, &others).await;
    // One row at version 2, so versions are reported.
    rows[3] = rewrite(&rows[3], &scope, 30);
    committed(repo, std::slice::from_ref(&rows[3])).await;

    let mut listed = Vec::new();
    let mut after = None;
    for page_no in 0.. {
        assert!(page_no < 100, "scan_refs never ended");
        let page = ok(repo.scan_refs(Some(&scope), after, 3).await, "scan_refs");
        assert!(
            page.items.len() <= 3,
            "a page holds {} rows",
            page.items.len()
        );
        listed.extend(page.items);
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let mut expected: Vec<(RecordId, PointId, u64)> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id, r.point_id, if i == 3 { 2 } else { 1 }))
        .collect();
    expected.sort();
    let got: Vec<(RecordId, PointId, u64)> = listed
        .iter()
        .map(|r| (r.id, r.point_id, r.version))
        .collect();
    assert_eq!(
        got, expected,
        "pages must list each row of the scope once, by record id"
    );
    assert!(listed.iter().all(|r| r.scope == scope));

    // Without a scope: every row of both scopes, each once, in record id order.
    let mut all = Vec::new();
    let mut after = None;
    for page_no in 0.. {
        assert!(page_no < 100_000, "scan_refs never ended");
        let page = ok(repo.scan_refs(None, after, 4).await, "scan_refs");
        assert!(page.items.len() <= 4);
        all.extend(page.items.into_iter().map(|r| (r.id, r.scope)));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert!(
        all.windows(2).all(|w| w[0].0 < w[1].0),
        "unscoped pages are not in id order"
    );
    let all: std::collections::HashMap<RecordId, Scope> = all.into_iter().collect();
    for r in rows.iter().chain(&others) {
        assert_eq!(
            all.get(&r.id),
            Some(&r.scope),
            "row {} missing from the unscoped scan",
            r.id
        );
    }
}

/// `count_by_scope_counts_rows`: counts every scope with at least one row.
pub async fn count_by_scope_counts_rows<M: MetadataRepo + ?Sized>(repo: &M) {
    let s1 = fresh_scope("count-1");
    let s2 = fresh_scope("count-2");
    let s3 = fresh_scope("count-3");
    let rows = vec![row(&s1, 1), row(&s1, 2), row(&s1, 3), row(&s2, 4)];
    committed(repo, &rows).await;
    let counts = ok(repo.count_by_scope().await, "count_by_scope");
    assert_eq!(counts.get(&s1), Some(&3));
    assert_eq!(counts.get(&s2), Some(&1));
    assert_eq!(counts.get(&s3).copied().unwrap_or(0), 0);

    // Updates do not add rows; a row moving scope moves its count.
    committed(
        repo,
        &[rewrite(&rows[0], &s1, 5), rewrite(&rows[3], &s3, 6)],
    )
    .await;
    // A prepared, uncommitted row is not counted.
    prepared(repo, IntentKind::Upsert, vec![PointId::new_random()]).await;
    let counts = ok(repo.count_by_scope().await, "count_by_scope");
    assert_eq!(counts.get(&s1), Some(&3));
    assert_eq!(counts.get(&s2).copied().unwrap_or(0), 0);
    assert_eq!(counts.get(&s3), Some(&1));

    let intent = prepared(repo, IntentKind::Delete, Vec::new()).await;
    ok(
        repo.commit_delete(
            intent.id,
            intent.owner,
            &DeleteSelector::Ids(vec![rows[1].id]),
            None,
        )
        .await,
        "commit_delete",
    );
    let counts = ok(repo.count_by_scope().await, "count_by_scope");
    assert_eq!(counts.get(&s1), Some(&2));
}
