//! The [`VectorIndex`] conformance cases, one per contract bullet.
//!
//! Each case takes a factory `Fn(dimension, distance) -> impl Future<Output =
//! impl VectorFixture>` and creates the indexes it needs.

use std::collections::{BTreeSet, HashSet};
use std::fmt::Display;
use std::future::Future;

use serde_json::{Value, json};
use uuid::Uuid;

use super::VectorFixture;
use crate::error::IndexError;
use crate::model::{Distance, Filter, Metadata, Point, PointId, PointInfo, RecordId, Scope};
use crate::ports::{IndexQuery, VectorIndex};

/// The dimension used by the cases that do not care about it.
const DIM: usize = 4;
/// How far a backend's score may be from the exact one.
const SCORE_TOLERANCE: f64 = 1e-3;

fn ok<T, E: Display>(result: Result<T, E>, what: &str) -> T {
    match result {
        Ok(value) => value,
        Err(e) => panic!("{what} failed: {e}"),
    }
}

fn fresh_scope(tag: &str) -> Scope {
    Scope::new(format!("conformance-{tag}-{}", Uuid::new_v4().simple()))
}

fn object(value: Value) -> Metadata {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

fn point(scope: &Scope, vector: Vec<f32>, metadata: Value) -> Point {
    Point {
        id: PointId::new_random(),
        record_id: RecordId::new_random(),
        scope: scope.clone(),
        metadata: object(metadata),
        vector,
        written_at_ms: 1_700_000_000_000 + i64::from(rand::random::<u16>()),
    }
}

/// A point of dimension [`DIM`] whose vector varies with `n`.
fn simple_point(scope: &Scope, n: usize) -> Point {
    let x = n as f32;
    point(
        scope,
        vec![1.0 + x, 0.5 - x, 0.25 * x, 1.0],
        json!({ "n": n }),
    )
}

fn info(point: &Point) -> PointInfo {
    PointInfo {
        id: point.id,
        record_id: point.record_id,
        scope: point.scope.clone(),
        written_at_ms: point.written_at_ms,
    }
}

fn by_id(mut infos: Vec<PointInfo>) -> Vec<PointInfo> {
    infos.sort_by_key(|i| i.id);
    infos
}

fn ids(points: &[Point]) -> Vec<PointId> {
    points.iter().map(|p| p.id).collect()
}

fn query(vector: Vec<f32>, limit: usize, filter: Filter) -> IndexQuery {
    IndexQuery {
        vector,
        limit,
        filter,
        score_threshold: None,
    }
}

async fn search_ids<V: VectorIndex + ?Sized>(index: &V, q: &IndexQuery) -> BTreeSet<PointId> {
    ok(index.search(q).await, "search")
        .into_iter()
        .map(|h| h.id)
        .collect()
}

/// Lists every point of `scope` (or all) through `scroll` pages of `limit`.
async fn scroll_all<V: VectorIndex + ?Sized>(
    index: &V,
    scope: Option<&Scope>,
    limit: usize,
) -> Vec<PointInfo> {
    let mut listed = Vec::new();
    let mut offset = None;
    for page_no in 0.. {
        assert!(page_no < 100_000, "scroll never ended");
        let page = ok(index.scroll(scope, offset, limit).await, "scroll");
        assert!(
            page.items.len() <= limit,
            "a page holds {} points",
            page.items.len()
        );
        listed.extend(page.items);
        match page.next {
            Some(next) => offset = Some(next),
            None => break,
        }
    }
    listed
}

/// The exact score under `distance` (higher is better), in `f64`.
fn reference_score(distance: Distance, q: &[f32], v: &[f32]) -> f64 {
    let pairs = || q.iter().zip(v).map(|(&a, &b)| (f64::from(a), f64::from(b)));
    let dot: f64 = pairs().map(|(a, b)| a * b).sum();
    match distance {
        Distance::Dot => dot,
        Distance::Cosine => {
            let nq = pairs().map(|(a, _)| a * a).sum::<f64>().sqrt();
            let nv = pairs().map(|(_, b)| b * b).sum::<f64>().sqrt();
            dot / (nq * nv)
        }
        Distance::Euclid => -pairs().map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt(),
    }
}

const DISTANCES: [Distance; 3] = [Distance::Cosine, Distance::Dot, Distance::Euclid];

/// A query and six points whose ranking differs per distance, with every pair of
/// scores at least 0.009 apart under each.
fn ranking_points(scope: &Scope) -> (Vec<f32>, Vec<Point>) {
    let q = vec![1.0, 0.5, -0.5];
    let vectors = [
        vec![0.9, 0.6, -0.4], // nearest by euclid
        vec![2.0, 1.0, 0.0],  // second by dot
        vec![0.0, 1.0, 0.2],  // middling
        vec![-1.0, 0.2, 0.3], // opposite: last by cosine and dot
        vec![0.5, -0.5, 1.0], // poor
        vec![3.0, 1.5, -1.5], // same direction as q: best by cosine and dot, last by euclid
    ];
    let points = vectors
        .into_iter()
        .enumerate()
        .map(|(n, v)| point(scope, v, json!({ "n": n })))
        .collect();
    (q, points)
}

/// Expected `(id, score)` best first.
fn expected_ranking(distance: Distance, q: &[f32], points: &[Point]) -> Vec<(PointId, f64)> {
    let mut scored: Vec<(PointId, f64)> = points
        .iter()
        .map(|p| (p.id, reference_score(distance, q, &p.vector)))
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1));
    scored
}

