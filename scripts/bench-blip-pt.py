#!/usr/bin/env python3
"""Times transformers' BlipForConditionalGeneration captioning on the very model directory
the candle BLIP bench uses (full size, random weights from `free-roam model make`), doing
the same work per call: BlipImageProcessorPil on a 640x480 frame (the same pixels as
examples/bench_model.rs), the prefix "a picture of", greedy decoding of up to 20 new
tokens, batch 1 and 2, on 2 threads. It prints its caption and how many tokens it
generated: the same caption on both sides shows they decoded the same tokens.

    python scripts/bench-blip-pt.py MODEL_DIR [TAG] [ITERS]
"""

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import tokenizers
import torch
from PIL import Image
from transformers import BlipForConditionalGeneration
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

MAX_NEW_TOKENS = 20
PROMPT = "a picture of"


def main():
    model_dir = Path(sys.argv[1])
    tag = sys.argv[2] if len(sys.argv) > 2 else "run"
    iters = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    torch.set_num_threads(2)

    def say(msg):
        print(f"[torch-blip {tag}] {msg}", flush=True)

    t0 = time.perf_counter()
    model = BlipForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = BlipImageProcessorPil.from_pretrained(model_dir)
    tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    say(f"loaded in {(time.perf_counter() - t0) * 1000:.0f} ms, threads={torch.get_num_threads()}")

    # The candle bench's frame: byte i of the RGB buffer is i * 31 mod 251.
    rgb = (np.arange(640 * 480 * 3, dtype=np.int64) * 31 % 251).astype(np.uint8)
    frame = Image.fromarray(rgb.reshape(480, 640, 3), "RGB")
    prompt_ids = tok.encode(PROMPT).ids

    for bs in (1, 2):

        def caption():
            pixels = processor(images=[frame] * bs, return_tensors="pt").pixel_values
            return model.generate(
                pixel_values=pixels,
                input_ids=torch.tensor([prompt_ids] * bs),
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                num_beams=1,
            )

        with torch.inference_mode():
            out = caption()  # warm-up
            times = []
            for _ in range(iters):
                t = time.perf_counter()
                out = caption()
                times.append((time.perf_counter() - t) * 1000)
        new_tokens = out.shape[1] - (len(prompt_ids) - 1)
        if bs == 1:
            caption = json.dumps(tok.decode(out[0].tolist(), skip_special_tokens=True))
            say(f"new_tokens={new_tokens} caption={caption}")
        med = statistics.median(times)
        say(
            f"caption 640x480 bs={bs} new_tokens={new_tokens} median={med:.0f} ms "
            f"(min {min(times):.0f} max {max(times):.0f}) per-frame={med / bs:.0f} ms"
        )


if __name__ == "__main__":
    main()
