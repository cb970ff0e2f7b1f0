//! Every fault action of the Qdrant test double, observed from the client side
//! with `qdrant-client` (which re-sends a points request once on Internal,
//! Unavailable, Cancelled and Unknown: the call log shows it).

use std::time::{Duration, Instant};

use qdrant_client::qdrant::{
    CountPointsBuilder, CreateCollectionBuilder, DeletePointsBuilder, Distance, PointId,
    PointStruct, PointsIdsList, UpdateStatus, UpsertPointsBuilder, VectorParamsBuilder,
};
use qdrant_client::{Payload, Qdrant, QdrantError};
use serde_json::json;
use tandem_tests::qdrant_double::{CallOutcome, QdrantDouble, RpcAction, RpcFault};
use tonic::Code;
use uuid::Uuid;

/// The codes on which qdrant-client re-sends a points request once.
const RESENT: [Code; 4] = [
    Code::Internal,
    Code::Unavailable,
    Code::Cancelled,
    Code::Unknown,
];

fn client_with_timeout(double: &QdrantDouble, timeout: Duration) -> Qdrant {
    Qdrant::from_url(&double.url())
        .timeout(timeout)
        .skip_compatibility_check()
        .build()
        .unwrap()
}

fn client(double: &QdrantDouble) -> Qdrant {
    client_with_timeout(double, Duration::from_secs(10))
}

fn status(err: QdrantError) -> tonic::Status {
    match err {
        QdrantError::ResponseError { status }
        | QdrantError::ResourceExhaustedError { status, .. } => status,
        other => panic!("not a gRPC error: {other:?}"),
    }
}

/// A double with collection `c` (dimension 2) and a client.
async fn setup() -> (QdrantDouble, Qdrant) {
    let double = QdrantDouble::start().await;
    let client = client(&double);
    client
        .create_collection(
            CreateCollectionBuilder::new("c")
                .vectors_config(VectorParamsBuilder::new(2, Distance::Dot)),
        )
        .await
        .unwrap();
    double.faults().clear_calls();
    (double, client)
}

fn points(n: usize) -> (Vec<Uuid>, UpsertPointsBuilder) {
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::new_v4()).collect();
    let structs: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            PointStruct::new(
                id.to_string(),
                vec![1.0, i as f32],
                Payload::try_from(json!({"i": i})).unwrap(),
            )
        })
        .collect();
    (ids, UpsertPointsBuilder::new("c", structs).wait(true))
}

async fn count(client: &Qdrant) -> u64 {
    client
        .count(CountPointsBuilder::new("c").exact(true))
        .await
        .unwrap()
        .result
        .unwrap()
        .count
}

fn outcomes(double: &QdrantDouble, method: &'static str) -> Vec<CallOutcome> {
    double
        .faults()
        .calls_to(method)
        .into_iter()
        .map(|c| c.outcome)
        .collect()
}

