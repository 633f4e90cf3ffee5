-- Index upkeep for RedisStore scripts, after `redis_prelude.lua`.

-- Drops every index entry of `hex`, whose user is `user` (false for none)
-- when the caller read its session; nil asks the owner hash (the session
-- is gone or unreadable).
local function unindex(hex, user)
  if user == nil then user = redis.call('HGET', owners, hex) end
  if user then
    redis.call('SREM', uprefix .. user, hex)
    redis.call('HDEL', owners, hex)
  end
  redis.call('ZREM', exp, hex)
  redis.call('ZREM', keys, hex)
end

-- Deletes the record `hex` and its index entries (`user` as for `unindex`).
local function remove(hex, user)
  redis.call('DEL', sprefix .. hex)
  unindex(hex, user)
end

-- The session `hex` for a reader as its string (see the prelude), an
-- empty string when unreadable, nil (and its index entries dropped) when gone.
local function fetch(hex)
  local record = current(sprefix .. hex)
  if record == nil then
    unindex(hex)
    return nil
  end
  return record or ''
end
