#!/usr/bin/env python3
"""Writes the expected outputs the Rust parity tests compare the candle backends against.

Loads the random CLIP, SigLIP, OWL-ViT and BLIP folders written by the Rust side (see
README.md) into transformers' CLIPModel, SiglipModel, OwlViTForObjectDetection and
BlipForConditionalGeneration, runs fixed images and prompts, and writes
tests/parity/{clip,siglip,owlvit,blip}.json.

Images are generated from integer formulas that the Rust tests reproduce exactly, and
preprocessed with transformers' PIL backend (CLIPImageProcessorPil, SiglipImageProcessorPil,
OwlViTImageProcessorPil, BlipImageProcessorPil), which the Rust preprocessing reproduces
bit for bit.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import PIL
import tokenizers
import torch
import transformers
from PIL import Image
from transformers import (
    BlipForConditionalGeneration,
    CLIPModel,
    OwlViTForObjectDetection,
    SiglipModel,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.owlvit.image_processing_pil_owlvit import OwlViTImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

# Must match the Rust tests (src/model/testing/parity.rs).
SEED = 7
IMAGES = [
    ("gradient", 320, 240),
    ("checker", 240, 320),
    ("rings", 97, 61),
    ("gradient", 224, 224),
    ("checker", 500, 300),
]
# SigLIP's: the 240 x 320 portrait is replaced (Pillow 13 runs the vertical pass first
# when squashing it to 224 x 224; see docs/models.md, Preprocessing).
SIGLIP_IMAGES = [
    ("gradient", 320, 240),
    ("checker", 150, 200),
    ("rings", 97, 61),
    ("gradient", 224, 224),
    ("checker", 500, 300),
]
CLIP_TEXTS = [
    "a photo of people.",
    "a photo of vehicles.",
    "a photo of a red car.",
    "a photo of zebras jumping over 3 fences!",
]
SIGLIP_TEXTS = CLIP_TEXTS
# The phrases "Detect all people and vehicles" and "a red car" give, through the template.
OWLVIT_TEXTS = ["a photo of people.", "a photo of vehicles.", "a photo of a red car."]
OWLVIT_THRESHOLD = 0.1
BLIP_PROMPTS = ["", "a picture of", "Detect all people and vehicles"]
MAX_NEW_TOKENS = 20
PIXEL_SAMPLES = 32


def make_image(kind: str, w: int, h: int) -> np.ndarray:
    """Packed RGB uint8, (h, w, 3), from integer formulas only."""
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    if kind == "gradient":
        r = x * 255 // (w - 1)
        g = y * 255 // (h - 1)
        b = (x + y) * 255 // (w + h - 2)
    elif kind == "checker":
        cell = ((x // 16) + (y // 16)) % 2
        noise = (x * 7 + y * 13) % 31
        r = np.where(cell == 1, 230, 20) + noise
        g = np.where(cell == 1, 40, 60) + noise
        b = np.where(cell == 1, 30, 200) + noise
    elif kind == "rings":
        d = (x - w // 2) ** 2 + (y - h // 2) ** 2
        r = d % 256
        g = (d // 7) % 256
        b = 255 - (x * 3 + y) % 256
    else:
        raise ValueError(kind)
    return (np.stack([r, g, b], axis=-1) % 256).astype(np.uint8)


def images(which=None):
    return [Image.fromarray(make_image(k, w, h), "RGB") for k, w, h in which or IMAGES]


def pixel_summary(pixel_values: torch.Tensor):
    out = []
    for pv in pixel_values:
        flat = pv.flatten().double()
        n = flat.numel()
        idx = [k * (n - 1) // (PIXEL_SAMPLES - 1) for k in range(PIXEL_SAMPLES)]
        out.append(
            {
                "sum": float(flat.sum()),
                "abs_sum": float(flat.abs().sum()),
                "sample_index": idx,
                "samples": [float(flat[i]) for i in idx],
            }
        )
    return out


def features(x):
    # transformers 5 returns an output object whose pooler_output is the projection.
    return x if isinstance(x, torch.Tensor) else x.pooler_output


def rows(t: torch.Tensor):
    return [[float(v) for v in row] for row in t]


SIZE = "tiny"


def rows6(t: torch.Tensor):
    """Rows rounded to 6 decimals (far inside the 1e-4 bound), for the large tables."""
    return [[round(float(v), 6) for v in row] for row in t]


def header(kind: str, which=None):
    return {
        "model": {"kind": kind, "size": SIZE, "seed": SEED},
        "generator": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "tokenizers": tokenizers.__version__,
            "pillow": PIL.__version__,
            "image_backend": "pil",
        },
        "images": [{"kind": k, "width": w, "height": h} for k, w, h in which or IMAGES],
    }


def clip(model_dir: Path):
    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = CLIPImageProcessorPil.from_pretrained(model_dir)
    tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    ids = [tok.encode(t).ids for t in CLIP_TEXTS]
    length = max(len(i) for i in ids)
    input_ids = torch.tensor([i + [eos] * (length - len(i)) for i in ids])
    attention_mask = torch.tensor([[1] * len(i) + [0] * (length - len(i)) for i in ids])
    pixel_values = processor(images=images(), return_tensors="pt").pixel_values
    with torch.no_grad():
        image_embeds = features(model.get_image_features(pixel_values=pixel_values))
        text_embeds = features(
            model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        )
        out = model(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values
        )
    result = header("clip")
    result.update(
        {
            "texts": CLIP_TEXTS,
            "input_ids": ids,
            "pixels": pixel_summary(pixel_values),
            "image_embeds": rows(image_embeds),
            "text_embeds": rows(text_embeds),
            "logits_per_image": rows(out.logits_per_image),
            "probabilities": rows(out.logits_per_image.softmax(dim=-1)),
        }
    )
    return result


def siglip(model_dir: Path):
    model = SiglipModel.from_pretrained(model_dir).eval()
    processor = SiglipImageProcessorPil.from_pretrained(model_dir)
    tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    length = model.config.text_config.max_position_embeddings
    pad = model.config.text_config.pad_token_id
    eos = tok.token_to_id("</s>")
    ids = []
    for t in SIGLIP_TEXTS:
        i = tok.encode(t).ids
        if len(i) > length:
            i = i[: length - 1] + [eos]
        ids.append(i + [pad] * (length - len(i)))
    input_ids = torch.tensor(ids)
    pixel_values = processor(images=images(SIGLIP_IMAGES), return_tensors="pt").pixel_values
    with torch.no_grad():
        image_embeds = features(model.get_image_features(pixel_values=pixel_values))
        text_embeds = features(model.get_text_features(input_ids=input_ids))
        out = model(input_ids=input_ids, pixel_values=pixel_values)
    result = header("siglip", SIGLIP_IMAGES)
    result.update(
        {
            "texts": SIGLIP_TEXTS,
            "input_ids": ids,
            "pixels": pixel_summary(pixel_values),
            "image_embeds": rows(image_embeds),
            "text_embeds": rows(text_embeds),
            "logits_per_image": rows(out.logits_per_image),
            "probabilities": rows(torch.sigmoid(out.logits_per_image)),
        }
    )
    return result


def owlvit(model_dir: Path):
    model = OwlViTForObjectDetection.from_pretrained(model_dir).eval()
    processor = OwlViTImageProcessorPil.from_pretrained(model_dir)
    tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    length = model.config.text_config.max_position_embeddings
    ids = []
    for t in OWLVIT_TEXTS:
        i = tok.encode(t).ids
        if len(i) > length:
            i = i[: length - 1] + [eos]
        ids.append(i)
    input_ids = torch.tensor([i + [eos] * (length - len(i)) for i in ids])
    attention_mask = torch.tensor([[1] * len(i) + [0] * (length - len(i)) for i in ids])
    imgs = images()
    pixel_values = processor(images=imgs, return_tensors="pt").pixel_values
    target_sizes = [(img.height, img.width) for img in imgs]
    per_image = []
    with torch.no_grad():
        for i in range(len(imgs)):
            out = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values=pixel_values[i : i + 1],
            )
            kept = processor.post_process_object_detection(
                out, threshold=OWLVIT_THRESHOLD, target_sizes=target_sizes[i : i + 1]
            )[0]
            logits = out.logits[0]
            per_image.append(
                {
                    "text_embeds": rows(out.text_embeds[0]),
                    # Every token's logits and box (576 rows at full size): the
                    # parity test compares them all.
                    "logits": rows6(logits),
                    "pred_boxes": rows6(out.pred_boxes[0]),
                    "kept": [
                        {
                            "label": int(l),
                            "score": round(float(s), 7),
                            "box": [round(float(v), 4) for v in b],
                        }
                        for s, l, b in zip(kept["scores"], kept["labels"], kept["boxes"])
                    ],
                }
            )
    result = header("owlvit")
    result.update(
        {
            "texts": OWLVIT_TEXTS,
            "input_ids": ids,
            "threshold": OWLVIT_THRESHOLD,
            "pixels": pixel_summary(pixel_values),
            "per_image": per_image,
        }
    )
    return result


def blip(model_dir: Path):
    model = BlipForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = BlipImageProcessorPil.from_pretrained(model_dir)
    tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    bos = model.config.text_config.bos_token_id
    pixel_values = processor(images=images(), return_tensors="pt").pixel_values
    cases = []
    with torch.no_grad():
        vision = model.vision_model(pixel_values=pixel_values).last_hidden_state
        for prompt in BLIP_PROMPTS:
            prompt_ids = tok.encode(prompt).ids if prompt else None
            prefix = [bos] + (prompt_ids[1:-1] if prompt_ids else [])
            logits = model.text_decoder(
                input_ids=torch.tensor([prefix] * len(IMAGES)),
                encoder_hidden_states=vision,
            ).logits[:, -1, :]
            sequences, captions = [], []
            for i in range(len(IMAGES)):
                kwargs = {}
                if prompt_ids is not None:
                    kwargs["input_ids"] = torch.tensor([prompt_ids])
                out = model.generate(
                    pixel_values=pixel_values[i : i + 1],
                    max_new_tokens=MAX_NEW_TOKENS,
                    do_sample=False,
                    num_beams=1,
                    **kwargs,
                )
                seq = [int(t) for t in out[0]]
                sequences.append(seq)
                captions.append(tok.decode(seq, skip_special_tokens=True))
            cases.append(
                {
                    "prompt": prompt,
                    "prefix_ids": prefix,
                    "first_step_logits": rows(logits),
                    "sequences": sequences,
                    "captions": captions,
                }
            )
    result = header("blip")
    result.update(
        {
            "max_new_tokens": MAX_NEW_TOKENS,
            "pixels": pixel_summary(pixel_values),
            "vision_cls": rows(vision[:, 0, :]),
            "cases": cases,
        }
    )
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=Path, required=True,
                        help="folder holding clip/ and blip/ written by the Rust side")
    parser.add_argument("--out", type=Path, default=Path("tests/parity"))
    parser.add_argument("--only", nargs="*", default=["clip", "siglip", "owlvit", "blip"],
                        help="which models to run")
    parser.add_argument("--size", default="tiny",
                        help="recorded in the output; `full` for a by-hand full-size run")
    args = parser.parse_args()
    global SIZE
    SIZE = args.size
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    fns = {"clip": clip, "siglip": siglip, "owlvit": owlvit, "blip": blip}
    for name in args.only:
        data = fns[name](args.models / name)
        path = args.out / f"{name}.json"
        # The OWL-ViT tables (every token's logits and box) are written compactly.
        indent = None if name == "owlvit" else 1
        path.write_text(json.dumps(data, indent=indent) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
