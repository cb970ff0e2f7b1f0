//! Optional bearer-token authentication (`TANDEM_API_TOKEN`).
//!
//! The token is kept only as its SHA-256 digest; a request's token is hashed
//! the same way and the digests are compared in constant time, so neither the
//! comparison's duration nor the token's length tells an attacker anything.
//! The token is never logged, echoed in an error, or shown by the status or
//! the dashboard (it is also registered with the log redactor).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::errors::ApiError;

/// The expected token, as a digest.
#[derive(Clone)]
pub struct Token {
    digest: [u8; 32],
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

impl Token {
    /// The token callers must present.
    pub fn new(secret: &str) -> Self {
        Self {
            digest: digest(secret.as_bytes()),
        }
    }

    /// Whether `presented` is the token (constant time).
    pub fn matches(&self, presented: &[u8]) -> bool {
        digest(presented).ct_eq(&self.digest).into()
    }
}

/// Requires `Authorization: Bearer <token>` when a token is configured.
pub async fn require_token(
    State(token): State<Option<Arc<Token>>>,
    req: Request,
    next: Next,
) -> Response {
    let Some(token) = token else {
        return next.run(req).await;
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .and_then(|v| {
            let scheme = v.get(..7)?;
            scheme
                .eq_ignore_ascii_case(b"bearer ")
                .then(|| v[7..].trim_ascii())
        });
    match presented {
        None => ApiError::unauthorized(
            "this endpoint needs a bearer token: send Authorization: Bearer <TANDEM_API_TOKEN>",
        )
        .into_response(),
        Some(p) if !token.matches(p) => {
            ApiError::unauthorized("the bearer token is not valid").into_response()
        }
        Some(_) => next.run(req).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_token_matches_and_debug_hides_it() {
        let t = Token::new("s3cret-token");
        assert!(t.matches(b"s3cret-token"));
        assert!(!t.matches(b"s3cret-toke"));
        assert!(!t.matches(b"s3cret-token "));
        assert!(!t.matches(b""));
        assert!(!format!("{t:?}").contains("s3cret"));
    }
}
