-- Record writes for RedisStore scripts, after `redis_prelude.lua`.

-- Moves `hex`'s expiry index entry to `expires_at` unless the session's
-- expiry only moved forward from `old_expires` (a number; nil for a new
-- session): an entry may run early (purge then finds the session alive and
-- moves it), never late, so a session whose expiry only moves forward costs
-- one index write per idle period, not per save.
local function index_expiry(hex, expires_at, old_expires)
  if old_expires and old_expires <= expires_at + 0 then return end
  redis.call('ZADD', exp, expires_at, hex)
end

-- Moves `hex` in the user index from `old_user` to `user` (false for none).
local function index_user(hex, old_user, user)
  if old_user == user then return end
  if old_user then redis.call('SREM', uprefix .. old_user, hex) end
  if user then
    redis.call('HSET', owners, hex, user)
    redis.call('SADD', uprefix .. user, hex)
  else
    redis.call('HDEL', owners, hex)
  end
end

-- A record to write is ARGV[first..first + 3]: its expiry, when Redis
-- should drop the key (`PXAT`), its user ('' when none, else '+' and the
-- user) and the session's string (see the prelude). The record's user,
-- false when it has none.
local function new_user(first)
  local user = ARGV[first + 2]
  return user ~= '' and string.sub(user, 2)
end

-- Writes the new session `hex` from ARGV[first..first + 3], with its index
-- entries, unless a session live at `now` (a number) holds its key; whether
-- it did. Keys are fresh random ids, so the write goes first (`SET … NX`)
-- and the key is read only when taken: an expired or unreadable session
-- there gives way.
local function create(hex, first, now)
  local skey = sprefix .. hex
  if not redis.call('SET', skey, ARGV[first + 3], 'PXAT', ARGV[first + 1], 'NX') then
    local cur, _, expires_at, user = current(skey)
    if cur and expires_at + 0 > now then return false end
    if cur ~= nil then remove(hex, user) end
    redis.call('SET', skey, ARGV[first + 3], 'PXAT', ARGV[first + 1])
  end
  redis.call('ZADD', keys, 0, hex)
  index_expiry(hex, ARGV[first])
  index_user(hex, false, new_user(first))
  return true
end

-- How long at most a key outlives its session (`KEY_EXPIRY_SLACK` in
-- `store/redis.rs`).
local KEY_EXPIRY_SLACK_MS = 3600000

-- Replaces the session under key `skey` with ARGV[first..first + 3] if it
-- is live at `now` (a number) and at version `expected`; whether it did.
-- In Redis 7.0 each `redis.call` costs a script several times the command
-- itself, so the write goes first and brings the old session back in the
-- same command (`SET … GET`); an old session that does not qualify is put
-- back, its key expiring as `key_expiry` in `store/redis.rs` would have it
-- (a missing one is deleted; bytes that are no session keep the new key's
-- expiry). A hash of earlier builds makes `SET … GET` fail without
-- writing: it is read first.
local function swap(skey, first, now, expected)
  local old = redis.pcall('SET', skey, ARGV[first + 3], 'PXAT', ARGV[first + 1], 'GET')
  local version, expires_at, user
  if type(old) == 'string' then
    version, expires_at, user = parse(old)
  elseif old then
    old, version, expires_at, user = current(skey)
    if not old or expires_at + 0 <= now or version ~= expected then return false end
    redis.call('SET', skey, ARGV[first + 3], 'PXAT', ARGV[first + 1])
  end
  local expires = version and expires_at + 0
  if not version or expires <= now or version ~= expected then
    if not old then
      redis.call('DEL', skey)
    elseif not version then
      redis.call('SET', skey, old, 'KEEPTTL')
    else
      -- Past its expiry by its remaining lifetime, at most the slack (`key_expiry`).
      local slack = math.min(math.max(expires - now, 0), KEY_EXPIRY_SLACK_MS)
      redis.call('SET', skey, old, 'PXAT', math.max(expires + slack, 1))
    end
    return false
  end
  -- Most saves move no index entry, and so never need the hex key.
  local saved_user = new_user(first)
  if expires > ARGV[first] + 0 or user ~= saved_user then
    local hex = string.sub(skey, #sprefix + 1)
    index_expiry(hex, ARGV[first], expires)
    index_user(hex, user, saved_user)
  end
  return true
end
