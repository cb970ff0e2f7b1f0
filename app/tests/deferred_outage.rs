//! Deferred writes through a whole outage of the index, on PostgreSQL and the
//! Qdrant test server: a `tandem ingest --write-mode deferred` whose Qdrant
//! URL reaches no server commits every batch (exit 0) — the index is not
//! needed to decide a deferred write —; once the index is reachable,
//! `tandem index-worker --until-idle` drains the backlog and `tandem verify`
//! is exact, every record found at its own vector.
//!
//! Index workers SIGKILLed while the index is still down — mid-claim, in
//! their failing write's retries, in its compensation, while backing off —
//! neither lose nor dead-letter an entry, and the drain after the outage is
//! exact: `index_workers_killed_during_an_outage_lose_and_dead_letter_nothing`.
//! (Workers killed mid-drain with the index up: `tests/tests/crash_campaign.rs`.)

mod support;

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::Stores;

/// An index URL that reaches no server.
const NOWHERE: &str = "http://127.0.0.1:1";

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

/// The stores' global flags with the Qdrant URL pointing at nothing.
fn down_args(stores: &Stores) -> Vec<String> {
    let mut down = stores.args();
    let at = down
        .iter()
        .position(|a| a == "--qdrant-url")
        .expect("the servers' flags name the Qdrant URL");
    down[at + 1] = NOWHERE.to_owned();
    down
}

/// Ingests records `1..=records` in deferred mode, in batches of 7, while
/// the index is down: every batch commits, exit 0.
fn ingest_while_down(stores: &Stores, records: u32) {
    let input: String = (1..=records).map(|n| line(n) + "\n").collect();
    let file = stores.dir().join("in.jsonl");
    std::fs::write(&file, input).expect("the input is written");
    let file = file.display().to_string();
    let out = support::tandem(stores.dir())
        .args(down_args(stores))
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
        (
            Some(u64::from(records)),
            Some(u64::from(records.div_ceil(7)))
        ),
        "{summary}"
    );
}

/// Each of `samples` is found first at its own vector by `tandem search`.
fn found_at_own_vectors(stores: &Stores, samples: &[u32]) {
    for &n in samples {
        let v = format!("[1, {n}, 0.5, {}]", n % 3);
        let (code, stdout, stderr) =
            stores.cli(&["--json"], &["search", "--vector", &v, "-k", "1"]);
        assert_eq!(code, 0, "{stderr}");
        let hits: Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(hits[0]["id"], json!(support::id(n)), "{hits}");
        assert_eq!(hits[0]["content"], json!(format!("record {n}")), "{hits}");
    }
}

#[test]
fn a_deferred_ingest_rides_out_an_index_outage_and_the_workers_catch_up() {
    let stores = Stores::servers();
    // The index is down for the whole ingest: its URL reaches nothing.
    ingest_while_down(&stores, 60);

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
    found_at_own_vectors(&stores, &[1, 30, 60]);
}

/// The lease of the kill test: the entries a killed worker claimed, and the
/// intent of the index unit it had begun, are taken over 2 s after it died
/// instead of after the default 5 minutes. (The configuration requires the
/// lease to exceed `call_deadline_secs + cleanup_deadline_secs`, and the
/// orphan grace to be at least the lease.) Batches of 10 entries, so that
/// each worker claims a part of the backlog (two lanes: 20 entries). Two
/// attempts of an entry's own before the dead-letter list, so that a worker
/// charging the outage to the entries would dead-letter them within a few
/// kills.
const SHORT_LEASE: &str = "\
[coordinator]
lease_secs = 2
call_deadline_secs = 1
cleanup_deadline_secs = 0.5
orphan_grace_secs = 2

[indexing]
batch = 10
max_attempts = 2
idle_poll_secs = 0.05
";
const LEASE: Duration = Duration::from_secs(2);

/// Where a kill's delay is counted from: a warning the worker logs (its
/// default level) on the way, and what it is doing then.
const ANCHORS: [(&str, &str); 3] = [
    // Logged once the process is up, right before its first claim.
    ("the index is unreachable", "started, claiming"),
    // Its index write failed (after retries): it compensates, which fails too.
    ("rolling back", "compensating a failed index write"),
    // The failure is recorded (entries released with a back-off); it idles,
    // then claims again.
    ("index batch failed", "after a recorded failure"),
];

/// `tandem index-worker` (no `--until-idle`: it runs until a signal) with
/// the index down; its stderr lines come through a channel. Killed if
/// dropped, so a failing assertion leaves no worker running.
struct Worker {
    child: Child,
    lines: Receiver<String>,
    reader: Option<JoinHandle<Vec<String>>>,
}