fn close(got: f32, want: f64) -> bool {
    (f64::from(got) - want).abs() <= SCORE_TOLERANCE * want.abs().max(1.0)
}

// ---------------------------------------------------------------- upsert

/// `upsert_then_retrieve`: written points are retrievable with their record id,
/// scope and write time; unknown ids are simply absent.
pub async fn upsert_then_retrieve<F, Fut>(factory: F)
where
    F: Fn(usize, Distance) -> Fut,
    Fut: Future,
    Fut::Output: VectorFixture,
{
    let fixture = factory(DIM, Distance::Cosine).await;
    let index = fixture.index();
    assert_eq!(index.dimension(), DIM);
    assert_eq!(index.distance(), Distance::Cosine);
    let scope = fresh_scope("retrieve");
    let other = fresh_scope("retrieve-other");
    let points = vec![
        simple_point(&scope, 1),
        simple_point(&scope, 2),
        simple_point(&other, 3),
    ];
    ok(index.upsert(&points).await, "upsert");

    let mut asked = ids(&points);
    asked.insert(1, PointId::new_random());
    let got = by_id(ok(index.retrieve(&asked).await, "retrieve"));
    assert_eq!(got, by_id(points.iter().map(info).collect()));
    let one = ok(index.retrieve(&[points[2].id]).await, "retrieve");
    assert_eq!(one, vec![info(&points[2])]);
    assert!(ok(index.retrieve(&[PointId::new_random()]).await, "retrieve").is_empty());
    assert!(ok(index.retrieve(&[]).await, "retrieve").is_empty());
    // An empty batch is a no-op.
    ok(index.upsert(&[]).await, "upsert of nothing");
    assert_eq!(ok(index.count(Some(&scope)).await, "count"), 2);
}

