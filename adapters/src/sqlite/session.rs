//! Connections and statements. Every port call runs, whole, on one blocking
//! thread of the connection ([`SyncConnectionWrapper::spawn_blocking`]): the
//! transaction (`BEGIN IMMEDIATE` … `COMMIT`) cannot be split by a cancelled
//! future, and the shared protocol steps run there through [`SyncTx`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use diesel::connection::SimpleConnection;
use diesel::sql_types::{BigInt, Binary, Bool, Integer, Nullable, Text};
use diesel::{QueryableByName, RunQueryDsl, SqliteConnection};
use diesel_async::AsyncConnection;
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use serde_json::Value;
use tandem_core::{
    CommitStep, CommitSummary, DeleteSelector, IdempotencyRecord, IndexFailure, Intent, IntentId,
    IntentState, MetadataError, NewIntent, OwnerToken, Page, PendingFilter, PendingIndex,
    PendingStats, PointId, RecordId, RowRef, RowWrite, SagaId, SagaState, Scope, StoredRecord,
    UndoImage,
};
use uuid::Uuid;

use super::error::{OpenError, Phase, classify};
use crate::sql::codec::{
    IdempotencyRow, IntentRow, PendingRow, RecordRow, UndoRow, corrupt, encode_vector, page_limit,
    pending_filter, step_failed, summary_columns, to_i64, to_u64,
};
use crate::sql::pool::Connector;
use crate::sql::prepared::PreparedExt;
use crate::sql::steps::{ACTIVITY_KEEP_S, TxOps};

/// The async connection the pool holds.
pub(crate) type Conn = SyncConnectionWrapper<SqliteConnection>;

/// Opens connections to one database file.
#[derive(Clone)]
pub(crate) struct SqliteConnector {
    pub(crate) path: String,
    pub(crate) busy_timeout: Duration,
}

impl Connector for SqliteConnector {
    type Conn = Conn;
    type Error = OpenError;

    async fn connect(&self) -> Result<Conn, OpenError> {
        let mut conn = Conn::establish(&self.path).await.map_err(OpenError::Open)?;
        // The timeout first, so that switching to WAL waits for other
        // connections instead of failing. WAL lets readers run beside the one
        // writer; FULL makes every commit durable when it returns.
        let setup = format!(
            "PRAGMA busy_timeout = {}; PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
             PRAGMA foreign_keys = ON;",
            self.busy_timeout.as_millis()
        );
        diesel_async::SimpleAsyncConnection::batch_execute(&mut conn, &setup)
            .await
            .map_err(OpenError::Setup)?;
        Ok(conn)
    }

    async fn check(&self, conn: &mut Conn) -> Result<(), OpenError> {
        diesel_async::SimpleAsyncConnection::batch_execute(conn, "SELECT 1")
            .await
            .map_err(OpenError::Check)
    }

    fn is_closed(&self, _conn: &mut Conn) -> bool {
        // A file connection has no socket to lose; a call that went wrong
        // leaves its connection dirty, and the pool discards it.
        false
    }
}

/// Runs `body` inside `BEGIN IMMEDIATE` … `COMMIT` on the calling (blocking)
/// thread. The immediate transaction takes the database's write lock up front
/// (waiting up to `busy_timeout`), so the body reads and writes with no other
/// writer in between: SQLite's equivalent of row locks and `SKIP LOCKED`.
///
/// Returns the outcome and whether the connection is clean (no transaction
/// left open).
pub(crate) fn immediate<T>(
    c: &mut SqliteConnection,
    body: impl FnOnce(&mut SqliteConnection) -> Result<T, MetadataError>,
) -> (Result<T, MetadataError>, bool) {
    if let Err(e) = c.batch_execute("BEGIN IMMEDIATE") {
        // No transaction was opened.
        return (Err(classify(e, Phase::Statement)), true);
    }
    match body(c) {
        Ok(value) => match c.batch_execute("COMMIT") {
            Ok(()) => (Ok(value), true),
            Err(e) => {
                // A busy COMMIT leaves the transaction open: rolling it back
                // makes "not applied" definite.
                let rolled_back = c.batch_execute("ROLLBACK").is_ok();
                (Err(classify(e, Phase::Commit)), rolled_back)
            }
        },
        Err(e) => {
            let rolled_back = c.batch_execute("ROLLBACK").is_ok();
            (Err(e), rolled_back)
        }
    }
}

/// The protocol steps' statements on a connection inside [`immediate`]. The
/// methods are `async` only to fit [`TxOps`]: they never suspend, so the steps
/// run to completion under `futures::executor::block_on`.
pub(crate) struct SyncTx<'c> {
    pub(crate) c: &'c mut SqliteConnection,
    pub(crate) keep_vectors: bool,
}

#[derive(QueryableByName)]
pub(super) struct SqlRecord {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Text)]
    scope: String,
    #[diesel(sql_type = Text)]
    content: String,
    #[diesel(sql_type = Text)]
    metadata: String,
    #[diesel(sql_type = Text)]
    point_id: String,
    #[diesel(sql_type = BigInt)]
    version: i64,
    #[diesel(sql_type = Nullable<Binary>)]
    vector: Option<Vec<u8>>,
}

impl SqlRecord {
    pub(super) fn into_record(self, keep_vectors: bool) -> Result<StoredRecord, MetadataError> {
        RecordRow {
            id: parse_uuid(&self.id)?,
            scope: self.scope,
            content: self.content,
            metadata: parse_json(&self.metadata)?,
            point_id: parse_uuid(&self.point_id)?,
            version: self.version,
            vector: self.vector,
        }
        .into_record(keep_vectors)
    }
}

#[derive(QueryableByName)]
pub(super) struct SqlIntent {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Text)]
    kind: String,
    #[diesel(sql_type = Text)]
    state: String,
    #[diesel(sql_type = Text)]
    owner: String,
    #[diesel(sql_type = BigInt)]
    lease_deadline_ms: i64,
    #[diesel(sql_type = Text)]
    point_ids: String,
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

