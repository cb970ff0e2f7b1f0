//! The JSON API under `/api/v1`: upsert a batch, delete by selector, search,
//! get by ids, and the status document. Each handler parses and checks the
//! request, calls the coordinator once and maps the result; errors are
//! [`ApiError`]s.
//!
//! Writes run in a task of their own: a client that disconnects or times out
//! does not cut a write short (which would leave it to recovery); it completes,
//! and a retry with the same `Idempotency-Key` returns its outcome. Shutdown
//! waits for these tasks (see [`super::InFlight`]).

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tandem_core::{
    CoordinatorError, DeleteSelector, Filter, IndexWait, NewRecord, RecordId, Scope, SearchQuery,
    WriteMode, WriteOptions,
};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::ApiState;
use super::errors::ApiError;
use super::limits::{ApiJson, IdempotencyKey};
use crate::embed::hash_embedding;

/// Header set on a write answered from its idempotency key.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// How records without a vector get one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Embed {
    /// The deterministic hash embedding of the content (lexical only; as
    /// `tandem ingest --embed hash`).
    Hash,
}

/// A record to write.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiRecord {
    /// Its id; a new record gets a UUIDv7 when absent. An existing id is updated.
    pub id: Option<Uuid>,
    /// Its scope (a catalog, a tenant, ...): not empty.
    pub scope: String,
    /// Its text content.
    #[serde(default)]
    pub content: String,
    /// Its metadata: a JSON object.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub metadata: Option<Value>,
    /// Its embedding, of the collection's dimension. May be left out with
    /// `"embed": "hash"`.
    pub vector: Option<Vec<f32>>,
}

/// `POST /api/v1/records`.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpsertRequest {
    /// The batch: all of it is written, or none of it.
    pub records: Vec<ApiRecord>,
    /// Compute the vectors of records that have none.
    pub embed: Option<Embed>,
}

/// What an upsert did.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct UpsertResponse {
    /// The intent that carried the write.
    pub intent: Uuid,
    /// The records' ids, in input order (generated ones included).
    pub ids: Vec<Uuid>,
    /// Records inserted.
    pub inserted: u64,
    /// Records updated.
    pub updated: u64,
    /// Superseded points left for recovery to delete (never visible).
    pub deferred_cleanup: usize,
    /// Answered from the idempotency key: this call wrote nothing.
    pub replayed: bool,
    /// The write was deferred (`?mode=deferred`): committed, but searchable
    /// only once an index worker has indexed it.
    #[serde(default)]
    pub deferred: bool,
    /// With `?wait=true`: `indexed`, `timed_out` or `dead_lettered`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait: Option<String>,
}

/// `?mode=sync|deferred&wait=true&wait_ms=N` of a write.
#[derive(Debug, Default, Deserialize, IntoParams)]
pub struct WriteQuery {
    /// `sync` (the call writes the index) or `deferred` (one metadata
    /// transaction; index workers write the points) [default: the service's
    /// configured write mode].
    #[param(value_type = Option<String>)]
    pub mode: Option<WriteMode>,
    /// Deferred upserts: answer only once the records are searchable (or
    /// after `wait_ms`).
    #[serde(default)]
    pub wait: bool,
    /// How long `wait` waits, in milliseconds [default: 10000].
    pub wait_ms: Option<u64>,
}

/// `POST /api/v1/records/delete`: `{"ids": [...]}`, `{"scope": "s"}`, or
/// `{"scope": "s", "where": {"key": value}}`.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteRequest {
    /// Delete these records (missing ids are ignored).
    pub ids: Option<Vec<Uuid>>,
    /// Delete the records of this scope...
    pub scope: Option<String>,
    /// ... whose metadata has this one key = value.
    #[serde(rename = "where")]
    #[schema(value_type = Option<Object>)]
    pub where_eq: Option<Map<String, Value>>,
}

/// What a delete did.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct DeleteResponse {
    /// The intent that carried the delete.
    pub intent: Uuid,
    /// Records deleted.
    pub deleted: u64,
    /// Points left for recovery to delete (never visible).
    pub deferred_cleanup: usize,
    /// Answered from the idempotency key: this call deleted nothing.
    pub replayed: bool,
}

/// `POST /api/v1/search`: a vector or a text (hash embedding), and filters.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    /// The query vector.
    pub vector: Option<Vec<f32>>,
    /// Or a text, embedded with the hash embedding.
    pub text: Option<String>,
    /// Hits wanted (default 10).
    pub k: Option<usize>,
    /// Only records of this scope.
    pub scope: Option<String>,
    /// Only records whose metadata has every key = value.
    #[serde(rename = "where")]
    #[schema(value_type = Option<Object>)]
    pub where_eq: Option<Map<String, Value>>,
    /// Only hits scoring at least this.
    pub min_score: Option<f32>,
}

