//! An [`Embedder`] over the OpenAI-compatible `POST /embeddings` API: what
//! OpenAI, Azure OpenAI, Ollama, vLLM, llama.cpp's server, LM Studio and
//! Hugging Face TEI all speak.
//!
//! One call is one HTTP request. The adapter translates: it sends the texts,
//! maps failures to [`EmbedError`] (see `error.rs` for the table), puts the
//! answer in order by its `data[].index` and checks it against the contract
//! (count, order, dimension, finite values). It does not retry, split or
//! limit concurrency: wrap it in [`RetryingEmbedder`](tandem_core::RetryingEmbedder)
//! and [`BatchingEmbedder`](tandem_core::BatchingEmbedder) (see
//! `docs/embeddings.md`).

mod config;
mod error;

use std::fmt;
use std::time::SystemTime;

use async_trait::async_trait;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use serde::{Deserialize, Serialize};
use tandem_core::embed::check_vectors;
use tandem_core::{EmbedError, Embedder, ProtocolViolation};

pub use config::{ApiKey, AuthHeader, OpenAiConfig};

/// The request body.
#[derive(Serialize)]
struct EmbeddingRequest<'a> {
    model: &'a str,
    input: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    dimensions: Option<usize>,
}

/// The answer body (fields Tandem does not need are ignored).
#[derive(Deserialize)]
struct EmbeddingResponse {
    data: Vec<EmbeddingItem>,
}

#[derive(Deserialize)]
struct EmbeddingItem {
    index: usize,
    embedding: Vec<f32>,
}

/// The OpenAI-compatible embedder. Cheap to share (`Arc`); its HTTP client
/// keeps connections open between calls. `Debug` shows the URL's host, the
/// model and the dimension, never the key.
pub struct OpenAiEmbedder {
    config: OpenAiConfig,
    endpoint: reqwest::Url,
    auth: Option<HeaderValue>,
    client: reqwest::Client,
    /// "the embedding server at http://host:port", for messages.
    place: String,
}

impl fmt::Debug for OpenAiEmbedder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiEmbedder")
            .field("server", &self.config.describe_url())
            .field("model", &self.config.model)
            .field("dimension", &self.config.dimension)
            .finish_non_exhaustive()
    }
}

impl OpenAiEmbedder {
    /// Checks the configuration and builds the client. Connects lazily: a
    /// server that is down shows at the first call.
    pub fn new(config: OpenAiConfig) -> Result<Self, EmbedError> {
        config.validate()?;
        let endpoint = config.endpoint()?;
        let auth = match &config.api_key {
            None => None,
            Some(key) => {
                let value = match config.auth_header {
                    AuthHeader::Bearer => format!("Bearer {}", key.expose()),
                    AuthHeader::ApiKeyHeader => key.expose().to_owned(),
                };
                let mut value = HeaderValue::from_str(&value).map_err(|_| {
                    EmbedError::permanent("the embedding API key is not a valid header value")
                })?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.connect_timeout)
            .user_agent(concat!("tandem/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| EmbedError::Permanent {
                message: "cannot build the HTTP client".into(),
                source: Some(Box::new(e.without_url())),
            })?;
        let place = format!("the embedding server at {}", config.describe_url());
        Ok(Self {
            config,
            endpoint,
            auth,
            client,
            place,
        })
    }

    /// The configuration (its `Debug` hides the key).
    pub fn config(&self) -> &OpenAiConfig {
        &self.config
    }

    fn key(&self) -> Option<&str> {
        self.config.api_key.as_ref().map(ApiKey::expose)
    }

    /// Puts the answer in the texts' order and checks it.
    fn vectors(&self, texts: usize, body: &[u8]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let answer: EmbeddingResponse = serde_json::from_slice(body).map_err(|e| {
            EmbedError::Protocol(ProtocolViolation::Malformed(format!(
                "the answer is not an embeddings list: {}",
                error::clean(&e.to_string(), self.key())
            )))
        })?;
        if answer.data.len() != texts {
            return Err(EmbedError::Protocol(ProtocolViolation::WrongCount {
                expected: texts,
                got: answer.data.len(),
            }));
        }
        let mut slots: Vec<Option<Vec<f32>>> = vec![None; texts];
        for item in answer.data {
            match slots.get_mut(item.index) {
                Some(slot @ None) => *slot = Some(item.embedding),
                Some(Some(_)) => {
                    return Err(EmbedError::Protocol(ProtocolViolation::Malformed(format!(
                        "index {} appears twice in the answer",
                        item.index
                    ))));
                }
                None => {
                    return Err(EmbedError::Protocol(ProtocolViolation::Malformed(format!(
                        "index {} is out of range for {texts} texts",
                        item.index
                    ))));
                }
            }
        }
        // Every slot is filled: `texts` distinct indexes below `texts`.
        let vectors: Vec<Vec<f32>> = slots.into_iter().flatten().collect();
        check_vectors(texts, self.config.dimension, &vectors)?;
        Ok(vectors)
    }
}

#[async_trait]
impl Embedder for OpenAiEmbedder {
    fn dimension(&self) -> usize {
        self.config.dimension
    }

