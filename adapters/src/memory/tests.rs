//! Unit tests of the in-memory backends for what the conformance suites leave
//! open: input the port lets a backend reject, exact scores, filters on typed and
//! nested values, and orderings the suites only check loosely.

use serde_json::{Value, json};
use tandem_core::{
    Distance, Filter, IdempotencyRecord, IndexError, IndexQuery, IntentId, IntentKind, IntentState,
    Metadata, MetadataError, MetadataRepo, NewIntent, OwnerToken, Point, PointId, RecordId,
    RowWrite, Scope, VectorIndex,
};

use super::{InMemoryMetadataRepo, InMemoryVectorIndex};

fn object(value: Value) -> Metadata {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

fn row(scope: &str, n: i64) -> RowWrite {
    RowWrite {
        id: RecordId::new_random(),
        scope: Scope::new(scope),
        content: format!("row {n}"),
        metadata: object(json!({ "n": n })),
        point_id: PointId::new_random(),
        vector: vec![n as f32, 1.0],
    }
}

fn intent(points: Vec<PointId>, lease: i64, created: i64) -> NewIntent {
    NewIntent {
        id: IntentId::new_random(),
        kind: IntentKind::Upsert,
        owner: OwnerToken::new_random(),
        lease_deadline_ms: lease,
        point_ids: points,
        created_ms: created,
        generation: 0,
    }
}

fn key(k: &str) -> IdempotencyRecord {
    IdempotencyRecord {
        key: k.to_owned(),
        request_hash: "h".to_owned(),
        outcome: json!(null),
        summary: Default::default(),
    }
}

async fn prepare_rows(repo: &InMemoryMetadataRepo, rows: &[RowWrite]) -> NewIntent {
    let new = intent(rows.iter().map(|r| r.point_id).collect(), i64::MAX, 0);
    repo.prepare(&new).await.unwrap();
    new
}

fn assert_invalid(result: Result<impl std::fmt::Debug, MetadataError>, needle: &str) {
    match result {
        Err(MetadataError::InvalidInput { message, .. }) => {
            assert!(
                message.contains(needle),
                "{message:?} should mention {needle:?}"
            )
        }
        other => panic!("expected InvalidInput ({needle}), got {other:?}"),
    }
}

// ---------------------------------------------------------------- metadata

#[tokio::test]
async fn commit_upsert_rejects_batches_a_schema_would_refuse_and_writes_nothing() {
    let repo = InMemoryMetadataRepo::new();
    let existing = row("s", 0);
    let first = prepare_rows(&repo, std::slice::from_ref(&existing)).await;
    repo.commit_upsert(first.id, first.owner, std::slice::from_ref(&existing), None)
        .await
        .unwrap();

    let fresh = row("s", 1);
    let same_id = RowWrite {
        point_id: PointId::new_random(),
        ..fresh.clone()
    };
    let same_point = RowWrite {
        id: RecordId::new_random(),
        ..fresh.clone()
    };
    let steals_point = RowWrite {
        point_id: existing.point_id,
        ..row("s", 2)
    };
    let reuses_own_point = RowWrite {
        content: "rewritten in place".into(),
        ..existing.clone()
    };
    let cases: [(Vec<RowWrite>, &str); 4] = [
        (vec![fresh.clone(), same_id], "record"),
        (vec![fresh.clone(), same_point], "point"),
        (vec![fresh.clone(), steals_point], "already referenced"),
        (vec![fresh.clone(), reuses_own_point], "already referenced"),
    ];
    for (rows, needle) in cases {
        let pending = prepare_rows(&repo, &rows).await;
        let result = repo
            .commit_upsert(pending.id, pending.owner, &rows, Some(&key(needle)))
            .await;
        assert_invalid(result, needle);
        // Nothing of the batch was written: not the valid first row, not the
        // intent's state, not the key.
        assert!(repo.get(&[fresh.id]).await.unwrap().is_empty());
        let stored = repo.get(&[existing.id]).await.unwrap();
        assert_eq!(
            (stored[0].version, stored[0].point_id),
            (1, existing.point_id)
        );
        let listed = repo.list_intents(100).await.unwrap();
        let listed = listed.iter().find(|i| i.id == pending.id).unwrap();
        assert_eq!(listed.state, IntentState::Prepared);
        assert_eq!(repo.lookup_idempotency(needle).await.unwrap(), None);
        assert_eq!(
            repo.referenced_points(&[existing.point_id])
                .await
                .unwrap()
                .len(),
            1
        );
    }
}

#[tokio::test]
async fn prepare_with_a_known_id_keeps_the_first_intent() {
    let repo = InMemoryMetadataRepo::new();
    let first = intent(vec![PointId::new_random()], 10, 1);
    repo.prepare(&first).await.unwrap();
    let impostor = NewIntent {
        owner: OwnerToken::new_random(),
        point_ids: vec![],
        lease_deadline_ms: 99,
        ..first.clone()
    };
    repo.prepare(&impostor).await.unwrap();
    let listed = repo.list_intents(10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].owner, first.owner);
    assert_eq!(listed[0].point_ids, first.point_ids);
    assert_eq!(listed[0].lease_deadline_ms, 10);
}

