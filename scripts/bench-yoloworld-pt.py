#!/usr/bin/env python3
"""PyTorch's time for YOLO-World v2 on a 720p frame: Ultralytics' own `WorldModel` with the
checkpoint's weights (the random one `examples/bench_model.rs` writes), run as its predictor
runs it, the prompt not folded in: `LetterBox` to 640x384 and `WorldModel.predict` with the
prompt's text embeddings, up to the head's raw output, in f32 or under `torch.autocast`
bf16, on 2 threads. The work `bench_model` times for `BENCH_KIND=yoloworld`
(scripts/bench-model.sh alternates the two). Suppression is left out on both sides: with
random weights nearly every anchor passes the confidence threshold.

    python3 scripts/bench-yoloworld-pt.py MODEL_DIR TAG ITERS [f32|bf16]

Needs the parity venv's `ultralytics` (scripts/parity/make_yoloworld_parity.py). Prints
lines like `[torch-yoloworld TAG] bf16 network 1280x720 (640x384) bs=4 median=... ms`.
"""

import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent / "parity"))
from make_yoloworld_parity import build  # noqa: E402
from ultralytics.data.augment import LetterBox  # noqa: E402

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
model_dir, tag, iters = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
dtype = sys.argv[4] if len(sys.argv) > 4 else "f32"
name = "torch-yoloworld"
# The candle side's prompt, "Detect all people and vehicles", has two phrases.
PHRASES = 2
WIDTH, HEIGHT = 1280, 720

model, config = build(model_dir)
model.model[-1].nc = PHRASES
torch.manual_seed(0)
text = torch.nn.functional.normalize(torch.randn(PHRASES, config.get("projection_dim", 512)), dim=-1)
# bench_model's frame: the same bytes, as OpenCV would hold them (BGR).
rgb = (np.arange(WIDTH * HEIGHT * 3, dtype=np.int64) * 31 % 251).astype(np.uint8)
bgr = np.ascontiguousarray(rgb.reshape(HEIGHT, WIDTH, 3)[..., ::-1])
letterbox = LetterBox((640, 640), auto=True, stride=32)


def precision():
    if dtype == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def infer(frames):
    boxed = [np.ascontiguousarray(letterbox(image=f)[..., ::-1]) for f in frames]
    x = torch.from_numpy(np.stack(boxed)).permute(0, 3, 1, 2).float() / 255.0
    with torch.inference_mode(), precision():
        y, _ = model.predict(x, txt_feats=text[None])
    return y.float(), x.shape


for bs in (1, 4):
    frames = [bgr] * bs
    infer(frames)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        _, shape = infer(frames)
        times.append((time.perf_counter() - start) * 1000)
    med = statistics.median(times)
    print(
        f"[{name} {tag}] {dtype} network {WIDTH}x{HEIGHT} ({shape[3]}x{shape[2]}) bs={bs} "
        f"median={med:.1f} ms (min {min(times):.1f} max {max(times):.1f}) "
        f"per-frame={med / bs:.1f} ms",
        flush=True,
    )
