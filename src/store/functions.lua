#!lua name=freeroam
-- free-roam's Redis functions: every operation of the contract that must be atomic.
-- Each function takes exactly one key, a hash tag, and derives the key names from it, so it
-- touches one Cluster slot only. The queue's functions take the deployment's tag (`{fr}` by
-- default); fr_job_end takes one job's tag (`{fr:<job_id>}`), where its results and progress
-- live. A job's end spans both slots: the end entry is written first, then the queue entry
-- is acked, and each step is safe to repeat. Workers load this library with FUNCTION LOAD
-- REPLACE at start, the CLI when a call finds it missing; see docs/redis-contract.md.

local GROUP = 'workers'
local TERMINAL = { completed = true, failed = true, cancelled = true, dead = true }
local MAX_PROMPT_BYTES = 8192
-- A job id as the worker accepts it (`job::validate_job_id`, which owns the rule; a test
-- there checks this copy): 1 to MAX_JOB_ID_LEN letters, digits, '.', '_', ':' and '-'.
local MAX_JOB_ID_LEN = 128
-- How many of the entries no worker has read yet fr_cancel looks through for a job id it
-- has no hash for: bounded whatever the backlog (a job queued with fr_submit has its hash
-- from the start and is found at any depth).
local CANCEL_SCAN_LIMIT = 500
-- Leases are per worker: each worker renews one member of `{fr}:workers:alive` (score: its
-- deadline) per tick, and the entries it owns are kept in its own set `{fr}:owned:<worker>`.
-- A reclaim pass declares at most OVERDUE_PER_PASS overdue workers dead: their entries move
-- to `{fr}:orphans`, which the passes then take from.
local OVERDUE_PER_PASS = 8
-- Entries no registered worker owns (read by a worker that died before its claim, or owned
-- by a worker of a version without leases) are found by a sweep of the pending list: at most
-- SWEEP_ROWS rows, at most once per SWEEP_EVERY_MS for the whole fleet, from where the last
-- sweep stopped.
local SWEEP_ROWS = 100
local SWEEP_EVERY_MS = 1000
-- Every worker process is a consumer of the group. At most once per
-- CONSUMER_PRUNE_EVERY_MS for the whole fleet, a reclaim pass deletes the consumers that own
-- no entry, hold no lease and have been idle past `consumer_idle_ms` ({fr}:settings, 10
-- minutes by default): a crash-looping worker adds consumers, this takes them away.
local CONSUMER_PRUNE_EVERY_MS = 60000
-- Wake-ups that spare the workers a fast tick each (docs/redis-contract.md, "Leases"):
-- fr_cancel pushes a running job's id onto its worker's list `{fr}:wake:<worker>`, and
-- hand-backs and reclaim passes that leave orphans top `{fr}:orphans:wake` up to one token
-- per orphan waiting (at most WAKE_MAX); workers wait on both with BLPOP. A wake-up nobody pops expires after
-- WAKE_TTL_S: the ticks find the same work anyway, only later.
local WAKE_MAX = 64
local WAKE_TTL_S = 60
-- The entry fields a job hash shows as they came. The Rust side owns this list
-- (`JobField::in_hash` in src/job/mod.rs); a test there checks this copy against it.
local HASH_FIELDS = { 'stream_ref', 'source', 'fps', 'prompt', 'max_frames', 'max_duration_s' }
local IS_HASH_FIELD = {}
for i = 1, #HASH_FIELDS do IS_HASH_FIELD[HASH_FIELDS[i]] = true end

-- The clock and the fleet's settings are read at most once per call: every registered
-- function is wrapped in `per_call`, which forgets both when a call starts.
local call_now, call_settings = nil, {}

local function per_call(f)
  return function(keys, args)
    call_now, call_settings = nil, {}
    return f(keys, args)
  end
end

local function now_ms()
  if not call_now then
    local t = redis.call('TIME')
    call_now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return call_now
end

-- Fleet-wide settings a worker publishes at start; user-called functions read them too.
local SETTINGS = { 'events_maxlen', 'result_ttl_s', 'dead_maxlen', 'consumer_idle_ms',
  'prompt_history_max' }
local function setting(tag, name, default)
  local known = call_settings[tag]
  if not known then
    local v = redis.call('HMGET', tag .. ':settings', unpack(SETTINGS))
    known = {}
    for i = 1, #SETTINGS do known[SETTINGS[i]] = tonumber(v[i]) end
    call_settings[tag] = known
  end
  local v = known[name]
  if v then return v end
  return default
end

local function event(tag, job_id, from, to, worker, err, entry_id)
  local args = { tag .. ':events', 'MAXLEN', '~', setting(tag, 'events_maxlen', 10000), '*',
    'kind', 'job', 'job_id', job_id, 'from', from or '', 'to', to, 'worker', worker or '',
    'time_ms', now_ms() }
  if entry_id and entry_id ~= '' then
    table.insert(args, 'entry_id'); table.insert(args, entry_id)
  end
  if err and err ~= '' then
    table.insert(args, 'error'); table.insert(args, err)
  end
  redis.call('XADD', unpack(args))
end

local function alive_key(tag) return tag .. ':workers:alive' end
local function owned_key(tag, worker) return tag .. ':owned:' .. worker end
local function cancel_key(tag, worker) return tag .. ':cancel:' .. worker end
local function orphans_key(tag) return tag .. ':orphans' end
local function wake_key(tag, worker) return tag .. ':wake:' .. worker end
local function orphans_wake_key(tag) return tag .. ':orphans:wake' end

-- Wakes waiting workers to run a reclaim pass now: tops the tokens up to one per orphan
-- waiting, at most WAKE_MAX.
local function wake_for_orphans(tag)
  local k = orphans_wake_key(tag)
  local want = redis.call('ZCARD', orphans_key(tag))
  if want > WAKE_MAX then want = WAKE_MAX end
  local n = want - redis.call('LLEN', k)
  if n < 1 then return end
  local tokens = {}
  for i = 1, n do tokens[i] = '1' end
  redis.call('RPUSH', k, unpack(tokens))
  redis.call('EXPIRE', k, WAKE_TTL_S)
