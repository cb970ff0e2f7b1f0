-- Tandem's metadata schema, SQLite flavour of migrations/postgres: uuids are
-- lowercase hyphenated TEXT (so they sort like the uuids themselves), JSON is
-- TEXT, a point list is a JSON array.

-- Committed rows: the source of truth. Each row references exactly one point.
CREATE TABLE records (
    id          TEXT    PRIMARY KEY NOT NULL,
    scope       TEXT    NOT NULL CHECK (length(CAST(scope AS BLOB)) <= 255),
    point_id    TEXT    NOT NULL UNIQUE,
    version     INTEGER NOT NULL CHECK (version >= 1),
    content     TEXT    NOT NULL,
    metadata    TEXT    NOT NULL
                        CHECK (json_valid(metadata) AND json_type(metadata) = 'object')
                        CHECK (length(CAST(metadata AS BLOB)) <= 1048576),
    -- The vector as little-endian f32s, when the store keeps vectors.
    vector      BLOB    NULL,
    created_at  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX records_scope_id_idx ON records (scope, id);

-- Write-ahead intents: every point that may exist without a committed row.
CREATE TABLE intents (
    -- Orders intents created in the same millisecond.
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    id                TEXT    NOT NULL UNIQUE,
    kind              TEXT    NOT NULL CHECK (kind IN ('upsert', 'delete', 'repair')),
    state             TEXT    NOT NULL CHECK (state IN ('prepared', 'committed')),
    owner             TEXT    NOT NULL,
    lease_deadline_ms INTEGER NOT NULL,
    point_ids         TEXT    NOT NULL CHECK (json_valid(point_ids)),
    -- The commit's summary, set by the commit.
    inserted          INTEGER NULL,
    updated           INTEGER NULL,
    deleted           INTEGER NULL,
    attempts          INTEGER NOT NULL DEFAULT 0,
    last_error        TEXT    NULL,
    created_ms        INTEGER NOT NULL
);
CREATE INDEX intents_lease_idx ON intents (lease_deadline_ms, seq);
CREATE INDEX intents_created_idx ON intents (created_ms, seq);

-- Idempotency keys, recorded in the same transaction as the write.
CREATE TABLE idempotency_keys (
    key          TEXT    PRIMARY KEY NOT NULL,
    request_hash TEXT    NOT NULL,
    outcome      TEXT    NOT NULL CHECK (json_valid(outcome)),
    inserted     INTEGER NOT NULL,
    updated      INTEGER NOT NULL,
    deleted      INTEGER NOT NULL,
    created_at   TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
