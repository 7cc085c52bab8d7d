#!/usr/bin/env python3
"""Writes tests/parity/bytetrack.json: recorded detection sequences and the track ids that
Roboflow's ByteTrack (`trackers.ByteTrackTracker`, fixed-rate mode: one `update` per
frame, no timestamps) gives them.

The sequences are generated here, seeded: objects that move, stop, cross each other,
vanish for a few frames (or for longer than the lost-track buffer), enter late, with box
jitter, score noise that crosses the high/low and activation thresholds, low-score
clutter, detections in shuffled order, one sequence without scores (as PaliGemma gives
none) and some with non-default parameters.

The Rust test (src/tracker/parity.rs, `cargo test -p free-roam --lib tracker::parity`)
runs the project's tracker on the same boxes and requires the same track ids per
detection (`null` where the reference says -1), and after each frame the same confirmed
tracks with the same filtered boxes (`tracks`: `[id, x1, y1, x2, y2]`, the reference's
`tracked_objects`, to 1e-3 px).

Needs `trackers` 2.x from PyPI, in a virtual environment of its own:

    python3 -m venv ../venv-trackers
    ../venv-trackers/bin/pip install 'trackers>=2.6,<3'
    ../venv-trackers/bin/python scripts/parity/make_bytetrack_parity.py --out tests/parity
"""

import argparse
import json
from importlib.metadata import version
from pathlib import Path

import numpy as np
import supervision as sv
from trackers import ByteTrackTracker

DEFAULTS = {
    "lost_track_buffer": 30,
    "frame_rate": 30.0,
    "track_activation_threshold": 0.7,
    "minimum_consecutive_frames": 2,
    "minimum_iou_threshold": 0.1,
    "high_conf_det_threshold": 0.6,
}


class Obj:
    """One object: a box of size (w, h) whose top-left corner follows keyframes
    [(frame, x, y)] linearly, seen on the frames where `visible(frame)` holds, scored around
    `score` with noise `score_sd`."""

    def __init__(self, keys, w, h, score=0.85, score_sd=0.05, hidden=()):
        self.keys, self.w, self.h = keys, w, h
        self.score, self.score_sd = score, score_sd
        self.hidden = set(hidden)

    def at(self, f):
        keys = self.keys
        if f < keys[0][0] or f > keys[-1][0]:
            return None
        for (f0, x0, y0), (f1, x1, y1) in zip(keys, keys[1:]):
            if f0 <= f <= f1:
                t = 0.0 if f1 == f0 else (f - f0) / (f1 - f0)
                return x0 + t * (x1 - x0), y0 + t * (y1 - y0)
        return keys[-1][1], keys[-1][2]

    def visible(self, f):
        return self.at(f) is not None and f not in self.hidden


def render(objs, frames, rng, jitter=1.5, clutter=0.0, scores=True):
    """The detections of each frame: [(box, score)], shuffled."""
    out = []
    for f in range(frames):
        dets = []
        for o in objs:
            if not o.visible(f):
                continue
            x, y = o.at(f)
            box = np.array([x, y, x + o.w, y + o.h]) + rng.normal(0, jitter, 4)
            s = float(np.clip(rng.normal(o.score, o.score_sd), 0.02, 0.999))
            dets.append((box, s))
        if clutter and rng.random() < clutter:
            x, y = rng.uniform(0, 600), rng.uniform(0, 440)
            box = np.array([x, y, x + rng.uniform(10, 40), y + rng.uniform(10, 40)])
            dets.append((box, float(rng.uniform(0.1, 0.5))))
        order = rng.permutation(len(dets))
        dets = [dets[i] for i in order]
        out.append(
            [([round(float(v), 2) for v in b], round(s, 3) if scores else None) for b, s in dets]
        )
    return out


def crossing(rng):
    objs = [
        Obj([(0, 40, 200), (45, 500, 205)], 40, 90),
        Obj([(0, 500, 210), (45, 40, 200)], 42, 92),
        Obj([(10, 300, 40), (45, 300, 300)], 50, 50, score=0.8),
    ]
    return render(objs, 50, rng)


def stop_and_go(rng):
    objs = [
        Obj([(0, 20, 100), (15, 140, 100), (35, 140, 100), (55, 300, 130)], 40, 90),
        Obj([(0, 400, 300), (55, 400, 300)], 60, 40, score=0.9),
        Obj([(5, 600, 50), (30, 450, 60), (45, 450, 60), (55, 520, 60)], 30, 30, score=0.75),
    ]
    return render(objs, 56, rng, jitter=2.0)


def vanish(rng):
    objs = [
        # hidden for 3 frames: keeps its id
        Obj([(0, 30, 100), (50, 430, 120)], 40, 90, hidden=range(20, 23)),
        # hidden for 40 frames, past the 30-frame buffer: a new id
        Obj([(0, 300, 300), (70, 320, 310)], 50, 50, hidden=range(15, 55)),
        # leaves for good
        Obj([(0, 500, 20), (25, 600, 30)], 30, 60),
    ]
    return render(objs, 70, rng)


def noisy_scores(rng):
    objs = [
        Obj([(0, 50 + 100 * i, 100 + 20 * i), (60, 80 + 100 * i, 300 - 20 * i)], 45, 80,
            score=0.62 + 0.04 * i, score_sd=0.15)
        for i in range(5)
    ]
    return render(objs, 60, rng, jitter=2.5, clutter=0.5)


