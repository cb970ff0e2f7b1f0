//! The `IndexCatalog` conformance suite for the production catalogs:
//! `EdgeCatalog` (one qdrant-edge shard per subdirectory of a temporary
//! directory) and `QdrantCatalog` (against the Qdrant-compatible test server,
//! one server per case, so that cases run in parallel). Then what the suite
//! does not cover: the collection settings and payload indexes a created
//! Qdrant collection gets, `open` learning the layout from the store, indexes
//! held across a drop, and names that are not collections.

use std::time::Duration;

use async_trait::async_trait;
use qdrant_client::Qdrant;
use qdrant_client::qdrant::{
    CollectionExistsRequest, CreateCollectionBuilder, GetCollectionInfoRequest, PayloadSchemaType,
    VectorParamsBuilder, vectors_config,
};
use serde_json::Map;
use tandem_adapters::edge::{EdgeCatalog, EdgeVectorIndex};
use tandem_adapters::qdrant::{
    CollectionSettings, PayloadFieldType, QdrantCatalog, QdrantConfig, QdrantVectorIndex,
};
use tandem_core::{
    Distance, IndexCatalog, IndexError, Point, PointId, RecordId, Scope, VectorIndex,
};
use tandem_tests::qdrant_double::QdrantDouble;

/// A catalog with what must outlive it (a temporary directory, a server).
struct Fixture<C, G> {
    catalog: C,
    _guard: G,
}

impl<C, G> Fixture<C, G> {
    fn new(catalog: C, guard: G) -> Self {
        Self {
            catalog,
            _guard: guard,
        }
    }
}

#[async_trait]
impl<C: IndexCatalog, G: Send + Sync> IndexCatalog for Fixture<C, G> {
    type Index = C::Index;

    async fn open(&self, name: &str) -> Result<C::Index, IndexError> {
        self.catalog.open(name).await
    }

    async fn create(
        &self,
        name: &str,
        dimension: usize,
        distance: Distance,
    ) -> Result<C::Index, IndexError> {
        self.catalog.create(name, dimension, distance).await
    }

    async fn drop_collection(&self, name: &str) -> Result<bool, IndexError> {
        self.catalog.drop_collection(name).await
    }
}

fn edge_catalog() -> Fixture<EdgeCatalog, tempfile::TempDir> {
    let dir = tempfile::tempdir().expect("temp dir");
    // A root that does not exist yet: the first collection creates it.
    let catalog = EdgeCatalog::new(dir.path().join("collections"));
    Fixture::new(catalog, dir)
}

/// The base configuration of a catalog on `url` (its collection, dimension
/// and distance are not used by the catalog).
fn base_config(url: &str) -> QdrantConfig {
    QdrantConfig::new(url, "unused", 4, Distance::Cosine).with_timeout(Duration::from_secs(10))
}

async fn qdrant_catalog() -> Fixture<QdrantCatalog, QdrantDouble> {
    let double = QdrantDouble::start().await;
    let catalog = QdrantCatalog::new(base_config(&double.url())).expect("a valid configuration");
    Fixture::new(catalog, double)
}

tandem_core::index_catalog_conformance!(edge, async { edge_catalog() });

tandem_core::index_catalog_conformance!(qdrant_double, qdrant_catalog());

// The catalog of a connected index shares its client.
tandem_core::index_catalog_conformance!(qdrant_double_from_index, async {
    let double = QdrantDouble::start().await;
    let index = QdrantVectorIndex::connect(base_config(&double.url()))
        .await
        .expect("connect to the test server");
    Fixture::new(QdrantCatalog::from_index(&index), double)
});

fn point(dimension: usize) -> Point {
    Point {
        id: PointId::new_random(),
        record_id: RecordId::new_random(),
        scope: Scope::new("catalog"),
        metadata: Map::new(),
        vector: (0..dimension).map(|i| 0.1 + i as f32).collect(),
        written_at_ms: 1,
    }
}

fn assert_not_found<T>(result: Result<T, IndexError>, what: &str) {
    match result {
        Err(IndexError::CollectionNotFound { .. }) => {}
        Err(other) => panic!("{what}: expected CollectionNotFound, got {other:?}"),
        Ok(_) => panic!("{what}: expected CollectionNotFound, got Ok"),
    }
}

fn assert_config<T>(result: Result<T, IndexError>, what: &str) -> String {
    match result {
        Err(IndexError::Config { message }) => message,
        Err(other) => panic!("{what}: expected Config, got {other:?}"),
        Ok(_) => panic!("{what}: expected Config, got Ok"),
    }
}

// ------------------------------------------------------------------ Qdrant

