//! Recovery: the garbage rule applied to every intent whose lease has ended.

use std::collections::HashSet;

use futures::StreamExt;
use tokio::time::Instant;
use tracing::{Instrument, info, info_span, warn};

use super::retry::{Idempotence, with_retry};
use super::write::{index_failure, metadata_failure};
use super::{Bug, Coordinator, RecoveryReport};
use crate::error::CoordinatorError;
use crate::model::{Intent, OwnerToken, PointId};
use crate::ports::{MetadataRepo, VectorIndex};

impl<M: MetadataRepo, V: VectorIndex> Coordinator<M, V> {
    /// Finishes or undoes every write whose caller is gone.
    ///
    /// Claims intents whose lease has ended (atomically, with a new owner token,
    /// so that the original caller's commit is fenced), deletes their garbage —
    /// every point they name that no committed row references — and resolves
    /// them. Safe to run in several processes at once and at any time; an
    /// intent whose handling fails stays, and a later run (after its new lease)
    /// retries it.
    pub async fn recover(&self) -> Result<RecoveryReport, CoordinatorError> {
        self.recover_inner()
            .instrument(info_span!("tandem.recover"))
            .await
    }

    async fn recover_inner(&self) -> Result<RecoveryReport, CoordinatorError> {
        // Sagas and intents left by a process that knew of a later switch
        // than this one has garbage in the collection it names.
        self.refresh_now().await?;
        let mut report = RecoveryReport::default();
        let batch = self.config.recovery_batch;
        loop {
            let now = self.clock.now_ms();
            let owner = OwnerToken::new_random();
            let lease_until = now.saturating_add(self.lease_ms());
            let deadline = Instant::now() + self.config.call_deadline;
            let claimed = if self.bug(Bug::RecoverIgnoringLeases) {
                self.metadata_call("metadata.list_intents", deadline, || {
                    self.repo.list_intents(batch)
                })
                .await?
            } else {
                with_retry(
                    &self.config.retry,
                    deadline,
                    "metadata.claim_expired",
                    Idempotence::NotAppliedOnly,
                    || self.repo.claim_expired(now, owner, lease_until, batch),
                )
                .await
                .map_err(|f| metadata_failure(f, self.config.call_deadline))?
            };
            if claimed.is_empty() {
                break;
            }
            // Read the active collection after the claim: an intent claimed
            // here may have committed under a switch this process has not
            // seen, and its garbage is in the collection that switch named.
            self.refresh_now().await?;
            let n = claimed.len();
            report.claimed += n;
            if self.bug(Bug::RecoverIgnoringLeases) {
                self.recover_unclaimed(&claimed, now, &mut report).await;
            } else {
                let before = report.resolved;
                self.recover_batch(&claimed, owner, &mut report).await;
                metrics::counter!("tandem_recovered_intents_total")
                    .increment((report.resolved - before) as u64);
            }
            // With the planted bug nothing is claimed, so one round is all.
            if n < batch || self.bug(Bug::RecoverIgnoringLeases) {
                break;
            }
        }
        self.recover_sagas(&mut report).await;
        if report.claimed > 0 {
            info!(
                claimed = report.claimed,
                resolved = report.resolved,
                points_deleted = report.points_deleted,
                failed = report.failed,
                "recovery finished"
            );
        }
        Ok(report)
    }

    /// The garbage rule for a batch of intents claimed by `owner`, in a
    /// constant number of calls: one `referenced_points` for every point they
    /// name, ⌈garbage / chunk⌉ index deletes, and one `resolve_many`. An
    /// intent is resolved only when all of its garbage is known deleted; the
    /// others stay (with the reason recorded) for a later run after their new
    /// lease. Fencing is the claim's: every intent of the batch is `owner`'s.
    pub(super) async fn recover_batch(
        &self,
        claimed: &[Intent],
        owner: OwnerToken,
        report: &mut RecoveryReport,
    ) {
        let deadline = Instant::now() + self.config.call_deadline;
        // Intents may name the same point (a guard and its call): each point once.
        let mut seen = HashSet::new();
        let named: Vec<PointId> = claimed
            .iter()
            .flat_map(|i| i.point_ids.iter().copied())
            .filter(|p| seen.insert(*p))
            .collect();
        let referenced = if named.is_empty() {
            HashSet::new()
        } else {
            match self
                .metadata_call("metadata.referenced_points", deadline, || {
                    self.repo.referenced_points(&named)
                })
                .await
            {
                Ok(referenced) => referenced,
                Err(e) => return self.batch_failed(claimed, owner, &e, report).await,
            }
        };
        let garbage: Vec<PointId> = named
            .into_iter()
            .filter(|p| !referenced.contains(p))
            .collect();
        let (undeleted, error) = self.delete_points_reporting(&garbage, deadline).await;
        let (done, stuck): (Vec<&Intent>, Vec<&Intent>) = claimed.iter().partition(|i| {
            self.bug(Bug::RecoverBatchResolvesAll)
                || !i.point_ids.iter().any(|p| undeleted.contains(p))
        });
        let done_ids: Vec<_> = done.iter().map(|i| i.id).collect();
        // A step of its own: deletes that ran into the deadline must not leave
        // the resolve of what they did finish without time.
        let deadline = Instant::now() + self.config.cleanup_deadline;
        let resolved = if done_ids.is_empty() {
            0
        } else {
            match self
                .metadata_call("metadata.resolve_many", deadline, || {
                    self.repo.resolve_many(&done_ids, owner)
                })
                .await
            {
                Ok(resolved) => resolved,
                Err(e) => {
                    let done: Vec<Intent> = done.into_iter().cloned().collect();
                    self.batch_failed(&done, owner, &e, report).await;
                    0
                }
            }
        };
        report.resolved += resolved;
        report.points_deleted += garbage.len() - undeleted.len();
        info!(
            intents = claimed.len(),
            resolved,
            garbage = garbage.len(),
            "recovered a batch of intents"
        );
        if let Some(e) = error {
            let stuck: Vec<Intent> = stuck.into_iter().cloned().collect();
            self.batch_failed(&stuck, owner, &e, report).await;
        }
    }

