-- Re-indexing: the active vector collection and the open migration that
-- builds a new one from these rows while writes go on (see docs/reindex.md).

-- The one row of index state. `generation` is incremented by every switch;
-- an intent prepared under another generation is refused. The migration's
-- columns are NULL while none is open (`spec`, the MigrationSpec as JSON,
-- says whether one is); `frozen_until_ms` is set while its switch is in
-- progress (prepares created before it are refused).
CREATE TABLE index_state (
    singleton       boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    generation      bigint  NOT NULL DEFAULT 0 CHECK (generation >= 0),
    active          text    NULL,
    retired         text    NULL,
    spec            jsonb   NULL CHECK (jsonb_typeof(spec) = 'object'),
    owner           uuid    NULL,
    lease_until_ms  bigint  NULL,
    scan_cursor     bigint  NULL CHECK (scan_cursor >= 0),
    copied          bigint  NULL CHECK (copied >= 0),
    started_ms      bigint  NULL,
    frozen_until_ms bigint  NULL,
    CHECK ((spec IS NULL) = (owner IS NULL)
           AND (spec IS NULL) = (lease_until_ms IS NULL)
           AND (spec IS NULL) = (scan_cursor IS NULL)
           AND (spec IS NULL) = (copied IS NULL)
           AND (spec IS NULL) = (started_ms IS NULL)
           AND (spec IS NOT NULL OR frozen_until_ms IS NULL))
);
INSERT INTO index_state DEFAULT VALUES;

-- Each row's change sequence: taken from records_change_seq on insert (the
-- column's default) and again by every statement that changes the row's
-- point (they set it explicitly); a write that keeps the point leaves it.
-- A migration copies the rows in this order, from its cursor on.
CREATE SEQUENCE records_change_seq AS bigint;
ALTER TABLE records ADD COLUMN change_seq bigint;
UPDATE records SET change_seq = nextval('records_change_seq');
ALTER TABLE records
    ALTER COLUMN change_seq SET DEFAULT nextval('records_change_seq'),
    ALTER COLUMN change_seq SET NOT NULL;
ALTER SEQUENCE records_change_seq OWNED BY records.change_seq;
CREATE UNIQUE INDEX records_change_seq_idx ON records (change_seq);

-- Points that commits stopped referencing while a migration is open (the
-- target may hold them), until the migration's driver reports them deleted.
CREATE TABLE migration_garbage (
    point_id uuid PRIMARY KEY
);

-- Records the old point of every row a statement deleted or repointed, in
-- the statement's transaction, if a migration is open and no row references
-- the point any more. Statement-level, over the transition tables: one call
-- per statement whatever the row count, and a single lookup of index_state
-- when no migration is open.
CREATE FUNCTION records_migration_garbage() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM index_state WHERE spec IS NOT NULL) THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'DELETE' THEN
        INSERT INTO migration_garbage (point_id)
        SELECT o.point_id FROM gone_rows AS o
        WHERE NOT EXISTS (SELECT 1 FROM records AS r WHERE r.point_id = o.point_id)
        ON CONFLICT DO NOTHING;
    ELSE
        INSERT INTO migration_garbage (point_id)
        SELECT o.point_id FROM gone_rows AS o JOIN new_rows AS n ON n.id = o.id
        WHERE n.point_id <> o.point_id
            AND NOT EXISTS (SELECT 1 FROM records AS r WHERE r.point_id = o.point_id)
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER records_garbage_on_update AFTER UPDATE ON records
    REFERENCING OLD TABLE AS gone_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION records_migration_garbage();
CREATE TRIGGER records_garbage_on_delete AFTER DELETE ON records
    REFERENCING OLD TABLE AS gone_rows
    FOR EACH STATEMENT EXECUTE FUNCTION records_migration_garbage();
