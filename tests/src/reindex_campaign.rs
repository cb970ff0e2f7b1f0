//! The kill -9 campaign of `tandem reindex` (issue 14), run by
//! `tests/tests/crash_campaign.rs` on PostgreSQL (a schema of its own) and the
//! Qdrant test server (`qdrant-double`, its own process), with the in-process
//! OpenAI-compatible embedding server ([`crate::embed_server`]).
//!
//! 1. **Seed**: `tandem ingest` writes [`Sizes::records`] records (50,000 by
//!    default) whose vectors the embedding server makes with the old model
//!    ([`OLD_MODEL`], [`OLD_DIM`] dimensions) into the old collection. Every
//!    request asks for its model's dimension (`--embed-dimensions`; the
//!    re-index's is checked against its `--to-dim`).
//! 2. **Writers**: [`WRITERS`] threads run `tandem ingest` (and now and then
//!    `tandem delete`) as child processes during the whole re-index: inserts
//!    and updates embedded through the server. Each keeps a ledger of what
//!    the processes reported committed (exit 0); a failed batch is re-run
//!    under the same idempotency key until it commits.
//! 3. **Re-index**: `tandem reindex --to-collection NEW --to-dim 12 --embed
//!    openai ... --embed-model NEW_MODEL --json` is SIGKILLed at random
//!    moments spread over the copy (one early, the rest once the store's
//!    count of copied rows passed a threshold, plus a random part of a
//!    chunk) and once in the switch's catch-up; each time it is re-run after
//!    the dead run's lease. After every kill the store (and `tandem reindex
//!    --status --json`, which must agree) shows either the old collection
//!    active with the migration open — same target, cursor and rows copied
//!    never going backwards — or the new one active with none open: never a
//!    mix. A re-run continues the copy (its first progress line counts the
//!    rows earlier runs copied; the last run reports `resumed: true`), and
//!    the rows copied by all runs together stay close to the rows there are.
//! 4. **Across the switch**: a writer still embedding with the old model is
//!    refused at its next batch (the process follows the switch to the new
//!    collection, whose index refuses the old dimension: exit 2, nothing of
//!    the batch written — checked in the store); it then moves to the new
//!    model and collection (a rolling deploy) and writes on. Deletes of a
//!    process still configured with the old collection follow the switch
//!    transparently.
//! 5. **After**: `tandem recover`, then `tandem verify --json` is exact under
//!    both the old and the new configuration; the new collection is active,
//!    holds [`NEW_DIM`]-dimensional points (one per row), and finds sampled
//!    records at the new model's vector of their content; the records are
//!    exactly the seed plus every write the writers saw committed (each with
//!    the scope and content of its last committed write; deleted ones gone;
//!    nothing else); the embedding server re-embedded every record with the
//!    new model.
//!
//! Killing a re-index changes no record and no point of the active
//! collection: what is at stake is the migration's state and the target
//! collection, so the checks after each kill read the state (cheap), not a
//! full `verify` of 50,000 records (seconds each in a debug build). One
//! `verify`, halfway through the kills, checks the old collection exact
//! with the migration open — with the writers paused, because `verify` is
//! exact only on a quiet system (see [`ReindexCampaign`]'s
//! `verify_while_open`); the exact verify of the new one comes after the
//! switch.
//!
//! Also checked once: a re-run before the dead run's lease ended is refused
//! (exit 3) and changes nothing; a re-index into the active collection
//! after the switch is refused (exit 2).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tandem_core::{IndexState, Migration, RecordId, ReindexSource, StoredRecord};

use crate::campaign::{
    Finished, StoreReader, Tandem, check_exact, check_no_missing_no_orphans, now_ms,
};
use crate::embed_server::EmbedServer;

/// The old collection's dimension (the seed's model).
pub const OLD_DIM: usize = 8;
/// The new collection's dimension (the new model's).
pub const NEW_DIM: usize = 12;
/// The model the seed and the writers use before the switch. The embedding
/// server answers it in [`OLD_DIM`] dimensions because its requests carry
/// `dimensions` (`--embed-dimensions`).
pub const OLD_MODEL: &str = "campaign-embed-v1";
/// The model of the re-index and of the writers after the switch, asked
/// for [`NEW_DIM`] dimensions (`--embed-dimensions`: the re-index's is checked
/// against `--to-dim`, while its `--dim` still names the old collection).
pub const NEW_MODEL: &str = "campaign-embed-v2";
/// Writer threads.
pub const WRITERS: usize = 2;
/// Records per writer batch (one `tandem ingest` process).
pub const WRITER_BATCH: usize = 30;
/// Records per seed batch.
pub const SEED_BATCH: usize = 5000;
/// Scopes of the records.
const SCOPES: [&str; 4] = ["docs", "wiki", "mail", "code"];
/// Words of the contents.
const WORDS: [&str; 24] = [
    "alpha", "bravo", "cedar", "delta", "ember", "fjord", "gamma", "harbor", "iris", "jade",
    "kelp", "lumen", "maple", "nadir", "onyx", "prism", "quartz", "raven", "sierra", "tundra",
    "umber", "vortex", "willow", "zenith",
];

/// Rows per copy chunk of the re-index (`[reindex] chunk`), also the points
/// per index request (`[coordinator] index_chunk`).
pub const CHUNK: usize = 2000;

/// The configuration file of every command. The re-index lease is short so
/// that each re-run after a kill waits 2 s, not 10 (`[reindex] lease_secs`).
/// Chunks of [`CHUNK`] rows, each written to the index in one request
/// (`index_chunk`): the Qdrant test server flushes every acknowledged write,
/// and with the default 256 points per request those flushes made the copy
/// of 50,000 records take 46 s instead of 24 s (debug build). A switch
/// freeze of 5 s bounds how long a killed switch blocks the writers (their
/// prepares wait for it, within the 10 s call deadline). The intents' lease
/// only matters if a writer leaves cleanup to recovery.
pub fn config() -> String {
    format!(
        "\
[coordinator]
lease_secs = 15
call_deadline_secs = 10
cleanup_deadline_secs = 3
orphan_grace_secs = 15
index_chunk = {CHUNK}

[reindex]
chunk = {CHUNK}
lease_secs = 2
switch_freeze_secs = 5
"
    )
}

/// The campaign's size: `CRASH_CAMPAIGN_REINDEX_RECORDS` (default 50,000),
/// `CRASH_CAMPAIGN_REINDEX_KILLS` (default 10: one early, the rest spread
/// over the copy, the last in the switch's catch-up), and the seed
/// (`CRASH_CAMPAIGN_SEED`, else random).
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// Seed records.
    pub records: usize,
    /// Kills of the re-index.
    pub kills: usize,
    /// The random seed.
    pub seed: u64,
}

fn env_number(var: &str, default: u64) -> u64 {
    match std::env::var(var) {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{var}={s:?} is not a number")),
        Err(_) => default,
    }
}

impl Sizes {
    /// Reads the environment (see the type's docs).
    pub fn from_env() -> Self {
        let records = env_number("CRASH_CAMPAIGN_REINDEX_RECORDS", 50_000) as usize;
        let kills = env_number("CRASH_CAMPAIGN_REINDEX_KILLS", 10) as usize;
        assert!(
            records >= 5 * CHUNK,
            "CRASH_CAMPAIGN_REINDEX_RECORDS must be at least {} (five copy chunks)",
            5 * CHUNK
        );
        assert!(
            kills >= 3,
            "CRASH_CAMPAIGN_REINDEX_KILLS must be at least 3"
        );
        let seed = match std::env::var("CRASH_CAMPAIGN_SEED") {
            Ok(_) => env_number("CRASH_CAMPAIGN_SEED", 0) ^ 0x7e1d_3c0f_5a5a_2b2b,
            Err(_) => rand::rng().random(),
        };
        Self {
            records,
            kills,
            seed,
        }
    }
}

/// A record as the campaign expects it: its scope and content.
pub type Expected = (String, String);

