//! The Qdrant adapter's configuration.

use std::collections::BTreeMap;
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
/// The default is [`WriteOrdering::Medium`]: every write of a shard goes
/// through one replica (the highest *alive* one), which applies writes one at
/// a time and sends each to every replica, so a delete is never overtaken by
/// an acknowledged write of the same point; and when that replica dies,
/// another takes over and writes go on. [`WriteOrdering::Strong`] keeps one
/// permanent sequencer, so its writes fail until that node is back. Tandem
/// writes every point once and deletes it once (copy-on-write ids), which is
/// why `Medium` keeps every invariant; the argument, and the one narrow window
/// it leaves to recovery and `verify`, are in `docs/qdrant.md` (*Write
/// ordering and availability*). On a single node the setting makes no
/// difference.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WriteOrdering {
    /// Writes are sequenced by the node that receives them, without the
    /// per-shard write lock: concurrent writes may reach replicas in different
    /// orders (Qdrant's own default; fastest).
    Weak,
    /// Writes go through the highest alive replica of the shard, one at a
    /// time; when it dies the next one takes over (a short window around the
    /// change may order writes differently). Survives the loss of a replica.
    #[default]
    Medium,
    /// Writes go through the permanent leader (the highest replica, alive or
    /// not): one order always, but they fail (with a retryable error) while
    /// that leader is down.
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

/// The type of a payload index (Qdrant's field types, by Qdrant's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PayloadFieldType {
    /// Exact string matches (what Tandem's metadata filters on strings use).
    Keyword,
    /// Integer matches and ranges (metadata filters on integers).
    Integer,
    /// Float ranges.
    Float,
    /// Boolean matches (metadata filters on booleans).
    Bool,
    /// Geo points (`{"lon": .., "lat": ..}`).
    Geo,
    /// Full-text matches.
    Text,
    /// RFC 3339 date-times.
    Datetime,
    /// UUID strings.
    Uuid,
}

impl PayloadFieldType {
    /// Every type, in the order the docs list them.
    pub const ALL: [PayloadFieldType; 8] = [
        PayloadFieldType::Keyword,
        PayloadFieldType::Integer,
        PayloadFieldType::Float,
        PayloadFieldType::Bool,
        PayloadFieldType::Geo,
        PayloadFieldType::Text,
        PayloadFieldType::Datetime,
        PayloadFieldType::Uuid,
    ];

    /// Qdrant's name of the type (`keyword`, `integer`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            PayloadFieldType::Keyword => "keyword",
            PayloadFieldType::Integer => "integer",
            PayloadFieldType::Float => "float",
            PayloadFieldType::Bool => "bool",
            PayloadFieldType::Geo => "geo",
            PayloadFieldType::Text => "text",
            PayloadFieldType::Datetime => "datetime",
            PayloadFieldType::Uuid => "uuid",
        }
    }
}

impl fmt::Display for PayloadFieldType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PayloadFieldType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        PayloadFieldType::ALL
            .into_iter()
            .find(|t| t.as_str() == lower)
            .ok_or_else(|| {
                format!(
                    "unknown payload index type {s:?} (expected keyword, integer, float, bool, \
                     geo, text, datetime or uuid)"
                )
            })
    }
}

/// Vector quantization of the collection (Qdrant's `quantization_config`).
///
/// As text (flags, the config file): `none`, `binary`, `scalar`, optionally
/// followed by `:` and comma-separated options, e.g.
/// `scalar:quantile=0.99,always_ram=true` or `binary:always_ram=true`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Quantization {
    /// No quantization: searches use the original vectors only.
    None,
    /// Scalar quantization to `int8` (4× smaller).
    Scalar {
        /// Quantile of the values the int8 range covers, in `[0.5, 1]`;
        /// unset: the whole range (Qdrant's default).
        quantile: Option<f32>,
        /// Keep the quantized vectors in RAM even when the originals are on disk.
        always_ram: Option<bool>,
    },
    /// Binary quantization (1 bit per dimension, 32× smaller).
    Binary {
        /// Keep the quantized vectors in RAM even when the originals are on disk.
        always_ram: Option<bool>,
    },
}

impl Quantization {
    /// The kind: `none`, `scalar` or `binary` (what a mismatch is checked on).
    pub fn kind(&self) -> &'static str {
        match self {
            Quantization::None => "none",
            Quantization::Scalar { .. } => "scalar",
            Quantization::Binary { .. } => "binary",
        }
    }

    /// Scalar (int8) quantization with Qdrant's defaults.
    pub fn scalar() -> Self {
        Quantization::Scalar {
            quantile: None,
            always_ram: None,
        }
    }

    /// Binary quantization with Qdrant's defaults.
    pub fn binary() -> Self {
        Quantization::Binary { always_ram: None }
    }
}