    /// Counts and records why the handling of `intents` failed; a later run
    /// retries them after their new lease.
    async fn batch_failed(
        &self,
        intents: &[Intent],
        owner: OwnerToken,
        error: &CoordinatorError,
        report: &mut RecoveryReport,
    ) {
        let message = error.to_string();
        for intent in intents {
            report.failed += 1;
            warn!(intent = %intent.id, error = %message, "recovery of the intent failed; a later run retries it");
            let _ = self.repo.record_failure(intent.id, owner, &message).await;
        }
    }

    /// Deletes `ids` in chunks (retried, `index_parallelism` at a time) and
    /// returns the ids of the chunks that could not be deleted, with the first
    /// error.
    async fn delete_points_reporting(
        &self,
        ids: &[PointId],
        deadline: Instant,
    ) -> (HashSet<PointId>, Option<CoordinatorError>) {
        let index = self.index();
        let index = &index;
        let calls: Vec<_> = ids
            .chunks(self.config.limits.index_chunk)
            .map(|c| async move {
                let result = with_retry(
                    &self.config.retry,
                    deadline,
                    "index.delete",
                    Idempotence::Idempotent,
                    || index.delete(c),
                )
                .await;
                (c, result)
            })
            .collect();
        let results: Vec<_> = futures::stream::iter(calls)
            .buffer_unordered(self.config.limits.index_parallelism)
            .collect()
            .await;
        let mut undeleted = HashSet::new();
        let mut first = None;
        for (chunk, result) in results {
            if let Err(f) = result {
                undeleted.extend(chunk.iter().copied());
                first.get_or_insert_with(|| index_failure(f, self.config.call_deadline));
            }
        }
        (undeleted, first)
    }

    /// The planted bug's recovery: every listed intent, expired or not, under
    /// its own owner token, one by one, without claiming (fencing) it.
    async fn recover_unclaimed(&self, intents: &[Intent], now: i64, report: &mut RecoveryReport) {
        for intent in intents {
            let resolve = intent.lease_deadline_ms < now;
            match self.recover_one(intent, intent.owner, resolve).await {
                Ok(deleted) => {
                    report.resolved += 1;
                    report.points_deleted += deleted;
                    metrics::counter!("tandem_recovered_intents_total").increment(1);
                }
                Err(e) => {
                    report.failed += 1;
                    warn!(intent = %intent.id, error = %e, "recovery of the intent failed");
                }
            }
        }
    }

    /// The garbage rule for one intent: delete what it names and no committed
    /// row references, then (if `resolve`) resolve it.
    async fn recover_one(
        &self,
        intent: &Intent,
        owner: OwnerToken,
        resolve: bool,
    ) -> Result<usize, CoordinatorError> {
        let deadline = Instant::now() + self.config.call_deadline;
        let referenced = if intent.point_ids.is_empty() {
            HashSet::new()
        } else {
            self.metadata_call("metadata.referenced_points", deadline, || {
                self.repo.referenced_points(&intent.point_ids)
            })
            .await?
        };
        let garbage: Vec<PointId> = intent
            .point_ids
            .iter()
            .filter(|p| !referenced.contains(p))
            .copied()
            .collect();
        self.delete_points(&garbage, deadline)
            .await
            .map_err(|f| index_failure(f, self.config.call_deadline))?;
        if !resolve {
            return Ok(garbage.len());
        }
        self.metadata_call("metadata.resolve", deadline, || {
            self.repo.resolve(intent.id, owner)
        })
        .await?;
        Ok(garbage.len())
    }
}
