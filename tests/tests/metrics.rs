//! What the coordinator's metrics say, event by event.
//!
//! A dashboard and Prometheus alerts are built on these metrics (the inventory
//! is `docs/metrics.md`), so each test drives one event through the coordinator
//! — the in-memory stores behind the fault wrappers, faults injected by rules —
//! and asserts the exact change of **every** tandem metric: each counter that
//! must move, by how much; every other counter unmoved; and the number of
//! `tandem_phase_seconds` samples per (op, phase). The comparison is of the
//! whole set of moved metrics, so a counter moved twice, moved by the wrong
//! event, moved under another label, or a phase never (or twice) timed, fails.
//!
//! Isolation, and why it holds across `.await`s: each test builds its own
//! `metrics_util` [`DebuggingRecorder`] and installs it as the *thread-local*
//! recorder of the test's thread (`metrics::set_default_local_recorder`), then
//! runs everything on a **current-thread** tokio runtime built inside the test.
//! `block_on` polls every future (and every task spawned onto that runtime) on
//! the calling thread, so every metric the coordinator records, on either side
//! of any `.await`, lands in that test's recorder. No global recorder is ever
//! installed: the tests run in parallel with each other and with whatever
//! else shares the process. Should the coordinator ever record from another
//! thread (`spawn_blocking`, a multi-thread runtime), that record would go to
//! the no-op global recorder and the test expecting it would fail — never pass
//! silently.
//!
//! The recorder's snapshot drains what it reports (counters back to zero,
//! histograms emptied), so [`Meter::take`] after the setup discards the
//! setup's metrics and the next `take` returns exactly what the event moved.
//! Time is paused: backoff sleeps are instant; phase samples are counted (and
//! checked to be finite and non-negative), not timed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use metrics_util::{CompositeKey, MetricKind};
use serde_json::json;
use tandem_adapters::memory::{InMemoryMetadataRepo, InMemoryVectorIndex};
use tandem_core::testkit::faults::{Call, Fault, FaultyMetadataRepo, FaultyVectorIndex, Rule};
use tandem_core::{
    Coordinator, CoordinatorError, DeleteSelector, Distance, NewRecord, Outcome, Point, PointId,
    RecordId, RecoveryReport, SagaState, Scope, SearchQuery, Transaction, VectorIndex,
    WriteOptions,
};
use tandem_tests::harness::{DIM, FaultyCoordinator, World, fault_config, rid, vector_for};

// ---------------------------------------------------------------------------
// The inventory (docs/metrics.md) and the meter.
// ---------------------------------------------------------------------------

/// Every metric the coordinator records: name, kind, label keys. Kept equal to
/// the macros in `core/src` and to `docs/metrics.md` by
/// [`the_inventory_matches_the_core_sources_the_docs_and_the_exporter_descriptions`].
const INVENTORY: [(&str, MetricKind, &[&str]); 25] = [
    ("tandem_commits_total", MetricKind::Counter, &["op"]),
    ("tandem_rollbacks_total", MetricKind::Counter, &["op"]),
    ("tandem_compensations_total", MetricKind::Counter, &[]),
    (
        "tandem_ambiguous_commits_total",
        MetricKind::Counter,
        &["settled"],
    ),
    (
        "tandem_deferred_cleanup_points_total",
        MetricKind::Counter,
        &[],
    ),
    ("tandem_recovered_intents_total", MetricKind::Counter, &[]),
    ("tandem_retries_total", MetricKind::Counter, &["call"]),
    ("tandem_late_write_guards_total", MetricKind::Counter, &[]),
    ("tandem_pending_intents", MetricKind::Gauge, &[]),
    (
        "tandem_phase_seconds",
        MetricKind::Histogram,
        &["op", "phase"],
    ),
    ("tandem_sagas_started_total", MetricKind::Counter, &[]),
    ("tandem_embed_retries_total", MetricKind::Counter, &[]),
    ("tandem_sagas_total", MetricKind::Counter, &["outcome"]),
    (
        "tandem_saga_steps_total",
        MetricKind::Counter,
        &["kind", "outcome"],
    ),
    ("tandem_indexed_records_total", MetricKind::Counter, &[]),
    ("tandem_dead_lettered_total", MetricKind::Counter, &[]),
    ("tandem_index_pending", MetricKind::Gauge, &[]),
    ("tandem_index_dead_letters", MetricKind::Gauge, &[]),
    (
        "tandem_index_oldest_pending_seconds",
        MetricKind::Gauge,
        &[],
    ),
    ("tandem_index_indexed_last_minute", MetricKind::Gauge, &[]),
    ("tandem_reindex_rows_total", MetricKind::Counter, &[]),
    ("tandem_reindex_copied_rows", MetricKind::Gauge, &[]),
    ("tandem_reindex_total_rows", MetricKind::Gauge, &[]),
    ("tandem_reindex_rows_per_second", MetricKind::Gauge, &[]),
    ("tandem_reindex_eta_seconds", MetricKind::Gauge, &[]),
];

/// What moved since the last [`Meter::take`]: counter increments, the number
/// of histogram samples, and gauges last set to a non-zero value. Keys read
/// `name{label=value,...}` (labels sorted by key); nothing unmoved is listed.
#[derive(Debug, Default, PartialEq)]
struct Moved {
    counters: BTreeMap<String, u64>,
    samples: BTreeMap<String, usize>,
    gauges: BTreeMap<String, f64>,
}

impl Moved {
    /// Exactly these counters moved by these amounts, and exactly these
    /// `tandem_phase_seconds{op, phase}` label sets got this many samples.
    fn expect(counters: &[(&str, u64)], phases: &[(&str, &str, usize)]) -> Self {
        Self {
            counters: counters.iter().map(|(k, n)| (k.to_string(), *n)).collect(),
            samples: phases
                .iter()
                .map(|(op, phase, n)| {
                    (format!("tandem_phase_seconds{{op={op},phase={phase}}}"), *n)
                })
                .collect(),
            gauges: BTreeMap::new(),
        }
    }

    fn with_gauge(mut self, key: &str, value: f64) -> Self {
        self.gauges.insert(key.to_owned(), value);
        self
    }

    /// Nothing moved at all.
    fn nothing() -> Self {
        Self::default()
    }
}

