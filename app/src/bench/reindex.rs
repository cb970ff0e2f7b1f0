//! The re-indexing cases (issue 14), on stores of their own, fresh for every
//! repetition ([`Env::reindex_stores`]). Each repetition:
//!
//! 1. **ingest** — `reindex_records` new records, Tandem upsert at batch
//!    1000: the ingest path, measured;
//! 2. **rebuild** — `Coordinator::reindex` of the same records, from the
//!    vectors the metadata store keeps, into a new collection, up to and
//!    including the switch: measured, then checked (every row copied, the
//!    new collection active and holding every record's point, `verify`
//!    exact) before the old collection is dropped;
//! 3. **writes with and without a migration open** — a re-index with
//!    `ReindexOptions { switch: false }` copies every row into a third
//!    collection and leaves its migration open; then, for every batch size,
//!    Tandem upserts that update existing records (new vectors: each commit
//!    stops referencing a point, which an open migration records as
//!    garbage) and that insert new ones, each once with the migration open
//!    and once without, in alternating order. Between the two the
//!    migration is closed and opened again in the metadata store (see
//!    [`Migration`]), so both states run beside the same copied collection
//!    (a server may still be optimizing it) and differ only in the open
//!    migration. Every period it was open must have recorded one garbage
//!    point per update; at the end it is closed and its target dropped;
//! 4. `verify` of the whole stores: they must be consistent.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use tandem_core::{
    MetadataRepo, MigrationSpec, NewRecord, OwnerToken, RecordId, ReindexOptions, ReindexReport,
    VectorIndex, unix_ms,
};

use super::data;
use super::env::{Env, ReindexStores};
use super::report::{
    Case, GarbageCheck, Latency, Pass, Ratio, RebuildCheck, ReindexSummary, WriteOverhead, latency,
};
use super::run::{Job, Plan, failed, measure, pass_records, progress};
use crate::error::AppError;

/// Records per batch of the ingest path the rebuild is compared with.
pub const INGEST_BATCH: usize = 1000;

/// The writes measured with and without a migration open.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Write {
    /// Existing records, new vectors (their rows are repointed).
    Update,
    /// New records.
    Insert,
}

impl Write {
    const ALL: [Write; 2] = [Write::Update, Write::Insert];

    fn name(self) -> &'static str {
        match self {
            Write::Update => "update",
            Write::Insert => "insert",
        }
    }

    fn operation(self) -> &'static str {
        match self {
            Write::Update => "write_update",
            Write::Insert => "write_insert",
        }
    }
}

/// Whether a migration is open while the writes run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum State {
    NoMigration,
    MigrationOpen,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::NoMigration => "no-migration",
            State::MigrationOpen => "migration-open",
        }
    }
}

/// The migration the writes run beside: opened by a re-index that copied
/// and did not switch, then closed and opened again in the metadata store
/// (`reindex_abort`, `reindex_begin` with the same spec: the state a
/// `switch: false` run leaves, without copying the same rows again), so
/// that the two states alternate pass by pass.
struct Migration {
    spec: MigrationSpec,
    open: bool,
    /// Records updated since it was last opened.
    updated: u64,
}

impl Migration {
    /// The migration a re-index just left open.
    async fn open(rx: &ReindexStores) -> Result<Self, AppError> {
        let state = rx
            .tandem
            .repo()
            .index_state()
            .await
            .map_err(|e| failed("reading the index state", e))?;
        let spec = state
            .migration
            .ok_or_else(|| failed("opening a migration", "the re-index left none open"))?
            .spec;
        Ok(Self {
            spec,
            open: true,
            updated: 0,
        })
    }

    /// Opens or closes it; on closing, the garbage it recorded since it was
    /// opened (the close forgets it).
    async fn set(
        &mut self,
        rx: &ReindexStores,
        state: State,
        env: &Env,
    ) -> Result<Option<GarbageCheck>, AppError> {
        let want = state == State::MigrationOpen;
        if want == self.open {
            return Ok(None);
        }
        let repo = rx.tandem.repo();
        let mut check = None;
        if self.open {
            let recorded = repo
                .reindex_garbage(usize::try_from(self.updated).unwrap_or(usize::MAX) + 1)
                .await
                .map_err(|e| failed("reading the migration's garbage", e))?
                .len() as u64;
            check = Some(GarbageCheck {
                updated_while_open: self.updated,
                garbage_recorded: recorded,
            });
            repo.reindex_abort(None)
                .await
                .map_err(|e| failed("closing the migration", e))?;
        } else {
            let now = unix_ms(std::time::SystemTime::now());
            let lease = i64::try_from(env.config.reindex.lease.as_millis()).unwrap_or(i64::MAX);
            repo.reindex_begin(
                &self.spec,
                OwnerToken::new_random(),
                now,
                now.saturating_add(lease),
            )
            .await
            .map_err(|e| failed("opening the migration again", e))?;
        }
        self.open = want;
        self.updated = 0;
        Ok(check)
    }
}

