//! Durable sagas: operations longer than one transaction, journaled in the
//! metadata store so that any process's
//! [`Coordinator::recover`](crate::Coordinator::recover) finishes them —
//! forward, or backward through the compensations of the completed steps in
//! reverse order — after the caller died.
//!
//! A saga is a named sequence of steps, each either a **Tandem step** (a
//! [`Transaction`]) or a **caller action** with its compensation. A
//! [`SagaDefinition`] registered with the coordinator by name says how to run
//! each step from the saga's input and the outputs of the steps before it, so
//! a process that did not start a saga can drive it. See `docs/sagas.md`.
//!
//! What makes it exact:
//! - every step runs **at most once in effect**: a Tandem step commits under
//!   a deterministic idempotency key (`tandem:saga:<id>:<step>`), and a caller
//!   action is given a key ([`SagaContext::key`]) to make itself idempotent;
//! - a Tandem step's commit is **held**: the points it superseded or deleted
//!   stay in the index and its rows' previous versions are kept, so that a
//!   compensation restores every record exactly (content, metadata and
//!   vector, deleted records included) without re-embedding;
//! - the journal has a **lease and an owner token**, like an intent: a slow
//!   driver and recovery never both drive a saga (the journal's writes and a
//!   Tandem step's commit are fenced by the token).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::BoxError;
use crate::model::{IntentId, OwnerToken, RecordId, SagaId};
use crate::transaction::Transaction;

/// Where a saga is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaState {
    /// Going forward, step by step.
    Running,
    /// Going backward: compensating its completed steps in reverse order.
    Compensating,
    /// Every step completed (terminal).
    Done,
    /// Every completed step was compensated (terminal).
    Compensated,
    /// Stopped where an operator must look: a step past the pivot failed in
    /// a way no retry can help (the caller's code refused), so the saga can
    /// go neither forward nor back (terminal). A failing compensation never
    /// leads here: the saga stays `Compensating` and recovery retries it.
    Failed,
}

impl SagaState {
    /// Every state.
    pub const ALL: [SagaState; 5] = [
        SagaState::Running,
        SagaState::Compensating,
        SagaState::Done,
        SagaState::Compensated,
        SagaState::Failed,
    ];

    /// Whether the saga still has work to do (recovery may claim it).
    pub fn is_live(self) -> bool {
        matches!(self, SagaState::Running | SagaState::Compensating)
    }

    /// Stable name for storage.
    pub fn as_str(self) -> &'static str {
        match self {
            SagaState::Running => "running",
            SagaState::Compensating => "compensating",
            SagaState::Done => "done",
            SagaState::Compensated => "compensated",
            SagaState::Failed => "failed",
        }
    }

    /// Parses [`SagaState::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        SagaState::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl fmt::Display for SagaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a step is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// A [`Transaction`] committed by Tandem (held until the saga ends).
    Tandem,
    /// A caller-defined action with its compensation.
    Action,
}

/// Where a step is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// Journaled before it ran: it may or may not have taken effect.
    Started,
    /// It took effect; its output is journaled.
    Done,
    /// It was compensated (or never took effect).
    Compensated,
}

/// One step of a saga, as journaled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The step's name.
    pub name: String,
    /// Tandem step or caller action.
    pub kind: StepKind,
    /// Where it is.
    pub state: StepState,
    /// A pivot: once done, the saga can only go forward.
    #[serde(default)]
    pub pivot: bool,
    /// The idempotency key it runs under (deterministic).
    pub key: String,
    /// A Tandem step's held intent (its undo images and kept points).
    #[serde(default)]
    pub intent: Option<IntentId>,
    /// What it returned (a Tandem step: its
    /// [`TransactionReport`](crate::TransactionReport)).
    #[serde(default)]
    pub output: Option<Value>,
    /// Records its compensation left alone because they changed after it.
    #[serde(default)]
    pub conflicts: Vec<RecordId>,
}

/// A saga as its journal holds it: enough for any process to drive it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SagaRecord {
    /// Its id.
    pub id: SagaId,
    /// The name of its [`SagaDefinition`].
    pub name: String,
    /// Its input.
    pub input: Value,
    /// Where it is.
    pub state: SagaState,
    /// Its steps so far, in order.
    pub steps: Vec<StepRecord>,
    /// The token of the process driving it (fences the journal and the
    /// Tandem steps' commits).
    pub owner: OwnerToken,
    /// After this instant (ms since the Unix epoch) recovery may take it over.
    pub lease_deadline_ms: i64,
    /// How many times recovery has claimed it.
    pub attempts: u32,
    /// The last error met driving it.
    pub last_error: Option<String>,
    /// Creation instant (ms since the Unix epoch).
    pub created_ms: i64,
    /// Last journal write (ms since the Unix epoch).
    pub updated_ms: i64,
}

