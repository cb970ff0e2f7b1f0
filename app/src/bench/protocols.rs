//! The two reference protocols Tandem is measured against, on the baselines'
//! own tables and collections.
//!
//! - **raw**: the physical reference: one multi-row insert + commit, then one
//!   index upsert (`wait=true`). No intent, no guard, no safety.
//! - **raw-overlapped**: the physical limit of a dual write: the same insert +
//!   commit and the same upsert, run concurrently (`tokio::join!`). No
//!   protocol at all; a batch takes max(metadata, index) instead of their sum.
//! - **naive**: compensation as commonly written: open a transaction, insert
//!   each record and flush it to learn its key, upsert the vectors, fetch each
//!   row back and set its point id, commit; on error roll back and delete the
//!   points. 3 round trips per record plus BEGIN and COMMIT.

use serde_json::{Map, Value};
use tandem_core::{NewRecord, Point, PointId, RecordId, Scope, VectorIndex};

use super::sql::{Row, SqlSession};
use crate::error::AppError;

/// Which protocol a pass runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// The unprotected dual write.
    Raw,
    /// The unprotected dual write, both stores at once.
    #[serde(rename = "raw-overlapped")]
    RawOverlapped,
    /// The compensation protocol.
    Naive,
    /// `Coordinator::upsert`.
    Tandem,
    /// The metadata insert + commit alone (what a deferred write's one
    /// transaction is compared with).
    #[serde(rename = "raw-insert")]
    RawInsert,
    /// `Coordinator::upsert_with` in deferred mode (no index write).
    Deferred,
}

impl Protocol {
    /// In the order the first repetition runs them.
    pub const ALL: [Protocol; 6] = [
        Protocol::Raw,
        Protocol::RawOverlapped,
        Protocol::Naive,
        Protocol::Tandem,
        Protocol::RawInsert,
        Protocol::Deferred,
    ];

    /// The dual writes, which rotate their order each repetition (the raw
    /// insert and the deferred write run paired, call by call, after them
    /// in the rotation).
    pub const DUAL: [Protocol; 4] = [
        Protocol::Raw,
        Protocol::RawOverlapped,
        Protocol::Naive,
        Protocol::Tandem,
    ];

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Raw => "raw",
            Protocol::RawOverlapped => "raw-overlapped",
            Protocol::Naive => "naive",
            Protocol::Tandem => "tandem",
            Protocol::RawInsert => "raw-insert",
            Protocol::Deferred => "deferred",
        }
    }
}

/// The little-endian bytes of a vector, as Tandem's stores keep it.
fn vector_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The rows and the points of a batch, with fresh point ids.
fn rows_and_points(batch: &[NewRecord], keep_vectors: bool) -> (Vec<Row>, Vec<Point>) {
    let now = now_ms();
    let mut rows = Vec::with_capacity(batch.len());
    let mut points = Vec::with_capacity(batch.len());
    for r in batch {
        let id = r.id.unwrap_or_else(RecordId::new_v7);
        let point = PointId::new_v7();
        let metadata: Map<String, Value> = match &r.metadata {
            Value::Object(m) => m.clone(),
            _ => Map::new(),
        };
        rows.push(Row {
            id: id.0,
            scope: r.scope.as_str().to_owned(),
            content: r.content.clone(),
            metadata: Value::Object(metadata.clone()),
            point_id: point.0,
            vector: keep_vectors.then(|| vector_bytes(&r.vector)),
        });
        points.push(Point {
            id: point,
            record_id: id,
            scope: Scope::new(r.scope.as_str()),
            metadata,
            vector: r.vector.clone(),
            written_at_ms: now,
        });
    }
    (rows, points)
}

fn index_error(e: tandem_core::IndexError) -> AppError {
    AppError::Failed(format!("bench baseline: index write: {e}"))
}

/// raw: insert + commit, then one index upsert.
pub async fn raw_upsert(
    session: &mut dyn SqlSession,
    index: &dyn VectorIndex,
    batch: &[NewRecord],
    keep_vectors: bool,
) -> Result<(), AppError> {
    let (rows, points) = rows_and_points(batch, keep_vectors);
    session.begin().await?;
    if let Err(e) = session.insert_many(&rows).await {
        let _ = session.rollback().await;
        return Err(e);
    }
    session.commit().await?;
    index.upsert(&points).await.map_err(index_error)
}

/// raw-insert: the insert + commit of raw, without the index write.
pub async fn raw_insert(
    session: &mut dyn SqlSession,
    batch: &[NewRecord],
    keep_vectors: bool,
) -> Result<(), AppError> {
    let (rows, _) = rows_and_points(batch, keep_vectors);
    session.begin().await?;
    if let Err(e) = session.insert_many(&rows).await {
        let _ = session.rollback().await;
        return Err(e);
    }
    session.commit().await
}

