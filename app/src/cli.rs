//! The command line: global options and one subcommand per operation.
//!
//! Every option that selects or configures a store is global, so it may be given
//! before or after the subcommand. Values resolve as flags > environment >
//! `tandem.toml` > defaults (see [`crate::settings`]).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tandem_core::Distance;

/// Keeps a metadata store and a vector index consistent: every batch upsert or
/// delete is all-or-nothing across both.
///
/// By default both stores are embedded (SQLite + qdrant-edge) under --data-dir;
/// --postgres-url and --qdrant-url switch either side to a server.
#[derive(Debug, Parser)]
#[command(
    name = "tandem",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// Options shared by every command.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Options shared by every command.
#[derive(Clone, Debug, Args)]
pub struct GlobalArgs {
    /// Configuration file [default: ./tandem.toml when it exists].
    #[arg(long, global = true, env = "TANDEM_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Directory of the embedded stores [default: ./tandem-data].
    #[arg(long, global = true, env = "TANDEM_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Use PostgreSQL for metadata instead of the embedded SQLite store.
    #[arg(
        long,
        global = true,
        env = "DATABASE_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub postgres_url: Option<String>,

    /// PostgreSQL schema holding Tandem's tables [default: tandem].
    #[arg(long, global = true, value_name = "NAME")]
    pub postgres_schema: Option<String>,

    /// Use a Qdrant server (gRPC, e.g. http://localhost:6334) instead of the
    /// embedded index. The API key is read from QDRANT_API_KEY or the config file.
    #[arg(long, global = true, env = "QDRANT_URL", value_name = "URL")]
    pub qdrant_url: Option<String>,

    /// Vector collection name [default: tandem].
    #[arg(long, global = true, value_name = "NAME")]
    pub collection: Option<String>,

    /// Vector dimension of the collection [default: 384].
    #[arg(long = "dim", global = true, value_name = "N")]
    pub dimension: Option<usize>,

    /// Distance function of the collection [default: cosine].
    #[arg(long, global = true, value_name = "cosine|dot|euclid")]
    pub distance: Option<Distance>,

    /// Print machine-readable JSON on stdout instead of tables.
    #[arg(long, global = true)]
    pub json: bool,

    /// More logging on stderr (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// No progress output on stderr.
    #[arg(short, long, global = true)]
    pub quiet: bool,

    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9898) while the
    /// command runs.
    #[arg(long, global = true, env = "TANDEM_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Use throw-away in-memory stores for both sides (testing only).
    #[arg(long, global = true, hide = true, value_enum)]
    pub backend: Option<BackendChoice>,
}

/// Forces a backend regardless of the URLs (hidden; for tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// In-process maps; nothing survives the command.
    Memory,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Ingest JSON Lines records (FILE, or - for stdin) in all-or-nothing batches.
    Ingest(IngestArgs),
    /// Delete records by ids, by scope, or by scope and a metadata key=value.
    Delete(DeleteArgs),
    /// Guarded similarity search: only committed, current records are returned.
    Search(SearchArgs),
    /// Finish or undo writes whose process died (intents whose lease ended).
    Recover,
    /// Compare both stores; exit code 0 only when they are consistent.
    Verify(VerifyArgs),
    /// Counts in both stores and the intent backlog.
    Stats,
    /// Create or upgrade the schema and the collection.
    Migrate,
    /// Run the end-to-end demo in a fresh data directory: ingest, updates,
    /// deletes, injected failures and a crash, recovery, verify.
    Demo(DemoArgs),
    /// Measure Tandem against the raw dual write and the naive compensation
    /// protocol on the same data (see docs/performance.md).
    Bench(crate::bench::BenchArgs),
}

/// How `ingest` computes vectors for records that have none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbedMode {
    /// Records must carry their own vector.
    None,
    /// Deterministic feature-hashing of the content's words (lexical only).
    Hash,
}

/// `tandem ingest`.
#[derive(Debug, Args)]
pub struct IngestArgs {
    /// JSON Lines file, or - for stdin.
    #[arg(value_name = "FILE|-")]
    pub input: String,

    /// Records per all-or-nothing batch [default: 500].
    #[arg(long, value_name = "N")]
    pub batch_size: Option<usize>,

    /// Compute vectors for records without one [default: none].
    #[arg(long, value_enum, value_name = "MODE")]
    pub embed: Option<EmbedMode>,

    /// Give batch N the idempotency key PREFIX:N, so that re-running the same
    /// input (with the same --batch-size) writes nothing twice.
    #[arg(long, value_name = "PREFIX")]
    pub idempotency_prefix: Option<String>,

    /// After the last batch, optimize the embedded index (build its HNSW
    /// graph, vacuum deleted points). Without it, search is exhaustive.
    #[arg(long)]
    pub optimize: bool,
}

/// `tandem delete`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("selector").required(true).args(["ids", "scope"])))]
pub struct DeleteArgs {
    /// Record ids (comma-separated or repeated).
    #[arg(long, value_delimiter = ',', num_args = 1.., value_name = "ID")]
    pub ids: Vec<String>,

    /// Delete the records of this scope.
    #[arg(long, value_name = "SCOPE")]
    pub scope: Option<String>,

    /// Only records whose metadata has key = value (requires --scope). The value
    /// is read as JSON when it parses (42, true, "text"), else as a string.
    #[arg(long = "where", requires = "scope", value_name = "KEY=VALUE")]
    pub where_eq: Option<String>,

    /// Idempotency key: repeating the call with it deletes nothing twice.
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
}

/// `tandem search`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("query").required(true).args(["vector", "text"])))]
pub struct SearchArgs {
    /// The query vector, as a JSON array.
    #[arg(long, value_name = "JSON")]
    pub vector: Option<String>,

    /// A text query, embedded with the hash embedding (as `ingest --embed hash`).
    #[arg(long, value_name = "TEXT")]
    pub text: Option<String>,

    /// Only records of this scope.
    #[arg(long, value_name = "SCOPE")]
    pub scope: Option<String>,

    /// Only records whose metadata has key = value (repeatable; values as in delete).
    #[arg(long = "where", value_name = "KEY=VALUE")]
    pub where_eq: Vec<String>,

    /// Number of hits.
    #[arg(short, long, default_value_t = 10, value_name = "N")]
    pub k: usize,

    /// Only hits scoring at least this.
    #[arg(long, value_name = "SCORE")]
    pub min_score: Option<f32>,
}

/// `tandem verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Only this scope.
    #[arg(long, value_name = "SCOPE")]
    pub scope: Option<String>,

    /// Recover expired intents, delete old orphan points and rewrite missing
    /// points from stored vectors, then verify again.
    #[arg(long)]
    pub repair: bool,
}

/// `tandem demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Records in the generated catalog.
    #[arg(long, default_value_t = 3000, value_name = "N")]
    pub records: usize,

    /// Seed of the generated catalog.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,

    /// Keep the temporary data directory (printed at the end).
    #[arg(long)]
    pub keep: bool,
}
