//! What the PostgreSQL and SQLite adapters share: the protocol steps over a
//! small set of statements ([`steps::TxOps`]), the row mapping and vector
//! encoding ([`codec`]), and connection strings that hide their password
//! ([`SecretUrl`]).

pub(crate) mod codec;
pub(crate) mod pool;
pub(crate) mod prepared;
pub(crate) mod reindex;
#[cfg(feature = "postgres")]
mod secret;
pub(crate) mod steps;

#[cfg(feature = "postgres")]
pub use secret::SecretUrl;

use std::fmt;

/// Where in a port call a failure happened: decides whether its outcome can
/// be unknown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Getting or opening a connection: nothing was sent.
    Connect,
    /// `BEGIN`, a statement inside the transaction, or `ROLLBACK`: whatever
    /// goes wrong, the transaction does not commit.
    Statement,
    /// `COMMIT` (or a single-statement write outside a transaction) was sent:
    /// if its reply is lost, it may have committed.
    Commit,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Connect => "connect",
            Phase::Statement => "statement",
            Phase::Commit => "commit",
        })
    }
}
