//! `tandem demo`: Tandem doing its job end to end, in a fresh data directory.
//!
//! It ingests a generated catalog, re-embeds a share of it, deletes rejected
//! items, and meanwhile injects index failures and two simulated crashes
//! through the core's fault-injecting wrapper (`tandem_core::testkit`); then it
//! lets the leases run out, recovers, verifies, and checks every scope against
//! what the catalog says it must hold.
//!
//! Leases follow a manual clock: instead of waiting out the lease, the demo
//! moves its clock past it, exactly as a later process would find it.

mod catalog;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;
use tandem_core::testkit::clock::ManualClock;
use tandem_core::testkit::faults::{
    Call, Fault, FaultController, FaultyVectorIndex, Rule, run_until_crash,
};
use tandem_core::{
    Clock, Coordinator, CoordinatorError, DeleteSelector, Filter, MetadataRepo, NewRecord,
    RecordId, RecoveryReport, Scope, SearchQuery, SystemClock, VectorIndex, VerifyReport,
    WriteOptions,
};

use crate::ExplicitServers;
use crate::backend::{Index, Repo, Stores};
use crate::cli::{DemoArgs, GlobalArgs};
use crate::embed::hash_embedding;
use crate::error::{AppError, EXIT_OK};
use crate::output::{self, Output};
use crate::settings::{FileConfig, Settings};
use catalog::DemoRecord;

/// The catalog is written in about this many batches.
const BATCHES: usize = 12;
/// The largest batch the demo writes (large catalogs get more batches).
const MAX_BATCH: usize = 1000;
/// The ingest batches that meet an injected fault (1-based).
const TRANSIENT_BATCH: usize = 3;
const REJECTED_BATCH: usize = 6;
const CRASHED_BATCH: usize = 9;
/// The update batch whose cleanup fails.
const CLEANUP_FAILS_BATCH: usize = 2;

/// One step of the story, for `--json`.
#[derive(Serialize)]
struct Step {
    step: &'static str,
    detail: String,
}

/// Per-scope result.
#[derive(Serialize)]
struct ScopeResult {
    expected: u64,
    rows: u64,
    points: u64,
}

/// The demo's report (`--json`).
#[derive(Serialize)]
struct DemoReport {
    consistent: bool,
    data_dir: String,
    metadata_store: String,
    vector_index: String,
    records: usize,
    dimension: usize,
    batch_size: usize,
    ingest_secs: f64,
    ingest_records_per_sec: f64,
    faults_injected: usize,
    rollbacks: usize,
    crashes: usize,
    recovery: RecoveryReport,
    scopes: BTreeMap<String, ScopeResult>,
    missing_points: usize,
    orphan_points: usize,
    live_intents: usize,
    elapsed_secs: f64,
    steps: Vec<Step>,
}

/// Prints the story: on stdout for people, on stderr under `--json`.
struct Narrator {
    out: Output,
    steps: Vec<Step>,
}

impl Narrator {
    fn say(&mut self, step: &'static str, detail: String) {
        if !self.out.json {
            self.out.text(&detail);
        } else if !self.out.quiet {
            eprintln!("{detail}");
        }
        self.steps.push(Step {
            step,
            detail: detail.trim().to_owned(),
        });
    }
}

