//! `tandem bench`: Tandem side by side with the raw (unprotected) dual write
//! and the naive compensation protocol, on the same data and the same stores.
//!
//! Per run (backend × added latency × dimension) it measures, interleaved and
//! repeated: raw / raw-overlapped / naive / tandem upsert per batch size; guarded search vs raw
//! index search (k = 10, without and with a scope filter); verify of a whole
//! scope; tandem delete by ids and by scope; recovery of a backlog of expired
//! intents; and, for re-indexing, the rebuild's throughput against the
//! ingest path and the write latency while a migration is open. See
//! `docs/performance.md` for the cost model and the results.
//!
//! - [`counting`]: port wrappers counting metadata and index calls;
//! - [`proxy`]: the TCP proxy that adds one-way latency and counts turns;
//! - [`protocols`] and [`sql`]: the raw, raw-overlapped and naive baselines,
//!   on tables and collections of their own;
//! - [`env`]: fresh stores per run; [`run`]: the cases; [`reindex`]: the
//!   re-indexing cases, on stores of their own; [`report`], [`chart`]:
//!   tables, Markdown, JSON and the SVG chart.

mod chart;
mod counting;
pub mod data;
mod env;
mod protocols;
mod proxy;
mod reindex;
pub mod report;
mod rss;
mod run;
mod sql;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::cli::GlobalArgs;
use crate::error::{AppError, EXIT_FAILED, EXIT_OK};
use crate::output::Output;
use crate::settings::{IndexTarget, MetadataTarget, Settings};

/// Which stores a run uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchBackend {
    /// SQLite + qdrant-edge in a temporary directory.
    Embedded,
    /// PostgreSQL (--postgres-url / DATABASE_URL) + Qdrant (--qdrant-url /
    /// QDRANT_URL, or the qdrant-double test server started for the run).
    Servers,
}

/// A group of cases (`--cases`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CaseGroup {
    /// Upserts of every protocol, the deferred write, the index workers'
    /// drain and lag.
    Upsert,
    /// Guarded search against the raw index search (on the upserts' records).
    Search,
    /// Verify of a whole scope (of the upserts' records).
    Verify,
    /// Delete by ids and by scope (of the upserts' records).
    Delete,
    /// Recovery of a backlog of expired intents.
    Recover,
    /// Re-indexing, on stores of its own: the rebuild's throughput against
    /// the ingest path, and the write latency while a migration is open.
    Reindex,
}

