"""What every fault scenario runs on: private redis-server and `free-roam worker` processes
on free ports, a producer of raw frames, the job book (submitted jobs, their end and their
results), health polling and the small statistics the summaries print."""

import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

from resp import Redis, RedisError, entries, pairs, text

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PREFIX = "fr"
# Raw frames this small keep the suite light on a shared machine: it tests the queue and the
# pipeline, not the model.
FRAME_W, FRAME_H = 64, 48


def now_ms():
    return int(time.time() * 1000)


def log(msg):
    print(time.strftime("%H:%M:%S ") + msg, flush=True)


def env_int(name, default):
    return int(os.environ.get(name, default))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary():
    """The worker binary: FREE_ROAM_BIN, else the debug build of this checkout."""
    path = os.environ.get("FREE_ROAM_BIN") or os.path.join(ROOT, "target/debug/free-roam")
    if not os.access(path, os.X_OK):
        raise SystemExit(f"no worker binary at {path}: build it (cargo build --bin free-roam) or set FREE_ROAM_BIN")
    return path


def percentile(values, p):
    if not values:
        return None
    v = sorted(values)
    k = max(0, min(len(v) - 1, int(round(p / 100.0 * len(v) + 0.5)) - 1))
    return v[k]


def ms_stats(values):
    """p50/p99/max of a list of milliseconds, as text."""
    if not values:
        return "n=0"
    return "n=%d p50=%d p99=%d max=%d ms" % (
        len(values), percentile(values, 50), percentile(values, 99), max(values))


