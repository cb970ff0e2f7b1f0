-- Transactions and sagas.

-- Multi-part transactions have an intent kind of their own; a saga step's
-- commit is `held` (its garbage kept, not claimable) until the saga ends.
ALTER TABLE intents DROP CONSTRAINT intents_kind_check;
ALTER TABLE intents ADD CONSTRAINT intents_kind_check
    CHECK (kind IN ('upsert', 'delete', 'repair', 'transaction'));
ALTER TABLE intents DROP CONSTRAINT intents_state_check;
ALTER TABLE intents ADD CONSTRAINT intents_state_check
    CHECK (state IN ('prepared', 'committed', 'held'));

-- The rows a held commit touched, as they were before it (NULL columns: the
-- commit inserted the record) and the version it left (NULL: it deleted it).
CREATE TABLE intent_undo (
    intent_id      uuid    NOT NULL,
    record_id      uuid    NOT NULL,
    scope          text    NULL,
    content        text    NULL,
    metadata       jsonb   NULL,
    point_id       uuid    NULL,
    version        bigint  NULL,
    vector         bytea   NULL,
    after_version  bigint  NULL,
    PRIMARY KEY (intent_id, record_id)
);

-- The saga journal.
CREATE TABLE sagas (
    id                uuid    PRIMARY KEY,
    name              text    NOT NULL,
    input             jsonb   NOT NULL,
    state             text    NOT NULL
                      CHECK (state IN ('running', 'compensating', 'done', 'compensated', 'failed')),
    steps             jsonb   NOT NULL,
    owner             uuid    NOT NULL,
    lease_deadline_ms bigint  NOT NULL,
    attempts          integer NOT NULL DEFAULT 0,
    last_error        text    NULL,
    created_ms        bigint  NOT NULL,
    updated_ms        bigint  NOT NULL,
    -- Orders sagas created in the same millisecond.
    seq               bigint  GENERATED ALWAYS AS IDENTITY
);
-- Recovery's claim looks only at live sagas, oldest lease first.
CREATE INDEX sagas_live_lease_idx ON sagas (lease_deadline_ms, seq)
    WHERE state IN ('running', 'compensating');
CREATE INDEX sagas_created_idx ON sagas (created_ms, seq);
