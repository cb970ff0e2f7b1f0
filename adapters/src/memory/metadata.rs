//! [`InMemoryMetadataRepo`]: the metadata store in process memory.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use serde_json::Value;
use tandem_core::{
    ChangedRow, CommitPart, CommitSummary, ConnectionType, DeleteCommit, DeleteSelector,
    IdempotencyRecord, IndexFailure, IndexGate, IndexSwitch, Intent, IntentId, IntentState,
    MetadataError, MetadataRepo, NewIntent, OwnerToken, Page, PendingFilter, PendingIndex,
    PendingStats, PointId, RecordId, RowRef, RowWrite, SagaCounts, SagaFence, SagaId, SagaRecord,
    SagaState, Scope, Settlement, StoredRecord, StoredRecordImage, TransactionCommit,
    TransactionCommitResult, UndoImage, UpsertCommit,
};
use tandem_core::{
    IndexState, Migration, MigrationSpec, StagedVector, SwitchCounts, SwitchOutcome,
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
    /// Serialises transactions with a caller step (which may await).
    steps: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct State {
    /// Committed rows, ordered by record id (as `scan_refs` lists them).
    rows: BTreeMap<RecordId, StoredRecord>,
    /// Which row references each point (only current points).
    by_point: HashMap<PointId, RecordId>,
    /// Pending-index entries of deferred writes, one per record at most.
    pending: BTreeMap<RecordId, PendingIndex>,
    intents: HashMap<IntentId, StoredIntent>,
    /// Tie-breaker for intents (and sagas) created in the same millisecond.
    next_seq: u64,
    idempotency: HashMap<String, IdempotencyRecord>,
    /// Undo images of held intents.
    undo: HashMap<IntentId, Vec<UndoImage>>,
    /// Saga journal entries, with their creation sequence.
    sagas: HashMap<SagaId, (SagaRecord, u64)>,
    /// The caller's own tables ([`InMemoryTables`]).
    tables: InMemoryTables,
    /// Records switched into the index per second (the indexing rate), the
    /// last two minutes of switches kept.
    indexed_per_s: BTreeMap<i64, u64>,
    /// The active collection and any open migration.
    index_state: IndexState,
    /// The last change sequence given out.
    change_seq: u64,
    /// Each row's change sequence and the point it had then.
    seq_of: HashMap<RecordId, (u64, PointId)>,
    /// Rows by change sequence.
    by_seq: BTreeMap<u64, RecordId>,
    /// Points unreferenced while a migration is open, not yet reported done.
    migration_garbage: BTreeSet<PointId>,
    /// Re-embedded vectors staged by the open migration, with the change
    /// sequence each was staged for (applied at its switch).
    staged_vectors: HashMap<RecordId, (u64, Vec<f32>)>,
}

/// The memory store's equivalent of a caller's own SQL tables: named tables
/// of JSON values by key, written by a transaction's caller step
/// ([`SqlStep`](tandem_core::SqlStep) over `InMemoryTables`) and committed
/// if and only if the transaction's records are.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InMemoryTables {
    tables: BTreeMap<String, BTreeMap<String, Value>>,
}

impl InMemoryTables {
    /// Sets `table[key] = value`.
    pub fn insert(&mut self, table: &str, key: impl Into<String>, value: Value) {
        self.tables
            .entry(table.to_owned())
            .or_default()
            .insert(key.into(), value);
    }

    /// `table[key]`, if set.
    pub fn get(&self, table: &str, key: &str) -> Option<&Value> {
        self.tables.get(table).and_then(|t| t.get(key))
    }

    /// Removes `table[key]`, returning it.
    pub fn remove(&mut self, table: &str, key: &str) -> Option<Value> {
        self.tables.get_mut(table).and_then(|t| t.remove(key))
    }

    /// A whole table (empty if never written).
    pub fn table(&self, table: &str) -> BTreeMap<String, Value> {
        self.tables.get(table).cloned().unwrap_or_default()
    }
}

/// The rows as a commit changes them, part by part, in place: the first
/// change of each record saves its previous row, so that a commit whose
/// later part fails can be undone ([`Scratch::rollback`]) and a held commit
/// knows every record's row before it.
struct Scratch<'s> {
    rows: &'s mut BTreeMap<RecordId, StoredRecord>,
    by_point: &'s mut HashMap<PointId, RecordId>,
    pending: &'s mut BTreeMap<RecordId, PendingIndex>,
    keep_vectors: bool,
    summary: CommitSummary,
    /// Points that stopped being referenced, in the order they did.
    garbage: Vec<PointId>,
    /// Every record a part touched, with its row and pending entry before
    /// the commit, in the order it was first touched.
    saved: Vec<(RecordId, Option<StoredRecord>, Option<PendingIndex>)>,
    conflicts: Vec<RecordId>,
    /// The version each deferred row got.
    versions: Vec<(RecordId, u64)>,
    /// Records an `Index` part switched, with its time.
    indexed: Vec<(i64, u64)>,
}

