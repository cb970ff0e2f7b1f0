-- Refuses while a migration is open or the store was ever switched (the
-- CHECK fails): this version's processes would use the collection they were
-- configured with, not the active one.
CREATE TEMP TABLE tandem_down_guard (unresolved INTEGER CHECK (unresolved = 0));
INSERT INTO tandem_down_guard
    SELECT count(*) FROM index_state
    WHERE spec IS NOT NULL OR generation <> 0 OR active IS NOT NULL;
DROP TABLE tandem_down_guard;
DROP TRIGGER records_garbage_on_repoint;
DROP TRIGGER records_garbage_on_delete;
DROP TABLE migration_garbage;
DROP TRIGGER records_change_seq_on_repoint;
DROP TRIGGER records_change_seq_on_insert;
DROP INDEX records_change_seq_idx;
ALTER TABLE records DROP COLUMN change_seq;
DROP TABLE change_counter;
DROP TABLE index_state;
