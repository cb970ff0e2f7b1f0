//! The core fault suites with `PostgresMetadataRepo` (behind the fault layer)
//! and the in-memory index: every single fault exhaustively, a live call racing
//! recovery, and random histories (proptest) — the same invariants as on the
//! in-memory stores, now with real transactions.
//!
//! Real time (PostgreSQL cannot run on tokio's paused clock), so the call
//! deadline is short (300 ms) to keep the `Hang` cases quick; each case reuses
//! one schema, emptied in between. The property suite runs 64 random histories
//! by default (`TANDEM_PG_PROPTEST_CASES` changes it).

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tandem_adapters::memory::InMemoryVectorIndex;
use tandem_core::Distance;
use tandem_tests::harness::{DIM, Scenario, exhaustive, fault_config, recovery_races_a_live_call};
use tandem_tests::pg::TestSchema;
use tandem_tests::property::{run_history, step};

const DEADLINE: Duration = Duration::from_millis(300);

/// Every single fault of one scenario, on a schema of its own (the scenarios
/// run as separate tests, in parallel).
async fn every_single_fault(scenario: Scenario) {
    let schema = TestSchema::new().await;
    let repo = Arc::new(schema.repo().await);
    let admin = schema.admin().await;
    let (s, a, r) = (&schema, &admin, &repo);
    let summary = exhaustive(
        move || async move {
            s.truncate(a).await;
            (r.clone(), InMemoryVectorIndex::new(DIM, Distance::Cosine))
        },
        fault_config(DEADLINE),
        &[scenario],
        None,
    )
    .await;
    println!(
        "exhaustive single faults (PostgreSQL) {scenario:?}: {} cases, outcomes {:?}",
        summary.cases, summary.outcomes
    );
    for f in &summary.failures {
        println!("FAILED: {f:?}");
    }
    assert!(
        summary.failures.is_empty(),
        "{} cases broke an invariant",
        summary.failures.len()
    );
    // Several port calls, each tried with every fault.
    assert!(summary.cases > 3 * 9, "{scenario:?} ran too few cases");
    for kind in ["ok", "crashed"] {
        assert!(
            summary.outcomes.get(kind).copied().unwrap_or(0) > 0,
            "no {scenario:?} case ended {kind}"
        );
    }
}

macro_rules! every_single_fault {
    ($($name:ident => $scenario:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                every_single_fault(Scenario::$scenario).await;
            }
        )*
    };
}

every_single_fault! {
    every_single_fault_of_an_insert => Insert,
    every_single_fault_of_an_update => Update,
    every_single_fault_of_a_mixed_upsert => Mixed,
    every_single_fault_of_a_delete_by_ids => DeleteIds,
    every_single_fault_of_a_delete_by_scope => DeleteScope,
    every_single_fault_of_a_delete_by_metadata => DeleteMetadata,
    every_single_fault_of_a_recovery => Recovery,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_leaves_a_live_call_alone_on_postgres() {
    let schema = TestSchema::new().await;
    recovery_races_a_live_call(
        schema.repo().await,
        InMemoryVectorIndex::new(DIM, Distance::Cosine),
        fault_config(Duration::from_secs(5)),
        None,
    )
    .await
    .unwrap();
}

fn cases() -> u32 {
    std::env::var("TANDEM_PG_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

#[test]
fn random_histories_keep_every_invariant_on_postgres() {
    // One runtime for every case: the pool's connections live on it.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let schema = rt.block_on(TestSchema::new());
    let repo = Arc::new(rt.block_on(schema.repo()));
    let admin = rt.block_on(schema.admin());
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let (s, a, r) = (&schema, &admin, &repo);
    let outcome = runner.run(&prop::collection::vec(step(), 1..10), |steps| {
        let result = rt.block_on(run_history(
            move || async move {
                s.truncate(a).await;
                (r.clone(), InMemoryVectorIndex::new(DIM, Distance::Cosine))
            },
            fault_config(DEADLINE),
            steps,
            None,
        ));
        prop_assert!(result.is_ok(), "{}", result.unwrap_err());
        Ok(())
    });
    println!("random histories (PostgreSQL): {} cases", cases());
    if let Err(e) = outcome {
        panic!("{e}");
    }
}
