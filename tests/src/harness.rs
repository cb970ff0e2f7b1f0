//! The fault-injection harness: a "world" of two stores reached through fault
//! wrappers, the operations the suites run, and the exhaustive single-fault
//! enumeration (every operation × every port call it makes × every fault).
//!
//! It is generic over the backends, so the same enumeration runs against the
//! in-memory stores, PostgreSQL, SQLite, the Qdrant test server, ...

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::json;
use tandem_adapters::memory::InMemoryCatalog;
use tandem_core::testkit::clock::ManualClock;
use tandem_core::testkit::faults::{
    Call, Fault, FaultController, FaultyCatalog, FaultyMetadataRepo, FaultyVectorIndex, Rule,
    run_until_crash,
};
use tandem_core::{
    CommitStep, CommitSummary, Coordinator, CoordinatorConfig, CoordinatorError, DeleteSelector,
    IntentId, IntentKind, Limits, MetadataRepo, NewIntent, NewRecord, Outcome, OwnerToken,
    PlantedBug, Point, PointId, RecordId, RetryPolicy, RowWrite, SagaContext, SagaDefinition,
    SagaOutcome, SagaState, Scope, StepDefinition, StoredRecord, Transaction, VectorIndex,
    WriteMode, WriteOptions,
};
use uuid::Uuid;

use crate::invariants;

/// Vector dimension of every harness world.
pub const DIM: usize = 4;

/// A deterministic, non-zero vector for record `n` at version `v`.
pub fn vector_for(n: u128, v: u32) -> Vec<f32> {
    let x = (n % 97) as f32 + 1.0;
    let y = v as f32 + 1.0;
    vec![x, y, (n % 7) as f32 + 0.5, 1.0 / x]
}

/// The record id of seed or batch record `n`.
pub fn rid(n: u128) -> RecordId {
    RecordId(Uuid::from_u128(n))
}

/// A configuration for fault suites: short deadlines, fast retries, tiny
/// chunks (so that batches span several index calls) and small recovery
/// rounds (so that recovery loops).
pub fn fault_config(deadline: Duration) -> CoordinatorConfig {
    CoordinatorConfig {
        call_deadline: deadline,
        cleanup_deadline: deadline,
        lease: Duration::from_secs(600),
        retry: RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(2),
            max_backoff: Duration::from_millis(20),
        },
        limits: Limits {
            index_chunk: 2,
            index_parallelism: 2,
            ..Limits::default()
        },
        search_overfetch: 2,
        recovery_batch: 2,
        orphan_grace: Duration::from_secs(600),
        // The production default: the commit overlaps the index write.
        overlap_index_write: true,
        write_mode: tandem_core::WriteMode::Sync,
        // Small batches (so that a backlog takes several), quick back-off.
        indexing: tandem_core::IndexingConfig {
            batch: 2,
            max_attempts: 3,
            retry_backoff: Duration::from_millis(5),
            max_retry_backoff: Duration::from_millis(40),
            idle_poll: Duration::from_millis(5),
            // One lane: a single-fault case's calls come in one order (the
            // property suite's `IndexRace` runs workers side by side).
            lanes: 1,
        },
        // Tiny chunks, so that a copy spans several rounds.
        reindex: tandem_core::ReindexConfig {
            chunk: 2,
            ..tandem_core::ReindexConfig::default()
        },
    }
}

/// Two stores, a fault controller in front of them, and a manual clock.
pub struct World<M, V> {
    /// The metadata store (unwrapped).
    pub repo: Arc<M>,
    /// The index (unwrapped).
    pub index: Arc<V>,
    /// Drives the fault wrappers.
    pub ctl: FaultController,
    /// The clock every coordinator of this world uses.
    pub clock: ManualClock,
    /// The coordinators' configuration.
    pub config: CoordinatorConfig,
    /// A deliberate protocol bug planted in every coordinator of this world.
    pub bug: Option<PlantedBug>,
    /// The external system the harness saga's action publishes to.
    pub ledger: Ledger,
    /// More saga definitions every coordinator of this world registers.
    pub sagas: Vec<SagaDefinition>,
    /// The index's collections, for re-indexing ([`World::with_catalog`]):
    /// the world's index is collection [`MAIN`].
    pub catalog: Option<Arc<InMemoryCatalog<V>>>,
}

/// The name of a world's own collection in its catalog.
pub const MAIN: &str = "main";

/// What the harness saga's caller action published, by its step key: an
/// external system, outside both stores, that the action makes idempotent
/// with its key and its compensation undoes.
pub type Ledger = Arc<Mutex<BTreeSet<String>>>;

/// The keys the ledger holds.
pub fn ledger_keys(ledger: &Ledger) -> BTreeSet<String> {
    ledger
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

/// A record of the harness's scenarios: record `n` at version tag `v`.
fn rec(n: u128, v: u32, scope: &str) -> NewRecord {
    NewRecord::new(scope, format!("record {n} v{v}"), vector_for(n, v))
        .with_id(rid(n))
        .with_metadata(json!({ "item": "z", "v": v }))
}

/// The harness's saga, "publish a repriced catalog": two Tandem steps that
/// both touch record 1 (so that compensating them in the wrong order shows),
/// then a caller action that publishes to the [`Ledger`] — and, with input
/// `{"fail": true}`, is refused, so that the saga compensates both steps.
pub fn harness_saga(ledger: Ledger) -> SagaDefinition {
    let undo = ledger.clone();
    SagaDefinition::new("harness")
        .step(StepDefinition::tandem("reprice", |_| {
            Ok(Transaction::new().upsert(vec![rec(1, 5, "a"), rec(0x2201, 0, "a")]))
        }))
        .step(StepDefinition::tandem("retire", |_| {
            Ok(Transaction::new()
                .upsert(vec![rec(1, 6, "a")])
                .delete(DeleteSelector::Ids(vec![rid(5)])))
        }))
        .step(StepDefinition::action(
            "publish",
            move |ctx| {
                let ledger = ledger.clone();
                async move {
                    if ctx.input["fail"] == json!(true) {
                        return Err("the publisher refused the catalog".into());
                    }
                    ledger
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(ctx.key);
                    Ok(json!({ "published": true }))
                }
            },
            move |ctx| {
                let ledger = undo.clone();
                async move {
                    ledger
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&ctx.key);
                    Ok(())
                }
            },
        ))
}

/// Reads whether a [`CallerStep`]'s write is in the store.
pub type StepApplied<M> =
    Arc<dyn for<'a> Fn(&'a M) -> BoxFuture<'a, Result<bool, String>> + Send + Sync>;

/// The caller's own step for the [`Scenario::TransactionStep`] case, for one
/// store: the step (it marks catalog "a" as indexed in the caller's own table,
/// in the store's own language), and how to read whether that happened.
pub struct CallerStep<M> {
    /// The step.
    pub step: Arc<dyn CommitStep>,
    /// Whether its write is in the store.
    pub applied: StepApplied<M>,
}

/// The caller step on the in-memory store: the catalog's status in the
/// store's own tables ([`InMemoryTables`](tandem_adapters::memory::InMemoryTables)).
pub fn memory_caller_step() -> CallerStep<tandem_adapters::memory::InMemoryMetadataRepo> {
    use tandem_adapters::memory::{InMemoryMetadataRepo, InMemoryTables};
    CallerStep {
        step: Arc::new(tandem_core::SqlStep::new(|tables: &mut InMemoryTables| {
            Box::pin(async move {
                tables.insert("catalogs", "a", json!({ "status": "indexed" }));
                Ok(())
            })
        })),
        applied: Arc::new(|repo: &InMemoryMetadataRepo| {
            let found = repo.tables().get("catalogs", "a").is_some();
            Box::pin(async move { Ok(found) })
        }),
    }
}

