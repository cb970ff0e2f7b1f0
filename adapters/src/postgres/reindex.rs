//! Re-indexing's statements: the `index_state` row, the change-ordered scan
//! of `records`, and `migration_garbage` (which the `records` triggers fill;
//! see the `2026-12-09-000000_reindex` migration).

use async_trait::async_trait;
use diesel::QueryableByName;
use diesel::sql_types::{Array, BigInt, Binary, Bool, Jsonb, Nullable, Text, Uuid as SqlUuid};
use diesel_async::RunQueryDsl;
use serde_json::Value;
use tandem_core::{ChangedRow, IndexState, MetadataError, PointId, StagedVector, SwitchCounts};
use uuid::Uuid;

use super::session::{PgRecord, RECORD_COLUMNS, Session, uuids};
use crate::sql::codec::{corrupt, encode_vector, to_i64, to_u64};
use crate::sql::prepared::PreparedExt;
use crate::sql::reindex::{IndexStateRow, ReindexOps};

const STATE_COLUMNS: &str = "generation, active, retired, spec, owner, lease_until_ms, \
                             scan_cursor, copied, started_ms, frozen_until_ms";

#[derive(QueryableByName)]
struct PgIndexState {
    #[diesel(sql_type = BigInt)]
    generation: i64,
    #[diesel(sql_type = Nullable<Text>)]
    active: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    retired: Option<String>,
    #[diesel(sql_type = Nullable<Jsonb>)]
    spec: Option<Value>,
    #[diesel(sql_type = Nullable<SqlUuid>)]
    owner: Option<Uuid>,
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

impl PgIndexState {
    fn into_state(self) -> Result<IndexState, MetadataError> {
        IndexStateRow {
            generation: self.generation,
            active: self.active,
            retired: self.retired,
            spec: self.spec,
            owner: self.owner,
            lease_until_ms: self.lease_until_ms,
            scan_cursor: self.scan_cursor,
            copied: self.copied,
            started_ms: self.started_ms,
            frozen_until_ms: self.frozen_until_ms,
        }
        .into_state()
    }
}

fn one_state(rows: Vec<PgIndexState>) -> Result<IndexState, MetadataError> {
    rows.into_iter()
        .next()
        .ok_or_else(|| corrupt("the index_state row is missing".to_owned()))?
        .into_state()
}

#[derive(QueryableByName)]
struct PgChanged {
    #[diesel(sql_type = BigInt)]
    change_seq: i64,
    #[diesel(embed)]
    record: PgRecord,
    #[diesel(sql_type = Bool)]
    indexed: bool,
}

#[derive(QueryableByName)]
struct PgCount {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct PgSwitchCounts {
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
struct PgGarbage {
    #[diesel(sql_type = SqlUuid)]
    point_id: Uuid,
}

#[async_trait]
impl ReindexOps for Session {
    async fn lock_state(&mut self, exclusive: bool) -> Result<IndexState, MetadataError> {
        self.in_tx().await?;
        // `FOR UPDATE` conflicts with the prepares' `FOR KEY SHARE`; `FOR NO
        // KEY UPDATE` (a migration's progress) does not.
        let sql = if exclusive {
            format!("SELECT {STATE_COLUMNS} FROM index_state FOR UPDATE")
        } else {
            format!("SELECT {STATE_COLUMNS} FROM index_state FOR NO KEY UPDATE")
        };
        let rows: Vec<PgIndexState> = diesel::sql_query(sql)
            .prepared()
            .load(self.c())
            .await
            .map_err(|e| self.stmt(e))?;
        one_state(rows)
    }

    async fn save_state(&mut self, state: &IndexState) -> Result<(), MetadataError> {
        self.in_tx().await?;
        let row = IndexStateRow::of(state)?;
        diesel::sql_query(
            "UPDATE index_state SET generation = $1, active = $2, retired = $3, spec = $4, \
             owner = $5, lease_until_ms = $6, scan_cursor = $7, copied = $8, started_ms = $9, \
             frozen_until_ms = $10",
        )
        .bind::<BigInt, _>(row.generation)
        .bind::<Nullable<Text>, _>(row.active)
        .bind::<Nullable<Text>, _>(row.retired)
        .bind::<Nullable<Jsonb>, _>(row.spec)
        .bind::<Nullable<SqlUuid>, _>(row.owner)
        .bind::<Nullable<BigInt>, _>(row.lease_until_ms)
        .bind::<Nullable<BigInt>, _>(row.scan_cursor)
        .bind::<Nullable<BigInt>, _>(row.copied)
        .bind::<Nullable<BigInt>, _>(row.started_ms)
        .bind::<Nullable<BigInt>, _>(row.frozen_until_ms)
        .prepared()
        .execute(self.c())
        .await
        .map_err(|e| self.stmt(e))?;
        Ok(())
    }

