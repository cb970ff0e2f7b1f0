//! [`QdrantVectorIndex`]: the production [`VectorIndex`], Qdrant over gRPC
//! through `qdrant-client`.
//!
//! - [`QdrantVectorIndex::connect`] builds the client (without qdrant-client's
//!   version check, which prints to stdout), checks the server's health, and
//!   ensures the collection: created if absent with the configured size,
//!   distance and [`CollectionSettings`], keyword payload indexes on
//!   `record_id` and `scope` and the configured indexes on metadata keys; an
//!   existing collection of another size, distance, shard number, replication
//!   factor or quantization kind is an [`IndexError::Config`], at start, never
//!   at the first write (other differences are warnings).
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

mod catalog;
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
    self, BinaryQuantizationBuilder, CollectionExistsRequest, CountPoints, CreateCollection,
    CreateCollectionBuilder, CreateFieldIndexCollectionBuilder, DeleteCollection, DeletePoints,
    GetCollectionInfoRequest, GetPoints, HnswConfigDiffBuilder, PointsIdsList, PointsSelector,
    Query, QueryPoints, ScalarQuantizationBuilder, ScrollPoints, UpsertPoints, VectorParamsBuilder,
    points_selector, vectors_config,
};
use tandem_core::{
    Distance, IndexError, IndexQuery, Outcome, Page, Point, PointId, PointInfo, Scope, ScoredPoint,
    VectorIndex,
};

pub use catalog::QdrantCatalog;
pub use config::{
    CollectionSettings, PayloadFieldType, QdrantConfig, Quantization, Secret, WriteOrdering,
};
use convert::{METADATA, RECORD_ID, SCOPE};
use error::{Op, check_update, classify, partially_applied};