#[tokio::test]
async fn list_intents_is_oldest_first_with_creation_ties_in_prepare_order() {
    let repo = InMemoryMetadataRepo::new();
    let created = [30, 10, 20, 10];
    let mut intents = Vec::new();
    for c in created {
        let i = intent(vec![], i64::MAX, c);
        repo.prepare(&i).await.unwrap();
        intents.push(i.id);
    }
    let listed: Vec<IntentId> = repo
        .list_intents(10)
        .await
        .unwrap()
        .iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(listed, vec![intents[1], intents[3], intents[2], intents[0]]);
    let two: Vec<IntentId> = repo
        .list_intents(2)
        .await
        .unwrap()
        .iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(two, vec![intents[1], intents[3]]);
    assert!(repo.list_intents(0).await.unwrap().is_empty());
}

#[tokio::test]
async fn claim_orders_equal_leases_by_prepare_order_and_ignores_the_boundary() {
    let repo = InMemoryMetadataRepo::new();
    let a = intent(vec![], 100, 5);
    let b = intent(vec![], 100, 1);
    let at_now = intent(vec![], 200, 0);
    for i in [&a, &b, &at_now] {
        repo.prepare(i).await.unwrap();
    }
    let owner = OwnerToken::new_random();
    let claimed = repo.claim_expired(200, owner, 1_000, 1).await.unwrap();
    assert_eq!(claimed.iter().map(|i| i.id).collect::<Vec<_>>(), vec![a.id]);
    // A lease ending exactly now has not ended *before* now.
    let claimed = repo.claim_expired(200, owner, 1_000, 10).await.unwrap();
    assert_eq!(claimed.iter().map(|i| i.id).collect::<Vec<_>>(), vec![b.id]);
}

#[tokio::test]
async fn delete_by_metadata_compares_whole_json_values() {
    let repo = InMemoryMetadataRepo::new();
    let metas = [
        json!({ "spec": { "size": 3, "tags": ["a", "b"] } }), // 0: equal
        json!({ "spec": { "tags": ["a", "b"], "size": 3 } }), // 1: equal (key order)
        json!({ "spec": { "size": 3, "tags": ["b", "a"] } }), // array order matters
        json!({ "spec": { "size": 3 } }),
        json!({ "spec": null }),
        json!({}),
    ];
    let rows: Vec<RowWrite> = metas
        .iter()
        .map(|m| RowWrite {
            metadata: object(m.clone()),
            ..row("cat", 0)
        })
        .collect();
    let new = prepare_rows(&repo, &rows).await;
    repo.commit_upsert(new.id, new.owner, &rows, None)
        .await
        .unwrap();

    let repo = &repo;
    let delete = move |value: Value| async move {
        let d = intent(vec![], i64::MAX, 0);
        repo.prepare(&d).await.unwrap();
        let selector = tandem_core::DeleteSelector::MetadataEq {
            scope: Scope::new("cat"),
            key: "spec".into(),
            value,
        };
        repo.commit_delete(d.id, d.owner, &selector, None)
            .await
            .unwrap()
    };
    let deleted = delete(json!({ "size": 3, "tags": ["a", "b"] })).await;
    // Points come in record id order.
    let mut by_record = vec![
        (rows[0].id, rows[0].point_id),
        (rows[1].id, rows[1].point_id),
    ];
    by_record.sort();
    let expected: Vec<_> = by_record.into_iter().map(|(_, p)| p).collect();
    assert_eq!(deleted.point_ids, expected);
    // `null` matches an explicit null, not a missing key.
    let deleted = delete(Value::Null).await;
    assert_eq!(deleted.point_ids, vec![rows[4].point_id]);
    let left: Vec<RecordId> = repo
        .scan_refs(None, None, 10)
        .await
        .unwrap()
        .items
        .iter()
        .map(|r| r.id)
        .collect();
    let mut want = vec![rows[2].id, rows[3].id, rows[5].id];
    want.sort();
    assert_eq!(left, want);
}

