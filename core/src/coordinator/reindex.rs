//! Re-indexing: build a new collection from the metadata store while writes
//! go on, then switch every process to it in one metadata commit.
//!
//! The mechanism (see `docs/reindex.md`):
//!
//! 1. **Begin** records the migration in the store (and fences the intents
//!    prepared before it, so that every later commit records the points it
//!    stops referencing while the migration is open).
//! 2. **Copy** walks the rows in change-sequence order from a persisted
//!    cursor: each chunk writes the rows' current points into the target,
//!    then deletes from it the points commits stopped referencing meanwhile.
//!    A row whose point changes moves past the cursor and is copied again,
//!    so the copy is also the catch-up.
//! 3. **Switch**: a freeze refuses new prepares and fences the prepared ones
//!    (in-flight writes fail, retryably), a last catch-up round copies what
//!    changed, and one commit makes the target active, only if nothing is
//!    left behind. Every process learns of it at its next prepare (refused
//!    under the old generation) or within the state TTL for searches.

use std::sync::Arc;

use tokio::time::Instant;
use tracing::{info, warn};

use super::{Bug, Coordinator};
use crate::embed::Embedder;
use crate::error::{
    CoordinatorError, EmbedError, MetadataError, ProtocolViolation, ValidationError,
};
use crate::model::{Distance, OwnerToken, Point};
use crate::ports::{MetadataRepo, VectorIndex};
use crate::reindex::{
    ChangedRow, IndexState, MigrationSpec, ReindexProgress, ReindexSource, StagedVector,
    SwitchOutcome,
};

/// What to build, and how.
#[derive(Clone)]
pub struct ReindexOptions {
    /// The new collection's name (created by the re-index; it must not be
    /// the active one).
    pub target: String,
    /// Its dimension (default: the embedder's, or the active collection's).
    pub dimension: Option<usize>,
    /// Its distance (default: the active collection's).
    pub distance: Option<Distance>,
    /// Re-embed each row's content with this (a new model); `None` copies
    /// the vectors the metadata store keeps (a rebuild).
    pub embedder: Option<Arc<dyn Embedder>>,
    /// Switch once the copy caught up (default). Off: copy only, and leave
    /// the migration open for a later run to finish.
    pub switch: bool,
    /// Drop the old collection after the switch.
    pub drop_old: bool,
}

impl ReindexOptions {
    /// A rebuild into `target` from the kept vectors, switched to when done.
    pub fn to(target: impl Into<String>) -> Self {
        Self {
            target: target.into(),
            dimension: None,
            distance: None,
            embedder: None,
            switch: true,
            drop_old: false,
        }
    }
}

impl std::fmt::Debug for ReindexOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReindexOptions")
            .field("target", &self.target)
            .field("dimension", &self.dimension)
            .field("distance", &self.distance)
            .field(
                "embedder",
                &self.embedder.as_ref().map(|e| e.model().to_owned()),
            )
            .field("switch", &self.switch)
            .field("drop_old", &self.drop_old)
            .finish()
    }
}

/// What a re-index did.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct ReindexReport {
    /// The store's state at the end.
    pub state: IndexState,
    /// Did this run continue a migration an earlier run started?
    pub resumed: bool,
    /// Rows copied by this run (a row copied again after a change counts
    /// twice).
    pub copied: u64,
    /// Rows skipped: deferred inserts not indexed yet (a worker indexes
    /// them into whichever collection is active then).
    pub skipped: u64,
    /// Points deleted from the target because their rows moved on.
    pub garbage_deleted: u64,
    /// Prepared intents fenced by the begin and the switch (their writes
    /// failed, retryably, with nothing applied).
    pub fenced: u64,
    /// Catch-up rounds the switch took.
    pub switch_rounds: u32,
    /// Did the target become active?
    pub switched: bool,
    /// The collection dropped after the switch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped: Option<String>,
    /// Wall-clock seconds.
    pub elapsed_s: f64,
}

/// A progress callback (called after every chunk).
pub type ProgressFn<'a> = &'a (dyn Fn(&ReindexProgress) + Send + Sync);

