//! [`SqliteMetadataRepo`]: the embedded default [`MetadataRepo`], SQLite
//! through diesel-async's `SyncConnectionWrapper` (bundled libsqlite3).
//!
//! Same schema semantics and the same protocol steps as the PostgreSQL
//! adapter (the steps are shared, `crate::sql::steps`); what differs is how
//! they are made atomic: every writing call runs, whole, in one `BEGIN
//! IMMEDIATE` transaction on one blocking thread. The immediate transaction
//! takes the database's write lock up front (waiting up to
//! [`SqliteConfig::busy_timeout`]), so a commit, a settle or a recovery claim
//! sees no other writer between its reads and its writes — SQLite has no
//! `SKIP LOCKED`, and needs none. WAL mode lets reads run beside the writer;
//! `synchronous = FULL` makes a commit durable when it returns.

pub mod error;
mod journal;
mod reindex;
mod session;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use diesel::SqliteConnection;
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use tandem_core::{
    ChangedRow, ConnectionType, DeleteCommit, DeleteSelector, IdempotencyRecord, IndexFailure,
    IndexGate, Intent, IntentId, MetadataError, MetadataRepo, NewIntent, Outcome, OwnerToken, Page,
    PendingFilter, PendingIndex, PendingStats, PointId, RecordId, RowRef, RowWrite, SagaCounts,
    SagaId, SagaRecord, SagaState, Scope, Settlement, StoredRecord, TransactionCommit,
    TransactionCommitResult, UndoImage, UpsertCommit,
};
use tandem_core::{IndexState, Migration, MigrationSpec, StagedVector, SwitchOutcome};

use self::error::{Phase, classify, classify_checkout, task_lost};
use self::session::{SqliteConnector, SyncTx, immediate};
use crate::sql::pool::Pool;
use crate::sql::reindex as reindex_steps;
use crate::sql::steps;

/// The migrations under `adapters/migrations/sqlite`, compiled in.
const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

/// A pooled connection idle this long is checked with `SELECT 1` before use
/// (the same window as the PostgreSQL adapter's default).
const VERIFY_IDLE_AFTER: Duration = Duration::from_millis(500);

/// Where and how to keep the embedded metadata store.
#[derive(Clone, Debug, PartialEq)]
pub struct SqliteConfig {
    /// The database file (created, with its directory, if missing).
    pub path: PathBuf,
    /// Whether rows keep their vectors (so `repair` can rewrite lost points).
    pub keep_vectors: bool,
    /// How long a writer waits for another one (another process included)
    /// before failing with a retryable error.
    pub busy_timeout: Duration,
    /// Most connections (one writer at a time; readers run beside it).
    pub pool_size: u32,
    /// Whether [`SqliteMetadataRepo::open`] applies pending migrations.
    pub migrate_on_start: bool,
}

impl SqliteConfig {
    /// Defaults for everything but the path: vectors kept, 5 s busy timeout,
    /// pool of 4, migrate on start.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            keep_vectors: true,
            busy_timeout: Duration::from_secs(5),
            pool_size: 4,
            migrate_on_start: true,
        }
    }
}

/// The embedded [`MetadataRepo`]: one SQLite database file.
pub struct SqliteMetadataRepo {
    pool: Pool<SqliteConnector>,
    config: SqliteConfig,
}

