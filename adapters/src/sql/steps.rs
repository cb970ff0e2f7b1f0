//! The protocol steps that are the same on every SQL backend, written once over
//! [`TxOps`]: the few statements a backend must provide inside its transaction.
//!
//! Each step runs inside one transaction that the backend opens before and
//! commits (or rolls back) after; any error returned here makes the backend
//! roll back, so "fails and writes nothing" holds by construction.

use std::collections::{BTreeMap, HashSet};

use async_trait::async_trait;
use tandem_core::{
    CommitPart, CommitStep, CommitSummary, DeleteCommit, DeleteSelector, IdempotencyRecord, Intent,
    IntentId, IntentState, MetadataError, OwnerToken, PointId, RecordId, RowWrite, SagaId,
    SagaState, Settlement, StoredRecord, StoredRecordImage, TransactionCommit,
    TransactionCommitResult, UndoImage, UpsertCommit,
};

use super::codec::validate_batch;

/// The statements a backend runs inside a protocol step's transaction.
///
/// Locking methods lock what they read until the end of the transaction (row
/// locks on PostgreSQL, in ascending id order so that concurrent batches
/// cannot deadlock each other; SQLite's writer lock covers the database).
#[async_trait]
pub(crate) trait TxOps: Send {
    /// Reads an intent and locks it, waiting for any transaction holding it.
    async fn lock_intent(&mut self, id: IntentId) -> Result<Option<Intent>, MetadataError>;

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
    /// `point_ids`, with the summary.
    async fn mark_committed(
        &mut self,
        id: IntentId,
        point_ids: &[PointId],
        summary: CommitSummary,
        state: IntentState,
    ) -> Result<(), MetadataError>;

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
    /// already recorded (nothing is written then).
    async fn record_idempotency(
        &mut self,
        record: &IdempotencyRecord,
        summary: CommitSummary,
    ) -> Result<bool, MetadataError>;

    /// Gives the intent to another owner.
    async fn transfer_intent(&mut self, id: IntentId, to: OwnerToken) -> Result<(), MetadataError>;
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
    tx.mark_committed(intent, &old_point_ids, summary, IntentState::Committed)
        .await?;
    record_key(tx, idempotency, summary).await?;
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
    }
    let point_ids: Vec<PointId> = selected.into_iter().map(|(_, p)| p).collect();
    let summary = CommitSummary {
        deleted: point_ids.len() as u64,
        ..CommitSummary::default()
    };
    tx.mark_committed(intent, &point_ids, summary, IntentState::Committed)
        .await?;
    record_key(tx, idempotency, summary).await?;
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
    let current = owned_intent(tx, intent, owner).await?;
    if current.state != IntentState::Prepared {
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
            CommitPart::Defer { .. } | CommitPart::Index { .. } => {
                return Err(MetadataError::permanent(
                    "this metadata store does not support deferred indexing yet".to_owned(),
                ));
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
    tx.mark_committed(intent, &garbage, applied.summary, state)
        .await?;
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
                before: before.as_ref().map(StoredRecordImage::of),
                after_version: after.get(id).copied(),
            })
            .collect();
        tx.save_undo(intent, &images).await?;
    }
    record_key(tx, idempotency, applied.summary).await?;
    Ok(TransactionCommitResult {
        summary: applied.summary,
        garbage,
        conflicts: applied.conflicts,
        versions: Vec::new(),
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
    conflicts: Vec<RecordId>,
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
        for id in fresh {
            self.before.insert(id, found.remove(&id));
        }
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
        for image in images {
            let now = current.get(&image.id);
            if now.map(|r| r.version) != image.after_version {
                // Changed since the step: a later write stands.
                self.conflicts.push(image.id);
                continue;
            }
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
        Ok(())
    }
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
