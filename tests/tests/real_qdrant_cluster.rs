//! A real 3-node Qdrant cluster loses a node during `tandem ingest`.
//!
//! The collection has 3 shards with 2 replicas each; the `tandem` binary writes
//! through node 0's gRPC port (PostgreSQL in a schema of its own) in small
//! batches while node 2 — not the node Tandem talks to — is SIGKILLed and, a
//! few seconds later, restarted on the same storage and ports. With the
//! default write ordering (`medium`) and the CLI's batch retries:
//!
//! * the ingest ends with exit 0: every batch committed, none failed (a batch
//!   may have been retried under its idempotency key);
//! * once every replica is `Active` again (and the leases of any intent an
//!   interrupted attempt left have ended, then `tandem recover`), `tandem
//!   verify` is exact through **each** node, the PostgreSQL rows are exactly
//!   the input, and each node counts as many points (`points/count`, exact)
//!   as there are rows.
//!
//! Killing the *entry* node is not tested: Tandem takes one Qdrant URL, so
//! while that node is down every call fails (the CLI retries, then stops with
//! exit 3) — see docs/qdrant.md.
//!
//! Needs a real Qdrant server (see `tandem_tests::real_qdrant`); without one
//! the test is reported as ignored, with the reason. PostgreSQL is required
//! (`DATABASE_URL` or the local default): unreachable, the test fails.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, json};
use tandem_core::RecordId;
use tandem_tests::campaign::{
    InputFile, InputLine, StoreReader, Tandem, check_exact, tandem_binary,
};
use tandem_tests::pg::TestSchema;
use tandem_tests::real_qdrant::{Launcher, QdrantCluster};

const DIM: usize = 16;
/// Records ingested, in batches of [`BATCH`].
const RECORDS: usize = 6000;
const BATCH: usize = 10;
/// How long node 2 stays down.
const DOWN_FOR: Duration = Duration::from_secs(3);
/// Short leases, so that an intent an interrupted attempt left behind can be
/// recovered within seconds (`lease > call deadline + cleanup deadline`).
const CONFIG: &str = "\
[coordinator]
call_deadline_secs = 10
cleanup_deadline_secs = 2
lease_secs = 14
";

fn vector(i: usize) -> Vec<f32> {
    (0..DIM)
        .map(|d| {
            (((i * 31 + d * 17) % 97) as f32 + 1.0) / 97.0 * if d % 2 == 0 { 1.0 } else { -1.0 }
        })
        .collect()
}

