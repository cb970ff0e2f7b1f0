-- A re-embedding migration's new vectors, staged here until its switch
-- makes each the kept vector of its row (in the switch's commit), so that
-- repairs before the switch write the old model's vectors into the old
-- collection and those after it the new model's into the new one. `seq` is
-- the row's change sequence when its content was embedded: a row whose
-- point changed since keeps its own vector (the copy embeds it again).
CREATE TABLE migration_vectors (
    record_id uuid   PRIMARY KEY,
    seq       bigint NOT NULL,
    vector    bytea  NOT NULL
);
