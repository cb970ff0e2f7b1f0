//! Translation between Qdrant's gRPC messages and qdrant-edge's types.
//!
//! Filters, payload selectors and search parameters are rewritten into Qdrant's
//! REST JSON syntax and parsed by qdrant-edge's own deserializers, so that their
//! validation and semantics are Qdrant's.

use std::collections::HashMap;

use qdrant_client::qdrant::{
    self as grpc, condition::ConditionOneOf, r#match::MatchValue, point_id::PointIdOptions,
    vector_output, vectors_output, with_payload_selector, with_vectors_selector,
};
use qdrant_edge::{
    OperationError, PointId as EdgePointId, SearchParams, VectorInternal, VectorStructInternal,
    WithPayloadInterface, WithVector,
};
use serde_json::{Map, Value as Json, json};
use tonic::Status;

/// A gRPC point id as qdrant-edge's.
pub(crate) fn point_id(id: Option<&grpc::PointId>) -> Result<EdgePointId, Status> {
    match id.and_then(|id| id.point_id_options.as_ref()) {
        Some(PointIdOptions::Num(n)) => Ok(EdgePointId::NumId(*n)),
        Some(PointIdOptions::Uuid(s)) => s
            .parse()
            .map(EdgePointId::Uuid)
            .map_err(|e| Status::invalid_argument(format!("Unable to parse UUID: {s}: {e}"))),
        None => Err(Status::invalid_argument("Malformed PointId: no id given")),
    }
}

/// qdrant-edge's point id as gRPC's.
pub(crate) fn grpc_point_id(id: EdgePointId) -> grpc::PointId {
    let options = match id {
        EdgePointId::NumId(n) => PointIdOptions::Num(n),
        EdgePointId::Uuid(u) => PointIdOptions::Uuid(u.to_string()),
    };
    grpc::PointId {
        point_id_options: Some(options),
    }
}

fn id_json(id: &grpc::PointId) -> Result<Json, Status> {
    Ok(match point_id(Some(id))? {
        EdgePointId::NumId(n) => json!(n),
        EdgePointId::Uuid(u) => json!(u.to_string()),
    })
}

/// A gRPC payload as a JSON object.
pub(crate) fn payload_json(payload: HashMap<String, grpc::Value>) -> Map<String, Json> {
    payload
        .into_iter()
        .map(|(k, v)| (k, Json::from(v)))
        .collect()
}

/// A JSON object as a gRPC payload.
pub(crate) fn grpc_payload(payload: Option<qdrant_edge::Payload>) -> HashMap<String, grpc::Value> {
    payload
        .map(|p| {
            p.0.into_iter()
                .map(|(k, v)| (k, grpc::Value::from(v)))
                .collect()
        })
        .unwrap_or_default()
}

/// The dense vector of an upserted point (the double's collections have one
/// unnamed dense vector).
pub(crate) fn dense_vector(vectors: Option<grpc::Vectors>) -> Result<Vec<f32>, Status> {
    use grpc::vectors::VectorsOptions;
    match vectors.and_then(|v| v.vectors_options) {
        Some(VectorsOptions::Vector(vector)) => vector_data(vector),
        Some(VectorsOptions::Vectors(named)) => {
            let mut vectors = named.vectors;
            match (vectors.remove(""), vectors.is_empty()) {
                (Some(vector), true) => vector_data(vector),
                _ => Err(Status::invalid_argument(
                    "Wrong input: the test double supports only the unnamed dense vector",
                )),
            }
        }
        None => Err(Status::invalid_argument(
            "Wrong input: the point has no vector",
        )),
    }
}

#[allow(deprecated)] // `data` is how older clients send a dense vector.
fn vector_data(vector: grpc::Vector) -> Result<Vec<f32>, Status> {
    use grpc::vector::Vector;
    match vector.vector {
        Some(Vector::Dense(dense)) => Ok(dense.data),
        None if vector.indices.is_none() && vector.vectors_count.is_none() => Ok(vector.data),
        _ => Err(Status::invalid_argument(
            "Wrong input: the test double supports only dense vectors",
        )),
    }
}

/// A stored vector as gRPC output.
pub(crate) fn grpc_vectors(vector: Option<VectorStructInternal>) -> Option<grpc::VectorsOutput> {
    let dense = |data: Vec<f32>| grpc::VectorOutput {
        vector: Some(vector_output::Vector::Dense(grpc::DenseVector { data })),
        ..Default::default()
    };
    let options = match vector? {
        VectorStructInternal::Single(data) => vectors_output::VectorsOptions::Vector(dense(data)),
        VectorStructInternal::Named(mut named) => match named.remove("") {
            Some(VectorInternal::Dense(data)) if named.is_empty() => {
                vectors_output::VectorsOptions::Vector(dense(data))
            }
            _ => return None,
        },
        VectorStructInternal::MultiDense(_) => return None,
    };
    Some(grpc::VectorsOutput {
        vectors_options: Some(options),
    })
}

