//! Translation between Tandem's model and Qdrant's gRPC types: point ids,
//! payloads, filters and scores.

use std::collections::HashMap;

use qdrant_client::qdrant::{
    self, Condition, PayloadIncludeSelector, PointStruct, WithPayloadSelector, WithVectorsSelector,
    r#match::MatchValue, point_id::PointIdOptions, value::Kind, with_payload_selector,
    with_vectors_selector,
};
use serde_json::Value as Json;
use tandem_core::{
    Distance, Filter, IndexError, Metadata, Outcome, Point, PointId, PointInfo, RecordId, Scope,
};

use super::config::{CollectionSettings, PayloadFieldType, Quantization};

/// Payload field: the record the point was written for (UUID string, keyword index).
pub const RECORD_ID: &str = "record_id";
/// Payload field: the record's scope (keyword index).
pub const SCOPE: &str = "scope";
/// Payload field: the record's metadata object.
pub const METADATA: &str = "metadata";
/// Payload field: when the point was written (ms since the Unix epoch).
pub const WRITTEN_AT_MS: &str = "written_at_ms";

/// Qdrant's point id for a Tandem point id (always a UUID).
pub fn point_id(id: PointId) -> qdrant::PointId {
    qdrant::PointId::from(id.0)
}

/// Tandem's point id for a Qdrant point id; numeric ids were not written by Tandem.
pub fn from_point_id(
    id: Option<&qdrant::PointId>,
    collection: &str,
) -> Result<PointId, IndexError> {
    match id.and_then(|id| id.point_id_options.as_ref()) {
        Some(PointIdOptions::Uuid(s)) => s
            .parse::<PointId>()
            .map_err(|_| foreign(collection, format!("has a point with id {s:?}, not a UUID"))),
        Some(PointIdOptions::Num(n)) => Err(foreign(
            collection,
            format!("has a point with the numeric id {n}"),
        )),
        None => Err(foreign(collection, "returned a point without an id".into())),
    }
}

/// The Qdrant point for a Tandem point: the vector and the payload
/// `{record_id, scope, metadata, written_at_ms}`.
pub fn point_struct(p: &Point) -> PointStruct {
    let mut payload: HashMap<String, qdrant::Value> = HashMap::with_capacity(4);
    payload.insert(RECORD_ID.into(), p.record_id.to_string().into());
    payload.insert(SCOPE.into(), p.scope.as_str().into());
    payload.insert(
        METADATA.into(),
        qdrant::Value::from(Json::Object(p.metadata.clone())),
    );
    payload.insert(WRITTEN_AT_MS.into(), p.written_at_ms.into());
    PointStruct {
        id: Some(point_id(p.id)),
        payload,
        vectors: Some(p.vector.clone().into()),
    }
}

/// Only the payload fields a [`PointInfo`] needs (never the vector).
pub fn info_payload() -> WithPayloadSelector {
    include(&[RECORD_ID, SCOPE, WRITTEN_AT_MS])
}

/// Only the given payload fields.
pub fn include(fields: &[&str]) -> WithPayloadSelector {
    WithPayloadSelector {
        selector_options: Some(with_payload_selector::SelectorOptions::Include(
            PayloadIncludeSelector {
                fields: fields.iter().map(|f| (*f).to_owned()).collect(),
            },
        )),
    }
}

/// No vectors in the reply.
pub fn no_vectors() -> WithVectorsSelector {
    WithVectorsSelector {
        selector_options: Some(with_vectors_selector::SelectorOptions::Enable(false)),
    }
}

/// The [`PointInfo`] of a point returned by retrieve or scroll.
pub fn point_info(
    id: Option<&qdrant::PointId>,
    payload: &HashMap<String, qdrant::Value>,
    collection: &str,
) -> Result<PointInfo, IndexError> {
    let id = from_point_id(id, collection)?;
    Ok(PointInfo {
        id,
        record_id: record_id(id, payload, collection)?,
        scope: Scope::new(string_field(id, payload, SCOPE, collection)?),
        written_at_ms: match payload.get(WRITTEN_AT_MS).and_then(|v| v.kind.as_ref()) {
            Some(Kind::IntegerValue(ms)) => *ms,
            _ => return Err(missing(id, WRITTEN_AT_MS, collection)),
        },
    })
}

