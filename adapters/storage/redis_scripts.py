"""The Lua scripts of the Redis store: every step that touches more than one key, atomically.

Keys of queue Q all start with ``bg:{Q}:`` (the prefix, ARGV[1]), so they share a hash slot
and every script runs unchanged on Redis Cluster; KEYS[1] is ``bg:{Q}:route``, a key of that
slot that no script writes, so the cluster routes the call (and, while the slot migrates, the
old node answers ASK for it: see ``redis_store.ROUTE``).  Layout, per topic T:

    J:T        hash   id -> the job as pushed, packed (``redis_store.pack_record``): priority
                      byte first, then enqueue and run times, trace id, attributes, payload
    S:T        hash   id -> "state|attempt|run_at|lease|finished_at|status|error", only
                      once the job has been reserved; a job without it is ready or delayed
                      (state 0 ready, 1 delayed, 2 leased, 3 dead, 4 done); a leased
                      one's lease is "lease_until/token" (Job.lease names it).  Its attempts
                      follow, one JSON object per line after a newline (the error of the
                      state line never holds one): one field per job, not a second hash,
                      because adding a field to a large hash costs several times as much
                      as replacing one
    r:T:<p>    list   ready ids of priority p, FIFO
    d:T        zset   delayed ids by run_at
    l:T        zset   leased ids by lease_until
    x:T / c:T  zset   dead / completed ids by finished_at
    n:T        hash   counters: pushed, done, retried, dead, expired, replayed
    n          hash   queue counters: unmatched
    topics     set    every topic pushes have named (PUSH adds them when RedisStore._register
                      says): PUSH looks for a producer's own id in each, those a reload
                      has removed too
    wake       channel  PUBLISHed topic names ("~T" for a delayed job) after a change

A pending job costs one hash field (its packed record) and one list entry: no key of its
own, which is what keeps Redis memory close to the payload size.
"""

from __future__ import annotations

from adapters.storage.redis_client import Script

_COMMON = """
local prefix = ARGV[1]
local function K(kind, topic) return prefix .. kind .. ':' .. topic end
-- A state: its fields, and h, the attempts ('' before the first).
local function get_state(topic, id)
  local v = redis.call('HGET', K('S', topic), id)
  if not v then return nil end
  local s, n, t, l, f, ls, le, h =
    string.match(v, '^(%d)|(%d*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^\\n]*)\\n?(.*)$')
  return {s = s, n = n, t = t, l = l, f = f, ls = ls, le = le, h = h}
end
local function put_state(topic, id, st)
  local line = st.s .. '|' .. st.n .. '|' .. st.t .. '|' .. st.l .. '|' .. st.f .. '|' .. st.ls
    .. '|' .. st.le
  redis.call('HSET', K('S', topic), id, st.h == '' and line or line .. '\\n' .. st.h)
end
local function new_state()
  return {s = '0', n = '0', t = '', l = '', f = '', ls = '', le = '', h = ''}
end
local function ready_list(topic, id)
  local record = redis.call('HGET', K('J', topic), id)
  return prefix .. 'r:' .. topic .. ':' .. string.byte(record, 1)
end
-- A lease is its job's state (leased, at this attempt) and the token its state's lease
-- field ends with ("lease_until/token"): a replay or a new push of a finished id numbers
-- attempts from 1 again, so the attempt alone would let a holder that outlived its lease
-- finish another delivery's.  In the state line, not a key of its own: no command more.
local function holds(lease, token)
  return token ~= '' and string.sub(lease, -#token - 1) == '/' .. token
end
local function leased(topic, id, attempt, token)
  local st = get_state(topic, id)
  if st and st.s == '2' and st.n == attempt and holds(st.l, token) then return st end
  return nil
end
local function add_attempt(st, record)
  st.h = st.h == '' and record or st.h .. '\\n' .. record
end
-- Variadic commands in pieces: Lua's unpack() stops at a few thousand values (LUAI_MAXCSTACK).
local UNPACK_STEP = 1000  -- even, so (field, value) and (score, member) pairs stay whole
local function call_many(command, key, list)
  for i = 1, #list, UNPACK_STEP do
    redis.call(command, key, unpack(list, i, math.min(i + UNPACK_STEP - 1, #list)))
  end
end
local function hmget_many(key, fields)
  local values = {}
  for i = 1, #fields, UNPACK_STEP do
    local last = math.min(i + UNPACK_STEP - 1, #fields)
    local part = redis.call('HMGET', key, unpack(fields, i, last))
    for k = i, last do values[k] = part[k - i + 1] end
  end
  return values
end
-- A leased job back to the front of its ready list, its attempt given back (unspent).
local function unlease(topic, id, st)
  redis.call('ZREM', K('l', topic), id)
  st.s, st.l, st.n = '0', '', tostring(tonumber(st.n) - 1)
  put_state(topic, id, st)
  redis.call('LPUSH', ready_list(topic, id), id)
end
local function forget(topic, id)
  redis.call('HDEL', K('J', topic), id)
  redis.call('HDEL', K('S', topic), id)
  redis.call('ZREM', K('x', topic), id)
  redis.call('ZREM', K('c', topic), id)
end
"""

