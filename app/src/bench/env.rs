//! The stores one run writes to: Tandem's (through the counting wrappers) and
//! the baselines' own tables and collections, all fresh, optionally behind
//! the latency proxy.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tandem_core::{
    Coordinator, CoordinatorConfig, Distance, IndexCatalog, MetadataRepo, VectorIndex,
};
use tokio::sync::Mutex;

use super::counting::{Counters, CountingCatalog, CountingIndex, CountingRepo};
use super::proxy::{LatencyProxy, ProxyStats};
use super::sql::{self, Ident, RawTable, SqlSession};
use crate::error::AppError;

/// The metadata store, whichever it is.
pub type Repo = Arc<dyn MetadataRepo>;
/// The vector index, whichever it is.
pub type Index = Arc<dyn VectorIndex>;
/// Tandem's coordinator over counted ports.
pub type BenchCoordinator = Coordinator<CountingRepo<Repo>, CountingIndex<Index>>;

/// The servers of the `servers` backend.
#[derive(Clone)]
pub struct Servers {
    /// PostgreSQL URL (may hold a password: never printed).
    pub postgres_url: String,
    /// Qdrant gRPC URL.
    pub qdrant_url: String,
    /// Qdrant API key.
    pub qdrant_api_key: Option<String>,
    /// How to name the Qdrant server in the report.
    pub qdrant_name: String,
}

/// How a run is set up.
pub struct EnvSpec<'a> {
    /// `None`: embedded (SQLite + qdrant-edge) under `work_dir`.
    pub servers: Option<&'a Servers>,
    /// Where embedded stores go (a fresh subdirectory is made).
    pub work_dir: &'a Path,
    /// One-way delay added to every server connection (0: no proxy).
    pub latency: Duration,
    /// Vector dimension.
    pub dim: usize,
    /// Parallel workers (one baseline session each).
    pub concurrency: usize,
    /// Whether rows keep their vectors (Tandem and the baselines alike).
    pub keep_vectors: bool,
    /// Prefix of every schema and collection the bench creates on servers.
    pub namespace: &'a Ident,
    /// Tandem's coordinator configuration.
    pub config: &'a CoordinatorConfig,
}

/// One baseline protocol's stores.
pub struct Baseline {
    /// One session per worker.
    pub sessions: Vec<Mutex<Box<dyn SqlSession>>>,
    /// Its own collection.
    pub index: CountingIndex<Index>,
    /// Its counters.
    pub counters: Arc<Counters>,
}

/// Everything one run touches.
pub struct Env {
    /// Tandem.
    pub tandem: BenchCoordinator,
    /// Tandem's port counters.
    pub tandem_counters: Arc<Counters>,
    /// The raw dual write.
    pub raw: Baseline,
    /// The raw dual write, both stores at once.
    pub raw_overlapped: Baseline,
    /// The naive protocol.
    pub naive: Baseline,
    /// Turns across the metadata proxy.
    pub metadata_wire: Option<Arc<ProxyStats>>,
    /// Turns across the index proxy.
    pub index_wire: Option<Arc<ProxyStats>>,
    /// Median `SELECT 1` round trip through the proxy (servers only).
    pub round_trip_ms: Option<f64>,
    /// "PostgreSQL 15.4", "SQLite (WAL)".
    pub metadata_store: String,
    /// "Qdrant-compatible test server", "qdrant-edge".
    pub vector_index: String,
    /// Tandem's coordinator configuration (the re-indexing cases' too).
    pub config: CoordinatorConfig,
    /// Where the re-indexing cases make their stores.
    reindex: ReindexSite,
    cleanup: Option<Cleanup>,
    _proxies: Vec<LatencyProxy>,
    _dir: Option<tempfile::TempDir>,
}

