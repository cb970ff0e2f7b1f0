//! Fault injection for the [`QdrantDouble`](super::QdrantDouble): a plan of
//! per-RPC faults that the test controls while the server runs, and a log of
//! every call the server received.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use qdrant_client::qdrant::UpdateStatus;
use tonic::Code;

/// What the server does with a call a fault applies to.
#[derive(Clone, Debug, PartialEq)]
pub enum RpcAction {
    /// Answer `code` without applying anything.
    FailBefore(Code),
    /// Apply the request, then answer `code` (the write happened, the reply says
    /// it did not).
    FailAfter(Code),
    /// Wait, then handle the call normally.
    Delay(Duration),
    /// Never answer (until the client gives up or the server stops). Nothing is
    /// applied.
    Hang,
    /// Close the call's TCP connection without answering; `applied` says whether
    /// the request is applied first. Every call on that connection fails.
    DropConnection {
        /// Apply the request before closing the connection.
        applied: bool,
    },
    /// Answer `ResourceExhausted` with the gRPC metadata `retry-after: <seconds>`
    /// (what Qdrant sends when rate limited, and what `qdrant-client` parses into
    /// `QdrantError::ResourceExhaustedError { retry_after_seconds }`). Nothing is
    /// applied.
    ResourceExhausted {
        /// Whole seconds, as Qdrant sends them.
        retry_after_secs: u64,
    },
    /// Apply only the first `applied` items of the batch (points of an `Upsert`,
    /// ids of a `Delete` by ids), then answer `code`: Qdrant batches are not
    /// atomic. For any other RPC nothing is applied.
    PartialThenFail {
        /// How many items are applied.
        applied: usize,
        /// The error answered.
        code: Code,
    },
    /// Answer `code` at once, and apply the request `after` that, on its own —
    /// what a proxy or load balancer does that answers `Unavailable` while the
    /// request is still on its way to the server. Only points writes
    /// (`Points/Upsert`, `Points/Delete`) are applied later; any other RPC is
    /// not applied. [`Faults::late_landed`] waits until every such request has
    /// been applied.
    FailThenApplyLater {
        /// The error answered at once.
        code: Code,
        /// How long after the answer the request is applied.
        after: Duration,
    },
    /// Apply the request, then answer OK with this update status (e.g.
    /// `WaitTimeout`, what Qdrant answers when `wait=true` outlasts the server
    /// timeout, or `Acknowledged`). Only for RPCs that answer an update result
    /// (points writes); other RPCs are handled normally.
    ReplyStatus(UpdateStatus),
}

/// A fault: `action` for the calls to `method` number `nth` to `nth + times - 1`
/// (counted from 0, among the calls to `method` the server receives after the
/// fault was added).
///
/// `method` is a gRPC method name, matched against the called RPC's full name
/// `Service/Method` (e.g. `"Points/Upsert"`, `"Collections/Get"`,
/// `"Qdrant/HealthCheck"`), or against its method part alone (`"Upsert"`; note
/// that `"Get"` then matches both `Points/Get` and `Collections/Get`), or `"*"`
/// for every RPC.
#[derive(Clone, Debug, PartialEq)]
pub struct RpcFault {
    /// Which RPC.
    pub method: &'static str,
    /// The first matching call (0-based) it applies to.
    pub nth: u64,
    /// How many consecutive matching calls it applies to (`u64::MAX`: all).
    pub times: u64,
    /// What the server does.
    pub action: RpcAction,
}

impl RpcFault {
    /// `action` for the next call to `method` only.
    pub fn once(method: &'static str, action: RpcAction) -> Self {
        Self {
            method,
            nth: 0,
            times: 1,
            action,
        }
    }

    /// `action` for every call to `method` from now on.
    pub fn always(method: &'static str, action: RpcAction) -> Self {
        Self {
            method,
            nth: 0,
            times: u64::MAX,
            action,
        }
    }

    /// Lets the first `n` matching calls through unharmed.
    pub fn after(mut self, n: u64) -> Self {
        self.nth = n;
        self
    }

    /// Applies to `n` consecutive matching calls.
    pub fn times(mut self, n: u64) -> Self {
        self.times = n;
        self
    }

    fn matches(&self, rpc: &str) -> bool {
        self.method == "*"
            || self.method == rpc
            || rpc.split_once('/').is_some_and(|(_, m)| m == self.method)
    }
}

/// How a logged call ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallOutcome {
    /// Still running (or hanging).
    Pending,
    /// Answered OK.
    Ok,
    /// Answered this error code.
    Err(Code),
    /// The call's future was dropped before answering (the client went away,
    /// the connection was dropped, or the server stopped).
    Abandoned,
}

/// One call the server received.
#[derive(Clone, Debug, PartialEq)]
pub struct CallRecord {
    /// The RPC's full name, `Service/Method`.
    pub method: &'static str,
    /// The fault applied to it, if any.
    pub fault: Option<RpcAction>,
    /// How it ended.
    pub outcome: CallOutcome,
}

#[derive(Debug)]
struct ArmedFault {
    fault: RpcFault,
    /// Matching calls seen since it was added.
    seen: u64,
}

#[derive(Debug, Default)]
struct State {
    faults: Vec<ArmedFault>,
    calls: Vec<CallRecord>,
    /// Requests answered already and still to be applied.
    late_pending: usize,
}

/// The test's handle on the server's fault plan and call log (cheap to clone;
/// every clone controls the same server).
#[derive(Clone, Debug, Default)]
pub struct Faults {
    state: Arc<Mutex<State>>,
    landed: Arc<tokio::sync::Notify>,
}

/// A request of [`RpcAction::FailThenApplyLater`] not applied yet; dropping
/// it marks it applied.
#[derive(Debug)]
pub(crate) struct LateLanding {
    faults: Faults,
}