impl<M> Clone for CallerStep<M> {
    fn clone(&self) -> Self {
        Self {
            step: self.step.clone(),
            applied: self.applied.clone(),
        }
    }
}

/// The coordinator that sees faults.
pub type FaultyCoordinator<M, V> =
    Coordinator<FaultyMetadataRepo<Arc<M>>, FaultyVectorIndex<Arc<V>>>;

impl<M: MetadataRepo + 'static, V: VectorIndex + 'static> World<M, V> {
    /// A world over the given stores.
    pub fn new(repo: M, index: V, config: CoordinatorConfig, seed: u64) -> Self {
        Self {
            repo: Arc::new(repo),
            index: Arc::new(index),
            ctl: FaultController::new(seed),
            clock: ManualClock::new(1_700_000_000_000),
            config,
            bug: None,
            ledger: Ledger::default(),
            sagas: Vec::new(),
            catalog: None,
        }
    }

    /// Gives the world a catalog (its index is collection [`MAIN`]; `make`
    /// creates the others), so that its coordinators can re-index.
    pub fn with_catalog(
        mut self,
        make: impl Fn(usize, tandem_core::Distance) -> V + Send + Sync + 'static,
    ) -> Self {
        let catalog = InMemoryCatalog::with_factory(make);
        catalog.insert(MAIN, self.index.clone());
        self.catalog = Some(Arc::new(catalog));
        self
    }

    fn with_sagas<R: MetadataRepo, X: VectorIndex>(
        &self,
        c: Coordinator<R, X>,
    ) -> Coordinator<R, X> {
        c.register_saga(harness_saga(self.ledger.clone()))
            .expect("the harness saga is valid");
        c.register_saga(SagaDefinition::dynamic("harness-dynamic"))
            .expect("the dynamic harness saga is valid");
        for saga in &self.sagas {
            c.register_saga(saga.clone()).expect("a valid saga");
        }
        match self.bug {
            Some(bug) => c.with_planted_bug(bug),
            None => c,
        }
    }

    /// A coordinator whose port calls go through the fault wrappers.
    pub fn faulty(&self) -> FaultyCoordinator<M, V> {
        let c = Coordinator::new(
            FaultyMetadataRepo::new(self.repo.clone(), self.ctl.clone()),
            FaultyVectorIndex::new(self.index.clone(), self.ctl.clone()),
            self.config.clone(),
        )
        .expect("valid config")
        .with_clock(Arc::new(self.clock.clone()));
        let c = match &self.catalog {
            Some(catalog) => c.with_catalog(
                Arc::new(FaultyCatalog::new(catalog.clone(), self.ctl.clone())),
                MAIN,
            ),
            None => c,
        };
        self.with_sagas(c)
    }

    /// A coordinator of a "restarted process": no faults, no in-process state.
    pub fn clean(&self) -> Coordinator<Arc<M>, Arc<V>> {
        let c = Coordinator::new(self.repo.clone(), self.index.clone(), self.config.clone())
            .expect("valid config")
            .with_clock(Arc::new(self.clock.clone()));
        let c = match &self.catalog {
            Some(catalog) => c.with_catalog(catalog.clone(), MAIN),
            None => c,
        };
        self.with_sagas(c)
    }

    /// Lands the index writes that met [`Fault::LandLater`]: they reach the
    /// index now, after the call that sent them returned (and before any
    /// lease ends: call this before [`after_leases`](Self::after_leases)).
    pub async fn land_deferred(&self) {
        for points in self.ctl.take_deferred() {
            self.index
                .upsert(&points)
                .await
                .expect("a late-landing write reaches the index");
        }
    }

    /// The active collection's index: the one the store's state names (in
    /// the catalog), or the world's own.
    pub async fn active_index(&self) -> Result<Arc<V>, String> {
        let (Some(catalog), true) = (&self.catalog, self.repo.reindexing()) else {
            return Ok(self.index.clone());
        };
        let state = self
            .repo
            .index_state()
            .await
            .map_err(|e| format!("index_state: {e}"))?;
        match state.active {
            Some(name) => tandem_core::IndexCatalog::open(&**catalog, &name)
                .await
                .map_err(|e| format!("opening the active collection {name:?}: {e}")),
            None => Ok(self.index.clone()),
        }
    }

    /// Moves the clock past every lease taken so far.
    pub fn after_leases(&self) {
        self.clock
            .advance(self.config.lease + Duration::from_secs(1));
    }

    /// Writes the seed catalog: records 1–4 in scope "a" (item x, y, x, y) and
    /// 5–6 in scope "b".
    pub async fn seed(&self) {
        let records = (1..=6u128)
            .map(|n| {
                let scope = if n <= 4 { "a" } else { "b" };
                let item = if n % 2 == 1 { "x" } else { "y" };
                NewRecord::new(scope, format!("seed {n}"), vector_for(n, 0))
                    .with_id(rid(n))
                    .with_metadata(json!({ "item": item, "n": n as u64 }))
            })
            .collect();
        self.clean().upsert(records).await.expect("seed");
    }
}

/// One operation of the exhaustive suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Three new records (with an idempotency key).
    Insert,
    /// Three existing records get new content and vectors.
    Update,
    /// Two existing records and one new one.
    Mixed,
    /// Delete two ids and a missing one (with an idempotency key).
    DeleteIds,
    /// Delete the whole scope "b".
    DeleteScope,
    /// Delete scope "a" items with `item = "x"`.
    DeleteMetadata,
    /// Recovery of a crashed insert and a committed update whose cleanup was
    /// deferred.
    Recovery,
    /// A transaction across scopes (with an idempotency key): delete scope
    /// "a"'s `item = "x"` records, insert a new one and record 3 again (deleted
    /// and upserted in one unit), update record 6 of scope "b".
    Transaction,
    /// A transaction with the caller's own step (see [`CallerStep`]): update
    /// record 2, delete record 4, mark the catalog indexed.
    TransactionStep,
    /// The harness saga ([`harness_saga`]), which completes.
    Saga,
    /// The harness saga whose last step (the caller action) is refused: both
    /// Tandem steps are compensated, in reverse order.
    SagaCompensates,
    /// A deferred upsert (with an idempotency key): two existing records and
    /// a new one, committed with their pending entries; then the index
    /// workers run to completion.
    DeferredUpsert,
    /// A deferred delete of two records and a missing id; then the workers
    /// (recovery) collect the points.
    DeferredDelete,
    /// An index worker's pass over a backlog of deferred writes (see
    /// [`deferred_backlog`]): claim, write, switch, collect.
    IndexWorker,
    /// A re-index of the seed into collection
    /// [`NEXT`](crate::reindex::NEXT) (a world with a catalog; run by
    /// [`exhaustive_reindex`](crate::reindex::exhaustive_reindex)).
    Reindex,
}

impl Scenario {
    /// Every scenario.
    pub const ALL: [Scenario; 11] = [
        Scenario::Insert,
        Scenario::Update,
        Scenario::Mixed,
        Scenario::DeleteIds,
        Scenario::DeleteScope,
        Scenario::DeleteMetadata,
        Scenario::Recovery,
        Scenario::Transaction,
        Scenario::TransactionStep,
        Scenario::Saga,
        Scenario::SagaCompensates,
    ];

