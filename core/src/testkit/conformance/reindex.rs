//! The [`MetadataRepo`] conformance cases of re-indexing, one per contract
//! bullet: the index state, the migration methods and the generation fence
//! of `prepare`. A store whose [`reindexing`](MetadataRepo::reindexing) is
//! `false` skips them (each says so on stdout), except the first, which
//! checks the default state every store answers.
//!
//! A migration affects the whole store (it fences prepared intents, records
//! garbage), so every case expects a store of its own, as the fixtures give.

use super::deferred::{claim_ours, defer, switch, to};
use super::metadata::{FAR_FUTURE_MS, assert_fenced};
use super::metadata::{committed, fresh_scope, get_one, new_intent, ok, points_of, rewrite, row};
use crate::error::MetadataError;
use crate::model::{
    DeleteSelector, Distance, IndexSwitch, IntentKind, NewIntent, OwnerToken, PointId, RecordId,
    RowWrite,
};
use crate::ports::MetadataRepo;
use crate::reindex::{IndexState, MigrationSpec, ReindexSource, StagedVector, SwitchOutcome};

/// "Now" of the migration calls.
const NOW: i64 = 2_000_000_000_000;
/// A live lease.
const LEASE: i64 = NOW + 60_000;
/// The deferred cases' claim time.
const CLAIM_NOW: i64 = 2_000_000_000_000;

fn skipped<M: MetadataRepo + ?Sized>(repo: &M, case: &str) -> bool {
    if repo.reindexing() {
        return false;
    }
    println!("{case}: skipped, the store has no re-indexing");
    true
}

fn spec(target: &str) -> MigrationSpec {
    MigrationSpec {
        target: target.to_owned(),
        dimension: 3,
        distance: Distance::Cosine,
        source: ReindexSource::KeptVectors,
    }
}

async fn state<M: MetadataRepo + ?Sized>(repo: &M) -> IndexState {
    ok(repo.index_state().await, "index_state")
}

async fn begin<M: MetadataRepo + ?Sized>(repo: &M, target: &str, owner: OwnerToken) -> IndexState {
    ok(
        repo.reindex_begin(&spec(target), owner, NOW, LEASE).await,
        "reindex_begin",
    )
}

/// An intent prepared under `generation`.
fn intent_at(generation: u64, points: Vec<PointId>) -> NewIntent {
    NewIntent {
        generation,
        ..new_intent(IntentKind::Upsert, points, FAR_FUTURE_MS)
    }
}

/// Upserts `rows` under an intent of `generation`.
async fn upsert_at<M: MetadataRepo + ?Sized>(repo: &M, generation: u64, rows: &[RowWrite]) {
    let intent = intent_at(generation, points_of(rows));
    ok(repo.prepare(&intent).await, "prepare");
    ok(
        repo.commit_upsert(intent.id, intent.owner, rows, None)
            .await,
        "commit_upsert",
    );
}

/// Every row after `after`, paged by `page`.
async fn scan_all<M: MetadataRepo + ?Sized>(
    repo: &M,
    after: u64,
    page: usize,
) -> Vec<crate::reindex::ChangedRow> {
    let mut out = Vec::new();
    let mut cursor = after;
    loop {
        let chunk = ok(repo.reindex_scan(cursor, page).await, "reindex_scan");
        assert!(
            chunk.len() <= page,
            "reindex_scan returned more than its limit"
        );
        let Some(last) = chunk.last() else {
            return out;
        };
        assert!(
            chunk.windows(2).all(|w| w[0].seq < w[1].seq) && chunk[0].seq > cursor,
            "reindex_scan is not in increasing change order after the cursor"
        );
        cursor = last.seq;
        out.extend(chunk);
    }
}

fn assert_conflict<T: std::fmt::Debug>(result: Result<T, MetadataError>, what: &str) {
    match result {
        Err(MetadataError::MigrationConflict { .. }) => {}
        other => panic!("{what}: expected MigrationConflict, got {other:?}"),
    }
}

/// `reindex_state_starts_empty`: generation 0, nothing named, no migration.
pub async fn reindex_state_starts_empty<M: MetadataRepo + ?Sized>(repo: &M) {
    assert_eq!(state(repo).await, IndexState::default());
}