impl SqlIntent {
    pub(super) fn into_intent(self) -> Result<Intent, MetadataError> {
        let points: Vec<String> = serde_json::from_str(&self.point_ids)
            .map_err(|e| corrupt(format!("intent {}: point list: {e}", self.id)))?;
        IntentRow {
            id: parse_uuid(&self.id)?,
            kind: self.kind,
            state: self.state,
            owner: parse_uuid(&self.owner)?,
            lease_deadline_ms: self.lease_deadline_ms,
            point_ids: points
                .iter()
                .map(|p| parse_uuid(p))
                .collect::<Result<_, _>>()?,
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
struct SqlPending {
    #[diesel(sql_type = Text)]
    record_id: String,
    #[diesel(sql_type = BigInt)]
    version: i64,
    #[diesel(sql_type = BigInt)]
    indexed_version: i64,
    // NULL only for a stale entry (see `PENDING_COLUMNS`).
    #[diesel(sql_type = Nullable<Text>)]
    scope: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    metadata: Option<String>,
    #[diesel(sql_type = Nullable<Binary>)]
    vector: Option<Vec<u8>>,
    #[diesel(sql_type = BigInt)]
    enqueued_ms: i64,
    #[diesel(sql_type = Integer)]
    attempts: i32,
    #[diesel(sql_type = Nullable<Text>)]
    last_error: Option<String>,
    #[diesel(sql_type = Bool)]
    dead: bool,
    #[diesel(sql_type = Nullable<Text>)]
    claimed_by: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    claim_until_ms: Option<i64>,
}

impl SqlPending {
    fn into_pending(self) -> Result<PendingIndex, MetadataError> {
        PendingRow {
            record_id: parse_uuid(&self.record_id)?,
            version: self.version,
            indexed_version: self.indexed_version,
            scope: self.scope,
            metadata: self.metadata.as_deref().map(parse_json).transpose()?,
            vector: self.vector,
            enqueued_ms: self.enqueued_ms,
            attempts: self.attempts,
            last_error: self.last_error,
            dead: self.dead,
            claimed_by: self.claimed_by.as_deref().map(parse_uuid).transpose()?,
            claim_until_ms: self.claim_until_ms,
        }
        .into_pending()
    }
}

#[derive(QueryableByName)]
struct SqlCandidate {
    #[diesel(embed)]
    entry: SqlPending,
    #[diesel(sql_type = Nullable<BigInt>)]
    row_version: Option<i64>,
}

#[derive(QueryableByName)]
struct SqlVersion {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Text)]
    point_id: String,
    #[diesel(sql_type = BigInt)]
    version: i64,
}

#[derive(QueryableByName)]
struct SqlNewVersion {
    #[diesel(sql_type = BigInt)]
    version: i64,
}

#[derive(QueryableByName)]
struct SqlDead {
    #[diesel(sql_type = Bool)]
    dead: bool,
}

#[derive(QueryableByName)]
struct SqlPendingStats {
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

#[derive(QueryableByName)]
struct SqlSagaOwner {
    #[diesel(sql_type = Text)]
    owner: String,
    #[diesel(sql_type = Text)]
    state: String,
}

#[derive(QueryableByName)]
struct SqlRef {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Text)]
    point_id: String,
}

impl SqlRef {
    fn parse(&self) -> Result<(RecordId, PointId), MetadataError> {
        Ok((
            RecordId(parse_uuid(&self.id)?),
            PointId(parse_uuid(&self.point_id)?),
        ))
    }
}

#[derive(QueryableByName)]
struct SqlRefMeta {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Text)]
    point_id: String,
    #[diesel(sql_type = Text)]
    metadata: String,
}

#[derive(QueryableByName)]
struct SqlPoint {
    #[diesel(sql_type = Text)]
    point_id: String,
}

#[derive(QueryableByName)]
struct SqlScanRow {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Text)]
    scope: String,
    #[diesel(sql_type = Text)]
    point_id: String,
    #[diesel(sql_type = BigInt)]
    version: i64,
}

#[derive(QueryableByName)]
struct SqlScopeCount {
    #[diesel(sql_type = Text)]
    scope: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct SqlIdempotency {
    #[diesel(sql_type = Text)]
    key: String,
    #[diesel(sql_type = Text)]
    request_hash: String,
    #[diesel(sql_type = Text)]
    outcome: String,
    #[diesel(sql_type = BigInt)]
    inserted: i64,
    #[diesel(sql_type = BigInt)]
    updated: i64,
    #[diesel(sql_type = BigInt)]
    deleted: i64,
}

pub(super) const INTENT_COLUMNS: &str = "id, kind, state, owner, lease_deadline_ms, point_ids, inserted, \
                              updated, deleted, attempts, last_error, created_ms";

/// The record columns; the first bind says whether to return the vector.
pub(super) const RECORD_COLUMNS: &str = "id, scope, content, metadata, point_id, version, \
                              CASE WHEN ? THEN vector END AS vector";

/// The `pending_index` columns, qualified by `p`, each entry's content
/// filled in from its record's row `r` (see [`PENDING_FROM`]) where the
/// entry leaves it NULL, as a deferred write's light entry does. A live
/// entry's row is at the entry's version; a stale entry (its row gone, or
/// at another version) is only read to be deleted or for its versions.
const PENDING_COLUMNS: &str = "p.record_id, p.version, p.indexed_version, \
                               COALESCE(p.scope, r.scope) AS scope, \
                               COALESCE(p.metadata, r.metadata) AS metadata, \
                               COALESCE(p.vector, r.vector) AS vector, \
                               p.enqueued_ms, p.attempts, p.last_error, p.dead, \
                               p.claimed_by, p.claim_until_ms";

/// The entries `p` with their records' rows `r`, for [`PENDING_COLUMNS`].
const PENDING_FROM: &str = "pending_index AS p LEFT JOIN records AS r ON r.id = p.record_id";

/// `id IN (…)` over a JSON array bound as one parameter.
pub(super) const IN_JSON: &str = "(SELECT value FROM json_each(?))";

const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

pub(super) fn parse_uuid(s: &str) -> Result<Uuid, MetadataError> {
    Uuid::parse_str(s).map_err(|e| corrupt(format!("bad uuid {s:?}: {e}")))
}

pub(super) fn parse_json(s: &str) -> Result<Value, MetadataError> {
    serde_json::from_str(s).map_err(|e| corrupt(format!("bad JSON: {e}")))
}

pub(super) fn json_text(v: &Value) -> String {
    v.to_string()
}

/// A JSON array of uuid strings, for [`IN_JSON`] and point lists.
pub(super) fn json_ids(ids: impl IntoIterator<Item = Uuid>) -> String {
    let ids: Vec<String> = ids.into_iter().map(|u| u.to_string()).collect();
    serde_json::to_string(&ids).unwrap_or_else(|_| "[]".to_owned())
}

pub(super) fn stmt(e: diesel::result::Error) -> MetadataError {
    classify(e, Phase::Statement)
}

/// A single-statement write in autocommit mode: it commits as it returns.
pub(super) fn autocommit(e: diesel::result::Error) -> MetadataError {
    classify(e, Phase::Commit)
}

fn read_intent(c: &mut SqliteConnection, id: IntentId) -> Result<Option<Intent>, MetadataError> {
    let rows: Vec<SqlIntent> =
        diesel::sql_query(format!("SELECT {INTENT_COLUMNS} FROM intents WHERE id = ?"))
            .bind::<Text, _>(id.0.to_string())
            .prepared()
            .load(c)
            .map_err(stmt)?;
    rows.into_iter()
        .next()
        .map(SqlIntent::into_intent)
        .transpose()
}

fn refs_by_ids(
    c: &mut SqliteConnection,
    ids: impl IntoIterator<Item = Uuid>,
) -> Result<Vec<(RecordId, PointId)>, MetadataError> {
    let rows: Vec<SqlRef> = diesel::sql_query(format!(
        "SELECT id, point_id FROM records WHERE id IN {IN_JSON} ORDER BY id"
    ))
    .bind::<Text, _>(json_ids(ids))
    .prepared()
    .load(c)
    .map_err(stmt)?;
    rows.iter().map(SqlRef::parse).collect()
}

fn pending_of(
    c: &mut SqliteConnection,
    ids: impl IntoIterator<Item = Uuid>,
) -> Result<Vec<PendingIndex>, MetadataError> {
    let rows: Vec<SqlPending> = diesel::sql_query(format!(
        "SELECT {PENDING_COLUMNS} FROM {PENDING_FROM} WHERE p.record_id IN {IN_JSON} \
         ORDER BY p.record_id"
    ))
    .bind::<Text, _>(json_ids(ids))
    .prepared()
    .load(c)
    .map_err(stmt)?;
    rows.into_iter().map(SqlPending::into_pending).collect()
}

#[async_trait]
impl TxOps for SyncTx<'_> {
    async fn lock_intent(&mut self, id: IntentId) -> Result<Option<Intent>, MetadataError> {
        read_intent(self.c, id)
    }

