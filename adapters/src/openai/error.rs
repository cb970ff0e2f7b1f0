//! How the OpenAI-compatible API's failures map to [`EmbedError`].
//!
//! | what happened | error | retryable |
//! |---|---|---|
//! | connection refused/reset, timeout, body cut off | `Transient` | yes |
//! | 408, 500, 502, 503, 504, any other 5xx | `Transient` (with `Retry-After` if sent) | yes |
//! | 429 | `RateLimited` (with `Retry-After`) | yes |
//! | 429 with code `insufficient_quota` | `Permanent` (the quota is gone, not busy) | no |
//! | 400, 413, 422 | `InvalidInput` | no |
//! | 401, 403 | `Unauthorized` | no |
//! | 404 and any other 4xx | `Permanent` (wrong URL or model) | no |
//! | 200 with an unreadable body, wrong count, order, dimension, non-finite values | `Protocol` | no |

use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tandem_core::EmbedError;

/// At most this much of a server's error text goes into a message.
const MAX_MESSAGE: usize = 300;

/// An error body, in the shapes the servers use: OpenAI, vLLM, LM Studio
/// and llama.cpp send `{"error": {"message", "type", "code"}}`; Ollama and
/// TEI send `{"error": "text"}`.
#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorField,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ErrorField {
    Object {
        #[serde(default)]
        message: Option<String>,
        #[serde(default, rename = "type")]
        kind: Option<String>,
        #[serde(default)]
        code: Option<serde_json::Value>,
    },
    Text(String),
}

/// The server's own words about a failure, shortened, with the key removed.
pub(crate) struct ServerSays {
    message: String,
    code: Option<String>,
}

impl ServerSays {
    pub(crate) fn parse(body: &[u8], key: Option<&str>) -> Self {
        let (message, code) = match serde_json::from_slice::<ErrorBody>(body) {
            Ok(ErrorBody {
                error:
                    ErrorField::Object {
                        message,
                        kind,
                        code,
                    },
            }) => {
                let code = code
                    .and_then(|c| c.as_str().map(str::to_owned))
                    .or(kind.clone());
                (message.or(kind).unwrap_or_default(), code)
            }
            Ok(ErrorBody {
                error: ErrorField::Text(text),
            }) => (text, None),
            Err(_) => (String::from_utf8_lossy(body).into_owned(), None),
        };
        Self {
            message: clean(&message, key),
            code,
        }
    }
}

/// One line, at most [`MAX_MESSAGE`] characters, without the key (a server
/// could echo it).
pub(crate) fn clean(text: &str, key: Option<&str>) -> String {
    let mut s = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if let Some(k) = key.filter(|k| k.len() >= 4) {
        s = s.replace(k, "***");
    }
    if s.chars().count() > MAX_MESSAGE {
        s = s.chars().take(MAX_MESSAGE).collect::<String>() + "…";
    }
    s
}

/// `Retry-After`: a number of seconds, or an HTTP date.
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).ok();
    }
    httpdate::parse_http_date(v)
        .ok()
        .map(|at| at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The error of a non-success status.
pub(crate) fn from_status(
    status: u16,
    retry_after: Option<Duration>,
    says: ServerSays,
) -> EmbedError {
    let message = if says.message.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {}", says.message)
    };
    match status {
        429 if says.code.as_deref() == Some("insufficient_quota") => EmbedError::Permanent {
            message: format!("{message} (the account's quota is used up)"),
            source: None,
        },
        429 => EmbedError::RateLimited {
            retry_after,
            message,
        },
        400 | 413 | 422 => EmbedError::InvalidInput {
            index: None,
            message,
        },
        401 | 403 => EmbedError::Unauthorized { message },
        404 => EmbedError::Permanent {
            message: format!("{message} (check the base URL, e.g. …/v1, and the model name)"),
            source: None,
        },
        408 | 500..=599 => EmbedError::Transient {
            retry_after,
            message,
            source: None,
        },
        _ => EmbedError::Permanent {
            message,
            source: None,
        },
    }
}

/// The error of a request that got no (complete) answer.
pub(crate) fn from_transport(e: reqwest::Error, timeout: Duration, where_: &str) -> EmbedError {
    let e = e.without_url();
    let message = if e.is_timeout() {
        format!(
            "no answer from {where_} within {:.1} s (the request timeout)",
            timeout.as_secs_f64()
        )
    } else if e.is_connect() {
        format!("cannot connect to {where_}")
    } else {
        format!("the request to {where_} failed")
    };
    EmbedError::Transient {
        retry_after: None,
        message,
        source: Some(Box::new(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn says(body: &str) -> ServerSays {
        ServerSays::parse(body.as_bytes(), Some("sk-secret-key"))
    }

    #[test]
    fn statuses_map_to_the_documented_kinds() {
        let wait = Some(Duration::from_secs(3));
        let e = from_status(429, wait, says(r#"{"error":{"message":"slow down"}}"#));
        assert!(matches!(e, EmbedError::RateLimited { .. }) && e.retry_after() == wait);
        let e = from_status(
            429,
            None,
            says(
                r#"{"error":{"message":"quota","type":"insufficient_quota","code":"insufficient_quota"}}"#,
            ),
        );
        assert!(
            matches!(e, EmbedError::Permanent { .. }) && !e.is_retryable(),
            "{e}"
        );
        for s in [500, 502, 503, 504, 408] {
            assert!(from_status(s, None, says("")).is_retryable(), "{s}");
        }
        assert_eq!(
            from_status(503, wait, says("")).retry_after(),
            wait,
            "a 503 may say when to come back"
        );
        for s in [400, 413, 422] {
            let e = from_status(s, None, says(r#"{"error":"input too long"}"#));
            assert!(
                matches!(e, EmbedError::InvalidInput { index: None, .. }),
                "{e}"
            );
            assert!(e.to_string().contains("input too long"), "{e}");
        }
        for s in [401, 403] {
            assert!(matches!(
                from_status(s, None, says("")),
                EmbedError::Unauthorized { .. }
            ));
        }
        let e = from_status(404, None, says(r#"{"error":"model 'x' not found"}"#));
        assert!(matches!(e, EmbedError::Permanent { .. }) && e.to_string().contains("base URL"));
    }

    #[test]
    fn server_messages_are_short_single_lines_without_the_key() {
        let s = says(r#"{"error":{"message":"Incorrect API key provided: sk-secret-key\nbye"}}"#);
        assert_eq!(s.message, "Incorrect API key provided: *** bye");
        let long = "x".repeat(1000);
        assert!(says(&long).message.chars().count() <= MAX_MESSAGE + 1);
    }

    #[test]
    fn retry_after_is_seconds_or_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_retry_after(" 0.5 ", now),
            Some(Duration::from_millis(500))
        );
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }
}
