//! The property suite's engine: random histories of upserts (new and existing
//! ids, hot keys), deletes, searches, concurrent calls, injected faults,
//! crashes, recoveries and verifies, run against a pure model.
//!
//! After every step: I1 and I2 (non-exact) hold, searches are guarded (I4), the
//! store equals the model (I3, with unknown outcomes resolved all-or-nothing),
//! and concurrent writers leave one of the two serial orders (I6). After every
//! recovery and at the end: exact equality (I2) and convergence (I7).

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::json;
use tandem_core::testkit::faults::{Call, Fault, FaultController, Rule, run_until_crash};
use tandem_core::{
    CoordinatorConfig, CoordinatorError, DeleteSelector, MetadataRepo, NewRecord, Outcome,
    SagaContext, SagaDefinition, SagaState, Scope, StepDefinition, Transaction, VectorIndex,
    WriteOptions,
};

use crate::harness::{World, rid, slow_saga};
use crate::invariants;

/// Size of the id pool: small, so that histories hit the same ids often.
pub const POOL: u8 = 6;

/// A fault a step injects: `fault` on invocation `nth` of `call` (counted
/// from the step's start), and on every later one of the step if `every`.
#[derive(Clone, Debug)]
pub struct Injected {
    /// The port method.
    pub call: Call,
    /// Which invocation, relative to the calls made so far.
    pub nth: usize,
    /// The fault.
    pub fault: Fault,
    /// Whether every later invocation of the step meets it too.
    pub every: bool,
}

/// One step of a history.
#[derive(Clone, Debug)]
pub enum Step {
    /// A re-index to a new collection (or the resumption of the open
    /// migration), maybe with a fault, while another process upserts `ids`
    /// (the re-index's chunks are slowed, so the writes land between them,
    /// at the begin, during the freeze or after the switch). On a world
    /// without a catalog only the writes run.
    Reindex {
        /// Pool ids the other process upserts meanwhile.
        ids: Vec<u8>,
        /// Content tag.
        tag: u8,
        /// An injected fault.
        fault: Option<Injected>,
    },
    /// Upsert these pool ids (content tagged `tag`), maybe with a fault.
    Upsert {
        /// Pool ids.
        ids: Vec<u8>,
        /// Content tag.
        tag: u8,
        /// An injected fault, relative to the calls made so far.
        fault: Option<Injected>,
    },
    /// Delete these pool ids, maybe with a fault.
    Delete {
        /// Pool ids.
        ids: Vec<u8>,
        /// An injected fault.
        fault: Option<Injected>,
    },
    /// Delete a whole scope.
    DeleteScope {
        /// 0 or 1.
        scope: u8,
        /// An injected fault.
        fault: Option<Injected>,
    },
    /// Two upserts at once.
    Concurrent {
        /// First batch.
        a: Vec<u8>,
        /// Second batch.
        b: Vec<u8>,
        /// Content tag.
        tag: u8,
    },
    /// An upsert whose commit is delayed while a recovery runs concurrently
    /// (recovery must leave the live call alone).
    RecoverDuring {
        /// Pool ids.
        ids: Vec<u8>,
        /// Content tag.
        tag: u8,
    },
    /// An upsert whose process dies just before its commit: its points are
    /// written, its intent stays, and only recovery can clean up after it.
    Abandon {
        /// Pool ids.
        ids: Vec<u8>,
        /// Content tag.
        tag: u8,
    },
    /// Recovery after every lease has ended, maybe with a fault (a recovery
    /// that fails leaves what it could not finish to a later one).
    Recover {
        /// An injected fault.
        fault: Option<Injected>,
    },
    /// Recovery, then verify must be consistent and converged.
    Verify,
    /// A transaction: delete `delete`, then upsert `upsert` (ids in both
    /// end up upserted), maybe with a fault.
    Transaction {
        /// Pool ids deleted first.
        delete: Vec<u8>,
        /// Pool ids upserted after.
        upsert: Vec<u8>,
        /// Content tag.
        tag: u8,
        /// An injected fault.
        fault: Option<Injected>,
    },
    /// The pool saga: upsert `a` (tag), then `b` (tag + 1), then a caller
    /// action that fails if `fail` (so both steps are compensated), maybe
    /// with a fault. A saga left unfinished (a crash, an unknown outcome) is
    /// recovered at once: it must end all or nothing.
    Saga {
        /// Pool ids of the first step.
        a: Vec<u8>,
        /// Pool ids of the second step.
        b: Vec<u8>,
        /// Content tag.
        tag: u8,
        /// The caller action refuses.
        fail: bool,
        /// An injected fault.
        fault: Option<Injected>,
    },
    /// The slow pool saga (upsert `a`, then a caller action that runs for
    /// three leases) while another process's recovery runs every half
    /// lease: the driver keeps the lease, so the saga ends done.
    SlowSaga {
        /// Pool ids of the Tandem step.
        a: Vec<u8>,
        /// Content tag.
        tag: u8,
    },
    /// A deferred upsert (rows and pending entries in one transaction; the
    /// index workers write the points later), maybe with a fault.
    DeferredUpsert {
        /// Pool ids.
        ids: Vec<u8>,
        /// Content tag.
        tag: u8,
        /// An injected fault.
        fault: Option<Injected>,
    },
    /// A deferred delete, maybe with a fault.
    DeferredDelete {
        /// Pool ids.
        ids: Vec<u8>,
        /// An injected fault.
        fault: Option<Injected>,
    },
    /// `passes` index-worker passes, the clock moving past every back-off
    /// between them, maybe with a fault (on every call of the step if
    /// `every`: an outage that lasts the step).
    Index {
        /// Worker passes.
        passes: u8,
        /// An injected fault.
        fault: Option<Injected>,
    },
    /// Two index workers at once, while a deferred upsert of `ids` (tag)
    /// commits during their index writes, and a synchronous upsert of `sync`
    /// (tag + 1) right after: the workers' switches race newer versions.
    IndexRace {
        /// Pool ids written deferred while the workers run.
        ids: Vec<u8>,
        /// Pool ids written synchronously after them.
        sync: Vec<u8>,
        /// Content tag.
        tag: u8,
    },
    /// A dynamic saga (upsert `a`, then `b`) whose driver is alive while a
    /// recovery runs between its steps.
    SagaRace {
        /// Pool ids of the first step.
        a: Vec<u8>,
        /// Pool ids of the second step.
        b: Vec<u8>,
        /// Content tag.
        tag: u8,
    },
}

