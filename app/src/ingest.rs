//! `tandem ingest`: JSON Lines in, all-or-nothing batches out.
//!
//! A reader thread parses the input into batches of `--batch-size` records;
//! with `--embed`, an embedding task computes the vectors of the records that
//! have none (one embedder call per batch, while the batch before it is being
//! written); the writer writes them. The channels between them hold at most
//! two batches, so memory stays bounded whatever the input's size. Every line
//! of a batch is parsed, and every vector computed, before the batch is
//! written; a batch with a bad line, or whose embedding failed, is not written
//! and ingestion stops there, after the batches before it.
//!
//! A batch that fails with a *retryable* error (a store unavailable, the call
//! deadline passed, the outcome unknown) is written again under the same
//! idempotency key, with backoff, up to `--batch-retries` times within
//! `--batch-retry-for` of its first failure ([`BatchRetry`]). Every batch has
//! a key while retries are on: `PREFIX:N` with `--idempotency-prefix`, else
//! one made up for this run (`ingest-<run id>:N`), so a retry after an
//! unknown outcome replays the batch if its first attempt committed, and
//! never writes it twice.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Read};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tandem_core::{
    CoordinatorError, DeleteSelector, EmbedError, NewRecord, RecordId, SagaRun, SagaState, Scope,
    Transaction, TransactionReport, UpsertReport, ValidationError, WriteOptions,
};
use tokio::sync::{mpsc, watch};

use crate::backend::{AppCoordinator, Index, Repo, Stores};
use crate::cli::EmbedMode;
use crate::embed::AppEmbedder;
use crate::error::{AppError, one_line};
use crate::output::{self, Output};

/// The longest line accepted (a record with a 1536-d vector is ~30 KB).
const MAX_LINE: usize = 64 << 20;
/// Parsed batches waiting to be written: this bounds memory.
const QUEUE: usize = 2;

/// What to ingest and how.
#[derive(Clone, Debug)]
pub struct IngestPlan {
    /// A file path, or `-` for stdin.
    pub input: String,
    /// Records per batch.
    pub batch_size: usize,
    /// How records without a vector get one.
    pub embed: EmbedMode,
    /// Batch N gets the idempotency key `PREFIX:N`.
    pub idempotency_prefix: Option<String>,
    /// Optimize the embedded index after the last batch.
    pub optimize: bool,
    /// How often and how long a failed batch is retried.
    pub retry: BatchRetry,
    /// All or nothing for the whole input: one durable saga
    /// ([`INGEST_SAGA`]) whose steps are the batches.
    pub atomic: bool,
    /// With `atomic`: as the saga's last steps, delete the records of this
    /// scope that the input did not write.
    pub replace_scope: Option<Scope>,
    /// Deferred writes: wait at most this long, after the last batch, until
    /// every record written is searchable.
    pub wait_indexed: Option<Duration>,
}

/// The saga an atomic ingest runs (`tandem ingest --atomic`). Its steps are
/// the input's batches, given as the ingest reads them, so no other process
/// can rebuild them: recovery compensates an atomic ingest whose process
/// died before it finished. Every command registers it
/// ([`crate::backend::Stores::coordinator`]), so `tandem recover` and
/// `tandem serve` finish what a killed ingest left.
pub const INGEST_SAGA: &str = "tandem.ingest";

/// The definition of [`INGEST_SAGA`].
pub fn ingest_saga() -> tandem_core::SagaDefinition {
    tandem_core::SagaDefinition::dynamic(INGEST_SAGA)
}

/// How a batch that failed with a retryable error is retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchRetry {
    /// Retries of one batch after its first attempt (0: stop at the first
    /// failed batch).
    pub retries: u32,
    /// No retry starts later than this after the batch's first failure.
    pub retry_for: Duration,
}

impl BatchRetry {
    /// The default number of retries of one batch.
    pub const DEFAULT_RETRIES: u32 = 10;
    /// The default time to keep retrying one batch: long enough to ride out a
    /// Qdrant node's restart (10–20 s) or a PostgreSQL failover.
    pub const DEFAULT_RETRY_FOR: Duration = Duration::from_secs(120);
    /// The first backoff; it doubles per retry up to [`Self::MAX_BACKOFF`].
    const FIRST_BACKOFF: Duration = Duration::from_millis(500);
    /// The longest backoff between two attempts.
    const MAX_BACKOFF: Duration = Duration::from_secs(5);

    /// The wait before retry number `retry` (1-based): `0.5 s × 2^(retry-1)`,
    /// at most 5 s, with jitter (between half and all of it) so that several
    /// ingests do not retry in step.
    fn backoff(retry: u32) -> Duration {
        let cap = Self::FIRST_BACKOFF
            .saturating_mul(1u32 << retry.saturating_sub(1).min(16))
            .min(Self::MAX_BACKOFF);
        cap.mul_f64(0.5 + fastrand::f64() / 2.0)
    }
}

impl Default for BatchRetry {
    fn default() -> Self {
        Self {
            retries: Self::DEFAULT_RETRIES,
            retry_for: Self::DEFAULT_RETRY_FOR,
        }
    }
}

/// Parses a duration for `--batch-retry-for`: a number with the unit `ms`,
/// `s`, `m` or `h` (`90s`, `2m`, `1.5s`), or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (number, unit) = match t.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let scale = match unit {
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(format!(
                "{text:?}: the unit must be ms, s, m or h (e.g. 90s, 2m)"
            ));
        }
    };
    let n: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 90s, 2m, 500ms)"))?;
    Duration::try_from_secs_f64(n * scale)
        .map_err(|_| format!("{text:?} is not a duration of zero or more"))
}

/// One JSON Lines record as written in the input.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputRecord {
    #[serde(default)]
    id: Option<String>,
    scope: String,
    #[serde(default)]
    content: String,
    #[serde(default)]
    metadata: Option<Value>,
    #[serde(default)]
    vector: Option<Vec<f32>>,
}

/// The embedder of an ingest, and how messages name it.
#[derive(Clone)]
pub struct IngestEmbedder {
    /// The embedder.
    pub embedder: AppEmbedder,
    /// "model \"m\" at http://host:port", or "the hash embedding".
    pub describe: String,
}

/// A parsed batch: its records and the input line of each.
struct Batch {
    number: usize,
    lines: Vec<usize>,
    records: Vec<NewRecord>,
    /// Positions of the records without a vector, to embed.
    to_embed: Vec<usize>,
    /// `records.len()`, kept once the records were handed over.
    records_len: u64,
    /// Input bytes consumed up to the end of this batch.
    bytes_end: u64,
}

/// A batch with at least one bad line.
struct BadBatch {
    number: usize,
    first_line: usize,
    last_line: usize,
    line: usize,
    message: String,
    bad_lines: usize,
}

/// A batch whose embedding failed (after the embedder's retries).
struct EmbedFailure {
    number: usize,
    lines: Vec<usize>,
    /// The text the embedder refused, as a position in the batch.
    record: Option<usize>,
    error: EmbedError,
}

enum Msg {
    Batch(Batch),
    Bad(BadBatch),
    EmbedFailed(EmbedFailure),
    Io(String),
}