impl<'s> Scratch<'s> {
    fn new(state: &'s mut State, keep_vectors: bool) -> Self {
        Self {
            rows: &mut state.rows,
            by_point: &mut state.by_point,
            pending: &mut state.pending,
            keep_vectors,
            summary: CommitSummary::default(),
            garbage: Vec::new(),
            saved: Vec::new(),
            conflicts: Vec::new(),
            versions: Vec::new(),
            indexed: Vec::new(),
        }
    }

    fn touch(&mut self, id: RecordId) {
        if !self.saved.iter().any(|(s, _, _)| *s == id) {
            self.saved.push((
                id,
                self.rows.get(&id).cloned(),
                self.pending.get(&id).cloned(),
            ));
        }
    }

    /// Every record a part touched.
    fn touched(&self) -> Vec<RecordId> {
        self.saved.iter().map(|(id, _, _)| *id).collect()
    }

    fn unreference(&mut self, point: PointId) {
        self.by_point.remove(&point);
        self.garbage.push(point);
    }

    /// Puts every touched row back as it was.
    fn rollback(self) {
        for (id, before, pending) in self.saved.into_iter().rev() {
            if let Some(now) = self.rows.remove(&id) {
                self.by_point.remove(&now.point_id);
            }
            if let Some(before) = before {
                self.by_point.insert(before.point_id, id);
                self.rows.insert(id, before);
            }
            match pending {
                Some(entry) => self.pending.insert(id, entry),
                None => self.pending.remove(&id),
            };
        }
    }

    /// The undo image of every touched record.
    fn undo_images(&self) -> Vec<UndoImage> {
        let mut images: Vec<UndoImage> = self
            .saved
            .iter()
            .map(|(id, before, pending)| UndoImage {
                id: *id,
                before: before.as_ref().map(|row| StoredRecordImage {
                    // The row's entry, waiting or dead-lettered, goes with
                    // its image: without it, a restored never-indexed row
                    // would reference a point that no worker writes.
                    pending: pending.clone().filter(|p| p.version == row.version),
                    ..StoredRecordImage::of(row)
                }),
                after_version: self.rows.get(id).map(|r| r.version),
            })
            .collect();
        images.sort_by_key(|i| i.id);
        images
    }

