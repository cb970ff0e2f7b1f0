DROP TABLE index_activity;