fn words(rng: &mut StdRng, n: usize) -> String {
    (0..n)
        .map(|_| *WORDS.choose(rng).expect("words"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn random_id(rng: &mut StdRng) -> RecordId {
    RecordId::from(uuid::Builder::from_random_bytes(rng.random()).into_uuid())
}

/// One JSON Lines record without a vector (the embedder makes it).
fn line(id: RecordId, scope: &str, content: &str, metadata: Value) -> String {
    json!({"id": id.to_string(), "scope": scope, "content": content, "metadata": metadata})
        .to_string()
}

fn write_lines(path: &Path, lines: &[String]) {
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display())),
    );
    for l in lines {
        writeln!(f, "{l}").expect("write an input file");
    }
    f.flush().expect("write an input file");
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// Flags shared by the writers and the driver.
#[derive(Debug, Default)]
pub struct Flags {
    /// The switch happened: each writer stops once it wrote two batches
    /// with the new model.
    stop: AtomicBool,
    /// The campaign failed elsewhere: stop at once.
    abort: AtomicBool,
    /// A writer failed (its panic is re-raised when the threads are joined).
    writer_failed: AtomicBool,
    /// Writers hold off before their next write while this is set...
    pause: AtomicBool,
    /// ... and count themselves here while they do.
    paused: std::sync::atomic::AtomicUsize,
}

impl Flags {
    /// Pauses the writers and waits until each is between two writes
    /// (nothing of theirs in flight); `resume` lets them go on.
    fn pause_writers(&self) {
        self.pause.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.paused.load(Ordering::SeqCst) < WRITERS {
            assert!(
                !self.writer_failed.load(Ordering::SeqCst),
                "a writer failed (its panic follows)"
            );
            assert!(
                Instant::now() < deadline,
                "the writers did not pause within 60 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn resume_writers(&self) {
        self.pause.store(false, Ordering::SeqCst);
    }

    /// A writer's side of the pause: between two writes, wait while paused.
    fn hold(&self) {
        if !self.pause.load(Ordering::SeqCst) {
            return;
        }
        self.paused.fetch_add(1, Ordering::SeqCst);
        while self.pause.load(Ordering::SeqCst) && !self.abort.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.paused.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Sets a flag when dropped: `abort` for the driver (if it panics, the
/// writers must end or the scope never joins), `writer_failed` for a writer
/// that panics.
struct SetOnDrop<'a> {
    flag: &'a AtomicBool,
    only_when_panicking: bool,
}

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        if !self.only_when_panicking || std::thread::panicking() {
            self.flag.store(true, Ordering::SeqCst);
        }
    }
}

/// Is this failure of an ingest with the old model the refusal the switch
/// causes? The process followed the switch to the new collection, whose
/// index refuses vectors of the old dimension (Qdrant's "Vector dimension
/// error"), a bad-input error: exit 2.
pub fn is_dimension_refusal(out: &Finished) -> bool {
    out.code() == Some(2) && out.stderr.contains("dimension")
}

/// What one writer did, and what it expects the store to hold.
#[derive(Debug, Default)]
pub struct WriterReport {
    /// Which writer.
    pub index: usize,
    /// Every record it wrote or deleted last: its scope and content, or
    /// `None` if deleted.
    pub expected: BTreeMap<RecordId, Option<Expected>>,
    /// Batches committed with the old model / with the new one.
    pub batches_old: usize,
    /// See `batches_old`.
    pub batches_new: usize,
    /// Records written (inserted or updated) by committed batches.
    pub records_written: usize,
    /// Records inserted by batches with the new model (after the switch).
    pub inserted_after_switch: usize,
    /// `tandem delete` calls that succeeded, and records they deleted.
    pub deletes: usize,
    /// See `deletes`.
    pub deleted_records: usize,
    /// Deletes by a process still configured with the old collection, run
    /// after the switch: they followed it.
    pub old_config_deletes_after_switch: usize,
    /// The refusals of old-model batches after the switch: exit code and
    /// the message.
    pub refusals: Vec<(Option<i32>, String)>,
    /// Attempts re-run under the same key after a retryable failure, by
    /// exit code.
    pub retried: BTreeMap<i32, usize>,
}

/// One writer: its two configurations and its records.
struct Writer {
    index: usize,
    old: Tandem,
    new: Tandem,
    store: Arc<StoreReader>,
    rt: Arc<tokio::runtime::Runtime>,
    dir: PathBuf,
    new_collection: String,
    /// The seed records this writer may update or delete (each writer its
    /// own, so the ledgers never overlap).
    seed: BTreeMap<RecordId, Expected>,
    rng: StdRng,
}

impl Writer {
    fn say(&self, line: &str) {
        println!("[reindex] writer {}: {line}", self.index);
    }

    fn fail(&self, what: &str) -> ! {
        panic!("[reindex] writer {}: {what}", self.index)
    }

    /// What the store must hold for `id` before the writer's next write.
    fn prior(&self, report: &WriterReport, id: &RecordId) -> Option<Expected> {
        match report.expected.get(id) {
            Some(e) => e.clone(),
            None => self.seed.get(id).cloned(),
        }
    }

    fn run(mut self, flags: &Flags) -> WriterReport {
        let _failed = SetOnDrop {
            flag: &flags.writer_failed,
            only_when_panicking: true,
        };
        let mut report = WriterReport {
            index: self.index,
            ..WriterReport::default()
        };
        let mut moved = false;
        let mut own: Vec<(RecordId, String)> = Vec::new();
        let mut seed_pool: Vec<RecordId> = self.seed.keys().copied().collect();
        let mut stop_seen: Option<Instant> = None;
        let mut batch = 0usize;
        loop {
            flags.hold();
            if flags.abort.load(Ordering::SeqCst) {
                return report;
            }
            if flags.stop.load(Ordering::SeqCst) {
                if moved && report.batches_new >= 2 {
                    break;
                }
                let since = *stop_seen.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(120) {
                    self.fail(&format!(
                        "still writing 120 s after the switch (moved to the new model: {moved}, \
                         {} batch(es) with it)",
                        report.batches_new
                    ));
                }
            }
            batch += 1;
            if batch.is_multiple_of(6) && own.len() + seed_pool.len() >= 3 {
                self.delete(&mut report, moved, &mut own, &mut seed_pool);
            } else {
                self.ingest(batch, &mut report, &mut moved, &mut own, &mut seed_pool);
            }
            let pause = self.rng.random_range(20..120);
            std::thread::sleep(Duration::from_millis(pause));
        }
        self.say(&format!(
            "{} batch(es) with the old model, {} with the new one, {} record(s) written, \
             {} delete(s); refused {} time(s) after the switch",
            report.batches_old,
            report.batches_new,
            report.records_written,
            report.deletes,
            report.refusals.len()
        ));
        report
    }

    /// One batch of inserts and updates, re-run until it commits; moves to
    /// the new model when the switch refuses the old one.
    fn ingest(
        &mut self,
        batch: usize,
        report: &mut WriterReport,
        moved: &mut bool,
        own: &mut Vec<(RecordId, String)>,
        seed_pool: &mut Vec<RecordId>,
    ) {
        let w = self.index;
        let mut records: Vec<(RecordId, Expected)> = Vec::with_capacity(WRITER_BATCH);
        let mut fresh: Vec<(RecordId, String)> = Vec::new();
        let mut in_batch: HashSet<RecordId> = HashSet::new();
        for k in 0..WRITER_BATCH {
            let roll: f64 = self.rng.random();
            let pick = |pool: &[RecordId], rng: &mut StdRng, in_batch: &HashSet<RecordId>| {
                (0..8)
                    .filter_map(|_| pool.choose(rng).copied())
                    .find(|id| !in_batch.contains(id))
            };
            let existing = if roll < 0.45 {
                None
            } else if roll < 0.85 {
                pick(seed_pool, &mut self.rng, &in_batch)
            } else {
                let ids: Vec<RecordId> = own.iter().map(|(id, _)| *id).collect();
                pick(&ids, &mut self.rng, &in_batch)
            };
            let (id, scope) = match existing {
                Some(id) => {
                    let scope = self
                        .prior(report, &id)
                        .map(|(scope, _)| scope)
                        .unwrap_or_else(|| self.fail(&format!("record {id} has no scope")));
                    (id, scope)
                }
                None => {
                    let id = random_id(&mut self.rng);
                    let scope = (*SCOPES.choose(&mut self.rng).expect("scopes")).to_owned();
                    fresh.push((id, scope.clone()));
                    (id, scope)
                }
            };
            in_batch.insert(id);
            let content = format!(
                "writer {w} batch {batch} line {k}: {}",
                words(&mut self.rng, 5)
            );
            records.push((id, (scope, content)));
        }
        let lines: Vec<String> = records
            .iter()
            .map(|(id, (scope, content))| {
                line(*id, scope, content, json!({"writer": w, "batch": batch}))
            })
            .collect();
        let path = self.dir.join(format!("writer{w}-{batch}.jsonl"));
        write_lines(&path, &lines);
        let path = path.display().to_string();
        let size = WRITER_BATCH.to_string();
        for attempt in 1.. {
            let (cli, model) = if *moved {
                (&self.new, "new")
            } else {
                (&self.old, "old")
            };
            // Per model: a batch refused with the old model is written
            // again with other vectors, which its old key would refuse.
            let prefix = format!("w{w}-b{batch}-{model}");
            let out = cli.run(&[
                "ingest",
                &path,
                "--batch-size",
                &size,
                "--idempotency-prefix",
                &prefix,
            ]);
            match out.code() {
                Some(0) => {
                    let j = out.json();
                    let written = j["inserted"].as_u64().unwrap_or(0)
                        + j["updated"].as_u64().unwrap_or(0)
                        + j["replayed_records"].as_u64().unwrap_or(0);
                    if j["ok"] != true || written != WRITER_BATCH as u64 {
                        self.fail(&format!("batch {batch} exited 0 but reports {j}"));
                    }
                    for (id, e) in &records {
                        report.expected.insert(*id, Some(e.clone()));
                    }
                    report.records_written += WRITER_BATCH;
                    if *moved {
                        report.batches_new += 1;
                        report.inserted_after_switch += fresh.len();
                    } else {
                        report.batches_old += 1;
                    }
                    own.extend(fresh);
                    return;
                }
                _ if !*moved && is_dimension_refusal(&out) => {
                    self.refused(batch, &records, report, &out);
                    // A delete needs no vector: the same configuration
                    // follows the switch (its prepare is refused under the
                    // old generation; it deletes from the new collection).
                    if own.len() + seed_pool.len() >= 3 {
                        self.delete(report, false, own, seed_pool);
                    }
                    *moved = true;
                }
                Some(code @ (3 | 4)) if attempt < 12 => {
                    // Unavailable (a switch's freeze outlasting the call
                    // deadline, say) or unknown: the same key settles it.
                    *report.retried.entry(code).or_default() += 1;
                    self.say(&format!(
                        "batch {batch} exited {code}, re-running it under its key: {}",
                        out.stderr.trim()
                    ));
                    std::thread::sleep(Duration::from_millis(200));
                }
                _ => self.fail(&format!(
                    "batch {batch} ({model} model) failed: exit {}\nstdout:\n{}\nstderr:\n{}",
                    out.status, out.stdout, out.stderr
                )),
            }
        }
    }

    /// An old-model batch refused after the switch: the new collection is
    /// active, and nothing of the batch was written.
    fn refused(
        &self,
        batch: usize,
        records: &[(RecordId, Expected)],
        report: &mut WriterReport,
        out: &Finished,
    ) {
        let state = self.rt.block_on(self.store.index_state());
        if state.active.as_deref() != Some(self.new_collection.as_str()) {
            self.fail(&format!(
                "batch {batch} with the old model was refused, but the new collection is not \
                 active ({state:?}): {}",
                out.stderr.trim()
            ));
        }
        let ids: Vec<RecordId> = records.iter().map(|(id, _)| *id).collect();
        let stored: HashMap<RecordId, StoredRecord> = self
            .rt
            .block_on(self.store.get(&ids))
            .into_iter()
            .map(|r| (r.id, r))
            .collect();
        for id in &ids {
            let now = stored
                .get(id)
                .map(|r| (r.scope.to_string(), r.content.clone()));
            if now != self.prior(report, id) {
                self.fail(&format!(
                    "refused batch {batch} was partly written: record {id} is {now:?}, was {:?}",
                    self.prior(report, id)
                ));
            }
        }
        let message = out
            .stderr
            .lines()
            .find(|l| l.contains("dimension"))
            .unwrap_or_default()
            .to_owned();
        // Two refusals, both with nothing written. A process that started
        // before the switch follows it at its first write, and the new
        // collection refuses the vectors: the message names the collection
        // it followed (the one that refused), not the configured one. A
        // process started after the switch opened the new collection at
        // start, so its input check refuses the first line's vector.
        let new = &self.new_collection;
        let followed = message.contains(&format!("(collection {new})"))
            && message.contains(&format!(
                "has dimension {OLD_DIM}; collection `{new}` expects {NEW_DIM}"
            ));
        let opened_new = message.contains(&format!(
            "line 1: vector has dimension {OLD_DIM}; the collection expects {NEW_DIM}"
        ));
        if !followed && !opened_new {
            self.fail(&format!(
                "the refusal does not name the new collection and both dimensions: {message}"
            ));
        }
        self.say(&format!(
            "batch {batch} with the old model refused after the switch (exit {:?}, nothing \
             written); moving to {NEW_MODEL} and the new collection: {message}",
            out.code()
        ));
        report.refusals.push((out.code(), message));
    }

    /// Deletes three of its records (its own, else seed records it owns).
    fn delete(
        &mut self,
        report: &mut WriterReport,
        moved: bool,
        own: &mut Vec<(RecordId, String)>,
        seed_pool: &mut Vec<RecordId>,
    ) {
        let mut ids = Vec::new();
        for _ in 0..3 {
            let id = if own.len() >= 3 || (seed_pool.is_empty() && !own.is_empty()) {
                own.swap_remove(self.rng.random_range(0..own.len())).0
            } else {
                seed_pool.swap_remove(self.rng.random_range(0..seed_pool.len()))
            };
            ids.push(id);
        }
        let list = ids
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let cli = if moved { &self.new } else { &self.old };
        let after_switch = !moved && self.rt.block_on(self.store.index_state()).generation > 0;
        for attempt in 1.. {
            let out = cli.run(&["delete", "--ids", &list]);
            match out.code() {
                Some(0) => {
                    let deleted = out.json()["deleted"].as_u64().unwrap_or(0);
                    // A re-run after an unknown outcome finds them gone.
                    if attempt == 1 && deleted != 3 {
                        self.fail(&format!("delete of 3 records deleted {deleted}"));
                    }
                    report.deletes += 1;
                    report.deleted_records += ids.len();
                    report.old_config_deletes_after_switch += usize::from(after_switch);
                    for id in &ids {
                        report.expected.insert(*id, None);
                    }
                    return;
                }
                Some(code @ (3 | 4)) if attempt < 12 => {
                    *report.retried.entry(code).or_default() += 1;
                    std::thread::sleep(Duration::from_millis(200));
                }
                _ => self.fail(&format!(
                    "delete failed: exit {}\nstdout:\n{}\nstderr:\n{}",
                    out.status, out.stdout, out.stderr
                )),
            }
        }
    }
}

/// What ends a re-index run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Trigger {
    /// SIGKILL this long after the start (whatever it is doing).
    After(Duration),
    /// SIGKILL once the store counts this many rows copied, plus a random
    /// part of a chunk's time (so it lands anywhere in the next chunk).
    Copied(u64),
    /// SIGKILL as soon as the switch's catch-up shows: the store's freeze
    /// set by this run, or a `catching_up` progress line.
    CatchingUp,
    /// No kill: let it switch.
    Finish,
}

/// The kills of a campaign of `kills`: one early (within the first
/// 0.8 s, mostly before its first chunk), `kills - 2` at thresholds of rows
/// copied spread evenly from 2 % of `records` to 90 % of them but at least
/// two chunks before the end (a kill comes up to a chunk's time after its
/// threshold, and must come before the switch), one drawn in each stretch;
/// one in the switch's catch-up; then a run to the end.
pub fn plan(rng: &mut StdRng, records: usize, kills: usize) -> Vec<Trigger> {
    let mut out = vec![Trigger::After(Duration::from_millis(
        rng.random_range(50..800),
    ))];
    let spread = kills - 2;
    let lo = records as f64 * 0.02;
    let hi = (records as f64 * 0.9).min(records.saturating_sub(2 * CHUNK) as f64);
    let step = (hi - lo) / spread as f64;
    for i in 0..spread {
        let from = lo + step * i as f64;
        out.push(Trigger::Copied(rng.random_range(from..from + step) as u64));
    }
    out.push(Trigger::CatchingUp);
    out.push(Trigger::Finish);
    out
}

/// Where a kill landed, from the state before the run and after the kill.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// No migration was open yet: the first run died before its begin.
    BeforeBegin,
    /// The migration was still the dead run's predecessor's (same owner):
    /// this run died before taking it over.
    BeforeTakeover,
    /// It owned the migration but had committed no chunk.
    BeforeFirstChunk,
    /// Mid-copy: it had committed chunks.
    Copying,
    /// In the switch's catch-up: its freeze is set, the switch not done.
    CatchingUp,
    /// After the switch's commit (the kill came too late to stop it).
    AfterSwitch,
}

impl Phase {
    /// For the summary.
    pub fn name(self) -> &'static str {
        match self {
            Phase::BeforeBegin => "before the begin",
            Phase::BeforeTakeover => "before taking the migration over",
            Phase::BeforeFirstChunk => "before its first chunk",
            Phase::Copying => "copying",
            Phase::CatchingUp => "in the switch's catch-up (frozen)",
            Phase::AfterSwitch => "after the switch",
        }
    }
}

