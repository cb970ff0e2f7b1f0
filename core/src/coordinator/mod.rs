//! The coordinator: the whole consistency protocol, in one place.
//!
//! See `docs/protocol.md` for the mechanism and why each step is there.

mod read;
mod reconcile;
mod recovery;
mod retry;
mod validate;
mod write;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::clock::{Clock, SystemClock};
use crate::config::CoordinatorConfig;
use crate::error::CoordinatorError;
use crate::model::{Filter, IntentId, PointInfo, RecordId, Scope};
use crate::ports::{MetadataRepo, RowRef, VectorIndex};

/// Deliberate protocol bugs, compiled in only with the `planted-bugs` feature, to
/// prove that the fault and property suites catch each one.
#[cfg(feature = "planted-bugs")]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PlantedBug {
    /// On an ambiguous commit, compensate (delete the new points) and report
    /// failure without settling the outcome.
    CompensateOnUnknown,
    /// Recovery cleans every intent, expired or not, and does not claim (fence)
    /// the live ones.
    RecoverIgnoringLeases,
    /// Delete the old points of an update before the commit.
    DeleteOldPointsBeforeCommit,
    /// Write the index before the intent is recorded.
    IndexWriteBeforeIntent,
    /// Updates overwrite the row's current point in place instead of writing a
    /// new point id.
    OverwritePointInPlace,
    /// Search returns index hits without checking the committed rows.
    UnguardedSearch,
    /// Resolve the intent before the old points are deleted.
    ResolveBeforeCleanup,
}

#[cfg(feature = "planted-bugs")]
impl PlantedBug {
    /// Every planted bug.
    pub const ALL: [PlantedBug; 7] = [
        PlantedBug::CompensateOnUnknown,
        PlantedBug::RecoverIgnoringLeases,
        PlantedBug::DeleteOldPointsBeforeCommit,
        PlantedBug::IndexWriteBeforeIntent,
        PlantedBug::OverwritePointInPlace,
        PlantedBug::UnguardedSearch,
        PlantedBug::ResolveBeforeCleanup,
    ];
}

/// Options of one write call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// A retried call with the same key returns the first call's outcome and
    /// writes nothing; the same key with a different request is rejected.
    pub idempotency_key: Option<String>,
}

impl WriteOptions {
    /// Options with an idempotency key.
    pub fn idempotent(key: impl Into<String>) -> Self {
        Self {
            idempotency_key: Some(key.into()),
        }
    }
}

/// What an upsert did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpsertReport {
    /// The intent that carried the write.
    pub intent: IntentId,
    /// The records' ids, in input order (generated ones included).
    pub ids: Vec<RecordId>,
    /// Records inserted.
    pub inserted: u64,
    /// Records updated.
    pub updated: u64,
    /// Superseded points whose deletion was left to recovery (never visible).
    pub deferred_cleanup: usize,
    /// The call was answered from its idempotency key; nothing was written.
    #[serde(default)]
    pub replayed: bool,
}

/// What a delete did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteReport {
    /// The intent that carried the delete.
    pub intent: IntentId,
    /// Records deleted.
    pub deleted: u64,
    /// Points whose deletion was left to recovery (never visible).
    pub deferred_cleanup: usize,
    /// The call was answered from its idempotency key; nothing was written.
    #[serde(default)]
    pub replayed: bool,
}

/// A guarded similarity search.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SearchQuery {
    /// The query vector.
    pub vector: Vec<f32>,
    /// How many hits at most.
    pub k: usize,
    /// Scope and metadata conditions.
    #[serde(default)]
    pub filter: Filter,
    /// Only hits scoring at least this.
    #[serde(default)]
    pub score_threshold: Option<f32>,
}

impl SearchQuery {
    /// The `k` nearest records to `vector`, unfiltered.
    pub fn new(vector: Vec<f32>, k: usize) -> Self {
        Self {
            vector,
            k,
            filter: Filter::default(),
            score_threshold: None,
        }
    }
    /// Restricts the search.
    pub fn with_filter(mut self, filter: Filter) -> Self {
        self.filter = filter;
        self
    }
}

/// What a recovery run did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RecoveryReport {
    /// Expired intents claimed.
    pub claimed: usize,
    /// Intents resolved.
    pub resolved: usize,
    /// Garbage points deleted from the index.
    pub points_deleted: usize,
    /// Intents whose handling failed; they stay and a later run retries them.
    pub failed: usize,
}

/// Counts of one scope in both stores.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ScopeCounts {
    /// Committed rows.
    pub rows: u64,
    /// Points in the index.
    pub points: u64,
}

/// What `verify` found.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct VerifyReport {
    /// Counts per scope in both stores.
    pub scopes: BTreeMap<Scope, ScopeCounts>,
    /// Committed rows whose point is missing from the index (violates I1).
    pub missing_points: Vec<RowRef>,
    /// Points referenced by no row and named by no live intent (violates I2).
    pub orphan_points: Vec<PointInfo>,
    /// Unresolved intents (pending work for recovery or calls in flight).
    pub live_intents: usize,
    /// Points named by unresolved intents.
    pub intent_points: usize,
}

