//! `QdrantVectorIndex` through the real `qdrant-client` against the
//! Qdrant-compatible test server (`QdrantDouble`, Qdrant's own engine), with
//! faults injected in the server: the `VectorIndex` conformance suite, error
//! classification per gRPC code, qdrant-client's own re-send, update statuses
//! other than `Completed`, chunked writes, and configuration errors at connect.
//!
//! With `QDRANT_URL` (and optionally `QDRANT_API_KEY`) set, the `real_qdrant`
//! module runs the same conformance suite against that server, one collection
//! per index, deleted afterwards. Without it, `real_qdrant` runs against a test
//! server too, so it never passes vacuously.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use qdrant_client::Qdrant;
use qdrant_client::qdrant::{
    DeleteCollection, GetCollectionInfoRequest, PayloadSchemaType, UpdateStatus, vectors_config,
};
use serde_json::json;
use tandem_adapters::qdrant::{QdrantConfig, QdrantVectorIndex};
use tandem_core::testkit::conformance::Guarded;
use tandem_core::{
    Distance, Filter, IndexError, IndexQuery, Outcome, Point, PointId, RecordId, Scope, VectorIndex,
};
use tandem_tests::qdrant_double::{CallOutcome, QdrantDouble, RpcAction, RpcFault};
use tonic::Code;
use uuid::Uuid;

const DIM: usize = 4;

fn fresh_collection() -> String {
    format!("tandem_test_{}", Uuid::new_v4().simple())
}

fn config(url: &str, collection: &str, dim: usize, distance: Distance) -> QdrantConfig {
    QdrantConfig::new(url, collection, dim, distance).with_timeout(Duration::from_secs(10))
}

async fn connect(double: &QdrantDouble, dim: usize, distance: Distance) -> QdrantVectorIndex {
    QdrantVectorIndex::connect(config(&double.url(), &fresh_collection(), dim, distance))
        .await
        .expect("connect to the test server")
}

// ------------------------------------------------------------ conformance

tandem_core::vector_index_conformance!(through_double, |dim, distance| async move {
    let double = QdrantDouble::start().await;
    let index = connect(&double, dim, distance).await;
    Guarded::new(index, double)
});

// The same suite with tiny chunks several in flight, so that every batch takes
// the chunked path.
tandem_core::vector_index_conformance!(through_double_chunked, |dim, distance| async move {
    let double = QdrantDouble::start().await;
    let config = config(&double.url(), &fresh_collection(), dim, distance).with_chunking(2, 3);
    let index = QdrantVectorIndex::connect(config)
        .await
        .expect("connect to the test server");
    Guarded::new(index, double)
});

tandem_core::vector_index_conformance!(real_qdrant, |dim, distance| async move {
    real_or_double(dim, distance).await
});

/// What keeps a conformance target alive: a test server, or a collection on a
/// real Qdrant that is deleted when the test ends.
#[derive(Debug)]
#[allow(dead_code)] // held for its Drop
enum Target {
    Double(QdrantDouble),
    Real(DropCollection),
}

async fn real_or_double(dim: usize, distance: Distance) -> Guarded<QdrantVectorIndex, Target> {
    let Some(url) = std::env::var("QDRANT_URL").ok().filter(|u| !u.is_empty()) else {
        let double = QdrantDouble::start().await;
        let index = connect(&double, dim, distance).await;
        return Guarded::new(index, Target::Double(double));
    };
    let api_key = std::env::var("QDRANT_API_KEY")
        .ok()
        .filter(|k| !k.is_empty());
    let collection = fresh_collection();
    let mut config = config(&url, &collection, dim, distance);
    config.api_key = api_key.clone().map(Into::into);
    let index = match QdrantVectorIndex::connect(config).await {
        Ok(index) => index,
        Err(e) => panic!("QDRANT_URL is set but Qdrant at {url} cannot be used: {e}"),
    };
    let guard = DropCollection {
        url,
        api_key,
        collection,
    };
    Guarded::new(index, Target::Real(guard))
}

/// Deletes a real Qdrant's test collection on drop (on a runtime of its own,
/// since the test's runtime may be shutting down).
struct DropCollection {
    url: String,
    api_key: Option<String>,
    collection: String,
}

impl std::fmt::Debug for DropCollection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DropCollection")
            .field("url", &self.url)
            .field("collection", &self.collection)
            .finish_non_exhaustive()
    }
}

