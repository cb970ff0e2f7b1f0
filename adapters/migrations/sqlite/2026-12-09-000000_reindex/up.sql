-- Re-indexing (SQLite flavour of migrations/postgres): the active vector
-- collection and the open migration that builds a new one from these rows.

-- The one row of index state; the migration's columns are NULL while none
-- is open (`spec`, the MigrationSpec as JSON, says whether one is).
CREATE TABLE index_state (
    singleton       INTEGER PRIMARY KEY NOT NULL DEFAULT 1 CHECK (singleton = 1),
    generation      INTEGER NOT NULL DEFAULT 0 CHECK (generation >= 0),
    active          TEXT    NULL,
    retired         TEXT    NULL,
    spec            TEXT    NULL CHECK (spec IS NULL OR json_valid(spec)),
    owner           TEXT    NULL,
    lease_until_ms  INTEGER NULL,
    scan_cursor     INTEGER NULL CHECK (scan_cursor >= 0),
    copied          INTEGER NULL CHECK (copied >= 0),
    started_ms      INTEGER NULL,
    frozen_until_ms INTEGER NULL,
    CHECK ((spec IS NULL) = (owner IS NULL)
           AND (spec IS NULL) = (lease_until_ms IS NULL)
           AND (spec IS NULL) = (scan_cursor IS NULL)
           AND (spec IS NULL) = (copied IS NULL)
           AND (spec IS NULL) = (started_ms IS NULL)
           AND (spec IS NOT NULL OR frozen_until_ms IS NULL))
);
INSERT INTO index_state DEFAULT VALUES;

-- Each row's change sequence, from a one-row counter: set on insert and
-- whenever the row's point changes, by the triggers below (a write that
-- keeps the point leaves it). The writer lock makes the counter's order the
-- commit order.
CREATE TABLE change_counter (
    singleton INTEGER PRIMARY KEY NOT NULL DEFAULT 1 CHECK (singleton = 1),
    seq       INTEGER NOT NULL
);
ALTER TABLE records ADD COLUMN change_seq INTEGER NOT NULL DEFAULT 0;
UPDATE records SET change_seq = rowid;
INSERT INTO change_counter (singleton, seq) SELECT 1, coalesce(max(change_seq), 0) FROM records;
CREATE INDEX records_change_seq_idx ON records (change_seq);

CREATE TRIGGER records_change_seq_on_insert AFTER INSERT ON records
BEGIN
    UPDATE change_counter SET seq = seq + 1;
    UPDATE records SET change_seq = (SELECT seq FROM change_counter) WHERE id = NEW.id;
END;

CREATE TRIGGER records_change_seq_on_repoint AFTER UPDATE OF point_id ON records
WHEN OLD.point_id <> NEW.point_id
BEGIN
    UPDATE change_counter SET seq = seq + 1;
    UPDATE records SET change_seq = (SELECT seq FROM change_counter) WHERE id = NEW.id;
END;

-- Points that commits stopped referencing while a migration is open, until
-- the migration's driver reports them deleted from its target.
CREATE TABLE migration_garbage (
    point_id TEXT PRIMARY KEY NOT NULL
);

CREATE TRIGGER records_garbage_on_delete AFTER DELETE ON records
WHEN EXISTS (SELECT 1 FROM index_state WHERE spec IS NOT NULL)
BEGIN
    INSERT OR IGNORE INTO migration_garbage (point_id)
    SELECT OLD.point_id
    WHERE NOT EXISTS (SELECT 1 FROM records WHERE point_id = OLD.point_id);
END;

CREATE TRIGGER records_garbage_on_repoint AFTER UPDATE OF point_id ON records
WHEN OLD.point_id <> NEW.point_id
    AND EXISTS (SELECT 1 FROM index_state WHERE spec IS NOT NULL)
BEGIN
    INSERT OR IGNORE INTO migration_garbage (point_id)
    SELECT OLD.point_id
    WHERE NOT EXISTS (SELECT 1 FROM records WHERE point_id = OLD.point_id);
END;
