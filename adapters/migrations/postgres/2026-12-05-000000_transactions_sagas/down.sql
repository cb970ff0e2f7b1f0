-- Refuses while transactions or held saga steps exist: dropping their intents
-- would leave points in the index that nothing names.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM intents WHERE kind = 'transaction' OR state = 'held') THEN
        RAISE EXCEPTION 'unresolved transaction intents exist: run recovery (and finish or abort live sagas) first';
    END IF;
END $$;
DROP TABLE sagas;
DROP TABLE intent_undo;
ALTER TABLE intents DROP CONSTRAINT intents_state_check;
ALTER TABLE intents ADD CONSTRAINT intents_state_check CHECK (state IN ('prepared', 'committed'));
ALTER TABLE intents DROP CONSTRAINT intents_kind_check;
ALTER TABLE intents ADD CONSTRAINT intents_kind_check CHECK (kind IN ('upsert', 'delete', 'repair'));
