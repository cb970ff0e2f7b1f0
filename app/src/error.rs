//! The command's errors and their exit codes.
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success (for `verify`: the stores are consistent) |
//! | 1 | the operation failed and nothing of it was applied, or `verify` found the stores inconsistent |
//! | 2 | usage error or bad input (malformed line, invalid record, bad configuration) |
//! | 3 | a store is unreachable or stayed unavailable (transient): retry later |
//! | 4 | the outcome of a write is unknown: re-run it with the same idempotency key/prefix |
//! | 130 | interrupted (Ctrl-C) between batches |

use std::process::ExitCode;

use tandem_core::{CoordinatorError, EmbedError, IndexError, MetadataError};

/// Success.
pub const EXIT_OK: u8 = 0;
/// Failed (nothing applied) or inconsistent.
pub const EXIT_FAILED: u8 = 1;
/// Usage error or bad input.
pub const EXIT_USAGE: u8 = 2;
/// A store is unreachable or unavailable.
pub const EXIT_UNAVAILABLE: u8 = 3;
/// A write's outcome is unknown.
pub const EXIT_UNKNOWN: u8 = 4;
/// Interrupted.
pub const EXIT_INTERRUPTED: u8 = 130;

/// Why a command failed. Each variant maps to one exit code; every message is
/// one line and carries no secret (see [`Redactor`]).
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Bad flags, a bad configuration file or an unusable argument.
    #[error("{0}")]
    Usage(String),
    /// Bad input data; nothing from the failing batch was written.
    #[error("{0}")]
    Input(String),
    /// A store could not be reached when opening it.
    #[error("cannot reach the {store}: {detail}")]
    Unreachable {
        /// Which store, e.g. "PostgreSQL metadata store at 127.0.0.1:5432/test".
        store: String,
        /// What the driver said.
        detail: String,
    },
    /// An operation on the stores failed.
    #[error("{context}{error}")]
    Coordinator {
        /// What was being done, with the store names ("metadata store (SQLite at …): ").
        context: String,
        /// The coordinator's error.
        #[source]
        error: CoordinatorError,
    },
    /// The embedder failed (after its retries); nothing of the batch was
    /// written.
    #[error("{context}{error}")]
    Embed {
        /// What was being done, and with which embedder.
        context: String,
        /// The embedder's error.
        #[source]
        error: EmbedError,
    },
    /// A backend this build cannot provide.
    #[error("backend {0} is not available in this build (enable the `{0}` feature of tandem-app)")]
    BackendUnavailable(&'static str),
    /// `verify` (or the demo) found the stores inconsistent.
    #[error("{0}")]
    Inconsistent(String),
    /// Any other failure (I/O on the input, a failed step of the demo).
    #[error("{0}")]
    Failed(String),
    /// Ctrl-C.
    #[error("interrupted")]
    Interrupted,
    /// An error with what followed from it (e.g. how an atomic ingest's
    /// saga ended); the exit code is the error's.
    #[error("{error}; {note}")]
    Noted {
        /// The error.
        #[source]
        error: Box<AppError>,
        /// What followed.
        note: String,
    },
}

impl AppError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            AppError::Usage(_) | AppError::Input(_) | AppError::BackendUnavailable(_) => EXIT_USAGE,
            AppError::Unreachable { .. } => EXIT_UNAVAILABLE,
            AppError::Coordinator { error, .. } => coordinator_exit_code(error),
            AppError::Embed { error, .. } => embed_exit_code(error),
            AppError::Inconsistent(_) | AppError::Failed(_) => EXIT_FAILED,
            AppError::Interrupted => EXIT_INTERRUPTED,
            AppError::Noted { error, .. } => error.exit_code(),
        }
    }

    /// This error, with what followed from it said after it.
    pub fn noted(self, note: impl Into<String>) -> AppError {
        AppError::Noted {
            error: Box::new(self),
            note: note.into(),
        }
    }
}

