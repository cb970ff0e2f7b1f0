//! The data model shared by the coordinator, the ports and every backend.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

macro_rules! uuid_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A new random (v4) id.
            pub fn new_random() -> Self {
                Self(Uuid::new_v4())
            }
            /// A new time-ordered (v7) id.
            pub fn new_v7() -> Self {
                Self(Uuid::now_v7())
            }
            /// The underlying UUID.
            pub fn as_uuid(&self) -> &Uuid {
                &self.0
            }
        }

        impl From<Uuid> for $name {
            fn from(u: Uuid) -> Self {
                Self(u)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

uuid_newtype!(
    /// A record's identity, chosen by the caller or generated as a UUIDv7.
    RecordId
);
uuid_newtype!(
    /// A point's identity in the vector index. Every version of a record gets a
    /// fresh point id (copy-on-write); a point is never overwritten in place.
    PointId
);
uuid_newtype!(
    /// The identity of a write-ahead intent.
    IntentId
);
uuid_newtype!(
    /// The lease owner token that fences an intent: only the holder may commit it.
    OwnerToken
);
uuid_newtype!(
    /// The identity of a saga (a journaled multi-step operation).
    SagaId
);

/// The partition every record belongs to (a catalog, a tenant, ...): counting,
/// deleting and verifying work per scope.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Scope(String);

impl Scope {
    /// Wraps a scope name. Validation (non-empty, length) happens in the coordinator.
    pub fn new(name: impl Into<String>) -> Self {
        Self(name.into())
    }
    /// The scope's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scope({:?})", self.0)
    }
}

impl From<&str> for Scope {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl From<String> for Scope {
    fn from(s: String) -> Self {
        Self(s)
    }
}

/// A JSON object of metadata.
pub type Metadata = Map<String, Value>;

/// A record as a caller submits it for writing. `id: None` asks for a fresh UUIDv7.
///
/// `metadata` is a [`Value`] so that a non-object can be rejected with a typed error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewRecord {
    /// The record's id; generated (UUIDv7) when absent.
    #[serde(default)]
    pub id: Option<RecordId>,
    /// The record's scope (must be non-empty).
    pub scope: Scope,
    /// The record's text content.
    #[serde(default)]
    pub content: String,
    /// The record's metadata: must be a JSON object.
    #[serde(default = "empty_object")]
    pub metadata: Value,
    /// The record's embedding; its length must equal the index's dimension.
    pub vector: Vec<f32>,
}

fn empty_object() -> Value {
    Value::Object(Map::new())
}

impl NewRecord {
    /// A record with the given scope, content and vector, no id and empty metadata.
    pub fn new(scope: impl Into<Scope>, content: impl Into<String>, vector: Vec<f32>) -> Self {
        Self {
            id: None,
            scope: scope.into(),
            content: content.into(),
            metadata: empty_object(),
            vector,
        }
    }
    /// Sets the record's id.
    pub fn with_id(mut self, id: RecordId) -> Self {
        self.id = Some(id);
        self
    }
    /// Sets the record's metadata.
    pub fn with_metadata(mut self, metadata: Value) -> Self {
        self.metadata = metadata;
        self
    }
}

/// A validated row the coordinator asks the metadata store to write: the record
/// with its id decided and the fresh point id its vector was written under.
#[derive(Clone, Debug, PartialEq)]
pub struct RowWrite {
    /// The record id.
    pub id: RecordId,
    /// The record's scope.
    pub scope: Scope,
    /// Text content.
    pub content: String,
    /// Metadata object.
    pub metadata: Metadata,
    /// The point id the row will reference after the commit.
    pub point_id: PointId,
    /// The vector, which a store may keep so that `repair` can rewrite lost points.
    pub vector: Vec<f32>,
}

/// A committed row as the metadata store holds it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StoredRecord {
    /// The record id.
    pub id: RecordId,
    /// The record's scope.
    pub scope: Scope,
    /// Text content.
    pub content: String,
    /// Metadata object.
    pub metadata: Metadata,
    /// The one point the row references.
    pub point_id: PointId,
    /// Bumped by every committed write, starting at 1.
    pub version: u64,
    /// The vector, when the store keeps vectors (see the store's configuration).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vector: Option<Vec<f32>>,
}

