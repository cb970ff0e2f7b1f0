//! The service's rolling time series, fed by the [`Tap`] once per second:
//!
//! * **counters** — every second the sampler reads the cumulative value of
//!   each [`SERIES`] entry and keeps the last `window` seconds of them in a
//!   ring; a rate is the difference of two neighbours. The chart plots the
//!   rates, the tiles show the totals;
//! * **latencies** — every second it drains the samples of
//!   `tandem_phase_seconds` recorded since the last tick into an HDR histogram
//!   per phase and slot of [`SLOT_SECS`] seconds, keeping the slots of the last
//!   [`LATENCY_WINDOW_SECS`]; the percentiles merge those slots.
//!
//! Both are data-driven: a new counter or phase to show is one more entry in
//! [`SERIES`] or [`PHASES`]; the status document and the dashboard list
//! whatever is there.

use std::collections::VecDeque;

use hdrhistogram::Histogram;
use serde::Serialize;
use utoipa::ToSchema;

use super::tap::{Tap, label};

/// A counter the service samples, charts and totals.
#[derive(Clone, Copy, Debug)]
pub struct SeriesDef {
    /// Stable id in the status document (`activity.series[].id`).
    pub id: &'static str,
    /// What the dashboard calls it.
    pub label: &'static str,
    /// The Prometheus counter.
    pub metric: &'static str,
    /// Only label sets with this label among these values (`None`: all).
    pub only: Option<(&'static str, &'static [&'static str])>,
}

/// The counters the service samples: the coordinator's outcomes. Sagas,
/// an outbox or reindexing add their own entries here.
pub const SERIES: &[SeriesDef] = &[
    SeriesDef {
        id: "commits",
        label: "commits",
        metric: "tandem_commits_total",
        only: None,
    },
    SeriesDef {
        id: "rollbacks",
        label: "rollbacks",
        metric: "tandem_rollbacks_total",
        only: None,
    },
    SeriesDef {
        id: "compensations",
        label: "compensations",
        metric: "tandem_compensations_total",
        only: None,
    },
    SeriesDef {
        id: "ambiguous_settled",
        label: "ambiguous commits settled",
        metric: "tandem_ambiguous_commits_total",
        only: Some(("settled", &["committed", "not_committed"])),
    },
    SeriesDef {
        id: "recovered_intents",
        label: "recovered intents",
        metric: "tandem_recovered_intents_total",
        only: None,
    },
    SeriesDef {
        id: "indexed_records",
        label: "records indexed (deferred)",
        metric: "tandem_indexed_records_total",
        only: None,
    },
];

/// A latency the service keeps percentiles of: the samples of
/// `tandem_phase_seconds` whose `op` and `phase` labels match.
#[derive(Clone, Copy, Debug)]
pub struct PhaseDef {
    /// Stable id in the status document (`phases[].id`).
    pub id: &'static str,
    /// What the dashboard calls it.
    pub label: &'static str,
    /// The `op` label (`None`: any).
    pub op: Option<&'static str>,
    /// The `phase` label.
    pub phase: &'static str,
}

/// The protocol's phases (see `docs/protocol.md`).
pub const PHASES: &[PhaseDef] = &[
    PhaseDef {
        id: "prepare",
        label: "prepare",
        op: None,
        phase: "prepare",
    },
    PhaseDef {
        id: "index_write",
        label: "index write",
        op: None,
        phase: "index_write",
    },
    PhaseDef {
        id: "commit",
        label: "commit",
        op: None,
        phase: "commit",
    },
    PhaseDef {
        id: "cleanup",
        label: "cleanup",
        op: None,
        phase: "cleanup",
    },
    PhaseDef {
        id: "search_index",
        label: "search (index)",
        op: Some("search"),
        phase: "index",
    },
    PhaseDef {
        id: "search_guard",
        label: "search guard",
        op: Some("search"),
        phase: "guard",
    },
];

/// The histogram the phases come from.
pub const PHASE_METRIC: &str = "tandem_phase_seconds";
/// Seconds per latency slot.
pub const SLOT_SECS: u64 = 5;
/// The percentiles cover this many seconds.
pub const LATENCY_WINDOW_SECS: u64 = 60;

/// One counter series in the status document.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct SeriesStatus {
    /// Stable id (`commits`, `rollbacks`, ...).
    pub id: &'static str,
    /// Display name.
    pub label: &'static str,
    /// Total since the service started.
    pub total: u64,
    /// In the last 60 seconds (since the service started, if that is shorter).
    pub last_minute: u64,
    /// Per second, oldest first: one value per interval of the window (the
    /// first is the rate into the oldest sample kept).
    pub per_sec: Vec<f64>,
}

/// The latency percentiles of one phase over the last minute.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct PhaseStatus {
    /// Stable id (`prepare`, `commit`, ...).
    pub id: &'static str,
    /// Display name.
    pub label: &'static str,
    /// Samples in the window.
    pub count: u64,
    /// Median, in milliseconds (`null` without samples).
    pub p50_ms: Option<f64>,
    /// 95th percentile, in milliseconds.
    pub p95_ms: Option<f64>,
    /// 99th percentile, in milliseconds.
    pub p99_ms: Option<f64>,
}

