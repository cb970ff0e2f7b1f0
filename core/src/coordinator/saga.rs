//! Driving sagas: forward step by step, backward through compensations, and
//! recovery of sagas whose driver died. See `crate::saga` for the model and
//! `docs/protocol.md` (*Sagas*) for why each rule is there.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;
use tokio::time::Instant;
use tracing::{Instrument, info, info_span, warn};

use super::{Bug, Coordinator, RecoveryReport, WriteOptions};
use crate::error::{CoordinatorError, MetadataError, Outcome};
use crate::model::{IdempotencyRecord, Intent, OwnerToken, RecordId, SagaFence, SagaId, UndoImage};
use crate::ports::{MetadataRepo, VectorIndex};
use crate::saga::{
    Resume, SagaContext, SagaCounts, SagaDefinition, SagaOutcome, SagaRecord, SagaState, StepBody,
    StepDefinition, StepKind, StepRecord, StepState, step_key, undo_key,
};
use crate::transaction::{Transaction, TransactionReport};

impl<M: MetadataRepo, V: VectorIndex> Coordinator<M, V> {
    /// Registers a saga definition under its name, so that this coordinator
    /// can start it and recover it. Every process that may recover a saga
    /// must register its definition; recovery leaves sagas it has no
    /// definition for to the processes that do.
    pub fn register_saga(&self, definition: SagaDefinition) -> Result<(), CoordinatorError> {
        definition.check().map_err(CoordinatorError::Config)?;
        self.sagas
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(definition.name.clone(), Arc::new(definition));
        Ok(())
    }

    fn definition(&self, name: &str) -> Option<Arc<SagaDefinition>> {
        self.sagas
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    /// Starts the registered saga `name` with `input` and drives it to its
    /// end: every step forward; if a step fails before the pivot, every
    /// completed step is compensated in reverse order. Returns how it ended:
    /// `Done`, `Compensated`, or `Failed` (a step past the pivot failed in a
    /// way no retry can help).
    ///
    /// An error means the saga did not end here and stays journaled, for
    /// recovery to finish after its lease:
    /// [`CoordinatorError::SagaUnfinished`] (a step's outcome is unknown, a
    /// step past the pivot failed retryably, a compensation failed, or the
    /// journal was unreachable; its `source` says which) or
    /// [`CoordinatorError::SagaFenced`] (another process took it over).
    pub async fn run_saga(
        &self,
        name: &str,
        input: Value,
    ) -> Result<SagaOutcome, CoordinatorError> {
        let def = self
            .definition(name)
            .filter(|d| !d.dynamic)
            .ok_or_else(|| CoordinatorError::UnknownSaga(name.to_owned()))?;
        let mut driver = self.create_saga(def, input).await?;
        let id = driver.saga.id;
        let span = info_span!("tandem.saga", saga = %id, name);
        async move {
            driver.forward().await.map_err(|e| unfinished(id, e))?;
            Ok(driver.outcome())
        }
        .instrument(span)
        .await
    }

    /// Starts the registered *dynamic* saga `name` ([`SagaDefinition::dynamic`]):
    /// its Tandem steps are given one by one through the returned
    /// [`SagaRun`], which must end with [`SagaRun::finish`] or
    /// [`SagaRun::abort`]. If the caller dies first, recovery compensates it.
    pub async fn begin_saga(
        &self,
        name: &str,
        input: Value,
    ) -> Result<SagaRun<'_, M, V>, CoordinatorError> {
        let def = self
            .definition(name)
            .filter(|d| d.dynamic)
            .ok_or_else(|| CoordinatorError::UnknownSaga(name.to_owned()))?;
        let driver = self.create_saga(def, input).await?;
        Ok(SagaRun { driver })
    }

    /// One saga's journal entry.
    pub async fn saga(&self, id: SagaId) -> Result<Option<SagaRecord>, CoordinatorError> {
        let deadline = Instant::now() + self.config.call_deadline;
        self.metadata_call("metadata.saga_get", deadline, || self.repo.saga_get(id))
            .await
    }

    /// Sagas, optionally in one state, newest first.
    pub async fn sagas(
        &self,
        state: Option<SagaState>,
        limit: usize,
    ) -> Result<Vec<SagaRecord>, CoordinatorError> {
        let deadline = Instant::now() + self.config.call_deadline;
        self.metadata_call("metadata.saga_list", deadline, || {
            self.repo.saga_list(state, limit)
        })
        .await
    }

    /// Number of sagas per state.
    pub async fn saga_counts(&self) -> Result<SagaCounts, CoordinatorError> {
        let deadline = Instant::now() + self.config.call_deadline;
        self.metadata_call("metadata.saga_counts", deadline, || self.repo.saga_counts())
            .await
    }

