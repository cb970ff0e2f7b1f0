-- Room on every pending_index page for a second version of each entry: a
-- worker's claim (claimed_by, claim_until_ms) and a coalescing deferred
-- write change no indexed column, so with free space on the page PostgreSQL
-- updates the entry in place (a HOT update: no new key in the primary key or
-- the claim index). With full pages every claim of 1000 entries wrote 2000
-- index keys. The table is a queue (entries are deleted once indexed), so
-- the space is small; existing pages get it as they are rewritten.
ALTER TABLE pending_index SET (fillfactor = 50);
