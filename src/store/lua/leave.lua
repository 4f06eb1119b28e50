-- leave: give up a place in line, an unredeemed grant, or a session.
-- KEYS: as in common.lua.  ARGV[10] ticket.
-- Returns 0.
if lost() then
  return redis.error_reply(LOST)
end
local ticket = tonumber(ARGV[10])
local last = number(KEYS[1], 'last')
local cursor = number(KEYS[1], 'cursor')
if ticket > cursor and ticket <= last then
  redis.call('ZREM', KEYS[5], ticket)
  redis.call('ZREM', KEYS[10], ticket)
  redis.call('SADD', KEYS[4], ticket)
elseif redis.call('ZREM', KEYS[2], ticket) == 1 then
  forget(ticket, 'left')
elseif drop_session(ticket) == 0 and not redis.call('HGET', KEYS[7], ticket) and adopt(ticket, 'grants') then
  forget(ticket, 'left')
end
return 0
