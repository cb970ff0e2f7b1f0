//! Group commit of qdrant-edge flushes in `EdgeVectorIndex`, and what it buys.
//!
//! Run with `--release -- --nocapture` to see the measured throughputs (they
//! are quoted in the `tandem_adapters::edge` module docs).

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use qdrant_edge::{
    CountRequest, EdgeConfig, EdgeShard, EdgeVectorParams, PointInsertOperations, PointOperations,
    PointStruct, PointStructPersisted, UpdateOperation,
};
use serde_json::json;
use tandem_adapters::edge::EdgeVectorIndex;
use tandem_core::{Distance, Point, PointId, RecordId, Scope, VectorIndex};

const DIM: usize = 64;
const BATCH: usize = 100;
const BATCHES: usize = 64;
const CALLERS: usize = 16;

fn batch(seed: usize) -> Vec<Point> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default();
    (0..BATCH)
        .map(|i| Point {
            id: PointId::new_random(),
            record_id: RecordId::new_v7(),
            scope: Scope::new(format!("scope-{}", seed % 4)),
            metadata: json!({"seed": seed, "i": i}).as_object().cloned().unwrap(),
            vector: (0..DIM)
                .map(|d| ((seed * 31 + i * 7 + d) % 97) as f32 / 97.0 + 0.01)
                .collect(),
            written_at_ms: now,
        })
        .collect()
}

fn rate(points: usize, seconds: f64) -> f64 {
    points as f64 / seconds
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_shares_flushes_between_concurrent_upserts() {
    let batches: Vec<Vec<Point>> = (0..BATCHES).map(batch).collect();
    let total = BATCHES * BATCH;

    // One caller at a time: every upsert pays for its own flush.
    let dir = tempfile::tempdir().unwrap();
    let index = EdgeVectorIndex::open(dir.path(), DIM, Distance::Cosine)
        .await
        .unwrap();
    let before = index.flush_count();
    let started = Instant::now();
    for points in &batches {
        index.upsert(points).await.unwrap();
    }
    let sequential = started.elapsed().as_secs_f64();
    let sequential_flushes = index.flush_count() - before;
    assert_eq!(sequential_flushes, BATCHES as u64);
    assert_eq!(index.count(None).await.unwrap(), total as u64);
    drop(index);

    // Many callers at once: one flush covers every upsert applied before it.
    let dir = tempfile::tempdir().unwrap();
    let index = Arc::new(
        EdgeVectorIndex::open(dir.path(), DIM, Distance::Cosine)
            .await
            .unwrap(),
    );
    let before = index.flush_count();
    let started = Instant::now();
    let mut callers = Vec::new();
    for caller in 0..CALLERS {
        let index = Arc::clone(&index);
        let mine: Vec<Vec<Point>> = batches
            .iter()
            .skip(caller)
            .step_by(CALLERS)
            .cloned()
            .collect();
        callers.push(tokio::spawn(async move {
            for points in &mine {
                index.upsert(points).await.unwrap();
            }
        }));
    }
    for caller in callers {
        caller.await.unwrap();
    }
    let grouped = started.elapsed().as_secs_f64();
    let grouped_flushes = index.flush_count() - before;
    assert_eq!(index.count(None).await.unwrap(), total as u64);
    assert!(
        grouped_flushes < BATCHES as u64 / 2,
        "{grouped_flushes} flushes for {BATCHES} concurrent upserts: flushes are not shared"
    );

    // The engine alone, never flushed (not durable: the baseline).
    let dir = tempfile::tempdir().unwrap();
    let config = EdgeConfig::builder()
        .vector(
            "",
            EdgeVectorParams::builder(DIM, qdrant_edge::Distance::Cosine).build(),
        )
        .build();
    let shard = EdgeShard::new(dir.path(), config).unwrap();
    let raw: Vec<Vec<PointStructPersisted>> = batches
        .iter()
        .map(|points| {
            points
                .iter()
                .map(|p| {
                    PointStruct::new(
                        qdrant_edge::PointId::Uuid(p.id.0),
                        p.vector.clone(),
                        json!({"record_id": p.record_id.to_string(), "scope": p.scope.as_str()}),
                    )
                    .into()
                })
                .collect()
        })
        .collect();
    let started = Instant::now();
    for points in raw {
        shard
            .update(UpdateOperation::PointOperation(
                PointOperations::UpsertPoints(PointInsertOperations::PointsList(points)),
            ))
            .unwrap();
    }
    let unflushed = started.elapsed().as_secs_f64();
    let counted = shard
        .count(CountRequest {
            filter: None,
            exact: true,
        })
        .unwrap();
    assert_eq!(counted, total);

    eprintln!(
        "edge upsert throughput, {BATCHES} batches x {BATCH} points x {DIM} dims:\n\
         \x20 flush per batch, 1 caller:        {:>9.0} points/s ({sequential_flushes} flushes, {:.1} ms/flush)\n\
         \x20 group commit, {CALLERS} callers:        {:>9.0} points/s ({grouped_flushes} flushes)\n\
         \x20 unflushed engine (not durable):   {:>9.0} points/s",
        rate(total, sequential),
        sequential * 1000.0 / BATCHES as f64,
        rate(total, grouped),
        rate(total, unflushed),
    );
}
