//! SQLite failures mapped to the port's error model.
//!
//! | SQLite result | before COMMIT | COMMIT |
//! |---|---|---|
//! | `SQLITE_BUSY` / `SQLITE_LOCKED` (another writer held the lock past `busy_timeout`), `SQLITE_FULL`, `SQLITE_NOMEM` | transient, not applied | transient, not applied (the adapter rolls back) |
//! | `SQLITE_IOERR`, the blocking task lost | transient, not applied | transient, **unknown** |
//! | constraint violations, `SQLITE_TOOBIG`, `SQLITE_MISMATCH` | invalid input | invalid input |
//! | `SQLITE_READONLY`, `SQLITE_CANTOPEN`, `SQLITE_CORRUPT`, `SQLITE_NOTADB`, missing table, anything else | permanent, not applied | permanent, not applied |
//!
//! diesel keeps the extended result code only for constraint violations
//! (as an error kind); the rest are recognised by SQLite's fixed, never
//! translated error strings (`sqlite3_errstr`).

use diesel::result::{DatabaseErrorKind, Error as DieselError};
use tandem_core::{MetadataError, Outcome};

pub use crate::sql::Phase;
use crate::sql::pool::CheckoutError;

/// The SQLite result a failure stands for, as far as it can be told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SqliteCode {
    /// `SQLITE_BUSY`: the database is locked by another connection.
    Busy,
    /// `SQLITE_LOCKED`: a table is locked within this process.
    Locked,
    /// `SQLITE_FULL` or `SQLITE_NOMEM`.
    ResourceExhausted,
    /// `SQLITE_IOERR`, or the blocking task running the call was lost.
    Io,
    /// A constraint violation (`SQLITE_CONSTRAINT_*`), `SQLITE_TOOBIG`,
    /// `SQLITE_MISMATCH`.
    BadData,
    /// `SQLITE_READONLY`, `SQLITE_CANTOPEN`, `SQLITE_CORRUPT`,
    /// `SQLITE_NOTADB`, a missing table, a syntax error, ...
    Other,
}

/// Recognises a diesel error's SQLite result.
pub fn sqlite_code(err: &DieselError) -> SqliteCode {
    let DieselError::DatabaseError(kind, info) = err else {
        return SqliteCode::Other;
    };
    match kind {
        DatabaseErrorKind::UniqueViolation
        | DatabaseErrorKind::ForeignKeyViolation
        | DatabaseErrorKind::NotNullViolation
        | DatabaseErrorKind::CheckViolation
        | DatabaseErrorKind::RestrictViolation
        | DatabaseErrorKind::ExclusionViolation => return SqliteCode::BadData,
        DatabaseErrorKind::UnableToSendCommand | DatabaseErrorKind::ClosedConnection => {
            return SqliteCode::Io;
        }
        _ => {}
    }
    let m = info.message();
    if m.starts_with("database is locked") {
        SqliteCode::Busy
    } else if m.starts_with("database table is locked")
        || m.starts_with("database schema is locked")
    {
        SqliteCode::Locked
    } else if m.starts_with("database or disk is full") || m.starts_with("out of memory") {
        SqliteCode::ResourceExhausted
    } else if m.starts_with("disk I/O error") {
        SqliteCode::Io
    } else if m.contains("constraint failed")
        || m.starts_with("string or blob too big")
        || m.starts_with("datatype mismatch")
    {
        SqliteCode::BadData
    } else {
        SqliteCode::Other
    }
}

