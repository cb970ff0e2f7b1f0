//! The core `MetadataRepo` conformance suite, unchanged, against
//! `PostgresMetadataRepo` on the server at `DATABASE_URL` (one schema per test).

use tandem_core::testkit::conformance::Guarded;
use tandem_tests::pg::TestSchema;

tandem_core::metadata_repo_conformance!(postgres, async {
    let schema = TestSchema::new().await;
    let repo = schema.repo().await;
    Guarded::new(repo, schema)
});

tandem_core::metadata_repo_conformance!(
    postgres_without_vectors,
    async {
        let schema = TestSchema::new().await;
        let repo = schema.repo_with(|c| c.keep_vectors = false).await;
        Guarded::new(repo, schema)
    },
    keeps_vectors = false
);
