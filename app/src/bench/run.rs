//! One run: every case against one set of stores, protocols interleaved and
//! repeated so that machine drift affects each alike.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::LocalBoxFuture;
use tandem_core::{
    DeleteSelector, Filter, IndexQuery, IntentId, IntentKind, MetadataRepo, NewIntent, NewRecord,
    OwnerToken, Point, PointId, RecordId, Scope, SearchQuery, VectorIndex,
};

use super::counting::{Calls, Counters, Profile, profile_since};
use super::data;
use super::env::Env;
use super::protocols::{self, Protocol};
use super::report::{Case, Pass, Ratio, Run, Target};
use super::{CaseGroup, rss};
use crate::error::AppError;

/// What every run measures.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Records per upsert pass (capped by `max_batches`).
    pub records: usize,
    /// Most batches per pass, so small batches finish in reasonable time.
    pub max_batches: usize,
    /// Batch sizes.
    pub batch_sizes: Vec<usize>,
    /// Parallel workers.
    pub concurrency: usize,
    /// Repetitions of every pass.
    pub repeat: usize,
    /// Search queries per search case.
    pub queries: usize,
    /// Expired intents in the recovery backlog.
    pub backlog: usize,
    /// Points each backlog intent names.
    pub backlog_points: usize,
    /// Scopes the records are spread over.
    pub scopes: usize,
    /// Rows keep their vectors.
    pub keep_vectors: bool,
    /// Seed of the generated data.
    pub seed: u64,
    /// No progress lines.
    pub quiet: bool,
    /// The groups of cases to run (sorted, no duplicates).
    pub cases: Vec<CaseGroup>,
    /// Re-indexing: records ingested before each rebuild.
    pub reindex_records: usize,
}

impl Plan {
    /// Whether the group `g` runs.
    pub fn runs(&self, g: CaseGroup) -> bool {
        self.cases.contains(&g)
    }
}

/// Search depth.
const K: usize = 10;

pub(super) fn failed(what: &str, e: impl std::fmt::Display) -> AppError {
    AppError::Failed(format!("bench: {what}: {e}"))
}

/// Records in one pass of batch size `b`: at most `max_batches` batches.
pub fn pass_records(records: usize, b: usize, max_batches: usize) -> usize {
    let b = b.max(1);
    let n = records.min(b.saturating_mul(max_batches.max(1)));
    (n / b).max(1) * b
}

/// Counters, wire turns and the time profile at one instant.
type Snapshot = (Calls, Option<u64>, Option<u64>, Profile);

fn snapshot(env: &Env, counters: &Counters) -> Snapshot {
    (
        counters.read(),
        env.metadata_wire.as_ref().map(|s| s.turns()),
        env.index_wire.as_ref().map(|s| s.turns()),
        counters.profile(),
    )
}

fn fill(pass: &mut Pass, env: &Env, counters: &Counters, before: Snapshot) {
    let (calls, mw, iw, _) = snapshot(env, counters);
    pass.calls = calls.since(before.0);
    pass.profile = profile_since(&counters.profile(), &before.3);
    pass.metadata_wire = mw.zip(before.1).map(|(a, b)| a - b);
    pass.index_wire = iw.zip(before.2).map(|(a, b)| a - b);
}

/// One call of a pass. The futures are not `Send`: rustc cannot prove the
/// coordinator's futures `Send` (see `docs/performance.md`), so the workers
/// run as concurrent futures of one task rather than spawned tasks; the
/// drivers' connection tasks and blocking calls still run on other threads.
pub(super) type Job<T> = Arc<dyn Fn(usize, T) -> LocalBoxFuture<'static, Result<u64, AppError>>>;

/// Runs `jobs` on `concurrency` workers, timing each job and the whole pass.
pub(super) async fn measure<T: 'static>(
    env: &Env,
    counters: &Counters,
    jobs: Vec<T>,
    concurrency: usize,
    f: Job<T>,
) -> Result<Pass, AppError> {
    let before = snapshot(env, counters);
    rss::reset_peak();
    let workers = concurrency.min(jobs.len()).max(1);
    let queue = std::rc::Rc::new(std::cell::RefCell::new(
        jobs.into_iter().collect::<VecDeque<T>>(),
    ));
    let start = Instant::now();
    let worker = |w: usize| {
        let (queue, f) = (queue.clone(), f.clone());
        async move {
            let mut latencies = Vec::new();
            let mut items = 0u64;
            loop {
                let job = queue.borrow_mut().pop_front();
                let Some(job) = job else { break };
                let t = Instant::now();
                match f(w, job).await {
                    Ok(n) => items += n,
                    Err(e) => {
                        // Stop the other workers too.
                        queue.borrow_mut().clear();
                        return Err(e);
                    }
                }
                latencies.push(t.elapsed().as_micros() as u64);
            }
            Ok::<_, AppError>((latencies, items))
        }
    };
    let results = futures::future::join_all((0..workers).map(worker)).await;
    let mut pass = Pass::default();
    for done in results {
        let (latencies, items) = done?;
        pass.batches += latencies.len() as u64;
        pass.latencies_us.extend(latencies);
        pass.items += items;
    }
    pass.seconds = start.elapsed().as_secs_f64();
    pass.peak_rss = rss::peak();
    fill(&mut pass, env, counters, before);
    Ok(pass)
}

