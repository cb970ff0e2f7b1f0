//! The baselines' own SQL: tables of their own (never Tandem's), and one
//! session per concurrent worker. Every statement is parameterised and counts
//! as one metadata round trip.
//!
//! - PostgreSQL: tokio-postgres with statements prepared once per session, so
//!   a statement costs exactly one round trip (Bind/Execute/Sync).
//! - SQLite: diesel on a [`SyncConnectionWrapper`], one blocking-pool hop
//!   per statement, as Tandem's SQLite adapter does per call.

use std::sync::Arc;

use async_trait::async_trait;
use diesel::sql_types::{BigInt, Binary, Nullable, Text};
use diesel::{QueryableByName, RunQueryDsl, SqliteConnection};
use diesel_async::AsyncConnection;
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use serde_json::Value;
use tokio_postgres::{NoTls, Statement};
use uuid::Uuid;

use super::counting::Counters;
use crate::error::AppError;

/// One row as the baselines write it: the same columns Tandem's `records`
/// table holds.
#[derive(Clone, Debug)]
pub struct Row {
    /// The record id.
    pub id: Uuid,
    /// Its scope.
    pub scope: String,
    /// Text content.
    pub content: String,
    /// Metadata object.
    pub metadata: Value,
    /// The point holding its vector.
    pub point_id: Uuid,
    /// The vector (little-endian f32s) when vectors are kept in the row.
    pub vector: Option<Vec<u8>>,
}

/// The statements a baseline runs; each is one round trip.
#[async_trait]
pub trait SqlSession: Send {
    /// `BEGIN`.
    async fn begin(&mut self) -> Result<(), AppError>;
    /// `COMMIT`.
    async fn commit(&mut self) -> Result<(), AppError>;
    /// `ROLLBACK`.
    async fn rollback(&mut self) -> Result<(), AppError>;
    /// raw: all rows in one multi-row insert.
    async fn insert_many(&mut self, rows: &[Row]) -> Result<(), AppError>;
    /// naive: one row, "flushed" to learn its generated key.
    async fn insert_returning_key(&mut self, row: &Row) -> Result<i64, AppError>;
    /// naive: fetch the row back.
    async fn fetch(&mut self, key: i64) -> Result<(), AppError>;
    /// naive: set the row's point id.
    async fn set_point(&mut self, key: i64, point: Uuid) -> Result<(), AppError>;
}

fn sql_error(what: &str, e: impl std::fmt::Display) -> AppError {
    AppError::Failed(format!("bench baseline: {what}: {e}"))
}

// --- PostgreSQL ---------------------------------------------------------------

const PG_RESET: &str = "
DROP SCHEMA IF EXISTS {schema} CASCADE;
CREATE SCHEMA {schema};
CREATE TABLE {schema}.raw_records (
    id uuid PRIMARY KEY, scope text NOT NULL, content text NOT NULL, metadata jsonb NOT NULL,
    point_id uuid NOT NULL UNIQUE, version bigint NOT NULL DEFAULT 1, vector bytea NULL,
    created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX ON {schema}.raw_records (scope, id);
CREATE TABLE {schema}.raw_overlapped_records (LIKE {schema}.raw_records INCLUDING ALL);
CREATE TABLE {schema}.naive_records (
    pk bigserial PRIMARY KEY, id uuid NOT NULL UNIQUE, scope text NOT NULL, content text NOT NULL,
    metadata jsonb NOT NULL, point_id uuid NULL UNIQUE, vector bytea NULL,
    created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX ON {schema}.naive_records (scope, id);
";

const PG_INSERT_MANY: &str = "INSERT INTO {schema}.{table} \
     (id, scope, content, metadata, point_id, vector) \
     SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::jsonb[], $5::uuid[], $6::bytea[])";
const PG_INSERT_ONE: &str = "INSERT INTO {schema}.naive_records \
     (id, scope, content, metadata, vector) VALUES ($1, $2, $3, $4, $5) RETURNING pk";
const PG_FETCH: &str = "SELECT pk, id, scope, content, metadata, point_id, vector \
     FROM {schema}.naive_records WHERE pk = $1";
const PG_SET_POINT: &str = "UPDATE {schema}.naive_records \
     SET point_id = $2, updated_at = now() WHERE pk = $1";

/// A validated SQL identifier of the bench's own (its schemas): lowercase
/// ASCII letters, digits and `_`, starting with a letter, at most 48 bytes.
/// Only such names are ever formatted into SQL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ident(String);

impl Ident {
    /// Checks `name`.
    pub fn new(name: &str) -> Result<Self, AppError> {
        let ok = (1..=48).contains(&name.len())
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(AppError::Usage(format!(
                "bench: {name:?} is not a valid name: lowercase letters, digits and _, \
                 starting with a letter, at most 48 bytes"
            )))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn with_schema(template: &str, schema: &Ident) -> String {
    template.replace("{schema}", schema.as_str())
}

/// The table a PostgreSQL session's multi-row insert writes: raw and
/// raw-overlapped write the same columns to tables of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawTable {
    /// `raw_records` (raw; naive sessions never use it).
    Raw,
    /// `raw_overlapped_records`.
    Overlapped,
}

impl RawTable {
    fn name(self) -> &'static str {
        match self {
            RawTable::Raw => "raw_records",
            RawTable::Overlapped => "raw_overlapped_records",
        }
    }
}

/// Opens a direct (unproxied) connection for administration.
async fn pg_admin(url: &str) -> Result<tokio_postgres::Client, AppError> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| sql_error("cannot connect to PostgreSQL", e))?;
    tokio::spawn(conn);
    Ok(client)
}

