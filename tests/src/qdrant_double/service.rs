//! The gRPC services: Qdrant's `Qdrant`, `Collections` and `Points` traits
//! (generated in `qdrant-client`) over qdrant-edge shards, one per collection.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use qdrant_client::qdrant::{
    self as grpc, collections_server::Collections, points_selector::PointsSelectorOneOf,
    points_server::Points, qdrant_server::Qdrant, query, vector_input, vectors_config,
};
use qdrant_edge::external::ordered_float::OrderedFloat;
use qdrant_edge::{
    CountRequest, CreateIndex, EdgeConfig, FieldIndexOperations, JsonPath, NamedQuery,
    PayloadFieldSchema, PayloadSchemaType, PointInsertOperations, PointOperations, PointStruct,
    PointStructPersisted, QueryEnum, QueryRequest, ScoringQuery, ScrollRequest, UpdateOperation,
    VectorInternal,
};
use tandem_adapters::edge::{EdgeError, SharedShard};
use tokio::sync::watch;
use tonic::{Code, Request, Response, Status};

use super::Durability;
use super::convert;
use super::faults::{CallOutcome, Faults, RpcAction};
use super::net::ConnInfo;
use super::settings::{self, RecordedSettings};

/// The version the health check reports: `qdrant-client`'s own, so that its
/// compatibility check stays quiet.
const VERSION: &str = "1.20.0";

/// The file in which qdrant-edge keeps a shard's configuration.
const EDGE_CONFIG_FILE: &str = "edge_config.json";

/// One collection: a qdrant-edge shard with one unnamed dense vector.
struct Collection {
    shard: SharedShard,
    size: usize,
    distance: qdrant_edge::Distance,
    /// Recorded at creation, reported by `Collections/Get`, otherwise unused.
    recorded: RecordedSettings,
}

/// The state behind the three services.
pub(crate) struct Inner {
    collections: RwLock<HashMap<String, Arc<Collection>>>,
    /// Serialises collection creation and deletion.
    admin: tokio::sync::Mutex<()>,
    collections_dir: PathBuf,
    faults: Faults,
    api_key: Option<String>,
    durability: Durability,
    shutdown: watch::Receiver<bool>,
    operation_ids: AtomicU64,
    /// Kept last so the directory outlives the shards (fields drop in order).
    _temp_dir: Option<tempfile::TempDir>,
}

/// The services' implementation (cheap to clone).
#[derive(Clone)]
pub(crate) struct DoubleService {
    inner: Arc<Inner>,
}

