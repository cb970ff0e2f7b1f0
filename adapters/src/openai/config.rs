//! The OpenAI-compatible adapter's configuration.

use std::fmt;
use std::time::Duration;

use tandem_core::EmbedError;
use url::Url;

/// An API key that never shows in `Debug`, logs or errors.
///
/// It has no `Display` and no `Serialize`; the only way to read it is
/// [`ApiKey::expose`], which the adapter calls to build the request header.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The key itself. Never log or format what this returns.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

impl From<String> for ApiKey {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for ApiKey {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

/// How the API key is sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AuthHeader {
    /// `Authorization: Bearer KEY` (OpenAI, vLLM, llama.cpp, LM Studio, TEI,
    /// Ollama, Azure OpenAI's v1 API).
    #[default]
    Bearer,
    /// `api-key: KEY` (Azure OpenAI's deployment API).
    ApiKeyHeader,
}

/// Where and how to reach an OpenAI-compatible `/embeddings` endpoint.
/// `Debug` shows the API key as `ApiKey(***)`.
#[derive(Clone, Debug, PartialEq)]
pub struct OpenAiConfig {
    /// The API's base URL, to which `/embeddings` is appended (a query string,
    /// such as Azure's `?api-version=…`, is kept): `https://api.openai.com/v1`,
    /// `http://localhost:11434/v1` (Ollama), `http://localhost:8000/v1` (vLLM).
    pub base_url: String,
    /// The model (or Azure deployment) name sent in each request.
    pub model: String,
    /// The dimension every returned vector must have: the collection's.
    pub dimension: usize,
    /// Sent as the request's `dimensions` parameter (models that can shorten
    /// their vectors, such as `text-embedding-3-*`). When set it must equal
    /// `dimension`. Unset: not sent, and the model's own dimension must be
    /// `dimension`.
    pub request_dimensions: Option<usize>,
    /// The API key, if the server wants one.
    pub api_key: Option<ApiKey>,
    /// How the key is sent.
    pub auth_header: AuthHeader,
    /// Time limit of one request, from sending to the whole answer read.
    pub timeout: Duration,
    /// Time limit of establishing a connection.
    pub connect_timeout: Duration,
}

impl OpenAiConfig {
    /// The default request timeout (a large batch on a CPU-only server is slow).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
    /// The default connect timeout.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

    /// A configuration with no key, no `dimensions` parameter and the default
    /// timeouts.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>, dimension: usize) -> Self {
        Self {
            base_url: base_url.into(),
            model: model.into(),
            dimension,
            request_dimensions: None,
            api_key: None,
            auth_header: AuthHeader::default(),
            timeout: Self::DEFAULT_TIMEOUT,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
        }
    }