/// Reads the test's recorder.
struct Meter(Snapshotter);

impl Meter {
    /// What moved since the last call (the snapshot drains the recorder).
    /// Panics on a metric outside the [`INVENTORY`], or with other label keys.
    fn take(&self) -> Moved {
        let mut moved = Moved::default();
        for (key, _, _, value) in self.0.snapshot().into_vec() {
            let name = checked_key(&key);
            match value {
                DebugValue::Counter(0) => {}
                DebugValue::Counter(n) => {
                    moved.counters.insert(name, n);
                }
                DebugValue::Histogram(values) if values.is_empty() => {}
                DebugValue::Histogram(values) => {
                    assert!(
                        values.iter().all(|v| v.is_finite() && v.0 >= 0.0),
                        "{name}: a phase lasted {values:?} seconds"
                    );
                    moved.samples.insert(name, values.len());
                }
                DebugValue::Gauge(v) if v.0 == 0.0 => {}
                DebugValue::Gauge(v) => {
                    moved.gauges.insert(name, v.0);
                }
            }
        }
        moved
    }
}

/// `name{label=value,...}`, after checking the key against the inventory.
fn checked_key(key: &CompositeKey) -> String {
    let name = key.key().name();
    let mut labels: Vec<(&str, &str)> = key.key().labels().map(|l| (l.key(), l.value())).collect();
    labels.sort();
    let keys: Vec<&str> = labels.iter().map(|(k, _)| *k).collect();
    match INVENTORY.iter().find(|(n, _, _)| *n == name) {
        Some((_, kind, expected)) => {
            assert_eq!(key.kind(), *kind, "{name} recorded as another kind");
            let mut expected = expected.to_vec();
            expected.sort();
            assert_eq!(keys, expected, "{name} recorded with other label keys");
        }
        None => panic!("{name} is not in the inventory (docs/metrics.md)"),
    }
    if labels.is_empty() {
        return name.to_owned();
    }
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("{name}{{{}}}", labels.join(","))
}

#[track_caller]
fn assert_moved(seen: Moved, expected: Moved) {
    assert_eq!(
        seen, expected,
        "\nthe metrics moved (left) are not what the event must move (right)"
    );
}

/// The in-memory world every test runs in.
type MemWorld = World<InMemoryMetadataRepo, InMemoryVectorIndex>;

/// Runs `body` against a seeded world (records 1–4 in scope "a", 5–6 in "b")
/// with a recorder of its own, on a current-thread runtime with paused time;
/// the seed's metrics are discarded before `body` starts.
fn metered(body: impl AsyncFnOnce(&MemWorld, &Meter)) {
    let recorder = DebuggingRecorder::new();
    let meter = Meter(recorder.snapshotter());
    let world = World::new(
        InMemoryMetadataRepo::new(),
        InMemoryVectorIndex::new(DIM, Distance::Cosine),
        fault_config(Duration::from_secs(30)),
        7,
    )
    .with_catalog(InMemoryVectorIndex::new);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime");
    // Held for the whole test: every poll below runs on this thread.
    let _local = metrics::set_default_local_recorder(&recorder);
    runtime.block_on(async {
        world.seed().await;
        let seeded = meter.take();
        assert_eq!(
            seeded.counters.get("tandem_commits_total{op=upsert}"),
            Some(&1),
            "the recorder sees the seed's commit: metrics reach this test's recorder"
        );
        body(&world, &meter).await;
    });
}

/// A coordinator of the world (through the fault wrappers) whose commit
/// starts only after the index write succeeded.
fn without_overlap(w: &MemWorld) -> FaultyCoordinator<InMemoryMetadataRepo, InMemoryVectorIndex> {
    let mut config = w.config.clone();
    config.overlap_index_write = false;
    Coordinator::new(
        FaultyMetadataRepo::new(w.repo.clone(), w.ctl.clone()),
        FaultyVectorIndex::new(w.index.clone(), w.ctl.clone()),
        config,
    )
    .expect("valid config")
    .with_clock(Arc::new(w.clock.clone()))
}

/// Records `ns` of scope "a" at version `v` (new ids insert, seeded ids update).
fn batch(ns: &[u128], v: u32) -> Vec<NewRecord> {
    ns.iter()
        .map(|&n| {
            NewRecord::new("a", format!("record {n} v{v}"), vector_for(n, v))
                .with_id(rid(n))
                .with_metadata(json!({ "v": v }))
        })
        .collect()
}

/// Three new records (two index chunks at the harness's chunk size of 2).
fn three_new() -> Vec<NewRecord> {
    batch(&[0x101, 0x102, 0x103], 0)
}

/// The phases every successful upsert times once.
const UPSERT_PHASES: [(&str, &str, usize); 4] = [
    ("upsert", "prepare", 1),
    ("upsert", "index_write", 1),
    ("upsert", "commit", 1),
    ("upsert", "cleanup", 1),
];

/// The phases every successful delete times once.
const DELETE_PHASES: [(&str, &str, usize); 3] = [
    ("delete", "prepare", 1),
    ("delete", "commit", 1),
    ("delete", "cleanup", 1),
];

/// The phases of an upsert that does not get past its commit step.
const UPSERT_PHASES_WITHOUT_CLEANUP: [(&str, &str, usize); 3] = [
    ("upsert", "prepare", 1),
    ("upsert", "index_write", 1),
    ("upsert", "commit", 1),
];

// ---------------------------------------------------------------------------
// Writes that succeed.
// ---------------------------------------------------------------------------

#[test]
fn an_insert_counts_one_upsert_commit_and_times_each_upsert_phase_once() {
    metered(async |w, m| {
        let report = w.faulty().upsert(three_new()).await.expect("insert");
        assert_eq!((report.inserted, report.updated), (3, 0));
        assert_moved(
            m.take(),
            Moved::expect(&[("tandem_commits_total{op=upsert}", 1)], &UPSERT_PHASES),
        );
    });
}

#[test]
fn an_insert_without_overlap_moves_the_same_metrics() {
    metered(async |w, m| {
        let coordinator = without_overlap(w);
        coordinator.upsert(three_new()).await.expect("insert");
        assert_moved(
            m.take(),
            Moved::expect(&[("tandem_commits_total{op=upsert}", 1)], &UPSERT_PHASES),
        );
    });
}