impl DoubleService {
    /// Opens every collection found under `data_dir/collections`.
    pub(crate) async fn open(
        data_dir: &Path,
        temp_dir: Option<tempfile::TempDir>,
        faults: Faults,
        api_key: Option<String>,
        durability: Durability,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, super::DoubleError> {
        let collections_dir = data_dir.join("collections");
        tokio::fs::create_dir_all(&collections_dir)
            .await
            .map_err(|source| super::DoubleError::Io {
                path: collections_dir.clone(),
                source,
            })?;
        let mut collections = HashMap::new();
        let mut entries = tokio::fs::read_dir(&collections_dir)
            .await
            .map_err(|source| super::DoubleError::Io {
                path: collections_dir.clone(),
                source,
            })?;
        while let Some(entry) =
            entries
                .next_entry()
                .await
                .map_err(|source| super::DoubleError::Io {
                    path: collections_dir.clone(),
                    source,
                })?
        {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            // A leftover of an interrupted create or delete is not a collection.
            if !tokio::fs::try_exists(entry.path().join(EDGE_CONFIG_FILE))
                .await
                .unwrap_or(false)
            {
                continue;
            }
            // The config is ignored: the shard exists.
            let shard = SharedShard::open(entry.path(), EdgeConfig::default())
                .await
                .map_err(|source| super::DoubleError::Storage {
                    collection: name.clone(),
                    source,
                })?;
            if let Some(collection) = collection_of(shard) {
                collections.insert(name, Arc::new(collection));
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                collections: RwLock::new(collections),
                admin: tokio::sync::Mutex::new(()),
                collections_dir,
                faults,
                api_key,
                durability,
                shutdown,
                operation_ids: AtomicU64::new(0),
                _temp_dir: temp_dir,
            }),
        })
    }

    fn collection(&self, name: &str) -> Result<Arc<Collection>, Status> {
        self.inner
            .collections
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
            .ok_or_else(|| not_found(name))
    }

    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(expected) = &self.inner.api_key else {
            return Ok(());
        };
        let metadata = request.metadata();
        let given = metadata
            .get("api-key")
            .and_then(|v| v.to_str().ok())
            .or_else(|| {
                metadata
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
            });
        match given {
            Some(key) if key == expected => Ok(()),
            Some(_) => Err(Status::unauthenticated("Invalid API key or JWT")),
            None => Err(Status::unauthenticated(
                "Must provide an API key or an Authorization bearer token",
            )),
        }
    }

    async fn until_shutdown(&self) {
        let mut shutdown = self.inner.shutdown.clone();
        // An error means the sender is gone: the server is stopping too.
        let _ = shutdown.wait_for(|stopping| *stopping).await;
    }

    /// Handles one call: authentication, the call log, the fault plan, then
    /// `exec` (given the number of batch items to apply when a fault asks for
    /// partial application).
    async fn call<Req, Resp, F, Fut>(
        &self,
        method: &'static str,
        request: Request<Req>,
        exec: F,
    ) -> Result<Response<Resp>, Status>
    where
        F: FnOnce(Req, Option<usize>) -> Fut,
        Fut: Future<Output = Result<Resp, Status>>,
        Resp: Reply,
    {
        self.call_landing_later(method, request, exec, None).await
    }

    /// [`call`](Self::call) for a write that [`RpcAction::FailThenApplyLater`]
    /// can deliver late: `late` applies the request on its own, later.
    async fn call_landing_later<Req, Resp, F, Fut>(
        &self,
        method: &'static str,
        request: Request<Req>,
        exec: F,
        late: Option<LateApply<Req>>,
    ) -> Result<Response<Resp>, Status>
    where
        F: FnOnce(Req, Option<usize>) -> Fut,
        Fut: Future<Output = Result<Resp, Status>>,
        Resp: Reply,
    {
        // Rejected calls are logged, but faults only see authorized ones.
        if let Err(status) = self.authorize(&request) {
            self.inner
                .faults
                .log(method, CallOutcome::Err(status.code()));
            return Err(status);
        }
        let ticket = self.inner.faults.begin(method);
        let connection = request.extensions().get::<ConnInfo>().cloned();
        let request = request.into_inner();
        let result = match ticket.action.clone() {
            None => exec(request, None).await,
            Some(RpcAction::FailBefore(code)) => Err(injected(code)),
            Some(RpcAction::FailAfter(code)) => exec(request, None).await.and(Err(injected(code))),
            Some(RpcAction::Delay(delay)) => {
                tokio::time::sleep(delay).await;
                exec(request, None).await
            }
            Some(RpcAction::Hang) => {
                self.until_shutdown().await;
                Err(Status::unavailable(
                    "the Qdrant test double is shutting down",
                ))
            }
            Some(RpcAction::DropConnection { applied }) => {
                if applied {
                    // The reply is lost either way.
                    let _ = exec(request, None).await;
                }
                if let Some(connection) = connection {
                    connection.killer.kill();
                }
                self.until_shutdown().await;
                Err(Status::unavailable(
                    "connection dropped by an injected fault",
                ))
            }
            Some(RpcAction::ResourceExhausted { retry_after_secs }) => {
                let mut status = Status::resource_exhausted(
                    "Too many requests: rate limit exceeded (injected fault)",
                );
                status.metadata_mut().insert(
                    "retry-after",
                    retry_after_secs
                        .to_string()
                        .parse()
                        .expect("a number is a valid header value"),
                );
                Err(status)
            }
            Some(RpcAction::PartialThenFail { applied, code }) => {
                exec(request, Some(applied)).await.and(Err(injected(code)))
            }
            Some(RpcAction::FailThenApplyLater { code, after }) => {
                if let Some(late) = late {
                    let landing = self.inner.faults.late_landing();
                    let apply = late(request);
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        apply.await;
                        drop(landing);
                    });
                }
                Err(injected(code))
            }
            Some(RpcAction::ReplyStatus(status)) => exec(request, None).await.map(|mut reply| {
                reply.set_update_status(status);
                reply
            }),
        };
        ticket.finish(match &result {
            Ok(_) => CallOutcome::Ok,
            Err(status) => CallOutcome::Err(status.code()),
        });
        result.map(Response::new)
    }

    fn unimplemented(&self, method: &'static str) -> Status {
        self.inner
            .faults
            .log(method, CallOutcome::Err(Code::Unimplemented));
        Status::unimplemented(format!(
            "{method} is not implemented by the Qdrant test double"
        ))
    }

    fn next_operation_id(&self) -> u64 {
        self.inner.operation_ids.fetch_add(1, Ordering::SeqCst)
    }

    /// Applies a points write and answers as Qdrant does.
    async fn write(
        &self,
        collection: &Collection,
        operation: UpdateOperation,
        wait: Option<bool>,
        started: Instant,
    ) -> Result<grpc::PointsOperationResponse, Status> {
        let wait = wait.unwrap_or(false);
        let ticket = collection
            .shard
            .update(operation)
            .await
            .map_err(edge_status)?;
        if wait && self.inner.durability == Durability::EveryWrite {
            collection
                .shard
                .make_durable(ticket)
                .await
                .map_err(edge_status)?;
        }
        let status = if wait {
            grpc::UpdateStatus::Completed
        } else {
            grpc::UpdateStatus::Acknowledged
        };
        Ok(grpc::PointsOperationResponse {
            result: Some(grpc::UpdateResult {
                operation_id: Some(self.next_operation_id()),
                status: status as i32,
            }),
            time: started.elapsed().as_secs_f64(),
            usage: None,
        })
    }

    async fn create_collection(
        &self,
        request: grpc::CreateCollection,
    ) -> Result<grpc::CollectionOperationResponse, Status> {
        let started = Instant::now();
        let name = request.collection_name.clone();
        validate_collection_name(&name)?;
        let params = match request
            .vectors_config
            .as_ref()
            .and_then(|c| c.config.clone())
        {
            Some(vectors_config::Config::Params(params)) => params,
            Some(vectors_config::Config::ParamsMap(_)) => {
                return Err(Status::invalid_argument(
                    "Wrong input: named vectors are not supported by the Qdrant test double",
                ));
            }
            None => {
                return Err(Status::invalid_argument(
                    "Wrong input: the test double needs a dense vectors config",
                ));
            }
        };
        if params.size == 0 {
            return Err(Status::invalid_argument(
                "Validation error in JSON body: [vectors_config.size: value 0 invalid, must be 1 or larger]",
            ));
        }
        let distance = match grpc::Distance::try_from(params.distance) {
            Ok(grpc::Distance::Cosine) => qdrant_edge::Distance::Cosine,
            Ok(grpc::Distance::Euclid) => qdrant_edge::Distance::Euclid,
            Ok(grpc::Distance::Dot) => qdrant_edge::Distance::Dot,
            Ok(grpc::Distance::Manhattan) => qdrant_edge::Distance::Manhattan,
            _ => return Err(Status::invalid_argument("Malformed distance parameter")),
        };
        // The whole request is validated before the name is looked up, as in Qdrant.
        let size = usize::try_from(params.size)
            .map_err(|_| Status::invalid_argument("Wrong input: vector size too large"))?;
        let config = settings::edge_config(&request, &params, size, distance)?;
        let recorded = RecordedSettings::of(&request, &params)?;
        let _admin = self.inner.admin.lock().await;
        if self.collection(&name).is_ok() {
            return Err(Status::already_exists(format!(
                "Wrong input: Collection `{name}` already exists!"
            )));
        }
        let dir = self.inner.collections_dir.join(&name);
        // A leftover of a failed create or delete: not a collection.
        if tokio::fs::try_exists(&dir).await.unwrap_or(false) {
            tokio::fs::remove_dir_all(&dir)
                .await
                .map_err(|e| Status::internal(format!("Service internal error: {e}")))?;
        }
        // Before the shard: a directory without a shard is a leftover, never a
        // collection without its settings.
        recorded
            .save(&dir)
            .await
            .map_err(|e| Status::internal(format!("Service internal error: {e}")))?;
        let shard = SharedShard::open(&dir, config).await.map_err(edge_status)?;
        let collection = collection_of(shard)
            .ok_or_else(|| Status::internal("Service internal error: collection has no vector"))?;
        self.inner
            .collections
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name, Arc::new(collection));
        Ok(grpc::CollectionOperationResponse {
            result: true,
            time: started.elapsed().as_secs_f64(),
        })
    }

    async fn delete_collection(
        &self,
        request: grpc::DeleteCollection,
    ) -> Result<grpc::CollectionOperationResponse, Status> {
        let started = Instant::now();
        let _admin = self.inner.admin.lock().await;
        let removed = self
            .inner
            .collections
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&request.collection_name);
        let Some(mut collection) = removed else {
            return Ok(grpc::CollectionOperationResponse {
                result: false,
                time: started.elapsed().as_secs_f64(),
            });
        };
        // Close the shard before deleting its files: calls still running hold
        // it, and closing flushes into the directory.
        let deadline = Instant::now() + Duration::from_secs(30);
        let collection = loop {
            match Arc::try_unwrap(collection) {
                Ok(collection) => break collection,
                Err(shared) if Instant::now() < deadline => {
                    collection = shared;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(_) => {
                    return Err(Status::internal(
                        "Service internal error: the collection is still in use",
                    ));
                }
            }
        };
        let dir = collection.shard.dir().to_path_buf();
        tokio::task::spawn_blocking(move || {
            drop(collection);
            std::fs::remove_dir_all(dir)
        })
        .await
        .map_err(|e| Status::internal(format!("Service internal error: {e}")))?
        .map_err(|e| Status::internal(format!("Service internal error: {e}")))?;
        Ok(grpc::CollectionOperationResponse {
            result: true,
            time: started.elapsed().as_secs_f64(),
        })
    }

    async fn collection_info(
        &self,
        request: grpc::GetCollectionInfoRequest,
    ) -> Result<grpc::GetCollectionInfoResponse, Status> {
        let started = Instant::now();
        let collection = self.collection(&request.collection_name)?;
        let (info, points) = collection
            .shard
            .read(|shard| {
                let points = shard.count(CountRequest {
                    filter: None,
                    exact: true,
                })?;
                Ok((shard.info(), points))
            })
            .await
            .map_err(edge_status)?;
        let payload_schema = info
            .payload_schema
            .into_iter()
            .map(|(key, index)| {
                let info = grpc::PayloadSchemaInfo {
                    data_type: grpc_schema_type(index.data_type) as i32,
                    params: None,
                    points: Some(index.points as u64),
                };
                (key.to_string(), info)
            })
            .collect();
        let distance = match collection.distance {
            qdrant_edge::Distance::Cosine => grpc::Distance::Cosine,
            qdrant_edge::Distance::Euclid => grpc::Distance::Euclid,
            qdrant_edge::Distance::Dot => grpc::Distance::Dot,
            qdrant_edge::Distance::Manhattan => grpc::Distance::Manhattan,
        };
        let vector = grpc::VectorParams {
            size: collection.size as u64,
            distance: distance as i32,
            ..Default::default()
        };
        let config =
            settings::grpc_config(&collection.shard.config(), &collection.recorded, vector);
        Ok(grpc::GetCollectionInfoResponse {
            result: Some(grpc::CollectionInfo {
                status: grpc::CollectionStatus::Green as i32,
                optimizer_status: Some(grpc::OptimizerStatus {
                    ok: true,
                    error: String::new(),
                }),
                segments_count: info.segments_count as u64,
                config: Some(config),
                payload_schema,
                points_count: Some(points as u64),
                indexed_vectors_count: Some(info.indexed_vectors_count as u64),
                ..Default::default()
            }),
            time: started.elapsed().as_secs_f64(),
        })
    }

    async fn upsert_points(
        &self,
        request: grpc::UpsertPoints,
        limit: Option<usize>,
    ) -> Result<grpc::PointsOperationResponse, Status> {
        let started = Instant::now();
        let collection = self.collection(&request.collection_name)?;
        if request.update_filter.is_some() {
            return Err(unsupported("an update filter"));
        }
        if request
            .update_mode
            .is_some_and(|m| m != grpc::UpdateMode::Upsert as i32)
        {
            return Err(unsupported("an update mode other than upsert"));
        }
        let mut points = Vec::with_capacity(request.points.len());
        for point in request.points {
            let id = convert::point_id(point.id.as_ref())?;
            let vector = convert::dense_vector(point.vectors)?;
            // Checked for the whole batch first, as Qdrant does.
            if vector.len() != collection.size {
                return Err(Status::invalid_argument(format!(
                    "Wrong input: Vector dimension error: expected dim: {}, got {}",
                    collection.size,
                    vector.len()
                )));
            }
            let payload = serde_json::Value::Object(convert::payload_json(point.payload));
            // `payload` is an object, which `PointStruct::new` requires.
            points.push(PointStructPersisted::from(PointStruct::new(
                id, vector, payload,
            )));
        }
        if let Some(applied) = limit {
            points.truncate(applied);
        }
        let operation = UpdateOperation::PointOperation(PointOperations::UpsertPoints(
            PointInsertOperations::PointsList(points),
        ));
        self.write(&collection, operation, request.wait, started)
            .await
    }

    async fn delete_points(
        &self,
        request: grpc::DeletePoints,
        limit: Option<usize>,
    ) -> Result<grpc::PointsOperationResponse, Status> {
        let started = Instant::now();
        let collection = self.collection(&request.collection_name)?;
        let operation = match request.points.and_then(|s| s.points_selector_one_of) {
            Some(PointsSelectorOneOf::Points(list)) => {
                let mut ids = list
                    .ids
                    .iter()
                    .map(|id| convert::point_id(Some(id)))
                    .collect::<Result<Vec<_>, _>>()?;
                if let Some(applied) = limit {
                    ids.truncate(applied);
                }
                PointOperations::DeletePoints { ids }
            }
            Some(PointsSelectorOneOf::Filter(filter)) => {
                // A partial delete by filter applies nothing.
                if limit.is_some() {
                    return Ok(grpc::PointsOperationResponse::default());
                }
                let filter = convert::filter(Some(&filter))?.unwrap_or_default();
                PointOperations::DeletePointsByFilter(filter)
            }
            None => return Err(Status::invalid_argument("Malformed PointsSelector type")),
        };
        self.write(
            &collection,
            UpdateOperation::PointOperation(operation),
            request.wait,
            started,
        )
        .await
    }

    async fn create_field_index(
        &self,
        request: grpc::CreateFieldIndexCollection,
        limit: Option<usize>,
    ) -> Result<grpc::PointsOperationResponse, Status> {
        let started = Instant::now();
        let collection = self.collection(&request.collection_name)?;
        let field_type = match request.field_type.map(grpc::FieldType::try_from) {
            Some(Ok(grpc::FieldType::Keyword)) => PayloadSchemaType::Keyword,
            Some(Ok(grpc::FieldType::Integer)) => PayloadSchemaType::Integer,
            Some(Ok(grpc::FieldType::Float)) => PayloadSchemaType::Float,
            Some(Ok(grpc::FieldType::Geo)) => PayloadSchemaType::Geo,
            Some(Ok(grpc::FieldType::Text)) => PayloadSchemaType::Text,
            Some(Ok(grpc::FieldType::Bool)) => PayloadSchemaType::Bool,
            Some(Ok(grpc::FieldType::Datetime)) => PayloadSchemaType::Datetime,
            Some(Ok(grpc::FieldType::Uuid)) => PayloadSchemaType::Uuid,
            Some(Err(_)) => return Err(Status::invalid_argument("Malformed field type")),
            None => return Err(unsupported("a field index without a field type")),
        };
        if limit.is_some() {
            return Ok(grpc::PointsOperationResponse::default());
        }
        let operation =
            UpdateOperation::FieldIndexOperation(FieldIndexOperations::CreateIndex(CreateIndex {
                field_name: json_path(&request.field_name)?,
                field_schema: Some(PayloadFieldSchema::FieldType(field_type)),
            }));
        self.write(&collection, operation, request.wait, started)
            .await
    }

    async fn delete_field_index(
        &self,
        request: grpc::DeleteFieldIndexCollection,
        limit: Option<usize>,
    ) -> Result<grpc::PointsOperationResponse, Status> {
        let started = Instant::now();
        let collection = self.collection(&request.collection_name)?;
        if limit.is_some() {
            return Ok(grpc::PointsOperationResponse::default());
        }
        let operation = UpdateOperation::FieldIndexOperation(FieldIndexOperations::DeleteIndex(
            json_path(&request.field_name)?,
        ));
        self.write(&collection, operation, request.wait, started)
            .await
    }

    async fn get_points(&self, request: grpc::GetPoints) -> Result<grpc::GetResponse, Status> {
        let started = Instant::now();
        let collection = self.collection(&request.collection_name)?;
        let ids = request
            .ids
            .iter()
            .map(|id| convert::point_id(Some(id)))
            .collect::<Result<Vec<_>, _>>()?;
        let with_payload = convert::with_payload(request.with_payload.as_ref(), true)?;
        let with_vector = convert::with_vectors(request.with_vectors.as_ref());
        let records = collection
            .shard
            .read(move |shard| shard.retrieve(&ids, Some(with_payload), Some(with_vector)))
            .await
            .map_err(edge_status)?;
        Ok(grpc::GetResponse {
            result: records.into_iter().map(retrieved).collect(),
            time: started.elapsed().as_secs_f64(),
            usage: None,
        })
    }

    async fn count_points(
        &self,
        request: grpc::CountPoints,
    ) -> Result<grpc::CountResponse, Status> {
        let started = Instant::now();
        let collection = self.collection(&request.collection_name)?;
        let filter = convert::filter(request.filter.as_ref())?;
        let exact = request.exact.unwrap_or(true);
        let count = collection
            .shard
            .read(move |shard| shard.count(CountRequest { filter, exact }))
            .await
            .map_err(edge_status)?;
        Ok(grpc::CountResponse {
            result: Some(grpc::CountResult {
                count: count as u64,
            }),
            time: started.elapsed().as_secs_f64(),
            usage: None,
        })
    }

    async fn scroll_points(
        &self,
        request: grpc::ScrollPoints,
    ) -> Result<grpc::ScrollResponse, Status> {
        let started = Instant::now();
        let collection = self.collection(&request.collection_name)?;
        if request.order_by.is_some() {
            return Err(unsupported("scroll ordered by a payload field"));
        }
        let limit = request.limit.unwrap_or(10) as usize;
        if limit == 0 {
            return Err(Status::invalid_argument(
                "Validation error in body: [limit: value 0 invalid, must be 1 or larger]",
            ));
        }
        let scroll = ScrollRequest {
            offset: request
                .offset
                .as_ref()
                .map(|id| convert::point_id(Some(id)))
                .transpose()?,
            limit: Some(limit),
            filter: convert::filter(request.filter.as_ref())?,
            with_payload: Some(convert::with_payload(request.with_payload.as_ref(), true)?),
            with_vector: convert::with_vectors(request.with_vectors.as_ref()),
            order_by: None,
        };
        let (records, next) = collection
            .shard
            .read(move |shard| shard.scroll(scroll))
            .await
            .map_err(edge_status)?;
        Ok(grpc::ScrollResponse {
            next_page_offset: next.map(convert::grpc_point_id),
            result: records.into_iter().map(retrieved).collect(),
            time: started.elapsed().as_secs_f64(),
            usage: None,
        })
    }

    /// Nearest-neighbour search shared by `Search` and `Query`.
    #[allow(clippy::too_many_arguments)]
    async fn nearest(
        &self,
        collection: &Collection,
        vector: Option<Vec<f32>>,
        filter: Option<&grpc::Filter>,
        limit: usize,
        offset: usize,
        score_threshold: Option<f32>,
        with_payload: qdrant_edge::WithPayloadInterface,
        with_vector: qdrant_edge::WithVector,
        params: Option<&grpc::SearchParams>,
    ) -> Result<Vec<grpc::ScoredPoint>, Status> {
        if let Some(vector) = &vector
            && vector.len() != collection.size
        {
            return Err(Status::invalid_argument(format!(
                "Wrong input: Vector dimension error: expected dim: {}, got {}",
                collection.size,
                vector.len()
            )));
        }
        let request = QueryRequest {
            prefetches: Vec::new(),
            query: vector.map(|v| {
                ScoringQuery::Vector(QueryEnum::Nearest(NamedQuery {
                    query: VectorInternal::Dense(v),
                    using: None,
                }))
            }),
            filter: convert::filter(filter)?,
            score_threshold: score_threshold.map(OrderedFloat),
            limit,
            offset,
            params: convert::search_params(params),
            with_vector,
            with_payload,
        };
        let hits = collection
            .shard
            .read(move |shard| shard.query(request))
            .await
            .map_err(edge_status)?;
        Ok(hits
            .into_iter()
            .map(|hit| grpc::ScoredPoint {
                id: Some(convert::grpc_point_id(hit.id)),
                payload: convert::grpc_payload(hit.payload),
                score: hit.score,
                version: hit.version,
                vectors: convert::grpc_vectors(hit.vector),
                shard_key: None,
                order_value: None,
            })
            .collect())
    }

    async fn search_points(
        &self,
        request: grpc::SearchPoints,
    ) -> Result<grpc::SearchResponse, Status> {
        let started = Instant::now();
        let collection = self.collection(&request.collection_name)?;
        if request
            .vector_name
            .as_deref()
            .is_some_and(|n| !n.is_empty())
        {
            return Err(unsupported("a named vector"));
        }
        if request.sparse_indices.is_some() {
            return Err(unsupported("a sparse vector"));
        }
        if request.limit == 0 {
            return Err(Status::invalid_argument(
                "Validation error in body: [limit: value 0 invalid, must be 1 or larger]",
            ));
        }
        let result = self
            .nearest(
                &collection,
                Some(request.vector),
                request.filter.as_ref(),
                request.limit as usize,
                request.offset.unwrap_or(0) as usize,
                request.score_threshold,
                convert::with_payload(request.with_payload.as_ref(), false)?,
                convert::with_vectors(request.with_vectors.as_ref()),
                request.params.as_ref(),
            )
            .await?;
        Ok(grpc::SearchResponse {
            result,
            time: started.elapsed().as_secs_f64(),
            usage: None,
        })
    }

    async fn query_points(
        &self,
        request: grpc::QueryPoints,
    ) -> Result<grpc::QueryResponse, Status> {
        let started = Instant::now();
        let collection = self.collection(&request.collection_name)?;
        if !request.prefetch.is_empty() {
            return Err(unsupported("a prefetch"));
        }
        if request.using.as_deref().is_some_and(|n| !n.is_empty()) {
            return Err(unsupported("a named vector"));
        }
        if request.lookup_from.is_some() {
            return Err(unsupported("lookup_from"));
        }
        let vector = match request.query.and_then(|q| q.variant) {
            None => None,
            Some(query::Variant::Nearest(input)) => match input.variant {
                Some(vector_input::Variant::Dense(dense)) => Some(dense.data),
                _ => return Err(unsupported("a nearest query other than a dense vector")),
            },
            Some(_) => return Err(unsupported("this kind of query")),
        };
        let limit = request.limit.unwrap_or(10) as usize;
        if limit == 0 {
            return Err(Status::invalid_argument(
                "Validation error in body: [limit: value 0 invalid, must be 1 or larger]",
            ));
        }
        let result = self
            .nearest(
                &collection,
                vector,
                request.filter.as_ref(),
                limit,
                request.offset.unwrap_or(0) as usize,
                request.score_threshold,
                convert::with_payload(request.with_payload.as_ref(), false)?,
                convert::with_vectors(request.with_vectors.as_ref()),
                request.params.as_ref(),
            )
            .await?;
        Ok(grpc::QueryResponse {
            result,
            time: started.elapsed().as_secs_f64(),
            usage: None,
        })
    }
}

