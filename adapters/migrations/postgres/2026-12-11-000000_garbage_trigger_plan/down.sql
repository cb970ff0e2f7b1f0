CREATE OR REPLACE FUNCTION records_migration_garbage() RETURNS trigger
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
