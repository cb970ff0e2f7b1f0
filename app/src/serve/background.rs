//! The service's background tasks, each a loop on a fixed period until
//! shutdown:
//!
//! * **probe** (every [`PROBE_EVERY`]): is each store reachable, with its schema
//!   and collection? Lists the unresolved intents (the backlog, the oldest
//!   intent's age) and counts the sagas by state on the way;
//! * **recover** (every `--recover-every`): [`Coordinator::recover`], safe in
//!   every replica at once — its claim is atomic;
//! * **verify** (every `--verify-every`): one [`Coordinator::verify_page`] step
//!   of a rolling pass over the whole store; when a pass ends, its findings
//!   become each scope's last verification (and `--repair` repairs the
//!   inconsistent scopes);
//! * **sample** (every second): the time series and the status snapshot.
//!
//! [`Coordinator::recover`]: tandem_core::Coordinator::recover
//! [`Coordinator::verify_page`]: tandem_core::Coordinator::verify_page

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::PrometheusHandle;
use tandem_core::{PointId, SagaCounts, SagaState, Scope, VerifyCursor, unix_ms};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::InFlight;
use super::series::{Series, round3};
use super::status::{
    Activity, Backlog, HttpStatus, Live, PassStatus, RunRecord, ScopeVerification, Section,
    SectionRow, ServiceInfo, Snapshots, Status, StoreStatus,
};
use super::tap::{Tap, label};
use crate::backend::AppCoordinator;
use crate::error::{Redactor, one_line};

/// How often the stores are probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(2);
/// How long a probe may take before the store counts as unreachable.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most intents one probe lists; beyond it the backlog is reported as capped.
pub const BACKLOG_LIMIT: usize = 10_000;
/// How often the series are sampled and the status rebuilt.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// The periods and options of the tasks.
#[derive(Clone, Debug)]
pub struct Schedule {
    /// Index workers for deferred writes (0: none).
    pub index_workers: usize,
    /// Recovery's period (`None`: off).
    pub recover_every: Option<Duration>,
    /// Verification's period (`None`: off).
    pub verify_every: Option<Duration>,
    /// Rows and points per verification step.
    pub verify_page: usize,
    /// Repair inconsistent scopes after a pass.
    pub repair: bool,
    /// Seconds of time series kept.
    pub window_secs: u64,
}

/// What the tasks share.
pub struct Context {
    /// The coordinator.
    pub coordinator: Arc<AppCoordinator>,
    /// The stores' names: metadata, index.
    pub store_names: [String; 2],
    /// Their latest findings.
    pub live: Arc<Live>,
    /// The readable metrics.
    pub tap: Tap,
    /// The Prometheus recorder (its upkeep runs with the sampler).
    pub prometheus: PrometheusHandle,
    /// Where the status snapshots go.
    pub snapshots: Arc<Snapshots>,
    /// Removes secrets from error messages.
    pub redactor: Redactor,
    /// The periods.
    pub schedule: Schedule,
    /// When the service started (ms since the Unix epoch).
    pub started_ms: i64,
    /// Whether the API needs a token.
    pub auth_required: bool,
    /// Writes in flight.
    pub writes: Arc<InFlight>,
    /// The configuration panel.
    pub config_section: Section,
}

fn now_ms() -> i64 {
    unix_ms(std::time::SystemTime::now())
}

