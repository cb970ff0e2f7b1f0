//! The saga journal and the undo images of held commits, on PostgreSQL.

use std::collections::HashSet;

use diesel::QueryableByName;
use diesel::sql_types::{Array, BigInt, Bytea, Integer, Jsonb, Nullable, Text, Uuid as SqlUuid};
use diesel_async::RunQueryDsl;
use serde_json::Value;
use tandem_core::{
    Intent, IntentId, MetadataError, OwnerToken, SagaCounts, SagaId, SagaRecord, SagaState,
    UndoImage,
};
use uuid::Uuid;

use super::session::{INTENT_COLUMNS, PgIntent, Session};
use crate::sql::codec::{SagaRow, UndoRow, corrupt, steps_json, to_u64};
use crate::sql::prepared::PreparedExt;

#[derive(QueryableByName)]
struct PgUndo {
    #[diesel(sql_type = SqlUuid)]
    record_id: Uuid,
    #[diesel(sql_type = Nullable<Text>)]
    scope: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    content: Option<String>,
    #[diesel(sql_type = Nullable<Jsonb>)]
    metadata: Option<Value>,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    point_id: Option<Uuid>,
    #[diesel(sql_type = Nullable<BigInt>)]
    version: Option<i64>,
    #[diesel(sql_type = Nullable<Bytea>)]
    vector: Option<Vec<u8>>,
    #[diesel(sql_type = Nullable<BigInt>)]
    after_version: Option<i64>,
    #[diesel(sql_type = Nullable<Jsonb>)]
    pending: Option<Value>,
}

#[derive(QueryableByName)]
struct PgSaga {
    #[diesel(sql_type = SqlUuid)]
    id: Uuid,
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Jsonb)]
    input: Value,
    #[diesel(sql_type = Text)]
    state: String,
    #[diesel(sql_type = Jsonb)]
    steps: Value,
    #[diesel(sql_type = SqlUuid)]
    owner: Uuid,
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

