//! [`InMemoryMetadataRepo`]: the metadata store in process memory.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use tandem_core::{
    CommitSummary, DeleteCommit, DeleteSelector, IdempotencyRecord, Intent, IntentId, IntentState,
    MetadataError, MetadataRepo, NewIntent, OwnerToken, Page, PointId, RecordId, RowRef, RowWrite,
    Scope, Settlement, StoredRecord, UpsertCommit,
};

/// A [`MetadataRepo`] that keeps rows, intents and idempotency keys in memory.
///
/// One mutex guards the whole state, and every method checks everything before
/// it changes anything, so each call is atomic and isolated exactly like the
/// single transaction the port asks for. Nothing survives the process: share one
/// instance (through an `Arc`) to model a store that outlives a coordinator.
#[derive(Debug)]
pub struct InMemoryMetadataRepo {
    keep_vectors: bool,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Committed rows, ordered by record id (as `scan_refs` lists them).
    rows: BTreeMap<RecordId, StoredRecord>,
    /// Which row references each point (only current points).
    by_point: HashMap<PointId, RecordId>,
    intents: HashMap<IntentId, StoredIntent>,
    /// Tie-breaker for intents created in the same millisecond.
    next_seq: u64,
    idempotency: HashMap<String, IdempotencyRecord>,
}

#[derive(Debug)]
struct StoredIntent {
    intent: Intent,
    seq: u64,
}

impl Default for InMemoryMetadataRepo {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryMetadataRepo {
    /// An empty store that keeps each row's vector (so `repair` can rewrite lost points).
    pub fn new() -> Self {
        Self::with_vectors(true)
    }

    /// An empty store that does not keep vectors: [`StoredRecord::vector`] is always `None`.
    pub fn without_vectors() -> Self {
        Self::with_vectors(false)
    }

    /// An empty store that keeps vectors if `keep_vectors` is set.
    pub fn with_vectors(keep_vectors: bool) -> Self {
        Self {
            keep_vectors,
            state: Mutex::new(State::default()),
        }
    }

    /// Whether rows keep their vectors.
    pub fn keeps_vectors(&self) -> bool {
        self.keep_vectors
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every method validates before it mutates and nothing panics while
        // mutating, so a poisoned lock still guards a consistent state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// The intent, if `owner` owns it; otherwise the commit is fenced.
    fn owned_intent(&self, intent: IntentId, owner: OwnerToken) -> Result<&Intent, MetadataError> {
        match self.intents.get(&intent) {
            Some(stored) if stored.intent.owner == owner => Ok(&stored.intent),
            _ => Err(MetadataError::Fenced { intent }),
        }
    }

    fn check_key_free(&self, idempotency: Option<&IdempotencyRecord>) -> Result<(), MetadataError> {
        match idempotency {
            Some(record) if self.idempotency.contains_key(&record.key) => {
                Err(MetadataError::IdempotencyKeyTaken {
                    key: record.key.clone(),
                })
            }
            _ => Ok(()),
        }
    }

    fn record_key(&mut self, idempotency: Option<&IdempotencyRecord>, summary: CommitSummary) {
        if let Some(record) = idempotency {
            let mut record = record.clone();
            // The store records what this commit decided, whatever the caller passed.
            record.summary = summary;
            self.idempotency.insert(record.key.clone(), record);
        }
    }

    fn mark_committed(
        &mut self,
        intent: IntentId,
        point_ids: Vec<PointId>,
        summary: CommitSummary,
    ) {
        if let Some(stored) = self.intents.get_mut(&intent) {
            stored.intent.state = IntentState::Committed;
            stored.intent.point_ids = point_ids;
            stored.intent.summary = Some(summary);
        }
    }

    /// Unresolved intents in the given order.
    fn sorted_intents(&self, key: impl Fn(&StoredIntent) -> (i64, u64)) -> Vec<&StoredIntent> {
        let mut intents: Vec<&StoredIntent> = self.intents.values().collect();
        intents.sort_by_key(|s| key(s));
        intents
    }
}

/// Rejects what a relational schema's constraints would: a record twice in one
/// batch, a point twice in one batch, or a point some committed row already
/// references (copy-on-write points are always fresh).
fn validate_rows(state: &State, rows: &[RowWrite]) -> Result<(), MetadataError> {
    let mut ids = HashSet::with_capacity(rows.len());
    let mut points = HashSet::with_capacity(rows.len());
    for (index, row) in rows.iter().enumerate() {
        if !ids.insert(row.id) {
            return Err(invalid(format!(
                "row #{index}: record {} appears more than once in the batch",
                row.id
            )));
        }
        if !points.insert(row.point_id) {
            return Err(invalid(format!(
                "row #{index}: point {} appears more than once in the batch",
                row.point_id
            )));
        }
        if let Some(owner) = state.by_point.get(&row.point_id) {
            return Err(invalid(format!(
                "row #{index}: point {} is already referenced by record {owner}",
                row.point_id
            )));
        }
    }
    Ok(())
}

fn invalid(message: String) -> MetadataError {
    MetadataError::InvalidInput {
        message,
        source: None,
    }
}

#[async_trait]
impl MetadataRepo for InMemoryMetadataRepo {
    async fn prepare(&self, intent: &NewIntent) -> Result<(), MetadataError> {
        let mut state = self.lock();
        if state.intents.contains_key(&intent.id) {
            // A repeated prepare (a retry, a duplicated request) changes nothing,
            // even when the intent has moved on since.
            return Ok(());
        }
        let seq = state.next_seq;
        state.next_seq += 1;
        state.intents.insert(
            intent.id,
            StoredIntent {
                intent: Intent {
                    id: intent.id,
                    kind: intent.kind,
                    state: IntentState::Prepared,
                    owner: intent.owner,
                    lease_deadline_ms: intent.lease_deadline_ms,
                    point_ids: intent.point_ids.clone(),
                    summary: None,
                    attempts: 0,
                    last_error: None,
                    created_ms: intent.created_ms,
                },
                seq,
            },
        );
        Ok(())
    }