#[tokio::test]
async fn reads_ignore_repeated_ids_and_scan_refuses_an_empty_page() {
    let repo = InMemoryMetadataRepo::without_vectors();
    assert!(!repo.keeps_vectors());
    let r = row("s", 1);
    let new = prepare_rows(&repo, std::slice::from_ref(&r)).await;
    repo.commit_upsert(new.id, new.owner, std::slice::from_ref(&r), None)
        .await
        .unwrap();
    assert_eq!(repo.get(&[r.id, r.id]).await.unwrap().len(), 1);
    let rows = repo
        .rows_by_points(&[r.point_id, r.point_id])
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].vector, None);
    assert_invalid(repo.scan_refs(None, None, 0).await, "limit");
    // The last page has no `next`, even when it is exactly full.
    let page = repo.scan_refs(None, None, 1).await.unwrap();
    assert_eq!((page.items.len(), page.next), (1, None));
}

#[tokio::test]
async fn a_shared_store_outlives_the_handle_that_wrote_it() {
    let repo = std::sync::Arc::new(InMemoryMetadataRepo::new());
    let writer: Box<dyn MetadataRepo> = Box::new(repo.clone());
    let r = row("s", 1);
    let new = intent(vec![r.point_id], i64::MAX, 0);
    writer.prepare(&new).await.unwrap();
    writer
        .commit_upsert(new.id, new.owner, std::slice::from_ref(&r), None)
        .await
        .unwrap();
    drop(writer);
    let stored = repo.get(&[r.id]).await.unwrap();
    assert_eq!(stored[0].vector.as_deref(), Some(&r.vector[..]));
}

// ---------------------------------------------------------------- vector index

fn point(scope: &str, vector: Vec<f32>, metadata: Value) -> Point {
    Point {
        id: PointId::new_random(),
        record_id: RecordId::new_random(),
        scope: Scope::new(scope),
        metadata: object(metadata),
        vector,
        written_at_ms: 7,
    }
}

fn search(vector: Vec<f32>, limit: usize, filter: Filter) -> IndexQuery {
    IndexQuery {
        vector,
        limit,
        filter,
        score_threshold: None,
    }
}

async fn scores(distance: Distance, q: Vec<f32>, vectors: &[Vec<f32>]) -> Vec<f32> {
    let index = InMemoryVectorIndex::new(q.len(), distance);
    let points: Vec<Point> = vectors
        .iter()
        .map(|v| point("s", v.clone(), json!({})))
        .collect();
    index.upsert(&points).await.unwrap();
    let hits = index.search(&search(q, 10, Filter::none())).await.unwrap();
    points
        .iter()
        .map(|p| hits.iter().find(|h| h.id == p.id).unwrap().score)
        .collect()
}

#[tokio::test]
async fn scores_are_exact_per_distance() {
    let vectors = [
        vec![3.0, 4.0],
        vec![0.0, 0.0],
        vec![-1.0, 0.0],
        vec![1.0, 1.0],
    ];
    let q = vec![1.0, 0.0];
    assert_eq!(
        scores(Distance::Dot, q.clone(), &vectors).await,
        vec![3.0, 0.0, -1.0, 1.0]
    );
    // Euclid: the negated distance, so the identical vector would score 0.
    let euclid = scores(Distance::Euclid, q.clone(), &vectors).await;
    let expected = [-(20.0_f32).sqrt(), -1.0, -2.0, -1.0];
    for (got, want) in euclid.iter().zip(expected) {
        assert!((got - want).abs() < 1e-6, "{got} != {want}");
    }
    // Cosine: similarity; a zero vector has none.
    let cosine = scores(Distance::Cosine, q, &vectors).await;
    let expected = [0.6, 0.0, -1.0, std::f32::consts::FRAC_1_SQRT_2];
    for (got, want) in cosine.iter().zip(expected) {
        assert!((got - want).abs() < 1e-6, "{got} != {want}");
    }
}

#[tokio::test]
async fn euclid_threshold_is_a_maximum_distance() {
    let index = InMemoryVectorIndex::new(1, Distance::Euclid);
    let near = point("s", vec![1.0], json!({}));
    let far = point("s", vec![5.0], json!({}));
    index.upsert(&[near.clone(), far]).await.unwrap();
    let mut q = search(vec![0.0], 10, Filter::none());
    q.score_threshold = Some(-2.0); // within distance 2
    let hits = index.search(&q).await.unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!((hits[0].id, hits[0].score), (near.id, -1.0));
}

