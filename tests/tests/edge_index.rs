//! `EdgeVectorIndex` (qdrant-edge persisted under a data directory): the
//! `VectorIndex` conformance suite, persistence across reopen and across a
//! crash, configuration checks on reopen, and `optimize`.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;
use tandem_adapters::edge::EdgeVectorIndex;
use tandem_core::testkit::conformance::Guarded;
use tandem_core::{
    Distance, Filter, IndexError, IndexQuery, Point, PointId, RecordId, Scope, VectorIndex,
};

tandem_core::vector_index_conformance!(edge, |dim, distance| async move {
    let dir = tempfile::tempdir().expect("temp dir");
    let index = EdgeVectorIndex::open(dir.path(), dim, distance)
        .await
        .expect("open the edge index");
    Guarded::new(index, dir)
});

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

fn point(scope: &str, vector: Vec<f32>, metadata: serde_json::Value) -> Point {
    Point {
        id: PointId::new_random(),
        record_id: RecordId::new_v7(),
        scope: Scope::new(scope),
        metadata: metadata.as_object().cloned().unwrap_or_default(),
        vector,
        written_at_ms: now_ms(),
    }
}

fn sample_points() -> Vec<Point> {
    (0..30)
        .map(|i| {
            let scope = if i % 3 == 0 { "docs" } else { "tickets" };
            point(
                scope,
                vec![1.0 + i as f32, (i % 5) as f32, 0.5, -(i as f32) / 10.0],
                json!({"item": format!("item-{}", i % 4), "n": i}),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_survive_closing_and_reopening_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let points = sample_points();
    let (kept, deleted) = points.split_at(25);
    let query = IndexQuery {
        vector: vec![3.0, 2.0, 0.5, -0.2],
        limit: 5,
        filter: Filter::scope("tickets").with_eq("item", json!("item-2")),
        score_threshold: None,
    };
    let hits_before = {
        let index = EdgeVectorIndex::open(dir.path(), 4, Distance::Cosine)
            .await
            .unwrap();
        index.upsert(&points).await.unwrap();
        index
            .delete(&deleted.iter().map(|p| p.id).collect::<Vec<_>>())
            .await
            .unwrap();
        index.search(&query).await.unwrap()
    };
    assert!(!hits_before.is_empty());

    let index = EdgeVectorIndex::open(dir.path(), 4, Distance::Cosine)
        .await
        .unwrap();
    let all_ids: Vec<_> = points.iter().map(|p| p.id).collect();
    let mut retrieved = index.retrieve(&all_ids).await.unwrap();
    retrieved.sort_by_key(|p| p.id);
    let mut expected: Vec<_> = kept
        .iter()
        .map(|p| (p.id, p.record_id, p.scope.clone(), p.written_at_ms))
        .collect();
    expected.sort_by_key(|e| e.0);
    assert_eq!(
        retrieved
            .iter()
            .map(|p| (p.id, p.record_id, p.scope.clone(), p.written_at_ms))
            .collect::<Vec<_>>(),
        expected
    );
    let docs = kept.iter().filter(|p| p.scope.as_str() == "docs").count() as u64;
    assert_eq!(index.count(Some(&Scope::new("docs"))).await.unwrap(), docs);
    assert_eq!(index.count(None).await.unwrap(), kept.len() as u64);
    assert_eq!(index.search(&query).await.unwrap(), hits_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopening_with_another_dimension_or_distance_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    {
        let index = EdgeVectorIndex::open(dir.path(), 4, Distance::Dot)
            .await
            .unwrap();
        index
            .upsert(&[point("s", vec![1.0, 0.0, 0.0, 0.0], json!({}))])
            .await
            .unwrap();
    }
    for (dimension, distance) in [(8, Distance::Dot), (4, Distance::Cosine)] {
        let err = EdgeVectorIndex::open(dir.path(), dimension, distance)
            .await
            .unwrap_err();
        assert!(matches!(err, IndexError::Config { .. }), "{err:?}");
        assert!(!err.is_retryable());
    }
    // The original layout still opens, with its data.
    let index = EdgeVectorIndex::open(dir.path(), 4, Distance::Dot)
        .await
        .unwrap();
    assert_eq!(index.count(None).await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_dimension_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = EdgeVectorIndex::open(dir.path(), 0, Distance::Cosine)
        .await
        .unwrap_err();
    assert!(matches!(err, IndexError::Config { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handles_on_the_same_directory_share_one_shard() {
    let dir = tempfile::tempdir().unwrap();
    let a = EdgeVectorIndex::open(dir.path(), 4, Distance::Euclid)
        .await
        .unwrap();
    // A second open of the directory would fail on qdrant-edge's WAL lock if it
    // were not shared; it also sees the first handle's writes at once.
    let b = EdgeVectorIndex::open(dir.path(), 4, Distance::Euclid)
        .await
        .unwrap();
    let p = point("s", vec![0.0, 0.0, 3.0, 4.0], json!({"k": "v"}));
    a.upsert(std::slice::from_ref(&p)).await.unwrap();
    assert_eq!(b.retrieve(&[p.id]).await.unwrap().len(), 1);
    // Euclid scores are negated distances: the origin is 5 away.
    let hits = b
        .search(&IndexQuery {
            vector: vec![0.0; 4],
            limit: 1,
            filter: Filter::none(),
            score_threshold: Some(-5.5),
        })
        .await
        .unwrap();
    assert_eq!(hits.len(), 1);
    assert!((hits[0].score + 5.0).abs() < 1e-4, "{}", hits[0].score);
    let none = b
        .search(&IndexQuery {
            vector: vec![0.0; 4],
            limit: 1,
            filter: Filter::none(),
            score_threshold: Some(-4.5),
        })
        .await
        .unwrap();
    assert!(none.is_empty());
    // A third handle with another layout is refused even while the shard is open.
    let err = EdgeVectorIndex::open(dir.path(), 4, Distance::Cosine)
        .await
        .unwrap_err();
    assert!(matches!(err, IndexError::Config { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_filters_match_scalars_and_reject_structures() {
    let dir = tempfile::tempdir().unwrap();
    let index = EdgeVectorIndex::open(dir.path(), 2, Distance::Dot)
        .await
        .unwrap();
    let a = point(
        "s",
        vec![1.0, 0.0],
        json!({"price": 2.5, "flag": true, "gone": null, "odd key.x": "y"}),
    );
    let b = point("s", vec![0.5, 0.0], json!({"price": 3, "flag": false}));
    index.upsert(&[a.clone(), b.clone()]).await.unwrap();
    let search = |filter: Filter| {
        let index = index.clone();
        async move {
            index
                .search(&IndexQuery {
                    vector: vec![1.0, 0.0],
                    limit: 10,
                    filter,
                    score_threshold: None,
                })
                .await
                .map(|hits| hits.into_iter().map(|h| h.id).collect::<Vec<_>>())
        }
    };
    assert_eq!(
        search(Filter::none().with_eq("price", json!(2.5)))
            .await
            .unwrap(),
        vec![a.id]
    );
    assert_eq!(
        search(Filter::none().with_eq("price", json!(3)))
            .await
            .unwrap(),
        vec![b.id]
    );
    assert_eq!(
        search(Filter::none().with_eq("flag", json!(false)))
            .await
            .unwrap(),
        vec![b.id]
    );
    assert_eq!(
        search(Filter::none().with_eq("gone", json!(null)))
            .await
            .unwrap(),
        vec![a.id]
    );
    assert_eq!(
        search(Filter::none().with_eq("odd key.x", json!("y")))
            .await
            .unwrap(),
        vec![a.id]
    );
    let err = search(Filter::none().with_eq("tags", json!(["x"])))
        .await
        .unwrap_err();
    assert!(matches!(err, IndexError::InvalidInput { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optimize_keeps_every_point_findable() {
    let dir = tempfile::tempdir().unwrap();
    let index = EdgeVectorIndex::open(dir.path(), 4, Distance::Cosine)
        .await
        .unwrap();
    let points = sample_points();
    index.upsert(&points).await.unwrap();
    index.delete(&[points[0].id, points[1].id]).await.unwrap();
    index.optimize().await.unwrap();
    assert_eq!(index.count(None).await.unwrap(), points.len() as u64 - 2);
    let hits = index
        .search(&IndexQuery {
            vector: points[7].vector.clone(),
            limit: 1,
            filter: Filter::none(),
            score_threshold: None,
        })
        .await
        .unwrap();
    assert_eq!(hits[0].id, points[7].id);
    // A second run finds nothing left to do.
    assert!(!index.optimize().await.unwrap());
}

/// The environment variable that turns this test binary into the crashing child
/// of `acknowledged_upserts_survive_a_crash`.
const CRASH_CHILD_DIR: &str = "TANDEM_EDGE_CRASH_CHILD_DIR";

/// An upsert that returned `Ok` is on disk: a child process upserts, then dies
/// without running any destructor (`abort`, like `kill -9`: qdrant-edge never
/// gets to flush on close), and the points are there when the index is reopened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_upserts_survive_a_crash() {
    if let Ok(dir) = std::env::var(CRASH_CHILD_DIR) {
        let index = EdgeVectorIndex::open(&dir, 4, Distance::Cosine)
            .await
            .unwrap();
        index.upsert(&sample_points()).await.unwrap();
        std::process::abort();
    }
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "acknowledged_upserts_survive_a_crash",
            "--test-threads=1",
        ])
        .env(CRASH_CHILD_DIR, dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "the child must crash, not exit");
    let index = EdgeVectorIndex::open(dir.path(), 4, Distance::Cosine)
        .await
        .unwrap();
    assert_eq!(index.count(None).await.unwrap(), 30);
    assert_eq!(index.count(Some(&Scope::new("docs"))).await.unwrap(), 10);
}
