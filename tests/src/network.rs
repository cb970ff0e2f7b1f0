//! Network-level faults for the core fault suites: the coordinator talks to
//! [`QdrantVectorIndex`] over gRPC, and the faults are armed in the
//! [`QdrantDouble`] (the server), not in a port wrapper.
//!
//! [`network_exhaustive`] is the exhaustive single-fault enumeration of
//! [`harness`](crate::harness) with server-side faults: for every scenario, a
//! fault-free run lists the RPCs the call makes (from the double's call log);
//! then every (RPC, occurrence) × every [`NetFault`] is one case of
//! [`run_case_with`], whose installer arms the fault in the double.
//!
//! The double's fault plan is server-wide, and the harness keeps using the same
//! index after the faulty call (to check the invariants, then to recover). So
//! that a fault can never leak into those checks, the index is wrapped in
//! [`CallScoped`]: a pass-through that injects nothing, and disarms the
//! double's faults at the first index call made after the harness disabled its
//! fault controller (which it does the moment the faulty call returns).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tandem_adapters::qdrant::{QdrantConfig, QdrantVectorIndex};
use tandem_core::testkit::faults::FaultController;
use tandem_core::{
    CoordinatorConfig, Distance, IndexError, IndexQuery, MetadataRepo, Page, PlantedBug, Point,
    PointId, PointInfo, Scope, ScoredPoint, VectorIndex,
};
use tonic::Code;

use crate::harness::{CaseResult, DIM, Ran, Scenario, World, run_case_with};
use crate::qdrant_double::{CallRecord, Faults, QdrantDouble, RpcAction, RpcFault};

/// A fault the double injects into a window of calls to one RPC.
#[derive(Clone, Debug, PartialEq)]
pub struct NetFault {
    /// A short name, for reports.
    pub name: &'static str,
    /// What the server does.
    pub action: RpcAction,
    /// How many consecutive calls to the RPC it hits (`u64::MAX`: all).
    pub times: u64,
}

impl NetFault {
    fn new(name: &'static str, action: RpcAction, times: u64) -> Self {
        Self {
            name,
            action,
            times,
        }
    }

    /// The fault armed on call number `nth` (0-based) to `method`.
    pub fn rule(&self, method: &'static str, nth: u64) -> RpcFault {
        RpcFault {
            method,
            nth,
            times: self.times,
            action: self.action.clone(),
        }
    }
}

/// Every network fault the double supports, sized for a client whose request
/// timeout is `client_timeout`.
///
/// qdrant-client re-sends a points request once after Internal, Unavailable,
/// Cancelled or Unknown (a timeout is Cancelled, a dropped connection Unknown),
/// so those faults hit two calls: the caller sees the error, as it would when a
/// server stays down for a moment. `internal_after_apply_once` hits one call:
/// the client's re-send succeeds, so the write is delivered twice.
pub fn network_faults(client_timeout: Duration) -> Vec<NetFault> {
    vec![
        NetFault::new("unavailable", RpcAction::FailBefore(Code::Unavailable), 2),
        NetFault::new(
            "internal_after_apply",
            RpcAction::FailAfter(Code::Internal),
            2,
        ),
        NetFault::new(
            "internal_after_apply_once",
            RpcAction::FailAfter(Code::Internal),
            1,
        ),
        NetFault::new("hang", RpcAction::Hang, 2),
        NetFault::new(
            "drop_connection",
            RpcAction::DropConnection { applied: false },
            2,
        ),
        NetFault::new(
            "drop_connection_after_apply",
            RpcAction::DropConnection { applied: true },
            2,
        ),
        // Honoured: the retry-after fits in the call deadline.
        NetFault::new(
            "resource_exhausted",
            RpcAction::ResourceExhausted {
                retry_after_secs: 1,
            },
            1,
        ),
        // Longer than any call deadline: the coordinator gives up at once.
        NetFault::new(
            "resource_exhausted_long",
            RpcAction::ResourceExhausted {
                retry_after_secs: 600,
            },
            1,
        ),
        NetFault::new(
            "partial_batch",
            RpcAction::PartialThenFail {
                applied: 1,
                code: Code::Internal,
            },
            2,
        ),
        // A proxy answers Unavailable at once, and the request still reaches
        // the server 300 ms later — after the call retried, or gave up and
        // compensated. Two calls: the client's own re-send meets it too.
        NetFault::new(
            "unavailable_then_applied",
            RpcAction::FailThenApplyLater {
                code: Code::Unavailable,
                after: LATE_LANDING,
            },
            2,
        ),
        NetFault::new("delay", RpcAction::Delay(client_timeout / 2), 1),
        NetFault::new(
            "wait_timeout",
            RpcAction::ReplyStatus(qdrant_client::qdrant::UpdateStatus::WaitTimeout),
            1,
        ),
        // From here on, every call to the RPC fails for the rest of the call:
        // refused, ...
        NetFault::new(
            "unavailable_from_here",
            RpcAction::FailBefore(Code::Unavailable),
            u64::MAX,
        ),
        // ... never answered (the call deadline cuts a request in flight), ...
        NetFault::new("hang_from_here", RpcAction::Hang, u64::MAX),
        // ... or applied with the reply lost, ...
        NetFault::new(
            "drop_after_apply_from_here",
            RpcAction::DropConnection { applied: true },
            u64::MAX,
        ),
        // ... or refused while every request still lands later.
        NetFault::new(
            "unavailable_then_applied_from_here",
            RpcAction::FailThenApplyLater {
                code: Code::Unavailable,
                after: LATE_LANDING,
            },
            u64::MAX,
        ),
    ]
}

