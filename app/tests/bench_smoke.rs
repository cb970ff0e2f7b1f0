//! A tiny run of `tandem bench` with every protocol and case: it must run and
//! its JSON report (stdout and `--out`) must be well formed. No timing is
//! asserted, only what the protocols are: Tandem's round trips per batch are
//! constant, the naive protocol's grow with the batch; a rebuild copies every
//! record into a new collection that then holds them all, and an open
//! migration records one garbage point per update.
//!
//! The embedded backend always runs. The servers backend (PostgreSQL +
//! the Qdrant-compatible test server, in this process) runs when
//! `DATABASE_URL` is set, and then must succeed: an unreachable server fails
//! the test rather than skipping it.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

const BATCHES: [u64; 2] = [1, 10];
/// Records ingested before each rebuild, and rows per copy chunk.
const REINDEX_RECORDS: u64 = 30;
const REINDEX_CHUNK: u64 = 8;

fn bench(args: &[&str], out_dir: &Path, database_url: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tandem"));
    for var in [
        "DATABASE_URL",
        "QDRANT_URL",
        "QDRANT_API_KEY",
        "TANDEM_CONFIG",
        "RUST_LOG",
    ] {
        c.env_remove(var);
    }
    if let Some(url) = database_url {
        c.env("DATABASE_URL", url);
    }
    c.current_dir(out_dir.parent().expect("a parent"))
        .args([
            "bench",
            "--records",
            "20",
            "--dims",
            "8",
            "--batch-size",
            "1,10",
            "--repeat",
            "2",
            "--queries",
            "6",
            "--backlog",
            "4",
            "--scopes",
            "4",
            "--reindex-records",
            "30",
            "--reindex-chunk",
            "8",
            "--json",
            "--out",
        ])
        .arg(out_dir)
        .args(args);
    c.output().expect("tandem runs")
}

fn case<'a>(run: &'a Value, op: &str, protocol: &str, batch: Option<u64>) -> &'a Value {
    run["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .find(|c| {
            c["operation"] == op
                && c["protocol"] == protocol
                && batch.is_none_or(|b| c["batch_size"] == b)
        })
        .unwrap_or_else(|| panic!("no case {op}/{protocol}/{batch:?} in {run:#}"))
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v:#}"))
}

