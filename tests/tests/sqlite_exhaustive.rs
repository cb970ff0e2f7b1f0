//! The core fault suites with `SqliteMetadataRepo` (behind the fault layer)
//! and the in-memory index: every single fault exhaustively, and a live call
//! racing recovery. Each case gets a fresh database file. Paused tokio time
//! works here: time does not auto-advance while SQLite's blocking tasks run.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::sql_types::BigInt;
use diesel::{Connection, QueryableByName, RunQueryDsl, SqliteConnection};
use tandem_adapters::memory::InMemoryVectorIndex;
use tandem_adapters::sqlite::{SqliteConfig, SqliteMetadataRepo};
use tandem_core::{Distance, SqlStep};
use tandem_tests::harness::{
    CallerStep, DIM, Scenario, exhaustive_with, fault_config, index_outage_keeps_the_backlog,
    poison_is_dead_lettered, recovery_races_a_live_call, saga_races_recovery,
    slow_action_keeps_its_lease,
};

async fn open(dirs: &Mutex<Vec<tempfile::TempDir>>) -> SqliteMetadataRepo {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("tandem.db");
    let repo = SqliteMetadataRepo::open(SqliteConfig::new(&path))
        .await
        .expect("open SQLite");
    // The caller's own table, next to Tandem's.
    SqliteConnection::establish(path.to_str().expect("utf-8 path"))
        .and_then(|mut c| {
            c.batch_execute(
                "CREATE TABLE catalogs (id TEXT PRIMARY KEY NOT NULL, status TEXT NOT NULL)",
            )
            .map_err(diesel::ConnectionError::CouldntSetupConfiguration)
        })
        .expect("create the caller's table");
    // Kept until the test ends.
    dirs.lock().unwrap().push(dir);
    repo
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// The caller's step in SQL on the store's own connection: mark catalog "a"
/// indexed, in the commit's transaction.
fn caller_step() -> CallerStep<SqliteMetadataRepo> {
    CallerStep {
        step: Arc::new(SqlStep::new(|conn: &mut SqliteConnection| {
            Box::pin(async move {
                diesel::sql_query(
                    "INSERT INTO catalogs (id, status) VALUES ('a', 'indexed') \
                     ON CONFLICT (id) DO UPDATE SET status = excluded.status",
                )
                .execute(conn)?;
                Ok(())
            })
        })),
        applied: Arc::new(|repo: &SqliteMetadataRepo| {
            let path = repo.config().path.clone();
            Box::pin(async move {
                let mut c = SqliteConnection::establish(path.to_str().unwrap_or_default())
                    .map_err(|e| format!("open: {e}"))?;
                let rows: Vec<Count> = diesel::sql_query(
                    "SELECT count(*) AS n FROM catalogs WHERE id = 'a' AND status = 'indexed'",
                )
                .load(&mut c)
                .map_err(|e| format!("read the caller's table: {e}"))?;
                Ok(rows.first().is_some_and(|r| r.n == 1))
            })
        }),
    }
}

/// Every single fault of one scenario (the scenarios run as separate tests,
/// in parallel).
async fn every_single_fault(scenario: Scenario) {
    let dirs = Mutex::new(Vec::new());
    let d = &dirs;
    let summary = exhaustive_with(
        move || async move {
            (
                open(d).await,
                InMemoryVectorIndex::new(DIM, Distance::Cosine),
            )
        },
        fault_config(Duration::from_secs(5)),
        &[scenario],
        None,
        Some(caller_step()),
    )
    .await;
    summary.assert_no_failures(&format!("SQLite {scenario:?}"));
    // Several port calls, each tried with every fault.
    assert!(
        summary.cases > scenario.least_cases(),
        "{scenario:?} ran too few cases"
    );
    // A saga whose action is refused never ends done: it is compensated.
    let ended = if scenario == Scenario::SagaCompensates {
        "not_applied"
    } else {
        "ok"
    };
    for kind in [ended, "crashed"] {
        assert!(
            summary.outcomes.get(kind).copied().unwrap_or(0) > 0,
            "no {scenario:?} case ended {kind}"
        );
    }
}

macro_rules! every_single_fault {
    ($($name:ident => $scenario:ident),* $(,)?) => {
        $(
            #[tokio::test(start_paused = true)]
            async fn $name() {
                every_single_fault(Scenario::$scenario).await;
            }
        )*
    };
}

every_single_fault! {
    every_single_fault_of_an_insert => Insert,
    every_single_fault_of_an_update => Update,
    every_single_fault_of_a_mixed_upsert => Mixed,
    every_single_fault_of_a_delete_by_ids => DeleteIds,
    every_single_fault_of_a_delete_by_scope => DeleteScope,
    every_single_fault_of_a_delete_by_metadata => DeleteMetadata,
    every_single_fault_of_a_recovery => Recovery,
    every_single_fault_of_a_transaction => Transaction,
    every_single_fault_of_a_transaction_with_a_caller_step => TransactionStep,
    every_single_fault_of_a_saga => Saga,
    every_single_fault_of_a_compensated_saga => SagaCompensates,
    every_single_fault_of_a_deferred_upsert => DeferredUpsert,
    every_single_fault_of_a_deferred_delete => DeferredDelete,
    every_single_fault_of_an_index_workers_pass => IndexWorker,
}

#[tokio::test(start_paused = true)]
async fn recovery_leaves_a_live_saga_alone_on_sqlite() {
    let dirs = Mutex::new(Vec::new());
    saga_races_recovery(
        open(&dirs).await,
        InMemoryVectorIndex::new(DIM, Distance::Cosine),
        fault_config(Duration::from_secs(5)),
        None,
    )
    .await
    .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_slow_action_keeps_its_sagas_lease_on_sqlite() {
    let dirs = Mutex::new(Vec::new());
    slow_action_keeps_its_lease(
        open(&dirs).await,
        InMemoryVectorIndex::new(DIM, Distance::Cosine),
        fault_config(Duration::from_secs(5)),
        None,
    )
    .await
    .unwrap();
}

#[tokio::test(start_paused = true)]
async fn recovery_leaves_a_live_call_alone_on_sqlite() {
    let dirs = Mutex::new(Vec::new());
    recovery_races_a_live_call(
        open(&dirs).await,
        InMemoryVectorIndex::new(DIM, Distance::Cosine),
        fault_config(Duration::from_secs(5)),
        None,
    )
    .await
    .unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_index_outage_delays_the_backlog_without_dead_lettering_it_on_sqlite() {
    let dirs = Mutex::new(Vec::new());
    index_outage_keeps_the_backlog(
        open(&dirs).await,
        InMemoryVectorIndex::new(DIM, Distance::Cosine),
        fault_config(Duration::from_secs(5)),
        None,
    )
    .await
    .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_point_the_index_rejects_is_dead_lettered_alone_on_sqlite() {
    let dirs = Mutex::new(Vec::new());
    poison_is_dead_lettered(
        open(&dirs).await,
        InMemoryVectorIndex::new(DIM, Distance::Cosine),
        fault_config(Duration::from_secs(5)),
    )
    .await
    .unwrap();
}