fn scope_of(id: u8) -> Scope {
    Scope::new(format!("s{}", id % 2))
}

fn vector(id: u8, tag: u8) -> Vec<f32> {
    vec![id as f32 + 1.0, tag as f32 + 1.0, 1.0, 0.5]
}

fn content(id: u8, tag: u8) -> String {
    format!("{id}-{tag}")
}

fn batch(ids: &[u8], tag: u8) -> Vec<NewRecord> {
    ids.iter()
        .map(|&id| {
            NewRecord::new(scope_of(id), content(id, tag), vector(id, tag))
                .with_id(rid(u128::from(id) + 1))
                .with_metadata(json!({ "tag": tag }))
        })
        .collect()
}

/// The pool saga of [`Step::Saga`], registered in every coordinator of a
/// history's world. Input: `{"a": [ids], "b": [ids], "tag": n, "fail": bool}`.
pub fn pool_saga() -> SagaDefinition {
    let ids = |v: &serde_json::Value| -> Vec<u8> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64())
                    .map(|x| x as u8)
                    .collect()
            })
            .unwrap_or_default()
    };
    let tag = |ctx: &SagaContext| ctx.input["tag"].as_u64().unwrap_or(0) as u8;
    SagaDefinition::new("pool")
        .step(StepDefinition::tandem("a", move |ctx| {
            Ok(Transaction::new().upsert(batch(&ids(&ctx.input["a"]), tag(ctx))))
        }))
        .step(StepDefinition::tandem("b", move |ctx| {
            Ok(Transaction::new().upsert(batch(&ids(&ctx.input["b"]), tag(ctx).wrapping_add(1))))
        }))
        .step(StepDefinition::action(
            "notify",
            |ctx| async move {
                if ctx.input["fail"] == json!(true) {
                    Err("the subscriber refused".into())
                } else {
                    Ok(json!({ "notified": true }))
                }
            },
            |_| async { Ok(()) },
        ))
}

/// The saga of [`Step::SlowSaga`]: a [`slow_saga`] whose Tandem step upserts
/// the input's `a`. Input: `{"a": [ids], "tag": n}`.
pub fn slow_pool_saga(lease: Duration) -> SagaDefinition {
    slow_saga("pool-slow", lease, |ctx| {
        let ids: Vec<u8> = ctx.input["a"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64())
                    .map(|x| x as u8)
                    .collect()
            })
            .unwrap_or_default();
        let tag = ctx.input["tag"].as_u64().unwrap_or(0) as u8;
        Ok(Transaction::new().upsert(batch(&ids, tag)))
    })
    .0
}

fn call_strategy() -> impl Strategy<Value = Call> {
    prop_oneof![
        Just(Call::Prepare),
        Just(Call::CommitUpsert),
        Just(Call::CommitDelete),
        Just(Call::CommitTransaction),
        Just(Call::SagaSave),
        Just(Call::UndoImages),
        Just(Call::Settle),
        Just(Call::Resolve),
        Just(Call::IndexUpsert),
        Just(Call::IndexDelete),
        Just(Call::LookupIdempotency),
    ]
}

