//! Deferred indexing: the index workers, read-your-writes and the
//! dead-letter list.
//!
//! A deferred write ([`WriteMode::Deferred`](crate::WriteMode::Deferred))
//! commits its rows and one pending entry per record in one metadata
//! transaction. A worker's batch is then one more unit of the one write
//! protocol ([`Coordinator::write_unit`]): claim entries → prepare an intent
//! naming a fresh point per record → write the points → commit a
//! [`CommitPart::Index`] switch, fenced by each record's version and the
//! claim → cleanup (the superseded points) → resolve. Nothing here writes
//! the index outside that protocol. See `docs/deferred.md`.

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::{Instrument, info, info_span, warn};

use super::retry::{Idempotence, with_retry};
use super::write::{Unit, Written, metadata_failure};
use super::{Bug, Coordinator};
use crate::error::{CoordinatorError, IndexError};
use crate::model::{
    CommitPart, IndexFailure, IndexSwitch, IntentId, IntentKind, OwnerToken, PendingFilter,
    PendingIndex, PendingStats, Point, PointId, RecordId,
};
use crate::ports::{MetadataRepo, VectorIndex};

/// What a deferred write must wait for to be searchable: each record and
/// the version it wrote ([`Coordinator::wait_indexed`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexToken {
    /// `(record, version)`; `u64::MAX` when the version is not known (a
    /// replayed write): then the token waits until the record has nothing
    /// pending.
    pub records: Vec<(RecordId, u64)>,
}

impl IndexToken {
    /// A token for records whose written versions are unknown.
    pub fn unknown_versions(ids: &[RecordId]) -> Self {
        Self {
            records: ids.iter().map(|id| (*id, u64::MAX)).collect(),
        }
    }
}

/// How [`Coordinator::wait_indexed`] ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum IndexWait {
    /// Every record of the token is searchable at its version or a later
    /// one (or was deleted since).
    Indexed,
    /// The timeout passed first; these records are still waiting.
    TimedOut {
        /// Records not yet indexed.
        waiting: Vec<RecordId>,
    },
    /// These records were dead-lettered: they will not be indexed until an
    /// operator retries them (`tandem dlq retry`).
    DeadLettered {
        /// The dead-lettered records.
        dead: Vec<RecordId>,
    },
}

/// What index workers did ([`Coordinator::index_pending`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IndexReport {
    /// Batches written (units of the protocol, each with its intent).
    pub batches: usize,
    /// Entries claimed.
    pub claimed: usize,
    /// Records switched to their new point: now searchable at the version
    /// the entry named.
    pub indexed: usize,
    /// Entries a later write overtook while the batch ran (their points were
    /// garbage; the newer version stays pending).
    pub superseded: usize,
    /// Entries whose batch failed and that wait for a retry.
    pub failed: usize,
    /// Entries moved to the dead-letter list.
    pub dead_lettered: usize,
    /// Superseded points whose deletion was left to recovery.
    pub deferred_cleanup: usize,
}

impl IndexReport {
    fn add(&mut self, other: &IndexReport) {
        self.batches += other.batches;
        self.claimed += other.claimed;
        self.indexed += other.indexed;
        self.superseded += other.superseded;
        self.failed += other.failed;
        self.dead_lettered += other.dead_lettered;
        self.deferred_cleanup += other.deferred_cleanup;
    }
}

/// How a failed batch is charged to its entries.
enum Charge {
    /// The index rejected a point: the entry's own, permanent failure.
    Poison,
    /// A failure that may be the entry's (a permanent store error): counts
    /// as an attempt.
    Attempt,
    /// The stores are down, slow or overloaded, or the unit was taken over:
    /// back off, count nothing.
    Transient,
}

fn charge(error: &CoordinatorError) -> Charge {
    match error {
        CoordinatorError::Index(IndexError::InvalidInput { .. }) => Charge::Poison,
        CoordinatorError::Invalid(_) => Charge::Poison,
        e if e.is_retryable() => Charge::Transient,
        _ => Charge::Attempt,
    }
}