impl fmt::Debug for SqliteMetadataRepo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteMetadataRepo")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl SqliteMetadataRepo {
    /// Opens (creating if needed) the database, checks it can be used, and
    /// migrates if [`SqliteConfig::migrate_on_start`].
    pub async fn open(config: SqliteConfig) -> Result<Self, MetadataError> {
        let path = config
            .path
            .to_str()
            .ok_or_else(|| {
                MetadataError::permanent(format!(
                    "SQLite path {} is not valid UTF-8",
                    config.path.display()
                ))
            })?
            .to_owned();
        if path.is_empty() || path == ":memory:" || path.starts_with("file:") {
            // Each pooled connection would see a database of its own.
            return Err(MetadataError::permanent(
                "SQLite path must name a database file",
            ));
        }
        if config.pool_size == 0 || config.busy_timeout.is_zero() {
            return Err(MetadataError::permanent(
                "SQLite configuration: pool_size and busy_timeout must be positive",
            ));
        }
        if let Some(dir) = config.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| MetadataError::Permanent {
                    outcome: Outcome::NotApplied,
                    message: format!("cannot create the directory {}: {e}", dir.display()),
                    source: Some(Box::new(e)),
                })?;
        }
        let connector = SqliteConnector {
            path,
            busy_timeout: config.busy_timeout,
        };
        // A caller waits for a free connection as long as for the write lock.
        let pool = Pool::new(
            connector,
            config.pool_size,
            config.busy_timeout,
            VERIFY_IDLE_AFTER,
            "sqlite",
        );
        let repo = Self { pool, config };
        if repo.config.migrate_on_start {
            repo.migrate().await?;
        } else {
            repo.run(|_, _| (Ok(()), true)).await?;
        }
        Ok(repo)
    }

    /// Applies pending migrations, inside one immediate transaction so that
    /// processes opening the same file together migrate one at a time.
    /// Returns how many were applied.
    pub async fn migrate(&self) -> Result<usize, MetadataError> {
        self.run(|c, _| {
            let mut applied: Result<usize, MetadataError> = Ok(0);
            let tx = c.immediate_transaction::<_, diesel::result::Error, _>(|c| {
                match c.run_pending_migrations(MIGRATIONS) {
                    Ok(versions) => {
                        applied = Ok(versions.len());
                        Ok(())
                    }
                    Err(e) => {
                        applied = Err(match e.downcast::<diesel::result::Error>() {
                            Ok(db) => classify(*db, Phase::Statement),
                            Err(other) => MetadataError::Permanent {
                                outcome: Outcome::NotApplied,
                                message: format!("SQLite migration failed: {other}"),
                                source: Some(other),
                            },
                        });
                        Err(diesel::result::Error::RollbackTransaction)
                    }
                }
            });
            match tx {
                Ok(()) | Err(diesel::result::Error::RollbackTransaction) => (applied, true),
                Err(e) => (Err(classify(e, Phase::Commit)), false),
            }
        })
        .await
    }

    /// The configuration it was opened with.
    pub fn config(&self) -> &SqliteConfig {
        &self.config
    }

    /// Runs one call on a pooled connection's blocking thread. `f` says
    /// whether it left the connection clean (no transaction open); a call
    /// whose future is dropped still runs to its end there, and its
    /// connection is discarded.
    async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut SqliteConnection, bool) -> (Result<R, MetadataError>, bool) + Send + 'static,
    ) -> Result<R, MetadataError> {
        let mut checkout = self.pool.checkout().await.map_err(classify_checkout)?;
        let keep_vectors = self.config.keep_vectors;
        match checkout
            .conn()
            .spawn_blocking(move |c| Ok(f(c, keep_vectors)))
            .await
        {
            Ok((result, clean)) => {
                if clean {
                    checkout.release();
                }
                result
            }
            Err(e) => Err(task_lost(e)),
        }
    }

    /// A read or a single-statement write: no transaction is left open.
    async fn simple<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut SqliteConnection, bool) -> Result<R, MetadataError> + Send + 'static,
    ) -> Result<R, MetadataError> {
        self.run(move |c, keep| (f(c, keep), true)).await
    }
}

#[async_trait]
impl MetadataRepo for SqliteMetadataRepo {
    /// Inside an immediate transaction: the generation check and the insert
    /// see the same index state.
    async fn prepare(&self, intent: &NewIntent) -> Result<(), MetadataError> {
        let intent = intent.clone();
        self.run(move |c, _| immediate(c, |c| reindex::prepare(c, &intent)))
            .await
    }

    async fn commit_upsert(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        rows: &[RowWrite],
        idempotency: Option<&IdempotencyRecord>,
    ) -> Result<UpsertCommit, MetadataError> {
        let (rows, idempotency) = (rows.to_vec(), idempotency.cloned());
        self.run(move |c, keep_vectors| {
            immediate(c, |c| {
                let mut tx = SyncTx { c, keep_vectors };
                futures::executor::block_on(steps::commit_upsert(
                    &mut tx,
                    intent,
                    owner,
                    &rows,
                    idempotency.as_ref(),
                ))
            })
        })
        .await
    }

    async fn commit_delete(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        selector: &DeleteSelector,
        idempotency: Option<&IdempotencyRecord>,
    ) -> Result<DeleteCommit, MetadataError> {
        let (selector, idempotency) = (selector.clone(), idempotency.cloned());
        self.run(move |c, keep_vectors| {
            immediate(c, |c| {
                let mut tx = SyncTx { c, keep_vectors };
                futures::executor::block_on(steps::commit_delete(
                    &mut tx,
                    intent,
                    owner,
                    &selector,
                    idempotency.as_ref(),
                ))
            })
        })
        .await
    }

