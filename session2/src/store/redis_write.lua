-- Record writes for RedisStore scripts, after `redis_prelude.lua`.

-- Puts `hex` in the expiry index at `expires_at`, unless its entry is
-- already due no later than that: an entry may run early (purge then finds
-- the session alive and moves it), never late, so a session whose expiry
-- only moves forward costs one index write per idle period, not per save.
-- `expires` is `expires_at` as a number: each `tonumber` costs about 0.4 µs.
-- Returns the entry's score, the session's new `indexed` field.
local function index_expiry(hex, expires_at, expires, indexed)
  local score = tonumber(indexed)
  if score and score <= expires then return indexed end
  redis.call('ZADD', exp, expires_at, hex)
  return expires_at
end

-- Writes session `hex` from ARGV[first..first + 3]: its expiry, when Redis
-- should drop the key (`PXAT`), its user ('' when none, else '+' and the
-- user) and the session's string without its leading `indexed|` (see the
-- prelude). `old_indexed` and `old_user` are those of the session it
-- replaces (from `current`), nil for a new one. Touches only the indexes
-- that change: in Redis 7.0 every `redis.call` costs about 1 µs and every
-- argument of a script about 0.1 µs (measured under `redis-benchmark`).
local function write(hex, first, old_indexed, old_user)
  local expires_at, user = ARGV[first], ARGV[first + 2]
  user = user ~= '' and string.sub(user, 2)
  local indexed = index_expiry(hex, expires_at, tonumber(expires_at), old_indexed)
  if old_indexed == nil then redis.call('ZADD', keys, 0, hex) end
  redis.call('SET', sprefix .. hex, indexed .. '|' .. ARGV[first + 3], 'PXAT', ARGV[first + 1])
  old_user = old_user or false
  if old_user == user then return end
  if old_user then redis.call('SREM', uprefix .. old_user, hex) end
  if user then
    redis.call('HSET', owners, hex, user)
    redis.call('SADD', uprefix .. user, hex)
  else
    redis.call('HDEL', owners, hex)
  end
end
