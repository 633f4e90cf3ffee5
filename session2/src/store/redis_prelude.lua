-- Prelude of every RedisStore script (see `store/redis.rs`), which adds
-- `redis_index.lua` and `redis_write.lua` to the scripts that use them:
-- each function defined costs every call of a script about 0.1 µs.
--
-- KEYS[1] = expiry index (sorted set: score = expires_at millis or earlier, member = hex key)
-- KEYS[2] = key index    (sorted set: score 0, member = hex key; ZRANGEBYLEX pages in key order)
-- KEYS[3] = owners       (hash: hex key -> user, for sessions that have a user)
-- ARGV[1] = prefix of session keys, ARGV[2] = prefix of per-user sets.
-- Every key lives in the store's hash slot, so keys built from the prefixes are local.
local exp, keys, owners = KEYS[1], KEYS[2], KEYS[3]
local sprefix, uprefix = ARGV[1], ARGV[2]

-- The fields `version`, `expires_at`, `user` and then `...` of the record
-- under `skey` as HMGET gives them, and its expiry as a number: nil when
-- the record is missing (or expired by Redis), false when it cannot be read.
local function read_meta(skey, ...)
  local fields = redis.pcall('HMGET', skey, 'version', 'expires_at', 'user', ...)
  if fields['err'] then return false end
  if not fields[1] and not fields[2] then
    if redis.call('EXISTS', skey) == 0 then return nil end
    return false
  end
  local expires_at = tonumber(fields[2])
  if not fields[1] or not string.match(fields[1], '^%d+$') or not expires_at then return false end
  return fields, expires_at
end

-- The whole record under `skey` for a reader (see `read_meta`): its fields
-- in the order `RECORD_FIELDS` in `store/redis.rs` decodes them.
local function read_record(skey)
  return read_meta(skey, 'created_at', 'accessed_at', 'idle_deadline', 'absolute_deadline', 'lease_token', 'lease_until', 'data')
end

-- The metadata of the record under `skey`, as `read_meta` gives it (nil
-- when missing, false when it cannot be read): the fields at the positions
-- below, as stored (false when absent), and the expiry as a number. The
-- version, user and optional fields tell a rewrite what to drop; INDEXED
-- is the score of its expiry index entry, TTL_AT the time Redis drops its
-- key. Positions, not a table of names: building one costs about 0.6 µs.
local VERSION, USER, ABSOLUTE, LEASED, INDEXED, TTL_AT = 1, 3, 4, 5, 6, 7
local function current(skey)
  return read_meta(skey, 'absolute_deadline', 'lease_token', 'indexed_expiry', 'ttl_at')
end
