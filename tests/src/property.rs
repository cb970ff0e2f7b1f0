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
    CoordinatorConfig, CoordinatorError, DeleteSelector, MetadataRepo, NewRecord, Outcome, Scope,
    VectorIndex,
};

use crate::harness::{World, rid};
use crate::invariants;

/// Size of the id pool: small, so that histories hit the same ids often.
pub const POOL: u8 = 6;

/// One step of a history.
#[derive(Clone, Debug)]
pub enum Step {
    /// Upsert these pool ids (content tagged `tag`), maybe with a fault.
    Upsert {
        /// Pool ids.
        ids: Vec<u8>,
        /// Content tag.
        tag: u8,
        /// An injected fault, relative to the calls made so far.
        fault: Option<(Call, usize, Fault)>,
    },
    /// Delete these pool ids, maybe with a fault.
    Delete {
        /// Pool ids.
        ids: Vec<u8>,
        /// An injected fault.
        fault: Option<(Call, usize, Fault)>,
    },
    /// Delete a whole scope.
    DeleteScope {
        /// 0 or 1.
        scope: u8,
        /// An injected fault.
        fault: Option<(Call, usize, Fault)>,
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
    /// Recovery after every lease has ended.
    Recover,
    /// Recovery, then verify must be consistent and converged.
    Verify,
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

fn call_strategy() -> impl Strategy<Value = Call> {
    prop_oneof![
        Just(Call::Prepare),
        Just(Call::CommitUpsert),
        Just(Call::CommitDelete),
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
    ]
}

fn maybe_fault() -> impl Strategy<Value = Option<(Call, usize, Fault)>> {
    prop::option::weighted(0.5, (call_strategy(), 0..2usize, fault_strategy()))
}

fn ids() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::btree_set(0..POOL, 1..4).prop_map(|s| s.into_iter().collect())
}

/// A random step.
pub fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (ids(), any::<u8>(), maybe_fault()).prop_map(|(ids, tag, fault)| Step::Upsert { ids, tag, fault }),
        2 => (ids(), maybe_fault()).prop_map(|(ids, fault)| Step::Delete { ids, fault }),
        1 => (0..2u8, maybe_fault()).prop_map(|(scope, fault)| Step::DeleteScope { scope, fault }),
        2 => (ids(), ids(), any::<u8>()).prop_map(|(a, b, tag)| Step::Concurrent { a, b, tag }),
        1 => (ids(), any::<u8>()).prop_map(|(ids, tag)| Step::RecoverDuring { ids, tag }),
        1 => Just(Step::Recover),
        1 => Just(Step::Verify),
    ]
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
    let (repo, index) = (&*world.repo, &*world.index);
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
) -> Result<(), String> {
    world.after_leases();
    let c = world.clean();
    c.recover()
        .await
        .map_err(|e| format!("recovery failed: {e}"))?;
    invariants::exact_equality(&*world.repo, &*world.index).await?;
    if converge {
        invariants::converged(&c).await?;
    }
    Ok(())
}

fn install(ctl: &FaultController, fault: &Option<(Call, usize, Fault)>) {
    if let Some((call, k, f)) = fault {
        ctl.add(Rule::once(*call, ctl.invocations(*call) + k, f.clone()));
    }
}

/// Runs one history against fresh stores from `make`.
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
    let (repo, index) = make().await;
    let mut world = World::new(repo, index, config, 3);
    world.bug = bug;
    let mut model = Model::new();
    for (n, step) in steps.iter().enumerate() {
        let what = format!("step {n} {step:?}");
        match step {
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
            Step::Recover => recover_and_check(&world, false).await?,
            Step::Verify => recover_and_check(&world, true).await?,
        }
        // Faults last one step; after a crash the next steps run in a
        // "restarted" process.
        world.ctl.clear();
        check_instant(&world)
            .await
            .map_err(|e| format!("after {what}: {e}"))?;
        if store_view(&*world.repo).await? != model {
            return Err(format!("after {what}: store differs from the model"));
        }
    }
    world.ctl.disable();
    recover_and_check(&world, true).await
}

/// The configuration the property suite uses.
pub fn property_config() -> CoordinatorConfig {
    crate::harness::fault_config(Duration::from_secs(5))
}
