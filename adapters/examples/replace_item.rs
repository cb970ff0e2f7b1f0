//! Replaces an item's embeddings with one `Transaction` — with the caller's
//! own SQL in the same commit — and runs a two-step saga whose compensation
//! restores the record it changed, on the embedded stores (SQLite +
//! qdrant-edge) in a temporary directory.
//!
//! ```sh
//! cargo run -p tandem-adapters --example replace_item
//! ```
//!
//! The guide that walks through it: `docs/sagas.md`.

use std::sync::{Arc, Mutex, PoisonError};

use diesel::connection::SimpleConnection;
use diesel::sql_types::{BigInt, Text};
use diesel::{Connection, QueryableByName, RunQueryDsl, SqliteConnection};
use serde_json::json;
use tandem_adapters::edge::EdgeVectorIndex;
use tandem_adapters::sqlite::{SqliteConfig, SqliteMetadataRepo};
use tandem_core::{
    Coordinator, CoordinatorConfig, CoordinatorError, DeleteSelector, Distance, Filter, NewRecord,
    RecordId, SagaDefinition, SagaState, SearchQuery, SqlStep, StepDefinition, Transaction,
    ValidationError, WriteOptions,
};

type Tandem = Coordinator<SqliteMetadataRepo, EdgeVectorIndex>;
type Error = Box<dyn std::error::Error>;

const SCOPE: &str = "catalog";

#[tokio::main]
async fn main() -> Result<(), Error> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("metadata.db");
    let repo = SqliteMetadataRepo::open(SqliteConfig::new(&db)).await?;
    let index = EdgeVectorIndex::open(dir.path().join("vectors"), 3, Distance::Cosine).await?;
    let tandem = Coordinator::new(repo, index, CoordinatorConfig::default())?;

    // The caller's own table, in the same database as Tandem's.
    let mut own = SqliteConnection::establish(db.to_str().ok_or("the path is not UTF-8")?)?;
    own.batch_execute(
        "CREATE TABLE items (id TEXT PRIMARY KEY NOT NULL, status TEXT NOT NULL, \
         embeddings INTEGER NOT NULL)",
    )?;

    let sku_18 = seed(&tandem).await?;
    replace_item(&tandem, &mut own).await?;
    rejected_units(&tandem, sku_18).await?;
    saga(&tandem, sku_18).await?;

    tandem.recover().await?;
    let report = tandem.verify(None).await?;
    assert!(report.is_consistent(), "{report:?}");
    let rows: u64 = report.scopes.values().map(|c| c.rows).sum();
    println!("verify: both stores agree exactly ({rows} records, no live intents)");
    Ok(())
}

/// Two embeddings of item sku-17 and one of sku-18; returns sku-18's id.
async fn seed(tandem: &Tandem) -> Result<RecordId, Error> {
    let sku_18 = RecordId::new_v7();
    let written = tandem
        .upsert(vec![
            record("red running shoes, front view", [0.9, 0.1, 0.0], "sku-17"),
            record("red running shoes, side view", [0.8, 0.2, 0.0], "sku-17"),
            record("blue trail running shoes", [0.1, 0.9, 0.0], "sku-18").with_id(sku_18),
        ])
        .await?;
    println!(
        "seeded: {} records (2 of sku-17, 1 of sku-18)",
        written.inserted
    );
    Ok(sku_18)
}