/// Reads a collection's size and distance from its shard.
fn collection_of(shard: SharedShard) -> Option<Collection> {
    let params = shard.config().vectors.get("")?.clone();
    let recorded = RecordedSettings::load(shard.dir());
    Some(Collection {
        shard,
        size: params.size,
        distance: params.distance,
        recorded,
    })
}

fn retrieved(record: qdrant_edge::Record) -> grpc::RetrievedPoint {
    grpc::RetrievedPoint {
        id: Some(convert::grpc_point_id(record.id)),
        payload: convert::grpc_payload(record.payload),
        vectors: convert::grpc_vectors(record.vector),
        shard_key: None,
        order_value: None,
    }
}

fn grpc_schema_type(t: PayloadSchemaType) -> grpc::PayloadSchemaType {
    match t {
        PayloadSchemaType::Keyword => grpc::PayloadSchemaType::Keyword,
        PayloadSchemaType::Integer => grpc::PayloadSchemaType::Integer,
        PayloadSchemaType::Float => grpc::PayloadSchemaType::Float,
        PayloadSchemaType::Geo => grpc::PayloadSchemaType::Geo,
        PayloadSchemaType::Text => grpc::PayloadSchemaType::Text,
        PayloadSchemaType::Bool => grpc::PayloadSchemaType::Bool,
        PayloadSchemaType::Datetime => grpc::PayloadSchemaType::Datetime,
        PayloadSchemaType::Uuid => grpc::PayloadSchemaType::Uuid,
    }
}

