-- Refuses while deferred work exists (the CHECK fails): dropping it would
-- leave rows that no index worker will ever index, or index intents whose
-- points nothing names.
CREATE TEMP TABLE tandem_down_guard (unresolved INTEGER CHECK (unresolved = 0));
INSERT INTO tandem_down_guard
    SELECT (SELECT count(*) FROM pending_index)
         + (SELECT count(*) FROM intents WHERE kind = 'index')
         + (SELECT count(*) FROM intent_undo WHERE pending IS NOT NULL);
DROP TABLE tandem_down_guard;
ALTER TABLE intent_undo DROP COLUMN pending;
DROP TABLE pending_index;
CREATE TABLE intents_old (
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
INSERT INTO intents_old SELECT * FROM intents;
DROP TABLE intents;
ALTER TABLE intents_old RENAME TO intents;
CREATE INDEX intents_lease_idx ON intents (lease_deadline_ms, seq);
CREATE INDEX intents_created_idx ON intents (created_ms, seq);