/// One sample of every series: cumulative totals at an instant.
#[derive(Clone, Debug)]
struct Sample {
    at_ms: i64,
    totals: Vec<u64>,
}

/// One latency slot: a histogram per phase (microseconds), when it has samples.
struct Slot {
    index: u64,
    phases: Vec<Option<Histogram<u64>>>,
}

/// The rolling series. One sampler task owns it.
pub struct Series {
    capacity: usize,
    samples: VecDeque<Sample>,
    slots: VecDeque<Slot>,
}

/// Microseconds: 1 µs to 1 hour, two significant digits (≤ 1 % error).
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid bounds")
}

impl Series {
    /// Keeps `window_secs` one-second samples.
    pub fn new(window_secs: u64) -> Self {
        Self {
            capacity: window_secs.max(2) as usize + 1,
            samples: VecDeque::new(),
            slots: VecDeque::new(),
        }
    }

    /// Takes one sample at `now_ms` (the sampler calls it every second).
    pub fn sample(&mut self, tap: &Tap, now_ms: i64) {
        let totals = SERIES
            .iter()
            .map(|def| {
                tap.counter_sum(def.metric, |key| match def.only {
                    None => true,
                    Some((name, values)) => label(key, name).is_some_and(|v| values.contains(&v)),
                })
            })
            .collect();
        self.samples.push_back(Sample {
            at_ms: now_ms,
            totals,
        });
        while self.samples.len() > self.capacity {
            self.samples.pop_front();
        }

        let index = (now_ms.max(0) as u64 / 1000) / SLOT_SECS;
        if self.slots.back().is_none_or(|s| s.index != index) {
            self.slots.push_back(Slot {
                index,
                phases: vec![None; PHASES.len()],
            });
        }
        // The window: this slot and the ones before it, LATENCY_WINDOW_SECS in all.
        let slots = LATENCY_WINDOW_SECS / SLOT_SECS;
        while self.slots.front().is_some_and(|s| s.index + slots <= index) {
            self.slots.pop_front();
        }
        let slot = self.slots.back_mut().expect("just pushed");
        tap.drain_histogram(PHASE_METRIC, |key, samples| {
            let op = label(key, "op");
            let phase = label(key, "phase");
            let Some(i) = PHASES
                .iter()
                .position(|p| Some(p.phase) == phase && (p.op.is_none() || p.op == op))
            else {
                return;
            };
            let h = slot.phases[i].get_or_insert_with(new_histogram);
            for s in samples {
                let micros = (s * 1e6).round().clamp(1.0, 3_600_000_000.0) as u64;
                let _ = h.record(micros);
            }
        });
    }

    /// The counter series: totals, last minute, rates over the window.
    pub fn series(&self) -> Vec<SeriesStatus> {
        let latest = self.samples.back();
        // The last sample at least a minute older than the latest, else the
        // first (taken when the service started, before any traffic).
        let baseline = latest.and_then(|l| {
            self.samples
                .iter()
                .rev()
                .find(|s| s.at_ms <= l.at_ms - 60_000)
                .or(self.samples.front())
        });
        SERIES
            .iter()
            .enumerate()
            .map(|(i, def)| {
                let total = latest.map_or(0, |l| l.totals[i]);
                let last_minute = baseline.map_or(0, |b| total.saturating_sub(b.totals[i]));
                let per_sec = self
                    .samples
                    .iter()
                    .zip(self.samples.iter().skip(1))
                    .map(|(a, b)| {
                        let secs = ((b.at_ms - a.at_ms) as f64 / 1e3).max(1e-3);
                        b.totals[i].saturating_sub(a.totals[i]) as f64 / secs
                    })
                    .collect();
                SeriesStatus {
                    id: def.id,
                    label: def.label,
                    total,
                    last_minute,
                    per_sec,
                }
            })
            .collect()
    }

    /// When each rate of [`Series::series`] ends (ms since the Unix epoch).
    pub fn times_ms(&self) -> Vec<i64> {
        self.samples.iter().skip(1).map(|s| s.at_ms).collect()
    }

    /// Commits over commits and rollbacks in the window (`None` without either).
    pub fn success_ratio(&self) -> Option<f64> {
        let (first, last) = (self.samples.front()?, self.samples.back()?);
        let delta = |id: &str| {
            let i = SERIES
                .iter()
                .position(|d| d.id == id)
                .expect("a known series");
            last.totals[i].saturating_sub(first.totals[i])
        };
        let (commits, rollbacks) = (delta("commits"), delta("rollbacks"));
        let all = commits + rollbacks;
        (all > 0).then(|| commits as f64 / all as f64)
    }

