//! The fault-injection harness: a "world" of two stores reached through fault
//! wrappers, the operations the suites run, and the exhaustive single-fault
//! enumeration (every operation × every port call it makes × every fault).
//!
//! It is generic over the backends, so the same enumeration runs against the
//! in-memory stores, PostgreSQL, SQLite, the Qdrant test server, ...

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tandem_core::testkit::clock::ManualClock;
use tandem_core::testkit::faults::{
    Call, Fault, FaultController, FaultyMetadataRepo, FaultyVectorIndex, Rule, run_until_crash,
};
use tandem_core::{
    CommitSummary, Coordinator, CoordinatorConfig, CoordinatorError, DeleteSelector, IntentId,
    IntentKind, Limits, MetadataRepo, NewIntent, NewRecord, Outcome, OwnerToken, PlantedBug, Point,
    PointId, RecordId, RetryPolicy, RowWrite, Scope, StoredRecord, VectorIndex, WriteOptions,
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
        match self.bug {
            Some(bug) => c.with_planted_bug(bug),
            None => c,
        }
    }

    /// A coordinator of a "restarted process": no faults, no in-process state.
    pub fn clean(&self) -> Coordinator<Arc<M>, Arc<V>> {
        let c = Coordinator::new(self.repo.clone(), self.index.clone(), self.config.clone())
            .expect("valid config")
            .with_clock(Arc::new(self.clock.clone()));
        match self.bug {
            Some(bug) => c.with_planted_bug(bug),
            None => c,
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
}

impl Scenario {
    /// Every scenario.
    pub const ALL: [Scenario; 7] = [
        Scenario::Insert,
        Scenario::Update,
        Scenario::Mixed,
        Scenario::DeleteIds,
        Scenario::DeleteScope,
        Scenario::DeleteMetadata,
        Scenario::Recovery,
    ];

    fn batch(&self) -> Vec<NewRecord> {
        let rec = |n: u128, v: u32, scope: &str| {
            NewRecord::new(scope, format!("record {n} v{v}"), vector_for(n, v))
                .with_id(rid(n))
                .with_metadata(json!({ "item": "z", "v": v }))
        };
        match self {
            Scenario::Insert => vec![
                rec(0x2001, 0, "a"),
                rec(0x2002, 0, "a"),
                rec(0x2003, 0, "b"),
            ],
            Scenario::Update => vec![rec(1, 1, "a"), rec(2, 1, "a"), rec(5, 1, "b")],
            Scenario::Mixed => vec![rec(1, 2, "a"), rec(6, 2, "b"), rec(0x2004, 0, "a")],
            _ => Vec::new(),
        }
    }

    fn selector(&self) -> Option<DeleteSelector> {
        match self {
            Scenario::DeleteIds => Some(DeleteSelector::Ids(vec![rid(1), rid(2), rid(0x9999)])),
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
            _ => WriteOptions::default(),
        }
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

/// Runs one scenario on the faulty coordinator; the future is dropped if a
/// crash fault fires.
async fn run_scenario<M: MetadataRepo + 'static, V: VectorIndex + 'static>(
    world: &World<M, V>,
    scenario: Scenario,
) -> Ran {
    let c = world.faulty();
    match scenario {
        Scenario::Insert | Scenario::Update | Scenario::Mixed => ran_of(
            run_until_crash(
                &world.ctl,
                c.upsert_with(scenario.batch(), &scenario.options()),
            )
            .await,
        ),
        Scenario::DeleteIds | Scenario::DeleteScope | Scenario::DeleteMetadata => {
            let sel = scenario.selector().expect("delete scenario");
            ran_of(run_until_crash(&world.ctl, c.delete_with(sel, &scenario.options())).await)
        }
        Scenario::Recovery => ran_of(run_until_crash(&world.ctl, c.recover()).await),
    }
}

/// Whether the scenario's effects are all present (`Some(true)`), all absent
/// (`Some(false)`), or mixed (`None`: an atomicity violation).
fn applied(
    scenario: Scenario,
    pre: &BTreeMap<RecordId, StoredRecord>,
    post: &BTreeMap<RecordId, StoredRecord>,
) -> Option<bool> {
    let unchanged = |id: &RecordId| match (pre.get(id), post.get(id)) {
        (Some(a), Some(b)) => {
            a.point_id == b.point_id && a.version == b.version && a.content == b.content
        }
        (None, None) => true,
        _ => false,
    };
    type Done<'a> = Box<dyn Fn(&RecordId) -> bool + 'a>;
    let (targets, done): (Vec<RecordId>, Done<'_>) = match scenario {
        Scenario::Insert | Scenario::Update | Scenario::Mixed => {
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
        Scenario::DeleteIds | Scenario::DeleteScope | Scenario::DeleteMetadata => {
            let sel = scenario.selector().expect("delete scenario");
            let ids = pre
                .values()
                .filter(|r| sel.matches(r))
                .map(|r| r.id)
                .collect();
            (ids, Box::new(move |id| !post.contains_key(id)))
        }
        Scenario::Recovery => (Vec::new(), Box::new(|_| true)),
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
    )
    .await;
    result.rule = rule_desc;
    (result, calls)
}

/// [`run_case`] with a caller-supplied fault installer, called once the world
/// is seeded and just before the faulty call: it may add rules to
/// `world.ctl`, or arm faults somewhere else entirely (in a test server, a
/// TCP proxy, ...). Returns the case and the port calls the faulty call made.
pub async fn run_case_with<M, V, F, Fut, I>(
    make: &F,
    config: &CoordinatorConfig,
    scenario: Scenario,
    install: I,
    bug: Option<PlantedBug>,
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
    let pre = invariants::rows(&*world.repo).await.expect("rows");
    install(&world);
    let log_start = world.ctl.log().len();
    let ran = run_scenario(&world, scenario).await;
    let calls: Vec<(Call, usize)> = world.ctl.log()[log_start..]
        .iter()
        .map(|e| (e.call, e.occurrence))
        .collect();
    world.ctl.clear();
    world.ctl.disable();

    let violation = check_case(&world, scenario, &ran, &pre).await.err();
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
    // not contradict a NotApplied answer.
    let seen = applied(scenario, pre, &before_recovery)
        .ok_or_else(|| format!("I3 violated before recovery: partial effects ({ran:?})"))?;

    // Later: the restarted process recovers.
    world.after_leases();
    restarted
        .recover()
        .await
        .map_err(|e| format!("recovery failed: {e}"))?;
    let post = invariants::rows(repo).await?;
    let decided = applied(scenario, pre, &post)
        .ok_or_else(|| format!("I3 violated after recovery: partial effects ({ran:?})"))?;
    if decided != seen {
        return Err(format!(
            "I3 violated: recovery changed the decided outcome ({seen} -> {decided}, {ran:?})"
        ));
    }
    match ran {
        Ran::Ok if !decided && scenario != Scenario::Recovery => {
            return Err("I3 violated: the call reported success but its effects are absent".into());
        }
        Ran::NotApplied(e) if decided && scenario != Scenario::Recovery => {
            return Err(format!(
                "I3 violated: the call reported NotApplied ({e}) but its effects are present"
            ));
        }
        _ => {}
    }
    invariants::exact_equality(repo, index).await?;
    invariants::guarded_reads(&restarted, repo, &queries, 4).await?;
    invariants::converged(&restarted).await?;

    // I5: a retry with the same key answers the same and writes nothing.
    let opts = scenario.options();
    if opts.idempotency_key.is_some() && decided {
        let again_pre = invariants::rows(repo).await?;
        let replayed = match scenario {
            Scenario::Insert => restarted
                .upsert_with(scenario.batch(), &opts)
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

/// Enumerates every single fault: for each scenario, a fault-free run lists the
/// port calls it makes; then each (call, occurrence) × fault is a case, plus
/// "fails every attempt" for each call.
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
    let mut summary = ExhaustiveSummary::default();
    for &scenario in scenarios {
        let (base, calls) = run_case(&make, &config, scenario, None, bug).await;
        if bug.is_none() {
            assert_eq!(
                base.ran,
                Ran::Ok,
                "{scenario:?} must succeed without faults"
            );
        }
        let record = |summary: &mut ExhaustiveSummary, result: CaseResult| {
            summary.cases += 1;
            *summary
                .per_scenario
                .entry(format!("{scenario:?}"))
                .or_default() += 1;
            let kind = match &result.ran {
                Ran::Ok => "ok",
                Ran::NotApplied(_) => "not_applied",
                Ran::Unknown(_) => "unknown",
                Ran::Crashed => "crashed",
            };
            *summary.outcomes.entry(kind.into()).or_default() += 1;
            if result.violation.is_some() {
                summary.failures.push(result);
            }
        };
        record(&mut summary, base);
        for &(call, occurrence) in &calls {
            for fault in single_faults() {
                let rule = Rule::once(call, occurrence, fault);
                let (result, _) = run_case(&make, &config, scenario, Some(rule), bug).await;
                record(&mut summary, result);
            }
            // The call fails on every attempt from this one on.
            let rule = Rule {
                call,
                nth: occurrence,
                times: usize::MAX,
                fault: Fault::FailBefore,
            };
            let (result, _) = run_case(&make, &config, scenario, Some(rule), bug).await;
            record(&mut summary, result);
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
    world.after_leases();
    recoverer
        .recover()
        .await
        .map_err(|e| format!("recovery failed: {e}"))?;
    invariants::exact_equality(repo, index).await?;
    invariants::converged(&recoverer).await
}