/// What ingest did, for the summary.
#[derive(Debug, Default, Serialize)]
pub struct IngestSummary {
    /// The input.
    pub input: String,
    /// With `--wait-indexed`: `indexed`, `timed_out` or `dead_lettered`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_indexed: Option<&'static str>,
    /// The deferred batches' tokens, for `--wait-indexed`.
    #[serde(skip)]
    pub tokens: Vec<(RecordId, u64)>,
    /// Whether every batch was written (or replayed).
    pub ok: bool,
    /// Batches committed now.
    pub batches_committed: usize,
    /// Batches answered from their idempotency key (written by an earlier run).
    pub batches_replayed: usize,
    /// Records in committed and replayed batches.
    pub records: u64,
    /// Records inserted now.
    pub inserted: u64,
    /// Records updated now.
    pub updated: u64,
    /// Records of replayed batches (nothing written).
    pub replayed_records: u64,
    /// Records whose vector the embedder computed (in batches sent to the
    /// stores).
    pub records_embedded: u64,
    /// Superseded points whose deletion was left to recovery.
    pub deferred_cleanup: u64,
    /// Wall time.
    pub elapsed_secs: f64,
    /// Records committed or replayed per second.
    pub records_per_sec: f64,
    /// Batches sent to the stores (each counted once, however often it was
    /// tried).
    pub batches_attempted: usize,
    /// Batches that failed at least once with a retryable error and were
    /// retried under their idempotency key.
    pub batches_retried: usize,
    /// Retries in all (attempts after a batch's first).
    pub batch_retries: usize,
    /// Batches that failed for good (ingest stops at the first).
    pub batches_failed: usize,
    /// Batches whose attempt had an unknown outcome, found committed by the
    /// retry (answered from their key); counted as committed.
    pub batches_settled_by_key: usize,
    /// Stopped by Ctrl-C between batches.
    pub interrupted: bool,
    /// Seconds spent optimizing the embedded index after the last batch
    /// (`--optimize`; not part of `elapsed_secs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optimize_secs: Option<f64>,
    /// Why it stopped early.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<IngestFailure>,
    /// With `--atomic`: the saga and how it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub saga: Option<AtomicSummary>,
}

/// How an atomic ingest's saga ended.
#[derive(Debug, Serialize)]
pub struct AtomicSummary {
    /// The saga's id (`tandem saga show ID`).
    pub id: String,
    /// Its state: `done` (every batch stands), `compensated` (none does),
    /// or `running`/`compensating` (unfinished: `tandem recover` ends it).
    pub state: String,
    /// Records of `--replace-scope` deleted because the input did not write
    /// them.
    pub replaced_deleted: u64,
}

/// Where ingest stopped.
#[derive(Debug, Serialize)]
pub struct IngestFailure {
    /// The message (also printed on stderr).
    pub message: String,
    /// The batch that was not written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<usize>,
    /// The offending input line, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// The process exit code.
    pub exit_code: u8,
}

/// Runs `tandem ingest`. Prints the summary (also when stopping early) and
/// returns the error that stopped it, if any.
pub async fn run(
    plan: IngestPlan,
    embedder: Option<IngestEmbedder>,
    stores: &Stores,
    coordinator: Arc<AppCoordinator>,
    out: Output,
    redactor: &crate::error::Redactor,
) -> Result<(), AppError> {
    if plan.batch_size == 0 {
        return Err(AppError::Usage("--batch-size must be at least 1".into()));
    }
    let max = coordinator.config().limits.max_batch;
    if plan.batch_size > max {
        return Err(AppError::Usage(format!(
            "--batch-size {} exceeds the coordinator's limit of {max} records per batch",
            plan.batch_size
        )));
    }
    let (source, total_bytes) = open_source(&plan.input)?;
    let (tx, parsed) = mpsc::channel(QUEUE);
    let reader_plan = plan.clone();
    std::thread::Builder::new()
        .name("tandem-ingest-reader".into())
        .spawn(move || read_batches(source, &reader_plan, tx))
        .map_err(|e| AppError::Failed(format!("cannot start the reader thread: {e}")))?;
    let (tx, mut rx) = mpsc::channel(1);
    tokio::spawn(embed_stage(
        parsed,
        tx,
        embedder.as_ref().map(|e| e.embedder.clone()),
    ));
    let embedded_with = embedder
        .as_ref()
        .map(|e| e.describe.clone())
        .unwrap_or_default();

    let interrupted = interrupt_signal();
    let mut progress = Progress::new(out.quiet, total_bytes);
    let started = Instant::now();
    let mut summary = IngestSummary {
        input: plan.input.clone(),
        ..IngestSummary::default()
    };
    let mut failure: Option<(AppError, Option<usize>, Option<usize>)> = None;
    let mut interrupt = interrupted.clone();
    // Every batch gets a key while retries are on, so that a retry after an
    // unknown outcome cannot write a batch twice.
    let key_prefix = match (&plan.idempotency_prefix, plan.retry.retries) {
        _ if plan.atomic => None,
        (Some(p), _) => Some(p.clone()),
        (None, 0) => None,
        (None, _) => Some(format!("ingest-{}", uuid::Uuid::now_v7().simple())),
    };
    // An atomic ingest is one saga; its steps carry their own keys.
    let mut saga = match plan.atomic {
        false => None,
        true => {
            let input = serde_json::json!({
                "input": plan.input,
                "batch_size": plan.batch_size,
                "replace_scope": plan.replace_scope.as_ref().map(Scope::as_str),
            });
            let run = coordinator
                .begin_saga(INGEST_SAGA, input)
                .await
                .map_err(|e| stores.error("starting the ingest's saga", e))?;
            tracing::info!(saga = %run.id(), "atomic ingest: one saga, one step per batch");
            Some(Atomic {
                run,
                written: plan.replace_scope.as_ref().map(|_| HashSet::new()),
            })
        }
    };
    loop {
        let msg = tokio::select! {
            biased;
            _ = interrupt.wait_for(|v| *v) => {
                summary.interrupted = true;
                break;
            }
            msg = rx.recv() => msg,
        };
        let Some(msg) = msg else { break };
        match msg {
            Msg::Batch(batch) => {
                let number = batch.number;
                summary.batches_attempted += 1;
                summary.records_embedded += batch.to_embed.len() as u64;
                let opts = WriteOptions {
                    idempotency_key: key_prefix.as_ref().map(|p| format!("{p}:{number}")),
                    write_mode: None,
                };
                let written = match saga.as_mut() {
                    None => {
                        write_batch(
                            &coordinator,
                            batch.records,
                            &opts,
                            &plan.retry,
                            &mut interrupt,
                        )
                        .await
                    }
                    Some(atomic) => {
                        let name = format!("batch {number}");
                        let run = &mut atomic.run;
                        let written = write_attempts(
                            batch.records,
                            None,
                            &plan.retry,
                            &mut interrupt,
                            async |records| {
                                let tx = Transaction::new().upsert(records);
                                run.step(&name, tx).await.map(BatchReport::from)
                            },
                        )
                        .await;
                        if let (Some(ids), Ok(report)) = (&mut atomic.written, &written.result) {
                            ids.extend(report.ids.iter().copied());
                        }
                        written
                    }
                };
                match written {
                    Written {
                        result: Ok(report),
                        retries,
                        unknown_before,
                        ..
                    } => {
                        count_retries(&mut summary, retries);
                        let settled = report.replayed && unknown_before;
                        account(&mut summary, &report, batch.records_len, settled);
                        progress.batch_done(&summary, number, batch.bytes_end, started);
                    }
                    Written {
                        result: Err(e),
                        retries,
                        retrying_for,
                        interrupted: stopped,
                        ..
                    } => {
                        count_retries(&mut summary, retries);
                        summary.batches_failed += 1;
                        summary.interrupted |= stopped;
                        metrics::counter!("tandem_ingest_batches_total", "outcome" => "failed")
                            .increment(1);
                        let line = error_line(&e, &batch.lines);
                        let retried = (retries > 0).then_some((retries, retrying_for));
                        let key = opts.idempotency_key.as_deref();
                        let own_key = plan.idempotency_prefix.is_none();
                        failure = Some((
                            batch_error(e, number, &batch.lines, stores, retried, key, own_key),
                            Some(number),
                            line,
                        ));
                        break;
                    }
                }
            }
            Msg::Bad(bad) => {
                metrics::counter!("tandem_ingest_batches_total", "outcome" => "invalid")
                    .increment(1);
                let others = match bad.bad_lines {
                    1 => String::new(),
                    n => format!(" ({} bad lines in this batch)", n),
                };
                let message = format!(
                    "line {}: {}{others}; {} was not written",
                    bad.line,
                    bad.message,
                    batch_span(bad.number, bad.first_line, bad.last_line)
                );
                failure = Some((AppError::Input(message), Some(bad.number), Some(bad.line)));
                break;
            }
            Msg::EmbedFailed(f) => {
                summary.batches_failed += 1;
                metrics::counter!("tandem_ingest_batches_total", "outcome" => "embed_failed")
                    .increment(1);
                let (error, line) =
                    embed_failure(f.error, f.record, f.number, &f.lines, &embedded_with);
                failure = Some((error, Some(f.number), line));
                break;
            }
            Msg::Io(e) => {
                failure = Some((
                    AppError::Failed(format!("cannot read {}: {e}", plan.input)),
                    None,
                    None,
                ));
                break;
            }
        }
    }
    if let Some(atomic) = saga.take() {
        let stopped = failure.is_some() || summary.interrupted;
        let (ended, error) = end_saga(atomic, stopped, &plan, &coordinator, stores).await;
        summary.saga = Some(ended);
        if let Some(error) = error {
            failure = Some(match failure.take() {
                // The first error stays the one reported; how the saga ended
                // is said next to it.
                Some((first, batch, line)) => (first.noted(error.to_string()), batch, line),
                None if summary.interrupted => {
                    (AppError::Interrupted.noted(error.to_string()), None, None)
                }
                None => (error, None, None),
            });
        }
    }
    progress.finish();
    summary.elapsed_secs = started.elapsed().as_secs_f64();
    if failure.is_none() && !summary.interrupted && plan.optimize {
        let t = Instant::now();
        if stores.optimize().await? {
            summary.optimize_secs = Some(t.elapsed().as_secs_f64());
        }
    }
    summary.records_per_sec = if summary.elapsed_secs > 0.0 {
        summary.records as f64 / summary.elapsed_secs
    } else {
        0.0
    };
    if let (None, false, Some(timeout)) = (&failure, summary.interrupted, plan.wait_indexed) {
        let token = tandem_core::IndexToken {
            records: std::mem::take(&mut summary.tokens),
        };
        let waited = coordinator
            .wait_indexed(&token, timeout)
            .await
            .map_err(|e| stores.error("ingest --wait-indexed", e))?;
        let (status, error) = match waited {
            tandem_core::IndexWait::Indexed => ("indexed", None),
            tandem_core::IndexWait::TimedOut { waiting } => (
                "timed_out",
                Some(format!(
                    "{} record(s) not yet searchable after {timeout:?} (are index workers running?)",
                    waiting.len()
                )),
            ),
            tandem_core::IndexWait::DeadLettered { dead } => (
                "dead_lettered",
                Some(format!(
                    "{} record(s) were dead-lettered (tandem dlq list)",
                    dead.len()
                )),
            ),
        };
        summary.wait_indexed = Some(status);
        if let Some(message) = error {
            failure = Some((AppError::Failed(message), None, None));
        }
    }
    let result = match failure {
        Some((error, batch, line)) => {
            summary.error = Some(IngestFailure {
                message: one_line(&error, redactor),
                batch,
                line,
                exit_code: error.exit_code(),
            });
            Err(error)
        }
        None if summary.interrupted => Err(AppError::Interrupted),
        None => Ok(()),
    };
    summary.ok = result.is_ok();
    print_summary(&summary, out);
    result
}