    /// The percentiles of every phase over the latency window.
    pub fn phases(&self) -> Vec<PhaseStatus> {
        PHASES
            .iter()
            .enumerate()
            .map(|(i, def)| {
                let mut merged: Option<Histogram<u64>> = None;
                for slot in &self.slots {
                    if let Some(h) = &slot.phases[i] {
                        let m = merged.get_or_insert_with(new_histogram);
                        let _ = m.add(h);
                    }
                }
                let count = merged.as_ref().map_or(0, |h| h.len());
                let q = |q: f64| {
                    merged
                        .as_ref()
                        .filter(|h| !h.is_empty())
                        .map(|h| round3(h.value_at_quantile(q) as f64 / 1e3))
                };
                PhaseStatus {
                    id: def.id,
                    label: def.label,
                    count,
                    p50_ms: q(0.50),
                    p95_ms: q(0.95),
                    p99_ms: q(0.99),
                }
            })
            .collect()
    }
}

/// Rounded to three decimals, so the document and the page agree on digits.
pub fn round3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(tap: &Tap, f: impl FnOnce()) {
        metrics::with_local_recorder(tap, f);
    }

    #[test]
    fn rates_are_differences_of_one_second_samples() {
        let tap = Tap::default();
        let mut s = Series::new(5);
        s.sample(&tap, 1_000);
        record(&tap, || {
            metrics::counter!("tandem_commits_total", "op" => "upsert").increment(4);
            metrics::counter!("tandem_rollbacks_total", "op" => "upsert").increment(1);
        });
        s.sample(&tap, 2_000);
        record(&tap, || {
            metrics::counter!("tandem_commits_total", "op" => "delete").increment(2);
            // Not settled: not counted as settled.
            metrics::counter!("tandem_ambiguous_commits_total", "settled" => "unknown")
                .increment(1);
            metrics::counter!("tandem_ambiguous_commits_total", "settled" => "committed")
                .increment(1);
        });
        s.sample(&tap, 3_000);
        let series = s.series();
        let commits = series.iter().find(|x| x.id == "commits").unwrap();
        assert_eq!(commits.total, 6);
        assert_eq!(commits.per_sec, [4.0, 2.0]);
        assert_eq!(commits.last_minute, 6);
        // A minute and more later, only what came since counts.
        s.sample(&tap, 62_000);
        record(&tap, || {
            metrics::counter!("tandem_commits_total").increment(1)
        });
        s.sample(&tap, 63_000);
        let commits = s.series().into_iter().find(|x| x.id == "commits").unwrap();
        assert_eq!((commits.total, commits.last_minute), (7, 1));
        let settled = series.iter().find(|x| x.id == "ambiguous_settled").unwrap();
        assert_eq!(settled.total, 1);
        assert_eq!(s.times_ms(), [2_000, 3_000, 62_000, 63_000]);
        assert_eq!(s.success_ratio(), Some(7.0 / 8.0));
    }

    #[test]
    fn the_window_keeps_only_the_last_samples() {
        let tap = Tap::default();
        let mut s = Series::new(3);
        for t in 1..=10 {
            record(&tap, || {
                metrics::counter!("tandem_commits_total").increment(1)
            });
            s.sample(&tap, t * 1_000);
        }
        let commits = &s.series()[0];
        assert_eq!(commits.per_sec, [1.0, 1.0, 1.0]);
        assert_eq!(commits.total, 10);
    }

    #[test]
    fn phase_percentiles_cover_the_last_minute_only() {
        let tap = Tap::default();
        let mut s = Series::new(300);
        record(&tap, || {
            for ms in 1..=100 {
                metrics::histogram!(PHASE_METRIC, "op" => "upsert", "phase" => "commit")
                    .record(ms as f64 / 1e3);
            }
            metrics::histogram!(PHASE_METRIC, "op" => "search", "phase" => "guard").record(0.002);
            // Not a search: not the search guard.
            metrics::histogram!(PHASE_METRIC, "op" => "upsert", "phase" => "guard").record(9.0);
        });
        s.sample(&tap, 10_000);
        let phases = s.phases();
        let commit = phases.iter().find(|p| p.id == "commit").unwrap();
        assert_eq!(commit.count, 100);
        let p50 = commit.p50_ms.unwrap();
        assert!((49.0..=51.0).contains(&p50), "{p50}");
        let p99 = commit.p99_ms.unwrap();
        assert!((98.0..=100.5).contains(&p99), "{p99}");
        let guard = phases.iter().find(|p| p.id == "search_guard").unwrap();
        assert_eq!(guard.count, 1);
        assert!(
            phases
                .iter()
                .find(|p| p.id == "prepare")
                .unwrap()
                .p50_ms
                .is_none()
        );
        // Two minutes later the slot has left the window.
        s.sample(&tap, 130_000);
        assert_eq!(s.phases().iter().map(|p| p.count).sum::<u64>(), 0);
    }
}
