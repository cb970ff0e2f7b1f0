//! `tandem ingest`: JSON Lines in, all-or-nothing batches out.
//!
//! A reader thread parses (and, with `--embed hash`, embeds) the input into
//! batches of `--batch-size` records and hands them over a channel that holds
//! at most two, so memory stays bounded whatever the input's size. Every line
//! of a batch is parsed before the batch is written; a batch with a bad line is
//! not written and ingestion stops there, after the batches before it.

use std::fs::File;
use std::io::{BufRead, BufReader, IsTerminal, Read};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tandem_core::{
    CoordinatorError, NewRecord, RecordId, Scope, UpsertReport, ValidationError, WriteOptions,
};
use tokio::sync::{mpsc, watch};

use crate::backend::{AppCoordinator, Stores};
use crate::cli::EmbedMode;
use crate::embed::hash_embedding;
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
    /// The collection's dimension (for the hash embedding).
    pub dimension: usize,
    /// Batch N gets the idempotency key `PREFIX:N`.
    pub idempotency_prefix: Option<String>,
    /// Optimize the embedded index after the last batch.
    pub optimize: bool,
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

/// A parsed batch: its records and the input line of each.
struct Batch {
    number: usize,
    lines: Vec<usize>,
    records: Vec<NewRecord>,
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

enum Msg {
    Batch(Batch),
    Bad(BadBatch),
    Io(String),
}

/// What ingest did, for the summary.
#[derive(Debug, Default, Serialize)]
pub struct IngestSummary {
    /// The input.
    pub input: String,
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
    /// Superseded points whose deletion was left to recovery.
    pub deferred_cleanup: u64,
    /// Wall time.
    pub elapsed_secs: f64,
    /// Records committed or replayed per second.
    pub records_per_sec: f64,
    /// Stopped by Ctrl-C between batches.
    pub interrupted: bool,
    /// Seconds spent optimizing the embedded index after the last batch
    /// (`--optimize`; not part of `elapsed_secs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optimize_secs: Option<f64>,
    /// Why it stopped early.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<IngestFailure>,
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
    let (tx, mut rx) = mpsc::channel(QUEUE);
    let reader_plan = plan.clone();
    std::thread::Builder::new()
        .name("tandem-ingest-reader".into())
        .spawn(move || read_batches(source, &reader_plan, tx))
        .map_err(|e| AppError::Failed(format!("cannot start the reader thread: {e}")))?;

    let interrupted = interrupt_signal();
    let mut progress = Progress::new(out.quiet, total_bytes);
    let started = Instant::now();
    let mut summary = IngestSummary {
        input: plan.input.clone(),
        ..IngestSummary::default()
    };
    let mut failure: Option<(AppError, Option<usize>, Option<usize>)> = None;
    let mut interrupt = interrupted.clone();
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
                let lines = batch.lines;
                let n = batch.records.len() as u64;
                let opts = WriteOptions {
                    idempotency_key: plan
                        .idempotency_prefix
                        .as_ref()
                        .map(|p| format!("{p}:{number}")),
                };
                match coordinator.upsert_with(batch.records, &opts).await {
                    Ok(report) => {
                        account(&mut summary, &report, n);
                        progress.batch_done(&summary, number, batch.bytes_end, started);
                    }
                    Err(e) => {
                        metrics::counter!("tandem_ingest_batches_total", "outcome" => "failed")
                            .increment(1);
                        let line = error_line(&e, &lines);
                        failure =
                            Some((batch_error(e, number, &lines, stores), Some(number), line));
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

fn account(summary: &mut IngestSummary, report: &UpsertReport, n: u64) {
    summary.records += n;
    if report.replayed {
        summary.batches_replayed += 1;
        summary.replayed_records += n;
        metrics::counter!("tandem_ingest_batches_total", "outcome" => "replayed").increment(1);
    } else {
        summary.batches_committed += 1;
        summary.inserted += report.inserted;
        summary.updated += report.updated;
        summary.deferred_cleanup += report.deferred_cleanup as u64;
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
        (
            "cleanup left to recovery",
            output::count(s.deferred_cleanup),
        ),
    ]));
    if let Some(secs) = s.optimize_secs {
        out.text(&format!("optimized the embedded index in {secs:.2} s"));
    }
}

/// The input line a validation error points at.
fn error_line(e: &CoordinatorError, lines: &[usize]) -> Option<usize> {
    let CoordinatorError::Invalid(v) = e else {
        return None;
    };
    validation_index(v).and_then(|i| lines.get(i).copied())
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

/// A failed batch as one line: validation errors name the input line.
fn batch_error(e: CoordinatorError, number: usize, lines: &[usize], stores: &Stores) -> AppError {
    let span = match (lines.first(), lines.last()) {
        (Some(a), Some(b)) => batch_span(number, *a, *b),
        _ => format!("batch {number}"),
    };
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
            Ok(r) => records.push(r),
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
            if !send(&tx, number, done, recs, bytes, first_bad.take(), bad_lines) {
                return;
            }
            bad_lines = 0;
            number += 1;
        }
    }
    if !lines.is_empty() {
        send(&tx, number, lines, records, bytes, first_bad, bad_lines);
    }
}

/// Sends a finished batch (or its first bad line). Returns whether to go on.
fn send(
    tx: &mpsc::Sender<Msg>,
    number: usize,
    lines: Vec<usize>,
    records: Vec<NewRecord>,
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
                records,
                bytes_end,
            }))
            .is_ok(),
    }
}

