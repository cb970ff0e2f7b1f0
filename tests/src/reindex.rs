//! Re-indexing under single faults: the exhaustive suite's reindex case.
//!
//! Each case: a seeded world with a catalog (its index is collection
//! [`MAIN`](crate::harness::MAIN)), a deferred insert still waiting for the workers, then a
//! re-index to collection `next` by a faulty coordinator, with one fault at
//! one port call (or a crash). Then another process writes while the
//! migration is open (or after the switch, or after nothing happened), the
//! leases end, a restarted process recovers and re-runs the re-index to its
//! end, and the workers drain. Checked: `next` is active, every committed
//! row's point is in it (I1), it holds no other point (exact), the records
//! are exactly the seed plus the other process's writes (the re-index never
//! changes a record), reads are guarded, and `verify` is clean.

use std::collections::BTreeMap;
use std::future::Future;

use tandem_core::PlantedBug;
use tandem_core::testkit::faults::{Call, Fault, Rule, run_until_crash};
use tandem_core::{
    CoordinatorConfig, DeleteSelector, Distance, IndexCatalog, MetadataRepo, NewRecord, RecordId,
    ReindexOptions, StoredRecord, VectorIndex, WriteOptions,
};

use crate::harness::{
    CaseResult, ExhaustiveSummary, Ran, Scenario, World, rid, single_faults, vector_for,
};
use crate::invariants;

/// The target collection of the cases.
pub const NEXT: &str = "next";

/// The deferred insert left waiting when the re-index starts.
fn waiting() -> NewRecord {
    NewRecord::new("a", "deferred, not yet indexed", vector_for(0x4001, 0)).with_id(rid(0x4001))
}

/// The other process's writes during the migration: an update of records 1
/// and 2, a new record, and the delete of record 5.
async fn other_process_writes<R: MetadataRepo, X: VectorIndex>(
    c: &tandem_core::Coordinator<R, X>,
) -> Result<(), String> {
    c.upsert(vec![
        NewRecord::new("a", "updated during the re-index", vector_for(1, 5)).with_id(rid(1)),
        NewRecord::new("a", "updated during the re-index", vector_for(2, 5)).with_id(rid(2)),
        NewRecord::new("b", "new during the re-index", vector_for(0x4002, 0)).with_id(rid(0x4002)),
    ])
    .await
    .map_err(|e| format!("a write during the re-index failed: {e}"))?;
    c.delete(DeleteSelector::Ids(vec![rid(5)]))
        .await
        .map_err(|e| format!("a delete during the re-index failed: {e}"))?;
    Ok(())
}

/// Content, scope and metadata of each record (what a re-index must not
/// change; point ids and versions may differ between runs).
fn contents(rows: &BTreeMap<RecordId, StoredRecord>) -> BTreeMap<RecordId, (String, String)> {
    rows.iter()
        .map(|(id, r)| (*id, (r.scope.to_string(), r.content.clone())))
        .collect()
}

/// One case: see the module docs. Returns the case and the port calls the
/// faulty re-index made.
pub async fn run_reindex_case<M, V, F, Fut>(
    make: &F,
    new_collection: fn(usize, Distance) -> V,
    config: &CoordinatorConfig,
    rule: Option<Rule>,
    bug: Option<PlantedBug>,
) -> (CaseResult, Vec<(Call, usize)>)
where
    M: MetadataRepo + 'static,
    V: VectorIndex + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = (M, V)>,
{
    let (repo, index) = make().await;
    let mut world = World::new(repo, index, config.clone(), 7).with_catalog(new_collection);
    world.bug = bug;
    world.seed().await;
    let deferred = world.repo.deferred_indexing();
    if deferred {
        world
            .clean()
            .upsert_with(vec![waiting()], &WriteOptions::deferred())
            .await
            .expect("deferred insert");
    }
    let rule_desc = rule.as_ref().map(|r| (r.call, r.nth, r.fault.clone()));
    if let Some(rule) = rule {
        world.ctl.add(rule);
    }
    let log_start = world.ctl.log().len();
    let faulty = world.faulty();
    let outcome = run_until_crash(
        &world.ctl,
        faulty.reindex(&ReindexOptions::to(NEXT), &|_| {}),
    )
    .await;
    let calls: Vec<(Call, usize)> = world.ctl.log()[log_start..]
        .iter()
        .map(|e| (e.call, e.occurrence))
        .collect();
    world.ctl.clear();
    world.ctl.disable();
    world.land_deferred().await;
    let ran = match &outcome {
        None => Ran::Crashed,
        Some(Ok(_)) => Ran::Ok,
        Some(Err(e)) => Ran::NotApplied(e.to_string()),
    };
    let violation = check_reindex_case(&world, deferred, matches!(outcome, Some(Ok(_))))
        .await
        .err();
    (
        CaseResult {
            scenario: Scenario::Reindex,
            rule: rule_desc,
            ran,
            violation,
        },
        calls,
    )
}