/// `tandem bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Records per upsert pass (each protocol, each repetition).
    #[arg(long, default_value_t = 5000, value_name = "N")]
    pub records: usize,

    /// Most batches per pass: small batch sizes write fewer records.
    #[arg(long, default_value_t = 200, value_name = "N")]
    pub max_batches: usize,

    /// Vector dimensions (comma-separated). The global --dim N measures one.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "384,1536",
        value_name = "N,..."
    )]
    pub dims: Vec<usize>,

    /// Records per batch (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,10,100,1000",
        value_name = "N,..."
    )]
    pub batch_size: Vec<usize>,

    /// Calls in flight at once (in-process workers).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub concurrency: usize,

    /// Repetitions of every pass (protocols rotate their order each time).
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub repeat: usize,

    /// One-way delay added in front of each server, in milliseconds
    /// (comma-separated; servers only).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0",
        value_name = "MS,..."
    )]
    pub added_latency: Vec<f64>,

    /// Groups of cases to run (comma-separated). search, verify and delete
    /// work on the records the upsert group wrote, so they need it.
    #[arg(
        long,
        value_delimiter = ',',
        value_enum,
        default_value = "upsert,search,verify,delete,recover,reindex",
        value_name = "GROUP,..."
    )]
    pub cases: Vec<CaseGroup>,

    /// Re-indexing: records ingested (Tandem upsert, batch 1000) before each
    /// rebuild, in fresh stores per repetition [default: --records]. At
    /// least the largest batch size (the writes during a migration update
    /// them).
    #[arg(long, value_name = "N")]
    pub reindex_records: Option<usize>,

    /// Re-indexing: rows per copy chunk (`ReindexConfig::chunk`; default:
    /// the coordinator's).
    #[arg(long, value_name = "N")]
    pub reindex_chunk: Option<usize>,

    /// Backends to measure (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        value_enum,
        default_value = "embedded",
        value_name = "B,..."
    )]
    pub backends: Vec<BenchBackend>,

    /// Search queries per search case.
    #[arg(long, default_value_t = 200, value_name = "N")]
    pub queries: usize,

    /// Expired intents in the recovery backlog (each names 10 garbage points).
    #[arg(long, default_value_t = 300, value_name = "N")]
    pub backlog: usize,

    /// Points per index call of Tandem's writes (`Limits::index_chunk`;
    /// default: the coordinator's). The baselines send a batch in one request.
    #[arg(long, value_name = "N")]
    pub index_chunk: Option<usize>,

    /// Index calls of one Tandem batch in flight at once
    /// (`Limits::index_parallelism`; default: the coordinator's).
    #[arg(long, value_name = "N")]
    pub index_parallelism: Option<usize>,

    /// Intents recovery claims and handles per batch
    /// (`CoordinatorConfig::recovery_batch`; default: the coordinator's).
    #[arg(long, value_name = "N")]
    pub recovery_batch: Option<usize>,

    /// Scopes the generated records are spread over.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub scopes: usize,

    /// Whether rows keep their vectors (Tandem's default, for repair); the
    /// baselines store the same columns.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub keep_vectors: bool,

    /// Whether Tandem's upsert overlaps its commit with the index write
    /// (`CoordinatorConfig::overlap_index_write`; `false` measures the
    /// sequential protocol).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub overlap_index_write: bool,

    /// Candidates a guarded search asks the index for, per wanted hit
    /// (`CoordinatorConfig::search_overfetch`; default: the coordinator's).
    #[arg(long, value_name = "N")]
    pub search_overfetch: Option<usize>,

    /// Seed of the generated data.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,

    /// Prefix of the schemas (NAME, NAME_base) and collections the bench
    /// creates on servers; they are dropped at the start and the end of each
    /// run, so never name anything of yours.
    #[arg(long, default_value = "tandem_bench", value_name = "NAME")]
    pub namespace: String,

    /// Leave the servers' bench schemas and collections in place after the
    /// last run (for inspection).
    #[arg(long)]
    pub keep_data: bool,

    /// Write results.json, results.md and throughput.svg here.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,

    /// Where the embedded stores are created [default: the system temp dir].
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,

    /// The qdrant-double binary, started for `servers` when no Qdrant URL is
    /// configured [default: next to this executable].
    #[arg(long, value_name = "PATH")]
    pub qdrant_double: Option<PathBuf>,
}

/// A qdrant-double child process, stopped on drop.
struct DoubleProcess {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for DoubleProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_double(explicit: Option<&Path>) -> Result<(String, DoubleProcess), AppError> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join("qdrant-double")))
            .filter(|p| p.exists())
            .ok_or_else(|| {
                AppError::Usage(
                    "bench --backends servers needs a Qdrant: set --qdrant-url / QDRANT_URL, or \
                     build the test server (cargo build -p tandem-tests --bin qdrant-double) \
                     next to tandem or name it with --qdrant-double"
                        .into(),
                )
            })?,
    };
    let dir = tempfile::Builder::new()
        .prefix("tandem-bench-qdrant-")
        .tempdir()
        .map_err(|e| AppError::Failed(format!("bench: temp dir: {e}")))?;
    let mut child = Command::new(&path)
        .args(["--port", "0", "--flush", "on-shutdown", "--data-dir"])
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| AppError::Failed(format!("bench: cannot start {}: {e}", path.display())))?;
    let stdout = child.stdout.take();
    let mut proc = DoubleProcess { child, _dir: dir };
    let mut line = String::new();
    if let Some(out) = stdout {
        let _ = BufReader::new(out).read_line(&mut line);
    }
    match line.trim().rsplit_once(' ') {
        Some((_, url)) if url.starts_with("http://") => Ok((url.to_owned(), proc)),
        _ => {
            let _ = proc.child.kill();
            Err(AppError::Failed(format!(
                "bench: {} did not report its address",
                path.display()
            )))
        }
    }
}