    fn upsert(&mut self, rows: &[RowWrite]) -> Result<(), MetadataError> {
        validate_rows(self.by_point, rows)?;
        for row in rows {
            self.touch(row.id);
            // A synchronous write supersedes a deferred one still waiting.
            self.pending.remove(&row.id);
            let vector = self.keep_vectors.then(|| row.vector.clone());
            let previous = self.rows.get(&row.id).map(|r| (r.version, r.point_id));
            let version = match previous {
                Some((version, old_point)) => {
                    self.unreference(old_point);
                    self.summary.updated += 1;
                    version + 1
                }
                None => {
                    self.summary.inserted += 1;
                    1
                }
            };
            self.by_point.insert(row.point_id, row.id);
            self.rows.insert(
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
        Ok(())
    }

    fn delete(&mut self, selector: &DeleteSelector) {
        let selected: Vec<RecordId> = match selector {
            DeleteSelector::Ids(ids) => {
                let wanted: HashSet<&RecordId> = ids.iter().collect();
                // Walk the ordered map so the reported points come in record id order.
                self.rows
                    .keys()
                    .filter(|id| wanted.contains(id))
                    .copied()
                    .collect()
            }
            _ => self
                .rows
                .values()
                .filter(|row| selector.matches(row))
                .map(|row| row.id)
                .collect(),
        };
        for id in selected {
            self.touch(id);
            self.pending.remove(&id);
            if let Some(row) = self.rows.remove(&id) {
                self.unreference(row.point_id);
                self.summary.deleted += 1;
            }
        }
    }

    fn restore(&mut self, images: &[UndoImage]) -> Result<(), MetadataError> {
        let mut images: Vec<&UndoImage> = images.iter().collect();
        images.sort_by_key(|i| i.id);
        for image in images {
            let current = self.rows.get(&image.id).map(|r| (r.version, r.point_id));
            if current.map(|(v, _)| v) != image.after_version {
                self.conflicts.push(image.id);
                continue;
            }
            self.touch(image.id);
            self.pending.remove(&image.id);
            match (&image.before, current) {
                (None, None) => {}
                (None, Some((_, point))) => {
                    self.rows.remove(&image.id);
                    self.unreference(point);
                    self.summary.deleted += 1;
                }
                (Some(before), current) => {
                    if let Some(owner) = self.by_point.get(&before.point_id)
                        && *owner != image.id
                    {
                        return Err(invalid(format!(
                            "restore of record {}: point {} is referenced by record {owner}",
                            image.id, before.point_id
                        )));
                    }
                    let version = match current {
                        Some((v, point)) => {
                            self.unreference(point);
                            self.summary.updated += 1;
                            v + 1
                        }
                        None => {
                            self.summary.inserted += 1;
                            before.version + 1
                        }
                    };
                    let mut row = before.to_record(image.id);
                    row.version = version;
                    if !self.keep_vectors {
                        row.vector = None;
                    }
                    if let Some(entry) = &before.pending {
                        // The row had an entry: it gets it back as it was (waiting, or
                        // dead-lettered with its attempts), at the new version.
                        self.pending.insert(
                            image.id,
                            PendingIndex {
                                version,
                                claimed_by: None,
                                claim_until_ms: None,
                                ..entry.clone()
                            },
                        );
                    }
                    self.by_point.insert(row.point_id, image.id);
                    self.rows.insert(image.id, row);
                }
            }
        }
        Ok(())
    }

    fn defer(&mut self, rows: &[RowWrite], now_ms: i64) -> Result<(), MetadataError> {
        // New rows reserve their point id: it must be as fresh as a written
        // one. An existing row keeps its point and ignores the one given.
        let new_rows: Vec<RowWrite> = rows
            .iter()
            .filter(|r| !self.rows.contains_key(&r.id))
            .cloned()
            .collect();
        validate_rows(self.by_point, &new_rows)?;
        let mut ids = HashSet::with_capacity(rows.len());
        for (index, row) in rows.iter().enumerate() {
            if !ids.insert(row.id) {
                return Err(invalid(format!(
                    "row #{index}: record {} appears more than once in the batch",
                    row.id
                )));
            }
        }
        for row in rows {
            self.touch(row.id);
            let vector = self.keep_vectors.then(|| row.vector.clone());
            let (version, point_id, previous) = match self.rows.get(&row.id) {
                Some(current) => {
                    self.summary.updated += 1;
                    (current.version + 1, current.point_id, current.version)
                }
                None => {
                    self.summary.inserted += 1;
                    self.by_point.insert(row.point_id, row.id);
                    (1, row.point_id, 0)
                }
            };
            let waiting = self.pending.get(&row.id).filter(|e| e.version == previous);
            let (enqueued_ms, indexed_version) = match waiting {
                Some(e) => (e.enqueued_ms, e.indexed_version),
                None => (now_ms, previous),
            };
            self.pending.insert(
                row.id,
                PendingIndex {
                    record_id: row.id,
                    version,
                    indexed_version,
                    scope: row.scope.clone(),
                    metadata: row.metadata.clone(),
                    vector: row.vector.clone(),
                    enqueued_ms,
                    attempts: 0,
                    last_error: None,
                    dead: false,
                    claimed_by: None,
                    claim_until_ms: None,
                },
            );
            self.rows.insert(
                row.id,
                StoredRecord {
                    id: row.id,
                    scope: row.scope.clone(),
                    content: row.content.clone(),
                    metadata: row.metadata.clone(),
                    point_id,
                    version,
                    vector,
                },
            );
            self.versions.push((row.id, version));
        }
        Ok(())
    }

    fn index(
        &mut self,
        claim: OwnerToken,
        switches: &[IndexSwitch],
        now_ms: i64,
    ) -> Result<(), MetadataError> {
        let mut points = HashSet::with_capacity(switches.len());
        for (index, s) in switches.iter().enumerate() {
            if !points.insert(s.point_id) || self.by_point.contains_key(&s.point_id) {
                return Err(invalid(format!(
                    "switch #{index}: point {} is not fresh",
                    s.point_id
                )));
            }
        }
        let mut switched = 0;
        for s in switches {
            let current = self.rows.get(&s.record_id).map(|r| (r.version, r.point_id));
            let entry = self
                .pending
                .get(&s.record_id)
                .filter(|e| e.version == s.version && !e.dead && e.claimed_by == Some(claim));
            let written_before = entry.is_some_and(|e| e.indexed_version > 0);
            match current {
                Some((version, old)) if version == s.version && entry.is_some() => {
                    self.touch(s.record_id);
                    if written_before {
                        self.unreference(old);
                    } else {
                        // The reserved point, never written: nothing to delete.
                        self.by_point.remove(&old);
                    }
                    self.by_point.insert(s.point_id, s.record_id);
                    if let Some(row) = self.rows.get_mut(&s.record_id) {
                        row.point_id = s.point_id;
                    }
                    self.pending.remove(&s.record_id);
                    switched += 1;
                }
                // Superseded, deleted, or taken over: the new point is garbage.
                _ => self.garbage.push(s.point_id),
            }
        }
        if switched > 0 {
            self.indexed.push((now_ms, switched));
        }
        Ok(())
    }
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
            steps: tokio::sync::Mutex::new(()),
        }
    }

    /// Whether rows keep their vectors.
    pub fn keeps_vectors(&self) -> bool {
        self.keep_vectors
    }