/// The record id in a point's payload.
pub fn record_id(
    id: PointId,
    payload: &HashMap<String, qdrant::Value>,
    collection: &str,
) -> Result<RecordId, IndexError> {
    string_field(id, payload, RECORD_ID, collection)?
        .parse()
        .map_err(|_| missing(id, RECORD_ID, collection))
}

fn string_field<'a>(
    id: PointId,
    payload: &'a HashMap<String, qdrant::Value>,
    field: &str,
    collection: &str,
) -> Result<&'a str, IndexError> {
    match payload.get(field).and_then(|v| v.kind.as_ref()) {
        Some(Kind::StringValue(s)) => Ok(s),
        _ => Err(missing(id, field, collection)),
    }
}

fn missing(id: PointId, field: &str, collection: &str) -> IndexError {
    foreign(
        collection,
        format!("has point {id} without a valid `{field}` payload field"),
    )
}

fn foreign(collection: &str, what: String) -> IndexError {
    IndexError::Permanent {
        outcome: Outcome::NotApplied,
        message: format!("collection `{collection}` {what}: it holds points Tandem did not write"),
        source: None,
    }
}

/// The Qdrant filter of a scope (or none).
pub fn scope_filter(scope: Option<&Scope>) -> Option<qdrant::Filter> {
    scope.map(|s| qdrant::Filter::must([keyword(SCOPE, s.as_str())]))
}

/// The Qdrant filter of a search filter.
///
/// Metadata conditions become `metadata.<key>` matches. Qdrant can match
/// exactly only strings (keyword), integers (`i64`) and booleans; any other
/// JSON value (float, null, array, object, integers beyond `i64`) is rejected
/// with [`IndexError::InvalidInput`] rather than matched differently. Keys that
/// are not plain identifiers are quoted in Qdrant's JSON-path syntax; a key
/// containing `"` cannot be expressed and is rejected too.
///
/// Qdrant also matches a field holding an *array* that contains the value;
/// [`matches_exactly`] removes such hits after the search.
pub fn search_filter(filter: &Filter) -> Result<Option<qdrant::Filter>, IndexError> {
    let mut must = Vec::with_capacity(1 + filter.metadata_eq.len());
    if let Some(scope) = &filter.scope {
        must.push(keyword(SCOPE, scope.as_str()));
    }
    for (key, value) in &filter.metadata_eq {
        let path = metadata_path(key)?;
        let value = match value {
            Json::String(s) => MatchValue::Keyword(s.clone()),
            Json::Bool(b) => MatchValue::Boolean(*b),
            Json::Number(n) if n.as_i64().is_some() => MatchValue::Integer(n.as_i64().unwrap_or(0)),
            other => {
                return Err(IndexError::InvalidInput {
                    message: format!(
                        "metadata filter on {key:?}: the Qdrant index can match only strings, \
                         integers and booleans, not {}",
                        json_type(other)
                    ),
                    source: None,
                });
            }
        };
        must.push(Condition::matches(path, value));
    }
    Ok((!must.is_empty()).then(|| qdrant::Filter::must(must)))
}

/// Whether a hit's metadata equals every `key = value` of the filter exactly
/// (Qdrant's match also accepts arrays containing the value).
pub fn matches_exactly(filter: &Filter, metadata: Option<&qdrant::Value>) -> bool {
    if filter.metadata_eq.is_empty() {
        return true;
    }
    let fields = match metadata.and_then(|m| m.kind.as_ref()) {
        Some(Kind::StructValue(s)) => &s.fields,
        _ => return false,
    };
    filter.metadata_eq.iter().all(|(k, v)| {
        fields
            .get(k)
            .is_some_and(|actual| &actual.clone().into_json() == v)
    })
}

