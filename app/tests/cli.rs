//! The `tandem` binary, run as a child process: output, exit codes, bad input,
//! idempotent re-ingest, configuration precedence, metrics and the demo.
//!
//! Tests that need state across commands use the embedded backends in a
//! temporary data directory; the others use the hidden in-memory backend.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A finished run.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }
}

/// The binary, with no configuration leaking in from the environment or the
/// working directory.
fn tandem(cwd: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tandem"));
    for var in [
        "DATABASE_URL",
        "QDRANT_URL",
        "QDRANT_API_KEY",
        "TANDEM_CONFIG",
        "TANDEM_DATA_DIR",
        "TANDEM_METRICS_ADDR",
        "TANDEM_EMBED",
        "TANDEM_EMBED_URL",
        "TANDEM_EMBED_MODEL",
        "TANDEM_EMBED_DIMENSIONS",
        "TANDEM_EMBED_API_KEY",
        "OPENAI_API_KEY",
        "RUST_LOG",
    ] {
        c.env_remove(var);
    }
    c.current_dir(cwd);
    c
}

fn run_in(cwd: &Path, args: &[&str], stdin: Option<&str>) -> Run {
    let mut c = tandem(cwd);
    c.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("the tandem binary starts");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(input.as_bytes())
            .expect("stdin accepts the input");
    }
    let out = child.wait_with_output().expect("tandem finishes");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A temporary working directory with an embedded data directory inside.
struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("a temporary directory"),
        }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn data_dir(&self) -> PathBuf {
        self.path().join("data")
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path().join(name);
        std::fs::write(&p, text).expect("the input file is written");
        p
    }
    /// Runs on the in-memory backend, dimension 4.
    fn memory(&self, args: &[&str]) -> Run {
        let mut all = vec!["--backend", "memory", "--dim", "4"];
        all.extend_from_slice(args);
        run_in(self.path(), &all, None)
    }
    /// Runs on the embedded backends in this sandbox's data directory, dimension 4.
    fn embedded(&self, args: &[&str]) -> Run {
        self.embedded_stdin(args, None)
    }
    fn embedded_stdin(&self, args: &[&str], stdin: Option<&str>) -> Run {
        let data = self.data_dir();
        let mut all = vec!["--data-dir", data.to_str().unwrap(), "--dim", "4"];
        all.extend_from_slice(args);
        run_in(self.path(), &all, stdin)
    }
}

