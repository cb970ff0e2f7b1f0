//! Transactions: several writes — upserts and deletes, across scopes — and
//! optionally the caller's own SQL, committed as **one** all-or-nothing unit
//! by one metadata transaction under one intent.
//!
//! ```
//! use serde_json::json;
//! use tandem_core::{DeleteSelector, NewRecord, Transaction};
//!
//! // Replace an item's embeddings: no instant at which a search sees neither
//! // the old nor the new records, or both.
//! let tx = Transaction::new()
//!     .delete(DeleteSelector::MetadataEq {
//!         scope: "catalog".into(),
//!         key: "item".into(),
//!         value: json!("sku-17"),
//!     })
//!     .upsert(vec![
//!         NewRecord::new("catalog", "red shoes, side view", vec![0.9, 0.1, 0.0])
//!             .with_metadata(json!({ "item": "sku-17" })),
//!     ]);
//! assert_eq!(tx.parts().len(), 2);
//! ```
//!
//! Parts apply **in the order given**, as if run one after the other inside
//! the one transaction: a record deleted by one part and upserted by a later
//! one ends up upserted (inserted anew, version 1); a record upserted by one
//! part and selected by a later delete ends up deleted. The same id may not be
//! upserted by two parts (as within one batch). See `docs/protocol.md`.

use std::any::{Any, TypeId};
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::error::BoxError;
use crate::model::{DeleteSelector, IntentId, NewRecord, RecordId};

/// One part of a [`Transaction`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteOp {
    /// Insert or update these records (as [`Coordinator::upsert`](crate::Coordinator::upsert)).
    Upsert(Vec<NewRecord>),
    /// Delete the selected records (as [`Coordinator::delete`](crate::Coordinator::delete)).
    Delete(DeleteSelector),
}

/// Several writes committed as one all-or-nothing unit
/// ([`Coordinator::transact`](crate::Coordinator::transact)).
#[derive(Clone, Default)]
pub struct Transaction {
    parts: Vec<WriteOp>,
    step: Option<Arc<dyn CommitStep>>,
}

impl fmt::Debug for Transaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transaction")
            .field("parts", &self.parts)
            .field("step", &self.step.as_ref().map(|s| s.connection()))
            .finish()
    }
}

impl Transaction {
    /// An empty transaction (a transaction needs at least one part).
    pub fn new() -> Self {
        Self::default()
    }

    /// A transaction of these parts.
    pub fn of(parts: Vec<WriteOp>) -> Self {
        Self { parts, step: None }
    }

    /// Adds an upsert part.
    pub fn upsert(mut self, records: Vec<NewRecord>) -> Self {
        self.parts.push(WriteOp::Upsert(records));
        self
    }

    /// Adds a delete part.
    pub fn delete(mut self, selector: DeleteSelector) -> Self {
        self.parts.push(WriteOp::Delete(selector));
        self
    }

    /// Runs the caller's own statements inside the commit's transaction, on
    /// the metadata store's own connection ([`SqlStep`]): they commit if and
    /// only if the records do. One step per transaction; a second replaces
    /// the first.
    pub fn with_step(mut self, step: impl CommitStep + 'static) -> Self {
        self.step = Some(Arc::new(step));
        self
    }

    /// [`with_step`](Self::with_step) for a step already shared.
    pub fn with_shared_step(mut self, step: Arc<dyn CommitStep>) -> Self {
        self.step = Some(step);
        self
    }

    /// The parts, in order.
    pub fn parts(&self) -> &[WriteOp] {
        &self.parts
    }

    /// The caller's step, if any.
    pub fn step(&self) -> Option<&Arc<dyn CommitStep>> {
        self.step.as_ref()
    }

    /// Splits it into its parts and step.
    pub fn into_parts(self) -> (Vec<WriteOp>, Option<Arc<dyn CommitStep>>) {
        (self.parts, self.step)
    }
}

/// The type of connection a [`CommitStep`] runs on, compared when the
/// transaction is validated: a step written for another store is rejected
/// before anything is written.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ConnectionType {
    id: TypeId,
    name: &'static str,
}

impl ConnectionType {
    /// The connection type `C`.
    pub fn of<C: Any>() -> Self {
        Self {
            id: TypeId::of::<C>(),
            name: std::any::type_name::<C>(),
        }
    }

    /// Its Rust type name.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

impl fmt::Debug for ConnectionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

impl fmt::Display for ConnectionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// The caller's own statements, run by the metadata store inside the commit
/// transaction of a [`Transaction`], on its own connection (no second
/// connection, no SQL assembled by Tandem).
///
/// A step may run more than once: a commit that failed with a retryable error
/// (a serialization failure, a deadlock) is retried in a new transaction, and
/// the step with it. Each run sees only its own transaction, so a step that
/// writes the same rows each time is correct. It must not have effects outside
/// the transaction. Use [`SqlStep`] to write one.
pub trait CommitStep: Send + Sync {
    /// The connection type it runs on.
    fn connection(&self) -> ConnectionType;