    /// The scenarios of deferred indexing (stores with
    /// [`MetadataRepo::deferred_indexing`]).
    pub const DEFERRED: [Scenario; 3] = [
        Scenario::DeferredUpsert,
        Scenario::DeferredDelete,
        Scenario::IndexWorker,
    ];

    /// The scenarios of single writes (what every store runs first).
    pub const WRITES: [Scenario; 7] = [
        Scenario::Insert,
        Scenario::Update,
        Scenario::Mixed,
        Scenario::DeleteIds,
        Scenario::DeleteScope,
        Scenario::DeleteMetadata,
        Scenario::Recovery,
    ];

    /// The transaction of [`Scenario::Transaction`] or
    /// [`Scenario::TransactionStep`] (without its step).
    fn transaction(&self) -> Transaction {
        match self {
            Scenario::TransactionStep => Transaction::new()
                .upsert(vec![rec(2, 3, "a")])
                .delete(DeleteSelector::Ids(vec![rid(4)])),
            _ => Transaction::new()
                .delete(DeleteSelector::MetadataEq {
                    scope: Scope::new("a"),
                    key: "item".into(),
                    value: json!("x"),
                })
                .upsert(vec![rec(0x2101, 0, "a"), rec(3, 4, "a")])
                .upsert(vec![rec(6, 4, "b")]),
        }
    }

    fn batch(&self) -> Vec<NewRecord> {
        match self {
            Scenario::Insert => vec![
                rec(0x2001, 0, "a"),
                rec(0x2002, 0, "a"),
                rec(0x2003, 0, "b"),
            ],
            Scenario::Update => vec![rec(1, 1, "a"), rec(2, 1, "a"), rec(5, 1, "b")],
            Scenario::Mixed => vec![rec(1, 2, "a"), rec(6, 2, "b"), rec(0x2004, 0, "a")],
            Scenario::DeferredUpsert => {
                vec![rec(1, 7, "a"), rec(6, 7, "b"), rec(0x2005, 0, "a")]
            }
            _ => Vec::new(),
        }
    }

    fn selector(&self) -> Option<DeleteSelector> {
        match self {
            Scenario::DeleteIds | Scenario::DeferredDelete => {
                Some(DeleteSelector::Ids(vec![rid(1), rid(2), rid(0x9999)]))
            }
            Scenario::DeleteScope => Some(DeleteSelector::Scope(Scope::new("b"))),
            Scenario::DeleteMetadata => Some(DeleteSelector::MetadataEq {
                scope: Scope::new("a"),
                key: "item".into(),
                value: json!("x"),
            }),
            _ => None,
        }
    }

    fn options(&self) -> WriteOptions {
        match self {
            Scenario::Insert => WriteOptions::idempotent("insert-key"),
            Scenario::DeleteIds => WriteOptions::idempotent("delete-key"),
            Scenario::Transaction => WriteOptions::idempotent("transaction-key"),
            Scenario::DeferredUpsert => {
                WriteOptions::idempotent("deferred-key").with_mode(WriteMode::Deferred)
            }
            Scenario::DeferredDelete => WriteOptions::deferred(),
            _ => WriteOptions::default(),
        }
    }

    fn is_saga(&self) -> bool {
        matches!(self, Scenario::Saga | Scenario::SagaCompensates)
    }

    /// Whether the scenario is housekeeping (recovery, an index worker's
    /// pass), which writes no record: its answer is not an all-or-nothing
    /// outcome.
    fn is_housekeeping(&self) -> bool {
        matches!(self, Scenario::Recovery | Scenario::IndexWorker)
    }

    /// An exhaustive run of the scenario makes more cases than this: several
    /// port calls, each tried with all 9 single faults (a deferred write
    /// makes two calls: prepare and its one commit; the others at least
    /// three).
    pub fn least_cases(&self) -> usize {
        if matches!(self, Scenario::DeferredUpsert | Scenario::DeferredDelete) {
            2 * 9
        } else {
            3 * 9
        }
    }

    /// Whether the scenario leaves work to the index workers.
    pub fn is_deferred(&self) -> bool {
        Self::DEFERRED.contains(self)
    }
}

/// How a call ended, as its caller saw it.
#[derive(Clone, Debug, PartialEq)]
pub enum Ran {
    /// It returned success.
    Ok,
    /// It returned an error that says nothing happened.
    NotApplied(String),
    /// It returned an error with an unknown outcome.
    Unknown(String),
    /// The process "died" during the call.
    Crashed,
}

fn ran_of<T>(r: Option<Result<T, CoordinatorError>>) -> Ran {
    match r {
        None => Ran::Crashed,
        Some(Ok(_)) => Ran::Ok,
        Some(Err(e)) if e.outcome() == Outcome::Unknown => Ran::Unknown(e.to_string()),
        Some(Err(e)) => Ran::NotApplied(e.to_string()),
    }
}

/// Builds the stuck state the recovery scenario starts from, through the ports
/// directly: an insert that died after its index write (prepared intent, points
/// in the index, no row) and an update of record 3 that committed but whose
/// cleanup never ran (committed intent naming the superseded point).
async fn stuck_state<M: MetadataRepo, V: VectorIndex>(world: &World<M, V>) {
    let now = tandem_core::Clock::now_ms(&world.clock);
    let repo = &world.repo;
    let index = &world.index;
    // The dead insert.
    let owner = OwnerToken::new_random();
    let p1 = PointId::new_v7();
    let p2 = PointId::new_v7();
    repo.prepare(&NewIntent {
        id: IntentId::new_v7(),
        kind: IntentKind::Upsert,
        owner,
        lease_deadline_ms: now + 1_000,
        point_ids: vec![p1, p2],
        created_ms: now,
        generation: 0,
    })
    .await
    .expect("prepare");
    let point = |id: PointId, n: u128| Point {
        id,
        record_id: rid(n),
        scope: Scope::new("a"),
        metadata: json!({"item": "dead"})
            .as_object()
            .cloned()
            .unwrap_or_default(),
        vector: vector_for(n, 9),
        written_at_ms: now,
    };
    index
        .upsert(&[point(p1, 0x3001), point(p2, 0x3002)])
        .await
        .expect("index upsert");
    // The update whose cleanup never ran.
    let owner = OwnerToken::new_random();
    let intent = IntentId::new_v7();
    let p3 = PointId::new_v7();
    repo.prepare(&NewIntent {
        id: intent,
        kind: IntentKind::Upsert,
        owner,
        lease_deadline_ms: now + 1_000,
        point_ids: vec![p3],
        created_ms: now,
        generation: 0,
    })
    .await
    .expect("prepare");
    let mut p = point(p3, 3);
    p.metadata = json!({"item": "x"})
        .as_object()
        .cloned()
        .unwrap_or_default();
    index.upsert(&[p]).await.expect("index upsert");
    let committed = repo
        .commit_upsert(
            intent,
            owner,
            &[RowWrite {
                id: rid(3),
                scope: Scope::new("a"),
                content: "record 3 updated before the crash".into(),
                metadata: json!({"item": "x"})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
                point_id: p3,
                vector: vector_for(3, 9),
            }],
            None,
        )
        .await
        .expect("commit");
    assert_eq!(
        committed.summary,
        CommitSummary {
            inserted: 0,
            updated: 1,
            deleted: 0
        }
    );
}

/// How a saga ended, as its caller saw it: done is success, compensated is
/// "not applied", anything else (past its pivot, failed) unknown.
fn ran_of_saga(r: Option<Result<SagaOutcome, CoordinatorError>>) -> Ran {
    match r {
        Some(Ok(o)) if o.state == SagaState::Done => Ran::Ok,
        Some(Ok(o)) if o.state == SagaState::Compensated => {
            Ran::NotApplied(format!("compensated: {:?}", o.error))
        }
        Some(Ok(o)) => Ran::Unknown(format!("saga ended {:?}: {:?}", o.state, o.error)),
        other => ran_of(other),
    }
}

