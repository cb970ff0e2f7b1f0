//! PostgreSQL failures mapped to the port's error model, by SQLSTATE and by
//! phase.
//!
//! | SQLSTATE | before COMMIT | COMMIT in flight |
//! |---|---|---|
//! | `40001` serialization failure, `40P01` deadlock, `55P03` lock timeout, `53xxx` insufficient resources, `57P03` cannot connect now | transient, not applied | transient, not applied (the server answered, so it rolled back) |
//! | `57014` statement timeout / cancel | transient, not applied | transient, **unknown** |
//! | no reply: connection lost, I/O error, `08xxx`, `57P01`/`57P02`/`57P05` shutdown, `25P03` idle timeout | transient, not applied (the server rolls back a broken session) | transient, **unknown** |
//! | `22xxx` data, `23xxx` constraint, `54000` value too large | invalid input | invalid input |
//! | `28xxx` authentication, `3D000` no such database, `42xxx` syntax or schema, anything else | permanent, not applied | permanent, not applied |
//!
//! diesel-async keeps the SQLSTATE only for a handful of error kinds
//! (serialization failure, unique / foreign key / not-null / check
//! violations, read-only transaction); the rest arrive as
//! `DatabaseErrorKind::Unknown` carrying the server's message, and failures
//! without a reply as `UnableToSendCommand`. [`sqlstate`] recovers the code
//! from the kind where it can and otherwise from the server's primary message,
//! which PostgreSQL words identically in every version for the codes above
//! (in English: with `lc_messages` in another language, unrecognised codes are
//! treated as permanent, so they are not retried, but never misreported as
//! applied). Connection failures are established through tokio-postgres
//! directly, so their SQLSTATE is exact.

use diesel::result::{DatabaseErrorKind, Error as DieselError};
use tandem_core::{MetadataError, Outcome};

pub use crate::sql::Phase;
use crate::sql::pool::CheckoutError;
pub use tokio_postgres::error::SqlState;

/// How a failure is classified, before it is turned into a [`MetadataError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Retryable, with this outcome.
    Transient(Outcome),
    /// The server rejected the data: permanent, not applied.
    InvalidInput,
    /// Not retryable, with this outcome.
    Permanent(Outcome),
}

/// Classifies an SQLSTATE (see the module's table). `None` means the server
/// answered with an error this adapter cannot identify.
pub fn classify_code(code: Option<&SqlState>, phase: Phase) -> Class {
    use Outcome::{NotApplied, Unknown};
    let Some(code) = code else {
        return Class::Permanent(NotApplied);
    };
    let c = code.code();
    let class = &c[..2.min(c.len())];
    let lost = class == "08" || matches!(c, "57P01" | "57P02" | "57P05" | "25P03");
    if lost || c == "57014" {
        return match phase {
            Phase::Commit => Class::Transient(Unknown),
            Phase::Connect | Phase::Statement => Class::Transient(NotApplied),
        };
    }
    if class == "40" || class == "53" || matches!(c, "55P03" | "57P03") {
        return Class::Transient(NotApplied);
    }
    if class == "22" || class == "23" || c == "54000" {
        return Class::InvalidInput;
    }
    Class::Permanent(NotApplied)
}

/// The SQLSTATE of a diesel error, as far as it can be recovered (see the
/// module docs). A failure without any reply from the server is reported as
/// `08006` (connection failure). `None`: not a database error, or a server
/// message this adapter does not know.
pub fn sqlstate(err: &DieselError) -> Option<SqlState> {
    let DieselError::DatabaseError(kind, info) = err else {
        return None;
    };
    match kind {
        DatabaseErrorKind::UniqueViolation => Some(SqlState::UNIQUE_VIOLATION),
        DatabaseErrorKind::ForeignKeyViolation => Some(SqlState::FOREIGN_KEY_VIOLATION),
        DatabaseErrorKind::NotNullViolation => Some(SqlState::NOT_NULL_VIOLATION),
        DatabaseErrorKind::CheckViolation => Some(SqlState::CHECK_VIOLATION),
        DatabaseErrorKind::RestrictViolation => Some(SqlState::RESTRICT_VIOLATION),
        DatabaseErrorKind::ExclusionViolation => Some(SqlState::EXCLUSION_VIOLATION),
        DatabaseErrorKind::SerializationFailure => Some(SqlState::T_R_SERIALIZATION_FAILURE),
        DatabaseErrorKind::ReadOnlyTransaction => Some(SqlState::READ_ONLY_SQL_TRANSACTION),
        DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand => {
            Some(SqlState::CONNECTION_FAILURE)
        }
        _ => sqlstate_from_message(info.message()),
    }
}

