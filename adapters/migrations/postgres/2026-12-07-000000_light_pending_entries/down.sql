-- Entries carry their content again: each NULL column is filled from the
-- record's row. An entry whose row is gone, or lacks a vector, is stale (a
-- claim deletes it without indexing it): its missing content is stored
-- empty, as this version's readers decode it.
UPDATE pending_index AS p SET
    scope = COALESCE(p.scope,
                     (SELECT r.scope FROM records AS r WHERE r.id = p.record_id), ''),
    metadata = COALESCE(p.metadata,
                        (SELECT r.metadata FROM records AS r WHERE r.id = p.record_id),
                        '{}'::jsonb),
    vector = COALESCE(p.vector,
                      (SELECT r.vector FROM records AS r WHERE r.id = p.record_id),
                      ''::bytea)
WHERE p.scope IS NULL OR p.metadata IS NULL OR p.vector IS NULL;
ALTER TABLE pending_index
    ALTER COLUMN scope SET NOT NULL,
    ALTER COLUMN metadata SET NOT NULL,
    ALTER COLUMN vector SET NOT NULL;
