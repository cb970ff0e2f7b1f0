//! The commands other than `ingest` and `demo`: each calls the coordinator once
//! (or twice) and prints the report.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::Value;
use std::time::Duration;

use tandem_core::{
    CoordinatorError, DeleteSelector, Filter, IndexReport, PendingFilter, PendingStats, RecordId,
    RecoveryReport, ReindexOptions, ReindexProgress, RepairReport, SagaId, SagaRecord, SagaState,
    Scope, SearchQuery, VerifyReport, WriteOptions,
};

use crate::backend::{AppCoordinator, MigrateReport, Stores};
use crate::cli::EmbedMode;
use crate::cli::{
    DeleteArgs, DlqCommand, DlqTargets, IndexWorkerArgs, ReindexArgs, SagaCommand, SearchArgs,
    VerifyArgs,
};
use crate::error::{AppError, EXIT_FAILED, EXIT_OK};
use crate::output::{self, Output};

/// Rows of a listing shown in a table (JSON shows all).
const SHOWN: usize = 10;

/// Parses `key=value`; the value is JSON when it parses as JSON, else a string.
pub fn parse_where(s: &str) -> Result<(String, Value), AppError> {
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| AppError::Usage(format!("--where {s:?}: expected KEY=VALUE")))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(AppError::Usage(format!("--where {s:?}: the key is empty")));
    }
    let value =
        serde_json::from_str::<Value>(value).unwrap_or_else(|_| Value::String(value.into()));
    Ok((key.to_owned(), value))
}

/// `tandem delete`.
pub async fn delete(
    args: DeleteArgs,
    stores: &Stores,
    c: &AppCoordinator,
    out: Output,
) -> Result<u8, AppError> {
    let selector = if !args.ids.is_empty() {
        DeleteSelector::Ids(parse_ids("--ids", &args.ids)?)
    } else {
        let scope = Scope::new(args.scope.unwrap_or_default());
        match args.where_eq.as_deref().map(parse_where).transpose()? {
            Some((key, value)) => DeleteSelector::MetadataEq { scope, key, value },
            None => DeleteSelector::Scope(scope),
        }
    };
    let opts = WriteOptions {
        idempotency_key: args.idempotency_key,
        write_mode: None,
    };
    let report = c
        .delete_with(selector, &opts)
        .await
        .map_err(|e| stores.error("delete", e))?;
    if out.json {
        out.json(&report);
    } else {
        let mut line = format!("deleted {} records", output::count(report.deleted));
        if report.replayed {
            line.push_str(" (replayed from the idempotency key: nothing deleted now)");
        }
        out.text(&line);
        if report.deferred_cleanup > 0 {
            out.text(&format!(
                "{} index points are left for `tandem recover` to delete; searches never return them",
                output::count(report.deferred_cleanup as u64)
            ));
        }
    }
    Ok(EXIT_OK)
}

/// One search hit for output.
#[derive(Serialize)]
struct Hit {
    score: f32,
    id: RecordId,
    scope: Scope,
    version: u64,
    content: String,
    metadata: Value,
}

/// `tandem search`.
pub async fn search(
    args: SearchArgs,
    stores: &Stores,
    c: &AppCoordinator,
    settings: &crate::settings::Settings,
    out: Output,
) -> Result<u8, AppError> {
    let vector = match (&args.vector, &args.text) {
        (Some(v), _) => serde_json::from_str::<Vec<f32>>(v).map_err(|e| {
            AppError::Usage(format!("--vector: expected a JSON array of numbers: {e}"))
        })?,
        (None, Some(t)) => embed_query(t, settings).await?,
        (None, None) => return Err(AppError::Usage("give --vector or --text".into())),
    };
    let mut filter = Filter {
        scope: args.scope.map(Scope::new),
        ..Filter::default()
    };
    for w in &args.where_eq {
        let (k, v) = parse_where(w)?;
        filter.metadata_eq.insert(k, v);
    }
    let query = SearchQuery {
        vector,
        k: args.k,
        filter,
        score_threshold: args.min_score,
    };
    let hits = c
        .search(&query)
        .await
        .map_err(|e| stores.error("search", e))?;
    let hits: Vec<Hit> = hits
        .into_iter()
        .map(|h| Hit {
            score: h.score,
            id: h.record.id,
            scope: h.record.scope,
            version: h.record.version,
            content: h.record.content,
            metadata: Value::Object(h.record.metadata),
        })
        .collect();
    if out.json {
        out.json(&hits);
    } else if hits.is_empty() {
        out.text("no hits");
    } else {
        let rows = hits
            .iter()
            .enumerate()
            .map(|(i, h)| {
                vec![
                    (i + 1).to_string(),
                    format!("{:.4}", h.score),
                    h.id.to_string(),
                    h.scope.to_string(),
                    output::truncate(&h.content, 48),
                    output::truncate(&h.metadata.to_string(), 40),
                ]
            })
            .collect();
        out.text(&output::table(
            &["#", "score", "id", "scope", "content", "metadata"],
            &[true, true, false, false, false, false],
            rows,
        ));
    }
    Ok(EXIT_OK)
}