    /// Sends this key.
    pub fn with_api_key(mut self, key: impl Into<ApiKey>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// Sends the key in this header.
    pub fn with_auth_header(mut self, header: AuthHeader) -> Self {
        self.auth_header = header;
        self
    }

    /// Sends `dimensions: n` in each request.
    pub fn with_request_dimensions(mut self, n: usize) -> Self {
        self.request_dimensions = Some(n);
        self
    }

    /// The request timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The connect timeout.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The endpoint: the base URL with `/embeddings` appended to its path.
    /// A configuration error ([`EmbedError::Permanent`]) names what is wrong,
    /// never the key.
    pub fn endpoint(&self) -> Result<Url, EmbedError> {
        let mut url = Url::parse(self.base_url.trim()).map_err(|e| {
            EmbedError::permanent(format!("the embedding base URL is not a URL: {e}"))
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(EmbedError::permanent(format!(
                "the embedding base URL must be http:// or https://, not {}://",
                url.scheme()
            )));
        }
        if url.cannot_be_a_base() || url.host_str().is_none() {
            return Err(EmbedError::permanent(
                "the embedding base URL has no host".to_owned(),
            ));
        }
        let path = format!("{}/embeddings", url.path().trim_end_matches('/'));
        url.set_path(&path);
        Ok(url)
    }

    /// Checks the configuration: a usable URL, a model, a positive dimension,
    /// a `dimensions` parameter equal to it, a printable key, positive timeouts.
    pub fn validate(&self) -> Result<(), EmbedError> {
        self.endpoint()?;
        if self.model.trim().is_empty() {
            return Err(EmbedError::permanent("the embedding model is not named"));
        }
        if self.dimension == 0 {
            return Err(EmbedError::permanent(
                "the embedding dimension must be positive",
            ));
        }
        if let Some(n) = self.request_dimensions
            && n != self.dimension
        {
            return Err(EmbedError::permanent(format!(
                "the requested embedding dimensions ({n}) differ from the collection's \
                 dimension ({})",
                self.dimension
            )));
        }
        if let Some(key) = &self.api_key {
            let k = key.expose();
            if k.is_empty() || k.chars().any(|c| c.is_control() || c == ' ') {
                return Err(EmbedError::permanent(
                    "the embedding API key is empty or holds spaces or control characters",
                ));
            }
        }
        if self.timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(EmbedError::permanent(
                "the embedding timeouts must be positive",
            ));
        }
        Ok(())
    }

    /// The URL for people: scheme, host and port only (a path or query could
    /// carry a deployment's secrets).
    pub fn describe_url(&self) -> String {
        match Url::parse(self.base_url.trim()) {
            Ok(u) => format!(
                "{}://{}{}",
                u.scheme(),
                u.host_str().unwrap_or("?"),
                u.port().map(|p| format!(":{p}")).unwrap_or_default()
            ),
            Err(_) => "the configured embedding server".to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(e: EmbedError) -> String {
        e.to_string()
    }

    #[test]
    fn the_endpoint_appends_embeddings_and_keeps_the_query() {
        let c = OpenAiConfig::new("http://localhost:11434/v1/", "m", 4);
        assert_eq!(
            c.endpoint().unwrap().as_str(),
            "http://localhost:11434/v1/embeddings"
        );
        let azure = OpenAiConfig::new(
            "https://r.openai.azure.com/openai/deployments/emb?api-version=2024-02-01",
            "emb",
            4,
        );
        assert_eq!(
            azure.endpoint().unwrap().as_str(),
            "https://r.openai.azure.com/openai/deployments/emb/embeddings?api-version=2024-02-01"
        );
        assert_eq!(azure.describe_url(), "https://r.openai.azure.com");
    }

    #[test]
    fn bad_configurations_say_what_is_wrong() {
        let base = || OpenAiConfig::new("http://127.0.0.1:1/v1", "m", 4);
        assert!(base().validate().is_ok());
        let m = message(
            OpenAiConfig::new("localhost:11434", "m", 4)
                .validate()
                .unwrap_err(),
        );
        assert!(m.contains("http://"), "{m}");
        let m = message(
            OpenAiConfig::new("not a url", "m", 4)
                .validate()
                .unwrap_err(),
        );
        assert!(m.contains("not a URL"), "{m}");
        let m = message(
            OpenAiConfig::new("http://h/v1", " ", 4)
                .validate()
                .unwrap_err(),
        );
        assert!(m.contains("model"), "{m}");
        let m = message(base().with_request_dimensions(8).validate().unwrap_err());
        assert!(m.contains("(8)") && m.contains("(4)"), "{m}");
        let m = message(
            base()
                .with_api_key("bad key-with-space")
                .validate()
                .unwrap_err(),
        );
        assert!(m.contains("API key") && !m.contains("bad key"), "{m}");
    }

    #[test]
    fn debug_never_shows_the_api_key() {
        let c = OpenAiConfig::new("http://h/v1", "m", 4).with_api_key("sk-s3cr3t-value");
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("ApiKey(***)"), "{shown}");
    }
}