/// The counters a protocol's calls count in.
fn counters_of(env: &Env, proto: Protocol) -> Arc<Counters> {
    match proto {
        Protocol::Raw | Protocol::RawInsert => env.raw.counters.clone(),
        Protocol::RawOverlapped => env.raw_overlapped.counters.clone(),
        Protocol::Naive => env.naive.counters.clone(),
        Protocol::Tandem | Protocol::Deferred => env.tandem_counters.clone(),
    }
}

/// One upsert call of `proto` on worker `w`'s session; returns the records
/// written.
async fn upsert_call(
    env: &Env,
    proto: Protocol,
    w: usize,
    batch: Vec<NewRecord>,
    keep: bool,
) -> Result<u64, AppError> {
    let n = batch.len() as u64;
    match proto {
        Protocol::Raw => {
            let mut s = env.raw.sessions[w].lock().await;
            protocols::raw_upsert(&mut **s, &env.raw.index, &batch, keep).await?;
        }
        Protocol::RawOverlapped => {
            let b = &env.raw_overlapped;
            let mut s = b.sessions[w].lock().await;
            protocols::raw_overlapped_upsert(&mut **s, &b.index, &batch, keep).await?;
        }
        Protocol::Naive => {
            let mut s = env.naive.sessions[w].lock().await;
            protocols::naive_upsert(&mut **s, &env.naive.index, &batch, keep).await?;
        }
        Protocol::Tandem => {
            env.tandem
                .upsert(batch)
                .await
                .map_err(|e| failed("tandem upsert", e))?;
        }
        Protocol::RawInsert => {
            let mut s = env.raw.sessions[w].lock().await;
            protocols::raw_insert(&mut **s, &batch, keep).await?;
        }
        Protocol::Deferred => {
            env.tandem
                .upsert_with(batch, &tandem_core::WriteOptions::deferred())
                .await
                .map_err(|e| failed("deferred upsert", e))?;
        }
    }
    Ok(n)
}

/// A pass of one dual write (`Protocol::DUAL`) over `batches`.
async fn upsert_pass(
    env: &Arc<Env>,
    proto: Protocol,
    batches: Vec<Vec<NewRecord>>,
    plan: &Plan,
) -> Result<Pass, AppError> {
    let keep = plan.keep_vectors;
    let e = env.clone();
    let job: Job<Vec<NewRecord>> = Arc::new(move |w, batch| {
        let env = e.clone();
        Box::pin(async move { upsert_call(&env, proto, w, batch, keep).await })
    });
    measure(
        env,
        &counters_of(env, proto),
        batches,
        plan.concurrency,
        job,
    )
    .await
}

