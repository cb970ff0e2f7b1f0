//! The protocol steps that are the same on every SQL backend, written once over
//! [`TxOps`]: the few statements a backend must provide inside its transaction.
//!
//! Each step runs inside one transaction that the backend opens before and
//! commits (or rolls back) after; any error returned here makes the backend
//! roll back, so "fails and writes nothing" holds by construction.

use std::collections::{BTreeMap, HashSet};

use async_trait::async_trait;
use tandem_core::{
    CommitPart, CommitStep, CommitSummary, DeleteCommit, DeleteSelector, IdempotencyRecord,
    IndexSwitch, Intent, IntentId, IntentState, MetadataError, NewIntent, OwnerToken, PendingIndex,
    PendingStats, PointId, RecordId, RowWrite, SagaId, SagaState, Settlement, StoredRecord,
    StoredRecordImage, TransactionCommit, TransactionCommitResult, UndoImage, UpsertCommit,
};

use super::codec::{invalid, validate_batch};

/// What an index switch checks of a record's pending entry
/// ([`TxOps::lock_pending_states`]): the entry without its content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PendingState {
    pub(crate) record_id: RecordId,
    /// The version the entry waits to index.
    pub(crate) version: u64,
    /// The version the row's point holds (0: never indexed).
    pub(crate) indexed_version: u64,
    pub(crate) dead: bool,
    pub(crate) claimed_by: Option<OwnerToken>,
}

impl PendingState {
    pub(crate) fn of(e: &PendingIndex) -> Self {
        Self {
            record_id: e.record_id,
            version: e.version,
            indexed_version: e.indexed_version,
            dead: e.dead,
            claimed_by: e.claimed_by,
        }
    }
}

/// Shards of the indexing activity table: concurrent switches (a worker's
/// lanes, several workers) add to different rows of the same second, so
/// they rarely wait on each other's row lock.
pub(crate) const ACTIVITY_SHARDS: u128 = 16;

/// Seconds of indexing activity a shard keeps: two rate windows.
pub(crate) const ACTIVITY_KEEP_S: i64 = 2 * PendingStats::RATE_WINDOW_S;

/// The activity shard a switch adds to, from its claim token (random).
pub(crate) fn activity_shard(claim: OwnerToken) -> i32 {
    (claim.0.as_u128() % ACTIVITY_SHARDS) as i32
}

/// The statements a backend runs inside a protocol step's transaction.
///
/// Locking methods lock what they read until the end of the transaction (row
/// locks on PostgreSQL, in ascending id order so that concurrent batches
/// cannot deadlock each other; SQLite's writer lock covers the database).
#[async_trait]
pub(crate) trait TxOps: Send {
    /// A hint before the transaction's first statement: the write will ask
    /// which of `ids` (ascending) exist, locking them. A backend that
    /// pipelines may send that lock with the first statement, saving a
    /// round trip; the answer is then the same as asked later (the rows
    /// stay locked; a key inserted concurrently in between fails the
    /// insert, as it does between any lock and insert).
    fn lock_ahead(&mut self, ids: &[RecordId]) {
        let _ = ids;
    }

    /// Reads an intent and locks it, waiting for any transaction holding it.
    async fn lock_intent(&mut self, id: IntentId) -> Result<Option<Intent>, MetadataError>;

    /// Inserts `intent` as prepared unless an intent of its id exists
    /// (waiting for any transaction inserting one); `true` if inserted, and
    /// then locked by this transaction.
    async fn create_intent(&mut self, intent: &NewIntent) -> Result<bool, MetadataError>;

    /// The current point of each existing record among `ids` (ascending,
    /// deduplicated), locked, in id order.
    async fn lock_records(
        &mut self,
        ids: &[RecordId],
    ) -> Result<Vec<(RecordId, PointId)>, MetadataError>;

    /// In one pass over `rows` (ascending id order): inserts, at version 1,
    /// those whose id does not exist, and locks the rows of those that do
    /// (waiting for a concurrent insert of the same id to finish); returns
    /// the ids it inserted.
    async fn insert_or_lock(&mut self, rows: &[&RowWrite]) -> Result<Vec<RecordId>, MetadataError>;

    /// A deferred write's [`insert_or_lock`](Self::insert_or_lock): also
    /// enqueues, for each record it inserted, that record's first entry
    /// ([`deferred_entry`] at version 1: never indexed, enqueued at `now_ms`),
    /// as [`enqueue_pending`](Self::enqueue_pending) would. Returns the ids
    /// it inserted. A backend may send the inserts later in the same
    /// transaction — PostgreSQL pipelines them with the transaction's next
    /// statement, or with its `COMMIT` for a batch of new records only — and
    /// their failure then fails that statement or the commit.
    async fn insert_deferred(
        &mut self,
        rows: &[&RowWrite],
        now_ms: i64,
    ) -> Result<Vec<RecordId>, MetadataError> {
        let inserted = self.insert_or_lock(rows).await?;
        if !inserted.is_empty() {
            let new: HashSet<RecordId> = inserted.iter().copied().collect();
            let entries: Vec<PendingIndex> = rows
                .iter()
                .filter(|r| new.contains(&r.id))
                .map(|r| deferred_entry(r, 1, now_ms))
                .collect();
            self.enqueue_pending(&entries).await?;
        }
        Ok(inserted)
    }