    fn model(&self) -> &str {
        &self.config.model
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let body = serde_json::to_vec(&EmbeddingRequest {
            model: &self.config.model,
            input: texts,
            dimensions: self.config.request_dimensions,
        })
        .map_err(|e| EmbedError::permanent(format!("cannot encode the request: {e}")))?;
        let mut request = self
            .client
            .post(self.endpoint.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(auth) = &self.auth {
            let name = match self.config.auth_header {
                AuthHeader::Bearer => AUTHORIZATION.as_str(),
                AuthHeader::ApiKeyHeader => "api-key",
            };
            request = request.header(name, auth.clone());
        }
        let timeout = self.config.timeout;
        let response = request
            .send()
            .await
            .map_err(|e| error::from_transport(e, timeout, &self.place))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| error::parse_retry_after(v, SystemTime::now()));
        let body = response
            .bytes()
            .await
            .map_err(|e| error::from_transport(e, timeout, &self.place))?;
        if !status.is_success() {
            let says = error::ServerSays::parse(&body, self.key());
            return Err(error::from_status(status.as_u16(), retry_after, says));
        }
        self.vectors(texts.len(), &body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn embedder(dim: usize) -> OpenAiEmbedder {
        OpenAiEmbedder::new(OpenAiConfig::new("http://127.0.0.1:9/v1", "m", dim)).unwrap()
    }

    fn violation(e: EmbedError) -> ProtocolViolation {
        match e {
            EmbedError::Protocol(v) => v,
            other => panic!("expected a protocol error, got {other}"),
        }
    }

    #[test]
    fn answers_are_put_in_index_order_and_checked() {
        let e = embedder(2);
        let body = br#"{"object":"list","data":[
            {"object":"embedding","index":1,"embedding":[0.0,1.0]},
            {"object":"embedding","index":0,"embedding":[1.0,0.0]}],"model":"m"}"#;
        assert_eq!(
            e.vectors(2, body).unwrap(),
            vec![vec![1.0, 0.0], vec![0.0, 1.0]]
        );
        let twice = br#"{"data":[{"index":0,"embedding":[1,0]},{"index":0,"embedding":[0,1]}]}"#;
        assert!(
            matches!(violation(e.vectors(2, twice).unwrap_err()), ProtocolViolation::Malformed(m) if m.contains("twice"))
        );
        let out = br#"{"data":[{"index":5,"embedding":[1,0]}]}"#;
        assert!(
            matches!(violation(e.vectors(1, out).unwrap_err()), ProtocolViolation::Malformed(m) if m.contains("out of range"))
        );
        let short = br#"{"data":[{"index":0,"embedding":[1,0]}]}"#;
        assert_eq!(
            violation(e.vectors(2, short).unwrap_err()),
            ProtocolViolation::WrongCount {
                expected: 2,
                got: 1
            }
        );
        let wide = br#"{"data":[{"index":0,"embedding":[1,0,0]}]}"#;
        assert_eq!(
            violation(e.vectors(1, wide).unwrap_err()),
            ProtocolViolation::WrongDimension {
                index: 0,
                expected: 2,
                got: 3
            }
        );
        // 1e39 does not fit an f32: it reads as infinity.
        let huge = br#"{"data":[{"index":0,"embedding":[1e39,0]}]}"#;
        assert!(matches!(
            violation(e.vectors(1, huge).unwrap_err()),
            ProtocolViolation::NonFinite { .. } | ProtocolViolation::Malformed(_)
        ));
        let nulls = br#"{"data":[{"index":0,"embedding":[null,0]}]}"#;
        assert!(matches!(
            violation(e.vectors(1, nulls).unwrap_err()),
            ProtocolViolation::Malformed(_)
        ));
    }

    #[test]
    fn debug_shows_the_server_and_model_but_not_the_key_or_path() {
        let e = OpenAiEmbedder::new(
            OpenAiConfig::new(
                "https://api.example.com/v1?token=abc",
                "text-embedding-3-small",
                8,
            )
            .with_api_key("sk-very-secret"),
        )
        .unwrap();
        let shown = format!("{e:?}");
        assert!(shown.contains("https://api.example.com"), "{shown}");
        assert!(shown.contains("text-embedding-3-small"), "{shown}");
        assert!(
            !shown.contains("very-secret") && !shown.contains("token=abc"),
            "{shown}"
        );
    }
}