/// Drops and recreates the baselines' tables in `schema`.
pub async fn pg_reset(url: &str, schema: &Ident) -> Result<(), AppError> {
    pg_admin(url)
        .await?
        .batch_execute(&with_schema(PG_RESET, schema))
        .await
        .map_err(|e| sql_error("creating the baseline tables", e))
}

/// Drops a schema of the bench's own.
pub async fn pg_drop_schema(url: &str, schema: &Ident) -> Result<(), AppError> {
    pg_admin(url)
        .await?
        .batch_execute(&with_schema(
            "DROP SCHEMA IF EXISTS {schema} CASCADE",
            schema,
        ))
        .await
        .map_err(|e| sql_error("dropping the bench schema", e))
}

/// The server's version, for the report.
pub async fn pg_version(url: &str) -> Result<String, AppError> {
    let row = pg_admin(url)
        .await?
        .query_one("SHOW server_version", &[])
        .await
        .map_err(|e| sql_error("reading the server version", e))?;
    Ok(row.get(0))
}

/// One baseline connection with its statements prepared.
pub struct PgSession {
    client: tokio_postgres::Client,
    insert_many: Statement,
    insert_one: Statement,
    fetch: Statement,
    set_point: Statement,
    counters: Arc<Counters>,
}

impl PgSession {
    /// Connects (through the proxy when there is one) and prepares; its
    /// multi-row insert writes `table`.
    pub async fn connect(
        url: &str,
        schema: &Ident,
        table: RawTable,
        counters: Arc<Counters>,
    ) -> Result<Self, AppError> {
        let client = pg_admin(url).await?;
        let prep = |sql: &'static str| {
            let client = &client;
            let sql = with_schema(sql, schema).replace("{table}", table.name());
            async move {
                client
                    .prepare(&sql)
                    .await
                    .map_err(|e| sql_error("preparing a statement", e))
            }
        };
        Ok(Self {
            insert_many: prep(PG_INSERT_MANY).await?,
            insert_one: prep(PG_INSERT_ONE).await?,
            fetch: prep(PG_FETCH).await?,
            set_point: prep(PG_SET_POINT).await?,
            client,
            counters,
        })
    }

    /// Median round trip of `SELECT 1` over this connection, in milliseconds.
    pub async fn ping_ms(&self, n: usize) -> Result<f64, AppError> {
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            let t = std::time::Instant::now();
            self.client
                .simple_query("SELECT 1")
                .await
                .map_err(|e| sql_error("ping", e))?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }

    async fn simple(&mut self, what: &'static str, sql: &str) -> Result<(), AppError> {
        let _t = self.counters.metadata_call(what);
        self.client
            .batch_execute(sql)
            .await
            .map_err(|e| sql_error(sql, e))
    }
}