/// Runs one scenario on the faulty coordinator; the future is dropped if a
/// crash fault fires.
async fn run_scenario<M: MetadataRepo + 'static, V: VectorIndex + 'static>(
    world: &World<M, V>,
    scenario: Scenario,
    caller: Option<&CallerStep<M>>,
) -> Ran {
    let c = world.faulty();
    match scenario {
        Scenario::Insert | Scenario::Update | Scenario::Mixed | Scenario::DeferredUpsert => ran_of(
            run_until_crash(
                &world.ctl,
                c.upsert_with(scenario.batch(), &scenario.options()),
            )
            .await,
        ),
        Scenario::IndexWorker => ran_of(run_until_crash(&world.ctl, c.index_pending()).await),
        Scenario::DeleteIds
        | Scenario::DeleteScope
        | Scenario::DeleteMetadata
        | Scenario::DeferredDelete => {
            let sel = scenario.selector().expect("delete scenario");
            ran_of(run_until_crash(&world.ctl, c.delete_with(sel, &scenario.options())).await)
        }
        Scenario::Recovery => ran_of(run_until_crash(&world.ctl, c.recover()).await),
        Scenario::Reindex => ran_of(
            run_until_crash(
                &world.ctl,
                c.reindex(
                    &tandem_core::ReindexOptions::to(crate::reindex::NEXT),
                    &|_| {},
                ),
            )
            .await,
        ),
        Scenario::Transaction | Scenario::TransactionStep => {
            let mut tx = scenario.transaction();
            if scenario == Scenario::TransactionStep {
                let caller = caller.expect("the caller-step scenario needs a caller step");
                tx = tx.with_shared_step(caller.step.clone());
            }
            ran_of(run_until_crash(&world.ctl, c.transact(tx, &scenario.options())).await)
        }
        Scenario::Saga | Scenario::SagaCompensates => {
            let input = json!({ "fail": scenario == Scenario::SagaCompensates });
            ran_of_saga(run_until_crash(&world.ctl, c.run_saga("harness", input)).await)
        }
    }
}

/// Whether the scenario's effects are all present (`Some(true)`), all absent
/// (`Some(false)`), or mixed (`None`: an atomicity violation).
fn applied(
    scenario: Scenario,
    pre: &BTreeMap<RecordId, StoredRecord>,
    post: &BTreeMap<RecordId, StoredRecord>,
) -> Option<bool> {
    // A compensated saga restores its records exactly (content, metadata,
    // scope and vector — the same point) under a new version.
    let exact_version = !scenario.is_saga();
    let unchanged = |id: &RecordId| match (pre.get(id), post.get(id)) {
        (Some(a), Some(b)) => {
            a.point_id == b.point_id
                && (a.version == b.version || !exact_version)
                && a.content == b.content
                && a.metadata == b.metadata
                && a.scope == b.scope
        }
        (None, None) => true,
        _ => false,
    };
    let is = |id: u128, content: &str, version: Option<u64>| {
        post.get(&rid(id))
            .is_some_and(|row| row.content == content && version.is_none_or(|v| row.version == v))
    };
    let version_after = |id: u128| pre.get(&rid(id)).map_or(1, |p| p.version + 1);
    type Done<'a> = Box<dyn Fn(&RecordId) -> bool + 'a>;
    if scenario == Scenario::IndexWorker {
        // Indexing switches points; it never changes what a record is.
        let same = |a: &StoredRecord, b: &StoredRecord| {
            StoredRecord {
                point_id: b.point_id,
                ..a.clone()
            } == *b
        };
        let all = pre.len() == post.len()
            && pre
                .iter()
                .all(|(id, a)| post.get(id).is_some_and(|b| same(a, b)));
        return all.then_some(true);
    }
    let (targets, done): (Vec<RecordId>, Done<'_>) = match scenario {
        Scenario::Insert | Scenario::Update | Scenario::Mixed | Scenario::DeferredUpsert => {
            let batch = scenario.batch();
            let ids = batch.iter().filter_map(|r| r.id).collect();
            let want: BTreeMap<RecordId, NewRecord> =
                batch.into_iter().map(|r| (r.id.expect("id"), r)).collect();
            (
                ids,
                Box::new(move |id| {
                    post.get(id).is_some_and(|row| {
                        let w = &want[id];
                        row.content == w.content
                            && row.scope == w.scope
                            && row.version == pre.get(id).map_or(1, |p| p.version + 1)
                    })
                }),
            )
        }
        Scenario::DeleteIds
        | Scenario::DeleteScope
        | Scenario::DeleteMetadata
        | Scenario::DeferredDelete => {
            let sel = scenario.selector().expect("delete scenario");
            let ids = pre
                .values()
                .filter(|r| sel.matches(r))
                .map(|r| r.id)
                .collect();
            (ids, Box::new(move |id| !post.contains_key(id)))
        }
        // A re-index changes no record: every record is an "other" one.
        Scenario::Recovery | Scenario::IndexWorker | Scenario::Reindex => {
            (Vec::new(), Box::new(|_| true))
        }
        Scenario::Transaction => {
            // Records 1 and 3 are scope "a"'s item "x"; record 3 comes back.
            let targets = [1, 3, 0x2101, 6].map(rid).to_vec();
            let all = !post.contains_key(&rid(1))
                && is(3, "record 3 v4", Some(1))
                && is(0x2101, "record 8449 v0", Some(1))
                && is(6, "record 6 v4", Some(version_after(6)));
            (targets, Box::new(move |_| all))
        }
        Scenario::TransactionStep => {
            let all = is(2, "record 2 v3", Some(version_after(2))) && !post.contains_key(&rid(4));
            ([2, 4].map(rid).to_vec(), Box::new(move |_| all))
        }
        Scenario::Saga | Scenario::SagaCompensates => {
            let all = is(1, "record 1 v6", None)
                && is(0x2201, "record 8705 v0", None)
                && !post.contains_key(&rid(5));
            ([1, 5, 0x2201].map(rid).to_vec(), Box::new(move |_| all))
        }
    };
    // Records outside the call must not change at all.
    let others_unchanged = pre
        .keys()
        .chain(post.keys())
        .filter(|id| !targets.contains(id))
        .all(unchanged);
    if !others_unchanged {
        return None;
    }
    if targets.iter().all(done) {
        Some(true)
    } else if targets.iter().all(unchanged) {
        Some(false)
    } else {
        None
    }
}

/// One case of the fault matrix and what came of it.
#[derive(Clone, Debug)]
pub struct CaseResult {
    /// The operation.
    pub scenario: Scenario,
    /// The fault rule (None: the fault-free run).
    pub rule: Option<(Call, usize, Fault)>,
    /// How the call ended.
    pub ran: Ran,
    /// The first invariant found broken.
    pub violation: Option<String>,
}

/// Runs one case end to end: fresh world, seed, the faulty call, checks at
/// the instant it returns (I1, I2, I4), then a restarted process recovers after
/// the leases and the final state is checked (I3, exact I2, I5, I7).
pub async fn run_case<M, V, F, Fut>(
    make: &F,
    config: &CoordinatorConfig,
    scenario: Scenario,
    rule: Option<Rule>,
    bug: Option<PlantedBug>,
    caller: Option<&CallerStep<M>>,
) -> (CaseResult, Vec<(Call, usize)>)
where
    M: MetadataRepo + 'static,
    V: VectorIndex + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = (M, V)>,
{
    let rule_desc = rule.as_ref().map(|r| (r.call, r.nth, r.fault.clone()));
    let (mut result, calls) = run_case_with(
        make,
        config,
        scenario,
        move |world: &World<M, V>| {
            if let Some(rule) = rule {
                world.ctl.add(rule);
            }
        },
        bug,
        caller,
    )
    .await;
    result.rule = rule_desc;
    (result, calls)
}

