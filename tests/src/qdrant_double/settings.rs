//! Collection settings: what `Collections/Create` accepts beyond the vector's
//! size and distance, and what `Collections/Get` reports back.
//!
//! qdrant-edge keeps the storage settings of a single shard — payload and
//! vectors on disk, the HNSW parameters — in its own `edge_config.json`, so
//! those are applied to the shard and read back from it (they change no
//! result: the double never builds an HNSW index). The cluster settings
//! (`shard_number`, `replication_factor`, `write_consistency_factor`) mean
//! nothing to one local shard, and quantization would make qdrant-edge search
//! binary-quantized vectors even in appendable segments (approximate
//! results): those are only recorded, in a file of the collection's
//! directory, and reported as given.

use std::path::Path;

use qdrant_client::qdrant::{self as grpc, quantization_config};
use qdrant_edge::{EdgeConfig, EdgeVectorParams, HnswIndexConfig, QuantizationConfig};
use serde_json::{Value as Json, json};
use tonic::Status;

/// The file, in a collection's directory, holding its recorded settings.
const RECORDED_FILE: &str = "double_collection_settings.json";

/// The settings of a collection that are recorded rather than applied
/// (Qdrant's defaults: 1, 1, 1, no quantization).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RecordedSettings {
    pub(crate) shard_number: u32,
    pub(crate) replication_factor: u32,
    pub(crate) write_consistency_factor: u32,
    /// In Qdrant's own form (parsed by Qdrant's deserializer).
    pub(crate) quantization: Option<QuantizationConfig>,
}

impl Default for RecordedSettings {
    fn default() -> Self {
        Self {
            shard_number: 1,
            replication_factor: 1,
            write_consistency_factor: 1,
            quantization: None,
        }
    }
}

impl RecordedSettings {
    /// The settings of a create request, validated as Qdrant validates them.
    /// The vector's own quantization overrides the collection's, as in Qdrant.
    pub(crate) fn of(
        request: &grpc::CreateCollection,
        vector: &grpc::VectorParams,
    ) -> Result<Self, Status> {
        let mut settings = Self::default();
        for (name, given, slot) in [
            (
                "shard_number",
                request.shard_number,
                &mut settings.shard_number,
            ),
            (
                "replication_factor",
                request.replication_factor,
                &mut settings.replication_factor,
            ),
            (
                "write_consistency_factor",
                request.write_consistency_factor,
                &mut settings.write_consistency_factor,
            ),
        ] {
            match given {
                Some(0) => return Err(invalid(name, "value 0 invalid, must be 1 or larger")),
                Some(n) => *slot = n,
                None => {}
            }
        }
        let quantization = vector
            .quantization_config
            .as_ref()
            .or(request.quantization_config.as_ref())
            .and_then(|q| q.quantization.as_ref());
        settings.quantization = quantization.map(edge_quantization).transpose()?;
        Ok(settings)
    }

    /// Reads them from a collection's directory; a collection created before
    /// they were recorded has Qdrant's defaults.
    pub(crate) fn load(dir: &Path) -> Self {
        let Ok(text) = std::fs::read_to_string(dir.join(RECORDED_FILE)) else {
            return Self::default();
        };
        let Ok(json) = serde_json::from_str::<Json>(&text) else {
            return Self::default();
        };
        let get = |key: &str| {
            json.get(key)
                .and_then(Json::as_u64)
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(1)
        };
        Self {
            shard_number: get("shard_number"),
            replication_factor: get("replication_factor"),
            write_consistency_factor: get("write_consistency_factor"),
            quantization: json
                .get("quantization")
                .and_then(|q| serde_json::from_value(q.clone()).ok()),
        }
    }

    /// Writes them into a collection's directory.
    pub(crate) async fn save(&self, dir: &Path) -> std::io::Result<()> {
        let json = json!({
            "shard_number": self.shard_number,
            "replication_factor": self.replication_factor,
            "write_consistency_factor": self.write_consistency_factor,
            "quantization": self.quantization,
        });
        tokio::fs::create_dir_all(dir).await?;
        tokio::fs::write(dir.join(RECORDED_FILE), json.to_string()).await
    }
}

