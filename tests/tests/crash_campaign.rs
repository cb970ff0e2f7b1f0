//! The kill -9 crash campaign: `tandem ingest`, `tandem delete` and `tandem
//! recover` run as real child processes and are killed with SIGKILL at random
//! moments, on the embedded stores (SQLite + qdrant-edge in a temporary data
//! directory) and on PostgreSQL (a schema of its own) + the Qdrant test server
//! (`qdrant-double`, its own process). After every kill:
//!
//! * `tandem verify --json` at once: no row without its point, no point that
//!   neither a row nor a live intent accounts for (I1, I2 at every instant);
//! * `tandem recover` (after the killed writer's lease), sometimes itself
//!   killed and re-run, then `tandem verify --json`: exact equality (no
//!   missing, no orphans, no live intents, rows = points per scope, and those
//!   counts are the store's);
//! * every stored record is one an input contained, with the content,
//!   metadata and vector of one line (one version) the input gave it, and no
//!   id-less line is stored twice;
//! * a killed delete removed all of its selection or none of it;
//! * re-running the interrupted ingest with the same `--idempotency-prefix`
//!   completes the input (every id at its last version, as many records as
//!   the input's distinct records), and a second re-run writes nothing;
//! * a killed `tandem ingest --atomic` (one durable saga whose steps are the
//!   batches; some of its lines update records of earlier atomic inputs)
//!   stands whole or not at all once `tandem recover` has ended its saga:
//!   either every record of the input is stored at the input's version, or
//!   none of its new records exists and every record it updated is back at
//!   its version from before the run; no saga is left running, none failed;
//! * a deferred ingest (`--write-mode deferred`: rows and pending entries,
//!   no index write) is indexed by `tandem index-worker --until-idle` runs
//!   killed at random moments (workers of 25-entry batches, so kills land
//!   before, between and after switches): right after each kill I1 in its
//!   deferred form and I2 hold; a worker run to the end then drains what the
//!   killed ones left once their claims end, and after recovery the stores
//!   agree exactly, every record of the input is at its last version, and a
//!   sample of them is found by `tandem search` at its own vector (no older
//!   version indexed over a newer one).
//!
//! Recovery may only claim an intent once its writer's lease has ended, so
//! the campaign's `tandem.toml` sets a short one (`[coordinator] lease_secs =
//! 0.8`, which the configuration accepts as it exceeds `call_deadline_secs +
//! cleanup_deadline_secs`); the campaign waits for the stored lease deadlines
//! before it recovers.
//!
//! The `tandem` binary belongs to `tandem-app`, so this package gets no
//! `CARGO_BIN_EXE_tandem`: `tandem_tests::campaign::tandem_binary` runs
//! `cargo build -p tandem-app --bin tandem` with the cargo running the tests
//! and takes the path from cargo's JSON messages (a no-op build when it is
//! up to date; `TANDEM_BIN` overrides).
//!
//! A third campaign kills **the Qdrant server itself**: a real single node
//! (see `tandem_tests::real_qdrant`) is SIGKILLed a few times while `tandem
//! ingest` writes to it, at random points of the ingest, and restarted on the
//! same storage. The ingest rides the outage out with its batch retries (or is
//! re-run with its prefix); every batch committed before a kill — whose points
//! Qdrant acknowledged — is still there afterwards, and after `tandem recover`
//! `tandem verify` is exact. Without a real server that test is reported as
//! ignored, with the reason.
//!
//! A fourth campaign kills **`tandem reindex`** (issue 14; support code in
//! `tandem_tests::reindex_campaign`): on PostgreSQL + the Qdrant test server,
//! 50,000 records are re-indexed into a collection of a new dimension,
//! re-embedded through the embedding test server with a new model, while two
//! writers (`tandem ingest` and `tandem delete` processes) write on; the
//! re-index is SIGKILLed at random moments spread over the copy and once in
//! the switch's catch-up, and re-run after each kill. After every kill the
//! old collection is active with the migration open and never behind, or the
//! new one is active: never a mix; re-runs continue the copy. Writers still
//! on the old model are refused after the switch and move to the new one;
//! afterwards `verify` is exact, the new collection holds one point of the
//! new dimension per record, and every write a writer saw committed is there.
//! `CRASH_CAMPAIGN_REINDEX_RECORDS=N` (default 50,000) and
//! `CRASH_CAMPAIGN_REINDEX_KILLS=N` (default 10) size it.
//!
//! The seed is printed; `CRASH_CAMPAIGN_SEED=N` replays the same data, delays
//! and choices (the outcomes still depend on timing).
//! `CRASH_CAMPAIGN_KILLS=N` sets the kills per backend (default 50: 26
//! ingest, 12 delete, 12 recover); `CRASH_CAMPAIGN_ATOMIC_KILLS=N` the kills
//! of `ingest --atomic` per backend on top (default 12);
//! `CRASH_CAMPAIGN_WORKER_KILLS=N` the kills of `tandem index-worker` per
//! backend on top (default 20).

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value, json};
use tandem_core::{IntentKind, PointId, RecordId, StoredRecord};
use tandem_tests::campaign::{
    Finished, InputFile, InputLine, Inputs, KillOutcome, QdrantProcess, StoreReader, Tandem,
    check_exact, check_no_missing_no_orphans, tandem_binary,
};
use tandem_tests::embed_server::EmbedServer;
use tandem_tests::pg::TestSchema;
use tandem_tests::real_qdrant::{Launcher, QdrantCluster};
use tandem_tests::reindex_campaign::{
    NEW_DIM, NEW_MODEL, OLD_MODEL, Phase, ReindexCampaign, Setup, Sizes,
};

/// Vector dimension of the campaign's collections.
const DIM: usize = 16;
/// Records per ingest batch.
const BATCH: usize = 20;
/// Lines per ingest input (12 batches).
const LINES: usize = 240;
/// Scopes of the ingest rounds.
const SCOPES: [&str; 3] = ["books", "music", "films"];
/// Lines per atomic ingest input (5 batches).
const ATOMIC_LINES: usize = 100;
/// Scopes of the atomic ingests.
const ATOMIC_SCOPES: [&str; 2] = ["atomic-a", "atomic-b"];
/// Scopes of the data set the deletes work on.
const DEL_SCOPES: [&str; 6] = ["del-a", "del-b", "del-c", "del-d", "del-e", "del-f"];
/// Items (metadata `item`) per delete scope: targets of `--where item=…`.
const ITEMS: usize = 8;
/// The delete data set is re-ingested when fewer rows than this are left.
const DEL_REFILL_BELOW: usize = 80;
/// The coordinator timings of every command: a short lease so recovery can
/// claim a killed writer's intents within a second.
const CONFIG: &str = "\
[coordinator]
lease_secs = 0.8
call_deadline_secs = 0.5
cleanup_deadline_secs = 0.2
orphan_grace_secs = 0.8

[indexing]
batch = 25
idle_poll_secs = 0.05
";

fn seed() -> u64 {
    match std::env::var("CRASH_CAMPAIGN_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("CRASH_CAMPAIGN_SEED={s:?} is not a number")),
        Err(_) => rand::rng().random(),
    }
}

/// Kills to reach, per kind, on one backend.
#[derive(Clone, Copy, Debug)]
struct Targets {
    ingest: usize,
    delete: usize,
    recover: usize,
    atomic: usize,
    worker: usize,
}

impl Targets {
    fn from_env() -> Self {
        let total: usize = match std::env::var("CRASH_CAMPAIGN_KILLS") {
            Ok(s) => s
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("CRASH_CAMPAIGN_KILLS={s:?} is not a number")),
            Err(_) => 50,
        };
        let atomic = match std::env::var("CRASH_CAMPAIGN_ATOMIC_KILLS") {
            Ok(s) => s
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("CRASH_CAMPAIGN_ATOMIC_KILLS={s:?} is not a number")),
            Err(_) => 12,
        };
        let worker = match std::env::var("CRASH_CAMPAIGN_WORKER_KILLS") {
            Ok(s) => s
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("CRASH_CAMPAIGN_WORKER_KILLS={s:?} is not a number")),
            Err(_) => 20,
        };
        let delete = total / 4;
        let recover = total / 4;
        Self {
            ingest: total - delete - recover,
            delete,
            recover,
            atomic,
            worker,
        }
    }

    fn total(&self) -> usize {
        self.ingest + self.delete + self.recover + self.atomic + self.worker
    }
}

/// Which command a kill hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Ingest,
    Delete,
    Recover,
    Atomic,
    Worker,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Ingest => "ingest",
            Kind::Delete => "delete",
            Kind::Recover => "recover",
            Kind::Atomic => "atomic",
            Kind::Worker => "index-worker",
        }
    }
}