#[test]
fn an_update_whose_old_points_are_cleaned_counts_one_commit_and_no_deferred_point() {
    metered(async |w, m| {
        let report = w.faulty().upsert(batch(&[1, 2], 1)).await.expect("update");
        assert_eq!((report.inserted, report.updated), (0, 2));
        assert_eq!(report.deferred_cleanup, 0);
        // The old points were deleted by the cleanup that was timed.
        assert_eq!(w.index.count(None).await.expect("count"), 6);
        assert_moved(
            m.take(),
            Moved::expect(&[("tandem_commits_total{op=upsert}", 1)], &UPSERT_PHASES),
        );
    });
}

#[test]
fn a_delete_counts_one_delete_commit_and_times_each_delete_phase_once() {
    metered(async |w, m| {
        let report = w
            .faulty()
            .delete(DeleteSelector::Ids(vec![rid(1), rid(2), rid(0x9999)]))
            .await
            .expect("delete");
        assert_eq!((report.deleted, report.deferred_cleanup), (2, 0));
        assert_moved(
            m.take(),
            Moved::expect(&[("tandem_commits_total{op=delete}", 1)], &DELETE_PHASES),
        );
    });
}

#[test]
fn a_deferred_upsert_counts_its_commit_and_the_workers_batch_counts_the_records_it_indexed() {
    metered(async |w, m| {
        let c = w.faulty();
        let report = c
            .upsert_with(batch(&[1, 0x101, 0x102], 3), &WriteOptions::deferred())
            .await
            .expect("deferred upsert");
        assert_eq!((report.inserted, report.updated), (2, 1));
        // One metadata transaction (it creates its own intent: no prepare);
        // no index write, no cleanup.
        assert_moved(
            m.take(),
            Moved::expect(
                &[("tandem_commits_total{op=deferred_upsert}", 1)],
                &[("deferred_upsert", "commit", 1)],
            ),
        );
        let stats = c.stats().await.expect("stats");
        assert_eq!(stats.pending.map(|p| p.pending), Some(3));
        // The deferred write's intent is spent (committed, naming no point):
        // it is left for recovery to resolve after its lease, and it is not
        // a live intent — only the three entries are work for the workers.
        assert_eq!((stats.live_intents, stats.spent_intents), (0, 1));
        assert_eq!(stats.expired_intents, 0);
        assert_moved(
            m.take(),
            Moved::nothing().with_gauge("tandem_index_pending", 3.0),
        );
        // One worker batch (the harness's batch of 2, then 1): each an
        // upsert-like unit; the records it switched in are counted.
        let indexed = c.index_pending().await.expect("index");
        assert_eq!((indexed.indexed, indexed.batches), (3, 2));
        assert_moved(
            m.take(),
            Moved::expect(
                &[
                    ("tandem_commits_total{op=index}", 2),
                    ("tandem_indexed_records_total", 3),
                ],
                &[
                    ("index", "prepare", 2),
                    ("index", "index_write", 2),
                    ("index", "commit", 2),
                    ("index", "cleanup", 2),
                ],
            ),
        );
        // Consistent with the spent intent still there; recovery resolves
        // it once its lease has ended (and not before).
        let verified = c.verify(None).await.expect("verify");
        assert!(verified.is_consistent(), "{verified:?}");
        assert_eq!(c.recover().await.expect("recover").resolved, 0);
        w.after_leases();
        let stats = c.stats().await.expect("stats");
        assert_eq!(
            (
                stats.live_intents,
                stats.expired_intents,
                stats.spent_intents
            ),
            (0, 0, 1),
            "an expired spent intent is not recovery's backlog"
        );
        assert_eq!(c.recover().await.expect("recover").resolved, 1);
        assert_eq!(c.stats().await.expect("stats").spent_intents, 0);
        let _ = m.take();
    });
}

#[test]
fn a_reindex_counts_the_rows_it_copies() {
    metered(async |w, m| {
        let report = w
            .clean()
            .reindex(&tandem_core::ReindexOptions::to("next"), &|_| {})
            .await
            .expect("reindex");
        assert!(report.switched);
        assert_eq!(report.copied, 6, "the six seeded rows, once each");
        let moved = m.take();
        assert_eq!(moved.counters.get("tandem_reindex_rows_total"), Some(&6));
        assert_eq!(moved.gauges.get("tandem_reindex_copied_rows"), Some(&6.0));
        assert_eq!(moved.gauges.get("tandem_reindex_total_rows"), Some(&6.0));
        assert!(
            moved
                .gauges
                .get("tandem_reindex_rows_per_second")
                .is_some_and(|r| *r > 0.0),
            "the rate: {:?}",
            moved.gauges
        );
    });
}

#[test]
fn a_search_times_one_index_round_and_one_guard_round() {
    metered(async |w, m| {
        let hits = w
            .faulty()
            .search(&SearchQuery::new(vector_for(1, 0), 2))
            .await
            .expect("search");
        assert_eq!(hits.len(), 2);
        assert_moved(
            m.take(),
            Moved::expect(&[], &[("search", "index", 1), ("search", "guard", 1)]),
        );
    });
}

#[test]
fn a_search_whose_first_candidates_are_all_filtered_out_times_both_phases_per_round() {
    metered(async |w, m| {
        // Two uncommitted points closer to the query than any record: the guard
        // drops both candidates of the first round (k = 1, over-fetch 2), so
        // the search asks the index again.
        let query = vec![-1.0, 0.5, -2.0, 3.0];
        let stray = |n: u128| Point {
            id: PointId::new_v7(),
            record_id: RecordId::new_v7(),
            scope: Scope::new("a"),
            metadata: Default::default(),
            vector: query.iter().map(|x| x * n as f32).collect(),
            written_at_ms: 0,
        };
        w.index
            .upsert(&[stray(1), stray(2)])
            .await
            .expect("stray points");
        let hits = w
            .faulty()
            .search(&SearchQuery::new(query.clone(), 1))
            .await
            .expect("search");
        assert_eq!(
            hits.len(),
            1,
            "a committed record is found in the second round"
        );
        assert_moved(
            m.take(),
            Moved::expect(&[], &[("search", "index", 2), ("search", "guard", 2)]),
        );
    });
}

