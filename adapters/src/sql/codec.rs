//! Mapping between SQL rows and the model, shared by the PostgreSQL and SQLite
//! adapters: the row shapes, vector bytes, counters and batch validation.

use std::collections::HashSet;

use serde_json::Value;
use tandem_core::{
    CommitSummary, IdempotencyRecord, Intent, IntentId, IntentKind, IntentState, MetadataError,
    OwnerToken, PendingIndex, PointId, RecordId, RowWrite, SagaId, SagaRecord, SagaState, Scope,
    StepRecord, StoredRecord, StoredRecordImage, UndoImage,
};
use uuid::Uuid;

/// A `records` row as either backend reads it.
#[derive(Debug)]
pub(crate) struct RecordRow {
    pub id: Uuid,
    pub scope: String,
    pub content: String,
    pub metadata: Value,
    pub point_id: Uuid,
    pub version: i64,
    pub vector: Option<Vec<u8>>,
}

impl RecordRow {
    /// The model's record. `keep_vectors: false` hides any stored vector.
    pub fn into_record(self, keep_vectors: bool) -> Result<StoredRecord, MetadataError> {
        let metadata = match self.metadata {
            Value::Object(map) => map,
            other => {
                return Err(corrupt(format!(
                    "record {}: metadata is not a JSON object but {}",
                    self.id,
                    json_type(&other)
                )));
            }
        };
        let vector = match (keep_vectors, self.vector) {
            (true, Some(bytes)) => Some(decode_vector(&bytes).ok_or_else(|| {
                corrupt(format!(
                    "record {}: stored vector has {} bytes, not a multiple of 4",
                    self.id,
                    bytes.len()
                ))
            })?),
            _ => None,
        };
        Ok(StoredRecord {
            id: RecordId(self.id),
            scope: Scope::new(self.scope),
            content: self.content,
            metadata,
            point_id: PointId(self.point_id),
            version: to_u64(self.version, "version")?,
            vector,
        })
    }
}

/// An `intents` row as either backend reads it.
#[derive(Debug)]
pub(crate) struct IntentRow {
    pub id: Uuid,
    pub kind: String,
    pub state: String,
    pub owner: Uuid,
    pub lease_deadline_ms: i64,
    pub point_ids: Vec<Uuid>,
    pub inserted: Option<i64>,
    pub updated: Option<i64>,
    pub deleted: Option<i64>,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub created_ms: i64,
}

impl IntentRow {
    /// The model's intent.
    pub fn into_intent(self) -> Result<Intent, MetadataError> {
        let kind = IntentKind::parse(&self.kind)
            .ok_or_else(|| corrupt(format!("intent {}: unknown kind {:?}", self.id, self.kind)))?;
        let state = IntentState::parse(&self.state).ok_or_else(|| {
            corrupt(format!(
                "intent {}: unknown state {:?}",
                self.id, self.state
            ))
        })?;
        let summary = match (self.inserted, self.updated, self.deleted) {
            (None, None, None) => None,
            (i, u, d) => Some(CommitSummary {
                inserted: to_u64(i.unwrap_or(0), "inserted")?,
                updated: to_u64(u.unwrap_or(0), "updated")?,
                deleted: to_u64(d.unwrap_or(0), "deleted")?,
            }),
        };
        Ok(Intent {
            id: IntentId(self.id),
            kind,
            state,
            owner: OwnerToken(self.owner),
            lease_deadline_ms: self.lease_deadline_ms,
            point_ids: self.point_ids.into_iter().map(PointId).collect(),
            summary,
            attempts: u32::try_from(self.attempts)
                .map_err(|_| corrupt(format!("intent {}: negative attempts", self.id)))?,
            last_error: self.last_error,
            created_ms: self.created_ms,
        })
    }
}

/// An `idempotency_keys` row as either backend reads it.
#[derive(Debug)]
pub(crate) struct IdempotencyRow {
    pub key: String,
    pub request_hash: String,
    pub outcome: Value,
    pub inserted: i64,
    pub updated: i64,
    pub deleted: i64,
}

impl IdempotencyRow {
    /// The model's record.
    pub fn into_record(self) -> Result<IdempotencyRecord, MetadataError> {
        Ok(IdempotencyRecord {
            key: self.key,
            request_hash: self.request_hash,
            outcome: self.outcome,
            summary: CommitSummary {
                inserted: to_u64(self.inserted, "inserted")?,
                updated: to_u64(self.updated, "updated")?,
                deleted: to_u64(self.deleted, "deleted")?,
            },
        })
    }
}

