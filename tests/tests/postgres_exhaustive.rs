//! The core fault suites with `PostgresMetadataRepo` (behind the fault layer)
//! and the in-memory index: every single fault exhaustively, a live call racing
//! recovery, and random histories (proptest) — the same invariants as on the
//! in-memory stores, now with real transactions.
//!
//! Real time (PostgreSQL cannot run on tokio's paused clock), so the call
//! deadline is short (300 ms) to keep the `Hang` cases quick; each case reuses
//! one schema, emptied in between. The property suite runs 64 random histories
//! by default (`TANDEM_PG_PROPTEST_CASES` changes it).

use std::sync::Arc;
use std::time::Duration;

use diesel_async::{AsyncPgConnection, RunQueryDsl};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tandem_adapters::memory::InMemoryVectorIndex;
use tandem_adapters::postgres::PostgresMetadataRepo;
use tandem_core::{Distance, SqlStep};
use tandem_tests::harness::{
    CallerStep, DIM, Scenario, exhaustive_with, fault_config, index_outage_keeps_the_backlog,
    late_write_lands_after_a_supersede, poison_is_dead_lettered, recovery_races_a_live_call,
    saga_races_recovery,
};
use tandem_tests::pg::TestSchema;
use tandem_tests::property::{real_time_step, run_history};

const DEADLINE: Duration = Duration::from_millis(300);

/// Every single fault of one scenario, on a schema of its own (the scenarios
/// run as separate tests, in parallel).
async fn every_single_fault(scenario: Scenario) {
    let schema = TestSchema::new().await;
    let repo = Arc::new(schema.repo().await);
    let admin = Arc::new(schema.admin().await);
    // The caller's own table, next to Tandem's in the test's schema.
    admin
        .batch_execute(&format!(
            "CREATE TABLE {}.catalogs (id text PRIMARY KEY, status text NOT NULL)",
            schema.name()
        ))
        .await
        .expect("create the caller's table");
    let (s, a, r) = (&schema, &admin, &repo);
    let summary = exhaustive_with(
        move || async move {
            s.truncate(a).await;
            a.batch_execute(&format!("TRUNCATE {}.catalogs", s.name()))
                .await
                .expect("truncate the caller's table");
            (r.clone(), InMemoryVectorIndex::new(DIM, Distance::Cosine))
        },
        fault_config(DEADLINE),
        &[scenario],
        None,
        Some(caller_step(admin.clone(), schema.name().to_owned())),
    )
    .await;
    summary.assert_no_failures(&format!("PostgreSQL {scenario:?}"));
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
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
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

/// The caller's step in SQL on the store's own connection (diesel-async):
/// mark catalog "a" indexed, in the commit's transaction.
fn caller_step(
    admin: Arc<tokio_postgres::Client>,
    schema: String,
) -> CallerStep<Arc<PostgresMetadataRepo>> {
    CallerStep {
        step: Arc::new(SqlStep::new(|conn: &mut AsyncPgConnection| {
            Box::pin(async move {
                diesel::sql_query(
                    "INSERT INTO catalogs (id, status) VALUES ('a', 'indexed') \
                     ON CONFLICT (id) DO UPDATE SET status = excluded.status",
                )
                .execute(conn)
                .await?;
                Ok(())
            })
        })),
        applied: Arc::new(move |_repo: &Arc<PostgresMetadataRepo>| {
            let (admin, schema) = (admin.clone(), schema.clone());
            Box::pin(async move {
                let n: i64 = admin
                    .query_one(
                        &format!(
                            "SELECT count(*) FROM {schema}.catalogs \
                             WHERE id = 'a' AND status = 'indexed'"
                        ),
                        &[],
                    )
                    .await
                    .map_err(|e| format!("read the caller's table: {e}"))?
                    .get(0);
                Ok(n == 1)
            })
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_leaves_a_live_saga_alone_on_postgres() {
    let schema = TestSchema::new().await;
    saga_races_recovery(
        schema.repo().await,
        InMemoryVectorIndex::new(DIM, Distance::Cosine),
        fault_config(Duration::from_secs(5)),
        None,
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_leaves_a_live_call_alone_on_postgres() {
    let schema = TestSchema::new().await;
    recovery_races_a_live_call(
        schema.repo().await,
        InMemoryVectorIndex::new(DIM, Distance::Cosine),
        fault_config(Duration::from_secs(5)),
        None,
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_landing_write_after_a_supersede_leaves_no_orphan_on_postgres() {
    let schema = TestSchema::new().await;
    late_write_lands_after_a_supersede(
        schema.repo().await,
        InMemoryVectorIndex::new(DIM, Distance::Cosine),
        fault_config(Duration::from_secs(5)),
        None,
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_outage_delays_the_backlog_without_dead_lettering_it_on_postgres() {
    let schema = TestSchema::new().await;
    index_outage_keeps_the_backlog(
        schema.repo().await,
        InMemoryVectorIndex::new(DIM, Distance::Cosine),
        fault_config(Duration::from_secs(5)),
        None,
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_the_index_rejects_is_dead_lettered_alone_on_postgres() {
    let schema = TestSchema::new().await;
    poison_is_dead_lettered(
        schema.repo().await,
        InMemoryVectorIndex::new(DIM, Distance::Cosine),
        fault_config(Duration::from_secs(5)),
    )
    .await
    .unwrap();
}

fn cases() -> u32 {
    std::env::var("TANDEM_PG_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

#[test]
fn random_histories_keep_every_invariant_on_postgres() {
    // One runtime for every case: the pool's connections live on it.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let schema = rt.block_on(TestSchema::new());
    let repo = Arc::new(rt.block_on(schema.repo()));
    let admin = rt.block_on(schema.admin());
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let (s, a, r) = (&schema, &admin, &repo);
    let outcome = runner.run(&prop::collection::vec(real_time_step(), 1..10), |steps| {
        let result = rt.block_on(run_history(
            move || async move {
                s.truncate(a).await;
                (r.clone(), InMemoryVectorIndex::new(DIM, Distance::Cosine))
            },
            fault_config(DEADLINE),
            steps,
            None,
        ));
        prop_assert!(result.is_ok(), "{}", result.unwrap_err());
        Ok(())
    });
    println!("random histories (PostgreSQL): {} cases", cases());
    if let Err(e) = outcome {
        panic!("{e}");
    }
}
