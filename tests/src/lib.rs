//! Cross-crate test support for Tandem: the Qdrant-compatible test server
//! ([`qdrant_double`]), the OpenAI-compatible embedding server
//! ([`embed_server`]), PostgreSQL test databases ([`pg`]) and the shared
//! invariant checks ([`invariants`]) used by the suites under `tests/tests/`.

pub mod campaign;
pub mod embed_server;
pub mod harness;
pub mod invariants;
pub mod network;
pub mod pg;
pub mod property;
pub mod qdrant_double;
pub mod real_qdrant;
pub mod reindex;
pub mod reindex_campaign;
