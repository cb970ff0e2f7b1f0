//! The two ports every backend implements.
//!
//! Ports are small primitive operations; the protocol that composes them lives
//! only in the [`Coordinator`](crate::Coordinator). Adapters translate, they do not
//! decide: no retry loops, no compensation.
//!
//! Each method's doc ends with its **Contract**; every bullet has a case in the
//! conformance suite (`tandem_core::testkit::conformance`, feature `testkit`),
//! named after it.

use std::collections::{BTreeMap, HashSet};

use async_trait::async_trait;

use crate::error::{IndexError, MetadataError};
use crate::model::{
    DeleteCommit, DeleteSelector, Distance, Filter, IdempotencyRecord, Intent, IntentId, NewIntent,
    OwnerToken, Page, Point, PointId, PointInfo, RecordId, RowWrite, Scope, ScoredPoint,
    Settlement, StoredRecord, UpsertCommit,
};

/// Whether the index write that a gated commit must follow succeeded
/// ([`MetadataRepo::commit_upsert_gated`]).
///
/// Cheap to clone; every clone sees the same decision. Made with
/// [`IndexGate::pending`] (decided later through its [`GateOpener`]), or
/// already decided with [`IndexGate::passed`] / [`IndexGate::failed`].
#[derive(Clone, Debug)]
pub struct IndexGate {
    rx: tokio::sync::watch::Receiver<Option<bool>>,
}

/// Decides an [`IndexGate`]. Dropping it undecided fails the gate.
#[derive(Debug)]
pub struct GateOpener {
    tx: tokio::sync::watch::Sender<Option<bool>>,
}

impl IndexGate {
    /// An undecided gate and the opener that decides it.
    pub fn pending() -> (GateOpener, IndexGate) {
        let (tx, rx) = tokio::sync::watch::channel(None);
        (GateOpener { tx }, IndexGate { rx })
    }

    /// A gate whose index write already succeeded.
    pub fn passed() -> Self {
        let (opener, gate) = Self::pending();
        opener.decide(true);
        gate
    }

    /// A gate whose index write already failed.
    pub fn failed() -> Self {
        let (opener, gate) = Self::pending();
        opener.decide(false);
        gate
    }

    /// Waits for the decision: `true` once the index write succeeded, `false`
    /// if it failed (or its opener was dropped undecided).
    pub async fn wait(&self) -> bool {
        let mut rx = self.rx.clone();
        let decided = match rx.wait_for(Option::is_some).await {
            Ok(decided) => *decided,
            // The opener is gone without deciding (its drop decides `false`).
            Err(_) => None,
        };
        decided.unwrap_or(false)
    }
}

impl GateOpener {
    /// Decides the gate: `true` if the index write succeeded.
    pub fn decide(self, index_written: bool) {
        // No receiver left is fine: nobody waits any more.
        let _ = self.tx.send(Some(index_written));
    }
}

impl Drop for GateOpener {
    fn drop(&mut self) {
        // Undecided at drop (the writer's future was dropped): fail the gate.
        self.tx.send_if_modified(|v| {
            if v.is_none() {
                *v = Some(false);
                true
            } else {
                false
            }
        });
    }
}

/// A committed row's reference to its point, as listed by
/// [`MetadataRepo::scan_refs`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RowRef {
    /// The record id.
    pub id: RecordId,
    /// Its scope.
    pub scope: Scope,
    /// The point it references.
    pub point_id: PointId,
    /// Its version.
    pub version: u64,
}

/// The relational side: the source of truth. Each method is one transaction.
///
/// Times are passed in by the caller (milliseconds since the Unix epoch) so that
/// leases follow the coordinator's clock, which tests control.
#[async_trait]
pub trait MetadataRepo: Send + Sync {
    /// Prepare: durably records a new intent in state `Prepared`, before any of
    /// its points is written to the index.
    ///
    /// Contract:
    /// - `prepare_then_read`: afterwards the intent is listed by
    ///   [`list_intents`](Self::list_intents) with the given owner, lease,
    ///   kind and point ids, state `Prepared`, attempts 0.
    /// - `prepare_is_idempotent`: preparing the same intent again succeeds and
    ///   changes nothing.
    async fn prepare(&self, intent: &NewIntent) -> Result<(), MetadataError>;