impl SagaRecord {
    /// The intents its Tandem steps hold.
    pub fn held_intents(&self) -> Vec<IntentId> {
        self.steps.iter().filter_map(|s| s.intent).collect()
    }

    /// Whether a pivot step is done (the saga can only go forward).
    pub fn past_pivot(&self) -> bool {
        self.steps
            .iter()
            .any(|s| s.pivot && s.state == StepState::Done)
    }
}

/// What a step (or its compensation) is given.
#[derive(Clone, Debug)]
pub struct SagaContext {
    /// The saga.
    pub saga: SagaId,
    /// The saga's input.
    pub input: Value,
    /// The step's position (0-based).
    pub step: usize,
    /// A key unique to this step of this saga, the same on every run: use it
    /// to make an action (and its compensation) idempotent.
    pub key: String,
    /// The outputs of the steps before this one, in order.
    pub outputs: Vec<Value>,
    /// For a compensation: the step's own output (`None` if it may not have
    /// run: a compensation must accept an action that never happened).
    pub output: Option<Value>,
}

/// Builds a Tandem step's transaction from the saga's context. Must be
/// deterministic: a process resuming the saga builds it again.
pub type TandemStepFn = Arc<dyn Fn(&SagaContext) -> Result<Transaction, BoxError> + Send + Sync>;

/// A caller action or compensation.
pub type ActionFn =
    Arc<dyn Fn(SagaContext) -> BoxFuture<'static, Result<Value, BoxError>> + Send + Sync>;

/// One step of a [`SagaDefinition`].
#[derive(Clone)]
pub struct StepDefinition {
    pub(crate) name: String,
    pub(crate) pivot: bool,
    pub(crate) body: StepBody,
}

#[derive(Clone)]
pub(crate) enum StepBody {
    Tandem(TandemStepFn),
    Action {
        run: ActionFn,
        compensate: Option<ActionFn>,
    },
}

impl StepDefinition {
    /// A Tandem step: the transaction `build` returns is committed, held
    /// until the saga ends, and compensated by restoring every record it
    /// touched.
    pub fn tandem(
        name: impl Into<String>,
        build: impl Fn(&SagaContext) -> Result<Transaction, BoxError> + Send + Sync + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            pivot: false,
            body: StepBody::Tandem(Arc::new(build)),
        }
    }

    /// A caller action and its compensation. Both get the step's
    /// [`SagaContext::key`]; both may run more than once (after a crash) and
    /// must make themselves idempotent with it.
    pub fn action<R, RF, C, CF>(name: impl Into<String>, run: R, compensate: C) -> Self
    where
        R: Fn(SagaContext) -> RF + Send + Sync + 'static,
        RF: std::future::Future<Output = Result<Value, BoxError>> + Send + 'static,
        C: Fn(SagaContext) -> CF + Send + Sync + 'static,
        CF: std::future::Future<Output = Result<(), BoxError>> + Send + 'static,
    {
        let compensate = Arc::new(compensate);
        Self {
            name: name.into(),
            pivot: false,
            body: StepBody::Action {
                run: Arc::new(move |ctx| Box::pin(run(ctx))),
                compensate: Some(Arc::new(move |ctx| {
                    let compensate = compensate.clone();
                    Box::pin(async move { compensate(ctx).await.map(|()| Value::Null) })
                })),
            },
        }
    }

    /// A caller action without compensation: only allowed as a pivot or
    /// after one (nothing before it can be undone once it ran).
    pub fn irreversible<R, RF>(name: impl Into<String>, run: R) -> Self
    where
        R: Fn(SagaContext) -> RF + Send + Sync + 'static,
        RF: std::future::Future<Output = Result<Value, BoxError>> + Send + 'static,
    {
        Self {
            name: name.into(),
            pivot: true,
            body: StepBody::Action {
                run: Arc::new(move |ctx| Box::pin(run(ctx))),
                compensate: None,
            },
        }
    }

    /// Makes it the saga's pivot: once it is done, the saga only goes
    /// forward (a later failure is retried, never compensated).
    pub fn pivot(mut self) -> Self {
        self.pivot = true;
        self
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn kind(&self) -> StepKind {
        match self.body {
            StepBody::Tandem(_) => StepKind::Tandem,
            StepBody::Action { .. } => StepKind::Action,
        }
    }
}

/// What recovery does with a saga whose driver died.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Resume {
    /// Finish it: run the remaining steps (compensating if one fails before
    /// the pivot).
    #[default]
    Forward,
    /// Undo it: compensate its completed steps — for sagas whose steps cannot
    /// be rebuilt by another process (e.g. an ingest of a file), unless every
    /// step already completed.
    Backward,
}