/// What the state must look like, given the migration the campaign
/// expects.
#[derive(Clone, Debug)]
pub struct Expectation {
    /// The configured (old) collection.
    pub old: String,
    /// The target.
    pub new: String,
    /// The target's dimension.
    pub dimension: usize,
    /// The new model.
    pub model: String,
}

impl Expectation {
    /// Checks `after` (the store's state right after a kill) against
    /// `before` (right before the run) and classifies where the kill landed:
    /// either the old collection is active with the migration open (the
    /// expected target and source, cursor and rows copied not behind
    /// `before`'s) or the new one is active with no migration (generation
    /// 1, the old one retired) — never a mix.
    pub fn check_kill(&self, before: &IndexState, after: &IndexState) -> Result<Phase, String> {
        if after.generation == 0 {
            if after.active.as_ref().is_some_and(|a| *a != self.old) || after.retired.is_some() {
                return Err(format!(
                    "generation 0 but active {:?}, retired {:?}: a mix",
                    after.active, after.retired
                ));
            }
            let Some(m) = &after.migration else {
                return if before.migration.is_none() {
                    Ok(Phase::BeforeBegin)
                } else {
                    Err("the open migration disappeared without a switch".into())
                };
            };
            self.check_spec(m)?;
            let Some(b) = &before.migration else {
                return Ok(if m.copied == 0 {
                    Phase::BeforeFirstChunk
                } else {
                    Phase::Copying
                });
            };
            if m.cursor < b.cursor || m.copied < b.copied {
                return Err(format!(
                    "the migration went backwards: cursor {} → {}, copied {} → {}",
                    b.cursor, m.cursor, b.copied, m.copied
                ));
            }
            if m.started_ms != b.started_ms {
                return Err("the migration was restarted, not resumed".into());
            }
            if m.owner == b.owner {
                return Ok(Phase::BeforeTakeover);
            }
            if m.frozen_until_ms.is_some() && m.frozen_until_ms != b.frozen_until_ms {
                return Ok(Phase::CatchingUp);
            }
            return Ok(if m.copied == b.copied {
                Phase::BeforeFirstChunk
            } else {
                Phase::Copying
            });
        }
        if after.generation != 1
            || after.active.as_deref() != Some(self.new.as_str())
            || after.retired.as_deref() != Some(self.old.as_str())
            || after.migration.is_some()
        {
            return Err(format!(
                "after a switch: generation {}, active {:?}, retired {:?}, migration open: {} \
                 (expected generation 1, {:?} active, {:?} retired, none open)",
                after.generation,
                after.active,
                after.retired,
                after.migration.is_some(),
                self.new,
                self.old
            ));
        }
        Ok(Phase::AfterSwitch)
    }

