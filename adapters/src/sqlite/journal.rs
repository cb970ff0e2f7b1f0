//! The saga journal and the undo images of held commits, on SQLite. Every
//! function runs on the connection's blocking thread; the writes that must
//! not interleave with another writer run inside [`super::session::immediate`].

use diesel::sql_types::{BigInt, Binary, Integer, Nullable, Text};
use diesel::{QueryableByName, RunQueryDsl, SqliteConnection};
use tandem_core::{
    Intent, IntentId, MetadataError, OwnerToken, SagaCounts, SagaId, SagaRecord, SagaState,
    UndoImage,
};

use super::session::{
    IN_JSON, INTENT_COLUMNS, SqlIntent, autocommit, json_ids, json_text, parse_json, parse_uuid,
    stmt,
};
use crate::sql::codec::{SagaRow, UndoRow, corrupt, steps_json, to_u64};
use crate::sql::prepared::PreparedExt;

#[derive(QueryableByName)]
struct SqlUndo {
    #[diesel(sql_type = Text)]
    record_id: String,
    #[diesel(sql_type = Nullable<Text>)]
    scope: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    content: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    metadata: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    point_id: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    version: Option<i64>,
    #[diesel(sql_type = Nullable<Binary>)]
    vector: Option<Vec<u8>>,
    #[diesel(sql_type = Nullable<BigInt>)]
    after_version: Option<i64>,
    #[diesel(sql_type = Nullable<Text>)]
    pending: Option<String>,
}

#[derive(QueryableByName)]
struct SqlSaga {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Text)]
    input: String,
    #[diesel(sql_type = Text)]
    state: String,
    #[diesel(sql_type = Text)]
    steps: String,
    #[diesel(sql_type = Text)]
    owner: String,
    #[diesel(sql_type = BigInt)]
    lease_deadline_ms: i64,
    #[diesel(sql_type = Integer)]
    attempts: i32,
    #[diesel(sql_type = Nullable<Text>)]
    last_error: Option<String>,
    #[diesel(sql_type = BigInt)]
    created_ms: i64,
    #[diesel(sql_type = BigInt)]
    updated_ms: i64,
}

impl SqlSaga {
    fn into_saga(self) -> Result<SagaRecord, MetadataError> {
        SagaRow {
            id: parse_uuid(&self.id)?,
            name: self.name,
            input: parse_json(&self.input)?,
            state: self.state,
            steps: parse_json(&self.steps)?,
            owner: parse_uuid(&self.owner)?,
            lease_deadline_ms: self.lease_deadline_ms,
            attempts: self.attempts,
            last_error: self.last_error,
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
        }
        .into_saga()
    }
}

