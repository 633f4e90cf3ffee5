-- Prelude of every RedisStore script (see `store/redis.rs`), after
-- `redis_names.lua` in the scripts that take the store's names, and before
-- `redis_index.lua` and `redis_write.lua` in the scripts that use them:
-- each function defined costs every call of a script about 0.1 µs.
--
-- A session is one string (`write_record` in `store/redis.rs` writes it):
--   version|expires_at|user length|<user>absolute_deadline|lease_token|lease_until|created_at|accessed_at|idle_deadline|<data>
-- The user length is '' when it has no user, and the absolute deadline and
-- the lease are '' when absent. Numbers are decimal millis.
--
-- A string known to be a number becomes one by `s + 0`, not `tonumber(s)`:
-- Lua 5.1's `tonumber` runs C's `strtod` on it twice, and `strtod` is the
-- dearest step of a save.

-- A session written by earlier session2 builds as a hash, as the string
-- above: false when it cannot be read (not a hash, or a field missing).
-- The next write replaces the hash with the string.
local function from_hash(skey)
  local f = redis.pcall('HMGET', skey, 'version', 'expires_at', 'created_at', 'accessed_at',
    'idle_deadline', 'data', 'user', 'absolute_deadline', 'lease_token', 'lease_until')
  if f['err'] then return false end
  for i = 1, 6 do
    if not f[i] then return false end
  end
  local user = f[7]
  return f[1] .. '|' .. f[2] .. '|' .. (user and #user or '') .. '|' .. (user or '')
    .. table.concat({ f[8] or '', f[9] or '', f[10] or '', f[3], f[4], f[5], f[6] }, '|')
end

-- The version and expiry (strings) of the session string `record`, its
-- user (false when none) and the position of the fields after the user;
-- nil when it cannot be read.
local function parse(record)
  local version, expires_at, user_length, at = string.match(record, '^(%d+)|(%-?%d+)|(%d*)|()')
  if not at then return nil end
  local user = false
  if user_length ~= '' then
    local after = at + user_length
    if after > #record + 1 then return nil end
    user = string.sub(record, at, after - 1)
    at = after
  end
  return version, expires_at, user, at
end

-- The session under `skey`: the string, then what `parse` gives; nil when
-- missing (or expired by Redis), false when it cannot be read.
local function current(skey)
  local record = redis.pcall('GET', skey)
  if not record then return nil end
  if type(record) ~= 'string' then
    record = from_hash(skey)
    if not record then return false end
  end
  local version, expires_at, user, at = parse(record)
  if not version then return false end
  return record, version, expires_at, user, at
end