fn json_path(field: &str) -> Result<JsonPath, Status> {
    field.parse().map_err(|()| {
        Status::invalid_argument(format!("Wrong input: invalid field name {field:?}"))
    })
}

/// Qdrant's rules, narrowed to what is safe as a directory name.
fn validate_collection_name(name: &str) -> Result<(), Status> {
    let bad = name.is_empty()
        || name.len() > 255
        || name.starts_with('.')
        || name
            .chars()
            .any(|c| c.is_control() || "<>:\"/\\|?*".contains(c));
    if bad {
        return Err(Status::invalid_argument(format!(
            "Validation error in path parameters: collection name {name:?} is invalid"
        )));
    }
    Ok(())
}

fn not_found(name: &str) -> Status {
    Status::not_found(format!("Not found: Collection `{name}` doesn't exist!"))
}

pub(super) fn unsupported(what: &str) -> Status {
    Status::invalid_argument(format!(
        "Wrong input: {what} is not supported by the Qdrant test double"
    ))
}

/// Applies a request on its own, after its call was answered.
type LateApply<Req> = Box<dyn FnOnce(Req) -> futures::future::BoxFuture<'static, ()> + Send>;

fn injected(code: Code) -> Status {
    Status::new(code, format!("injected fault: {code:?}"))
}

