//! The [`MetadataRepo`] conformance cases of deferred indexing, one per
//! contract bullet: the `Defer` and `Index` parts of `commit_transaction`,
//! `release_at_ms`, and the pending-index methods. A store whose
//! [`deferred_indexing`](MetadataRepo::deferred_indexing) is `false` skips
//! them (each says so on stdout).

use std::collections::{BTreeSet, HashMap};

use futures::future::join_all;

use super::metadata::{
    ALL, committed, fresh_scope, get_one, intent_of, ok, prepared, rewrite, row,
};
use crate::model::{
    CommitPart, CommitSummary, DeleteSelector, IndexFailure, IndexSwitch, IntentKind, IntentState,
    OwnerToken, PendingFilter, PendingIndex, PointId, RecordId, RowWrite, TransactionCommit,
    TransactionCommitResult, UndoImage,
};
use crate::ports::{IndexGate, MetadataRepo};

/// Entries of these cases are enqueued at this time and after: far in the
/// past, so that they are the oldest of any store.
const T0: i64 = 1_000;
/// "Now" of the claims.
const NOW: i64 = 2_000_000_000_000;
/// A claim's end.
const UNTIL: i64 = NOW + 600_000;

fn skipped<M: MetadataRepo + ?Sized>(repo: &M, case: &str) -> bool {
    if repo.deferred_indexing() {
        return false;
    }
    println!("{case}: skipped, the store has no deferred indexing");
    true
}

async fn apply<M: MetadataRepo + ?Sized>(
    repo: &M,
    commit: &TransactionCommit<'_>,
    what: &str,
) -> (crate::model::NewIntent, TransactionCommitResult) {
    let intent = prepared(repo, IntentKind::Upsert, Vec::new()).await;
    let result = ok(
        repo.commit_transaction(intent.id, intent.owner, commit, None, &IndexGate::passed())
            .await,
        what,
    );
    (intent, result)
}

/// A deferred write of `rows`, enqueued at `now_ms`.
pub(super) async fn defer<M: MetadataRepo + ?Sized>(
    repo: &M,
    rows: &[RowWrite],
    now_ms: i64,
) -> TransactionCommitResult {
    let parts = [CommitPart::Defer {
        rows: rows.to_vec(),
        now_ms,
    }];
    apply(repo, &TransactionCommit::of(&parts), "deferred commit")
        .await
        .1
}

async fn entry<M: MetadataRepo + ?Sized>(repo: &M, id: RecordId) -> Option<PendingIndex> {
    let mut found = ok(repo.pending_for(&[id]).await, "pending_for");
    assert!(
        found.len() <= 1,
        "pending_for returned two entries of one record"
    );
    found.pop()
}

pub(super) async fn claim_ours<M: MetadataRepo + ?Sized>(
    repo: &M,
    claim: OwnerToken,
    ours: &[RecordId],
    now: i64,
) -> Vec<PendingIndex> {
    ok(
        repo.claim_pending(now, claim, now + 600_000, ALL).await,
        "claim_pending",
    )
    .into_iter()
    .filter(|e| ours.contains(&e.record_id))
    .collect()
}

/// An index switch of `entry` to a fresh point, committed with `claim`
/// at [`NOW`].
pub(super) async fn switch<M: MetadataRepo + ?Sized>(
    repo: &M,
    claim: OwnerToken,
    switches: Vec<IndexSwitch>,
) -> TransactionCommitResult {
    switch_at(repo, claim, switches, NOW).await
}

/// An index switch committed with `claim` at `now_ms`.
async fn switch_at<M: MetadataRepo + ?Sized>(
    repo: &M,
    claim: OwnerToken,
    switches: Vec<IndexSwitch>,
    now_ms: i64,
) -> TransactionCommitResult {
    let points = switches.iter().map(|s| s.point_id).collect();
    let intent = prepared(repo, IntentKind::Index, points).await;
    let parts = [CommitPart::Index {
        claim,
        switches,
        now_ms,
    }];
    ok(
        repo.commit_transaction(
            intent.id,
            intent.owner,
            &TransactionCommit::of(&parts),
            None,
            &IndexGate::passed(),
        )
        .await,
        "index switch",
    )
}

pub(super) fn to(e: &PendingIndex) -> IndexSwitch {
    IndexSwitch {
        record_id: e.record_id,
        version: e.version,
        point_id: PointId::new_random(),
    }
}

