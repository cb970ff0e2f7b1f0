//! Re-indexing's statements (SQLite flavour of `postgres/reindex.rs`): the
//! `index_state` row, the change-ordered scan of `records`, and
//! `migration_garbage` (which the `records` triggers fill, as they set
//! `change_seq`; see the `2026-12-09-000000_reindex` migration). Writes run
//! inside [`immediate`](super::session::immediate): the writer lock orders
//! them with every commit, so change sequences follow commit order.

use async_trait::async_trait;
use diesel::sql_types::{BigInt, Binary, Bool, Nullable, Text};
use diesel::{QueryableByName, RunQueryDsl, SqliteConnection};
use tandem_core::{
    ChangedRow, IndexState, MetadataError, NewIntent, OwnerToken, PointId, StagedVector,
    SwitchCounts,
};

use super::session::{
    IN_JSON, RECORD_COLUMNS, SqlRecord, SyncTx, insert_intent, json_ids, json_text, parse_json,
    parse_uuid, stmt,
};
use crate::sql::codec::{corrupt, encode_vector, to_i64, to_u64};
use crate::sql::prepared::PreparedExt;
use crate::sql::reindex::{IndexStateRow, ReindexOps, check_generation};

const STATE_COLUMNS: &str = "generation, active, retired, spec, owner, lease_until_ms, \
                             scan_cursor, copied, started_ms, frozen_until_ms";

#[derive(QueryableByName)]
struct SqlIndexState {
    #[diesel(sql_type = BigInt)]
    generation: i64,
    #[diesel(sql_type = Nullable<Text>)]
    active: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    retired: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    spec: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    owner: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    lease_until_ms: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    scan_cursor: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    copied: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    started_ms: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    frozen_until_ms: Option<i64>,
}

impl SqlIndexState {
    fn into_state(self) -> Result<IndexState, MetadataError> {
        IndexStateRow {
            generation: self.generation,
            active: self.active,
            retired: self.retired,
            spec: self.spec.as_deref().map(parse_json).transpose()?,
            owner: self.owner.as_deref().map(parse_uuid).transpose()?,
            lease_until_ms: self.lease_until_ms,
            scan_cursor: self.scan_cursor,
            copied: self.copied,
            started_ms: self.started_ms,
            frozen_until_ms: self.frozen_until_ms,
        }
        .into_state()
    }
}

#[derive(QueryableByName)]
struct SqlGeneration {
    #[diesel(sql_type = BigInt)]
    generation: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    frozen_until_ms: Option<i64>,
}

#[derive(QueryableByName)]
struct SqlChanged {
    #[diesel(sql_type = BigInt)]
    change_seq: i64,
    #[diesel(embed)]
    record: SqlRecord,
    #[diesel(sql_type = Bool)]
    indexed: bool,
}

#[derive(QueryableByName)]
struct SqlSwitchCounts {
    #[diesel(sql_type = BigInt)]
    changed: i64,
    #[diesel(sql_type = BigInt)]
    garbage: i64,
    #[diesel(sql_type = BigInt)]
    held: i64,
    #[diesel(sql_type = BigInt)]
    deferred: i64,
}

#[derive(QueryableByName)]
struct SqlGarbage {
    #[diesel(sql_type = Text)]
    point_id: String,
}

/// The index state (inside a transaction or not).
pub(crate) fn index_state(c: &mut SqliteConnection) -> Result<IndexState, MetadataError> {
    let rows: Vec<SqlIndexState> =
        diesel::sql_query(format!("SELECT {STATE_COLUMNS} FROM index_state"))
            .prepared()
            .load(c)
            .map_err(stmt)?;
    rows.into_iter()
        .next()
        .ok_or_else(|| corrupt("the index_state row is missing".to_owned()))?
        .into_state()
}