/// The raw insert and the deferred write, one batch of each in turn (which
/// goes first alternates), each batch under fresh ids (the raw insert in
/// raw's table, the deferred write in Tandem's stores, over neither
/// protocol's rows), one call at a time.
///
/// The two are compared by their p50 (issue 13's target): as two passes one
/// after the other they met different moments of the machine — a
/// checkpoint of the previous pass's WAL, the index server's optimizer
/// after an upsert pass — and their ratio moved by a quarter between runs
/// of the same binary. Paired call by call, such drift hits both alike.
/// The calls run one at a time, so each call's wire turns are its own.
async fn paired_insert_pass(
    env: &Arc<Env>,
    batches: Vec<Vec<NewRecord>>,
    plan: &Plan,
) -> Result<(Pass, Pass), AppError> {
    const PAIR: [Protocol; 2] = [Protocol::RawInsert, Protocol::Deferred];
    let before = PAIR.map(|p| snapshot(env, &counters_of(env, p)));
    rss::reset_peak();
    let mut passes = [Pass::default(), Pass::default()];
    for (i, batch) in batches.into_iter().enumerate() {
        for k in [i % 2, 1 - i % 2] {
            let batch = protocols::with_fresh_ids(batch.clone());
            let wire = snapshot(env, &env.raw.counters);
            let t = Instant::now();
            let n = upsert_call(env, PAIR[k], 0, batch, plan.keep_vectors).await?;
            let took = t.elapsed();
            let after = snapshot(env, &env.raw.counters);
            let pass = &mut passes[k];
            pass.latencies_us.push(took.as_micros() as u64);
            pass.seconds += took.as_secs_f64();
            pass.batches += 1;
            pass.items += n;
            let add = |sum: Option<u64>, now: Option<u64>, then: Option<u64>| {
                now.zip(then).map(|(a, b)| sum.unwrap_or(0) + (a - b))
            };
            pass.metadata_wire = add(pass.metadata_wire, after.1, wire.1);
            pass.index_wire = add(pass.index_wire, after.2, wire.2);
        }
    }
    for ((pass, proto), before) in passes.iter_mut().zip(PAIR).zip(before) {
        pass.peak_rss = rss::peak();
        let wire = (pass.metadata_wire, pass.index_wire);
        fill(pass, env, &counters_of(env, proto), before);
        (pass.metadata_wire, pass.index_wire) = wire;
    }
    let [raw_insert, deferred] = passes;
    Ok((raw_insert, deferred))
}

/// One index worker draining the backlog a deferred pass left (records
/// indexed per second, its recovery included).
async fn drain_pass(env: &Arc<Env>) -> Result<Pass, AppError> {
    let e = env.clone();
    let job: Job<()> = Arc::new(move |_, ()| {
        let env = e.clone();
        Box::pin(async move {
            let report = env
                .tandem
                .index_until_idle(Duration::from_secs(600))
                .await
                .map_err(|e| failed("index drain", e))?;
            if report.failed > 0 || report.dead_lettered > 0 {
                return Err(failed("index drain", format!("{report:?}")));
            }
            Ok(report.indexed as u64)
        })
    });
    measure(env, &env.tandem_counters, vec![()], 1, job).await
}

