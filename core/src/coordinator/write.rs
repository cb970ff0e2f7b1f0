//! The write path: upsert, delete and transactions — one protocol
//! ([`Coordinator::write_unit`]) for every kind of write.
//!
//! prepare (intent) → index write → commit (fenced) → cleanup (old points) →
//! resolve. Any failure before the commit compensates; an ambiguous commit is
//! settled before anything else happens. An upsert's commit may start while its
//! index write is in flight ([`IndexGate`]): it becomes durable only after the
//! write succeeded.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};

use futures::StreamExt;
use serde_json::Value;
use tokio::time::Instant;
use tracing::{Instrument, error, info, info_span, warn};

use super::retry::{Failed, Idempotence, with_retry};
use super::validate::{check_batch, check_selector, check_transaction, request_hash};
use super::{Bug, Coordinator, DeleteReport, IndexToken, UpsertReport, WriteOptions};
use crate::config::WriteMode;
use crate::error::{CoordinatorError, IndexError, MetadataError, Outcome, ValidationError};
use crate::model::{
    CommitPart, CommitSummary, DeleteSelector, IdempotencyRecord, IntentId, IntentKind, NewIntent,
    NewRecord, OwnerToken, Point, PointId, RecordId, RowWrite, SagaFence, Settlement,
    TransactionCommit, TransactionCommitResult, UndoImage,
};
use crate::ports::{IndexGate, MetadataRepo, VectorIndex};
use crate::transaction::{CommitStep, Transaction, TransactionReport, WriteOp};

/// How the commit step ended.
enum Decision {
    /// The metadata commit happened. `garbage` lists the points it superseded
    /// (upsert) or orphaned (delete); `owner` is the token that owns the intent.
    Committed {
        summary: CommitSummary,
        garbage: Vec<PointId>,
        owner: OwnerToken,
        /// Records a restore left alone because they changed since.
        conflicts: Vec<RecordId>,
        /// The version each deferred row got (empty when settled).
        versions: Vec<(RecordId, u64)>,
    },
    /// It did not happen and never will.
    NotApplied {
        error: CoordinatorError,
        owner: OwnerToken,
        key_taken: bool,
    },
    /// Recovery took the intent over: not applied, and recovery owns the cleanup.
    Fenced,
    /// The outcome could not be learned.
    Unknown(CoordinatorError),
}

fn record_phase(op: &'static str, phase: &'static str, started: Instant) {
    metrics::histogram!("tandem_phase_seconds", "op" => op, "phase" => phase)
        .record(started.elapsed().as_secs_f64());
}

impl<M: MetadataRepo, V: VectorIndex> Coordinator<M, V> {
    /// Inserts or updates a batch of records, all-or-nothing across both stores.
    ///
    /// Each record is inserted if its id is new (or absent: a UUIDv7 is
    /// generated) and updated otherwise; an update writes a new point and
    /// switches the row to it in the commit. On `Ok`, every record is committed
    /// and searchable. On an error whose [`outcome`](CoordinatorError::outcome)
    /// is `NotApplied`, nothing of the call is or will become visible.
    pub async fn upsert(&self, records: Vec<NewRecord>) -> Result<UpsertReport, CoordinatorError> {
        self.upsert_with(records, &WriteOptions::default()).await
    }

    /// [`upsert`](Self::upsert) with options (an idempotency key).
    pub async fn upsert_with(
        &self,
        records: Vec<NewRecord>,
        opts: &WriteOptions,
    ) -> Result<UpsertReport, CoordinatorError> {
        check_batch(
            &records,
            self.index().dimension(),
            self.index().distance(),
            &self.config.limits,
        )?;
        let deadline = Instant::now() + self.config.call_deadline;
        let key = match &opts.idempotency_key {
            Some(key) => {
                let hash = request_hash("upsert", &records);
                if let Some(rec) = self.lookup_key(key, &hash, deadline).await? {
                    return replay_upsert(rec);
                }
                Some((key.clone(), hash))
            }
            None => None,
        };
        let deferred = self.write_mode(opts)? == WriteMode::Deferred;
        let intent = IntentId::new_v7();
        let span = info_span!("tandem.upsert", intent = %intent, batch = records.len(), deferred);
        async {
            // Only the planted bugs look at the current rows before the commit.
            let current = self.current_points_for_bugs(&records, deadline).await?;
            let now = self.clock.now_ms();
            // A deferred write builds no points: the index workers do.
            let (rows, points) = self.rows_and_points(records, now, &current, !deferred)?;
            let ids: Vec<RecordId> = rows.iter().map(|r| r.id).collect();
            // A replayed deferred write cannot tell the versions it wrote:
            // its token waits for whatever is pending for the records then.
            let unknown_token = deferred.then(|| IndexToken::unknown_versions(&ids));
            let idem = key.map(|(key, hash)| {
                keyed(
                    key,
                    hash,
                    &UpsertReport {
                        intent,
                        ids: ids.clone(),
                        inserted: 0,
                        updated: 0,
                        deferred_cleanup: 0,
                        replayed: false,
                        index_token: unknown_token.clone(),
                    },
                )
            });
            let unit = if deferred {
                // One metadata transaction: the rows (new ones on a reserved,
                // unwritten point; existing ones keep theirs) and a pending
                // entry per record. The index workers write the points.
                //
                // The commit creates its own intent (no prepare: nothing is
                // written before it). The intent exists only to settle a lost
                // reply, and it holds no garbage: its lease outlives this
                // call, so a settlement always finds it; once the reply is
                // in, the call resolves it (recovery does if that fails).
                Unit {
                    op: "deferred_upsert",
                    kind: IntentKind::Upsert,
                    parts: vec![CommitPart::Defer { rows, now_ms: now }],
                    points: Vec::new(),
                    step: None,
                    hold: false,
                    saga: None,
                    release_at_ms: Some(now.saturating_add(self.lease_ms())),
                    current_for_bugs: current,
                    create_intent: true,
                }
            } else {
                Unit {
                    op: "upsert",
                    kind: IntentKind::Upsert,
                    parts: vec![CommitPart::Upsert(rows)],
                    points,
                    step: None,
                    hold: false,
                    saga: None,
                    release_at_ms: None,
                    current_for_bugs: current,
                    create_intent: false,
                }
            };
            match self.write_unit(intent, unit, idem, deadline).await? {
                Written::Done(done) => Ok(UpsertReport {
                    intent,
                    ids,
                    inserted: done.summary.inserted,
                    updated: done.summary.updated,
                    deferred_cleanup: done.deferred_cleanup,
                    replayed: false,
                    index_token: unknown_token.map(|unknown| {
                        if done.versions.is_empty() {
                            unknown
                        } else {
                            IndexToken {
                                records: done.versions,
                            }
                        }
                    }),
                }),
                Written::Replay(rec) => replay_upsert(rec),
            }
        }
        .instrument(span)
        .await
    }