/// An atomic ingest in progress.
struct Atomic<'c> {
    run: SagaRun<'c, Repo, Index>,
    /// The ids written so far, when `--replace-scope` needs them.
    written: Option<HashSet<RecordId>>,
}

/// Ends an atomic ingest's saga: after every batch, the `--replace-scope`
/// deletions as its last steps, then finish (every batch stands); after a
/// failure or Ctrl-C, abort (every batch written so far is undone). Returns
/// how it ended, and an error if the ingest must fail because of it.
async fn end_saga(
    atomic: Atomic<'_>,
    stopped: bool,
    plan: &IngestPlan,
    coordinator: &AppCoordinator,
    stores: &Stores,
) -> (AtomicSummary, Option<AppError>) {
    let Atomic { mut run, written } = atomic;
    let id = run.id();
    let mut summary = AtomicSummary {
        id: id.to_string(),
        state: SagaState::Running.as_str().to_owned(),
        replaced_deleted: 0,
    };
    let mut reason = "the ingest stopped before its last batch".to_owned();
    let mut error = None;
    if !stopped {
        let replaced = match (&plan.replace_scope, &written) {
            (Some(scope), Some(ids)) => {
                replace_scope(&mut run, coordinator, scope, ids, &plan.retry).await
            }
            _ => Ok(0),
        };
        match replaced {
            Ok(n) => {
                summary.replaced_deleted = n;
                return match run.finish().await {
                    Ok(outcome) => {
                        summary.state = outcome.state.as_str().to_owned();
                        (summary, None)
                    }
                    Err(e) => (
                        summary,
                        Some(stores.error(
                            &format!(
                                "every batch was written, but saga {id} could not be ended \
                                 (`tandem recover` undoes it after the lease); ending it"
                            ),
                            e,
                        )),
                    ),
                };
            }
            Err(e) => {
                reason = format!("replacing scope: {e}");
                error = Some(stores.error(
                    &format!(
                        "deleting the records of scope {:?} that the input did not write",
                        plan.replace_scope.as_ref().map_or("", Scope::as_str)
                    ),
                    e,
                ));
            }
        }
    }
    match run.abort(&reason).await {
        Ok(outcome) => {
            summary.state = outcome.state.as_str().to_owned();
            tracing::warn!(saga = %id, state = %summary.state, "atomic ingest undone: none of its batches stands");
            let note = AppError::Failed(format!(
                "the atomic ingest was undone (saga {id} {}): none of its records stands",
                summary.state
            ));
            (
                summary,
                Some(error.map_or(note, |e| e.noted("the atomic ingest was undone"))),
            )
        }
        Err(e) => {
            summary.state = SagaState::Compensating.as_str().to_owned();
            let e = stores.error(
                &format!(
                    "atomic ingest stopped and its saga {id} could not be undone now \
                     (`tandem recover` undoes it after the lease); undoing it"
                ),
                e,
            );
            (summary, Some(e))
        }
    }
}

