DROP TABLE migration_vectors;
