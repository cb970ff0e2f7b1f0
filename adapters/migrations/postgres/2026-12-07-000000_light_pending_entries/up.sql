-- Light pending-index entries: a deferred write stores each record's scope,
-- metadata and vector once, in its row. An entry enqueued by a deferred write
-- leaves scope and metadata NULL, and the vector NULL when the store keeps
-- vectors in `records.vector` (it carries the vector otherwise); readers
-- take a NULL column from the record's row (`COALESCE(p.x, r.x)`), which is
-- at the entry's version whenever the entry is live. An entry restored from
-- a held commit's undo image may still carry all three.
--
-- The CHECK on metadata passes for NULL (a CHECK fails only when false).
ALTER TABLE pending_index
    ALTER COLUMN scope DROP NOT NULL,
    ALTER COLUMN metadata DROP NOT NULL,
    ALTER COLUMN vector DROP NOT NULL;
