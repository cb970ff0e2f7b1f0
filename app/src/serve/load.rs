//! `tandem bench-api`: the HTTP API of `tandem serve` against the library,
//! on the same stores and the same batches.
//!
//! One coordinator over the configured stores (fresh embedded stores in a
//! temporary directory by default) serves both sides: the library side calls
//! it directly from `--concurrency` tasks; the HTTP side sends the same kind
//! of calls from as many blocking HTTP clients (one connection each, kept
//! alive) to the service's router, started in this process on a loopback
//! port. Each pass writes fresh records (upsert batches), then runs searches;
//! passes alternate sides and repeat. Reported: calls per second, records per
//! second and the p50 / p99 latency of each side, and the HTTP overhead. The
//! client runs on the same cores as the server, so the HTTP side also pays
//! for its client: see docs/performance.md.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use serde_json::json;
use tandem_core::{NewRecord, SearchQuery, WriteOptions};

use super::{ApiLimits, ApiState, InFlight, routes, status};
use crate::backend::{AppCoordinator, Stores};
use crate::bench::data;
use crate::bench::report::{Latency, Machine, latency};
use crate::error::{AppError, EXIT_OK};
use crate::output::{self, Output};
use crate::settings::{IndexTarget, MetadataTarget, Settings};

/// `tandem bench-api`.
#[derive(Debug, Args)]
pub struct BenchApiArgs {
    /// Records per upsert batch.
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub batch_size: usize,

    /// Upsert batches per pass.
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub batches: usize,

    /// Searches per pass (k = 10).
    #[arg(long, default_value_t = 500, value_name = "N")]
    pub queries: usize,

    /// Calls in flight at once (tasks for the library, HTTP clients for the API).
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub concurrency: usize,

    /// Passes per side (the sides alternate, starting with the other one each time).
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub repeat: usize,

    /// Seed of the generated data.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,

    /// Where the embedded stores are created when no server is configured
    /// [default: the system temp dir].
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
}

/// Which side a pass measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Side {
    Library,
    Http,
}

/// The results of one operation on one side, over every pass.
#[derive(Clone, Debug, Serialize)]
struct Measured {
    operation: &'static str,
    side: Side,
    calls: usize,
    records: usize,
    seconds: f64,
    calls_per_sec: f64,
    records_per_sec: f64,
    latency_ms: Latency,
}

/// The report.
#[derive(Serialize)]
struct Report {
    command: String,
    version: &'static str,
    machine: Machine,
    metadata_store: String,
    vector_index: String,
    params: serde_json::Value,
    results: Vec<Measured>,
}

/// One pass's calls: latencies (µs), wall time, records.
#[derive(Default)]
struct Pass {
    latencies_us: Vec<u64>,
    seconds: f64,
    records: usize,
}