/// `reindex_begin_opens`: the migration is listed as opened; a prepared
/// intent is fenced.
pub async fn reindex_begin_opens<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "reindex_begin_opens") {
        return;
    }
    let scope = fresh_scope("reindex-begin");
    let r = row(&scope, 1);
    let intent = intent_at(0, points_of(std::slice::from_ref(&r)));
    ok(repo.prepare(&intent).await, "prepare");
    let owner = OwnerToken::new_random();
    let s = begin(repo, "next", owner).await;
    let m = s.migration.clone().expect("the migration is open");
    assert_eq!(m.spec, spec("next"));
    assert_eq!((m.owner, m.lease_until_ms), (owner, LEASE));
    assert_eq!((m.cursor, m.copied, m.started_ms), (0, 0, NOW));
    assert_eq!(m.frozen_until_ms, None);
    assert_eq!(
        state(repo).await,
        s,
        "index_state disagrees with begin's answer"
    );
    let err = repo
        .commit_upsert(intent.id, intent.owner, std::slice::from_ref(&r), None)
        .await
        .expect_err("a commit of an intent prepared before the begin");
    assert_fenced(err, intent.id, "commit after begin");
    assert!(
        get_one(repo, r.id).await.is_none(),
        "the fenced commit wrote"
    );
}

/// `reindex_begin_resumes`: after the lease, a new owner takes the same
/// migration over with its cursor and count.
pub async fn reindex_begin_resumes<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "reindex_begin_resumes") {
        return;
    }
    let first = OwnerToken::new_random();
    begin(repo, "next", first).await;
    ok(
        repo.reindex_progress(first, 7, 5, &[], &[], LEASE).await,
        "reindex_progress",
    );
    let second = OwnerToken::new_random();
    let later = LEASE + 1;
    let s = ok(
        repo.reindex_begin(&spec("next"), second, later, later + 1_000)
            .await,
        "reindex_begin after the lease",
    );
    let m = s.migration.expect("still open");
    assert_eq!((m.owner, m.lease_until_ms), (second, later + 1_000));
    assert_eq!(
        (m.cursor, m.copied, m.started_ms),
        (7, 5, NOW),
        "progress lost"
    );
    assert_conflict(
        repo.reindex_progress(first, 8, 1, &[], &[], LEASE).await,
        "progress of the displaced driver",
    );
}

/// `reindex_begin_conflicts`: another spec, or a live driver, conflicts.
pub async fn reindex_begin_conflicts<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "reindex_begin_conflicts") {
        return;
    }
    let owner = OwnerToken::new_random();
    let opened = begin(repo, "next", owner).await;
    assert_conflict(
        repo.reindex_begin(&spec("other"), OwnerToken::new_random(), NOW, LEASE)
            .await,
        "begin of another target",
    );
    assert_conflict(
        repo.reindex_begin(&spec("next"), OwnerToken::new_random(), NOW + 1, LEASE)
            .await,
        "begin while the driver's lease is live",
    );
    assert_eq!(
        state(repo).await,
        opened,
        "a refused begin changed the state"
    );
}

/// `reindex_scan_orders_by_change`: commit order; a repointed row moves
/// past; a deferred update does not; deleted rows are absent.
pub async fn reindex_scan_orders_by_change<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "reindex_scan_orders_by_change") {
        return;
    }
    let scope = fresh_scope("reindex-scan");
    let (a, b, c) = (row(&scope, 1), row(&scope, 2), row(&scope, 3));
    committed(repo, std::slice::from_ref(&a)).await;
    committed(repo, &[b.clone(), c.clone()]).await;
    let all = scan_all(repo, 0, 1).await;
    let ids: Vec<_> = all.iter().map(|r| r.row.id).collect();
    let pos = |id| ids.iter().position(|x| *x == id).expect("listed");
    assert!(
        pos(a.id) < pos(b.id) && pos(a.id) < pos(c.id),
        "not in commit order"
    );
    assert_eq!(ids.len(), 3, "a row listed twice or missing: {ids:?}");
    let a_row = &all[pos(a.id)];
    assert_eq!(
        (
            a_row.row.point_id,
            a_row.row.content.as_str(),
            a_row.indexed
        ),
        (a.point_id, a.content.as_str(), true)
    );
    let mark = all.iter().map(|r| r.seq).max().expect("rows");
    // Repoint a: it moves past every other row.
    let a2 = rewrite(&a, &scope, 4);
    committed(repo, std::slice::from_ref(&a2)).await;
    // A deferred update of b keeps its point: it does not move.
    if repo.deferred_indexing() {
        defer(repo, &[rewrite(&b, &scope, 5)], CLAIM_NOW).await;
    }
    // Deleting c removes it.
    let intent = super::metadata::prepared(repo, IntentKind::Delete, Vec::new()).await;
    ok(
        repo.commit_delete(
            intent.id,
            intent.owner,
            &DeleteSelector::Ids(vec![c.id]),
            None,
        )
        .await,
        "commit_delete",
    );
    let after = scan_all(repo, mark, 10).await;
    let moved: Vec<_> = after.iter().map(|r| (r.row.id, r.row.point_id)).collect();
    assert_eq!(moved, vec![(a.id, a2.point_id)], "after the mark");
    let everything: Vec<_> = scan_all(repo, 0, 2)
        .await
        .iter()
        .map(|r| r.row.id)
        .collect();
    assert_eq!(
        everything,
        vec![b.id, a.id],
        "the whole scan after the changes"
    );
}

