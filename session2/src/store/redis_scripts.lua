-- Shared prelude of every RedisStore script (see `store/redis.rs`).
--
-- KEYS[1] = expiry index (sorted set: score = expires_at millis, member = hex key)
-- KEYS[2] = key index    (sorted set: score 0, member = hex key; ZRANGEBYLEX pages in key order)
-- KEYS[3] = owners       (hash: hex key -> user, for sessions that have a user)
-- ARGV[1] = prefix of session keys, ARGV[2] = prefix of per-user sets.
-- Every key lives in the store's hash slot, so keys built from the prefixes are local.
local exp, keys, owners = KEYS[1], KEYS[2], KEYS[3]
local sprefix, uprefix = ARGV[1], ARGV[2]

-- The metadata of the record under `skey`: nil when missing (or expired by
-- Redis), false when it cannot be read, else its version and expiry.
local function current(skey)
  local fields = redis.pcall('HMGET', skey, 'version', 'expires_at')
  if fields['err'] then return false end
  if not fields[1] and not fields[2] then
    if redis.call('EXISTS', skey) == 0 then return nil end
    return false
  end
  local expires_at = tonumber(fields[2])
  if not fields[1] or not string.match(fields[1], '^%d+$') or not expires_at then return false end
  return { version = fields[1], expires_at = expires_at }
end

-- Drops every index entry of `hex`.
local function unindex(hex)
  local user = redis.call('HGET', owners, hex)
  if user then
    redis.call('SREM', uprefix .. user, hex)
    redis.call('HDEL', owners, hex)
  end
  redis.call('ZREM', exp, hex)
  redis.call('ZREM', keys, hex)
end

-- Deletes the record `hex` and its index entries.
local function remove(hex)
  redis.call('DEL', sprefix .. hex)
  unindex(hex)
end

-- Writes record `hex` from ARGV[first..]: expires_at, has_user ('1'/'0'),
-- user, then the hash's field/value pairs; updates every index.
local function write(hex, first)
  local skey = sprefix .. hex
  local expires_at, has_user, user = ARGV[first], ARGV[first + 1], ARGV[first + 2]
  redis.call('DEL', skey)
  redis.call('HSET', skey, unpack(ARGV, first + 3))
  redis.call('PEXPIREAT', skey, expires_at)
  redis.call('ZADD', exp, expires_at, hex)
  redis.call('ZADD', keys, 0, hex)
  local old = redis.call('HGET', owners, hex)
  if old and (has_user ~= '1' or old ~= user) then
    redis.call('SREM', uprefix .. old, hex)
  end
  if has_user == '1' then
    redis.call('HSET', owners, hex, user)
    redis.call('SADD', uprefix .. user, hex)
  elseif old then
    redis.call('HDEL', owners, hex)
  end
end

-- The whole record `hex` for a reader: its hash as a flat field/value array,
-- an empty array when unreadable, nil (and its index entries dropped) when gone.
local function fetch(hex)
  local skey = sprefix .. hex
  local kind = redis.call('TYPE', skey)['ok']
  if kind == 'none' then
    unindex(hex)
    return nil
  end
  if kind ~= 'hash' then return {} end
  return redis.call('HGETALL', skey)
end
