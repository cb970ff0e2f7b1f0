//! Fault injection for both ports.
//!
//! [`FaultyMetadataRepo`] and [`FaultyVectorIndex`] wrap any backend and are
//! themselves a [`MetadataRepo`] / [`VectorIndex`]. Every call goes through a
//! shared [`FaultController`], which decides — from deterministic [`Rule`]s or
//! from seeded random injection — whether the call meets a [`Fault`]: fail
//! before it happens, fail after it happened (the reply is lost), hang, delay,
//! duplicate delivery, or crash the process at that await point. The controller
//! keeps a log of every call, the fault it met and its result.
//!
//! Rules live in the controller, one per test: there is no process-global
//! failpoint registry, so tests run in parallel without seeing each other's faults.
//!
//! ```
//! # use tandem_core::testkit::faults::*;
//! let ctl = FaultController::new(7);
//! // The first two index writes fail before reaching the index.
//! ctl.add(Rule::first(Call::IndexUpsert, 2, Fault::FailBefore));
//! // The commit happens, but its reply is lost.
//! ctl.add(Rule::once(Call::CommitUpsert, 0, Fault::FailAfter));
//! ```
//!
//! A crash ([`Fault::CrashBefore`], [`Fault::CrashAfter`]) raises the
//! controller's crash signal and never completes; [`run_until_crash`] drops the
//! whole operation future when the signal fires, which is what a dying process
//! does to its in-flight work. The store behind the wrapper keeps whatever was
//! applied, so a "restarted process" reaches it again (wrap an `Arc<T>` and keep
//! a clone), after [`FaultController::clear`].

use std::collections::HashMap;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::future::{Future, pending};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

use crate::error::{IndexError, MetadataError, Outcome};
use crate::model::{
    DeleteCommit, DeleteSelector, Distance, IdempotencyRecord, IndexFailure, Intent, IntentId,
    NewIntent, OwnerToken, Page, PendingFilter, PendingIndex, PendingStats, Point, PointId,
    PointInfo, RecordId, RowWrite, Scope, ScoredPoint, Settlement, StoredRecord, UpsertCommit,
};
use crate::model::{SagaId, TransactionCommit, TransactionCommitResult, UndoImage};
use crate::ports::{IndexCatalog, IndexGate, IndexQuery, MetadataRepo, RowRef, VectorIndex};
use crate::reindex::{
    ChangedRow, IndexState, Migration, MigrationSpec, StagedVector, SwitchOutcome,
};
use crate::saga::{SagaCounts, SagaRecord, SagaState};
use crate::transaction::ConnectionType;

/// Which port method a call is. One enum for both ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Call {
    /// [`MetadataRepo::prepare`].
    Prepare,
    /// [`MetadataRepo::commit_upsert`].
    CommitUpsert,
    /// [`MetadataRepo::commit_delete`].
    CommitDelete,
    /// [`MetadataRepo::settle`].
    Settle,
    /// [`MetadataRepo::settle_unprepared`].
    SettleUnprepared,
    /// [`MetadataRepo::resolve`].
    Resolve,
    /// [`MetadataRepo::resolve_many`].
    ResolveMany,
    /// [`MetadataRepo::claim_expired`].
    ClaimExpired,
    /// [`MetadataRepo::record_failure`].
    RecordFailure,
    /// [`MetadataRepo::referenced_points`].
    ReferencedPoints,
    /// [`MetadataRepo::rows_by_points`].
    RowsByPoints,
    /// [`MetadataRepo::get`].
    Get,
    /// [`MetadataRepo::lookup_idempotency`].
    LookupIdempotency,
    /// [`MetadataRepo::scan_refs`].
    ScanRefs,
    /// [`MetadataRepo::list_intents`].
    ListIntents,
    /// [`MetadataRepo::count_by_scope`].
    CountByScope,
    /// [`MetadataRepo::commit_transaction`].
    CommitTransaction,
    /// [`MetadataRepo::undo_images`].
    UndoImages,
    /// [`MetadataRepo::saga_save`].
    SagaSave,
    /// [`MetadataRepo::saga_claim`].
    SagaClaim,
    /// [`MetadataRepo::saga_take`].
    SagaTake,
    /// [`MetadataRepo::saga_get`].
    SagaGet,
    /// [`MetadataRepo::saga_list`].
    SagaList,
    /// [`MetadataRepo::saga_counts`].
    SagaCounts,
    /// [`MetadataRepo::claim_pending`].
    ClaimPending,
    /// [`MetadataRepo::record_index_failure`].
    RecordIndexFailure,
    /// [`MetadataRepo::list_pending`].
    ListPending,
    /// [`MetadataRepo::pending_for`].
    PendingFor,
    /// [`MetadataRepo::retry_dead`].
    RetryDead,
    /// [`MetadataRepo::drop_dead`].
    DropDead,
    /// [`MetadataRepo::pending_stats`].
    PendingStats,
    /// [`MetadataRepo::index_state`].
    IndexState,
    /// [`MetadataRepo::reindex_begin`].
    ReindexBegin,
    /// [`MetadataRepo::reindex_scan`].
    ReindexScan,
    /// [`MetadataRepo::reindex_garbage`].
    ReindexGarbage,
    /// [`MetadataRepo::reindex_progress`].
    ReindexProgress,
    /// [`MetadataRepo::reindex_freeze`].
    ReindexFreeze,
    /// [`MetadataRepo::reindex_switch`].
    ReindexSwitch,
    /// [`MetadataRepo::reindex_abort`].
    ReindexAbort,
    /// [`MetadataRepo::reindex_forget_retired`].
    ReindexForgetRetired,
    /// [`VectorIndex::upsert`].
    IndexUpsert,
    /// [`VectorIndex::delete`].
    IndexDelete,
    /// [`VectorIndex::retrieve`].
    IndexRetrieve,
    /// [`VectorIndex::search`].
    IndexSearch,
    /// [`VectorIndex::count`].
    IndexCount,
    /// [`VectorIndex::scroll`].
    IndexScroll,
}

impl Call {
    const ALL: [Call; 46] = [
        Call::Prepare,
        Call::CommitUpsert,
        Call::CommitDelete,
        Call::Settle,
        Call::SettleUnprepared,
        Call::Resolve,
        Call::ResolveMany,
        Call::ClaimExpired,
        Call::RecordFailure,
        Call::ReferencedPoints,
        Call::RowsByPoints,
        Call::Get,
        Call::LookupIdempotency,
        Call::ScanRefs,
        Call::ListIntents,
        Call::CountByScope,
        Call::CommitTransaction,
        Call::UndoImages,
        Call::SagaSave,
        Call::SagaClaim,
        Call::SagaTake,
        Call::SagaGet,
        Call::SagaList,
        Call::SagaCounts,
        Call::ClaimPending,
        Call::RecordIndexFailure,
        Call::ListPending,
        Call::PendingFor,
        Call::RetryDead,
        Call::DropDead,
        Call::PendingStats,
        Call::IndexState,
        Call::ReindexBegin,
        Call::ReindexScan,
        Call::ReindexGarbage,
        Call::ReindexProgress,
        Call::ReindexFreeze,
        Call::ReindexSwitch,
        Call::ReindexAbort,
        Call::ReindexForgetRetired,
        Call::IndexUpsert,
        Call::IndexDelete,
        Call::IndexRetrieve,
        Call::IndexSearch,
        Call::IndexCount,
        Call::IndexScroll,
    ];

