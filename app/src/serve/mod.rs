//! `tandem serve`: Tandem as a long-running service next to its two stores.
//!
//! It serves a JSON API (writes, reads, status), Prometheus metrics, health
//! checks and a live dashboard on one HTTP listener, and runs recovery and a
//! rolling verification in the background, until SIGINT or SIGTERM; then it
//! stops accepting calls, lets the calls in flight finish (within
//! `--shutdown-grace`) and exits. See `docs/serve.md`.
//!
//! - [`routes`]: the router and the layers; [`api`]: the `/api/v1` handlers;
//!   [`errors`]: the JSON errors; [`limits`]: body, batch, timeout, JSON
//!   parsing; [`auth`]: the bearer token;
//! - [`background`]: probe, recover, verify and sample loops; [`status`],
//!   [`series`], [`tap`]: the status document and its time series;
//! - [`dashboard`]: the embedded page; [`openapi`]: the OpenAPI document;
//! - [`load`]: `tandem bench-api`, the HTTP API against the library.

mod api;
mod auth;
mod background;
mod dashboard;
mod errors;
mod limits;
pub mod load;
mod openapi;
mod routes;
mod series;
mod status;
mod tap;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use clap::Args;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::{Notify, watch};

use crate::backend::{AppCoordinator, Stores};
use crate::error::{AppError, EXIT_OK, Redactor};
use crate::ingest::parse_duration;
use crate::output::Output;
use crate::settings::Settings;

pub use limits::ApiLimits;

/// `tandem serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0: any free port, printed at start). Without
    /// TANDEM_API_TOKEN only a loopback address is allowed.
    #[arg(
        long,
        env = "TANDEM_LISTEN",
        default_value = "127.0.0.1:8080",
        value_name = "ADDR"
    )]
    pub listen: SocketAddr,

    /// Allow a non-loopback --listen address without TANDEM_API_TOKEN (anyone
    /// who reaches it can write and delete).
    #[arg(long)]
    pub insecure_listen: bool,

    /// Run recovery this often (e.g. 30s, 500ms; 0 turns it off) [default: a
    /// quarter of the lease].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub recover_every: Option<Duration>,

    /// Run one step of the rolling verification this often (0 turns it off).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "1s")]
    pub verify_every: Duration,

    /// Rows and points checked per verification step.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub verify_page: usize,

    /// Index workers to run for deferred writes (see docs/deferred.md); 0
    /// runs none (another process's `tandem index-worker` does the work).
    /// Ignored when the metadata store has no deferred indexing.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub index_workers: usize,

    /// Repair a scope when a verification pass finds it inconsistent (deletes
    /// old orphans, rewrites missing points; see `tandem verify --repair`).
    #[arg(long)]
    pub repair: bool,

    /// Largest request body, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 16)]
    pub max_body_mib: usize,

    /// Most records (or ids) per call [default: the coordinator's max_batch].
    #[arg(long, value_name = "N")]
    pub max_batch: Option<usize>,

    /// Answer `timeout` when a request takes longer than this [default: the
    /// call deadline + the cleanup deadline + 5s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub request_timeout: Option<Duration>,

    /// How much history the dashboard's chart keeps (one sample per second).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "5m")]
    pub window: Duration,

    /// After SIGINT/SIGTERM, wait this long for calls in flight before
    /// exiting (what is still running then is abandoned: recovery finishes
    /// it) [default: the request timeout].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub shutdown_grace: Option<Duration>,

    /// Print the OpenAPI document and exit.
    #[arg(long)]
    pub print_openapi: bool,
}

/// The write calls running, and whether new ones are still accepted.
#[derive(Default)]
pub struct InFlight {
    count: AtomicUsize,
    closed: AtomicBool,
    idle: Notify,
}

/// One write in flight; dropping it ends it.
pub struct WriteGuard {
    inflight: Arc<InFlight>,
}

impl InFlight {
    /// Starts a write, unless the service is shutting down.
    pub fn enter(self: &Arc<Self>) -> Option<WriteGuard> {
        self.count.fetch_add(1, Ordering::SeqCst);
        if self.closed.load(Ordering::SeqCst) {
            self.leave();
            return None;
        }
        Some(WriteGuard {
            inflight: self.clone(),
        })
    }

