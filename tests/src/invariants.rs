//! The protocol's invariants (I1–I7 of `docs/protocol.md`) as checks over the
//! two stores, read through the ports (so they work for every backend).
//!
//! Each check returns `Err(description)` instead of panicking so that a suite can
//! report which case broke which invariant (and the planted-bug test can assert
//! that *something* broke).

use std::collections::{BTreeMap, HashMap, HashSet};

use tandem_core::{
    Coordinator, IndexQuery, MetadataRepo, PendingFilter, PendingIndex, PointId, PointInfo,
    RecordId, SearchQuery, StoredRecord, VectorIndex,
};

/// Every committed row, keyed by id.
pub async fn rows<M: MetadataRepo>(repo: &M) -> Result<BTreeMap<RecordId, StoredRecord>, String> {
    let mut ids = Vec::new();
    let mut after = None;
    loop {
        let page = repo
            .scan_refs(None, after, 500)
            .await
            .map_err(|e| format!("scan_refs: {e}"))?;
        ids.extend(page.items.iter().map(|r| r.id));
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let mut out = BTreeMap::new();
    for chunk in ids.chunks(500) {
        for r in repo.get(chunk).await.map_err(|e| format!("get: {e}"))? {
            out.insert(r.id, r);
        }
    }
    Ok(out)
}

/// Every point in the index, keyed by id.
pub async fn points<V: VectorIndex>(index: &V) -> Result<HashMap<PointId, PointInfo>, String> {
    let mut out = HashMap::new();
    let mut offset = None;
    loop {
        let page = index
            .scroll(None, offset, 500)
            .await
            .map_err(|e| format!("scroll: {e}"))?;
        for p in page.items {
            if out.insert(p.id, p).is_some() {
                return Err("scroll listed a point twice".into());
            }
        }
        match page.next {
            Some(n) => offset = Some(n),
            None => return Ok(out),
        }
    }
}

/// Points named by unresolved intents.
pub async fn intent_points<M: MetadataRepo>(repo: &M) -> Result<(usize, HashSet<PointId>), String> {
    let intents = repo
        .list_intents(1_000_000)
        .await
        .map_err(|e| format!("list_intents: {e}"))?;
    let named = intents
        .iter()
        .flat_map(|i| i.point_ids.iter().copied())
        .collect();
    Ok((intents.len(), named))
}

/// Every pending-index entry (waiting or dead-lettered), keyed by record;
/// empty for a store without deferred indexing.
pub async fn pending<M: MetadataRepo>(
    repo: &M,
) -> Result<BTreeMap<RecordId, PendingIndex>, String> {
    if !repo.deferred_indexing() {
        return Ok(BTreeMap::new());
    }
    let mut out = BTreeMap::new();
    let mut after = None;
    loop {
        let page = repo
            .list_pending(PendingFilter::All, after, 500)
            .await
            .map_err(|e| format!("list_pending: {e}"))?;
        let Some(last) = page.last() else {
            return Ok(out);
        };
        after = Some(last.record_id);
        out.extend(page.into_iter().map(|e| (e.record_id, e)));
    }
}

/// I1 — no dangling metadata: every committed row's point exists in the
/// index. Deferred form: every row's *indexed* point exists — a row that was
/// never indexed (a deferred write's new record, whose pending entry says
/// `indexed_version` 0) references a reserved point no search can reach.
pub async fn no_dangling_rows<M: MetadataRepo, V: VectorIndex>(
    repo: &M,
    index: &V,
) -> Result<(), String> {
    let rows = rows(repo).await?;
    let points = points(index).await?;
    let pending = pending(repo).await?;
    let dangling: Vec<_> = rows
        .values()
        .filter(|r| !points.contains_key(&r.point_id))
        .filter(|r| {
            !pending
                .get(&r.id)
                .is_some_and(|e| e.indexed_version == 0 && e.version == r.version)
        })
        .map(|r| (r.id, r.point_id))
        .collect();
    if dangling.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "I1 violated: rows whose point is missing: {dangling:?}"
        ))
    }
}

/// I2 — no invisible garbage: every point is referenced by a committed row or
/// named by an unresolved intent.
pub async fn no_invisible_garbage<M: MetadataRepo, V: VectorIndex>(
    repo: &M,
    index: &V,
) -> Result<(), String> {
    let referenced: HashSet<PointId> = rows(repo).await?.values().map(|r| r.point_id).collect();
    let (_, named) = intent_points(repo).await?;
    let points = points(index).await?;
    let garbage: Vec<_> = points
        .keys()
        .filter(|p| !referenced.contains(p) && !named.contains(p))
        .collect();
    if garbage.is_empty() {
        Ok(())
    } else {
        Err(format!("I2 violated: points nothing names: {garbage:?}"))
    }
}