// ---------------------------------------------------------------------------
// Rollbacks.
// ---------------------------------------------------------------------------

#[test]
fn a_rejected_index_write_counts_one_rollback_and_one_compensation() {
    metered(async |w, m| {
        w.ctl.add(Rule::always(Call::IndexUpsert, Fault::Reject));
        let err = w.faulty().upsert(three_new()).await.expect_err("rejected");
        assert_eq!(err.outcome(), Outcome::NotApplied);
        // The overlapped commit ran alongside and was abandoned: it is timed
        // too. The compensation is not a phase.
        assert_moved(
            m.take(),
            Moved::expect(
                &[
                    ("tandem_rollbacks_total{op=upsert}", 1),
                    ("tandem_compensations_total", 1),
                ],
                &UPSERT_PHASES_WITHOUT_CLEANUP,
            ),
        );
        let report = w.clean().verify(None).await.expect("verify");
        assert_eq!(report.live_intents, 0, "compensated and resolved");
    });
}

#[test]
fn a_rejected_index_write_without_overlap_times_no_commit() {
    metered(async |w, m| {
        // Without overlap the commit never starts after a failed index write.
        let coordinator = without_overlap(w);
        w.ctl.add(Rule::always(Call::IndexUpsert, Fault::Reject));
        let err = coordinator.upsert(three_new()).await.expect_err("rejected");
        assert_eq!(err.outcome(), Outcome::NotApplied);
        assert_moved(
            m.take(),
            Moved::expect(
                &[
                    ("tandem_rollbacks_total{op=upsert}", 1),
                    ("tandem_compensations_total", 1),
                ],
                &[("upsert", "prepare", 1), ("upsert", "index_write", 1)],
            ),
        );
    });
}

#[test]
fn a_rejected_commit_counts_one_rollback_and_one_compensation() {
    metered(async |w, m| {
        w.ctl.add(Rule::always(Call::CommitUpsert, Fault::Reject));
        let err = w.faulty().upsert(three_new()).await.expect_err("rejected");
        assert_eq!(err.outcome(), Outcome::NotApplied);
        assert_moved(
            m.take(),
            Moved::expect(
                &[
                    ("tandem_rollbacks_total{op=upsert}", 1),
                    ("tandem_compensations_total", 1),
                ],
                &UPSERT_PHASES_WITHOUT_CLEANUP,
            ),
        );
    });
}

#[test]
fn a_rollback_whose_compensation_fails_counts_the_rollback_but_no_compensation() {
    metered(async |w, m| {
        w.ctl.add(Rule::always(Call::CommitUpsert, Fault::Reject));
        w.ctl.add(Rule::always(Call::IndexDelete, Fault::Reject));
        let err = w.faulty().upsert(three_new()).await.expect_err("rejected");
        assert_eq!(err.outcome(), Outcome::NotApplied);
        assert_moved(
            m.take(),
            Moved::expect(
                &[("tandem_rollbacks_total{op=upsert}", 1)],
                &UPSERT_PHASES_WITHOUT_CLEANUP,
            ),
        );
        // Left to recovery: the intent and its three points are still there.
        w.ctl.clear();
        let report = w.clean().verify(None).await.expect("verify");
        assert_eq!((report.live_intents, report.intent_points), (1, 3));
    });
}

#[test]
fn an_index_write_whose_outcome_stays_unknown_is_compensated_without_a_late_write_guard() {
    metered(async |w, m| {
        // Every attempt may still land: three attempts (two retries), then
        // the write fails; it is compensated, its intent kept for recovery.
        w.ctl.add(Rule::always(Call::IndexUpsert, Fault::LandLater));
        let err = w
            .faulty()
            .upsert(batch(&[0x101], 0))
            .await
            .expect_err("failed");
        assert_eq!(err.outcome(), Outcome::NotApplied);
        assert_moved(
            m.take(),
            Moved::expect(
                &[
                    ("tandem_retries_total{call=index.upsert}", 2),
                    ("tandem_rollbacks_total{op=upsert}", 1),
                    ("tandem_compensations_total", 1),
                ],
                &UPSERT_PHASES_WITHOUT_CLEANUP,
            ),
        );
    });
}

#[test]
fn a_rejected_delete_commit_counts_one_delete_rollback() {
    metered(async |w, m| {
        w.ctl.add(Rule::always(Call::CommitDelete, Fault::Reject));
        let err = w
            .faulty()
            .delete(DeleteSelector::Scope(Scope::new("b")))
            .await
            .expect_err("rejected");
        assert_eq!(err.outcome(), Outcome::NotApplied);
        assert_moved(
            m.take(),
            Moved::expect(
                &[("tandem_rollbacks_total{op=delete}", 1)],
                &[("delete", "prepare", 1), ("delete", "commit", 1)],
            ),
        );
    });
}

#[test]
fn an_upsert_fenced_by_recovery_counts_one_rollback_and_the_recovered_intent() {
    metered(async |w, m| {
        // The commit is held up; meanwhile the lease ends and recovery claims
        // the intent, deletes its point and resolves it. The commit is then
        // fenced: a rollback, with nothing left to compensate.
        w.ctl.add(Rule::once(
            Call::CommitUpsert,
            0,
            Fault::Delay(Duration::from_secs(5)),
        ));
        let writer = w.faulty();
        let (written, recovered) = tokio::join!(writer.upsert(batch(&[0x101], 0)), async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            w.after_leases();
            w.clean().recover().await.expect("recover")
        });
        assert!(
            matches!(written, Err(CoordinatorError::Fenced(_))),
            "{written:?}"
        );
        assert_eq!((recovered.resolved, recovered.points_deleted), (1, 1));
        assert_moved(
            m.take(),
            Moved::expect(
                &[
                    ("tandem_rollbacks_total{op=upsert}", 1),
                    ("tandem_recovered_intents_total", 1),
                ],
                &UPSERT_PHASES_WITHOUT_CLEANUP,
            ),
        );
    });
}

