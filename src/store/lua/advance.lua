-- advance: a scheduler step. Grant turns in ticket order within budget and capacity; skip
-- leavers and, when absence is judged, waiters not seen for abandon_ms or unconfirmed for
-- CONFIRM_MS, and end sessions not used for idle_ms. At most MAX_SKIPS tickets skipped and
-- MAX_ENDS sessions ended per call; the next steps carry on.
-- With ARGV[13] (an operator's batch: `POST /rooms/{id}/admit`), grant up to that many turns
-- now, outside the budget (capacity still holds), and end no idle session.
-- KEYS: as in common.lua.  ARGV[10] the channel of cursor moves, ARGV[11] the channel of
-- ended sessions, ARGV[12] the adaptive rate the leader decided (per minute; 0: none, '':
-- leave it as it is), ARGV[13] (optional) how many to grant outside the budget.
-- Returns {granted, the report of common.lua..., ended sessions as ticket, until, ...}.
if lost() then
  return redis.error_reply(LOST)
end
if ARGV[12] ~= '' then
  local decided = tonumber(ARGV[12])
  if decided > 0 and decided ~= adaptive then
    redis.call('HSET', KEYS[1], 'a_per_minute', decided)
    adaptive = decided
  elseif decided == 0 and adaptive then
    redis.call('HDEL', KEYS[1], 'a_per_minute')
    adaptive = false
  end
  per_minute = adaptive and math.min(ceiling, adaptive) or ceiling
end
local batch = tonumber(ARGV[13] or '0')
local budget = refill()
expire()
local ended = {}
if judge and batch == 0 then
  local idle = redis.call('ZRANGEBYSCORE', KEYS[11], '-inf', now - idle_ms, 'LIMIT', 0, MAX_ENDS)
  for _, ticket in ipairs(idle) do
    local expires = redis.call('ZSCORE', KEYS[3], ticket)
    drop_session(ticket)
    if expires then
      revoke(ticket, expires, ARGV[11])
      table.insert(ended, tonumber(ticket))
      table.insert(ended, tonumber(expires))
    end
  end
end
local last = number(KEYS[1], 'last')
local start = number(KEYS[1], 'cursor')
local cursor = start
local restored_upto = number(KEYS[1], 'restored_upto')
-- Tickets up to restored_upto may never have been seen by this line (it was rebuilt, or grew
-- to a ticket beyond its last): their holders have RESEE_MS from then to be reported.
local resee_until = math.max(restored_at or 0, number(KEYS[1], 'grown_at')) + RESEE_MS
-- A scheduled sale's pre-queue was given its places (seat.lua): those places' holders have
-- SEATED_SEE_MS from then, and 0.1 ms a place, to be reported (every instance reports the
-- ones it saw in the pre-queue at once, a thousand a step; src/line/mod.rs, seated_see_ms).
local seated = redis.call('HMGET', KEYS[1], 'seated_base', 'seated_count', 'seated_at')
local seated_count = tonumber(seated[2] or '0')
local seated_from = tonumber(seated[1] or '0') + 1
local seated_upto = tonumber(seated[1] or '0') + seated_count
local seated_see_until = tonumber(seated[3] or '0') + SEATED_SEE_MS + math.floor(seated_count / 10)
local room_left = free()
local granted = 0
local skipped = 0
local function may_grant()
  if batch > 0 then
    return granted < batch
  end
  return budget >= TURN
end
while cursor < last and may_grant() and room_left > 0 and skipped < MAX_SKIPS do
  local ticket = cursor + 1
  local skip = redis.call('SISMEMBER', KEYS[4], ticket) == 1
  if not skip then
    local seen = redis.call('ZSCORE', KEYS[5], ticket)
    local absent
    if seen then
      local taken = redis.call('ZSCORE', KEYS[10], ticket)
      absent = tonumber(seen) + abandon_ms <= now
      if taken and tonumber(taken) + CONFIRM_MS <= now then
        absent = true
      end
    elseif ticket <= restored_upto and now < resee_until then
      absent = nil -- a waiter of a restored line not reported yet: wait for them a while
    elseif ticket >= seated_from and ticket <= seated_upto and now < seated_see_until then
      absent = nil -- a place of the pre-queue not reported yet: the same
    else
      absent = true
    end
    if absent and judge then
      skip = true
    elseif absent ~= false then
      break -- wait a moment for them to be reported
    end
  end
  cursor = ticket
  redis.call('ZREM', KEYS[5], ticket)
  redis.call('SREM', KEYS[4], ticket)
  redis.call('ZREM', KEYS[10], ticket)
  if skip then
    skipped = skipped + 1
    forget(ticket, 'left')
  else
    redis.call('ZADD', KEYS[2], now, ticket)
    if batch == 0 then
      budget = budget - TURN
    end
    room_left = room_left - 1
    redis.call('RPUSH', KEYS[8], now)
    granted = granted + 1
  end
end
redis.call('HSET', KEYS[1], 'cursor', cursor)
save_budget(budget)
if cursor > start then
  redis.call('PUBLISH', ARGV[10], cursor)
end
local reply = report()
table.insert(reply, 1, granted)
for _, value in ipairs(ended) do
  table.insert(reply, value)
end
return reply