fn fault_strategy() -> impl Strategy<Value = Fault> {
    prop_oneof![
        Just(Fault::FailBefore),
        Just(Fault::FailAfter),
        Just(Fault::Reject),
        Just(Fault::Hang),
        Just(Fault::HangAfter),
        Just(Fault::CrashBefore),
        Just(Fault::CrashAfter),
        Just(Fault::Duplicate),
        Just(Fault::LandLater),
    ]
}

fn maybe_fault() -> impl Strategy<Value = Option<Injected>> {
    let any_fault = (
        call_strategy(),
        0..2usize,
        fault_strategy(),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(call, nth, fault, every)| Injected {
            call,
            nth,
            fault,
            every,
        });
    // An index write answered with an error while its request still lands —
    // once (the retry succeeds) or on every attempt (the write fails): rare
    // among all the combinations above, so drawn on its own too.
    let late_write = (0..2usize, any::<bool>()).prop_map(|(nth, every)| Injected {
        call: Call::IndexUpsert,
        nth,
        fault: Fault::LandLater,
        every,
    });
    prop::option::weighted(0.5, prop_oneof![7 => any_fault, 1 => late_write])
}

/// A fault in one of the calls recovery makes.
fn maybe_recovery_fault() -> impl Strategy<Value = Option<Injected>> {
    let call = prop_oneof![
        1 => Just(Call::ClaimExpired),
        1 => Just(Call::ReferencedPoints),
        3 => Just(Call::IndexDelete),
        1 => Just(Call::ResolveMany),
    ];
    prop::option::weighted(
        0.6,
        // Recovery makes few calls: aim at the first, often at every one.
        (call, fault_strategy(), prop::bool::weighted(0.7)).prop_map(|(call, fault, every)| {
            Injected {
                call,
                nth: 0,
                fault,
                every,
            }
        }),
    )
}

fn ids() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::btree_set(0..POOL, 1..4).prop_map(|s| s.into_iter().collect())
}

/// A fault in one of the calls a deferred write makes (it writes no index).
fn maybe_deferred_fault() -> impl Strategy<Value = Option<Injected>> {
    let call = prop_oneof![
        1 => Just(Call::Prepare),
        3 => Just(Call::CommitTransaction),
        1 => Just(Call::Settle),
        1 => Just(Call::SettleUnprepared),
        1 => Just(Call::Get),
    ];
    prop::option::weighted(
        0.6,
        (call, fault_strategy()).prop_map(|(call, fault)| Injected {
            call,
            nth: 0,
            fault,
            every: false,
        }),
    )
}

/// A fault in one of the calls an index worker makes.
fn maybe_index_fault() -> impl Strategy<Value = Option<Injected>> {
    let call = prop_oneof![
        1 => Just(Call::ClaimPending),
        1 => Just(Call::Prepare),
        3 => Just(Call::IndexUpsert),
        2 => Just(Call::CommitTransaction),
        1 => Just(Call::IndexDelete),
        1 => Just(Call::Resolve),
        1 => Just(Call::RecordIndexFailure),
    ];
    let any_fault = (call, 0..2usize, fault_strategy(), prop::bool::weighted(0.5)).prop_map(
        |(call, nth, fault, every)| Injected {
            call,
            nth,
            fault,
            every,
        },
    );
    // The index down for the whole step (every write refused, transiently):
    // an outage must delay the backlog, never dead-letter it.
    let outage = Just(Injected {
        call: Call::IndexUpsert,
        nth: 0,
        fault: Fault::FailBefore,
        every: true,
    });
    prop::option::weighted(0.7, prop_oneof![3 => any_fault, 1 => outage])
}

/// A random step.
pub fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (ids(), any::<u8>(), maybe_fault()).prop_map(|(ids, tag, fault)| Step::Upsert { ids, tag, fault }),
        2 => (ids(), maybe_fault()).prop_map(|(ids, fault)| Step::Delete { ids, fault }),
        1 => (0..2u8, maybe_fault()).prop_map(|(scope, fault)| Step::DeleteScope { scope, fault }),
        2 => (ids(), ids(), any::<u8>()).prop_map(|(a, b, tag)| Step::Concurrent { a, b, tag }),
        1 => (ids(), any::<u8>()).prop_map(|(ids, tag)| Step::RecoverDuring { ids, tag }),
        2 => (ids(), any::<u8>()).prop_map(|(ids, tag)| Step::Abandon { ids, tag }),
        2 => maybe_recovery_fault().prop_map(|fault| Step::Recover { fault }),
        1 => Just(Step::Verify),
        2 => (ids(), ids(), any::<u8>(), maybe_fault())
            .prop_map(|(delete, upsert, tag, fault)| Step::Transaction { delete, upsert, tag, fault }),
        2 => (ids(), ids(), any::<u8>(), prop::bool::weighted(0.4), maybe_fault())
            .prop_map(|(a, b, tag, fail, fault)| Step::Saga { a, b, tag, fail, fault }),
        1 => (ids(), ids(), any::<u8>()).prop_map(|(a, b, tag)| Step::SagaRace { a, b, tag }),
        1 => (ids(), any::<u8>()).prop_map(|(a, tag)| Step::SlowSaga { a, tag }),
        3 => (ids(), any::<u8>(), maybe_deferred_fault())
            .prop_map(|(ids, tag, fault)| Step::DeferredUpsert { ids, tag, fault }),
        2 => (ids(), maybe_deferred_fault())
            .prop_map(|(ids, fault)| Step::DeferredDelete { ids, fault }),
        3 => (1..5u8, maybe_index_fault()).prop_map(|(passes, fault)| Step::Index { passes, fault }),
        1 => (ids(), ids(), any::<u8>())
            .prop_map(|(ids, sync, tag)| Step::IndexRace { ids, sync, tag }),
        2 => (ids(), any::<u8>(), maybe_reindex_fault())
            .prop_map(|(ids, tag, fault)| Step::Reindex { ids, tag, fault }),
    ]
}