    /// Commit of an upsert: in one transaction, fenced by `owner`, writes `rows`
    /// (insert or switch to the new point id, bumping the version), swaps the
    /// intent's point list for the points the switched rows referenced before,
    /// marks it `Committed` with the summary, and records the idempotency key.
    ///
    /// Contract:
    /// - `commit_upsert_inserts_and_updates`: new ids are inserted with
    ///   version 1; existing ids get the new point, content, metadata and scope,
    ///   and version + 1; the summary counts both; `old_point_ids` are exactly the
    ///   previous points of the updated rows.
    /// - `commit_upsert_swaps_intent`: afterwards the intent is `Committed` and
    ///   lists exactly `old_point_ids`.
    /// - `commit_upsert_fenced_by_owner`: with a token that does not own the
    ///   intent (or a missing intent) it fails with [`MetadataError::Fenced`] and
    ///   writes nothing.
    /// - `commit_upsert_is_idempotent`: repeating a commit that already applied
    ///   (same intent and owner) returns the recorded result and changes nothing.
    /// - `commit_upsert_records_idempotency_key`: the key is readable through
    ///   [`lookup_idempotency`](Self::lookup_idempotency) afterwards, with its
    ///   hash and outcome as given and the summary of this commit; a key
    ///   already recorded fails with [`MetadataError::IdempotencyKeyTaken`] and
    ///   writes nothing.
    /// - `commit_upsert_keeps_vectors_when_configured`: a store that keeps
    ///   vectors returns them in [`get`](Self::get).
    async fn commit_upsert(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        rows: &[RowWrite],
        idempotency: Option<&IdempotencyRecord>,
    ) -> Result<UpsertCommit, MetadataError>;

    /// [`commit_upsert`](Self::commit_upsert), started while the index write it
    /// must follow is still in flight: the commit becomes durable and visible
    /// only after `gate` says that write succeeded.
    ///
    /// The coordinator calls this instead of `commit_upsert` when
    /// [`overlap_index_write`](crate::CoordinatorConfig::overlap_index_write)
    /// is on. A store whose transactions can stay open overrides it to run the
    /// commit's statements (locks, inserts, updates, the intent's mark) while
    /// the index write is in flight and to send `COMMIT` only once the gate
    /// passed — so the write costs the longer of the two, not their sum. The
    /// default waits for the gate, then calls `commit_upsert`: correct for
    /// every store, without the overlap. Wrappers must forward it.
    ///
    /// Contract:
    /// - `commit_upsert_gated_passed`: once the gate passed, the result and the
    ///   effects are exactly those of `commit_upsert`.
    /// - `commit_upsert_gated_failed`: if the gate fails, it returns
    ///   [`MetadataError::Aborted`] and writes nothing (the intent stays
    ///   `Prepared`, owned by `owner`).
    /// - `commit_upsert_gated_waits`: until the gate is decided, nothing of the
    ///   commit is visible to other calls (rows, intent state), and the call
    ///   does not return.
    async fn commit_upsert_gated(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        rows: &[RowWrite],
        idempotency: Option<&IdempotencyRecord>,
        gate: &IndexGate,
    ) -> Result<UpsertCommit, MetadataError> {
        if !gate.wait().await {
            return Err(MetadataError::Aborted { intent });
        }
        self.commit_upsert(intent, owner, rows, idempotency).await
    }

    /// Commit of a delete: in one transaction, fenced by `owner`, deletes the
    /// selected rows, sets the intent's point list to their points, marks it
    /// `Committed` with the summary, and records the idempotency key.
    ///
    /// Contract:
    /// - `commit_delete_by_ids`, `commit_delete_by_scope`,
    ///   `commit_delete_by_metadata`: exactly the selected rows are deleted
    ///   (missing ids are ignored); `point_ids` are their points.
    /// - `commit_delete_fenced_by_owner`: as for upserts.
    /// - `commit_delete_is_idempotent`: as for upserts.
    async fn commit_delete(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        selector: &DeleteSelector,
        idempotency: Option<&IdempotencyRecord>,
    ) -> Result<DeleteCommit, MetadataError>;

