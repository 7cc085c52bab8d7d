#!/usr/bin/env python3
"""Times transformers' SigLIP or OWL-ViT on the very model directory the candle bench uses
(full size, random weights from `free-roam model make`), doing the same work per call as
`BENCH_KIND=siglip|owlvit examples/bench_model.rs`: the model's PIL image processor on a
640x480 frame (the same pixels), the image tower, and the scores against the text
embeddings of "Detect all people and vehicles" computed once beforehand (the candle side
caches them per prompt); for OWL-ViT also the class and box heads on every patch token and
`post_process_object_detection` at 0.1. Batch 1 and 4, on 2 threads. With `bf16` last,
the model runs under `torch.autocast("cpu", dtype=torch.bfloat16)`: the reference for the
candle side's `DTYPE=bf16`.

    python scripts/bench-presence-pt.py siglip|owlvit MODEL_DIR [TAG] [ITERS] [f32|bf16]

`DEVICE=cuda` runs it on the GPU (scripts/gpu-check), `BENCH_BATCHES=1,8` sets the batches.
"""

import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import tokenizers
import torch
from PIL import Image
from transformers import OwlViTForObjectDetection, SiglipModel
from transformers.models.owlvit.image_processing_pil_owlvit import OwlViTImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

TEXTS = ["a photo of people.", "a photo of vehicles."]


def main():
    kind = sys.argv[1]
    model_dir = Path(sys.argv[2])
    tag = sys.argv[3] if len(sys.argv) > 3 else "run"
    iters = int(sys.argv[4]) if len(sys.argv) > 4 else 10
    dtype = sys.argv[5] if len(sys.argv) > 5 else "f32"
    torch.set_num_threads(2)
    device = os.environ.get("DEVICE", "cpu")
    batches = [int(b) for b in os.environ.get("BENCH_BATCHES", "1,4").split(",")]
    name = kind if dtype == "f32" else f"{kind}-{dtype}"

    def say(msg):
        print(f"[torch-{name} {tag}] {msg}", flush=True)

    def precision():
        if dtype == "bf16":
            return torch.autocast(device, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    t0 = time.perf_counter()
    tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    if kind == "siglip":
        model = SiglipModel.from_pretrained(model_dir).eval().to(device)
        processor = SiglipImageProcessorPil.from_pretrained(model_dir)
        length = model.config.text_config.max_position_embeddings
        pad = model.config.text_config.pad_token_id
        ids = [tok.encode(t).ids for t in TEXTS]
        ids = torch.tensor([i + [pad] * (length - len(i)) for i in ids], device=device)
        with torch.no_grad():
            text = model.get_text_features(input_ids=ids)
            text = text if isinstance(text, torch.Tensor) else text.pooler_output
            text = text / text.norm(dim=-1, keepdim=True)
        scale, bias = model.logit_scale.exp(), model.logit_bias

        def run(pixels):
            image = model.get_image_features(pixel_values=pixels)
            image = image if isinstance(image, torch.Tensor) else image.pooler_output
            image = image / image.norm(dim=-1, keepdim=True)
            return torch.sigmoid(image @ text.t() * scale + bias)

    else:
        model = OwlViTForObjectDetection.from_pretrained(model_dir).eval().to(device)
        processor = OwlViTImageProcessorPil.from_pretrained(model_dir)
        eos = tok.token_to_id("<|endoftext|>")
        ids = [tok.encode(t).ids for t in TEXTS]
        n = max(len(i) for i in ids)
        input_ids = torch.tensor([i + [eos] * (n - len(i)) for i in ids], device=device)
        mask = torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i in ids], device=device)
        with torch.no_grad():
            out = model.owlvit.get_text_features(input_ids=input_ids, attention_mask=mask)
            query = out if isinstance(out, torch.Tensor) else out.pooler_output
            query = query / query.norm(dim=-1, keepdim=True)

        def run(pixels):
            feats, _ = model.image_embedder(pixel_values=pixels)
            b, h, w, d = feats.shape
            feats = feats.reshape(b, h * w, d)
            q = query.unsqueeze(0).expand(b, -1, -1)
            logits, _ = model.class_predictor(feats, q, None)
            boxes = model.box_predictor(feats, feats.reshape(b, h, w, d))

            class Out:
                pass

            o = Out()
            o.logits, o.pred_boxes = logits, boxes
            return processor.post_process_object_detection(
                o, threshold=0.1, target_sizes=[(480, 640)] * b
            )

    say(f"loaded in {(time.perf_counter() - t0) * 1000:.0f} ms, threads={torch.get_num_threads()}")
    # The candle bench's frame: byte i of the RGB buffer is i * 31 mod 251.
    rgb = (np.arange(640 * 480 * 3, dtype=np.int64) * 31 % 251).astype(np.uint8)
    frame = Image.fromarray(rgb.reshape(480, 640, 3), "RGB")
    for bs in batches:

        def step():
            with torch.no_grad():
                pixels = processor(images=[frame] * bs, return_tensors="pt").pixel_values
                pixels = pixels.to(device)
                with precision():
                    out = run(pixels)
                if kind == "siglip":
                    out = out.float()
                if device == "cuda":
                    torch.cuda.synchronize()
                return out

        step()
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            step()
            times.append((time.perf_counter() - t) * 1000)
        med = statistics.median(times)
        say(
            f"infer 640x480 bs={bs} median={med:.1f} ms (min {min(times):.1f} "
            f"max {max(times):.1f}) per-frame={med / bs:.1f} ms"
        )


if __name__ == "__main__":
    main()