    async fn clear_garbage(&mut self) -> Result<(), MetadataError> {
        self.in_tx().await?;
        diesel::sql_query("DELETE FROM migration_garbage")
            .prepared()
            .execute(self.c())
            .await
            .map_err(|e| self.stmt(e))?;
        Ok(())
    }

    async fn forget_garbage(&mut self, points: &[PointId]) -> Result<(), MetadataError> {
        self.in_tx().await?;
        diesel::sql_query("DELETE FROM migration_garbage WHERE point_id = ANY($1)")
            .bind::<Array<SqlUuid>, _>(uuids(points, |p| p.0))
            .prepared()
            .execute(self.c())
            .await
            .map_err(|e| self.stmt(e))?;
        Ok(())
    }

    async fn stage_vectors(&mut self, vectors: &[StagedVector]) -> Result<(), MetadataError> {
        if !self.keep_vectors {
            return Ok(());
        }
        self.in_tx().await?;
        let ids: Vec<Uuid> = vectors.iter().map(|v| v.record_id.0).collect();
        let seqs = vectors
            .iter()
            .map(|v| to_i64(v.seq, "change_seq"))
            .collect::<Result<Vec<_>, _>>()?;
        let blobs: Vec<Vec<u8>> = vectors.iter().map(|v| encode_vector(&v.vector)).collect();
        diesel::sql_query(
            "INSERT INTO migration_vectors (record_id, seq, vector)              SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::bytea[])              ON CONFLICT (record_id) DO UPDATE SET seq = excluded.seq, vector = excluded.vector",
        )
        .bind::<Array<SqlUuid>, _>(ids)
        .bind::<Array<BigInt>, _>(seqs)
        .bind::<Array<Binary>, _>(blobs)
        .prepared()
        .execute(self.c())
        .await
        .map_err(|e| self.stmt(e))?;
        Ok(())
    }

    async fn apply_staged_vectors(&mut self) -> Result<(), MetadataError> {
        self.in_tx().await?;
        if self.keep_vectors {
            diesel::sql_query(
                "UPDATE records AS r SET vector = s.vector FROM migration_vectors AS s                  WHERE r.id = s.record_id AND r.change_seq = s.seq AND r.vector IS NOT NULL",
            )
            .prepared()
            .execute(self.c())
            .await
            .map_err(|e| self.stmt(e))?;
        }
        self.clear_staged_vectors().await
    }

    async fn clear_staged_vectors(&mut self) -> Result<(), MetadataError> {
        self.in_tx().await?;
        diesel::sql_query("DELETE FROM migration_vectors")
            .prepared()
            .execute(self.c())
            .await
            .map_err(|e| self.stmt(e))?;
        Ok(())
    }

    async fn fence_prepared(&mut self, now_ms: i64) -> Result<u64, MetadataError> {
        self.in_tx().await?;
        // Waits for every commit that holds a prepared intent's lock; one
        // that committed meanwhile no longer matches (its intent is no
        // longer prepared) and is left alone.
        let n = diesel::sql_query(
            "UPDATE intents SET owner = gen_random_uuid(), \
             lease_deadline_ms = least(lease_deadline_ms, $1) WHERE state = 'prepared'",
        )
        .bind::<BigInt, _>(now_ms)
        .prepared()
        .execute(self.c())
        .await
        .map_err(|e| self.stmt(e))?;
        Ok(n as u64)
    }