/// `reindex_scan_marks_reserved`: a deferred insert is listed unindexed
/// until a worker switches it in.
pub async fn reindex_scan_marks_reserved<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "reindex_scan_marks_reserved") || !repo.deferred_indexing() {
        println!("reindex_scan_marks_reserved: skipped, no deferred indexing");
        return;
    }
    let scope = fresh_scope("reindex-reserved");
    let r = row(&scope, 1);
    defer(repo, std::slice::from_ref(&r), CLAIM_NOW).await;
    let listed = scan_all(repo, 0, 10).await;
    let found = listed.iter().find(|c| c.row.id == r.id).expect("listed");
    assert!(!found.indexed, "a reserved point is listed as indexed");
    let claim = OwnerToken::new_random();
    let claimed = claim_ours(repo, claim, &[r.id], CLAIM_NOW).await;
    let switches: Vec<IndexSwitch> = claimed.iter().map(to).collect();
    switch(repo, claim, switches.clone()).await;
    let after = scan_all(repo, found.seq, 10).await;
    let now = after.iter().find(|c| c.row.id == r.id).expect("moved on");
    assert!(now.indexed, "a switched-in row is listed unindexed");
    assert_eq!(now.row.point_id, switches[0].point_id);
}

/// `reindex_garbage_records_unreferenced`: with a migration open, the old
/// point of an update, of a delete and of a worker's switch are listed;
/// before it, none.
pub async fn reindex_garbage_records_unreferenced<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "reindex_garbage_records_unreferenced") {
        return;
    }
    let scope = fresh_scope("reindex-garbage");
    let (a, b, c) = (row(&scope, 1), row(&scope, 2), row(&scope, 3));
    committed(repo, &[a.clone(), b.clone(), c.clone()]).await;
    // Before any migration: nothing recorded.
    let early = rewrite(&c, &scope, 9);
    committed(repo, std::slice::from_ref(&early)).await;
    begin(repo, "next", OwnerToken::new_random()).await;
    assert_eq!(
        ok(repo.reindex_garbage(100).await, "reindex_garbage"),
        Vec::<PointId>::new(),
        "garbage of a commit before the migration was recorded"
    );
    committed(repo, &[rewrite(&a, &scope, 4)]).await;
    let intent = super::metadata::prepared(repo, IntentKind::Delete, Vec::new()).await;
    ok(
        repo.commit_delete(
            intent.id,
            intent.owner,
            &DeleteSelector::Ids(vec![b.id]),
            None,
        )
        .await,
        "commit_delete",
    );
    let mut expected = vec![a.point_id, b.point_id];
    if repo.deferred_indexing() {
        defer(repo, &[rewrite(&early, &scope, 5)], CLAIM_NOW).await;
        let claim = OwnerToken::new_random();
        let claimed = claim_ours(repo, claim, &[c.id], CLAIM_NOW).await;
        switch(repo, claim, claimed.iter().map(to).collect()).await;
        expected.push(early.point_id);
    }
    let mut got = ok(repo.reindex_garbage(100).await, "reindex_garbage");
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
    let first = ok(repo.reindex_garbage(1).await, "reindex_garbage limit 1");
    assert_eq!(first.len(), 1, "the limit");
}