/// A committed record.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ApiStoredRecord {
    /// Its id.
    pub id: Uuid,
    /// Its scope.
    pub scope: String,
    /// Bumped by every committed write, from 1.
    pub version: u64,
    /// Its content.
    pub content: String,
    /// Its metadata.
    #[schema(value_type = Object)]
    pub metadata: Map<String, Value>,
    /// Its vector (`get` with `with_vectors`, when the store keeps vectors).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vector: Option<Vec<f32>>,
}

/// A search hit.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ApiHit {
    /// The similarity score.
    pub score: f32,
    /// The committed, current record.
    pub record: ApiStoredRecord,
}

/// What a search found, best first.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct SearchResponse {
    /// The hits.
    pub hits: Vec<ApiHit>,
}

/// `POST /api/v1/records/get`.
#[derive(Clone, Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GetRequest {
    /// The ids.
    pub ids: Vec<Uuid>,
    /// Return the vectors too (when the metadata store keeps them).
    #[serde(default)]
    pub with_vectors: bool,
}

/// The records found.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct GetResponse {
    /// The committed records among the ids.
    pub records: Vec<ApiStoredRecord>,
    /// The ids no committed record has.
    pub missing: Vec<Uuid>,
}

/// `?seq=N` of the status.
#[derive(Debug, Deserialize, IntoParams)]
pub struct StatusQuery {
    /// A recent snapshot by number (the last two minutes are kept); the
    /// latest without it.
    pub seq: Option<u64>,
}

fn unprocessable(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::rejected(StatusCode::UNPROCESSABLE_ENTITY, code, message)
}

fn check_batch(len: usize, max: usize, what: &str) -> Result<(), ApiError> {
    if len > max {
        return Err(ApiError::rejected(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!("{len} {what}: the limit is {max} per call"),
        ));
    }
    Ok(())
}

fn opts(key: Option<String>, mode: Option<WriteMode>) -> WriteOptions {
    WriteOptions {
        idempotency_key: key,
        write_mode: mode,
    }
}

fn stored(r: tandem_core::StoredRecord, with_vector: bool) -> ApiStoredRecord {
    ApiStoredRecord {
        id: r.id.0,
        scope: r.scope.to_string(),
        version: r.version,
        content: r.content,
        metadata: r.metadata,
        vector: r.vector.filter(|_| with_vector),
    }
}

/// A write's response, with the replay header.
fn written<T: Serialize>(body: T, replayed: bool) -> Response {
    let mut response = Json(body).into_response();
    if replayed {
        response
            .headers_mut()
            .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    }
    response
}

/// Runs a write in a task of its own (see the module's documentation).
async fn run_write<T: Send + 'static>(
    state: &ApiState,
    write: impl Future<Output = Result<T, CoordinatorError>> + Send + 'static,
) -> Result<T, ApiError> {
    let Some(guard) = state.writes.enter() else {
        return Err(ApiError::shutting_down());
    };
    let task = tokio::spawn(async move {
        let _guard = guard;
        write.await
    });
    match task.await {
        Ok(result) => result.map_err(|e| ApiError::from_coordinator(&e, &state.redactor)),
        Err(e) => {
            tracing::error!(error = %e, "a write task failed");
            Err(ApiError {
                retryable: true,
                outcome: super::errors::ApiOutcome::Unknown,
                ..ApiError::rejected(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the write failed unexpectedly; retry with the same Idempotency-Key",
                )
            })
        }
    }
}

