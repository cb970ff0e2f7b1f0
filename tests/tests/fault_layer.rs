//! The fault layer's behaviour, through the wrappers, against the in-memory
//! backends: each fault does exactly what it says to the store behind it.

use std::sync::Arc;
use std::time::Duration;

use tandem_adapters::memory::{InMemoryMetadataRepo, InMemoryVectorIndex};
use tandem_core::testkit::faults::{
    Call, Fault, FaultController, FaultyMetadataRepo, FaultyVectorIndex, LogEntry, Rule,
    run_until_crash,
};
use tandem_core::{
    Distance, IndexError, IntentId, IntentKind, IntentState, MetadataError, MetadataRepo,
    NewIntent, Outcome, OwnerToken, Point, PointId, RecordId, RowWrite, Scope, VectorIndex,
};
use uuid::Uuid;

const DIM: usize = 3;
const LEASE_END_MS: i64 = 10_000_000_000_000;

/// Both in-memory stores, reachable directly (`meta`, `index`) and through the
/// fault wrappers (`fmeta`, `findex`) driven by `ctl`.
struct Stores {
    ctl: FaultController,
    meta: Arc<InMemoryMetadataRepo>,
    index: Arc<InMemoryVectorIndex>,
    fmeta: FaultyMetadataRepo<Arc<InMemoryMetadataRepo>>,
    findex: FaultyVectorIndex<Arc<InMemoryVectorIndex>>,
}

fn stores(seed: u64) -> Stores {
    let ctl = FaultController::new(seed);
    let meta = Arc::new(InMemoryMetadataRepo::new());
    let index = Arc::new(InMemoryVectorIndex::new(DIM, Distance::Cosine));
    Stores {
        fmeta: FaultyMetadataRepo::new(meta.clone(), ctl.clone()),
        findex: FaultyVectorIndex::new(index.clone(), ctl.clone()),
        ctl,
        meta,
        index,
    }
}

/// Ids derived from a counter, so that two runs produce identical logs.
struct Ids(u128);

impl Ids {
    fn next(&mut self) -> Uuid {
        self.0 += 1;
        Uuid::from_u128(self.0)
    }
    fn point(&mut self) -> PointId {
        PointId(self.next())
    }
    fn record(&mut self) -> RecordId {
        RecordId(self.next())
    }
}

fn intent(id: IntentId, owner: OwnerToken, points: &[PointId]) -> NewIntent {
    NewIntent {
        id,
        kind: IntentKind::Upsert,
        owner,
        lease_deadline_ms: LEASE_END_MS,
        point_ids: points.to_vec(),
        created_ms: 1_000,
        generation: 0,
    }
}

fn point(id: PointId, record: RecordId) -> Point {
    Point {
        id,
        record_id: record,
        scope: Scope::new("cat"),
        metadata: Default::default(),
        vector: vec![1.0, 0.5, 0.25],
        written_at_ms: 1_000,
    }
}

fn row(record: RecordId, point: PointId) -> RowWrite {
    RowWrite {
        id: record,
        scope: Scope::new("cat"),
        content: "text".into(),
        metadata: Default::default(),
        point_id: point,
        vector: vec![1.0, 0.5, 0.25],
    }
}

fn assert_injected_metadata(err: &MetadataError, retryable: bool, outcome: Outcome) {
    assert_eq!(err.is_retryable(), retryable, "{err}");
    assert_eq!(err.outcome(), outcome, "{err}");
    assert!(err.to_string().contains("injected fault"), "{err}");
}

fn assert_injected_index(err: &IndexError, retryable: bool, outcome: Outcome) {
    assert_eq!(err.is_retryable(), retryable, "{err}");
    assert_eq!(err.outcome(), outcome, "{err}");
    assert!(err.to_string().contains("injected fault"), "{err}");
}

