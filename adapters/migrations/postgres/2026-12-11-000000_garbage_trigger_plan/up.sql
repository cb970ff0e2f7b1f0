-- The garbage trigger's UPDATE branch joined the old and new transition
-- tables to find the rows whose point changed. PL/pgSQL keeps the plan it
-- made for a connection's first such statement: after a small one, a
-- 1000-row update with a migration open ran a nested loop over both tables
-- (1.9x to 6.1x the update's usual time, measured by tandem bench). The join
-- is not needed: an old point that no row references any more is garbage,
-- whether its row was repointed or not (a row that kept its point still
-- references it). Each old point is one lookup in the point_id index.
CREATE OR REPLACE FUNCTION records_migration_garbage() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM index_state WHERE spec IS NOT NULL) THEN
        RETURN NULL;
    END IF;
    INSERT INTO migration_garbage (point_id)
    SELECT o.point_id FROM gone_rows AS o
    WHERE NOT EXISTS (SELECT 1 FROM records AS r WHERE r.point_id = o.point_id)
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END $$;
