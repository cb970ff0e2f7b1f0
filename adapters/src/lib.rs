//! # tandem-adapters
//!
//! Backends for Tandem's ports, one module per backend, each behind a
//! feature of the same name (but [`hash`], always there):
//!
//! | module | port | backend |
//! |---|---|---|
//! | [`memory`] | both, `IndexCatalog` | in-process maps; exact search |
//! | `postgres` | `MetadataRepo` | PostgreSQL through diesel-async |
//! | `sqlite` | `MetadataRepo` | SQLite through diesel-async (embedded default) |
//! | `qdrant` | `VectorIndex`, `IndexCatalog` | Qdrant over gRPC through qdrant-client (`QdrantCatalog`: the server's collections) |
//! | `edge` | `VectorIndex`, `IndexCatalog` | qdrant-edge, Qdrant's in-process engine (embedded default; `EdgeCatalog`: one directory per collection) |
//! | `openai` | `Embedder` | any OpenAI-compatible `/embeddings` server, over HTTP (reqwest) |
//! | [`hash`] | `Embedder` | the lexical hash embedding, local and deterministic |
//!
//! Adapters translate; they never retry or compensate. Each maps its driver's
//! errors in its own `error.rs`.

#[cfg(feature = "edge")]
pub mod edge;
pub mod hash;
#[cfg(feature = "memory")]
pub mod memory;
#[cfg(feature = "openai")]
pub mod openai;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "qdrant")]
pub mod qdrant;
#[cfg(any(feature = "postgres", feature = "sqlite"))]
mod sql;
#[cfg(feature = "sqlite")]
pub mod sqlite;

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
