-- unlease: give up a room's scheduler lease (a graceful stop), so another instance takes
-- over at once.
-- KEYS[1] leader.  ARGV[1] this instance's id.
-- Returns 1 when this instance held the lease, 0 otherwise.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