/// Exit code of a coordinator error: bad input 2, unavailable 3, unknown
/// outcome 4, anything else 1.
pub fn coordinator_exit_code(error: &CoordinatorError) -> u8 {
    match error {
        CoordinatorError::Invalid(_)
        | CoordinatorError::IdempotencyKeyReused { .. }
        | CoordinatorError::Config(_) => EXIT_USAGE,
        CoordinatorError::OutcomeUnknown { .. } | CoordinatorError::SagaUnfinished { .. } => {
            EXIT_UNKNOWN
        }
        CoordinatorError::DeadlineExceeded(_) => EXIT_UNAVAILABLE,
        CoordinatorError::Metadata(MetadataError::InvalidInput { .. }) => EXIT_USAGE,
        // Another re-index holds the migration, or a switch is in progress:
        // try again later.
        CoordinatorError::Metadata(
            MetadataError::MigrationConflict { .. } | MetadataError::IndexMoved { .. },
        )
        | CoordinatorError::ReindexBlocked(_) => EXIT_UNAVAILABLE,
        CoordinatorError::Embed(e) => embed_exit_code(e),
        CoordinatorError::Metadata(e) if e.is_retryable() => EXIT_UNAVAILABLE,
        CoordinatorError::Index(IndexError::InvalidInput { .. }) => EXIT_USAGE,
        CoordinatorError::Index(e) if e.is_retryable() => EXIT_UNAVAILABLE,
        _ => EXIT_FAILED,
    }
}

/// Exit code of an embedder error: the service unavailable or rate
/// limiting 3, input it refused 2, anything else (credentials, protocol,
/// configuration) 1.
pub fn embed_exit_code(error: &EmbedError) -> u8 {
    match error {
        e if e.is_retryable() => EXIT_UNAVAILABLE,
        EmbedError::InvalidInput { .. } => EXIT_USAGE,
        _ => EXIT_FAILED,
    }
}

/// Removes secrets (passwords, API keys) from text shown to people, as a last
/// line of defence: messages are built without them, but a driver's error
/// could echo a connection string.
#[derive(Clone, Default)]
pub struct Redactor {
    secrets: Vec<String>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} secrets)", self.secrets.len())
    }
}

impl Redactor {
    /// Adds a secret (ignored when empty). Its percent-decoded form is added too,
    /// since URLs carry passwords encoded.
    pub fn add(&mut self, secret: &str) {
        // Replacing a one- to three-character string everywhere would garble
        // every message and hide nothing: such a secret cannot be protected
        // by redaction (messages are built without secrets in the first place).
        if secret.chars().count() < MIN_SECRET_LEN {
            return;
        }
        self.secrets.push(secret.to_owned());
        if let Ok(decoded) = percent_decode(secret)
            && decoded != secret
            && decoded.chars().count() >= MIN_SECRET_LEN
        {
            self.secrets.push(decoded);
        }
        // Longest first, so that a secret containing another is replaced whole.
        self.secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }

    /// `text` with every secret replaced by `***`.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for s in &self.secrets {
            out = out.replace(s.as_str(), "***");
        }
        out
    }
}

/// Shorter secrets are not redacted (see [`Redactor::add`]).
const MIN_SECRET_LEN: usize = 4;

fn percent_decode(s: &str) -> Result<String, std::str::Utf8Error> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
}

/// The full error chain on one line (`a: b: c`), without repeating a source
/// whose text the previous message already contains, and redacted.
pub fn one_line(error: &(dyn std::error::Error + 'static), redactor: &Redactor) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    redactor.redact(&out.replace(['\n', '\r'], " "))
}

/// Converts an exit code for `main`.
pub fn exit(code: u8) -> ExitCode {
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redactor_hides_plain_and_encoded_secrets() {
        let mut r = Redactor::default();
        r.add("p%40ss");
        assert_eq!(r.redact("user p%40ss and p@ss"), "user *** and ***");
        r.add("");
        r.add("k");
        assert_eq!(r.redact("nothing to check"), "nothing to check");
    }

    #[test]
    fn exit_codes_follow_the_error_class() {
        use tandem_core::ValidationError;
        let invalid = CoordinatorError::Invalid(ValidationError::EmptyBatch);
        assert_eq!(coordinator_exit_code(&invalid), EXIT_USAGE);
        let down = CoordinatorError::Metadata(MetadataError::transient("down"));
        assert_eq!(coordinator_exit_code(&down), EXIT_UNAVAILABLE);
        let perm = CoordinatorError::Metadata(MetadataError::permanent("no table"));
        assert_eq!(coordinator_exit_code(&perm), EXIT_FAILED);
        let unknown = CoordinatorError::OutcomeUnknown {
            intent: tandem_core::IntentId::new_random(),
            source: Box::new(down),
        };
        assert_eq!(coordinator_exit_code(&unknown), EXIT_UNKNOWN);
    }

    #[test]
    fn one_line_joins_the_chain_without_newlines() {
        let e = AppError::Coordinator {
            context: "ingest: ".into(),
            error: CoordinatorError::Metadata(MetadataError::transient("line1\nline2")),
        };
        let text = one_line(&e, &Redactor::default());
        assert!(!text.contains('\n'), "{text}");
        assert!(text.starts_with("ingest: metadata store"), "{text}");
    }
}
