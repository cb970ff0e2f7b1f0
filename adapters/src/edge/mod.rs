//! The embedded vector index: [`EdgeVectorIndex`], a [`VectorIndex`] on
//! qdrant-edge (Qdrant's in-process engine, `=0.7.0`) persisted under a data
//! directory.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tandem_core::IndexError> {
//! use tandem_adapters::edge::EdgeVectorIndex;
//! use tandem_core::{Distance, VectorIndex};
//!
//! let index = EdgeVectorIndex::open("./tandem-data/vectors", 384, Distance::Cosine).await?;
//! assert_eq!(index.dimension(), 384);
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! One shard per directory, with a single unnamed dense vector of the configured
//! dimension and distance, and keyword payload indexes on `record_id` and `scope`.
//! Each point's payload is
//! `{"record_id": "<uuid>", "scope": "...", "metadata": {...}, "written_at_ms": <i64>}`;
//! point ids are the UUIDs of [`PointId`]. Filters map to
//! Qdrant conditions: the scope to `scope = value`, each metadata `key = value` to
//! a condition on the payload key `metadata.<key>` (strings, integers and booleans
//! match exactly; a float `f` is the range `f ≤ x ≤ f`; `null` is `is_null`;
//! arrays and objects cannot be matched and are rejected as invalid input).
//! As in Qdrant, a condition on a payload field that holds an *array* matches when
//! any element matches.
//!
//! Scores are qdrant-edge's: cosine similarity, dot product, and for euclid the
//! distance **negated** (so that higher is better, as the port requires); a score
//! threshold on euclid is therefore `-max_distance`.
//!
//! # Durability: what is on disk when a call returns
//!
//! qdrant-edge 0.7.0 applies an update to its in-memory/mmap segments and appends
//! it to its WAL, but it does not replay the WAL when a shard is loaded: an update
//! survives a crash only once `flush()` has written the segments out (a process
//! killed before that loses the update when the shard is reopened). Invariant I1
//! needs a point durable before the metadata commit that references it, so:
//!
//! * [`upsert`](VectorIndex::upsert) and [`delete`](VectorIndex::delete) return
//!   `Ok` only after a flush that started after their update was applied has
//!   finished: **when they return, the change is durable.**
//! * Flushes are **group-committed**: one flush covers every write that finished
//!   applying before it started, so concurrent callers share flushes instead of
//!   paying one each (see [`SharedShard::make_durable`]). A flush costs 20–45 ms
//!   here almost whatever it covers. Measured by `tests/tests/edge_flush.rs` (64
//!   upserts of 100 points of 64 dimensions; release build, 2 cores shared with
//!   other builds, two runs):
//!
//!   | | points/s | flushes |
//!   |---|---|---|
//!   | one caller, a flush per upsert | 2.3k–3.4k | 64 |
//!   | 16 concurrent callers, group commit | 14k–21k | 5–6 |
//!   | the engine unflushed (not durable) | 118k–244k | 0 |
//!
//!   (In a debug build applying dominates: 0.7k–2.8k, 3.2k–3.7k and 6.7k–18k.)
//! * Reads never wait for a flush: a write is visible as soon as it is applied.
//! * A write that failed may have been partly applied, and that part may or may
//!   not survive a crash (the port allows any subset).
//! * Dropping the last handle flushes and closes the shard (synchronously).
//!
//! # Threads and sharing
//!
//! Every qdrant-edge call runs on tokio's blocking pool. A directory can hold one
//! open shard only (its WAL is locked), so every [`EdgeVectorIndex`] of the same
//! directory in a process shares one shard ([`SharedShard`]).
//!
//! [`EdgeCatalog`] keeps collections by name, one shard directory each under a
//! root directory (what a re-index creates, opens and drops); dropping one
//! closes its shard for every handle in the process (later calls fail with
//! [`IndexError::CollectionNotFound`]) and deletes the directory.
//!
//! Without [`EdgeVectorIndex::optimize`] search is exhaustive over the appendable
//! segment; `optimize` builds the HNSW index (for segments above qdrant-edge's
//! indexing threshold) and vacuums deleted points. Writes wait while it runs.

mod catalog;
mod error;
mod shard;

pub use catalog::EdgeCatalog;
pub use error::EdgeError;
pub use shard::{SharedShard, WriteTicket};