    /// Switches existing `rows` to their new point, content, metadata and
    /// scope, bumping the version; returns how many rows changed.
    async fn update_records(&mut self, rows: &[&RowWrite]) -> Result<u64, MetadataError>;

    /// The rows a delete selects, locked, in id order, with their points.
    async fn lock_selected(
        &mut self,
        selector: &DeleteSelector,
    ) -> Result<Vec<(RecordId, PointId)>, MetadataError>;

    /// Deletes these rows; returns how many were deleted.
    async fn delete_records(&mut self, ids: &[RecordId]) -> Result<u64, MetadataError>;

    /// Marks the intent `state` (`Committed` or `Held`), listing
    /// `point_ids`, with the summary; with `release_at_ms`, its lease ends
    /// then (the intent is handed over to recovery).
    async fn mark_committed(
        &mut self,
        id: IntentId,
        point_ids: &[PointId],
        summary: CommitSummary,
        state: IntentState,
        release_at_ms: Option<i64>,
    ) -> Result<(), MetadataError>;

    /// The version and point of each existing record among `ids`
    /// (ascending, deduplicated), locked, in id order.
    async fn lock_versions(
        &mut self,
        ids: &[RecordId],
    ) -> Result<Vec<(RecordId, PointId, u64)>, MetadataError>;

    /// A deferred write's update of existing `rows` (ascending id order):
    /// new content, metadata, scope and vector, version + 1, the point
    /// unchanged. Returns each updated record's new version. A backend that
    /// keeps each record's pending entry on its row (PostgreSQL) enqueues
    /// it here, by the rule of [`enqueue_pending`](Self::enqueue_pending),
    /// with `now_ms` as the enqueue time.
    async fn defer_update(
        &mut self,
        rows: &[&RowWrite],
        now_ms: i64,
    ) -> Result<Vec<(RecordId, u64)>, MetadataError>;

    /// Points existing rows at new points (their versions unchanged).
    async fn switch_points(
        &mut self,
        switches: &[(RecordId, PointId)],
    ) -> Result<(), MetadataError>;

    /// The pending entries of `ids` (ascending, deduplicated), locked, in id
    /// order. Callers lock the records first: every path that touches both
    /// takes records, then entries, so none can deadlock another.
    async fn lock_pending(&mut self, ids: &[RecordId]) -> Result<Vec<PendingIndex>, MetadataError>;

    /// What an index switch locks, records first, then entries (each in id
    /// order): [`lock_versions`](Self::lock_versions) and
    /// [`lock_pending_states`](Self::lock_pending_states) of `ids`. A
    /// backend that pipelines may send both at once (the second does not
    /// depend on the first's answer).
    async fn lock_for_switch(
        &mut self,
        ids: &[RecordId],
    ) -> Result<(Vec<(RecordId, PointId, u64)>, Vec<PendingState>), MetadataError> {
        let versions = self.lock_versions(ids).await?;
        let states = self.lock_pending_states(ids).await?;
        Ok((versions, states))
    }

    /// [`lock_pending`](Self::lock_pending) without the entries' content:
    /// what an index switch checks of each entry, locked in the same order.
    /// A backend whose entries borrow their content from the records' rows
    /// (PostgreSQL's light entries) reads only the entries here.
    async fn lock_pending_states(
        &mut self,
        ids: &[RecordId],
    ) -> Result<Vec<PendingState>, MetadataError> {
        Ok(self
            .lock_pending(ids)
            .await?
            .iter()
            .map(PendingState::of)
            .collect())
    }

    /// Removes the pending entries of `ids`.
    async fn delete_pending(&mut self, ids: &[RecordId]) -> Result<(), MetadataError>;

    /// A synchronous write's end: removes the pending entries of the rows
    /// it just inserted or updated (`ids`). A backend whose
    /// [`update_records`](Self::update_records) clears the entry kept on
    /// the row, and whose entries' other state counts only at its row's
    /// version, has nothing left to do.
    async fn supersede_pending(&mut self, ids: &[RecordId]) -> Result<(), MetadataError> {
        self.delete_pending(ids).await
    }

    /// An index switch's end: removes the pending entries of the switched
    /// `ids` and adds their count to the indexing activity of `now_ms`'s
    /// second in `shard` ([`activity_shard`]), dropping that shard's
    /// seconds older than [`ACTIVITY_KEEP_S`].
    async fn finish_index(
        &mut self,
        ids: &[RecordId],
        shard: i32,
        now_ms: i64,
    ) -> Result<(), MetadataError>;

