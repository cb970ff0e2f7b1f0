//! Light pending-index entries (migration `2026-12-07-000000_light_pending_entries`)
//! in `SqliteMetadataRepo` and `PostgresMetadataRepo`, with and without kept
//! vectors: a deferred write stores each record's scope, metadata and vector
//! once, in its row, and every read of an entry fills them in from the row.
//!
//! The cases are written like the conformance suite's (one generic function
//! per contract, named after it): the reads must return what the
//! `claim_pending` / `pending_for` contracts promise — the row's scope,
//! metadata and vector at the entry's version — and the raw table must hold
//! light entries, so the saving cannot silently regress.
//!
//! One case sets up, through the tables, what only a race shows: a claim
//! whose statement read a row before the commit that enqueued its entry
//! (`pending_claim_leaves_an_entry_whose_row_is_behind`). PostgreSQL keeps
//! each entry on its record's row since migration
//! `2026-12-14-000000_pending_on_rows`; its cases check that layout.

use std::path::PathBuf;

use async_trait::async_trait;
use diesel::connection::SimpleConnection;
use diesel::sql_types::{Binary, Bool, Nullable, Text};
use diesel::{Connection, QueryableByName, RunQueryDsl, SqliteConnection};
use serde_json::json;
use tandem_adapters::sqlite::{SqliteConfig, SqliteMetadataRepo};
use tandem_core::{
    CommitPart, DeleteSelector, IndexGate, MetadataRepo, OwnerToken, PendingFilter, PendingIndex,
    PointId, RecordId, RowWrite, Scope, TransactionCommit,
};
use tandem_tests::pg::TestSchema;
use tandem_tests::pg::data::{meta, prepare_upsert};

/// Entries of these cases are enqueued at this time.
const T0: i64 = 1_000;
/// "Now" of the claims.
const NOW: i64 = 2_000_000_000_000;

/// A pending entry's content columns as the table stores them.
#[derive(Debug)]
struct RawEntry {
    scope_null: bool,
    metadata_null: bool,
    vector: Option<Vec<u8>>,
}

/// Direct access to a store's tables, around the port.
#[async_trait]
trait Raw: Send + Sync {
    /// The record's entry as stored.
    async fn entry(&self, id: RecordId) -> Option<RawEntry>;
    /// Gives the record's entry content of its own (scope "restored", the
    /// metadata `{"restored": true}`, the vector `[9.0]`), as a restore from
    /// a held commit's undo image writes it.
    async fn fill_entry(&self, id: RecordId);
    /// Removes the record's row behind the port's back (its entry stays).
    async fn drop_row(&self, id: RecordId);
    /// Sets the record's row version behind the port's back.
    async fn set_row_version(&self, id: RecordId, version: i64);
}

fn row(scope: &str, n: i64) -> RowWrite {
    RowWrite {
        id: RecordId::new_random(),
        scope: Scope::new(scope),
        content: format!("content {n}"),
        metadata: meta(json!({ "n": n, "scope": scope })),
        point_id: PointId::new_random(),
        vector: vec![n as f32, 0.25, -1.5],
    }
}

/// The same record with other content in every column an entry reads.
fn rewrite(old: &RowWrite, scope: &str, n: i64) -> RowWrite {
    RowWrite {
        id: old.id,
        ..row(scope, n)
    }
}

fn vector_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

async fn committed<M: MetadataRepo + ?Sized>(repo: &M, rows: &[RowWrite]) {
    let (intent, owner) = prepare_upsert(repo, rows).await;
    repo.commit_upsert(intent, owner, rows, None)
        .await
        .expect("commit_upsert");
}

/// A deferred write of `rows`, enqueued at `T0`.
async fn defer<M: MetadataRepo + ?Sized>(repo: &M, rows: &[RowWrite]) {
    defer_at(repo, rows, T0).await;
}

async fn entry<M: MetadataRepo + ?Sized>(repo: &M, id: RecordId) -> Option<PendingIndex> {
    let mut found = repo.pending_for(&[id]).await.expect("pending_for");
    assert!(found.len() <= 1, "two entries of one record");
    found.pop()
}