    /// Whether the call may change a store (so "did it happen?" matters).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Call::Prepare
                | Call::CommitUpsert
                | Call::CommitDelete
                | Call::Settle
                | Call::SettleUnprepared
                | Call::Resolve
                | Call::ResolveMany
                | Call::ClaimExpired
                | Call::RecordFailure
                | Call::CommitTransaction
                | Call::SagaSave
                | Call::SagaClaim
                | Call::SagaTake
                | Call::ClaimPending
                | Call::RecordIndexFailure
                | Call::RetryDead
                | Call::DropDead
                | Call::ReindexBegin
                | Call::ReindexProgress
                | Call::ReindexFreeze
                | Call::ReindexSwitch
                | Call::ReindexAbort
                | Call::ReindexForgetRetired
                | Call::IndexUpsert
                | Call::IndexDelete
        )
    }

    /// Whether the call belongs to the [`MetadataRepo`] port (otherwise to
    /// [`VectorIndex`]).
    pub fn is_metadata(&self) -> bool {
        !self.is_index()
    }

    /// Whether the call belongs to the [`VectorIndex`] port.
    pub fn is_index(&self) -> bool {
        matches!(
            self,
            Call::IndexUpsert
                | Call::IndexDelete
                | Call::IndexRetrieve
                | Call::IndexSearch
                | Call::IndexCount
                | Call::IndexScroll
        )
    }

    /// Every call of both ports, metadata first, in declaration order.
    pub fn all() -> &'static [Call] {
        &Self::ALL
    }
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What happens to a call that a rule (or the random plan) hits.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// The inner store is not called; a transient error with
    /// [`Outcome::NotApplied`] is returned ("it did not happen").
    FailBefore,
    /// The inner store is not called; a permanent error with
    /// [`Outcome::NotApplied`] is returned.
    Reject,
    /// The inner store is called (the effect happens), then a transient error
    /// with [`Outcome::Unknown`] is returned ("the reply was lost").
    FailAfter,
    /// The inner store is not called and the call never completes: only the
    /// caller's deadline ends it.
    Hang,
    /// The inner store is called, then the call never completes.
    HangAfter,
    /// Sleeps (tokio time, so paused-time tests skip it), then calls the inner store.
    Delay(Duration),
    /// The inner store is called twice (duplicate delivery); the second result
    /// is returned.
    Duplicate,
    /// The inner store is not called; the controller's crash signal fires and
    /// the call never completes.
    CrashBefore,
    /// The inner store is called (the effect happens); then the controller's
    /// crash signal fires and the call never completes.
    CrashAfter,
    /// A transient error with [`Outcome::Unknown`] is returned at once, and the
    /// call's effect lands **later**: an index write is kept by the controller
    /// and applied when the test says so ([`FaultController::take_deferred`]),
    /// as a request that a proxy answered with an error but still delivers.
    /// Any other call is not applied at all (a request lost on its way).
    LandLater,
}

impl Fault {
    /// Every fault kind, with `delay` for [`Fault::Delay`].
    pub fn all(delay: Duration) -> Vec<Fault> {
        vec![
            Fault::FailBefore,
            Fault::Reject,
            Fault::FailAfter,
            Fault::Hang,
            Fault::HangAfter,
            Fault::Delay(delay),
            Fault::Duplicate,
            Fault::CrashBefore,
            Fault::CrashAfter,
            Fault::LandLater,
        ]
    }

    /// Whether the inner store is called at least once under this fault
    /// (for [`Fault::LandLater`]: not during the call).
    pub fn reaches_inner(&self) -> bool {
        !matches!(
            self,
            Fault::FailBefore | Fault::Reject | Fault::Hang | Fault::CrashBefore | Fault::LandLater
        )
    }
}

/// A deterministic fault: it hits the `nth` invocation of `call` (0-based,
/// counted per call per controller) and the `times - 1` following ones.
/// "Fail the first N attempts" is `nth: 0, times: N`.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// The port method.
    pub call: Call,
    /// The first invocation hit (0-based).
    pub nth: usize,
    /// How many consecutive invocations are hit (0 hits none).
    pub times: usize,
    /// What happens to them.
    pub fault: Fault,
}

impl Rule {
    /// Hits exactly the `nth` invocation (0-based) of `call`.
    pub fn once(call: Call, nth: usize, fault: Fault) -> Self {
        Self {
            call,
            nth,
            times: 1,
            fault,
        }
    }

    /// Hits the first `times` invocations of `call`.
    pub fn first(call: Call, times: usize, fault: Fault) -> Self {
        Self {
            call,
            nth: 0,
            times,
            fault,
        }
    }

    /// Hits every invocation of `call`.
    pub fn always(call: Call, fault: Fault) -> Self {
        Self {
            call,
            nth: 0,
            times: usize::MAX,
            fault,
        }
    }

    /// Whether the rule hits the `occurrence`-th invocation of `call`.
    pub fn hits(&self, call: Call, occurrence: usize) -> bool {
        self.call == call && occurrence >= self.nth && occurrence - self.nth < self.times
    }
}

/// One call as the controller saw it.
///
/// A call that never returned (a hang, a crash, or a future dropped by the
/// caller's deadline) keeps `ok == false` and `error == None`.
#[derive(Clone, Debug, PartialEq)]
pub struct LogEntry {
    /// Position in the controller's log (0-based, in the order calls started).
    pub seq: usize,
    /// The port method.
    pub call: Call,
    /// Which invocation of `call` it was (0-based, per controller).
    pub occurrence: usize,
    /// The fault injected, if any.
    pub fault: Option<Fault>,
    /// Whether the caller got `Ok`.
    pub ok: bool,
    /// The error the caller got (its `Display` text), injected or real.
    pub error: Option<String>,
}

impl LogEntry {
    /// Whether the call returned at all (false for hangs, crashes and calls
    /// whose future was dropped).
    pub fn returned(&self) -> bool {
        self.ok || self.error.is_some()
    }
}

/// Seeded random injection, set by [`FaultController::set_random`].
#[derive(Debug)]
struct RandomPlan {
    probability: f64,
    faults: Vec<Fault>,
    calls: Option<Vec<Call>>,
}

#[derive(Debug)]
struct State {
    enabled: bool,
    rules: Vec<Rule>,
    random: Option<RandomPlan>,
    rng: StdRng,
    counts: HashMap<Call, usize>,
    log: Vec<LogEntry>,
    /// Index writes met by [`Fault::LandLater`], not applied yet.
    deferred: Vec<Vec<Point>>,
}

