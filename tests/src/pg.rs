//! PostgreSQL for the suites: each test gets a schema of its own (random name)
//! on the server at `DATABASE_URL`, dropped when the [`TestSchema`] is dropped,
//! even if the test panicked.
//!
//! When `DATABASE_URL` is unset the local default
//! (`postgres://postgres@127.0.0.1:5432/test`) is used. An unreachable server
//! fails the test with a message saying so: these suites never skip silently.

pub mod proxy;

use std::net::SocketAddr;
use std::time::Duration;

use tandem_adapters::postgres::{PostgresConfig, PostgresMetadataRepo, SecretUrl};

/// The server used when `DATABASE_URL` is not set.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// `DATABASE_URL`, or [`DEFAULT_DATABASE_URL`].
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned())
}

/// Opens a plain tokio-postgres session (for test-side actions: holding locks,
/// terminating backends, inspecting tables). Panics, saying the server is
/// unreachable, if it cannot connect.
pub async fn admin_client(url: &str) -> tokio_postgres::Client {
    let mut config: tokio_postgres::Config = url
        .parse()
        .unwrap_or_else(|e| panic!("DATABASE_URL {} is invalid: {e}", SecretUrl::new(url)));
    config.connect_timeout(Duration::from_secs(5));
    config.application_name("tandem-test-admin");
    match config.connect(tokio_postgres::NoTls).await {
        Ok((client, connection)) => {
            tokio::spawn(async move {
                let _ = connection.await;
            });
            client
        }
        Err(e) => panic!(
            "the PostgreSQL server at {} is unreachable: {e} — start it, or point \
             DATABASE_URL at a reachable server",
            SecretUrl::new(url)
        ),
    }
}

/// A schema of its own for one test.
#[derive(Debug)]
pub struct TestSchema {
    name: String,
    url: String,
}

impl TestSchema {
    /// A fresh random schema name on the test server (created by the first
    /// migration). Panics if the server is unreachable.
    pub async fn new() -> Self {
        Self::at(database_url()).await
    }

    /// Like [`TestSchema::new`], but every session made through it (repos,
    /// [`TestSchema::admin`] sessions) starts with these server options
    /// (libpq's `options`, e.g. `-c lc_messages=de_DE.UTF-8`), added to any
    /// the URL has.
    pub async fn with_options(options: &str) -> Self {
        Self::at(url_with_options(&database_url(), options)).await
    }

    async fn at(url: String) -> Self {
        // Fail here, with a clear message, rather than deep inside a test.
        let client = admin_client(&url).await;
        client
            .simple_query("SELECT 1")
            .await
            .unwrap_or_else(|e| panic!("the PostgreSQL server answered with an error: {e}"));
        let name = format!("tandem_t_{}", uuid::Uuid::new_v4().simple());
        Self { name, url }
    }

    /// The schema's name (also the `application_name` of the repos it makes).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A configuration for this schema: migrate on start, a pool of 4,
    /// `application_name` = the schema's name (so that tests can find and kill
    /// the repo's sessions).
    pub fn config(&self) -> PostgresConfig {
        let mut config = PostgresConfig::new(self.url.as_str()).with_schema(self.name.as_str());
        config.pool_size = 4;
        config.migrate_on_start = true;
        config.application_name = self.name.clone();
        config
    }

    /// A migrated repo on this schema.
    pub async fn repo(&self) -> PostgresMetadataRepo {
        self.repo_with(|_| {}).await
    }

    /// A migrated repo on this schema, with the configuration adjusted.
    pub async fn repo_with(
        &self,
        adjust: impl FnOnce(&mut PostgresConfig),
    ) -> PostgresMetadataRepo {
        let mut config = self.config();
        adjust(&mut config);
        PostgresMetadataRepo::connect(config)
            .await
            .unwrap_or_else(|e| panic!("cannot open the PostgreSQL repo on {}: {e}", self.name))
    }

    /// A plain session with `search_path` set to this schema.
    pub async fn admin(&self) -> tokio_postgres::Client {
        let client = admin_client(&self.url).await;
        client
            .batch_execute(&format!("SET search_path TO {}", self.name))
            .await
            .expect("set search_path");
        client
    }

    /// Empties the schema's tables (between cases that reuse one schema).
    pub async fn truncate(&self, admin: &tokio_postgres::Client) {
        admin
            .batch_execute(&format!(
                "TRUNCATE {0}.records, {0}.intents, {0}.idempotency_keys, {0}.intent_undo, \
                 {0}.sagas, {0}.pending_claims",
                self.name
            ))
            .await
            .expect("truncate");
    }

    /// Server process ids of the sessions whose `application_name` is this
    /// schema's name (the repos made by [`TestSchema::config`]).
    pub async fn backend_pids(&self, admin: &tokio_postgres::Client) -> Vec<i32> {
        admin
            .query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1 \
                 AND pid <> pg_backend_pid()",
                &[&self.name],
            )
            .await
            .expect("list backends")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// Terminates every session of this schema's repos; returns how many.
    pub async fn terminate_backends(&self, admin: &tokio_postgres::Client) -> usize {
        admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = $1 AND pid <> pg_backend_pid()",
                &[&self.name],
            )
            .await
            .expect("terminate backends")
            .len()
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        // Drop may run inside a runtime (or while panicking): do the cleanup on
        // a thread of its own with its own small runtime.
        let (name, url) = (self.name.clone(), self.url.clone());
        let cleanup = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            rt.block_on(async move {
                let Ok(config) = url.parse::<tokio_postgres::Config>() else {
                    return;
                };
                let Ok((client, connection)) = config.connect(tokio_postgres::NoTls).await else {
                    return;
                };
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                // Sessions left in a transaction would block the drop.
                let _ = client
                    .query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE application_name = $1 AND pid <> pg_backend_pid()",
                        &[&name],
                    )
                    .await;
                // The name is ours (tandem_t_ + hex): safe to format.
                let _ = client
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                    .await;
            });
        });
        let _ = cleanup.join();
    }
}