#[derive(QueryableByName)]
struct SqlStateCount {
    #[diesel(sql_type = Text)]
    state: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

const SAGA_COLUMNS: &str = "id, name, input, state, steps, owner, lease_deadline_ms, attempts, \
                            last_error, created_ms, updated_ms";

fn sagas(rows: Vec<SqlSaga>) -> Result<Vec<SagaRecord>, MetadataError> {
    rows.into_iter().map(SqlSaga::into_saga).collect()
}

pub(crate) fn undo_images(
    c: &mut SqliteConnection,
    intent: IntentId,
    keep_vectors: bool,
) -> Result<Vec<UndoImage>, MetadataError> {
    let rows: Vec<SqlUndo> = diesel::sql_query(
        "SELECT record_id, scope, content, metadata, point_id, version, vector, after_version, \
         pending FROM intent_undo WHERE intent_id = ? ORDER BY record_id",
    )
    .bind::<Text, _>(intent.0.to_string())
    .prepared()
    .load(c)
    .map_err(stmt)?;
    rows.into_iter()
        .map(|r| {
            let mut image = UndoRow {
                record_id: parse_uuid(&r.record_id)?,
                scope: r.scope,
                content: r.content,
                metadata: r.metadata.as_deref().map(parse_json).transpose()?,
                point_id: r.point_id.as_deref().map(parse_uuid).transpose()?,
                version: r.version,
                vector: r.vector,
                after_version: r.after_version,
                pending: r.pending.as_deref().map(parse_json).transpose()?,
            }
            .into_image()?;
            if !keep_vectors && let Some(before) = &mut image.before {
                before.vector = None;
            }
            Ok(image)
        })
        .collect()
}

pub(crate) fn create_saga(
    c: &mut SqliteConnection,
    saga: &SagaRecord,
) -> Result<(), MetadataError> {
    let steps = steps_json(saga)?;
    diesel::sql_query(
        "INSERT INTO sagas (id, name, input, state, steps, owner, lease_deadline_ms, attempts, \
         last_error, created_ms, updated_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind::<Text, _>(saga.id.0.to_string())
    .bind::<Text, _>(saga.name.as_str())
    .bind::<Text, _>(json_text(&saga.input))
    .bind::<Text, _>(saga.state.as_str())
    .bind::<Text, _>(json_text(&steps))
    .bind::<Text, _>(saga.owner.0.to_string())
    .bind::<BigInt, _>(saga.lease_deadline_ms)
    .bind::<Integer, _>(i32::try_from(saga.attempts).unwrap_or(i32::MAX))
    .bind::<Nullable<Text>, _>(saga.last_error.as_deref())
    .bind::<BigInt, _>(saga.created_ms)
    .bind::<BigInt, _>(saga.updated_ms)
    .prepared()
    .execute(c)
    .map_err(autocommit)?;
    Ok(())
}

/// Inside an immediate transaction: the fenced overwrite, and the release of
/// the held intents of a saga saved in a terminal state.
pub(crate) fn save_saga(
    c: &mut SqliteConnection,
    saga: &SagaRecord,
    fence: OwnerToken,
) -> Result<Vec<Intent>, MetadataError> {
    let steps = steps_json(saga)?;
    let n = diesel::sql_query(
        "UPDATE sagas SET state = ?, steps = ?, owner = ?, lease_deadline_ms = ?, attempts = ?, \
         last_error = ?, updated_ms = ? WHERE id = ? AND owner = ?",
    )
    .bind::<Text, _>(saga.state.as_str())
    .bind::<Text, _>(json_text(&steps))
    .bind::<Text, _>(saga.owner.0.to_string())
    .bind::<BigInt, _>(saga.lease_deadline_ms)
    .bind::<Integer, _>(i32::try_from(saga.attempts).unwrap_or(i32::MAX))
    .bind::<Nullable<Text>, _>(saga.last_error.as_deref())
    .bind::<BigInt, _>(saga.updated_ms)
    .bind::<Text, _>(saga.id.0.to_string())
    .bind::<Text, _>(fence.0.to_string())
    .prepared()
    .execute(c)
    .map_err(stmt)?;
    if n == 0 {
        return Err(MetadataError::SagaFenced { saga: saga.id });
    }
    let held = saga.held_intents();
    if saga.state.is_live() || held.is_empty() {
        return Ok(Vec::new());
    }
    let ids = json_ids(held.iter().map(|i| i.0));
    let released: Vec<SqlIntent> = diesel::sql_query(format!(
        "SELECT {INTENT_COLUMNS} FROM intents WHERE id IN {IN_JSON} AND state = 'held'"
    ))
    .bind::<Text, _>(&ids)
    .prepared()
    .load(c)
    .map_err(stmt)?;
    diesel::sql_query(format!(
        "UPDATE intents SET state = 'committed', owner = ?, lease_deadline_ms = ? \
         WHERE id IN {IN_JSON} AND state = 'held'"
    ))
    .bind::<Text, _>(saga.owner.0.to_string())
    .bind::<BigInt, _>(saga.lease_deadline_ms)
    .bind::<Text, _>(&ids)
    .prepared()
    .execute(c)
    .map_err(stmt)?;
    diesel::sql_query(format!(
        "DELETE FROM intent_undo WHERE intent_id IN {IN_JSON}"
    ))
    .bind::<Text, _>(&ids)
    .prepared()
    .execute(c)
    .map_err(stmt)?;
    released
        .into_iter()
        .map(|r| {
            let mut intent = r.into_intent()?;
            intent.state = tandem_core::IntentState::Committed;
            intent.owner = saga.owner;
            intent.lease_deadline_ms = saga.lease_deadline_ms;
            Ok(intent)
        })
        .collect()
}

/// Inside an immediate transaction: no other writer claims in between.
pub(crate) fn claim_sagas(
    c: &mut SqliteConnection,
    now_ms: i64,
    owner: OwnerToken,
    lease_deadline_ms: i64,
    limit: usize,
) -> Result<Vec<SagaRecord>, MetadataError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows: Vec<SqlSaga> = diesel::sql_query(format!(
        "SELECT {SAGA_COLUMNS} FROM sagas WHERE state IN ('running', 'compensating') \
         AND lease_deadline_ms < ? ORDER BY lease_deadline_ms, seq LIMIT ?"
    ))
    .bind::<BigInt, _>(now_ms)
    .bind::<BigInt, _>(limit)
    .prepared()
    .load(c)
    .map_err(stmt)?;
    let mut claimed = sagas(rows)?;
    if claimed.is_empty() {
        return Ok(claimed);
    }
    diesel::sql_query(format!(
        "UPDATE sagas SET owner = ?, lease_deadline_ms = ?, attempts = attempts + 1 \
         WHERE id IN {IN_JSON}"
    ))
    .bind::<Text, _>(owner.0.to_string())
    .bind::<BigInt, _>(lease_deadline_ms)
    .bind::<Text, _>(json_ids(claimed.iter().map(|s| s.id.0)))
    .prepared()
    .execute(c)
    .map_err(stmt)?;
    for saga in &mut claimed {
        saga.owner = owner;
        saga.lease_deadline_ms = lease_deadline_ms;
        saga.attempts = saga.attempts.saturating_add(1);
    }
    Ok(claimed)
}

/// Inside an immediate transaction.
pub(crate) fn take_saga(
    c: &mut SqliteConnection,
    id: SagaId,
    owner: OwnerToken,
    lease_deadline_ms: i64,
) -> Result<Option<SagaRecord>, MetadataError> {
    let n = diesel::sql_query(
        "UPDATE sagas SET owner = ?, lease_deadline_ms = ? \
         WHERE id = ? AND state IN ('running', 'compensating')",
    )
    .bind::<Text, _>(owner.0.to_string())
    .bind::<BigInt, _>(lease_deadline_ms)
    .bind::<Text, _>(id.0.to_string())
    .prepared()
    .execute(c)
    .map_err(stmt)?;
    if n == 0 {
        return Ok(None);
    }
    get_saga(c, id)
}

pub(crate) fn get_saga(
    c: &mut SqliteConnection,
    id: SagaId,
) -> Result<Option<SagaRecord>, MetadataError> {
    let rows: Vec<SqlSaga> =
        diesel::sql_query(format!("SELECT {SAGA_COLUMNS} FROM sagas WHERE id = ?"))
            .bind::<Text, _>(id.0.to_string())
            .prepared()
            .load(c)
            .map_err(stmt)?;
    sagas(rows).map(|s| s.into_iter().next())
}

pub(crate) fn list_sagas(
    c: &mut SqliteConnection,
    state: Option<SagaState>,
    limit: usize,
) -> Result<Vec<SagaRecord>, MetadataError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows: Vec<SqlSaga> = match state {
        Some(state) => diesel::sql_query(format!(
            "SELECT {SAGA_COLUMNS} FROM sagas WHERE state = ? \
             ORDER BY created_ms DESC, seq DESC LIMIT ?"
        ))
        .bind::<Text, _>(state.as_str())
        .bind::<BigInt, _>(limit)
        .prepared()
        .load(c),
        None => diesel::sql_query(format!(
            "SELECT {SAGA_COLUMNS} FROM sagas ORDER BY created_ms DESC, seq DESC LIMIT ?"
        ))
        .bind::<BigInt, _>(limit)
        .prepared()
        .load(c),
    }
    .map_err(stmt)?;
    sagas(rows)
}

pub(crate) fn count_sagas_of(
    c: &mut SqliteConnection,
    _keep_vectors: bool,
) -> Result<SagaCounts, MetadataError> {
    let rows: Vec<SqlStateCount> =
        diesel::sql_query("SELECT state, count(*) AS n FROM sagas GROUP BY state")
            .prepared()
            .load(c)
            .map_err(stmt)?;
    rows.into_iter()
        .map(|r| {
            let state = SagaState::parse(&r.state)
                .ok_or_else(|| corrupt(format!("sagas: unknown state {:?}", r.state)))?;
            Ok((state, to_u64(r.n, "count")?))
        })
        .collect()
}