impl Drop for DropCollection {
    fn drop(&mut self) {
        let (url, key, name) = (
            self.url.clone(),
            self.api_key.clone(),
            self.collection.clone(),
        );
        let done = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let client = Qdrant::from_url(&url)
                    .api_key(key)
                    .skip_compatibility_check()
                    .build()
                    .expect("client");
                client
                    .delete_collection(DeleteCollection {
                        collection_name: name,
                        timeout: Some(30),
                    })
                    .await
            })
        })
        .join();
        if let Ok(Err(e)) = done {
            eprintln!("could not delete test collection {}: {e}", self.collection);
        }
    }
}

// ------------------------------------------------------------ helpers

fn points(scope: &Scope, n: usize) -> Vec<Point> {
    (0..n)
        .map(|i| {
            let x = i as f32;
            Point {
                id: PointId::new_random(),
                record_id: RecordId::new_v7(),
                scope: scope.clone(),
                metadata: json!({ "i": i }).as_object().cloned().unwrap_or_default(),
                vector: vec![1.0 + x, 0.5, -0.25 * x, 1.0],
                written_at_ms: 1_700_000_000_000 + i as i64,
            }
        })
        .collect()
}

fn ids(points: &[Point]) -> Vec<PointId> {
    points.iter().map(|p| p.id).collect()
}

fn fresh_scope() -> Scope {
    Scope::new(format!("s-{}", Uuid::new_v4().simple()))
}

/// A test server with a collection, and an index on it.
async fn setup() -> (QdrantDouble, QdrantVectorIndex) {
    let double = QdrantDouble::start().await;
    let index = connect(&double, DIM, Distance::Cosine).await;
    double.faults().clear_calls();
    (double, index)
}

fn upserts(double: &QdrantDouble) -> Vec<CallOutcome> {
    double
        .faults()
        .calls_to("Points/Upsert")
        .into_iter()
        .map(|c| c.outcome)
        .collect()
}

/// Upserts with `action` on every upsert call; returns the error and how many
/// upsert calls reached the server.
async fn upsert_failing_with(action: RpcAction) -> (IndexError, usize) {
    let (double, index) = setup().await;
    double
        .faults()
        .add(RpcFault::always("Points/Upsert", action));
    let batch = points(&fresh_scope(), 3);
    let err = index
        .upsert(&batch)
        .await
        .expect_err("the upsert must fail");
    (err, upserts(&double).len())
}

fn assert_transient_unknown(err: &IndexError) {
    assert!(
        matches!(err, IndexError::Transient { .. }),
        "expected Transient, got {err:?}"
    );
    assert!(err.is_retryable());
    assert_eq!(err.outcome(), Outcome::Unknown, "{err:?}");
}

// ------------------------------------------------------------ classification

#[tokio::test]
async fn unavailable_is_transient_with_unknown_outcome() {
    let (err, calls) = upsert_failing_with(RpcAction::FailBefore(Code::Unavailable)).await;
    assert_transient_unknown(&err);
    // qdrant-client re-sent the request once on a fresh connection.
    assert_eq!(calls, 2);
}

#[tokio::test]
async fn internal_is_transient_with_unknown_outcome() {
    let (err, calls) = upsert_failing_with(RpcAction::FailBefore(Code::Internal)).await;
    assert_transient_unknown(&err);
    assert_eq!(calls, 2);
}

#[tokio::test]
async fn cancelled_is_transient_with_unknown_outcome() {
    let (err, calls) = upsert_failing_with(RpcAction::FailBefore(Code::Cancelled)).await;
    assert_transient_unknown(&err);
    assert_eq!(calls, 2);
}

#[tokio::test]
async fn unknown_is_transient_with_unknown_outcome() {
    let (err, calls) = upsert_failing_with(RpcAction::FailBefore(Code::Unknown)).await;
    assert_transient_unknown(&err);
    assert_eq!(calls, 2);
}

#[tokio::test]
async fn deadline_exceeded_is_transient_with_unknown_outcome() {
    let (err, calls) = upsert_failing_with(RpcAction::FailBefore(Code::DeadlineExceeded)).await;
    assert_transient_unknown(&err);
    // Not among the codes qdrant-client re-sends on.
    assert_eq!(calls, 1);
}

#[tokio::test]
async fn resource_exhausted_honours_the_servers_retry_after() {
    let (err, calls) = upsert_failing_with(RpcAction::ResourceExhausted {
        retry_after_secs: 7,
    })
    .await;
    assert_transient_unknown(&err);
    assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));
    assert_eq!(calls, 1);
}

