#!/usr/bin/env python3
"""Writes tests/parity/yoloworld.json: what Ultralytics' YOLO-World v2 computes on the
random checkpoint the Rust side writes (`free-roam model make --type yoloworld`, seed 7),
for fixed frames and fixed text embeddings.

The network is Ultralytics' own `WorldModel`, built from its `yolov8-worldv2.yaml` at the
checkpoint's scale (the tiny test scale, or a published one such as `s`), with the
checkpoint's tensors loaded into it by name. The text embeddings are fixed unit vectors
(Ultralytics' `set_classes` would download CLIP), and the frames go through the reference's
own `LetterBox`, `WorldModel.predict`, `non_max_suppression` and `scale_boxes`, as its
predictor calls them. Frames are converted to BGR first, as OpenCV reads them, and back to
RGB after the letterbox, as the predictor does. One JPEG file goes the whole way: read by
OpenCV, its prompt's phrases through the checkpoint's CLIP text tower (transformers).

Run it in a virtual environment of its own that has `ultralytics` (it brings torchvision,
which changes transformers' image processors: keep it out of the other parity venvs):

    python3 -m venv ../venv-yolo && ../venv-yolo/bin/pip install ultralytics safetensors transformers
    target/debug/free-roam model make --type yoloworld --size tiny --seed 7 /tmp/yw-tiny
    ../venv-yolo/bin/python scripts/parity/make_yoloworld_parity.py \
        --model /tmp/yw-tiny --out tests/parity/yoloworld.json
"""

import argparse
import copy
import json
from pathlib import Path

import cv2
import numpy as np
import torch
import ultralytics
from safetensors.torch import load_file
from ultralytics.data.augment import LetterBox
from ultralytics.nn.tasks import WorldModel, yaml_model_load
from ultralytics.utils import ops
from ultralytics.utils.nms import non_max_suppression

# Must match the Rust test (src/model/testing/parity_yoloworld.rs).
SEED = 7
IMAGES = [("checker", 1280, 720), ("rings", 97, 61), ("gradient", 500, 300)]
PHRASES = 3
# The suppressions compared: the reference's confidence and box cap, with its IoU bound
# (0.7, where the cap of 300 boxes is reached) and a tighter one that keeps fewer boxes.
SUPPRESSIONS = [(0.25, 0.3), (0.25, 0.7)]
MAX_DET = 300
# Anchors whose raw outputs are written out (every row), spread over all levels.
ANCHOR_SAMPLES = 400
PIXEL_SAMPLES = 64
# The whole path: a JPEG file read as the predictor reads it (OpenCV), the prompt's phrases
# through the checkpoint's own CLIP text tower (transformers), the default suppression.
JPEG = "scene-420-320x240.jpg"
JPEG_PHRASES = ["people", "cars"]