/// The vector of a `--text` query: the configured embedder's (the hash
/// embedding when none is configured, as ingest's `--embed hash`).
async fn embed_query(
    text: &str,
    settings: &crate::settings::Settings,
) -> Result<Vec<f32>, AppError> {
    let mode = match settings.embed.mode {
        EmbedMode::None => EmbedMode::Hash,
        mode => mode,
    };
    let Some(embedder) = crate::embed::build(&settings.embed, mode, settings.dimension)? else {
        return Err(AppError::Usage("--text needs an embedder".into()));
    };
    let what = crate::embed::describe(embedder.as_ref(), &settings.embed);
    match embedder.embed(&[text.to_owned()]).await {
        Ok(mut vectors) if vectors.len() == 1 => Ok(vectors.remove(0)),
        Ok(_) => Err(AppError::Failed(format!(
            "--text: {what} returned no vector for the query"
        ))),
        Err(tandem_core::EmbedError::InvalidInput { message, .. }) => Err(AppError::Usage(
            format!("--text: {what} cannot embed the query: {message}"),
        )),
        Err(tandem_core::EmbedError::Protocol(
            tandem_core::ProtocolViolation::WrongDimension { expected, got, .. },
        )) => Err(AppError::Usage(format!(
            "--text: {what} returns vectors of {got} dimensions, but the collection's \
             dimension is {expected} (--dim)"
        ))),
        Err(e) => Err(crate::embed::error(e, &what, "--text: ")),
    }
}

/// What `recover` reports.
#[derive(Serialize)]
struct RecoverOutput {
    #[serde(flatten)]
    report: RecoveryReport,
    /// Unresolved intents left (writes in flight, or leases not yet ended).
    pending_intents: usize,
}

/// `tandem recover`: exit 1 when an intent could not be handled.
pub async fn recover(stores: &Stores, c: &AppCoordinator, out: Output) -> Result<u8, AppError> {
    let report = c.recover().await.map_err(|e| stores.error("recover", e))?;
    let stats = c.stats().await.map_err(|e| stores.error("recover", e))?;
    let failed = report.failed + report.sagas_failed;
    let o = RecoverOutput {
        report,
        pending_intents: stats.live_intents,
    };
    if out.json {
        out.json(&o);
    } else {
        out.text(&output::kv_table(vec![
            (
                "expired intents claimed",
                output::count(o.report.claimed as u64),
            ),
            ("intents resolved", output::count(o.report.resolved as u64)),
            (
                "garbage points deleted",
                output::count(o.report.points_deleted as u64),
            ),
            ("intents failed", output::count(o.report.failed as u64)),
            (
                "intents still pending (lease not ended)",
                output::count(o.pending_intents as u64),
            ),
            (
                "sagas ended forward",
                output::count(o.report.sagas_done as u64),
            ),
            (
                "sagas compensated",
                output::count(o.report.sagas_compensated as u64),
            ),
            ("sagas failed", output::count(o.report.sagas_failed as u64)),
        ]));
    }
    Ok(if failed > 0 { EXIT_FAILED } else { EXIT_OK })
}