/// One line into a record, or a message for people (without the line number).
fn parse_line(line: &[u8], plan: &IngestPlan) -> Result<NewRecord, String> {
    let rec: InputRecord = serde_json::from_slice(line).map_err(|e| json_error(&e, line))?;
    let id = match rec.id {
        Some(s) => Some(
            s.parse::<RecordId>()
                .map_err(|_| format!("id {s:?} is not a UUID"))?,
        ),
        None => None,
    };
    let vector = match (rec.vector, plan.embed) {
        (Some(v), _) => v,
        (None, EmbedMode::Hash) => {
            hash_embedding(&rec.content, plan.dimension).ok_or_else(|| {
                "the record has no vector, and the hash embedding of its content is all zeros \
             (no words, or words that cancel out)"
                    .to_owned()
            })?
        }
        (None, EmbedMode::None) => {
            return Err(
                "the record has no \"vector\" (add one, or pass --embed hash to compute one from \
                 the content)"
                    .to_owned(),
            );
        }
    };
    Ok(NewRecord {
        id,
        scope: Scope::new(rec.scope),
        content: rec.content,
        metadata: rec
            .metadata
            .unwrap_or_else(|| Value::Object(Default::default())),
        vector,
    })
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
            dimension: 4,
            idempotency_prefix: None,
            optimize: false,
        }
    }

    fn collect(input: &str, batch_size: usize) -> Vec<Msg> {
        let mut p = plan(EmbedMode::Hash);
        p.batch_size = batch_size;
        // Wide enough that no two words of these inputs cancel each other out.
        p.dimension = 64;
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
        let e =
            parse_line(br#"{"scope":"s","content":"..."}"#, &plan(EmbedMode::Hash)).unwrap_err();
        assert!(e.contains("all zeros"), "{e}");
    }

    #[test]
    fn a_given_vector_wins_over_the_hash_embedding() {
        let r = parse_line(
            br#"{"scope":"s","content":"words here","vector":[0,0,0,1]}"#,
            &plan(EmbedMode::Hash),
        )
        .unwrap();
        assert_eq!(r.vector, vec![0.0, 0.0, 0.0, 1.0]);
        let r = parse_line(
            br#"{"scope":"s","content":"words here"}"#,
            &plan(EmbedMode::Hash),
        )
        .unwrap();
        assert_eq!(r.vector, hash_embedding("words here", 4).unwrap());
        assert_eq!(r.metadata, serde_json::json!({}));
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
}
