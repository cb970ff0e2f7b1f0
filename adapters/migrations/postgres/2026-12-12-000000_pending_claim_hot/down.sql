ALTER TABLE pending_index RESET (fillfactor);
