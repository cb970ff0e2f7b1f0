//! Each deliberate protocol bug (tandem-core feature `planted-bugs`) must be
//! caught: by the exhaustive fault suite (or the recovery race, or the late
//! write that lands after a supersede), and by the
//! property suite. Suites that cannot see these would prove nothing.

use std::time::Duration;

use proptest::test_runner::{Config, TestRunner};
use tandem_adapters::memory::{InMemoryMetadataRepo, InMemoryVectorIndex};
use tandem_core::{Distance, PlantedBug};
use tandem_tests::harness::{
    DIM, Scenario, exhaustive, fault_config, index_outage_keeps_the_backlog,
    late_write_lands_after_a_supersede, recovery_races_a_live_call, saga_races_recovery,
    slow_action_keeps_its_lease,
};
use tandem_tests::property::{property_config, run_history_with, step};
use tandem_tests::reindex::exhaustive_reindex_with_bug;

fn stores() -> (InMemoryMetadataRepo, InMemoryVectorIndex) {
    (
        InMemoryMetadataRepo::new(),
        InMemoryVectorIndex::new(DIM, Distance::Cosine),
    )
}

async fn caught_by_fault_suites(bug: PlantedBug) -> Vec<String> {
    let config = fault_config(Duration::from_secs(5));
    let mut found: Vec<String> = exhaustive(
        || async { stores() },
        config.clone(),
        &[
            Scenario::Insert,
            Scenario::Update,
            Scenario::DeleteIds,
            Scenario::Recovery,
            Scenario::SagaCompensates,
            Scenario::DeferredDelete,
            Scenario::IndexWorker,
        ],
        Some(bug),
    )
    .await
    .failures
    .into_iter()
    .filter_map(|f| {
        f.violation
            .map(|v| format!("{:?} {:?}: {v}", f.scenario, f.rule))
    })
    .collect();
    let (repo, index) = stores();
    if let Err(e) = recovery_races_a_live_call(repo, index, config.clone(), Some(bug)).await {
        found.push(format!("recovery race: {e}"));
    }
    let (repo, index) = stores();
    if let Err(e) = late_write_lands_after_a_supersede(repo, index, config.clone(), Some(bug)).await
    {
        found.push(format!("late write after a supersede: {e}"));
    }
    let (repo, index) = stores();
    if let Err(e) = saga_races_recovery(repo, index, config.clone(), Some(bug)).await {
        found.push(format!("saga racing recovery: {e}"));
    }
    let (repo, index) = stores();
    if let Err(e) = slow_action_keeps_its_lease(repo, index, config.clone(), Some(bug)).await {
        found.push(format!("slow saga action: {e}"));
    }
    let (repo, index) = stores();
    if let Err(e) = index_outage_keeps_the_backlog(repo, index, config.clone(), Some(bug)).await {
        found.push(format!("index outage: {e}"));
    }
    found.extend(
        exhaustive_reindex_with_bug(|| async { stores() }, InMemoryVectorIndex::new, config, bug)
            .await
            .failures
            .into_iter()
            .filter_map(|f| f.violation.map(|v| format!("Reindex {:?}: {v}", f.rule))),
    );
    found
}

/// Runs random histories with the bug planted; returns the minimal failing
/// history's error, if any was found.
fn caught_by_property_suite(bug: PlantedBug) -> Option<String> {
    let mut runner = TestRunner::new(Config {
        cases: 1024,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = proptest::collection::vec(step(), 1..10);
    runner
        .run(&strategy, |steps| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .expect("runtime");
            rt.block_on(run_history_with(
                || async { stores() },
                Some(InMemoryVectorIndex::new),
                property_config(),
                steps,
                Some(bug),
            ))
            .map_err(proptest::test_runner::TestCaseError::fail)
        })
        .err()
        .map(|e| e.to_string())
}

#[tokio::test(start_paused = true)]
async fn every_planted_bug_is_caught_by_the_fault_suites() {
    for bug in PlantedBug::ALL {
        let found = caught_by_fault_suites(bug).await;
        println!(
            "{bug:?}: caught by {} fault cases; first: {:?}",
            found.len(),
            found.first()
        );
        assert!(
            !found.is_empty(),
            "planted bug {bug:?} was not caught by the fault suites"
        );
    }
}

#[test]
fn every_planted_bug_is_caught_by_the_property_suite() {
    for bug in PlantedBug::ALL {
        let found = caught_by_property_suite(bug);
        println!("{bug:?}: property suite found {found:?}");
        assert!(
            found.is_some(),
            "planted bug {bug:?} was not caught by the property suite"
        );
    }
}
