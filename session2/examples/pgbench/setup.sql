-- The physical limit beside store_bench: the same table, 10,000 rows.
-- psql -f setup.sql DB, then: pgbench -n -c 32 -j 2 -T 10 -M prepared -f load.sql DB (and save.sql)
DROP TABLE IF EXISTS pgbench_sessions;
CREATE TABLE pgbench_sessions (
  "key" BYTEA PRIMARY KEY, version BIGINT NOT NULL, user_id TEXT NULL,
  created_at BIGINT NOT NULL, accessed_at BIGINT NOT NULL, idle_deadline BIGINT NOT NULL,
  absolute_deadline BIGINT NULL, expires_at BIGINT NOT NULL, lease_token BIGINT NULL,
  lease_until BIGINT NULL, data BYTEA NOT NULL);
CREATE INDEX ON pgbench_sessions (user_id) WHERE user_id IS NOT NULL;
CREATE INDEX ON pgbench_sessions (expires_at);
INSERT INTO pgbench_sessions SELECT sha256(int8send(i)), 1, NULL, 1, 1, 9e15::bigint, NULL, 9e15::bigint, NULL, NULL,
  convert_to('{"counter":0,"theme":"dark","cart":[1,2,3]}', 'UTF8') FROM generate_series(1, 10000) i;