    fn check_spec(&self, m: &Migration) -> Result<(), String> {
        let source_ok =
            matches!(&m.spec.source, ReindexSource::Embedder { model } if *model == self.model);
        if m.spec.target != self.new || m.spec.dimension != self.dimension || !source_ok {
            return Err(format!(
                "the open migration is {:?}, not to {:?} in {} dimensions with {:?}",
                m.spec, self.new, self.dimension, self.model
            ));
        }
        Ok(())
    }
}

/// Checks that `tandem reindex --status --json` says what the store says.
pub fn check_status(status: &Value, state: &IndexState) -> Result<(), String> {
    let cli: IndexState = serde_json::from_value(status.clone())
        .map_err(|e| format!("reindex --status --json is not an index state ({e}): {status}"))?;
    if cli != *state {
        return Err(format!(
            "reindex --status says {cli:?}, the store {state:?}"
        ));
    }
    Ok(())
}

/// The progress lines (`--json`) of a run's stderr: `(phase, copied)`.
pub fn progress_lines(stderr: &str) -> Vec<(String, u64)> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| Some((v["phase"].as_str()?.to_owned(), v["copied"].as_u64()?)))
        .collect()
}

/// One run of the re-index.
#[derive(Clone, Debug)]
pub struct Run {
    /// What was to end it.
    pub trigger: Trigger,
    /// Killed (`Some(phase)`), or it ended on its own (`None`).
    pub killed: Option<Phase>,
    /// The store's rows copied when it started and when it ended.
    pub copied_before: u64,
    /// See `copied_before`.
    pub copied_after: u64,
    /// Its first progress line's count (rows copied by every run so far).
    pub first_progress: Option<u64>,
    /// How long it ran.
    pub elapsed: Duration,
    /// What fired the catch-up kill ("freeze" or "progress line").
    pub note: String,
}

/// What the campaign did, for the summary and the test's assertions.
#[derive(Debug, Default)]
pub struct Summary {
    /// Every run of the re-index, in order.
    pub runs: Vec<Run>,
    /// The last run's report (`tandem reindex --json`).
    pub report: Value,
    /// Rows copied by all runs together.
    pub total_copied: u64,
    /// The writers' reports.
    pub writers: Vec<WriterReport>,
    /// Re-runs before the dead run's lease ended, refused (exit 3).
    pub early_reruns_refused: usize,
    /// Whether `verify` ran (and passed) with the migration open.
    pub verified_mid_migration: bool,
    /// Intents `tandem recover` resolved before that verify.
    pub recovered_mid_migration: u64,
    /// Records at the end.
    pub rows: usize,
    /// Texts the embedding server embedded with each model.
    pub texts_by_model: BTreeMap<String, usize>,
    /// Rows whose kept vector has the old / the new dimension.
    pub kept_old_dim: usize,
    /// See `kept_old_dim`.
    pub kept_new_dim: usize,
    /// Time to seed, to re-index (first start to switch), and in all.
    pub seed_time: Duration,
    /// See `seed_time`.
    pub reindex_time: Duration,
    /// See `seed_time`.
    pub elapsed: Duration,
}

impl Summary {
    /// Kills, by phase.
    pub fn kills_by_phase(&self) -> BTreeMap<Phase, usize> {
        let mut out = BTreeMap::new();
        for r in &self.runs {
            if let Some(p) = r.killed {
                *out.entry(p).or_default() += 1;
            }
        }
        out
    }

    /// Kills in all.
    pub fn kills(&self) -> usize {
        self.runs.iter().filter(|r| r.killed.is_some()).count()
    }