/// `prepare` inside [`immediate`](super::session::immediate): the intent is
/// inserted only if its generation is the store's and no switch is in
/// progress at its creation time (the writer lock keeps a switch out
/// between the check and the insert).
pub(crate) fn prepare(c: &mut SqliteConnection, intent: &NewIntent) -> Result<(), MetadataError> {
    let rows: Vec<SqlGeneration> =
        diesel::sql_query("SELECT generation, frozen_until_ms FROM index_state")
            .prepared()
            .load(c)
            .map_err(stmt)?;
    let state = rows
        .into_iter()
        .next()
        .ok_or_else(|| corrupt("the index_state row is missing".to_owned()))?;
    check_generation(intent, state.generation, state.frozen_until_ms)?;
    insert_intent(c, intent)
}

/// Rows changed after `after`, in change order.
pub(crate) fn scan(
    c: &mut SqliteConnection,
    after: u64,
    limit: usize,
    keep_vectors: bool,
) -> Result<Vec<ChangedRow>, MetadataError> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let Ok(after) = i64::try_from(after) else {
        return Ok(Vec::new());
    };
    let rows: Vec<SqlChanged> = diesel::sql_query(format!(
        "SELECT change_seq, {RECORD_COLUMNS}, NOT EXISTS (SELECT 1 FROM pending_index AS p \
             WHERE p.record_id = records.id AND p.indexed_version = 0) AS indexed \
         FROM records WHERE change_seq > ? ORDER BY change_seq LIMIT ?"
    ))
    .bind::<Bool, _>(keep_vectors)
    .bind::<BigInt, _>(after)
    .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
    .prepared()
    .load(c)
    .map_err(stmt)?;
    rows.into_iter()
        .map(|r| {
            Ok(ChangedRow {
                seq: to_u64(r.change_seq, "change_seq")?,
                row: r.record.into_record(keep_vectors)?,
                indexed: r.indexed,
            })
        })
        .collect()
}

/// Up to `limit` recorded garbage points.
pub(crate) fn garbage(
    c: &mut SqliteConnection,
    limit: usize,
) -> Result<Vec<PointId>, MetadataError> {
    let rows: Vec<SqlGarbage> =
        diesel::sql_query("SELECT point_id FROM migration_garbage ORDER BY point_id LIMIT ?")
            .bind::<BigInt, _>(i64::try_from(limit).unwrap_or(i64::MAX))
            .prepared()
            .load(c)
            .map_err(stmt)?;
    rows.iter()
        .map(|r| Ok(PointId(parse_uuid(&r.point_id)?)))
        .collect()
}

