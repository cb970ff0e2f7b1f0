//! The results: what is measured per case, and how it is shown (terminal
//! table, Markdown, JSON).

use std::collections::BTreeMap;

use serde::Serialize;

use super::counting::Calls;
use crate::output;

/// One pass: a protocol writing (or reading) a set of batches once.
#[derive(Clone, Debug, Default)]
pub struct Pass {
    /// Records (or queries, intents) handled.
    pub items: u64,
    /// Calls measured (batches, queries, recover calls).
    pub batches: u64,
    /// Wall time of the whole pass.
    pub seconds: f64,
    /// Latency of each call, in microseconds.
    pub latencies_us: Vec<u64>,
    /// Port calls / SQL statements and index calls.
    pub calls: Calls,
    /// Turns across the metadata proxy.
    pub metadata_wire: Option<u64>,
    /// Turns across the index proxy.
    pub index_wire: Option<u64>,
    /// Peak resident set during the pass, in bytes.
    pub peak_rss: Option<u64>,
    /// Per kind of port call or SQL statement: how many ended during the
    /// pass and their summed wall time (ns).
    pub profile: super::counting::Profile,
}

impl Pass {
    /// Items per second.
    pub fn throughput(&self) -> f64 {
        if self.seconds > 0.0 {
            self.items as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// Batch latency percentiles, in milliseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

/// Median, smallest and largest of the per-repetition ratios.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Ratio {
    /// Median over the repetitions.
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Ratio {
    /// The ratios `a[i] / b[i]`, paired by repetition.
    pub fn pairwise(a: &[f64], b: &[f64]) -> Option<Ratio> {
        let mut r: Vec<f64> = a
            .iter()
            .zip(b)
            .filter(|(_, b)| **b > 0.0)
            .map(|(a, b)| a / b)
            .collect();
        if r.is_empty() {
            return None;
        }
        r.sort_by(f64::total_cmp);
        let n = r.len();
        let median = if n % 2 == 1 {
            r[n / 2]
        } else {
            (r[n / 2 - 1] + r[n / 2]) / 2.0
        };
        Some(Ratio {
            median,
            min: r[0],
            max: r[n - 1],
        })
    }
}

/// One row of a result table.
#[derive(Clone, Debug, Serialize)]
pub struct Case {
    /// `upsert`, `delete_ids`, `delete_scope`, `search`, `search_scope`,
    /// `recover`, `verify_scope`.
    pub operation: &'static str,
    /// `raw`, `raw-overlapped`, `naive`, `tandem`, or for search `index` (raw index search) and
    /// `guarded`.
    pub protocol: &'static str,
    /// Records per call, where it applies.
    pub batch_size: Option<usize>,
    /// What `throughput` counts per second.
    pub unit: &'static str,
    /// Passes (repetitions) measured.
    pub passes: usize,
    /// Items over all passes.
    pub items: u64,
    /// Calls over all passes.
    pub calls: u64,
    /// Items per second over all passes.
    pub throughput: f64,
    /// Each pass's throughput, in repetition order.
    pub pass_throughputs: Vec<f64>,
    /// Latency of one call (a batch, a query, a whole recover or verify).
    pub latency_ms: Latency,
    /// Throughput relative to the raw protocol (index search, for searches),
    /// paired by repetition.
    pub vs_raw: Option<Ratio>,
    /// Throughput relative to the raw-overlapped protocol (upserts), paired
    /// by repetition.
    pub vs_raw_overlapped: Option<Ratio>,
    /// Throughput relative to the naive protocol, paired by repetition.
    pub vs_naive: Option<Ratio>,
    /// Metadata round trips per call: port calls for Tandem, SQL statements
    /// for the baselines (both counted by wrappers).
    pub metadata_calls_per_batch: f64,
    /// Index calls per call.
    pub index_calls_per_batch: f64,
    /// Request turns per call across the metadata proxy (with added latency).
    pub metadata_wire_round_trips_per_batch: Option<f64>,
    /// Request turns per call across the index proxy (with added latency;
    /// HTTP/2 flow control adds a few).
    pub index_wire_round_trips_per_batch: Option<f64>,
    /// Peak resident set of the bench process during the case, in MiB.
    pub peak_rss_mib: Option<f64>,
    /// Where a call's time goes: per kind of port call (`metadata.prepare`,
    /// `index.upsert`, ...) or baseline SQL statement (`sql.commit`, ...),
    /// how many a call makes and their mean wall time. Overlapping calls
    /// (the gated commit and the index write) each count their own time.
    pub time_per_call_ms: BTreeMap<String, CallTime>,
}

/// One kind of call's share of a measured call ([`Case::time_per_call_ms`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct CallTime {
    /// Calls of this kind per measured call.
    pub per_call: f64,
    /// Their summed wall time per measured call, in milliseconds.
    pub ms_per_call: f64,
}

impl Case {
    /// Aggregates passes.
    pub fn from_passes(
        operation: &'static str,
        protocol: &'static str,
        batch_size: Option<usize>,
        unit: &'static str,
        passes: &[Pass],
    ) -> Case {
        let items: u64 = passes.iter().map(|p| p.items).sum();
        let calls: u64 = passes.iter().map(|p| p.batches).sum();
        let seconds: f64 = passes.iter().map(|p| p.seconds).sum();
        let per = |n: u64| {
            if calls > 0 {
                n as f64 / calls as f64
            } else {
                0.0
            }
        };
        let sum_opt = |f: fn(&Pass) -> Option<u64>| -> Option<f64> {
            let v: Option<Vec<u64>> = passes.iter().map(f).collect();
            v.map(|v| per(v.iter().sum()))
        };
        Case {
            operation,
            protocol,
            batch_size,
            unit,
            passes: passes.len(),
            items,
            calls,
            throughput: if seconds > 0.0 {
                items as f64 / seconds
            } else {
                0.0
            },
            pass_throughputs: passes.iter().map(Pass::throughput).collect(),
            latency_ms: latency(passes.iter().flat_map(|p| p.latencies_us.iter().copied())),
            vs_raw: None,
            vs_raw_overlapped: None,
            vs_naive: None,
            metadata_calls_per_batch: per(passes.iter().map(|p| p.calls.metadata).sum()),
            index_calls_per_batch: per(passes.iter().map(|p| p.calls.index).sum()),
            metadata_wire_round_trips_per_batch: sum_opt(|p| p.metadata_wire),
            index_wire_round_trips_per_batch: sum_opt(|p| p.index_wire),
            peak_rss_mib: passes
                .iter()
                .filter_map(|p| p.peak_rss)
                .max()
                .map(|b| b as f64 / (1024.0 * 1024.0)),
            time_per_call_ms: {
                let mut sum: BTreeMap<String, (u64, u64)> = BTreeMap::new();
                for (k, (n, ns)) in passes.iter().flat_map(|p| p.profile.iter()) {
                    let e = sum.entry((*k).to_owned()).or_default();
                    e.0 += n;
                    e.1 += ns;
                }
                sum.into_iter()
                    .map(|(k, (n, ns))| {
                        let spent = CallTime {
                            per_call: per(n),
                            ms_per_call: per(ns) / 1e6,
                        };
                        (k, spent)
                    })
                    .collect()
            },
        }
    }
}

/// Percentiles of latencies given in microseconds.
pub fn latency(values: impl Iterator<Item = u64>) -> Latency {
    let Ok(mut h) = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 24 * 3_600_000_000, 3)
    else {
        return Latency::default();
    };
    for v in values {
        let _ = h.record(v.max(1));
    }
    if h.is_empty() {
        return Latency::default();
    }
    let ms = |us: u64| us as f64 / 1000.0;
    Latency {
        p50: ms(h.value_at_quantile(0.50)),
        p95: ms(h.value_at_quantile(0.95)),
        p99: ms(h.value_at_quantile(0.99)),
        max: ms(h.max()),
        mean: h.mean() / 1000.0,
    }
}

/// A target of issue 6, checked against this run.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    /// What is required.
    pub target: String,
    /// What was measured.
    pub measured: String,
    /// Whether it holds.
    pub met: bool,
}