/// PostgreSQL's primary messages for the codes diesel-async does not keep.
fn sqlstate_from_message(message: &str) -> Option<SqlState> {
    const PREFIXES: &[(&str, SqlState)] = &[
        ("deadlock detected", SqlState::T_R_DEADLOCK_DETECTED),
        (
            "could not serialize access",
            SqlState::T_R_SERIALIZATION_FAILURE,
        ),
        (
            "canceling statement due to conflict with recovery",
            SqlState::T_R_SERIALIZATION_FAILURE,
        ),
        (
            "canceling statement due to lock timeout",
            SqlState::LOCK_NOT_AVAILABLE,
        ),
        ("could not obtain lock", SqlState::LOCK_NOT_AVAILABLE),
        (
            "canceling statement due to statement timeout",
            SqlState::QUERY_CANCELED,
        ),
        (
            "canceling statement due to user request",
            SqlState::QUERY_CANCELED,
        ),
        (
            "terminating connection due to administrator command",
            SqlState::ADMIN_SHUTDOWN,
        ),
        (
            "terminating connection due to unexpected postmaster exit",
            SqlState::ADMIN_SHUTDOWN,
        ),
        (
            "terminating connection because of crash of another server process",
            SqlState::CRASH_SHUTDOWN,
        ),
        (
            "terminating connection due to idle-in-transaction timeout",
            SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
        ),
        (
            "terminating connection due to idle-session timeout",
            SqlState::IDLE_SESSION_TIMEOUT,
        ),
        ("the database system is", SqlState::CANNOT_CONNECT_NOW),
        ("sorry, too many clients", SqlState::TOO_MANY_CONNECTIONS),
        (
            "remaining connection slots are reserved",
            SqlState::TOO_MANY_CONNECTIONS,
        ),
        ("too many connections for", SqlState::TOO_MANY_CONNECTIONS),
        ("out of memory", SqlState::OUT_OF_MEMORY),
        ("out of shared memory", SqlState::OUT_OF_MEMORY),
        ("could not extend file", SqlState::DISK_FULL),
        (
            "value too long for type",
            SqlState::STRING_DATA_RIGHT_TRUNCATION,
        ),
        (
            "invalid byte sequence for encoding",
            SqlState::CHARACTER_NOT_IN_REPERTOIRE,
        ),
        (
            "invalid input syntax",
            SqlState::INVALID_TEXT_REPRESENTATION,
        ),
        (
            "unsupported Unicode escape sequence",
            SqlState::UNTRANSLATABLE_CHARACTER,
        ),
        (
            "string too long to represent as jsonb",
            SqlState::PROGRAM_LIMIT_EXCEEDED,
        ),
        ("total size of jsonb", SqlState::PROGRAM_LIMIT_EXCEEDED),
        ("index row size", SqlState::PROGRAM_LIMIT_EXCEEDED),
        ("index row requires", SqlState::PROGRAM_LIMIT_EXCEEDED),
        ("syntax error", SqlState::SYNTAX_ERROR),
        ("permission denied", SqlState::INSUFFICIENT_PRIVILEGE),
        (
            "current transaction is aborted",
            SqlState::IN_FAILED_SQL_TRANSACTION,
        ),
    ];
    if let Some((_, code)) = PREFIXES.iter().find(|(p, _)| message.starts_with(p)) {
        return Some(code.clone());
    }
    if message.ends_with("does not exist") {
        let code = if message.starts_with("relation ") {
            SqlState::UNDEFINED_TABLE
        } else if message.starts_with("column ") {
            SqlState::UNDEFINED_COLUMN
        } else if message.starts_with("schema ") {
            SqlState::INVALID_SCHEMA_NAME
        } else if message.starts_with("function ") || message.starts_with("operator ") {
            SqlState::UNDEFINED_FUNCTION
        } else if message.starts_with("database ") {
            SqlState::INVALID_CATALOG_NAME
        } else {
            SqlState::UNDEFINED_OBJECT
        };
        return Some(code);
    }
    if message.contains(" out of range") {
        return Some(SqlState::NUMERIC_VALUE_OUT_OF_RANGE);
    }
    None
}

/// A diesel error of a statement (or `COMMIT`) as the port's error.
pub fn classify(err: DieselError, phase: Phase) -> MetadataError {
    let code = sqlstate(&err);
    let shown = match &err {
        DieselError::DatabaseError(_, info) => info.message().to_owned(),
        other => other.to_string(),
    };
    let message = describe(&shown, code.as_ref(), phase);
    into_error(classify_code(code.as_ref(), phase), message, Box::new(err))
}

