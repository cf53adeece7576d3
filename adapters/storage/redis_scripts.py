"""The Lua scripts of the Redis store: every step that touches more than one key, atomically.

Keys of queue Q all start with ``bg:{Q}:`` (the prefix, ARGV[1]), so they share a hash slot
and every script runs unchanged on Redis Cluster; KEYS[1] is always a key of that slot so the
cluster routes the call.  Layout, per topic T:

    j:T:<id>       hash   the job: p payload, a attributes (JSON), r priority (0 high .. 2 low),
                          n attempt, e enqueued_at, t run_at, tr trace id, s state
                          (0 ready, 1 delayed, 2 leased, 3 dead, 4 done), l lease_until,
                          f finished_at, ls last status, le last error
    r:T:<p>        list   ready ids of priority p, FIFO
    d:T            zset   delayed ids by run_at
    l:T            zset   leased ids by lease_until
    x:T / c:T      zset   dead / completed ids by finished_at
    h:T:<id>       list   attempts, one JSON object each (created by the first attempt)
    n:T            hash   counters: pushed, done, retried, dead, expired, replayed
    n              hash   queue counters: unmatched
    wake           channel  PUBLISHed topic names ("~T" for a delayed job) after a change
"""

from __future__ import annotations

from adapters.storage.redis_client import Script

_COMMON = """
local prefix = ARGV[1]
local function jkey(topic, id) return prefix .. 'j:' .. topic .. ':' .. id end
local function leased(key, attempt)
  local f = redis.call('HMGET', key, 's', 'n')
  return f[1] == '2' and f[2] == attempt
end
local function forget(topic, id)
  redis.call('DEL', jkey(topic, id), prefix .. 'h:' .. topic .. ':' .. id)
  redis.call('ZREM', prefix .. 'x:' .. topic, id)
  redis.call('ZREM', prefix .. 'c:' .. topic, id)
end
"""

PUSH = Script(
    _COMMON
    + """
local now = tonumber(ARGV[2])
local ntopics = tonumber(ARGV[3])
local all = {}
for k = 1, ntopics do all[k] = ARGV[3 + k] end
local i = 4 + ntopics
local njobs = tonumber(ARGV[i]); i = i + 1
local copies, unmatched, duplicates = 0, 0, 0
local ready, delayed, pushed = {}, {}, {}
for _ = 1, njobs do
  local id, explicit, nt = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  i = i + 3
  local topics = {}
  for k = 1, nt do topics[k] = ARGV[i]; i = i + 1 end
  local payload, attrs, prio = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local run_at, trace = ARGV[i + 3], ARGV[i + 4]
  i = i + 5
  if nt == 0 then
    unmatched = unmatched + 1
  else
    local dup = false
    if explicit == '1' then
      for _, t in ipairs(all) do
        local s = redis.call('HGET', jkey(t, id), 's')
        if s == '0' or s == '1' or s == '2' then dup = true; break end
      end
    end
    if dup then
      duplicates = duplicates + 1
    else
      local is_delayed = tonumber(run_at) > now
      for _, t in ipairs(topics) do
        local key = jkey(t, id)
        if explicit == '1' then forget(t, id) end
        redis.call('HSET', key, 'p', payload, 'r', prio, 'n', 0, 'e', ARGV[2], 't', run_at,
                   'tr', trace, 's', is_delayed and '1' or '0')
        if attrs ~= '' then redis.call('HSET', key, 'a', attrs) end
        if is_delayed then
          redis.call('ZADD', prefix .. 'd:' .. t, run_at, id); delayed[t] = true
        else
          redis.call('RPUSH', prefix .. 'r:' .. t .. ':' .. prio, id); ready[t] = true
        end
        pushed[t] = (pushed[t] or 0) + 1
        copies = copies + 1
      end
    end
  end
end
for t, n in pairs(pushed) do redis.call('HINCRBY', prefix .. 'n:' .. t, 'pushed', n) end
if unmatched > 0 then redis.call('HINCRBY', prefix .. 'n', 'unmatched', unmatched) end
local ready_list, delayed_list = {}, {}
for t in pairs(ready) do
  table.insert(ready_list, t); redis.call('PUBLISH', prefix .. 'wake', t)
end
for t in pairs(delayed) do
  table.insert(delayed_list, t); redis.call('PUBLISH', prefix .. 'wake', '~' .. t)
end
return {copies, unmatched, duplicates, ready_list, delayed_list}
"""
)