/// A point as written to the vector index.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    /// The point id.
    pub id: PointId,
    /// The record it was written for.
    pub record_id: RecordId,
    /// The record's scope (indexed, for filtering and counting).
    pub scope: Scope,
    /// The record's metadata (for filtering by key = value).
    pub metadata: Metadata,
    /// The vector.
    pub vector: Vec<f32>,
    /// When the point was written (milliseconds since the Unix epoch): `repair`
    /// only deletes orphans older than its watermark.
    pub written_at_ms: i64,
}

/// What the index tells about a point when listing (no vector).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PointInfo {
    /// The point id.
    pub id: PointId,
    /// The record the point was written for.
    pub record_id: RecordId,
    /// The record's scope.
    pub scope: Scope,
    /// When the point was written (milliseconds since the Unix epoch).
    pub written_at_ms: i64,
}

/// A hit from the vector index, before the read guard.
#[derive(Clone, Debug, PartialEq)]
pub struct ScoredPoint {
    /// The point id.
    pub id: PointId,
    /// The record the point was written for.
    pub record_id: RecordId,
    /// The similarity score (higher is better for cosine and dot; for euclid the
    /// index returns the negated distance so that higher is still better).
    pub score: f32,
}

/// A guarded search result: a committed, current record with its score.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SearchHit {
    /// The record as committed, without its vector (`vector` is `None`; read
    /// it with `get` when needed).
    pub record: StoredRecord,
    /// The similarity score.
    pub score: f32,
}

/// The distance function of a collection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Distance {
    /// Cosine similarity.
    #[default]
    Cosine,
    /// Dot product.
    Dot,
    /// Euclidean distance.
    Euclid,
}

impl fmt::Display for Distance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Distance::Cosine => "cosine",
            Distance::Dot => "dot",
            Distance::Euclid => "euclid",
        })
    }
}

impl std::str::FromStr for Distance {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "cosine" => Ok(Distance::Cosine),
            "dot" => Ok(Distance::Dot),
            "euclid" | "euclidean" => Ok(Distance::Euclid),
            other => Err(format!(
                "unknown distance {other:?} (expected cosine, dot or euclid)"
            )),
        }
    }
}

/// A filter on scope and metadata equality, shared by search and delete.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Filter {
    /// Only this scope.
    pub scope: Option<Scope>,
    /// Only records whose metadata has each `key = value` (top-level keys).
    pub metadata_eq: BTreeMap<String, Value>,
}

impl Filter {
    /// No filter.
    pub fn none() -> Self {
        Self::default()
    }
    /// Only the given scope.
    pub fn scope(scope: impl Into<Scope>) -> Self {
        Self {
            scope: Some(scope.into()),
            metadata_eq: BTreeMap::new(),
        }
    }
    /// Adds a `key = value` condition.
    pub fn with_eq(mut self, key: impl Into<String>, value: Value) -> Self {
        self.metadata_eq.insert(key.into(), value);
        self
    }
    /// Whether a record with this scope and metadata passes the filter.
    pub fn matches(&self, scope: &Scope, metadata: &Metadata) -> bool {
        self.scope.as_ref().is_none_or(|s| s == scope)
            && self
                .metadata_eq
                .iter()
                .all(|(k, v)| metadata.get(k) == Some(v))
    }
}

/// Which records a delete removes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeleteSelector {
    /// These ids (missing ids are ignored).
    Ids(Vec<RecordId>),
    /// Every record of the scope.
    Scope(Scope),
    /// Every record of the scope whose metadata has `key = value`
    /// ("delete all embeddings of a rejected item").
    MetadataEq {
        /// The scope.
        scope: Scope,
        /// Top-level metadata key.
        key: String,
        /// The value it must equal.
        value: Value,
    },
}

impl DeleteSelector {
    /// Whether a stored record is selected.
    pub fn matches(&self, record: &StoredRecord) -> bool {
        match self {
            DeleteSelector::Ids(ids) => ids.contains(&record.id),
            DeleteSelector::Scope(s) => &record.scope == s,
            DeleteSelector::MetadataEq { scope, key, value } => {
                &record.scope == scope && record.metadata.get(key) == Some(value)
            }
        }
    }
}

