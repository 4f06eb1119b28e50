-- unanswered: the instance that opened a session learned that its answer was lost (the call
-- failed at the instance but may have run): the ticket's holder may take the session again.
-- KEYS: as in common.lua.  ARGV[10] ticket, ARGV[11] this instance's id.
-- Returns 1 when the session was this instance's and still fresh, 0 otherwise.
if lost() then
  return redis.error_reply(LOST)
end
local ticket = tonumber(ARGV[10])
if redis.call('ZSCORE', KEYS[12], ticket) and redis.call('HGET', KEYS[13], ticket) == ARGV[11] then
  redis.call('HSET', KEYS[13], ticket, '')
  return 1
end
return 0
