//! Reconciliation: verify, repair and stats.

use std::collections::{HashMap, HashSet};

use tokio::time::Instant;
use tracing::{Instrument, info, info_span, warn};

use super::validate::check_scope;
use super::write::index_failure;
use super::{
    Coordinator, RepairReport, ScopeCounts, Stats, VerifyCursor, VerifyPage, VerifyReport,
};
use crate::error::{CoordinatorError, ValidationError};
use crate::model::{IntentId, IntentKind, NewIntent, OwnerToken, Point, PointId, PointInfo, Scope};
use crate::ports::{MetadataRepo, RowRef, VectorIndex};

/// Page size of the listings verify streams.
const PAGE: usize = 1_000;
/// Most intents looked at by verify and stats.
const MAX_INTENTS: usize = 1_000_000;

impl<M: MetadataRepo, V: VectorIndex> Coordinator<M, V> {
    /// Compares both stores (one scope, or all): per-scope counts, committed
    /// rows whose point is missing, orphan points (referenced by no row and
    /// named by no live intent), and live intents. Findings are re-checked once
    /// before being reported — a missing point must still be missing while its
    /// row references it, an orphan still unreferenced, unnamed and present —
    /// so a write landing during the scan (which may supersede and delete a
    /// listed point) is not reported; on a quiet system the report is exact.
    pub async fn verify(&self, scope: Option<&Scope>) -> Result<VerifyReport, CoordinatorError> {
        if let Some(s) = scope {
            check_scope(s, 0, &self.config.limits)?;
        }
        self.refresh_now().await?;
        self.verify_inner(scope)
            .instrument(info_span!("tandem.verify"))
            .await
    }

    async fn verify_inner(&self, scope: Option<&Scope>) -> Result<VerifyReport, CoordinatorError> {
        // Index first, then intents, then rows: a point written during the scan
        // is either named by a live intent or referenced by a row by the time
        // the later listings are read.
        let points = self.list_points(scope).await?;
        let intents = self.intent_points().await?;
        let rows = self.list_rows(scope).await?;

        let mut report = VerifyReport {
            live_intents: intents.live,
            held_intents: intents.held,
            intent_points: intents.named.len(),
            ..VerifyReport::default()
        };
        for p in points.values() {
            report.scopes.entry(p.scope.clone()).or_default().points += 1;
        }
        let mut referenced = HashSet::with_capacity(rows.len());
        let mut missing = Vec::new();
        for r in &rows {
            report.scopes.entry(r.scope.clone()).or_default().rows += 1;
            referenced.insert(r.point_id);
            if !points.contains_key(&r.point_id) {
                missing.push(r.clone());
            }
        }
        let orphans: Vec<PointInfo> = points
            .values()
            .filter(|p| !referenced.contains(&p.id) && !intents.named.contains(&p.id))
            .cloned()
            .collect();

        // Re-check the findings: a missing point must still be missing, an
        // orphan must still be unreferenced, unnamed and present.
        let (missing, unindexed) = self.confirm_missing(missing).await?;
        report.missing_points = missing;
        for r in &unindexed {
            report.scopes.entry(r.scope.clone()).or_default().unindexed += 1;
        }
        report.unindexed = unindexed.len();
        if self.repo.deferred_indexing() {
            let stats = self.pending_stats().await?;
            report.pending_index = stats.pending;
            report.dead_letters = stats.dead;
        }
        report.orphan_points = self.confirm_orphans(orphans).await?;
        for c in report.scopes.values() {
            debug_assert!(c.rows > 0 || c.points > 0);
        }
        metrics::gauge!("tandem_pending_intents").set(report.live_intents as f64);
        Ok(report)
    }

    /// One bounded step of a paged verification: checks the next page of at
    /// most `limit` points and the next page of at most `limit` rows after
    /// `cursor` (one scope, or all), and returns what it found and where the
    /// next step starts ([`VerifyPage::next`]).
    ///
    /// Calling it again with the returned cursor until
    /// [`VerifyCursor::is_done`] covers every row and every point once, with a
    /// bounded amount of work per call, so a service can verify a large store
    /// over time instead of in one scan. Each page's findings are confirmed as
    /// [`verify`](Self::verify) confirms them: a missing point must still be
    /// missing while its row still references it, an orphan must be referenced
    /// by no row, named by no live intent, and still present. The counts are taken page by
    /// page while writes go on, so over a whole pass they can differ by the
    /// writes made meanwhile; on a quiet store they are exact.
    pub async fn verify_page(
        &self,
        scope: Option<&Scope>,
        cursor: &VerifyCursor,
        limit: usize,
    ) -> Result<VerifyPage, CoordinatorError> {
        if let Some(s) = scope {
            check_scope(s, 0, &self.config.limits)?;
        }
        if limit == 0 {
            return Err(ValidationError::Invalid("the page size must be at least 1".into()).into());
        }
        self.refresh_now().await?;
        self.verify_page_inner(scope, cursor, limit.min(PAGE))
            .instrument(info_span!("tandem.verify_page"))
            .await
    }

