//! Which stores a command talks to: the only place that names adapters.
//!
//! Each side is chosen on its own (embedded or server), so any mix works; the
//! coordinator sees two trait objects.

use std::sync::Arc;
use std::time::Duration;

use tandem_adapters::memory::{InMemoryCatalog, InMemoryMetadataRepo, InMemoryVectorIndex};
use tandem_core::{
    Coordinator, CoordinatorConfig, CoordinatorError, Distance, IndexCatalog, IndexError,
    MetadataRepo, VectorIndex,
};

use crate::error::AppError;
use crate::settings::{IndexTarget, MetadataTarget, Settings};

/// The metadata store, whichever it is.
pub type Repo = Arc<dyn MetadataRepo>;
/// The vector index, whichever it is.
pub type Index = Arc<dyn VectorIndex>;
/// The coordinator over them.
pub type AppCoordinator = Coordinator<Repo, Index>;

/// Both stores, opened, with names for messages.
pub struct Stores {
    /// The metadata store.
    pub repo: Repo,
    /// The vector index.
    pub index: Index,
    /// "SQLite metadata store at ./tandem-data/metadata.sqlite3", ...
    pub metadata_name: String,
    /// "qdrant-edge vector index at ./tandem-data/index", ...
    pub index_name: String,
    /// Runs qdrant-edge's optimizer (embedded index only).
    optimizer: Option<Optimizer>,
    /// The index's collections by name, for re-indexing (`None`: the index
    /// cannot create collections).
    catalog: Option<Catalog>,
    /// The configured collection's name.
    collection: String,
}

/// The index's collections, whichever index it is.
pub type Catalog = Arc<dyn IndexCatalog<Index = Index>>;

/// A catalog over an adapter's own, whose indexes become [`Index`]es; the
/// configured collection is the index already open (one handle per
/// collection in a process).
struct AppCatalog<C> {
    inner: C,
    configured: String,
    configured_index: Index,
    /// Drops the configured collection when it does not live in `inner`
    /// (the embedded index's own directory).
    drop_configured: Option<DropFn>,
}

type DropFn =
    Arc<dyn Fn() -> futures::future::BoxFuture<'static, Result<bool, IndexError>> + Send + Sync>;

#[async_trait::async_trait]
impl<C> IndexCatalog for AppCatalog<C>
where
    C: IndexCatalog,
    C::Index: 'static,
{
    type Index = Index;

    async fn open(&self, name: &str) -> Result<Index, IndexError> {
        if name == self.configured {
            return Ok(self.configured_index.clone());
        }
        Ok(Arc::new(self.inner.open(name).await?))
    }

    async fn create(
        &self,
        name: &str,
        dimension: usize,
        distance: Distance,
    ) -> Result<Index, IndexError> {
        if name == self.configured {
            let index = &self.configured_index;
            if index.dimension() != dimension || index.distance() != distance {
                return Err(IndexError::Config {
                    message: format!(
                        "collection {name:?} has dimension {} and distance {}, not {dimension} and {distance}",
                        index.dimension(),
                        index.distance()
                    ),
                });
            }
            return Ok(index.clone());
        }
        Ok(Arc::new(
            self.inner.create(name, dimension, distance).await?,
        ))
    }

    async fn drop_collection(&self, name: &str) -> Result<bool, IndexError> {
        match &self.drop_configured {
            Some(drop) if name == self.configured => drop().await,
            _ => self.inner.drop_collection(name).await,
        }
    }
}

type Optimizer =
    Arc<dyn Fn() -> futures::future::BoxFuture<'static, Result<bool, String>> + Send + Sync>;

/// What `tandem migrate` did.
#[derive(Debug, serde::Serialize)]
pub struct MigrateReport {
    /// The metadata store's name.
    pub metadata: String,
    /// Migrations applied to it now (0: already up to date).
    pub migrations_applied: usize,
    /// The vector index's name.
    pub index: String,
    /// The collection exists with the configured dimension and distance.
    pub collection_ready: bool,
}

/// The name of the metadata store for messages (no password).
pub fn metadata_name(target: &MetadataTarget) -> String {
    match target {
        MetadataTarget::Memory => "in-memory metadata store".into(),
        MetadataTarget::Sqlite { path } => format!("SQLite metadata store at {}", path.display()),
        MetadataTarget::Postgres { url, schema, .. } => format!(
            "PostgreSQL metadata store at {} (schema {schema})",
            crate::settings::describe_postgres_url(url)
        ),
    }
}

/// The name of the vector index for messages (no API key).
pub fn index_name(target: &IndexTarget, collection: &str) -> String {
    match target {
        IndexTarget::Memory => "in-memory vector index".into(),
        IndexTarget::Edge { path } => format!("qdrant-edge vector index at {}", path.display()),
        IndexTarget::Qdrant { url, .. } => format!(
            "Qdrant vector index at {} (collection {collection})",
            crate::settings::describe_qdrant_url(url)
        ),
    }
}