    async fn settle(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        fence: OwnerToken,
    ) -> Result<Settlement, MetadataError> {
        self.run(move |c, keep_vectors| {
            immediate(c, |c| {
                let mut tx = SyncTx { c, keep_vectors };
                futures::executor::block_on(steps::settle(&mut tx, intent, owner, fence))
            })
        })
        .await
    }

    async fn settle_unprepared(
        &self,
        intent: &NewIntent,
        owner: OwnerToken,
        fence: OwnerToken,
    ) -> Result<Settlement, MetadataError> {
        let intent = intent.clone();
        self.run(move |c, keep_vectors| {
            immediate(c, |c| {
                let mut tx = SyncTx { c, keep_vectors };
                futures::executor::block_on(steps::settle_unprepared(
                    &mut tx, &intent, owner, fence,
                ))
            })
        })
        .await
    }

    fn commit_step_connection(&self) -> Option<ConnectionType> {
        Some(ConnectionType::of::<SqliteConnection>())
    }

    /// The caller's step runs on the connection's blocking thread, inside
    /// the immediate transaction, after the gate passed (SQLite keeps the
    /// sequential commit).
    async fn commit_transaction(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        commit: &TransactionCommit<'_>,
        idempotency: Option<&IdempotencyRecord>,
        gate: &IndexGate,
    ) -> Result<TransactionCommitResult, MetadataError> {
        if !gate.wait().await {
            return Err(MetadataError::Aborted { intent });
        }
        let parts = commit.parts.to_vec();
        let (step, hold, saga, release_at_ms) = (
            commit.step.clone(),
            commit.hold,
            commit.saga,
            commit.release_at_ms,
        );
        let create_intent = commit.create_intent.cloned();
        let idempotency = idempotency.cloned();
        self.run(move |c, keep_vectors| {
            immediate(c, |c| {
                let mut tx = SyncTx { c, keep_vectors };
                let commit = TransactionCommit {
                    parts: &parts,
                    step,
                    hold,
                    saga,
                    release_at_ms,
                    create_intent: create_intent.as_ref(),
                };
                futures::executor::block_on(steps::commit_transaction(
                    &mut tx,
                    intent,
                    owner,
                    &commit,
                    idempotency.as_ref(),
                ))
            })
        })
        .await
    }

    async fn undo_images(&self, intent: IntentId) -> Result<Vec<UndoImage>, MetadataError> {
        self.simple(move |c, keep| journal::undo_images(c, intent, keep))
            .await
    }

    async fn saga_save(
        &self,
        saga: &SagaRecord,
        fence: Option<OwnerToken>,
    ) -> Result<Vec<Intent>, MetadataError> {
        let saga = saga.clone();
        match fence {
            None => {
                self.simple(move |c, _| journal::create_saga(c, &saga).map(|()| Vec::new()))
                    .await
            }
            Some(fence) => {
                self.run(move |c, _| immediate(c, |c| journal::save_saga(c, &saga, fence)))
                    .await
            }
        }
    }

    async fn saga_claim(
        &self,
        now_ms: i64,
        owner: OwnerToken,
        lease_deadline_ms: i64,
        limit: usize,
    ) -> Result<Vec<SagaRecord>, MetadataError> {
        self.run(move |c, _| {
            immediate(c, |c| {
                journal::claim_sagas(c, now_ms, owner, lease_deadline_ms, limit)
            })
        })
        .await
    }

    async fn saga_take(
        &self,
        id: SagaId,
        owner: OwnerToken,
        lease_deadline_ms: i64,
    ) -> Result<Option<SagaRecord>, MetadataError> {
        self.run(move |c, _| immediate(c, |c| journal::take_saga(c, id, owner, lease_deadline_ms)))
            .await
    }

    async fn saga_get(&self, id: SagaId) -> Result<Option<SagaRecord>, MetadataError> {
        self.simple(move |c, _| journal::get_saga(c, id)).await
    }

    async fn saga_list(
        &self,
        state: Option<SagaState>,
        limit: usize,
    ) -> Result<Vec<SagaRecord>, MetadataError> {
        self.simple(move |c, _| journal::list_sagas(c, state, limit))
            .await
    }

    async fn saga_counts(&self) -> Result<SagaCounts, MetadataError> {
        self.simple(journal::count_sagas_of).await
    }

