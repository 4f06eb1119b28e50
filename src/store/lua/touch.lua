-- touch: holders seen since the last report (one bounded batch per scheduler step): waiters
-- still here, and sessions in use. A waiter a restored line had not seen is seen again; a
-- session a restored line did not know takes over one of the phantom places.
-- KEYS: as in common.lua.  ARGV[10] the number of waiters n, ARGV[11 .. 10+n] their tickets,
-- then sessions as pairs: ticket, when its token expires (ms).
-- Returns the number of waiters and sessions updated.
if lost() then
  return redis.error_reply(LOST)
end
local cursor = number(KEYS[1], 'cursor')
local last = number(KEYS[1], 'last')
local waiters = tonumber(ARGV[10])
local updated = 0
for i = 11, 10 + waiters do
  local ticket = tonumber(ARGV[i])
  if ticket > cursor and ticket <= last and redis.call('SISMEMBER', KEYS[4], ticket) == 0 then
    redis.call('ZADD', KEYS[5], 'GT', now, ticket)
    redis.call('ZREM', KEYS[10], ticket)
    updated = updated + 1
  end
end
for i = 11 + waiters, #ARGV - 1, 2 do
  local ticket = tonumber(ARGV[i])
  local expires = tonumber(ARGV[i + 1])
  local known = redis.call('ZSCORE', KEYS[3], ticket)
  if not known and expires > now and adopt(ticket, 'sessions') then
    redis.call('ZADD', KEYS[3], expires, ticket)
    known = true
  end
  if known then
    session_used(ticket)
    updated = updated + 1
  end
end
return updated