/// The new embeddings of sku-17 replace the old ones, and the caller's own
/// `items` row says so, in one commit.
fn replacement() -> Transaction {
    Transaction::new()
        .delete(DeleteSelector::MetadataEq {
            scope: SCOPE.into(),
            key: "item".into(),
            value: json!("sku-17"),
        })
        .upsert(vec![
            record("red running shoes, front", [0.95, 0.05, 0.0], "sku-17"),
            record("red running shoes, sole", [0.7, 0.3, 0.1], "sku-17"),
            record("red running shoes, worn", [0.85, 0.1, 0.1], "sku-17"),
        ])
        .with_step(SqlStep::new(|conn: &mut SqliteConnection| {
            Box::pin(async move {
                // diesel's synchronous API: SQLite runs the step on the
                // connection's own thread, inside the commit's transaction.
                diesel::sql_query(
                    "INSERT INTO items (id, status, embeddings) VALUES (?, 'indexed', 3) \
                     ON CONFLICT (id) DO UPDATE SET status = excluded.status, \
                     embeddings = excluded.embeddings",
                )
                .bind::<Text, _>("sku-17")
                .execute(conn)?;
                Ok(())
            })
        }))
}

async fn replace_item(tandem: &Tandem, own: &mut SqliteConnection) -> Result<(), Error> {
    let key = WriteOptions::idempotent("replace sku-17 / 2026-12-05");
    let report = tandem.transact(replacement(), &key).await?;
    println!(
        "transaction: sku-17 replaced in one commit: {} deleted, {} inserted",
        report.deleted, report.inserted
    );

    // A retry with the same key (after a timeout, say) writes nothing.
    let again = tandem.transact(replacement(), &key).await?;
    assert!(again.replayed && again.ids == report.ids);
    println!("  retried with the same key: answered from the key, nothing written");

    let hits = tandem
        .search(
            &SearchQuery::new(vec![1.0, 0.0, 0.0], 10)
                .with_filter(Filter::scope(SCOPE).with_eq("item", json!("sku-17"))),
        )
        .await?;
    let contents: Vec<&str> = hits.iter().map(|h| h.record.content.as_str()).collect();
    assert_eq!(hits.len(), 3);
    assert!(contents.iter().all(|c| !c.ends_with("view")));
    println!("  search for sku-17 finds only the new embeddings: {contents:?}");

    let item: Vec<ItemRow> =
        diesel::sql_query("SELECT status, embeddings FROM items WHERE id = 'sku-17'").load(own)?;
    let item = item.first().ok_or("the caller's step did not commit")?;
    assert_eq!((item.status.as_str(), item.embeddings), ("indexed", 3));
    println!(
        "  the caller's own row committed with them: items[sku-17] = {} ({} embeddings)",
        item.status, item.embeddings
    );
    Ok(())
}

#[derive(QueryableByName)]
struct ItemRow {
    #[diesel(sql_type = Text)]
    status: String,
    #[diesel(sql_type = BigInt)]
    embeddings: i64,
}

/// A unit whose caller step fails, and one the validation rejects: neither
/// writes anything.
async fn rejected_units(tandem: &Tandem, sku_18: RecordId) -> Result<(), Error> {
    let refused = Transaction::new()
        .delete(DeleteSelector::Ids(vec![sku_18]))
        .upsert(vec![record(
            "blue trail running shoes, v2",
            [0.2, 0.8, 0.0],
            "sku-18",
        )])
        .with_step(SqlStep::new(|_: &mut SqliteConnection| {
            Box::pin(async move { Err("catalog sku-18 is locked by an editor".into()) })
        }));
    match tandem.transact(refused, &WriteOptions::default()).await {
        Err(e @ CoordinatorError::StepFailed { .. }) => {
            assert!(!e.is_retryable());
            println!("caller step failed: {e}; outcome {:?}", e.outcome());
        }
        other => return Err(format!("expected StepFailed, got {other:?}").into()),
    }
    let kept = tandem.get(&[sku_18]).await?;
    assert_eq!(kept.len(), 1, "the failed unit deleted nothing");
    println!("  nothing of it applied: sku-18's record is still there, its new point compensated");

    let twice = Transaction::new()
        .upsert(vec![
            record("blue trail running shoes", [0.1, 0.9, 0.0], "sku-18").with_id(sku_18),
        ])
        .upsert(vec![
            record("blue trail running shoes!", [0.1, 0.9, 0.0], "sku-18").with_id(sku_18),
        ]);
    match tandem.transact(twice, &WriteOptions::default()).await {
        Err(CoordinatorError::Invalid(e @ ValidationError::UpsertedTwice { .. })) => {
            println!("rejected before anything was written: {e}");
        }
        other => return Err(format!("expected UpsertedTwice, got {other:?}").into()),
    }
    Ok(())
}