    async fn create_intent(&mut self, intent: &NewIntent) -> Result<bool, MetadataError> {
        // The immediate transaction holds the writer lock: no other
        // transaction is inserting it meanwhile.
        if read_intent(self.c, intent.id)?.is_some() {
            return Ok(false);
        }
        insert_intent(self.c, intent)?;
        Ok(true)
    }

    async fn lock_records(
        &mut self,
        ids: &[RecordId],
    ) -> Result<Vec<(RecordId, PointId)>, MetadataError> {
        refs_by_ids(self.c, ids.iter().map(|i| i.0))
    }

    async fn insert_or_lock(&mut self, rows: &[&RowWrite]) -> Result<Vec<RecordId>, MetadataError> {
        // The immediate transaction already holds the database's write lock.
        // In-process: one statement per row costs microseconds.
        let mut inserted = Vec::with_capacity(rows.len());
        for row in rows {
            let n = diesel::sql_query(
                "INSERT INTO records (id, scope, content, metadata, point_id, version, vector) \
                 VALUES (?, ?, ?, ?, ?, 1, ?) ON CONFLICT (id) DO NOTHING",
            )
            .bind::<Text, _>(row.id.0.to_string())
            .bind::<Text, _>(row.scope.as_str())
            .bind::<Text, _>(row.content.as_str())
            .bind::<Text, _>(json_text(&Value::Object(row.metadata.clone())))
            .bind::<Text, _>(row.point_id.0.to_string())
            .bind::<Nullable<Binary>, _>(self.keep_vectors.then(|| encode_vector(&row.vector)))
            .execute(self.c)
            .map_err(stmt)?;
            if n == 1 {
                inserted.push(row.id);
            }
        }
        Ok(inserted)
    }

    async fn update_records(&mut self, rows: &[&RowWrite]) -> Result<u64, MetadataError> {
        let mut changed = 0;
        for row in rows {
            changed += diesel::sql_query(format!(
                "UPDATE records SET scope = ?, content = ?, metadata = ?, point_id = ?, \
                 vector = ?, version = version + 1, updated_at = {NOW} WHERE id = ?"
            ))
            .bind::<Text, _>(row.scope.as_str())
            .bind::<Text, _>(row.content.as_str())
            .bind::<Text, _>(json_text(&Value::Object(row.metadata.clone())))
            .bind::<Text, _>(row.point_id.0.to_string())
            .bind::<Nullable<Binary>, _>(self.keep_vectors.then(|| encode_vector(&row.vector)))
            .bind::<Text, _>(row.id.0.to_string())
            .execute(self.c)
            .map_err(stmt)? as u64;
        }
        Ok(changed)
    }

    async fn lock_selected(
        &mut self,
        selector: &DeleteSelector,
    ) -> Result<Vec<(RecordId, PointId)>, MetadataError> {
        match selector {
            DeleteSelector::Ids(ids) => refs_by_ids(self.c, ids.iter().map(|i| i.0)),
            DeleteSelector::Scope(scope) => {
                let rows: Vec<SqlRef> = diesel::sql_query(
                    "SELECT id, point_id FROM records WHERE scope = ? ORDER BY id",
                )
                .bind::<Text, _>(scope.as_str())
                .load(self.c)
                .map_err(stmt)?;
                rows.iter().map(SqlRef::parse).collect()
            }
            DeleteSelector::MetadataEq { scope, key, value } => {
                // JSON equality exactly as the model defines it (the same
                // comparison the filter uses), not SQLite's.
                let rows: Vec<SqlRefMeta> = diesel::sql_query(
                    "SELECT id, point_id, metadata FROM records WHERE scope = ? ORDER BY id",
                )
                .bind::<Text, _>(scope.as_str())
                .load(self.c)
                .map_err(stmt)?;
                let mut selected = Vec::new();
                for row in rows {
                    if parse_json(&row.metadata)?.get(key) == Some(value) {
                        selected.push(
                            SqlRef {
                                id: row.id,
                                point_id: row.point_id,
                            }
                            .parse()?,
                        );
                    }
                }
                Ok(selected)
            }
        }
    }