/// What `verify` reports.
#[derive(Serialize)]
struct VerifyOutput {
    consistent: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    recovery: Option<RecoveryReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    repair: Option<RepairSummary>,
    #[serde(flatten)]
    report: VerifyReport,
}

#[derive(Serialize)]
struct RepairSummary {
    orphans_deleted: usize,
    orphans_too_young: usize,
    missing_rewritten: usize,
    missing_unrepairable: usize,
}

/// `tandem verify`: exit 0 only when consistent.
pub async fn verify(
    args: VerifyArgs,
    stores: &Stores,
    c: &AppCoordinator,
    out: Output,
) -> Result<u8, AppError> {
    let scope = args.scope.map(Scope::new);
    let (report, recovery, repair) = if args.repair {
        let recovery = c.recover().await.map_err(|e| stores.error("recover", e))?;
        let RepairReport {
            orphans_deleted,
            orphans_too_young,
            missing_rewritten,
            missing_unrepairable,
            after,
        } = c
            .repair(scope.as_ref())
            .await
            .map_err(|e| stores.error("repair", e))?;
        (
            after,
            Some(recovery),
            Some(RepairSummary {
                orphans_deleted,
                orphans_too_young,
                missing_rewritten,
                missing_unrepairable,
            }),
        )
    } else {
        let report = c
            .verify(scope.as_ref())
            .await
            .map_err(|e| stores.error("verify", e))?;
        (report, None, None)
    };
    let consistent = report.is_consistent();
    let o = VerifyOutput {
        consistent,
        recovery,
        repair,
        report,
    };
    if out.json {
        out.json(&o);
    } else {
        print_verify(&o, out);
    }
    Ok(if consistent { EXIT_OK } else { EXIT_FAILED })
}

fn print_verify(o: &VerifyOutput, out: Output) {
    if let Some(r) = &o.recovery {
        out.text(&format!(
            "recovery: {} expired intents claimed, {} resolved, {} garbage points deleted, {} failed",
            r.claimed, r.resolved, r.points_deleted, r.failed
        ));
    }
    if let Some(r) = &o.repair {
        out.text(&format!(
            "repair: {} orphan points deleted ({} too young to touch), {} missing points rewritten, {} unrepairable",
            r.orphans_deleted, r.orphans_too_young, r.missing_rewritten, r.missing_unrepairable
        ));
    }
    out.text(&scope_table(&o.report));
    out.text(&output::kv_table(vec![
        (
            "missing points (rows without their vector)",
            output::count(o.report.missing_points.len() as u64),
        ),
        (
            "orphan points (vectors without a row or intent)",
            output::count(o.report.orphan_points.len() as u64),
        ),
        ("live intents", output::count(o.report.live_intents as u64)),
        (
            "of those held by live sagas",
            output::count(o.report.held_intents as u64),
        ),
        (
            "points named by live intents",
            output::count(o.report.intent_points as u64),
        ),
        (
            "deferred writes waiting for an index worker",
            output::count(o.report.pending_index),
        ),
        (
            "of the rows, never indexed yet",
            output::count(o.report.unindexed as u64),
        ),
        (
            "dead letters (tandem dlq list)",
            output::count(o.report.dead_letters),
        ),
    ]));
    for m in o.report.missing_points.iter().take(SHOWN) {
        out.text(&format!(
            "  missing: record {} (scope {}) → point {}",
            m.id, m.scope, m.point_id
        ));
    }
    for p in o.report.orphan_points.iter().take(SHOWN) {
        out.text(&format!(
            "  orphan: point {} (record {}, scope {})",
            p.id, p.record_id, p.scope
        ));
    }
    if o.consistent {
        out.text("consistent: both stores agree exactly");
    } else if o.report.missing_points.is_empty()
        && o.report.orphan_points.is_empty()
        && o.report.pending_index > 0
    {
        out.text(
            "NOT consistent yet: deferred writes wait for an index worker (`tandem index-worker`, \
             or `tandem serve`), then verify again",
        );
    } else if o.report.missing_points.is_empty()
        && o.report.orphan_points.is_empty()
        && o.report.live_intents > 0
        && o.report.live_intents == o.report.held_intents
    {
        out.text(
            "NOT consistent: live sagas hold the points their steps superseded; they are \
             released when each saga ends (`tandem saga list`), then verify again",
        );
    } else if o.report.missing_points.is_empty()
        && o.report.orphan_points.is_empty()
        && o.report.live_intents > 0
    {
        out.text(
            "NOT consistent: writes are pending (live intents); run `tandem recover` once their \
             lease has ended, then verify again",
        );
    } else {
        out.text("NOT consistent: run `tandem verify --repair`");
    }
}