PUSH = Script(
    _COMMON
    + """
-- The topics this call names, their count after a "+" when the queue's `topics` set must be
-- told them (RedisStore._register: the first push to each, and every minute).
local register = string.byte(ARGV[2], 1) == 43  -- "+"
local ntopics = tonumber(register and string.sub(ARGV[2], 2) or ARGV[2])
local all = {}
for k = 1, ntopics do all[k] = ARGV[2 + k] end
local i = 3 + ntopics
local njobs = tonumber(ARGV[i]); i = i + 1
local outcomes = {}  -- per job j: [2j-1] 0 stored, 1 duplicate, 2 unmatched; [2j] its copies
-- Whether every job was stored to every topic the call names, as nearly every push is: the
-- reply then leaves the outcomes out, two integers per job that both sides would convert.
local plain = true
local unmatched = 0
local ready, delayed, pushed = {}, {}, {}
-- Records and ready ids are written once per key at the end (variadic HSET and RPUSH);
-- `stored` remembers this batch's ids so a repeated explicit id is still a duplicate.
local records, queued, stored = {}, {}, {}
-- (topic, id) of each producer's own id stored again over a done job: what is left of that
-- job goes after the new one is written, not before.  Redis refuses a script for a full
-- memory (maxmemory) only at its first write, if that write is one that may grow it: an
-- HDEL first let every later write of an explicit-id push through a full Redis.
local replaced, nreplaced = {}, 0
-- Where a producer's own id may already be: the topics named here first, then every other
-- one the queue has had.  Read at the call's first such id: most pushes have none.
local known
local function known_topics()
  local seen, list = {}, {}
  for _, t in ipairs(all) do seen[t] = true; list[#list + 1] = t end
  for _, t in ipairs(redis.call('SMEMBERS', prefix .. 'topics')) do
    if not seen[t] then seen[t] = true; list[#list + 1] = t end
  end
  return list
end
-- Per job: id; its topics, "*" for all of them or a count followed by their names, after a
-- "!" if the id is the producer's own; the record, whose first byte is the priority; and
-- the time to run it, "" for at once.  Four arguments for the usual job: each one costs
-- both sides, and this loop runs per job.
for j = 1, njobs do
  local id, spec = ARGV[i], ARGV[i + 1]
  i = i + 2
  local explicit = string.byte(spec, 1) == 33  -- "!"
  if explicit then spec = string.sub(spec, 2) end
  local topics, nt
  if spec == '*' then
    topics, nt = all, ntopics
  else
    nt = tonumber(spec); topics = {}
    for k = 1, nt do topics[k] = ARGV[i]; i = i + 1 end
  end
  local record, run_at = ARGV[i], ARGV[i + 1]
  i = i + 2
  local prio = string.byte(record, 1)
  if nt == 0 then
    unmatched = unmatched + 1
    outcomes[2 * j - 1] = 2; outcomes[2 * j] = 0; plain = false
  else
    local dup = false
    if explicit then
      if stored[id] then
        dup = true
      else
        known = known or known_topics()
        for _, t in ipairs(known) do
          if redis.call('HEXISTS', K('J', t), id) == 1 then
            local st = get_state(t, id)
            -- pending (0 ready, 1 delayed, 2 leased) or dead (3): a dead letter waits for
            -- an operator, a producer's retry does not replace it
            if not st or st.s ~= '4' then dup = true; break end
          end
        end
      end
    end
    if dup then
      outcomes[2 * j - 1] = 1; outcomes[2 * j] = 0; plain = false
    else
      stored[id] = true
      local is_delayed = run_at ~= ''
      for _, t in ipairs(topics) do
        if explicit then
          nreplaced = nreplaced + 2; replaced[nreplaced - 1] = t; replaced[nreplaced] = id
        end
        local jobs_key = K('J', t)
        local pairs_of = records[jobs_key]
        if not pairs_of then pairs_of = {}; records[jobs_key] = pairs_of end
        local n = #pairs_of
        pairs_of[n + 1] = id; pairs_of[n + 2] = record
        if is_delayed then
          redis.call('ZADD', K('d', t), run_at, id); delayed[t] = true
        else
          local list = prefix .. 'r:' .. t .. ':' .. prio
          local ids = queued[list]
          if not ids then ids = {}; queued[list] = ids end
          ids[#ids + 1] = id; ready[t] = true
        end
        pushed[t] = (pushed[t] or 0) + 1
      end
      outcomes[2 * j - 1] = 0; outcomes[2 * j] = #topics
      if #topics ~= ntopics then plain = false end
    end
  end
end
if register then call_many('SADD', prefix .. 'topics', all) end
for key, pairs_of in pairs(records) do call_many('HSET', key, pairs_of) end
for list, ids in pairs(queued) do call_many('RPUSH', list, ids) end
for k = 1, nreplaced, 2 do  -- its record is replaced by the HSET above
  local t, id = replaced[k], replaced[k + 1]
  redis.call('HDEL', K('S', t), id)
  redis.call('ZREM', K('x', t), id)
  redis.call('ZREM', K('c', t), id)
end
for t, n in pairs(pushed) do redis.call('HINCRBY', K('n', t), 'pushed', n) end
if unmatched > 0 then redis.call('HINCRBY', prefix .. 'n', 'unmatched', unmatched) end
local ready_list, delayed_list = {}, {}
for t in pairs(ready) do
  table.insert(ready_list, t); redis.call('PUBLISH', prefix .. 'wake', t)
end
for t in pairs(delayed) do
  table.insert(delayed_list, t); redis.call('PUBLISH', prefix .. 'wake', '~' .. t)
end
if plain then outcomes = {} end
return {outcomes, ready_list, delayed_list}
"""
)