    async fn verify_page_inner(
        &self,
        scope: Option<&Scope>,
        cursor: &VerifyCursor,
        limit: usize,
    ) -> Result<VerifyPage, CoordinatorError> {
        let mut page = VerifyPage {
            next: cursor.clone(),
            ..VerifyPage::default()
        };
        if !cursor.points_done {
            let deadline = Instant::now() + self.config.call_deadline;
            let index = self.index();
            let points = self
                .index_call("index.scroll", deadline, || {
                    index.scroll(scope, cursor.points_offset, limit)
                })
                .await?;
            for p in &points.items {
                page.scopes.entry(p.scope.clone()).or_default().points += 1;
            }
            let ids: Vec<PointId> = points.items.iter().map(|p| p.id).collect();
            let referenced = self.referenced(&ids).await?;
            let unreferenced: Vec<PointInfo> = points
                .items
                .into_iter()
                .filter(|p| !referenced.contains(&p.id))
                .collect();
            if !unreferenced.is_empty() {
                let named = self.intent_points().await?.named;
                let candidates = unreferenced
                    .into_iter()
                    .filter(|p| !named.contains(&p.id))
                    .collect();
                page.orphan_points = self.confirm_orphans(candidates).await?;
            }
            page.next.points_done = points.next.is_none();
            page.next.points_offset = points.next;
        }
        if !cursor.rows_done {
            let deadline = Instant::now() + self.config.call_deadline;
            let rows = self
                .metadata_call("metadata.scan_refs", deadline, || {
                    self.repo.scan_refs(scope, cursor.rows_after, limit)
                })
                .await?;
            for r in &rows.items {
                page.scopes.entry(r.scope.clone()).or_default().rows += 1;
            }
            let ids: Vec<PointId> = rows.items.iter().map(|r| r.point_id).collect();
            let mut present = HashSet::with_capacity(ids.len());
            let index = self.index();
            for chunk in ids.chunks(PAGE) {
                let found = self
                    .index_call("index.retrieve", deadline, || index.retrieve(chunk))
                    .await?;
                present.extend(found.into_iter().map(|p| p.id));
            }
            let candidates = rows
                .items
                .into_iter()
                .filter(|r| !present.contains(&r.point_id))
                .collect();
            let (missing, unindexed) = self.confirm_missing(candidates).await?;
            page.missing_points = missing;
            for r in &unindexed {
                page.scopes.entry(r.scope.clone()).or_default().unindexed += 1;
            }
            page.next.rows_done = rows.next.is_none();
            page.next.rows_after = rows.next;
        }
        Ok(page)
    }

    async fn list_points(
        &self,
        scope: Option<&Scope>,
    ) -> Result<HashMap<PointId, PointInfo>, CoordinatorError> {
        let mut out = HashMap::new();
        let mut offset = None;
        let index = self.index();
        loop {
            let deadline = Instant::now() + self.config.call_deadline;
            let page = self
                .index_call("index.scroll", deadline, || {
                    index.scroll(scope, offset, PAGE)
                })
                .await?;
            for p in page.items {
                out.insert(p.id, p);
            }
            match page.next {
                Some(n) => offset = Some(n),
                None => return Ok(out),
            }
        }
    }