    /// Aborts a live saga now: takes it over from whoever drives it (their
    /// next journal write or step commit is fenced) and compensates its
    /// completed steps in reverse order. Refused for a saga past its pivot
    /// (it can only go forward) or already ended.
    pub async fn abort_saga(&self, id: SagaId) -> Result<SagaOutcome, CoordinatorError> {
        let deadline = Instant::now() + self.config.call_deadline;
        let Some(current) = self
            .metadata_call("metadata.saga_get", deadline, || self.repo.saga_get(id))
            .await?
        else {
            return Err(CoordinatorError::SagaNotFound(id));
        };
        if !current.state.is_live() {
            return Err(CoordinatorError::CannotAbort(id, "it has ended"));
        }
        if current.past_pivot() {
            return Err(CoordinatorError::CannotAbort(
                id,
                "it is past its pivot step and can only go forward",
            ));
        }
        let owner = OwnerToken::new_random();
        let lease = self.clock.now_ms().saturating_add(self.lease_ms());
        let Some(saga) = self
            .metadata_call("metadata.saga_take", deadline, || {
                self.repo.saga_take(id, owner, lease)
            })
            .await?
        else {
            return Err(CoordinatorError::CannotAbort(id, "it has ended"));
        };
        let def = self.definition(&saga.name);
        let mut driver = SagaDriver { c: self, def, saga };
        if driver.saga.past_pivot() {
            // The pivot completed between the look and the take: give the
            // saga back to recovery, which finishes it.
            driver.saga.lease_deadline_ms = self.clock.now_ms();
            driver.save_raw().await?;
            return Err(CoordinatorError::CannotAbort(
                id,
                "it is past its pivot step and can only go forward",
            ));
        }
        let span = info_span!("tandem.saga.abort", saga = %id);
        async move {
            driver
                .backward("aborted by request".to_owned())
                .await
                .map_err(|e| unfinished(id, e))?;
            Ok(driver.outcome())
        }
        .instrument(span)
        .await
    }

