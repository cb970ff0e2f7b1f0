//! The router: which path goes where, what is open and what needs the token,
//! and the layers every request passes (panic → 500, request metrics, the
//! timeout, the body limit).
//!
//! | path | auth | what |
//! |---|---|---|
//! | `GET /healthz` | open | the process is alive |
//! | `GET /`, `GET /assets/{file}` | open | the dashboard (data comes from `/api/v1/status`) |
//! | `GET /api/v1/openapi.json` | open | this API's OpenAPI document |
//! | `GET /readyz` | token | both stores reachable now, schema and collection present |
//! | `GET /metrics` | token | Prometheus text |
//! | `GET /api/v1/status` | token | the dashboard's numbers |
//! | `POST /api/v1/records` | token | upsert a batch |
//! | `POST /api/v1/records/delete` | token | delete by selector |
//! | `POST /api/v1/records/get` | token | records by id |
//! | `POST /api/v1/search` | token | guarded search |

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use utoipa::ToSchema;

use super::errors::ApiError;
use super::{ApiState, api, auth, background, dashboard, limits, openapi};

/// `GET /healthz`.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// Always `ok` while the process serves.
    pub status: &'static str,
}

/// `GET /readyz`.
#[derive(Serialize, ToSchema)]
pub struct Readiness {
    /// Both stores answered.
    pub ready: bool,
    /// Each store.
    pub stores: Vec<StoreReadiness>,
}

/// One store's readiness.
#[derive(Serialize, ToSchema)]
pub struct StoreReadiness {
    /// `metadata` or `index`.
    pub role: &'static str,
    /// The store and its endpoint, without credentials.
    pub name: String,
    /// It answered the probe (schema / collection present).
    pub ready: bool,
    /// Why not (redacted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "service",
    responses((status = 200, description = "Alive", body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Both stores are reachable now, with the schema and the collection; the
/// failing store is named.
#[utoipa::path(get, path = "/readyz", tag = "service",
    responses(
        (status = 200, description = "Ready", body = Readiness),
        (status = 401, description = "unauthorized", body = ApiError),
        (status = 503, description = "A store is not ready (named, with the reason)", body = Readiness),
    ),
    security(("bearer" = [])))]
pub async fn readyz(State(state): State<ApiState>) -> Response {
    let c = &state.coordinator;
    let (metadata, index) = tokio::join!(
        background::probe_metadata(c, &state.redactor),
        background::probe_index(c, &state.redactor)
    );
    let stores = vec![
        StoreReadiness {
            role: "metadata",
            name: state.store_names[0].clone(),
            ready: metadata.is_ok(),
            error: metadata.err(),
        },
        StoreReadiness {
            role: "index",
            name: state.store_names[1].clone(),
            ready: index.is_ok(),
            error: index.err(),
        },
    ];
    let ready = stores.iter().all(|s| s.ready) && !state.writes.closing();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(Readiness { ready, stores })).into_response()
}

/// Prometheus metrics: every counter and histogram of the coordinator and of
/// the service (see `docs/serve.md`).
#[utoipa::path(get, path = "/metrics", tag = "service",
    responses(
        (status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain", body = String),
        (status = 401, description = "unauthorized", body = ApiError),
    ),
    security(("bearer" = [])))]
pub async fn metrics(State(state): State<ApiState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.prometheus.render(),
    )
        .into_response()
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "service",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json", body = Object)))]
pub async fn openapi_json() -> Response {
    static DOC: OnceLock<String> = OnceLock::new();
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOC.get_or_init(openapi::document).as_str(),
    )
        .into_response()
}

async fn fallback(uri: Uri) -> ApiError {
    ApiError::not_found(uri.path())
}

async fn method_not_allowed(req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let response = next.run(req).await;
    if response.status() == StatusCode::METHOD_NOT_ALLOWED {
        let mut e = ApiError::rejected(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} is not allowed on {path}"),
        )
        .into_response();
        if let Some(allow) = response.headers().get(header::ALLOW) {
            e.headers_mut().insert(header::ALLOW, allow.clone());
        }
        return e;
    }
    response
}

/// Counts every request by route, method and status, and times it.
async fn observe(matched: Option<MatchedPath>, req: Request, next: Next) -> Response {
    let route = matched.map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method = req.method().to_string();
    let started = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16();
    let secs = started.elapsed().as_secs_f64();
    tracing::debug!(%method, %route, status, ms = secs * 1e3, "request");
    metrics::counter!(
        "tandem_http_requests_total",
        "route" => route.clone(),
        "method" => method,
        "status" => status.to_string()
    )
    .increment(1);
    metrics::histogram!("tandem_http_request_duration_seconds", "route" => route).record(secs);
    response
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError {
        outcome: super::errors::ApiOutcome::Unknown,
        retryable: true,
        ..ApiError::rejected(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the service failed unexpectedly handling this request",
        )
    }
    .into_response()
}

/// The whole router.
pub fn router(state: ApiState, token: Option<Arc<auth::Token>>) -> Router {
    let protected = Router::new()
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/status", get(api::status))
        .route("/api/v1/records", post(api::upsert))
        .route("/api/v1/records/delete", post(api::delete))
        .route("/api/v1/records/get", post(api::get))
        .route("/api/v1/search", post(api::search))
        .route_layer(middleware::from_fn_with_state(token, auth::require_token));
    let open = Router::new()
        .route("/healthz", get(healthz))
        .route("/", get(dashboard::index))
        .route("/assets/{name}", get(dashboard::asset))
        .route("/api/v1/openapi.json", get(openapi_json));
    let limits = state.limits;
    open.merge(protected)
        .fallback(fallback)
        .with_state(state)
        // ApiJson enforces the limit itself (and drains what it refuses).
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(limits, limits::timeout))
        .layer(middleware::from_fn(method_not_allowed))
        .layer(middleware::from_fn(observe))
        .layer(SetSensitiveRequestHeadersLayer::new([
            header::AUTHORIZATION,
        ]))
        .layer(CatchPanicLayer::custom(panic_response))
}
