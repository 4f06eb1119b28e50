-- release: end the session a ticket opened; its slot frees at once, every instance is told,
-- and the end is kept until the session would have expired, for instances that missed it.
-- KEYS: as in common.lua.  ARGV[7] ticket, ARGV[8] the channel of ended sessions.
-- Returns 1 when a session ended, 0 otherwise.
if lost() then
  return redis.error_reply(LOST)
end
local ticket = tonumber(ARGV[7])
local expires = redis.call('ZSCORE', KEYS[3], ticket)
local ended = redis.call('ZREM', KEYS[3], ticket)
if ended == 0 and adopt(ticket) then
  ended = 1
end
redis.call('ZREMRANGEBYSCORE', KEYS[9], '-inf', now)
redis.call('ZADD', KEYS[9], expires or (now + session_ms), ticket)
redis.call('PUBLISH', ARGV[8], ticket)
return ended
