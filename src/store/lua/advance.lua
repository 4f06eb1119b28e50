-- advance: grant turns in ticket order within budget and capacity; skip leavers and waiters
-- not seen for abandon_ms.
-- KEYS: as in common.lua.  ARGV: as in common.lua.
-- Returns the number of turns granted.
local budget = refill()
expire()
local last = number(KEYS[1], 'last')
local cursor = number(KEYS[1], 'cursor')
local room_left = free()
local granted = 0
while cursor < last and budget >= TURN and room_left > 0 do
  cursor = cursor + 1
  local seen = redis.call('ZSCORE', KEYS[5], cursor)
  redis.call('ZREM', KEYS[5], cursor)
  local abandoned = seen and (tonumber(seen) + abandon_ms <= now)
  if redis.call('SREM', KEYS[4], cursor) == 1 or abandoned then
    forget(cursor, 'left')
  else
    redis.call('ZADD', KEYS[2], now, cursor)
    budget = budget - TURN
    room_left = room_left - 1
    redis.call('RPUSH', KEYS[8], now)
    granted = granted + 1
  end
end
redis.call('HSET', KEYS[1], 'cursor', cursor)
save_budget(budget)
return granted
