//! Configuration: flags > environment > `tandem.toml` > defaults.
//!
//! clap resolves flags over environment variables; this module lays the
//! configuration file under both and fills in the defaults.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tandem_adapters::qdrant::{CollectionSettings, PayloadFieldType, Quantization};
use tandem_core::{BatchLimits, CoordinatorConfig, Distance, IndexError, RetryPolicy};

use crate::cli::{BackendChoice, EmbedArgs, EmbedMode, GlobalArgs, QdrantCollectionArgs};
use crate::error::{AppError, Redactor};

/// The file read when no `--config` / `TANDEM_CONFIG` is given, if it exists.
pub const DEFAULT_CONFIG_FILE: &str = "tandem.toml";
/// Default data directory of the embedded stores.
pub const DEFAULT_DATA_DIR: &str = "./tandem-data";
/// Default collection name.
pub const DEFAULT_COLLECTION: &str = "tandem";
/// Default vector dimension.
pub const DEFAULT_DIMENSION: usize = 384;
/// Default PostgreSQL schema.
pub const DEFAULT_SCHEMA: &str = "tandem";
/// Default ingest batch size.
pub const DEFAULT_BATCH_SIZE: usize = 500;

/// The contents of `tandem.toml`. Every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    data_dir: Option<PathBuf>,
    postgres_url: Option<String>,
    qdrant_url: Option<String>,
    qdrant_api_key: Option<String>,
    collection: Option<String>,
    dimension: Option<usize>,
    distance: Option<Distance>,
    auto_migrate: Option<bool>,
    metrics_addr: Option<SocketAddr>,
    #[serde(default)]
    postgres: PostgresSection,
    #[serde(default)]
    qdrant: QdrantSection,
    #[serde(default)]
    coordinator: CoordinatorSection,
    #[serde(default)]
    indexing: IndexingSection,
    #[serde(default)]
    reindex: ReindexSection,
    #[serde(default)]
    ingest: IngestSection,
    #[serde(default)]
    embed: EmbedSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PostgresSection {
    schema: Option<String>,
    pool_size: Option<u32>,
    connect_timeout_secs: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct QdrantSection {
    timeout_secs: Option<f64>,
    connect_timeout_secs: Option<f64>,
    require_tls: Option<bool>,
    // The collection settings, named as Qdrant names them (docs/qdrant.md).
    shard_number: Option<u32>,
    replication_factor: Option<u32>,
    write_consistency_factor: Option<u32>,
    on_disk: Option<bool>,
    on_disk_payload: Option<bool>,
    hnsw_m: Option<u64>,
    hnsw_ef_construct: Option<u64>,
    /// `"scalar:quantile=0.99"` (as the flag), or Qdrant's own form
    /// `{ scalar = { quantile = 0.99, always_ram = true } }`.
    quantization: Option<toml::Value>,
    /// Metadata key → index type, e.g. `{ item = "keyword", year = "integer" }`.
    payload_indexes: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CoordinatorSection {
    lease_secs: Option<f64>,
    call_deadline_secs: Option<f64>,
    cleanup_deadline_secs: Option<f64>,
    orphan_grace_secs: Option<f64>,
    max_attempts: Option<u32>,
    max_batch: Option<usize>,
    index_chunk: Option<usize>,
    index_parallelism: Option<usize>,
    /// `sync` (default) or `deferred` (see docs/deferred.md).
    write_mode: Option<tandem_core::WriteMode>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct IndexingSection {
    batch: Option<usize>,
    max_attempts: Option<u32>,
    retry_backoff_secs: Option<f64>,
    max_retry_backoff_secs: Option<f64>,
    idle_poll_secs: Option<f64>,
    lanes: Option<usize>,
}

/// `[reindex]`: the re-index driver's timings (docs/reindex.md). The lease
/// is what a re-run after a crash waits for before it takes the migration
/// over, so an operator (or a crash test) may want it shorter than 10 s; it
/// must still comfortably exceed one chunk's copy, or a re-run could take
/// over from a driver that is only slow.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReindexSection {
    chunk: Option<usize>,
    lease_secs: Option<f64>,
    switch_freeze_secs: Option<f64>,
    switch_attempts: Option<u32>,
    state_ttl_secs: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct IngestSection {
    batch_size: Option<usize>,
    embed: Option<EmbedMode>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbedSection {
    mode: Option<EmbedMode>,
    url: Option<String>,
    model: Option<String>,
    dimensions: Option<usize>,
    /// The environment variable holding the API key (default:
    /// TANDEM_EMBED_API_KEY, then OPENAI_API_KEY). The key itself is never
    /// read from the file.
    api_key_env: Option<String>,
    auth_header: Option<KeyHeader>,
    batch_texts: Option<usize>,
    batch_bytes: Option<usize>,
    concurrency: Option<usize>,
    timeout_secs: Option<f64>,
    connect_timeout_secs: Option<f64>,
    retries: Option<u32>,
    max_retry_after_secs: Option<f64>,
}

/// How the embedding API key is sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyHeader {
    /// `Authorization: Bearer KEY`.
    #[default]
    Bearer,
    /// `api-key: KEY` (Azure OpenAI's deployment API).
    ApiKey,
}

/// The environment variables the embedding API key is read from, in order.
pub const EMBED_KEY_VARS: [&str; 2] = ["TANDEM_EMBED_API_KEY", "OPENAI_API_KEY"];
/// Default request timeout of the embedding server.
pub const DEFAULT_EMBED_TIMEOUT: Duration = Duration::from_secs(60);
/// Default connect timeout of the embedding server.
pub const DEFAULT_EMBED_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default retries of one embedding request.
pub const DEFAULT_EMBED_RETRIES: u32 = 5;
/// Default longest `Retry-After` waited for.
pub const DEFAULT_EMBED_MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// The embedder, resolved. `Debug` is deliberately not derived: the key.
#[derive(Clone)]
pub struct EmbedSettings {
    /// Which embedder `ingest` uses for records without a vector.
    pub mode: EmbedMode,
    /// The OpenAI-compatible API's base URL.
    pub url: Option<String>,
    /// The model.
    pub model: Option<String>,
    /// The request's `dimensions` parameter (equal to the collection's).
    pub dimensions: Option<usize>,
    /// The API key (never shown).
    pub api_key: Option<String>,
    /// How the key is sent.
    pub key_header: KeyHeader,
    /// Request size and concurrency.
    pub limits: BatchLimits,
    /// Request timeout.
    pub timeout: Duration,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Retries of a request with a retryable error.
    pub retry: RetryPolicy,
    /// The longest `Retry-After` waited for.
    pub max_retry_after: Duration,
}

/// Where the metadata lives.
#[derive(Clone)]
pub enum MetadataTarget {
    /// In-process (tests).
    Memory,
    /// The embedded SQLite database file.
    Sqlite {
        /// The database file.
        path: PathBuf,
    },
    /// A PostgreSQL server.
    Postgres {
        /// The connection URL (may hold a password: never shown).
        url: String,
        /// The schema of Tandem's tables.
        schema: String,
        /// Connections in the pool.
        pool_size: Option<u32>,
        /// Timeout of establishing a connection.
        connect_timeout: Option<Duration>,
    },
}

/// Where the vectors live.
#[derive(Clone)]
pub enum IndexTarget {
    /// In-process (tests).
    Memory,
    /// The embedded qdrant-edge shard directory.
    Edge {
        /// The shard's directory.
        path: PathBuf,
    },
    /// A Qdrant server.
    Qdrant {
        /// The gRPC URL.
        url: String,
        /// The API key (never shown).
        api_key: Option<String>,
        /// Request timeout.
        timeout: Option<Duration>,
        /// Connect timeout.
        connect_timeout: Option<Duration>,
        /// Refuse http:// URLs.
        require_tls: bool,
        /// How the collection is created and what an existing one is checked
        /// against.
        collection_settings: CollectionSettings,
    },
}

/// Everything resolved. `Debug` is deliberately not derived: URLs and keys
/// may hold secrets.
#[derive(Clone)]
pub struct Settings {
    /// The data directory (embedded stores).
    pub data_dir: PathBuf,
    /// The metadata side.
    pub metadata: MetadataTarget,
    /// The vector side.
    pub index: IndexTarget,
    /// The collection's name.
    pub collection: String,
    /// The collection's dimension.
    pub dimension: usize,
    /// The collection's distance.
    pub distance: Distance,
    /// Apply migrations when opening the stores.
    pub auto_migrate: bool,
    /// The coordinator's configuration.
    pub coordinator: CoordinatorConfig,
    /// Records per ingest batch.
    pub batch_size: usize,
    /// The embedder (`ingest`, `search --text`).
    pub embed: EmbedSettings,
    /// Where to serve metrics.
    pub metrics_addr: Option<SocketAddr>,
    /// The bearer token `tandem serve` requires (`TANDEM_API_TOKEN`; never shown).
    pub api_token: Option<String>,
    /// Removes the secrets above from any message.
    pub redactor: Redactor,
}

impl FileConfig {
    /// Reads the file named by `--config`, or `./tandem.toml` if it exists.
    pub fn load(explicit: Option<&Path>) -> Result<Self, AppError> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None => {
                let p = PathBuf::from(DEFAULT_CONFIG_FILE);
                if !p.exists() {
                    return Ok(Self::default());
                }
                p
            }
        };
        let text = std::fs::read_to_string(&path).map_err(|e| {
            AppError::Usage(format!(
                "cannot read the configuration file {}: {e}",
                path.display()
            ))
        })?;
        toml::from_str(&text).map_err(|e| {
            AppError::Usage(format!(
                "invalid configuration file {}: {}",
                path.display(),
                e.message()
            ))
        })
    }
}

fn secs(field: &str, v: Option<f64>) -> Result<Option<Duration>, AppError> {
    v.map(|s| {
        Duration::try_from_secs_f64(s).map_err(|_| {
            AppError::Usage(format!(
                "configuration: {field} must be a non-negative number of seconds"
            ))
        })
    })
    .transpose()
}

impl Settings {
    /// Checks `--embed-dimensions` against the dimension the embedder's
    /// vectors go to: the collection's (`--dim`), or with `reindex_to_dim`
    /// the new collection of a re-index (`--to-dim`).
    pub fn check_embed_dimensions(&self, reindex_to_dim: Option<usize>) -> Result<(), AppError> {
        let (dimension, what) = match reindex_to_dim {
            Some(d) => (d, format!("the new collection's dimension ({d}, --to-dim)")),
            None => (
                self.dimension,
                format!("the collection's dimension ({}, --dim)", self.dimension),
            ),
        };
        match self.embed.dimensions {
            Some(n) if n != dimension => Err(AppError::Usage(format!(
                "the embedding dimensions ({n}, --embed-dimensions) differ from {what}: \
                 vectors of {n} dimensions cannot be stored in it"
            ))),
            _ => Ok(()),
        }
    }

    /// Lays flags/environment over the file over the defaults.
    pub fn resolve(args: &GlobalArgs, file: FileConfig) -> Result<Self, AppError> {
        let data_dir = args
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let postgres_url = args.postgres_url.clone().or(file.postgres_url);
        let qdrant_url = args.qdrant_url.clone().or(file.qdrant_url);
        let api_key = std::env::var("QDRANT_API_KEY")
            .ok()
            .filter(|k| !k.is_empty())
            .or(file.qdrant_api_key);

        let mut redactor = Redactor::default();
        if let Some(pw) = postgres_url.as_deref().and_then(url_password) {
            redactor.add(&pw);
        }
        if let Some(key) = &api_key {
            redactor.add(key);
        }
        let embed = embed_settings(&args.embed, &file.embed, file.ingest.embed)?;
        if let Some(key) = &embed.api_key {
            redactor.add(key);
        }
        let api_token = std::env::var("TANDEM_API_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty());
        if let Some(token) = &api_token {
            redactor.add(token);
        }

        let memory = args.backend == Some(BackendChoice::Memory);
        let metadata = if memory {
            MetadataTarget::Memory
        } else if let Some(url) = postgres_url {
            MetadataTarget::Postgres {
                url,
                schema: args
                    .postgres_schema
                    .clone()
                    .or(file.postgres.schema)
                    .unwrap_or_else(|| DEFAULT_SCHEMA.to_owned()),
                pool_size: file.postgres.pool_size,
                connect_timeout: secs(
                    "postgres.connect_timeout_secs",
                    file.postgres.connect_timeout_secs,
                )?,
            }
        } else {
            MetadataTarget::Sqlite {
                path: data_dir.join("metadata.sqlite3"),
            }
        };
        let collection_settings = collection_settings(&args.qdrant_collection, &file.qdrant)?;
        let index = if memory {
            IndexTarget::Memory
        } else if let Some(url) = qdrant_url {
            IndexTarget::Qdrant {
                url,
                api_key,
                timeout: secs("qdrant.timeout_secs", file.qdrant.timeout_secs)?,
                connect_timeout: secs(
                    "qdrant.connect_timeout_secs",
                    file.qdrant.connect_timeout_secs,
                )?,
                require_tls: file.qdrant.require_tls.unwrap_or(false),
                collection_settings,
            }
        } else {
            IndexTarget::Edge {
                path: data_dir.join("index"),
            }
        };

        let dimension = args
            .dimension
            .or(file.dimension)
            .unwrap_or(DEFAULT_DIMENSION);
        if dimension == 0 {
            return Err(AppError::Usage("the dimension must be positive".into()));
        }
        let batch_size = file.ingest.batch_size.unwrap_or(DEFAULT_BATCH_SIZE);

        let mut coordinator = CoordinatorConfig::default();
        let c = &file.coordinator;
        if let Some(d) = secs("coordinator.lease_secs", c.lease_secs)? {
            coordinator.lease = d;
        }
        if let Some(d) = secs("coordinator.call_deadline_secs", c.call_deadline_secs)? {
            coordinator.call_deadline = d;
        }
        if let Some(d) = secs("coordinator.cleanup_deadline_secs", c.cleanup_deadline_secs)? {
            coordinator.cleanup_deadline = d;
        }
        if let Some(d) = secs("coordinator.orphan_grace_secs", c.orphan_grace_secs)? {
            coordinator.orphan_grace = d;
        }
        if let Some(n) = c.max_attempts {
            coordinator.retry.max_attempts = n;
        }
        if let Some(n) = c.max_batch {
            coordinator.limits.max_batch = n;
        }
        if let Some(n) = c.index_chunk {
            coordinator.limits.index_chunk = n;
        }
        if let Some(n) = c.index_parallelism {
            coordinator.limits.index_parallelism = n;
        }
        if let Some(mode) = args.write_mode.or(c.write_mode) {
            coordinator.write_mode = mode;
        }
        let ix = &file.indexing;
        if let Some(n) = ix.batch {
            coordinator.indexing.batch = n;
        }
        if let Some(n) = ix.max_attempts {
            coordinator.indexing.max_attempts = n;
        }
        if let Some(d) = secs("indexing.retry_backoff_secs", ix.retry_backoff_secs)? {
            coordinator.indexing.retry_backoff = d;
        }
        if let Some(d) = secs("indexing.max_retry_backoff_secs", ix.max_retry_backoff_secs)? {
            coordinator.indexing.max_retry_backoff = d;
        }
        if let Some(d) = secs("indexing.idle_poll_secs", ix.idle_poll_secs)? {
            coordinator.indexing.idle_poll = d;
        }
        if let Some(n) = ix.lanes {
            coordinator.indexing.lanes = n;
        }
        reindex_settings(&file.reindex, &mut coordinator.reindex)?;
        coordinator
            .validate()
            .map_err(|e| AppError::Usage(format!("configuration: {e}")))?;

        Ok(Settings {
            data_dir,
            metadata,
            index,
            collection: args
                .collection
                .clone()
                .or(file.collection)
                .unwrap_or_else(|| DEFAULT_COLLECTION.to_owned()),
            dimension,
            distance: args.distance.or(file.distance).unwrap_or_default(),
            auto_migrate: file.auto_migrate.unwrap_or(true),
            coordinator,
            batch_size,
            embed,
            metrics_addr: args.metrics_addr.or(file.metrics_addr),
            api_token,
            redactor,
        })
    }

    /// Whether either side lives in the data directory.
    pub fn uses_data_dir(&self) -> bool {
        matches!(self.metadata, MetadataTarget::Sqlite { .. })
            || matches!(self.index, IndexTarget::Edge { .. })
    }
}

/// Lays the `[reindex]` section over the defaults. Zero is refused for each
/// value: a zero lease would let a re-run take over from a live driver at
/// once, a zero freeze would make every switch find stragglers, and the core
/// would silently read a zero chunk or attempt count as one.
fn reindex_settings(
    file: &ReindexSection,
    reindex: &mut tandem_core::ReindexConfig,
) -> Result<(), AppError> {
    let positive =
        |field: &str| AppError::Usage(format!("configuration: reindex.{field} must be positive"));
    if let Some(n) = file.chunk {
        reindex.chunk = n;
    }
    if let Some(d) = secs("reindex.lease_secs", file.lease_secs)? {
        reindex.lease = d;
    }
    if let Some(d) = secs("reindex.switch_freeze_secs", file.switch_freeze_secs)? {
        reindex.switch_freeze = d;
    }
    if let Some(n) = file.switch_attempts {
        reindex.switch_attempts = n;
    }
    if let Some(d) = secs("reindex.state_ttl_secs", file.state_ttl_secs)? {
        reindex.state_ttl = d;
    }
    if reindex.chunk == 0 {
        return Err(positive("chunk"));
    }
    if reindex.lease.is_zero() {
        return Err(positive("lease_secs"));
    }
    if reindex.switch_freeze.is_zero() {
        return Err(positive("switch_freeze_secs"));
    }
    if reindex.switch_attempts == 0 {
        return Err(positive("switch_attempts"));
    }
    Ok(())
}

/// The embedder's settings: each from the flag (or its environment
/// variable), else the `[embed]` section (the mode also from `[ingest]
/// embed`), else the default; the key from the environment only.
fn embed_settings(
    args: &EmbedArgs,
    file: &EmbedSection,
    ingest_embed: Option<EmbedMode>,
) -> Result<EmbedSettings, AppError> {
    let usage = |m: String| AppError::Usage(format!("configuration: {m}"));
    let mode = args
        .embed
        .or(file.mode)
        .or(ingest_embed)
        .unwrap_or(EmbedMode::None);
    let key_vars: Vec<&str> = match &file.api_key_env {
        Some(var) => vec![var.as_str()],
        None => EMBED_KEY_VARS.to_vec(),
    };
    let api_key = key_vars
        .iter()
        .find_map(|var| std::env::var(var).ok().filter(|k| !k.is_empty()));
    let defaults = BatchLimits::default();
    let limits = BatchLimits {
        max_texts: args
            .embed_batch_texts
            .or(file.batch_texts)
            .unwrap_or(defaults.max_texts),
        max_bytes: args
            .embed_batch_bytes
            .or(file.batch_bytes)
            .unwrap_or(defaults.max_bytes),
        concurrency: args
            .embed_concurrency
            .or(file.concurrency)
            .unwrap_or(defaults.concurrency),
    };
    limits.validate().map_err(usage)?;
    let timeout = match args.embed_timeout {
        Some(t) => t,
        None => secs("embed.timeout_secs", file.timeout_secs)?.unwrap_or(DEFAULT_EMBED_TIMEOUT),
    };
    let connect_timeout = secs("embed.connect_timeout_secs", file.connect_timeout_secs)?
        .unwrap_or(DEFAULT_EMBED_CONNECT_TIMEOUT);
    if timeout.is_zero() || connect_timeout.is_zero() {
        return Err(usage("the embedding timeouts must be positive".into()));
    }
    let retries = args
        .embed_retries
        .or(file.retries)
        .unwrap_or(DEFAULT_EMBED_RETRIES);
    let settings = EmbedSettings {
        mode,
        url: args.embed_url.clone().or_else(|| file.url.clone()),
        model: args.embed_model.clone().or_else(|| file.model.clone()),
        dimensions: args.embed_dimensions.or(file.dimensions),
        api_key,
        key_header: file.auth_header.unwrap_or_default(),
        limits,
        timeout,
        connect_timeout,
        retry: RetryPolicy {
            max_attempts: retries.saturating_add(1),
            initial_backoff: std::time::Duration::from_millis(250),
            max_backoff: std::time::Duration::from_secs(10),
        },
        max_retry_after: secs("embed.max_retry_after_secs", file.max_retry_after_secs)?
            .unwrap_or(DEFAULT_EMBED_MAX_RETRY_AFTER),
    };
    if mode == EmbedMode::Openai {
        if settings.url.is_none() {
            return Err(AppError::Usage(
                "--embed openai needs the server's base URL: --embed-url (or [embed] url), \
                 e.g. http://localhost:11434/v1"
                    .into(),
            ));
        }
        if settings
            .model
            .as_deref()
            .is_none_or(|m| m.trim().is_empty())
        {
            return Err(AppError::Usage(
                "--embed openai needs the model: --embed-model (or [embed] model)".into(),
            ));
        }
    }
    Ok(settings)
}

/// The Qdrant collection settings: each from the flag (or its environment
/// variable), else the `[qdrant]` section, else unset; validated.
fn collection_settings(
    args: &QdrantCollectionArgs,
    file: &QdrantSection,
) -> Result<CollectionSettings, AppError> {
    let usage = |message: String| AppError::Usage(format!("configuration: {message}"));
    let quantization = match (&args.qdrant_quantization, &file.quantization) {
        (Some(q), _) => Some(*q),
        (None, Some(value)) => Some(
            quantization_from_file(value)
                .map_err(|m| usage(format!("[qdrant] quantization: {m}")))?,
        ),
        (None, None) => None,
    };
    let payload_indexes = if !args.qdrant_payload_indexes.is_empty() {
        args.qdrant_payload_indexes.iter().cloned().collect()
    } else {
        let mut indexes = BTreeMap::new();
        for (key, kind) in file.payload_indexes.iter().flatten() {
            let kind: PayloadFieldType = kind
                .parse()
                .map_err(|m| usage(format!("[qdrant] payload_indexes.{key}: {m}")))?;
            indexes.insert(key.clone(), kind);
        }
        indexes
    };
    let settings = CollectionSettings {
        shard_number: args.qdrant_shard_number.or(file.shard_number),
        replication_factor: args.qdrant_replication_factor.or(file.replication_factor),
        write_consistency_factor: args
            .qdrant_write_consistency_factor
            .or(file.write_consistency_factor),
        on_disk: args.qdrant_on_disk.or(file.on_disk),
        on_disk_payload: args.qdrant_on_disk_payload.or(file.on_disk_payload),
        hnsw_m: args.qdrant_hnsw_m.or(file.hnsw_m),
        hnsw_ef_construct: args.qdrant_hnsw_ef_construct.or(file.hnsw_ef_construct),
        quantization,
        payload_indexes,
    };
    settings.validate().map_err(|e| match e {
        IndexError::Config { message } => usage(message),
        other => usage(other.to_string()),
    })?;
    Ok(settings)
}

/// `quantization` in the config file: the flag's text form, or Qdrant's own
/// table form (`{ scalar = { type = "int8", quantile = 0.99, always_ram = true } }`,
/// `{ binary = { always_ram = true } }`).
fn quantization_from_file(value: &toml::Value) -> Result<Quantization, String> {
    let table = match value {
        toml::Value::String(text) => return text.parse(),
        toml::Value::Table(table) => table,
        _ => return Err("expected a string (e.g. \"scalar\") or a table".into()),
    };
    let mut entries = table.iter();
    let (Some((kind, options)), None) = (entries.next(), entries.next()) else {
        return Err("expected one of scalar, binary or none as the only key".into());
    };
    let toml::Value::Table(options) = options else {
        return Err(format!(
            "{kind}: expected a table of options, e.g. {kind} = {{}}"
        ));
    };
    let bool_option = |name: &str| match options.get(name) {
        None => Ok(None),
        Some(toml::Value::Boolean(b)) => Ok(Some(*b)),
        Some(_) => Err(format!("{kind}.{name} must be true or false")),
    };
    let allow = |names: &[&str]| match options.keys().find(|k| !names.contains(&k.as_str())) {
        Some(unknown) => Err(format!(
            "unknown option {kind}.{unknown} (expected {})",
            names.join(", ")
        )),
        None => Ok(()),
    };
    match kind.as_str() {
        "none" => {
            allow(&[])?;
            Ok(Quantization::None)
        }
        "scalar" => {
            allow(&["type", "quantile", "always_ram"])?;
            match options.get("type") {
                None => {}
                Some(toml::Value::String(t)) if t == "int8" => {}
                Some(_) => return Err("scalar.type must be \"int8\" (the only scalar type)".into()),
            }
            let quantile = match options.get("quantile") {
                None => None,
                Some(toml::Value::Float(q)) => Some(*q as f32),
                Some(toml::Value::Integer(q)) => Some(*q as f32),
                Some(_) => return Err("scalar.quantile must be a number".into()),
            };
            Ok(Quantization::Scalar {
                quantile,
                always_ram: bool_option("always_ram")?,
            })
        }
        "binary" => {
            allow(&["always_ram"])?;
            Ok(Quantization::Binary {
                always_ram: bool_option("always_ram")?,
            })
        }
        other => Err(format!(
            "unknown quantization {other:?} (expected none, scalar or binary)"
        )),
    }
}

/// The password of a URL (`scheme://user:password@host/...`), percent-encoded
/// as written; or of a key=value connection string (`password=...`).
pub fn url_password(url: &str) -> Option<String> {
    if let Ok(parsed) = url::Url::parse(url) {
        return parsed.password().map(str::to_owned);
    }
    url.split_whitespace()
        .find_map(|kv| kv.strip_prefix("password="))
        .map(|p| p.trim_matches('\'').to_owned())
}

/// A PostgreSQL URL for people: `host:port/database`, never the user or password.
pub fn describe_postgres_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => {
            let host = u.host_str().unwrap_or("localhost");
            let port = u.port().unwrap_or(5432);
            let db = u.path().trim_start_matches('/');
            if db.is_empty() {
                format!("{host}:{port}")
            } else {
                format!("{host}:{port}/{db}")
            }
        }
        Err(_) => "the configured server".to_owned(),
    }
}