fn edge_status(err: EdgeError) -> Status {
    match &err {
        EdgeError::Operation(op) => convert::status(op),
        _ => Status::internal(format!("Service internal error: {err}")),
    }
}

/// Replies whose update status a fault can override.
pub(crate) trait Reply {
    /// Sets the status of an update result (no-op for other replies).
    fn set_update_status(&mut self, _status: grpc::UpdateStatus) {}
}

impl Reply for grpc::PointsOperationResponse {
    fn set_update_status(&mut self, status: grpc::UpdateStatus) {
        if let Some(result) = &mut self.result {
            result.status = status as i32;
        }
    }
}

macro_rules! plain_replies {
    ($($t:ident),* $(,)?) => { $(impl Reply for grpc::$t {})* };
}

plain_replies!(
    HealthCheckReply,
    CollectionOperationResponse,
    GetCollectionInfoResponse,
    ListCollectionsResponse,
    CollectionExistsResponse,
    GetResponse,
    CountResponse,
    ScrollResponse,
    SearchResponse,
    QueryResponse,
);

/// Implements a service trait: the given methods, plus the listed RPCs answering
/// `Unimplemented` (logged like any call).
macro_rules! service_impl {
    (
        impl $trait:ident { $($implemented:item)* }
        unimplemented { $($name:ident($req:ident) -> $resp:ident = $path:literal;)* }
    ) => {
        #[tonic::async_trait]
        impl $trait for DoubleService {
            $($implemented)*
            $(
                async fn $name(
                    &self,
                    _request: Request<grpc::$req>,
                ) -> Result<Response<grpc::$resp>, Status> {
                    Err(self.unimplemented($path))
                }
            )*
        }
    };
}