/// A connection string for the same server and database as `url`, logging in
/// as `user` with `password`, with `url`'s server options (libpq `key=value`
/// form).
pub fn url_for_user(url: &str, user: &str, password: &str) -> String {
    let config: tokio_postgres::Config = url.parse().expect("valid DATABASE_URL");
    let dbname = config.get_dbname().unwrap_or(user);
    let mut s = format!(
        "{} dbname={} user={} password={}",
        host_port(&config),
        quote_kv(dbname),
        quote_kv(user),
        quote_kv(password)
    );
    if let Some(options) = config.get_options() {
        s.push_str(&format!(" options={}", quote_kv(options)));
    }
    s
}

/// A connection string for the same server, database, user and password as
/// `url`, whose sessions start with `options` (after any `url` has), in
/// libpq `key=value` form.
pub fn url_with_options(url: &str, options: &str) -> String {
    let config: tokio_postgres::Config = url.parse().expect("valid DATABASE_URL");
    let user = config.get_user().unwrap_or("postgres");
    let dbname = config.get_dbname().unwrap_or(user);
    let options = match config.get_options() {
        Some(existing) => format!("{existing} {options}"),
        None => options.to_owned(),
    };
    let mut s = format!(
        "{} dbname={} user={} options={}",
        host_port(&config),
        quote_kv(dbname),
        quote_kv(user),
        quote_kv(&options)
    );
    if let Some(pw) = config.get_password() {
        s.push_str(&format!(
            " password={}",
            quote_kv(&String::from_utf8_lossy(pw))
        ));
    }
    s
}

/// `host=… port=…` for the first host of `config`.
fn host_port(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("host={} port={port}", quote_kv(&host))
}

/// The server's TCP address (for a proxy in front of it).
pub async fn server_addr(url: &str) -> SocketAddr {
    let config: tokio_postgres::Config = url.parse().expect("valid DATABASE_URL");
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => panic!("the proxy tests need a TCP DATABASE_URL"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    tokio::net::lookup_host((host.as_str(), port))
        .await
        .expect("resolve the server")
        .next()
        .expect("the server has an address")
}

/// A connection string for the same database, user and password as `url`,
/// but reaching the server at `addr` (libpq `key=value` form).
pub fn url_via(url: &str, addr: SocketAddr) -> String {
    let config: tokio_postgres::Config = url.parse().expect("valid DATABASE_URL");
    let user = config.get_user().unwrap_or("postgres");
    let dbname = config.get_dbname().unwrap_or(user);
    let mut s = format!(
        "host={} port={} dbname={} user={}",
        addr.ip(),
        addr.port(),
        quote_kv(dbname),
        quote_kv(user)
    );
    if let Some(pw) = config.get_password() {
        s.push_str(&format!(
            " password={}",
            quote_kv(&String::from_utf8_lossy(pw))
        ));
    }
    s
}

fn quote_kv(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Test data: rows and intents in the shapes the coordinator would write.
pub mod data {
    use serde_json::{Map, Value, json};
    use tandem_core::{
        IntentId, IntentKind, MetadataRepo, NewIntent, OwnerToken, PointId, RecordId, RowWrite,
        Scope,
    };

    /// A row for a new record with a fresh point.
    pub fn row(scope: &str, content: &str) -> RowWrite {
        RowWrite {
            id: RecordId::new_v7(),
            scope: Scope::new(scope),
            content: content.to_owned(),
            metadata: meta(json!({"content": content})),
            point_id: PointId::new_random(),
            vector: vec![0.5, -0.25, 1.0],
        }
    }

    /// The same record, rewritten with a fresh point (an update).
    pub fn rewrite(row: &RowWrite, content: &str) -> RowWrite {
        RowWrite {
            content: content.to_owned(),
            point_id: PointId::new_random(),
            ..row.clone()
        }
    }

    /// A JSON object as metadata.
    pub fn meta(v: Value) -> Map<String, Value> {
        v.as_object().cloned().expect("a JSON object")
    }

    /// Prepares an upsert intent for `rows` (lease far in the future); returns
    /// its id and owner.
    pub async fn prepare_upsert<M: MetadataRepo + ?Sized>(
        repo: &M,
        rows: &[RowWrite],
    ) -> (IntentId, OwnerToken) {
        prepare_intent(
            repo,
            IntentKind::Upsert,
            rows.iter().map(|r| r.point_id).collect(),
        )
        .await
    }

    /// Prepares an intent of `kind` naming `point_ids`, whose lease never
    /// ends within a test.
    pub async fn prepare_intent<M: MetadataRepo + ?Sized>(
        repo: &M,
        kind: IntentKind,
        point_ids: Vec<PointId>,
    ) -> (IntentId, OwnerToken) {
        let intent = NewIntent {
            id: IntentId::new_v7(),
            kind,
            owner: OwnerToken::new_random(),
            lease_deadline_ms: i64::MAX / 2,
            point_ids,
            created_ms: 1,
            generation: 0,
        };
        repo.prepare(&intent).await.expect("prepare");
        (intent.id, intent.owner)
    }
}
