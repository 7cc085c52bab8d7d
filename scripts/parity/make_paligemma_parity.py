#!/usr/bin/env python3
"""Writes tests/parity/paligemma.json: what transformers' PaliGemmaForConditionalGeneration
computes on the tiny random PaliGemma written by the Rust side (see README.md).

For each prompt and image: the input ids PaliGemmaProcessor builds (`<image>` x 256,
`<bos>`, prompt, `\\n`), the logits of the prefix pass for the first generated token (a
fixed sample of the vocabulary, the top ten and the sum), the greedy tokens of
`generate(max_new_tokens=MAX_NEW_TOKENS)`, the decoded text, and the boxes parsed from it.

Random tiny weights do not generate `<loc>` tokens, so the box path is also checked on
fixed token sequences: transformers' tokenizer decodes them and `parse_detections` below
(an independent implementation of the rule in src/model/families/paligemma/detect.rs) parses them.

Images go through SiglipImageProcessorPil (PaliGemma's preprocessing: 224 x 224 bicubic,
mean and std 0.5), reproduced bit for bit on the Rust side.
"""

import argparse
import json
import re
from pathlib import Path

import torch
from transformers import PaliGemmaForConditionalGeneration, PaliGemmaProcessor
from transformers import PreTrainedTokenizerFast
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from make_parity import SIGLIP_IMAGES, header, images, pixel_summary

import make_parity

# Must match src/model/testing/parity.rs. The first three SigLIP images keep the file small.
IMAGES = SIGLIP_IMAGES[:3]
PROMPTS = [
    "caption en",
    "answer en is anyone wearing a helmet?",
    "detect person ; car",
    "ocr",
]
MAX_NEW_TOKENS = 12
LOGIT_SAMPLES = 96
TOP = 10
# Fixed generations for the box path: (loc steps, label) objects joined by " ; ", and one
# malformed sequence (three locs) that must give no box.
BOX_CASES = [
    [((256, 128, 768, 512), " person"), ((0, 0, 1023, 1023), " car")],
    [((10, 20, 30, 40), " person")],
]
MALFORMED = [(5, 6, 7), " car"]


def parse_detections(text: str, width: int, height: int):
    """Boxes [x1, y1, x2, y2] in pixels from `<locY1><locX1><locY2><locX2> label ; ...`."""
    out = []
    for obj in text.split(";"):
        m = re.fullmatch(r"\s*<loc(\d{4})><loc(\d{4})><loc(\d{4})><loc(\d{4})>(.*)", obj, re.S)
        if not m:
            continue
        y1, x1, y2, x2 = (int(g) for g in m.groups()[:4])
        label = m.group(5).strip()
        if not label or "<loc" in label or max(y1, x1, y2, x2) >= 1024:
            continue
        if y2 < y1 or x2 < x1:
            continue
        out.append({"label": label, "box": [x1 / 1024 * width, y1 / 1024 * height,
                                            x2 / 1024 * width, y2 / 1024 * height]})
    return out


def load(model_dir: Path):
    model = PaliGemmaForConditionalGeneration.from_pretrained(model_dir).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_dir)
    image_processor = SiglipImageProcessorPil.from_pretrained(model_dir)
    image_processor.image_seq_length = 256
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return model, tokenizer, processor


def paligemma(model_dir: Path):
    model, tokenizer, processor = load(model_dir)
    pics = images(IMAGES)
    vocab = model.config.text_config.vocab_size
    sample_index = [k * (vocab - 1) // (LOGIT_SAMPLES - 1) for k in range(LOGIT_SAMPLES)]
    cases = []
    pixel_values = None
    with torch.no_grad():
        for prompt in PROMPTS:
            per_image = []
            for pic, (_, w, h) in zip(pics, IMAGES):
                inputs = processor(images=[pic], text=[prompt], return_tensors="pt")
                pv = inputs["pixel_values"]
                pixel_values = pv if pixel_values is None else pixel_values
                logits = model(**inputs).logits[0, -1, :]
                top = torch.topk(logits, TOP)
                out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                     num_beams=1)
                length = inputs["input_ids"].shape[1]
                generated = [int(t) for t in out[0, length:]]
                text = tokenizer.decode(
                    [t for t in generated if t not in STOP_IDS], skip_special_tokens=True
                )
                per_image.append({
                    "pixels": pixel_summary(pv)[0],
                    "logit_sum": float(logits.double().sum()),
                    "logit_samples": [float(logits[i]) for i in sample_index],
                    "top_ids": [int(i) for i in top.indices],
                    "top_logits": [float(v) for v in top.values],
                    "generated": generated,
                    "text": text,
                    "boxes": parse_detections(text, w, h),
                })
            ids = inputs["input_ids"][0].tolist()
            cases.append({"prompt": prompt, "input_ids": ids, "per_image": per_image})

    loc = tokenizer.convert_tokens_to_ids("<loc0000>")
    box_cases = []
    for objects in BOX_CASES + [[MALFORMED]]:
        generated = []
        for k, (steps, label) in enumerate(objects):
            if k:
                generated += tokenizer.encode(" ;", add_special_tokens=False)
            generated += [loc + s for s in steps]
            generated += tokenizer.encode(label, add_special_tokens=False)
        generated.append(STOP_IDS[0])
        text = tokenizer.decode(generated[:-1], skip_special_tokens=True)
        _, w, h = IMAGES[0]
        box_cases.append({"generated": generated, "text": text,
                          "boxes": parse_detections(text, w, h)})

    result = header("paligemma", IMAGES)
    result.update({
        "max_new_tokens": MAX_NEW_TOKENS,
        "stop_ids": STOP_IDS,
        "logit_sample_index": sample_index,
        "cases": cases,
        "box_frame": list(IMAGES[0][1:]),
        "box_cases": box_cases,
    })
    return result


STOP_IDS = []


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=Path, required=True,
                        help="folder holding paligemma/ written by the Rust side")
    parser.add_argument("--out", type=Path, default=Path("tests/parity"))
    parser.add_argument("--size", default="tiny")
    args = parser.parse_args()
    make_parity.SIZE = args.size
    torch.manual_seed(0)
    model_dir = args.models / "paligemma"
    generation = json.loads((model_dir / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    STOP_IDS.extend(eos if isinstance(eos, list) else [eos])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "paligemma.json"
    path.write_text(json.dumps(paligemma(model_dir), indent=None) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