service_impl! {
    impl Qdrant {
        async fn health_check(
            &self,
            request: Request<grpc::HealthCheckRequest>,
        ) -> Result<Response<grpc::HealthCheckReply>, Status> {
            self.call("Qdrant/HealthCheck", request, |_, _| async {
                Ok(grpc::HealthCheckReply {
                    title: "qdrant - vector search engine (Tandem's Qdrant test double)".into(),
                    version: VERSION.into(),
                    commit: None,
                })
            })
            .await
        }
    }
    unimplemented {}
}

service_impl! {
    impl Collections {
        async fn get(
            &self,
            request: Request<grpc::GetCollectionInfoRequest>,
        ) -> Result<Response<grpc::GetCollectionInfoResponse>, Status> {
            self.call("Collections/Get", request, |r, _| self.collection_info(r)).await
        }

        async fn list(
            &self,
            request: Request<grpc::ListCollectionsRequest>,
        ) -> Result<Response<grpc::ListCollectionsResponse>, Status> {
            self.call("Collections/List", request, |_, _| async {
                let started = Instant::now();
                let mut names: Vec<String> = self
                    .inner
                    .collections
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .keys()
                    .cloned()
                    .collect();
                names.sort();
                Ok(grpc::ListCollectionsResponse {
                    collections: names
                        .into_iter()
                        .map(|name| grpc::CollectionDescription { name })
                        .collect(),
                    time: started.elapsed().as_secs_f64(),
                })
            })
            .await
        }

        async fn create(
            &self,
            request: Request<grpc::CreateCollection>,
        ) -> Result<Response<grpc::CollectionOperationResponse>, Status> {
            self.call("Collections/Create", request, |r, _| self.create_collection(r)).await
        }

        async fn delete(
            &self,
            request: Request<grpc::DeleteCollection>,
        ) -> Result<Response<grpc::CollectionOperationResponse>, Status> {
            self.call("Collections/Delete", request, |r, _| self.delete_collection(r)).await
        }

        async fn collection_exists(
            &self,
            request: Request<grpc::CollectionExistsRequest>,
        ) -> Result<Response<grpc::CollectionExistsResponse>, Status> {
            self.call("Collections/CollectionExists", request, |r, _| async move {
                let started = Instant::now();
                let exists = self.collection(&r.collection_name).is_ok();
                Ok(grpc::CollectionExistsResponse {
                    result: Some(grpc::CollectionExists { exists }),
                    time: started.elapsed().as_secs_f64(),
                })
            })
            .await
        }
    }
    unimplemented {
        update(UpdateCollection) -> CollectionOperationResponse = "Collections/Update";
        update_aliases(ChangeAliases) -> CollectionOperationResponse = "Collections/UpdateAliases";
        list_collection_aliases(ListCollectionAliasesRequest) -> ListAliasesResponse = "Collections/ListCollectionAliases";
        list_aliases(ListAliasesRequest) -> ListAliasesResponse = "Collections/ListAliases";
        collection_cluster_info(CollectionClusterInfoRequest) -> CollectionClusterInfoResponse = "Collections/CollectionClusterInfo";
        update_collection_cluster_setup(UpdateCollectionClusterSetupRequest) -> UpdateCollectionClusterSetupResponse = "Collections/UpdateCollectionClusterSetup";
        create_shard_key(CreateShardKeyRequest) -> CreateShardKeyResponse = "Collections/CreateShardKey";
        delete_shard_key(DeleteShardKeyRequest) -> DeleteShardKeyResponse = "Collections/DeleteShardKey";
        list_shard_keys(ListShardKeysRequest) -> ListShardKeysResponse = "Collections/ListShardKeys";
    }
}

