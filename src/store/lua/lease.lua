-- lease: take or keep a room's scheduler lease, so that one instance advances the line; and
-- say that this instance is alive (its sessions' redemptions are its to answer).
-- KEYS[1] leader (string: the holding instance's id, with an expiry), KEYS[2] instances
-- (hash: instance id -> alive until, ms of Redis time).
-- ARGV[1] this instance's id, ARGV[2] lease length (ms).
-- Returns {1, 0} when this instance holds the lease now, {0, ms} when another does for ms more
-- (when to try again: a dead holder's lease is taken the moment it runs out).
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('HSET', KEYS[2], ARGV[1], string.format('%d', now + tonumber(ARGV[2])))
-- Forget instances gone for a minute (the hash holds one entry per instance).
if math.random(100) == 1 then
  local entries = redis.call('HGETALL', KEYS[2])
  for i = 1, #entries, 2 do
    if tonumber(entries[i + 1]) + 60000 < now then
      redis.call('HDEL', KEYS[2], entries[i])
    end
  end
end
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {1, 0}
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, 0}
end
return {0, redis.call('PTTL', KEYS[1])}
