//! Real database faults under the coordinator, PostgreSQL + the in-memory
//! index. Every case ends with recovery and checks that the invariants hold:
//! the call's answer matches the store (I3: all or nothing, never "success"
//! for an uncommitted write, never "not applied" for a committed one), and
//! after recovery the index holds exactly the referenced points (I2) and
//! verify / repair converge (I7).
//!
//! - the adapter's backend terminated (`pg_terminate_backend`) while it is in
//!   each protocol step: prepare, a commit statement, COMMIT in flight, the
//!   settle that follows, cleanup's resolve, a delete's commit, recovery's
//!   claim;
//! - a TCP proxy losing the connection right before / right after COMMIT;
//! - `lock_timeout` / `statement_timeout` expiring;
//! - 8 concurrent writers on overlapping hot ids;
//! - every server connection reset, repeatedly, during a run;
//! - 4 coordinators (4 pools, as 4 processes would) recovering the same
//!   expired intents.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tandem_adapters::memory::InMemoryVectorIndex;
use tandem_adapters::postgres::{PostgresConfig, PostgresMetadataRepo};
use tandem_core::testkit::clock::ManualClock;
use tandem_core::{
    Clock, Coordinator, CoordinatorConfig, CoordinatorError, DeleteSelector, Distance, IntentId,
    IntentKind, MetadataRepo, NewIntent, NewRecord, Outcome, OwnerToken, Point, PointId, RecordId,
    RetryPolicy, RowWrite, Scope, StoredRecord, VectorIndex,
};
use tandem_tests::invariants;
use tandem_tests::pg::proxy::{CommitFault, CommitProxy};
use tandem_tests::pg::{TestSchema, server_addr, url_via};
use uuid::Uuid;

const DIM: usize = 4;

type Coord = Coordinator<Arc<PostgresMetadataRepo>, Arc<InMemoryVectorIndex>>;

fn config() -> CoordinatorConfig {
    CoordinatorConfig {
        call_deadline: Duration::from_secs(4),
        cleanup_deadline: Duration::from_secs(3),
        lease: Duration::from_secs(60),
        retry: RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(200),
        },
        orphan_grace: Duration::from_secs(60),
        ..CoordinatorConfig::default()
    }
}

fn rid(n: u128) -> RecordId {
    RecordId(Uuid::from_u128(n))
}

fn vector(n: u128, v: u32) -> Vec<f32> {
    vec![
        (n % 97) as f32 + 1.0,
        v as f32 + 1.0,
        0.5,
        1.0 / ((n % 13) as f32 + 1.0),
    ]
}

fn rec(n: u128, v: u32) -> NewRecord {
    let scope = if n.is_multiple_of(2) { "even" } else { "odd" };
    NewRecord::new(scope, format!("record {n} v{v}"), vector(n, v))
        .with_id(rid(n))
        .with_metadata(json!({ "n": n as u64, "v": v }))
}

/// A schema, a repo on it, an in-memory index and the clock leases follow.
struct Fixture {
    schema: TestSchema,
    repo: Arc<PostgresMetadataRepo>,
    index: Arc<InMemoryVectorIndex>,
    clock: ManualClock,
}

impl Fixture {
    async fn new() -> Self {
        Self::with(|_| {}).await
    }

    async fn with(adjust: impl FnOnce(&mut PostgresConfig)) -> Self {
        let schema = TestSchema::new().await;
        let repo = Arc::new(schema.repo_with(adjust).await);
        Self {
            schema,
            repo,
            index: Arc::new(InMemoryVectorIndex::new(DIM, Distance::Cosine)),
            clock: ManualClock::new(1_700_000_000_000),
        }
    }

    fn coordinator(&self) -> Coord {
        self.coordinator_on(self.repo.clone())
    }

    fn coordinator_on(&self, repo: Arc<PostgresMetadataRepo>) -> Coord {
        Coordinator::new(repo, self.index.clone(), config())
            .expect("valid config")
            .with_clock(Arc::new(self.clock.clone()))
    }