impl State {
    /// The fault for this invocation: the first matching rule wins, then the
    /// random plan. The rng is drawn only for calls the plan covers and no rule
    /// hit, so the same seed and the same call sequence give the same faults.
    fn decide(&mut self, call: Call, occurrence: usize) -> Option<Fault> {
        if let Some(rule) = self.rules.iter().find(|r| r.hits(call, occurrence)) {
            return Some(rule.fault.clone());
        }
        let plan = self.random.as_ref()?;
        if plan.faults.is_empty() || plan.calls.as_ref().is_some_and(|cs| !cs.contains(&call)) {
            return None;
        }
        if self.rng.random::<f64>() >= plan.probability {
            return None;
        }
        let pick = self.rng.random_range(0..plan.faults.len());
        Some(plan.faults[pick].clone())
    }
}

struct Shared {
    seed: u64,
    state: Mutex<State>,
    crash: watch::Sender<bool>,
}

/// The shared, seeded controller of one test's faults. Cloning is cheap and
/// every clone controls the same rules, log and crash signal.
#[derive(Clone)]
pub struct FaultController {
    shared: Arc<Shared>,
}

impl FaultController {
    /// An enabled controller with no rules, whose random injection draws from
    /// a generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        let (crash, _) = watch::channel(false);
        Self {
            shared: Arc::new(Shared {
                seed,
                state: Mutex::new(State {
                    enabled: true,
                    rules: Vec::new(),
                    random: None,
                    rng: StdRng::seed_from_u64(seed),
                    counts: HashMap::new(),
                    log: Vec::new(),
                    deferred: Vec::new(),
                }),
                crash,
            }),
        }
    }

    /// The seed it was created with.
    pub fn seed(&self) -> u64 {
        self.shared.seed
    }

    // A test that panicked while holding the lock must not hide its own
    // failure behind a poison error in every later call.
    fn state(&self) -> MutexGuard<'_, State> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds a deterministic rule. Earlier rules win when several hit a call.
    pub fn add(&self, rule: Rule) {
        self.state().rules.push(rule);
    }

    /// The "restart": removes every rule and the random plan, and lowers the
    /// crash signal so that the next [`run_until_crash`] runs. The log and the
    /// invocation counts are kept (they describe the whole test).
    pub fn clear(&self) {
        {
            let mut state = self.state();
            state.rules.clear();
            state.random = None;
        }
        self.shared.crash.send_replace(false);
    }

    /// Seeded random injection: each call of `calls` (every call when `None`)
    /// that no rule hits meets, with `probability`, one of `faults` picked
    /// uniformly. Replaces any previous plan; the generator is not reseeded, so
    /// a run is reproducible from the seed and the sequence of calls.
    pub fn set_random(&self, probability: f64, faults: Vec<Fault>, calls: Option<Vec<Call>>) {
        let probability = if probability.is_nan() {
            0.0
        } else {
            probability.clamp(0.0, 1.0)
        };
        self.state().random = Some(RandomPlan {
            probability,
            faults,
            calls,
        });
    }

    /// Passes every call through untouched (calls are still counted and logged).
    pub fn disable(&self) {
        self.state().enabled = false;
    }

    /// Injects faults again after [`disable`](Self::disable).
    pub fn enable(&self) {
        self.state().enabled = true;
    }

    /// Whether faults are injected.
    pub fn is_enabled(&self) -> bool {
        self.state().enabled
    }

    /// Every call so far, in the order they started.
    pub fn log(&self) -> Vec<LogEntry> {
        self.state().log.clone()
    }

    /// The call of each log entry, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.state().log.iter().map(|e| e.call).collect()
    }

    /// How many times `call` was invoked through this controller's wrappers.
    pub fn invocations(&self, call: Call) -> usize {
        self.state().counts.get(&call).copied().unwrap_or(0)
    }

    /// The log entries that met a fault.
    pub fn injected(&self) -> Vec<LogEntry> {
        self.state()
            .log
            .iter()
            .filter(|e| e.fault.is_some())
            .cloned()
            .collect()
    }

    /// Whether a crash fault fired (since the last [`clear`](Self::clear)).
    pub fn crashed(&self) -> bool {
        *self.shared.crash.borrow()
    }

    /// Fires the crash signal by hand, as a crash fault does.
    pub fn trigger_crash(&self) {
        self.shared.crash.send_replace(true);
    }

    /// Resolves once a crash fault has fired (at once if it already has).
    pub async fn wait_crash(&self) {
        let mut rx = self.shared.crash.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|crashed| *crashed).await.is_ok();
    }

    /// Takes the index writes that met [`Fault::LandLater`] and have not
    /// landed yet, oldest first. The test lands them by writing them to the
    /// store behind the wrappers: after the faulty operation returned (that is
    /// the fault), but before the clock passes the writer's lease (a request
    /// never lands later than that; see `docs/protocol.md`).
    pub fn take_deferred(&self) -> Vec<Vec<Point>> {
        std::mem::take(&mut self.state().deferred)
    }

    /// Counts and logs the start of a call and decides its fault.
    fn begin(&self, call: Call) -> (usize, usize, Option<Fault>) {
        let mut state = self.state();
        let counter = state.counts.entry(call).or_insert(0);
        let occurrence = *counter;
        *counter += 1;
        let fault = if state.enabled {
            state.decide(call, occurrence)
        } else {
            None
        };
        let seq = state.log.len();
        state.log.push(LogEntry {
            seq,
            call,
            occurrence,
            fault: fault.clone(),
            ok: false,
            error: None,
        });
        (seq, occurrence, fault)
    }

    /// Records the result of the call logged at `seq`.
    fn finish(&self, seq: usize, error: Option<String>) {
        let mut state = self.state();
        if let Some(entry) = state.log.get_mut(seq) {
            entry.ok = error.is_none();
            entry.error = error;
        }
    }
}

impl fmt::Debug for FaultController {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state();
        f.debug_struct("FaultController")
            .field("seed", &self.shared.seed)
            .field("enabled", &state.enabled)
            .field("rules", &state.rules)
            .field("random", &state.random)
            .field("calls_logged", &state.log.len())
            .field("crashed", &*self.shared.crash.borrow())
            .finish()
    }
}

/// Runs `fut` until it completes or the controller's crash signal fires. On a
/// crash the future is dropped where it stands (the process died, its
/// in-memory state is gone) and `None` is returned; the stores keep whatever
/// was applied. If the signal is already up, `fut` is not polled at all; if it
/// fires while `fut` runs, the result is discarded even if `fut` finished.
pub async fn run_until_crash<T>(ctl: &FaultController, fut: impl Future<Output = T>) -> Option<T> {
    let mut rx = ctl.shared.crash.subscribe();
    let crash = async move {
        // The sender lives in `ctl`, which outlives this call: no close error.
        let _ = rx.wait_for(|crashed| *crashed).await.is_ok();
    };
    let out = tokio::select! {
        biased;
        () = crash => return None,
        out = fut => out,
    };
    if ctl.crashed() { None } else { Some(out) }
}