impl fmt::Display for Quantization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut options = Vec::new();
        match self {
            Quantization::None => {}
            Quantization::Scalar {
                quantile,
                always_ram,
            } => {
                if let Some(q) = quantile {
                    options.push(format!("quantile={q}"));
                }
                if let Some(r) = always_ram {
                    options.push(format!("always_ram={r}"));
                }
            }
            Quantization::Binary { always_ram } => {
                if let Some(r) = always_ram {
                    options.push(format!("always_ram={r}"));
                }
            }
        }
        f.write_str(self.kind())?;
        if !options.is_empty() {
            write!(f, ":{}", options.join(","))?;
        }
        Ok(())
    }
}

impl FromStr for Quantization {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, options) = match s.split_once(':') {
            Some((kind, options)) => (kind, Some(options)),
            None => (s, None),
        };
        let mut quantile = None;
        let mut always_ram = None;
        for option in options.into_iter().flat_map(|o| o.split(',')) {
            let (key, value) = option
                .split_once('=')
                .ok_or_else(|| format!("quantization option {option:?} must be key=value"))?;
            match key.trim() {
                "quantile" => {
                    let q: f32 = value
                        .trim()
                        .parse()
                        .map_err(|_| format!("quantization quantile {value:?} is not a number"))?;
                    quantile = Some(q);
                }
                "always_ram" => {
                    let r: bool = value.trim().parse().map_err(|_| {
                        format!("quantization always_ram {value:?} must be true or false")
                    })?;
                    always_ram = Some(r);
                }
                other => {
                    return Err(format!(
                        "unknown quantization option {other:?} (expected quantile or always_ram)"
                    ));
                }
            }
        }
        match kind.trim().to_ascii_lowercase().as_str() {
            "none" if options.is_none() => Ok(Quantization::None),
            "none" => Err("quantization none takes no options".into()),
            "scalar" => Ok(Quantization::Scalar {
                quantile,
                always_ram,
            }),
            "binary" if quantile.is_some() => {
                Err("binary quantization takes no quantile (only always_ram)".into())
            }
            "binary" => Ok(Quantization::Binary { always_ram }),
            other => Err(format!(
                "unknown quantization {other:?} (expected none, scalar or binary)"
            )),
        }
    }
}

/// How the collection is laid out on the Qdrant server, named as Qdrant names
/// the settings. Every field is optional: unset means Qdrant's own default at
/// creation, and no check of an existing collection.
///
/// [`QdrantVectorIndex::connect`](super::QdrantVectorIndex::connect) creates a
/// missing collection with them and checks an existing one: a difference in
/// `shard_number`, `replication_factor` or the quantization kind is an
/// [`IndexError::Config`]; a difference in the other settings is logged as a
/// warning; a missing payload index is created. See `docs/qdrant.md`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CollectionSettings {
    /// Shards of the collection (Qdrant's default: 1 on a single node, the
    /// number of nodes in a cluster). At least 1.
    pub shard_number: Option<u32>,
    /// Copies of each shard in a cluster (Qdrant's default: 1). At least 1.
    pub replication_factor: Option<u32>,
    /// Replicas that must apply a write before it succeeds (Qdrant's default:
    /// 1). At least 1, at most `replication_factor`.
    pub write_consistency_factor: Option<u32>,
    /// Serve the original vectors from disk (memory-mapped) instead of RAM
    /// (Qdrant's default: `false`).
    pub on_disk: Option<bool>,
    /// Keep payloads on disk instead of RAM (Qdrant's default: `true`).
    pub on_disk_payload: Option<bool>,
    /// HNSW graph edges per node (Qdrant's default: 16). `0` builds no graph:
    /// every search is a full scan (Qdrant's advice for bulk loading).
    pub hnsw_m: Option<u64>,
    /// HNSW neighbours considered while building (Qdrant's default: 100). At
    /// least 4.
    pub hnsw_ef_construct: Option<u64>,
    /// Vector quantization (Qdrant's default: none).
    pub quantization: Option<Quantization>,
    /// Payload indexes on metadata keys: the key (as in a metadata filter, a
    /// top-level key of a record's metadata) and the index type. The index is
    /// on the payload path `metadata.<key>`, where the adapter stores it.
    pub payload_indexes: BTreeMap<String, PayloadFieldType>,
}