/// Takes the first sample (the baseline of every series, and the first
/// status snapshot), then starts every task; each ends when `stop` turns true.
pub fn spawn(ctx: Arc<Context>, stop: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
    let series = Arc::new(std::sync::Mutex::new(Series::new(ctx.schedule.window_secs)));
    sample(&ctx, &series, false);
    let mut tasks = Vec::new();
    let c = ctx.clone();
    tasks.push(tokio::spawn(every(PROBE_EVERY, stop.clone(), move || {
        let c = c.clone();
        async move { probe(&c).await }
    })));
    if ctx.coordinator.repo().deferred_indexing() {
        for _ in 0..ctx.schedule.index_workers {
            let c = ctx.coordinator.clone();
            let mut stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let stopped = async move { stopped(&mut stop).await };
                // The service's own recovery task collects what deferred
                // deletes leave (and reports it).
                if let Err(e) = c.run_index_worker_with(stopped, false).await {
                    tracing::error!(error = %e, "the index worker stopped");
                }
            }));
        }
    }
    if let Some(period) = ctx.schedule.recover_every {
        let c = ctx.clone();
        tasks.push(tokio::spawn(every(period, stop.clone(), move || {
            let c = c.clone();
            async move { recover(&c).await }
        })));
    }
    if let Some(period) = ctx.schedule.verify_every {
        let c = ctx.clone();
        let pass = Arc::new(tokio::sync::Mutex::new(Pass::default()));
        tasks.push(tokio::spawn(every(period, stop.clone(), move || {
            let (c, pass) = (c.clone(), pass.clone());
            async move { verify_step(&c, &mut *pass.lock().await).await }
        })));
    }
    let c = ctx.clone();
    let closing = ctx.writes.clone();
    let next = tokio::time::Instant::now() + SAMPLE_EVERY;
    tasks.push(tokio::spawn(every_from(
        next,
        SAMPLE_EVERY,
        stop,
        move || {
            let (c, series, closing) = (c.clone(), series.clone(), closing.clone());
            async move { sample(&c, &series, closing.closing()) }
        },
    )));
    tasks
}

/// Runs `step` every `period` (the first at once) until `stop` turns true. A
/// step that overruns its period delays the next one rather than piling up.
async fn every<F, Fut>(period: Duration, stop: watch::Receiver<bool>, step: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    every_from(tokio::time::Instant::now(), period, stop, step).await
}

