//! [`QdrantCatalog`]: the collections of one Qdrant server, by name.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use qdrant_client::Qdrant;
use tandem_core::{Distance, IndexCatalog, IndexError};
use tokio::sync::OnceCell;

use super::{NOT_REACHED, QdrantConfig, QdrantVectorIndex, at_store, convert, unreachable};

/// An [`IndexCatalog`] of the collections of the Qdrant server a
/// [`QdrantConfig`] names: each collection is a [`QdrantVectorIndex`].
///
/// The catalog is built from a base configuration — URL, API key,
/// timeouts, write ordering, chunking and [`CollectionSettings`] — whose
/// collection name, dimension and distance it replaces for each collection:
///
/// - [`create`](IndexCatalog::create) ensures the collection exactly as
///   [`QdrantVectorIndex::connect`] does: a missing one is created with the
///   requested size and distance, every configured collection setting
///   (shards, replication, HNSW, quantization, `on_disk`, ...) and the same
///   payload indexes (`record_id`, `scope` and the configured
///   `metadata.<key>` ones); an existing one is checked — another size or
///   distance, or another shard number, replication factor or quantization
///   kind, is an [`IndexError::Config`] — and gets the payload indexes it
///   lacks.
/// - [`open`](IndexCatalog::open) never creates a collection: a missing one
///   is [`IndexError::CollectionNotFound`]. The size and distance are the
///   collection's own, read from the server; its settings are checked and
///   its missing payload indexes created as by `create`.
/// - [`drop_collection`](IndexCatalog::drop_collection) deletes the
///   collection and its points.
///
/// Every index it returns shares the catalog's gRPC client (one connection
/// pool), and the catalog is cheap to clone. The API key is never shown
/// (`Debug` prints the URL and the collection settings only).
///
/// [`CollectionSettings`]: super::CollectionSettings
#[derive(Clone)]
pub struct QdrantCatalog {
    client: Qdrant,
    base: QdrantConfig,
    /// The version the server reported in the catalog's health check, done
    /// once, before the first `open` or `create`.
    server_version: Arc<OnceCell<String>>,
}

impl fmt::Debug for QdrantCatalog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QdrantCatalog")
            .field("url", &self.base.url)
            .field("collection_settings", &self.base.collection_settings)
            .field("server_version", &self.server_version.get())
            .finish_non_exhaustive()
    }
}

impl QdrantCatalog {
    /// A catalog of the server `config` names. Validates the configuration
    /// and builds the client without reaching the server (the connection is
    /// made by the first call). `config.collection`, `config.dimension` and
    /// `config.distance` are not used (each collection has its own).
    ///
    /// Errors: [`IndexError::Config`] for an invalid configuration.
    pub fn new(config: QdrantConfig) -> Result<Self, IndexError> {
        Ok(Self::from_index(&QdrantVectorIndex::connect_lazy(config)?))
    }

    /// A catalog of the server `index` talks to, with its configuration and
    /// sharing its client (its connection pool).
    pub fn from_index(index: &QdrantVectorIndex) -> Self {
        let server_version = if index.server_version == NOT_REACHED {
            OnceCell::new()
        } else {
            OnceCell::new_with(Some(index.server_version.clone()))
        };
        Self {
            client: index.client.clone(),
            base: index.config.clone(),
            server_version: Arc::new(server_version),
        }
    }

    /// The base configuration (its `Debug` hides the API key).
    pub fn config(&self) -> &QdrantConfig {
        &self.base
    }

    /// The configuration of the collection `name`: the base one with that
    /// name, dimension and distance, validated.
    fn config_for(
        &self,
        name: &str,
        dimension: usize,
        distance: Distance,
    ) -> Result<QdrantConfig, IndexError> {
        let mut config = self.base.clone();
        config.collection = name.to_owned();
        config.dimension = dimension;
        config.distance = distance;
        config.validate()?;
        Ok(config)
    }

    /// The index of a collection (not checked on the server), sharing the
    /// catalog's client.
    fn index(&self, config: QdrantConfig, server_version: String) -> QdrantVectorIndex {
        QdrantVectorIndex {
            client: self.client.clone(),
            config,
            server_version,
        }
    }

    /// The server's version, from a health check the first time: an
    /// unreachable server is a transient error naming the URL.
    async fn server_version(&self, config: &QdrantConfig) -> Result<String, IndexError> {
        self.server_version
            .get_or_try_init(|| async {
                match self.client.health_check().await {
                    Ok(reply) => Ok(reply.version),
                    Err(e) => Err(unreachable(config, e)),
                }
            })
            .await
            .cloned()
    }
}

#[async_trait]
impl IndexCatalog for QdrantCatalog {
    type Index = QdrantVectorIndex;

    async fn open(&self, name: &str) -> Result<QdrantVectorIndex, IndexError> {
        // The layout is the collection's, read below.
        let config = self.config_for(name, self.base.dimension, self.base.distance)?;
        let url = config.url.clone();
        let version = self.server_version(&config).await?;
        let mut index = self.index(config, version);
        let info = index
            .collection_info()
            .await
            .map_err(|e| at_store(&url, e))?;
        let params = super::vector_params(&info, name)?;
        let dimension = usize::try_from(params.size)
            .ok()
            .filter(|&d| d > 0)
            .ok_or_else(|| IndexError::Config {
                message: format!(
                    "Qdrant collection `{name}` has vector size {}, which Tandem cannot use",
                    params.size
                ),
            })?;
        let distance =
            convert::from_distance(params.distance).ok_or_else(|| IndexError::Config {
                message: format!(
                    "Qdrant collection `{name}` uses a distance Tandem does not support (#{}): \
                     Tandem supports cosine, dot and euclid",
                    params.distance
                ),
            })?;
        index.config.dimension = dimension;
        index.config.distance = distance;
        index.adopt(&info).await.map_err(|e| at_store(&url, e))?;
        tracing::debug!(
            url = %url,
            collection = %name,
            dimension,
            distance = %distance,
            "opened Qdrant collection"
        );
        Ok(index)
    }

    async fn create(
        &self,
        name: &str,
        dimension: usize,
        distance: Distance,
    ) -> Result<QdrantVectorIndex, IndexError> {
        let config = self.config_for(name, dimension, distance)?;
        let url = config.url.clone();
        let version = self.server_version(&config).await?;
        let index = self.index(config, version);
        index
            .ensure_collection()
            .await
            .map_err(|e| at_store(&url, e))?;
        tracing::debug!(
            url = %url,
            collection = %name,
            dimension,
            distance = %distance,
            "ensured Qdrant collection"
        );
        Ok(index)
    }

    async fn drop_collection(&self, name: &str) -> Result<bool, IndexError> {
        let config = self.config_for(name, self.base.dimension, self.base.distance)?;
        let url = config.url.clone();
        let index = self.index(config, NOT_REACHED.to_owned());
        let existed = match index.delete_collection().await {
            Ok(existed) => existed,
            // Some servers answer NotFound rather than `false`.
            Err(IndexError::CollectionNotFound { .. }) => false,
            Err(e) => return Err(at_store(&url, e)),
        };
        if existed {
            tracing::info!(url = %url, collection = %name, "dropped Qdrant collection");
        }
        Ok(existed)
    }
}
