//! An OpenAI-compatible embedding server for tests: `POST /v1/embeddings`,
//! in process, on an ephemeral port of 127.0.0.1.
//!
//! It answers with deterministic vectors ([`text_vector`] of each text, in
//! the server's dimension or the request's `dimensions`), checks the API key
//! when given one (401 otherwise), records every request, and on request
//! misbehaves: each [`Fault`] is one way a real server fails. Faults are
//! queued per server ([`EmbedServer::faults`]), so tests run in parallel:
//!
//! ```
//! # async fn example() -> std::io::Result<()> {
//! use tandem_tests::embed_server::{EmbedServer, Fault};
//! let server = EmbedServer::start(8).await?;
//! // The next request gets a 429 asking to wait 1 s, the one after a 500.
//! server.faults().next(Fault::RateLimited { retry_after_secs: Some(1.0) });
//! server.faults().next(Fault::Status(500));
//! // Every request with a text containing "poison" gets a 400.
//! server.faults().when_input_contains("poison", Fault::Status(400));
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
pub use tandem_core::testkit::embed::text_vector;

/// One way to misbehave, for one request.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// 429 with `Retry-After` (in seconds) when given.
    RateLimited {
        /// The `Retry-After` header's value, if any.
        retry_after_secs: Option<f64>,
    },
    /// 429 with OpenAI's `insufficient_quota` code: the account is out of
    /// credit (not a reason to retry).
    QuotaExhausted,
    /// This HTTP status with an OpenAI-style error body (500, 503, 400, 404…).
    Status(u16),
    /// 503 with `Retry-After`.
    Unavailable {
        /// The `Retry-After` header's value.
        retry_after_secs: f64,
    },
    /// Never answers (the client's timeout must end the request).
    Hang,
    /// Answers normally after this long.
    Delay(Duration),
    /// Vectors of this dimension instead of the right one.
    WrongDimension(usize),
    /// This many vectors fewer than texts (the last ones are left out).
    FewerVectors(usize),
    /// The right vectors, listed in reverse order with their right `index`
    /// (a correct answer a client must put in order).
    Reversed,
    /// Two items with the same `index`.
    DuplicateIndex,
    /// A component too large for an `f32` (reads as infinity).
    NonFinite,
    /// A 200 whose body is not JSON.
    Malformed,
}

/// A request as the server saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct SeenRequest {
    /// The texts (`input`).
    pub texts: Vec<String>,
    /// The `model`.
    pub model: String,
    /// The `dimensions` parameter, if sent.
    pub dimensions: Option<usize>,
    /// Whether the API key was right (always true without one).
    pub authorized: bool,
    /// The fault it met, if any.
    pub fault: Option<Fault>,
}

/// The fault plan of one server.
#[derive(Debug, Default)]
pub struct Faults {
    queue: Mutex<VecDeque<Fault>>,
    matching: Mutex<Vec<(String, Fault)>>,
}

impl Faults {
    /// The next request not yet given a fault gets `fault` (queued in order).
    pub fn next(&self, fault: Fault) {
        lock(&self.queue).push_back(fault);
    }

    /// The next `n` requests get `fault`.
    pub fn next_n(&self, n: usize, fault: Fault) {
        let mut q = lock(&self.queue);
        for _ in 0..n {
            q.push_back(fault.clone());
        }
    }

    /// Every request with a text containing `needle` gets `fault` (checked
    /// before the queue).
    pub fn when_input_contains(&self, needle: &str, fault: Fault) {
        lock(&self.matching).push((needle.to_owned(), fault));
    }

    /// Removes every planned fault.
    pub fn clear(&self) {
        lock(&self.queue).clear();
        lock(&self.matching).clear();
    }

    fn take(&self, texts: &[String]) -> Option<Fault> {
        let matched = lock(&self.matching)
            .iter()
            .find(|(needle, _)| texts.iter().any(|t| t.contains(needle.as_str())))
            .map(|(_, f)| f.clone());
        matched.or_else(|| lock(&self.queue).pop_front())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Shared {
    dimension: usize,
    api_key: Option<String>,
    faults: Faults,
    seen: Mutex<Vec<SeenRequest>>,
}

/// The running server. Stops when dropped.
pub struct EmbedServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
    /// The runtime it runs on, when it brought its own
    /// ([`EmbedServer::start_in_background`]).
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for EmbedServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbedServer")
            .field("addr", &self.addr)
            .field("dimension", &self.shared.dimension)
            .finish_non_exhaustive()
    }
}

impl EmbedServer {
    /// Starts a server of `dimension`-dimensional vectors, with no API key,
    /// on the current tokio runtime.
    pub async fn start(dimension: usize) -> std::io::Result<Self> {
        Self::start_with(dimension, None).await
    }

    /// Starts a server that requires `api_key` (when given) as
    /// `Authorization: Bearer KEY` or `api-key: KEY`.
    pub async fn start_with(dimension: usize, api_key: Option<&str>) -> std::io::Result<Self> {
        Self::start_on(dimension, api_key, 0).await
    }

