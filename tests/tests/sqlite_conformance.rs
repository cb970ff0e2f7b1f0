//! The core `MetadataRepo` conformance suite, unchanged, against
//! `SqliteMetadataRepo` on a database file in a temporary directory.

use tandem_adapters::sqlite::{SqliteConfig, SqliteMetadataRepo};
use tandem_core::testkit::conformance::Guarded;

async fn open(keep_vectors: bool) -> Guarded<SqliteMetadataRepo, tempfile::TempDir> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut config = SqliteConfig::new(dir.path().join("meta").join("tandem.db"));
    config.keep_vectors = keep_vectors;
    let repo = SqliteMetadataRepo::open(config)
        .await
        .expect("open the SQLite store");
    Guarded::new(repo, dir)
}

tandem_core::metadata_repo_conformance!(sqlite, open(true));

tandem_core::metadata_repo_conformance!(sqlite_without_vectors, open(false), keeps_vectors = false);