/// `upsert_is_idempotent`: writing the same points twice leaves one copy of each;
/// writing a point id again overwrites it.
pub async fn upsert_is_idempotent<F, Fut>(factory: F)
where
    F: Fn(usize, Distance) -> Fut,
    Fut: Future,
    Fut::Output: VectorFixture,
{
    let fixture = factory(DIM, Distance::Cosine).await;
    let index = fixture.index();
    let scope = fresh_scope("upsert-idem");
    let points: Vec<Point> = (0..3).map(|n| simple_point(&scope, n)).collect();
    ok(index.upsert(&points).await, "upsert");
    ok(index.upsert(&points).await, "upsert again");
    assert_eq!(ok(index.count(Some(&scope)).await, "count"), 3);
    assert_eq!(scroll_all(index, Some(&scope), 10).await.len(), 3);
    let near_first = query(points[0].vector.clone(), 10, Filter::scope(scope.clone()));
    let hits = ok(index.search(&near_first).await, "search");
    assert_eq!(hits.len(), 3, "search found duplicates: {hits:?}");

    // Overwrite by id (a duplicated request carries the same point; the write
    // time may differ).
    let mut again = points[1].clone();
    again.written_at_ms += 1;
    ok(
        index.upsert(std::slice::from_ref(&again)).await,
        "overwrite",
    );
    assert_eq!(ok(index.count(Some(&scope)).await, "count"), 3);
    assert_eq!(
        ok(index.retrieve(&[again.id]).await, "retrieve"),
        vec![info(&again)]
    );
}

/// `upsert_rejects_wrong_dimension`: a vector of another dimension fails with
/// `InvalidInput` (a batch of one such point writes nothing).
pub async fn upsert_rejects_wrong_dimension<F, Fut>(factory: F)
where
    F: Fn(usize, Distance) -> Fut,
    Fut: Future,
    Fut::Output: VectorFixture,
{
    let fixture = factory(DIM, Distance::Cosine).await;
    let index = fixture.index();
    let scope = fresh_scope("dimension");
    for wrong in [DIM - 1, DIM + 1] {
        let bad = point(&scope, vec![0.5; wrong], json!({}));
        match index.upsert(std::slice::from_ref(&bad)).await {
            Err(IndexError::InvalidInput { .. }) => {}
            other => panic!("dimension {wrong} in a {DIM}-dimensional index: got {other:?}"),
        }
        assert!(ok(index.retrieve(&[bad.id]).await, "retrieve").is_empty());
    }
    // In a mixed batch the call fails too (which points landed is unspecified).
    let mixed = [
        simple_point(&scope, 1),
        point(&scope, vec![1.0; DIM + 2], json!({})),
    ];
    match index.upsert(&mixed).await {
        Err(IndexError::InvalidInput { .. }) => {}
        other => panic!("a batch with a wrong dimension: got {other:?}"),
    }
    assert!(ok(index.retrieve(&[mixed[1].id]).await, "retrieve").is_empty());
}

// ---------------------------------------------------------------- delete

/// `delete_removes_points`: deleted points are no longer retrieved, counted,
/// scrolled or found by search; others are untouched.
pub async fn delete_removes_points<F, Fut>(factory: F)
where
    F: Fn(usize, Distance) -> Fut,
    Fut: Future,
    Fut::Output: VectorFixture,
{
    let fixture = factory(DIM, Distance::Cosine).await;
    let index = fixture.index();
    let scope = fresh_scope("delete");
    let points: Vec<Point> = (0..5).map(|n| simple_point(&scope, n)).collect();
    ok(index.upsert(&points).await, "upsert");
    let gone: Vec<&Point> = points.iter().step_by(2).collect();
    let kept: Vec<&Point> = points.iter().skip(1).step_by(2).collect();
    let gone_ids: Vec<PointId> = gone.iter().map(|p| p.id).collect();
    ok(index.delete(&gone_ids).await, "delete");

    assert!(
        ok(index.retrieve(&gone_ids).await, "retrieve").is_empty(),
        "deleted points retrieved"
    );
    let kept_infos = by_id(kept.iter().map(|p| info(p)).collect());
    assert_eq!(
        by_id(ok(index.retrieve(&ids(&points)).await, "retrieve")),
        kept_infos
    );
    assert_eq!(
        ok(index.count(Some(&scope)).await, "count"),
        kept.len() as u64
    );
    assert_eq!(by_id(scroll_all(index, Some(&scope), 2).await), kept_infos);
    for p in &gone {
        // Even a query equal to the deleted vector does not find it.
        let found = search_ids(
            index,
            &query(p.vector.clone(), 10, Filter::scope(scope.clone())),
        )
        .await;
        assert!(
            !found.contains(&p.id),
            "search found deleted point {}",
            p.id
        );
        assert_eq!(found.len(), kept.len());
    }
}

