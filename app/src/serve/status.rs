//! `GET /api/v1/status`: the numbers the dashboard shows, as one JSON
//! document.
//!
//! The background tasks keep their latest results in [`Live`]; once a second
//! the sampler folds them and the [`Series`] into a [`Status`] document,
//! serializes it once and keeps the last [`KEPT_SNAPSHOTS`] of them. Every
//! reader of the same second gets the same bytes (with the same `seq`), and
//! `?seq=N` returns a recent one again — so a page and a script can compare
//! exactly what was shown.
//!
//! Room to grow: typed sections are `Option`s or lists that a feature fills
//! when it exists, and [`Section`]s are generic key/value panels the dashboard
//! renders without knowing them (the service's configuration and the sagas by
//! state are two; an outbox backlog or reindex progress would be others).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;
use utoipa::ToSchema;

use super::series::{PhaseStatus, SeriesStatus};

/// How many recent snapshots `?seq=N` can return.
pub const KEPT_SNAPSHOTS: usize = 120;
/// How many recent background runs each task reports.
pub const RECENT_RUNS: usize = 20;

/// The status document.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Status {
    /// The snapshot's number: one per second since the service started.
    pub seq: u64,
    /// When it was taken (ms since the Unix epoch).
    pub generated_at_ms: i64,
    /// The service itself.
    pub service: ServiceInfo,
    /// Both stores and whether each answered the last probe.
    pub stores: Vec<StoreStatus>,
    /// The coordinator's outcomes over time.
    pub activity: Activity,
    /// Latency percentiles per protocol phase over the last minute.
    pub phases: Vec<PhaseStatus>,
    /// Unresolved intents.
    pub backlog: Backlog,
    /// Background recovery.
    pub recovery: TaskStatus,
    /// Background verification.
    pub verification: VerificationStatus,
    /// The HTTP API.
    pub http: HttpStatus,
    /// Further panels, generic: each a title and rows of label and value.
    pub sections: Vec<Section>,
}

/// The service itself.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ServiceInfo {
    /// The version of `tandem`.
    pub version: &'static str,
    /// When the service started (ms since the Unix epoch).
    pub started_at_ms: i64,
    /// Seconds since then.
    pub uptime_secs: f64,
    /// Whether API calls need a bearer token.
    pub auth_required: bool,
    /// Whether a shutdown has begun (no new calls are accepted).
    pub shutting_down: bool,
}

/// One store, without credentials.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct StoreStatus {
    /// `metadata` or `index`.
    pub role: &'static str,
    /// The store and its endpoint, e.g. "PostgreSQL metadata store at
    /// db:5432/app (schema tandem)".
    pub name: String,
    /// Whether it answered the last probe.
    pub reachable: bool,
    /// When it was last probed (ms since the Unix epoch; 0: not yet).
    pub checked_at_ms: i64,
    /// How long the last probe took, in milliseconds.
    pub probe_ms: Option<f64>,
    /// Why the last probe failed (redacted).
    pub error: Option<String>,
}

/// The coordinator's outcomes over the window.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Activity {
    /// Seconds between samples.
    pub interval_secs: f64,
    /// Seconds the series cover.
    pub window_secs: u64,
    /// When each value of `series[].per_sec` ends (ms since the Unix epoch).
    pub times_ms: Vec<i64>,
    /// Commits over commits and rollbacks in the window (`null`: neither).
    pub success_ratio: Option<f64>,
    /// One entry per counter (see `docs/serve.md`).
    pub series: Vec<SeriesStatus>,
}

/// Unresolved intents, as the last probe listed them.
#[derive(Clone, Debug, Default, Serialize, ToSchema)]
pub struct Backlog {
    /// Unresolved intents (writes in flight, left to recovery, or held by
    /// live sagas).
    pub live_intents: u64,
    /// Of those, intents held by a live saga: they end with the saga.
    pub held_intents: u64,
    /// Of those not held, intents whose lease has ended: recovery's backlog.
    pub expired_intents: u64,
    /// Age of the oldest unresolved intent not held by a saga, in seconds
    /// (`null`: none).
    pub oldest_intent_age_secs: Option<f64>,
    /// The listing stopped at its limit: there are at least this many.
    pub capped: bool,
    /// When the probe listed them (ms since the Unix epoch; 0: not yet).
    pub checked_at_ms: i64,
}

