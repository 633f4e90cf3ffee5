-- Record writes for RedisStore scripts, after `redis_prelude.lua`.

-- Puts `hex` in the expiry index at `expires_at`, unless its entry is
-- already due no later than that: an entry may run early (purge then finds
-- the session alive and moves it), never late, so a session whose expiry
-- only moves forward costs one index write per idle period, not per save.
-- `expires` is `expires_at` as a number: each `tonumber` costs about 0.4 µs.
-- Returns the entry's score, for the hash's `indexed_expiry` field.
local function index_expiry(hex, expires_at, expires, indexed)
  local score = tonumber(indexed)
  if score and score <= expires then return indexed end
  redis.call('ZADD', exp, expires_at, hex)
  return expires_at
end

-- How long at most a key outlives its session (`KEY_EXPIRY_SLACK` in
-- `store/redis.rs`).
local KEY_EXPIRY_SLACK_MS = 3600000

-- When Redis should drop the key of a session that expires at `expires_at`
-- (`expires` as a number), and whether that needs a `PEXPIREAT` (after the
-- write: it is a no-op on a key not yet written). `ttl_at` is when Redis
-- drops it now, `target` the caller's choice after `expires_at` (a touch
-- chooses from the idle deadline, which an absolute deadline may cut
-- short: then the key goes at `expires_at` itself). A key may outlive its
-- session a while (reads check `expires_at`, purge deletes it on time),
-- never by more than the slack and never die before it, so a session
-- whose expiry only moves forward costs one `PEXPIREAT` per stretch of
-- slack, not one per save. The time goes in the hash's `ttl_at` field.
local function key_expiry(expires_at, expires, ttl_at, target)
  local at = tonumber(ttl_at)
  local limit = expires + KEY_EXPIRY_SLACK_MS
  if at and at >= expires and at <= limit then return ttl_at, false end
  if tonumber(target) > limit then return expires_at, true end
  return target, true
end

-- Writes record `hex` from ARGV[first..last]: which optional fields it has
-- (one '1' or '0' each for user, absolute_deadline and the lease), the
-- time Redis should drop the key, then the values of version, created_at,
-- accessed_at, idle_deadline, expires_at and data, then the optional
-- fields it has as name/value pairs, `user` first. `old` is the record it
-- replaces (from `current`), nil for a new one. Touches only the indexes
-- that change. Each step counts: in Redis 7.0 every argument of a script
-- costs about 0.1 µs and every `redis.call` about 1 µs (measured under
-- `redis-benchmark`), so the fixed fields' names live here, not in ARGV,
-- and the values go to one HSET straight from ARGV, without a loop.
local function write(hex, first, old, last)
  local skey = sprefix .. hex
  local has, v, tail = ARGV[first], first + 2, first + 8
  local expires_at = ARGV[v + 4]
  local expires = tonumber(expires_at)
  local user = string.byte(has, 1) == 49 and ARGV[tail + 1]
  local indexed = index_expiry(hex, expires_at, expires, old and old[INDEXED])
  local ttl_at, expire = key_expiry(expires_at, expires, old and old[TTL_AT], ARGV[first + 1])
  if old then
    -- HSET keeps fields it is not given: drop the optional ones the new record lacks.
    local gone
    if old[USER] and not user then gone = { 'user' } end
    if old[ABSOLUTE] and string.byte(has, 2) ~= 49 then
      gone = gone or {}
      table.insert(gone, 'absolute_deadline')
    end
    if old[LEASED] and string.byte(has, 3) ~= 49 then
      gone = gone or {}
      table.insert(gone, 'lease_token')
      table.insert(gone, 'lease_until')
    end
    if gone then redis.call('HDEL', skey, unpack(gone)) end
  else
    redis.call('ZADD', keys, 0, hex)
  end
  redis.call('HSET', skey, 'indexed_expiry', indexed, 'ttl_at', ttl_at,
    'version', ARGV[v], 'created_at', ARGV[v + 1], 'accessed_at', ARGV[v + 2],
    'idle_deadline', ARGV[v + 3], 'expires_at', ARGV[v + 4], 'data', ARGV[v + 5],
    unpack(ARGV, tail, last))
  if expire then redis.call('PEXPIREAT', skey, ttl_at) end
  local old_user = old and old[USER] or false
  if old_user == user then return end
  if old_user then redis.call('SREM', uprefix .. old_user, hex) end
  if user then
    redis.call('HSET', owners, hex, user)
    redis.call('SADD', uprefix .. user, hex)
  else
    redis.call('HDEL', owners, hex)
  end
end