/// The order of the writes at the `i`-th batch size of repetition `rep`:
/// which kind goes first alternates by batch size and repetition.
fn kinds(rep: usize, i: usize) -> [Write; 2] {
    if (rep + i).is_multiple_of(2) {
        Write::ALL
    } else {
        [Write::Insert, Write::Update]
    }
}

/// The order of the two states for one kind of write at the `i`-th batch
/// size of repetition `rep`: it alternates by repetition (and differs
/// between the kinds and between neighbouring batch sizes), so that neither
/// state always runs first.
fn states(rep: usize, i: usize, write: Write) -> [State; 2] {
    if (rep + i + write as usize).is_multiple_of(2) {
        [State::NoMigration, State::MigrationOpen]
    } else {
        [State::MigrationOpen, State::NoMigration]
    }
}

/// Tandem upserts of `batches` on `rx`'s stores, measured.
async fn upserts(
    env: &Env,
    rx: &Arc<ReindexStores>,
    batches: Vec<Vec<NewRecord>>,
    concurrency: usize,
) -> Result<Pass, AppError> {
    let r = rx.clone();
    let job: Job<Vec<NewRecord>> = Arc::new(move |_, batch| {
        let rx = r.clone();
        Box::pin(async move {
            let n = batch.len() as u64;
            rx.tandem
                .upsert(batch)
                .await
                .map_err(|e| failed("tandem upsert", e))?;
            Ok(n)
        })
    });
    measure(env, &rx.counters, batches, concurrency, job).await
}

/// The rebuild into `target`, to the switch, measured (one call).
async fn rebuild(
    env: &Env,
    rx: &Arc<ReindexStores>,
    target: String,
) -> Result<(Pass, ReindexReport), AppError> {
    let done = Arc::new(Mutex::new(None));
    let (r, d) = (rx.clone(), done.clone());
    let job: Job<()> = Arc::new(move |_, ()| {
        let (rx, done, target) = (r.clone(), d.clone(), target.clone());
        Box::pin(async move {
            let report = rx
                .tandem
                .reindex(&ReindexOptions::to(target), &|_| {})
                .await
                .map_err(|e| failed("re-index", e))?;
            let copied = report.copied;
            *done.lock().unwrap_or_else(PoisonError::into_inner) = Some(report);
            Ok(copied)
        })
    });
    let pass = measure(env, &rx.counters, vec![()], 1, job).await?;
    let report = done
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take()
        .ok_or_else(|| failed("re-index", "no report"))?;
    Ok((pass, report))
}

/// What the stores hold after a rebuild into `target`.
async fn check_rebuild(
    rx: &ReindexStores,
    report: &ReindexReport,
    target: &str,
) -> Result<RebuildCheck, AppError> {
    let state = rx
        .tandem
        .refresh_index()
        .await
        .map_err(|e| failed("reading the index state", e))?;
    let active = rx.tandem.index();
    let points = if state.active.as_deref() == Some(target) {
        active
            .count(None)
            .await
            .map_err(|e| failed("counting the new collection", e))?
    } else {
        0
    };
    let verify = rx
        .tandem
        .verify(None)
        .await
        .map_err(|e| failed("verify after the rebuild", e))?;
    Ok(RebuildCheck {
        copied: report.copied,
        switched: report.switched && state.active.as_deref() == Some(target),
        switch_rounds: report.switch_rounds,
        seconds: report.elapsed_s,
        points_in_new_collection: points,
        rows: verify.scopes.values().map(|c| c.rows).sum(),
        missing_points: verify.missing_points.len() as u64,
        orphan_points: verify.orphan_points.len() as u64,
    })
}

/// `batches` with the ids of `ids`, in order (the records they update).
fn with_ids(batches: Vec<Vec<NewRecord>>, ids: &[RecordId]) -> Vec<Vec<NewRecord>> {
    let mut ids = ids.iter().copied();
    batches
        .into_iter()
        .map(|batch| {
            batch
                .into_iter()
                .map(|mut r| {
                    r.id = ids.next();
                    r
                })
                .collect()
        })
        .collect()
}