/// Where the re-indexing cases make their stores, fresh for every
/// repetition: their own SQLite file and qdrant-edge collections in a new
/// directory of the run's, or their own schema and collections on the
/// servers, reached through the run's proxies.
enum ReindexSite {
    Embedded {
        root: PathBuf,
        dim: usize,
        concurrency: usize,
    },
    Servers {
        /// PostgreSQL, through the proxy when latency is added.
        pg_url: String,
        /// Qdrant, likewise.
        q_url: String,
        /// Direct URLs, to drop what a repetition made.
        servers: Servers,
        names: ReindexNames,
        dim: usize,
        concurrency: usize,
    },
}

/// The schema and collections of the re-indexing cases on servers.
#[derive(Clone)]
struct ReindexNames {
    schema: Ident,
    /// Prefix of the collections (`PREFIX_v0`, `PREFIX_v1`, `PREFIX_open`).
    prefix: String,
}

impl ReindexNames {
    fn new(namespace: &Ident, dim: usize) -> Result<Self, AppError> {
        let ns = namespace.as_str();
        Ok(Self {
            schema: Ident::new(&format!("{ns}_reindex"))?,
            prefix: format!("{ns}_reindex_d{dim}"),
        })
    }

    fn collections(&self) -> Vec<String> {
        ReindexStores::ROLES
            .iter()
            .map(|r| format!("{}_{r}", self.prefix))
            .collect()
    }
}

/// Tandem alone on fresh stores of its own, with an index catalog whose
/// collections count their calls into [`ReindexStores::counters`]: one
/// repetition of the re-indexing cases. Its stores always keep vectors (a
/// rebuild copies them).
pub struct ReindexStores {
    /// The coordinator (over the counting wrappers, re-indexing on).
    pub tandem: BenchCoordinator,
    /// Its calls, and those of every collection its catalog opens.
    pub counters: Arc<Counters>,
    catalog: Arc<dyn IndexCatalog<Index = CountingIndex<Index>>>,
    prefix: String,
    cleanup: Option<(Servers, ReindexNames)>,
    _dir: Option<tempfile::TempDir>,
}

impl ReindexStores {
    /// The collections' roles: the one the stores start with, the rebuild's
    /// target, and the open migration's target.
    const ROLES: [&'static str; 3] = ["v0", "v1", "open"];

    /// The name of the collection of `role` (one of [`Self::ROLES`]).
    pub fn collection(&self, role: &str) -> String {
        format!("{}_{role}", self.prefix)
    }

    /// Drops a collection through the catalog; whether it existed.
    pub async fn drop_collection(&self, name: &str) -> Result<bool, AppError> {
        self.catalog
            .drop_collection(name)
            .await
            .map_err(|e| failed("dropping a re-index collection", e))
    }

    /// Drops what the repetition made on the servers (the embedded stores go
    /// with their directory).
    pub async fn cleanup(&self) -> Result<(), AppError> {
        if let Some((servers, names)) = &self.cleanup {
            drop_reindex_names(servers, names).await?;
        }
        Ok(())
    }
}

/// Drops the re-indexing cases' schema and collections (direct, not
/// through the proxy).
async fn drop_reindex_names(servers: &Servers, names: &ReindexNames) -> Result<(), AppError> {
    use tandem_adapters::qdrant::{QdrantCatalog, QdrantConfig};
    sql::pg_drop_schema(&servers.postgres_url, &names.schema).await?;
    let mut config = QdrantConfig::new(
        servers.qdrant_url.clone(),
        format!("{}_v0", names.prefix),
        1,
        Distance::Cosine,
    );
    if let Some(key) = &servers.qdrant_api_key {
        config = config.with_api_key(key.as_str());
    }
    let catalog = QdrantCatalog::new(config).map_err(|e| failed("configuring Qdrant", e))?;
    for name in names.collections() {
        catalog
            .drop_collection(&name)
            .await
            .map_err(|e| failed("dropping a re-index collection", e))?;
    }
    Ok(())
}

fn failed(what: &str, e: impl std::fmt::Display) -> AppError {
    AppError::Failed(format!("bench: {what}: {e}"))
}

/// The URL with its host and port replaced by a proxy's, and the address it
/// pointed to.
async fn through_proxy(
    url: &str,
    default_port: u16,
    delay: Duration,
    what: &str,
) -> Result<(String, LatencyProxy), AppError> {
    let mut u = url::Url::parse(url).map_err(|_| {
        AppError::Usage(format!(
            "--added-latency needs the {what} address as a URL (scheme://host:port/...)"
        ))
    })?;
    let port = u.port().unwrap_or(default_port);
    let target: SocketAddr = match u.host() {
        Some(url::Host::Ipv4(ip)) => (ip, port).into(),
        Some(url::Host::Ipv6(ip)) => (ip, port).into(),
        Some(url::Host::Domain(name)) => tokio::net::lookup_host((name, port))
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| AppError::Usage(format!("cannot resolve the {what} host")))?,
        None => {
            return Err(AppError::Usage(format!(
                "--added-latency needs a host in the {what} URL"
            )));
        }
    };
    let proxy = LatencyProxy::start(target, delay).map_err(|e| failed("starting the proxy", e))?;
    let local = proxy.addr();
    u.set_host(Some(&local.ip().to_string()))
        .and_then(|()| {
            u.set_port(Some(local.port()))
                .map_err(|()| url::ParseError::InvalidPort)
        })
        .map_err(|e| failed("rewriting the URL for the proxy", e))?;
    Ok((u.to_string(), proxy))
}

