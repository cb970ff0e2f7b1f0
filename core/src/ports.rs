//! The two ports every backend implements.
//!
//! Ports are small primitive operations; the protocol that composes them lives
//! only in the [`Coordinator`](crate::Coordinator). Adapters translate, they do not
//! decide: no retry loops, no compensation.
//!
//! Each method's doc ends with its **Contract**; every bullet has a case in the
//! conformance suite (`tandem_core::testkit::conformance`, feature `testkit`),
//! named after it.

use std::collections::{BTreeMap, HashSet};

use async_trait::async_trait;

use crate::error::{IndexError, MetadataError};
use crate::model::{
    DeleteCommit, DeleteSelector, Distance, Filter, IdempotencyRecord, IndexFailure, Intent,
    IntentId, NewIntent, OwnerToken, Page, PendingFilter, PendingIndex, PendingStats, Point,
    PointId, PointInfo, RecordId, RowWrite, SagaId, Scope, ScoredPoint, Settlement, StoredRecord,
    TransactionCommit, TransactionCommitResult, UndoImage, UpsertCommit,
};
use crate::reindex::{
    ChangedRow, IndexState, Migration, MigrationSpec, StagedVector, SwitchOutcome,
};
use crate::saga::{SagaCounts, SagaRecord, SagaState};
use crate::transaction::ConnectionType;

/// Whether the index write that a gated commit must follow succeeded
/// ([`MetadataRepo::commit_upsert_gated`]).
///
/// Cheap to clone; every clone sees the same decision. Made with
/// [`IndexGate::pending`] (decided later through its [`GateOpener`]), or
/// already decided with [`IndexGate::passed`] / [`IndexGate::failed`].
#[derive(Clone, Debug)]
pub struct IndexGate {
    rx: tokio::sync::watch::Receiver<Option<bool>>,
}

/// Decides an [`IndexGate`]. Dropping it undecided fails the gate.
#[derive(Debug)]
pub struct GateOpener {
    tx: tokio::sync::watch::Sender<Option<bool>>,
}

impl IndexGate {
    /// An undecided gate and the opener that decides it.
    pub fn pending() -> (GateOpener, IndexGate) {
        let (tx, rx) = tokio::sync::watch::channel(None);
        (GateOpener { tx }, IndexGate { rx })
    }

    /// A gate whose index write already succeeded.
    pub fn passed() -> Self {
        let (opener, gate) = Self::pending();
        opener.decide(true);
        gate
    }

    /// A gate whose index write already failed.
    pub fn failed() -> Self {
        let (opener, gate) = Self::pending();
        opener.decide(false);
        gate
    }

    /// Whether the decision is made already (the index write ended, or the
    /// gate was made decided): a store may then leave work it would have
    /// done while waiting to go out with its `COMMIT`.
    pub fn is_decided(&self) -> bool {
        self.rx.borrow().is_some()
    }

    /// Waits for the decision: `true` once the index write succeeded, `false`
    /// if it failed (or its opener was dropped undecided).
    pub async fn wait(&self) -> bool {
        let mut rx = self.rx.clone();
        let decided = match rx.wait_for(Option::is_some).await {
            Ok(decided) => *decided,
            // The opener is gone without deciding (its drop decides `false`).
            Err(_) => None,
        };
        decided.unwrap_or(false)
    }
}

impl GateOpener {
    /// Decides the gate: `true` if the index write succeeded.
    pub fn decide(self, index_written: bool) {
        // No receiver left is fine: nobody waits any more.
        let _ = self.tx.send(Some(index_written));
    }
}

impl Drop for GateOpener {
    fn drop(&mut self) {
        // Undecided at drop (the writer's future was dropped): fail the gate.
        self.tx.send_if_modified(|v| {
            if v.is_none() {
                *v = Some(false);
                true
            } else {
                false
            }
        });
    }
}

/// A committed row's reference to its point, as listed by
/// [`MetadataRepo::scan_refs`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RowRef {
    /// The record id.
    pub id: RecordId,
    /// Its scope.
    pub scope: Scope,
    /// The point it references.
    pub point_id: PointId,
    /// Its version.
    pub version: u64,
}

/// The relational side: the source of truth. Each method is one transaction.
///
/// Times are passed in by the caller (milliseconds since the Unix epoch) so that
/// leases follow the coordinator's clock, which tests control.
#[async_trait]
pub trait MetadataRepo: Send + Sync {
    /// Prepare: durably records a new intent in state `Prepared`, before any of
    /// its points is written to the index.
    ///
    /// Contract:
    /// - `prepare_then_read`: afterwards the intent is listed by
    ///   [`list_intents`](Self::list_intents) with the given owner, lease,
    ///   kind and point ids, state `Prepared`, attempts 0.
    /// - `prepare_is_idempotent`: preparing the same intent again succeeds and
    ///   changes nothing.
    /// - `prepare_fenced_by_generation`: on a store with
    ///   [`reindexing`](Self::reindexing), an intent whose generation is
    ///   not the store's, or created while a switch is in progress, fails
    ///   with [`MetadataError::IndexMoved`] and writes nothing.
    async fn prepare(&self, intent: &NewIntent) -> Result<(), MetadataError>;

    /// Commit of an upsert: in one transaction, fenced by `owner`, writes `rows`
    /// (insert or switch to the new point id, bumping the version), swaps the
    /// intent's point list for the points the switched rows referenced before,
    /// marks it `Committed` with the summary, and records the idempotency key.
    ///
    /// Contract:
    /// - `commit_upsert_inserts_and_updates`: new ids are inserted with
    ///   version 1; existing ids get the new point, content, metadata and scope,
    ///   and version + 1; the summary counts both; `old_point_ids` are exactly the
    ///   previous points of the updated rows.
    /// - `commit_upsert_swaps_intent`: afterwards the intent is `Committed` and
    ///   lists exactly `old_point_ids`.
    /// - `commit_upsert_fenced_by_owner`: with a token that does not own the
    ///   intent (or a missing intent) it fails with [`MetadataError::Fenced`] and
    ///   writes nothing.
    /// - `commit_upsert_is_idempotent`: repeating a commit that already applied
    ///   (same intent and owner) returns the recorded result and changes nothing.
    /// - `commit_upsert_records_idempotency_key`: the key is readable through
    ///   [`lookup_idempotency`](Self::lookup_idempotency) afterwards, with its
    ///   hash and outcome as given and the summary of this commit; a key
    ///   already recorded fails with [`MetadataError::IdempotencyKeyTaken`] and
    ///   writes nothing.
    /// - `commit_upsert_keeps_vectors_when_configured`: a store that keeps
    ///   vectors returns them in [`get`](Self::get).
    async fn commit_upsert(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        rows: &[RowWrite],
        idempotency: Option<&IdempotencyRecord>,
    ) -> Result<UpsertCommit, MetadataError>;

