//! Embedders: the `Embedder` conformance suite for every embedder (the test
//! embedder, the wrappers, the hash embedding, the OpenAI-compatible adapter
//! against the test server), the retry and batching wrappers, and one case
//! per way an OpenAI-compatible server fails, each with its documented
//! behaviour (`docs/embeddings.md`).

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_adapters::hash::HashEmbedder;
use tandem_adapters::openai::{AuthHeader, OpenAiConfig, OpenAiEmbedder};
use tandem_core::testkit::conformance::Guarded;
use tandem_core::testkit::embed::{FaultyEmbedder, TextVectorEmbedder};
use tandem_core::{
    BatchLimits, BatchingEmbedder, EmbedError, Embedder, ProtocolViolation, RetryPolicy,
    RetryingEmbedder,
};
use tandem_tests::embed_server::{EmbedServer, Fault};

// ------------------------------------------------------------ conformance

tandem_core::embedder_conformance!(text_vectors, async { TextVectorEmbedder::new(16) });

tandem_core::embedder_conformance!(wrapped_text_vectors, async {
    // Small requests, so that every case spans several.
    BatchingEmbedder::new(
        RetryingEmbedder::new(
            FaultyEmbedder::new(TextVectorEmbedder::new(16)),
            RetryPolicy::default(),
        ),
        BatchLimits {
            max_texts: 3,
            max_bytes: 64,
            concurrency: 2,
        },
    )
});

tandem_core::embedder_conformance!(hash, async {
    HashEmbedder::new(NonZeroUsize::new(64).unwrap())
});

tandem_core::embedder_conformance!(openai, async {
    let server = EmbedServer::start(16).await.unwrap();
    let e = OpenAiEmbedder::new(OpenAiConfig::new(server.base_url(), "test-model", 16)).unwrap();
    Guarded::new(e, server)
});

tandem_core::embedder_conformance!(openai_with_key_batched_and_retried, async {
    let server = EmbedServer::start_with(16, Some(KEY)).await.unwrap();
    let config = OpenAiConfig::new(server.base_url(), "test-model", 16).with_api_key(KEY);
    Guarded::new(stack(config, 3), server)
});

tandem_core::embedder_conformance!(openai_azure_style_key_header, async {
    let server = EmbedServer::start_with(16, Some(KEY)).await.unwrap();
    let config = OpenAiConfig::new(server.base_url(), "deployment", 16)
        .with_api_key(KEY)
        .with_auth_header(AuthHeader::ApiKeyHeader);
    Guarded::new(OpenAiEmbedder::new(config).unwrap(), server)
});

// ------------------------------------------------------------ helpers

const KEY: &str = "sk-test-0123456789abcdef";

/// Quick retries: 5 attempts, backoff caps of 10 ms doubling to 50 ms.
fn quick(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
    }
}

/// The CLI's stack: batching over retries over the adapter.
fn stack(
    config: OpenAiConfig,
    max_texts: usize,
) -> BatchingEmbedder<RetryingEmbedder<OpenAiEmbedder>> {
    BatchingEmbedder::new(
        RetryingEmbedder::new(OpenAiEmbedder::new(config).unwrap(), quick(5)),
        BatchLimits {
            max_texts,
            ..BatchLimits::default()
        },
    )
}

async fn server() -> EmbedServer {
    EmbedServer::start(8).await.expect("the test server starts")
}

fn config(server: &EmbedServer) -> OpenAiConfig {
    OpenAiConfig::new(server.base_url(), "test-model", 8)
}

fn retrying(server: &EmbedServer, attempts: u32) -> RetryingEmbedder<OpenAiEmbedder> {
    RetryingEmbedder::new(
        OpenAiEmbedder::new(config(server)).unwrap(),
        quick(attempts),
    )
}

fn texts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("text number {i}")).collect()
}

fn expected(server: &EmbedServer, texts: &[String]) -> Vec<Vec<f32>> {
    texts.iter().map(|t| server.vector(t)).collect()
}