/// A two-step saga: reprice a record (a Tandem step), then announce it (a
/// caller action with its compensation). Run once to its end, then once with
/// the announcement refused: the reprice is compensated.
async fn saga(tandem: &Tandem, sku_18: RecordId) -> Result<(), Error> {
    // Stands for another system: announcements by key.
    let storefront: Arc<Mutex<Vec<String>>> = Arc::default();
    let (announce, retract) = (storefront.clone(), storefront.clone());
    tandem.register_saga(
        SagaDefinition::new("reprice-item")
            .step(StepDefinition::tandem("reprice", |ctx| {
                let id: RecordId = serde_json::from_value(ctx.input["record"].clone())?;
                let content = ctx.input["content"].as_str().ok_or("no content")?;
                Ok(Transaction::new()
                    .upsert(vec![record(content, [0.1, 0.9, 0.0], "sku-18").with_id(id)]))
            }))
            .step(StepDefinition::action(
                "announce",
                move |ctx| {
                    let storefront = announce.clone();
                    async move {
                        if ctx.input["refuse"] == json!(true) {
                            return Err("the storefront refused the new price".into());
                        }
                        // Idempotent by the step's key: a rerun adds nothing.
                        let mut s = storefront.lock().unwrap_or_else(PoisonError::into_inner);
                        if !s.contains(&ctx.key) {
                            s.push(ctx.key.clone());
                        }
                        Ok(json!({ "announced": ctx.key }))
                    }
                },
                move |ctx| {
                    let storefront = retract.clone();
                    async move {
                        // Also called for an announcement that never happened.
                        storefront
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .retain(|k| *k != ctx.key);
                        Ok(())
                    }
                },
            )),
    )?;

    let done = tandem
        .run_saga(
            "reprice-item",
            json!({ "record": sku_18, "content": "blue trail running shoes, 20% off" }),
        )
        .await?;
    assert_eq!(done.state, SagaState::Done);
    println!(
        "saga {}: {} (announcements: {})",
        done.id,
        done.state,
        storefront
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    );

    let before = tandem.get(&[sku_18]).await?.remove(0);
    let undone = tandem
        .run_saga(
            "reprice-item",
            json!({ "record": sku_18, "content": "blue trail running shoes, 50% off", "refuse": true }),
        )
        .await?;
    assert_eq!(undone.state, SagaState::Compensated);
    let after = tandem.get(&[sku_18]).await?.remove(0);
    assert_eq!(
        (&after.content, after.point_id, &after.vector),
        (&before.content, before.point_id, &before.vector)
    );
    println!(
        "saga {}: {} ({})",
        undone.id,
        undone.state,
        undone.error.as_deref().unwrap_or("")
    );
    println!(
        "  sku-18 restored exactly: {:?}, the same point and vector (version {} -> {})",
        after.content, before.version, after.version
    );

    for s in tandem.sagas(None, 10).await? {
        let steps: Vec<String> = s
            .steps
            .iter()
            .map(|st| format!("{} {:?}", st.name, st.state))
            .collect();
        println!(
            "  journal: {} {} {} [{}]",
            s.id,
            s.name,
            s.state,
            steps.join(", ")
        );
    }
    println!("  sagas per state: {:?}", tandem.saga_counts().await?);
    Ok(())
}

fn record(content: &str, vector: [f32; 3], item: &str) -> NewRecord {
    NewRecord::new(SCOPE, content, vector.to_vec()).with_metadata(json!({ "item": item }))
}
