//! The core fault suites with `QdrantVectorIndex` over gRPC, through the
//! Qdrant test server (`QdrantDouble`), and the in-memory metadata repo — with
//! the faults injected **in the server**, at the network level:
//!
//! * every harness scenario × every index RPC its call makes (from a fault-free
//!   run's call log) × every network fault the double supports (see
//!   `tandem_tests::network::network_faults`), each followed by the harness's
//!   checks of I1–I7 and a recovery;
//! * random histories (the property suite's engine) on the same pair; the
//!   histories' own port-level faults apply on top of the network.
//!
//! Real time and real sockets (tokio's paused clock cannot drive a socket), so
//! the client's request timeout (400 ms) and the call deadline (1.5 s) are short
//! and hangs stay quick. `PROPTEST_CASES_NETWORK` sets the number of histories
//! (default 64).

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::future::join_all;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tandem_adapters::memory::InMemoryMetadataRepo;
use tandem_adapters::qdrant::QdrantVectorIndex;
use tandem_core::PlantedBug;
use tandem_tests::harness::{Scenario, fault_config};
use tandem_tests::network::{
    NetCase, NetFault, NetworkSummary, connect_index, network_exhaustive, network_faults,
    outcome_kind,
};
use tandem_tests::property::{real_time_step, run_history};
use tandem_tests::qdrant_double::QdrantDouble;

/// The client's request timeout: well below the call deadline, so that a
/// hanging server costs the coordinator a retry, not the whole call.
const CLIENT_TIMEOUT: Duration = Duration::from_millis(400);

/// The coordinator's call (and cleanup) deadline.
const DEADLINE: Duration = Duration::from_millis(1500);

/// Every single network fault of `scenarios`, on a double of its own (the
/// double's fault plan is server-wide, so runs in parallel must not share one).
async fn every_network_fault(scenarios: &[Scenario]) -> NetworkSummary {
    let double = QdrantDouble::start().await;
    let summary = network_exhaustive(
        &double,
        || async { InMemoryMetadataRepo::new() },
        fault_config(DEADLINE),
        CLIENT_TIMEOUT,
        scenarios,
        &network_faults(CLIENT_TIMEOUT),
        None,
    )
    .await;
    double.shutdown().await;
    summary
}