fn ids(rows: &[RowWrite]) -> Vec<RecordId> {
    rows.iter().map(|r| r.id).collect()
}

/// `deferred_commit_enqueues`: a `Defer` part inserts new rows (version 1, on
/// their reserved point) and updates existing ones (version + 1, keeping
/// their point), and enqueues one entry per record with its version, vector,
/// scope and metadata; `indexed_version` is the version the row's point
/// holds (0 for a new record); nothing is garbage.
pub async fn deferred_commit_enqueues<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "deferred_commit_enqueues") {
        return;
    }
    let scope = fresh_scope("defer-enqueue");
    let old = row(&scope, 1);
    committed(repo, std::slice::from_ref(&old)).await;
    let updated = rewrite(&old, &scope, 2);
    let new = row(&scope, 3);
    let result = defer(repo, &[updated.clone(), new.clone()], T0).await;
    assert_eq!(
        result.summary,
        CommitSummary {
            inserted: 1,
            updated: 1,
            deleted: 0
        }
    );
    assert!(result.garbage.is_empty(), "a deferred write made garbage");
    assert_eq!(
        result.versions.iter().copied().collect::<BTreeSet<_>>(),
        [(updated.id, 2), (new.id, 1)].into_iter().collect(),
        "the versions the rows got"
    );
    let u = get_one(repo, updated.id).await.expect("updated row");
    assert_eq!(
        (u.version, u.point_id),
        (2, old.point_id),
        "an update keeps its point"
    );
    assert_eq!(u.content, updated.content);
    let n = get_one(repo, new.id).await.expect("new row");
    assert_eq!(
        (n.version, n.point_id),
        (1, new.point_id),
        "a new row reserves its point"
    );
    for (written, version, indexed) in [(&updated, 2, 1), (&new, 1, 0)] {
        let e = entry(repo, written.id).await.expect("an entry per record");
        assert_eq!((e.version, e.indexed_version), (version, indexed));
        assert_eq!(e.vector, written.vector);
        assert_eq!((&e.scope, &e.metadata), (&written.scope, &written.metadata));
        assert_eq!(e.enqueued_ms, T0);
        assert!(!e.dead && e.attempts == 0 && e.claim_until_ms.is_none());
    }
    // The reserved point is the row's: no other row may take it.
    let referenced = ok(repo.referenced_points(&[new.point_id]).await, "referenced");
    assert!(referenced.contains(&new.point_id));
}

/// `deferred_commit_coalesces`: a second `Defer` of a record with a waiting
/// entry moves the entry to the new version and vector, keeps its
/// `enqueued_ms` and `indexed_version`, and clears its claim, attempts and
/// dead-letter flag.
pub async fn deferred_commit_coalesces<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "deferred_commit_coalesces") {
        return;
    }
    let scope = fresh_scope("defer-coalesce");
    let a = row(&scope, 1);
    defer(repo, std::slice::from_ref(&a), T0).await;
    let claim = OwnerToken::new_random();
    let claimed = claim_ours(repo, claim, &[a.id], NOW).await;
    assert_eq!(claimed.len(), 1);
    let failure = IndexFailure {
        message: "rejected".into(),
        permanent: true,
        counts: true,
        max_attempts: 5,
        retry_at_ms: NOW,
    };
    ok(
        repo.record_index_failure(claim, &[(a.id, 1)], &failure)
            .await,
        "record_index_failure",
    );
    assert!(entry(repo, a.id).await.expect("entry").dead);
    let a2 = rewrite(&a, &scope, 2);
    defer(repo, std::slice::from_ref(&a2), T0 + 50).await;
    let e = entry(repo, a.id).await.expect("one entry");
    assert_eq!((e.version, e.indexed_version, e.enqueued_ms), (2, 0, T0));
    assert_eq!(e.vector, a2.vector);
    assert!(!e.dead && e.attempts == 0 && e.claimed_by.is_none() && e.claim_until_ms.is_none());
    assert_eq!(
        ok(
            repo.list_pending(PendingFilter::All, None, ALL).await,
            "list"
        )
        .iter()
        .filter(|p| p.record_id == a.id)
        .count(),
        1,
        "coalesced entries must stay one"
    );
}

