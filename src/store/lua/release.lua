-- release: end the session a ticket opened; its slot frees at once.
-- KEYS[1] sessions.  ARGV[1] ticket.
-- Returns 1 when a session ended, 0 otherwise.
return redis.call('ZREM', KEYS[1], ARGV[1])
