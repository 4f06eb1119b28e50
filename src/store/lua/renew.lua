-- renew: extend an active session to `until` (token renewal, which is a use too).
-- KEYS: as in common.lua.  ARGV[10] ticket, ARGV[11] until (ms).
-- Returns 1 when the session was active, 0 when it had ended.
if lost() then
  return redis.error_reply(LOST)
end
local ticket = tonumber(ARGV[10])
if not redis.call('ZSCORE', KEYS[3], ticket) then
  -- A session of a lost line is known again when its holder renews.
  if not adopt(ticket, 'sessions') then
    return 0
  end
end
redis.call('ZADD', KEYS[3], 'GT', ARGV[11], ticket)
session_used(ticket)
return 1