/// What the campaign did, for the summary.
#[derive(Debug, Default)]
struct Tally {
    kills: BTreeMap<Kind, usize>,
    outcomes: BTreeMap<(Kind, &'static str), usize>,
    /// Runs that ended on their own before the signal was due.
    not_killed: BTreeMap<(Kind, String), usize>,
    /// Left by kills, found by `tandem recover` runs that finished.
    recovered_claimed: u64,
    recovered_resolved: u64,
    garbage_deleted: u64,
    recover_runs: usize,
    /// Intents a killed `recover` had resolved or claimed before it died.
    killed_recover_resolved: usize,
    killed_recover_claimed: usize,
    deletes_applied: usize,
    deletes_not_applied: usize,
    rounds_completed: usize,
    replays_checked: usize,
    verifies: usize,
    /// Uninterrupted commands that exited 3 (unavailable) and were re-run.
    exit3_retries: usize,
    /// Atomic ingests that stood whole / were undone, after recovery.
    atomic_whole: usize,
    atomic_undone: usize,
    /// Sagas that `recover` runs ended (done / compensated).
    sagas_done: u64,
    sagas_compensated: u64,
    /// Deferred inputs indexed to completion after worker kills, and the
    /// records whose index point was checked to hold their current vector.
    deferred_inputs: usize,
    ordering_checked: usize,
}

impl Tally {
    fn kill(&mut self, kind: Kind, outcome: &'static str) {
        *self.kills.entry(kind).or_default() += 1;
        *self.outcomes.entry((kind, outcome)).or_default() += 1;
    }

    fn kills(&self, kind: Kind) -> usize {
        self.kills.get(&kind).copied().unwrap_or(0)
    }

    fn total(&self) -> usize {
        self.kills.values().sum()
    }
}

/// Identity of the stored rows: which version of which record, on which point.
fn row_versions(rows: &BTreeMap<RecordId, StoredRecord>) -> BTreeMap<RecordId, (u64, PointId)> {
    rows.iter()
        .map(|(id, r)| (*id, (r.version, r.point_id)))
        .collect()
}

fn random_vector(rng: &mut StdRng) -> Vec<f32> {
    // Components in [0.05, 1) with a random sign: never the zero vector.
    (0..DIM)
        .map(|_| {
            let x: f32 = rng.random_range(0.05..1.0);
            if rng.random_bool(0.5) { x } else { -x }
        })
        .collect()
}

fn random_id(rng: &mut StdRng) -> RecordId {
    RecordId::from(uuid::Builder::from_random_bytes(rng.random()).into_uuid())
}

fn meta(v: Value) -> Map<String, Value> {
    v.as_object().cloned().expect("an object")
}

/// How a delete selects records.
#[derive(Clone, Debug)]
enum Selector {
    Ids(Vec<RecordId>),
    Scope(String),
    Item(String, String),
}

impl Selector {
    fn args(&self) -> Vec<String> {
        match self {
            Selector::Ids(ids) => vec![
                "--ids".into(),
                ids.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ],
            Selector::Scope(s) => vec!["--scope".into(), s.clone()],
            Selector::Item(s, item) => vec![
                "--scope".into(),
                s.clone(),
                "--where".into(),
                format!("item={item}"),
            ],
        }
    }

    fn selects(&self, r: &StoredRecord) -> bool {
        match self {
            Selector::Ids(ids) => ids.contains(&r.id),
            Selector::Scope(s) => r.scope.as_str() == s,
            Selector::Item(s, item) => {
                r.scope.as_str() == s
                    && r.metadata.get("item").and_then(Value::as_str) == Some(item.as_str())
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Selector::Ids(ids) => format!("--ids ({} ids)", ids.len()),
            Selector::Scope(s) => format!("--scope {s}"),
            Selector::Item(s, item) => format!("--scope {s} --where item={item}"),
        }
    }
}

/// The ingest input being worked on and how many kills it may take.
struct Round {
    file: InputFile,
    kills: usize,
    max_kills: usize,
}

/// One backend's campaign.
struct Campaign {
    label: &'static str,
    rt: Arc<tokio::runtime::Runtime>,
    cli: Tandem,
    store: StoreReader,
    rng: StdRng,
    dir: PathBuf,
    targets: Targets,
    inputs: Inputs,
    tally: Tally,
    round: Option<Round>,
    rounds: usize,
    del_ids: Vec<RecordId>,
    del_gen: usize,
    /// Kill delays are drawn uniformly from [0, window) ([0.35 window,
    /// window) for `recover`): about the length of an uninterrupted run of
    /// the same command, measured on this backend.
    ingest_window: Duration,
    delete_window: Duration,
    recover_window: Duration,
    atomic_window: Duration,
    worker_window: Duration,
    atomic_rounds: usize,
    kills_since_recovery: usize,
    started: Instant,
}

impl Campaign {
    fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    fn say(&self, line: &str) {
        println!("[{}] {line}", self.label);
    }

    fn fail(&self, what: &str) -> ! {
        panic!("[{}] {what}", self.label)
    }

    fn rows(&self) -> BTreeMap<RecordId, StoredRecord> {
        self.block_on(self.store.rows())
    }

    /// A command that must succeed. Exit code 3 (a store stayed unavailable
    /// or the call deadline passed: nothing of the failing call applied) is
    /// retried as the documentation says, a few times.
    fn run_ok(&mut self, args: &[&str]) -> Finished {
        for attempt in 1..=4 {
            let out = self.cli.run(args);
            match out.code() {
                Some(0) => return out,
                Some(3) if attempt < 4 => {
                    self.say(&format!(
                        "`tandem {}` exited 3 (unavailable), retrying: {}",
                        args.join(" "),
                        out.stderr.trim()
                    ));
                    self.tally.exit3_retries += 1;
                }
                _ => self.fail(&format!(
                    "`tandem {}` failed: exit {}\nstdout:\n{}\nstderr:\n{}",
                    args.join(" "),
                    out.status,
                    out.stdout,
                    out.stderr
                )),
            }
        }
        unreachable!("the last attempt returns or fails")
    }

    fn ingest_args(file: &InputFile) -> Vec<String> {
        vec![
            "ingest".into(),
            file.path.display().to_string(),
            "--batch-size".into(),
            file.batch_size.to_string(),
            "--idempotency-prefix".into(),
            file.tag.clone(),
        ]
    }

    fn delay(&mut self, window: Duration) -> Duration {
        Duration::from_secs_f64(self.rng.random_range(0.0..window.as_secs_f64()))
    }

    /// `tandem verify --json` right after a kill, before any recovery.
    fn check_instant(&mut self, after: &str) {
        let out = self.cli.run(&["verify"]);
        if !matches!(out.code(), Some(0 | 1)) {
            self.fail(&format!(
                "verify after {after} failed: exit {}\n{}",
                out.status, out.stderr
            ));
        }
        self.tally.verifies += 1;
        if let Err(e) = check_no_missing_no_orphans(&out.json()) {
            self.fail(&format!("right after {after}, before recovery: {e}"));
        }
    }

    /// Recovers everything the kills left (sometimes killing `recover`
    /// itself first), then checks exact equality and that every stored
    /// record comes from an input. Returns the rows.
    fn recover_and_check(&mut self) -> BTreeMap<RecordId, StoredRecord> {
        let undone_sagas = !self.block_on(self.store.unfinished_sagas()).is_empty();
        let rows_before = self.rows();
        let mut killed_here = 0;
        loop {
            let pending = self.block_on(self.store.wait_for_leases());
            if pending == 0 {
                break;
            }
            let kill_it = self.tally.kills(Kind::Recover) < self.targets.recover
                && killed_here < 3
                && self.rng.random_bool(0.85);
            if kill_it {
                killed_here += 1;
                self.kill_recover();
                continue;
            }
            let out = self.run_ok(&["recover"]);
            self.recovered(&out.json(), &out.stderr, out.elapsed, "");
        }
        let out = self.cli.run(&["verify"]);
        self.tally.verifies += 1;
        let rows = self.rows();
        let verify = out.json();
        if out.code() != Some(0) {
            self.fail(&format!(
                "verify after recovery: exit {}\n{verify:#}",
                out.status
            ));
        }
        if let Err(e) = check_exact(&verify, &rows) {
            self.fail(&format!("after recovery: {e}"));
        }
        if let Err(e) = self.inputs.check_rows(&rows) {
            self.fail(&e);
        }
        let unfinished = self.block_on(self.store.unfinished_sagas());
        if !unfinished.is_empty() {
            self.fail(&format!(
                "after recovery {} saga(s) are still unfinished: {:?}",
                unfinished.len(),
                unfinished
                    .iter()
                    .map(|s| (s.id, s.state))
                    .collect::<Vec<_>>()
            ));
        }
        // Recovery deletes garbage points and undoes the steps of an
        // unfinished saga; it never changes any other row.
        let outside = |rows: &BTreeMap<RecordId, StoredRecord>| {
            let mut v = row_versions(rows);
            if undone_sagas {
                v.retain(|id, _| !rows[id].scope.as_str().starts_with("atomic-"));
            }
            v
        };
        if outside(&rows) != outside(&rows_before) {
            self.fail("recovery changed committed rows");
        }
        self.kills_since_recovery = 0;
        rows
    }

