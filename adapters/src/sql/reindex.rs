//! Re-indexing on the SQL backends: the `index_state` row as both read and
//! write it, and the migration calls written once over [`ReindexOps`], the
//! few statements a backend provides inside the call's transaction.
//!
//! Each call runs inside one transaction that the backend opens before and
//! commits (or rolls back) after; an error returned here rolls it back.

use async_trait::async_trait;
use serde_json::Value;
use tandem_core::{
    IndexState, MetadataError, Migration, MigrationSpec, NewIntent, OwnerToken, PointId,
    StagedVector, SwitchCounts, SwitchOutcome,
};
use uuid::Uuid;

use super::codec::{corrupt, to_i64, to_u64};

/// The `index_state` row as either backend reads it (the migration's
/// columns are all NULL while none is open).
#[derive(Debug, Default)]
pub(crate) struct IndexStateRow {
    pub generation: i64,
    pub active: Option<String>,
    pub retired: Option<String>,
    /// The [`MigrationSpec`] as JSON.
    pub spec: Option<Value>,
    pub owner: Option<Uuid>,
    pub lease_until_ms: Option<i64>,
    pub scan_cursor: Option<i64>,
    pub copied: Option<i64>,
    pub started_ms: Option<i64>,
    pub frozen_until_ms: Option<i64>,
}

impl IndexStateRow {
    /// The model's state.
    pub fn into_state(self) -> Result<IndexState, MetadataError> {
        let migration = match self.spec {
            None => None,
            Some(spec) => {
                let spec: MigrationSpec = serde_json::from_value(spec)
                    .map_err(|e| corrupt(format!("index_state: bad migration spec: {e}")))?;
                let missing =
                    |what: &str| corrupt(format!("index_state: migration without {what}"));
                Some(Migration {
                    spec,
                    owner: OwnerToken(self.owner.ok_or_else(|| missing("owner"))?),
                    lease_until_ms: self.lease_until_ms.ok_or_else(|| missing("lease"))?,
                    cursor: to_u64(self.scan_cursor.ok_or_else(|| missing("cursor"))?, "cursor")?,
                    copied: to_u64(self.copied.ok_or_else(|| missing("count"))?, "copied")?,
                    started_ms: self.started_ms.ok_or_else(|| missing("start"))?,
                    frozen_until_ms: self.frozen_until_ms,
                })
            }
        };
        Ok(IndexState {
            generation: to_u64(self.generation, "generation")?,
            active: self.active,
            retired: self.retired,
            migration,
        })
    }

    /// The row that stores `state`.
    pub fn of(state: &IndexState) -> Result<Self, MetadataError> {
        let mut row = Self {
            generation: to_i64(state.generation, "generation")?,
            active: state.active.clone(),
            retired: state.retired.clone(),
            ..Self::default()
        };
        if let Some(m) = &state.migration {
            row.spec = Some(serde_json::to_value(&m.spec).map_err(|e| {
                MetadataError::permanent(format!("cannot encode the migration spec: {e}"))
            })?);
            row.owner = Some(m.owner.0);
            row.lease_until_ms = Some(m.lease_until_ms);
            row.scan_cursor = Some(to_i64(m.cursor, "cursor")?);
            row.copied = Some(to_i64(m.copied, "copied")?);
            row.started_ms = Some(m.started_ms);
            row.frozen_until_ms = m.frozen_until_ms;
        }
        Ok(row)
    }
}

/// `prepare`'s fence on the state row's columns
/// ([`IndexState::fence_prepare`]).
pub(crate) fn check_generation(
    intent: &NewIntent,
    generation: i64,
    frozen_until_ms: Option<i64>,
) -> Result<(), MetadataError> {
    IndexState::fence_prepare(to_u64(generation, "generation")?, frozen_until_ms, intent)
}

/// The statements a backend runs inside a migration call's transaction.
#[async_trait]
pub(crate) trait ReindexOps: Send {
    /// Reads the index state and locks it until the transaction ends:
    /// `exclusive` also against prepares (which read it with a shared lock),
    /// so that a prepare either lands before this call (and is fenced by
    /// it) or sees what it wrote.
    async fn lock_state(&mut self, exclusive: bool) -> Result<IndexState, MetadataError>;

    /// Writes the whole index state.
    async fn save_state(&mut self, state: &IndexState) -> Result<(), MetadataError>;

    /// Forgets every recorded garbage point.
    async fn clear_garbage(&mut self) -> Result<(), MetadataError>;

    /// Forgets these garbage points.
    async fn forget_garbage(&mut self, points: &[PointId]) -> Result<(), MetadataError>;

    /// Stages re-embedded vectors (replacing those staged for the same
    /// rows), if rows keep vectors; otherwise does nothing.
    async fn stage_vectors(&mut self, vectors: &[StagedVector]) -> Result<(), MetadataError>;