/// Every re-indexing case of one run: the cases' rows and the summary.
pub async fn cases(
    env: &Arc<Env>,
    plan: &Plan,
    label: &str,
    dim: usize,
) -> Result<(Vec<Case>, ReindexSummary), AppError> {
    let n = plan.reindex_records;
    let ingest_batch = INGEST_BATCH.min(n);
    let chunk = env.config.reindex.chunk.max(1);
    let mut ingests = Vec::new();
    let mut rebuilds = Vec::new();
    let mut checks = Vec::new();
    let mut garbage = Vec::new();
    let mut copies = Vec::new();
    let mut writes: BTreeMap<(Write, usize, State), Vec<Pass>> = BTreeMap::new();
    let mut consistent = true;
    for rep in 0..plan.repeat {
        let rx = Arc::new(env.reindex_stores().await?);
        let seed = plan.seed ^ ((dim as u64) << 32) ^ 0x7e1d_0000 ^ rep as u64;

        // 1. The ingest path.
        let data = data::batches(n, ingest_batch, dim, plan.scopes, seed);
        let ids: Vec<RecordId> = data.iter().flatten().filter_map(|r| r.id).collect();
        let pass = upserts(env, &rx, data, plan.concurrency).await?;
        progress(
            plan,
            label,
            &format!("reindex ingest b={ingest_batch} rep {}", rep + 1),
            &pass,
            "rec/s",
        );
        ingests.push(pass);

        // 2. The rebuild, from the kept vectors, to the switch.
        let target = rx.collection("v1");
        let (pass, report) = rebuild(env, &rx, target.clone()).await?;
        progress(
            plan,
            label,
            &format!("reindex rebuild chunk={chunk} rep {}", rep + 1),
            &pass,
            "rec/s",
        );
        rebuilds.push(pass);
        let check = check_rebuild(&rx, &report, &target).await?;
        let n64 = n as u64;
        let rebuilt = check.switched
            && check.copied == n64
            && check.points_in_new_collection == n64
            && check.rows == n64
            && check.missing_points == 0
            && check.orphan_points == 0;
        if !rebuilt && !plan.quiet {
            eprintln!("[{label}] reindex rebuild rep {}: {check:?}", rep + 1);
        }
        consistent &= rebuilt;
        checks.push(check);
        rx.tandem
            .drop_retired()
            .await
            .map_err(|e| failed("dropping the old collection", e))?;

        // 3. Writes with and without a migration open, interleaved, beside
        // the same copy.
        let target = rx.collection("open");
        let options = ReindexOptions {
            switch: false,
            ..ReindexOptions::to(target.clone())
        };
        let copy = rx
            .tandem
            .reindex(&options, &|_| {})
            .await
            .map_err(|e| failed("opening a migration", e))?;
        copies.push(copy.copied);
        let mut migration = Migration::open(&rx).await?;
        for (i, &b) in plan.batch_sizes.iter().enumerate() {
            let m = pass_records(plan.records.min(n), b, plan.max_batches);
            for write in kinds(rep, i) {
                let order = states(rep, i, write);
                for state in order {
                    if let Some(g) = migration.set(&rx, state, env).await? {
                        consistent &= g.garbage_recorded == g.updated_while_open;
                        garbage.push(g);
                    }
                    let seed = seed ^ ((b as u64) << 8) ^ ((write as u64) << 20);
                    let seed = seed ^ ((state as u64) << 21);
                    let fresh = data::batches(m, b, dim, plan.scopes, seed);
                    let batches = match write {
                        Write::Update => with_ids(fresh, &ids[..m]),
                        Write::Insert => fresh,
                    };
                    let pass = upserts(env, &rx, batches, plan.concurrency).await?;
                    progress(
                        plan,
                        label,
                        &format!(
                            "{} b={b} rep {} {}",
                            write.operation(),
                            rep + 1,
                            state.name()
                        ),
                        &pass,
                        "rec/s",
                    );
                    if write == Write::Update && state == State::MigrationOpen {
                        migration.updated += pass.items;
                    }
                    writes.entry((write, b, state)).or_default().push(pass);
                }
            }
        }
        // Closed (its garbage counted) and its target dropped.
        if let Some(g) = migration.set(&rx, State::NoMigration, env).await? {
            consistent &= g.garbage_recorded == g.updated_while_open;
            garbage.push(g);
        }
        rx.drop_collection(&target).await?;

        // 4. The stores agree after all of it.
        let verify = rx
            .tandem
            .verify(None)
            .await
            .map_err(|e| failed("verify of the re-index stores", e))?;
        if !verify.is_consistent() && !plan.quiet {
            eprintln!(
                "[{label}] reindex rep {}: verify found {} missing, {} orphans, {} live intents",
                rep + 1,
                verify.missing_points.len(),
                verify.orphan_points.len(),
                verify.live_intents
            );
        }
        consistent &= verify.is_consistent();
        rx.cleanup().await?;
    }

    let tp = |p: &[Pass]| p.iter().map(Pass::throughput).collect::<Vec<f64>>();
    let mut cases = vec![
        Case::from_passes(
            "reindex_ingest",
            "tandem",
            Some(ingest_batch),
            "rec/s",
            &ingests,
        ),
        Case::from_passes(
            "reindex_rebuild",
            "kept-vectors",
            Some(chunk),
            "rec/s",
            &rebuilds,
        ),
    ];
    let mut overheads = Vec::new();
    let per_pass = |passes: &[Pass], q: fn(&Latency) -> f64| -> Vec<f64> {
        passes
            .iter()
            .map(|p| q(&latency(p.latencies_us.iter().copied())))
            .collect()
    };
    let all = |passes: &[Pass]| latency(passes.iter().flat_map(|p| p.latencies_us.iter().copied()));
    for write in Write::ALL {
        for &b in &plan.batch_sizes {
            let none = writes
                .get(&(write, b, State::NoMigration))
                .map_or(&[][..], Vec::as_slice);
            let open = writes
                .get(&(write, b, State::MigrationOpen))
                .map_or(&[][..], Vec::as_slice);
            if overheads
                .iter()
                .any(|o: &WriteOverhead| o.write == write.name() && o.batch_size == b)
            {
                continue; // a batch size listed twice
            }
            for (state, passes) in [(State::NoMigration, none), (State::MigrationOpen, open)] {
                cases.push(Case::from_passes(
                    write.operation(),
                    state.name(),
                    Some(b),
                    "rec/s",
                    passes,
                ));
            }
            overheads.push(WriteOverhead {
                write: write.name(),
                batch_size: b,
                no_migration_ms: all(none),
                migration_open_ms: all(open),
                p50_ratio: Ratio::pairwise(&per_pass(open, |l| l.p50), &per_pass(none, |l| l.p50)),
                p99_ratio: Ratio::pairwise(&per_pass(open, |l| l.p99), &per_pass(none, |l| l.p99)),
                throughput_ratio: Ratio::pairwise(&tp(open), &tp(none)),
            });
        }
    }
    let summary = ReindexSummary {
        records: n as u64,
        ingest_batch,
        chunk,
        index_chunk: env.config.limits.index_chunk,
        rebuild_records_per_s: Ratio::spread(&tp(&rebuilds)),
        ingest_records_per_s: Ratio::spread(&tp(&ingests)),
        rebuild_vs_ingest: Ratio::pairwise(&tp(&rebuilds), &tp(&ingests)),
        rebuilds: checks,
        writes: overheads,
        migration_copies: copies,
        garbage,
        consistent,
    };
    Ok((cases, summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_write_alternates_which_state_goes_first() {
        for i in 0..3 {
            for write in Write::ALL {
                let firsts: Vec<State> = (0..4).map(|rep| states(rep, i, write)[0]).collect();
                assert_ne!(firsts[0], firsts[1], "batch #{i} {write:?}");
                assert_eq!(firsts[0], firsts[2], "batch #{i} {write:?}");
                assert_ne!(firsts[2], firsts[3], "batch #{i} {write:?}");
            }
            // In one repetition the two kinds start from different states.
            assert_ne!(
                states(0, i, Write::Update)[0],
                states(0, i, Write::Insert)[0]
            );
            for rep in 0..4 {
                let k = kinds(rep, i);
                assert_ne!(k[0], k[1]);
                assert_ne!(kinds(rep, i)[0], kinds(rep + 1, i)[0]);
            }
        }
    }

    #[test]
    fn updates_take_the_ingested_ids_in_order() {
        let ids: Vec<RecordId> = (0..5).map(|_| RecordId::new_v7()).collect();
        let batches = with_ids(data::batches(5, 2, 4, 2, 1), &ids);
        let got: Vec<RecordId> = batches.iter().flatten().filter_map(|r| r.id).collect();
        assert_eq!(got, ids);
        assert_eq!(batches.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
        // The same scopes as the ingest gave those records.
        assert_eq!(batches[1][0].scope.as_str(), data::scope_name(2, 2));
    }
}