#[test]
fn a_delete_fenced_by_recovery_counts_one_delete_rollback_and_the_recovered_intent() {
    metered(async |w, m| {
        w.ctl.add(Rule::once(
            Call::CommitDelete,
            0,
            Fault::Delay(Duration::from_secs(5)),
        ));
        let deleter = w.faulty();
        let (deleted, recovered) =
            tokio::join!(deleter.delete(DeleteSelector::Ids(vec![rid(1)])), async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                w.after_leases();
                w.clean().recover().await.expect("recover")
            });
        assert!(
            matches!(deleted, Err(CoordinatorError::Fenced(_))),
            "{deleted:?}"
        );
        assert_eq!(recovered.resolved, 1);
        assert_moved(
            m.take(),
            Moved::expect(
                &[
                    ("tandem_rollbacks_total{op=delete}", 1),
                    ("tandem_recovered_intents_total", 1),
                ],
                &[("delete", "prepare", 1), ("delete", "commit", 1)],
            ),
        );
    });
}

#[test]
fn a_write_failing_at_prepare_counts_no_commit_and_no_rollback() {
    metered(async |w, m| {
        // Nothing was written, so there is nothing to roll back.
        w.ctl.add(Rule::always(Call::Prepare, Fault::Reject));
        let err = w.faulty().upsert(three_new()).await.expect_err("rejected");
        assert_eq!(err.outcome(), Outcome::NotApplied);
        assert_moved(m.take(), Moved::expect(&[], &[("upsert", "prepare", 1)]));
    });
}

// ---------------------------------------------------------------------------
// Ambiguous commits.
// ---------------------------------------------------------------------------

#[test]
fn an_ambiguous_commit_settled_as_committed_counts_the_settlement_and_the_commit() {
    metered(async |w, m| {
        // The commit applies; its reply is lost.
        w.ctl
            .add(Rule::once(Call::CommitUpsert, 0, Fault::FailAfter));
        let report = w.faulty().upsert(three_new()).await.expect("settled");
        assert_eq!(report.inserted, 3);
        assert_moved(
            m.take(),
            Moved::expect(
                &[
                    ("tandem_ambiguous_commits_total{settled=committed}", 1),
                    ("tandem_commits_total{op=upsert}", 1),
                ],
                &UPSERT_PHASES,
            ),
        );
    });
}

#[test]
fn an_ambiguous_delete_commit_settled_as_committed_counts_the_settlement_and_the_commit() {
    metered(async |w, m| {
        w.ctl
            .add(Rule::once(Call::CommitDelete, 0, Fault::FailAfter));
        let report = w
            .faulty()
            .delete(DeleteSelector::Scope(Scope::new("b")))
            .await
            .expect("settled");
        assert_eq!(report.deleted, 2);
        assert_moved(
            m.take(),
            Moved::expect(
                &[
                    ("tandem_ambiguous_commits_total{settled=committed}", 1),
                    ("tandem_commits_total{op=delete}", 1),
                ],
                &DELETE_PHASES,
            ),
        );
    });
}

#[test]
fn an_ambiguous_commit_settled_as_not_committed_counts_the_settlement_a_retry_and_the_commit() {
    metered(async |w, m| {
        // The commit request is lost on its way: settlement fences it, and the
        // commit is tried again (a retry) under the fence token.
        w.ctl
            .add(Rule::once(Call::CommitUpsert, 0, Fault::LandLater));
        let report = w.faulty().upsert(three_new()).await.expect("retried");
        assert_eq!(report.inserted, 3);
        assert_moved(
            m.take(),
            Moved::expect(
                &[
                    ("tandem_ambiguous_commits_total{settled=not_committed}", 1),
                    ("tandem_retries_total{call=metadata.commit}", 1),
                    ("tandem_commits_total{op=upsert}", 1),
                ],
                &UPSERT_PHASES,
            ),
        );
    });
}

#[test]
fn ambiguous_commits_settled_as_not_committed_until_attempts_run_out_end_in_one_rollback() {
    metered(async |w, m| {
        // Every commit request is lost: three attempts, each settled as not
        // committed; the first two are followed by a retry, the last by the
        // rollback of the write.
        w.ctl
            .add(Rule::always(Call::CommitUpsert, Fault::LandLater));
        let err = w
            .faulty()
            .upsert(three_new())
            .await
            .expect_err("rolled back");
        assert_eq!(
            err.outcome(),
            Outcome::NotApplied,
            "settled: nothing applied"
        );
        assert_moved(
            m.take(),
            Moved::expect(
                &[
                    ("tandem_ambiguous_commits_total{settled=not_committed}", 3),
                    ("tandem_retries_total{call=metadata.commit}", 2),
                    ("tandem_rollbacks_total{op=upsert}", 1),
                    ("tandem_compensations_total", 1),
                ],
                &UPSERT_PHASES_WITHOUT_CLEANUP,
            ),
        );
        let report = w.clean().verify(None).await.expect("verify");
        assert!(report.is_consistent(), "{report:?}");
    });
}

#[test]
fn an_ambiguous_commit_settled_after_recovery_took_its_intent_counts_the_settlement_and_a_rollback()
{
    metered(async |w, m| {
        // The commit request is lost, and the settlement is held up while the
        // lease ends and recovery claims the intent (its garbage cannot be
        // deleted, so it keeps it). The settlement finds the commit did not
        // happen and recovery owns the intent: the call is fenced.
        w.ctl
            .add(Rule::once(Call::CommitUpsert, 0, Fault::LandLater));
        w.ctl.add(Rule::once(
            Call::Settle,
            0,
            Fault::Delay(Duration::from_secs(5)),
        ));
        w.ctl.add(Rule::always(Call::IndexDelete, Fault::Reject));
        let writer = w.faulty();
        let recoverer = w.faulty();
        let (written, recovered) = tokio::join!(writer.upsert(three_new()), async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            w.after_leases();
            recoverer.recover().await.expect("recover")
        });
        assert!(
            matches!(written, Err(CoordinatorError::Fenced(_))),
            "{written:?}"
        );
        assert_eq!((recovered.claimed, recovered.failed), (1, 1));
        assert_moved(
            m.take(),
            Moved::expect(
                &[
                    ("tandem_ambiguous_commits_total{settled=not_committed}", 1),
                    ("tandem_rollbacks_total{op=upsert}", 1),
                ],
                &UPSERT_PHASES_WITHOUT_CLEANUP,
            ),
        );
    });
}