    async fn delete_records(&mut self, ids: &[RecordId]) -> Result<u64, MetadataError> {
        let n = diesel::sql_query(format!("DELETE FROM records WHERE id IN {IN_JSON}"))
            .bind::<Text, _>(json_ids(ids.iter().map(|i| i.0)))
            .execute(self.c)
            .map_err(stmt)?;
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
        diesel::sql_query(
            "UPDATE intents SET state = ?, point_ids = ?, inserted = ?, updated = ?, \
             deleted = ?, lease_deadline_ms = COALESCE(?, lease_deadline_ms) WHERE id = ?",
        )
        .bind::<Text, _>(state.as_str())
        .bind::<Text, _>(json_ids(point_ids.iter().map(|p| p.0)))
        .bind::<BigInt, _>(inserted)
        .bind::<BigInt, _>(updated)
        .bind::<BigInt, _>(deleted)
        .bind::<Nullable<BigInt>, _>(release_at_ms)
        .bind::<Text, _>(id.0.to_string())
        .execute(self.c)
        .map_err(stmt)?;
        Ok(())
    }

    async fn lock_versions(
        &mut self,
        ids: &[RecordId],
    ) -> Result<Vec<(RecordId, PointId, u64)>, MetadataError> {
        let rows: Vec<SqlVersion> = diesel::sql_query(format!(
            "SELECT id, point_id, version FROM records WHERE id IN {IN_JSON} ORDER BY id"
        ))
        .bind::<Text, _>(json_ids(ids.iter().map(|i| i.0)))
        .prepared()
        .load(self.c)
        .map_err(stmt)?;
        rows.iter()
            .map(|r| {
                Ok((
                    RecordId(parse_uuid(&r.id)?),
                    PointId(parse_uuid(&r.point_id)?),
                    to_u64(r.version, "version")?,
                ))
            })
            .collect()
    }

    async fn defer_update(
        &mut self,
        rows: &[&RowWrite],
        _now_ms: i64,
    ) -> Result<Vec<(RecordId, u64)>, MetadataError> {
        let mut updated = Vec::with_capacity(rows.len());
        for row in rows {
            let versions: Vec<SqlNewVersion> = diesel::sql_query(format!(
                "UPDATE records SET scope = ?, content = ?, metadata = ?, vector = ?, \
                 version = version + 1, updated_at = {NOW} WHERE id = ? RETURNING version"
            ))
            .bind::<Text, _>(row.scope.as_str())
            .bind::<Text, _>(row.content.as_str())
            .bind::<Text, _>(json_text(&Value::Object(row.metadata.clone())))
            .bind::<Nullable<Binary>, _>(self.keep_vectors.then(|| encode_vector(&row.vector)))
            .bind::<Text, _>(row.id.0.to_string())
            .prepared()
            .load(self.c)
            .map_err(stmt)?;
            if let Some(v) = versions.first() {
                updated.push((row.id, to_u64(v.version, "version")?));
            }
        }
        Ok(updated)
    }

    async fn switch_points(
        &mut self,
        switches: &[(RecordId, PointId)],
    ) -> Result<(), MetadataError> {
        for (id, point) in switches {
            diesel::sql_query(format!(
                "UPDATE records SET point_id = ?, updated_at = {NOW} WHERE id = ?"
            ))
            .bind::<Text, _>(point.0.to_string())
            .bind::<Text, _>(id.0.to_string())
            .prepared()
            .execute(self.c)
            .map_err(stmt)?;
        }
        Ok(())
    }

    async fn lock_pending(&mut self, ids: &[RecordId]) -> Result<Vec<PendingIndex>, MetadataError> {
        pending_of(self.c, ids.iter().map(|i| i.0))
    }

    async fn delete_pending(&mut self, ids: &[RecordId]) -> Result<(), MetadataError> {
        delete_pending_of(self.c, ids)
    }

    async fn finish_index(
        &mut self,
        ids: &[RecordId],
        shard: i32,
        now_ms: i64,
    ) -> Result<(), MetadataError> {
        delete_pending_of(self.c, ids)?;
        let bucket = PendingStats::rate_bucket(now_ms);
        diesel::sql_query("DELETE FROM index_activity WHERE shard = ? AND bucket_s < ?")
            .bind::<Integer, _>(shard)
            .bind::<BigInt, _>(bucket - ACTIVITY_KEEP_S)
            .prepared()
            .execute(self.c)
            .map_err(stmt)?;
        diesel::sql_query(
            "INSERT INTO index_activity (bucket_s, shard, indexed) VALUES (?, ?, ?) \
             ON CONFLICT (shard, bucket_s) \
             DO UPDATE SET indexed = index_activity.indexed + excluded.indexed",
        )
        .bind::<BigInt, _>(bucket)
        .bind::<Integer, _>(shard)
        .bind::<BigInt, _>(ids.len() as i64)
        .prepared()
        .execute(self.c)
        .map_err(stmt)?;
        Ok(())
    }

    async fn enqueue_pending(&mut self, entries: &[PendingIndex]) -> Result<(), MetadataError> {
        for entry in entries {
            // A light entry: the row just written holds scope, metadata and
            // (if kept) the vector at the entry's version.
            let r = PendingRow::light(entry, self.keep_vectors)?;
            // The SET expressions read the existing entry as it was: a
            // waiting entry at the row's previous version keeps when it was
            // enqueued and which version the row's point holds. A coalesced
            // entry becomes light too (one restored from an undo image may
            // carry content).
            diesel::sql_query(
                "INSERT INTO pending_index (record_id, version, indexed_version, scope, metadata, \
                     vector, enqueued_ms, attempts, last_error, dead, claimed_by, claim_until_ms) \
                 VALUES (?, ?, ?, NULL, NULL, ?, ?, 0, NULL, 0, NULL, NULL) \
                 ON CONFLICT (record_id) DO UPDATE SET \
                     enqueued_ms = CASE WHEN pending_index.version = excluded.indexed_version \
                         THEN pending_index.enqueued_ms ELSE excluded.enqueued_ms END, \
                     indexed_version = CASE WHEN pending_index.version = excluded.indexed_version \
                         THEN pending_index.indexed_version ELSE excluded.indexed_version END, \
                     version = excluded.version, scope = NULL, metadata = NULL, \
                     vector = excluded.vector, attempts = 0, last_error = NULL, dead = 0, \
                     claimed_by = NULL, claim_until_ms = NULL",
            )
            .bind::<Text, _>(r.record_id.to_string())
            .bind::<BigInt, _>(r.version)
            .bind::<BigInt, _>(r.indexed_version)
            .bind::<Nullable<Binary>, _>(r.vector)
            .bind::<BigInt, _>(r.enqueued_ms)
            .prepared()
            .execute(self.c)
            .map_err(stmt)?;
        }
        Ok(())
    }

