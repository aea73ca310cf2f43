#!/usr/bin/env python3
"""Write random-weight checkpoints whose VISION TOWERS have released shapes.

    benchmark/.venv/bin/python benchmark/prepare-towers.py [--out benchmark/models] [--only NAME] [--force]

What a cold image costs is the tower's work; the fixtures' towers are tiny, so
`towers.mjs` times these instead. Each checkpoint is its fixture (same family,
tokenizer, chat template and processor) with the tower and the processor's
image size set to the released model's, and the fixture's tiny language model
(its prefill over the image tokens is a small part of the time; say so when
quoting the numbers), and bench-image.png, the benchmark photo resized to the
tower's size (336 or 896 px square):

  llava-1.5-tower     CLIP ViT-L/14 at 336 px (24 layers x 1024, 16 heads,
                      FFN 4096), features of layer -2, 576 image tokens
                      (llava-hf/llava-1.5-7b-hf's tower)
  gemma3-tower        SigLIP so400m/14 at 896 px (27 layers x 1152, 16 heads,
                      FFN 4304), 4096 patches pooled to 256 tokens
                      (google/gemma-3-4b-it's tower)
  llava-onevision-tower
                      SigLIP so400m/14 at 384 px, released anyres pinpoints
                      (384..2304), anyres_max_9: a 384 px image is one tile
                      plus the base image, 2 x 729 features + newlines
                      (llava-hf/llava-onevision-qwen2-0.5b-ov-hf's tower)
  qwen2-vl-tower      Qwen2-VL-2B's ViT (32 layers x 1280, 16 heads, merge 2);
                      its image size follows the input (min/max_pixels)

Weights are transformers' own random init (the timing does not depend on the
values), stored as bf16 safetensors (half the disk); both engines compute in
their default CPU dtype.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


def llava(cfg: dict, pre: dict, proc: dict) -> None:
    cfg["vision_config"].update(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768,
    )
    cfg["image_seq_length"] = 576
    pre["size"] = {"shortest_edge": 336}
    pre["crop_size"] = {"height": 336, "width": 336}
    # llava-hf/llava-1.5-7b-hf's processor_config.json (the fixture builds its processor in code)
    proc.update(patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1,
                processor_class="LlavaProcessor")


def gemma3(cfg: dict, pre: dict, proc: dict) -> None:
    cfg["vision_config"].update(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        image_size=896, patch_size=14,
    )
    cfg["mm_tokens_per_image"] = 256
    pre["size"] = {"height": 896, "width": 896}
    proc["image_seq_length"] = 256


def llava_onevision(cfg: dict, pre: dict, proc: dict) -> None:
    cfg["vision_config"].update(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        image_size=384, patch_size=14,
    )
    pinpoints = [[384 * a, 384 * b] for a in range(1, 7) for b in range(1, 7)]
    cfg["image_grid_pinpoints"] = pre["image_grid_pinpoints"] = pinpoints
    cfg["vision_aspect_ratio"] = proc["vision_aspect_ratio"] = "anyres_max_9"
    pre["size"] = {"height": 384, "width": 384}
    proc["num_image_tokens"] = 729


def qwen2_vl(cfg: dict, pre: dict, proc: dict) -> None:
    cfg["vision_config"].update(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4)
    # Qwen2-VL's own bounds, so a 336 px / 896 px image keeps its size.
    pre["min_pixels"] = 56 * 56
    pre["max_pixels"] = 28 * 28 * 1280


TOWERS = {
    "llava-1.5-tower": ("llava-tiny", llava, 336),
    "gemma3-tower": ("gemma3-vision-tiny", gemma3, 896),
    "llava-onevision-tower": ("llava-onevision-tiny", llava_onevision, 384),
    "qwen2-vl-tower": ("qwen2-vl-tiny", qwen2_vl, 896),
}


def read_json(p: Path) -> dict:
    return json.loads(p.read_text()) if p.exists() else {}


def write(name: str, out: Path) -> None:
    fixture, patch, _ = TOWERS[name]
    src = FIXTURES / fixture
    dst = out / name
    tmp = out / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    skip = {"model.safetensors", "reference.safetensors", "reference.json"}
    for f in src.iterdir():
        if f.name not in skip and f.suffix in {".json", ".jinja"}:
            shutil.copyfile(f.resolve(), tmp / f.name)
    cfg = read_json(tmp / "config.json")
    pre = read_json(tmp / "preprocessor_config.json")
    proc = read_json(tmp / "processor_config.json")
    patch(cfg, pre, proc)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    (tmp / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    video = tmp / "video_preprocessor_config.json"
    if video.exists():  # frames go through the same tower
        video.write_text(json.dumps(read_json(video) | {"size": pre["size"]}, indent=2))
    if proc:
        (tmp / "processor_config.json").write_text(json.dumps(proc, indent=2))
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(tmp)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp, safe_serialization=True)
    # save_pretrained rewrites config.json; keep the patched one for the processor-side keys
    (tmp / "config.json").write_text(json.dumps(cfg | {"dtype": "bfloat16"}, indent=2))
    size = TOWERS[name][2]
    Image.open(FIXTURES / "vision" / "photo_1024x768.jpg").convert("RGB").resize((size, size), Image.BICUBIC).save(tmp / "bench-image.png")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {dst} ({n / 1e6:.0f} M parameters)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "benchmark" / "models")
    ap.add_argument("--only", choices=sorted(TOWERS))
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    for name in [a.only] if a.only else TOWERS:
        if a.force or not (a.out / name / "config.json").exists():
            write(name, a.out)


if __name__ == "__main__":
    main()
