"""Stream faults: jobs on a misbehaving HLS server (stalling, answering 500, truncating
segments, a live playlist that never grows), on a frame stream deleted mid-job, and on an
RTSP camera that goes away, all at once on one worker. Each must end within STREAM_S in a
failed job with a clear error (after its bounded retries), never hang."""

import os
import subprocess
import time

from badhls import BadHls
from fleet import (JobBook, Producer, RedisServer, Worker, entry_ms, free_port, log, now_ms,
                   env_int, write_json, PREFIX)

SETTINGS = {
    # Two restarts instead of five keep the suite short; the backoff and the 30 s stall
    # timeout are the worker's own.
    "SOURCE_RETRIES": 2,
    "JOB_LEASE_MS": 5000,
    "MAX_FRAME_SIDE": 160,
}


def start_rtsp(port):
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3"
    script = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "rtsp", "serve.py")
    proc = subprocess.Popen([python, script, str(port)], stdout=subprocess.PIPE)
    line = proc.stdout.readline().decode().strip()
    if line != "ready":
        proc.kill()
        return None
    return proc


def run(workdir):
    bound_s = env_int("STREAM_S", 300)
    redis = RedisServer(workdir, persist=False)
    book = JobBook(redis)
    worker = Worker(redis, workdir, SETTINGS)
    worker.wait_ready()
    hls = BadHls(os.path.join(workdir, "hls"), free_port())
    producer = Producer(redis, ["stream:deleted"], fps=5)
    producer.start()
    time.sleep(0.5)
    rtsp_port = free_port()
    rtsp = start_rtsp(rtsp_port)
    cases = {}  # job -> (fault, fault time ms)
    t = now_ms()
    for mode, fault in [("stall", "HLS segment body stalls"), ("e500", "HLS answers 500"),
                        ("trunc", "HLS segments truncated"), ("frozen", "live playlist never grows")]:
        cases[book.submit(hls.url(mode), fps=2, job_id="hls-" + mode)] = [fault, t]
    cases[book.submit("redis://stream:deleted", fps=5, job_id="deleted")] = ["frame stream deleted mid-job", None]
    if rtsp:
        cases[book.submit("rtsp://127.0.0.1:%d/cam" % rtsp_port, fps=2, job_id="rtsp-drop")] = [
            "RTSP server goes away", None]
    # Let the redis and rtsp jobs run first, then break their sources.
    time.sleep(8)
    producer.remove_key("stream:deleted")
    producer.stop()
    book.con.cmd("DEL", "stream:deleted")
    cases["deleted"][1] = now_ms()
    if rtsp:
        rtsp.kill()
        rtsp.wait()
        cases["rtsp-drop"][1] = now_ms()
    log("stream: sources broken; waiting up to %d s for every job to end" % bound_s)
    end = time.time() + bound_s
    while time.time() < end and book.open_jobs():
        book.poll()
        time.sleep(1)
    rows = []
    for job, (fault, t_fault) in cases.items():
        h = book.job_hash(job)
        p = book.progress(job)
        res = book.results(job)
        status = h.get("status")
        final = book.jobs[job]["status"]
        last_result_ms = max((entry_ms(e) for e, f in res if f.get("kind") != "end"), default=0)
        row = {"job": job, "fault": fault, "status": status,
               # Still answering frames when the bound came: running, not hung.
               "progressing": not final and now_ms() - last_result_ms < 10000,
               "error": h.get("error", ""), "note": p.get("note", ""),
               "results": sum(1 for _, f in res if f.get("kind") != "end"),
               "seconds_to_end": round((int(h["finished_ms"]) - t_fault) / 1000, 1)
               if final and h.get("finished_ms") else None}
        rows.append(row)
        if not final:
            book.con.cmd("FCALL", "fr_cancel", 1, "{%s}" % PREFIX, job)
        log("stream: %s: %s after %s s, %d results: %s%s" % (
            job, status, row["seconds_to_end"], row["results"], row["error"][:300],
            " (note: %s)" % row["note"] if not final else ""))
    hls.stop()
    worker.stop()
    redis.stop()
    write_json(os.path.join(workdir, "summary.json"), {"scenario": "stream", "settings": SETTINGS,
                                                        "bound_s": bound_s, "rtsp": bool(rtsp), "jobs": rows})
    hung = [r for r in rows if r["seconds_to_end"] is None and not r["progressing"]]
    going = [r for r in rows if r["progressing"]]
    failed = [r for r in rows if r["status"] == "failed"]
    line = ("stream: %d faults: %d failed with an error (%s), %d other ends, %d still answering "
            "frames after %d s (%s), %d hung (%s)%s") % (
        len(rows), len(failed),
        ", ".join("%s %ss" % (r["job"], r["seconds_to_end"]) for r in failed),
        len(rows) - len(failed) - len(hung) - len(going),
        len(going), bound_s, ", ".join("%s %d results" % (r["job"], r["results"]) for r in going),
        len(hung), ", ".join(r["job"] for r in hung),
        "" if rtsp else "; RTSP not run (no GStreamer RTSP server)")
    return not hung, line