fn input(dir: &std::path::Path) -> InputFile {
    let lines = (0..RECORDS)
        .map(|i| {
            let mut metadata = Map::new();
            metadata.insert("input".into(), json!("cluster"));
            metadata.insert("line".into(), json!(i + 1));
            InputLine {
                id: Some(RecordId::from(uuid::Uuid::new_v4())),
                scope: format!("s{}", i % 4),
                content: format!("record {i}"),
                metadata,
                vector: vector(i),
            }
        })
        .collect();
    InputFile::write(dir, "cluster", lines, BATCH)
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

#[test]
#[cfg_attr(
    not(real_qdrant),
    ignore = "needs a real Qdrant server: set QDRANT_BIN=/path/to/qdrant or TANDEM_QDRANT_START, see docs/qdrant.md"
)]
fn ingest_rides_out_a_replica_node_killed_and_restarted() {
    let launcher = Launcher::require();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let schema = rt.block_on(TestSchema::new());
    let bin = tandem_binary();
    let tmp = tempfile::tempdir().expect("temp dir");
    std::fs::write(tmp.path().join("tandem.toml"), CONFIG).expect("write tandem.toml");

    let started = Instant::now();
    let mut cluster = QdrantCluster::start(&launcher, 3);
    let collection = format!("cluster_{}", uuid::Uuid::new_v4().simple());
    cluster.create_collection(
        &collection,
        &json!({
            "vectors": {"size": DIM, "distance": "Cosine"},
            "shard_number": 3,
            "replication_factor": 2,
        }),
    );
    println!(
        "3-node cluster with collection {collection} (3 shards × 2 replicas) ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let global_for = |grpc: &str| {
        let mut g = os(&["--json", "-q", "--dim", &DIM.to_string(), "--config"]);
        g.push(tmp.path().join("tandem.toml").into());
        g.extend(os(&[
            "--postgres-schema",
            schema.name(),
            "--qdrant-url",
            grpc,
            "--collection",
            &collection,
        ]));
        g
    };
    let env = vec![("DATABASE_URL".to_owned(), schema.url().to_owned())];
    let cli = Tandem::new(
        bin,
        tmp.path(),
        global_for(&cluster.node(0).grpc_url()),
        env,
    );
    let out = cli.run(&["migrate"]);
    assert_eq!(out.code(), Some(0), "migrate: {}", out.stderr);
    let store = StoreReader::new(Arc::new(rt.block_on(schema.repo())));

    let file = input(tmp.path());
    let path = file.path.display().to_string();
    let batch = BATCH.to_string();
    let mut ingest = cli.spawn(&["ingest", &path, "--batch-size", &batch]);

    // Kill node 2 once a tenth of the input is committed.
    let rows_now = || rt.block_on(store.row_count()) as usize;
    let wait_start = Instant::now();
    while rows_now() < RECORDS / 10 {
        assert!(
            ingest.is_running(),
            "the ingest ended before the kill: {}",
            ingest.stderr_so_far()
        );
        assert!(
            wait_start.elapsed() < Duration::from_secs(120),
            "the ingest made no progress"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let at_kill = rows_now();
    cluster.node_mut(2).kill9();
    let killed = Instant::now();
    assert!(
        ingest.is_running(),
        "the ingest must still be running when node 2 dies"
    );
    println!(
        "node 2 SIGKILLed at {:.1} s into the ingest ({at_kill} of {RECORDS} rows committed)",
        ingest.elapsed().as_secs_f64()
    );
    std::thread::sleep(DOWN_FOR);
    let during_outage = rows_now() - at_kill;
    let restarting = Instant::now();
    cluster.node_mut(2).restart();
    let restarted = Instant::now();
    let spanned_restart = ingest.is_running();
    println!(
        "node 2 restarted on its storage after {:.1} s down (ready {:.1} s after its start); {during_outage} rows committed while it was down; ingest still running: {spanned_restart}",
        restarted.duration_since(killed).as_secs_f64(),
        restarted.duration_since(restarting).as_secs_f64()
    );

    let out = ingest.wait();
    let j = out.json();
    assert_eq!(
        out.code(),
        Some(0),
        "the ingest must finish despite the outage:\n{j:#}\nstderr:\n{}",
        out.stderr
    );
    let batches = file.batches() as u64;
    assert_eq!(j["ok"], true, "{j:#}");
    assert_eq!(j["batches_committed"], batches, "{j:#}");
    assert_eq!(j["batches_attempted"], batches, "{j:#}");
    assert_eq!(j["batches_failed"], 0, "{j:#}");
    println!(
        "ingest: exit 0 in {:.1} s; batches attempted {}, committed {}, failed {}, retried {} ({} retries in all, {} settled by key)",
        out.elapsed.as_secs_f64(),
        j["batches_attempted"],
        j["batches_committed"],
        j["batches_failed"],
        j["batches_retried"],
        j["batch_retries"],
        j["batches_settled_by_key"]
    );
    if !out.stderr.trim().is_empty() {
        println!("ingest stderr:\n{}", out.stderr.trim());
    }

    cluster.wait_for_active(&collection);
    cluster.wait_for_peers();
    println!(
        "every replica Active again {:.1} s after the restart",
        restarted.elapsed().as_secs_f64()
    );
    // Intents an interrupted attempt left (its compensation may not have
    // reached every replica) are recovery's, once their lease ended.
    let pending = rt.block_on(store.wait_for_leases());
    if pending > 0 {
        let out = cli.run(&["recover"]);
        assert_eq!(
            out.code(),
            Some(0),
            "recover: {}\n{}",
            out.stdout,
            out.stderr
        );
        println!("recover: {}", out.stdout.trim());
    }

    let rows = rt.block_on(store.rows());
    file.check_complete(&rows)
        .unwrap_or_else(|e| panic!("PostgreSQL after the ingest: {e}"));
    let mut per_node = BTreeMap::new();
    for (i, node) in cluster.nodes().iter().enumerate() {
        let via = cli.with_global(global_for(&node.grpc_url()));
        let out = via.run(&["verify"]);
        let verify = out.json();
        assert_eq!(
            out.code(),
            Some(0),
            "verify through node {i} ({}): {verify:#}\n{}",
            node.grpc_url(),
            out.stderr
        );
        check_exact(&verify, &rows).unwrap_or_else(|e| panic!("verify through node {i}: {e}"));
        let count = node
            .count(&collection)
            .unwrap_or_else(|e| panic!("count through node {i}: {e}"));
        assert_eq!(
            count,
            rows.len() as u64,
            "points counted through node {i} vs rows in PostgreSQL"
        );
        per_node.insert(i, count);
    }
    println!(
        "verify exact through each node {:.1} s after the restart; points per node {per_node:?} = {} rows",
        restarted.elapsed().as_secs_f64(),
        rows.len()
    );
}
