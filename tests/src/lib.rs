//! Cross-crate test support for Tandem: the Qdrant-compatible test server
//! ([`qdrant_double`]), PostgreSQL test databases ([`pg`]) and the shared
//! invariant checks ([`invariants`]) used by the suites under `tests/tests/`.

pub mod campaign;
pub mod harness;
pub mod invariants;
pub mod network;
pub mod pg;
pub mod property;
pub mod qdrant_double;