    /// Deletes the selected records, all-or-nothing across both stores.
    ///
    /// The delete is decided by the metadata commit (rows and an intent naming
    /// their points, in one transaction); from then on the records are gone for
    /// every reader. Points whose deletion does not finish within the cleanup
    /// deadline are reported in `deferred_cleanup` and deleted by recovery.
    pub async fn delete(&self, selector: DeleteSelector) -> Result<DeleteReport, CoordinatorError> {
        self.delete_with(selector, &WriteOptions::default()).await
    }

    /// [`delete`](Self::delete) with options (an idempotency key).
    pub async fn delete_with(
        &self,
        selector: DeleteSelector,
        opts: &WriteOptions,
    ) -> Result<DeleteReport, CoordinatorError> {
        check_selector(&selector, &self.config.limits)?;
        let deadline = Instant::now() + self.config.call_deadline;
        let key = match &opts.idempotency_key {
            Some(key) => {
                let hash = request_hash("delete", &selector);
                if let Some(rec) = self.lookup_key(key, &hash, deadline).await? {
                    return replay_delete(rec);
                }
                Some((key.clone(), hash))
            }
            None => None,
        };
        let deferred = self.write_mode(opts)? == WriteMode::Deferred;
        let intent = IntentId::new_v7();
        let span = info_span!("tandem.delete", intent = %intent, deferred);
        async {
            let idem = key.map(|(key, hash)| {
                keyed(
                    key,
                    hash,
                    &DeleteReport {
                        intent,
                        deleted: 0,
                        deferred_cleanup: 0,
                        replayed: false,
                    },
                )
            });
            if deferred && self.bug(Bug::DeferredDeleteBeforeCommit) {
                self.delete_points_before_commit_for_bug(&selector, deadline)
                    .await?;
            }
            let unit = Unit {
                op: if deferred {
                    "deferred_delete"
                } else {
                    "delete"
                },
                kind: IntentKind::Delete,
                parts: vec![CommitPart::Delete(selector)],
                points: Vec::new(),
                step: None,
                hold: false,
                saga: None,
                // Deferred: the deleted rows' points are the index workers'
                // to collect (the intent is handed over at commit).
                release_at_ms: deferred.then(|| released_at(self.clock.now_ms())),
                current_for_bugs: HashMap::new(),
                create_intent: false,
            };
            match self.write_unit(intent, unit, idem, deadline).await? {
                Written::Done(done) => Ok(DeleteReport {
                    intent,
                    deleted: done.summary.deleted,
                    deferred_cleanup: done.deferred_cleanup,
                    replayed: false,
                }),
                Written::Replay(rec) => replay_delete(rec),
            }
        }
        .instrument(span)
        .await
    }

    /// The write mode of a call, refused if the store cannot do it.
    pub(super) fn write_mode(&self, opts: &WriteOptions) -> Result<WriteMode, CoordinatorError> {
        let mode = opts.write_mode.unwrap_or(self.config.write_mode);
        if mode == WriteMode::Deferred && !self.repo.deferred_indexing() {
            return Err(CoordinatorError::Config(
                "write mode deferred: this metadata store has no deferred indexing".to_owned(),
            ));
        }
        Ok(mode)
    }

    /// The planted bug `DeferredDeleteBeforeCommit`: deletes the selected
    /// records' points (by id) from the index before the commit.
    async fn delete_points_before_commit_for_bug(
        &self,
        selector: &DeleteSelector,
        deadline: Instant,
    ) -> Result<(), CoordinatorError> {
        let DeleteSelector::Ids(ids) = selector else {
            return Ok(());
        };
        let rows = self
            .metadata_call("metadata.get", deadline, || self.repo.get(ids))
            .await?;
        let points: Vec<PointId> = rows.iter().map(|r| r.point_id).collect();
        let _ = self.delete_points(&points, deadline).await;
        Ok(())
    }

    /// Commits several writes — upserts and deletes, across scopes — and
    /// optionally the caller's own SQL ([`Transaction::with_step`]) as one
    /// all-or-nothing unit: one intent, one index write of every new point,
    /// one metadata transaction.
    ///
    /// Parts apply in the order given (a record deleted by one part and
    /// upserted by a later one ends up upserted); the same id may not be
    /// upserted by two parts. Every part is validated before anything is
    /// written. On `Ok`, every part is committed and visible; on an error
    /// whose [`outcome`](CoordinatorError::outcome) is `NotApplied`, nothing
    /// of it is or will become visible — the caller's statements included.
    pub async fn transact(
        &self,
        tx: Transaction,
        opts: &WriteOptions,
    ) -> Result<TransactionReport, CoordinatorError> {
        self.transact_inner(tx, opts, None).await
    }

    /// A transaction as a saga step runs it: held (its garbage kept and its
    /// rows' undo images recorded, until the saga ends) and fenced by the saga.
    pub(super) async fn transact_inner(
        &self,
        tx: Transaction,
        opts: &WriteOptions,
        saga: Option<SagaFence>,
    ) -> Result<TransactionReport, CoordinatorError> {
        if opts.write_mode == Some(WriteMode::Deferred) {
            // A transaction may carry the caller's step and may be a saga's:
            // it is decided with its points written. (The configured default
            // mode does not apply to transactions.)
            return Err(CoordinatorError::Config(
                "transactions are synchronous: write mode deferred applies to upserts and deletes"
                    .to_owned(),
            ));
        }
        let (parts, step) = tx.into_parts();
        check_transaction(
            &parts,
            self.index().dimension(),
            self.index().distance(),
            &self.config.limits,
        )?;
        if let Some(step) = &step {
            let wanted = step.connection();
            match self.repo.commit_step_connection() {
                Some(have) if have == wanted => {}
                have => {
                    return Err(ValidationError::StepUnsupported {
                        step: wanted.name(),
                        store: have.map(|c| c.name()),
                    }
                    .into());
                }
            }
        }
        let deadline = Instant::now() + self.config.call_deadline;
        let key = match &opts.idempotency_key {
            Some(key) => {
                let hash = request_hash("transaction", &(&parts, step.is_some()));
                if let Some(rec) = self.lookup_key(key, &hash, deadline).await? {
                    return replay_transaction(rec);
                }
                Some((key.clone(), hash))
            }
            None => None,
        };
        let intent = IntentId::new_v7();
        let span = info_span!("tandem.transaction", intent = %intent, parts = parts.len());
        async {
            let now = self.clock.now_ms();
            let mut commit_parts = Vec::with_capacity(parts.len());
            let mut points = Vec::new();
            let mut ids = Vec::with_capacity(parts.len());
            for part in parts {
                match part {
                    WriteOp::Upsert(records) => {
                        let (rows, part_points) =
                            self.rows_and_points(records, now, &HashMap::new(), true)?;
                        ids.push(rows.iter().map(|r| r.id).collect());
                        points.extend(part_points);
                        commit_parts.push(CommitPart::Upsert(rows));
                    }
                    WriteOp::Delete(selector) => {
                        ids.push(Vec::new());
                        commit_parts.push(CommitPart::Delete(selector));
                    }
                }
            }
            let report = TransactionReport::new(intent, ids);
            let idem = key.map(|(key, hash)| keyed(key, hash, &report));
            let unit = Unit {
                op: "transaction",
                kind: IntentKind::Transaction,
                parts: commit_parts,
                points,
                step,
                hold: saga.is_some(),
                saga,
                release_at_ms: None,
                current_for_bugs: HashMap::new(),
                create_intent: false,
            };
            match self.write_unit(intent, unit, idem, deadline).await? {
                Written::Done(done) => Ok(TransactionReport {
                    inserted: done.summary.inserted,
                    updated: done.summary.updated,
                    deleted: done.summary.deleted,
                    deferred_cleanup: done.deferred_cleanup,
                    ..report
                }),
                Written::Replay(rec) => replay_transaction(rec),
            }
        }
        .instrument(span)
        .await
    }

