//! Support for the kill -9 crash campaign (`tests/tests/crash_campaign.rs`):
//! locating and running the `tandem` binary as a child process, killing it
//! with SIGKILL after a given delay, the Qdrant test server as a process,
//! reading the metadata store between runs, and the checks that every stored
//! record comes from the input.
//!
//! The `tandem` binary belongs to another package (`tandem-app`), so cargo
//! does not hand this package a `CARGO_BIN_EXE_tandem`. [`tandem_binary`]
//! builds it with the cargo that runs the tests (`cargo build -p tandem-app
//! --bin tandem --message-format=json-render-diagnostics`, same profile) and
//! takes the executable's path from cargo's `compiler-artifact` message,
//! rather than guessing `target/debug/tandem` (which a `CARGO_TARGET_DIR`, a
//! `--release` run or a cross target would move). `TANDEM_BIN` overrides it
//! with a prebuilt binary.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};
use tandem_core::{Intent, MetadataRepo, RecordId, SagaRecord, SagaState, Scope, StoredRecord};

/// Environment variables the `tandem` binary reads; cleared for every child
/// so that nothing from the developer's shell reaches the campaign.
const TANDEM_ENV: [&str; 7] = [
    "DATABASE_URL",
    "QDRANT_URL",
    "QDRANT_API_KEY",
    "TANDEM_CONFIG",
    "TANDEM_DATA_DIR",
    "TANDEM_METRICS_ADDR",
    "RUST_LOG",
];

/// The `tandem` executable: `TANDEM_BIN` if set, else built once per test
/// process with `cargo build -p tandem-app --bin tandem` (see the module docs).
/// Panics with cargo's diagnostics if the build fails.
pub fn tandem_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("TANDEM_BIN").filter(|b| !b.is_empty()) {
            let bin = PathBuf::from(bin);
            assert!(bin.is_file(), "TANDEM_BIN={} is not a file", bin.display());
            return bin;
        }
        build_tandem()
    })
    .clone()
}

fn build_tandem() -> PathBuf {
    // The cargo running the tests sets CARGO; env!("CARGO") is the one that
    // compiled this crate (the same, unless the test binary is run by hand).
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from(env!("CARGO")));
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent: the workspace root");
    let mut cmd = Command::new(cargo);
    // Cargo gives the test process this package's variables (CARGO_PKG_*,
    // CARGO_MANIFEST_DIR, ...). Some build scripts watch such variables
    // (ring's reruns when CARGO_MANIFEST_DIR changes), so passing them on
    // would rebuild half the dependency tree on every run and again for the
    // next ordinary build. Cargo's own configuration (CARGO_HOME,
    // CARGO_TARGET_DIR, CARGO_BUILD_*, ...) is kept.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let per_package = key == "OUT_DIR"
            || key == "CARGO_MANIFEST_DIR"
            || key == "CARGO_MANIFEST_PATH"
            || key == "CARGO_CRATE_NAME"
            || key == "CARGO_BIN_NAME"
            || key == "CARGO_PRIMARY_PACKAGE"
            || key == "CARGO_TARGET_TMPDIR"
            || key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_EXE_");
        if per_package {
            cmd.env_remove(key);
        }
    }
    cmd.current_dir(workspace).args([
        "build",
        "-p",
        "tandem-app",
        "--bin",
        "tandem",
        "--message-format=json-render-diagnostics",
    ]);
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    // Diagnostics (rendered) and progress go to our stderr; stdout carries
    // one JSON message per line.
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run cargo to build the tandem binary");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut executable = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read cargo's output");
        let Ok(msg) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact"
            && msg["target"]["name"] == "tandem"
            && msg["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"))
            && let Some(exe) = msg["executable"].as_str()
        {
            executable = Some(PathBuf::from(exe));
        }
    }
    let status = child.wait().expect("wait for cargo");
    assert!(
        status.success(),
        "`cargo build -p tandem-app --bin tandem` failed ({status}); see its output above"
    );
    executable.expect("cargo reported no executable for the tandem binary")
}

/// Milliseconds since the Unix epoch (the clock leases are written with).
pub fn now_ms() -> i64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970");
    i64::try_from(d.as_millis()).expect("fits in i64")
}

/// A finished (not killed) run of the binary.
#[derive(Debug)]
pub struct Finished {
    /// Its exit status.
    pub status: ExitStatus,
    /// Everything it printed on stdout.
    pub stdout: String,
    /// Everything it printed on stderr.
    pub stderr: String,
    /// Wall time.
    pub elapsed: Duration,
}

