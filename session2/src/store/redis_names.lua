-- The store's names, first in every RedisStore script but the lease (see
-- `store/redis.rs`), which takes the session's key alone: each key or
-- argument costs a script about 1,500 instructions.
--
-- KEYS[1] = expiry index (sorted set: score = expires_at millis or earlier, member = hex key)
-- KEYS[2] = key index    (sorted set: score 0, member = hex key; ZRANGEBYLEX pages in key order)
-- KEYS[3] = owners       (hash: hex key -> user, for sessions that have a user)
-- ARGV[1] = prefix of session keys, ARGV[2] = prefix of per-user sets.
-- Every key lives in the store's hash slot, so keys built from the prefixes are local.
local exp, keys, owners = KEYS[1], KEYS[2], KEYS[3]
local sprefix, uprefix = ARGV[1], ARGV[2]
