-- One store save: every column rewritten by key and version (see setup.sql).
\set id random(1, 10000)
UPDATE pgbench_sessions SET version = version + 1, user_id = NULL, created_at = 1, accessed_at = 2, idle_deadline = 9000000000000000, absolute_deadline = NULL, expires_at = 9000000000000000, lease_token = NULL, lease_until = NULL, data = convert_to('{"counter":1,"theme":"dark"}', 'UTF8') WHERE "key" = sha256(int8send(:id)) AND version >= 0 AND expires_at > 2;
