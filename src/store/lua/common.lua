-- Shared prelude of every line script: the same rules as src/line/mod.rs, in Lua, plus what
-- only a shared store needs (the epoch, restoring a line Redis lost, the revoked sessions,
-- refusing a call that arrives after its caller gave up).
-- Every key of a room carries the hash tag {room}, so the scripts also run on Redis Cluster.
--
-- KEYS[1]  line        hash: last (last ticket given), cursor (last ticket granted),
--                            budget (units of 1/60000 turn), budget_at (ms, never moves back),
--                            epoch (set when the line is created: a line without one was lost),
--                            line_id (which line this is: set when the line starts, kept through
--                            every restore; tickets and tokens carry it),
--                            restored_at (ms), restored_cursor, restored_upto (the line was
--                            rebuilt from what the instances knew), phantom_sessions,
--                            phantom_grants, adopted_sessions, adopted_grants (places presumed
--                            taken by what the lost line held, and how many were taken over
--                            since), grown_at (ms: the line grew to a ticket beyond its last),
--                            o_state, o_admit_per_minute, o_max_active, o_message, o_version
--                            (the live overrides: settings.lua), a_per_minute (the adaptive
--                            rate the leader decided: advance.lua), pq_event, pq_last (a
--                            scheduled sale's pre-queue: its event id and the last number
--                            given: prequeue.lua), seated_event, seated_base, seated_count,
--                            seated_at, seated_seed, seated_shuffled (its places: seat.lua)
-- KEYS[2]  grants      zset: ticket -> granted at (ms); granted turns not yet redeemed
-- KEYS[3]  sessions    zset: ticket -> expires at (ms); active sessions
-- KEYS[4]  left        set:  tickets after the cursor whose holders left
-- KEYS[5]  seen        zset: waiting ticket -> last seen (ms)
-- KEYS[6]  gone        zset: ticket -> ticket, spent tickets in order (bounded)
-- KEYS[7]  reasons     hash: ticket -> lapsed | used | left
-- KEYS[8]  admitted    list: admission times (ms) over the last minute
-- KEYS[9]  revoked     zset: ticket -> until (ms); ended sessions, for instances that missed
--                            the announcement
-- KEYS[10] unconfirmed zset: ticket -> joined at (ms); waiting tickets nobody has been seen
--                            holding since the join (its answer may have been lost)
-- KEYS[11] used        zset: session ticket -> last used (ms)
-- KEYS[12] fresh       zset: session ticket -> opened at (ms); sessions nobody has been seen
--                            using yet (the token may not have reached its holder)
-- KEYS[13] openers     hash: fresh session ticket -> the instance that opened it ('' once that
--                            instance knows its answer was lost)
-- KEYS[14] instances   hash: instance id -> alive until (ms of Redis time; lease.lua)
-- KEYS[15] proofs      zset: proof of work id -> until (ms); each is taken once
-- ARGV[1] now (ms)  ARGV[2] admit_per_minute  ARGV[3] max_active  ARGV[4] grant_ms
-- ARGV[5] session_ms  ARGV[6] abandon_ms  ARGV[7] idle_ms
-- ARGV[8] deadline: Redis time (ms) after which the caller has given up on this call, 0 for
--         none; a call that arrives later (Redis was frozen, the network slow) is refused
--         with the error EXPIRED, so that no answer is lost after its effect was made
-- ARGV[9] 1 when absence may be judged now, 0 when absent holders are excused a moment
-- Each script's own arguments follow, from ARGV[10].
--
-- A script finding no epoch answers the error LOST before changing anything: the instance
-- then restores the line (restore.lua) from what it knows and tries again.
local deadline = tonumber(ARGV[8])
if deadline > 0 then
  local time = redis.call('TIME')
  if tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000) > deadline then
    return redis.error_reply('EXPIRED the call arrived after its caller gave up')
  end
end
local now = tonumber(ARGV[1])
-- The fields of the line's hash that most scripts read, in one command: each HGET inside a
-- script counts as a command of its own, and one at a time they were a third of what Redis
-- spent on a join (`cargo bench --bench line`).
local head = redis.call('HMGET', KEYS[1], 'epoch', 'o_admit_per_minute', 'o_max_active', 'restored_at', 'budget',
  'budget_at', 'a_per_minute')