async fn check_reindex_case<M, V>(
    world: &World<M, V>,
    deferred: bool,
    reported_ok: bool,
) -> Result<(), String>
where
    M: MetadataRepo + 'static,
    V: VectorIndex + 'static,
{
    let repo = &*world.repo;
    let catalog = world.catalog.clone().expect("a catalog");
    let state = repo.index_state().await.map_err(|e| e.to_string())?;
    if reported_ok && state.active.as_deref() != Some(NEXT) {
        return Err(format!(
            "the re-index reported success, but the state is {state:?}"
        ));
    }
    // Never a mix: whatever collection is active holds every committed
    // row's point, at the instant the call returned.
    let active = world.active_index().await?;
    invariants::no_dangling_rows(repo, &*active).await?;

    // Another process writes (after a crash mid-switch, once the freeze
    // ended: the clock moves past every lease first).
    world.after_leases();
    let other = world.clean();
    other_process_writes(&other).await?;
    let expected = contents(&invariants::rows(repo).await?);

    // A restarted process recovers and finishes the re-index.
    world.after_leases();
    let restarted = world.clean();
    restarted
        .recover()
        .await
        .map_err(|e| format!("recovery failed: {e}"))?;
    let state = repo.index_state().await.map_err(|e| e.to_string())?;
    if state.active.as_deref() != Some(NEXT) {
        restarted
            .reindex(&ReindexOptions::to(NEXT), &|_| {})
            .await
            .map_err(|e| format!("the resumed re-index failed: {e}"))?;
    }
    if deferred {
        crate::harness::drain(world, &restarted).await?;
    }
    world.after_leases();
    restarted
        .recover()
        .await
        .map_err(|e| format!("recovery failed: {e}"))?;

    let state = repo.index_state().await.map_err(|e| e.to_string())?;
    if state.active.as_deref() != Some(NEXT) || state.migration.is_some() {
        return Err(format!("after the resumed re-index the state is {state:?}"));
    }
    let next = catalog.open(NEXT).await.map_err(|e| e.to_string())?;
    let now = contents(&invariants::rows(repo).await?);
    if now != expected {
        return Err(format!(
            "the records changed: expected {} records, found {}",
            expected.len(),
            now.len()
        ));
    }
    invariants::exact_equality(repo, &*next).await?;
    invariants::indexed_current(repo, &*next).await?;
    let fresh = world.clean();
    let queries: Vec<Vec<f32>> = (1..=6u128)
        .chain([0x4001, 0x4002])
        .flat_map(|n| [vector_for(n, 0), vector_for(n, 5)])
        .collect();
    invariants::guarded_reads(&fresh, repo, &queries, 4).await?;
    invariants::converged(&fresh).await?;
    if fresh.index().dimension() != next.dimension() || fresh.generation() != state.generation {
        return Err("a restarted process did not follow the switch".into());
    }
    Ok(())
}

/// Every port call of a re-index × every single fault (and "fails every
/// attempt"), on fresh stores from `make`.
pub async fn exhaustive_reindex<M, V, F, Fut>(
    make: F,
    new_collection: fn(usize, Distance) -> V,
    config: CoordinatorConfig,
) -> ExhaustiveSummary
where
    M: MetadataRepo + 'static,
    V: VectorIndex + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = (M, V)>,
{
    exhaustive_reindex_with_bug(make, new_collection, config, None).await
}

/// [`exhaustive_reindex`] with a planted bug (`None`: none; then the
/// fault-free run must succeed).
pub async fn exhaustive_reindex_with_bug<M, V, F, Fut>(
    make: F,
    new_collection: fn(usize, Distance) -> V,
    config: CoordinatorConfig,
    bug: impl Into<Option<PlantedBug>>,
) -> ExhaustiveSummary
where
    M: MetadataRepo + 'static,
    V: VectorIndex + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = (M, V)>,
{
    let bug = bug.into();
    let mut summary = ExhaustiveSummary::default();
    let (base, calls) = run_reindex_case(&make, new_collection, &config, None, bug).await;
    if bug.is_none() {
        assert!(
            base.ran == Ran::Ok && base.violation.is_none(),
            "a re-index without faults: {base:?}"
        );
    }
    summary.record(base);
    for &(call, occurrence) in &calls {
        for fault in single_faults() {
            let rule = Rule::once(call, occurrence, fault);
            summary.record(
                run_reindex_case(&make, new_collection, &config, Some(rule), bug)
                    .await
                    .0,
            );
        }
        for fault in [Fault::FailBefore, Fault::LandLater] {
            let rule = Rule {
                call,
                nth: occurrence,
                times: usize::MAX,
                fault,
            };
            summary.record(
                run_reindex_case(&make, new_collection, &config, Some(rule), bug)
                    .await
                    .0,
            );
        }
    }
    summary
}