#[async_trait]
impl SqlSession for PgSession {
    async fn begin(&mut self) -> Result<(), AppError> {
        self.simple("sql.begin", "BEGIN").await
    }
    async fn commit(&mut self) -> Result<(), AppError> {
        self.simple("sql.commit", "COMMIT").await
    }
    async fn rollback(&mut self) -> Result<(), AppError> {
        self.simple("sql.rollback", "ROLLBACK").await
    }
    async fn insert_many(&mut self, rows: &[Row]) -> Result<(), AppError> {
        let _t = self.counters.metadata_call("sql.insert_many");
        let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
        let scopes: Vec<&str> = rows.iter().map(|r| r.scope.as_str()).collect();
        let contents: Vec<&str> = rows.iter().map(|r| r.content.as_str()).collect();
        let metadata: Vec<&Value> = rows.iter().map(|r| &r.metadata).collect();
        let points: Vec<Uuid> = rows.iter().map(|r| r.point_id).collect();
        let vectors: Vec<Option<&[u8]>> = rows.iter().map(|r| r.vector.as_deref()).collect();
        self.client
            .execute(
                &self.insert_many,
                &[&ids, &scopes, &contents, &metadata, &points, &vectors],
            )
            .await
            .map(|_| ())
            .map_err(|e| sql_error("multi-row insert", e))
    }
    async fn insert_returning_key(&mut self, row: &Row) -> Result<i64, AppError> {
        let _t = self.counters.metadata_call("sql.insert_returning_key");
        let r = self
            .client
            .query_one(
                &self.insert_one,
                &[
                    &row.id,
                    &row.scope,
                    &row.content,
                    &row.metadata,
                    &row.vector.as_deref(),
                ],
            )
            .await
            .map_err(|e| sql_error("insert", e))?;
        Ok(r.get(0))
    }
    async fn fetch(&mut self, key: i64) -> Result<(), AppError> {
        let _t = self.counters.metadata_call("sql.fetch");
        let row = self
            .client
            .query_one(&self.fetch, &[&key])
            .await
            .map_err(|e| sql_error("fetch", e))?;
        // Decode it, as an ORM would.
        let _: (i64, Uuid, &str, &str, Value) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        Ok(())
    }
    async fn set_point(&mut self, key: i64, point: Uuid) -> Result<(), AppError> {
        let _t = self.counters.metadata_call("sql.set_point");
        self.client
            .execute(&self.set_point, &[&key, &point])
            .await
            .map(|_| ())
            .map_err(|e| sql_error("update", e))
    }
}

// --- SQLite -------------------------------------------------------------------

const SQLITE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS raw_records (
    id TEXT PRIMARY KEY NOT NULL, scope TEXT NOT NULL, content TEXT NOT NULL,
    metadata TEXT NOT NULL, point_id TEXT NOT NULL UNIQUE, version INTEGER NOT NULL DEFAULT 1,
    vector BLOB NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')));
CREATE INDEX IF NOT EXISTS raw_records_scope_id ON raw_records (scope, id);
CREATE TABLE IF NOT EXISTS naive_records (
    pk INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, scope TEXT NOT NULL,
    content TEXT NOT NULL, metadata TEXT NOT NULL, point_id TEXT NULL UNIQUE, vector BLOB NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')));
CREATE INDEX IF NOT EXISTS naive_records_scope_id ON naive_records (scope, id);
";

/// Rows per multi-row statement (SQLite caps the number of bound variables).
const SQLITE_ROWS_PER_INSERT: usize = 1000;

type SqliteConn = SyncConnectionWrapper<SqliteConnection>;

/// One baseline connection to a SQLite file, with the pragmas Tandem's
/// adapter uses (WAL, `synchronous = NORMAL`, a busy timeout).
pub struct SqliteSession {
    conn: SqliteConn,
    counters: Arc<Counters>,
}

#[derive(QueryableByName)]
struct Key {
    #[diesel(sql_type = BigInt)]
    pk: i64,
}

#[derive(QueryableByName)]
#[allow(dead_code)] // decoded as an ORM would, then dropped
struct Fetched {
    #[diesel(sql_type = BigInt)]
    pk: i64,
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Text)]
    scope: String,
    #[diesel(sql_type = Text)]
    content: String,
    #[diesel(sql_type = Text)]
    metadata: String,
    #[diesel(sql_type = Nullable<Text>)]
    point_id: Option<String>,
    #[diesel(sql_type = Nullable<Binary>)]
    vector: Option<Vec<u8>>,
}

impl SqliteSession {
    /// Opens `path` (creating the baseline tables if needed).
    pub async fn open(path: &std::path::Path, counters: Arc<Counters>) -> Result<Self, AppError> {
        let url = path.to_string_lossy().into_owned();
        let mut conn = SqliteConn::establish(&url)
            .await
            .map_err(|e| sql_error("opening the SQLite baseline", e))?;
        conn.spawn_blocking(|c| {
            use diesel::connection::SimpleConnection;
            c.batch_execute(
                "PRAGMA busy_timeout = 5000; PRAGMA journal_mode = WAL; \
                 PRAGMA synchronous = NORMAL;",
            )?;
            c.batch_execute(SQLITE_SCHEMA)
        })
        .await
        .map_err(|e| sql_error("creating the SQLite baseline tables", e))?;
        Ok(Self { conn, counters })
    }