    async fn put_pending(&mut self, entries: &[PendingIndex]) -> Result<(), MetadataError> {
        for entry in entries {
            // With all its content, exactly as given.
            let r = PendingRow::of(entry)?;
            diesel::sql_query(
                "INSERT INTO pending_index (record_id, version, indexed_version, scope, metadata, \
                     vector, enqueued_ms, attempts, last_error, dead, claimed_by, claim_until_ms) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (record_id) DO UPDATE SET version = excluded.version, \
                     indexed_version = excluded.indexed_version, scope = excluded.scope, \
                     metadata = excluded.metadata, vector = excluded.vector, \
                     enqueued_ms = excluded.enqueued_ms, attempts = excluded.attempts, \
                     last_error = excluded.last_error, dead = excluded.dead, \
                     claimed_by = excluded.claimed_by, claim_until_ms = excluded.claim_until_ms",
            )
            .bind::<Text, _>(r.record_id.to_string())
            .bind::<BigInt, _>(r.version)
            .bind::<BigInt, _>(r.indexed_version)
            .bind::<Nullable<Text>, _>(r.scope)
            .bind::<Nullable<Text>, _>(r.metadata.as_ref().map(json_text))
            .bind::<Nullable<Binary>, _>(r.vector)
            .bind::<BigInt, _>(r.enqueued_ms)
            .bind::<Integer, _>(r.attempts)
            .bind::<Nullable<Text>, _>(r.last_error)
            .bind::<Bool, _>(r.dead)
            .bind::<Nullable<Text>, _>(r.claimed_by.map(|u| u.to_string()))
            .bind::<Nullable<BigInt>, _>(r.claim_until_ms)
            .prepared()
            .execute(self.c)
            .map_err(stmt)?;
        }
        Ok(())
    }

    async fn claim_candidates(
        &mut self,
        now_ms: i64,
        limit: usize,
    ) -> Result<Vec<(PendingIndex, Option<u64>)>, MetadataError> {
        // The immediate transaction holds the database's write lock: no
        // other claimer runs between this read and the claim's update.
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows: Vec<SqlCandidate> = diesel::sql_query(format!(
            "SELECT {PENDING_COLUMNS}, r.version AS row_version \
             FROM {PENDING_FROM} \
             WHERE p.dead = 0 AND (p.claim_until_ms IS NULL OR p.claim_until_ms < ?) \
             ORDER BY p.enqueued_ms, p.record_id LIMIT ?"
        ))
        .bind::<BigInt, _>(now_ms)
        .bind::<BigInt, _>(limit)
        .prepared()
        .load(self.c)
        .map_err(stmt)?;
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
        _now_ms: i64,
    ) -> Result<Vec<RecordId>, MetadataError> {
        // The writer lock has covered the candidates since they were read.
        diesel::sql_query(format!(
            "UPDATE pending_index SET claimed_by = ?, claim_until_ms = ? \
             WHERE record_id IN {IN_JSON}"
        ))
        .bind::<Text, _>(claim.0.to_string())
        .bind::<BigInt, _>(claim_until_ms)
        .bind::<Text, _>(json_ids(ids.iter().map(|i| i.0)))
        .prepared()
        .execute(self.c)
        .map_err(stmt)?;
        Ok(ids.to_vec())
    }

    async fn lock_rows_full(
        &mut self,
        ids: &[RecordId],
    ) -> Result<Vec<StoredRecord>, MetadataError> {
        let keep = self.keep_vectors;
        let rows: Vec<SqlRecord> = diesel::sql_query(format!(
            "SELECT {RECORD_COLUMNS} FROM records WHERE id IN {IN_JSON} ORDER BY id"
        ))
        .bind::<Bool, _>(keep)
        .bind::<Text, _>(json_ids(ids.iter().map(|i| i.0)))
        .prepared()
        .load(self.c)
        .map_err(stmt)?;
        rows.into_iter().map(|r| r.into_record(keep)).collect()
    }

    async fn write_rows_exact(&mut self, rows: &[StoredRecord]) -> Result<(), MetadataError> {
        for row in rows {
            diesel::sql_query(format!(
                "INSERT INTO records (id, scope, content, metadata, point_id, version, vector) \
                 VALUES (?, ?, ?, ?, ?, ?, ?) \
                 ON CONFLICT (id) DO UPDATE SET scope = excluded.scope, \
                     content = excluded.content, metadata = excluded.metadata, \
                     point_id = excluded.point_id, version = excluded.version, \
                     vector = excluded.vector, updated_at = {NOW}"
            ))
            .bind::<Text, _>(row.id.0.to_string())
            .bind::<Text, _>(row.scope.as_str())
            .bind::<Text, _>(row.content.as_str())
            .bind::<Text, _>(json_text(&Value::Object(row.metadata.clone())))
            .bind::<Text, _>(row.point_id.0.to_string())
            .bind::<BigInt, _>(to_i64(row.version, "version")?)
            .bind::<Nullable<Binary>, _>(
                row.vector
                    .as_deref()
                    .filter(|_| self.keep_vectors)
                    .map(encode_vector),
            )
            .execute(self.c)
            .map_err(stmt)?;
        }
        Ok(())
    }

