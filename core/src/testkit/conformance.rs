//! Conformance suites for the two ports and for embedders: one generic async
//! function per contract bullet (named after it, see [`MetadataRepo`],
//! [`VectorIndex`] and [`Embedder`]), and macros that turn them into one named
//! test per case for a backend.
//!
//! Every backend runs them — the in-memory ones, PostgreSQL, SQLite, Qdrant,
//! qdrant-edge, the fault wrappers with an empty plan — and so can a third
//! party's backend.
//!
//! # Running the suites for a backend
//!
//! ```text
//! // tests/my_backend_conformance.rs (needs `tokio` with `macros` and
//! // `rt-multi-thread` among the dev-dependencies)
//! use tandem_core::testkit::conformance::Guarded;
//!
//! tandem_core::metadata_repo_conformance!(my_repo, async {
//!     let dir = tempfile::tempdir().unwrap();
//!     let repo = MyRepo::open(dir.path()).await.unwrap();
//!     Guarded::new(repo, dir) // keeps the directory until the test ends
//! });
//!
//! // A store configured not to keep vectors says so:
//! tandem_core::metadata_repo_conformance!(my_repo_no_vectors, async {
//!     MyRepo::in_memory_without_vectors().await
//! }, keeps_vectors = false);
//!
//! tandem_core::vector_index_conformance!(my_index, |dim, distance| async move {
//!     MyIndex::create(dim, distance).await.unwrap()
//! });
//! ```
//!
//! (Compiled examples: [`metadata_repo_conformance!`](crate::metadata_repo_conformance)
//! and [`vector_index_conformance!`](crate::vector_index_conformance).)
//!
//! The factory is evaluated once per test, and each test should get a store of
//! its own. The cases never assume an empty store (random ids, scopes and keys;
//! leases far in the future), so a store with other data is fine, but the claim
//! cases take over *every* intent whose lease ended before their fixed "now"
//! (early 1970), so two of them sharing a store at once would take each other's.
//!
//! The factory's value is a [`MetadataFixture`] / [`VectorFixture`]: any type
//! implementing the port (a backend, an `Arc` or `Box` of one, a wrapper such as
//! `FaultyMetadataRepo`), or a [`Guarded`] backend that keeps something alive
//! (a temporary directory, a server process) for the test's duration.
//!
//! The functions can also be called directly, e.g. from a hand-written test:
//! `conformance::prepare_then_read(&repo).await`. They panic on a violation.

mod catalog;
mod deferred;
mod embed;
mod journal;
mod metadata;
mod reindex;
mod unprepared;
mod vector;

pub use catalog::*;
pub use deferred::*;
pub use embed::*;
pub use journal::*;
pub use metadata::*;
pub use reindex::*;
pub use unprepared::*;
pub use vector::*;

use crate::embed::Embedder;
use crate::ports::{MetadataRepo, VectorIndex};

/// What a metadata conformance factory returns: something that gives access to
/// the backend under test. Implemented for every [`MetadataRepo`] and for
/// [`Guarded`].
pub trait MetadataFixture {
    /// The backend.
    type Repo: MetadataRepo + ?Sized;
    /// The backend under test.
    fn repo(&self) -> &Self::Repo;
}

impl<T: MetadataRepo> MetadataFixture for T {
    type Repo = T;
    fn repo(&self) -> &T {
        self
    }
}

/// What a vector index conformance factory returns: something that gives access
/// to the backend under test. Implemented for every [`VectorIndex`] and for
/// [`Guarded`].
pub trait VectorFixture {
    /// The backend.
    type Index: VectorIndex + ?Sized;
    /// The backend under test.
    fn index(&self) -> &Self::Index;
}

impl<T: VectorIndex> VectorFixture for T {
    type Index = T;
    fn index(&self) -> &T {
        self
    }
}

/// What an embedder conformance factory returns: something that gives access
/// to the embedder under test. Implemented for every [`Embedder`] and for
/// [`Guarded`].
pub trait EmbedderFixture {
    /// The embedder.
    type Embedder: Embedder + ?Sized;
    /// The embedder under test.
    fn embedder(&self) -> &Self::Embedder;
}

impl<T: Embedder> EmbedderFixture for T {
    type Embedder = T;
    fn embedder(&self) -> &T {
        self
    }
}