fn violation(e: EmbedError) -> ProtocolViolation {
    match e {
        EmbedError::Protocol(v) => v,
        other => panic!("expected a protocol error, got {other:?}"),
    }
}

/// The error's whole chain, as the CLI prints it.
fn chain(e: &EmbedError) -> String {
    let mut out = format!("{e} {e:?}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(&format!(" {s} {s:?}"));
        source = s.source();
    }
    out
}

// ------------------------------------------------------------ faults of the server

#[tokio::test]
async fn a_429_with_retry_after_is_waited_for_then_the_retry_succeeds() {
    let s = server().await;
    s.faults().next(Fault::RateLimited {
        retry_after_secs: Some(0.3),
    });
    let t = texts(3);
    let start = Instant::now();
    let got = retrying(&s, 5).embed(&t).await.expect("the retry succeeds");
    assert_eq!(got, expected(&s, &t));
    assert_eq!(s.requests().len(), 2);
    // Never sooner than the server asked (the backoff alone is ≤ 10 ms).
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn a_429_without_retry_after_is_retried_with_backoff() {
    let s = server().await;
    s.faults().next_n(
        2,
        Fault::RateLimited {
            retry_after_secs: None,
        },
    );
    let t = texts(2);
    assert_eq!(retrying(&s, 5).embed(&t).await.unwrap(), expected(&s, &t));
    assert_eq!(s.requests().len(), 3);
}

#[tokio::test]
async fn rate_limiting_that_outlasts_the_attempts_returns_rate_limited() {
    let s = server().await;
    s.faults().next_n(
        10,
        Fault::RateLimited {
            retry_after_secs: Some(0.01),
        },
    );
    let err = retrying(&s, 3).embed(&texts(2)).await.unwrap_err();
    assert!(matches!(err, EmbedError::RateLimited { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert_eq!(err.retry_after(), Some(Duration::from_millis(10)));
    assert_eq!(s.requests().len(), 3, "max_attempts in all");
}

#[tokio::test]
async fn a_retry_after_longer_than_the_limit_is_not_waited_for() {
    let s = server().await;
    s.faults().next(Fault::RateLimited {
        retry_after_secs: Some(3600.0),
    });
    let e = retrying(&s, 5).with_max_retry_after(Duration::from_secs(60));
    let err = e.embed(&texts(1)).await.unwrap_err();
    assert_eq!(err.retry_after(), Some(Duration::from_secs(3600)));
    assert_eq!(s.requests().len(), 1);
}

#[tokio::test]
async fn an_exhausted_quota_is_permanent_and_not_retried() {
    let s = server().await;
    s.faults().next(Fault::QuotaExhausted);
    let err = retrying(&s, 5).embed(&texts(1)).await.unwrap_err();
    assert!(matches!(err, EmbedError::Permanent { .. }), "{err:?}");
    assert!(err.to_string().contains("quota"), "{err}");
    assert_eq!(s.requests().len(), 1);
}

#[tokio::test]
async fn server_errors_are_retried_and_then_succeed() {
    let s = server().await;
    s.faults().next(Fault::Status(500));
    s.faults().next(Fault::Status(502));
    let t = texts(4);
    assert_eq!(retrying(&s, 5).embed(&t).await.unwrap(), expected(&s, &t));
    assert_eq!(s.requests().len(), 3);
}

#[tokio::test]
async fn server_errors_give_up_after_max_attempts_with_a_transient_error() {
    let s = server().await;
    s.faults().next_n(10, Fault::Status(500));
    let err = retrying(&s, 4).embed(&texts(2)).await.unwrap_err();
    assert!(matches!(err, EmbedError::Transient { .. }), "{err:?}");
    assert!(err.to_string().contains("HTTP 500"), "{err}");
    assert_eq!(s.requests().len(), 4);
}

#[tokio::test]
async fn a_503_with_retry_after_is_waited_for() {
    let s = server().await;
    s.faults().next(Fault::Unavailable {
        retry_after_secs: 0.2,
    });
    let start = Instant::now();
    retrying(&s, 3).embed(&texts(1)).await.unwrap();
    assert!(start.elapsed() >= Duration::from_millis(200));
    assert_eq!(s.requests().len(), 2);
}

#[tokio::test]
async fn a_hung_request_times_out_as_transient_and_the_retry_succeeds() {
    let s = server().await;
    s.faults().next(Fault::Hang);
    let short = config(&s).with_timeout(Duration::from_millis(300));
    let alone = OpenAiEmbedder::new(short.clone()).unwrap();
    let err = alone.embed(&texts(1)).await.unwrap_err();
    assert!(matches!(err, EmbedError::Transient { .. }), "{err:?}");
    assert!(err.to_string().contains("within 0.3 s"), "{err}");

    s.faults().next(Fault::Hang);
    let e = RetryingEmbedder::new(OpenAiEmbedder::new(short).unwrap(), quick(3));
    let t = texts(2);
    assert_eq!(e.embed(&t).await.unwrap(), expected(&s, &t));
    assert_eq!(s.requests().len(), 3);
}

#[tokio::test]
async fn an_unreachable_server_is_transient() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = OpenAiEmbedder::new(OpenAiConfig::new(
        format!("http://127.0.0.1:{port}/v1"),
        "m",
        8,
    ))
    .unwrap();
    let err = e.embed(&texts(1)).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert!(err.to_string().contains("cannot connect"), "{err}");
}

#[tokio::test]
async fn a_bad_request_is_invalid_input_and_not_retried() {
    let s = server().await;
    s.faults().next(Fault::Status(400));
    let err = retrying(&s, 5).embed(&texts(2)).await.unwrap_err();
    assert!(matches!(err, EmbedError::InvalidInput { .. }), "{err:?}");
    assert!(err.to_string().contains("injected HTTP 400"), "{err}");
    assert_eq!(s.requests().len(), 1);
}

#[tokio::test]
async fn an_unknown_model_or_path_is_permanent() {
    let s = server().await;
    s.faults().next(Fault::Status(404));
    let err = retrying(&s, 5).embed(&texts(1)).await.unwrap_err();
    assert!(matches!(err, EmbedError::Permanent { .. }), "{err:?}");
    assert!(err.to_string().contains("base URL"), "{err}");
    assert_eq!(s.requests().len(), 1);
}

#[tokio::test]
async fn a_wrong_key_is_unauthorized_not_retried_and_never_shown() {
    let s = EmbedServer::start_with(8, Some(KEY)).await.unwrap();
    let wrong = "sk-wrong-key-9876543210";
    let e = RetryingEmbedder::new(
        OpenAiEmbedder::new(config(&s).with_api_key(wrong)).unwrap(),
        quick(5),
    );
    let err = e.embed(&texts(1)).await.unwrap_err();
    assert!(matches!(err, EmbedError::Unauthorized { .. }), "{err:?}");
    assert_eq!(s.requests().len(), 1);
    assert!(!s.requests()[0].authorized);
    let shown = format!("{} {e:?}", chain(&err));
    assert!(
        !shown.contains(wrong) && !shown.contains("9876543210"),
        "{shown}"
    );
    // Without a key at all: the same.
    let none = OpenAiEmbedder::new(config(&s)).unwrap();
    assert!(matches!(
        none.embed(&texts(1)).await.unwrap_err(),
        EmbedError::Unauthorized { .. }
    ));
    // The right key works, and shows nowhere either.
    let right = OpenAiEmbedder::new(config(&s).with_api_key(KEY)).unwrap();
    assert_eq!(right.embed(&texts(1)).await.unwrap().len(), 1);
    assert!(!format!("{right:?} {:?}", right.config()).contains(KEY));
}

#[tokio::test]
async fn errors_of_every_kind_never_show_the_key() {
    let s = EmbedServer::start_with(8, Some(KEY)).await.unwrap();
    let e = OpenAiEmbedder::new(
        config(&s)
            .with_api_key(KEY)
            .with_timeout(Duration::from_millis(200)),
    )
    .unwrap();
    for fault in [
        Fault::Status(500),
        Fault::Status(400),
        Fault::RateLimited {
            retry_after_secs: Some(1.0),
        },
        Fault::Hang,
        Fault::WrongDimension(3),
        Fault::Malformed,
    ] {
        s.faults().next(fault.clone());
        let err = e.embed(&texts(1)).await.unwrap_err();
        let shown = chain(&err);
        assert!(!shown.contains(KEY), "{fault:?}: {shown}");
    }
}

#[tokio::test]
async fn a_wrong_dimension_is_a_protocol_error_and_not_retried() {
    let s = server().await;
    s.faults().next(Fault::WrongDimension(5));
    let err = retrying(&s, 5).embed(&texts(2)).await.unwrap_err();
    assert_eq!(
        violation(err),
        ProtocolViolation::WrongDimension {
            index: 0,
            expected: 8,
            got: 5
        }
    );
    assert_eq!(s.requests().len(), 1);
}

#[tokio::test]
async fn fewer_vectors_than_texts_is_a_protocol_error() {
    let s = server().await;
    s.faults().next(Fault::FewerVectors(1));
    let err = retrying(&s, 5).embed(&texts(3)).await.unwrap_err();
    assert_eq!(
        violation(err),
        ProtocolViolation::WrongCount {
            expected: 3,
            got: 2
        }
    );
    assert_eq!(s.requests().len(), 1);
}

#[tokio::test]
async fn an_answer_out_of_order_is_put_back_in_order_by_its_index() {
    let s = server().await;
    s.faults().next(Fault::Reversed);
    let t = texts(5);
    let got = OpenAiEmbedder::new(config(&s))
        .unwrap()
        .embed(&t)
        .await
        .unwrap();
    assert_eq!(got, expected(&s, &t));
}

#[tokio::test]
async fn a_repeated_index_is_a_protocol_error() {
    let s = server().await;
    s.faults().next(Fault::DuplicateIndex);
    let err = OpenAiEmbedder::new(config(&s))
        .unwrap()
        .embed(&texts(2))
        .await
        .unwrap_err();
    assert!(matches!(violation(err), ProtocolViolation::Malformed(m) if m.contains("twice")));
}

#[tokio::test]
async fn non_finite_values_are_a_protocol_error() {
    let s = server().await;
    s.faults().next(Fault::NonFinite);
    let err = OpenAiEmbedder::new(config(&s))
        .unwrap()
        .embed(&texts(1))
        .await
        .unwrap_err();
    assert!(matches!(
        violation(err),
        ProtocolViolation::NonFinite {
            index: 0,
            position: 0
        }
    ));
}

#[tokio::test]
async fn a_body_that_is_not_json_is_a_protocol_error() {
    let s = server().await;
    s.faults().next(Fault::Malformed);
    let err = retrying(&s, 5).embed(&texts(1)).await.unwrap_err();
    assert!(matches!(violation(err), ProtocolViolation::Malformed(_)));
    assert_eq!(s.requests().len(), 1);
}

#[tokio::test]
async fn the_dimensions_parameter_is_sent_when_configured() {
    let s = server().await; // natively 8
    let e = OpenAiEmbedder::new(
        OpenAiConfig::new(s.base_url(), "text-embedding-3-small", 12).with_request_dimensions(12),
    )
    .unwrap();
    let got = e.embed(&texts(2)).await.unwrap();
    assert!(got.iter().all(|v| v.len() == 12));
    let seen = s.requests();
    assert_eq!(seen[0].dimensions, Some(12));
    assert_eq!(seen[0].model, "text-embedding-3-small");
    // Not configured: not sent.
    OpenAiEmbedder::new(config(&s))
        .unwrap()
        .embed(&texts(1))
        .await
        .unwrap();
    assert_eq!(s.requests()[1].dimensions, None);
}

#[tokio::test]
async fn batching_sends_bounded_requests_in_order_over_http() {
    let s = server().await;
    let e = stack(config(&s), 3);
    let t = texts(10);
    assert_eq!(e.embed(&t).await.unwrap(), expected(&s, &t));
    let sizes: Vec<usize> = s.requests().iter().map(|r| r.texts.len()).collect();
    assert_eq!(sizes.iter().sum::<usize>(), 10);
    assert!(sizes.iter().all(|&n| n <= 3), "{sizes:?}");
    assert_eq!(sizes.len(), 4);
}

#[tokio::test]
async fn one_failed_request_fails_the_whole_batched_call() {
    let s = server().await;
    s.faults()
        .when_input_contains("number 7", Fault::Status(422));
    let e = stack(config(&s), 3);
    let err = e.embed(&texts(10)).await.unwrap_err();
    assert!(matches!(err, EmbedError::InvalidInput { .. }), "{err:?}");
}

#[tokio::test]
async fn the_stack_is_usable_as_a_shared_trait_object() {
    let s = server().await;
    let e: Arc<dyn Embedder> = Arc::new(stack(config(&s), 2));
    let t = texts(5);
    let (a, b) = tokio::join!(e.embed(&t), e.embed(&t[..2]));
    assert_eq!(a.unwrap(), expected(&s, &t));
    assert_eq!(b.unwrap(), expected(&s, &t[..2]));
    assert_eq!((e.dimension(), e.model()), (8, "test-model"));
}

// ------------------------------------------------------------ RetryingEmbedder

fn policy(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(1),
    }
}

fn two_texts() -> Vec<String> {
    vec!["red shoes".into(), "blue hat".into()]
}

fn limited(secs: u64) -> EmbedError {
    EmbedError::RateLimited {
        retry_after: Some(Duration::from_secs(secs)),
        message: "quota".into(),
    }
}

#[tokio::test(start_paused = true)]
async fn transient_errors_are_retried_until_success() {
    let faulty = FaultyEmbedder::new(TextVectorEmbedder::new(8));
    faulty.fail_next(EmbedError::transient("reset"));
    faulty.fail_next(EmbedError::transient("reset"));
    let e = RetryingEmbedder::new(&faulty, policy(3));
    let got = e.embed(&two_texts()).await.unwrap();
    assert_eq!(got, faulty.inner().embed(&two_texts()).await.unwrap());
    assert_eq!(faulty.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn retries_stop_after_max_attempts_with_the_last_error() {
    let faulty = FaultyEmbedder::new(TextVectorEmbedder::new(8));
    for n in 0..5 {
        faulty.fail_next(EmbedError::transient(format!("down {n}")));
    }
    let e = RetryingEmbedder::new(&faulty, policy(3));
    let err = e.embed(&two_texts()).await.unwrap_err();
    assert!(err.to_string().contains("down 2"), "{err}");
    assert_eq!(faulty.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn permanent_errors_are_not_retried() {
    let faulty = FaultyEmbedder::new(TextVectorEmbedder::new(8));
    faulty.fail_next(EmbedError::Unauthorized {
        message: "bad key".into(),
    });
    let e = RetryingEmbedder::new(&faulty, policy(5));
    let err = e.embed(&two_texts()).await.unwrap_err();
    assert!(matches!(err, EmbedError::Unauthorized { .. }), "{err}");
    assert_eq!(faulty.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_retry_waits_at_least_the_servers_retry_after() {
    let faulty = FaultyEmbedder::new(TextVectorEmbedder::new(8));
    faulty.fail_next(limited(7));
    let e = RetryingEmbedder::new(&faulty, policy(2));
    let start = tokio::time::Instant::now();
    e.embed(&two_texts()).await.unwrap();
    // The backoff cap is 100 ms; the server's 7 s wins.
    assert!(
        start.elapsed() >= Duration::from_secs(7),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(faulty.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_beyond_the_limit_is_not_waited_for() {
    let faulty = FaultyEmbedder::new(TextVectorEmbedder::new(8));
    faulty.fail_next(limited(3600));
    let e = RetryingEmbedder::new(&faulty, policy(5)).with_max_retry_after(Duration::from_secs(60));
    let start = tokio::time::Instant::now();
    let err = e.embed(&two_texts()).await.unwrap_err();
    assert_eq!(err.retry_after(), Some(Duration::from_secs(3600)));
    assert_eq!(faulty.calls(), 1);
    assert_eq!(start.elapsed(), Duration::ZERO);
}

// ------------------------------------------------------------ BatchingEmbedder

fn batch_limits(max_texts: usize, max_bytes: usize, concurrency: usize) -> BatchLimits {
    BatchLimits {
        max_texts,
        max_bytes,
        concurrency,
    }
}

fn words(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("text number {i}")).collect()
}

#[tokio::test]
async fn requests_stay_within_the_limits_and_results_keep_the_order() {
    let inner = FaultyEmbedder::new(TextVectorEmbedder::new(8));
    let texts = words(25);
    let e = BatchingEmbedder::new(&inner, batch_limits(4, 1 << 20, 3));
    let got = e.embed(&texts).await.unwrap();
    assert_eq!(got, inner.inner().embed(&texts).await.unwrap());
    let sizes = inner.request_sizes();
    assert_eq!(sizes.len(), 7);
    assert!(sizes.iter().all(|&n| n <= 4), "{sizes:?}");
    assert_eq!(sizes.iter().sum::<usize>(), 25);
}

#[tokio::test(start_paused = true)]
async fn concurrency_is_bounded_across_calls() {
    let inner =
        FaultyEmbedder::new(TextVectorEmbedder::new(8)).with_delay(Duration::from_millis(10));
    let e = BatchingEmbedder::new(&inner, batch_limits(1, 1 << 20, 2));
    let texts = words(6);
    let (a, b) = tokio::join!(e.embed(&texts), e.embed(&texts));
    assert_eq!(a.unwrap().len(), 6);
    assert_eq!(b.unwrap().len(), 6);
    assert_eq!(inner.calls(), 12);
    assert_eq!(inner.max_in_flight(), 2);
}

#[tokio::test]
async fn a_failed_request_fails_the_call_and_names_the_text_in_the_call() {
    let inner = FaultyEmbedder::new(TextVectorEmbedder::new(8));
    inner.fail_next(EmbedError::transient("reset"));
    let e = BatchingEmbedder::new(&inner, batch_limits(2, 1 << 20, 1));
    assert!(e.embed(&words(5)).await.unwrap_err().is_retryable());

    // The third request (texts 4 and 5) says its second text is bad.
    let inner = FaultyEmbedder::new(TextVectorEmbedder::new(8));
    inner.fail_on_call(
        3,
        EmbedError::InvalidInput {
            index: Some(1),
            message: "too long".into(),
        },
    );
    let e = BatchingEmbedder::new(&inner, batch_limits(2, 1 << 20, 1));
    match e.embed(&words(6)).await.unwrap_err() {
        EmbedError::InvalidInput { index, .. } => assert_eq!(index, Some(5)),
        other => panic!("expected InvalidInput, got {other}"),
    }
}

#[tokio::test]
async fn a_short_answer_from_the_inner_embedder_is_a_protocol_error() {
    let inner = FaultyEmbedder::new(TextVectorEmbedder::new(8)).dropping_last_vector();
    let e = BatchingEmbedder::new(&inner, batch_limits(2, 1 << 20, 1));
    let err = e.embed(&words(3)).await.unwrap_err();
    assert!(matches!(err, EmbedError::Protocol(_)), "{err}");
}
