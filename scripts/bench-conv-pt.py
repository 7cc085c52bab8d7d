#!/usr/bin/env python3
"""Times PyTorch's convolutions on the layers `examples/bench_conv.rs` times (a
YOLOv8s-shaped network at 640x384): each layer `nn.Conv2d` with bias, then SiLU where the
layer has it, as Ultralytics runs a `Conv` block whose batch norm is fused, on an input of
the layer's own shape, NCHW. Batch 1 and 4 (BENCH_BATCHES), on 2 threads. With `bf16`, the
layers run under `torch.autocast("cpu", dtype=torch.bfloat16)`.

    python scripts/bench-conv-pt.py SHAPES_JSON [TAG] [ITERS] [f32|bf16]

BENCH_LAYERS=1 adds a line per layer, as the candle side does. SHAPES_JSON is what `bench_conv shapes` prints: `[in, out, kernel, stride, h, w, silu]` per
layer. Lines look like the candle side's:
`[torch TAG] conv-stack impl=f32 bs=1 median=... ms per-image=... 1x1=... 3x3s1=... 3x3s2=... best=...`
"""

import contextlib
import json
import os
import sys
import time

import torch


def group(kernel, stride):
    if kernel == 1:
        return 0
    return 1 if stride == 1 else 2


def main():
    layers = json.load(open(sys.argv[1]))
    tag = sys.argv[2] if len(sys.argv) > 2 else "run"
    iters = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    dtype = sys.argv[4] if len(sys.argv) > 4 else "f32"
    batches = [int(b) for b in os.environ.get("BENCH_BATCHES", "1,4").split(",")]
    torch.set_num_threads(2)
    torch.manual_seed(0)

    def precision():
        if dtype == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    for batch in batches:
        prepared = []
        for inp, out, k, s, h, w, silu in layers:
            conv = torch.nn.Conv2d(inp, out, k, s, padding=k // 2, bias=True).eval()
            act = torch.nn.SiLU() if silu else torch.nn.Identity()
            prepared.append((conv, act, torch.randn(batch, inp, h, w), group(k, s)))
        passes = []
        with torch.inference_mode(), precision():
            for i in range(iters + 1):
                groups = [0.0, 0.0, 0.0]
                times = []
                for conv, act, x, g in prepared:
                    t = time.perf_counter()
                    act(conv(x))
                    ms = (time.perf_counter() - t) * 1000
                    groups[g] += ms
                    times.append(ms)
                if i > 0:
                    passes.append((sum(groups), groups, times))
        best = [min(p[2][i] for p in passes) for i in range(len(layers))]
        passes.sort(key=lambda p: p[0])
        total, groups, times = passes[len(passes) // 2]
        if os.environ.get("BENCH_LAYERS"):
            for layer, ms in zip(layers, times):
                shape = "(" + ", ".join(str(v).lower() for v in layer) + ")"
                print(f"[torch {tag}] layer impl={dtype} bs={batch} {shape} {ms:.2f} ms")
        print(
            f"[torch {tag}] conv-stack impl={dtype} bs={batch} median={total:.1f} ms "
            f"per-image={total / batch:.1f} ms 1x1={groups[0]:.1f} 3x3s1={groups[1]:.1f} "
            f"3x3s2={groups[2]:.1f} best={sum(best):.1f} ms",
            flush=True,
        )


if __name__ == "__main__":
    main()
