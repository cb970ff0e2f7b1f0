-- Entries carry their content again: each NULL column is filled from the
-- record's row. An entry whose row is gone, or lacks a vector, is stale (a
-- claim deletes it without indexing it): its missing content is stored
-- empty, as this version's readers decode it.
CREATE TABLE pending_index_old (
    record_id       TEXT    PRIMARY KEY NOT NULL,
    version         INTEGER NOT NULL CHECK (version >= 1),
    indexed_version INTEGER NOT NULL CHECK (indexed_version >= 0),
    scope           TEXT    NOT NULL,
    metadata        TEXT    NOT NULL CHECK (json_valid(metadata) AND json_type(metadata) = 'object'),
    vector          BLOB    NOT NULL,
    enqueued_ms     INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT    NULL,
    dead            INTEGER NOT NULL DEFAULT 0 CHECK (dead IN (0, 1)),
    claimed_by      TEXT    NULL,
    claim_until_ms  INTEGER NULL
);
INSERT INTO pending_index_old (record_id, version, indexed_version, scope, metadata, vector,
                               enqueued_ms, attempts, last_error, dead, claimed_by,
                               claim_until_ms)
    SELECT p.record_id, p.version, p.indexed_version,
           COALESCE(p.scope, r.scope, ''),
           COALESCE(p.metadata, r.metadata, '{}'),
           COALESCE(p.vector, r.vector, X''),
           p.enqueued_ms, p.attempts, p.last_error, p.dead, p.claimed_by, p.claim_until_ms
    FROM pending_index AS p LEFT JOIN records AS r ON r.id = p.record_id;
DROP TABLE pending_index;
ALTER TABLE pending_index_old RENAME TO pending_index;
CREATE INDEX pending_index_claim_idx ON pending_index (enqueued_ms, record_id) WHERE dead = 0;