    async fn run<R: Send + 'static>(
        &mut self,
        what: &'static str,
        f: impl FnOnce(&mut SqliteConnection) -> diesel::QueryResult<R> + Send + 'static,
    ) -> Result<R, AppError> {
        let _t = self.counters.metadata_call(profile_name(what));
        self.conn
            .spawn_blocking(f)
            .await
            .map_err(|e| sql_error(what, e))
    }

    async fn simple(&mut self, what: &'static str, sql: &'static str) -> Result<(), AppError> {
        self.run(what, move |c| {
            use diesel::connection::SimpleConnection;
            c.batch_execute(sql)
        })
        .await
    }
}

/// The SQLite statements under the names the PostgreSQL session times them.
fn profile_name(what: &'static str) -> &'static str {
    match what {
        "BEGIN" => "sql.begin",
        "COMMIT" => "sql.commit",
        "ROLLBACK" => "sql.rollback",
        "multi-row insert" => "sql.insert_many",
        "insert" => "sql.insert_returning_key",
        "fetch" => "sql.fetch",
        "update" => "sql.set_point",
        _ => "sql.other",
    }
}

fn json_text(v: &Value) -> String {
    v.to_string()
}

#[async_trait]
impl SqlSession for SqliteSession {
    async fn begin(&mut self) -> Result<(), AppError> {
        // IMMEDIATE, as Tandem's adapter: concurrent writers wait for the lock
        // instead of failing at their first write.
        self.simple("BEGIN", "BEGIN IMMEDIATE").await
    }
    async fn commit(&mut self) -> Result<(), AppError> {
        self.simple("COMMIT", "COMMIT").await
    }
    async fn rollback(&mut self) -> Result<(), AppError> {
        self.simple("ROLLBACK", "ROLLBACK").await
    }
    async fn insert_many(&mut self, rows: &[Row]) -> Result<(), AppError> {
        let rows = rows.to_vec();
        self.run("multi-row insert", move |c| {
            for chunk in rows.chunks(SQLITE_ROWS_PER_INSERT) {
                // Placeholders only; every value is bound.
                let mut sql = String::from(
                    "INSERT INTO raw_records (id, scope, content, metadata, point_id, vector) VALUES ",
                );
                for i in 0..chunk.len() {
                    sql.push_str(if i == 0 { "(?, ?, ?, ?, ?, ?)" } else { ", (?, ?, ?, ?, ?, ?)" });
                }
                let mut q = diesel::sql_query(sql).into_boxed::<diesel::sqlite::Sqlite>();
                for r in chunk {
                    q = q
                        .bind::<Text, _>(r.id.to_string())
                        .bind::<Text, _>(r.scope.clone())
                        .bind::<Text, _>(r.content.clone())
                        .bind::<Text, _>(json_text(&r.metadata))
                        .bind::<Text, _>(r.point_id.to_string())
                        .bind::<Nullable<Binary>, _>(r.vector.clone());
                }
                q.execute(c)?;
            }
            Ok(())
        })
        .await
    }
    async fn insert_returning_key(&mut self, row: &Row) -> Result<i64, AppError> {
        let r = row.clone();
        let keys: Vec<Key> = self
            .run("insert", move |c| {
                diesel::sql_query(
                    "INSERT INTO naive_records (id, scope, content, metadata, vector) \
                     VALUES (?, ?, ?, ?, ?) RETURNING pk",
                )
                .bind::<Text, _>(r.id.to_string())
                .bind::<Text, _>(r.scope)
                .bind::<Text, _>(r.content)
                .bind::<Text, _>(json_text(&r.metadata))
                .bind::<Nullable<Binary>, _>(r.vector)
                .load(c)
            })
            .await?;
        keys.first()
            .map(|k| k.pk)
            .ok_or_else(|| sql_error("insert", "no key returned"))
    }
    async fn fetch(&mut self, key: i64) -> Result<(), AppError> {
        let rows: Vec<Fetched> = self
            .run("fetch", move |c| {
                diesel::sql_query(
                    "SELECT pk, id, scope, content, metadata, point_id, vector \
                     FROM naive_records WHERE pk = ?",
                )
                .bind::<BigInt, _>(key)
                .load(c)
            })
            .await?;
        if rows.is_empty() {
            return Err(sql_error("fetch", "row not found"));
        }
        Ok(())
    }
    async fn set_point(&mut self, key: i64, point: Uuid) -> Result<(), AppError> {
        self.run("update", move |c| {
            diesel::sql_query(
                "UPDATE naive_records SET point_id = ?, \
                 updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE pk = ?",
            )
            .bind::<Text, _>(point.to_string())
            .bind::<BigInt, _>(key)
            .execute(c)
            .map(|_| ())
        })
        .await
    }
}
