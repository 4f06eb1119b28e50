-- prequeue: a scheduled sale's pre-queue (src/line/mod.rs, Line::prequeue). A newcomer takes
-- the next pre-queue number; a number presented again raises the count to it (a line Redis
-- lost learns it back from its holders, as `last` from tickets). Once the event is seated
-- (seat.lua), its places are returned instead.
-- KEYS: as in common.lua.  ARGV[10] the event id, ARGV[11] the number presented (0: take
-- one), ARGV[12] max_waiting (0: no limit), ARGV[13] the id of the join's proof of work (''
-- for none): each is taken once, or the error REUSED.
-- Returns {kind (0: a number, 2: full, 3: seated), number, seated base, seated count,
-- seated at (ms), seed (hex) or '', line id, shuffled (1/0)}; the error RESTORING for a
-- moment after a restore.
if lost() then
  return redis.error_reply(LOST)
end
local event = ARGV[10]
local presented = tonumber(ARGV[11])
local line_id = number(KEYS[1], 'line_id')
local seated = redis.call('HMGET', KEYS[1], 'seated_event', 'seated_base', 'seated_count', 'seated_at', 'seated_seed',
  'seated_shuffled')
if seated[1] == event then
  return {3, presented, tonumber(seated[2]), tonumber(seated[3]), tonumber(seated[4]), seated[5], line_id,
    tonumber(seated[6] or '1')}
end
local current = redis.call('HGET', KEYS[1], 'pq_event')
if current ~= event then
  if presented > 0 and current then
    -- A number of another sale than the one in its pre-queue: not counted.
    return {0, presented, 0, 0, 0, '', line_id, 0}
  end
  redis.call('HSET', KEYS[1], 'pq_event', event, 'pq_last', 0)
end
local last = number(KEYS[1], 'pq_last')
if presented > 0 then
  if presented > last then
    redis.call('HSET', KEYS[1], 'pq_last', presented)
  end
  return {0, presented, 0, 0, 0, '', line_id, 0}
end
if restored_at and now < restored_at + JOIN_HOLD_MS then
  return redis.error_reply('RESTORING the line is being restored')
end
local max_waiting = tonumber(ARGV[12])
if max_waiting > 0 and last >= max_waiting then
  return {2, 0, 0, 0, 0, '', line_id, 0}
end
if not take_proof(ARGV[13]) then
  return redis.error_reply('REUSED the proof of work was used already')
end
return {0, redis.call('HINCRBY', KEYS[1], 'pq_last', 1), 0, 0, 0, '', line_id, 0}