impl CollectionSettings {
    /// No settings: Qdrant's defaults, nothing checked.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `shard_number`.
    pub fn with_shard_number(mut self, n: u32) -> Self {
        self.shard_number = Some(n);
        self
    }

    /// Sets `replication_factor`.
    pub fn with_replication_factor(mut self, n: u32) -> Self {
        self.replication_factor = Some(n);
        self
    }

    /// Sets `write_consistency_factor`.
    pub fn with_write_consistency_factor(mut self, n: u32) -> Self {
        self.write_consistency_factor = Some(n);
        self
    }

    /// Sets `on_disk` (vectors on disk).
    pub fn with_on_disk(mut self, on_disk: bool) -> Self {
        self.on_disk = Some(on_disk);
        self
    }

    /// Sets `on_disk_payload`.
    pub fn with_on_disk_payload(mut self, on_disk: bool) -> Self {
        self.on_disk_payload = Some(on_disk);
        self
    }

    /// Sets `hnsw_m`.
    pub fn with_hnsw_m(mut self, m: u64) -> Self {
        self.hnsw_m = Some(m);
        self
    }

    /// Sets `hnsw_ef_construct`.
    pub fn with_hnsw_ef_construct(mut self, ef: u64) -> Self {
        self.hnsw_ef_construct = Some(ef);
        self
    }

    /// Sets `quantization`.
    pub fn with_quantization(mut self, quantization: Quantization) -> Self {
        self.quantization = Some(quantization);
        self
    }

    /// Adds a payload index on the metadata key `key` (replacing an earlier
    /// one on the same key).
    pub fn with_payload_index(mut self, key: impl Into<String>, kind: PayloadFieldType) -> Self {
        self.payload_indexes.insert(key.into(), kind);
        self
    }

    /// Checks the settings as Qdrant would, before anything is sent. Every
    /// failure is an [`IndexError::Config`] naming the setting.
    pub fn validate(&self) -> Result<(), IndexError> {
        let config = |setting: &str, message: String| {
            Err(IndexError::Config {
                message: format!("Qdrant collection setting `{setting}`: {message}"),
            })
        };
        for (setting, value) in [
            ("shard_number", self.shard_number),
            ("replication_factor", self.replication_factor),
            ("write_consistency_factor", self.write_consistency_factor),
        ] {
            if value == Some(0) {
                return config(setting, "must be at least 1, not 0".into());
            }
        }
        if let Some(w) = self.write_consistency_factor {
            let (r, whose) = match self.replication_factor {
                Some(r) => (r, "replication_factor"),
                None => (1, "replication_factor (unset: Qdrant's default, 1)"),
            };
            if w > r {
                return config(
                    "write_consistency_factor",
                    format!("{w} exceeds {whose} {r}: a write would need more replicas than exist"),
                );
            }
        }
        if let Some(ef) = self.hnsw_ef_construct
            && ef < 4
        {
            return config("hnsw_ef_construct", format!("must be at least 4, not {ef}"));
        }
        if let Some(Quantization::Scalar {
            quantile: Some(q), ..
        }) = self.quantization
            && !(0.5..=1.0).contains(&q)
        {
            return config(
                "quantization",
                format!("the scalar quantile must be in [0.5, 1], not {q}"),
            );
        }
        for key in self.payload_indexes.keys() {
            // The same paths as metadata filters, which refuse the same keys.
            if super::convert::metadata_path(key).is_err() {
                return config(
                    "payload_indexes",
                    format!("metadata key {key:?} must be non-empty and must not contain '\"'"),
                );
            }
        }
        Ok(())
    }

    /// Whether every setting is unset.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
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
    /// How the collection is created, and what an existing one is checked
    /// against (all unset by default: Qdrant's defaults, nothing checked).
    pub collection_settings: CollectionSettings,
}

impl QdrantConfig {
    /// A configuration with the defaults: no API key, 30 s request timeout, 5 s
    /// connect timeout, medium write ordering, chunks of 256 points, 4 in flight.
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
            collection_settings: CollectionSettings::default(),
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

    /// Sets the collection settings.
    pub fn with_collection_settings(mut self, settings: CollectionSettings) -> Self {
        self.collection_settings = settings;
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
        self.collection_settings.validate()
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
        assert_eq!(WriteOrdering::default(), WriteOrdering::Medium);
    }

    fn settings_message(s: CollectionSettings) -> String {
        config_message(&base().with_collection_settings(s))
    }