/// A diesel error of a statement (or `COMMIT`) as the port's error.
pub fn classify(err: DieselError, phase: Phase) -> MetadataError {
    let code = sqlite_code(&err);
    let shown = match &err {
        DieselError::DatabaseError(_, info) => info.message().to_owned(),
        other => other.to_string(),
    };
    let when = match phase {
        Phase::Connect => "opening",
        Phase::Statement => "before COMMIT",
        Phase::Commit => "during COMMIT",
    };
    let message = format!("SQLite {when}: {shown} [{code:?}]");
    let source = Some(Box::new(err) as tandem_core::BoxError);
    match code {
        SqliteCode::Busy | SqliteCode::Locked | SqliteCode::ResourceExhausted => {
            MetadataError::Transient {
                outcome: Outcome::NotApplied,
                message,
                source,
            }
        }
        SqliteCode::Io => MetadataError::Transient {
            outcome: if phase == Phase::Commit {
                Outcome::Unknown
            } else {
                Outcome::NotApplied
            },
            message,
            source,
        },
        SqliteCode::BadData => MetadataError::InvalidInput { message, source },
        SqliteCode::Other => MetadataError::Permanent {
            outcome: Outcome::NotApplied,
            message,
            source,
        },
    }
}

/// Why a connection could not be opened or verified.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The database file could not be opened.
    #[error("cannot open the SQLite database: {0}")]
    Open(#[source] diesel::ConnectionError),
    /// Setting up the connection (WAL, busy timeout) failed.
    #[error("cannot set up the SQLite connection: {0}")]
    Setup(#[source] DieselError),
    /// A pooled connection failed its check.
    #[error("pooled SQLite connection failed its check: {0}")]
    Check(#[source] DieselError),
}

/// Why the pool could not give a connection, as the port's error.
pub(crate) fn classify_checkout(err: CheckoutError<OpenError>) -> MetadataError {
    match err {
        CheckoutError::Connect(e) => {
            let message = e.to_string();
            let transient = match &*e {
                OpenError::Setup(d) | OpenError::Check(d) => matches!(
                    sqlite_code(d),
                    SqliteCode::Busy | SqliteCode::Locked | SqliteCode::ResourceExhausted
                ),
                OpenError::Open(_) => false,
            };
            if transient {
                MetadataError::Transient {
                    outcome: Outcome::NotApplied,
                    message,
                    source: Some(Box::new(e)),
                }
            } else {
                MetadataError::Permanent {
                    outcome: Outcome::NotApplied,
                    message,
                    source: Some(Box::new(e)),
                }
            }
        }
        CheckoutError::TimedOut => MetadataError::transient(
            "SQLite: no connection available within the busy timeout (pool exhausted)",
        ),
    }
}

/// The blocking task running a call was lost (panicked, or the runtime is
/// shutting down): if it was committing, the outcome is unknown.
pub(crate) fn task_lost(err: DieselError) -> MetadataError {
    classify(err, Phase::Commit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(kind: DatabaseErrorKind, m: &str) -> DieselError {
        DieselError::DatabaseError(kind, Box::new(m.to_owned()))
    }

    #[test]
    fn busy_is_transient_not_applied_even_at_commit() {
        let e = classify(
            db(DatabaseErrorKind::Unknown, "database is locked"),
            Phase::Commit,
        );
        assert!(e.is_retryable());
        assert_eq!(e.outcome(), Outcome::NotApplied);
    }

    #[test]
    fn io_error_at_commit_is_unknown() {
        let e = classify(
            db(DatabaseErrorKind::Unknown, "disk I/O error"),
            Phase::Commit,
        );
        assert_eq!(e.outcome(), Outcome::Unknown);
        let e = classify(
            db(DatabaseErrorKind::Unknown, "disk I/O error"),
            Phase::Statement,
        );
        assert_eq!(e.outcome(), Outcome::NotApplied);
    }

    #[test]
    fn constraints_are_invalid_input_and_the_rest_permanent() {
        let e = classify(
            db(
                DatabaseErrorKind::CheckViolation,
                "CHECK constraint failed: x",
            ),
            Phase::Statement,
        );
        assert!(matches!(e, MetadataError::InvalidInput { .. }));
        let e = classify(
            db(DatabaseErrorKind::Unknown, "no such table: intents"),
            Phase::Statement,
        );
        assert!(matches!(
            e,
            MetadataError::Permanent {
                outcome: Outcome::NotApplied,
                ..
            }
        ));
    }
}