/// How an injected error is built for each port's error type.
enum Injected {
    /// Transient, did not happen.
    NotApplied,
    /// Transient, may have happened.
    Unknown,
    /// Permanent, did not happen.
    Rejected,
}

trait InjectableError: fmt::Display + Sized {
    fn injected(kind: Injected, message: String) -> Self;
}

impl InjectableError for MetadataError {
    fn injected(kind: Injected, message: String) -> Self {
        match kind {
            Injected::NotApplied => MetadataError::Transient {
                outcome: Outcome::NotApplied,
                message,
                source: None,
            },
            Injected::Unknown => MetadataError::Transient {
                outcome: Outcome::Unknown,
                message,
                source: None,
            },
            Injected::Rejected => MetadataError::Permanent {
                outcome: Outcome::NotApplied,
                message,
                source: None,
            },
        }
    }
}

impl InjectableError for IndexError {
    fn injected(kind: Injected, message: String) -> Self {
        match kind {
            Injected::NotApplied => IndexError::Transient {
                outcome: Outcome::NotApplied,
                retry_after: None,
                message,
                source: None,
            },
            Injected::Unknown => IndexError::Transient {
                outcome: Outcome::Unknown,
                retry_after: None,
                message,
                source: None,
            },
            Injected::Rejected => IndexError::Permanent {
                outcome: Outcome::NotApplied,
                message,
                source: None,
            },
        }
    }
}

/// Applies the controller's decision to one call. `op` issues the inner call;
/// it is a `Fn` because [`Fault::Duplicate`] issues it twice. The controller's
/// lock is only taken in `begin`/`finish`, never across an await.
async fn intercept<T, E, F, Fut>(ctl: &FaultController, call: Call, op: F) -> Result<T, E>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: InjectableError,
{
    intercept_deferrable(ctl, call, op, || None).await
}

/// [`intercept`], for a call whose effect [`Fault::LandLater`] can keep for
/// later: `deferred` returns the index write to keep.
async fn intercept_deferrable<T, E, F, Fut>(
    ctl: &FaultController,
    call: Call,
    op: F,
    deferred: impl FnOnce() -> Option<Vec<Point>>,
) -> Result<T, E>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: InjectableError,
{
    let (seq, occurrence, fault) = ctl.begin(call);
    let injected = |kind: Injected, fault: &Fault, note: &str| {
        E::injected(
            kind,
            format!("injected fault {fault:?} on {call} #{occurrence}{note}"),
        )
    };
    let result = match fault {
        None => op().await,
        Some(fault @ Fault::FailBefore) => Err(injected(Injected::NotApplied, &fault, "")),
        Some(fault @ Fault::Reject) => Err(injected(Injected::Rejected, &fault, "")),
        Some(fault @ Fault::FailAfter) => {
            let note = match op().await {
                Ok(_) => " (the call itself succeeded)".to_owned(),
                Err(e) => format!(" (the call itself failed: {e})"),
            };
            Err(injected(Injected::Unknown, &fault, &note))
        }
        Some(Fault::Hang) => pending().await,
        Some(Fault::HangAfter) => {
            let _ = op().await;
            pending().await
        }
        Some(Fault::Delay(d)) => {
            tokio::time::sleep(d).await;
            op().await
        }
        Some(Fault::Duplicate) => {
            let _ = op().await;
            op().await
        }
        Some(Fault::CrashBefore) => {
            ctl.trigger_crash();
            pending().await
        }
        Some(Fault::CrashAfter) => {
            let _ = op().await;
            ctl.trigger_crash();
            pending().await
        }
        Some(fault @ Fault::LandLater) => {
            let note = match deferred() {
                Some(points) => {
                    ctl.state().deferred.push(points);
                    " (the write lands later)"
                }
                None => " (the request is lost)",
            };
            Err(injected(Injected::Unknown, &fault, note))
        }
    };
    ctl.finish(seq, result.as_ref().err().map(ToString::to_string));
    result
}

/// A [`MetadataRepo`] that injects the faults its [`FaultController`] decides.
pub struct FaultyMetadataRepo<M> {
    inner: M,
    ctl: FaultController,
}

impl<M> FaultyMetadataRepo<M> {
    /// Wraps `inner`; `ctl` decides the faults (share it with the index wrapper).
    pub fn new(inner: M, ctl: FaultController) -> Self {
        Self { inner, ctl }
    }

    /// The wrapped store, reachable without faults.
    pub fn inner(&self) -> &M {
        &self.inner
    }

    /// The controller.
    pub fn controller(&self) -> &FaultController {
        &self.ctl
    }

    /// Unwraps the store.
    pub fn into_inner(self) -> M {
        self.inner
    }
}

impl<M> fmt::Debug for FaultyMetadataRepo<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyMetadataRepo")
            .field("inner", &format_args!("{}", std::any::type_name::<M>()))
            .field("controller", &self.ctl)
            .finish()
    }
}

#[async_trait]
impl<M: MetadataRepo> MetadataRepo for FaultyMetadataRepo<M> {
    async fn prepare(&self, intent: &NewIntent) -> Result<(), MetadataError> {
        intercept(&self.ctl, Call::Prepare, || self.inner.prepare(intent)).await
    }

    async fn commit_upsert(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        rows: &[RowWrite],
        idempotency: Option<&IdempotencyRecord>,
    ) -> Result<UpsertCommit, MetadataError> {
        intercept(&self.ctl, Call::CommitUpsert, || {
            self.inner.commit_upsert(intent, owner, rows, idempotency)
        })
        .await
    }

    /// The gate is awaited outside the fault plan, so a gated commit is the
    /// same `CommitUpsert` call, at the same place in the call log, as an
    /// ungated one; the inner store's own gated commit then runs under it.
    async fn commit_upsert_gated(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        rows: &[RowWrite],
        idempotency: Option<&IdempotencyRecord>,
        gate: &IndexGate,
    ) -> Result<UpsertCommit, MetadataError> {
        if !gate.wait().await {
            return Err(MetadataError::Aborted { intent });
        }
        intercept(&self.ctl, Call::CommitUpsert, || {
            self.inner
                .commit_upsert_gated(intent, owner, rows, idempotency, gate)
        })
        .await
    }

    async fn commit_delete(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        selector: &DeleteSelector,
        idempotency: Option<&IdempotencyRecord>,
    ) -> Result<DeleteCommit, MetadataError> {
        intercept(&self.ctl, Call::CommitDelete, || {
            self.inner
                .commit_delete(intent, owner, selector, idempotency)
        })
        .await
    }

    fn commit_step_connection(&self) -> Option<ConnectionType> {
        self.inner.commit_step_connection()
    }

