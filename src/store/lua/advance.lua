-- advance: grant turns in ticket order within budget and capacity; skip leavers and waiters
-- not seen for abandon_ms; announce the new cursor.
-- KEYS: as in common.lua.  ARGV[7] the channel on which cursor moves are published.
-- Returns {granted, then the report of common.lua}.
if lost() then
  return redis.error_reply(LOST)
end
local budget = refill()
expire()
local last = number(KEYS[1], 'last')
local start = number(KEYS[1], 'cursor')
local cursor = start
local restored_upto = number(KEYS[1], 'restored_upto')
local resee_until = number(KEYS[1], 'restored_at') + RESEE_MS
local room_left = free()
local granted = 0
while cursor < last and budget >= TURN and room_left > 0 do
  local ticket = cursor + 1
  local seen = redis.call('ZSCORE', KEYS[5], ticket)
  local has_left = redis.call('SISMEMBER', KEYS[4], ticket) == 1
  -- A waiter of a restored line not seen since: wait for them a while, then skip them.
  local unseen = not seen and not has_left and ticket <= restored_upto
  if unseen and now < resee_until then
    break
  end
  cursor = ticket
  redis.call('ZREM', KEYS[5], ticket)
  redis.call('SREM', KEYS[4], ticket)
  local abandoned = unseen or (seen and (tonumber(seen) + abandon_ms <= now))
  if has_left or abandoned then
    forget(ticket, 'left')
  else
    redis.call('ZADD', KEYS[2], now, ticket)
    budget = budget - TURN
    room_left = room_left - 1
    redis.call('RPUSH', KEYS[8], now)
    granted = granted + 1
  end
end
redis.call('HSET', KEYS[1], 'cursor', cursor)
save_budget(budget)
if cursor > start then
  redis.call('PUBLISH', ARGV[7], cursor)
end
local reply = report()
table.insert(reply, 1, granted)
return reply