    /// [`commit_upsert`](Self::commit_upsert), started while the index write it
    /// must follow is still in flight: the commit becomes durable and visible
    /// only after `gate` says that write succeeded.
    ///
    /// The coordinator calls this instead of `commit_upsert` when
    /// [`overlap_index_write`](crate::CoordinatorConfig::overlap_index_write)
    /// is on. A store whose transactions can stay open overrides it to run the
    /// commit's statements (locks, inserts, updates, the intent's mark) while
    /// the index write is in flight and to send `COMMIT` only once the gate
    /// passed — so the write costs the longer of the two, not their sum. The
    /// default waits for the gate, then calls `commit_upsert`: correct for
    /// every store, without the overlap. Wrappers must forward it.
    ///
    /// Contract:
    /// - `commit_upsert_gated_passed`: once the gate passed, the result and the
    ///   effects are exactly those of `commit_upsert`.
    /// - `commit_upsert_gated_failed`: if the gate fails, it returns
    ///   [`MetadataError::Aborted`] and writes nothing (the intent stays
    ///   `Prepared`, owned by `owner`).
    /// - `commit_upsert_gated_waits`: until the gate is decided, nothing of the
    ///   commit is visible to other calls (rows, intent state), and the call
    ///   does not return.
    async fn commit_upsert_gated(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        rows: &[RowWrite],
        idempotency: Option<&IdempotencyRecord>,
        gate: &IndexGate,
    ) -> Result<UpsertCommit, MetadataError> {
        if !gate.wait().await {
            return Err(MetadataError::Aborted { intent });
        }
        self.commit_upsert(intent, owner, rows, idempotency).await
    }

    /// Commit of a delete: in one transaction, fenced by `owner`, deletes the
    /// selected rows, sets the intent's point list to their points, marks it
    /// `Committed` with the summary, and records the idempotency key.
    ///
    /// Contract:
    /// - `commit_delete_by_ids`, `commit_delete_by_scope`,
    ///   `commit_delete_by_metadata`: exactly the selected rows are deleted
    ///   (missing ids are ignored); `point_ids` are their points.
    /// - `commit_delete_fenced_by_owner`: as for upserts.
    /// - `commit_delete_is_idempotent`: as for upserts.
    async fn commit_delete(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        selector: &DeleteSelector,
        idempotency: Option<&IdempotencyRecord>,
    ) -> Result<DeleteCommit, MetadataError>;

    /// The connection type this store runs a transaction's caller step on
    /// ([`CommitStep`](crate::CommitStep)), or `None` if it runs none. A
    /// transaction with a step of another type is rejected before anything
    /// is written.
    ///
    /// Contract: see `commit_transaction_runs_the_step`.
    fn commit_step_connection(&self) -> Option<ConnectionType> {
        None
    }

    /// Commit of a [`Transaction`](crate::Transaction) (several parts, a
    /// caller step, or a saga step's held commit): in **one** transaction,
    /// fenced by `owner` (and by the saga, if `commit.saga` is set), applies
    /// the parts in order, runs the caller's step, lists every point the
    /// parts made garbage in the intent and marks it `Committed` — or `Held`,
    /// keeping an undo image of every touched record, if `commit.hold` — and
    /// records the idempotency key. Like
    /// [`commit_upsert_gated`](Self::commit_upsert_gated), it becomes durable
    /// and visible only after `gate` passed.
    ///
    /// The default fails: a store must implement it to run transactions and
    /// sagas (upserts and deletes do not need it). Wrappers must forward it.
    ///
    /// Contract:
    /// - `commit_transaction_applies_parts_in_order`: each part has the
    ///   effect of `commit_upsert` / `commit_delete`, in order, in one
    ///   transaction (a record deleted then upserted ends up inserted anew,
    ///   upserted then deleted ends up deleted); the summary adds them up;
    ///   `garbage` lists every point a row referenced before and no longer
    ///   does (including points written for the unit and deleted by a later
    ///   part), and the intent lists exactly `garbage`.
    /// - `commit_transaction_fenced_by_owner`: another owner's token fails
    ///   with [`MetadataError::Fenced`] and writes nothing.
    /// - `commit_transaction_fenced_by_saga`: with `commit.saga` set, a saga
    ///   that is missing, ended, or owned by another token fails with
    ///   [`MetadataError::SagaFenced`] and writes nothing.
    /// - `commit_transaction_is_idempotent`: repeating a commit that applied
    ///   returns the recorded summary and garbage and changes nothing.
    /// - `commit_transaction_records_idempotency_key`: as for upserts.
    /// - `commit_transaction_all_or_nothing`: if any part fails (a point
    ///   already referenced, say), nothing of any part is written.
    /// - `commit_transaction_runs_the_step`: the caller's step runs on
    ///   [`commit_step_connection`](Self::commit_step_connection)'s type
    ///   inside the transaction: its writes commit with the records; if it
    ///   fails, nothing is written and the error is
    ///   [`MetadataError::StepFailed`] (or a transient error for a transient
    ///   database failure).
    /// - `commit_transaction_holds`: with `hold`, the intent is `Held`, is
    ///   never claimed by [`claim_expired`](Self::claim_expired), and
    ///   [`undo_images`](Self::undo_images) returns one image per touched
    ///   record: its row before the commit (with its vector where vectors
    ///   are kept; `None` if inserted) and the version it left (`None` if
    ///   deleted).
    /// - `commit_transaction_restores`: a [`Restore`](crate::CommitPart::Restore)
    ///   part puts each record back as its image says (a new version,
    ///   referencing the image's point), deletes records the image says did
    ///   not exist, and leaves alone (reporting it in `conflicts`) any record
    ///   whose current version is not the image's `after_version`.
    /// - `deferred_restore_requeues`: a held commit over a record with a
    ///   waiting pending entry keeps the entry in the record's image; the
    ///   restore puts it back at the restored version, unclaimed.
    /// - `deferred_restore_keeps_dead_letters`: a dead-lettered entry goes
    ///   with the image too, and comes back dead-lettered, with its
    ///   attempts and last error.
    /// - `commit_transaction_gated`: a failed gate returns
    ///   [`MetadataError::Aborted`] and writes nothing.
    async fn commit_transaction(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        commit: &TransactionCommit<'_>,
        idempotency: Option<&IdempotencyRecord>,
        gate: &IndexGate,
    ) -> Result<TransactionCommitResult, MetadataError> {
        let _ = (owner, commit, idempotency, gate);
        Err(MetadataError::permanent(format!(
            "this metadata store does not support transactions (intent {intent})"
        )))
    }

    /// The undo images a held commit kept (see
    /// [`commit_transaction`](Self::commit_transaction)), in record id order;
    /// empty once the intent is released or gone.
    ///
    /// Contract: see `commit_transaction_holds` and
    /// `saga_save_terminal_releases_held`.
    async fn undo_images(&self, intent: IntentId) -> Result<Vec<UndoImage>, MetadataError> {
        Err(MetadataError::permanent(format!(
            "this metadata store does not support sagas (intent {intent})"
        )))
    }