/// `tandem bench-api`.
pub async fn run(args: BenchApiArgs, settings: &Settings, out: Output) -> Result<u8, AppError> {
    if args.batch_size == 0 || args.batches == 0 || args.concurrency == 0 || args.repeat == 0 {
        return Err(AppError::Usage(
            "bench-api: --batch-size, --batches, --concurrency and --repeat must be positive"
                .into(),
        ));
    }
    // Fresh embedded stores, unless servers are configured.
    let mut settings = settings.clone();
    let _tmp = if settings.uses_data_dir() {
        let base = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
        let tmp = tempfile::Builder::new()
            .prefix("tandem-bench-api-")
            .tempdir_in(&base)
            .map_err(|e| {
                AppError::Failed(format!("bench-api: temp dir in {}: {e}", base.display()))
            })?;
        settings.data_dir = tmp.path().to_path_buf();
        if let MetadataTarget::Sqlite { path } = &mut settings.metadata {
            *path = tmp.path().join("metadata.sqlite3");
        }
        if let IndexTarget::Edge { path } = &mut settings.index {
            *path = tmp.path().join("index");
        }
        Some(tmp)
    } else {
        None
    };
    let mut config = settings.coordinator.clone();
    config.limits.max_batch = config.limits.max_batch.max(args.batch_size);
    let stores = Stores::open(&settings).await?;
    let coordinator = Arc::new(stores.coordinator(config)?);

    // The service's router, in this process, over the same coordinator.
    let state = ApiState {
        coordinator: coordinator.clone(),
        store_names: Arc::new([stores.metadata_name.clone(), stores.index_name.clone()]),
        redactor: settings.redactor.clone(),
        limits: ApiLimits {
            max_body_bytes: 256 * 1024 * 1024,
            max_batch: args.batch_size.max(1),
            max_k: 1000,
            request_timeout: Duration::from_secs(120),
        },
        dimension: settings.dimension,
        writes: Arc::new(InFlight::default()),
        snapshots: Arc::new(status::Snapshots::default()),
        prometheus: metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| AppError::Failed(format!("bench-api: cannot listen: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| AppError::Failed(format!("bench-api: {e}")))?;
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, routes::router(state, None)).await;
    });
    let base = format!("http://{addr}");

    let dim = settings.dimension;
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    let mut results: Vec<(&'static str, Side, Pass)> = Vec::new();
    let mut scopes = Vec::new();
    for rep in 0..args.repeat {
        let order = if rep % 2 == 0 {
            [Side::Http, Side::Library]
        } else {
            [Side::Library, Side::Http]
        };
        for side in order {
            let scope_count = 4;
            let seed = args.seed ^ ((rep as u64) << 32) ^ (side as u64);
            let mut batches = data::batches(
                args.batch_size * args.batches,
                args.batch_size,
                dim,
                scope_count,
                seed,
            );
            // Scopes of their own, so the run can be deleted afterwards.
            let prefix = format!("bench-api-{run_id}-{rep}-{side:?}");
            for b in &mut batches {
                for r in b.iter_mut() {
                    r.scope = format!("{prefix}-{}", r.scope.as_str()).into();
                }
            }
            for i in 0..scope_count {
                scopes.push(format!("{prefix}-{}", data::scope_name(i, scope_count)));
            }
            if !out.quiet {
                eprintln!(
                    "bench-api: pass {} of {}: {side:?} upserts",
                    rep + 1,
                    args.repeat
                );
            }
            let pass = upserts(side, &coordinator, &base, batches, args.concurrency).await?;
            results.push(("upsert", side, pass));
            let mut rng = fastrand::Rng::with_seed(seed);
            let queries: Vec<Vec<f32>> = (0..args.queries)
                .map(|_| data::vector(&mut rng, dim))
                .collect();
            let pass = searches(side, &coordinator, &base, queries, args.concurrency).await?;
            results.push(("search", side, pass));
        }
    }
    server.abort();

    // Leave the stores as they were: delete every scope the run wrote.
    for scope in &scopes {
        coordinator
            .delete(tandem_core::DeleteSelector::Scope(scope.as_str().into()))
            .await
            .map_err(|e| stores.error("bench-api cleanup", e))?;
    }

    let mut measured = Vec::new();
    for op in ["upsert", "search"] {
        for side in [Side::Library, Side::Http] {
            let passes: Vec<&Pass> = results
                .iter()
                .filter(|(o, s, _)| *o == op && *s == side)
                .map(|(_, _, p)| p)
                .collect();
            let calls: usize = passes.iter().map(|p| p.latencies_us.len()).sum();
            let records: usize = passes.iter().map(|p| p.records).sum();
            let seconds: f64 = passes.iter().map(|p| p.seconds).sum();
            measured.push(Measured {
                operation: op,
                side,
                calls,
                records,
                seconds,
                calls_per_sec: calls as f64 / seconds.max(1e-9),
                records_per_sec: records as f64 / seconds.max(1e-9),
                latency_ms: latency(passes.iter().flat_map(|p| p.latencies_us.iter().copied())),
            });
        }
    }
    let report = Report {
        command: std::env::args()
            .map(|a| {
                std::path::Path::new(&a)
                    .file_name()
                    .map_or(a.clone(), |n| n.to_string_lossy().into_owned())
            })
            .take(1)
            .chain(std::env::args().skip(1).filter(|a| !a.contains("://")))
            .collect::<Vec<_>>()
            .join(" "),
        version: env!("CARGO_PKG_VERSION"),
        machine: Machine::here(),
        metadata_store: stores.metadata_name.clone(),
        vector_index: stores.index_name.clone(),
        params: json!({
            "batch_size": args.batch_size,
            "batches": args.batches,
            "queries": args.queries,
            "concurrency": args.concurrency,
            "repeat": args.repeat,
            "dim": dim,
        }),
        results: measured,
    };
    if out.json {
        out.json(&report);
    } else {
        out.text(&format!(
            "{} + {}, dim {dim}, batches of {}, concurrency {}:",
            report.metadata_store, report.vector_index, args.batch_size, args.concurrency
        ));
        out.text(&table(&report.results));
    }
    Ok(EXIT_OK)
}

fn table(results: &[Measured]) -> String {
    let rows = results
        .iter()
        .map(|m| {
            let lib = results
                .iter()
                .find(|x| x.operation == m.operation && x.side == Side::Library);
            let overhead = match (m.side, lib) {
                (Side::Http, Some(l)) => format!(
                    "{:+.2} ms p50, {:+.2} ms p99",
                    m.latency_ms.p50 - l.latency_ms.p50,
                    m.latency_ms.p99 - l.latency_ms.p99
                ),
                _ => "-".into(),
            };
            vec![
                m.operation.to_owned(),
                format!("{:?}", m.side).to_lowercase(),
                output::count(m.calls as u64),
                format!("{:.1}", m.calls_per_sec),
                format!("{:.0}", m.records_per_sec),
                format!("{:.2}", m.latency_ms.p50),
                format!("{:.2}", m.latency_ms.p99),
                overhead,
            ]
        })
        .collect();
    output::table(
        &[
            "operation",
            "side",
            "calls",
            "calls/s",
            "records/s",
            "p50 ms",
            "p99 ms",
            "HTTP overhead",
        ],
        &[false, false, true, true, true, true, true, false],
        rows,
    )
}

fn record_json(r: &NewRecord) -> serde_json::Value {
    json!({
        "id": r.id.map(|i| i.0),
        "scope": r.scope.as_str(),
        "content": r.content,
        "metadata": r.metadata,
        "vector": r.vector,
    })
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .new_agent()
}

/// Sends `body` and fails unless the answer is 200.
fn post(agent: &ureq::Agent, url: &str, body: &serde_json::Value) -> Result<(), AppError> {
    let bytes = serde_json::to_vec(body).map_err(|e| AppError::Failed(e.to_string()))?;
    let mut response = agent
        .post(url)
        .header("content-type", "application/json")
        .send(&bytes[..])
        .map_err(|e| AppError::Failed(format!("bench-api: {url}: {e}")))?;
    let text = response
        .body_mut()
        .read_to_string()
        .map_err(|e| AppError::Failed(format!("bench-api: {url}: {e}")))?;
    if response.status() != 200 {
        return Err(AppError::Failed(format!(
            "bench-api: {url} answered {}: {text}",
            response.status()
        )));
    }
    Ok(())
}

/// Runs `work` over `items` from `concurrency` workers; returns the
/// latencies and the wall time.
async fn drive<T: Send + 'static>(
    side: Side,
    items: Vec<T>,
    concurrency: usize,
    library: impl Fn(T) -> futures::future::BoxFuture<'static, Result<(), AppError>>
    + Send
    + Sync
    + 'static,
    http: impl Fn(&ureq::Agent, T) -> Result<(), AppError> + Send + Sync + 'static,
) -> Result<(Vec<u64>, f64), AppError> {
    let queue = Arc::new(std::sync::Mutex::new(items.into_iter()));
    let next = {
        let queue = queue.clone();
        move || {
            queue
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .next()
        }
    };
    let started = Instant::now();
    let mut latencies = Vec::new();
    match side {
        Side::Library => {
            let library = Arc::new(library);
            let mut workers = tokio::task::JoinSet::new();
            for _ in 0..concurrency {
                let (next, library) = (next.clone(), library.clone());
                workers.spawn(async move {
                    let mut lat = Vec::new();
                    while let Some(item) = next() {
                        let t = Instant::now();
                        library(item).await?;
                        lat.push(t.elapsed().as_micros() as u64);
                    }
                    Ok::<_, AppError>(lat)
                });
            }
            while let Some(r) = workers.join_next().await {
                latencies.extend(r.map_err(|e| AppError::Failed(e.to_string()))??);
            }
        }
        Side::Http => {
            let http = Arc::new(http);
            let mut workers = Vec::new();
            for _ in 0..concurrency {
                let (next, http) = (next.clone(), http.clone());
                workers.push(tokio::task::spawn_blocking(move || {
                    let agent = agent();
                    let mut lat = Vec::new();
                    while let Some(item) = next() {
                        let t = Instant::now();
                        http(&agent, item)?;
                        lat.push(t.elapsed().as_micros() as u64);
                    }
                    Ok::<_, AppError>(lat)
                }));
            }
            for w in workers {
                latencies.extend(w.await.map_err(|e| AppError::Failed(e.to_string()))??);
            }
        }
    }
    Ok((latencies, started.elapsed().as_secs_f64()))
}