    async fn create_saga(
        &self,
        def: Arc<SagaDefinition>,
        input: Value,
    ) -> Result<SagaDriver<'_, M, V>, CoordinatorError> {
        let now = self.clock.now_ms();
        let saga = SagaRecord {
            id: SagaId::new_v7(),
            name: def.name.clone(),
            input,
            state: SagaState::Running,
            steps: Vec::new(),
            owner: OwnerToken::new_random(),
            lease_deadline_ms: now.saturating_add(self.lease_ms()),
            attempts: 0,
            last_error: None,
            created_ms: now,
            updated_ms: now,
        };
        let deadline = Instant::now() + self.config.call_deadline;
        self.metadata_call("metadata.saga_save", deadline, || {
            self.repo.saga_save(&saga, None)
        })
        .await
        .map_err(|e| {
            // A journal entry that may exist (a lost reply, a call cut by the
            // deadline) is recovery's to drive.
            let maybe = match &e {
                CoordinatorError::Metadata(m) => m.outcome() == Outcome::Unknown,
                CoordinatorError::DeadlineExceeded(_) => true,
                other => other.outcome() == Outcome::Unknown,
            };
            if maybe { unfinished(saga.id, e) } else { e }
        })?;
        metrics::counter!("tandem_sagas_started_total").increment(1);
        info!(saga = %saga.id, name = %saga.name, "saga started");
        Ok(SagaDriver {
            c: self,
            def: Some(def),
            saga,
        })
    }

    /// Recovery of sagas: claims live sagas whose lease ended and drives each
    /// as its definition says — forward, or backward (a dynamic saga that
    /// did not finish). Sagas without a definition in this process are left
    /// for a process that has one.
    pub(super) async fn recover_sagas(&self, report: &mut RecoveryReport) {
        let batch = self.config.recovery_batch;
        loop {
            let now = self.clock.now_ms();
            let owner = OwnerToken::new_random();
            let lease = now.saturating_add(self.lease_ms());
            let deadline = Instant::now() + self.config.call_deadline;
            let claimed = if self.bug(Bug::ResumeSagaWithoutLease) {
                // The planted bug: drive every live saga, expired or not, without
                // taking it over.
                match self
                    .metadata_call("metadata.saga_list", deadline, || {
                        self.repo.saga_list(None, batch)
                    })
                    .await
                {
                    Ok(all) => all.into_iter().filter(|s| s.state.is_live()).collect(),
                    Err(e) => {
                        warn!(error = %e, "could not list sagas");
                        return;
                    }
                }
            } else {
                match self
                    .metadata_call("metadata.saga_claim", deadline, || {
                        self.repo.saga_claim(now, owner, lease, batch)
                    })
                    .await
                {
                    Ok(claimed) => claimed,
                    Err(e) => {
                        warn!(error = %e, "could not claim sagas; a later run retries");
                        report.failed += 1;
                        return;
                    }
                }
            };
            let n = claimed.len();
            report.sagas_claimed += n;
            for saga in claimed {
                self.recover_saga(saga, report).await;
            }
            if n < batch || self.bug(Bug::ResumeSagaWithoutLease) {
                break;
            }
        }
    }

    async fn recover_saga(&self, saga: SagaRecord, report: &mut RecoveryReport) {
        let id = saga.id;
        let def = self.definition(&saga.name);
        let mut driver = SagaDriver {
            c: self,
            def: def.clone(),
            saga,
        };
        let span = info_span!("tandem.saga.recover", saga = %id);
        let result = async {
            let Some(def) = def else {
                warn!(name = %driver.saga.name, "no definition of this saga is registered here; leaving it to a process that has one");
                driver.saga.last_error = Some(format!(
                    "no definition of saga {:?} is registered in the recovering process",
                    driver.saga.name
                ));
                driver.save_raw().await?;
                report.sagas_skipped += 1;
                return Ok(());
            };
            match driver.saga.state {
                SagaState::Compensating => {
                    driver.backward("resumed by recovery".into()).await?;
                }
                _ => {
                    // A static saga whose every step is done only needs finishing.
                    let all_done = !def.dynamic
                        && driver.saga.steps.len() == def.steps.len()
                        && driver.saga.steps.iter().all(|s| s.state == StepState::Done);
                    if def.resume == Resume::Backward && !driver.saga.past_pivot() && !all_done {
                        // Nobody else can rebuild its steps: undo what it did.
                        driver
                            .backward("its driver died; recovery compensates it".into())
                            .await?;
                    } else {
                        driver.forward().await?;
                    }
                }
            }
            Ok::<_, CoordinatorError>(())
        }
        .instrument(span)
        .await;
        match result {
            Ok(()) => match driver.saga.state {
                SagaState::Done => report.sagas_done += 1,
                SagaState::Compensated => report.sagas_compensated += 1,
                SagaState::Failed => report.sagas_failed += 1,
                _ => {}
            },
            Err(e) => {
                warn!(saga = %id, error = %e, "recovery of the saga failed; a later run retries it");
                report.failed += 1;
            }
        }
    }
}

/// A dynamic saga in progress ([`Coordinator::begin_saga`]): each
/// [`step`](Self::step) is a Tandem transaction, committed and held until the
/// saga ends. End it with [`finish`](Self::finish) or [`abort`](Self::abort);
/// if the process dies first, recovery compensates every step.
pub struct SagaRun<'c, M, V> {
    driver: SagaDriver<'c, M, V>,
}

impl<M, V> std::fmt::Debug for SagaRun<'_, M, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaRun")
            .field("saga", &self.driver.saga.id)
            .field("steps", &self.driver.saga.steps.len())
            .finish()
    }
}

impl<M: MetadataRepo, V: VectorIndex> SagaRun<'_, M, V> {
    /// The saga's id.
    pub fn id(&self) -> SagaId {
        self.driver.saga.id
    }

    /// Runs the next step: commits `tx` under the step's idempotency key,
    /// held until the saga ends. On an error that did not apply the step,
    /// the saga goes on only if the caller calls `step` again (a new step)
    /// or ends it.
    ///
    /// If the error left the step's outcome **unknown**, the step stays
    /// open: calling `step` again with the same name and the same
    /// transaction retries it under its key (answered from the key if its
    /// first attempt committed, committed now if not); any other step is
    /// refused until then, and so is [`finish`](Self::finish).
    /// [`abort`](Self::abort) settles it and compensates it if it applied.
    pub async fn step(
        &mut self,
        name: &str,
        tx: Transaction,
    ) -> Result<TransactionReport, CoordinatorError> {
        let index = match self.driver.saga.steps.last() {
            Some(open) if open.state == StepState::Started => {
                if open.name != name {
                    return Err(CoordinatorError::Config(format!(
                        "step {:?} of saga {} has an unknown outcome: retry it (the same \
                         name and transaction) or abort the saga before step {name:?}",
                        open.name, self.driver.saga.id
                    )));
                }
                self.driver.saga.steps.len() - 1
            }
            _ => self.driver.saga.steps.len(),
        };
        self.driver
            .start_step(index, name, StepKind::Tandem, false)
            .await?;
        match self.driver.tandem_step(index, tx).await {
            Ok(report) => Ok(report),
            Err(e) => {
                if e.outcome() == Outcome::NotApplied
                    && !matches!(e, CoordinatorError::SagaFenced(_))
                {
                    // It did not apply and never will (the key was not
                    // recorded): the step is as good as compensated.
                    self.driver.saga.steps[index].state = StepState::Compensated;
                    self.driver.saga.last_error = Some(e.to_string());
                    self.driver.save().await?;
                }
                Err(e)
            }
        }
    }

    /// Ends the saga: every step stands. Releases what the steps held (the
    /// superseded points are deleted).
    pub async fn finish(mut self) -> Result<SagaOutcome, CoordinatorError> {
        let id = self.driver.saga.id;
        self.driver.finish().await.map_err(|e| unfinished(id, e))?;
        Ok(self.driver.outcome())
    }

    /// Undoes the saga: compensates every step in reverse order.
    pub async fn abort(mut self, reason: &str) -> Result<SagaOutcome, CoordinatorError> {
        let id = self.driver.saga.id;
        self.driver
            .backward(reason.to_owned())
            .await
            .map_err(|e| unfinished(id, e))?;
        Ok(self.driver.outcome())
    }
}

