"""Soak: 8 live streams on one worker for SOAK_S seconds (4 live HLS playlists read by
ffmpeg children, 4 Redis frame streams), sampling every 10 s the worker's RSS, open file
descriptors and child processes and Redis' used_memory; writes soak.csv and a table, and
says whether each series is flat (after a warm-up third, last third against first third)."""

import http.server
import functools
import os
import socketserver
import subprocess
import threading
import time

from fleet import JobBook, Producer, RedisServer, Worker, free_port, log, env_int, write_json, PREFIX

SETTINGS = {
    "MAX_CONCURRENT_STREAMS": 8,
    # A cap the soak reaches (2 results/s per job: in about 250 s), so the plateau shows.
    "RESULTS_MAXLEN": 500,
    "SCENE_GATE": "false",
    "MAX_FRAME_SIDE": 160,
}
# A series is called flat when the last third's mean is within this share of the first
# third's (both after the warm-up third).
FLAT_SHARE = 0.05


def proc_figures(pid):
    rss = 0
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    fds = len(os.listdir("/proc/%d/fd" % pid))
    children = 0
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open("/proc/%s/stat" % p) as f:
                    stat = f.read()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    children += 1
            except (OSError, ValueError, IndexError):
                pass
    return rss, fds, children


def live_encoder(directory, seconds):
    os.makedirs(directory, exist_ok=True)
    return subprocess.Popen(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-re", "-f", "lavfi",
         "-i", "testsrc2=size=160x120:rate=10", "-t", str(seconds), "-c:v", "libx264",
         "-preset", "ultrafast", "-g", "10", "-f", "hls", "-hls_time", "1",
         "-hls_list_size", "6", "-hls_flags", "delete_segments",
         os.path.join(directory, "live.m3u8")], stdin=subprocess.DEVNULL)


def serve_dir(directory, port):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    handler = functools.partial(Quiet, directory=directory)

    class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True
        allow_reuse_address = True

    server = Server(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def flatness(values):
    n = len(values)
    body = values[n // 3:]
    k = len(body) // 3
    if k == 0:
        return None, "too short"
    first = sum(body[:k]) / k
    last = sum(body[-k:]) / k
    change = (last - first) / first if first else (0.0 if last == 0 else float("inf"))
    return change, "flat" if abs(change) <= FLAT_SHARE else "NOT flat"


def run(workdir):
    soak_s = env_int("SOAK_S", 1800)
    n_hls = env_int("SOAK_HLS", 4)
    n_redis = env_int("SOAK_REDIS", 4)
    redis = RedisServer(workdir, persist=False)
    book = JobBook(redis)
    worker = Worker(redis, workdir, SETTINGS)
    worker.wait_ready()
    hls_dir = os.path.join(workdir, "hls")
    encoder = live_encoder(hls_dir, soak_s + 120)
    http_port = free_port()
    server = serve_dir(hls_dir, http_port)
    while not os.path.exists(os.path.join(hls_dir, "live.m3u8")):
        time.sleep(0.2)
    keys = ["soak:cam:%d" % i for i in range(n_redis)]
    producer = Producer(redis, keys, fps=5, maxlen=300)
    producer.start()
    time.sleep(0.5)
    for i in range(n_hls):
        book.submit("http://127.0.0.1:%d/live.m3u8" % http_port, fps=2, job_id="soak-hls-%d" % i)
    for k in keys:
        book.submit("redis://" + k, fps=2, job_id="soak-" + k.replace(":", "-"))
    con = redis.client()
    csv_path = os.path.join(workdir, "soak.csv")
    rows = []
    start = time.time()
    with open(csv_path, "w") as out:
        out.write("t_s,worker_rss_kib,worker_fds,worker_children,redis_used_memory,jobs_running,results_entries\n")
        next_t = start
        while time.time() - start < soak_s:
            next_t += 10
            time.sleep(max(0, next_t - time.time()))
            rss, fds, children = proc_figures(worker.pid)
            used = int([l for l in con.cmd("INFO", "memory").decode().splitlines()
                        if l.startswith("used_memory:")][0].split(":")[1])
            running = sum(1 for j in book.jobs
                          if (con.cmd("HGET", "{%s}:job:%s" % (PREFIX, j), "status") or b"") == b"running")
            results = sum(con.cmd("XLEN", "{%s:%s}:results" % (PREFIX, j)) for j in book.jobs)
            row = (round(time.time() - start), rss, fds, children, used, running, results)
            rows.append(row)
            out.write(",".join(map(str, row)) + "\n")
            out.flush()
            if len(rows) % 6 == 0:
                log("soak: t=%ds rss=%d KiB fds=%d children=%d used_memory=%d running=%d results=%d" % row)
    statuses = {j: book.job_hash(j).get("status") for j in book.jobs}
    errors = {j: book.job_hash(j).get("error") for j in book.jobs if statuses[j] != "running"}
    producer.stop()
    worker_alive = worker.alive()
    worker.stop()
    encoder.kill()
    encoder.wait()
    server.shutdown()
    redis.stop()
    verdicts = {}
    for i, name in enumerate(["worker_rss_kib", "worker_fds", "worker_children", "redis_used_memory"]):
        series = [r[i + 1] for r in rows]
        change, verdict = flatness(series)
        verdicts[name] = {"change": change, "verdict": verdict,
                          "min": min(series) if series else None, "max": max(series) if series else None}
    step = max(1, len(rows) // 15)
    table = ["| t (s) | worker RSS (MiB) | fds | children | Redis used_memory (MiB) | jobs running | result entries |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows[::step] + ([rows[-1]] if rows and (len(rows) - 1) % step else []):
        table.append("| %d | %.1f | %d | %d | %.2f | %d | %d |" % (
            r[0], r[1] / 1024, r[2], r[3], r[4] / 2**20, r[5], r[6]))
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    print("\n".join(table))
    write_json(os.path.join(workdir, "summary.json"), {"scenario": "soak", "settings": SETTINGS,
                                                        "soak_s": soak_s, "samples": len(rows),
                                                        "statuses": statuses, "errors": errors,
                                                        "verdicts": verdicts, "worker_alive": worker_alive})
    running_end = sum(1 for s in statuses.values() if s == "running")
    line = "soak: %d streams for %d s, %d samples; %s; %d/%d jobs still running at the end%s" % (
        len(book.jobs), soak_s, len(rows),
        ", ".join("%s %s (%+.1f%%, %s..%s)" % (k, v["verdict"], 100 * (v["change"] or 0), v["min"], v["max"])
                  for k, v in verdicts.items()),
        running_end, len(book.jobs), "" if worker_alive else "; the worker EXITED")
    ok = worker_alive and running_end == len(book.jobs) and all(
        v["verdict"] == "flat" for v in verdicts.values())
    return ok, line