impl<M: MetadataRepo, V: VectorIndex> Coordinator<M, V> {
    /// Brings the index up to date with the deferred writes: claims pending
    /// entries in batches of [`IndexingConfig::batch`](crate::IndexingConfig::batch)
    /// and indexes them, until none is claimable now (the rest are claimed by
    /// other workers, backing off, or dead-lettered). Safe in any number of
    /// processes at once.
    ///
    /// A batch that fails is not an error of this call: its entries are
    /// retried after a back-off, or dead-lettered if the failure was theirs
    /// (see [`IndexingConfig::max_attempts`](crate::IndexingConfig::max_attempts)).
    /// The call fails only if the metadata store cannot be reached to claim.
    ///
    /// [`IndexingConfig::lanes`](crate::IndexingConfig::lanes) batches run at
    /// once, each lane claiming its own.
    pub async fn index_pending(&self) -> Result<IndexReport, CoordinatorError> {
        self.ensure_deferred()?;
        let lanes = self.config.indexing.lanes.max(1);
        let results = futures::future::join_all((0..lanes).map(|_| self.index_lane())).await;
        let mut report = IndexReport::default();
        let mut error = None;
        for result in results {
            match result {
                Ok(lane) => report.add(&lane),
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    /// One lane of [`index_pending`](Self::index_pending): batch after batch
    /// until nothing is claimable.
    async fn index_lane(&self) -> Result<IndexReport, CoordinatorError> {
        let mut report = IndexReport::default();
        loop {
            let batch = self.index_one_batch().await?;
            let claimed = batch.claimed;
            report.add(&batch);
            if claimed == 0 {
                break;
            }
            if batch.failed > 0 && batch.indexed == 0 && batch.superseded == 0 {
                // The stores are failing: leave the rest for the next pass.
                break;
            }
        }
        Ok(report)
    }

    /// Claims one batch of pending entries and indexes it.
    pub async fn index_one_batch(&self) -> Result<IndexReport, CoordinatorError> {
        self.ensure_deferred()?;
        let now = self.clock.now_ms();
        let claim = OwnerToken::new_random();
        // The claim lasts as long as an intent's lease: the unit it starts
        // ends (or is left to recovery) long before.
        let claim_until = now.saturating_add(self.lease_ms());
        let deadline = Instant::now() + self.config.call_deadline;
        let entries = with_retry(
            &self.config.retry,
            deadline,
            "metadata.claim_pending",
            Idempotence::NotAppliedOnly,
            || {
                self.repo
                    .claim_pending(now, claim, claim_until, self.config.indexing.batch)
            },
        )
        .await
        .map_err(|f| metadata_failure(f, self.config.call_deadline))?;
        let mut report = IndexReport {
            claimed: entries.len(),
            ..IndexReport::default()
        };
        if entries.is_empty() {
            return Ok(report);
        }
        let span = info_span!("tandem.index", entries = entries.len());
        self.index_entries(entries, claim, &mut report)
            .instrument(span)
            .await;
        Ok(report)
    }

    /// Writes `entries` (claimed with `claim`) as one unit; on a poison
    /// failure, splits the batch to find the entries at fault.
    async fn index_entries(
        &self,
        entries: Vec<PendingIndex>,
        claim: OwnerToken,
        report: &mut IndexReport,
    ) {
        let now = self.clock.now_ms();
        let mut points = Vec::with_capacity(entries.len());
        let mut switches = Vec::with_capacity(entries.len());
        for e in &entries {
            let point_id = PointId::new_v7();
            points.push(Point {
                id: point_id,
                record_id: e.record_id,
                scope: e.scope.clone(),
                metadata: e.metadata.clone(),
                vector: e.vector.clone(),
                written_at_ms: now,
            });
            switches.push(IndexSwitch {
                record_id: e.record_id,
                version: e.version,
                point_id,
            });
        }
        let new_points: Vec<PointId> = points.iter().map(|p| p.id).collect();
        let unit = Unit {
            op: "index",
            kind: IntentKind::Index,
            parts: vec![CommitPart::Index {
                claim,
                switches,
                now_ms: now,
            }],
            points,
            step: None,
            hold: false,
            saga: None,
            release_at_ms: None,
            current_for_bugs: Default::default(),
            create_intent: false,
        };
        let deadline = Instant::now() + self.config.call_deadline;
        let written = self
            .write_unit(IntentId::new_v7(), unit, None, deadline)
            .await;
        report.batches += 1;
        let error = match written {
            Ok(Written::Done(done)) => {
                // A new point the commit listed as garbage was not switched
                // in: a later write (or another worker) overtook the entry.
                let garbage: HashSet<PointId> = done.garbage.iter().copied().collect();
                let lost = new_points.iter().filter(|p| garbage.contains(p)).count();
                let indexed = new_points.len() - lost;
                report.indexed += indexed;
                report.superseded += lost;
                report.deferred_cleanup += done.deferred_cleanup;
                metrics::counter!("tandem_indexed_records_total").increment(indexed as u64);
                return;
            }
            Ok(Written::Replay(_)) => {
                // No idempotency key is passed: cannot happen.
                CoordinatorError::Config("an index batch was replayed".to_owned())
            }
            Err(e) => e,
        };
        let charge = if self.bug(Bug::DeadLetterTransient) {
            match charge(&error) {
                Charge::Transient => Charge::Attempt,
                other => other,
            }
        } else {
            charge(&error)
        };
        if matches!(charge, Charge::Poison) && entries.len() > 1 {
            // Find the entries at fault: each half on its own.
            let mid = entries.len() / 2;
            let mut entries = entries;
            let second = entries.split_off(mid);
            Box::pin(self.index_entries(entries, claim, report)).await;
            Box::pin(self.index_entries(second, claim, report)).await;
            return;
        }
        warn!(error = %error, entries = entries.len(), "index batch failed");
        let attempts = entries.iter().map(|e| e.attempts).max().unwrap_or(0);
        let failure = IndexFailure {
            message: error.to_string(),
            permanent: matches!(charge, Charge::Poison),
            counts: !matches!(charge, Charge::Transient),
            max_attempts: self.config.indexing.max_attempts,
            retry_at_ms: now.saturating_add(
                i64::try_from(self.config.indexing.backoff(attempts + 1).as_millis())
                    .unwrap_or(i64::MAX),
            ),
        };
        let listed: Vec<(RecordId, u64)> =
            entries.iter().map(|e| (e.record_id, e.version)).collect();
        let deadline = Instant::now() + self.config.cleanup_deadline;
        match with_retry(
            &self.config.retry,
            deadline,
            "metadata.record_index_failure",
            Idempotence::NotAppliedOnly,
            || self.repo.record_index_failure(claim, &listed, &failure),
        )
        .await
        {
            Ok(dead) => {
                report.dead_lettered += dead;
                report.failed += entries.len() - dead;
                if dead > 0 {
                    metrics::counter!("tandem_dead_lettered_total").increment(dead as u64);
                }
            }
            Err(f) => {
                // The claim ends with its lease: the entries are retried then.
                let e = metadata_failure(f, self.config.cleanup_deadline);
                warn!(error = %e, "could not record the failed batch");
                report.failed += entries.len();
            }
        }
    }

    /// Runs an index worker until `shutdown` resolves: indexes what is
    /// pending, runs recovery (which also collects the garbage that deferred
    /// deletes and superseded points leave), and polls every
    /// [`IndexingConfig::idle_poll`](crate::IndexingConfig::idle_poll) when
    /// idle. Shutdown is graceful: a pass under way (one batch's unit and its
    /// recovery) finishes first, so a stopped worker leaves no intent behind.
    /// Errors are logged and retried after the poll interval; it returns the
    /// totals.
    pub async fn run_index_worker(
        &self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<IndexReport, CoordinatorError> {
        self.run_index_worker_with(shutdown, true).await
    }

    /// [`run_index_worker`](Self::run_index_worker), with or without its
    /// recovery passes: a process that runs recovery on a schedule of its own
    /// (`tandem serve`) runs its workers without, and its recovery collects
    /// what deferred deletes leave.
    pub async fn run_index_worker_with(
        &self,
        shutdown: impl Future<Output = ()>,
        recover: bool,
    ) -> Result<IndexReport, CoordinatorError> {
        use futures::FutureExt;
        self.ensure_deferred()?;
        let mut total = IndexReport::default();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            if shutdown.as_mut().now_or_never().is_some() {
                break;
            }
            let report = self.index_pending().await;
            if recover && let Err(e) = self.recover().await {
                warn!(error = %e, "recovery pass of the index worker failed");
            }
            let idle = match report {
                Ok(report) => {
                    let idle = report.claimed == 0 || report.failed > 0;
                    total.add(&report);
                    idle
                }
                Err(e) => {
                    warn!(error = %e, "index worker pass failed");
                    true
                }
            };
            if idle {
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(self.config.indexing.idle_poll) => {}
                }
            }
        }
        info!(indexed = total.indexed, "index worker stopped");
        Ok(total)
    }

    /// Drains the backlog: indexes and recovers until nothing is pending
    /// but dead letters and entries backing off past `patience`. Returns the
    /// totals; for `tandem index-worker --until-idle` and tests.
    pub async fn index_until_idle(
        &self,
        patience: Duration,
    ) -> Result<IndexReport, CoordinatorError> {
        self.ensure_deferred()?;
        let mut total = IndexReport::default();
        let started = Instant::now();
        loop {
            let report = self.index_pending().await?;
            total.add(&report);
            self.recover().await?;
            let stats = self.pending_stats().await?;
            if stats.pending == 0 || started.elapsed() >= patience {
                return Ok(total);
            }
            if report.claimed == 0 || report.failed > 0 {
                tokio::time::sleep(self.config.indexing.idle_poll).await;
            }
        }
    }

    /// Waits until every record of `token` is searchable at the version the
    /// write gave it or a later one — or was deleted since, or was
    /// dead-lettered — or `timeout` passes. A later deferred write of the same
    /// record coalesces with it, so the wait then lasts until that one is
    /// indexed. Returns at once for an empty token (a synchronous write's).
    pub async fn wait_indexed(
        &self,
        token: &IndexToken,
        timeout: Duration,
    ) -> Result<IndexWait, CoordinatorError> {
        if token.records.is_empty() {
            return Ok(IndexWait::Indexed);
        }
        self.ensure_deferred()?;
        let until = Instant::now() + timeout;
        let mut poll = Duration::from_millis(5);
        loop {
            let ids: Vec<RecordId> = token.records.iter().map(|(id, _)| *id).collect();
            let deadline = Instant::now() + self.config.call_deadline;
            let pending = self
                .metadata_call("metadata.pending_for", deadline, || {
                    self.repo.pending_for(&ids)
                })
                .await?;
            let mut waiting = Vec::new();
            let mut dead = Vec::new();
            for (id, version) in &token.records {
                let Some(entry) = pending.iter().find(|e| e.record_id == *id) else {
                    continue;
                };
                if entry.indexed_version >= *version && *version != u64::MAX {
                    continue;
                }
                if entry.dead {
                    dead.push(*id);
                } else {
                    waiting.push(*id);
                }
            }
            if !dead.is_empty() {
                return Ok(IndexWait::DeadLettered { dead });
            }
            if waiting.is_empty() {
                return Ok(IndexWait::Indexed);
            }
            let now = Instant::now();
            if now >= until {
                return Ok(IndexWait::TimedOut { waiting });
            }
            tokio::time::sleep(poll.min(until - now)).await;
            poll = (poll * 2).min(Duration::from_millis(250));
        }
    }

    /// The backlog: waiting, claimed and dead-lettered entries, the oldest
    /// waiting entry's enqueue time, and the records every worker indexed in
    /// the last minute. Sets the backlog's gauges (`tandem_index_pending`,
    /// `tandem_index_dead_letters`, `tandem_index_oldest_pending_seconds`,
    /// `tandem_index_indexed_last_minute`).
    pub async fn pending_stats(&self) -> Result<PendingStats, CoordinatorError> {
        self.ensure_deferred()?;
        let now = self.clock.now_ms();
        let deadline = Instant::now() + self.config.call_deadline;
        let stats = self
            .metadata_call("metadata.pending_stats", deadline, || {
                self.repo.pending_stats(now)
            })
            .await?;
        let lag_ms = stats
            .oldest_enqueued_ms
            .map_or(0, |t| now.saturating_sub(t).max(0));
        metrics::gauge!("tandem_index_pending").set(stats.pending as f64);
        metrics::gauge!("tandem_index_dead_letters").set(stats.dead as f64);
        metrics::gauge!("tandem_index_oldest_pending_seconds").set(lag_ms as f64 / 1000.0);
        metrics::gauge!("tandem_index_indexed_last_minute").set(stats.indexed_last_minute as f64);
        Ok(stats)
    }

    /// Lists pending entries (waiting, dead-lettered or both) in record id
    /// order, after `after`, up to `limit`.
    pub async fn pending(
        &self,
        filter: PendingFilter,
        after: Option<RecordId>,
        limit: usize,
    ) -> Result<Vec<PendingIndex>, CoordinatorError> {
        self.ensure_deferred()?;
        let deadline = Instant::now() + self.config.call_deadline;
        self.metadata_call("metadata.list_pending", deadline, || {
            self.repo.list_pending(filter, after, limit)
        })
        .await
    }

    /// Puts dead-lettered records (these, or all with `None`) back in the
    /// queue. Returns how many.
    pub async fn retry_dead_letters(
        &self,
        ids: Option<&[RecordId]>,
    ) -> Result<u64, CoordinatorError> {
        self.ensure_deferred()?;
        let deadline = Instant::now() + self.config.call_deadline;
        self.metadata_call("metadata.retry_dead", deadline, || {
            self.repo.retry_dead(ids)
        })
        .await
    }

    /// Drops dead-lettered records' entries (these, or all with `None`): the
    /// records stay committed, found through the point their row references
    /// (their previous version's; none for a record never indexed). Returns
    /// how many.
    pub async fn drop_dead_letters(
        &self,
        ids: Option<&[RecordId]>,
    ) -> Result<u64, CoordinatorError> {
        self.ensure_deferred()?;
        let deadline = Instant::now() + self.config.call_deadline;
        self.metadata_call("metadata.drop_dead", deadline, || self.repo.drop_dead(ids))
            .await
    }

    fn ensure_deferred(&self) -> Result<(), CoordinatorError> {
        if self.repo.deferred_indexing() {
            Ok(())
        } else {
            Err(CoordinatorError::Config(
                "this metadata store has no deferred indexing".to_owned(),
            ))
        }
    }
}
