-- release: end the session a ticket opened; its slot frees at once, every instance is told,
-- and the end is kept until the session would have expired, for instances that missed it.
-- KEYS: as in common.lua.  ARGV[10] ticket, ARGV[11] the channel of ended sessions, ARGV[12]
-- when the session's token expires (ms; the session may be unknown to a restored line).
-- Returns 1 when a session ended, 0 otherwise.
if lost() then
  return redis.error_reply(LOST)
end
local ticket = tonumber(ARGV[10])
local expires = redis.call('ZSCORE', KEYS[3], ticket)
local ended = drop_session(ticket)
if ended == 0 and adopt(ticket, 'sessions') then
  ended = 1
end
revoke(ticket, expires or ARGV[12], ARGV[11])
return ended
