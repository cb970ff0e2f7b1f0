//! The service's own view of the metrics: a second recorder, next to the
//! Prometheus one, that keeps every counter readable and every histogram
//! sample drainable, so that the service can sample its own time series (the
//! dashboard's chart and percentiles) without parsing its `/metrics` text.
//!
//! [`install`] puts both behind one global recorder (metrics-util's fanout):
//! every `metrics::counter!` / `histogram!` of the coordinator and of the
//! service reaches both.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::layers::FanoutBuilder;
use metrics_util::registry::{AtomicStorage, Registry};

use crate::error::AppError;

/// Bucket bounds (seconds) of the latency histograms on `/metrics`: from
/// 100 µs to 60 s, so that `histogram_quantile` works in Grafana.
pub const LATENCY_BUCKETS: [f64; 18] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// The readable recorder. Cheap to clone; clones share the registry.
#[derive(Clone)]
pub struct Tap {
    registry: Arc<Registry<Key, AtomicStorage>>,
}

impl Default for Tap {
    fn default() -> Self {
        Self {
            registry: Arc::new(Registry::atomic()),
        }
    }
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tap")
    }
}

impl Tap {
    /// The sum of counter `name` over the label sets that `keep` accepts.
    pub fn counter_sum(&self, name: &str, keep: impl Fn(&Key) -> bool) -> u64 {
        let mut sum = 0u64;
        self.registry.visit_counters(|key, value| {
            if key.name() == name && keep(key) {
                sum = sum.saturating_add(value.load(Ordering::Acquire));
            }
        });
        sum
    }

    /// Takes every sample recorded into histogram `name` since the last call,
    /// with the key it was recorded under.
    pub fn drain_histogram(&self, name: &str, mut each: impl FnMut(&Key, &[f64])) {
        self.registry.visit_histograms(|key, bucket| {
            if key.name() == name {
                bucket.clear_with(|samples| each(key, samples));
            }
        });
    }
}

/// The value of label `label` of `key`, if it has one.
pub fn label<'a>(key: &'a Key, label: &str) -> Option<&'a str> {
    key.labels().find(|l| l.key() == label).map(|l| l.value())
}

impl Recorder for Tap {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.registry
            .get_or_create_counter(key, |c| Counter::from_arc(c.clone()))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.registry
            .get_or_create_gauge(key, |g| Gauge::from_arc(g.clone()))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.registry
            .get_or_create_histogram(key, |h| Histogram::from_arc(h.clone()))
    }
}

/// Installs the process's global recorder: Prometheus (rendered by the
/// returned handle, on `/metrics`) and `tap`, side by side. Latency
/// histograms render as Prometheus histograms with [`LATENCY_BUCKETS`].
pub fn install(tap: Tap) -> Result<PrometheusHandle, AppError> {
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
        .map_err(|e| AppError::Failed(format!("cannot set up the metrics: {e}")))?
        .build_recorder();
    let handle = prometheus.handle();
    let fanout = FanoutBuilder::default()
        .add_recorder(prometheus)
        .add_recorder(tap)
        .build();
    metrics::set_global_recorder(fanout).map_err(|e| {
        AppError::Failed(format!(
            "cannot install the metrics recorder (one is already installed): {e}"
        ))
    })?;
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_sum_over_the_kept_labels_and_histograms_drain_once() {
        let tap = Tap::default();
        metrics::with_local_recorder(&tap, || {
            metrics::counter!("t_total", "op" => "upsert").increment(3);
            metrics::counter!("t_total", "op" => "delete").increment(2);
            metrics::counter!("other_total").increment(7);
            metrics::histogram!("t_seconds", "phase" => "commit").record(0.5);
            metrics::histogram!("t_seconds", "phase" => "commit").record(1.5);
        });
        assert_eq!(tap.counter_sum("t_total", |_| true), 5);
        assert_eq!(
            tap.counter_sum("t_total", |k| label(k, "op") == Some("delete")),
            2
        );
        assert_eq!(tap.counter_sum("missing_total", |_| true), 0);
        let mut seen = Vec::new();
        tap.drain_histogram("t_seconds", |k, s| {
            assert_eq!(label(k, "phase"), Some("commit"));
            seen.extend_from_slice(s);
        });
        assert_eq!(seen, [0.5, 1.5]);
        let mut again = 0;
        tap.drain_histogram("t_seconds", |_, s| again += s.len());
        assert_eq!(again, 0, "samples are handed out once");
    }
}
