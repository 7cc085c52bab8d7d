#!/usr/bin/env python3
"""PyTorch's time for the CLIP ViT-B/32 image tower (random weights, full size), in f32 or
under bf16 autocast, on 2 threads: the reference for `DTYPE=bf16` in scripts/bench-model.sh.

    python3 scripts/bench-clip-pt.py TAG [f32|bf16]     (ITERS from the environment)

`DEVICE=cuda` runs it on the GPU (scripts/gpu-check), `BENCH_BATCHES=1,8` sets the batches.

Prints lines like `[torch-bf16 TAG] image bs=8 median=... ms per-image=... ms`, and once the
cosine of the bf16 embeddings against f32 on the same inputs.
"""

import contextlib
import os
import statistics
import sys
import time

import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
tag = sys.argv[1] if len(sys.argv) > 1 else "run"
dtype = sys.argv[2] if len(sys.argv) > 2 else "bf16"
iters = int(os.environ.get("ITERS", "10"))
device = os.environ.get("DEVICE", "cpu")
batches = [int(b) for b in os.environ.get("BENCH_BATCHES", "1,8").split(",")]
name = f"torch-{dtype}"

torch.manual_seed(0)
model = CLIPVisionModelWithProjection(CLIPVisionConfig(projection_dim=512)).eval().to(device)


def precision():
    if dtype == "bf16":
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def embed(pixels):
    with torch.inference_mode(), precision():
        out = model(pixel_values=pixels).image_embeds.float()
    # A GPU queues the work and returns: the time is the work's once it is done.
    if device == "cuda":
        torch.cuda.synchronize()
    return out


for bs in batches:
    pixels = torch.randn(bs, 3, 224, 224, device=device)
    for _ in range(3):
        embed(pixels)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        embed(pixels)
        times.append((time.perf_counter() - start) * 1000)
    med = statistics.median(times)
    print(
        f"[{name} {tag}] image bs={bs} median={med:.2f} ms "
        f"(min {min(times):.2f} max {max(times):.2f}) per-image={med / bs:.2f} ms",
        flush=True,
    )

if dtype == "bf16":
    pixels = torch.randn(8, 3, 224, 224, device=device)
    with torch.inference_mode():
        reference = model(pixel_values=pixels).image_embeds
    cosine = torch.nn.functional.cosine_similarity(embed(pixels), reference, dim=-1)
    print(f"[{name} {tag}] cosine against f32 over 8 random images: min {cosine.min():.6f}")