RESERVE = Script(
    _COMMON
    + """
-- One command per batch, not per job, for every step that can take many keys or members:
-- LPOP with a count, HMGET, and variadic HSET and ZADD.  Per-job work is Lua only, and
-- appends use a counter: table.insert costs 6x as much, several times per job.
local topic, lease_until, plan, token = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local jobs_key, states_key, leases_key = K('J', topic), K('S', topic), K('l', topic)
local ready_prefix = prefix .. 'r:' .. topic .. ':'
local wanted = {['0'] = 0, ['1'] = 0, ['2'] = 0}
for c = 1, #plan do
  local p = string.sub(plan, c, c)
  wanted[p] = wanted[p] + 1
end
-- The plan was made from counts that may have changed: what a priority lacks is taken from
-- the others, highest first.
local popped, short = {}, 0
for _, p in ipairs({'0', '1', '2'}) do
  popped[p] = wanted[p] > 0 and redis.call('LPOP', ready_prefix .. p, wanted[p]) or {}
  short = short + wanted[p] - #popped[p]
end
local spare = {}
for _, p in ipairs({'0', '1', '2'}) do
  if short == 0 then break end
  local more = redis.call('LPOP', ready_prefix .. p, short)
  if more then
    for _, id in ipairs(more) do table.insert(spare, id) end
    short = short - #more
  end
end
-- Ids in plan order; a stale duplicate of an id already taken is dropped.
local ids, nids, seen, next_of, next_spare = {}, 0, {}, {['0'] = 1, ['1'] = 1, ['2'] = 1}, 1
for c = 1, #plan do
  local p = string.sub(plan, c, c)
  local id = popped[p][next_of[p]]
  if id then
    next_of[p] = next_of[p] + 1
  else
    id = spare[next_spare]
    next_spare = next_spare + 1
  end
  if id and not seen[id] then
    seen[id] = true
    nids = nids + 1; ids[nids] = id
  end
end
local out, nout, lost = {}, 0, 0
if nids > 0 then
  local records = hmget_many(jobs_key, ids)
  local states = hmget_many(states_key, ids)
  local new_states, leases, npairs = {}, {}, 0
  local lease = lease_until .. '/' .. token
  for k = 1, nids do
    local id, record = ids[k], records[k]
    if not record then
      -- Ready, but its record is gone: evicted (an allkeys-* maxmemory-policy) or deleted
      -- outside busgate.  Nothing can be delivered; the caller says so.
      lost = lost + 1
    else
      local attempt, run_at, state = '1', '', '2|1||' .. lease .. '|||'
      if states[k] then  -- reserved before: keep its run_at and attempts, count one more
        local s, n, t, l, f, ls, rest = string.match(states[k],
          '^(%d)|(%d*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
        attempt, run_at = tostring((tonumber(n) or 0) + 1), t
        state = '2|' .. attempt .. '|' .. t .. '|' .. lease
          .. '|' .. f .. '|' .. ls .. '|' .. rest
      end
      npairs = npairs + 2
      new_states[npairs - 1] = id; new_states[npairs] = state
      leases[npairs - 1] = lease_until; leases[npairs] = id
      -- Flat (id, record, attempt, run_at, ...): a table per job costs more than the
      -- four values it holds, here and in the client's parser.
      out[nout + 1] = id; out[nout + 2] = record; out[nout + 3] = attempt
      out[nout + 4] = run_at; nout = nout + 4
    end
  end
  if npairs > 0 then
    call_many('HSET', states_key, new_states)
    call_many('ZADD', leases_key, leases)
  end
end
local counts = {}
for p = 0, 2 do counts[p + 1] = redis.call('LLEN', ready_prefix .. p) end
return {out, counts, lost}
"""
)

