//! [`QdrantVectorIndex`]: the production [`VectorIndex`], Qdrant over gRPC
//! through `qdrant-client`.
//!
//! - [`QdrantVectorIndex::connect`] builds the client (without qdrant-client's
//!   version check, which prints to stdout), checks the server's health, and
//!   ensures the collection: created if absent with the configured size and
//!   distance and keyword payload indexes on `record_id` and `scope`; an
//!   existing collection of another size or distance is an
//!   [`IndexError::Config`], at start, never at the first write.
//! - Points are UUIDs (Tandem's [`PointId`]); the payload is
//!   `{record_id, scope, metadata, written_at_ms}`.
//! - Writes use `wait=true` and the configured write ordering, are chunked, and
//!   run at most `parallel_requests` chunk requests at once. Only an update
//!   status of `Completed` counts as success.
//! - Errors are classified in [`error`].
//!
//! The adapter translates; it never retries (qdrant-client itself re-sends a
//! points request once on some errors, which the idempotent protocol absorbs).
//! See `docs/qdrant.md`.

pub mod config;
pub mod convert;
pub mod error;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use futures::future::BoxFuture;
use futures::stream::{self, StreamExt};
use qdrant_client::Qdrant;
use qdrant_client::qdrant::{
    self, CollectionExistsRequest, CountPoints, CreateCollection, CreateFieldIndexCollection,
    DeleteCollection, DeletePoints, FieldType, GetCollectionInfoRequest, GetPoints,
    PayloadSchemaType, PointsIdsList, PointsSelector, Query, QueryPoints, ScrollPoints,
    UpsertPoints, VectorParams, VectorsConfig, points_selector, vectors_config,
};
use tandem_core::{
    Distance, IndexError, IndexQuery, Outcome, Page, Point, PointId, PointInfo, Scope, ScoredPoint,
    VectorIndex,
};

pub use config::{QdrantConfig, Secret, WriteOrdering};
use convert::{METADATA, RECORD_ID, SCOPE};
use error::{Op, check_update, classify, partially_applied};

/// The Qdrant-backed [`VectorIndex`]. Cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct QdrantVectorIndex {
    client: Qdrant,
    config: QdrantConfig,
    server_version: String,
}

impl fmt::Debug for QdrantVectorIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QdrantVectorIndex")
            .field("url", &self.config.url)
            .field("collection", &self.config.collection)
            .field("dimension", &self.config.dimension)
            .field("distance", &self.config.distance)
            .field("server_version", &self.server_version)
            .finish_non_exhaustive()
    }
}

impl QdrantVectorIndex {
    /// Connects: validates the configuration, builds the client, checks the
    /// server's health and [ensures the collection](Self::ensure_collection).
    ///
    /// Errors: [`IndexError::Config`] for an invalid configuration or a
    /// collection of another layout; [`IndexError::Transient`] (`NotApplied`)
    /// naming the URL when the server cannot be reached;
    /// [`IndexError::Unauthorized`] when the API key is refused.
    pub async fn connect(config: QdrantConfig) -> Result<Self, IndexError> {
        config.validate()?;
        let client = Qdrant::from_url(&config.url)
            .api_key(config.api_key.as_ref().map(|k| k.expose().to_owned()))
            .timeout(config.timeout)
            .connect_timeout(config.connect_timeout)
            .skip_compatibility_check()
            .build()
            .map_err(|e| classify(e, Op::Read, &config.collection))?;
        let server_version = match client.health_check().await {
            Ok(reply) => reply.version,
            Err(e) => return Err(unreachable(&config, e)),
        };
        let index = Self {
            client,
            config,
            server_version,
        };
        if let Err(e) = index.ensure_collection().await {
            return Err(at_store(&index.config.url, e));
        }
        tracing::info!(
            url = %index.config.url,
            collection = %index.config.collection,
            dimension = index.config.dimension,
            distance = %index.config.distance,
            server_version = %index.server_version,
            "connected to Qdrant"
        );
        Ok(index)
    }

    /// The configuration (its `Debug` hides the API key).
    pub fn config(&self) -> &QdrantConfig {
        &self.config
    }