/// Per-scope counts in both stores, with a total row.
pub fn scope_table(r: &VerifyReport) -> String {
    let mut rows: Vec<Vec<String>> = r
        .scopes
        .iter()
        .map(|(s, c)| {
            vec![
                s.to_string(),
                output::count(c.rows),
                output::count(c.points),
                if c.rows == c.points { "yes" } else { "NO" }.into(),
            ]
        })
        .collect();
    let rows_total: u64 = r.scopes.values().map(|c| c.rows).sum();
    let points_total: u64 = r.scopes.values().map(|c| c.points).sum();
    rows.push(vec![
        "total".into(),
        output::count(rows_total),
        output::count(points_total),
        if rows_total == points_total {
            "yes"
        } else {
            "NO"
        }
        .into(),
    ]);
    output::table(
        &["scope", "rows (metadata)", "points (index)", "in sync"],
        &[false, true, true, false],
        rows,
    )
}

/// `tandem stats`.
pub async fn stats(stores: &Stores, c: &AppCoordinator, out: Output) -> Result<u8, AppError> {
    let s = c.stats().await.map_err(|e| stores.error("stats", e))?;
    if out.json {
        #[derive(Serialize)]
        struct StatsOutput<'a> {
            metadata_store: &'a str,
            vector_index: &'a str,
            rows: u64,
            #[serde(flatten)]
            stats: &'a tandem_core::Stats,
        }
        out.json(&StatsOutput {
            metadata_store: &stores.metadata_name,
            vector_index: &stores.index_name_now(),
            rows: s.rows_by_scope.values().sum(),
            stats: &s,
        });
    } else {
        out.text(&format!("metadata: {}", stores.metadata_name));
        out.text(&format!("index:    {}", stores.index_name_now()));
        let mut rows: Vec<Vec<String>> = s
            .rows_by_scope
            .iter()
            .map(|(scope, n)| vec![scope.to_string(), output::count(*n)])
            .collect();
        rows.push(vec![
            "total".into(),
            output::count(s.rows_by_scope.values().sum()),
        ]);
        out.text(&output::table(&["scope", "rows"], &[false, true], rows));
        out.text(&output::kv_table(vec![
            ("points in the index", output::count(s.points)),
            ("live intents", output::count(s.live_intents as u64)),
            (
                "of those held by live sagas",
                output::count(s.held_intents as u64),
            ),
            (
                "expired intents (recovery backlog)",
                output::count(s.expired_intents as u64),
            ),
            (
                "spent intents (resolved by recovery after their lease)",
                output::count(s.spent_intents as u64),
            ),
        ]));
        if let Some(p) = s.pending {
            let age = p
                .oldest_enqueued_ms
                .map(|t| tandem_core::unix_ms(std::time::SystemTime::now()).saturating_sub(t))
                .map_or("-".to_owned(), |ms| {
                    format!("{:.1} s", ms.max(0) as f64 / 1000.0)
                });
            out.text(&output::kv_table(vec![
                ("deferred writes waiting", output::count(p.pending)),
                ("of those claimed by a worker", output::count(p.claimed)),
                ("oldest waiting", age),
                (
                    "indexed in the last minute",
                    output::count(p.indexed_last_minute),
                ),
                (
                    "indexing rate (all workers)",
                    format!("{:.1} records/s", p.indexing_rate()),
                ),
                ("dead letters", output::count(p.dead)),
            ]));
        }
    }
    Ok(EXIT_OK)
}