/// `--replace-scope`: deletes, as the saga's last steps, the records of
/// `scope` whose ids the ingest did not write. Returns how many.
async fn replace_scope(
    run: &mut SagaRun<'_, Repo, Index>,
    coordinator: &AppCoordinator,
    scope: &Scope,
    written: &HashSet<RecordId>,
    retry: &BatchRetry,
) -> Result<u64, CoordinatorError> {
    let page_size = coordinator.config().limits.max_batch;
    let mut stale = Vec::new();
    let mut after = None;
    loop {
        let page = coordinator.record_ids(scope, after, page_size).await?;
        stale.extend(page.items.into_iter().filter(|id| !written.contains(id)));
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let mut deleted = 0;
    let (_tx, mut never) = watch::channel(false);
    for (k, chunk) in stale.chunks(page_size).enumerate() {
        let name = format!("replace {} ({})", scope.as_str(), k + 1);
        let ids = chunk.to_vec();
        let w = write_attempts(Vec::new(), None, retry, &mut never, async |_| {
            let tx = Transaction::new().delete(DeleteSelector::Ids(ids.clone()));
            run.step(&name, tx).await.map(BatchReport::from)
        })
        .await;
        deleted += w.result?.deleted;
    }
    Ok(deleted)
}

/// What writing one batch (with its retries) came to.
struct Written {
    result: Result<BatchReport, CoordinatorError>,
    /// Attempts after the first.
    retries: u32,
    /// From the first failure to the last attempt's start.
    retrying_for: Duration,
    /// Whether an attempt before the last had an unknown outcome (it may have
    /// committed; a replay by the last attempt then means it did).
    unknown_before: bool,
    /// Ctrl-C came while waiting to retry.
    interrupted: bool,
}

/// What one written batch came to (a plain upsert's report, or an atomic
/// ingest's step's).
#[derive(Debug)]
struct BatchReport {
    ids: Vec<RecordId>,
    inserted: u64,
    updated: u64,
    deleted: u64,
    deferred_cleanup: usize,
    replayed: bool,
    /// A deferred batch's read-your-writes token.
    token: Option<tandem_core::IndexToken>,
}

impl From<UpsertReport> for BatchReport {
    fn from(r: UpsertReport) -> Self {
        Self {
            ids: r.ids,
            inserted: r.inserted,
            updated: r.updated,
            deleted: 0,
            deferred_cleanup: r.deferred_cleanup,
            replayed: r.replayed,
            token: r.index_token,
        }
    }
}

impl From<TransactionReport> for BatchReport {
    fn from(r: TransactionReport) -> Self {
        Self {
            ids: r.ids.into_iter().flatten().collect(),
            inserted: r.inserted,
            updated: r.updated,
            deleted: r.deleted,
            deferred_cleanup: r.deferred_cleanup,
            replayed: r.replayed,
            token: None,
        }
    }
}

/// Writes one batch as a plain upsert (see [`write_attempts`]).
async fn write_batch(
    coordinator: &AppCoordinator,
    records: Vec<NewRecord>,
    opts: &WriteOptions,
    retry: &BatchRetry,
    interrupt: &mut watch::Receiver<bool>,
) -> Written {
    let key = opts.idempotency_key.as_deref();
    write_attempts(records, key, retry, interrupt, async |records| {
        coordinator
            .upsert_with(records, opts)
            .await
            .map(BatchReport::from)
    })
    .await
}

/// Writes one batch with `attempt`, retrying a retryable failure (under the
/// same key: `attempt` must make a retry idempotent) with backoff, as
/// `retry` allows. Ctrl-C during a backoff ends the retries.
async fn write_attempts(
    records: Vec<NewRecord>,
    key: Option<&str>,
    retry: &BatchRetry,
    interrupt: &mut watch::Receiver<bool>,
    mut attempt: impl AsyncFnMut(Vec<NewRecord>) -> Result<BatchReport, CoordinatorError>,
) -> Written {
    let mut written = Written {
        result: Err(CoordinatorError::Config("not attempted".into())),
        retries: 0,
        retrying_for: Duration::ZERO,
        unknown_before: false,
        interrupted: false,
    };
    // tokio's clock, so that tests with paused time see the backoffs.
    let mut first_failure: Option<tokio::time::Instant> = None;
    let mut records = Some(records);
    loop {
        // The records are kept for a retry only while one may follow.
        let batch = if written.retries < retry.retries {
            records.clone().unwrap_or_default()
        } else {
            records.take().unwrap_or_default()
        };
        let e = match attempt(batch).await.map_err(unwrap_part) {
            Ok(report) => {
                written.result = Ok(report);
                return written;
            }
            Err(e) => e,
        };
        let since = *first_failure.get_or_insert_with(tokio::time::Instant::now);
        let next = written.retries + 1;
        let wait = BatchRetry::backoff(next);
        let within = since.elapsed() + wait <= retry.retry_for;
        if !e.is_retryable() || next > retry.retries || !within || *interrupt.borrow() {
            written.result = Err(e);
            return written;
        }
        tracing::warn!(
            key = key.unwrap_or("(the saga step's)"),
            "batch failed ({}), retrying in {:.1} s under the same idempotency key (retry {next} of at most {})",
            e,
            wait.as_secs_f64(),
            retry.retries
        );
        written.unknown_before |= e.outcome() == tandem_core::Outcome::Unknown;
        tokio::select! {
            biased;
            _ = interrupt.wait_for(|v| *v) => {
                written.interrupted = true;
                written.result = Err(e);
                return written;
            }
            () = tokio::time::sleep(wait) => {}
        }
        written.retries = next;
        written.retrying_for = since.elapsed();
        metrics::counter!("tandem_ingest_batch_retries_total").increment(1);
    }
}

fn count_retries(summary: &mut IngestSummary, retries: u32) {
    if retries > 0 {
        summary.batches_retried += 1;
        summary.batch_retries += retries as usize;
    }
}

/// Adds a written batch to the summary. `settled`: the batch was replayed
/// from its key because an earlier attempt of this run, whose outcome was
/// unknown, had committed it — it counts as committed now.
fn account(summary: &mut IngestSummary, report: &BatchReport, n: u64, settled: bool) {
    summary.records += n;
    if settled {
        summary.batches_settled_by_key += 1;
        summary.batches_committed += 1;
        summary.inserted += report.inserted;
        summary.updated += report.updated;
        metrics::counter!("tandem_ingest_batches_total", "outcome" => "committed").increment(1);
        metrics::counter!("tandem_ingest_records_total").increment(n);
    } else if report.replayed {
        summary.batches_replayed += 1;
        summary.replayed_records += n;
        metrics::counter!("tandem_ingest_batches_total", "outcome" => "replayed").increment(1);
    } else {
        summary.batches_committed += 1;
        summary.inserted += report.inserted;
        summary.updated += report.updated;
        summary.deferred_cleanup += report.deferred_cleanup as u64;
        if let Some(token) = &report.token {
            summary.tokens.extend(token.records.iter().copied());
        }
        metrics::counter!("tandem_ingest_batches_total", "outcome" => "committed").increment(1);
        metrics::counter!("tandem_ingest_records_total").increment(n);
    }
}

fn print_summary(s: &IngestSummary, out: Output) {
    if out.json {
        out.json(s);
        return;
    }
    let verdict = if s.ok {
        "ingested"
    } else if s.interrupted {
        "interrupted"
    } else {
        "stopped"
    };
    out.text(&format!(
        "{verdict} {}: {} records in {:.2} s ({} records/s)",
        s.input,
        output::count(s.records),
        s.elapsed_secs,
        output::rate(s.records, s.elapsed_secs)
    ));
    out.text(&output::kv_table(vec![
        (
            "batches committed",
            output::count(s.batches_committed as u64),
        ),
        (
            "batches replayed (already written)",
            output::count(s.batches_replayed as u64),
        ),
        ("records inserted", output::count(s.inserted)),
        ("records updated", output::count(s.updated)),
        ("records replayed", output::count(s.replayed_records)),
        ("records embedded", output::count(s.records_embedded)),
        (
            "cleanup left to recovery",
            output::count(s.deferred_cleanup),
        ),
        (
            "batches attempted",
            output::count(s.batches_attempted as u64),
        ),
        (
            "batches retried (after a retryable failure)",
            output::count(s.batches_retried as u64),
        ),
        ("retries in all", output::count(s.batch_retries as u64)),
        ("batches failed", output::count(s.batches_failed as u64)),
    ]));
    if let Some(secs) = s.optimize_secs {
        out.text(&format!("optimized the embedded index in {secs:.2} s"));
    }
    if let Some(saga) = &s.saga {
        let replaced = if saga.replaced_deleted > 0 {
            format!(
                "; {} stale records of the replaced scope deleted",
                output::count(saga.replaced_deleted)
            )
        } else {
            String::new()
        };
        out.text(&format!(
            "atomic: saga {} {}{replaced} (`tandem saga show {}`)",
            saga.id, saga.state, saga.id
        ));
    }
}

/// The input line a validation error points at.
fn error_line(e: &CoordinatorError, lines: &[usize]) -> Option<usize> {
    let CoordinatorError::Invalid(v) = e else {
        return None;
    };
    validation_index(v).and_then(|i| lines.get(i).copied())
}

/// An atomic ingest's one part, as the plain batch's error (so that it
/// names the input line the same way).
fn unwrap_part(e: CoordinatorError) -> CoordinatorError {
    match e {
        CoordinatorError::Invalid(ValidationError::InPart { error, .. }) => {
            CoordinatorError::Invalid(*error)
        }
        e => e,
    }
}

fn validation_index(v: &ValidationError) -> Option<usize> {
    match v {
        ValidationError::DimensionMismatch { index, .. }
        | ValidationError::NonFiniteVector { index, .. }
        | ValidationError::ZeroVector { index }
        | ValidationError::DuplicateId { index, .. }
        | ValidationError::MetadataNotObject { index, .. }
        | ValidationError::EmptyScope { index }
        | ValidationError::ScopeTooLong { index, .. } => Some(*index),
        _ => None,
    }
}

/// A failed batch as one line: validation errors name the input line;
/// `retried` (retries, over how long) and the batch's idempotency key are
/// said when they matter. `own_key`: the key was made up for this run (no
/// `--idempotency-prefix`).
fn batch_error(
    e: CoordinatorError,
    number: usize,
    lines: &[usize],
    stores: &Stores,
    retried: Option<(u32, Duration)>,
    key: Option<&str>,
    own_key: bool,
) -> AppError {
    let mut span = match (lines.first(), lines.last()) {
        (Some(a), Some(b)) => batch_span(number, *a, *b),
        _ => format!("batch {number}"),
    };
    if let Some((n, over)) = retried {
        let times = if n == 1 { "retry" } else { "retries" };
        span.push_str(&format!(" ({n} {times} over {:.1} s)", over.as_secs_f64()));
    }
    match &e {
        CoordinatorError::Invalid(v) => {
            let text = v.to_string();
            match validation_index(v) {
                Some(i) if i < lines.len() => {
                    let prefix = format!("record #{i}: ");
                    let detail = text.strip_prefix(&prefix).unwrap_or(&text);
                    AppError::Input(format!(
                        "line {}: {detail}; {span} was not written",
                        lines[i]
                    ))
                }
                _ => AppError::Input(format!("{span}: {text}; it was not written")),
            }
        }
        CoordinatorError::IdempotencyKeyReused { key } => AppError::Input(format!(
            "{span}: idempotency key {key:?} was already used for different records: the input \
             or --batch-size changed since the run that used this prefix; re-run with the same \
             input and batch size, or use a new --idempotency-prefix"
        )),
        CoordinatorError::OutcomeUnknown { .. } if own_key => stores.error(
            &format!(
                "{span}: the outcome is unknown (idempotency key {:?}); `tandem recover` \
                 finishes or undoes it; re-run from this batch with --idempotency-prefix to make \
                 re-runs safe; writing",
                key.unwrap_or("")
            ),
            e,
        ),
        CoordinatorError::OutcomeUnknown { .. } => stores.error(
            &format!(
                "{span}: the outcome is unknown; re-run with the same --idempotency-prefix to \
                 finish it; writing"
            ),
            e,
        ),
        _ => stores.error(&format!("{span} was not written: writing"), e),
    }
}

/// A batch whose embedding failed as the command's error, and the input
/// line it points at: a text the embedder refused names its line.
fn embed_failure(
    e: EmbedError,
    record: Option<usize>,
    number: usize,
    lines: &[usize],
    embedded_with: &str,
) -> (AppError, Option<usize>) {
    let span = match (lines.first(), lines.last()) {
        (Some(a), Some(b)) => batch_span(number, *a, *b),
        _ => format!("batch {number}"),
    };
    match (e, record.and_then(|i| lines.get(i).copied())) {
        (EmbedError::InvalidInput { message, .. }, Some(line)) => (
            AppError::Input(format!(
                "line {line}: the record has no vector, and {embedded_with} refused its \
                 content: {message}; {span} was not written"
            )),
            Some(line),
        ),
        (e, _) => (
            crate::embed::error(e, embedded_with, &format!("{span} was not written: ")),
            None,
        ),
    }
}

/// The embedding stage: computes the missing vectors of each batch (one
/// embedder call per batch) and passes it on; passes everything else on
/// unchanged. Stops after a batch whose embedding failed, or when the writer
/// is gone.
async fn embed_stage(
    mut rx: mpsc::Receiver<Msg>,
    tx: mpsc::Sender<Msg>,
    embedder: Option<AppEmbedder>,
) {
    while let Some(msg) = rx.recv().await {
        let msg = match (msg, &embedder) {
            (Msg::Batch(mut batch), Some(e)) if !batch.to_embed.is_empty() => {
                match embed_batch(e.as_ref(), &mut batch).await {
                    Ok(()) => Msg::Batch(batch),
                    Err((error, record)) => Msg::EmbedFailed(EmbedFailure {
                        number: batch.number,
                        lines: batch.lines,
                        record,
                        error,
                    }),
                }
            }
            (msg, _) => msg,
        };
        let last = !matches!(msg, Msg::Batch(_));
        if tx.send(msg).await.is_err() || last {
            return;
        }
    }
}

/// Fills in the vectors of the batch's records that have none. On error,
/// the refused record's position in the batch, when the embedder named it.
async fn embed_batch(
    e: &dyn tandem_core::Embedder,
    batch: &mut Batch,
) -> Result<(), (EmbedError, Option<usize>)> {
    let texts: Vec<String> = batch
        .to_embed
        .iter()
        .map(|&i| batch.records[i].content.clone())
        .collect();
    let vectors = e.embed(&texts).await.map_err(|err| {
        let record = match &err {
            EmbedError::InvalidInput { index: Some(k), .. } => batch.to_embed.get(*k).copied(),
            _ => None,
        };
        (err, record)
    })?;
    if vectors.len() != texts.len() {
        // The port's contract; checked so that a broken embedder cannot
        // leave a record without its vector.
        return Err((
            EmbedError::Protocol(tandem_core::ProtocolViolation::WrongCount {
                expected: texts.len(),
                got: vectors.len(),
            }),
            None,
        ));
    }
    for (&i, v) in batch.to_embed.iter().zip(vectors) {
        batch.records[i].vector = v;
    }
    Ok(())
}

/// "batch 3 (lines 5–6)", or "batch 3 (line 5)".
fn batch_span(number: usize, first: usize, last: usize) -> String {
    if first == last {
        format!("batch {number} (line {first})")
    } else {
        format!("batch {number} (lines {first}–{last})")
    }
}

type Source = Box<dyn Read + Send>;

fn open_source(input: &str) -> Result<(Option<Source>, Option<u64>), AppError> {
    if input == "-" {
        // Opened in the reader thread: stdin's lock must stay on one thread.
        return Ok((None, None));
    }
    let path = PathBuf::from(input);
    let file = File::open(&path)
        .map_err(|e| AppError::Usage(format!("cannot open {}: {e}", path.display())))?;
    let len = file
        .metadata()
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len());
    Ok((Some(Box::new(file)), len))
}

