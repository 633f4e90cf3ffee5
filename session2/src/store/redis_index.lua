-- Index upkeep for RedisStore scripts, after `redis_prelude.lua`.

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
