//! The collection settings of `QdrantConfig` (`CollectionSettings`) reach
//! Qdrant: each one is set at creation and read back through Qdrant's own
//! collection info (with qdrant-client directly, not through the adapter); an
//! existing collection is checked against them at connect — a difference in
//! `shard_number`, `replication_factor` or the quantization kind is a
//! `Config` error naming the setting and both values, other differences only
//! warn, missing payload indexes are created.
//!
//! With `QDRANT_URL` (gRPC, and `QDRANT_API_KEY` if the server needs one) the
//! tests run against that server, a real Qdrant in CI; without it, against the
//! `QdrantDouble`. One line on stderr says which. Each test uses a collection
//! of its own, deleted when the test ends.
//!
//! On a single real node (not in cluster mode) Qdrant accepts and reports
//! `replication_factor` and `write_consistency_factor` above 1 as given, and
//! writes still succeed: there is only one replica, and no peer to wait for.

use std::io::Write;
use std::sync::Once;
use std::time::Duration;

use qdrant_client::Qdrant;
use qdrant_client::qdrant::{
    CollectionInfo, DeleteCollection, GetCollectionInfoRequest, PayloadSchemaType,
    quantization_config, vectors_config,
};
use serde_json::json;
use tandem_adapters::qdrant::{
    CollectionSettings, PayloadFieldType, QdrantConfig, QdrantVectorIndex, Quantization,
};
use tandem_core::{Distance, IndexError, Point, PointId, RecordId, Scope, VectorIndex};
use tandem_tests::qdrant_double::QdrantDouble;
use uuid::Uuid;

const DIM: usize = 4;

/// The server the tests run against.
struct Server {
    url: String,
    api_key: Option<String>,
    /// The test server, when no `QDRANT_URL` is given (kept alive).
    double: Option<QdrantDouble>,
}

static ANNOUNCE: Once = Once::new();

impl Server {
    async fn start() -> Self {
        let url = std::env::var("QDRANT_URL").ok().filter(|u| !u.is_empty());
        let server = match url {
            Some(url) => Server {
                url,
                api_key: std::env::var("QDRANT_API_KEY")
                    .ok()
                    .filter(|k| !k.is_empty()),
                double: None,
            },
            None => {
                let double = QdrantDouble::start().await;
                Server {
                    url: double.url(),
                    api_key: None,
                    double: Some(double),
                }
            }
        };
        ANNOUNCE.call_once(|| {
            let line = match &server.double {
                None => format!(
                    "qdrant_collection_settings: against a real Qdrant at {} (QDRANT_URL)\n",
                    server.url
                ),
                Some(_) => "qdrant_collection_settings: against the QdrantDouble \
                            (set QDRANT_URL to run against a real Qdrant)\n"
                    .to_owned(),
            };
            // Straight to stderr: libtest captures only the print macros.
            let _ = std::io::stderr().write_all(line.as_bytes());
        });
        server
    }

    /// A fresh collection, deleted at the end of the test.
    fn collection(&self) -> TestCollection {
        TestCollection {
            name: format!("tandem_settings_{}", Uuid::new_v4().simple()),
            url: self.url.clone(),
            api_key: self.api_key.clone(),
            // The double's collections go with its temporary directory.
            delete: self.double.is_none(),
        }
    }

    fn config(&self, collection: &TestCollection, settings: CollectionSettings) -> QdrantConfig {
        let mut config = QdrantConfig::new(&self.url, &collection.name, DIM, Distance::Cosine)
            .with_timeout(Duration::from_secs(20))
            .with_collection_settings(settings);
        config.api_key = self.api_key.clone().map(Into::into);
        config
    }

    async fn connect(
        &self,
        collection: &TestCollection,
        settings: CollectionSettings,
    ) -> Result<QdrantVectorIndex, IndexError> {
        QdrantVectorIndex::connect(self.config(collection, settings)).await
    }

    /// Qdrant's own collection info, read with qdrant-client.
    async fn info(&self, collection: &TestCollection) -> CollectionInfo {
        client(&self.url, self.api_key.clone())
            .collection_info(GetCollectionInfoRequest {
                collection_name: collection.name.clone(),
            })
            .await
            .expect("collection info")
            .result
            .expect("a collection info")
    }

    /// Creates the collection with `settings` and returns its info.
    async fn create(
        &self,
        collection: &TestCollection,
        settings: CollectionSettings,
    ) -> CollectionInfo {
        self.connect(collection, settings)
            .await
            .unwrap_or_else(|e| panic!("create the collection at {}: {e}", self.url));
        self.info(collection).await
    }
}

fn client(url: &str, api_key: Option<String>) -> Qdrant {
    Qdrant::from_url(url)
        .api_key(api_key)
        .skip_compatibility_check()
        .build()
        .expect("a client")
}