/// A fault in one of the calls a re-index makes.
fn maybe_reindex_fault() -> impl Strategy<Value = Option<Injected>> {
    let call = prop_oneof![
        1 => Just(Call::ReindexBegin),
        2 => Just(Call::ReindexScan),
        2 => Just(Call::ReindexGarbage),
        2 => Just(Call::ReindexProgress),
        1 => Just(Call::ReindexFreeze),
        1 => Just(Call::ReindexSwitch),
        3 => Just(Call::IndexUpsert),
        1 => Just(Call::IndexDelete),
    ];
    prop::option::weighted(
        0.7,
        (call, 0..4usize, fault_strategy()).prop_map(|(call, nth, fault)| Injected {
            call,
            nth,
            fault,
            every: false,
        }),
    )
}

/// `steps` without the deferred-indexing steps, for histories on a store
/// without deferred indexing.
pub fn sync_only(steps: impl Strategy<Value = Step>) -> impl Strategy<Value = Step> {
    steps.prop_filter("the store has no deferred indexing", |s| {
        !matches!(
            s,
            Step::DeferredUpsert { .. }
                | Step::DeferredDelete { .. }
                | Step::Index { .. }
                | Step::IndexRace { .. }
        )
    })
}

/// [`step`] for histories on a runtime whose clock is not paused (a server's
/// connection pool needs one): without [`Step::SlowSaga`], whose action takes
/// three leases of tokio time.
pub fn real_time_step() -> impl Strategy<Value = Step> {
    step().prop_filter("a slow saga needs paused time", |s| {
        !matches!(s, Step::SlowSaga { .. })
    })
}

/// The model: pool id → content.
type Model = BTreeMap<u8, String>;

async fn store_view<M: MetadataRepo>(repo: &M) -> Result<Model, String> {
    let rows = invariants::rows(repo).await?;
    let mut out = Model::new();
    for id in 0..POOL {
        if let Some(r) = rows.get(&rid(u128::from(id) + 1)) {
            out.insert(id, r.content.clone());
        }
    }
    if rows.len() != out.len() {
        return Err("the store holds records no call wrote".into());
    }
    Ok(out)
}

enum Ended {
    Ok,
    NotApplied,
    Unknown,
}

fn ended<T>(r: Option<Result<T, CoordinatorError>>) -> Ended {
    match r {
        Some(Ok(_)) => Ended::Ok,
        Some(Err(e)) if e.outcome() == Outcome::NotApplied => Ended::NotApplied,
        _ => Ended::Unknown,
    }
}

/// Applies a decided outcome to the model, or (for unknown outcomes) adopts
/// whichever of "applied" / "not applied" the store shows — anything else is a
/// partial effect.
fn settle_model(
    model: &mut Model,
    applied: Model,
    end: Ended,
    store: &Model,
    what: &str,
) -> Result<(), String> {
    match end {
        Ended::Ok => *model = applied,
        Ended::NotApplied => {}
        Ended::Unknown if *store == applied => *model = applied,
        Ended::Unknown => {}
    }
    if store != model {
        return Err(format!(
            "I3 violated after {what}: store {store:?} != model {model:?}"
        ));
    }
    Ok(())
}

async fn check_instant<M: MetadataRepo + 'static, V: VectorIndex + 'static>(
    world: &World<M, V>,
) -> Result<(), String> {
    let active = world.active_index().await?;
    let (repo, index) = (&*world.repo, &*active);
    invariants::no_dangling_rows(repo, index).await?;
    invariants::no_invisible_garbage(repo, index).await?;
    let queries: Vec<Vec<f32>> = (0..POOL)
        .flat_map(|id| [vector(id, 0), vector(id, 200)])
        .collect();
    invariants::guarded_reads(&world.clean(), repo, &queries, 3).await
}