    /// Like the gated upsert commit: the gate is awaited outside the fault
    /// plan, then the inner store's commit runs under it.
    async fn commit_transaction(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        commit: &TransactionCommit<'_>,
        idempotency: Option<&IdempotencyRecord>,
        gate: &IndexGate,
    ) -> Result<TransactionCommitResult, MetadataError> {
        if !gate.wait().await {
            return Err(MetadataError::Aborted { intent });
        }
        intercept(&self.ctl, Call::CommitTransaction, || {
            self.inner
                .commit_transaction(intent, owner, commit, idempotency, gate)
        })
        .await
    }

    async fn undo_images(&self, intent: IntentId) -> Result<Vec<UndoImage>, MetadataError> {
        intercept(&self.ctl, Call::UndoImages, || {
            self.inner.undo_images(intent)
        })
        .await
    }

    async fn saga_save(
        &self,
        saga: &SagaRecord,
        fence: Option<OwnerToken>,
    ) -> Result<Vec<Intent>, MetadataError> {
        intercept(&self.ctl, Call::SagaSave, || {
            self.inner.saga_save(saga, fence)
        })
        .await
    }

    async fn saga_claim(
        &self,
        now_ms: i64,
        owner: OwnerToken,
        lease_deadline_ms: i64,
        limit: usize,
    ) -> Result<Vec<SagaRecord>, MetadataError> {
        intercept(&self.ctl, Call::SagaClaim, || {
            self.inner
                .saga_claim(now_ms, owner, lease_deadline_ms, limit)
        })
        .await
    }

    async fn saga_take(
        &self,
        id: SagaId,
        owner: OwnerToken,
        lease_deadline_ms: i64,
    ) -> Result<Option<SagaRecord>, MetadataError> {
        intercept(&self.ctl, Call::SagaTake, || {
            self.inner.saga_take(id, owner, lease_deadline_ms)
        })
        .await
    }

    async fn saga_get(&self, id: SagaId) -> Result<Option<SagaRecord>, MetadataError> {
        intercept(&self.ctl, Call::SagaGet, || self.inner.saga_get(id)).await
    }

    async fn saga_list(
        &self,
        state: Option<SagaState>,
        limit: usize,
    ) -> Result<Vec<SagaRecord>, MetadataError> {
        intercept(&self.ctl, Call::SagaList, || {
            self.inner.saga_list(state, limit)
        })
        .await
    }

    async fn saga_counts(&self) -> Result<SagaCounts, MetadataError> {
        intercept(&self.ctl, Call::SagaCounts, || self.inner.saga_counts()).await
    }

    async fn settle(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        fence: OwnerToken,
    ) -> Result<Settlement, MetadataError> {
        intercept(&self.ctl, Call::Settle, || {
            self.inner.settle(intent, owner, fence)
        })
        .await
    }

    async fn settle_unprepared(
        &self,
        intent: &NewIntent,
        owner: OwnerToken,
        fence: OwnerToken,
    ) -> Result<Settlement, MetadataError> {
        intercept(&self.ctl, Call::SettleUnprepared, || {
            self.inner.settle_unprepared(intent, owner, fence)
        })
        .await
    }

    async fn resolve(&self, intent: IntentId, owner: OwnerToken) -> Result<bool, MetadataError> {
        intercept(&self.ctl, Call::Resolve, || {
            self.inner.resolve(intent, owner)
        })
        .await
    }

    async fn resolve_many(
        &self,
        intents: &[IntentId],
        owner: OwnerToken,
    ) -> Result<usize, MetadataError> {
        intercept(&self.ctl, Call::ResolveMany, || {
            self.inner.resolve_many(intents, owner)
        })
        .await
    }

    async fn claim_expired(
        &self,
        now_ms: i64,
        owner: OwnerToken,
        lease_deadline_ms: i64,
        limit: usize,
    ) -> Result<Vec<Intent>, MetadataError> {
        intercept(&self.ctl, Call::ClaimExpired, || {
            self.inner
                .claim_expired(now_ms, owner, lease_deadline_ms, limit)
        })
        .await
    }

    async fn record_failure(
        &self,
        intent: IntentId,
        owner: OwnerToken,
        message: &str,
    ) -> Result<(), MetadataError> {
        intercept(&self.ctl, Call::RecordFailure, || {
            self.inner.record_failure(intent, owner, message)
        })
        .await
    }

    async fn referenced_points(
        &self,
        points: &[PointId],
    ) -> Result<HashSet<PointId>, MetadataError> {
        intercept(&self.ctl, Call::ReferencedPoints, || {
            self.inner.referenced_points(points)
        })
        .await
    }

    async fn rows_by_points(&self, points: &[PointId]) -> Result<Vec<StoredRecord>, MetadataError> {
        intercept(&self.ctl, Call::RowsByPoints, || {
            self.inner.rows_by_points(points)
        })
        .await
    }

    async fn get(&self, ids: &[RecordId]) -> Result<Vec<StoredRecord>, MetadataError> {
        intercept(&self.ctl, Call::Get, || self.inner.get(ids)).await
    }