    /// The collection's name.
    pub fn collection(&self) -> &str {
        &self.config.collection
    }

    /// The version the server reported in its health check.
    pub fn server_version(&self) -> &str {
        &self.server_version
    }

    /// Creates the collection if it is absent (configured size and distance,
    /// keyword payload indexes on `record_id` and `scope`); checks an existing
    /// one. Idempotent, and safe when several processes start at once.
    ///
    /// An existing collection with another vector size or distance, or with
    /// named vectors, fails with [`IndexError::Config`]: Tandem never writes to
    /// a collection it does not match. A missing payload index is created.
    pub async fn ensure_collection(&self) -> Result<(), IndexError> {
        let name = self.collection();
        let exists = self
            .client
            .collection_exists(CollectionExistsRequest {
                collection_name: name.to_owned(),
            })
            .await
            .map_err(|e| classify(e, Op::Read, name))?;
        if !exists {
            let create = CreateCollection {
                collection_name: name.to_owned(),
                vectors_config: Some(VectorsConfig {
                    config: Some(vectors_config::Config::Params(VectorParams {
                        size: self.config.dimension as u64,
                        distance: convert::distance(self.config.distance) as i32,
                        ..Default::default()
                    })),
                }),
                timeout: Some(self.config.server_wait_secs()),
                ..Default::default()
            };
            match self.client.create_collection(create).await {
                Ok(_) => tracing::info!(collection = %name, "created Qdrant collection"),
                // Another process may have created it meanwhile: check it below.
                Err(e) => {
                    let err = classify(e, Op::Write, name);
                    if !self.exists_now().await {
                        return Err(err);
                    }
                }
            }
        }
        let info = self
            .client
            .collection_info(GetCollectionInfoRequest {
                collection_name: name.to_owned(),
            })
            .await
            .map_err(|e| classify(e, Op::Read, name))?
            .result
            .ok_or_else(|| IndexError::Config {
                message: format!("Qdrant returned no information on collection `{name}`"),
            })?;
        self.check_layout(&info)?;
        for field in [RECORD_ID, SCOPE] {
            match info.payload_schema.get(field) {
                Some(schema) if schema.data_type == PayloadSchemaType::Keyword as i32 => {}
                Some(schema) => tracing::warn!(
                    collection = %name,
                    field,
                    data_type = schema.data_type,
                    "payload field is indexed with another type than keyword; leaving it"
                ),
                None => self.create_keyword_index(field).await?,
            }
        }
        Ok(())
    }

    /// Deletes the collection (for tests and operators); `true` if it existed.
    pub async fn delete_collection(&self) -> Result<bool, IndexError> {
        let name = self.collection();
        let reply = self
            .client
            .delete_collection(DeleteCollection {
                collection_name: name.to_owned(),
                timeout: Some(self.config.server_wait_secs()),
            })
            .await
            .map_err(|e| classify(e, Op::Write, name))?;
        Ok(reply.result)
    }

    async fn exists_now(&self) -> bool {
        self.client
            .collection_exists(CollectionExistsRequest {
                collection_name: self.collection().to_owned(),
            })
            .await
            .unwrap_or(false)
    }

    fn check_layout(&self, info: &qdrant::CollectionInfo) -> Result<(), IndexError> {
        let name = self.collection();
        let vectors = info
            .config
            .as_ref()
            .and_then(|c| c.params.as_ref())
            .and_then(|p| p.vectors_config.as_ref())
            .and_then(|v| v.config.as_ref());
        let params = match vectors {
            Some(vectors_config::Config::Params(p)) => p,
            Some(vectors_config::Config::ParamsMap(_)) => {
                return Err(IndexError::Config {
                    message: format!(
                        "Qdrant collection `{name}` uses named vectors; Tandem needs a collection \
                         with one unnamed vector"
                    ),
                });
            }
            None => {
                return Err(IndexError::Config {
                    message: format!(
                        "Qdrant collection `{name}` has no dense vector configuration"
                    ),
                });
            }
        };
        let want_distance = convert::distance(self.config.distance);
        let got_distance = qdrant::Distance::try_from(params.distance)
            .map(|d| d.as_str_name().to_owned())
            .unwrap_or_else(|_| format!("#{}", params.distance));
        if params.size != self.config.dimension as u64 || params.distance != want_distance as i32 {
            return Err(IndexError::Config {
                message: format!(
                    "Qdrant collection `{name}` exists with vector size {} and distance {}, but \
                     Tandem is configured for size {} and distance {}: use another collection \
                     or fix the configuration",
                    params.size,
                    got_distance,
                    self.config.dimension,
                    want_distance.as_str_name()
                ),
            });
        }
        Ok(())
    }

