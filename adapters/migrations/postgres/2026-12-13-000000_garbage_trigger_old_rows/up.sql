-- The garbage trigger's UPDATE branch reads only the old rows since
-- 2026-12-11 (an old point no row references any more is garbage), but the
-- trigger still asked PostgreSQL for the new rows too. A transition table is
-- captured for every UPDATE of records, with or without a migration open
-- (a statement-level trigger's WHEN cannot look at index_state), so each
-- 1000-row update copied 2000 full rows (vectors included) instead of 1000.
-- Same function, same firing, one transition table.
DROP TRIGGER records_garbage_on_update ON records;
CREATE TRIGGER records_garbage_on_update AFTER UPDATE ON records
    REFERENCING OLD TABLE AS gone_rows
    FOR EACH STATEMENT EXECUTE FUNCTION records_migration_garbage();
