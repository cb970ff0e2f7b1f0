//! [`EdgeCatalog`]: qdrant-edge collections as the subdirectories of a root
//! directory.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tandem_core::{Distance, IndexCatalog, IndexError};

use super::{EdgeVectorIndex, SharedShard};

/// An [`IndexCatalog`] of embedded qdrant-edge indexes: the collection `name`
/// is the [`EdgeVectorIndex`] stored in `root/name`.
///
/// - [`create`](IndexCatalog::create) opens the directory with
///   [`EdgeVectorIndex::open`]: a new shard persists its dimension and
///   distance (qdrant-edge's `edge_config.json`), an existing one must have
///   the layout asked for ([`IndexError::Config`] otherwise).
/// - [`open`](IndexCatalog::open) never creates anything: it reads the
///   layout the shard was created with ([`EdgeVectorIndex::open_existing`]);
///   a directory holding no shard is [`IndexError::CollectionNotFound`].
/// - [`drop_collection`](IndexCatalog::drop_collection) closes the shard and
///   deletes its directory ([`SharedShard::destroy`]). Indexes of the
///   collection still held elsewhere in the process fail with
///   [`IndexError::CollectionNotFound`] from then on.
///
/// Opening a name twice (through this catalog, another one, or
/// [`EdgeVectorIndex::open`]) gives handles on the same shard: a directory
/// has one open shard per process.
///
/// A name is one path component: 1 to 255 bytes, without `/`, `\` or NUL,
/// and not starting with `.` (hidden names are reserved for directories
/// being deleted). Other files in the root are never touched.
#[derive(Clone, Debug)]
pub struct EdgeCatalog {
    root: PathBuf,
}

impl EdgeCatalog {
    /// A catalog of the collections under `root`. Touches nothing: `root` is
    /// created with the first collection.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory the collections live in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of the collection `name`, or [`IndexError::Config`] for
    /// a name that is not a valid collection name (see the type's docs).
    pub fn collection_dir(&self, name: &str) -> Result<PathBuf, IndexError> {
        let valid = !name.is_empty()
            && name.len() <= 255
            && !name.starts_with('.')
            && !name.contains(['/', '\\', '\0']);
        if !valid {
            return Err(IndexError::Config {
                message: format!(
                    "collection name {name:?} is invalid for the embedded index: 1 to 255 \
                     bytes, without '/', '\\' or NUL, not starting with '.'"
                ),
            });
        }
        Ok(self.root.join(name))
    }
}

#[async_trait]
impl IndexCatalog for EdgeCatalog {
    type Index = EdgeVectorIndex;

    async fn open(&self, name: &str) -> Result<EdgeVectorIndex, IndexError> {
        let dir = self.collection_dir(name)?;
        match EdgeVectorIndex::open_existing(&dir).await {
            Err(IndexError::CollectionNotFound { .. }) => Err(IndexError::CollectionNotFound {
                collection: name.to_owned(),
            }),
            other => other,
        }
    }

    async fn create(
        &self,
        name: &str,
        dimension: usize,
        distance: Distance,
    ) -> Result<EdgeVectorIndex, IndexError> {
        let dir = self.collection_dir(name)?;
        let index = EdgeVectorIndex::open(&dir, dimension, distance).await?;
        tracing::debug!(collection = %name, dir = %dir.display(), dimension, %distance, "opened or created qdrant-edge collection");
        Ok(index)
    }

    async fn drop_collection(&self, name: &str) -> Result<bool, IndexError> {
        let dir = self.collection_dir(name)?;
        let existed = SharedShard::destroy(&dir).await?;
        if existed {
            tracing::info!(collection = %name, dir = %dir.display(), "dropped qdrant-edge collection");
        }
        Ok(existed)
    }
}