end
-- Entries of jobs cancelled while queued (entry id -> job id), until a worker acks them:
-- what a worker reads after the job's hash expired is still known as cancelled.
local function cancelled_key(tag) return tag .. ':jobs:cancelled' end

-- Acks and deletes an entry `owner` holds, and drops it from the owner's set (and from the
-- orphans: an owner declared dead may still end the job before anyone took it).
local function ack_and_delete(tag, entry_id, owner)
  redis.call('XACK', tag .. ':jobs', GROUP, entry_id)
  redis.call('XDEL', tag .. ':jobs', entry_id)
  redis.call('SREM', owned_key(tag, owner), entry_id)
  redis.call('ZREM', orphans_key(tag), entry_id)
  redis.call('HDEL', cancelled_key(tag), entry_id)
end

-- Moves a job's hash to a terminal state: status, expiry, event; with `unless_final`, a job
-- already final keeps its status. The end entry lives in the job's own slot (fr_job_end)
-- and the queue entry is acked separately, by the caller.
local function finalize(tag, job_id, status, err, worker, unless_final)
  local jk = tag .. ':job:' .. job_id
  local v = redis.call('HMGET', jk, 'status', 'entry_id', 'cancel_requested')
  if unless_final and TERMINAL[v[1]] then return end
  local now = now_ms()
  local fields = { 'status', status, 'finished_ms', now, 'updated_ms', now }
  -- The worker that ended it, so that a repeated fr_job_finish can tell its own end apart.
  if worker and worker ~= '' then
    table.insert(fields, 'worker'); table.insert(fields, worker)
  end
  if err and err ~= '' then
    table.insert(fields, 'error'); table.insert(fields, err)
  end
  redis.call('HSET', jk, unpack(fields))
  if v[3] then redis.call('HDEL', jk, 'cancel_requested') end
  redis.call('EXPIRE', jk, setting(tag, 'result_ttl_s', 86400))
  event(tag, job_id, v[1] or 'queued', status, worker, err, v[2])
end

-- The reply that tells a worker the job is final in the queue's slot: it writes the end
-- entry (fr_job_end) and then acks the entry (fr_job_ack). A worker that dies in between
-- leaves the entry pending; the next claim answers 'finished' and the two steps repeat.
local function final_reply(verdict, jk, extra)
  local v = redis.call('HMGET', jk, 'status', 'error')
  return { verdict, v[1] or '', v[2] or '', extra or '' }
end

-- Sets hash fields from a flat {name, value, ...} argument list starting at `first`.
local function hset_from(jk, args, first)
  if #args >= first + 1 then
    local fields = {}
    for i = first, #args do table.insert(fields, args[i]) end
    redis.call('HSET', jk, unpack(fields))
  end
end

-- Records that a worker called in (renewed leases or looked for work), and returns how much
-- longer than the lease an entry must now have been idle to be reclaimed: 0, or during a
-- hold the silence that started it. Every live worker calls in at least once per quiet_ms,
-- so a longer gap in which nobody did means the server was away (restarting, paused,
-- unreachable) or every worker was gone. For one lease after such a gap only entries idle
-- for longer than the gap plus a lease are taken: those whose owner was gone before the
-- silence (handed back, dead). Live owners renew theirs meanwhile, so an outage costs no
-- job an attempt.
-- `seen_ms` is written at most once per SEEN_EVERY_MS, so that most of a large fleet's calls
-- only read it: a gap then reads at most that much longer, far below any quiet_ms. Also
-- returns when the fleet last swept and pruned (`swept_ms`, `consumers_ms`), read in the
-- same HMGET for reclaim_due, and who holds the sweeper's role until when, for
-- take_sweeper.
local SEEN_EVERY_MS = 100
local function fleet_call_in(tag, quiet_ms, lease_ms)
  local k = tag .. ':fleet'
  local now = now_ms()
  local v = redis.call('HMGET', k, 'seen_ms', 'reclaim_after_ms', 'last_gap_ms', 'swept_ms',
    'consumers_ms', 'sweeper', 'sweeper_until_ms')
  local seen, after, gap = tonumber(v[1]), tonumber(v[2]) or 0, tonumber(v[3]) or 0
  if seen and now - seen > quiet_ms then
    gap = now - seen
    after = now + lease_ms
    redis.call('HSET', k, 'seen_ms', now, 'reclaim_after_ms', after, 'last_gap_ms', gap)
  elseif not seen or now - seen >= SEEN_EVERY_MS or now < seen then
    redis.call('HSET', k, 'seen_ms', now)
  end
  local last = { tonumber(v[4]), tonumber(v[5]), v[6], tonumber(v[7]) }
  if now < after then return gap, last end
  return 0, last
end

local function owner_of(tag, entry_id)
  local p = redis.call('XPENDING', tag .. ':jobs', GROUP, entry_id, entry_id, 1)
  if #p == 0 then return nil, 0 end
  return p[1][2], tonumber(p[1][4])
end

-- Whether a job whose entry is no longer pending still runs on `worker`: its hash says
-- running there, under this entry. That is a running job whose entry a producer trimmed
-- (`XADD ... MAXLEN`, `XTRIM`, `XDEL`): it carries on and ends as usual.
local function runs_unpending(jk, entry_id, worker)
  local v = redis.call('HMGET', jk, 'status', 'worker', 'entry_id')
  return v[1] == 'running' and v[2] == worker and v[3] == entry_id
end

