-- restore: create a room's line, or rebuild one Redis lost (restarted empty, failed over
-- without it) from what an instance knew of it. Every instance that knew the lost line merges
-- its knowledge: counters by maximum, so nobody loses a place and no ticket is given twice.
-- KEYS: as in common.lua.  ARGV[10] the epoch the instance knew (0: none), ARGV[11] the last
-- ticket it knew, ARGV[12] the cursor it knew, ARGV[13] the sessions and ARGV[14] the
-- turns granted (not yet redeemed) it knew, ARGV[15] the line id it knew (0: none), ARGV[16]
-- the live overrides it knew (JSON) and ARGV[17] their version (0: none), ARGV[18] the event
-- of the pre-queue it knew ('' for none) and ARGV[19] the last pre-queue number it knew,
-- ARGV[20] the seating it knew as "event base count at seed shuffled" ('' for none).
-- Returns the line's epoch.
local known_epoch = tonumber(ARGV[10])
local known_last = tonumber(ARGV[11])
local known_cursor = tonumber(ARGV[12])
local known_sessions = tonumber(ARGV[13])
local known_grants = tonumber(ARGV[14])
local known_line = tonumber(ARGV[15])
local known_overrides_version = tonumber(ARGV[17])
-- The live overrides come back as the instance knew them, the latest it knew winning.
local function restore_overrides()
  if known_overrides_version <= number(KEYS[1], 'o_version') then
    return
  end
  local overrides = cjson.decode(ARGV[16])
  for _, field in ipairs({'state', 'admit_per_minute', 'max_active', 'message'}) do
    redis.call('HDEL', KEYS[1], 'o_' .. field)
    if overrides[field] ~= nil and overrides[field] ~= cjson.null then
      redis.call('HSET', KEYS[1], 'o_' .. field, tostring(overrides[field]))
    end
  end
  redis.call('HSET', KEYS[1], 'o_version', known_overrides_version)
end
-- A scheduled sale's pre-queue and its seating come back as the instance knew them: the
-- pre-queue's count by maximum, the seating (once made, never redrawn) if the line lost it.
local function restore_sale()
  if ARGV[18] ~= '' then
    local event = redis.call('HGET', KEYS[1], 'pq_event')
    if not event then
      redis.call('HSET', KEYS[1], 'pq_event', ARGV[18], 'pq_last', ARGV[19])
    elseif event == ARGV[18] and tonumber(ARGV[19]) > number(KEYS[1], 'pq_last') then
      redis.call('HSET', KEYS[1], 'pq_last', ARGV[19])
    end
  end
  if ARGV[20] ~= '' and not redis.call('HGET', KEYS[1], 'seated_event') then
    local e, base, count, at, seed, shuffled = string.match(ARGV[20], '^(%d+) (%d+) (%d+) (%d+) (%x+) ([01])$')
    if e then
      redis.call('HSET', KEYS[1], 'seated_event', e, 'seated_base', base, 'seated_count', count, 'seated_at', at,
        'seated_seed', seed, 'seated_shuffled', shuffled)
    end
  end
end
-- An instance that knew only a pre-queue (no ticket given yet) knew the line all the same.
local knew_nothing = known_last == 0 and ARGV[18] == ''
local epoch = number(KEYS[1], 'epoch')
if epoch ~= 0 and (epoch == known_epoch or knew_nothing) then
  restore_overrides()
  restore_sale()
  return epoch
end
if epoch == 0 then
  local time = redis.call('TIME')
  epoch = tonumber(time[1]) * 1000000 + tonumber(time[2])
  redis.call('HSET', KEYS[1], 'epoch', string.format('%d', epoch))
  if knew_nothing then
    -- A new line: its id is its first epoch.
    redis.call('HSET', KEYS[1], 'line_id', string.format('%d', epoch))
    restore_overrides()
    restore_sale()
    return epoch
  end
end
restore_overrides()
restore_sale()
-- The lost line goes on under its id; a line started afresh meanwhile by an instance that
-- knew nothing takes it too, if it has given out no ticket yet.
if known_line ~= 0 and (not redis.call('HGET', KEYS[1], 'line_id') or number(KEYS[1], 'last') == 0) then
  redis.call('HSET', KEYS[1], 'line_id', string.format('%d', known_line))
end
if not redis.call('HGET', KEYS[1], 'restored_at') then
  redis.call('HSET', KEYS[1], 'restored_at', string.format('%d', now))
end
local function raise(field, value)
  if value > number(KEYS[1], field) then
    redis.call('HSET', KEYS[1], field, string.format('%d', value))
  end
end
raise('last', known_last)
raise('cursor', known_cursor)
raise('restored_cursor', known_cursor)
raise('restored_upto', known_last)
-- Sessions and grants the lost line held still take their places until they must have
-- ended (see phantom() in common.lua); each is taken over as its holder is seen, renews,
-- redeems or leaves.
if now < number(KEYS[1], 'restored_at') + RESEE_MS then
  raise('phantom_sessions', known_sessions)
  raise('phantom_grants', known_grants)
end
return epoch
