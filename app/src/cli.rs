//! The command line: global options and one subcommand per operation.
//!
//! Every option that selects or configures a store is global, so it may be given
//! before or after the subcommand. Values resolve as flags > environment >
//! `tandem.toml` > defaults (see [`crate::settings`]).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tandem_adapters::qdrant::{PayloadFieldType, Quantization};
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

    /// How writes reach the index: sync (the call writes it) or deferred
    /// (one metadata transaction; index workers write the points later, see
    /// docs/deferred.md) [config: coordinator.write_mode; default: sync].
    #[arg(
        long,
        global = true,
        env = "TANDEM_WRITE_MODE",
        value_name = "sync|deferred"
    )]
    pub write_mode: Option<tandem_core::WriteMode>,

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

    /// How texts become vectors (`ingest` of records without a vector,
    /// `search --text`).
    #[command(flatten)]
    pub embed: EmbedArgs,

    /// Settings of a Qdrant collection Tandem creates, checked against an
    /// existing one (see docs/qdrant.md). Last: their help heading applies to
    /// the options after them.
    #[command(flatten)]
    pub qdrant_collection: QdrantCollectionArgs,
}

/// The embedder: which one, and how to reach a model server. Unset: the
/// config file's `[embed]` value, else the default. See docs/embeddings.md.
#[derive(Clone, Debug, Default, Args)]
#[command(next_help_heading = "Embedding (records without a vector, search --text)")]
pub struct EmbedArgs {
    /// Compute vectors for records without one: none, hash (lexical, local)
    /// or openai (an OpenAI-compatible server) [default: none; search --text
    /// uses hash then].
    #[arg(
        long,
        global = true,
        env = "TANDEM_EMBED",
        value_enum,
        value_name = "MODE"
    )]
    pub embed: Option<EmbedMode>,

    /// Base URL of the OpenAI-compatible API, e.g. http://localhost:11434/v1
    /// (Ollama) or https://api.openai.com/v1. The API key is read from
    /// TANDEM_EMBED_API_KEY or OPENAI_API_KEY.
    #[arg(long, global = true, env = "TANDEM_EMBED_URL", value_name = "URL")]
    pub embed_url: Option<String>,

    /// The embedding model (or Azure deployment) to ask for.
    #[arg(long, global = true, env = "TANDEM_EMBED_MODEL", value_name = "NAME")]
    pub embed_model: Option<String>,

    /// Ask the model for vectors of N dimensions (the request's `dimensions`,
    /// for models that can shorten theirs); must equal --dim.
    #[arg(long, global = true, env = "TANDEM_EMBED_DIMENSIONS", value_name = "N")]
    pub embed_dimensions: Option<usize>,

    /// Most texts per request to the server [default: 128].
    #[arg(long, global = true, value_name = "N")]
    pub embed_batch_texts: Option<usize>,

    /// Most bytes of text per request to the server [default: 1048576].
    #[arg(long, global = true, value_name = "BYTES")]
    pub embed_batch_bytes: Option<usize>,

    /// Requests to the server in flight at once [default: 4].
    #[arg(long, global = true, value_name = "N")]
    pub embed_concurrency: Option<usize>,

    /// Time limit of one request to the server (e.g. 60s, 500ms) [default: 60s].
    #[arg(long, global = true, value_name = "DURATION", value_parser = crate::ingest::parse_duration)]
    pub embed_timeout: Option<std::time::Duration>,

    /// Retries of a request that failed with a retryable error (429, 5xx,
    /// timeout, connection) [default: 5].
    #[arg(long, global = true, value_name = "N")]
    pub embed_retries: Option<u32>,
}

