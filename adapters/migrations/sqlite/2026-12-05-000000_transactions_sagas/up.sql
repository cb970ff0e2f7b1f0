-- Transactions and sagas (SQLite flavour of migrations/postgres).

-- SQLite cannot change a CHECK constraint in place: the intents table is
-- rebuilt with the new kind ('transaction') and state ('held').
CREATE TABLE intents_new (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    id                TEXT    NOT NULL UNIQUE,
    kind              TEXT    NOT NULL CHECK (kind IN ('upsert', 'delete', 'repair', 'transaction')),
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

-- The rows a held commit touched, as they were before it (NULL columns: the
-- commit inserted the record) and the version it left (NULL: it deleted it).
CREATE TABLE intent_undo (
    intent_id      TEXT    NOT NULL,
    record_id      TEXT    NOT NULL,
    scope          TEXT    NULL,
    content        TEXT    NULL,
    metadata       TEXT    NULL,
    point_id       TEXT    NULL,
    version        INTEGER NULL,
    vector         BLOB    NULL,
    after_version  INTEGER NULL,
    PRIMARY KEY (intent_id, record_id)
);

-- The saga journal.
CREATE TABLE sagas (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    id                TEXT    NOT NULL UNIQUE,
    name              TEXT    NOT NULL,
    input             TEXT    NOT NULL CHECK (json_valid(input)),
    state             TEXT    NOT NULL
                      CHECK (state IN ('running', 'compensating', 'done', 'compensated', 'failed')),
    steps             TEXT    NOT NULL CHECK (json_valid(steps)),
    owner             TEXT    NOT NULL,
    lease_deadline_ms INTEGER NOT NULL,
    attempts          INTEGER NOT NULL DEFAULT 0,
    last_error        TEXT    NULL,
    created_ms        INTEGER NOT NULL,
    updated_ms        INTEGER NOT NULL
);
CREATE INDEX sagas_lease_idx ON sagas (state, lease_deadline_ms, seq);
CREATE INDEX sagas_created_idx ON sagas (created_ms, seq);