    async fn save_undo(&mut self, id: IntentId, images: &[UndoImage]) -> Result<(), MetadataError> {
        for image in images {
            let r = UndoRow::of(image, self.keep_vectors)?;
            diesel::sql_query(
                "INSERT INTO intent_undo (intent_id, record_id, scope, content, metadata, \
                 point_id, version, vector, after_version, pending) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            )
            .bind::<Text, _>(id.0.to_string())
            .bind::<Text, _>(r.record_id.to_string())
            .bind::<Nullable<Text>, _>(r.scope)
            .bind::<Nullable<Text>, _>(r.content)
            .bind::<Nullable<Text>, _>(r.metadata.as_ref().map(json_text))
            .bind::<Nullable<Text>, _>(r.point_id.map(|p| p.to_string()))
            .bind::<Nullable<BigInt>, _>(r.version)
            .bind::<Nullable<Binary>, _>(r.vector)
            .bind::<Nullable<BigInt>, _>(r.after_version)
            .bind::<Nullable<Text>, _>(r.pending.as_ref().map(json_text))
            .execute(self.c)
            .map_err(stmt)?;
        }
        Ok(())
    }

    async fn lock_saga(
        &mut self,
        id: SagaId,
    ) -> Result<Option<(OwnerToken, SagaState)>, MetadataError> {
        // The immediate transaction holds the database's write lock.
        let rows: Vec<SqlSagaOwner> =
            diesel::sql_query("SELECT owner, state FROM sagas WHERE id = ?")
                .bind::<Text, _>(id.0.to_string())
                .prepared()
                .load(self.c)
                .map_err(stmt)?;
        rows.into_iter()
            .next()
            .map(|r| {
                let state = SagaState::parse(&r.state)
                    .ok_or_else(|| corrupt(format!("saga {id}: unknown state {:?}", r.state)))?;
                Ok((OwnerToken(parse_uuid(&r.owner)?), state))
            })
            .transpose()
    }

    async fn run_step(&mut self, step: &dyn CommitStep) -> Result<(), MetadataError> {
        let conn: &mut SqliteConnection = self.c;
        let Err(e) = step.run(conn).await else {
            return Ok(());
        };
        Err(match e.downcast::<diesel::result::Error>() {
            Ok(db) => step_failed(stmt(*db)),
            Err(other) => MetadataError::StepFailed { source: other },
        })
    }

    async fn record_idempotency(
        &mut self,
        record: &IdempotencyRecord,
        summary: CommitSummary,
    ) -> Result<bool, MetadataError> {
        let (inserted, updated, deleted) = summary_columns(summary)?;
        let n = diesel::sql_query(
            "INSERT INTO idempotency_keys (key, request_hash, outcome, inserted, updated, deleted) \
             VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
        )
        .bind::<Text, _>(record.key.as_str())
        .bind::<Text, _>(record.request_hash.as_str())
        .bind::<Text, _>(json_text(&record.outcome))
        .bind::<BigInt, _>(inserted)
        .bind::<BigInt, _>(updated)
        .bind::<BigInt, _>(deleted)
        .execute(self.c)
        .map_err(stmt)?;
        Ok(n == 1)
    }

    async fn transfer_intent(&mut self, id: IntentId, to: OwnerToken) -> Result<(), MetadataError> {
        diesel::sql_query("UPDATE intents SET owner = ? WHERE id = ?")
            .bind::<Text, _>(to.0.to_string())
            .bind::<Text, _>(id.0.to_string())
            .execute(self.c)
            .map_err(stmt)?;
        Ok(())
    }
}

/// Inside [`immediate`] (a prepare, or a commit that creates its intent).
pub(crate) fn insert_intent(
    c: &mut SqliteConnection,
    intent: &NewIntent,
) -> Result<(), MetadataError> {
    // A repeated prepare changes nothing, even if the intent moved on since.
    diesel::sql_query(
        "INSERT INTO intents (id, kind, state, owner, lease_deadline_ms, point_ids, attempts, \
         created_ms) VALUES (?, ?, 'prepared', ?, ?, ?, 0, ?) ON CONFLICT (id) DO NOTHING",
    )
    .bind::<Text, _>(intent.id.0.to_string())
    .bind::<Text, _>(intent.kind.as_str())
    .bind::<Text, _>(intent.owner.0.to_string())
    .bind::<BigInt, _>(intent.lease_deadline_ms)
    .bind::<Text, _>(json_ids(intent.point_ids.iter().map(|p| p.0)))
    .bind::<BigInt, _>(intent.created_ms)
    .prepared()
    .execute(c)
    .map_err(stmt)?;
    Ok(())
}

pub(crate) fn delete_intent(
    c: &mut SqliteConnection,
    id: IntentId,
    owner: OwnerToken,
) -> Result<bool, MetadataError> {
    let n = diesel::sql_query("DELETE FROM intents WHERE id = ? AND owner = ?")
        .bind::<Text, _>(id.0.to_string())
        .bind::<Text, _>(owner.0.to_string())
        .prepared()
        .execute(c)
        .map_err(autocommit)?;
    Ok(n == 1)
}

pub(crate) fn delete_intents(
    c: &mut SqliteConnection,
    ids: &[IntentId],
    owner: OwnerToken,
) -> Result<usize, MetadataError> {
    diesel::sql_query(format!(
        "DELETE FROM intents WHERE id IN {IN_JSON} AND owner = ?"
    ))
    .bind::<Text, _>(json_ids(ids.iter().map(|i| i.0)))
    .bind::<Text, _>(owner.0.to_string())
    .prepared()
    .execute(c)
    .map_err(autocommit)
}

/// Inside [`immediate`]: no other writer can claim between the read and the
/// update.
pub(crate) fn claim_expired(
    c: &mut SqliteConnection,
    now_ms: i64,
    owner: OwnerToken,
    lease_deadline_ms: i64,
    limit: usize,
) -> Result<Vec<Intent>, MetadataError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows: Vec<SqlIntent> = diesel::sql_query(format!(
        "SELECT {INTENT_COLUMNS} FROM intents WHERE lease_deadline_ms < ? AND state <> 'held' \
         ORDER BY lease_deadline_ms, seq LIMIT ?"
    ))
    .bind::<BigInt, _>(now_ms)
    .bind::<BigInt, _>(limit)
    .prepared()
    .load(c)
    .map_err(stmt)?;
    let mut claimed = rows
        .into_iter()
        .map(SqlIntent::into_intent)
        .collect::<Result<Vec<_>, _>>()?;
    if claimed.is_empty() {
        return Ok(claimed);
    }
    diesel::sql_query(format!(
        "UPDATE intents SET owner = ?, lease_deadline_ms = ?, attempts = attempts + 1 \
         WHERE id IN {IN_JSON}"
    ))
    .bind::<Text, _>(owner.0.to_string())
    .bind::<BigInt, _>(lease_deadline_ms)
    .bind::<Text, _>(json_ids(claimed.iter().map(|i| i.id.0)))
    .prepared()
    .execute(c)
    .map_err(stmt)?;
    for intent in &mut claimed {
        intent.owner = owner;
        intent.lease_deadline_ms = lease_deadline_ms;
        intent.attempts = intent.attempts.saturating_add(1);
    }
    Ok(claimed)
}

pub(crate) fn set_last_error(
    c: &mut SqliteConnection,
    id: IntentId,
    owner: OwnerToken,
    message: &str,
) -> Result<(), MetadataError> {
    diesel::sql_query("UPDATE intents SET last_error = ? WHERE id = ? AND owner = ?")
        .bind::<Text, _>(message)
        .bind::<Text, _>(id.0.to_string())
        .bind::<Text, _>(owner.0.to_string())
        .prepared()
        .execute(c)
        .map_err(autocommit)?;
    Ok(())
}