/// `reindex_progress_persists`: cursor, count and lease are kept; the
/// reported garbage is forgotten.
pub async fn reindex_progress_persists<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "reindex_progress_persists") {
        return;
    }
    let scope = fresh_scope("reindex-progress");
    let (a, b) = (row(&scope, 1), row(&scope, 2));
    committed(repo, &[a.clone(), b.clone()]).await;
    let owner = OwnerToken::new_random();
    begin(repo, "next", owner).await;
    committed(repo, &[rewrite(&a, &scope, 3), rewrite(&b, &scope, 4)]).await;
    let s = ok(
        repo.reindex_progress(owner, 11, 3, &[a.point_id], &[], LEASE + 5)
            .await,
        "reindex_progress",
    );
    let m = s.migration.clone().expect("open");
    assert_eq!((m.cursor, m.copied, m.lease_until_ms), (11, 3, LEASE + 5));
    ok(
        repo.reindex_progress(owner, 12, 2, &[], &[], LEASE + 6)
            .await,
        "reindex_progress",
    );
    let m = state(repo).await.migration.expect("open");
    assert_eq!((m.cursor, m.copied), (12, 5), "copied adds up");
    assert_eq!(
        ok(repo.reindex_garbage(100).await, "reindex_garbage"),
        vec![b.point_id],
        "reported garbage is forgotten, the rest kept"
    );
}

/// `reindex_progress_fenced`: another owner, or no migration, conflicts.
pub async fn reindex_progress_fenced<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "reindex_progress_fenced") {
        return;
    }
    assert_conflict(
        repo.reindex_progress(OwnerToken::new_random(), 1, 1, &[], &[], LEASE)
            .await,
        "progress without a migration",
    );
    let owner = OwnerToken::new_random();
    let opened = begin(repo, "next", owner).await;
    assert_conflict(
        repo.reindex_progress(OwnerToken::new_random(), 9, 9, &[], &[], LEASE)
            .await,
        "progress of another owner",
    );
    assert_conflict(
        repo.reindex_freeze(OwnerToken::new_random(), NOW, LEASE)
            .await,
        "freeze of another owner",
    );
    assert_conflict(
        repo.reindex_switch(OwnerToken::new_random(), "old", NOW)
            .await,
        "switch of another owner",
    );
    assert_conflict(
        repo.reindex_abort(Some(OwnerToken::new_random())).await,
        "abort of another owner",
    );
    assert_eq!(state(repo).await, opened, "a fenced call changed the state");
}

/// `reindex_freeze_fences_prepared`: prepared intents are fenced; prepares
/// are refused until the freeze ends.
pub async fn reindex_freeze_fences_prepared<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "reindex_freeze_fences_prepared") {
        return;
    }
    let scope = fresh_scope("reindex-freeze");
    let owner = OwnerToken::new_random();
    begin(repo, "next", owner).await;
    let r = row(&scope, 1);
    let intent = intent_at(0, points_of(std::slice::from_ref(&r)));
    ok(repo.prepare(&intent).await, "prepare after the begin");
    let until = NOW + 10_000;
    let fenced = ok(
        repo.reindex_freeze(owner, NOW, until).await,
        "reindex_freeze",
    );
    assert!(fenced >= 1, "the prepared intent was not counted");
    let err = repo
        .commit_upsert(intent.id, intent.owner, std::slice::from_ref(&r), None)
        .await
        .expect_err("commit of an intent prepared before the freeze");
    assert_fenced(err, intent.id, "commit after the freeze");
    let during = NewIntent {
        created_ms: until - 1,
        ..intent_at(0, Vec::new())
    };
    match repo.prepare(&during).await {
        Err(MetadataError::IndexMoved {
            generation: 0,
            switching: true,
        }) => {}
        other => panic!("prepare during the freeze: expected IndexMoved, got {other:?}"),
    }
    assert_eq!(
        state(repo).await.migration.expect("open").frozen_until_ms,
        Some(until)
    );
    let after = NewIntent {
        created_ms: until,
        ..intent_at(0, Vec::new())
    };
    ok(repo.prepare(&after).await, "prepare once the freeze ended");
}