/// One run: a backend, an added latency and a dimension.
#[derive(Clone, Debug, Serialize)]
pub struct Run {
    /// `embedded` or `servers`.
    pub backend: &'static str,
    /// The metadata store.
    pub metadata_store: String,
    /// The vector index.
    pub vector_index: String,
    /// One-way delay added in front of each server.
    pub added_latency_ms: f64,
    /// Median `SELECT 1` round trip through the proxy.
    pub measured_round_trip_ms: Option<f64>,
    /// Vector dimension.
    pub dim: usize,
    /// Every case.
    pub cases: Vec<Case>,
    /// The targets that concern this run.
    pub targets: Vec<Target>,
    /// `verify` of the whole store after the run found both stores consistent.
    pub consistent_after: bool,
    /// Wall time of the run.
    pub seconds: f64,
}

impl Run {
    /// The title line of its table.
    pub fn title(&self) -> String {
        let mut t = format!(
            "{} ({} + {}), dim {}",
            self.backend, self.metadata_store, self.vector_index, self.dim
        );
        if self.backend == "servers" {
            t.push_str(&format!(
                ", added latency {} ms one-way",
                self.added_latency_ms
            ));
            if let Some(rt) = self.measured_round_trip_ms {
                t.push_str(&format!(" (measured round trip {rt:.2} ms)"));
            }
        }
        t
    }