/// A backend together with a guard that must live as long as it (a temporary
/// directory, a child process, a server handle). The backend is dropped first.
#[derive(Debug)]
pub struct Guarded<B, G> {
    backend: B,
    guard: G,
}

impl<B, G> Guarded<B, G> {
    /// Keeps `guard` alive alongside `backend`.
    pub fn new(backend: B, guard: G) -> Self {
        Self { backend, guard }
    }
    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }
    /// The guard.
    pub fn guard(&self) -> &G {
        &self.guard
    }
}

impl<B: MetadataRepo, G> MetadataFixture for Guarded<B, G> {
    type Repo = B;
    fn repo(&self) -> &B {
        &self.backend
    }
}

impl<B: VectorIndex, G> VectorFixture for Guarded<B, G> {
    type Index = B;
    fn index(&self) -> &B {
        &self.backend
    }
}

impl<B: Embedder, G> EmbedderFixture for Guarded<B, G> {
    type Embedder = B;
    fn embedder(&self) -> &B {
        &self.backend
    }
}

/// Instantiates the [`MetadataRepo`] conformance suite: a module `$name` with
/// one `#[tokio::test]` (multi-thread runtime, 2 workers) per case.
///
/// Input: `metadata_repo_conformance!(module_name, factory)` or
/// `metadata_repo_conformance!(module_name, factory, keeps_vectors = bool)`.
/// `factory` is an expression of a future (usually `async { ... }`), evaluated
/// anew in every test, whose output is a [`MetadataFixture`] — the backend
/// itself, or a [`Guarded`] one. It is expanded inside the generated module,
/// which imports the surrounding module with `use super::*`.
/// `keeps_vectors` (default `true`) says whether the store was configured to
/// keep vectors; `commit_upsert_keeps_vectors_when_configured` checks that
/// [`get`](MetadataRepo::get) returns them exactly then.
///
/// The calling crate needs `tokio` (features `macros`, `rt-multi-thread`).
///
/// ```
/// # #[derive(Debug, Default)] struct MyRepo;
/// # #[async_trait::async_trait] impl tandem_core::MetadataRepo for MyRepo {
/// #   async fn prepare(&self, _: &tandem_core::NewIntent) -> Result<(), tandem_core::MetadataError> { Err(tandem_core::MetadataError::transient("example stub")) }
/// #   async fn commit_upsert(&self, _: tandem_core::IntentId, _: tandem_core::OwnerToken, _: &[tandem_core::RowWrite], _: Option<&tandem_core::IdempotencyRecord>) -> Result<tandem_core::UpsertCommit, tandem_core::MetadataError> { Err(tandem_core::MetadataError::transient("example stub")) }
/// #   async fn commit_delete(&self, _: tandem_core::IntentId, _: tandem_core::OwnerToken, _: &tandem_core::DeleteSelector, _: Option<&tandem_core::IdempotencyRecord>) -> Result<tandem_core::DeleteCommit, tandem_core::MetadataError> { Err(tandem_core::MetadataError::transient("example stub")) }
/// #   async fn settle(&self, _: tandem_core::IntentId, _: tandem_core::OwnerToken, _: tandem_core::OwnerToken) -> Result<tandem_core::Settlement, tandem_core::MetadataError> { Err(tandem_core::MetadataError::transient("example stub")) }
/// #   async fn resolve(&self, _: tandem_core::IntentId, _: tandem_core::OwnerToken) -> Result<bool, tandem_core::MetadataError> { Err(tandem_core::MetadataError::transient("example stub")) }
/// #   async fn claim_expired(&self, _: i64, _: tandem_core::OwnerToken, _: i64, _: usize) -> Result<Vec<tandem_core::Intent>, tandem_core::MetadataError> { Err(tandem_core::MetadataError::transient("example stub")) }
/// #   async fn record_failure(&self, _: tandem_core::IntentId, _: tandem_core::OwnerToken, _: &str) -> Result<(), tandem_core::MetadataError> { Err(tandem_core::MetadataError::transient("example stub")) }
/// #   async fn referenced_points(&self, _: &[tandem_core::PointId]) -> Result<std::collections::HashSet<tandem_core::PointId>, tandem_core::MetadataError> { Err(tandem_core::MetadataError::transient("example stub")) }
/// #   async fn rows_by_points(&self, _: &[tandem_core::PointId]) -> Result<Vec<tandem_core::StoredRecord>, tandem_core::MetadataError> { Err(tandem_core::MetadataError::transient("example stub")) }
/// #   async fn get(&self, _: &[tandem_core::RecordId]) -> Result<Vec<tandem_core::StoredRecord>, tandem_core::MetadataError> { Err(tandem_core::MetadataError::transient("example stub")) }
/// #   async fn lookup_idempotency(&self, _: &str) -> Result<Option<tandem_core::IdempotencyRecord>, tandem_core::MetadataError> { Err(tandem_core::MetadataError::transient("example stub")) }
/// #   async fn scan_refs(&self, _: Option<&tandem_core::Scope>, _: Option<tandem_core::RecordId>, _: usize) -> Result<tandem_core::Page<tandem_core::RowRef, tandem_core::RecordId>, tandem_core::MetadataError> { Err(tandem_core::MetadataError::transient("example stub")) }
/// #   async fn list_intents(&self, _: usize) -> Result<Vec<tandem_core::Intent>, tandem_core::MetadataError> { Err(tandem_core::MetadataError::transient("example stub")) }
/// #   async fn count_by_scope(&self) -> Result<std::collections::BTreeMap<tandem_core::Scope, u64>, tandem_core::MetadataError> { Err(tandem_core::MetadataError::transient("example stub")) }
/// # }
/// // One test per case, e.g. `my_repo::prepare_then_read`.
/// tandem_core::metadata_repo_conformance!(my_repo, async { MyRepo::default() });
/// // With a guard, for a store that does not keep vectors:
/// tandem_core::metadata_repo_conformance!(
///     my_repo_guarded,
///     async {
///         let guard = "e.g. a tempfile::TempDir";
///         tandem_core::testkit::conformance::Guarded::new(MyRepo::default(), guard)
///     },
///     keeps_vectors = false
/// );
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! metadata_repo_conformance {
    ($name:ident, $factory:expr, keeps_vectors = $keeps:expr $(,)?) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            $crate::__metadata_conformance_cases!(
                $factory;
                prepare_then_read,
                prepare_is_idempotent,
                commit_upsert_inserts_and_updates,
                commit_upsert_gated_passed,
                commit_upsert_gated_failed,
                commit_upsert_gated_waits,
                commit_upsert_swaps_intent,
                commit_upsert_fenced_by_owner,
                commit_upsert_is_idempotent,
                commit_upsert_records_idempotency_key,
                commit_delete_by_ids,
                commit_delete_by_scope,
                commit_delete_by_metadata,
                commit_delete_fenced_by_owner,
                commit_delete_is_idempotent,
                settle_committed,
                settle_fences_prepared,
                settle_missing,
                resolve_removes_intent,
                resolve_is_idempotent,
                resolve_many_removes_only_owned,
                resolve_many_is_idempotent,
                claim_takes_only_expired,
                claim_transfers_ownership,
                claim_is_exclusive,
                claim_respects_limit,
                record_failure_sets_last_error,
                referenced_points_subset,
                rows_by_points_current_only,
                rows_by_points_without_vectors,
                get_returns_existing,
                lookup_idempotency_unknown_key,
                scan_refs_pages_cover_all,
                count_by_scope_counts_rows,
                commit_transaction_applies_parts_in_order,
                commit_transaction_fenced_by_owner,
                commit_transaction_fenced_by_saga,
                commit_transaction_is_idempotent,
                commit_transaction_records_idempotency_key,
                commit_transaction_all_or_nothing,
                commit_transaction_runs_the_step,
                commit_transaction_restores,
                commit_transaction_gated,
                saga_save_creates,
                saga_save_create_is_idempotent,
                saga_save_fenced_by_owner,
                saga_save_hands_over,
                saga_save_terminal_releases_held,
                saga_claim_takes_only_expired_live,
                saga_claim_transfers_ownership,
                saga_claim_is_exclusive,
                saga_take_fences_the_driver,
                saga_list_filters_by_state,
                saga_counts_by_state,
                referenced_points_includes_held,
                deferred_commit_enqueues,
                deferred_commit_coalesces,
                deferred_sync_write_drops_pending,
                deferred_index_switches,
                deferred_index_fenced_by_version,
                deferred_release,
                deferred_restore_requeues,
                deferred_restore_keeps_dead_letters,
                pending_claim_takes_current,
                pending_claim_is_exclusive,
                pending_claim_respects_limit,
                pending_claim_skips_dead,
                pending_failure_counts_attempts,
                pending_failure_transient_does_not_count,
                pending_failure_dead_letters,
                pending_failure_fenced,
                pending_list_filters,
                pending_retry_dead,
                pending_drop_dead,
                pending_stats_counts,
                pending_stats_rate,
                commit_transaction_creates_intent,
                settle_unprepared_fences_absent,
                settle_unprepared_committed,
                reindex_state_starts_empty,
                reindex_begin_opens,
                reindex_begin_resumes,
                reindex_begin_conflicts,
                reindex_scan_orders_by_change,
                reindex_scan_marks_reserved,
                reindex_garbage_records_unreferenced,
                reindex_progress_persists,
                reindex_progress_fenced,
                reindex_freeze_fences_prepared,
                reindex_switch_when_caught_up,
                reindex_switch_behind,
                reindex_switch_waits_for_deferred_when_re_embedding,
                reindex_abort_closes,
                prepare_fenced_by_generation,
            );

            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn commit_transaction_holds() {
                let fixture = $factory.await;
                $crate::testkit::conformance::commit_transaction_holds(
                    $crate::testkit::conformance::MetadataFixture::repo(&fixture),
                    $keeps,
                )
                .await;
            }

            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn reindex_staged_vectors_apply_at_switch() {
                let fixture = $factory.await;
                $crate::testkit::conformance::reindex_staged_vectors_apply_at_switch(
                    $crate::testkit::conformance::MetadataFixture::repo(&fixture),
                    $keeps,
                )
                .await;
            }

            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn reindex_abort_forgets_staged_vectors() {
                let fixture = $factory.await;
                $crate::testkit::conformance::reindex_abort_forgets_staged_vectors(
                    $crate::testkit::conformance::MetadataFixture::repo(&fixture),
                    $keeps,
                )
                .await;
            }

            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn commit_upsert_keeps_vectors_when_configured() {
                let fixture = $factory.await;
                $crate::testkit::conformance::commit_upsert_keeps_vectors_when_configured(
                    $crate::testkit::conformance::MetadataFixture::repo(&fixture),
                    $keeps,
                )
                .await;
            }
        }
    };
    ($name:ident, $factory:expr $(,)?) => {
        $crate::metadata_repo_conformance!($name, $factory, keeps_vectors = true);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __metadata_conformance_cases {
    ($factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fixture = $factory.await;
                $crate::testkit::conformance::$case(
                    $crate::testkit::conformance::MetadataFixture::repo(&fixture),
                )
                .await;
            }
        )*
    };
}

