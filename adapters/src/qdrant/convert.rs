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
    }
}
