-- redeem: present a ticket; a granted turn becomes a session (once), a waiting one reports
-- its position (and is seen). A ticket whose session is still fresh (nobody has used it) is
-- the same visitor again when the instance that opened it is dead or knows its answer was
-- lost: the session is theirs again. While that instance may still answer, wait a moment
-- (a copy of the cookie must not pass along).
-- KEYS: as in common.lua.  ARGV[10] ticket, ARGV[11] this instance's id.
-- Returns {0, expires at} admitted, {1, position} waiting, {2, reason} gone
-- (reason: lapsed | used | left | unknown), {3, 0} pending: ask again in a moment.
if lost() then
  return redis.error_reply(LOST)
end
expire()
local ticket = tonumber(ARGV[10])
local last = number(KEYS[1], 'last')
local cursor = number(KEYS[1], 'cursor')
local restored = restored_at ~= false
if ticket == 0 then
  return {2, 'unknown'}
end
if ticket > last then
  -- Tickets are signed: this one was given out by a line that lost its latest writes (a
  -- restart, a failover before replication), and keeps its place. The line grows to it;
  -- tickets in between, never seen, are skipped unless reported within RESEE_MS.
  redis.call('HSET', KEYS[1], 'last', ticket, 'grown_at', string.format('%d', now))
  if ticket > number(KEYS[1], 'restored_upto') then
    redis.call('HSET', KEYS[1], 'restored_upto', ticket)
  end
  last = ticket
end
if ticket > cursor then
  if redis.call('SISMEMBER', KEYS[4], ticket) == 1 then
    return {2, 'left'}
  end
  local seen = redis.call('ZSCORE', KEYS[5], ticket)
  local confirmed = not redis.call('ZSCORE', KEYS[10], ticket)
  if judge and confirmed and seen and tonumber(seen) + abandon_ms <= now then
    redis.call('ZREM', KEYS[5], ticket)
    redis.call('SADD', KEYS[4], ticket)
    return {2, 'left'}
  end
  redis.call('ZADD', KEYS[5], now, ticket)
  redis.call('ZREM', KEYS[10], ticket)
  return {1, ticket - cursor}
end
local why = redis.call('HGET', KEYS[7], ticket)
-- A turn granted by the lost line, redeemed within its grant time, takes a phantom place.
local restored_grant = not why and restored and now < restored_at + grant_ms
if redis.call('ZREM', KEYS[2], ticket) == 1 or (restored_grant and adopt(ticket, 'grants')) then
  forget(ticket, 'used')
  return {0, open_session(ticket, ARGV[11])}
end
local expires = redis.call('ZSCORE', KEYS[3], ticket)
if expires and redis.call('ZSCORE', KEYS[12], ticket) then
  local opener = redis.call('HGET', KEYS[13], ticket)
  local alive_until = opener and opener ~= '' and redis.call('HGET', KEYS[14], opener)
  local time = redis.call('TIME')
  local redis_now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  if alive_until and tonumber(alive_until) > redis_now then
    return {3, 0}
  end
  redis.call('HSET', KEYS[13], ticket, ARGV[11])
  return {0, tonumber(expires)}
end
return {2, why or 'used'}
