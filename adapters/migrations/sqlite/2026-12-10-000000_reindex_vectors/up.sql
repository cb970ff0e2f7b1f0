-- A re-embedding migration's new vectors, staged until its switch makes
-- each the kept vector of its row (SQLite flavour of migrations/postgres).
CREATE TABLE migration_vectors (
    record_id TEXT    PRIMARY KEY NOT NULL,
    seq       INTEGER NOT NULL,
    vector    BLOB    NOT NULL
);
