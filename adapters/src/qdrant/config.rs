//! The Qdrant adapter's configuration.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use tandem_core::{Distance, IndexError};
use tonic::transport::Uri;

/// A secret (the API key) that never shows in `Debug`, logs or errors.
///
/// It has no `Display` and no `Serialize`; the only way to read it is
/// [`Secret::expose`], which the adapter calls once, to hand it to the client.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself. Never log or format what this returns.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self(value.to_owned())
    }
}

/// Qdrant's write ordering: which replica sequences a write in a cluster.
///
/// Tandem relies on a delete never being overtaken by an older write of the same
/// point, so the default is [`WriteOrdering::Strong`]. On a single node the
/// setting makes no difference. See `docs/qdrant.md`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WriteOrdering {
    /// Writes may be reordered between replicas (Qdrant's own default; fastest).
    Weak,
    /// Writes go through a dynamically elected leader; may be inconsistent for a
    /// short time after a leader change.
    Medium,
    /// Writes go through the permanent leader: consistent, but they fail (with a
    /// retryable error) while that leader is down.
    #[default]
    Strong,
}

impl fmt::Display for WriteOrdering {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WriteOrdering::Weak => "weak",
            WriteOrdering::Medium => "medium",
            WriteOrdering::Strong => "strong",
        })
    }
}

impl FromStr for WriteOrdering {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "weak" => Ok(WriteOrdering::Weak),
            "medium" => Ok(WriteOrdering::Medium),
            "strong" => Ok(WriteOrdering::Strong),
            other => Err(format!(
                "unknown write ordering {other:?} (expected weak, medium or strong)"
            )),
        }
    }
}

/// Everything [`QdrantVectorIndex::connect`](super::QdrantVectorIndex::connect)
/// needs. `Debug` shows the API key as `Secret(***)`.
#[derive(Clone, Debug, PartialEq)]
pub struct QdrantConfig {
    /// The gRPC endpoint, `http://host:6334` or `https://host:6334`. TLS is used
    /// exactly when the scheme is `https` (qdrant-client trusts the system's
    /// native root certificates). Credentials in the URL are rejected: use
    /// `api_key`.
    pub url: String,
    /// The API key (or JWT), sent in the `api-key` header of every request.
    pub api_key: Option<Secret>,
    /// Refuse an `http://` URL, so that an API key never travels in clear.
    pub require_tls: bool,
    /// Client-side timeout of one request. Note that qdrant-client re-sends a
    /// request once after a timeout (see `docs/qdrant.md`), so one call may take
    /// up to about twice this. The server-side wait of `wait=true` writes is set
    /// one second shorter, so a slow server answers `WaitTimeout` rather than
    /// being cut off.
    pub timeout: Duration,
    /// Timeout of establishing a connection.
    pub connect_timeout: Duration,
    /// The collection's name.
    pub collection: String,
    /// The vector size the collection must have.
    pub dimension: usize,
    /// The distance function the collection must have.
    pub distance: Distance,
    /// Ordering of writes in a cluster.
    pub write_ordering: WriteOrdering,
    /// Points (or ids) per upsert/delete request.
    pub chunk_size: usize,
    /// Chunk requests of one call in flight at once.
    pub parallel_requests: usize,
}

impl QdrantConfig {
    /// A configuration with the defaults: no API key, 30 s request timeout, 5 s
    /// connect timeout, strong write ordering, chunks of 256 points, 4 in flight.
    pub fn new(
        url: impl Into<String>,
        collection: impl Into<String>,
        dimension: usize,
        distance: Distance,
    ) -> Self {
        Self {
            url: url.into(),
            api_key: None,
            require_tls: false,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            collection: collection.into(),
            dimension,
            distance,
            write_ordering: WriteOrdering::default(),
            chunk_size: 256,
            parallel_requests: 4,
        }
    }