    async fn lookup_idempotency(
        &self,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, MetadataError> {
        intercept(&self.ctl, Call::LookupIdempotency, || {
            self.inner.lookup_idempotency(key)
        })
        .await
    }

    async fn scan_refs(
        &self,
        scope: Option<&Scope>,
        after: Option<RecordId>,
        limit: usize,
    ) -> Result<Page<RowRef, RecordId>, MetadataError> {
        intercept(&self.ctl, Call::ScanRefs, || {
            self.inner.scan_refs(scope, after, limit)
        })
        .await
    }

    async fn list_intents(&self, limit: usize) -> Result<Vec<Intent>, MetadataError> {
        intercept(&self.ctl, Call::ListIntents, || {
            self.inner.list_intents(limit)
        })
        .await
    }

    async fn count_by_scope(&self) -> Result<BTreeMap<Scope, u64>, MetadataError> {
        intercept(&self.ctl, Call::CountByScope, || {
            self.inner.count_by_scope()
        })
        .await
    }

    fn deferred_indexing(&self) -> bool {
        self.inner.deferred_indexing()
    }

    async fn claim_pending(
        &self,
        now_ms: i64,
        claim: OwnerToken,
        claim_until_ms: i64,
        limit: usize,
    ) -> Result<Vec<PendingIndex>, MetadataError> {
        intercept(&self.ctl, Call::ClaimPending, || {
            self.inner
                .claim_pending(now_ms, claim, claim_until_ms, limit)
        })
        .await
    }

    async fn record_index_failure(
        &self,
        claim: OwnerToken,
        entries: &[(RecordId, u64)],
        failure: &IndexFailure,
    ) -> Result<usize, MetadataError> {
        intercept(&self.ctl, Call::RecordIndexFailure, || {
            self.inner.record_index_failure(claim, entries, failure)
        })
        .await
    }

    async fn list_pending(
        &self,
        filter: PendingFilter,
        after: Option<RecordId>,
        limit: usize,
    ) -> Result<Vec<PendingIndex>, MetadataError> {
        intercept(&self.ctl, Call::ListPending, || {
            self.inner.list_pending(filter, after, limit)
        })
        .await
    }

    async fn pending_for(&self, ids: &[RecordId]) -> Result<Vec<PendingIndex>, MetadataError> {
        intercept(&self.ctl, Call::PendingFor, || self.inner.pending_for(ids)).await
    }

    async fn retry_dead(&self, ids: Option<&[RecordId]>) -> Result<u64, MetadataError> {
        intercept(&self.ctl, Call::RetryDead, || self.inner.retry_dead(ids)).await
    }

    async fn drop_dead(&self, ids: Option<&[RecordId]>) -> Result<u64, MetadataError> {
        intercept(&self.ctl, Call::DropDead, || self.inner.drop_dead(ids)).await
    }

    async fn pending_stats(&self, now_ms: i64) -> Result<PendingStats, MetadataError> {
        intercept(&self.ctl, Call::PendingStats, || {
            self.inner.pending_stats(now_ms)
        })
        .await
    }

    fn reindexing(&self) -> bool {
        self.inner.reindexing()
    }

    async fn index_state(&self) -> Result<IndexState, MetadataError> {
        intercept(&self.ctl, Call::IndexState, || self.inner.index_state()).await
    }

    async fn reindex_begin(
        &self,
        spec: &MigrationSpec,
        owner: OwnerToken,
        now_ms: i64,
        lease_until_ms: i64,
    ) -> Result<IndexState, MetadataError> {
        intercept(&self.ctl, Call::ReindexBegin, || {
            self.inner
                .reindex_begin(spec, owner, now_ms, lease_until_ms)
        })
        .await
    }

    async fn reindex_scan(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<ChangedRow>, MetadataError> {
        intercept(&self.ctl, Call::ReindexScan, || {
            self.inner.reindex_scan(after, limit)
        })
        .await
    }

    async fn reindex_garbage(&self, limit: usize) -> Result<Vec<PointId>, MetadataError> {
        intercept(&self.ctl, Call::ReindexGarbage, || {
            self.inner.reindex_garbage(limit)
        })
        .await
    }

    async fn reindex_progress(
        &self,
        owner: OwnerToken,
        cursor: u64,
        copied: u64,
        garbage: &[PointId],
        vectors: &[StagedVector],
        lease_until_ms: i64,
    ) -> Result<IndexState, MetadataError> {
        intercept(&self.ctl, Call::ReindexProgress, || {
            self.inner
                .reindex_progress(owner, cursor, copied, garbage, vectors, lease_until_ms)
        })
        .await
    }

    async fn reindex_freeze(
        &self,
        owner: OwnerToken,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<u64, MetadataError> {
        intercept(&self.ctl, Call::ReindexFreeze, || {
            self.inner.reindex_freeze(owner, now_ms, until_ms)
        })
        .await
    }

    async fn reindex_switch(
        &self,
        owner: OwnerToken,
        current: &str,
        now_ms: i64,
    ) -> Result<SwitchOutcome, MetadataError> {
        intercept(&self.ctl, Call::ReindexSwitch, || {
            self.inner.reindex_switch(owner, current, now_ms)
        })
        .await
    }

    async fn reindex_abort(
        &self,
        owner: Option<OwnerToken>,
    ) -> Result<Option<Migration>, MetadataError> {
        intercept(&self.ctl, Call::ReindexAbort, || {
            self.inner.reindex_abort(owner)
        })
        .await
    }

    async fn reindex_forget_retired(&self, name: &str) -> Result<bool, MetadataError> {
        intercept(&self.ctl, Call::ReindexForgetRetired, || {
            self.inner.reindex_forget_retired(name)
        })
        .await
    }
}

/// An [`IndexCatalog`] whose indexes inject the faults its
/// [`FaultController`] decides (each opened or created collection is a
/// [`FaultyVectorIndex`] sharing the controller). The catalog's own calls
/// pass through.
pub struct FaultyCatalog<C> {
    inner: C,
    ctl: FaultController,
}

impl<C> FaultyCatalog<C> {
    /// Wraps `inner`; `ctl` decides the faults of its indexes.
    pub fn new(inner: C, ctl: FaultController) -> Self {
        Self { inner, ctl }
    }
}

#[async_trait]
impl<C: IndexCatalog> IndexCatalog for FaultyCatalog<C> {
    type Index = FaultyVectorIndex<C::Index>;

    async fn open(&self, name: &str) -> Result<Self::Index, IndexError> {
        let index = self.inner.open(name).await?;
        Ok(FaultyVectorIndex::new(index, self.ctl.clone()))
    }

    async fn create(
        &self,
        name: &str,
        dimension: usize,
        distance: crate::model::Distance,
    ) -> Result<Self::Index, IndexError> {
        let index = self.inner.create(name, dimension, distance).await?;
        Ok(FaultyVectorIndex::new(index, self.ctl.clone()))
    }

    async fn drop_collection(&self, name: &str) -> Result<bool, IndexError> {
        self.inner.drop_collection(name).await
    }
}

/// A [`VectorIndex`] that injects the faults its [`FaultController`] decides.
/// [`dimension`](VectorIndex::dimension) and [`distance`](VectorIndex::distance)
/// are configuration, not calls, and always pass through.
pub struct FaultyVectorIndex<V> {
    inner: V,
    ctl: FaultController,
}

impl<V> FaultyVectorIndex<V> {
    /// Wraps `inner`; `ctl` decides the faults (share it with the metadata wrapper).
    pub fn new(inner: V, ctl: FaultController) -> Self {
        Self { inner, ctl }
    }

    /// The wrapped index, reachable without faults.
    pub fn inner(&self) -> &V {
        &self.inner
    }

    /// The controller.
    pub fn controller(&self) -> &FaultController {
        &self.ctl
    }

    /// Unwraps the index.
    pub fn into_inner(self) -> V {
        self.inner
    }
}

impl<V> fmt::Debug for FaultyVectorIndex<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyVectorIndex")
            .field("inner", &format_args!("{}", std::any::type_name::<V>()))
            .field("controller", &self.ctl)
            .finish()
    }
}

#[async_trait]
impl<V: VectorIndex> VectorIndex for FaultyVectorIndex<V> {
    fn dimension(&self) -> usize {
        self.inner.dimension()
    }

    fn distance(&self) -> Distance {
        self.inner.distance()
    }

    async fn upsert(&self, points: &[Point]) -> Result<(), IndexError> {
        intercept_deferrable(
            &self.ctl,
            Call::IndexUpsert,
            || self.inner.upsert(points),
            || Some(points.to_vec()),
        )
        .await
    }

    async fn delete(&self, ids: &[PointId]) -> Result<(), IndexError> {
        intercept(&self.ctl, Call::IndexDelete, || self.inner.delete(ids)).await
    }

    async fn retrieve(&self, ids: &[PointId]) -> Result<Vec<PointInfo>, IndexError> {
        intercept(&self.ctl, Call::IndexRetrieve, || self.inner.retrieve(ids)).await
    }

    async fn search(&self, query: &IndexQuery) -> Result<Vec<ScoredPoint>, IndexError> {
        intercept(&self.ctl, Call::IndexSearch, || self.inner.search(query)).await
    }

