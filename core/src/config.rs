//! The coordinator's configuration.

use std::time::Duration;

use crate::error::CoordinatorError;

/// Exponential backoff with full jitter, bounded by attempts (the per-call
/// deadline bounds it too).
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = no retry).
    pub max_attempts: u32,
    /// The backoff cap of the first retry.
    pub initial_backoff: Duration,
    /// The largest backoff cap.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// The delay before retry number `retry` (1-based): a uniformly random
    /// duration in `[0, min(max_backoff, initial_backoff * 2^(retry-1))]` ("full
    /// jitter"), never less than what the server asked for.
    pub fn backoff(&self, retry: u32, server_hint: Option<Duration>) -> Duration {
        let exp = retry.saturating_sub(1).min(30);
        let cap = self
            .initial_backoff
            .saturating_mul(1u32 << exp)
            .min(self.max_backoff);
        let jittered = cap.mul_f64(fastrand::f64());
        match server_hint {
            Some(hint) => jittered.max(hint),
            None => jittered,
        }
    }
}

/// Limits on what one call may carry, checked before anything is written.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Most records in one upsert batch.
    pub max_batch: usize,
    /// Most bytes in a scope name.
    pub max_scope_len: usize,
    /// Points per index call; larger batches are split into ⌈n / chunk⌉ calls.
    pub index_chunk: usize,
    /// Index calls of one batch in flight at once.
    pub index_parallelism: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_batch: 10_000,
            max_scope_len: 255,
            index_chunk: 256,
            index_parallelism: 4,
        }
    }
}

/// How a write reaches the vector index.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum WriteMode {
    /// The call writes the index itself: on `Ok` the records are searchable
    /// (`docs/protocol.md`).
    #[default]
    Sync,
    /// The call commits the rows and a pending-index entry per record in one
    /// metadata transaction and returns; index workers write the points
    /// later (`docs/deferred.md`). Needs no index to be up.
    Deferred,
}

impl WriteMode {
    /// `sync` or `deferred`.
    pub fn as_str(&self) -> &'static str {
        match self {
            WriteMode::Sync => "sync",
            WriteMode::Deferred => "deferred",
        }
    }
}

impl std::str::FromStr for WriteMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sync" => Ok(WriteMode::Sync),
            "deferred" => Ok(WriteMode::Deferred),
            other => Err(format!(
                "unknown write mode {other:?} (expected sync or deferred)"
            )),
        }
    }
}

/// How index workers bring deferred writes into the index
/// ([`Coordinator::index_pending`](crate::Coordinator::index_pending)).
#[derive(Clone, Debug, PartialEq)]
pub struct IndexingConfig {
    /// Pending entries claimed (and written as one unit) per batch: like a
    /// synchronous batch, its points go out in `limits.index_chunk` chunks,
    /// `limits.index_parallelism` at a time, so a large batch amortises the
    /// unit's metadata round trips.
    pub batch: usize,
    /// An entry is dead-lettered after this many failed attempts that were
    /// its own (a rejected point, a permanent error). Transient failures —
    /// the index unreachable, overloaded or slow — never count: an outage
    /// delays the backlog, it does not dead-letter it.
    pub max_attempts: u32,
    /// Back-off of an entry after a failed attempt (doubled per attempt).
    pub retry_backoff: Duration,
    /// The largest back-off.
    pub max_retry_backoff: Duration,
    /// How long an idle worker waits before it looks for work again.
    pub idle_poll: Duration,
    /// Batches one worker runs at once. Each lane claims its own batch (the
    /// claims never overlap), so while one batch's points are being written
    /// another's metadata steps run; ordering is kept by the same fences as
    /// between workers in different processes.
    pub lanes: usize,
}

impl Default for IndexingConfig {
    fn default() -> Self {
        Self {
            batch: 1000,
            max_attempts: 5,
            retry_backoff: Duration::from_millis(500),
            max_retry_backoff: Duration::from_secs(60),
            idle_poll: Duration::from_millis(200),
            lanes: 2,
        }
    }
}

impl IndexingConfig {
    /// The back-off after the `attempt`-th failure (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(20);
        self.retry_backoff
            .saturating_mul(1u32 << exp)
            .min(self.max_retry_backoff)
    }
}

