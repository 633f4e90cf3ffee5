-- One store load: the row by key, live only (see setup.sql).
\set id random(1, 10000)
SELECT "key", version, user_id, created_at, accessed_at, idle_deadline, absolute_deadline, lease_token, lease_until, data FROM pgbench_sessions WHERE "key" = sha256(int8send(:id)) AND expires_at > 2;