    /// Writes a saga's journal entry. With `fence: None` it creates the saga
    /// (an existing one is left unchanged). With `fence: Some(token)` it
    /// overwrites the saga's state, steps, owner, lease, attempts, error and
    /// update time, only while `token` owns it. A save in a terminal state
    /// (`Done`, `Compensated`, `Failed`) also **releases** the held intents
    /// its steps name, in the same transaction: they become `Committed`,
    /// owned by the saga's (new) owner until its lease deadline, and their
    /// undo images are dropped. Returns the intents it released.
    ///
    /// Contract:
    /// - `saga_save_creates`: a new saga is readable through
    ///   [`saga_get`](Self::saga_get) exactly as saved.
    /// - `saga_save_create_is_idempotent`: creating an existing saga changes
    ///   nothing.
    /// - `saga_save_fenced_by_owner`: with a token that does not own the saga
    ///   (or a missing saga) it fails with [`MetadataError::SagaFenced`] and
    ///   writes nothing.
    /// - `saga_save_hands_over`: a save by the owner that names a new owner
    ///   hands the saga over: afterwards saves and step commits fenced by the
    ///   old token fail with `SagaFenced`, the new token's apply.
    /// - `saga_save_terminal_releases_held`: a terminal save returns the held
    ///   intents of its steps, now `Committed` under the saga's owner, and
    ///   `undo_images` of them is empty; a non-terminal save releases nothing.
    async fn saga_save(
        &self,
        saga: &SagaRecord,
        fence: Option<OwnerToken>,
    ) -> Result<Vec<Intent>, MetadataError> {
        let _ = fence;
        Err(MetadataError::permanent(format!(
            "this metadata store does not support sagas (saga {})",
            saga.id
        )))
    }

    /// Recovery's claim of sagas: atomically takes over up to `limit` live
    /// sagas (`Running`, `Compensating`) whose lease ended before `now_ms`,
    /// giving them to `owner` until `lease_deadline_ms` and counting an
    /// attempt. Oldest lease first. The default claims none (a store without
    /// sagas has none to recover).
    ///
    /// Contract:
    /// - `saga_claim_takes_only_expired_live`: sagas whose lease has not
    ///   ended, and ended sagas, are not claimed.
    /// - `saga_claim_transfers_ownership`: claimed sagas come back with the
    ///   new owner, lease and attempts + 1; the old owner's saves are fenced.
    /// - `saga_claim_is_exclusive`: concurrent claims never return the same
    ///   saga.
    async fn saga_claim(
        &self,
        now_ms: i64,
        owner: OwnerToken,
        lease_deadline_ms: i64,
        limit: usize,
    ) -> Result<Vec<SagaRecord>, MetadataError> {
        let _ = (now_ms, owner, lease_deadline_ms, limit);
        Ok(Vec::new())
    }

    /// Takes over one live saga whatever its lease (an operator's abort):
    /// gives it to `owner` until `lease_deadline_ms`. `None` if it does not
    /// exist or has ended.
    ///
    /// Contract:
    /// - `saga_take_fences_the_driver`: afterwards the saga is `owner`'s and
    ///   a save with the previous token fails with `SagaFenced`; an ended
    ///   or missing saga returns `None` and changes nothing.
    async fn saga_take(
        &self,
        id: SagaId,
        owner: OwnerToken,
        lease_deadline_ms: i64,
    ) -> Result<Option<SagaRecord>, MetadataError> {
        let _ = (owner, lease_deadline_ms);
        Err(MetadataError::permanent(format!(
            "this metadata store does not support sagas (saga {id})"
        )))
    }

    /// One saga's journal entry.
    ///
    /// Contract: see `saga_save_creates`; a missing saga returns `None`.
    async fn saga_get(&self, id: SagaId) -> Result<Option<SagaRecord>, MetadataError> {
        let _ = id;
        Ok(None)
    }

    /// Sagas, optionally in one state, newest first, up to `limit`.
    ///
    /// Contract:
    /// - `saga_list_filters_by_state`: only sagas in the given state (every
    ///   saga without one), newest first, at most `limit`.
    async fn saga_list(
        &self,
        state: Option<SagaState>,
        limit: usize,
    ) -> Result<Vec<SagaRecord>, MetadataError> {
        let _ = (state, limit);
        Ok(Vec::new())
    }

    /// Number of sagas per state (states without sagas are absent).
    ///
    /// Contract:
    /// - `saga_counts_by_state`: counts every saga once, under its state.
    async fn saga_counts(&self) -> Result<SagaCounts, MetadataError> {
        Ok(SagaCounts::new())
    }

    /// Settles a commit whose reply was lost. Locks the intent (waiting for any
    /// transaction still holding it, so a commit still landing is seen), and
    /// reports whether the commit happened; if it did not and `owner` still owns
    /// the intent, transfers it to `fence` so the lost commit can never apply.
    ///
    /// Contract:
    /// - `settle_committed`: a committed (or held) intent is reported
    ///   `Committed`, unchanged.
    /// - `settle_fences_prepared`: a prepared intent owned by `owner` is
    ///   reported `NotCommitted` and is owned by `fence` afterwards, so a commit
    ///   with `owner` fails with `Fenced`.
    /// - `settle_missing`: a missing intent is reported `Missing`.
    async fn settle(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        fence: OwnerToken,
    ) -> Result<Settlement, MetadataError>;

    /// Settles a lost reply of a commit that creates its own intent
    /// ([`TransactionCommit::create_intent`](crate::TransactionCommit::create_intent)):
    /// inserts `intent` owned by `fence` unless an intent of its id exists —
    /// waiting for any transaction still inserting it, so a commit still
    /// landing either is seen or can never apply — then reports as
    /// [`settle`](Self::settle) does.
    ///
    /// The default reports as `settle` without inserting anything: a missing
    /// intent then stays `Missing` (the caller reports the outcome unknown).
    /// A store with [`deferred_indexing`](Self::deferred_indexing) overrides it.
    ///
    /// Contract:
    /// - `settle_unprepared_fences_absent`: with no intent of that id, the
    ///   intent is inserted owned by `fence` and reported `NotCommitted`; a
    ///   late commit creating it with `owner` then fails with `Fenced` and
    ///   writes nothing, and one with `fence` commits.
    /// - `settle_unprepared_committed`: an intent the commit created is
    ///   reported `Committed`, unchanged.
    async fn settle_unprepared(
        &self,
        intent: &NewIntent,
        owner: OwnerToken,
        fence: OwnerToken,
    ) -> Result<Settlement, MetadataError> {
        self.settle(intent.id, owner, fence).await
    }

    /// Resolves (deletes) an intent owned by `owner`.
    ///
    /// Contract:
    /// - `resolve_removes_intent`: returns `true` and the intent is gone.
    /// - `resolve_is_idempotent`: a missing intent, or one owned by another
    ///   token, returns `false` and changes nothing.
    async fn resolve(&self, intent: IntentId, owner: OwnerToken) -> Result<bool, MetadataError>;

