#!/usr/bin/env python3
"""The least Redis CPU a job's lifecycle can cost with all its state kept.

Runs, for each of N entries already read by a consumer, exactly the writes the contract
keeps for a job that ends with no result: the running job hash, its index entry and
`running` event, the end entry and progress hash in the job's own slot with their expiries,
the final hash with its expiry and event, the ack and the delete. No reads, no checks, no
XREADGROUP: a floor under any lifecycle that keeps this state, not a lifecycle. The key
names and fields follow docs/redis-contract.md (default tag `{fr}`); the worker's own
writes are in src/store/functions.lua.

Two forms, alternated: `script` (one Lua call per job, as functions run them) and
`commands` (the same commands pipelined from the client). Prints the redis-server's CPU
time per job for each round (`used_cpu_user + used_cpu_sys` around it).

    pip install redis   # redis-py
    scripts/bench-queue-floor.py [JOBS] [ROUNDS]

It starts its own redis-server on a free local port (no persistence), pinned to CPU 0,
and pins itself to CPU 1 where the machine has two.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import redis

TTL_S = 300
PIPELINE = 32

LIFECYCLE_LUA = r"""
local tag, job_id, entry_id, now, ttl = '{fr}', ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local job = tag .. ':job:' .. job_id
local own = '{fr:' .. job_id .. '}'
redis.call('HSET', job, 'stream_ref', 'paced:2:10', 'source', 'redis', 'entry_id', entry_id,
  'created_ms', now, 'handoffs', 0, 'started_ms', now, 'status', 'running', 'worker', 'w1',
  'attempts', 1, 'updated_ms', now)
redis.call('ZADD', tag .. ':jobs:index', now, job_id)
redis.call('XADD', tag .. ':events', 'MAXLEN', '~', 10000, '*', 'kind', 'job', 'job_id', job_id,
  'from', 'queued', 'to', 'running', 'worker', 'w1', 'time_ms', now, 'entry_id', entry_id)
redis.call('XADD', own .. ':results', 'MAXLEN', '~', 1000, '*', 'kind', 'end',
  'status', 'completed', 'results', 0, 'time_ms', now)
redis.call('HSET', own .. ':progress', 'ended', 'completed', 'results', 0, 'updated_ms', now)
redis.call('EXPIRE', own .. ':progress', ttl)
redis.call('EXPIRE', own .. ':results', ttl)
redis.call('HSET', job, 'status', 'completed', 'finished_ms', now, 'updated_ms', now,
  'worker', 'w1')
redis.call('EXPIRE', job, ttl)
redis.call('XADD', tag .. ':events', 'MAXLEN', '~', 10000, '*', 'kind', 'job', 'job_id', job_id,
  'from', 'running', 'to', 'completed', 'worker', 'w1', 'time_ms', now, 'entry_id', entry_id)
redis.call('XACK', tag .. ':jobs', 'workers', entry_id)
redis.call('XDEL', tag .. ':jobs', entry_id)
return 1
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_cpu_s(r):
    info = r.info("cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]


def queue_read_entries(r, jobs):
    """Adds `jobs` entries and reads them all as consumer w1: they are pending, as running
    jobs' entries are."""
    r.flushall()
    r.xgroup_create("{fr}:jobs", "workers", id="$", mkstream=True)
    pipe = r.pipeline(transaction=False)
    for i in range(jobs):
        pipe.xadd("{fr}:jobs", {"job_id": f"j{i}", "stream_ref": "paced:2:10"})
    entry_ids = [e.decode() for e in pipe.execute()]
    r.xreadgroup("workers", "w1", {"{fr}:jobs": ">"}, count=jobs)
    return entry_ids


def add_commands(pipe, job_id, entry_id, now):
    job, own = "{fr}:job:" + job_id, "{fr:" + job_id + "}"
    pipe.hset(job, mapping={
        "stream_ref": "paced:2:10", "source": "redis", "entry_id": entry_id,
        "created_ms": now, "handoffs": 0, "started_ms": now, "status": "running",
        "worker": "w1", "attempts": 1, "updated_ms": now})
    pipe.zadd("{fr}:jobs:index", {job_id: now})
    pipe.xadd("{fr}:events", {
        "kind": "job", "job_id": job_id, "from": "queued", "to": "running", "worker": "w1",
        "time_ms": now, "entry_id": entry_id}, maxlen=10000, approximate=True)
    pipe.xadd(own + ":results", {
        "kind": "end", "status": "completed", "results": 0, "time_ms": now},
        maxlen=1000, approximate=True)
    pipe.hset(own + ":progress", mapping={"ended": "completed", "results": 0, "updated_ms": now})
    pipe.expire(own + ":progress", TTL_S)
    pipe.expire(own + ":results", TTL_S)
    pipe.hset(job, mapping={
        "status": "completed", "finished_ms": now, "updated_ms": now, "worker": "w1"})
    pipe.expire(job, TTL_S)
    pipe.xadd("{fr}:events", {
        "kind": "job", "job_id": job_id, "from": "running", "to": "completed", "worker": "w1",
        "time_ms": now, "entry_id": entry_id}, maxlen=10000, approximate=True)
    pipe.xack("{fr}:jobs", "workers", entry_id)
    pipe.xdel("{fr}:jobs", entry_id)


def run_round(r, form, jobs, sha):
    entry_ids = queue_read_entries(r, jobs)
    now = str(int(time.time() * 1000))
    before = server_cpu_s(r)
    for first in range(0, jobs, PIPELINE):
        pipe = r.pipeline(transaction=False)
        for i in range(first, min(jobs, first + PIPELINE)):
            if form == "script":
                pipe.evalsha(sha, 0, f"j{i}", entry_ids[i], now, TTL_S)
            else:
                add_commands(pipe, f"j{i}", entry_ids[i], now)
        pipe.execute()
    per_job_us = 1e6 * (server_cpu_s(r) - before) / jobs
    left = r.xlen("{fr}:jobs")
    if left:
        sys.exit(f"{left} entries were not deleted")
    return per_job_us


def main():
    jobs = int(sys.argv[1]) if len(sys.argv) > 1 else 30000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    port = free_port()
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") and os.cpu_count() >= 2 else []
    workdir = tempfile.mkdtemp()
    server = subprocess.Popen(pin + [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--dir", workdir], stdout=subprocess.DEVNULL)
    try:
        if pin:
            os.sched_setaffinity(0, {1})
        r = redis.Redis(port=port)
        for _ in range(50):
            try:
                r.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        sha = r.script_load(LIFECYCLE_LUA)
        print(f"# redis-server {r.info('server')['redis_version']}, {jobs} jobs a round")
        for n in range(1, rounds + 1):
            for form in ("script", "commands"):
                us = run_round(r, form, jobs, sha)
                print(f"floor-{form} round={n} jobs={jobs} redis_cpu_us_per_job={us:.1f}")
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
