//! Re-indexing under single faults: the exhaustive suite's reindex case.
//!
//! Each case: a seeded world with a catalog (its index is collection
//! [`MAIN`](crate::harness::MAIN)), a deferred insert still waiting for the workers, then a
//! re-index to collection `next` by a faulty coordinator, with one fault at
//! one port call (or a crash). Then another process writes while the
//! migration is open (or after the switch, or after nothing happened), the
//! leases end, a restarted process recovers and re-runs the re-index to its
//! end (dropping the old collection, `drop_old`, or finishing an interrupted
//! drop with `drop_retired`), and the workers drain. Checked: `next` is
//! active, every committed row's point is in it (I1), it holds no other
//! point (exact), the old collection is gone and forgotten, the records are
//! exactly the seed plus the other process's writes (the re-index never
//! changes a record), reads are guarded, and `verify` is clean.
//!
//! The cases run either a rebuild from the kept vectors or a re-embedding
//! ([`Source`]). A re-embedding's cases first index the deferred insert (a
//! re-embedding's switch waits for deferred entries of the old model) and
//! also check that every row's kept vector is the new model's — unless the
//! row was written after the switch — and what its point in `next` holds.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use tandem_core::PlantedBug;
use tandem_core::testkit::embed::{TextVectorEmbedder, text_vector};
use tandem_core::testkit::faults::{Call, Fault, Rule, run_until_crash};
use tandem_core::{
    CoordinatorConfig, DeleteSelector, Distance, IndexCatalog, MetadataRepo, NewRecord, RecordId,
    ReindexOptions, StoredRecord, VectorIndex, WriteOptions,
};

use crate::harness::{
    CaseResult, ExhaustiveSummary, MAIN, Ran, Scenario, World, rid, single_faults, vector_for,
};
use crate::invariants;

/// The target collection of the cases.
pub const NEXT: &str = "next";

/// Where a case's re-index takes its vectors from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The vectors the metadata store keeps (a rebuild).
    KeptVectors,
    /// A re-embedding of every row's content with [`TextVectorEmbedder`] (a
    /// new model, in the collection's dimension so that the other process's
    /// writes stay valid).
    ReEmbed,
}

/// The re-index of every case: to [`NEXT`], from `source`, dropping the old
/// collection after the switch.
fn options(source: Source, dimension: usize) -> ReindexOptions {
    ReindexOptions {
        drop_old: true,
        embedder: (source == Source::ReEmbed).then(|| {
            Arc::new(TextVectorEmbedder::new(dimension)) as Arc<dyn tandem_core::Embedder>
        }),
        ..ReindexOptions::to(NEXT)
    }
}

/// The records the other process writes (their vectors are its own model's).
fn written_by_other() -> [RecordId; 3] {
    [rid(1), rid(2), rid(0x4002)]
}

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
        NewRecord::new("a", "updated during the re-index (1)", vector_for(1, 5)).with_id(rid(1)),
        NewRecord::new("a", "updated during the re-index (2)", vector_for(2, 5)).with_id(rid(2)),
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
    source: Source,
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
        if source == Source::ReEmbed {
            crate::harness::drain(&world, &world.clean())
                .await
                .expect("the deferred insert is indexed");
        }
    }
    let dimension = world.index.dimension();
    let rule_desc = rule.as_ref().map(|r| (r.call, r.nth, r.fault.clone()));
    if let Some(rule) = rule {
        world.ctl.add(rule);
    }
    let log_start = world.ctl.log().len();
    let faulty = world.faulty();
    let outcome = run_until_crash(
        &world.ctl,
        faulty.reindex(&options(source, dimension), &|_| {}),
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
    let violation = check_reindex_case(&world, deferred, matches!(outcome, Some(Ok(_))), source)
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
    source: Source,
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
    let switched_first = repo
        .index_state()
        .await
        .map_err(|e| e.to_string())?
        .active
        .as_deref()
        == Some(NEXT);
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
            .reindex(&options(source, world.index.dimension()), &|_| {})
            .await
            .map_err(|e| format!("the resumed re-index failed: {e}"))?;
    }
    // A run that switched but died before (or while) dropping the old
    // collection left it retired: the operator's `drop_retired` finishes.
    if repo
        .index_state()
        .await
        .map_err(|e| e.to_string())?
        .retired
        .is_some()
    {
        restarted
            .drop_retired()
            .await
            .map_err(|e| format!("drop_retired failed: {e}"))?;
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
    if state.active.as_deref() != Some(NEXT) || state.migration.is_some() || state.retired.is_some()
    {
        return Err(format!("after the resumed re-index the state is {state:?}"));
    }
    if catalog.open(MAIN).await.is_ok() {
        return Err("the old collection was not dropped".into());
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
    if source == Source::ReEmbed {
        new_model_kept(repo, next.dimension(), switched_first).await?;
    }
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

/// After a re-embedding: every kept vector is the new model's, but for the
/// other process's writes if they came after the switch (written with their
/// own vectors, as a writer of the new model would).
async fn new_model_kept<M: MetadataRepo>(
    repo: &M,
    dimension: usize,
    switched_first: bool,
) -> Result<(), String> {
    for r in invariants::rows(repo).await?.values() {
        let Some(kept) = &r.vector else { continue };
        if switched_first && written_by_other().contains(&r.id) {
            continue;
        }
        if *kept != text_vector(&r.content, dimension) {
            return Err(format!(
                "record {} keeps a vector of the old model after the re-embedding's switch",
                r.id
            ));
        }
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

/// [`exhaustive_reindex`] of a re-embedding ([`Source::ReEmbed`]).
pub async fn exhaustive_reembed<M, V, F, Fut>(
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
    exhaustive_reindex_from(make, new_collection, config, None, Source::ReEmbed).await
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
    exhaustive_reindex_from(
        make,
        new_collection,
        config,
        bug.into(),
        Source::KeptVectors,
    )
    .await
}

async fn exhaustive_reindex_from<M, V, F, Fut>(
    make: F,
    new_collection: fn(usize, Distance) -> V,
    config: CoordinatorConfig,
    bug: Option<PlantedBug>,
    source: Source,
) -> ExhaustiveSummary
where
    M: MetadataRepo + 'static,
    V: VectorIndex + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = (M, V)>,
{
    let mut summary = ExhaustiveSummary::default();
    let (base, calls) = run_reindex_case(&make, new_collection, &config, None, bug, source).await;
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
                run_reindex_case(&make, new_collection, &config, Some(rule), bug, source)
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
                run_reindex_case(&make, new_collection, &config, Some(rule), bug, source)
                    .await
                    .0,
            );
        }
    }
    summary
}
