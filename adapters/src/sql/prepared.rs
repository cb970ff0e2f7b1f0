//! Statements the drivers may keep prepared.

use diesel::QueryResult;
use diesel::backend::Backend;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};

/// A statement whose SQL text is one of the adapters' constants, which the
/// connection's statement cache may therefore keep prepared.
///
/// diesel marks every `sql_query` unsafe to cache (its text could be built
/// from anything), so each one would be parsed and planned again on every
/// call — on PostgreSQL a Parse round trip before its Bind/Execute, on SQLite
/// a `sqlite3_prepare`. The adapters' statements are a small fixed set of
/// constant texts with bound parameters, so caching them is exactly what the
/// statement cache is for.
///
/// A change of the tables' columns invalidates cached statements; migrations
/// run before a repo serves calls.
pub(crate) struct Prepared<Q>(Q);

impl<Q: QueryFragment<DB>, DB: Backend> QueryFragment<DB> for Prepared<Q> {
    fn walk_ast<'b>(&'b self, pass: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        self.0.walk_ast(pass)
    }

    fn is_safe_to_cache_prepared(&self, _backend: &DB) -> QueryResult<bool> {
        Ok(true)
    }
}

impl<Q> QueryId for Prepared<Q> {
    // No static id: the cache is keyed by the SQL text and bind types.
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q: Query> Query for Prepared<Q> {
    type SqlType = Q::SqlType;
}

// The synchronous `load`/`execute` (SQLite runs its statements on a blocking
// thread); diesel-async's `RunQueryDsl` covers every type already.
impl<Q, C> diesel::RunQueryDsl<C> for Prepared<Q> {}

/// `.prepared()` on any statement of the adapters.
pub(crate) trait PreparedExt: Sized {
    fn prepared(self) -> Prepared<Self> {
        Prepared(self)
    }
}

impl<Q> PreparedExt for Q {}
