//! Request limits and request parsing: body size, batch size, the request
//! timeout, JSON bodies whose errors name the field and position, and the
//! `Idempotency-Key` header.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request, State};

use axum::http::request::Parts;
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

use super::errors::ApiError;

/// The limits of one request.
#[derive(Clone, Copy, Debug)]
pub struct ApiLimits {
    /// Most bytes in a request body.
    pub max_body_bytes: usize,
    /// Most records (or ids) in one call.
    pub max_batch: usize,
    /// Most hits of one search.
    pub max_k: usize,
    /// How long one request may take before the client gets `timeout`.
    pub request_timeout: Duration,
}

/// Most characters in an `Idempotency-Key`.
pub const MAX_KEY_LEN: usize = 255;

/// A JSON request body. Rejections are [`ApiError`]s: `unsupported_media_type`
/// without `Content-Type: application/json`, `body_too_large` past the body
/// limit, `bad_json` with the field path, line and column otherwise. Unknown
/// fields are refused (the request types deny them), so a typo is an error,
/// not a silently ignored option.
///
/// A refused body is still read to its end (and thrown away), up to
/// [`DRAIN_LIMIT`] bytes beyond the limit: a client that is still sending
/// when the answer is ready would otherwise see its connection reset
/// instead of the 4xx that says why.
pub struct ApiJson<T>(pub T);

/// How many bytes past the body limit a refused body is read (and
/// discarded) so that its client receives the answer.
pub const DRAIN_LIMIT: usize = 64 * 1024 * 1024;

impl<T: DeserializeOwned> FromRequest<super::ApiState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &super::ApiState) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| {
                let v = v.trim();
                v.eq_ignore_ascii_case("application/json")
                    || (v.starts_with("application/") && v.ends_with("+json"))
            });
        let limit = state.limits.max_body_bytes;
        let body = read_body(req.into_body(), if is_json { limit } else { 0 }).await;
        if !is_json {
            return Err(ApiError::rejected(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the body must be JSON, sent with Content-Type: application/json",
            ));
        }
        parse_json(&body?).map(ApiJson)
    }
}

/// Reads a body of at most `limit` bytes; a longer one is drained (up to
/// [`DRAIN_LIMIT`] more) and refused with `body_too_large`.
async fn read_body(body: axum::body::Body, limit: usize) -> Result<Bytes, ApiError> {
    use futures::StreamExt;
    let mut stream = body.into_data_stream();
    let mut kept = Vec::new();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::rejected(
                StatusCode::BAD_REQUEST,
                "bad_body",
                format!("cannot read the request body: {e}"),
            )
        })?;
        total = total.saturating_add(chunk.len());
        if total <= limit {
            kept.extend_from_slice(&chunk);
        } else {
            kept = Vec::new();
            if total > limit.saturating_add(DRAIN_LIMIT) {
                break;
            }
        }
    }
    if total > limit {
        return Err(ApiError::rejected(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!(
                "the request body is larger than the service's limit of {} bytes (--max-body-mib)",
                limit
            ),
        ));
    }
    Ok(kept.into())
}

/// Parses a JSON document; the error names the field path and position.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed = match serde_path_to_error::deserialize(&mut de) {
        Ok(value) => de.end().map(|()| value).map_err(|e| (None, e)),
        Err(e) => {
            let path = e.path().to_string();
            Err(((path != ".").then_some(path), e.into_inner()))
        }
    };
    parsed.map_err(|(field, inner)| {
        let mut message = inner.to_string();
        // serde_json appends " at line L column C"; the fields say it already.
        if let Some(at) = message.find(" at line ") {
            message.truncate(at);
        }
        let message = match &field {
            Some(f) => format!("invalid JSON at {f}: {message}"),
            None => format!("invalid JSON: {message}"),
        };
        ApiError {
            field,
            line: u32::try_from(inner.line()).ok(),
            column: u32::try_from(inner.column()).ok(),
            ..ApiError::rejected(StatusCode::BAD_REQUEST, "bad_json", message)
        }
    })
}

/// The optional `Idempotency-Key` header: 1 to [`MAX_KEY_LEN`] visible ASCII
/// characters, or `invalid_idempotency_key`.
pub struct IdempotencyKey(pub Option<String>);

/// The header's name.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let Some(value) = parts.headers.get(IDEMPOTENCY_KEY) else {
            return Ok(Self(None));
        };
        let invalid = |why: &str| {
            ApiError::rejected(
                StatusCode::BAD_REQUEST,
                "invalid_idempotency_key",
                format!("Idempotency-Key {why}"),
            )
        };
        let key = value
            .to_str()
            .map_err(|_| invalid("must be visible ASCII"))?;
        if key.is_empty() {
            return Err(invalid("must not be empty"));
        }
        if key.len() > MAX_KEY_LEN {
            return Err(invalid(&format!(
                "must be at most {MAX_KEY_LEN} characters"
            )));
        }
        if !key.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
            return Err(invalid("must be visible ASCII"));
        }
        Ok(Self(Some(key.to_owned())))
    }
}

/// Ends a request that runs past the request timeout with `timeout` (a write
/// keeps running on its own: see [`super::api`]; its outcome is then unknown
/// to the client).
pub async fn timeout(State(limits): State<ApiLimits>, req: Request, next: Next) -> Response {
    let write = req.method() == Method::POST && is_write_path(req.uri().path());
    match tokio::time::timeout(limits.request_timeout, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::timeout(write, limits.request_timeout.as_secs_f64()).into_response(),
    }
}

/// Whether a POST to `path` writes.
pub fn is_write_path(path: &str) -> bool {
    matches!(path, "/api/v1/records" | "/api/v1/records/delete")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        records: Vec<Rec>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Rec {
        scope: String,
        vector: Vec<f32>,
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_drained_and_refused() {
        use axum::body::Body;
        let ok = read_body(Body::from(vec![b'x'; 10]), 10).await.unwrap();
        assert_eq!(ok.len(), 10);
        let e = read_body(Body::from(vec![b'x'; 11]), 10).await.unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large")
        );
        // Streamed in pieces, without a length, the same.
        let pieces = futures::stream::iter(
            (0..5).map(|_| Ok::<_, std::io::Error>(Bytes::from_static(b"abcd"))),
        );
        let e = read_body(Body::from_stream(pieces), 12).await.unwrap_err();
        assert_eq!(e.code, "body_too_large");
    }

    #[test]
    fn bad_json_names_the_field_and_the_position() {
        let text = "{\"records\": [\n {\"scope\": \"a\", \"vector\": [1]},\n {\"scope\": \"b\", \"vector\": [1, \"x\"]}\n]}";
        let e = parse_json::<Body>(text.as_bytes()).unwrap_err();
        assert_eq!(e.code, "bad_json");
        assert_eq!(e.field.as_deref(), Some("records[1].vector[1]"));
        assert_eq!(e.line, Some(3));
        assert!(e.column.unwrap() > 30, "{:?}", e.column);
        assert!(e.message.contains("records[1].vector[1]"), "{}", e.message);

        let e =
            parse_json::<Body>(b"{\"records\": [{\"scope\": \"a\", \"vectr\": []}]}").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("records[0].vectr"));
        assert!(e.message.contains("unknown field"), "{}", e.message);

        let e = parse_json::<Body>(b"{\"records\": [").unwrap_err();
        assert_eq!(e.code, "bad_json");
        assert_eq!(e.line, Some(1));

        let e = parse_json::<Body>(b"{\"records\": []} trailing").unwrap_err();
        assert_eq!(e.code, "bad_json");
        assert!(e.message.contains("trailing"), "{}", e.message);
    }
}