/// `deferred_sync_write_drops_pending`: a synchronous write of a record
/// (`commit_upsert`, `commit_delete`, an `Upsert` or `Delete` part) removes
/// its entry.
pub async fn deferred_sync_write_drops_pending<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "deferred_sync_write_drops_pending") {
        return;
    }
    let scope = fresh_scope("defer-sync");
    let rows: Vec<RowWrite> = (0..4).map(|n| row(&scope, n)).collect();
    defer(repo, &rows, T0).await;
    // commit_upsert
    committed(repo, &[rewrite(&rows[0], &scope, 10)]).await;
    // commit_delete
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
    // Upsert and Delete parts
    let parts = [
        CommitPart::Upsert(vec![rewrite(&rows[2], &scope, 12)]),
        CommitPart::Delete(DeleteSelector::Ids(vec![rows[3].id])),
    ];
    let intent = prepared(repo, IntentKind::Transaction, Vec::new()).await;
    ok(
        repo.commit_transaction(
            intent.id,
            intent.owner,
            &TransactionCommit::of(&parts),
            None,
            &IndexGate::passed(),
        )
        .await,
        "commit_transaction",
    );
    let left = ok(repo.pending_for(&ids(&rows)).await, "pending_for");
    assert!(left.is_empty(), "synchronous writes left entries: {left:?}");
}

/// `deferred_index_switches`: an `Index` part switches a current row to the
/// new point (its old point becomes garbage, its version is unchanged) and
/// removes its entry. A never-indexed record's reserved point (entry at
/// `indexed_version` 0) was never written: it is not garbage, and no row
/// references it any more.
pub async fn deferred_index_switches<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "deferred_index_switches") {
        return;
    }
    let scope = fresh_scope("defer-switch");
    let old = row(&scope, 1);
    committed(repo, std::slice::from_ref(&old)).await;
    let new = row(&scope, 2);
    defer(repo, &[rewrite(&old, &scope, 3), new.clone()], T0).await;
    let claim = OwnerToken::new_random();
    let claimed = claim_ours(repo, claim, &[old.id, new.id], NOW).await;
    assert_eq!(claimed.len(), 2);
    let switches: Vec<IndexSwitch> = claimed.iter().map(to).collect();
    let result = switch(repo, claim, switches.clone()).await;
    assert_eq!(
        result.garbage,
        vec![old.point_id],
        "the old point is garbage; the reserved one was never written"
    );
    let still = ok(
        repo.referenced_points(&[old.point_id, new.point_id]).await,
        "referenced_points",
    );
    assert!(
        still.is_empty(),
        "a switched-from point is still referenced: {still:?}"
    );
    for s in &switches {
        let r = get_one(repo, s.record_id).await.expect("row");
        assert_eq!((r.point_id, r.version), (s.point_id, s.version));
        assert!(entry(repo, s.record_id).await.is_none(), "the entry stayed");
    }
    let found = ok(
        repo.rows_by_points(&switches.iter().map(|s| s.point_id).collect::<Vec<_>>())
            .await,
        "rows_by_points",
    );
    assert_eq!(
        found.len(),
        2,
        "the guard finds both through their new points"
    );
}