    async fn create_keyword_index(&self, field: &str) -> Result<(), IndexError> {
        let name = self.collection();
        let reply = self
            .client
            .create_field_index(CreateFieldIndexCollection {
                collection_name: name.to_owned(),
                wait: Some(true),
                field_name: field.to_owned(),
                field_type: Some(FieldType::Keyword as i32),
                ordering: Some(self.ordering()),
                timeout: Some(self.config.server_wait_secs()),
                ..Default::default()
            })
            .await
            .map_err(|e| classify(e, Op::Write, name))?;
        check_update(&reply, &format!("creating the payload index on `{field}`"))?;
        tracing::info!(collection = %name, field, "created keyword payload index");
        Ok(())
    }

    fn ordering(&self) -> qdrant::WriteOrdering {
        let kind = match self.config.write_ordering {
            WriteOrdering::Weak => qdrant::WriteOrderingType::Weak,
            WriteOrdering::Medium => qdrant::WriteOrderingType::Medium,
            WriteOrdering::Strong => qdrant::WriteOrderingType::Strong,
        };
        qdrant::WriteOrdering {
            r#type: kind as i32,
        }
    }

    fn check_dimension(&self, len: usize, what: &str) -> Result<(), IndexError> {
        if len == self.config.dimension {
            return Ok(());
        }
        Err(IndexError::InvalidInput {
            message: format!(
                "{what} has dimension {len}; collection `{}` expects {}",
                self.collection(),
                self.config.dimension
            ),
            source: None,
        })
    }

    /// Runs the chunk requests, at most `parallel_requests` at once. After the
    /// first failure no further chunk is started; chunks in flight finish, so
    /// the outcome can be told: `NotApplied` only if no chunk may have been
    /// applied. (A request future does nothing until polled, so a chunk that is
    /// skipped was never sent.)
    async fn run_chunks(
        &self,
        chunks: Vec<BoxFuture<'_, Result<(), IndexError>>>,
    ) -> Result<(), IndexError> {
        let total = chunks.len();
        if total <= 1 {
            return match chunks.into_iter().next() {
                Some(only) => only.await,
                None => Ok(()),
            };
        }
        let failed = &AtomicBool::new(false);
        // Built eagerly into a Vec (still unpolled, so unsent): a closure in the
        // stream's type trips rustc's higher-ranked inference in async-trait methods.
        let guarded: Vec<_> = chunks
            .into_iter()
            .map(|request| unless_failed(failed, request))
            .collect();
        let results: Vec<Option<Result<(), IndexError>>> = stream::iter(guarded)
            .buffer_unordered(self.config.parallel_requests)
            .collect()
            .await;
        let applied = results.iter().filter(|r| matches!(r, Some(Ok(())))).count();
        let mut errors = results.into_iter().flatten().filter_map(Result::err);
        let Some(first) = errors.next() else {
            return Ok(());
        };
        let maybe_applied = applied > 0
            || first.outcome() == Outcome::Unknown
            || errors.any(|e| e.outcome() == Outcome::Unknown);
        Err(if maybe_applied {
            partially_applied(first, applied, total)
        } else {
            first
        })
    }

