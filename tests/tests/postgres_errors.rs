//! The PostgreSQL error classifier, through the real driver against the real
//! server: one test per class of failure, each provoked for real (concurrent
//! transactions, held locks, server-side timeouts, terminated backends,
//! refused connections, constraint and data errors, a missing table).
//!
//! Every case runs twice, with the server's messages in English
//! (`english::…`) and in German (`german::…`): each session of the case sets
//! `lc_messages` at startup, and the case checks that the error really is
//! worded in that language, so the German run cannot pass in English. The
//! classification must come out the same: it goes by the SQLSTATE the server
//! sent, never by the wording. The German run needs the `de_DE.UTF-8` locale
//! on the server's machine (`.ci/locale.sh` makes it) and PostgreSQL's German
//! message catalog (Debian's `postgresql-NN` ships it); without them it fails,
//! saying which is missing. Setting `lc_messages` needs a superuser (or, from
//! PostgreSQL 15, `GRANT SET ON PARAMETER lc_messages`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use diesel_async::SimpleAsyncConnection;
use tandem_adapters::postgres::error::Phase;
use tandem_adapters::postgres::{Connection, PostgresConfig, PostgresMetadataRepo};
use tandem_core::{IntentState, MetadataError, MetadataRepo, Outcome, Settlement};
use tandem_tests::pg::data::{prepare_upsert, row};
use tandem_tests::pg::{TestSchema, admin_client, database_url, url_for_user};

/// The language of the server's messages in one run of the cases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lang {
    English,
    German,
}

impl Lang {
    /// The `lc_messages` that selects it.
    fn locale(self) -> &'static str {
        match self {
            Lang::English => "C",
            Lang::German => "de_DE.UTF-8",
        }
    }

    /// A schema whose every session gets its messages in this language.
    /// Fails, saying what is missing, if the server cannot speak it.
    async fn schema(self) -> TestSchema {
        self.assert_server_speaks().await;
        TestSchema::with_options(&format!("-c lc_messages={}", self.locale())).await
    }

    /// The server accepts the locale and translates into it.
    async fn assert_server_speaks(self) {
        let url = database_url();
        let admin = admin_client(&url).await;
        // The name comes from the match above: no user value in the SQL.
        if let Err(e) = admin
            .batch_execute(&format!("SET lc_messages = '{}'", self.locale()))
            .await
        {
            let reason = e
                .as_db_error()
                .map_or_else(|| e.to_string(), |db| db.message().to_owned());
            panic!(
                "the PostgreSQL server cannot set lc_messages = '{}': {reason} — the locale must \
                 exist on the server's machine (run .ci/locale.sh there as root; Debian: \
                 `localedef --no-archive -i de_DE -f UTF-8 de_DE.UTF-8`) and the user must be \
                 allowed to set lc_messages (superuser)",
                self.locale()
            );
        }
        let err = admin
            .batch_execute("SELECT 1/0")
            .await
            .expect_err("division by zero");
        let message = err.as_db_error().expect("a server error").message();
        let want = self.words("division by zero", "Division durch Null");
        assert_eq!(
            message,
            want,
            "the server does not word its messages in {self:?} with lc_messages = '{}' (is \
             its message catalog installed? Debian: /usr/share/locale/de/LC_MESSAGES/postgres-NN.mo)",
            self.locale()
        );
    }

    fn words<'a>(self, english: &'a str, german: &'a str) -> &'a str {
        match self {
            Lang::English => english,
            Lang::German => german,
        }
    }

    /// The error shows the server's message in this language: `english` and
    /// `german` are (part of) the same message in each.
    fn assert_worded(self, err: &MetadataError, english: &str, german: &str) {
        let shown = err.to_string();
        assert!(
            shown.contains(self.words(english, german)),
            "expected {self:?} wording ({:?}) in: {shown}",
            self.words(english, german)
        );
        if self == Lang::German {
            assert!(!shown.contains(english), "English wording in: {shown}");
        }
    }
}

fn assert_class(err: &MetadataError, want_retryable: bool, want: Outcome, code: &str) {
    assert_eq!(err.is_retryable(), want_retryable, "{err}");
    assert_eq!(err.outcome(), want, "{err}");
    assert!(
        err.to_string().contains(&format!("SQLSTATE {code}")),
        "expected SQLSTATE {code} in: {err}"
    );
}