/// `deferred_index_fenced_by_version`: a switch for a version the row or the
/// entry is no longer at, or under another claim token, leaves the row and
/// the entry alone and lists the new point as garbage.
pub async fn deferred_index_fenced_by_version<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "deferred_index_fenced_by_version") {
        return;
    }
    let scope = fresh_scope("defer-fence");
    let a = row(&scope, 1);
    let b = row(&scope, 2);
    let c = row(&scope, 3);
    defer(repo, &[a.clone(), b.clone(), c.clone()], T0).await;
    let claim = OwnerToken::new_random();
    let claimed: HashMap<RecordId, PendingIndex> =
        claim_ours(repo, claim, &ids(&[a.clone(), b.clone(), c.clone()]), NOW)
            .await
            .into_iter()
            .map(|e| (e.record_id, e))
            .collect();
    assert_eq!(claimed.len(), 3);
    // A is written again (deferred) after the claim; B is deleted; C's claim
    // passes to another worker after its lease.
    defer(repo, &[rewrite(&a, &scope, 10)], T0 + 1).await;
    let intent = prepared(repo, IntentKind::Delete, Vec::new()).await;
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
    let other = OwnerToken::new_random();
    let retaken = claim_ours(repo, other, &[c.id], UNTIL + 1).await;
    assert_eq!(retaken.len(), 1, "C's claim ended");
    let switches: Vec<IndexSwitch> = [a.id, b.id, c.id]
        .iter()
        .map(|id| to(&claimed[id]))
        .collect();
    let result = switch(repo, claim, switches.clone()).await;
    assert_eq!(
        result.garbage.iter().copied().collect::<BTreeSet<_>>(),
        switches.iter().map(|s| s.point_id).collect(),
        "every fenced switch's new point is garbage"
    );
    let a_now = get_one(repo, a.id).await.expect("A");
    assert_eq!(
        (a_now.version, a_now.point_id),
        (2, a.point_id),
        "A switched to an old version"
    );
    assert_eq!(entry(repo, a.id).await.expect("A's entry").version, 2);
    let c_now = get_one(repo, c.id).await.expect("C");
    assert_eq!(
        c_now.point_id, c.point_id,
        "C switched under a lapsed claim"
    );
    assert_eq!(
        entry(repo, c.id).await.expect("C's entry").claimed_by,
        Some(other)
    );
}

/// `deferred_release`: with `release_at_ms`, the committed intent's lease is
/// that time: `claim_expired` takes it from then on.
pub async fn deferred_release<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "deferred_release") {
        return;
    }
    let scope = fresh_scope("defer-release");
    let a = row(&scope, 1);
    let parts = [CommitPart::Defer {
        rows: vec![a.clone()],
        now_ms: T0,
    }];
    let released = TransactionCommit {
        release_at_ms: Some(T0 + 5),
        ..TransactionCommit::of(&parts)
    };
    let (intent, _) = apply(repo, &released, "released commit").await;
    let stored = intent_of(repo, intent.id).await;
    assert_eq!(stored.state, IntentState::Committed);
    assert_eq!(
        stored.lease_deadline_ms,
        T0 + 5,
        "the lease ends at the release"
    );
    let owner = OwnerToken::new_random();
    let claimed = ok(
        repo.claim_expired(T0 + 6, owner, T0 + 600_000, ALL).await,
        "claim_expired",
    );
    assert!(
        claimed.iter().any(|i| i.id == intent.id),
        "the released intent was not claimable after its release"
    );
}

/// A saga step overwrites `a` synchronously, held (its entry, waiting or
/// dead-lettered, is dropped by the write); returns the step's undo images.
async fn overwritten_by_a_held_step<M: MetadataRepo + ?Sized>(
    repo: &M,
    a: &RowWrite,
) -> Vec<UndoImage> {
    let parts = [CommitPart::Upsert(vec![rewrite(a, &a.scope, 2)])];
    let held = TransactionCommit {
        hold: true,
        ..TransactionCommit::of(&parts)
    };
    let intent = prepared(repo, IntentKind::Transaction, Vec::new()).await;
    ok(
        repo.commit_transaction(intent.id, intent.owner, &held, None, &IndexGate::passed())
            .await,
        "held commit",
    );
    assert!(
        entry(repo, a.id).await.is_none(),
        "the step's write drops the entry"
    );
    ok(repo.undo_images(intent.id).await, "undo_images")
}

/// `deferred_restore_requeues`: a held commit over a record with a waiting
/// entry keeps the entry in the record's undo image; a restore puts the row
/// back and the entry with it (at the restored version).
pub async fn deferred_restore_requeues<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "deferred_restore_requeues") {
        return;
    }
    let scope = fresh_scope("defer-restore");
    let a = row(&scope, 1);
    defer(repo, std::slice::from_ref(&a), T0).await;
    let images = overwritten_by_a_held_step(repo, &a).await;
    let image = images.iter().find(|i| i.id == a.id).expect("A's image");
    let before = image.before.as_ref().expect("A existed");
    let pending = before
        .pending
        .as_ref()
        .expect("the image keeps the waiting entry");
    assert_eq!((pending.version, pending.indexed_version), (1, 0));
    let parts = [CommitPart::Restore(images.clone())];
    apply(repo, &TransactionCommit::of(&parts), "restore").await;
    let restored = get_one(repo, a.id).await.expect("A restored");
    assert_eq!(restored.content, a.content);
    let e = entry(repo, a.id).await.expect("the restore requeues A");
    assert_eq!((e.version, e.indexed_version), (restored.version, 0));
    assert_eq!(e.vector, a.vector);
}