    #[test]
    fn collection_settings_default_to_unset_and_valid() {
        let c = base();
        assert!(c.collection_settings.is_default());
        c.validate().unwrap();
        let full = CollectionSettings::new()
            .with_shard_number(3)
            .with_replication_factor(2)
            .with_write_consistency_factor(2)
            .with_on_disk(true)
            .with_on_disk_payload(false)
            .with_hnsw_m(0)
            .with_hnsw_ef_construct(4)
            .with_quantization(Quantization::Scalar {
                quantile: Some(0.5),
                always_ram: Some(true),
            })
            .with_payload_index("item", PayloadFieldType::Keyword)
            .with_payload_index("a.b c", PayloadFieldType::Integer);
        assert!(!full.is_default());
        base().with_collection_settings(full).validate().unwrap();
    }

    #[test]
    fn collection_settings_are_validated_naming_the_setting() {
        let zero = |s: CollectionSettings, name: &str| {
            let m = settings_message(s);
            assert!(
                m.contains(&format!("`{name}`")) && m.contains("at least 1"),
                "{m}"
            );
        };
        zero(
            CollectionSettings::new().with_shard_number(0),
            "shard_number",
        );
        zero(
            CollectionSettings::new().with_replication_factor(0),
            "replication_factor",
        );
        zero(
            CollectionSettings::new().with_write_consistency_factor(0),
            "write_consistency_factor",
        );

        let m = settings_message(
            CollectionSettings::new()
                .with_replication_factor(2)
                .with_write_consistency_factor(3),
        );
        assert!(
            m.contains("`write_consistency_factor`")
                && m.contains("3 exceeds replication_factor 2"),
            "{m}"
        );
        // Unset replication factor is Qdrant's 1.
        let m = settings_message(CollectionSettings::new().with_write_consistency_factor(2));
        assert!(m.contains("Qdrant's default, 1"), "{m}");
        CollectionSettings::new()
            .with_replication_factor(3)
            .with_write_consistency_factor(3)
            .validate()
            .unwrap();

        let m = settings_message(CollectionSettings::new().with_hnsw_ef_construct(3));
        assert!(
            m.contains("`hnsw_ef_construct`") && m.contains("at least 4"),
            "{m}"
        );

        for q in [0.49, 1.01, f32::NAN] {
            let m = settings_message(CollectionSettings::new().with_quantization(
                Quantization::Scalar {
                    quantile: Some(q),
                    always_ram: None,
                },
            ));
            assert!(
                m.contains("`quantization`") && m.contains("[0.5, 1]"),
                "{q}: {m}"
            );
        }
        for key in ["", "a\"b"] {
            let m = settings_message(
                CollectionSettings::new().with_payload_index(key, PayloadFieldType::Bool),
            );
            assert!(m.contains("`payload_indexes`"), "{m}");
        }
    }

    #[test]
    fn quantization_parses_and_displays() {
        assert_eq!("none".parse::<Quantization>(), Ok(Quantization::None));
        assert_eq!("Scalar".parse::<Quantization>(), Ok(Quantization::scalar()));
        assert_eq!("binary".parse::<Quantization>(), Ok(Quantization::binary()));
        let q: Quantization = "scalar:quantile=0.99,always_ram=true".parse().unwrap();
        assert_eq!(
            q,
            Quantization::Scalar {
                quantile: Some(0.99),
                always_ram: Some(true)
            }
        );
        assert_eq!(q.to_string(), "scalar:quantile=0.99,always_ram=true");
        assert_eq!(q.to_string().parse::<Quantization>(), Ok(q));
        let b: Quantization = "binary:always_ram=false".parse().unwrap();
        assert_eq!(
            b,
            Quantization::Binary {
                always_ram: Some(false)
            }
        );
        assert_eq!(b.to_string(), "binary:always_ram=false");
        assert_eq!(Quantization::None.to_string(), "none");
        for bad in [
            "product",
            "scalar:quantile",
            "scalar:quantile=x",
            "scalar:always_ram=yes",
            "scalar:bits=8",
            "binary:quantile=0.9",
            "none:always_ram=true",
        ] {
            assert!(bad.parse::<Quantization>().is_err(), "{bad}");
        }
    }

    #[test]
    fn payload_field_types_parse_by_qdrants_names() {
        for t in PayloadFieldType::ALL {
            assert_eq!(t.as_str().parse::<PayloadFieldType>(), Ok(t));
            assert_eq!(t.to_string(), t.as_str());
        }
        assert_eq!(
            "KEYWORD".parse::<PayloadFieldType>(),
            Ok(PayloadFieldType::Keyword)
        );
        let err = "string".parse::<PayloadFieldType>().unwrap_err();
        assert!(err.contains("keyword"), "{err}");
    }
}
