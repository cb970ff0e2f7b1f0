//! [`PostgresMetadataRepo`]: the production [`MetadataRepo`] on PostgreSQL,
//! through diesel-async with a bb8 pool.
//!
//! - Tables live in a configurable schema ([`PostgresConfig::schema`]), created
//!   by embedded migrations ([`PostgresMetadataRepo::migrate`], or on start with
//!   [`PostgresConfig::migrate_on_start`]); every pooled connection has its
//!   `search_path` set to it.
//! - Every port method is one transaction with a constant number of round
//!   trips whatever the batch size: multi-row statements bind one array per
//!   column (`UNNEST`), rows are locked in id order, recovery claims with
//!   `FOR UPDATE SKIP LOCKED`, and `settle` locks the intent row so that it
//!   waits for a commit still landing.
//! - Failures are classified by SQLSTATE and by phase in [`error`]: only a
//!   failure while `COMMIT` is in flight has an unknown outcome, and
//!   [`MetadataRepo::settle`] learns it on a fresh connection. The SQLSTATE
//!   is the one the server sent, whatever the language of its messages:
//!   every connection records it off the wire ([`error::ServerErrors`]).
//!
//! See `docs/postgres.md`.

mod connect;
pub mod error;
mod journal;
mod migrate;
mod reindex;
mod session;
mod wire;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use tandem_core::{
    ChangedRow, ConnectionType, DeleteCommit, DeleteSelector, IdempotencyRecord, IndexFailure,
    IndexGate, Intent, IntentId, MetadataError, MetadataRepo, NewIntent, OwnerToken, Page,
    PendingFilter, PendingIndex, PendingStats, PointId, RecordId, RowRef, RowWrite, SagaCounts,
    SagaId, SagaRecord, SagaState, Scope, Settlement, StoredRecord, TransactionCommit,
    TransactionCommitResult, UndoImage, UpsertCommit,
};
use tandem_core::{IndexState, Migration, MigrationSpec, StagedVector, SwitchOutcome};

pub use self::connect::Connection;
use self::error::classify_connect;
use self::session::{PgConnector, PgPool, Session};
pub use crate::sql::SecretUrl;
use crate::sql::codec::validate_identifier;
use crate::sql::reindex as reindex_steps;
use crate::sql::steps;

/// How to reach and use the PostgreSQL metadata store.
///
/// `Debug` shows the URL with its password replaced by `***`.
#[derive(Clone, Debug, PartialEq)]
pub struct PostgresConfig {
    /// The connection string (`postgres://user:password@host:port/db?...` or
    /// libpq `key=value` form).
    pub url: SecretUrl,
    /// Most connections the pool opens.
    pub pool_size: u32,
    /// How long opening a connection, or waiting for a free one, may take.
    pub connect_timeout: Duration,
    /// A pooled connection idle at least this long is verified with a round
    /// trip (`SELECT 1`) before a call gets it; one used more recently is only
    /// checked locally (has the driver seen it close?). `Duration::ZERO`
    /// verifies every checkout, at one round trip per port call.
    pub verify_idle_after: Duration,
    /// The server's `statement_timeout` for every statement (none if `None`).
    pub statement_timeout: Option<Duration>,
    /// The server's `lock_timeout` for every lock wait (none if `None`).
    pub lock_timeout: Option<Duration>,
    /// The server's `idle_in_transaction_session_timeout`: a session of this
    /// repo left inside a transaction that long (its process frozen, or its
    /// connection lost without the server noticing) is ended, releasing its
    /// locks — which a settle or a claim may be waiting for. The adapter idles
    /// inside a transaction only in a gated commit, while the coordinator's
    /// index write is in flight (at most its `call_deadline`): keep this
    /// timeout above that deadline.
    pub idle_in_transaction_timeout: Option<Duration>,
    /// The schema holding Tandem's tables: lowercase ASCII letters, digits and
    /// `_`. Several applications can share a database with different schemas.
    pub schema: String,
    /// Whether rows keep their vectors (so `repair` can rewrite lost points).
    pub keep_vectors: bool,
    /// Whether [`PostgresMetadataRepo::connect`] applies pending migrations.
    pub migrate_on_start: bool,
    /// The `application_name` the server shows for these sessions.
    pub application_name: String,
}

