-- The indexing rate (SQLite flavour of migrations/postgres): records switched
-- into the index per second and shard; `pending_stats` sums the last 60
-- seconds.
CREATE TABLE index_activity (
    bucket_s INTEGER NOT NULL,
    shard    INTEGER NOT NULL CHECK (shard >= 0),
    indexed  INTEGER NOT NULL CHECK (indexed >= 0),
    PRIMARY KEY (shard, bucket_s)
);
