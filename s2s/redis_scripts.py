"""The Lua scripts of the bus (``s2s.bus``): each is one atomic step where two Redis
commands in a row could interleave with another worker's, or must run only when a
condition holds where the data is.  Scripts touch only the keys they are given."""

# Acknowledge and delete in one step: every stage stream has exactly one consumer
# group, so an entry it acknowledged is needed by nobody and its payload (a whole
# utterance in s2s:stt) must not wait for MAXLEN to push it out.  A script, not MULTI,
# so that XDEL runs only for ids this call acknowledged (an id already acknowledged by
# another consumer that claimed it was deleted by that one).  XACK and XDEL are allowed
# when Redis is out of memory, and they free it.
ACK_DEL = """
local n = 0
for i = 1, #ARGV - 1 do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i + 1]) == 1 then
    redis.call('XDEL', KEYS[1], ARGV[i + 1])
    n = n + 1
  end
end
return n
"""

# The keep-alive, atomic: re-claim (XCLAIM JUSTID, which does not count a delivery)
# only the ids this consumer still owns, and return the ids another consumer owns by
# now.  In two round trips (XPENDING, then XCLAIM with min-idle 0) an XAUTOCLAIM by
# another worker between the two would be stolen back, leaving two owners.
KEEP_ALIVE = """
local mine, lost = {}, {}
for i = 4, #ARGV do
  local row = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #row > 0 then
    if row[1][2] == ARGV[2] then mine[#mine + 1] = ARGV[i] else lost[#lost + 1] = ARGV[i] end
  end
end
if #mine > 0 then
  local args = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
  for _, id in ipairs(mine) do args[#args + 1] = id end
  if ARGV[3] == '1' then args[#args + 1] = 'RETRYCOUNT'; args[#args + 1] = '1' end
  args[#args + 1] = 'JUSTID'
  redis.call(unpack(args))
end
return lost
"""

# Fencing for a session owner: no write once another consumer holds the session entry,
# checked where the write lands.  A worker cut off from Redis keeps the commands it sent
# in its kernel's send queue; when the link comes back they arrive after another worker
# took the session over and would repeat its events (a second "speech started", an
# interrupt), rewind its resume point or supersede its turn.  An entry pending to nobody
# (Redis restarted empty, the group or stream gone) does not refuse: the owner that
# survived a restart goes on (the gateway then does not open the session again).
_TAKEN = """
local function taken(stream, group, consumer, id)
  local row = redis.pcall('XPENDING', stream, group, id, id, 1)
  return type(row) == 'table' and row.err == nil and #row > 0 and row[1][2] ~= consumer
end
"""

# KEYS: the sessions stream, then the output keys; ARGV: group, consumer, entry id, then
# per output stream (data, maxlen, ttl seconds or 0).  nil when taken.
EMIT_IF_OWNER = _TAKEN + """
if taken(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return false end
local ids = {}
for i = 2, #KEYS do
  local j = 4 + (i - 2) * 3
  ids[#ids + 1] = redis.call('XADD', KEYS[i], 'MAXLEN', '~', ARGV[j + 1], '*', 'f', ARGV[j])
  if tonumber(ARGV[j + 2]) > 0 then redis.call('EXPIRE', KEYS[i], ARGV[j + 2]) end
end
return ids
"""

# The resume point (KEYS: sessions stream, position key, state key; ARGV: group,
# consumer, entry id, position, state or "" to delete it, ttl seconds).  0 when taken.
SAVE_IF_OWNER = _TAKEN + """
if taken(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[6])
if ARGV[5] == '' then redis.call('DEL', KEYS[3])
else redis.call('SET', KEYS[3], ARGV[5], 'EX', ARGV[6]) end
return 1
"""

# A turn change (KEYS: sessions stream, turn key; ARGV: group, consumer, entry id, ttl
# seconds, channel, sid).  nil when taken.  Published ("<turn> <sid>") where it is made,
# so the work in flight for the old turn stops at once (s2s/turn_watch.py).
INCR_IF_OWNER = _TAKEN + """
if taken(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return false end
local turn = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('PUBLISH', ARGV[5], turn .. ' ' .. ARGV[6])
return turn
"""

# The same, unfenced (the gateway's: a typed message, a cancel).  KEYS: turn key; ARGV:
# ttl seconds, channel, sid.
ADVANCE_TURN = """
local turn = redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2], turn .. ' ' .. ARGV[3])
return turn
"""

# The heartbeat may run when Redis is out of memory (allow-oom: a few bytes; else
# every worker would look dead to every other one until memory is back).
HEARTBEAT = """#!lua flags=allow-oom
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, ARGV[1] - 60)
return 1
"""

# Delete a consumer only if nothing is pending on it (else -1).
DELCONSUMER_IF_IDLE = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return -1 end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
"""

# Drop a registry member only if it has not heartbeated since it was seen dead (a
# stalled worker that came back keeps its member).
FORGET_IF_STALE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) < tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
"""


# --- the gateway's session ownership ------------------------------------------------
# KEYS: session_gateway; ARGV: gateway id, open entry id ("" keeps the recorded one), ttl
GATEWAY_OWN = """
redis.call('HSET', KEYS[1], 'gw', ARGV[1])
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'open', ARGV[2]) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return redis.call('HGET', KEYS[1], 'open')
"""
# KEYS: session_gateway, turn; ARGV: gateway id, turn floor, ttl
GATEWAY_TOUCH = """
local gw = redis.call('HGET', KEYS[1], 'gw')
local r = 0
if not gw then
  redis.call('HSET', KEYS[1], 'gw', ARGV[1])
  r = 1
elseif gw ~= ARGV[1] then
  return -1
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
local t = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
if t < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
  if r == 0 then r = 2 end
end
return r
"""
# KEYS: session_gateway, audio stream, then every key of the session; ARGV: gateway id, encoded
# SessionEnd, audio MAXLEN, closed TTL.  The owner record stays as a tombstone (gw "")
# so a stalled ex-owner cannot mistake it for one lost to a Redis restart.
END_IF_GATEWAY = """
if redis.call('HGET', KEYS[1], 'gw') ~= ARGV[1] then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'f', ARGV[2])
redis.call('HSET', KEYS[1], 'gw', '')
for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
return 1
"""