/// Why a pooled connection could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The server could not be reached or refused the session.
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(#[source] tokio_postgres::Error),
    /// The session could not be set up after connecting.
    #[error("cannot set up the PostgreSQL session: {0}")]
    Setup(#[source] diesel::ConnectionError),
    /// A pooled connection failed its check before use.
    #[error("pooled PostgreSQL connection failed its check: {0}")]
    Check(#[source] DieselError),
}

/// A connection failure as the port's error: nothing was sent, so never
/// applied; exact SQLSTATE from tokio-postgres.
pub fn classify_connect(err: ConnectError) -> MetadataError {
    let (class, message) = connect_class(&err);
    into_error(class, message, Box::new(err))
}

fn connect_class(err: &ConnectError) -> (Class, String) {
    let code = match err {
        ConnectError::Connect(e) => Some(e.code().cloned().unwrap_or(SqlState::CONNECTION_FAILURE)),
        ConnectError::Setup(diesel::ConnectionError::CouldntSetupConfiguration(e))
        | ConnectError::Check(e) => sqlstate(e),
        ConnectError::Setup(_) => Some(SqlState::CONNECTION_FAILURE),
    };
    let shown = match err {
        ConnectError::Connect(e) => match e.as_db_error() {
            Some(db) => db.message().to_owned(),
            None => e.to_string(),
        },
        other => other.to_string(),
    };
    let message = describe(&shown, code.as_ref(), Phase::Connect);
    (classify_code(code.as_ref(), Phase::Connect), message)
}

/// Why the pool could not give a connection, as the port's error.
pub(crate) fn classify_checkout(err: CheckoutError<ConnectError>) -> MetadataError {
    match err {
        CheckoutError::Connect(e) => {
            let (class, message) = connect_class(&e);
            into_error(class, message, Box::new(e))
        }
        CheckoutError::TimedOut => MetadataError::transient(
            "PostgreSQL: no connection available within the connect timeout (pool exhausted \
             or server unreachable)",
        ),
    }
}

fn describe(server_message: &str, code: Option<&SqlState>, phase: Phase) -> String {
    let when = match phase {
        Phase::Connect => "connecting",
        Phase::Statement => "before COMMIT",
        Phase::Commit => "while COMMIT was in flight",
    };
    match code {
        Some(code) => format!(
            "PostgreSQL {when}: {server_message} [SQLSTATE {}]",
            code.code()
        ),
        None => format!("PostgreSQL {when}: {server_message}"),
    }
}

fn into_error(
    class: Class,
    message: String,
    source: Box<dyn std::error::Error + Send + Sync>,
) -> MetadataError {
    match class {
        Class::Transient(outcome) => MetadataError::Transient {
            outcome,
            message,
            source: Some(source),
        },
        Class::InvalidInput => MetadataError::InvalidInput {
            message,
            source: Some(source),
        },
        Class::Permanent(outcome) => MetadataError::Permanent {
            outcome,
            message,
            source: Some(source),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Outcome::{NotApplied, Unknown};

    fn class(code: &str, phase: Phase) -> Class {
        classify_code(Some(&SqlState::from_code(code)), phase)
    }

    #[test]
    fn table_by_code_and_phase() {
        for code in ["40001", "40P01", "55P03", "53300", "53100", "57P03"] {
            for phase in [Phase::Connect, Phase::Statement, Phase::Commit] {
                assert_eq!(class(code, phase), Class::Transient(NotApplied), "{code}");
            }
        }
        for code in ["08006", "08003", "57P01", "57P02", "57014", "25P03"] {
            assert_eq!(class(code, Phase::Statement), Class::Transient(NotApplied));
            assert_eq!(
                class(code, Phase::Commit),
                Class::Transient(Unknown),
                "{code}"
            );
        }
        for code in ["23505", "23514", "22001", "22021", "22P05", "54000"] {
            assert_eq!(class(code, Phase::Commit), Class::InvalidInput, "{code}");
        }
        for code in ["42P01", "42601", "28P01", "3D000", "XX000"] {
            assert_eq!(class(code, Phase::Statement), Class::Permanent(NotApplied));
        }
        assert_eq!(
            classify_code(None, Phase::Commit),
            Class::Permanent(NotApplied)
        );
    }

    #[test]
    fn messages_recover_collapsed_codes() {
        let cases = [
            ("deadlock detected", "40P01"),
            ("canceling statement due to lock timeout", "55P03"),
            ("canceling statement due to statement timeout", "57014"),
            (
                "terminating connection due to administrator command",
                "57P01",
            ),
            ("sorry, too many clients already", "53300"),
            ("too many connections for role \"x\"", "53300"),
            ("the database system is starting up", "57P03"),
            ("relation \"records\" does not exist", "42P01"),
            ("invalid byte sequence for encoding \"UTF8\": 0x00", "22021"),
            ("value too long for type character varying(3)", "22001"),
        ];
        for (message, code) in cases {
            let err = DieselError::DatabaseError(
                DatabaseErrorKind::Unknown,
                Box::new(message.to_owned()),
            );
            assert_eq!(
                sqlstate(&err).map(|c| c.code().to_owned()).as_deref(),
                Some(code)
            );
        }
        let lost = DieselError::DatabaseError(
            DatabaseErrorKind::UnableToSendCommand,
            Box::new("connection closed".to_owned()),
        );
        assert!(matches!(
            classify(lost, Phase::Commit),
            MetadataError::Transient {
                outcome: Outcome::Unknown,
                ..
            }
        ));
    }
}