impl Finished {
    /// The exit code (`None` if a signal ended it).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Stdout parsed as the command's `--json` document. Panics (showing both
    /// streams) if it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}); exit {}\nstdout:\n{}\nstderr:\n{}",
                self.status, self.stdout, self.stderr
            )
        })
    }
}

/// What happened to a run that was to be killed.
#[derive(Debug)]
pub enum KillOutcome {
    /// SIGKILL ended it this long after it was started.
    Killed(Duration),
    /// It had exited on its own before the signal was due.
    Exited {
        /// Its exit status.
        status: ExitStatus,
        /// When it exited (at most a millisecond late).
        after: Duration,
        /// Its stdout (the `--json` document).
        stdout: String,
        /// Its stderr (for a failure message).
        stderr: String,
    },
}

/// The `tandem` binary bound to one pair of stores: the global options and
/// environment every command of a campaign gets.
#[derive(Clone, Debug)]
pub struct Tandem {
    bin: PathBuf,
    work_dir: PathBuf,
    global: Vec<OsString>,
    env: Vec<(String, String)>,
    runs: Arc<std::sync::atomic::AtomicUsize>,
}

impl Tandem {
    /// The binary run in `work_dir` (where killed runs' output files go too)
    /// with `global` options before every command and `env` set (everything
    /// else the binary reads from the environment is cleared).
    pub fn new(
        bin: PathBuf,
        work_dir: &Path,
        global: Vec<OsString>,
        env: Vec<(String, String)>,
    ) -> Self {
        std::fs::create_dir_all(work_dir.join("runs")).expect("create the runs directory");
        Self {
            bin,
            work_dir: work_dir.to_path_buf(),
            global,
            env,
            runs: Arc::default(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        for var in TANDEM_ENV {
            c.env_remove(var);
        }
        c.envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.work_dir)
            .args(&self.global)
            .args(args)
            .stdin(Stdio::null());
        c
    }

    /// Runs a command to its end.
    pub fn run(&self, args: &[&str]) -> Finished {
        let start = Instant::now();
        let out = self
            .command(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
        Finished {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed: start.elapsed(),
        }
    }

    /// Starts a command in the background; its output goes to files under
    /// `WORK_DIR/runs/`.
    pub fn spawn(&self, args: &[&str]) -> Spawned {
        let n = self.runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = self.work_dir.join("runs");
        let err_path = dir.join(format!("{n:04}.stderr"));
        let out_path = dir.join(format!("{n:04}.stdout"));
        let stdout = File::create(&out_path).expect("create stdout file");
        let stderr = File::create(&err_path).expect("create stderr file");
        let started = Instant::now();
        let child = self
            .command(args)
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
        Spawned {
            child,
            out_path,
            err_path,
            started,
        }
    }

    /// The same binary, directory and environment with other global options
    /// (e.g. another `--qdrant-url`).
    pub fn with_global(&self, global: Vec<OsString>) -> Self {
        Self {
            global,
            ..self.clone()
        }
    }

    /// Starts a command and sends it SIGKILL `delay` after the start, unless
    /// it exits first. Its output goes to files under `WORK_DIR/runs/` (a pipe
    /// nobody reads could block it, and a killed run's output is partial).
    pub fn run_killed(&self, args: &[&str], delay: Duration) -> KillOutcome {
        let n = self.runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = self.work_dir.join("runs");
        let err_path = dir.join(format!("{n:04}.stderr"));
        let out_path = dir.join(format!("{n:04}.stdout"));
        let stdout = File::create(&out_path).expect("create stdout file");
        let stderr = File::create(&err_path).expect("create stderr file");
        let start = Instant::now();
        let mut child: Child = self
            .command(args)
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
        loop {
            if let Some(status) = child.try_wait().expect("poll the child") {
                let after = start.elapsed();
                return KillOutcome::Exited {
                    status,
                    after,
                    stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
                    stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
                };
            }
            let elapsed = start.elapsed();
            if elapsed >= delay {
                // std's kill() is SIGKILL on Unix.
                child.kill().expect("send SIGKILL");
                let status = child.wait().expect("reap the killed child");
                return if status.signal() == Some(9) {
                    KillOutcome::Killed(elapsed)
                } else {
                    // It exited between the poll and the signal.
                    KillOutcome::Exited {
                        status,
                        after: elapsed,
                        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
                        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
                    }
                };
            }
            std::thread::sleep(Duration::from_millis(1).min(delay - elapsed));
        }
    }
}

/// A command started in the background ([`Tandem::spawn`]); killed (SIGKILL)
/// if dropped while it runs.
#[derive(Debug)]
pub struct Spawned {
    child: Child,
    out_path: PathBuf,
    err_path: PathBuf,
    started: Instant,
}

impl Spawned {
    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// How long ago it was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// What it printed on stderr so far.
    pub fn stderr_so_far(&self) -> String {
        std::fs::read_to_string(&self.err_path).unwrap_or_default()
    }

    /// Sends SIGKILL now, unless it already exited, and reaps it. Returns
    /// its end and whether the signal ended it (`false`: it had exited on
    /// its own first, with the status given).
    pub fn kill(mut self) -> (Finished, bool) {
        // std's kill() is SIGKILL on Unix; it fails only if the child was
        // already reaped, which wait() below reports either way.
        let _ = self.child.kill();
        let status = self.child.wait().expect("reap the killed child");
        let killed = status.signal() == Some(9);
        let finished = Finished {
            status,
            stdout: std::fs::read_to_string(&self.out_path).unwrap_or_default(),
            stderr: std::fs::read_to_string(&self.err_path).unwrap_or_default(),
            elapsed: self.started.elapsed(),
        };
        (finished, killed)
    }

    /// Waits for its end.
    pub fn wait(mut self) -> Finished {
        let status = self.child.wait().expect("wait for the command");
        Finished {
            status,
            stdout: std::fs::read_to_string(&self.out_path).unwrap_or_default(),
            stderr: std::fs::read_to_string(&self.err_path).unwrap_or_default(),
            elapsed: self.started.elapsed(),
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The `qdrant-double` binary running as its own process; killed when dropped.
#[derive(Debug)]
pub struct QdrantProcess {
    child: Child,
    url: String,
}

impl QdrantProcess {
    /// Starts `bin` (the `qdrant-double` executable) on a free port with its
    /// collections under `data_dir`, flushing every acknowledged write, and
    /// reads its URL from the line it prints once it accepts connections.
    pub fn start(bin: &Path, data_dir: &Path) -> Self {
        let mut child = Command::new(bin)
            .args(["--port", "0", "--flush", "every-write", "--data-dir"])
            .arg(data_dir)
            .env_remove("QDRANT_DOUBLE_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let mut this = Self {
            child,
            url: String::new(),
        };
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read qdrant-double's first line");
        this.url = line
            .trim()
            .strip_prefix("qdrant-double listening on ")
            .unwrap_or_else(|| panic!("qdrant-double did not start: first line {line:?}"))
            .to_owned();
        this
    }

    /// Its gRPC URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether it is still running (it must outlive every `tandem` kill).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for QdrantProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads the metadata store between runs of the binary (through the port, so
/// the same code serves SQLite and PostgreSQL).
#[derive(Clone)]
pub struct StoreReader {
    repo: Arc<dyn MetadataRepo>,
}

impl std::fmt::Debug for StoreReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreReader").finish_non_exhaustive()
    }
}

impl StoreReader {
    /// Reads through `repo`.
    pub fn new(repo: Arc<dyn MetadataRepo>) -> Self {
        Self { repo }
    }

    /// Every committed row, by id.
    pub async fn rows(&self) -> BTreeMap<RecordId, StoredRecord> {
        crate::invariants::rows(&self.repo)
            .await
            .unwrap_or_else(|e| panic!("reading the metadata store: {e}"))
    }

    /// The store's index state: the active collection and any open
    /// migration (its cursor, rows copied, lease and freeze).
    pub async fn index_state(&self) -> tandem_core::IndexState {
        self.repo
            .index_state()
            .await
            .unwrap_or_else(|e| panic!("reading the index state: {e}"))
    }

    /// The committed rows among `ids` (missing ids are absent).
    pub async fn get(&self, ids: &[RecordId]) -> Vec<StoredRecord> {
        self.repo
            .get(ids)
            .await
            .unwrap_or_else(|e| panic!("reading {} record(s): {e}", ids.len()))
    }

    /// How many rows are committed (one query).
    pub async fn row_count(&self) -> u64 {
        self.repo
            .count_by_scope()
            .await
            .unwrap_or_else(|e| panic!("counting rows: {e}"))
            .values()
            .sum()
    }

    /// How many deferred writes wait for an index worker (or are
    /// dead-lettered).
    pub async fn pending_entries(&self) -> u64 {
        let stats = self
            .repo
            .pending_stats(i64::MAX)
            .await
            .unwrap_or_else(|e| panic!("reading the pending entries: {e}"));
        stats.pending + stats.dead
    }

    /// The unresolved intents.
    pub async fn intents(&self) -> Vec<Intent> {
        self.repo
            .list_intents(100_000)
            .await
            .unwrap_or_else(|e| panic!("listing intents: {e}"))
    }

    /// How many of the batches `PREFIX:1..=batches` have their idempotency
    /// key recorded (= were committed).
    pub async fn committed_batches(&self, prefix: &str, batches: usize) -> usize {
        let mut n = 0;
        for b in 1..=batches {
            let key = format!("{prefix}:{b}");
            let found = self
                .repo
                .lookup_idempotency(&key)
                .await
                .unwrap_or_else(|e| panic!("looking up {key}: {e}"));
            n += usize::from(found.is_some());
        }
        n
    }

    /// Whether the idempotency key is recorded (its batch committed).
    pub async fn has_key(&self, key: &str) -> bool {
        self.repo
            .lookup_idempotency(key)
            .await
            .unwrap_or_else(|e| panic!("looking up {key}: {e}"))
            .is_some()
    }

    /// Waits until every unresolved intent's and unfinished saga's lease has
    /// ended (so that `tandem recover` may claim them all). Returns how many
    /// there are.
    pub async fn wait_for_leases(&self) -> usize {
        let intents = self.intents().await;
        let sagas = self.unfinished_sagas().await;
        let deadline = intents
            .iter()
            .map(|i| i.lease_deadline_ms)
            .chain(sagas.iter().map(|s| s.lease_deadline_ms))
            .max();
        if let Some(deadline) = deadline {
            // A little slack: the claim compares with its own reading of the clock.
            let wait = deadline + 25 - now_ms();
            if wait > 0 {
                tokio::time::sleep(Duration::from_millis(wait as u64)).await;
            }
        }
        intents.len() + sagas.len()
    }

    /// The sagas still running or compensating (recovery ends them after
    /// their lease).
    pub async fn unfinished_sagas(&self) -> Vec<SagaRecord> {
        let mut out = Vec::new();
        for state in [SagaState::Running, SagaState::Compensating] {
            out.extend(
                self.repo
                    .saga_list(Some(state), 100_000)
                    .await
                    .unwrap_or_else(|e| panic!("listing sagas: {e}")),
            );
        }
        out
    }

    /// Every saga, newest first.
    pub async fn sagas(&self) -> Vec<SagaRecord> {
        self.repo
            .saga_list(None, 100_000)
            .await
            .unwrap_or_else(|e| panic!("listing sagas: {e}"))
    }
}

/// One line of a JSON Lines input, as the campaign generated it. Its
/// metadata always carries `"input"` (the file's tag) and `"line"` (its
/// 1-based line number), so a stored record names the line it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct InputLine {
    /// The record id (`None`: the binary generates one).
    pub id: Option<RecordId>,
    /// The scope.
    pub scope: String,
    /// The text.
    pub content: String,
    /// The metadata (with `input` and `line`).
    pub metadata: Map<String, Value>,
    /// The vector.
    pub vector: Vec<f32>,
}

impl InputLine {
    /// The line as JSON (what `tandem ingest` reads).
    pub fn to_json(&self) -> String {
        let mut o = Map::new();
        if let Some(id) = self.id {
            o.insert("id".into(), Value::String(id.to_string()));
        }
        o.insert("scope".into(), Value::String(self.scope.clone()));
        o.insert("content".into(), Value::String(self.content.clone()));
        o.insert("metadata".into(), Value::Object(self.metadata.clone()));
        o.insert(
            "vector".into(),
            serde_json::to_value(&self.vector).expect("finite floats"),
        );
        Value::Object(o).to_string()
    }

    /// Whether `row` holds exactly this line's content (scope, text,
    /// metadata, and the vector if the store keeps vectors); `Err` says what
    /// differs.
    pub fn matches(&self, row: &StoredRecord) -> Result<(), String> {
        if let Some(id) = self.id
            && id != row.id
        {
            return Err(format!("its line belongs to record {id}"));
        }
        if row.scope.as_str() != self.scope {
            return Err(format!("scope {} ≠ input {}", row.scope, self.scope));
        }
        if row.content != self.content {
            return Err(format!(
                "content {:?} ≠ input {:?}",
                row.content, self.content
            ));
        }
        if row.metadata != self.metadata {
            return Err(format!(
                "metadata {} ≠ input {}",
                Value::Object(row.metadata.clone()),
                Value::Object(self.metadata.clone())
            ));
        }
        if let Some(v) = &row.vector
            && *v != self.vector
        {
            return Err("vector differs from the input's".into());
        }
        Ok(())
    }
}

/// One input file and the ingest options that go with it.
#[derive(Clone, Debug)]
pub struct InputFile {
    /// The tag (`metadata.input` of its lines) and idempotency prefix.
    pub tag: String,
    /// Where it was written.
    pub path: PathBuf,
    /// Its lines, in order (line n is `lines[n - 1]`).
    pub lines: Vec<InputLine>,
    /// Records per batch.
    pub batch_size: usize,
}

impl InputFile {
    /// Writes `lines` to `dir/TAG.jsonl`.
    pub fn write(dir: &Path, tag: &str, lines: Vec<InputLine>, batch_size: usize) -> Self {
        let path = dir.join(format!("{tag}.jsonl"));
        let mut f = std::io::BufWriter::new(File::create(&path).expect("create the input file"));
        for l in &lines {
            writeln!(f, "{}", l.to_json()).expect("write the input file");
        }
        f.flush().expect("write the input file");
        Self {
            tag: tag.to_owned(),
            path,
            lines,
            batch_size,
        }
    }

    /// Number of batches the ingest makes of it.
    pub fn batches(&self) -> usize {
        self.lines.len().div_ceil(self.batch_size)
    }

    /// Records the completed ingest must hold: one per distinct id (the last
    /// line with that id) plus one per line without an id.
    pub fn expected_records(&self) -> usize {
        let ids: HashSet<RecordId> = self.lines.iter().filter_map(|l| l.id).collect();
        ids.len() + self.lines.iter().filter(|l| l.id.is_none()).count()
    }

    /// Checks that `rows` hold this input completely ingested: every id with
    /// its *last* version, every id-less line exactly once, nothing else
    /// tagged with this input.
    pub fn check_complete(&self, rows: &BTreeMap<RecordId, StoredRecord>) -> Result<(), String> {
        let mut problems = Vec::new();
        let mut last: HashMap<RecordId, usize> = HashMap::new();
        for (i, l) in self.lines.iter().enumerate() {
            if let Some(id) = l.id {
                last.insert(id, i + 1);
            }
        }
        for (id, line) in &last {
            match rows.get(id) {
                None => problems.push(format!("record {id} (last at line {line}) is missing")),
                Some(row) => {
                    if let Err(e) = self.lines[line - 1].matches(row) {
                        problems.push(format!(
                            "record {id} is not at its last version (line {line}): {e}"
                        ));
                    }
                }
            }
        }
        let mine: Vec<&StoredRecord> = rows
            .values()
            .filter(|r| r.metadata.get("input").and_then(Value::as_str) == Some(self.tag.as_str()))
            .collect();
        let mut idless_seen: HashMap<u64, usize> = HashMap::new();
        for r in &mine {
            if !last.contains_key(&r.id) {
                let line = r.metadata.get("line").and_then(Value::as_u64).unwrap_or(0);
                *idless_seen.entry(line).or_default() += 1;
            }
        }
        for (i, l) in self.lines.iter().enumerate() {
            let line = i as u64 + 1;
            if l.id.is_none() {
                match idless_seen.get(&line).copied().unwrap_or(0) {
                    1 => {}
                    n => problems.push(format!("line {line} (no id) is stored {n} times")),
                }
            }
        }
        if mine.len() != self.expected_records() {
            problems.push(format!(
                "{} records carry input {:?}; the input has {} distinct records",
                mine.len(),
                self.tag,
                self.expected_records()
            ));
        }
        report(&format!("input {}", self.tag), problems)
    }
}

/// Every input a campaign has written, to check stored records against.
#[derive(Debug, Default)]
pub struct Inputs {
    lines: HashMap<(String, u64), InputLine>,
}

impl Inputs {
    /// Adds a file's lines.
    pub fn add(&mut self, file: &InputFile) {
        for (i, l) in file.lines.iter().enumerate() {
            self.lines
                .insert((file.tag.clone(), i as u64 + 1), l.clone());
        }
    }

    /// Checks that every stored record is one some input contained, holding
    /// exactly the content of one line (one version) the input gave it, and
    /// that no id-less line was stored twice.
    pub fn check_rows(&self, rows: &BTreeMap<RecordId, StoredRecord>) -> Result<(), String> {
        let mut problems = Vec::new();
        let mut idless: HashSet<(String, u64)> = HashSet::new();
        for row in rows.values() {
            let tag = row.metadata.get("input").and_then(Value::as_str);
            let line = row.metadata.get("line").and_then(Value::as_u64);
            let (Some(tag), Some(line)) = (tag, line) else {
                problems.push(format!(
                    "record {} names no input line (metadata {})",
                    row.id,
                    Value::Object(row.metadata.clone())
                ));
                continue;
            };
            let key = (tag.to_owned(), line);
            match self.lines.get(&key) {
                None => problems.push(format!(
                    "record {} claims {tag}:{line}, which no input has",
                    row.id
                )),
                Some(l) => {
                    if let Err(e) = l.matches(row) {
                        problems.push(format!("record {} vs {tag}:{line}: {e}", row.id));
                    }
                    if l.id.is_none() && !idless.insert(key) {
                        problems.push(format!(
                            "line {tag}:{line} (no id) is stored twice (duplicate)"
                        ));
                    }
                }
            }
        }
        report("stored records vs inputs", problems)
    }
}

fn report(what: &str, problems: Vec<String>) -> Result<(), String> {
    if problems.is_empty() {
        return Ok(());
    }
    let shown: Vec<&str> = problems.iter().take(10).map(String::as_str).collect();
    Err(format!(
        "{what}: {} problem(s):\n  {}",
        problems.len(),
        shown.join("\n  ")
    ))
}

/// Rows per scope, as `verify` should count them.
pub fn rows_per_scope(rows: &BTreeMap<RecordId, StoredRecord>) -> BTreeMap<Scope, u64> {
    let mut out = BTreeMap::new();
    for r in rows.values() {
        *out.entry(r.scope.clone()).or_default() += 1;
    }
    out
}

/// Checks a `tandem verify --json` document for the invariants that hold at
/// every instant, even before recovery: no row without its point (I1), no
/// point that neither a row references nor a live intent names (I2).
pub fn check_no_missing_no_orphans(verify: &Value) -> Result<(), String> {
    let missing = verify["missing_points"]
        .as_array()
        .map_or(usize::MAX, Vec::len);
    let orphans = verify["orphan_points"]
        .as_array()
        .map_or(usize::MAX, Vec::len);
    if missing == 0 && orphans == 0 {
        Ok(())
    } else {
        Err(format!(
            "{missing} missing point(s), {orphans} orphan point(s):\n{verify:#}"
        ))
    }
}

/// Checks a `tandem verify --json` document for exact equality after
/// recovery (I2's "points = referenced points exactly"): consistent, no
/// missing points, no orphans, no live intents, and per scope as many points
/// as rows, those rows being exactly `rows`.
pub fn check_exact(verify: &Value, rows: &BTreeMap<RecordId, StoredRecord>) -> Result<(), String> {
    check_no_missing_no_orphans(verify)?;
    let mut problems = Vec::new();
    if verify["consistent"] != Value::Bool(true) {
        problems.push("verify does not report consistent".to_owned());
    }
    if verify["live_intents"] != 0 || verify["intent_points"] != 0 {
        problems.push(format!(
            "{} live intent(s) naming {} point(s)",
            verify["live_intents"], verify["intent_points"]
        ));
    }
    let expected = rows_per_scope(rows);
    let scopes = verify["scopes"].as_object().cloned().unwrap_or_default();
    for (scope, counts) in &scopes {
        let want = expected
            .get(&Scope::new(scope.as_str()))
            .copied()
            .unwrap_or(0);
        if counts["rows"] != want || counts["points"] != want {
            problems.push(format!(
                "scope {scope}: verify counts {} rows / {} points; the store holds {want} rows",
                counts["rows"], counts["points"]
            ));
        }
    }
    for (scope, n) in &expected {
        if !scopes.contains_key(scope.as_str()) {
            problems.push(format!("scope {scope} ({n} rows) missing from verify"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("{}:\n{verify:#}", problems.join("; ")))
    }
}