    /// Settles a commit whose reply was lost. Locks the intent (waiting for any
    /// transaction still holding it, so a commit still landing is seen), and
    /// reports whether the commit happened; if it did not and `owner` still owns
    /// the intent, transfers it to `fence` so the lost commit can never apply.
    ///
    /// Contract:
    /// - `settle_committed`: a committed intent is reported `Committed`, unchanged.
    /// - `settle_fences_prepared`: a prepared intent owned by `owner` is
    ///   reported `NotCommitted` and is owned by `fence` afterwards, so a commit
    ///   with `owner` fails with `Fenced`.
    /// - `settle_missing`: a missing intent is reported `Missing`.
    async fn settle(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        fence: OwnerToken,
    ) -> Result<Settlement, MetadataError>;

    /// Resolves (deletes) an intent owned by `owner`.
    ///
    /// Contract:
    /// - `resolve_removes_intent`: returns `true` and the intent is gone.
    /// - `resolve_is_idempotent`: a missing intent, or one owned by another
    ///   token, returns `false` and changes nothing.
    async fn resolve(&self, intent: IntentId, owner: OwnerToken) -> Result<bool, MetadataError>;

    /// Recovery's claim: atomically takes over up to `limit` intents whose lease
    /// ended before `now_ms`, giving them to `owner` until `lease_deadline_ms` and
    /// counting an attempt. Oldest lease first.
    ///
    /// Contract:
    /// - `claim_takes_only_expired`: intents whose lease has not ended are not
    ///   claimed.
    /// - `claim_transfers_ownership`: claimed intents are returned with the new
    ///   owner, lease and attempts + 1; the old owner's commit is fenced.
    /// - `claim_is_exclusive`: concurrent claims never return the same intent.
    /// - `claim_respects_limit`: at most `limit` are returned.
    async fn claim_expired(
        &self,
        now_ms: i64,
        owner: OwnerToken,
        lease_deadline_ms: i64,
        limit: usize,
    ) -> Result<Vec<Intent>, MetadataError>;

    /// Records why handling an intent failed (kept for operators).
    ///
    /// Contract:
    /// - `record_failure_sets_last_error`: the owner's message becomes the
    ///   intent's `last_error`; another owner's call changes nothing.
    async fn record_failure(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        message: &str,
    ) -> Result<(), MetadataError>;

    /// Which of `points` a committed row references now.
    ///
    /// Contract:
    /// - `referenced_points_subset`: returns exactly the given points that some
    ///   row references; unknown points are simply absent.
    async fn referenced_points(
        &self,
        points: &[PointId],
    ) -> Result<HashSet<PointId>, MetadataError>;

    /// The committed rows that currently reference one of `points` (the read guard).
    ///
    /// Contract:
    /// - `rows_by_points_current_only`: a row is returned only for its current
    ///   point; superseded and unknown points return nothing.
    /// - `rows_by_points_without_vectors`: rows come without their vectors
    ///   (`vector: None`) even in a store that keeps them — a search needs the
    ///   row, not its embedding, and [`get`](Self::get) returns it.
    async fn rows_by_points(&self, points: &[PointId]) -> Result<Vec<StoredRecord>, MetadataError>;

    /// The committed rows with these ids.
    ///
    /// Contract:
    /// - `get_returns_existing`: existing ids are returned, missing ones omitted.
    async fn get(&self, ids: &[RecordId]) -> Result<Vec<StoredRecord>, MetadataError>;

    /// The recorded outcome of an idempotency key.
    ///
    /// Contract:
    /// - `lookup_idempotency_unknown_key`: an unknown key returns `None`
    ///   (recorded keys: see `commit_upsert_records_idempotency_key`).
    async fn lookup_idempotency(
        &self,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, MetadataError>;

    /// Lists committed rows' point references, optionally of one scope, in pages
    /// ordered by record id. `after` is the last id of the previous page.
    ///
    /// Contract:
    /// - `scan_refs_pages_cover_all`: the pages together list every row of the
    ///   scope exactly once, in record id order.
    async fn scan_refs(
        &self,
        scope: Option<&Scope>,
        after: Option<RecordId>,
        limit: usize,
    ) -> Result<Page<RowRef, RecordId>, MetadataError>;

    /// Lists unresolved intents, oldest first, up to `limit`.
    ///
    /// Contract: see `prepare_then_read`; resolved intents are not listed.
    async fn list_intents(&self, limit: usize) -> Result<Vec<Intent>, MetadataError>;

    /// Number of committed rows per scope.
    ///
    /// Contract:
    /// - `count_by_scope_counts_rows`: counts every scope with at least one row.
    async fn count_by_scope(&self) -> Result<BTreeMap<Scope, u64>, MetadataError>;
}

/// A similarity query against the index.
#[derive(Clone, Debug, PartialEq)]
pub struct IndexQuery {
    /// The query vector.
    pub vector: Vec<f32>,
    /// At most this many hits.
    pub limit: usize,
    /// Scope and metadata conditions.
    pub filter: Filter,
    /// Only hits scoring at least this (for euclid: at least this negated distance).
    pub score_threshold: Option<f32>,
}

/// The vector side: a derived index of the committed rows.
#[async_trait]
pub trait VectorIndex: Send + Sync {
    /// The collection's vector dimension.
    fn dimension(&self) -> usize;