/// What kind of write an intent belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntentKind {
    /// An upsert batch.
    Upsert,
    /// A delete.
    Delete,
    /// A repair rewriting missing points.
    Repair,
    /// A [`Transaction`](crate::Transaction) of several parts (or with a
    /// caller step, or a saga step's, or a saga compensation's restore).
    Transaction,
    /// An index worker's batch: new points for records written in deferred
    /// mode, switched in by [`CommitPart::Index`].
    Index,
}

impl IntentKind {
    /// Stable name for storage.
    pub fn as_str(&self) -> &'static str {
        match self {
            IntentKind::Upsert => "upsert",
            IntentKind::Delete => "delete",
            IntentKind::Repair => "repair",
            IntentKind::Transaction => "transaction",
            IntentKind::Index => "index",
        }
    }
    /// Parses [`IntentKind::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "upsert" => Some(IntentKind::Upsert),
            "delete" => Some(IntentKind::Delete),
            "repair" => Some(IntentKind::Repair),
            "transaction" => Some(IntentKind::Transaction),
            "index" => Some(IntentKind::Index),
            _ => None,
        }
    }
}

/// Where an intent is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntentState {
    /// Written before any point; names the points that may come to exist.
    Prepared,
    /// The metadata commit happened; the intent now names the points it made garbage.
    Committed,
    /// Committed by a saga step: its garbage is *kept* (not deleted, not
    /// claimable by recovery) and the rows it touched are remembered as
    /// [`UndoImage`]s, so that a compensation can restore them exactly,
    /// until the saga ends: its terminal journal save releases it
    /// ([`MetadataRepo::saga_save`](crate::MetadataRepo::saga_save)).
    Held,
}

impl IntentState {
    /// Stable name for storage.
    pub fn as_str(&self) -> &'static str {
        match self {
            IntentState::Prepared => "prepared",
            IntentState::Committed => "committed",
            IntentState::Held => "held",
        }
    }
    /// Parses [`IntentState::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "prepared" => Some(IntentState::Prepared),
            "committed" => Some(IntentState::Committed),
            "held" => Some(IntentState::Held),
            _ => None,
        }
    }
}

/// A write-ahead intent: the durable record of points that may exist in the index
/// without a committed row referencing them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Intent {
    /// Its id.
    pub id: IntentId,
    /// What wrote it.
    pub kind: IntentKind,
    /// Prepared or committed.
    pub state: IntentState,
    /// Who may commit or resolve it.
    pub owner: OwnerToken,
    /// After this instant (ms since the Unix epoch) recovery may take it over.
    pub lease_deadline_ms: i64,
    /// Prepared: the new points. Committed: the points the commit made garbage.
    pub point_ids: Vec<PointId>,
    /// What the commit decided (set in the commit transaction).
    pub summary: Option<CommitSummary>,
    /// How many times recovery has claimed it.
    pub attempts: u32,
    /// The last error recovery met handling it.
    pub last_error: Option<String>,
    /// Creation instant (ms since the Unix epoch).
    pub created_ms: i64,
}

impl Intent {
    /// Held by a live saga: it ends with the saga (not by recovery), however
    /// long that runs.
    pub fn is_held(&self) -> bool {
        self.state == IntentState::Held
    }

    /// Recovery's to act on at `now_ms`: its lease ended and no live saga
    /// holds it.
    pub fn is_expired(&self, now_ms: i64) -> bool {
        !self.is_held() && self.lease_deadline_ms < now_ms
    }

    /// Spent: committed and naming no point, so it guards nothing in the
    /// index. What is left of it only settles a lost commit reply (the
    /// intent a deferred upsert's commit creates stays so until recovery
    /// resolves it, in a batch, after its lease). Not work in flight:
    /// `verify`, `stats` and the service's backlog count such intents apart.
    pub fn is_spent(&self) -> bool {
        self.state == IntentState::Committed && self.point_ids.is_empty()
    }
}

/// The prepare step's request: a new intent.
#[derive(Clone, Debug, PartialEq)]
pub struct NewIntent {
    /// Its id.
    pub id: IntentId,
    /// What it is for.
    pub kind: IntentKind,
    /// The owner token of the call that writes it.
    pub owner: OwnerToken,
    /// The lease deadline (ms since the Unix epoch).
    pub lease_deadline_ms: i64,
    /// Every point id that may come to exist in the index.
    pub point_ids: Vec<PointId>,
    /// Creation instant (ms since the Unix epoch).
    pub created_ms: i64,
    /// The [`IndexState::generation`](crate::IndexState::generation) of the
    /// collection its points are written to: a prepare under another
    /// generation is refused.
    pub generation: u64,
}

