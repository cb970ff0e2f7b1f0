//! Validation before anything is written, and request hashing for idempotency keys.

use std::collections::HashSet;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::config::Limits;
use crate::error::ValidationError;
use crate::model::{DeleteSelector, Distance, Filter, NewRecord, Scope};
use crate::transaction::WriteOp;

pub(crate) fn check_scope(
    scope: &Scope,
    index: usize,
    limits: &Limits,
) -> Result<(), ValidationError> {
    let len = scope.as_str().len();
    if scope.as_str().trim().is_empty() {
        return Err(ValidationError::EmptyScope { index });
    }
    if len > limits.max_scope_len {
        return Err(ValidationError::ScopeTooLong {
            index,
            len,
            max: limits.max_scope_len,
        });
    }
    Ok(())
}

pub(crate) fn check_vector(
    vector: &[f32],
    index: usize,
    dimension: usize,
    distance: Distance,
) -> Result<(), ValidationError> {
    if vector.len() != dimension {
        return Err(ValidationError::DimensionMismatch {
            index,
            expected: dimension,
            got: vector.len(),
        });
    }
    if let Some(position) = vector.iter().position(|v| !v.is_finite()) {
        return Err(ValidationError::NonFiniteVector { index, position });
    }
    if distance == Distance::Cosine && vector.iter().all(|v| *v == 0.0) {
        return Err(ValidationError::ZeroVector { index });
    }
    Ok(())
}

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Checks a whole batch; the first problem found is returned.
pub(crate) fn check_batch(
    records: &[NewRecord],
    dimension: usize,
    distance: Distance,
    limits: &Limits,
) -> Result<(), ValidationError> {
    if records.is_empty() {
        return Err(ValidationError::EmptyBatch);
    }
    if records.len() > limits.max_batch {
        return Err(ValidationError::BatchTooLarge {
            len: records.len(),
            max: limits.max_batch,
        });
    }
    let mut seen = HashSet::with_capacity(records.len());
    for (index, r) in records.iter().enumerate() {
        check_scope(&r.scope, index, limits)?;
        if !r.metadata.is_object() {
            return Err(ValidationError::MetadataNotObject {
                index,
                found: json_type(&r.metadata),
            });
        }
        check_vector(&r.vector, index, dimension, distance)?;
        if let Some(id) = r.id
            && !seen.insert(id)
        {
            return Err(ValidationError::DuplicateId { index, id });
        }
    }
    Ok(())
}

pub(crate) fn check_selector(
    selector: &DeleteSelector,
    limits: &Limits,
) -> Result<(), ValidationError> {
    match selector {
        DeleteSelector::Ids(ids) => {
            if ids.is_empty() {
                return Err(ValidationError::Invalid(
                    "delete by ids needs at least one id".into(),
                ));
            }
            if ids.len() > limits.max_batch {
                return Err(ValidationError::BatchTooLarge {
                    len: ids.len(),
                    max: limits.max_batch,
                });
            }
            Ok(())
        }
        DeleteSelector::Scope(scope) => check_scope(scope, 0, limits),
        DeleteSelector::MetadataEq { scope, key, .. } => {
            check_scope(scope, 0, limits)?;
            if key.is_empty() {
                return Err(ValidationError::Invalid(
                    "metadata key must not be empty".into(),
                ));
            }
            Ok(())
        }
    }
}

/// Checks every part of a transaction before anything is written: at least
/// one part, each part valid on its own, at most `max_batch` records in all,
/// and no id upserted by two parts.
pub(crate) fn check_transaction(
    parts: &[WriteOp],
    dimension: usize,
    distance: Distance,
    limits: &Limits,
) -> Result<(), ValidationError> {
    if parts.is_empty() {
        return Err(ValidationError::EmptyTransaction);
    }
    let total: usize = parts
        .iter()
        .map(|p| match p {
            WriteOp::Upsert(records) => records.len(),
            WriteOp::Delete(_) => 0,
        })
        .sum();
    if total > limits.max_batch {
        return Err(ValidationError::BatchTooLarge {
            len: total,
            max: limits.max_batch,
        });
    }
    let mut upserted = HashSet::new();
    for (part, op) in parts.iter().enumerate() {
        let in_part = |error| ValidationError::InPart {
            part,
            error: Box::new(error),
        };
        match op {
            WriteOp::Upsert(records) => {
                check_batch(records, dimension, distance, limits).map_err(in_part)?;
                for id in records.iter().filter_map(|r| r.id) {
                    if !upserted.insert(id) {
                        return Err(ValidationError::UpsertedTwice { part, id });
                    }
                }
            }
            WriteOp::Delete(selector) => check_selector(selector, limits).map_err(in_part)?,
        }
    }
    Ok(())
}

pub(crate) fn check_filter(filter: &Filter, limits: &Limits) -> Result<(), ValidationError> {
    if let Some(scope) = &filter.scope {
        check_scope(scope, 0, limits)?;
    }
    if filter.metadata_eq.keys().any(|k| k.is_empty()) {
        return Err(ValidationError::Invalid(
            "metadata key must not be empty".into(),
        ));
    }
    Ok(())
}

