-- touch: waiters still here (one batch per scheduler step). A waiter a restored line had not
-- seen is seen again.
-- KEYS: as in common.lua.  ARGV[7..] tickets.
-- Returns the number of waiting tickets updated.
if lost() then
  return redis.error_reply(LOST)
end
local cursor = number(KEYS[1], 'cursor')
local last = number(KEYS[1], 'last')
local updated = 0
for i = 7, #ARGV do
  local ticket = tonumber(ARGV[i])
  if ticket > cursor and ticket <= last and redis.call('SISMEMBER', KEYS[4], ticket) == 0 then
    redis.call('ZADD', KEYS[5], now, ticket)
    updated = updated + 1
  end
end
return updated