/// The index's lag under a steady write load: one writer issues deferred
/// batches back to back while one index worker runs; every 20 ms the age of
/// the oldest waiting entry is sampled. The pass's "latencies" are those lag
/// samples, its items the records written, its time until the worker had
/// drained everything.
async fn lag_pass(env: &Arc<Env>, batches: Vec<Vec<NewRecord>>) -> Result<Pass, AppError> {
    let before = snapshot(env, &env.tandem_counters);
    rss::reset_peak();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let writing = std::cell::Cell::new(true);
    let start = Instant::now();
    let mut items = 0u64;
    let mut lags = Vec::new();
    let writer = async {
        let opts = tandem_core::WriteOptions::deferred();
        for batch in batches {
            let batch = protocols::with_fresh_ids(batch);
            items += batch.len() as u64;
            env.tandem
                .upsert_with(batch, &opts)
                .await
                .map_err(|e| failed("deferred upsert", e))?;
        }
        writing.set(false);
        Ok::<_, AppError>(())
    };
    let sampler = async {
        loop {
            let stats = env
                .tandem
                .pending_stats()
                .await
                .map_err(|e| failed("pending stats", e))?;
            let now = tandem_core::unix_ms(std::time::SystemTime::now());
            let lag_ms = stats.oldest_enqueued_ms.map_or(0, |t| (now - t).max(0));
            lags.push((lag_ms as u64).saturating_mul(1000));
            if !writing.get() && stats.pending == 0 {
                let _ = stop_tx.send(true);
                return Ok::<_, AppError>(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let worker = async {
        let mut stop = stop_rx.clone();
        env.tandem
            .run_index_worker(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
            .map_err(|e| failed("index worker", e))
    };
    let (written, sampled, worked) = futures::join!(writer, sampler, worker);
    written?;
    sampled?;
    worked?;
    // The deferred writes' intents (handed over at commit) are resolved by
    // the worker's recovery passes; the last of them may not have run yet.
    env.tandem
        .recover()
        .await
        .map_err(|e| failed("recovery after the lag pass", e))?;
    let mut pass = Pass {
        items,
        batches: lags.len() as u64,
        seconds: start.elapsed().as_secs_f64(),
        latencies_us: lags,
        ..Pass::default()
    };
    pass.peak_rss = rss::peak();
    fill(&mut pass, env, &env.tandem_counters, before);
    Ok(pass)
}

pub(super) fn progress(plan: &Plan, label: &str, what: &str, pass: &Pass, unit: &str) {
    if !plan.quiet {
        eprintln!(
            "[{label}] {what}: {} {unit} ({} calls, {:.2} s)",
            crate::output::count(pass.throughput().round() as u64),
            pass.batches,
            pass.seconds
        );
    }
}

/// Identifies a run in progress lines.
pub struct RunLabel {
    /// `embedded` or `servers`.
    pub backend: &'static str,
    /// One-way added latency.
    pub latency: Duration,
    /// Vector dimension.
    pub dim: usize,
}

/// Every case of one run.
pub async fn run(env: Arc<Env>, plan: &Plan, label: RunLabel) -> Result<Run, AppError> {
    let started = Instant::now();
    let name = format!(
        "{} +{}ms d{}",
        label.backend,
        label.latency.as_secs_f64() * 1e3,
        label.dim
    );
    let mut cases = Vec::new();
    let mut tandem_ids: BTreeMap<usize, Vec<Vec<RecordId>>> = BTreeMap::new();

    // 1. Upserts: raw, raw-overlapped, naive and tandem on the same records,
    // interleaved.
    for &b in plan
        .batch_sizes
        .iter()
        .filter(|_| plan.runs(CaseGroup::Upsert))
    {
        let n = pass_records(plan.records, b, plan.max_batches);
        let mut passes: BTreeMap<Protocol, Vec<Pass>> = BTreeMap::new();
        let mut drains: Vec<Pass> = Vec::new();
        for rep in 0..plan.repeat {
            let seed = plan.seed ^ ((label.dim as u64) << 32) ^ ((b as u64) << 8) ^ rep as u64;
            let data = data::batches(n, b, label.dim, plan.scopes, seed);
            // The dual writes rotate; the raw insert and the deferred write
            // run paired, call by call, in the rotation's fifth place.
            for k in 0..=Protocol::DUAL.len() {
                let slot = (k + rep) % (Protocol::DUAL.len() + 1);
                let done = match Protocol::DUAL.get(slot) {
                    Some(&proto) => {
                        vec![(proto, upsert_pass(&env, proto, data.clone(), plan).await?)]
                    }
                    None => {
                        let (raw_insert, deferred) =
                            paired_insert_pass(&env, data.clone(), plan).await?;
                        vec![
                            (Protocol::RawInsert, raw_insert),
                            (Protocol::Deferred, deferred),
                        ]
                    }
                };
                for (proto, pass) in done {
                    progress(
                        plan,
                        &name,
                        &format!("upsert b={b} rep {} {}", rep + 1, proto.name()),
                        &pass,
                        "rec/s",
                    );
                    passes.entry(proto).or_default().push(pass);
                    if proto == Protocol::Deferred {
                        // The index workers bring the deferred writes' backlog in.
                        let drain = drain_pass(&env).await?;
                        progress(
                            plan,
                            &name,
                            &format!("index drain b={b} rep {}", rep + 1),
                            &drain,
                            "rec/s",
                        );
                        drains.push(drain);
                    }
                }
            }
            tandem_ids
                .entry(b)
                .or_default()
                .push(data.iter().flatten().filter_map(|r| r.id).collect());
        }
        let tp = |p: Protocol| -> Vec<f64> { passes[&p].iter().map(Pass::throughput).collect() };
        for proto in Protocol::ALL {
            let mut c =
                Case::from_passes("upsert", proto.name(), Some(b), "rec/s", &passes[&proto]);
            if proto != Protocol::Raw {
                c.vs_raw = Ratio::pairwise(&tp(proto), &tp(Protocol::Raw));
            }
            if proto != Protocol::RawOverlapped {
                c.vs_raw_overlapped = Ratio::pairwise(&tp(proto), &tp(Protocol::RawOverlapped));
            }
            if proto != Protocol::Naive {
                c.vs_naive = Ratio::pairwise(&tp(proto), &tp(Protocol::Naive));
            }
            cases.push(c);
        }
        cases.push(Case::from_passes(
            "index_drain",
            "workers",
            Some(b),
            "rec/s",
            &drains,
        ));
        // The lag under a steady deferred write load, at the largest batch.
        if Some(&b) == plan.batch_sizes.iter().max() {
            let mut lags = Vec::new();
            for rep in 0..plan.repeat {
                let seed = plan.seed ^ ((label.dim as u64) << 32) ^ ((b as u64) << 8) ^ 0x1a6;
                let data = data::batches(n, b, label.dim, plan.scopes, seed ^ rep as u64);
                let pass = lag_pass(&env, data).await?;
                progress(
                    plan,
                    &name,
                    &format!("index lag b={b} rep {}", rep + 1),
                    &pass,
                    "rec/s",
                );
                lags.push(pass);
            }
            cases.push(Case::from_passes(
                "index_lag",
                "workers",
                Some(b),
                "rec/s",
                &lags,
            ));
        }
    }

    // 2. Guarded search vs raw index search, without and with a scope filter.
    let searches = if plan.runs(CaseGroup::Search) {
        vec![
            ("search", Filter::none()),
            (
                "search_scope",
                Filter::scope(data::scope_name(3, plan.scopes)),
            ),
        ]
    } else {
        Vec::new()
    };
    for (op, filter) in searches {
        let (index, guarded) = search_case(&env, plan, label.dim, op, filter).await?;
        cases.push(index);
        cases.push(guarded);
    }

    // 3. Verify of a whole scope.
    let scope = Scope::new(data::scope_name(plan.scopes.saturating_sub(1), plan.scopes));
    let mut passes = Vec::new();
    for _ in 0..plan.repeat {
        if !plan.runs(CaseGroup::Verify) {
            break;
        }
        let e = env.clone();
        let s = scope.clone();
        let job: Job<()> = Arc::new(move |_, ()| {
            let (env, scope) = (e.clone(), s.clone());
            Box::pin(async move {
                let report = env
                    .tandem
                    .verify(Some(&scope))
                    .await
                    .map_err(|e| failed("verify", e))?;
                if !report.is_consistent() {
                    return Err(AppError::Inconsistent(format!(
                        "bench: verify of scope {scope} found the stores inconsistent: \
                         {} missing, {} orphans, {} live intents, {} waiting to be indexed, \
                         counts {:?}",
                        report.missing_points.len(),
                        report.orphan_points.len(),
                        report.live_intents,
                        report.pending_index,
                        report.scopes
                    )));
                }
                Ok(report.scopes.get(&scope).map_or(0, |c| c.rows))
            })
        });
        let pass = measure(&env, &env.tandem_counters, vec![()], 1, job).await?;
        progress(plan, &name, "verify scope", &pass, "rows/s");
        passes.push(pass);
    }
    if !passes.is_empty() {
        cases.push(Case::from_passes(
            "verify_scope",
            "tandem",
            None,
            "rows/s",
            &passes,
        ));
    }

    // 4. Delete by ids: half of each tandem upsert pass, in its batch size.
    for &b in plan
        .batch_sizes
        .iter()
        .filter(|_| plan.runs(CaseGroup::Delete))
    {
        let mut passes = Vec::new();
        for ids in tandem_ids.get(&b).into_iter().flatten() {
            let half = ((ids.len() / 2) / b).max(1) * b;
            let jobs: Vec<Vec<RecordId>> = ids[..half.min(ids.len())]
                .chunks(b)
                .map(<[RecordId]>::to_vec)
                .collect();
            let e = env.clone();
            let job: Job<Vec<RecordId>> = Arc::new(move |_, ids| {
                let env = e.clone();
                Box::pin(async move {
                    let r = env
                        .tandem
                        .delete(DeleteSelector::Ids(ids))
                        .await
                        .map_err(|e| failed("tandem delete", e))?;
                    Ok(r.deleted)
                })
            });
            let pass = measure(&env, &env.tandem_counters, jobs, plan.concurrency, job).await?;
            progress(plan, &name, &format!("delete ids b={b}"), &pass, "rec/s");
            passes.push(pass);
        }
        cases.push(Case::from_passes(
            "delete_ids",
            "tandem",
            Some(b),
            "rec/s",
            &passes,
        ));
    }

    // 5. Delete by scope: one scope per repetition.
    let mut passes = Vec::new();
    for rep in 0..plan.repeat {
        if !plan.runs(CaseGroup::Delete) {
            break;
        }
        let scope = Scope::new(data::scope_name(rep, plan.scopes));
        let e = env.clone();
        let job: Job<Scope> = Arc::new(move |_, scope| {
            let env = e.clone();
            Box::pin(async move {
                let r = env
                    .tandem
                    .delete(DeleteSelector::Scope(scope))
                    .await
                    .map_err(|e| failed("tandem delete by scope", e))?;
                Ok(r.deleted)
            })
        });
        let pass = measure(&env, &env.tandem_counters, vec![scope], 1, job).await?;
        progress(plan, &name, "delete scope", &pass, "rec/s");
        passes.push(pass);
    }
    if !passes.is_empty() {
        cases.push(Case::from_passes(
            "delete_scope",
            "tandem",
            None,
            "rec/s",
            &passes,
        ));
    }

    // 6. Recovery of a backlog of expired intents, each naming garbage points.
    let mut passes = Vec::new();
    for rep in 0..plan.repeat {
        if !plan.runs(CaseGroup::Recover) {
            break;
        }
        make_backlog(&env, plan, label.dim, rep as u64).await?;
        let e = env.clone();
        let job: Job<()> = Arc::new(move |_, ()| {
            let env = e.clone();
            Box::pin(async move {
                let r = env
                    .tandem
                    .recover()
                    .await
                    .map_err(|e| failed("recover", e))?;
                if r.failed > 0 {
                    return Err(failed("recover", format!("{} intents failed", r.failed)));
                }
                Ok(r.resolved as u64)
            })
        });
        let mut pass = measure(&env, &env.tandem_counters, vec![()], 1, job).await?;
        // Per-call columns are per intent; the latency is the whole recover().
        pass.batches = pass.items.max(1);
        progress(plan, &name, "recover", &pass, "intents/s");
        passes.push(pass);
    }
    if !passes.is_empty() {
        cases.push(Case::from_passes(
            "recover",
            "tandem",
            Some(plan.backlog_points),
            "intents/s",
            &passes,
        ));
    }

    // 7. Re-indexing, on stores of its own.
    let reindex = if plan.runs(CaseGroup::Reindex) {
        let (c, summary) = super::reindex::cases(&env, plan, &name, label.dim).await?;
        cases.extend(c);
        Some(summary)
    } else {
        None
    };

    let consistent_after = env
        .tandem
        .verify(None)
        .await
        .map_err(|e| failed("final verify", e))?
        .is_consistent()
        && reindex.as_ref().is_none_or(|r| r.consistent);
    let targets = targets(&cases, plan, label.latency, label.backend);
    Ok(Run {
        backend: label.backend,
        metadata_store: env.metadata_store.clone(),
        vector_index: env.vector_index.clone(),
        added_latency_ms: label.latency.as_secs_f64() * 1e3,
        measured_round_trip_ms: env.round_trip_ms,
        dim: label.dim,
        cases,
        targets,
        reindex,
        consistent_after,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Raw index search vs guarded search, one query at a time, alternating
/// which goes first; `repeat` blocks for paired ratios.
async fn search_case(
    env: &Arc<Env>,
    plan: &Plan,
    dim: usize,
    op: &'static str,
    filter: Filter,
) -> Result<(Case, Case), AppError> {
    let mut rng = fastrand::Rng::with_seed(plan.seed ^ 0x5eed);
    let per_block = (plan.queries / plan.repeat.max(1)).max(2);
    let mut index_passes = Vec::new();
    let mut guarded_passes = Vec::new();
    let counters = &env.tandem_counters;
    for _ in 0..plan.repeat {
        let mut ip = Pass::default();
        let mut gp = Pass::default();
        let (mut ic, mut gc) = ((Calls::default(), 0, 0), (Calls::default(), 0, 0));
        rss::reset_peak();
        for q in 0..per_block {
            let vector = data::vector(&mut rng, dim);
            for guarded in [q % 2 == 1, q % 2 == 0] {
                let before = snapshot(env, counters);
                let t = Instant::now();
                if guarded {
                    let query = SearchQuery::new(vector.clone(), K).with_filter(filter.clone());
                    env.tandem
                        .search(&query)
                        .await
                        .map_err(|e| failed("guarded search", e))?;
                } else {
                    let query = IndexQuery {
                        vector: vector.clone(),
                        limit: K,
                        filter: filter.clone(),
                        score_threshold: None,
                    };
                    env.tandem
                        .index()
                        .search(&query)
                        .await
                        .map_err(|e| failed("index search", e))?;
                }
                let elapsed = t.elapsed();
                let after = snapshot(env, counters);
                let (pass, acc) = if guarded {
                    (&mut gp, &mut gc)
                } else {
                    (&mut ip, &mut ic)
                };
                pass.items += 1;
                pass.batches += 1;
                pass.seconds += elapsed.as_secs_f64();
                pass.latencies_us.push(elapsed.as_micros() as u64);
                let d = after.0.since(before.0);
                acc.0.metadata += d.metadata;
                acc.0.index += d.index;
                acc.1 += after.1.zip(before.1).map_or(0, |(a, b)| a - b);
                acc.2 += after.2.zip(before.2).map_or(0, |(a, b)| a - b);
            }
        }
        let peak = rss::peak();
        for (pass, acc) in [(&mut ip, ic), (&mut gp, gc)] {
            pass.calls = acc.0;
            pass.metadata_wire = env.metadata_wire.as_ref().map(|_| acc.1);
            pass.index_wire = env.index_wire.as_ref().map(|_| acc.2);
            pass.peak_rss = peak;
        }
        index_passes.push(ip);
        guarded_passes.push(gp);
    }
    let index = Case::from_passes(op, "index", Some(K), "queries/s", &index_passes);
    let mut guarded = Case::from_passes(op, "guarded", Some(K), "queries/s", &guarded_passes);
    let tp = |p: &[Pass]| p.iter().map(Pass::throughput).collect::<Vec<_>>();
    guarded.vs_raw = Ratio::pairwise(&tp(&guarded_passes), &tp(&index_passes));
    if !plan.quiet {
        eprintln!(
            "[{op}] index p50 {:.2} ms, guarded p50 {:.2} ms",
            index.latency_ms.p50, guarded.latency_ms.p50
        );
    }
    Ok((index, guarded))
}

/// Writes garbage points and prepares expired intents naming them, as
/// crashed writers would leave them.
async fn make_backlog(env: &Env, plan: &Plan, dim: usize, rep: u64) -> Result<(), AppError> {
    let mut rng = fastrand::Rng::with_seed(plan.seed ^ 0xbac ^ rep);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let mut points = Vec::with_capacity(plan.backlog * plan.backlog_points);
    let repo = env.tandem.repo();
    for _ in 0..plan.backlog {
        let ids: Vec<PointId> = (0..plan.backlog_points)
            .map(|_| PointId::new_v7())
            .collect();
        for id in &ids {
            points.push(Point {
                id: *id,
                record_id: RecordId::new_v7(),
                scope: Scope::new(data::scope_name(0, plan.scopes)),
                metadata: serde_json::Map::new(),
                vector: data::vector(&mut rng, dim),
                written_at_ms: now - 120_000,
            });
        }
        repo.prepare(&NewIntent {
            id: IntentId::new_v7(),
            kind: IntentKind::Upsert,
            owner: OwnerToken::new_random(),
            lease_deadline_ms: now - 60_000,
            point_ids: ids,
            created_ms: now - 120_000,
            generation: 0,
        })
        .await
        .map_err(|e| failed("preparing the backlog", e))?;
    }
    for chunk in points.chunks(256) {
        env.tandem
            .index()
            .upsert(chunk)
            .await
            .map_err(|e| failed("writing the backlog's points", e))?;
    }
    Ok(())
}

fn find<'a>(cases: &'a [Case], op: &str, proto: &str, b: Option<usize>) -> Option<&'a Case> {
    cases
        .iter()
        .find(|c| c.operation == op && c.protocol == proto && (b.is_none() || c.batch_size == b))
}

/// The targets of issues 6 and 10 this run can speak to.
fn targets(cases: &[Case], plan: &Plan, latency: Duration, backend: &str) -> Vec<Target> {
    let mut out = Vec::new();
    let ratio = |op: &str, b: usize| find(cases, op, "tandem", Some(b));
    let loopback = latency.is_zero();
    let spread = |r: Ratio| format!("{:.2}× (min {:.2}, max {:.2})", r.median, r.min, r.max);
    for &b in plan.batch_sizes.iter().filter(|b| **b >= 100) {
        let Some(c) = ratio("upsert", b) else {
            continue;
        };
        if let Some(r) = c.vs_raw {
            out.push(Target {
                target: format!("tandem ≥ 0.8× raw throughput at batch {b}"),
                measured: spread(r),
                met: r.median >= 0.8,
            });
        }
        // Issue 10's, for servers (the embedded SQLite adapter keeps the
        // sequential commit by design).
        if backend == "servers" {
            if let Some(r) = c.vs_raw {
                out.push(Target {
                    target: format!("tandem ≥ 1.0× raw throughput at batch {b}"),
                    measured: spread(r),
                    met: r.median >= 1.0,
                });
            }
            if let Some(r) = c.vs_raw_overlapped {
                out.push(Target {
                    target: format!("tandem ≥ 0.9× raw-overlapped throughput at batch {b}"),
                    measured: spread(r),
                    met: r.median >= 0.9,
                });
            }
        }
    }
    // The naive protocol's cost is round trips: its targets are for servers
    // (in one process its per-record calls cost microseconds).
    let naive_targets: &[(usize, f64)] = if backend == "embedded" {
        &[]
    } else if loopback {
        &[(100, 2.0), (1000, 8.0)]
    } else if latency >= Duration::from_millis(1) {
        &[(100, 10.0)]
    } else {
        &[]
    };
    for &(b, want) in naive_targets {
        if let Some(r) = ratio("upsert", b).and_then(|c| c.vs_naive) {
            let where_ = if loopback {
                "on loopback".to_owned()
            } else {
                format!("with {} ms added", latency.as_secs_f64() * 1e3)
            };
            out.push(Target {
                target: format!("tandem ≥ {want}× naive at batch {b} {where_}"),
                measured: format!("{:.1}× (min {:.1}, max {:.1})", r.median, r.min, r.max),
                met: r.median >= want,
            });
        }
    }
    // Deferred indexing (issue 13): one transaction, so within 1.3× of the
    // metadata insert alone; the workers at least as fast as the
    // synchronous path at batch 1000.
    for &b in &plan.batch_sizes {
        if let (Some(d), Some(i)) = (
            find(cases, "upsert", "deferred", Some(b)),
            find(cases, "upsert", "raw-insert", Some(b)),
        ) {
            let r = d.latency_ms.p50 / i.latency_ms.p50.max(1e-9);
            out.push(Target {
                target: format!("deferred write p50 ≤ 1.3× the raw metadata insert at batch {b}"),
                measured: format!(
                    "{r:.2}× ({:.2} vs {:.2} ms)",
                    d.latency_ms.p50, i.latency_ms.p50
                ),
                met: r <= 1.3,
            });
        }
    }
    if let (Some(w), Some(t)) = (
        find(cases, "index_drain", "workers", Some(1000)),
        find(cases, "upsert", "tandem", Some(1000)),
    ) {
        out.push(Target {
            target: "index workers' drain ≥ the synchronous upsert's throughput (batch 1000)"
                .to_owned(),
            measured: format!(
                "{:.0} vs {:.0} rec/s ({:.2}×)",
                w.throughput,
                t.throughput,
                w.throughput / t.throughput.max(1e-9)
            ),
            met: w.throughput >= t.throughput,
        });
    }
    let small = plan.batch_sizes.iter().copied().filter(|b| *b >= 10).min();
    let large = plan.batch_sizes.iter().copied().max();
    if let (Some(s), Some(l)) = (small, large)
        && s < l
        && let (Some(a), Some(z)) = (ratio("upsert", s), ratio("upsert", l))
    {
        let wire = match (
            a.metadata_wire_round_trips_per_batch,
            z.metadata_wire_round_trips_per_batch,
        ) {
            (Some(x), Some(y)) => format!("; PostgreSQL wire round trips {x:.1} and {y:.1}"),
            _ => String::new(),
        };
        let same_wire = match (
            a.metadata_wire_round_trips_per_batch,
            z.metadata_wire_round_trips_per_batch,
        ) {
            // A pool connection opened during a pass adds its handshake's
            // turns to that pass: allow one turn per batch.
            (Some(x), Some(y)) => (x - y).abs() < 1.0,
            _ => true,
        };
        out.push(Target {
            target: format!("tandem metadata round trips per batch the same at batch {s} and {l}"),
            measured: format!(
                "{:.2} and {:.2} port calls{wire}",
                a.metadata_calls_per_batch, z.metadata_calls_per_batch
            ),
            met: (a.metadata_calls_per_batch - z.metadata_calls_per_batch).abs() < 0.01
                && same_wire,
        });
    }
    for op in ["search", "search_scope"] {
        if let (Some(i), Some(g)) = (
            find(cases, op, "index", None),
            find(cases, op, "guarded", None),
        ) {
            let r = g.latency_ms.p50 / i.latency_ms.p50.max(1e-9);
            out.push(Target {
                target: format!(
                    "guarded search p50 ≤ 1.3× raw index search ({})",
                    if op == "search" {
                        "no filter"
                    } else {
                        "scope filter"
                    }
                ),
                measured: format!(
                    "{r:.2}× ({:.2} vs {:.2} ms)",
                    g.latency_ms.p50, i.latency_ms.p50
                ),
                met: r <= 1.3,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_are_whole_batches_capped_by_max_batches() {
        assert_eq!(pass_records(5000, 1, 200), 200);
        assert_eq!(pass_records(5000, 100, 200), 5000);
        assert_eq!(pass_records(5000, 1000, 200), 5000);
        assert_eq!(pass_records(50, 1000, 200), 1000);
        assert_eq!(pass_records(2500, 1000, 200), 2000);
    }
}