/// The qdrant-edge configuration of a create request: the unnamed vector with
/// its `on_disk`, the collection's `on_disk_payload` and HNSW
/// `m`/`ef_construct` (the vector's own HNSW overrides the collection's, as in
/// Qdrant).
// `on_disk`, `on_disk_payload` and `always_ram` are deprecated in qdrant-client
// 1.20 (in favour of `memory`); they are what Qdrant 1.18 and the adapter use.
#[allow(deprecated)]
pub(crate) fn edge_config(
    request: &grpc::CreateCollection,
    vector: &grpc::VectorParams,
    size: usize,
    distance: qdrant_edge::Distance,
) -> Result<EdgeConfig, Status> {
    let mut params = EdgeVectorParams::builder(size, distance);
    if let Some(on_disk) = vector.on_disk {
        params = params.on_disk(on_disk);
    }
    let mut config = EdgeConfig::builder().vector("", params.build());
    if let Some(on_disk) = request.on_disk_payload {
        config = config.on_disk_payload(on_disk);
    }
    let mut hnsw = HnswIndexConfig::default();
    for diff in [request.hnsw_config.as_ref(), vector.hnsw_config.as_ref()]
        .into_iter()
        .flatten()
    {
        if let Some(m) = diff.m {
            hnsw.m = usize::try_from(m).map_err(|_| invalid("hnsw_config.m", "too large"))?;
        }
        if let Some(ef) = diff.ef_construct {
            if ef < 4 {
                return Err(invalid(
                    "hnsw_config.ef_construct",
                    &format!("value {ef} invalid, must be 4 or larger"),
                ));
            }
            hnsw.ef_construct = usize::try_from(ef)
                .map_err(|_| invalid("hnsw_config.ef_construct", "too large"))?;
        }
    }
    Ok(config.hnsw_config(hnsw).build())
}

/// Qdrant's own quantization config (through its own deserializer) for a
/// gRPC one. Scalar (int8) and binary only.
#[allow(deprecated)]
fn edge_quantization(q: &quantization_config::Quantization) -> Result<QuantizationConfig, Status> {
    let json = match q {
        quantization_config::Quantization::Scalar(s) => {
            if s.r#type != grpc::QuantizationType::Int8 as i32 {
                return Err(invalid(
                    "quantization_config.scalar.type",
                    "only int8 is supported",
                ));
            }
            if let Some(quantile) = s.quantile
                && !(0.5..=1.0).contains(&quantile)
            {
                return Err(invalid(
                    "quantization_config.scalar.quantile",
                    &format!("value {quantile} invalid, must be from 0.5 to 1.0"),
                ));
            }
            json!({"scalar": {"type": "int8", "quantile": s.quantile, "always_ram": s.always_ram}})
        }
        quantization_config::Quantization::Binary(b) => {
            json!({"binary": {"always_ram": b.always_ram}})
        }
        quantization_config::Quantization::Product(_) => {
            return Err(super::service::unsupported("product quantization"));
        }
        quantization_config::Quantization::Turboquant(_) => {
            return Err(super::service::unsupported("turbo quantization"));
        }
    };
    serde_json::from_value(strip_nulls(json)).map_err(|e| {
        Status::invalid_argument(format!("Wrong input: invalid quantization config: {e}"))
    })
}

/// What `Collections/Get` reports: of the shard's configuration the vector's
/// `on_disk` (in `vector`), `on_disk_payload` and the HNSW config, and the
/// recorded settings.
#[allow(deprecated)]
pub(crate) fn grpc_config(
    edge: &EdgeConfig,
    recorded: &RecordedSettings,
    vector: grpc::VectorParams,
) -> grpc::CollectionConfig {
    let on_disk = edge.vectors.get("").and_then(|v| v.on_disk);
    let hnsw = &edge.hnsw_config;
    grpc::CollectionConfig {
        params: Some(grpc::CollectionParams {
            shard_number: recorded.shard_number,
            on_disk_payload: edge.on_disk_payload,
            vectors_config: Some(grpc::VectorsConfig {
                config: Some(grpc::vectors_config::Config::Params(grpc::VectorParams {
                    on_disk,
                    ..vector
                })),
            }),
            replication_factor: Some(recorded.replication_factor),
            write_consistency_factor: Some(recorded.write_consistency_factor),
            ..Default::default()
        }),
        hnsw_config: Some(grpc::HnswConfigDiff {
            m: Some(hnsw.m as u64),
            ef_construct: Some(hnsw.ef_construct as u64),
            full_scan_threshold: Some(hnsw.full_scan_threshold as u64),
            max_indexing_threads: Some(hnsw.max_indexing_threads as u64),
            on_disk: hnsw.on_disk,
            ..Default::default()
        }),
        optimizer_config: Some(grpc::OptimizersConfigDiff::default()),
        wal_config: Some(grpc::WalConfigDiff::default()),
        quantization_config: recorded.quantization.as_ref().and_then(grpc_quantization),
        ..Default::default()
    }
}