/// [`run_case`] with a caller-supplied fault installer, called once the world
/// is seeded and just before the faulty call: it may add rules to
/// `world.ctl`, or arm faults somewhere else entirely (in a test server, a
/// TCP proxy, ...). Returns the case and the port calls the faulty call made.
/// `caller` is the store's caller step, for [`Scenario::TransactionStep`].
pub async fn run_case_with<M, V, F, Fut, I>(
    make: &F,
    config: &CoordinatorConfig,
    scenario: Scenario,
    install: I,
    bug: Option<PlantedBug>,
    caller: Option<&CallerStep<M>>,
) -> (CaseResult, Vec<(Call, usize)>)
where
    M: MetadataRepo + 'static,
    V: VectorIndex + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = (M, V)>,
    I: FnOnce(&World<M, V>),
{
    let (repo, index) = make().await;
    let mut world = World::new(repo, index, config.clone(), 7);
    world.seed().await;
    world.bug = bug;
    if scenario == Scenario::Recovery {
        stuck_state(&world).await;
        world.after_leases();
    }
    if scenario == Scenario::IndexWorker {
        deferred_backlog(&world).await;
    }
    let pre = invariants::rows(&*world.repo).await.expect("rows");
    install(&world);
    let log_start = world.ctl.log().len();
    let ran = run_scenario(&world, scenario, caller).await;
    let calls: Vec<(Call, usize)> = world.ctl.log()[log_start..]
        .iter()
        .map(|e| (e.call, e.occurrence))
        .collect();
    world.ctl.clear();
    world.ctl.disable();
    // Requests that were answered with an error but are still on their way
    // arrive now, after the call gave up on them.
    world.land_deferred().await;

    let violation = check_case(&world, scenario, &ran, &pre, caller).await.err();
    (
        CaseResult {
            scenario,
            rule: None,
            ran,
            violation,
        },
        calls,
    )
}

async fn check_case<M: MetadataRepo + 'static, V: VectorIndex + 'static>(
    world: &World<M, V>,
    scenario: Scenario,
    ran: &Ran,
    pre: &BTreeMap<RecordId, StoredRecord>,
    caller: Option<&CallerStep<M>>,
) -> Result<(), String> {
    let (repo, index) = (&*world.repo, &*world.index);
    // At the instant the call returned (or died).
    invariants::no_dangling_rows(repo, index).await?;
    invariants::no_invisible_garbage(repo, index).await?;
    let queries: Vec<Vec<f32>> = (1..=6u128)
        .chain([0x2001, 0x2004, 0x3001])
        .flat_map(|n| [vector_for(n, 0), vector_for(n, 1), vector_for(n, 9)])
        .collect();
    let restarted = world.clean();
    invariants::guarded_reads(&restarted, repo, &queries, 4).await?;
    let before_recovery = invariants::rows(repo).await?;

    // A visible effect before recovery must already be all-or-nothing, and must
    // not contradict a NotApplied answer. (Not for a saga: other readers may
    // see its completed steps before it ends; recovery decides it.)
    let seen = match applied(scenario, pre, &before_recovery) {
        Some(seen) => Some(seen),
        None if scenario.is_saga() => None,
        None => {
            return Err(format!(
                "I3 violated before recovery: partial effects ({ran:?})"
            ));
        }
    };
    let step_seen = match caller {
        Some(c) if scenario == Scenario::TransactionStep => Some((c.applied)(repo).await?),
        _ => None,
    };

    // Later: the restarted process recovers (and, for deferred writes, its
    // index workers run to completion).
    world.after_leases();
    restarted
        .recover()
        .await
        .map_err(|e| format!("recovery failed: {e}"))?;
    if scenario.is_deferred() {
        drain(world, &restarted).await?;
    }
    let post = invariants::rows(repo).await?;
    let decided = applied(scenario, pre, &post)
        .ok_or_else(|| format!("I3 violated after recovery: partial effects ({ran:?})"))?;
    if let Some(seen) = seen
        && decided != seen
        && !scenario.is_saga()
    {
        return Err(format!(
            "I3 violated: recovery changed the decided outcome ({seen} -> {decided}, {ran:?})"
        ));
    }
    // The caller's step commits if and only if the records do.
    if let (Some(c), Some(step_seen)) = (caller, step_seen) {
        let step_now = (c.applied)(repo).await?;
        if step_seen != seen.unwrap_or(decided) || step_now != decided {
            return Err(format!(
                "I3 violated: the caller's step (applied {step_seen} -> {step_now}) and the \
                 records (applied {decided}) disagree ({ran:?})"
            ));
        }
    }
    if scenario.is_saga() {
        check_saga_atomic(world, &restarted, decided).await?;
    }
    match ran {
        Ran::Ok if !decided && !scenario.is_housekeeping() => {
            return Err("I3 violated: the call reported success but its effects are absent".into());
        }
        Ran::NotApplied(e) if decided && !scenario.is_housekeeping() => {
            return Err(format!(
                "I3 violated: the call reported NotApplied ({e}) but its effects are present"
            ));
        }
        _ => {}
    }
    invariants::exact_equality(repo, index).await?;
    invariants::indexed_current(repo, index).await?;
    invariants::guarded_reads(&restarted, repo, &queries, 4).await?;
    invariants::converged(&restarted).await?;

    // I5: a retry with the same key answers the same and writes nothing.
    let opts = scenario.options();
    if opts.idempotency_key.is_some() && decided {
        let again_pre = invariants::rows(repo).await?;
        let replayed = match scenario {
            Scenario::Insert | Scenario::DeferredUpsert => restarted
                .upsert_with(scenario.batch(), &opts)
                .await
                .map(|r| r.replayed),
            Scenario::Transaction => restarted
                .transact(scenario.transaction(), &opts)
                .await
                .map(|r| r.replayed),
            _ => restarted
                .delete_with(scenario.selector().expect("selector"), &opts)
                .await
                .map(|r| r.replayed),
        }
        .map_err(|e| format!("I5: retry with the same key failed: {e}"))?;
        if !replayed {
            return Err(
                "I5 violated: a retry with the same key was not answered from the key".into(),
            );
        }
        if invariants::rows(repo).await? != again_pre {
            return Err("I5 violated: a replayed call wrote something".into());
        }
    }
    Ok(())
}

/// Saga atomicity after recovery: the saga ended — done, with every effect
/// (the caller action's included), or compensated, with none.
async fn check_saga_atomic<M, V, R, X>(
    world: &World<M, V>,
    restarted: &Coordinator<R, X>,
    decided: bool,
) -> Result<(), String>
where
    M: MetadataRepo + 'static,
    V: VectorIndex + 'static,
    R: MetadataRepo,
    X: VectorIndex,
{
    let sagas = restarted
        .sagas(None, 10)
        .await
        .map_err(|e| format!("listing sagas: {e}"))?;
    let states: Vec<SagaState> = sagas.iter().map(|s| s.state).collect();
    let want = if decided {
        SagaState::Done
    } else {
        SagaState::Compensated
    };
    // A saga that never started (its journal entry was never written) is
    // fine when nothing happened.
    if !(states == [want] || (states.is_empty() && !decided)) {
        return Err(format!(
            "saga atomicity violated: after recovery the saga is {states:?}, its records say {}",
            if decided { "done" } else { "not applied" }
        ));
    }
    let published = !ledger_keys(&world.ledger).is_empty();
    if published != decided {
        return Err(format!(
            "saga atomicity violated: the caller action's effect ({published}) and the \
             records ({decided}) disagree"
        ));
    }
    Ok(())
}

