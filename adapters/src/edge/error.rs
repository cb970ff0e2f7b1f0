//! qdrant-edge's errors, and their translation into the port's [`IndexError`].

use std::path::PathBuf;

use qdrant_edge::OperationError;
use tandem_core::{IndexError, Outcome};

/// What went wrong inside the edge backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EdgeError {
    /// qdrant-edge refused or failed an operation.
    #[error("qdrant-edge: {0}")]
    Operation(#[from] OperationError),
    /// The blocking task running a qdrant-edge call panicked or was cancelled
    /// (qdrant-edge panics when a flush fails).
    #[error("qdrant-edge worker failed: {0}")]
    Worker(#[source] tokio::task::JoinError),
    /// The shard was closed because its collection was dropped
    /// ([`SharedShard::destroy`](super::SharedShard::destroy)).
    #[error("the qdrant-edge shard in {} was dropped", path.display())]
    Closed {
        /// The shard's directory.
        path: PathBuf,
    },
    /// The data directory could not be prepared.
    #[error("data directory {}: {source}", path.display())]
    Io {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl EdgeError {
    /// Whether the caller's input was at fault (nothing applied).
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            Self::Operation(
                OperationError::WrongVectorDimension { .. }
                    | OperationError::VectorNameNotExists { .. }
                    | OperationError::TypeError { .. }
                    | OperationError::TypeInferenceError { .. }
                    | OperationError::ValidationError { .. }
                    | OperationError::WrongSparse
                    | OperationError::WrongMulti
                    | OperationError::MissingRangeIndexForOrderBy { .. }
                    | OperationError::MissingMapIndexForFacet { .. }
                    | OperationError::VariableTypeError { .. }
                    | OperationError::NonFiniteNumber { .. }
            )
        )
    }
}

impl From<EdgeError> for IndexError {
    fn from(err: EdgeError) -> Self {
        let message = err.to_string();
        if err.is_invalid_input() {
            return IndexError::InvalidInput {
                message,
                source: Some(Box::new(err)),
            };
        }
        match &err {
            EdgeError::Closed { path } => IndexError::CollectionNotFound {
                collection: path.display().to_string(),
            },
            // Resource pressure and interruptions may pass; a write may have
            // been partly applied before it hit them.
            EdgeError::Operation(
                OperationError::Timeout { .. }
                | OperationError::Cancelled { .. }
                | OperationError::OutOfMemory { .. },
            ) => IndexError::Transient {
                outcome: Outcome::Unknown,
                retry_after: None,
                message,
                source: Some(Box::new(err)),
            },
            EdgeError::Io { .. } => IndexError::Config { message },
            // Storage failures (I/O, corruption, a panicking flush): retrying
            // the same call will not help, and a write may have landed.
            _ => IndexError::Permanent {
                outcome: Outcome::Unknown,
                message,
                source: Some(Box::new(err)),
            },
        }
    }
}