impl Stores {
    /// Opens (and, with `auto_migrate`, creates or upgrades) both stores.
    pub async fn open(settings: &Settings) -> Result<Self, AppError> {
        let metadata_name = metadata_name(&settings.metadata);
        let index_name = index_name(&settings.index, &settings.collection);
        if settings.uses_data_dir() {
            std::fs::create_dir_all(&settings.data_dir).map_err(|e| {
                AppError::Usage(format!(
                    "cannot create the data directory {}: {e}",
                    settings.data_dir.display()
                ))
            })?;
        }
        let mode = if settings.auto_migrate {
            MigrateMode::OnOpen
        } else {
            MigrateMode::Never
        };
        let repo = open_metadata(settings, mode)
            .await
            .map_err(|e| e.into_app_error(&metadata_name))?
            .0;
        let (index, optimizer, catalog) = open_index(settings)
            .await
            .map_err(|e| e.into_app_error(&index_name))?;
        let catalog = open_catalog(settings, &index, catalog);
        Ok(Stores {
            repo,
            index,
            metadata_name,
            index_name,
            optimizer,
            catalog,
            collection: settings.collection.clone(),
        })
    }

    /// A coordinator over both stores.
    /// Registers the sagas the tool runs ([`crate::ingest::INGEST_SAGA`]),
    /// so that every command that recovers (`recover`, `verify --repair`,
    /// `serve`) can end them.
    pub fn coordinator(&self, config: CoordinatorConfig) -> Result<AppCoordinator, AppError> {
        let c = Coordinator::new(self.repo.clone(), self.index.clone(), config)
            .map_err(|e| AppError::Usage(format!("configuration: {e}")))?;
        let c = match &self.catalog {
            Some(catalog) => c.with_catalog(catalog.clone(), self.collection.clone()),
            None => c,
        };
        c.register_saga(crate::ingest::ingest_saga())
            .map_err(|e| AppError::Usage(format!("configuration: {e}")))?;
        Ok(c)
    }

    /// Runs the embedded index's optimizer (HNSW build, vacuum); a no-op for
    /// other indexes. Returns whether it ran.
    pub async fn optimize(&self) -> Result<bool, AppError> {
        match &self.optimizer {
            Some(run) => run()
                .await
                .map_err(|e| AppError::Failed(format!("{}: optimize: {e}", self.index_name))),
            None => Ok(false),
        }
    }

    /// Wraps a coordinator error with what was being done and which stores
    /// were involved, for a one-line message.
    pub fn error(&self, what: &str, error: CoordinatorError) -> AppError {
        let store = match &error {
            CoordinatorError::Metadata(_) => format!(" ({})", self.metadata_name),
            CoordinatorError::Index(_) => format!(" ({})", self.index_name),
            _ => String::new(),
        };
        AppError::Coordinator {
            context: format!("{what} failed{store}: "),
            error,
        }
    }
}

/// `tandem migrate`: schema and collection, reported.
pub async fn migrate(settings: &Settings) -> Result<MigrateReport, AppError> {
    let metadata = metadata_name(&settings.metadata);
    let index = index_name(&settings.index, &settings.collection);
    if settings.uses_data_dir() {
        std::fs::create_dir_all(&settings.data_dir).map_err(|e| {
            AppError::Usage(format!(
                "cannot create the data directory {}: {e}",
                settings.data_dir.display()
            ))
        })?;
    }
    // Open without migrating on start, then migrate explicitly to count.
    let (_, applied) = open_metadata(settings, MigrateMode::Explicit)
        .await
        .map_err(|e| e.into_app_error(&metadata))?;
    open_index(settings)
        .await
        .map_err(|e| e.into_app_error(&index))?;
    Ok(MigrateReport {
        metadata,
        migrations_applied: applied,
        index,
        collection_ready: true,
    })
}

/// An adapter's failure to open, before it is named.
#[cfg_attr(
    not(any(
        feature = "sqlite",
        feature = "edge",
        feature = "postgres",
        feature = "qdrant"
    )),
    allow(dead_code) // the in-memory stores cannot fail to open
)]
enum OpenError {
    Metadata(tandem_core::MetadataError),
    Index(tandem_core::IndexError),
    /// The backend's feature was left out of this build.
    #[cfg_attr(
        all(
            feature = "sqlite",
            feature = "edge",
            feature = "postgres",
            feature = "qdrant"
        ),
        allow(dead_code)
    )]
    Unavailable(&'static str),
}