/// Runs the demo. Exit code 0 when the stores end consistent and every scope
/// holds exactly what the catalog says.
pub async fn run(
    args: DemoArgs,
    global: &GlobalArgs,
    explicit: ExplicitServers,
    out: Output,
) -> Result<u8, AppError> {
    if args.records < 500 {
        return Err(AppError::Usage(
            "demo: --records must be at least 500".into(),
        ));
    }
    let started = Instant::now();
    let (data_dir, temp) = data_dir(global)?;
    let suffix = format!("{:08x}", fastrand::u32(..));
    let mut g = global.clone();
    g.data_dir = Some(data_dir.clone());
    if !explicit.postgres {
        g.postgres_url = None;
    } else if g.postgres_schema.is_none() {
        g.postgres_schema = Some(format!("tandem_demo_{suffix}"));
    }
    if !explicit.qdrant {
        g.qdrant_url = None;
    } else if g.collection.is_none() {
        g.collection = Some(format!("tandem_demo_{suffix}"));
    }
    let settings = Settings::resolve(&g, FileConfig::default())?;
    let stores = Stores::open(&settings).await?;
    let mut n = Narrator {
        out,
        steps: Vec::new(),
    };
    n.say(
        "start",
        format!(
            "Tandem demo\n  metadata: {}\n  index:    {}",
            stores.metadata_name, stores.index_name
        ),
    );

    let result = story(&args, &settings, &stores, &mut n, started).await;
    // Close the stores (the embedded index flushes on close) before the
    // temporary directory under them is removed.
    drop(stores);
    let keep_note = match (temp, args.keep) {
        (Some(t), true) => Some(t.keep()),
        (Some(_), false) => None, // dropped: the temporary directory is removed
        (None, _) => Some(data_dir.clone()),
    };
    let mut report = result?;
    report.data_dir = keep_note
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "(temporary, removed)".into());
    report.steps = std::mem::take(&mut n.steps);
    if out.json {
        out.json(&report);
    } else if let Some(p) = keep_note {
        out.text(&format!("data directory: {}", p.display()));
    }
    if report.consistent {
        Ok(EXIT_OK)
    } else {
        Err(AppError::Inconsistent(
            "demo: the stores did not end consistent (see the table above)".into(),
        ))
    }
}

fn data_dir(global: &GlobalArgs) -> Result<(PathBuf, Option<tempfile::TempDir>), AppError> {
    match &global.data_dir {
        Some(d) => {
            let not_empty = d.exists()
                && std::fs::read_dir(d)
                    .map(|mut r| r.next().is_some())
                    .unwrap_or(true);
            if not_empty {
                return Err(AppError::Usage(format!(
                    "demo needs a fresh data directory: {} is not empty",
                    d.display()
                )));
            }
            Ok((d.clone(), None))
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("tandem-demo-")
                .tempdir()
                .map_err(|e| {
                    AppError::Failed(format!("cannot create a temporary directory: {e}"))
                })?;
            Ok((t.path().to_owned(), Some(t)))
        }
    }
}

fn records(batch: &[DemoRecord]) -> Vec<NewRecord> {
    batch.iter().map(DemoRecord::to_new).collect()
}

fn ids(batch: &[DemoRecord]) -> Vec<RecordId> {
    batch.iter().map(|r| r.id).collect()
}

fn failed(what: &str) -> AppError {
    AppError::Failed(format!("demo: {what}"))
}

/// Rows of `ids` in the metadata store and points in the index.
async fn presence(stores: &Stores, ids: &[RecordId]) -> Result<(usize, u64), AppError> {
    let rows = stores
        .repo
        .get(ids)
        .await
        .map_err(|e| stores.error("demo: reading rows", CoordinatorError::Metadata(e)))?
        .len();
    let points = stores
        .index
        .count(None)
        .await
        .map_err(|e| stores.error("demo: counting points", CoordinatorError::Index(e)))?;
    Ok((rows, points))
}

/// Whether a guarded search for each record's own vector returns none of them.
async fn invisible<M: MetadataRepo, V: VectorIndex>(
    c: &Coordinator<M, V>,
    stores: &Stores,
    batch: &[DemoRecord],
) -> Result<bool, AppError> {
    let wanted: HashSet<RecordId> = batch.iter().map(|r| r.id).collect();
    for r in batch.iter().take(3) {
        let q = SearchQuery::new(r.vector.clone(), 5).with_filter(Filter::scope(r.scope));
        let hits = c
            .search(&q)
            .await
            .map_err(|e| stores.error("demo: search", e))?;
        if hits.iter().any(|h| wanted.contains(&h.record.id)) {
            return Ok(false);
        }
    }
    Ok(true)
}

