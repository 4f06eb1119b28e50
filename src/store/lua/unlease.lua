-- unlease: give up a room's scheduler lease (a graceful stop), so another instance takes
-- over at once; the instance is no longer alive.
-- KEYS[1] leader, KEYS[2] instances.  ARGV[1] this instance's id.
-- Returns 1 when this instance held the lease, 0 otherwise.
redis.call('HDEL', KEYS[2], ARGV[1])
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
