-- seat: a scheduled sale starts (src/line/mod.rs, Line::seat). Once per event: the pre-queue's
-- numbers 1..count take the tickets after the last one given (`seated_base`), in the order
-- the seed draws (src/line/shuffle.rs, computed by each instance), and later arrivals take
-- tickets after them. Calling it again returns the same seating, with the first seed.
-- KEYS: as in common.lua.  ARGV[10] the event id, ARGV[11] the seed (hex), ARGV[12] 1 to draw
-- the order from the seed, 0 to keep the order of arrival.
-- Returns {seated base, seated count, seated at (ms), seed (hex), line id, shuffled (1/0)};
-- the error RESTORING for a moment after a restore (every instance merges what it knew of
-- the pre-queue and of a seating first: RESEE_MS, longer than a join's hold).
if lost() then
  return redis.error_reply(LOST)
end
local event = ARGV[10]
local line_id = number(KEYS[1], 'line_id')
local seated = redis.call('HMGET', KEYS[1], 'seated_event', 'seated_base', 'seated_count', 'seated_at', 'seated_seed',
  'seated_shuffled')
if seated[1] == event then
  return {tonumber(seated[2]), tonumber(seated[3]), tonumber(seated[4]), seated[5], line_id, tonumber(seated[6] or '1')}
end
if restored_at and now < restored_at + RESEE_MS then
  return redis.error_reply('RESTORING the line is being restored')
end
local count = 0
if redis.call('HGET', KEYS[1], 'pq_event') == event then
  count = number(KEYS[1], 'pq_last')
end
local base = number(KEYS[1], 'last')
redis.call('HSET', KEYS[1], 'last', string.format('%d', base + count), 'seated_event', event,
  'seated_base', string.format('%d', base), 'seated_count', string.format('%d', count),
  'seated_at', string.format('%d', now), 'seated_seed', ARGV[11], 'seated_shuffled', ARGV[12])
return {base, count, now, ARGV[11], line_id, tonumber(ARGV[12])}
