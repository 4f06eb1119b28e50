-- join: take a ticket; admitted at once when the room is open, nobody waits, and there is
-- room and budget. A waiting ticket stays unconfirmed until its holder is seen.
-- KEYS: as in common.lua.  ARGV[10] admit_now (1 or 0), ARGV[11] this instance's id,
-- ARGV[12] the id of the join's proof of work ('' for none): each is taken once, or the error
-- REUSED.  ARGV[13] max_waiting: most waiters still here (seen lately, their join confirmed),
-- 0 for no limit.
-- Returns {admitted (1/0; 2: the line is full and no ticket was taken), ticket, session
-- expires at (ms) or 0, line id}; the error RESTORING for a moment after a restore.
if lost() then
  return redis.error_reply(LOST)
end
if restored_at and now < restored_at + JOIN_HOLD_MS then
  return redis.error_reply('RESTORING the line is being restored')
end
local max_waiting = tonumber(ARGV[13])
if max_waiting > 0 then
  -- Waiters still here (src/line/mod.rs, waiting_here): seen within abandon_ms, less those
  -- whose join nobody confirmed within CONFIRM_MS. Leavers are out of `seen` already.
  local gone_before = now - abandon_ms
  local waiting = redis.call('ZCARD', KEYS[5]) - redis.call('ZCOUNT', KEYS[5], '-inf', gone_before)
    - redis.call('ZCOUNT', KEYS[10], string.format('(%d', gone_before), now - CONFIRM_MS)
  if waiting >= max_waiting then
    return {2, 0, 0, number(KEYS[1], 'line_id')}
  end
end
if not take_proof(ARGV[12]) then
  return redis.error_reply('REUSED the proof of work was used already')
end
local ticket = redis.call('HINCRBY', KEYS[1], 'last', 1)
-- Only a join that may be let in at once (nobody ahead) needs the line's ends and its budget
-- brought up to now; a join that waits leaves both to the leader's next step (the budget a
-- refill would have saved is the same when computed then), three fewer commands a join.
if ARGV[10] == '1' and number(KEYS[1], 'cursor') + 1 == ticket then
  expire()
  local budget = refill()
  if free() > 0 and budget >= TURN then
    redis.call('HSET', KEYS[1], 'cursor', ticket)
    save_budget(budget - TURN)
    redis.call('RPUSH', KEYS[8], now)
    return {1, ticket, open_session(ticket, ARGV[11]), number(KEYS[1], 'line_id')}
  end
end
redis.call('ZADD', KEYS[5], now, ticket)
redis.call('ZADD', KEYS[10], now, ticket)
return {0, ticket, 0, number(KEYS[1], 'line_id')}