/// The server version of an index built without reaching the server.
const NOT_REACHED: &str = "unknown (not reached yet)";

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

    /// Builds the client without reaching the server: no health check, no
    /// collection check (the gRPC channel connects on first use). For
    /// processes that must start while the index is down — deferred writes
    /// never call it — and check it later (`tandem index-worker`, `serve`'s
    /// probe). Errors only for an invalid configuration.
    pub fn connect_lazy(config: QdrantConfig) -> Result<Self, IndexError> {
        config.validate()?;
        let client = Qdrant::from_url(&config.url)
            .api_key(config.api_key.as_ref().map(|k| k.expose().to_owned()))
            .timeout(config.timeout)
            .connect_timeout(config.connect_timeout)
            .skip_compatibility_check()
            .build()
            .map_err(|e| classify(e, Op::Read, &config.collection))?;
        Ok(Self {
            client,
            config,
            server_version: NOT_REACHED.to_owned(),
        })
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

    /// Creates the collection if it is absent (configured size, distance and
    /// [`CollectionSettings`]; keyword payload indexes on `record_id` and
    /// `scope`, and the configured payload indexes on `metadata.<key>`);
    /// checks an existing one. Idempotent, and safe when several processes
    /// start at once.
    ///
    /// An existing collection with another vector size or distance, or with
    /// named vectors, or whose `shard_number`, `replication_factor` or
    /// quantization kind differ from configured ones, fails with
    /// [`IndexError::Config`]: Tandem never writes to a collection it does not
    /// match, and never alters one. Other configured settings that differ
    /// (HNSW parameters, `on_disk` flags, `write_consistency_factor`,
    /// quantization options, a payload index of another type) are logged as
    /// warnings. A missing payload index is created (`wait=true`).
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
            let create = create_request(&self.config);
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
        let info = self.collection_info().await?;
        self.adopt(&info).await
    }

    /// The collection's description, as the server reports it.
    async fn collection_info(&self) -> Result<qdrant::CollectionInfo, IndexError> {
        let name = self.collection();
        self.client
            .collection_info(GetCollectionInfoRequest {
                collection_name: name.to_owned(),
            })
            .await
            .map_err(|e| classify(e, Op::Read, name))?
            .result
            .ok_or_else(|| IndexError::Config {
                message: format!("Qdrant returned no information on collection `{name}`"),
            })
    }

    /// Checks an existing collection against the configuration (layout and
    /// settings) and creates the payload indexes it lacks: the part of
    /// [`ensure_collection`](Self::ensure_collection) after the collection
    /// exists.
    async fn adopt(&self, info: &qdrant::CollectionInfo) -> Result<(), IndexError> {
        let name = self.collection();
        self.check_layout(info)?;
        self.check_settings(info)?;
        for (field, kind) in self.wanted_payload_indexes()? {
            match info.payload_schema.get(&field) {
                Some(schema) if schema.data_type == convert::schema_type(kind) as i32 => {}
                Some(schema) => tracing::warn!(
                    collection = %name,
                    field,
                    expected = %kind,
                    found = %convert::schema_type_name(schema.data_type),
                    "payload field is indexed with another type than configured; leaving it \
                     (filters still work, maybe slower)"
                ),
                None => self.create_field_index(&field, kind).await?,
            }
        }
        Ok(())
    }

    /// The payload indexes the collection must have: keyword indexes on
    /// `record_id` and `scope`, and the configured ones on `metadata.<key>`.
    fn wanted_payload_indexes(&self) -> Result<Vec<(String, PayloadFieldType)>, IndexError> {
        let mut wanted = vec![
            (RECORD_ID.to_owned(), PayloadFieldType::Keyword),
            (SCOPE.to_owned(), PayloadFieldType::Keyword),
        ];
        for (key, kind) in &self.config.collection_settings.payload_indexes {
            // Validated in `QdrantConfig::validate`; mapped again for safety.
            let path = convert::metadata_path(key).map_err(|e| IndexError::Config {
                message: format!("Qdrant collection setting `payload_indexes`: {e}"),
            })?;
            wanted.push((path, *kind));
        }
        Ok(wanted)
    }

    /// Compares an existing collection with the configured settings (unset
    /// ones are not checked). A difference that changes what the collection
    /// holds or how it survives a node loss — `shard_number`,
    /// `replication_factor`, the quantization kind — is an
    /// [`IndexError::Config`] naming each setting with the expected and found
    /// values; any other difference is a warning.
    fn check_settings(&self, info: &qdrant::CollectionInfo) -> Result<(), IndexError> {
        let name = self.collection();
        let found = convert::FoundSettings::of(info);
        let mut errors = Vec::new();
        for d in found.differences(&self.config.collection_settings) {
            if d.fatal {
                errors.push(format!(
                    "`{}`: expected {}, found {}",
                    d.setting, d.expected, d.found
                ));
            } else {
                tracing::warn!(
                    collection = %name,
                    setting = d.setting,
                    expected = %d.expected,
                    found = %d.found,
                    "existing Qdrant collection differs from the configured setting; using it as it is"
                );
            }
        }
        if errors.is_empty() {
            return Ok(());
        }
        Err(IndexError::Config {
            message: format!(
                "Qdrant collection `{name}` exists with other settings than configured: {}. \
                 Tandem never alters an existing collection: use another collection, change \
                 the configuration, or recreate the collection",
                errors.join("; ")
            ),
        })
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
        let params = vector_params(info, name)?;
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

    async fn create_field_index(
        &self,
        field: &str,
        kind: PayloadFieldType,
    ) -> Result<(), IndexError> {
        let name = self.collection();
        let request =
            CreateFieldIndexCollectionBuilder::new(name, field, convert::field_type(kind))
                .wait(true)
                .ordering(self.ordering())
                .timeout(self.config.server_wait_secs());
        let reply = self
            .client
            .create_field_index(request)
            .await
            .map_err(|e| classify(e, Op::Write, name))?;
        check_update(&reply, &format!("creating the payload index on `{field}`"))?;
        tracing::info!(collection = %name, field, kind = %kind, "created payload index");
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

/// The parameters of the collection's one unnamed dense vector; an
/// [`IndexError::Config`] for a collection with named vectors or none.
fn vector_params<'a>(
    info: &'a qdrant::CollectionInfo,
    name: &str,
) -> Result<&'a qdrant::VectorParams, IndexError> {
    let vectors = info
        .config
        .as_ref()
        .and_then(|c| c.params.as_ref())
        .and_then(|p| p.vectors_config.as_ref())
        .and_then(|v| v.config.as_ref());
    match vectors {
        Some(vectors_config::Config::Params(p)) => Ok(p),
        Some(vectors_config::Config::ParamsMap(_)) => Err(IndexError::Config {
            message: format!(
                "Qdrant collection `{name}` uses named vectors; Tandem needs a collection \
                 with one unnamed vector"
            ),
        }),
        None => Err(IndexError::Config {
            message: format!("Qdrant collection `{name}` has no dense vector configuration"),
        }),
    }
}

