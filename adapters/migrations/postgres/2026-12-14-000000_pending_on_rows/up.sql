-- A deferred write's pending entry lives on its record's row: a deferred
-- insert writes one row per record, as a synchronous insert does, instead of
-- a row and an entry (the entry's heap tuple and its two index keys were a
-- fifth of a 100-record deferred write's server time).
--
-- `pending_ms` is when the entry was enqueued (NULL: nothing pending); the
-- entry is always at the row's version, so it can never be stale.
-- `indexed_version` is the version the row's point holds while an entry
-- waits (0: never indexed). `pending_vector` carries the vector when the
-- store keeps none in `vector`. `pending_dead` marks a dead-lettered entry.
ALTER TABLE records
    ADD COLUMN pending_ms      bigint  NULL,
    ADD COLUMN indexed_version bigint  NULL CHECK (indexed_version >= 0),
    ADD COLUMN pending_vector  bytea   NULL,
    ADD COLUMN pending_dead    boolean NOT NULL DEFAULT false,
    ADD CONSTRAINT records_pending_check CHECK (
        (pending_ms IS NULL) = (indexed_version IS NULL)
        AND (pending_ms IS NOT NULL OR (pending_vector IS NULL AND NOT pending_dead)));

-- What a claim, a failure and a back-off leave on a waiting entry, kept
-- apart from the row (rows are wide: a claim that updated them would copy
-- each vector). A row here counts only at its record's version: a newer
-- write leaves it behind, and the next claim overwrites it.
CREATE TABLE pending_claims (
    record_id      uuid    PRIMARY KEY,
    version        bigint  NOT NULL CHECK (version >= 1),
    attempts       integer NOT NULL DEFAULT 0,
    last_error     text    NULL,
    claimed_by     uuid    NULL,
    claim_until_ms bigint  NULL
) WITH (fillfactor = 50);

UPDATE records AS r
SET pending_ms = p.enqueued_ms, indexed_version = p.indexed_version,
    pending_vector = p.vector, pending_dead = p.dead
FROM pending_index AS p
WHERE p.record_id = r.id AND p.version = r.version;

INSERT INTO pending_claims (record_id, version, attempts, last_error, claimed_by, claim_until_ms)
SELECT p.record_id, p.version, p.attempts, p.last_error, p.claimed_by, p.claim_until_ms
FROM pending_index AS p JOIN records AS r ON r.id = p.record_id AND r.version = p.version
WHERE p.attempts > 0 OR p.last_error IS NOT NULL OR p.claimed_by IS NOT NULL
    OR p.claim_until_ms IS NOT NULL;

-- Entries that a later write had made stale go with the table: a claim
-- would have deleted them.
DROP TABLE pending_index;

-- The workers' claim (live entries, oldest enqueued first) and the dead
-- letters, both through one partial index: rows with nothing pending are
-- not in it.
CREATE INDEX records_pending_idx ON records (pending_dead, pending_ms, id)
    WHERE pending_ms IS NOT NULL;