impl<M: MetadataRepo, V: VectorIndex> Coordinator<M, V> {
    /// Builds `options.target` from the metadata store and switches every
    /// process to it, while reads and writes go on; resumes a migration an
    /// interrupted run left open. See `docs/reindex.md`.
    ///
    /// Needs a store with re-indexing ([`MetadataRepo::reindexing`]) and a
    /// catalog ([`with_catalog`](Self::with_catalog)). A crash at any point
    /// leaves either the old collection active (a re-run continues the
    /// copy) or the new one.
    pub async fn reindex(
        &self,
        options: &ReindexOptions,
        progress: ProgressFn<'_>,
    ) -> Result<ReindexReport, CoordinatorError> {
        let started = std::time::Instant::now();
        let catalog = self.reindex_catalog()?;
        let before = self.refresh_index().await?;
        let current = self.active_name()?;
        if options.target == current {
            return Err(invalid(format!(
                "collection {current:?} is already the active one"
            )));
        }
        let spec = self.migration_spec(options)?;
        let deadline = || Instant::now() + self.config.call_deadline;
        let owner = OwnerToken::new_random();
        let now = self.clock.now_ms();
        let state = self
            .metadata_call("metadata.reindex_begin", deadline(), || {
                self.repo
                    .reindex_begin(&spec, owner, now, now + self.reindex_lease_ms())
            })
            .await?;
        let opened_now = before.migration.is_none();
        let migration = state.migration.clone().ok_or_else(|| {
            CoordinatorError::Metadata(MetadataError::permanent(
                "the store opened no migration".to_owned(),
            ))
        })?;
        let mut report = ReindexReport {
            resumed: !opened_now && migration.copied > 0,
            ..ReindexReport::default()
        };
        let target = self
            .index_call("index.create", deadline(), || {
                catalog.create(&spec.target, spec.dimension, spec.distance)
            })
            .await?;
        if opened_now && migration.cursor == 0 {
            let points = self
                .index_call("index.count", deadline(), || target.count(None))
                .await?;
            if points > 0 {
                self.metadata_call("metadata.reindex_abort", deadline(), || {
                    self.repo.reindex_abort(Some(owner))
                })
                .await?;
                return Err(invalid(format!(
                    "collection {:?} already holds {points} points: a re-index builds a \
                     new collection (drop it, or choose another name)",
                    spec.target
                )));
            }
        }
        info!(target = %spec.target, resumed = report.resumed, cursor = migration.cursor, "re-index started");
        let mut run = CopyRun {
            owner,
            cursor: migration.cursor,
            copied_before: migration.copied,
            total: 0,
            started,
        };
        self.copy_until_caught_up(&target, options, &mut run, &mut report, "copying", progress)
            .await?;
        if !options.switch {
            report.state = self.repo_state().await?;
            report.elapsed_s = started.elapsed().as_secs_f64();
            return Ok(report);
        }
        let state = self
            .switch_to(&target, options, &current, &mut run, &mut report, progress)
            .await?;
        report.switched = true;
        {
            let mut active = self
                .active
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            active.index = Arc::new(target);
            active.generation = state.generation;
            active.name = Some(spec.target.clone());
            active.checked = Some(std::time::Instant::now());
        }
        info!(target = %spec.target, generation = state.generation, "re-index switched");
        report.state = state;
        if options.drop_old {
            self.drop_retired().await?;
            report.dropped = Some(current);
            report.state = self.repo_state().await?;
            emit(progress, "dropped", &run, &report);
        }
        report.elapsed_s = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Drops the collection the last switch retired (a rollback to it is no
    /// longer possible afterwards). Returns its name, `None` if there is
    /// none.
    pub async fn drop_retired(&self) -> Result<Option<String>, CoordinatorError> {
        let catalog = self.reindex_catalog()?;
        let state = self.repo_state().await?;
        let Some(retired) = state.retired else {
            return Ok(None);
        };
        if Some(&retired) == state.active.as_ref() {
            return Err(invalid(format!("collection {retired:?} is the active one")));
        }
        let deadline = Instant::now() + self.config.call_deadline;
        self.index_call("index.drop", deadline, || catalog.drop_collection(&retired))
            .await?;
        self.metadata_call("metadata.reindex_forget_retired", deadline, || {
            self.repo.reindex_forget_retired(&retired)
        })
        .await?;
        Ok(Some(retired))
    }

    /// Abandons the open migration before its switch: the old collection
    /// stays active, and the partial target is dropped. Returns the target's
    /// name (`None` if no migration was open).
    pub async fn abort_reindex(&self) -> Result<Option<String>, CoordinatorError> {
        let catalog = self.reindex_catalog()?;
        let deadline = Instant::now() + self.config.call_deadline;
        let closed = self
            .metadata_call("metadata.reindex_abort", deadline, || {
                self.repo.reindex_abort(None)
            })
            .await?;
        let Some(migration) = closed else {
            return Ok(None);
        };
        self.index_call("index.drop", deadline, || {
            catalog.drop_collection(&migration.spec.target)
        })
        .await?;
        Ok(Some(migration.spec.target))
    }

    /// The store's index state, read now.
    async fn repo_state(&self) -> Result<IndexState, CoordinatorError> {
        let deadline = Instant::now() + self.config.call_deadline;
        self.metadata_call("metadata.index_state", deadline, || self.repo.index_state())
            .await
    }

    fn reindex_catalog(
        &self,
    ) -> Result<&Arc<dyn crate::ports::IndexCatalog<Index = V>>, CoordinatorError> {
        if !self.repo.reindexing() {
            return Err(CoordinatorError::Config(
                "this metadata store does not support re-indexing".to_owned(),
            ));
        }
        self.catalog.as_ref().ok_or_else(|| {
            CoordinatorError::Config(
                "re-indexing needs an index catalog (Coordinator::with_catalog)".to_owned(),
            )
        })
    }

    fn migration_spec(&self, options: &ReindexOptions) -> Result<MigrationSpec, CoordinatorError> {
        let active = self.index();
        let dimension = options
            .dimension
            .or(options.embedder.as_ref().map(|e| e.dimension()))
            .unwrap_or(active.dimension());
        let source = match &options.embedder {
            Some(embedder) => {
                if embedder.dimension() != dimension {
                    return Err(invalid(format!(
                        "the embedder {:?} makes vectors of dimension {}, not {dimension}",
                        embedder.model(),
                        embedder.dimension()
                    )));
                }
                ReindexSource::Embedder {
                    model: embedder.model().to_owned(),
                }
            }
            None => {
                if dimension != active.dimension() {
                    return Err(invalid(format!(
                        "a rebuild from the kept vectors keeps their dimension ({}); \
                         re-embed with an embedder to change it to {dimension}",
                        active.dimension()
                    )));
                }
                ReindexSource::KeptVectors
            }
        };
        if dimension == 0 {
            return Err(invalid("the dimension must be at least 1".to_owned()));
        }
        Ok(MigrationSpec {
            target: options.target.clone(),
            dimension,
            distance: options.distance.unwrap_or(active.distance()),
            source,
        })
    }

    fn reindex_lease_ms(&self) -> i64 {
        i64::try_from(self.config.reindex.lease.as_millis()).unwrap_or(i64::MAX)
    }

    /// Copies chunks until a scan and the garbage are both empty.
    async fn copy_until_caught_up(
        &self,
        target: &V,
        options: &ReindexOptions,
        run: &mut CopyRun,
        report: &mut ReindexReport,
        phase: &'static str,
        progress: ProgressFn<'_>,
    ) -> Result<(), CoordinatorError> {
        // The total, for progress only: counted once per phase, not per
        // chunk (a count is a scan of the table on a server).
        if let Ok(total) = self.total_rows().await {
            run.total = total;
        }
        let chunk = self.config.reindex.chunk.max(1);
        loop {
            let deadline = Instant::now() + self.config.call_deadline;
            let cursor = run.cursor;
            let rows = self
                .metadata_call("metadata.reindex_scan", deadline, || {
                    self.repo.reindex_scan(cursor, chunk)
                })
                .await?;
            let Chunk {
                points,
                staged,
                skipped,
            } = self.points_of(&rows, options).await?;
            report.skipped += skipped;
            let next = rows.last().map_or(cursor, |r| r.seq);
            if self.bug(Bug::ReindexCursorBeforeWrite) {
                let lease = self.clock.now_ms() + self.reindex_lease_ms();
                self.metadata_call("metadata.reindex_progress", deadline, || {
                    self.repo
                        .reindex_progress(run.owner, next, 0, &[], &[], lease)
                })
                .await?;
            }
            for c in points.chunks(self.config.limits.index_chunk.max(1)) {
                self.index_call("index.upsert", deadline, || target.upsert(c))
                    .await?;
            }
            // After the write: a point listed here may have been copied by
            // this very chunk (its row moved on while it was read).
            let garbage = self
                .metadata_call("metadata.reindex_garbage", deadline, || {
                    self.repo.reindex_garbage(chunk)
                })
                .await?;
            // A saga's restore can reference a point again: those a row
            // references now stay (the row's change moved it past the
            // cursor, so it is copied anyway); the rest go.
            let live: std::collections::HashSet<_> = if garbage.is_empty() {
                std::collections::HashSet::new()
            } else {
                self.metadata_call("metadata.rows_by_points", deadline, || {
                    self.repo.rows_by_points(&garbage)
                })
                .await?
                .into_iter()
                .map(|r| r.point_id)
                .collect()
            };
            let dead: Vec<_> = garbage
                .iter()
                .filter(|p| !live.contains(p))
                .copied()
                .collect();
            for c in dead.chunks(self.config.limits.index_chunk.max(1)) {
                self.index_call("index.delete", deadline, || target.delete(c))
                    .await?;
            }
            let copied = rows.len() as u64;
            let lease = self.clock.now_ms() + self.reindex_lease_ms();
            self.metadata_call("metadata.reindex_progress", deadline, || {
                self.repo
                    .reindex_progress(run.owner, next, copied, &garbage, &staged, lease)
            })
            .await?;
            run.cursor = next;
            report.copied += copied;
            report.garbage_deleted += dead.len() as u64;
            metrics::counter!("tandem_reindex_rows_total").increment(copied);
            emit(progress, phase, run, report);
            if rows.is_empty() && garbage.is_empty() {
                return Ok(());
            }
        }
    }

    /// The freeze, catch-up and switch rounds.
    async fn switch_to(
        &self,
        target: &V,
        options: &ReindexOptions,
        current: &str,
        run: &mut CopyRun,
        report: &mut ReindexReport,
        progress: ProgressFn<'_>,
    ) -> Result<IndexState, CoordinatorError> {
        let freeze_ms =
            i64::try_from(self.config.reindex.switch_freeze.as_millis()).unwrap_or(i64::MAX);
        let attempts = self.config.reindex.switch_attempts.max(1);
        for round in 1..=attempts {
            report.switch_rounds = round;
            let deadline = Instant::now() + self.config.call_deadline;
            let now = self.clock.now_ms();
            let fenced = self
                .metadata_call("metadata.reindex_freeze", deadline, || {
                    self.repo.reindex_freeze(run.owner, now, now + freeze_ms)
                })
                .await?;
            report.fenced += fenced;
            self.copy_until_caught_up(target, options, run, report, "catching_up", progress)
                .await?;
            let now = self.clock.now_ms();
            let outcome = self
                .metadata_call("metadata.reindex_switch", deadline, || {
                    self.repo.reindex_switch(run.owner, current, now)
                })
                .await?;
            match outcome {
                SwitchOutcome::Switched(state) => {
                    emit(progress, "switched", run, report);
                    return Ok(state);
                }
                SwitchOutcome::Behind { rows, garbage } => {
                    warn!(
                        round,
                        rows, garbage, "re-index switch found changes; catching up again"
                    );
                }
                SwitchOutcome::Deferred { entries } => {
                    self.thaw(run.owner).await;
                    return Err(CoordinatorError::ReindexBlocked(format!(
                        "{entries} deferred write(s) (waiting or dead-lettered) carry vectors of \
                         the old model; index them (tandem index-worker --until-idle) or drop \
                         the dead letters, move deferred writers to the new model, and re-run \
                         the re-index (the copy is kept)"
                    )));
                }
                SwitchOutcome::Held { intents } => {
                    self.thaw(run.owner).await;
                    return Err(CoordinatorError::ReindexBlocked(format!(
                        "{intents} saga step(s) hold commits; the switch waits for them to end \
                         (re-run the re-index later: the copy is kept)"
                    )));
                }
            }
        }
        self.thaw(run.owner).await;
        Err(CoordinatorError::ReindexBlocked(format!(
            "writes kept changing rows through {attempts} catch-up rounds \
             (re-run the re-index: the copy is kept)"
        )))
    }

    /// Ends a freeze early (best effort: it ends by itself at its deadline).
    async fn thaw(&self, owner: OwnerToken) {
        let deadline = Instant::now() + self.config.cleanup_deadline;
        let now = self.clock.now_ms();
        if let Err(e) = self
            .metadata_call("metadata.reindex_freeze", deadline, || {
                self.repo.reindex_freeze(owner, now, now)
            })
            .await
        {
            warn!(error = %e, "could not end the re-index freeze early; it ends at its deadline");
        }
    }

    /// The points to write for a chunk of changed rows, the re-embedded
    /// vectors to stage for the rows that keep one, and how many rows were
    /// skipped (deferred inserts not indexed yet).
    async fn points_of(
        &self,
        rows: &[ChangedRow],
        options: &ReindexOptions,
    ) -> Result<Chunk, CoordinatorError> {
        let indexed: Vec<&ChangedRow> = rows.iter().filter(|r| r.indexed).collect();
        let skipped = (rows.len() - indexed.len()) as u64;
        let vectors: Vec<Vec<f32>> = match &options.embedder {
            Some(embedder) => {
                let texts: Vec<String> = indexed.iter().map(|r| r.row.content.clone()).collect();
                if texts.is_empty() {
                    Vec::new()
                } else {
                    let vectors = embedder
                        .embed(&texts)
                        .await
                        .map_err(CoordinatorError::Embed)?;
                    // The port's contract, checked: a short answer would
                    // leave rows out of the target without a word.
                    if vectors.len() != texts.len() {
                        return Err(CoordinatorError::Embed(EmbedError::Protocol(
                            ProtocolViolation::WrongCount {
                                expected: texts.len(),
                                got: vectors.len(),
                            },
                        )));
                    }
                    vectors
                }
            }
            None => indexed
                .iter()
                .map(|r| {
                    r.row.vector.clone().ok_or_else(|| {
                        CoordinatorError::Config(format!(
                            "record {} has no kept vector: this store does not keep vectors, \
                             so a re-index must re-embed (pass an embedder)",
                            r.row.id
                        ))
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        // A re-embedding's vectors replace the kept ones at the switch (a
        // store that keeps none hides them: `row.vector` is `None`).
        let staged = if options.embedder.is_some() {
            indexed
                .iter()
                .zip(&vectors)
                .filter(|(r, _)| r.row.vector.is_some())
                .map(|(r, vector)| StagedVector {
                    record_id: r.row.id,
                    seq: r.seq,
                    vector: vector.clone(),
                })
                .collect()
        } else {
            Vec::new()
        };
        let now = self.clock.now_ms();
        let points = indexed
            .iter()
            .zip(vectors)
            .map(|(r, vector)| Point {
                id: r.row.point_id,
                record_id: r.row.id,
                scope: r.row.scope.clone(),
                metadata: r.row.metadata.clone(),
                vector,
                written_at_ms: now,
            })
            .collect();
        Ok(Chunk {
            points,
            staged,
            skipped,
        })
    }

    async fn total_rows(&self) -> Result<u64, CoordinatorError> {
        let deadline = Instant::now() + self.config.call_deadline;
        let by_scope = self
            .metadata_call("metadata.count_by_scope", deadline, || {
                self.repo.count_by_scope()
            })
            .await?;
        Ok(by_scope.values().sum())
    }

    /// The active collection's name (known once a catalog is set).
    fn active_name(&self) -> Result<String, CoordinatorError> {
        self.read_active().name.clone().ok_or_else(|| {
            CoordinatorError::Config(
                "re-indexing needs an index catalog (Coordinator::with_catalog)".to_owned(),
            )
        })
    }
}

/// What one chunk of changed rows writes.
struct Chunk {
    /// The rows' current points, for the target.
    points: Vec<Point>,
    /// Re-embedded vectors of rows that keep one, for the switch.
    staged: Vec<StagedVector>,
    /// Rows skipped: deferred inserts not indexed yet.
    skipped: u64,
}

/// One run's copy state.
struct CopyRun {
    owner: OwnerToken,
    cursor: u64,
    /// Rows an earlier run copied.
    copied_before: u64,
    /// Committed rows, as last counted.
    total: u64,
    started: std::time::Instant,
}

fn emit(progress: ProgressFn<'_>, phase: &'static str, run: &CopyRun, report: &ReindexReport) {
    let total = run.total;
    let secs = run.started.elapsed().as_secs_f64();
    let rate = if secs > 0.0 {
        report.copied as f64 / secs
    } else {
        0.0
    };
    let copied = run.copied_before + report.copied;
    let eta_s = (rate > 0.0 && total > copied).then(|| (total - copied) as f64 / rate);
    metrics::gauge!("tandem_reindex_copied_rows").set(copied as f64);
    metrics::gauge!("tandem_reindex_total_rows").set(total as f64);
    metrics::gauge!("tandem_reindex_rows_per_second").set(rate);
    metrics::gauge!("tandem_reindex_eta_seconds").set(eta_s.unwrap_or(0.0));
    progress(&ReindexProgress {
        phase,
        copied,
        total,
        garbage_deleted: report.garbage_deleted,
        rate,
        eta_s,
    });
}

fn invalid(message: String) -> CoordinatorError {
    CoordinatorError::Invalid(ValidationError::Reindex(message))
}