/// Waits until the server has logged how `method`'s calls ended.
async fn settled(double: &QdrantDouble, method: &'static str, calls: usize) -> Vec<CallOutcome> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = outcomes(double, method);
        if (seen.len() >= calls && !seen.contains(&CallOutcome::Pending))
            || Instant::now() > deadline
        {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_before_applies_nothing() {
    let (double, client) = setup().await;
    double.faults().add(RpcFault {
        method: "Upsert",
        nth: 0,
        times: 1,
        action: RpcAction::FailBefore(Code::InvalidArgument),
    });
    let (_, request) = points(3);
    let err = status(client.upsert_points(request.clone()).await.unwrap_err());
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(count(&client).await, 0);
    assert_eq!(
        outcomes(&double, "Upsert"),
        vec![CallOutcome::Err(Code::InvalidArgument)]
    );
    assert!(double.faults().all_fired());
    // The fault is used up: the same request now goes through.
    client.upsert_points(request).await.unwrap();
    assert_eq!(count(&client).await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_resends_once_on_unavailable() {
    let (double, client) = setup().await;
    // One failure: hidden by qdrant-client's own re-send.
    double.faults().add(RpcFault::once(
        "Upsert",
        RpcAction::FailBefore(Code::Unavailable),
    ));
    let (_, request) = points(2);
    client.upsert_points(request).await.unwrap();
    assert_eq!(
        outcomes(&double, "Upsert"),
        vec![CallOutcome::Err(Code::Unavailable), CallOutcome::Ok]
    );
    assert_eq!(count(&client).await, 2);

    // Two failures: the second one reaches the caller.
    double.faults().clear_calls();
    double
        .faults()
        .add(RpcFault::once("Upsert", RpcAction::FailBefore(Code::Unavailable)).times(2));
    let (_, request) = points(2);
    let err = status(client.upsert_points(request).await.unwrap_err());
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(outcomes(&double, "Upsert").len(), 2);
    assert_eq!(count(&client).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_after_applies_then_reports_an_error() {
    let (double, client) = setup().await;
    double.faults().add(RpcFault::once(
        "Upsert",
        RpcAction::FailAfter(Code::DeadlineExceeded),
    ));
    let (ids, request) = points(4);
    let err = status(client.upsert_points(request).await.unwrap_err());
    assert_eq!(err.code(), Code::DeadlineExceeded);
    // The write happened although the reply said it did not.
    assert_eq!(count(&client).await, 4);

    double.faults().add(RpcFault::once(
        "Points/Delete",
        RpcAction::FailAfter(Code::PermissionDenied),
    ));
    let err = status(
        client
            .delete_points(
                DeletePointsBuilder::new("c")
                    .points(PointsIdsList {
                        ids: ids.iter().map(|id| PointId::from(id.to_string())).collect(),
                    })
                    .wait(true),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(count(&client).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_slows_a_call_that_then_succeeds() {
    let (double, client) = setup().await;
    double.faults().add(RpcFault::once(
        "Points/Count",
        RpcAction::Delay(Duration::from_millis(400)),
    ));
    let started = Instant::now();
    assert_eq!(count(&client).await, 0);
    assert!(started.elapsed() >= Duration::from_millis(400));
    // The fault was once: the second call is not delayed (checked in the
    // server's log, not by a wall-clock bound).
    assert_eq!(count(&client).await, 0);
    let faults: Vec<_> = double
        .faults()
        .calls_to("Points/Count")
        .into_iter()
        .map(|c| c.fault)
        .collect();
    assert_eq!(
        faults,
        vec![Some(RpcAction::Delay(Duration::from_millis(400))), None]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_call_times_out_on_the_client_and_applies_nothing() {
    let (double, _) = setup().await;
    let client = client_with_timeout(&double, Duration::from_millis(300));
    // Twice, because the client re-sends on Cancelled (its timeout's code).
    double
        .faults()
        .add(RpcFault::once("Upsert", RpcAction::Hang).times(2));
    let (_, request) = points(3);
    let started = Instant::now();
    let err = status(client.upsert_points(request).await.unwrap_err());
    assert_eq!(err.code(), Code::Cancelled);
    assert!(started.elapsed() >= Duration::from_millis(600));
    // The server sees the client give up on both attempts.
    assert_eq!(
        settled(&double, "Upsert", 2).await,
        vec![CallOutcome::Abandoned, CallOutcome::Abandoned]
    );
    assert_eq!(count(&client).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_fails_the_call_whether_or_not_it_applied() {
    let (double, client) = setup().await;
    double
        .faults()
        .add(RpcFault::once("Upsert", RpcAction::DropConnection { applied: false }).times(2));
    let (_, request) = points(3);
    let err = status(client.upsert_points(request).await.unwrap_err());
    assert!(RESENT.contains(&err.code()), "{err:?}");
    eprintln!(
        "a dropped connection surfaces as {:?}: {}",
        err.code(),
        err.message()
    );
    assert_eq!(count(&client).await, 0);

    double
        .faults()
        .add(RpcFault::once("Upsert", RpcAction::DropConnection { applied: true }).times(2));
    let (_, request) = points(3);
    let err = status(client.upsert_points(request).await.unwrap_err());
    assert!(RESENT.contains(&err.code()), "{err:?}");
    // Applied (twice: the re-send is idempotent), and the reply was lost.
    assert_eq!(count(&client).await, 3);
    assert_eq!(
        settled(&double, "Upsert", 4).await,
        vec![CallOutcome::Abandoned; 4]
    );
    // The client reconnects for the next call.
    let (_, request) = points(1);
    client.upsert_points(request).await.unwrap();
    assert_eq!(count(&client).await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_exhausted_carries_a_retry_after_the_client_parses() {
    let (double, client) = setup().await;
    double.faults().add(RpcFault::once(
        "Upsert",
        RpcAction::ResourceExhausted {
            retry_after_secs: 7,
        },
    ));
    let (_, request) = points(2);
    match client.upsert_points(request).await.unwrap_err() {
        QdrantError::ResourceExhaustedError {
            status,
            retry_after_seconds,
        } => {
            assert_eq!(status.code(), Code::ResourceExhausted);
            assert_eq!(retry_after_seconds, 7);
        }
        other => panic!("expected ResourceExhaustedError, got {other:?}"),
    }
    // Not re-sent by the client, nothing applied.
    assert_eq!(outcomes(&double, "Upsert").len(), 1);
    assert_eq!(count(&client).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_batch_applies_a_prefix_then_fails() {
    let (double, client) = setup().await;
    double.faults().add(RpcFault::once(
        "Upsert",
        RpcAction::PartialThenFail {
            applied: 3,
            code: Code::Aborted,
        },
    ));
    let (ids, request) = points(10);
    let err = status(client.upsert_points(request).await.unwrap_err());
    assert_eq!(err.code(), Code::Aborted);
    assert_eq!(count(&client).await, 3);
    let stored = client
        .get_points(qdrant_client::qdrant::GetPointsBuilder::new(
            "c",
            ids.iter()
                .map(|id| PointId::from(id.to_string()))
                .collect::<Vec<_>>(),
        ))
        .await
        .unwrap()
        .result
        .len();
    assert_eq!(stored, 3);

    // Deletes by id are partial the same way.
    double.faults().add(RpcFault::once(
        "Points/Delete",
        RpcAction::PartialThenFail {
            applied: 2,
            code: Code::Aborted,
        },
    ));
    let err = status(
        client
            .delete_points(
                DeletePointsBuilder::new("c")
                    .points(PointsIdsList {
                        ids: ids[..3]
                            .iter()
                            .map(|id| PointId::from(id.to_string()))
                            .collect(),
                    })
                    .wait(true),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(err.code(), Code::Aborted);
    assert_eq!(count(&client).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_timeout_reply_is_ok_but_not_completed() {
    let (double, client) = setup().await;
    double.faults().add(RpcFault::once(
        "Upsert",
        RpcAction::ReplyStatus(UpdateStatus::WaitTimeout),
    ));
    let (_, request) = points(2);
    let reply = client.upsert_points(request).await.unwrap();
    assert_eq!(
        reply.result.unwrap().status,
        UpdateStatus::WaitTimeout as i32
    );
    assert_eq!(count(&client).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_select_calls_by_qualified_name_and_window() {
    let (double, client) = setup().await;
    double.faults().add(RpcFault {
        method: "Collections/Get",
        nth: 1,
        times: 1,
        action: RpcAction::FailBefore(Code::NotFound),
    });
    assert!(client.collection_info("c").await.is_ok());
    let err = status(client.collection_info("c").await.unwrap_err());
    assert_eq!(err.code(), Code::NotFound);
    assert!(client.collection_info("c").await.is_ok());
    // Points/Get shares the method name but not the service.
    assert!(
        client
            .get_points(qdrant_client::qdrant::GetPointsBuilder::new(
                "c",
                Vec::<PointId>::new()
            ))
            .await
            .is_ok()
    );
    assert_eq!(
        outcomes(&double, "Collections/Get"),
        vec![
            CallOutcome::Ok,
            CallOutcome::Err(Code::NotFound),
            CallOutcome::Ok
        ]
    );
    // "*" matches every RPC.
    double.faults().add(RpcFault::always(
        "*",
        RpcAction::FailBefore(Code::PermissionDenied),
    ));
    let err = status(client.list_collections().await.unwrap_err());
    assert_eq!(err.code(), Code::PermissionDenied);
    double.faults().clear();
    assert!(client.list_collections().await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutting_down_ends_hanging_calls() {
    let (double, client) = setup().await;
    double
        .faults()
        .add(RpcFault::always("Points/Count", RpcAction::Hang));
    let pending =
        tokio::spawn(async move { client.count(CountPointsBuilder::new("c").exact(true)).await });
    // Let the call reach the server.
    let deadline = Instant::now() + Duration::from_secs(5);
    while double.faults().calls_to("Points/Count").is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::timeout(Duration::from_secs(5), double.shutdown())
        .await
        .expect("shutdown does not wait for hanging calls");
    let result = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("the hanging call ends")
        .unwrap();
    assert!(result.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_connections_is_a_network_blip() {
    let (double, client) = setup().await;
    assert_eq!(count(&client).await, 0);
    double.faults().add(RpcFault::once(
        "Points/Count",
        RpcAction::Delay(Duration::from_millis(500)),
    ));
    let slow = {
        let client = client_with_timeout(&double, Duration::from_secs(10));
        tokio::spawn(async move { client.count(CountPointsBuilder::new("c").exact(true)).await })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while double.faults().calls_to("Points/Count").len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    double.drop_connections();
    // The in-flight call's connection is gone; the client re-sends it on a new
    // connection (Unavailable/Unknown are re-sent), which succeeds.
    let result = slow.await.unwrap();
    assert_eq!(result.unwrap().result.unwrap().count, 0);
    assert!(outcomes(&double, "Points/Count").len() >= 3);
    assert_eq!(count(&client).await, 0);
}