impl OpenError {
    fn into_app_error(self, store: &str) -> AppError {
        let (retryable, detail) = match &self {
            OpenError::Metadata(e) => (e.is_retryable(), e.to_string()),
            OpenError::Index(e) => (e.is_retryable(), e.to_string()),
            OpenError::Unavailable(name) => return AppError::BackendUnavailable(name),
        };
        let detail = detail.replace(['\n', '\r'], " ");
        let misconfigured = matches!(
            self,
            OpenError::Index(tandem_core::IndexError::Config { .. })
        );
        if misconfigured {
            // E.g. an existing index of another dimension: the configuration is wrong.
            AppError::Usage(format!("cannot open the {store}: {detail}"))
        } else if retryable {
            AppError::Unreachable {
                store: store.to_owned(),
                detail,
            }
        } else {
            AppError::Failed(format!("cannot open the {store}: {detail}"))
        }
    }
}

/// When the metadata schema is created or upgraded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MigrateMode {
    /// While opening (the adapter's own "migrate on start").
    OnOpen,
    /// After opening, counting what was applied (`tandem migrate`).
    Explicit,
    /// Not at all: the schema must exist.
    Never,
}

/// Opens the metadata store, migrating as `mode` says. Returns the number of
/// migrations applied when it migrated explicitly.
async fn open_metadata(settings: &Settings, mode: MigrateMode) -> Result<(Repo, usize), OpenError> {
    match &settings.metadata {
        MetadataTarget::Memory => Ok((Arc::new(InMemoryMetadataRepo::new()), 0)),
        MetadataTarget::Sqlite { path } => open_sqlite(path, mode).await,
        MetadataTarget::Postgres {
            url,
            schema,
            pool_size,
            connect_timeout,
        } => open_postgres(url, schema, *pool_size, *connect_timeout, mode).await,
    }
}

/// A catalog over `inner`, with the open index as the configured collection.
fn app_catalog<C: IndexCatalog + 'static>(
    inner: C,
    settings: &Settings,
    index: &Index,
    drop_configured: Option<DropFn>,
) -> Catalog
where
    C::Index: 'static,
{
    Arc::new(AppCatalog {
        inner,
        configured: settings.collection.clone(),
        configured_index: index.clone(),
        drop_configured,
    })
}

/// The catalog of the configured index's kind (the in-memory one: one
/// process's collections, a re-index within one run only).
fn open_catalog(settings: &Settings, index: &Index, own: Option<Catalog>) -> Option<Catalog> {
    match &settings.index {
        IndexTarget::Memory => Some(app_catalog(InMemoryCatalog::new(), settings, index, None)),
        IndexTarget::Edge { .. } | IndexTarget::Qdrant { .. } => own,
    }
}

async fn open_index(
    settings: &Settings,
) -> Result<(Index, Option<Optimizer>, Option<Catalog>), OpenError> {
    match &settings.index {
        IndexTarget::Memory => Ok((
            Arc::new(InMemoryVectorIndex::new(
                settings.dimension,
                settings.distance,
            )),
            None,
            None,
        )),
        IndexTarget::Edge { path } => open_edge(path, settings).await,
        IndexTarget::Qdrant {
            url,
            api_key,
            timeout,
            connect_timeout,
            require_tls,
            collection_settings,
        } => {
            open_qdrant(
                settings,
                url,
                api_key.as_deref(),
                *timeout,
                *connect_timeout,
                *require_tls,
                collection_settings,
            )
            .await
        }
    }
}

#[cfg(feature = "sqlite")]
async fn open_sqlite(
    path: &std::path::Path,
    mode: MigrateMode,
) -> Result<(Repo, usize), OpenError> {
    use tandem_adapters::sqlite::{SqliteConfig, SqliteMetadataRepo};
    let mut config = SqliteConfig::new(path);
    config.migrate_on_start = mode == MigrateMode::OnOpen;
    let repo = SqliteMetadataRepo::open(config)
        .await
        .map_err(OpenError::Metadata)?;
    let applied = if mode == MigrateMode::Explicit {
        repo.migrate().await.map_err(OpenError::Metadata)?
    } else {
        0
    };
    Ok((Arc::new(repo), applied))
}

#[cfg(not(feature = "sqlite"))]
async fn open_sqlite(
    _path: &std::path::Path,
    _mode: MigrateMode,
) -> Result<(Repo, usize), OpenError> {
    Err(OpenError::Unavailable("sqlite"))
}

#[cfg(feature = "postgres")]
async fn open_postgres(
    url: &str,
    schema: &str,
    pool_size: Option<u32>,
    connect_timeout: Option<Duration>,
    mode: MigrateMode,
) -> Result<(Repo, usize), OpenError> {
    use tandem_adapters::postgres::{PostgresConfig, PostgresMetadataRepo};
    let mut config = PostgresConfig::new(url).with_schema(schema);
    if let Some(n) = pool_size {
        config.pool_size = n;
    }
    if let Some(t) = connect_timeout {
        config.connect_timeout = t;
    }
    config.migrate_on_start = mode == MigrateMode::OnOpen;
    let repo = PostgresMetadataRepo::connect(config)
        .await
        .map_err(OpenError::Metadata)?;
    // An explicit migration (tandem migrate) counts what it applied.
    let applied = if mode == MigrateMode::Explicit {
        repo.migrate().await.map_err(OpenError::Metadata)?
    } else {
        0
    };
    Ok((Arc::new(repo), applied))
}

