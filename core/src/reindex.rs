//! Re-indexing: which vector collection is active, and the migration that
//! builds a new one from the metadata store while writes go on.
//!
//! The metadata store records the active collection and any open migration
//! ([`IndexState`]), so every process agrees on them without a coordinator.
//! See `docs/reindex.md` for the mechanism and why it keeps the invariants.

use serde::{Deserialize, Serialize};

use crate::error::MetadataError;
use crate::model::{Distance, NewIntent, OwnerToken, RecordId, StoredRecord};

/// The active vector collection and any open migration, as the metadata
/// store records them.
///
/// Generation 0 with no `active` name is a store that was never re-indexed:
/// every process uses the collection it was configured with. Each switch
/// increments the generation; an intent prepared under another generation is
/// refused ([`MetadataError::IndexMoved`](crate::MetadataError::IndexMoved)).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexState {
    /// Incremented by every switch.
    pub generation: u64,
    /// The active collection, once a switch named it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<String>,
    /// The collection a switch retired, until it is dropped (or forgotten).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired: Option<String>,
    /// The open migration, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<Migration>,
}

/// The transitions of the state, written once for every store: a store
/// reads the state under its lock, applies one of these, and writes the
/// state back in the same transaction (with the statements the method's
/// contract adds: fencing, garbage).
impl IndexState {
    /// Is a switch in progress at `now_ms` (prepares are refused until it
    /// ends or its lease runs out)?
    pub fn switching_at(&self, now_ms: i64) -> bool {
        self.migration
            .as_ref()
            .and_then(|m| m.frozen_until_ms)
            .is_some_and(|until| now_ms < until)
    }

    /// `prepare`'s fence: [`MetadataError::IndexMoved`] if `intent` was made
    /// under another generation, or while a switch is in progress.
    pub fn check_prepare(&self, intent: &NewIntent) -> Result<(), MetadataError> {
        let frozen_until_ms = self.migration.as_ref().and_then(|m| m.frozen_until_ms);
        Self::fence_prepare(self.generation, frozen_until_ms, intent)
    }

    /// [`check_prepare`](Self::check_prepare) on the two fields it reads,
    /// for a store that reads only those.
    pub fn fence_prepare(
        generation: u64,
        frozen_until_ms: Option<i64>,
        intent: &NewIntent,
    ) -> Result<(), MetadataError> {
        let switching = frozen_until_ms.is_some_and(|until| intent.created_ms < until);
        if intent.generation != generation || switching {
            return Err(MetadataError::IndexMoved {
                generation,
                switching,
            });
        }
        Ok(())
    }

    /// The open migration, if `owner` holds it.
    pub fn owned(&mut self, owner: OwnerToken) -> Result<&mut Migration, MetadataError> {
        match self.migration.as_mut() {
            Some(m) if m.owner == owner => Ok(m),
            Some(_) => Err(conflict(
                "the migration is held by another driver".to_owned(),
            )),
            None => Err(conflict("no migration is open".to_owned())),
        }
    }

    /// [`reindex_begin`](crate::MetadataRepo::reindex_begin)'s decision:
    /// opens a migration (returns `true`: the store must then forget old
    /// garbage and fence prepared intents), takes one over (`false`), or
    /// conflicts.
    pub fn begin(
        &mut self,
        spec: &MigrationSpec,
        owner: OwnerToken,
        now_ms: i64,
        lease_until_ms: i64,
    ) -> Result<bool, MetadataError> {
        match self.migration.as_mut() {
            Some(open) if open.spec != *spec => Err(conflict(format!(
                "a migration to collection {:?} is open",
                open.spec.target
            ))),
            Some(open) if open.owner != owner && open.lease_until_ms >= now_ms => {
                Err(conflict(format!(
                    "the migration to {:?} is held by a live driver",
                    open.spec.target
                )))
            }
            Some(open) => {
                open.owner = owner;
                open.lease_until_ms = lease_until_ms;
                Ok(false)
            }
            None => {
                self.migration = Some(Migration {
                    spec: spec.clone(),
                    owner,
                    lease_until_ms,
                    cursor: 0,
                    copied: 0,
                    started_ms: now_ms,
                    frozen_until_ms: None,
                });
                Ok(true)
            }
        }
    }

    /// [`reindex_progress`](crate::MetadataRepo::reindex_progress) on the
    /// state (the store forgets the reported garbage).
    pub fn progress(
        &mut self,
        owner: OwnerToken,
        cursor: u64,
        copied: u64,
        lease_until_ms: i64,
    ) -> Result<(), MetadataError> {
        let migration = self.owned(owner)?;
        migration.cursor = cursor;
        migration.copied = migration.copied.saturating_add(copied);
        migration.lease_until_ms = lease_until_ms;
        Ok(())
    }

    /// The switch's decision on what the store counted (under the switch's
    /// lock): `Some` outcome that refuses, or `None` to switch. Rows past
    /// the cursor or garbage left mean the target is behind; a held intent
    /// holds it; with a re-embedding, so do deferred entries, whose vectors
    /// are the old model's (a worker would index them into the new
    /// collection).
    pub fn switch_blocker(&self, counts: SwitchCounts) -> Option<SwitchOutcome> {
        if counts.rows > 0 || counts.garbage > 0 {
            return Some(SwitchOutcome::Behind {
                rows: counts.rows,
                garbage: counts.garbage,
            });
        }
        if counts.held > 0 {
            return Some(SwitchOutcome::Held {
                intents: counts.held,
            });
        }
        let re_embeds = self
            .migration
            .as_ref()
            .is_some_and(|m| matches!(m.spec.source, ReindexSource::Embedder { .. }));
        if re_embeds && counts.deferred > 0 {
            return Some(SwitchOutcome::Deferred {
                entries: counts.deferred,
            });
        }
        None
    }

