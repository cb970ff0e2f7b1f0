//! In-memory backends for both ports: [`InMemoryMetadataRepo`] and
//! [`InMemoryVectorIndex`].
//!
//! First-class backends, not test doubles: they honour every contract of the
//! ports (and pass the conformance suites), so the coordinator behaves the same
//! over them as over PostgreSQL and Qdrant. Useful for tests, examples and
//! ephemeral workloads; nothing survives the process.
//!
//! ```
//! use tandem_adapters::memory::{InMemoryMetadataRepo, InMemoryVectorIndex};
//! use tandem_core::{Distance, VectorIndex};
//!
//! let metadata = InMemoryMetadataRepo::new();
//! let index = InMemoryVectorIndex::new(384, Distance::Cosine);
//! assert!(metadata.keeps_vectors());
//! assert_eq!(index.dimension(), 384);
//! ```

mod catalog;
mod metadata;
mod vector;

pub use catalog::InMemoryCatalog;
pub use metadata::{InMemoryMetadataRepo, InMemoryTables};
pub use vector::InMemoryVectorIndex;

#[cfg(test)]
mod tests;