/// `reindex_switch_when_caught_up`: the target becomes active; the old
/// generation is refused; the retired name is forgotten on request.
pub async fn reindex_switch_when_caught_up<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "reindex_switch_when_caught_up") {
        return;
    }
    let scope = fresh_scope("reindex-switch");
    let (a, b) = (row(&scope, 1), row(&scope, 2));
    committed(repo, &[a.clone(), b.clone()]).await;
    let owner = OwnerToken::new_random();
    begin(repo, "next", owner).await;
    let rows = scan_all(repo, 0, 10).await;
    let cursor = rows.last().expect("rows").seq;
    ok(
        repo.reindex_progress(owner, cursor, rows.len() as u64, &[], &[], LEASE)
            .await,
        "reindex_progress",
    );
    let outcome = ok(
        repo.reindex_switch(owner, "old", NOW).await,
        "reindex_switch",
    );
    let expected = IndexState {
        generation: 1,
        active: Some("next".to_owned()),
        retired: Some("old".to_owned()),
        migration: None,
    };
    assert_eq!(outcome, SwitchOutcome::Switched(expected.clone()));
    assert_eq!(state(repo).await, expected);
    match repo.prepare(&intent_at(0, Vec::new())).await {
        Err(MetadataError::IndexMoved {
            generation: 1,
            switching: false,
        }) => {}
        other => panic!("prepare under the old generation: expected IndexMoved, got {other:?}"),
    }
    upsert_at(repo, 1, &[rewrite(&a, &scope, 3)]).await;
    assert_eq!(
        ok(repo.reindex_garbage(100).await, "reindex_garbage"),
        Vec::<PointId>::new(),
        "garbage recorded with no migration open"
    );
    assert!(!ok(repo.reindex_forget_retired("next").await, "forget"));
    assert!(ok(repo.reindex_forget_retired("old").await, "forget"));
    assert_eq!(state(repo).await.retired, None);
}

/// `reindex_switch_behind`: rows past the cursor or garbage left answer
/// `Behind`; a held intent answers `Held`; nothing switches.
pub async fn reindex_switch_behind<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "reindex_switch_behind") {
        return;
    }
    let scope = fresh_scope("reindex-behind");
    let a = row(&scope, 1);
    committed(repo, std::slice::from_ref(&a)).await;
    let owner = OwnerToken::new_random();
    begin(repo, "next", owner).await;
    // Nothing copied yet: one row behind.
    assert_eq!(
        ok(repo.reindex_switch(owner, "old", NOW).await, "switch"),
        SwitchOutcome::Behind {
            rows: 1,
            garbage: 0
        }
    );
    let cursor = scan_all(repo, 0, 10).await.last().expect("row").seq;
    ok(
        repo.reindex_progress(owner, cursor, 1, &[], &[], LEASE)
            .await,
        "progress",
    );
    // An update: its new point is behind, its old one is garbage.
    committed(repo, &[rewrite(&a, &scope, 2)]).await;
    assert_eq!(
        ok(repo.reindex_switch(owner, "old", NOW).await, "switch"),
        SwitchOutcome::Behind {
            rows: 1,
            garbage: 1
        }
    );
    let cursor = scan_all(repo, 0, 10).await.last().expect("row").seq;
    ok(
        repo.reindex_progress(owner, cursor, 1, &[a.point_id], &[], LEASE)
            .await,
        "progress",
    );
    // A held intent (a saga step's commit) blocks the switch.
    let held = super::metadata::prepared(repo, IntentKind::Transaction, Vec::new()).await;
    let parts = [crate::model::CommitPart::Upsert(vec![row(&scope, 3)])];
    let commit = crate::model::TransactionCommit {
        hold: true,
        ..crate::model::TransactionCommit::of(&parts)
    };
    ok(
        repo.commit_transaction(
            held.id,
            held.owner,
            &commit,
            None,
            &crate::ports::IndexGate::passed(),
        )
        .await,
        "held commit",
    );
    let cursor = scan_all(repo, 0, 10).await.last().expect("row").seq;
    ok(
        repo.reindex_progress(owner, cursor, 1, &[], &[], LEASE)
            .await,
        "progress",
    );
    assert_eq!(
        ok(repo.reindex_switch(owner, "old", NOW).await, "switch"),
        SwitchOutcome::Held { intents: 1 }
    );
    let s = state(repo).await;
    assert_eq!(
        (s.generation, s.active),
        (0, None),
        "a refused switch switched"
    );
    assert!(
        s.migration.is_some(),
        "a refused switch closed the migration"
    );
}