/// Checks one run's cases; returns how many it has.
fn check_run(run: &Value, backend: &str, latency_ms: f64) -> usize {
    assert_eq!(run["backend"], backend);
    assert_eq!(num(run, "added_latency_ms"), latency_ms);
    assert_eq!(run["dim"], 8);
    assert_eq!(run["consistent_after"], true, "{run:#}");
    for c in run["cases"].as_array().expect("cases") {
        assert!(num(c, "throughput") > 0.0, "{c:#}");
        assert_eq!(c["passes"], 2, "{c:#}");
        let l = &c["latency_ms"];
        let (p50, p95, p99, max) = (num(l, "p50"), num(l, "p95"), num(l, "p99"), num(l, "max"));
        assert!(
            0.0 < p50 && p50 <= p95 && p95 <= p99 && p99 <= max * 1.001,
            "{c:#}"
        );
        assert!(num(c, "peak_rss_mib") > 1.0, "{c:#}");
        // Wire turns are counted exactly when a proxy adds latency.
        assert_eq!(
            c["metadata_wire_round_trips_per_batch"].is_number(),
            latency_ms > 0.0,
            "{c:#}"
        );
    }
    for b in BATCHES {
        let raw = case(run, "upsert", "raw", Some(b));
        let overlapped = case(run, "upsert", "raw-overlapped", Some(b));
        let naive = case(run, "upsert", "naive", Some(b));
        let tandem = case(run, "upsert", "tandem", Some(b));
        // Every protocol wrote the same records.
        assert_eq!(raw["items"], naive["items"]);
        assert_eq!(raw["items"], overlapped["items"]);
        assert_eq!(raw["items"], tandem["items"]);
        // raw and raw-overlapped: BEGIN, insert, COMMIT; naive: 3 per record
        // + BEGIN, COMMIT; tandem: prepare, commit, resolve. One index call
        // each.
        assert_eq!(num(raw, "metadata_calls_per_batch"), 3.0);
        assert_eq!(num(overlapped, "metadata_calls_per_batch"), 3.0);
        assert_eq!(num(naive, "metadata_calls_per_batch"), (3 * b + 2) as f64);
        assert_eq!(num(tandem, "metadata_calls_per_batch"), 3.0);
        for c in [raw, overlapped, naive, tandem] {
            assert_eq!(num(c, "index_calls_per_batch"), 1.0, "{c:#}");
        }
        assert!(tandem["vs_raw"]["median"].is_number());
        assert!(tandem["vs_naive"]["median"].is_number());
        assert!(tandem["vs_raw_overlapped"]["median"].is_number());
        assert!(overlapped["vs_raw"]["median"].is_number());
        assert!(raw["vs_raw"].is_null());
        assert!(overlapped["vs_raw_overlapped"].is_null());
        // Deferred: one commit (it creates its intent; recovery resolves
        // it later, in a batch), no index call; the raw insert it is
        // compared with: BEGIN, insert, COMMIT. The workers then index every
        // record the deferred pass wrote.
        let deferred = case(run, "upsert", "deferred", Some(b));
        let insert = case(run, "upsert", "raw-insert", Some(b));
        assert_eq!(deferred["items"], raw["items"]);
        assert_eq!(insert["items"], raw["items"]);
        assert_eq!(
            num(deferred, "metadata_calls_per_batch"),
            1.0,
            "{deferred:#}"
        );
        assert_eq!(num(deferred, "index_calls_per_batch"), 0.0, "{deferred:#}");
        assert_eq!(num(insert, "metadata_calls_per_batch"), 3.0, "{insert:#}");
        assert_eq!(num(insert, "index_calls_per_batch"), 0.0, "{insert:#}");
        let drain = case(run, "index_drain", "workers", Some(b));
        assert_eq!(drain["items"], deferred["items"], "{drain:#}");
        let deleted = case(run, "delete_ids", "tandem", Some(b));
        assert_eq!(num(deleted, "metadata_calls_per_batch"), 3.0);
    }
    // The lag under a steady deferred load: every record written was indexed
    // (the pass ends once the worker drained them), lag samples were taken.
    let largest = *BATCHES.iter().max().expect("batch sizes");
    let lag = case(run, "index_lag", "workers", Some(largest));
    assert_eq!(
        lag["items"],
        case(run, "upsert", "raw", Some(largest))["items"],
        "{lag:#}"
    );
    assert!(num(lag, "calls") >= 2.0, "{lag:#}");
    for op in ["search", "search_scope"] {
        let index = case(run, op, "index", Some(10));
        let guarded = case(run, op, "guarded", Some(10));
        assert_eq!(num(index, "metadata_calls_per_batch"), 0.0);
        // The read guard: one metadata query per search (the over-fetch was enough).
        assert_eq!(num(guarded, "metadata_calls_per_batch"), 1.0);
        assert!(guarded["vs_raw"]["median"].is_number());
    }
    // Two repetitions each delete one scope of 4 and verify another.
    let scope = case(run, "delete_scope", "tandem", None);
    assert!(num(scope, "items") > 0.0, "{scope:#}");
    assert!(num(case(run, "verify_scope", "tandem", None), "items") > 0.0);
    let recover = case(run, "recover", "tandem", Some(10));
    assert_eq!(
        num(recover, "items"),
        8.0,
        "2 repetitions × 4 expired intents"
    );
    assert!(!run["targets"].as_array().expect("targets").is_empty());
    check_reindex(run);
    run["cases"].as_array().map_or(0, Vec::len)
}

