//! The write path: upsert and delete.
//!
//! prepare (intent) → index write → commit (fenced) → cleanup (old points) →
//! resolve. Any failure before the commit compensates; an ambiguous commit is
//! settled before anything else happens. An upsert's commit may start while its
//! index write is in flight ([`IndexGate`]): it becomes durable only after the
//! write succeeded.

use std::collections::HashMap;

use futures::StreamExt;
use serde_json::Value;
use tokio::time::Instant;
use tracing::{Instrument, error, info, info_span, warn};

use super::retry::{Failed, Idempotence, with_retry};
use super::validate::{check_batch, check_selector, request_hash};
use super::{Bug, Coordinator, DeleteReport, UpsertReport, WriteOptions};
use crate::error::{CoordinatorError, IndexError, MetadataError, Outcome, ValidationError};
use crate::model::{
    CommitSummary, DeleteSelector, IdempotencyRecord, IntentId, IntentKind, NewIntent, NewRecord,
    OwnerToken, Point, PointId, RecordId, RowWrite, Settlement,
};
use crate::ports::{IndexGate, MetadataRepo, VectorIndex};

/// How the commit step ended.
enum Decision {
    /// The metadata commit happened. `garbage` lists the points it superseded
    /// (upsert) or orphaned (delete); `owner` is the token that owns the intent.
    Committed {
        summary: CommitSummary,
        garbage: Vec<PointId>,
        owner: OwnerToken,
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
            self.index.dimension(),
            self.index.distance(),
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
        let intent = IntentId::new_v7();
        let span = info_span!("tandem.upsert", intent = %intent, batch = records.len());
        self.upsert_inner(intent, records, key, deadline)
            .instrument(span)
            .await
    }

    async fn upsert_inner(
        &self,
        intent_id: IntentId,
        records: Vec<NewRecord>,
        key: Option<(String, String)>,
        deadline: Instant,
    ) -> Result<UpsertReport, CoordinatorError> {
        let now = self.clock.now_ms();
        let owner = OwnerToken::new_random();

        // Only the planted bugs look at the current rows before the commit.
        let current: HashMap<RecordId, PointId> =
            if self.bug(Bug::OverwritePointInPlace) || self.bug(Bug::DeleteOldPointsBeforeCommit) {
                let ids: Vec<RecordId> = records.iter().filter_map(|r| r.id).collect();
                self.metadata_call("metadata.get", deadline, || self.repo.get(&ids))
                    .await?
                    .into_iter()
                    .map(|r| (r.id, r.point_id))
                    .collect()
            } else {
                HashMap::new()
            };

        let mut rows = Vec::with_capacity(records.len());
        let mut points = Vec::with_capacity(records.len());
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
            points.push(Point {
                id: point_id,
                record_id: id,
                scope: r.scope.clone(),
                metadata: metadata.clone(),
                vector: r.vector.clone(),
                written_at_ms: now,
            });
            rows.push(RowWrite {
                id,
                scope: r.scope,
                content: r.content,
                metadata,
                point_id,
                vector: r.vector,
            });
        }
        let ids: Vec<RecordId> = rows.iter().map(|r| r.id).collect();
        let new_points: Vec<PointId> = points.iter().map(|p| p.id).collect();
        let intent = NewIntent {
            id: intent_id,
            kind: IntentKind::Upsert,
            owner,
            lease_deadline_ms: now.saturating_add(self.lease_ms()),
            point_ids: new_points.clone(),
            created_ms: now,
        };

        // 1. Prepare: name every point before any is written.
        if !self.bug(Bug::IndexWriteBeforeIntent) {
            self.prepare(&intent, deadline, "upsert").await?;
        }