/// A diesel-async session on the test schema, opened as the adapter opens
/// its own (so its errors keep their SQLSTATE).
async fn raw(schema: &TestSchema) -> Connection {
    Connection::open(&schema.config()).await.expect("connect")
}

/// Waits until one of the schema's repo sessions satisfies `condition` (SQL
/// over pg_stat_activity) and returns its pid.
async fn wait_for_backend(
    schema: &TestSchema,
    admin: &tokio_postgres::Client,
    condition: &str,
) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = admin
            .query(
                &format!(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND {condition}"
                ),
                &[&schema.name()],
            )
            .await
            .expect("pg_stat_activity");
        if let Some(r) = rows.first() {
            return r.get(0);
        }
        assert!(
            Instant::now() < deadline,
            "no repo session matched {condition}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Holds the intent row's lock from another session until the returned
/// transaction is dropped/rolled back.
async fn hold_intent_lock(
    admin: &mut tokio_postgres::Client,
    intent: uuid::Uuid,
) -> tokio_postgres::Transaction<'_> {
    let tx = admin.transaction().await.expect("begin");
    tx.query(
        "SELECT 1 FROM intents WHERE id = $1::text::uuid FOR UPDATE",
        &[&intent.to_string()],
    )
    .await
    .expect("lock intent");
    tx
}

async fn serialization_failure_is_transient_not_applied(lang: Lang) {
    let schema = lang.schema().await;
    let _repo = schema.repo().await; // creates the schema
    let mut a = raw(&schema).await;
    let mut b = raw(&schema).await;
    a.batch_execute(
        "CREATE TABLE counters (id int PRIMARY KEY, v int); INSERT INTO counters VALUES (1, 0)",
    )
    .await
    .unwrap();
    a.batch_execute("BEGIN ISOLATION LEVEL SERIALIZABLE; SELECT v FROM counters WHERE id = 1")
        .await
        .unwrap();
    b.batch_execute(
        "BEGIN ISOLATION LEVEL SERIALIZABLE; UPDATE counters SET v = v + 1 WHERE id = 1; COMMIT",
    )
    .await
    .unwrap();
    let err = a
        .batch_execute("UPDATE counters SET v = v + 1 WHERE id = 1")
        .await
        .expect_err("the second serializable writer must fail");
    assert_eq!(a.errors().sqlstate(&err).unwrap().code(), "40001");
    let err = a.errors().classify(err, Phase::Statement);
    assert_class(&err, true, Outcome::NotApplied, "40001");
    lang.assert_worded(
        &err,
        "could not serialize access",
        "konnte Zugriff nicht serialisieren",
    );
}

async fn deadlock_is_transient_not_applied(lang: Lang) {
    let schema = lang.schema().await;
    let _repo = schema.repo().await;
    let mut a = raw(&schema).await;
    let mut b = raw(&schema).await;
    a.batch_execute("CREATE TABLE pair (id int PRIMARY KEY); INSERT INTO pair VALUES (1), (2)")
        .await
        .unwrap();
    a.batch_execute("BEGIN; UPDATE pair SET id = id WHERE id = 1")
        .await
        .unwrap();
    b.batch_execute("BEGIN; UPDATE pair SET id = id WHERE id = 2")
        .await
        .unwrap();
    // Each now waits for the other: the server picks a victim.
    let (ea, eb) = (a.errors().clone(), b.errors().clone());
    let (ra, rb) = tokio::join!(
        a.batch_execute("UPDATE pair SET id = id WHERE id = 2"),
        b.batch_execute("UPDATE pair SET id = id WHERE id = 1"),
    );
    let (err, errors) = match (ra, rb) {
        (Err(e), Ok(())) => (e, ea),
        (Ok(()), Err(e)) => (e, eb),
        other => panic!("expected exactly one deadlock victim, got {other:?}"),
    };
    assert_eq!(errors.sqlstate(&err).unwrap().code(), "40P01");
    let err = errors.classify(err, Phase::Statement);
    assert_class(&err, true, Outcome::NotApplied, "40P01");
    lang.assert_worded(&err, "deadlock detected", "Verklemmung (Deadlock) entdeckt");
}

