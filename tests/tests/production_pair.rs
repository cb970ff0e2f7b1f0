//! End to end with the production pair: `PostgresMetadataRepo` (in a test
//! schema of its own on `DATABASE_URL`, default the local server) and
//! `QdrantVectorIndex` over gRPC, through the Qdrant test server.
//!
//! * An index failure — refused for good, down for a while, or unreachable —
//!   leaves nothing committed in PostgreSQL (checked through the port and with
//!   SQL on the schema's tables).
//! * After a successful ingest of several scopes, both stores count the same
//!   per scope.
//! * The server stops while a batch is half written and comes back later (on
//!   the same data directory and port), or loses every reply for a while:
//!   after recovery the stores are exactly equal, every batch that reported
//!   success is fully present and every batch that reported `NotApplied` is
//!   absent.
//!
//! Module `real_qdrant` runs the cases that need no injected fault against a
//! real Qdrant node started for each test (`tandem_tests::real_qdrant`): the
//! per-scope counts, an index that is down for a while (stopped, then
//! restarted on its storage), and a server SIGKILLed and restarted while
//! batches are written. Without a real server those are reported as ignored,
//! with the reason; the cases here keep running against the test server.
//!
//! An unreachable PostgreSQL fails these tests with a message (they never skip).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tandem_adapters::postgres::PostgresMetadataRepo;
use tandem_adapters::qdrant::QdrantVectorIndex;
use tandem_core::testkit::clock::ManualClock;
use tandem_core::{
    Coordinator, CoordinatorConfig, CoordinatorError, DeleteSelector, IndexError, MetadataRepo,
    NewRecord, Outcome, PointId, RecordId, Scope, SearchQuery, UpsertReport, VectorIndex,
    WriteOptions,
};
use tandem_tests::harness::{fault_config, rid, vector_for};
use tandem_tests::invariants;
use tandem_tests::network::connect_index;
use tandem_tests::pg::TestSchema;
use tandem_tests::qdrant_double::{CallOutcome, Faults, QdrantDouble, RpcAction, RpcFault};
use tonic::Code;

/// The client's request timeout (below the call deadline).
const CLIENT_TIMEOUT: Duration = Duration::from_millis(500);

/// The coordinator's call and cleanup deadline.
const DEADLINE: Duration = Duration::from_secs(2);

type PairCoordinator = Coordinator<Arc<PostgresMetadataRepo>, QdrantVectorIndex>;

/// PostgreSQL (a schema of its own) + a fresh collection on the double, and
/// the manual clock every coordinator of the pair uses (leases end when the
/// test says so).
struct Pair {
    schema: TestSchema,
    repo: Arc<PostgresMetadataRepo>,
    index: QdrantVectorIndex,
    admin: tokio_postgres::Client,
    clock: ManualClock,
    config: CoordinatorConfig,
}

impl Pair {
    /// A pair whose index is a fresh collection on the Qdrant at `url` (gRPC).
    async fn new(url: &str) -> Self {
        let schema = TestSchema::new().await;
        let repo = Arc::new(schema.repo().await);
        let admin = schema.admin().await;
        let index = connect_index(url, CLIENT_TIMEOUT).await;
        Self {
            schema,
            repo,
            index,
            admin,
            clock: ManualClock::new(1_700_000_000_000),
            config: fault_config(DEADLINE),
        }
    }

    fn coordinator(&self) -> PairCoordinator {
        Coordinator::new(self.repo.clone(), self.index.clone(), self.config.clone())
            .expect("valid config")
            .with_clock(Arc::new(self.clock.clone()))
    }

    /// Moves the clock past every lease taken so far.
    fn after_leases(&self) {
        self.clock
            .advance(self.config.lease + Duration::from_secs(1));
    }

