//! Which stores a command talks to: the only place that names adapters.
//!
//! Each side is chosen on its own (embedded or server), so any mix works; the
//! coordinator sees two trait objects.

use std::sync::{Arc, Mutex, PoisonError};
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
    /// Where the vector index is (to name another collection of it).
    index_target: IndexTarget,
    /// The collection last opened through the catalog: the active one,
    /// once this process followed a re-index's switch.
    followed: Followed,
}

/// The collection a process followed a switch to (see [`Following`]).
type Followed = Arc<Mutex<Option<String>>>;

/// A catalog that remembers the last collection it opened. A process
/// follows a re-index's switch by opening the new active collection through
/// its catalog; from then on its index errors concern that collection, and
/// its messages must name it, not the configured one (a writer still
/// configured with the old collection is refused by the new one's dimension
/// check: naming the old collection there would send the operator to the
/// wrong place).
struct Following {
    inner: Catalog,
    opened: Followed,
}

#[async_trait::async_trait]
impl IndexCatalog for Following {
    type Index = Index;

    async fn open(&self, name: &str) -> Result<Index, IndexError> {
        let index = self.inner.open(name).await?;
        *self.opened.lock().unwrap_or_else(PoisonError::into_inner) = Some(name.to_owned());
        Ok(index)
    }

    async fn create(
        &self,
        name: &str,
        dimension: usize,
        distance: Distance,
    ) -> Result<Index, IndexError> {
        self.inner.create(name, dimension, distance).await
    }

    async fn drop_collection(&self, name: &str) -> Result<bool, IndexError> {
        self.inner.drop_collection(name).await
    }
}

/// The index's collections, whichever index it is.
pub type Catalog = Arc<dyn IndexCatalog<Index = Index>>;

/// A catalog over an adapter's own, whose indexes become [`Index`]es. The
/// collection this process opened at start is the index already open (one
/// handle per collection in a process); the configured collection of the
/// embedded index lives in its own directory, outside the adapter's
/// catalog, and is opened and dropped there.
struct AppCatalog<C> {
    inner: C,
    /// The collection opened at start: the configured one, or the one a
    /// re-index had made active before this process started.
    opened: String,
    opened_index: Index,
    /// The configured collection, when it does not live in `inner`.
    outside: Option<Outside>,
}

/// A collection outside the adapter's catalog (the embedded index's own
/// directory): its name, and how to open and drop it.
struct Outside {
    name: String,
    open: OpenFn,
    drop: DropFn,
}

type OpenFn =
    Arc<dyn Fn() -> futures::future::BoxFuture<'static, Result<Index, IndexError>> + Send + Sync>;
type DropFn =
    Arc<dyn Fn() -> futures::future::BoxFuture<'static, Result<bool, IndexError>> + Send + Sync>;

impl<C> AppCatalog<C> {
    fn outside(&self, name: &str) -> Option<&Outside> {
        self.outside.as_ref().filter(|o| o.name == name)
    }
}