/// A commit whose intent row another session holds, for the lock and
/// statement timeout cases.
async fn commit_behind_held_lock(
    lang: Lang,
    adjust: impl FnOnce(&mut PostgresConfig),
) -> (MetadataError, Duration) {
    let schema = lang.schema().await;
    let repo = schema.repo_with(adjust).await;
    let rows = vec![row("s", "a"), row("s", "b")];
    let (intent, owner) = prepare_upsert(&repo, &rows).await;
    let mut admin = schema.admin().await;
    let held = hold_intent_lock(&mut admin, intent.0).await;
    let started = Instant::now();
    let err = repo
        .commit_upsert(intent, owner, &rows, None)
        .await
        .expect_err("the commit cannot get the intent's lock");
    let waited = started.elapsed();
    held.rollback().await.unwrap();
    // Nothing was written: the intent is still prepared, the rows absent, and
    // the same commit succeeds once the lock is free.
    assert!(
        repo.get(&[rows[0].id, rows[1].id])
            .await
            .unwrap()
            .is_empty()
    );
    let intents = repo.list_intents(10).await.unwrap();
    assert_eq!(intents[0].state, IntentState::Prepared);
    let done = repo
        .commit_upsert(intent, owner, &rows, None)
        .await
        .unwrap();
    assert_eq!(done.summary.inserted, 2);
    (err, waited)
}

async fn lock_timeout_is_transient_not_applied(lang: Lang) {
    let (err, waited) =
        commit_behind_held_lock(lang, |c| c.lock_timeout = Some(Duration::from_millis(200))).await;
    assert_class(&err, true, Outcome::NotApplied, "55P03");
    assert!(waited >= Duration::from_millis(200), "{waited:?}");
    lang.assert_worded(
        &err,
        "canceling statement due to lock timeout",
        "storniere Anfrage wegen Zeitüberschreitung einer Sperre",
    );
}

async fn statement_timeout_is_transient_not_applied(lang: Lang) {
    let (err, waited) = commit_behind_held_lock(lang, |c| {
        c.statement_timeout = Some(Duration::from_millis(300))
    })
    .await;
    assert_class(&err, true, Outcome::NotApplied, "57014");
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    lang.assert_worded(
        &err,
        "canceling statement due to statement timeout",
        "storniere Anfrage wegen Zeitüberschreitung der Anfrage",
    );
}

/// The server refuses the role before it applies the session's options, so
/// this refusal is worded in the server's own language whatever the
/// session asked for: only the code is checked (it comes from tokio-postgres
/// itself at connect time).
async fn too_many_connections_is_transient_not_applied(lang: Lang) {
    let schema = lang.schema().await;
    let admin = schema.admin().await;
    // A role allowed no sessions at all: the server refuses it with 53300
    // without exhausting the connections other tests use.
    let role = schema.name().to_owned();
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN PASSWORD 'limit-test' CONNECTION LIMIT 0"
        ))
        .await
        .expect("create role (the test needs CREATEROLE)");
    let mut config = PostgresConfig::new(url_for_user(schema.url(), &role, "limit-test"))
        .with_schema(schema.name());
    config.application_name = schema.name().to_owned();
    let result = PostgresMetadataRepo::connect(config).await;
    admin
        .batch_execute(&format!("DROP ROLE {role}"))
        .await
        .unwrap();
    let err = result.expect_err("a role with CONNECTION LIMIT 0 cannot connect");
    assert_class(&err, true, Outcome::NotApplied, "53300");
    assert!(
        !err.to_string().contains("limit-test"),
        "password leaked: {err}"
    );
}

/// No server answers, so there is no language: run once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_is_transient_not_applied() {
    // Nothing listens on port 1.
    let mut config = PostgresConfig::new("postgres://app:s3cret@127.0.0.1:1/test");
    config.connect_timeout = Duration::from_secs(2);
    let err = PostgresMetadataRepo::connect(config)
        .await
        .expect_err("nothing listens there");
    assert_class(&err, true, Outcome::NotApplied, "08006");
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("s3cret"), "password leaked: {shown}");
}