#[async_trait]
impl ReindexOps for SyncTx<'_> {
    async fn lock_state(&mut self, _exclusive: bool) -> Result<IndexState, MetadataError> {
        // The immediate transaction holds the database's write lock.
        index_state(self.c)
    }

    async fn save_state(&mut self, state: &IndexState) -> Result<(), MetadataError> {
        let row = IndexStateRow::of(state)?;
        diesel::sql_query(
            "UPDATE index_state SET generation = ?, active = ?, retired = ?, spec = ?, \
             owner = ?, lease_until_ms = ?, scan_cursor = ?, copied = ?, started_ms = ?, \
             frozen_until_ms = ?",
        )
        .bind::<BigInt, _>(row.generation)
        .bind::<Nullable<Text>, _>(row.active)
        .bind::<Nullable<Text>, _>(row.retired)
        .bind::<Nullable<Text>, _>(row.spec.as_ref().map(json_text))
        .bind::<Nullable<Text>, _>(row.owner.map(|o| o.to_string()))
        .bind::<Nullable<BigInt>, _>(row.lease_until_ms)
        .bind::<Nullable<BigInt>, _>(row.scan_cursor)
        .bind::<Nullable<BigInt>, _>(row.copied)
        .bind::<Nullable<BigInt>, _>(row.started_ms)
        .bind::<Nullable<BigInt>, _>(row.frozen_until_ms)
        .prepared()
        .execute(self.c)
        .map_err(stmt)?;
        Ok(())
    }

    async fn clear_garbage(&mut self) -> Result<(), MetadataError> {
        diesel::sql_query("DELETE FROM migration_garbage")
            .prepared()
            .execute(self.c)
            .map_err(stmt)?;
        Ok(())
    }

    async fn forget_garbage(&mut self, points: &[PointId]) -> Result<(), MetadataError> {
        diesel::sql_query(format!(
            "DELETE FROM migration_garbage WHERE point_id IN {IN_JSON}"
        ))
        .bind::<Text, _>(json_ids(points.iter().map(|p| p.0)))
        .prepared()
        .execute(self.c)
        .map_err(stmt)?;
        Ok(())
    }

    async fn stage_vectors(&mut self, vectors: &[StagedVector]) -> Result<(), MetadataError> {
        if !self.keep_vectors {
            return Ok(());
        }
        // One statement per row: inside the immediate transaction, SQLite's
        // per-statement cost is small next to the embedding that made them.
        for v in vectors {
            diesel::sql_query(
                "INSERT INTO migration_vectors (record_id, seq, vector) VALUES (?, ?, ?)                  ON CONFLICT (record_id) DO UPDATE SET seq = excluded.seq, vector = excluded.vector",
            )
            .bind::<Text, _>(v.record_id.0.to_string())
            .bind::<BigInt, _>(to_i64(v.seq, "change_seq")?)
            .bind::<Binary, _>(encode_vector(&v.vector))
            .prepared()
            .execute(self.c)
            .map_err(stmt)?;
        }
        Ok(())
    }

    async fn apply_staged_vectors(&mut self) -> Result<(), MetadataError> {
        if self.keep_vectors {
            diesel::sql_query(
                "UPDATE records SET vector = (SELECT s.vector FROM migration_vectors AS s                      WHERE s.record_id = records.id)                  WHERE vector IS NOT NULL AND EXISTS (SELECT 1 FROM migration_vectors AS s                      WHERE s.record_id = records.id AND s.seq = records.change_seq)",
            )
            .prepared()
            .execute(self.c)
            .map_err(stmt)?;
        }
        self.clear_staged_vectors().await
    }

    async fn clear_staged_vectors(&mut self) -> Result<(), MetadataError> {
        diesel::sql_query("DELETE FROM migration_vectors")
            .prepared()
            .execute(self.c)
            .map_err(stmt)?;
        Ok(())
    }

    async fn fence_prepared(&mut self, now_ms: i64) -> Result<u64, MetadataError> {
        // One owner nobody holds, for all of them.
        let n = diesel::sql_query(
            "UPDATE intents SET owner = ?, lease_deadline_ms = min(lease_deadline_ms, ?) \
             WHERE state = 'prepared'",
        )
        .bind::<Text, _>(OwnerToken::new_random().0.to_string())
        .bind::<BigInt, _>(now_ms)
        .prepared()
        .execute(self.c)
        .map_err(stmt)?;
        Ok(n as u64)
    }

    async fn switch_counts(&mut self, cursor: u64) -> Result<SwitchCounts, MetadataError> {
        let rows: Vec<SqlSwitchCounts> = diesel::sql_query(
            "SELECT (SELECT count(*) FROM records WHERE change_seq > ?) AS changed, \
                    (SELECT count(*) FROM migration_garbage) AS garbage, \
                    (SELECT count(*) FROM intents WHERE state = 'held') AS held, \
                    (SELECT count(*) FROM pending_index) AS deferred",
        )
        .bind::<BigInt, _>(i64::try_from(cursor).unwrap_or(i64::MAX))
        .prepared()
        .load(self.c)
        .map_err(stmt)?;
        let r = rows
            .into_iter()
            .next()
            .ok_or_else(|| corrupt("no counts".to_owned()))?;
        Ok(SwitchCounts {
            rows: to_u64(r.changed, "count")?,
            garbage: to_u64(r.garbage, "count")?,
            held: to_u64(r.held, "count")?,
            deferred: to_u64(r.deferred, "count")?,
        })
    }
}