-- A live override of the rate or the capacity (settings.lua) binds every instance at once.
-- The rate the leader decided from the upstream's health ([rooms.adaptive]; advance.lua
-- sets it), or false: turns are granted at the lower of the two.
local ceiling = tonumber(head[2] or ARGV[2])
local adaptive = head[7] and tonumber(head[7])
local per_minute = adaptive and math.min(ceiling, adaptive) or ceiling
local max_active = tonumber(head[3] or ARGV[3])
-- When the line was last restored (ms), or false: as the script began (restore.lua, which
-- sets it, reads the hash afresh).
local restored_at = head[4] and tonumber(head[4])
-- The rate budget as stored, kept current by save_budget().
local budget_stored, budget_at_stored = head[5], head[6]
local grant_ms = tonumber(ARGV[4])
local session_ms = tonumber(ARGV[5])
local abandon_ms = tonumber(ARGV[6])
local idle_ms = tonumber(ARGV[7])
local judge = ARGV[9] == '1'
local TURN = 60000
local MAX_GONE = 65536
local RATE_WINDOW_MS = 60000
-- Bounds on one call's work (src/line/mod.rs: MAX_SKIPS, MAX_ENDS); the rest is done by the
-- next calls.
local MAX_SKIPS = 1000
local MAX_ENDS = 1000
-- How long a new ticket may go unconfirmed by its holder (src/line/mod.rs).
local CONFIRM_MS = 10000
-- After a restore: joins wait this long, so that every instance merges what it knows first.
local JOIN_HOLD_MS = 2000
-- After a restore: waiters the restored line never saw get this long to be reported again.
local RESEE_MS = 5000
-- After a sale's start: the pre-queue's places get this long to be reported (src/line/mod.rs).
local SEATED_SEE_MS = 10000
local LOST = 'LOST the line of this room is missing from the store'

local function number(key, field)
  return tonumber(redis.call('HGET', key, field) or '0')
end

local function lost()
  return not head[1]
end

-- The rate budget refilled up to now; a new line starts with a full bucket. Its time never
-- moves back: a caller whose clock lags neither gets nor gives credit.
local function refill()
  local burst = math.max(per_minute * 1000, TURN)
  if not budget_stored then
    return burst
  end
  local at = tonumber(budget_at_stored or '0')
  return math.min(burst, tonumber(budget_stored) + math.max(0, now - at) * per_minute)
end

local function save_budget(budget)
  local at = math.max(now, tonumber(budget_at_stored or '0'))
  budget_stored, budget_at_stored = string.format('%d', budget), string.format('%d', at)
  redis.call('HSET', KEYS[1], 'budget', budget_stored, 'budget_at', budget_at_stored)
end

local function forget(ticket, why)
  redis.call('ZADD', KEYS[6], ticket, ticket)
  redis.call('HSET', KEYS[7], ticket, why)
  if redis.call('ZCARD', KEYS[6]) > MAX_GONE then
    local oldest = redis.call('ZPOPMIN', KEYS[6])
    redis.call('HDEL', KEYS[7], oldest[1])
  end
end

-- A join's proof of work (its id; '' for none) is taken once across every instance: false
-- when it was taken already.
local function take_proof(id)
  if id == '' then
    return true
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[15], '-inf', now)
  if redis.call('ZSCORE', KEYS[15], id) then
    return false
  end
  redis.call('ZADD', KEYS[15], now + 120000, id)
  return true
end

-- A session's place is free: it leaves every set that knew it.
local function drop_session(ticket)
  redis.call('ZREM', KEYS[11], ticket)
  redis.call('ZREM', KEYS[12], ticket)
  redis.call('HDEL', KEYS[13], ticket)
  return redis.call('ZREM', KEYS[3], ticket)
end

-- A session opened by `instance` (a redemption, or an admission at join): fresh until used.
local function open_session(ticket, instance)
  redis.call('ZADD', KEYS[3], now + session_ms, ticket)
  redis.call('ZADD', KEYS[11], now, ticket)
  redis.call('ZADD', KEYS[12], now, ticket)
  redis.call('HSET', KEYS[13], ticket, instance)
  return now + session_ms