/// `delete_is_idempotent`: deleting missing ids (or the same ids twice) succeeds.
pub async fn delete_is_idempotent<F, Fut>(factory: F)
where
    F: Fn(usize, Distance) -> Fut,
    Fut: Future,
    Fut::Output: VectorFixture,
{
    let fixture = factory(DIM, Distance::Cosine).await;
    let index = fixture.index();
    let scope = fresh_scope("delete-idem");
    let points: Vec<Point> = (0..2).map(|n| simple_point(&scope, n)).collect();
    ok(index.upsert(&points).await, "upsert");
    ok(
        index.delete(&[PointId::new_random()]).await,
        "delete of a missing id",
    );
    ok(index.delete(&[]).await, "delete of nothing");
    assert_eq!(ok(index.count(Some(&scope)).await, "count"), 2);
    ok(
        index.delete(&[points[0].id, PointId::new_random()]).await,
        "delete",
    );
    ok(index.delete(&[points[0].id]).await, "delete again");
    assert_eq!(
        ok(index.retrieve(&ids(&points)).await, "retrieve"),
        vec![info(&points[1])]
    );
}

// ---------------------------------------------------------------- search

/// `search_orders_by_score`: hits come best first, the nearest point first, for
/// every distance; scores are cosine similarity, dot product, and negated
/// Euclidean distance.
pub async fn search_orders_by_score<F, Fut>(factory: F)
where
    F: Fn(usize, Distance) -> Fut,
    Fut: Future,
    Fut::Output: VectorFixture,
{
    for distance in DISTANCES {
        let fixture = factory(3, distance).await;
        let index = fixture.index();
        assert_eq!(index.distance(), distance);
        let scope = fresh_scope("order");
        let (q, points) = ranking_points(&scope);
        ok(index.upsert(&points).await, "upsert");
        let expected = expected_ranking(distance, &q, &points);
        let hits = ok(
            index
                .search(&query(
                    q.clone(),
                    points.len(),
                    Filter::scope(scope.clone()),
                ))
                .await,
            "search",
        );
        assert!(
            hits.windows(2).all(|w| w[0].score >= w[1].score),
            "{distance}: hits are not best first: {hits:?}"
        );
        assert_eq!(
            hits.first().map(|h| h.id),
            Some(expected[0].0),
            "{distance}: nearest first"
        );
        let got: Vec<PointId> = hits.iter().map(|h| h.id).collect();
        let want: Vec<PointId> = expected.iter().map(|(id, _)| *id).collect();
        assert_eq!(got, want, "{distance}: ranking");
        for (hit, (_, score)) in hits.iter().zip(&expected) {
            assert!(
                close(hit.score, *score),
                "{distance}: score {} instead of {score}",
                hit.score
            );
            let record = points.iter().find(|p| p.id == hit.id).map(|p| p.record_id);
            assert_eq!(Some(hit.record_id), record, "{distance}: hit's record id");
        }
    }
}