#[test]
fn an_ambiguous_commit_that_cannot_be_settled_counts_an_unknown_settlement_and_nothing_else() {
    metered(async |w, m| {
        w.ctl
            .add(Rule::once(Call::CommitUpsert, 0, Fault::FailAfter));
        w.ctl.add(Rule::always(Call::Settle, Fault::Reject));
        let err = w.faulty().upsert(three_new()).await.expect_err("unknown");
        assert_eq!(err.outcome(), Outcome::Unknown);
        // Neither a commit nor a rollback: nobody knows which it was.
        assert_moved(
            m.take(),
            Moved::expect(
                &[("tandem_ambiguous_commits_total{settled=unknown}", 1)],
                &UPSERT_PHASES_WITHOUT_CLEANUP,
            ),
        );
    });
}

// ---------------------------------------------------------------------------
// Deferred cleanup, recovery, retries, late-write guards.
// ---------------------------------------------------------------------------

#[test]
fn an_update_whose_old_points_cannot_be_deleted_counts_each_deferred_point() {
    metered(async |w, m| {
        w.ctl.add(Rule::always(Call::IndexDelete, Fault::Reject));
        let report = w.faulty().upsert(batch(&[1, 2], 1)).await.expect("update");
        assert_eq!(report.deferred_cleanup, 2);
        assert_moved(
            m.take(),
            Moved::expect(
                &[
                    ("tandem_commits_total{op=upsert}", 1),
                    ("tandem_deferred_cleanup_points_total", 2),
                ],
                &UPSERT_PHASES,
            ),
        );
    });
}

#[test]
fn a_delete_whose_points_cannot_be_deleted_counts_each_deferred_point() {
    metered(async |w, m| {
        w.ctl.add(Rule::always(Call::IndexDelete, Fault::Reject));
        let report = w
            .faulty()
            .delete(DeleteSelector::Ids(vec![rid(1), rid(2), rid(3)]))
            .await
            .expect("delete");
        assert_eq!((report.deleted, report.deferred_cleanup), (3, 3));
        assert_moved(
            m.take(),
            Moved::expect(
                &[
                    ("tandem_commits_total{op=delete}", 1),
                    ("tandem_deferred_cleanup_points_total", 3),
                ],
                &DELETE_PHASES,
            ),
        );
    });
}

/// Leaves `n` upsert intents of two points each to recovery: their commits are
/// rejected and so is the compensation's index delete.
async fn leave_to_recovery(w: &MemWorld, n: u128) {
    w.ctl.add(Rule::always(Call::CommitUpsert, Fault::Reject));
    w.ctl.add(Rule::always(Call::IndexDelete, Fault::Reject));
    for i in 0..n {
        let records = batch(&[0x200 + 2 * i, 0x201 + 2 * i], 0);
        w.faulty()
            .upsert(records)
            .await
            .expect_err("left to recovery");
    }
    w.ctl.clear();
    w.after_leases();
}

#[test]
fn recovery_of_three_expired_intents_counts_three_recovered_intents() {
    metered(async |w, m| {
        leave_to_recovery(w, 3).await;
        m.take();
        // Two rounds at the harness's recovery batch of 2.
        let report = w.faulty().recover().await.expect("recover");
        assert_eq!(
            report,
            RecoveryReport {
                claimed: 3,
                resolved: 3,
                points_deleted: 6,
                failed: 0,
                ..RecoveryReport::default()
            }
        );
        assert_moved(
            m.take(),
            Moved::expect(&[("tandem_recovered_intents_total", 3)], &[]),
        );
        assert!(
            w.clean()
                .verify(None)
                .await
                .expect("verify")
                .is_consistent()
        );
    });
}

#[test]
fn recovery_counts_only_the_intents_it_resolved() {
    metered(async |w, m| {
        leave_to_recovery(w, 3).await;
        m.take();
        // The first garbage chunk (the first intent's two points) cannot be
        // deleted: that intent stays for a later run.
        let next = w.ctl.invocations(Call::IndexDelete);
        w.ctl
            .add(Rule::once(Call::IndexDelete, next, Fault::Reject));
        let report = w.faulty().recover().await.expect("recover");
        assert_eq!((report.claimed, report.resolved, report.failed), (3, 2, 1));
        assert_moved(
            m.take(),
            Moved::expect(&[("tandem_recovered_intents_total", 2)], &[]),
        );
    });
}

#[test]
fn recovery_with_nothing_expired_moves_nothing() {
    metered(async |w, m| {
        let report = w.faulty().recover().await.expect("recover");
        assert_eq!(report, RecoveryReport::default());
        assert_moved(m.take(), Moved::nothing());
    });
}

#[test]
fn each_retry_of_a_transient_error_is_counted_once_under_its_call() {
    metered(async |w, m| {
        // One record: one index chunk, so the rules hit its attempts in order.
        w.ctl.add(Rule::first(Call::Prepare, 1, Fault::FailBefore));
        w.ctl
            .add(Rule::first(Call::IndexUpsert, 2, Fault::FailBefore));
        w.ctl
            .add(Rule::first(Call::CommitUpsert, 1, Fault::FailBefore));
        w.ctl.add(Rule::first(Call::Resolve, 1, Fault::FailBefore));
        let report = w.faulty().upsert(batch(&[0x101], 0)).await.expect("upsert");
        assert_eq!(report.inserted, 1);
        assert_moved(
            m.take(),
            Moved::expect(
                &[
                    ("tandem_retries_total{call=metadata.prepare}", 1),
                    ("tandem_retries_total{call=index.upsert}", 2),
                    ("tandem_retries_total{call=metadata.commit}", 1),
                    ("tandem_retries_total{call=metadata.resolve}", 1),
                    ("tandem_commits_total{op=upsert}", 1),
                ],
                &UPSERT_PHASES,
            ),
        );
    });
}