#[tokio::test]
async fn fail_before_prepare_does_not_reach_the_store() {
    let s = stores(1);
    s.ctl.add(Rule::once(Call::Prepare, 0, Fault::FailBefore));
    let new = intent(IntentId::new_random(), OwnerToken::new_random(), &[]);
    let err = s.fmeta.prepare(&new).await.unwrap_err();
    assert!(matches!(
        err,
        MetadataError::Transient {
            outcome: Outcome::NotApplied,
            ..
        }
    ));
    assert_injected_metadata(&err, true, Outcome::NotApplied);
    assert!(s.meta.list_intents(10).await.unwrap().is_empty());
}

#[tokio::test]
async fn fail_before_index_upsert_does_not_reach_the_index() {
    let s = stores(1);
    let mut ids = Ids(0);
    s.ctl
        .add(Rule::once(Call::IndexUpsert, 0, Fault::FailBefore));
    let p = point(ids.point(), ids.record());
    let err = s.findex.upsert(std::slice::from_ref(&p)).await.unwrap_err();
    assert!(matches!(
        err,
        IndexError::Transient {
            outcome: Outcome::NotApplied,
            retry_after: None,
            ..
        }
    ));
    assert_injected_index(&err, true, Outcome::NotApplied);
    assert_eq!(s.index.count(None).await.unwrap(), 0);
    assert!(s.index.retrieve(&[p.id]).await.unwrap().is_empty());
}

#[tokio::test]
async fn fail_after_commit_applies_but_reports_unknown() {
    let s = stores(1);
    let mut ids = Ids(0);
    let (intent_id, owner) = (IntentId::new_random(), OwnerToken::new_random());
    let (record, pid) = (ids.record(), ids.point());
    s.ctl
        .add(Rule::once(Call::CommitUpsert, 0, Fault::FailAfter));
    s.fmeta
        .prepare(&intent(intent_id, owner, &[pid]))
        .await
        .unwrap();
    let err = s
        .fmeta
        .commit_upsert(intent_id, owner, &[row(record, pid)], None)
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        MetadataError::Transient {
            outcome: Outcome::Unknown,
            ..
        }
    ));
    assert_injected_metadata(&err, true, Outcome::Unknown);
    // The commit happened: the row is there and the intent is committed.
    let rows = s.meta.get(&[record]).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].point_id, rows[0].version), (pid, 1));
    let intents = s.meta.list_intents(10).await.unwrap();
    assert_eq!(intents.len(), 1);
    assert_eq!(intents[0].state, IntentState::Committed);
}

#[tokio::test]
async fn fail_after_index_upsert_leaves_the_points_visible() {
    let s = stores(1);
    let mut ids = Ids(0);
    s.ctl
        .add(Rule::once(Call::IndexUpsert, 0, Fault::FailAfter));
    let p = point(ids.point(), ids.record());
    let err = s.findex.upsert(std::slice::from_ref(&p)).await.unwrap_err();
    assert!(matches!(
        err,
        IndexError::Transient {
            outcome: Outcome::Unknown,
            retry_after: None,
            ..
        }
    ));
    assert_injected_index(&err, true, Outcome::Unknown);
    let found = s.index.retrieve(&[p.id]).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].record_id, p.record_id);
}

#[tokio::test]
async fn reject_is_permanent_and_does_not_reach_either_store() {
    let s = stores(1);
    let mut ids = Ids(0);
    s.ctl.add(Rule::once(Call::Prepare, 0, Fault::Reject));
    s.ctl.add(Rule::once(Call::IndexUpsert, 0, Fault::Reject));
    let err = s
        .fmeta
        .prepare(&intent(
            IntentId::new_random(),
            OwnerToken::new_random(),
            &[],
        ))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        MetadataError::Permanent {
            outcome: Outcome::NotApplied,
            ..
        }
    ));
    assert_injected_metadata(&err, false, Outcome::NotApplied);
    let err = s
        .findex
        .upsert(&[point(ids.point(), ids.record())])
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        IndexError::Permanent {
            outcome: Outcome::NotApplied,
            ..
        }
    ));
    assert_injected_index(&err, false, Outcome::NotApplied);
    assert!(s.meta.list_intents(10).await.unwrap().is_empty());
    assert_eq!(s.index.count(None).await.unwrap(), 0);
}