    /// Sets the API key.
    pub fn with_api_key(mut self, key: impl Into<Secret>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// Sets the request timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the write ordering.
    pub fn with_write_ordering(mut self, ordering: WriteOrdering) -> Self {
        self.write_ordering = ordering;
        self
    }

    /// Sets the chunk size and the number of chunk requests in flight.
    pub fn with_chunking(mut self, chunk_size: usize, parallel_requests: usize) -> Self {
        self.chunk_size = chunk_size;
        self.parallel_requests = parallel_requests;
        self
    }

    /// Checks the configuration without contacting the server. Every failure is
    /// an [`IndexError::Config`] whose message names the field and never
    /// contains the API key.
    pub fn validate(&self) -> Result<(), IndexError> {
        let config = |message: String| Err(IndexError::Config { message });
        let uri: Uri = match self.url.parse() {
            Ok(uri) => uri,
            Err(e) => return config(format!("Qdrant URL {:?} is not a valid URL: {e}", self.url)),
        };
        match uri.scheme_str() {
            Some("https") => {}
            Some("http") if !self.require_tls => {}
            Some("http") => {
                return config(format!(
                    "Qdrant URL {} uses http but TLS is required: use https://",
                    self.url
                ));
            }
            _ => {
                return config(format!(
                    "Qdrant URL {:?} must start with http:// or https://",
                    self.url
                ));
            }
        }
        match uri.authority() {
            // Credentials in the URL would be echoed by the client's connection
            // errors; the API key travels in a header instead.
            Some(a) if a.as_str().contains('@') => {
                return config(
                    "Qdrant URL must not contain credentials (user:password@); set the API key instead"
                        .into(),
                );
            }
            Some(a) if !a.host().is_empty() => {}
            _ => return config(format!("Qdrant URL {:?} has no host", self.url)),
        }
        if let Some(key) = &self.api_key {
            // qdrant-client puts a key it cannot send as a header into its error
            // message verbatim; refuse such keys here, without echoing them.
            let printable = key.expose().bytes().all(|b| (0x20..0x7f).contains(&b));
            if key.expose().is_empty() || !printable {
                return config(
                    "the Qdrant API key must be non-empty printable ASCII (it is sent as a header)"
                        .into(),
                );
            }
        }
        let name = &self.collection;
        if name.is_empty() || name.len() > 255 || name.contains(['/', '\\', '\0']) {
            return config(format!(
                "collection name {name:?} is invalid: 1 to 255 bytes, without '/', '\\' or NUL"
            ));
        }
        if self.dimension == 0 {
            return config("the vector dimension must be positive".into());
        }
        if self.chunk_size == 0 || self.parallel_requests == 0 {
            return config("chunk_size and parallel_requests must be positive".into());
        }
        if self.timeout.is_zero() || self.connect_timeout.is_zero() {
            return config("timeout and connect_timeout must be positive".into());
        }
        Ok(())
    }

    /// The server-side wait of `wait=true` writes, in whole seconds: one second
    /// below the client timeout, at least one.
    pub(crate) fn server_wait_secs(&self) -> u64 {
        self.timeout.as_secs().saturating_sub(1).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> QdrantConfig {
        QdrantConfig::new("http://127.0.0.1:6334", "records", 4, Distance::Cosine)
    }

    fn config_message(c: &QdrantConfig) -> String {
        match c.validate() {
            Err(IndexError::Config { message }) => message,
            other => panic!("expected a Config error, got {other:?}"),
        }
    }

    #[test]
    fn debug_never_shows_the_api_key() {
        let c = base().with_api_key("s3cr3t-key-value");
        let shown = format!("{c:?} {:?}", c.api_key);
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("Secret(***)"), "{shown}");
        assert_eq!(c.api_key.as_ref().unwrap().expose(), "s3cr3t-key-value");
    }

    #[test]
    fn defaults_are_valid() {
        base().validate().unwrap();
        base()
            .with_api_key("k")
            .with_timeout(Duration::from_secs(2))
            .validate()
            .unwrap();
    }

    #[test]
    fn bad_urls_are_rejected_with_a_clear_message() {
        let mut c = base();
        c.url = "localhost:6334".into();
        assert!(config_message(&c).contains("http://"));
        c.url = "ftp://host:1".into();
        assert!(config_message(&c).contains("http://"));
        c.url = "http://user:pw@host:6334".into();
        let m = config_message(&c);
        assert!(m.contains("credentials") && !m.contains("pw"), "{m}");
        c.url = "http://host:6334".into();
        c.require_tls = true;
        assert!(config_message(&c).contains("TLS"));
        c.url = "https://host:6334".into();
        c.validate().unwrap();
    }

    #[test]
    fn unprintable_api_key_is_rejected_without_echoing_it() {
        let c = base().with_api_key("bad\nkey-xyz");
        let m = config_message(&c);
        assert!(!m.contains("key-xyz"), "{m}");
        assert!(config_message(&base().with_api_key("")).contains("API key"));
    }

    #[test]
    fn limits_and_names_are_checked() {
        let mut c = base();
        c.dimension = 0;
        assert!(config_message(&c).contains("dimension"));
        let c = base().with_chunking(0, 1);
        assert!(config_message(&c).contains("chunk_size"));
        let mut c = base();
        c.collection = "a/b".into();
        assert!(config_message(&c).contains("collection name"));
    }

    #[test]
    fn server_wait_is_below_the_client_timeout() {
        assert_eq!(base().server_wait_secs(), 29);
        assert_eq!(
            base()
                .with_timeout(Duration::from_millis(1500))
                .server_wait_secs(),
            1
        );
    }

    #[test]
    fn write_ordering_parses() {
        assert_eq!("Strong".parse::<WriteOrdering>(), Ok(WriteOrdering::Strong));
        assert_eq!("weak".parse::<WriteOrdering>(), Ok(WriteOrdering::Weak));
        assert!("eventual".parse::<WriteOrdering>().is_err());
        assert_eq!(WriteOrdering::default(), WriteOrdering::Strong);
    }
}