/// `metadata.<key>`, quoting the key unless it is a plain identifier.
pub fn metadata_path(key: &str) -> Result<String, IndexError> {
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        Ok(format!("{METADATA}.{key}"))
    } else if key.is_empty() || key.contains('"') {
        Err(IndexError::InvalidInput {
            message: format!(
                "metadata filter on {key:?}: the Qdrant index cannot filter on an empty key \
                 or a key containing '\"'"
            ),
            source: None,
        })
    } else {
        Ok(format!("{METADATA}.\"{key}\""))
    }
}

fn keyword(field: &str, value: &str) -> Condition {
    // Not `Condition::matches(field, String)`: qdrant-client turns a string
    // containing whitespace into a full-text match.
    Condition::matches(field, MatchValue::Keyword(value.to_owned()))
}

fn json_type(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a non-integer or out-of-range number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// Qdrant's distance for Tandem's.
pub fn distance(d: Distance) -> qdrant::Distance {
    match d {
        Distance::Cosine => qdrant::Distance::Cosine,
        Distance::Dot => qdrant::Distance::Dot,
        Distance::Euclid => qdrant::Distance::Euclid,
    }
}

/// Tandem's distance for Qdrant's (as the `i32` of its gRPC messages);
/// `None` for one Tandem does not support (Manhattan, unknown values).
pub fn from_distance(d: i32) -> Option<Distance> {
    match qdrant::Distance::try_from(d).ok()? {
        qdrant::Distance::Cosine => Some(Distance::Cosine),
        qdrant::Distance::Dot => Some(Distance::Dot),
        qdrant::Distance::Euclid => Some(Distance::Euclid),
        _ => None,
    }
}

/// Tandem's score for Qdrant's: euclid distances are negated so that higher is
/// better for every distance.
pub fn score(d: Distance, qdrant_score: f32) -> f32 {
    match d {
        Distance::Euclid => -qdrant_score,
        Distance::Cosine | Distance::Dot => qdrant_score,
    }
}

/// Qdrant's score threshold for Tandem's: for euclid, "negated distance at
/// least t" is "distance at most -t", which is how Qdrant reads a euclid
/// threshold.
pub fn threshold(d: Distance, tandem_threshold: f32) -> f32 {
    match d {
        Distance::Euclid => -tandem_threshold,
        Distance::Cosine | Distance::Dot => tandem_threshold,
    }
}

/// Qdrant's field type (of a payload index to create) for a configured one.
pub fn field_type(t: PayloadFieldType) -> qdrant::FieldType {
    match t {
        PayloadFieldType::Keyword => qdrant::FieldType::Keyword,
        PayloadFieldType::Integer => qdrant::FieldType::Integer,
        PayloadFieldType::Float => qdrant::FieldType::Float,
        PayloadFieldType::Bool => qdrant::FieldType::Bool,
        PayloadFieldType::Geo => qdrant::FieldType::Geo,
        PayloadFieldType::Text => qdrant::FieldType::Text,
        PayloadFieldType::Datetime => qdrant::FieldType::Datetime,
        PayloadFieldType::Uuid => qdrant::FieldType::Uuid,
    }
}

/// Qdrant's schema type (of an existing payload index) for a configured one.
pub fn schema_type(t: PayloadFieldType) -> qdrant::PayloadSchemaType {
    match t {
        PayloadFieldType::Keyword => qdrant::PayloadSchemaType::Keyword,
        PayloadFieldType::Integer => qdrant::PayloadSchemaType::Integer,
        PayloadFieldType::Float => qdrant::PayloadSchemaType::Float,
        PayloadFieldType::Bool => qdrant::PayloadSchemaType::Bool,
        PayloadFieldType::Geo => qdrant::PayloadSchemaType::Geo,
        PayloadFieldType::Text => qdrant::PayloadSchemaType::Text,
        PayloadFieldType::Datetime => qdrant::PayloadSchemaType::Datetime,
        PayloadFieldType::Uuid => qdrant::PayloadSchemaType::Uuid,
    }
}

/// The name of a reported schema type, lower case as in the configuration.
pub fn schema_type_name(data_type: i32) -> String {
    match qdrant::PayloadSchemaType::try_from(data_type) {
        Ok(t) => t.as_str_name().to_ascii_lowercase(),
        Err(_) => format!("#{data_type}"),
    }
}

/// The quantization of an existing collection.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FoundQuantization {
    /// One Tandem can configure.
    Known(Quantization),
    /// Product or turbo quantization (not configurable here).
    Other(&'static str),
}

impl FoundQuantization {
    fn kind(&self) -> &'static str {
        match self {
            FoundQuantization::Known(q) => q.kind(),
            FoundQuantization::Other(kind) => kind,
        }
    }
}

