//! Pooled sessions: the connection manager, the transaction guard, and every
//! statement the adapter runs.

use std::collections::{BTreeMap, HashMap, HashSet};

use async_trait::async_trait;
use diesel::QueryableByName;
use diesel::pg::Pg;
use diesel::query_builder::{BoxedSqlQuery, SqlQuery};
use diesel::sql_types::{
    Array, BigInt, Bool, Bytea, Integer, Jsonb, Nullable, Text, Uuid as SqlUuid,
};
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use futures::FutureExt;
use futures::future::{BoxFuture, OptionFuture};
use serde_json::Value;
use tandem_core::{
    CommitStep, CommitSummary, DeleteSelector, IdempotencyRecord, IndexFailure, Intent, IntentId,
    IntentState, MetadataError, NewIntent, OwnerToken, Page, PendingFilter, PendingIndex,
    PendingStats, PointId, RecordId, RowRef, RowWrite, SagaId, SagaState, Scope, StoredRecord,
    UndoImage,
};
use uuid::Uuid;

use super::connect::{Connection, open};
use super::error::{ConnectError, Phase, ServerErrors, classify_checkout};
use crate::sql::codec::{
    IdempotencyRow, IntentRow, PendingRow, RecordRow, UndoRow, corrupt, encode_vector, page_limit,
    pending_filter, step_failed, summary_columns, to_i64, to_u64,
};
use crate::sql::pool::{Checkout, Connector, Pool};
use crate::sql::prepared::{Prepared, PreparedExt};
use crate::sql::reindex::check_generation;
use crate::sql::steps::{ACTIVITY_KEEP_S, PendingState, TxOps};

/// Opens connections that record their server errors' SQLSTATEs
/// ([`super::connect`]), through tokio-postgres directly (so connection
/// failures keep their SQLSTATE too), and hands them to diesel-async.
#[derive(Clone)]
pub(crate) struct PgConnector {
    pub(crate) config: tokio_postgres::Config,
}

impl Connector for PgConnector {
    type Conn = Connection;
    type Error = ConnectError;

    async fn connect(&self) -> Result<Connection, ConnectError> {
        open(&self.config).await
    }

    async fn check(&self, conn: &mut Connection) -> Result<(), ConnectError> {
        conn.batch_execute("SELECT 1")
            .await
            .map_err(|source| ConnectError::Check {
                code: conn.errors().sqlstate(&source),
                source,
            })
    }

    fn is_closed(&self, conn: &mut Connection) -> bool {
        // The driver's connection task has seen the socket close (server
        // shutdown, terminated backend, reset), or diesel's transaction
        // manager is broken.
        diesel_async::pooled_connection::PoolableConnection::is_broken(&mut **conn)
    }
}

pub(crate) type PgPool = Pool<PgConnector>;

/// Where a session is with its transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tx {
    /// No transaction (single-statement calls).
    None,
    /// [`Session::begin`] was called; `BEGIN` goes out with the first
    /// statement.
    Pending,
    /// `BEGIN` was sent.
    Open,
}

/// One port call's use of a pooled connection.
pub(crate) struct Session {
    conn: Checkout<PgConnector>,
    pub(super) keep_vectors: bool,
    tx: Tx,
    /// The ids whose existing rows the transaction's first statement also
    /// locks, pipelined with it ([`TxOps::lock_ahead`]).
    ahead: Option<Vec<Uuid>>,
    /// What that lock found: the ids it asked for, and those that exist
    /// (taken by `lock_existing`).
    locked_ahead: Option<(Vec<Uuid>, HashSet<Uuid>)>,
    /// The transaction's statements whose result nothing waits for, with how
    /// their failure is told: they go out pipelined with `COMMIT` (see
    /// [`Session::finish`]), or before any later statement
    /// ([`Session::in_tx`]).
    queued: Vec<(Statement, Told)>,
}

/// How a queued statement's failure is told.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Told {
    /// As any statement's.
    Statement,
    /// As the insert of new records ([`Session::insert_failed`]).
    NewRecords,
    /// As the insert of this idempotency key: taken if it exists.
    Key(String),
}

impl Session {
    pub(crate) async fn open(pool: &PgPool, keep_vectors: bool) -> Result<Self, MetadataError> {
        let conn = pool.checkout().await.map_err(classify_checkout)?;
        Ok(Self {
            conn,
            keep_vectors,
            tx: Tx::None,
            ahead: None,
            locked_ahead: None,
            queued: Vec::new(),
        })
    }

    pub(super) fn c(&mut self) -> &mut AsyncPgConnection {
        debug_assert!(
            self.queued.is_empty(),
            "a statement would overtake queued ones: go through `in_tx`"
        );
        self.conn.conn()
    }

    /// The connection's record of server errors, for classifying.
    fn errors(&mut self) -> &ServerErrors {
        self.conn.conn().errors()
    }

    /// A failed statement inside a transaction (or a read).
    pub(super) fn stmt(&mut self, e: diesel::result::Error) -> MetadataError {
        self.errors().classify(e, Phase::Statement)
    }

    /// A failed single-statement write outside a transaction: its reply is
    /// its commit's.
    pub(super) fn autocommit(&mut self, e: diesel::result::Error) -> MetadataError {
        self.errors().classify(e, Phase::Commit)
    }

    /// The call is over and the connection is idle again.
    pub(crate) fn done<T>(mut self, result: Result<T, MetadataError>) -> Result<T, MetadataError> {
        if result.is_ok() {
            self.conn.release();
        }
        result
    }

    /// Starts a transaction. `BEGIN` is not sent yet: it goes out pipelined
    /// with the transaction's first statement (see [`Session::lock_intent`]),
    /// saving a round trip; any other first statement sends it first.
    pub(crate) fn begin(&mut self) {
        self.tx = Tx::Pending;
    }

    /// Sends a pending `BEGIN` on its own, and any queued statements, before
    /// a statement that must run inside the transaction (after them).
    pub(super) async fn in_tx(&mut self) -> Result<(), MetadataError> {
        self.open_tx().await?;
        self.send_queued().await
    }

    /// Sends a pending `BEGIN` on its own, leaving the queue as it is.
    async fn open_tx(&mut self) -> Result<(), MetadataError> {
        if self.tx == Tx::Pending {
            self.c()
                .batch_execute("BEGIN")
                .await
                .map_err(|e| self.stmt(e))?;
            self.tx = Tx::Open;
        }
        Ok(())
    }

    /// Sends the queued statements now, in one round trip, rather than with
    /// `COMMIT`: before another statement, or while the transaction waits
    /// for something else (the index write of a gated commit), so that their
    /// work is done by then.
    pub(crate) async fn send_queued(&mut self) -> Result<(), MetadataError> {
        if self.queued.is_empty() {
            return Ok(());
        }
        match self.run_queued(false).await {
            (Some((e, how)), _) => Err(self.told(e, how)),
            (None, _) => Ok(()),
        }
    }

    /// Sends the queued statements, then `COMMIT` if `commit`, in one
    /// pipeline (in order, as `lock_intent` explains). Returns the first
    /// failure with how to tell it — the ones after it only say that the
    /// transaction was aborted — and the `COMMIT`'s answer.
    async fn run_queued(
        &mut self,
        commit: bool,
    ) -> (
        Option<(diesel::result::Error, Told)>,
        Option<diesel::QueryResult<usize>>,
    ) {
        let (statements, told): (Vec<Statement>, Vec<Told>) =
            std::mem::take(&mut self.queued).into_iter().unzip();
        let conn: &AsyncPgConnection = self.c();
        let statements =
            futures::future::join_all(statements.into_iter().map(|q| q.execute(&mut &*conn)));
        let commit: OptionFuture<_> = commit
            .then(|| diesel::sql_query("COMMIT").prepared().execute(&mut &*conn))
            .into();
        let (results, commit) = futures::join!(statements, commit);
        let failed = results
            .into_iter()
            .zip(told)
            .find_map(|(r, how)| r.err().map(|e| (e, how)));
        (failed, commit)
    }

    /// Queues a statement of the transaction whose result nothing waits for
    /// (it can only fail with a server error or a lost connection): it goes
    /// out with `COMMIT`, one round trip for both, or before a later
    /// statement that is not queued. It joins the statements queued before
    /// it rather than sending them (that would cost a round trip for
    /// nothing); only a pending `BEGIN` goes out first.
    async fn queue(&mut self, statement: Statement, told: Told) -> Result<(), MetadataError> {
        self.open_tx().await?;
        self.queued.push((statement, told));
        Ok(())
    }

    /// A queued statement's failure, told as `how` says.
    fn told(&mut self, e: diesel::result::Error, how: Told) -> MetadataError {
        match how {
            Told::Statement => self.stmt(e),
            Told::NewRecords => self.insert_failed(e),
            Told::Key(key) => match e {
                diesel::result::Error::DatabaseError(
                    diesel::result::DatabaseErrorKind::UniqueViolation,
                    ref info,
                ) if info.constraint_name() == Some("idempotency_keys_pkey") => {
                    MetadataError::IdempotencyKeyTaken { key }
                }
                e => self.stmt(e),
            },
        }
    }

