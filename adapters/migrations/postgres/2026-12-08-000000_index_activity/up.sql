-- The indexing rate: how many records index workers switched into the index,
-- per second. Each worker's switch adds its count to one shard of the
-- current second (the shard comes from its claim token, so that concurrent
-- lanes rarely share a row) and drops its shard's seconds older than two
-- minutes; `pending_stats` sums the last 60 seconds.
CREATE TABLE index_activity (
    bucket_s bigint  NOT NULL,
    shard    integer NOT NULL CHECK (shard >= 0),
    indexed  bigint  NOT NULL CHECK (indexed >= 0),
    PRIMARY KEY (shard, bucket_s)
);