/// A collection name, and the collection deleted on drop on a real server.
struct TestCollection {
    name: String,
    url: String,
    api_key: Option<String>,
    delete: bool,
}

impl Drop for TestCollection {
    fn drop(&mut self) {
        if !self.delete {
            return;
        }
        let (url, key, name) = (self.url.clone(), self.api_key.clone(), self.name.clone());
        // On a runtime of its own: the test's may be shutting down.
        let done = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                client(&url, key)
                    .delete_collection(DeleteCollection {
                        collection_name: name,
                        timeout: Some(30),
                    })
                    .await
            })
        })
        .join();
        if let Ok(Err(e)) = done {
            eprintln!("could not delete test collection {}: {e}", self.name);
        }
    }
}

// on_disk, on_disk_payload and always_ram are deprecated in qdrant-client 1.20
// (for `memory`, new in 1.19, which Qdrant 1.18 ignores): they are what it reports.
#[allow(deprecated)]
mod read {
    use super::*;

    pub fn params(info: &CollectionInfo) -> qdrant_client::qdrant::CollectionParams {
        info.config
            .as_ref()
            .and_then(|c| c.params.clone())
            .expect("collection params")
    }

    pub fn vector(info: &CollectionInfo) -> qdrant_client::qdrant::VectorParams {
        match params(info).vectors_config.and_then(|v| v.config) {
            Some(vectors_config::Config::Params(p)) => p,
            other => panic!("unexpected vectors config {other:?}"),
        }
    }

    pub fn on_disk(info: &CollectionInfo) -> Option<bool> {
        vector(info).on_disk
    }

    pub fn on_disk_payload(info: &CollectionInfo) -> bool {
        params(info).on_disk_payload
    }

    pub fn hnsw(info: &CollectionInfo) -> (Option<u64>, Option<u64>) {
        let h = info
            .config
            .as_ref()
            .and_then(|c| c.hnsw_config)
            .expect("an HNSW config");
        (h.m, h.ef_construct)
    }

    pub fn quantization(info: &CollectionInfo) -> Option<quantization_config::Quantization> {
        info.config
            .as_ref()
            .and_then(|c| c.quantization_config.as_ref())
            .and_then(|q| q.quantization)
    }