/// `tandem bench`.
pub async fn run(
    args: BenchArgs,
    global: &GlobalArgs,
    settings: &Settings,
    out: Output,
) -> Result<u8, AppError> {
    let dims = match global.dimension {
        Some(d) => vec![d],
        None => args.dims.clone(),
    };
    let usage = |m: &str| Err(AppError::Usage(format!("bench: {m}")));
    if dims.is_empty() || dims.contains(&0) {
        return usage("--dims must list positive dimensions");
    }
    if args.batch_size.is_empty() || args.batch_size.contains(&0) {
        return usage("--batch-size must list positive sizes");
    }
    if args.concurrency == 0 || args.repeat == 0 || args.records == 0 || args.scopes == 0 {
        return usage("--records, --concurrency, --repeat and --scopes must be positive");
    }
    if args
        .added_latency
        .iter()
        .any(|l| !l.is_finite() || *l < 0.0 || *l > 10_000.0)
    {
        return usage("--added-latency must be between 0 and 10000 ms");
    }
    let mut cases = args.cases.clone();
    cases.sort_unstable();
    cases.dedup();
    if cases.is_empty() {
        return usage("--cases must name at least one group");
    }
    if !cases.contains(&CaseGroup::Upsert)
        && [CaseGroup::Search, CaseGroup::Verify, CaseGroup::Delete]
            .iter()
            .any(|g| cases.contains(g))
    {
        return usage("--cases: search, verify and delete need upsert (they use its records)");
    }
    let reindex_records = args.reindex_records.unwrap_or(args.records);
    let largest_batch = args.batch_size.iter().copied().max().unwrap_or(1);
    if cases.contains(&CaseGroup::Reindex) && reindex_records < largest_batch {
        return usage(
            "--reindex-records must be at least the largest batch size (the writes during \
             a migration update that many of its records)",
        );
    }
    if args.reindex_chunk == Some(0) {
        return usage("--reindex-chunk must be positive");
    }
    let plan = run::Plan {
        records: args.records,
        max_batches: args.max_batches.max(1),
        batch_sizes: args.batch_size.clone(),
        concurrency: args.concurrency,
        repeat: args.repeat,
        queries: args.queries.max(2),
        backlog: args.backlog.max(1),
        backlog_points: 10,
        scopes: args.scopes,
        keep_vectors: args.keep_vectors,
        seed: args.seed,
        quiet: out.quiet,
        cases: cases.clone(),
        reindex_records,
    };
    let mut config = tandem_core::CoordinatorConfig {
        overlap_index_write: args.overlap_index_write,
        ..Default::default()
    };
    if let Some(n) = args.search_overfetch {
        config.search_overfetch = n;
    }
    if let Some(n) = args.recovery_batch {
        config.recovery_batch = n;
    }
    if let Some(n) = args.index_chunk {
        config.limits.index_chunk = n;
    }
    if let Some(n) = args.index_parallelism {
        config.limits.index_parallelism = n;
    }
    if let Some(n) = args.reindex_chunk {
        config.reindex.chunk = n;
    }
    config
        .validate()
        .map_err(|e| AppError::Usage(format!("bench configuration: {e}")))?;
    let work_dir = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let namespace = sql::Ident::new(&args.namespace)?;

    // The servers, resolved once (and a test server started if needed).
    let mut _double = None;
    let servers = if args.backends.contains(&BenchBackend::Servers) {
        let MetadataTarget::Postgres { url, .. } = &settings.metadata else {
            return usage("--backends servers needs PostgreSQL: --postgres-url or DATABASE_URL");
        };
        let (qdrant_url, qdrant_api_key, qdrant_name) = match &settings.index {
            IndexTarget::Qdrant { url, api_key, .. } => {
                (url.clone(), api_key.clone(), "Qdrant server".to_owned())
            }
            _ => {
                let (url, process) = start_double(args.qdrant_double.as_deref())?;
                _double = Some(process);
                (
                    url,
                    None,
                    "Qdrant-compatible test server (qdrant-double)".to_owned(),
                )
            }
        };
        Some(env::Servers {
            postgres_url: url.clone(),
            qdrant_url,
            qdrant_api_key,
            qdrant_name,
        })
    } else {
        None
    };

    let mut runs = Vec::new();
    for backend in &args.backends {
        let (name, servers, latencies) = match backend {
            // No network inside one process: embedded runs once, at 0.
            BenchBackend::Embedded => ("embedded", None, vec![0.0]),
            BenchBackend::Servers => ("servers", servers.as_ref(), args.added_latency.clone()),
        };
        for &latency_ms in &latencies {
            for &dim in &dims {
                let latency = Duration::from_secs_f64(latency_ms / 1e3);
                let spec = env::EnvSpec {
                    servers,
                    work_dir: &work_dir,
                    latency,
                    dim,
                    concurrency: args.concurrency,
                    keep_vectors: args.keep_vectors,
                    namespace: &namespace,
                    config: &config,
                };
                let env = Arc::new(
                    env::Env::open(&spec)
                        .await
                        .map_err(|e| redact(e, settings))?,
                );
                let label = run::RunLabel {
                    backend: name,
                    latency,
                    dim,
                };
                let result = run::run(env.clone(), &plan, label).await;
                if !args.keep_data {
                    env.cleanup().await.map_err(|e| redact(e, settings))?;
                }
                runs.push(result.map_err(|e| redact(e, settings))?);
            }
        }
    }

    let report = report::Report {
        command: command_line(),
        version: env!("CARGO_PKG_VERSION"),
        machine: report::Machine::here(),
        params: serde_json::json!({
            "records": args.records,
            "max_batches": plan.max_batches,
            "dims": dims,
            "batch_sizes": args.batch_size,
            "concurrency": args.concurrency,
            "repeat": args.repeat,
            "added_latency_ms": args.added_latency,
            "backends": args.backends.iter().map(|b| format!("{b:?}").to_lowercase()).collect::<Vec<_>>(),
            "queries": plan.queries,
            "k": 10,
            "backlog_intents": plan.backlog,
            "backlog_points_per_intent": plan.backlog_points,
            "scopes": args.scopes,
            "keep_vectors": args.keep_vectors,
            "overlap_index_write": config.overlap_index_write,
            "search_overfetch": config.search_overfetch,
            "recovery_batch": config.recovery_batch,
            "index_chunk": config.limits.index_chunk,
            "index_parallelism": config.limits.index_parallelism,
            "cases": cases,
            "reindex_records": cases.contains(&CaseGroup::Reindex).then_some(reindex_records),
            "reindex_chunk": config.reindex.chunk,
            "seed": args.seed,
        }),
        consistent: runs.iter().all(|r| r.consistent_after),
        runs,
    };
    if let Some(dir) = &args.out {
        write_out(dir, &report)?;
    }
    if out.json {
        out.json(&report);
    } else {
        out.text(&report.terminal());
        if let Some(dir) = &args.out {
            out.text(&format!("Results written to {}", dir.display()));
        }
    }
    Ok(if report.consistent {
        EXIT_OK
    } else {
        EXIT_FAILED
    })
}