async fn upserts(
    side: Side,
    c: &Arc<AppCoordinator>,
    base: &str,
    batches: Vec<Vec<NewRecord>>,
    concurrency: usize,
) -> Result<Pass, AppError> {
    let records = batches.iter().map(Vec::len).sum();
    let key_base = uuid::Uuid::now_v7().simple().to_string();
    let items: Vec<(usize, Vec<NewRecord>)> = batches.into_iter().enumerate().collect();
    let c = c.clone();
    let url = format!("{base}/api/v1/records");
    let lib_key = key_base.clone();
    let (latencies_us, seconds) = drive(
        side,
        items,
        concurrency,
        move |(i, batch)| {
            let c = c.clone();
            let key = format!("{lib_key}-{i}");
            Box::pin(async move {
                c.upsert_with(batch, &WriteOptions::idempotent(key))
                    .await
                    .map(|_| ())
                    .map_err(|e| AppError::Failed(format!("bench-api: upsert: {e}")))
            })
        },
        move |agent, (i, batch)| {
            let body = json!({ "records": batch.iter().map(record_json).collect::<Vec<_>>() });
            let bytes = serde_json::to_vec(&body).map_err(|e| AppError::Failed(e.to_string()))?;
            let mut response = agent
                .post(&url)
                .header("content-type", "application/json")
                .header("idempotency-key", format!("{key_base}-{i}"))
                .send(&bytes[..])
                .map_err(|e| AppError::Failed(format!("bench-api: {url}: {e}")))?;
            let text = response
                .body_mut()
                .read_to_string()
                .map_err(|e| AppError::Failed(format!("bench-api: {url}: {e}")))?;
            if response.status() != 200 {
                return Err(AppError::Failed(format!(
                    "bench-api: upsert answered {}: {text}",
                    response.status()
                )));
            }
            Ok(())
        },
    )
    .await?;
    Ok(Pass {
        latencies_us,
        seconds,
        records,
    })
}

async fn searches(
    side: Side,
    c: &Arc<AppCoordinator>,
    base: &str,
    queries: Vec<Vec<f32>>,
    concurrency: usize,
) -> Result<Pass, AppError> {
    let c = c.clone();
    let url = format!("{base}/api/v1/search");
    let (latencies_us, seconds) = drive(
        side,
        queries,
        concurrency,
        move |vector| {
            let c = c.clone();
            Box::pin(async move {
                c.search(&SearchQuery::new(vector, 10))
                    .await
                    .map(|_| ())
                    .map_err(|e| AppError::Failed(format!("bench-api: search: {e}")))
            })
        },
        move |agent, vector| post(agent, &url, &json!({ "vector": vector, "k": 10 })),
    )
    .await?;
    Ok(Pass {
        latencies_us,
        seconds,
        records: 0,
    })
}