    /// As [`start_with`](Self::start_with), on a chosen port (0: any free one).
    pub async fn start_on(
        dimension: usize,
        api_key: Option<&str>,
        port: u16,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            dimension,
            api_key: api_key.map(str::to_owned),
            faults: Faults::default(),
            seen: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/v1/embeddings", post(embeddings))
            .route("/embeddings", post(embeddings))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            addr,
            shared,
            task,
            runtime: None,
        })
    }

    /// Starts a server on a runtime of its own (one worker thread), for
    /// tests without a runtime — e.g. ones that run the `tandem` binary.
    pub fn start_in_background(dimension: usize, api_key: Option<&str>) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let mut server = runtime.block_on(Self::start_with(dimension, api_key))?;
        server.runtime = Some(runtime);
        Ok(server)
    }

    /// The base URL to configure a client with: `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's dimension.
    pub fn dimension(&self) -> usize {
        self.shared.dimension
    }

    /// The fault plan.
    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<SeenRequest> {
        lock(&self.shared.seen).clone()
    }

    /// The vector the server gives `text` (in its own dimension).
    pub fn vector(&self, text: &str) -> Vec<f32> {
        text_vector(text, self.shared.dimension)
    }
}

impl Drop for EmbedServer {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn error(status: StatusCode, message: &str, kind: &str) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "code": kind}});
    (status, axum::Json(body)).into_response()
}

fn authorized(shared: &Shared, headers: &HeaderMap) -> bool {
    let Some(key) = &shared.api_key else {
        return true;
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let api_key = headers.get("api-key").and_then(|v| v.to_str().ok());
    bearer == Some(key.as_str()) || api_key == Some(key.as_str())
}

async fn embeddings(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("invalid JSON: {e}"),
                "invalid_request_error",
            );
        }
    };
    let texts: Vec<String> = match &request["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) if items.iter().all(Value::is_string) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "input must be a string or an array of strings",
                "invalid_request_error",
            );
        }
    };
    let model = request["model"].as_str().unwrap_or_default().to_owned();
    let dimensions = request["dimensions"].as_u64().map(|n| n as usize);
    let ok = authorized(&shared, &headers);
    let fault = if ok { shared.faults.take(&texts) } else { None };
    lock(&shared.seen).push(SeenRequest {
        texts: texts.clone(),
        model: model.clone(),
        dimensions,
        authorized: ok,
        fault: fault.clone(),
    });
    if !ok {
        return error(
            StatusCode::UNAUTHORIZED,
            "Incorrect API key provided",
            "invalid_api_key",
        );
    }
    if texts.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "input must not be empty",
            "invalid_request_error",
        );
    }
    let mut dim = dimensions.unwrap_or(shared.dimension);
    let mut count = texts.len();
    let mut reversed = false;
    let mut duplicate = false;
    let mut non_finite = false;
    match fault {
        None | Some(Fault::Delay(Duration::ZERO)) => {}
        Some(Fault::RateLimited { retry_after_secs }) => {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "Rate limit reached for requests",
                "rate_limit_exceeded",
            );
            if let Some(secs) = retry_after_secs
                && let Ok(v) = HeaderValue::from_str(&secs.to_string())
            {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return r;
        }
        Some(Fault::QuotaExhausted) => {
            return error(
                StatusCode::TOO_MANY_REQUESTS,
                "You exceeded your current quota",
                "insufficient_quota",
            );
        }
        Some(Fault::Unavailable { retry_after_secs }) => {
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the model is loading",
                "server_error",
            );
            if let Ok(v) = HeaderValue::from_str(&retry_after_secs.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return r;
        }
        Some(Fault::Status(code)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return error(status, &format!("injected HTTP {code}"), "injected");
        }
        Some(Fault::Hang) => std::future::pending::<()>().await,
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        Some(Fault::WrongDimension(n)) => dim = n,
        Some(Fault::FewerVectors(n)) => count = count.saturating_sub(n),
        Some(Fault::Reversed) => reversed = true,
        Some(Fault::DuplicateIndex) => duplicate = true,
        Some(Fault::NonFinite) => non_finite = true,
        Some(Fault::Malformed) => {
            return (StatusCode::OK, "<html>not an embeddings list</html>").into_response();
        }
    }
    let mut data: Vec<Value> = texts
        .iter()
        .take(count)
        .enumerate()
        .map(|(i, t)| {
            let mut embedding: Vec<Value> =
                text_vector(t, dim).into_iter().map(Value::from).collect();
            if non_finite && let Some(first) = embedding.first_mut() {
                *first = json!(1e39);
            }
            let index = if duplicate { 0 } else { i };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    if reversed {
        data.reverse();
    }
    let tokens: usize = texts.iter().map(|t| t.split_whitespace().count()).sum();
    axum::Json(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response()
}
