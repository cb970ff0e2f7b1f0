//! `SqliteMetadataRepo` beyond the conformance suite: bad input refused with
//! nothing written, two pools (as two processes) on one file, a cancelled call,
//! and reopening.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tandem_adapters::memory::InMemoryVectorIndex;
use tandem_adapters::sqlite::{SqliteConfig, SqliteMetadataRepo};
use tandem_core::{
    Coordinator, CoordinatorConfig, Distance, IdempotencyRecord, IntentState, MetadataError,
    MetadataRepo, NewRecord, OwnerToken, RecordId, RowWrite,
};
use tandem_tests::invariants;
use tandem_tests::pg::data::{meta, prepare_upsert, row};
use uuid::Uuid;

async fn open(dir: &tempfile::TempDir) -> SqliteMetadataRepo {
    SqliteMetadataRepo::open(SqliteConfig::new(dir.path().join("tandem.db")))
        .await
        .expect("open")
}

async fn rejected_and_nothing_written(bad: RowWrite) {
    let dir = tempfile::tempdir().unwrap();
    let repo = open(&dir).await;
    let batch = vec![row("s", "fine"), bad];
    let (intent, owner) = prepare_upsert(&repo, &batch).await;
    let key = IdempotencyRecord {
        key: "k".into(),
        request_hash: "h".into(),
        outcome: json!({}),
        summary: Default::default(),
    };
    let err = repo
        .commit_upsert(intent, owner, &batch, Some(&key))
        .await
        .expect_err("SQLite must refuse the batch");
    assert!(matches!(err, MetadataError::InvalidInput { .. }), "{err}");
    assert!(
        repo.get(&[batch[0].id, batch[1].id])
            .await
            .unwrap()
            .is_empty()
    );
    assert!(repo.lookup_idempotency("k").await.unwrap().is_none());
    let intents = repo.list_intents(10).await.unwrap();
    assert_eq!(intents[0].state, IntentState::Prepared);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scope_longer_than_allowed_is_rejected() {
    rejected_and_nothing_written(row(&"s".repeat(256), "x")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_metadata_is_rejected() {
    let mut bad = row("s", "x");
    bad.metadata = meta(json!({"blob": "x".repeat(1_100_000)}));
    rejected_and_nothing_written(bad).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn point_referenced_by_another_record_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let repo = open(&dir).await;
    let first = vec![row("s", "a")];
    let (i, o) = prepare_upsert(&repo, &first).await;
    repo.commit_upsert(i, o, &first, None).await.unwrap();
    drop(repo);
    let mut thief = row("s", "b");
    thief.point_id = first[0].point_id;
    // The same file, reopened.
    let repo = open(&dir).await;
    assert_eq!(repo.get(&[first[0].id]).await.unwrap().len(), 1);
    assert_eq!(repo.migrate().await.unwrap(), 0, "already migrated");
    let batch = vec![thief];
    let (i, o) = prepare_upsert(&repo, &batch).await;
    let err = repo.commit_upsert(i, o, &batch, None).await.unwrap_err();
    assert!(matches!(err, MetadataError::InvalidInput { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_from_two_pools_are_exclusive() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (Arc::new(open(&dir).await), Arc::new(open(&dir).await));
    for _ in 0..40 {
        let rows = [row("s", "x")];
        let intent = tandem_core::NewIntent {
            id: tandem_core::IntentId::new_v7(),
            kind: tandem_core::IntentKind::Upsert,
            owner: OwnerToken::new_random(),
            lease_deadline_ms: 10,
            point_ids: rows.iter().map(|r| r.point_id).collect(),
            created_ms: 1,
            generation: 0,
        };
        a.prepare(&intent).await.unwrap();
    }
    let claim = |repo: Arc<SqliteMetadataRepo>| async move {
        let mut got = Vec::new();
        loop {
            let batch = repo
                .claim_expired(100, OwnerToken::new_random(), 1_000_000, 3)
                .await
                .unwrap();
            if batch.is_empty() {
                return got;
            }
            got.extend(batch.into_iter().map(|i| i.id));
        }
    };
    let (x, y) = tokio::join!(claim(a.clone()), claim(b.clone()));
    let mut all: Vec<_> = x.iter().chain(&y).copied().collect();
    all.sort();
    all.dedup();
    assert_eq!(x.len() + y.len(), 40, "an intent was claimed twice");
    assert_eq!(all.len(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_from_two_pools_converge() {
    let dir = tempfile::tempdir().unwrap();
    let repos = [Arc::new(open(&dir).await), Arc::new(open(&dir).await)];
    let index = Arc::new(InMemoryVectorIndex::new(3, Distance::Cosine));
    let id = |n: u128| RecordId(Uuid::from_u128(n));
    let writers = (0..6u32).map(|w| {
        let c = Coordinator::new(
            repos[w as usize % 2].clone(),
            index.clone(),
            CoordinatorConfig::default(),
        )
        .unwrap();
        async move {
            let mut wrote = Vec::new();
            for round in 0..10u32 {
                let ids = [
                    u128::from((w + round) % 4 + 1),
                    u128::from((w + 2 * round) % 4 + 1),
                ];
                let mut ids = ids.to_vec();
                ids.dedup();
                let batch = ids
                    .iter()
                    .map(|&n| {
                        NewRecord::new("hot", format!("w{w} r{round}"), vec![1.0, n as f32, 0.5])
                            .with_id(id(n))
                    })
                    .collect();
                c.upsert(batch).await.unwrap();
                wrote.extend(ids);
            }
            wrote
        }
    });
    let mut writes: HashMap<u128, u64> = HashMap::new();
    for wrote in futures::future::join_all(writers).await {
        for n in wrote {
            *writes.entry(n).or_default() += 1;
        }
    }
    let rows = invariants::rows(&*repos[0]).await.unwrap();
    for (n, count) in writes {
        assert_eq!(rows[&id(n)].version, count, "record {n}");
    }
    assert!(repos[1].list_intents(10).await.unwrap().is_empty());
    invariants::exact_equality(&*repos[0], &*index)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_commit_is_all_or_nothing_and_the_pool_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let repo = open(&dir).await;
    let batch: Vec<RowWrite> = (0..500).map(|i| row("s", &format!("r{i}"))).collect();
    let (intent, owner) = prepare_upsert(&repo, &batch).await;
    // Dropped almost at once: the transaction finishes (or not) on its
    // blocking thread, never half-way.
    let cancelled = tokio::time::timeout(
        Duration::from_micros(50),
        repo.commit_upsert(intent, owner, &batch, None),
    )
    .await;
    let ids: Vec<RecordId> = batch.iter().map(|r| r.id).collect();
    // Give the blocking thread time to finish whatever it was doing.
    let mut found = repo.get(&ids).await.unwrap().len();
    for _ in 0..50 {
        if found == 0 || found == batch.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        found = repo.get(&ids).await.unwrap().len();
    }
    assert!(
        found == 0 || found == batch.len(),
        "partial commit: {found}"
    );
    // Either way, the commit can be repeated (idempotent) and the pool works.
    let done = repo
        .commit_upsert(intent, owner, &batch, None)
        .await
        .unwrap();
    assert_eq!(done.summary.inserted, 500);
    assert_eq!(repo.get(&ids).await.unwrap().len(), 500);
    println!(
        "cancelled commit: {}",
        if cancelled.is_err() {
            "dropped"
        } else {
            "finished first"
        }
    );
}