/// A Qdrant URL for people: scheme, host and port only.
pub fn describe_qdrant_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => format!(
            "{}://{}{}",
            u.scheme(),
            u.host_str().unwrap_or("?"),
            u.port().map(|p| format!(":{p}")).unwrap_or_default()
        ),
        Err(_) => "the configured server".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_found_and_never_described() {
        let url = "postgres://app:s%40cret@db.example:6543/prod?sslmode=require";
        assert_eq!(url_password(url).as_deref(), Some("s%40cret"));
        assert_eq!(describe_postgres_url(url), "db.example:6543/prod");
        assert_eq!(
            url_password("host=x user=y password=hunter2").as_deref(),
            Some("hunter2")
        );
        assert_eq!(url_password("postgres://app@db/x"), None);
        assert_eq!(
            describe_qdrant_url("https://q.example:6334/x"),
            "https://q.example:6334"
        );
    }

    #[test]
    fn file_config_rejects_unknown_keys() {
        let err = toml::from_str::<FileConfig>("dimenssion = 3").unwrap_err();
        assert!(err.message().contains("dimenssion"), "{}", err.message());
        let ok: FileConfig = toml::from_str(
            "dimension = 8\ndistance = \"dot\"\n[coordinator]\nlease_secs = 60\n[ingest]\nembed = \"hash\"",
        )
        .unwrap();
        assert_eq!(ok.dimension, Some(8));
        assert_eq!(ok.distance, Some(Distance::Dot));
        assert_eq!(ok.ingest.embed, Some(EmbedMode::Hash));
    }

    use clap::Parser;

    fn resolve(flags: &[&str], toml_text: &str) -> Result<Settings, AppError> {
        let mut argv = vec!["tandem", "--qdrant-url", "http://127.0.0.1:6334"];
        argv.extend_from_slice(flags);
        argv.push("stats");
        let cli =
            crate::cli::Cli::try_parse_from(argv).map_err(|e| AppError::Usage(e.to_string()))?;
        let file: FileConfig =
            toml::from_str(toml_text).map_err(|e| AppError::Usage(e.message().to_owned()))?;
        let settings = Settings::resolve(&cli.global, file)?;
        settings.check_embed_dimensions(None)?;
        Ok(settings)
    }

    fn qdrant(flags: &[&str], toml_text: &str) -> CollectionSettings {
        match resolve(flags, toml_text) {
            Ok(Settings {
                index:
                    IndexTarget::Qdrant {
                        collection_settings,
                        ..
                    },
                ..
            }) => collection_settings,
            Ok(_) => panic!("not a Qdrant target"),
            Err(e) => panic!("{e}"),
        }
    }

    fn usage(flags: &[&str], toml_text: &str) -> String {
        match resolve(flags, toml_text) {
            Err(AppError::Usage(m)) => m,
            Err(e) => panic!("expected a usage error, got {e}"),
            Ok(_) => panic!("expected a usage error"),
        }
    }

    fn embed(flags: &[&str], toml_text: &str) -> EmbedSettings {
        match resolve(flags, toml_text) {
            Ok(s) => s.embed,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn the_embed_section_is_read_and_flags_lie_over_it() {
        let file = "[embed]\nmode = \"openai\"\nurl = \"http://h:1/v1\"\nmodel = \"m\"\n\
                    dimensions = 384\nbatch_texts = 16\nbatch_bytes = 4096\nconcurrency = 2\n\
                    timeout_secs = 5\nconnect_timeout_secs = 1\nretries = 3\n\
                    max_retry_after_secs = 20\nauth_header = \"api-key\"\n";
        let e = embed(&[], file);
        assert_eq!(e.mode, EmbedMode::Openai);
        assert_eq!(e.url.as_deref(), Some("http://h:1/v1"));
        assert_eq!(e.dimensions, Some(384));
        assert_eq!(
            e.limits,
            BatchLimits {
                max_texts: 16,
                max_bytes: 4096,
                concurrency: 2
            }
        );
        assert_eq!(e.timeout, Duration::from_secs(5));
        assert_eq!(e.connect_timeout, Duration::from_secs(1));
        assert_eq!(e.retry.max_attempts, 4);
        assert_eq!(e.max_retry_after, Duration::from_secs(20));
        assert_eq!(e.key_header, KeyHeader::ApiKey);
        let e = embed(
            &[
                "--embed",
                "hash",
                "--embed-model",
                "other",
                "--embed-batch-texts",
                "8",
                "--embed-timeout",
                "750ms",
                "--embed-retries",
                "0",
            ],
            file,
        );
        assert_eq!(e.mode, EmbedMode::Hash);
        assert_eq!(e.model.as_deref(), Some("other"));
        assert_eq!(e.limits.max_texts, 8);
        assert_eq!(e.limits.concurrency, 2, "from the file");
        assert_eq!(e.timeout, Duration::from_millis(750));
        assert_eq!(e.retry.max_attempts, 1);
        // The old [ingest] embed still chooses the mode, under [embed] mode.
        assert_eq!(
            embed(&[], "[ingest]\nembed = \"hash\"").mode,
            EmbedMode::Hash
        );
        assert_eq!(embed(&[], "").mode, EmbedMode::None);
    }

    #[test]
    fn bad_embed_settings_are_usage_errors() {
        let m = usage(&["--embed", "openai"], "");
        assert!(m.contains("--embed-url"), "{m}");
        let m = usage(&["--embed", "openai", "--embed-url", "http://h/v1"], "");
        assert!(m.contains("--embed-model"), "{m}");
        let m = usage(&["--dim", "384", "--embed-dimensions", "512"], "");
        assert!(
            m.contains("(512, --embed-dimensions)") && m.contains("(384, --dim)"),
            "{m}"
        );
        // A re-index's embedder writes the new collection: --to-dim counts.
        let cli_settings = |flags: &[&str]| {
            let mut argv = vec!["tandem", "--qdrant-url", "http://127.0.0.1:6334"];
            argv.extend_from_slice(flags);
            argv.push("stats");
            let cli = crate::cli::Cli::try_parse_from(argv).expect("flags parse");
            Settings::resolve(&cli.global, FileConfig::default()).expect("settings")
        };
        let s = cli_settings(&["--dim", "8", "--embed-dimensions", "12"]);
        assert!(s.check_embed_dimensions(Some(12)).is_ok());
        match s.check_embed_dimensions(Some(16)) {
            Err(AppError::Usage(m)) => {
                assert!(
                    m.contains("(12, --embed-dimensions)") && m.contains("(16, --to-dim)"),
                    "{m}"
                )
            }
            other => panic!("expected a usage error, got {other:?}"),
        }
        let m = usage(&["--embed-concurrency", "0"], "");
        assert!(m.contains("positive"), "{m}");
        let m = usage(&[], "[embed]\ntimeout_secs = -1");
        assert!(m.contains("embed.timeout_secs"), "{m}");
        let err = toml::from_str::<FileConfig>("[embed]\napi_key = \"sk-x\"").unwrap_err();
        assert!(err.message().contains("api_key"), "{}", err.message());
    }

    fn coordinator(toml_text: &str) -> CoordinatorConfig {
        match resolve(&[], toml_text) {
            Ok(s) => s.coordinator,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn the_reindex_section_sets_the_drivers_timings() {
        let r = coordinator(
            "[reindex]\nchunk = 2000\nlease_secs = 1.5\nswitch_freeze_secs = 4\n\
             switch_attempts = 3\nstate_ttl_secs = 0.25\n",
        )
        .reindex;
        assert_eq!(r.chunk, 2000);
        assert_eq!(r.lease, Duration::from_millis(1500));
        assert_eq!(r.switch_freeze, Duration::from_secs(4));
        assert_eq!(r.switch_attempts, 3);
        assert_eq!(r.state_ttl, Duration::from_millis(250));
        // Unset: the core's defaults; `[coordinator] lease_secs` is the
        // intents' lease, not the re-index driver's.
        let c = coordinator("[coordinator]\nlease_secs = 60\n[reindex]\nchunk = 64\n");
        let defaults = tandem_core::ReindexConfig::default();
        assert_eq!(c.lease, Duration::from_secs(60));
        assert_eq!(c.reindex.chunk, 64);
        assert_eq!(c.reindex.lease, defaults.lease);
        assert_eq!(c.reindex.switch_freeze, defaults.switch_freeze);
        assert_eq!(c.reindex.switch_attempts, defaults.switch_attempts);
        assert_eq!(c.reindex.state_ttl, defaults.state_ttl);
        // A zero TTL is allowed: every search reads the state.
        assert_eq!(
            coordinator("[reindex]\nstate_ttl_secs = 0")
                .reindex
                .state_ttl,
            Duration::ZERO
        );
        for (toml_text, needle) in [
            ("[reindex]\nchunk = 0", "reindex.chunk must be positive"),
            (
                "[reindex]\nlease_secs = 0",
                "reindex.lease_secs must be positive",
            ),
            (
                "[reindex]\nlease_secs = -1",
                "reindex.lease_secs must be a non-negative",
            ),
            (
                "[reindex]\nswitch_freeze_secs = 0",
                "reindex.switch_freeze_secs must be positive",
            ),
            (
                "[reindex]\nswitch_attempts = 0",
                "reindex.switch_attempts must be positive",
            ),
        ] {
            let m = usage(&[], toml_text);
            assert!(m.contains(needle), "{toml_text}: {m}");
        }
        let err = toml::from_str::<FileConfig>("[reindex]\nlease = 3").unwrap_err();
        assert!(err.message().contains("lease"), "{}", err.message());
    }

    const EVERY_SETTING: &str = r#"
[qdrant]
shard_number = 3
replication_factor = 2
write_consistency_factor = 2
on_disk = true
on_disk_payload = false
hnsw_m = 32
hnsw_ef_construct = 200
quantization = "scalar:quantile=0.99,always_ram=true"
payload_indexes = { item = "keyword", year = "integer", "in stock" = "bool" }
"#;

    #[test]
    fn every_collection_setting_is_read_from_the_qdrant_section() {
        let s = qdrant(&[], EVERY_SETTING);
        let expected = CollectionSettings::new()
            .with_shard_number(3)
            .with_replication_factor(2)
            .with_write_consistency_factor(2)
            .with_on_disk(true)
            .with_on_disk_payload(false)
            .with_hnsw_m(32)
            .with_hnsw_ef_construct(200)
            .with_quantization(Quantization::Scalar {
                quantile: Some(0.99),
                always_ram: Some(true),
            })
            .with_payload_index("item", PayloadFieldType::Keyword)
            .with_payload_index("year", PayloadFieldType::Integer)
            .with_payload_index("in stock", PayloadFieldType::Bool);
        assert_eq!(s, expected);
        // Nothing set: Qdrant's defaults, nothing checked.
        assert!(qdrant(&[], "").is_default());
    }

    #[test]
    fn flags_lie_over_the_qdrant_section() {
        let s = qdrant(
            &[
                "--qdrant-shard-number",
                "6",
                "--qdrant-on-disk-payload",
                "true",
                "--qdrant-quantization",
                "binary",
                "--qdrant-payload-index",
                "color=keyword,size=float",
                "--qdrant-payload-index",
                "a=b=uuid",
            ],
            EVERY_SETTING,
        );
        assert_eq!(s.shard_number, Some(6));
        assert_eq!(s.on_disk_payload, Some(true));
        assert_eq!(s.quantization, Some(Quantization::binary()));
        // The flags' payload indexes replace the file's.
        let keys: Vec<_> = s
            .payload_indexes
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect();
        assert_eq!(
            keys,
            [
                ("a=b", PayloadFieldType::Uuid),
                ("color", PayloadFieldType::Keyword),
                ("size", PayloadFieldType::Float)
            ]
        );
        // What no flag sets comes from the file.
        assert_eq!(s.replication_factor, Some(2));
        assert_eq!(s.hnsw_m, Some(32));
    }

    #[test]
    fn quantization_takes_qdrants_table_form_too() {
        let cases = [
            ("\"none\"", Quantization::None),
            ("{ none = {} }", Quantization::None),
            ("\"scalar\"", Quantization::scalar()),
            ("{ scalar = {} }", Quantization::scalar()),
            (
                "{ scalar = { type = \"int8\", quantile = 0.95, always_ram = false } }",
                Quantization::Scalar {
                    quantile: Some(0.95),
                    always_ram: Some(false),
                },
            ),
            (
                "{ scalar = { quantile = 1 } }",
                Quantization::Scalar {
                    quantile: Some(1.0),
                    always_ram: None,
                },
            ),
            (
                "{ binary = { always_ram = true } }",
                Quantization::Binary {
                    always_ram: Some(true),
                },
            ),
        ];
        for (value, expected) in cases {
            let s = qdrant(&[], &format!("[qdrant]\nquantization = {value}"));
            assert_eq!(s.quantization, Some(expected), "{value}");
        }
        // The section form of the same.
        let s = qdrant(&[], "[qdrant.quantization.scalar]\nquantile = 0.99\n");
        assert_eq!(
            s.quantization,
            Some(Quantization::Scalar {
                quantile: Some(0.99),
                always_ram: None
            })
        );
    }

    #[test]
    fn bad_collection_settings_are_usage_errors_naming_the_setting() {
        for (toml_text, needle) in [
            (
                "[qdrant]\nquantization = \"product\"",
                "[qdrant] quantization",
            ),
            (
                "[qdrant]\nquantization = { scalar = { bits = 8 } }",
                "scalar.bits",
            ),
            (
                "[qdrant]\nquantization = { scalar = { type = \"int4\" } }",
                "int8",
            ),
            (
                "[qdrant]\nquantization = { scalar = {}, binary = {} }",
                "only key",
            ),
            (
                "[qdrant]\nquantization = { binary = { always_ram = 1 } }",
                "true or false",
            ),
            ("[qdrant]\nquantization = 3", "a string"),
            (
                "[qdrant]\npayload_indexes = { year = \"number\" }",
                "payload_indexes.year",
            ),
            ("[qdrant]\nshard_number = 0", "`shard_number`"),
            ("[qdrant]\nreplication_factor = 0", "`replication_factor`"),
            (
                "[qdrant]\nreplication_factor = 2\nwrite_consistency_factor = 3",
                "`write_consistency_factor`",
            ),
            ("[qdrant]\nhnsw_ef_construct = 2", "`hnsw_ef_construct`"),
            (
                "[qdrant]\nquantization = \"scalar:quantile=0.2\"",
                "[0.5, 1]",
            ),
            (
                "[qdrant]\npayload_indexes = { \"\" = \"keyword\" }",
                "`payload_indexes`",
            ),
        ] {
            let m = usage(&[], toml_text);
            assert!(m.contains(needle), "{toml_text}: {m}");
        }
        // Flags are checked by clap, and the settings once more as a whole.
        let m = usage(&["--qdrant-quantization", "scalar:bits=8"], "");
        assert!(m.contains("bits"), "{m}");
        let m = usage(&["--qdrant-payload-index", "year"], "");
        assert!(m.contains("KEY=TYPE"), "{m}");
        let m = usage(&["--qdrant-on-disk", "yes"], "");
        assert!(m.contains("--qdrant-on-disk"), "{m}");
        let m = usage(&["--qdrant-write-consistency-factor", "2"], "");
        assert!(m.contains("`write_consistency_factor`"), "{m}");
        // An unknown key in the section is refused as everywhere.
        let err = toml::from_str::<FileConfig>("[qdrant]\nshards = 3").unwrap_err();
        assert!(err.message().contains("shards"), "{}", err.message());
    }
}