    /// Prints it.
    pub fn print(&self, records: usize) {
        let mut s = format!(
            "\n[reindex] {} kills of `tandem reindex` over {} run(s) in {:.1} s \
             (seed {:.1} s, re-index {:.1} s):\n",
            self.kills(),
            self.runs.len(),
            self.elapsed.as_secs_f64(),
            self.seed_time.as_secs_f64(),
            self.reindex_time.as_secs_f64()
        );
        let phases: Vec<String> = self
            .kills_by_phase()
            .iter()
            .map(|(p, n)| format!("{n} {}", p.name()))
            .collect();
        s.push_str(&format!("  kills by phase: {}\n", phases.join(", ")));
        for (i, r) in self.runs.iter().enumerate() {
            s.push_str(&format!(
                "  run {:>2}: {:<28} {:<34} rows copied {:>6} ({:>6} → {:>6}), first progress {:>6}, {:>5} ms{}\n",
                i + 1,
                match r.trigger {
                    Trigger::After(d) => format!("kill after {} ms", d.as_millis()),
                    Trigger::Copied(n) => format!("kill past {n} copied"),
                    Trigger::CatchingUp => "kill in the catch-up".into(),
                    Trigger::Finish => "to the end".into(),
                },
                r.killed.map_or("ended on its own".into(), |p| format!("killed {}", p.name())),
                r.copied_after.saturating_sub(r.copied_before),
                r.copied_before,
                r.copied_after,
                r.first_progress.map_or("-".into(), |n| n.to_string()),
                r.elapsed.as_millis(),
                if r.note.is_empty() { String::new() } else { format!(" ({})", r.note) },
            ));
        }
        s.push_str(&format!(
            "  rows copied by all runs: {} for {records} seed records and {} writer writes; \
             re-runs refused before the lease ended: {}; verify with the migration open: {}\n",
            self.total_copied,
            self.writers
                .iter()
                .map(|w| w.records_written)
                .sum::<usize>(),
            self.early_reruns_refused,
            if self.verified_mid_migration {
                format!(
                    "exact (after recovering {} intent(s))",
                    self.recovered_mid_migration
                )
            } else {
                "not run".into()
            }
        ));
        for w in &self.writers {
            s.push_str(&format!(
                "  writer {}: {} batches with the old model, {} with the new; {} records written, \
                 {} deletes ({} by the old configuration after the switch); refused after the switch: {}; retried: {:?}\n",
                w.index,
                w.batches_old,
                w.batches_new,
                w.records_written,
                w.deletes,
                w.old_config_deletes_after_switch,
                w.refusals
                    .iter()
                    .map(|(code, m)| {
                        let m = m.find("rejected").map_or(m.as_str(), |i| &m[i..]);
                        format!("exit {code:?} ({m})")
                    })
                    .collect::<Vec<_>>()
                    .join("; "),
                w.retried
            ));
        }
        s.push_str(&format!(
            "  after the switch: {} records = points, verify exact; texts embedded by model: {:?}; \
             kept vectors of the old dimension: {}, of the new: {}",
            self.rows, self.texts_by_model, self.kept_old_dim, self.kept_new_dim
        ));
        println!("{s}");
    }
}

/// The stores and servers the campaign runs against.
pub struct Setup {
    /// The `tandem` binary.
    pub bin: PathBuf,
    /// A working directory (inputs, outputs, `tandem.toml`).
    pub dir: PathBuf,
    /// The PostgreSQL schema and URL.
    pub schema: String,
    /// See `schema`.
    pub database_url: String,
    /// The Qdrant test server's URL.
    pub qdrant_url: String,
    /// The embedding server (every request of the campaign asks for its
    /// model's dimension).
    pub embed: Arc<EmbedServer>,
    /// Reads the metadata store between runs.
    pub store: Arc<StoreReader>,
    /// For the store reads.
    pub rt: Arc<tokio::runtime::Runtime>,
}

/// The campaign (see the module docs).
pub struct ReindexCampaign {
    setup: Setup,
    sizes: Sizes,
    rng: StdRng,
    new_collection: String,
    /// `--collection OLD --dim 8`: what an operator who never changed the
    /// configuration runs (`status`, `verify`, `recover`).
    operator: Tandem,
    /// The operator's configuration with the new model: the re-index.
    reindexer: Tandem,
    /// The writers' two configurations.
    old_writer: Tandem,
    new_writer: Tandem,
    expect: Expectation,
}

impl ReindexCampaign {
    /// Binds the campaign to `setup`; the collections get fresh names.
    pub fn new(setup: Setup, sizes: Sizes) -> Self {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let old_collection = format!("reindex_old_{suffix}");
        let new_collection = format!("reindex_new_{suffix}");
        let config_file = setup.dir.join("tandem.toml");
        std::fs::write(&config_file, config()).expect("write tandem.toml");
        let mut base = os(&["--json", "--config"]);
        base.push(config_file.into());
        base.extend(os(&[
            "--postgres-schema",
            &setup.schema,
            "--qdrant-url",
            &setup.qdrant_url,
        ]));
        let url = setup.embed.base_url();
        let with = |extra: &[&str]| {
            let mut g = base.clone();
            g.extend(os(extra));
            g
        };
        let old_dim = OLD_DIM.to_string();
        let new_dim = NEW_DIM.to_string();
        let cli = Tandem::new(
            setup.bin.clone(),
            &setup.dir,
            Vec::new(),
            vec![("DATABASE_URL".to_owned(), setup.database_url.clone())],
        );
        let operator = cli.with_global(with(&[
            "-q",
            "--collection",
            &old_collection,
            "--dim",
            &old_dim,
        ]));
        // Not quiet: its progress lines are read.
        let reindexer = cli.with_global(with(&[
            "--collection",
            &old_collection,
            "--dim",
            &old_dim,
            "--embed",
            "openai",
            "--embed-url",
            &url,
            "--embed-model",
            NEW_MODEL,
            "--embed-dimensions",
            &new_dim,
            "--embed-batch-texts",
            "500",
        ]));
        let old_writer = cli.with_global(with(&[
            "-q",
            "--collection",
            &old_collection,
            "--dim",
            &old_dim,
            "--embed",
            "openai",
            "--embed-url",
            &url,
            "--embed-model",
            OLD_MODEL,
            "--embed-dimensions",
            &old_dim,
            "--embed-batch-texts",
            "1000",
        ]));
        let new_writer = cli.with_global(with(&[
            "-q",
            "--collection",
            &new_collection,
            "--dim",
            &new_dim,
            "--embed",
            "openai",
            "--embed-url",
            &url,
            "--embed-model",
            NEW_MODEL,
            "--embed-dimensions",
            &new_dim,
        ]));
        let expect = Expectation {
            old: old_collection.clone(),
            new: new_collection.clone(),
            dimension: NEW_DIM,
            model: NEW_MODEL.to_owned(),
        };
        Self {
            rng: StdRng::seed_from_u64(sizes.seed),
            setup,
            sizes,
            new_collection,
            operator,
            reindexer,
            old_writer,
            new_writer,
            expect,
        }
    }

    fn say(&self, line: &str) {
        println!("[reindex] {line}");
    }

    fn state(&self) -> IndexState {
        self.setup.rt.block_on(self.setup.store.index_state())
    }

    fn must(&self, cli: &Tandem, args: &[&str]) -> Finished {
        let out = cli.run(args);
        assert_eq!(
            out.code(),
            Some(0),
            "`tandem {}` failed: exit {}\nstdout:\n{}\nstderr:\n{}",
            args.join(" "),
            out.status,
            out.stdout,
            out.stderr
        );
        out
    }

    fn reindex_args(&self) -> Vec<String> {
        vec![
            "reindex".into(),
            "--to-collection".into(),
            self.new_collection.clone(),
            "--to-dim".into(),
            NEW_DIM.to_string(),
        ]
    }

    /// Seeds the old collection: one `tandem ingest` of every record, the
    /// vectors made by the embedding server with the old model.
    fn seed(&mut self) -> BTreeMap<RecordId, Expected> {
        let mut seed = BTreeMap::new();
        let mut lines = Vec::with_capacity(self.sizes.records);
        for i in 0..self.sizes.records {
            let id = random_id(&mut self.rng);
            let scope = SCOPES[i % SCOPES.len()].to_owned();
            let content = format!("seed record {i}: {}", words(&mut self.rng, 6));
            lines.push(line(id, &scope, &content, json!({"seed": i})));
            seed.insert(id, (scope, content));
        }
        let path = self.setup.dir.join("seed.jsonl");
        write_lines(&path, &lines);
        let out = self.must(
            &self.old_writer,
            &[
                "ingest",
                &path.display().to_string(),
                "--batch-size",
                &SEED_BATCH.to_string(),
                "--idempotency-prefix",
                "seed",
            ],
        );
        let j = out.json();
        assert!(
            j["ok"] == true && j["inserted"] == self.sizes.records as u64,
            "the seed ingest: {j:#}"
        );
        self.say(&format!(
            "seeded {} records with {OLD_MODEL} ({OLD_DIM} dimensions) in {:.1} s",
            self.sizes.records,
            out.elapsed.as_secs_f64()
        ));
        seed
    }

