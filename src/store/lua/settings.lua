-- settings: read or change a room's live overrides (fields of the line hash: o_state,
-- o_admit_per_minute, o_max_active, o_message, and o_version, counting the changes). A change
-- is announced on the room's settings channel; the scripts take the rate and capacity from
-- here when they are set (see common.lua), so a change binds every instance at once.
-- KEYS: as in common.lua.  ARGV[10] 'read', 'merge' or 'clear'; ARGV[11] the change, as JSON
-- (merge: the fields it sets); ARGV[12] the channel of settings changes.
-- Returns {version, the overrides in force as JSON}.
if lost() then
  return redis.error_reply(LOST)
end
local mode = ARGV[10]
local FIELDS = {'state', 'admit_per_minute', 'max_active', 'message'}
if mode == 'clear' then
  for _, field in ipairs(FIELDS) do
    redis.call('HDEL', KEYS[1], 'o_' .. field)
  end
elseif mode == 'merge' then
  local change = cjson.decode(ARGV[11])
  for _, field in ipairs(FIELDS) do
    if change[field] ~= nil and change[field] ~= cjson.null then
      redis.call('HSET', KEYS[1], 'o_' .. field, tostring(change[field]))
    end
  end
end
if mode ~= 'read' then
  local version = redis.call('HINCRBY', KEYS[1], 'o_version', 1)
  redis.call('PUBLISH', ARGV[12], version)
end
return {number(KEYS[1], 'o_version'), overrides_json()}