impl PostgresConfig {
    /// Defaults for everything but the URL: pool of 10, 5 s connect timeout,
    /// connections idle 500 ms or more verified on checkout, no statement or lock timeout, 60 s idle-in-transaction timeout, schema
    /// `tandem`, vectors kept, no migration on start.
    pub fn new(url: impl Into<SecretUrl>) -> Self {
        Self {
            url: url.into(),
            pool_size: 10,
            connect_timeout: Duration::from_secs(5),
            verify_idle_after: Duration::from_millis(500),
            statement_timeout: None,
            lock_timeout: None,
            idle_in_transaction_timeout: Some(Duration::from_secs(60)),
            schema: "tandem".to_owned(),
            keep_vectors: true,
            migrate_on_start: false,
            application_name: "tandem".to_owned(),
        }
    }

    /// The same configuration with another schema.
    pub fn with_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The driver's configuration: the URL plus timeouts, application name
    /// and the `search_path`, set as startup options so that they hold from
    /// the session's first statement.
    fn driver_config(&self) -> Result<tokio_postgres::Config, MetadataError> {
        validate_identifier(&self.schema).map_err(config_error)?;
        if self.pool_size == 0 {
            return Err(config_error("pool_size must be at least 1".to_owned()));
        }
        if self.connect_timeout.is_zero() {
            return Err(config_error("connect_timeout must be positive".to_owned()));
        }
        let mut config: tokio_postgres::Config =
            self.url
                .expose()
                .parse()
                .map_err(|e: tokio_postgres::Error| {
                    // The parser's message names the offending option, never its value.
                    config_error(format!(
                        "invalid PostgreSQL URL {}: {e}",
                        self.url.redacted()
                    ))
                })?;
        connect::targets(&config).map_err(|e| {
            config_error(format!(
                "invalid PostgreSQL URL {}: {e}",
                self.url.redacted()
            ))
        })?;
        config.connect_timeout(self.connect_timeout);
        config.application_name(&self.application_name);
        // Every statement of the adapter reaches its rows through an index
        // (a key, a lease, a change sequence). Its statements stay prepared
        // per connection, and PostgreSQL freezes a generic plan after five
        // executions, costed for the table as it was then: planned while the
        // pending queue or the intents were nearly empty, a by-key delete
        // became a sequential scan, and stayed one while the queue grew to
        // 100,000 entries (every deferred write and every worker batch read
        // the whole queue). With sequential scans off the planner picks the
        // index whenever there is one, however small the table.
        //
        // Turned off, it leaves a statement that must scan (the one-row
        // index_state) costed above `jit_above_cost`, and PostgreSQL then
        // compiled it on every execution (100 ms each): JIT, made for long
        // analytical queries, is off too — the adapter runs none.
        //
        // Both first, so that the URL's own options can override them.
        let mut options = vec!["-c enable_seqscan=off -c jit=off".to_owned()];
        options.extend(config.get_options().map(str::to_owned));
        // The schema is a validated identifier: no quoting or escaping needed.
        options.push(format!("-c search_path={}", self.schema));
        if let Some(t) = self.statement_timeout {
            options.push(format!("-c statement_timeout={}", t.as_millis().max(1)));
        }
        if let Some(t) = self.lock_timeout {
            options.push(format!("-c lock_timeout={}", t.as_millis().max(1)));
        }
        if let Some(t) = self.idle_in_transaction_timeout {
            options.push(format!(
                "-c idle_in_transaction_session_timeout={}",
                t.as_millis().max(1)
            ));
        }
        config.options(options.join(" "));
        Ok(config)
    }
}

fn config_error(message: String) -> MetadataError {
    MetadataError::permanent(format!("PostgreSQL configuration: {message}"))
}

/// The production [`MetadataRepo`]: PostgreSQL through diesel-async.
pub struct PostgresMetadataRepo {
    pool: PgPool,
    config: PostgresConfig,
}