    /// Runs the statements on `conn`, the store's connection inside the open
    /// transaction. An error makes the whole transaction roll back; a
    /// database error the store classifies as transient (serialization
    /// failure, deadlock, ...) is retried like the store's own statements, any
    /// other error fails the transaction with
    /// [`CoordinatorError::StepFailed`](crate::CoordinatorError::StepFailed)
    /// carrying it as its source.
    fn run<'c>(&'c self, conn: &'c mut (dyn Any + Send)) -> BoxFuture<'c, Result<(), BoxError>>;
}

/// A [`CommitStep`] written as a closure over the store's connection type:
/// `diesel_async::AsyncPgConnection` for PostgreSQL,
/// `diesel::SqliteConnection` for SQLite, the memory store's
/// `InMemoryTables`.
///
/// ```ignore
/// let step = SqlStep::new(|conn: &mut AsyncPgConnection| Box::pin(async move {
///     diesel::sql_query("UPDATE catalogs SET status = 'indexed' WHERE id = $1")
///         .bind::<diesel::sql_types::Uuid, _>(catalog)
///         .execute(conn)
///         .await?;
///     Ok(())
/// }));
/// ```
pub struct SqlStep<C, F> {
    f: F,
    _conn: PhantomData<fn(&mut C)>,
}

impl<C, F> SqlStep<C, F>
where
    C: Any + Send,
    F: for<'c> Fn(&'c mut C) -> BoxFuture<'c, Result<(), BoxError>> + Send + Sync,
{
    /// A step that runs `f` on the store's connection.
    pub fn new(f: F) -> Self {
        Self {
            f,
            _conn: PhantomData,
        }
    }
}

impl<C, F> CommitStep for SqlStep<C, F>
where
    C: Any + Send,
    F: for<'c> Fn(&'c mut C) -> BoxFuture<'c, Result<(), BoxError>> + Send + Sync,
{
    fn connection(&self) -> ConnectionType {
        ConnectionType::of::<C>()
    }

    fn run<'c>(&'c self, conn: &'c mut (dyn Any + Send)) -> BoxFuture<'c, Result<(), BoxError>> {
        match conn.downcast_mut::<C>() {
            Some(conn) => (self.f)(conn),
            None => Box::pin(async move {
                Err(format!(
                    "this step runs on {}, not on this store's connection",
                    std::any::type_name::<C>()
                )
                .into())
            }),
        }
    }
}

/// What a transaction did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransactionReport {
    /// The intent that carried it.
    pub intent: IntentId,
    /// The ids of the upserted records, per part in order (empty for delete
    /// parts), generated ones included.
    pub ids: Vec<Vec<RecordId>>,
    /// Records inserted.
    pub inserted: u64,
    /// Records updated.
    pub updated: u64,
    /// Records deleted.
    pub deleted: u64,
    /// Points whose deletion was left to recovery (never visible).
    pub deferred_cleanup: usize,
    /// The call was answered from its idempotency key; nothing was written.
    #[serde(default)]
    pub replayed: bool,
}

impl TransactionReport {
    /// A report of nothing done yet, for intent `intent` and these ids.
    pub(crate) fn new(intent: IntentId, ids: Vec<Vec<RecordId>>) -> Self {
        Self {
            intent,
            ids,
            inserted: 0,
            updated: 0,
            deleted: 0,
            deferred_cleanup: 0,
            replayed: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Conn(u32);
    struct Other;

    #[tokio::test]
    async fn a_step_runs_on_its_own_connection_type_only() {
        let step = SqlStep::new(|c: &mut Conn| {
            Box::pin(async move {
                c.0 += 1;
                Ok(())
            })
        });
        assert_eq!(step.connection(), ConnectionType::of::<Conn>());
        assert_ne!(step.connection(), ConnectionType::of::<Other>());
        let mut conn = Conn(0);
        step.run(&mut conn).await.unwrap();
        step.run(&mut conn).await.unwrap();
        assert_eq!(conn.0, 2);
        let err = step.run(&mut Other).await.unwrap_err().to_string();
        assert!(err.contains("Conn"), "{err}");
    }

    #[test]
    fn parts_keep_their_order() {
        let tx = Transaction::new()
            .delete(DeleteSelector::Scope("a".into()))
            .upsert(vec![NewRecord::new("a", "x", vec![1.0])]);
        assert!(matches!(tx.parts()[0], WriteOp::Delete(_)));
        assert!(matches!(tx.parts()[1], WriteOp::Upsert(_)));
        assert!(tx.step().is_none());
    }
}
