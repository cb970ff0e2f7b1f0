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
//! The SQLSTATE is always the one the server sent, never read from the
//! message's wording (which is in the server's `lc_messages` language):
//! diesel-async keeps the code only for a few error kinds, so every
//! connection the adapter opens records the code of each server error off
//! the wire ([`ServerErrors`], see `wire.rs` for why and how), and
//! [`ServerErrors::sqlstate`] looks it up for a diesel error. A failure
//! without any reply from the server (connection lost, I/O error) carries no
//! code and is `08006`. Connection failures come from tokio-postgres
//! directly, with its exact SQLSTATE.

use diesel::result::{DatabaseErrorKind, Error as DieselError};
use tandem_core::{MetadataError, Outcome};

pub use super::wire::ServerErrors;
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

/// Classifies an SQLSTATE (see the module's table). `None`: no code is known
/// for the error (not a server error this connection recorded), so it is
/// not retried.
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

impl ServerErrors {
    /// The SQLSTATE of a diesel error of this connection: the code the
    /// server sent with it; `08006` (connection failure) for a failure with
    /// no reply from the server. `None`: not a database error, or none this
    /// connection recorded (a diesel error from elsewhere).
    pub fn sqlstate(&self, err: &DieselError) -> Option<SqlState> {
        let DieselError::DatabaseError(kind, info) = err else {
            return None;
        };
        match kind {
            // diesel-async's kind for a tokio-postgres error without a code:
            // the request or its reply was lost on the way.
            DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand => {
                Some(SqlState::CONNECTION_FAILURE)
            }
            _ => self.code_for(info.message()).or_else(|| kind_code(kind)),
        }
    }

    /// A diesel error of a statement (or `COMMIT`) on this connection, as
    /// the port's error.
    pub fn classify(&self, err: DieselError, phase: Phase) -> MetadataError {
        let code = self.sqlstate(&err);
        let shown = match &err {
            DieselError::DatabaseError(_, info) => info.message().to_owned(),
            other => other.to_string(),
        };
        let message = describe(&shown, code.as_ref(), phase);
        into_error(classify_code(code.as_ref(), phase), message, Box::new(err))
    }
}

/// The codes diesel-async derives its error kinds from (exact, but only
/// these), for a database error the connection did not record.
fn kind_code(kind: &DatabaseErrorKind) -> Option<SqlState> {
    Some(match kind {
        DatabaseErrorKind::UniqueViolation => SqlState::UNIQUE_VIOLATION,
        DatabaseErrorKind::ForeignKeyViolation => SqlState::FOREIGN_KEY_VIOLATION,
        DatabaseErrorKind::NotNullViolation => SqlState::NOT_NULL_VIOLATION,
        DatabaseErrorKind::CheckViolation => SqlState::CHECK_VIOLATION,
        DatabaseErrorKind::RestrictViolation => SqlState::RESTRICT_VIOLATION,
        DatabaseErrorKind::ExclusionViolation => SqlState::EXCLUSION_VIOLATION,
        DatabaseErrorKind::SerializationFailure => SqlState::T_R_SERIALIZATION_FAILURE,
        DatabaseErrorKind::ReadOnlyTransaction => SqlState::READ_ONLY_SQL_TRANSACTION,
        _ => return None,
    })
}

/// Why a pooled connection could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The connection string is inconsistent (e.g. more ports than hosts).
    #[error("invalid PostgreSQL connection string: {0}")]
    Config(String),
    /// No transport to the server: refused, timed out, no such host.
    #[error("cannot connect to PostgreSQL at {addr}: {source}")]
    Transport {
        /// Where it tried (host and port, or a socket path; no credentials).
        addr: String,
        /// The socket's error.
        #[source]
        source: std::io::Error,
    },
    /// The server refused the session, or the startup failed.
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(#[source] tokio_postgres::Error),
    /// The session could not be set up after connecting.
    #[error("cannot set up the PostgreSQL session: {source}")]
    Setup {
        /// diesel-async's error.
        #[source]
        source: diesel::ConnectionError,
        /// Its SQLSTATE: the server's, or `08006` for a failure without a
        /// reply.
        code: Option<SqlState>,
    },
    /// A pooled connection failed its check before use.
    #[error("pooled PostgreSQL connection failed its check: {source}")]
    Check {
        /// diesel-async's error.
        #[source]
        source: DieselError,
        /// Its SQLSTATE ([`ServerErrors::sqlstate`]).
        code: Option<SqlState>,
    },
}

/// A connection failure as the port's error: nothing was sent, so never
/// applied; exact SQLSTATE from tokio-postgres or the connection's record.
pub fn classify_connect(err: ConnectError) -> MetadataError {
    let (class, message) = connect_class(&err);
    into_error(class, message, Box::new(err))
}