impl Worker {
    fn start(stores: &Stores) -> Self {
        let mut child = support::tandem(stores.dir())
            .args(down_args(stores))
            .args(["--write-mode", "deferred", "index-worker"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tandem index-worker starts");
        let stderr = child.stderr.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line.clone());
                all.push(line);
            }
            all
        });
        Worker {
            child,
            lines,
            reader: Some(reader),
        }
    }

    /// Waits until the worker logs a line containing `needle`. Panics if it
    /// exits first, or logs no such line within 30 s (it hangs).
    fn wait_for(&mut self, needle: &str) {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return,
                Ok(_) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().expect("the worker is reaped");
                    panic!(
                        "index-worker exited ({status}) before logging {needle:?}:\n{}",
                        self.stderr()
                    );
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("index-worker logged no {needle:?} within 30 s")
                }
            }
        }
    }

    /// SIGKILLs it (std's `kill` is SIGKILL on Unix, as in the crash
    /// campaign); it must have been running: a worker does not stop on its
    /// own while the index is down.
    fn kill(mut self) {
        self.child.kill().expect("SIGKILL is sent");
        let status = self.child.wait().expect("the killed worker is reaped");
        assert_eq!(
            status.signal(),
            Some(9),
            "index-worker exited on its own ({status}) while the index was down:\n{}",
            self.stderr()
        );
    }

    /// Everything it wrote to stderr (once it has exited).
    fn stderr(&mut self) -> String {
        self.reader
            .take()
            .map(|r| r.join().unwrap_or_default().join("\n"))
            .unwrap_or_default()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tandem --json ARGS` on the stores (the index reachable); its JSON output.
fn cli_json(stores: &Stores, args: &[&str]) -> Value {
    let (code, stdout, stderr) = stores.cli(&["--json"], args);
    assert_eq!(code, 0, "tandem {args:?}: {stdout}{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("tandem {args:?}: {e}: {stdout}"))
}

/// Index workers SIGKILLed while the index is down — 24 times, each worker
/// started against an index URL that reaches nothing (so it claims entries
/// and fails its index writes), killed at varied points counted from one of
/// [`ANCHORS`] — lose nothing and dead-letter nothing: an outage is
/// transient. After every kill the backlog is whole (every record still
/// waiting, none dead-lettered, no point written). Once the index is back
/// and the killed workers' leases have ended, one `tandem index-worker
/// --until-idle` drains everything and `tandem verify` is exact.
#[test]
fn index_workers_killed_during_an_outage_lose_and_dead_letter_nothing() {
    const RECORDS: u32 = 100;
    const KILLS: u32 = 24;
    let stores = Stores::servers();
    stores.config(SHORT_LEASE);
    ingest_while_down(&stores, RECORDS);
    let records = u64::from(RECORDS);

    let mut leaving_claims = 0;
    for i in 0..KILLS {
        let (needle, phase) = ANCHORS[i as usize % ANCHORS.len()];
        // 0 to 400 ms after the anchor, a different point each time.
        let delay = Duration::from_millis(u64::from(i * 97 % 401));
        let mut worker = Worker::start(&stores);
        worker.wait_for(needle);
        std::thread::sleep(delay);
        worker.kill();

        let stats = cli_json(&stores, &["stats"]);
        let pending = &stats["pending"];
        assert_eq!(
            (
                stats["rows"].as_u64(),
                stats["points"].as_u64(),
                pending["pending"].as_u64(),
                pending["dead"].as_u64(),
            ),
            (Some(records), Some(0), Some(records), Some(0)),
            "after kill {i} ({phase}, +{delay:?}), the backlog is whole and nothing is \
             dead-lettered or indexed: {stats}"
        );
        let dlq = cli_json(&stores, &["dlq", "list"]);
        assert_eq!(
            dlq["dead_letters"].as_array().map(Vec::len),
            Some(0),
            "after kill {i} ({phase}, +{delay:?}): {dlq}"
        );
        let claimed = pending["claimed"].as_u64().unwrap_or(0);
        if claimed > 0 {
            leaving_claims += 1;
        }
        eprintln!(
            "kill {i:>2}: {phase} +{:>3} ms: {claimed} entries claimed or backing off, \
             {} live intents",
            delay.as_millis(),
            stats["live_intents"]
        );
    }
    eprintln!("{KILLS} workers killed, {leaving_claims} leaving claimed entries behind");

    // The index is back. The last killed workers' claims and intents end
    // with their lease; then one worker drains everything.
    std::thread::sleep(LEASE + Duration::from_millis(500));
    let (code, stdout, stderr) = stores.cli(
        &["--json"],
        &["index-worker", "--until-idle", "--patience", "60s"],
    );
    assert_eq!(code, 0, "the drain after the outage: {stdout}{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        (
            report["indexed"].as_u64(),
            report["dead_lettered"].as_u64(),
            report["pending"]["pending"].as_u64(),
            report["pending"]["dead"].as_u64(),
        ),
        (Some(records), Some(0), Some(0), Some(0)),
        "{report}"
    );

    let (code, stdout, _) = stores.cli(&["--json"], &["verify"]);
    let verify: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(code, 0, "verify after the drain: {verify}");
    assert_eq!(verify["consistent"], true, "{verify}");
    for empty in ["missing_points", "orphan_points"] {
        assert_eq!(verify[empty].as_array().map(Vec::len), Some(0), "{verify}");
    }
    for zero in ["live_intents", "unindexed", "pending_index", "dead_letters"] {
        assert_eq!(verify[zero], 0, "{zero}: {verify}");
    }
    let stats = cli_json(&stores, &["stats"]);
    assert_eq!(
        (stats["rows"].as_u64(), stats["points"].as_u64()),
        (Some(records), Some(records)),
        "{stats}"
    );
    found_at_own_vectors(&stores, &[1, 37, 64, 100]);
}
