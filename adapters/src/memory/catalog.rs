//! [`InMemoryCatalog`]: collections of in-process indexes, by name.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use tandem_core::{Distance, IndexCatalog, IndexError, VectorIndex};

use super::InMemoryVectorIndex;

/// Makes an empty index of a dimension and distance.
type Make<V> = dyn Fn(usize, Distance) -> V + Send + Sync;

/// An [`IndexCatalog`] of in-process indexes: a collection is an `Arc<V>`
/// kept by name, created by a factory (by default an
/// [`InMemoryVectorIndex`]). Opening a name twice gives the same index, so
/// every coordinator sharing the catalog sees the same points.
pub struct InMemoryCatalog<V = InMemoryVectorIndex> {
    make: Box<Make<V>>,
    collections: Mutex<BTreeMap<String, Arc<V>>>,
}

impl InMemoryCatalog<InMemoryVectorIndex> {
    /// An empty catalog of [`InMemoryVectorIndex`]es.
    pub fn new() -> Self {
        Self::with_factory(InMemoryVectorIndex::new)
    }
}

impl Default for InMemoryCatalog<InMemoryVectorIndex> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V> InMemoryCatalog<V> {
    /// An empty catalog whose collections `make` creates.
    pub fn with_factory(make: impl Fn(usize, Distance) -> V + Send + Sync + 'static) -> Self {
        Self {
            make: Box::new(make),
            collections: Mutex::new(BTreeMap::new()),
        }
    }

    /// Adds an existing index under `name` (the collection a coordinator
    /// was built with), replacing any of that name.
    pub fn insert(&self, name: impl Into<String>, index: Arc<V>) {
        self.lock().insert(name.into(), index);
    }

    /// The collections' names.
    pub fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Arc<V>>> {
        self.collections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl<V> std::fmt::Debug for InMemoryCatalog<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryCatalog")
            .field("collections", &self.names())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl<V: VectorIndex + 'static> IndexCatalog for InMemoryCatalog<V> {
    type Index = Arc<V>;

    async fn open(&self, name: &str) -> Result<Arc<V>, IndexError> {
        self.lock()
            .get(name)
            .cloned()
            .ok_or_else(|| IndexError::CollectionNotFound {
                collection: name.to_owned(),
            })
    }

    async fn create(
        &self,
        name: &str,
        dimension: usize,
        distance: Distance,
    ) -> Result<Arc<V>, IndexError> {
        let mut collections = self.lock();
        if let Some(existing) = collections.get(name) {
            if existing.dimension() != dimension || existing.distance() != distance {
                return Err(IndexError::Config {
                    message: format!(
                        "collection {name:?} exists with dimension {} and distance {}, not {dimension} and {distance}",
                        existing.dimension(),
                        existing.distance()
                    ),
                });
            }
            return Ok(Arc::clone(existing));
        }
        let index = Arc::new((self.make)(dimension, distance));
        collections.insert(name.to_owned(), Arc::clone(&index));
        Ok(index)
    }

    async fn drop_collection(&self, name: &str) -> Result<bool, IndexError> {
        Ok(self.lock().remove(name).is_some())
    }
}