impl fmt::Debug for PostgresMetadataRepo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresMetadataRepo")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The pool's current size, for monitoring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolStatus {
    /// Open connections.
    pub connections: u32,
    /// Open connections not in use.
    pub idle: u32,
}

impl PostgresMetadataRepo {
    /// Builds the pool, checks that the server answers (so a wrong URL or a
    /// server that is down fails here, with a message naming PostgreSQL and
    /// no password), and migrates if [`PostgresConfig::migrate_on_start`].
    pub async fn connect(config: PostgresConfig) -> Result<Self, MetadataError> {
        let connector = PgConnector {
            config: config.driver_config()?,
        };
        let pool = PgPool::new(
            connector,
            config.pool_size,
            config.connect_timeout,
            config.verify_idle_after,
            "postgres",
        );
        let repo = Self { pool, config };
        if repo.config.migrate_on_start {
            repo.migrate().await?;
        } else {
            Session::open(&repo.pool, false).await?.done(Ok(()))?;
        }
        Ok(repo)
    }

    /// Creates the schema if needed and applies pending migrations (several
    /// processes may call this at once). Returns how many were applied.
    pub async fn migrate(&self) -> Result<usize, MetadataError> {
        let conn = self.pool.dedicated().await.map_err(classify_connect)?;
        migrate::run(conn, &self.config.schema).await
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &PostgresConfig {
        &self.config
    }

    /// How many connections the pool holds now.
    pub fn pool_status(&self) -> PoolStatus {
        let (connections, idle) = self.pool.status();
        PoolStatus { connections, idle }
    }

    async fn session(&self) -> Result<Session, MetadataError> {
        Session::open(&self.pool, self.config.keep_vectors).await
    }
}

#[async_trait]
impl MetadataRepo for PostgresMetadataRepo {
    async fn prepare(&self, intent: &NewIntent) -> Result<(), MetadataError> {
        let mut s = self.session().await?;
        let r = s.insert_intent(intent).await;
        s.done(r)
    }

    async fn commit_upsert(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        rows: &[RowWrite],
        idempotency: Option<&IdempotencyRecord>,
    ) -> Result<UpsertCommit, MetadataError> {
        let mut s = self.session().await?;
        s.begin();
        let r = steps::commit_upsert(&mut s, intent, owner, rows, idempotency).await;
        s.finish(r).await
    }

    /// The commit's statements run at once, inside a transaction held open
    /// while the index write is in flight; `COMMIT` is sent only after the gate
    /// passed (`ROLLBACK` if it failed).
    async fn commit_upsert_gated(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        rows: &[RowWrite],
        idempotency: Option<&IdempotencyRecord>,
        gate: &IndexGate,
    ) -> Result<UpsertCommit, MetadataError> {
        let mut s = self.session().await?;
        s.begin();
        let r = steps::commit_upsert(&mut s, intent, owner, rows, idempotency).await;
        let r = after_the_gate(&mut s, r, gate, intent).await;
        s.finish(r).await
    }

    async fn commit_delete(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        selector: &DeleteSelector,
        idempotency: Option<&IdempotencyRecord>,
    ) -> Result<DeleteCommit, MetadataError> {
        let mut s = self.session().await?;
        s.begin();
        let r = steps::commit_delete(&mut s, intent, owner, selector, idempotency).await;
        s.finish(r).await
    }

    fn commit_step_connection(&self) -> Option<ConnectionType> {
        Some(ConnectionType::of::<diesel_async::AsyncPgConnection>())
    }

    /// Like the gated upsert commit: the statements (and the caller's step)
    /// run at once, `COMMIT` waits for the gate.
    async fn commit_transaction(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        commit: &TransactionCommit<'_>,
        idempotency: Option<&IdempotencyRecord>,
        gate: &IndexGate,
    ) -> Result<TransactionCommitResult, MetadataError> {
        let mut s = self.session().await?;
        s.begin();
        let r = steps::commit_transaction(&mut s, intent, owner, commit, idempotency).await;
        let r = after_the_gate(&mut s, r, gate, intent).await;
        s.finish(r).await
    }

