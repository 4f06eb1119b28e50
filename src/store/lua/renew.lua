-- renew: extend an active session to `until` (token renewal).
-- KEYS[1] sessions.  ARGV[1] ticket, ARGV[2] until (ms).
-- Returns 1 when the session was active, 0 when it had ended.
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], 'GT', ARGV[2], ARGV[1])
return 1