#[allow(deprecated)]
fn grpc_quantization(q: &QuantizationConfig) -> Option<grpc::QuantizationConfig> {
    let json = serde_json::to_value(q).ok()?;
    let bool_at = |path: &str| json.pointer(path).and_then(Json::as_bool);
    let quantization = if let Some(scalar) = json.get("scalar") {
        quantization_config::Quantization::Scalar(grpc::ScalarQuantization {
            r#type: grpc::QuantizationType::Int8 as i32,
            quantile: scalar
                .get("quantile")
                .and_then(Json::as_f64)
                .map(|q| q as f32),
            always_ram: bool_at("/scalar/always_ram"),
            ..Default::default()
        })
    } else if json.get("binary").is_some() {
        quantization_config::Quantization::Binary(grpc::BinaryQuantization {
            always_ram: bool_at("/binary/always_ram"),
            ..Default::default()
        })
    } else {
        return None;
    };
    Some(grpc::QuantizationConfig {
        quantization: Some(quantization),
    })
}

/// Qdrant's validation message of a create request.
fn invalid(field: &str, what: &str) -> Status {
    Status::invalid_argument(format!("Validation error in JSON body: [{field}: {what}]"))
}

/// Removes `null` members (Qdrant's config structs want them absent).
fn strip_nulls(json: Json) -> Json {
    match json {
        Json::Object(map) => Json::Object(
            map.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(deprecated)]
    fn quantization_round_trips_through_qdrants_own_config() {
        for q in [
            quantization_config::Quantization::Scalar(grpc::ScalarQuantization {
                r#type: grpc::QuantizationType::Int8 as i32,
                quantile: Some(0.99),
                always_ram: Some(true),
                ..Default::default()
            }),
            quantization_config::Quantization::Scalar(grpc::ScalarQuantization {
                r#type: grpc::QuantizationType::Int8 as i32,
                ..Default::default()
            }),
            quantization_config::Quantization::Binary(grpc::BinaryQuantization {
                always_ram: Some(false),
                ..Default::default()
            }),
            quantization_config::Quantization::Binary(grpc::BinaryQuantization::default()),
        ] {
            let edge = edge_quantization(&q).unwrap();
            assert_eq!(grpc_quantization(&edge).unwrap().quantization, Some(q));
        }
    }

    #[test]
    fn invalid_settings_are_refused_as_qdrant_does() {
        let request = grpc::CreateCollection {
            replication_factor: Some(0),
            ..Default::default()
        };
        let err = RecordedSettings::of(&request, &grpc::VectorParams::default()).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("replication_factor"), "{err}");
        let request = grpc::CreateCollection {
            hnsw_config: Some(grpc::HnswConfigDiff {
                ef_construct: Some(3),
                ..Default::default()
            }),
            ..Default::default()
        };
        let err = edge_config(
            &request,
            &grpc::VectorParams::default(),
            4,
            qdrant_edge::Distance::Cosine,
        )
        .unwrap_err();
        assert!(err.message().contains("ef_construct"), "{err}");
    }

    #[tokio::test]
    async fn recorded_settings_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            RecordedSettings::load(dir.path()),
            RecordedSettings::default()
        );
        let request = grpc::CreateCollection {
            shard_number: Some(3),
            replication_factor: Some(2),
            quantization_config: Some(grpc::QuantizationConfig {
                quantization: Some(quantization_config::Quantization::Binary(
                    grpc::BinaryQuantization::default(),
                )),
            }),
            ..Default::default()
        };
        let settings = RecordedSettings::of(&request, &grpc::VectorParams::default()).unwrap();
        assert_eq!(
            (
                settings.shard_number,
                settings.replication_factor,
                settings.write_consistency_factor
            ),
            (3, 2, 1)
        );
        assert!(settings.quantization.is_some());
        settings.save(dir.path()).await.unwrap();
        assert_eq!(RecordedSettings::load(dir.path()), settings);
    }
}