async fn recover_and_check<M: MetadataRepo + 'static, V: VectorIndex + 'static>(
    world: &World<M, V>,
    converge: bool,
    allow_dead_letters: bool,
) -> Result<(), String> {
    // Nothing lands after a lease has ended (see `docs/protocol.md`).
    world.land_deferred().await;
    world.after_leases();
    let c = world.clean();
    c.recover()
        .await
        .map_err(|e| format!("recovery failed: {e}"))?;
    if world.repo.deferred_indexing() {
        if allow_dead_letters {
            // The index rejected some points for good during the history:
            // those entries were dead-lettered; an operator retries them.
            c.retry_dead_letters(None)
                .await
                .map_err(|e| format!("retrying dead letters: {e}"))?;
        }
        crate::harness::drain(world, &c).await?;
        invariants::indexed_current(&*world.repo, &*world.active_index().await?).await?;
    }
    invariants::exact_equality(&*world.repo, &*world.active_index().await?).await?;
    if converge {
        invariants::converged(&c).await?;
    }
    Ok(())
}

fn install(ctl: &FaultController, fault: &Option<Injected>) {
    if let Some(f) = fault {
        ctl.add(Rule {
            call: f.call,
            nth: ctl.invocations(f.call) + f.nth,
            times: if f.every { usize::MAX } else { 1 },
            fault: f.fault.clone(),
        });
    }
}

/// Runs one history against fresh stores from `make` (its
/// [`Step::Reindex`] steps only write: the world has no catalog).
pub async fn run_history<M, V, F, Fut>(
    make: F,
    config: CoordinatorConfig,
    steps: Vec<Step>,
    bug: Option<tandem_core::PlantedBug>,
) -> Result<(), String>
where
    M: MetadataRepo + 'static,
    V: VectorIndex + 'static,
    F: FnOnce() -> Fut,
    Fut: Future<Output = (M, V)>,
{
    run_history_with(make, None, config, steps, bug).await
}

