//! Configuration: flags > environment > `tandem.toml` > defaults.
//!
//! clap resolves flags over environment variables; this module lays the
//! configuration file under both and fills in the defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tandem_core::{CoordinatorConfig, Distance};

use crate::cli::{BackendChoice, EmbedMode, GlobalArgs};
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
    ingest: IngestSection,
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
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct IngestSection {
    batch_size: Option<usize>,
    embed: Option<EmbedMode>,
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
    /// Default embedding mode of `ingest`.
    pub embed: EmbedMode,
    /// Where to serve metrics.
    pub metrics_addr: Option<SocketAddr>,
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
            embed: file.ingest.embed.unwrap_or(EmbedMode::None),
            metrics_addr: args.metrics_addr.or(file.metrics_addr),
            redactor,
        })
    }

    /// Whether either side lives in the data directory.
    pub fn uses_data_dir(&self) -> bool {
        matches!(self.metadata, MetadataTarget::Sqlite { .. })
            || matches!(self.index, IndexTarget::Edge { .. })
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
}
