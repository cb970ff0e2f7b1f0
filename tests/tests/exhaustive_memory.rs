//! Exhaustive single faults on the in-memory backends: every operation × every
//! port call it makes × every fault, each followed by recovery and the checks
//! of I1–I7 (see `tandem_tests::harness`).

use std::time::Duration;

use tandem_adapters::memory::{InMemoryMetadataRepo, InMemoryVectorIndex};
use tandem_core::Distance;
use tandem_tests::harness::{
    DIM, Scenario, exhaustive_with, fault_config, index_outage_keeps_the_backlog,
    late_write_lands_after_a_supersede, memory_caller_step, poison_is_dead_lettered,
    recovery_races_a_live_call, saga_races_recovery, slow_action_keeps_its_lease,
};

/// Every scenario of `scenarios` × every port call it makes × every fault,
/// on fresh in-memory stores; no case may break an invariant.
async fn every_single_fault_of(scenarios: &[Scenario], what: &str) {
    let summary = exhaustive_with(
        || async {
            (
                InMemoryMetadataRepo::new(),
                InMemoryVectorIndex::new(DIM, Distance::Cosine),
            )
        },
        fault_config(Duration::from_secs(5)),
        scenarios,
        None,
        Some(memory_caller_step()),
    )
    .await;
    summary.assert_no_failures(&format!("in-memory{what}"));
    for scenario in scenarios {
        assert!(
            summary.per_scenario[&format!("{scenario:?}")] > scenario.least_cases(),
            "{scenario:?} ran too few cases"
        );
    }
    // The matrix really exercised every kind of ending.
    for kind in ["ok", "not_applied", "crashed"] {
        assert!(
            summary.outcomes.get(kind).copied().unwrap_or(0) > 0,
            "no case ended {kind}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn every_single_fault_keeps_every_invariant() {
    every_single_fault_of(&Scenario::ALL, "").await;
}

/// Deferred indexing: the deferred upsert and delete, and an index worker's
/// pass over a backlog — every port call × every fault × crash, then a
/// restarted process's workers run to completion and every invariant holds,
/// plus ordering (each record indexed at its last committed version).
#[tokio::test(start_paused = true)]
async fn every_single_fault_of_deferred_indexing_keeps_every_invariant() {
    every_single_fault_of(&Scenario::DEFERRED, ", deferred indexing").await;
}

#[tokio::test(start_paused = true)]
async fn recovery_leaves_a_live_call_alone() {
    recovery_races_a_live_call(
        InMemoryMetadataRepo::new(),
        InMemoryVectorIndex::new(DIM, Distance::Cosine),
        fault_config(Duration::from_secs(5)),
        None,
    )
    .await
    .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_late_landing_write_after_a_supersede_leaves_no_orphan() {
    late_write_lands_after_a_supersede(
        InMemoryMetadataRepo::new(),
        InMemoryVectorIndex::new(DIM, Distance::Cosine),
        fault_config(Duration::from_secs(5)),
        None,
    )
    .await
    .unwrap();
}

#[tokio::test(start_paused = true)]
async fn recovery_leaves_a_live_saga_alone() {
    saga_races_recovery(
        InMemoryMetadataRepo::new(),
        InMemoryVectorIndex::new(DIM, Distance::Cosine),
        fault_config(Duration::from_secs(5)),
        None,
    )
    .await
    .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_slow_action_keeps_its_sagas_lease() {
    slow_action_keeps_its_lease(
        InMemoryMetadataRepo::new(),
        InMemoryVectorIndex::new(DIM, Distance::Cosine),
        fault_config(Duration::from_secs(5)),
        None,
    )
    .await
    .unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_index_outage_delays_the_backlog_without_dead_lettering_it() {
    index_outage_keeps_the_backlog(
        InMemoryMetadataRepo::new(),
        InMemoryVectorIndex::new(DIM, Distance::Cosine),
        fault_config(Duration::from_secs(5)),
        None,
    )
    .await
    .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_point_the_index_rejects_is_dead_lettered_alone() {
    poison_is_dead_lettered(
        InMemoryMetadataRepo::new(),
        InMemoryVectorIndex::new(DIM, Distance::Cosine),
        fault_config(Duration::from_secs(5)),
    )
    .await
    .unwrap();
}

/// Re-indexing: every port call of a re-index (the metadata store's and
/// both collections') × every fault × crash, with another process writing
/// during the migration, then a restarted process resumes it; the new
/// collection ends active and exact, the records untouched.
#[tokio::test(start_paused = true)]
async fn every_single_fault_of_a_reindex_keeps_every_invariant() {
    let summary = tandem_tests::reindex::exhaustive_reindex(
        || async {
            (
                InMemoryMetadataRepo::new(),
                InMemoryVectorIndex::new(DIM, Distance::Cosine),
            )
        },
        InMemoryVectorIndex::new,
        fault_config(Duration::from_secs(5)),
    )
    .await;
    check_reindex_summary(&summary, "re-index (in-memory)");
}

/// Re-embedding: the same cases with a new model's vectors. Also checked:
/// after the switch every record keeps the new model's vector (so that a
/// later repair or rebuild uses it), and its point in the new collection
/// holds it.
#[tokio::test(start_paused = true)]
async fn every_single_fault_of_a_re_embedding_keeps_every_invariant() {
    let summary = tandem_tests::reindex::exhaustive_reembed(
        || async {
            (
                InMemoryMetadataRepo::new(),
                InMemoryVectorIndex::new(DIM, Distance::Cosine),
            )
        },
        InMemoryVectorIndex::new,
        fault_config(Duration::from_secs(5)),
    )
    .await;
    check_reindex_summary(&summary, "re-embedding (in-memory)");
}

/// A re-index suite's summary: no invariant broken, enough cases, and every
/// way a case can end seen.
fn check_reindex_summary(summary: &tandem_tests::harness::ExhaustiveSummary, label: &str) {
    summary.assert_no_failures(label);
    assert!(summary.cases > 20 * 11, "too few cases: {}", summary.cases);
    for kind in ["ok", "not_applied", "crashed"] {
        assert!(
            summary.outcomes.get(kind).copied().unwrap_or(0) > 0,
            "no case ended {kind}"
        );
    }
}
