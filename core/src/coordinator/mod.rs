//! The coordinator: the whole consistency protocol, in one place.
//!
//! See `docs/protocol.md` for the mechanism and why each step is there.

mod index;
mod read;
mod reconcile;
mod recovery;
mod reindex;
mod retry;
mod saga;
mod validate;
mod write;

pub use index::{IndexReport, IndexToken, IndexWait};
pub use reindex::{ReindexOptions, ReindexReport};
pub use saga::SagaRun;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::clock::{Clock, SystemClock};
use crate::config::{CoordinatorConfig, WriteMode};
use crate::error::CoordinatorError;
use crate::model::{Filter, IntentId, PendingStats, PointId, PointInfo, RecordId, Scope};
use crate::ports::{IndexCatalog, MetadataRepo, RowRef, VectorIndex};
use crate::reindex::IndexState;

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
    /// After a rollback, resolve the intent although an index write request
    /// may still land (only a cut-off request counts as in flight: the rule
    /// before late-landing writes were handled).
    ResolveAfterUncertainWrite,
    /// Commit after an index write whose requests may still land without
    /// first naming its points in a guard intent.
    NoLateWriteGuard,
    /// Batched recovery resolves every claimed intent of the batch, also those
    /// whose garbage could not be deleted.
    RecoverBatchResolvesAll,
    /// A saga's compensation undoes its steps first to last instead of last
    /// to first.
    CompensateInWrongOrder,
    /// Recovery drives every live saga, expired or not, without taking it
    /// over (no lease, no fencing).
    ResumeSagaWithoutLease,
    /// A saga step's commit deletes the points it superseded or deleted at
    /// once, although the live saga still needs them for a compensation.
    CollectHeldGarbage,
    /// A saga's caller action (or compensation) runs without the driver
    /// renewing the saga's lease, so recovery takes over a live saga whose
    /// action is merely slow.
    ActionWithoutHeartbeat,
    /// A deferred delete deletes the records' points from the index before
    /// its commit (to make deletes "immediate"): a commit that then fails
    /// leaves committed rows without their points.
    DeferredDeleteBeforeCommit,
    /// Index workers count transient failures (the index down, slow) as
    /// the entries' own attempts, so an outage dead-letters the backlog.
    DeadLetterTransient,
    /// A re-index commits a chunk's cursor before it writes the chunk into
    /// the target: a crash in between leaves rows behind the cursor that
    /// the target lacks, and the switch then breaks I1.
    ReindexCursorBeforeWrite,
}

#[cfg(feature = "planted-bugs")]
impl PlantedBug {
    /// Every planted bug.
    pub const ALL: [PlantedBug; 17] = [
        PlantedBug::CompensateOnUnknown,
        PlantedBug::RecoverIgnoringLeases,
        PlantedBug::DeleteOldPointsBeforeCommit,
        PlantedBug::IndexWriteBeforeIntent,
        PlantedBug::OverwritePointInPlace,
        PlantedBug::UnguardedSearch,
        PlantedBug::ResolveBeforeCleanup,
        PlantedBug::ResolveAfterUncertainWrite,
        PlantedBug::NoLateWriteGuard,
        PlantedBug::RecoverBatchResolvesAll,
        PlantedBug::CompensateInWrongOrder,
        PlantedBug::ResumeSagaWithoutLease,
        PlantedBug::CollectHeldGarbage,
        PlantedBug::ActionWithoutHeartbeat,
        PlantedBug::DeferredDeleteBeforeCommit,
        PlantedBug::DeadLetterTransient,
        PlantedBug::ReindexCursorBeforeWrite,
    ];
}

/// Options of one write call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// A retried call with the same key returns the first call's outcome and
    /// writes nothing; the same key with a different request is rejected.
    pub idempotency_key: Option<String>,
    /// How this call reaches the index; `None`: the configured default
    /// ([`CoordinatorConfig::write_mode`]).
    pub write_mode: Option<WriteMode>,
}

impl WriteOptions {
    /// Options with an idempotency key.
    pub fn idempotent(key: impl Into<String>) -> Self {
        Self {
            idempotency_key: Some(key.into()),
            write_mode: None,
        }
    }

    /// These options with a write mode.
    pub fn with_mode(mut self, mode: WriteMode) -> Self {
        self.write_mode = Some(mode);
        self
    }