/// A gRPC filter as qdrant-edge's (`None` for no or an empty filter).
pub(crate) fn filter(filter: Option<&grpc::Filter>) -> Result<Option<qdrant_edge::Filter>, Status> {
    let Some(filter) = filter else {
        return Ok(None);
    };
    let json = filter_json(filter)?;
    if json.as_object().is_some_and(Map::is_empty) {
        return Ok(None);
    }
    serde_json::from_value(json)
        .map(Some)
        .map_err(|e| Status::invalid_argument(format!("Wrong input: invalid filter: {e}")))
}

fn conditions_json(conditions: &[grpc::Condition]) -> Result<Json, Status> {
    conditions
        .iter()
        .map(condition_json)
        .collect::<Result<Vec<_>, _>>()
        .map(Json::Array)
}

fn filter_json(filter: &grpc::Filter) -> Result<Json, Status> {
    let mut out = Map::new();
    for (name, conditions) in [
        ("must", &filter.must),
        ("should", &filter.should),
        ("must_not", &filter.must_not),
    ] {
        if !conditions.is_empty() {
            out.insert(name.into(), conditions_json(conditions)?);
        }
    }
    if let Some(min_should) = &filter.min_should {
        out.insert(
            "min_should".into(),
            json!({
                "conditions": conditions_json(&min_should.conditions)?,
                "min_count": min_should.min_count,
            }),
        );
    }
    Ok(Json::Object(out))
}

fn unsupported(what: &str) -> Status {
    Status::invalid_argument(format!(
        "Wrong input: {what} is not supported by the Qdrant test double"
    ))
}

fn condition_json(condition: &grpc::Condition) -> Result<Json, Status> {
    Ok(match &condition.condition_one_of {
        Some(ConditionOneOf::Field(field)) => field_json(field)?,
        Some(ConditionOneOf::IsEmpty(c)) => json!({"is_empty": {"key": c.key}}),
        Some(ConditionOneOf::IsNull(c)) => json!({"is_null": {"key": c.key}}),
        Some(ConditionOneOf::HasId(c)) => json!({
            "has_id": c.has_id.iter().map(id_json).collect::<Result<Vec<_>, _>>()?
        }),
        Some(ConditionOneOf::Filter(f)) => filter_json(f)?,
        Some(ConditionOneOf::Nested(n)) => json!({"nested": {
            "key": n.key,
            "filter": n.filter.as_ref().map(filter_json).transpose()?.unwrap_or_else(|| json!({})),
        }}),
        Some(ConditionOneOf::HasVector(c)) => json!({"has_vector": c.has_vector}),
        Some(ConditionOneOf::Slice(_)) => return Err(unsupported("a slice condition")),
        None => return Err(Status::invalid_argument("Malformed Condition type")),
    })
}

fn geo(point: Option<&grpc::GeoPoint>) -> Json {
    let point = point.cloned().unwrap_or_default();
    json!({"lon": point.lon, "lat": point.lat})
}

fn line(line: &grpc::GeoLineString) -> Json {
    json!({"points": line.points.iter().map(|p| geo(Some(p))).collect::<Vec<_>>()})
}

fn field_json(field: &grpc::FieldCondition) -> Result<Json, Status> {
    let mut out = Map::new();
    out.insert("key".into(), json!(field.key));
    if let Some(m) = field.r#match.as_ref().and_then(|m| m.match_value.as_ref()) {
        let m = match m {
            MatchValue::Keyword(s) => json!({"value": s}),
            MatchValue::Integer(i) => json!({"value": i}),
            MatchValue::Boolean(b) => json!({"value": b}),
            MatchValue::Text(s) => json!({"text": s}),
            MatchValue::Phrase(s) => json!({"phrase": s}),
            MatchValue::TextAny(s) => json!({"text_any": s}),
            MatchValue::Keywords(r) => json!({"any": r.strings}),
            MatchValue::Integers(r) => json!({"any": r.integers}),
            MatchValue::ExceptKeywords(r) => json!({"except": r.strings}),
            MatchValue::ExceptIntegers(r) => json!({"except": r.integers}),
            MatchValue::Prefix(_) => return Err(unsupported("a prefix match")),
            MatchValue::Substring(_) => return Err(unsupported("a substring match")),
        };
        out.insert("match".into(), m);
    }
    if let Some(r) = &field.range {
        out.insert(
            "range".into(),
            json!({"lt": r.lt, "gt": r.gt, "gte": r.gte, "lte": r.lte}),
        );
    }
    if let Some(b) = &field.geo_bounding_box {
        out.insert(
            "geo_bounding_box".into(),
            json!({"top_left": geo(b.top_left.as_ref()), "bottom_right": geo(b.bottom_right.as_ref())}),
        );
    }
    if let Some(r) = &field.geo_radius {
        out.insert(
            "geo_radius".into(),
            json!({"center": geo(r.center.as_ref()), "radius": r.radius}),
        );
    }
    if let Some(p) = &field.geo_polygon {
        out.insert(
            "geo_polygon".into(),
            json!({
                "exterior": p.exterior.as_ref().map(line).unwrap_or_else(|| json!({"points": []})),
                "interiors": p.interiors.iter().map(line).collect::<Vec<_>>(),
            }),
        );
    }
    if let Some(c) = &field.values_count {
        out.insert(
            "values_count".into(),
            json!({"lt": c.lt, "gt": c.gt, "gte": c.gte, "lte": c.lte}),
        );
    }
    if field.datetime_range.is_some() {
        return Err(unsupported("a datetime range"));
    }
    if let Some(b) = field.is_empty {
        out.insert("is_empty".into(), json!(b));
    }
    if let Some(b) = field.is_null {
        out.insert("is_null".into(), json!(b));
    }
    Ok(Json::Object(out))
}