/// The one driver of a saga: the journal entry it owns (by `saga.owner`)
/// and the definition that says how to run its steps.
struct SagaDriver<'c, M, V> {
    c: &'c Coordinator<M, V>,
    def: Option<Arc<SagaDefinition>>,
    saga: SagaRecord,
}

impl<M: MetadataRepo, V: VectorIndex> SagaDriver<'_, M, V> {
    fn fence(&self) -> SagaFence {
        SagaFence {
            saga: self.saga.id,
            owner: self.saga.owner,
        }
    }

    fn outcome(&self) -> SagaOutcome {
        SagaOutcome {
            id: self.saga.id,
            state: self.saga.state,
            outputs: self
                .saga
                .steps
                .iter()
                .map(|s| s.output.clone().unwrap_or(Value::Null))
                .collect(),
            error: self.saga.last_error.clone(),
            conflicts: self
                .saga
                .steps
                .iter()
                .flat_map(|s| s.conflicts.iter().copied())
                .collect(),
        }
    }

    /// Journals the saga as it is now, renewing the lease, fenced by its
    /// owner token. Returns the intents a terminal save released.
    async fn save(&mut self) -> Result<Vec<Intent>, CoordinatorError> {
        let now = self.c.clock.now_ms();
        self.saga.updated_ms = now;
        self.saga.lease_deadline_ms = now.saturating_add(self.c.lease_ms());
        self.save_raw().await
    }

    /// Journals the saga as it is now under a new owner token, fenced by the
    /// old one: from then on nothing fenced by the old token applies — a
    /// save, or the commit of a step still on its way from this driver. If
    /// the hand-over fails the driver keeps the old token (should the
    /// hand-over have applied unseen, its next save is fenced and recovery
    /// finishes the saga after the lease).
    async fn hand_over(&mut self) -> Result<(), CoordinatorError> {
        let old = self.saga.owner;
        self.saga.owner = OwnerToken::new_random();
        let now = self.c.clock.now_ms();
        self.saga.updated_ms = now;
        self.saga.lease_deadline_ms = now.saturating_add(self.c.lease_ms());
        match self.save_fenced(old).await {
            Ok(_) => Ok(()),
            Err(e) => {
                self.saga.owner = old;
                Err(e)
            }
        }
    }

    /// Runs a caller's action or compensation while keeping the saga's
    /// lease: every third of the lease the saga is journaled again (fenced
    /// by its owner token, which renews the lease), at the same time as the
    /// action goes on. So recovery never takes over a saga whose driver is
    /// alive merely because an action is slow — it would run the action a
    /// second time, or compensate it while the first run still acts.
    ///
    /// The driver stops holding the saga — and drops the action, which
    /// cancels it at its next await — when a renewal is fenced (the saga was
    /// taken over: [`CoordinatorError::SagaFenced`]), or when the lease runs
    /// out before a renewal succeeded (the metadata store stayed unreachable:
    /// the last renewal's error, else [`CoordinatorError::DeadlineExceeded`]).
    /// Past its lease the saga is recovery's; an action still running here
    /// then could act after recovery compensated it.
    async fn keep_lease<T>(
        &mut self,
        mut work: futures::future::BoxFuture<'static, T>,
    ) -> Result<T, CoordinatorError> {
        if self.c.bug(Bug::ActionWithoutHeartbeat) {
            return Ok(work.await);
        }
        let lease = self.c.config.lease;
        let period = lease / 3;
        // The step's `Started` save renewed the lease just before the action
        // began; count a third of it as spent, to stay on the safe side.
        let mut held_until = Instant::now() + lease - period;
        let mut last_error = None;
        let saga = self.saga.id;
        loop {
            let next = (Instant::now() + period).min(held_until);
            tokio::select! {
                out = &mut work => return Ok(out),
                () = tokio::time::sleep_until(next) => {}
            }
            if Instant::now() >= held_until {
                return Err(lapsed(last_error, lease));
            }
            let started = Instant::now();
            let renewal = self.save();
            tokio::pin!(renewal);
            tokio::select! {
                renewed = &mut renewal => match renewed {
                    Ok(_) => {
                        held_until = started + lease;
                        last_error = None;
                    }
                    Err(e @ CoordinatorError::SagaFenced(_)) => return Err(e),
                    Err(e) => {
                        warn!(saga = %saga, error = %e, "could not renew the saga's lease while an action runs");
                        last_error = Some(e);
                    }
                },
                out = &mut work => {
                    // The action ended first: its result stands unless the
                    // saga was taken over meanwhile (any other renewal error
                    // is for the next journal write to meet).
                    return match renewal.await {
                        Err(e @ CoordinatorError::SagaFenced(_)) => Err(e),
                        _ => Ok(out),
                    };
                }
                () = tokio::time::sleep_until(held_until) => {
                    return Err(lapsed(last_error, lease));
                }
            }
        }
    }

    /// Journals the saga exactly as it is (lease included).
    async fn save_raw(&mut self) -> Result<Vec<Intent>, CoordinatorError> {
        self.save_fenced(self.saga.owner).await
    }

    /// Journals the saga exactly as it is, fenced by `owner`.
    async fn save_fenced(&mut self, owner: OwnerToken) -> Result<Vec<Intent>, CoordinatorError> {
        let deadline = Instant::now() + self.c.config.call_deadline;
        let saga = &self.saga;
        let c = self.c;
        c.metadata_call("metadata.saga_save", deadline, || {
            c.repo.saga_save(saga, Some(owner))
        })
        .await
        .map_err(|e| match e {
            CoordinatorError::Metadata(MetadataError::SagaFenced { saga }) => {
                CoordinatorError::SagaFenced(saga)
            }
            e => e,
        })
    }

    fn context(&self, index: usize) -> SagaContext {
        SagaContext {
            saga: self.saga.id,
            input: self.saga.input.clone(),
            step: index,
            key: step_key(self.saga.id, index),
            outputs: self.saga.steps[..index.min(self.saga.steps.len())]
                .iter()
                .map(|s| s.output.clone().unwrap_or(Value::Null))
                .collect(),
            output: self.saga.steps.get(index).and_then(|s| s.output.clone()),
        }
    }

    /// Journals step `index` as started (before it runs), unless it already is.
    async fn start_step(
        &mut self,
        index: usize,
        name: &str,
        kind: StepKind,
        pivot: bool,
    ) -> Result<(), CoordinatorError> {
        if index < self.saga.steps.len() {
            return Ok(());
        }
        self.saga.steps.push(StepRecord {
            name: name.to_owned(),
            kind,
            state: StepState::Started,
            pivot,
            key: step_key(self.saga.id, index),
            intent: None,
            output: None,
            conflicts: Vec::new(),
        });
        self.save().await?;
        Ok(())
    }

    /// Commits a Tandem step, held and fenced by the saga, and journals it done.
    async fn tandem_step(
        &mut self,
        index: usize,
        tx: Transaction,
    ) -> Result<TransactionReport, CoordinatorError> {
        let key = step_key(self.saga.id, index);
        let report = self
            .c
            .transact_inner(tx, &WriteOptions::idempotent(key), Some(self.fence()))
            .await?;
        self.step_done(index, &report).await?;
        Ok(report)
    }

    async fn step_done(
        &mut self,
        index: usize,
        report: &TransactionReport,
    ) -> Result<(), CoordinatorError> {
        let step = &mut self.saga.steps[index];
        step.state = StepState::Done;
        step.intent = Some(report.intent);
        step.output = Some(serde_json::to_value(report).unwrap_or(Value::Null));
        metrics::counter!("tandem_saga_steps_total", "kind" => "tandem", "outcome" => "done")
            .increment(1);
        self.save().await?;
        Ok(())
    }

    /// A Tandem step journaled as started whose outcome this driver does not
    /// know: its idempotency key says whether it committed. (It cannot
    /// commit later: its commit is fenced by the token of the driver that
    /// started it, and this driver holds a newer one — taken by recovery's
    /// claim, an operator's abort, or the hand-over that begins a
    /// compensation in the same process.)
    async fn settle_started_tandem(
        &mut self,
        index: usize,
    ) -> Result<Option<TransactionReport>, CoordinatorError> {
        let key = step_key(self.saga.id, index);
        let deadline = Instant::now() + self.c.config.call_deadline;
        let found: Option<IdempotencyRecord> = self
            .c
            .metadata_call("metadata.lookup_idempotency", deadline, || {
                self.c.repo.lookup_idempotency(&key)
            })
            .await?;
        match found {
            Some(rec) => {
                let report = super::write::replay_transaction(rec)?;
                self.step_done(index, &report).await?;
                Ok(Some(report))
            }
            None => Ok(None),
        }
    }

    /// Runs the remaining steps of a static saga, then finishes it; a
    /// failure before the pivot compensates it.
    async fn forward(&mut self) -> Result<(), CoordinatorError> {
        let def = match &self.def {
            Some(def) => def.clone(),
            None => return Err(CoordinatorError::UnknownSaga(self.saga.name.clone())),
        };
        let total = if def.dynamic {
            // A dynamic saga goes forward only to its end: its steps are all
            // journaled (a started one is settled first).
            self.saga.steps.len()
        } else {
            def.steps.len()
        };
        let mut index = 0;
        while index < total {
            let state = self.saga.steps.get(index).map(|s| s.state);
            match state {
                Some(StepState::Done) => {
                    index += 1;
                    continue;
                }
                Some(StepState::Compensated) if def.dynamic => {
                    // A step that never applied.
                    index += 1;
                    continue;
                }
                _ => {}
            }
            let result = if def.dynamic {
                // Only a started step can be here: it either committed or not.
                match self.settle_started_tandem(index).await? {
                    Some(_) => Ok(()),
                    None => {
                        self.saga.steps[index].state = StepState::Compensated;
                        self.save().await?;
                        Ok(())
                    }
                }
            } else {
                self.run_static_step(index, &def.steps[index]).await
            };
            if let Err(e) = result {
                return self.step_failed(index, e).await;
            }
            index += 1;
        }
        self.finish().await
    }

    async fn run_static_step(
        &mut self,
        index: usize,
        step: &StepDefinition,
    ) -> Result<(), CoordinatorError> {
        let resumed = self.saga.steps.get(index).map(|s| s.state) == Some(StepState::Started);
        self.start_step(index, &step.name, step.kind(), step.pivot)
            .await?;
        match &step.body {
            StepBody::Tandem(build) => {
                if resumed && self.settle_started_tandem(index).await?.is_some() {
                    return Ok(());
                }
                let tx = build(&self.context(index)).map_err(CoordinatorError::Action)?;
                self.tandem_step(index, tx).await.map(|_| ())
            }
            StepBody::Action { run, .. } => {
                let output = self
                    .keep_lease(run(self.context(index)))
                    .await?
                    .map_err(CoordinatorError::Action)?;
                let s = &mut self.saga.steps[index];
                s.state = StepState::Done;
                s.output = Some(output);
                metrics::counter!("tandem_saga_steps_total", "kind" => "action", "outcome" => "done")
                    .increment(1);
                self.save().await?;
                Ok(())
            }
        }
    }

    /// A step failed: before the pivot the saga is compensated; past it, the
    /// saga stays running (recovery retries the step after the lease) unless
    /// no retry can help (the caller's own code refused), which fails it.
    async fn step_failed(
        &mut self,
        index: usize,
        error: CoordinatorError,
    ) -> Result<(), CoordinatorError> {
        if matches!(error, CoordinatorError::SagaFenced(_)) {
            return Err(error);
        }
        let name = self
            .saga
            .steps
            .get(index)
            .map_or_else(String::new, |s| s.name.clone());
        warn!(step = %name, error = %error, "saga step failed");
        let kind = match self.saga.steps.get(index).map(|s| s.kind) {
            Some(StepKind::Action) => "action",
            _ => "tandem",
        };
        metrics::counter!("tandem_saga_steps_total", "kind" => kind, "outcome" => "failed")
            .increment(1);
        let message = format!("step {name:?} failed: {error}");
        if error.outcome() == Outcome::Unknown {
            // Not known whether it applied: recovery settles it after the lease.
            self.saga.last_error = Some(message);
            self.save().await?;
            return Err(error);
        }
        if self.saga.past_pivot() {
            self.saga.last_error = Some(message);
            if hopeless(&error) {
                self.saga.state = SagaState::Failed;
                metrics::counter!("tandem_sagas_total", "outcome" => "failed").increment(1);
                let released = self.save().await?;
                self.clean_released(released).await;
                return Ok(());
            }
            self.save().await?;
            return Err(error);
        }
        self.backward(message).await
    }

    /// Ends the saga forward: every step stands; what they held is released
    /// and cleaned up.
    async fn finish(&mut self) -> Result<(), CoordinatorError> {
        if self
            .saga
            .steps
            .iter()
            .any(|s| s.state == StepState::Started)
        {
            return Err(CoordinatorError::Config(
                "a saga cannot finish with a step whose outcome is unknown".into(),
            ));
        }
        self.saga.state = SagaState::Done;
        self.saga.last_error = None;
        let released = self.save().await?;
        metrics::counter!("tandem_sagas_total", "outcome" => "done").increment(1);
        info!(saga = %self.saga.id, steps = self.saga.steps.len(), "saga done");
        self.clean_released(released).await;
        Ok(())
    }

    /// Compensates every completed step in reverse order, then ends the saga
    /// `Compensated` (or `Failed` if a compensation fails for good).
    async fn backward(&mut self, reason: String) -> Result<(), CoordinatorError> {
        if self.saga.state != SagaState::Compensating {
            self.saga.state = SagaState::Compensating;
            self.saga.last_error = Some(reason);
            if self
                .saga
                .steps
                .iter()
                .any(|s| s.kind == StepKind::Tandem && s.state == StepState::Started)
            {
                // A step's commit may still be on its way from this driver
                // (its outcome is unknown): take a new owner token first, so
                // that the commit, fenced by the old one, can no longer apply
                // after its key was found absent.
                self.hand_over().await?;
            } else {
                self.save().await?;
            }
        }
        // Where this compensation left each record it restored: the version
        // an earlier step's image must find (see `expected`).
        let mut restored: HashMap<RecordId, Restored> = HashMap::new();
        let order: Vec<usize> = if self.c.bug(Bug::CompensateInWrongOrder) {
            (0..self.saga.steps.len()).collect()
        } else {
            (0..self.saga.steps.len()).rev().collect()
        };
        for index in order {
            if let Err(e) = self.compensate_step(index, &mut restored).await {
                if matches!(e, CoordinatorError::SagaFenced(_)) {
                    return Err(e);
                }
                // A compensation is never given up: the saga stays
                // compensating (its error and attempts visible) and recovery
                // retries after the lease.
                let name = self.saga.steps[index].name.clone();
                warn!(step = %name, error = %e, "compensation failed; recovery retries it");
                self.saga.last_error = Some(format!("compensation of step {name:?} failed: {e}"));
                self.save().await?;
                return Err(e);
            }
        }
        self.saga.state = SagaState::Compensated;
        let released = self.save().await?;
        metrics::counter!("tandem_sagas_total", "outcome" => "compensated").increment(1);
        info!(saga = %self.saga.id, "saga compensated");
        self.clean_released(released).await;
        Ok(())
    }

    async fn compensate_step(
        &mut self,
        index: usize,
        restored: &mut HashMap<RecordId, Restored>,
    ) -> Result<(), CoordinatorError> {
        let step = self.saga.steps[index].clone();
        if step.state == StepState::Compensated {
            if step.kind == StepKind::Tandem
                && let Some(intent) = step.intent
            {
                // Compensated before (a resumed compensation): what its
                // restore left is what earlier steps must find.
                let images = self.undo_images(intent).await?;
                note_restored(restored, &images, &step.conflicts);
            }
            return Ok(());
        }
        if step.kind == StepKind::Tandem
            && step.state == StepState::Started
            && self.settle_started_tandem(index).await?.is_none()
        {
            // It never committed, and cannot any more.
            self.saga.steps[index].state = StepState::Compensated;
            self.save().await?;
            return Ok(());
        }
        let step = self.saga.steps[index].clone();
        match step.kind {
            StepKind::Tandem => {
                let Some(intent) = step.intent else {
                    return Ok(());
                };
                let mut images = self.undo_images(intent).await?;
                let originals = images.clone();
                for image in &mut images {
                    image.after_version = expected(image, restored);
                }
                let key = undo_key(self.saga.id, index);
                let (_, conflicts) = self.c.restore(images, &key, self.fence()).await?;
                if !conflicts.is_empty() {
                    warn!(step = %step.name, conflicts = conflicts.len(), "records changed after the step were left as they are");
                }
                note_restored(restored, &originals, &conflicts);
                let s = &mut self.saga.steps[index];
                s.state = StepState::Compensated;
                s.conflicts = conflicts;
            }
            StepKind::Action => {
                let compensate = self
                    .def
                    .as_ref()
                    .and_then(|d| d.steps.iter().find(|s| s.name == step.name))
                    .and_then(|s| match &s.body {
                        StepBody::Action { compensate, .. } => compensate.clone(),
                        StepBody::Tandem(_) => None,
                    });
                match compensate {
                    Some(compensate) => {
                        self.keep_lease(compensate(self.context(index)))
                            .await?
                            .map_err(CoordinatorError::Action)?;
                    }
                    None if self.def.is_none() => {
                        return Err(CoordinatorError::UnknownSaga(self.saga.name.clone()));
                    }
                    // Without compensation (a pivot): nothing to undo.
                    None => {}
                }
                self.saga.steps[index].state = StepState::Compensated;
            }
        }
        metrics::counter!("tandem_saga_steps_total", "kind" => match step.kind {
            StepKind::Tandem => "tandem",
            StepKind::Action => "action",
        }, "outcome" => "compensated")
        .increment(1);
        self.save().await?;
        Ok(())
    }

    async fn undo_images(
        &self,
        intent: crate::model::IntentId,
    ) -> Result<Vec<UndoImage>, CoordinatorError> {
        let deadline = Instant::now() + self.c.config.call_deadline;
        self.c
            .metadata_call("metadata.undo_images", deadline, || {
                self.c.repo.undo_images(intent)
            })
            .await
    }

    /// Deletes the garbage of intents a terminal save released and resolves
    /// them (as recovery would after their lease, which it does if this
    /// fails).
    async fn clean_released(&self, released: Vec<Intent>) {
        if released.is_empty() {
            return;
        }
        let mut report = RecoveryReport::default();
        self.c
            .recover_batch(&released, self.saga.owner, &mut report)
            .await;
        info!(
            intents = released.len(),
            points_deleted = report.points_deleted,
            "released what the saga held"
        );
    }
}