/// `deferred_restore_keeps_dead_letters`: a dead-lettered entry goes with
/// the record's undo image too, and the restore brings it back
/// dead-lettered, with its attempts and last error, at the restored version:
/// the restored row still references the point no worker wrote, and stays
/// listed as failed until an operator retries it.
pub async fn deferred_restore_keeps_dead_letters<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "deferred_restore_keeps_dead_letters") {
        return;
    }
    let (a, _, dead) = failed_once(repo, "defer-restore-dead", true, 1).await;
    assert_eq!(dead, 1, "setup: the failure dead-letters A");
    let images = overwritten_by_a_held_step(repo, &a).await;
    let image = images.iter().find(|i| i.id == a.id).expect("A's image");
    let kept = image
        .before
        .as_ref()
        .expect("A existed")
        .pending
        .as_ref()
        .expect("the image keeps the dead-lettered entry");
    assert!(kept.dead && kept.attempts == 1, "{kept:?}");
    let parts = [CommitPart::Restore(images.clone())];
    apply(repo, &TransactionCommit::of(&parts), "restore").await;
    let restored = get_one(repo, a.id).await.expect("A restored");
    assert_eq!(
        restored.point_id, a.point_id,
        "A is back on its reserved point"
    );
    let e = entry(repo, a.id)
        .await
        .expect("the restore puts A's entry back");
    assert_eq!(
        (e.version, e.indexed_version, e.dead, e.attempts),
        (restored.version, 0, true, 1)
    );
    assert_eq!(
        e.last_error.as_deref(),
        Some("failure of defer-restore-dead")
    );
    assert_eq!((e.claimed_by, e.claim_until_ms), (None, None));
    let listed = ok(
        repo.list_pending(PendingFilter::Dead, None, 10_000).await,
        "list_pending",
    );
    assert!(
        listed.iter().any(|l| l.record_id == a.id),
        "the restored entry is not listed as dead-lettered"
    );
}

/// `pending_claim_takes_current`: a deferred write's entries are returned
/// once, with the row's version, scope, metadata and vector; a second claim
/// before `claim_until_ms` returns none of them; after it, they come again.
pub async fn pending_claim_takes_current<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "pending_claim_takes_current") {
        return;
    }
    let scope = fresh_scope("pending-claim");
    let rows: Vec<RowWrite> = (0..3).map(|n| row(&scope, n)).collect();
    defer(repo, &rows, T0).await;
    let first = OwnerToken::new_random();
    let claimed = claim_ours(repo, first, &ids(&rows), NOW).await;
    assert_eq!(claimed.len(), 3);
    for e in &claimed {
        let w = rows.iter().find(|r| r.id == e.record_id).expect("ours");
        assert_eq!((e.version, &e.vector, &e.scope), (1, &w.vector, &w.scope));
        assert_eq!(e.claimed_by, Some(first));
        assert_eq!(e.claim_until_ms, Some(NOW + 600_000));
    }
    let again = claim_ours(repo, OwnerToken::new_random(), &ids(&rows), NOW + 1).await;
    assert!(
        again.is_empty(),
        "claimed twice within the claim: {again:?}"
    );
    let later = claim_ours(repo, OwnerToken::new_random(), &ids(&rows), NOW + 600_001).await;
    assert_eq!(later.len(), 3, "a claim that ended must be claimable again");
}

/// `pending_claim_is_exclusive`: concurrent claims never return the same
/// entry.
pub async fn pending_claim_is_exclusive<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "pending_claim_is_exclusive") {
        return;
    }
    let scope = fresh_scope("pending-exclusive");
    let rows: Vec<RowWrite> = (0..24).map(|n| row(&scope, n)).collect();
    defer(repo, &rows, T0).await;
    let ours = ids(&rows);
    let owners: Vec<OwnerToken> = (0..4).map(|_| OwnerToken::new_random()).collect();
    let mut seen: HashMap<RecordId, OwnerToken> = HashMap::new();
    for _ in 0..3 {
        let results = join_all(owners.iter().map(|o| repo.claim_pending(NOW, *o, UNTIL, 3))).await;
        for (owner, result) in owners.iter().zip(results) {
            for e in ok(result, "concurrent claim") {
                if !ours.contains(&e.record_id) {
                    continue;
                }
                assert_eq!(e.claimed_by, Some(*owner));
                if let Some(previous) = seen.insert(e.record_id, *owner) {
                    panic!("entry {} claimed by {previous} and {owner}", e.record_id);
                }
            }
        }
    }
}

