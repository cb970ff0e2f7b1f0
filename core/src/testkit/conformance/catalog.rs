//! The [`IndexCatalog`] conformance cases, one per contract bullet. Each
//! case gets a catalog of its own (collection names are fixed).

use std::fmt::Display;

use serde_json::Map;

use crate::error::IndexError;
use crate::model::{Distance, Point, PointId, RecordId, Scope};
use crate::ports::{IndexCatalog, VectorIndex};

fn ok<T, E: Display>(result: Result<T, E>, what: &str) -> T {
    match result {
        Ok(value) => value,
        Err(e) => panic!("{what} failed: {e}"),
    }
}

fn assert_not_found<T>(result: Result<T, IndexError>, what: &str) {
    match result {
        Err(IndexError::CollectionNotFound { .. }) => {}
        Err(other) => panic!("{what}: expected CollectionNotFound, got {other}"),
        Ok(_) => panic!("{what}: expected CollectionNotFound, got a collection"),
    }
}

/// `catalog_open_missing`: a collection that does not exist is not found.
pub async fn catalog_open_missing<C: IndexCatalog + ?Sized>(catalog: &C) {
    assert_not_found(
        catalog.open("tandem_conformance_missing").await,
        "open of a missing collection",
    );
}

/// `catalog_create_then_open`: the layout asked for; points written through
/// the created index are seen through a later open.
pub async fn catalog_create_then_open<C: IndexCatalog + ?Sized>(catalog: &C) {
    let name = "tandem_conformance_created";
    let created = ok(catalog.create(name, 3, Distance::Dot).await, "create");
    assert_eq!(
        (created.dimension(), created.distance()),
        (3, Distance::Dot)
    );
    let point = Point {
        id: PointId::new_random(),
        record_id: RecordId::new_random(),
        scope: Scope::new("catalog"),
        metadata: Map::new(),
        vector: vec![0.1, 0.2, 0.3],
        written_at_ms: 1,
    };
    ok(created.upsert(std::slice::from_ref(&point)).await, "upsert");
    let opened = ok(catalog.open(name).await, "open");
    assert_eq!((opened.dimension(), opened.distance()), (3, Distance::Dot));
    let found = ok(opened.retrieve(&[point.id]).await, "retrieve");
    assert_eq!(
        found.len(),
        1,
        "the point written through create is not seen"
    );
    let again = ok(catalog.create(name, 3, Distance::Dot).await, "create again");
    assert_eq!(
        ok(again.count(None).await, "count"),
        1,
        "create again emptied it"
    );
}

/// `catalog_create_conflicting_layout`: another dimension is a config error.
pub async fn catalog_create_conflicting_layout<C: IndexCatalog + ?Sized>(catalog: &C) {
    let name = "tandem_conformance_layout";
    ok(catalog.create(name, 3, Distance::Cosine).await, "create");
    match catalog.create(name, 4, Distance::Cosine).await {
        Err(IndexError::Config { .. }) => {}
        Err(other) => panic!("create with another dimension: expected Config, got {other}"),
        Ok(_) => panic!("create with another dimension succeeded"),
    }
}

/// `catalog_drop`: dropped collections are not found; a second drop says so.
pub async fn catalog_drop<C: IndexCatalog + ?Sized>(catalog: &C) {
    let name = "tandem_conformance_dropped";
    ok(catalog.create(name, 3, Distance::Cosine).await, "create");
    assert!(
        ok(catalog.drop_collection(name).await, "drop"),
        "drop of an existing collection"
    );
    assert_not_found(catalog.open(name).await, "open after drop");
    assert!(
        !ok(catalog.drop_collection(name).await, "drop again"),
        "a second drop reported a collection"
    );
}