async fn backend_terminated_mid_transaction_is_transient_not_applied(lang: Lang) {
    let schema = lang.schema().await;
    let repo = Arc::new(schema.repo().await);
    let rows = vec![row("s", "a")];
    let (intent, owner) = prepare_upsert(&*repo, &rows).await;
    let mut admin = schema.admin().await;
    let held = hold_intent_lock(&mut admin, intent.0).await;
    let commit = tokio::spawn({
        let (repo, rows) = (repo.clone(), rows.clone());
        async move { repo.commit_upsert(intent, owner, &rows, None).await }
    });
    // The repo's session is inside its transaction, waiting for the lock.
    let killer = schema.admin().await;
    let pid = wait_for_backend(&schema, &killer, "wait_event_type = 'Lock'").await;
    killer
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let err = commit
        .await
        .unwrap()
        .expect_err("its session was terminated");
    held.rollback().await.unwrap();
    assert_class(&err, true, Outcome::NotApplied, "57P01");
    lang.assert_worded(
        &err,
        "terminating connection due to administrator command",
        "Verbindung wird abgebrochen aufgrund von Anweisung des Administrators",
    );
    // Nothing was written, and the pool replaced the dead connection.
    assert!(repo.get(&[rows[0].id]).await.unwrap().is_empty());
    let done = repo
        .commit_upsert(intent, owner, &rows, None)
        .await
        .unwrap();
    assert_eq!(done.summary.inserted, 1);
}

async fn backend_terminated_during_commit_is_transient_unknown(lang: Lang) {
    let schema = lang.schema().await;
    let repo = Arc::new(schema.repo().await);
    let admin = schema.admin().await;
    // A deferred constraint trigger runs inside COMMIT: it keeps the COMMIT in
    // flight long enough to terminate the session during it.
    admin
        .batch_execute(
            "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN PERFORM pg_sleep(5); RETURN NULL; END $$; \
             CREATE CONSTRAINT TRIGGER slow_commit AFTER UPDATE ON intents \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()",
        )
        .await
        .unwrap();
    let rows = vec![row("s", "a")];
    let (intent, owner) = prepare_upsert(&*repo, &rows).await;
    let commit = tokio::spawn({
        let (repo, rows) = (repo.clone(), rows.clone());
        async move { repo.commit_upsert(intent, owner, &rows, None).await }
    });
    let pid = wait_for_backend(
        &schema,
        &admin,
        "query = 'COMMIT' AND wait_event = 'PgSleep'",
    )
    .await;
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let err = commit
        .await
        .unwrap()
        .expect_err("its session was terminated");
    assert_class(&err, true, Outcome::Unknown, "57P01");
    lang.assert_worded(
        &err,
        "terminating connection due to administrator command",
        "Verbindung wird abgebrochen aufgrund von Anweisung des Administrators",
    );
    // The coordinator's next step: settle on a fresh connection. The
    // terminated COMMIT never completed, so the intent is fenced.
    admin
        .batch_execute("DROP TRIGGER slow_commit ON intents")
        .await
        .unwrap();
    let fence = tandem_core::OwnerToken::new_random();
    match repo.settle(intent, owner, fence).await.unwrap() {
        Settlement::NotCommitted(i) => assert_eq!(i.owner, fence),
        other => panic!("expected NotCommitted, got {other:?}"),
    }
    assert!(matches!(
        repo.commit_upsert(intent, owner, &rows, None).await,
        Err(MetadataError::Fenced { .. })
    ));
    assert!(repo.get(&[rows[0].id]).await.unwrap().is_empty());
}

async fn unique_violation_is_invalid_input(lang: Lang) {
    let schema = lang.schema().await;
    let repo = schema.repo().await;
    let first = vec![row("s", "a")];
    let (intent, owner) = prepare_upsert(&repo, &first).await;
    repo.commit_upsert(intent, owner, &first, None)
        .await
        .unwrap();
    // Another record claiming the point the first one references.
    let mut thief = row("s", "b");
    thief.point_id = first[0].point_id;
    let batch = vec![row("s", "c"), thief];
    let (intent, owner) = prepare_upsert(&repo, &batch).await;
    let err = repo
        .commit_upsert(intent, owner, &batch, None)
        .await
        .expect_err("point ids are unique");
    assert!(matches!(err, MetadataError::InvalidInput { .. }), "{err}");
    assert_class(&err, false, Outcome::NotApplied, "23505");
    lang.assert_worded(
        &err,
        "duplicate key value violates unique constraint",
        "doppelter Schlüsselwert verletzt Unique-Constraint",
    );
    assert!(
        repo.get(&[batch[0].id, batch[1].id])
            .await
            .unwrap()
            .is_empty()
    );
}