    /// A copy of the caller's tables that transactions' steps wrote.
    pub fn tables(&self) -> InMemoryTables {
        self.lock().tables.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every method validates before it mutates and nothing panics while
        // mutating, so a poisoned lock still guards a consistent state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// After a commit: raises the change sequence of each touched row whose
    /// point changed (or that is new), forgets deleted rows, and records the
    /// unreferenced points while a migration is open.
    fn note_changes(&mut self, touched: &[RecordId], garbage: &[PointId]) {
        for id in touched {
            let now = self.rows.get(id).map(|r| r.point_id);
            let before = self.seq_of.get(id).copied();
            if now == before.map(|(_, p)| p) {
                continue;
            }
            if let Some((seq, _)) = before {
                self.by_seq.remove(&seq);
                self.seq_of.remove(id);
            }
            if let Some(point) = now {
                self.change_seq += 1;
                self.seq_of.insert(*id, (self.change_seq, point));
                self.by_seq.insert(self.change_seq, *id);
            }
        }
        if self.index_state.migration.is_some() {
            self.migration_garbage.extend(
                garbage
                    .iter()
                    .filter(|p| !self.by_point.contains_key(p))
                    .copied(),
            );
        }
    }

    /// At a switch: each staged vector becomes its row's kept vector if the
    /// row is still at the change sequence it was staged for.
    fn apply_staged_vectors(&mut self) {
        for (id, (seq, vector)) in std::mem::take(&mut self.staged_vectors) {
            if self.seq_of.get(&id).map(|(s, _)| *s) != Some(seq) {
                continue;
            }
            if let Some(row) = self.rows.get_mut(&id)
                && row.vector.is_some()
            {
                row.vector = Some(vector);
            }
        }
    }

    /// Fences every prepared intent: a new owner, the lease ended.
    fn fence_prepared(&mut self, now_ms: i64) -> u64 {
        let mut fenced = 0;
        for stored in self.intents.values_mut() {
            if stored.intent.state == IntentState::Prepared {
                stored.intent.owner = OwnerToken::new_random();
                stored.intent.lease_deadline_ms = stored.intent.lease_deadline_ms.min(now_ms);
                fenced += 1;
            }
        }
        fenced
    }

    /// Adds `n` switched records to the second of `at_ms`; forgets seconds
    /// more than two rate windows older.
    fn count_indexed(&mut self, at_ms: i64, n: u64) {
        let bucket = PendingStats::rate_bucket(at_ms);
        *self.indexed_per_s.entry(bucket).or_default() += n;
        let keep_from = bucket - 2 * PendingStats::RATE_WINDOW_S;
        self.indexed_per_s = self.indexed_per_s.split_off(&keep_from);
    }

    /// Inserts `intent` as prepared, unless an intent of its id exists.
    fn insert_intent(&mut self, intent: &NewIntent) {
        if self.intents.contains_key(&intent.id) {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.intents.insert(
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
    }

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
        self.mark(intent, point_ids, summary, IntentState::Committed);
    }

    fn mark(
        &mut self,
        intent: IntentId,
        point_ids: Vec<PointId>,
        summary: CommitSummary,
        state: IntentState,
    ) {
        if let Some(stored) = self.intents.get_mut(&intent) {
            stored.intent.state = state;
            stored.intent.point_ids = point_ids;
            stored.intent.summary = Some(summary);
        }
    }

    /// Whether `fence` still owns a live saga.
    fn check_saga(&self, fence: Option<SagaFence>) -> Result<(), MetadataError> {
        match fence {
            None => Ok(()),
            Some(f) => match self.sagas.get(&f.saga) {
                Some((saga, _)) if saga.owner == f.owner && saga.state.is_live() => Ok(()),
                _ => Err(MetadataError::SagaFenced { saga: f.saga }),
            },
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
fn validate_rows(
    by_point: &HashMap<PointId, RecordId>,
    rows: &[RowWrite],
) -> Result<(), MetadataError> {
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
        if let Some(owner) = by_point.get(&row.point_id) {
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
        // A repeated prepare (a retry, a duplicated request) changes nothing,
        // even when the intent has moved on since.
        let mut state = self.lock();
        state.index_state.check_prepare(intent)?;
        state.insert_intent(intent);
        Ok(())
    }

    async fn commit_upsert(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        rows: &[RowWrite],
        idempotency: Option<&IdempotencyRecord>,
    ) -> Result<UpsertCommit, MetadataError> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let current = state.owned_intent(intent, owner)?;
        if current.state != IntentState::Prepared {
            // The commit already applied: answer what it decided.
            return Ok(UpsertCommit {
                summary: current.summary.unwrap_or_default(),
                old_point_ids: current.point_ids.clone(),
            });
        }
        state.check_key_free(idempotency)?;
        // Validated before anything changes: the commit applies whole or not at all.
        let mut scratch = Scratch::new(state, self.keep_vectors);
        scratch.upsert(rows)?;
        let touched = scratch.touched();
        let (summary, old_point_ids) = (scratch.summary, scratch.garbage);
        state.note_changes(&touched, &old_point_ids);
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
        let mut guard = self.lock();
        let state = &mut *guard;
        let current = state.owned_intent(intent, owner)?;
        if current.state != IntentState::Prepared {
            return Ok(DeleteCommit {
                summary: current.summary.unwrap_or_default(),
                point_ids: current.point_ids.clone(),
            });
        }
        state.check_key_free(idempotency)?;
        let mut scratch = Scratch::new(state, self.keep_vectors);
        scratch.delete(selector);
        let touched = scratch.touched();
        let (summary, point_ids) = (scratch.summary, scratch.garbage);
        state.note_changes(&touched, &point_ids);
        state.mark_committed(intent, point_ids.clone(), summary);
        state.record_key(idempotency, summary);
        Ok(DeleteCommit { summary, point_ids })
    }

    fn commit_step_connection(&self) -> Option<ConnectionType> {
        Some(ConnectionType::of::<InMemoryTables>())
    }

    async fn commit_transaction(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        commit: &TransactionCommit<'_>,
        idempotency: Option<&IdempotencyRecord>,
        gate: &IndexGate,
    ) -> Result<TransactionCommitResult, MetadataError> {
        // No transaction stays open in memory: wait for the index write
        // first, then commit (the trait's sequential order).
        if !gate.wait().await {
            return Err(MetadataError::Aborted { intent });
        }
        // The caller's step runs on a copy of the tables (it may await), under
        // a lock that serialises steps, so that no other step's writes are
        // lost; the copy replaces the tables only if the whole commit applies.
        let _steps = self.steps.lock().await;
        let tables = match &commit.step {
            Some(step) => {
                let mut tables = self.lock().tables.clone();
                step.run(&mut tables)
                    .await
                    .map_err(|source| MetadataError::StepFailed { source })?;
                Some(tables)
            }
            None => None,
        };
        let mut guard = self.lock();
        let state = &mut *guard;
        // An intent the commit creates is inserted with the rows, below.
        let created = commit
            .create_intent
            .filter(|new| new.id == intent && !state.intents.contains_key(&intent));
        match created {
            Some(new) if new.owner != owner => return Err(MetadataError::Fenced { intent }),
            Some(_) => {}
            None => {
                let current = state.owned_intent(intent, owner)?;
                if current.state != IntentState::Prepared {
                    return Ok(TransactionCommitResult {
                        summary: current.summary.unwrap_or_default(),
                        garbage: current.point_ids.clone(),
                        conflicts: Vec::new(),
                        versions: Vec::new(),
                    });
                }
            }
        }
        state.check_saga(commit.saga)?;
        state.check_key_free(idempotency)?;
        let mut scratch = Scratch::new(state, self.keep_vectors);
        for part in commit.parts {
            let applied = match part {
                CommitPart::Upsert(rows) => scratch.upsert(rows),
                CommitPart::Delete(selector) => {
                    scratch.delete(selector);
                    Ok(())
                }
                CommitPart::Restore(images) => scratch.restore(images),
                CommitPart::Defer { rows, now_ms } => scratch.defer(rows, *now_ms),
                CommitPart::Index {
                    claim,
                    switches,
                    now_ms,
                } => scratch.index(*claim, switches, *now_ms),
            };
            if let Err(e) = applied {
                scratch.rollback();
                return Err(e);
            }
        }
        let undo = commit.hold.then(|| scratch.undo_images());
        let touched = scratch.touched();
        let referenced: HashSet<PointId> = scratch.by_point.keys().copied().collect();
        let mut seen = HashSet::new();
        let garbage: Vec<PointId> = scratch
            .garbage
            .iter()
            .copied()
            .filter(|p| !referenced.contains(p) && seen.insert(*p))
            .collect();
        let (summary, conflicts, versions, indexed) = (
            scratch.summary,
            scratch.conflicts,
            scratch.versions,
            scratch.indexed,
        );
        let held = if commit.hold {
            IntentState::Held
        } else {
            IntentState::Committed
        };
        if let Some(new) = created {
            state.insert_intent(new);
        }
        state.note_changes(&touched, &garbage);
        for (at_ms, n) in indexed {
            state.count_indexed(at_ms, n);
        }
        state.mark(intent, garbage.clone(), summary, held);
        if let (Some(at), Some(stored)) = (commit.release_at_ms, state.intents.get_mut(&intent)) {
            stored.intent.lease_deadline_ms = at;
        }
        if let Some(undo) = undo {
            state.undo.insert(intent, undo);
        }
        if let Some(tables) = tables {
            state.tables = tables;
        }
        state.record_key(idempotency, summary);
        Ok(TransactionCommitResult {
            summary,
            garbage,
            conflicts,
            versions,
        })
    }

    async fn undo_images(&self, intent: IntentId) -> Result<Vec<UndoImage>, MetadataError> {
        Ok(self.lock().undo.get(&intent).cloned().unwrap_or_default())
    }

    async fn saga_save(
        &self,
        saga: &SagaRecord,
        fence: Option<OwnerToken>,
    ) -> Result<Vec<Intent>, MetadataError> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let Some(fence) = fence else {
            if !state.sagas.contains_key(&saga.id) {
                let seq = state.next_seq;
                state.next_seq += 1;
                state.sagas.insert(saga.id, (saga.clone(), seq));
            }
            return Ok(Vec::new());
        };
        match state.sagas.get_mut(&saga.id) {
            Some((stored, _)) if stored.owner == fence => {
                let (name, input, created) =
                    (stored.name.clone(), stored.input.clone(), stored.created_ms);
                *stored = SagaRecord {
                    name,
                    input,
                    created_ms: created,
                    ..saga.clone()
                };
            }
            _ => return Err(MetadataError::SagaFenced { saga: saga.id }),
        }
        if saga.state.is_live() {
            return Ok(Vec::new());
        }
        // A terminal save releases what the saga's steps held.
        let mut released = Vec::new();
        for id in saga.held_intents() {
            if let Some(stored) = state.intents.get_mut(&id)
                && stored.intent.state == IntentState::Held
            {
                stored.intent.state = IntentState::Committed;
                stored.intent.owner = saga.owner;
                stored.intent.lease_deadline_ms = saga.lease_deadline_ms;
                state.undo.remove(&id);
                released.push(stored.intent.clone());
            }
        }
        Ok(released)
    }

    async fn saga_claim(
        &self,
        now_ms: i64,
        owner: OwnerToken,
        lease_deadline_ms: i64,
        limit: usize,
    ) -> Result<Vec<SagaRecord>, MetadataError> {
        let mut state = self.lock();
        let mut claimable: Vec<(i64, u64, SagaId)> = state
            .sagas
            .values()
            .filter(|(s, _)| s.state.is_live() && s.lease_deadline_ms < now_ms)
            .map(|(s, seq)| (s.lease_deadline_ms, *seq, s.id))
            .collect();
        claimable.sort();
        let mut claimed = Vec::new();
        for (_, _, id) in claimable.into_iter().take(limit) {
            if let Some((saga, _)) = state.sagas.get_mut(&id) {
                saga.owner = owner;
                saga.lease_deadline_ms = lease_deadline_ms;
                saga.attempts = saga.attempts.saturating_add(1);
                claimed.push(saga.clone());
            }
        }
        Ok(claimed)
    }

    async fn saga_take(
        &self,
        id: SagaId,
        owner: OwnerToken,
        lease_deadline_ms: i64,
    ) -> Result<Option<SagaRecord>, MetadataError> {
        let mut state = self.lock();
        Ok(match state.sagas.get_mut(&id) {
            Some((saga, _)) if saga.state.is_live() => {
                saga.owner = owner;
                saga.lease_deadline_ms = lease_deadline_ms;
                Some(saga.clone())
            }
            _ => None,
        })
    }

    async fn saga_get(&self, id: SagaId) -> Result<Option<SagaRecord>, MetadataError> {
        Ok(self.lock().sagas.get(&id).map(|(s, _)| s.clone()))
    }

    async fn saga_list(
        &self,
        state: Option<SagaState>,
        limit: usize,
    ) -> Result<Vec<SagaRecord>, MetadataError> {
        let guard = self.lock();
        let mut sagas: Vec<&(SagaRecord, u64)> = guard
            .sagas
            .values()
            .filter(|(s, _)| state.is_none_or(|st| s.state == st))
            .collect();
        sagas.sort_by_key(|(s, seq)| std::cmp::Reverse((s.created_ms, *seq)));
        Ok(sagas
            .into_iter()
            .take(limit)
            .map(|(s, _)| s.clone())
            .collect())
    }

    async fn saga_counts(&self) -> Result<SagaCounts, MetadataError> {
        let mut counts = SagaCounts::new();
        for (saga, _) in self.lock().sagas.values() {
            *counts.entry(saga.state).or_insert(0) += 1;
        }
        Ok(counts)
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
            IntentState::Committed | IntentState::Held => Settlement::Committed(current.clone()),
            IntentState::Prepared => {
                if current.owner == owner {
                    current.owner = fence;
                }
                Settlement::NotCommitted(current.clone())
            }
        })
    }

    async fn settle_unprepared(
        &self,
        intent: &NewIntent,
        owner: OwnerToken,
        fence: OwnerToken,
    ) -> Result<Settlement, MetadataError> {
        // Commits apply under the same lock: one that has not applied yet
        // finds the fence and fails.
        self.lock().insert_intent(&NewIntent {
            owner: fence,
            ..intent.clone()
        });
        self.settle(intent.id, owner, fence).await
    }

    async fn resolve(&self, intent: IntentId, owner: OwnerToken) -> Result<bool, MetadataError> {
        let mut state = self.lock();
        if state.owned_intent(intent, owner).is_err() {
            return Ok(false);
        }
        state.intents.remove(&intent);
        Ok(true)
    }

    async fn resolve_many(
        &self,
        intents: &[IntentId],
        owner: OwnerToken,
    ) -> Result<usize, MetadataError> {
        let mut state = self.lock();
        let mut resolved = 0;
        for &intent in intents {
            if state.owned_intent(intent, owner).is_ok() {
                state.intents.remove(&intent);
                resolved += 1;
            }
        }
        Ok(resolved)
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
            .filter(|s| s.intent.lease_deadline_ms < now_ms && s.intent.state != IntentState::Held)
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
        let held: HashSet<PointId> = state
            .intents
            .values()
            .filter(|s| s.intent.state == IntentState::Held)
            .flat_map(|s| s.intent.point_ids.iter().copied())
            .collect();
        Ok(points
            .iter()
            .filter(|p| state.by_point.contains_key(p) || held.contains(p))
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

    fn deferred_indexing(&self) -> bool {
        true
    }

    async fn claim_pending(
        &self,
        now_ms: i64,
        claim: OwnerToken,
        claim_until_ms: i64,
        limit: usize,
    ) -> Result<Vec<PendingIndex>, MetadataError> {
        let mut guard = self.lock();
        let state = &mut *guard;
        // Entries a later write made stale go first.
        let rows = &state.rows;
        state
            .pending
            .retain(|id, e| rows.get(id).is_some_and(|r| r.version == e.version));
        let mut claimable: Vec<&PendingIndex> = state
            .pending
            .values()
            .filter(|e| e.is_claimable(now_ms))
            .collect();
        claimable.sort_by_key(|e| (e.enqueued_ms, e.record_id));
        let ids: Vec<RecordId> = claimable
            .into_iter()
            .take(limit)
            .map(|e| e.record_id)
            .collect();
        let mut claimed = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(entry) = state.pending.get_mut(&id) {
                entry.claimed_by = Some(claim);
                entry.claim_until_ms = Some(claim_until_ms);
                claimed.push(entry.clone());
            }
        }
        Ok(claimed)
    }

    async fn record_index_failure(
        &self,
        claim: OwnerToken,
        entries: &[(RecordId, u64)],
        failure: &IndexFailure,
    ) -> Result<usize, MetadataError> {
        let mut state = self.lock();
        let mut dead = 0;
        for (id, version) in entries {
            let Some(entry) = state.pending.get_mut(id) else {
                continue;
            };
            if entry.version != *version || entry.claimed_by != Some(claim) || entry.dead {
                continue;
            }
            entry.last_error = Some(failure.message.clone());
            entry.claimed_by = None;
            if failure.counts || failure.permanent {
                entry.attempts = entry.attempts.saturating_add(1);
            }
            if failure.permanent || (failure.counts && entry.attempts >= failure.max_attempts) {
                entry.dead = true;
                entry.claim_until_ms = None;
                dead += 1;
            } else {
                entry.claim_until_ms = Some(failure.retry_at_ms);
            }
        }
        Ok(dead)
    }

    async fn list_pending(
        &self,
        filter: PendingFilter,
        after: Option<RecordId>,
        limit: usize,
    ) -> Result<Vec<PendingIndex>, MetadataError> {
        let state = self.lock();
        let start = match after {
            Some(after) => std::ops::Bound::Excluded(after),
            None => std::ops::Bound::Unbounded,
        };
        Ok(state
            .pending
            .range((start, std::ops::Bound::Unbounded))
            .map(|(_, e)| e)
            .filter(|e| match filter {
                PendingFilter::All => true,
                PendingFilter::Waiting => !e.dead,
                PendingFilter::Dead => e.dead,
            })
            .take(limit)
            .cloned()
            .collect())
    }

    async fn pending_for(&self, ids: &[RecordId]) -> Result<Vec<PendingIndex>, MetadataError> {
        let state = self.lock();
        let mut seen = HashSet::new();
        Ok(ids
            .iter()
            .filter(|id| seen.insert(**id))
            .filter_map(|id| state.pending.get(id).cloned())
            .collect())
    }

    async fn retry_dead(&self, ids: Option<&[RecordId]>) -> Result<u64, MetadataError> {
        let mut state = self.lock();
        let mut n = 0;
        for entry in state.pending.values_mut() {
            if entry.dead && ids.is_none_or(|ids| ids.contains(&entry.record_id)) {
                entry.dead = false;
                entry.attempts = 0;
                entry.claimed_by = None;
                entry.claim_until_ms = None;
                n += 1;
            }
        }
        Ok(n)
    }

    async fn drop_dead(&self, ids: Option<&[RecordId]>) -> Result<u64, MetadataError> {
        let mut state = self.lock();
        let before = state.pending.len();
        state
            .pending
            .retain(|id, e| !(e.dead && ids.is_none_or(|ids| ids.contains(id))));
        Ok((before - state.pending.len()) as u64)
    }

    async fn pending_stats(&self, now_ms: i64) -> Result<PendingStats, MetadataError> {
        let state = self.lock();
        let mut stats = PendingStats::default();
        for e in state.pending.values() {
            if e.dead {
                stats.dead += 1;
                continue;
            }
            stats.pending += 1;
            if !e.is_claimable(now_ms) {
                stats.claimed += 1;
            }
            stats.oldest_enqueued_ms = Some(
                stats
                    .oldest_enqueued_ms
                    .map_or(e.enqueued_ms, |o| o.min(e.enqueued_ms)),
            );
        }
        stats.indexed_last_minute = state
            .indexed_per_s
            .range(PendingStats::rate_window(now_ms))
            .map(|(_, n)| n)
            .sum();
        Ok(stats)
    }

    fn reindexing(&self) -> bool {
        true
    }

    async fn index_state(&self) -> Result<IndexState, MetadataError> {
        Ok(self.lock().index_state.clone())
    }

    async fn reindex_begin(
        &self,
        spec: &MigrationSpec,
        owner: OwnerToken,
        now_ms: i64,
        lease_until_ms: i64,
    ) -> Result<IndexState, MetadataError> {
        let mut state = self.lock();
        if state
            .index_state
            .begin(spec, owner, now_ms, lease_until_ms)?
        {
            state.migration_garbage.clear();
            state.staged_vectors.clear();
            state.fence_prepared(now_ms);
        }
        Ok(state.index_state.clone())
    }

    async fn reindex_scan(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ChangedRow>, MetadataError> {
        let state = self.lock();
        Ok(state
            .by_seq
            .range(after.saturating_add(1)..)
            .take(limit)
            .filter_map(|(seq, id)| {
                let row = state.rows.get(id)?;
                // A deferred insert references a reserved point until a
                // worker switches it in.
                let reserved = state
                    .pending
                    .get(id)
                    .is_some_and(|p| p.indexed_version == 0);
                Some(ChangedRow {
                    seq: *seq,
                    row: row.clone(),
                    indexed: !reserved,
                })
            })
            .collect())
    }

    async fn reindex_garbage(&self, limit: usize) -> Result<Vec<PointId>, MetadataError> {
        Ok(self
            .lock()
            .migration_garbage
            .iter()
            .take(limit)
            .copied()
            .collect())
    }

    async fn reindex_progress(
        &self,
        owner: OwnerToken,
        cursor: u64,
        copied: u64,
        garbage: &[PointId],
        vectors: &[StagedVector],
        lease_until_ms: i64,
    ) -> Result<IndexState, MetadataError> {
        let mut state = self.lock();
        state
            .index_state
            .progress(owner, cursor, copied, lease_until_ms)?;
        for point in garbage {
            state.migration_garbage.remove(point);
        }
        if self.keep_vectors {
            for v in vectors {
                state
                    .staged_vectors
                    .insert(v.record_id, (v.seq, v.vector.clone()));
            }
        }
        Ok(state.index_state.clone())
    }

    async fn reindex_freeze(
        &self,
        owner: OwnerToken,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<u64, MetadataError> {
        let mut state = self.lock();
        state.index_state.owned(owner)?.frozen_until_ms = Some(until_ms);
        Ok(state.fence_prepared(now_ms))
    }

    async fn reindex_switch(
        &self,
        owner: OwnerToken,
        current: &str,
        now_ms: i64,
    ) -> Result<SwitchOutcome, MetadataError> {
        let mut state = self.lock();
        let cursor = state.index_state.owned(owner)?.cursor;
        state.fence_prepared(now_ms);
        let counts = SwitchCounts {
            rows: state.by_seq.range(cursor.saturating_add(1)..).count() as u64,
            garbage: state.migration_garbage.len() as u64,
            held: state
                .intents
                .values()
                .filter(|s| s.intent.state == IntentState::Held)
                .count() as u64,
            deferred: state.pending.len() as u64,
        };
        if let Some(refused) = state.index_state.switch_blocker(counts) {
            return Ok(refused);
        }
        state.apply_staged_vectors();
        state.index_state.switch_to_target(current);
        Ok(SwitchOutcome::Switched(state.index_state.clone()))
    }

    async fn reindex_abort(
        &self,
        owner: Option<OwnerToken>,
    ) -> Result<Option<Migration>, MetadataError> {
        let mut state = self.lock();
        if let Some(owner) = owner {
            state.index_state.owned(owner)?;
        }
        state.migration_garbage.clear();
        state.staged_vectors.clear();
        Ok(state.index_state.migration.take())
    }

    async fn reindex_forget_retired(&self, name: &str) -> Result<bool, MetadataError> {
        Ok(self.lock().index_state.forget_retired(name))
    }
}
