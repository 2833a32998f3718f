"""Lua scripts that change a job's keys atomically. Standard library only: sources, not clients.

Each script but ``PUBLISH_MANY`` touches the keys of one job only (one hash slot), so they run on
Redis Cluster too. Every script is idempotent where a retry after a lost reply can happen:

- ``CREATE``   producer: create the job's state unless it exists.
- ``CLAIM``    worker: take the job for a new attempt unless it is finished or its lease is live.
- ``PUBLISH``  worker: append events to the log and the channel, only while holding the job
               (fencing), skipping seqs already published, optionally ending the job.
- ``PUBLISH_MANY`` worker, single Redis only: ``PUBLISH`` for several jobs in one call.
- ``RENEW``    worker: extend the lease while holding the job; report a cancel request.
- ``CANCEL``   anyone: end a queued job at once, or flag a running one for its worker.
- ``RELEASE``  worker: give a job back to the queue (graceful shutdown), keeping its log.
- ``TAKEOVER`` worker: decide, once per attempt, to re-enqueue a running job whose lease lapsed.
- ``STRANDED``  worker: whether a job of the queued set still waits for a delivery.
- ``REQUEUE_DUE`` worker: decide, once per wait, to re-enqueue a job left unclaimed.
"""

from __future__ import annotations

from typing import Final

# KEYS: state[, queued[, queue]]. ARGV: created_ms, ttl, job id, message, then field/value pairs.
# Returns 1 if created, 0 if the job existed already. With the queued set (a single Redis: on a
# cluster it is on another slot and the producer adds the job itself, before this call), a
# created job joins it, scored by its creation. With the broker's queue (the broker is this
# Redis), the job's message is pushed there as kombu's Redis transport would push it: a job is
# never created without its message, nor queued twice.
CREATE: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if KEYS[2] then redis.call('ZADD', KEYS[2], ARGV[1], ARGV[3]) end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('HSET', KEYS[1], 'status', 'queued', 'created', ARGV[1], 'attempt', 0, 'seq', -1)
redis.call('EXPIRE', KEYS[1], ARGV[2])
if KEYS[3] then redis.call('LPUSH', KEYS[3], ARGV[4]) end
return 1
"""

# KEYS: state, lease[, running, queued]. ARGV: owner, lease_ms, now_ms[, job id].
# Returns {outcome, attempt, last_seq, cancel_flag}; outcome in claimed|missing|finished|busy.
# With the running set (a single Redis: on a cluster it is on another slot and the worker keeps
# it itself), a claimed job is added to it, scored by now, before anything else is written (a
# failing ZADD leaves the job untouched), and a missing or finished one is removed from it.
# Whatever the outcome, the delivery has arrived: the job leaves the queued set.
CLAIM: Final = """
if KEYS[4] then redis.call('ZREM', KEYS[4], ARGV[4]) end
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == 'done' or status == 'error' or status == 'cancelled' then
  if KEYS[3] then redis.call('ZREM', KEYS[3], ARGV[4]) end
  if not status then return {'missing', 0, -1, 0} end
  return {'finished', 0, -1, 0}
end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'busy', 0, -1, 0} end
if KEYS[3] then redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4]) end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'owner', ARGV[1], 'started', ARGV[3], 'tokens', 0)
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '-1')
local cancel = redis.call('HEXISTS', KEYS[1], 'cancel')
return {'claimed', attempt, seq, cancel}
"""

# One job's batch, the body of PUBLISH and PUBLISH_MANY. The job's keys are KEYS[k] on: state,
# log, channel, lease[, running when ``tracked``]. Its arguments are ARGV[a] to ARGV[last]: owner,
# lease_ms, publish command, ttl, tokens added, n (number of final field args), n final field/value
# args, then seq/payload pairs.
# With n > 0 the batch ends the job: status and the final fields are written, the lease is
# dropped, the keys expire after ttl and, given the running set (single Redis), the job leaves
# it (its id is the hash tag of the state key). Returns -1 if not the owner, else the cancel
# flag.
_PUBLISH_JOB: Final = """
local function publish(k, a, last, tracked)
  if redis.call('HGET', KEYS[k], 'owner') ~= ARGV[a] then return -1 end
  local done = tonumber(redis.call('HGET', KEYS[k], 'seq') or '-1')
  local n = tonumber(ARGV[a + 5])
  for i = a + 6 + n, last, 2 do
    local seq = tonumber(ARGV[i])
    if seq > done then
      redis.call('XADD', KEYS[k + 1], '0-' .. (seq + 1), 'e', ARGV[i + 1])
      redis.call(ARGV[a + 2], KEYS[k + 2], ARGV[i + 1])
      done = seq
    end
  end
  redis.call('HSET', KEYS[k], 'seq', done)
  if ARGV[a + 4] ~= '0' then redis.call('HINCRBY', KEYS[k], 'tokens', ARGV[a + 4]) end
  if n > 0 then
    redis.call('HSET', KEYS[k], unpack(ARGV, a + 6, a + 5 + n))
    redis.call('HDEL', KEYS[k], 'owner')
    redis.call('DEL', KEYS[k + 3])
    redis.call('EXPIRE', KEYS[k], ARGV[a + 3])
    redis.call('EXPIRE', KEYS[k + 1], ARGV[a + 3])
    if tracked then redis.call('ZREM', KEYS[k + 4], string.match(KEYS[k], '{([^}]*)}')) end
    return 0
  end
  return redis.call('HEXISTS', KEYS[k], 'cancel')