/// The Qdrant collection settings, named as Qdrant names them. Unset: the
/// config file's `[qdrant]` value, else Qdrant's default (and no check).
#[derive(Clone, Debug, Default, Args)]
#[command(next_help_heading = "Qdrant collection (created with these; an existing one is checked)")]
pub struct QdrantCollectionArgs {
    /// Shards of the collection [Qdrant's default: 1, or the number of nodes].
    #[arg(
        long,
        global = true,
        env = "TANDEM_QDRANT_SHARD_NUMBER",
        value_name = "N"
    )]
    pub qdrant_shard_number: Option<u32>,

    /// Copies of each shard in a cluster [Qdrant's default: 1].
    #[arg(
        long,
        global = true,
        env = "TANDEM_QDRANT_REPLICATION_FACTOR",
        value_name = "N"
    )]
    pub qdrant_replication_factor: Option<u32>,

    /// Replicas that must apply a write before it succeeds [Qdrant's default: 1].
    #[arg(
        long,
        global = true,
        env = "TANDEM_QDRANT_WRITE_CONSISTENCY_FACTOR",
        value_name = "N"
    )]
    pub qdrant_write_consistency_factor: Option<u32>,

    /// Serve vectors from disk instead of RAM [Qdrant's default: false].
    #[arg(
        long,
        global = true,
        env = "TANDEM_QDRANT_ON_DISK",
        value_name = "true|false",
        action = clap::ArgAction::Set
    )]
    pub qdrant_on_disk: Option<bool>,

    /// Keep payloads on disk instead of RAM [Qdrant's default: true].
    #[arg(
        long,
        global = true,
        env = "TANDEM_QDRANT_ON_DISK_PAYLOAD",
        value_name = "true|false",
        action = clap::ArgAction::Set
    )]
    pub qdrant_on_disk_payload: Option<bool>,

    /// HNSW edges per node; 0 builds no graph [Qdrant's default: 16].
    #[arg(long, global = true, env = "TANDEM_QDRANT_HNSW_M", value_name = "N")]
    pub qdrant_hnsw_m: Option<u64>,

    /// HNSW neighbours considered while building, at least 4 [Qdrant's default: 100].
    #[arg(
        long,
        global = true,
        env = "TANDEM_QDRANT_HNSW_EF_CONSTRUCT",
        value_name = "N"
    )]
    pub qdrant_hnsw_ef_construct: Option<u64>,

    /// none, scalar or binary, with options: scalar:quantile=0.99,always_ram=true
    /// [Qdrant's default: none].
    #[arg(
        long,
        global = true,
        env = "TANDEM_QDRANT_QUANTIZATION",
        value_name = "SPEC",
        value_parser = parse_quantization
    )]
    pub qdrant_quantization: Option<Quantization>,

    /// A payload index on a metadata key (repeatable, or comma-separated); TYPE is
    /// keyword, integer, float, bool, geo, text, datetime or uuid. Replaces the
    /// config file's payload_indexes.
    #[arg(
        long = "qdrant-payload-index",
        global = true,
        env = "TANDEM_QDRANT_PAYLOAD_INDEXES",
        value_name = "KEY=TYPE",
        value_delimiter = ',',
        value_parser = parse_payload_index
    )]
    pub qdrant_payload_indexes: Vec<(String, PayloadFieldType)>,
}

fn parse_quantization(s: &str) -> Result<Quantization, String> {
    s.parse()
}

/// `KEY=TYPE`, split at the last `=` (a type never contains one).
pub fn parse_payload_index(s: &str) -> Result<(String, PayloadFieldType), String> {
    let (key, kind) = s
        .rsplit_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=TYPE (e.g. item=keyword)"))?;
    Ok((key.to_owned(), kind.parse()?))
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
    /// Durable sagas (e.g. `ingest --atomic`): list, show, abort.
    #[command(subcommand)]
    Saga(SagaCommand),
    /// Index deferred writes (see docs/deferred.md): claims pending entries,
    /// writes their points, switches the rows to them; also runs recovery.
    /// Runs until interrupted, or with --until-idle until nothing is pending.
    IndexWorker(IndexWorkerArgs),
    /// The dead-letter list of deferred writes the index workers gave up on.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Build a new collection from the metadata store and switch every
    /// process to it, while reads and writes go on (see docs/reindex.md):
    /// a rebuild from the kept vectors, or a re-embedding with --embed.
    /// Resumes a migration an interrupted run left open.
    Reindex(ReindexArgs),
    /// Create or upgrade the schema and the collection.
    Migrate,
    /// Run the end-to-end demo in a fresh data directory: ingest, updates,
    /// deletes, injected failures and a crash, recovery, verify.
    Demo(DemoArgs),
    /// Measure Tandem against the raw dual write and the naive compensation
    /// protocol on the same data (see docs/performance.md).
    Bench(Box<crate::bench::BenchArgs>),
    /// Run as a service: JSON API, live dashboard, Prometheus metrics, health
    /// checks, background recovery and verification (see docs/serve.md).
    Serve(Box<crate::serve::ServeArgs>),
    /// Measure the HTTP API of `serve` against the library on the same stores
    /// and batches (see docs/performance.md).
    BenchApi(Box<crate::serve::BenchApiArgs>),
}