    /// A saga compensation: puts the records a held commit touched back as
    /// its undo images say, under `key`, fenced by the saga. Returns the
    /// records left alone because they changed since.
    pub(super) async fn restore(
        &self,
        images: Vec<UndoImage>,
        key: &str,
        saga: SagaFence,
    ) -> Result<(TransactionReport, Vec<RecordId>), CoordinatorError> {
        let deadline = Instant::now() + self.config.call_deadline;
        let hash = request_hash("restore", &images);
        if let Some(rec) = self.lookup_key(key, &hash, deadline).await? {
            return Ok((replay_transaction(rec)?, Vec::new()));
        }
        let intent = IntentId::new_v7();
        let report = TransactionReport::new(intent, Vec::new());
        let idem = keyed(key.to_owned(), hash, &report);
        let unit = Unit {
            op: "restore",
            kind: IntentKind::Transaction,
            parts: vec![CommitPart::Restore(images)],
            points: Vec::new(),
            step: None,
            hold: false,
            saga: Some(saga),
            release_at_ms: None,
            current_for_bugs: HashMap::new(),
            create_intent: false,
        };
        let span = info_span!("tandem.restore", intent = %intent);
        match self
            .write_unit(intent, unit, Some(idem), deadline)
            .instrument(span)
            .await?
        {
            Written::Done(done) => Ok((
                TransactionReport {
                    inserted: done.summary.inserted,
                    updated: done.summary.updated,
                    deleted: done.summary.deleted,
                    deferred_cleanup: done.deferred_cleanup,
                    ..report
                },
                done.conflicts,
            )),
            Written::Replay(rec) => Ok((replay_transaction(rec)?, Vec::new())),
        }
    }

    /// The current point of each record of the batch, for the planted bugs
    /// that act on it before the commit; empty otherwise.
    async fn current_points_for_bugs(
        &self,
        records: &[NewRecord],
        deadline: Instant,
    ) -> Result<HashMap<RecordId, PointId>, CoordinatorError> {
        if !(self.bug(Bug::OverwritePointInPlace) || self.bug(Bug::DeleteOldPointsBeforeCommit)) {
            return Ok(HashMap::new());
        }
        let ids: Vec<RecordId> = records.iter().filter_map(|r| r.id).collect();
        Ok(self
            .metadata_call("metadata.get", deadline, || self.repo.get(&ids))
            .await?
            .into_iter()
            .map(|r| (r.id, r.point_id))
            .collect())
    }

    /// Decides every record's id (a UUIDv7 when absent) and a fresh point id
    /// (copy-on-write), and builds the rows to write and, `with_points`, the
    /// points.
    fn rows_and_points(
        &self,
        records: Vec<NewRecord>,
        now: i64,
        current: &HashMap<RecordId, PointId>,
        with_points: bool,
    ) -> Result<(Vec<RowWrite>, Vec<Point>), CoordinatorError> {
        let mut rows = Vec::with_capacity(records.len());
        let mut points = Vec::with_capacity(if with_points { records.len() } else { 0 });
        for (index, r) in records.into_iter().enumerate() {
            let id = r.id.unwrap_or_else(RecordId::new_v7);
            let Value::Object(metadata) = r.metadata else {
                return Err(ValidationError::MetadataNotObject {
                    index,
                    found: "a non-object",
                }
                .into());
            };
            // Copy-on-write: every version of a record gets a fresh point id.
            let point_id = match current.get(&id) {
                Some(p) if self.bug(Bug::OverwritePointInPlace) => *p,
                _ => PointId::new_v7(),
            };
            if with_points {
                points.push(Point {
                    id: point_id,
                    record_id: id,
                    scope: r.scope.clone(),
                    metadata: metadata.clone(),
                    vector: r.vector.clone(),
                    written_at_ms: now,
                });
            }
            rows.push(RowWrite {
                id,
                scope: r.scope,
                content: r.content,
                metadata,
                point_id,
                vector: r.vector,
            });
        }
        Ok((rows, points))
    }