    async fn commit_upsert(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        rows: &[RowWrite],
        idempotency: Option<&IdempotencyRecord>,
    ) -> Result<UpsertCommit, MetadataError> {
        let mut state = self.lock();
        let current = state.owned_intent(intent, owner)?;
        if current.state == IntentState::Committed {
            // The commit already applied: answer what it decided.
            return Ok(UpsertCommit {
                summary: current.summary.unwrap_or_default(),
                old_point_ids: current.point_ids.clone(),
            });
        }
        state.check_key_free(idempotency)?;
        validate_rows(&state, rows)?;

        let mut summary = CommitSummary::default();
        let mut old_point_ids = Vec::new();
        for row in rows {
            let vector = self.keep_vectors.then(|| row.vector.clone());
            let previous = state.rows.get(&row.id).map(|r| (r.version, r.point_id));
            let version = match previous {
                Some((version, old_point)) => {
                    state.by_point.remove(&old_point);
                    old_point_ids.push(old_point);
                    summary.updated += 1;
                    version + 1
                }
                None => {
                    summary.inserted += 1;
                    1
                }
            };
            state.by_point.insert(row.point_id, row.id);
            state.rows.insert(
                row.id,
                StoredRecord {
                    id: row.id,
                    scope: row.scope.clone(),
                    content: row.content.clone(),
                    metadata: row.metadata.clone(),
                    point_id: row.point_id,
                    version,
                    vector,
                },
            );
        }
        state.mark_committed(intent, old_point_ids.clone(), summary);
        state.record_key(idempotency, summary);
        Ok(UpsertCommit {
            summary,
            old_point_ids,
        })
    }

    async fn commit_delete(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        selector: &DeleteSelector,
        idempotency: Option<&IdempotencyRecord>,
    ) -> Result<DeleteCommit, MetadataError> {
        let mut state = self.lock();
        let current = state.owned_intent(intent, owner)?;
        if current.state == IntentState::Committed {
            return Ok(DeleteCommit {
                summary: current.summary.unwrap_or_default(),
                point_ids: current.point_ids.clone(),
            });
        }
        state.check_key_free(idempotency)?;

        let selected: Vec<RecordId> = match selector {
            DeleteSelector::Ids(ids) => {
                let wanted: HashSet<&RecordId> = ids.iter().collect();
                // Walk the ordered map so the reported points come in record id order.
                state
                    .rows
                    .keys()
                    .filter(|id| wanted.contains(id))
                    .copied()
                    .collect()
            }
            _ => state
                .rows
                .values()
                .filter(|row| selector.matches(row))
                .map(|row| row.id)
                .collect(),
        };
        let mut point_ids = Vec::with_capacity(selected.len());
        for id in &selected {
            if let Some(row) = state.rows.remove(id) {
                state.by_point.remove(&row.point_id);
                point_ids.push(row.point_id);
            }
        }
        let summary = CommitSummary {
            deleted: point_ids.len() as u64,
            ..CommitSummary::default()
        };
        state.mark_committed(intent, point_ids.clone(), summary);
        state.record_key(idempotency, summary);
        Ok(DeleteCommit { summary, point_ids })
    }

    async fn settle(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        fence: OwnerToken,
    ) -> Result<Settlement, MetadataError> {
        let mut state = self.lock();
        let Some(stored) = state.intents.get_mut(&intent) else {
            return Ok(Settlement::Missing);
        };
        let current = &mut stored.intent;
        Ok(match current.state {
            IntentState::Committed => Settlement::Committed(current.clone()),
            IntentState::Prepared => {
                if current.owner == owner {
                    current.owner = fence;
                }
                Settlement::NotCommitted(current.clone())
            }
        })
    }