pub(crate) fn referenced_points(
    c: &mut SqliteConnection,
    points: &[PointId],
) -> Result<HashSet<PointId>, MetadataError> {
    let wanted = json_ids(points.iter().map(|p| p.0));
    let rows: Vec<SqlPoint> = diesel::sql_query(format!(
        "SELECT point_id FROM records WHERE point_id IN {IN_JSON} \
         UNION SELECT j.value AS point_id FROM intents, json_each(intents.point_ids) AS j \
         WHERE intents.state = 'held' AND j.value IN {IN_JSON}"
    ))
    .bind::<Text, _>(&wanted)
    .bind::<Text, _>(&wanted)
    .prepared()
    .load(c)
    .map_err(stmt)?;
    rows.iter()
        .map(|r| parse_uuid(&r.point_id).map(PointId))
        .collect()
}

pub(crate) fn rows_by_points(
    c: &mut SqliteConnection,
    points: &[PointId],
    with_vectors: bool,
) -> Result<Vec<StoredRecord>, MetadataError> {
    let rows: Vec<SqlRecord> = diesel::sql_query(format!(
        "SELECT {RECORD_COLUMNS} FROM records WHERE point_id IN {IN_JSON}"
    ))
    .bind::<Bool, _>(with_vectors)
    .bind::<Text, _>(json_ids(points.iter().map(|p| p.0)))
    .prepared()
    .load(c)
    .map_err(stmt)?;
    let mut by_point = HashMap::with_capacity(rows.len());
    for row in rows {
        let record = row.into_record(with_vectors)?;
        by_point.insert(record.point_id, record);
    }
    Ok(points.iter().filter_map(|p| by_point.remove(p)).collect())
}

pub(crate) fn get(
    c: &mut SqliteConnection,
    ids: &[RecordId],
    keep_vectors: bool,
) -> Result<Vec<StoredRecord>, MetadataError> {
    let rows: Vec<SqlRecord> = diesel::sql_query(format!(
        "SELECT {RECORD_COLUMNS} FROM records WHERE id IN {IN_JSON}"
    ))
    .bind::<Bool, _>(keep_vectors)
    .bind::<Text, _>(json_ids(ids.iter().map(|i| i.0)))
    .prepared()
    .load(c)
    .map_err(stmt)?;
    let mut by_id = HashMap::with_capacity(rows.len());
    for row in rows {
        let record = row.into_record(keep_vectors)?;
        by_id.insert(record.id, record);
    }
    Ok(ids.iter().filter_map(|id| by_id.remove(id)).collect())
}

pub(crate) fn lookup_idempotency(
    c: &mut SqliteConnection,
    key: &str,
) -> Result<Option<IdempotencyRecord>, MetadataError> {
    let rows: Vec<SqlIdempotency> = diesel::sql_query(
        "SELECT key, request_hash, outcome, inserted, updated, deleted \
         FROM idempotency_keys WHERE key = ?",
    )
    .bind::<Text, _>(key)
    .prepared()
    .load(c)
    .map_err(stmt)?;
    rows.into_iter()
        .next()
        .map(|r| {
            IdempotencyRow {
                key: r.key,
                request_hash: r.request_hash,
                outcome: parse_json(&r.outcome)?,
                inserted: r.inserted,
                updated: r.updated,
                deleted: r.deleted,
            }
            .into_record()
        })
        .transpose()
}