    /// `SELECT count(*)` of one of the schema's tables (a fixed name).
    async fn sql_count(&self, table: &'static str) -> i64 {
        let sql = match table {
            "records" => "SELECT count(*) FROM records",
            "intents" => "SELECT count(*) FROM intents",
            "idempotency_keys" => "SELECT count(*) FROM idempotency_keys",
            other => panic!("not a Tandem table: {other}"),
        };
        self.admin
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql} on {}: {e}", self.schema.name()))
            .get(0)
    }

    /// Committed rows per scope, by SQL.
    async fn sql_scope_counts(&self) -> BTreeMap<String, u64> {
        self.admin
            .query(
                "SELECT scope, count(*) FROM records GROUP BY scope ORDER BY scope",
                &[],
            )
            .await
            .expect("count rows per scope")
            .iter()
            .map(|r| {
                let n: i64 = r.get(1);
                (r.get::<_, String>(0), u64::try_from(n).expect("a count"))
            })
            .collect()
    }

    /// Points per scope, asked of the index.
    async fn index_scope_counts(&self, scopes: &[String]) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for s in scopes {
            let n = self
                .index
                .count(Some(&Scope::new(s.as_str())))
                .await
                .expect("count points");
            if n > 0 {
                out.insert(s.clone(), n);
            }
        }
        out
    }

    /// Committed rows as (scope, content), through the port.
    async fn rows(&self) -> BTreeMap<RecordId, (String, String)> {
        invariants::rows(&*self.repo)
            .await
            .expect("rows")
            .into_iter()
            .map(|(id, r)| (id, (r.scope.as_str().to_owned(), r.content)))
            .collect()
    }

    /// Verify is consistent, and the per-scope counts of the report, of SQL,
    /// of the index and of `expected` are all equal.
    async fn assert_equal_counts(&self, expected: &BTreeMap<String, u64>) {
        let report = self.coordinator().verify(None).await.expect("verify");
        assert!(report.is_consistent(), "verify: {report:?}");
        let from_verify: BTreeMap<String, u64> = report
            .scopes
            .iter()
            .filter(|(_, c)| c.rows > 0 || c.points > 0)
            .map(|(s, c)| {
                assert_eq!(c.rows, c.points, "scope {s}: rows and points differ");
                (s.as_str().to_owned(), c.rows)
            })
            .collect();
        let scopes: Vec<String> = expected.keys().cloned().collect();
        assert_eq!(&from_verify, expected, "verify's per-scope counts");
        assert_eq!(
            &self.sql_scope_counts().await,
            expected,
            "rows per scope in PostgreSQL"
        );
        assert_eq!(
            &self.index_scope_counts(&scopes).await,
            expected,
            "points per scope in Qdrant"
        );
        assert_eq!(
            self.index.count(None).await.expect("count points"),
            expected.values().sum::<u64>(),
            "points in the collection"
        );
        for s in &scopes {
            let one = self
                .coordinator()
                .verify(Some(&Scope::new(s.as_str())))
                .await
                .expect("verify one scope");
            assert!(one.is_consistent(), "verify({s}): {one:?}");
        }
    }
}

fn record(n: u128, version: u32, scope: &str, content: String) -> NewRecord {
    NewRecord::new(scope, content, vector_for(n, version))
        .with_id(rid(n))
        .with_metadata(json!({ "n": n as u64, "v": version }))
}

/// A double serving `dir` on `port` (0: an ephemeral one).
async fn double_on(dir: &std::path::Path, port: u16) -> QdrantDouble {
    QdrantDouble::builder()
        .data_dir(dir)
        .port(port)
        .start()
        .await
        .unwrap_or_else(|e| panic!("the Qdrant test double cannot start on port {port}: {e}"))
}

/// Nothing of a failed ingest is in PostgreSQL: no row, no key, and (once
/// `intents_left` intents are accounted for) nothing else; checked through
/// the port and with SQL.
async fn assert_nothing_committed(pair: &Pair, ids: &[RecordId], key: &str, intents_left: usize) {
    assert!(pair.rows().await.is_empty(), "rows were committed");
    assert!(
        pair.repo.get(ids).await.expect("get").is_empty(),
        "the batch's records are readable"
    );
    assert!(
        pair.repo
            .count_by_scope()
            .await
            .expect("count_by_scope")
            .values()
            .all(|&n| n == 0),
        "count_by_scope sees rows"
    );
    assert!(
        pair.repo
            .lookup_idempotency(key)
            .await
            .expect("lookup_idempotency")
            .is_none(),
        "the idempotency key was recorded"
    );
    assert_eq!(
        pair.repo.list_intents(100).await.expect("intents").len(),
        intents_left,
        "live intents"
    );
    assert_eq!(pair.sql_count("records").await, 0, "SQL: records");
    assert_eq!(
        pair.sql_count("idempotency_keys").await,
        0,
        "SQL: idempotency_keys"
    );
    assert_eq!(
        pair.sql_count("intents").await,
        i64::try_from(intents_left).expect("small"),
        "SQL: intents"
    );
}

