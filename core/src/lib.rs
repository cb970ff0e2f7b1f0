//! # tandem-core
//!
//! Keeps a relational metadata store and a vector index consistent without a
//! distributed transaction coordinator. The metadata store is the source of
//! truth; the index is derived from it. The [`Coordinator`] owns the whole
//! protocol (write-ahead intents, copy-on-write point ids, leases with fencing,
//! ambiguous-commit settlement, recovery, guarded reads); backends implement
//! the two small ports [`MetadataRepo`] and [`VectorIndex`].
//!
//! See `docs/protocol.md` for the mechanism and its invariants, and
//! `docs/errors.md` for the error model.

pub mod clock;
pub mod config;
pub mod coordinator;
pub mod error;
pub mod model;
pub mod ports;

pub use clock::{Clock, SystemClock};
pub use config::{CoordinatorConfig, Limits, RetryPolicy};
pub use coordinator::{
    Coordinator, DeleteReport, RecoveryReport, RepairReport, ScopeCounts, SearchQuery, Stats,
    UpsertReport, VerifyReport, WriteOptions,
};
pub use error::{BoxError, CoordinatorError, IndexError, MetadataError, Outcome, ValidationError};
pub use model::*;
pub use ports::{GateOpener, IndexGate, IndexQuery, MetadataRepo, RowRef, VectorIndex};

#[cfg(feature = "planted-bugs")]
pub use coordinator::PlantedBug;

#[cfg(feature = "testkit")]
pub mod testkit;