#[tokio::test]
async fn equal_scores_come_in_point_id_order() {
    let index = InMemoryVectorIndex::new(2, Distance::Dot);
    let points: Vec<Point> = (0..5)
        .map(|_| point("s", vec![1.0, 1.0], json!({})))
        .collect();
    index.upsert(&points).await.unwrap();
    let hits = index
        .search(&search(vec![1.0, 0.0], 3, Filter::none()))
        .await
        .unwrap();
    let mut ids: Vec<PointId> = points.iter().map(|p| p.id).collect();
    ids.sort();
    assert_eq!(hits.iter().map(|h| h.id).collect::<Vec<_>>(), ids[..3]);
}

#[tokio::test]
async fn a_rejected_batch_writes_nothing() {
    let index = InMemoryVectorIndex::new(2, Distance::Cosine);
    let good = point("s", vec![1.0, 0.0], json!({}));
    for bad in [vec![1.0], vec![f32::NAN, 1.0], vec![1.0, f32::INFINITY]] {
        let batch = [good.clone(), point("s", bad, json!({}))];
        match index.upsert(&batch).await {
            Err(IndexError::InvalidInput { .. }) => {}
            other => panic!("expected InvalidInput, got {other:?}"),
        }
        assert_eq!(index.count(None).await.unwrap(), 0);
    }
    match index
        .search(&search(vec![1.0, 0.0, 0.0], 1, Filter::none()))
        .await
    {
        Err(IndexError::InvalidInput { message, .. }) => assert!(message.contains("query")),
        other => panic!("expected InvalidInput, got {other:?}"),
    }
}

#[tokio::test]
async fn filters_compare_typed_and_nested_values() {
    let index = InMemoryVectorIndex::new(1, Distance::Dot);
    let metas = [
        json!({ "ok": true, "spec": { "size": 3 }, "tags": ["a"] }), // 0
        json!({ "ok": "true", "spec": { "size": "3" } }),            // 1
        json!({ "ok": false, "spec": { "size": 3, "x": 1 } }),       // 2
        json!({ "ok": null, "a.b": 1, "a": { "b": 2 } }),            // 3
    ];
    let points: Vec<Point> = metas
        .iter()
        .map(|m| point("s", vec![1.0], m.clone()))
        .collect();
    index.upsert(&points).await.unwrap();
    let cases = [
        ("ok", json!(true), vec![0]),
        ("ok", json!("true"), vec![1]),
        ("ok", Value::Null, vec![3]),
        ("spec", json!({ "size": 3 }), vec![0]),
        ("tags", json!(["a"]), vec![0]),
        ("tags", json!("a"), vec![]),
        ("a.b", json!(1), vec![3]),
        ("a.b", json!(2), vec![]),
    ];
    for (key, value, want) in cases {
        let filter = Filter::scope("s").with_eq(key, value.clone());
        let mut got: Vec<PointId> = index
            .search(&search(vec![1.0], 10, filter))
            .await
            .unwrap()
            .iter()
            .map(|h| h.id)
            .collect();
        got.sort();
        let mut want: Vec<PointId> = want.iter().map(|&i| points[i].id).collect();
        want.sort();
        assert_eq!(got, want, "{key} = {value}");
    }
}

#[tokio::test]
async fn scroll_pages_follow_point_ids_and_next_starts_the_next_page() {
    let index = InMemoryVectorIndex::new(1, Distance::Dot);
    let points: Vec<Point> = (0..5)
        .map(|n| point(if n == 2 { "other" } else { "s" }, vec![1.0], json!({})))
        .collect();
    index.upsert(&points).await.unwrap();
    let mut mine: Vec<PointId> = points
        .iter()
        .filter(|p| p.scope.as_str() == "s")
        .map(|p| p.id)
        .collect();
    mine.sort();
    let scope = Scope::new("s");
    let first = index.scroll(Some(&scope), None, 3).await.unwrap();
    assert_eq!(
        first.items.iter().map(|p| p.id).collect::<Vec<_>>(),
        mine[..3]
    );
    assert_eq!(first.next, Some(mine[3]));
    let second = index.scroll(Some(&scope), first.next, 3).await.unwrap();
    assert_eq!(
        second.items.iter().map(|p| p.id).collect::<Vec<_>>(),
        mine[3..]
    );
    assert_eq!(second.next, None);
    match index.scroll(None, None, 0).await {
        Err(IndexError::InvalidInput { .. }) => {}
        other => panic!("expected InvalidInput, got {other:?}"),
    }
}