    /// Makes each staged vector its row's kept vector where the row is still
    /// at the change sequence it was staged for, then forgets them all.
    async fn apply_staged_vectors(&mut self) -> Result<(), MetadataError>;

    /// Forgets every staged vector.
    async fn clear_staged_vectors(&mut self) -> Result<(), MetadataError>;

    /// Fences every prepared intent (a new random owner, the lease ended at
    /// `now_ms` at the latest), waiting for commits that hold one; returns
    /// how many.
    async fn fence_prepared(&mut self, now_ms: i64) -> Result<u64, MetadataError>;

    /// Rows whose change sequence is above `cursor`, recorded garbage points,
    /// held intents and deferred-index entries.
    async fn switch_counts(&mut self, cursor: u64) -> Result<SwitchCounts, MetadataError>;
}

/// [`MetadataRepo::reindex_begin`](tandem_core::MetadataRepo::reindex_begin).
pub(crate) async fn begin<T: ReindexOps + ?Sized>(
    tx: &mut T,
    spec: &MigrationSpec,
    owner: OwnerToken,
    now_ms: i64,
    lease_until_ms: i64,
) -> Result<IndexState, MetadataError> {
    let mut state = tx.lock_state(true).await?;
    if state.begin(spec, owner, now_ms, lease_until_ms)? {
        tx.clear_garbage().await?;
        tx.clear_staged_vectors().await?;
        tx.fence_prepared(now_ms).await?;
    }
    tx.save_state(&state).await?;
    Ok(state)
}

/// [`MetadataRepo::reindex_progress`](tandem_core::MetadataRepo::reindex_progress).
pub(crate) async fn progress<T: ReindexOps + ?Sized>(
    tx: &mut T,
    owner: OwnerToken,
    cursor: u64,
    copied: u64,
    garbage: &[PointId],
    vectors: &[StagedVector],
    lease_until_ms: i64,
) -> Result<IndexState, MetadataError> {
    let mut state = tx.lock_state(false).await?;
    state.progress(owner, cursor, copied, lease_until_ms)?;
    tx.save_state(&state).await?;
    if !garbage.is_empty() {
        tx.forget_garbage(garbage).await?;
    }
    if !vectors.is_empty() {
        tx.stage_vectors(vectors).await?;
    }
    Ok(state)
}

/// [`MetadataRepo::reindex_freeze`](tandem_core::MetadataRepo::reindex_freeze).
pub(crate) async fn freeze<T: ReindexOps + ?Sized>(
    tx: &mut T,
    owner: OwnerToken,
    now_ms: i64,
    until_ms: i64,
) -> Result<u64, MetadataError> {
    let mut state = tx.lock_state(true).await?;
    state.owned(owner)?.frozen_until_ms = Some(until_ms);
    tx.save_state(&state).await?;
    tx.fence_prepared(now_ms).await
}

/// [`MetadataRepo::reindex_switch`](tandem_core::MetadataRepo::reindex_switch).
/// A `Behind` or `Held` answer still commits the fencing, and nothing else.
pub(crate) async fn switch<T: ReindexOps + ?Sized>(
    tx: &mut T,
    owner: OwnerToken,
    current: &str,
    now_ms: i64,
) -> Result<SwitchOutcome, MetadataError> {
    let mut state = tx.lock_state(true).await?;
    let cursor = state.owned(owner)?.cursor;
    // Waits for every commit still holding a prepared intent: the counts
    // below see all of them.
    tx.fence_prepared(now_ms).await?;
    let counts = tx.switch_counts(cursor).await?;
    if let Some(refused) = state.switch_blocker(counts) {
        return Ok(refused);
    }
    tx.apply_staged_vectors().await?;
    state.switch_to_target(current);
    tx.save_state(&state).await?;
    Ok(SwitchOutcome::Switched(state))
}

/// [`MetadataRepo::reindex_abort`](tandem_core::MetadataRepo::reindex_abort).
pub(crate) async fn abort<T: ReindexOps + ?Sized>(
    tx: &mut T,
    owner: Option<OwnerToken>,
) -> Result<Option<Migration>, MetadataError> {
    let mut state = tx.lock_state(false).await?;
    if let Some(owner) = owner {
        state.owned(owner)?;
    }
    let closed = state.migration.take();
    if closed.is_some() {
        tx.save_state(&state).await?;
        tx.clear_garbage().await?;
        tx.clear_staged_vectors().await?;
    }
    Ok(closed)
}

/// [`MetadataRepo::reindex_forget_retired`](tandem_core::MetadataRepo::reindex_forget_retired).
pub(crate) async fn forget_retired<T: ReindexOps + ?Sized>(
    tx: &mut T,
    name: &str,
) -> Result<bool, MetadataError> {
    let mut state = tx.lock_state(false).await?;
    if !state.forget_retired(name) {
        return Ok(false);
    }
    tx.save_state(&state).await?;
    Ok(true)
}