    async fn count(&self, scope: Option<&Scope>) -> Result<u64, IndexError> {
        intercept(&self.ctl, Call::IndexCount, || self.inner.count(scope)).await
    }

    async fn scroll(
        &self,
        scope: Option<&Scope>,
        offset: Option<PointId>,
        limit: usize,
    ) -> Result<Page<PointInfo, PointId>, IndexError> {
        intercept(&self.ctl, Call::IndexScroll, || {
            self.inner.scroll(scope, offset, limit)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RecordId;

    /// A tiny index: a map of points and a count of applied upserts.
    #[derive(Debug, Default)]
    struct StubIndex {
        points: Mutex<BTreeMap<PointId, Point>>,
        upserts: Mutex<usize>,
    }

    #[async_trait]
    impl VectorIndex for StubIndex {
        fn dimension(&self) -> usize {
            2
        }
        fn distance(&self) -> Distance {
            Distance::Dot
        }
        async fn upsert(&self, points: &[Point]) -> Result<(), IndexError> {
            *self.upserts.lock().unwrap() += 1;
            let mut map = self.points.lock().unwrap();
            for p in points {
                map.insert(p.id, p.clone());
            }
            Ok(())
        }
        async fn delete(&self, ids: &[PointId]) -> Result<(), IndexError> {
            let mut map = self.points.lock().unwrap();
            for id in ids {
                map.remove(id);
            }
            Ok(())
        }
        async fn retrieve(&self, ids: &[PointId]) -> Result<Vec<PointInfo>, IndexError> {
            let map = self.points.lock().unwrap();
            Ok(ids
                .iter()
                .filter_map(|id| map.get(id))
                .map(|p| PointInfo {
                    id: p.id,
                    record_id: p.record_id,
                    scope: p.scope.clone(),
                    written_at_ms: p.written_at_ms,
                })
                .collect())
        }
        async fn search(&self, _query: &IndexQuery) -> Result<Vec<ScoredPoint>, IndexError> {
            Err(IndexError::Config {
                message: "stub cannot search".into(),
            })
        }
        async fn count(&self, _scope: Option<&Scope>) -> Result<u64, IndexError> {
            Ok(self.points.lock().unwrap().len() as u64)
        }
        async fn scroll(
            &self,
            _scope: Option<&Scope>,
            _offset: Option<PointId>,
            _limit: usize,
        ) -> Result<Page<PointInfo, PointId>, IndexError> {
            Ok(Page {
                items: Vec::new(),
                next: None,
            })
        }
    }

    fn point() -> Point {
        Point {
            id: PointId::new_random(),
            record_id: RecordId::new_random(),
            scope: Scope::new("s"),
            metadata: Default::default(),
            vector: vec![1.0, 0.0],
            written_at_ms: 0,
        }
    }

    fn wrapped(seed: u64) -> (FaultController, FaultyVectorIndex<Arc<StubIndex>>) {
        let ctl = FaultController::new(seed);
        let index = FaultyVectorIndex::new(Arc::new(StubIndex::default()), ctl.clone());
        (ctl, index)
    }

    #[test]
    fn rule_hits_nth_and_following_times() {
        let rule = Rule {
            call: Call::Prepare,
            nth: 2,
            times: 3,
            fault: Fault::FailBefore,
        };
        let hit: Vec<usize> = (0..8).filter(|&n| rule.hits(Call::Prepare, n)).collect();
        assert_eq!(hit, vec![2, 3, 4]);
        assert!(!rule.hits(Call::Get, 2));
        assert!(Rule::always(Call::Get, Fault::Hang).hits(Call::Get, usize::MAX - 1));
        assert!(!Rule::first(Call::Get, 0, Fault::Hang).hits(Call::Get, 0));
    }

    #[test]
    fn call_classification() {
        assert_eq!(Call::all().len(), 46);
        let distinct: HashSet<Call> = Call::all().iter().copied().collect();
        assert_eq!(distinct.len(), 46);
        let writes: Vec<Call> = Call::all().iter().copied().filter(Call::is_write).collect();
        assert_eq!(writes.len(), 25);
        assert!(Call::ReindexSwitch.is_write() && Call::ReindexSwitch.is_metadata());
        assert!(!Call::ReindexScan.is_write() && !Call::IndexState.is_write());
        assert!(Call::ClaimPending.is_write() && !Call::PendingFor.is_write());
        assert!(Call::CommitTransaction.is_write() && Call::CommitTransaction.is_metadata());
        assert!(Call::SagaClaim.is_write() && !Call::SagaGet.is_write());
        assert!(Call::IndexDelete.is_write() && Call::IndexDelete.is_index());
        assert!(!Call::IndexSearch.is_write());
        assert!(Call::Settle.is_write() && Call::Settle.is_metadata());
        assert!(Call::SettleUnprepared.is_write() && Call::SettleUnprepared.is_metadata());
        assert_eq!(Call::all().iter().filter(|c| c.is_index()).count(), 6);
    }

    #[tokio::test]
    async fn fail_before_does_not_reach_inner() {
        let (ctl, index) = wrapped(1);
        ctl.add(Rule::once(Call::IndexUpsert, 0, Fault::FailBefore));
        let err = index.upsert(&[point()]).await.unwrap_err();
        assert!(err.is_retryable());
        assert_eq!(err.outcome(), Outcome::NotApplied);
        assert!(err.to_string().contains("injected fault"), "{err}");
        assert_eq!(*index.inner().upserts.lock().unwrap(), 0);
        // The rule hit only the first call.
        index.upsert(&[point()]).await.unwrap();
        assert_eq!(*index.inner().upserts.lock().unwrap(), 1);
    }

    #[tokio::test]
    async fn land_later_answers_unknown_at_once_and_keeps_the_write() {
        let (ctl, index) = wrapped(1);
        ctl.add(Rule::once(Call::IndexUpsert, 0, Fault::LandLater));
        ctl.add(Rule::once(Call::IndexDelete, 0, Fault::LandLater));
        let p = point();
        let err = index.upsert(std::slice::from_ref(&p)).await.unwrap_err();
        assert!(err.is_retryable());
        assert_eq!(err.outcome(), Outcome::Unknown);
        assert!(err.to_string().contains("lands later"), "{err}");
        // Not applied during the call ...
        assert_eq!(*index.inner().upserts.lock().unwrap(), 0);
        // ... but kept, to land when the test says.
        assert_eq!(ctl.take_deferred(), vec![vec![p.clone()]]);
        assert!(ctl.take_deferred().is_empty());
        // Any other call is simply lost.
        let err = index.delete(&[p.id]).await.unwrap_err();
        assert_eq!(err.outcome(), Outcome::Unknown);
        assert!(err.to_string().contains("lost"), "{err}");
        assert!(ctl.take_deferred().is_empty());
    }

    #[tokio::test]
    async fn fail_after_reaches_inner_and_reports_unknown() {
        let (ctl, index) = wrapped(1);
        ctl.add(Rule::once(Call::IndexUpsert, 0, Fault::FailAfter));
        let p = point();
        let err = index.upsert(std::slice::from_ref(&p)).await.unwrap_err();
        assert!(matches!(
            err,
            IndexError::Transient {
                outcome: Outcome::Unknown,
                retry_after: None,
                ..
            }
        ));
        assert!(err.to_string().contains("injected fault"));
        assert_eq!(index.inner().retrieve(&[p.id]).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn reject_is_permanent_and_not_applied() {
        let (ctl, index) = wrapped(1);
        ctl.add(Rule::always(Call::IndexDelete, Fault::Reject));
        let err = index.delete(&[PointId::new_random()]).await.unwrap_err();
        assert!(!err.is_retryable());
        assert!(matches!(
            err,
            IndexError::Permanent {
                outcome: Outcome::NotApplied,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn duplicate_calls_inner_twice() {
        let (ctl, index) = wrapped(1);
        ctl.add(Rule::once(Call::IndexUpsert, 0, Fault::Duplicate));
        index.upsert(&[point()]).await.unwrap();
        assert_eq!(*index.inner().upserts.lock().unwrap(), 2);
        assert_eq!(index.inner().count(None).await.unwrap(), 1);
        assert_eq!(ctl.invocations(Call::IndexUpsert), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn hang_never_completes_and_stays_unreturned_in_the_log() {
        let (ctl, index) = wrapped(1);
        ctl.add(Rule::once(Call::IndexCount, 0, Fault::Hang));
        let out = tokio::time::timeout(Duration::from_secs(3600), index.count(None)).await;
        assert!(out.is_err(), "a hung call completed");
        let log = ctl.log();
        assert_eq!(log.len(), 1);
        assert!(!log[0].returned());
        assert_eq!(log[0].fault, Some(Fault::Hang));
    }

    #[tokio::test(start_paused = true)]
    async fn delay_waits_then_calls_inner() {
        let (ctl, index) = wrapped(1);
        ctl.add(Rule::once(
            Call::IndexUpsert,
            0,
            Fault::Delay(Duration::from_secs(5)),
        ));
        let short = tokio::time::timeout(Duration::from_secs(4), index.upsert(&[point()])).await;
        assert!(short.is_err());
        assert_eq!(*index.inner().upserts.lock().unwrap(), 0);
        ctl.clear();
        ctl.add(Rule::once(
            Call::IndexUpsert,
            1,
            Fault::Delay(Duration::from_secs(5)),
        ));
        let start = tokio::time::Instant::now();
        index.upsert(&[point()]).await.unwrap();
        assert!(start.elapsed() >= Duration::from_secs(5));
        assert_eq!(*index.inner().upserts.lock().unwrap(), 1);
    }

    #[tokio::test]
    async fn crash_drops_the_operation() {
        let (ctl, index) = wrapped(1);
        ctl.add(Rule::once(Call::IndexUpsert, 1, Fault::CrashAfter));
        let (p1, p2, p3) = (point(), point(), point());
        let out = run_until_crash(&ctl, async {
            index.upsert(std::slice::from_ref(&p1)).await.unwrap();
            index.upsert(std::slice::from_ref(&p2)).await.unwrap();
            index.upsert(std::slice::from_ref(&p3)).await.unwrap();
            "finished"
        })
        .await;
        assert_eq!(out, None);
        assert!(ctl.crashed());
        let ids = [p1.id, p2.id, p3.id];
        let found = index.inner().retrieve(&ids).await.unwrap();
        let found: HashSet<PointId> = found.into_iter().map(|p| p.id).collect();
        assert_eq!(found, HashSet::from([p1.id, p2.id]));
        // A crashed process runs nothing more until the restart.
        assert_eq!(run_until_crash(&ctl, async { 1 }).await, None);
        ctl.clear();
        assert!(!ctl.crashed());
        assert_eq!(run_until_crash(&ctl, async { 1 }).await, Some(1));
    }

    #[tokio::test]
    async fn wait_crash_resolves_on_crash_before() {
        let (ctl, index) = wrapped(1);
        ctl.add(Rule::once(Call::IndexRetrieve, 0, Fault::CrashBefore));
        let waiter = tokio::spawn({
            let ctl = ctl.clone();
            async move { ctl.wait_crash().await }
        });
        let out = run_until_crash(&ctl, index.retrieve(&[PointId::new_random()])).await;
        assert!(out.is_none());
        waiter.await.unwrap();
        assert!(ctl.crashed());
    }

    #[tokio::test]
    async fn disabled_controller_passes_through_and_logs() {
        let (ctl, index) = wrapped(1);
        ctl.add(Rule::always(Call::IndexUpsert, Fault::FailBefore));
        ctl.set_random(1.0, vec![Fault::Reject], None);
        ctl.disable();
        index.upsert(&[point()]).await.unwrap();
        assert_eq!(*index.inner().upserts.lock().unwrap(), 1);
        ctl.enable();
        assert!(index.upsert(&[point()]).await.is_err());
        let log = ctl.log();
        assert_eq!(log.len(), 2);
        assert_eq!((log[0].fault.clone(), log[0].ok), (None, true));
        assert_eq!(log[1].fault, Some(Fault::FailBefore));
        assert!(log[1].error.as_deref().unwrap().contains("injected fault"));
    }

    async fn random_run(seed: u64) -> Vec<LogEntry> {
        let (ctl, index) = wrapped(seed);
        ctl.set_random(
            0.5,
            vec![Fault::FailBefore, Fault::FailAfter, Fault::Duplicate],
            Some(vec![Call::IndexUpsert, Call::IndexCount]),
        );
        for _ in 0..40 {
            let _ = index.upsert(&[point()]).await;
            let _ = index.count(None).await;
            let _ = index.delete(&[PointId::new_random()]).await;
        }
        ctl.log()
    }

    #[tokio::test]
    async fn random_mode_is_reproducible_from_the_seed() {
        let a = random_run(99).await;
        let b = random_run(99).await;
        let c = random_run(100).await;
        assert_eq!(a, b);
        assert_ne!(a, c);
        let faulted = a.iter().filter(|e| e.fault.is_some()).count();
        assert!(
            faulted > 10 && faulted < 70,
            "{faulted} of 80 eligible calls"
        );
        // Calls outside the plan are never hit.
        assert!(
            a.iter()
                .filter(|e| e.call == Call::IndexDelete)
                .all(|e| e.fault.is_none())
        );
    }

    #[test]
    fn debug_shows_the_wrapper_and_controller() {
        let (ctl, index) = wrapped(5);
        ctl.add(Rule::once(Call::IndexSearch, 0, Fault::Hang));
        let text = format!("{index:?}");
        assert!(text.contains("FaultyVectorIndex"), "{text}");
        assert!(text.contains("StubIndex"), "{text}");
        assert!(text.contains("seed: 5"), "{text}");
        assert!(text.contains("IndexSearch"), "{text}");
    }
}
