//! Deferred writes through a whole outage of the index, on PostgreSQL and the
//! Qdrant test server: a `tandem ingest --write-mode deferred` whose Qdrant
//! URL reaches no server commits every batch (exit 0) — the index is not
//! needed to decide a deferred write —; once the index is reachable,
//! `tandem index-worker --until-idle` drains the backlog and `tandem verify`
//! is exact, every record found at its own vector. (Workers killed with
//! SIGKILL mid-drain: `tests/tests/crash_campaign.rs`.)

mod support;

use serde_json::{Value, json};
use support::Stores;

fn line(n: u32) -> String {
    json!({
        "id": support::id(n),
        "scope": if n.is_multiple_of(2) { "books" } else { "music" },
        "content": format!("record {n}"),
        "metadata": {"n": n},
        "vector": [1.0, n as f32, 0.5, (n % 3) as f32],
    })
    .to_string()
}

#[test]
fn a_deferred_ingest_rides_out_an_index_outage_and_the_workers_catch_up() {
    let stores = Stores::servers();
    let input: String = (1..=60).map(|n| line(n) + "\n").collect();
    let file = stores.dir().join("in.jsonl");
    std::fs::write(&file, input).expect("the input is written");
    let file = file.display().to_string();

    // The index is down for the whole ingest: its URL reaches nothing.
    let mut down = stores.args();
    let at = down
        .iter()
        .position(|a| a == "--qdrant-url")
        .expect("the servers' flags name the Qdrant URL");
    down[at + 1] = "http://127.0.0.1:1".to_owned();
    let out = support::tandem(stores.dir())
        .args(&down)
        .args(["--write-mode", "deferred", "--json"])
        .args(["ingest", &file, "--batch-size", "7"])
        .output()
        .expect("tandem runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_str(&stdout).expect("a JSON summary");
    assert_eq!(
        (
            summary["inserted"].as_u64(),
            summary["batches_committed"].as_u64()
        ),
        (Some(60), Some(9)),
        "{summary}"
    );

    // The index is back: the workers drain the backlog.
    let (code, stdout, stderr) = stores.cli(&["--json"], &["stats"]);
    assert_eq!(code, 0, "{stderr}");
    let stats: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        (
            stats["points"].as_u64(),
            stats["pending"]["pending"].as_u64()
        ),
        (Some(0), Some(60))
    );
    let (code, stdout, stderr) = stores.cli(&["--json"], &["index-worker", "--until-idle"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["indexed"], 60, "{report}");
    let (code, stdout, _) = stores.cli(&["--json"], &["verify"]);
    assert_eq!(code, 0, "verify after the drain: {stdout}");
    for n in [1u32, 30, 60] {
        let v = format!("[1, {n}, 0.5, {}]", n % 3);
        let (code, stdout, stderr) =
            stores.cli(&["--json"], &["search", "--vector", &v, "-k", "1"]);
        assert_eq!(code, 0, "{stderr}");
        let hits: Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(hits[0]["id"], json!(support::id(n)), "{hits}");
    }
}