#[cfg(not(feature = "postgres"))]
async fn open_postgres(
    _url: &str,
    _schema: &str,
    _pool_size: Option<u32>,
    _connect_timeout: Option<Duration>,
    _mode: MigrateMode,
) -> Result<(Repo, usize), OpenError> {
    Err(OpenError::Unavailable("postgres"))
}

#[cfg(feature = "edge")]
async fn open_edge(
    path: &std::path::Path,
    settings: &Settings,
) -> Result<(Index, Option<Optimizer>, Option<Catalog>), OpenError> {
    use tandem_adapters::edge::{EdgeCatalog, EdgeVectorIndex, SharedShard};
    let index = EdgeVectorIndex::open(path, settings.dimension, settings.distance)
        .await
        .map_err(OpenError::Index)?;
    let for_optimizer = index.clone();
    let optimizer: Optimizer = Arc::new(move || {
        let index = for_optimizer.clone();
        Box::pin(async move {
            index
                .optimize()
                .await
                .map(|_| true)
                .map_err(|e| e.to_string())
        })
    });
    let index: Index = Arc::new(index);
    // New collections live beside the configured one, one directory each.
    let root = path.parent().map_or_else(
        || std::path::PathBuf::from("collections"),
        |p| p.join("collections"),
    );
    let dir = path.to_path_buf();
    let drop_configured: DropFn = Arc::new(move || {
        let dir = dir.clone();
        Box::pin(async move { SharedShard::destroy(&dir).await.map_err(IndexError::from) })
    });
    let catalog = app_catalog(
        EdgeCatalog::new(root),
        settings,
        &index,
        Some(drop_configured),
    );
    Ok((index, Some(optimizer), Some(catalog)))
}

#[cfg(not(feature = "edge"))]
async fn open_edge(
    _path: &std::path::Path,
    _settings: &Settings,
) -> Result<(Index, Option<Optimizer>, Option<Catalog>), OpenError> {
    Err(OpenError::Unavailable("edge"))
}

#[cfg(feature = "qdrant")]
async fn open_qdrant(
    settings: &Settings,
    url: &str,
    api_key: Option<&str>,
    timeout: Option<Duration>,
    connect_timeout: Option<Duration>,
    require_tls: bool,
    collection_settings: &tandem_adapters::qdrant::CollectionSettings,
) -> Result<(Index, Option<Optimizer>, Option<Catalog>), OpenError> {
    use tandem_adapters::qdrant::{QdrantCatalog, QdrantConfig, QdrantVectorIndex};
    let mut config = QdrantConfig::new(
        url,
        settings.collection.clone(),
        settings.dimension,
        settings.distance,
    );
    if let Some(key) = api_key {
        config = config.with_api_key(key);
    }
    if let Some(t) = timeout {
        config = config.with_timeout(t);
    }
    if let Some(t) = connect_timeout {
        config.connect_timeout = t;
    }
    config.require_tls = require_tls;
    config = config.with_collection_settings(collection_settings.clone());
    let index = match QdrantVectorIndex::connect(config.clone()).await {
        Ok(index) => index,
        // Deferred writes need no index: a process that writes in deferred
        // mode starts while Qdrant is unreachable, and reaches it later.
        Err(e)
            if settings.coordinator.write_mode == tandem_core::WriteMode::Deferred
                && e.is_retryable() =>
        {
            tracing::warn!(
                error = %e,
                "the index is unreachable; deferred writes go on, index workers wait for it"
            );
            QdrantVectorIndex::connect_lazy(config).map_err(OpenError::Index)?
        }
        Err(e) => return Err(OpenError::Index(e)),
    };
    let catalog = QdrantCatalog::from_index(&index);
    let index: Index = Arc::new(index);
    let catalog = app_catalog(catalog, settings, &index, None);
    Ok((index, None, Some(catalog)))
}

#[cfg(not(feature = "qdrant"))]
async fn open_qdrant(
    _settings: &Settings,
    _url: &str,
    _api_key: Option<&str>,
    _timeout: Option<Duration>,
    _connect_timeout: Option<Duration>,
    _require_tls: bool,
    _collection_settings: &tandem_adapters::qdrant::CollectionSettings,
) -> Result<(Index, Option<Optimizer>, Option<Catalog>), OpenError> {
    Err(OpenError::Unavailable("qdrant"))
}