use std::path::Path;

use async_trait::async_trait;
use qdrant_edge::external::ordered_float::OrderedFloat;
use qdrant_edge::{
    CountRequest, CreateIndex, EdgeConfig, EdgeVectorParams, FieldIndexOperations, JsonPath,
    NamedQuery, PayloadFieldSchema, PayloadSchemaType, PointInsertOperations, PointOperations,
    PointStruct, PointStructPersisted, QueryEnum, QueryRequest, ScoringQuery, ScrollRequest,
    UpdateOperation, VectorInternal, WithPayloadInterface, WithVector,
};
use serde_json::{Value, json};
use tandem_core::{
    Distance, Filter, IndexError, IndexQuery, Outcome, Page, Point, PointId, PointInfo, RecordId,
    Scope, ScoredPoint, VectorIndex,
};

/// The payload fields every point carries.
const RECORD_ID: &str = "record_id";
const SCOPE: &str = "scope";
const METADATA: &str = "metadata";
const WRITTEN_AT_MS: &str = "written_at_ms";

/// A [`VectorIndex`] on qdrant-edge, persisted under a data directory. See the
/// [module docs](self) for the layout, the scores and the flush semantics.
#[derive(Clone, Debug)]
pub struct EdgeVectorIndex {
    shard: SharedShard,
    dimension: usize,
    distance: Distance,
}

impl EdgeVectorIndex {
    /// Opens the index stored in `dir`, creating it (and the directory) when
    /// absent. An existing index must have the same dimension and distance,
    /// otherwise [`IndexError::Config`].
    pub async fn open(
        dir: impl AsRef<Path>,
        dimension: usize,
        distance: Distance,
    ) -> Result<Self, IndexError> {
        if dimension == 0 {
            return Err(IndexError::Config {
                message: "the vector dimension must be at least 1".into(),
            });
        }
        let dir = dir.as_ref();
        let config = EdgeConfig::builder()
            .vector(
                "",
                EdgeVectorParams::builder(dimension, edge_distance(distance)).build(),
            )
            .build();
        let shard = SharedShard::open(dir, config).await?;
        let (stored_dimension, stored_distance) = stored_layout(&shard)?;
        if (stored_dimension, stored_distance) != (dimension, distance) {
            return Err(IndexError::Config {
                message: format!(
                    "the index in {} has dimension {stored_dimension} and distance \
                     {stored_distance}; the configuration asks for dimension {dimension} and \
                     distance {distance}",
                    dir.display(),
                ),
            });
        }
        Self::with_shard(shard, dimension, distance).await
    }

    /// Opens the index stored in `dir`, with the dimension and distance the
    /// shard was created with; never creates one.
    ///
    /// Errors: [`IndexError::CollectionNotFound`] (naming the directory) when
    /// `dir` holds no index; [`IndexError::Config`] when it holds a shard
    /// Tandem cannot use (no unnamed dense vector, or the Manhattan
    /// distance).
    pub async fn open_existing(dir: impl AsRef<Path>) -> Result<Self, IndexError> {
        let dir = dir.as_ref();
        let Some(shard) = SharedShard::open_existing(dir).await? else {
            return Err(IndexError::CollectionNotFound {
                collection: dir.display().to_string(),
            });
        };
        let (dimension, distance) = stored_layout(&shard)?;
        Self::with_shard(shard, dimension, distance).await
    }

    /// The index on an open shard of this layout (checked by the caller).
    async fn with_shard(
        shard: SharedShard,
        dimension: usize,
        distance: Distance,
    ) -> Result<Self, IndexError> {
        let index = Self {
            shard,
            dimension,
            distance,
        };
        index.ensure_payload_indexes().await?;
        Ok(index)
    }

    /// The directory the index lives in.
    pub fn data_dir(&self) -> &Path {
        self.shard.dir()
    }

    /// Runs qdrant-edge's optimizers to completion (HNSW index, segment merges,
    /// vacuum of deleted points), then flushes. Writes wait while it runs.
    /// Returns whether anything changed.
    pub async fn optimize(&self) -> Result<bool, IndexError> {
        Ok(self.shard.optimize().await?)
    }

    /// The number of flushes the shard performed since this process opened it
    /// (writes share flushes: see the module docs).
    pub fn flush_count(&self) -> u64 {
        self.shard.flush_count()
    }