impl std::fmt::Display for FoundQuantization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FoundQuantization::Known(q) => q.fmt(f),
            FoundQuantization::Other(kind) => f.write_str(kind),
        }
    }
}

/// The settings of an existing collection as Qdrant reports them, with
/// Qdrant's defaults where it reports nothing, and the vector's own HNSW and
/// quantization settings where they override the collection's.
#[derive(Clone, Debug, PartialEq)]
pub struct FoundSettings {
    /// `params.shard_number`.
    pub shard_number: u32,
    /// `params.replication_factor` (default 1).
    pub replication_factor: u32,
    /// `params.write_consistency_factor` (default 1).
    pub write_consistency_factor: u32,
    /// The vector's `on_disk` (default false).
    pub on_disk: bool,
    /// `params.on_disk_payload`.
    pub on_disk_payload: bool,
    /// HNSW `m`, if reported.
    pub hnsw_m: Option<u64>,
    /// HNSW `ef_construct`, if reported.
    pub hnsw_ef_construct: Option<u64>,
    /// The quantization.
    pub quantization: FoundQuantization,
}

/// One configured setting that an existing collection does not have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Difference {
    /// The setting's name, as in the configuration.
    pub setting: &'static str,
    /// The configured value.
    pub expected: String,
    /// The collection's value.
    pub found: String,
    /// Whether the difference changes what the collection holds or how it
    /// survives a node loss (refused), rather than only its speed or memory
    /// use (a warning).
    pub fatal: bool,
}

impl FoundSettings {
    /// Reads them from a collection's info.
    // `on_disk`, `on_disk_payload` and `always_ram` are deprecated in
    // qdrant-client 1.20 in favour of `memory` (new in 1.19), which Qdrant 1.18 ignores.
    #[allow(deprecated)]
    pub fn of(info: &qdrant::CollectionInfo) -> Self {
        let config = info.config.as_ref();
        let params = config.and_then(|c| c.params.as_ref());
        let vector = match params
            .and_then(|p| p.vectors_config.as_ref())
            .and_then(|v| v.config.as_ref())
        {
            Some(qdrant::vectors_config::Config::Params(p)) => Some(p),
            _ => None,
        };
        let hnsw = config.and_then(|c| c.hnsw_config.as_ref());
        let vector_hnsw = vector.and_then(|v| v.hnsw_config.as_ref());
        let hnsw_value = |get: fn(&qdrant::HnswConfigDiff) -> Option<u64>| {
            vector_hnsw.and_then(get).or_else(|| hnsw.and_then(get))
        };
        let quantization = vector
            .and_then(|v| v.quantization_config.as_ref())
            .or_else(|| config.and_then(|c| c.quantization_config.as_ref()))
            .and_then(|q| q.quantization.as_ref());
        use qdrant::quantization_config::Quantization as Q;
        let quantization = match quantization {
            None => FoundQuantization::Known(Quantization::None),
            Some(Q::Scalar(s)) => FoundQuantization::Known(Quantization::Scalar {
                quantile: s.quantile,
                always_ram: s.always_ram,
            }),
            Some(Q::Binary(b)) => FoundQuantization::Known(Quantization::Binary {
                always_ram: b.always_ram,
            }),
            Some(Q::Product(_)) => FoundQuantization::Other("product"),
            Some(Q::Turboquant(_)) => FoundQuantization::Other("turbo"),
        };
        Self {
            shard_number: params.map_or(1, |p| p.shard_number),
            replication_factor: params.and_then(|p| p.replication_factor).unwrap_or(1),
            write_consistency_factor: params.and_then(|p| p.write_consistency_factor).unwrap_or(1),
            on_disk: vector.and_then(|v| v.on_disk).unwrap_or(false),
            on_disk_payload: params.is_some_and(|p| p.on_disk_payload),
            hnsw_m: hnsw_value(|h| h.m),
            hnsw_ef_construct: hnsw_value(|h| h.ef_construct),
            quantization,
        }
    }