    /// The protocol, for every kind of write: prepare (an intent naming every
    /// new point) → index write → commit (fenced; overlapped with the index
    /// write when configured) → cleanup → resolve; compensation of a write
    /// that will not commit, settlement of a commit whose outcome is unknown.
    /// A held unit (a saga step) skips the cleanup: its garbage is kept until
    /// the saga ends.
    pub(super) async fn write_unit(
        &self,
        intent_id: IntentId,
        unit: Unit,
        idem: Option<IdempotencyRecord>,
        deadline: Instant,
    ) -> Result<Written, CoordinatorError> {
        let now = self.clock.now_ms();
        let owner = OwnerToken::new_random();
        let op = unit.op;
        let new_points: Vec<PointId> = unit.points.iter().map(|p| p.id).collect();
        let intent = NewIntent {
            id: intent_id,
            kind: unit.kind,
            owner,
            lease_deadline_ms: now.saturating_add(self.lease_ms()),
            point_ids: new_points.clone(),
            created_ms: now,
            generation: self.generation(),
        };
        let writes_index = !unit.points.is_empty();
        let early_bug = writes_index
            && self.bug(Bug::IndexWriteBeforeIntent)
            && unit.kind == IntentKind::Upsert;

        // 1. Prepare: name every point before any is written. (A delete's
        // intent names none yet: it exists so that a lost commit reply can be
        // settled by locking it.)
        // A unit that creates its intent in its commit has nothing to name
        // before it.
        let created = unit.create_intent.then_some(&intent);
        if !early_bug && created.is_none() {
            self.prepare(&intent, deadline, op).await?;
        }

        // 2 and 3. Index write, then the commit, fenced by the owner token.
        let overlap = writes_index
            && self.config.overlap_index_write
            && !early_bug
            && !self.bug(Bug::DeleteOldPointsBeforeCommit);
        let started = Instant::now();
        // The decision (with whether a write request may still land), or why
        // the index write failed (with the commit's decision when it ran
        // alongside).
        let outcome: Result<(Decision, Landing), (WriteFailed, Option<Decision>)> = if !writes_index
        {
            let decision = self
                .commit(
                    intent_id,
                    owner,
                    deadline,
                    commit_request(&unit, created, idem.as_ref(), None),
                )
                .await;
            record_phase(op, "commit", started);
            Ok((decision, Landing::Settled))
        } else if overlap {
            // The commit's statements run while the points are written; it
            // becomes durable only once the gate says the write succeeded, so
            // no row is ever committed before its point exists.
            let (opener, gate) = IndexGate::pending();
            let write = async {
                let written = self.write_points(&unit.points, deadline).await;
                record_phase(op, "index_write", started);
                let written = self
                    .guard_late_landing(written, &new_points, deadline, op)
                    .await;
                opener.decide(written.is_ok());
                written
            };
            let commit = async {
                let started = Instant::now();
                let decision = self
                    .commit(
                        intent_id,
                        owner,
                        deadline,
                        commit_request(&unit, created, idem.as_ref(), Some(&gate)),
                    )
                    .await;
                record_phase(op, "commit", started);
                decision
            };
            // Both run to the end: a failed commit never leaves a chunk in
            // flight behind it, and a failed write is seen by the commit.
            match tokio::join!(write, commit) {
                (Ok(landing), decision) => Ok((decision, landing)),
                (Err(failed), decision) => Err((failed, Some(decision))),
            }
        } else {
            let written = self.write_points(&unit.points, deadline).await;
            record_phase(op, "index_write", started);
            match self
                .guard_late_landing(written, &new_points, deadline, op)
                .await
            {
                Err(failed) => Err((failed, None)),
                Ok(landing) => {
                    if early_bug {
                        self.prepare(&intent, deadline, op).await?;
                    }
                    if self.bug(Bug::DeleteOldPointsBeforeCommit) {
                        let old: Vec<PointId> = unit.current_for_bugs.values().copied().collect();
                        let _ = self.delete_points(&old, deadline).await;
                    }
                    let started = Instant::now();
                    let decision = self
                        .commit(
                            intent_id,
                            owner,
                            deadline,
                            commit_request(&unit, created, idem.as_ref(), None),
                        )
                        .await;
                    record_phase(op, "commit", started);
                    Ok((decision, landing))
                }
            }
        };

        let (decision, landing) = match outcome {
            Ok(decided) => decided,
            Err((failed, decision)) => {
                // The commit, if it started, waited for the write and was abandoned
                // (a failed gate never lets `COMMIT` through, on any attempt):
                // undo the write under whichever token owns the intent now.
                let owner = match decision {
                    None => Some(owner),
                    Some(Decision::NotApplied { owner, .. }) => Some(owner),
                    // Recovery owns the intent, or nobody can tell who does: it is
                    // left to recovery.
                    Some(Decision::Fenced | Decision::Unknown(_)) => None,
                    Some(Decision::Committed { .. }) => {
                        // Only a store that ignores the gate gets here: its rows
                        // are committed, so the call must not report "not
                        // applied", and nothing may be compensated.
                        error!("the metadata store committed although the index write failed");
                        return Err(CoordinatorError::OutcomeUnknown {
                            intent: intent_id,
                            source: Box::new(failed.error),
                        });
                    }
                };
                if let Some(owner) = owner {
                    let keep = if self.bug(Bug::ResolveAfterUncertainWrite) {
                        failed.abandoned
                    } else {
                        failed.landing == Landing::InDoubt
                    };
                    self.compensate(intent_id, owner, &new_points, keep, op)
                        .await;
                }
                return Err(failed.error);
            }
        };

        match decision {
            Decision::Committed {
                summary,
                garbage,
                owner,
                conflicts,
                versions,
            } => {
                metrics::counter!("tandem_commits_total", "op" => op).increment(1);
                info!(
                    inserted = summary.inserted,
                    updated = summary.updated,
                    deleted = summary.deleted,
                    "committed"
                );
                if unit.release_at_ms.is_some() {
                    // A deferred write: the commit handed the intent (and
                    // its garbage) to the index workers' recovery pass.
                    //
                    // A deferred upsert's intent names no point: it is spent
                    // (`Intent::is_spent`) and only settles a lost commit
                    // reply. It is not resolved here: a resolve of its own
                    // would be a second transaction (a WAL flush) in every
                    // call, a quarter of a 100-record call's time. Recovery
                    // resolves spent intents after their lease, a batch at
                    // a time (one claim and one `resolve_many`).
                    return Ok(Written::Done(Done {
                        summary,
                        deferred_cleanup: garbage.len(),
                        conflicts,
                        garbage,
                        versions,
                    }));
                }
                if unit.hold {
                    // A saga step: its garbage (superseded and deleted rows'
                    // points) stays until the saga ends, so that a
                    // compensation can put the rows back on them.
                    info!(garbage = garbage.len(), "held for the saga");
                    if self.bug(Bug::CollectHeldGarbage) {
                        let deadline = Instant::now() + self.config.cleanup_deadline;
                        let _ = self.delete_points(&garbage, deadline).await;
                    }
                    return Ok(Written::Done(Done {
                        summary,
                        deferred_cleanup: 0,
                        conflicts,
                        garbage,
                        versions,
                    }));
                }
                // 4. Cleanup: the write is decided; failures here are recovery's.
                let deferred = self.cleanup(op, intent_id, owner, &garbage).await;
                if deferred == 0 {
                    info!("both stores in sync");
                }
                Ok(Written::Done(Done {
                    summary,
                    deferred_cleanup: deferred,
                    conflicts,
                    garbage,
                    versions,
                }))
            }
            Decision::NotApplied {
                error,
                owner,
                key_taken,
            } => {
                let keep =
                    landing == Landing::InDoubt && !self.bug(Bug::ResolveAfterUncertainWrite);
                self.compensate(intent_id, owner, &new_points, keep, op)
                    .await;
                if key_taken {
                    return self.replay_after_race(idem.as_ref(), error).await;
                }
                Err(error)
            }
            Decision::Fenced => {
                warn!("intent was taken over by recovery; not applied");
                metrics::counter!("tandem_rollbacks_total", "op" => op).increment(1);
                Err(CoordinatorError::Fenced(intent_id))
            }
            Decision::Unknown(e) => Err(e),
        }
    }