/// One run of a background task.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct RunRecord {
    /// When it started (ms since the Unix epoch).
    pub started_at_ms: i64,
    /// How long it took, in milliseconds.
    pub duration_ms: f64,
    /// Whether it failed (an error, or intents it could not handle).
    pub failed: bool,
    /// What it did, as the coordinator reported it.
    #[schema(value_type = Object)]
    pub report: serde_json::Value,
    /// Why it failed (redacted).
    pub error: Option<String>,
}

/// A periodic background task.
#[derive(Clone, Debug, Default, Serialize, ToSchema)]
pub struct TaskStatus {
    /// Whether it runs at all.
    pub enabled: bool,
    /// Seconds between runs.
    pub every_secs: f64,
    /// Runs since the service started.
    pub runs: u64,
    /// Of those, failed runs.
    pub failures: u64,
    /// The most recent runs, newest last.
    pub recent: Vec<RunRecord>,
}

/// The last verification of one scope.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ScopeVerification {
    /// The scope.
    pub scope: String,
    /// Rows checked in the metadata store.
    pub rows: u64,
    /// Points checked in the index.
    pub points: u64,
    /// Rows whose point is missing (confirmed).
    pub missing: u64,
    /// Points without a row or intent (confirmed).
    pub orphans: u64,
    /// No missing point and no orphan.
    pub consistent: bool,
    /// When the pass that checked it ended (ms since the Unix epoch).
    pub verified_at_ms: i64,
}

/// A pass of the rolling verification.
#[derive(Clone, Debug, Default, Serialize, ToSchema)]
pub struct PassStatus {
    /// When it started (ms since the Unix epoch).
    pub started_at_ms: i64,
    /// When it ended (`null`: still running).
    pub finished_at_ms: Option<i64>,
    /// Steps (pages) so far.
    pub pages: u64,
    /// Rows checked so far.
    pub rows: u64,
    /// Points checked so far.
    pub points: u64,
}

/// The rolling verification.
#[derive(Clone, Debug, Default, Serialize, ToSchema)]
pub struct VerificationStatus {
    /// Its steps, as a periodic task (one run = one page).
    #[serde(flatten)]
    pub task: TaskStatus,
    /// Rows and points per step at most.
    pub page_size: usize,
    /// Whether an inconsistent scope is repaired.
    pub repair: bool,
    /// Completed passes over the whole store.
    pub passes: u64,
    /// The pass under way.
    pub current: Option<PassStatus>,
    /// The last completed pass.
    pub last_pass: Option<PassStatus>,
    /// Scopes whose last verification found missing points or orphans.
    pub inconsistent_scopes: u64,
    /// The last verification of every scope seen, by scope name.
    pub scopes: Vec<ScopeVerification>,
}

/// The HTTP API's requests since the start.
#[derive(Clone, Debug, Default, Serialize, ToSchema)]
pub struct HttpStatus {
    /// Requests answered.
    pub requests: u64,
    /// Answered with a 4xx status.
    pub client_errors: u64,
    /// Answered with a 5xx status.
    pub server_errors: u64,
    /// Write calls still running (their client may have gone).
    pub writes_in_flight: u64,
}

/// A generic panel: a title and rows.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Section {
    /// Stable id.
    pub id: String,
    /// Its title on the dashboard.
    pub title: String,
    /// Its rows.
    pub rows: Vec<SectionRow>,
}

/// A row of a [`Section`].
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct SectionRow {
    /// Stable key within the section.
    pub key: String,
    /// What the dashboard calls it.
    pub label: String,
    /// The value (number, string, boolean).
    #[schema(value_type = Object)]
    pub value: serde_json::Value,
    /// Shown as an alert (red).
    pub alert: bool,
}

/// What the background tasks found last: shared by the tasks (writers) and
/// the sampler (reader).
#[derive(Default)]
pub struct Live {
    inner: Mutex<LiveInner>,
}