/// Runs a restarted process's index workers until nothing is pending,
/// then recovers after the leases (the workers' own crashed units) — the
/// index caught up with every deferred write. Fails if anything is left
/// pending or dead-lettered (no fault is armed any more).
pub async fn drain<M, V, R, X>(world: &World<M, V>, c: &Coordinator<R, X>) -> Result<(), String>
where
    M: MetadataRepo + 'static,
    V: VectorIndex + 'static,
    R: MetadataRepo,
    X: VectorIndex,
{
    // A crashed worker's claim ends only when the (manual) clock passes it,
    // which `after_leases` does: a first drain may stop at those entries,
    // the next takes them. The third finds nothing, or the bug.
    for _ in 0..3 {
        c.index_until_idle(Duration::from_secs(60))
            .await
            .map_err(|e| format!("index workers failed: {e}"))?;
        world.after_leases();
        c.recover()
            .await
            .map_err(|e| format!("recovery after indexing failed: {e}"))?;
    }
    let stats = c
        .pending_stats()
        .await
        .map_err(|e| format!("pending_stats: {e}"))?;
    if stats.pending != 0 || stats.dead != 0 {
        return Err(format!(
            "the index workers did not finish the backlog: {stats:?}"
        ));
    }
    Ok(())
}

/// The backlog the [`Scenario::IndexWorker`] case starts from, written in
/// deferred mode by a clean process: record 1 updated twice (the entries
/// coalesce: only the second version may be indexed), record 4 updated, a new
/// record 0x2006, record 3 updated then deleted, record 5 deleted (its point
/// is the workers' garbage).
pub async fn deferred_backlog<M: MetadataRepo + 'static, V: VectorIndex + 'static>(
    world: &World<M, V>,
) {
    let c = world.clean();
    let deferred = WriteOptions::deferred();
    for batch in [
        vec![rec(1, 8, "a"), rec(0x2006, 0, "a")],
        vec![rec(1, 9, "a"), rec(4, 8, "a"), rec(3, 8, "a")],
    ] {
        c.upsert_with(batch, &deferred)
            .await
            .expect("deferred backlog");
    }
    c.delete_with(DeleteSelector::Ids(vec![rid(3), rid(5)]), &deferred)
        .await
        .expect("deferred backlog delete");
}

/// The index is down (every index write fails, transiently) for longer than
/// `max_attempts` worker passes while a backlog of deferred writes waits: the
/// outage must delay the backlog, not dead-letter it. Once the index is back,
/// the workers drain it and both stores agree exactly.
pub async fn index_outage_keeps_the_backlog<M, V>(
    repo: M,
    index: V,
    config: CoordinatorConfig,
    bug: Option<PlantedBug>,
) -> Result<(), String>
where
    M: MetadataRepo + 'static,
    V: VectorIndex + 'static,
{
    let mut world = World::new(repo, index, config, 19);
    world.seed().await;
    world.bug = bug;
    deferred_backlog(&world).await;
    world
        .ctl
        .add(Rule::always(Call::IndexUpsert, Fault::FailBefore));
    let worker = world.faulty();
    for _ in 0..world.config.indexing.max_attempts + 2 {
        let report = worker
            .index_pending()
            .await
            .map_err(|e| format!("a worker pass failed outright during the outage: {e}"))?;
        if report.indexed != 0 {
            return Err(format!("indexed during a total outage: {report:?}"));
        }
        world
            .clock
            .advance(world.config.indexing.max_retry_backoff + Duration::from_millis(1));
    }
    world.ctl.clear();
    let restarted = world.clean();
    let stats = restarted
        .pending_stats()
        .await
        .map_err(|e| format!("pending_stats: {e}"))?;
    if stats.dead != 0 {
        return Err(format!(
            "an index outage dead-lettered {} deferred writes",
            stats.dead
        ));
    }
    drain(&world, &restarted).await?;
    let (repo, index) = (&*world.repo, &*world.index);
    invariants::exact_equality(repo, index).await?;
    invariants::indexed_current(repo, index).await
}

/// A deferred write whose vector the index rejects for good (written
/// through the port, past the coordinator's validation: a collection whose
/// dimension changed since, say): the worker isolates it, dead-letters it
/// with its error, and indexes the rest of its batch; `verify` reports it
/// apart; `drop_dead_letters` ends it, leaving the record as committed.
pub async fn poison_is_dead_lettered<M, V>(
    repo: M,
    index: V,
    config: CoordinatorConfig,
) -> Result<(), String>
where
    M: MetadataRepo + 'static,
    V: VectorIndex + 'static,
{
    let world = World::new(repo, index, config, 23);
    world.seed().await;
    let c = world.clean();
    c.upsert_with(
        vec![rec(0x2007, 0, "a"), rec(2, 7, "a")],
        &WriteOptions::deferred(),
    )
    .await
    .map_err(|e| format!("deferred upsert: {e}"))?;
    // The poison: a vector of the wrong dimension, committed straight
    // through the port.
    let now = tandem_core::Clock::now_ms(&world.clock);
    let owner = OwnerToken::new_random();
    let intent = IntentId::new_v7();
    world
        .repo
        .prepare(&NewIntent {
            id: intent,
            kind: IntentKind::Upsert,
            owner,
            lease_deadline_ms: now + 1_000,
            point_ids: Vec::new(),
            created_ms: now,
            generation: 0,
        })
        .await
        .map_err(|e| format!("prepare: {e}"))?;
    let poison = rid(0x2008);
    let parts = [tandem_core::CommitPart::Defer {
        rows: vec![RowWrite {
            id: poison,
            scope: Scope::new("a"),
            content: "poison".into(),
            metadata: serde_json::Map::new(),
            point_id: PointId::new_v7(),
            vector: vec![1.0; DIM + 1],
        }],
        now_ms: now,
    }];
    world
        .repo
        .commit_transaction(
            intent,
            owner,
            &tandem_core::TransactionCommit {
                release_at_ms: Some(now),
                ..tandem_core::TransactionCommit::of(&parts)
            },
            None,
            &tandem_core::IndexGate::passed(),
        )
        .await
        .map_err(|e| format!("poison commit: {e}"))?;
    let report = c
        .index_until_idle(Duration::from_secs(60))
        .await
        .map_err(|e| format!("workers: {e}"))?;
    if report.dead_lettered != 1 || report.indexed != 2 {
        return Err(format!(
            "expected the poison dead-lettered and the other two indexed: {report:?}"
        ));
    }
    let dead = c
        .pending(tandem_core::PendingFilter::Dead, None, 10)
        .await
        .map_err(|e| format!("dead letters: {e}"))?;
    match dead.as_slice() {
        [d] if d.record_id == poison && d.last_error.is_some() => {}
        other => return Err(format!("the dead-letter list is {other:?}")),
    }
    world.after_leases();
    c.recover().await.map_err(|e| format!("recover: {e}"))?;
    let verify = c.verify(None).await.map_err(|e| format!("verify: {e}"))?;
    if verify.dead_letters != 1 || !verify.missing_points.is_empty() || !verify.is_consistent() {
        return Err(format!(
            "verify must report the dead letter apart, not as drift: {verify:?}"
        ));
    }
    // Retrying changes nothing while the index still rejects it.
    if c.retry_dead_letters(Some(&[poison]))
        .await
        .map_err(|e| format!("retry: {e}"))?
        != 1
    {
        return Err("retry_dead_letters did not requeue the poison".into());
    }
    c.index_until_idle(Duration::from_secs(1))
        .await
        .map_err(|e| format!("workers: {e}"))?;
    let dropped = c
        .drop_dead_letters(None)
        .await
        .map_err(|e| format!("drop: {e}"))?;
    if dropped != 1 {
        return Err(format!("drop_dead_letters dropped {dropped}"));
    }
    let rows = invariants::rows(&*world.repo).await?;
    if !rows.contains_key(&poison) {
        return Err("dropping the dead letter deleted the record".into());
    }
    let stats = c
        .pending_stats()
        .await
        .map_err(|e| format!("pending_stats: {e}"))?;
    if stats.pending != 0 || stats.dead != 0 {
        return Err(format!("entries left after the drop: {stats:?}"));
    }
    Ok(())
}

