"""Worker loss: three workers under a steady load of frame-stream jobs, one SIGKILLed at
random every 3 to 8 s and replaced, KILLS times; then every job is checked for loss,
double ends, duplicate frames and skipped frames, and each kill's jobs for how long they
took to resume on another worker."""

import os
import signal
import time

from fleet import (Load, JobBook, RedisServer, Worker, job_figures, log, ms_stats, now_ms,
                   percentile, rng, takeover_ms, env_int, write_json)

LEASE_MS = 3000
SETTINGS = {
    "JOB_LEASE_MS": LEASE_MS,
    "RECLAIM_INTERVAL_MS": 500,
    # Room for every job on two workers, so the survivors of a kill take its jobs at once.
    "MAX_CONCURRENT_STREAMS": 30,
    # Every death here is the suite's, not the job's: a job killed more often than the
    # default 3 times is not a poison job. The most attempts any job took is reported.
    "MAX_ATTEMPTS": 1000,
    # Keep every transition, for the analysis.
    "EVENTS_MAXLEN": 1000000,
}


def run(workdir):
    kills = env_int("KILLS", 100)
    n_workers = env_int("KILL_WORKERS", 3)
    slots = env_int("KILL_JOBS", 60)
    job_frames = env_int("KILL_JOB_FRAMES", 50)
    seed, r = rng()
    redis = RedisServer(workdir, persist=False)
    book = JobBook(redis)
    workers = [Worker(redis, workdir, SETTINGS) for _ in range(n_workers)]
    for w in workers:
        w.wait_ready()
    # The producer writes 5 frames/s per stream; jobs sample at 10 fps, so every frame gets
    # its own sampling slot and a frame skipped outside a fault is a real miss.
    load = Load(redis, book, slots, fps=5, job_frames=job_frames, job_fps=10, tag="kills")
    load.start()
    log("kills: %d workers, %d jobs of %d frames, lease %d ms, seed %d" % (
        n_workers, slots, job_frames, LEASE_MS, seed))
    faults = []
    outages = {}
    started = time.time()
    exits_other = 0
    for k in range(kills):
        load.run_for(r.uniform(3, 8))
        victim = r.choice(workers)
        jobs = book.pending_of(victim.id)
        t = now_ms()
        victim.signal(signal.SIGKILL)
        victim.wait(10)
        victim.log_file.close()
        faults.append((t, victim.id, jobs))
        for j in jobs:
            outages.setdefault(j, []).append(t)
        workers.remove(victim)
        for w in workers:
            if not w.alive():
                exits_other += 1
        workers.append(Worker(redis, workdir, SETTINGS))
        if (k + 1) % 10 == 0:
            log("kills: %d/%d, %d jobs so far" % (k + 1, kills, len(book.jobs)))
    chaos_s = time.time() - started
    open_jobs = load.drain(timeout=LEASE_MS / 1000 + job_frames / 5 + 60)
    events = book.events()
    fig = job_figures(book, outages, events)
    times, never, steps = takeover_ms(book, events, faults)
    dead = book.dead_letters()
    for w in workers:
        if not w.alive():
            exits_other += 1
        w.stop()
    redis.stop()
    summary = {
        "scenario": "kills", "seed": seed, "settings": SETTINGS, "kills": len(faults),
        "chaos_s": round(chaos_s), "jobs_hit": sum(len(f[2]) for f in faults),
        "open_after_drain": [j["id"] for j in open_jobs], "dead_letters": dead,
        "unexpected_worker_exits": exits_other, "resume_ms": sorted(times),
        "not_resumed": never, "steps": steps, **fig,
    }
    write_json(os.path.join(workdir, "summary.json"), summary)
    p99 = percentile(times, 99)
    line = ("kills: %d kills in %d s, %d jobs: %d completed, %d lost, %d finished twice, "
            "%d duplicate frame entries, frames answered %d, skipped %d in a kill's outage "
            "and %d elsewhere, dead-lettered %d, most attempts %d; kill to resumption %s "
            "(goal <= %d ms: %s), %d jobs never resumed" % (
                len(faults), chaos_s, fig["jobs"], fig["completed"], fig["lost"],
                fig["finished_twice"], fig["duplicate_frames"], fig["frames_answered"],
                fig["skipped_in_outage"], fig["skipped_elsewhere"], dead, fig["max_attempts"],
                ms_stats(times), LEASE_MS + 1000,
                "met" if p99 is not None and p99 <= LEASE_MS + 1000 else "MISSED", len(never)))
    ok = fig["lost"] == 0 and fig["finished_twice"] == 0 and not never and exits_other == 0
    return ok, line