def make_image(kind: str, w: int, h: int) -> np.ndarray:
    """Packed RGB uint8, (h, w, 3), from the integer formulas of make_parity.py."""
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    if kind == "gradient":
        r, g, b = x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)
    elif kind == "checker":
        cell = ((x // 16) + (y // 16)) % 2
        noise = (x * 7 + y * 13) % 31
        r = np.where(cell == 1, 230, 20) + noise
        g = np.where(cell == 1, 40, 60) + noise
        b = np.where(cell == 1, 30, 200) + noise
    elif kind == "rings":
        d = (x - w // 2) ** 2 + (y - h // 2) ** 2
        r, g, b = d % 256, (d // 7) % 256, 255 - (x * 3 + y) % 256
    else:
        raise ValueError(kind)
    return (np.stack([r, g, b], axis=-1) % 256).astype(np.uint8)


def text_embeddings(dim: int) -> torch.Tensor:
    """Fixed unit vectors, (phrases, dim): integer formulas the JSON carries anyway."""
    k = torch.arange(PHRASES, dtype=torch.float64)[:, None]
    i = torch.arange(dim, dtype=torch.float64)[None, :]
    t = torch.sin(0.37 * i * (k + 1) + k) + 0.1 * torch.cos(1.3 * i)
    return (t / t.norm(dim=-1, keepdim=True)).float()


def build(model_dir: Path):
    config = json.loads((model_dir / "config.json").read_text())
    yaml_path = Path(ultralytics.__file__).parent / "cfg/models/v8/yolov8-worldv2.yaml"
    cfg = copy.deepcopy(yaml_model_load(yaml_path))
    scale = config.get("scale", "s")
    if "depth_multiple" in config:
        cfg["scales"] = {
            scale: [config["depth_multiple"], config["width_multiple"], config["max_channels"]]
        }
    cfg["scale"] = scale
    nc = config.get("nc", 80)
    cfg["nc"] = nc
    torch.manual_seed(0)
    model = WorldModel(cfg, nc=nc, verbose=False)
    state = load_file(str(model_dir / "model.safetensors"))
    detector = {k: v for k, v in state.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(detector, strict=False)
    assert not unexpected, unexpected
    ignorable = [k for k in missing if k.endswith("num_batches_tracked") or ".dfl." in k]
    assert sorted(missing) == sorted(ignorable), sorted(set(missing) - set(ignorable))
    model.eval()
    # What set_classes does besides computing the embeddings: the head scores this many.
    model.model[-1].nc = PHRASES
    return model, config


def calibrate(model, text):
    """Sets every batch norm's running statistics to those of its input on the parity
    frames, as training would have: with the random statistics of the checkpoint the signal
    fades layer by layer and the outputs hardly depend on the frame. Returns the changed
    tensors by name, for the Rust side to apply to the same checkpoint."""
    inputs = [
        torch.from_numpy(letterbox(make_image(*image), auto=True)).permute(2, 0, 1)[None]
        .float() / 255.0
        for image in IMAGES
    ]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the frames
    model.train()
    with torch.no_grad():
        for x in inputs:
            model.predict(x, txt_feats=text[None])
    model.eval()
    # Then each level's contrastive scale and bias, so that its logits on that frame have
    # unit spread and a mean of -1 on those frames: scores spread out, most under a half.
    head = model.model[-1]
    logits = {i: [] for i in range(len(head.cv4))}
    hooks = [
        head.cv4[i].register_forward_hook(
            lambda m, inp, out, i=i: logits[i].append(out.flatten())
        )
        for i in range(len(head.cv4))
    ]
    with torch.no_grad():
        for x in inputs:
            model.predict(x, txt_feats=text[None])
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for i, contrast in enumerate(head.cv4):
            z = (torch.cat(logits[i]) - contrast.bias) / contrast.logit_scale.exp()
            contrast.logit_scale.fill_(-float(z.std().log()))
            contrast.bias.fill_(-1.0 - float(z.mean() / z.std()))
    changed = (".running_mean", ".running_var", ".logit_scale", ".bias")
    return {
        k: v.reshape(-1).tolist()
        for k, v in model.state_dict().items()
        if k.endswith(changed[:2]) or (".cv4." in k and k.endswith(changed[2:]))
    }


def letterbox(rgb: np.ndarray, auto: bool) -> np.ndarray:
    """The predictor's pre_transform and preprocess: BGR in, letterbox, RGB uint8 out."""
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    boxed = LetterBox((640, 640), auto=auto, stride=32)(image=bgr)
    return np.ascontiguousarray(boxed[..., ::-1])


def pixel_summary(img: np.ndarray):
    flat = img.reshape(-1).astype(np.int64)
    n = flat.size
    idx = [k * (n - 1) // (PIXEL_SAMPLES - 1) for k in range(PIXEL_SAMPLES)]
    return {
        "shape": list(img.shape),
        "sum": int(flat.sum()),
        "weighted_sum": int((flat * (np.arange(n) % 9973)).sum()),
        "sample_index": idx,
        "samples": [int(flat[i]) for i in idx],
    }


def run(model, text, rgb):
    boxed = letterbox(rgb, auto=True)
    x = torch.from_numpy(boxed).permute(2, 0, 1)[None].float() / 255.0
    with torch.no_grad():
        y, _ = model.predict(x, txt_feats=text[None])
    # PyTorch's own bf16 (autocast) against its f32, for the Rust side's bf16 test: how far
    # bf16 moves this network's outputs at all.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y16, _ = model.predict(x, txt_feats=text[None])
    y16 = y16.float()
    raw = y[0]  # (4 + phrases, anchors)
    anchors = raw.shape[1]
    idx = [k * (anchors - 1) // (ANCHOR_SAMPLES - 1) for k in range(ANCHOR_SAMPLES)]
    kept = []
    for conf, iou in SUPPRESSIONS:
        det = non_max_suppression(y, conf, iou, max_det=MAX_DET)[0]
        det[:, :4] = ops.scale_boxes(x.shape[2:], det[:, :4].clone(), rgb.shape[:2])
        kept.append({"conf": conf, "iou": iou, "detections": det.tolist()})
    return {
        "pixels": pixel_summary(boxed),
        "anchors": anchors,
        "anchor_index": idx,
        "raw": raw[:, idx].T.tolist(),
        "raw_abs_max": [float(raw[:4].abs().max()), float(raw[4:].abs().max())],
        "raw_row_sums": raw.double().sum(dim=1).tolist(),
        "suppressions": kept,
        "autocast_cosine": [cosine(y[:, :4], y16[:, :4]), cosine(y[:, 4:], y16[:, 4:])],
    }


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The cosine of two tensors' values taken as one vector each."""
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def clip_text(model_dir: Path, config: dict, phrases):
    """The phrases' embeddings from the checkpoint's text tower, L2-normalised as
    Ultralytics' text model gives them."""
    from tokenizers import Tokenizer
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    text_config = CLIPTextConfig(**config["text_config"])
    text_config.projection_dim = config["projection_dim"]
    tower = CLIPTextModelWithProjection(text_config).eval()
    state = load_file(str(model_dir / "model.safetensors"))
    missing, _ = tower.load_state_dict(
        {k: v for k, v in state.items() if k.startswith("text_")}, strict=False
    )
    assert all("position_ids" in k for k in missing), missing
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    rows = []
    with torch.no_grad():
        for phrase in phrases:
            ids = torch.tensor([tokenizer.encode(phrase).ids])
            rows.append(tower(input_ids=ids).text_embeds[0])
    t = torch.stack(rows)
    return t / t.norm(dim=-1, keepdim=True)


def jpeg_case(model, model_dir: Path, config: dict, jpeg_dir: Path):
    """The predictor's path on a JPEG file with the prompt's phrases."""
    text = clip_text(model_dir, config, JPEG_PHRASES)
    model.model[-1].nc = len(JPEG_PHRASES)
    bgr = cv2.imread(str(jpeg_dir / JPEG))
    boxed = LetterBox((640, 640), auto=True, stride=32)(image=bgr)[..., ::-1]
    x = torch.from_numpy(np.ascontiguousarray(boxed)).permute(2, 0, 1)[None].float() / 255.0
    with torch.no_grad():
        y, _ = model.predict(x, txt_feats=text[None])
    det = non_max_suppression(y, 0.25, 0.7, max_det=MAX_DET)[0]
    det[:, :4] = ops.scale_boxes(x.shape[2:], det[:, :4].clone(), bgr.shape[:2])
    model.model[-1].nc = PHRASES
    return {
        "file": JPEG,
        "phrases": JPEG_PHRASES,
        "text": text.tolist(),
        "pixels": pixel_summary(np.ascontiguousarray(boxed)),
        "detections": det.tolist(),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--jpegs", type=Path, default=Path(__file__).parents[2] / "tests/parity/jpeg")
    args = p.parse_args()
    model, config = build(args.model)
    text = text_embeddings(config.get("projection_dim", 512))
    stats = calibrate(model, text)
    frames = [run(model, text, make_image(k, w, h)) for k, w, h in IMAGES]
    # A batch of frames of different sizes is letterboxed to the square.
    jpeg = jpeg_case(model, args.model, config, args.jpegs)
    square = [pixel_summary(letterbox(make_image(k, w, h), auto=False)) for k, w, h in IMAGES[1:]]
    out = {
        "model": {"seed": SEED, "scale": config.get("scale"), "phrases": PHRASES},
        "versions": {
            "ultralytics": ultralytics.__version__,
            "torch": torch.__version__,
            "opencv": cv2.__version__,
            "transformers": __import__("transformers").__version__,
        },
        "max_det": MAX_DET,
        "images": [{"kind": k, "width": w, "height": h} for k, w, h in IMAGES],
        "text": text.tolist(),
        "calibrated": stats,
        "frames": frames,
        "square_pixels": square,
        "jpeg": jpeg,
    }
    args.out.write_text(json.dumps(out) + "\n")
    for (k, w, h), f in zip(IMAGES, frames):
        kept = [len(n["detections"]) for n in f["suppressions"]]
        print(f"{k} {w}x{h}: input {f['pixels']['shape']}, boxes kept {kept}")
    print(f"{JPEG}: {len(jpeg['detections'])} boxes kept")


if __name__ == "__main__":
    main()