/// What the protocol promises for a case beyond the invariants, if anything:
/// an index write that can never complete within the call makes it
/// `not_applied`; a fault on a `Delete` (cleanup after the decision, or
/// recovery's garbage collection) never fails the call.
fn promised(case: &NetCase) -> Option<&'static str> {
    let (method, _) = case.rpc?;
    let never_completes =
        case.fault.ends_with("_from_here") || case.fault == "resource_exhausted_long";
    match method {
        "Points/Upsert" if never_completes => Some("not_applied"),
        "Points/Delete" => Some("ok"),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_network_fault_keeps_every_invariant() {
    let faults = network_faults(CLIENT_TIMEOUT);
    // Five groups at once, each on its own double: most of a case's time is
    // spent waiting (timeouts, retry-after, the disk), not computing.
    let groups: Vec<Vec<Scenario>> = vec![
        vec![Scenario::Insert],
        vec![Scenario::Update],
        vec![Scenario::Mixed],
        vec![Scenario::DeleteIds, Scenario::DeleteScope],
        vec![Scenario::DeleteMetadata, Scenario::Recovery],
    ];
    let summaries = join_all(groups.iter().map(|g| every_network_fault(g))).await;

    let mut total = 0;
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut per_fault: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    let mut rpcs_per_fault: BTreeMap<String, usize> = BTreeMap::new();
    let mut broken = Vec::new();
    for (group, summary) in groups.iter().zip(&summaries) {
        println!(
            "network faults (Qdrant double) {group:?}: {} cases in {:.1} s, outcomes {:?}, RPCs {:?}",
            summary.cases,
            summary.elapsed.as_secs_f64(),
            summary.outcomes,
            summary.rpcs
        );
        total += summary.cases;
        for (k, n) in &summary.outcomes {
            *outcomes.entry(k.clone()).or_default() += n;
        }
        for (fault, n) in &summary.rpcs_per_fault {
            *rpcs_per_fault.entry(fault.clone()).or_default() += n;
        }
        for (fault, kinds) in &summary.per_fault {
            for (k, n) in kinds {
                *per_fault
                    .entry(fault.clone())
                    .or_default()
                    .entry(k.clone())
                    .or_default() += n;
            }
        }
        for (what, f) in &summary.failures {
            println!("FAILED: {what}: {:?} — {:?}", f.ran, f.violation);
            broken.push(format!(
                "{what}: {}",
                f.violation.clone().unwrap_or_default()
            ));
        }
        for case in &summary.runs {
            if let Some(want) = promised(case) {
                let got = outcome_kind(&case.ran);
                if got != want {
                    broken.push(format!(
                        "{:?} {:?} {}: ended {got} ({:?}), expected {want}",
                        case.scenario, case.rpc, case.fault, case.ran
                    ));
                }
            }
        }
        assert!(
            summary.unfired.is_empty(),
            "faults that never hit the call they were aimed at: {:?}",
            summary.unfired
        );
        for scenario in group {
            let rpcs = &summary.rpcs[&format!("{scenario:?}")];
            assert!(!rpcs.is_empty(), "{scenario:?} made no index RPC");
            assert_eq!(
                summary.per_scenario[&format!("{scenario:?}")],
                1 + rpcs.len() * faults.len(),
                "{scenario:?} ran a case per RPC and fault"
            );
        }
    }
    println!("network faults (Qdrant double): {total} cases, outcomes {outcomes:?}");
    for (fault, kinds) in &per_fault {
        let rpcs = rpcs_per_fault.get(fault).copied().unwrap_or(0);
        println!("  {fault:28} {kinds:?}, {rpcs} RPCs in the faulty calls");
    }
    assert!(
        broken.is_empty(),
        "{} network fault cases broke a promise: {broken:#?}",
        broken.len()
    );
    // Faults the index write cannot get past really ended calls NotApplied.
    assert!(outcomes.get("not_applied").copied().unwrap_or(0) > 0);
}

/// Runs `scenario` under `faults` with `bug` planted; returns the cases that
/// caught it, after checking that the fault-free run alone does not.
async fn caught_by_network_faults(
    bug: PlantedBug,
    scenario: Scenario,
    fault_names: &[&str],
) -> Vec<String> {
    let faults: Vec<NetFault> = network_faults(CLIENT_TIMEOUT)
        .into_iter()
        .filter(|f| fault_names.contains(&f.name))
        .collect();
    assert_eq!(faults.len(), fault_names.len(), "unknown fault names");
    let double = QdrantDouble::start().await;
    let summary = network_exhaustive(
        &double,
        || async { InMemoryMetadataRepo::new() },
        fault_config(DEADLINE),
        CLIENT_TIMEOUT,
        &[scenario],
        &faults,
        Some(bug),
    )
    .await;
    double.shutdown().await;
    let caught: Vec<String> = summary
        .failures
        .iter()
        .map(|(what, f)| format!("{what}: {}", f.violation.clone().unwrap_or_default()))
        .collect();
    println!(
        "planted {bug:?}: caught by {} of {} network fault cases: {caught:#?}",
        caught.len(),
        summary.cases
    );
    assert!(
        caught.iter().all(|c| !c.contains("fault-free")),
        "the fault-free run already shows {bug:?}: {caught:?}"
    );
    caught
}

/// The network matrix can fail: a protocol bug that only a failing index
/// request exposes — resolving the intent before the superseded points are
/// deleted — is caught by server-side faults alone (the fault-free run does
/// not see it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_bug_is_caught_by_network_faults_alone() {
    let bug = PlantedBug::ResolveBeforeCleanup;
    let caught = caught_by_network_faults(
        bug,
        Scenario::Update,
        &["unavailable_from_here", "drop_after_apply_from_here"],
    )
    .await;
    assert!(!caught.is_empty(), "no network fault case caught {bug:?}");
}

/// The rule before late-landing writes were handled — resolve a rolled-back
/// intent unless the deadline cut a request — is caught by a proxy that
/// answers Unavailable and still delivers every request 300 ms later: the
/// points land after the compensation deleted them, and nothing names them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_rollback_rule_is_caught_by_requests_that_land_after_the_error() {
    let bug = PlantedBug::ResolveAfterUncertainWrite;
    let caught = caught_by_network_faults(
        bug,
        Scenario::Insert,
        &["unavailable_then_applied_from_here"],
    )
    .await;
    assert!(!caught.is_empty(), "no late-landing case caught {bug:?}");
    assert!(
        caught.iter().any(|c| c.contains("I2")),
        "the late landing should leave points nothing names: {caught:?}"
    );
}

fn property_cases() -> u32 {
    std::env::var("PROPTEST_CASES_NETWORK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

#[test]
fn random_histories_over_the_network_keep_every_invariant() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let double = rt.block_on(QdrantDouble::start());
    let url = double.url();
    let started = Instant::now();
    let mut runner = TestRunner::new(Config {
        cases: property_cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&prop::collection::vec(real_time_step(), 1..10), |steps| {
        let made: Mutex<Option<QdrantVectorIndex>> = Mutex::new(None);
        let (url, made_ref) = (&url, &made);
        let outcome = rt.block_on(run_history(
            move || async move {
                let index = connect_index(url, CLIENT_TIMEOUT).await;
                *made_ref.lock().unwrap_or_else(PoisonError::into_inner) = Some(index.clone());
                (InMemoryMetadataRepo::new(), index)
            },
            fault_config(DEADLINE),
            steps,
            None,
        ));
        if let Some(index) = made.into_inner().unwrap_or_else(PoisonError::into_inner) {
            // Keeps the double small; a failure only leaves a collection behind.
            let _ = rt.block_on(index.delete_collection());
        }
        prop_assert!(outcome.is_ok(), "{}", outcome.unwrap_err());
        Ok(())
    });
    println!(
        "random histories over the network: {} cases in {:.1} s",
        property_cases(),
        started.elapsed().as_secs_f64()
    );
    rt.block_on(double.shutdown());
    if let Err(e) = result {
        panic!("{e}");
    }
}