    /// The switch itself, once the store found nothing behind: the target
    /// active, `current` retired, the generation + 1, the migration closed.
    pub fn switch_to_target(&mut self, current: &str) {
        let migration = self.migration.take();
        self.generation += 1;
        self.retired = Some(current.to_owned());
        self.active = migration.map(|m| m.spec.target);
    }

    /// Forgets the retired collection if it is `name`; returns whether it was.
    pub fn forget_retired(&mut self, name: &str) -> bool {
        if self.retired.as_deref() != Some(name) {
            return false;
        }
        self.retired = None;
        true
    }
}

fn conflict(message: String) -> MetadataError {
    MetadataError::MigrationConflict { message }
}

/// A migration to a new collection: the target, how its vectors are made,
/// and how far the copy got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    /// What it builds.
    pub spec: MigrationSpec,
    /// The driver that holds it (a re-run takes it over once the lease ended).
    pub owner: OwnerToken,
    /// The driver's lease.
    pub lease_until_ms: i64,
    /// Every row whose change sequence is at most this is in the target.
    pub cursor: u64,
    /// Rows copied so far (a row copied twice counts twice).
    pub copied: u64,
    /// When it started (ms since the Unix epoch).
    pub started_ms: i64,
    /// While set and in the future, a switch is in progress: prepares are
    /// refused and every prepared intent was fenced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_until_ms: Option<i64>,
}

/// What a migration builds: the target collection's name and layout, and
/// where its vectors come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationSpec {
    /// The target collection (created by the migration).
    pub target: String,
    /// Its vector dimension.
    pub dimension: usize,
    /// Its distance function.
    pub distance: Distance,
    /// Where the vectors come from.
    pub source: ReindexSource,
}

/// Where a migration's vectors come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ReindexSource {
    /// The vectors the metadata store keeps with each row (same model: a
    /// rebuild, with new collection settings).
    KeptVectors,
    /// A re-embedding of each row's content (a new model); the description
    /// names the model, for the record.
    Embedder {
        /// The model, as the embedder names it.
        model: String,
    },
}

/// A committed row whose point changed (or that was inserted) after a
/// migration's cursor, as [`MetadataRepo::reindex_scan`](crate::MetadataRepo::reindex_scan)
/// returns it.
#[derive(Clone, Debug, PartialEq)]
pub struct ChangedRow {
    /// The row's change sequence: raised whenever its point changes.
    pub seq: u64,
    /// The row.
    pub row: StoredRecord,
    /// Does its point exist in the index? `false` for a deferred insert not
    /// yet indexed (the row references a reserved point, never written).
    pub indexed: bool,
}

/// A row's vector from a re-embedding, staged by
/// [`MetadataRepo::reindex_progress`](crate::MetadataRepo::reindex_progress)
/// until the switch makes it the row's kept vector (so that repairs after
/// the switch write the new model's vectors, and those before it the old
/// model's).
#[derive(Clone, Debug, PartialEq)]
pub struct StagedVector {
    /// The row.
    pub record_id: RecordId,
    /// The row's change sequence when its content was embedded: the switch
    /// applies the vector only if the row is still at it.
    pub seq: u64,
    /// The new model's vector.
    pub vector: Vec<f32>,
}

/// What a store counts for [`IndexState::switch_blocker`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SwitchCounts {
    /// Rows whose change sequence is past the cursor.
    pub rows: u64,
    /// Recorded garbage points.
    pub garbage: u64,
    /// Held intents (saga steps).
    pub held: u64,
    /// Deferred-index entries, waiting or dead-lettered.
    pub deferred: u64,
}

/// What a switch attempt found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SwitchOutcome {
    /// The target is active now.
    Switched(IndexState),
    /// The target is not caught up: rows changed after the cursor, or
    /// points were unreferenced that the target may still hold. Copy again.
    Behind {
        /// Rows changed after the cursor.
        rows: u64,
        /// Unreferenced points not yet deleted from the target.
        garbage: u64,
    },
    /// Saga steps hold commits whose undo images reference points the
    /// target may lack: the switch waits for them to end.
    Held {
        /// How many held intents.
        intents: u64,
    },
    /// A re-embedding migration, and deferred writes (waiting or
    /// dead-lettered) carry vectors of the old model: the switch waits for
    /// the workers to index them (into the old collection; the copy then
    /// re-embeds them) or for an operator to drop them.
    Deferred {
        /// Deferred-index entries.
        entries: u64,
    },
}

/// A re-index's progress, as the driver reports it after each chunk.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ReindexProgress {
    /// The phase: `copying`, `catching_up`, `switching`, `switched`, `dropped`.
    pub phase: &'static str,
    /// Rows copied so far (also by an earlier, interrupted run).
    pub copied: u64,
    /// Committed rows in the store (the copy's total, approximately: writes
    /// go on).
    pub total: u64,
    /// Points deleted from the target because their rows moved on.
    pub garbage_deleted: u64,
    /// Rows per second in this run.
    pub rate: f64,
    /// Seconds left at this rate, if it can be told.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<f64>,
}
