-- touch: waiters still here (one batch per scheduler step).
-- KEYS[1] seen.  ARGV[1] now (ms); ARGV[2..] tickets.
-- Returns the number of waiting tickets updated.
local updated = 0
for i = 2, #ARGV do
  updated = updated + redis.call('ZADD', KEYS[1], 'XX', 'CH', ARGV[1], ARGV[i])
end
return updated