/// Claims up to 100 entries at `NOW` with `token`.
async fn claim_all<M: MetadataRepo + ?Sized>(repo: &M, token: OwnerToken) -> Vec<PendingIndex> {
    repo.claim_pending(NOW, token, NOW + 600_000, 100)
        .await
        .expect("claim_pending")
}

/// Asserts that `e` carries `w`'s content at `version`.
fn assert_content(e: &PendingIndex, w: &RowWrite, version: u64, what: &str) {
    assert_eq!(e.record_id, w.id, "{what}");
    assert_eq!(e.version, version, "{what}: version");
    assert_eq!(e.scope, w.scope, "{what}: scope");
    assert_eq!(e.metadata, w.metadata, "{what}: metadata");
    assert_eq!(e.vector, w.vector, "{what}: vector");
}

/// `deferred_entries_are_light`: a deferred write's entry stores no scope
/// and no metadata, and a vector only when rows do not keep theirs; an
/// entry that carried content (restored from an undo image) becomes light
/// when a deferred write coalesces into it.
async fn deferred_entries_are_light<M: MetadataRepo + ?Sized>(
    repo: &M,
    raw: &dyn Raw,
    keeps_vectors: bool,
) {
    let old = row("light-a", 1);
    committed(repo, std::slice::from_ref(&old)).await;
    let updated = rewrite(&old, "light-b", 2);
    let new = row("light-a", 3);
    defer(repo, &[updated.clone(), new.clone()]).await;
    for written in [&updated, &new] {
        let e = raw.entry(written.id).await.expect("an entry per record");
        assert!(
            e.scope_null && e.metadata_null,
            "entry stores content: {e:?}"
        );
        let expected = (!keeps_vectors).then(|| vector_bytes(&written.vector));
        assert_eq!(e.vector, expected, "the entry's vector column");
    }
    // An entry with content of its own, coalesced by a deferred write.
    raw.fill_entry(new.id).await;
    let filled = raw.entry(new.id).await.expect("entry");
    assert!(!filled.scope_null && !filled.metadata_null && filled.vector.is_some());
    let again = rewrite(&new, "light-c", 4);
    defer(repo, std::slice::from_ref(&again)).await;
    let e = raw.entry(new.id).await.expect("the coalesced entry");
    assert!(
        e.scope_null && e.metadata_null,
        "coalesced entry keeps content: {e:?}"
    );
    let expected = (!keeps_vectors).then(|| vector_bytes(&again.vector));
    assert_eq!(e.vector, expected, "the coalesced entry's vector column");
    let read = entry(repo, new.id).await.expect("entry");
    assert_content(&read, &again, 2, "the coalesced entry, read");
}

/// `pending_claim_reads_rows`: claimed, listed and looked-up entries carry
/// exactly the scope, metadata and vector of their rows at the entries'
/// versions — for a new record, an updated one and one written twice
/// (coalesced) — although the entries do not store them.
async fn pending_claim_reads_rows<M: MetadataRepo + ?Sized>(repo: &M) {
    let old = row("claim-a", 1);
    committed(repo, std::slice::from_ref(&old)).await;
    let updated = rewrite(&old, "claim-b", 2);
    let new = row("claim-c", 3);
    let twice = row("claim-d", 4);
    defer(repo, &[updated.clone(), new.clone(), twice.clone()]).await;
    let twice2 = rewrite(&twice, "claim-e", 5);
    defer(repo, std::slice::from_ref(&twice2)).await;
    let expected = [(&updated, 2), (&new, 1), (&twice2, 2)];

    for (w, version) in expected {
        let e = entry(repo, w.id).await.expect("pending_for");
        assert_content(&e, w, version, "pending_for");
    }
    let listed = repo
        .list_pending(PendingFilter::All, None, 100)
        .await
        .expect("list_pending");
    assert_eq!(listed.len(), 3);
    for (w, version) in expected {
        let e = listed.iter().find(|e| e.record_id == w.id).expect("listed");
        assert_content(e, w, version, "list_pending");
    }
    let claim = OwnerToken::new_random();
    let claimed = claim_all(repo, claim).await;
    assert_eq!(claimed.len(), 3, "{claimed:?}");
    for (w, version) in expected {
        let e = claimed
            .iter()
            .find(|e| e.record_id == w.id)
            .expect("claimed");
        assert_content(e, w, version, "claim_pending");
        assert_eq!(e.claimed_by, Some(claim));
    }
}