/// `reindex_abort_closes`: the migration is gone; prepares succeed; a new
/// begin starts over.
pub async fn reindex_abort_closes<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "reindex_abort_closes") {
        return;
    }
    let owner = OwnerToken::new_random();
    begin(repo, "next", owner).await;
    ok(
        repo.reindex_progress(owner, 5, 5, &[], &[], LEASE).await,
        "progress",
    );
    ok(
        repo.reindex_freeze(owner, NOW, NOW + 10_000).await,
        "freeze",
    );
    let closed = ok(repo.reindex_abort(None).await, "reindex_abort");
    assert_eq!(
        closed.map(|m| (m.spec.target, m.cursor)),
        Some(("next".to_owned(), 5))
    );
    assert_eq!(state(repo).await, IndexState::default());
    let during = NewIntent {
        created_ms: NOW + 1,
        ..intent_at(0, Vec::new())
    };
    ok(repo.prepare(&during).await, "prepare after the abort");
    assert_eq!(ok(repo.reindex_abort(None).await, "second abort"), None);
    let again = begin(repo, "other", OwnerToken::new_random()).await;
    assert_eq!(again.migration.expect("open").cursor, 0);
}

/// `prepare_fenced_by_generation`: a prepare under another generation is
/// refused and writes nothing.
pub async fn prepare_fenced_by_generation<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "prepare_fenced_by_generation") {
        return;
    }
    let intent = intent_at(3, vec![PointId::new_random()]);
    match repo.prepare(&intent).await {
        Err(MetadataError::IndexMoved {
            generation: 0,
            switching: false,
        }) => {}
        other => panic!("prepare under generation 3: expected IndexMoved, got {other:?}"),
    }
    let listed = ok(
        repo.list_intents(super::metadata::ALL).await,
        "list_intents",
    );
    assert!(
        listed.iter().all(|i| i.id != intent.id),
        "a refused prepare wrote its intent"
    );
}

/// Switches `owner`'s migration, which must be caught up (`why`).
async fn switched<M: MetadataRepo + ?Sized>(repo: &M, owner: OwnerToken, why: &str) {
    let outcome = ok(
        repo.reindex_switch(owner, "old", NOW).await,
        "reindex_switch",
    );
    assert!(
        matches!(outcome, SwitchOutcome::Switched(_)),
        "{why}: {outcome:?}"
    );
}

/// Stages `vector` for each of `rows` (at the change sequence the scan shows
/// for it) and moves the cursor past every row.
async fn stage_all<M: MetadataRepo + ?Sized>(
    repo: &M,
    owner: OwnerToken,
    staged: &[(RecordId, Vec<f32>)],
) {
    let rows = scan_all(repo, 0, 100).await;
    let cursor = rows.last().map_or(0, |r| r.seq);
    let vectors: Vec<StagedVector> = staged
        .iter()
        .map(|(id, vector)| StagedVector {
            record_id: *id,
            seq: rows
                .iter()
                .find(|r| r.row.id == *id)
                .expect("the staged row is in the scan")
                .seq,
            vector: vector.clone(),
        })
        .collect();
    ok(
        repo.reindex_progress(owner, cursor, rows.len() as u64, &[], &vectors, LEASE)
            .await,
        "reindex_progress with staged vectors",
    );
}

async fn kept_vector<M: MetadataRepo + ?Sized>(repo: &M, id: RecordId) -> Option<Vec<f32>> {
    get_one(repo, id).await.expect("the row").vector
}