    /// Deferred-mode options ([`WriteMode::Deferred`]).
    pub fn deferred() -> Self {
        Self::default().with_mode(WriteMode::Deferred)
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
    /// A deferred write: the records are committed but not yet searchable
    /// (an update: found through its previous vector); wait for them with
    /// [`Coordinator::wait_indexed`]. `None` for a synchronous write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_token: Option<IndexToken>,
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
    /// Intents (and sagas) whose handling failed; they stay and a later run
    /// retries them.
    pub failed: usize,
    /// Live sagas whose lease had ended, claimed.
    pub sagas_claimed: usize,
    /// Claimed sagas finished forward.
    pub sagas_done: usize,
    /// Claimed sagas compensated.
    pub sagas_compensated: usize,
    /// Claimed sagas that ended `Failed` (an operator must look).
    pub sagas_failed: usize,
    /// Claimed sagas left alone: no definition of theirs is registered here.
    pub sagas_skipped: usize,
}

/// Counts of one scope in both stores.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ScopeCounts {
    /// Committed rows.
    pub rows: u64,
    /// Points in the index.
    pub points: u64,
    /// Of the rows, those never indexed yet (deferred writes of new records
    /// waiting for a worker, or dead-lettered): they have no point.
    pub unindexed: u64,
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
    /// Unresolved intents (pending work for recovery, calls in flight, or
    /// steps of live sagas). Spent intents ([`Intent::is_spent`](crate::Intent::is_spent))
    /// are not counted: they guard nothing.
    pub live_intents: usize,
    /// Of those, intents held by a live saga (its steps' superseded points,
    /// kept for its compensation): they end with the saga, not by recovery.
    pub held_intents: usize,
    /// Points named by unresolved intents.
    pub intent_points: usize,
    /// Rows never indexed yet (new records of deferred writes, waiting or
    /// dead-lettered): not drift, the index workers' backlog.
    pub unindexed: usize,
    /// Deferred writes waiting for an index worker.
    pub pending_index: u64,
    /// Dead-lettered records (reported apart: not drift, an operator's
    /// decision).
    pub dead_letters: u64,
}

impl VerifyReport {
    /// Both stores agree exactly: no missing points, no orphans, no pending
    /// intents, no deferred write waiting, and per scope as many points as
    /// rows (but for dead-lettered records never indexed).
    pub fn is_consistent(&self) -> bool {
        self.missing_points.is_empty()
            && self.orphan_points.is_empty()
            && self.live_intents == 0
            && self.pending_index == 0
            && self.scopes.values().all(ScopeCounts::in_sync)
    }
}

/// Where a paged verification ([`Coordinator::verify_page`]) stands: the
/// next page of rows (in record id order) and of points (in the index's own
/// order) still to check. The default starts a new pass.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VerifyCursor {
    /// The rows after this record id are still to check (`None`: from the first).
    pub rows_after: Option<RecordId>,
    /// Every row has been checked.
    pub rows_done: bool,
    /// The points from this offset on are still to check (`None`: from the first).
    pub points_offset: Option<PointId>,
    /// Every point has been checked.
    pub points_done: bool,
}

impl VerifyCursor {
    /// The pass has checked every row and every point.
    pub fn is_done(&self) -> bool {
        self.rows_done && self.points_done
    }
}

/// What one step of a paged verification found.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct VerifyPage {
    /// Rows and points checked in this step, per scope.
    pub scopes: BTreeMap<Scope, ScopeCounts>,
    /// Committed rows of this step whose point is missing from the index.
    pub missing_points: Vec<RowRef>,
    /// Points of this step referenced by no row and named by no live intent.
    pub orphan_points: Vec<PointInfo>,
    /// Where the next step starts.
    pub next: VerifyCursor,
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
    /// Unresolved intents, but for spent ones.
    pub live_intents: usize,
    /// Of those, intents held by a live saga: they end with the saga (not
    /// by recovery), however long it runs.
    pub held_intents: usize,
    /// Of those, intents not held by a saga whose lease has ended
    /// (recovery's backlog).
    pub expired_intents: usize,
    /// Spent intents ([`Intent::is_spent`](crate::Intent::is_spent)):
    /// committed, naming no point, kept only to settle a lost reply until
    /// recovery resolves them in a batch after their lease (deferred
    /// upserts leave one each). Not work in flight.
    pub spent_intents: usize,
    /// The deferred-indexing backlog (`None` if the store has no deferred
    /// indexing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending: Option<PendingStats>,
}

/// Keeps a [`MetadataRepo`] and a [`VectorIndex`] consistent.
///
/// Every batch upsert and delete is all-or-nothing across both stores, through
/// errors, timeouts, lost replies and crashes; see `docs/protocol.md`.
/// A usage example with the in-memory backends is in the README (compiled as
/// a doctest of `tandem-adapters`).
pub struct Coordinator<M, V> {
    repo: M,
    /// The active collection's index, as this process last read it.
    active: std::sync::RwLock<ActiveIndex<V>>,
    /// Opens the collections a re-index names (none: the configured one only).
    catalog: Option<Arc<dyn IndexCatalog<Index = V>>>,
    config: CoordinatorConfig,
    clock: Arc<dyn Clock>,
    /// Saga definitions by name ([`Coordinator::register_saga`]).
    sagas: std::sync::RwLock<HashMap<String, Arc<crate::saga::SagaDefinition>>>,
    #[cfg(feature = "planted-bugs")]
    bug: Option<PlantedBug>,
}