fn id(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

/// A valid record line with a 4-d vector.
fn line(n: u32, scope: &str, item: &str) -> String {
    json!({
        "id": id(n),
        "scope": scope,
        "content": format!("record {n} of {item}"),
        "metadata": {"item": item, "n": n},
        "vector": [1.0, n as f32, 0.5, (n % 3) as f32],
    })
    .to_string()
}

fn lines(range: std::ops::RangeInclusive<u32>, scope: &str) -> String {
    range
        .map(|n| line(n, scope, &format!("item-{}", n % 2)) + "\n")
        .collect()
}

/// `stats --json` rows and points.
fn counts(s: &Sandbox) -> (u64, u64, u64) {
    let r = s.embedded(&["stats", "--json"]);
    assert_eq!(r.code, 0, "stats: {}", r.stderr);
    let v = r.json();
    (
        v["rows"].as_u64().unwrap(),
        v["points"].as_u64().unwrap(),
        v["live_intents"].as_u64().unwrap(),
    )
}

// ---------------------------------------------------------------- in memory

#[test]
fn ingest_summary_counts_batches_and_records() {
    let s = Sandbox::new();
    let f = s.write("in.jsonl", &lines(1..=5, "books"));
    let r = s.memory(&["ingest", f.to_str().unwrap(), "--batch-size", "2", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = r.json();
    assert_eq!(v["ok"], true);
    assert_eq!(v["batches_committed"], 3);
    assert_eq!(v["inserted"], 5);
    assert_eq!(v["records"], 5);
    // Progress goes to stderr, never stdout.
    assert!(r.stderr.contains("ingest: batch"), "{}", r.stderr);
}

#[test]
fn ingest_reads_stdin_and_prints_a_table_for_people() {
    let s = Sandbox::new();
    let input = lines(1..=3, "books");
    let r = run_in(
        s.path(),
        &["--backend", "memory", "--dim", "4", "-q", "ingest", "-"],
        Some(&input),
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("records inserted"), "{}", r.stdout);
    assert!(r.stdout.contains("ingested -: 3 records"), "{}", r.stdout);
    assert!(r.stderr.is_empty(), "quiet: {}", r.stderr);
}

/// Ingests `input` in batches of 2 on the memory backend and returns the run.
fn bad_ingest(input: &str) -> Run {
    let s = Sandbox::new();
    let f = s.write("in.jsonl", input);
    s.memory(&["ingest", f.to_str().unwrap(), "--batch-size", "2", "--json"])
}

fn assert_stopped_at(r: &Run, line: u64, batch: u64, committed: u64, needle: &str) {
    assert_eq!(r.code, 2, "stderr: {}", r.stderr);
    let v = r.json();
    assert_eq!(v["ok"], false);
    assert_eq!(v["error"]["line"], line, "{v}");
    assert_eq!(v["error"]["batch"], batch, "{v}");
    assert_eq!(v["batches_committed"], committed, "{v}");
    assert_eq!(v["inserted"], committed * 2, "{v}");
    let err: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(err.len(), 1, "one error line: {}", r.stderr);
    assert!(err[0].contains(&format!("line {line}")), "{}", err[0]);
    assert!(
        err[0].contains(needle),
        "{} should contain {needle:?}",
        err[0]
    );
    assert!(err[0].contains("was not written"), "{}", err[0]);
}

#[test]
fn malformed_line_names_its_line_and_stops_before_its_batch() {
    let mut input = lines(1..=3, "books");
    input.push_str("{\"scope\": \"books\", \"vector\": [1,2,3,4]\n");
    input.push_str(&lines(5..=6, "books"));
    let r = bad_ingest(&input);
    assert_stopped_at(&r, 4, 2, 1, "JSON");
}

#[test]
fn wrong_dimension_names_its_line() {
    let mut input = lines(1..=2, "books");
    input.push_str(&line(3, "books", "x"));
    input.push('\n');
    input.push_str(r#"{"scope":"books","content":"short","vector":[1,2,3]}"#);
    input.push('\n');
    let r = bad_ingest(&input);
    assert_stopped_at(&r, 4, 2, 1, "dimension 3");
}

#[test]
fn nan_and_infinity_are_refused_with_their_line() {
    let input = format!(
        "{}\n{}\n",
        line(1, "books", "x"),
        r#"{"scope":"books","vector":[NaN,1,1,1]}"#
    );
    assert_stopped_at(&bad_ingest(&input), 2, 1, 0, "NaN");
    // 1e39 overflows f32 to infinity: the coordinator refuses it.
    let input = format!(
        "{}\n{}\n",
        line(1, "books", "x"),
        r#"{"scope":"books","vector":[1e39,1,1,1]}"#
    );
    assert_stopped_at(&bad_ingest(&input), 2, 1, 0, "not finite");
}

#[test]
fn duplicate_ids_in_a_batch_name_the_second_line() {
    let input = format!(
        "{}\n{}\n{}\n{}\n",
        line(1, "books", "x"),
        line(2, "books", "x"),
        line(3, "books", "x"),
        line(3, "books", "y"),
    );
    assert_stopped_at(&bad_ingest(&input), 4, 2, 1, "more than once");
}

#[test]
fn missing_or_empty_scope_is_refused() {
    let input = format!(
        "{}\n{}\n",
        r#"{"id":"00000000-0000-4000-8000-000000000001","vector":[1,1,1,1]}"#,
        line(2, "books", "x")
    );
    assert_stopped_at(&bad_ingest(&input), 1, 1, 0, "missing field `scope`");
    let input = format!(
        "{}\n{}\n",
        line(2, "books", "x"),
        r#"{"scope":" ","vector":[1,1,1,1]}"#
    );
    assert_stopped_at(&bad_ingest(&input), 2, 1, 0, "scope must not be empty");
}

#[test]
fn records_without_vectors_need_an_embedding() {
    let input = "{\"scope\":\"books\",\"content\":\"red wool scarf\"}\n";
    assert_stopped_at(&bad_ingest(input), 1, 1, 0, "--embed hash");
    let s = Sandbox::new();
    let f = s.write("in.jsonl", input);
    let r = s.memory(&["ingest", f.to_str().unwrap(), "--embed", "hash", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["inserted"], 1);
}

#[test]
fn usage_errors_exit_2() {
    let s = Sandbox::new();
    for args in [
        vec!["delete"],
        vec!["delete", "--where", "item=x"],
        vec!["search", "--scope", "books"],
        vec!["ingest"],
        vec!["frobnicate"],
    ] {
        let r = s.memory(&args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.stdout.is_empty(), "{args:?}: {}", r.stdout);
    }
    let r = s.memory(&["delete", "--ids", "not-a-uuid"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("not a UUID"), "{}", r.stderr);
    let r = s.memory(&["ingest", "/definitely/not/here.jsonl"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("cannot open"), "{}", r.stderr);
}

#[test]
fn configuration_file_lies_under_flags() {
    let s = Sandbox::new();
    s.write("tandem.toml", "dimension = 3\n[ingest]\nbatch_size = 1\n");
    let f = s.write(
        "in.jsonl",
        "{\"scope\":\"a\",\"vector\":[1,2,3]}\n{\"scope\":\"a\",\"vector\":[1,2,4]}\n",
    );
    let base = [
        "--backend",
        "memory",
        "ingest",
        f.to_str().unwrap(),
        "--json",
    ];
    // The file's dimension (3) and batch size (1) apply...
    let r = run_in(s.path(), &base, None);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["batches_committed"], 2);
    // ... and flags override them.
    let mut with_flags = base.to_vec();
    with_flags.extend(["--dim", "4", "--batch-size", "2"]);
    let r = run_in(s.path(), &with_flags, None);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("expects 4"), "{}", r.stderr);
    // A typo in the file is reported, naming the key.
    s.write("bad.toml", "dimenssion = 3\n");
    let r = run_in(
        s.path(),
        &["--config", "bad.toml", "--backend", "memory", "stats"],
        None,
    );
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("dimenssion"), "{}", r.stderr);
}

#[test]
fn unreachable_postgres_is_one_line_naming_the_store_without_the_password() {
    let s = Sandbox::new();
    let url = "postgres://tandem:Sup3rSecretPw@127.0.0.1:1/tandem";
    let r = run_in(
        s.path(),
        &["--postgres-url", url, "--data-dir", "d", "stats"],
        None,
    );
    assert_eq!(r.code, 3, "stdout {} stderr {}", r.stdout, r.stderr);
    let text = format!("{}{}", r.stdout, r.stderr);
    assert!(!text.contains("Sup3rSecretPw"), "{text}");
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", r.stderr);
    assert!(
        lines[0]
            .starts_with("error: cannot reach the PostgreSQL metadata store at 127.0.0.1:1/tandem"),
        "{}",
        lines[0]
    );
    // The same through DATABASE_URL.
    let mut c = tandem(s.path());
    let out = c
        .env("DATABASE_URL", url)
        .args(["--data-dir", "d", "stats"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("PostgreSQL") && !err.contains("Sup3rSecretPw"),
        "{err}"
    );
}

#[test]
fn unreachable_qdrant_names_the_index_without_the_api_key() {
    let s = Sandbox::new();
    let mut c = tandem(s.path());
    let out = c
        .env("QDRANT_API_KEY", "very-secret-api-key")
        .args([
            "--qdrant-url",
            "http://127.0.0.1:1",
            "--backend",
            "memory",
            "stats",
        ])
        .output()
        .unwrap();
    // `--backend memory` wins over the URL: this run must work...
    assert_eq!(out.status.code(), Some(0));
    let out = tandem(s.path())
        .env("QDRANT_API_KEY", "very-secret-api-key")
        .args([
            "--qdrant-url",
            "http://127.0.0.1:1",
            "--data-dir",
            "d",
            "stats",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("Qdrant vector index at http://127.0.0.1:1"),
        "{err}"
    );
    assert!(!err.contains("very-secret-api-key"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn metrics_are_served_while_the_command_runs() {
    let s = Sandbox::new();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let mut child = tandem(s.path())
        .args([
            "--backend",
            "memory",
            "--dim",
            "4",
            "--metrics-addr",
            &addr,
            "ingest",
            "-",
            "--batch-size",
            "2",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(lines(1..=2, "books").as_bytes()).unwrap();
    stdin.flush().unwrap();
    // Wait until the first batch is committed (its progress line), then scrape.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut progress = String::new();
    stderr.read_line(&mut progress).unwrap();
    assert!(progress.contains("batch 1 done"), "{progress}");
    let body = scrape(&addr);
    assert!(body.contains("tandem_commits_total"), "{body}");
    assert!(body.contains("tandem_ingest_records_total 2"), "{body}");
    drop(stdin);
    let status = child.wait().unwrap();
    assert!(status.success());
}

fn scrape(addr: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut c) = TcpStream::connect(addr) {
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            write!(
                c,
                "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut body = String::new();
            let _ = c.read_to_string(&mut body);
            if body.contains("200 OK") {
                return body;
            }
        }
        assert!(Instant::now() < deadline, "no metrics on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn demo_on_memory_backend_reports_consistent() {
    let s = Sandbox::new();
    let r = run_in(
        s.path(),
        &["--backend", "memory", "demo", "--records", "600", "--json"],
        None,
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = r.json();
    assert_eq!(v["consistent"], true);
    assert_eq!(v["orphan_points"], 0);
    assert_eq!(v["missing_points"], 0);
    assert_eq!(v["live_intents"], 0);
    assert_eq!(v["crashes"], 2);
    assert_eq!(v["rollbacks"], 1);
    assert_eq!(v["recovery"]["claimed"], 3);
    for (scope, c) in v["scopes"].as_object().unwrap() {
        assert_eq!(c["expected"], c["rows"], "{scope}");
        assert_eq!(c["rows"], c["points"], "{scope}");
    }
}

// ---------------------------------------------------------------- embedded

#[test]
fn embedded_round_trip_ingest_search_delete_verify_stats() {
    let s = Sandbox::new();
    let mut input = lines(1..=6, "books");
    input.push_str(&lines(7..=10, "music"));
    let f = s.write("in.jsonl", &input);
    let r = s.embedded(&["ingest", f.to_str().unwrap(), "--batch-size", "4", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["inserted"], 10);
    assert_eq!(counts(&s), (10, 10, 0));

    // Search: the record's own vector finds it first; filters hold.
    let r = s.embedded(&["search", "--vector", "[1, 7, 0.5, 1]", "-k", "3", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let hits = r.json();
    assert_eq!(hits.as_array().unwrap().len(), 3);
    assert_eq!(hits[0]["id"], id(7));
    let r = s.embedded(&[
        "search",
        "--vector",
        "[1, 7, 0.5, 1]",
        "--scope",
        "books",
        "--where",
        "item=\"item-1\"",
        "--json",
    ]);
    let hits = r.json();
    assert!(!hits.as_array().unwrap().is_empty());
    for h in hits.as_array().unwrap() {
        assert_eq!(h["scope"], "books");
        assert_eq!(h["metadata"]["item"], "item-1");
    }

    // Delete by scope + metadata, then by ids.
    let r = s.embedded(&[
        "delete",
        "--scope",
        "books",
        "--where",
        "item=item-1",
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["deleted"], 3);
    let r = s.embedded(&["delete", "--ids", &format!("{},{}", id(2), id(7)), "--json"]);
    assert_eq!(r.json()["deleted"], 2);
    assert_eq!(counts(&s), (5, 5, 0));

    // Verify: consistent, per scope.
    let r = s.embedded(&["verify", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    let v = r.json();
    assert_eq!(v["consistent"], true);
    assert_eq!(v["scopes"]["books"]["rows"], 2);
    assert_eq!(v["scopes"]["books"]["points"], 2);
    assert_eq!(v["scopes"]["music"]["rows"], 3);
    let r = s.embedded(&["verify"]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("consistent"), "{}", r.stdout);
    // And the people's stats table names both stores.
    let r = s.embedded(&["stats"]);
    assert!(
        r.stdout.contains("SQLite") && r.stdout.contains("qdrant-edge"),
        "{}",
        r.stdout
    );
}

#[test]
fn embedded_bad_batch_leaves_nothing_in_either_store() {
    let s = Sandbox::new();
    let mut input = lines(1..=4, "books");
    input.push_str(&line(5, "books", "x"));
    input.push('\n');
    input.push_str(r#"{"scope":"books","vector":[1,2,3]}"#);
    input.push('\n');
    input.push_str(&lines(7..=8, "books"));
    let f = s.write("in.jsonl", &input);
    let r = s.embedded(&["ingest", f.to_str().unwrap(), "--batch-size", "2"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("line 6"), "{}", r.stderr);
    // Batches 1 and 2 (records 1-4) are in; batch 3 (lines 5-6) in neither store.
    assert_eq!(counts(&s), (4, 4, 0));
    let r = s.embedded(&["verify", "--json"]);
    assert_eq!(r.code, 0);
    assert_eq!(r.json()["consistent"], true);
}

#[test]
fn reingest_with_the_same_prefix_writes_nothing_twice() {
    let s = Sandbox::new();
    // Records without ids: only the idempotency keys prevent duplicates.
    let input: String = (0..7)
        .map(|i| format!("{{\"scope\":\"notes\",\"content\":\"note number {i} about tandem\"}}\n"))
        .collect();
    let f = s.write("in.jsonl", &input);
    let args = [
        "ingest",
        f.to_str().unwrap(),
        "--embed",
        "hash",
        "--batch-size",
        "3",
        "--idempotency-prefix",
        "load-1",
        "--json",
    ];
    let first = s.embedded(&args);
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert_eq!(first.json()["inserted"], 7);
    let again = s.embedded(&args);
    assert_eq!(again.code, 0, "{}", again.stderr);
    let v = again.json();
    assert_eq!(v["batches_replayed"], 3);
    assert_eq!(v["batches_committed"], 0);
    assert_eq!(v["inserted"], 0);
    assert_eq!(counts(&s), (7, 7, 0));
    // Another batch size changes the batches: refused, not duplicated.
    let mut other = args.to_vec();
    other[5] = "2";
    let r = s.embedded(&other);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("idempotency key"), "{}", r.stderr);
    assert_eq!(counts(&s), (7, 7, 0));
}

#[test]
fn a_fixed_input_resumes_where_the_bad_batch_stopped() {
    let s = Sandbox::new();
    let good = lines(1..=6, "books");
    let mut bad_lines: Vec<String> = good.lines().map(str::to_owned).collect();
    bad_lines[3] = "{not json".into();
    let bad = s.write("bad.jsonl", &(bad_lines.join("\n") + "\n"));
    let fixed = s.write("fixed.jsonl", &good);
    let args = |f: &Path| {
        vec![
            "ingest".to_owned(),
            f.to_str().unwrap().to_owned(),
            "--batch-size".into(),
            "2".into(),
            "--idempotency-prefix".into(),
            "p".into(),
            "--json".into(),
        ]
    };
    let a = args(&bad);
    let r = s.embedded(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(r.code, 2);
    assert_eq!(counts(&s).0, 2);
    let a = args(&fixed);
    let r = s.embedded(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = r.json();
    assert_eq!(v["batches_replayed"], 1);
    assert_eq!(v["batches_committed"], 2);
    assert_eq!(counts(&s), (6, 6, 0));
}

#[test]
fn recover_and_verify_repair_on_a_quiet_store_change_nothing() {
    let s = Sandbox::new();
    let f = s.write("in.jsonl", &lines(1..=3, "books"));
    assert_eq!(s.embedded(&["ingest", f.to_str().unwrap()]).code, 0);
    let r = s.embedded(&["recover", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = r.json();
    assert_eq!(v["claimed"], 0);
    assert_eq!(v["pending_intents"], 0);
    let r = s.embedded(&["verify", "--repair", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = r.json();
    assert_eq!(v["consistent"], true);
    assert_eq!(v["repair"]["orphans_deleted"], 0);
    assert_eq!(v["repair"]["missing_rewritten"], 0);
    assert_eq!(counts(&s), (3, 3, 0));
}

#[test]
fn migrate_creates_the_embedded_stores() {
    let s = Sandbox::new();
    let r = s.embedded(&["migrate", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = r.json();
    assert_eq!(v["collection_ready"], true);
    assert!(s.data_dir().join("metadata.sqlite3").exists());
    assert!(s.data_dir().join("index").exists());
    let again = s.embedded(&["migrate", "--json"]);
    assert_eq!(again.json()["migrations_applied"], 0);
}

#[test]
fn data_dir_precedence_is_flag_then_env_then_file() {
    let s = Sandbox::new();
    s.write("tandem.toml", "data_dir = \"from-file\"\ndimension = 4\n");
    let stats = |env: Option<&str>, flag: Option<&str>| {
        let mut c = tandem(s.path());
        if let Some(e) = env {
            c.env("TANDEM_DATA_DIR", e);
        }
        c.arg("stats").arg("--json");
        if let Some(f) = flag {
            c.args(["--data-dir", f]);
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["metadata_store"].as_str().unwrap().to_owned()
    };
    assert!(stats(None, None).contains("from-file"));
    assert!(stats(Some("from-env"), None).contains("from-env"));
    assert!(stats(Some("from-env"), Some("from-flag")).contains("from-flag"));
}

#[test]
fn demo_on_embedded_backends_reports_consistent() {
    let s = Sandbox::new();
    let data = s.path().join("demo-data");
    let r = run_in(
        s.path(),
        &[
            "demo",
            "--records",
            "1200",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(r.code, 0, "stdout {}\nstderr {}", r.stdout, r.stderr);
    assert!(r.stdout.contains("SQLite metadata store"), "{}", r.stdout);
    assert!(
        r.stdout.contains("consistent: both stores agree exactly"),
        "{}",
        r.stdout
    );
    // The data directory is kept when given, and a second demo refuses it.
    let again = run_in(
        s.path(),
        &["demo", "--data-dir", data.to_str().unwrap()],
        None,
    );
    assert_eq!(again.code, 2);
    assert!(
        again.stderr.contains("fresh data directory"),
        "{}",
        again.stderr
    );
    // The demo's stores can be inspected afterwards.
    let v = run_in(
        s.path(),
        &["--data-dir", data.to_str().unwrap(), "verify", "--json"],
        None,
    );
    assert_eq!(v.code, 0, "{}", v.stderr);
    assert_eq!(v.json()["consistent"], true);
}

#[test]
fn verify_finds_missing_points_and_repair_rewrites_them() {
    let s = Sandbox::new();
    let f = s.write("in.jsonl", &lines(1..=4, "books"));
    assert_eq!(s.embedded(&["ingest", f.to_str().unwrap()]).code, 0);
    // Lose the index: every row's point is missing now.
    std::fs::remove_dir_all(s.data_dir().join("index")).unwrap();
    let r = s.embedded(&["verify", "--json"]);
    assert_eq!(r.code, 1, "inconsistent: {}", r.stdout);
    let v = r.json();
    assert_eq!(v["consistent"], false);
    assert_eq!(v["missing_points"].as_array().unwrap().len(), 4);
    let r = s.embedded(&["verify"]);
    assert_eq!(r.code, 1);
    assert!(r.stdout.contains("NOT consistent"), "{}", r.stdout);
    // The metadata store keeps vectors: repair rewrites the points.
    let r = s.embedded(&["verify", "--repair", "--json"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let v = r.json();
    assert_eq!(v["repair"]["missing_rewritten"], 4);
    assert_eq!(v["consistent"], true);
    assert_eq!(counts(&s), (4, 4, 0));
    let r = s.embedded(&["search", "--vector", "[1, 3, 0.5, 0]", "-k", "1", "--json"]);
    assert_eq!(r.json()[0]["id"], id(3));
}

#[test]
fn verify_finds_orphans_and_repair_spares_young_ones() {
    let s = Sandbox::new();
    let f = s.write("in.jsonl", &lines(1..=3, "books"));
    assert_eq!(s.embedded(&["ingest", f.to_str().unwrap()]).code, 0);
    // Lose the metadata: every point is an orphan now.
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(s.data_dir().join(format!("metadata.sqlite3{suffix}")));
    }
    let r = s.embedded(&["verify", "--json"]);
    assert_eq!(r.code, 1);
    let v = r.json();
    assert_eq!(v["orphan_points"].as_array().unwrap().len(), 3);
    assert_eq!(v["scopes"]["books"]["rows"], 0);
    assert_eq!(v["scopes"]["books"]["points"], 3);
    // They were written just now: younger than the grace period, so kept.
    let r = s.embedded(&["verify", "--repair", "--json"]);
    assert_eq!(r.code, 1);
    let v = r.json();
    assert_eq!(v["repair"]["orphans_too_young"], 3);
    assert_eq!(v["repair"]["orphans_deleted"], 0);
}

#[test]
fn failures_under_json_are_json_on_stdout_too() {
    let s = Sandbox::new();
    let r = run_in(
        s.path(),
        &[
            "--json",
            "--postgres-url",
            "postgres://u:pw12345@127.0.0.1:1/db",
            "stats",
        ],
        None,
    );
    assert_eq!(r.code, 3);
    let v = r.json();
    assert_eq!(v["ok"], false);
    assert_eq!(v["error"]["exit_code"], 3);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("PostgreSQL")
    );
    assert!(!r.stdout.contains("pw12345") && !r.stderr.contains("pw12345"));
    // A failed ingest prints its own summary once, not a second document.
    let f = s.write("bad.jsonl", "{oops\n");
    let r = s.memory(&["ingest", f.to_str().unwrap(), "--json"]);
    assert_eq!(r.code, 2);
    assert_eq!(r.json()["ok"], false);
}

// ------------------------------------------------------- atomic ingest, sagas

/// `ingest --atomic --json` in the sandbox: the run and its summary.
fn atomic_ingest(s: &Sandbox, input: &str, extra: &[&str]) -> (Run, Value) {
    let f = s.write("atomic.jsonl", input);
    let mut args = vec![
        "ingest",
        f.to_str().unwrap(),
        "--batch-size",
        "2",
        "--atomic",
        "--json",
    ];
    args.extend_from_slice(extra);
    let r = s.embedded(&args);
    let v = r.json();
    (r, v)
}

/// Every record the guarded search returns, by id.
fn all_hits(s: &Sandbox) -> std::collections::BTreeMap<String, Value> {
    let r = s.embedded(&[
        "search",
        "--vector",
        "[1, 1, 0.5, 1]",
        "-k",
        "1000",
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    r.json()
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["id"].as_str().unwrap().to_owned(), h.clone()))
        .collect()
}

#[test]
fn atomic_ingest_stands_whole_as_one_done_saga() {
    let s = Sandbox::new();
    let (r, v) = atomic_ingest(&s, &lines(1..=5, "books"), &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(v["inserted"], 5);
    assert_eq!(v["saga"]["state"], "done");
    let saga = v["saga"]["id"].as_str().unwrap().to_owned();
    assert_eq!(counts(&s), (5, 5, 0));

    // The journal shows it, with one step per batch.
    let r = s.embedded(&["saga", "show", &saga, "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let shown = r.json();
    assert_eq!(shown["name"], "tandem.ingest");
    assert_eq!(shown["state"], "done");
    let steps = shown["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 3, "{shown}");
    assert!(steps.iter().all(|s| s["state"] == "done"), "{shown}");
    let r = s.embedded(&["saga", "list", "--state", "done", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let listed = r.json();
    assert!(
        listed.as_array().unwrap().iter().any(|s| s["id"] == saga),
        "{listed}"
    );
    let r = s.embedded(&["saga", "list", "--state", "running", "--json"]);
    assert_eq!(r.json().as_array().unwrap().len(), 0);

    // A finished saga cannot be aborted; an unknown one is not found.
    let r = s.embedded(&["saga", "abort", &saga]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("cannot abort"), "{}", r.stderr);
    assert_eq!(counts(&s), (5, 5, 0));
    let r = s.embedded(&["saga", "show", "00000000-0000-4000-8000-000000000000"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let r = s.embedded(&["saga", "show", "not-a-uuid"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
}

#[test]
fn atomic_ingest_with_a_bad_line_leaves_nothing_in_either_store() {
    let s = Sandbox::new();
    // Batches 1 and 2 are valid and written first; line 6 is not.
    let mut input = lines(1..=5, "books");
    input.push_str(r#"{"scope":"books","vector":[1,2,3]}"#);
    input.push('\n');
    input.push_str(&lines(7..=8, "books"));
    let (r, v) = atomic_ingest(&s, &input, &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("line 6"), "{}", r.stderr);
    assert!(r.stderr.contains("undone"), "{}", r.stderr);
    assert_eq!(v["saga"]["state"], "compensated", "{v}");
    // Unlike a plain ingest (batches 1 and 2 would stand), nothing does.
    assert_eq!(counts(&s), (0, 0, 0));
    let r = s.embedded(&["verify", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["consistent"], true);
    let r = s.embedded(&["saga", "list", "--state", "compensated", "--json"]);
    assert_eq!(r.json().as_array().unwrap().len(), 1);
}

#[test]
fn atomic_ingest_leaves_records_it_did_not_touch_alone_when_undone() {
    let s = Sandbox::new();
    let first = s.write("first.jsonl", &lines(1..=4, "books"));
    let r = s.embedded(&["ingest", first.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Updates record 1 and 2, inserts 9, then fails: 1 and 2 are restored.
    let mut input = String::new();
    for n in [1, 2, 9] {
        input.push_str(&line(n, "books", "changed"));
        input.push('\n');
    }
    input.push_str("{oops\n");
    let (r, v) = atomic_ingest(&s, &input, &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("line 4"), "{}", r.stderr);
    assert_eq!(v["saga"]["state"], "compensated", "{v}");
    assert_eq!(counts(&s), (4, 4, 0));
    let hits = all_hits(&s);
    assert_eq!(hits.len(), 4, "{hits:?}");
    assert_eq!(hits[&id(1)]["metadata"]["item"], "item-1", "{hits:?}");
    assert_eq!(hits[&id(2)]["metadata"]["item"], "item-0", "{hits:?}");
    assert!(!hits.contains_key(&id(9)), "{hits:?}");
    let r = s.embedded(&["verify", "--json"]);
    assert_eq!(r.json()["consistent"], true);
}

#[test]
fn replace_scope_deletes_what_the_input_did_not_write_and_only_that_scope() {
    let s = Sandbox::new();
    let mut before = lines(1..=6, "books");
    before.push_str(&lines(20..=21, "films"));
    let f = s.write("before.jsonl", &before);
    let r = s.embedded(&["ingest", f.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(counts(&s), (8, 8, 0));

    // The new catalog of `books`: 1-3 again and 7; 4-6 are gone.
    let mut input = lines(1..=3, "books");
    input.push_str(&line(7, "books", "new"));
    input.push('\n');
    let (r, v) = atomic_ingest(&s, &input, &["--replace-scope", "books"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(v["saga"]["state"], "done", "{v}");
    assert_eq!(v["saga"]["replaced_deleted"], 3, "{v}");
    assert_eq!(counts(&s), (6, 6, 0));
    let hits = all_hits(&s);
    let ids: Vec<&str> = hits.keys().map(String::as_str).collect();
    let want = [id(1), id(2), id(3), id(7), id(20), id(21)];
    assert_eq!(ids, want.iter().map(String::as_str).collect::<Vec<_>>());
    let r = s.embedded(&["verify", "--json"]);
    assert_eq!(r.json()["consistent"], true);

    // --replace-scope means nothing without --atomic: a usage error.
    let f = s.write("x.jsonl", &lines(1..=1, "books"));
    let r = s.embedded(&["ingest", f.to_str().unwrap(), "--replace-scope", "books"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
}

/// Deferred writes on the embedded stores: the ingest commits rows and
/// pending entries only; nothing is searchable and `verify` reports a backlog
/// (not drift) until `index-worker --until-idle` drains it; then both stores
/// agree exactly. A deferred update stays findable through its previous
/// vector until indexed.
#[test]
fn deferred_ingest_becomes_searchable_once_the_index_worker_drains_it() {
    let s = Sandbox::new();
    let f = s.write("in.jsonl", &lines(1..=6, "books"));
    let deferred = ["--write-mode", "deferred"];
    let mut args = vec!["ingest", f.to_str().unwrap(), "--batch-size", "4", "--json"];
    args.extend(deferred);
    let r = s.embedded(&args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["inserted"], 6);

    let r = s.embedded(&["stats", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = r.json();
    assert_eq!(
        (v["rows"].as_u64(), v["points"].as_u64()),
        (Some(6), Some(0))
    );
    assert_eq!(v["pending"]["pending"], 6, "{v}");

    let own = "[1, 3, 0.5, 0]";
    let r = s.embedded(&["search", "--vector", own, "-k", "6", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.json().as_array().unwrap().is_empty(),
        "a deferred insert was found before it was indexed: {}",
        r.stdout
    );
    let r = s.embedded(&["verify", "--json"]);
    assert_eq!(r.code, 1, "a backlog is not consistent yet: {}", r.stdout);
    let v = r.json();
    assert_eq!(v["pending_index"], 6);
    assert_eq!(v["unindexed"], 6);
    assert_eq!(v["missing_points"].as_array().map(Vec::len), Some(0), "{v}");

    let r = s.embedded(&["index-worker", "--until-idle", "--json"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_eq!(r.json()["indexed"], 6);
    assert_eq!(
        r.json()["pending"]["indexed_last_minute"],
        6,
        "{}",
        r.stdout
    );
    // The rate the store counts, seen by another process: every record the
    // worker switched in (the next command runs well within the minute).
    let r = s.embedded(&["stats", "--json"]);
    let v = r.json();
    assert_eq!(v["pending"]["pending"], 0, "{v}");
    assert_eq!(v["pending"]["indexed_last_minute"], 6, "{v}");
    let r = s.embedded(&["stats"]);
    assert!(
        r.stdout.contains("indexed in the last minute") && r.stdout.contains("0.1 records/s"),
        "{}",
        r.stdout
    );
    let r = s.embedded(&["search", "--vector", own, "-k", "1", "--json"]);
    assert_eq!(r.json()[0]["id"], id(3), "{}", r.stdout);
    let r = s.embedded(&["verify", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stdout);

    // A deferred update: found through its previous vector, as committed now.
    let update = json!({
        "id": id(3), "scope": "books", "content": "record 3, second edition",
        "vector": [-1.0, 0.2, 0.3, 0.9],
    })
    .to_string();
    let f = s.write("update.jsonl", &(update + "\n"));
    let mut args = vec!["ingest", f.to_str().unwrap(), "--json"];
    args.extend(deferred);
    assert_eq!(s.embedded(&args).code, 0);
    let r = s.embedded(&["search", "--vector", own, "-k", "1", "--json"]);
    let hit = &r.json()[0];
    assert_eq!(hit["id"], id(3));
    assert_eq!(hit["content"], "record 3, second edition", "{}", r.stdout);
    let r = s.embedded(&["index-worker", "--until-idle", "--json"]);
    assert_eq!((r.code, r.json()["indexed"].as_u64()), (0, Some(1)));
    let r = s.embedded(&[
        "search",
        "--vector",
        "[-1, 0.2, 0.3, 0.9]",
        "-k",
        "1",
        "--json",
    ]);
    assert_eq!(r.json()[0]["id"], id(3));
    let r = s.embedded(&["dlq", "list", "--json"]);
    assert_eq!(r.json()["dead_letters"].as_array().map(Vec::len), Some(0));
    // --wait-indexed with no worker running: the ingest succeeds, but its
    // records are not searchable in time — exit 1, saying so; a worker then
    // makes them so.
    let f = s.write("late.jsonl", &lines(20..=21, "books"));
    let mut args = vec![
        "ingest",
        f.to_str().unwrap(),
        "--wait-indexed",
        "300ms",
        "--json",
    ];
    args.extend(deferred);
    let r = s.embedded(&args);
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    let v = r.json();
    assert_eq!(
        (v["inserted"].as_u64(), v["wait_indexed"].as_str()),
        (Some(2), Some("timed_out"))
    );
    assert!(r.stderr.contains("not yet searchable"), "{}", r.stderr);
    assert_eq!(s.embedded(&["index-worker", "--until-idle"]).code, 0);
    let r = s.embedded(&["dlq", "retry"]);
    assert_eq!(r.code, 2, "retry needs ids or --all: {}", r.stderr);
}

/// A deferred write needs no index: with Qdrant unreachable, a deferred
/// ingest (SQLite for the metadata) commits every batch and exits 0, and the
/// backlog is visible without the index; a synchronous ingest of the same
/// stores fails, naming the index.
#[test]
fn deferred_ingest_works_while_the_index_is_unreachable() {
    let s = Sandbox::new();
    let f = s.write("in.jsonl", &lines(1..=5, "books"));
    let args = |mode: &'static str| {
        vec![
            "--qdrant-url".to_owned(),
            "http://127.0.0.1:1".to_owned(),
            "--data-dir".to_owned(),
            "d".to_owned(),
            "--dim".to_owned(),
            "4".to_owned(),
            "--write-mode".to_owned(),
            mode.to_owned(),
        ]
    };
    let out = tandem(s.path())
        .args(args("deferred"))
        .args(["ingest", f.to_str().unwrap(), "--batch-size", "2", "--json"])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let summary: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["inserted"], 5, "{summary}");
    let out = tandem(s.path())
        .args(args("deferred"))
        .args(["dlq", "list", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let out = tandem(s.path())
        .args(args("sync"))
        .args(["ingest", f.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "a synchronous write needs the index"
    );
}

// ---------------------------------------------------------------- reindex

/// `tandem reindex` on the embedded default: a rebuild into a new
/// collection, switched to; later processes (search, ingest, verify) follow
/// the switch; the retired collection is dropped; bad requests are typed
/// usage errors that write nothing.
#[test]
fn reindex_rebuilds_switches_and_every_later_process_follows() {
    let s = Sandbox::new();
    let input = s.write("in.jsonl", &lines(1..=30, "docs"));
    let r = s.embedded(&["ingest", input.to_str().unwrap()]);
    assert_eq!(r.code, 0, "ingest: {}", r.stderr);

    // A new dimension without an embedder is refused before anything.
    let r = s.embedded(&["reindex", "--to-collection", "v2", "--to-dim", "8"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("re-embed"), "{}", r.stderr);
    let r = s.embedded(&["reindex", "--status", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.json()["generation"],
        0,
        "a refused re-index changed the state"
    );

    let r = s.embedded(&["--json", "reindex", "--to-collection", "v2"]);
    assert_eq!(r.code, 0, "reindex: {}", r.stderr);
    let report = r.json();
    assert_eq!(report["switched"], true);
    assert_eq!(report["copied"], 30);
    assert_eq!(report["state"]["active"], "v2");
    assert_eq!(report["state"]["retired"], "tandem");
    // Progress went to stderr as JSON lines, ending with the switch.
    let phases: Vec<String> = r
        .stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["phase"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        phases.last().map(String::as_str),
        Some("switched"),
        "{}",
        r.stderr
    );
    assert!(phases.iter().any(|p| p == "copying"), "{phases:?}");

    // Another process: the same records, found through the new collection.
    assert_eq!(counts(&s), (30, 30, 0));
    let hits = s.embedded(&[
        "--json",
        "search",
        "--vector",
        "[1.0, 7.0, 0.5, 1.0]",
        "-k",
        "1",
    ]);
    assert_eq!(hits.code, 0, "{}", hits.stderr);
    assert_eq!(hits.json()[0]["id"], id(7), "{}", hits.stdout);
    // A write after the switch goes to the new collection.
    let more = s.write("more.jsonl", &lines(31..=35, "docs"));
    let r = s.embedded(&["ingest", more.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v = s.embedded(&["verify", "--json"]);
    assert_eq!(v.code, 0, "verify after the switch: {}", v.stdout);
    assert_eq!(counts(&s), (35, 35, 0));

    // Re-indexing into the active collection is refused.
    let r = s.embedded(&["reindex", "--to-collection", "v2"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let r = s.embedded(&["--json", "reindex", "--drop-retired"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["dropped"], "tandem");
    let r = s.embedded(&["reindex", "--status", "--json"]);
    assert_eq!(r.json()["retired"], serde_json::Value::Null, "{}", r.stdout);
    assert!(s.data_dir().join("collections").join("v2").is_dir());
    let v = s.embedded(&["verify", "--json"]);
    assert_eq!(v.code, 0, "verify after the drop: {}", v.stdout);
    // Later processes open the active collection directly: the dropped
    // configured one is not created again.
    assert!(
        !s.data_dir().join("index").exists(),
        "a process after the drop re-created the configured collection"
    );
    let r = s.embedded(&[
        "ingest",
        s.write("last.jsonl", &lines(36..=36, "docs"))
            .to_str()
            .unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(counts(&s), (36, 36, 0));
    assert!(!s.data_dir().join("index").exists());
}