    /// The collection's distance function.
    fn distance(&self) -> Distance;

    /// Writes points (insert or overwrite by id). When it returns `Ok`, every
    /// point is durable and visible to [`retrieve`](Self::retrieve) and
    /// [`search`](Self::search). On error, any subset may have been applied
    /// (batches are not atomic).
    ///
    /// Contract:
    /// - `upsert_then_retrieve`: written points are retrievable with their record
    ///   id, scope and write time.
    /// - `upsert_is_idempotent`: writing the same points twice leaves one copy
    ///   of each (count unchanged).
    /// - `upsert_rejects_wrong_dimension`: a vector of another dimension fails
    ///   with [`IndexError::InvalidInput`].
    async fn upsert(&self, points: &[Point]) -> Result<(), IndexError>;

    /// Deletes points by id. When it returns `Ok` they are gone for good.
    ///
    /// Contract:
    /// - `delete_removes_points`: deleted points are no longer retrieved,
    ///   counted, scrolled or found by search; others are untouched.
    /// - `delete_is_idempotent`: deleting missing ids succeeds.
    async fn delete(&self, ids: &[PointId]) -> Result<(), IndexError>;

    /// The points among `ids` that exist.
    ///
    /// Contract: see `upsert_then_retrieve` and `delete_removes_points`; unknown
    /// ids are simply absent.
    async fn retrieve(&self, ids: &[PointId]) -> Result<Vec<PointInfo>, IndexError>;

    /// Nearest points to the query, best first, honouring the filter and threshold.
    ///
    /// Contract:
    /// - `search_orders_by_score`: hits come best first; the nearest point is first.
    /// - `search_filters_scope_and_metadata`: only points matching the filter.
    /// - `search_respects_limit_and_threshold`: at most `limit`, none below the
    ///   threshold.
    async fn search(&self, query: &IndexQuery) -> Result<Vec<ScoredPoint>, IndexError>;

    /// Number of points, optionally of one scope.
    ///
    /// Contract:
    /// - `count_by_scope`: counts exactly the points of the scope (or all).
    async fn count(&self, scope: Option<&Scope>) -> Result<u64, IndexError>;