/// A stable hash of a request as the caller gave it (before ids are generated),
/// so a retry with the same key and the same request replays, and the same key
/// with another request is rejected.
pub(crate) fn request_hash<T: Serialize + ?Sized>(op: &str, request: &T) -> String {
    let mut h = Sha256::new();
    h.update(op.as_bytes());
    h.update([0]);
    // serde_json output is deterministic for our types (struct fields in
    // declaration order; metadata objects are ordered maps).
    h.update(serde_json::to_vec(request).unwrap_or_default());
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RecordId;
    use serde_json::json;

    fn rec(v: Vec<f32>) -> NewRecord {
        NewRecord::new("s", "c", v)
    }

    #[test]
    fn each_bad_input_gets_its_own_error() {
        let l = Limits::default();
        let d = Distance::Cosine;
        assert_eq!(check_batch(&[], 2, d, &l), Err(ValidationError::EmptyBatch));
        assert!(matches!(
            check_batch(&[rec(vec![1.0])], 2, d, &l),
            Err(ValidationError::DimensionMismatch {
                index: 0,
                expected: 2,
                got: 1
            })
        ));
        assert!(matches!(
            check_batch(&[rec(vec![1.0, f32::NAN])], 2, d, &l),
            Err(ValidationError::NonFiniteVector {
                index: 0,
                position: 1
            })
        ));
        assert!(matches!(
            check_batch(&[rec(vec![f32::INFINITY, 1.0])], 2, d, &l),
            Err(ValidationError::NonFiniteVector { position: 0, .. })
        ));
        assert!(matches!(
            check_batch(&[rec(vec![0.0, 0.0])], 2, d, &l),
            Err(ValidationError::ZeroVector { index: 0 })
        ));
        assert!(check_batch(&[rec(vec![0.0, 0.0])], 2, Distance::Dot, &l).is_ok());
        let id = RecordId::new_v7();
        let dup = [
            rec(vec![1.0, 0.0]).with_id(id),
            rec(vec![1.0, 0.0]).with_id(id),
        ];
        assert!(matches!(
            check_batch(&dup, 2, d, &l),
            Err(ValidationError::DuplicateId { index: 1, .. })
        ));
        let bad_meta = rec(vec![1.0, 0.0]).with_metadata(json!([1]));
        assert!(matches!(
            check_batch(&[bad_meta], 2, d, &l),
            Err(ValidationError::MetadataNotObject {
                found: "an array",
                ..
            })
        ));
        let empty_scope = NewRecord::new("  ", "c", vec![1.0, 0.0]);
        assert!(matches!(
            check_batch(&[empty_scope], 2, d, &l),
            Err(ValidationError::EmptyScope { index: 0 })
        ));
        let long_scope = NewRecord::new("x".repeat(300), "c", vec![1.0, 0.0]);
        assert!(matches!(
            check_batch(&[long_scope], 2, d, &l),
            Err(ValidationError::ScopeTooLong { len: 300, .. })
        ));
        let small = Limits {
            max_batch: 1,
            ..Limits::default()
        };
        assert!(matches!(
            check_batch(&[rec(vec![1.0, 0.0]), rec(vec![1.0, 0.0])], 2, d, &small),
            Err(ValidationError::BatchTooLarge { len: 2, max: 1 })
        ));
    }

    #[test]
    fn selectors_are_checked() {
        let l = Limits::default();
        assert!(check_selector(&DeleteSelector::Ids(vec![]), &l).is_err());
        assert!(check_selector(&DeleteSelector::Scope(Scope::new("")), &l).is_err());
        assert!(check_selector(&DeleteSelector::Scope(Scope::new("a")), &l).is_ok());
    }

    #[test]
    fn transactions_are_checked_part_by_part() {
        let l = Limits::default();
        let d = Distance::Cosine;
        assert_eq!(
            check_transaction(&[], 2, d, &l),
            Err(ValidationError::EmptyTransaction)
        );
        let id = RecordId::new_v7();
        let ok = WriteOp::Upsert(vec![rec(vec![1.0, 0.0]).with_id(id)]);
        let del = WriteOp::Delete(DeleteSelector::Scope(Scope::new("s")));
        assert!(check_transaction(&[del.clone(), ok.clone()], 2, d, &l).is_ok());
        // The same id upserted by two parts.
        assert_eq!(
            check_transaction(&[ok.clone(), del.clone(), ok.clone()], 2, d, &l),
            Err(ValidationError::UpsertedTwice { part: 2, id })
        );
        // A bad part names itself.
        let bad = WriteOp::Upsert(vec![rec(vec![1.0])]);
        let err = check_transaction(&[ok.clone(), bad], 2, d, &l).unwrap_err();
        assert!(
            matches!(&err, ValidationError::InPart { part: 1, error }
                if matches!(**error, ValidationError::DimensionMismatch { .. })),
            "{err}"
        );
        assert!(err.to_string().starts_with("part #1: record #0"), "{err}");
        let bad_sel = WriteOp::Delete(DeleteSelector::Ids(vec![]));
        assert!(matches!(
            check_transaction(&[bad_sel], 2, d, &l),
            Err(ValidationError::InPart { part: 0, .. })
        ));
        // The records of every part count against the batch limit.
        let small = Limits {
            max_batch: 1,
            ..Limits::default()
        };
        let other = WriteOp::Upsert(vec![rec(vec![0.0, 1.0])]);
        assert!(matches!(
            check_transaction(&[ok, other], 2, d, &small),
            Err(ValidationError::BatchTooLarge { len: 2, max: 1 })
        ));
    }

    #[test]
    fn request_hash_is_stable_and_sensitive() {
        let a = vec![rec(vec![1.0, 0.0])];
        let b = vec![rec(vec![0.0, 1.0])];
        assert_eq!(
            request_hash("upsert", &a),
            request_hash("upsert", &a.clone())
        );
        assert_ne!(request_hash("upsert", &a), request_hash("upsert", &b));
        assert_ne!(request_hash("upsert", &a), request_hash("delete", &a));
    }
}