    /// Another repo (its own pool, as another process would have) on the
    /// same schema, not migrating.
    async fn another_repo(
        &self,
        adjust: impl FnOnce(&mut PostgresConfig),
    ) -> Arc<PostgresMetadataRepo> {
        let mut c = self.schema.config();
        c.migrate_on_start = false;
        adjust(&mut c);
        Arc::new(PostgresMetadataRepo::connect(c).await.expect("second repo"))
    }

    async fn seed(&self, ids: impl IntoIterator<Item = u128>) {
        let batch: Vec<NewRecord> = ids.into_iter().map(|n| rec(n, 0)).collect();
        self.coordinator().upsert(batch).await.expect("seed");
    }

    async fn rows(&self) -> BTreeMap<RecordId, StoredRecord> {
        invariants::rows(&*self.repo).await.expect("rows")
    }

    /// Later, in a restarted process: recovery after every lease, then the
    /// exact checks.
    async fn recover_and_verify(&self) {
        self.clock.advance(config().lease + Duration::from_secs(1));
        let c = self.coordinator();
        // An intent still locked by a session the server is tearing down (a
        // terminated backend, a connection the proxy cut) is skipped by the
        // claim (SKIP LOCKED) and left to a later round, as periodic recovery
        // would: run rounds until none is left.
        let deadline = Instant::now() + Duration::from_secs(10);
        let report = loop {
            let report = c.recover().await.expect("recovery");
            if self.repo.list_intents(1).await.unwrap().is_empty() || Instant::now() > deadline {
                break report;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if let Err(e) = invariants::exact_equality(&*self.repo, &*self.index).await {
            let left = self.repo.list_intents(10).await.unwrap();
            panic!("I2 exact after recovery: {e}; recovery {report:?}; intents left {left:?}");
        }
        invariants::no_dangling_rows(&*self.repo, &*self.index)
            .await
            .expect("I1 after recovery");
        invariants::converged(&c).await.expect("I7 after recovery");
    }

    async fn admin(&self) -> tokio_postgres::Client {
        self.schema.admin().await
    }
}

/// Whether `batch` is visible: `Some(true)` all of it, `Some(false)` none of
/// it, `None` a mix (an I3 violation).
fn upsert_visible(rows: &BTreeMap<RecordId, StoredRecord>, batch: &[NewRecord]) -> Option<bool> {
    let seen: Vec<bool> = batch
        .iter()
        .map(|r| {
            rows.get(&r.id.unwrap())
                .is_some_and(|row| row.content == r.content)
        })
        .collect();
    if seen.iter().all(|s| *s) {
        Some(true)
    } else if seen.iter().all(|s| !*s) {
        Some(false)
    } else {
        None
    }
}

/// Whether a delete of `ids` is visible.
fn delete_visible(rows: &BTreeMap<RecordId, StoredRecord>, ids: &[RecordId]) -> Option<bool> {
    let gone: Vec<bool> = ids.iter().map(|id| !rows.contains_key(id)).collect();
    if gone.iter().all(|g| *g) {
        Some(true)
    } else if gone.iter().all(|g| !*g) {
        Some(false)
    } else {
        None
    }
}

/// I3 at the instant the call returned: its answer agrees with the store.
fn answer_agrees<T: std::fmt::Debug>(
    result: &Result<T, CoordinatorError>,
    visible: Option<bool>,
) -> bool {
    let visible = visible.expect("I3 violated: partial effects are visible");
    match result {
        Ok(_) => assert!(visible, "I3 violated: success reported, effects absent"),
        Err(e) if e.outcome() == Outcome::NotApplied => {
            assert!(
                !visible,
                "I3 violated: {e} reported NotApplied, effects present"
            )
        }
        Err(_) => {}
    }
    visible
}

/// Installs a trigger that stalls (sleeps 30 s) the first `times` statements
/// it fires for — a sequence counts across transactions, so a killed
/// transaction does not re-arm it.
async fn install_stall(admin: &tokio_postgres::Client, trigger: &str, times: u32) {
    admin
        .batch_execute(&format!(
            "CREATE SEQUENCE fault_once; \
             CREATE FUNCTION stall_once() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN \
               IF nextval('fault_once') <= {times} THEN PERFORM pg_sleep(30); END IF; \
               IF TG_OP = 'DELETE' THEN RETURN OLD; END IF; \
               RETURN NEW; \
             END $$; \
             {trigger}"
        ))
        .await
        .expect("install the stall trigger");
}

/// Waits for `times` stalled repo sessions in turn and terminates each.
async fn kill_stalled(schema: &TestSchema, times: u32) -> Vec<String> {
    let admin = schema.admin().await;
    let mut killed = Vec::new();
    // A terminated session stays listed until it has exited: never count it twice.
    let mut pids: Vec<i32> = Vec::new();
    for _ in 0..times {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let rows = admin
                .query(
                    "SELECT pid, query FROM pg_stat_activity WHERE application_name = $1 \
                     AND wait_event = 'PgSleep' AND NOT (pid = ANY($2))",
                    &[&schema.name(), &pids],
                )
                .await
                .expect("pg_stat_activity");
            if let Some(row) = rows.first() {
                let pid: i32 = row.get(0);
                killed.push(row.get::<_, String>(1));
                pids.push(pid);
                admin
                    .execute("SELECT pg_terminate_backend($1)", &[&pid])
                    .await
                    .expect("terminate");
                break;
            }
            assert!(Instant::now() < deadline, "no stalled session to kill");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    killed
}

/// An upsert (2 updates of seeded records + 1 insert) whose backend is killed
/// `times` times where `trigger` stalls it; the stalled statements must match
/// `statement`.
async fn upsert_with_killed_backend(trigger: &str, times: u32, statement: &str) {
    let f = Fixture::new().await;
    f.seed([1, 2, 3]).await;
    let admin = f.admin().await;
    install_stall(&admin, trigger, times).await;
    let batch = vec![rec(1, 1), rec(2, 1), rec(10, 0)];
    // (The coordinator's futures are not `Send`: run the call and the killer
    // side by side in this task rather than spawning.)
    let c = f.coordinator();
    let (result, killed) = tokio::join!(c.upsert(batch.clone()), kill_stalled(&f.schema, times));
    for q in &killed {
        assert!(q.contains(statement), "stalled {q:?}, expected {statement}");
    }
    let seen = answer_agrees(&result, upsert_visible(&f.rows().await, &batch));
    f.recover_and_verify().await;
    assert_eq!(
        upsert_visible(&f.rows().await, &batch),
        Some(seen),
        "I3: recovery changed the decided outcome"
    );
    println!("killed {killed:?}: call {result:?}, applied {seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_killed_during_prepare() {
    upsert_with_killed_backend(
        "CREATE TRIGGER stall BEFORE INSERT ON intents FOR EACH ROW EXECUTE FUNCTION stall_once()",
        1,
        "INSERT INTO intents",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_killed_during_a_commit_statement() {
    upsert_with_killed_backend(
        "CREATE TRIGGER stall BEFORE UPDATE ON records FOR EACH ROW EXECUTE FUNCTION stall_once()",
        1,
        "UPDATE records",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_killed_while_commit_in_flight_and_during_settle() {
    // A deferred trigger runs inside COMMIT. The first stall is the commit's
    // COMMIT (outcome unknown → the coordinator settles); the second is the
    // settle's own COMMIT (its fence update fires the trigger too).
    upsert_with_killed_backend(
        "CREATE CONSTRAINT TRIGGER stall AFTER UPDATE ON intents DEFERRABLE INITIALLY DEFERRED \
         FOR EACH ROW EXECUTE FUNCTION stall_once()",
        2,
        "COMMIT",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_killed_during_cleanup_resolve() {
    upsert_with_killed_backend(
        "CREATE TRIGGER stall BEFORE DELETE ON intents FOR EACH ROW EXECUTE FUNCTION stall_once()",
        1,
        "DELETE FROM intents",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_killed_during_a_delete_commit() {
    let f = Fixture::new().await;
    f.seed([1, 2, 3, 4]).await;
    let admin = f.admin().await;
    install_stall(
        &admin,
        "CREATE TRIGGER stall BEFORE DELETE ON records FOR EACH ROW EXECUTE FUNCTION stall_once()",
        1,
    )
    .await;
    let ids = vec![rid(1), rid(3)];
    let c = f.coordinator();
    let (result, killed) = tokio::join!(
        c.delete(DeleteSelector::Ids(ids.clone())),
        kill_stalled(&f.schema, 1)
    );
    assert!(killed[0].contains("DELETE FROM records"), "{killed:?}");
    let seen = answer_agrees(&result, delete_visible(&f.rows().await, &ids));
    f.recover_and_verify().await;
    assert_eq!(delete_visible(&f.rows().await, &ids), Some(seen));
    assert_eq!(f.rows().await.len(), if seen { 2 } else { 4 });
}

/// Leaves `n` crashed upserts behind, as a process dying at different steps
/// would: even ones died after the index write (prepared intent, orphan
/// points), odd ones after the commit (committed intent naming the superseded
/// points, still in the index). All leases have ended by `clock`'s now.
async fn stuck_intents(f: &Fixture, n: u128) -> (Vec<RecordId>, Vec<RecordId>) {
    let (mut committed, mut aborted) = (Vec::new(), Vec::new());
    for k in 0..n {
        let id = 1000 + k;
        let old = PointId::new_random();
        if k % 2 == 1 {
            // An existing row, so the commit makes its old point garbage.
            let row = row_write(id, old, 0);
            let intent = prepare(&*f.repo, &[old], f.clock.now_ms() - 1).await;
            f.index.upsert(&[point(&row)]).await.unwrap();
            f.repo
                .commit_upsert(intent.0, intent.1, &[row], None)
                .await
                .unwrap();
            f.repo.resolve(intent.0, intent.1).await.unwrap();
        }
        let new = PointId::new_random();
        let row = row_write(id, new, 1);
        let intent = prepare(&*f.repo, &[new], f.clock.now_ms() - 1).await;
        f.index.upsert(&[point(&row)]).await.unwrap();
        if k % 2 == 1 {
            f.repo
                .commit_upsert(intent.0, intent.1, &[row], None)
                .await
                .unwrap();
            committed.push(rid(id));
        } else {
            aborted.push(rid(id));
        }
    }
    (committed, aborted)
}

fn row_write(n: u128, point_id: PointId, v: u32) -> RowWrite {
    RowWrite {
        id: rid(n),
        scope: Scope::new("stuck"),
        content: format!("stuck {n} v{v}"),
        metadata: Default::default(),
        point_id,
        vector: vector(n, v),
    }
}

fn point(row: &RowWrite) -> Point {
    Point {
        id: row.point_id,
        record_id: row.id,
        scope: row.scope.clone(),
        metadata: row.metadata.clone(),
        vector: row.vector.clone(),
        written_at_ms: 1,
    }
}

async fn prepare<M: MetadataRepo>(
    repo: &M,
    points: &[PointId],
    lease_deadline_ms: i64,
) -> (IntentId, OwnerToken) {
    let intent = NewIntent {
        id: IntentId::new_v7(),
        kind: IntentKind::Upsert,
        owner: OwnerToken::new_random(),
        lease_deadline_ms,
        point_ids: points.to_vec(),
        created_ms: lease_deadline_ms,
        generation: 0,
    };
    repo.prepare(&intent).await.unwrap();
    (intent.id, intent.owner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_killed_during_recovery_claim() {
    let f = Fixture::new().await;
    let (committed, aborted) = stuck_intents(&f, 6).await;
    let admin = f.admin().await;
    install_stall(
        &admin,
        "CREATE TRIGGER stall BEFORE UPDATE ON intents FOR EACH ROW EXECUTE FUNCTION stall_once()",
        1,
    )
    .await;
    let c = f.coordinator();
    let (first, killed) = tokio::join!(c.recover(), kill_stalled(&f.schema, 1));
    assert!(killed[0].contains("UPDATE intents"), "{killed:?}");
    // The claim's reply was lost: recovery reports it, nothing is half done.
    assert!(first.is_err(), "the claim was killed: {first:?}");
    invariants::no_dangling_rows(&*f.repo, &*f.index)
        .await
        .unwrap();
    invariants::no_invisible_garbage(&*f.repo, &*f.index)
        .await
        .unwrap();
    // Later runs (the killed claim never committed, so its intents are still
    // expired) finish everything, each intent claimed once. The terminated
    // session may hold its row locks a moment longer; SKIP LOCKED leaves those
    // intents to the next round.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut claimed = 0;
    while claimed < 6 && Instant::now() < deadline {
        let report = c.recover().await.unwrap();
        assert_eq!(report.failed, 0, "{report:?}");
        claimed += report.claimed;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(claimed, 6);
    f.recover_and_verify().await;
    let rows = f.rows().await;
    assert!(committed.iter().all(|id| rows[id].version == 2));
    assert!(aborted.iter().all(|id| !rows.contains_key(id)));
}

/// An upsert through a proxy that loses the connection at its COMMIT.
async fn upsert_through_lossy_proxy(
    fault: CommitFault,
    times: usize,
) -> (
    Result<tandem_core::UpsertReport, CoordinatorError>,
    Fixture,
    Vec<NewRecord>,
    usize,
) {
    let f = Fixture::new().await;
    f.seed([1, 2]).await;
    let proxy = CommitProxy::start(server_addr(f.schema.url()).await).await;
    let via = f
        .another_repo(|c| c.url = url_via(f.schema.url(), proxy.addr()).into())
        .await;
    let c = f.coordinator_on(via);
    let batch = vec![rec(1, 1), rec(20, 0), rec(21, 0)];
    proxy.arm(fault, times);
    let result = c.upsert(batch.clone()).await;
    let fired = proxy.fired();
    proxy.disarm();
    (result, f, batch, fired)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_lost_right_after_commit_reports_the_true_success() {
    let (result, f, batch, fired) =
        upsert_through_lossy_proxy(CommitFault::DropAfterCommit, 1).await;
    assert_eq!(fired, 1, "the proxy must have swallowed a COMMIT reply");
    // The commit happened; the coordinator learnt it by settling and reports it.
    let report = result.expect("a committed write is reported as a success");
    assert_eq!((report.inserted, report.updated), (2, 1));
    let rows = f.rows().await;
    assert_eq!(upsert_visible(&rows, &batch), Some(true));
    // Nothing was compensated: every committed row's point is in the index.
    invariants::no_dangling_rows(&*f.repo, &*f.index)
        .await
        .unwrap();
    f.recover_and_verify().await;
    assert_eq!(rows[&rid(1)].version, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_lost_right_before_commit_is_settled_then_retried() {
    let (result, f, batch, fired) =
        upsert_through_lossy_proxy(CommitFault::DropBeforeCommit, 1).await;
    assert_eq!(fired, 1);
    // The first COMMIT never reached the server; the settle fenced it and the
    // commit was retried under the fence token.
    let report = result.expect("the retried commit succeeds");
    assert_eq!((report.inserted, report.updated), (2, 1));
    assert_eq!(upsert_visible(&f.rows().await, &batch), Some(true));
    f.recover_and_verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_commit_lost_never_reports_success() {
    // Every COMMIT (the settles' too) is dropped for the whole call.
    let (result, f, batch, fired) =
        upsert_through_lossy_proxy(CommitFault::DropBeforeCommit, 1_000).await;
    assert!(fired >= 2, "{fired}");
    let err = result.expect_err("nothing could commit");
    let seen = answer_agrees::<()>(&Err(err), upsert_visible(&f.rows().await, &batch));
    assert!(!seen, "no COMMIT reached the server");
    invariants::no_dangling_rows(&*f.repo, &*f.index)
        .await
        .unwrap();
    f.recover_and_verify().await;
    assert_eq!(upsert_visible(&f.rows().await, &batch), Some(false));
}

/// An update of record 1 while another session holds its row lock.
async fn update_behind_a_held_row_lock(adjust: impl FnOnce(&mut PostgresConfig)) {
    let f = Fixture::with(adjust).await;
    f.seed([1, 2]).await;
    let mut admin = f.admin().await;
    let held = admin.transaction().await.unwrap();
    held.execute(
        "SELECT 1 FROM records WHERE id = $1::text::uuid FOR UPDATE",
        &[&rid(1).to_string()],
    )
    .await
    .unwrap();
    let batch = vec![rec(1, 1), rec(2, 1)];
    let result = f.coordinator().upsert(batch.clone()).await;
    let err = result.expect_err("the row stays locked through every retry");
    assert_eq!(err.outcome(), Outcome::NotApplied, "{err}");
    assert!(err.is_retryable(), "{err}");
    // Compensated: nothing visible, no leaked point.
    assert_eq!(upsert_visible(&f.rows().await, &batch), Some(false));
    invariants::no_dangling_rows(&*f.repo, &*f.index)
        .await
        .unwrap();
    invariants::no_invisible_garbage(&*f.repo, &*f.index)
        .await
        .unwrap();
    held.rollback().await.unwrap();
    f.recover_and_verify().await;
    // Once the lock is gone the same write goes through.
    f.coordinator().upsert(batch.clone()).await.unwrap();
    assert_eq!(upsert_visible(&f.rows().await, &batch), Some(true));
    f.recover_and_verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_timeout_expiring_leaves_nothing_behind() {
    update_behind_a_held_row_lock(|c| c.lock_timeout = Some(Duration::from_millis(100))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_timeout_expiring_leaves_nothing_behind() {
    update_behind_a_held_row_lock(|c| c.statement_timeout = Some(Duration::from_millis(150))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_writers_on_hot_ids_converge() {
    let f = Fixture::new().await;
    // Two pools, as two processes would have, four writers on each.
    let repos = [f.repo.clone(), f.another_repo(|_| {}).await];
    const HOT: u128 = 6;
    const ROUNDS: u32 = 12;
    let mut writers = Vec::new();
    for w in 0..8u32 {
        let c = f.coordinator_on(repos[w as usize % 2].clone());
        writers.push(async move {
            let mut rng = fastrand_like(w);
            let mut wrote: Vec<u128> = Vec::new();
            for round in 0..ROUNDS {
                // 3 distinct hot ids, in a random order.
                let mut ids: Vec<u128> = (1..=HOT).collect();
                for i in (1..ids.len()).rev() {
                    ids.swap(i, (rng() % (i as u64 + 1)) as usize);
                }
                ids.truncate(3);
                let batch: Vec<NewRecord> =
                    ids.iter().map(|&n| rec(n, w * 100 + round + 1)).collect();
                c.upsert(batch)
                    .await
                    .unwrap_or_else(|e| panic!("writer {w} round {round}: {e}"));
                wrote.extend(ids);
            }
            wrote
        });
    }
    let mut writes: HashMap<u128, u64> = HashMap::new();
    for wrote in futures::future::join_all(writers).await {
        for id in wrote {
            *writes.entry(id).or_default() += 1;
        }
    }
    // Every call finished; each record's version counts the commits that
    // touched it (one row each, the last committed version), its point is in
    // the index, no point leaked and no intent is stuck — before any recovery.
    let rows = f.rows().await;
    assert_eq!(rows.len() as u128, HOT);
    for (id, n) in &writes {
        assert_eq!(rows[&rid(*id)].version, *n, "record {id}");
    }
    assert!(
        f.repo.list_intents(10).await.unwrap().is_empty(),
        "stuck intents"
    );
    invariants::exact_equality(&*f.repo, &*f.index)
        .await
        .unwrap();
    let points = invariants::points(&*f.index).await.unwrap();
    for row in rows.values() {
        assert_eq!(points[&row.point_id].record_id, row.id);
    }
    f.recover_and_verify().await;
}

/// A small deterministic generator (xorshift), so runs are repeatable.
fn fastrand_like(seed: u32) -> impl FnMut() -> u64 {
    let mut x = 0x9E37_79B9_7F4A_7C15_u64 ^ u64::from(seed + 1);
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_reset_mid_run_and_the_pool_recovers() {
    let f = Fixture::new().await;
    f.seed(1..=8).await;
    let c = f.coordinator();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut writers = Vec::new();
    for w in 0..4u32 {
        let (c, stop) = (&c, &stop);
        writers.push(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let mut round = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                round += 1;
                let ids = [u128::from(w) * 2 + 1, u128::from(w) * 2 + 2];
                let batch = ids.iter().map(|&n| rec(n, round)).collect();
                match c.upsert(batch).await {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push((e.outcome(), e.to_string())),
                }
            }
            (ok, failed)
        });
    }
    // Every session of this repo is terminated, five times, mid-run.
    let admin = f.admin().await;
    let resets = async {
        let mut terminated = 0;
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            terminated += f.schema.terminate_backends(&admin).await;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        terminated
    };
    let (results, terminated) = tokio::join!(futures::future::join_all(writers), resets);
    let mut total_ok = 0;
    for (ok, failed) in results {
        total_ok += ok;
        for (outcome, message) in failed {
            // A reset costs at most a retryable failure, never a wrong answer.
            println!("failed call ({outcome:?}): {message}");
        }
    }
    assert!(terminated > 0, "nothing was reset");
    assert!(total_ok > 0);
    // The same process, the same pool: new calls work.
    let after = vec![rec(1, 999), rec(2, 999)];
    c.upsert(after.clone()).await.expect("the pool recovered");
    assert!(f.repo.pool_status().connections > 0);
    f.recover_and_verify().await;
    assert_eq!(upsert_visible(&f.rows().await, &after), Some(true));
    println!("{terminated} sessions terminated; {total_ok} calls succeeded meanwhile");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_coordinators_recover_the_same_expired_intents_once() {
    let f = Fixture::new().await;
    let (committed, aborted) = stuck_intents(&f, 40).await;
    assert_eq!(f.repo.list_intents(100).await.unwrap().len(), 40);
    f.clock.advance(config().lease);
    // Four "processes": four pools, four coordinators, one clock.
    let mut coordinators = Vec::new();
    for _ in 0..4 {
        coordinators.push(f.coordinator_on(f.another_repo(|_| {}).await));
    }
    let runs = futures::future::join_all(coordinators.iter().map(|c| c.recover())).await;
    let mut claimed = 0;
    let mut resolved = 0;
    for r in runs {
        let report = r.expect("recovery");
        assert_eq!(report.failed, 0, "{report:?}");
        claimed += report.claimed;
        resolved += report.resolved;
    }
    // Each intent was claimed by exactly one of them, and none is left.
    assert_eq!(claimed, 40);
    assert_eq!(resolved, 40);
    assert!(f.repo.list_intents(100).await.unwrap().is_empty());
    invariants::exact_equality(&*f.repo, &*f.index)
        .await
        .unwrap();
    let rows = f.rows().await;
    assert!(committed.iter().all(|id| rows.contains_key(id)));
    assert!(aborted.iter().all(|id| !rows.contains_key(id)));
    f.recover_and_verify().await;
}