    /// Checks and counts what a finished `tandem recover --json` did.
    fn recovered(&mut self, j: &Value, stderr: &str, took: Duration, note: &str) {
        if j["failed"] != 0 || j["pending_intents"] != 0 || j["sagas_failed"] != 0 {
            self.fail(&format!(
                "recover left work behind: {j:#}\nstderr:\n{stderr}"
            ));
        }
        let claimed = j["claimed"].as_u64().unwrap_or(0);
        self.tally.recover_runs += 1;
        self.tally.recovered_claimed += claimed;
        self.tally.recovered_resolved += j["resolved"].as_u64().unwrap_or(0);
        self.tally.garbage_deleted += j["points_deleted"].as_u64().unwrap_or(0);
        self.tally.sagas_done += j["sagas_done"].as_u64().unwrap_or(0);
        self.tally.sagas_compensated += j["sagas_compensated"].as_u64().unwrap_or(0);
        self.say(&format!(
            "    recover{note}: {claimed} intent(s) claimed, {} resolved, {} garbage point(s) deleted ({} ms)",
            j["resolved"],
            j["points_deleted"],
            took.as_millis()
        ));
        if claimed > 0 {
            // Aim the next recover kills within a run with work to do: a
            // running average of such runs' length.
            let avg = (self.recover_window + took) / 2;
            self.recover_window = avg.clamp(Duration::from_millis(100), Duration::from_secs(2));
        }
    }

    /// One `tandem recover` run, killed at a random moment; there are
    /// intents and their leases have ended.
    fn kill_recover(&mut self) {
        let before = self.block_on(self.store.intents());
        let sagas_before = !self.block_on(self.store.unfinished_sagas()).is_empty();
        // A recover run spends its first third or so starting up (opening
        // the stores): draw from the rest, where it claims and cleans.
        let w = self.recover_window.as_secs_f64();
        let delay = Duration::from_secs_f64(self.rng.random_range(0.35 * w..w));
        match self.cli.run_killed(&["recover"], delay) {
            KillOutcome::Exited {
                status,
                after,
                stdout,
                stderr,
            } => {
                if status.code() != Some(0) {
                    self.fail(&format!("recover failed on its own: {status}\n{stderr}"));
                }
                *self
                    .tally
                    .not_killed
                    .entry((Kind::Recover, "finished before the signal".into()))
                    .or_default() += 1;
                let j: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
                    self.fail(&format!("recover printed no JSON ({e}):\n{stdout}"))
                });
                let note = format!(
                    " (finished before the signal due at {} ms)",
                    delay.as_millis()
                );
                self.recovered(&j, &stderr, after, &note);
            }
            KillOutcome::Killed(at) => {
                let after = self.block_on(self.store.intents());
                let left: BTreeMap<_, _> = after.iter().map(|i| (i.id, i)).collect();
                let resolved = before.iter().filter(|i| !left.contains_key(&i.id)).count();
                let claimed = before
                    .iter()
                    .filter(|i| left.get(&i.id).is_some_and(|a| a.owner != i.owner))
                    .count();
                // Compensating a saga writes new intents (its undo
                // transactions); otherwise recovery only resolves.
                if !sagas_before && after.len() > before.len() - resolved {
                    self.fail("a killed recover created intents");
                }
                let outcome = if resolved == 0 && claimed == 0 {
                    "killed before claiming anything"
                } else if resolved == before.len() {
                    "killed after resolving every intent"
                } else {
                    "killed mid-run"
                };
                self.tally.kill(Kind::Recover, outcome);
                self.tally.killed_recover_resolved += resolved;
                self.tally.killed_recover_claimed += claimed;
                self.check_instant("a killed recover");
                self.say(&format!(
                    "kill {:>3}: recover at {:>4} ms: {outcome} ({} of {} intent(s) resolved, {} claimed and left)",
                    self.tally.total(),
                    at.as_millis(),
                    resolved,
                    before.len(),
                    claimed
                ));
            }
        }
    }

    /// Decides whether to recover now or let the next kill pile more work
    /// onto one recovery (up to three kills).
    fn maybe_recover(&mut self) {
        self.kills_since_recovery += 1;
        // Piling up work makes the recover runs (and their kills) longer.
        let defer = if self.tally.kills(Kind::Recover) < self.targets.recover {
            0.5
        } else {
            0.3
        };
        if self.kills_since_recovery >= 3 || !self.rng.random_bool(defer) {
            self.recover_and_check();
        }
    }