    async fn resolve(&self, intent: IntentId, owner: OwnerToken) -> Result<bool, MetadataError> {
        self.simple(move |c, _| session::delete_intent(c, intent, owner))
            .await
    }

    async fn resolve_many(
        &self,
        intents: &[IntentId],
        owner: OwnerToken,
    ) -> Result<usize, MetadataError> {
        if intents.is_empty() {
            return Ok(0);
        }
        let intents = intents.to_vec();
        self.simple(move |c, _| session::delete_intents(c, &intents, owner))
            .await
    }

    async fn claim_expired(
        &self,
        now_ms: i64,
        owner: OwnerToken,
        lease_deadline_ms: i64,
        limit: usize,
    ) -> Result<Vec<Intent>, MetadataError> {
        self.run(move |c, _| {
            immediate(c, |c| {
                session::claim_expired(c, now_ms, owner, lease_deadline_ms, limit)
            })
        })
        .await
    }

    async fn record_failure(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        message: &str,
    ) -> Result<(), MetadataError> {
        let message = message.to_owned();
        self.simple(move |c, _| session::set_last_error(c, intent, owner, &message))
            .await
    }

    async fn referenced_points(
        &self,
        points: &[PointId],
    ) -> Result<HashSet<PointId>, MetadataError> {
        let points = points.to_vec();
        self.simple(move |c, _| session::referenced_points(c, &points))
            .await
    }

    async fn rows_by_points(&self, points: &[PointId]) -> Result<Vec<StoredRecord>, MetadataError> {
        let points = points.to_vec();
        // The read guard needs the rows, not their vectors.
        self.simple(move |c, _| session::rows_by_points(c, &points, false))
            .await
    }

    async fn get(&self, ids: &[RecordId]) -> Result<Vec<StoredRecord>, MetadataError> {
        let ids = ids.to_vec();
        self.simple(move |c, keep| session::get(c, &ids, keep))
            .await
    }

