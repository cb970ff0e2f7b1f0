//! Bad input that gets past the coordinator's validation and reaches
//! PostgreSQL: each is refused with a typed `InvalidInput` error, and the
//! whole commit writes nothing (no row, no idempotency key, the intent still
//! prepared with its points).

use serde_json::json;
use tandem_core::{IdempotencyRecord, IntentState, MetadataError, MetadataRepo, Outcome, RowWrite};
use tandem_tests::pg::TestSchema;
use tandem_tests::pg::data::{meta, prepare_upsert, row};

/// Commits `bad` in a batch with a good row and an idempotency key; asserts a
/// typed rejection carrying `code`, and that nothing of the batch is visible.
async fn rejected_and_nothing_written(bad: RowWrite, code: &str) {
    let schema = TestSchema::new().await;
    let repo = schema.repo().await;
    let batch = vec![row("s", "fine"), bad];
    let (intent, owner) = prepare_upsert(&repo, &batch).await;
    let key = IdempotencyRecord {
        key: format!("k-{code}"),
        request_hash: "h".into(),
        outcome: json!({"ok": true}),
        summary: Default::default(),
    };
    let err = repo
        .commit_upsert(intent, owner, &batch, Some(&key))
        .await
        .expect_err("PostgreSQL must refuse the batch");
    assert!(
        matches!(err, MetadataError::InvalidInput { .. }),
        "expected InvalidInput, got {err}"
    );
    assert!(!err.is_retryable());
    assert_eq!(err.outcome(), Outcome::NotApplied);
    assert!(err.to_string().contains(code), "expected {code} in {err}");

    assert!(
        repo.get(&[batch[0].id, batch[1].id])
            .await
            .unwrap()
            .is_empty()
    );
    assert!(repo.lookup_idempotency(&key.key).await.unwrap().is_none());
    assert!(repo.count_by_scope().await.unwrap().is_empty());
    let intents = repo.list_intents(10).await.unwrap();
    assert_eq!(intents.len(), 1);
    assert_eq!(intents[0].state, IntentState::Prepared);
    assert_eq!(
        intents[0].point_ids,
        batch.iter().map(|r| r.point_id).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_metadata_is_rejected() {
    let mut bad = row("s", "big");
    // Over the 1 MiB the records table allows for metadata.
    bad.metadata = meta(json!({"blob": "x".repeat(1_100_000)}));
    rejected_and_nothing_written(bad, "23514").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_byte_in_content_is_rejected() {
    let mut bad = row("s", "x");
    bad.content = "before\0after".into();
    rejected_and_nothing_written(bad, "22021").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_escape_in_metadata_is_rejected() {
    let mut bad = row("s", "x");
    // jsonb cannot hold U+0000 in a string.
    bad.metadata = meta(json!({"k": "a\u{0}b"}));
    rejected_and_nothing_written(bad, "22P05").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scope_longer_than_allowed_is_rejected() {
    let bad = row(&"s".repeat(256), "x");
    rejected_and_nothing_written(bad, "23514").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scope_of_exactly_the_limit_is_accepted() {
    let schema = TestSchema::new().await;
    let repo = schema.repo().await;
    let batch = vec![row(&"é".repeat(127), "x")]; // 254 bytes
    let (intent, owner) = prepare_upsert(&repo, &batch).await;
    repo.commit_upsert(intent, owner, &batch, None)
        .await
        .unwrap();
    assert_eq!(repo.get(&[batch[0].id]).await.unwrap().len(), 1);
}