    /// Runs the whole campaign; panics at the first broken check.
    pub fn run(mut self) -> Summary {
        let started = Instant::now();
        self.say(&format!(
            "seed {} (CRASH_CAMPAIGN_SEED replays the draws), {} records, {} kills",
            self.sizes.seed, self.sizes.records, self.sizes.kills
        ));
        self.must(&self.operator, &["migrate"]);
        let seed = self.seed();
        let mut summary = Summary {
            seed_time: started.elapsed(),
            ..Summary::default()
        };
        let flags = Flags::default();
        let writers: Vec<Writer> = (0..WRITERS)
            .map(|w| Writer {
                index: w,
                old: self.old_writer.clone(),
                new: self.new_writer.clone(),
                store: self.setup.store.clone(),
                rt: self.setup.rt.clone(),
                dir: self.setup.dir.clone(),
                new_collection: self.new_collection.clone(),
                seed: seed
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| i % WRITERS == w)
                    .map(|(_, (id, e))| (*id, e.clone()))
                    .collect(),
                rng: StdRng::seed_from_u64(self.sizes.seed.wrapping_add(w as u64 + 1)),
            })
            .collect();
        let flags = &flags;
        std::thread::scope(|scope| {
            let handles: Vec<_> = writers
                .into_iter()
                .map(|w| scope.spawn(move || w.run(flags)))
                .collect();
            {
                let _abort = SetOnDrop {
                    flag: &flags.abort,
                    only_when_panicking: true,
                };
                let reindex_started = Instant::now();
                self.reindex_with_kills(flags, &mut summary);
                summary.reindex_time = reindex_started.elapsed();
                flags.stop.store(true, Ordering::SeqCst);
            }
            for h in handles {
                match h.join() {
                    Ok(report) => summary.writers.push(report),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
        });
        self.after_the_switch(&seed, &mut summary);
        summary.elapsed = started.elapsed();
        summary
    }

    /// The runs of the re-index, killed as [`plan`] says, each re-run after
    /// the dead run's lease; returns once one switched.
    fn reindex_with_kills(&mut self, flags: &Flags, summary: &mut Summary) {
        let plan = plan(&mut self.rng, self.sizes.records, self.sizes.kills);
        let args = self.reindex_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // Time between two progress commits, measured as the runs go (the
        // random part of a kill after a threshold).
        let mut chunk_time = Duration::from_millis(300);
        let mut plan = plan.into_iter();
        let mut trigger = plan.next().expect("a plan");
        let mut unkilled_failures = 0;
        loop {
            assert!(
                !flags.writer_failed.load(Ordering::SeqCst),
                "a writer failed (its panic follows)"
            );
            let before = self.state();
            let copied_before = before.migration.as_ref().map_or(0, |m| m.copied);
            let frozen_before = before.migration.as_ref().and_then(|m| m.frozen_until_ms);
            let mut child = self.reindexer.spawn(&args);
            let start = Instant::now();
            let mut kill_at = match trigger {
                Trigger::After(d) => Some(start + d),
                _ => None,
            };
            let mut note = String::new();
            let (mut last_copied, mut last_change) = (copied_before, start);
            let ended_alone = loop {
                if flags.writer_failed.load(Ordering::SeqCst) {
                    drop(child.kill());
                    panic!("a writer failed (its panic follows)");
                }
                if !child.is_running() {
                    break true;
                }
                let now = Instant::now();
                if kill_at.is_some_and(|at| now >= at) {
                    break false;
                }
                let state = self.state();
                let m = state.migration.as_ref();
                let copied = m.map_or(last_copied, |m| m.copied);
                if copied != last_copied {
                    if last_copied != copied_before {
                        // A whole chunk's interval (not the run's start-up).
                        chunk_time = (chunk_time + (now - last_change)) / 2;
                    }
                    (last_copied, last_change) = (copied, now);
                }
                match trigger {
                    Trigger::Copied(n) if kill_at.is_none() && copied >= n => {
                        let part = self.rng.random_range(0.0..1.0);
                        kill_at = Some(now + chunk_time.mul_f64(part));
                    }
                    Trigger::CatchingUp if kill_at.is_none() => {
                        let frozen = m.and_then(|m| m.frozen_until_ms);
                        if frozen.is_some() && frozen != frozen_before {
                            note = "fired by the store's freeze".into();
                        } else if child.stderr_so_far().contains("\"catching_up\"") {
                            note = "fired by a catching_up progress line".into();
                        }
                        if !note.is_empty() {
                            // At once: the catch-up may take only a few
                            // milliseconds (a kill that comes too late
                            // finds the switch committed, or the run gone).
                            kill_at = Some(now);
                        }
                    }
                    _ => {}
                }
                if kill_at.is_some_and(|at| Instant::now() >= at) {
                    break false;
                }
                let poll = if trigger == Trigger::CatchingUp { 1 } else { 4 };
                std::thread::sleep(Duration::from_millis(poll));
            };
            let (out, killed) = if ended_alone {
                (child.wait(), false)
            } else {
                child.kill()
            };
            let after = self.state();
            let copied_after = after.migration.as_ref().map_or(copied_before, |m| m.copied);
            let first_progress = progress_lines(&out.stderr).first().map(|(_, n)| *n);
            // A re-run continues: its first progress counts what the
            // earlier runs copied (and at least its own first chunk).
            if let Some(first) = first_progress
                && before.migration.is_some()
                && first < copied_before
            {
                panic!(
                    "run {} restarted the copy: its first progress line counts {first} rows, \
                     the earlier runs had copied {copied_before}\n{}",
                    summary.runs.len() + 1,
                    out.stderr
                );
            }
            let phase = self
                .expect
                .check_kill(&before, &after)
                .unwrap_or_else(|e| panic!("run {}: {e}", summary.runs.len() + 1));
            let status = self.must(&self.operator, &["reindex", "--status"]).json();
            // No run is alive: the CLI must show exactly what the store holds.
            check_status(&status, &after).unwrap_or_else(|e| panic!("after a kill: {e}"));
            let mut run = Run {
                trigger,
                killed: killed.then_some(phase),
                copied_before,
                copied_after,
                first_progress,
                elapsed: out.elapsed,
                note,
            };
            if killed {
                self.say(&format!(
                    "kill {:>2}: {:?} at {} ms: {} (rows copied {copied_before} → {copied_after}){}",
                    summary.kills() + 1,
                    trigger,
                    out.elapsed.as_millis(),
                    phase.name(),
                    if run.note.is_empty() {
                        String::new()
                    } else {
                        format!(", {}", run.note)
                    }
                ));
                summary.runs.push(run);
                if phase == Phase::AfterSwitch {
                    // Its last progress line ("switched") counts every
                    // run's rows, if it was written before the kill.
                    let last = progress_lines(&out.stderr).last().map_or(0, |(_, n)| *n);
                    summary.total_copied = last.max(copied_before);
                    if let Some(run) = summary.runs.last_mut() {
                        run.copied_after = summary.total_copied;
                    }
                    self.say("the kill came after the switch's commit: the re-index is done");
                    return;
                }
                if summary.early_reruns_refused == 0 {
                    self.early_rerun(&args, summary);
                }
                if summary.kills() == self.sizes.kills / 2 {
                    flags.pause_writers();
                    summary.recovered_mid_migration = self.verify_while_open();
                    flags.resume_writers();
                    summary.verified_mid_migration = true;
                }
                self.wait_for_lease();
                trigger = plan.next().unwrap_or(Trigger::Finish);
                continue;
            }
            // It ended on its own.
            match out.code() {
                Some(0) => {
                    let report = out.json();
                    run.copied_after = copied_before + report["copied"].as_u64().unwrap_or(0);
                    summary.total_copied = run.copied_after;
                    summary.runs.push(run);
                    if trigger != Trigger::Finish {
                        panic!(
                            "run {} switched before its kill ({trigger:?}) came: the plan \
                             needs {} kills; stderr:\n{}",
                            summary.runs.len(),
                            self.sizes.kills,
                            out.stderr
                        );
                    }
                    if phase != Phase::AfterSwitch || report["switched"] != true {
                        panic!("the last run exited 0 without switching: {report:#}");
                    }
                    let resumed = copied_before > 0;
                    if report["resumed"] != resumed {
                        panic!(
                            "the last run reports resumed: {} after earlier runs copied \
                             {copied_before} rows",
                            report["resumed"]
                        );
                    }
                    self.say(&format!(
                        "run {} switched: {} rows copied by it, {} stale point(s) deleted, {} switch \
                         round(s), {} in-flight write(s) fenced, resumed: {}",
                        summary.runs.len(),
                        report["copied"],
                        report["garbage_deleted"],
                        report["switch_rounds"],
                        report["fenced"],
                        report["resumed"]
                    ));
                    summary.report = report;
                    return;
                }
                // Unavailable or blocked (a deadline, the switch's catch-up
                // rounds outrun by the writers): the copy is kept; re-run.
                Some(3) if unkilled_failures < 3 => {
                    unkilled_failures += 1;
                    self.say(&format!(
                        "run {} exited 3 on its own, re-running it: {}",
                        summary.runs.len() + 1,
                        out.stderr.lines().last().unwrap_or_default()
                    ));
                    run.note = "exited 3 on its own".into();
                    summary.runs.push(run);
                    self.wait_for_lease();
                }
                _ => panic!(
                    "run {} failed on its own: exit {}\nstdout:\n{}\nstderr:\n{}",
                    summary.runs.len() + 1,
                    out.status,
                    out.stdout,
                    out.stderr
                ),
            }
        }
    }

    /// A re-run right after a kill, before the dead run's lease ended, must
    /// be refused (exit 3: the migration is held by a live driver) and leave
    /// the migration as it was. Only tried with enough lease left for the
    /// process to start; it is killed before the lease ends, so that it can
    /// never take the migration over (inconclusive then, and tried again
    /// after the next kill).
    fn early_rerun(&mut self, args: &[&str], summary: &mut Summary) {
        let before = self.state();
        let Some(m) = &before.migration else { return };
        let left = m.lease_until_ms - now_ms() - 150;
        if left < 900 {
            return;
        }
        match self
            .reindexer
            .run_killed(args, Duration::from_millis(left as u64))
        {
            crate::campaign::KillOutcome::Exited { status, stderr, .. } => {
                assert_eq!(
                    status.code(),
                    Some(3),
                    "a re-run before the dead run's lease ended: {stderr}"
                );
                assert!(
                    stderr.contains("held by a live driver"),
                    "a re-run before the lease ended: {stderr}"
                );
                let after = self.state();
                assert_eq!(after, before, "a refused re-run changed the migration");
                summary.early_reruns_refused += 1;
                self.say(
                    "    a re-run before the lease ended was refused (exit 3), nothing changed",
                );
            }
            crate::campaign::KillOutcome::Killed(_) => {
                self.say("    the early re-run did not finish before the lease: inconclusive");
            }
        }
    }

    /// `tandem verify` with the migration open (a killed run's partial
    /// target beside the old collection), while the writers are paused
    /// between two writes: after `tandem recover` has resolved the intents
    /// the begin fenced (their writers retried), the old collection, still
    /// the active one, is exactly the rows' points (a re-index writes only
    /// to its target). Returns the intents recovered.
    ///
    /// The writers are paused because `verify` is exact only on a quiet
    /// system: a point an update supersedes and deletes while `verify` scans
    /// is reported as an orphan (its re-check asks whether a row or an
    /// intent names the point, not whether it still exists).
    fn verify_while_open(&self) -> u64 {
        let mut recovered = 0;
        for round in 1..=2 {
            let rec = self.must(&self.operator, &["recover"]).json();
            assert!(
                rec["failed"] == 0,
                "recover with the migration open: {rec:#}"
            );
            recovered += rec["resolved"].as_u64().unwrap_or(0);
            let out = self.operator.run(&["verify"]);
            let verify = out.json();
            check_no_missing_no_orphans(&verify)
                .unwrap_or_else(|e| panic!("verify with the migration open: {e}"));
            if verify["live_intents"] != 0 && round == 1 {
                // Cleanup a writer left to recovery, within its lease.
                self.setup.rt.block_on(self.setup.store.wait_for_leases());
                continue;
            }
            assert!(
                out.code() == Some(0) && verify["consistent"] == true,
                "verify with the migration open and the writers paused: {verify:#}"
            );
            break;
        }
        self.say(&format!(
            "    verify with the migration open (writers paused, {recovered} fenced intent(s) \
             recovered): the old collection is exact"
        ));
        recovered
    }

    /// Sleeps until the open migration's lease ended (a little after).
    fn wait_for_lease(&self) {
        if let Some(m) = &self.state().migration {
            let wait = m.lease_until_ms + 50 - now_ms();
            if wait > 0 {
                std::thread::sleep(Duration::from_millis(wait as u64));
            }
        }
    }

    /// The checks once the writers stopped: see the module docs.
    fn after_the_switch(&self, seed: &BTreeMap<RecordId, Expected>, summary: &mut Summary) {
        let state = self.state();
        assert_eq!(
            self.expect.check_kill(&state, &state),
            Ok(Phase::AfterSwitch),
            "the state after the campaign"
        );
        // Re-indexing into the active collection is refused.
        let args = self.reindex_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let again = self.reindexer.run(&args);
        assert_eq!(
            again.code(),
            Some(2),
            "a re-index into the active collection: {}",
            again.stderr
        );
        // Nothing should be left, but a writer may have left cleanup to
        // recovery: wait for the leases, then recover.
        let intents = self.setup.rt.block_on(self.setup.store.wait_for_leases());
        let rec = self.must(&self.operator, &["recover"]).json();
        assert!(
            rec["failed"] == 0 && rec["pending_intents"] == 0,
            "recover: {rec:#}"
        );
        let rows = self.setup.rt.block_on(self.setup.store.rows());
        for (who, cli) in [("old", &self.operator), ("new", &self.new_writer)] {
            let out = cli.run(&["verify"]);
            let verify = out.json();
            assert_eq!(
                out.code(),
                Some(0),
                "verify with the {who} configuration after the switch: {verify:#}"
            );
            check_exact(&verify, &rows)
                .unwrap_or_else(|e| panic!("verify with the {who} configuration: {e}"));
        }
        // The records: the seed, with every write the writers saw committed.
        let mut expected: BTreeMap<RecordId, Option<Expected>> =
            seed.iter().map(|(id, e)| (*id, Some(e.clone()))).collect();
        for w in &summary.writers {
            expected.extend(w.expected.iter().map(|(id, e)| (*id, e.clone())));
        }
        let mut problems = Vec::new();
        for (id, want) in &expected {
            let got = rows
                .get(id)
                .map(|r| (r.scope.to_string(), r.content.clone()));
            if got != *want {
                problems.push(format!("record {id}: stored {got:?}, expected {want:?}"));
            }
        }
        for id in rows.keys() {
            if !expected.contains_key(id) {
                problems.push(format!("record {id} was never written"));
            }
        }
        assert!(
            problems.is_empty(),
            "{} record(s) differ from the seed and the writers' committed writes:\n  {}",
            problems.len(),
            problems
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n  ")
        );
        summary.rows = rows.len();
        summary.kept_old_dim = rows
            .values()
            .filter(|r| r.vector.as_ref().is_some_and(|v| v.len() == OLD_DIM))
            .count();
        summary.kept_new_dim = rows
            .values()
            .filter(|r| r.vector.as_ref().is_some_and(|v| v.len() == NEW_DIM))
            .count();
        // The switch made the new model's vectors the kept ones (so that a
        // repair after it writes them): every row, written before the
        // switch (re-embedded by the copy) or after it (by a new writer),
        // keeps the new model's vector of its content.
        let stale: Vec<String> = rows
            .values()
            .filter(|r| {
                let want = crate::embed_server::text_vector(&r.content, NEW_DIM);
                !r.vector.as_ref().is_some_and(|v| {
                    v.len() == want.len() && v.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5)
                })
            })
            .take(5)
            .map(|r| {
                format!(
                    "{} (kept {:?} components)",
                    r.id,
                    r.vector.as_ref().map(Vec::len)
                )
            })
            .collect();
        assert!(
            stale.is_empty(),
            "rows keep a vector other than the new model's after the switch: {stale:?}"
        );
        self.check_new_collection(&rows);
        for r in self.setup.embed.requests() {
            let want = if r.model == NEW_MODEL {
                NEW_DIM
            } else {
                OLD_DIM
            };
            assert_eq!(
                r.dimensions,
                Some(want),
                "a request for {} asked for {:?} dimensions",
                r.model,
                r.dimensions
            );
            *summary.texts_by_model.entry(r.model).or_default() += r.texts.len();
        }
        self.say(&format!(
            "after the switch: {intents} intent(s) recovered, verify exact with both \
             configurations ({} records = points), every committed write present",
            rows.len()
        ));
    }