/// `pending_stale_entry_is_readable`: an entry whose row is gone reads
/// without an error (its versions as stored, the content it stores, the
/// rest empty), and a claim deletes it without returning it.
async fn pending_stale_entry_is_readable<M: MetadataRepo + ?Sized>(
    repo: &M,
    raw: &dyn Raw,
    keeps_vectors: bool,
) {
    let gone = row("stale", 1);
    defer(repo, std::slice::from_ref(&gone)).await;
    raw.drop_row(gone.id).await;
    let e = entry(repo, gone.id).await.expect("the stale entry");
    assert_eq!((e.version, e.indexed_version), (1, 0));
    assert_eq!(e.scope.as_str(), "");
    assert!(e.metadata.is_empty());
    let vector = if keeps_vectors {
        Vec::new()
    } else {
        gone.vector.clone()
    };
    assert_eq!(e.vector, vector);
    let listed = repo
        .list_pending(PendingFilter::Waiting, None, 100)
        .await
        .expect("list_pending");
    assert!(listed.iter().any(|e| e.record_id == gone.id));
    let claimed = claim_all(repo, OwnerToken::new_random()).await;
    assert!(claimed.is_empty(), "a stale entry was claimed: {claimed:?}");
    assert!(entry(repo, gone.id).await.is_none(), "the claim deletes it");
}

/// `pending_claim_leaves_an_entry_whose_row_is_behind`: under read
/// committed, a claim's `FOR UPDATE` re-reads an entry a commit changed
/// during the statement at its newest version, but keeps the joined row as
/// the statement's snapshot saw it — one version behind the entry. Such an
/// entry is neither stale (its write is not superseded) nor claimable (its
/// content is not at hand): the claim must leave it as it is, and the next
/// claim, which sees both, takes it. (Deleting it, as the claim once did,
/// lost the update: it was never indexed.) The race is set up here through
/// the tables: the row's version is put back while the claim runs.
async fn pending_claim_leaves_an_entry_whose_row_is_behind<M: MetadataRepo + ?Sized>(
    repo: &M,
    raw: &dyn Raw,
) {
    let old = row("behind-a", 1);
    committed(repo, std::slice::from_ref(&old)).await;
    let updated = rewrite(&old, "behind-b", 2);
    defer(repo, std::slice::from_ref(&updated)).await;
    raw.set_row_version(updated.id, 1).await;

    let claimed = claim_all(repo, OwnerToken::new_random()).await;
    assert!(
        claimed.is_empty(),
        "an entry ahead of its row was claimed: {claimed:?}"
    );
    let e = entry(repo, updated.id)
        .await
        .expect("the claim deleted an entry ahead of its row");
    assert_eq!((e.version, e.indexed_version), (2, 1));
    assert_eq!(e.claimed_by, None, "the entry was marked claimed");

    raw.set_row_version(updated.id, 2).await;
    let claim = OwnerToken::new_random();
    let claimed = claim_all(repo, claim).await;
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    assert_content(&claimed[0], &updated, 2, "the next claim");
    assert_eq!(claimed[0].claimed_by, Some(claim));
}

// SQLite.

struct SqliteRaw {
    path: PathBuf,
}

#[derive(QueryableByName)]
struct SqliteRawRow {
    #[diesel(sql_type = Bool)]
    scope_null: bool,
    #[diesel(sql_type = Bool)]
    metadata_null: bool,
    #[diesel(sql_type = Nullable<Binary>)]
    vector: Option<Vec<u8>>,
}

