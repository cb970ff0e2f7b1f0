//! The Qdrant collection settings through the `tandem` binary: flags, their
//! environment variables and the `[qdrant]` section of `tandem.toml` reach the
//! collection Tandem creates (with precedence flag > environment > file), and a
//! conflicting setting against the existing collection exits 2 naming it. The
//! Qdrant-compatible test server runs in this process.
//!
//! What Qdrant itself reports for each setting is tested in
//! `tests/tests/qdrant_collection_settings.rs` (against a real Qdrant when
//! `QDRANT_URL` is set); this file tests the wiring only.

use std::path::Path;
use std::process::{Command, Output};

/// Every variable that could leak configuration into the child.
const ENV: [&str; 15] = [
    "DATABASE_URL",
    "QDRANT_URL",
    "QDRANT_API_KEY",
    "TANDEM_CONFIG",
    "TANDEM_DATA_DIR",
    "RUST_LOG",
    "TANDEM_QDRANT_SHARD_NUMBER",
    "TANDEM_QDRANT_REPLICATION_FACTOR",
    "TANDEM_QDRANT_WRITE_CONSISTENCY_FACTOR",
    "TANDEM_QDRANT_ON_DISK",
    "TANDEM_QDRANT_ON_DISK_PAYLOAD",
    "TANDEM_QDRANT_HNSW_M",
    "TANDEM_QDRANT_HNSW_EF_CONSTRUCT",
    "TANDEM_QDRANT_QUANTIZATION",
    "TANDEM_QDRANT_PAYLOAD_INDEXES",
];

fn tandem(cwd: &Path, url: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tandem"));
    for var in ENV {
        c.env_remove(var);
    }
    c.envs(env.iter().copied());
    c.current_dir(cwd)
        .args([
            "--qdrant-url",
            url,
            "--collection",
            "settings",
            "--dim",
            "4",
        ])
        .args(args);
    c.output().expect("tandem runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_reach_the_collection_and_a_conflict_exits_2() {
    let double = tandem_tests::qdrant_double::QdrantDouble::start().await;
    let url = double.url();
    let dir = tempfile::tempdir().expect("a temporary directory");
    std::fs::write(
        dir.path().join("tandem.toml"),
        "[qdrant]\nshard_number = 5\nreplication_factor = 2\n\
         quantization = { scalar = { quantile = 0.99 } }\n\
         payload_indexes = { item = \"keyword\" }\n",
    )
    .expect("write tandem.toml");
    let cwd = dir.path().to_path_buf();
    let run = move |args: Vec<&'static str>, env: Vec<(&'static str, &'static str)>| {
        let (cwd, url) = (cwd.clone(), url.clone());
        tokio::task::spawn_blocking(move || tandem(&cwd, &url, &args, &env))
    };

    // Created with: shard_number 3 (the flag, over the environment's 4 and
    // the file's 5), replication_factor 2 and scalar quantization (the file).
    let out = run(
        vec!["--qdrant-shard-number", "3", "migrate"],
        vec![("TANDEM_QDRANT_SHARD_NUMBER", "4")],
    )
    .await
    .expect("join");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(double.faults().calls_to("Collections/Create").len(), 1);
    // record_id, scope and metadata.item.
    assert_eq!(double.faults().calls_to("Points/CreateFieldIndex").len(), 3);

    // The same settings connect; the environment lies over the file.
    let out = run(vec!["stats"], vec![("TANDEM_QDRANT_SHARD_NUMBER", "3")])
        .await
        .expect("join");
    assert!(out.status.success(), "{}", stderr(&out));

    // The file's 5 against the collection's 3: a usage error naming it.
    let out = run(vec!["stats"], vec![]).await.expect("join");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("`shard_number`: expected 5, found 3"), "{err}");

    // What the file gave at creation reached the collection.
    let out = run(
        vec![
            "--qdrant-shard-number",
            "3",
            "--qdrant-replication-factor",
            "1",
            "--qdrant-quantization",
            "binary",
            "stats",
        ],
        vec![],
    )
    .await
    .expect("join");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("`replication_factor`: expected 1, found 2"),
        "{err}"
    );
    assert!(
        err.contains("`quantization`: expected binary, found scalar:quantile=0.99"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");

    // A harmless difference connects.
    let out = run(
        vec![
            "--qdrant-shard-number",
            "3",
            "--qdrant-hnsw-m",
            "64",
            "stats",
        ],
        vec![],
    )
    .await
    .expect("join");
    assert!(out.status.success(), "{}", stderr(&out));

    // An invalid value is refused before anything is sent.
    let calls = double.faults().calls().len();
    let out = run(
        vec![
            "--qdrant-shard-number",
            "3",
            "--qdrant-hnsw-ef-construct",
            "2",
            "stats",
        ],
        vec![],
    )
    .await
    .expect("join");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("`hnsw_ef_construct`"),
        "{}",
        stderr(&out)
    );
    assert_eq!(double.faults().calls().len(), calls, "nothing sent");
    assert_eq!(double.faults().calls_to("Collections/Create").len(), 1);
}