/// [`every`], the first run at `start`.
async fn every_from<F, Fut>(
    start: tokio::time::Instant,
    period: Duration,
    mut stop: watch::Receiver<bool>,
    mut step: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut ticker = tokio::time::interval_at(start, period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stopped(&mut stop) => return,
        }
        step().await;
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Probes the metadata store: lists the unresolved intents (which needs the
/// schema). Returns them, or why it failed.
pub async fn probe_metadata(
    c: &AppCoordinator,
    redactor: &Redactor,
) -> Result<Vec<tandem_core::Intent>, String> {
    match tokio::time::timeout(PROBE_TIMEOUT, c.repo().list_intents(BACKLOG_LIMIT + 1)).await {
        Ok(Ok(intents)) => Ok(intents),
        Ok(Err(e)) => Err(one_line(&e, redactor)),
        Err(_) => Err(format!("no answer within {} s", PROBE_TIMEOUT.as_secs())),
    }
}

/// Probes the index: looks a point up (which needs the collection).
pub async fn probe_index(c: &AppCoordinator, redactor: &Redactor) -> Result<(), String> {
    let ids = [PointId::new_random()];
    match tokio::time::timeout(PROBE_TIMEOUT, c.index().retrieve(&ids)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(one_line(&e, redactor)),
        Err(_) => Err(format!("no answer within {} s", PROBE_TIMEOUT.as_secs())),
    }
}

fn store_status(
    role: &'static str,
    name: &str,
    at: i64,
    took: Duration,
    r: &Result<(), String>,
) -> StoreStatus {
    StoreStatus {
        role,
        name: name.to_owned(),
        reachable: r.is_ok(),
        checked_at_ms: at,
        probe_ms: Some(round3(took.as_secs_f64() * 1e3)),
        error: r.as_ref().err().cloned(),
    }
}

async fn probe(ctx: &Context) {
    let c = &ctx.coordinator;
    let at = now_ms();
    let t = Instant::now();
    let intents = probe_metadata(c, &ctx.redactor).await;
    let metadata_took = t.elapsed();
    let t = Instant::now();
    let index = probe_index(c, &ctx.redactor).await;
    let index_took = t.elapsed();

    let metadata = intents.as_ref().map(|_| ()).map_err(Clone::clone);
    for (role, up) in [("metadata", metadata.is_ok()), ("index", index.is_ok())] {
        metrics::gauge!("tandem_store_up", "store" => role).set(if up { 1.0 } else { 0.0 });
    }
    let stores = vec![
        store_status(
            "metadata",
            &ctx.store_names[0],
            at,
            metadata_took,
            &metadata,
        ),
        store_status("index", &ctx.store_names[1], at, index_took, &index),
    ];
    let backlog = intents.ok().map(|intents| {
        let now = now_ms();
        let capped = intents.len() > BACKLOG_LIMIT;
        // Spent intents guard nothing (a deferred upsert's, until recovery
        // resolves it after its lease): not backlog.
        let listed: Vec<_> = intents[..intents.len().min(BACKLOG_LIMIT)]
            .iter()
            .filter(|i| !i.is_spent())
            .collect();
        // Intents held by a live saga end with it (not by recovery): they
        // are counted apart and neither expire nor age.
        let oldest = listed
            .iter()
            .filter(|i| !i.is_held())
            .map(|i| i.created_ms)
            .min();
        let b = Backlog {
            live_intents: listed.len() as u64,
            held_intents: listed.iter().filter(|i| i.is_held()).count() as u64,
            expired_intents: listed.iter().filter(|i| i.is_expired(now)).count() as u64,
            oldest_intent_age_secs: oldest.map(|ms| round3((now - ms).max(0) as f64 / 1e3)),
            capped,
            checked_at_ms: now,
        };
        metrics::gauge!("tandem_pending_intents").set(b.live_intents as f64);
        metrics::gauge!("tandem_held_intents").set(b.held_intents as f64);
        metrics::gauge!("tandem_expired_intents").set(b.expired_intents as f64);
        metrics::gauge!("tandem_oldest_intent_age_seconds")
            .set(b.oldest_intent_age_secs.unwrap_or(0.0));
        b
    });
    // Sagas by state: only when the metadata store answered (a count that
    // failed keeps the last panel rather than showing zeros).
    let sagas = if metadata.is_ok() {
        match tokio::time::timeout(PROBE_TIMEOUT, c.saga_counts()).await {
            Ok(Ok(counts)) => {
                for state in SagaState::ALL {
                    metrics::gauge!("tandem_sagas", "state" => state.as_str())
                        .set(counts.get(&state).copied().unwrap_or(0) as f64);
                }
                Some(saga_section(&counts))
            }
            _ => None,
        }
    } else {
        None
    };
    // The active collection and any open re-index, likewise (reading it
    // also makes this process follow a switch at once).
    let collection = if metadata.is_ok() && c.repo().reindexing() {
        match tokio::time::timeout(PROBE_TIMEOUT, c.refresh_index()).await {
            Ok(Ok(state)) => {
                // The driver runs elsewhere (tandem reindex): its progress,
                // as the store records it.
                metrics::gauge!("tandem_reindex_copied_rows")
                    .set(state.migration.as_ref().map_or(0, |m| m.copied) as f64);
                Some(collection_section(&state, now_ms()))
            }
            _ => None,
        }
    } else {
        None
    };
    // The deferred-indexing backlog, likewise.
    let indexing = if metadata.is_ok() && c.repo().deferred_indexing() {
        match tokio::time::timeout(PROBE_TIMEOUT, c.pending_stats()).await {
            Ok(Ok(p)) => Some(indexing_section(&p, now_ms())),
            _ => None,
        }
    } else {
        None
    };
    ctx.live.with(|l| {
        l.stores = stores;
        if let Some(b) = backlog {
            l.backlog = b;
        }
        if sagas.is_some() {
            l.sagas = sagas;
        }
        if indexing.is_some() {
            l.indexing = indexing;
        }
        if collection.is_some() {
            l.collection = collection;
        }
    });
}

/// The dashboard's "Deferred indexing" panel: writes waiting for an index
/// worker, the oldest one's age (the index's lag) and dead letters (an
/// alert: an operator decides), and how many records every worker indexed
/// in the last minute (from the metadata store, so workers in other
/// processes count too; this process's own rate is the activity series
/// `indexed_records`). The gauges are set by `Coordinator::pending_stats`.
pub fn indexing_section(p: &tandem_core::PendingStats, now_ms: i64) -> Section {
    let age = p
        .oldest_enqueued_ms
        .map_or(0.0, |t| round3((now_ms - t).max(0) as f64 / 1e3));
    let row = |key: &str, label: &str, value: serde_json::Value, alert: bool| SectionRow {
        key: key.to_owned(),
        label: label.to_owned(),
        value,
        alert,
    };
    Section {
        id: "indexing".to_owned(),
        title: "Deferred indexing".to_owned(),
        rows: vec![
            row("pending", "waiting for a worker", p.pending.into(), false),
            row("claimed", "of those being indexed", p.claimed.into(), false),
            row("lag_secs", "oldest waiting (s)", age.into(), false),
            row(
                "indexed_last_minute",
                "indexed in the last minute (all workers)",
                p.indexed_last_minute.into(),
                false,
            ),
            row(
                "dead_letters",
                "dead letters (tandem dlq)",
                p.dead.into(),
                p.dead > 0,
            ),
        ],
    }
}

/// The dashboard's "Vector collection" panel: the active collection and
/// generation, the retired one (a rollback target until dropped), and an
/// open re-index's target and progress (its driver's lease ended: an alert,
/// the re-index must be re-run to finish).
pub fn collection_section(state: &tandem_core::IndexState, now_ms: i64) -> Section {
    let row = |key: &str, label: &str, value: serde_json::Value, alert: bool| SectionRow {
        key: key.to_owned(),
        label: label.to_owned(),
        value,
        alert,
    };
    let mut rows = vec![
        row(
            "active",
            "active collection",
            state
                .active
                .clone()
                .unwrap_or_else(|| "(as configured)".to_owned())
                .into(),
            false,
        ),
        row("generation", "generation", state.generation.into(), false),
        row(
            "retired",
            "retired (drop with tandem reindex --drop-retired)",
            state.retired.clone().into(),
            false,
        ),
    ];
    if let Some(m) = &state.migration {
        let source = match &m.spec.source {
            tandem_core::ReindexSource::KeptVectors => "kept vectors".to_owned(),
            tandem_core::ReindexSource::Embedder { model } => format!("re-embedding ({model})"),
        };
        let stalled = m.lease_until_ms < now_ms;
        rows.extend([
            row(
                "migration_target",
                "re-indexing into",
                format!("{} (dim {}, {source})", m.spec.target, m.spec.dimension).into(),
                false,
            ),
            row("migration_copied", "rows copied", m.copied.into(), false),
            row(
                "migration_switching",
                "switching",
                m.frozen_until_ms.is_some_and(|t| t > now_ms).into(),
                false,
            ),
            row(
                "migration_stalled",
                "driver gone (re-run tandem reindex)",
                stalled.into(),
                stalled,
            ),
        ]);
    }
    Section {
        id: "collection".to_owned(),
        title: "Vector collection".to_owned(),
        rows,
    }
}

/// The dashboard's "Sagas by state" panel: one row per state, a failed saga
/// (one an operator must look at) shown as an alert.
pub fn saga_section(counts: &SagaCounts) -> Section {
    let rows = SagaState::ALL
        .iter()
        .map(|&state| {
            let n = counts.get(&state).copied().unwrap_or(0);
            SectionRow {
                key: state.as_str().to_owned(),
                label: match state {
                    SagaState::Running => "running",
                    SagaState::Compensating => "compensating",
                    SagaState::Done => "done",
                    SagaState::Compensated => "compensated",
                    SagaState::Failed => "failed (needs an operator)",
                }
                .to_owned(),
                value: serde_json::Value::from(n),
                alert: state == SagaState::Failed && n > 0,
            }
        })
        .collect();
    Section {
        id: "sagas".to_owned(),
        title: "Sagas by state".to_owned(),
        rows,
    }
}

fn count_run(task: &'static str, failed: bool) {
    metrics::counter!("tandem_background_runs_total", "task" => task).increment(1);
    if failed {
        metrics::counter!("tandem_background_failures_total", "task" => task).increment(1);
    }
}

async fn recover(ctx: &Context) {
    let started_at_ms = now_ms();
    let t = Instant::now();
    let result = ctx.coordinator.recover().await;
    let duration_ms = round3(t.elapsed().as_secs_f64() * 1e3);
    let run = match result {
        Ok(report) => {
            if report.claimed > 0 {
                tracing::info!(
                    claimed = report.claimed,
                    resolved = report.resolved,
                    failed = report.failed,
                    "background recovery"
                );
            }
            RunRecord {
                started_at_ms,
                duration_ms,
                failed: report.failed > 0,
                error: (report.failed > 0)
                    .then(|| format!("{} intents could not be handled yet", report.failed)),
                report: serde_json::to_value(&report).unwrap_or_default(),
            }
        }
        Err(e) => {
            let error = one_line(&e, &ctx.redactor);
            tracing::warn!(%error, "background recovery failed");
            RunRecord {
                started_at_ms,
                duration_ms,
                failed: true,
                report: serde_json::Value::Null,
                error: Some(error),
            }
        }
    };
    count_run("recover", run.failed);
    ctx.live.with(|l| l.recovery.record(run));
}

/// Findings of one scope so far in a pass.
#[derive(Clone, Copy, Debug, Default)]
struct Found {
    rows: u64,
    points: u64,
    missing: u64,
    orphans: u64,
}

/// The rolling verification's pass under way.
#[derive(Default)]
struct Pass {
    cursor: VerifyCursor,
    status: Option<PassStatus>,
    scopes: BTreeMap<Scope, Found>,
}

async fn verify_step(ctx: &Context, pass: &mut Pass) {
    let c = &ctx.coordinator;
    let started_at_ms = now_ms();
    let t = Instant::now();
    let status = pass.status.get_or_insert_with(|| PassStatus {
        started_at_ms,
        ..PassStatus::default()
    });
    let result = c
        .verify_page(None, &pass.cursor, ctx.schedule.verify_page)
        .await;
    let page = match result {
        Ok(page) => page,
        Err(e) => {
            let error = one_line(&e, &ctx.redactor);
            tracing::warn!(%error, "background verification step failed");
            count_run("verify", true);
            let run = RunRecord {
                started_at_ms,
                duration_ms: round3(t.elapsed().as_secs_f64() * 1e3),
                failed: true,
                report: serde_json::Value::Null,
                error: Some(error),
            };
            ctx.live.with(|l| l.verification.task.record(run));
            return;
        }
    };
    status.pages += 1;
    for (scope, counts) in &page.scopes {
        let f = pass.scopes.entry(scope.clone()).or_default();
        f.rows += counts.rows;
        f.points += counts.points;
        status.rows += counts.rows;
        status.points += counts.points;
    }
    for m in &page.missing_points {
        pass.scopes.entry(m.scope.clone()).or_default().missing += 1;
    }
    for o in &page.orphan_points {
        pass.scopes.entry(o.scope.clone()).or_default().orphans += 1;
    }
    pass.cursor = page.next.clone();
    let report = serde_json::json!({
        "rows": page.scopes.values().map(|s| s.rows).sum::<u64>(),
        "points": page.scopes.values().map(|s| s.points).sum::<u64>(),
        "missing_points": page.missing_points.len(),
        "orphan_points": page.orphan_points.len(),
    });
    count_run("verify", false);
    let run = RunRecord {
        started_at_ms,
        duration_ms: round3(t.elapsed().as_secs_f64() * 1e3),
        failed: false,
        report,
        error: None,
    };
    let finished = if pass.cursor.is_done() {
        let mut done = std::mem::take(pass);
        let mut status = done.status.take().unwrap_or_default();
        let end = now_ms();
        status.finished_at_ms = Some(end);
        let mut scopes: Vec<ScopeVerification> = done
            .scopes
            .iter()
            .map(|(scope, f)| ScopeVerification {
                scope: scope.to_string(),
                rows: f.rows,
                points: f.points,
                missing: f.missing,
                orphans: f.orphans,
                consistent: f.missing == 0 && f.orphans == 0,
                verified_at_ms: end,
            })
            .collect();
        if ctx.schedule.repair {
            repair(ctx, &mut scopes).await;
        }
        Some((status, scopes))
    } else {
        None
    };
    ctx.live.with(|l| {
        let v = &mut l.verification;
        v.task.record(run);
        match finished {
            Some((status, scopes)) => {
                let inconsistent = scopes.iter().filter(|s| !s.consistent).count() as u64;
                let missing: u64 = scopes.iter().map(|s| s.missing).sum();
                let orphans: u64 = scopes.iter().map(|s| s.orphans).sum();
                metrics::counter!("tandem_verify_passes_total").increment(1);
                metrics::gauge!("tandem_verify_inconsistent_scopes").set(inconsistent as f64);
                metrics::gauge!("tandem_verify_missing_points").set(missing as f64);
                metrics::gauge!("tandem_verify_orphan_points").set(orphans as f64);
                if inconsistent > 0 {
                    tracing::warn!(
                        inconsistent,
                        missing,
                        orphans,
                        "verification found inconsistent scopes"
                    );
                }
                v.passes += 1;
                v.inconsistent_scopes = inconsistent;
                v.scopes = scopes;
                v.last_pass = Some(status);
                v.current = None;
            }
            None => v.current = pass.status.clone(),
        }
    });
}

/// Repairs each inconsistent scope and records what the repair's own verify
/// found afterwards.
async fn repair(ctx: &Context, scopes: &mut [ScopeVerification]) {
    for s in scopes.iter_mut().filter(|s| !s.consistent) {
        let scope = Scope::new(s.scope.clone());
        let result = ctx.coordinator.repair(Some(&scope)).await;
        count_run("repair", result.is_err());
        match result {
            Ok(r) => {
                tracing::info!(
                    scope = %scope,
                    orphans_deleted = r.orphans_deleted,
                    missing_rewritten = r.missing_rewritten,
                    "background repair"
                );
                let counts = r.after.scopes.get(&scope).copied().unwrap_or_default();
                let missing = r
                    .after
                    .missing_points
                    .iter()
                    .filter(|m| m.scope == scope)
                    .count();
                let orphans = r
                    .after
                    .orphan_points
                    .iter()
                    .filter(|p| p.scope == scope)
                    .count();
                s.rows = counts.rows;
                s.points = counts.points;
                s.missing = missing as u64;
                s.orphans = orphans as u64;
                s.consistent = missing == 0 && orphans == 0;
                s.verified_at_ms = now_ms();
            }
            Err(e) => {
                tracing::warn!(scope = %scope, error = %one_line(&e, &ctx.redactor), "background repair failed");
            }
        }
    }
}

/// Counts of the HTTP requests by status class.
fn http_status(tap: &Tap, writes: u64) -> HttpStatus {
    let class = |c: char| {
        tap.counter_sum("tandem_http_requests_total", |k| {
            label(k, "status").is_some_and(|s| s.starts_with(c))
        })
    };
    HttpStatus {
        requests: tap.counter_sum("tandem_http_requests_total", |_| true),
        client_errors: class('4'),
        server_errors: class('5'),
        writes_in_flight: writes,
    }
}

fn sample(ctx: &Context, series: &std::sync::Mutex<Series>, shutting_down: bool) {
    let now = now_ms();
    let mut series = series
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    series.sample(&ctx.tap, now);
    ctx.prometheus.run_upkeep();
    let (stores, backlog, recovery, verification, sagas, indexing, collection) =
        ctx.live.with(|l| {
            (
                l.stores.clone(),
                l.backlog.clone(),
                l.recovery.clone(),
                l.verification.clone(),
                l.sagas.clone(),
                l.indexing.clone(),
                l.collection.clone(),
            )
        });
    let seq = ctx.snapshots.next_seq();
    let status = Status {
        seq,
        generated_at_ms: now,
        service: ServiceInfo {
            version: env!("CARGO_PKG_VERSION"),
            started_at_ms: ctx.started_ms,
            uptime_secs: round3((now - ctx.started_ms).max(0) as f64 / 1e3),
            auth_required: ctx.auth_required,
            shutting_down,
        },
        stores,
        activity: Activity {
            interval_secs: SAMPLE_EVERY.as_secs_f64(),
            window_secs: ctx.schedule.window_secs,
            times_ms: series.times_ms(),
            success_ratio: series.success_ratio().map(|r| (r * 1e4).round() / 1e4),
            series: series.series(),
        },
        phases: series.phases(),
        backlog,
        recovery,
        verification,
        http: http_status(&ctx.tap, ctx.writes.count() as u64),
        sections: std::iter::once(ctx.config_section.clone())
            .chain(sagas)
            .chain(indexing)
            .chain(collection)
            .collect(),
    };
    ctx.snapshots.publish(&status);
}