/// `pending_claim_respects_limit`: at most `limit`, oldest enqueued first.
pub async fn pending_claim_respects_limit<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "pending_claim_respects_limit") {
        return;
    }
    let scope = fresh_scope("pending-limit");
    let rows: Vec<RowWrite> = (0..3).map(|n| row(&scope, n)).collect();
    for (n, r) in rows.iter().enumerate().rev() {
        defer(repo, std::slice::from_ref(r), n as i64).await;
    }
    let claimed = ok(
        repo.claim_pending(NOW, OwnerToken::new_random(), UNTIL, 2)
            .await,
        "claim_pending",
    );
    assert_eq!(
        claimed.iter().map(|e| e.record_id).collect::<Vec<_>>(),
        vec![rows[0].id, rows[1].id],
        "the two oldest, oldest first"
    );
}

/// `pending_claim_skips_dead`: dead-lettered entries are not claimed.
pub async fn pending_claim_skips_dead<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "pending_claim_skips_dead") {
        return;
    }
    let (a, _, dead) = failed_once(repo, "pending-dead", true, 1).await;
    assert_eq!(dead, 1);
    assert!(
        claim_ours(repo, OwnerToken::new_random(), &[a.id], UNTIL + 1)
            .await
            .is_empty()
    );
}

async fn failed_once<M: MetadataRepo + ?Sized>(
    repo: &M,
    tag: &str,
    counts: bool,
    max_attempts: u32,
) -> (RowWrite, OwnerToken, usize) {
    let scope = fresh_scope(tag);
    let a = row(&scope, 1);
    defer(repo, std::slice::from_ref(&a), T0).await;
    let claim = OwnerToken::new_random();
    assert_eq!(claim_ours(repo, claim, &[a.id], NOW).await.len(), 1);
    let dead = ok(
        repo.record_index_failure(
            claim,
            &[(a.id, 1)],
            &IndexFailure {
                message: format!("failure of {tag}"),
                permanent: false,
                counts,
                max_attempts,
                retry_at_ms: NOW + 1_000,
            },
        )
        .await,
        "record_index_failure",
    );
    (a, claim, dead)
}

/// `pending_failure_counts_attempts`: attempts and `last_error` are updated;
/// the entry is claimable again only from `retry_at_ms`.
pub async fn pending_failure_counts_attempts<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "pending_failure_counts_attempts") {
        return;
    }
    let (a, _, dead) = failed_once(repo, "pending-attempts", true, 5).await;
    assert_eq!(dead, 0);
    let e = entry(repo, a.id).await.expect("entry");
    assert_eq!(e.attempts, 1);
    assert_eq!(e.last_error.as_deref(), Some("failure of pending-attempts"));
    assert!(!e.dead);
    assert!(
        claim_ours(repo, OwnerToken::new_random(), &[a.id], NOW + 500)
            .await
            .is_empty()
    );
    assert_eq!(
        claim_ours(repo, OwnerToken::new_random(), &[a.id], NOW + 1_001)
            .await
            .len(),
        1
    );
}

/// `pending_failure_transient_does_not_count`: a failure that does not count
/// leaves attempts alone and never dead-letters.
pub async fn pending_failure_transient_does_not_count<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "pending_failure_transient_does_not_count") {
        return;
    }
    let (a, _, dead) = failed_once(repo, "pending-transient", false, 1).await;
    assert_eq!(dead, 0, "a transient failure dead-lettered");
    let e = entry(repo, a.id).await.expect("entry");
    assert_eq!((e.attempts, e.dead), (0, false));
    assert_eq!(
        e.last_error.as_deref(),
        Some("failure of pending-transient")
    );
}