    /// The configured settings this collection does not have (unset settings
    /// are never a difference).
    pub fn differences(&self, wanted: &CollectionSettings) -> Vec<Difference> {
        let mut out = Vec::new();
        let mut differ = |setting, expected: String, found: String, fatal| {
            if expected != found {
                out.push(Difference {
                    setting,
                    expected,
                    found,
                    fatal,
                });
            }
        };
        let show = |v: Option<u64>| v.map_or_else(|| "unset".to_owned(), |v| v.to_string());
        if let Some(n) = wanted.shard_number {
            differ(
                "shard_number",
                n.to_string(),
                self.shard_number.to_string(),
                true,
            );
        }
        if let Some(n) = wanted.replication_factor {
            let found = self.replication_factor.to_string();
            differ("replication_factor", n.to_string(), found, true);
        }
        if let Some(n) = wanted.write_consistency_factor {
            let found = self.write_consistency_factor.to_string();
            differ("write_consistency_factor", n.to_string(), found, false);
        }
        if let Some(b) = wanted.on_disk {
            differ("on_disk", b.to_string(), self.on_disk.to_string(), false);
        }
        if let Some(b) = wanted.on_disk_payload {
            let found = self.on_disk_payload.to_string();
            differ("on_disk_payload", b.to_string(), found, false);
        }
        if let Some(m) = wanted.hnsw_m {
            differ("hnsw_m", m.to_string(), show(self.hnsw_m), false);
        }
        if let Some(ef) = wanted.hnsw_ef_construct {
            differ(
                "hnsw_ef_construct",
                ef.to_string(),
                show(self.hnsw_ef_construct),
                false,
            );
        }
        if let Some(q) = wanted.quantization {
            let found = self.quantization;
            if q.kind() != found.kind() {
                differ("quantization", q.to_string(), found.to_string(), true);
            } else if let FoundQuantization::Known(f) = found
                && !options_match(&q, &f)
            {
                differ("quantization", q.to_string(), f.to_string(), false);
            }
        }
        out
    }
}

/// Whether the options set in `wanted` (same kind as `found`) are what the
/// collection has; `always_ram` unset on the server is Qdrant's `false`.
fn options_match(wanted: &Quantization, found: &Quantization) -> bool {
    let ram =
        |want: Option<bool>, got: Option<bool>| want.is_none_or(|w| w == got.unwrap_or(false));
    match (wanted, found) {
        (
            Quantization::Scalar {
                quantile: wq,
                always_ram: wr,
            },
            Quantization::Scalar {
                quantile: fq,
                always_ram: fr,
            },
        ) => wq.is_none_or(|w| Some(w) == *fq) && ram(*wr, *fr),
        (Quantization::Binary { always_ram: wr }, Quantization::Binary { always_ram: fr }) => {
            ram(*wr, *fr)
        }
        _ => true,
    }
}

/// The metadata object of a payload, as JSON.
pub fn metadata_json(value: Option<&qdrant::Value>) -> Metadata {
    match value.cloned().map(qdrant::Value::into_json) {
        Some(Json::Object(m)) => m,
        _ => Metadata::new(),
    }
}

#[cfg(test)]
mod tests {
    use qdrant_client::qdrant::condition::ConditionOneOf;
    use serde_json::json;

    use super::*;

    fn sample() -> Point {
        Point {
            id: PointId::new_random(),
            record_id: RecordId::new_v7(),
            scope: Scope::new("cat a"),
            metadata: json!({"item": "x y", "n": 3}).as_object().unwrap().clone(),
            vector: vec![0.1, 0.2],
            written_at_ms: 1_700_000_000_123,
        }
    }