class RedisServer:
    """A private redis-server; `restart` keeps its port and data directory."""

    def __init__(self, workdir, persist=True, port=None):
        self.port = port or free_port()
        self.dir = os.path.join(workdir, "redis-%d" % self.port)
        os.makedirs(self.dir, exist_ok=True)
        self.persist = persist
        self.proc = None
        self.start()

    def start(self):
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", self.dir, "--daemonize", "no", "--save", "",
                "--logfile", os.path.join(self.dir, "redis.log")]
        if self.persist:
            # Every write is fsynced before the next event-loop turn: a clean restart
            # loses nothing, a crash at most a second.
            args += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            args += ["--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                if Redis(self.port, timeout=1).cmd("PING") == "PONG":
                    return
            except (OSError, ConnectionError, RedisError):
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start on port %d" % self.port)

    def stop(self, sig=signal.SIGTERM):
        """Stops the server (SIGTERM: a clean shutdown that writes the AOF)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self):
        self.stop()
        self.start()

    def client(self, timeout=10.0):
        return Redis(self.port, timeout=timeout)

    def url(self):
        return "redis://127.0.0.1:%d" % self.port


class Worker:
    """One `free-roam worker` process with its own health port and log file."""

    seq = 0

    def __init__(self, redis, workdir, settings):
        Worker.seq += 1
        self.id = "w%d" % Worker.seq
        self.health = free_port()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "REDIS_URL": redis.url(),
            "KEY_PREFIX": PREFIX,
            "MODEL_TYPE": "null",
            "WORKER_ID": self.id,
            "HEALTH_ADDR": "127.0.0.1:%d" % self.health,
            "LOG_LEVEL": "warn",
        }
        env.update({k: str(v) for k, v in settings.items()})
        self.log_path = os.path.join(workdir, "%s.log" % self.id)
        self.log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen([binary(), "worker"], env=env, stdout=self.log_file,
                                     stderr=subprocess.STDOUT)
        self.started = time.time()

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def get(self, path, timeout=2.0):
        """(status, body) of a GET on the health endpoint, or (None, error)."""
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d%s" % (self.health, path),
                                        timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except (OSError, ValueError) as e:
            return None, str(e)

    def ready(self):
        return self.get("/health/ready")[0] == 200

    def wait_ready(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if not self.alive():
                raise RuntimeError("worker %s exited with %s (log: %s)" % (
                    self.id, self.proc.returncode, self.log_path))
            if self.ready():
                return time.time() - self.started
            time.sleep(0.05)
        raise RuntimeError("worker %s not ready within %d s" % (self.id, timeout))

    def signal(self, sig):
        if self.alive():
            self.proc.send_signal(sig)

    def wait(self, timeout):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self):
        self.signal(signal.SIGTERM)
        if self.wait(20) is None:
            self.proc.kill()
            self.proc.wait()
        self.log_file.close()


def raw_frame(shade):
    return bytes([shade % 256]) * (FRAME_W * FRAME_H * 3)


class Producer(threading.Thread):
    """Appends one raw frame every 1/fps seconds to each of its frame streams (capped), on
    its own connection; rides out Redis outages (frames of an outage are simply not made,
    as a camera's would be lost)."""

    def __init__(self, redis, keys, fps=5.0, maxlen=300):
        super().__init__(daemon=True)
        self.redis, self.keys, self.period, self.maxlen = redis, list(keys), 1.0 / fps, maxlen
        self.stop_event = threading.Event()
        self.frames = 0
        self.errors = 0
        self.lock = threading.Lock()

    def add_key(self, key):
        with self.lock:
            if key not in self.keys:
                self.keys.append(key)

    def remove_key(self, key):
        with self.lock:
            if key in self.keys:
                self.keys.remove(key)

    def run(self):
        con = Redis(self.redis.port, timeout=2)
        n = 0
        next_t = time.time()
        while not self.stop_event.is_set():
            ts = now_ms()
            with self.lock:
                keys = list(self.keys)
            data = raw_frame(n)
            cmds = [("XADD", k, "MAXLEN", "~", self.maxlen, "*", "data", data, "width", FRAME_W,
                     "height", FRAME_H, "format", "rgb24", "ts", ts) for k in keys]
            try:
                if cmds:
                    con.pipeline(cmds)
                    self.frames += len(cmds)
            except (OSError, ConnectionError):
                self.errors += 1
            n += 1
            next_t += self.period
            delay = next_t - time.time()
            if delay > 0:
                self.stop_event.wait(delay)
            else:
                next_t = time.time()

    def stop(self):
        self.stop_event.set()
        self.join(5)


FINAL = {"completed", "failed", "cancelled", "dead"}
# QUEUE_SHARDS=K runs a scenario on a queue of K shards (`queue_shards` in {fr}:settings,
# written before any worker starts): jobs go in with fr_submit, each to its id's shard.
SHARDS = env_int("QUEUE_SHARDS", 1)


def shard_of_job(job_id):
    """FNV-1a of the id modulo the shard count, as `free-roam submit` picks a shard."""
    h = 0x811C9DC5
    for b in job_id.encode():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h % SHARDS


def shard_tag(shard):
    return "{%s}" % PREFIX if shard == 0 else "{%s:q%d}" % (PREFIX, shard)


class JobBook:
    """Every job a scenario submits: its entry id, its end as the job hash and its result
    stream tell it, and per-job figures read from its results once it has ended."""

    def __init__(self, redis):
        self.redis = redis
        self.con = Redis(redis.port)
        self.jobs = {}  # job_id -> dict
        self.by_entry = {}  # (shard, entry id) -> job_id
        self.seq = 0
        if SHARDS > 1:
            self.con.cmd("HSET", "{%s}:settings" % PREFIX, "queue_shards", SHARDS)

    def submit(self, stream_ref, **fields):
        self.seq += 1
        job_id = fields.pop("job_id", None) or "j%05d" % self.seq
        shard = shard_of_job(job_id)
        if SHARDS > 1:
            args = ["FCALL", "fr_submit", 1, shard_tag(shard), job_id, "stream_ref", stream_ref]
        else:
            args = ["XADD", "{%s}:jobs" % PREFIX, "*", "stream_ref", stream_ref, "job_id", job_id]
        for k, v in fields.items():
            args += [k, v]
        entry = text(self.con.cmd(*args))
        self.jobs[job_id] = {"id": job_id, "entry": entry, "stream_ref": stream_ref,
                             "submitted_ms": now_ms(), "status": None, "fields": fields}
        self.by_entry[(shard, entry)] = job_id
        return job_id

    def job_key(self, job_id):
        return "%s:job:%s" % (shard_tag(shard_of_job(job_id)), job_id)

    def open_jobs(self):
        return [j for j in self.jobs.values() if j["status"] not in FINAL]

    def poll(self):
        """Reads the status of every open job; returns the jobs that reached a final one."""
        open_jobs = self.open_jobs()
        if not open_jobs:
            return []
        replies = self.con.pipeline(
            [("HGET", self.job_key(j["id"]), "status") for j in open_jobs])
        done = []
        for j, r in zip(open_jobs, replies):
            if isinstance(r, RedisError):
                continue
            status = text(r)
            j["last_status"] = status
            if status in FINAL:
                j["status"] = status
                j["final_seen_ms"] = now_ms()
                done.append(j)
        return done

    def results(self, job_id):
        return entries(self.con.cmd("XRANGE", "{%s:%s}:results" % (PREFIX, job_id), "-", "+"))

    def job_hash(self, job_id):
        return pairs(self.con.cmd("HGETALL", self.job_key(job_id)))

    def progress(self, job_id):
        return pairs(self.con.cmd("HGETALL", "{%s:%s}:progress" % (PREFIX, job_id)))

    def pending_of(self, consumer):
        """Job ids whose entries `consumer` holds in the group's pending list."""
        held = []
        for shard in range(SHARDS):
            reply = self.con.cmd("XPENDING", shard_tag(shard) + ":jobs", "workers", "-", "+", 10000,
                                 consumer)
            held += [self.by_entry.get((shard, text(e[0])), "?" + text(e[0])) for e in (reply or [])]
        return held

    def events(self):
        """Job transitions from each shard's `events` stream: (time_ms, job_id, to, worker), in
        time order."""
        out = []
        for shard in range(SHARDS):
            out += self.shard_events(shard_tag(shard) + ":events")
        out.sort(key=lambda e: e[0])
        return out

    def shard_events(self, key):
        out = []
        last = "-"
        while True:
            batch = entries(self.con.cmd("XRANGE", key, last, "+", "COUNT", 5000))
            if last != "-" and batch and batch[0][0] == last:
                batch = batch[1:]
            if not batch:
                break
            for _, f in batch:
                if f.get("kind") == "job":
                    out.append((int(f.get("time_ms", 0)), f.get("job_id"), f.get("to"), f.get("worker")))
            last = batch[-1][0]
        return out

    def dead_letters(self):
        return sum(self.con.cmd("XLEN", shard_tag(s) + ":jobs:dead") for s in range(SHARDS))


def entry_ms(entry_id):
    return int(entry_id.split("-")[0])


def analyse_results(results, outages_ms=()):
    """Per-job figures from its result stream: frames answered, duplicates (one `frame`
    written twice), end entries, and frames skipped between two answered ones, split into
    those that fall in an outage of the job (a killed worker, its lease, a resume that
    starts at the newest frame) and the rest."""
    seen = {}
    ends = 0
    for eid, f in results:
        if f.get("kind") == "end":
            ends += 1
            continue
        fr = int(f["frame"])
        seen.setdefault(fr, []).append((eid, int(f.get("capture_ms", 0))))
    dups = sum(len(v) - 1 for v in seen.values())
    frames = sorted(seen)
    skipped_outage = skipped_other = 0
    gaps = []
    for a, b in zip(frames, frames[1:]):
        gap = b - a - 1
        if gap <= 0:
            continue
        lo, hi = seen[a][0][1], seen[b][0][1]
        if any(lo - 1000 <= t <= hi for t in outages_ms):
            skipped_outage += gap
        else:
            skipped_other += gap
            gaps.append({"after": a, "before": b, "capture_ms": [lo, hi]})
    return {"answered": len(frames), "dups": dups, "ends": ends, "gaps_elsewhere": gaps,
            "skipped_outage": skipped_outage, "skipped_other": skipped_other,
            "first_frame": frames[0] if frames else None}


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)


def rng():
    seed = int(os.environ.get("CHAOS_SEED", time.time()))
    return seed, random.Random(seed)


class Load:
    """A steady load: `slots` frame streams fed by one producer, each carrying one job at a
    time; a job that ends is replaced by a new one on its stream while `feeding` is on, so
    faults always hit running work."""

    def __init__(self, redis, book, slots, fps, job_frames, job_fps, tag):
        self.book = book
        self.keys = ["%s:cam:%02d" % (tag, i) for i in range(slots)]
        self.producer = Producer(redis, self.keys, fps=fps)
        self.job_frames, self.job_fps = job_frames, job_fps
        self.feeding = True
        self.slot_job = {}

    def start(self):
        self.producer.start()
        time.sleep(0.5)  # every stream exists before its first job
        for k in self.keys:
            self._submit(k)

    def _submit(self, key):
        self.slot_job[key] = self.book.submit("redis://" + key, fps=self.job_fps,
                                              max_frames=self.job_frames)

    def tick(self):
        """Polls the open jobs and replaces the ended ones; tolerates a Redis outage."""
        try:
            done = self.book.poll()
            if self.feeding:
                for j in done:
                    key = j["stream_ref"][len("redis://"):]
                    if self.slot_job.get(key) == j["id"]:
                        self._submit(key)
        except (OSError, ConnectionError):
            self.book.con.close()

    def run_for(self, seconds):
        end = time.time() + seconds
        while time.time() < end:
            self.tick()
            time.sleep(min(0.5, max(0, end - time.time())))

    def drain(self, timeout):
        """Stops feeding and waits for every job to end; returns the jobs still open."""
        self.feeding = False
        end = time.time() + timeout
        while time.time() < end and self.book.open_jobs():
            self.tick()
            time.sleep(0.5)
        self.producer.stop()
        return self.book.open_jobs()


def job_figures(book, outages_by_job=None, events=None):
    """Counts over every submitted job, from its hash, its result stream and the events:
    completed, lost (not completed), finished twice, duplicate frame entries, frames
    skipped in outages and elsewhere, the most attempts one job took."""
    outages_by_job = outages_by_job or {}
    events = events if events is not None else book.events()
    ends_in_events = {}
    for t, job, to, w in events:
        if to in FINAL:
            ends_in_events[job] = ends_in_events.get(job, 0) + 1
    fig = {"jobs": 0, "completed": 0, "lost": 0, "lost_ids": [], "finished_twice": 0,
           "duplicate_frames": 0, "frames_answered": 0, "skipped_in_outage": 0,
           "skipped_elsewhere": 0, "max_attempts": 0, "handoffs": 0, "statuses": {}}
    for j in book.jobs.values():
        fig["jobs"] += 1
        h = book.job_hash(j["id"])
        status = h.get("status")
        fig["statuses"][status] = fig["statuses"].get(status, 0) + 1
        fig["max_attempts"] = max(fig["max_attempts"], int(h.get("attempts", 0) or 0))
        fig["handoffs"] += int(h.get("handoffs", 0) or 0)
        res = book.results(j["id"])
        a = analyse_results(res, outages_by_job.get(j["id"], ()))
        j["analysis"] = a
        if status == "completed" and a["ends"] >= 1:
            fig["completed"] += 1
        else:
            fig["lost"] += 1
            fig["lost_ids"].append("%s:%s" % (j["id"], status))
        if a["ends"] > 1 or ends_in_events.get(j["id"], 0) > 1:
            fig["finished_twice"] += 1
        fig["duplicate_frames"] += a["dups"]
        fig["frames_answered"] += a["answered"]
        fig["skipped_in_outage"] += a["skipped_outage"]
        fig["skipped_elsewhere"] += a["skipped_other"]
        if a["skipped_other"] or a["dups"]:
            # Kept for tracing: the run's Redis is gone once the scenario ends.
            fig.setdefault("traced", []).append({"job": j["id"], "hash": h, **a})
    return fig


def takeover_ms(book, events, faults):
    """For each (time_ms, worker, job_ids) fault: per job still running, the time from the
    fault to the job's first result written after another worker claimed it; jobs never
    resumed are listed; and the steps on the way (fault to hand-back event, fault to the
    new claim)."""
    claims, queued = {}, {}
    for t, job, to, w in events:
        if to == "running":
            claims.setdefault(job, []).append((t, w))
        elif to == "queued":
            queued.setdefault(job, []).append(t)
    times, missing = [], []
    steps = {"handed_back_ms": [], "claimed_ms": []}
    results_cache = {}
    for t_fault, victim, jobs in faults:
        for job in jobs:
            if job not in results_cache:
                results_cache[job] = book.results(job)
            res = results_cache[job]
            end_ms = next((entry_ms(e) for e, f in res if f.get("kind") == "end"), None)
            if end_ms is not None and end_ms <= t_fault:
                continue
            claim = next((c for c in claims.get(job, []) if c[0] >= t_fault and c[1] != victim), None)
            if claim is None:
                missing.append(job)
                continue
            steps["claimed_ms"].append(claim[0] - t_fault)
            back = next((q for q in queued.get(job, []) if t_fault <= q <= claim[0]), None)
            if back is not None:
                steps["handed_back_ms"].append(back - t_fault)
            first = next((entry_ms(e) for e, f in res
                          if f.get("kind") != "end" and entry_ms(e) >= claim[0]), None)
            if first is None:
                first = end_ms if end_ms is not None and end_ms >= claim[0] else None
            if first is None:
                missing.append(job)
            else:
                times.append(first - t_fault)
    return times, missing, steps