#[tokio::test]
async fn duplicate_index_upsert_is_harmless() {
    let s = stores(1);
    let mut ids = Ids(0);
    s.ctl
        .add(Rule::once(Call::IndexUpsert, 0, Fault::Duplicate));
    let points: Vec<Point> = (0..3).map(|_| point(ids.point(), ids.record())).collect();
    s.findex.upsert(&points).await.unwrap();
    assert_eq!(s.index.count(None).await.unwrap(), 3);
    // One call from the caller's point of view.
    assert_eq!(s.ctl.invocations(Call::IndexUpsert), 1);
    assert_eq!(s.ctl.log()[0].fault, Some(Fault::Duplicate));
}

#[tokio::test]
async fn duplicate_prepare_is_idempotent() {
    let s = stores(1);
    let mut ids = Ids(0);
    s.ctl.add(Rule::once(Call::Prepare, 0, Fault::Duplicate));
    let new = intent(
        IntentId::new_random(),
        OwnerToken::new_random(),
        &[ids.point()],
    );
    s.fmeta.prepare(&new).await.unwrap();
    let intents = s.meta.list_intents(10).await.unwrap();
    assert_eq!(intents.len(), 1);
    assert_eq!(intents[0].id, new.id);
    assert_eq!(intents[0].state, IntentState::Prepared);
    assert_eq!(intents[0].point_ids, new.point_ids);
}

#[tokio::test]
async fn duplicate_executes_twice_and_returns_the_second_result() {
    let s = stores(1);
    let (intent_id, owner) = (IntentId::new_random(), OwnerToken::new_random());
    s.meta
        .prepare(&intent(intent_id, owner, &[]))
        .await
        .unwrap();
    s.ctl.add(Rule::once(Call::Resolve, 0, Fault::Duplicate));
    // The first delivery removes the intent (true); the second finds nothing
    // (false), and that is what the caller sees.
    assert!(!s.fmeta.resolve(intent_id, owner).await.unwrap());
    assert!(s.meta.list_intents(10).await.unwrap().is_empty());
}

#[tokio::test]
async fn duplicate_commit_returns_the_recorded_result() {
    let s = stores(1);
    let mut ids = Ids(0);
    let (intent_id, owner) = (IntentId::new_random(), OwnerToken::new_random());
    let (record, pid) = (ids.record(), ids.point());
    s.meta
        .prepare(&intent(intent_id, owner, &[pid]))
        .await
        .unwrap();
    s.ctl
        .add(Rule::once(Call::CommitUpsert, 0, Fault::Duplicate));
    let commit = s
        .fmeta
        .commit_upsert(intent_id, owner, &[row(record, pid)], None)
        .await
        .unwrap();
    assert_eq!(commit.summary.inserted, 1);
    let rows = s.meta.get(&[record]).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].version, 1, "the duplicate commit applied twice");
}

#[tokio::test]
async fn nth_and_times_hit_exactly_those_invocations() {
    let s = stores(1);
    let mut ids = Ids(0);
    s.ctl.add(Rule {
        call: Call::IndexUpsert,
        nth: 1,
        times: 2,
        fault: Fault::FailBefore,
    });
    let points: Vec<Point> = (0..5).map(|_| point(ids.point(), ids.record())).collect();
    let mut outcomes = Vec::new();
    for p in &points {
        outcomes.push(s.findex.upsert(std::slice::from_ref(p)).await.is_ok());
    }
    assert_eq!(outcomes, vec![true, false, false, true, true]);
    let all: Vec<PointId> = points.iter().map(|p| p.id).collect();
    let mut found: Vec<PointId> = s
        .index
        .retrieve(&all)
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.id)
        .collect();
    found.sort();
    let mut expected = vec![points[0].id, points[3].id, points[4].id];
    expected.sort();
    assert_eq!(found, expected);
    // Other calls are not counted against the rule.
    assert_eq!(s.ctl.invocations(Call::IndexUpsert), 5);
    assert_eq!(s.ctl.invocations(Call::IndexDelete), 0);
}