/// The error of driving saga `saga` that did not let it end now.
fn unfinished(saga: SagaId, error: CoordinatorError) -> CoordinatorError {
    match error {
        e @ (CoordinatorError::SagaUnfinished { .. } | CoordinatorError::SagaFenced(_)) => e,
        e => CoordinatorError::SagaUnfinished {
            saga,
            source: Box::new(e),
        },
    }
}

/// Whether retrying a failed step cannot help: the caller's own code
/// refused (an action, a transaction builder, a caller step) or built an
/// invalid transaction.
fn hopeless(error: &CoordinatorError) -> bool {
    matches!(
        error,
        CoordinatorError::Action(_)
            | CoordinatorError::Invalid(_)
            | CoordinatorError::StepFailed { .. }
            | CoordinatorError::IdempotencyKeyReused { .. }
    )
}

/// What this compensation's restore of a later step left a record as.
#[derive(Clone, Copy, Debug)]
struct Restored {
    /// The record's version before that later step (its image's `before`):
    /// an earlier step that left the record at this version is next in line.
    before_version: Option<u64>,
    /// The version the restore left (`None`: it deleted the record).
    now: Option<u64>,
}

/// The version a record must have for an earlier step's image to be
/// restored: the version the step left it at — or, if a later step of this
/// saga (already compensated, going backward) started from exactly that
/// version, whatever that later step's restore left.
fn expected(image: &UndoImage, restored: &HashMap<RecordId, Restored>) -> Option<u64> {
    match restored.get(&image.id) {
        Some(r) if r.before_version == image.after_version => r.now,
        _ => image.after_version,
    }
}

/// Records what a restore of `images` left each record as (conflicted
/// records were left alone: an earlier image must not treat them as
/// restored).
fn note_restored(
    restored: &mut HashMap<RecordId, Restored>,
    images: &[UndoImage],
    conflicts: &[RecordId],
) {
    for image in images {
        if conflicts.contains(&image.id) {
            restored.remove(&image.id);
            continue;
        }
        let start = expected(image, restored);
        let now = match (&image.before, start) {
            (None, _) => None,
            (Some(_), Some(v)) => Some(v + 1),
            (Some(b), None) => Some(b.version + 1),
        };
        restored.insert(
            image.id,
            Restored {
                before_version: image.before.as_ref().map(|b| b.version),
                now,
            },
        );
    }
}

/// The error of an action dropped because the saga's lease ran out before a
/// renewal succeeded.
fn lapsed(last_error: Option<CoordinatorError>, lease: std::time::Duration) -> CoordinatorError {
    warn!("the saga's lease ran out while an action ran; the action was dropped");
    last_error.unwrap_or(CoordinatorError::DeadlineExceeded(lease))
}