    /// Where an upsert batch's time goes, per protocol and batch size: the
    /// mean milliseconds per batch of each kind of call (Markdown; empty
    /// when nothing was profiled).
    pub fn time_profile_markdown(&self) -> String {
        let upserts: Vec<&Case> = self
            .cases
            .iter()
            .filter(|c| c.operation == "upsert" && !c.time_per_call_ms.is_empty())
            .collect();
        if upserts.is_empty() {
            return String::new();
        }
        let mut out = String::from(
            "Where an upsert batch's time goes (mean ms per batch; calls per batch in \
             parentheses; overlapping calls each count their own time):\n\n\
             | protocol | batch | p50 ms | calls |\n|---|---:|---:|---|\n",
        );
        for c in upserts {
            let calls: Vec<String> = c
                .time_per_call_ms
                .iter()
                .map(|(k, t)| format!("{k} {} ({})", ms(t.ms_per_call), num(t.per_call)))
                .collect();
            out.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                c.protocol,
                c.batch_size.map_or("-".into(), |b| b.to_string()),
                ms(c.latency_ms.p50),
                calls.join(", ")
            ));
        }
        out.push('\n');
        out
    }

    /// The header and rows of its table.
    pub fn rows(&self) -> (Vec<&'static str>, Vec<Vec<String>>) {
        let header = vec![
            "operation",
            "protocol",
            "batch",
            "throughput",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "× raw",
            "× raw-ovl",
            "× naive",
            "meta RT/call",
            "index calls/call",
            "wire RT/call (meta+index)",
            "peak RSS MiB",
        ];
        let rows = self
            .cases
            .iter()
            .map(|c| {
                vec![
                    c.operation.to_owned(),
                    c.protocol.to_owned(),
                    c.batch_size.map_or("-".into(), |b| b.to_string()),
                    format!("{} {}", output::count(c.throughput.round() as u64), c.unit),
                    ms(c.latency_ms.p50),
                    ms(c.latency_ms.p95),
                    ms(c.latency_ms.p99),
                    ratio(c.vs_raw),
                    ratio(c.vs_raw_overlapped),
                    ratio(c.vs_naive),
                    num(c.metadata_calls_per_batch),
                    num(c.index_calls_per_batch),
                    match (
                        c.metadata_wire_round_trips_per_batch,
                        c.index_wire_round_trips_per_batch,
                    ) {
                        (Some(m), Some(i)) => format!("{}+{}", num(m), num(i)),
                        _ => "-".into(),
                    },
                    c.peak_rss_mib.map_or("-".into(), |m| format!("{m:.0}")),
                ]
            })
            .collect();
        (header, rows)
    }
}

fn ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn num(v: f64) -> String {
    if (v - v.round()).abs() < 0.005 {
        format!("{}", v.round() as i64)
    } else {
        format!("{v:.2}")
    }
}

fn ratio(r: Option<Ratio>) -> String {
    match r {
        Some(r) if r.median >= 10.0 => format!("{:.1}×", r.median),
        Some(r) => format!("{:.2}×", r.median),
        None => "-".into(),
    }
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The exact command line.
    pub command: String,
    /// Tandem's version.
    pub version: &'static str,
    /// The machine.
    pub machine: Machine,
    /// The parameters.
    pub params: serde_json::Value,
    /// Every run.
    pub runs: Vec<Run>,
    /// Every run ended consistent.
    pub consistent: bool,
}

/// Where it ran.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// Logical CPUs.
    pub cpus: usize,
    /// `linux`, ...
    pub os: &'static str,
    /// `x86_64`, ...
    pub arch: &'static str,
}

impl Machine {
    /// This machine.
    pub fn here() -> Self {
        Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            os: std::env::consts::OS,
            arch: std::env::consts::ARCH,
        }
    }
}

impl Report {
    /// Tables for the terminal.
    pub fn terminal(&self) -> String {
        let mut out = String::new();
        for run in &self.runs {
            let (header, rows) = run.rows();
            out.push_str(&run.title());
            out.push('\n');
            let numeric: Vec<bool> = (0..header.len()).map(|i| i >= 2).collect();
            out.push_str(&output::table(&header, &numeric, rows));
            out.push('\n');
            for t in &run.targets {
                out.push_str(&format!(
                    "  [{}] {} — measured {}\n",
                    if t.met { "met" } else { "MISSED" },
                    t.target,
                    t.measured
                ));
            }
            out.push_str(&format!(
                "  verify after the run: {}\n\n",
                if run.consistent_after {
                    "consistent"
                } else {
                    "INCONSISTENT"
                }
            ));
        }
        out
    }