/// Everything the [`Coordinator`](crate::Coordinator) needs to know.
#[derive(Clone, Debug, PartialEq)]
pub struct CoordinatorConfig {
    /// How long one write call may take before it stops trying to commit. Must be
    /// well below `lease`.
    pub call_deadline: Duration,
    /// How long compensation and cleanup may take after the decision; past that
    /// they are left to recovery.
    pub cleanup_deadline: Duration,
    /// How long an intent belongs to its writer before recovery may take it over.
    pub lease: Duration,
    /// Retry policy for transient errors.
    pub retry: RetryPolicy,
    /// Batch and chunk limits.
    pub limits: Limits,
    /// How many candidates a guarded search asks the index for, per wanted hit,
    /// before filtering out uncommitted and superseded points. When the guard
    /// leaves fewer than `k`, the search asks again for 4× as many, so 1 (the
    /// default) is the cheapest setting while uncommitted or superseded points
    /// are rare among the nearest; raise it for write-heavy collections, where
    /// a search would otherwise often take a second round.
    pub search_overfetch: usize,
    /// Intents claimed per recovery round.
    pub recovery_batch: usize,
    /// `repair` deletes orphans only if they were written at least this long ago
    /// (so in-flight writes are never touched).
    pub orphan_grace: Duration,
    /// Whether an upsert starts its commit while its index write is in flight
    /// ([`MetadataRepo::commit_upsert_gated`](crate::MetadataRepo::commit_upsert_gated)):
    /// the commit's statements overlap the index write and only the final
    /// `COMMIT` waits for it. Off: the commit starts after the index write.
    /// Both keep every invariant (see `docs/protocol.md`).
    pub overlap_index_write: bool,
    /// The write mode of calls that do not choose one
    /// ([`WriteOptions::write_mode`](crate::WriteOptions::write_mode)).
    pub write_mode: WriteMode,
    /// Index workers' settings (deferred writes).
    pub indexing: IndexingConfig,
    /// Re-indexing's settings.
    pub reindex: ReindexConfig,
}

/// Re-indexing's settings ([`Coordinator::reindex`](crate::Coordinator::reindex)).
#[derive(Clone, Debug, PartialEq)]
pub struct ReindexConfig {
    /// Rows copied per chunk (one scan, one index write, one progress commit).
    pub chunk: usize,
    /// How long a process may use its cached active collection for searches
    /// before it reads the store's again (writes learn of a switch at once:
    /// their prepare is refused).
    pub state_ttl: Duration,
    /// The longest a switch may refuse prepares (the final catch-up runs in
    /// it); if the driver dies, prepares resume when it ends.
    pub switch_freeze: Duration,
    /// How many catch-up rounds a switch tries before it gives up (and
    /// prepares resume).
    pub switch_attempts: u32,
    /// The driver's lease on its migration, renewed by every chunk: a re-run
    /// after a crash takes the migration over once it ended.
    pub lease: Duration,
}

impl Default for ReindexConfig {
    fn default() -> Self {
        Self {
            chunk: 512,
            state_ttl: Duration::from_secs(1),
            switch_freeze: Duration::from_secs(10),
            switch_attempts: 20,
            lease: Duration::from_secs(10),
        }
    }
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            call_deadline: Duration::from_secs(30),
            cleanup_deadline: Duration::from_secs(10),
            lease: Duration::from_secs(300),
            retry: RetryPolicy::default(),
            limits: Limits::default(),
            search_overfetch: 1,
            recovery_batch: 256,
            orphan_grace: Duration::from_secs(600),
            overlap_index_write: true,
            write_mode: WriteMode::Sync,
            indexing: IndexingConfig::default(),
            reindex: ReindexConfig::default(),
        }
    }
}

impl CoordinatorConfig {
    /// Checks the relations that the protocol's safety relies on.
    pub fn validate(&self) -> Result<(), CoordinatorError> {
        // A call must finish (or give up) long before recovery may take its
        // intent: otherwise a slow index write could land after recovery deleted
        // the intent's points, leaving an orphan nothing names.
        if self.call_deadline + self.cleanup_deadline >= self.lease {
            return Err(CoordinatorError::Config(format!(
                "lease ({:?}) must exceed call_deadline + cleanup_deadline ({:?})",
                self.lease,
                self.call_deadline + self.cleanup_deadline
            )));
        }
        if self.orphan_grace < self.lease {
            return Err(CoordinatorError::Config(format!(
                "orphan_grace ({:?}) must be at least the lease ({:?})",
                self.orphan_grace, self.lease
            )));
        }
        if self.retry.max_attempts == 0 {
            return Err(CoordinatorError::Config(
                "retry.max_attempts must be at least 1".into(),
            ));
        }
        let l = &self.limits;
        if l.max_batch == 0 || l.index_chunk == 0 || l.index_parallelism == 0 {
            return Err(CoordinatorError::Config(
                "limits must be positive (max_batch, index_chunk, index_parallelism)".into(),
            ));
        }
        if self.search_overfetch == 0 || self.recovery_batch == 0 {
            return Err(CoordinatorError::Config(
                "search_overfetch and recovery_batch must be positive".into(),
            ));
        }
        if self.indexing.batch == 0 || self.indexing.max_attempts == 0 || self.indexing.lanes == 0 {
            return Err(CoordinatorError::Config(
                "indexing.batch, indexing.max_attempts and indexing.lanes must be positive".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        CoordinatorConfig::default().validate().unwrap();
    }

    #[test]
    fn lease_shorter_than_deadline_is_rejected() {
        let c = CoordinatorConfig {
            lease: Duration::from_secs(5),
            ..CoordinatorConfig::default()
        };
        assert!(matches!(c.validate(), Err(CoordinatorError::Config(_))));
    }

    #[test]
    fn full_jitter_stays_within_the_cap() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
        };
        for retry in 1..10 {
            let cap = Duration::from_millis(10 * (1 << (retry - 1))).min(p.max_backoff);
            for _ in 0..50 {
                assert!(p.backoff(retry, None) <= cap);
            }
        }
        let hint = Duration::from_millis(500);
        assert!(p.backoff(1, Some(hint)) >= hint);
    }
}
