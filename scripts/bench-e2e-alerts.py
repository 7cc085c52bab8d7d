#!/usr/bin/env python3
"""Alert latency of `scripts/bench e2e camera`: matches each appearance of the box in each
alert job's stream with the job's `start` and `end` in `{prefix}:alerts`.

The box enters copy v at stream time 10 + v * PERIOD / VARIANTS + k * PERIOD s, always a whole
second, so its first frame is the first of segment number `enter`, and it is gone from the
first frame of segment `enter + VISIBLE`. The object's first frame is taken as captured when
that segment first appeared in its playlist (the `published` file: `c<v>_<k>.ts <ms>`): the
earliest any reader can have it. A start is on time when it is written within 1 s plus
`min_frames` sample intervals of that; an end must come after the box left. Appearances
too close to a job's first or last result to be judged are left out, and said so.
"""
import argparse
import json
import re
import subprocess


def redis(port, *args):
    out = subprocess.run(["redis-cli", "-p", str(port), "--json", *args],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out or "[]")


def entries(port, key):
    """(entry ms, fields) of every entry of stream `key`."""
    return [(int(i.split("-")[0]), dict(zip(f[::2], f[1::2]))) for i, f in redis(port, "XRANGE", key, "-", "+")]


def main():
    p = argparse.ArgumentParser()
    for name in ("port", "prefix", "jobs", "published"):
        p.add_argument(f"--{name}", required=True)
    for name in ("count", "variants", "period", "visible", "min-frames", "clear-ms"):
        p.add_argument(f"--{name}", type=int, required=True)
    p.add_argument("--fps", type=float, required=True)
    a = p.parse_args()

    published = {}
    for line in open(a.published):
        m = re.fullmatch(r"c(\d+)_(\d+)\.ts (\d+)", line.strip())
        if m:
            published[(int(m[1]), int(m[2]))] = int(m[3])
    alerts = entries(a.port, f"{{{a.prefix}}}:alerts")
    budget = 1000 + a.min_frames * 1000 / a.fps

    rows, misses, late, skipped, extra = [], 0, 0, 0, 0
    for i in range(1, a.count + 1):
        job = f"{a.jobs}{i}"
        v = (i - 1) % a.variants
        results = entries(a.port, f"{{{a.prefix}:{job}}}:results")
        results = [(ms, f) for ms, f in results if f.get("kind") == "result"]
        if not results:
            rows.append(f"| {job} | {v} | - | no results | | | | | |")
            misses += 1
            continue
        first, last = results[0][0], results[-1][0]
        mine = [(ms, f) for ms, f in alerts if f.get("job_id") == job and f.get("label") == "magenta"]
        starts = [(ms, f) for ms, f in mine if f.get("kind") == "start"]
        ends = {f["alert_id"]: (ms, f) for ms, f in mine if f.get("kind") == "end"}
        used = set()
        enter = 10 + v * a.period // a.variants
        newest = max((k for (c, k) in published if c == v), default=-1)
        while enter <= newest:
            pub_in = published.get((v, enter))
            pub_out = published.get((v, enter + a.visible))
            this = enter
            enter += a.period
            if pub_in is None:
                continue
            if pub_out is not None and pub_out < first or pub_in > last:
                continue  # before or after the job
            # The start written for this appearance: the first after the segment appeared
            # (less a little: the poller reads the playlist every 20 ms) and before the next.
            match = next(((ms, f) for ms, f in starts
                          if ms not in used and pub_in - 500 <= ms < pub_in + a.period * 1000 - 500), None)
            if pub_in < first + 1000 or pub_out is None or pub_out + a.clear_ms + 2000 > last:
                # In view as the job started, or leaving as it ended: not judged, but its
                # start (if any) is not one without an appearance either.
                skipped += 1
                if match:
                    used.add(match[0])
                continue
            if match is None:
                misses += 1
                rows.append(f"| {job} | {v} | {this} s | MISSED | | | | | |")
                continue
            used.add(match[0])
            start_ms, start = match
            end = ends.get(start["alert_id"])
            on_time = start_ms - pub_in <= budget
            late += not on_time
            if end is None:
                misses += 1
            end_cell = (f"{(end[0] - pub_out) / 1000:.2f} s ({end[1].get('reason', '')})"
                        if end else "MISSED")
            rows.append(
                f"| {job} | {v} | {this} s | {(start_ms - pub_in) / 1000:.2f} s "
                f"| {(start_ms - int(start['first_capture_ms'])) / 1000:.2f} s "
                f"| {'yes' if on_time else 'NO'} | {end_cell} "
                f"| {'yes' if end and end[0] > pub_out else 'NO'} | {start.get('peak_score', '')} |")
        extra += sum(1 for ms, _ in starts if ms not in used)
    print(f"# alert latency: box in view {a.visible} s every {a.period} s; jobs at fps {a.fps:g}, "
          f"alert_min_frames {a.min_frames}, alert_clear_ms {a.clear_ms}; a start is on time "
          f"within {budget / 1000:.2f} s of the segment with the box's first frame appearing")
    print("| job | copy | box enters (stream time) | start after the segment appeared "
          "| start after the worker's capture | on time | end after the box left (reason) "
          "| end after it left | peak coverage |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(r)
    judged = sum(1 for r in rows if "no results" not in r)
    print(f"# {judged} appearances judged: {misses} missed (start or end), {late} late, "
          f"{extra} starts with no appearance; {skipped} too near a job's start or end to judge")


if __name__ == "__main__":
    main()
