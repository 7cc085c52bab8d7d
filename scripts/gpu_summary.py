#!/usr/bin/env python3
"""Reads the log `scripts/gpu-check run` writes and prints its summary: the parity tests'
result, each family's time per frame at batch 1 and 8 beside PyTorch's on the same device,
in f32 and under bf16 autocast (as ratios, ours over theirs: under 1 is faster), and the frames per second each family
sustains at its best batch, with the live 2-FPS cameras that makes.

    python3 scripts/gpu_summary.py LOG

Tested on a recorded log by scripts/gpu_summary_test.py.
"""

import re
import sys

# The frame rate a live camera is sampled at by default (DEFAULT_FPS).
CAMERA_FPS = 2.0
# The batches timed on both sides.
COMPARED_BATCHES = (1, 8)

HEADER = re.compile(r"^== gpu-check (\S+) device=(\S+) size=(\S+)")
SECTION = re.compile(r"^== (\S+)$")
GPU = re.compile(r"^gpu: (.*)$")
TEST = re.compile(r"^test (\S+) \.\.\. (\w+)")
# What was timed is the first word: `image` (CLIP's image tower alone), `infer` or `caption`
# (the whole path from a 640x480 frame).
TIMING = re.compile(
    r"^\[(candle|torch)(\S*) \S+\] (\w+) (?:\S+ )?bs=(\d+) median=\S+ ms .*per-(?:frame|image)=([\d.]+) ms"
)
# The sides a family is timed on: ours, and PyTorch in f32 and under bf16 autocast.
SIDES = ("candle", "torch", "torch-bf16")
NO_REFERENCE = re.compile(r"^\[torch-\S+ \S+\] no reference")
FAILED = re.compile(r"^\[(candle|torch)-\S+ \S+\] failed")


class Family:
    def __init__(self, name):
        self.name = name
        # side (one of SIDES) -> (what was timed, batch) -> milliseconds per frame
        self.ms = {side: {} for side in SIDES}
        self.no_reference = False
        self.failed = []

    def whole_path(self):
        """Our milliseconds per frame by batch, for the whole path where it was timed."""
        ours = self.ms["candle"]
        whole = {bs: ms for (what, bs), ms in ours.items() if what != "image"}
        return whole or {bs: ms for (_, bs), ms in ours.items()}

    def best(self):
        """The batch with the fewest milliseconds per frame on our whole path, and that figure."""
        ours = self.whole_path()
        if not ours:
            return None
        bs = min(ours, key=lambda b: (ours[b], b))
        return bs, ours[bs]

    def compared(self, side, bs):
        """PyTorch's figure on `side` at batch `bs`, and ours for the same work."""
        for (what, b), theirs in self.ms[side].items():
            if b == bs:
                return self.ms["candle"].get((what, bs)), theirs
        return self.whole_path().get(bs), None


class Run:
    def __init__(self):
        self.date = self.device = self.size = None
        self.gpu = None
        self.passed, self.failed = [], []
        self.families = {}


def parse(text):
    run = Run()
    family = None
    for line in text.splitlines():
        if m := HEADER.match(line):
            run.date, run.device, run.size = m.groups()
        elif m := GPU.match(line):
            run.gpu = m.group(1)
        elif m := SECTION.match(line):
            name = m.group(1)
            family = None if name in ("parity", "summary") else run.families.setdefault(
                name, Family(name))
        elif m := TEST.match(line):
            if m.group(2) == "ok":
                run.passed.append(m.group(1))
            elif m.group(2) != "ignored":
                run.failed.append(m.group(1))
        elif family is None:
            continue
        elif m := TIMING.match(line):
            side, name, what, bs, ms = m.groups()
            if side == "torch" and "bf16" in name:
                side = "torch-bf16"
            family.ms[side][(what, int(bs))] = float(ms)
        elif NO_REFERENCE.match(line):
            family.no_reference = True
        elif m := FAILED.match(line):
            family.failed.append(m.group(1))
    return run


def render(run):
    out = [f"gpu-check {run.date} on {run.gpu} (device={run.device}, size={run.size})"]
    out.append(f"parity: {len(run.passed)} passed, {len(run.failed)} failed")
    out.extend(f"  FAILED {name}" for name in run.failed)
    # CLIP's row is the image tower alone on both sides (what PyTorch's script times); the
    # others and the capacity are the whole path from a 640x480 frame.
    out.append("ms per frame    bs      ours  torch f32  ratio  torch bf16  ratio")
    for fam in run.families.values():
        for bs in COMPARED_BATCHES:
            ours, _ = fam.compared("torch", bs)
            cells = [f"{fam.name:<14} {bs:>3}  {fmt(ours):>8}"]
            for side, width in (("torch", 9), ("torch-bf16", 10)):
                mine, theirs = fam.compared(side, bs)
                ratio = f"{mine / theirs:.2f}" if mine and theirs else "-"
                cells.append(f"{fmt(theirs):>{width}}  {ratio:>5}")
            if fam.no_reference:
                cells.append("(no PyTorch reference here)")
            out.append("  ".join(cells))
        for side in fam.failed:
            out.append(f"{fam.name:<10}      {side} side FAILED")
    out.append("capacity (our best batch): family, batch, frames/s, live cameras at 2 FPS")
    for fam in run.families.values():
        best = fam.best()
        if best is None:
            out.append(f"  {fam.name}: no timing")
            continue
        bs, ms = best
        fps = 1000.0 / ms if ms > 0 else float("inf")
        out.append(f"  {fam.name}: bs={bs} {fps:.1f} frames/s, {int(fps / CAMERA_FPS)} cameras")
    return "\n".join(out)


def fmt(ms):
    return "-" if ms is None else f"{ms:.2f}"


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: gpu_summary.py LOG")
    with open(sys.argv[1], encoding="utf-8") as f:
        print(render(parse(f.read())))


if __name__ == "__main__":
    main()
