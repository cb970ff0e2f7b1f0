DROP TABLE idempotency_keys;
DROP TABLE intents;
DROP TABLE records;