/// The faults every port call is subjected to.
pub fn single_faults() -> Vec<Fault> {
    vec![
        Fault::FailBefore,
        Fault::FailAfter,
        Fault::Reject,
        Fault::Hang,
        Fault::HangAfter,
        Fault::CrashBefore,
        Fault::CrashAfter,
        Fault::Duplicate,
        Fault::LandLater,
    ]
}

/// What an exhaustive run found.
#[derive(Debug, Default)]
pub struct ExhaustiveSummary {
    /// Cases run.
    pub cases: usize,
    /// Cases per scenario.
    pub per_scenario: BTreeMap<String, usize>,
    /// Outcomes seen, by kind.
    pub outcomes: BTreeMap<String, usize>,
    /// The cases that broke an invariant.
    pub failures: Vec<CaseResult>,
}

impl ExhaustiveSummary {
    /// Counts one case (by its scenario and how it ended), keeping it if it
    /// broke an invariant.
    pub fn record(&mut self, result: CaseResult) {
        self.cases += 1;
        *self
            .per_scenario
            .entry(format!("{:?}", result.scenario))
            .or_default() += 1;
        let kind = match &result.ran {
            Ran::Ok => "ok",
            Ran::NotApplied(_) => "not_applied",
            Ran::Unknown(_) => "unknown",
            Ran::Crashed => "crashed",
        };
        *self.outcomes.entry(kind.into()).or_default() += 1;
        if result.violation.is_some() {
            self.failures.push(result);
        }
    }

    /// Prints the summary under `label` (and every failed case), then
    /// panics if a case broke an invariant.
    pub fn assert_no_failures(&self, label: &str) {
        println!(
            "exhaustive single faults, {label}: {} cases, per scenario {:?}, outcomes {:?}",
            self.cases, self.per_scenario, self.outcomes
        );
        for f in &self.failures {
            println!("FAILED: {f:?}");
        }
        assert!(
            self.failures.is_empty(),
            "{label}: {} cases broke an invariant",
            self.failures.len()
        );
    }
}

/// Enumerates every single fault: for each scenario, a fault-free run lists the
/// port calls it makes; then each (call, occurrence) × fault is a case, plus
/// "fails every attempt" for each call, refused or landing later.
pub async fn exhaustive<M, V, F, Fut>(
    make: F,
    config: CoordinatorConfig,
    scenarios: &[Scenario],
    bug: Option<PlantedBug>,
) -> ExhaustiveSummary
where
    M: MetadataRepo + 'static,
    V: VectorIndex + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = (M, V)>,
{
    exhaustive_with(make, config, scenarios, bug, None).await
}

/// [`exhaustive`], with the store's caller step (needed for
/// [`Scenario::TransactionStep`], which is skipped without one).
pub async fn exhaustive_with<M, V, F, Fut>(
    make: F,
    config: CoordinatorConfig,
    scenarios: &[Scenario],
    bug: Option<PlantedBug>,
    caller: Option<CallerStep<M>>,
) -> ExhaustiveSummary
where
    M: MetadataRepo + 'static,
    V: VectorIndex + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = (M, V)>,
{
    let mut summary = ExhaustiveSummary::default();
    let caller = caller.as_ref();
    for &scenario in scenarios {
        if scenario == Scenario::TransactionStep && caller.is_none() {
            continue;
        }
        let (base, calls) = run_case(&make, &config, scenario, None, bug, caller).await;
        if bug.is_none() {
            let expected = if scenario == Scenario::SagaCompensates {
                matches!(base.ran, Ran::NotApplied(_))
            } else {
                base.ran == Ran::Ok
            };
            assert!(
                expected && base.violation.is_none(),
                "{scenario:?} without faults: {base:?}"
            );
        }
        summary.record(base);
        for &(call, occurrence) in &calls {
            for fault in single_faults() {
                let rule = Rule::once(call, occurrence, fault);
                let (result, _) = run_case(&make, &config, scenario, Some(rule), bug, caller).await;
                summary.record(result);
            }
            // The call fails on every attempt from this one on: refused, or
            // answered with an error while every request still lands later.
            for fault in [Fault::FailBefore, Fault::LandLater] {
                let rule = Rule {
                    call,
                    nth: occurrence,
                    times: usize::MAX,
                    fault,
                };
                let (result, _) = run_case(&make, &config, scenario, Some(rule), bug, caller).await;
                summary.record(result);
            }
        }
    }
    summary
}

/// A recovery that runs while a call is between its index write and its
/// commit (the commit is delayed): recovery must leave the live call alone
/// (its lease has not ended), and the call must then commit consistently.
pub async fn recovery_races_a_live_call<M, V>(
    repo: M,
    index: V,
    config: CoordinatorConfig,
    bug: Option<PlantedBug>,
) -> Result<(), String>
where
    M: MetadataRepo + 'static,
    V: VectorIndex + 'static,
{
    let mut world = World::new(repo, index, config, 11);
    world.seed().await;
    world.bug = bug;
    world.ctl.add(Rule::once(
        Call::CommitUpsert,
        0,
        Fault::Delay(Duration::from_millis(200)),
    ));
    let writer = world.faulty();
    let recoverer = world.clean();
    let batch = Scenario::Mixed.batch();
    let (written, recovered) = tokio::join!(writer.upsert(batch), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        recoverer.recover().await
    });
    recovered.map_err(|e| format!("recovery failed: {e}"))?;
    let (repo, index) = (&*world.repo, &*world.index);
    invariants::no_dangling_rows(repo, index).await?;
    invariants::no_invisible_garbage(repo, index).await?;
    if written.is_ok() {
        let rows = invariants::rows(repo).await?;
        if !Scenario::Mixed.batch().iter().all(|r| {
            rows.get(&r.id.expect("id"))
                .is_some_and(|row| row.content == r.content)
        }) {
            return Err("I3 violated: the call succeeded but its rows are not there".into());
        }
    }
    recover_after_leases(&world).await
}

