-- Refuses while a migration is open or the store was ever switched: this
-- version's processes would use the collection they were configured with,
-- not the active one.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM index_state
               WHERE spec IS NOT NULL OR generation <> 0 OR active IS NOT NULL) THEN
        RAISE EXCEPTION 're-indexing state exists: abort the open migration (or configure the active collection) and reset index_state first';
    END IF;
END $$;
DROP TRIGGER records_garbage_on_delete ON records;
DROP TRIGGER records_garbage_on_update ON records;
DROP FUNCTION records_migration_garbage();
DROP TABLE migration_garbage;
DROP INDEX records_change_seq_idx;
ALTER TABLE records DROP COLUMN change_seq;
DROP TABLE index_state;