    /// Opens the pending transaction with its first statement: `BEGIN`,
    /// `first` and the lock ahead ([`TxOps::lock_ahead`]), if any, in one
    /// round trip and in that order. Keeps what the lock ahead found for
    /// `lock_existing`.
    async fn begin_with<T: Send>(
        &mut self,
        first: impl for<'c> FnOnce(&'c AsyncPgConnection) -> BoxFuture<'c, diesel::QueryResult<T>>,
    ) -> Result<T, MetadataError> {
        let ahead = self.ahead.take();
        let conn: &AsyncPgConnection = self.c();
        let begin = diesel::sql_query("BEGIN").prepared().execute(&mut &*conn);
        let first = first(conn);
        let rows: OptionFuture<_> = ahead
            .clone()
            .map(|ids| lock_existing_query(ids).load::<PgId>(&mut &*conn))
            .into();
        let (began, first, rows) = futures::join!(begin, first, rows);
        began.map_err(|e| self.stmt(e))?;
        self.tx = Tx::Open;
        let first = first.map_err(|e| self.stmt(e))?;
        if let (Some(ids), Some(rows)) = (ahead, rows) {
            let found = rows.map_err(|e| self.stmt(e))?;
            self.locked_ahead = Some((ids, found.into_iter().map(|r| r.id).collect()));
        }
        Ok(first)
    }

    /// Commits after a body that succeeded (a failure of COMMIT itself may have
    /// an unknown outcome); rolls back after one that failed.
    pub(crate) async fn finish<T>(
        mut self,
        result: Result<T, MetadataError>,
    ) -> Result<T, MetadataError> {
        if self.tx != Tx::Open {
            // No statement ran, so there is no transaction to end.
            return self.done(result);
        }
        match result {
            Ok(value) if self.queued.is_empty() => {
                let committed = self
                    .c()
                    .batch_execute("COMMIT")
                    .await
                    .map(|()| value)
                    .map_err(|e| self.errors().classify(e, Phase::Commit));
                self.done(committed)
            }
            Ok(value) => {
                // The queued statements and `COMMIT`, pipelined. A queued
                // statement that failed aborted the transaction, and a
                // `COMMIT` that answered then rolled back: that failure is
                // the answer, as a statement's. Without the `COMMIT`'s answer
                // (a lost connection), the outcome is the `COMMIT`'s: unknown.
                let committed = match self.run_queued(true).await {
                    (Some((e, how)), Some(Ok(_))) => Err(self.told(e, how)),
                    (Some((e, _)), _) | (None, Some(Err(e))) => {
                        Err(self.errors().classify(e, Phase::Commit))
                    }
                    (None, _) => Ok(value),
                };
                self.done(committed)
            }
            Err(e) => {
                // Whatever was queued goes with the transaction.
                self.queued.clear();
                // A failed ROLLBACK leaves the connection dirty: it is discarded,
                // and the server rolls back the dead session anyway.
                let rolled_back = self.c().batch_execute("ROLLBACK").await;
                if rolled_back.is_ok() {
                    self.conn.release();
                }
                Err(e)
            }
        }
    }
}

#[derive(QueryableByName)]
pub(super) struct PgRecord {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = Text)]
    scope: String,
    #[diesel(sql_type = Text)]
    content: String,
    #[diesel(sql_type = Jsonb)]
    metadata: Value,
    #[diesel(sql_type = SqlUuid)]
    point_id: Uuid,
    #[diesel(sql_type = BigInt)]
    version: i64,
    #[diesel(sql_type = Nullable<Bytea>)]
    vector: Option<Vec<u8>>,
}

impl PgRecord {
    pub(super) fn into_record(self, keep_vectors: bool) -> Result<StoredRecord, MetadataError> {
        RecordRow {
            id: self.id,
            scope: self.scope,
            content: self.content,
            metadata: self.metadata,
            point_id: self.point_id,
            version: self.version,
            vector: self.vector,
        }
        .into_record(keep_vectors)
    }
}

#[derive(QueryableByName)]
pub(super) struct PgIntent {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = Text)]
    kind: String,
    #[diesel(sql_type = Text)]
    state: String,
    #[diesel(sql_type = SqlUuid)]
    owner: Uuid,
    #[diesel(sql_type = BigInt)]
    lease_deadline_ms: i64,
    #[diesel(sql_type = Array<SqlUuid>)]
    point_ids: Vec<Uuid>,
    #[diesel(sql_type = Nullable<BigInt>)]
    inserted: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    updated: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    deleted: Option<i64>,
    #[diesel(sql_type = Integer)]
    attempts: i32,
    #[diesel(sql_type = Nullable<Text>)]
    last_error: Option<String>,
    #[diesel(sql_type = BigInt)]
    created_ms: i64,
}

impl PgIntent {
    pub(super) fn into_intent(self) -> Result<Intent, MetadataError> {
        IntentRow {
            id: self.id,
            kind: self.kind,
            state: self.state,
            owner: self.owner,
            lease_deadline_ms: self.lease_deadline_ms,
            point_ids: self.point_ids,
            inserted: self.inserted,
            updated: self.updated,
            deleted: self.deleted,
            attempts: self.attempts,
            last_error: self.last_error,
            created_ms: self.created_ms,
        }
        .into_intent()
    }
}

#[derive(QueryableByName)]
struct PgClaimed {
    #[diesel(embed)]
    intent: PgIntent,
    #[diesel(sql_type = BigInt)]
    old_lease: i64,
    #[diesel(sql_type = BigInt)]
    seq: i64,
}

#[derive(QueryableByName)]
struct PgPending {
    #[diesel(sql_type = SqlUuid)]
    record_id: Uuid,
    #[diesel(sql_type = BigInt)]
    version: i64,
    #[diesel(sql_type = BigInt)]
    indexed_version: i64,
    // Read from the entry's row: never NULL (the type is the column's).
    #[diesel(sql_type = Nullable<Text>)]
    scope: Option<String>,
    #[diesel(sql_type = Nullable<Jsonb>)]
    metadata: Option<Value>,
    #[diesel(sql_type = Nullable<Bytea>)]
    vector: Option<Vec<u8>>,
    #[diesel(sql_type = BigInt)]
    enqueued_ms: i64,
    #[diesel(sql_type = Integer)]
    attempts: i32,
    #[diesel(sql_type = Nullable<Text>)]
    last_error: Option<String>,
    #[diesel(sql_type = Bool)]
    dead: bool,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    claimed_by: Option<Uuid>,
    #[diesel(sql_type = Nullable<BigInt>)]
    claim_until_ms: Option<i64>,
}

impl PgPending {
    fn into_pending(self) -> Result<PendingIndex, MetadataError> {
        PendingRow {
            record_id: self.record_id,
            version: self.version,
            indexed_version: self.indexed_version,
            scope: self.scope,
            metadata: self.metadata,
            vector: self.vector,
            enqueued_ms: self.enqueued_ms,
            attempts: self.attempts,
            last_error: self.last_error,
            dead: self.dead,
            claimed_by: self.claimed_by,
            claim_until_ms: self.claim_until_ms,
        }
        .into_pending()
    }
}

/// A row as an index switch locks it ([`lock_switch_rows_query`]).
#[derive(QueryableByName)]
struct PgSwitchRow {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    point_id: Uuid,
    #[diesel(sql_type = BigInt)]
    version: i64,
    #[diesel(sql_type = BigInt)]
    indexed_version: i64,
    #[diesel(sql_type = Bool)]
    pending: bool,
    #[diesel(sql_type = Bool)]
    dead: bool,
}

/// A claim as an index switch locks it ([`lock_claims_query`]).
#[derive(QueryableByName)]
struct PgClaim {
    #[diesel(sql_type = SqlUuid)]
    record_id: Uuid,
    #[diesel(sql_type = BigInt)]
    version: i64,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    claimed_by: Option<Uuid>,
}

#[derive(QueryableByName)]
struct PgCount {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct PgCandidate {
    #[diesel(embed)]
    entry: PgPending,
    #[diesel(sql_type = Nullable<BigInt>)]
    row_version: Option<i64>,
}

#[derive(QueryableByName)]
struct PgVersion {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    point_id: Uuid,
    #[diesel(sql_type = BigInt)]
    version: i64,
}

impl PgVersion {
    fn into_version(self) -> Result<(RecordId, PointId, u64), MetadataError> {
        Ok((
            RecordId(self.id),
            PointId(self.point_id),
            to_u64(self.version, "version")?,
        ))
    }
}

/// The rows' versions and points, and the pending entries' states (an entry
/// at its row's version, with the claim at that version), of a switch's
/// locked rows and claims.
#[allow(clippy::type_complexity)]
fn switch_states(
    rows: Vec<PgSwitchRow>,
    claims: Vec<PgClaim>,
) -> Result<(Vec<(RecordId, PointId, u64)>, Vec<PendingState>), MetadataError> {
    let claims: HashMap<Uuid, PgClaim> = claims.into_iter().map(|c| (c.record_id, c)).collect();
    let mut versions = Vec::with_capacity(rows.len());
    let mut states = Vec::with_capacity(rows.len());
    for r in rows {
        let version = to_u64(r.version, "version")?;
        versions.push((RecordId(r.id), PointId(r.point_id), version));
        if r.pending {
            states.push(PendingState {
                record_id: RecordId(r.id),
                version,
                indexed_version: to_u64(r.indexed_version, "indexed_version")?,
                dead: r.dead,
                claimed_by: claims
                    .get(&r.id)
                    .filter(|c| c.version == r.version)
                    .and_then(|c| c.claimed_by)
                    .map(OwnerToken),
            });
        }
    }
    Ok((versions, states))
}

/// The existing rows among `ids` (as `lock_existing` asks), locked in id
/// order.
fn lock_existing_query(ids: Vec<Uuid>) -> Statement {
    diesel::sql_query("SELECT id FROM records WHERE id = ANY($1) ORDER BY id FOR UPDATE")
        .into_boxed()
        .bind::<Array<SqlUuid>, _>(ids)
        .prepared()
}

/// The version and point of the existing records among `ids`, locked in id
/// order.
fn lock_versions_query(ids: &[RecordId]) -> Statement {
    diesel::sql_query(
        "SELECT id, point_id, version FROM records WHERE id = ANY($1) ORDER BY id FOR UPDATE",
    )
    .into_boxed()
    .bind::<Array<SqlUuid>, _>(uuids(ids, |i| i.0))
    .prepared()
}

/// What an index switch locks first: the rows of `ids` with their versions,
/// points and pending entries' state, in id order.
fn lock_switch_rows_query(ids: &[RecordId]) -> Statement {
    diesel::sql_query(
        "SELECT id, point_id, version, COALESCE(indexed_version, 0) AS indexed_version, \
             pending_ms IS NOT NULL AS pending, pending_dead AS dead \
         FROM records WHERE id = ANY($1) ORDER BY id FOR UPDATE",
    )
    .into_boxed()
    .bind::<Array<SqlUuid>, _>(uuids(ids, |i| i.0))
    .prepared()
}

/// Then the claims of `ids`, locked in id order (after the rows, as on
/// every path).
fn lock_claims_query(ids: &[RecordId]) -> Statement {
    diesel::sql_query(
        "SELECT record_id, version, claimed_by FROM pending_claims \
         WHERE record_id = ANY($1) ORDER BY record_id FOR UPDATE",
    )
    .into_boxed()
    .bind::<Array<SqlUuid>, _>(uuids(ids, |i| i.0))
    .prepared()
}

#[derive(QueryableByName)]
struct PgNewVersion {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = BigInt)]
    version: i64,
}

#[derive(QueryableByName)]
struct PgGeneration {
    #[diesel(sql_type = BigInt)]
    generation: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    frozen_until_ms: Option<i64>,
}