/// The summary as the three signed counters SQL stores.
pub(crate) fn summary_columns(s: CommitSummary) -> Result<(i64, i64, i64), MetadataError> {
    Ok((
        to_i64(s.inserted, "inserted")?,
        to_i64(s.updated, "updated")?,
        to_i64(s.deleted, "deleted")?,
    ))
}

/// A vector as compact bytes: little-endian `f32`s, 4 bytes each.
pub(crate) fn encode_vector(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The inverse of [`encode_vector`]; `None` if the length is not a multiple of 4.
pub(crate) fn decode_vector(bytes: &[u8]) -> Option<Vec<f32>> {
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    )
}

/// Rejects what the protocol forbids within one batch and what SQL would apply
/// ambiguously: a record twice, or a point twice. (A point that a committed row
/// already references is rejected by the `point_id` unique constraint.)
pub(crate) fn validate_batch(rows: &[RowWrite]) -> Result<(), MetadataError> {
    let mut ids = HashSet::with_capacity(rows.len());
    let mut points = HashSet::with_capacity(rows.len());
    for (index, row) in rows.iter().enumerate() {
        if !ids.insert(row.id) {
            return Err(invalid(format!(
                "row #{index}: record {} appears more than once in the batch",
                row.id
            )));
        }
        if !points.insert(row.point_id) {
            return Err(invalid(format!(
                "row #{index}: point {} appears more than once in the batch",
                row.point_id
            )));
        }
    }
    Ok(())
}

/// A page size as SQL's `LIMIT`, rejecting 0 (an empty page would end a scan
/// early or never advance it).
pub(crate) fn page_limit(limit: usize, what: &str) -> Result<i64, MetadataError> {
    if limit == 0 {
        return Err(invalid(format!("{what}: limit must be at least 1")));
    }
    Ok(i64::try_from(limit).unwrap_or(i64::MAX))
}

/// Checks that `name` can be used as an SQL identifier without quoting
/// surprises: lowercase ASCII letters, digits and `_`, not starting with a
/// digit, at most 63 bytes (PostgreSQL's limit), not starting with `pg_`.
pub(crate) fn validate_identifier(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !first_ok || !rest_ok || name.len() > 63 || name.starts_with("pg_") {
        return Err(format!(
            "invalid schema name {name:?}: use 1-63 lowercase ASCII letters, digits or '_', \
             not starting with a digit or 'pg_'"
        ));
    }
    Ok(())
}

/// A validated identifier, double-quoted for SQL.
pub(crate) fn quote_identifier(name: &str) -> Result<String, String> {
    validate_identifier(name)?;
    Ok(format!("\"{name}\""))
}

pub(crate) fn to_u64(v: i64, what: &str) -> Result<u64, MetadataError> {
    u64::try_from(v).map_err(|_| corrupt(format!("negative {what} ({v}) in the store")))
}

pub(crate) fn to_i64(v: u64, what: &str) -> Result<i64, MetadataError> {
    i64::try_from(v).map_err(|_| invalid(format!("{what} ({v}) does not fit in a BIGINT")))
}

pub(crate) fn invalid(message: String) -> MetadataError {
    MetadataError::InvalidInput {
        message,
        source: None,
    }
}