impl SqliteRaw {
    fn conn(&self) -> SqliteConnection {
        let mut c = SqliteConnection::establish(self.path.to_str().expect("utf-8 path"))
            .expect("open the database file");
        c.batch_execute("PRAGMA busy_timeout = 5000")
            .expect("busy timeout");
        c
    }
}

#[async_trait]
impl Raw for SqliteRaw {
    async fn entry(&self, id: RecordId) -> Option<RawEntry> {
        let rows: Vec<SqliteRawRow> = diesel::sql_query(
            "SELECT scope IS NULL AS scope_null, metadata IS NULL AS metadata_null, vector \
             FROM pending_index WHERE record_id = ?",
        )
        .bind::<Text, _>(id.0.to_string())
        .load(&mut self.conn())
        .expect("read pending_index");
        rows.into_iter().next().map(|r| RawEntry {
            scope_null: r.scope_null,
            metadata_null: r.metadata_null,
            vector: r.vector,
        })
    }

    async fn fill_entry(&self, id: RecordId) {
        diesel::sql_query(
            "UPDATE pending_index SET scope = 'restored', metadata = '{\"restored\": true}', \
             vector = ? WHERE record_id = ?",
        )
        .bind::<Binary, _>(vector_bytes(&[9.0]))
        .bind::<Text, _>(id.0.to_string())
        .execute(&mut self.conn())
        .expect("fill the entry");
    }

    async fn drop_row(&self, id: RecordId) {
        diesel::sql_query("DELETE FROM records WHERE id = ?")
            .bind::<Text, _>(id.0.to_string())
            .execute(&mut self.conn())
            .expect("delete the row");
    }

    async fn set_row_version(&self, id: RecordId, version: i64) {
        diesel::sql_query("UPDATE records SET version = ? WHERE id = ?")
            .bind::<diesel::sql_types::BigInt, _>(version)
            .bind::<Text, _>(id.0.to_string())
            .execute(&mut self.conn())
            .expect("set the row's version");
    }
}

async fn sqlite(keep_vectors: bool) -> (SqliteMetadataRepo, SqliteRaw, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("tandem.db");
    let mut config = SqliteConfig::new(&path);
    config.keep_vectors = keep_vectors;
    let repo = SqliteMetadataRepo::open(config).await.expect("open SQLite");
    (repo, SqliteRaw { path }, dir)
}