#[derive(QueryableByName)]
struct PgFailed {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = Bool)]
    dead: bool,
}

#[derive(QueryableByName)]
struct PgPendingStats {
    #[diesel(sql_type = BigInt)]
    pending: i64,
    #[diesel(sql_type = BigInt)]
    claimed: i64,
    #[diesel(sql_type = BigInt)]
    dead: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    oldest: Option<i64>,
    #[diesel(sql_type = BigInt)]
    indexed: i64,
}

/// Column arrays of pending entries for `UNNEST` (`put_pending`: an entry's
/// scope and metadata are its row's, so they are not among them).
struct PendingColumns {
    ids: Vec<Uuid>,
    versions: Vec<i64>,
    indexed: Vec<i64>,
    vectors: Vec<Option<Vec<u8>>>,
    enqueued: Vec<i64>,
    attempts: Vec<i32>,
    errors: Vec<Option<String>>,
    dead: Vec<bool>,
    claimed_by: Vec<Option<Uuid>>,
    claim_until: Vec<Option<i64>>,
}

impl PendingColumns {
    fn new(rows: Vec<PendingRow>) -> Self {
        let mut cols = Self {
            ids: Vec::with_capacity(rows.len()),
            versions: Vec::with_capacity(rows.len()),
            indexed: Vec::with_capacity(rows.len()),
            vectors: Vec::with_capacity(rows.len()),
            enqueued: Vec::with_capacity(rows.len()),
            attempts: Vec::with_capacity(rows.len()),
            errors: Vec::with_capacity(rows.len()),
            dead: Vec::with_capacity(rows.len()),
            claimed_by: Vec::with_capacity(rows.len()),
            claim_until: Vec::with_capacity(rows.len()),
        };
        for r in rows {
            cols.ids.push(r.record_id);
            cols.versions.push(r.version);
            cols.indexed.push(r.indexed_version);
            cols.vectors.push(r.vector);
            cols.enqueued.push(r.enqueued_ms);
            cols.attempts.push(r.attempts);
            cols.errors.push(r.last_error);
            cols.dead.push(r.dead);
            cols.claimed_by.push(r.claimed_by);
            cols.claim_until.push(r.claim_until_ms);
        }
        cols
    }
}

/// A pending entry, read from its record's row `r` (which holds it: see
/// [`PENDING_FROM`]) and the row's claim `c` (attempts, last error, claim
/// or back-off), if it has one at the row's version. Only for rows with
/// `r.pending_ms IS NOT NULL`: every query using it says so.
const PENDING_COLUMNS: &str = "r.id AS record_id, r.version, r.indexed_version, r.scope, \
                               r.metadata, COALESCE(r.pending_vector, r.vector) AS vector, \
                               r.pending_ms AS enqueued_ms, COALESCE(c.attempts, 0) AS attempts, \
                               c.last_error, r.pending_dead AS dead, c.claimed_by, \
                               c.claim_until_ms";

/// The rows `r` with their claims `c`, for [`PENDING_COLUMNS`]. A claim
/// left behind by a newer write (at an older version) does not count.
const PENDING_FROM: &str = "records AS r LEFT JOIN pending_claims AS c \
                            ON c.record_id = r.id AND c.version = r.version";

#[derive(QueryableByName)]
pub(super) struct PgSagaOwner {
    #[diesel(sql_type = SqlUuid)]
    pub(super) owner: Uuid,
    #[diesel(sql_type = Text)]
    pub(super) state: String,
}

#[derive(QueryableByName)]
struct PgRef {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = SqlUuid)]
    point_id: Uuid,
}

#[derive(QueryableByName)]
struct PgPoint {
    #[diesel(sql_type = SqlUuid)]
    point_id: Uuid,
}

#[derive(QueryableByName)]
struct PgId {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
}

#[derive(QueryableByName)]
struct PgScanRow {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = Text)]
    scope: String,
    #[diesel(sql_type = SqlUuid)]
    point_id: Uuid,
    #[diesel(sql_type = BigInt)]
    version: i64,
}

#[derive(QueryableByName)]
struct PgScopeCount {
    #[diesel(sql_type = Text)]
    scope: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct PgIdempotency {
    #[diesel(sql_type = Text)]
    key: String,
    #[diesel(sql_type = Text)]
    request_hash: String,
    #[diesel(sql_type = Jsonb)]
    outcome: Value,
    #[diesel(sql_type = BigInt)]
    inserted: i64,
    #[diesel(sql_type = BigInt)]
    updated: i64,
    #[diesel(sql_type = BigInt)]
    deleted: i64,
}

pub(super) const INTENT_COLUMNS: &str = "id, kind, state, owner, lease_deadline_ms, point_ids, inserted, \
                              updated, deleted, attempts, last_error, created_ms";

/// The record columns; `$1` says whether to return the vector.
pub(super) const RECORD_COLUMNS: &str = "id, scope, content, metadata, point_id, version, \
                              CASE WHEN $1 THEN vector END AS vector";

pub(super) fn uuids<T: Copy>(items: &[T], f: impl Fn(T) -> Uuid) -> Vec<Uuid> {
    items.iter().map(|x| f(*x)).collect()
}

/// Column arrays for `UNNEST`: one bind per column, whatever the batch size.
struct RowColumns {
    ids: Vec<Uuid>,
    scopes: Vec<String>,
    contents: Vec<String>,
    metadata: Vec<Value>,
    points: Vec<Uuid>,
    vectors: Vec<Option<Vec<u8>>>,
}

impl RowColumns {
    fn new(rows: &[&RowWrite], keep_vectors: bool) -> Self {
        Self {
            ids: rows.iter().map(|r| r.id.0).collect(),
            scopes: rows.iter().map(|r| r.scope.as_str().to_owned()).collect(),
            contents: rows.iter().map(|r| r.content.clone()).collect(),
            metadata: rows
                .iter()
                .map(|r| Value::Object(r.metadata.clone()))
                .collect(),
            points: rows.iter().map(|r| r.point_id.0).collect(),
            vectors: rows
                .iter()
                .map(|r| keep_vectors.then(|| encode_vector(&r.vector)))
                .collect(),
        }
    }

    /// Binds the columns as `$1`–`$6`, the arrays [`UNNEST_ROWS`] reads.
    fn bind(
        self,
        query: BoxedSqlQuery<'static, Pg, SqlQuery>,
    ) -> BoxedSqlQuery<'static, Pg, SqlQuery> {
        query
            .bind::<Array<SqlUuid>, _>(self.ids)
            .bind::<Array<Text>, _>(self.scopes)
            .bind::<Array<Text>, _>(self.contents)
            .bind::<Array<Jsonb>, _>(self.metadata)
            .bind::<Array<SqlUuid>, _>(self.points)
            .bind::<Array<Nullable<Bytea>>, _>(self.vectors)
    }
}

/// An `UPDATE records AS r … FROM … AS t` assignment: a row whose point
/// changes takes a new change sequence, above every other row's (see
/// `reindex_scan`); one that keeps its point keeps its sequence.
const RAISE_CHANGE_SEQ: &str = "change_seq = CASE WHEN r.point_id = t.point_id \
                                THEN r.change_seq ELSE nextval('records_change_seq') END";

/// An `UPDATE records` assignment: the row's pending entry is gone (a
/// synchronous write or an index switch settled it).
const CLEAR_PENDING: &str = "pending_ms = NULL, indexed_version = NULL, pending_vector = NULL, \
                             pending_dead = false";

const UNNEST_ROWS: &str = "UNNEST($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::uuid[], \
                           $6::bytea[]) AS t(id, scope, content, metadata, point_id, vector)";

/// A statement built at run time from one of the constant texts below.
type Statement = Prepared<BoxedSqlQuery<'static, Pg, SqlQuery>>;

/// The plain insert of new records at version 1, in id order: the rows'
/// order, which the caller sorted by id (`unnest` reads an array out in
/// storage order, and the insert takes its input's order). An `ORDER BY`
/// copied every row, vectors included, into a sort that changed nothing.
fn insert_new_records(new: &[&RowWrite], keep_vectors: bool) -> Statement {
    debug_assert!(
        new.windows(2).all(|w| w[0].id < w[1].id),
        "rows in id order"
    );
    RowColumns::new(new, keep_vectors)
        .bind(
            diesel::sql_query(format!(
                "INSERT INTO records (id, scope, content, metadata, point_id, version, vector) \
                 SELECT t.id, t.scope, t.content, t.metadata, t.point_id, 1, t.vector \
                 FROM {UNNEST_ROWS}"
            ))
            .into_boxed(),
        )
        .prepared()
}

/// A deferred write's insert of new records: version 1, each with its
/// pending entry on the row (enqueued at `now_ms`, never indexed; the
/// vector in `pending_vector` when the rows keep none), in id order (see
/// [`insert_new_records`]).
fn insert_deferred_records(new: &[&RowWrite], now_ms: i64, keep_vectors: bool) -> Statement {
    debug_assert!(
        new.windows(2).all(|w| w[0].id < w[1].id),
        "rows in id order"
    );
    RowColumns::new(new, true)
        .bind(
            diesel::sql_query(format!(
                "INSERT INTO records (id, scope, content, metadata, point_id, version, vector, \
                     pending_ms, indexed_version, pending_vector) \
                 SELECT t.id, t.scope, t.content, t.metadata, t.point_id, 1, \
                     CASE WHEN $7 THEN t.vector END, $8, 0, \
                     CASE WHEN $7 THEN NULL ELSE t.vector END \
                 FROM {UNNEST_ROWS}"
            ))
            .into_boxed(),
        )
        .bind::<Bool, _>(keep_vectors)
        .bind::<BigInt, _>(now_ms)
        .prepared()
}