    /// Looks an idempotency key up: `Some` to replay, an error if the key was
    /// used for another request.
    async fn lookup_key(
        &self,
        key: &str,
        hash: &str,
        deadline: Instant,
    ) -> Result<Option<IdempotencyRecord>, CoordinatorError> {
        let found = self
            .metadata_call("metadata.lookup_idempotency", deadline, || {
                self.repo.lookup_idempotency(key)
            })
            .await?;
        match found {
            Some(rec) if rec.request_hash != hash => Err(CoordinatorError::IdempotencyKeyReused {
                key: key.to_owned(),
            }),
            other => Ok(other),
        }
    }

    /// A concurrent call with the same key committed first: answer with its
    /// outcome (same request) or reject (different request).
    async fn replay_after_race(
        &self,
        idem: Option<&IdempotencyRecord>,
        error: CoordinatorError,
    ) -> Result<Written, CoordinatorError> {
        let Some(idem) = idem else { return Err(error) };
        let deadline = Instant::now() + self.config.cleanup_deadline;
        match self
            .lookup_key(&idem.key, &idem.request_hash, deadline)
            .await?
        {
            Some(rec) => Ok(Written::Replay(rec)),
            None => Err(error),
        }
    }

    async fn prepare(
        &self,
        intent: &NewIntent,
        deadline: Instant,
        op: &'static str,
    ) -> Result<(), CoordinatorError> {
        let started = Instant::now();
        let mut moved = intent.clone();
        let result = loop {
            let result = with_retry(
                &self.config.retry,
                deadline,
                "metadata.prepare",
                Idempotence::Idempotent,
                || self.repo.prepare(&moved),
            )
            .await;
            // A re-index switched the active collection (or is switching):
            // nothing was written. Learn the new one and prepare under it
            // (the index writes that follow use it), waiting out a switch.
            let Err(Failed::Port(MetadataError::IndexMoved { switching, .. })) = &result else {
                break result;
            };
            if *switching {
                let pause = std::time::Duration::from_millis(20);
                if Instant::now() + pause >= deadline {
                    break result;
                }
                tokio::time::sleep(pause).await;
            }
            if let Err(e) = self.refresh_index().await {
                warn!(error = %e, "could not read the active collection after a switch");
                break result;
            }
            moved.generation = self.generation();
            moved.created_ms = self.clock.now_ms();
        };
        record_phase(op, "prepare", started);
        if let Err(failure) = result {
            // No point was written. The intent may exist (lost reply): it names
            // points that are not in the index, so resolving it is all there is.
            if failure.outcome() == Outcome::Unknown {
                self.resolve_best_effort(intent.id, intent.owner).await;
            }
            return Err(metadata_failure(failure, self.config.call_deadline));
        }
        Ok(())
    }