#[test]
fn retries_that_run_out_count_every_retry_then_the_rollback() {
    metered(async |w, m| {
        // Three attempts at max_attempts = 3: two retries, then a rollback.
        w.ctl
            .add(Rule::always(Call::IndexUpsert, Fault::FailBefore));
        let err = w
            .faulty()
            .upsert(batch(&[0x101], 0))
            .await
            .expect_err("failed");
        assert!(err.is_retryable());
        assert_moved(
            m.take(),
            Moved::expect(
                &[
                    ("tandem_retries_total{call=index.upsert}", 2),
                    ("tandem_rollbacks_total{op=upsert}", 1),
                    ("tandem_compensations_total", 1),
                ],
                &UPSERT_PHASES_WITHOUT_CLEANUP,
            ),
        );
    });
}

#[test]
fn a_search_retried_after_a_transient_index_error_counts_one_retry_and_times_one_round() {
    metered(async |w, m| {
        w.ctl
            .add(Rule::once(Call::IndexSearch, 0, Fault::FailBefore));
        w.faulty()
            .search(&SearchQuery::new(vector_for(1, 0), 2))
            .await
            .expect("search");
        assert_moved(
            m.take(),
            Moved::expect(
                &[("tandem_retries_total{call=index.search}", 1)],
                &[("search", "index", 1), ("search", "guard", 1)],
            ),
        );
    });
}

#[test]
fn an_index_write_whose_first_attempt_may_land_later_counts_one_late_write_guard() {
    metered(async |w, m| {
        // The first attempt fails with an unknown outcome (it lands later), the
        // retry succeeds: the points are named in a guard intent (a second
        // prepare) before the commit.
        w.ctl
            .add(Rule::once(Call::IndexUpsert, 0, Fault::LandLater));
        let report = w.faulty().upsert(batch(&[0x101], 0)).await.expect("upsert");
        assert_eq!(report.inserted, 1);
        assert_moved(
            m.take(),
            Moved::expect(
                &[
                    ("tandem_retries_total{call=index.upsert}", 1),
                    ("tandem_late_write_guards_total", 1),
                    ("tandem_commits_total{op=upsert}", 1),
                ],
                &[
                    ("upsert", "prepare", 2),
                    ("upsert", "index_write", 1),
                    ("upsert", "commit", 1),
                    ("upsert", "cleanup", 1),
                ],
            ),
        );
        // The guard is left for recovery, after its lease.
        let report = w.clean().verify(None).await.expect("verify");
        assert_eq!(report.live_intents, 1);
    });
}

// ---------------------------------------------------------------------------
// Calls that must move nothing, and the gauge.
// ---------------------------------------------------------------------------

#[test]
fn bad_input_moves_no_metric() {
    metered(async |w, m| {
        let c = w.faulty();
        c.upsert(Vec::new()).await.expect_err("empty batch");
        c.upsert(vec![NewRecord::new("a", "short", vec![1.0])])
            .await
            .expect_err("wrong dimension");
        c.search(&SearchQuery::new(vector_for(1, 0), 0))
            .await
            .expect_err("k = 0");
        assert!(w.ctl.log().is_empty(), "no store was called");
        assert_moved(m.take(), Moved::nothing());
    });
}

#[test]
fn a_replayed_keyed_write_moves_no_metric() {
    metered(async |w, m| {
        let key = WriteOptions::idempotent("k-1");
        let first = w
            .faulty()
            .upsert_with(three_new(), &key)
            .await
            .expect("first");
        m.take();
        let again = w
            .faulty()
            .upsert_with(three_new(), &key)
            .await
            .expect("replay");
        assert!(again.replayed);
        assert_eq!(again.ids, first.ids);
        assert_moved(m.take(), Moved::nothing());
    });
}

#[test]
fn stats_and_verify_set_the_pending_intents_gauge_to_every_live_intent() {
    metered(async |w, m| {
        // Two intents whose lease has ended and one still leased: the gauge
        // counts all three (not only recovery's backlog).
        leave_to_recovery(w, 2).await;
        w.ctl.add(Rule::always(Call::CommitUpsert, Fault::Reject));
        w.ctl.add(Rule::always(Call::IndexDelete, Fault::Reject));
        w.faulty()
            .upsert(batch(&[0x300], 0))
            .await
            .expect_err("left to recovery");
        w.ctl.clear();
        m.take();
        let stats = w.faulty().stats().await.expect("stats");
        assert_eq!((stats.live_intents, stats.expired_intents), (3, 2));
        assert_moved(
            m.take(),
            Moved::nothing().with_gauge("tandem_pending_intents", 3.0),
        );
        let report = w.faulty().verify(None).await.expect("verify");
        assert_eq!(report.live_intents, 3);
        assert_moved(
            m.take(),
            Moved::nothing().with_gauge("tandem_pending_intents", 3.0),
        );
    });
}

#[test]
fn stats_and_verify_count_a_live_sagas_held_intents_apart_from_the_recovery_backlog() {
    metered(async |w, m| {
        // A live saga whose step updated record 1 holds the superseded point
        // for its compensation, past its lease: not recovery's backlog.
        let c = w.faulty();
        let mut run = c
            .begin_saga("harness-dynamic", json!({}))
            .await
            .expect("begin");
        run.step("update", Transaction::new().upsert(batch(&[1], 1)))
            .await
            .expect("step");
        leave_to_recovery(w, 1).await;
        m.take();
        let stats = c.stats().await.expect("stats");
        assert_eq!(
            (
                stats.live_intents,
                stats.held_intents,
                stats.expired_intents
            ),
            (2, 1, 1),
            "the held intent is live but not expired, however old its lease"
        );
        let report = c.verify(None).await.expect("verify");
        assert_eq!((report.live_intents, report.held_intents), (2, 1));
        assert!(
            report.orphan_points.is_empty() && report.missing_points.is_empty(),
            "{report:?}"
        );
        assert!(!report.is_consistent(), "writes are pending");
        // The saga's end releases it (and cleans its garbage); recovery
        // resolves the other.
        run.finish().await.expect("finish");
        let stats = c.stats().await.expect("stats");
        assert_eq!(
            (
                stats.live_intents,
                stats.held_intents,
                stats.expired_intents
            ),
            (1, 0, 1)
        );
        let recovered = c.recover().await.expect("recover");
        assert_eq!(recovered.resolved, 1, "{recovered:?}");
        assert!(c.verify(None).await.expect("verify").is_consistent());
    });
}