/// What a metadata commit decided; stored with the intent so that a caller who
/// lost the commit's reply can learn it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitSummary {
    /// Rows inserted.
    pub inserted: u64,
    /// Rows updated (switched to a new point).
    pub updated: u64,
    /// Rows deleted.
    pub deleted: u64,
}

/// The result of a metadata upsert commit.
#[derive(Clone, Debug, PartialEq)]
pub struct UpsertCommit {
    /// The counts.
    pub summary: CommitSummary,
    /// The points the switched rows referenced before: garbage now.
    pub old_point_ids: Vec<PointId>,
}

/// The result of a metadata delete commit.
#[derive(Clone, Debug, PartialEq)]
pub struct DeleteCommit {
    /// The counts (`deleted`).
    pub summary: CommitSummary,
    /// The points the deleted rows referenced: garbage now.
    pub point_ids: Vec<PointId>,
}

/// An idempotency key recorded with the commit of a write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    /// The caller's key.
    pub key: String,
    /// A hash of the request, to reject the same key with a different request.
    pub request_hash: String,
    /// The outcome the first call reported (JSON), returned again on replays.
    pub outcome: Value,
    /// The commit's summary. On input to a commit this is ignored: the store
    /// records the summary of the commit itself, in the same transaction, so a
    /// replay reports exactly what the first call decided.
    #[serde(default)]
    pub summary: CommitSummary,
}

/// One part of a multi-part commit
/// ([`MetadataRepo::commit_transaction`](crate::MetadataRepo::commit_transaction)),
/// applied in order inside the one transaction.
#[derive(Clone, Debug, PartialEq)]
pub enum CommitPart {
    /// Insert or switch these rows to their new points (as
    /// [`commit_upsert`](crate::MetadataRepo::commit_upsert)).
    Upsert(Vec<RowWrite>),
    /// Delete the selected rows (as
    /// [`commit_delete`](crate::MetadataRepo::commit_delete)).
    Delete(DeleteSelector),
    /// A saga compensation: put each record back as its image says — but
    /// only where the record is still as the step left it
    /// (`after_version`); a record changed since is left alone and reported
    /// as a conflict.
    Restore(Vec<UndoImage>),
    /// A deferred write (`WriteMode::Deferred`): insert or update these rows
    /// **without** switching their points, and enqueue (or coalesce) one
    /// [`PendingIndex`] entry per record for the index workers (a claim
    /// returns each entry with its row's scope, metadata and vector; a store
    /// that does not keep vectors keeps the vector in the entry). An
    /// existing row keeps the point it references (its previous vector
    /// stays findable); a new row references its `point_id`, which is
    /// reserved and not written: the record is found by no search until a
    /// worker indexes it.
    Defer {
        /// The rows (with their vectors: the workers index them).
        rows: Vec<RowWrite>,
        /// When the entries are enqueued (kept by a coalesced entry).
        now_ms: i64,
    },
    /// An index worker's switch: for each record, if the row is still at
    /// `version` and its pending entry is at `version` and claimed by
    /// `claim`, point the row at the new `point_id` (its old point becomes
    /// garbage — unless the entry's `indexed_version` is 0: the old point is
    /// then the reserved one, never written, and nothing is left to delete)
    /// and remove the entry; otherwise the new point is garbage.
    /// The row's version does not change: indexing is not a write.
    /// The switched records count towards the indexing rate
    /// ([`PendingStats::indexed_last_minute`]) at `now_ms`.
    Index {
        /// The token the worker claimed the entries with.
        claim: OwnerToken,
        /// One switch per record.
        switches: Vec<IndexSwitch>,
        /// When the worker switches (its clock's now).
        now_ms: i64,
    },
}

/// One record of an index worker's switch ([`CommitPart::Index`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexSwitch {
    /// The record.
    pub record_id: RecordId,
    /// The version the worker wrote a point for.
    pub version: u64,
    /// The point it wrote.
    pub point_id: PointId,
}