fn read_batches(source: Option<Source>, plan: &IngestPlan, tx: mpsc::Sender<Msg>) {
    match source {
        Some(s) => read_from(BufReader::with_capacity(1 << 16, s), plan, tx),
        None => read_from(std::io::stdin().lock(), plan, tx),
    }
}

fn read_from(mut reader: impl BufRead, plan: &IngestPlan, tx: mpsc::Sender<Msg>) {
    let mut line_no = 0usize;
    let mut bytes = 0u64;
    let mut number = 1usize;
    let mut lines = Vec::with_capacity(plan.batch_size);
    let mut records = Vec::with_capacity(plan.batch_size);
    let mut to_embed = Vec::new();
    let mut first_bad: Option<(usize, String)> = None;
    let mut bad_lines = 0usize;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let read = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf);
        let n = match read {
            Ok(n) => n,
            Err(e) => {
                let _ = tx.blocking_send(Msg::Io(e.to_string()));
                return;
            }
        };
        if n == 0 {
            break;
        }
        bytes += n as u64;
        line_no += 1;
        if buf.len() > MAX_LINE {
            // The rest of this line would be read as more lines: stop here.
            let first_line = lines.first().copied().unwrap_or(line_no);
            let _ = tx.blocking_send(Msg::Bad(BadBatch {
                number,
                first_line,
                last_line: line_no,
                line: first_bad.as_ref().map_or(line_no, |b| b.0),
                message: first_bad
                    .map(|b| b.1)
                    .unwrap_or_else(|| format!("the line is longer than {} MiB", MAX_LINE >> 20)),
                bad_lines: bad_lines + 1,
            }));
            return;
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        lines.push(line_no);
        match parse_line(&buf, plan) {
            Ok((r, embed)) => {
                if embed {
                    to_embed.push(records.len());
                }
                records.push(r);
            }
            Err(message) => {
                bad_lines += 1;
                if first_bad.is_none() {
                    first_bad = Some((line_no, message));
                }
            }
        }
        if lines.len() == plan.batch_size {
            let done = std::mem::replace(&mut lines, Vec::with_capacity(plan.batch_size));
            let recs = std::mem::replace(&mut records, Vec::with_capacity(plan.batch_size));
            let embed = std::mem::take(&mut to_embed);
            if !send(
                &tx,
                number,
                done,
                recs,
                embed,
                bytes,
                first_bad.take(),
                bad_lines,
            ) {
                return;
            }
            bad_lines = 0;
            number += 1;
        }
    }
    if !lines.is_empty() {
        send(
            &tx, number, lines, records, to_embed, bytes, first_bad, bad_lines,
        );
    }
}