FINISH = Script(
    _COMMON
    + """
local topic, now = ARGV[2], ARGV[3]
local states_key, leases_key = K('S', topic), K('l', topic)
-- Per job: id, attempt, lease token, kind, tail ("status|error" of the state), attempt
-- record, and for the retry kinds run_at.  Every argument is a Lua string made on entry,
-- so there are no more than the script needs.  Appends use counters, as in RESERVE.
local ids, attempts, tokens, kinds, tails, records, run_ats, nids = {}, {}, {}, {}, {}, {}, {}, 0
local i, nargs = 4, #ARGV
while i <= nargs do
  nids = nids + 1
  ids[nids], attempts[nids], tokens[nids] = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  kinds[nids], tails[nids], records[nids] = ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
  if kinds[nids] == 'done' or kinds[nids] == 'dead' then
    i = i + 6
  else
    run_ats[nids] = ARGV[i + 6]; i = i + 7
  end
end
-- Read every state in one command; what this batch writes is kept in `states` too, so an
-- id finished twice in one batch sees its first finish.
local states = {}
local read_states = hmget_many(states_key, ids)
for k, id in ipairs(ids) do
  if states[id] == nil then states[id] = read_states[k] or '' end
end
local results = {}  -- one result per job: results[k] for the k-th
local unleased, nunleased = {}, 0
local finished_ids, nfinished = {c = {}, x = {}}, {c = 0, x = 0}
local counts = {done = 0, dead = 0, retried = 0}
-- Retries, written after the leases are removed: Redis refuses a script for a full memory
-- (maxmemory) at its first write only, if that may grow it.  A ZREM first, outcomes are
-- recorded in a full Redis too: refused, each job was delivered again at its lease's end.
local delayed, ndelayed, ready, nready = {}, 0, {}, 0
for k = 1, nids do
  local id, attempt, kind, record = ids[k], attempts[k], kinds[k], records[k]
  -- Only state, attempt and run_at survive a finish (the lease names its holder): parse
  -- those, not the whole string.
  local state, n, t, lease = string.match(states[id], '^(%d)|(%d*)|([^|]*)|([^|]*)|')
  if state ~= '2' or n ~= attempt or not holds(lease, tokens[k]) then
    results[k] = 0
  else
    nunleased = nunleased + 1; unleased[nunleased] = id
    -- The attempts so far follow the state line; this one goes last.
    local newline = string.find(states[id], '\\n', 1, true)
    local history = newline and string.sub(states[id], newline) .. '\\n' .. record
      or '\\n' .. record
    local new_state, finished = '', ''
    if kind == 'retry' or kind == 'retry-unspent' then
      if kind == 'retry-unspent' then n = tostring(tonumber(n) - 1) end
      local run_at = run_ats[k]
      t = run_at
      if tonumber(run_at) > tonumber(now) then
        new_state = '1'
        ndelayed = ndelayed + 2; delayed[ndelayed - 1] = run_at; delayed[ndelayed] = id
        results[k] = 2
      else
        new_state = '0'
        nready = nready + 2; ready[nready - 1] = ready_list(topic, id); ready[nready] = id
        results[k] = 1
      end
      counts.retried = counts.retried + 1
    else
      new_state, finished = (kind == 'done') and '4' or '3', now
      local letter = (kind == 'done') and 'c' or 'x'
      local m = nfinished[letter] + 2
      nfinished[letter] = m
      finished_ids[letter][m - 1] = now; finished_ids[letter][m] = id
      counts[kind] = counts[kind] + 1
      results[k] = 3
    end
    -- A second finish of this id in the batch now fails the check above: ids in
    -- `unleased` are distinct.
    -- One concatenation, no table: this runs once per job.
    states[id] = new_state .. '|' .. n .. '|' .. t .. '||' .. finished .. '|' .. tails[k]
      .. history
  end
end
if nunleased > 0 then
  call_many('ZREM', leases_key, unleased)
  local state_pairs = {}
  for j = 1, nunleased do
    local id = unleased[j]
    state_pairs[2 * j - 1] = id; state_pairs[2 * j] = states[id]
  end
  call_many('HSET', states_key, state_pairs)
  for letter, members in pairs(finished_ids) do
    call_many('ZADD', K(letter, topic), members)
  end
  if ndelayed > 0 then call_many('ZADD', K('d', topic), delayed) end
  for k = 1, nready, 2 do redis.call('RPUSH', ready[k], ready[k + 1]) end
end
for name, count in pairs(counts) do
  if count > 0 then redis.call('HINCRBY', K('n', topic), name, count) end
end
if nready > 0 then redis.call('PUBLISH', prefix .. 'wake', topic) end
if ndelayed > 0 then redis.call('PUBLISH', prefix .. 'wake', '~' .. topic) end
return results
"""
)