/// A record's pending-index entry: a deferred write not yet in the index.
///
/// There is at most one per record (later deferred writes coalesce into it:
/// only the newest version is ever indexed). A worker claims it for a while
/// (`claim_until_ms`), writes a point for `version` and switches the row to
/// it; a synchronous write or a delete of the record removes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PendingIndex {
    /// The record.
    pub record_id: RecordId,
    /// The row version to index (the row's current version while the entry is current).
    pub version: u64,
    /// The version the row's current point holds; 0: the record was never
    /// indexed (its row references a reserved point that does not exist).
    pub indexed_version: u64,
    /// The record's scope at `version`.
    pub scope: Scope,
    /// Its metadata at `version`.
    pub metadata: Metadata,
    /// Its vector at `version`.
    pub vector: Vec<f32>,
    /// When the oldest write still waiting in this entry was enqueued.
    pub enqueued_ms: i64,
    /// Failed indexing attempts of this version.
    pub attempts: u32,
    /// The last failure, for operators.
    pub last_error: Option<String>,
    /// Dead-lettered: failed permanently or too often; not retried until an
    /// operator says so.
    pub dead: bool,
    /// The worker that claimed it (its switch is fenced by this token).
    pub claimed_by: Option<OwnerToken>,
    /// Not claimable before this (a worker's claim, or a retry's back-off);
    /// `None`: claimable now.
    pub claim_until_ms: Option<i64>,
}

impl PendingIndex {
    /// Whether a worker may claim it at `now_ms`.
    pub fn is_claimable(&self, now_ms: i64) -> bool {
        !self.dead && self.claim_until_ms.is_none_or(|t| t < now_ms)
    }
}

/// A failed indexing attempt, as an index worker records it
/// ([`MetadataRepo::record_index_failure`](crate::MetadataRepo::record_index_failure)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexFailure {
    /// Why (kept as the entry's `last_error`).
    pub message: String,
    /// The failure will not go away by retrying (the index rejects the point).
    pub permanent: bool,
    /// Whether it counts as an attempt of the entry. A transient failure
    /// (the index down or slow) does not: the entry only backs off, and is
    /// never dead-lettered for it.
    pub counts: bool,
    /// Dead-letter the entry once its attempts reach this.
    pub max_attempts: u32,
    /// Otherwise, when it may be claimed again (back-off).
    pub retry_at_ms: i64,
}

/// Counts of the pending-index backlog ([`MetadataRepo::pending_stats`](crate::MetadataRepo::pending_stats)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingStats {
    /// Entries waiting to be indexed (not dead-lettered), claimed or not.
    pub pending: u64,
    /// Of those, entries a worker holds a claim (or a back-off) on now.
    pub claimed: u64,
    /// Dead-lettered entries.
    pub dead: u64,
    /// When the oldest waiting (not dead-lettered) entry was enqueued.
    pub oldest_enqueued_ms: Option<i64>,
    /// Records index workers switched into the index in the last minute:
    /// the [`CommitPart::Index`] commits whose `now_ms` falls in the 60
    /// whole seconds ending with the second of `now_ms` (per-second
    /// buckets). Divided by 60, the indexing rate in records per second.
    #[serde(default)]
    pub indexed_last_minute: u64,
}

impl PendingStats {
    /// The window [`indexed_last_minute`](Self::indexed_last_minute) counts
    /// over, in seconds.
    pub const RATE_WINDOW_S: i64 = 60;

    /// The second (since the epoch) a time in milliseconds falls in: the
    /// bucket the indexing rate counts it under.
    pub fn rate_bucket(ms: i64) -> i64 {
        ms.div_euclid(1000)
    }

    /// The buckets [`indexed_last_minute`](Self::indexed_last_minute) sums
    /// at `now_ms`: the [`RATE_WINDOW_S`](Self::RATE_WINDOW_S) seconds
    /// ending with `now_ms`'s own.
    pub fn rate_window(now_ms: i64) -> std::ops::RangeInclusive<i64> {
        let now_s = Self::rate_bucket(now_ms);
        now_s - Self::RATE_WINDOW_S + 1..=now_s
    }