async fn raw_client(double: &QdrantDouble) -> Qdrant {
    Qdrant::from_url(&double.url())
        .skip_compatibility_check()
        .build()
        .expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qdrant_create_uses_the_configured_settings_and_payload_indexes() {
    let double = QdrantDouble::start().await;
    let settings = CollectionSettings::new()
        .with_hnsw_m(8)
        .with_payload_index("item", PayloadFieldType::Keyword)
        .with_payload_index("n", PayloadFieldType::Integer);
    let catalog =
        QdrantCatalog::new(base_config(&double.url()).with_collection_settings(settings)).unwrap();
    let index = catalog.create("built", 6, Distance::Euclid).await.unwrap();
    assert_eq!((index.dimension(), index.distance()), (6, Distance::Euclid));
    assert_eq!(index.collection(), "built");
    assert_eq!(index.config().collection_settings.hnsw_m, Some(8));

    let info = raw_client(&double)
        .await
        .collection_info(GetCollectionInfoRequest {
            collection_name: "built".into(),
        })
        .await
        .unwrap()
        .result
        .unwrap();
    let params = info
        .config
        .as_ref()
        .and_then(|c| c.params.as_ref())
        .unwrap();
    let Some(vectors_config::Config::Params(vector)) = params
        .vectors_config
        .as_ref()
        .and_then(|v| v.config.as_ref())
    else {
        panic!("no vector params");
    };
    assert_eq!(vector.size, 6);
    assert_eq!(
        vector.distance,
        qdrant_client::qdrant::Distance::Euclid as i32
    );
    let hnsw_m = info
        .config
        .as_ref()
        .and_then(|c| c.hnsw_config.as_ref())
        .and_then(|h| h.m);
    assert_eq!(hnsw_m, Some(8));
    for (field, kind) in [
        ("record_id", PayloadSchemaType::Keyword),
        ("scope", PayloadSchemaType::Keyword),
        ("metadata.item", PayloadSchemaType::Keyword),
        ("metadata.n", PayloadSchemaType::Integer),
    ] {
        let schema = info
            .payload_schema
            .get(field)
            .unwrap_or_else(|| panic!("no payload index on {field}: {:?}", info.payload_schema));
        assert_eq!(schema.data_type, kind as i32, "{field}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qdrant_open_learns_the_layout_and_creates_nothing() {
    let double = QdrantDouble::start().await;
    let raw = raw_client(&double).await;
    raw.create_collection(
        CreateCollectionBuilder::new("made_elsewhere").vectors_config(VectorParamsBuilder::new(
            5,
            qdrant_client::qdrant::Distance::Dot,
        )),
    )
    .await
    .unwrap();
    let catalog = QdrantCatalog::new(base_config(&double.url())).unwrap();
    let index = catalog.open("made_elsewhere").await.unwrap();
    assert_eq!((index.dimension(), index.distance()), (5, Distance::Dot));
    index.upsert(&[point(5)]).await.unwrap();
    assert_eq!(index.count(None).await.unwrap(), 1);
    // Opening adds the payload indexes the adapter relies on.
    let info = raw
        .collection_info(GetCollectionInfoRequest {
            collection_name: "made_elsewhere".into(),
        })
        .await
        .unwrap()
        .result
        .unwrap();
    assert!(info.payload_schema.contains_key("record_id"));
    assert!(info.payload_schema.contains_key("scope"));

    assert_not_found(catalog.open("absent").await, "open of a missing collection");
    let exists = raw
        .collection_exists(CollectionExistsRequest {
            collection_name: "absent".into(),
        })
        .await
        .unwrap();
    assert!(!exists, "open created the collection");

    let message = assert_config(
        catalog.create("made_elsewhere", 5, Distance::Cosine).await,
        "create with another distance",
    );
    assert!(message.contains("made_elsewhere"), "{message}");
    assert_config(catalog.open("a/b").await, "an invalid name");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qdrant_indexes_of_a_dropped_collection_fail_with_not_found() {
    let fixture = qdrant_catalog().await;
    let index = fixture
        .create("short_lived", 3, Distance::Cosine)
        .await
        .unwrap();
    index.upsert(&[point(3)]).await.unwrap();
    assert!(fixture.drop_collection("short_lived").await.unwrap());
    assert_not_found(index.count(None).await, "count after the drop");
    // Created again, it is empty.
    let again = fixture
        .create("short_lived", 3, Distance::Cosine)
        .await
        .unwrap();
    assert_eq!(again.count(None).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qdrant_catalog_sends_the_api_key_and_never_shows_it() {
    const KEY: &str = "catalog-secret-key-42";
    let double = QdrantDouble::builder()
        .with_api_key(KEY)
        .start()
        .await
        .unwrap();
    let catalog = QdrantCatalog::new(base_config(&double.url()).with_api_key(KEY)).unwrap();
    let index = catalog.create("keyed", 3, Distance::Dot).await.unwrap();
    assert!(!format!("{catalog:?} {index:?}").contains(KEY));
    assert!(catalog.drop_collection("keyed").await.unwrap());

    let wrong = QdrantCatalog::new(base_config(&double.url()).with_api_key("wrong-key")).unwrap();
    match wrong.create("keyed", 3, Distance::Dot).await {
        Err(e @ IndexError::Unauthorized { .. }) => {
            assert!(!e.to_string().contains("wrong-key"), "{e}")
        }
        other => panic!("expected Unauthorized, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qdrant_unreachable_server_is_a_transient_error_naming_it() {
    let double = QdrantDouble::start().await;
    let url = double.url();
    double.shutdown().await;
    let catalog = QdrantCatalog::new(base_config(&url)).unwrap();
    match catalog.create("nowhere", 3, Distance::Dot).await {
        Err(e @ IndexError::Transient { .. }) => assert!(e.to_string().contains(&url), "{e}"),
        other => panic!("expected Transient, got {other:?}"),
    }
}

// -------------------------------------------------------------------- edge

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_open_learns_the_layout_after_every_handle_is_gone() {
    let fixture = edge_catalog();
    let kept = point(7);
    {
        let index = fixture
            .create("vectors", 7, Distance::Euclid)
            .await
            .unwrap();
        index.upsert(std::slice::from_ref(&kept)).await.unwrap();
    } // the last handle is dropped: the shard is closed
    let index = fixture.open("vectors").await.unwrap();
    assert_eq!((index.dimension(), index.distance()), (7, Distance::Euclid));
    assert_eq!(index.retrieve(&[kept.id]).await.unwrap().len(), 1);
    // The same shard as `EdgeVectorIndex::open` of its directory.
    let dir = fixture.catalog.collection_dir("vectors").unwrap();
    let direct = EdgeVectorIndex::open(&dir, 7, Distance::Euclid)
        .await
        .unwrap();
    direct.upsert(&[point(7)]).await.unwrap();
    assert_eq!(index.count(None).await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_drop_closes_the_shard_for_every_holder() {
    let fixture = edge_catalog();
    let held = fixture
        .create("retired", 3, Distance::Cosine)
        .await
        .unwrap();
    held.upsert(&[point(3)]).await.unwrap();
    let dir = fixture.catalog.collection_dir("retired").unwrap();
    assert!(fixture.drop_collection("retired").await.unwrap());
    assert!(!dir.exists(), "the directory is still there");
    assert_not_found(held.count(None).await, "count through a held index");
    assert_not_found(
        held.upsert(&[point(3)]).await,
        "upsert through a held index",
    );
    assert_not_found(fixture.open("retired").await, "open after the drop");
    // Created again (while the old handle is alive): a new, empty shard.
    let again = fixture.create("retired", 4, Distance::Dot).await.unwrap();
    assert_eq!(again.count(None).await.unwrap(), 0);
    again.upsert(&[point(4)]).await.unwrap();
    drop(held);
    assert_eq!(again.count(None).await.unwrap(), 1);
    // No leftover of the dropped shard in the root.
    let leftovers: Vec<_> = std::fs::read_dir(fixture.catalog.root())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_names_that_are_not_collections() {
    let fixture = edge_catalog();
    let root = fixture.catalog.root().to_path_buf();
    std::fs::create_dir_all(root.join("empty_dir")).unwrap();
    std::fs::write(root.join("metadata.db"), b"not a shard").unwrap();
    for name in ["empty_dir", "metadata.db", "missing"] {
        assert_not_found(fixture.open(name).await, name);
        assert!(!fixture.drop_collection(name).await.unwrap(), "{name}");
    }
    assert!(
        root.join("empty_dir").is_dir(),
        "a directory without a shard was removed"
    );
    assert_eq!(
        std::fs::read(root.join("metadata.db")).unwrap(),
        b"not a shard"
    );
    for name in ["", ".hidden", "..", "a/b", "a\\b", "nul\0"] {
        assert_config(fixture.open(name).await, &format!("open {name:?}"));
        assert_config(
            fixture.create(name, 3, Distance::Cosine).await,
            &format!("create {name:?}"),
        );
        assert_config(
            fixture.drop_collection(name).await,
            &format!("drop {name:?}"),
        );
    }
    let message = assert_config(
        fixture.create("ok", 0, Distance::Cosine).await,
        "dimension 0",
    );
    assert!(message.contains("dimension"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn edge_drop_waits_for_concurrent_writes() {
    let fixture = edge_catalog();
    let index = fixture.create("busy", 8, Distance::Cosine).await.unwrap();
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let index = index.clone();
            tokio::spawn(async move {
                for _ in 0..20 {
                    let points: Vec<_> = (0..10).map(|_| point(8)).collect();
                    if let Err(e) = index.upsert(&points).await {
                        // The only error a drop may cause.
                        assert!(matches!(e, IndexError::CollectionNotFound { .. }), "{e:?}");
                        return;
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(fixture.drop_collection("busy").await.unwrap());
    for writer in writers {
        writer.await.unwrap();
    }
    assert_not_found(fixture.open("busy").await, "open after the drop");
}