fn failed_batch(n: u128) -> (Vec<NewRecord>, Vec<RecordId>) {
    let batch: Vec<NewRecord> = (0..5u128)
        .map(|i| {
            let scope = if i % 2 == 0 { "alpha" } else { "beta" };
            record(n + i, 0, scope, format!("ingest {}", n + i))
        })
        .collect();
    let ids = batch.iter().filter_map(|r| r.id).collect();
    (batch, ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_failure_leaves_nothing_committed_in_postgres() {
    let double = QdrantDouble::start().await;
    // Refused for good (a permanent error), and down for the whole call (a
    // transient one, retried until the attempts run out).
    for code in [Code::InvalidArgument, Code::Unavailable] {
        let pair = Pair::new(&double.url()).await;
        let c = pair.coordinator();
        double.faults().clear_calls();
        double.faults().add(RpcFault::always(
            "Points/Upsert",
            RpcAction::FailBefore(code),
        ));
        let (batch, ids) = failed_batch(0x100);
        let key = "ingest-1";
        let err = c
            .upsert_with(batch.clone(), &WriteOptions::idempotent(key))
            .await
            .expect_err("the index refuses every upsert");
        assert_eq!(err.outcome(), Outcome::NotApplied, "{code:?}: {err}");
        match (&err, code) {
            (CoordinatorError::Index(IndexError::InvalidInput { .. }), Code::InvalidArgument) => {
                assert!(!err.is_retryable(), "{err}");
            }
            (CoordinatorError::Index(e), Code::Unavailable) if e.is_retryable() => {}
            _ => panic!("{code:?} should fail the call as an index error, got {err:?}"),
        }
        let upserts = double.faults().calls_to("Points/Upsert");
        assert!(
            !upserts.is_empty() && upserts.iter().all(|c| c.outcome == CallOutcome::Err(code)),
            "the failure came from the server: {upserts:?}"
        );
        // The compensation ran. A refusal (InvalidArgument) is final, so not
        // even an intent is left; `Unavailable` may come from a proxy that
        // still delivers the request, so that intent stays for recovery,
        // which collects a late landing after its lease.
        let intents_left = usize::from(code == Code::Unavailable);
        assert_nothing_committed(&pair, &ids, key, intents_left).await;
        assert_eq!(pair.index.count(None).await.expect("count"), 0);
        for r in &batch {
            let hits = c
                .search(&SearchQuery::new(r.vector.clone(), 5))
                .await
                .expect("search");
            assert!(hits.is_empty(), "search found {hits:?}");
        }

        // The key was not spent: once the index is back, the same call applies.
        double.faults().clear();
        let report = c
            .upsert_with(batch, &WriteOptions::idempotent(key))
            .await
            .expect("the retried ingest succeeds");
        assert!(!report.replayed);
        assert_eq!(report.inserted, 5);
        // After its lease, recovery resolves the intent the rollback kept; it
        // names only the rolled-back points, so it deletes nothing else.
        pair.after_leases();
        let recovered = c.recover().await.expect("recover");
        assert_eq!(recovered.resolved, intents_left);
        pair.assert_equal_counts(&BTreeMap::from([("alpha".into(), 3), ("beta".into(), 2)]))
            .await;
    }
    double.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_index_leaves_nothing_committed_until_recovery_cleans_up() {
    let dir = tempfile::tempdir().expect("temp dir");
    let double = double_on(dir.path(), 0).await;
    let port = double.addr().port();
    let pair = Pair::new(&double.url()).await;
    let c = pair.coordinator();
    double.shutdown().await;

    let (batch, ids) = failed_batch(0x200);
    let key = "ingest-2";
    let err = c
        .upsert_with(batch, &WriteOptions::idempotent(key))
        .await
        .expect_err("the index is down");
    assert_eq!(err.outcome(), Outcome::NotApplied, "{err}");
    assert!(
        matches!(err, CoordinatorError::Index(_)),
        "an index error: {err:?}"
    );
    // The compensation could not reach the index either: the intent stays for
    // recovery, and nothing is committed.
    assert_nothing_committed(&pair, &ids, key, 1).await;

    let double = double_on(dir.path(), port).await;
    pair.after_leases();
    let recovered = c.recover().await.expect("recover");
    assert_eq!(recovered.resolved, 1, "{recovered:?}");
    assert_nothing_committed(&pair, &ids, key, 0).await;
    invariants::exact_equality(&*pair.repo, &pair.index)
        .await
        .unwrap();
    pair.assert_equal_counts(&BTreeMap::new()).await;
    double.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_successful_ingest_both_stores_count_the_same_per_scope() {
    let double = QdrantDouble::start().await;
    ingest_and_count(&Pair::new(&double.url()).await).await;
    double.shutdown().await;
}

/// Ingests 19 records over three scopes, updates and deletes some: after each
/// step verify, SQL, the index and the expected counts agree per scope.
async fn ingest_and_count(pair: &Pair) {
    let c = pair.coordinator();
    // 19 records over three scopes, in batches of 5 (3 index requests each).
    let scopes = ["news", "docs", "blog"];
    let all: Vec<NewRecord> = (0..19u128)
        .map(|n| {
            let scope = scopes[(n % 3) as usize];
            let kind = if n % 4 == 0 { "draft" } else { "final" };
            NewRecord::new(scope, format!("{scope} {n}"), vector_for(n, 0))
                .with_id(rid(0x300 + n))
                .with_metadata(json!({ "kind": kind }))
        })
        .collect();
    let mut inserted = 0;
    for batch in all.chunks(5) {
        let report = c.upsert(batch.to_vec()).await.expect("ingest");
        inserted += report.inserted;
    }
    assert_eq!(inserted, 19);
    let mut expected = BTreeMap::from([
        ("news".to_owned(), 7u64),
        ("docs".to_owned(), 6),
        ("blog".to_owned(), 6),
    ]);
    pair.assert_equal_counts(&expected).await;

    // Updates (new points), deletes by ids and by metadata keep them equal.
    let updates: Vec<NewRecord> = [0u128, 1, 2, 3]
        .iter()
        .map(|&n| {
            let scope = scopes[(n % 3) as usize];
            NewRecord::new(scope, format!("{scope} {n} v2"), vector_for(n, 1))
                .with_id(rid(0x300 + n))
                .with_metadata(json!({ "kind": "final" }))
        })
        .collect();
    let report = c.upsert(updates).await.expect("update");
    assert_eq!((report.inserted, report.updated), (0, 4));
    let deleted = c
        .delete(DeleteSelector::Ids(vec![rid(0x300 + 4), rid(0x300 + 5)]))
        .await
        .expect("delete by ids");
    assert_eq!(deleted.deleted, 2);
    // The only draft left in "blog" is n = 8 (n = 5 is gone; 2, 11, 14 and 17
    // are final).
    let drafts = c
        .delete(DeleteSelector::MetadataEq {
            scope: Scope::new("blog"),
            key: "kind".into(),
            value: json!("draft"),
        })
        .await
        .expect("delete by metadata");
    assert_eq!(drafts.deleted, 1);
    *expected.get_mut("docs").expect("docs") -= 1; // n = 4
    *expected.get_mut("blog").expect("blog") -= 2; // n = 5, 8
    pair.assert_equal_counts(&expected).await;
    invariants::exact_equality(&*pair.repo, &pair.index)
        .await
        .unwrap();
    invariants::converged(&c).await.unwrap();
}

/// One batch of the outage runs: three new records in scope `s{i % 3}` and an
/// update of the first record of batch `i - 1`. Contents are unique per batch.
fn outage_batch(i: u128) -> Vec<NewRecord> {
    let base = |i: u128| 0x1_0000 + i * 16;
    let scope = |i: u128| format!("s{}", i % 3);
    let mut batch: Vec<NewRecord> = (0..3)
        .map(|j| record(base(i) + j, 0, &scope(i), format!("batch {i} record {j}")))
        .collect();
    if i > 0 {
        batch.push(record(
            base(i - 1),
            1,
            &scope(i - 1),
            format!("batch {i} updates batch {}", i - 1),
        ));
    }
    batch
}

/// Writes batches and keeps the model: what the committed rows must be, given
/// what each call answered.
struct Writer {
    model: BTreeMap<RecordId, (String, String)>,
    results: Vec<(u128, Result<UpsertReport, CoordinatorError>)>,
}

impl Writer {
    fn new() -> Self {
        Self {
            model: BTreeMap::new(),
            results: Vec::new(),
        }
    }

    fn record_result(&mut self, i: u128, result: Result<UpsertReport, CoordinatorError>) {
        match &result {
            Ok(_) => {
                for r in outage_batch(i) {
                    self.model.insert(
                        r.id.expect("id"),
                        (r.scope.as_str().to_owned(), r.content.clone()),
                    );
                }
            }
            // The index failed before the commit: no effect, ever.
            Err(e) if e.outcome() == Outcome::NotApplied => {}
            // PostgreSQL stays up, so every call learns its commit's outcome.
            Err(e) => {
                panic!("batch {i} ended with an unknown outcome although PostgreSQL is up: {e}")
            }
        }
        self.results.push((i, result));
    }

    async fn write(&mut self, c: &PairCoordinator, i: u128) -> bool {
        let result = c.upsert(outage_batch(i)).await;
        let ok = result.is_ok();
        self.record_result(i, result);
        ok
    }

    fn summary(&self) -> Vec<String> {
        self.results
            .iter()
            .map(|(i, r)| match r {
                Ok(rep) => format!("{i}: ok (deferred cleanup {})", rep.deferred_cleanup),
                Err(e) => format!("{i}: not applied ({e})"),
            })
            .collect()
    }

    fn expected_counts(&self) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for (scope, _) in self.model.values() {
            *counts.entry(scope.clone()).or_default() += 1;
        }
        counts
    }

    /// Every batch that reported success is present (each of its records holds
    /// its content unless a later successful batch rewrote it — the model);
    /// every batch that reported `NotApplied` left no trace in any row.
    async fn assert_outcomes_hold(&self, pair: &Pair) {
        let rows = pair.rows().await;
        assert_eq!(rows, self.model, "committed rows differ from the answers");
        for (i, result) in &self.results {
            if result.is_err() {
                for r in outage_batch(*i) {
                    assert!(
                        !rows.values().any(|(_, content)| *content == r.content),
                        "batch {i} reported NotApplied but {:?} is committed",
                        r.content
                    );
                }
            }
        }
    }
}

/// Waits until the double logs a pending call of `method` with a fault.
async fn until_faulted_call_pending(faults: &Faults, method: &'static str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !faults
        .calls_to(method)
        .iter()
        .any(|c| c.fault.is_some() && c.outcome == CallOutcome::Pending)
    {
        assert!(
            Instant::now() < deadline,
            "no faulted {method} call arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The end of an outage run: I1 and I2 hold right away; after the leases a
/// recovery makes both stores exactly equal, the answers hold, and both stores
/// count the same per scope.
async fn recover_and_check(pair: &Pair, writer: &Writer) {
    let (repo, index) = (&*pair.repo, &pair.index);
    invariants::no_dangling_rows(repo, index).await.unwrap();
    invariants::no_invisible_garbage(repo, index).await.unwrap();
    writer.assert_outcomes_hold(pair).await;

    pair.after_leases();
    let c = pair.coordinator();
    let recovered = c.recover().await.expect("recover");
    println!("recovery: {recovered:?}");
    assert_eq!(recovered.failed, 0, "{recovered:?}");
    invariants::exact_equality(repo, index).await.unwrap();
    writer.assert_outcomes_hold(pair).await;
    assert_eq!(pair.sql_count("intents").await, 0, "SQL: intents");
    pair.assert_equal_counts(&writer.expected_counts()).await;
    invariants::converged(&c).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_after_the_server_stopped_mid_batch_and_came_back() {
    let dir = tempfile::tempdir().expect("temp dir");
    let double = double_on(dir.path(), 0).await;
    let port = double.addr().port();
    let pair = Pair::new(&double.url()).await;
    let c = pair.coordinator();
    let mut writer = Writer::new();

    for i in 0..5 {
        assert!(writer.write(&c, i).await, "batch {i} with the server up");
    }

    // Batch 5 is half written when the server stops: its first chunk is slow
    // but lands (the stop waits for it), its second hangs until the stop —
    // and so does every retry of it, which could otherwise be served while
    // the stopping server drains the first chunk.
    let faults = double.faults().clone();
    faults
        .add(RpcFault::once(
            "Points/Upsert",
            RpcAction::Delay(Duration::from_millis(300)),
        ))
        .add(RpcFault::always("Points/Upsert", RpcAction::Hang).after(1));
    let (result, ()) = tokio::join!(c.upsert(outage_batch(5)), async {
        until_faulted_call_pending(&faults, "Points/Upsert").await;
        double.shutdown().await;
    });
    let landed = faults.calls_to("Points/Upsert").iter().any(|c| {
        c.fault == Some(RpcAction::Delay(Duration::from_millis(300)))
            && c.outcome == CallOutcome::Ok
    });
    assert!(landed, "the first chunk of batch 5 landed before the stop");
    assert!(
        result.is_err(),
        "batch 5 cannot finish its index write: {result:?}"
    );
    writer.record_result(5, result);

    // While the server is down, every batch fails before its commit.
    for i in 6..9 {
        assert!(!writer.write(&c, i).await, "batch {i} with the server down");
    }
    // A recovery meanwhile cannot clean up; it leaves every intent.
    pair.after_leases();
    let during = c.recover().await;
    assert!(
        !pair
            .repo
            .list_intents(100)
            .await
            .expect("intents")
            .is_empty(),
        "recovery resolved intents while the index was down: {during:?}"
    );
    writer.assert_outcomes_hold(&pair).await;

    // Back on the same data directory and port; the client reconnects.
    let double = double_on(dir.path(), port).await;
    // The half-written batch left points no row references, named by its
    // intent (I2 holds, exact equality does not yet).
    let referenced: HashSet<PointId> = invariants::rows(&*pair.repo)
        .await
        .expect("rows")
        .values()
        .map(|r| r.point_id)
        .collect();
    let (_, named) = invariants::intent_points(&*pair.repo)
        .await
        .expect("intents");
    let unreferenced: Vec<PointId> = invariants::points(&pair.index)
        .await
        .expect("points")
        .into_keys()
        .filter(|p| !referenced.contains(p))
        .collect();
    assert!(
        !unreferenced.is_empty(),
        "the first chunk of batch 5 is in the index"
    );
    assert!(
        unreferenced.iter().all(|p| named.contains(p)),
        "I2: every unreferenced point is named by an intent"
    );
    for i in 9..14 {
        assert!(writer.write(&c, i).await, "batch {i} after the restart");
    }
    println!("batches: {:#?}", writer.summary());
    recover_and_check(&pair, &writer).await;
    double.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_after_every_reply_was_lost_for_a_while() {
    let double = QdrantDouble::start().await;
    let pair = Pair::new(&double.url()).await;
    let c = pair.coordinator();
    let mut writer = Writer::new();
    for i in 0..4 {
        assert!(writer.write(&c, i).await, "batch {i} before the fault");
    }
    // Every request is applied, then its connection drops: no reply arrives.
    double.faults().add(RpcFault::always(
        "*",
        RpcAction::DropConnection { applied: true },
    ));
    for i in 4..7 {
        writer.write(&c, i).await;
    }
    assert!(
        writer.results[4..].iter().all(|(_, r)| r.is_err()),
        "no index write can be confirmed without replies: {:#?}",
        writer.summary()
    );
    double.faults().clear();
    for i in 7..11 {
        assert!(writer.write(&c, i).await, "batch {i} after the fault");
    }
    println!("batches: {:#?}", writer.summary());
    recover_and_check(&pair, &writer).await;
    double.shutdown().await;
}

/// The cases without injected faults, against a real Qdrant node started for
/// each test: stopped, killed and restarted for real instead of through the
/// test server's faults.
mod real_qdrant {
    use super::*;
    use tandem_tests::real_qdrant::{Launcher, QdrantCluster};
    use tokio::task::{block_in_place, spawn_blocking};

    /// One real node with temporary storage (blocking start, 1–3 s).
    fn node() -> QdrantCluster {
        block_in_place(|| QdrantCluster::single(&Launcher::require()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[cfg_attr(
        not(real_qdrant),
        ignore = "needs a real Qdrant server: set QDRANT_BIN=/path/to/qdrant or TANDEM_QDRANT_START, see docs/qdrant.md"
    )]
    async fn after_a_successful_ingest_both_stores_count_the_same_per_scope() {
        let server = node();
        ingest_and_count(&Pair::new(&server.node(0).grpc_url()).await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[cfg_attr(
        not(real_qdrant),
        ignore = "needs a real Qdrant server: set QDRANT_BIN=/path/to/qdrant or TANDEM_QDRANT_START, see docs/qdrant.md"
    )]
    async fn a_stopped_index_leaves_nothing_committed_until_recovery_cleans_up() {
        let mut server = node();
        let pair = Pair::new(&server.node(0).grpc_url()).await;
        let c = pair.coordinator();
        // A graceful stop (SIGTERM): the port closes, the client cannot connect.
        block_in_place(|| server.node_mut(0).kill());

        let (batch, ids) = failed_batch(0x400);
        let key = "ingest-real-1";
        let err = c
            .upsert_with(batch.clone(), &WriteOptions::idempotent(key))
            .await
            .expect_err("the index is down");
        assert_eq!(err.outcome(), Outcome::NotApplied, "{err}");
        assert!(
            matches!(&err, CoordinatorError::Index(e) if e.is_retryable()),
            "a retryable index error: {err:?}"
        );
        // The compensation could not reach the index either: the intent stays
        // for recovery, and nothing is committed.
        assert_nothing_committed(&pair, &ids, key, 1).await;

        block_in_place(|| server.node_mut(0).restart());
        pair.after_leases();
        let recovered = c.recover().await.expect("recover");
        assert_eq!(recovered.resolved, 1, "{recovered:?}");
        assert_nothing_committed(&pair, &ids, key, 0).await;
        invariants::exact_equality(&*pair.repo, &pair.index)
            .await
            .unwrap();
        pair.assert_equal_counts(&BTreeMap::new()).await;

        // The key was not spent: the same call applies now.
        let report = c
            .upsert_with(batch, &WriteOptions::idempotent(key))
            .await
            .expect("the retried ingest succeeds");
        assert_eq!((report.inserted, report.replayed), (5, false));
        pair.assert_equal_counts(&BTreeMap::from([("alpha".into(), 3), ("beta".into(), 2)]))
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[cfg_attr(
        not(real_qdrant),
        ignore = "needs a real Qdrant server: set QDRANT_BIN=/path/to/qdrant or TANDEM_QDRANT_START, see docs/qdrant.md"
    )]
    async fn recovery_after_the_server_was_sigkilled_mid_ingest_and_restarted() {
        let mut server = node();
        let pair = Pair::new(&server.node(0).grpc_url()).await;
        let c = pair.coordinator();
        let mut writer = Writer::new();
        for i in 0..5 {
            assert!(writer.write(&c, i).await, "batch {i} with the server up");
        }
        // SIGKILL while batches are being written, restart on the same
        // storage and ports a little later; the writes go on throughout.
        let outage = spawn_blocking(move || {
            std::thread::sleep(Duration::from_millis(fastrand_ms(5, 40)));
            server.node_mut(0).kill9();
            let killed = Instant::now();
            std::thread::sleep(Duration::from_millis(700));
            server.node_mut(0).restart();
            (server, killed.elapsed())
        });
        let mut i = 5;
        let mut ok_after_restart = 0;
        while !outage.is_finished() || ok_after_restart < 5 {
            let ok = writer.write(&c, i).await;
            if outage.is_finished() && ok {
                ok_after_restart += 1;
            }
            i += 1;
            assert!(
                i < 1_000,
                "the writes never succeeded again after the restart"
            );
        }
        let (_server, down) = outage.await.expect("the outage task");
        let failed = writer.results.iter().filter(|(_, r)| r.is_err()).count();
        println!(
            "{} batches, {failed} not applied; the server was down for {:.1} s",
            writer.results.len(),
            down.as_secs_f64()
        );
        assert!(
            failed > 0,
            "some batch met the dead server: {:#?}",
            writer.summary()
        );
        recover_and_check(&pair, &writer).await;
    }

    /// A pseudo-random delay in `[lo, hi)` ms (where in the writes the kill
    /// lands); the seed does not matter, the checks hold for every delay.
    fn fastrand_ms(lo: u64, hi: u64) -> u64 {
        use rand::Rng;
        rand::rng().random_range(lo..hi)
    }
}