/// Instantiates the [`VectorIndex`] conformance suite: a module `$name` with
/// one `#[tokio::test]` (multi-thread runtime, 2 workers) per case.
///
/// Input: `vector_index_conformance!(module_name, |dim, distance| factory)`.
/// The closure-like part names the two parameters (a `usize` dimension and a
/// [`Distance`](crate::Distance)); `factory` is an expression of a future
/// (usually `async move { ... }`, so that it owns `dim` and `distance`) whose
/// output is a [`VectorFixture`] — an empty index of that dimension and
/// distance, or a [`Guarded`] one. Cases create several indexes (the search
/// cases one per distance). It is expanded inside the generated module, which
/// imports the surrounding module with `use super::*`.
///
/// The calling crate needs `tokio` (features `macros`, `rt-multi-thread`).
///
/// ```
/// # #[derive(Debug)] struct MyIndex(usize, tandem_core::Distance);
/// # #[async_trait::async_trait] impl tandem_core::VectorIndex for MyIndex {
/// #   fn dimension(&self) -> usize { self.0 }
/// #   fn distance(&self) -> tandem_core::Distance { self.1 }
/// #   async fn upsert(&self, _: &[tandem_core::Point]) -> Result<(), tandem_core::IndexError> { Err(tandem_core::IndexError::transient("example stub")) }
/// #   async fn delete(&self, _: &[tandem_core::PointId]) -> Result<(), tandem_core::IndexError> { Err(tandem_core::IndexError::transient("example stub")) }
/// #   async fn retrieve(&self, _: &[tandem_core::PointId]) -> Result<Vec<tandem_core::PointInfo>, tandem_core::IndexError> { Err(tandem_core::IndexError::transient("example stub")) }
/// #   async fn search(&self, _: &tandem_core::IndexQuery) -> Result<Vec<tandem_core::ScoredPoint>, tandem_core::IndexError> { Err(tandem_core::IndexError::transient("example stub")) }
/// #   async fn count(&self, _: Option<&tandem_core::Scope>) -> Result<u64, tandem_core::IndexError> { Err(tandem_core::IndexError::transient("example stub")) }
/// #   async fn scroll(&self, _: Option<&tandem_core::Scope>, _: Option<tandem_core::PointId>, _: usize) -> Result<tandem_core::Page<tandem_core::PointInfo, tandem_core::PointId>, tandem_core::IndexError> { Err(tandem_core::IndexError::transient("example stub")) }
/// # }
/// // One test per case, e.g. `my_index::search_orders_by_score`.
/// tandem_core::vector_index_conformance!(my_index, |dim, distance| async move {
///     MyIndex(dim, distance)
/// });
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! vector_index_conformance {
    ($name:ident, |$dim:ident, $distance:ident| $factory:expr $(,)?) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            $crate::__vector_conformance_cases!(
                |$dim, $distance| $factory;
                upsert_then_retrieve,
                upsert_is_idempotent,
                upsert_rejects_wrong_dimension,
                delete_removes_points,
                delete_is_idempotent,
                search_orders_by_score,
                search_filters_scope_and_metadata,
                search_respects_limit_and_threshold,
                count_by_scope,
                scroll_pages_cover_all,
            );
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __vector_conformance_cases {
    (|$dim:ident, $distance:ident| $factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $crate::testkit::conformance::$case(
                    |$dim: usize, $distance: $crate::Distance| $factory,
                )
                .await;
            }
        )*
    };
}