/// `pending_failure_dead_letters`: a permanent failure, or the
/// `max_attempts`-th, dead-letters the entry.
pub async fn pending_failure_dead_letters<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "pending_failure_dead_letters") {
        return;
    }
    let (a, _, dead) = failed_once(repo, "pending-max", true, 1).await;
    assert_eq!(dead, 1, "the max_attempts-th failure must dead-letter");
    let e = entry(repo, a.id).await.expect("entry");
    assert!(e.dead && e.attempts == 1);
}

/// `pending_failure_fenced`: an entry claimed by another token, or at another
/// version, is left unchanged.
pub async fn pending_failure_fenced<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "pending_failure_fenced") {
        return;
    }
    let scope = fresh_scope("pending-fenced");
    let a = row(&scope, 1);
    defer(repo, std::slice::from_ref(&a), T0).await;
    let claim = OwnerToken::new_random();
    assert_eq!(claim_ours(repo, claim, &[a.id], NOW).await.len(), 1);
    let failure = IndexFailure {
        message: "not mine".into(),
        permanent: true,
        counts: true,
        max_attempts: 1,
        retry_at_ms: NOW,
    };
    let by_other = ok(
        repo.record_index_failure(OwnerToken::new_random(), &[(a.id, 1)], &failure)
            .await,
        "record_index_failure",
    );
    let other_version = ok(
        repo.record_index_failure(claim, &[(a.id, 7)], &failure)
            .await,
        "record_index_failure",
    );
    assert_eq!((by_other, other_version), (0, 0));
    let e = entry(repo, a.id).await.expect("entry");
    assert!(!e.dead && e.attempts == 0 && e.last_error.is_none());
}

/// `pending_list_filters`: `Waiting` lists entries not dead-lettered, `Dead`
/// only dead-lettered ones, `All` both; pages in record id order.
pub async fn pending_list_filters<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "pending_list_filters") {
        return;
    }
    let (dead_row, _, _) = failed_once(repo, "pending-list-dead", true, 1).await;
    let scope = fresh_scope("pending-list");
    let rows: Vec<RowWrite> = (0..5).map(|n| row(&scope, n)).collect();
    defer(repo, &rows, T0).await;
    let mut ours: Vec<RecordId> = ids(&rows);
    ours.sort();
    let listed = |filter| async move {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let page = ok(repo.list_pending(filter, after, 2).await, "list_pending");
            let Some(last) = page.last() else { break };
            after = Some(last.record_id);
            assert!(page.len() <= 2, "a page longer than its limit");
            out.extend(page);
        }
        out
    };
    let all = listed(PendingFilter::All).await;
    let all_ids: Vec<RecordId> = all.iter().map(|e| e.record_id).collect();
    let mut sorted = all_ids.clone();
    sorted.sort();
    assert_eq!(all_ids, sorted, "pages must come in record id order");
    assert!(ours.iter().all(|id| all_ids.contains(id)) && all_ids.contains(&dead_row.id));
    let waiting = listed(PendingFilter::Waiting).await;
    assert!(waiting.iter().all(|e| !e.dead));
    assert!(
        ours.iter()
            .all(|id| waiting.iter().any(|e| e.record_id == *id))
    );
    let dead = listed(PendingFilter::Dead).await;
    assert!(dead.iter().all(|e| e.dead));
    assert!(dead.iter().any(|e| e.record_id == dead_row.id));
}

/// `pending_retry_dead`: the entries are claimable again; entries not
/// dead-lettered are untouched.
pub async fn pending_retry_dead<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "pending_retry_dead") {
        return;
    }
    let (a, _, _) = failed_once(repo, "pending-retry", true, 1).await;
    let (b, _, _) = failed_once(repo, "pending-retry-waiting", true, 5).await;
    let before_b = entry(repo, b.id).await.expect("B");
    let n = ok(repo.retry_dead(Some(&[a.id, b.id])).await, "retry_dead");
    assert_eq!(n, 1, "only A was dead-lettered");
    let e = entry(repo, a.id).await.expect("A");
    assert!(!e.dead && e.attempts == 0);
    assert_eq!(
        claim_ours(repo, OwnerToken::new_random(), &[a.id], NOW)
            .await
            .len(),
        1
    );
    assert_eq!(entry(repo, b.id).await.expect("B"), before_b, "B changed");
}