/// Sends a finished batch (or its first bad line). Returns whether to go on.
#[allow(clippy::too_many_arguments)]
fn send(
    tx: &mpsc::Sender<Msg>,
    number: usize,
    lines: Vec<usize>,
    records: Vec<NewRecord>,
    to_embed: Vec<usize>,
    bytes_end: u64,
    bad: Option<(usize, String)>,
    bad_lines: usize,
) -> bool {
    match bad {
        Some((line, message)) => {
            let _ = tx.blocking_send(Msg::Bad(BadBatch {
                number,
                first_line: lines.first().copied().unwrap_or(line),
                last_line: lines.last().copied().unwrap_or(line),
                line,
                message,
                bad_lines,
            }));
            false
        }
        None => tx
            .blocking_send(Msg::Batch(Batch {
                number,
                lines,
                records_len: records.len() as u64,
                records,
                to_embed,
                bytes_end,
            }))
            .is_ok(),
    }
}

/// One line into a record and whether its vector is still to be computed
/// (it has none and an embedder is on; the vector is left empty until
/// then), or a message for people (without the line number).
fn parse_line(line: &[u8], plan: &IngestPlan) -> Result<(NewRecord, bool), String> {
    let rec: InputRecord = serde_json::from_slice(line).map_err(|e| json_error(&e, line))?;
    let id = match rec.id {
        Some(s) => Some(
            s.parse::<RecordId>()
                .map_err(|_| format!("id {s:?} is not a UUID"))?,
        ),
        None => None,
    };
    let (vector, embed) = match (rec.vector, plan.embed) {
        (Some(v), _) => (v, false),
        (None, EmbedMode::None) => {
            return Err(
                "the record has no \"vector\" (add one, or pass --embed hash or --embed openai \
                 to compute one from the content)"
                    .to_owned(),
            );
        }
        (None, EmbedMode::Hash | EmbedMode::Openai) => (Vec::new(), true),
    };
    let record = NewRecord {
        id,
        scope: Scope::new(rec.scope),
        content: rec.content,
        metadata: rec
            .metadata
            .unwrap_or_else(|| Value::Object(Default::default())),
        vector,
    };
    Ok((record, embed))
}

/// serde_json's message without its "at line 1 column N" (the line is ours),
/// with a hint for NaN and Infinity, which JSON cannot spell.
fn json_error(e: &serde_json::Error, line: &[u8]) -> String {
    let text = e.to_string();
    let text = match text.rfind(" at line ") {
        Some(i) => &text[..i],
        None => &text,
    };
    let mut msg = match e.classify() {
        serde_json::error::Category::Data => format!("invalid record: {text}"),
        serde_json::error::Category::Eof => "incomplete JSON (the line ends early)".to_owned(),
        _ => format!("invalid JSON at column {}: {text}", e.column()),
    };
    let raw = String::from_utf8_lossy(line);
    if raw.contains("NaN") || raw.contains("Infinity") {
        msg.push_str(" (vectors must hold finite numbers: JSON has no NaN or Infinity)");
    }
    msg
}

/// A watch that turns true on the first Ctrl-C; a second Ctrl-C exits at once.
fn interrupt_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = tx.send(true);
            tracing::warn!("interrupted: stopping after the current batch (Ctrl-C again to abort)");
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(i32::from(crate::error::EXIT_INTERRUPTED));
            }
        }
    });
    rx
}

/// Progress on stderr: a bar on a terminal, plain lines otherwise.
enum Progress {
    Bar(ProgressBar),
    Lines {
        last: Option<Instant>,
        total: Option<u64>,
        /// The latest line, not printed yet (lines are printed at most once a second).
        pending: Option<String>,
    },
    Off,
}

impl Progress {
    fn new(quiet: bool, total_bytes: Option<u64>) -> Self {
        if quiet {
            return Progress::Off;
        }
        if !std::io::stderr().is_terminal() {
            return Progress::Lines {
                last: None,
                total: total_bytes,
                pending: None,
            };
        }
        let bar = match total_bytes {
            Some(len) => {
                let bar = ProgressBar::new(len);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{spinner} {elapsed_precise} [{wide_bar}] {percent:>3}% · {msg} · ETA {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar
            }
            None => {
                let bar = ProgressBar::new_spinner();
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                bar
            }
        };
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress::Bar(bar)
    }

    fn batch_done(&mut self, s: &IngestSummary, number: usize, bytes: u64, started: Instant) {
        let secs = started.elapsed().as_secs_f64();
        match self {
            Progress::Bar(bar) => {
                bar.set_position(bytes);
                bar.set_message(format!(
                    "{} records · {} records/s",
                    output::count(s.records),
                    output::rate(s.records, secs)
                ));
            }
            Progress::Lines {
                last,
                total,
                pending,
            } => {
                let pct = total
                    .filter(|t| *t > 0)
                    .map(|t| format!(" · {:.0}% of input", bytes as f64 * 100.0 / t as f64))
                    .unwrap_or_default();
                let line = format!(
                    "ingest: batch {number} done · {} records ({} inserted, {} updated, {} replayed) · {} records/s{pct}",
                    output::count(s.records),
                    output::count(s.inserted),
                    output::count(s.updated),
                    output::count(s.replayed_records),
                    output::rate(s.records, secs),
                );
                if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                    *pending = Some(line);
                } else {
                    *last = Some(Instant::now());
                    *pending = None;
                    eprintln!("{line}");
                }
            }
            Progress::Off => {}
        }
    }

