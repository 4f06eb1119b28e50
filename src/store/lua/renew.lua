-- renew: extend an active session to `until` (token renewal).
-- KEYS: as in common.lua.  ARGV[7] ticket, ARGV[8] until (ms).
-- Returns 1 when the session was active, 0 when it had ended.
if lost() then
  return redis.error_reply(LOST)
end
local ticket = tonumber(ARGV[7])
if not redis.call('ZSCORE', KEYS[3], ticket) then
  -- A session of a lost line is known again when its holder renews.
  if not adopt(ticket) then
    return 0
  end
end
redis.call('ZADD', KEYS[3], 'GT', ARGV[8], ticket)
return 1
