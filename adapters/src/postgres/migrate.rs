//! The embedded schema migrations, applied in the configured schema.

use diesel::connection::SimpleConnection;
use diesel::sql_types::Text;
use diesel_async::AsyncPgConnection;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
use tandem_core::MetadataError;

use super::connect::Connection;
use super::error::Phase;
use crate::sql::codec::quote_identifier;

/// The migrations under `adapters/migrations/postgres`, compiled in.
pub(crate) const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

/// Creates the schema if needed and applies the pending migrations, holding an
/// advisory lock so that processes starting together migrate one at a time.
///
/// `conn` has `search_path` set to `schema`, so the tables (and diesel's
/// migration bookkeeping) land there. The synchronous migration harness runs
/// on a blocking thread, driving the async connection through the runtime.
pub(crate) async fn run(conn: Connection, schema: &str) -> Result<usize, MetadataError> {
    let (conn, errors) = conn.into_parts();
    let quoted = quote_identifier(schema).map_err(MetadataError::permanent)?;
    let lock_key = format!("tandem-migrate:{schema}");
    let task = tokio::task::spawn_blocking(move || -> Result<usize, MetadataError> {
        let mut conn: AsyncConnectionWrapper<AsyncPgConnection> = conn.into();
        let advisory = |sql: &str, conn: &mut AsyncConnectionWrapper<AsyncPgConnection>| {
            diesel::RunQueryDsl::execute(
                diesel::sql_query(sql).bind::<Text, _>(lock_key.as_str()),
                conn,
            )
            .map_err(|e| errors.classify(e, Phase::Statement))
        };
        advisory("SELECT pg_advisory_lock(hashtext($1))", &mut conn)?;
        let result = (|| {
            conn.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {quoted}"))
                .map_err(|e| errors.classify(e, Phase::Commit))?;
            conn.run_pending_migrations(MIGRATIONS)
                .map(|applied| applied.len())
                .map_err(|e| match e.downcast::<diesel::result::Error>() {
                    // Each migration is its own transaction: its COMMIT may be in flight.
                    Ok(db) => errors.classify(*db, Phase::Commit),
                    Err(other) => MetadataError::Permanent {
                        outcome: tandem_core::Outcome::NotApplied,
                        message: format!("PostgreSQL migration failed: {other}"),
                        source: Some(other),
                    },
                })
        })();
        // Released with the session anyway; unlocking early lets others go on.
        let _ = advisory("SELECT pg_advisory_unlock(hashtext($1))", &mut conn);
        result
    });
    task.await
        .map_err(|e| MetadataError::permanent(format!("migration task failed: {e}")))?
}