impl PgSaga {
    fn into_saga(self) -> Result<SagaRecord, MetadataError> {
        SagaRow {
            id: self.id,
            name: self.name,
            input: self.input,
            state: self.state,
            steps: self.steps,
            owner: self.owner,
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
struct PgStateCount {
    #[diesel(sql_type = Text)]
    state: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

const SAGA_COLUMNS: &str = "id, name, input, state, steps, owner, lease_deadline_ms, attempts, \
                            last_error, created_ms, updated_ms";

fn sagas(rows: Vec<PgSaga>) -> Result<Vec<SagaRecord>, MetadataError> {
    rows.into_iter().map(PgSaga::into_saga).collect()
}

impl Session {
    pub(crate) async fn undo_images(
        &mut self,
        intent: IntentId,
    ) -> Result<Vec<UndoImage>, MetadataError> {
        let rows: Vec<PgUndo> = diesel::sql_query(
            "SELECT record_id, scope, content, metadata, point_id, version, vector, \
             after_version, pending FROM intent_undo WHERE intent_id = $1 ORDER BY record_id",
        )
        .bind::<SqlUuid, _>(intent.0)
        .prepared()
        .load(self.c())
        .await
        .map_err(|e| self.stmt(e))?;
        let keep = self.keep_vectors;
        rows.into_iter()
            .map(|r| {
                let mut image = UndoRow {
                    record_id: r.record_id,
                    scope: r.scope,
                    content: r.content,
                    metadata: r.metadata,
                    point_id: r.point_id,
                    version: r.version,
                    vector: r.vector,
                    after_version: r.after_version,
                    pending: r.pending,
                }
                .into_image()?;
                if !keep && let Some(before) = &mut image.before {
                    before.vector = None;
                }
                Ok(image)
            })
            .collect()
    }

    pub(crate) async fn create_saga(&mut self, saga: &SagaRecord) -> Result<(), MetadataError> {
        let steps = steps_json(saga)?;
        diesel::sql_query(
            "INSERT INTO sagas (id, name, input, state, steps, owner, lease_deadline_ms, \
             attempts, last_error, created_ms, updated_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (id) DO NOTHING",
        )
        .bind::<SqlUuid, _>(saga.id.0)
        .bind::<Text, _>(saga.name.as_str())
        .bind::<Jsonb, _>(&saga.input)
        .bind::<Text, _>(saga.state.as_str())
        .bind::<Jsonb, _>(steps)
        .bind::<SqlUuid, _>(saga.owner.0)
        .bind::<BigInt, _>(saga.lease_deadline_ms)
        .bind::<Integer, _>(i32::try_from(saga.attempts).unwrap_or(i32::MAX))
        .bind::<Nullable<Text>, _>(saga.last_error.as_deref())
        .bind::<BigInt, _>(saga.created_ms)
        .bind::<BigInt, _>(saga.updated_ms)
        .prepared()
        .execute(self.c())
        .await
        .map_err(|e| self.autocommit(e))?;
        Ok(())
    }

    /// The fenced overwrite of a saga, inside the caller's transaction; a
    /// terminal state releases the intents its steps hold.
    pub(crate) async fn save_saga(
        &mut self,
        saga: &SagaRecord,
        fence: OwnerToken,
    ) -> Result<Vec<Intent>, MetadataError> {
        self.in_tx().await?;
        let steps = steps_json(saga)?;
        let n = diesel::sql_query(
            "UPDATE sagas SET state = $2, steps = $3, owner = $4, lease_deadline_ms = $5, \
             attempts = $6, last_error = $7, updated_ms = $8 WHERE id = $1 AND owner = $9",
        )
        .bind::<SqlUuid, _>(saga.id.0)
        .bind::<Text, _>(saga.state.as_str())
        .bind::<Jsonb, _>(steps)
        .bind::<SqlUuid, _>(saga.owner.0)
        .bind::<BigInt, _>(saga.lease_deadline_ms)
        .bind::<Integer, _>(i32::try_from(saga.attempts).unwrap_or(i32::MAX))
        .bind::<Nullable<Text>, _>(saga.last_error.as_deref())
        .bind::<BigInt, _>(saga.updated_ms)
        .bind::<SqlUuid, _>(fence.0)
        .prepared()
        .execute(self.c())
        .await
        .map_err(|e| self.stmt(e))?;
        if n == 0 {
            return Err(MetadataError::SagaFenced { saga: saga.id });
        }
        let held = saga.held_intents();
        if saga.state.is_live() || held.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = held.iter().map(|i| i.0).collect();
        let released: Vec<PgIntent> = diesel::sql_query(format!(
            "UPDATE intents SET state = 'committed', owner = $2, lease_deadline_ms = $3 \
             WHERE id = ANY($1) AND state = 'held' RETURNING {INTENT_COLUMNS}"
        ))
        .bind::<Array<SqlUuid>, _>(&ids)
        .bind::<SqlUuid, _>(saga.owner.0)
        .bind::<BigInt, _>(saga.lease_deadline_ms)
        .prepared()
        .load(self.c())
        .await
        .map_err(|e| self.stmt(e))?;
        diesel::sql_query("DELETE FROM intent_undo WHERE intent_id = ANY($1)")
            .bind::<Array<SqlUuid>, _>(&ids)
            .prepared()
            .execute(self.c())
            .await
            .map_err(|e| self.stmt(e))?;
        released.into_iter().map(PgIntent::into_intent).collect()
    }

    pub(crate) async fn claim_sagas(
        &mut self,
        now_ms: i64,
        owner: OwnerToken,
        lease_deadline_ms: i64,
        limit: usize,
    ) -> Result<Vec<SagaRecord>, MetadataError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let columns = SAGA_COLUMNS
            .split(", ")
            .map(|c| format!("s.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        // SKIP LOCKED: a saga whose step is committing (its commit holds the
        // saga's row) or that another recoverer is claiming is left alone.
        let mut rows: Vec<(PgSaga, i64)> = diesel::sql_query(format!(
            "WITH picked AS ( \
                 SELECT id, lease_deadline_ms AS old_lease FROM sagas \
                 WHERE state IN ('running', 'compensating') AND lease_deadline_ms < $1 \
                 ORDER BY lease_deadline_ms, seq LIMIT $2 FOR UPDATE SKIP LOCKED) \
             UPDATE sagas AS s SET owner = $3, lease_deadline_ms = $4, \
                 attempts = s.attempts + 1 \
             FROM picked WHERE s.id = picked.id \
             RETURNING {columns}, picked.old_lease"
        ))
        .bind::<BigInt, _>(now_ms)
        .bind::<BigInt, _>(limit)
        .bind::<SqlUuid, _>(owner.0)
        .bind::<BigInt, _>(lease_deadline_ms)
        .prepared()
        .load::<PgClaimedSaga>(self.c())
        .await
        .map_err(|e| self.autocommit(e))?
        .into_iter()
        .map(|r| (r.saga, r.old_lease))
        .collect();
        rows.sort_by_key(|(s, old)| (*old, s.created_ms));
        rows.into_iter().map(|(s, _)| s.into_saga()).collect()
    }

    pub(crate) async fn take_saga(
        &mut self,
        id: SagaId,
        owner: OwnerToken,
        lease_deadline_ms: i64,
    ) -> Result<Option<SagaRecord>, MetadataError> {
        let rows: Vec<PgSaga> = diesel::sql_query(format!(
            "UPDATE sagas SET owner = $2, lease_deadline_ms = $3 \
             WHERE id = $1 AND state IN ('running', 'compensating') RETURNING {SAGA_COLUMNS}"
        ))
        .bind::<SqlUuid, _>(id.0)
        .bind::<SqlUuid, _>(owner.0)
        .bind::<BigInt, _>(lease_deadline_ms)
        .prepared()
        .load(self.c())
        .await
        .map_err(|e| self.autocommit(e))?;
        sagas(rows).map(|s| s.into_iter().next())
    }

    pub(crate) async fn get_saga(
        &mut self,
        id: SagaId,
    ) -> Result<Option<SagaRecord>, MetadataError> {
        let rows: Vec<PgSaga> =
            diesel::sql_query(format!("SELECT {SAGA_COLUMNS} FROM sagas WHERE id = $1"))
                .bind::<SqlUuid, _>(id.0)
                .prepared()
                .load(self.c())
                .await
                .map_err(|e| self.stmt(e))?;
        sagas(rows).map(|s| s.into_iter().next())
    }

    pub(crate) async fn list_sagas(
        &mut self,
        state: Option<SagaState>,
        limit: usize,
    ) -> Result<Vec<SagaRecord>, MetadataError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows: Vec<PgSaga> =
            match state {
                Some(state) => {
                    diesel::sql_query(format!(
                        "SELECT {SAGA_COLUMNS} FROM sagas WHERE state = $1 \
                 ORDER BY created_ms DESC, seq DESC LIMIT $2"
                    ))
                    .bind::<Text, _>(state.as_str())
                    .bind::<BigInt, _>(limit)
                    .prepared()
                    .load(self.c())
                    .await
                }
                None => diesel::sql_query(format!(
                    "SELECT {SAGA_COLUMNS} FROM sagas ORDER BY created_ms DESC, seq DESC LIMIT $1"
                ))
                .bind::<BigInt, _>(limit)
                .prepared()
                .load(self.c())
                .await,
            }
            .map_err(|e| self.stmt(e))?;
        sagas(rows)
    }

    pub(crate) async fn count_sagas(&mut self) -> Result<SagaCounts, MetadataError> {
        let rows: Vec<PgStateCount> =
            diesel::sql_query("SELECT state, count(*) AS n FROM sagas GROUP BY state")
                .prepared()
                .load(self.c())
                .await
                .map_err(|e| self.stmt(e))?;
        let mut seen = HashSet::new();
        rows.into_iter()
            .map(|r| {
                let state = SagaState::parse(&r.state)
                    .filter(|s| seen.insert(*s))
                    .ok_or_else(|| corrupt(format!("sagas: unknown state {:?}", r.state)))?;
                Ok((state, to_u64(r.n, "count")?))
            })
            .collect()
    }
}

#[derive(QueryableByName)]
struct PgClaimedSaga {
    #[diesel(embed)]
    saga: PgSaga,
    #[diesel(sql_type = BigInt)]
    old_lease: i64,
}