/// How `ingest` computes vectors for records that have none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbedMode {
    /// Records must carry their own vector.
    None,
    /// Deterministic feature-hashing of the content's words (lexical only).
    Hash,
    /// A model behind an OpenAI-compatible `/embeddings` API (--embed-url,
    /// --embed-model).
    Openai,
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

    /// Give batch N the idempotency key PREFIX:N, so that re-running the same
    /// input (with the same --batch-size) writes nothing twice.
    #[arg(long, value_name = "PREFIX")]
    pub idempotency_prefix: Option<String>,

    /// After the last batch, optimize the embedded index (build its HNSW
    /// graph, vacuum deleted points). Without it, search is exhaustive.
    #[arg(long)]
    pub optimize: bool,

    /// Retry a batch that failed with a retryable error (a store unavailable,
    /// the outcome unknown) up to N times, under the same idempotency key
    /// (0: stop at the first failed batch).
    #[arg(long, value_name = "N", default_value_t = crate::ingest::BatchRetry::DEFAULT_RETRIES)]
    pub batch_retries: u32,

    /// Start no retry of a batch later than this after its first failure
    /// (e.g. 90s, 2m, 500ms) [default: 2m].
    #[arg(long, value_name = "DURATION", value_parser = crate::ingest::parse_duration)]
    pub batch_retry_for: Option<std::time::Duration>,

    /// All or nothing for the whole input: one durable saga whose steps are
    /// the batches. If a batch fails for good, or on Ctrl-C, every batch
    /// already written is undone; if the process dies, `tandem recover` (or
    /// `tandem serve`) undoes it after the lease. Each batch is visible to
    /// searches once it commits; undone means restored.
    #[arg(long, conflicts_with = "idempotency_prefix")]
    pub atomic: bool,

    /// With --write-mode deferred: after the last batch, wait at most this
    /// long until every record written is searchable (index workers run
    /// elsewhere: `tandem index-worker`, `tandem serve`); exit 1 if they are
    /// not by then, or were dead-lettered (e.g. 30s, 5m).
    #[arg(long, value_name = "DURATION", value_parser = crate::ingest::parse_duration)]
    pub wait_indexed: Option<std::time::Duration>,

    /// With --atomic: as the saga's last step, delete the records of SCOPE
    /// that the input did not write, so that the scope ends up holding
    /// exactly the input's records of it.
    #[arg(long, requires = "atomic", value_name = "SCOPE")]
    pub replace_scope: Option<String>,
}

/// `tandem saga`.
#[derive(Debug, Subcommand)]
pub enum SagaCommand {
    /// Sagas, newest first, with their state and steps.
    List(SagaListArgs),
    /// One saga's journal: input, state, every step with its key and output.
    Show {
        /// The saga's id.
        #[arg(value_name = "ID")]
        id: String,
    },
    /// Undo a live saga now: take it over and compensate its completed steps
    /// in reverse order (refused past its pivot or once ended).
    Abort {
        /// The saga's id.
        #[arg(value_name = "ID")]
        id: String,
    },
}

/// `tandem index-worker`.
#[derive(Debug, Args)]
pub struct IndexWorkerArgs {
    /// Drain the backlog and exit 0 (exit 1 if entries are left dead-lettered).
    #[arg(long)]
    pub until_idle: bool,