    /// Resolves (deletes), in one call, every intent of `intents` that `owner`
    /// owns — recovery's batch of claimed intents. Returns how many it
    /// resolved.
    ///
    /// The default calls [`resolve`](Self::resolve) once per intent; a store
    /// that can do it in one statement overrides it. Wrappers must forward it.
    ///
    /// Contract:
    /// - `resolve_many_removes_only_owned`: exactly the listed intents owned
    ///   by `owner` are gone afterwards, and their number is returned;
    ///   intents of another owner, and intents not listed, are untouched.
    /// - `resolve_many_is_idempotent`: missing intents are skipped; repeating
    ///   the call returns 0 and changes nothing.
    async fn resolve_many(
        &self,
        intents: &[IntentId],
        owner: OwnerToken,
    ) -> Result<usize, MetadataError> {
        let mut resolved = 0;
        for &intent in intents {
            if self.resolve(intent, owner).await? {
                resolved += 1;
            }
        }
        Ok(resolved)
    }

    /// Recovery's claim: atomically takes over up to `limit` intents whose lease
    /// ended before `now_ms`, giving them to `owner` until `lease_deadline_ms` and
    /// counting an attempt. Oldest lease first. `Held` intents are never
    /// claimed: their saga releases them.
    ///
    /// Contract:
    /// - `claim_takes_only_expired`: intents whose lease has not ended are not
    ///   claimed (nor held ones: see `commit_transaction_holds`).
    /// - `claim_transfers_ownership`: claimed intents are returned with the new
    ///   owner, lease and attempts + 1; the old owner's commit is fenced.
    /// - `claim_is_exclusive`: concurrent claims never return the same intent.
    /// - `claim_respects_limit`: at most `limit` are returned.
    async fn claim_expired(
        &self,
        now_ms: i64,
        owner: OwnerToken,
        lease_deadline_ms: i64,
        limit: usize,
    ) -> Result<Vec<Intent>, MetadataError>;

    /// Records why handling an intent failed (kept for operators).
    ///
    /// Contract:
    /// - `record_failure_sets_last_error`: the owner's message becomes the
    ///   intent's `last_error`; another owner's call changes nothing.
    async fn record_failure(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        message: &str,
    ) -> Result<(), MetadataError>;

    /// Which of `points` are in use: a committed row references them now, or
    /// a `Held` intent keeps them (a live saga may put a row back on them).
    /// Recovery's garbage rule deletes only points *not* in use.
    ///
    /// Contract:
    /// - `referenced_points_subset`: returns exactly the given points that some
    ///   row references; unknown points are simply absent.
    /// - `referenced_points_includes_held`: the points a held intent lists are
    ///   returned too, until it is released.
    async fn referenced_points(
        &self,
        points: &[PointId],
    ) -> Result<HashSet<PointId>, MetadataError>;

    /// The committed rows that currently reference one of `points` (the read guard).
    ///
    /// Contract:
    /// - `rows_by_points_current_only`: a row is returned only for its current
    ///   point; superseded and unknown points return nothing.
    /// - `rows_by_points_without_vectors`: rows come without their vectors
    ///   (`vector: None`) even in a store that keeps them — a search needs the
    ///   row, not its embedding, and [`get`](Self::get) returns it.
    async fn rows_by_points(&self, points: &[PointId]) -> Result<Vec<StoredRecord>, MetadataError>;

    /// The committed rows with these ids.
    ///
    /// Contract:
    /// - `get_returns_existing`: existing ids are returned, missing ones omitted.
    async fn get(&self, ids: &[RecordId]) -> Result<Vec<StoredRecord>, MetadataError>;