service_impl! {
    impl Points {
        async fn upsert(
            &self,
            request: Request<grpc::UpsertPoints>,
        ) -> Result<Response<grpc::PointsOperationResponse>, Status> {
            let this = self.clone();
            let late: LateApply<grpc::UpsertPoints> = Box::new(move |r| {
                Box::pin(async move {
                    let _ = this.upsert_points(r, None).await;
                })
            });
            self.call_landing_later("Points/Upsert", request, |r, limit| self.upsert_points(r, limit), Some(late))
                .await
        }

        async fn delete(
            &self,
            request: Request<grpc::DeletePoints>,
        ) -> Result<Response<grpc::PointsOperationResponse>, Status> {
            let this = self.clone();
            let late: LateApply<grpc::DeletePoints> = Box::new(move |r| {
                Box::pin(async move {
                    let _ = this.delete_points(r, None).await;
                })
            });
            self.call_landing_later("Points/Delete", request, |r, limit| self.delete_points(r, limit), Some(late))
                .await
        }

        async fn get(
            &self,
            request: Request<grpc::GetPoints>,
        ) -> Result<Response<grpc::GetResponse>, Status> {
            self.call("Points/Get", request, |r, _| self.get_points(r)).await
        }

        async fn create_field_index(
            &self,
            request: Request<grpc::CreateFieldIndexCollection>,
        ) -> Result<Response<grpc::PointsOperationResponse>, Status> {
            self.call("Points/CreateFieldIndex", request, |r, limit| {
                self.create_field_index(r, limit)
            })
            .await
        }

        async fn delete_field_index(
            &self,
            request: Request<grpc::DeleteFieldIndexCollection>,
        ) -> Result<Response<grpc::PointsOperationResponse>, Status> {
            self.call("Points/DeleteFieldIndex", request, |r, limit| {
                self.delete_field_index(r, limit)
            })
            .await
        }

        async fn search(
            &self,
            request: Request<grpc::SearchPoints>,
        ) -> Result<Response<grpc::SearchResponse>, Status> {
            self.call("Points/Search", request, |r, _| self.search_points(r)).await
        }

        async fn scroll(
            &self,
            request: Request<grpc::ScrollPoints>,
        ) -> Result<Response<grpc::ScrollResponse>, Status> {
            self.call("Points/Scroll", request, |r, _| self.scroll_points(r)).await
        }

        async fn count(
            &self,
            request: Request<grpc::CountPoints>,
        ) -> Result<Response<grpc::CountResponse>, Status> {
            self.call("Points/Count", request, |r, _| self.count_points(r)).await
        }

        async fn query(
            &self,
            request: Request<grpc::QueryPoints>,
        ) -> Result<Response<grpc::QueryResponse>, Status> {
            self.call("Points/Query", request, |r, _| self.query_points(r)).await
        }
    }
    unimplemented {
        update_vectors(UpdatePointVectors) -> PointsOperationResponse = "Points/UpdateVectors";
        delete_vectors(DeletePointVectors) -> PointsOperationResponse = "Points/DeleteVectors";
        set_payload(SetPayloadPoints) -> PointsOperationResponse = "Points/SetPayload";
        overwrite_payload(SetPayloadPoints) -> PointsOperationResponse = "Points/OverwritePayload";
        delete_payload(DeletePayloadPoints) -> PointsOperationResponse = "Points/DeletePayload";
        clear_payload(ClearPayloadPoints) -> PointsOperationResponse = "Points/ClearPayload";
        create_vector_name(CreateVectorNameRequest) -> PointsOperationResponse = "Points/CreateVectorName";
        delete_vector_name(DeleteVectorNameRequest) -> PointsOperationResponse = "Points/DeleteVectorName";
        search_batch(SearchBatchPoints) -> SearchBatchResponse = "Points/SearchBatch";
        search_groups(SearchPointGroups) -> SearchGroupsResponse = "Points/SearchGroups";
        recommend(RecommendPoints) -> RecommendResponse = "Points/Recommend";
        recommend_batch(RecommendBatchPoints) -> RecommendBatchResponse = "Points/RecommendBatch";
        recommend_groups(RecommendPointGroups) -> RecommendGroupsResponse = "Points/RecommendGroups";
        discover(DiscoverPoints) -> DiscoverResponse = "Points/Discover";
        discover_batch(DiscoverBatchPoints) -> DiscoverBatchResponse = "Points/DiscoverBatch";
        update_batch(UpdateBatchPoints) -> UpdateBatchResponse = "Points/UpdateBatch";
        query_batch(QueryBatchPoints) -> QueryBatchResponse = "Points/QueryBatch";
        query_groups(QueryPointGroups) -> QueryGroupsResponse = "Points/QueryGroups";
        facet(FacetCounts) -> FacetResponse = "Points/Facet";
        search_matrix_pairs(SearchMatrixPoints) -> SearchMatrixPairsResponse = "Points/SearchMatrixPairs";
        search_matrix_offsets(SearchMatrixPoints) -> SearchMatrixOffsetsResponse = "Points/SearchMatrixOffsets";
    }
}