/// The re-indexing cases of a run (2 repetitions, 20 records per write pass).
fn check_reindex(run: &Value) {
    let reps = 2.0;
    let n = REINDEX_RECORDS as f64;
    // The ingest (one batch: fewer records than 1000) and the rebuild wrote
    // the same records; the rebuild's batch is its copy chunk.
    let ingest = case(run, "reindex_ingest", "tandem", Some(REINDEX_RECORDS));
    let rebuild = case(run, "reindex_rebuild", "kept-vectors", Some(REINDEX_CHUNK));
    assert_eq!(num(ingest, "items"), reps * n, "{ingest:#}");
    assert_eq!(num(rebuild, "items"), reps * n, "{rebuild:#}");
    assert_eq!(num(rebuild, "calls"), reps, "one rebuild per repetition");
    // 30 rows in chunks of 8: at least 4 target writes and 4 progress
    // commits per rebuild.
    assert!(num(rebuild, "index_calls_per_batch") >= 4.0, "{rebuild:#}");
    assert!(
        num(rebuild, "metadata_calls_per_batch") >= 8.0,
        "{rebuild:#}"
    );
    let r = &run["reindex"];
    assert_eq!(r["records"], REINDEX_RECORDS, "{r:#}");
    assert_eq!(r["chunk"], REINDEX_CHUNK, "{r:#}");
    assert_eq!(r["ingest_batch"], REINDEX_RECORDS, "{r:#}");
    assert!(num(&r["rebuild_records_per_s"], "median") > 0.0, "{r:#}");
    assert!(num(&r["ingest_records_per_s"], "median") > 0.0, "{r:#}");
    assert!(num(&r["rebuild_vs_ingest"], "median") > 0.0, "{r:#}");
    assert_eq!(r["consistent"], true, "{r:#}");
    // After every rebuild the new collection is active and holds every
    // record's point, and nothing else.
    let rebuilds = r["rebuilds"].as_array().expect("rebuilds");
    assert_eq!(rebuilds.len(), 2, "{r:#}");
    for b in rebuilds {
        assert_eq!(b["switched"], true, "{b:#}");
        assert_eq!(b["copied"], REINDEX_RECORDS, "{b:#}");
        assert_eq!(b["points_in_new_collection"], REINDEX_RECORDS, "{b:#}");
        assert_eq!(b["rows"], REINDEX_RECORDS, "{b:#}");
        assert_eq!(b["missing_points"], 0, "{b:#}");
        assert_eq!(b["orphan_points"], 0, "{b:#}");
    }
    // The writes with and without a migration open: the same records, the
    // same port calls (prepare, commit, resolve: the open migration's work
    // is inside the commit).
    let writes = r["writes"].as_array().expect("writes");
    assert_eq!(writes.len(), 2 * BATCHES.len(), "{r:#}");
    for write in ["update", "insert"] {
        for b in BATCHES {
            let op = format!("write_{write}");
            let none = case(run, &op, "no-migration", Some(b));
            let open = case(run, &op, "migration-open", Some(b));
            assert_eq!(num(none, "items"), reps * 20.0, "{none:#}");
            assert_eq!(none["items"], open["items"]);
            for c in [none, open] {
                assert_eq!(num(c, "metadata_calls_per_batch"), 3.0, "{c:#}");
            }
            let w = writes
                .iter()
                .find(|w| w["write"] == write && w["batch_size"] == b)
                .unwrap_or_else(|| panic!("no {write} overhead at batch {b}: {r:#}"));
            for ratio in ["p50_ratio", "p99_ratio", "throughput_ratio"] {
                assert!(num(&w[ratio], "median") > 0.0, "{w:#}");
            }
            assert!(num(&w["migration_open_ms"], "p50") > 0.0, "{w:#}");
        }
    }
    // The migration the writes ran beside: its copy wrote every row of the
    // stores into its target; every period it was open recorded the old
    // point of every record updated meanwhile (20 at each of the 2 batch
    // sizes per repetition).
    let copies = r["migration_copies"].as_array().expect("migration_copies");
    assert_eq!(copies.len(), 2, "{r:#}");
    assert!(copies.iter().all(|c| c.as_f64() >= Some(n)), "{r:#}");
    let garbage = r["garbage"].as_array().expect("garbage");
    assert!(!garbage.is_empty(), "{r:#}");
    for g in garbage {
        assert_eq!(g["garbage_recorded"], g["updated_while_open"], "{g:#}");
    }
    let updated: f64 = garbage.iter().map(|g| num(g, "updated_while_open")).sum();
    assert_eq!(updated, reps * 40.0, "{r:#}");
}

fn check_report(output: &Output, out_dir: &Path) -> Value {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "tandem bench failed:\n{stderr}");
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{stderr}"));
    let written: Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("results.json")).expect("results.json"),
    )
    .expect("results.json is JSON");
    assert_eq!(written, report, "--out and --json agree");
    let md = std::fs::read_to_string(out_dir.join("results.md")).expect("results.md");
    assert!(
        md.contains("| upsert | tandem |") && md.contains("throughput.svg"),
        "{md}"
    );
    assert!(
        md.contains("| reindex_rebuild | kept-vectors |") && md.contains("| rebuild ÷ ingest"),
        "{md}"
    );
    let svg = std::fs::read_to_string(out_dir.join("throughput.svg")).expect("throughput.svg");
    assert!(svg.starts_with("<svg") && svg.contains("tandem"), "{svg}");
    assert_eq!(report["consistent"], true);
    assert!(
        report["command"]
            .as_str()
            .is_some_and(|c| c.starts_with("tandem bench"))
    );
    report
}