-- fr_submit KEY=tag ARGV: job_id, field, value, ... (the job entry's fields)
-- Queues a job atomically: refuses a job_id the worker would refuse or one already known, writes the queued hash, adds the
-- entry. Returns the entry id.
local function fr_submit(keys, args)
  local tag, job_id = keys[1], args[1]
  if not job_id or #job_id == 0 or #job_id > MAX_JOB_ID_LEN or job_id:find('[^%w%._:%-]') then
    return redis.error_reply('ERR job_id must be 1 to ' .. MAX_JOB_ID_LEN ..
      " characters, only letters, digits, '.', '_', ':' and '-'")
  end
  local jk = tag .. ':job:' .. job_id
  if redis.call('EXISTS', jk) == 1 then
    return redis.error_reply('JOBEXISTS job_id ' .. job_id .. ' already exists (status ' ..
      (redis.call('HGET', jk, 'status') or '?') .. ')')
  end
  local fields = { 'job_id', job_id }
  for i = 2, #args do table.insert(fields, args[i]) end
  local entry_id = redis.call('XADD', tag .. ':jobs', '*', unpack(fields))
  local now = now_ms()
  local hash = { 'status', 'queued', 'entry_id', entry_id, 'created_ms', now,
    'updated_ms', now, 'attempts', 0, 'handoffs', 0 }
  for i = 2, #args, 2 do
    if IS_HASH_FIELD[args[i]] then
      table.insert(hash, args[i]); table.insert(hash, args[i + 1])
    end
  end
  redis.call('HSET', jk, unpack(hash))
  redis.call('ZADD', tag .. ':jobs:index', now, job_id)
  event(tag, job_id, '', 'queued', '', nil, entry_id)
  return entry_id
end

-- One entry of fr_job_claim: `fields` are the spec's hash fields as this worker read it
-- (field, value, ...). Decides whether the entry runs, and records it. Returns
-- {verdict, ...}:
--   {'run', attempt}  run it; where to resume is in the job's progress hash (its own slot)
--   {'lost'}      another worker owns the entry now
--   {'gone'}      the entry is no longer pending (already finished)
--   {'duplicate', status} the job_id belongs to another entry; this one was dropped
-- and, with the entry left pending for the end entry and the ack (see final_reply):
--   {'finished', status, error, ''}  the job had ended already (a cancel while queued, or
--                 a worker that stopped between its end entry and its ack)
--   {'cancelled', 'cancelled', '', ''}  cancelled before it ran
--   {'dead', 'dead', error, attempts}   delivered too often; moved to the dead-letter stream
local function claim_one(tag, worker, max_attempts, entry_id, job_id, fields)
  local jk = tag .. ':job:' .. job_id
  local owner, deliveries = owner_of(tag, entry_id)
  if not owner then return { 'gone' } end
  if owner ~= worker then return { 'lost' } end
  -- Owned from now until its ack or hand-back, whatever the verdict.
  redis.call('SADD', owned_key(tag, worker), entry_id)

  -- Every job hash has a status or an entry id from the moment it is written.
  local h = redis.call('HMGET', jk, 'status', 'entry_id', 'cancel_requested', 'handoffs',
    'started_ms')
  local status, known_entry = h[1] or nil, h[2] or nil
  local exists = (status or known_entry) ~= nil
  if not exists and redis.call('HEXISTS', cancelled_key(tag), entry_id) == 1 then
    -- Cancelled while queued, and its hash expired since: cancelled again, never run.
    redis.call('HSET', jk, 'entry_id', entry_id, 'created_ms', now_ms(), 'status', 'queued')
    hset_from(jk, fields, 1)
    finalize(tag, job_id, 'cancelled', nil, worker)
    return final_reply('cancelled', jk)
  end
  if exists then
    if known_entry and known_entry ~= entry_id then
      ack_and_delete(tag, entry_id, worker)
      event(tag, job_id, '', 'rejected', worker,
        'duplicate job_id: ' .. job_id .. ' already belongs to entry ' .. known_entry, entry_id)
      return { 'duplicate', status or '' }
    end
    if TERMINAL[status] then
      return final_reply('finished', jk)
    end
    if h[3] == '1' then
      finalize(tag, job_id, 'cancelled', nil, worker)
      return final_reply('cancelled', jk)
    end
  end

  local handoffs = tonumber(h[4] or '0') or 0
  local attempt = deliveries - handoffs
  if attempt < 1 then attempt = 1 end
  if attempt > max_attempts then
    if not exists then
      redis.call('HSET', jk, 'entry_id', entry_id, 'created_ms', now_ms())
      hset_from(jk, fields, 1)
      redis.call('ZADD', tag .. ':jobs:index', now_ms(), job_id)
    end
    local last = redis.call('HGET', jk, 'error') or 'the worker running it stopped without finishing'
    local err = 'delivered ' .. (attempt - 1) .. ' times without finishing (MAX_ATTEMPTS=' ..
      max_attempts .. '); last error: ' .. last
    -- Capped like the events: an operator may set `dead_maxlen` in {fr}:settings.
    local dead = { tag .. ':jobs:dead', 'MAXLEN', '~', setting(tag, 'dead_maxlen', 10000), '*',
      'job_id', job_id, 'entry_id', entry_id,
      'attempts', attempt - 1, 'error', err, 'time_ms', now_ms() }
    local entry = redis.call('XRANGE', tag .. ':jobs', entry_id, entry_id)
    if #entry == 1 then
      local f = entry[1][2]
      for i = 1, #f, 2 do
        table.insert(dead, 'field:' .. f[i]); table.insert(dead, f[i + 1])
      end
    end
    redis.call('XADD', unpack(dead))
    finalize(tag, job_id, 'dead', err, worker)
    return final_reply('dead', jk, attempt - 1)
  end

  local now = now_ms()
  -- The spec as this worker read it (defaults applied; the same on every delivery), then
  -- the lifecycle's fields, in one write.
  local hash = {}
  for i = 1, #fields do table.insert(hash, fields[i]) end
  if not exists then
    for _, f in ipairs({ 'entry_id', entry_id, 'created_ms', now, 'handoffs', 0 }) do
      table.insert(hash, f)
    end
    redis.call('ZADD', tag .. ':jobs:index', now, job_id)
    status = 'queued'
  end
  if not h[5] then
    table.insert(hash, 'started_ms'); table.insert(hash, now)
  end
  for _, f in ipairs({ 'status', 'running', 'worker', worker, 'attempts', attempt,
    'updated_ms', now }) do
    table.insert(hash, f)
  end
  redis.call('HSET', jk, unpack(hash))
  event(tag, job_id, status, 'running', worker, nil, entry_id)
  return { 'run', attempt }
end

-- fr_job_claim KEY=tag ARGV: worker, max_attempts, then for each entry: entry_id, job_id,
-- n, and n items of its spec's hash fields (field, value, ...).
-- Called by the worker that just received the entries (one read, new or reclaimed), in the
-- order it read them, so that of two entries naming one job_id the first wins. Returns one
-- verdict per entry, in order (claim_one).
local function fr_job_claim(keys, args)
  local tag, worker, max_attempts = keys[1], args[1], tonumber(args[2])
  if not max_attempts then
    return redis.error_reply('ERR fr_job_claim: max_attempts is not a number')
  end
  -- Every entry's arguments are read before any is claimed: a bad call writes nothing.
  local entries, i = {}, 3
  while i <= #args do
    local n = tonumber(args[i + 2])
    if not n or n % 2 == 1 or i + 2 + n > #args then
      return redis.error_reply('ERR fr_job_claim: entry ' .. tostring(args[i]) ..
        ' has a bad field count ' .. tostring(args[i + 2]))
    end
    local fields = {}
    for j = i + 3, i + 2 + n do table.insert(fields, args[j]) end
    table.insert(entries, { args[i], args[i + 1], fields })
    i = i + 3 + n
  end
  local out = {}
  for _, e in ipairs(entries) do
    table.insert(out, claim_one(tag, worker, max_attempts, e[1], e[2], e[3]))
  end
  return out
end

-- fr_job_reject KEY=tag ARGV: entry_id, worker, job_id, error, field, value, ...
-- Ends a malformed entry's job as failed with the reason. Returns final_reply('failed'): the
-- caller writes the end entry and acks. 'duplicate' (entry dropped at once) when the job_id
-- belongs to another entry.
local function fr_job_reject(keys, args)
  local tag, entry_id, worker, job_id, err = keys[1], args[1], args[2], args[3], args[4]
  local jk = tag .. ':job:' .. job_id
  local known_entry = redis.call('HGET', jk, 'entry_id')
  if known_entry and known_entry ~= entry_id then
    ack_and_delete(tag, entry_id, worker)
    event(tag, job_id, '', 'rejected', worker, err, entry_id)
    return 'duplicate'
  end
  if owner_of(tag, entry_id) == worker then
    redis.call('SADD', owned_key(tag, worker), entry_id)
  end
  local now = now_ms()
  if not TERMINAL[redis.call('HGET', jk, 'status')] then
    redis.call('HSET', jk, 'entry_id', entry_id, 'created_ms', now, 'worker', worker,
      'attempts', 1)
    hset_from(jk, args, 5)
    redis.call('ZADD', tag .. ':jobs:index', now, job_id)
    finalize(tag, job_id, 'failed', err, worker)
  end
  return final_reply('failed', jk)
end

-- Whether a reclaim pass would find anything now: the fleet's sweep or consumer prune due
-- (`last`: when each last ran, from fleet_call_in), a worker whose deadline is older than
-- `before` (as bury_overdue asks, one member at most), or an orphan. What a worker's tick
-- answers, so that it skips the passes that would find nothing.
local function reclaim_due(tag, before, last)
  local now = now_ms()
  if not last[1] or now - last[1] >= SWEEP_EVERY_MS or now < last[1] then return 1 end
  if not last[2] or now - last[2] >= CONSUMER_PRUNE_EVERY_MS or now < last[2] then return 1 end
  if #redis.call('ZRANGEBYSCORE', alive_key(tag), '-inf', '(' .. before, 'LIMIT', 0, 1) > 0 then
    return 1
  end
  return redis.call('EXISTS', orphans_key(tag))
end

-- The sweeper's role (`sweeper`, `sweeper_until_ms` in `{fr}:fleet`): one worker of the
-- fleet ticks every second, so that a tick checks for overdue workers at least once a
-- second (the takeover bound), while the others tick less often. The role goes to the first
-- worker to tick after it lapsed (hold_ms after its holder's last tick), and its holder
-- keeps it with each tick. Whether `worker` holds it now.
local function take_sweeper(tag, worker, hold_ms, last)
  local now = now_ms()
  local holder, until_ms = last[3], last[4]
  if holder ~= worker and holder and until_ms and now < until_ms then return false end
  redis.call('HSET', tag .. ':fleet', 'sweeper', worker, 'sweeper_until_ms', now + hold_ms)
  return true
end

-- fr_worker_tick KEY=tag ARGV: worker, quiet_ms, lease_ms, [`due` | `sweep` hold_ms], then
-- registry fields (field, value, ...)
-- A worker's one call per heartbeat tick, whatever it runs: its deadline in
-- `{fr}:workers:alive` becomes now + lease_ms, and its registry hash `{fr}:worker:<id>` gets
-- `updated_ms` and the fields given (a worker sends those that changed, and all of them once
-- a lease); when it is given fields, or did not exist, the hash expires three leases later.
-- Returns {registered, {job_id, ...}}: registered is 1 when the worker was not in the set
-- (its first tick, or it had been declared dead and its entries orphaned: it must check each
-- of its jobs with fr_job_heartbeat), and the job ids fr_cancel asked it to stop. With the
-- word `due` it also returns reclaim_due's answer (1: a reclaim pass would find something)
-- and 1 when this call created the registry hash (a worker that sent only some fields then
-- sends them all); with `sweep` and hold_ms, those and a fifth item: 1 when this worker
-- holds the sweeper's role (take_sweeper) and ticks every second, 0 when it may tick less
-- often. Without either word, the two-item reply the oldest workers read.
local function fr_worker_tick(keys, args)
  local tag, worker, lease_ms = keys[1], args[1], tonumber(args[3])
  if not worker or worker == '' or not lease_ms then
    return redis.error_reply('ERR usage: FCALL fr_worker_tick 1 <tag> <worker> <quiet_ms> <lease_ms> [due | sweep <hold_ms>] [field value ...]')
  end
  local form, first, hold_ms = args[4], 4, nil
  if form == 'due' then
    first = 5
  elseif form == 'sweep' then
    hold_ms = tonumber(args[5])
    if not hold_ms or hold_ms < 1 then
      return redis.error_reply('ERR fr_worker_tick: sweep takes a hold time in ms')
    end
    first = 6
  end
  if (#args - first + 1) % 2 == 1 then
    return redis.error_reply('ERR fr_worker_tick: registry fields come in pairs')
  end
  local hold, last = fleet_call_in(tag, tonumber(args[2]), lease_ms)
  local now = now_ms()
  local added = redis.call('ZADD', alive_key(tag), now + lease_ms, worker)
  local wk = tag .. ':worker:' .. worker
  local fields = { 'updated_ms', now }
  for i = first, #args do table.insert(fields, args[i]) end
  -- HSET counts the fields it added: updated_ms is one only when the hash was gone.
  local fresh = redis.call('HSET', wk, unpack(fields)) > 0
  if fresh or #args >= first then redis.call('PEXPIRE', wk, lease_ms * 3) end
  local cancels = redis.call('SMEMBERS', cancel_key(tag, worker))
  if first == 4 then return { added, cancels } end
  local reply = { added, cancels, reclaim_due(tag, now - hold, last), fresh and 1 or 0 }
  if hold_ms then
    table.insert(reply, take_sweeper(tag, worker, hold_ms, last) and 1 or 0)
  end
  return reply
end

-- fr_job_heartbeat KEY=tag ARGV: worker, quiet_ms, lease_ms, entry_id, job_id, entry_id,
-- job_id, ...
-- Checks each job a worker runs, entry by entry: rare (a worker calls it when its tick says
-- it registered afresh, and every JOB_LEASE_MS), since fr_worker_tick is the lease.
-- Renews the entry's idle time (XCLAIM ... JUSTID, no delivery counted), keeps it in the
-- worker's set and takes it back from the orphans when the worker had been declared dead
-- but nobody took it yet. Returns one verdict per job: 'ok', 'lost' (someone else owns it,
-- or it is gone: stop, do not steal it back) or 'cancel' (fr_cancel asked it to stop).
local function fr_job_heartbeat(keys, args)
  local tag, worker = keys[1], args[1]
  fleet_call_in(tag, tonumber(args[2]), tonumber(args[3]))
  local out = {}
  for i = 4, #args, 2 do
    local entry_id, job_id = args[i], args[i + 1]
    local jk = tag .. ':job:' .. job_id
    local owner = owner_of(tag, entry_id)
    local h = redis.call('HMGET', jk, 'worker', 'cancel_requested')
    if not owner and runs_unpending(jk, entry_id, worker) then
      -- Trimmed from the stream while it ran: nothing to renew, the job goes on.
      redis.call('SREM', owned_key(tag, worker), entry_id)
      table.insert(out, h[2] == '1' and 'cancel' or 'ok')
    -- A job handed back (or taken over) no longer names this worker: renewing it would
    -- undo the hand-back's idle time.
    elseif owner ~= worker or h[1] ~= worker then
      redis.call('SREM', owned_key(tag, worker), entry_id)
      redis.call('SREM', cancel_key(tag, worker), job_id)
      table.insert(out, 'lost')
    else
      redis.call('XCLAIM', tag .. ':jobs', GROUP, worker, 0, entry_id, 'JUSTID')
      redis.call('SADD', owned_key(tag, worker), entry_id)
      redis.call('ZREM', orphans_key(tag), entry_id)
      if h[2] == '1' then
        table.insert(out, 'cancel')
      else
        table.insert(out, 'ok')
      end
    end
  end
  return out
end

-- Declares dead up to OVERDUE_PER_PASS workers whose deadline is older than `before`
-- (ZRANGEBYSCORE ... LIMIT: what it costs is what it finds): their entries become orphans,
-- their sets go. The caller itself is never declared dead: it is calling.
local function bury_overdue(tag, worker, before)
  local alive, orphans = alive_key(tag), orphans_key(tag)
  local overdue = redis.call('ZRANGEBYSCORE', alive, '-inf', '(' .. before, 'LIMIT', 0,
    OVERDUE_PER_PASS)
  local now = now_ms()
  for _, w in ipairs(overdue) do
    if w ~= worker then
      for _, id in ipairs(redis.call('SMEMBERS', owned_key(tag, w))) do
        redis.call('ZADD', orphans, 'NX', now, id)
      end
      redis.call('DEL', owned_key(tag, w), cancel_key(tag, w), wake_key(tag, w))
      redis.call('ZREM', alive, w)
    end
  end
end

-- Whether a pending entry is covered by a live lease: its owner is registered and holds it
-- in its set. Such an entry is never swept, however long idle.
local function leased(tag, owner, entry_id)
  return redis.call('ZSCORE', alive_key(tag), owner) and
    redis.call('SISMEMBER', owned_key(tag, owner), entry_id) == 1
end

-- The fleet's sweep of the pending list (at most once per SWEEP_EVERY_MS, SWEEP_ROWS rows,
-- from where the last one stopped): adds to `ids`, up to `room`, the entries of other
-- workers idle past min_idle that no live lease covers, and drops them from their owner's
-- set and the orphans.
local function sweep(tag, worker, min_idle, room, ids)
  local fk = tag .. ':fleet'
  local v = redis.call('HMGET', fk, 'swept_ms', 'sweep_from')
  local now = now_ms()
  local last = tonumber(v[1])
  if last and now - last < SWEEP_EVERY_MS and now >= last then return end
  local rows = redis.call('XPENDING', tag .. ':jobs', GROUP, v[2] or '-', '+', SWEEP_ROWS)
  local next_from = '-'
  local taken = {}
  for _, id in ipairs(ids) do taken[id] = true end
  for i, p in ipairs(rows) do
    if #ids >= room then
      next_from = p[1]
      break
    end
    local id, owner, idle = p[1], p[2], tonumber(p[3])
    if owner ~= worker and idle > min_idle and not taken[id] and not leased(tag, owner, id) then
      table.insert(ids, id)
      redis.call('SREM', owned_key(tag, owner), id)
      redis.call('ZREM', orphans_key(tag), id)
    end
    if i == SWEEP_ROWS then next_from = '(' .. id end
  end
  redis.call('HSET', fk, 'swept_ms', now, 'sweep_from', next_from)
end

-- Deletes idle consumers that own nothing (see CONSUMER_PRUNE_EVERY_MS); never `worker`,
-- the caller, nor a worker that holds a lease.
local function prune_consumers(tag, worker)
  local fk = tag .. ':fleet'
  local now = now_ms()
  local last = tonumber(redis.call('HGET', fk, 'consumers_ms'))
  if last and now - last < CONSUMER_PRUNE_EVERY_MS and now >= last then return end
  redis.call('HSET', fk, 'consumers_ms', now)
  local bound = setting(tag, 'consumer_idle_ms', 600000)
  local jobs, alive = tag .. ':jobs', alive_key(tag)
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', jobs, GROUP)) do
    local f = {}
    for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
    if f.pending == 0 and f.idle > bound and f.name ~= worker and
        not redis.call('ZSCORE', alive, f.name) then
      redis.call('XGROUP', 'DELCONSUMER', jobs, GROUP, f.name)
    end
  end
end

-- fr_job_reclaim KEY=tag ARGV: worker, quiet_ms, lease_ms, count
-- Takes over up to `count` entries whose owner is gone, counting a delivery each, and
-- returns them as XCLAIM does: {{entry_id, {field, value, ...}}, ...}. First it declares
-- dead the workers whose tick is overdue (bury_overdue), then takes orphans (handed back,
-- or a dead worker's), oldest first, then what the fleet's sweep finds. After a silence of
-- the whole fleet, a worker is overdue only if its deadline passed before the silence, and
-- a swept entry must be idle for longer than the silence plus a lease (fleet_call_in).
local function fr_job_reclaim(keys, args)
  local tag, worker = keys[1], args[1]
  local lease_ms, count = tonumber(args[3]), tonumber(args[4])
  if not worker or worker == '' or not lease_ms or not count or count < 1 then
    return redis.error_reply('ERR usage: FCALL fr_job_reclaim 1 <tag> <worker> <quiet_ms> <lease_ms> <count>')
  end
  local hold = fleet_call_in(tag, tonumber(args[2]), lease_ms)
  bury_overdue(tag, worker, now_ms() - hold)
  local orphans = orphans_key(tag)
  local ids = redis.call('ZRANGE', orphans, 0, count - 1)
  if #ids > 0 then redis.call('ZREM', orphans, unpack(ids)) end
  -- What this pass leaves goes to the workers waiting, each of whose passes tops the
  -- tokens up again: a fleet of full workers takes a dead worker's many entries one a pass
  -- each, all at once, not one a tick each.
  wake_for_orphans(tag)
  if #ids < count then sweep(tag, worker, lease_ms + hold, count, ids) end
  prune_consumers(tag, worker)
  if #ids == 0 then return {} end
  local taken = redis.call('XCLAIM', tag .. ':jobs', GROUP, worker, 0, unpack(ids))
  local mine = owned_key(tag, worker)
  for _, e in ipairs(taken) do redis.call('SADD', mine, e[1]) end
  return taken
end

-- Whether this worker's own end of the job is already recorded: the entry is no longer
-- pending and the hash, final, still names this worker and this entry. This is what a
-- repeated call finds after the first call's reply was lost.
local function finished_by(tag, entry_id, worker, jk)
  if owner_of(tag, entry_id) then return false end
  local v = redis.call('HMGET', jk, 'status', 'worker', 'entry_id')
  return TERMINAL[v[1]] and v[2] == worker and v[3] == entry_id
end

-- fr_job_finish KEY=tag ARGV: worker, then for each job: entry_id, job_id, status, error
-- Ends jobs this worker owns, after fr_job_end wrote their end entries: final status,
-- expiry, event, ack and delete. A job already final keeps its status. One answer per job,
-- in order: 'ok', or 'lost' when another worker owns the entry now. Safe to repeat: a call
-- that finds this worker's finish already done (its reply was lost) answers 'ok' again and
-- writes nothing.
local function fr_job_finish(keys, args)
  local tag, worker = keys[1], args[1]
  if (#args - 1) % 4 ~= 0 then
    return redis.error_reply('ERR usage: FCALL fr_job_finish 1 <tag> <worker> ' ..
      '(<entry_id> <job_id> <status> <error>)...')
  end
  for i = 2, #args, 4 do
    if not TERMINAL[args[i + 2]] then
      return redis.error_reply('ERR not a final status: ' .. tostring(args[i + 2]))
    end
  end
  local out = {}
  for i = 2, #args, 4 do
    local entry_id, job_id, status, err = args[i], args[i + 1], args[i + 2], args[i + 3]
    local jk = tag .. ':job:' .. job_id
    local owner = owner_of(tag, entry_id)
    if not owner and runs_unpending(jk, entry_id, worker) then
      -- Its entry was trimmed while it ran: the job ends as any other.
      finalize(tag, job_id, status, err, worker, true)
      ack_and_delete(tag, entry_id, worker)
      redis.call('SREM', cancel_key(tag, worker), job_id)
      table.insert(out, 'ok')
    elseif owner ~= worker then
      if finished_by(tag, entry_id, worker, jk) then
        table.insert(out, 'ok')
      else
        table.insert(out, 'lost')
      end
    else
      finalize(tag, job_id, status, err, worker, true)
      ack_and_delete(tag, entry_id, worker)
      redis.call('SREM', cancel_key(tag, worker), job_id)
      table.insert(out, 'ok')
    end
  end
  return out
end

-- fr_job_ack KEY=tag ARGV: entry_id, worker
-- Drops the entry of a job that is final (its end entry written). 'ok' (also when the entry
-- is no longer pending: a repeated call has nothing left to do), or 'lost' when another
-- worker owns it.
local function fr_job_ack(keys, args)
  local tag, entry_id, worker = keys[1], args[1], args[2]
  local owner = owner_of(tag, entry_id)
  if not owner then return 'ok' end
  if owner ~= worker then return 'lost' end
  ack_and_delete(tag, entry_id, worker)
  return 'ok'
end

-- fr_job_end KEY=job tag ({fr:<job_id>}) ARGV: status, error, results_maxlen, ttl_s
-- Writes a job's end entry once: the first call adds it (with the results count from the
-- progress hash) and marks the progress hash `ended`; later calls change nothing. Both keys
-- expire after ttl_s. Returns {status, results} as recorded.
local function fr_job_end(keys, args)
  local tag, status, err, maxlen, ttl = keys[1], args[1], args[2], args[3], args[4]
  if not TERMINAL[status] then
    return redis.error_reply('ERR not a final status: ' .. tostring(status))
  end
  local pk, rk = tag .. ':progress', tag .. ':results'
  local v = redis.call('HMGET', pk, 'ended', 'results', 'note')
  local results = v[2] or '0'
  if v[1] then return { v[1], results } end
  local now = now_ms()
  local entry = { rk, 'MAXLEN', '~', maxlen, '*', 'kind', 'end', 'status', status,
    'results', results, 'time_ms', now }
  if err and err ~= '' then
    table.insert(entry, 'error'); table.insert(entry, err)
  end
  redis.call('XADD', unpack(entry))
  redis.call('HSET', pk, 'ended', status, 'results', results, 'updated_ms', now)
  if v[3] then redis.call('HDEL', pk, 'note') end
  redis.call('EXPIRE', pk, ttl)
  redis.call('EXPIRE', rk, ttl)
  return { status, results }
end

-- fr_job_handback KEY=tag ARGV: entry_id, worker, job_id, idle_ms
-- Gives a running job back on shutdown: the entry becomes an orphan (the next reclaim pass
-- of any worker takes it at once) with its idle time set past the lease, and the hand-back
-- is not counted as a failed attempt. An empty job_id gives back an entry read but never
-- claimed. 'ok' or 'lost'. Safe to repeat: once handed back the hash no longer names this
-- worker, and a repeated call counts nothing again.
local function fr_job_handback(keys, args)
  local tag, entry_id, worker, job_id, idle = keys[1], args[1], args[2], args[3], args[4]
  local owner = owner_of(tag, entry_id)
  if owner ~= worker then return 'lost' end
  redis.call('XCLAIM', tag .. ':jobs', GROUP, worker, 0, entry_id, 'IDLE', idle, 'JUSTID')
  redis.call('SREM', owned_key(tag, worker), entry_id)
  redis.call('ZADD', orphans_key(tag), 'NX', now_ms(), entry_id)
  wake_for_orphans(tag)
  if not job_id or job_id == '' then return 'ok' end
  redis.call('SREM', cancel_key(tag, worker), job_id)
  local jk = tag .. ':job:' .. job_id
  if redis.call('HGET', jk, 'worker') ~= worker then return 'ok' end
  redis.call('HINCRBY', jk, 'handoffs', 1)
  redis.call('HSET', jk, 'status', 'queued', 'updated_ms', now_ms())
  redis.call('HDEL', jk, 'worker')
  event(tag, job_id, 'running', 'queued', worker, 'handed back: worker shutting down', entry_id)
  return 'ok'
end

-- fr_cancel KEY=tag ARGV: job_id [entry_id]
-- With entry_id (an unread entry queued with a plain XADD and no job_id, whose job id the
-- caller derived as workers do), that entry is the job when no entry names job_id.
-- A queued job is cancelled at once and never runs, even if its entry is read after its hash
-- expired ({fr}:jobs:cancelled keeps the entry's id until its ack); a running one is
-- flagged and its worker stops it at once (at the latest with its next tick). Returns 'cancelled', 'cancelling', or 'already <status>'. A
-- cancelled queued job's entry stays until a worker reads it, writes the end entry (in the
-- job's slot, which this function cannot reach) and acks it; the CLI writes it at once.
local function fr_cancel(keys, args)
  local tag, job_id, entry_hint = keys[1], args[1], args[2]
  if not job_id or job_id == '' then
    return redis.error_reply('ERR usage: FCALL fr_cancel 1 <tag> <job_id> [entry_id]')
  end
  local jk = tag .. ':job:' .. job_id
  local status = redis.call('HGET', jk, 'status')
  if status then
    if TERMINAL[status] then return 'already ' .. status end
    if status == 'running' then
      redis.call('HSET', jk, 'cancel_requested', 1, 'updated_ms', now_ms())
      -- Its worker waits on its wake list and stops the job at once; it also reads its
      -- cancel set with every tick, which covers a wake-up lost with a connection.
      local worker = redis.call('HGET', jk, 'worker')
      if worker then
        redis.call('SADD', cancel_key(tag, worker), job_id)
        redis.call('LPUSH', wake_key(tag, worker), job_id)
        redis.call('EXPIRE', wake_key(tag, worker), WAKE_TTL_S)
      end
      return 'cancelling'
    end
    local entry_id = redis.call('HGET', jk, 'entry_id')
    if entry_id then redis.call('HSET', cancelled_key(tag), entry_id, job_id) end
    finalize(tag, job_id, 'cancelled', nil, '')
    return 'cancelled'
  end
  -- Not yet seen by any worker (every entry a worker read has a hash from its claim): look
  -- among the first CANCEL_SCAN_LIMIT entries after the group's last-delivered id.
  local jobs = tag .. ':jobs'
  if redis.call('EXISTS', jobs) == 0 then
    return redis.error_reply('NOJOB unknown job ' .. job_id)
  end
  local start = '-'
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', jobs)) do
    local f = {}
    for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
    if f.name == GROUP then start = '(' .. f['last-delivered-id'] end
  end
  do
    local batch = redis.call('XRANGE', jobs, start, '+', 'COUNT', CANCEL_SCAN_LIMIT)
    for _, e in ipairs(batch) do
      local f = e[2]
      local named
      for i = 1, #f, 2 do
        if f[i] == 'job_id' then named = f[i + 1] end
      end
      if named == job_id or (named == nil and e[1] == entry_hint) then
        local now = now_ms()
        redis.call('HSET', jk, 'status', 'queued', 'entry_id', e[1], 'created_ms', now,
          'attempts', 0, 'handoffs', 0)
        for j = 1, #f, 2 do
          if IS_HASH_FIELD[f[j]] then
            redis.call('HSET', jk, f[j], f[j + 1])
          end
        end
        redis.call('ZADD', tag .. ':jobs:index', now, job_id)
        redis.call('HSET', cancelled_key(tag), e[1], job_id)
        finalize(tag, job_id, 'cancelled', nil, '')
        return 'cancelled'
      end
    end
  end
  return redis.error_reply('NOJOB unknown job ' .. job_id)
end

-- fr_prompt_set KEY=tag ARGV: text [preserve_previous=1]
-- Sets the active prompt, bumping its version atomically. The history keeps the newest
-- PROMPT_HISTORY_MAX versions (`prompt_history_max` in {fr}:settings, 100 by default); with
-- preserve_previous 0/false it is reset to the new version alone. Returns the new version.
local function fr_prompt_set(keys, args)
  local tag, text, preserve = keys[1], args[1], args[2]
  if not text or text:match('^%s*$') then
    return redis.error_reply('ERR prompt text is empty')
  end
  if #text > MAX_PROMPT_BYTES then
    return redis.error_reply('ERR prompt is ' .. #text .. ' bytes; at most ' .. MAX_PROMPT_BYTES .. ' are allowed')
  end
  local keep = not (preserve == '0' or preserve == 'false' or preserve == 'no')
  local pk, hk = tag .. ':prompt', tag .. ':prompt:history'
  local version = redis.call('HINCRBY', pk, 'version', 1)
  local now = now_ms()
  redis.call('HSET', pk, 'text', text, 'updated_ms', now)
  if not keep then redis.call('DEL', hk) end
  redis.call('LPUSH', hk, cjson.encode({ version = version, text = text, updated_ms = now }))
  redis.call('LTRIM', hk, 0, setting(tag, 'prompt_history_max', 100) - 1)
  redis.call('XADD', tag .. ':events', 'MAXLEN', '~', setting(tag, 'events_maxlen', 10000), '*',
    'kind', 'prompt', 'version', version, 'time_ms', now)
  return version
end

-- fr_prompt_get KEY=tag: {text, version, updated_ms}, or nil when none was ever set.
local function fr_prompt_get(keys, args)
  local v = redis.call('HMGET', keys[1] .. ':prompt', 'text', 'version', 'updated_ms')
  if not v[1] then return nil end
  return { v[1], tonumber(v[2]), tonumber(v[3]) }
end

-- fr_prompt_history KEY=tag ARGV: [count]: JSON entries, newest first.
local function fr_prompt_history(keys, args)
  local count = tonumber(args[1] or '0') or 0
  local stop = -1
  if count > 0 then stop = count - 1 end
  return redis.call('LRANGE', keys[1] .. ':prompt:history', 0, stop)
end

-- fr_index_prune KEY=tag ARGV: [limit]: drops index members whose job hash has expired.
-- Each call looks at `limit` members from where the last one stopped (`prune_from` in
-- {fr}:fleet, a rank), so that every member is looked at in turn, however many long-lived
-- jobs come first.
local function fr_index_prune(keys, args)
  local tag = keys[1]
  local ik, fk = tag .. ':jobs:index', tag .. ':fleet'
  local limit = tonumber(args[1] or '500') or 500
  if limit < 1 then return redis.error_reply('ERR fr_index_prune: limit must be positive') end
  local from = tonumber(redis.call('HGET', fk, 'prune_from') or '0') or 0
  local ids = redis.call('ZRANGE', ik, from, from + limit - 1)
  local removed = 0
  for _, id in ipairs(ids) do
    if redis.call('EXISTS', tag .. ':job:' .. id) == 0 then
      redis.call('ZREM', ik, id)
      removed = removed + 1
    end
  end
  local next_from = from + #ids - removed
  if #ids < limit then next_from = 0 end
  redis.call('HSET', fk, 'prune_from', next_from)
  return removed
end

redis.register_function('fr_submit', per_call(fr_submit))
redis.register_function('fr_job_claim', per_call(fr_job_claim))
redis.register_function('fr_job_reject', per_call(fr_job_reject))
redis.register_function('fr_worker_tick', per_call(fr_worker_tick))
redis.register_function('fr_job_heartbeat', per_call(fr_job_heartbeat))
redis.register_function('fr_job_reclaim', per_call(fr_job_reclaim))
redis.register_function('fr_job_finish', per_call(fr_job_finish))
redis.register_function('fr_job_ack', per_call(fr_job_ack))
redis.register_function('fr_job_end', per_call(fr_job_end))
redis.register_function('fr_job_handback', per_call(fr_job_handback))
redis.register_function('fr_cancel', per_call(fr_cancel))
redis.register_function('fr_prompt_set', per_call(fr_prompt_set))
redis.register_function{ function_name = 'fr_prompt_get', callback = per_call(fr_prompt_get), flags = { 'no-writes' } }
redis.register_function{ function_name = 'fr_prompt_history', callback = per_call(fr_prompt_history), flags = { 'no-writes' } }
redis.register_function('fr_index_prune', per_call(fr_index_prune))