    /// A fresh ingest input: new ids, some lines without an id, and from the
    /// third batch on some updates of ids from earlier batches.
    fn new_round(&mut self) -> Round {
        self.rounds += 1;
        let tag = format!("r{}", self.rounds);
        let mut lines: Vec<InputLine> = Vec::with_capacity(LINES);
        let mut earlier: Vec<(RecordId, &'static str)> = Vec::new();
        for b in 0..LINES / BATCH {
            let mut in_batch: HashSet<RecordId> = HashSet::new();
            let mut fresh = Vec::new();
            for _ in 0..BATCH {
                let n = lines.len() + 1;
                let roll: f64 = self.rng.random();
                let update = if b >= 2 && roll < 0.25 {
                    // An id of an earlier batch, at most once per batch.
                    (0..8)
                        .filter_map(|_| earlier.choose(&mut self.rng).copied())
                        .find(|(id, _)| !in_batch.contains(id))
                } else {
                    None
                };
                let (id, scope) = match update {
                    Some((id, scope)) => (Some(id), scope),
                    None if roll < 0.33 => (None, *SCOPES.choose(&mut self.rng).unwrap()),
                    None => {
                        let id = random_id(&mut self.rng);
                        let scope = *SCOPES.choose(&mut self.rng).unwrap();
                        fresh.push((id, scope));
                        (Some(id), scope)
                    }
                };
                if let Some(id) = id {
                    in_batch.insert(id);
                }
                let item = format!("i{}", self.rng.random_range(0..ITEMS));
                lines.push(InputLine {
                    id,
                    scope: scope.to_owned(),
                    content: format!("{tag} line {n}: {scope} record, version {b}"),
                    metadata: meta(json!({"input": tag, "line": n, "item": item})),
                    vector: random_vector(&mut self.rng),
                });
            }
            earlier.extend(fresh);
        }
        let file = InputFile::write(&self.dir, &tag, lines, BATCH);
        self.inputs.add(&file);
        Round {
            file,
            kills: 0,
            max_kills: self.rng.random_range(1..=4),
        }
    }

    /// The delete data set, generation `gen`: the same ids every time, new
    /// contents and vectors.
    fn del_input(&mut self, generation: usize) -> InputFile {
        let tag = format!("del-g{generation}");
        let ids = self.del_ids.clone();
        let lines = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let scope = DEL_SCOPES[i % DEL_SCOPES.len()];
                let item = format!("i{}", (i / DEL_SCOPES.len()) % ITEMS);
                InputLine {
                    id: Some(*id),
                    scope: scope.to_owned(),
                    content: format!("{tag}: record {i} of {scope}, {item}"),
                    metadata: meta(json!({"input": tag, "line": i + 1, "item": item})),
                    vector: random_vector(&mut self.rng),
                }
            })
            .collect();
        let file = InputFile::write(&self.dir, &tag, lines, BATCH);
        self.inputs.add(&file);
        file
    }

    /// Ingests `file` to its end (no kill), then checks it completely stored,
    /// and that a second run writes nothing.
    fn ingest_to_completion(&mut self, file: &InputFile) -> Duration {
        let args = Self::ingest_args(file);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.run_ok(&args);
        let j = out.json();
        if j["ok"] != true
            || j["batches_committed"].as_u64().unwrap_or(0)
                + j["batches_replayed"].as_u64().unwrap_or(0)
                != file.batches() as u64
        {
            self.fail(&format!("ingest of {} did not complete: {j:#}", file.tag));
        }
        let rows = self.recover_and_check();
        if let Err(e) = file.check_complete(&rows) {
            self.fail(&format!("after re-running ingest to completion: {e}"));
        }
        // The same ingest once more: everything is replayed, nothing written.
        let again = self.run_ok(&args).json();
        let nothing_written = again["ok"] == true
            && again["batches_committed"] == 0
            && again["batches_replayed"] == file.batches() as u64
            && again["inserted"] == 0
            && again["updated"] == 0;
        if !nothing_written {
            self.fail(&format!(
                "re-running the completed ingest {} wrote something: {again:#}",
                file.tag
            ));
        }
        let rows_again = self.rows();
        if row_versions(&rows_again) != row_versions(&rows) {
            self.fail("the replayed ingest changed stored rows");
        }
        self.tally.replays_checked += 1;
        out.elapsed
    }

    /// One `tandem ingest` of the current round, killed at a random moment.
    fn ingest_step(&mut self) {
        let mut round = match self.round.take() {
            Some(r) => r,
            None => self.new_round(),
        };
        let batches = round.file.batches();
        let tag = round.file.tag.clone();
        let before = self.block_on(self.store.committed_batches(&tag, batches));
        let delay = self.delay(self.ingest_window);
        let args = Self::ingest_args(&round.file);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        match self.cli.run_killed(&args, delay) {
            KillOutcome::Exited {
                status,
                after,
                stderr,
                ..
            } => {
                let what = match status.code() {
                    Some(0) => "finished before the signal".to_owned(),
                    // Nothing of the failing batch applied; a re-run continues.
                    Some(3) => "exited 3 (store unavailable / deadline) on its own".to_owned(),
                    _ => self.fail(&format!(
                        "ingest {tag} failed on its own: {status}\n{stderr}"
                    )),
                };
                self.say(&format!(
                    "    ingest {tag} {what} ({} ms, signal due at {} ms)",
                    after.as_millis(),
                    delay.as_millis()
                ));
                *self
                    .tally
                    .not_killed
                    .entry((Kind::Ingest, what))
                    .or_default() += 1;
                if status.code() == Some(0) {
                    self.complete_round(round);
                } else {
                    self.round = Some(round);
                }
            }
            KillOutcome::Killed(at) => {
                let after = self.block_on(self.store.committed_batches(&tag, batches));
                let live = self.block_on(self.store.intents()).len();
                let outcome = if after == before {
                    "killed before any commit"
                } else if after == batches {
                    "killed after the last commit"
                } else {
                    "killed mid-run"
                };
                self.tally.kill(Kind::Ingest, outcome);
                self.say(&format!(
                    "kill {:>3}: ingest {tag} at {:>4} ms: {outcome} (batches committed {before} → {after} of {batches}; {live} live intent(s))",
                    self.tally.total(),
                    at.as_millis()
                ));
                self.check_instant("a killed ingest");
                round.kills += 1;
                if round.kills >= round.max_kills || after == batches {
                    self.complete_round(round);
                } else {
                    self.maybe_recover();
                    self.round = Some(round);
                }
            }
        }
    }

    /// Re-runs the round's ingest with the same prefix to its end.
    fn complete_round(&mut self, round: Round) {
        self.ingest_to_completion(&round.file);
        self.tally.rounds_completed += 1;
        self.say(&format!(
            "    ingest {} completed by re-running it after {} kill(s): {} records, second re-run wrote nothing",
            round.file.tag,
            round.kills,
            round.file.expected_records()
        ));
    }

    /// Loads a new generation of the delete data set (no kill).
    fn refill_delete_set(&mut self) -> Duration {
        self.del_gen += 1;
        let file = self.del_input(self.del_gen);
        let took = self.ingest_to_completion(&file);
        self.say(&format!(
            "    delete data set generation {} loaded ({} records, {} ms)",
            self.del_gen,
            file.lines.len(),
            took.as_millis()
        ));
        took
    }

    fn pick_selector(&mut self, rows: &BTreeMap<RecordId, StoredRecord>) -> Selector {
        let del: Vec<&StoredRecord> = rows
            .values()
            .filter(|r| r.scope.as_str().starts_with("del-"))
            .collect();
        let roll = self.rng.random_range(0..10);
        if roll < 4 {
            let k = self.rng.random_range(1..=12).min(del.len());
            let mut ids: Vec<RecordId> = del
                .choose_multiple(&mut self.rng, k)
                .map(|r| r.id)
                .collect();
            if self.rng.random_bool(0.3) {
                // An id that was never stored: ignored.
                ids.push(random_id(&mut self.rng));
            }
            Selector::Ids(ids)
        } else if roll < 6 {
            let r = del.choose(&mut self.rng).expect("delete rows exist");
            Selector::Scope(r.scope.to_string())
        } else {
            let r = del.choose(&mut self.rng).expect("delete rows exist");
            let item = r.metadata["item"].as_str().expect("item").to_owned();
            Selector::Item(r.scope.to_string(), item)
        }
    }

    /// One `tandem delete`, killed at a random moment: all of its selection
    /// is deleted or none of it, before and after recovery.
    fn delete_step(&mut self) {
        let mut rows = self.rows();
        let del_rows = rows
            .values()
            .filter(|r| r.scope.as_str().starts_with("del-"))
            .count();
        if del_rows < DEL_REFILL_BELOW {
            self.refill_delete_set();
            rows = self.rows();
        }
        let selector = self.pick_selector(&rows);
        let pre = row_versions(&rows);
        let mut applied_state = pre.clone();
        applied_state.retain(|id, _| !selector.selects(&rows[id]));
        let selected = pre.len() - applied_state.len();
        let intents_before: HashSet<_> = self
            .block_on(self.store.intents())
            .iter()
            .map(|i| i.id)
            .collect();
        let delay = self.delay(self.delete_window);
        let mut args = vec!["delete".to_owned()];
        args.extend(selector.args());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let result = self.cli.run_killed(&args, delay);
        let post = row_versions(&self.rows());
        let applied = if post == pre && selected > 0 {
            false
        } else if post == applied_state {
            true
        } else {
            self.fail(&format!(
                "delete {} (selecting {selected} of {} rows) was not all-or-nothing: {} rows left",
                selector.describe(),
                pre.len(),
                post.len()
            ))
        };
        match result {
            KillOutcome::Exited {
                status,
                after,
                stderr,
                ..
            } => {
                if status.code() != Some(0) || !applied {
                    self.fail(&format!(
                        "delete {} exited {status} without the kill (applied: {applied})\n{stderr}",
                        selector.describe()
                    ));
                }
                // Move the window towards the length of a whole delete.
                self.delete_window = (self.delete_window + after) / 2;
                *self
                    .tally
                    .not_killed
                    .entry((Kind::Delete, "finished before the signal".into()))
                    .or_default() += 1;
                self.say(&format!(
                    "    delete {} finished before the signal ({} ms): {selected} deleted",
                    selector.describe(),
                    after.as_millis()
                ));
                self.tally.deletes_applied += 1;
                self.recover_and_check();
            }
            KillOutcome::Killed(at) => {
                let pending_delete = self
                    .block_on(self.store.intents())
                    .iter()
                    .any(|i| i.kind == IntentKind::Delete && !intents_before.contains(&i.id));
                let outcome = match (applied, pending_delete) {
                    (false, _) => "killed before the commit: nothing deleted",
                    (true, true) => "killed after the commit: index cleanup left to recovery",
                    (true, false) => "killed after completion",
                };
                if applied {
                    self.tally.deletes_applied += 1;
                } else {
                    self.tally.deletes_not_applied += 1;
                }
                self.tally.kill(Kind::Delete, outcome);
                self.say(&format!(
                    "kill {:>3}: delete {} at {:>4} ms: {outcome} ({selected} selected)",
                    self.tally.total(),
                    selector.describe(),
                    at.as_millis()
                ));
                self.check_instant("a killed delete");
                self.maybe_recover();
            }
        }
    }

    /// A fresh atomic input: new ids, some lines without an id, and updates
    /// (once each) of records earlier atomic inputs left standing.
    fn new_atomic_input(&mut self, rows: &BTreeMap<RecordId, StoredRecord>) -> InputFile {
        self.atomic_rounds += 1;
        let tag = format!("a{}", self.atomic_rounds);
        let mut standing: Vec<(RecordId, String)> = rows
            .values()
            .filter(|r| r.scope.as_str().starts_with("atomic-"))
            .map(|r| (r.id, r.scope.to_string()))
            .collect();
        let mut lines = Vec::with_capacity(ATOMIC_LINES);
        for n in 1..=ATOMIC_LINES {
            let roll: f64 = self.rng.random();
            let (id, scope) = if roll < 0.25 && !standing.is_empty() {
                let i = self.rng.random_range(0..standing.len());
                let (id, scope) = standing.swap_remove(i);
                (Some(id), scope)
            } else if roll < 0.4 {
                (
                    None,
                    (*ATOMIC_SCOPES.choose(&mut self.rng).unwrap()).to_owned(),
                )
            } else {
                let scope = *ATOMIC_SCOPES.choose(&mut self.rng).unwrap();
                (Some(random_id(&mut self.rng)), scope.to_owned())
            };
            lines.push(InputLine {
                id,
                content: format!("{tag} line {n}: {scope} record"),
                metadata: meta(json!({"input": tag, "line": n, "item": "atomic"})),
                scope,
                vector: random_vector(&mut self.rng),
            });
        }
        let file = InputFile::write(&self.dir, &tag, lines, BATCH);
        self.inputs.add(&file);
        file
    }

    /// One `tandem ingest --atomic`, killed at a random moment (or, with
    /// `calibrate`, not at all, measuring the kill window), then recovered:
    /// the input stands whole or not at all.
    fn atomic_step(&mut self, calibrate: bool) {
        let before = self.rows();
        let file = self.new_atomic_input(&before);
        let tag = file.tag.clone();
        let delay = if calibrate {
            Duration::from_secs(120)
        } else {
            self.delay(self.atomic_window)
        };
        let path = file.path.display().to_string();
        let batch = file.batch_size.to_string();
        let args = ["ingest", &path, "--batch-size", &batch, "--atomic"];
        let outcome = match self.cli.run_killed(&args, delay) {
            KillOutcome::Exited {
                status,
                after,
                stdout,
                stderr,
            } => {
                if status.code() != Some(0) {
                    self.fail(&format!(
                        "atomic ingest {tag} failed on its own: {status}\n{stdout}\n{stderr}"
                    ));
                }
                self.atomic_window = if calibrate {
                    after.mul_f64(1.1)
                } else {
                    (self.atomic_window + after) / 2
                };
                *self
                    .tally
                    .not_killed
                    .entry((Kind::Atomic, "finished before the signal".into()))
                    .or_default() += 1;
                self.say(&format!(
                    "    atomic ingest {tag} finished before the signal ({} ms)",
                    after.as_millis()
                ));
                None
            }
            KillOutcome::Killed(at) => {
                let sagas = self.block_on(self.store.unfinished_sagas()).len();
                let tagged = self
                    .rows()
                    .values()
                    .filter(|r| r.metadata.get("input") == Some(&json!(tag)))
                    .count();
                self.check_instant("a killed atomic ingest");
                Some((at, sagas, tagged))
            }
        };
        let after = self.recover_and_check();
        let tagged = after
            .values()
            .filter(|r| r.metadata.get("input") == Some(&json!(tag)))
            .count();
        let whole = if tagged == 0 {
            // Undone: every record it updated is back as it was; its new
            // records are gone.
            for line in &file.lines {
                let Some(id) = line.id else { continue };
                let now = after.get(&id).map(|r| (&r.scope, &r.content, &r.metadata));
                let was = before.get(&id).map(|r| (&r.scope, &r.content, &r.metadata));
                if now != was {
                    self.fail(&format!(
                        "atomic ingest {tag} was undone, but record {id} is not as before it: {now:?} ≠ {was:?}"
                    ));
                }
            }
            false
        } else {
            if let Err(e) = file.check_complete(&after) {
                self.fail(&format!(
                    "atomic ingest {tag} is neither whole nor undone ({tagged} of {} records): {e}",
                    file.expected_records()
                ));
            }
            true
        };
        // Records it did not touch are as they were.
        let untouched = |rows: &BTreeMap<RecordId, StoredRecord>| {
            let touched: HashSet<RecordId> = file.lines.iter().filter_map(|l| l.id).collect();
            rows.iter()
                .filter(|(id, r)| {
                    !touched.contains(id) && r.metadata.get("input") != Some(&json!(tag))
                })
                .map(|(id, r)| (*id, (r.version, r.point_id)))
                .collect::<BTreeMap<_, _>>()
        };
        if untouched(&after) != untouched(&before) {
            self.fail(&format!(
                "atomic ingest {tag} changed records it did not name"
            ));
        }
        if whole {
            self.tally.atomic_whole += 1;
        } else {
            self.tally.atomic_undone += 1;
        }
        match outcome {
            None if !whole => {
                self.fail(&format!("atomic ingest {tag} exited 0 but does not stand"))
            }
            None => {}
            Some((at, sagas, tagged_at_kill)) => {
                let what = match (whole, tagged_at_kill) {
                    (true, _) => "killed after its saga ended: stands whole",
                    (false, 0) => "killed before any batch committed: nothing stands",
                    (false, _) => "killed mid-run: undone by recovery",
                };
                self.tally.kill(Kind::Atomic, what);
                self.say(&format!(
                    "kill {:>3}: atomic ingest {tag} at {:>4} ms: {what} ({tagged_at_kill} of its records stood at the kill, {sagas} saga(s) unfinished)",
                    self.tally.total(),
                    at.as_millis()
                ));
            }
        }
    }

    /// A fresh input ingested in deferred mode (rows and pending entries
    /// only), then `tandem index-worker --until-idle` killed at random
    /// moments (or, with `calibrate`, run once uninterrupted to measure the
    /// kill window), each kill checked at once (I1 in its deferred form, I2);
    /// then a worker drains what is left, recovery runs, and both stores must
    /// agree exactly, with every record of the input at its last version and
    /// — sampled through `tandem search` — found at its own vector: no older
    /// version indexed over a newer one.
    fn worker_step(&mut self, calibrate: bool) {
        let round = self.new_round();
        let file = round.file;
        let mut args = Self::ingest_args(&file);
        args.extend(["--write-mode".to_owned(), "deferred".to_owned()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let j = self.run_ok(&args).json();
        if j["ok"] != true {
            self.fail(&format!("deferred ingest of {} failed: {j:#}", file.tag));
        }
        let worker = ["index-worker", "--until-idle"];
        if calibrate {
            let out = self.run_ok(&worker);
            self.worker_window = out.elapsed.mul_f64(1.2);
        } else {
            let kills = self.rng.random_range(1..=3);
            for _ in 0..kills {
                let before = self.block_on(self.store.pending_entries());
                let delay = self.delay(self.worker_window);
                match self.cli.run_killed(&worker, delay) {
                    KillOutcome::Exited {
                        status,
                        after,
                        stderr,
                        ..
                    } => {
                        if status.code() != Some(0) {
                            self.fail(&format!(
                                "index-worker failed on its own: {status}\n{stderr}"
                            ));
                        }
                        self.say(&format!(
                            "    index-worker drained {} before the signal ({} ms)",
                            file.tag,
                            after.as_millis()
                        ));
                        *self
                            .tally
                            .not_killed
                            .entry((Kind::Worker, "drained before the signal".into()))
                            .or_default() += 1;
                        break;
                    }
                    KillOutcome::Killed(at) => {
                        let pending = self.block_on(self.store.pending_entries());
                        let outcome = if pending == 0 {
                            "killed after the last switch"
                        } else if pending == before {
                            "killed before its first switch"
                        } else {
                            "killed mid-drain"
                        };
                        self.tally.kill(Kind::Worker, outcome);
                        self.say(&format!(
                            "kill {:>3}: index-worker on {} at {:>4} ms: {outcome} ({pending} entries left)",
                            self.tally.total(),
                            file.tag,
                            at.as_millis()
                        ));
                        self.check_instant("a killed index worker");
                    }
                }
            }
            // What the killed workers claimed is taken over once their
            // claims end; the worker drains the rest.
            self.run_ok(&worker);
        }
        let rows = self.recover_and_check();
        if let Err(e) = file.check_complete(&rows) {
            self.fail(&format!("after the index workers: {e}"));
        }
        // Ordering, sampled: each record is found first at its own vector.
        let ids: Vec<RecordId> = file.lines.iter().filter_map(|l| l.id).collect();
        for id in ids
            .choose_multiple(&mut self.rng, 4)
            .copied()
            .collect::<Vec<_>>()
        {
            let Some(vector) = rows.get(&id).and_then(|r| r.vector.clone()) else {
                continue;
            };
            let v = serde_json::to_string(&vector).expect("a vector");
            let hits = self.run_ok(&["search", "--vector", &v, "-k", "1"]).json();
            if hits[0]["id"] != json!(id.to_string()) {
                self.fail(&format!(
                    "ordering: record {id} is not found at its current vector: {hits:#}"
                ));
            }
            self.tally.ordering_checked += 1;
        }
        self.tally.deferred_inputs += 1;
    }

    fn done(&self) -> bool {
        self.tally.kills(Kind::Ingest) >= self.targets.ingest
            && self.tally.kills(Kind::Delete) >= self.targets.delete
            && self.tally.kills(Kind::Recover) >= self.targets.recover
            && self.tally.kills(Kind::Atomic) >= self.targets.atomic
            && self.tally.kills(Kind::Worker) >= self.targets.worker
    }

    fn run(&mut self) {
        // Calibration, uninterrupted: loading the delete data set measures
        // an ingest of LINES lines; one delete measures a delete.
        let took = self.refill_delete_set();
        self.ingest_window = took.mul_f64(1.1);
        let rows = self.rows();
        let ids: Vec<String> = rows
            .values()
            .filter(|r| r.scope.as_str().starts_with("del-"))
            .take(5)
            .map(|r| r.id.to_string())
            .collect();
        let out = self.run_ok(&["delete", "--ids", &ids.join(",")]);
        if out.json()["deleted"] != 5 {
            self.fail(&format!("calibration delete: {}", out.stdout));
        }
        self.delete_window = out.elapsed.mul_f64(1.3);
        // An atomic ingest of ATOMIC_LINES lines, uninterrupted.
        self.atomic_step(true);
        self.recover_and_check();
        // A deferred ingest indexed by an uninterrupted worker.
        self.worker_step(true);
        self.say(&format!(
            "kill windows: ingest {} ms, delete {} ms, recover {} ms (first), atomic ingest {} ms, index worker {} ms",
            self.ingest_window.as_millis(),
            self.delete_window.as_millis(),
            self.recover_window.as_millis(),
            self.atomic_window.as_millis(),
            self.worker_window.as_millis()
        ));

        while !self.done() {
            let delete_due = self.tally.kills(Kind::Delete) < self.targets.delete;
            let ingest_due = self.tally.kills(Kind::Ingest) < self.targets.ingest
                || self.tally.kills(Kind::Recover) < self.targets.recover;
            let atomic_due = self.tally.kills(Kind::Atomic) < self.targets.atomic;
            let worker_due = self.tally.kills(Kind::Worker) < self.targets.worker;
            if worker_due
                && ((!delete_due && !ingest_due && !atomic_due) || self.rng.random_bool(0.2))
            {
                self.worker_step(false);
            } else if atomic_due && ((!delete_due && !ingest_due) || self.rng.random_bool(0.25)) {
                self.atomic_step(false);
            } else if delete_due && (!ingest_due || self.rng.random_bool(0.3)) {
                self.delete_step();
            } else {
                self.ingest_step();
            }
        }
        if let Some(round) = self.round.take() {
            self.complete_round(round);
        }
        self.recover_and_check();
        self.summary();
    }

    fn summary(&self) {
        let t = &self.tally;
        let mut s = format!(
            "\n[{}] {} kills in {:.1} s:\n",
            self.label,
            t.total(),
            self.started.elapsed().as_secs_f64()
        );
        for kind in [
            Kind::Ingest,
            Kind::Delete,
            Kind::Recover,
            Kind::Atomic,
            Kind::Worker,
        ] {
            let parts: Vec<String> = t
                .outcomes
                .iter()
                .filter(|((k, _), _)| *k == kind)
                .map(|((_, o), n)| format!("{n} {o}"))
                .collect();
            s.push_str(&format!(
                "  {:<8} {:>3} kills: {}\n",
                kind.name(),
                t.kills(kind),
                parts.join(", ")
            ));
        }
        let not_killed: Vec<String> = t
            .not_killed
            .iter()
            .map(|((k, what), n)| format!("{n} {} {what}", k.name()))
            .collect();
        s.push_str(&format!(
            "  not killed: {}\n",
            if not_killed.is_empty() {
                "none".to_owned()
            } else {
                not_killed.join(", ")
            }
        ));
        s.push_str(&format!(
            "  recovery: {} finished recover runs claimed {} intent(s), resolved {}, deleted {} garbage point(s); killed recovers had resolved {} and claimed {} more\n",
            t.recover_runs,
            t.recovered_claimed,
            t.recovered_resolved,
            t.garbage_deleted,
            t.killed_recover_resolved,
            t.killed_recover_claimed
        ));
        s.push_str(&format!(
            "  deletes: {} applied whole, {} not at all; ingest inputs completed by re-running: {}, no-op re-runs checked: {}; verifies: {}; uninterrupted commands retried after exit 3: {}",
            t.deletes_applied,
            t.deletes_not_applied,
            t.rounds_completed,
            t.replays_checked,
            t.verifies,
            t.exit3_retries
        ));
        s.push_str(&format!(
            "\n  atomic ingests: {} stood whole, {} undone; recover runs ended {} saga(s) forward and compensated {}",
            t.atomic_whole, t.atomic_undone, t.sagas_done, t.sagas_compensated
        ));
        s.push_str(&format!(
            "\n  deferred ingests indexed to completion after index-worker kills: {}; records checked in the index at their current vector: {}",
            t.deferred_inputs, t.ordering_checked
        ));
        println!("{s}");
    }
}

fn new_campaign(
    label: &'static str,
    rt: Arc<tokio::runtime::Runtime>,
    cli: Tandem,
    store: StoreReader,
    seed: u64,
    dir: &Path,
) -> Campaign {
    let mut rng = StdRng::seed_from_u64(seed);
    let del_ids = (0..DEL_SCOPES.len() * 40)
        .map(|_| random_id(&mut rng))
        .collect();
    Campaign {
        label,
        rt,
        cli,
        store,
        rng,
        dir: dir.to_path_buf(),
        targets: Targets::from_env(),
        inputs: Inputs::default(),
        tally: Tally::default(),
        round: None,
        rounds: 0,
        del_ids,
        del_gen: 0,
        ingest_window: Duration::from_secs(1),
        delete_window: Duration::from_millis(300),
        recover_window: Duration::from_millis(250),
        atomic_window: Duration::from_secs(1),
        worker_window: Duration::from_secs(1),
        atomic_rounds: 0,
        kills_since_recovery: 0,
        started: Instant::now(),
    }
}

fn runtime() -> Arc<tokio::runtime::Runtime> {
    Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime"),
    )
}