impl Session {
    /// The rows of `rows` (ascending id order) that exist, locked in id
    /// order; returns the others, to be inserted. (`ON CONFLICT … DO UPDATE
    /// … WHERE false` did both in one statement, but its speculative
    /// insertion made a 1000-row insert a third slower than a plain one.)
    async fn lock_existing<'r>(
        &mut self,
        rows: &[&'r RowWrite],
    ) -> Result<Vec<&'r RowWrite>, MetadataError> {
        let ids: Vec<Uuid> = rows.iter().map(|r| r.id.0).collect();
        let existing: HashSet<Uuid> = match self.locked_ahead.take() {
            // Locked by the transaction's first round trip: still so.
            Some((asked, found)) if asked == ids => found,
            _ => {
                // After what is queued before it, as every statement.
                self.in_tx().await?;
                lock_existing_query(ids)
                    .load::<PgId>(self.c())
                    .await
                    .map_err(|e| self.stmt(e))?
                    .into_iter()
                    .map(|r| r.id)
                    .collect()
            }
        };
        Ok(rows
            .iter()
            .copied()
            .filter(|r| !existing.contains(&r.id.0))
            .collect())
    }

    /// A failed insert of new records. A unique violation of the key means
    /// another transaction inserted one of them after `lock_existing` looked
    /// (the insert waited for it to commit): this transaction fails and
    /// writes nothing; a retry finds the row and locks it.
    fn insert_failed(&mut self, e: diesel::result::Error) -> MetadataError {
        match e {
            diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::UniqueViolation,
                info,
            ) if info.constraint_name() == Some("records_pkey") => {
                MetadataError::transient(format!(
                    "a concurrent write inserted a record of this batch first ({}); \
                     nothing was written",
                    info.message()
                ))
            }
            e => self.stmt(e),
        }
    }
}

#[async_trait]
impl TxOps for Session {
    fn lock_ahead(&mut self, ids: &[RecordId]) {
        if self.tx == Tx::Pending {
            self.ahead = Some(uuids(ids, |i| i.0));
        }
    }

    async fn lock_intent(&mut self, id: IntentId) -> Result<Option<Intent>, MetadataError> {
        let lock = diesel::sql_query(format!(
            "SELECT {INTENT_COLUMNS} FROM intents WHERE id = $1 FOR UPDATE"
        ))
        .bind::<SqlUuid, _>(id.0)
        .prepared();
        let rows: Vec<PgIntent> = if self.tx == Tx::Pending {
            // Pipelined: `BEGIN` and the lock go out together, one round trip.
            // The server runs them in the order they were sent, and they are
            // sent in the order their futures are first polled (`join!` polls
            // in order): diesel-async sends a statement from its first poll,
            // and when it must prepare one first it holds the connection's
            // statement-cache lock (a FIFO tokio mutex) until the statement
            // has been sent, so a later statement cannot overtake it. The
            // lock is therefore always taken inside the transaction (the
            // `postgres_overlap` suite checks it on a fresh connection, whose
            // cache is empty, and on a warm one).
            // The rows locked ahead, if any, come third.
            self.begin_with(|conn| lock.load::<PgIntent>(&mut &*conn).boxed())
                .await?
        } else {
            self.in_tx().await?;
            lock.load(self.c()).await.map_err(|e| self.stmt(e))?
        };
        rows.into_iter()
            .next()
            .map(PgIntent::into_intent)
            .transpose()
    }