/// The fields of [`Live`].
#[derive(Default)]
pub struct LiveInner {
    /// Per store, in the order of [`Status::stores`].
    pub stores: Vec<StoreStatus>,
    /// The last backlog probe.
    pub backlog: Backlog,
    /// Recovery.
    pub recovery: TaskStatus,
    /// Verification.
    pub verification: VerificationStatus,
    /// The last count of sagas by state (`None` until one succeeded).
    pub sagas: Option<Section>,
    /// The last deferred-indexing backlog (`None` until one succeeded, or
    /// without deferred indexing).
    pub indexing: Option<Section>,
    /// The active collection and any open re-index (`None` until read, or
    /// on a store without re-indexing).
    pub collection: Option<Section>,
}

impl Live {
    /// Runs `f` on the state.
    pub fn with<T>(&self, f: impl FnOnce(&mut LiveInner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl TaskStatus {
    /// Records a run, keeping the last [`RECENT_RUNS`].
    pub fn record(&mut self, run: RunRecord) {
        self.runs += 1;
        if run.failed {
            self.failures += 1;
        }
        self.recent.push(run);
        if self.recent.len() > RECENT_RUNS {
            self.recent.remove(0);
        }
    }
}

/// A serialized snapshot.
pub struct Snapshot {
    /// Its `seq`.
    pub seq: u64,
    /// The JSON document.
    pub json: axum::body::Bytes,
}

/// The recent snapshots.
#[derive(Default)]
pub struct Snapshots {
    kept: Mutex<VecDeque<Arc<Snapshot>>>,
    seq: std::sync::atomic::AtomicU64,
}

impl Snapshots {
    /// The number of the next snapshot.
    pub fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// Keeps a new snapshot (dropping the oldest beyond [`KEPT_SNAPSHOTS`]).
    pub fn publish(&self, status: &Status) {
        let json = match serde_json::to_vec(status) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::error!(error = %e, "cannot serialize the status");
                return;
            }
        };
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        kept.push_back(Arc::new(Snapshot {
            seq: status.seq,
            json: json.into(),
        }));
        while kept.len() > KEPT_SNAPSHOTS {
            kept.pop_front();
        }
    }

    /// The latest snapshot, or the one numbered `seq` while it is kept.
    pub fn get(&self, seq: Option<u64>) -> Option<Arc<Snapshot>> {
        let kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        match seq {
            None => kept.back().cloned(),
            Some(n) => kept.iter().find(|s| s.seq == n).cloned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(failed: bool) -> RunRecord {
        RunRecord {
            started_at_ms: 1,
            duration_ms: 2.0,
            failed,
            report: serde_json::json!({}),
            error: None,
        }
    }

    #[test]
    fn tasks_count_runs_and_failures_and_keep_the_recent_ones() {
        let mut t = TaskStatus::default();
        for i in 0..(RECENT_RUNS + 5) {
            t.record(run(i % 5 == 0));
        }
        assert_eq!(t.runs, (RECENT_RUNS + 5) as u64);
        assert_eq!(t.failures, 5);
        assert_eq!(t.recent.len(), RECENT_RUNS);
    }

    fn status(seq: u64) -> Status {
        Status {
            seq,
            generated_at_ms: 0,
            service: ServiceInfo {
                version: "test",
                started_at_ms: 0,
                uptime_secs: 0.0,
                auth_required: false,
                shutting_down: false,
            },
            stores: Vec::new(),
            activity: Activity {
                interval_secs: 1.0,
                window_secs: 60,
                times_ms: Vec::new(),
                success_ratio: None,
                series: Vec::new(),
            },
            phases: Vec::new(),
            backlog: Backlog::default(),
            recovery: TaskStatus::default(),
            verification: VerificationStatus::default(),
            http: HttpStatus::default(),
            sections: Vec::new(),
        }
    }

    #[test]
    fn snapshots_are_found_by_seq_while_kept() {
        let s = Snapshots::default();
        assert!(s.get(None).is_none());
        for _ in 0..(KEPT_SNAPSHOTS + 3) {
            s.publish(&status(s.next_seq()));
        }
        let latest = s.get(None).unwrap();
        assert_eq!(latest.seq, KEPT_SNAPSHOTS as u64 + 2);
        let doc: serde_json::Value = serde_json::from_slice(&latest.json).unwrap();
        assert_eq!(doc["seq"], KEPT_SNAPSHOTS as u64 + 2);
        assert!(s.get(Some(0)).is_none(), "expired");
        assert_eq!(s.get(Some(10)).unwrap().seq, 10);
    }
}