    async fn resolve(&self, intent: IntentId, owner: OwnerToken) -> Result<bool, MetadataError> {
        let mut state = self.lock();
        if state.owned_intent(intent, owner).is_err() {
            return Ok(false);
        }
        state.intents.remove(&intent);
        Ok(true)
    }

    async fn claim_expired(
        &self,
        now_ms: i64,
        owner: OwnerToken,
        lease_deadline_ms: i64,
        limit: usize,
    ) -> Result<Vec<Intent>, MetadataError> {
        let mut state = self.lock();
        let claimable: Vec<IntentId> = state
            .sorted_intents(|s| (s.intent.lease_deadline_ms, s.seq))
            .into_iter()
            .filter(|s| s.intent.lease_deadline_ms < now_ms)
            .take(limit)
            .map(|s| s.intent.id)
            .collect();
        let mut claimed = Vec::with_capacity(claimable.len());
        for id in claimable {
            if let Some(stored) = state.intents.get_mut(&id) {
                let intent = &mut stored.intent;
                intent.owner = owner;
                intent.lease_deadline_ms = lease_deadline_ms;
                intent.attempts = intent.attempts.saturating_add(1);
                claimed.push(intent.clone());
            }
        }
        Ok(claimed)
    }

    async fn record_failure(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        message: &str,
    ) -> Result<(), MetadataError> {
        let mut state = self.lock();
        if let Some(stored) = state.intents.get_mut(&intent)
            && stored.intent.owner == owner
        {
            stored.intent.last_error = Some(message.to_owned());
        }
        Ok(())
    }

    async fn referenced_points(
        &self,
        points: &[PointId],
    ) -> Result<HashSet<PointId>, MetadataError> {
        let state = self.lock();
        Ok(points
            .iter()
            .filter(|p| state.by_point.contains_key(p))
            .copied()
            .collect())
    }

    async fn rows_by_points(&self, points: &[PointId]) -> Result<Vec<StoredRecord>, MetadataError> {
        let state = self.lock();
        let mut seen = HashSet::new();
        Ok(points
            .iter()
            .filter_map(|p| state.by_point.get(p))
            .filter(|id| seen.insert(**id))
            .filter_map(|id| state.rows.get(id))
            .map(|row| StoredRecord {
                vector: None,
                ..row.clone()
            })
            .collect())
    }

    async fn get(&self, ids: &[RecordId]) -> Result<Vec<StoredRecord>, MetadataError> {
        let state = self.lock();
        let mut seen = HashSet::new();
        Ok(ids
            .iter()
            .filter(|id| seen.insert(**id))
            .filter_map(|id| state.rows.get(id).cloned())
            .collect())
    }

    async fn lookup_idempotency(
        &self,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, MetadataError> {
        Ok(self.lock().idempotency.get(key).cloned())
    }

    async fn scan_refs(
        &self,
        scope: Option<&Scope>,
        after: Option<RecordId>,
        limit: usize,
    ) -> Result<Page<RowRef, RecordId>, MetadataError> {
        if limit == 0 {
            // An empty page would either end the scan early or never advance it.
            return Err(invalid("scan_refs: limit must be at least 1".to_owned()));
        }
        let state = self.lock();
        let start = match after {
            Some(after) => std::ops::Bound::Excluded(after),
            None => std::ops::Bound::Unbounded,
        };
        let mut matching = state
            .rows
            .range((start, std::ops::Bound::Unbounded))
            .map(|(_, row)| row)
            .filter(|row| scope.is_none_or(|s| &row.scope == s));
        let items: Vec<RowRef> = matching
            .by_ref()
            .take(limit)
            .map(|row| RowRef {
                id: row.id,
                scope: row.scope.clone(),
                point_id: row.point_id,
                version: row.version,
            })
            .collect();
        let next = match (matching.next(), items.last()) {
            (Some(_), Some(last)) => Some(last.id),
            _ => None,
        };
        Ok(Page { items, next })
    }

    async fn list_intents(&self, limit: usize) -> Result<Vec<Intent>, MetadataError> {
        let state = self.lock();
        Ok(state
            .sorted_intents(|s| (s.intent.created_ms, s.seq))
            .into_iter()
            .take(limit)
            .map(|s| s.intent.clone())
            .collect())
    }

    async fn count_by_scope(&self) -> Result<BTreeMap<Scope, u64>, MetadataError> {
        let state = self.lock();
        let mut counts = BTreeMap::new();
        for row in state.rows.values() {
            *counts.entry(row.scope.clone()).or_insert(0) += 1;
        }
        Ok(counts)
    }
}
