-- Deferred indexing (SQLite flavour of migrations/postgres).

-- SQLite cannot change a CHECK constraint in place: the intents table is
-- rebuilt with the new kind ('index').
CREATE TABLE intents_new (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    id                TEXT    NOT NULL UNIQUE,
    kind              TEXT    NOT NULL
                      CHECK (kind IN ('upsert', 'delete', 'repair', 'transaction', 'index')),
    state             TEXT    NOT NULL CHECK (state IN ('prepared', 'committed', 'held')),
    owner             TEXT    NOT NULL,
    lease_deadline_ms INTEGER NOT NULL,
    point_ids         TEXT    NOT NULL CHECK (json_valid(point_ids)),
    inserted          INTEGER NULL,
    updated           INTEGER NULL,
    deleted           INTEGER NULL,
    attempts          INTEGER NOT NULL DEFAULT 0,
    last_error        TEXT    NULL,
    created_ms        INTEGER NOT NULL
);
INSERT INTO intents_new (seq, id, kind, state, owner, lease_deadline_ms, point_ids, inserted,
                         updated, deleted, attempts, last_error, created_ms)
    SELECT seq, id, kind, state, owner, lease_deadline_ms, point_ids, inserted, updated, deleted,
           attempts, last_error, created_ms
    FROM intents;
DROP TABLE intents;
ALTER TABLE intents_new RENAME TO intents;
CREATE INDEX intents_lease_idx ON intents (lease_deadline_ms, seq);
CREATE INDEX intents_created_idx ON intents (created_ms, seq);

-- One entry per record at most: later deferred writes coalesce into it.
CREATE TABLE pending_index (
    record_id       TEXT    PRIMARY KEY NOT NULL,
    -- The row version to index, and the version the row's point holds (0:
    -- never indexed, the row references a reserved point).
    version         INTEGER NOT NULL CHECK (version >= 1),
    indexed_version INTEGER NOT NULL CHECK (indexed_version >= 0),
    scope           TEXT    NOT NULL,
    metadata        TEXT    NOT NULL CHECK (json_valid(metadata) AND json_type(metadata) = 'object'),
    -- The vector as little-endian f32s (kept whatever records keep).
    vector          BLOB    NOT NULL,
    enqueued_ms     INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT    NULL,
    -- Dead-lettered: not claimed until an operator retries it.
    dead            INTEGER NOT NULL DEFAULT 0 CHECK (dead IN (0, 1)),
    -- The worker's claim (or a retry's back-off) until claim_until_ms.
    claimed_by      TEXT    NULL,
    claim_until_ms  INTEGER NULL
);
-- The workers' claim: waiting entries, oldest enqueued first.
CREATE INDEX pending_index_claim_idx ON pending_index (enqueued_ms, record_id) WHERE dead = 0;

-- A held commit's undo image keeps the record's waiting entry (the
-- PendingIndex as JSON), so that a restore puts it back.
ALTER TABLE intent_undo ADD COLUMN pending TEXT NULL CHECK (pending IS NULL OR json_valid(pending));