    pub fn scalar(info: &CollectionInfo) -> (i32, Option<f32>, Option<bool>) {
        match quantization(info) {
            Some(quantization_config::Quantization::Scalar(s)) => {
                (s.r#type, s.quantile, s.always_ram)
            }
            other => panic!("expected scalar quantization, got {other:?}"),
        }
    }

    pub fn binary_always_ram(info: &CollectionInfo) -> Option<bool> {
        match quantization(info) {
            Some(quantization_config::Quantization::Binary(b)) => b.always_ram,
            other => panic!("expected binary quantization, got {other:?}"),
        }
    }
}

fn config_message(err: IndexError) -> String {
    match err {
        IndexError::Config { message } => message,
        other => panic!("expected a Config error, got {other:?}"),
    }
}

// ------------------------------------------------------------ each setting reaches Qdrant

#[tokio::test]
async fn shard_number_reaches_qdrant() {
    let server = Server::start().await;
    let c = server.collection();
    let info = server
        .create(&c, CollectionSettings::new().with_shard_number(3))
        .await;
    assert_eq!(read::params(&info).shard_number, 3);
}

#[tokio::test]
async fn replication_factor_reaches_qdrant() {
    let server = Server::start().await;
    let c = server.collection();
    let info = server
        .create(&c, CollectionSettings::new().with_replication_factor(2))
        .await;
    // Reported as given, also by a single node (which holds the one replica).
    assert_eq!(read::params(&info).replication_factor, Some(2));
}

#[tokio::test]
async fn write_consistency_factor_reaches_qdrant() {
    let server = Server::start().await;
    let c = server.collection();
    let settings = CollectionSettings::new()
        .with_replication_factor(2)
        .with_write_consistency_factor(2);
    let info = server.create(&c, settings).await;
    assert_eq!(read::params(&info).write_consistency_factor, Some(2));
}

#[tokio::test]
async fn on_disk_reaches_qdrant() {
    let server = Server::start().await;
    let c = server.collection();
    let info = server
        .create(&c, CollectionSettings::new().with_on_disk(true))
        .await;
    assert_eq!(read::on_disk(&info), Some(true));
    // Unset, Qdrant reports nothing (its default: in RAM).
    let c = server.collection();
    let info = server.create(&c, CollectionSettings::new()).await;
    assert_ne!(read::on_disk(&info), Some(true));
}

#[tokio::test]
async fn on_disk_payload_reaches_qdrant() {
    let server = Server::start().await;
    // Qdrant's default is true, so false is the visible setting.
    let c = server.collection();
    let info = server
        .create(&c, CollectionSettings::new().with_on_disk_payload(false))
        .await;
    assert!(!read::on_disk_payload(&info));
    let c = server.collection();
    let info = server
        .create(&c, CollectionSettings::new().with_on_disk_payload(true))
        .await;
    assert!(read::on_disk_payload(&info));
}

#[tokio::test]
async fn hnsw_m_and_ef_construct_reach_qdrant() {
    let server = Server::start().await;
    let c = server.collection();
    let info = server
        .create(&c, CollectionSettings::new().with_hnsw_m(8))
        .await;
    assert_eq!(read::hnsw(&info).0, Some(8));
    let c = server.collection();
    let info = server
        .create(&c, CollectionSettings::new().with_hnsw_ef_construct(64))
        .await;
    assert_eq!(read::hnsw(&info).1, Some(64));
    // 0 (no graph: Qdrant's advice for bulk loads) is a valid m.
    let c = server.collection();
    let info = server
        .create(&c, CollectionSettings::new().with_hnsw_m(0))
        .await;
    assert_eq!(read::hnsw(&info).0, Some(0));
}

#[tokio::test]
async fn scalar_quantization_reaches_qdrant() {
    let server = Server::start().await;
    let c = server.collection();
    let settings = CollectionSettings::new().with_quantization(Quantization::Scalar {
        quantile: Some(0.99),
        always_ram: Some(true),
    });
    let info = server.create(&c, settings).await;
    let int8 = qdrant_client::qdrant::QuantizationType::Int8 as i32;
    assert_eq!(read::scalar(&info), (int8, Some(0.99), Some(true)));
    // Without options: int8, Qdrant's defaults.
    let c = server.collection();
    let info = server
        .create(
            &c,
            CollectionSettings::new().with_quantization(Quantization::scalar()),
        )
        .await;
    let (kind, quantile, _) = read::scalar(&info);
    assert_eq!((kind, quantile), (int8, None));
}

#[tokio::test]
async fn binary_quantization_reaches_qdrant() {
    let server = Server::start().await;
    let c = server.collection();
    let settings = CollectionSettings::new().with_quantization(Quantization::Binary {
        always_ram: Some(true),
    });
    let info = server.create(&c, settings).await;
    assert_eq!(read::binary_always_ram(&info), Some(true));
}

#[tokio::test]
async fn no_quantization_is_none_at_qdrant() {
    let server = Server::start().await;
    let c = server.collection();
    let info = server
        .create(
            &c,
            CollectionSettings::new().with_quantization(Quantization::None),
        )
        .await;
    assert_eq!(read::quantization(&info), None);
}

#[tokio::test]
async fn payload_indexes_are_created_on_the_metadata_paths() {
    let server = Server::start().await;
    let c = server.collection();
    let settings = CollectionSettings::new()
        .with_payload_index("item", PayloadFieldType::Keyword)
        .with_payload_index("year", PayloadFieldType::Integer)
        .with_payload_index("price", PayloadFieldType::Float)
        .with_payload_index("in stock", PayloadFieldType::Bool);
    let index = server.connect(&c, settings).await.expect("create");
    // Points written through the adapter are indexed under these paths: the
    // indexes target where the adapter keeps metadata.
    let scope = Scope::new("s");
    let points: Vec<Point> = (0..3)
        .map(|i| Point {
            id: PointId::new_random(),
            record_id: RecordId::new_v7(),
            scope: scope.clone(),
            metadata:
                json!({"item": format!("i{i}"), "year": 2020 + i, "price": 1.5, "in stock": true})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            vector: vec![1.0, i as f32, 0.5, -1.0],
            written_at_ms: 1_700_000_000_000,
        })
        .collect();
    index.upsert(&points).await.expect("upsert");
    let info = server.info(&c).await;
    for (path, kind) in [
        ("metadata.item", PayloadSchemaType::Keyword),
        ("metadata.year", PayloadSchemaType::Integer),
        ("metadata.price", PayloadSchemaType::Float),
        ("metadata.\"in stock\"", PayloadSchemaType::Bool),
        ("record_id", PayloadSchemaType::Keyword),
        ("scope", PayloadSchemaType::Keyword),
    ] {
        let schema = info
            .payload_schema
            .get(path)
            .unwrap_or_else(|| panic!("no index on {path}: {:?}", info.payload_schema));
        assert_eq!(schema.data_type, kind as i32, "{path}");
        assert_eq!(schema.points, Some(3), "points indexed under {path}");
    }
    assert_eq!(info.payload_schema.len(), 6, "{:?}", info.payload_schema);
}

// ------------------------------------------------------------ checks of an existing collection

/// Everything at once, so that a second connect checks every setting.
fn every_setting() -> CollectionSettings {
    CollectionSettings::new()
        .with_shard_number(2)
        .with_replication_factor(2)
        .with_write_consistency_factor(1)
        .with_on_disk(true)
        .with_on_disk_payload(false)
        .with_hnsw_m(8)
        .with_hnsw_ef_construct(50)
        .with_quantization(Quantization::Scalar {
            quantile: Some(0.95),
            always_ram: Some(true),
        })
        .with_payload_index("item", PayloadFieldType::Keyword)
}

#[tokio::test]
async fn a_collection_created_with_every_setting_passes_its_own_check() {
    let server = Server::start().await;
    let c = server.collection();
    server.create(&c, every_setting()).await;
    server
        .connect(&c, every_setting())
        .await
        .expect("the same settings connect");
    // Unset settings are not checked: any existing collection of the right
    // size and distance connects.
    server
        .connect(&c, CollectionSettings::new())
        .await
        .expect("no settings connect");
}

#[tokio::test]
async fn a_semantic_or_durability_mismatch_fails_at_connect_naming_each_setting() {
    let server = Server::start().await;
    let c = server.collection();
    let before = server.create(&c, every_setting()).await;
    let err = server
        .connect(
            &c,
            every_setting()
                .with_shard_number(3)
                .with_replication_factor(1)
                .with_quantization(Quantization::binary()),
        )
        .await
        .expect_err("another shard number, replication factor and quantization");
    let message = config_message(err);
    for part in [
        &format!("Qdrant collection `{}`", c.name),
        "`shard_number`: expected 3, found 2",
        "`replication_factor`: expected 1, found 2",
        "`quantization`: expected binary, found scalar:quantile=0.95,always_ram=true",
    ] {
        assert!(message.contains(part), "{part:?} not in: {message}");
    }
    // The collection was left as it was.
    assert_eq!(server.info(&c).await.config, before.config);

    // Each one alone is refused too.
    for (settings, name) in [
        (every_setting().with_shard_number(1), "shard_number"),
        (
            every_setting().with_replication_factor(3),
            "replication_factor",
        ),
        (
            every_setting().with_quantization(Quantization::None),
            "quantization",
        ),
    ] {
        let message = config_message(server.connect(&c, settings).await.expect_err(name));
        assert!(message.contains(&format!("`{name}`")), "{message}");
    }
}

#[tokio::test]
async fn a_harmless_difference_connects_and_leaves_the_collection_alone() {
    let server = Server::start().await;
    let c = server.collection();
    let before = server.create(&c, every_setting()).await;
    let index = server
        .connect(
            &c,
            every_setting()
                .with_write_consistency_factor(2)
                .with_on_disk(false)
                .with_on_disk_payload(true)
                .with_hnsw_m(16)
                .with_hnsw_ef_construct(100)
                .with_quantization(Quantization::Scalar {
                    quantile: Some(0.99),
                    always_ram: Some(false),
                }),
        )
        .await
        .expect("only warnings");
    assert_eq!(index.count(None).await.expect("count"), 0);
    assert_eq!(server.info(&c).await.config, before.config);
}

#[tokio::test]
async fn a_missing_payload_index_is_created_on_an_existing_collection() {
    let server = Server::start().await;
    let c = server.collection();
    let before = server.create(&c, CollectionSettings::new()).await;
    assert!(!before.payload_schema.contains_key("metadata.year"));
    let with_index =
        CollectionSettings::new().with_payload_index("year", PayloadFieldType::Integer);
    server
        .connect(&c, with_index.clone())
        .await
        .expect("connect");
    let after = server.info(&c).await;
    let schema = after.payload_schema.get("metadata.year").expect("created");
    assert_eq!(schema.data_type, PayloadSchemaType::Integer as i32);
    // Idempotent.
    server.connect(&c, with_index).await.expect("again");
    assert_eq!(server.info(&c).await.payload_schema.len(), 3);

    // An index of another type is left alone (a warning): filters still work.
    server
        .connect(
            &c,
            CollectionSettings::new().with_payload_index("year", PayloadFieldType::Keyword),
        )
        .await
        .expect("another index type only warns");
    let schema = server.info(&c).await.payload_schema["metadata.year"].clone();
    assert_eq!(schema.data_type, PayloadSchemaType::Integer as i32);
}

#[tokio::test]
async fn invalid_settings_fail_before_anything_is_sent() {
    let server = Server::start().await;
    let c = server.collection();
    let err = server
        .connect(
            &c,
            CollectionSettings::new()
                .with_replication_factor(1)
                .with_write_consistency_factor(2),
        )
        .await
        .expect_err("invalid");
    assert!(
        config_message(err).contains("`write_consistency_factor`"),
        "named"
    );
    let exists = client(&server.url, server.api_key.clone())
        .collection_exists(&c.name)
        .await
        .expect("exists");
    assert!(!exists, "nothing was created");
}