fn write_config(dir: &Path) -> PathBuf {
    let path = dir.join("tandem.toml");
    std::fs::write(&path, CONFIG).expect("write tandem.toml");
    path
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

fn assert_enough(c: &Campaign) {
    let t = &c.tally;
    assert!(
        t.total() >= c.targets.total()
            && t.kills(Kind::Ingest) >= c.targets.ingest
            && t.kills(Kind::Delete) >= c.targets.delete
            && t.kills(Kind::Recover) >= c.targets.recover
            && t.kills(Kind::Atomic) >= c.targets.atomic
            && t.kills(Kind::Worker) >= c.targets.worker,
        "[{}] too few kills: {:?} (targets {:?})",
        c.label,
        t.kills,
        c.targets
    );
}

#[test]
fn kill_9_campaign_on_the_embedded_stores() {
    let seed = seed();
    println!("[embedded] seed {seed} (CRASH_CAMPAIGN_SEED={seed} replays it)");
    let bin = tandem_binary();
    let tmp = tempfile::tempdir().expect("temp dir");
    let config = write_config(tmp.path());
    let data_dir = tmp.path().join("data");
    let mut global = os(&["--json", "-q", "--dim", &DIM.to_string(), "--config"]);
    global.push(config.into());
    global.push("--data-dir".into());
    global.push(data_dir.clone().into());
    let cli = Tandem::new(bin, tmp.path(), global, Vec::new());
    let rt = runtime();
    // The SQLite file exists once `migrate` ran; the campaign reads it
    // between runs of the binary.
    let out = cli.run(&["migrate"]);
    assert_eq!(out.code(), Some(0), "migrate: {}", out.stderr);
    let repo = rt
        .block_on(tandem_adapters::sqlite::SqliteMetadataRepo::open(
            tandem_adapters::sqlite::SqliteConfig {
                migrate_on_start: false,
                ..tandem_adapters::sqlite::SqliteConfig::new(data_dir.join("metadata.sqlite3"))
            },
        ))
        .expect("open the SQLite store");
    let store = StoreReader::new(Arc::new(repo));
    let mut c = new_campaign("embedded", rt.clone(), cli, store, seed, tmp.path());
    c.run();
    assert_enough(&c);
}

#[test]
fn kill_9_campaign_on_postgres_and_the_qdrant_server() {
    let base = seed();
    println!("[postgres+qdrant] seed {base} (CRASH_CAMPAIGN_SEED={base} replays it)");
    // Other data and draws than the embedded campaign of the same seed.
    let seed = base ^ 0x9e37_79b9_7f4a_7c15;
    let rt = runtime();
    // Panics, saying so, if the server at DATABASE_URL (or the local
    // default) is unreachable: this suite never skips.
    let schema = rt.block_on(TestSchema::new());
    let bin = tandem_binary();
    let tmp = tempfile::tempdir().expect("temp dir");
    let config = write_config(tmp.path());
    let mut qdrant = QdrantProcess::start(
        Path::new(env!("CARGO_BIN_EXE_qdrant-double")),
        &tmp.path().join("qdrant"),
    );
    let collection = format!("crash_{}", uuid::Uuid::new_v4().simple());
    let mut global = os(&["--json", "-q", "--dim", &DIM.to_string(), "--config"]);
    global.push(config.into());
    global.extend(os(&[
        "--postgres-schema",
        schema.name(),
        "--qdrant-url",
        qdrant.url(),
        "--collection",
        &collection,
    ]));
    // The URL through the environment, as an operator would (keeps a password
    // off the process list).
    let env = vec![("DATABASE_URL".to_owned(), schema.url().to_owned())];
    let cli = Tandem::new(bin, tmp.path(), global, env);
    let out = cli.run(&["migrate"]);
    assert_eq!(out.code(), Some(0), "migrate: {}", out.stderr);
    let store = StoreReader::new(Arc::new(rt.block_on(schema.repo())));
    let mut c = new_campaign("postgres+qdrant", rt.clone(), cli, store, seed, tmp.path());
    c.run();
    assert!(
        qdrant.is_running(),
        "the Qdrant test server died during the campaign"
    );
    assert_enough(&c);
}

/// The re-index campaign (see `tandem_tests::reindex_campaign`): SIGKILLs of
/// `tandem reindex` while two writers write, on PostgreSQL + the Qdrant test
/// server, with the embedding test server as both models.
#[test]
fn kill_9_campaign_of_a_reindex_on_postgres_and_the_qdrant_server() {
    let sizes = Sizes::from_env();
    let rt = runtime();
    // Panics, saying so, if the server at DATABASE_URL (or the local
    // default) is unreachable: this suite never skips.
    let schema = rt.block_on(TestSchema::new());
    let bin = tandem_binary();
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut qdrant = QdrantProcess::start(
        Path::new(env!("CARGO_BIN_EXE_qdrant-double")),
        &tmp.path().join("qdrant"),
    );
    // The server's own dimension is neither model's: every request must ask
    // for its model's (`--embed-dimensions`; checked at the end).
    let embed = Arc::new(
        EmbedServer::start_in_background(4 * NEW_DIM, None).expect("start the embedding server"),
    );
    let store = Arc::new(StoreReader::new(Arc::new(rt.block_on(schema.repo()))));
    let setup = Setup {
        bin,
        dir: tmp.path().to_path_buf(),
        schema: schema.name().to_owned(),
        database_url: schema.url().to_owned(),
        qdrant_url: qdrant.url().to_owned(),
        embed,
        store,
        rt: rt.clone(),
    };
    let summary = ReindexCampaign::new(setup, sizes).run();
    summary.print(sizes.records);
    assert!(
        qdrant.is_running(),
        "the Qdrant test server died during the campaign"
    );

    // Enough kills, spread over the copy (a run killed past a threshold
    // dies mid-copy, or while starting if an earlier run already copied
    // past it), up to its last stretch, and one in (or, by a hair, after)
    // the switch's catch-up.
    let phases = summary.kills_by_phase();
    assert!(
        summary.kills() >= sizes.kills,
        "{} kills, {} planned: {phases:?}",
        summary.kills(),
        sizes.kills
    );
    let in_copy = [
        Phase::BeforeTakeover,
        Phase::BeforeFirstChunk,
        Phase::Copying,
    ]
    .iter()
    .map(|p| phases.get(p).copied().unwrap_or(0))
    .sum::<usize>();
    assert!(
        in_copy >= sizes.kills - 2 && phases.contains_key(&Phase::Copying),
        "too few kills during the copy: {phases:?}"
    );
    let last_copy_kill = summary
        .runs
        .iter()
        .filter(|r| {
            r.killed
                .is_some_and(|p| p != Phase::CatchingUp && p != Phase::AfterSwitch)
        })
        .map(|r| r.copied_after)
        .max()
        .unwrap_or(0);
    assert!(
        last_copy_kill >= sizes.records as u64 / 2,
        "no kill in the second half of the copy (the last at {last_copy_kill} rows copied)"
    );
    assert!(
        phases.contains_key(&Phase::CatchingUp) || phases.contains_key(&Phase::AfterSwitch),
        "no kill reached the switch's catch-up: {phases:?}"
    );
    // The runs continued the copy: together they copied each row about
    // once (plus the rows the writers changed meanwhile), far from a copy
    // per run.
    let written: u64 = summary
        .writers
        .iter()
        .map(|w| w.records_written as u64)
        .sum();
    let inserted_after: u64 = summary
        .writers
        .iter()
        .map(|w| w.inserted_after_switch as u64)
        .sum();
    let records = sizes.records as u64;
    assert!(
        summary.total_copied <= records + written,
        "rows copied by all runs ({}) exceed the seed ({records}) plus the writers' writes ({written}): \
         a run restarted the copy",
        summary.total_copied
    );
    assert!(
        summary.total_copied + inserted_after >= summary.rows as u64,
        "rows copied ({}) do not cover the rows at the switch ({} now, {inserted_after} inserted since)",
        summary.total_copied,
        summary.rows
    );
    if summary.report != serde_json::Value::Null {
        assert_eq!(summary.report["resumed"], true, "{:#}", summary.report);
    }
    assert!(
        summary.verified_mid_migration,
        "verify never ran with the migration open"
    );
    // Every writer wrote with both models, was refused once the switch
    // happened, and was never refused before it (checked as it ran).
    for w in &summary.writers {
        assert!(
            w.batches_old >= 1 && w.batches_new >= 2 && !w.refusals.is_empty(),
            "writer {}: {} old-model batches, {} new-model batches, {} refusals",
            w.index,
            w.batches_old,
            w.batches_new,
            w.refusals.len()
        );
    }
    // The embedding server embedded the seed with the old model and every
    // record again with the new one.
    let texts = |model: &str| summary.texts_by_model.get(model).copied().unwrap_or(0) as u64;
    assert!(texts(OLD_MODEL) >= records, "{:?}", summary.texts_by_model);
    assert!(texts(NEW_MODEL) >= records, "{:?}", summary.texts_by_model);
}

/// Timings of the Qdrant-kill campaign: calls short enough that a batch in
/// flight at the kill fails within seconds, a lease recovery may take over
/// soon after (`lease > call_deadline + cleanup_deadline`).
const SERVER_KILL_CONFIG: &str = "\
[coordinator]
lease_secs = 4
call_deadline_secs = 2
cleanup_deadline_secs = 1
orphan_grace_secs = 4
";

/// SIGKILLs per run of the Qdrant-kill campaign.
const SERVER_KILLS: usize = 3;
/// Lines per ingest of the Qdrant-kill campaign (30 batches).
const SERVER_KILL_LINES: usize = 600;

#[test]
#[cfg_attr(
    not(real_qdrant),
    ignore = "needs a real Qdrant server: set QDRANT_BIN=/path/to/qdrant or TANDEM_QDRANT_START, see docs/qdrant.md"
)]
fn kill_9_of_the_qdrant_server_mid_ingest() {
    let base = seed();
    println!("[qdrant-kill] seed {base} (CRASH_CAMPAIGN_SEED={base} replays it)");
    let mut rng = StdRng::seed_from_u64(base ^ 0x51ed_2701_a5a5_0f0f);
    let launcher = Launcher::require();
    let rt = runtime();
    let schema = rt.block_on(TestSchema::new());
    let bin = tandem_binary();
    let tmp = tempfile::tempdir().expect("temp dir");
    let config = tmp.path().join("tandem.toml");
    std::fs::write(&config, SERVER_KILL_CONFIG).expect("write tandem.toml");
    let mut server = QdrantCluster::single(&launcher);
    let started = Instant::now();
    let collection = format!("crash_{}", uuid::Uuid::new_v4().simple());
    let mut global = os(&["--json", "-q", "--dim", &DIM.to_string(), "--config"]);
    global.push(config.into());
    global.extend(os(&[
        "--postgres-schema",
        schema.name(),
        "--qdrant-url",
        &server.node(0).grpc_url(),
        "--collection",
        &collection,
    ]));
    let env = vec![("DATABASE_URL".to_owned(), schema.url().to_owned())];
    let cli = Tandem::new(bin, tmp.path(), global, env);
    let out = cli.run(&["migrate"]);
    assert_eq!(out.code(), Some(0), "migrate: {}", out.stderr);
    let store = StoreReader::new(Arc::new(rt.block_on(schema.repo())));
    let mut inputs = Inputs::default();
    let (mut retried_batches, mut reruns) = (0u64, 0usize);

    for kill in 1..=SERVER_KILLS {
        let tag = format!("q{kill}");
        let lines: Vec<InputLine> = (0..SERVER_KILL_LINES)
            .map(|i| InputLine {
                // A third without an id: a batch written twice would show.
                id: (i % 3 != 0).then(|| random_id(&mut rng)),
                scope: SCOPES[i % SCOPES.len()].to_owned(),
                content: format!("{tag} line {}", i + 1),
                metadata: meta(json!({"input": tag, "line": i + 1})),
                vector: random_vector(&mut rng),
            })
            .collect();
        let file = InputFile::write(tmp.path(), &tag, lines, BATCH);
        inputs.add(&file);
        let batches = file.batches();
        let path = file.path.display().to_string();
        let args = [
            "ingest",
            path.as_str(),
            "--batch-size",
            &BATCH.to_string(),
            "--idempotency-prefix",
            &tag,
        ]
        .map(str::to_owned);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();

        // Kill the server once a random number of batches is committed (the
        // ingest writes its batches in order).
        let target = rng.random_range(1..batches / 2);
        let mut ingest = cli.spawn(&args);
        while !rt.block_on(store.has_key(&format!("{tag}:{target}"))) {
            assert!(
                ingest.is_running(),
                "the ingest ended before batch {target} committed: {}",
                ingest.stderr_so_far()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let was_running = ingest.is_running();
        server.node_mut(0).kill9();
        // Committed now = acknowledged by Qdrant before the kill (a commit
        // waits for its index write), even if its commit landed just after.
        let acknowledged: Vec<String> = (1..=batches)
            .map(|b| format!("{tag}:{b}"))
            .filter(|k| rt.block_on(store.has_key(k)))
            .collect();
        assert!(
            was_running && acknowledged.len() < batches,
            "the kill must land mid-ingest ({} of {batches} batches committed)",
            acknowledged.len()
        );
        let down_for = Duration::from_millis(rng.random_range(0..1500));
        std::thread::sleep(down_for);
        server.node_mut(0).restart();
        let out = ingest.wait();
        let j = out.json();
        println!(
            "[qdrant-kill] kill {kill}: SIGKILL of Qdrant with {} of {batches} batches committed \
             (ingest running: {was_running}), down {} ms; ingest exit {:?} (attempted {}, retried {}, {} retries, failed {})",
            acknowledged.len(),
            down_for.as_millis(),
            out.code(),
            j["batches_attempted"],
            j["batches_retried"],
            j["batch_retries"],
            j["batches_failed"]
        );
        retried_batches += j["batches_retried"].as_u64().unwrap_or(0);
        match out.code() {
            Some(0) => {}
            // Retries spent while the server was still coming up: nothing of
            // the failing batch applied; the same prefix continues.
            Some(3 | 4) => {
                reruns += 1;
                let again = cli.run(&args);
                assert_eq!(
                    again.code(),
                    Some(0),
                    "re-run of {tag}: {}\n{}",
                    again.stdout,
                    again.stderr
                );
            }
            _ => panic!(
                "ingest {tag} failed: {}\nstdout:\n{}\nstderr:\n{}",
                out.status, out.stdout, out.stderr
            ),
        }

        // Acknowledged writes survived the crash: every batch committed
        // before the kill still is, and (after recovery) every committed
        // row's point is in the restarted server.
        for key in &acknowledged {
            assert!(
                rt.block_on(store.has_key(key)),
                "batch {key}, committed before the kill, is gone"
            );
        }
        let pending = rt.block_on(store.wait_for_leases());
        let out = cli.run(&["recover"]);
        assert_eq!(
            out.code(),
            Some(0),
            "recover: {}\n{}",
            out.stdout,
            out.stderr
        );
        let rows = rt.block_on(store.rows());
        let out = cli.run(&["verify"]);
        let verify = out.json();
        assert_eq!(out.code(), Some(0), "verify after kill {kill}: {verify:#}");
        check_exact(&verify, &rows).unwrap_or_else(|e| panic!("after kill {kill}: {e}"));
        file.check_complete(&rows)
            .unwrap_or_else(|e| panic!("after kill {kill}: {e}"));
        inputs
            .check_rows(&rows)
            .unwrap_or_else(|e| panic!("after kill {kill}: {e}"));
        println!(
            "[qdrant-kill]   {} acknowledged batches survived; {pending} intent(s) recovered; verify exact ({} rows = points)",
            acknowledged.len(),
            rows.len()
        );
    }
    println!(
        "[qdrant-kill] {SERVER_KILLS} kills of the Qdrant server in {:.1} s: {retried_batches} batch(es) retried by the CLI, {reruns} re-run(s)",
        started.elapsed().as_secs_f64()
    );
}

/// The campaign's checks must be able to fail: each is fed a store state
/// that breaks it.
#[test]
fn the_campaign_checks_reject_what_they_must() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut rng = StdRng::seed_from_u64(7);
    let id = random_id(&mut rng);
    let line = |n: u64, id: Option<RecordId>, content: &str, rng: &mut StdRng| InputLine {
        id,
        scope: "books".into(),
        content: content.into(),
        metadata: meta(json!({"input": "t", "line": n, "item": "i0"})),
        vector: random_vector(rng),
    };
    let lines = vec![
        line(1, Some(id), "first version", &mut rng),
        line(2, None, "no id", &mut rng),
        line(3, Some(id), "second version", &mut rng),
    ];
    let file = InputFile::write(dir.path(), "t", lines.clone(), 2);
    assert_eq!((file.batches(), file.expected_records()), (2, 2));
    let mut inputs = Inputs::default();
    inputs.add(&file);
    let stored = |l: &InputLine, id: RecordId| StoredRecord {
        id,
        scope: tandem_core::Scope::new(l.scope.as_str()),
        content: l.content.clone(),
        metadata: l.metadata.clone(),
        point_id: PointId::new_random(),
        version: 1,
        vector: Some(l.vector.clone()),
    };
    let idless = random_id(&mut rng);
    let good: BTreeMap<RecordId, StoredRecord> = [
        (id, stored(&lines[2], id)),
        (idless, stored(&lines[1], idless)),
    ]
    .into();
    inputs
        .check_rows(&good)
        .expect("the completed input passes");
    file.check_complete(&good)
        .expect("the completed input passes");

    // An earlier version is a version the input gave: fine for check_rows,
    // not for a completed ingest.
    let mut old = good.clone();
    old.insert(id, stored(&lines[0], id));
    inputs
        .check_rows(&old)
        .expect("an earlier version is from the input");
    assert!(
        file.check_complete(&old).is_err(),
        "not at the last version"
    );

    // Content the input never gave that record.
    let mut changed = good.clone();
    changed.get_mut(&id).unwrap().content = "tampered".into();
    assert!(inputs.check_rows(&changed).is_err());

    // The id-less line stored twice (a duplicate).
    let mut dup = good.clone();
    let again = random_id(&mut rng);
    dup.insert(again, stored(&lines[1], again));
    assert!(inputs.check_rows(&dup).is_err());
    assert!(file.check_complete(&dup).is_err());

    // A record missing.
    let mut missing = good.clone();
    missing.remove(&id);
    assert!(file.check_complete(&missing).is_err());

    // A record from no input.
    let mut foreign = good.clone();
    let stranger = random_id(&mut rng);
    let mut rec = stored(&lines[0], stranger);
    rec.metadata = meta(json!({"input": "other", "line": 1}));
    foreign.insert(stranger, rec);
    assert!(inputs.check_rows(&foreign).is_err());

    // verify documents.
    let ok = json!({"consistent": true, "scopes": {"books": {"rows": 2, "points": 2}},
        "missing_points": [], "orphan_points": [], "live_intents": 0, "intent_points": 0});
    check_exact(&ok, &good).expect("consistent");
    let mut orphan = ok.clone();
    orphan["orphan_points"] = json!([{"id": "x"}]);
    assert!(check_no_missing_no_orphans(&orphan).is_err());
    let mut pending = ok.clone();
    pending["live_intents"] = json!(1);
    check_no_missing_no_orphans(&pending).expect("live intents are allowed before recovery");
    assert!(check_exact(&pending, &good).is_err());
    let mut short = ok.clone();
    short["scopes"]["books"]["points"] = json!(1);
    assert!(check_exact(&short, &good).is_err());
    assert!(
        check_exact(&ok, &dup).is_err(),
        "verify's counts must be the store's"
    );
}