#[tokio::test]
async fn fail_the_first_n_attempts_then_succeed() {
    let s = stores(1);
    s.ctl.add(Rule::first(Call::Prepare, 3, Fault::FailBefore));
    let new = intent(IntentId::new_random(), OwnerToken::new_random(), &[]);
    let mut attempts = 0;
    loop {
        attempts += 1;
        match s.fmeta.prepare(&new).await {
            Ok(()) => break,
            Err(e) => assert!(e.is_retryable() && attempts <= 3, "{e}"),
        }
    }
    assert_eq!(attempts, 4);
    assert_eq!(s.meta.list_intents(10).await.unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn hang_never_completes_and_does_not_reach_the_store() {
    let s = stores(1);
    s.ctl.add(Rule::once(Call::Prepare, 0, Fault::Hang));
    let new = intent(IntentId::new_random(), OwnerToken::new_random(), &[]);
    let out = tokio::time::timeout(Duration::from_secs(24 * 3600), s.fmeta.prepare(&new)).await;
    assert!(out.is_err(), "a hung call completed");
    assert!(s.meta.list_intents(10).await.unwrap().is_empty());
    let log = s.ctl.log();
    assert_eq!(log.len(), 1);
    assert!(!log[0].returned());
    // The next call is not hit.
    s.fmeta.prepare(&new).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn hang_after_applies_then_never_completes() {
    let s = stores(1);
    let mut ids = Ids(0);
    s.ctl
        .add(Rule::once(Call::IndexUpsert, 0, Fault::HangAfter));
    let p = point(ids.point(), ids.record());
    let out = tokio::time::timeout(
        Duration::from_secs(3600),
        s.findex.upsert(std::slice::from_ref(&p)),
    )
    .await;
    assert!(out.is_err(), "a hung call completed");
    assert_eq!(s.index.retrieve(&[p.id]).await.unwrap().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn delay_applies_after_the_delay() {
    let s = stores(1);
    let mut ids = Ids(0);
    s.ctl.add(Rule::first(
        Call::IndexUpsert,
        2,
        Fault::Delay(Duration::from_secs(30)),
    ));
    let early = point(ids.point(), ids.record());
    let cut_short = tokio::time::timeout(
        Duration::from_secs(29),
        s.findex.upsert(std::slice::from_ref(&early)),
    )
    .await;
    assert!(cut_short.is_err());
    assert_eq!(s.index.count(None).await.unwrap(), 0);
    let late = point(ids.point(), ids.record());
    let started = tokio::time::Instant::now();
    s.findex.upsert(std::slice::from_ref(&late)).await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(30));
    assert_eq!(s.index.retrieve(&[late.id]).await.unwrap().len(), 1);
}

#[tokio::test]
async fn crash_after_commit_drops_the_operation_and_keeps_the_commit() {
    let s = stores(1);
    let mut ids = Ids(0);
    let (intent_id, owner) = (IntentId::new_random(), OwnerToken::new_random());
    let (record, pid) = (ids.record(), ids.point());
    s.ctl
        .add(Rule::once(Call::CommitUpsert, 0, Fault::CrashAfter));
    let out = run_until_crash(&s.ctl, async {
        s.fmeta
            .prepare(&intent(intent_id, owner, &[pid]))
            .await
            .unwrap();
        s.findex.upsert(&[point(pid, record)]).await.unwrap();
        s.fmeta
            .commit_upsert(intent_id, owner, &[row(record, pid)], None)
            .await
            .unwrap();
        s.fmeta.resolve(intent_id, owner).await.unwrap()
    })
    .await;
    assert_eq!(out, None);
    assert!(s.ctl.crashed());
    // What the crashed process applied is in the stores; what came after is not.
    assert_eq!(s.meta.get(&[record]).await.unwrap().len(), 1);
    assert_eq!(s.index.retrieve(&[pid]).await.unwrap().len(), 1);
    let intents = s.meta.list_intents(10).await.unwrap();
    assert_eq!(intents.len(), 1, "resolve ran after the crash");
    assert_eq!(intents[0].state, IntentState::Committed);
    assert_eq!(
        s.ctl.calls(),
        vec![Call::Prepare, Call::IndexUpsert, Call::CommitUpsert]
    );
    let last = s.ctl.log().pop().unwrap();
    assert_eq!(last.fault, Some(Fault::CrashAfter));
    assert!(!last.returned());
    // The restart: the same stores, reached through the same wrappers again.
    s.ctl.clear();
    assert!(!s.ctl.crashed());
    let resolved = run_until_crash(&s.ctl, s.fmeta.resolve(intent_id, owner)).await;
    assert!(matches!(resolved, Some(Ok(true))));
}

#[tokio::test]
async fn crash_before_index_upsert_leaves_only_the_intent() {
    let s = stores(1);
    let mut ids = Ids(0);
    let (intent_id, owner) = (IntentId::new_random(), OwnerToken::new_random());
    let (record, pid) = (ids.record(), ids.point());
    s.ctl
        .add(Rule::once(Call::IndexUpsert, 0, Fault::CrashBefore));
    let waiter = tokio::spawn({
        let ctl = s.ctl.clone();
        async move { ctl.wait_crash().await }
    });
    let out = run_until_crash(&s.ctl, async {
        s.fmeta
            .prepare(&intent(intent_id, owner, &[pid]))
            .await
            .unwrap();
        s.findex.upsert(&[point(pid, record)]).await.unwrap();
        "finished"
    })
    .await;
    assert_eq!(out, None);
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("wait_crash did not resolve")
        .unwrap();
    assert_eq!(s.index.count(None).await.unwrap(), 0);
    assert_eq!(s.meta.list_intents(10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn log_records_every_call_in_order_with_its_result() {
    let s = stores(1);
    let mut ids = Ids(0);
    let (intent_id, owner) = (IntentId::new_random(), OwnerToken::new_random());
    let (record, pid) = (ids.record(), ids.point());
    s.ctl
        .add(Rule::once(Call::IndexUpsert, 0, Fault::FailBefore));
    s.fmeta
        .prepare(&intent(intent_id, owner, &[pid]))
        .await
        .unwrap();
    assert!(s.findex.upsert(&[point(pid, record)]).await.is_err());
    s.findex.upsert(&[point(pid, record)]).await.unwrap();
    // A real (not injected) error: the wrong owner is fenced.
    let fenced = s
        .fmeta
        .commit_upsert(
            intent_id,
            OwnerToken::new_random(),
            &[row(record, pid)],
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(fenced, MetadataError::Fenced { .. }));
    s.fmeta
        .commit_upsert(intent_id, owner, &[row(record, pid)], None)
        .await
        .unwrap();
    assert_eq!(s.findex.count(None).await.unwrap(), 1);

    let log = s.ctl.log();
    let expected = [
        (Call::Prepare, 0, None, true),
        (Call::IndexUpsert, 0, Some(Fault::FailBefore), false),
        (Call::IndexUpsert, 1, None, true),
        (Call::CommitUpsert, 0, None, false),
        (Call::CommitUpsert, 1, None, true),
        (Call::IndexCount, 0, None, true),
    ];
    assert_eq!(log.len(), expected.len());
    for (i, (entry, (call, occurrence, fault, ok))) in log.iter().zip(expected.clone()).enumerate()
    {
        assert_eq!(entry.seq, i);
        assert_eq!(
            (entry.call, entry.occurrence, entry.fault.clone(), entry.ok),
            (call, occurrence, fault, ok),
            "entry {i}"
        );
        assert_eq!(entry.error.is_none(), ok, "entry {i}");
    }
    assert!(log[1].error.as_deref().unwrap().contains("injected fault"));
    let real = log[3].error.as_deref().unwrap();
    assert!(!real.contains("injected fault"), "{real}");
    assert_eq!(real, fenced.to_string());
    assert_eq!(
        s.ctl.calls(),
        expected.iter().map(|e| e.0).collect::<Vec<_>>()
    );
}

/// A fixed history of calls against fresh stores under seeded random faults.
async fn random_history(seed: u64) -> Vec<LogEntry> {
    let s = stores(seed);
    s.ctl.set_random(
        0.4,
        vec![
            Fault::FailBefore,
            Fault::FailAfter,
            Fault::Reject,
            Fault::Duplicate,
        ],
        None,
    );
    let mut ids = Ids(0);
    for _ in 0..25 {
        let intent_id = IntentId(ids.next());
        let owner = OwnerToken(ids.next());
        let (record, pid) = (ids.record(), ids.point());
        let _ = s.fmeta.prepare(&intent(intent_id, owner, &[pid])).await;
        let _ = s.findex.upsert(&[point(pid, record)]).await;
        let _ = s
            .fmeta
            .commit_upsert(intent_id, owner, &[row(record, pid)], None)
            .await;
        let _ = s.fmeta.resolve(intent_id, owner).await;
        let _ = s.findex.count(None).await;
    }
    s.ctl.log()
}

#[tokio::test]
async fn seeded_random_mode_is_reproducible() {
    let first = random_history(2024).await;
    let again = random_history(2024).await;
    assert_eq!(first, again);
    let faulted = first.iter().filter(|e| e.fault.is_some()).count();
    assert!(
        (10..=90).contains(&faulted),
        "{faulted} of {} calls faulted at p = 0.4",
        first.len()
    );
    let other = random_history(2025).await;
    let faults = |log: &[LogEntry]| log.iter().map(|e| e.fault.clone()).collect::<Vec<_>>();
    assert_ne!(faults(&first), faults(&other));
}

#[tokio::test]
async fn random_mode_only_hits_the_chosen_calls() {
    let s = stores(3);
    s.ctl
        .set_random(1.0, vec![Fault::FailBefore], Some(vec![Call::IndexCount]));
    assert!(s.findex.count(None).await.is_err());
    s.fmeta
        .prepare(&intent(
            IntentId::new_random(),
            OwnerToken::new_random(),
            &[],
        ))
        .await
        .unwrap();
    assert_eq!(s.meta.list_intents(10).await.unwrap().len(), 1);
    // Deterministic rules take precedence over the random plan.
    s.ctl.add(Rule::once(Call::IndexCount, 1, Fault::Duplicate));
    assert_eq!(s.findex.count(None).await.unwrap(), 0);
    assert_eq!(s.ctl.log().last().unwrap().fault, Some(Fault::Duplicate));
}

#[tokio::test]
async fn disabled_controller_passes_everything_through() {
    let s = stores(1);
    let mut ids = Ids(0);
    for &call in Call::all() {
        s.ctl.add(Rule::always(call, Fault::FailBefore));
    }
    s.ctl.set_random(1.0, vec![Fault::Reject], None);
    s.ctl.disable();
    let (intent_id, owner) = (IntentId::new_random(), OwnerToken::new_random());
    let (record, pid) = (ids.record(), ids.point());
    s.fmeta
        .prepare(&intent(intent_id, owner, &[pid]))
        .await
        .unwrap();
    s.findex.upsert(&[point(pid, record)]).await.unwrap();
    s.fmeta
        .commit_upsert(intent_id, owner, &[row(record, pid)], None)
        .await
        .unwrap();
    assert!(s.fmeta.resolve(intent_id, owner).await.unwrap());
    assert_eq!(s.meta.get(&[record]).await.unwrap().len(), 1);
    assert_eq!(s.index.count(None).await.unwrap(), 1);
    let log = s.ctl.log();
    assert_eq!(log.len(), 4);
    assert!(log.iter().all(|e| e.ok && e.fault.is_none()));
    // Enabled again, the rules apply.
    s.ctl.enable();
    assert!(s.findex.count(None).await.is_err());
    // After `clear`, calls pass through too.
    s.ctl.clear();
    assert_eq!(s.findex.count(None).await.unwrap(), 1);
}

#[test]
fn wrappers_debug_shows_the_store_type_and_controller() {
    let s = stores(77);
    let text = format!("{:?} {:?}", s.fmeta, s.findex);
    assert!(text.contains("FaultyMetadataRepo"), "{text}");
    assert!(text.contains("FaultyVectorIndex"), "{text}");
    assert!(text.contains("InMemoryMetadataRepo"), "{text}");
    assert!(text.contains("seed: 77"), "{text}");
    assert_eq!(s.findex.dimension(), DIM);
    assert_eq!(s.findex.distance(), Distance::Cosine);
}