/// The collection this process writes and searches, with the generation of
/// the store's [`IndexState`] it belongs to.
struct ActiveIndex<V> {
    generation: u64,
    /// Its name, once a switch named it (`None`: the configured collection).
    name: Option<String>,
    index: Arc<V>,
    /// When the store's state was last read (`None`: never).
    checked: Option<std::time::Instant>,
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
            active: std::sync::RwLock::new(ActiveIndex {
                generation: 0,
                name: None,
                index: Arc::new(index),
                checked: None,
            }),
            catalog: None,
            config,
            clock: Arc::new(SystemClock),
            sagas: std::sync::RwLock::new(HashMap::new()),
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

    /// Opens the collections a re-index creates and switches to through
    /// `catalog` (see [`reindex`](Self::reindex)). Without one, a coordinator
    /// can only use the collection it was given, and fails once the store
    /// names another active.
    ///
    /// `configured` names the collection this coordinator was given: the
    /// active one until a switch names another.
    pub fn with_catalog(
        mut self,
        catalog: Arc<dyn IndexCatalog<Index = V>>,
        configured: impl Into<String>,
    ) -> Self {
        self.catalog = Some(catalog);
        self.active
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .name = Some(configured.into());
        self
    }

    /// The active collection's index, as this process last read it.
    pub fn index(&self) -> Arc<V> {
        Arc::clone(&self.read_active().index)
    }

    /// The generation of the active collection this process uses.
    pub fn generation(&self) -> u64 {
        self.read_active().generation
    }

    fn read_active(&self) -> std::sync::RwLockReadGuard<'_, ActiveIndex<V>> {
        self.active
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads the store's [`IndexState`] and, if a switch named another
    /// collection active, opens it (through the catalog) and uses it from
    /// now on. Returns the state.
    pub async fn refresh_index(&self) -> Result<IndexState, CoordinatorError> {
        let deadline = tokio::time::Instant::now() + self.config.call_deadline;
        let state = self
            .metadata_call("metadata.index_state", deadline, || self.repo.index_state())
            .await?;
        let (generation, name) = {
            let active = self.read_active();
            (active.generation, active.name.clone())
        };
        let moved = state
            .active
            .as_ref()
            .filter(|target| state.generation > generation && name.as_ref() != Some(*target));
        if let Some(target) = moved {
            let Some(catalog) = &self.catalog else {
                return Err(CoordinatorError::Config(format!(
                    "the store names collection {target:?} active (a re-index switched \
                     to it), but this coordinator has no index catalog to open it"
                )));
            };
            let opened = self
                .index_call("index.open", deadline, || catalog.open(target))
                .await?;
            let mut active = self
                .active
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if active.generation < state.generation {
                active.index = Arc::new(opened);
                active.name = Some(target.clone());
            }
        }
        let mut active = self
            .active
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        active.generation = active.generation.max(state.generation);
        active.checked = Some(std::time::Instant::now());
        Ok(state)
    }

    /// Reads the active collection now (on a store with re-indexing): what
    /// recovery, `verify`, `repair` and `stats` work on must be the active
    /// collection, not a cached one.
    async fn refresh_now(&self) -> Result<(), CoordinatorError> {
        if self.repo.reindexing() {
            self.refresh_index().await?;
        }
        Ok(())
    }

    /// Refreshes the active collection if it was last read longer than
    /// [`ReindexConfig::state_ttl`](crate::ReindexConfig::state_ttl) ago
    /// (reads follow a switch within that time).
    async fn refresh_if_stale(&self) -> Result<(), CoordinatorError> {
        if !self.repo.reindexing() {
            return Ok(());
        }
        let stale = self
            .read_active()
            .checked
            .is_none_or(|at| at.elapsed() >= self.config.reindex.state_ttl);
        if stale {
            self.refresh_index().await?;
        }
        Ok(())
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
    ResolveAfterUncertainWrite,
    NoLateWriteGuard,
    RecoverBatchResolvesAll,
    CompensateInWrongOrder,
    ResumeSagaWithoutLease,
    CollectHeldGarbage,
    ActionWithoutHeartbeat,
    DeferredDeleteBeforeCommit,
    DeadLetterTransient,
    ReindexCursorBeforeWrite,
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
                write_mode: None,
            },
        ));
        assert_send(c.delete(DeleteSelector::Scope(Scope::new("s"))));
        assert_send(c.search(Box::leak(Box::new(SearchQuery::new(vec![1.0], 1)))));
        assert_send(c.recover());
        assert_send(c.verify(None));
        assert_send(c.verify_page(None, Box::leak(Box::new(VerifyCursor::default())), 10));
        assert_send(c.get(Box::leak(Box::new(Vec::new()))));
        assert_send(c.repair(None));
        assert_send(c.stats());
        assert_send(c.index_pending());
        assert_send(c.wait_indexed(
            Box::leak(Box::new(IndexToken::default())),
            std::time::Duration::from_secs(1),
        ));
    }
}