EXTEND = Script(
    _COMMON
    + """
local topic, id, attempt, token, lease_until = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local st = leased(topic, id, attempt, token)
if not st then return 0 end
-- Removed and added again, not ZADD XX: Redis refuses a script for a full memory at its
-- first write only, if that may grow it.  Refused, a long delivery's lease ran out in a
-- full Redis and RECOVER (a ZREM first) handed the job out again while it ran.
redis.call('ZREM', K('l', topic), id)
redis.call('ZADD', K('l', topic), lease_until, id)
st.l = lease_until .. '/' .. token
put_state(topic, id, st)
return 1
"""
)

RELEASE = Script(
    _COMMON
    + """
local topic = ARGV[2]
local released = 0
-- Last first: each goes to the front, so the first given back ends up first in line.
for i = #ARGV - 2, 3, -3 do  -- (id, attempt, token) per job
  local id = ARGV[i]
  local st = leased(topic, id, ARGV[i + 1], ARGV[i + 2])
  if st then  -- to the front: these were next in line before they were given back
    unlease(topic, id, st)
    released = released + 1
  end
end
if released > 0 then redis.call('PUBLISH', prefix .. 'wake', topic) end
return released
"""
)

UNRESERVE = Script(
    _COMMON
    + """
-- What reserves whose answer never came took: (lease_until, token) per reserve, as RESERVE
-- stamped them.  Nobody holds those leases; their jobs go back unspent.  A reserve's jobs
-- share its lease_until, so the lease zset finds them without a scan.
local topic = ARGV[2]
local released = 0
for i = 3, #ARGV - 1, 2 do
  local lease_until, token = ARGV[i], ARGV[i + 1]
  local ids = redis.call('ZRANGEBYSCORE', K('l', topic), lease_until, lease_until)
  for k = #ids, 1, -1 do  -- to the front in id order: their order went with the answer
    local st = get_state(topic, ids[k])
    if st and st.s == '2' and holds(st.l, token) then
      unlease(topic, ids[k], st)
      released = released + 1
    end
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
local lkey = K('l', topic)
local expired = redis.call('ZRANGEBYSCORE', lkey, '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
local count, dead = 0, 0
local reason = 'lease expired before an outcome was recorded'
local jobs = {}  -- id, attempt, 1 if dead: for the daemon's log
for i = 1, #expired, 2 do
  local id, lease = expired[i], expired[i + 1]
  local st = get_state(topic, id) or new_state()
  local n = tonumber(st.n) or 0
  redis.call('ZREM', lkey, id)
  local expiry = {n = n, s = tonumber(lease), d = 0, o = 'expired', e = reason}
  add_attempt(st, cjson.encode(expiry))
  st.l, st.ls, st.le = '', '', reason
  if n >= max_attempts then
    st.s, st.f = '3', now
    redis.call('ZADD', K('x', topic), now, id)
    dead = dead + 1
  else
    st.s = '0'
    redis.call('RPUSH', ready_list(topic, id), id)
  end
  put_state(topic, id, st)
  count = count + 1
  jobs[3 * count - 2], jobs[3 * count - 1], jobs[3 * count] = id, n, n >= max_attempts and 1 or 0
end
if count > 0 then redis.call('HINCRBY', K('n', topic), 'expired', count) end
if dead > 0 then redis.call('HINCRBY', K('n', topic), 'dead', dead) end
if count > dead then redis.call('PUBLISH', prefix .. 'wake', topic) end
local first = redis.call('ZRANGE', lkey, 0, 0, 'WITHSCORES')
return {count, first[2] or '', jobs}
"""
)