/// A dynamic saga (the shape of `tandem ingest --atomic`) whose driver is
/// alive while a recovery runs between its steps: the saga's lease has not
/// ended, so recovery must leave it alone; the saga then finishes with every
/// step's effect. (A recovery that drove it anyway would compensate the
/// first step while the driver commits the second: half a saga.)
pub async fn saga_races_recovery<M, V>(
    repo: M,
    index: V,
    config: CoordinatorConfig,
    bug: Option<PlantedBug>,
) -> Result<(), String>
where
    M: MetadataRepo + 'static,
    V: VectorIndex + 'static,
{
    let mut world = World::new(repo, index, config, 17);
    world.seed().await;
    world.bug = bug;
    let driver = world.clean();
    let mut saga = driver
        .begin_saga("harness-dynamic", json!({ "file": "catalog.jsonl" }))
        .await
        .map_err(|e| format!("begin_saga: {e}"))?;
    saga.step(
        "batch-1",
        Transaction::new().upsert(vec![rec(1, 7, "a"), rec(0x2301, 0, "a")]),
    )
    .await
    .map_err(|e| format!("step 1: {e}"))?;
    world
        .clean()
        .recover()
        .await
        .map_err(|e| format!("recovery failed: {e}"))?;
    let finished = async {
        saga.step(
            "batch-2",
            Transaction::new().upsert(vec![rec(0x2302, 0, "b")]),
        )
        .await?;
        saga.finish().await
    }
    .await;
    let rows = invariants::rows(&*world.repo).await?;
    let content = |n: u128| rows.get(&rid(n)).map(|r| r.content.clone());
    let all = content(1).as_deref() == Some("record 1 v7")
        && content(0x2301).is_some()
        && content(0x2302).is_some();
    let none = content(1).as_deref() == Some("seed 1")
        && content(0x2301).is_none()
        && content(0x2302).is_none();
    match finished {
        Ok(o) if o.state == SagaState::Done && all => {}
        Ok(o) => {
            return Err(format!(
                "saga atomicity violated: the driver's saga ended {:?} with {}",
                o.state,
                if all {
                    "every effect"
                } else if none {
                    "no effect"
                } else {
                    "half its effects"
                }
            ));
        }
        Err(_) if all || none => {}
        Err(e) => {
            return Err(format!(
                "saga atomicity violated: half the saga's effects after {e}"
            ));
        }
    }
    recover_after_leases(&world).await
}

/// How many times a [`slow_saga`]'s action started.
pub type Runs = Arc<Mutex<usize>>;

/// A saga `name`: a Tandem step that commits what `build` returns, then a
/// caller action that takes three leases of tokio time (a slow external
/// call) and counts its runs in the returned [`Runs`].
pub fn slow_saga(
    name: &str,
    lease: Duration,
    build: impl Fn(&SagaContext) -> Result<Transaction, tandem_core::BoxError> + Send + Sync + 'static,
) -> (SagaDefinition, Runs) {
    let runs = Runs::default();
    let counted = runs.clone();
    let saga = SagaDefinition::new(name)
        .step(StepDefinition::tandem("write", build))
        .step(StepDefinition::action(
            "publish-slowly",
            move |_ctx| {
                let runs = counted.clone();
                async move {
                    *runs.lock().unwrap_or_else(PoisonError::into_inner) += 1;
                    tokio::time::sleep(lease * 3).await;
                    Ok(json!({ "published": true }))
                }
            },
            |_ctx| async { Ok(()) },
        ));
    (saga, runs)
}

impl<M: MetadataRepo + 'static, V: VectorIndex + 'static> World<M, V> {
    /// Runs the registered saga `name` to its end in one process while
    /// another process's recovery runs every half lease, seven times (the
    /// clock moving on by half a lease each time). A saga that does not end
    /// done is an error: its driver was alive all along.
    pub async fn run_saga_while_recovering(
        &self,
        name: &str,
        input: serde_json::Value,
    ) -> Result<(), String> {
        let driver = self.clean();
        let other = self.clean();
        let half = self.config.lease / 2;
        let recoverer = async {
            for _ in 0..7 {
                tokio::time::sleep(half).await;
                self.clock.advance(half);
                other
                    .recover()
                    .await
                    .map_err(|e| format!("recovery failed: {e}"))?;
            }
            Ok::<_, String>(())
        };
        let (outcome, recovered) = tokio::join!(driver.run_saga(name, input), recoverer);
        recovered?;
        match outcome {
            Ok(o) if o.state == SagaState::Done => Ok(()),
            Ok(o) => Err(format!(
                "a saga whose action outlived its lease ended {:?} while its driver was alive",
                o.state
            )),
            Err(e) => Err(format!(
                "a saga whose action outlived its lease failed while its driver was alive: {e}"
            )),
        }
    }
}

/// A [`slow_saga`] while another process's recovery runs every half lease.
/// The driving process keeps the saga's lease while the action runs, so
/// recovery never takes the saga over: the action runs once and the saga ends
/// done. Without that heartbeat, recovery takes over a saga whose driver is
/// alive — and runs the action a second time, or compensates it while the
/// first run still acts.
pub async fn slow_action_keeps_its_lease<M, V>(
    repo: M,
    index: V,
    config: CoordinatorConfig,
    bug: Option<PlantedBug>,
) -> Result<(), String>
where
    M: MetadataRepo + 'static,
    V: VectorIndex + 'static,
{
    let mut world = World::new(repo, index, config, 19);
    world.seed().await;
    world.bug = bug;
    let (saga, runs) = slow_saga("harness-slow", world.config.lease, |_| {
        Ok(Transaction::new().upsert(vec![rec(0x2401, 0, "a")]))
    });
    world.sagas.push(saga);
    world
        .run_saga_while_recovering("harness-slow", json!({}))
        .await?;
    let ran = *runs.lock().unwrap_or_else(PoisonError::into_inner);
    if ran != 1 {
        return Err(format!(
            "the slow action ran {ran} times: recovery took over a saga whose driver was alive"
        ));
    }
    recover_after_leases(&world).await
}

/// After every lease: a clean recovery, then exact equality (I2) and
/// convergence (I7).
async fn recover_after_leases<M, V>(world: &World<M, V>) -> Result<(), String>
where
    M: MetadataRepo + 'static,
    V: VectorIndex + 'static,
{
    world.after_leases();
    let c = world.clean();
    c.recover()
        .await
        .map_err(|e| format!("recovery failed: {e}"))?;
    invariants::exact_equality(&*world.repo, &*world.index).await?;
    invariants::converged(&c).await
}

/// A write whose first index request is answered with an error but lands
/// later — after the retry succeeded, the call committed, and a second call
/// superseded the record and deleted the first call's point. The late request
/// then brings that point back: it must be garbage that an unresolved intent
/// names (I2), and recovery after the leases must leave the stores exactly
/// equal (I7).
pub async fn late_write_lands_after_a_supersede<M, V>(
    repo: M,
    index: V,
    config: CoordinatorConfig,
    bug: Option<PlantedBug>,
) -> Result<(), String>
where
    M: MetadataRepo + 'static,
    V: VectorIndex + 'static,
{
    let mut world = World::new(repo, index, config, 13);
    world.seed().await;
    world.bug = bug;
    world
        .ctl
        .add(Rule::once(Call::IndexUpsert, 0, Fault::LandLater));
    let first = world
        .faulty()
        .upsert(Scenario::Update.batch())
        .await
        .map_err(|e| format!("the first update failed although its retry could succeed: {e}"))?;
    world.ctl.clear();
    let mut second = Scenario::Update.batch();
    for r in &mut second {
        r.content = format!("{} (again)", r.content);
    }
    world
        .clean()
        .upsert(second)
        .await
        .map_err(|e| format!("the second update failed without faults: {e}"))?;
    world.land_deferred().await;
    let (repo, index) = (&*world.repo, &*world.index);
    invariants::no_dangling_rows(repo, index).await?;
    invariants::no_invisible_garbage(repo, index)
        .await
        .map_err(|e| format!("after the late landing of {}: {e}", first.intent))?;
    recover_after_leases(&world).await
}
