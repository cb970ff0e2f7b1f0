//! Logging (tracing-subscriber, on stderr) and Prometheus metrics.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::error::{AppError, Redactor};

/// Installs the log subscriber: `RUST_LOG` if set, else `quiet_level` (`-v`
/// info, `-vv` debug, `-vvv` trace). Every line goes through the redactor.
pub fn init_logging(verbose: u8, quiet_level: &str, redactor: Redactor) {
    let default = match verbose {
        0 => quiet_level,
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    // qdrant-edge warns about process-wide flags it expects a server to set;
    // they mean nothing to an embedded user, so only its errors show by default.
    let default = if verbose < 2 {
        format!("{default},qdrant_edge=error")
    } else {
        default.to_owned()
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(RedactingStderr { redactor })
        .with_target(verbose >= 2)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// A `MakeWriter` whose writers collect one event and write it to stderr,
/// redacted, when dropped.
struct RedactingStderr {
    redactor: Redactor,
}

struct EventBuffer<'a> {
    redactor: &'a Redactor,
    buf: Vec<u8>,
}

impl<'a> MakeWriter<'a> for RedactingStderr {
    type Writer = EventBuffer<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        EventBuffer {
            redactor: &self.redactor,
            buf: Vec::new(),
        }
    }
}

impl Write for EventBuffer<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventBuffer<'_> {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let text = self.redactor.redact(&String::from_utf8_lossy(&self.buf));
        let _ = std::io::stderr().lock().write_all(text.as_bytes());
    }
}

/// Serves Prometheus metrics on `addr` for as long as the process runs. Must be
/// called inside the tokio runtime.
pub fn serve_metrics(addr: SocketAddr) -> Result<(), AppError> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| AppError::Usage(format!("cannot serve metrics on {addr}: {e}")))?;
    describe_metrics();
    tracing::info!(%addr, "serving Prometheus metrics");
    Ok(())
}

/// Describes every metric the coordinator and the tool record (the `# HELP`
/// lines of `/metrics`).
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "tandem_commits_total",
        "Write calls whose metadata commit happened, by op"
    );
    describe_counter!(
        "tandem_rollbacks_total",
        "Write calls that were rolled back (nothing applied), by op"
    );
    describe_counter!(
        "tandem_compensations_total",
        "Rolled-back upserts whose new index points were all deleted (one per call, not per point)"
    );
    describe_counter!(
        "tandem_recovered_intents_total",
        "Intents finished or undone by recovery"
    );
    describe_counter!(
        "tandem_retries_total",
        "Retries of store calls after transient errors, by call"
    );
    describe_counter!(
        "tandem_ambiguous_commits_total",
        "Commits whose reply was lost, by how they were settled"
    );
    describe_counter!(
        "tandem_deferred_cleanup_points_total",
        "Superseded or deleted points whose removal was left to recovery"
    );
    describe_counter!(
        "tandem_embed_retries_total",
        "Embedding requests attempted again after a retryable error (rate limited, unavailable)"
    );
    describe_counter!(
        "tandem_sagas_started_total",
        "Sagas whose journal entry was written"
    );
    describe_counter!(
        "tandem_sagas_total",
        "Sagas that ended, by outcome (done, compensated, failed)"
    );
    describe_counter!(
        "tandem_saga_steps_total",
        "Saga step events, by kind (tandem, action) and outcome (done, compensated, failed)"
    );
    describe_counter!(
        "tandem_late_write_guards_total",
        "Index writes with an attempt that may still land, whose points were named in a guard intent"
    );
    describe_gauge!(
        "tandem_pending_intents",
        "Unresolved intents at the last verify, stats or service probe"
    );
    describe_counter!(
        "tandem_indexed_records_total",
        "Records of deferred writes that index workers made searchable"
    );
    describe_counter!(
        "tandem_reindex_rows_total",
        "Rows a re-index copied into its new collection (a row changed meanwhile is copied again)"
    );
    describe_gauge!(
        "tandem_reindex_copied_rows",
        "Rows the open (or last) re-index copied so far, earlier interrupted runs included"
    );
    describe_gauge!(
        "tandem_reindex_total_rows",
        "Committed rows when the re-index's copy phase began (its approximate total)"
    );
    describe_gauge!(
        "tandem_reindex_rows_per_second",
        "The running re-index's copy rate"
    );
    describe_gauge!(
        "tandem_reindex_eta_seconds",
        "Seconds the running re-index's copy has left at its rate (0: unknown or done)"
    );
    describe_counter!(
        "tandem_dead_lettered_total",
        "Pending-index entries moved to the dead-letter list"
    );
    describe_gauge!(
        "tandem_index_pending",
        "Deferred writes waiting for an index worker, at the last stats or service probe"
    );
    describe_gauge!(
        "tandem_index_dead_letters",
        "Dead-lettered deferred writes, at the last stats or service probe"
    );
    describe_gauge!(
        "tandem_index_oldest_pending_seconds",
        metrics::Unit::Seconds,
        "Age of the oldest deferred write waiting for an index worker (0: none)"
    );
    describe_gauge!(
        "tandem_index_indexed_last_minute",
        "Records every index worker switched into the index in the last minute, at the last stats or service probe"
    );
    describe_histogram!(
        "tandem_phase_seconds",
        metrics::Unit::Seconds,
        "Latency of each protocol phase, by op and phase"
    );
    describe_counter!(
        "tandem_ingest_records_total",
        "Records committed by tandem ingest (replayed batches excluded)"
    );
    describe_counter!(
        "tandem_ingest_batches_total",
        "Batches handled by tandem ingest, by outcome"
    );
    describe_counter!(
        "tandem_ingest_batch_retries_total",
        "Retries of whole batches by tandem ingest, under the batch's idempotency key"
    );
}