PROMOTE = Script(
    _COMMON
    + """
local topic, now, limit = ARGV[2], ARGV[3], ARGV[4]
local dkey = K('d', topic)
local due = redis.call('ZRANGEBYSCORE', dkey, '-inf', now, 'LIMIT', 0, limit)
for _, id in ipairs(due) do
  redis.call('ZREM', dkey, id)
  local st = get_state(topic, id)
  if st then st.s = '0'; put_state(topic, id, st) end
  redis.call('RPUSH', ready_list(topic, id), id)
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
local function drop(ids)
  for _, id in ipairs(ids) do forget(topic, id); removed = removed + 1 end
end
for k, letter in ipairs({'c', 'x'}) do
  local zkey = K(letter, topic)
  local max_count, max_age = tonumber(ARGV[3 + 2 * k]), tonumber(ARGV[4 + 2 * k])
  drop(redis.call('ZRANGEBYSCORE', zkey, '-inf', '(' .. (now - max_age), 'LIMIT', 0, limit))
  local extra = redis.call('ZCARD', zkey) - max_count
  if extra > 0 then drop(redis.call('ZRANGE', zkey, 0, math.min(extra, limit) - 1)) end
end
return removed
"""
)

DEAD_SCAN = Script(
    _COMMON
    + """
-- Up to ARGV[3] dead ids with their finished_at, newest first (finished_at, then id, both
-- descending: the order ZREVRANGEBYSCORE gives), after the page that ended at finished_at
-- ARGV[4] with id ARGV[5] when those are given.  The ids that share that finished_at and
-- sort at or above the page's last were on it: they are skipped by count, so a millisecond
-- that more jobs died in than one scan reads is still paged through.
local key, limit = K('x', ARGV[2]), ARGV[3]
local top, skip = '+inf', 0
if ARGV[4] then
  top = ARGV[4]
  local after = ARGV[5]
  -- Byte order, as a sorted set orders its members: Lua's < on strings follows the
  -- server's collation locale.
  local function below(id)
    for i = 1, math.min(#id, #after) do
      local a, b = string.byte(id, i), string.byte(after, i)
      if a ~= b then return a < b end
    end
    return #id < #after
  end
  for _, id in ipairs(redis.call('ZREVRANGEBYSCORE', key, top, top)) do
    if below(id) then break end
    skip = skip + 1
  end
end
return redis.call('ZREVRANGEBYSCORE', key, top, '-inf', 'WITHSCORES', 'LIMIT', skip, limit)
"""
)

