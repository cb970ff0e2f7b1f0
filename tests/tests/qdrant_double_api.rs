//! The Qdrant test double, driven by `qdrant-client` directly: every RPC a
//! Qdrant adapter needs behaves as Qdrant's, on Qdrant's engine.

use qdrant_client::qdrant::{
    Condition, CountPointsBuilder, CreateCollectionBuilder, CreateFieldIndexCollectionBuilder,
    DeletePointsBuilder, Distance, FieldType, Filter, GetPointsBuilder, PointId, PointStruct,
    PointsIdsList, QueryPointsBuilder, ScrollPointsBuilder, SearchPointsBuilder,
    SetPayloadPointsBuilder, UpdateStatus, UpsertPointsBuilder, VectorParamsBuilder,
    point_id::PointIdOptions, vector_output, vectors_config, vectors_output,
};
use qdrant_client::{Payload, Qdrant, QdrantError};
use serde_json::json;
use tandem_tests::qdrant_double::QdrantDouble;
use tonic::Code;
use uuid::Uuid;

fn client(double: &QdrantDouble) -> Qdrant {
    Qdrant::from_url(&double.url())
        .skip_compatibility_check()
        .build()
        .unwrap()
}

fn code(err: QdrantError) -> Code {
    match err {
        QdrantError::ResponseError { status }
        | QdrantError::ResourceExhaustedError { status, .. } => status.code(),
        other => panic!("not a gRPC error: {other:?}"),
    }
}

async fn create(client: &Qdrant, name: &str, size: u64, distance: Distance) {
    client
        .create_collection(
            CreateCollectionBuilder::new(name)
                .vectors_config(VectorParamsBuilder::new(size, distance)),
        )
        .await
        .unwrap();
}

fn point(id: Uuid, vector: Vec<f32>, payload: serde_json::Value) -> PointStruct {
    PointStruct::new(id.to_string(), vector, Payload::try_from(payload).unwrap())
}

fn uuid_of(id: &Option<PointId>) -> Uuid {
    match id.as_ref().and_then(|id| id.point_id_options.as_ref()) {
        Some(PointIdOptions::Uuid(s)) => s.parse().unwrap(),
        other => panic!("expected a UUID point id, got {other:?}"),
    }
}

async fn count(client: &Qdrant, collection: &str, filter: Option<Filter>) -> u64 {
    let mut request = CountPointsBuilder::new(collection).exact(true);
    if let Some(filter) = filter {
        request = request.filter(filter);
    }
    client.count(request).await.unwrap().result.unwrap().count
}

/// Five points in two scopes, with ids sorted ascending.
fn five_points() -> Vec<(Uuid, Vec<f32>, &'static str)> {
    let mut ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    ids.sort();
    vec![
        (ids[0], vec![1.0, 0.0, 0.0, 0.0], "a"),
        (ids[1], vec![0.9, 0.1, 0.0, 0.0], "a"),
        (ids[2], vec![0.0, 1.0, 0.0, 0.0], "b"),
        (ids[3], vec![0.7, 0.7, 0.0, 0.0], "a"),
        (ids[4], vec![0.0, 0.0, 1.0, 0.0], "b"),
    ]
}

