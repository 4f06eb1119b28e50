-- Shared prelude of every line script: the same rules as src/line.rs, in Lua, plus what
-- only a shared store needs (the epoch, restoring a line Redis lost, the revoked sessions).
-- Every key of a room carries the hash tag {room}, so the scripts also run on Redis Cluster.
--
-- KEYS[1] line      hash: last (last ticket given), cursor (last ticket granted),
--                         budget (units of 1/60000 turn), budget_at (ms),
--                         epoch (set when the line is created: a line without one was lost),
--                         restored_at (ms), restored_cursor, restored_upto (the line was
--                         rebuilt from what the instances knew), phantoms, phantoms_until
--                         (places presumed taken by sessions the lost line held)
-- KEYS[2] grants    zset: ticket -> granted at (ms); granted turns not yet redeemed
-- KEYS[3] sessions  zset: ticket -> expires at (ms); active sessions
-- KEYS[4] left      set:  tickets after the cursor whose holders left
-- KEYS[5] seen      zset: waiting ticket -> last seen (ms)
-- KEYS[6] gone      zset: ticket -> ticket, spent tickets in order (bounded)
-- KEYS[7] reasons   hash: ticket -> lapsed | used | left
-- KEYS[8] admitted  list: admission times (ms) over the last minute
-- KEYS[9] revoked   zset: ticket -> until (ms); ended sessions, for instances that missed
--                         the announcement
-- ARGV[1] now (ms)  ARGV[2] admit_per_minute  ARGV[3] max_active  ARGV[4] grant_ms
-- ARGV[5] session_ms  ARGV[6] abandon_ms; each script's own arguments follow.
--
-- A script finding no epoch answers the error LOST before changing anything: the instance
-- then restores the line (restore.lua) from what it knows and tries again.
local now = tonumber(ARGV[1])
local per_minute = tonumber(ARGV[2])
local max_active = tonumber(ARGV[3])
local grant_ms = tonumber(ARGV[4])
local session_ms = tonumber(ARGV[5])
local abandon_ms = tonumber(ARGV[6])
local TURN = 60000
local MAX_GONE = 65536
local RATE_WINDOW_MS = 60000
-- After a restore: joins wait this long, so that every instance merges what it knows first.
local JOIN_HOLD_MS = 2000
-- After a restore: waiters the restored line never saw get this long to show up.
local RESEE_MS = 25000
local LOST = 'LOST the line of this room is missing from the store'

local function number(key, field)
  return tonumber(redis.call('HGET', key, field) or '0')
end

local function lost()
  return redis.call('HEXISTS', KEYS[1], 'epoch') == 0
end

-- The rate budget refilled up to now; a new line starts with a full bucket.
local function refill()
  local burst = math.max(per_minute * 1000, TURN)
  local stored = redis.call('HGET', KEYS[1], 'budget')
  if not stored then
    return burst
  end
  local at = number(KEYS[1], 'budget_at')
  return math.min(burst, tonumber(stored) + math.max(0, now - at) * per_minute)
end

local function save_budget(budget)
  redis.call('HSET', KEYS[1], 'budget', string.format('%d', budget), 'budget_at', string.format('%d', now))
end

local function forget(ticket, why)
  redis.call('ZADD', KEYS[6], ticket, ticket)
  redis.call('HSET', KEYS[7], ticket, why)
  if redis.call('ZCARD', KEYS[6]) > MAX_GONE then
    local oldest = redis.call('ZPOPMIN', KEYS[6])
    redis.call('HDEL', KEYS[7], oldest[1])
  end
end

-- End sessions and grants whose time is up; forget old admissions and revocations.
local function expire()
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  local lapsed = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - grant_ms)
  for _, ticket in ipairs(lapsed) do
    redis.call('ZREM', KEYS[2], ticket)
    forget(ticket, 'lapsed')
  end
  while true do
    local first = redis.call('LINDEX', KEYS[8], 0)
    if first and tonumber(first) + RATE_WINDOW_MS <= now then
      redis.call('LPOP', KEYS[8])
    else
      break
    end
  end
end

-- Places presumed taken by the sessions and grants of a lost line, until they must have ended.
local function phantoms()
  if number(KEYS[1], 'phantoms_until') <= now then
    return 0
  end
  return number(KEYS[1], 'phantoms')
end

local function free()
  return math.max(0, max_active - redis.call('ZCARD', KEYS[3]) - redis.call('ZCARD', KEYS[2]) - phantoms())
end

-- A ticket granted before a restore and unknown since holds one of the phantom places; take
-- it over (for a renewal, a redemption or an end). False when it cannot be its.
local function adopt(ticket)
  if ticket > number(KEYS[1], 'restored_cursor') or phantoms() == 0 then
    return false
  end
  if redis.call('ZSCORE', KEYS[9], ticket) then
    return false
  end
  redis.call('HINCRBY', KEYS[1], 'phantoms', -1)
  return true
end

-- What the room looks like: {cursor, last, active, outstanding, admissions in the window,
-- first admission (ms) or -1, epoch}.
local function report()
  local first = redis.call('LINDEX', KEYS[8], 0)
  return {
    number(KEYS[1], 'cursor'),
    number(KEYS[1], 'last'),
    redis.call('ZCARD', KEYS[3]) + phantoms(),
    redis.call('ZCARD', KEYS[2]),
    redis.call('LLEN', KEYS[8]),
    first and tonumber(first) or -1,
    number(KEYS[1], 'epoch'),
  }
end