impl Drop for LateLanding {
    fn drop(&mut self) {
        let mut state = self.faults.lock();
        state.late_pending = state.late_pending.saturating_sub(1);
        drop(state);
        self.faults.landed.notify_waiters();
    }
}

impl Faults {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Arms a fault. Faults are consulted in the order they were added; every
    /// fault matching a call counts it, and the first whose window contains the
    /// call applies.
    pub fn add(&self, fault: RpcFault) -> &Self {
        self.lock().faults.push(ArmedFault { fault, seen: 0 });
        self
    }

    /// Disarms every fault (the call log is kept).
    pub fn clear(&self) {
        self.lock().faults.clear();
    }

    /// Whether every armed fault has been used up (`times` calls seen past `nth`).
    pub fn all_fired(&self) -> bool {
        self.lock()
            .faults
            .iter()
            .all(|f| f.seen >= f.fault.nth.saturating_add(f.fault.times))
    }

    /// Every call received so far, in arrival order.
    pub fn calls(&self) -> Vec<CallRecord> {
        self.lock().calls.clone()
    }

    /// The calls to `method` (matched like [`RpcFault::method`]) received so far.
    pub fn calls_to(&self, method: &'static str) -> Vec<CallRecord> {
        let probe = RpcFault::once(method, RpcAction::Hang);
        self.lock()
            .calls
            .iter()
            .filter(|c| probe.matches(c.method))
            .cloned()
            .collect()
    }

    /// Waits until every request that [`RpcAction::FailThenApplyLater`]
    /// answered has been applied (at once if none is pending).
    pub async fn late_landed(&self) {
        loop {
            let landed = self.landed.notified();
            tokio::pin!(landed);
            // Registered before the check, so a landing in between is not missed.
            landed.as_mut().enable();
            if self.lock().late_pending == 0 {
                return;
            }
            landed.await;
        }
    }

    /// Counts a request that will be applied later.
    pub(crate) fn late_landing(&self) -> LateLanding {
        self.lock().late_pending += 1;
        LateLanding {
            faults: self.clone(),
        }
    }

    /// Empties the call log.
    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// Logs a call that no fault applies to.
    pub(crate) fn log(&self, method: &'static str, outcome: CallOutcome) {
        self.lock().calls.push(CallRecord {
            method,
            fault: None,
            outcome,
        });
    }

    /// Logs a call and decides its fault.
    pub(crate) fn begin(&self, method: &'static str) -> CallTicket {
        let mut state = self.lock();
        let mut chosen = None;
        for armed in &mut state.faults {
            if !armed.fault.matches(method) {
                continue;
            }
            let index = armed.seen;
            armed.seen = armed.seen.saturating_add(1);
            let window_end = armed.fault.nth.saturating_add(armed.fault.times);
            if chosen.is_none() && index >= armed.fault.nth && index < window_end {
                chosen = Some(armed.fault.action.clone());
            }
        }
        state.calls.push(CallRecord {
            method,
            fault: chosen.clone(),
            outcome: CallOutcome::Pending,
        });
        CallTicket {
            faults: self.clone(),
            index: state.calls.len() - 1,
            action: chosen,
            finished: false,
        }
    }
}

/// A logged call in progress; records `Abandoned` if dropped unfinished.
#[derive(Debug)]
pub(crate) struct CallTicket {
    faults: Faults,
    index: usize,
    pub(crate) action: Option<RpcAction>,
    finished: bool,
}

impl CallTicket {
    pub(crate) fn finish(mut self, outcome: CallOutcome) {
        self.set(outcome);
        self.finished = true;
    }

    fn set(&self, outcome: CallOutcome) {
        if let Some(call) = self.faults.lock().calls.get_mut(self.index) {
            call.outcome = outcome;
        }
    }
}

impl Drop for CallTicket {
    fn drop(&mut self) {
        if !self.finished {
            self.set(CallOutcome::Abandoned);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_applies_to_its_window_of_matching_calls() {
        let faults = Faults::default();
        faults.add(RpcFault::once("Upsert", RpcAction::Hang).after(1).times(2));
        let actions: Vec<_> = (0..4)
            .map(|_| {
                let t = faults.begin("Points/Upsert");
                let _ = faults.begin("Points/Get");
                t.action.clone()
            })
            .collect();
        assert_eq!(
            actions,
            vec![None, Some(RpcAction::Hang), Some(RpcAction::Hang), None]
        );
        assert!(faults.all_fired());
        assert_eq!(faults.calls_to("Points/Upsert").len(), 4);
        assert_eq!(faults.calls_to("Get").len(), 4);
        assert_eq!(faults.calls().len(), 8);
    }

    #[test]
    fn the_first_matching_fault_wins_and_dropped_calls_are_abandoned() {
        let faults = Faults::default();
        faults
            .add(RpcFault::once("*", RpcAction::FailBefore(Code::Internal)))
            .add(RpcFault::always(
                "Collections/Get",
                RpcAction::FailBefore(Code::Unavailable),
            ));
        let first = faults.begin("Collections/Get");
        assert_eq!(first.action, Some(RpcAction::FailBefore(Code::Internal)));
        first.finish(CallOutcome::Err(Code::Internal));
        let second = faults.begin("Collections/Get");
        assert_eq!(
            second.action,
            Some(RpcAction::FailBefore(Code::Unavailable))
        );
        drop(second);
        let outcomes: Vec<_> = faults.calls().into_iter().map(|c| c.outcome).collect();
        assert_eq!(
            outcomes,
            vec![CallOutcome::Err(Code::Internal), CallOutcome::Abandoned]
        );
        faults.clear();
        assert_eq!(faults.begin("Collections/Get").action, None);
    }
}