/// A named saga: its steps and what recovery does with it. Register it with
/// [`Coordinator::register_saga`](crate::Coordinator::register_saga) in every
/// process that may start or recover it.
#[derive(Clone)]
pub struct SagaDefinition {
    pub(crate) name: String,
    pub(crate) steps: Vec<StepDefinition>,
    pub(crate) resume: Resume,
    pub(crate) dynamic: bool,
}

impl fmt::Debug for SagaDefinition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SagaDefinition")
            .field("name", &self.name)
            .field(
                "steps",
                &self
                    .steps
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("resume", &self.resume)
            .field("dynamic", &self.dynamic)
            .finish()
    }
}

impl SagaDefinition {
    /// A saga of fixed steps (added with [`step`](Self::step)), resumed
    /// forward by recovery.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            steps: Vec::new(),
            resume: Resume::Forward,
            dynamic: false,
        }
    }

    /// A saga whose Tandem steps are given while it runs
    /// ([`SagaRun::step`](crate::SagaRun::step)): nobody else can rebuild
    /// them, so recovery compensates it unless it finished.
    pub fn dynamic(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            steps: Vec::new(),
            resume: Resume::Backward,
            dynamic: true,
        }
    }

    /// Adds a step.
    pub fn step(mut self, step: StepDefinition) -> Self {
        self.steps.push(step);
        self
    }

    /// What recovery does with it.
    pub fn resume(mut self, resume: Resume) -> Self {
        self.resume = resume;
        self
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Checks that it can be run: steps exist (unless dynamic), names are
    /// unique, and every step without compensation is a pivot or after one.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.name.trim().is_empty() {
            return Err("a saga needs a name".into());
        }
        if !self.dynamic && self.steps.is_empty() {
            return Err(format!("saga {:?} has no steps", self.name));
        }
        let mut seen = std::collections::HashSet::new();
        let mut pivoted = false;
        for s in &self.steps {
            if !seen.insert(s.name.as_str()) {
                return Err(format!("saga {:?}: step {:?} twice", self.name, s.name));
            }
            let undoable = !matches!(
                s.body,
                StepBody::Action {
                    compensate: None,
                    ..
                }
            );
            if !undoable && !s.pivot && !pivoted {
                return Err(format!(
                    "saga {:?}: step {:?} cannot be compensated, so it must be a pivot or come after one",
                    self.name, s.name
                ));
            }
            pivoted |= s.pivot;
        }
        Ok(())
    }
}

/// How a saga ended for the call that drove it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SagaOutcome {
    /// The saga.
    pub id: SagaId,
    /// Its state now.
    pub state: SagaState,
    /// Its steps' outputs, in order (`null` where a step has none).
    pub outputs: Vec<Value>,
    /// Why it did not finish, if it did not.
    pub error: Option<String>,
    /// Records compensations left alone because they changed after their step.
    pub conflicts: Vec<RecordId>,
}

/// Sagas per state.
pub type SagaCounts = BTreeMap<SagaState, u64>;

/// The idempotency key of step `step` of saga `saga`.
pub(crate) fn step_key(saga: SagaId, step: usize) -> String {
    format!("tandem:saga:{saga}:{step}")
}

/// The idempotency key of the compensation of step `step` of saga `saga`.
pub(crate) fn undo_key(saga: SagaId, step: usize) -> String {
    format!("tandem:saga:{saga}:{step}:undo")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip() {
        for s in SagaState::ALL {
            assert_eq!(SagaState::parse(s.as_str()), Some(s));
        }
        assert!(SagaState::Running.is_live() && SagaState::Compensating.is_live());
        assert!(!SagaState::Done.is_live() && !SagaState::Failed.is_live());
    }

    #[test]
    fn definitions_are_checked() {
        let t = || StepDefinition::tandem("t", |_| Ok(Transaction::new()));
        assert!(SagaDefinition::new("s").check().is_err());
        assert!(SagaDefinition::new("s").step(t()).check().is_ok());
        assert!(SagaDefinition::dynamic("d").check().is_ok());
        let twice = SagaDefinition::new("s").step(t()).step(t());
        assert!(twice.check().unwrap_err().contains("twice"));
        let bad = SagaDefinition::new("s")
            .step(StepDefinition::irreversible("send", |_| async { Ok(Value::Null) }).pivot_off())
            .step(t());
        assert!(bad.check().unwrap_err().contains("pivot"));
        let good = SagaDefinition::new("s")
            .step(t())
            .step(StepDefinition::irreversible("send", |_| async {
                Ok(Value::Null)
            }));
        assert!(good.check().is_ok());
    }

    impl StepDefinition {
        fn pivot_off(mut self) -> Self {
            self.pivot = false;
            self
        }
    }
}