    async fn undo_images(&self, intent: IntentId) -> Result<Vec<UndoImage>, MetadataError> {
        let mut s = self.session().await?;
        let r = s.undo_images(intent).await;
        s.done(r)
    }

    async fn saga_save(
        &self,
        saga: &SagaRecord,
        fence: Option<OwnerToken>,
    ) -> Result<Vec<Intent>, MetadataError> {
        let mut s = self.session().await?;
        match fence {
            None => {
                let r = s.create_saga(saga).await.map(|()| Vec::new());
                s.done(r)
            }
            Some(fence) => {
                s.begin();
                let r = s.save_saga(saga, fence).await;
                s.finish(r).await
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
        let mut s = self.session().await?;
        let r = s.claim_sagas(now_ms, owner, lease_deadline_ms, limit).await;
        s.done(r)
    }

    async fn saga_take(
        &self,
        id: SagaId,
        owner: OwnerToken,
        lease_deadline_ms: i64,
    ) -> Result<Option<SagaRecord>, MetadataError> {
        let mut s = self.session().await?;
        let r = s.take_saga(id, owner, lease_deadline_ms).await;
        s.done(r)
    }

    async fn saga_get(&self, id: SagaId) -> Result<Option<SagaRecord>, MetadataError> {
        let mut s = self.session().await?;
        let r = s.get_saga(id).await;
        s.done(r)
    }

    async fn saga_list(
        &self,
        state: Option<SagaState>,
        limit: usize,
    ) -> Result<Vec<SagaRecord>, MetadataError> {
        let mut s = self.session().await?;
        let r = s.list_sagas(state, limit).await;
        s.done(r)
    }

    async fn saga_counts(&self) -> Result<SagaCounts, MetadataError> {
        let mut s = self.session().await?;
        let r = s.count_sagas().await;
        s.done(r)
    }

    async fn settle(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        fence: OwnerToken,
    ) -> Result<Settlement, MetadataError> {
        let mut s = self.session().await?;
        s.begin();
        let r = steps::settle(&mut s, intent, owner, fence).await;
        s.finish(r).await
    }

    async fn settle_unprepared(
        &self,
        intent: &NewIntent,
        owner: OwnerToken,
        fence: OwnerToken,
    ) -> Result<Settlement, MetadataError> {
        let mut s = self.session().await?;
        s.begin();
        let r = steps::settle_unprepared(&mut s, intent, owner, fence).await;
        s.finish(r).await
    }

    async fn resolve(&self, intent: IntentId, owner: OwnerToken) -> Result<bool, MetadataError> {
        let mut s = self.session().await?;
        let r = s.delete_intent(intent, owner).await;
        s.done(r)
    }

    async fn resolve_many(
        &self,
        intents: &[IntentId],
        owner: OwnerToken,
    ) -> Result<usize, MetadataError> {
        if intents.is_empty() {
            return Ok(0);
        }
        let mut s = self.session().await?;
        let r = s.delete_intents(intents, owner).await;
        s.done(r)
    }

    async fn claim_expired(
        &self,
        now_ms: i64,
        owner: OwnerToken,
        lease_deadline_ms: i64,
        limit: usize,
    ) -> Result<Vec<Intent>, MetadataError> {
        let mut s = self.session().await?;
        let r = s
            .claim_expired(now_ms, owner, lease_deadline_ms, limit)
            .await;
        s.done(r)
    }

    async fn record_failure(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        message: &str,
    ) -> Result<(), MetadataError> {
        let mut s = self.session().await?;
        let r = s.set_last_error(intent, owner, message).await;
        s.done(r)
    }

    async fn referenced_points(
        &self,
        points: &[PointId],
    ) -> Result<HashSet<PointId>, MetadataError> {
        let mut s = self.session().await?;
        let r = s.referenced_points(points).await;
        s.done(r)
    }

    async fn rows_by_points(&self, points: &[PointId]) -> Result<Vec<StoredRecord>, MetadataError> {
        let mut s = self.session().await?;
        let r = s.rows_by_points(points).await;
        s.done(r)
    }

    async fn get(&self, ids: &[RecordId]) -> Result<Vec<StoredRecord>, MetadataError> {
        let mut s = self.session().await?;
        let r = s.get(ids).await;
        s.done(r)
    }

    async fn lookup_idempotency(
        &self,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, MetadataError> {
        let mut s = self.session().await?;
        let r = s.lookup_idempotency(key).await;
        s.done(r)
    }

    async fn scan_refs(
        &self,
        scope: Option<&Scope>,
        after: Option<RecordId>,
        limit: usize,
    ) -> Result<Page<RowRef, RecordId>, MetadataError> {
        let mut s = self.session().await?;
        let r = s.scan_refs(scope, after, limit).await;
        s.done(r)
    }

    async fn list_intents(&self, limit: usize) -> Result<Vec<Intent>, MetadataError> {
        let mut s = self.session().await?;
        let r = s.list_intents(limit).await;
        s.done(r)
    }

    async fn count_by_scope(&self) -> Result<BTreeMap<Scope, u64>, MetadataError> {
        let mut s = self.session().await?;
        let r = s.count_by_scope().await;
        s.done(r)
    }

    fn deferred_indexing(&self) -> bool {
        true
    }

    /// One transaction: the oldest claimable entries `FOR UPDATE SKIP
    /// LOCKED` (so N workers in any number of processes never take the same
    /// entry nor wait for each other), stale ones removed, the rest marked.
    async fn claim_pending(
        &self,
        now_ms: i64,
        claim: OwnerToken,
        claim_until_ms: i64,
        limit: usize,
    ) -> Result<Vec<PendingIndex>, MetadataError> {
        let mut s = self.session().await?;
        s.begin();
        let r = steps::claim_pending(&mut s, now_ms, claim, claim_until_ms, limit).await;
        s.finish(r).await
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
        let mut s = self.session().await?;
        s.begin();
        let r = s.record_index_failure(claim, entries, failure).await;
        s.finish(r).await
    }

    async fn list_pending(
        &self,
        filter: PendingFilter,
        after: Option<RecordId>,
        limit: usize,
    ) -> Result<Vec<PendingIndex>, MetadataError> {
        let mut s = self.session().await?;
        let r = s.list_pending(filter, after, limit).await;
        s.done(r)
    }

    async fn pending_for(&self, ids: &[RecordId]) -> Result<Vec<PendingIndex>, MetadataError> {
        let mut s = self.session().await?;
        let r = s.pending_for(ids).await;
        s.done(r)
    }

    async fn retry_dead(&self, ids: Option<&[RecordId]>) -> Result<u64, MetadataError> {
        let mut s = self.session().await?;
        let r = s.retry_dead(ids).await;
        s.done(r)
    }

    async fn drop_dead(&self, ids: Option<&[RecordId]>) -> Result<u64, MetadataError> {
        let mut s = self.session().await?;
        let r = s.drop_dead(ids).await;
        s.done(r)
    }

    async fn pending_stats(&self, now_ms: i64) -> Result<PendingStats, MetadataError> {
        let mut s = self.session().await?;
        let r = s.pending_stats(now_ms).await;
        s.done(r)
    }

    fn reindexing(&self) -> bool {
        true
    }

    async fn index_state(&self) -> Result<IndexState, MetadataError> {
        let mut s = self.session().await?;
        let r = s.index_state().await;
        s.done(r)
    }

    /// One transaction: the state `FOR UPDATE` (so a concurrent prepare
    /// either lands first, and is fenced, or sees the migration), the
    /// garbage cleared and the prepared intents fenced.
    async fn reindex_begin(
        &self,
        spec: &MigrationSpec,
        owner: OwnerToken,
        now_ms: i64,
        lease_until_ms: i64,
    ) -> Result<IndexState, MetadataError> {
        let mut s = self.session().await?;
        s.begin();
        let r = reindex_steps::begin(&mut s, spec, owner, now_ms, lease_until_ms).await;
        s.finish(r).await
    }

    /// Three statements: the last change sequence handed out, a wait for the
    /// commits that may still hold one below it, then the rows up to it (see
    /// `docs/postgres.md`, *Re-indexing*).
    async fn reindex_scan(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ChangedRow>, MetadataError> {
        let mut s = self.session().await?;
        let r = s.reindex_scan(after, limit).await;
        s.done(r)
    }

    async fn reindex_garbage(&self, limit: usize) -> Result<Vec<PointId>, MetadataError> {
        let mut s = self.session().await?;
        let r = s.reindex_garbage(limit).await;
        s.done(r)
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
        let mut s = self.session().await?;
        s.begin();
        let r = reindex_steps::progress(
            &mut s,
            owner,
            cursor,
            copied,
            garbage,
            vectors,
            lease_until_ms,
        )
        .await;
        s.finish(r).await
    }

    async fn reindex_freeze(
        &self,
        owner: OwnerToken,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<u64, MetadataError> {
        let mut s = self.session().await?;
        s.begin();
        let r = reindex_steps::freeze(&mut s, owner, now_ms, until_ms).await;
        s.finish(r).await
    }

    async fn reindex_switch(
        &self,
        owner: OwnerToken,
        current: &str,
        now_ms: i64,
    ) -> Result<SwitchOutcome, MetadataError> {
        let mut s = self.session().await?;
        s.begin();
        let r = reindex_steps::switch(&mut s, owner, current, now_ms).await;
        s.finish(r).await
    }

    async fn reindex_abort(
        &self,
        owner: Option<OwnerToken>,
    ) -> Result<Option<Migration>, MetadataError> {
        let mut s = self.session().await?;
        s.begin();
        let r = reindex_steps::abort(&mut s, owner).await;
        s.finish(r).await
    }

    async fn reindex_forget_retired(&self, name: &str) -> Result<bool, MetadataError> {
        let mut s = self.session().await?;
        s.begin();
        let r = reindex_steps::forget_retired(&mut s, name).await;
        s.finish(r).await
    }
}

/// A gated commit's body done: waits for the index write it must follow.
/// While that write is still in flight, the statements queued for `COMMIT`
/// go out now, so that their work (an index switch's update of every row)
/// overlaps the write instead of following it; once it has ended they stay
/// queued, one round trip with `COMMIT`.
async fn after_the_gate<T>(
    s: &mut Session,
    body: Result<T, MetadataError>,
    gate: &IndexGate,
    intent: IntentId,
) -> Result<T, MetadataError> {
    let value = body?;
    if !gate.is_decided() {
        s.send_queued().await?;
    }
    if gate.wait().await {
        Ok(value)
    } else {
        Err(MetadataError::Aborted { intent })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_password() {
        let c = PostgresConfig::new("postgres://app:hunter2@db:5432/x");
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("app:***@db"), "{shown}");
    }

    #[test]
    fn schema_name_is_validated() {
        let c = PostgresConfig::new("postgres://u@h/db").with_schema("x; drop table y");
        let err = c.driver_config().unwrap_err();
        assert!(matches!(err, MetadataError::Permanent { .. }), "{err}");
    }

    #[test]
    fn startup_options_carry_schema_and_timeouts() {
        let mut c = PostgresConfig::new("postgres://u:secret@h/db?options=-c%20work_mem%3D4MB")
            .with_schema("tenant_a");
        c.statement_timeout = Some(Duration::from_millis(1500));
        c.lock_timeout = Some(Duration::from_millis(200));
        let d = c.driver_config().unwrap();
        assert_eq!(
            d.get_options(),
            Some(
                "-c enable_seqscan=off -c jit=off -c work_mem=4MB -c search_path=tenant_a \
                 -c statement_timeout=1500 \
                 -c lock_timeout=200 -c idle_in_transaction_session_timeout=60000"
            )
        );
        assert_eq!(d.get_application_name(), Some("tandem"));
    }

    #[test]
    fn bad_url_error_hides_the_password() {
        let c = PostgresConfig::new("postgres://u:secret@h:notaport/db");
        let err = c.driver_config().unwrap_err().to_string();
        assert!(!err.contains("secret"), "{err}");
    }
}