    /// The indexing rate over the last minute, in records per second.
    pub fn indexing_rate(&self) -> f64 {
        self.indexed_last_minute as f64 / Self::RATE_WINDOW_S as f64
    }
}

/// Which pending entries a listing returns ([`MetadataRepo::list_pending`](crate::MetadataRepo::list_pending)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PendingFilter {
    /// Every entry.
    All,
    /// Entries waiting to be indexed.
    Waiting,
    /// Dead-lettered entries.
    Dead,
}

/// A record as it was before a held commit touched it, and as that commit
/// left it: enough to restore it exactly, without re-embedding (its old point
/// is kept in the index while the commit is held).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UndoImage {
    /// The record.
    pub id: RecordId,
    /// The row before the commit (with its vector when the store keeps
    /// vectors); `None`: the commit inserted it.
    pub before: Option<StoredRecordImage>,
    /// The version the commit left; `None`: the commit deleted it.
    pub after_version: Option<u64>,
}

/// A full row, as kept in an [`UndoImage`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredRecordImage {
    /// Scope.
    pub scope: Scope,
    /// Content.
    pub content: String,
    /// Metadata.
    pub metadata: Metadata,
    /// The point the row referenced (kept in the index while held).
    pub point_id: PointId,
    /// Its version then.
    pub version: u64,
    /// Its vector, when the store keeps vectors.
    pub vector: Option<Vec<f32>>,
    /// Its pending-index entry then, if it had one of its version (waiting
    /// for an index worker, or dead-lettered): a restore puts it back as it
    /// was, so that a restored row is indexed, or stays listed as failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<PendingIndex>,
}

impl StoredRecordImage {
    /// The image of a stored row.
    pub fn of(record: &StoredRecord) -> Self {
        Self {
            scope: record.scope.clone(),
            content: record.content.clone(),
            metadata: record.metadata.clone(),
            point_id: record.point_id,
            version: record.version,
            vector: record.vector.clone(),
            pending: None,
        }
    }

    /// The stored row this image describes, for record `id`.
    pub fn to_record(&self, id: RecordId) -> StoredRecord {
        StoredRecord {
            id,
            scope: self.scope.clone(),
            content: self.content.clone(),
            metadata: self.metadata.clone(),
            point_id: self.point_id,
            version: self.version,
            vector: self.vector.clone(),
        }
    }
}

/// A saga's fence on a commit: the commit applies only while `owner` still
/// owns the saga (a process that lost the saga to recovery or an abort can
/// no longer commit its steps).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SagaFence {
    /// The saga.
    pub saga: SagaId,
    /// The token its driver holds.
    pub owner: OwnerToken,
}

/// What a multi-part commit writes
/// ([`MetadataRepo::commit_transaction`](crate::MetadataRepo::commit_transaction)).
#[derive(Clone)]
pub struct TransactionCommit<'a> {
    /// The parts, applied in order.
    pub parts: &'a [CommitPart],
    /// The caller's own statements, run in the same transaction after the
    /// parts.
    pub step: Option<std::sync::Arc<dyn crate::transaction::CommitStep>>,
    /// Hold the commit for a saga: the intent becomes
    /// [`IntentState::Held`] (its garbage kept, not claimable) and an
    /// [`UndoImage`] of every touched record is kept with it.
    pub hold: bool,
    /// Commit only while the saga is still owned by this driver.
    pub saga: Option<SagaFence>,
    /// Hand the intent over at commit: its lease ends at this time, so
    /// recovery (an index worker's pass) collects its garbage and resolves
    /// it. A deferred write sets it: its caller never touches the index.
    pub release_at_ms: Option<i64>,
    /// Create the intent in this commit instead of a prior
    /// [`prepare`](crate::MetadataRepo::prepare): inserted (owned by the
    /// committing token) unless an intent with its id exists, in the same
    /// transaction as the parts. Only for units that write no point before
    /// their commit (a deferred upsert): a lost reply is then settled with
    /// [`settle_unprepared`](crate::MetadataRepo::settle_unprepared).
    pub create_intent: Option<&'a NewIntent>,
}