/// Each case against SQLite, with and without kept vectors.
mod sqlite {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deferred_entries_are_light() {
        let (repo, raw, _guard) = super::sqlite(true).await;
        super::deferred_entries_are_light(&repo, &raw, true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deferred_entries_are_light_without_vectors() {
        let (repo, raw, _guard) = super::sqlite(false).await;
        super::deferred_entries_are_light(&repo, &raw, false).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pending_claim_reads_rows() {
        let (repo, _raw, _guard) = super::sqlite(true).await;
        super::pending_claim_reads_rows(&repo).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pending_claim_reads_rows_without_vectors() {
        let (repo, _raw, _guard) = super::sqlite(false).await;
        super::pending_claim_reads_rows(&repo).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pending_claim_leaves_an_entry_whose_row_is_behind() {
        let (repo, raw, _guard) = super::sqlite(true).await;
        super::pending_claim_leaves_an_entry_whose_row_is_behind(&repo, &raw).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pending_stale_entry_is_readable() {
        let (repo, raw, _guard) = super::sqlite(true).await;
        super::pending_stale_entry_is_readable(&repo, &raw, true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pending_stale_entry_is_readable_without_vectors() {
        let (repo, raw, _guard) = super::sqlite(false).await;
        super::pending_stale_entry_is_readable(&repo, &raw, false).await;
    }
}

// PostgreSQL keeps each entry on its record's row (migration
// `2026-12-14-000000_pending_on_rows`): there is no entry apart from a row,
// so none can be stale or ahead of its row, and the cases above about such
// entries have nothing to set up there.

async fn postgres(
    keep_vectors: bool,
) -> (tandem_adapters::postgres::PostgresMetadataRepo, TestSchema) {
    let schema = TestSchema::new().await;
    let repo = schema.repo_with(|c| c.keep_vectors = keep_vectors).await;
    (repo, schema)
}

/// A deferred write of `rows`, enqueued at `now_ms`.
async fn defer_at<M: MetadataRepo + ?Sized>(repo: &M, rows: &[RowWrite], now_ms: i64) {
    let (intent, owner) = prepare_upsert(repo, &[]).await;
    let parts = [CommitPart::Defer {
        rows: rows.to_vec(),
        now_ms,
    }];
    repo.commit_transaction(
        intent,
        owner,
        &TransactionCommit::of(&parts),
        None,
        &IndexGate::passed(),
    )
    .await
    .expect("deferred commit");
}

/// A synchronous delete of `ids` (a transaction's delete part).
async fn delete<M: MetadataRepo + ?Sized>(repo: &M, ids: &[RecordId]) {
    let (intent, owner) = prepare_upsert(repo, &[]).await;
    let parts = [CommitPart::Delete(DeleteSelector::Ids(ids.to_vec()))];
    repo.commit_transaction(
        intent,
        owner,
        &TransactionCommit::of(&parts),
        None,
        &IndexGate::passed(),
    )
    .await
    .expect("delete");
}

/// The pending columns of a record's row: enqueued at, the version its
/// point holds, `pending_vector`, `vector`.
type RowEntry = (Option<i64>, Option<i64>, Option<Vec<u8>>, Option<Vec<u8>>);

async fn row_entry(admin: &tokio_postgres::Client, id: RecordId) -> RowEntry {
    let r = admin
        .query_one(
            "SELECT pending_ms, indexed_version, pending_vector, vector FROM records \
             WHERE id = $1::text::uuid",
            &[&id.0.to_string()],
        )
        .await
        .expect("read the row");
    (r.get(0), r.get(1), r.get(2), r.get(3))
}

async fn claim_rows(admin: &tokio_postgres::Client) -> Vec<(String, i64, Option<String>)> {
    admin
        .query(
            "SELECT record_id::text, version, claimed_by::text FROM pending_claims \
             ORDER BY record_id",
            &[],
        )
        .await
        .expect("read pending_claims")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// `deferred_entries_live_on_their_rows`: a deferred write writes one row
/// per record and nothing else — the entry is the row's `pending_ms` (when
/// enqueued) and `indexed_version` (0 for a new record, the previous version
/// for an updated one), with the vector in `pending_vector` only when rows
/// keep none; a coalescing write keeps both; a claim adds a claim row at the
/// row's version; a synchronous write clears the entry and a delete takes
/// the claim with the row.
async fn deferred_entries_live_on_their_rows(keep_vectors: bool) {
    let (repo, schema) = postgres(keep_vectors).await;
    let admin = schema.admin().await;
    let old = row("rows-a", 1);
    committed(&repo, std::slice::from_ref(&old)).await;
    let updated = rewrite(&old, "rows-b", 2);
    let new = row("rows-a", 3);
    defer(&repo, &[updated.clone(), new.clone()]).await;
    for (w, indexed) in [(&updated, 1), (&new, 0)] {
        let bytes = Some(vector_bytes(&w.vector));
        let (pv, v) = if keep_vectors {
            (None, bytes)
        } else {
            (bytes, None)
        };
        assert_eq!(
            row_entry(&admin, w.id).await,
            (Some(T0), Some(indexed), pv, v),
            "the entry on the row"
        );
    }
    assert!(
        claim_rows(&admin).await.is_empty(),
        "a deferred write wrote more than its rows"
    );

    let again = rewrite(&updated, "rows-c", 4);
    defer_at(&repo, std::slice::from_ref(&again), T0 + 500).await;
    let (enqueued, indexed, _, _) = row_entry(&admin, again.id).await;
    assert_eq!(
        (enqueued, indexed),
        (Some(T0), Some(1)),
        "a coalescing write keeps when the entry was enqueued and what the point holds"
    );
    assert_content(
        &entry(&repo, again.id).await.expect("entry"),
        &again,
        3,
        "coalesced",
    );

    let claim = OwnerToken::new_random();
    assert_eq!(claim_all(&repo, claim).await.len(), 2);
    let mut expected = vec![
        (again.id.0.to_string(), 3, Some(claim.0.to_string())),
        (new.id.0.to_string(), 1, Some(claim.0.to_string())),
    ];
    expected.sort();
    assert_eq!(claim_rows(&admin).await, expected, "the claims");

    committed(&repo, std::slice::from_ref(&rewrite(&new, "rows-d", 5))).await;
    assert_eq!(
        row_entry(&admin, new.id).await.0,
        None,
        "a synchronous write clears the entry"
    );
    assert!(entry(&repo, new.id).await.is_none());
    delete(&repo, &[again.id, new.id]).await;
    assert!(
        claim_rows(&admin).await.is_empty(),
        "a delete leaves claims"
    );
}

mod postgres {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pending_claim_reads_rows() {
        let (repo, _guard) = super::postgres(true).await;
        super::pending_claim_reads_rows(&repo).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pending_claim_reads_rows_without_vectors() {
        let (repo, _guard) = super::postgres(false).await;
        super::pending_claim_reads_rows(&repo).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deferred_entries_live_on_their_rows() {
        super::deferred_entries_live_on_their_rows(true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deferred_entries_live_on_their_rows_without_vectors() {
        super::deferred_entries_live_on_their_rows(false).await;
    }
}

/// PostgreSQL: the statements that reach claims by record id still use the
/// key after the claims table grew from empty on the same connection.
///
/// The adapter keeps its statements prepared per connection, and PostgreSQL
/// freezes a generic plan after five executions, costed for the table as it
/// was then. Planned on an empty queue, the by-key statements once became
/// sequential scans and stayed so: every later write read the whole queue
/// (at 20,000 waiting entries a deferred ingest at batch 100 ran at half its
/// speed). The adapter's sessions turn sequential scans off, so the plan
/// made on the empty table is the index's. Claims are the table apart from
/// the rows now (a claim's join, a delete's removal of the claims): checked
/// through the table's statistics, which a server process flushes when it
/// exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_claim_statements_planned_on_an_empty_table_keep_using_the_key() {
    const GROWN: i64 = 20_000;
    let schema = TestSchema::new().await;
    let admin = schema.admin().await;
    // One connection, so every call below runs on the plans of the first.
    let repo = schema.repo_with(|c| c.pool_size = 1).await;
    let batch = |n: i64| -> Vec<RowWrite> { (0..50).map(|i| row("plan", n * 50 + i)).collect() };
    let round = |n: i64| {
        let repo = &repo;
        async move {
            let rows = batch(n);
            defer(repo, &rows).await;
            claim_all(repo, OwnerToken::new_random()).await;
            let ids: Vec<RecordId> = rows.iter().map(|r| r.id).collect();
            delete(repo, &ids).await;
        }
    };
    // More than five executions of each statement on an empty table.
    for n in 0..8 {
        round(n).await;
    }
    // The table grows behind the port's back: claims of other records.
    admin
        .execute(
            "INSERT INTO pending_claims (record_id, version, claimed_by, claim_until_ms) \
             SELECT gen_random_uuid(), 1, gen_random_uuid(), $1 FROM generate_series(1::bigint, $2)",
            &[&NOW, &GROWN],
        )
        .await
        .expect("grow the claims");
    round(8).await;
    // The repo's server process exits and flushes its statistics.
    drop(repo);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !schema.backend_pids(&admin).await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the repo's session did not end"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let stats = admin
        .query_one(
            "SELECT seq_tup_read, idx_scan FROM pg_stat_user_tables \
             WHERE schemaname = $1 AND relname = 'pending_claims'",
            &[&schema.name()],
        )
        .await
        .expect("pending_claims statistics");
    let (seq_read, idx_scans): (i64, Option<i64>) = (stats.get(0), stats.get(1));
    assert!(
        seq_read < GROWN,
        "a statement read {seq_read} claims by a sequential scan: a plan made on the \
         empty table scans the grown one"
    );
    assert!(
        idx_scans.unwrap_or(0) > 0,
        "the statements never reached the claims through an index"
    );
}