async fn invalid_text_is_invalid_input(lang: Lang) {
    let schema = lang.schema().await;
    let repo = schema.repo().await;
    let mut bad = row("s", "a");
    bad.content = "nul \0 byte".to_owned();
    let batch = vec![row("s", "ok"), bad];
    let (intent, owner) = prepare_upsert(&repo, &batch).await;
    let err = repo
        .commit_upsert(intent, owner, &batch, None)
        .await
        .expect_err("PostgreSQL text cannot hold NUL");
    assert_class(&err, false, Outcome::NotApplied, "22021");
    assert!(matches!(err, MetadataError::InvalidInput { .. }));
    lang.assert_worded(
        &err,
        "invalid byte sequence for encoding",
        "ungültige Byte-Sequenz für Kodierung",
    );
}

async fn undefined_table_is_permanent(lang: Lang) {
    let schema = lang.schema().await;
    // Not migrated: the schema has no tables.
    let repo = schema.repo_with(|c| c.migrate_on_start = false).await;
    let err = repo
        .get(&[tandem_core::RecordId::new_random()])
        .await
        .expect_err("no tables");
    assert!(matches!(err, MetadataError::Permanent { .. }), "{err}");
    assert_class(&err, false, Outcome::NotApplied, "42P01");
    lang.assert_worded(&err, "does not exist", "existiert nicht");
}

/// Each case as a test in each language: `english::<case>` and
/// `german::<case>`.
macro_rules! in_each_language {
    ($($case:ident),* $(,)?) => {
        mod english {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Lang::English).await;
                }
            )*
        }
        mod german {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Lang::German).await;
                }
            )*
        }
    };
}

in_each_language!(
    serialization_failure_is_transient_not_applied,
    deadlock_is_transient_not_applied,
    lock_timeout_is_transient_not_applied,
    statement_timeout_is_transient_not_applied,
    too_many_connections_is_transient_not_applied,
    backend_terminated_mid_transaction_is_transient_not_applied,
    backend_terminated_during_commit_is_transient_unknown,
    unique_violation_is_invalid_input,
    invalid_text_is_invalid_input,
    undefined_table_is_permanent,
);

/// The intent's mark, a commit's last statement, goes out pipelined with
/// `COMMIT`. When the server refuses it, the transaction is aborted and the
/// `COMMIT` behind it rolls back: the call reports the mark's own error, as
/// not applied, nothing of the batch is written, and the same commit goes
/// through once the cause is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_last_statement_sent_with_the_commit_writes_nothing() {
    let schema = Lang::English.schema().await;
    let repo = schema.repo().await;
    let admin = schema.admin().await;
    admin
        .batch_execute(
            "CREATE FUNCTION refuse_mark() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RAISE EXCEPTION 'the mark is refused'; END $$; \
             CREATE TRIGGER refuse_mark BEFORE UPDATE ON intents \
             FOR EACH ROW EXECUTE FUNCTION refuse_mark()",
        )
        .await
        .unwrap();
    let rows = vec![row("s", "a"), row("s", "b")];
    let (intent, owner) = prepare_upsert(&repo, &rows).await;
    let err = repo
        .commit_upsert(intent, owner, &rows, None)
        .await
        .expect_err("the mark was refused");
    assert_class(&err, false, Outcome::NotApplied, "P0001");
    assert!(err.to_string().contains("the mark is refused"), "{err}");
    let ids = [rows[0].id, rows[1].id];
    assert!(repo.get(&ids).await.unwrap().is_empty(), "rows committed");
    let listed = repo.list_intents(100).await.unwrap();
    let stored = listed.iter().find(|i| i.id == intent).expect("the intent");
    assert_eq!(stored.state, IntentState::Prepared);
    admin
        .batch_execute("DROP TRIGGER refuse_mark ON intents")
        .await
        .unwrap();
    let done = repo
        .commit_upsert(intent, owner, &rows, None)
        .await
        .unwrap();
    assert_eq!(done.summary.inserted, 2);
    assert_eq!(repo.get(&ids).await.unwrap().len(), 2);
}
