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

    /// Median, smallest and largest of `values` themselves (not a ratio:
    /// e.g. the throughputs of a case's repetitions).
    pub fn spread(values: &[f64]) -> Option<Ratio> {
        Ratio::pairwise(values, &vec![1.0; values.len()])
    }
}

/// One row of a result table.
#[derive(Clone, Debug, Serialize)]
pub struct Case {
    /// `upsert`, `index_drain`, `index_lag`, `delete_ids`, `delete_scope`,
    /// `search`, `search_scope`, `recover`, `verify_scope`; re-indexing:
    /// `reindex_ingest`, `reindex_rebuild`, `write_update`, `write_insert`.
    pub operation: &'static str,
    /// `raw`, `raw-overlapped`, `naive`, `tandem`, `raw-insert`, `deferred`;
    /// for search `index` (raw index search) and `guarded`; for the index
    /// workers `workers`; for the rebuild `kept-vectors`; for the writes of
    /// the re-indexing cases `no-migration` and `migration-open`.
    pub protocol: &'static str,
    /// Records per call, where it applies (for the rebuild: rows per copy
    /// chunk).
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
    /// The re-indexing cases' comparisons and checks (when they ran).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reindex: Option<ReindexSummary>,
    /// `verify` of the whole store after the run found both stores
    /// consistent (and so did every check of the re-indexing cases).
    pub consistent_after: bool,
    /// Wall time of the run.
    pub seconds: f64,
}

/// The re-indexing cases of one run (issue 14): the rebuild's throughput
/// against the ingest path's, and Tandem's write latency with a migration
/// open against none. Each repetition runs on fresh stores of its own.
#[derive(Clone, Debug, Serialize)]
pub struct ReindexSummary {
    /// Records ingested before each rebuild (every repetition).
    pub records: u64,
    /// Records per batch of the ingest (Tandem upsert).
    pub ingest_batch: usize,
    /// Rows per copy chunk (`ReindexConfig::chunk`): one scan, the index
    /// writes, one garbage read and one progress commit each.
    pub chunk: usize,
    /// Points per index call of the copy (`Limits::index_chunk`).
    pub index_chunk: usize,
    /// The rebuild's records per second (from the kept vectors into a new
    /// collection, up to and including the switch): median, min and max
    /// over the repetitions.
    pub rebuild_records_per_s: Option<Ratio>,
    /// The ingest path's records per second, likewise.
    pub ingest_records_per_s: Option<Ratio>,
    /// Rebuild ÷ ingest throughput, paired by repetition.
    pub rebuild_vs_ingest: Option<Ratio>,
    /// What each rebuild did and what was checked after it.
    pub rebuilds: Vec<RebuildCheck>,
    /// Tandem upsert latency with a migration open against none, per kind
    /// of write and batch size.
    pub writes: Vec<WriteOverhead>,
    /// Per repetition: rows the copy of the migration the writes ran
    /// beside wrote into its target (`ReindexOptions { switch: false }`).
    pub migration_copies: Vec<u64>,
    /// Per period of an open migration: the garbage it recorded.
    pub garbage: Vec<GarbageCheck>,
    /// Every rebuild copied every record and switched, the new collection
    /// held every record's point (verify exact), every period of an open
    /// migration recorded one garbage point per update, and verify found
    /// the stores consistent at the end of every repetition.
    pub consistent: bool,
}

/// One rebuild ([`ReindexSummary::rebuilds`]).
#[derive(Clone, Debug, Serialize)]
pub struct RebuildCheck {
    /// Rows the rebuild copied.
    pub copied: u64,
    /// Did it switch to the new collection?
    pub switched: bool,
    /// Catch-up rounds of the switch.
    pub switch_rounds: u32,
    /// Its wall time, as the coordinator measured it.
    pub seconds: f64,
    /// Points in the new (now active) collection after the switch.
    pub points_in_new_collection: u64,
    /// Rows `verify` counted after the switch.
    pub rows: u64,
    /// Rows whose point the new collection lacked (`verify`).
    pub missing_points: u64,
    /// Points in it that no row references (`verify`).
    pub orphan_points: u64,
}

/// Write latency with a migration open against none, for one kind of write
/// and one batch size ([`ReindexSummary::writes`]).
#[derive(Clone, Debug, Serialize)]
pub struct WriteOverhead {
    /// `update` (existing records, new vectors: each commit stops
    /// referencing a point) or `insert` (new records).
    pub write: &'static str,
    /// Records per batch.
    pub batch_size: usize,
    /// Per-batch latency with no migration open (all repetitions).
    pub no_migration_ms: Latency,
    /// Per-batch latency with a migration open.
    pub migration_open_ms: Latency,
    /// Open ÷ none of each repetition's p50, paired by repetition.
    pub p50_ratio: Option<Ratio>,
    /// Open ÷ none of each repetition's p99, paired by repetition.
    pub p99_ratio: Option<Ratio>,
    /// Open ÷ none throughput, paired by repetition.
    pub throughput_ratio: Option<Ratio>,
}