end

-- A session is in use: no longer fresh.
local function session_used(ticket)
  redis.call('ZADD', KEYS[11], 'GT', now, ticket)
  redis.call('ZREM', KEYS[12], ticket)
  redis.call('HDEL', KEYS[13], ticket)
end

-- End sessions and grants whose time is up (at most MAX_ENDS each); forget old admissions.
local function expire()
  local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, MAX_ENDS)
  for _, ticket in ipairs(expired) do
    drop_session(ticket)
  end
  local lapsed = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - grant_ms, 'LIMIT', 0, MAX_ENDS)
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

-- A session ended before its time (left, ended by the upstream, idle): kept until it would
-- have expired, and announced on `channel` as "ticket:until" to every instance.
local function revoke(ticket, expires, channel)
  local until_ms = tonumber(expires) or (now + session_ms)
  redis.call('ZREMRANGEBYSCORE', KEYS[9], '-inf', now)
  redis.call('ZADD', KEYS[9], until_ms, ticket)
  redis.call('PUBLISH', channel, string.format('%d:%d', ticket, until_ms))
end

-- Places presumed taken by what a lost line held, as many as the instances knew (merged by
-- maximum) less those taken over since: its sessions until idle_ms after the restore (one in
-- use is reported by then; none outlives session_ms), its turns granted until grant_ms (one
-- is redeemed by then).
local function phantom(kind)
  local lasts = kind == 'sessions' and math.min(idle_ms, session_ms) or grant_ms
  if not restored_at or restored_at + lasts <= now then
    return 0
  end
  return math.max(0, number(KEYS[1], 'phantom_' .. kind) - number(KEYS[1], 'adopted_' .. kind))
end

local function phantoms()
  return phantom('sessions') + phantom('grants')
end

local function free()
  return math.max(0, max_active - redis.call('ZCARD', KEYS[3]) - redis.call('ZCARD', KEYS[2]) - phantoms())
end

-- A ticket given out before a restore and unknown since, whose holder shows a token (kind
-- 'sessions') or redeems a turn ('grants'): it holds one of the phantom places of its kind;
-- take it over. False when it cannot.
local function adopt(ticket, kind)
  if ticket > number(KEYS[1], 'restored_upto') or phantom(kind) == 0 then
    return false
  end
  if redis.call('ZSCORE', KEYS[9], ticket) then
    return false
  end
  redis.call('HINCRBY', KEYS[1], 'adopted_' .. kind, 1)
  return true
end

-- The live overrides (settings.lua) as JSON: the fields that are set.
local function overrides_json()
  local overrides = {}
  for _, field in ipairs({'state', 'admit_per_minute', 'max_active', 'message'}) do
    local value = redis.call('HGET', KEYS[1], 'o_' .. field)
    if value then
      if field == 'admit_per_minute' or field == 'max_active' then
        overrides[field] = tonumber(value)
      else
        overrides[field] = value
      end
    end
  end
  return cjson.encode(overrides)
end

-- What the room looks like: {cursor, last, active, outstanding, admissions in the window,
-- first admission (ms) or -1, epoch, line id, version of the live overrides, the adaptive
-- rate in force or 0, the last pre-queue number given, the event of that pre-queue or 0}.
local function report()
  local first = redis.call('LINDEX', KEYS[8], 0)
  return {
    number(KEYS[1], 'cursor'),
    number(KEYS[1], 'last'),
    redis.call('ZCARD', KEYS[3]) + phantom('sessions'),
    redis.call('ZCARD', KEYS[2]) + phantom('grants'),
    redis.call('LLEN', KEYS[8]),
    first and tonumber(first) or -1,
    number(KEYS[1], 'epoch'),
    number(KEYS[1], 'line_id'),
    number(KEYS[1], 'o_version'),
    adaptive and per_minute or 0,
    number(KEYS[1], 'pq_last'),
    redis.call('HGET', KEYS[1], 'pq_event') or 0,
  }
end