fn connect_class(err: &ConnectError) -> (Class, String) {
    let code = match err {
        ConnectError::Config(_) => None,
        ConnectError::Transport { .. } => Some(SqlState::CONNECTION_FAILURE),
        ConnectError::Connect(e) => Some(e.code().cloned().unwrap_or(SqlState::CONNECTION_FAILURE)),
        ConnectError::Setup { code, .. } | ConnectError::Check { code, .. } => code.clone(),
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
    use crate::postgres::wire::tests::error_response;
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

    /// A diesel error as diesel-async builds it from a server error.
    fn server_error(kind: DatabaseErrorKind, message: &str) -> DieselError {
        DieselError::DatabaseError(kind, Box::new(message.to_owned()))
    }

    /// The errors a connection recorded after receiving these
    /// `ErrorResponse`s.
    fn received(errors: &[(&str, &str)]) -> ServerErrors {
        let wire: Vec<u8> = errors
            .iter()
            .flat_map(|(code, message)| error_response(code, message))
            .collect();
        ServerErrors::scanned(&wire)
    }

    #[test]
    fn non_english_errors_are_classified_by_their_code() {
        let errors = received(&[
            ("40P01", "Verklemmung entdeckt"),
            (
                "55P03",
                "storniere Anfrage wegen Zeitüberschreitung einer Sperre",
            ),
            (
                "57P01",
                "Verbindung wird abgebrochen aufgrund von Anweisung des Administrators",
            ),
            ("42P01", "Relation »records« existiert nicht"),
            (
                "23505",
                "doppelter Schlüsselwert verletzt Unique-Constraint »records_point_id_key«",
            ),
        ]);
        let cases = [
            ("Verklemmung entdeckt", Phase::Statement, "40P01"),
            (
                "storniere Anfrage wegen Zeitüberschreitung einer Sperre",
                Phase::Commit,
                "55P03",
            ),
            (
                "Verbindung wird abgebrochen aufgrund von Anweisung des Administrators",
                Phase::Commit,
                "57P01",
            ),
            (
                "Relation »records« existiert nicht",
                Phase::Statement,
                "42P01",
            ),
        ];
        let want = [
            Class::Transient(NotApplied),
            Class::Transient(NotApplied),
            Class::Transient(Unknown),
            Class::Permanent(NotApplied),
        ];
        for ((message, phase, code), want) in cases.into_iter().zip(want) {
            let err = server_error(DatabaseErrorKind::Unknown, message);
            assert_eq!(
                errors.sqlstate(&err).as_ref().map(SqlState::code),
                Some(code)
            );
            let classified = errors.classify(err, phase);
            assert!(
                classified.to_string().contains(&format!("SQLSTATE {code}")),
                "{classified}"
            );
            assert_eq!(
                classified.is_retryable(),
                matches!(want, Class::Transient(_))
            );
            let outcome = match want {
                Class::Transient(o) | Class::Permanent(o) => o,
                Class::InvalidInput => NotApplied,
            };
            assert_eq!(classified.outcome(), outcome, "{classified}");
        }
        // A kind diesel-async does keep: the recorded code agrees.
        let unique = server_error(
            DatabaseErrorKind::UniqueViolation,
            "doppelter Schlüsselwert verletzt Unique-Constraint »records_point_id_key«",
        );
        assert!(matches!(
            errors.classify(unique, Phase::Commit),
            MetadataError::InvalidInput { .. }
        ));
    }

    #[test]
    fn the_wording_alone_decides_nothing() {
        // English words, but no error with that message was received: not
        // recognised, hence permanent (no text is read).
        let none = ServerErrors::default();
        let err = server_error(DatabaseErrorKind::Unknown, "deadlock detected");
        assert_eq!(none.sqlstate(&err), None);
        assert!(matches!(
            none.classify(err, Phase::Statement),
            MetadataError::Permanent {
                outcome: Outcome::NotApplied,
                ..
            }
        ));
        // Without a record, a kind diesel-async keeps still gives its code.
        let err = server_error(DatabaseErrorKind::SerializationFailure, "beliebig");
        assert_eq!(
            none.sqlstate(&err),
            Some(SqlState::T_R_SERIALIZATION_FAILURE)
        );
        // No reply at all: a lost connection, whatever the words.
        let lost = server_error(DatabaseErrorKind::UnableToSendCommand, "connection closed");
        assert!(matches!(
            none.classify(lost, Phase::Commit),
            MetadataError::Transient {
                outcome: Outcome::Unknown,
                ..
            }
        ));
    }
}