    async fn switch_counts(&mut self, cursor: u64) -> Result<SwitchCounts, MetadataError> {
        self.in_tx().await?;
        let cursor = i64::try_from(cursor).unwrap_or(i64::MAX);
        let rows: Vec<PgSwitchCounts> = diesel::sql_query(
            "SELECT (SELECT count(*) FROM records WHERE change_seq > $1) AS changed, \
                    (SELECT count(*) FROM migration_garbage) AS garbage, \
                    (SELECT count(*) FROM intents WHERE state = 'held') AS held, \
                    (SELECT count(*) FROM records WHERE pending_ms IS NOT NULL) AS deferred",
        )
        .bind::<BigInt, _>(cursor)
        .prepared()
        .load(self.c())
        .await
        .map_err(|e| self.stmt(e))?;
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

/// Reads (no transaction).
impl Session {
    pub(crate) async fn index_state(&mut self) -> Result<IndexState, MetadataError> {
        let rows: Vec<PgIndexState> =
            diesel::sql_query(format!("SELECT {STATE_COLUMNS} FROM index_state"))
                .prepared()
                .load(self.c())
                .await
                .map_err(|e| self.stmt(e))?;
        one_state(rows)
    }

    /// Rows changed after `after`, in change order, up to a horizon below
    /// which no change can still commit. A row's sequence is taken when its
    /// statement runs, not when its transaction commits, so a commit still in
    /// flight may hold a sequence below one that a later commit already
    /// made visible; a scan that listed the later one and moved its cursor
    /// past would never list the first. So: (1) the last sequence handed
    /// out is read; (2) every commit that may have taken one up to it is
    /// waited for — each such commit holds its prepared intent's row lock
    /// from before it took a sequence until it ends, so a `FOR SHARE` lock on
    /// the prepared intents that someone holds (a non-zero `xmax`) waits for
    /// exactly those (an intent a commit creates itself is not seen, but such
    /// a commit only inserts deferred rows on reserved points, which the
    /// scan lists unindexed anyway and which move again when indexed); (3)
    /// rows up to that sequence are read, by a statement that starts after
    /// those commits ended.
    pub(crate) async fn reindex_scan(
        &mut self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ChangedRow>, MetadataError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let Ok(after) = i64::try_from(after) else {
            return Ok(Vec::new());
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let horizon: Vec<PgCount> = diesel::sql_query(
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END AS n FROM records_change_seq",
        )
        .prepared()
        .load(self.c())
        .await
        .map_err(|e| self.stmt(e))?;
        let horizon = horizon.into_iter().next().map_or(0, |h| h.n);
        if horizon <= after {
            return Ok(Vec::new());
        }
        let _: Vec<PgCount> = diesel::sql_query(
            "SELECT count(*) AS n FROM (SELECT 1 FROM intents \
                 WHERE state = 'prepared' AND xmax <> '0'::xid FOR SHARE) AS busy",
        )
        .prepared()
        .load(self.c())
        .await
        .map_err(|e| self.stmt(e))?;
        let keep = self.keep_vectors;
        let rows: Vec<PgChanged> = diesel::sql_query(format!(
            "SELECT change_seq, {RECORD_COLUMNS}, \
                 indexed_version IS DISTINCT FROM 0 AS indexed \
             FROM records WHERE change_seq > $2 AND change_seq <= $3 \
             ORDER BY change_seq LIMIT $4"
        ))
        .bind::<Bool, _>(keep)
        .bind::<BigInt, _>(after)
        .bind::<BigInt, _>(horizon)
        .bind::<BigInt, _>(limit)
        .prepared()
        .load(self.c())
        .await
        .map_err(|e| self.stmt(e))?;
        rows.into_iter()
            .map(|r| {
                Ok(ChangedRow {
                    seq: to_u64(r.change_seq, "change_seq")?,
                    row: r.record.into_record(keep)?,
                    indexed: r.indexed,
                })
            })
            .collect()
    }

    pub(crate) async fn reindex_garbage(
        &mut self,
        limit: usize,
    ) -> Result<Vec<PointId>, MetadataError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows: Vec<PgGarbage> =
            diesel::sql_query("SELECT point_id FROM migration_garbage ORDER BY point_id LIMIT $1")
                .bind::<BigInt, _>(limit)
                .prepared()
                .load(self.c())
                .await
                .map_err(|e| self.stmt(e))?;
        Ok(rows.into_iter().map(|r| PointId(r.point_id)).collect())
    }
}