REPLAY = Script(
    _COMMON
    + """
local topic, now = ARGV[2], ARGV[3]
local replayed = 0
for i = 4, #ARGV do
  local id = ARGV[i]
  local st = get_state(topic, id)
  if st and st.s == '3' then
    redis.call('ZREM', K('x', topic), id)
    st.s, st.n, st.t, st.f = '0', '0', now, ''
    put_state(topic, id, st)
    redis.call('RPUSH', ready_list(topic, id), id)
    replayed = replayed + 1
  end
end
if replayed > 0 then
  redis.call('HINCRBY', K('n', topic), 'replayed', replayed)
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
  local st = get_state(topic, ARGV[i])
  if st and st.s == '3' then
    forget(topic, ARGV[i])
    deleted = deleted + 1
  end
end
return deleted
"""
)

CHECK = Script(
    """
-- At start: every command the other scripts and the store's pipelines run, on keys of this
-- script's own (``bg:{~check}:probe:*``: no queue name holds a ``~``), each in a pcall so that
-- one refused does not hide the next.  Nothing is left behind: a write is tried only once
-- the command that undoes it was allowed (tried first, on a key that does not exist).
-- Returns (command, error) pairs: what Redis refused.
local prefix = ARGV[1]
local h, l, z = prefix .. 'probe:h', prefix .. 'probe:l', prefix .. 'probe:z'
local refused, n = {}, 0
local function try(...)
  local reply = redis.pcall(...)
  if type(reply) == 'table' and reply.err then
    refused[n + 1] = (...); refused[n + 2] = reply.err; n = n + 2
    return false
  end
  return true
end
try('HGET', h, 'f'); try('HEXISTS', h, 'f'); try('HMGET', h, 'f'); try('HGETALL', h)
if try('HDEL', h, 'f') then
  if try('HSET', h, 'f', '1') then
    -- SADD on the hash: a user who may run it is refused for the key's type (WRONGTYPE),
    -- which the caller ignores, and nothing is added.
    try('SADD', h, 'm')
  end
  try('HINCRBY', h, 'f', '1')
  try('HDEL', h, 'f')
end
try('LLEN', l)
if try('LPOP', l, 2) then
  try('RPUSH', l, 'a'); try('LPUSH', l, 'b'); try('LPOP', l, 2)
end
try('ZSCORE', z, 'a'); try('ZCARD', z); try('ZRANGE', z, 0, 0)
try('ZRANGEBYSCORE', z, '-inf', '+inf'); try('ZREVRANGEBYSCORE', z, '+inf', '-inf')
if try('ZREM', z, 'a') then
  try('ZADD', z, 0, 'a'); try('ZREM', z, 'a')
end
try('SMEMBERS', prefix .. 'probe:s')
-- Every daemon hears this: busgate's wake-up handler rings no waiting dispatcher for it.
try('PUBLISH', prefix .. 'wake', '')
return refused
"""
)