/// Describes the metrics only `tandem serve` records.
pub fn describe_service_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "tandem_http_requests_total",
        "HTTP requests answered, by route, method and status"
    );
    describe_histogram!(
        "tandem_http_request_duration_seconds",
        metrics::Unit::Seconds,
        "Time to answer an HTTP request, by route"
    );
    describe_counter!(
        "tandem_background_runs_total",
        "Runs of a background task (recover, verify step, repair), by task"
    );
    describe_counter!(
        "tandem_background_failures_total",
        "Failed runs of a background task, by task"
    );
    describe_gauge!(
        "tandem_held_intents",
        "Unresolved intents held by live sagas (they end with the saga), at the last probe"
    );
    describe_gauge!(
        "tandem_expired_intents",
        "Unresolved intents not held by a saga whose lease has ended (recovery's backlog), \
         at the last probe"
    );
    describe_gauge!(
        "tandem_oldest_intent_age_seconds",
        metrics::Unit::Seconds,
        "Age of the oldest unresolved intent not held by a saga at the last probe (0: none)"
    );
    describe_gauge!(
        "tandem_lease_seconds",
        metrics::Unit::Seconds,
        "The coordinator's lease: an intent older than this has lost its writer"
    );
    describe_gauge!(
        "tandem_store_up",
        "1 when the store answered the last probe (schema or collection present), else 0, by store"
    );
    describe_counter!(
        "tandem_verify_passes_total",
        "Completed passes of the rolling verification over the whole store"
    );
    describe_gauge!(
        "tandem_verify_inconsistent_scopes",
        "Scopes whose last verification found missing or orphan points"
    );
    describe_gauge!(
        "tandem_verify_missing_points",
        "Rows without their point, found by the last verification pass"
    );
    describe_gauge!(
        "tandem_verify_orphan_points",
        "Points without a row or intent, found by the last verification pass"
    );
}

/// Registers, at zero, every metric whose label values are known in advance,
/// so that `/metrics` lists them from the start (an absent series breaks
/// `rate()` and alerts; a zero does not). Labels that name a call or a route
/// appear with their first use.
pub fn register_metrics() {
    for op in [
        "upsert",
        "delete",
        "transaction",
        "deferred_upsert",
        "deferred_delete",
        "index",
    ] {
        metrics::counter!("tandem_commits_total", "op" => op).absolute(0);
        metrics::counter!("tandem_rollbacks_total", "op" => op).absolute(0);
    }
    for settled in ["committed", "not_committed", "unknown"] {
        metrics::counter!("tandem_ambiguous_commits_total", "settled" => settled).absolute(0);
    }
    for name in [
        "tandem_compensations_total",
        "tandem_recovered_intents_total",
        "tandem_deferred_cleanup_points_total",
        "tandem_late_write_guards_total",
        "tandem_verify_passes_total",
        "tandem_sagas_started_total",
        "tandem_embed_retries_total",
        "tandem_indexed_records_total",
        "tandem_dead_lettered_total",
        "tandem_reindex_rows_total",
    ] {
        metrics::counter!(name).absolute(0);
    }
    for outcome in ["done", "compensated", "failed"] {
        metrics::counter!("tandem_sagas_total", "outcome" => outcome).absolute(0);
        for kind in ["tandem", "action"] {
            metrics::counter!("tandem_saga_steps_total", "kind" => kind, "outcome" => outcome)
                .absolute(0);
        }
    }
    for task in ["recover", "verify", "repair"] {
        metrics::counter!("tandem_background_runs_total", "task" => task).absolute(0);
        metrics::counter!("tandem_background_failures_total", "task" => task).absolute(0);
    }
    for name in [
        "tandem_pending_intents",
        "tandem_held_intents",
        "tandem_expired_intents",
        "tandem_oldest_intent_age_seconds",
        "tandem_verify_inconsistent_scopes",
        "tandem_verify_missing_points",
        "tandem_verify_orphan_points",
        "tandem_index_pending",
        "tandem_index_dead_letters",
        "tandem_index_oldest_pending_seconds",
        "tandem_index_indexed_last_minute",
        "tandem_reindex_copied_rows",
        "tandem_reindex_total_rows",
        "tandem_reindex_rows_per_second",
        "tandem_reindex_eta_seconds",
    ] {
        metrics::gauge!(name).set(0.0);
    }
    for (op, phase) in [
        ("upsert", "prepare"),
        ("upsert", "index_write"),
        ("upsert", "commit"),
        ("delete", "prepare"),
        ("delete", "commit"),
        ("write", "cleanup"),
        ("search", "index"),
        ("search", "guard"),
    ] {
        // A registered histogram renders (empty) without a sample.
        let _ = metrics::histogram!("tandem_phase_seconds", "op" => op, "phase" => phase);
    }
}