/// The garbage one period of an open migration recorded
/// ([`ReindexSummary::garbage`]).
#[derive(Clone, Debug, Serialize)]
pub struct GarbageCheck {
    /// Records updated while it was open (each update repoints its row).
    pub updated_while_open: u64,
    /// Points recorded as garbage meanwhile (`migration_garbage`).
    pub garbage_recorded: u64,
}

impl ReindexSummary {
    /// Its tables (Markdown, which also reads well in a terminal).
    pub fn markdown(&self) -> String {
        let spread = |r: Option<Ratio>, unit: &str| match r {
            Some(r) => format!(
                "{} {unit} | {} | {}",
                output::count(r.median.round() as u64),
                output::count(r.min.round() as u64),
                output::count(r.max.round() as u64)
            ),
            None => "- | - | -".into(),
        };
        let times = |r: Option<Ratio>| match r {
            Some(r) => format!("{:.2}× | {:.2}× | {:.2}×", r.median, r.min, r.max),
            None => "- | - | -".into(),
        };
        let mut out = format!(
            "Re-indexing: {} records ingested (Tandem upsert, batch {}), then rebuilt from \
             the kept vectors into a new collection, up to the switch (copy chunk {} rows, \
             {} points per index call); fresh stores every repetition.\n\n",
            output::count(self.records),
            self.ingest_batch,
            self.chunk,
            self.index_chunk,
        );
        out.push_str("| | median | min | max |\n|---|---:|---:|---:|\n");
        out.push_str(&format!(
            "| rebuild | {} |\n",
            spread(self.rebuild_records_per_s, "rec/s")
        ));
        out.push_str(&format!(
            "| ingest | {} |\n",
            spread(self.ingest_records_per_s, "rec/s")
        ));
        out.push_str(&format!(
            "| rebuild ÷ ingest (paired) | {} |\n\n",
            times(self.rebuild_vs_ingest)
        ));
        let checks: Vec<String> = self
            .rebuilds
            .iter()
            .map(|r| {
                format!(
                    "{} copied in {:.1} s, {} switch round(s), {} points for {} rows \
                     ({} missing, {} orphans)",
                    output::count(r.copied),
                    r.seconds,
                    r.switch_rounds,
                    output::count(r.points_in_new_collection),
                    output::count(r.rows),
                    r.missing_points,
                    r.orphan_points
                )
            })
            .collect();
        out.push_str(&format!("After each rebuild: {}.\n\n", checks.join("; ")));
        if !self.writes.is_empty() {
            out.push_str(
                "Tandem upsert latency per batch with a migration open (copied, not \
                 switched) against none, interleaved; ratios open ÷ none, paired by \
                 repetition (median, min–max):\n\n",
            );
            out.push_str(
                "| write | batch | p50 ms none → open | × p50 | p99 ms none → open | × p99 \
                 | × throughput |\n|---|---:|---:|---:|---:|---:|---:|\n",
            );
            let ratio = |r: Option<Ratio>| match r {
                Some(r) => format!("{:.2}× ({:.2}–{:.2})", r.median, r.min, r.max),
                None => "-".into(),
            };
            for w in &self.writes {
                out.push_str(&format!(
                    "| {} | {} | {} → {} | {} | {} → {} | {} | {} |\n",
                    w.write,
                    w.batch_size,
                    ms(w.no_migration_ms.p50),
                    ms(w.migration_open_ms.p50),
                    ratio(w.p50_ratio),
                    ms(w.no_migration_ms.p99),
                    ms(w.migration_open_ms.p99),
                    ratio(w.p99_ratio),
                    ratio(w.throughput_ratio),
                ));
            }
            out.push('\n');
        }
        let updated: u64 = self.garbage.iter().map(|g| g.updated_while_open).sum();
        let recorded: u64 = self.garbage.iter().map(|g| g.garbage_recorded).sum();
        out.push_str(&format!(
            "The migrations' copies wrote {} rows each; while open they recorded {} garbage \
             points for {} updated records ({} periods open).\n\n",
            self.migration_copies
                .iter()
                .map(|c| output::count(*c))
                .collect::<Vec<_>>()
                .join(", "),
            output::count(recorded),
            output::count(updated),
            self.garbage.len()
        ));
        out
    }
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
            if let Some(r) = &run.reindex {
                out.push('\n');
                out.push_str(&r.markdown());
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
            if let Some(r) = &run.reindex {
                out.push_str(&r.markdown());
            }
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
            reindex: None,
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
