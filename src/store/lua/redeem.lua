-- redeem: present a ticket; a granted turn becomes a session (once), a waiting one reports
-- its position.
-- KEYS: as in common.lua.  ARGV[7] ticket.
-- Returns {0, expires at} admitted, {1, position} waiting, {2, reason} gone
-- (reason: lapsed | used | left | unknown).
expire()
local ticket = tonumber(ARGV[7])
local last = number(KEYS[1], 'last')
local cursor = number(KEYS[1], 'cursor')
if ticket == 0 or ticket > last then
  return {2, 'unknown'}
end
if ticket > cursor then
  if redis.call('SISMEMBER', KEYS[4], ticket) == 1 then
    return {2, 'left'}
  end
  local seen = redis.call('ZSCORE', KEYS[5], ticket)
  if seen and tonumber(seen) + abandon_ms <= now then
    redis.call('ZREM', KEYS[5], ticket)
    redis.call('SADD', KEYS[4], ticket)
    return {2, 'left'}
  end
  redis.call('ZADD', KEYS[5], now, ticket)
  return {1, ticket - cursor}
end
if redis.call('ZREM', KEYS[2], ticket) == 1 then
  redis.call('ZADD', KEYS[3], now + session_ms, ticket)
  forget(ticket, 'used')
  return {0, now + session_ms}
end
return {2, redis.call('HGET', KEYS[7], ticket) or 'used'}