/// How long after its error answer a late-landing request is applied.
pub const LATE_LANDING: Duration = Duration::from_millis(300);

/// A fresh collection name (one per case, on a shared double).
pub fn fresh_collection() -> String {
    format!("net_{}", uuid::Uuid::new_v4().simple())
}

/// Connects a [`QdrantVectorIndex`] (dimension [`DIM`], cosine) to a fresh
/// collection at `url`, with the given client request timeout. Panics with a
/// message if it cannot (a test fixture).
///
/// The collection is created by a client with a generous timeout first:
/// creating a shard touches the disk and may outlast a short request timeout
/// on a busy machine, which is not what the suites test.
pub async fn connect_index(url: &str, client_timeout: Duration) -> QdrantVectorIndex {
    let collection = fresh_collection();
    let connect = |timeout: Duration| {
        let mut config = QdrantConfig::new(url, collection.as_str(), DIM, Distance::Cosine)
            .with_timeout(timeout);
        config.connect_timeout = timeout;
        QdrantVectorIndex::connect(config)
    };
    connect(SETUP_TIMEOUT).await.unwrap_or_else(|e| {
        panic!("cannot create a collection on the Qdrant server at {url}: {e}")
    });
    connect(client_timeout)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the Qdrant server at {url}: {e}"))
}

/// The request timeout of set-up calls (creating a collection).
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct GateState {
    /// The harness's controller while a faulty call runs.
    armed: Option<FaultController>,
    /// The double's call log of the faulty call, once it is over.
    window: Option<Vec<CallRecord>>,
}

/// Scopes the double's faults to one faulty call (see the module docs).
#[derive(Clone, Debug)]
pub struct Gate {
    faults: Faults,
    state: Arc<Mutex<GateState>>,
}