end
"""

# KEYS: state, log, channel, lease[, running]. ARGV: one job's arguments (above).
PUBLISH: Final = (
    _PUBLISH_JOB
    + """
return publish(1, 1, #ARGV, KEYS[5] ~= nil)
"""
)

# Several jobs' batches in one call, on a single Redis (the keys span slots). KEYS: each job's
# keys in turn. ARGV: for each job, its number of keys (4, or 5 with the running set), its number
# of arguments, then those arguments. Returns one reply per job, in order: PUBLISH's, or an error
# reply for that job alone if its batch failed (what it wrote before the failure stays, as with
# PUBLISH).
PUBLISH_MANY: Final = (
    _PUBLISH_JOB
    + """
local replies, k, a = {}, 1, 1
while a <= #ARGV do
  local keys, args = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local ok, reply = pcall(publish, k, a + 2, a + 1 + args, keys == 5)
  if not ok then
    reply = redis.error_reply(type(reply) == 'table' and reply.err or tostring(reply))
  end
  replies[#replies + 1] = reply
  k, a = k + keys, a + 2 + args
end
return replies
"""
)

# KEYS: state, lease. ARGV: owner, lease_ms. Returns -1 if the lease is lost, else cancel flag.
RENEW: Final = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return -1 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return redis.call('HEXISTS', KEYS[1], 'cancel')
"""

# KEYS: state, log, channel. ARGV: publish command, ttl, now_ms, job id, event payload prefix.
# Returns the status the job had: a queued job ends here with a `cancelled` event; a running one
# is flagged for its worker; a finished one is left alone.
CANCEL: Final = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
if status == 'queued' then
  local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '-1') + 1
  local event = ARGV[5] .. seq .. ',"type":"cancelled"}'
  redis.call('XADD', KEYS[2], '0-' .. (seq + 1), 'e', event)
  redis.call(ARGV[1], KEYS[3], event)
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'seq', seq, 'finished', ARGV[3], 'cancel', 1)
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
elseif status == 'running' then
  redis.call('HSET', KEYS[1], 'cancel', 1)
end
return status
"""

# KEYS: state, lease. ARGV: owner. Hands a running job back: queued again, lease dropped.
RELEASE: Final = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued')
redis.call('HDEL', KEYS[1], 'owner')
redis.call('DEL', KEYS[2])
return 1
"""

# KEYS: state, lease. Run by every worker's reaper for each job in the running set.
# Returns what to do: gone|finished (drop it from the set), live|queued (leave it), taken
# (another worker re-enqueued this attempt already) or requeue (this caller must re-enqueue it;
# exactly one caller gets this per lapsed attempt).
TAKEOVER: Final = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'gone' end
if status == 'done' or status == 'error' or status == 'cancelled' then return 'finished' end
if status ~= 'running' then return 'queued' end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'live' end
local attempt = redis.call('HGET', KEYS[1], 'attempt')
if redis.call('HGET', KEYS[1], 'requeued') == attempt then return 'taken' end
redis.call('HSET', KEYS[1], 'requeued', attempt)
return 'requeue'
"""

# KEYS: state, lease. Run by the reapers for each job of the queued set past the queued grace.
# Returns the job's creation time (ms) if it still waits for a delivery: queued, or running with
# no lease after a takeover re-enqueued its attempt (the claim of that message starts a new
# attempt); nil if it has had its delivery, has ended, or has expired.
STRANDED: Final = """
local status = redis.call('HGET', KEYS[1], 'status')
local waiting = status == 'queued'
if status == 'running' and redis.call('EXISTS', KEYS[2]) == 0 then
  waiting = redis.call('HGET', KEYS[1], 'requeued') == redis.call('HGET', KEYS[1], 'attempt')
end
if not waiting then return false end
return redis.call('HGET', KEYS[1], 'created') or '0'
"""

# KEYS: queued. ARGV: job id, cutoff_ms, next_ms.
# Returns 1 if the caller is to put the job on the queue again: its entry is older than the
# cutoff. The entry is moved to next_ms, so that another worker looking at the same moment does
# not, and the next look at it comes later (the caller moves it further the older the job is).
REQUEUE_DUE: Final = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
"""