    /// Lists points, optionally of one scope, in pages. `offset` is the `next`
    /// of the previous page (opaque; the order is the backend's own).
    ///
    /// Contract:
    /// - `scroll_pages_cover_all`: the pages together list every point of the
    ///   scope exactly once.
    async fn scroll(
        &self,
        scope: Option<&Scope>,
        offset: Option<PointId>,
        limit: usize,
    ) -> Result<Page<PointInfo, PointId>, IndexError>;
}

macro_rules! forward_metadata_repo {
    ($($ptr:tt)*) => {
        #[async_trait]
        impl<T: MetadataRepo + ?Sized> MetadataRepo for $($ptr)*<T> {
            async fn prepare(&self, intent: &NewIntent) -> Result<(), MetadataError> {
                (**self).prepare(intent).await
            }
            async fn commit_upsert(
                &self,
                intent: IntentId,
                owner: OwnerToken,
                rows: &[RowWrite],
                idempotency: Option<&IdempotencyRecord>,
            ) -> Result<UpsertCommit, MetadataError> {
                (**self).commit_upsert(intent, owner, rows, idempotency).await
            }
            async fn commit_upsert_gated(
                &self,
                intent: IntentId,
                owner: OwnerToken,
                rows: &[RowWrite],
                idempotency: Option<&IdempotencyRecord>,
                gate: &IndexGate,
            ) -> Result<UpsertCommit, MetadataError> {
                (**self)
                    .commit_upsert_gated(intent, owner, rows, idempotency, gate)
                    .await
            }
            async fn commit_delete(
                &self,
                intent: IntentId,
                owner: OwnerToken,
                selector: &DeleteSelector,
                idempotency: Option<&IdempotencyRecord>,
            ) -> Result<DeleteCommit, MetadataError> {
                (**self).commit_delete(intent, owner, selector, idempotency).await
            }
            async fn settle(
                &self,
                intent: IntentId,
                owner: OwnerToken,
                fence: OwnerToken,
            ) -> Result<Settlement, MetadataError> {
                (**self).settle(intent, owner, fence).await
            }
            async fn resolve(&self, intent: IntentId, owner: OwnerToken) -> Result<bool, MetadataError> {
                (**self).resolve(intent, owner).await
            }
            async fn claim_expired(
                &self,
                now_ms: i64,
                owner: OwnerToken,
                lease_deadline_ms: i64,
                limit: usize,
            ) -> Result<Vec<Intent>, MetadataError> {
                (**self).claim_expired(now_ms, owner, lease_deadline_ms, limit).await
            }
            async fn record_failure(
                &self,
                intent: IntentId,
                owner: OwnerToken,
                message: &str,
            ) -> Result<(), MetadataError> {
                (**self).record_failure(intent, owner, message).await
            }
            async fn referenced_points(
                &self,
                points: &[PointId],
            ) -> Result<HashSet<PointId>, MetadataError> {
                (**self).referenced_points(points).await
            }
            async fn rows_by_points(
                &self,
                points: &[PointId],
            ) -> Result<Vec<StoredRecord>, MetadataError> {
                (**self).rows_by_points(points).await
            }
            async fn get(&self, ids: &[RecordId]) -> Result<Vec<StoredRecord>, MetadataError> {
                (**self).get(ids).await
            }
            async fn lookup_idempotency(
                &self,
                key: &str,
            ) -> Result<Option<IdempotencyRecord>, MetadataError> {
                (**self).lookup_idempotency(key).await
            }
            async fn scan_refs(
                &self,
                scope: Option<&Scope>,
                after: Option<RecordId>,
                limit: usize,
            ) -> Result<Page<RowRef, RecordId>, MetadataError> {
                (**self).scan_refs(scope, after, limit).await
            }
            async fn list_intents(&self, limit: usize) -> Result<Vec<Intent>, MetadataError> {
                (**self).list_intents(limit).await
            }
            async fn count_by_scope(&self) -> Result<BTreeMap<Scope, u64>, MetadataError> {
                (**self).count_by_scope().await
            }
        }
    };
}

macro_rules! forward_vector_index {
    ($($ptr:tt)*) => {
        #[async_trait]
        impl<T: VectorIndex + ?Sized> VectorIndex for $($ptr)*<T> {
            fn dimension(&self) -> usize {
                (**self).dimension()
            }
            fn distance(&self) -> Distance {
                (**self).distance()
            }
            async fn upsert(&self, points: &[Point]) -> Result<(), IndexError> {
                (**self).upsert(points).await
            }
            async fn delete(&self, ids: &[PointId]) -> Result<(), IndexError> {
                (**self).delete(ids).await
            }
            async fn retrieve(&self, ids: &[PointId]) -> Result<Vec<PointInfo>, IndexError> {
                (**self).retrieve(ids).await
            }
            async fn search(&self, query: &IndexQuery) -> Result<Vec<ScoredPoint>, IndexError> {
                (**self).search(query).await
            }
            async fn count(&self, scope: Option<&Scope>) -> Result<u64, IndexError> {
                (**self).count(scope).await
            }
            async fn scroll(
                &self,
                scope: Option<&Scope>,
                offset: Option<PointId>,
                limit: usize,
            ) -> Result<Page<PointInfo, PointId>, IndexError> {
                (**self).scroll(scope, offset, limit).await
            }
        }
    };
}

forward_metadata_repo!(std::sync::Arc);
forward_metadata_repo!(Box);
forward_vector_index!(std::sync::Arc);
forward_vector_index!(Box);
