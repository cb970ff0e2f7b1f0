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

fn describe_metrics() {
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
        "Index points deleted after a failed write"
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
    describe_gauge!(
        "tandem_pending_intents",
        "Unresolved intents at the last verify or stats"
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
}
