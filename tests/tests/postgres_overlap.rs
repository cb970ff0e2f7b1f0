//! The PostgreSQL adapter's gated commit (`commit_upsert_gated`), which the
//! coordinator overlaps with the index write, checked against the real server:
//!
//! - while the gate is undecided, the commit's statements have run inside an
//!   open transaction that holds the intent's and the rows' locks, and nothing
//!   is visible — on a fresh connection (the pipelined `BEGIN` and the intent
//!   lock both need a Parse first) and on a warm one (both cached);
//! - a failed gate ends the transaction and leaves the connection reusable;
//! - end to end, a backend terminated while the commit waits for the index
//!   write is settled and retried: the call succeeds and the stores converge;
//! - what goes out together: an index switch's writes while the index write
//!   is in flight, and a deferred write's round trips, counted on the wire.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_adapters::memory::InMemoryVectorIndex;
use tandem_adapters::postgres::PostgresMetadataRepo;
use tandem_core::testkit::faults::{Call, Fault, FaultController, FaultyVectorIndex, Rule};
use tandem_core::{
    CommitPart, Coordinator, CoordinatorConfig, Distance, IndexGate, MetadataError, MetadataRepo,
    NewRecord, RecordId, RetryPolicy, RowWrite, TransactionCommit, WriteOptions,
};
use tandem_tests::invariants;
use tandem_tests::pg::data::{prepare_intent, prepare_upsert, rewrite, row};
use tandem_tests::pg::proxy::CommitProxy;
use tandem_tests::pg::{TestSchema, server_addr, url_via};
use tokio_postgres::error::SqlState;