pub(crate) fn scan_refs(
    c: &mut SqliteConnection,
    scope: Option<&Scope>,
    after: Option<RecordId>,
    limit: usize,
) -> Result<Page<RowRef, RecordId>, MetadataError> {
    // One more than asked tells whether another page follows.
    let fetch = page_limit(limit, "scan_refs")?.saturating_add(1);
    const COLS: &str = "SELECT id, scope, point_id, version FROM records";
    let rows: Vec<SqlScanRow> = match (scope, after) {
        (None, None) => diesel::sql_query(format!("{COLS} ORDER BY id LIMIT ?"))
            .bind::<BigInt, _>(fetch)
            .prepared()
            .load(c),
        (None, Some(after)) => {
            diesel::sql_query(format!("{COLS} WHERE id > ? ORDER BY id LIMIT ?"))
                .bind::<Text, _>(after.0.to_string())
                .bind::<BigInt, _>(fetch)
                .prepared()
                .load(c)
        }
        (Some(scope), None) => {
            diesel::sql_query(format!("{COLS} WHERE scope = ? ORDER BY id LIMIT ?"))
                .bind::<Text, _>(scope.as_str())
                .bind::<BigInt, _>(fetch)
                .prepared()
                .load(c)
        }
        (Some(scope), Some(after)) => diesel::sql_query(format!(
            "{COLS} WHERE scope = ? AND id > ? ORDER BY id LIMIT ?"
        ))
        .bind::<Text, _>(scope.as_str())
        .bind::<Text, _>(after.0.to_string())
        .bind::<BigInt, _>(fetch)
        .prepared()
        .load(c),
    }
    .map_err(stmt)?;
    let mut items = rows
        .into_iter()
        .map(|r| {
            Ok(RowRef {
                id: RecordId(parse_uuid(&r.id)?),
                scope: Scope::new(r.scope),
                point_id: PointId(parse_uuid(&r.point_id)?),
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

pub(crate) fn list_intents(
    c: &mut SqliteConnection,
    limit: usize,
) -> Result<Vec<Intent>, MetadataError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows: Vec<SqlIntent> = diesel::sql_query(format!(
        "SELECT {INTENT_COLUMNS} FROM intents ORDER BY created_ms, seq LIMIT ?"
    ))
    .bind::<BigInt, _>(limit)
    .prepared()
    .load(c)
    .map_err(stmt)?;
    rows.into_iter().map(SqlIntent::into_intent).collect()
}

pub(crate) fn count_by_scope(
    c: &mut SqliteConnection,
) -> Result<BTreeMap<Scope, u64>, MetadataError> {
    let rows: Vec<SqlScopeCount> =
        diesel::sql_query("SELECT scope, count(*) AS n FROM records GROUP BY scope")
            .prepared()
            .load(c)
            .map_err(stmt)?;
    rows.into_iter()
        .map(|r| Ok((Scope::new(r.scope), to_u64(r.n, "count")?)))
        .collect()
}

fn delete_pending_of(c: &mut SqliteConnection, ids: &[RecordId]) -> Result<(), MetadataError> {
    diesel::sql_query(format!(
        "DELETE FROM pending_index WHERE record_id IN {IN_JSON}"
    ))
    .bind::<Text, _>(json_ids(ids.iter().map(|i| i.0)))
    .prepared()
    .execute(c)
    .map_err(stmt)?;
    Ok(())
}

/// `ids` as the optional JSON array of the dead-letter statements (`None`:
/// every entry).
fn optional_ids(ids: Option<&[RecordId]>) -> Option<String> {
    ids.map(|ids| json_ids(ids.iter().map(|i| i.0)))
}

/// Inside [`immediate`]: each listed entry that `claim` holds at that
/// version is updated on its own; returns how many were dead-lettered.
pub(crate) fn record_index_failure(
    c: &mut SqliteConnection,
    claim: OwnerToken,
    entries: &[(RecordId, u64)],
    failure: &IndexFailure,
) -> Result<usize, MetadataError> {
    let counts = failure.counts || failure.permanent;
    let mut dead = 0;
    for (id, version) in entries {
        // The SET expressions read the entry as it was (attempts before + 1).
        let rows: Vec<SqlDead> = diesel::sql_query(
            "UPDATE pending_index SET last_error = ?, claimed_by = NULL, \
                 attempts = attempts + ?, \
                 dead = (? OR (? AND attempts + 1 >= ?)), \
                 claim_until_ms = CASE WHEN (? OR (? AND attempts + 1 >= ?)) THEN NULL ELSE ? END \
             WHERE record_id = ? AND version = ? AND claimed_by = ? AND dead = 0 \
             RETURNING dead",
        )
        .bind::<Text, _>(failure.message.as_str())
        .bind::<BigInt, _>(i64::from(counts))
        .bind::<Bool, _>(failure.permanent)
        .bind::<Bool, _>(failure.counts)
        .bind::<BigInt, _>(i64::from(failure.max_attempts))
        .bind::<Bool, _>(failure.permanent)
        .bind::<Bool, _>(failure.counts)
        .bind::<BigInt, _>(i64::from(failure.max_attempts))
        .bind::<BigInt, _>(failure.retry_at_ms)
        .bind::<Text, _>(id.0.to_string())
        .bind::<BigInt, _>(to_i64(*version, "version")?)
        .bind::<Text, _>(claim.0.to_string())
        .prepared()
        .load(c)
        .map_err(stmt)?;
        dead += rows.iter().filter(|r| r.dead).count();
    }
    Ok(dead)
}

pub(crate) fn list_pending(
    c: &mut SqliteConnection,
    filter: PendingFilter,
    after: Option<RecordId>,
    limit: usize,
) -> Result<Vec<PendingIndex>, MetadataError> {
    let (all, dead) = pending_filter(filter);
    let rows: Vec<SqlPending> = diesel::sql_query(format!(
        "SELECT {PENDING_COLUMNS} FROM {PENDING_FROM} \
         WHERE (? IS NULL OR p.record_id > ?) AND (? OR p.dead = ?) \
         ORDER BY p.record_id LIMIT ?"
    ))
    .bind::<Nullable<Text>, _>(after.map(|a| a.0.to_string()))
    .bind::<Nullable<Text>, _>(after.map(|a| a.0.to_string()))
    .bind::<Bool, _>(all)
    .bind::<Bool, _>(dead)
    .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
    .prepared()
    .load(c)
    .map_err(stmt)?;
    rows.into_iter().map(SqlPending::into_pending).collect()
}

pub(crate) fn pending_for(
    c: &mut SqliteConnection,
    ids: &[RecordId],
) -> Result<Vec<PendingIndex>, MetadataError> {
    let mut by_id: HashMap<RecordId, PendingIndex> = pending_of(c, ids.iter().map(|i| i.0))?
        .into_iter()
        .map(|e| (e.record_id, e))
        .collect();
    // In the order asked for, each entry once.
    Ok(ids.iter().filter_map(|id| by_id.remove(id)).collect())
}

pub(crate) fn retry_dead(
    c: &mut SqliteConnection,
    ids: Option<&[RecordId]>,
) -> Result<u64, MetadataError> {
    let ids = optional_ids(ids);
    let n = diesel::sql_query(format!(
        "UPDATE pending_index SET dead = 0, attempts = 0, claimed_by = NULL, \
             claim_until_ms = NULL \
         WHERE dead = 1 AND (? IS NULL OR record_id IN {IN_JSON})"
    ))
    .bind::<Nullable<Text>, _>(ids.as_deref())
    .bind::<Nullable<Text>, _>(ids.as_deref())
    .prepared()
    .execute(c)
    .map_err(autocommit)?;
    Ok(n as u64)
}

pub(crate) fn drop_dead(
    c: &mut SqliteConnection,
    ids: Option<&[RecordId]>,
) -> Result<u64, MetadataError> {
    let ids = optional_ids(ids);
    let n = diesel::sql_query(format!(
        "DELETE FROM pending_index WHERE dead = 1 AND (? IS NULL OR record_id IN {IN_JSON})"
    ))
    .bind::<Nullable<Text>, _>(ids.as_deref())
    .bind::<Nullable<Text>, _>(ids.as_deref())
    .prepared()
    .execute(c)
    .map_err(autocommit)?;
    Ok(n as u64)
}

pub(crate) fn pending_stats(
    c: &mut SqliteConnection,
    now_ms: i64,
) -> Result<PendingStats, MetadataError> {
    let window = PendingStats::rate_window(now_ms);
    let rows: Vec<SqlPendingStats> = diesel::sql_query(
        "SELECT COALESCE(SUM(dead = 0), 0) AS pending, \
             COALESCE(SUM(dead = 0 AND claim_until_ms IS NOT NULL AND claim_until_ms >= ?), 0) \
                 AS claimed, \
             COALESCE(SUM(dead = 1), 0) AS dead, \
             MIN(CASE WHEN dead = 0 THEN enqueued_ms END) AS oldest, \
             (SELECT COALESCE(SUM(indexed), 0) FROM index_activity \
                 WHERE bucket_s BETWEEN ? AND ?) AS indexed \
         FROM pending_index",
    )
    .bind::<BigInt, _>(now_ms)
    .bind::<BigInt, _>(*window.start())
    .bind::<BigInt, _>(*window.end())
    .prepared()
    .load(c)
    .map_err(stmt)?;
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