/// Upsert a batch of records, all-or-nothing across both stores.
#[utoipa::path(
    post,
    path = "/api/v1/records",
    tag = "records",
    request_body = UpsertRequest,
    params(("Idempotency-Key" = Option<String>, Header,
        description = "A retried call with the same key writes nothing twice and returns the first call's outcome"),
        WriteQuery),
    responses(
        (status = 200, description = "Written (or replayed: header Idempotent-Replayed)", body = UpsertResponse),
        (status = 400, description = "bad_json, empty_batch, invalid_idempotency_key", body = ApiError),
        (status = 401, description = "unauthorized", body = ApiError),
        (status = 409, description = "idempotency_key_reused", body = ApiError),
        (status = 413, description = "body_too_large, batch_too_large", body = ApiError),
        (status = 415, description = "unsupported_media_type", body = ApiError),
        (status = 422, description = "dimension_mismatch, missing_vector, ... (nothing written)", body = ApiError),
        (status = 503, description = "a store is unavailable, or the outcome is unknown (see `outcome`)", body = ApiError),
        (status = 504, description = "timeout (outcome unknown)", body = ApiError),
    ),
    security(("bearer" = []))
)]
pub async fn upsert(
    State(state): State<ApiState>,
    IdempotencyKey(key): IdempotencyKey,
    Query(q): Query<WriteQuery>,
    ApiJson(req): ApiJson<UpsertRequest>,
) -> Result<Response, ApiError> {
    check_batch(req.records.len(), state.limits.max_batch, "records")?;
    let mut records = Vec::with_capacity(req.records.len());
    for (i, r) in req.records.into_iter().enumerate() {
        let vector = match (r.vector, req.embed) {
            (Some(v), _) => v,
            (None, Some(Embed::Hash)) => {
                hash_embedding(&r.content, state.dimension).ok_or_else(|| {
                    unprocessable(
                        "nothing_to_embed",
                        format!("record #{i}: the content has no word to embed"),
                    )
                    .with_field(format!("records[{i}].content"))
                })?
            }
            (None, None) => {
                return Err(unprocessable(
                    "missing_vector",
                    format!("record #{i} has no vector (send one, or \"embed\": \"hash\")"),
                )
                .with_field(format!("records[{i}].vector")));
            }
        };
        records.push(NewRecord {
            id: r.id.map(RecordId),
            scope: Scope::new(r.scope),
            content: r.content,
            metadata: r.metadata.unwrap_or_else(|| Value::Object(Map::new())),
            vector,
        });
    }
    let c = state.coordinator.clone();
    let mode = q.mode;
    let report = run_write(&state, async move {
        c.upsert_with(records, &opts(key, mode)).await
    })
    .await?;
    let replayed = report.replayed;
    let wait = match (&report.index_token, q.wait) {
        (Some(token), true) => {
            let timeout = std::time::Duration::from_millis(q.wait_ms.unwrap_or(10_000));
            let waited = state
                .coordinator
                .wait_indexed(token, timeout)
                .await
                .map_err(|e| ApiError::from_coordinator(&e, &state.redactor))?;
            Some(
                match waited {
                    IndexWait::Indexed => "indexed",
                    IndexWait::TimedOut { .. } => "timed_out",
                    IndexWait::DeadLettered { .. } => "dead_lettered",
                }
                .to_owned(),
            )
        }
        _ => None,
    };
    Ok(written(
        UpsertResponse {
            intent: report.intent.0,
            ids: report.ids.iter().map(|i| i.0).collect(),
            inserted: report.inserted,
            updated: report.updated,
            deferred_cleanup: report.deferred_cleanup,
            replayed,
            deferred: report.index_token.is_some(),
            wait,
        },
        replayed,
    ))
}

/// Delete records by ids, by scope, or by scope and one metadata key = value.
#[utoipa::path(
    post,
    path = "/api/v1/records/delete",
    tag = "records",
    request_body = DeleteRequest,
    params(("Idempotency-Key" = Option<String>, Header,
        description = "A retried call with the same key deletes nothing twice"),
        WriteQuery),
    responses(
        (status = 200, description = "Deleted (or replayed)", body = DeleteResponse),
        (status = 400, description = "bad_json, invalid_idempotency_key", body = ApiError),
        (status = 401, description = "unauthorized", body = ApiError),
        (status = 409, description = "idempotency_key_reused", body = ApiError),
        (status = 413, description = "body_too_large, batch_too_large", body = ApiError),
        (status = 422, description = "invalid_selector, empty_scope, ...", body = ApiError),
        (status = 503, description = "a store is unavailable, or the outcome is unknown", body = ApiError),
        (status = 504, description = "timeout (outcome unknown)", body = ApiError),
    ),
    security(("bearer" = []))
)]
pub async fn delete(
    State(state): State<ApiState>,
    IdempotencyKey(key): IdempotencyKey,
    Query(q): Query<WriteQuery>,
    ApiJson(req): ApiJson<DeleteRequest>,
) -> Result<Response, ApiError> {
    let selector = match (req.ids, req.scope, req.where_eq) {
        (Some(ids), None, None) => {
            check_batch(ids.len(), state.limits.max_batch, "ids")?;
            DeleteSelector::Ids(ids.into_iter().map(RecordId).collect())
        }
        (None, Some(scope), None) => DeleteSelector::Scope(Scope::new(scope)),
        (None, Some(scope), Some(w)) => {
            if w.len() != 1 {
                return Err(unprocessable(
                    "invalid_selector",
                    "\"where\" must hold exactly one key = value",
                )
                .with_field("where"));
            }
            let (key, value) = w.into_iter().next().expect("one entry");
            DeleteSelector::MetadataEq {
                scope: Scope::new(scope),
                key,
                value,
            }
        }
        _ => {
            return Err(unprocessable(
                "invalid_selector",
                "give either \"ids\", or \"scope\" (with an optional \"where\")",
            ));
        }
    };
    let c = state.coordinator.clone();
    let mode = q.mode;
    let report = run_write(&state, async move {
        c.delete_with(selector, &opts(key, mode)).await
    })
    .await?;
    let replayed = report.replayed;
    Ok(written(
        DeleteResponse {
            intent: report.intent.0,
            deleted: report.deleted,
            deferred_cleanup: report.deferred_cleanup,
            replayed,
        },
        replayed,
    ))
}