/// raw, raw-overlapped and naive, in the order they were opened.
fn three(baselines: Vec<Baseline>) -> [Baseline; 3] {
    match <[Baseline; 3]>::try_from(baselines) {
        Ok(b) => b,
        Err(_) => unreachable!("three baselines are opened"),
    }
}

fn coordinator(
    repo: Repo,
    index: Index,
    counters: &Arc<Counters>,
    config: &CoordinatorConfig,
) -> Result<BenchCoordinator, AppError> {
    Coordinator::new(
        CountingRepo::new(repo, counters.clone()),
        CountingIndex::new(index, counters.clone()),
        config.clone(),
    )
    .map_err(|e| failed("configuration", e))
}

/// A re-indexing coordinator over `repo` and the collection `PREFIX_v0`,
/// created through `catalog` (wrapped so that every collection counts).
async fn reindex_coordinator<C>(
    repo: Repo,
    catalog: C,
    prefix: &str,
    dim: usize,
    counters: &Arc<Counters>,
    config: &CoordinatorConfig,
) -> Result<ReindexStores, AppError>
where
    C: IndexCatalog + 'static,
    C::Index: 'static,
{
    let catalog: Arc<dyn IndexCatalog<Index = CountingIndex<Index>>> =
        Arc::new(CountingCatalog::new(catalog, counters.clone()));
    let first = format!("{prefix}_{}", ReindexStores::ROLES[0]);
    let index = catalog
        .create(&first, dim, Distance::Cosine)
        .await
        .map_err(|e| failed("creating the re-index collection", e))?;
    let tandem = Coordinator::new(
        CountingRepo::with_reindexing(repo, counters.clone()),
        index,
        config.clone(),
    )
    .map_err(|e| failed("configuration", e))?
    .with_catalog(catalog.clone(), first);
    Ok(ReindexStores {
        tandem,
        counters: counters.clone(),
        catalog,
        prefix: prefix.to_owned(),
        cleanup: None,
        _dir: None,
    })
}

impl Env {
    /// Opens fresh stores for one run.
    pub async fn open(spec: &EnvSpec<'_>) -> Result<Self, AppError> {
        match spec.servers {
            Some(servers) => Self::open_servers(spec, servers).await,
            None => Self::open_embedded(spec).await,
        }
    }