        // 2 and 3. Index write, then the commit, fenced by the owner token.
        let idem = key.map(|(key, request_hash)| {
            keyed(
                key,
                request_hash,
                &UpsertReport {
                    intent: intent_id,
                    ids: ids.clone(),
                    inserted: 0,
                    updated: 0,
                    deferred_cleanup: 0,
                    replayed: false,
                },
            )
        });
        let overlap = self.config.overlap_index_write
            && !self.bug(Bug::IndexWriteBeforeIntent)
            && !self.bug(Bug::DeleteOldPointsBeforeCommit);
        let started = Instant::now();
        // The decision, or why the index write failed (with the commit's
        // decision when it ran alongside).
        let outcome: Result<Decision, (Failed<IndexError>, Option<Decision>)> = if overlap {
            // The commit's statements run while the points are written; it
            // becomes durable only once the gate says the write succeeded, so
            // no row is ever committed before its point exists.
            let (opener, gate) = IndexGate::pending();
            let write = async {
                let written = self.write_points(&points, deadline).await;
                record_phase("upsert", "index_write", started);
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
                        CommitRequest::Upsert {
                            rows: &rows,
                            idempotency: idem.as_ref(),
                            gate: Some(&gate),
                        },
                    )
                    .await;
                record_phase("upsert", "commit", started);
                decision
            };
            // Both run to the end: a failed commit never leaves a chunk in
            // flight behind it, and a failed write is seen by the commit.
            match tokio::join!(write, commit) {
                (Ok(()), decision) => Ok(decision),
                (Err(failure), decision) => Err((failure, Some(decision))),
            }
        } else {
            let written = self.write_points(&points, deadline).await;
            record_phase("upsert", "index_write", started);
            match written {
                Err(failure) => Err((failure, None)),
                Ok(()) => {
                    if self.bug(Bug::IndexWriteBeforeIntent) {
                        self.prepare(&intent, deadline, "upsert").await?;
                    }
                    if self.bug(Bug::DeleteOldPointsBeforeCommit) {
                        let old: Vec<PointId> = current.values().copied().collect();
                        let _ = self.delete_points(&old, deadline).await;
                    }
                    let started = Instant::now();
                    let decision = self
                        .commit(
                            intent_id,
                            owner,
                            deadline,
                            CommitRequest::Upsert {
                                rows: &rows,
                                idempotency: idem.as_ref(),
                                gate: None,
                            },
                        )
                        .await;
                    record_phase("upsert", "commit", started);
                    Ok(decision)
                }
            }
        };
        drop(points);

        let decision = match outcome {
            Ok(decision) => decision,
            Err((failure, decision)) => {
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
                            source: Box::new(index_failure(failure, self.config.call_deadline)),
                        });
                    }
                };
                if let Some(owner) = owner {
                    let abandoned = failure.abandoned();
                    self.compensate(intent_id, owner, &new_points, abandoned)
                        .await;
                }
                return Err(index_failure(failure, self.config.call_deadline));
            }
        };

        match decision {
            Decision::Committed {
                summary,
                garbage,
                owner,
            } => {
                metrics::counter!("tandem_commits_total", "op" => "upsert").increment(1);
                info!(
                    inserted = summary.inserted,
                    updated = summary.updated,
                    "committed"
                );
                // 4. Cleanup: the write is decided; failures here are recovery's.
                let deferred = self.cleanup(intent_id, owner, &garbage).await;
                if deferred == 0 {
                    info!("both stores in sync");
                }
                Ok(UpsertReport {
                    intent: intent_id,
                    ids,
                    inserted: summary.inserted,
                    updated: summary.updated,
                    deferred_cleanup: deferred,
                    replayed: false,
                })
            }
            Decision::NotApplied {
                error,
                owner,
                key_taken,
            } => {
                self.compensate(intent_id, owner, &new_points, false).await;
                if key_taken {
                    return self
                        .replay_after_race(idem.as_ref(), replay_upsert, error)
                        .await;
                }
                Err(error)
            }
            Decision::Fenced => {
                warn!("intent was taken over by recovery; not applied");
                metrics::counter!("tandem_rollbacks_total", "op" => "upsert").increment(1);
                Err(CoordinatorError::Fenced(intent_id))
            }
            Decision::Unknown(e) => Err(e),
        }
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
        let intent = IntentId::new_v7();
        let span = info_span!("tandem.delete", intent = %intent);
        self.delete_inner(intent, selector, key, deadline)
            .instrument(span)
            .await
    }

    async fn delete_inner(
        &self,
        intent_id: IntentId,
        selector: DeleteSelector,
        key: Option<(String, String)>,
        deadline: Instant,
    ) -> Result<DeleteReport, CoordinatorError> {
        let now = self.clock.now_ms();
        let owner = OwnerToken::new_random();
        let intent = NewIntent {
            id: intent_id,
            kind: IntentKind::Delete,
            owner,
            lease_deadline_ms: now.saturating_add(self.lease_ms()),
            point_ids: Vec::new(),
            created_ms: now,
        };
        // The intent exists before the commit so that a lost commit reply can
        // be settled by locking it, like an upsert's.
        self.prepare(&intent, deadline, "delete").await?;

        let idem = key.map(|(key, request_hash)| {
            keyed(
                key,
                request_hash,
                &DeleteReport {
                    intent: intent_id,
                    deleted: 0,
                    deferred_cleanup: 0,
                    replayed: false,
                },
            )
        });
        let started = Instant::now();
        let decision = self
            .commit(
                intent_id,
                owner,
                deadline,
                CommitRequest::Delete {
                    selector: &selector,
                    idempotency: idem.as_ref(),
                },
            )
            .await;
        record_phase("delete", "commit", started);

        match decision {
            Decision::Committed {
                summary,
                garbage,
                owner,
            } => {
                metrics::counter!("tandem_commits_total", "op" => "delete").increment(1);
                info!(deleted = summary.deleted, "committed");
                let deferred = self.cleanup(intent_id, owner, &garbage).await;
                if deferred == 0 {
                    info!("both stores in sync");
                }
                Ok(DeleteReport {
                    intent: intent_id,
                    deleted: summary.deleted,
                    deferred_cleanup: deferred,
                    replayed: false,
                })
            }
            Decision::NotApplied {
                error,
                owner,
                key_taken,
            } => {
                warn!("rolling back");
                metrics::counter!("tandem_rollbacks_total", "op" => "delete").increment(1);
                self.resolve_best_effort(intent_id, owner).await;
                if key_taken {
                    return self
                        .replay_after_race(idem.as_ref(), replay_delete, error)
                        .await;
                }
                Err(error)
            }
            Decision::Fenced => {
                metrics::counter!("tandem_rollbacks_total", "op" => "delete").increment(1);
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
    async fn replay_after_race<R>(
        &self,
        idem: Option<&IdempotencyRecord>,
        replay: fn(IdempotencyRecord) -> Result<R, CoordinatorError>,
        error: CoordinatorError,
    ) -> Result<R, CoordinatorError> {
        let Some(idem) = idem else { return Err(error) };
        let deadline = Instant::now() + self.config.cleanup_deadline;
        match self
            .lookup_key(&idem.key, &idem.request_hash, deadline)
            .await?
        {
            Some(rec) => replay(rec),
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
        let result = with_retry(
            &self.config.retry,
            deadline,
            "metadata.prepare",
            Idempotence::Idempotent,
            || self.repo.prepare(intent),
        )
        .await;
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
                    Ok(Ok((summary, garbage))) => {
                        return Decision::Committed {
                            summary,
                            garbage,
                            owner,
                        };
                    }
                    Ok(Err(e)) => Failed::Port(e),
                    Err(_) => Failed::Deadline,
                };
            match failure {
                Failed::Port(MetadataError::Fenced { .. }) => return Decision::Fenced,
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
                    match self.settle(intent, owner).await {
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
                            };
                        }
                        Ok(Settled::NotCommitted { fence }) => {
                            metrics::counter!("tandem_ambiguous_commits_total", "settled" => "not_committed").increment(1);
                            info!("ambiguous commit settled: it did not happen");
                            // The intent is ours again under the fence token, so
                            // the commit can safely be tried again.
                            owner = fence;
                            if attempt < policy.max_attempts && Instant::now() < deadline {
                                continue;
                            }
                            return Decision::NotApplied {
                                error: cause,
                                owner,
                                key_taken: false,
                            };
                        }
                        Ok(Settled::Fenced) => return Decision::Fenced,
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
    ) -> Result<(CommitSummary, Vec<PointId>), MetadataError> {
        match request {
            CommitRequest::Upsert {
                rows,
                idempotency,
                gate: None,
            } => self
                .repo
                .commit_upsert(intent, owner, rows, *idempotency)
                .await
                .map(|c| (c.summary, c.old_point_ids)),
            CommitRequest::Upsert {
                rows,
                idempotency,
                gate: Some(gate),
            } => self
                .repo
                .commit_upsert_gated(intent, owner, rows, *idempotency, gate)
                .await
                .map(|c| (c.summary, c.old_point_ids)),
            CommitRequest::Delete {
                selector,
                idempotency,
            } => self
                .repo
                .commit_delete(intent, owner, selector, *idempotency)
                .await
                .map(|c| (c.summary, c.point_ids)),
        }
    }

    /// Learns whether a commit whose reply was lost happened.
    async fn settle(
        &self,
        intent: IntentId,
        owner: OwnerToken,
    ) -> Result<Settled, CoordinatorError> {
        let fence = OwnerToken::new_random();
        let deadline = Instant::now() + self.config.cleanup_deadline;
        let settlement = with_retry(
            &self.config.retry,
            deadline,
            "metadata.settle",
            Idempotence::Idempotent,
            || self.repo.settle(intent, owner, fence),
        )
        .await
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
    /// races a chunk still being written by this process.
    async fn write_points(
        &self,
        points: &[Point],
        deadline: Instant,
    ) -> Result<(), Failed<IndexError>> {
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
                    move || self.index.upsert(c),
                )
            })
            .collect();
        let results: Vec<Result<(), Failed<IndexError>>> = futures::stream::iter(calls)
            .buffer_unordered(self.config.limits.index_parallelism)
            .collect()
            .await;
        first_failure(results)
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
        let calls: Vec<_> = ids
            .chunks(self.config.limits.index_chunk)
            .map(|c| {
                with_retry(
                    &self.config.retry,
                    deadline,
                    "index.delete",
                    Idempotence::Idempotent,
                    move || self.index.delete(c),
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
    /// resolved only when every new point is known deleted and no write of
    /// this call can still be in flight; otherwise recovery finishes the job.
    async fn compensate(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        new_points: &[PointId],
        write_abandoned: bool,
    ) {
        warn!("rolling back");
        metrics::counter!("tandem_rollbacks_total", "op" => "upsert").increment(1);
        let deadline = Instant::now() + self.config.cleanup_deadline;
        match self.delete_points(new_points, deadline).await {
            Ok(()) => {
                metrics::counter!("tandem_compensations_total").increment(1);
                info!(
                    points = new_points.len(),
                    "cleaned up index points after rollback"
                );
                if write_abandoned {
                    warn!("an index write may still be in flight; the intent is left to recovery");
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
    /// Returns how many points were left to recovery.
    async fn cleanup(&self, intent: IntentId, owner: OwnerToken, garbage: &[PointId]) -> usize {
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
            record_phase("write", "cleanup", started);
            return garbage.len();
        }
        self.resolve_best_effort(intent, owner).await;
        record_phase("write", "cleanup", started);
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