/// Guarded similarity search: only committed, current records are returned.
#[utoipa::path(
    post,
    path = "/api/v1/search",
    tag = "records",
    request_body = SearchRequest,
    responses(
        (status = 200, description = "The hits, best first", body = SearchResponse),
        (status = 400, description = "bad_json", body = ApiError),
        (status = 401, description = "unauthorized", body = ApiError),
        (status = 422, description = "invalid_query, k_too_large, dimension_mismatch, ...", body = ApiError),
        (status = 503, description = "a store is unavailable", body = ApiError),
    ),
    security(("bearer" = []))
)]
pub async fn search(
    State(state): State<ApiState>,
    ApiJson(req): ApiJson<SearchRequest>,
) -> Result<Json<SearchResponse>, ApiError> {
    let vector = match (req.vector, req.text) {
        (Some(v), None) => v,
        (None, Some(t)) => hash_embedding(&t, state.dimension).ok_or_else(|| {
            unprocessable("nothing_to_embed", "the text has no word to embed").with_field("text")
        })?,
        _ => {
            return Err(unprocessable(
                "invalid_query",
                "give either \"vector\" or \"text\"",
            ));
        }
    };
    let k = req.k.unwrap_or(10);
    if k > state.limits.max_k {
        return Err(unprocessable(
            "k_too_large",
            format!("k is {k}; the limit is {}", state.limits.max_k),
        )
        .with_field("k"));
    }
    let filter = Filter {
        scope: req.scope.map(Scope::new),
        metadata_eq: req
            .where_eq
            .unwrap_or_default()
            .into_iter()
            .collect::<BTreeMap<_, _>>(),
    };
    let query = SearchQuery {
        vector,
        k,
        filter,
        score_threshold: req.min_score,
    };
    let hits = state.coordinator.search(&query).await.map_err(|e| {
        let mut err = ApiError::from_coordinator(&e, &state.redactor);
        // A query is one vector, not a batch of records.
        if let Some(f) = &err.field {
            err.field = Some(f.replacen("records[0].vector", "vector", 1));
        }
        err
    })?;
    Ok(Json(SearchResponse {
        hits: hits
            .into_iter()
            .map(|h| ApiHit {
                score: h.score,
                record: stored(h.record, false),
            })
            .collect(),
    }))
}

/// The committed records with these ids.
#[utoipa::path(
    post,
    path = "/api/v1/records/get",
    tag = "records",
    request_body = GetRequest,
    responses(
        (status = 200, description = "The records found and the ids missing", body = GetResponse),
        (status = 400, description = "bad_json", body = ApiError),
        (status = 401, description = "unauthorized", body = ApiError),
        (status = 413, description = "batch_too_large", body = ApiError),
        (status = 503, description = "the metadata store is unavailable", body = ApiError),
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<ApiState>,
    ApiJson(req): ApiJson<GetRequest>,
) -> Result<Json<GetResponse>, ApiError> {
    check_batch(req.ids.len(), state.limits.max_batch, "ids")?;
    let ids: Vec<RecordId> = req.ids.iter().copied().map(RecordId).collect();
    let found = state
        .coordinator
        .get(&ids)
        .await
        .map_err(|e| ApiError::from_coordinator(&e, &state.redactor))?;
    let present: std::collections::HashSet<Uuid> = found.iter().map(|r| r.id.0).collect();
    let mut missing: Vec<Uuid> = req
        .ids
        .into_iter()
        .filter(|i| !present.contains(i))
        .collect();
    missing.dedup();
    Ok(Json(GetResponse {
        records: found
            .into_iter()
            .map(|r| stored(r, req.with_vectors))
            .collect(),
        missing,
    }))
}

/// The numbers the dashboard shows (one snapshot per second).
#[utoipa::path(
    get,
    path = "/api/v1/status",
    tag = "service",
    params(StatusQuery),
    responses(
        (status = 200, description = "The snapshot", body = super::status::Status),
        (status = 401, description = "unauthorized", body = ApiError),
        (status = 404, description = "snapshot_expired: no such recent snapshot", body = ApiError),
    ),
    security(("bearer" = []))
)]
pub async fn status(
    State(state): State<ApiState>,
    Query(q): Query<StatusQuery>,
) -> Result<Response, ApiError> {
    match state.snapshots.get(q.seq) {
        Some(s) => Ok((
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            s.json.clone(),
        )
            .into_response()),
        None => Err(ApiError::rejected(
            StatusCode::NOT_FOUND,
            "snapshot_expired",
            match q.seq {
                Some(n) => format!("snapshot {n} is not kept (only the last two minutes are)"),
                None => "no snapshot yet".into(),
            },
        )),
    }
}
