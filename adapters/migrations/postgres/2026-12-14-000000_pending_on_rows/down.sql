CREATE TABLE pending_index (
    record_id       uuid    PRIMARY KEY,
    version         bigint  NOT NULL CHECK (version >= 1),
    indexed_version bigint  NOT NULL CHECK (indexed_version >= 0),
    scope           text    NULL,
    metadata        jsonb   NULL CHECK (jsonb_typeof(metadata) = 'object'),
    vector          bytea   NULL,
    enqueued_ms     bigint  NOT NULL,
    attempts        integer NOT NULL DEFAULT 0,
    last_error      text    NULL,
    dead            boolean NOT NULL DEFAULT false,
    claimed_by      uuid    NULL,
    claim_until_ms  bigint  NULL
) WITH (fillfactor = 50);
CREATE INDEX pending_index_claim_idx ON pending_index (enqueued_ms, record_id) WHERE NOT dead;

INSERT INTO pending_index (record_id, version, indexed_version, vector, enqueued_ms, attempts,
    last_error, dead, claimed_by, claim_until_ms)
SELECT r.id, r.version, r.indexed_version, r.pending_vector, r.pending_ms,
    coalesce(c.attempts, 0), c.last_error, r.pending_dead, c.claimed_by, c.claim_until_ms
FROM records AS r LEFT JOIN pending_claims AS c ON c.record_id = r.id AND c.version = r.version
WHERE r.pending_ms IS NOT NULL;

DROP TABLE pending_claims;
DROP INDEX records_pending_idx;
ALTER TABLE records
    DROP CONSTRAINT records_pending_check,
    DROP COLUMN pending_ms,
    DROP COLUMN indexed_version,
    DROP COLUMN pending_vector,
    DROP COLUMN pending_dead;
