-- Deferred indexing: a deferred write commits its rows and a pending-index
-- entry per record; index workers claim the entries, write the points and
-- switch the rows to them (an intent of kind 'index').

ALTER TABLE intents DROP CONSTRAINT intents_kind_check;
ALTER TABLE intents ADD CONSTRAINT intents_kind_check
    CHECK (kind IN ('upsert', 'delete', 'repair', 'transaction', 'index'));

-- One entry per record at most: later deferred writes coalesce into it.
CREATE TABLE pending_index (
    record_id       uuid    PRIMARY KEY,
    -- The row version to index, and the version the row's point holds (0:
    -- never indexed, the row references a reserved point).
    version         bigint  NOT NULL CHECK (version >= 1),
    indexed_version bigint  NOT NULL CHECK (indexed_version >= 0),
    scope           text    NOT NULL,
    metadata        jsonb   NOT NULL CHECK (jsonb_typeof(metadata) = 'object'),
    -- The vector as little-endian f32s (kept whatever records keep).
    vector          bytea   NOT NULL,
    enqueued_ms     bigint  NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    last_error      text    NULL,
    -- Dead-lettered: not claimed until an operator retries it.
    dead            boolean NOT NULL DEFAULT false,
    -- The worker's claim (or a retry's back-off) until claim_until_ms.
    claimed_by      uuid    NULL,
    claim_until_ms  bigint  NULL
);
-- The workers' claim: waiting entries, oldest enqueued first.
CREATE INDEX pending_index_claim_idx ON pending_index (enqueued_ms, record_id) WHERE NOT dead;

-- A held commit's undo image keeps the record's waiting entry (the
-- PendingIndex as JSON), so that a restore puts it back.
ALTER TABLE intent_undo ADD COLUMN pending jsonb NULL;