/// `search_filters_scope_and_metadata`: only points matching the filter (scope,
/// and top-level metadata keys equal to the values, of the same JSON type).
pub async fn search_filters_scope_and_metadata<F, Fut>(factory: F)
where
    F: Fn(usize, Distance) -> Fut,
    Fut: Future,
    Fut::Output: VectorFixture,
{
    let fixture = factory(DIM, Distance::Cosine).await;
    let index = fixture.index();
    let s1 = fresh_scope("filter-1");
    let s2 = fresh_scope("filter-2");
    let item = format!("item-{}", Uuid::new_v4());
    let v = |n: usize| {
        let x = n as f32;
        vec![1.0, 0.1 * x, -0.2 * x, 0.3]
    };
    let points = vec![
        point(&s1, v(0), json!({ "item": item, "lang": "en" })), // 0
        point(&s1, v(1), json!({ "item": "other" })),            // 1
        point(&s1, v(2), json!({ "item": item, "lang": "de" })), // 2
        point(&s2, v(3), json!({ "item": item })),               // 3
        point(&s1, v(4), json!({ "rank": 1 })),                  // 4
        point(&s1, v(5), json!({ "rank": "1" })),                // 5
        point(&s1, v(6), json!({})),                             // 6
    ];
    ok(index.upsert(&points).await, "upsert");
    let pick = |indexes: &[usize]| -> BTreeSet<PointId> {
        indexes.iter().map(|&i| points[i].id).collect()
    };
    let q = v(2);
    let cases: Vec<(Filter, BTreeSet<PointId>)> = vec![
        (Filter::scope(s1.clone()), pick(&[0, 1, 2, 4, 5, 6])),
        (Filter::scope(s2.clone()), pick(&[3])),
        (
            Filter::scope(s1.clone()).with_eq("item", json!(item)),
            pick(&[0, 2]),
        ),
        (
            Filter::scope(s1.clone())
                .with_eq("item", json!(item))
                .with_eq("lang", json!("de")),
            pick(&[2]),
        ),
        (
            Filter::none().with_eq("item", json!(item)),
            pick(&[0, 2, 3]),
        ),
        (
            Filter::scope(s2.clone()).with_eq("lang", json!("en")),
            pick(&[]),
        ),
        (
            Filter::scope(s1.clone()).with_eq("rank", json!(1)),
            pick(&[4]),
        ),
        (
            Filter::scope(s1.clone()).with_eq("rank", json!("1")),
            pick(&[5]),
        ),
        (Filter::scope(fresh_scope("filter-empty")), pick(&[])),
    ];
    for (filter, expected) in cases {
        let found = search_ids(index, &query(q.clone(), 100, filter.clone())).await;
        assert_eq!(found, expected, "filter {filter:?}");
    }
}

/// `search_respects_limit_and_threshold`: at most `limit` hits (the best ones),
/// none scoring below the threshold (for euclid: the negated distance).
pub async fn search_respects_limit_and_threshold<F, Fut>(factory: F)
where
    F: Fn(usize, Distance) -> Fut,
    Fut: Future,
    Fut::Output: VectorFixture,
{
    for distance in DISTANCES {
        let fixture = factory(3, distance).await;
        let index = fixture.index();
        let scope = fresh_scope("limit");
        let (q, points) = ranking_points(&scope);
        ok(index.upsert(&points).await, "upsert");
        let expected = expected_ranking(distance, &q, &points);
        let filter = Filter::scope(scope.clone());
        let want = |n: usize| -> Vec<PointId> { expected[..n].iter().map(|(id, _)| *id).collect() };

        for limit in [1, 3, 6, 50] {
            let hits = ok(
                index.search(&query(q.clone(), limit, filter.clone())).await,
                "search",
            );
            let got: Vec<PointId> = hits.iter().map(|h| h.id).collect();
            assert_eq!(
                got,
                want(limit.min(points.len())),
                "{distance}: limit {limit}"
            );
        }

        // A threshold halfway between the 3rd and 4th best keeps the top 3.
        let threshold = ((expected[2].1 + expected[3].1) / 2.0) as f32;
        let mut thresholded = query(q.clone(), 50, filter.clone());
        thresholded.score_threshold = Some(threshold);
        let hits = ok(index.search(&thresholded).await, "search with threshold");
        let got: Vec<PointId> = hits.iter().map(|h| h.id).collect();
        assert_eq!(got, want(3), "{distance}: threshold {threshold}");
        assert!(
            hits.iter().all(|h| h.score >= threshold),
            "{distance}: hit below threshold"
        );

        // Threshold and limit together.
        thresholded.limit = 2;
        let got: Vec<PointId> = ok(index.search(&thresholded).await, "search")
            .into_iter()
            .map(|h| h.id)
            .collect();
        assert_eq!(got, want(2), "{distance}: threshold with limit 2");

        // Above the best score: nothing.
        thresholded.limit = 50;
        thresholded.score_threshold = Some((expected[0].1 + 0.5) as f32);
        assert!(
            ok(index.search(&thresholded).await, "search").is_empty(),
            "{distance}: hits above the best score"
        );
    }
}