    /// The new collection, read directly: its dimension, one point per row,
    /// and sampled records found first at the new model's vector of their
    /// content (so their points were re-embedded, not copied).
    fn check_new_collection(&self, rows: &BTreeMap<RecordId, StoredRecord>) {
        use tandem_adapters::qdrant::{QdrantCatalog, QdrantConfig};
        use tandem_core::{Filter, IndexCatalog, IndexQuery, VectorIndex};
        let rt = &self.setup.rt;
        let catalog = QdrantCatalog::new(QdrantConfig::new(
            self.setup.qdrant_url.as_str(),
            self.new_collection.clone(),
            NEW_DIM,
            tandem_core::Distance::Cosine,
        ))
        .expect("a Qdrant catalog");
        let index = rt
            .block_on(catalog.open(&self.new_collection))
            .expect("open the new collection");
        assert_eq!(index.dimension(), NEW_DIM, "the new collection's dimension");
        let points = rt.block_on(index.count(None)).expect("count");
        assert_eq!(points, rows.len() as u64, "points in the new collection");
        let mut rng = StdRng::seed_from_u64(self.sizes.seed ^ 0x5eed);
        let sample: Vec<&StoredRecord> = rows.values().collect();
        for r in sample.choose_multiple(&mut rng, 8) {
            let hits = rt
                .block_on(index.search(&IndexQuery {
                    vector: crate::embed_server::text_vector(&r.content, NEW_DIM),
                    limit: 1,
                    filter: Filter::default(),
                    score_threshold: None,
                }))
                .expect("search the new collection");
            assert_eq!(
                hits.first().map(|h| h.id),
                Some(r.point_id),
                "record {} is not found at the new model's vector of its content",
                r.id
            );
        }
        // And through the CLI with the new configuration: the query is
        // embedded with the new model, the search guarded.
        let r = sample.choose(&mut rng).expect("records");
        let hits = self
            .must(
                &self.new_writer,
                &["search", "--text", &r.content, "-k", "1"],
            )
            .json();
        assert_eq!(
            hits[0]["id"],
            json!(r.id.to_string()),
            "tandem search --text with the new model: {hits:#}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_core::{MigrationSpec, OwnerToken};

    fn expectation() -> Expectation {
        Expectation {
            old: "old".into(),
            new: "new".into(),
            dimension: 12,
            model: "m2".into(),
        }
    }

    fn open(owner: OwnerToken, cursor: u64, copied: u64) -> IndexState {
        IndexState {
            generation: 0,
            active: None,
            retired: None,
            migration: Some(Migration {
                spec: MigrationSpec {
                    target: "new".into(),
                    dimension: 12,
                    distance: tandem_core::Distance::Cosine,
                    source: ReindexSource::Embedder { model: "m2".into() },
                },
                owner,
                lease_until_ms: 10,
                cursor,
                copied,
                started_ms: 1,
                frozen_until_ms: None,
            }),
        }
    }

    /// The per-kill check classifies every legal state and rejects mixes,
    /// regressions and restarts.
    #[test]
    fn the_kill_check_rejects_what_it_must() {
        let e = expectation();
        let (a, b) = (OwnerToken::new_random(), OwnerToken::new_random());
        let none = IndexState::default();
        assert_eq!(e.check_kill(&none, &none), Ok(Phase::BeforeBegin));
        assert_eq!(
            e.check_kill(&none, &open(b, 0, 0)),
            Ok(Phase::BeforeFirstChunk)
        );
        assert_eq!(e.check_kill(&none, &open(b, 9, 5)), Ok(Phase::Copying));
        let was = open(a, 10, 100);
        assert_eq!(e.check_kill(&was, &was), Ok(Phase::BeforeTakeover));
        assert_eq!(
            e.check_kill(&was, &open(b, 10, 100)),
            Ok(Phase::BeforeFirstChunk)
        );
        assert_eq!(e.check_kill(&was, &open(b, 20, 150)), Ok(Phase::Copying));
        let mut frozen = open(b, 20, 150);
        frozen.migration.as_mut().unwrap().frozen_until_ms = Some(99);
        assert_eq!(e.check_kill(&was, &frozen), Ok(Phase::CatchingUp));
        let switched = IndexState {
            generation: 1,
            active: Some("new".into()),
            retired: Some("old".into()),
            migration: None,
        };
        assert_eq!(e.check_kill(&was, &switched), Ok(Phase::AfterSwitch));

        // Backwards, restarted, lost, a mix, another target or model.
        assert!(e.check_kill(&was, &open(b, 9, 100)).is_err());
        assert!(e.check_kill(&was, &open(b, 10, 99)).is_err());
        let mut restarted = open(b, 20, 150);
        restarted.migration.as_mut().unwrap().started_ms = 2;
        assert!(e.check_kill(&was, &restarted).is_err());
        assert!(e.check_kill(&was, &none).is_err());
        let mut mix = switched.clone();
        mix.migration = open(b, 1, 1).migration;
        assert!(e.check_kill(&was, &mix).is_err());
        let mut mix = open(b, 20, 150);
        mix.active = Some("new".into());
        assert!(e.check_kill(&was, &mix).is_err());
        let mut two = switched.clone();
        two.generation = 2;
        assert!(e.check_kill(&was, &two).is_err());
        let mut other = open(b, 20, 150);
        other.migration.as_mut().unwrap().spec.source = ReindexSource::KeptVectors;
        assert!(e.check_kill(&was, &other).is_err());
        let mut other = open(b, 20, 150);
        other.migration.as_mut().unwrap().spec.dimension = 8;
        assert!(e.check_kill(&was, &other).is_err());

        // The CLI's status must be the store's.
        let status = serde_json::to_value(&was).unwrap();
        check_status(&status, &was).expect("the same state");
        assert!(check_status(&status, &open(a, 11, 100)).is_err());
        assert!(check_status(&json!({"generation": "x"}), &was).is_err());
    }

    #[test]
    fn the_plan_spreads_the_kills_over_the_copy() {
        let mut rng = StdRng::seed_from_u64(3);
        let p = plan(&mut rng, 50_000, 10);
        assert_eq!(p.len(), 11);
        assert!(matches!(p[0], Trigger::After(_)));
        assert_eq!(p[9], Trigger::CatchingUp);
        assert_eq!(p[10], Trigger::Finish);
        let thresholds: Vec<u64> = p
            .iter()
            .filter_map(|t| match t {
                Trigger::Copied(n) => Some(*n),
                _ => None,
            })
            .collect();
        assert_eq!(thresholds.len(), 8);
        assert!(thresholds.windows(2).all(|w| w[0] < w[1]), "{thresholds:?}");
        assert!(
            thresholds[0] >= 1_000 && thresholds[7] <= 45_000,
            "{thresholds:?}"
        );
        assert!(
            thresholds[3] < 25_000 && thresholds[4] > 20_000,
            "{thresholds:?}"
        );
        // A small campaign keeps its last threshold two chunks from the end.
        let p = plan(&mut rng, 5 * CHUNK, 10);
        let last = p.iter().rev().find_map(|t| match t {
            Trigger::Copied(n) => Some(*n),
            _ => None,
        });
        assert!(last.is_some_and(|n| n <= 3 * CHUNK as u64), "{p:?}");
    }

    #[test]
    fn progress_lines_are_read_from_stderr() {
        let stderr = "{\"phase\":\"copying\",\"copied\":1000,\"total\":5}\nnot json\n\
                      {\"phase\":\"catching_up\",\"copied\":1200,\"total\":5}\n";
        assert_eq!(
            progress_lines(stderr),
            vec![("copying".into(), 1000), ("catching_up".into(), 1200)]
        );
    }
}