    /// Creates the keyword indexes on `record_id` and `scope` if missing.
    async fn ensure_payload_indexes(&self) -> Result<(), IndexError> {
        let schema = self
            .shard
            .read(|shard| Ok(shard.info().payload_schema))
            .await?;
        let mut created = None;
        for field in [RECORD_ID, SCOPE] {
            if schema.keys().any(|key| key.to_string() == field) {
                continue;
            }
            let operation = UpdateOperation::FieldIndexOperation(
                FieldIndexOperations::CreateIndex(CreateIndex {
                    field_name: path(field),
                    field_schema: Some(PayloadFieldSchema::FieldType(PayloadSchemaType::Keyword)),
                }),
            );
            created = Some(self.shard.update(operation).await?);
        }
        if let Some(ticket) = created {
            self.shard.make_durable(ticket).await?;
        }
        Ok(())
    }

    fn check_vector(&self, what: &str, vector: &[f32]) -> Result<(), IndexError> {
        if vector.len() != self.dimension {
            return Err(invalid(format!(
                "{what}: vector has dimension {}; the index expects {}",
                vector.len(),
                self.dimension
            )));
        }
        if let Some(position) = vector.iter().position(|x| !x.is_finite()) {
            return Err(invalid(format!(
                "{what}: vector component {position} is not finite"
            )));
        }
        Ok(())
    }

    /// Applies a write and returns once it is durable.
    async fn write(&self, operation: UpdateOperation) -> Result<(), IndexError> {
        let ticket = self.shard.update(operation).await?;
        self.shard.make_durable(ticket).await?;
        Ok(())
    }
}

#[async_trait]
impl VectorIndex for EdgeVectorIndex {
    fn dimension(&self) -> usize {
        self.dimension
    }

    fn distance(&self) -> Distance {
        self.distance
    }

    async fn upsert(&self, points: &[Point]) -> Result<(), IndexError> {
        if points.is_empty() {
            return Ok(());
        }
        // Validate the whole batch first: qdrant-edge applies a batch point by
        // point and would stop half-way.
        for point in points {
            self.check_vector(&format!("point {}", point.id), &point.vector)?;
        }
        let points = points
            .iter()
            .map(|point| {
                let payload = json!({
                    RECORD_ID: point.record_id.to_string(),
                    SCOPE: point.scope.as_str(),
                    METADATA: Value::Object(point.metadata.clone()),
                    WRITTEN_AT_MS: point.written_at_ms,
                });
                // The payload is an object literal, which `PointStruct::new` requires.
                PointStructPersisted::from(PointStruct::new(
                    edge_id(point.id),
                    point.vector.clone(),
                    payload,
                ))
            })
            .collect();
        self.write(UpdateOperation::PointOperation(
            PointOperations::UpsertPoints(PointInsertOperations::PointsList(points)),
        ))
        .await
    }

    async fn delete(&self, ids: &[PointId]) -> Result<(), IndexError> {
        if ids.is_empty() {
            return Ok(());
        }
        let ids = ids.iter().copied().map(edge_id).collect();
        self.write(UpdateOperation::PointOperation(
            PointOperations::DeletePoints { ids },
        ))
        .await
    }