/// The store holds something this version cannot read: permanent.
pub(crate) fn corrupt(message: String) -> MetadataError {
    MetadataError::permanent(format!("unreadable row: {message}"))
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn vectors_round_trip_through_bytes() {
        let v = vec![0.0_f32, -1.5, f32::MAX, 1e-30, 3.25];
        let bytes = encode_vector(&v);
        assert_eq!(bytes.len(), 20);
        assert_eq!(&bytes[4..8], &(-1.5_f32).to_le_bytes());
        assert_eq!(decode_vector(&bytes).unwrap(), v);
        assert!(decode_vector(&bytes[..7]).is_none());
    }

    #[test]
    fn identifiers_are_validated() {
        for ok in ["tandem", "_x", "t_1", &"a".repeat(63)] {
            assert!(validate_identifier(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1abc",
            "Tandem",
            "a-b",
            "a b",
            "a\"; drop",
            "pg_temp",
            &"a".repeat(64),
        ] {
            assert!(validate_identifier(bad).is_err(), "{bad}");
        }
        assert_eq!(quote_identifier("tandem").unwrap(), "\"tandem\"");
    }

    #[test]
    fn batch_with_duplicate_id_or_point_is_rejected() {
        let row = |id: RecordId, p: PointId| RowWrite {
            id,
            scope: Scope::new("s"),
            content: String::new(),
            metadata: Default::default(),
            point_id: p,
            vector: vec![1.0],
        };
        let (a, b) = (RecordId::new_random(), RecordId::new_random());
        let (p, q) = (PointId::new_random(), PointId::new_random());
        assert!(validate_batch(&[row(a, p), row(b, q)]).is_ok());
        assert!(matches!(
            validate_batch(&[row(a, p), row(a, q)]),
            Err(MetadataError::InvalidInput { .. })
        ));
        assert!(matches!(
            validate_batch(&[row(a, p), row(b, p)]),
            Err(MetadataError::InvalidInput { .. })
        ));
    }

    #[test]
    fn rows_map_to_the_model() {
        let id = Uuid::new_v4();
        let row = RecordRow {
            id,
            scope: "s".into(),
            content: "c".into(),
            metadata: json!({"a": 1}),
            point_id: Uuid::new_v4(),
            version: 3,
            vector: Some(encode_vector(&[1.0, 2.0])),
        };
        let r = row.into_record(true).unwrap();
        assert_eq!(r.version, 3);
        assert_eq!(r.vector, Some(vec![1.0, 2.0]));
        let bad = RecordRow {
            id,
            scope: "s".into(),
            content: "c".into(),
            metadata: json!([1]),
            point_id: Uuid::new_v4(),
            version: 1,
            vector: None,
        };
        assert!(matches!(
            bad.into_record(true),
            Err(MetadataError::Permanent { .. })
        ));
        let intent = IntentRow {
            id,
            kind: "delete".into(),
            state: "committed".into(),
            owner: Uuid::new_v4(),
            lease_deadline_ms: 5,
            point_ids: vec![Uuid::new_v4()],
            inserted: Some(0),
            updated: Some(0),
            deleted: Some(1),
            attempts: 2,
            last_error: None,
            created_ms: 1,
        }
        .into_intent()
        .unwrap();
        assert_eq!(intent.kind, IntentKind::Delete);
        assert_eq!(intent.summary.unwrap().deleted, 1);
        assert_eq!(intent.attempts, 2);
    }

    fn entry() -> PendingIndex {
        PendingIndex {
            record_id: RecordId::new_random(),
            version: 3,
            indexed_version: 2,
            scope: Scope::new("s"),
            metadata: json!({"a": 1}).as_object().cloned().unwrap(),
            vector: vec![1.0, -2.5],
            enqueued_ms: 7,
            attempts: 1,
            last_error: Some("e".into()),
            dead: false,
            claimed_by: None,
            claim_until_ms: Some(9),
        }
    }

    #[test]
    fn pending_rows_are_light_unless_restored() {
        let e = entry();
        let light = PendingRow::light(&e, true).unwrap();
        assert!(light.scope.is_none() && light.metadata.is_none() && light.vector.is_none());
        assert_eq!((light.version, light.indexed_version), (3, 2));
        // Rows without vectors: the entry carries it.
        let carried = PendingRow::light(&e, false).unwrap();
        assert!(carried.scope.is_none() && carried.metadata.is_none());
        assert_eq!(carried.vector, Some(encode_vector(&e.vector)));
        // Restored exactly as given.
        assert_eq!(PendingRow::of(&e).unwrap().into_pending().unwrap(), e);
    }

    #[test]
    fn pending_rows_without_content_decode_empty() {
        let e = entry();
        let read = PendingRow::light(&e, true).unwrap().into_pending().unwrap();
        assert_eq!(read.scope.as_str(), "");
        assert!(read.metadata.is_empty() && read.vector.is_empty());
        assert_eq!(
            (read.version, read.indexed_version, read.attempts),
            (3, 2, 1)
        );
        let bad = PendingRow {
            metadata: Some(json!([1])),
            ..PendingRow::light(&e, true).unwrap()
        };
        assert!(matches!(
            bad.into_pending(),
            Err(MetadataError::Permanent { .. })
        ));
        let bad = PendingRow {
            vector: Some(vec![1, 2, 3]),
            ..PendingRow::light(&e, true).unwrap()
        };
        assert!(matches!(
            bad.into_pending(),
            Err(MetadataError::Permanent { .. })
        ));
    }
}

/// An `intent_undo` row as either backend reads or writes it: the columns of
/// the row before a held commit (all `None` if it inserted the record) and
/// the version it left.
#[derive(Debug)]
pub(crate) struct UndoRow {
    pub record_id: Uuid,
    pub scope: Option<String>,
    pub content: Option<String>,
    pub metadata: Option<Value>,
    pub point_id: Option<Uuid>,
    pub version: Option<i64>,
    pub vector: Option<Vec<u8>>,
    pub after_version: Option<i64>,
    /// The record's waiting pending-index entry then, as JSON.
    pub pending: Option<Value>,
}

impl UndoRow {
    /// The row of an image. `keep_vectors: false` stores no vector.
    pub fn of(image: &UndoImage, keep_vectors: bool) -> Result<Self, MetadataError> {
        let b = image.before.as_ref();
        Ok(Self {
            record_id: image.id.0,
            scope: b.map(|b| b.scope.as_str().to_owned()),
            content: b.map(|b| b.content.clone()),
            metadata: b.map(|b| Value::Object(b.metadata.clone())),
            point_id: b.map(|b| b.point_id.0),
            version: b.map(|b| to_i64(b.version, "version")).transpose()?,
            vector: b
                .and_then(|b| b.vector.as_deref())
                .filter(|_| keep_vectors)
                .map(encode_vector),
            after_version: image
                .after_version
                .map(|v| to_i64(v, "version"))
                .transpose()?,
            // The entry keeps its vector whatever rows keep: a restore
            // requeues it, and the worker needs the vector to index it.
            pending: b
                .and_then(|b| b.pending.as_ref())
                .map(|p| {
                    serde_json::to_value(p).map_err(|e| {
                        invalid(format!(
                            "undo image of record {}: pending entry cannot be stored: {e}",
                            image.id
                        ))
                    })
                })
                .transpose()?,
        })
    }

    /// The model's image.
    pub fn into_image(self) -> Result<UndoImage, MetadataError> {
        let id = RecordId(self.record_id);
        let before = match (
            self.scope,
            self.content,
            self.metadata,
            self.point_id,
            self.version,
        ) {
            (Some(scope), Some(content), Some(metadata), Some(point), Some(version)) => {
                let Value::Object(metadata) = metadata else {
                    return Err(corrupt(format!(
                        "undo image of record {id}: metadata is not a JSON object"
                    )));
                };
                let vector = match self.vector {
                    Some(bytes) => Some(decode_vector(&bytes).ok_or_else(|| {
                        corrupt(format!("undo image of record {id}: bad vector bytes"))
                    })?),
                    None => None,
                };
                let pending = self
                    .pending
                    .map(serde_json::from_value::<PendingIndex>)
                    .transpose()
                    .map_err(|e| {
                        corrupt(format!("undo image of record {id}: pending entry: {e}"))
                    })?;
                Some(StoredRecordImage {
                    scope: Scope::new(scope),
                    content,
                    metadata,
                    point_id: PointId(point),
                    version: to_u64(version, "version")?,
                    vector,
                    pending,
                })
            }
            (None, None, None, None, None) => None,
            _ => {
                return Err(corrupt(format!(
                    "undo image of record {id}: some columns of the previous row are missing"
                )));
            }
        };
        Ok(UndoImage {
            id,
            before,
            after_version: self
                .after_version
                .map(|v| to_u64(v, "version"))
                .transpose()?,
        })
    }
}

/// A `pending_index` row as either backend reads or writes it.
///
/// An entry a deferred write enqueues is *light*: `scope` and `metadata` are
/// `None` (the record's row at the entry's version holds them), and so is
/// `vector` when rows keep their vectors (see [`PendingRow::light`]). Reads
/// fill a missing column from the record's row (`COALESCE(p.x, r.x)` over
/// `LEFT JOIN records`); what is still missing then — the entry is stale:
/// its row is gone or lacks the vector, and a claim deletes it without
/// indexing it — decodes as empty.
#[derive(Debug)]
pub(crate) struct PendingRow {
    pub record_id: Uuid,
    pub version: i64,
    pub indexed_version: i64,
    pub scope: Option<String>,
    pub metadata: Option<Value>,
    pub vector: Option<Vec<u8>>,
    pub enqueued_ms: i64,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub dead: bool,
    pub claimed_by: Option<Uuid>,
    pub claim_until_ms: Option<i64>,
}

impl PendingRow {
    /// The row of an entry with all its content (an entry restored exactly
    /// as given, from a held commit's undo image).
    pub fn of(entry: &PendingIndex) -> Result<Self, MetadataError> {
        Ok(Self {
            scope: Some(entry.scope.as_str().to_owned()),
            metadata: Some(Value::Object(entry.metadata.clone())),
            vector: Some(encode_vector(&entry.vector)),
            ..Self::light(entry, true)?
        })
    }

    /// The light row a deferred write enqueues: no scope or metadata (the
    /// record's row at the entry's version holds them), and the vector only
    /// if rows do not keep theirs (`keep_vectors: false`).
    pub fn light(entry: &PendingIndex, keep_vectors: bool) -> Result<Self, MetadataError> {
        Ok(Self {
            record_id: entry.record_id.0,
            version: to_i64(entry.version, "version")?,
            indexed_version: to_i64(entry.indexed_version, "indexed_version")?,
            scope: None,
            metadata: None,
            vector: (!keep_vectors).then(|| encode_vector(&entry.vector)),
            enqueued_ms: entry.enqueued_ms,
            attempts: i32::try_from(entry.attempts).unwrap_or(i32::MAX),
            last_error: entry.last_error.clone(),
            dead: entry.dead,
            claimed_by: entry.claimed_by.map(|o| o.0),
            claim_until_ms: entry.claim_until_ms,
        })
    }

    /// The model's entry, from a row read with its record's content filled
    /// in; content still missing (a stale entry) decodes as empty.
    pub fn into_pending(self) -> Result<PendingIndex, MetadataError> {
        let id = RecordId(self.record_id);
        let metadata = match self.metadata {
            None => Default::default(),
            Some(Value::Object(metadata)) => metadata,
            Some(_) => {
                return Err(corrupt(format!(
                    "pending entry of record {id}: metadata is not a JSON object"
                )));
            }
        };
        let vector = match self.vector {
            None => Vec::new(),
            Some(bytes) => decode_vector(&bytes).ok_or_else(|| {
                corrupt(format!(
                    "pending entry of record {id}: stored vector has {} bytes, not a multiple of 4",
                    bytes.len()
                ))
            })?,
        };
        Ok(PendingIndex {
            record_id: id,
            version: to_u64(self.version, "version")?,
            indexed_version: to_u64(self.indexed_version, "indexed_version")?,
            scope: Scope::new(self.scope.unwrap_or_default()),
            metadata,
            vector,
            enqueued_ms: self.enqueued_ms,
            attempts: u32::try_from(self.attempts)
                .map_err(|_| corrupt(format!("pending entry of record {id}: negative attempts")))?,
            last_error: self.last_error,
            dead: self.dead,
            claimed_by: self.claimed_by.map(OwnerToken),
            claim_until_ms: self.claim_until_ms,
        })
    }
}

/// Which entries a listing returns, as two flags for one constant
/// statement: `WHERE (all OR dead = dead_only)`.
pub(crate) fn pending_filter(filter: tandem_core::PendingFilter) -> (bool, bool) {
    match filter {
        tandem_core::PendingFilter::All => (true, false),
        tandem_core::PendingFilter::Waiting => (false, false),
        tandem_core::PendingFilter::Dead => (false, true),
    }
}

/// A `sagas` row as either backend reads it (`steps` and `input` as JSON).
#[derive(Debug)]
pub(crate) struct SagaRow {
    pub id: Uuid,
    pub name: String,
    pub input: Value,
    pub state: String,
    pub steps: Value,
    pub owner: Uuid,
    pub lease_deadline_ms: i64,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

impl SagaRow {
    /// The model's saga.
    pub fn into_saga(self) -> Result<SagaRecord, MetadataError> {
        let id = SagaId(self.id);
        let state = SagaState::parse(&self.state)
            .ok_or_else(|| corrupt(format!("saga {id}: unknown state {:?}", self.state)))?;
        let steps: Vec<StepRecord> = serde_json::from_value(self.steps)
            .map_err(|e| corrupt(format!("saga {id}: unreadable steps: {e}")))?;
        Ok(SagaRecord {
            id,
            name: self.name,
            input: self.input,
            state,
            steps,
            owner: OwnerToken(self.owner),
            lease_deadline_ms: self.lease_deadline_ms,
            attempts: u32::try_from(self.attempts).unwrap_or(0),
            last_error: self.last_error,
            created_ms: self.created_ms,
            updated_ms: self.updated_ms,
        })
    }
}

/// A saga's steps as the JSON its row stores.
pub(crate) fn steps_json(saga: &SagaRecord) -> Result<Value, MetadataError> {
    serde_json::to_value(&saga.steps)
        .map_err(|e| invalid(format!("saga {}: steps cannot be stored: {e}", saga.id)))
}

/// What a caller step's database error becomes, once classified like the
/// adapter's own statements: a transient error that did not apply stays one
/// (the commit is retried, the step with it); anything else fails the
/// transaction, with the classified error (and the driver's under it) as the
/// source.
pub(crate) fn step_failed(classified: MetadataError) -> MetadataError {
    if classified.is_retryable() && classified.outcome() == tandem_core::Outcome::NotApplied {
        classified
    } else {
        MetadataError::StepFailed {
            source: Box::new(classified),
        }
    }
}