    async fn open_embedded(spec: &EnvSpec<'_>) -> Result<Self, AppError> {
        use tandem_adapters::edge::EdgeVectorIndex;
        use tandem_adapters::sqlite::{SqliteConfig, SqliteMetadataRepo};

        let dir = tempfile::Builder::new()
            .prefix("tandem-bench-")
            .tempdir_in(spec.work_dir)
            .map_err(|e| failed("creating the work directory", e))?;
        let p = |name: &str| -> PathBuf { dir.path().join(name) };
        let edge = |name: &'static str| {
            let path = p(name);
            async move {
                EdgeVectorIndex::open(path, spec.dim, Distance::Cosine)
                    .await
                    .map(|i| Arc::new(i) as Index)
                    .map_err(|e| failed("opening qdrant-edge", e))
            }
        };
        let mut config = SqliteConfig::new(p("tandem.sqlite3"));
        config.keep_vectors = spec.keep_vectors;
        config.pool_size = config.pool_size.max(spec.concurrency as u32 + 1);
        let repo: Repo = Arc::new(
            SqliteMetadataRepo::open(config)
                .await
                .map_err(|e| failed("opening SQLite", e))?,
        );
        let counters = Arc::new(Counters::default());
        let tandem = coordinator(repo, edge("tandem-index").await?, &counters, spec.config)?;
        let mut baselines = Vec::new();
        // Files of their own: raw-overlapped uses its file's raw_records.
        for (db, index) in [
            ("raw.sqlite3", "raw-index"),
            ("raw-overlapped.sqlite3", "raw-overlapped-index"),
            ("naive.sqlite3", "naive-index"),
        ] {
            let c = Arc::new(Counters::default());
            let mut sessions = Vec::new();
            for _ in 0..spec.concurrency {
                let s = sql::SqliteSession::open(&p(db), c.clone()).await?;
                sessions.push(Mutex::new(Box::new(s) as Box<dyn SqlSession>));
            }
            baselines.push(Baseline {
                sessions,
                index: CountingIndex::new(edge(index).await?, c.clone()),
                counters: c,
            });
        }
        let [raw, raw_overlapped, naive] = three(baselines);
        Ok(Env {
            tandem,
            tandem_counters: counters,
            raw,
            raw_overlapped,
            naive,
            metadata_wire: None,
            index_wire: None,
            round_trip_ms: None,
            cleanup: None,
            metadata_store: "SQLite (WAL, synchronous=NORMAL)".into(),
            vector_index: "qdrant-edge 0.7 (flushed before each write returns)".into(),
            config: spec.config.clone(),
            reindex: ReindexSite::Embedded {
                root: dir.path().to_path_buf(),
                dim: spec.dim,
                concurrency: spec.concurrency,
            },
            _proxies: Vec::new(),
            _dir: Some(dir),
        })
    }

    async fn open_servers(spec: &EnvSpec<'_>, servers: &Servers) -> Result<Self, AppError> {
        use tandem_adapters::postgres::{PostgresConfig, PostgresMetadataRepo};
        use tandem_adapters::qdrant::{QdrantConfig, QdrantVectorIndex};

        // Fresh tables and collections, set up directly (not through the proxy).
        let names = ServerNames::new(spec.namespace, spec.dim)?;
        sql::pg_drop_schema(&servers.postgres_url, &names.tandem_schema).await?;
        drop_reindex_names(servers, &names.reindex).await?;
        sql::pg_reset(&servers.postgres_url, &names.base_schema).await?;
        let version = sql::pg_version(&servers.postgres_url).await?;
        let qdrant = |url: String, collection: String, single_request: bool| {
            let mut c = QdrantConfig::new(url, collection, spec.dim, Distance::Cosine);
            if let Some(key) = &servers.qdrant_api_key {
                c = c.with_api_key(key.as_str());
            }
            if single_request {
                // The baselines send a batch in one request, whatever its size.
                c = c.with_chunking(1_000_000, 1);
            }
            c
        };
        let collections = names.collections.clone();
        for name in &collections {
            let index =
                QdrantVectorIndex::connect(qdrant(servers.qdrant_url.clone(), name.clone(), false))
                    .await
                    .map_err(|e| failed("connecting to Qdrant", e))?;
            index
                .delete_collection()
                .await
                .map_err(|e| failed("dropping a bench collection", e))?;
        }

        let mut proxies = Vec::new();
        let (pg_url, q_url) = if spec.latency.is_zero() {
            (servers.postgres_url.clone(), servers.qdrant_url.clone())
        } else {
            let (pg, p1) =
                through_proxy(&servers.postgres_url, 5432, spec.latency, "PostgreSQL").await?;
            let (q, p2) = through_proxy(&servers.qdrant_url, 6334, spec.latency, "Qdrant").await?;
            proxies.push(p1);
            proxies.push(p2);
            (pg, q)
        };

        let mut config =
            PostgresConfig::new(pg_url.as_str()).with_schema(names.tandem_schema.as_str());
        config.keep_vectors = spec.keep_vectors;
        config.migrate_on_start = true;
        config.pool_size = config.pool_size.max(spec.concurrency as u32 + 2);
        let repo: Repo = Arc::new(
            PostgresMetadataRepo::connect(config)
                .await
                .map_err(|e| failed("connecting to PostgreSQL", e))?,
        );
        let open_index = |name: &String, single: bool| {
            let config = qdrant(q_url.clone(), name.clone(), single);
            async move {
                QdrantVectorIndex::connect(config)
                    .await
                    .map(|i| Arc::new(i) as Index)
                    .map_err(|e| failed("connecting to Qdrant", e))
            }
        };
        let counters = Arc::new(Counters::default());
        let tandem = coordinator(
            repo,
            open_index(&collections[0], false).await?,
            &counters,
            spec.config,
        )?;
        let mut baselines = Vec::new();
        let tables = [RawTable::Raw, RawTable::Overlapped, RawTable::Raw];
        for (name, table) in collections[1..].iter().zip(tables) {
            let c = Arc::new(Counters::default());
            let mut sessions = Vec::new();
            for _ in 0..spec.concurrency {
                let s =
                    sql::PgSession::connect(&pg_url, &names.base_schema, table, c.clone()).await?;
                sessions.push(Mutex::new(Box::new(s) as Box<dyn SqlSession>));
            }
            baselines.push(Baseline {
                sessions,
                index: CountingIndex::new(open_index(name, true).await?, c.clone()),
                counters: c,
            });
        }
        let [raw, raw_overlapped, naive] = three(baselines);
        let round_trip_ms = if spec.latency.is_zero() {
            None
        } else {
            Some(
                sql::PgSession::connect(
                    &pg_url,
                    &names.base_schema,
                    RawTable::Raw,
                    Arc::new(Counters::default()),
                )
                .await?
                .ping_ms(21)
                .await?,
            )
        };
        Ok(Env {
            tandem,
            tandem_counters: counters,
            raw,
            raw_overlapped,
            naive,
            metadata_wire: proxies.first().map(LatencyProxy::stats),
            index_wire: proxies.get(1).map(LatencyProxy::stats),
            round_trip_ms,
            metadata_store: format!("PostgreSQL {version}"),
            vector_index: servers.qdrant_name.clone(),
            config: spec.config.clone(),
            reindex: ReindexSite::Servers {
                pg_url: pg_url.clone(),
                q_url: q_url.clone(),
                servers: servers.clone(),
                names: names.reindex.clone(),
                dim: spec.dim,
                concurrency: spec.concurrency,
            },
            cleanup: Some(Cleanup {
                servers: servers.clone(),
                names,
                dim: spec.dim,
            }),
            _proxies: proxies,
            _dir: None,
        })
    }

    /// Fresh stores for one repetition of the re-indexing cases: an empty
    /// metadata store (vectors kept) and one empty collection (role `v0`),
    /// with a catalog for the collections a re-index creates.
    pub async fn reindex_stores(&self) -> Result<ReindexStores, AppError> {
        let counters = Arc::new(Counters::default());
        match &self.reindex {
            ReindexSite::Embedded {
                root,
                dim,
                concurrency,
            } => {
                use tandem_adapters::edge::EdgeCatalog;
                use tandem_adapters::sqlite::{SqliteConfig, SqliteMetadataRepo};
                let dir = tempfile::Builder::new()
                    .prefix("reindex-")
                    .tempdir_in(root)
                    .map_err(|e| failed("creating the re-index directory", e))?;
                let mut config = SqliteConfig::new(dir.path().join("tandem.sqlite3"));
                config.keep_vectors = true;
                config.pool_size = config.pool_size.max(*concurrency as u32 + 1);
                let repo: Repo = Arc::new(
                    SqliteMetadataRepo::open(config)
                        .await
                        .map_err(|e| failed("opening SQLite", e))?,
                );
                let catalog = EdgeCatalog::new(dir.path().join("collections"));
                let mut stores =
                    reindex_coordinator(repo, catalog, "reindex", *dim, &counters, &self.config)
                        .await?;
                stores._dir = Some(dir);
                Ok(stores)
            }
            ReindexSite::Servers {
                pg_url,
                q_url,
                servers,
                names,
                dim,
                concurrency,
            } => {
                use tandem_adapters::postgres::{PostgresConfig, PostgresMetadataRepo};
                use tandem_adapters::qdrant::{QdrantCatalog, QdrantConfig};
                drop_reindex_names(servers, names).await?;
                let mut config =
                    PostgresConfig::new(pg_url.as_str()).with_schema(names.schema.as_str());
                config.keep_vectors = true;
                config.migrate_on_start = true;
                config.pool_size = config.pool_size.max(*concurrency as u32 + 2);
                let repo: Repo = Arc::new(
                    PostgresMetadataRepo::connect(config)
                        .await
                        .map_err(|e| failed("connecting to PostgreSQL", e))?,
                );
                let mut qconfig = QdrantConfig::new(
                    q_url.clone(),
                    format!("{}_v0", names.prefix),
                    *dim,
                    Distance::Cosine,
                );
                if let Some(key) = &servers.qdrant_api_key {
                    qconfig = qconfig.with_api_key(key.as_str());
                }
                let catalog =
                    QdrantCatalog::new(qconfig).map_err(|e| failed("configuring Qdrant", e))?;
                let mut stores = reindex_coordinator(
                    repo,
                    catalog,
                    &names.prefix,
                    *dim,
                    &counters,
                    &self.config,
                )
                .await?;
                stores.cleanup = Some((servers.clone(), names.clone()));
                Ok(stores)
            }
        }
    }

    /// Drops what the run created on the servers (embedded stores go with
    /// their temporary directory).
    pub async fn cleanup(&self) -> Result<(), AppError> {
        use tandem_adapters::qdrant::{QdrantConfig, QdrantVectorIndex};
        let Some(c) = &self.cleanup else {
            return Ok(());
        };
        sql::pg_drop_schema(&c.servers.postgres_url, &c.names.tandem_schema).await?;
        sql::pg_drop_schema(&c.servers.postgres_url, &c.names.base_schema).await?;
        drop_reindex_names(&c.servers, &c.names.reindex).await?;
        for name in &c.names.collections {
            let mut config = QdrantConfig::new(
                c.servers.qdrant_url.clone(),
                name.clone(),
                c.dim,
                Distance::Cosine,
            );
            if let Some(key) = &c.servers.qdrant_api_key {
                config = config.with_api_key(key.as_str());
            }
            let index = QdrantVectorIndex::connect(config)
                .await
                .map_err(|e| failed("connecting to Qdrant", e))?;
            index
                .delete_collection()
                .await
                .map_err(|e| failed("dropping a bench collection", e))?;
        }
        Ok(())
    }
}

/// The schemas and collections one server run creates.
struct ServerNames {
    tandem_schema: Ident,
    base_schema: Ident,
    collections: [String; 4],
    reindex: ReindexNames,
}

impl ServerNames {
    fn new(namespace: &Ident, dim: usize) -> Result<Self, AppError> {
        let ns = namespace.as_str();
        Ok(Self {
            tandem_schema: namespace.clone(),
            base_schema: Ident::new(&format!("{ns}_base"))?,
            collections: ["tandem", "raw", "raw_overlapped", "naive"]
                .map(|p| format!("{ns}_{p}_d{dim}")),
            reindex: ReindexNames::new(namespace, dim)?,
        })
    }
}

struct Cleanup {
    servers: Servers,
    names: ServerNames,
    dim: usize,
}