    /// The commit step, with retries of failures that certainly did not apply,
    /// and settlement of ambiguous ones.
    async fn commit(
        &self,
        intent: IntentId,
        mut owner: OwnerToken,
        deadline: Instant,
        request: CommitRequest<'_>,
    ) -> Decision {
        let policy = &self.config.retry;
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let failure =
                match tokio::time::timeout_at(deadline, self.commit_once(intent, owner, &request))
                    .await
                {
                    Ok(Ok(done)) => {
                        return Decision::Committed {
                            summary: done.summary,
                            garbage: done.garbage,
                            owner,
                            conflicts: done.conflicts,
                            versions: done.versions,
                        };
                    }
                    Ok(Err(e)) => Failed::Port(e),
                    Err(_) => Failed::Deadline,
                };
            match failure {
                Failed::Port(MetadataError::Fenced { .. }) => return Decision::Fenced,
                Failed::Port(MetadataError::SagaFenced { saga }) => {
                    // The saga was taken over (recovery, an abort): its step
                    // must not apply. The intent is still ours to undo.
                    return Decision::NotApplied {
                        error: CoordinatorError::SagaFenced(saga),
                        owner,
                        key_taken: false,
                    };
                }
                Failed::Port(MetadataError::StepFailed { source }) => {
                    return Decision::NotApplied {
                        error: CoordinatorError::StepFailed { source },
                        owner,
                        key_taken: false,
                    };
                }
                Failed::Port(e @ MetadataError::IdempotencyKeyTaken { .. }) => {
                    return Decision::NotApplied {
                        error: CoordinatorError::Metadata(e),
                        owner,
                        key_taken: true,
                    };
                }
                Failed::Port(e) if e.outcome() == Outcome::NotApplied => {
                    if e.is_retryable() && attempt < policy.max_attempts {
                        let delay = policy.backoff(attempt, None);
                        if Instant::now() + delay < deadline {
                            warn!(error = %e, attempt, "commit failed before applying; retrying");
                            metrics::counter!("tandem_retries_total", "call" => "metadata.commit")
                                .increment(1);
                            tokio::time::sleep(delay).await;
                            continue;
                        }
                    }
                    return Decision::NotApplied {
                        error: CoordinatorError::Metadata(e),
                        owner,
                        key_taken: false,
                    };
                }
                ambiguous => {
                    let cause = metadata_failure(ambiguous, self.config.call_deadline);
                    if self.bug(Bug::CompensateOnUnknown) {
                        return Decision::NotApplied {
                            error: cause,
                            owner,
                            key_taken: false,
                        };
                    }
                    warn!(error = %cause, "commit outcome unknown; settling");
                    match self.settle(intent, owner, request.created()).await {
                        Ok(Settled::Committed {
                            summary,
                            garbage,
                            owner,
                        }) => {
                            metrics::counter!("tandem_ambiguous_commits_total", "settled" => "committed").increment(1);
                            info!("ambiguous commit settled: it happened");
                            return Decision::Committed {
                                summary,
                                garbage,
                                owner,
                                conflicts: Vec::new(),
                                versions: Vec::new(),
                            };
                        }
                        Ok(Settled::NotCommitted { fence }) => {
                            metrics::counter!("tandem_ambiguous_commits_total", "settled" => "not_committed").increment(1);
                            info!("ambiguous commit settled: it did not happen");
                            // The intent is ours again under the fence token, so
                            // the commit can safely be tried again.
                            owner = fence;
                            if attempt < policy.max_attempts && Instant::now() < deadline {
                                metrics::counter!("tandem_retries_total", "call" => "metadata.commit")
                                    .increment(1);
                                continue;
                            }
                            return Decision::NotApplied {
                                error: cause,
                                owner,
                                key_taken: false,
                            };
                        }
                        Ok(Settled::Fenced) => {
                            // Not committed, like the arm above; recovery owns the intent now.
                            metrics::counter!("tandem_ambiguous_commits_total", "settled" => "not_committed").increment(1);
                            return Decision::Fenced;
                        }
                        Err(e) => {
                            metrics::counter!("tandem_ambiguous_commits_total", "settled" => "unknown").increment(1);
                            return Decision::Unknown(CoordinatorError::OutcomeUnknown {
                                intent,
                                source: Box::new(e),
                            });
                        }
                    }
                }
            }
        }
    }

    /// One attempt at the commit transaction.
    async fn commit_once(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        request: &CommitRequest<'_>,
    ) -> Result<TransactionCommitResult, MetadataError> {
        let plain = |summary, garbage| TransactionCommitResult {
            summary,
            garbage,
            conflicts: Vec::new(),
            versions: Vec::new(),
        };
        match request {
            CommitRequest::Upsert {
                rows,
                idempotency,
                gate: None,
            } => self
                .repo
                .commit_upsert(intent, owner, rows, *idempotency)
                .await
                .map(|c| plain(c.summary, c.old_point_ids)),
            CommitRequest::Upsert {
                rows,
                idempotency,
                gate: Some(gate),
            } => self
                .repo
                .commit_upsert_gated(intent, owner, rows, *idempotency, gate)
                .await
                .map(|c| plain(c.summary, c.old_point_ids)),
            CommitRequest::Delete {
                selector,
                idempotency,
            } => self
                .repo
                .commit_delete(intent, owner, selector, *idempotency)
                .await
                .map(|c| plain(c.summary, c.point_ids)),
            CommitRequest::Transaction {
                commit,
                idempotency,
                gate,
            } => match gate {
                Some(gate) => {
                    self.repo
                        .commit_transaction(intent, owner, commit, *idempotency, gate)
                        .await
                }
                None => {
                    self.repo
                        .commit_transaction(
                            intent,
                            owner,
                            commit,
                            *idempotency,
                            &IndexGate::passed(),
                        )
                        .await
                }
            },
        }
    }

    /// Learns whether a commit whose reply was lost happened.
    async fn settle(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        created: Option<&NewIntent>,
    ) -> Result<Settled, CoordinatorError> {
        let fence = OwnerToken::new_random();
        let deadline = Instant::now() + self.config.cleanup_deadline;
        let settlement = match created {
            // The commit creates the intent: settling inserts it (fenced)
            // if the commit has not.
            Some(created) => {
                with_retry(
                    &self.config.retry,
                    deadline,
                    "metadata.settle_unprepared",
                    Idempotence::Idempotent,
                    || self.repo.settle_unprepared(created, owner, fence),
                )
                .await
            }
            None => {
                with_retry(
                    &self.config.retry,
                    deadline,
                    "metadata.settle",
                    Idempotence::Idempotent,
                    || self.repo.settle(intent, owner, fence),
                )
                .await
            }
        }
        .map_err(|f| metadata_failure(f, self.config.cleanup_deadline))?;
        Ok(match settlement {
            Settlement::Committed(i) => Settled::Committed {
                summary: i.summary.unwrap_or_default(),
                garbage: i.point_ids,
                owner: i.owner,
            },
            Settlement::NotCommitted(i) if i.owner == fence => Settled::NotCommitted { fence },
            Settlement::NotCommitted(_) => Settled::Fenced,
            // Leases outlive calls, so nobody else can have resolved the intent
            // yet: a missing intent means we cannot tell.
            Settlement::Missing => {
                return Err(CoordinatorError::Metadata(MetadataError::permanent(
                    format!("intent {intent} vanished before its outcome was settled"),
                )));
            }
        })
    }

    /// Writes points in ⌈n/chunk⌉ calls, `index_parallelism` at a time. Waits
    /// for every chunk before reporting a failure, so that compensation never
    /// races a chunk still being written by this process. Also tells whether a
    /// request may still land after this returns: any attempt that ended with
    /// an unknown outcome (a lost reply, a timeout, an error from a proxy that
    /// may still deliver it) or was cut by the deadline.
    async fn write_points(
        &self,
        points: &[Point],
        deadline: Instant,
    ) -> (Result<(), Failed<IndexError>>, Landing) {
        let doubt = AtomicBool::new(false);
        let doubt_ref = &doubt;
        let index = self.index();
        let index = &index;
        // The futures are built eagerly (not in a stream's closure) so that the
        // operation's future stays `Send` for every lifetime.
        let calls: Vec<_> = points
            .chunks(self.config.limits.index_chunk)
            .map(|c| {
                with_retry(
                    &self.config.retry,
                    deadline,
                    "index.upsert",
                    Idempotence::Idempotent,
                    move || {
                        let attempt = index.upsert(c);
                        async move {
                            let result = attempt.await;
                            if result
                                .as_ref()
                                .is_err_and(|e| e.outcome() == Outcome::Unknown)
                            {
                                doubt_ref.store(true, AtomicOrdering::Relaxed);
                            }
                            result
                        }
                    },
                )
            })
            .collect();
        let results: Vec<Result<(), Failed<IndexError>>> = futures::stream::iter(calls)
            .buffer_unordered(self.config.limits.index_parallelism)
            .collect()
            .await;
        let result = first_failure(results);
        let in_doubt =
            doubt.load(AtomicOrdering::Relaxed) || result.as_ref().is_err_and(Failed::abandoned);
        let landing = if in_doubt {
            Landing::InDoubt
        } else {
            Landing::Settled
        };
        (result, landing)
    }

    /// After the index write: if a request of it may still land, names the
    /// new points in a *guard* intent before the commit, so that a late
    /// landing of a point that is superseded or deleted in the meantime is
    /// still garbage some intent names (recovery collects it after the
    /// guard's lease). A guard that cannot be recorded fails the write.
    async fn guard_late_landing(
        &self,
        written: (Result<(), Failed<IndexError>>, Landing),
        new_points: &[PointId],
        deadline: Instant,
        op: &'static str,
    ) -> Result<Landing, WriteFailed> {
        let (result, landing) = written;
        if let Err(failure) = result {
            return Err(WriteFailed {
                abandoned: failure.abandoned(),
                error: index_failure(failure, self.config.call_deadline),
                landing,
            });
        }
        if landing == Landing::Settled || self.bug(Bug::NoLateWriteGuard) {
            return Ok(landing);
        }
        let now = self.clock.now_ms();
        let guard = NewIntent {
            id: IntentId::new_v7(),
            kind: IntentKind::Upsert,
            owner: OwnerToken::new_random(),
            lease_deadline_ms: now.saturating_add(self.lease_ms()),
            point_ids: new_points.to_vec(),
            created_ms: now,
            generation: self.generation(),
        };
        warn!(guard = %guard.id, "an index write request may still land; guarding its points until the lease ends");
        metrics::counter!("tandem_late_write_guards_total").increment(1);
        self.prepare(&guard, deadline, op)
            .await
            .map_err(|error| WriteFailed {
                error,
                abandoned: false,
                landing,
            })?;
        Ok(landing)
    }

    /// Deletes points in chunks (idempotent, retried).
    pub(super) async fn delete_points(
        &self,
        ids: &[PointId],
        deadline: Instant,
    ) -> Result<(), Failed<IndexError>> {
        if ids.is_empty() {
            return Ok(());
        }
        let index = self.index();
        let index = &index;
        let calls: Vec<_> = ids
            .chunks(self.config.limits.index_chunk)
            .map(|c| {
                with_retry(
                    &self.config.retry,
                    deadline,
                    "index.delete",
                    Idempotence::Idempotent,
                    move || index.delete(c),
                )
            })
            .collect();
        let results: Vec<Result<(), Failed<IndexError>>> = futures::stream::iter(calls)
            .buffer_unordered(self.config.limits.index_parallelism)
            .collect()
            .await;
        first_failure(results)
    }

    /// Undoes the index write of a call that will not commit. The intent is
    /// resolved only when every new point is known deleted and no write request
    /// of this call can still land (`keep_intent` false); otherwise recovery
    /// finishes the job after the lease, when nothing can land any more.
    async fn compensate(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        new_points: &[PointId],
        keep_intent: bool,
        op: &'static str,
    ) {
        warn!("rolling back");
        metrics::counter!("tandem_rollbacks_total", "op" => op).increment(1);
        if new_points.is_empty() {
            // Nothing was written to the index (a delete): the intent is all
            // there is to undo.
            self.resolve_best_effort(intent, owner).await;
            return;
        }
        let deadline = Instant::now() + self.config.cleanup_deadline;
        match self.delete_points(new_points, deadline).await {
            Ok(()) => {
                metrics::counter!("tandem_compensations_total").increment(1);
                info!(
                    points = new_points.len(),
                    "cleaned up index points after rollback"
                );
                if keep_intent {
                    warn!("an index write request may still land; the intent is left to recovery");
                } else {
                    self.resolve_best_effort(intent, owner).await;
                }
            }
            Err(_) => {
                warn!("compensation failed; the intent is left to recovery");
            }
        }
    }

    /// Deletes the points a commit made garbage, then resolves the intent.
    /// Returns how many points were left to recovery. Timed as `op`'s cleanup.
    async fn cleanup(
        &self,
        op: &'static str,
        intent: IntentId,
        owner: OwnerToken,
        garbage: &[PointId],
    ) -> usize {
        let started = Instant::now();
        let deadline = started + self.config.cleanup_deadline;
        if self.bug(Bug::ResolveBeforeCleanup) {
            self.resolve_best_effort(intent, owner).await;
        }
        if let Err(f) = self.delete_points(garbage, deadline).await {
            let e = index_failure(f, self.config.cleanup_deadline);
            warn!(error = %e, points = garbage.len(), "cleanup deferred to recovery");
            metrics::counter!("tandem_deferred_cleanup_points_total")
                .increment(garbage.len() as u64);
            record_phase(op, "cleanup", started);
            return garbage.len();
        }
        self.resolve_best_effort(intent, owner).await;
        record_phase(op, "cleanup", started);
        0
    }

    pub(super) async fn resolve_best_effort(&self, intent: IntentId, owner: OwnerToken) {
        let deadline = Instant::now() + self.config.cleanup_deadline;
        if let Err(f) = with_retry(
            &self.config.retry,
            deadline,
            "metadata.resolve",
            Idempotence::Idempotent,
            || self.repo.resolve(intent, owner),
        )
        .await
        {
            let e = metadata_failure(f, self.config.cleanup_deadline);
            warn!(error = %e, "could not resolve the intent; recovery will");
        }
    }
}