    async fn retrieve(&self, ids: &[PointId]) -> Result<Vec<PointInfo>, IndexError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<_> = ids.iter().copied().map(edge_id).collect();
        let records = self
            .shard
            .read(move |shard| {
                shard.retrieve(&ids, Some(info_fields()), Some(WithVector::Bool(false)))
            })
            .await?;
        records
            .into_iter()
            .map(|record| point_info(record.id, record.payload.map(|p| p.0)))
            .collect()
    }

    async fn search(&self, query: &IndexQuery) -> Result<Vec<ScoredPoint>, IndexError> {
        self.check_vector("query", &query.vector)?;
        if query.limit == 0 {
            return Ok(Vec::new());
        }
        let euclid = self.distance == Distance::Euclid;
        let request = QueryRequest {
            prefetches: Vec::new(),
            query: Some(ScoringQuery::Vector(QueryEnum::Nearest(NamedQuery {
                query: VectorInternal::Dense(query.vector.clone()),
                using: None,
            }))),
            filter: edge_filter(&query.filter)?,
            // qdrant-edge keeps euclid hits with distance <= threshold.
            score_threshold: query
                .score_threshold
                .map(|t| OrderedFloat(if euclid { -t } else { t })),
            limit: query.limit,
            offset: 0,
            params: None,
            with_vector: WithVector::Bool(false),
            with_payload: WithPayloadInterface::Fields(vec![path(RECORD_ID)]),
        };
        let hits = self.shard.read(move |shard| shard.query(request)).await?;
        hits.into_iter()
            .map(|hit| {
                let id = point_id(hit.id)?;
                let record_id = hit
                    .payload
                    .as_ref()
                    .and_then(|p| p.0.get(RECORD_ID))
                    .and_then(Value::as_str)
                    .and_then(|s| s.parse::<RecordId>().ok())
                    .ok_or_else(|| malformed(id, RECORD_ID))?;
                Ok(ScoredPoint {
                    id,
                    record_id,
                    score: if euclid { -hit.score } else { hit.score },
                })
            })
            .collect()
    }

    async fn count(&self, scope: Option<&Scope>) -> Result<u64, IndexError> {
        let filter = edge_filter(&Filter {
            scope: scope.cloned(),
            ..Filter::default()
        })?;
        let count = self
            .shard
            .read(move |shard| {
                shard.count(CountRequest {
                    filter,
                    exact: true,
                })
            })
            .await?;
        Ok(count as u64)
    }

    async fn scroll(
        &self,
        scope: Option<&Scope>,
        offset: Option<PointId>,
        limit: usize,
    ) -> Result<Page<PointInfo, PointId>, IndexError> {
        if limit == 0 {
            return Err(invalid("scroll limit must be at least 1".into()));
        }
        let request = ScrollRequest {
            offset: offset.map(edge_id),
            limit: Some(limit),
            filter: edge_filter(&Filter {
                scope: scope.cloned(),
                ..Filter::default()
            })?,
            with_payload: Some(info_fields()),
            with_vector: WithVector::Bool(false),
            order_by: None,
        };
        let (records, next) = self.shard.read(move |shard| shard.scroll(request)).await?;
        let items = records
            .into_iter()
            .map(|record| point_info(record.id, record.payload.map(|p| p.0)))
            .collect::<Result<_, _>>()?;
        Ok(Page {
            items,
            next: next.map(point_id).transpose()?,
        })
    }
}

/// The dimension and distance of the shard's unnamed dense vector.
fn stored_layout(shard: &SharedShard) -> Result<(usize, Distance), IndexError> {
    let config = shard.config();
    let Some(params) = config.vectors.get("") else {
        return Err(IndexError::Config {
            message: format!(
                "{} holds a qdrant-edge shard without an unnamed dense vector",
                shard.dir().display()
            ),
        });
    };
    let distance = match params.distance {
        qdrant_edge::Distance::Cosine => Distance::Cosine,
        qdrant_edge::Distance::Dot => Distance::Dot,
        qdrant_edge::Distance::Euclid => Distance::Euclid,
        other => {
            return Err(IndexError::Config {
                message: format!(
                    "the index in {} uses the {other:?} distance, which Tandem does not support",
                    shard.dir().display()
                ),
            });
        }
    };
    Ok((params.size, distance))
}

fn edge_distance(distance: Distance) -> qdrant_edge::Distance {
    match distance {
        Distance::Cosine => qdrant_edge::Distance::Cosine,
        Distance::Dot => qdrant_edge::Distance::Dot,
        Distance::Euclid => qdrant_edge::Distance::Euclid,
    }
}

fn edge_id(id: PointId) -> qdrant_edge::PointId {
    qdrant_edge::PointId::Uuid(id.0)
}

fn point_id(id: qdrant_edge::PointId) -> Result<PointId, IndexError> {
    match id {
        qdrant_edge::PointId::Uuid(uuid) => Ok(PointId(uuid)),
        qdrant_edge::PointId::NumId(n) => Err(IndexError::Permanent {
            outcome: Outcome::NotApplied,
            message: format!("point {n} has a numeric id: it was not written by Tandem"),
            source: None,
        }),
    }
}

/// A payload path from a constant field name.
fn path(field: &str) -> JsonPath {
    field
        .parse()
        .expect("payload field names are valid JSON paths")
}