/// [`run_history`] on a world whose catalog creates collections with
/// `new_collection`, so that [`Step::Reindex`] re-indexes.
pub async fn run_history_with<M, V, F, Fut>(
    make: F,
    new_collection: Option<fn(usize, tandem_core::Distance) -> V>,
    config: CoordinatorConfig,
    steps: Vec<Step>,
    bug: Option<tandem_core::PlantedBug>,
) -> Result<(), String>
where
    M: MetadataRepo + 'static,
    V: VectorIndex + 'static,
    F: FnOnce() -> Fut,
    Fut: Future<Output = (M, V)>,
{
    let (repo, index) = make().await;
    let mut world = World::new(repo, index, config, 3);
    if let Some(make_index) = new_collection {
        world = world.with_catalog(make_index);
    }
    world.bug = bug;
    world.sagas.push(pool_saga());
    world.sagas.push(slow_pool_saga(world.config.lease));
    let mut model = Model::new();
    let mut landing: Vec<Vec<tandem_core::Point>> = Vec::new();
    // Whether a worker met a permanent failure (dead letters are then legitimate).
    let mut rejected = false;
    for (n, step) in steps.iter().enumerate() {
        let what = format!("step {n} {step:?}");
        match step {
            Step::DeferredUpsert { ids, tag, fault } => {
                install(&world.ctl, fault);
                let c = world.faulty();
                let r = run_until_crash(
                    &world.ctl,
                    c.upsert_with(batch(ids, *tag), &WriteOptions::deferred()),
                )
                .await;
                let mut applied = model.clone();
                for &id in ids {
                    applied.insert(id, content(id, *tag));
                }
                let store = store_view(&*world.repo).await?;
                settle_model(&mut model, applied, ended(r), &store, &what)?;
            }
            Step::DeferredDelete { ids, fault } => {
                install(&world.ctl, fault);
                let c = world.faulty();
                let sel =
                    DeleteSelector::Ids(ids.iter().map(|&id| rid(u128::from(id) + 1)).collect());
                let r = run_until_crash(&world.ctl, c.delete_with(sel, &WriteOptions::deferred()))
                    .await;
                let mut applied = model.clone();
                for id in ids {
                    applied.remove(id);
                }
                let store = store_view(&*world.repo).await?;
                settle_model(&mut model, applied, ended(r), &store, &what)?;
            }
            Step::Index { passes, fault } => {
                if fault
                    .as_ref()
                    .is_some_and(|f| matches!(f.fault, Fault::Reject))
                {
                    rejected = true;
                }
                install(&world.ctl, fault);
                for _ in 0..*passes {
                    let c = world.faulty();
                    // A pass that fails (or dies) leaves its entries to a later one.
                    let _ = run_until_crash(&world.ctl, c.index_pending()).await;
                    world.clock.advance(
                        world.config.indexing.max_retry_backoff + Duration::from_millis(1),
                    );
                }
                if store_view(&*world.repo).await? != model {
                    return Err(format!("after {what}: indexing changed the records"));
                }
            }
            Step::IndexRace { ids, sync, tag } => {
                // The workers' index writes wait while newer versions commit.
                world.ctl.add(Rule {
                    call: Call::IndexUpsert,
                    nth: world.ctl.invocations(Call::IndexUpsert),
                    times: 2,
                    fault: Fault::Delay(Duration::from_millis(100)),
                });
                let (w1, w2, writer) = (world.faulty(), world.faulty(), world.clean());
                let tag_sync = tag.wrapping_add(1);
                let (r1, r2, written) =
                    tokio::join!(w1.index_pending(), w2.index_pending(), async {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        writer
                            .upsert_with(batch(ids, *tag), &WriteOptions::deferred())
                            .await?;
                        writer.upsert(batch(sync, tag_sync)).await
                    });
                r1.map_err(|e| format!("{what}: worker failed: {e}"))?;
                r2.map_err(|e| format!("{what}: worker failed: {e}"))?;
                written.map_err(|e| format!("{what}: write failed without faults: {e}"))?;
                for &id in ids {
                    model.insert(id, content(id, *tag));
                }
                for &id in sync {
                    model.insert(id, content(id, tag_sync));
                }
            }
            Step::Reindex { ids, tag, fault } => {
                let writer = world.clean();
                let write = async {
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    writer.upsert(batch(ids, *tag)).await
                };
                let written = if world.catalog.is_some() {
                    let state = world
                        .repo
                        .index_state()
                        .await
                        .map_err(|e| format!("{what}: index_state: {e}"))?;
                    let target = match &state.migration {
                        Some(m) => m.spec.target.clone(),
                        None => format!("c{}", state.generation + 1),
                    };
                    // Every chunk waits a little: the writes land in between.
                    for call in [Call::ReindexScan, Call::ReindexSwitch] {
                        world.ctl.add(Rule {
                            call,
                            nth: world.ctl.invocations(call),
                            times: usize::MAX,
                            fault: Fault::Delay(Duration::from_millis(2)),
                        });
                    }
                    install(&world.ctl, fault);
                    let driver = world.faulty();
                    let options = tandem_core::ReindexOptions::to(target);
                    let (reindexed, written) = tokio::join!(
                        run_until_crash(&world.ctl, driver.reindex(&options, &|_| {})),
                        write
                    );
                    if !matches!(reindexed, Some(Ok(_))) {
                        // The driver died or gave up: time passes before the
                        // next step, past its freeze and its lease (a dead
                        // driver's freeze ends by itself).
                        world.clock.advance(
                            world
                                .config
                                .reindex
                                .switch_freeze
                                .max(world.config.reindex.lease)
                                + Duration::from_millis(1),
                        );
                    }
                    written
                } else {
                    write.await
                };
                let mut applied = model.clone();
                for &id in ids {
                    applied.insert(id, content(id, *tag));
                }
                let store = store_view(&*world.repo).await?;
                settle_model(&mut model, applied, ended(Some(written)), &store, &what)?;
            }
            Step::Upsert { ids, tag, fault } => {
                install(&world.ctl, fault);
                let c = world.faulty();
                let r = run_until_crash(&world.ctl, c.upsert(batch(ids, *tag))).await;
                let mut applied = model.clone();
                for &id in ids {
                    applied.insert(id, content(id, *tag));
                }
                let store = store_view(&*world.repo).await?;
                settle_model(&mut model, applied, ended(r), &store, &what)?;
            }
            Step::Delete { ids, fault } => {
                install(&world.ctl, fault);
                let c = world.faulty();
                let sel =
                    DeleteSelector::Ids(ids.iter().map(|&id| rid(u128::from(id) + 1)).collect());
                let r = run_until_crash(&world.ctl, c.delete(sel)).await;
                let mut applied = model.clone();
                for id in ids {
                    applied.remove(id);
                }
                let store = store_view(&*world.repo).await?;
                settle_model(&mut model, applied, ended(r), &store, &what)?;
            }
            Step::DeleteScope { scope, fault } => {
                install(&world.ctl, fault);
                let c = world.faulty();
                let sel = DeleteSelector::Scope(Scope::new(format!("s{scope}")));
                let r = run_until_crash(&world.ctl, c.delete(sel)).await;
                let mut applied = model.clone();
                applied.retain(|id, _| id % 2 != *scope);
                let store = store_view(&*world.repo).await?;
                settle_model(&mut model, applied, ended(r), &store, &what)?;
            }
            Step::Concurrent { a, b, tag } => {
                let c1 = world.faulty();
                let c2 = world.faulty();
                let tag_b = tag.wrapping_add(1);
                let (ra, rb) = tokio::join!(c1.upsert(batch(a, *tag)), c2.upsert(batch(b, tag_b)));
                ra.map_err(|e| format!("concurrent upsert failed without faults: {e}"))?;
                rb.map_err(|e| format!("concurrent upsert failed without faults: {e}"))?;
                let apply = |m: &mut Model, ids: &[u8], t: u8| {
                    for &id in ids {
                        m.insert(id, content(id, t));
                    }
                };
                let mut ab = model.clone();
                apply(&mut ab, a, *tag);
                apply(&mut ab, b, tag_b);
                let mut ba = model.clone();
                apply(&mut ba, b, tag_b);
                apply(&mut ba, a, *tag);
                let store = store_view(&*world.repo).await?;
                if store == ab {
                    model = ab;
                } else if store == ba {
                    model = ba;
                } else {
                    return Err(format!(
                        "I6 violated after {what}: {store:?} is neither serial order"
                    ));
                }
            }
            Step::RecoverDuring { ids, tag } => {
                world.ctl.add(Rule::once(
                    Call::CommitUpsert,
                    world.ctl.invocations(Call::CommitUpsert),
                    Fault::Delay(Duration::from_millis(100)),
                ));
                let writer = world.faulty();
                let recoverer = world.clean();
                let (written, recovered) = tokio::join!(writer.upsert(batch(ids, *tag)), async {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    recoverer.recover().await
                });
                recovered.map_err(|e| format!("recovery failed: {e}"))?;
                let mut applied = model.clone();
                for &id in ids {
                    applied.insert(id, content(id, *tag));
                }
                let store = store_view(&*world.repo).await?;
                settle_model(&mut model, applied, ended(Some(written)), &store, &what)?;
            }
            Step::Abandon { ids, tag } => {
                world.ctl.add(Rule::once(
                    Call::CommitUpsert,
                    world.ctl.invocations(Call::CommitUpsert),
                    Fault::CrashBefore,
                ));
                let c = world.faulty();
                if run_until_crash(&world.ctl, c.upsert(batch(ids, *tag)))
                    .await
                    .is_some()
                {
                    return Err(format!("{what}: the upsert outlived its crash"));
                }
            }
            Step::Recover { fault: None } => {
                land(&world, std::mem::take(&mut landing)).await?;
                recover_and_check(&world, false, rejected).await?;
            }
            Step::Recover { fault } => {
                land(&world, std::mem::take(&mut landing)).await?;
                world.after_leases();
                install(&world.ctl, fault);
                let c = world.faulty();
                // Whatever it could not finish stays named by its intents.
                let _ = run_until_crash(&world.ctl, c.recover()).await;
                if store_view(&*world.repo).await? != model {
                    return Err(format!("after {what}: a recovery changed the records"));
                }
            }
            Step::Verify => {
                land(&world, std::mem::take(&mut landing)).await?;
                recover_and_check(&world, true, rejected).await?;
            }
            Step::Transaction {
                delete,
                upsert,
                tag,
                fault,
            } => {
                install(&world.ctl, fault);
                let c = world.faulty();
                let tx = Transaction::new()
                    .delete(DeleteSelector::Ids(
                        delete.iter().map(|&id| rid(u128::from(id) + 1)).collect(),
                    ))
                    .upsert(batch(upsert, *tag));
                let r = run_until_crash(&world.ctl, c.transact(tx, &WriteOptions::default())).await;
                let mut applied = model.clone();
                for id in delete {
                    applied.remove(id);
                }
                for &id in upsert {
                    applied.insert(id, content(id, *tag));
                }
                let store = store_view(&*world.repo).await?;
                settle_model(&mut model, applied, ended(r), &store, &what)?;
            }
            Step::Saga {
                a,
                b,
                tag,
                fail,
                fault,
            } => {
                install(&world.ctl, fault);
                let c = world.faulty();
                let input = json!({ "a": a, "b": b, "tag": tag, "fail": fail });
                let r = run_until_crash(&world.ctl, c.run_saga("pool", input)).await;
                let mut applied = model.clone();
                for &id in a {
                    applied.insert(id, content(id, *tag));
                }
                for &id in b {
                    applied.insert(id, content(id, tag.wrapping_add(1)));
                }
                let end = match r {
                    Some(Ok(o)) if o.state == SagaState::Done => Ended::Ok,
                    Some(Ok(o)) if o.state == SagaState::Compensated => Ended::NotApplied,
                    other => {
                        // Unfinished: a restarted process recovers it now.
                        if let Some(Err(e)) = &other
                            && e.outcome() == Outcome::NotApplied
                            && !matches!(e, CoordinatorError::SagaUnfinished { .. })
                        {
                            Ended::NotApplied
                        } else {
                            world.ctl.clear();
                            land(&world, std::mem::take(&mut landing)).await?;
                            land(&world, world.ctl.take_deferred()).await?;
                            recover_and_check(&world, false, rejected).await?;
                            Ended::Unknown
                        }
                    }
                };
                if *fail && matches!(end, Ended::Ok) {
                    return Err(format!("{what}: a saga whose action refused ended done"));
                }
                let store = store_view(&*world.repo).await?;
                settle_model(&mut model, applied, end, &store, &what)?;
                check_sagas_ended(&world, &what).await?;
            }
            Step::SlowSaga { a, tag } => {
                // Leases end during this step: what is still on its way lands first.
                land(&world, std::mem::take(&mut landing)).await?;
                world
                    .run_saga_while_recovering("pool-slow", json!({ "a": a, "tag": tag }))
                    .await
                    .map_err(|e| format!("{what}: {e}"))?;
                let mut applied = model.clone();
                for &id in a {
                    applied.insert(id, content(id, *tag));
                }
                let store = store_view(&*world.repo).await?;
                settle_model(&mut model, applied, Ended::Ok, &store, &what)?;
            }
            Step::SagaRace { a, b, tag } => {
                let driver = world.clean();
                let mut saga = driver
                    .begin_saga("harness-dynamic", json!({}))
                    .await
                    .map_err(|e| format!("{what}: begin_saga: {e}"))?;
                saga.step("a", Transaction::new().upsert(batch(a, *tag)))
                    .await
                    .map_err(|e| format!("{what}: step a: {e}"))?;
                world
                    .clean()
                    .recover()
                    .await
                    .map_err(|e| format!("{what}: recovery: {e}"))?;
                let rest = async {
                    saga.step(
                        "b",
                        Transaction::new().upsert(batch(b, tag.wrapping_add(1))),
                    )
                    .await?;
                    saga.finish().await
                }
                .await;
                let mut applied = model.clone();
                for &id in a {
                    applied.insert(id, content(id, *tag));
                }
                for &id in b {
                    applied.insert(id, content(id, tag.wrapping_add(1)));
                }
                let end = match rest {
                    Ok(o) if o.state == SagaState::Done => Ended::Ok,
                    _ => Ended::Unknown,
                };
                let store = store_view(&*world.repo).await?;
                settle_model(&mut model, applied, end, &store, &what)?;
            }
        }
        // Faults last one step; after a crash the next steps run in a
        // "restarted" process.
        world.ctl.clear();
        // Writes answered with an error but still on their way land one step
        // later: after the next call ran (which may supersede or delete what
        // they carry), and before any lease ends.
        land(
            &world,
            std::mem::replace(&mut landing, world.ctl.take_deferred()),
        )
        .await?;
        check_instant(&world)
            .await
            .map_err(|e| format!("after {what}: {e}"))?;
        if store_view(&*world.repo).await? != model {
            return Err(format!("after {what}: store differs from the model"));
        }
    }
    world.ctl.disable();
    land(&world, landing).await?;
    finish_reindex(&world).await?;
    recover_and_check(&world, true, rejected).await
}