impl<'a> TransactionCommit<'a> {
    /// A plain commit of `parts`: no step, not held, no saga fence, the
    /// intent prepared beforehand and its lease left as it is. Set the other
    /// fields with struct update syntax (`..TransactionCommit::of(parts)`).
    pub fn of(parts: &'a [CommitPart]) -> Self {
        Self {
            parts,
            step: None,
            hold: false,
            saga: None,
            release_at_ms: None,
            create_intent: None,
        }
    }
}

impl fmt::Debug for TransactionCommit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransactionCommit")
            .field("parts", &self.parts)
            .field("step", &self.step.as_ref().map(|s| s.connection()))
            .field("hold", &self.hold)
            .field("saga", &self.saga)
            .field("release_at_ms", &self.release_at_ms)
            .field("create_intent", &self.create_intent.map(|i| i.id))
            .finish()
    }
}

/// The result of a multi-part commit.
#[derive(Clone, Debug, PartialEq)]
pub struct TransactionCommitResult {
    /// The counts over every part (a restore counts as the insert, update or
    /// delete it is).
    pub summary: CommitSummary,
    /// Every point the commit made garbage (superseded, deleted, or written
    /// and deleted within the unit), as the intent now lists them.
    pub garbage: Vec<PointId>,
    /// Records a [`CommitPart::Restore`] left alone because they changed after
    /// the step it undoes (empty when the commit is repeated).
    pub conflicts: Vec<RecordId>,
    /// The version each row of a [`CommitPart::Defer`] got, in the part's
    /// order (empty when the commit is repeated, and for other parts).
    pub versions: Vec<(RecordId, u64)>,
}

/// How an ambiguous commit was settled.
#[derive(Clone, Debug, PartialEq)]
pub enum Settlement {
    /// The commit happened; the intent now lists the points it made garbage
    /// (state `Committed`, or `Held` for a saga step's commit).
    Committed(Intent),
    /// The commit did not happen, and never will: the intent is now owned by the
    /// new token, so a late commit of the old one fails its fencing check.
    NotCommitted(Intent),
    /// The intent no longer exists (it was resolved by someone else).
    Missing,
}

/// A page of a listing.
#[derive(Clone, Debug, PartialEq)]
pub struct Page<T, C> {
    /// The items.
    pub items: Vec<T>,
    /// Where the next page starts, if there is one.
    pub next: Option<C>,
}

/// Milliseconds since the Unix epoch of a [`SystemTime`].
pub fn unix_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// The [`SystemTime`] of milliseconds since the Unix epoch.
pub fn from_unix_ms(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms as u64)
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rate_window_is_the_60_seconds_ending_with_nows() {
        assert_eq!(PendingStats::rate_window(60_999), 1..=60);
        assert_eq!(PendingStats::rate_window(61_000), 2..=61);
        // Before the epoch, a millisecond still falls in the second below it.
        assert_eq!(PendingStats::rate_bucket(-1), -1);
        assert_eq!(PendingStats::rate_window(-1), -60..=-1);
        let stats = PendingStats {
            indexed_last_minute: 90,
            ..PendingStats::default()
        };
        assert_eq!(stats.indexing_rate(), 1.5);
    }

    #[test]
    fn filter_matches_scope_and_metadata() {
        let meta = json!({"item": "a", "n": 1}).as_object().unwrap().clone();
        let s = Scope::new("cat");
        assert!(Filter::none().matches(&s, &meta));
        assert!(Filter::scope("cat").matches(&s, &meta));
        assert!(!Filter::scope("dog").matches(&s, &meta));
        assert!(
            Filter::scope("cat")
                .with_eq("item", json!("a"))
                .matches(&s, &meta)
        );
        assert!(
            !Filter::none()
                .with_eq("item", json!("b"))
                .matches(&s, &meta)
        );
        assert!(
            !Filter::none()
                .with_eq("missing", json!(1))
                .matches(&s, &meta)
        );
    }

    #[test]
    fn unix_ms_round_trips() {
        for ms in [0_i64, 1, 1_700_000_000_123, -5] {
            assert_eq!(unix_ms(from_unix_ms(ms)), ms);
        }
    }

    #[test]
    fn distance_parses() {
        assert_eq!("Cosine".parse::<Distance>().unwrap(), Distance::Cosine);
        assert_eq!("euclidean".parse::<Distance>().unwrap(), Distance::Euclid);
        assert!("manhattan".parse::<Distance>().is_err());
    }
}