/// `pending_drop_dead`: the entries are gone; rows are unchanged; entries
/// not dead-lettered are untouched.
pub async fn pending_drop_dead<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "pending_drop_dead") {
        return;
    }
    let (a, _, _) = failed_once(repo, "pending-drop", true, 1).await;
    let (b, _, _) = failed_once(repo, "pending-drop-waiting", true, 5).await;
    let row_before = get_one(repo, a.id).await.expect("A's row");
    let n = ok(repo.drop_dead(Some(&[a.id, b.id])).await, "drop_dead");
    assert_eq!(n, 1);
    assert!(entry(repo, a.id).await.is_none(), "A's entry stayed");
    assert_eq!(get_one(repo, a.id).await.expect("A's row"), row_before);
    assert!(
        entry(repo, b.id).await.is_some(),
        "B's waiting entry was dropped"
    );
}

/// `pending_stats_counts`: counts waiting, claimed (at `now_ms`) and dead
/// entries, and the oldest waiting entry's enqueue time.
pub async fn pending_stats_counts<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "pending_stats_counts") {
        return;
    }
    let before = ok(repo.pending_stats(NOW).await, "pending_stats");
    let (_, _, _) = failed_once(repo, "pending-stats-dead", true, 1).await;
    let scope = fresh_scope("pending-stats");
    let rows: Vec<RowWrite> = (0..3).map(|n| row(&scope, n)).collect();
    defer(repo, &rows, 7).await;
    // The claim takes every claimable entry (claim_ours keeps ours).
    let claimed = claim_ours(repo, OwnerToken::new_random(), &ids(&rows), NOW).await;
    assert_eq!(claimed.len(), 3);
    let after = ok(repo.pending_stats(NOW).await, "pending_stats");
    assert_eq!(after.dead, before.dead + 1);
    assert_eq!(after.pending, before.pending + 3);
    assert!(
        after.claimed >= before.claimed + 3,
        "claim_ours claims every claimable entry: {after:?}"
    );
    assert!(after.oldest_enqueued_ms.is_some_and(|t| t <= 7));
}

/// `pending_stats_rate`: `indexed_last_minute` counts the records index
/// switches committed in the 60 whole seconds ending with `now_ms`'s second
/// — switched records only, not a fenced switch's — and nothing older.
pub async fn pending_stats_rate<M: MetadataRepo + ?Sized>(repo: &M) {
    if skipped(repo, "pending_stats_rate") {
        return;
    }
    // Seconds no other case switches at (they switch at NOW), far ahead of
    // them. Counts are compared with the same queries before the switches,
    // so that a store shared with earlier runs passes too.
    const AT: i64 = 3_000_000_000_000;
    let count =
        |now| async move { ok(repo.pending_stats(now).await, "pending_stats").indexed_last_minute };
    // (now, records of this case in the window at now, why)
    let expected = [
        (AT + 1_500, 3, "both switches, without the fenced record"),
        (AT + 59_999, 3, "both still in the window"),
        (AT + 60_000, 1, "the first switch's second left the window"),
        (AT + 61_000, 0, "both left the window"),
        (AT - 1, 0, "a switch after now is not counted"),
    ];
    let mut before = Vec::new();
    for (now, _, _) in expected {
        before.push(count(now).await);
    }
    let scope = fresh_scope("pending-rate");
    let rows: Vec<RowWrite> = (0..4).map(|n| row(&scope, n)).collect();
    defer(repo, &rows, T0).await;
    let claim = OwnerToken::new_random();
    let claimed = claim_ours(repo, claim, &ids(&rows), NOW).await;
    assert_eq!(claimed.len(), 4);
    // The last record is written again after the claim: its switch is
    // fenced and does not count.
    defer(repo, &[rewrite(&rows[3], &scope, 40)], T0 + 1).await;
    // The fenced record's switch last: in the second commit.
    let mut switches: Vec<IndexSwitch> = claimed.iter().map(to).collect();
    switches.sort_by_key(|s| s.record_id == rows[3].id);
    let (first, second) = switches.split_at(2);
    switch_at(repo, claim, first.to_vec(), AT).await;
    let result = switch_at(repo, claim, second.to_vec(), AT + 1_500).await;
    assert_eq!(result.garbage.len(), 1, "the superseded switch is garbage");
    for ((now, want, why), base) in expected.into_iter().zip(before) {
        let after = count(now).await;
        assert_eq!(after.checked_sub(base), Some(want), "at {now}: {why}");
    }
}
