"""Rolling restart: three workers under a steady load; each round starts a replacement,
waits for it to be ready, and sends SIGTERM to the oldest worker, whose jobs must move to
the others at once (hand-off well under a lease), none lost, none dead-lettered."""

import os
import signal
import time

from fleet import (Load, JobBook, RedisServer, Worker, job_figures, log, ms_stats, now_ms,
                   percentile, rng, takeover_ms, env_int, write_json)

SETTINGS = {
    # A long lease: a job that waited it out instead of being handed back would show.
    "JOB_LEASE_MS": 15000,
    "RECLAIM_INTERVAL_MS": 500,
    "MAX_CONCURRENT_STREAMS": 30,
    "SHUTDOWN_TIMEOUT_MS": 10000,
    "EVENTS_MAXLEN": 1000000,
}


def run(workdir):
    rounds = env_int("ROLLING_ROUNDS", 20)
    slots = env_int("ROLLING_JOBS", 30)
    job_frames = env_int("ROLLING_JOB_FRAMES", 100)
    seed, r = rng()
    redis = RedisServer(workdir, persist=False)
    book = JobBook(redis)
    workers = [Worker(redis, workdir, SETTINGS) for _ in range(3)]
    for w in workers:
        w.wait_ready()
    load = Load(redis, book, slots, fps=5, job_frames=job_frames, job_fps=10, tag="rolling")
    load.start()
    log("rolling: 3 workers, %d jobs of %d frames, %d rounds" % (slots, job_frames, rounds))
    faults, outages, exit_codes, exit_ms = [], {}, [], []
    load.run_for(3)
    for k in range(rounds):
        fresh = Worker(redis, workdir, SETTINGS)
        while not fresh.ready():
            load.tick()
            time.sleep(0.1)
            if not fresh.alive():
                raise RuntimeError("replacement worker exited: see %s" % fresh.log_path)
        victim = workers.pop(0)
        workers.append(fresh)
        jobs = book.pending_of(victim.id)
        t = now_ms()
        victim.signal(signal.SIGTERM)
        while victim.alive() and time.time() - t / 1000 < 30:
            load.tick()
            time.sleep(0.05)
        code = victim.wait(1)
        exit_codes.append(code)
        exit_ms.append(now_ms() - t)
        victim.log_file.close()
        faults.append((t, victim.id, jobs))
        for j in jobs:
            outages.setdefault(j, []).append(t)
        load.run_for(r.uniform(2, 4))
        log("rolling: round %d/%d: %s had %d jobs, exit %s in %d ms" % (
            k + 1, rounds, victim.id, len(jobs), code, exit_ms[-1]))
    open_jobs = load.drain(timeout=job_frames / 5 + 60)
    events = book.events()
    fig = job_figures(book, outages, events)
    times, never, steps = takeover_ms(book, events, faults)
    dead = book.dead_letters()
    for w in workers:
        w.stop()
    redis.stop()
    bad_exits = [c for c in exit_codes if c != 0]
    summary = {"scenario": "rolling", "seed": seed, "settings": SETTINGS, "rounds": rounds,
               "handoff_ms": sorted(times), "not_resumed": never, "steps": steps, "exit_codes": exit_codes,
               "exit_ms": exit_ms, "dead_letters": dead,
               "open_after_drain": [j["id"] for j in open_jobs], **fig}
    write_json(os.path.join(workdir, "summary.json"), summary)
    p99 = percentile(times, 99)
    line = ("rolling: %d rounds, %d jobs: %d completed, %d lost, %d dead-lettered, %d finished "
            "twice, %d duplicate frame entries, %d hand-offs recorded; SIGTERM to resumption "
            "%s (goal p99 < 1000 ms: %s; SIGTERM to hand-back %s, to the new claim %s); worker exit after SIGTERM %s, %d non-zero exits" % (
                rounds, fig["jobs"], fig["completed"], fig["lost"], dead, fig["finished_twice"],
                fig["duplicate_frames"], fig["handoffs"], ms_stats(times),
                "met" if p99 is not None and p99 < 1000 else "MISSED", ms_stats(steps["handed_back_ms"]),
                ms_stats(steps["claimed_ms"]), ms_stats(exit_ms),
                len(bad_exits)))
    ok = (fig["lost"] == 0 and dead == 0 and not never and not bad_exits
          and p99 is not None and p99 < 1000)
    return ok, line