async fn upsert_five(client: &Qdrant, collection: &str) -> Vec<(Uuid, Vec<f32>, &'static str)> {
    let points = five_points();
    let structs: Vec<_> = points
        .iter()
        .enumerate()
        .map(|(i, (id, v, scope))| point(*id, v.clone(), json!({"scope": scope, "n": i})))
        .collect();
    let reply = client
        .upsert_points(UpsertPointsBuilder::new(collection, structs).wait(true))
        .await
        .unwrap();
    assert_eq!(reply.result.unwrap().status, UpdateStatus::Completed as i32);
    points
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collections_are_created_inspected_listed_and_deleted() {
    let double = QdrantDouble::start().await;
    let client = client(&double);
    let health = client.health_check().await.unwrap();
    assert!(!health.version.is_empty());

    create(&client, "docs", 4, Distance::Cosine).await;
    create(&client, "other", 8, Distance::Euclid).await;
    assert!(client.collection_exists("docs").await.unwrap());
    let info = client
        .collection_info("docs")
        .await
        .unwrap()
        .result
        .unwrap();
    let params = match info
        .config
        .unwrap()
        .params
        .unwrap()
        .vectors_config
        .unwrap()
        .config
    {
        Some(vectors_config::Config::Params(p)) => p,
        other => panic!("unexpected vectors config {other:?}"),
    };
    assert_eq!((params.size, params.distance), (4, Distance::Cosine as i32));
    assert_eq!(info.points_count, Some(0));
    let names: Vec<_> = client
        .list_collections()
        .await
        .unwrap()
        .collections
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, vec!["docs".to_string(), "other".to_string()]);

    let again = client
        .create_collection(
            CreateCollectionBuilder::new("docs")
                .vectors_config(VectorParamsBuilder::new(4, Distance::Cosine)),
        )
        .await
        .unwrap_err();
    assert_eq!(code(again), Code::AlreadyExists);

    assert!(client.delete_collection("docs").await.unwrap().result);
    assert!(!client.collection_exists("docs").await.unwrap());
    assert_eq!(
        code(client.collection_info("docs").await.unwrap_err()),
        Code::NotFound
    );
    // Deleting a missing collection is not an error; it answers `false`.
    assert!(!client.delete_collection("docs").await.unwrap().result);
    // The name is free again.
    create(&client, "docs", 2, Distance::Dot).await;
    assert_eq!(count(&client, "docs", None).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upserted_points_are_retrieved_counted_and_deleted() {
    let double = QdrantDouble::start().await;
    let client = client(&double);
    create(&client, "c", 4, Distance::Dot).await;
    let points = upsert_five(&client, "c").await;

    let ids: Vec<PointId> = points.iter().map(|p| p.0.to_string().into()).collect();
    let got = client
        .get_points(
            GetPointsBuilder::new("c", ids.clone())
                .with_payload(true)
                .with_vectors(true),
        )
        .await
        .unwrap()
        .result;
    assert_eq!(got.len(), 5);
    let third = got.iter().find(|p| uuid_of(&p.id) == points[2].0).unwrap();
    assert_eq!(
        third.payload["scope"].as_str().map(String::as_str),
        Some("b")
    );
    assert_eq!(third.payload["n"].as_integer(), Some(2));
    let dense = match third.vectors.clone().and_then(|v| v.vectors_options) {
        Some(vectors_output::VectorsOptions::Vector(output)) => match output.vector {
            Some(vector_output::Vector::Dense(dense)) => dense.data,
            other => panic!("expected a dense vector, got {other:?}"),
        },
        other => panic!("expected the unnamed vector, got {other:?}"),
    };
    assert_eq!(dense, points[2].1);

    assert_eq!(count(&client, "c", None).await, 5);
    assert_eq!(
        count(
            &client,
            "c",
            Some(Filter::must([Condition::matches("scope", "a".to_string())]))
        )
        .await,
        3
    );
    let reply = client
        .delete_points(
            DeletePointsBuilder::new("c")
                .points(PointsIdsList {
                    ids: vec![
                        ids[0].clone(),
                        ids[2].clone(),
                        Uuid::new_v4().to_string().into(),
                    ],
                })
                .wait(true),
        )
        .await
        .unwrap();
    assert_eq!(reply.result.unwrap().status, UpdateStatus::Completed as i32);
    assert_eq!(count(&client, "c", None).await, 3);
    let left = client
        .get_points(GetPointsBuilder::new("c", ids))
        .await
        .unwrap()
        .result;
    let mut left: Vec<_> = left.iter().map(|p| uuid_of(&p.id)).collect();
    left.sort();
    assert_eq!(left, vec![points[1].0, points[3].0, points[4].0]);

    // Deleting by filter works too.
    client
        .delete_points(
            DeletePointsBuilder::new("c")
                .points(Filter::must([Condition::matches("scope", "b".to_string())]))
                .wait(true),
        )
        .await
        .unwrap();
    assert_eq!(count(&client, "c", None).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_and_query_apply_filters_thresholds_and_qdrant_scores() {
    let double = QdrantDouble::start().await;
    let client = client(&double);
    create(&client, "cos", 4, Distance::Cosine).await;
    let points = upsert_five(&client, "cos").await;

    let hits = client
        .search_points(
            SearchPointsBuilder::new("cos", vec![2.0, 0.0, 0.0, 0.0], 10)
                .filter(Filter::must([Condition::matches("scope", "a".to_string())]))
                .with_payload(true),
        )
        .await
        .unwrap()
        .result;
    let order: Vec<_> = hits.iter().map(|h| uuid_of(&h.id)).collect();
    assert_eq!(order, vec![points[0].0, points[1].0, points[3].0]);
    // Cosine similarity of parallel vectors, whatever their lengths.
    assert!((hits[0].score - 1.0).abs() < 1e-5, "{}", hits[0].score);
    assert!((hits[2].score - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-4);
    assert_eq!(
        hits[0].payload["scope"].as_str().map(String::as_str),
        Some("a")
    );

    let above = client
        .search_points(
            SearchPointsBuilder::new("cos", vec![1.0, 0.0, 0.0, 0.0], 10).score_threshold(0.9),
        )
        .await
        .unwrap()
        .result;
    assert_eq!(above.len(), 2);
    assert!(above.iter().all(|h| h.score >= 0.9));

    let queried = client
        .query(
            QueryPointsBuilder::new("cos")
                .query(vec![2.0, 0.0, 0.0, 0.0])
                .filter(Filter::must([Condition::matches("scope", "a".to_string())]))
                .limit(2),
        )
        .await
        .unwrap()
        .result;
    assert_eq!(
        queried.iter().map(|h| uuid_of(&h.id)).collect::<Vec<_>>(),
        vec![points[0].0, points[1].0]
    );

    // Euclid: Qdrant answers the distance (lower is better), nearest first,
    // and the threshold is a maximal distance.
    create(&client, "l2", 2, Distance::Euclid).await;
    let near = Uuid::new_v4();
    let far = Uuid::new_v4();
    client
        .upsert_points(
            UpsertPointsBuilder::new(
                "l2",
                vec![
                    point(near, vec![3.0, 4.0], json!({})),
                    point(far, vec![6.0, 8.0], json!({})),
                ],
            )
            .wait(true),
        )
        .await
        .unwrap();
    let hits = client
        .search_points(SearchPointsBuilder::new("l2", vec![0.0, 0.0], 5))
        .await
        .unwrap()
        .result;
    assert_eq!(
        hits.iter()
            .map(|h| (uuid_of(&h.id), h.score))
            .collect::<Vec<_>>(),
        vec![(near, 5.0), (far, 10.0)]
    );
    let within = client
        .search_points(SearchPointsBuilder::new("l2", vec![0.0, 0.0], 5).score_threshold(7.0))
        .await
        .unwrap()
        .result;
    assert_eq!(within.len(), 1);

    let wrong = client
        .search_points(SearchPointsBuilder::new("l2", vec![0.0, 0.0, 0.0], 5))
        .await
        .unwrap_err();
    assert_eq!(code(wrong), Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scroll_pages_through_every_point_in_id_order() {
    let double = QdrantDouble::start().await;
    let client = client(&double);
    create(&client, "c", 2, Distance::Dot).await;
    let mut ids: Vec<Uuid> = (0..25).map(|_| Uuid::new_v4()).collect();
    let points: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| point(*id, vec![1.0, i as f32], json!({"even": i % 2 == 0})))
        .collect();
    client
        .upsert_points(UpsertPointsBuilder::new("c", points).wait(true))
        .await
        .unwrap();
    ids.sort();

    let mut seen = Vec::new();
    let mut pages = 0;
    let mut offset: Option<PointId> = None;
    loop {
        let mut request = ScrollPointsBuilder::new("c").limit(10);
        if let Some(offset) = offset.take() {
            request = request.offset(offset);
        }
        let page = client.scroll(request).await.unwrap();
        pages += 1;
        seen.extend(page.result.iter().map(|p| uuid_of(&p.id)));
        match page.next_page_offset {
            Some(next) => offset = Some(next),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ids);

    let evens = client
        .scroll(
            ScrollPointsBuilder::new("c")
                .limit(100)
                .filter(Filter::must([Condition::matches("even", true)])),
        )
        .await
        .unwrap();
    assert_eq!(evens.result.len(), 13);
    assert!(evens.next_page_offset.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_indexes_appear_in_the_collection_info() {
    let double = QdrantDouble::start().await;
    let client = client(&double);
    create(&client, "c", 4, Distance::Cosine).await;
    upsert_five(&client, "c").await;
    client
        .create_field_index(
            CreateFieldIndexCollectionBuilder::new("c", "scope", FieldType::Keyword).wait(true),
        )
        .await
        .unwrap();
    let info = client.collection_info("c").await.unwrap().result.unwrap();
    let scope = &info.payload_schema["scope"];
    assert_eq!(
        scope.data_type,
        qdrant_client::qdrant::PayloadSchemaType::Keyword as i32
    );
    assert_eq!(scope.points, Some(5));
    assert_eq!(info.points_count, Some(5));
    // Filters still work with the index in place.
    assert_eq!(
        count(
            &client,
            "c",
            Some(Filter::must([Condition::matches("scope", "b".to_string())]))
        )
        .await,
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_a_wrong_dimension_is_rejected_whole() {
    let double = QdrantDouble::start().await;
    let client = client(&double);
    create(&client, "c", 4, Distance::Cosine).await;
    let err = client
        .upsert_points(
            UpsertPointsBuilder::new(
                "c",
                vec![
                    point(Uuid::new_v4(), vec![1.0, 0.0, 0.0, 0.0], json!({})),
                    point(Uuid::new_v4(), vec![1.0, 0.0], json!({})),
                ],
            )
            .wait(true),
        )
        .await
        .unwrap_err();
    assert_eq!(code(err), Code::InvalidArgument);
    assert_eq!(count(&client, "c", None).await, 0);
    let missing = client
        .upsert_points(
            UpsertPointsBuilder::new("nope", vec![point(Uuid::new_v4(), vec![1.0], json!({}))])
                .wait(true),
        )
        .await
        .unwrap_err();
    assert_eq!(code(missing), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_false_is_acknowledged_and_other_rpcs_are_unimplemented() {
    let double = QdrantDouble::start().await;
    let client = client(&double);
    create(&client, "c", 2, Distance::Dot).await;
    let reply = client
        .upsert_points(UpsertPointsBuilder::new(
            "c",
            vec![point(Uuid::new_v4(), vec![1.0, 2.0], json!({}))],
        ))
        .await
        .unwrap();
    assert_eq!(
        reply.result.unwrap().status,
        UpdateStatus::Acknowledged as i32
    );
    assert_eq!(count(&client, "c", None).await, 1);

    let err = client
        .set_payload(
            SetPayloadPointsBuilder::new("c", Payload::try_from(json!({"k": 1})).unwrap())
                .points_selector(Filter::default())
                .wait(true),
        )
        .await
        .unwrap_err();
    assert_eq!(code(err), Code::Unimplemented);
    let calls = double.faults().calls_to("Points/SetPayload");
    assert_eq!(calls.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_is_required_when_configured() {
    let double = QdrantDouble::builder()
        .with_api_key("s3cret-key")
        .start()
        .await
        .unwrap();
    let anonymous = client(&double);
    assert_eq!(
        code(anonymous.health_check().await.unwrap_err()),
        Code::Unauthenticated
    );
    let wrong = Qdrant::from_url(&double.url())
        .api_key("nope")
        .skip_compatibility_check()
        .build()
        .unwrap();
    assert_eq!(
        code(wrong.list_collections().await.unwrap_err()),
        Code::Unauthenticated
    );
    let right = Qdrant::from_url(&double.url())
        .api_key("s3cret-key")
        .skip_compatibility_check()
        .build()
        .unwrap();
    create(&right, "c", 2, Distance::Dot).await;
    assert!(right.collection_exists("c").await.unwrap());
    // Rejected calls are logged but do not use up faults.
    double
        .faults()
        .add(tandem_tests::qdrant_double::RpcFault::once(
            "Collections/List",
            tandem_tests::qdrant_double::RpcAction::FailBefore(Code::Aborted),
        ));
    assert_eq!(
        code(wrong.list_collections().await.unwrap_err()),
        Code::Unauthenticated
    );
    assert_eq!(
        code(right.list_collections().await.unwrap_err()),
        Code::Aborted
    );
    assert_eq!(double.faults().calls_to("Collections/List").len(), 3);
    let debug = format!("{:?}", QdrantDouble::builder().with_api_key("s3cret-key"));
    assert!(!debug.contains("s3cret"), "{debug}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collections_persist_across_restarts_on_a_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let first = QdrantDouble::builder()
        .data_dir(dir.path())
        .start()
        .await
        .unwrap();
    let points = {
        let client = client(&first);
        create(&client, "kept", 4, Distance::Cosine).await;
        client
            .create_field_index(
                CreateFieldIndexCollectionBuilder::new("kept", "scope", FieldType::Keyword)
                    .wait(true),
            )
            .await
            .unwrap();
        upsert_five(&client, "kept").await
    };
    first.shutdown().await;

    let second = QdrantDouble::builder()
        .data_dir(dir.path())
        .start()
        .await
        .unwrap();
    let client = client(&second);
    assert!(client.collection_exists("kept").await.unwrap());
    assert_eq!(count(&client, "kept", None).await, 5);
    let info = client
        .collection_info("kept")
        .await
        .unwrap()
        .result
        .unwrap();
    assert!(info.payload_schema.contains_key("scope"));
    let hits = client
        .search_points(SearchPointsBuilder::new("kept", points[4].1.clone(), 1))
        .await
        .unwrap()
        .result;
    assert_eq!(uuid_of(&hits[0].id), points[4].0);
}