/// `tandem saga list|show|abort`. `show` of an unknown id, and `abort` of a
/// saga that cannot be aborted, exit 1.
pub async fn saga(
    command: SagaCommand,
    stores: &Stores,
    c: &AppCoordinator,
    out: Output,
) -> Result<u8, AppError> {
    match command {
        SagaCommand::List(args) => {
            if args.limit == 0 {
                return Err(AppError::Usage("--limit must be at least 1".into()));
            }
            let state = args.state.map(SagaState::from);
            let sagas = c
                .sagas(state, args.limit)
                .await
                .map_err(|e| stores.error("listing sagas", e))?;
            if out.json {
                out.json(&sagas);
                return Ok(EXIT_OK);
            }
            if sagas.is_empty() {
                out.text("no sagas");
                return Ok(EXIT_OK);
            }
            let now = tandem_core::unix_ms(std::time::SystemTime::now());
            let rows = sagas
                .iter()
                .map(|s| {
                    vec![
                        s.id.to_string(),
                        s.name.clone(),
                        s.state.as_str().to_owned(),
                        steps_summary(s),
                        ago(now, s.updated_ms),
                        s.last_error.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            out.text(&output::table(
                &["saga", "name", "state", "steps", "updated", "last error"],
                &[false, false, false, true, true, false],
                rows,
            ));
            Ok(EXIT_OK)
        }
        SagaCommand::Show { id } => {
            let id = parse_saga_id(&id)?;
            let saga = c
                .saga(id)
                .await
                .map_err(|e| stores.error("reading the saga", e))?
                .ok_or_else(|| AppError::Failed(format!("no saga {id}")))?;
            print_saga(&saga, out);
            Ok(EXIT_OK)
        }
        SagaCommand::Abort { id } => {
            let id = parse_saga_id(&id)?;
            let outcome = match c.abort_saga(id).await {
                Ok(o) => o,
                Err(
                    e @ (CoordinatorError::SagaNotFound(_) | CoordinatorError::CannotAbort(..)),
                ) => {
                    return Err(AppError::Failed(format!("cannot abort: {e}")));
                }
                Err(e) => return Err(stores.error(&format!("aborting saga {id}"), e)),
            };
            if out.json {
                out.json(&outcome);
            } else {
                out.text(&format!("saga {id}: {}", outcome.state.as_str()));
                if !outcome.conflicts.is_empty() {
                    out.text(&format!(
                        "{} records were left as they are: they changed after the step that \
                         wrote them",
                        outcome.conflicts.len()
                    ));
                }
            }
            Ok(if outcome.state == SagaState::Compensated {
                EXIT_OK
            } else {
                EXIT_FAILED
            })
        }
    }
}

fn parse_saga_id(id: &str) -> Result<SagaId, AppError> {
    id.trim()
        .parse()
        .map_err(|_| AppError::Usage(format!("{id:?} is not a saga id (a UUID)")))
}

/// "3/4 done" style: steps done (or compensated) of those journaled.
fn steps_summary(s: &SagaRecord) -> String {
    use tandem_core::StepState;
    let done = s
        .steps
        .iter()
        .filter(|st| st.state == StepState::Done)
        .count();
    let undone = s
        .steps
        .iter()
        .filter(|st| st.state == StepState::Compensated)
        .count();
    match undone {
        0 => format!("{done}/{} done", s.steps.len()),
        n => format!("{done}/{} done, {n} undone", s.steps.len()),
    }
}

fn ago(now_ms: i64, then_ms: i64) -> String {
    let secs = (now_ms.saturating_sub(then_ms)).max(0) / 1000;
    match secs {
        s if s < 120 => format!("{s} s ago"),
        s if s < 7200 => format!("{} min ago", s / 60),
        s => format!("{} h ago", s / 3600),
    }
}

fn print_saga(s: &SagaRecord, out: Output) {
    if out.json {
        out.json(s);
        return;
    }
    let now = tandem_core::unix_ms(std::time::SystemTime::now());
    let mut rows = vec![
        ("saga", s.id.to_string()),
        ("name", s.name.clone()),
        ("state", s.state.as_str().to_owned()),
        ("steps", steps_summary(s)),
        ("input", s.input.to_string()),
        ("created", ago(now, s.created_ms)),
        ("updated", ago(now, s.updated_ms)),
        ("claimed by recovery", output::count(u64::from(s.attempts))),
    ];
    if s.state.is_live() {
        let lease = match s.lease_deadline_ms - now {
            left if left > 0 => format!("ends in {} s", left / 1000),
            _ => "ended (recovery may take it over)".to_owned(),
        };
        rows.push(("lease", lease));
    }
    if let Some(e) = &s.last_error {
        rows.push(("last error", e.clone()));
    }
    out.text(&output::kv_table(rows));
    let steps = s
        .steps
        .iter()
        .enumerate()
        .map(|(i, st)| {
            vec![
                i.to_string(),
                st.name.clone(),
                format!("{:?}", st.kind).to_lowercase(),
                format!("{:?}", st.state).to_lowercase(),
                if st.pivot {
                    "pivot".into()
                } else {
                    String::new()
                },
                st.key.clone(),
            ]
        })
        .collect();
    out.text(&output::table(
        &["#", "step", "kind", "state", "", "idempotency key"],
        &[true, false, false, false, false, false],
        steps,
    ));
}

/// `tandem migrate`.
pub fn print_migrate(r: &MigrateReport, out: Output) {
    if out.json {
        out.json(r);
    } else {
        out.text(&format!(
            "{}: up to date ({} migrations applied now)",
            r.metadata, r.migrations_applied
        ));
        out.text(&format!("{}: collection ready", r.index));
    }
}

/// Record ids given on the command line (`what`: where, for the message).
fn parse_ids(what: &str, ids: &[String]) -> Result<Vec<RecordId>, AppError> {
    ids.iter()
        .map(|s| {
            s.trim()
                .parse::<RecordId>()
                .map_err(|_| AppError::Usage(format!("{what}: {s:?} is not a UUID")))
        })
        .collect()
}

/// `tandem index-worker`: runs an index worker (and recovery) until
/// interrupted, or with `--until-idle` until nothing is pending. Exit 1 when
/// entries are left dead-lettered or still waiting after the patience.
pub async fn index_worker(
    args: IndexWorkerArgs,
    stores: &Stores,
    c: &AppCoordinator,
    out: Output,
) -> Result<u8, AppError> {
    let report = if args.until_idle {
        let patience = args.patience.unwrap_or(Duration::from_secs(600));
        c.index_until_idle(patience)
            .await
            .map_err(|e| stores.error("index-worker", e))?
    } else {
        let stop = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        c.run_index_worker(stop)
            .await
            .map_err(|e| stores.error("index-worker", e))?
    };
    let pending = c
        .pending_stats()
        .await
        .map_err(|e| stores.error("index-worker", e))?;
    #[derive(Serialize)]
    struct WorkerOutput {
        #[serde(flatten)]
        report: IndexReport,
        pending: PendingStats,
    }
    let left = pending.pending + pending.dead;
    if out.json {
        out.json(&WorkerOutput { report, pending });
    } else {
        out.text(&output::kv_table(vec![
            ("records indexed", output::count(report.indexed as u64)),
            (
                "entries overtaken by a newer write",
                output::count(report.superseded as u64),
            ),
            ("batches", output::count(report.batches as u64)),
            ("failed attempts", output::count(report.failed as u64)),
            (
                "dead-lettered now",
                output::count(report.dead_lettered as u64),
            ),
            ("still waiting", output::count(pending.pending)),
            ("dead letters", output::count(pending.dead)),
        ]));
    }
    Ok(if left == 0 { EXIT_OK } else { EXIT_FAILED })
}

/// `tandem dlq list|retry|drop`.
pub async fn dlq(
    command: DlqCommand,
    stores: &Stores,
    c: &AppCoordinator,
    out: Output,
) -> Result<u8, AppError> {
    let targets = |t: &DlqTargets| -> Result<Option<Vec<RecordId>>, AppError> {
        match (t.all, t.ids.is_empty()) {
            (true, _) => Ok(None),
            (false, false) => parse_ids("record ids", &t.ids).map(Some),
            (false, true) => Err(AppError::Usage(
                "name the records (ids), or --all".to_owned(),
            )),
        }
    };
    match command {
        DlqCommand::List { limit } => {
            let dead = c
                .pending(PendingFilter::Dead, None, limit)
                .await
                .map_err(|e| stores.error("dlq list", e))?;
            if out.json {
                #[derive(Serialize)]
                struct Entry<'a> {
                    id: RecordId,
                    scope: &'a Scope,
                    version: u64,
                    indexed_version: u64,
                    attempts: u32,
                    last_error: Option<&'a str>,
                    enqueued_ms: i64,
                }
                let entries: Vec<Entry<'_>> = dead
                    .iter()
                    .map(|e| Entry {
                        id: e.record_id,
                        scope: &e.scope,
                        version: e.version,
                        indexed_version: e.indexed_version,
                        attempts: e.attempts,
                        last_error: e.last_error.as_deref(),
                        enqueued_ms: e.enqueued_ms,
                    })
                    .collect();
                out.json(&serde_json::json!({ "dead_letters": entries }));
            } else if dead.is_empty() {
                out.text("no dead letters");
            } else {
                let rows = dead
                    .iter()
                    .map(|e| {
                        vec![
                            e.record_id.to_string(),
                            e.scope.to_string(),
                            e.version.to_string(),
                            e.attempts.to_string(),
                            e.last_error.clone().unwrap_or_default(),
                        ]
                    })
                    .collect();
                out.text(&output::table(
                    &["record", "scope", "version", "attempts", "last error"],
                    &[false, false, true, true, false],
                    rows,
                ));
            }
            Ok(EXIT_OK)
        }
        DlqCommand::Retry(t) => {
            let ids = targets(&t)?;
            let n = c
                .retry_dead_letters(ids.as_deref())
                .await
                .map_err(|e| stores.error("dlq retry", e))?;
            if out.json {
                out.json(&serde_json::json!({ "requeued": n }));
            } else {
                out.text(&format!("{} requeued", output::count(n)));
            }
            Ok(EXIT_OK)
        }
        DlqCommand::Drop(t) => {
            let ids = targets(&t)?;
            let n = c
                .drop_dead_letters(ids.as_deref())
                .await
                .map_err(|e| stores.error("dlq drop", e))?;
            if out.json {
                out.json(&serde_json::json!({ "dropped": n }));
            } else {
                out.text(&format!("{} dropped", output::count(n)));
            }
            Ok(EXIT_OK)
        }
    }
}

/// `tandem reindex`: build a new collection and switch to it, resume an open
/// migration, abort one, drop the retired collection, or show the state.
pub async fn reindex(
    args: ReindexArgs,
    stores: &Stores,
    c: &AppCoordinator,
    settings: &crate::settings::Settings,
    out: Output,
) -> Result<u8, AppError> {
    let fail = |e| stores.error("reindex", e);
    if args.status {
        let state = c.refresh_index().await.map_err(fail)?;
        if out.json {
            out.json(&state);
        } else {
            let migration = state.migration.as_ref();
            out.text(&output::kv_table(vec![
                ("generation", state.generation.to_string()),
                (
                    "active collection",
                    state
                        .active
                        .clone()
                        .unwrap_or_else(|| settings.collection.clone()),
                ),
                (
                    "retired collection",
                    state.retired.clone().unwrap_or_else(|| "-".into()),
                ),
                (
                    "open migration",
                    migration.map_or_else(
                        || "-".into(),
                        |m| format!("to {} ({} rows copied)", m.spec.target, m.copied),
                    ),
                ),
            ]));
        }
        return Ok(EXIT_OK);
    }
    if args.abort {
        let dropped = c.abort_reindex().await.map_err(fail)?;
        if out.json {
            out.json(&serde_json::json!({ "aborted": dropped }));
        } else {
            out.text(&match dropped {
                Some(target) => {
                    format!("aborted the migration to {target}; its collection is dropped")
                }
                None => "no migration was open".into(),
            });
        }
        return Ok(EXIT_OK);
    }
    if args.drop_retired {
        let dropped = c.drop_retired().await.map_err(fail)?;
        if out.json {
            out.json(&serde_json::json!({ "dropped": dropped }));
        } else {
            out.text(&match dropped {
                Some(name) => format!("dropped the retired collection {name}"),
                None => "no retired collection".into(),
            });
        }
        return Ok(EXIT_OK);
    }
    let Some(target) = args.to_collection else {
        return Err(AppError::Usage("--to-collection NAME is required".into()));
    };
    let embedder = match settings.embed.mode {
        EmbedMode::None => None,
        mode => {
            let dim = args.to_dim.unwrap_or(settings.dimension);
            let e = crate::embed::build(&settings.embed, mode, dim)?;
            if let Some(e) = &e {
                crate::embed::check_dimension(e.as_ref(), &settings.embed).await?;
            }
            e
        }
    };
    let options = ReindexOptions {
        target,
        dimension: args.to_dim,
        distance: args.to_distance,
        embedder,
        switch: !args.no_switch,
        drop_old: args.drop_old,
    };
    let bar = (!out.quiet && !out.json && std::io::stderr().is_terminal()).then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {elapsed_precise} [{wide_bar}] {pos}/{len} rows · {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    });
    let lines = !out.quiet && bar.is_none();
    let last_line = std::sync::Mutex::new(None::<std::time::Instant>);
    let progress = |p: &ReindexProgress| {
        if let Some(bar) = &bar {
            bar.set_length(p.total.max(p.copied));
            bar.set_position(p.copied);
            bar.set_message(format!(
                "{} · {:.0} rows/s{}",
                p.phase,
                p.rate,
                p.eta_s
                    .map(|s| format!(" · ETA {s:.0}s"))
                    .unwrap_or_default()
            ));
        } else if lines {
            // Plain lines (or JSON lines with --json) on stderr, at most
            // once a second, and every phase change.
            let mut last = last_line.lock().unwrap_or_else(|e| e.into_inner());
            let due =
                last.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) || p.phase != "copying";
            if due {
                *last = Some(std::time::Instant::now());
                let line = if out.json {
                    serde_json::to_string(p).unwrap_or_default()
                } else {
                    format!(
                        "reindex: {} {}/{} rows, {:.0} rows/s{}",
                        p.phase,
                        p.copied,
                        p.total,
                        p.rate,
                        p.eta_s
                            .map(|s| format!(", ETA {s:.0}s"))
                            .unwrap_or_default()
                    )
                };
                eprintln!("{line}");
            }
        }
    };
    let result = c.reindex(&options, &progress).await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let report = result.map_err(fail)?;
    if out.json {
        out.json(&report);
    } else {
        let state = &report.state;
        out.text(&output::kv_table(vec![
            (
                "active collection",
                state
                    .active
                    .clone()
                    .unwrap_or_else(|| settings.collection.clone()),
            ),
            ("switched", report.switched.to_string()),
            ("resumed an earlier run", report.resumed.to_string()),
            ("rows copied", output::count(report.copied)),
            (
                "deferred inserts left to the workers",
                output::count(report.skipped),
            ),
            (
                "stale points deleted from the target",
                output::count(report.garbage_deleted),
            ),
            (
                "in-flight writes fenced (retryable)",
                output::count(report.fenced),
            ),
            ("switch rounds", report.switch_rounds.to_string()),
            (
                "retired collection",
                report
                    .dropped
                    .as_ref()
                    .map(|d| format!("{d} (dropped)"))
                    .or_else(|| state.retired.clone())
                    .unwrap_or_else(|| "-".into()),
            ),
            ("seconds", format!("{:.1}", report.elapsed_s)),
        ]));
    }
    Ok(EXIT_OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn where_values_are_json_when_they_parse() {
        assert_eq!(
            parse_where("item=42").unwrap(),
            ("item".into(), Value::from(42))
        );
        assert_eq!(
            parse_where("item=\"42\"").unwrap(),
            ("item".into(), Value::from("42"))
        );
        assert_eq!(
            parse_where("item=books-7").unwrap(),
            ("item".into(), Value::from("books-7"))
        );
        assert_eq!(
            parse_where("flag=true").unwrap(),
            ("flag".into(), Value::from(true))
        );
        assert_eq!(
            parse_where("a=b=c").unwrap(),
            ("a".into(), Value::from("b=c"))
        );
        assert!(parse_where("novalue").is_err());
        assert!(parse_where("=x").is_err());
    }
}