    async fn create_intent(&mut self, intent: &NewIntent) -> Result<bool, MetadataError> {
        // The unique key makes this wait for a transaction inserting the same
        // intent, then do nothing if that one committed.
        let insert = diesel::sql_query(
            "INSERT INTO intents (id, kind, state, owner, lease_deadline_ms, point_ids, \
             attempts, created_ms) VALUES ($1, $2, 'prepared', $3, $4, $5, 0, $6) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind::<SqlUuid, _>(intent.id.0)
        .bind::<Text, _>(intent.kind.as_str())
        .bind::<SqlUuid, _>(intent.owner.0)
        .bind::<BigInt, _>(intent.lease_deadline_ms)
        .bind::<Array<SqlUuid>, _>(uuids(&intent.point_ids, |p| p.0))
        .bind::<BigInt, _>(intent.created_ms)
        .prepared();
        let inserted = if self.tx == Tx::Pending {
            // Pipelined with `BEGIN`, one round trip (see `lock_intent`),
            // and the rows locked ahead, if any.
            self.begin_with(|conn| insert.execute(&mut &*conn).boxed())
                .await?
        } else {
            self.in_tx().await?;
            insert.execute(self.c()).await.map_err(|e| self.stmt(e))?
        };
        Ok(inserted == 1)
    }

    async fn lock_records(
        &mut self,
        ids: &[RecordId],
    ) -> Result<Vec<(RecordId, PointId)>, MetadataError> {
        self.in_tx().await?;
        let rows: Vec<PgRef> = diesel::sql_query(
            "SELECT id, point_id FROM records WHERE id = ANY($1) ORDER BY id FOR UPDATE",
        )
        .bind::<Array<SqlUuid>, _>(uuids(ids, |i| i.0))
        .prepared()
        .load(self.c())
        .await
        .map_err(|e| self.stmt(e))?;
        Ok(rows
            .into_iter()
            .map(|r| (RecordId(r.id), PointId(r.point_id)))
            .collect())
    }

    async fn insert_or_lock(&mut self, rows: &[&RowWrite]) -> Result<Vec<RecordId>, MetadataError> {
        self.in_tx().await?;
        let new = self.lock_existing(rows).await?;
        if new.is_empty() {
            return Ok(Vec::new());
        }
        let inserted = insert_new_records(&new, self.keep_vectors)
            .execute(self.c())
            .await;
        inserted.map_err(|e| self.insert_failed(e))?;
        Ok(new.iter().map(|r| r.id).collect())
    }

    /// Like `insert_or_lock`, each new record with its first entry on its
    /// row, the insert queued: it goes out with the next statement (or
    /// `COMMIT`), in one round trip (the server runs them in the order they
    /// are sent; if one fails, the transaction is aborted and the next ones
    /// fail too).
    async fn insert_deferred(
        &mut self,
        rows: &[&RowWrite],
        now_ms: i64,
    ) -> Result<Vec<RecordId>, MetadataError> {
        let new = self.lock_existing(rows).await?;
        if new.is_empty() {
            return Ok(Vec::new());
        }
        // Nothing reads their results: they go out with the transaction's
        // next statement, or with its `COMMIT` (a batch of new records
        // only), and a failure fails that one.
        self.queue(
            insert_deferred_records(&new, now_ms, self.keep_vectors),
            Told::NewRecords,
        )
        .await?;
        Ok(new.iter().map(|r| r.id).collect())
    }

    async fn update_records(&mut self, rows: &[&RowWrite]) -> Result<u64, MetadataError> {
        self.in_tx().await?;
        let n = RowColumns::new(rows, self.keep_vectors)
            .bind(
                diesel::sql_query(format!(
                    "UPDATE records AS r SET scope = t.scope, content = t.content, \
                     metadata = t.metadata, point_id = t.point_id, vector = t.vector, \
                     version = r.version + 1, updated_at = now(), {RAISE_CHANGE_SEQ}, \
                     {CLEAR_PENDING} \
                     FROM {UNNEST_ROWS} WHERE r.id = t.id"
                ))
                .into_boxed(),
            )
            .prepared()
            .execute(self.c())
            .await
            .map_err(|e| self.stmt(e))?;
        Ok(n as u64)
    }

    async fn lock_selected(
        &mut self,
        selector: &DeleteSelector,
    ) -> Result<Vec<(RecordId, PointId)>, MetadataError> {
        self.in_tx().await?;
        let query = match selector {
            DeleteSelector::Ids(ids) => {
                let mut ids = uuids(ids, |i| i.0);
                ids.sort_unstable();
                ids.dedup();
                diesel::sql_query(
                    "SELECT id, point_id FROM records WHERE id = ANY($1) ORDER BY id FOR UPDATE",
                )
                .bind::<Array<SqlUuid>, _>(ids)
                .prepared()
                .load::<PgRef>(self.c())
                .await
            }
            DeleteSelector::Scope(scope) => {
                diesel::sql_query(
                    "SELECT id, point_id FROM records WHERE scope = $1 ORDER BY id FOR UPDATE",
                )
                .bind::<Text, _>(scope.as_str())
                .prepared()
                .load::<PgRef>(self.c())
                .await
            }
            DeleteSelector::MetadataEq { scope, key, value } => {
                diesel::sql_query(
                    "SELECT id, point_id FROM records WHERE scope = $1 AND metadata -> $2 = $3 \
                     ORDER BY id FOR UPDATE",
                )
                .bind::<Text, _>(scope.as_str())
                .bind::<Text, _>(key.as_str())
                .bind::<Jsonb, _>(value)
                .prepared()
                .load::<PgRef>(self.c())
                .await
            }
        };
        Ok(query
            .map_err(|e| self.stmt(e))?
            .into_iter()
            .map(|r| (RecordId(r.id), PointId(r.point_id)))
            .collect())
    }

    async fn delete_records(&mut self, ids: &[RecordId]) -> Result<u64, MetadataError> {
        self.in_tx().await?;
        let n = diesel::sql_query("DELETE FROM records WHERE id = ANY($1)")
            .bind::<Array<SqlUuid>, _>(uuids(ids, |i| i.0))
            .prepared()
            .execute(self.c())
            .await
            .map_err(|e| self.stmt(e))?;
        Ok(n as u64)
    }

    async fn mark_committed(
        &mut self,
        id: IntentId,
        point_ids: &[PointId],
        summary: CommitSummary,
        state: IntentState,
        release_at_ms: Option<i64>,
    ) -> Result<(), MetadataError> {
        let (inserted, updated, deleted) = summary_columns(summary)?;
        // The commit's last statement (the intent is locked or was created
        // by this transaction, so it updates one row): it goes out with
        // `COMMIT`.
        let mark = diesel::sql_query(
            "UPDATE intents SET state = $6, point_ids = $2, inserted = $3, \
             updated = $4, deleted = $5, lease_deadline_ms = COALESCE($7, lease_deadline_ms) \
             WHERE id = $1",
        )
        .into_boxed()
        .bind::<SqlUuid, _>(id.0)
        .bind::<Array<SqlUuid>, _>(uuids(point_ids, |p| p.0))
        .bind::<BigInt, _>(inserted)
        .bind::<BigInt, _>(updated)
        .bind::<BigInt, _>(deleted)
        .bind::<Text, _>(state.as_str())
        .bind::<Nullable<BigInt>, _>(release_at_ms)
        .prepared();
        self.queue(mark, Told::Statement).await?;
        Ok(())
    }

    async fn lock_versions(
        &mut self,
        ids: &[RecordId],
    ) -> Result<Vec<(RecordId, PointId, u64)>, MetadataError> {
        self.in_tx().await?;
        lock_versions_query(ids)
            .load::<PgVersion>(self.c())
            .await
            .map_err(|e| self.stmt(e))?
            .into_iter()
            .map(PgVersion::into_version)
            .collect()
    }

    async fn defer_update(
        &mut self,
        rows: &[&RowWrite],
        now_ms: i64,
    ) -> Result<Vec<(RecordId, u64)>, MetadataError> {
        self.in_tx().await?;
        let cols = RowColumns::new(rows, true);
        // The rows are locked already (insert_or_lock); the point stays. The
        // entry on the row is enqueued or coalesced (the SET expressions read
        // the row as it was): a waiting entry, at the row's previous version,
        // keeps when it was enqueued and which version the row's point holds;
        // otherwise the point holds the previous version. Dead-lettering is
        // undone; a claim or back-off at the previous version stops counting.
        let updated: Vec<PgNewVersion> = diesel::sql_query(
            "UPDATE records AS r SET scope = t.scope, content = t.content, \
             metadata = t.metadata, vector = CASE WHEN $6 THEN t.vector END, \
             version = r.version + 1, updated_at = now(), \
             pending_ms = COALESCE(r.pending_ms, $7), \
             indexed_version = COALESCE(r.indexed_version, r.version), \
             pending_vector = CASE WHEN $6 THEN NULL ELSE t.vector END, pending_dead = false \
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::bytea[]) \
                 AS t(id, scope, content, metadata, vector) \
             WHERE r.id = t.id RETURNING r.id, r.version",
        )
        .bind::<Array<SqlUuid>, _>(cols.ids)
        .bind::<Array<Text>, _>(cols.scopes)
        .bind::<Array<Text>, _>(cols.contents)
        .bind::<Array<Jsonb>, _>(cols.metadata)
        .bind::<Array<Nullable<Bytea>>, _>(cols.vectors)
        .bind::<Bool, _>(self.keep_vectors)
        .bind::<BigInt, _>(now_ms)
        .prepared()
        .load(self.c())
        .await
        .map_err(|e| self.stmt(e))?;
        updated
            .into_iter()
            .map(|r| Ok((RecordId(r.id), to_u64(r.version, "version")?)))
            .collect()
    }

    async fn switch_points(
        &mut self,
        switches: &[(RecordId, PointId)],
    ) -> Result<(), MetadataError> {
        // The rows are locked already (lock_for_switch); only an index
        // switch repoints rows, and it indexes their entries, which go with
        // it. Nothing reads the result: it goes out with the next statement
        // or `COMMIT`.
        let switch = diesel::sql_query(format!(
            "UPDATE records AS r SET point_id = t.point_id, updated_at = now(), \
             {RAISE_CHANGE_SEQ}, {CLEAR_PENDING} \
             FROM UNNEST($1::uuid[], $2::uuid[]) AS t(id, point_id) WHERE r.id = t.id"
        ))
        .into_boxed()
        .bind::<Array<SqlUuid>, _>(switches.iter().map(|(id, _)| id.0).collect::<Vec<_>>())
        .bind::<Array<SqlUuid>, _>(switches.iter().map(|(_, p)| p.0).collect::<Vec<_>>())
        .prepared();
        self.queue(switch, Told::Statement).await?;
        Ok(())
    }

    async fn lock_pending(&mut self, ids: &[RecordId]) -> Result<Vec<PendingIndex>, MetadataError> {
        self.in_tx().await?;
        // The callers have locked the rows (which hold the entries).
        let rows: Vec<PgPending> = diesel::sql_query(format!(
            "SELECT {PENDING_COLUMNS} FROM {PENDING_FROM} \
             WHERE r.id = ANY($1) AND r.pending_ms IS NOT NULL ORDER BY r.id FOR UPDATE OF r"
        ))
        .bind::<Array<SqlUuid>, _>(uuids(ids, |i| i.0))
        .prepared()
        .load(self.c())
        .await
        .map_err(|e| self.stmt(e))?;
        rows.into_iter().map(PgPending::into_pending).collect()
    }

    async fn lock_for_switch(
        &mut self,
        ids: &[RecordId],
    ) -> Result<(Vec<(RecordId, PointId, u64)>, Vec<PendingState>), MetadataError> {
        self.in_tx().await?;
        // Both locks in one round trip, rows first (the order every path
        // locks in; see `lock_intent` for why the order holds).
        let conn: &AsyncPgConnection = self.c();
        let rows = lock_switch_rows_query(ids).load::<PgSwitchRow>(&mut &*conn);
        let claims = lock_claims_query(ids).load::<PgClaim>(&mut &*conn);
        let (rows, claims) = futures::join!(rows, claims);
        let rows = rows.map_err(|e| self.stmt(e))?;
        let claims = claims.map_err(|e| self.stmt(e))?;
        switch_states(rows, claims)
    }

    async fn delete_pending(&mut self, ids: &[RecordId]) -> Result<(), MetadataError> {
        // The entries on the rows and their claims. Nothing reads the
        // result: it goes out with the next statement or `COMMIT` (after the
        // rows' locks, as on every path).
        let delete = diesel::sql_query(format!(
            "WITH gone AS (DELETE FROM pending_claims WHERE record_id = ANY($1)) \
             UPDATE records SET {CLEAR_PENDING} WHERE id = ANY($1) AND pending_ms IS NOT NULL"
        ))
        .into_boxed()
        .bind::<Array<SqlUuid>, _>(uuids(ids, |i| i.0))
        .prepared();
        self.queue(delete, Told::Statement).await?;
        Ok(())
    }

    async fn supersede_pending(&mut self, _ids: &[RecordId]) -> Result<(), MetadataError> {
        // `update_records` cleared the updated rows' entries, inserted rows
        // have none, and a claim left at an older version no longer counts
        // (the next claim overwrites it; a delete removes it).
        Ok(())
    }

    async fn finish_index(
        &mut self,
        ids: &[RecordId],
        shard: i32,
        now_ms: i64,
    ) -> Result<(), MetadataError> {
        let bucket = PendingStats::rate_bucket(now_ms);
        // One statement: the claims (`switch_points` cleared the entries on
        // the rows), the shard's old seconds, and the count added to the
        // current second. Nothing reads its result: it
        // goes out with the next statement or `COMMIT`.
        let finish = diesel::sql_query(
            "WITH done AS (DELETE FROM pending_claims WHERE record_id = ANY($1)), \
                  old AS (DELETE FROM index_activity WHERE shard = $2 AND bucket_s < $4) \
             INSERT INTO index_activity (bucket_s, shard, indexed) VALUES ($3, $2, $5) \
             ON CONFLICT (shard, bucket_s) \
             DO UPDATE SET indexed = index_activity.indexed + excluded.indexed",
        )
        .into_boxed()
        .bind::<Array<SqlUuid>, _>(uuids(ids, |i| i.0))
        .bind::<Integer, _>(shard)
        .bind::<BigInt, _>(bucket)
        .bind::<BigInt, _>(bucket - ACTIVITY_KEEP_S)
        .bind::<BigInt, _>(ids.len() as i64)
        .prepared();
        self.queue(finish, Told::Statement).await?;
        Ok(())
    }

    async fn enqueue_pending(&mut self, entries: &[PendingIndex]) -> Result<(), MetadataError> {
        // `defer_update` enqueued the entries on the rows it updated (a new
        // record's goes out with its insert: `insert_deferred`).
        let _ = entries;
        Ok(())
    }

    async fn put_pending(&mut self, entries: &[PendingIndex]) -> Result<(), MetadataError> {
        self.in_tx().await?;
        // Each entry on its row, if the row is at the entry's version (its
        // content is the row's: a restore writes both from one image), and
        // its attempts, last error and claim, if any, beside it.
        let cols = PendingColumns::new(
            entries
                .iter()
                .map(PendingRow::of)
                .collect::<Result<_, _>>()?,
        );
        let keep = self.keep_vectors;
        let conn: &AsyncPgConnection = self.c();
        let rows = diesel::sql_query(
            "UPDATE records AS r SET pending_ms = t.enqueued, indexed_version = t.indexed, \
                 pending_vector = CASE WHEN $6 THEN NULL ELSE t.vector END, pending_dead = t.dead \
             FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[], $4::bytea[], $5::bigint[], \
                 $7::boolean[]) AS t(id, version, indexed, vector, enqueued, dead) \
             WHERE r.id = t.id AND r.version = t.version",
        )
        .bind::<Array<SqlUuid>, _>(cols.ids.clone())
        .bind::<Array<BigInt>, _>(cols.versions.clone())
        .bind::<Array<BigInt>, _>(cols.indexed)
        .bind::<Array<Nullable<Bytea>>, _>(cols.vectors)
        .bind::<Array<BigInt>, _>(cols.enqueued)
        .bind::<Bool, _>(keep)
        .bind::<Array<Bool>, _>(cols.dead)
        .prepared()
        .execute(&mut &*conn);
        let claims = diesel::sql_query(
            "INSERT INTO pending_claims (record_id, version, attempts, last_error, claimed_by, \
                 claim_until_ms) \
             SELECT * FROM UNNEST($1::uuid[], $2::bigint[], $3::integer[], $4::text[], \
                 $5::uuid[], $6::bigint[]) AS t(id, version, attempts, last_error, claimed_by, \
                 claim_until) \
             WHERE t.attempts > 0 OR t.last_error IS NOT NULL OR t.claimed_by IS NOT NULL \
                 OR t.claim_until IS NOT NULL \
             ON CONFLICT (record_id) DO UPDATE SET version = excluded.version, \
                 attempts = excluded.attempts, last_error = excluded.last_error, \
                 claimed_by = excluded.claimed_by, claim_until_ms = excluded.claim_until_ms",
        )
        .bind::<Array<SqlUuid>, _>(cols.ids)
        .bind::<Array<BigInt>, _>(cols.versions)
        .bind::<Array<Integer>, _>(cols.attempts)
        .bind::<Array<Nullable<Text>>, _>(cols.errors)
        .bind::<Array<Nullable<SqlUuid>>, _>(cols.claimed_by)
        .bind::<Array<Nullable<BigInt>>, _>(cols.claim_until)
        .prepared()
        .execute(&mut &*conn);
        let (rows, claims) = futures::join!(rows, claims);
        rows.map_err(|e| self.stmt(e))?;
        claims.map_err(|e| self.stmt(e))?;
        Ok(())
    }

    async fn claim_candidates(
        &mut self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<(PendingIndex, Option<u64>)>, MetadataError> {
        self.in_tx().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // Oldest first through records_pending_idx, stopping at `limit`.
        // SKIP LOCKED: rows another worker is claiming, or a commit is
        // writing, are left to them, so concurrent claims (in any process)
        // never take the same entry and never wait for each other. An entry
        // is on its row, so it is always at its row's version. A claim that
        // committed after this statement's snapshot is not seen here: the
        // mark (`mark_claimed`) leaves such entries out.
        let rows: Vec<PgCandidate> = diesel::sql_query(format!(
            "SELECT {PENDING_COLUMNS}, r.version AS row_version \
             FROM {PENDING_FROM} \
             WHERE r.pending_ms IS NOT NULL AND NOT r.pending_dead \
                 AND (c.claim_until_ms IS NULL OR c.claim_until_ms < $1) \
             ORDER BY r.pending_dead, r.pending_ms, r.id LIMIT $2 \
             FOR UPDATE OF r SKIP LOCKED"
        ))
        .bind::<BigInt, _>(now_ms)
        .bind::<BigInt, _>(limit)
        .prepared()
        .load(self.c())
        .await
        .map_err(|e| self.stmt(e))?;
        rows.into_iter()
            .map(|r| {
                let row = r.row_version.map(|v| to_u64(v, "version")).transpose()?;
                Ok((r.entry.into_pending()?, row))
            })
            .collect()
    }

    async fn mark_claimed(
        &mut self,
        ids: &[RecordId],
        claim: OwnerToken,
        claim_until_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<RecordId>, MetadataError> {
        self.in_tx().await?;
        // The claim at each row's version: a claim left at an older version
        // is overwritten (attempts from 0); one at this version keeps its
        // attempts and error, and is taken over only if it ended by `now_ms`
        // (the unique key waits for, then sees, any claim that committed
        // since the candidates were read).
        let marked: Vec<PgId> = diesel::sql_query(
            "INSERT INTO pending_claims AS c (record_id, version, claimed_by, claim_until_ms) \
             SELECT r.id, r.version, $2, $3 FROM records AS r WHERE r.id = ANY($1) \
             ON CONFLICT (record_id) DO UPDATE SET \
                 attempts = CASE WHEN c.version = excluded.version THEN c.attempts ELSE 0 END, \
                 last_error = CASE WHEN c.version = excluded.version THEN c.last_error END, \
                 version = excluded.version, claimed_by = excluded.claimed_by, \
                 claim_until_ms = excluded.claim_until_ms \
             WHERE c.version <> excluded.version OR c.claim_until_ms IS NULL \
                 OR c.claim_until_ms < $4 \
             RETURNING c.record_id AS id",
        )
        .bind::<Array<SqlUuid>, _>(uuids(ids, |i| i.0))
        .bind::<SqlUuid, _>(claim.0)
        .bind::<BigInt, _>(claim_until_ms)
        .bind::<BigInt, _>(now_ms)
        .prepared()
        .load(self.c())
        .await
        .map_err(|e| self.stmt(e))?;
        Ok(marked.into_iter().map(|r| RecordId(r.id)).collect())
    }

    async fn lock_rows_full(
        &mut self,
        ids: &[RecordId],
    ) -> Result<Vec<StoredRecord>, MetadataError> {
        self.in_tx().await?;
        let keep = self.keep_vectors;
        let rows: Vec<PgRecord> = diesel::sql_query(format!(
            "SELECT {RECORD_COLUMNS} FROM records WHERE id = ANY($2) ORDER BY id FOR UPDATE"
        ))
        .bind::<Bool, _>(keep)
        .bind::<Array<SqlUuid>, _>(uuids(ids, |i| i.0))
        .prepared()
        .load(self.c())
        .await
        .map_err(|e| self.stmt(e))?;
        rows.into_iter().map(|r| r.into_record(keep)).collect()
    }

    async fn write_rows_exact(&mut self, rows: &[StoredRecord]) -> Result<(), MetadataError> {
        self.in_tx().await?;
        let keep = self.keep_vectors;
        let versions = rows
            .iter()
            .map(|r| to_i64(r.version, "version"))
            .collect::<Result<Vec<i64>, _>>()?;
        diesel::sql_query(
            "INSERT INTO records (id, scope, content, metadata, point_id, version, vector) \
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::uuid[], \
                 $6::bigint[], $7::bytea[]) \
             ON CONFLICT (id) DO UPDATE SET scope = excluded.scope, content = excluded.content, \
                 metadata = excluded.metadata, point_id = excluded.point_id, \
                 version = excluded.version, vector = excluded.vector, updated_at = now(), \
                 change_seq = CASE WHEN records.point_id = excluded.point_id \
                     THEN records.change_seq ELSE excluded.change_seq END",
        )
        .bind::<Array<SqlUuid>, _>(rows.iter().map(|r| r.id.0).collect::<Vec<_>>())
        .bind::<Array<Text>, _>(
            rows.iter()
                .map(|r| r.scope.as_str().to_owned())
                .collect::<Vec<_>>(),
        )
        .bind::<Array<Text>, _>(rows.iter().map(|r| r.content.clone()).collect::<Vec<_>>())
        .bind::<Array<Jsonb>, _>(
            rows.iter()
                .map(|r| Value::Object(r.metadata.clone()))
                .collect::<Vec<_>>(),
        )
        .bind::<Array<SqlUuid>, _>(rows.iter().map(|r| r.point_id.0).collect::<Vec<_>>())
        .bind::<Array<BigInt>, _>(versions)
        .bind::<Array<Nullable<Bytea>>, _>(
            rows.iter()
                .map(|r| r.vector.as_deref().filter(|_| keep).map(encode_vector))
                .collect::<Vec<_>>(),
        )
        .prepared()
        .execute(self.c())
        .await
        .map_err(|e| self.stmt(e))?;
        Ok(())
    }

    async fn save_undo(&mut self, id: IntentId, images: &[UndoImage]) -> Result<(), MetadataError> {
        self.in_tx().await?;
        let rows = images
            .iter()
            .map(|i| UndoRow::of(i, self.keep_vectors))
            .collect::<Result<Vec<_>, _>>()?;
        diesel::sql_query(
            "INSERT INTO intent_undo (intent_id, record_id, scope, content, metadata, point_id, \
                 version, vector, after_version, pending) \
             SELECT $1, * FROM UNNEST($2::uuid[], $3::text[], $4::text[], $5::jsonb[], \
                 $6::uuid[], $7::bigint[], $8::bytea[], $9::bigint[], $10::jsonb[]) \
             ON CONFLICT DO NOTHING",
        )
        .bind::<SqlUuid, _>(id.0)
        .bind::<Array<SqlUuid>, _>(rows.iter().map(|r| r.record_id).collect::<Vec<_>>())
        .bind::<Array<Nullable<Text>>, _>(rows.iter().map(|r| r.scope.clone()).collect::<Vec<_>>())
        .bind::<Array<Nullable<Text>>, _>(
            rows.iter().map(|r| r.content.clone()).collect::<Vec<_>>(),
        )
        .bind::<Array<Nullable<Jsonb>>, _>(
            rows.iter().map(|r| r.metadata.clone()).collect::<Vec<_>>(),
        )
        .bind::<Array<Nullable<SqlUuid>>, _>(rows.iter().map(|r| r.point_id).collect::<Vec<_>>())
        .bind::<Array<Nullable<BigInt>>, _>(rows.iter().map(|r| r.version).collect::<Vec<_>>())
        .bind::<Array<Nullable<Bytea>>, _>(
            rows.iter().map(|r| r.vector.clone()).collect::<Vec<_>>(),
        )
        .bind::<Array<Nullable<BigInt>>, _>(
            rows.iter().map(|r| r.after_version).collect::<Vec<_>>(),
        )
        .bind::<Array<Nullable<Jsonb>>, _>(
            rows.iter().map(|r| r.pending.clone()).collect::<Vec<_>>(),
        )
        .prepared()
        .execute(self.c())
        .await
        .map_err(|e| self.stmt(e))?;
        Ok(())
    }

    async fn lock_saga(
        &mut self,
        id: SagaId,
    ) -> Result<Option<(OwnerToken, SagaState)>, MetadataError> {
        self.in_tx().await?;
        let rows: Vec<PgSagaOwner> =
            diesel::sql_query("SELECT owner, state FROM sagas WHERE id = $1 FOR UPDATE")
                .bind::<SqlUuid, _>(id.0)
                .prepared()
                .load(self.c())
                .await
                .map_err(|e| self.stmt(e))?;
        rows.into_iter()
            .next()
            .map(|r| {
                SagaState::parse(&r.state)
                    .map(|state| (OwnerToken(r.owner), state))
                    .ok_or_else(|| corrupt(format!("saga {id}: unknown state {:?}", r.state)))
            })
            .transpose()
    }

    async fn run_step(&mut self, step: &dyn CommitStep) -> Result<(), MetadataError> {
        self.in_tx().await?;
        let conn: &mut AsyncPgConnection = self.c();
        let Err(e) = step.run(conn).await else {
            return Ok(());
        };
        // A database error is classified like the adapter's own statements
        // (by the SQLSTATE the server sent): a serialization failure or a
        // deadlock is retried with the whole commit.
        Err(match e.downcast::<diesel::result::Error>() {
            Ok(db) => step_failed(self.stmt(*db)),
            Err(other) => MetadataError::StepFailed { source: other },
        })
    }

    async fn record_idempotency(
        &mut self,
        record: &IdempotencyRecord,
        summary: CommitSummary,
    ) -> Result<bool, MetadataError> {
        let (inserted, updated, deleted) = summary_columns(summary)?;
        // A plain insert, queued: it goes out with `COMMIT`. A key recorded
        // already (or by a transaction that commits while this one waits
        // for it) fails it on the key, told as `IdempotencyKeyTaken`, and
        // the transaction rolls back.
        let insert = diesel::sql_query(
            "INSERT INTO idempotency_keys (key, request_hash, outcome, inserted, updated, deleted) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .into_boxed()
        .bind::<Text, _>(record.key.clone())
        .bind::<Text, _>(record.request_hash.clone())
        .bind::<Jsonb, _>(record.outcome.clone())
        .bind::<BigInt, _>(inserted)
        .bind::<BigInt, _>(updated)
        .bind::<BigInt, _>(deleted)
        .prepared();
        self.queue(insert, Told::Key(record.key.clone())).await?;
        Ok(true)
    }

    async fn transfer_intent(&mut self, id: IntentId, to: OwnerToken) -> Result<(), MetadataError> {
        self.in_tx().await?;
        diesel::sql_query("UPDATE intents SET owner = $2 WHERE id = $1")
            .bind::<SqlUuid, _>(id.0)
            .bind::<SqlUuid, _>(to.0)
            .prepared()
            .execute(self.c())
            .await
            .map_err(|e| self.stmt(e))?;
        Ok(())
    }
}

/// Single-statement writes (outside a transaction) and reads.
impl Session {
    /// `prepare`: one statement. It reads the index state with a shared
    /// lock (`FOR KEY SHARE`: prepares do not wait for each other, nor for a
    /// migration's progress, only for a begin, a freeze or a switch, which
    /// lock it `FOR UPDATE`; after waiting, it reads what they wrote) and
    /// inserts the intent only if its generation is the store's and no
    /// switch is in progress at its creation time.
    pub(crate) async fn insert_intent(&mut self, intent: &NewIntent) -> Result<(), MetadataError> {
        let generation = to_i64(intent.generation, "generation")?;
        // A repeated prepare changes nothing, even if the intent moved on since.
        let rows: Vec<PgGeneration> = diesel::sql_query(
            "WITH s AS (SELECT generation, frozen_until_ms FROM index_state FOR KEY SHARE), \
                  i AS (INSERT INTO intents (id, kind, state, owner, lease_deadline_ms, \
                            point_ids, attempts, created_ms) \
                        SELECT $1, $2, 'prepared', $3, $4, $5, 0, $6 FROM s \
                        WHERE s.generation = $7 \
                            AND (s.frozen_until_ms IS NULL OR $6 >= s.frozen_until_ms) \
                        ON CONFLICT (id) DO NOTHING) \
             SELECT generation, frozen_until_ms FROM s",
        )
        .bind::<SqlUuid, _>(intent.id.0)
        .bind::<Text, _>(intent.kind.as_str())
        .bind::<SqlUuid, _>(intent.owner.0)
        .bind::<BigInt, _>(intent.lease_deadline_ms)
        .bind::<Array<SqlUuid>, _>(uuids(&intent.point_ids, |p| p.0))
        .bind::<BigInt, _>(intent.created_ms)
        .bind::<BigInt, _>(generation)
        .prepared()
        .load(self.c())
        .await
        .map_err(|e| self.autocommit(e))?;
        let state = rows
            .into_iter()
            .next()
            .ok_or_else(|| corrupt("the index_state row is missing".to_owned()))?;
        check_generation(intent, state.generation, state.frozen_until_ms)
    }

    pub(crate) async fn delete_intent(
        &mut self,
        id: IntentId,
        owner: OwnerToken,
    ) -> Result<bool, MetadataError> {
        let n = diesel::sql_query("DELETE FROM intents WHERE id = $1 AND owner = $2")
            .bind::<SqlUuid, _>(id.0)
            .bind::<SqlUuid, _>(owner.0)
            .prepared()
            .execute(self.c())
            .await
            .map_err(|e| self.autocommit(e))?;
        Ok(n == 1)
    }

    pub(crate) async fn delete_intents(
        &mut self,
        ids: &[IntentId],
        owner: OwnerToken,
    ) -> Result<usize, MetadataError> {
        diesel::sql_query("DELETE FROM intents WHERE id = ANY($1) AND owner = $2")
            .bind::<Array<SqlUuid>, _>(uuids(ids, |i| i.0))
            .bind::<SqlUuid, _>(owner.0)
            .prepared()
            .execute(self.c())
            .await
            .map_err(|e| self.autocommit(e))
    }

    pub(crate) async fn claim_expired(
        &mut self,
        now_ms: i64,
        owner: OwnerToken,
        lease_deadline_ms: i64,
        limit: usize,
    ) -> Result<Vec<Intent>, MetadataError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        // SKIP LOCKED: intents held by a commit, a settle or another claimer
        // are left to them, so several recoverers never take the same intent.
        let mut rows: Vec<PgClaimed> = diesel::sql_query(format!(
            "WITH picked AS ( \
                 SELECT id, lease_deadline_ms AS old_lease, seq FROM intents \
                 WHERE lease_deadline_ms < $1 AND state <> 'held' \
                 ORDER BY lease_deadline_ms, seq \
                 LIMIT $2 FOR UPDATE SKIP LOCKED) \
             UPDATE intents AS i SET owner = $3, lease_deadline_ms = $4, \
                 attempts = i.attempts + 1 \
             FROM picked WHERE i.id = picked.id \
             RETURNING {}, picked.old_lease, picked.seq",
            INTENT_COLUMNS
                .split(", ")
                .map(|c| format!("i.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .bind::<BigInt, _>(now_ms)
        .bind::<BigInt, _>(limit)
        .bind::<SqlUuid, _>(owner.0)
        .bind::<BigInt, _>(lease_deadline_ms)
        .prepared()
        .load(self.c())
        .await
        .map_err(|e| self.autocommit(e))?;
        rows.sort_by_key(|r| (r.old_lease, r.seq));
        rows.into_iter().map(|r| r.intent.into_intent()).collect()
    }

    pub(crate) async fn set_last_error(
        &mut self,
        id: IntentId,
        owner: OwnerToken,
        message: &str,
    ) -> Result<(), MetadataError> {
        diesel::sql_query("UPDATE intents SET last_error = $3 WHERE id = $1 AND owner = $2")
            .bind::<SqlUuid, _>(id.0)
            .bind::<SqlUuid, _>(owner.0)
            .bind::<Text, _>(message)
            .prepared()
            .execute(self.c())
            .await
            .map_err(|e| self.autocommit(e))?;
        Ok(())
    }

    pub(crate) async fn referenced_points(
        &mut self,
        points: &[PointId],
    ) -> Result<HashSet<PointId>, MetadataError> {
        // Held intents are few (one per step of a live saga): the second arm
        // scans only them.
        let rows: Vec<PgPoint> = diesel::sql_query(
            "SELECT point_id FROM records WHERE point_id = ANY($1) \
             UNION SELECT p FROM intents, unnest(point_ids) AS p \
             WHERE state = 'held' AND p = ANY($1)",
        )
        .bind::<Array<SqlUuid>, _>(uuids(points, |p| p.0))
        .prepared()
        .load(self.c())
        .await
        .map_err(|e| self.stmt(e))?;
        Ok(rows.into_iter().map(|r| PointId(r.point_id)).collect())
    }

    pub(crate) async fn rows_by_points(
        &mut self,
        points: &[PointId],
    ) -> Result<Vec<StoredRecord>, MetadataError> {
        // The read guard needs the rows, not their vectors.
        let keep = false;
        let rows: Vec<PgRecord> = diesel::sql_query(format!(
            "SELECT {RECORD_COLUMNS} FROM records WHERE point_id = ANY($2)"
        ))
        .bind::<Bool, _>(keep)
        .bind::<Array<SqlUuid>, _>(uuids(points, |p| p.0))
        .prepared()
        .load(self.c())
        .await
        .map_err(|e| self.stmt(e))?;
        let mut by_point: HashMap<PointId, StoredRecord> = HashMap::with_capacity(rows.len());
        for row in rows {
            let record = row.into_record(keep)?;
            by_point.insert(record.point_id, record);
        }
        // In the order asked for, each row once.
        Ok(points.iter().filter_map(|p| by_point.remove(p)).collect())
    }

    pub(crate) async fn get(
        &mut self,
        ids: &[RecordId],
    ) -> Result<Vec<StoredRecord>, MetadataError> {
        let keep = self.keep_vectors;
        let rows: Vec<PgRecord> = diesel::sql_query(format!(
            "SELECT {RECORD_COLUMNS} FROM records WHERE id = ANY($2)"
        ))
        .bind::<Bool, _>(keep)
        .bind::<Array<SqlUuid>, _>(uuids(ids, |i| i.0))
        .prepared()
        .load(self.c())
        .await
        .map_err(|e| self.stmt(e))?;
        let mut by_id: HashMap<RecordId, StoredRecord> = HashMap::with_capacity(rows.len());
        for row in rows {
            let record = row.into_record(keep)?;
            by_id.insert(record.id, record);
        }
        Ok(ids.iter().filter_map(|id| by_id.remove(id)).collect())
    }

    pub(crate) async fn lookup_idempotency(
        &mut self,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, MetadataError> {
        let rows: Vec<PgIdempotency> = diesel::sql_query(
            "SELECT key, request_hash, outcome, inserted, updated, deleted \
             FROM idempotency_keys WHERE key = $1",
        )
        .bind::<Text, _>(key)
        .prepared()
        .load(self.c())
        .await
        .map_err(|e| self.stmt(e))?;
        rows.into_iter()
            .next()
            .map(|r| {
                IdempotencyRow {
                    key: r.key,
                    request_hash: r.request_hash,
                    outcome: r.outcome,
                    inserted: r.inserted,
                    updated: r.updated,
                    deleted: r.deleted,
                }
                .into_record()
            })
            .transpose()
    }

    pub(crate) async fn scan_refs(
        &mut self,
        scope: Option<&Scope>,
        after: Option<RecordId>,
        limit: usize,
    ) -> Result<Page<RowRef, RecordId>, MetadataError> {
        // One more than asked tells whether another page follows.
        let fetch = page_limit(limit, "scan_refs")?.saturating_add(1);
        const COLS: &str = "SELECT id, scope, point_id, version FROM records";
        let rows: Vec<PgScanRow> = match (scope, after) {
            (None, None) => {
                diesel::sql_query(format!("{COLS} ORDER BY id LIMIT $1"))
                    .bind::<BigInt, _>(fetch)
                    .prepared()
                    .load(self.c())
                    .await
            }
            (None, Some(after)) => {
                diesel::sql_query(format!("{COLS} WHERE id > $1 ORDER BY id LIMIT $2"))
                    .bind::<SqlUuid, _>(after.0)
                    .bind::<BigInt, _>(fetch)
                    .prepared()
                    .load(self.c())
                    .await
            }
            (Some(scope), None) => {
                diesel::sql_query(format!("{COLS} WHERE scope = $1 ORDER BY id LIMIT $2"))
                    .bind::<Text, _>(scope.as_str())
                    .bind::<BigInt, _>(fetch)
                    .prepared()
                    .load(self.c())
                    .await
            }
            (Some(scope), Some(after)) => {
                diesel::sql_query(format!(
                    "{COLS} WHERE scope = $1 AND id > $2 ORDER BY id LIMIT $3"
                ))
                .bind::<Text, _>(scope.as_str())
                .bind::<SqlUuid, _>(after.0)
                .bind::<BigInt, _>(fetch)
                .prepared()
                .load(self.c())
                .await
            }
        }
        .map_err(|e| self.stmt(e))?;
        let mut items = rows
            .into_iter()
            .map(|r| {
                Ok(RowRef {
                    id: RecordId(r.id),
                    scope: Scope::new(r.scope),
                    point_id: PointId(r.point_id),
                    version: to_u64(r.version, "version")?,
                })
            })
            .collect::<Result<Vec<_>, MetadataError>>()?;
        let next = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|r| r.id)
        } else {
            None
        };
        Ok(Page { items, next })
    }

    pub(crate) async fn list_intents(
        &mut self,
        limit: usize,
    ) -> Result<Vec<Intent>, MetadataError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows: Vec<PgIntent> = diesel::sql_query(format!(
            "SELECT {INTENT_COLUMNS} FROM intents ORDER BY created_ms, seq LIMIT $1"
        ))
        .bind::<BigInt, _>(limit)
        .prepared()
        .load(self.c())
        .await
        .map_err(|e| self.stmt(e))?;
        rows.into_iter().map(PgIntent::into_intent).collect()
    }

    pub(crate) async fn count_by_scope(&mut self) -> Result<BTreeMap<Scope, u64>, MetadataError> {
        let rows: Vec<PgScopeCount> =
            diesel::sql_query("SELECT scope, count(*) AS n FROM records GROUP BY scope")
                .prepared()
                .load(self.c())
                .await
                .map_err(|e| self.stmt(e))?;
        rows.into_iter()
            .map(|r| Ok((Scope::new(r.scope), to_u64(r.n, "count")?)))
            .collect()
    }

    /// In the caller's transaction: the listed rows locked (rows, then
    /// claims, as on every path), then each listed entry that `claim` holds
    /// at that version updated in its claim, and the dead-lettered ones
    /// marked on their rows; returns how many were dead-lettered.
    pub(crate) async fn record_index_failure(
        &mut self,
        claim: OwnerToken,
        entries: &[(RecordId, u64)],
        failure: &IndexFailure,
    ) -> Result<usize, MetadataError> {
        let versions = entries
            .iter()
            .map(|(_, v)| to_i64(*v, "version"))
            .collect::<Result<Vec<i64>, _>>()?;
        let mut ids: Vec<RecordId> = entries.iter().map(|(id, _)| *id).collect();
        ids.sort_unstable();
        ids.dedup();
        self.in_tx().await?;
        lock_existing_query(uuids(&ids, |i| i.0))
            .load::<PgId>(self.c())
            .await
            .map_err(|e| self.stmt(e))?;
        let counts = failure.counts || failure.permanent;
        // The SET expressions read the claim as it was (attempts before + 1);
        // RETURNING reads it as updated.
        let failed: Vec<PgFailed> = diesel::sql_query(
            "UPDATE pending_claims AS c SET last_error = $3, claimed_by = NULL, \
                 attempts = c.attempts + $4, \
                 claim_until_ms = CASE WHEN ($5 OR ($6 AND c.attempts + 1 >= $7)) \
                     THEN NULL ELSE $8 END \
             FROM UNNEST($1::uuid[], $2::bigint[]) AS t(record_id, version), records AS r \
             WHERE c.record_id = t.record_id AND c.version = t.version \
                 AND c.claimed_by = $9 AND r.id = c.record_id AND r.version = c.version \
                 AND r.pending_ms IS NOT NULL AND NOT r.pending_dead \
             RETURNING c.record_id AS id, ($5 OR ($6 AND c.attempts >= $7)) AS dead",
        )
        .bind::<Array<SqlUuid>, _>(entries.iter().map(|(id, _)| id.0).collect::<Vec<_>>())
        .bind::<Array<BigInt>, _>(versions)
        .bind::<Text, _>(failure.message.as_str())
        .bind::<Integer, _>(i32::from(counts))
        .bind::<Bool, _>(failure.permanent)
        .bind::<Bool, _>(failure.counts)
        .bind::<BigInt, _>(i64::from(failure.max_attempts))
        .bind::<BigInt, _>(failure.retry_at_ms)
        .bind::<SqlUuid, _>(claim.0)
        .prepared()
        .load(self.c())
        .await
        .map_err(|e| self.stmt(e))?;
        let dead: Vec<Uuid> = failed.iter().filter(|f| f.dead).map(|f| f.id).collect();
        if !dead.is_empty() {
            diesel::sql_query("UPDATE records SET pending_dead = true WHERE id = ANY($1)")
                .bind::<Array<SqlUuid>, _>(dead.clone())
                .prepared()
                .execute(self.c())
                .await
                .map_err(|e| self.stmt(e))?;
        }
        Ok(dead.len())
    }

    pub(crate) async fn list_pending(
        &mut self,
        filter: PendingFilter,
        after: Option<RecordId>,
        limit: usize,
    ) -> Result<Vec<PendingIndex>, MetadataError> {
        let (all, dead) = pending_filter(filter);
        let rows: Vec<PgPending> = diesel::sql_query(format!(
            "SELECT {PENDING_COLUMNS} FROM {PENDING_FROM} \
             WHERE r.pending_ms IS NOT NULL AND ($1::uuid IS NULL OR r.id > $1) \
                 AND ($2 OR r.pending_dead = $3) \
             ORDER BY r.id LIMIT $4"
        ))
        .bind::<Nullable<SqlUuid>, _>(after.map(|a| a.0))
        .bind::<Bool, _>(all)
        .bind::<Bool, _>(dead)
        .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
        .prepared()
        .load(self.c())
        .await
        .map_err(|e| self.stmt(e))?;
        rows.into_iter().map(PgPending::into_pending).collect()
    }

    pub(crate) async fn pending_for(
        &mut self,
        ids: &[RecordId],
    ) -> Result<Vec<PendingIndex>, MetadataError> {
        let rows: Vec<PgPending> = diesel::sql_query(format!(
            "SELECT {PENDING_COLUMNS} FROM {PENDING_FROM} \
             WHERE r.id = ANY($1) AND r.pending_ms IS NOT NULL"
        ))
        .bind::<Array<SqlUuid>, _>(uuids(ids, |i| i.0))
        .prepared()
        .load(self.c())
        .await
        .map_err(|e| self.stmt(e))?;
        let mut by_id: HashMap<RecordId, PendingIndex> = HashMap::with_capacity(rows.len());
        for row in rows {
            let entry = row.into_pending()?;
            by_id.insert(entry.record_id, entry);
        }
        // In the order asked for, each entry once.
        Ok(ids.iter().filter_map(|id| by_id.remove(id)).collect())
    }

    pub(crate) async fn retry_dead(
        &mut self,
        ids: Option<&[RecordId]>,
    ) -> Result<u64, MetadataError> {
        // Rows first, then their claims (attempts from 0, the last error
        // kept), as every path locks.
        let rows: Vec<PgCount> = diesel::sql_query(
            "WITH back AS (UPDATE records SET pending_dead = false \
                 WHERE pending_dead AND pending_ms IS NOT NULL \
                     AND ($1::uuid[] IS NULL OR id = ANY($1)) \
                 RETURNING id, version), \
             reset AS (UPDATE pending_claims AS c SET attempts = 0, claimed_by = NULL, \
                 claim_until_ms = NULL FROM back \
                 WHERE c.record_id = back.id AND c.version = back.version) \
             SELECT count(*) AS n FROM back",
        )
        .bind::<Nullable<Array<SqlUuid>>, _>(ids.map(|ids| uuids(ids, |i| i.0)))
        .prepared()
        .load(self.c())
        .await
        .map_err(|e| self.autocommit(e))?;
        to_u64(rows.as_slice().first().map_or(0, |r| r.n), "count")
    }

    pub(crate) async fn drop_dead(
        &mut self,
        ids: Option<&[RecordId]>,
    ) -> Result<u64, MetadataError> {
        let rows: Vec<PgCount> = diesel::sql_query(format!(
            "WITH gone AS (UPDATE records SET {CLEAR_PENDING} \
                 WHERE pending_dead AND pending_ms IS NOT NULL \
                     AND ($1::uuid[] IS NULL OR id = ANY($1)) \
                 RETURNING id), \
             claims AS (DELETE FROM pending_claims AS c USING gone WHERE c.record_id = gone.id) \
             SELECT count(*) AS n FROM gone"
        ))
        .bind::<Nullable<Array<SqlUuid>>, _>(ids.map(|ids| uuids(ids, |i| i.0)))
        .prepared()
        .load(self.c())
        .await
        .map_err(|e| self.autocommit(e))?;
        to_u64(rows.as_slice().first().map_or(0, |r| r.n), "count")
    }

    pub(crate) async fn pending_stats(
        &mut self,
        now_ms: i64,
    ) -> Result<PendingStats, MetadataError> {
        let window = PendingStats::rate_window(now_ms);
        let rows: Vec<PgPendingStats> = diesel::sql_query(
            "SELECT count(*) FILTER (WHERE NOT r.pending_dead) AS pending, \
                 count(*) FILTER (WHERE NOT r.pending_dead AND c.claim_until_ms >= $1) \
                     AS claimed, \
                 count(*) FILTER (WHERE r.pending_dead) AS dead, \
                 min(r.pending_ms) FILTER (WHERE NOT r.pending_dead) AS oldest, \
                 (SELECT coalesce(sum(indexed), 0)::bigint FROM index_activity \
                     WHERE bucket_s BETWEEN $2 AND $3) AS indexed \
             FROM records AS r LEFT JOIN pending_claims AS c \
                 ON c.record_id = r.id AND c.version = r.version \
             WHERE r.pending_ms IS NOT NULL",
        )
        .bind::<BigInt, _>(now_ms)
        .bind::<BigInt, _>(*window.start())
        .bind::<BigInt, _>(*window.end())
        .prepared()
        .load(self.c())
        .await
        .map_err(|e| self.stmt(e))?;
        let Some(r) = rows.into_iter().next() else {
            return Ok(PendingStats::default());
        };
        Ok(PendingStats {
            pending: to_u64(r.pending, "count")?,
            claimed: to_u64(r.claimed, "count")?,
            dead: to_u64(r.dead, "count")?,
            oldest_enqueued_ms: r.oldest,
            indexed_last_minute: to_u64(r.indexed, "count")?,
        })
    }
}