RESERVE = Script(
    _COMMON
    + """
local topic, lease_until, plan = ARGV[2], ARGV[3], ARGV[4]
local out = {}
for c = 1, #plan do
  local id = redis.call('LPOP', prefix .. 'r:' .. topic .. ':' .. string.sub(plan, c, c))
  if not id then  -- the plan was made from counts that may have changed: take what is there
    for _, p in ipairs({'0', '1', '2'}) do
      id = redis.call('LPOP', prefix .. 'r:' .. topic .. ':' .. p)
      if id then break end
    end
  end
  if not id then break end
  local key = jkey(topic, id)
  if redis.call('EXISTS', key) == 1 then
    local n = redis.call('HINCRBY', key, 'n', 1)
    redis.call('HSET', key, 's', '2', 'l', lease_until)
    redis.call('ZADD', prefix .. 'l:' .. topic, lease_until, id)
    local f = redis.call('HMGET', key, 'p', 'a', 'r', 'e', 't', 'tr')
    table.insert(out, {id, f[1], f[2] or '', f[3], n, f[4], f[5], f[6]})
  end
end
return out
"""
)

FINISH = Script(
    _COMMON
    + """
local topic, id, attempt, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local status, err, record, final, counter = ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local key = jkey(topic, id)
if not leased(key, attempt) then return 0 end
redis.call('ZREM', prefix .. 'l:' .. topic, id)
redis.call('HDEL', key, 'l')
redis.call('HSET', key, 's', final, 'f', now, 'ls', status, 'le', err)
redis.call('ZADD', prefix .. (final == '4' and 'c:' or 'x:') .. topic, now, id)
redis.call('RPUSH', prefix .. 'h:' .. topic .. ':' .. id, record)
redis.call('HINCRBY', prefix .. 'n:' .. topic, counter, 1)
return 1
"""
)

RETRY = Script(
    _COMMON
    + """
local topic, id, attempt, now, run_at = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local spend, status, err, record = ARGV[7], ARGV[8], ARGV[9], ARGV[10]
local key = jkey(topic, id)
if not leased(key, attempt) then return 0 end
redis.call('ZREM', prefix .. 'l:' .. topic, id)
redis.call('HDEL', key, 'l')
if spend == '0' then redis.call('HINCRBY', key, 'n', -1) end
redis.call('HSET', key, 't', run_at, 'ls', status, 'le', err)
redis.call('RPUSH', prefix .. 'h:' .. topic .. ':' .. id, record)
redis.call('HINCRBY', prefix .. 'n:' .. topic, 'retried', 1)
if tonumber(run_at) > tonumber(now) then
  redis.call('HSET', key, 's', '1')
  redis.call('ZADD', prefix .. 'd:' .. topic, run_at, id)
  redis.call('PUBLISH', prefix .. 'wake', '~' .. topic)
  return 2
end
redis.call('HSET', key, 's', '0')
redis.call('RPUSH', prefix .. 'r:' .. topic .. ':' .. redis.call('HGET', key, 'r'), id)
redis.call('PUBLISH', prefix .. 'wake', topic)
return 1
"""
)

EXTEND = Script(
    _COMMON
    + """
local topic, id, attempt, lease_until = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local key = jkey(topic, id)
if not leased(key, attempt) then return 0 end
redis.call('HSET', key, 'l', lease_until)
redis.call('ZADD', prefix .. 'l:' .. topic, 'XX', lease_until, id)
return 1
"""
)

RELEASE = Script(
    _COMMON
    + """
local topic = ARGV[2]
local released = 0
for i = 3, #ARGV, 2 do
  local id, attempt = ARGV[i], ARGV[i + 1]
  local key = jkey(topic, id)
  if leased(key, attempt) then
    redis.call('ZREM', prefix .. 'l:' .. topic, id)
    redis.call('HDEL', key, 'l')
    redis.call('HINCRBY', key, 'n', -1)
    redis.call('HSET', key, 's', '0')
    -- to the front: these were next in line before the shutdown
    redis.call('LPUSH', prefix .. 'r:' .. topic .. ':' .. redis.call('HGET', key, 'r'), id)
    released = released + 1
  end
end
if released > 0 then redis.call('PUBLISH', prefix .. 'wake', topic) end
return released
"""
)