async fn story(
    args: &DemoArgs,
    settings: &Settings,
    stores: &Stores,
    n: &mut Narrator,
    started: Instant,
) -> Result<DemoReport, AppError> {
    let dim = settings.dimension;
    let config = settings.coordinator.clone();
    let clock = ManualClock::new(SystemClock.now_ms());
    let shared_clock: Arc<dyn Clock> = Arc::new(clock.clone());
    // A "process": a coordinator over the same stores, its index optionally
    // behind a fault controller.
    let process = |ctl: &FaultController| {
        Coordinator::new(
            stores.repo.clone(),
            FaultyVectorIndex::new(stores.index.clone(), ctl.clone()),
            config.clone(),
        )
        .map(|c| c.with_clock(shared_clock.clone()))
        .map_err(|e| AppError::Usage(format!("configuration: {e}")))
    };
    let clean_process = || -> Result<Coordinator<Repo, Index>, AppError> {
        Ok(stores
            .coordinator(config.clone())?
            .with_clock(shared_clock.clone()))
    };

    // 1. The catalog.
    let catalog = catalog::generate(args.records, args.seed, dim);
    let scopes = catalog::scopes();
    let batch_size = args.records.div_ceil(BATCHES).min(MAX_BATCH);
    let batches: Vec<&[DemoRecord]> = catalog.chunks(batch_size).collect();
    n.say(
        "catalog",
        format!(
            "1. generated a catalog of {} records ({} items × {} texts) in {} scopes ({}), {dim}-d hash embeddings",
            output::count(catalog.len() as u64),
            catalog.len().div_ceil(catalog::RECORDS_PER_ITEM),
            catalog::RECORDS_PER_ITEM,
            scopes.len(),
            scopes.join(", ")
        ),
    );

    // 2. Ingest, with three injected failures.
    let ctl = FaultController::new(args.seed);
    let first = process(&ctl)?;
    let mut restarted: Option<Coordinator<Repo, Index>> = None;
    let mut rollbacks = 0;
    let mut crashes = 0;
    let mut notes = Vec::new();
    let t_ingest = Instant::now();
    for (i, batch) in batches.iter().enumerate() {
        let no = i + 1;
        let key = WriteOptions::idempotent(format!("demo:ingest:{no}"));
        let upsert_err = |e| stores.error(&format!("demo: ingest batch {no}"), e);
        if let Some(c) = &restarted {
            c.upsert_with(records(batch), &key)
                .await
                .map_err(upsert_err)?;
            continue;
        }
        let next_upsert = ctl.invocations(Call::IndexUpsert);
        match no {
            TRANSIENT_BATCH => {
                ctl.add(Rule {
                    call: Call::IndexUpsert,
                    nth: next_upsert,
                    times: 2,
                    fault: Fault::FailBefore,
                });
                let r = first
                    .upsert_with(records(batch), &key)
                    .await
                    .map_err(upsert_err)?;
                notes.push(format!(
                    "   batch {no}: the index failed twice (injected, transient) → retried with backoff → {} records committed",
                    r.inserted
                ));
            }
            REJECTED_BATCH => {
                let (_, points_before) = presence(stores, &[]).await?;
                ctl.add(Rule::once(Call::IndexUpsert, next_upsert, Fault::Reject));
                match first.upsert_with(records(batch), &key).await {
                    Err(_) => {
                        let (rows, points) = presence(stores, &ids(batch)).await?;
                        if rows != 0 || points != points_before {
                            return Err(failed(&format!(
                                "batch {no} was rolled back but {rows} rows / {} points remain",
                                points.saturating_sub(points_before)
                            )));
                        }
                        rollbacks += 1;
                        notes.push(format!(
                            "   batch {no}: the index rejected the write (injected, permanent) → rolled back: none of its {} records in either store",
                            batch.len()
                        ));
                    }
                    Ok(_) => {
                        return Err(failed(
                            "the injected index rejection did not fail the batch",
                        ));
                    }
                }
                first
                    .upsert_with(records(batch), &key)
                    .await
                    .map_err(upsert_err)?;
                notes.push(format!(
                    "   batch {no}: re-sent with the same idempotency key → committed"
                ));
            }
            CRASHED_BATCH => {
                let (_, points_before) = presence(stores, &[]).await?;
                ctl.add(Rule::once(
                    Call::IndexUpsert,
                    next_upsert,
                    Fault::CrashAfter,
                ));
                if run_until_crash(&ctl, first.upsert_with(records(batch), &key))
                    .await
                    .is_some()
                {
                    return Err(failed("the injected crash did not stop the batch"));
                }
                crashes += 1;
                let second = clean_process()?;
                let (rows, points) = presence(stores, &ids(batch)).await?;
                let hidden = invisible(&second, stores, batch).await?;
                if rows != 0 || !hidden {
                    return Err(failed(&format!(
                        "after the crash in batch {no}: {rows} rows committed, hidden from search: {hidden}"
                    )));
                }
                notes.push(format!(
                    "   batch {no}: the process crashed right after the index write (injected): {} points in the index, 0 rows; search returns none of them",
                    points.saturating_sub(points_before)
                ));
                second
                    .upsert_with(records(batch), &key)
                    .await
                    .map_err(upsert_err)?;
                notes.push(format!(
                    "   restart: batch {no} re-sent with its idempotency key → committed; the crashed attempt's points wait for recovery"
                ));
                restarted = Some(second);
            }
            _ => {
                first
                    .upsert_with(records(batch), &key)
                    .await
                    .map_err(upsert_err)?;
            }
        }
    }
    let ingest_secs = t_ingest.elapsed().as_secs_f64();
    n.say(
        "ingest",
        format!(
            "2. ingested {} records in {} batches of {batch_size} in {ingest_secs:.2} s ({} records/s), through 3 injected failures:",
            output::count(catalog.len() as u64),
            batches.len(),
            output::rate(catalog.len() as u64, ingest_secs)
        ),
    );
    for note in notes.drain(..) {
        n.say("ingest", note);
    }

    // 3. Re-embed a fifth of the records; one batch's cleanup fails.
    let ctl2 = FaultController::new(args.seed.wrapping_add(1));
    let third = process(&ctl2)?;
    let revised: Vec<DemoRecord> = catalog.iter().step_by(5).map(|r| r.revised(dim)).collect();
    let mut updated = 0;
    let mut deferred = 0;
    for (i, batch) in revised.chunks(batch_size).enumerate() {
        let no = i + 1;
        if no == CLEANUP_FAILS_BATCH {
            let next = ctl2.invocations(Call::IndexDelete);
            ctl2.add(Rule::once(Call::IndexDelete, next, Fault::Reject));
        }
        let r = third
            .upsert_with(
                records(batch),
                &WriteOptions::idempotent(format!("demo:update:{no}")),
            )
            .await
            .map_err(|e| stores.error(&format!("demo: update batch {no}"), e))?;
        updated += r.updated;
        if r.deferred_cleanup > 0 {
            deferred += r.deferred_cleanup;
            notes.push(format!(
                "   update batch {no}: deleting its superseded points failed (injected) → the update stands; {} old points left to recovery (search never returns them)",
                r.deferred_cleanup
            ));
        }
    }
    n.say(
        "update",
        format!(
            "3. re-embedded {} records (a fifth): new text and vectors under new point ids, old points deleted",
            output::count(updated)
        ),
    );
    for note in notes.drain(..) {
        n.say("update", note);
    }
    if deferred == 0 {
        return Err(failed(
            "the injected cleanup failure left nothing to recovery",
        ));
    }

    // 4. Delete two rejected items by scope + metadata; the second one crashes.
    let items: Vec<&DemoRecord> = vec![&catalog[catalog.len() / 3], &catalog[catalog.len() / 2]];
    let mut deleted_items = Vec::new();
    for (k, r) in items.iter().enumerate() {
        let selector = DeleteSelector::MetadataEq {
            scope: Scope::new(r.scope),
            key: "item".into(),
            value: json!(r.item),
        };
        let of_item: Vec<DemoRecord> = catalog
            .iter()
            .filter(|x| x.item == r.item)
            .cloned()
            .collect();
        if k == 0 {
            let d = third
                .delete(selector)
                .await
                .map_err(|e| stores.error("demo: delete", e))?;
            n.say(
                "delete",
                format!(
                    "4. deleted rejected item {} (scope {}, metadata item = \"{}\"): {} records gone from both stores",
                    r.item, r.scope, r.item, d.deleted
                ),
            );
        } else {
            let next = ctl2.invocations(Call::IndexDelete);
            ctl2.add(Rule::once(Call::IndexDelete, next, Fault::CrashBefore));
            if run_until_crash(&ctl2, third.delete(selector))
                .await
                .is_some()
            {
                return Err(failed("the injected crash did not stop the delete"));
            }
            crashes += 1;
            let fourth = clean_process()?;
            let (rows, _) = presence(stores, &ids(&of_item)).await?;
            let hidden = invisible(&fourth, stores, &of_item).await?;
            if rows != 0 || !hidden {
                return Err(failed(&format!(
                    "after the crash in the delete: {rows} rows left, hidden from search: {hidden}"
                )));
            }
            n.say(
                "delete",
                format!(
                    "   deleting rejected item {}: the process crashed after the metadata commit, before the index delete (injected): its rows are gone, its points wait for recovery; search already ignores them",
                    r.item
                ),
            );
        }
        deleted_items.push((r.scope, r.item.clone(), of_item.len()));
    }

    // 5. Before recovery: verify sees the pending work; recovery waits for leases.
    let last = clean_process()?;
    let before = last
        .verify(None)
        .await
        .map_err(|e| stores.error("demo: verify", e))?;
    let early = last
        .recover()
        .await
        .map_err(|e| stores.error("demo: recover", e))?;
    n.say(
        "pending",
        format!(
            "5. before recovery: {} live intents name {} points (so they are not orphans: {} orphans, {} missing); recover now claims {} (their leases still run)",
            before.live_intents,
            output::count(before.intent_points as u64),
            before.orphan_points.len(),
            before.missing_points.len(),
            early.claimed
        ),
    );

    // 6. Later: the leases have ended; recovery applies the garbage rule.
    clock.advance(config.lease + Duration::from_secs(1));
    let recovery = last
        .recover()
        .await
        .map_err(|e| stores.error("demo: recover", e))?;
    n.say(
        "recover",
        format!(
            "6. after the {} s lease (the demo's clock skips ahead instead of waiting): recovery claimed {} intents, resolved {}, deleted {} garbage points",
            config.lease.as_secs(),
            recovery.claimed,
            recovery.resolved,
            output::count(recovery.points_deleted as u64)
        ),
    );

    // 7. Verify, and check each scope against the catalog.
    let after = last
        .verify(None)
        .await
        .map_err(|e| stores.error("demo: verify", e))?;
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for r in &catalog {
        *expected.entry(r.scope.to_owned()).or_default() += 1;
    }
    for (scope, _, count) in &deleted_items {
        if let Some(e) = expected.get_mut(*scope) {
            *e -= *count as u64;
        }
    }
    let scopes_out: BTreeMap<String, ScopeResult> = expected
        .iter()
        .map(|(s, e)| {
            let c = after
                .scopes
                .get(&Scope::new(s.clone()))
                .copied()
                .unwrap_or_default();
            (
                s.clone(),
                ScopeResult {
                    expected: *e,
                    rows: c.rows,
                    points: c.points,
                },
            )
        })
        .collect();
    let matches_catalog = scopes_out
        .values()
        .all(|s| s.expected == s.rows && s.rows == s.points)
        && after.scopes.len() == expected.len();
    let consistent = after.is_consistent() && matches_catalog;

    let search_line = example_search(&last, stores, dim).await?;
    n.say("search", format!("7. {search_line}"));

    let faults = ctl.injected().len() + ctl2.injected().len();
    let elapsed = started.elapsed().as_secs_f64();
    if !n.out.json {
        n.out.text(&summary_table(&after, &expected));
        n.out.text(&output::kv_table(vec![
            (
                "missing points (rows without vector)",
                output::count(after.missing_points.len() as u64),
            ),
            (
                "orphan points (vectors without row)",
                output::count(after.orphan_points.len() as u64),
            ),
            ("live intents", output::count(after.live_intents as u64)),
            ("faults injected", output::count(faults as u64)),
            ("batches rolled back", output::count(rollbacks as u64)),
            ("simulated crashes", output::count(crashes as u64)),
            ("intents recovered", output::count(recovery.resolved as u64)),
            (
                "ingest throughput",
                format!(
                    "{} records/s",
                    output::rate(catalog.len() as u64, ingest_secs)
                ),
            ),
            ("total time", format!("{elapsed:.2} s")),
        ]));
        n.out.text(if consistent {
            "consistent: both stores agree exactly, and every scope holds what the catalog says"
        } else {
            "NOT consistent"
        });
    }
    Ok(DemoReport {
        consistent,
        data_dir: String::new(),
        metadata_store: stores.metadata_name.clone(),
        vector_index: stores.index_name.clone(),
        records: catalog.len(),
        dimension: dim,
        batch_size,
        ingest_secs,
        ingest_records_per_sec: catalog.len() as f64 / ingest_secs.max(1e-9),
        faults_injected: faults,
        rollbacks,
        crashes,
        recovery,
        scopes: scopes_out,
        missing_points: after.missing_points.len(),
        orphan_points: after.orphan_points.len(),
        live_intents: after.live_intents,
        elapsed_secs: elapsed,
        steps: Vec::new(),
    })
}