/// A migration a step left open is resumed to its switch by a restarted
/// process (after the dead driver's lease): it must succeed, and the checks
/// that follow run on the new collection.
async fn finish_reindex<M: MetadataRepo + 'static, V: VectorIndex + 'static>(
    world: &World<M, V>,
) -> Result<(), String> {
    if world.catalog.is_none() {
        return Ok(());
    }
    let state = world
        .repo
        .index_state()
        .await
        .map_err(|e| format!("index_state: {e}"))?;
    let Some(migration) = state.migration else {
        return Ok(());
    };
    world.land_deferred().await;
    world.after_leases();
    let c = world.clean();
    c.recover()
        .await
        .map_err(|e| format!("recovery failed: {e}"))?;
    c.reindex(
        &tandem_core::ReindexOptions::to(migration.spec.target),
        &|_| {},
    )
    .await
    .map(|_| ())
    .map_err(|e| format!("the resumed re-index failed: {e}"))
}

/// After a saga step: no saga is left live (a finished call ended it, an
/// unfinished one was recovered), and none ended `Failed`.
async fn check_sagas_ended<M: MetadataRepo + 'static, V: VectorIndex + 'static>(
    world: &World<M, V>,
    what: &str,
) -> Result<(), String> {
    let sagas = world
        .clean()
        .sagas(None, 1_000)
        .await
        .map_err(|e| format!("listing sagas: {e}"))?;
    match sagas
        .iter()
        .find(|s| !matches!(s.state, SagaState::Done | SagaState::Compensated))
    {
        Some(s) => Err(format!(
            "saga atomicity violated after {what}: saga {} is {:?} ({:?})",
            s.id, s.state, s.last_error
        )),
        None => Ok(()),
    }
}

/// Lands writes that met [`Fault::LandLater`] (see [`World::land_deferred`]).
async fn land<M: MetadataRepo + 'static, V: VectorIndex + 'static>(
    world: &World<M, V>,
    writes: Vec<Vec<tandem_core::Point>>,
) -> Result<(), String> {
    for points in writes {
        world
            .index
            .upsert(&points)
            .await
            .map_err(|e| format!("a late-landing write failed: {e}"))?;
    }
    Ok(())
}

/// The configuration the property suite uses.
pub fn property_config() -> CoordinatorConfig {
    crate::harness::fault_config(Duration::from_secs(5))
}