RECOVER = Script(
    _COMMON
    + """
local topic, now, max_attempts, limit = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local lkey = prefix .. 'l:' .. topic
local expired = redis.call('ZRANGEBYSCORE', lkey, '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
local count, dead = 0, 0
local reason = 'lease expired before an outcome was recorded'
for i = 1, #expired, 2 do
  local id, lease = expired[i], expired[i + 1]
  local key = jkey(topic, id)
  local n = tonumber(redis.call('HGET', key, 'n') or '0')
  redis.call('ZREM', lkey, id)
  redis.call('HDEL', key, 'l')
  redis.call('RPUSH', prefix .. 'h:' .. topic .. ':' .. id, cjson.encode(
    {n = n, s = tonumber(lease), d = 0, o = 'expired', e = reason}))
  redis.call('HSET', key, 'ls', '', 'le', reason)
  if n >= max_attempts then
    redis.call('HSET', key, 's', '3', 'f', now)
    redis.call('ZADD', prefix .. 'x:' .. topic, now, id)
    dead = dead + 1
  else
    redis.call('HSET', key, 's', '0')
    redis.call('RPUSH', prefix .. 'r:' .. topic .. ':' .. redis.call('HGET', key, 'r'), id)
  end
  count = count + 1
end
local counters = prefix .. 'n:' .. topic
if count > 0 then redis.call('HINCRBY', counters, 'expired', count) end
if dead > 0 then redis.call('HINCRBY', counters, 'dead', dead) end
if count > dead then redis.call('PUBLISH', prefix .. 'wake', topic) end
local first = redis.call('ZRANGE', lkey, 0, 0, 'WITHSCORES')
return {count, first[2] or ''}
"""
)

PROMOTE = Script(
    _COMMON
    + """
local topic, now, limit = ARGV[2], ARGV[3], ARGV[4]
local dkey = prefix .. 'd:' .. topic
local due = redis.call('ZRANGEBYSCORE', dkey, '-inf', now, 'LIMIT', 0, limit)
for _, id in ipairs(due) do
  local key = jkey(topic, id)
  redis.call('ZREM', dkey, id)
  redis.call('HSET', key, 's', '0')
  redis.call('RPUSH', prefix .. 'r:' .. topic .. ':' .. redis.call('HGET', key, 'r'), id)
end
if #due > 0 then redis.call('PUBLISH', prefix .. 'wake', topic) end
local first = redis.call('ZRANGE', dkey, 0, 0, 'WITHSCORES')
return {#due, first[2] or ''}
"""
)

PRUNE = Script(
    _COMMON
    + """
local topic, now, limit = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local removed = 0
local function drop(zkey, ids)
  for _, id in ipairs(ids) do
    redis.call('DEL', jkey(topic, id), prefix .. 'h:' .. topic .. ':' .. id)
    redis.call('ZREM', zkey, id)
    removed = removed + 1
  end
end
for k, letter in ipairs({'c', 'x'}) do
  local zkey = prefix .. letter .. ':' .. topic
  local max_count, max_age = tonumber(ARGV[3 + 2 * k]), tonumber(ARGV[4 + 2 * k])
  drop(zkey, redis.call('ZRANGEBYSCORE', zkey, '-inf', '(' .. (now - max_age), 'LIMIT', 0, limit))
  local extra = redis.call('ZCARD', zkey) - max_count
  if extra > 0 then drop(zkey, redis.call('ZRANGE', zkey, 0, math.min(extra, limit) - 1)) end
end
return removed
"""
)

REPLAY = Script(
    _COMMON
    + """
local topic, now = ARGV[2], ARGV[3]
local replayed = 0
for i = 4, #ARGV do
  local id = ARGV[i]
  local key = jkey(topic, id)
  if redis.call('HGET', key, 's') == '3' then
    redis.call('ZREM', prefix .. 'x:' .. topic, id)
    redis.call('HDEL', key, 'f')
    redis.call('HSET', key, 's', '0', 'n', 0, 't', now)
    redis.call('RPUSH', prefix .. 'r:' .. topic .. ':' .. redis.call('HGET', key, 'r'), id)
    replayed = replayed + 1
  end
end
if replayed > 0 then
  redis.call('HINCRBY', prefix .. 'n:' .. topic, 'replayed', replayed)
  redis.call('PUBLISH', prefix .. 'wake', topic)
end
return replayed
"""
)

DELETE = Script(
    _COMMON
    + """
local topic = ARGV[2]
local deleted = 0
for i = 3, #ARGV do
  if redis.call('HGET', jkey(topic, ARGV[i]), 's') == '3' then
    forget(topic, ARGV[i])
    deleted = deleted + 1
  end
end
return deleted
"""
)
