DROP TRIGGER records_garbage_on_update ON records;
CREATE TRIGGER records_garbage_on_update AFTER UPDATE ON records
    REFERENCING OLD TABLE AS gone_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION records_migration_garbage();