// ---------------------------------------------------------------------------
// One list: the core's macros, this suite, docs/metrics.md, the exporter.
// ---------------------------------------------------------------------------

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable source dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The metric names the core's sources pass to `counter!`, `gauge!` and
/// `histogram!` (the name is always the macro's first, literal argument).
fn names_recorded_in_core() -> BTreeSet<String> {
    let mut files = Vec::new();
    rust_files(&workspace().join("core/src"), &mut files);
    let mut names = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("readable source");
        for macro_call in ["counter!(", "gauge!(", "histogram!("] {
            for (at, _) in text.match_indices(macro_call) {
                let rest = text[at + macro_call.len()..].trim_start();
                let name = rest
                    .strip_prefix('"')
                    .and_then(|r| r.split('"').next())
                    .unwrap_or_else(|| {
                        panic!("{}: a metric name that is not a literal", file.display())
                    });
                names.insert(name.to_owned());
            }
        }
    }
    names
}

#[test]
fn the_inventory_matches_the_core_sources_the_docs_and_the_exporter_descriptions() {
    let inventory: BTreeSet<String> = INVENTORY.iter().map(|(n, _, _)| n.to_string()).collect();
    assert_eq!(
        names_recorded_in_core(),
        inventory,
        "core/src vs this suite's INVENTORY"
    );

    let doc =
        std::fs::read_to_string(workspace().join("docs/metrics.md")).expect("docs/metrics.md");
    let telemetry =
        std::fs::read_to_string(workspace().join("app/src/telemetry.rs")).expect("telemetry.rs");
    for name in &inventory {
        assert!(
            doc.contains(&format!("| `{name}` |")),
            "docs/metrics.md has no table row for {name}"
        );
        assert!(
            telemetry.contains(&format!("\"{name}\"")),
            "app/src/telemetry.rs does not describe {name} to the Prometheus exporter"
        );
    }
}

// ---------------------------------------------------------------------------
// Transactions and sagas.
// ---------------------------------------------------------------------------

#[test]
fn a_transaction_counts_one_transaction_commit_and_times_each_phase_once() {
    metered(async |w, m| {
        let tx = Transaction::new()
            .delete(DeleteSelector::Ids(vec![rid(1)]))
            .upsert(three_new());
        let report = w
            .faulty()
            .transact(tx, &WriteOptions::default())
            .await
            .expect("transaction");
        assert_eq!((report.inserted, report.deleted), (3, 1));
        assert_moved(
            m.take(),
            Moved::expect(
                &[("tandem_commits_total{op=transaction}", 1)],
                &[
                    ("transaction", "prepare", 1),
                    ("transaction", "index_write", 1),
                    ("transaction", "commit", 1),
                    ("transaction", "cleanup", 1),
                ],
            ),
        );
    });
}

#[test]
fn a_saga_that_completes_counts_its_steps_and_one_done_saga() {
    metered(async |w, m| {
        let outcome = w
            .faulty()
            .run_saga("harness", json!({ "fail": false }))
            .await
            .expect("saga");
        assert_eq!(outcome.state, SagaState::Done);
        // Two held Tandem steps (no cleanup: the saga holds their garbage,
        // released and cleaned when it ends, which is not a recovery).
        assert_moved(
            m.take(),
            Moved::expect(
                &[
                    ("tandem_sagas_started_total", 1),
                    ("tandem_commits_total{op=transaction}", 2),
                    ("tandem_saga_steps_total{kind=tandem,outcome=done}", 2),
                    ("tandem_saga_steps_total{kind=action,outcome=done}", 1),
                    ("tandem_sagas_total{outcome=done}", 1),
                ],
                &[
                    ("transaction", "prepare", 2),
                    ("transaction", "index_write", 2),
                    ("transaction", "commit", 2),
                ],
            ),
        );
    });
}

#[test]
fn a_compensated_saga_counts_its_failed_step_its_compensations_and_one_compensated_saga() {
    metered(async |w, m| {
        let outcome = w
            .faulty()
            .run_saga("harness", json!({ "fail": true }))
            .await
            .expect("saga");
        assert_eq!(outcome.state, SagaState::Compensated);
        assert_moved(
            m.take(),
            Moved::expect(
                &[
                    ("tandem_sagas_started_total", 1),
                    ("tandem_commits_total{op=transaction}", 2),
                    ("tandem_saga_steps_total{kind=tandem,outcome=done}", 2),
                    ("tandem_saga_steps_total{kind=action,outcome=failed}", 1),
                    (
                        "tandem_saga_steps_total{kind=action,outcome=compensated}",
                        1,
                    ),
                    ("tandem_commits_total{op=restore}", 2),
                    (
                        "tandem_saga_steps_total{kind=tandem,outcome=compensated}",
                        2,
                    ),
                    ("tandem_sagas_total{outcome=compensated}", 1),
                ],
                &[
                    ("transaction", "prepare", 2),
                    ("transaction", "index_write", 2),
                    ("transaction", "commit", 2),
                    ("restore", "prepare", 2),
                    ("restore", "commit", 2),
                    ("restore", "cleanup", 2),
                ],
            ),
        );
    });
}

#[test]
fn an_embedding_retried_once_counts_one_embed_retry_and_nothing_else() {
    use tandem_core::testkit::embed::{FaultyEmbedder, TextVectorEmbedder};
    use tandem_core::{EmbedError, Embedder, RetryPolicy, RetryingEmbedder};
    metered(async |_, m| {
        let faulty = FaultyEmbedder::new(TextVectorEmbedder::new(DIM));
        faulty.fail_next(EmbedError::transient("the server is busy"));
        let embedder = RetryingEmbedder::new(
            faulty,
            RetryPolicy {
                max_attempts: 3,
                initial_backoff: Duration::from_millis(1),
                max_backoff: Duration::from_millis(5),
            },
        );
        let vectors = embedder
            .embed(&["red shoes".to_owned()])
            .await
            .expect("embedded on the second attempt");
        assert_eq!(vectors.len(), 1);
        assert_eq!(embedder.inner().calls(), 2);
        assert_moved(
            m.take(),
            Moved::expect(&[("tandem_embed_retries_total", 1)], &[]),
        );
    });
}