/// `reindex_staged_vectors_apply_at_switch`: staged vectors wait for the
/// switch, then become the rows' kept vectors (the last staged wins), but
/// not for a row whose point changed since; a store that keeps no vectors
/// keeps none.
pub async fn reindex_staged_vectors_apply_at_switch<M: MetadataRepo + ?Sized>(
    repo: &M,
    keeps_vectors: bool,
) {
    if skipped(repo, "reindex_staged_vectors_apply_at_switch") {
        return;
    }
    let scope = fresh_scope("reindex-staged");
    let (a, b) = (row(&scope, 1), row(&scope, 2));
    committed(repo, &[a.clone(), b.clone()]).await;
    let owner = OwnerToken::new_random();
    begin(repo, "next", owner).await;
    let (new_a, newer_a, new_b) = (vec![9.0; 5], vec![7.0; 5], vec![8.0; 5]);
    stage_all(repo, owner, &[(a.id, new_a), (b.id, new_b.clone())]).await;
    stage_all(repo, owner, &[(a.id, newer_a.clone())]).await;
    let kept = |w: &RowWrite| keeps_vectors.then(|| w.vector.clone());
    assert_eq!(
        kept_vector(repo, a.id).await,
        kept(&a),
        "a staged vector is not kept before the switch"
    );
    // b moves on (a new point): its staged vector is for an older version.
    let b2 = rewrite(&b, &scope, 3);
    committed(repo, std::slice::from_ref(&b2)).await;
    let rows = scan_all(repo, 0, 100).await;
    let cursor = rows.last().expect("rows").seq;
    ok(
        repo.reindex_progress(owner, cursor, 1, &[b.point_id], &[], LEASE)
            .await,
        "reindex_progress",
    );
    switched(repo, owner, "caught up").await;
    assert_eq!(
        kept_vector(repo, a.id).await,
        keeps_vectors.then_some(newer_a),
        "the last vector staged for a row is kept after the switch"
    );
    assert_eq!(
        kept_vector(repo, b.id).await,
        kept(&b2),
        "a row changed after its vector was staged keeps its own"
    );
    assert_ne!(kept_vector(repo, b.id).await, Some(new_b));
}

/// `reindex_abort_forgets_staged_vectors`: vectors staged by an aborted
/// migration are not applied by the next one's switch.
pub async fn reindex_abort_forgets_staged_vectors<M: MetadataRepo + ?Sized>(
    repo: &M,
    keeps_vectors: bool,
) {
    if skipped(repo, "reindex_abort_forgets_staged_vectors") {
        return;
    }
    let scope = fresh_scope("reindex-staged-abort");
    let a = row(&scope, 1);
    committed(repo, std::slice::from_ref(&a)).await;
    let owner = OwnerToken::new_random();
    begin(repo, "next", owner).await;
    stage_all(repo, owner, &[(a.id, vec![5.0; 4])]).await;
    ok(repo.reindex_abort(Some(owner)).await, "reindex_abort");
    let again = OwnerToken::new_random();
    begin(repo, "other", again).await;
    stage_all(repo, again, &[]).await;
    switched(repo, again, "caught up").await;
    assert_eq!(
        kept_vector(repo, a.id).await,
        keeps_vectors.then(|| a.vector.clone()),
        "the aborted migration's staged vector was applied"
    );
}

/// `reindex_switch_waits_for_deferred_when_re_embedding`: deferred entries
/// (old-model vectors) block a re-embedding's switch, not a rebuild's.
pub async fn reindex_switch_waits_for_deferred_when_re_embedding<M: MetadataRepo + ?Sized>(
    repo: &M,
) {
    if skipped(repo, "reindex_switch_waits_for_deferred_when_re_embedding")
        || !repo.deferred_indexing()
    {
        println!("reindex_switch_waits_for_deferred_when_re_embedding: skipped");
        return;
    }
    let scope = fresh_scope("reindex-deferred");
    let a = row(&scope, 1);
    committed(repo, std::slice::from_ref(&a)).await;
    defer(repo, &[rewrite(&a, &scope, 2)], CLAIM_NOW).await;
    let re_embed = MigrationSpec {
        dimension: 4,
        source: ReindexSource::Embedder {
            model: "m2".to_owned(),
        },
        ..spec("next")
    };
    let owner = OwnerToken::new_random();
    ok(
        repo.reindex_begin(&re_embed, owner, NOW, LEASE).await,
        "reindex_begin",
    );
    stage_all(repo, owner, &[]).await;
    assert_eq!(
        ok(
            repo.reindex_switch(owner, "old", NOW).await,
            "reindex_switch"
        ),
        SwitchOutcome::Deferred { entries: 1 },
        "a re-embedding switched over a deferred entry of the old model"
    );
    assert!(state(repo).await.migration.is_some(), "nothing switched");
    ok(repo.reindex_abort(Some(owner)).await, "reindex_abort");
    let rebuild = OwnerToken::new_random();
    begin(repo, "rebuilt", rebuild).await;
    stage_all(repo, rebuild, &[]).await;
    switched(repo, rebuild, "a rebuild waits for nothing deferred").await;
}