def crowd(rng):
    objs = []
    for _ in range(12):
        start = int(rng.integers(0, 20))
        end = start + int(rng.integers(15, 40))
        keys = [(start, rng.uniform(0, 560), rng.uniform(0, 380))]
        for f in range(start + 10, end + 1, 10):
            x, y = keys[-1][1:]
            keys.append((min(f, end), x + rng.normal(0, 40), y + rng.normal(0, 30)))
        hidden = set()
        if rng.random() < 0.4:
            h0 = int(rng.integers(start, end))
            hidden = set(range(h0, h0 + int(rng.integers(1, 5))))
        objs.append(Obj(keys, rng.uniform(25, 60), rng.uniform(40, 100),
                        score=rng.uniform(0.55, 0.95), score_sd=0.08, hidden=hidden))
    return render(objs, 50, rng, jitter=2.0, clutter=0.3)


def two_fps(rng):
    # A walking person at 2 FPS moves a good part of its width per frame; the buffer of
    # 30 frames at 30 FPS is 2 frames here.
    objs = [
        Obj([(0, 20, 150), (30, 470, 160)], 40, 90, hidden={12}),
        Obj([(0, 560, 300), (30, 200, 280)], 45, 95, hidden={8, 9, 10}),
    ]
    return render(objs, 30, rng, jitter=2.0)


def fast(rng):
    # Nearly a box width a frame, speeding up and slowing down: whether a box still
    # overlaps its track depends on where the Kalman filter predicts it.
    objs = [
        Obj([(0, 10, 100), (8, 150, 100), (16, 420, 110), (30, 560, 115)], 40, 90, hidden={20}),
        Obj([(0, 600, 300), (12, 330, 290), (30, 20, 280)], 45, 95),
        Obj([(3, 300, 20), (30, 310, 400)], 50, 30, score=0.8),
    ]
    return render(objs, 31, rng, jitter=3.0)


def no_scores(rng):
    objs = [
        Obj([(0, 40, 200), (40, 420, 205)], 40, 90, hidden={18}),
        Obj([(0, 420, 210), (40, 40, 200)], 42, 92),
        Obj([(20, 200, 30), (40, 240, 40)], 30, 30),
    ]
    return render(objs, 40, rng, scores=False)


SEQUENCES = [
    ("crossing", crossing, {}),
    ("stop_and_go", stop_and_go, {}),
    ("vanish", vanish, {}),
    ("noisy_scores", noisy_scores, {}),
    ("crowd", crowd, {}),
    ("two_fps", two_fps, {"frame_rate": 2.0}),
    ("fast", fast, {}),
    ("no_scores", no_scores, {}),
    ("params", noisy_scores, {
        "lost_track_buffer": 10, "frame_rate": 10.0, "track_activation_threshold": 0.5,
        "minimum_consecutive_frames": 3, "minimum_iou_threshold": 0.3,
        "high_conf_det_threshold": 0.5,
    }),
    ("no_buffer", crowd, {"lost_track_buffer": 0, "minimum_consecutive_frames": 1}),
]


def track(frames, params):
    """Each frame's ids per box, and the confirmed tracks' filtered boxes after it."""
    tracker = ByteTrackTracker(**params)
    ids, states = [], []
    for dets in frames:
        n = len(dets)
        xyxy = np.array([b for b, _ in dets], dtype=np.float64).reshape(n, 4)
        has_scores = n > 0 and dets[0][1] is not None
        conf = np.array([s for _, s in dets], dtype=np.float64) if has_scores else None
        d = sv.Detections(xyxy=xyxy, confidence=conf, data={"index": np.arange(n)})
        out = tracker.update(d)
        frame_ids = [None] * n
        for i, t in zip(out.data.get("index", []), out.tracker_id):
            frame_ids[int(i)] = None if int(t) == -1 else int(t)
        ids.append(frame_ids)
        alive = tracker.tracked_objects
        states.append([[int(t)] + [round(float(v), 3) for v in b]
                       for t, b in zip(alive.tracker_id, alive.xyxy)])
    return ids, states


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for bytetrack.json")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    sequences = []
    for k, (name, make, overrides) in enumerate(SEQUENCES):
        frames = make(np.random.default_rng(args.seed * 1000 + k))
        params = {**DEFAULTS, **overrides}
        ids, states = track(frames, params)
        sequences.append({
            "name": name,
            "params": params,
            "frames": [
                {"boxes": [b for b, _ in dets],
                 "scores": [s for _, s in dets] if dets and dets[0][1] is not None else None,
                 "track_ids": fids,
                 "tracks": tracks}
                for dets, fids, tracks in zip(frames, ids, states)
            ],
        })
    doc = {
        "reference": "trackers.ByteTrackTracker, fixed-rate mode (update per frame, no timestamp)",
        "versions": {p: version(p) for p in ["trackers", "supervision", "numpy", "scipy"]},
        "seed": args.seed,
        "sequences": sequences,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bytetrack.json"
    path.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    total = sum(len(s["frames"]) for s in sequences)
    tracks = sum(len({i for f in s["frames"] for i in f["track_ids"] if i is not None})
                 for s in sequences)
    print(f"wrote {path}: {len(sequences)} sequences, {total} frames, {tracks} tracks")


if __name__ == "__main__":
    main()