    fn finish(&mut self) {
        match self {
            Progress::Bar(bar) => bar.finish_and_clear(),
            Progress::Lines { pending, .. } => {
                if let Some(line) = pending.take() {
                    eprintln!("{line}");
                }
            }
            Progress::Off => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(embed: EmbedMode) -> IngestPlan {
        IngestPlan {
            input: "-".into(),
            batch_size: 2,
            embed,
            idempotency_prefix: None,
            optimize: false,
            retry: BatchRetry::default(),
            atomic: false,
            replace_scope: None,
            wait_indexed: None,
        }
    }

    fn collect(input: &str, batch_size: usize) -> Vec<Msg> {
        let mut p = plan(EmbedMode::Hash);
        p.batch_size = batch_size;
        let (tx, mut rx) = mpsc::channel(100);
        read_from(input.as_bytes(), &p, tx);
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            out.push(m);
        }
        out
    }

    #[test]
    fn batches_follow_the_batch_size_and_skip_blank_lines() {
        let input = "{\"scope\":\"a\",\"content\":\"x y\"}\n\n{\"scope\":\"a\",\"content\":\"z\"}\n{\"scope\":\"b\",\"content\":\"w\"}\n";
        let msgs = collect(input, 2);
        assert_eq!(msgs.len(), 2);
        match &msgs[0] {
            Msg::Batch(b) => {
                assert_eq!(b.number, 1);
                assert_eq!(b.lines, vec![1, 3]);
                assert_eq!(b.records.len(), 2);
            }
            _ => panic!("expected a batch"),
        }
        match &msgs[1] {
            Msg::Batch(b) => {
                assert_eq!(b.number, 2);
                assert_eq!(b.lines, vec![4]);
                assert_eq!(b.bytes_end, input.len() as u64);
            }
            _ => panic!("expected a batch"),
        }
    }

    #[test]
    fn a_bad_line_stops_at_its_batch_with_its_line_number() {
        let input = "{\"scope\":\"a\",\"content\":\"x\"}\n{\"scope\":\"a\",\"content\":\"y\"}\n{\"scope\":\"a\",\"content\":\"z\"}\n{\"scope\":\"a\",\"content\":\n{\"scope\":\"a\",\"content\":\"v\"}\n";
        let msgs = collect(input, 2);
        assert_eq!(
            msgs.len(),
            2,
            "one good batch, then the bad one, then nothing"
        );
        match &msgs[1] {
            Msg::Bad(b) => {
                assert_eq!((b.number, b.line, b.first_line, b.last_line), (2, 4, 3, 4));
                assert!(b.message.contains("JSON"), "{}", b.message);
            }
            _ => panic!("expected a bad batch"),
        }
    }

    #[test]
    fn line_errors_say_what_is_wrong() {
        let p = plan(EmbedMode::None);
        let e = parse_line(br#"{"content":"x","vector":[1,2,3,4]}"#, &p).unwrap_err();
        assert!(e.contains("missing field `scope`"), "{e}");
        let e = parse_line(
            br#"{"scope":"s","vector":[1,2,3,4]}"#,
            &plan(EmbedMode::None),
        );
        assert!(e.is_ok());
        let e = parse_line(br#"{"scope":"s","content":"x"}"#, &p).unwrap_err();
        assert!(e.contains("--embed hash"), "{e}");
        let e = parse_line(br#"{"scope":"s","vector":[NaN,1,1,1]}"#, &p).unwrap_err();
        assert!(e.contains("NaN"), "{e}");
        let e = parse_line(br#"{"scope":"s","id":"nope","vector":[1,1,1,1]}"#, &p).unwrap_err();
        assert!(e.contains("not a UUID"), "{e}");
        let e = parse_line(br#"{"scope":"s","vectr":[1,1,1,1]}"#, &p).unwrap_err();
        assert!(e.contains("vectr"), "{e}");
    }

    #[test]
    fn a_given_vector_wins_over_the_embedder() {
        let (r, embed) = parse_line(
            br#"{"scope":"s","content":"words here","vector":[0,0,0,1]}"#,
            &plan(EmbedMode::Hash),
        )
        .unwrap();
        assert_eq!(r.vector, vec![0.0, 0.0, 0.0, 1.0]);
        assert!(!embed);
        let (r, embed) = parse_line(
            br#"{"scope":"s","content":"words here"}"#,
            &plan(EmbedMode::Openai),
        )
        .unwrap();
        assert!(embed && r.vector.is_empty());
        assert_eq!(r.metadata, serde_json::json!({}));
    }

    /// The messages of `input` after the embedding stage, with the hash
    /// embedding in 64 dimensions (wide enough that no two words of these
    /// inputs cancel each other out).
    async fn embedded(input: &str) -> Vec<Msg> {
        let (tx, parsed) = mpsc::channel(100);
        // The reader blocks on its channel: not on the runtime's thread.
        let input = input.to_owned();
        tokio::task::spawn_blocking(move || {
            read_from(input.as_bytes(), &plan(EmbedMode::Hash), tx)
        })
        .await
        .unwrap();
        let (tx, mut rx) = mpsc::channel(100);
        let hash =
            tandem_adapters::hash::HashEmbedder::new(std::num::NonZeroUsize::new(64).unwrap());
        embed_stage(parsed, tx, Some(std::sync::Arc::new(hash))).await;
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            out.push(m);
        }
        out
    }

    #[tokio::test]
    async fn the_embedding_stage_fills_in_missing_vectors_only() {
        let input = "{\"scope\":\"s\",\"content\":\"words here\"}\n{\"scope\":\"s\",\"content\":\"x\",\"vector\":[0,0,1]}\n";
        let msgs = embedded(input).await;
        let [Msg::Batch(b)] = &msgs[..] else {
            panic!("expected one batch");
        };
        assert_eq!(b.to_embed, vec![0]);
        assert_eq!(
            b.records[0].vector,
            crate::embed::hash_embedding("words here", 64).unwrap()
        );
        // A given vector is kept as it is (the coordinator checks its dimension).
        assert_eq!(b.records[1].vector, vec![0.0, 0.0, 1.0]);
    }

    #[tokio::test]
    async fn a_refused_text_stops_at_its_batch_naming_its_line() {
        let input = "{\"scope\":\"s\",\"content\":\"a b\"}\n{\"scope\":\"s\",\"content\":\"c\"}\n\n{\"scope\":\"s\",\"vector\":[1,0,0,0]}\n{\"scope\":\"s\",\"content\":\"...\"}\n{\"scope\":\"s\",\"content\":\"d\"}\n";
        let msgs = embedded(input).await;
        assert_eq!(
            msgs.len(),
            2,
            "the good batch, then the failed one, then nothing"
        );
        let Msg::EmbedFailed(f) = &msgs[1] else {
            panic!("expected a failed embedding");
        };
        assert_eq!((f.number, f.record), (2, Some(1)));
        let (e, line) = embed_failure(
            EmbedError::InvalidInput {
                index: Some(1),
                message: "no words".into(),
            },
            f.record,
            f.number,
            &f.lines,
            "the hash embedding",
        );
        assert_eq!(line, Some(5));
        assert_eq!(
            e.to_string(),
            "line 5: the record has no vector, and the hash embedding refused its content: no \
             words; batch 2 (lines 4–5) was not written"
        );
        assert_eq!(e.exit_code(), crate::error::EXIT_USAGE);
    }

    #[test]
    fn validation_errors_point_at_input_lines() {
        let e = CoordinatorError::Invalid(ValidationError::DimensionMismatch {
            index: 1,
            expected: 4,
            got: 3,
        });
        assert_eq!(error_line(&e, &[10, 12]), Some(12));
        let e = CoordinatorError::Invalid(ValidationError::EmptyBatch);
        assert_eq!(error_line(&e, &[10, 12]), None);
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("2 weeks").unwrap_err().contains("unit"));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_with_jitter() {
        for _ in 0..50 {
            let first = BatchRetry::backoff(1);
            assert!(first >= Duration::from_millis(250) && first <= Duration::from_millis(500));
            let third = BatchRetry::backoff(3);
            assert!(third >= Duration::from_secs(1) && third <= Duration::from_secs(2));
            let late = BatchRetry::backoff(40);
            assert!(late >= Duration::from_millis(2500) && late <= Duration::from_secs(5));
        }
    }

    mod retries {
        use std::sync::Arc;

        use tandem_adapters::memory::{InMemoryMetadataRepo, InMemoryVectorIndex};
        use tandem_core::testkit::faults::{
            Call, Fault, FaultController, FaultyMetadataRepo, FaultyVectorIndex, Rule,
        };
        use tandem_core::{Coordinator, CoordinatorConfig, Distance, Outcome, RetryPolicy};

        use super::*;
        use crate::backend::{Index, Repo};

        /// A coordinator over the in-memory stores behind fault wrappers that
        /// do not retry by themselves, so each of its calls is one attempt.
        fn coordinator(ctl: &FaultController) -> (AppCoordinator, Repo) {
            let repo: Repo = Arc::new(InMemoryMetadataRepo::new());
            let faulty: Repo = Arc::new(FaultyMetadataRepo::new(repo.clone(), ctl.clone()));
            let index: Index = Arc::new(FaultyVectorIndex::new(
                InMemoryVectorIndex::new(4, Distance::Cosine),
                ctl.clone(),
            ));
            let config = CoordinatorConfig {
                retry: RetryPolicy::none(),
                ..CoordinatorConfig::default()
            };
            (Coordinator::new(faulty, index, config).unwrap(), repo)
        }

        fn records(n: u32) -> Vec<NewRecord> {
            (0..n)
                .map(|i| NewRecord::new("s", format!("r{i}"), vec![1.0, i as f32, 0.5, 0.25]))
                .collect()
        }

        fn keyed(key: &str) -> WriteOptions {
            WriteOptions::idempotent(key)
        }

        async fn write(
            c: &AppCoordinator,
            retries: u32,
            retry_for: Duration,
        ) -> (Written, watch::Sender<bool>) {
            let (tx, mut rx) = watch::channel(false);
            let retry = BatchRetry { retries, retry_for };
            let w = write_batch(c, records(3), &keyed("k:1"), &retry, &mut rx).await;
            (w, tx)
        }

        async fn rows(repo: &Repo) -> u64 {
            repo.count_by_scope().await.unwrap().values().sum()
        }

        #[tokio::test(start_paused = true)]
        async fn a_batch_that_fails_twice_is_written_by_its_third_attempt() {
            let ctl = FaultController::new(1);
            ctl.add(Rule::first(Call::IndexUpsert, 2, Fault::FailBefore));
            let (c, repo) = coordinator(&ctl);
            let (w, _tx) = write(&c, 5, Duration::from_secs(60)).await;
            let report = w.result.expect("the third attempt succeeds");
            assert!(!report.replayed);
            assert_eq!(report.inserted, 3);
            assert_eq!(w.retries, 2);
            assert!(!w.unknown_before, "both failures were NotApplied");
            assert_eq!(rows(&repo).await, 3);
        }

        #[tokio::test(start_paused = true)]
        async fn a_retry_after_an_unknown_outcome_replays_instead_of_writing_twice() {
            let ctl = FaultController::new(2);
            // The commit applies but its reply is lost, and the settlement
            // cannot reach the store: the outcome is unknown.
            ctl.add(Rule::once(Call::CommitUpsert, 0, Fault::FailAfter));
            ctl.add(Rule::first(Call::Settle, 1, Fault::FailBefore));
            let (c, repo) = coordinator(&ctl);
            let (w, _tx) = write(&c, 5, Duration::from_secs(60)).await;
            let report = w.result.expect("the retry is answered from the key");
            assert!(report.replayed, "{report:?}");
            assert_eq!(report.inserted, 3);
            assert_eq!(w.retries, 1);
            assert!(w.unknown_before);
            assert_eq!(rows(&repo).await, 3, "the records were written once");
        }

        #[tokio::test(start_paused = true)]
        async fn retries_stop_at_their_count_and_keep_the_last_error() {
            let ctl = FaultController::new(3);
            ctl.add(Rule::always(Call::IndexUpsert, Fault::FailBefore));
            let (c, repo) = coordinator(&ctl);
            let (w, _tx) = write(&c, 3, Duration::from_secs(600)).await;
            let e = w.result.expect_err("the index never accepts");
            assert!(e.is_retryable());
            assert_eq!(e.outcome(), Outcome::NotApplied);
            assert_eq!(w.retries, 3);
            assert_eq!(rows(&repo).await, 0);
            // With retries off the first failure is the last.
            let (w, _tx) = write(&c, 0, Duration::from_secs(600)).await;
            assert!(w.result.is_err());
            assert_eq!(w.retries, 0);
        }

        #[tokio::test(start_paused = true)]
        async fn retries_stop_when_their_time_is_up() {
            let ctl = FaultController::new(4);
            ctl.add(Rule::always(Call::IndexUpsert, Fault::FailBefore));
            let (c, _repo) = coordinator(&ctl);
            // Backoffs of 0.25–0.5 s, 0.5–1 s, 1–2 s, 2–4 s: within 3 s there
            // is room for two or three retries, never for four.
            let (w, _tx) = write(&c, 100, Duration::from_secs(3)).await;
            assert!(w.result.is_err());
            assert!((2..=3).contains(&w.retries), "{} retries", w.retries);
            assert!(
                w.retrying_for >= Duration::from_millis(750)
                    && w.retrying_for <= Duration::from_secs(3),
                "{:?}",
                w.retrying_for
            );
        }

        #[tokio::test(start_paused = true)]
        async fn a_permanent_error_is_not_retried() {
            let ctl = FaultController::new(5);
            ctl.add(Rule::always(Call::IndexUpsert, Fault::Reject));
            let (c, _repo) = coordinator(&ctl);
            let (w, _tx) = write(&c, 5, Duration::from_secs(60)).await;
            assert!(!w.result.expect_err("rejected").is_retryable());
            assert_eq!(w.retries, 0);
        }

        #[tokio::test(start_paused = true)]
        async fn ctrl_c_during_a_backoff_ends_the_retries() {
            let ctl = FaultController::new(6);
            ctl.add(Rule::always(Call::IndexUpsert, Fault::FailBefore));
            let (c, _repo) = coordinator(&ctl);
            let (tx, mut rx) = watch::channel(false);
            let retry = BatchRetry {
                retries: 100,
                retry_for: Duration::from_secs(600),
            };
            let opts = keyed("k:1");
            let writing = write_batch(&c, records(2), &opts, &retry, &mut rx);
            let stop = async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                tx.send(true).unwrap();
            };
            let (w, ()) = tokio::join!(writing, stop);
            assert!(w.interrupted);
            assert!(w.result.is_err());
            assert!(w.retries < 100);
        }
    }
}
