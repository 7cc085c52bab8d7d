#!/usr/bin/env python3
"""Writes the JPEG parity files: colour JPEG frames, the pixels PIL decodes them to, and
what transformers' CLIP computes on them.

The Rust tests decode the same JPEG files with the worker's decoder and require
- the pixels within 1 level of PIL's decode (src/source/image_decode.rs);
- the tiny CLIP's image embeddings and logits within 1e-4 of transformers', which decoded
  the files with PIL (src/model/testing/parity_jpeg.rs).

Writes tests/parity/jpeg/<name>.jpg (the frames), tests/parity/jpeg/<name>.pil.png (PIL's
decode, lossless) and tests/parity/clip_jpeg.json. See README.md for when and how to run it.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import PIL
import torch
import transformers
from PIL import Image, features
from transformers import CLIPModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

import make_parity

# (name, width, height, PIL subsampling: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0, quality, progressive)
JPEGS = [
    ("scene-420-320x240", 320, 240, 2, 90, False),
    ("scene-420-97x61", 97, 61, 2, 75, False),
    ("scene-444-224x224", 224, 224, 0, 95, False),
    ("scene-444-131x77", 131, 77, 0, 85, False),
    ("scene-422-255x171", 255, 171, 1, 85, False),
    ("scene-420-progressive-160x120", 160, 120, 2, 85, True),
]


def scene(w: int, h: int, seed: int) -> np.ndarray:
    """A photo-like colour frame: smooth sky, saturated shapes with sharp edges (where chroma
    upsampling shows), fine stripes and sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    img[..., 0] = 90 + 80 * y / h
    img[..., 1] = 140 + 60 * y / h
    img[..., 2] = 230 - 40 * x / w
    ground = y > h * 0.6
    img[ground] = [70, 120, 40]
    rect = (x > w * 0.15) & (x < w * 0.4) & (y > h * 0.35) & (y < h * 0.8)
    img[rect] = [220, 30, 40]
    circle = (x - w * 0.7) ** 2 + (y - h * 0.45) ** 2 < (min(w, h) * 0.18) ** 2
    img[circle] = [30, 60, 210]
    stripes = (x > w * 0.45) & (x < w * 0.6) & (y > h * 0.65) & (((x + y) // 2) % 2 == 0)
    img[stripes] = [250, 220, 20]
    img += rng.normal(0, 6, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def write_jpegs(out: Path):
    folder = out / "jpeg"
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, w, h, subsampling, quality, progressive) in enumerate(JPEGS):
        path = folder / f"{name}.jpg"
        Image.fromarray(scene(w, h, i), "RGB").save(
            path, "JPEG", quality=quality, subsampling=subsampling, progressive=progressive
        )
        decoded = Image.open(path).convert("RGB")
        decoded.save(folder / f"{name}.pil.png", "PNG", optimize=True)


def clip(model_dir: Path, out: Path):
    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = CLIPImageProcessorPil.from_pretrained(model_dir)
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    texts = make_parity.CLIP_TEXTS
    ids = [tok.encode(t).ids for t in texts]
    length = max(len(i) for i in ids)
    input_ids = torch.tensor([i + [eos] * (length - len(i)) for i in ids])
    attention_mask = torch.tensor([[1] * len(i) + [0] * (length - len(i)) for i in ids])
    images = [Image.open(out / "jpeg" / f"{j[0]}.jpg").convert("RGB") for j in JPEGS]
    pixel_values = processor(images=images, return_tensors="pt").pixel_values
    with torch.no_grad():
        image_embeds = make_parity.features(model.get_image_features(pixel_values=pixel_values))
        result = model(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values
        )
    return {
        "model": {"kind": "clip", "size": "tiny", "seed": make_parity.SEED},
        "generator": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "pillow": PIL.__version__,
            "libjpeg_turbo": features.version("libjpeg_turbo"),
            "image_backend": "pil",
        },
        "jpegs": [
            {
                "name": name,
                "width": w,
                "height": h,
                "subsampling": ["4:4:4", "4:2:2", "4:2:0"][sub],
                "quality": q,
                "progressive": prog,
            }
            for name, w, h, sub, q, prog in JPEGS
        ],
        "texts": texts,
        "image_embeds": make_parity.rows(image_embeds),
        "logits_per_image": make_parity.rows(result.logits_per_image),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=Path, required=True, help="parity model folder")
    parser.add_argument("--out", type=Path, required=True, help="tests/parity")
    args = parser.parse_args()
    write_jpegs(args.out)
    result = clip(args.models / "clip", args.out)
    (args.out / "clip_jpeg.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {len(JPEGS)} JPEG frames and clip_jpeg.json to {args.out}")


if __name__ == "__main__":
    main()