#[test]
fn embedded_bench_runs_every_case_and_reports_well_formed_json() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("results");
    let output = bench(
        &[
            "--backends",
            "embedded",
            "--work-dir",
            dir.path().to_str().unwrap(),
        ],
        &out_dir,
        None,
    );
    let report = check_report(&output, &out_dir);
    let runs = report["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 1);
    let cases = check_run(&runs[0], "embedded", 0.0);
    // 6 protocols × 2 batch sizes and the index workers' drain of each
    // deferred pass, the lag under load at the largest batch, 2 × 2
    // searches, verify, 2 deletes by ids, delete by scope, recover; the
    // ingest and the rebuild, 2 writes × 2 batch sizes × 2 states.
    assert_eq!(cases, 12 + 2 + 1 + 4 + 1 + 2 + 1 + 1 + 2 + 8);
    // The embedded stores lived in the work dir and are gone.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("tandem-bench-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn cases_selects_groups_and_reindex_runs_alone() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("results");
    let work = dir.path().to_str().unwrap();
    // search, verify and delete use the upserts' records.
    let refused = bench(
        &["--cases", "search,reindex", "--work-dir", work],
        &out_dir,
        None,
    );
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    let output = bench(&["--cases", "reindex", "--work-dir", work], &out_dir, None);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "tandem bench failed:\n{stderr}");
    let report: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(report["consistent"], true);
    assert_eq!(report["params"]["cases"], serde_json::json!(["reindex"]));
    let run = &report["runs"][0];
    let ops: std::collections::BTreeSet<&str> = run["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .filter_map(|c| c["operation"].as_str())
        .collect();
    assert_eq!(
        ops.into_iter().collect::<Vec<_>>(),
        [
            "reindex_ingest",
            "reindex_rebuild",
            "write_insert",
            "write_update"
        ]
    );
    check_reindex(run);
    // No upserts, no chart.
    assert!(out_dir.join("results.md").exists());
    assert!(!out_dir.join("throughput.svg").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_bench_runs_when_database_url_is_set() {
    let Ok(database_url) = std::env::var("DATABASE_URL") else {
        eprintln!("DATABASE_URL is not set: the servers backend is not exercised");
        return;
    };
    let double = tandem_tests::qdrant_double::QdrantDouble::start().await;
    let qdrant_url = double.url();
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("results");
    let namespace = format!("tandem_bench_smoke_{}", std::process::id());
    let output = {
        let out_dir = out_dir.clone();
        tokio::task::spawn_blocking(move || {
            bench(
                &[
                    "--backends",
                    "servers",
                    "--added-latency",
                    "0,1",
                    "--qdrant-url",
                    &qdrant_url,
                    "--namespace",
                    &namespace,
                ],
                &out_dir,
                Some(&database_url),
            )
        })
        .await
        .unwrap()
    };
    let report = check_report(&output, &out_dir);
    let runs = report["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2, "latency 0 and 1 ms");
    check_run(&runs[0], "servers", 0.0);
    check_run(&runs[1], "servers", 1.0);
    assert!(
        num(&runs[1], "measured_round_trip_ms") >= 2.0,
        "{:#}",
        runs[1]
    );
    // With latency the wire round trips show what the port counts hide: a
    // Tandem batch costs the same whatever its size.
    let wire = |p, b| {
        num(
            case(&runs[1], "upsert", p, Some(b)),
            "metadata_wire_round_trips_per_batch",
        )
    };
    // (A pool connection opened during a pass adds a few turns.)
    assert!((wire("tandem", 1) - wire("tandem", 10)).abs() < 1.0);
    assert!(wire("naive", 10) >= wire("naive", 1) + 25.0);
    // The report never shows the URLs.
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        !stdout.contains("127.0.0.1:5432") && !stdout.contains(&double.url()),
        "{stdout}"
    );
    // The bench dropped its collections (the test server keeps one
    // directory per collection).
    let left: Vec<String> = std::fs::read_dir(double.data_dir().join("collections"))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .expect("the test server's collections directory");
    assert!(
        left.iter().all(|c| !c.starts_with("tandem_bench_smoke")),
        "{left:?}"
    );
    double.shutdown().await;
}