    /// The recorded outcome of an idempotency key.
    ///
    /// Contract:
    /// - `lookup_idempotency_unknown_key`: an unknown key returns `None`
    ///   (recorded keys: see `commit_upsert_records_idempotency_key`).
    async fn lookup_idempotency(
        &self,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, MetadataError>;

    /// Lists committed rows' point references, optionally of one scope, in pages
    /// ordered by record id. `after` is the last id of the previous page.
    ///
    /// Contract:
    /// - `scan_refs_pages_cover_all`: the pages together list every row of the
    ///   scope exactly once, in record id order.
    async fn scan_refs(
        &self,
        scope: Option<&Scope>,
        after: Option<RecordId>,
        limit: usize,
    ) -> Result<Page<RowRef, RecordId>, MetadataError>;

    /// Lists unresolved intents, oldest first, up to `limit`.
    ///
    /// Contract: see `prepare_then_read`; resolved intents are not listed.
    async fn list_intents(&self, limit: usize) -> Result<Vec<Intent>, MetadataError>;

    /// Number of committed rows per scope.
    ///
    /// Contract:
    /// - `count_by_scope_counts_rows`: counts every scope with at least one row.
    async fn count_by_scope(&self) -> Result<BTreeMap<Scope, u64>, MetadataError>;

    /// Whether the store implements deferred indexing: the
    /// [`CommitPart::Defer`](crate::CommitPart::Defer) and
    /// [`CommitPart::Index`](crate::CommitPart::Index) parts of
    /// [`commit_transaction`](Self::commit_transaction), `release_at_ms`,
    /// and the pending-index methods below. The coordinator refuses deferred
    /// writes and index workers on a store that does not. Wrappers must
    /// forward it.
    ///
    /// Contract: every `deferred_*` and `pending_*` case runs when it is
    /// `true` (and is skipped, reported as such, when it is `false`).
    fn deferred_indexing(&self) -> bool {
        false
    }

    /// An index worker's claim: atomically takes up to `limit` pending
    /// entries that are current (the row is at the entry's version), not
    /// dead-lettered and not claimed (`claim_until_ms` absent or before
    /// `now_ms`), oldest enqueued first, and marks them claimed by `claim`
    /// until `claim_until_ms`. Entries that a later write made stale (the
    /// record was deleted, or written synchronously since) are removed. An
    /// implementation whose claim can see an entry newer than its row (a
    /// commit landing while the claim reads, as under PostgreSQL's read
    /// committed) leaves that entry for a later claim: it must never remove
    /// an entry its row has not passed.
    ///
    /// Contract:
    /// - `pending_claim_takes_current`: a deferred write's entries are
    ///   returned once, with the row's version, scope, metadata and vector;
    ///   a second claim before `claim_until_ms` returns none of them; after
    ///   it, they are returned again.
    /// - `pending_claim_is_exclusive`: concurrent claims never return the
    ///   same entry.
    /// - `pending_claim_respects_limit`: at most `limit`, oldest enqueued
    ///   first.
    /// - `pending_claim_skips_dead`: dead-lettered entries are not claimed.
    async fn claim_pending(
        &self,
        now_ms: i64,
        claim: OwnerToken,
        claim_until_ms: i64,
        limit: usize,
    ) -> Result<Vec<PendingIndex>, MetadataError> {
        let _ = (now_ms, claim, claim_until_ms, limit);
        Err(deferred_unsupported())
    }

    /// Records a failed indexing attempt of the listed entries (record,
    /// version) that `claim` holds: the message, and attempts + 1 if the
    /// failure `counts` (or is permanent); the entry moves to the
    /// dead-letter list if `failure.permanent` or its counted attempts
    /// reach `failure.max_attempts`, and otherwise becomes claimable again
    /// at `failure.retry_at_ms`. Returns how many entries it dead-lettered.
    ///
    /// Contract:
    /// - `pending_failure_counts_attempts`: attempts and `last_error` are
    ///   updated; the entry is claimable again only from `retry_at_ms`.
    /// - `pending_failure_transient_does_not_count`: a failure that does
    ///   not count leaves attempts alone and never dead-letters.
    /// - `pending_failure_dead_letters`: a permanent failure, or the
    ///   `max_attempts`-th, dead-letters the entry.
    /// - `pending_failure_fenced`: an entry claimed by another token, or at
    ///   another version, is left unchanged.
    async fn record_index_failure(
        &self,
        claim: OwnerToken,
        entries: &[(RecordId, u64)],
        failure: &IndexFailure,
    ) -> Result<usize, MetadataError> {
        let _ = (claim, entries, failure);
        Err(deferred_unsupported())
    }

    /// Lists pending entries in record id order, after `after`, up to
    /// `limit`.
    ///
    /// Contract:
    /// - `pending_list_filters`: `Waiting` lists entries not dead-lettered,
    ///   `Dead` only dead-lettered ones, `All` both; pages in record id order.
    async fn list_pending(
        &self,
        filter: PendingFilter,
        after: Option<RecordId>,
        limit: usize,
    ) -> Result<Vec<PendingIndex>, MetadataError> {
        let _ = (filter, after, limit);
        Err(deferred_unsupported())
    }

    /// The pending entries of these records (those that have one).
    ///
    /// Contract:
    /// - `deferred_commit_enqueues`, `deferred_commit_coalesces`: see
    ///   [`commit_transaction`](Self::commit_transaction).
    async fn pending_for(&self, ids: &[RecordId]) -> Result<Vec<PendingIndex>, MetadataError> {
        let _ = ids;
        Err(deferred_unsupported())
    }

    /// Puts dead-lettered entries (the listed records', or all with `None`)
    /// back in the queue: attempts 0, claimable now. Returns how many.
    ///
    /// Contract:
    /// - `pending_retry_dead`: the entries are claimable again; entries not
    ///   dead-lettered are untouched.
    async fn retry_dead(&self, ids: Option<&[RecordId]>) -> Result<u64, MetadataError> {
        let _ = ids;
        Err(deferred_unsupported())
    }

    /// Removes dead-lettered entries (the listed records', or all with
    /// `None`): their records stay as committed, found through the point
    /// their row references (the previous version's, or none for a record
    /// never indexed). Returns how many.
    ///
    /// Contract:
    /// - `pending_drop_dead`: the entries are gone; rows are unchanged;
    ///   entries not dead-lettered are untouched.
    async fn drop_dead(&self, ids: Option<&[RecordId]>) -> Result<u64, MetadataError> {
        let _ = ids;
        Err(deferred_unsupported())
    }

    /// The backlog's counts.
    ///
    /// Contract:
    /// - `pending_stats_counts`: counts waiting, claimed (at `now_ms`) and
    ///   dead entries, and the oldest waiting entry's enqueue time.
    /// - `pending_stats_rate`: `indexed_last_minute` counts the records
    ///   [`CommitPart::Index`](crate::CommitPart::Index) commits switched
    ///   (not their fenced switches) at times in the 60 whole seconds ending
    ///   with `now_ms`'s second.
    async fn pending_stats(&self, now_ms: i64) -> Result<PendingStats, MetadataError> {
        let _ = now_ms;
        Err(deferred_unsupported())
    }
    /// Does this store record the active collection and run migrations
    /// (the `reindex_*` methods)? A store that does not answers
    /// [`index_state`](Self::index_state) with the default state and fails
    /// the others.
    fn reindexing(&self) -> bool {
        false
    }

    /// The active collection and any open migration.
    ///
    /// Contract:
    /// - `reindex_state_starts_empty`: a new store is at generation 0, with
    ///   no active, retired or migration.
    async fn index_state(&self) -> Result<IndexState, MetadataError> {
        Ok(IndexState::default())
    }

    /// Opens a migration to `spec`, held by `owner` until `lease_until_ms`,
    /// or takes over the open one to the same spec if its lease ended (or
    /// `owner` already holds it), keeping its cursor. From then on, every
    /// commit that stops referencing a point records it for
    /// [`reindex_garbage`](Self::reindex_garbage). Opening a migration
    /// fences every prepared intent (a new owner, the lease ended at
    /// `now_ms`), so that no commit that began before it can land after it
    /// without recording its garbage.
    ///
    /// Contract:
    /// - `reindex_begin_opens`: the state lists the migration with the
    ///   spec, owner, lease, cursor 0 and `started_ms = now_ms`; an intent
    ///   prepared before it is fenced (its commit fails with
    ///   [`MetadataError::Fenced`]).
    /// - `reindex_begin_resumes`: the same spec after the lease ended is
    ///   taken over by the new owner, cursor and count kept.
    /// - `reindex_begin_conflicts`: another spec, or the same spec whose
    ///   driver's lease is live, fails with
    ///   [`MetadataError::MigrationConflict`] and changes nothing.
    async fn reindex_begin(
        &self,
        spec: &MigrationSpec,
        owner: OwnerToken,
        now_ms: i64,
        lease_until_ms: i64,
    ) -> Result<IndexState, MetadataError> {
        let _ = (spec, owner, now_ms, lease_until_ms);
        Err(reindex_unsupported())
    }

    /// Up to `limit` committed rows whose change sequence is above `after`,
    /// in change-sequence order. A row's sequence is raised (to above every
    /// other) when it is inserted and whenever its point changes; a write
    /// that keeps the point (a deferred update) leaves it.
    ///
    /// Contract:
    /// - `reindex_scan_orders_by_change`: inserted rows come in commit
    ///   order; a row whose point changed moves after them; a deferred
    ///   update does not move it; deleted rows are absent; paging by the
    ///   last `seq` lists each row once.
    /// - `reindex_scan_marks_reserved`: a deferred insert not yet indexed
    ///   comes with `indexed: false`, and with `indexed: true` once a
    ///   worker switched it in.
    async fn reindex_scan(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ChangedRow>, MetadataError> {
        let _ = (after, limit);
        Err(reindex_unsupported())
    }

    /// Up to `limit` points that commits stopped referencing while the
    /// migration was open (and that were not yet reported done).
    ///
    /// Contract:
    /// - `reindex_garbage_records_unreferenced`: with a migration open, the
    ///   old point of an updated row, the point of a deleted row and the
    ///   old point of a row a worker switched are listed; with none open,
    ///   nothing is recorded.
    async fn reindex_garbage(&self, limit: usize) -> Result<Vec<PointId>, MetadataError> {
        let _ = limit;
        Err(reindex_unsupported())
    }

    /// The driver's progress, fenced by `owner`: sets the cursor, adds
    /// `copied`, forgets the `garbage` it deleted from the target, stages
    /// the re-embedded `vectors` of the chunk's rows (replacing any staged
    /// earlier for the same row), and extends the lease.
    ///
    /// A store that keeps vectors makes each staged vector its row's kept
    /// vector at the switch (in the switch's commit), if the row's change
    /// sequence is still the one it was staged for; a store that keeps none
    /// ignores them.
    ///
    /// Contract:
    /// - `reindex_progress_persists`: the state shows the cursor, count and
    ///   lease; the garbage is no longer listed.
    /// - `reindex_progress_fenced`: another owner (or no open migration)
    ///   fails with [`MetadataError::MigrationConflict`] and changes nothing.
    /// - `reindex_staged_vectors_apply_at_switch`: before the switch the
    ///   rows keep their vectors; the switch makes each staged vector its
    ///   row's kept vector (the last one staged for the row wins), except
    ///   for a row whose point changed since it was staged.
    /// - `reindex_abort_forgets_staged_vectors`: a migration opened after an
    ///   abort applies none of the aborted one's staged vectors.
    async fn reindex_progress(
        &self,
        owner: OwnerToken,
        cursor: u64,
        copied: u64,
        garbage: &[PointId],
        vectors: &[StagedVector],
        lease_until_ms: i64,
    ) -> Result<IndexState, MetadataError> {
        let _ = (owner, cursor, copied, garbage, vectors, lease_until_ms);
        Err(reindex_unsupported())
    }

    /// Starts the switch, fenced by `owner`: until `until_ms` (or the
    /// switch), prepares are refused with [`MetadataError::IndexMoved`],
    /// and every intent prepared now is fenced (its owner replaced, its
    /// lease ended), so no commit of a point the target may lack can land.
    /// Returns how many intents it fenced.
    ///
    /// Contract:
    /// - `reindex_freeze_fences_prepared`: a prepared intent's commit then
    ///   fails with [`MetadataError::Fenced`]; a prepare (at a time before
    ///   `until_ms`) fails with `IndexMoved { switching: true }`; one after
    ///   `until_ms` succeeds.
    async fn reindex_freeze(
        &self,
        owner: OwnerToken,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<u64, MetadataError> {
        let _ = (owner, now_ms, until_ms);
        Err(reindex_unsupported())
    }

    /// The switch, fenced by `owner`, in one transaction: fences every
    /// prepared intent again; then, if no row changed after the cursor, no
    /// recorded garbage is left and no intent is held, makes the target
    /// active (the generation + 1, `current` retired, the migration
    /// closed).
    ///
    /// Contract:
    /// - `reindex_switch_when_caught_up`: the state names the target
    ///   active, `current` retired, generation + 1, no migration; a prepare
    ///   under the old generation fails with `IndexMoved`.
    /// - `reindex_switch_behind`: a row changed after the cursor, or
    ///   garbage left, answers `Behind` and changes nothing else; a held
    ///   intent answers `Held`.
    /// - `reindex_switch_waits_for_deferred_when_re_embedding`: a
    ///   re-embedding migration ([`ReindexSource::Embedder`](crate::ReindexSource))
    ///   answers `Deferred` while deferred-index entries exist (their vectors
    ///   are the old model's); a rebuild from kept vectors switches anyway.
    ///
    /// The decision, on what the store counts, is
    /// [`IndexState::switch_blocker`].
    async fn reindex_switch(
        &self,
        owner: OwnerToken,
        current: &str,
        now_ms: i64,
    ) -> Result<SwitchOutcome, MetadataError> {
        let _ = (owner, current, now_ms);
        Err(reindex_unsupported())
    }

    /// Closes the open migration without a switch (fenced by `owner`, or
    /// by nobody with `None`: an operator's abort), forgetting its garbage.
    /// Returns it (`None` if none was open).
    ///
    /// Contract:
    /// - `reindex_abort_closes`: the state has no migration; prepares
    ///   succeed; a later begin starts at cursor 0.
    async fn reindex_abort(
        &self,
        owner: Option<OwnerToken>,
    ) -> Result<Option<Migration>, MetadataError> {
        let _ = owner;
        Err(reindex_unsupported())
    }

    /// Forgets the retired collection if it is `name` (once dropped).
    /// Returns whether it was.
    ///
    /// Contract: see `reindex_switch_when_caught_up`.
    async fn reindex_forget_retired(&self, name: &str) -> Result<bool, MetadataError> {
        let _ = name;
        Err(reindex_unsupported())
    }
}

/// The error of a migration method on a store without re-indexing.
fn reindex_unsupported() -> MetadataError {
    MetadataError::permanent("this metadata store does not support re-indexing".to_owned())
}

/// The error of a pending-index method on a store without deferred indexing.
fn deferred_unsupported() -> MetadataError {
    MetadataError::permanent("this metadata store does not support deferred indexing".to_owned())
}

/// A similarity query against the index.
#[derive(Clone, Debug, PartialEq)]
pub struct IndexQuery {
    /// The query vector.
    pub vector: Vec<f32>,
    /// At most this many hits.
    pub limit: usize,
    /// Scope and metadata conditions.
    pub filter: Filter,
    /// Only hits scoring at least this (for euclid: at least this negated distance).
    pub score_threshold: Option<f32>,
}

/// The vector side: a derived index of the committed rows.
#[async_trait]
pub trait VectorIndex: Send + Sync {
    /// The collection's vector dimension.
    fn dimension(&self) -> usize;

    /// The collection's distance function.
    fn distance(&self) -> Distance;

    /// Writes points (insert or overwrite by id). When it returns `Ok`, every
    /// point is durable and visible to [`retrieve`](Self::retrieve) and
    /// [`search`](Self::search). On error, any subset may have been applied
    /// (batches are not atomic).
    ///
    /// Contract:
    /// - `upsert_then_retrieve`: written points are retrievable with their record
    ///   id, scope and write time.
    /// - `upsert_is_idempotent`: writing the same points twice leaves one copy
    ///   of each (count unchanged).
    /// - `upsert_rejects_wrong_dimension`: a vector of another dimension fails
    ///   with [`IndexError::InvalidInput`].
    async fn upsert(&self, points: &[Point]) -> Result<(), IndexError>;

    /// Deletes points by id. When it returns `Ok` they are gone for good.
    ///
    /// Contract:
    /// - `delete_removes_points`: deleted points are no longer retrieved,
    ///   counted, scrolled or found by search; others are untouched.
    /// - `delete_is_idempotent`: deleting missing ids succeeds.
    async fn delete(&self, ids: &[PointId]) -> Result<(), IndexError>;

    /// The points among `ids` that exist.
    ///
    /// Contract: see `upsert_then_retrieve` and `delete_removes_points`; unknown
    /// ids are simply absent.
    async fn retrieve(&self, ids: &[PointId]) -> Result<Vec<PointInfo>, IndexError>;

    /// Nearest points to the query, best first, honouring the filter and threshold.
    ///
    /// Contract:
    /// - `search_orders_by_score`: hits come best first; the nearest point is first.
    /// - `search_filters_scope_and_metadata`: only points matching the filter.
    /// - `search_respects_limit_and_threshold`: at most `limit`, none below the
    ///   threshold.
    async fn search(&self, query: &IndexQuery) -> Result<Vec<ScoredPoint>, IndexError>;

    /// Number of points, optionally of one scope.
    ///
    /// Contract:
    /// - `count_by_scope`: counts exactly the points of the scope (or all).
    async fn count(&self, scope: Option<&Scope>) -> Result<u64, IndexError>;

    /// Lists points, optionally of one scope, in pages. `offset` is the `next`
    /// of the previous page (opaque; the order is the backend's own).
    ///
    /// Contract:
    /// - `scroll_pages_cover_all`: the pages together list every point of the
    ///   scope exactly once.
    async fn scroll(
        &self,
        scope: Option<&Scope>,
        offset: Option<PointId>,
        limit: usize,
    ) -> Result<Page<PointInfo, PointId>, IndexError>;
}

/// The vector store's collections by name: what a re-index creates, opens
/// and drops. Each [`VectorIndex`] is bound to one collection; the catalog
/// makes more of them.
#[async_trait]
pub trait IndexCatalog: Send + Sync {
    /// The index of one collection.
    type Index: VectorIndex;

    /// Opens an existing collection.
    ///
    /// Contract:
    /// - `catalog_open_missing`: a collection that does not exist fails with
    ///   [`IndexError::CollectionNotFound`].
    async fn open(&self, name: &str) -> Result<Self::Index, IndexError>;

    /// Creates an empty collection of this layout, or opens it if it exists
    /// with the same layout.
    ///
    /// Contract:
    /// - `catalog_create_then_open`: the created index has the dimension and
    ///   distance asked for; points written through it are seen through a
    ///   later [`open`](Self::open) of the same name.
    /// - `catalog_create_conflicting_layout`: an existing collection of
    ///   another dimension fails with [`IndexError::Config`].
    async fn create(
        &self,
        name: &str,
        dimension: usize,
        distance: Distance,
    ) -> Result<Self::Index, IndexError>;

    /// Drops a collection and its points. Returns whether it existed.
    ///
    /// Contract:
    /// - `catalog_drop`: afterwards `open` fails with `CollectionNotFound`;
    ///   dropping again returns `false`.
    async fn drop_collection(&self, name: &str) -> Result<bool, IndexError>;
}

macro_rules! forward_metadata_repo {
    ($($ptr:tt)*) => {
        #[async_trait]
        impl<T: MetadataRepo + ?Sized> MetadataRepo for $($ptr)*<T> {
            async fn prepare(&self, intent: &NewIntent) -> Result<(), MetadataError> {
                (**self).prepare(intent).await
            }
            async fn commit_upsert(
                &self,
                intent: IntentId,
                owner: OwnerToken,
                rows: &[RowWrite],
                idempotency: Option<&IdempotencyRecord>,
            ) -> Result<UpsertCommit, MetadataError> {
                (**self).commit_upsert(intent, owner, rows, idempotency).await
            }
            async fn commit_upsert_gated(
                &self,
                intent: IntentId,
                owner: OwnerToken,
                rows: &[RowWrite],
                idempotency: Option<&IdempotencyRecord>,
                gate: &IndexGate,
            ) -> Result<UpsertCommit, MetadataError> {
                (**self)
                    .commit_upsert_gated(intent, owner, rows, idempotency, gate)
                    .await
            }
            async fn commit_delete(
                &self,
                intent: IntentId,
                owner: OwnerToken,
                selector: &DeleteSelector,
                idempotency: Option<&IdempotencyRecord>,
            ) -> Result<DeleteCommit, MetadataError> {
                (**self).commit_delete(intent, owner, selector, idempotency).await
            }
            fn commit_step_connection(&self) -> Option<ConnectionType> {
                (**self).commit_step_connection()
            }
            async fn commit_transaction(
                &self,
                intent: IntentId,
                owner: OwnerToken,
                commit: &TransactionCommit<'_>,
                idempotency: Option<&IdempotencyRecord>,
                gate: &IndexGate,
            ) -> Result<TransactionCommitResult, MetadataError> {
                (**self)
                    .commit_transaction(intent, owner, commit, idempotency, gate)
                    .await
            }
            async fn undo_images(&self, intent: IntentId) -> Result<Vec<UndoImage>, MetadataError> {
                (**self).undo_images(intent).await
            }
            async fn saga_save(
                &self,
                saga: &SagaRecord,
                fence: Option<OwnerToken>,
            ) -> Result<Vec<Intent>, MetadataError> {
                (**self).saga_save(saga, fence).await
            }
            async fn saga_claim(
                &self,
                now_ms: i64,
                owner: OwnerToken,
                lease_deadline_ms: i64,
                limit: usize,
            ) -> Result<Vec<SagaRecord>, MetadataError> {
                (**self).saga_claim(now_ms, owner, lease_deadline_ms, limit).await
            }
            async fn saga_take(
                &self,
                id: SagaId,
                owner: OwnerToken,
                lease_deadline_ms: i64,
            ) -> Result<Option<SagaRecord>, MetadataError> {
                (**self).saga_take(id, owner, lease_deadline_ms).await
            }
            async fn saga_get(&self, id: SagaId) -> Result<Option<SagaRecord>, MetadataError> {
                (**self).saga_get(id).await
            }
            async fn saga_list(
                &self,
                state: Option<SagaState>,
                limit: usize,
            ) -> Result<Vec<SagaRecord>, MetadataError> {
                (**self).saga_list(state, limit).await
            }
            async fn saga_counts(&self) -> Result<SagaCounts, MetadataError> {
                (**self).saga_counts().await
            }
            async fn settle(
                &self,
                intent: IntentId,
                owner: OwnerToken,
                fence: OwnerToken,
            ) -> Result<Settlement, MetadataError> {
                (**self).settle(intent, owner, fence).await
            }
            async fn settle_unprepared(
                &self,
                intent: &NewIntent,
                owner: OwnerToken,
                fence: OwnerToken,
            ) -> Result<Settlement, MetadataError> {
                (**self).settle_unprepared(intent, owner, fence).await
            }
            async fn resolve(&self, intent: IntentId, owner: OwnerToken) -> Result<bool, MetadataError> {
                (**self).resolve(intent, owner).await
            }
            async fn resolve_many(
                &self,
                intents: &[IntentId],
                owner: OwnerToken,
            ) -> Result<usize, MetadataError> {
                (**self).resolve_many(intents, owner).await
            }
            async fn claim_expired(
                &self,
                now_ms: i64,
                owner: OwnerToken,
                lease_deadline_ms: i64,
                limit: usize,
            ) -> Result<Vec<Intent>, MetadataError> {
                (**self).claim_expired(now_ms, owner, lease_deadline_ms, limit).await
            }
            async fn record_failure(
                &self,
                intent: IntentId,
                owner: OwnerToken,
                message: &str,
            ) -> Result<(), MetadataError> {
                (**self).record_failure(intent, owner, message).await
            }
            async fn referenced_points(
                &self,
                points: &[PointId],
            ) -> Result<HashSet<PointId>, MetadataError> {
                (**self).referenced_points(points).await
            }
            async fn rows_by_points(
                &self,
                points: &[PointId],
            ) -> Result<Vec<StoredRecord>, MetadataError> {
                (**self).rows_by_points(points).await
            }
            async fn get(&self, ids: &[RecordId]) -> Result<Vec<StoredRecord>, MetadataError> {
                (**self).get(ids).await
            }
            async fn lookup_idempotency(
                &self,
                key: &str,
            ) -> Result<Option<IdempotencyRecord>, MetadataError> {
                (**self).lookup_idempotency(key).await
            }
            async fn scan_refs(
                &self,
                scope: Option<&Scope>,
                after: Option<RecordId>,
                limit: usize,
            ) -> Result<Page<RowRef, RecordId>, MetadataError> {
                (**self).scan_refs(scope, after, limit).await
            }
            async fn list_intents(&self, limit: usize) -> Result<Vec<Intent>, MetadataError> {
                (**self).list_intents(limit).await
            }
            async fn count_by_scope(&self) -> Result<BTreeMap<Scope, u64>, MetadataError> {
                (**self).count_by_scope().await
            }
            fn deferred_indexing(&self) -> bool {
                (**self).deferred_indexing()
            }
            async fn claim_pending(
                &self,
                now_ms: i64,
                claim: OwnerToken,
                claim_until_ms: i64,
                limit: usize,
            ) -> Result<Vec<PendingIndex>, MetadataError> {
                (**self).claim_pending(now_ms, claim, claim_until_ms, limit).await
            }
            async fn record_index_failure(
                &self,
                claim: OwnerToken,
                entries: &[(RecordId, u64)],
                failure: &IndexFailure,
            ) -> Result<usize, MetadataError> {
                (**self).record_index_failure(claim, entries, failure).await
            }
            async fn list_pending(
                &self,
                filter: PendingFilter,
                after: Option<RecordId>,
                limit: usize,
            ) -> Result<Vec<PendingIndex>, MetadataError> {
                (**self).list_pending(filter, after, limit).await
            }
            async fn pending_for(&self, ids: &[RecordId]) -> Result<Vec<PendingIndex>, MetadataError> {
                (**self).pending_for(ids).await
            }
            async fn retry_dead(&self, ids: Option<&[RecordId]>) -> Result<u64, MetadataError> {
                (**self).retry_dead(ids).await
            }
            async fn drop_dead(&self, ids: Option<&[RecordId]>) -> Result<u64, MetadataError> {
                (**self).drop_dead(ids).await
            }
            async fn pending_stats(&self, now_ms: i64) -> Result<PendingStats, MetadataError> {
                (**self).pending_stats(now_ms).await
            }
            fn reindexing(&self) -> bool {
                (**self).reindexing()
            }
            async fn index_state(&self) -> Result<IndexState, MetadataError> {
                (**self).index_state().await
            }
            async fn reindex_begin(
                &self,
                spec: &MigrationSpec,
                owner: OwnerToken,
                now_ms: i64,
                lease_until_ms: i64,
            ) -> Result<IndexState, MetadataError> {
                (**self).reindex_begin(spec, owner, now_ms, lease_until_ms).await
            }
            async fn reindex_scan(
                &self,
                after: u64,
                limit: usize,
            ) -> Result<Vec<ChangedRow>, MetadataError> {
                (**self).reindex_scan(after, limit).await
            }
            async fn reindex_garbage(&self, limit: usize) -> Result<Vec<PointId>, MetadataError> {
                (**self).reindex_garbage(limit).await
            }
            async fn reindex_progress(
                &self,
                owner: OwnerToken,
                cursor: u64,
                copied: u64,
                garbage: &[PointId],
                vectors: &[StagedVector],
                lease_until_ms: i64,
            ) -> Result<IndexState, MetadataError> {
                (**self)
                    .reindex_progress(owner, cursor, copied, garbage, vectors, lease_until_ms)
                    .await
            }
            async fn reindex_freeze(
                &self,
                owner: OwnerToken,
                now_ms: i64,
                until_ms: i64,
            ) -> Result<u64, MetadataError> {
                (**self).reindex_freeze(owner, now_ms, until_ms).await
            }
            async fn reindex_switch(
                &self,
                owner: OwnerToken,
                current: &str,
                now_ms: i64,
            ) -> Result<SwitchOutcome, MetadataError> {
                (**self).reindex_switch(owner, current, now_ms).await
            }
            async fn reindex_abort(
                &self,
                owner: Option<OwnerToken>,
            ) -> Result<Option<Migration>, MetadataError> {
                (**self).reindex_abort(owner).await
            }
            async fn reindex_forget_retired(&self, name: &str) -> Result<bool, MetadataError> {
                (**self).reindex_forget_retired(name).await
            }
        }
    };
}

macro_rules! forward_vector_index {
    ($($ptr:tt)*) => {
        #[async_trait]
        impl<T: VectorIndex + ?Sized> VectorIndex for $($ptr)*<T> {
            fn dimension(&self) -> usize {
                (**self).dimension()
            }
            fn distance(&self) -> Distance {
                (**self).distance()
            }
            async fn upsert(&self, points: &[Point]) -> Result<(), IndexError> {
                (**self).upsert(points).await
            }
            async fn delete(&self, ids: &[PointId]) -> Result<(), IndexError> {
                (**self).delete(ids).await
            }
            async fn retrieve(&self, ids: &[PointId]) -> Result<Vec<PointInfo>, IndexError> {
                (**self).retrieve(ids).await
            }
            async fn search(&self, query: &IndexQuery) -> Result<Vec<ScoredPoint>, IndexError> {
                (**self).search(query).await
            }
            async fn count(&self, scope: Option<&Scope>) -> Result<u64, IndexError> {
                (**self).count(scope).await
            }
            async fn scroll(
                &self,
                scope: Option<&Scope>,
                offset: Option<PointId>,
                limit: usize,
            ) -> Result<Page<PointInfo, PointId>, IndexError> {
                (**self).scroll(scope, offset, limit).await
            }
        }
    };
}

#[async_trait]
impl<T: IndexCatalog + ?Sized> IndexCatalog for std::sync::Arc<T> {
    type Index = T::Index;
    async fn open(&self, name: &str) -> Result<Self::Index, IndexError> {
        (**self).open(name).await
    }
    async fn create(
        &self,
        name: &str,
        dimension: usize,
        distance: Distance,
    ) -> Result<Self::Index, IndexError> {
        (**self).create(name, dimension, distance).await
    }
    async fn drop_collection(&self, name: &str) -> Result<bool, IndexError> {
        (**self).drop_collection(name).await
    }
}

forward_metadata_repo!(std::sync::Arc);
forward_metadata_repo!(Box);
forward_vector_index!(std::sync::Arc);
forward_vector_index!(Box);