    async fn upsert_chunk(&self, points: &[Point]) -> Result<(), IndexError> {
        let name = self.collection();
        let request = UpsertPoints {
            collection_name: name.to_owned(),
            wait: Some(true),
            points: points.iter().map(convert::point_struct).collect(),
            ordering: Some(self.ordering()),
            timeout: Some(self.config.server_wait_secs()),
            ..Default::default()
        };
        let reply = self
            .client
            .upsert_points(request)
            .await
            .map_err(|e| classify(e, Op::Write, name))?;
        check_update(&reply, &format!("upsert of {} points", points.len()))?;
        tracing::debug!(collection = %name, points = points.len(), "upserted chunk");
        Ok(())
    }

    async fn delete_chunk(&self, ids: &[PointId]) -> Result<(), IndexError> {
        let name = self.collection();
        let request = DeletePoints {
            collection_name: name.to_owned(),
            wait: Some(true),
            points: Some(PointsSelector {
                points_selector_one_of: Some(points_selector::PointsSelectorOneOf::Points(
                    PointsIdsList {
                        ids: ids.iter().copied().map(convert::point_id).collect(),
                    },
                )),
            }),
            ordering: Some(self.ordering()),
            timeout: Some(self.config.server_wait_secs()),
            ..Default::default()
        };
        let reply = self
            .client
            .delete_points(request)
            .await
            .map_err(|e| classify(e, Op::Write, name))?;
        check_update(&reply, &format!("delete of {} points", ids.len()))?;
        tracing::debug!(collection = %name, points = ids.len(), "deleted chunk");
        Ok(())
    }
}

/// Sends `request` unless an earlier chunk failed; records a failure.
async fn unless_failed(
    failed: &AtomicBool,
    request: BoxFuture<'_, Result<(), IndexError>>,
) -> Option<Result<(), IndexError>> {
    if failed.load(Ordering::Acquire) {
        return None;
    }
    let result = request.await;
    if result.is_err() {
        failed.store(true, Ordering::Release);
    }
    Some(result)
}

/// The error of a failed health check: an unreachable server says so, naming it.
fn unreachable(config: &QdrantConfig, err: qdrant_client::QdrantError) -> IndexError {
    match classify(err, Op::Read, &config.collection) {
        IndexError::Transient {
            retry_after,
            message,
            source,
            ..
        } => IndexError::Transient {
            outcome: Outcome::NotApplied,
            retry_after,
            message: format!(
                "Qdrant at {} is unreachable (health check failed): {message}",
                config.url
            ),
            source,
        },
        other => at_store(&config.url, other),
    }
}

/// Names the server in an error met while connecting (never the API key: the
/// URL was checked to carry no credentials).
fn at_store(url: &str, err: IndexError) -> IndexError {
    let named = |message: String| format!("Qdrant at {url}: {message}");
    match err {
        IndexError::Transient {
            outcome,
            retry_after,
            message,
            source,
        } => IndexError::Transient {
            outcome,
            retry_after,
            message: named(message),
            source,
        },
        IndexError::Permanent {
            outcome,
            message,
            source,
        } => IndexError::Permanent {
            outcome,
            message: named(message),
            source,
        },
        IndexError::InvalidInput { message, source } => IndexError::InvalidInput {
            message: named(message),
            source,
        },
        IndexError::Unauthorized { message } => IndexError::Unauthorized {
            message: named(message),
        },
        // Config and CollectionNotFound already name the collection.
        other => other,
    }
}

#[async_trait]
impl VectorIndex for QdrantVectorIndex {
    fn dimension(&self) -> usize {
        self.config.dimension
    }

    fn distance(&self) -> Distance {
        self.config.distance
    }

