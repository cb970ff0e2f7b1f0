-- Tandem's metadata schema. Tables are created unqualified: the adapter sets
-- search_path to its configured schema on every connection.

-- Committed rows: the source of truth. Each row references exactly one point.
CREATE TABLE records (
    id          uuid        PRIMARY KEY,
    scope       text        NOT NULL CHECK (octet_length(scope) <= 255),
    point_id    uuid        NOT NULL UNIQUE,
    version     bigint      NOT NULL CHECK (version >= 1),
    content     text        NOT NULL,
    metadata    jsonb       NOT NULL
                            CHECK (jsonb_typeof(metadata) = 'object')
                            CHECK (octet_length(metadata::text) <= 1048576),
    -- The vector as little-endian f32s, when the store keeps vectors.
    vector      bytea       NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
-- Per-scope counting, deleting and paging in id order.
CREATE INDEX records_scope_id_idx ON records (scope, id);

-- Write-ahead intents: every point that may exist without a committed row.
CREATE TABLE intents (
    id                uuid    PRIMARY KEY,
    kind              text    NOT NULL CHECK (kind IN ('upsert', 'delete', 'repair')),
    state             text    NOT NULL CHECK (state IN ('prepared', 'committed')),
    owner             uuid    NOT NULL,
    lease_deadline_ms bigint  NOT NULL,
    point_ids         uuid[]  NOT NULL,
    -- The commit's summary, set by the commit.
    inserted          bigint  NULL,
    updated           bigint  NULL,
    deleted           bigint  NULL,
    attempts          integer NOT NULL DEFAULT 0,
    last_error        text    NULL,
    created_ms        bigint  NOT NULL,
    -- Orders intents created in the same millisecond.
    seq               bigint  GENERATED ALWAYS AS IDENTITY
);
CREATE INDEX intents_lease_idx ON intents (lease_deadline_ms, seq);
CREATE INDEX intents_created_idx ON intents (created_ms, seq);

-- Idempotency keys, recorded in the same transaction as the write.
CREATE TABLE idempotency_keys (
    key          text        PRIMARY KEY,
    request_hash text        NOT NULL,
    outcome      jsonb       NOT NULL,
    inserted     bigint      NOT NULL,
    updated      bigint      NOT NULL,
    deleted      bigint      NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