#[tokio::test]
async fn invalid_argument_is_invalid_input() {
    let (err, calls) = upsert_failing_with(RpcAction::FailBefore(Code::InvalidArgument)).await;
    assert!(matches!(err, IndexError::InvalidInput { .. }), "{err:?}");
    assert!(!err.is_retryable());
    assert_eq!(err.outcome(), Outcome::NotApplied);
    assert_eq!(calls, 1);
}

#[tokio::test]
async fn permission_denied_is_unauthorized() {
    let (err, _) = upsert_failing_with(RpcAction::FailBefore(Code::PermissionDenied)).await;
    assert!(matches!(err, IndexError::Unauthorized { .. }), "{err:?}");
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn unauthenticated_is_unauthorized() {
    let (err, _) = upsert_failing_with(RpcAction::FailBefore(Code::Unauthenticated)).await;
    assert!(matches!(err, IndexError::Unauthorized { .. }), "{err:?}");
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn not_found_is_collection_not_found() {
    let (double, index) = setup().await;
    // The collection really goes away.
    assert!(index.delete_collection().await.expect("delete collection"));
    let err = index
        .upsert(&points(&fresh_scope(), 2))
        .await
        .expect_err("upsert into a deleted collection");
    match &err {
        IndexError::CollectionNotFound { collection } => assert_eq!(collection, index.collection()),
        other => panic!("expected CollectionNotFound, got {other:?}"),
    }
    assert!(!err.is_retryable());
    let err = index.count(None).await.expect_err("count");
    assert!(
        matches!(err, IndexError::CollectionNotFound { .. }),
        "{err:?}"
    );
    drop(double);
}

#[tokio::test]
async fn failed_reads_are_transient_and_never_unknown() {
    let (double, index) = setup().await;
    double.faults().add(RpcFault::always(
        "Points/Count",
        RpcAction::FailBefore(Code::Unavailable),
    ));
    let err = index.count(None).await.expect_err("count");
    assert!(err.is_retryable(), "{err:?}");
    assert_eq!(err.outcome(), Outcome::NotApplied);
}

#[tokio::test]
async fn a_hanging_server_times_out_as_transient_unknown() {
    let double = QdrantDouble::start().await;
    let config = config(&double.url(), &fresh_collection(), DIM, Distance::Cosine)
        .with_timeout(Duration::from_secs(1));
    let index = QdrantVectorIndex::connect(config).await.expect("connect");
    double.faults().clear_calls();
    double
        .faults()
        .add(RpcFault::always("Points/Upsert", RpcAction::Hang));
    let started = Instant::now();
    let err = index
        .upsert(&points(&fresh_scope(), 2))
        .await
        .expect_err("a hanging upsert fails");
    assert_transient_unknown(&err);
    // tonic reports its timeout as Cancelled, which qdrant-client re-sends once.
    assert_eq!(upserts(&double).len(), 2);
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_server_gone_makes_writes_unknown_and_reads_not_applied() {
    let (double, index) = setup().await;
    let url = double.url();
    double.shutdown().await;
    let err = index
        .upsert(&points(&fresh_scope(), 1))
        .await
        .expect_err("upsert with the server gone");
    // qdrant-client reports its failed reconnect as Internal "Failed to
    // connect", which a write cannot tell from a lost first attempt.
    assert_transient_unknown(&err);
    assert!(err.to_string().contains("Failed to connect"), "{err}");
    let err = index
        .count(None)
        .await
        .expect_err("count with the server gone");
    assert!(err.is_retryable());
    assert_eq!(err.outcome(), Outcome::NotApplied);
    assert!(format!("{err}").contains("Internal"), "{err} ({url})");
}

// ------------------------------------------------------------ re-send, status, chunks

#[tokio::test]
async fn client_resend_of_an_upsert_is_harmless() {
    let (double, index) = setup().await;
    // The first attempt is applied, but its reply says Unavailable: the client
    // re-sends the same points, which overwrite themselves.
    double.faults().add(RpcFault::once(
        "Points/Upsert",
        RpcAction::FailAfter(Code::Unavailable),
    ));
    let scope = fresh_scope();
    let batch = points(&scope, 5);
    index
        .upsert(&batch)
        .await
        .expect("the re-sent upsert succeeds");
    assert_eq!(
        upserts(&double),
        vec![CallOutcome::Err(Code::Unavailable), CallOutcome::Ok]
    );
    assert_eq!(index.count(Some(&scope)).await.expect("count"), 5);
    assert_eq!(
        index.retrieve(&ids(&batch)).await.expect("retrieve").len(),
        5
    );
}

#[tokio::test]
async fn a_connection_dropped_after_applying_is_resent_harmlessly() {
    let (double, index) = setup().await;
    double.faults().add(RpcFault::once(
        "Points/Upsert",
        RpcAction::DropConnection { applied: true },
    ));
    let scope = fresh_scope();
    let batch = points(&scope, 3);
    index
        .upsert(&batch)
        .await
        .expect("the re-sent upsert succeeds");
    assert_eq!(upserts(&double).len(), 2);
    assert_eq!(index.count(Some(&scope)).await.expect("count"), 3);
}

#[tokio::test]
async fn client_resend_of_a_delete_is_harmless() {
    let (double, index) = setup().await;
    let scope = fresh_scope();
    let batch = points(&scope, 4);
    index.upsert(&batch).await.expect("upsert");
    double.faults().add(RpcFault::once(
        "Points/Delete",
        RpcAction::FailAfter(Code::Internal),
    ));
    index
        .delete(&ids(&batch[..3]))
        .await
        .expect("the re-sent delete succeeds");
    assert_eq!(double.faults().calls_to("Points/Delete").len(), 2);
    let left = index.retrieve(&ids(&batch)).await.expect("retrieve");
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, batch[3].id);
}

#[tokio::test]
async fn wait_timeout_status_is_never_success() {
    let (double, index) = setup().await;
    double.faults().add(RpcFault::once(
        "Points/Upsert",
        RpcAction::ReplyStatus(UpdateStatus::WaitTimeout),
    ));
    let batch = points(&fresh_scope(), 2);
    let err = index
        .upsert(&batch)
        .await
        .expect_err("WaitTimeout is an error");
    assert_transient_unknown(&err);
    assert!(err.to_string().contains("WaitTimeout"), "{err}");
    // The write did land: "Unknown" was the right answer.
    assert_eq!(
        index.retrieve(&ids(&batch)).await.expect("retrieve").len(),
        2
    );
}

#[tokio::test]
async fn acknowledged_status_is_never_success() {
    let (double, index) = setup().await;
    double.faults().add(RpcFault::once(
        "Points/Delete",
        RpcAction::ReplyStatus(UpdateStatus::Acknowledged),
    ));
    let batch = points(&fresh_scope(), 1);
    index.upsert(&batch).await.expect("upsert");
    let err = index
        .delete(&ids(&batch))
        .await
        .expect_err("Acknowledged is an error");
    assert_transient_unknown(&err);
    assert!(err.to_string().contains("Acknowledged"), "{err}");
}

async fn chunked_setup() -> (QdrantDouble, QdrantVectorIndex) {
    let double = QdrantDouble::start().await;
    let config =
        config(&double.url(), &fresh_collection(), DIM, Distance::Cosine).with_chunking(2, 1);
    let index = QdrantVectorIndex::connect(config).await.expect("connect");
    double.faults().clear_calls();
    (double, index)
}

#[tokio::test]
async fn a_failed_chunk_after_an_applied_one_makes_the_outcome_unknown() {
    let (double, index) = chunked_setup().await;
    double.faults().add(
        RpcFault::once(
            "Points/Upsert",
            RpcAction::PartialThenFail {
                applied: 1,
                code: Code::InvalidArgument,
            },
        )
        .after(1),
    );
    let scope = fresh_scope();
    let batch = points(&scope, 6); // three chunks of two, one at a time
    let err = index
        .upsert(&batch)
        .await
        .expect_err("the second chunk fails");
    assert!(!err.is_retryable(), "{err:?}");
    assert_eq!(err.outcome(), Outcome::Unknown, "{err:?}");
    assert!(err.to_string().contains("1 of 3 chunks"), "{err}");
    // No chunk is started after a failure.
    assert_eq!(upserts(&double).len(), 2);
    // The first chunk and half of the second landed: batches are not atomic.
    assert_eq!(index.count(Some(&scope)).await.expect("count"), 3);
}

#[tokio::test]
async fn a_first_chunk_refused_before_applying_is_not_applied() {
    let (double, index) = chunked_setup().await;
    double.faults().add(RpcFault::once(
        "Points/Upsert",
        RpcAction::FailBefore(Code::InvalidArgument),
    ));
    let scope = fresh_scope();
    let err = index
        .upsert(&points(&scope, 6))
        .await
        .expect_err("the first chunk fails");
    assert!(matches!(err, IndexError::InvalidInput { .. }), "{err:?}");
    assert_eq!(err.outcome(), Outcome::NotApplied);
    assert_eq!(upserts(&double).len(), 1);
    assert_eq!(index.count(Some(&scope)).await.expect("count"), 0);
}

#[tokio::test]
async fn chunks_run_in_parallel_up_to_the_limit() {
    let double = QdrantDouble::start().await;
    let config =
        config(&double.url(), &fresh_collection(), DIM, Distance::Cosine).with_chunking(2, 3);
    let index = QdrantVectorIndex::connect(config).await.expect("connect");
    double.faults().clear_calls();
    let delay = Duration::from_millis(400);
    double
        .faults()
        .add(RpcFault::always("Points/Upsert", RpcAction::Delay(delay)));
    let scope = fresh_scope();
    let batch = points(&scope, 12); // six chunks, three at a time: two rounds
    let started = Instant::now();
    index.upsert(&batch).await.expect("upsert");
    let took = started.elapsed();
    assert_eq!(upserts(&double).len(), 6);
    assert!(took >= delay * 2, "six chunks, three in flight: {took:?}");
    assert!(took < delay * 5, "chunks did not overlap: {took:?}");
    assert_eq!(index.count(Some(&scope)).await.expect("count"), 12);
}

#[tokio::test]
async fn metadata_filter_on_an_array_field_means_equality() {
    let (double, index) = setup().await;
    let scope = fresh_scope();
    let mut batch = points(&scope, 2);
    batch[0].metadata = json!({"tag": "a"}).as_object().cloned().unwrap_or_default();
    batch[1].metadata = json!({"tag": ["a", "b"]})
        .as_object()
        .cloned()
        .unwrap_or_default();
    index.upsert(&batch).await.expect("upsert");
    let hits = index
        .search(&IndexQuery {
            vector: batch[1].vector.clone(),
            limit: 10,
            filter: Filter::scope(scope.clone()).with_eq("tag", json!("a")),
            score_threshold: None,
        })
        .await
        .expect("search");
    let found: Vec<PointId> = hits.iter().map(|h| h.id).collect();
    assert_eq!(found, vec![batch[0].id]);
    // Values Qdrant cannot match exactly are refused, not approximated.
    let err = index
        .search(&IndexQuery {
            vector: batch[0].vector.clone(),
            limit: 10,
            filter: Filter::none().with_eq("tag", json!(["a", "b"])),
            score_threshold: None,
        })
        .await
        .expect_err("an array value");
    assert!(matches!(err, IndexError::InvalidInput { .. }), "{err:?}");
    drop(double);
}

#[tokio::test]
async fn metadata_keys_with_dots_and_spaces_are_quoted() {
    let (double, index) = setup().await;
    let scope = fresh_scope();
    let mut batch = points(&scope, 2);
    batch[0].metadata = json!({"a.b": "x", "c d": 1})
        .as_object()
        .cloned()
        .unwrap_or_default();
    batch[1].metadata = json!({"a": {"b": "x"}, "c d": 2})
        .as_object()
        .cloned()
        .unwrap_or_default();
    index.upsert(&batch).await.expect("upsert");
    for filter in [
        Filter::scope(scope.clone()).with_eq("a.b", json!("x")),
        Filter::scope(scope.clone()).with_eq("c d", json!(1)),
    ] {
        let hits = index
            .search(&IndexQuery {
                vector: batch[0].vector.clone(),
                limit: 10,
                filter: filter.clone(),
                score_threshold: None,
            })
            .await
            .expect("search");
        let found: Vec<PointId> = hits.iter().map(|h| h.id).collect();
        assert_eq!(found, vec![batch[0].id], "{filter:?}");
    }
    drop(double);
}

// ------------------------------------------------------------ connect

fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    port
}

#[tokio::test]
async fn connecting_to_a_closed_port_names_the_store_and_hides_the_key() {
    let url = format!("http://127.0.0.1:{}", closed_port());
    let config = config(&url, "records", DIM, Distance::Cosine).with_api_key("top-secret-key-42");
    let err = QdrantVectorIndex::connect(config)
        .await
        .expect_err("nothing listens there");
    assert!(err.is_retryable(), "{err:?}");
    assert_eq!(err.outcome(), Outcome::NotApplied);
    let shown = err.to_string();
    assert!(
        shown.contains(&format!("Qdrant at {url} is unreachable")),
        "{shown}"
    );
    let everything = format!("{err} {err:?}");
    assert!(!everything.contains("top-secret-key-42"), "{everything}");
}

#[tokio::test]
async fn an_invalid_url_is_a_config_error() {
    let config = config("127.0.0.1:6334", "records", DIM, Distance::Cosine);
    let err = QdrantVectorIndex::connect(config)
        .await
        .expect_err("no scheme");
    assert!(matches!(err, IndexError::Config { .. }), "{err:?}");
}

#[tokio::test]
async fn a_wrong_api_key_is_unauthorized_at_connect() {
    let double = QdrantDouble::builder()
        .with_api_key("the-right-key")
        .start()
        .await
        .expect("start");
    let collection = fresh_collection();
    for key in [Some("the-wrong-key"), None] {
        let mut config = config(&double.url(), &collection, DIM, Distance::Cosine);
        config.api_key = key.map(Into::into);
        let err = QdrantVectorIndex::connect(config)
            .await
            .expect_err("a refused key");
        assert!(matches!(err, IndexError::Unauthorized { .. }), "{err:?}");
        assert!(!err.is_retryable());
        assert!(
            err.to_string()
                .contains(&format!("Qdrant at {}", double.url())),
            "{err}"
        );
        assert!(!format!("{err} {err:?}").contains("the-wrong-key"));
    }
    let config =
        config(&double.url(), &collection, DIM, Distance::Cosine).with_api_key("the-right-key");
    let index = QdrantVectorIndex::connect(config)
        .await
        .expect("the right key");
    index
        .upsert(&points(&fresh_scope(), 1))
        .await
        .expect("upsert");
}

#[tokio::test]
async fn a_collection_of_another_layout_is_a_config_error_at_connect() {
    let double = QdrantDouble::start().await;
    let collection = fresh_collection();
    let first =
        QdrantVectorIndex::connect(config(&double.url(), &collection, DIM, Distance::Cosine))
            .await
            .expect("create");
    double.faults().clear_calls();
    let err = QdrantVectorIndex::connect(config(&double.url(), &collection, 8, Distance::Cosine))
        .await
        .expect_err("dimension mismatch");
    match &err {
        IndexError::Config { message } => {
            assert!(message.contains("vector size 4"), "{message}");
            assert!(message.contains("size 8"), "{message}");
        }
        other => panic!("expected Config, got {other:?}"),
    }
    let err = QdrantVectorIndex::connect(config(&double.url(), &collection, DIM, Distance::Dot))
        .await
        .expect_err("distance mismatch");
    match &err {
        IndexError::Config { message } => assert!(message.contains("Dot"), "{message}"),
        other => panic!("expected Config, got {other:?}"),
    }
    // Nothing was written while checking.
    assert!(double.faults().calls_to("Points/Upsert").is_empty());
    assert!(double.faults().calls_to("Collections/Create").is_empty());
    assert_eq!(first.count(None).await.expect("count"), 0);
}

#[tokio::test]
async fn connect_creates_the_collection_once_with_keyword_indexes() {
    let double = QdrantDouble::start().await;
    let collection = fresh_collection();
    let cfg = config(&double.url(), &collection, DIM, Distance::Euclid);
    QdrantVectorIndex::connect(cfg.clone())
        .await
        .expect("create");
    QdrantVectorIndex::connect(cfg)
        .await
        .expect("connect again");
    assert_eq!(double.faults().calls_to("Collections/Create").len(), 1);
    assert_eq!(double.faults().calls_to("Points/CreateFieldIndex").len(), 2);

    let client = Qdrant::from_url(&double.url())
        .skip_compatibility_check()
        .build()
        .expect("client");
    let info = client
        .collection_info(GetCollectionInfoRequest {
            collection_name: collection,
        })
        .await
        .expect("info")
        .result
        .expect("collection info");
    let params = info
        .config
        .and_then(|c| c.params)
        .and_then(|p| p.vectors_config)
        .and_then(|v| v.config);
    match params {
        Some(vectors_config::Config::Params(p)) => {
            assert_eq!(p.size, DIM as u64);
            assert_eq!(p.distance, qdrant_client::qdrant::Distance::Euclid as i32);
        }
        other => panic!("unexpected vectors config {other:?}"),
    }
    for field in ["record_id", "scope"] {
        let schema = info.payload_schema.get(field).expect("indexed");
        assert_eq!(
            schema.data_type,
            PayloadSchemaType::Keyword as i32,
            "{field}"
        );
    }
}