/// Waits until the schema's repo sessions include one in `state` and returns
/// its pid.
async fn wait_for_session(schema: &TestSchema, admin: &tokio_postgres::Client, state: &str) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = admin
            .query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND state = $2",
                &[&schema.name(), &state],
            )
            .await
            .expect("pg_stat_activity");
        if let Some(r) = rows.first() {
            return r.get(0);
        }
        assert!(
            Instant::now() < deadline,
            "no repo session became {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `check` holds, looking every 10 ms; fails, naming `what`,
/// if it does not within ten seconds (a safety net, not a timing bound).
async fn until<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether `FOR UPDATE NOWAIT` on the row with this id fails because another
/// transaction holds its lock.
async fn locked(admin: &tokio_postgres::Client, table: &str, id: uuid::Uuid) -> bool {
    let sql = format!("SELECT 1 FROM {table} WHERE id = $1::text::uuid FOR UPDATE NOWAIT");
    match admin.query(&sql, &[&id.to_string()]).await {
        Ok(_) => false,
        Err(e) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => true,
        Err(e) => panic!("probing the lock on {table}: {e}"),
    }
}

/// Waits until the row with this id is locked by another transaction, or
/// gives up after ten seconds. A session shows `idle in transaction` between
/// any two of the commit's statements, so one look is not enough: the probe
/// waits for the state the gate must hold, which only an open commit reaches.
async fn eventually_locked(admin: &tokio_postgres::Client, table: &str, id: uuid::Uuid) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if locked(admin, table, id).await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn count(admin: &tokio_postgres::Client, sql: &str, id: uuid::Uuid) -> i64 {
    admin
        .query_one(sql, &[&id.to_string()])
        .await
        .expect("count")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gated_commit_runs_its_statements_in_an_open_transaction_before_the_gate() {
    let schema = TestSchema::new().await;
    let admin = schema.admin().await;
    let seeding = schema.repo().await;
    let mut current = row("overlap", "v0");
    let (i, o) = prepare_upsert(&seeding, std::slice::from_ref(&current)).await;
    seeding
        .commit_upsert(i, o, std::slice::from_ref(&current), None)
        .await
        .expect("seed");
    drop(seeding);

    // One connection: the first round runs on a connection that has never
    // sent `BEGIN` or the intent lock (both need a Parse first); the second
    // reuses it with both cached.
    let repo = schema.repo_with(|c| c.pool_size = 1).await;
    for round in ["fresh connection", "warm connection"] {
        let update = rewrite(&current, round);
        let new = row("overlap", round);
        let rows = [update.clone(), new.clone()];
        let (intent, owner) = prepare_upsert(&repo, &rows).await;
        let (opener, gate) = IndexGate::pending();
        let commit = repo.commit_upsert_gated(intent, owner, &rows, None, &gate);
        let probe = async {
            wait_for_session(&schema, &admin, "idle in transaction").await;
            assert!(
                eventually_locked(&admin, "intents", intent.0).await,
                "{round}: the intent is not locked by the open commit"
            );
            assert!(
                eventually_locked(&admin, "records", update.id.0).await,
                "{round}: the updated row is not locked by the open commit"
            );
            assert_eq!(
                count(
                    &admin,
                    "SELECT count(*) FROM records WHERE id = $1::text::uuid",
                    new.id.0
                )
                .await,
                0,
                "{round}: the new row is visible before the gate"
            );
            assert_eq!(
                count(
                    &admin,
                    "SELECT count(*) FROM intents WHERE id = $1::text::uuid AND state = 'prepared'",
                    intent.0
                )
                .await,
                1,
                "{round}: the intent is committed before the gate"
            );
            opener.decide(true);
        };
        let (committed, ()) = tokio::join!(commit, probe);
        let committed = committed.unwrap_or_else(|e| panic!("{round}: {e}"));
        assert_eq!(committed.old_point_ids, vec![current.point_id], "{round}");
        assert!(!locked(&admin, "intents", intent.0).await, "{round}");
        let stored = repo.get(&[update.id, new.id]).await.expect("get");
        assert_eq!(stored.len(), 2, "{round}");
        assert!(stored.iter().any(|r| r.point_id == update.point_id));
        current = update;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_gate_ends_the_transaction_and_keeps_the_connection() {
    let schema = TestSchema::new().await;
    let admin = schema.admin().await;
    let repo = schema.repo_with(|c| c.pool_size = 1).await;
    let rows = [row("overlap", "never")];
    let (intent, owner) = prepare_upsert(&repo, &rows).await;
    let (opener, gate) = IndexGate::pending();
    let commit = repo.commit_upsert_gated(intent, owner, &rows, None, &gate);
    let probe = async {
        wait_for_session(&schema, &admin, "idle in transaction").await;
        opener.decide(false);
    };
    let (result, ()) = tokio::join!(commit, probe);
    assert!(
        matches!(result, Err(MetadataError::Aborted { intent: i }) if i == intent),
        "{result:?}"
    );
    wait_for_session(&schema, &admin, "idle").await;
    assert!(!locked(&admin, "intents", intent.0).await);
    // The one pooled connection was kept and works.
    let status = repo.pool_status();
    assert_eq!((status.connections, status.idle), (1, 1));
    let (i2, o2) = prepare_upsert(&repo, &rows).await;
    let done = repo
        .commit_upsert_gated(i2, o2, &rows, None, &IndexGate::passed())
        .await
        .expect("the next commit on the same connection");
    assert_eq!(done.summary.inserted, 1);
}

/// A coordinator on PostgreSQL whose index write is slow: the commit waits
/// for it inside its open transaction, and the test terminates that backend.
/// (The repo is not behind a fault wrapper: wrappers await the gate before
/// the store's gated commit starts, which would take the overlap away.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_terminated_while_the_commit_waits_for_the_index_is_settled_and_retried() {
    let schema = TestSchema::new().await;
    let admin = schema.admin().await;
    let repo = Arc::new(schema.repo().await);
    let index = Arc::new(InMemoryVectorIndex::new(3, Distance::Cosine));
    let ctl = FaultController::new(7);
    ctl.add(Rule::once(
        Call::IndexUpsert,
        0,
        Fault::Delay(Duration::from_millis(1500)),
    ));
    let config = CoordinatorConfig {
        call_deadline: Duration::from_secs(10),
        cleanup_deadline: Duration::from_secs(5),
        lease: Duration::from_secs(60),
        retry: RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
        },
        ..CoordinatorConfig::default()
    };
    assert!(config.overlap_index_write, "the default overlaps");
    let coordinator = Coordinator::new(
        repo.clone(),
        FaultyVectorIndex::new(index.clone(), ctl.clone()),
        config,
    )
    .expect("config");
    let batch: Vec<NewRecord> = (0..5)
        .map(|n| NewRecord::new("overlap", format!("r{n}"), vec![1.0, n as f32, 0.5]))
        .collect();
    let upsert = coordinator.upsert(batch);
    let kill = async {
        let pid = wait_for_session(&schema, &admin, "idle in transaction").await;
        let killed: bool = admin
            .query_one("SELECT pg_terminate_backend($1)", &[&pid])
            .await
            .expect("terminate")
            .get(0);
        assert!(killed);
    };
    let (report, ()) = tokio::join!(upsert, kill);
    // The commit's session died before COMMIT: the call settled the intent
    // (not committed, fenced), retried the commit under the fence token, and
    // that commit went through.
    let report = report.expect("settled, retried under the fence token, committed");
    assert_eq!(report.inserted, 5);
    assert_eq!(ctl.invocations(Call::IndexUpsert), 1, "one index write");

    let rows = invariants::rows(&*repo).await.expect("rows");
    assert_eq!(rows.len(), 5);
    let points = invariants::points(&*index).await.expect("points");
    let referenced: std::collections::BTreeSet<_> = rows.values().map(|r| r.point_id).collect();
    let present: std::collections::BTreeSet<_> = points.keys().copied().collect();
    assert_eq!(present, referenced, "index = referenced points exactly");
    assert!(
        repo.list_intents(10).await.expect("intents").is_empty(),
        "the call resolved its intent"
    );
}

/// Two repos on one schema, and the record both race to insert: `first`
/// by a gated commit on `first_repo`, `second` (the same record, other
/// content) by a commit on `second_repo`.
struct Race {
    schema: TestSchema,
    admin: tokio_postgres::Client,
    first_repo: PostgresMetadataRepo,
    second_repo: PostgresMetadataRepo,
    first: RowWrite,
    second: RowWrite,
}

impl Race {
    async fn new() -> Self {
        let schema = TestSchema::new().await;
        let admin = schema.admin().await;
        let first_repo = schema.repo().await;
        let second_repo = schema.repo().await;
        let first = row("race", "first");
        let second = rewrite(&first, "second");
        Self {
            schema,
            admin,
            first_repo,
            second_repo,
            first,
            second,
        }
    }

    /// Runs `commit` (of `second`, on `second_repo`) while the gated commit
    /// of `first` has inserted the record and waits at its gate,
    /// uncommitted: `commit` does not see that row, so its insert waits for
    /// the first transaction, which is then let through. Returns `commit`'s
    /// result.
    async fn run<T>(
        &self,
        commit: impl Future<Output = Result<T, MetadataError>>,
    ) -> Result<T, MetadataError> {
        let first = std::slice::from_ref(&self.first);
        let (i1, o1) = prepare_upsert(&self.first_repo, first).await;
        let (opener, gate) = IndexGate::pending();
        let held = self
            .first_repo
            .commit_upsert_gated(i1, o1, first, None, &gate);
        let racing = async {
            // Idle in its transaction, and past its insert: a session is
            // idle in transaction between any two statements, so the state
            // alone could be seen before the insert went out.
            let pid = wait_for_session(&self.schema, &self.admin, "idle in transaction").await;
            until("the first commit inserts", || async {
                !self
                    .admin
                    .query(
                        "SELECT 1 FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
                         WHERE l.pid = $1 AND c.relname = 'records' \
                         AND l.mode = 'RowExclusiveLock'",
                        &[&pid],
                    )
                    .await
                    .expect("pg_locks")
                    .is_empty()
            })
            .await;
            let release = async {
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    let waiting = self
                        .admin
                        .query(
                            "SELECT 1 FROM pg_stat_activity WHERE application_name = $1 \
                             AND wait_event_type = 'Lock'",
                            &[&self.schema.name()],
                        )
                        .await
                        .expect("pg_stat_activity");
                    if !waiting.is_empty() {
                        break;
                    }
                    assert!(Instant::now() < deadline, "the second insert never waited");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                opener.decide(true);
            };
            let (result, ()) = tokio::join!(commit, release);
            result
        };
        let (held, raced) = tokio::join!(held, racing);
        held.expect("the first commit");
        raced
    }
}

/// Asserts that the intent is still prepared: a failed commit left it as
/// it was.
async fn assert_still_prepared(admin: &tokio_postgres::Client, intent: tandem_core::IntentId) {
    assert_eq!(
        count(
            admin,
            "SELECT count(*) FROM intents WHERE id = $1::text::uuid AND state = 'prepared'",
            intent.0
        )
        .await,
        1,
        "the failed commit changed its intent"
    );
}

/// Asserts a retryable failure that applied nothing.
fn assert_retryable_not_applied<T: std::fmt::Debug>(raced: Result<T, MetadataError>) {
    match raced {
        Err(MetadataError::Transient {
            outcome: tandem_core::Outcome::NotApplied,
            ..
        }) => {}
        other => panic!("expected a retryable not-applied failure, got {other:?}"),
    }
}

/// The commit inserts new records with a plain insert after locking the rows
/// that exist. A record another transaction inserts in between (here: a
/// gated commit holding it uncommitted) makes the plain insert wait for that
/// transaction and then fail on the primary key: the commit must fail as
/// retryable and not applied, write nothing, and its retry must find the row
/// and update it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_inserted_by_a_concurrent_commit_fails_the_insert_retryably() {
    let race = Race::new().await;
    let (first, second, repo) = (&race.first, &race.second, &race.second_repo);
    let (i2, o2) = prepare_upsert(repo, std::slice::from_ref(second)).await;
    let raced = race
        .run(repo.commit_upsert(i2, o2, std::slice::from_ref(second), None))
        .await;
    assert_retryable_not_applied(raced);
    let stored = repo.get(&[first.id]).await.expect("get");
    assert_eq!(stored.len(), 1);
    assert_eq!(
        stored[0].point_id, first.point_id,
        "the failed commit wrote"
    );
    assert_still_prepared(&race.admin, i2).await;

    // The retry finds the row, locks it and updates it.
    let retried = repo
        .commit_upsert(i2, o2, std::slice::from_ref(second), None)
        .await
        .expect("the retry");
    assert_eq!(retried.old_point_ids, vec![first.point_id]);
    let stored = repo.get(&[first.id]).await.expect("get");
    assert_eq!(stored[0].point_id, second.point_id);
    assert_eq!(stored[0].version, 2);
}

/// The same race with a deferred write second: its insert and the record's
/// first pending entry go out pipelined, and the failed insert aborts the
/// entry's statements with it — no row, no entry, the intent untouched;
/// the retry updates the row the first commit inserted and enqueues the
/// new version, over the indexed one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_insert_of_a_record_inserted_concurrently_fails_retryably_without_an_entry() {
    let race = Race::new().await;
    let (first, second, repo) = (&race.first, &race.second, &race.second_repo);
    let (i2, o2) = prepare_upsert(repo, &[]).await;
    let parts = [CommitPart::Defer {
        rows: vec![second.clone()],
        now_ms: 7,
    }];
    let commit = TransactionCommit::of(&parts);
    let passed = IndexGate::passed();
    let raced = race
        .run(repo.commit_transaction(i2, o2, &commit, None, &passed))
        .await;
    assert_retryable_not_applied(raced);
    let stored = repo.get(&[first.id]).await.expect("get");
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].version, 1, "the failed commit wrote");
    assert!(
        repo.pending_for(&[first.id])
            .await
            .expect("pending_for")
            .is_empty(),
        "the failed commit left an entry"
    );
    assert_still_prepared(&race.admin, i2).await;

    let retried = repo
        .commit_transaction(i2, o2, &commit, None, &passed)
        .await
        .expect("the retry");
    assert_eq!(retried.versions, vec![(first.id, 2)]);
    let stored = repo.get(&[first.id]).await.expect("get");
    assert_eq!(stored[0].version, 2);
    assert_eq!(
        stored[0].point_id, first.point_id,
        "a deferred write keeps the point"
    );
    let entries = repo.pending_for(&[first.id]).await.expect("pending_for");
    assert_eq!(entries.len(), 1);
    assert_eq!((entries[0].version, entries[0].indexed_version), (2, 1));
}