fn info_fields() -> WithPayloadInterface {
    WithPayloadInterface::Fields(vec![path(RECORD_ID), path(SCOPE), path(WRITTEN_AT_MS)])
}

fn point_info(
    id: qdrant_edge::PointId,
    payload: Option<serde_json::Map<String, Value>>,
) -> Result<PointInfo, IndexError> {
    let id = point_id(id)?;
    let payload = payload.unwrap_or_default();
    let record_id = payload
        .get(RECORD_ID)
        .and_then(Value::as_str)
        .and_then(|s| s.parse::<RecordId>().ok())
        .ok_or_else(|| malformed(id, RECORD_ID))?;
    let scope = payload
        .get(SCOPE)
        .and_then(Value::as_str)
        .ok_or_else(|| malformed(id, SCOPE))?;
    let written_at_ms = payload
        .get(WRITTEN_AT_MS)
        .and_then(Value::as_i64)
        .ok_or_else(|| malformed(id, WRITTEN_AT_MS))?;
    Ok(PointInfo {
        id,
        record_id,
        scope: Scope::new(scope),
        written_at_ms,
    })
}

fn malformed(id: PointId, field: &str) -> IndexError {
    IndexError::Permanent {
        outcome: Outcome::NotApplied,
        message: format!("point {id} has no valid `{field}` in its payload"),
        source: None,
    }
}

fn invalid(message: String) -> IndexError {
    IndexError::InvalidInput {
        message,
        source: None,
    }
}

/// The port's filter as a qdrant-edge filter, built in Qdrant's own JSON filter
/// syntax and parsed by qdrant-edge (which validates keys and values).
fn edge_filter(filter: &Filter) -> Result<Option<qdrant_edge::Filter>, IndexError> {
    let mut must = Vec::new();
    if let Some(scope) = &filter.scope {
        must.push(json!({"key": SCOPE, "match": {"value": scope.as_str()}}));
    }
    for (key, value) in &filter.metadata_eq {
        if key.contains(['"', '\\']) {
            return Err(invalid(format!(
                "metadata key {key:?} cannot be filtered on (it contains a quote or a backslash)"
            )));
        }
        let simple = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == '-');
        let path = if simple {
            format!("{METADATA}.{key}")
        } else {
            format!("{METADATA}.\"{key}\"")
        };
        must.push(match value {
            Value::String(_) | Value::Bool(_) => json!({"key": path, "match": {"value": value}}),
            Value::Number(n) if n.is_i64() => json!({"key": path, "match": {"value": value}}),
            Value::Number(n) if n.is_u64() => {
                return Err(invalid(format!(
                    "metadata filter {key} = {n}: integers above 2^63-1 cannot be matched"
                )));
            }
            Value::Number(n) => json!({"key": path, "range": {"gte": n, "lte": n}}),
            Value::Null => json!({"is_null": {"key": path}}),
            Value::Array(_) | Value::Object(_) => {
                return Err(invalid(format!(
                    "metadata filter on {key:?}: only strings, numbers, booleans and null can be matched"
                )));
            }
        });
    }
    if must.is_empty() {
        return Ok(None);
    }
    serde_json::from_value(json!({ "must": must }))
        .map(Some)
        .map_err(|e| invalid(format!("filter cannot be expressed for qdrant-edge: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_translate_to_qdrant_conditions() {
        let filter = Filter::scope("cat")
            .with_eq("item", json!("a"))
            .with_eq("n", json!(3))
            .with_eq("price", json!(2.5))
            .with_eq("gone", Value::Null)
            .with_eq("dotted.key", json!(true));
        let edge = edge_filter(&filter).unwrap().unwrap();
        let must = edge.must.unwrap();
        assert_eq!(must.len(), 6);
        assert!(edge_filter(&Filter::none()).unwrap().is_none());
    }

    #[test]
    fn unmatchable_filters_are_invalid_input() {
        for value in [json!([1]), json!({"a": 1}), json!(u64::MAX)] {
            let err = edge_filter(&Filter::none().with_eq("k", value)).unwrap_err();
            assert!(matches!(err, IndexError::InvalidInput { .. }), "{err:?}");
        }
        let err = edge_filter(&Filter::none().with_eq("a\"b", json!(1))).unwrap_err();
        assert!(matches!(err, IndexError::InvalidInput { .. }));
    }
}
