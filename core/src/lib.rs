//! # tandem-core
//!
//! Keeps a relational metadata store and a vector index consistent without a
//! distributed transaction coordinator. The metadata store is the source of
//! truth; the index is derived from it. The [`Coordinator`] owns the whole
//! protocol (write-ahead intents, copy-on-write point ids, leases with fencing,
//! ambiguous-commit settlement, recovery, guarded reads); backends implement
//! the two small ports [`MetadataRepo`] and [`VectorIndex`]. Texts become
//! vectors through a third, [`Embedder`] (module [`embed`]).
//!
//! See `docs/protocol.md` for the mechanism and its invariants, and
//! `docs/errors.md` for the error model.

pub mod clock;
pub mod config;
pub mod coordinator;
pub mod embed;
pub mod error;
pub mod model;
pub mod ports;
pub mod reindex;
pub mod saga;
pub mod transaction;

pub use clock::{Clock, SystemClock};
pub use config::{
    CoordinatorConfig, IndexingConfig, Limits, ReindexConfig, RetryPolicy, WriteMode,
};
pub use coordinator::{
    Coordinator, DeleteReport, IndexReport, IndexToken, IndexWait, RecoveryReport, ReindexOptions,
    ReindexReport, RepairReport, SagaRun, ScopeCounts, SearchQuery, Stats, UpsertReport,
    VerifyCursor, VerifyPage, VerifyReport, WriteOptions,
};
pub use embed::{BatchLimits, BatchingEmbedder, Embedder, RetryingEmbedder};
pub use error::{
    BoxError, CoordinatorError, EmbedError, IndexError, MetadataError, Outcome, ProtocolViolation,
    ValidationError,
};
pub use model::*;
pub use ports::{
    GateOpener, IndexCatalog, IndexGate, IndexQuery, MetadataRepo, RowRef, VectorIndex,
};
pub use reindex::{
    ChangedRow, IndexState, Migration, MigrationSpec, ReindexProgress, ReindexSource, StagedVector,
    SwitchCounts, SwitchOutcome,
};
pub use saga::{
    ActionFn, Resume, SagaContext, SagaCounts, SagaDefinition, SagaOutcome, SagaRecord, SagaState,
    StepDefinition, StepKind, StepRecord, StepState, TandemStepFn,
};
pub use transaction::{
    CommitStep, ConnectionType, SqlStep, Transaction, TransactionReport, WriteOp,
};

#[cfg(feature = "planted-bugs")]
pub use coordinator::PlantedBug;

#[cfg(feature = "testkit")]
pub mod testkit;