    async fn lookup_idempotency(
        &self,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, MetadataError> {
        let key = key.to_owned();
        self.simple(move |c, _| session::lookup_idempotency(c, &key))
            .await
    }

    async fn scan_refs(
        &self,
        scope: Option<&Scope>,
        after: Option<RecordId>,
        limit: usize,
    ) -> Result<Page<RowRef, RecordId>, MetadataError> {
        let scope = scope.cloned();
        self.simple(move |c, _| session::scan_refs(c, scope.as_ref(), after, limit))
            .await
    }

    async fn list_intents(&self, limit: usize) -> Result<Vec<Intent>, MetadataError> {
        self.simple(move |c, _| session::list_intents(c, limit))
            .await
    }

    async fn count_by_scope(&self) -> Result<BTreeMap<Scope, u64>, MetadataError> {
        self.simple(|c, _| session::count_by_scope(c)).await
    }

    fn deferred_indexing(&self) -> bool {
        true
    }

    /// Inside an immediate transaction, like recovery's claim: no other
    /// claimer (in this process or another) runs between its read and its
    /// update.
    async fn claim_pending(
        &self,
        now_ms: i64,
        claim: OwnerToken,
        claim_until_ms: i64,
        limit: usize,
    ) -> Result<Vec<PendingIndex>, MetadataError> {
        self.run(move |c, keep_vectors| {
            immediate(c, |c| {
                let mut tx = SyncTx { c, keep_vectors };
                futures::executor::block_on(steps::claim_pending(
                    &mut tx,
                    now_ms,
                    claim,
                    claim_until_ms,
                    limit,
                ))
            })
        })
        .await
    }

    async fn record_index_failure(
        &self,
        claim: OwnerToken,
        entries: &[(RecordId, u64)],
        failure: &IndexFailure,
    ) -> Result<usize, MetadataError> {
        if entries.is_empty() {
            return Ok(0);
        }
        let (entries, failure) = (entries.to_vec(), failure.clone());
        self.run(move |c, _| {
            immediate(c, |c| {
                session::record_index_failure(c, claim, &entries, &failure)
            })
        })
        .await
    }

    async fn list_pending(
        &self,
        filter: PendingFilter,
        after: Option<RecordId>,
        limit: usize,
    ) -> Result<Vec<PendingIndex>, MetadataError> {
        self.simple(move |c, _| session::list_pending(c, filter, after, limit))
            .await
    }

    async fn pending_for(&self, ids: &[RecordId]) -> Result<Vec<PendingIndex>, MetadataError> {
        let ids = ids.to_vec();
        self.simple(move |c, _| session::pending_for(c, &ids)).await
    }

    async fn retry_dead(&self, ids: Option<&[RecordId]>) -> Result<u64, MetadataError> {
        let ids = ids.map(<[RecordId]>::to_vec);
        self.simple(move |c, _| session::retry_dead(c, ids.as_deref()))
            .await
    }

    async fn drop_dead(&self, ids: Option<&[RecordId]>) -> Result<u64, MetadataError> {
        let ids = ids.map(<[RecordId]>::to_vec);
        self.simple(move |c, _| session::drop_dead(c, ids.as_deref()))
            .await
    }

    async fn pending_stats(&self, now_ms: i64) -> Result<PendingStats, MetadataError> {
        self.simple(move |c, _| session::pending_stats(c, now_ms))
            .await
    }

    fn reindexing(&self) -> bool {
        true
    }

    async fn index_state(&self) -> Result<IndexState, MetadataError> {
        self.simple(|c, _| reindex::index_state(c)).await
    }

    async fn reindex_begin(
        &self,
        spec: &MigrationSpec,
        owner: OwnerToken,
        now_ms: i64,
        lease_until_ms: i64,
    ) -> Result<IndexState, MetadataError> {
        let spec = spec.clone();
        self.run(move |c, keep_vectors| {
            immediate(c, |c| {
                let mut tx = SyncTx { c, keep_vectors };
                futures::executor::block_on(reindex_steps::begin(
                    &mut tx,
                    &spec,
                    owner,
                    now_ms,
                    lease_until_ms,
                ))
            })
        })
        .await
    }

    async fn reindex_scan(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ChangedRow>, MetadataError> {
        self.simple(move |c, keep| reindex::scan(c, after, limit, keep))
            .await
    }

    async fn reindex_garbage(&self, limit: usize) -> Result<Vec<PointId>, MetadataError> {
        self.simple(move |c, _| reindex::garbage(c, limit)).await
    }

    async fn reindex_progress(
        &self,
        owner: OwnerToken,
        cursor: u64,
        copied: u64,
        garbage: &[PointId],
        vectors: &[StagedVector],
        lease_until_ms: i64,
    ) -> Result<IndexState, MetadataError> {
        let garbage = garbage.to_vec();
        let vectors = vectors.to_vec();
        self.run(move |c, keep_vectors| {
            immediate(c, |c| {
                let mut tx = SyncTx { c, keep_vectors };
                futures::executor::block_on(reindex_steps::progress(
                    &mut tx,
                    owner,
                    cursor,
                    copied,
                    &garbage,
                    &vectors,
                    lease_until_ms,
                ))
            })
        })
        .await
    }

    async fn reindex_freeze(
        &self,
        owner: OwnerToken,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<u64, MetadataError> {
        self.run(move |c, keep_vectors| {
            immediate(c, |c| {
                let mut tx = SyncTx { c, keep_vectors };
                futures::executor::block_on(reindex_steps::freeze(&mut tx, owner, now_ms, until_ms))
            })
        })
        .await
    }

    async fn reindex_switch(
        &self,
        owner: OwnerToken,
        current: &str,
        now_ms: i64,
    ) -> Result<SwitchOutcome, MetadataError> {
        let current = current.to_owned();
        self.run(move |c, keep_vectors| {
            immediate(c, |c| {
                let mut tx = SyncTx { c, keep_vectors };
                futures::executor::block_on(reindex_steps::switch(&mut tx, owner, &current, now_ms))
            })
        })
        .await
    }

    async fn reindex_abort(
        &self,
        owner: Option<OwnerToken>,
    ) -> Result<Option<Migration>, MetadataError> {
        self.run(move |c, keep_vectors| {
            immediate(c, |c| {
                let mut tx = SyncTx { c, keep_vectors };
                futures::executor::block_on(reindex_steps::abort(&mut tx, owner))
            })
        })
        .await
    }

    async fn reindex_forget_retired(&self, name: &str) -> Result<bool, MetadataError> {
        let name = name.to_owned();
        self.run(move |c, keep_vectors| {
            immediate(c, |c| {
                let mut tx = SyncTx { c, keep_vectors };
                futures::executor::block_on(reindex_steps::forget_retired(&mut tx, &name))
            })
        })
        .await
    }
}