    async fn list_rows(&self, scope: Option<&Scope>) -> Result<Vec<RowRef>, CoordinatorError> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let deadline = Instant::now() + self.config.call_deadline;
            let page = self
                .metadata_call("metadata.scan_refs", deadline, || {
                    self.repo.scan_refs(scope, after, PAGE)
                })
                .await?;
            out.extend(page.items);
            match page.next {
                Some(n) => after = Some(n),
                None => return Ok(out),
            }
        }
    }

    /// The unresolved intents: how many, how many of them a live saga holds,
    /// and every point they name.
    async fn intent_points(&self) -> Result<IntentPoints, CoordinatorError> {
        let deadline = Instant::now() + self.config.call_deadline;
        let intents = self
            .metadata_call("metadata.list_intents", deadline, || {
                self.repo.list_intents(MAX_INTENTS)
            })
            .await?;
        let named = intents
            .iter()
            .flat_map(|i| i.point_ids.iter().copied())
            .collect();
        Ok(IntentPoints {
            live: intents.iter().filter(|i| !i.is_spent()).count(),
            held: intents.iter().filter(|i| i.is_held()).count(),
            named,
        })
    }

    /// The rows of `candidates` whose point is still missing while they
    /// still reference it, split into those that violate I1 and those that
    /// were never indexed (a deferred write's record waiting for a worker,
    /// or dead-lettered): their row references a reserved point.
    async fn confirm_missing(
        &self,
        candidates: Vec<RowRef>,
    ) -> Result<(Vec<RowRef>, Vec<RowRef>), CoordinatorError> {
        if candidates.is_empty() {
            return Ok((candidates, Vec::new()));
        }
        let deadline = Instant::now() + self.config.call_deadline;
        let ids: Vec<PointId> = candidates.iter().map(|r| r.point_id).collect();
        let mut present = HashSet::new();
        let index = self.index();
        for chunk in ids.chunks(PAGE) {
            let found = self
                .index_call("index.retrieve", deadline, || index.retrieve(chunk))
                .await?;
            present.extend(found.into_iter().map(|p| p.id));
        }
        // Still referenced by the row? (It may have been updated or deleted.)
        let still = self.referenced(&ids).await?;
        let missing: Vec<RowRef> = candidates
            .into_iter()
            .filter(|r| !present.contains(&r.point_id) && still.contains(&r.point_id))
            .collect();
        if missing.is_empty() || !self.repo.deferred_indexing() {
            return Ok((missing, Vec::new()));
        }
        let records: Vec<_> = missing.iter().map(|r| r.id).collect();
        let never_indexed: HashSet<_> = self
            .metadata_call("metadata.pending_for", deadline, || {
                self.repo.pending_for(&records)
            })
            .await?
            .into_iter()
            .filter(|e| e.indexed_version == 0)
            .map(|e| e.record_id)
            .collect();
        Ok(missing
            .into_iter()
            .partition(|r| !never_indexed.contains(&r.id)))
    }

    async fn confirm_orphans(
        &self,
        candidates: Vec<PointInfo>,
    ) -> Result<Vec<PointInfo>, CoordinatorError> {
        if candidates.is_empty() {
            return Ok(candidates);
        }
        let ids: Vec<PointId> = candidates.iter().map(|p| p.id).collect();
        let referenced = self.referenced(&ids).await?;
        let named = self.intent_points().await?.named;
        let unowned: Vec<PointInfo> = candidates
            .into_iter()
            .filter(|p| !referenced.contains(&p.id) && !named.contains(&p.id))
            .collect();
        if unowned.is_empty() {
            return Ok(unowned);
        }
        // Still there? A point an update superseded after the scan listed it
        // is unreferenced and, once its write's cleanup ended, unnamed too —
        // but deleted: not an orphan. Read after the metadata, so that a
        // point found here was unowned while it existed.
        let deadline = Instant::now() + self.config.call_deadline;
        let ids: Vec<PointId> = unowned.iter().map(|p| p.id).collect();
        let index = self.index();
        let mut present = HashSet::new();
        for chunk in ids.chunks(PAGE) {
            let found = self
                .index_call("index.retrieve", deadline, || index.retrieve(chunk))
                .await?;
            present.extend(found.into_iter().map(|p| p.id));
        }
        Ok(unowned
            .into_iter()
            .filter(|p| present.contains(&p.id))
            .collect())
    }

    async fn referenced(&self, ids: &[PointId]) -> Result<HashSet<PointId>, CoordinatorError> {
        let deadline = Instant::now() + self.config.call_deadline;
        let mut out = HashSet::new();
        for chunk in ids.chunks(PAGE) {
            let found = self
                .metadata_call("metadata.referenced_points", deadline, || {
                    self.repo.referenced_points(chunk)
                })
                .await?;
            out.extend(found);
        }
        Ok(out)
    }

    /// Verifies, then repairs what it safely can: deletes orphan points older
    /// than `orphan_grace` (re-checked just before deleting), and rewrites
    /// missing points from the vectors the metadata store keeps (under a repair
    /// intent, so a rewrite racing an update leaves no garbage). Ends with a
    /// second verify. On a converged system it changes nothing.
    pub async fn repair(&self, scope: Option<&Scope>) -> Result<RepairReport, CoordinatorError> {
        let span = info_span!("tandem.repair");
        async {
            let before = self.verify(scope).await?;
            let mut report = RepairReport::default();
            let watermark = self.clock.now_ms().saturating_sub(
                i64::try_from(self.config.orphan_grace.as_millis()).unwrap_or(i64::MAX),
            );
            let (old, young): (Vec<PointInfo>, Vec<PointInfo>) = before
                .orphan_points
                .into_iter()
                .partition(|p| p.written_at_ms <= watermark);
            report.orphans_too_young = young.len();
            if !old.is_empty() {
                let confirmed = self.confirm_orphans(old).await?;
                let ids: Vec<PointId> = confirmed.iter().map(|p| p.id).collect();
                let deadline = Instant::now() + self.config.call_deadline;
                self.delete_points(&ids, deadline)
                    .await
                    .map_err(|f| index_failure(f, self.config.call_deadline))?;
                report.orphans_deleted = ids.len();
                if !ids.is_empty() {
                    info!(orphans = ids.len(), "repair deleted orphan points");
                }
            }
            if !before.missing_points.is_empty() {
                let (rewritten, unrepairable) =
                    self.rewrite_missing(&before.missing_points).await?;
                report.missing_rewritten = rewritten;
                report.missing_unrepairable = unrepairable;
            }
            report.after = self.verify(scope).await?;
            Ok(report)
        }
        .instrument(span)
        .await
    }

    async fn rewrite_missing(
        &self,
        missing: &[RowRef],
    ) -> Result<(usize, usize), CoordinatorError> {
        let deadline = Instant::now() + self.config.call_deadline;
        let ids: Vec<_> = missing.iter().map(|r| r.id).collect();
        let rows = self
            .metadata_call("metadata.get", deadline, || self.repo.get(&ids))
            .await?;
        let now = self.clock.now_ms();
        let mut unrepairable = 0;
        let mut points = Vec::new();
        for row in rows {
            match row.vector {
                Some(vector) => points.push(Point {
                    id: row.point_id,
                    record_id: row.id,
                    scope: row.scope,
                    metadata: row.metadata,
                    vector,
                    written_at_ms: now,
                }),
                None => unrepairable += 1,
            }
        }
        if points.is_empty() {
            return Ok((0, unrepairable));
        }
        let owner = OwnerToken::new_random();
        let intent = NewIntent {
            id: IntentId::new_v7(),
            kind: IntentKind::Repair,
            owner,
            lease_deadline_ms: now.saturating_add(self.lease_ms()),
            point_ids: points.iter().map(|p| p.id).collect(),
            created_ms: now,
            generation: self.generation(),
        };
        self.metadata_call("metadata.prepare", deadline, || self.repo.prepare(&intent))
            .await?;
        let chunk = self.config.limits.index_chunk;
        let index = self.index();
        for c in points.chunks(chunk) {
            self.index_call("index.upsert", deadline, || index.upsert(c))
                .await?;
        }
        // The garbage rule, at once: a row may have moved on meanwhile.
        let referenced = self.referenced(&intent.point_ids).await?;
        let garbage: Vec<PointId> = intent
            .point_ids
            .iter()
            .filter(|p| !referenced.contains(p))
            .copied()
            .collect();
        if let Err(f) = self.delete_points(&garbage, deadline).await {
            warn!(error = %index_failure(f, self.config.call_deadline), "repair left garbage to recovery");
            return Ok((referenced.len(), unrepairable));
        }
        self.resolve_best_effort(intent.id, owner).await;
        info!(
            rewritten = referenced.len(),
            "repair rewrote missing points"
        );
        Ok((referenced.len(), unrepairable))
    }

    /// Counts in both stores and the intent backlog.
    pub async fn stats(&self) -> Result<Stats, CoordinatorError> {
        self.refresh_now().await?;
        let deadline = Instant::now() + self.config.call_deadline;
        let rows_by_scope = self
            .metadata_call("metadata.count_by_scope", deadline, || {
                self.repo.count_by_scope()
            })
            .await?;
        let index = self.index();
        let points = self
            .index_call("index.count", deadline, || index.count(None))
            .await?;
        let intents = self
            .metadata_call("metadata.list_intents", deadline, || {
                self.repo.list_intents(MAX_INTENTS)
            })
            .await?;
        let now = self.clock.now_ms();
        let spent = intents.iter().filter(|i| i.is_spent()).count();
        let live = intents.len() - spent;
        let held = intents.iter().filter(|i| i.is_held()).count();
        let expired = intents
            .iter()
            .filter(|i| i.is_expired(now) && !i.is_spent())
            .count();
        metrics::gauge!("tandem_pending_intents").set(live as f64);
        let pending = if self.repo.deferred_indexing() {
            Some(self.pending_stats().await?)
        } else {
            None
        };
        Ok(Stats {
            rows_by_scope,
            points,
            live_intents: live,
            held_intents: held,
            expired_intents: expired,
            spent_intents: spent,
            pending,
        })
    }
}

impl ScopeCounts {
    /// Whether both stores hold as many entries for the scope (a row never
    /// indexed has no point).
    pub fn in_sync(&self) -> bool {
        self.rows == self.points + self.unindexed
    }
}

/// What [`Coordinator::intent_points`] found.
struct IntentPoints {
    /// Unresolved intents, but for spent ones ([`Intent::is_spent`]).
    live: usize,
    /// Of those, intents held by a live saga.
    held: usize,
    /// Every point they name.
    named: HashSet<PointId>,
}
