#!/usr/bin/env python3
"""Times transformers' PaliGemmaForConditionalGeneration on the very model directory the
candle PaliGemma bench uses (full size, random weights from `free-roam model make`), doing
the same work per call: PaliGemma's preprocessing (SiglipImageProcessorPil) of a 640x480
frame (the same pixels as examples/bench_model.rs), the prompt "caption en", greedy
decoding of up to MAX_NEW_TOKENS (default 10) new tokens, batch 1 and 2, on 2 threads. It
prints the generated ids: the same ids on both sides show they decoded the same tokens.

    python scripts/bench-paligemma-pt.py MODEL_DIR [TAG] [ITERS]

`DEVICE=cuda` runs it on the GPU (scripts/gpu-check), `BENCH_BATCHES=1,8` sets the batches.
"""

import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor
from transformers import PreTrainedTokenizerFast
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

MAX_NEW_TOKENS = int(os.environ.get("MAX_NEW_TOKENS", "10"))
PROMPT = "caption en"


def main():
    model_dir = Path(sys.argv[1])
    tag = sys.argv[2] if len(sys.argv) > 2 else "run"
    iters = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    device = os.environ.get("DEVICE", "cpu")
    batches = [int(b) for b in os.environ.get("BENCH_BATCHES", "1,2").split(",")]

    def say(msg):
        print(f"[torch-paligemma {tag}] {msg}", flush=True)

    t0 = time.perf_counter()
    model = PaliGemmaForConditionalGeneration.from_pretrained(model_dir).eval().to(device)
    image_processor = SiglipImageProcessorPil.from_pretrained(model_dir)
    image_processor.image_seq_length = 256
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    say(f"loaded in {(time.perf_counter() - t0) * 1000:.0f} ms, threads={torch.get_num_threads()}")

    # The candle bench's frame: byte i of the RGB buffer is i * 31 mod 251.
    rgb = (np.arange(640 * 480 * 3, dtype=np.int64) * 31 % 251).astype(np.uint8)
    frame = Image.fromarray(rgb.reshape(480, 640, 3), "RGB")

    for bs in batches:

        def answer():
            inputs = processor(images=[frame] * bs, text=[PROMPT] * bs, return_tensors="pt")
            inputs = inputs.to(device)
            out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                 num_beams=1)
            return out[:, inputs["input_ids"].shape[1]:].cpu()

        with torch.inference_mode():
            out = answer()  # warm-up
            times = []
            for _ in range(iters):
                t = time.perf_counter()
                out = answer()
                times.append((time.perf_counter() - t) * 1000)
        if bs == 1:
            say(f"new_tokens={out.shape[1]} ids={out[0].tolist()}")
        med = statistics.median(times)
        say(
            f"caption 640x480 bs={bs} median={med:.0f} ms "
            f"(min {min(times):.0f} max {max(times):.0f}) per-frame={med / bs:.0f} ms"
        )


if __name__ == "__main__":
    main()