/// The lease a deferred write's intent gets at its commit: already ended
/// (recovery claims intents whose lease ended *before* its now), so that the
/// next recovery pass collects it even within the same millisecond. Nobody
/// else acts on the intent after its commit: the caller does no cleanup.
fn released_at(now_ms: i64) -> i64 {
    now_ms.saturating_sub(1)
}

/// Which port method commits `unit`: a plain upsert or delete keeps its own
/// (so that every store, and every existing fault case, sees the same
/// calls); anything else is a [`MetadataRepo::commit_transaction`].
fn commit_request<'a>(
    unit: &'a Unit,
    created: Option<&'a NewIntent>,
    idempotency: Option<&'a IdempotencyRecord>,
    gate: Option<&'a IndexGate>,
) -> CommitRequest<'a> {
    match (
        &unit.parts[..],
        &unit.step,
        unit.hold,
        unit.saga,
        unit.release_at_ms,
    ) {
        _ if created.is_some() => CommitRequest::Transaction {
            commit: TransactionCommit {
                parts: &unit.parts,
                step: unit.step.clone(),
                hold: unit.hold,
                saga: unit.saga,
                release_at_ms: unit.release_at_ms,
                create_intent: created,
            },
            idempotency,
            gate,
        },
        ([CommitPart::Upsert(rows)], None, false, None, None) => CommitRequest::Upsert {
            rows,
            idempotency,
            gate,
        },
        ([CommitPart::Delete(selector)], None, false, None, None) => CommitRequest::Delete {
            selector,
            idempotency,
        },
        (parts, step, hold, saga, release_at_ms) => CommitRequest::Transaction {
            commit: TransactionCommit {
                parts,
                step: step.clone(),
                hold,
                saga,
                release_at_ms,
                create_intent: None,
            },
            idempotency,
            gate,
        },
    }
}