#[async_trait::async_trait]
impl<C> IndexCatalog for AppCatalog<C>
where
    C: IndexCatalog,
    C::Index: 'static,
{
    type Index = Index;

    async fn open(&self, name: &str) -> Result<Index, IndexError> {
        if name == self.opened {
            return Ok(self.opened_index.clone());
        }
        if let Some(outside) = self.outside(name) {
            return (outside.open)().await;
        }
        Ok(Arc::new(self.inner.open(name).await?))
    }

    async fn create(
        &self,
        name: &str,
        dimension: usize,
        distance: Distance,
    ) -> Result<Index, IndexError> {
        if name == self.opened {
            let index = &self.opened_index;
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
        if self.outside(name).is_some() {
            return Err(IndexError::Config {
                message: format!(
                    "collection {name:?} is the configured collection's own directory; \
                     a re-index builds a new collection under another name"
                ),
            });
        }
        Ok(Arc::new(
            self.inner.create(name, dimension, distance).await?,
        ))
    }

    async fn drop_collection(&self, name: &str) -> Result<bool, IndexError> {
        match self.outside(name) {
            Some(outside) => (outside.drop)().await,
            None => self.inner.drop_collection(name).await,
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

/// The collection a re-index made active, if it is not the configured one
/// (`None` before any switch, on a store without re-indexing, and for the
/// in-memory index, whose collections live only as long as the process).
async fn followed(repo: &Repo, settings: &Settings) -> Result<Option<String>, OpenError> {
    if !repo.reindexing() || matches!(settings.index, IndexTarget::Memory) {
        return Ok(None);
    }
    let state = repo.index_state().await.map_err(OpenError::Metadata)?;
    Ok(state.active.filter(|active| *active != settings.collection))
}

/// [`index_name`] of the collection a process opens: the configured one, or
/// `follow`.
fn opened_index_name(target: &IndexTarget, configured: &str, follow: Option<&str>) -> String {
    match (target, follow) {
        (IndexTarget::Edge { path }, Some(name)) => format!(
            "qdrant-edge vector index at {}",
            edge_collections(path).join(name).display()
        ),
        (_, Some(name)) => index_name(target, name),
        (_, None) => index_name(target, configured),
    }
}

/// [`Stores::index_name_now`]: `opened_name` (the name of `opened`, the
/// collection opened at start) unless the process followed a switch to
/// another collection since.
fn current_index_name(
    target: &IndexTarget,
    opened: &str,
    opened_name: &str,
    followed: Option<&str>,
) -> String {
    match followed {
        Some(name) if name != opened => opened_index_name(target, opened, Some(name)),
        _ => opened_name.to_owned(),
    }
}

impl Stores {
    /// Opens (and, with `auto_migrate`, creates or upgrades) both stores.
    ///
    /// The vector index is the collection the metadata store names active
    /// when a re-index switched to another than the configured one: a process
    /// started after the switch opens it directly, never the configured one
    /// (which may be retired, dropped, or of the old model's dimension).
    pub async fn open(settings: &Settings) -> Result<Self, AppError> {
        let metadata_name = metadata_name(&settings.metadata);
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
        let follow = followed(&repo, settings)
            .await
            .map_err(|e| e.into_app_error(&metadata_name))?;
        let index_name =
            opened_index_name(&settings.index, &settings.collection, follow.as_deref());
        let (index, optimizer, catalog) = open_index(settings, follow.as_deref())
            .await
            .map_err(|e| e.into_app_error(&index_name))?;
        let followed = Followed::default();
        let catalog = open_catalog(settings, &index, catalog).map(|inner| {
            Arc::new(Following {
                inner,
                opened: followed.clone(),
            }) as Catalog
        });
        Ok(Stores {
            repo,
            index,
            metadata_name,
            index_name,
            optimizer,
            catalog,
            collection: follow.unwrap_or_else(|| settings.collection.clone()),
            index_target: settings.index.clone(),
            followed,
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

    /// The vector index's name for messages, naming the collection this
    /// process uses now: the configured one, or the one it followed a
    /// re-index's switch to.
    pub fn index_name_now(&self) -> String {
        let followed = self
            .followed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        current_index_name(
            &self.index_target,
            &self.collection,
            &self.index_name,
            followed.as_deref(),
        )
    }

    /// Wraps a coordinator error with what was being done and which stores
    /// were involved, for a one-line message.
    pub fn error(&self, what: &str, error: CoordinatorError) -> AppError {
        let store = match &error {
            CoordinatorError::Metadata(_) => format!(" ({})", self.metadata_name),
            CoordinatorError::Index(_) => format!(" ({})", self.index_name_now()),
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
    if settings.uses_data_dir() {
        std::fs::create_dir_all(&settings.data_dir).map_err(|e| {
            AppError::Usage(format!(
                "cannot create the data directory {}: {e}",
                settings.data_dir.display()
            ))
        })?;
    }
    // Open without migrating on start, then migrate explicitly to count.
    let (repo, applied) = open_metadata(settings, MigrateMode::Explicit)
        .await
        .map_err(|e| e.into_app_error(&metadata))?;
    // After a re-index's switch the active collection is checked, and the
    // configured one is not created again.
    let follow = followed(&repo, settings)
        .await
        .map_err(|e| e.into_app_error(&metadata))?;
    let index = opened_index_name(&settings.index, &settings.collection, follow.as_deref());
    open_index(settings, follow.as_deref())
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

/// A catalog over `inner`, with `index` as collection `opened`.
fn app_catalog<C: IndexCatalog + 'static>(
    inner: C,
    opened: &str,
    index: &Index,
    outside: Option<Outside>,
) -> Catalog
where
    C::Index: 'static,
{
    Arc::new(AppCatalog {
        inner,
        opened: opened.to_owned(),
        opened_index: index.clone(),
        outside,
    })
}

/// The catalog of the configured index's kind (the in-memory one: one
/// process's collections, a re-index within one run only).
fn open_catalog(settings: &Settings, index: &Index, own: Option<Catalog>) -> Option<Catalog> {
    match &settings.index {
        IndexTarget::Memory => Some(app_catalog(
            InMemoryCatalog::new(),
            &settings.collection,
            index,
            None,
        )),
        IndexTarget::Edge { .. } | IndexTarget::Qdrant { .. } => own,
    }
}

/// Opens the vector index: the configured collection, or `follow`, the one
/// a re-index made active (read from the metadata store).
async fn open_index(
    settings: &Settings,
    follow: Option<&str>,
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
        IndexTarget::Edge { path } => open_edge(path, settings, follow).await,
        IndexTarget::Qdrant { .. } => open_qdrant(settings, follow).await,
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
    follow: Option<&str>,
) -> Result<(Index, Option<Optimizer>, Option<Catalog>), OpenError> {
    use tandem_adapters::edge::{EdgeCatalog, EdgeVectorIndex, SharedShard};
    // New collections live beside the configured one, one directory each.
    let root = edge_collections(path);
    let (index, opened) = match follow {
        // A re-index made another collection active: open it, not the
        // configured one (retired, perhaps dropped, or of the old model).
        Some(name) => (
            EdgeCatalog::new(root.clone())
                .open(name)
                .await
                .map_err(OpenError::Index)?,
            name.to_owned(),
        ),
        None => (
            EdgeVectorIndex::open(path, settings.dimension, settings.distance)
                .await
                .map_err(OpenError::Index)?,
            settings.collection.clone(),
        ),
    };
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
    let (open_dir, drop_dir) = (path.to_path_buf(), path.to_path_buf());
    let configured = Outside {
        name: settings.collection.clone(),
        open: Arc::new(move || {
            let dir = open_dir.clone();
            Box::pin(async move {
                let index = EdgeVectorIndex::open_existing(&dir).await?;
                Ok(Arc::new(index) as Index)
            })
        }),
        drop: Arc::new(move || {
            let dir = drop_dir.clone();
            Box::pin(async move { SharedShard::destroy(&dir).await.map_err(IndexError::from) })
        }),
    };
    let catalog = app_catalog(EdgeCatalog::new(root), &opened, &index, Some(configured));
    Ok((index, Some(optimizer), Some(catalog)))
}

/// Where the embedded index's other collections live: beside the
/// configured one's directory.
fn edge_collections(path: &std::path::Path) -> std::path::PathBuf {
    path.parent().map_or_else(
        || std::path::PathBuf::from("collections"),
        |p| p.join("collections"),
    )
}

#[cfg(not(feature = "edge"))]
async fn open_edge(
    _path: &std::path::Path,
    _settings: &Settings,
    _follow: Option<&str>,
) -> Result<(Index, Option<Optimizer>, Option<Catalog>), OpenError> {
    Err(OpenError::Unavailable("edge"))
}

#[cfg(feature = "qdrant")]
async fn open_qdrant(
    settings: &Settings,
    follow: Option<&str>,
) -> Result<(Index, Option<Optimizer>, Option<Catalog>), OpenError> {
    use tandem_adapters::qdrant::{QdrantCatalog, QdrantConfig, QdrantVectorIndex};
    let IndexTarget::Qdrant {
        url,
        api_key,
        timeout,
        connect_timeout,
        require_tls,
        collection_settings,
    } = &settings.index
    else {
        unreachable!("open_qdrant is called for a Qdrant target only");
    };
    let (api_key, timeout, connect_timeout, require_tls) =
        (api_key.as_deref(), *timeout, *connect_timeout, *require_tls);
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
    if let Some(name) = follow {
        return follow_qdrant(settings, config, name).await;
    }
    let connected = QdrantVectorIndex::connect(config.clone()).await;
    let index = or_lazy(settings, connected, config)?;
    let catalog = QdrantCatalog::from_index(&index);
    let index: Index = Arc::new(index);
    let catalog = app_catalog(catalog, &settings.collection, &index, None);
    Ok((index, None, Some(catalog)))
}

/// Opens collection `name`, which a re-index made active, with its own
/// layout (a process still configured with the old model opens it too: its
/// writes of the old dimension are refused, its reads and checks work).
#[cfg(feature = "qdrant")]
async fn follow_qdrant(
    settings: &Settings,
    config: tandem_adapters::qdrant::QdrantConfig,
    name: &str,
) -> Result<(Index, Option<Optimizer>, Option<Catalog>), OpenError> {
    use tandem_adapters::qdrant::QdrantCatalog;
    let catalog = QdrantCatalog::new(config.clone()).map_err(OpenError::Index)?;
    let opened = catalog.open(name).await;
    let mut lazy = config;
    lazy.collection = name.to_owned();
    let index: Index = Arc::new(or_lazy(settings, opened, lazy)?);
    let catalog = app_catalog(catalog, name, &index, None);
    Ok((index, None, Some(catalog)))
}

/// `opened`, or — deferred writes need no index: a process that writes in
/// deferred mode starts while Qdrant is unreachable, and reaches it later —
/// an index of `config` that connects on first use.
#[cfg(feature = "qdrant")]
fn or_lazy(
    settings: &Settings,
    opened: Result<tandem_adapters::qdrant::QdrantVectorIndex, IndexError>,
    config: tandem_adapters::qdrant::QdrantConfig,
) -> Result<tandem_adapters::qdrant::QdrantVectorIndex, OpenError> {
    match opened {
        Ok(index) => Ok(index),
        Err(e)
            if settings.coordinator.write_mode == tandem_core::WriteMode::Deferred
                && e.is_retryable() =>
        {
            tracing::warn!(
                error = %e,
                "the index is unreachable; deferred writes go on, index workers wait for it"
            );
            tandem_adapters::qdrant::QdrantVectorIndex::connect_lazy(config)
                .map_err(OpenError::Index)
        }
        Err(e) => Err(OpenError::Index(e)),
    }
}

#[cfg(not(feature = "qdrant"))]
async fn open_qdrant(
    _settings: &Settings,
    _follow: Option<&str>,
) -> Result<(Index, Option<Optimizer>, Option<Catalog>), OpenError> {
    Err(OpenError::Unavailable("qdrant"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_adapters::qdrant::CollectionSettings;

    fn qdrant() -> IndexTarget {
        IndexTarget::Qdrant {
            url: "http://q.example:6334".into(),
            api_key: None,
            timeout: None,
            connect_timeout: None,
            require_tls: false,
            collection_settings: CollectionSettings::new(),
        }
    }

    /// After a process followed a re-index's switch, messages name the
    /// collection it writes to, not the configured one.
    #[test]
    fn messages_name_the_collection_a_switch_was_followed_to() {
        let target = qdrant();
        let configured = index_name(&target, "docs");
        assert_eq!(
            configured,
            "Qdrant vector index at http://q.example:6334 (collection docs)"
        );
        assert_eq!(
            current_index_name(&target, "docs", &configured, None),
            configured
        );
        assert_eq!(
            current_index_name(&target, "docs", &configured, Some("docs")),
            configured
        );
        assert_eq!(
            current_index_name(&target, "docs", &configured, Some("docs_v2")),
            "Qdrant vector index at http://q.example:6334 (collection docs_v2)"
        );
    }

    /// The catalog records what it opened (a switch followed), not what a
    /// re-index creates (its target, not yet active), nor failed opens.
    #[test]
    fn the_catalog_remembers_the_collection_it_opened() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let opened = Followed::default();
        let inner = AppCatalog {
            inner: InMemoryCatalog::new(),
            opened: "docs".to_owned(),
            opened_index: Arc::new(InMemoryVectorIndex::new(4, Distance::Cosine)),
            outside: None,
        };
        let catalog = Following {
            inner: Arc::new(inner),
            opened: opened.clone(),
        };
        let seen = || opened.lock().unwrap().clone();
        rt.block_on(catalog.create("v2", 4, Distance::Cosine))
            .expect("create");
        assert_eq!(seen(), None, "creating a target follows nothing");
        assert!(rt.block_on(catalog.open("missing")).is_err());
        assert_eq!(seen(), None, "a failed open follows nothing");
        rt.block_on(catalog.open("v2")).expect("open");
        assert_eq!(seen().as_deref(), Some("v2"));
    }
}