fn summary_table(after: &VerifyReport, expected: &BTreeMap<String, u64>) -> String {
    let mut rows = Vec::new();
    let (mut te, mut tr, mut tp) = (0, 0, 0);
    for (scope, e) in expected {
        let c = after
            .scopes
            .get(&Scope::new(scope.clone()))
            .copied()
            .unwrap_or_default();
        te += e;
        tr += c.rows;
        tp += c.points;
        rows.push(vec![
            scope.clone(),
            output::count(*e),
            output::count(c.rows),
            output::count(c.points),
            if *e == c.rows && c.rows == c.points {
                "yes"
            } else {
                "NO"
            }
            .into(),
        ]);
    }
    rows.push(vec![
        "total".into(),
        output::count(te),
        output::count(tr),
        output::count(tp),
        if te == tr && tr == tp { "yes" } else { "NO" }.into(),
    ]);
    output::table(
        &[
            "scope",
            "expected",
            "rows (metadata)",
            "points (index)",
            "in sync",
        ],
        &[false, true, true, true, false],
        rows,
    )
}

async fn example_search(
    c: &Coordinator<Repo, Index>,
    stores: &Stores,
    dim: usize,
) -> Result<String, AppError> {
    let text = "jazz vinyl album";
    let Some(vector) = hash_embedding(text, dim) else {
        return Ok(String::new());
    };
    let q = SearchQuery::new(vector, 3).with_filter(Filter::scope("music"));
    let hits = c
        .search(&q)
        .await
        .map_err(|e| stores.error("demo: search", e))?;
    Ok(match hits.first() {
        Some(h) => format!(
            "search \"{text}\" in music → {} hits, best: \"{}\" (score {:.2})",
            hits.len(),
            output::truncate(&h.record.content, 50),
            h.score
        ),
        None => format!("search \"{text}\" in music → no hits"),
    })
}