/// The command line as typed, without any URL (which may hold a password).
fn command_line() -> String {
    let mut words = Vec::new();
    let mut skip = false;
    for a in std::env::args() {
        if skip {
            words.push("***".to_owned());
            skip = false;
            continue;
        }
        if a == "--postgres-url" || a == "--qdrant-url" {
            skip = true;
        }
        let shown = match a.split_once('=') {
            Some((k, _)) if k == "--postgres-url" || k == "--qdrant-url" => format!("{k}=***"),
            _ => a,
        };
        words.push(shown);
    }
    if let Some(first) = words.first_mut()
        && let Some(name) = Path::new(first.as_str()).file_name()
    {
        *first = name.to_string_lossy().into_owned();
    }
    words.join(" ")
}

fn redact(e: AppError, settings: &Settings) -> AppError {
    match e {
        AppError::Failed(m) => AppError::Failed(settings.redactor.redact(&m)),
        other => other,
    }
}

fn write_out(dir: &Path, report: &report::Report) -> Result<(), AppError> {
    let io = |what: &str, e: std::io::Error| {
        AppError::Failed(format!("bench: writing {what} in {}: {e}", dir.display()))
    };
    std::fs::create_dir_all(dir).map_err(|e| io("the directory", e))?;
    let json = serde_json::to_string_pretty(report)
        .map_err(|e| AppError::Failed(format!("bench: serializing the report: {e}")))?;
    std::fs::write(dir.join("results.json"), json).map_err(|e| io("results.json", e))?;
    let mut md = report.markdown();
    // The chart shows the upserts: without that group there is none.
    let upserts = report
        .runs
        .iter()
        .any(|r| r.cases.iter().any(|c| c.operation == "upsert"));
    if upserts {
        md.push_str("![upsert throughput vs batch size](throughput.svg)\n");
    }
    std::fs::write(dir.join("results.md"), md).map_err(|e| io("results.md", e))?;
    if !upserts {
        return Ok(());
    }
    chart::throughput_svg(&report.runs, &dir.join("throughput.svg"))
        .map_err(|e| AppError::Failed(format!("bench: drawing throughput.svg: {e}")))
}