    fn leave(&self) {
        if self.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Writes running now.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Whether new writes are refused.
    pub fn closing(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Refuses new writes and waits until the running ones end, at most
    /// `grace`. Returns how many were still running then.
    pub async fn close_and_drain(&self, grace: Duration) -> usize {
        self.closed.store(true, Ordering::SeqCst);
        let drained = async {
            loop {
                let idle = self.idle.notified();
                if self.count() == 0 {
                    return;
                }
                idle.await;
            }
        };
        let _ = tokio::time::timeout(grace, drained).await;
        self.count()
    }
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        self.inflight.leave();
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct ApiState {
    /// The coordinator, shared with the background tasks.
    pub coordinator: Arc<AppCoordinator>,
    /// The stores' names (no credentials): metadata, index.
    pub store_names: Arc<[String; 2]>,
    /// Removes secrets from messages.
    pub redactor: Redactor,
    /// The request limits.
    pub limits: ApiLimits,
    /// The collection's dimension (for the hash embedding).
    pub dimension: usize,
    /// Writes in flight.
    pub writes: Arc<InFlight>,
    /// The status snapshots.
    pub snapshots: Arc<status::Snapshots>,
    /// The Prometheus recorder.
    pub prometheus: PrometheusHandle,
}

/// The resolved options of the service.
struct Plan {
    limits: ApiLimits,
    schedule: background::Schedule,
    grace: Duration,
}

fn plan(args: &ServeArgs, settings: &Settings) -> Result<Plan, AppError> {
    let usage = |m: String| Err(AppError::Usage(format!("serve: {m}")));
    let c = &settings.coordinator;
    let max_batch = args.max_batch.unwrap_or(c.limits.max_batch);
    if max_batch == 0 || max_batch > c.limits.max_batch {
        return usage(format!(
            "--max-batch must be between 1 and the coordinator's max_batch ({})",
            c.limits.max_batch
        ));
    }
    if args.max_body_mib == 0 || args.max_body_mib > 1024 {
        return usage("--max-body-mib must be between 1 and 1024".into());
    }
    if args.verify_page == 0 {
        return usage("--verify-page must be positive".into());
    }
    let window_secs = args.window.as_secs();
    if !(10..=86_400).contains(&window_secs) {
        return usage("--window must be between 10s and 24h".into());
    }
    let request_timeout = args
        .request_timeout
        .unwrap_or(c.call_deadline + c.cleanup_deadline + Duration::from_secs(5));
    if request_timeout.is_zero() {
        return usage("--request-timeout must be positive".into());
    }
    if request_timeout < c.call_deadline {
        tracing::warn!(
            "--request-timeout is shorter than the coordinator's call deadline: writes that \
             time out answer `timeout` with an unknown outcome"
        );
    }
    let recover_every = args.recover_every.unwrap_or(c.lease / 4);
    let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
    Ok(Plan {
        limits: ApiLimits {
            max_body_bytes: args.max_body_mib * 1024 * 1024,
            max_batch,
            max_k: 1000,
            request_timeout,
        },
        schedule: background::Schedule {
            index_workers: args.index_workers,
            recover_every: nonzero(recover_every),
            verify_every: nonzero(args.verify_every),
            verify_page: args.verify_page,
            repair: args.repair,
            window_secs,
        },
        grace: args.shutdown_grace.unwrap_or(request_timeout),
    })
}

/// The configuration panel of the dashboard (no secrets).
fn config_section(settings: &Settings, plan: &Plan, listen: SocketAddr) -> status::Section {
    use serde_json::json;
    let secs = |d: Option<Duration>| d.map_or(json!("off"), |d| json!(d.as_secs_f64()));
    let rows = [
        ("listen", json!(listen.to_string())),
        ("collection", json!(settings.collection)),
        ("dimension", json!(settings.dimension)),
        ("distance", json!(settings.distance.to_string())),
        ("lease (s)", json!(settings.coordinator.lease.as_secs_f64())),
        (
            "call deadline (s)",
            json!(settings.coordinator.call_deadline.as_secs_f64()),
        ),
        (
            "write mode",
            json!(settings.coordinator.write_mode.as_str()),
        ),
        ("index workers", json!(plan.schedule.index_workers)),
        ("recover every (s)", secs(plan.schedule.recover_every)),
        ("verify step every (s)", secs(plan.schedule.verify_every)),
        ("verify page", json!(plan.schedule.verify_page)),
        ("repair", json!(plan.schedule.repair)),
        ("max batch", json!(plan.limits.max_batch)),
        (
            "max body (MiB)",
            json!(plan.limits.max_body_bytes / (1024 * 1024)),
        ),
        (
            "request timeout (s)",
            json!(plan.limits.request_timeout.as_secs_f64()),
        ),
    ];
    status::Section {
        id: "configuration".into(),
        title: "Configuration".into(),
        rows: rows
            .into_iter()
            .map(|(label, value)| status::SectionRow {
                key: label.split(' ').next().unwrap_or(label).to_owned(),
                label: label.into(),
                value,
                alert: false,
            })
            .collect(),
    }
}

fn now_ms() -> i64 {
    tandem_core::unix_ms(std::time::SystemTime::now())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// `tandem serve`.
pub async fn run(args: ServeArgs, settings: &Settings, out: Output) -> Result<u8, AppError> {
    if args.print_openapi {
        crate::output::print_stdout(openapi::document().trim_end());
        return Ok(EXIT_OK);
    }
    let plan = plan(&args, settings)?;
    let token = settings
        .api_token
        .as_deref()
        .map(auth::Token::new)
        .map(Arc::new);
    if token.is_none() && !args.listen.ip().is_loopback() && !args.insecure_listen {
        return Err(AppError::Usage(format!(
            "serve: refusing to listen on {} without an API token: set TANDEM_API_TOKEN, listen \
             on a loopback address, or pass --insecure-listen",
            args.listen
        )));
    }

    // Metrics first, so that nothing the stores do on opening is missed.
    let tap = tap::Tap::default();
    let prometheus = tap::install(tap.clone())?;
    crate::telemetry::describe_metrics();
    crate::telemetry::describe_service_metrics();
    crate::telemetry::register_metrics();
    metrics::gauge!("tandem_lease_seconds").set(settings.coordinator.lease.as_secs_f64());
    if let Some(addr) = settings.metrics_addr {
        serve_metrics_too(addr, prometheus.clone()).await?;
    }

    let stores = Stores::open(settings).await?;
    let coordinator = Arc::new(stores.coordinator(settings.coordinator.clone())?);
    let store_names = [stores.metadata_name.clone(), stores.index_name.clone()];
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| AppError::Usage(format!("serve: cannot listen on {}: {e}", args.listen)))?;
    let local = listener
        .local_addr()
        .map_err(|e| AppError::Failed(format!("serve: {e}")))?;

    let started_ms = now_ms();
    let live = Arc::new(status::Live::default());
    live.with(|l| {
        l.recovery.enabled = plan.schedule.recover_every.is_some();
        l.recovery.every_secs = plan.schedule.recover_every.map_or(0.0, |d| d.as_secs_f64());
        let v = &mut l.verification;
        v.task.enabled = plan.schedule.verify_every.is_some();
        v.task.every_secs = plan.schedule.verify_every.map_or(0.0, |d| d.as_secs_f64());
        v.page_size = plan.schedule.verify_page;
        v.repair = plan.schedule.repair;
        l.stores = store_names
            .iter()
            .zip(["metadata", "index"])
            .map(|(name, role)| status::StoreStatus {
                role,
                name: name.clone(),
                reachable: true,
                checked_at_ms: 0,
                probe_ms: None,
                error: None,
            })
            .collect();
    });
    let writes = Arc::new(InFlight::default());
    let snapshots = Arc::new(status::Snapshots::default());
    let ctx = Arc::new(background::Context {
        coordinator: coordinator.clone(),
        store_names: store_names.clone(),
        live,
        tap,
        prometheus: prometheus.clone(),
        snapshots: snapshots.clone(),
        redactor: settings.redactor.clone(),
        schedule: plan.schedule.clone(),
        started_ms,
        auth_required: token.is_some(),
        writes: writes.clone(),
        config_section: config_section(settings, &plan, local),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let tasks = background::spawn(ctx, stop_rx);

    let state = ApiState {
        coordinator,
        store_names: Arc::new(store_names),
        redactor: settings.redactor.clone(),
        limits: plan.limits,
        dimension: settings.dimension,
        writes: writes.clone(),
        snapshots,
        prometheus,
    };
    let app = routes::router(state, token);

    if out.json {
        out.json(&serde_json::json!({ "listening": format!("http://{local}") }));
    } else {
        out.text(&format!("tandem serve: listening on http://{local}"));
    }
    tracing::info!(%local, "serving");

    // On SIGINT/SIGTERM: refuse new writes, stop accepting connections, let
    // the requests in flight finish — all within the grace period, counted
    // from the signal.
    let (signalled_tx, mut signalled_rx) = watch::channel(None);
    let server = axum::serve(listener, app).with_graceful_shutdown({
        let writes = writes.clone();
        async move {
            shutdown_signal().await;
            tracing::info!("shutting down: no new calls; finishing the calls in flight");
            writes.closed.store(true, Ordering::SeqCst);
            let _ = signalled_tx.send(Some(tokio::time::Instant::now() + plan.grace));
        }
    });
    let served = tokio::select! {
        r = server.into_future() => r,
        _ = async {
            let end = match signalled_rx.wait_for(Option::is_some).await {
                Ok(end) => *end,
                Err(_) => None,
            };
            match end {
                Some(end) => tokio::time::sleep_until(end).await,
                // The server ended without a signal: its branch wins.
                None => std::future::pending().await,
            }
        } => {
            tracing::warn!("the grace period ended with requests in flight; abandoning them");
            Ok(())
        }
    };
    // Writes whose clients left still run: give them the rest of the grace.
    let end = signalled_rx
        .borrow()
        .unwrap_or_else(tokio::time::Instant::now);
    let left = writes
        .close_and_drain(end.saturating_duration_since(tokio::time::Instant::now()))
        .await;
    if left > 0 {
        tracing::warn!(
            writes = left,
            "writes still running at exit; recovery finishes or undoes them once their lease ends"
        );
    }
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    served.map_err(|e| AppError::Failed(format!("serve: {e}")))?;
    tracing::info!("stopped");
    Ok(EXIT_OK)
}

/// Serves `/metrics` on `--metrics-addr` as well (as every command does).
async fn serve_metrics_too(addr: SocketAddr, handle: PrometheusHandle) -> Result<(), AppError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| AppError::Usage(format!("cannot serve metrics on {addr}: {e}")))?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move { handle.render() }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(())
}

/// `tandem bench-api` lives in [`load`]; re-exported for the CLI.
pub use load::{BenchApiArgs, run as bench_api};