    fn match_of(c: &Condition) -> (String, MatchValue) {
        match &c.condition_one_of {
            Some(ConditionOneOf::Field(f)) => (
                f.key.clone(),
                f.r#match.clone().and_then(|m| m.match_value).unwrap(),
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn payload_round_trips_to_point_info() {
        let p = sample();
        let s = point_struct(&p);
        let info = point_info(s.id.as_ref(), &s.payload, "c").unwrap();
        assert_eq!(
            info,
            PointInfo {
                id: p.id,
                record_id: p.record_id,
                scope: p.scope.clone(),
                written_at_ms: p.written_at_ms,
            }
        );
        assert_eq!(
            metadata_json(s.payload.get(METADATA)),
            p.metadata,
            "metadata is stored as an object"
        );
    }

    #[test]
    fn foreign_points_are_reported() {
        let numeric = qdrant::PointId::from(7u64);
        let err = point_info(Some(&numeric), &HashMap::new(), "c").unwrap_err();
        assert!(err.to_string().contains("numeric id 7"), "{err}");
        let s = point_struct(&sample());
        let mut payload = s.payload.clone();
        payload.remove(RECORD_ID);
        let err = point_info(s.id.as_ref(), &payload, "c").unwrap_err();
        assert!(err.to_string().contains("record_id"), "{err}");
        assert!(!err.is_retryable());
    }

    #[test]
    fn strings_with_spaces_stay_keyword_matches() {
        let f = search_filter(&Filter::scope("cat a").with_eq("item", json!("x y")))
            .unwrap()
            .unwrap();
        assert_eq!(f.must.len(), 2);
        assert_eq!(
            match_of(&f.must[0]),
            ("scope".into(), MatchValue::Keyword("cat a".into()))
        );
        assert_eq!(
            match_of(&f.must[1]),
            ("metadata.item".into(), MatchValue::Keyword("x y".into()))
        );
    }

    #[test]
    fn integers_and_booleans_match() {
        let f = search_filter(
            &Filter::none()
                .with_eq("n", json!(-3))
                .with_eq("ok", json!(true)),
        )
        .unwrap()
        .unwrap();
        let conds: Vec<_> = f.must.iter().map(match_of).collect();
        assert!(conds.contains(&("metadata.n".into(), MatchValue::Integer(-3))));
        assert!(conds.contains(&("metadata.ok".into(), MatchValue::Boolean(true))));
        assert_eq!(search_filter(&Filter::none()).unwrap(), None);
    }

    #[test]
    fn other_json_values_are_rejected() {
        for v in [
            json!(1.5),
            json!(null),
            json!([1]),
            json!({"a": 1}),
            json!(u64::MAX),
        ] {
            let err = search_filter(&Filter::none().with_eq("k", v.clone())).unwrap_err();
            assert!(
                matches!(err, IndexError::InvalidInput { .. }),
                "{v}: {err:?}"
            );
        }
    }

    #[test]
    fn unusual_keys_are_quoted() {
        assert_eq!(metadata_path("a_b-1").unwrap(), "metadata.a_b-1");
        assert_eq!(metadata_path("a.b").unwrap(), "metadata.\"a.b\"");
        assert_eq!(metadata_path("x y").unwrap(), "metadata.\"x y\"");
        assert!(metadata_path("").is_err());
        assert!(metadata_path("a\"b").is_err());
    }

    #[test]
    fn exact_match_rejects_arrays_containing_the_value() {
        let f = Filter::none().with_eq("tag", json!("a"));
        let scalar = qdrant::Value::from(json!({"tag": "a"}));
        let array = qdrant::Value::from(json!({"tag": ["a", "b"]}));
        assert!(matches_exactly(&f, Some(&scalar)));
        assert!(!matches_exactly(&f, Some(&array)));
        assert!(!matches_exactly(&f, None));
        assert!(matches_exactly(&Filter::none(), None));
    }

    #[test]
    fn euclid_scores_and_thresholds_are_negated() {
        assert_eq!(score(Distance::Euclid, 2.0), -2.0);
        assert_eq!(score(Distance::Cosine, 0.5), 0.5);
        assert_eq!(score(Distance::Dot, -1.5), -1.5);
        // "negated distance >= -1.5" is "distance <= 1.5".
        assert_eq!(threshold(Distance::Euclid, -1.5), 1.5);
        assert_eq!(threshold(Distance::Dot, 0.3), 0.3);
    }

    #[test]
    fn distances_map() {
        assert_eq!(distance(Distance::Cosine), qdrant::Distance::Cosine);
        assert_eq!(distance(Distance::Dot), qdrant::Distance::Dot);
        assert_eq!(distance(Distance::Euclid), qdrant::Distance::Euclid);
        for d in [Distance::Cosine, Distance::Dot, Distance::Euclid] {
            assert_eq!(from_distance(distance(d) as i32), Some(d));
        }
        assert_eq!(from_distance(qdrant::Distance::Manhattan as i32), None);
        assert_eq!(from_distance(-1), None);
    }

    #[allow(deprecated)] // on_disk, on_disk_payload, always_ram: see FoundSettings::of
    fn info(
        params: qdrant::CollectionParams,
        vector: qdrant::VectorParams,
        hnsw: Option<qdrant::HnswConfigDiff>,
        quantization: Option<qdrant::quantization_config::Quantization>,
    ) -> qdrant::CollectionInfo {
        qdrant::CollectionInfo {
            config: Some(qdrant::CollectionConfig {
                params: Some(qdrant::CollectionParams {
                    vectors_config: Some(qdrant::VectorsConfig {
                        config: Some(qdrant::vectors_config::Config::Params(vector)),
                    }),
                    ..params
                }),
                hnsw_config: hnsw,
                quantization_config: quantization.map(|q| qdrant::QuantizationConfig {
                    quantization: Some(q),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[allow(deprecated)]
    fn reported() -> qdrant::CollectionInfo {
        info(
            qdrant::CollectionParams {
                shard_number: 3,
                replication_factor: Some(2),
                write_consistency_factor: Some(2),
                on_disk_payload: false,
                ..Default::default()
            },
            qdrant::VectorParams {
                size: 4,
                on_disk: Some(true),
                ..Default::default()
            },
            Some(qdrant::HnswConfigDiff {
                m: Some(8),
                ef_construct: Some(50),
                ..Default::default()
            }),
            Some(qdrant::quantization_config::Quantization::Scalar(
                qdrant::ScalarQuantization {
                    r#type: qdrant::QuantizationType::Int8 as i32,
                    quantile: Some(0.99),
                    always_ram: Some(true),
                    ..Default::default()
                },
            )),
        )
    }

    fn matching() -> CollectionSettings {
        CollectionSettings::new()
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
            })
    }

    #[test]
    fn found_settings_are_read_from_collection_info() {
        let found = FoundSettings::of(&reported());
        assert_eq!(
            found,
            FoundSettings {
                shard_number: 3,
                replication_factor: 2,
                write_consistency_factor: 2,
                on_disk: true,
                on_disk_payload: false,
                hnsw_m: Some(8),
                hnsw_ef_construct: Some(50),
                quantization: FoundQuantization::Known(Quantization::Scalar {
                    quantile: Some(0.99),
                    always_ram: Some(true)
                }),
            }
        );
        assert!(found.differences(&matching()).is_empty());
        // Unset settings are never checked.
        assert!(found.differences(&CollectionSettings::new()).is_empty());
    }

    #[test]
    fn what_qdrant_omits_is_its_default() {
        let found = FoundSettings::of(&info(
            qdrant::CollectionParams::default(),
            qdrant::VectorParams::default(),
            None,
            None,
        ));
        assert_eq!(found.replication_factor, 1);
        assert_eq!(found.write_consistency_factor, 1);
        assert!(!found.on_disk);
        assert_eq!(
            found.quantization,
            FoundQuantization::Known(Quantization::None)
        );
        let d = found.differences(&CollectionSettings::new().with_hnsw_m(16));
        assert_eq!(d[0].found, "unset");
        assert!(
            found
                .differences(&CollectionSettings::new().with_quantization(Quantization::None))
                .is_empty()
        );
    }

    #[test]
    fn the_vectors_own_hnsw_and_quantization_override_the_collections() {
        let mut i = reported();
        let params = i.config.as_mut().unwrap().params.as_mut().unwrap();
        if let Some(qdrant::vectors_config::Config::Params(v)) =
            params.vectors_config.as_mut().unwrap().config.as_mut()
        {
            v.hnsw_config = Some(qdrant::HnswConfigDiff {
                m: Some(32),
                ..Default::default()
            });
            v.quantization_config = Some(qdrant::QuantizationConfig {
                quantization: Some(qdrant::quantization_config::Quantization::Binary(
                    qdrant::BinaryQuantization::default(),
                )),
            });
        }
        let found = FoundSettings::of(&i);
        assert_eq!(
            (found.hnsw_m, found.hnsw_ef_construct),
            (Some(32), Some(50))
        );
        assert_eq!(found.quantization.kind(), "binary");
    }

    #[test]
    fn differences_that_change_semantics_or_durability_are_fatal() {
        let found = FoundSettings::of(&reported());
        let d = found.differences(
            &matching()
                .with_shard_number(1)
                .with_replication_factor(3)
                .with_quantization(Quantization::binary()),
        );
        let fatal: Vec<_> = d.iter().map(|d| (d.setting, d.fatal)).collect();
        assert_eq!(
            fatal,
            [
                ("shard_number", true),
                ("replication_factor", true),
                ("quantization", true)
            ]
        );
        assert_eq!((d[0].expected.as_str(), d[0].found.as_str()), ("1", "3"));
        assert_eq!(d[2].expected, "binary");
        assert_eq!(d[2].found, "scalar:quantile=0.99,always_ram=true");
        // Product quantization is a kind of its own.
        let mut i = reported();
        i.config.as_mut().unwrap().quantization_config = Some(qdrant::QuantizationConfig {
            quantization: Some(qdrant::quantization_config::Quantization::Product(
                qdrant::ProductQuantization::default(),
            )),
        });
        let d = FoundSettings::of(&i).differences(&matching());
        assert_eq!((d[0].setting, d[0].fatal), ("quantization", true));
        assert_eq!(d[0].found, "product");
    }

    #[test]
    fn harmless_differences_are_not_fatal() {
        let found = FoundSettings::of(&reported());
        let d = found.differences(
            &matching()
                .with_write_consistency_factor(1)
                .with_on_disk(false)
                .with_on_disk_payload(true)
                .with_hnsw_m(16)
                .with_hnsw_ef_construct(100)
                .with_quantization(Quantization::Scalar {
                    quantile: Some(0.95),
                    always_ram: None,
                }),
        );
        let names: Vec<_> = d.iter().map(|d| d.setting).collect();
        assert_eq!(
            names,
            [
                "write_consistency_factor",
                "on_disk",
                "on_disk_payload",
                "hnsw_m",
                "hnsw_ef_construct",
                "quantization"
            ]
        );
        assert!(d.iter().all(|d| !d.fatal), "{d:?}");
        // always_ram unset on the server is false.
        let mut i = reported();
        i.config.as_mut().unwrap().quantization_config = Some(qdrant::QuantizationConfig {
            quantization: Some(qdrant::quantization_config::Quantization::Binary(
                qdrant::BinaryQuantization::default(),
            )),
        });
        let found = FoundSettings::of(&i);
        let want = |r| {
            CollectionSettings::new().with_quantization(Quantization::Binary {
                always_ram: Some(r),
            })
        };
        assert!(found.differences(&want(false)).is_empty());
        assert_eq!(found.differences(&want(true)).len(), 1);
    }

    #[test]
    fn payload_types_map_both_ways() {
        for t in PayloadFieldType::ALL {
            let schema = schema_type(t);
            assert_eq!(schema_type_name(schema as i32), t.as_str());
            let name = field_type(t).as_str_name().to_ascii_lowercase();
            assert_eq!(name, format!("fieldtype{t}"));
        }
        assert_eq!(schema_type_name(999), "#999");
    }
}