impl Gate {
    fn new(faults: Faults) -> Self {
        Self {
            faults,
            state: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Arms `fault` (if any) in the double for the faulty call that the
    /// harness is about to run with `ctl` enabled. Empties the double's call
    /// log, so that the window holds exactly the faulty call's RPCs.
    pub fn open(&self, ctl: &FaultController, fault: Option<RpcFault>) {
        let mut state = self.lock();
        assert!(ctl.is_enabled(), "the faulty call runs with faults enabled");
        self.faults.clear();
        self.faults.clear_calls();
        if let Some(fault) = fault {
            self.faults.add(fault);
        }
        state.armed = Some(ctl.clone());
        state.window = None;
    }

    /// Closes the window if the faulty call is over (the harness disabled its
    /// controller): disarms the double, keeps the call log of the window, and
    /// waits until every request the double answered but still delivers has
    /// landed — so that the harness's checks see what a late landing did.
    async fn check(&self) {
        let closed = {
            let mut state = self.lock();
            let over = state.armed.as_ref().is_some_and(|ctl| !ctl.is_enabled());
            if over {
                self.close_locked(&mut state);
            }
            over
        };
        if closed {
            self.faults.late_landed().await;
        }
    }

    fn close_locked(&self, state: &mut GateState) {
        self.faults.clear();
        state.window = Some(self.faults.calls());
        state.armed = None;
    }

    /// The RPCs the faulty call made (closing the window now if no index call
    /// closed it yet).
    pub fn window(&self) -> Vec<CallRecord> {
        let mut state = self.lock();
        if state.armed.is_some() {
            self.close_locked(&mut state);
        }
        state.window.clone().unwrap_or_default()
    }
}

/// A pass-through [`VectorIndex`] that injects nothing; it only disarms the
/// double's faults once the faulty call is over (see the module docs).
#[derive(Debug)]
pub struct CallScoped<V> {
    inner: V,
    gate: Gate,
}

impl<V> CallScoped<V> {
    /// Wraps `inner`, whose server's faults are `faults`.
    pub fn new(inner: V, faults: Faults) -> Self {
        Self {
            inner,
            gate: Gate::new(faults),
        }
    }

    /// The gate (cheap to clone).
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// The wrapped index.
    pub fn inner(&self) -> &V {
        &self.inner
    }
}

#[async_trait]
impl<V: VectorIndex> VectorIndex for CallScoped<V> {
    fn dimension(&self) -> usize {
        self.inner.dimension()
    }

    fn distance(&self) -> Distance {
        self.inner.distance()
    }

    async fn upsert(&self, points: &[Point]) -> Result<(), IndexError> {
        self.gate.check().await;
        self.inner.upsert(points).await
    }

    async fn delete(&self, ids: &[PointId]) -> Result<(), IndexError> {
        self.gate.check().await;
        self.inner.delete(ids).await
    }

    async fn retrieve(&self, ids: &[PointId]) -> Result<Vec<PointInfo>, IndexError> {
        self.gate.check().await;
        self.inner.retrieve(ids).await
    }

    async fn search(&self, query: &IndexQuery) -> Result<Vec<ScoredPoint>, IndexError> {
        self.gate.check().await;
        self.inner.search(query).await
    }

    async fn count(&self, scope: Option<&Scope>) -> Result<u64, IndexError> {
        self.gate.check().await;
        self.inner.count(scope).await
    }

    async fn scroll(
        &self,
        scope: Option<&Scope>,
        offset: Option<PointId>,
        limit: usize,
    ) -> Result<Page<PointInfo, PointId>, IndexError> {
        self.gate.check().await;
        self.inner.scroll(scope, offset, limit).await
    }
}

/// The RPCs a call made, each with its occurrence among calls to the same RPC.
pub fn rpc_occurrences(window: &[CallRecord]) -> Vec<(&'static str, u64)> {
    let mut seen: BTreeMap<&'static str, u64> = BTreeMap::new();
    window
        .iter()
        .map(|c| {
            let n = seen.entry(c.method).or_default();
            let occurrence = *n;
            *n += 1;
            (c.method, occurrence)
        })
        .collect()
}

/// One case of a network exhaustive run.
#[derive(Clone, Debug)]
pub struct NetCase {
    /// The operation.
    pub scenario: Scenario,
    /// The RPC the fault was aimed at and its occurrence (None: fault-free).
    pub rpc: Option<(&'static str, u64)>,
    /// The fault's name (`"none"` for the fault-free run).
    pub fault: &'static str,
    /// How the call ended.
    pub ran: Ran,
}

/// What a network exhaustive run found.
#[derive(Debug, Default)]
pub struct NetworkSummary {
    /// Cases run (fault-free baselines included).
    pub cases: usize,
    /// Every case, in the order run.
    pub runs: Vec<NetCase>,
    /// The RPCs each scenario's fault-free call made.
    pub rpcs: BTreeMap<String, Vec<String>>,
    /// Cases per scenario.
    pub per_scenario: BTreeMap<String, usize>,
    /// How the calls ended, by kind.
    pub outcomes: BTreeMap<String, usize>,
    /// How the calls ended, per fault: fault name → outcome kind → cases.
    pub per_fault: BTreeMap<String, BTreeMap<String, usize>>,
    /// RPCs the faulty calls made, per fault (retries and re-sends included).
    pub rpcs_per_fault: BTreeMap<String, usize>,
    /// Cases whose fault never hit a call of the faulty call.
    pub unfired: Vec<String>,
    /// The cases that broke an invariant, with their description.
    pub failures: Vec<(String, CaseResult)>,
    /// Wall time of the whole run.
    pub elapsed: Duration,
}

/// The kind of a call's ending: `ok`, `not_applied`, `unknown` or `crashed`.
pub fn outcome_kind(ran: &Ran) -> &'static str {
    match ran {
        Ran::Ok => "ok",
        Ran::NotApplied(_) => "not_applied",
        Ran::Unknown(_) => "unknown",
        Ran::Crashed => "crashed",
    }
}

/// One case: a fresh collection on `double`, a fresh metadata repo from
/// `make_repo`, `fault` armed in the double for the faulty call. Returns the
/// case and the RPCs the faulty call made.
pub async fn run_network_case<M, RF, RFut>(
    double: &QdrantDouble,
    make_repo: &RF,
    config: &CoordinatorConfig,
    client_timeout: Duration,
    scenario: Scenario,
    fault: Option<RpcFault>,
    bug: Option<PlantedBug>,
) -> (CaseResult, Vec<CallRecord>)
where
    M: MetadataRepo + 'static,
    RF: Fn() -> RFut,
    RFut: Future<Output = M>,
{
    let url = double.url();
    let faults = double.faults().clone();
    // The case's index, kept to drop its collection afterwards.
    let made: Mutex<Option<QdrantVectorIndex>> = Mutex::new(None);
    let (url, faults, made_ref) = (&url, &faults, &made);
    let make = move || async move {
        let index = connect_index(url, client_timeout).await;
        *made_ref.lock().unwrap_or_else(PoisonError::into_inner) = Some(index.clone());
        (make_repo().await, CallScoped::new(index, faults.clone()))
    };
    let gate: Mutex<Option<Gate>> = Mutex::new(None);
    let (result, _) = run_case_with(
        &make,
        config,
        scenario,
        |world: &World<M, CallScoped<QdrantVectorIndex>>| {
            world.index.gate().open(&world.ctl, fault);
            *gate.lock().unwrap_or_else(PoisonError::into_inner) = Some(world.index.gate().clone());
        },
        bug,
        None,
    )
    .await;
    let window = gate
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
        .map(|g| g.window())
        .unwrap_or_default();
    double.faults().clear();
    if let Some(index) = made.into_inner().unwrap_or_else(PoisonError::into_inner) {
        // Keeps the double small; a failure here only leaves a collection behind.
        let _ = index.delete_collection().await;
    }
    (result, window)
}

/// Every scenario × every RPC its call makes × every fault of `faults`, with
/// faults armed in `double`; each case on a fresh collection and a fresh repo.
/// `bug` plants a deliberate protocol bug in every coordinator (to show that
/// the suite catches it).
pub async fn network_exhaustive<M, RF, RFut>(
    double: &QdrantDouble,
    make_repo: RF,
    config: CoordinatorConfig,
    client_timeout: Duration,
    scenarios: &[Scenario],
    faults: &[NetFault],
    bug: Option<PlantedBug>,
) -> NetworkSummary
where
    M: MetadataRepo + 'static,
    RF: Fn() -> RFut,
    RFut: Future<Output = M>,
{
    let started = Instant::now();
    let mut summary = NetworkSummary::default();
    let record = |summary: &mut NetworkSummary,
                  what: String,
                  rpc: Option<(&'static str, u64)>,
                  fault: &'static str,
                  result: CaseResult| {
        summary.cases += 1;
        summary.runs.push(NetCase {
            scenario: result.scenario,
            rpc,
            fault,
            ran: result.ran.clone(),
        });
        *summary
            .per_scenario
            .entry(format!("{:?}", result.scenario))
            .or_default() += 1;
        let kind = outcome_kind(&result.ran);
        *summary.outcomes.entry(kind.into()).or_default() += 1;
        *summary
            .per_fault
            .entry(fault.into())
            .or_default()
            .entry(kind.into())
            .or_default() += 1;
        if result.violation.is_some() {
            summary.failures.push((what, result));
        }
    };
    for &scenario in scenarios {
        let (base, window) = run_network_case(
            double,
            &make_repo,
            &config,
            client_timeout,
            scenario,
            None,
            bug,
        )
        .await;
        if bug.is_none() {
            assert_eq!(
                base.ran,
                Ran::Ok,
                "{scenario:?} must succeed without faults"
            );
        }
        let rpcs = rpc_occurrences(&window);
        summary.rpcs.insert(
            format!("{scenario:?}"),
            rpcs.iter().map(|(m, n)| format!("{m}#{n}")).collect(),
        );
        *summary.rpcs_per_fault.entry("none".into()).or_default() += window.len();
        record(
            &mut summary,
            format!("{scenario:?} fault-free"),
            None,
            "none",
            base,
        );
        for &(method, occurrence) in &rpcs {
            for fault in faults {
                let what = format!("{scenario:?} {method}#{occurrence} {}", fault.name);
                let rule = fault.rule(method, occurrence);
                let (result, window) = run_network_case(
                    double,
                    &make_repo,
                    &config,
                    client_timeout,
                    scenario,
                    Some(rule),
                    bug,
                )
                .await;
                if !window.iter().any(|c| c.fault.is_some()) {
                    summary.unfired.push(what.clone());
                }
                *summary.rpcs_per_fault.entry(fault.name.into()).or_default() += window.len();
                record(
                    &mut summary,
                    what,
                    Some((method, occurrence)),
                    fault.name,
                    result,
                );
            }
        }
    }
    summary.elapsed = started.elapsed();
    summary
}
