-- Refuses while deferred work exists: dropping it would leave rows that no
-- index worker will ever index, or index intents whose points nothing names.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pending_index)
        OR EXISTS (SELECT 1 FROM intents WHERE kind = 'index')
        OR EXISTS (SELECT 1 FROM intent_undo WHERE pending IS NOT NULL) THEN
        RAISE EXCEPTION 'deferred indexing work exists: run the index workers and recovery (and drop dead-lettered entries) first';
    END IF;
END $$;
ALTER TABLE intent_undo DROP COLUMN pending;
DROP TABLE pending_index;
ALTER TABLE intents DROP CONSTRAINT intents_kind_check;
ALTER TABLE intents ADD CONSTRAINT intents_kind_check
    CHECK (kind IN ('upsert', 'delete', 'repair', 'transaction'));