/// Instantiates the [`IndexCatalog`](crate::IndexCatalog) conformance suite:
/// a module `$name` with one `#[tokio::test]` per case.
///
/// Input: `index_catalog_conformance!(module_name, factory)`. `factory` is an
/// expression of a future, evaluated anew in every test, whose output is the
/// catalog (with no collections of the cases' names: each case creates and
/// drops its own).
#[macro_export]
macro_rules! index_catalog_conformance {
    ($name:ident, $factory:expr $(,)?) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            $crate::__catalog_conformance_cases!(
                $factory;
                catalog_open_missing,
                catalog_create_then_open,
                catalog_create_conflicting_layout,
                catalog_drop,
            );
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __catalog_conformance_cases {
    ($factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let catalog = $factory.await;
                $crate::testkit::conformance::$case(&catalog).await;
            }
        )*
    };
}

/// Instantiates the [`Embedder`] conformance suite: a module `$name` with one
/// `#[tokio::test]` (multi-thread runtime, 2 workers) per case.
///
/// Input: `embedder_conformance!(module_name, factory)`. `factory` is an
/// expression of a future (usually `async { ... }`), evaluated anew in every
/// test, whose output is an [`EmbedderFixture`] — the embedder itself, or a
/// [`Guarded`] one (e.g. with the server it talks to). The embedder must
/// give different texts different vectors (at least 16 dimensions for the
/// hash embedding). It is expanded inside the generated module, which
/// imports the surrounding module with `use super::*`.
///
/// The calling crate needs `tokio` (features `macros`, `rt-multi-thread`).
///
/// ```
/// use tandem_core::testkit::embed::TextVectorEmbedder;
/// // One test per case, e.g. `text_vectors::embed_repeated_texts_agree`.
/// tandem_core::embedder_conformance!(text_vectors, async { TextVectorEmbedder::new(16) });
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! embedder_conformance {
    ($name:ident, $factory:expr $(,)?) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            $crate::__embedder_conformance_cases!(
                $factory;
                describes_itself,
                embed_returns_one_vector_per_text_in_order,
                embed_vectors_have_the_dimension,
                embed_empty_call_is_empty,
                embed_repeated_texts_agree,
                embed_many_texts_keeps_order,
            );
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __embedder_conformance_cases {
    ($factory:expr; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fixture = $factory.await;
                $crate::testkit::conformance::$case(
                    $crate::testkit::conformance::EmbedderFixture::embedder(&fixture),
                )
                .await;
            }
        )*
    };
}
