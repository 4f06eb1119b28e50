-- stats: what the room looks like now.
-- KEYS: as in common.lua.  ARGV: as in common.lua.
-- Returns {cursor, last, active, outstanding, admissions in the window, first admission (ms) or -1}.
expire()
local first = redis.call('LINDEX', KEYS[8], 0)
return {
  number(KEYS[1], 'cursor'),
  number(KEYS[1], 'last'),
  redis.call('ZCARD', KEYS[3]),
  redis.call('ZCARD', KEYS[2]),
  redis.call('LLEN', KEYS[8]),
  first and tonumber(first) or -1,
}