    /// Enqueues a deferred write's entries (ascending id order), each with
    /// `indexed_version` = the row's previous version and `enqueued_ms` =
    /// now. An existing entry at that previous version (still waiting for
    /// the write it coalesces with) keeps its `enqueued_ms` and
    /// `indexed_version`; everything else is overwritten, the claim, the
    /// attempts and the dead-letter flag cleared. The entry stores no copy
    /// of what its row holds: scope and metadata stay NULL, and so does the
    /// vector when the store keeps vectors (reads take them from the row).
    /// A backend that keeps the entry on the row has enqueued it in
    /// [`defer_update`](Self::defer_update) already.
    async fn enqueue_pending(&mut self, entries: &[PendingIndex]) -> Result<(), MetadataError>;

    /// Inserts or overwrites these entries exactly as given.
    async fn put_pending(&mut self, entries: &[PendingIndex]) -> Result<(), MetadataError>;

    /// Up to `limit` claimable entries (not dead-lettered, no claim or
    /// back-off left at `now_ms`), oldest enqueued first, locked (on
    /// PostgreSQL skipping those another transaction holds), each with the
    /// current version of its row (`None`: the row is gone).
    async fn claim_candidates(
        &mut self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<(PendingIndex, Option<u64>)>, MetadataError>;

    /// Marks these entries (locked by [`claim_candidates`](Self::claim_candidates))
    /// claimed by `claim` until `claim_until_ms`, except those that another
    /// claim still holds at `now_ms`; returns the ids it marked. (A backend
    /// whose candidates' locks are on the records' rows, not on the claims,
    /// can meet a claim that committed after its candidates were read.)
    async fn mark_claimed(
        &mut self,
        ids: &[RecordId],
        claim: OwnerToken,
        claim_until_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<RecordId>, MetadataError>;

    /// The full rows of the existing records among `ids` (with their vectors
    /// where kept), locked, in id order.
    async fn lock_rows_full(
        &mut self,
        ids: &[RecordId],
    ) -> Result<Vec<StoredRecord>, MetadataError>;

    /// Inserts or overwrites these rows exactly as given (version included;
    /// the vector only where vectors are kept).
    async fn write_rows_exact(&mut self, rows: &[StoredRecord]) -> Result<(), MetadataError>;

    /// Keeps the undo images of a held intent.
    async fn save_undo(&mut self, id: IntentId, images: &[UndoImage]) -> Result<(), MetadataError>;

    /// A saga's owner and state, locked (`None`: no such saga).
    async fn lock_saga(
        &mut self,
        id: SagaId,
    ) -> Result<Option<(OwnerToken, SagaState)>, MetadataError>;

    /// Runs the caller's step on this transaction's connection. A transient
    /// database error comes back as such (the commit is retried); any other
    /// failure as [`MetadataError::StepFailed`].
    async fn run_step(&mut self, step: &dyn CommitStep) -> Result<(), MetadataError>;

    /// Records the key with this commit's summary; `false` if the key was
    /// already recorded (nothing is written then). A backend that sends the
    /// insert later in the transaction (PostgreSQL: with `COMMIT`) answers
    /// `true` and fails the commit with
    /// [`MetadataError::IdempotencyKeyTaken`] instead.
    async fn record_idempotency(
        &mut self,
        record: &IdempotencyRecord,
        summary: CommitSummary,
    ) -> Result<bool, MetadataError>;

    /// Gives the intent to another owner.
    async fn transfer_intent(&mut self, id: IntentId, to: OwnerToken) -> Result<(), MetadataError>;
}

/// The entry a deferred write enqueues for `row` at `version`: waiting
/// since `now_ms`, its row's point holding the previous version (0: a new
/// record, never indexed), with the row's content.
pub(crate) fn deferred_entry(row: &RowWrite, version: u64, now_ms: i64) -> PendingIndex {
    PendingIndex {
        record_id: row.id,
        version,
        indexed_version: version - 1,
        scope: row.scope.clone(),
        metadata: row.metadata.clone(),
        vector: row.vector.clone(),
        enqueued_ms: now_ms,
        attempts: 0,
        last_error: None,
        dead: false,
        claimed_by: None,
        claim_until_ms: None,
    }
}

/// The intent, locked, if `owner` owns it; otherwise the commit is fenced.
async fn owned_intent<T: TxOps + ?Sized>(
    tx: &mut T,
    intent: IntentId,
    owner: OwnerToken,
) -> Result<Intent, MetadataError> {
    match tx.lock_intent(intent).await? {
        Some(current) if current.owner == owner => Ok(current),
        _ => Err(MetadataError::Fenced { intent }),
    }
}

/// `ids` ascending (the order every write locks records in).
fn sorted_ids(ids: impl Iterator<Item = RecordId>) -> Vec<RecordId> {
    let mut ids: Vec<RecordId> = ids.collect();
    ids.sort_unstable();
    ids
}

async fn record_key<T: TxOps + ?Sized>(
    tx: &mut T,
    idempotency: Option<&IdempotencyRecord>,
    summary: CommitSummary,
) -> Result<(), MetadataError> {
    if let Some(record) = idempotency
        && !tx.record_idempotency(record, summary).await?
    {
        // The caller rolls back, so nothing of this commit is written.
        return Err(MetadataError::IdempotencyKeyTaken {
            key: record.key.clone(),
        });
    }
    Ok(())
}

/// [`MetadataRepo::commit_upsert`](tandem_core::MetadataRepo::commit_upsert)
/// inside the caller's transaction.
pub(crate) async fn commit_upsert<T: TxOps + ?Sized>(
    tx: &mut T,
    intent: IntentId,
    owner: OwnerToken,
    rows: &[RowWrite],
    idempotency: Option<&IdempotencyRecord>,
) -> Result<UpsertCommit, MetadataError> {
    validate_batch(rows)?;
    tx.lock_ahead(&sorted_ids(rows.iter().map(|r| r.id)));
    // Lock the intent first: recovery's claim skips it while we hold it, and a
    // settle waits for our outcome.
    let current = owned_intent(tx, intent, owner).await?;
    if current.state != IntentState::Prepared {
        // The commit already applied: answer what it decided, change nothing.
        return Ok(UpsertCommit {
            summary: current.summary.unwrap_or_default(),
            old_point_ids: current.point_ids,
        });
    }

    let (inserted, old_point_ids) = write_rows(tx, rows).await?;
    let summary = CommitSummary {
        inserted,
        updated: old_point_ids.len() as u64,
        deleted: 0,
    };
    record_key(tx, idempotency, summary).await?;
    // Last: a backend may send it with `COMMIT`.
    tx.mark_committed(
        intent,
        &old_point_ids,
        summary,
        IntentState::Committed,
        None,
    )
    .await?;
    Ok(UpsertCommit {
        summary,
        old_point_ids,
    })
}

/// Inserts the new records of `rows` and updates the existing ones. One pass
/// in id order inserts the new records and locks the existing ones, so
/// concurrent batches take every record's lock (existing row or new key) in
/// the same order and cannot deadlock each other. Returns how many were
/// inserted and the points the updated rows referenced, in input order (like
/// every other backend).
async fn write_rows<T: TxOps + ?Sized>(
    tx: &mut T,
    rows: &[RowWrite],
) -> Result<(u64, Vec<PointId>), MetadataError> {
    let mut sorted: Vec<&RowWrite> = rows.iter().collect();
    sorted.sort_unstable_by_key(|r| r.id);
    let inserted: HashSet<RecordId> = tx.insert_or_lock(&sorted).await?.into_iter().collect();
    let existing_ids: Vec<RecordId> = sorted
        .iter()
        .map(|r| r.id)
        .filter(|id| !inserted.contains(id))
        .collect();
    let existing: BTreeMap<RecordId, PointId> = if existing_ids.is_empty() {
        BTreeMap::new()
    } else {
        tx.lock_records(&existing_ids).await?.into_iter().collect()
    };
    if existing.len() != existing_ids.len() {
        // Cannot happen while we hold the locks; refuse rather than guess.
        return Err(MetadataError::transient(
            "records changed concurrently during the commit; nothing was written",
        ));
    }

    let updates: Vec<&RowWrite> = rows
        .iter()
        .filter(|r| existing.contains_key(&r.id))
        .collect();
    if !updates.is_empty() {
        tx.update_records(&updates).await?;
    }
    let old_point_ids: Vec<PointId> = updates.iter().map(|r| existing[&r.id]).collect();
    // A synchronous write supersedes a deferred one still waiting (after the
    // rows' locks: records first, then entries, on every path).
    let ids: Vec<RecordId> = sorted.iter().map(|r| r.id).collect();
    if !ids.is_empty() {
        tx.supersede_pending(&ids).await?;
    }
    Ok((inserted.len() as u64, old_point_ids))
}

/// [`MetadataRepo::commit_delete`](tandem_core::MetadataRepo::commit_delete)
/// inside the caller's transaction.
pub(crate) async fn commit_delete<T: TxOps + ?Sized>(
    tx: &mut T,
    intent: IntentId,
    owner: OwnerToken,
    selector: &DeleteSelector,
    idempotency: Option<&IdempotencyRecord>,
) -> Result<DeleteCommit, MetadataError> {
    let current = owned_intent(tx, intent, owner).await?;
    if current.state != IntentState::Prepared {
        return Ok(DeleteCommit {
            summary: current.summary.unwrap_or_default(),
            point_ids: current.point_ids,
        });
    }
    let selected = tx.lock_selected(selector).await?;
    let ids: Vec<RecordId> = selected.iter().map(|(id, _)| *id).collect();
    if !ids.is_empty() {
        tx.delete_records(&ids).await?;
        tx.delete_pending(&ids).await?;
    }
    let point_ids: Vec<PointId> = selected.into_iter().map(|(_, p)| p).collect();
    let summary = CommitSummary {
        deleted: point_ids.len() as u64,
        ..CommitSummary::default()
    };
    record_key(tx, idempotency, summary).await?;
    // Last: a backend may send it with `COMMIT`.
    tx.mark_committed(intent, &point_ids, summary, IntentState::Committed, None)
        .await?;
    Ok(DeleteCommit { summary, point_ids })
}

/// [`MetadataRepo::commit_transaction`](tandem_core::MetadataRepo::commit_transaction)
/// inside the caller's transaction: the parts in order, the caller's step,
/// the intent marked (`Held` with undo images when holding), the key.
pub(crate) async fn commit_transaction<T: TxOps + ?Sized>(
    tx: &mut T,
    intent: IntentId,
    owner: OwnerToken,
    commit: &TransactionCommit<'_>,
    idempotency: Option<&IdempotencyRecord>,
) -> Result<TransactionCommitResult, MetadataError> {
    for part in commit.parts {
        if let CommitPart::Upsert(rows) = part {
            validate_batch(rows)?;
        }
    }
    match commit.parts.first() {
        Some(CommitPart::Upsert(rows)) | Some(CommitPart::Defer { rows, .. }) => {
            tx.lock_ahead(&sorted_ids(rows.iter().map(|r| r.id)));
        }
        _ => {}
    }
    // A commit that creates its intent owns it if it inserted it; otherwise
    // the intent is checked like a prepared one (a retry finds it committed;
    // a settlement's fence makes this commit fail).
    let created = match commit.create_intent {
        Some(new) if new.id == intent && new.owner == owner => tx.create_intent(new).await?,
        _ => false,
    };
    let current = if created {
        None
    } else {
        Some(owned_intent(tx, intent, owner).await?)
    };
    if let Some(current) = current.filter(|c| c.state != IntentState::Prepared) {
        return Ok(TransactionCommitResult {
            summary: current.summary.unwrap_or_default(),
            garbage: current.point_ids,
            conflicts: Vec::new(),
            versions: Vec::new(),
        });
    }
    if let Some(fence) = commit.saga {
        match tx.lock_saga(fence.saga).await? {
            Some((owner, state)) if owner == fence.owner && state.is_live() => {}
            _ => return Err(MetadataError::SagaFenced { saga: fence.saga }),
        }
    }
    let mut applied = Applied::default();
    for part in commit.parts {
        match part {
            CommitPart::Upsert(rows) => applied.upsert(tx, rows, commit.hold).await?,
            CommitPart::Delete(selector) => applied.delete(tx, selector, commit.hold).await?,
            CommitPart::Restore(images) => applied.restore(tx, images, commit.hold).await?,
            CommitPart::Defer { rows, now_ms } => {
                applied.defer(tx, rows, *now_ms, commit.hold).await?
            }
            CommitPart::Index {
                claim,
                switches,
                now_ms,
            } => {
                applied
                    .index(tx, *claim, switches, *now_ms, commit.hold)
                    .await?
            }
        }
    }
    if let Some(step) = &commit.step {
        tx.run_step(step.as_ref()).await?;
    }
    let mut seen = HashSet::new();
    let garbage: Vec<PointId> = applied
        .garbage
        .iter()
        .copied()
        .filter(|p| seen.insert(*p))
        .collect();
    let state = if commit.hold {
        IntentState::Held
    } else {
        IntentState::Committed
    };
    if commit.hold && !applied.before.is_empty() {
        let ids: Vec<RecordId> = applied.before.keys().copied().collect();
        let after: BTreeMap<RecordId, u64> = tx
            .lock_rows_full(&ids)
            .await?
            .into_iter()
            .map(|r| (r.id, r.version))
            .collect();
        let images: Vec<UndoImage> = applied
            .before
            .iter()
            .map(|(id, before)| UndoImage {
                id: *id,
                before: before.as_ref().map(|row| StoredRecordImage {
                    // The row's entry, waiting or dead-lettered, goes with
                    // its image: without it, a restored never-indexed row
                    // would reference a point that no worker writes.
                    pending: applied
                        .before_pending
                        .get(id)
                        .filter(|p| p.version == row.version)
                        .cloned(),
                    ..StoredRecordImage::of(row)
                }),
                after_version: after.get(id).copied(),
            })
            .collect();
        tx.save_undo(intent, &images).await?;
    }
    record_key(tx, idempotency, applied.summary).await?;
    // Last: a backend may send it with `COMMIT`.
    tx.mark_committed(
        intent,
        &garbage,
        applied.summary,
        state,
        commit.release_at_ms,
    )
    .await?;
    Ok(TransactionCommitResult {
        summary: applied.summary,
        garbage,
        conflicts: applied.conflicts,
        versions: applied.versions,
    })
}

/// What a multi-part commit has done so far.
#[derive(Default)]
struct Applied {
    summary: CommitSummary,
    /// Points that stopped being referenced, in the order they did.
    garbage: Vec<PointId>,
    /// Each touched record's row before the commit (held commits only).
    before: BTreeMap<RecordId, Option<StoredRecord>>,
    /// The pending entries of those records before the commit.
    before_pending: BTreeMap<RecordId, PendingIndex>,
    conflicts: Vec<RecordId>,
    /// The version each deferred row got, in the parts' order.
    versions: Vec<(RecordId, u64)>,
}

impl Applied {
    /// Remembers the rows of `ids` as they are now, for those touched for
    /// the first time (held commits only).
    async fn save_before<T: TxOps + ?Sized>(
        &mut self,
        tx: &mut T,
        ids: &[RecordId],
        hold: bool,
    ) -> Result<(), MetadataError> {
        if !hold {
            return Ok(());
        }
        let fresh: Vec<RecordId> = ids
            .iter()
            .copied()
            .filter(|id| !self.before.contains_key(id))
            .collect();
        if fresh.is_empty() {
            return Ok(());
        }
        let mut found: BTreeMap<RecordId, StoredRecord> = tx
            .lock_rows_full(&fresh)
            .await?
            .into_iter()
            .map(|r| (r.id, r))
            .collect();
        for entry in tx.lock_pending(&fresh).await? {
            self.before_pending.insert(entry.record_id, entry);
        }
        for id in fresh {
            self.before.insert(id, found.remove(&id));
        }
        Ok(())
    }

    /// [`CommitPart::Defer`]: inserts new rows (version 1, on their reserved
    /// point) and updates existing ones (version + 1, keeping their point),
    /// and enqueues or coalesces one pending entry per record.
    async fn defer<T: TxOps + ?Sized>(
        &mut self,
        tx: &mut T,
        rows: &[RowWrite],
        now_ms: i64,
        hold: bool,
    ) -> Result<(), MetadataError> {
        // Only new rows' points matter (they are reserved); an existing row
        // keeps its point, so the point a row of it names is not checked.
        let mut seen = HashSet::with_capacity(rows.len());
        for (index, row) in rows.iter().enumerate() {
            if !seen.insert(row.id) {
                return Err(invalid(format!(
                    "row #{index}: record {} appears more than once in the batch",
                    row.id
                )));
            }
        }
        let mut sorted: Vec<&RowWrite> = rows.iter().collect();
        sorted.sort_unstable_by_key(|r| r.id);
        let ids: Vec<RecordId> = sorted.iter().map(|r| r.id).collect();
        self.save_before(tx, &ids, hold).await?;
        // In id order, like every write: new keys inserted (with their first
        // entries), existing rows locked; then the existing rows updated and
        // their entries enqueued or coalesced.
        let inserted: HashSet<RecordId> = tx
            .insert_deferred(&sorted, now_ms)
            .await?
            .into_iter()
            .collect();
        let existing: Vec<&RowWrite> = sorted
            .iter()
            .copied()
            .filter(|r| !inserted.contains(&r.id))
            .collect();
        let mut versions: BTreeMap<RecordId, u64> = inserted.iter().map(|id| (*id, 1)).collect();
        if !existing.is_empty() {
            let updated: BTreeMap<RecordId, u64> = tx
                .defer_update(&existing, now_ms)
                .await?
                .into_iter()
                .collect();
            if updated.len() != existing.len() {
                // Cannot happen while we hold the locks; refuse rather than guess.
                return Err(MetadataError::transient(
                    "records changed concurrently during the commit; nothing was written",
                ));
            }
            let entries: Vec<PendingIndex> = existing
                .iter()
                .map(|row| deferred_entry(row, updated[&row.id], now_ms))
                .collect();
            tx.enqueue_pending(&entries).await?;
            versions.extend(updated);
        }
        self.summary.inserted += inserted.len() as u64;
        self.summary.updated += existing.len() as u64;
        self.versions
            .extend(rows.iter().map(|r| (r.id, versions[&r.id])));
        Ok(())
    }

    /// [`CommitPart::Index`]: switches each row still at the switch's
    /// version, whose entry is at that version, waiting and claimed by
    /// `claim`, to the new point (the old one becomes garbage) and removes
    /// the entry; every other switch's new point is garbage.
    async fn index<T: TxOps + ?Sized>(
        &mut self,
        tx: &mut T,
        claim: OwnerToken,
        switches: &[IndexSwitch],
        now_ms: i64,
        hold: bool,
    ) -> Result<(), MetadataError> {
        let mut points = HashSet::with_capacity(switches.len());
        for (index, s) in switches.iter().enumerate() {
            if !points.insert(s.point_id) {
                return Err(invalid(format!(
                    "switch #{index}: point {} is not fresh",
                    s.point_id
                )));
            }
        }
        let mut ids: Vec<RecordId> = switches.iter().map(|s| s.record_id).collect();
        ids.sort_unstable();
        ids.dedup();
        let (versions, states) = tx.lock_for_switch(&ids).await?;
        let rows: BTreeMap<RecordId, (PointId, u64)> = versions
            .into_iter()
            .map(|(id, point, version)| (id, (point, version)))
            .collect();
        let entries: BTreeMap<RecordId, PendingState> =
            states.into_iter().map(|e| (e.record_id, e)).collect();
        let mut switched: BTreeMap<RecordId, PointId> = BTreeMap::new();
        for s in switches {
            let entry = entries
                .get(&s.record_id)
                .filter(|e| e.version == s.version && !e.dead && e.claimed_by == Some(claim));
            match rows.get(&s.record_id) {
                // A record switched once already lost its entry with it.
                Some(&(old, version))
                    if version == s.version
                        && entry.is_some()
                        && !switched.contains_key(&s.record_id) =>
                {
                    // Never indexed: the old point is the reserved one,
                    // never written, so there is nothing to delete.
                    if entry.is_some_and(|e| e.indexed_version > 0) {
                        self.garbage.push(old);
                    }
                    switched.insert(s.record_id, s.point_id);
                }
                // Superseded, deleted, or taken over: the new point is garbage.
                _ => self.garbage.push(s.point_id),
            }
        }
        if switched.is_empty() {
            return Ok(());
        }
        let ids: Vec<RecordId> = switched.keys().copied().collect();
        self.save_before(tx, &ids, hold).await?;
        let pairs: Vec<(RecordId, PointId)> = switched.into_iter().collect();
        tx.switch_points(&pairs).await?;
        tx.finish_index(&ids, activity_shard(claim), now_ms).await?;
        Ok(())
    }

    async fn upsert<T: TxOps + ?Sized>(
        &mut self,
        tx: &mut T,
        rows: &[RowWrite],
        hold: bool,
    ) -> Result<(), MetadataError> {
        let mut ids: Vec<RecordId> = rows.iter().map(|r| r.id).collect();
        ids.sort_unstable();
        self.save_before(tx, &ids, hold).await?;
        let (inserted, old_point_ids) = write_rows(tx, rows).await?;
        self.summary.inserted += inserted;
        self.summary.updated += old_point_ids.len() as u64;
        self.garbage.extend(old_point_ids);
        Ok(())
    }

    async fn delete<T: TxOps + ?Sized>(
        &mut self,
        tx: &mut T,
        selector: &DeleteSelector,
        hold: bool,
    ) -> Result<(), MetadataError> {
        let selected = tx.lock_selected(selector).await?;
        let ids: Vec<RecordId> = selected.iter().map(|(id, _)| *id).collect();
        if ids.is_empty() {
            return Ok(());
        }
        self.save_before(tx, &ids, hold).await?;
        tx.delete_records(&ids).await?;
        tx.delete_pending(&ids).await?;
        self.garbage.extend(selected.iter().map(|(_, p)| *p));
        self.summary.deleted += ids.len() as u64;
        Ok(())
    }

    async fn restore<T: TxOps + ?Sized>(
        &mut self,
        tx: &mut T,
        images: &[UndoImage],
        hold: bool,
    ) -> Result<(), MetadataError> {
        let mut images: Vec<&UndoImage> = images.iter().collect();
        images.sort_by_key(|i| i.id);
        let ids: Vec<RecordId> = images.iter().map(|i| i.id).collect();
        self.save_before(tx, &ids, hold).await?;
        let current: BTreeMap<RecordId, StoredRecord> = tx
            .lock_rows_full(&ids)
            .await?
            .into_iter()
            .map(|r| (r.id, r))
            .collect();
        let mut deletes = Vec::new();
        let mut writes = Vec::new();
        // Every restored record's entry goes; a waiting one in its image
        // comes back at the restored version.
        let mut unqueued = Vec::new();
        let mut requeued = Vec::new();
        for image in images {
            let now = current.get(&image.id);
            if now.map(|r| r.version) != image.after_version {
                // Changed since the step: a later write stands.
                self.conflicts.push(image.id);
                continue;
            }
            unqueued.push(image.id);
            match (&image.before, now) {
                (None, None) => {}
                (None, Some(now)) => {
                    deletes.push(image.id);
                    self.garbage.push(now.point_id);
                    self.summary.deleted += 1;
                }
                (Some(before), now) => {
                    let mut row = before.to_record(image.id);
                    match now {
                        Some(now) => {
                            row.version = now.version + 1;
                            if now.point_id != before.point_id {
                                self.garbage.push(now.point_id);
                            }
                            self.summary.updated += 1;
                        }
                        None => {
                            row.version = before.version + 1;
                            self.summary.inserted += 1;
                        }
                    }
                    if let Some(entry) = &before.pending {
                        // The row had an entry: it gets it back as it was (waiting, or
                        // dead-lettered with its attempts), at the new version.
                        requeued.push(PendingIndex {
                            version: row.version,
                            claimed_by: None,
                            claim_until_ms: None,
                            ..entry.clone()
                        });
                    }
                    writes.push(row);
                }
            }
        }
        if !deletes.is_empty() {
            tx.delete_records(&deletes).await?;
        }
        if !writes.is_empty() {
            tx.write_rows_exact(&writes).await?;
        }
        if !unqueued.is_empty() {
            tx.delete_pending(&unqueued).await?;
        }
        if !requeued.is_empty() {
            tx.put_pending(&requeued).await?;
        }
        Ok(())
    }
}

/// [`MetadataRepo::claim_pending`](tandem_core::MetadataRepo::claim_pending)
/// inside the caller's transaction: the oldest claimable entries, locked;
/// those a later write made stale (the row gone or past the entry's version)
/// are removed and more are taken in their place; an entry whose row is
/// behind it (a commit landing during the claim) is left for the next claim;
/// the rest are marked claimed.
pub(crate) async fn claim_pending<T: TxOps + ?Sized>(
    tx: &mut T,
    now_ms: i64,
    claim: OwnerToken,
    claim_until_ms: i64,
    limit: usize,
) -> Result<Vec<PendingIndex>, MetadataError> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let current = loop {
        let candidates = tx.claim_candidates(now_ms, limit).await?;
        // An entry is stale when its record is gone or a later write passed
        // it; it is current when its row is at its version. A row *behind*
        // its entry is a write that committed while the claim's statement
        // ran: PostgreSQL re-reads a locked entry at its newest version but
        // keeps the joined row from the statement's snapshot. That entry is
        // neither claimed nor deleted: the next claim sees both at once.
        let stale: Vec<RecordId> = candidates
            .iter()
            .filter(|(e, row)| row.is_none_or(|v| v > e.version))
            .map(|(e, _)| e.record_id)
            .collect();
        if stale.is_empty() {
            break candidates
                .into_iter()
                .filter(|(e, row)| *row == Some(e.version))
                .collect::<Vec<_>>();
        }
        // Each round removes at least one entry, so this ends; the entries
        // kept stay locked by this transaction and come back next round.
        tx.delete_pending(&stale).await?;
    };
    let mut claimed: Vec<PendingIndex> = current.into_iter().map(|(e, _)| e).collect();
    if claimed.is_empty() {
        return Ok(claimed);
    }
    let ids: Vec<RecordId> = claimed.iter().map(|e| e.record_id).collect();
    let marked: HashSet<RecordId> = tx
        .mark_claimed(&ids, claim, claim_until_ms, now_ms)
        .await?
        .into_iter()
        .collect();
    claimed.retain(|e| marked.contains(&e.record_id));
    for entry in &mut claimed {
        entry.claimed_by = Some(claim);
        entry.claim_until_ms = Some(claim_until_ms);
    }
    claimed.sort_by_key(|e| (e.enqueued_ms, e.record_id));
    Ok(claimed)
}

/// [`MetadataRepo::settle_unprepared`](tandem_core::MetadataRepo::settle_unprepared)
/// inside the caller's transaction: the intent's unique key makes the insert
/// wait for a commit still inserting it; if none has, the fence it inserts
/// makes any later one fail.
pub(crate) async fn settle_unprepared<T: TxOps + ?Sized>(
    tx: &mut T,
    intent: &NewIntent,
    owner: OwnerToken,
    fence: OwnerToken,
) -> Result<Settlement, MetadataError> {
    tx.create_intent(&NewIntent {
        owner: fence,
        ..intent.clone()
    })
    .await?;
    settle(tx, intent.id, owner, fence).await
}

/// [`MetadataRepo::settle`](tandem_core::MetadataRepo::settle) inside the
/// caller's transaction.
pub(crate) async fn settle<T: TxOps + ?Sized>(
    tx: &mut T,
    intent: IntentId,
    owner: OwnerToken,
    fence: OwnerToken,
) -> Result<Settlement, MetadataError> {
    // The lock waits for a commit still landing, so its outcome is visible.
    let Some(mut current) = tx.lock_intent(intent).await? else {
        return Ok(Settlement::Missing);
    };
    Ok(match current.state {
        IntentState::Committed | IntentState::Held => Settlement::Committed(current),
        IntentState::Prepared => {
            if current.owner == owner {
                tx.transfer_intent(intent, fence).await?;
                current.owner = fence;
            }
            Settlement::NotCommitted(current)
        }
    })
}
