"""The Lua scripts of :class:`~megaflow.store.redis.RedisLedger` (each runs atomically).

Keys are built inside the scripts from the prefix (``ARGV[1]``), so the ledger needs a
standalone Redis (not Redis Cluster). Layout under prefix ``P``:

    P:t:<task>   hash   run seq spec state attempts aid ekind err result traj at st
    P:rt:<run>   list   the run's task ids in submission order
    P:r:<run>    hash   seq cap total terminal
    P:runs       zset   run ids by run seq
    P:u          zset   unfinished task ids by task seq
    P:seq, P:runseq     counters
    P:c:<task>   hash   aid data seq at head n (the latest checkpoint: data is its log's
                        first record, head its head, n the records in its log)
    P:cl:<task>  string the log's records appended since its first (APPEND: O(record))
    P:l:<name>   string the lease holder, with a PX expiry
"""

ADD_TASKS = """
local p, run, cap, now = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local n = (#ARGV - 4) / 2
local taken = {}
for i = 0, n - 1 do
  local id = ARGV[5 + 2 * i]
  if redis.call('EXISTS', p .. ':t:' .. id) == 1 then
    taken[#taken + 1] = id
    if #taken >= 5 then break end
  end
end
if #taken > 0 then return taken end
local seq = redis.call('INCRBY', p .. ':seq', n) - n
for i = 0, n - 1 do
  local id = ARGV[5 + 2 * i]
  local s = seq + i + 1
  redis.call('HSET', p .. ':t:' .. id, 'run', run, 'seq', s, 'spec', ARGV[6 + 2 * i],
    'state', 1, 'attempts', 0, 'aid', '', 'ekind', 0, 'err', '', 'at', now)
  redis.call('ZADD', p .. ':u', s, id)
  redis.call('RPUSH', p .. ':rt:' .. run, id)
end
local r = p .. ':r:' .. run
if redis.call('EXISTS', r) == 0 then
  local rs = redis.call('INCR', p .. ':runseq')
  redis.call('HSET', r, 'seq', rs, 'cap', cap, 'total', n, 'terminal', 0)
  redis.call('ZADD', p .. ':runs', rs, run)
else
  redis.call('HINCRBY', r, 'total', n)
  if cap > 0 then redis.call('HSET', r, 'cap', cap) end
end
return {}
"""

MARK_RUNNING = """
local k = ARGV[1] .. ':t:' .. ARGV[2]
local st = redis.call('HGET', k, 'state')
if not st or st == '3' or st == '4' then return 0 end
redis.call('HSET', k, 'state', 2, 'attempts', ARGV[3], 'aid', ARGV[4], 'at', ARGV[5])
if ARGV[3] == '1' or not redis.call('HGET', k, 'st') then redis.call('HSET', k, 'st', ARGV[5]) end
return 1
"""

MARK_RETRYING = """
local k = ARGV[1] .. ':t:' .. ARGV[2]
local st = redis.call('HGET', k, 'state')
if not st or st == '3' or st == '4' then return 0 end
redis.call('HSET', k, 'state', 1, 'attempts', ARGV[3], 'aid', '', 'ekind', 2,
  'err', ARGV[4], 'at', ARGV[5])
return 1
"""

FINISH = """
local p, id = ARGV[1], ARGV[2]
local k = p .. ':t:' .. id
local st = redis.call('HGET', k, 'state')
if not st or st == '3' or st == '4' then return 0 end
redis.call('HSET', k, 'state', ARGV[3], 'attempts', ARGV[4], 'ekind', ARGV[5], 'err', ARGV[6],
  'result', ARGV[7], 'at', ARGV[10])
if ARGV[9] == '1' then redis.call('HSET', k, 'traj', ARGV[8]) else redis.call('HDEL', k, 'traj') end
redis.call('ZREM', p .. ':u', id)
redis.call('HINCRBY', p .. ':r:' .. redis.call('HGET', k, 'run'), 'terminal', 1)
return 1
"""

SAVE_CHECKPOINT = """
local p, id, aid = ARGV[1], ARGV[2], ARGV[3]
local v = redis.call('HMGET', p .. ':t:' .. id, 'state', 'aid')
if not v[1] or v[1] == '3' or v[1] == '4' or aid == '' or v[2] ~= aid then return 0 end
local c = p .. ':c:' .. id
local after = tonumber(ARGV[7])
if after > 0 then
  local cur = redis.call('HMGET', c, 'aid', 'n')
  if cur[1] ~= aid or tonumber(cur[2] or '1') ~= after then return 0 end
  redis.call('APPEND', p .. ':cl:' .. id, ARGV[4])
  redis.call('HINCRBY', c, 'seq', 1)
  redis.call('HSET', c, 'at', ARGV[5], 'head', ARGV[6], 'n', after + 1)
  return 1
end
redis.call('DEL', p .. ':cl:' .. id)
redis.call('HINCRBY', c, 'seq', 1)
redis.call('HSET', c, 'aid', aid, 'data', ARGV[4], 'at', ARGV[5], 'head', ARGV[6], 'n', 1)
return 1
"""

ACQUIRE_LEASE = """
local v = redis.call('GET', KEYS[1])
if v == false or v == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""

# Lease scripts: ARGV[1] is the prefix (unused), ARGV[2] the holder, ARGV[3] the TTL in ms.
RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[2] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""
