"""Redis faults under load: REDIS_RESTARTS clean restarts of an AOF-persisted Redis, one
that refuses connections for REDIS_REFUSE_S (stopped, then started on the same port), one
paused with SIGSTOP for longer than the lease; every worker's /health/ready is polled
throughout. Then a Redis without persistence is restarted under running jobs, to measure
what becomes of them."""

import os
import signal
import threading
import time

from fleet import (Load, JobBook, RedisServer, Worker, job_figures, log, ms_stats, now_ms,
                   env_int, write_json, PREFIX)
from resp import Redis, RedisError

LEASE_MS = 3000
SETTINGS = {
    "JOB_LEASE_MS": LEASE_MS,
    "RECLAIM_INTERVAL_MS": 500,
    "MAX_CONCURRENT_STREAMS": 30,
    "EVENTS_MAXLEN": 1000000,
}


class ReadyWatch(threading.Thread):
    """Polls each worker's /health/ready every 100 ms and keeps (time_ms, code) per worker."""

    def __init__(self, workers):
        super().__init__(daemon=True)
        self.workers = workers
        self.seen = {w.id: [] for w in workers}
        self.stop_event = threading.Event()

    def run(self):
        threads = [threading.Thread(target=self._poll, args=(w,), daemon=True) for w in self.workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _poll(self, w):
        while not self.stop_event.is_set():
            code = w.get("/health/ready", timeout=5)[0]
            self.seen[w.id].append((now_ms(), code))
            self.stop_event.wait(0.1)

    def window(self, t0, t_back):
        """Per worker: whether it answered anything but 200 after t0, and the time from
        t_back (Redis answering again) to its first 200 after its last non-200."""
        went_down, back = 0, []
        for wid, seq in self.seen.items():
            after = [(t, c) for t, c in seq if t >= t0]
            bad = [t for t, c in after if c != 200]
            if not bad:
                continue
            went_down += 1
            first_ok = next((t for t, c in after if c == 200 and t > bad[-1]), None)
            if first_ok is not None:
                back.append(max(0, first_ok - t_back))
        return went_down, back

    def stop(self):
        self.stop_event.set()
        self.join(10)


def wait_pong(port, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        try:
            if Redis(port, timeout=1).cmd("PING") == "PONG":
                return now_ms()
        except (OSError, ConnectionError, RedisError):
            time.sleep(0.05)
    return None


def persistent_faults(workdir):
    restarts = env_int("REDIS_RESTARTS", 10)
    refuse_s = env_int("REDIS_REFUSE_S", 30)
    pause_ms = env_int("REDIS_PAUSE_MS", LEASE_MS + 2000)
    slots = env_int("REDIS_JOBS", 30)
    redis = RedisServer(workdir, persist=True)
    book = JobBook(redis)
    workers = [Worker(redis, workdir, SETTINGS) for _ in range(3)]
    for w in workers:
        w.wait_ready()
    watch = ReadyWatch(workers)
    watch.start()
    load = Load(redis, book, slots, fps=5, job_frames=100, job_fps=10, tag="redis")
    load.start()
    load.run_for(5)
    out = {"restarts": [], "refuse": None, "pause": None}
    outage_times = []
    for k in range(restarts):
        t0 = now_ms()
        redis.restart()
        t_back = now_ms()
        outage_times.append(t0)
        load.run_for(6)
        down, back = watch.window(t0, t_back)
        out["restarts"].append({"down_ms": t_back - t0, "workers_503": down, "ready_again_ms": back})
        log("redis: restart %d/%d: down %d ms, %d workers went 503, ready again %s" % (
            k + 1, restarts, t_back - t0, down, back))
    # Refusing connections: the server is gone, its port closed.
    t0 = now_ms()
    redis.stop()
    load.run_for(refuse_s)
    redis.start()
    t_back = now_ms()
    outage_times.append(t0)
    load.run_for(10)
    down, back = watch.window(t0, t_back)
    out["refuse"] = {"down_ms": t_back - t0, "workers_503": down, "ready_again_ms": back}
    log("redis: refused for %d ms: %d workers went 503, ready again %s" % (t_back - t0, down, back))
    # Paused: connections open, no answer.
    t0 = now_ms()
    redis.proc.send_signal(signal.SIGSTOP)
    time.sleep(pause_ms / 1000)
    redis.proc.send_signal(signal.SIGCONT)
    t_back = now_ms()
    outage_times.append(t0)
    load.run_for(10)
    down, back = watch.window(t0, t_back)
    out["pause"] = {"down_ms": t_back - t0, "workers_503": down, "ready_again_ms": back}
    log("redis: paused for %d ms: %d workers went 503, ready again %s" % (t_back - t0, down, back))
    open_jobs = load.drain(timeout=100 / 5 + 60)
    watch.stop()
    events = book.events()
    outages = {j: outage_times for j in book.jobs}
    fig = job_figures(book, outages, events)
    dead = book.dead_letters()
    exited = [w.id for w in workers if not w.alive()]
    leases_lost = 0
    for w in workers:
        code, body = w.get("/metrics")
        for line in (body or "").splitlines() if code == 200 else []:
            if line.startswith("freeroam_leases_lost_total "):
                leases_lost += int(float(line.split()[1]))
        w.stop()
    redis.stop()
    out.update({"exited": exited, "dead_letters": dead, "leases_lost": leases_lost,
                "open_after_drain": [j["id"] for j in open_jobs], **fig})
    return out


def unpersisted_restart(workdir):
    """Jobs running when a Redis without persistence restarts: what is left of them."""
    redis = RedisServer(workdir, persist=False)
    book = JobBook(redis)
    workers = [Worker(redis, workdir, SETTINGS) for _ in range(2)]
    for w in workers:
        w.wait_ready()
    load = Load(redis, book, 10, fps=5, job_frames=1000000, job_fps=10, tag="nopersist")
    load.feeding = False
    load.start()
    load.run_for(5)
    running_before = [j for j in book.jobs if (book.job_hash(j).get("status") == "running")]
    t0 = now_ms()
    redis.restart()
    load.run_for(15)
    con = Redis(redis.port)
    after = {
        "job_hashes_left": sum(1 for j in book.jobs if con.cmd("EXISTS", "{%s}:job:%s" % (PREFIX, j))),
        "jobs_stream_len": con.cmd("XLEN", "{%s}:jobs" % PREFIX) if con.cmd("EXISTS", "{%s}:jobs" % PREFIX) else 0,
        "functions_loaded": bool(con.cmd("FUNCTION", "LIST")),
        "group_exists": False,
        "results_growing": 0,
    }
    try:
        after["group_exists"] = bool(con.cmd("XINFO", "GROUPS", "{%s}:jobs" % PREFIX))
    except RedisError:
        pass
    lens1 = [con.cmd("XLEN", "{%s:%s}:results" % (PREFIX, j)) for j in book.jobs]
    time.sleep(3)
    lens2 = [con.cmd("XLEN", "{%s:%s}:results" % (PREFIX, j)) for j in book.jobs]
    after["results_growing"] = sum(1 for a, b in zip(lens1, lens2) if b > a)
    running_after = 0
    for w in workers:
        code, body = w.get("/metrics")
        for line in (body or "").splitlines() if code == 200 else []:
            if line.startswith("freeroam_jobs_running "):
                running_after += int(float(line.split()[1]))
    after["worker_jobs_running"] = running_after
    after["workers_alive"] = sum(1 for w in workers if w.alive())
    # A job pushed after the restart still runs: the fleet set the server up again.
    probe = book.submit("redis://" + load.keys[0], fps=10, max_frames=5)
    end = time.time() + 20
    while time.time() < end and book.jobs[probe]["status"] is None:
        book.poll()
        time.sleep(0.3)
    after["new_job_after_restart"] = book.jobs[probe]["status"]
    load.producer.stop()
    for w in workers:
        w.stop()
    redis.stop()
    return {"running_before": len(running_before), "restart_at_ms": t0, **after}


def run(workdir):
    p = persistent_faults(workdir)
    n = unpersisted_restart(workdir)
    write_json(os.path.join(workdir, "summary.json"), {"scenario": "redis", "settings": SETTINGS,
                                                        "persistent": p, "unpersisted": n})
    restarts = p["restarts"]
    back_all = [b for r in restarts for b in r["ready_again_ms"]]
    line = ("redis: %d AOF restarts (%s workers went 503 per restart, back to ready %s); "
            "refused %d s: %d/3 went 503, ready %s after; paused %d ms: %d/3 went 503, ready %s "
            "after; %d jobs: %d completed, %d lost, %d dead-lettered, %d finished twice, "
            "%d duplicate frame entries, most attempts %d, %d leases lost; workers exited: %d. "
            "Without persistence: %d running jobs before the restart, %d job hashes left, "
            "%d results streams still growing, workers running %d jobs, a new job: %s" % (
                len(restarts), "/".join(str(r["workers_503"]) for r in restarts), ms_stats(back_all),
                p["refuse"]["down_ms"] // 1000, p["refuse"]["workers_503"], ms_stats(p["refuse"]["ready_again_ms"]),
                p["pause"]["down_ms"], p["pause"]["workers_503"], ms_stats(p["pause"]["ready_again_ms"]),
                p["jobs"], p["completed"], p["lost"], p["dead_letters"], p["finished_twice"],
                p["duplicate_frames"], p["max_attempts"], p["leases_lost"], len(p["exited"]),
                n["running_before"], n["job_hashes_left"], n["results_growing"],
                n["worker_jobs_running"], n["new_job_after_restart"]))
    ok = p["lost"] == 0 and not p["exited"] and p["finished_twice"] == 0
    return ok, line