/// I2 after recovery — exact equality: the set of points equals the set of
/// referenced points, no intent is left, and every point carries its row's
/// record id and scope.
pub async fn exact_equality<M: MetadataRepo, V: VectorIndex>(
    repo: &M,
    index: &V,
) -> Result<(), String> {
    let rows = rows(repo).await?;
    let points = points(index).await?;
    let (live, _) = intent_points(repo).await?;
    if live != 0 {
        return Err(format!(
            "I2 (exact) violated: {live} intents left after recovery"
        ));
    }
    let pending = pending(repo).await?;
    if !pending.is_empty() {
        return Err(format!(
            "deferred writes left unindexed after the workers finished: {:?}",
            pending.keys().collect::<Vec<_>>()
        ));
    }
    let referenced: HashSet<PointId> = rows.values().map(|r| r.point_id).collect();
    let present: HashSet<PointId> = points.keys().copied().collect();
    if referenced != present {
        let missing: Vec<_> = referenced.difference(&present).collect();
        let extra: Vec<_> = present.difference(&referenced).collect();
        return Err(format!(
            "I2 (exact) violated: missing points {missing:?}, unreferenced points {extra:?}"
        ));
    }
    for r in rows.values() {
        let p = &points[&r.point_id];
        if p.record_id != r.id || p.scope != r.scope {
            return Err(format!("point {} does not belong to row {}", p.id, r.id));
        }
    }
    Ok(())
}

/// Ordering (deferred indexing): every row's point holds the row's *current*
/// vector — no older version was indexed over a newer one. Checked by a
/// nearest-neighbour search with the row's kept vector, which must find the
/// row's own point first, at (almost) exactly the same vector. Rows without
/// a kept vector are skipped.
pub async fn indexed_current<M: MetadataRepo, V: VectorIndex>(
    repo: &M,
    index: &V,
) -> Result<(), String> {
    for r in rows(repo).await?.values() {
        let Some(vector) = &r.vector else { continue };
        let hits = index
            .search(&IndexQuery {
                vector: vector.clone(),
                limit: 1,
                filter: Default::default(),
                score_threshold: None,
            })
            .await
            .map_err(|e| format!("search: {e}"))?;
        match hits.first() {
            Some(h) if h.id == r.point_id && h.score > 0.9999 => {}
            other => {
                return Err(format!(
                    "ordering violated: record {} (version {}) is indexed with another \
                     vector than its current one (nearest point {:?}, row's point {})",
                    r.id,
                    r.version,
                    other.map(|h| (h.id, h.score)),
                    r.point_id
                ));
            }
        }
    }
    Ok(())
}

/// I4 — guarded reads: for each query, every hit is a committed row whose
/// current point is the one the index matched, no record appears twice, and the
/// hit carries the row as committed.
pub async fn guarded_reads<M: MetadataRepo, V: VectorIndex>(
    coordinator: &Coordinator<M, V>,
    repo: &impl MetadataRepo,
    queries: &[Vec<f32>],
    k: usize,
) -> Result<(), String> {
    for q in queries {
        let hits = coordinator
            .search(&SearchQuery::new(q.clone(), k))
            .await
            .map_err(|e| format!("search failed: {e}"))?;
        let mut seen = HashSet::new();
        let ids: Vec<RecordId> = hits.iter().map(|h| h.record.id).collect();
        let committed: HashMap<RecordId, StoredRecord> = repo
            .get(&ids)
            .await
            .map_err(|e| format!("get: {e}"))?
            .into_iter()
            .map(|r| (r.id, r))
            .collect();
        for h in &hits {
            if !seen.insert(h.record.id) {
                return Err(format!(
                    "I4 violated: record {} returned twice",
                    h.record.id
                ));
            }
            match committed.get(&h.record.id) {
                None => {
                    return Err(format!(
                        "I4 violated: search returned {} which has no committed row",
                        h.record.id
                    ));
                }
                Some(row)
                    if row.point_id != h.record.point_id || row.content != h.record.content =>
                {
                    return Err(format!(
                        "I4 violated: search returned {} at point {} but the row references {}",
                        h.record.id, h.record.point_id, row.point_id
                    ));
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

/// I7 — convergence: after recovery, verify is consistent, repair changes
/// nothing, and a second verify still finds nothing.
pub async fn converged<M: MetadataRepo, V: VectorIndex>(
    coordinator: &Coordinator<M, V>,
) -> Result<(), String> {
    let first = coordinator
        .verify(None)
        .await
        .map_err(|e| format!("verify failed: {e}"))?;
    if !first.is_consistent() {
        return Err(format!("I7 violated: verify after recovery: {first:?}"));
    }
    let repair = coordinator
        .repair(None)
        .await
        .map_err(|e| format!("repair failed: {e}"))?;
    if repair.orphans_deleted != 0 || repair.missing_rewritten != 0 {
        return Err(format!(
            "I7 violated: repair of a converged system changed something: {repair:?}"
        ));
    }
    let second = coordinator
        .verify(None)
        .await
        .map_err(|e| format!("second verify failed: {e}"))?;
    if !second.is_consistent() || second != first {
        return Err(format!("I7 violated: second verify differs: {second:?}"));
    }
    Ok(())
}