impl VerifyReport {
    /// Both stores agree exactly: no missing points, no orphans, no pending
    /// intents, and per scope as many points as rows.
    pub fn is_consistent(&self) -> bool {
        self.missing_points.is_empty()
            && self.orphan_points.is_empty()
            && self.live_intents == 0
            && self.scopes.values().all(|c| c.rows == c.points)
    }
}

/// What `repair` did.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RepairReport {
    /// Orphan points deleted (older than the grace period, re-checked first).
    pub orphans_deleted: usize,
    /// Orphans left because they are younger than the grace period.
    pub orphans_too_young: usize,
    /// Missing points rewritten from vectors kept in the metadata store.
    pub missing_rewritten: usize,
    /// Missing points that could not be rewritten (the store keeps no vectors).
    pub missing_unrepairable: usize,
    /// A verify after the repair.
    pub after: VerifyReport,
}

/// A snapshot of both stores.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Committed rows per scope.
    pub rows_by_scope: BTreeMap<Scope, u64>,
    /// Points in the index.
    pub points: u64,
    /// Unresolved intents.
    pub live_intents: usize,
    /// Unresolved intents whose lease has ended (recovery's backlog).
    pub expired_intents: usize,
}

/// Keeps a [`MetadataRepo`] and a [`VectorIndex`] consistent.
///
/// Every batch upsert and delete is all-or-nothing across both stores, through
/// errors, timeouts, lost replies and crashes; see `docs/protocol.md`.
/// A usage example with the in-memory backends is in the README (compiled as
/// a doctest of `tandem-adapters`).
pub struct Coordinator<M, V> {
    repo: M,
    index: V,
    config: CoordinatorConfig,
    clock: Arc<dyn Clock>,
    #[cfg(feature = "planted-bugs")]
    bug: Option<PlantedBug>,
}

impl<M, V> std::fmt::Debug for Coordinator<M, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("config", &self.config)
            .field("clock", &self.clock)
            .finish_non_exhaustive()
    }
}

impl<M: MetadataRepo, V: VectorIndex> Coordinator<M, V> {
    /// A coordinator over the two stores. Fails if the configuration breaks a
    /// relation the protocol relies on (see [`CoordinatorConfig::validate`]).
    pub fn new(repo: M, index: V, config: CoordinatorConfig) -> Result<Self, CoordinatorError> {
        config.validate()?;
        Ok(Self {
            repo,
            index,
            config,
            clock: Arc::new(SystemClock),
            #[cfg(feature = "planted-bugs")]
            bug: None,
        })
    }

    /// Uses another clock for leases (tests use a manual one).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Plants a deliberate protocol bug (feature `planted-bugs`).
    #[cfg(feature = "planted-bugs")]
    pub fn with_planted_bug(mut self, bug: PlantedBug) -> Self {
        self.bug = Some(bug);
        self
    }

    /// The metadata store.
    pub fn repo(&self) -> &M {
        &self.repo
    }

    /// The vector index.
    pub fn index(&self) -> &V {
        &self.index
    }

    /// The configuration.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    #[cfg(feature = "planted-bugs")]
    fn bug(&self, bug: PlantedBug) -> bool {
        self.bug == Some(bug)
    }

    #[cfg(not(feature = "planted-bugs"))]
    #[inline(always)]
    fn bug(&self, _bug: PlantedBugMarker) -> bool {
        false
    }

    fn lease_ms(&self) -> i64 {
        i64::try_from(self.config.lease.as_millis()).unwrap_or(i64::MAX)
    }
}

/// Without the `planted-bugs` feature the bug checks compile to `false`.
#[cfg(not(feature = "planted-bugs"))]
#[derive(Clone, Copy)]
pub(crate) enum PlantedBugMarker {
    CompensateOnUnknown,
    RecoverIgnoringLeases,
    DeleteOldPointsBeforeCommit,
    IndexWriteBeforeIntent,
    OverwritePointInPlace,
    UnguardedSearch,
    ResolveBeforeCleanup,
}

#[cfg(feature = "planted-bugs")]
pub(crate) use PlantedBug as Bug;
#[cfg(not(feature = "planted-bugs"))]
pub(crate) use PlantedBugMarker as Bug;

/// Every operation's future is `Send`, so services can `tokio::spawn` them.
#[cfg(test)]
mod send_check {
    use super::*;
    use crate::model::{DeleteSelector, Scope};

    fn assert_send<T: Send>(_: T) {}

    #[allow(dead_code, clippy::let_underscore_future)]
    fn operations_are_send<M: MetadataRepo + 'static, V: VectorIndex + 'static>(
        c: &'static Coordinator<M, V>,
    ) {
        assert_send(c.upsert(Vec::new()));
        assert_send(c.upsert_with(
            Vec::new(),
            &WriteOptions {
                idempotency_key: None,
            },
        ));
        assert_send(c.delete(DeleteSelector::Scope(Scope::new("s"))));
        assert_send(c.search(Box::leak(Box::new(SearchQuery::new(vec![1.0], 1)))));
        assert_send(c.recover());
        assert_send(c.verify(None));
        assert_send(c.repair(None));
        assert_send(c.stats());
    }
}
