//! The core fault suites with `SqliteMetadataRepo` (behind the fault layer)
//! and the in-memory index: every single fault exhaustively, and a live call
//! racing recovery. Each case gets a fresh database file. Paused tokio time
//! works here: time does not auto-advance while SQLite's blocking tasks run.

use std::sync::Mutex;
use std::time::Duration;

use tandem_adapters::memory::InMemoryVectorIndex;
use tandem_adapters::sqlite::{SqliteConfig, SqliteMetadataRepo};
use tandem_core::Distance;
use tandem_tests::harness::{DIM, Scenario, exhaustive, fault_config, recovery_races_a_live_call};

async fn open(dirs: &Mutex<Vec<tempfile::TempDir>>) -> SqliteMetadataRepo {
    let dir = tempfile::tempdir().expect("temporary directory");
    let repo = SqliteMetadataRepo::open(SqliteConfig::new(dir.path().join("tandem.db")))
        .await
        .expect("open SQLite");
    // Kept until the test ends.
    dirs.lock().unwrap().push(dir);
    repo
}

/// Every single fault of one scenario (the scenarios run as separate tests,
/// in parallel).
async fn every_single_fault(scenario: Scenario) {
    let dirs = Mutex::new(Vec::new());
    let d = &dirs;
    let summary = exhaustive(
        move || async move {
            (
                open(d).await,
                InMemoryVectorIndex::new(DIM, Distance::Cosine),
            )
        },
        fault_config(Duration::from_secs(5)),
        &[scenario],
        None,
    )
    .await;
    println!(
        "exhaustive single faults (SQLite) {scenario:?}: {} cases, outcomes {:?}",
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
            #[tokio::test(start_paused = true)]
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

#[tokio::test(start_paused = true)]
async fn recovery_leaves_a_live_call_alone_on_sqlite() {
    let dirs = Mutex::new(Vec::new());
    recovery_races_a_live_call(
        open(&dirs).await,
        InMemoryVectorIndex::new(DIM, Distance::Cosine),
        fault_config(Duration::from_secs(5)),
        None,
    )
    .await
    .unwrap();
}