// ---------------------------------------------------------------- count, scroll

/// `count_by_scope`: counts exactly the points of the scope (or all).
pub async fn count_by_scope<F, Fut>(factory: F)
where
    F: Fn(usize, Distance) -> Fut,
    Fut: Future,
    Fut::Output: VectorFixture,
{
    let fixture = factory(DIM, Distance::Cosine).await;
    let index = fixture.index();
    let s1 = fresh_scope("count-1");
    let s2 = fresh_scope("count-2");
    let before = ok(index.count(None).await, "count all");
    let points: Vec<Point> = (0..5)
        .map(|n| simple_point(if n < 3 { &s1 } else { &s2 }, n))
        .collect();
    ok(index.upsert(&points).await, "upsert");
    assert_eq!(ok(index.count(Some(&s1)).await, "count"), 3);
    assert_eq!(ok(index.count(Some(&s2)).await, "count"), 2);
    assert_eq!(
        ok(index.count(Some(&fresh_scope("count-none"))).await, "count"),
        0
    );
    assert_eq!(ok(index.count(None).await, "count all"), before + 5);
    ok(index.delete(&[points[0].id, points[4].id]).await, "delete");
    assert_eq!(ok(index.count(Some(&s1)).await, "count"), 2);
    assert_eq!(ok(index.count(Some(&s2)).await, "count"), 1);
    assert_eq!(ok(index.count(None).await, "count all"), before + 3);
}

/// `scroll_pages_cover_all`: the pages together list every point of the scope
/// (or all) exactly once.
pub async fn scroll_pages_cover_all<F, Fut>(factory: F)
where
    F: Fn(usize, Distance) -> Fut,
    Fut: Future,
    Fut::Output: VectorFixture,
{
    let fixture = factory(DIM, Distance::Cosine).await;
    let index = fixture.index();
    let scope = fresh_scope("scroll");
    let other = fresh_scope("scroll-other");
    let mine: Vec<Point> = (0..7).map(|n| simple_point(&scope, n)).collect();
    let others: Vec<Point> = (0..3).map(|n| simple_point(&other, n)).collect();
    ok(index.upsert(&mine).await, "upsert");
    ok(index.upsert(&others).await, "upsert");

    for page_size in [1, 3, 7, 100] {
        let listed = scroll_all(index, Some(&scope), page_size).await;
        let unique: HashSet<PointId> = listed.iter().map(|p| p.id).collect();
        assert_eq!(
            unique.len(),
            listed.len(),
            "page size {page_size}: a point listed twice"
        );
        assert_eq!(
            by_id(listed),
            by_id(mine.iter().map(info).collect()),
            "page size {page_size}: scoped pages"
        );
    }

    let everything = scroll_all(index, None, 4).await;
    let unique: HashSet<PointId> = everything.iter().map(|p| p.id).collect();
    assert_eq!(
        unique.len(),
        everything.len(),
        "unscoped scroll listed a point twice"
    );
    for p in mine.iter().chain(&others) {
        assert!(
            unique.contains(&p.id),
            "point {} missing from the unscoped scroll",
            p.id
        );
    }
    assert_eq!(
        everything.len() as u64,
        ok(index.count(None).await, "count")
    );
}
