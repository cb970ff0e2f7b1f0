//! Recovery: the garbage rule applied to every intent whose lease has ended.

use std::collections::HashSet;

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
            let n = claimed.len();
            report.claimed += n;
            for intent in claimed {
                let owner = if self.bug(Bug::RecoverIgnoringLeases) {
                    intent.owner
                } else {
                    owner
                };
                // The planted bug cleans live intents too, without fencing them.
                let fenced =
                    !self.bug(Bug::RecoverIgnoringLeases) || intent.lease_deadline_ms < now;
                match self.recover_one(&intent, owner, fenced).await {
                    Ok(deleted) => {
                        report.resolved += 1;
                        report.points_deleted += deleted;
                        metrics::counter!("tandem_recovered_intents_total").increment(1);
                    }
                    Err(e) => {
                        report.failed += 1;
                        warn!(intent = %intent.id, error = %e, "recovery of the intent failed; a later run retries it");
                        let msg = e.to_string();
                        let _ = self.repo.record_failure(intent.id, owner, &msg).await;
                    }
                }
            }
            // With the planted bug nothing is claimed, so one round is all.
            if n < batch || self.bug(Bug::RecoverIgnoringLeases) {
                break;
            }
        }
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

    /// The garbage rule for one claimed intent: delete what it names and no
    /// committed row references, then resolve it.
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
        info!(intent = %intent.id, kind = intent.kind.as_str(), garbage = garbage.len(), "recovered intent");
        Ok(garbage.len())
    }
}