/// An index switch's writes (the rows' new points, the entries' delete, the
/// intent's mark) wait for nothing but `COMMIT`. While the worker's index
/// write is still in flight (the gate undecided) they go out at once, so
/// that their work overlaps the write instead of following it: the open
/// transaction's last statement is the mark, and nothing is visible yet.
/// Once the gate passes, the switch commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_switch_sends_its_writes_while_the_index_write_is_in_flight() {
    use tandem_core::{IndexSwitch, IntentKind, OwnerToken, PointId};
    const NOW: i64 = 2_000_000_000_000;
    let schema = TestSchema::new().await;
    let repo = Arc::new(schema.repo().await);
    let admin = schema.admin().await;
    let a = row("switch", "a");
    let (deferred, deferred_owner) = prepare_upsert(&*repo, &[]).await;
    let parts = [CommitPart::Defer {
        rows: vec![a.clone()],
        now_ms: 1_000,
    }];
    repo.commit_transaction(
        deferred,
        deferred_owner,
        &TransactionCommit::of(&parts),
        None,
        &IndexGate::passed(),
    )
    .await
    .expect("deferred write");
    let claim = OwnerToken::new_random();
    let claimed = repo
        .claim_pending(NOW, claim, NOW + 600_000, 10)
        .await
        .expect("claim");
    assert_eq!(claimed.len(), 1);
    let point = PointId::new_random();
    let (switch, switch_owner) = prepare_intent(&*repo, IntentKind::Index, vec![point]).await;
    let (opener, gate) = IndexGate::pending();
    let commit = tokio::spawn({
        let repo = repo.clone();
        let switches = vec![IndexSwitch {
            record_id: a.id,
            version: claimed[0].version,
            point_id: point,
        }];
        async move {
            let parts = [CommitPart::Index {
                claim,
                switches,
                now_ms: NOW,
            }];
            repo.commit_transaction(
                switch,
                switch_owner,
                &TransactionCommit::of(&parts),
                None,
                &gate,
            )
            .await
        }
    });
    until("the switch's writes go out before the gate", || async {
        admin
            .query(
                "SELECT query FROM pg_stat_activity WHERE application_name = $1 \
                 AND state = 'idle in transaction'",
                &[&schema.name()],
            )
            .await
            .expect("pg_stat_activity")
            .iter()
            .any(|r| {
                r.get::<_, String>(0)
                    .starts_with("UPDATE intents SET state")
            })
    })
    .await;
    assert_eq!(
        count(
            &admin,
            "SELECT count(*) FROM records WHERE id = $1::text::uuid AND pending_ms IS NOT NULL",
            a.id.0
        )
        .await,
        1,
        "the entry's delete is visible before the gate"
    );
    assert_eq!(
        repo.get(&[a.id]).await.expect("get")[0].point_id,
        a.point_id
    );
    opener.decide(true);
    let done = commit.await.expect("join").expect("the switch commits");
    assert!(done.garbage.is_empty(), "{:?}", done.garbage);
    let now = repo.get(&[a.id]).await.expect("get");
    assert_eq!(now[0].point_id, point);
    assert!(repo.pending_for(&[a.id]).await.expect("pending").is_empty());
}