    async fn upsert(&self, points: &[Point]) -> Result<(), IndexError> {
        for (i, p) in points.iter().enumerate() {
            self.check_dimension(p.vector.len(), &format!("point #{i} ({})", p.id))?;
        }
        let chunks = points
            .chunks(self.config.chunk_size)
            .map(|chunk| Box::pin(self.upsert_chunk(chunk)) as BoxFuture<'_, _>)
            .collect();
        self.run_chunks(chunks).await
    }

    async fn delete(&self, ids: &[PointId]) -> Result<(), IndexError> {
        let chunks = ids
            .chunks(self.config.chunk_size)
            .map(|chunk| Box::pin(self.delete_chunk(chunk)) as BoxFuture<'_, _>)
            .collect();
        self.run_chunks(chunks).await
    }

    async fn retrieve(&self, ids: &[PointId]) -> Result<Vec<PointInfo>, IndexError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let name = self.collection();
        let reply = self
            .client
            .get_points(GetPoints {
                collection_name: name.to_owned(),
                ids: ids.iter().copied().map(convert::point_id).collect(),
                with_payload: Some(convert::info_payload()),
                with_vectors: Some(convert::no_vectors()),
                ..Default::default()
            })
            .await
            .map_err(|e| classify(e, Op::Read, name))?;
        reply
            .result
            .iter()
            .map(|p| convert::point_info(p.id.as_ref(), &p.payload, name))
            .collect()
    }

    async fn search(&self, query: &IndexQuery) -> Result<Vec<ScoredPoint>, IndexError> {
        self.check_dimension(query.vector.len(), "the query vector")?;
        let filter = convert::search_filter(&query.filter)?;
        if query.limit == 0 {
            return Ok(Vec::new());
        }
        let exact = !query.filter.metadata_eq.is_empty();
        let fields: &[&str] = if exact {
            &[RECORD_ID, METADATA]
        } else {
            &[RECORD_ID]
        };
        let name = self.collection();
        let distance = self.config.distance;
        let reply = self
            .client
            .query(QueryPoints {
                collection_name: name.to_owned(),
                query: Some(Query::new_nearest(query.vector.clone())),
                filter,
                limit: Some(query.limit as u64),
                score_threshold: query
                    .score_threshold
                    .map(|t| convert::threshold(distance, t)),
                with_payload: Some(convert::include(fields)),
                with_vectors: Some(convert::no_vectors()),
                ..Default::default()
            })
            .await
            .map_err(|e| classify(e, Op::Read, name))?;
        let mut hits = Vec::with_capacity(reply.result.len());
        for p in &reply.result {
            if exact && !convert::matches_exactly(&query.filter, p.payload.get(METADATA)) {
                continue;
            }
            let id = convert::from_point_id(p.id.as_ref(), name)?;
            hits.push(ScoredPoint {
                id,
                record_id: convert::record_id(id, &p.payload, name)?,
                score: convert::score(distance, p.score),
            });
        }
        Ok(hits)
    }

    async fn count(&self, scope: Option<&Scope>) -> Result<u64, IndexError> {
        let name = self.collection();
        let reply = self
            .client
            .count(CountPoints {
                collection_name: name.to_owned(),
                filter: convert::scope_filter(scope),
                exact: Some(true),
                ..Default::default()
            })
            .await
            .map_err(|e| classify(e, Op::Read, name))?;
        Ok(reply.result.map_or(0, |r| r.count))
    }

    async fn scroll(
        &self,
        scope: Option<&Scope>,
        offset: Option<PointId>,
        limit: usize,
    ) -> Result<Page<PointInfo, PointId>, IndexError> {
        if limit == 0 {
            return Err(IndexError::InvalidInput {
                message: "scroll limit must be positive".into(),
                source: None,
            });
        }
        let name = self.collection();
        let reply = self
            .client
            .scroll(ScrollPoints {
                collection_name: name.to_owned(),
                filter: convert::scope_filter(scope),
                offset: offset.map(convert::point_id),
                limit: Some(u32::try_from(limit).unwrap_or(u32::MAX)),
                with_payload: Some(convert::info_payload()),
                with_vectors: Some(convert::no_vectors()),
                ..Default::default()
            })
            .await
            .map_err(|e| classify(e, Op::Read, name))?;
        let items = reply
            .result
            .iter()
            .map(|p| convert::point_info(p.id.as_ref(), &p.payload, name))
            .collect::<Result<Vec<_>, _>>()?;
        // Qdrant's own cursor: the id the next page starts with.
        let next = reply
            .next_page_offset
            .as_ref()
            .map(|id| convert::from_point_id(Some(id), name))
            .transpose()?;
        Ok(Page { items, next })
    }
}