/// The request that creates the collection: the vector's size and distance
/// and every configured collection setting (unset ones are left to Qdrant).
fn create_request(config: &QdrantConfig) -> CreateCollection {
    let s = &config.collection_settings;
    let mut vectors =
        VectorParamsBuilder::new(config.dimension as u64, convert::distance(config.distance));
    if let Some(on_disk) = s.on_disk {
        vectors = vectors.on_disk(on_disk);
    }
    let mut create = CreateCollectionBuilder::new(config.collection.as_str())
        .vectors_config(vectors)
        .timeout(config.server_wait_secs());
    if let Some(n) = s.shard_number {
        create = create.shard_number(n);
    }
    if let Some(n) = s.replication_factor {
        create = create.replication_factor(n);
    }
    if let Some(n) = s.write_consistency_factor {
        create = create.write_consistency_factor(n);
    }
    if let Some(on_disk) = s.on_disk_payload {
        create = create.on_disk_payload(on_disk);
    }
    if s.hnsw_m.is_some() || s.hnsw_ef_construct.is_some() {
        let mut hnsw = HnswConfigDiffBuilder::default();
        if let Some(m) = s.hnsw_m {
            hnsw = hnsw.m(m);
        }
        if let Some(ef) = s.hnsw_ef_construct {
            hnsw = hnsw.ef_construct(ef);
        }
        create = create.hnsw_config(hnsw);
    }
    match s.quantization {
        None | Some(Quantization::None) => {}
        Some(Quantization::Scalar {
            quantile,
            always_ram,
        }) => {
            // `default()` is int8, the only scalar type.
            let mut scalar = ScalarQuantizationBuilder::default();
            if let Some(q) = quantile {
                scalar = scalar.quantile(q);
            }
            if let Some(r) = always_ram {
                scalar = scalar.always_ram(r);
            }
            create = create.quantization_config(scalar);
        }
        Some(Quantization::Binary { always_ram }) => {
            let mut binary = BinaryQuantizationBuilder::default();
            if let Some(r) = always_ram {
                binary = binary.always_ram(r);
            }
            create = create.quantization_config(binary);
        }
    }
    create.build()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> QdrantConfig {
        QdrantConfig::new("http://127.0.0.1:6334", "records", 4, Distance::Dot)
    }

    #[test]
    #[allow(deprecated)] // on_disk, on_disk_payload, always_ram: Qdrant 1.18 ignores `memory`
    fn create_request_carries_every_setting() {
        let settings = CollectionSettings::new()
            .with_shard_number(3)
            .with_replication_factor(2)
            .with_write_consistency_factor(2)
            .with_on_disk(true)
            .with_on_disk_payload(false)
            .with_hnsw_m(8)
            .with_hnsw_ef_construct(50)
            .with_quantization(Quantization::Scalar {
                quantile: Some(0.99),
                always_ram: Some(true),
            });
        let r = create_request(&base().with_collection_settings(settings));
        assert_eq!(r.collection_name, "records");
        assert_eq!(r.shard_number, Some(3));
        assert_eq!(r.replication_factor, Some(2));
        assert_eq!(r.write_consistency_factor, Some(2));
        assert_eq!(r.on_disk_payload, Some(false));
        let Some(vectors_config::Config::Params(v)) = r.vectors_config.and_then(|c| c.config)
        else {
            panic!("no vector params");
        };
        assert_eq!((v.size, v.distance), (4, qdrant::Distance::Dot as i32));
        assert_eq!(v.on_disk, Some(true));
        let hnsw = r.hnsw_config.unwrap();
        assert_eq!((hnsw.m, hnsw.ef_construct), (Some(8), Some(50)));
        match r.quantization_config.and_then(|q| q.quantization) {
            Some(qdrant::quantization_config::Quantization::Scalar(s)) => {
                assert_eq!(s.r#type, qdrant::QuantizationType::Int8 as i32);
                assert_eq!((s.quantile, s.always_ram), (Some(0.99), Some(true)));
            }
            other => panic!("{other:?}"),
        }

        let binary = CollectionSettings::new().with_quantization(Quantization::binary());
        let r = create_request(&base().with_collection_settings(binary));
        match r.quantization_config.and_then(|q| q.quantization) {
            Some(qdrant::quantization_config::Quantization::Binary(b)) => {
                assert_eq!(b.always_ram, None);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    #[allow(deprecated)]
    fn unset_settings_are_left_to_qdrant() {
        let r = create_request(&base());
        assert_eq!(
            (
                r.shard_number,
                r.replication_factor,
                r.write_consistency_factor
            ),
            (None, None, None)
        );
        assert_eq!(r.on_disk_payload, None);
        assert!(r.hnsw_config.is_none() && r.quantization_config.is_none());
        let none = CollectionSettings::new().with_quantization(Quantization::None);
        assert!(
            create_request(&base().with_collection_settings(none))
                .quantization_config
                .is_none()
        );
        // Only the set HNSW parameter is sent.
        let m = CollectionSettings::new().with_hnsw_m(0);
        let hnsw = create_request(&base().with_collection_settings(m))
            .hnsw_config
            .unwrap();
        assert_eq!((hnsw.m, hnsw.ef_construct), (Some(0), None));
    }
}