/// The batch under fresh record ids (the protocols that would otherwise
/// meet another protocol's rows in the same store).
pub fn with_fresh_ids(batch: Vec<NewRecord>) -> Vec<NewRecord> {
    batch
        .into_iter()
        .map(|r| NewRecord {
            id: Some(RecordId::new_v7()),
            ..r
        })
        .collect()
}

/// raw-overlapped: the same insert + commit as raw and the same upsert, both
/// in flight at once. Either may fail alone (nothing undoes the other): the
/// bench only needs the time, and a failure ends the run.
pub async fn raw_overlapped_upsert(
    session: &mut dyn SqlSession,
    index: &dyn VectorIndex,
    batch: &[NewRecord],
    keep_vectors: bool,
) -> Result<(), AppError> {
    let (rows, points) = rows_and_points(batch, keep_vectors);
    let metadata = async {
        session.begin().await?;
        if let Err(e) = session.insert_many(&rows).await {
            let _ = session.rollback().await;
            return Err(e);
        }
        session.commit().await
    };
    let (metadata, index) = tokio::join!(metadata, index.upsert(&points));
    metadata?;
    index.map_err(index_error)
}

/// naive: per-record flush, index write, per-record fetch and update, commit;
/// on error roll back and delete the points.
pub async fn naive_upsert(
    session: &mut dyn SqlSession,
    index: &dyn VectorIndex,
    batch: &[NewRecord],
    keep_vectors: bool,
) -> Result<(), AppError> {
    let (rows, points) = rows_and_points(batch, keep_vectors);
    session.begin().await?;
    let outcome = naive_body(session, index, &rows, &points).await;
    if let Err(e) = outcome {
        let _ = session.rollback().await;
        let ids: Vec<PointId> = points.iter().map(|p| p.id).collect();
        let _ = index.delete(&ids).await;
        return Err(e);
    }
    Ok(())
}

async fn naive_body(
    session: &mut dyn SqlSession,
    index: &dyn VectorIndex,
    rows: &[Row],
    points: &[Point],
) -> Result<(), AppError> {
    let mut keys = Vec::with_capacity(rows.len());
    for row in rows {
        keys.push(session.insert_returning_key(row).await?);
    }
    index.upsert(points).await.map_err(index_error)?;
    for (key, row) in keys.iter().zip(rows) {
        session.fetch(*key).await?;
        session.set_point(*key, row.point_id).await?;
    }
    session.commit().await
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::bench::counting::{Calls, Counters, CountingIndex};
    use crate::bench::sql::SqliteSession;
    use tandem_adapters::memory::InMemoryVectorIndex;
    use tandem_core::Distance;

    fn batch(n: usize) -> Vec<NewRecord> {
        crate::bench::data::batches(n, n, 4, 2, 3).remove(0)
    }

    #[test]
    fn rows_and_points_agree() {
        let b = batch(5);
        let (rows, points) = rows_and_points(&b, true);
        assert_eq!(
            rows.iter().map(|r| r.point_id).collect::<Vec<_>>(),
            points.iter().map(|p| p.id.0).collect::<Vec<_>>()
        );
        assert_eq!(rows[0].vector.as_ref().unwrap().len(), 16);
        assert!(rows_and_points(&b, false).0[0].vector.is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn round_trips_per_batch_are_constant_for_raw_and_overlapped_and_linear_for_naive() {
        let dir = tempfile::tempdir().unwrap();
        let counters = Arc::new(Counters::default());
        let index = CountingIndex::new(
            InMemoryVectorIndex::new(4, Distance::Cosine),
            counters.clone(),
        );
        let mut s = SqliteSession::open(&dir.path().join("b.sqlite3"), counters.clone())
            .await
            .unwrap();
        for n in [1usize, 10, 50] {
            let before = counters.read();
            raw_upsert(&mut s, &index, &batch(n), true).await.unwrap();
            assert_eq!(
                counters.read().since(before),
                Calls {
                    metadata: 3,
                    index: 1
                }
            );
            // The same statements and request, only at once.
            let before = counters.read();
            raw_overlapped_upsert(&mut s, &index, &batch(n), true)
                .await
                .unwrap();
            assert_eq!(
                counters.read().since(before),
                Calls {
                    metadata: 3,
                    index: 1
                }
            );
            let before = counters.read();
            naive_upsert(&mut s, &index, &batch(n), true).await.unwrap();
            let calls = counters.read().since(before);
            assert_eq!(
                calls,
                Calls {
                    metadata: 3 * n as u64 + 2,
                    index: 1
                },
                "n = {n}"
            );
        }
        assert_eq!(index.count(None).await.unwrap(), 3 * 61);
    }
}
