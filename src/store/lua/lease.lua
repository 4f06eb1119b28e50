-- lease: take or keep a room's scheduler lease, so that one instance advances the line.
-- KEYS[1] leader (string: the holding instance's id, with an expiry).
-- ARGV[1] this instance's id, ARGV[2] lease length (ms).
-- Returns 1 when this instance holds the lease now, 0 when another does.
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