    /// The same as Markdown.
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "# tandem bench results\n\nCommand: `{}`\n\nMachine: {} CPUs, {} {}. \
             Tandem {}.\n\n",
            self.command, self.machine.cpus, self.machine.os, self.machine.arch, self.version
        );
        for run in &self.runs {
            out.push_str(&format!("## {}\n\n", run.title()));
            let (header, rows) = run.rows();
            out.push_str(&format!("| {} |\n", header.join(" | ")));
            out.push_str(&format!(
                "|{}\n",
                header
                    .iter()
                    .enumerate()
                    .map(|(i, _)| if i >= 2 { "---:|" } else { "---|" })
                    .collect::<String>()
            ));
            for r in rows {
                out.push_str(&format!("| {} |\n", r.join(" | ")));
            }
            out.push('\n');
            if !run.targets.is_empty() {
                out.push_str("| target | measured | |\n|---|---|---|\n");
                for t in &run.targets {
                    out.push_str(&format!(
                        "| {} | {} | {} |\n",
                        t.target,
                        t.measured,
                        if t.met { "met" } else { "**missed**" }
                    ));
                }
                out.push('\n');
            }
            out.push_str(&run.time_profile_markdown());
            out.push_str(&format!(
                "Verify after the run: {}. Run time {:.0} s.\n\n",
                if run.consistent_after {
                    "consistent"
                } else {
                    "**inconsistent**"
                },
                run.seconds
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_are_paired_by_repetition() {
        let r = Ratio::pairwise(&[10.0, 30.0, 20.0], &[5.0, 10.0, 20.0]).unwrap();
        assert_eq!((r.min, r.median, r.max), (1.0, 2.0, 3.0));
        assert!(Ratio::pairwise(&[1.0], &[0.0]).is_none());
    }

    #[test]
    fn percentiles_of_known_latencies() {
        let l = latency((1..=100).map(|ms| ms * 1000));
        assert!((l.p50 - 50.0).abs() < 0.1, "{l:?}");
        assert!((l.p99 - 99.0).abs() < 0.1, "{l:?}");
        assert!((l.max - 100.0).abs() < 0.1, "{l:?}");
        assert!((l.mean - 50.5).abs() < 0.1, "{l:?}");
    }

    #[test]
    fn a_case_aggregates_its_passes() {
        let pass = |items, seconds| Pass {
            items,
            batches: items / 10,
            seconds,
            latencies_us: vec![1000; (items / 10) as usize],
            calls: Calls {
                metadata: 3 * items / 10,
                index: items / 10,
            },
            metadata_wire: Some(items),
            index_wire: None,
            peak_rss: Some(64 << 20),
            // Two prepares per batch of 10 records, 0.5 ms each.
            profile: [("metadata.prepare", (2 * items / 10, items * 100_000))]
                .into_iter()
                .collect(),
        };
        let c = Case::from_passes(
            "upsert",
            "tandem",
            Some(10),
            "rec/s",
            &[pass(100, 1.0), pass(300, 1.0)],
        );
        assert_eq!(c.throughput, 200.0);
        assert_eq!(c.pass_throughputs, vec![100.0, 300.0]);
        assert_eq!(c.metadata_calls_per_batch, 3.0);
        assert_eq!(c.index_calls_per_batch, 1.0);
        assert_eq!(c.metadata_wire_round_trips_per_batch, Some(10.0));
        assert_eq!(c.index_wire_round_trips_per_batch, None);
        assert_eq!(c.peak_rss_mib, Some(64.0));
        assert_eq!(
            c.time_per_call_ms["metadata.prepare"],
            CallTime {
                per_call: 2.0,
                ms_per_call: 1.0
            }
        );
        let run = Run {
            backend: "embedded",
            metadata_store: "m".into(),
            vector_index: "i".into(),
            added_latency_ms: 0.0,
            measured_round_trip_ms: None,
            dim: 8,
            cases: vec![c],
            targets: Vec::new(),
            consistent_after: true,
            seconds: 1.0,
        };
        let md = run.time_profile_markdown();
        assert!(
            md.contains("| tandem | 10 | 1.00 | metadata.prepare 1.00 (2) |"),
            "{md}"
        );
    }
}
