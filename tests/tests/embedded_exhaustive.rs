//! The exhaustive single-fault suite on the embedded default pair —
//! `SqliteMetadataRepo` + `EdgeVectorIndex` (qdrant-edge), both on disk in a
//! fresh directory per case — plus a live call racing recovery.

use std::sync::Mutex;
use std::time::Duration;

use tandem_adapters::edge::EdgeVectorIndex;
use tandem_adapters::sqlite::{SqliteConfig, SqliteMetadataRepo};
use tandem_core::Distance;
use tandem_tests::harness::{DIM, Scenario, exhaustive, fault_config, recovery_races_a_live_call};

async fn open(dirs: &Mutex<Vec<tempfile::TempDir>>) -> (SqliteMetadataRepo, EdgeVectorIndex) {
    // On tmpfs where there is one: the suite checks the protocol, not the
    // disk, and fsync on tmpfs is free (qdrant-edge flushes on every write).
    let dir = match std::path::Path::new("/dev/shm").is_dir() {
        true => tempfile::tempdir_in("/dev/shm"),
        false => tempfile::tempdir(),
    }
    .expect("temporary directory");
    let repo = SqliteMetadataRepo::open(SqliteConfig::new(dir.path().join("tandem.db")))
        .await
        .expect("open SQLite");
    let index = EdgeVectorIndex::open(dir.path().join("vectors"), DIM, Distance::Cosine)
        .await
        .expect("open qdrant-edge");
    // Kept until the test ends.
    dirs.lock().unwrap_or_else(|e| e.into_inner()).push(dir);
    (repo, index)
}

#[tokio::test(start_paused = true)]
async fn every_single_fault_keeps_every_invariant_on_the_embedded_pair() {
    let dirs = Mutex::new(Vec::new());
    let d = &dirs;
    let started = std::time::Instant::now();
    // Every scenario, and deferred indexing's: SQLite implements it.
    let scenarios: Vec<Scenario> = Scenario::ALL
        .into_iter()
        .chain(Scenario::DEFERRED)
        .collect();
    let summary = exhaustive(
        move || async move { open(d).await },
        fault_config(Duration::from_secs(5)),
        &scenarios,
        None,
    )
    .await;
    println!("SQLite + qdrant-edge: ran in {:?}", started.elapsed());
    summary.assert_no_failures("SQLite + qdrant-edge");
    assert!(summary.cases >= 300, "only {} cases ran", summary.cases);
}

#[tokio::test(start_paused = true)]
async fn recovery_leaves_a_live_call_alone_on_the_embedded_pair() {
    let dirs = Mutex::new(Vec::new());
    let (repo, index) = open(&dirs).await;
    recovery_races_a_live_call(repo, index, fault_config(Duration::from_secs(5)), None)
        .await
        .unwrap();
}
