-- stats: what the room looks like now.
-- KEYS: as in common.lua.  ARGV: as in common.lua.
-- Returns the report of common.lua.
if lost() then
  return redis.error_reply(LOST)
end
expire()
return report()
