#!/usr/bin/env python3
"""Converts an Ultralytics YOLO-World v2 checkpoint (yolov8{n,s,m,l,x}-worldv2.pt) into a
free-roam MODEL_PATH folder for MODEL_TYPE=yoloworld: model.safetensors (the detector's
tensors under their Ultralytics names, and CLIP's text tower under transformers' names),
config.json and tokenizer.json.

The text tower comes from a transformers CLIP checkpoint folder (openai/clip-vit-base-patch32,
the text model YOLO-World was trained with): --clip DIR, or the TEXT_MODEL_PATH environment
variable.

    python3 -m venv ../venv-yolo && ../venv-yolo/bin/pip install ultralytics safetensors
    ../venv-yolo/bin/python scripts/convert-yoloworld.py yolov8s-worldv2.pt \
        --clip ../clip-vit-base-patch32 --out models/yoloworld-s

Unpickling the .pt file needs the ultralytics package (the file holds its module objects);
load only checkpoints you trust. Licences: the YOLO-World weights are GPL-3.0 and
Ultralytics' code AGPL-3.0 (docs/models.md).
"""

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def fail(message: str):
    sys.exit(f"convert-yoloworld: {message}")


def load_detector(pt: Path):
    from ultralytics.nn.tasks import WorldModel, torch_safe_load

    ckpt, _ = torch_safe_load(str(pt))
    model = (ckpt.get("ema") or ckpt["model"]).float().eval()
    if not isinstance(model, WorldModel):
        fail(f"{pt} holds a {type(model).__name__}, not a YOLO-World WorldModel")
    head = model.model[-1]
    kinds = {type(m).__name__ for m in model.modules()}
    if "ImagePoolingAttn" in kinds or type(head.cv4[0]).__name__ != "BNContrastiveHead":
        fail(f"{pt} is YOLO-World v1 (yolov8*-world); only v2 (yolov8*-worldv2) is supported")
    return ckpt, model


def detector_config(pt: Path, ckpt, model) -> dict:
    yaml = model.yaml
    # The scale the YAML was built at; older checkpoints name it only in the file name.
    guess = re.search(r"yolov8([nsmlx])", pt.name)
    scale = yaml.get("scale") or (guess and guess.group(1))
    if scale in yaml.get("scales", {}):
        depth, width, max_channels = yaml["scales"][scale]
    elif "depth_multiple" in yaml and "width_multiple" in yaml:
        depth, width = yaml["depth_multiple"], yaml["width_multiple"]
        max_channels = yaml.get("max_channels", 1024)
    else:
        fail(f"cannot tell the scale (n, s, m, l, x) of {pt}: its YAML names none")
    eps = next(m.eps for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    imgsz = (ckpt.get("train_args") or {}).get("imgsz", 640)
    return {
        "model_type": "yoloworld",
        "architectures": ["WorldModel"],
        "scale": scale,
        "depth_multiple": depth,
        "width_multiple": width,
        "max_channels": max_channels,
        "nc": yaml.get("nc", 80),
        "reg_max": model.model[-1].reg_max,
        "image_size": imgsz if isinstance(imgsz, int) else max(imgsz),
        "batch_norm_eps": eps,
    }


def text_tower(clip: Path):
    config = json.loads((clip / "config.json").read_text())
    weights = clip / "model.safetensors"
    if not weights.is_file():
        fail(f"{clip} has no model.safetensors (a transformers CLIP checkpoint folder)")
    tensors = {
        k: v.float().contiguous()
        for k, v in load_file(str(weights)).items()
        if k.startswith("text_model.") or k == "text_projection.weight"
    }
    if "text_projection.weight" not in tensors:
        fail(f"{clip} has no text_projection.weight: not a CLIPModel checkpoint")
    text = {
        "projection_dim": config.get("projection_dim", 512),
        "text_config": config.get("text_config", {}),
    }
    return tensors, text


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="an Ultralytics yolov8*-worldv2.pt file")
    p.add_argument("--clip", type=Path, default=os.environ.get("TEXT_MODEL_PATH"),
                   help="a transformers CLIP checkpoint folder (default: TEXT_MODEL_PATH)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if args.clip is None:
        fail("give the CLIP text tower: --clip DIR or TEXT_MODEL_PATH")

    ckpt, model = load_detector(args.checkpoint)
    tensors = {
        k: v.float().contiguous()
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    text_tensors, text_config = text_tower(args.clip)
    config = detector_config(args.checkpoint, ckpt, model) | text_config
    embed = model.model[-1].cv3[0][-1].out_channels
    if embed != config["projection_dim"]:
        fail(f"the head reads {embed}-wide text embeddings, the CLIP tower gives "
             f"{config['projection_dim']}")

    args.out.mkdir(parents=True, exist_ok=True)
    save_file(tensors | text_tensors, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copy(args.clip / "tokenizer.json", args.out / "tokenizer.json")
    print(f"{args.out}: YOLO-World v2 scale {config['scale']}, {len(tensors)} detector and "
          f"{len(text_tensors)} text tensors")


if __name__ == "__main__":
    main()