/// Which payload to return; `default` when the request does not say.
pub(crate) fn with_payload(
    selector: Option<&grpc::WithPayloadSelector>,
    default: bool,
) -> Result<WithPayloadInterface, Status> {
    use with_payload_selector::SelectorOptions;
    let json = match selector.and_then(|s| s.selector_options.as_ref()) {
        None => json!(default),
        Some(SelectorOptions::Enable(b)) => json!(b),
        Some(SelectorOptions::Include(i)) => json!({"include": i.fields}),
        Some(SelectorOptions::Exclude(e)) => json!({"exclude": e.fields}),
    };
    serde_json::from_value(json)
        .map_err(|e| Status::invalid_argument(format!("Wrong input: payload selector: {e}")))
}

/// Whether to return vectors (default: no).
pub(crate) fn with_vectors(selector: Option<&grpc::WithVectorsSelector>) -> WithVector {
    use with_vectors_selector::SelectorOptions;
    match selector.and_then(|s| s.selector_options.as_ref()) {
        None => WithVector::Bool(false),
        Some(SelectorOptions::Enable(b)) => WithVector::Bool(*b),
        Some(SelectorOptions::Include(names)) => {
            WithVector::Bool(names.names.iter().any(|n| n.is_empty()))
        }
    }
}

/// Search parameters (`hnsw_ef`, `exact`; the rest is ignored).
pub(crate) fn search_params(params: Option<&grpc::SearchParams>) -> Option<SearchParams> {
    let params = params?;
    serde_json::from_value(
        json!({"hnsw_ef": params.hnsw_ef, "exact": params.exact.unwrap_or(false)}),
    )
    .ok()
}

/// A qdrant-edge error as the status a Qdrant server answers.
pub(crate) fn status(err: &OperationError) -> Status {
    use OperationError as E;
    match err {
        E::WrongVectorDimension { .. }
        | E::VectorNameNotExists { .. }
        | E::TypeError { .. }
        | E::TypeInferenceError { .. }
        | E::ValidationError { .. }
        | E::WrongSparse
        | E::WrongMulti
        | E::MissingRangeIndexForOrderBy { .. }
        | E::MissingMapIndexForFacet { .. }
        | E::VariableTypeError { .. }
        | E::NonFiniteNumber { .. } => Status::invalid_argument(format!("Wrong input: {err}")),
        E::PointIdError { .. } => Status::not_found(format!("Not found: {err}")),
        E::Timeout { .. } => Status::deadline_exceeded(format!("Timeout error: {err}")),
        E::Cancelled { .. } => Status::cancelled(err.to_string()),
        _ => Status::internal(format!("Service internal error: {err}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyword(key: &str, value: &str) -> grpc::Condition {
        grpc::Condition::matches(key, value.to_string())
    }

    #[test]
    fn grpc_filters_parse_as_qdrant_filters() {
        let f = grpc::Filter {
            must: vec![
                keyword("scope", "a"),
                grpc::Condition::matches("n", 3),
                grpc::Condition::range(
                    "price",
                    grpc::Range {
                        gte: Some(1.0),
                        ..Default::default()
                    },
                ),
            ],
            must_not: vec![grpc::Condition::has_id([7u64])],
            should: vec![
                grpc::Condition::is_null("gone"),
                grpc::Condition::is_empty("tags"),
            ],
            min_should: None,
        };
        let edge = filter(Some(&f)).unwrap().unwrap();
        assert_eq!(edge.must.unwrap().len(), 3);
        assert_eq!(edge.must_not.unwrap().len(), 1);
        assert_eq!(edge.should.unwrap().len(), 2);
        assert!(filter(Some(&grpc::Filter::default())).unwrap().is_none());
    }

    #[test]
    fn unsupported_conditions_are_invalid_arguments() {
        let prefix = grpc::Condition {
            condition_one_of: Some(ConditionOneOf::Field(grpc::FieldCondition {
                key: "k".into(),
                r#match: Some(grpc::Match {
                    match_value: Some(MatchValue::Prefix("p".into())),
                }),
                ..Default::default()
            })),
        };
        let err = filter(Some(&grpc::Filter::must([prefix]))).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }
}