    /// With --until-idle: give up after this long with entries still waiting
    /// (exit 1) [default: 10m].
    #[arg(long, value_name = "DURATION", value_parser = crate::ingest::parse_duration)]
    pub patience: Option<std::time::Duration>,
}

/// `tandem reindex`.
#[derive(Debug, Args)]
pub struct ReindexArgs {
    /// The new collection (created by the re-index).
    #[arg(long, value_name = "NAME", required_unless_present_any = ["abort", "drop_retired", "status"])]
    pub to_collection: Option<String>,

    /// Its dimension [default: the embedder's with --embed, else the
    /// active collection's].
    #[arg(long = "to-dim", value_name = "N")]
    pub to_dim: Option<usize>,

    /// Its distance [default: the active collection's].
    #[arg(long = "to-distance", value_name = "cosine|dot|euclid", value_parser = parse_distance)]
    pub to_distance: Option<tandem_core::Distance>,

    /// Copy only: leave the migration open, without switching (a later run
    /// catches up and switches).
    #[arg(long)]
    pub no_switch: bool,

    /// Drop the old collection after the switch (no rollback to it then).
    #[arg(long)]
    pub drop_old: bool,

    /// Abandon the open migration (the old collection stays active) and drop
    /// its partial collection.
    #[arg(long, conflicts_with_all = ["to_collection", "drop_retired", "status"])]
    pub abort: bool,

    /// Drop the collection the last switch retired.
    #[arg(long, conflicts_with_all = ["to_collection", "status"])]
    pub drop_retired: bool,

    /// Show the active collection and any open migration.
    #[arg(long, conflicts_with = "to_collection")]
    pub status: bool,
}

fn parse_distance(value: &str) -> Result<tandem_core::Distance, String> {
    match value.to_ascii_lowercase().as_str() {
        "cosine" => Ok(tandem_core::Distance::Cosine),
        "dot" => Ok(tandem_core::Distance::Dot),
        "euclid" | "euclidean" => Ok(tandem_core::Distance::Euclid),
        other => Err(format!("unknown distance {other:?}: cosine, dot or euclid")),
    }
}

/// `tandem dlq`.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Dead-lettered records with their attempts and last error.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 100, value_name = "N")]
        limit: usize,
    },
    /// Put dead-lettered records back in the queue (the given ids, or --all).
    Retry(DlqTargets),
    /// Give up on dead-lettered records (the given ids, or --all): they stay
    /// committed, found through their previous point (or not at all if never
    /// indexed).
    Drop(DlqTargets),
}

/// Which dead letters `dlq retry|drop` act on.
#[derive(Debug, Args)]
pub struct DlqTargets {
    /// Record ids.
    #[arg(value_name = "ID")]
    pub ids: Vec<String>,
    /// Every dead-lettered record.
    #[arg(long, conflicts_with = "ids")]
    pub all: bool,
}

/// `tandem saga list`.
#[derive(Debug, Args)]
pub struct SagaListArgs {
    /// Only sagas in this state.
    #[arg(long, value_enum, value_name = "STATE")]
    pub state: Option<SagaStateArg>,

    /// At most this many.
    #[arg(long, default_value_t = 50, value_name = "N")]
    pub limit: usize,
}

/// A saga state on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SagaStateArg {
    /// Going forward.
    Running,
    /// Undoing its completed steps.
    Compensating,
    /// Every step completed.
    Done,
    /// Every completed step undone.
    Compensated,
    /// Stopped where an operator must look.
    Failed,
}

impl From<SagaStateArg> for tandem_core::SagaState {
    fn from(s: SagaStateArg) -> Self {
        match s {
            SagaStateArg::Running => Self::Running,
            SagaStateArg::Compensating => Self::Compensating,
            SagaStateArg::Done => Self::Done,
            SagaStateArg::Compensated => Self::Compensated,
            SagaStateArg::Failed => Self::Failed,
        }
    }
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

    /// A text query, embedded with the configured embedder (--embed; the hash
    /// embedding when none is configured).
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