/// The round trips of one call of `call`: the fewest of five calls (a
/// proxy's count can only be too high — a client stalled in the middle of
/// a pipeline — see `CommitProxy::round_trips`).
async fn fewest_round_trips<F, Fut>(proxy: &CommitProxy, call: F) -> usize
where
    F: Fn(u32) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut fewest = usize::MAX;
    for n in 0..5 {
        let before = proxy.round_trips();
        call(n).await;
        fewest = fewest.min(proxy.round_trips() - before);
    }
    fewest
}

/// What goes out together (`docs/postgres.md`), counted on the wire: a
/// deferred write of new records is two round trips — `BEGIN` with the
/// intent's insert and the lock of existing rows; then the inserts, the
/// intent's mark and `COMMIT` — and one that updates existing records is
/// three (their update answers the versions their entries take). A
/// statement queued for `COMMIT` does not send the ones queued before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_write_is_two_round_trips_and_three_when_it_updates() {
    let schema = TestSchema::new().await;
    let proxy = CommitProxy::start(server_addr(schema.url()).await).await;
    let repo = schema
        .repo_with(|c| {
            c.url = url_via(schema.url(), proxy.addr()).into();
            // One warm session, never verified with a `SELECT 1` of its own.
            c.pool_size = 1;
            c.verify_idle_after = Duration::from_secs(3600);
        })
        .await;
    let coordinator = Coordinator::new(
        repo,
        InMemoryVectorIndex::new(3, Distance::Cosine),
        CoordinatorConfig::default(),
    )
    .expect("config");
    let deferred = WriteOptions::deferred();
    let batch = |scope: &str, n: u32| -> Vec<NewRecord> {
        (0..10u8)
            .map(|i| {
                NewRecord::new(scope, format!("v{n}"), vec![1.0, f32::from(i), 0.5])
                    .with_id(RecordId(uuid::Uuid::from_u128(u128::from(i) + 1)))
            })
            .collect()
    };
    let write = |records: Vec<NewRecord>| async {
        coordinator
            .upsert_with(records, &deferred)
            .await
            .expect("deferred write");
    };
    // Warm: the session prepares each statement on its first use.
    write(batch("updates", 0)).await;
    write(batch("updates", 1)).await;
    // Every answer takes 25 ms to come back: a pipeline goes out whole
    // before its first answer arrives.
    proxy.delay_answers(Duration::from_millis(25));
    let new = fewest_round_trips(&proxy, |n| {
        let fresh: Vec<NewRecord> = (0..10)
            .map(|i| NewRecord::new("new", format!("{n}-{i}"), vec![1.0, i as f32, 0.5]))
            .collect();
        write(fresh)
    })
    .await;
    assert_eq!(new, 2, "a deferred write of new records");
    let updates = fewest_round_trips(&proxy, |n| write(batch("updates", n + 2))).await;
    assert_eq!(updates, 3, "a deferred write that updates existing records");
}