/// A write of any kind, ready for the protocol ([`Coordinator::write_unit`]).
pub(super) struct Unit {
    /// The operation's name in metrics and logs (`upsert`, `delete`,
    /// `transaction`, `restore`).
    pub(super) op: &'static str,
    /// The intent's kind.
    pub(super) kind: IntentKind,
    /// What the commit writes, in order (point ids decided).
    pub(super) parts: Vec<CommitPart>,
    /// The new points to write to the index before the commit.
    pub(super) points: Vec<Point>,
    /// The caller's own statements, in the commit's transaction.
    pub(super) step: Option<Arc<dyn CommitStep>>,
    /// A saga step: keep the garbage and the undo images until the saga ends.
    pub(super) hold: bool,
    /// Commit only while the saga is still this driver's.
    pub(super) saga: Option<SagaFence>,
    /// A deferred write: the commit hands the intent over at this time
    /// (its garbage is the index workers'), and the call does no cleanup.
    pub(super) release_at_ms: Option<i64>,
    /// The current points of the records, read only for the planted bugs.
    pub(super) current_for_bugs: HashMap<RecordId, PointId>,
    /// The commit creates the intent (no prepare): only for a unit that
    /// writes no point and hands its intent over
    /// ([`TransactionCommit::create_intent`]).
    pub(super) create_intent: bool,
}

/// How a write ended for its caller.
pub(super) enum Written {
    /// It committed now.
    Done(Done),
    /// A concurrent call with the same idempotency key committed first:
    /// answer with its recorded outcome.
    Replay(IdempotencyRecord),
}

/// What a committed write decided.
pub(super) struct Done {
    pub(super) summary: CommitSummary,
    /// Points left to recovery.
    pub(super) deferred_cleanup: usize,
    /// Records a restore left alone.
    pub(super) conflicts: Vec<RecordId>,
    /// The points the commit made garbage.
    pub(super) garbage: Vec<PointId>,
    /// The version each deferred row got (empty when settled).
    pub(super) versions: Vec<(RecordId, u64)>,
}

/// What a commit writes.
enum CommitRequest<'a> {
    Upsert {
        rows: &'a [RowWrite],
        idempotency: Option<&'a IdempotencyRecord>,
        /// Set when the commit overlaps the index write it must follow.
        gate: Option<&'a IndexGate>,
    },
    Delete {
        selector: &'a DeleteSelector,
        idempotency: Option<&'a IdempotencyRecord>,
    },
    /// Several parts, a caller step, or a saga step's commit.
    Transaction {
        commit: TransactionCommit<'a>,
        idempotency: Option<&'a IdempotencyRecord>,
        /// Set when the commit overlaps the index write it must follow.
        gate: Option<&'a IndexGate>,
    },
}

impl CommitRequest<'_> {
    /// The intent the commit creates, if it creates one.
    fn created(&self) -> Option<&NewIntent> {
        match self {
            Self::Transaction { commit, .. } => commit.create_intent,
            _ => None,
        }
    }
}

/// Whether a request of an index write may still land after the write
/// returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Landing {
    /// Every request's outcome is known: nothing of it is still on its way.
    Settled,
    /// Some attempt's outcome is unknown (or the deadline cut it): it may be
    /// applied later, until the lease ends.
    InDoubt,
}

/// Why an upsert's index write (or its guard) failed.
struct WriteFailed {
    /// What the caller is told.
    error: CoordinatorError,
    /// The deadline cut a request in flight.
    abandoned: bool,
    /// Whether a request may still land.
    landing: Landing,
}

/// The outcome of a settlement, as the commit loop needs it.
enum Settled {
    Committed {
        summary: CommitSummary,
        garbage: Vec<PointId>,
        owner: OwnerToken,
    },
    NotCommitted {
        fence: OwnerToken,
    },
    Fenced,
}

fn first_failure<E>(results: Vec<Result<(), Failed<E>>>) -> Result<(), Failed<E>> {
    // An abandoned call matters most: it decides whether the intent may be resolved.
    let mut first = None;
    for r in results {
        match r {
            Ok(()) => {}
            Err(Failed::Deadline) => return Err(Failed::Deadline),
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    match first {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

pub(super) fn metadata_failure(
    f: Failed<MetadataError>,
    budget: std::time::Duration,
) -> CoordinatorError {
    match f {
        Failed::Port(e) => CoordinatorError::Metadata(e),
        Failed::Deadline => CoordinatorError::DeadlineExceeded(budget),
    }
}

pub(super) fn index_failure(
    f: Failed<IndexError>,
    budget: std::time::Duration,
) -> CoordinatorError {
    match f {
        Failed::Port(e) => CoordinatorError::Index(e),
        Failed::Deadline => CoordinatorError::DeadlineExceeded(budget),
    }
}

/// The idempotency record a keyed write commits with: the answer to replay
/// (counts are filled from the commit's own summary on replay).
fn keyed<R: serde::Serialize>(key: String, request_hash: String, answer: &R) -> IdempotencyRecord {
    IdempotencyRecord {
        key,
        request_hash,
        outcome: serde_json::to_value(answer).unwrap_or(Value::Null),
        summary: CommitSummary::default(),
    }
}

fn replay_upsert(rec: IdempotencyRecord) -> Result<UpsertReport, CoordinatorError> {
    let mut report: UpsertReport = serde_json::from_value(rec.outcome).map_err(|e| {
        CoordinatorError::Config(format!(
            "stored outcome of key {:?} is unreadable: {e}",
            rec.key
        ))
    })?;
    report.inserted = rec.summary.inserted;
    report.updated = rec.summary.updated;
    report.deferred_cleanup = 0;
    report.replayed = true;
    Ok(report)
}

pub(super) fn replay_transaction(
    rec: IdempotencyRecord,
) -> Result<TransactionReport, CoordinatorError> {
    let mut report: TransactionReport = serde_json::from_value(rec.outcome).map_err(|e| {
        CoordinatorError::Config(format!(
            "stored outcome of key {:?} is unreadable: {e}",
            rec.key
        ))
    })?;
    report.inserted = rec.summary.inserted;
    report.updated = rec.summary.updated;
    report.deleted = rec.summary.deleted;
    report.deferred_cleanup = 0;
    report.replayed = true;
    Ok(report)
}

fn replay_delete(rec: IdempotencyRecord) -> Result<DeleteReport, CoordinatorError> {
    let mut report: DeleteReport = serde_json::from_value(rec.outcome).map_err(|e| {
        CoordinatorError::Config(format!(
            "stored outcome of key {:?} is unreadable: {e}",
            rec.key
        ))
    })?;
    report.deleted = rec.summary.deleted;
    report.deferred_cleanup = 0;
    report.replayed = true;
    Ok(report)
}
