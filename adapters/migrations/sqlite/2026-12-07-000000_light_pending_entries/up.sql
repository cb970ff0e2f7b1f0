-- Light pending-index entries (SQLite flavour of migrations/postgres): a
-- deferred write stores each record's scope, metadata and vector once, in its
-- row. An entry enqueued by a deferred write leaves scope and metadata NULL,
-- and the vector NULL when the store keeps vectors in `records.vector` (it
-- carries the vector otherwise); readers take a NULL column from the
-- record's row (`COALESCE(p.x, r.x)`), which is at the entry's version
-- whenever the entry is live. An entry restored from a held commit's undo
-- image may still carry all three.

-- SQLite cannot drop a NOT NULL constraint in place: the table is rebuilt,
-- with every other constraint and its index as they were.
CREATE TABLE pending_index_new (
    record_id       TEXT    PRIMARY KEY NOT NULL,
    -- The row version to index, and the version the row's point holds (0:
    -- never indexed, the row references a reserved point).
    version         INTEGER NOT NULL CHECK (version >= 1),
    indexed_version INTEGER NOT NULL CHECK (indexed_version >= 0),
    -- NULL: the record's row holds it.
    scope           TEXT    NULL,
    metadata        TEXT    NULL
                    CHECK (metadata IS NULL
                           OR (json_valid(metadata) AND json_type(metadata) = 'object')),
    -- The vector as little-endian f32s; NULL: the record's row holds it.
    vector          BLOB    NULL,
    enqueued_ms     INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT    NULL,
    -- Dead-lettered: not claimed until an operator retries it.
    dead            INTEGER NOT NULL DEFAULT 0 CHECK (dead IN (0, 1)),
    -- The worker's claim (or a retry's back-off) until claim_until_ms.
    claimed_by      TEXT    NULL,
    claim_until_ms  INTEGER NULL
);
INSERT INTO pending_index_new (record_id, version, indexed_version, scope, metadata, vector,
                               enqueued_ms, attempts, last_error, dead, claimed_by,
                               claim_until_ms)
    SELECT record_id, version, indexed_version, scope, metadata, vector, enqueued_ms, attempts,
           last_error, dead, claimed_by, claim_until_ms
    FROM pending_index;
DROP TABLE pending_index;
ALTER TABLE pending_index_new RENAME TO pending_index;
-- The workers' claim: waiting entries, oldest enqueued first.
CREATE INDEX pending_index_claim_idx ON pending_index (enqueued_ms, record_id) WHERE dead = 0;
