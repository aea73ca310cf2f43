#!/usr/bin/env python3
"""transformers' side of towers.mjs: one cold image request, split into its parts.

    benchmark/.venv/bin/python benchmark/workers/hf_tower.py SPEC.json OUT.json

SPEC: {"model": dir, "image": png, "text": str, "runs": n, "threads": n}.
Per run (f32, torch.inference_mode): the processor on the chat-templated
prompt and the PIL image, the tower + projector alone (get_image_features),
then the whole first forward pass (which runs the tower again) — what a cold
request costs before its first token is processor + forward.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

spec = json.loads(Path(sys.argv[1]).read_text())
torch.set_num_threads(int(spec.get("threads", 2)))
model = AutoModelForImageTextToText.from_pretrained(spec["model"], dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained(spec["model"])
image = Image.open(spec["image"]).convert("RGB")
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": spec["text"]}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
TOWER_KEYS = ("pixel_values", "image_grid_thw", "image_sizes")


@torch.inference_mode()
def once() -> dict:
    t0 = time.perf_counter()
    inputs = processor(text=prompt, images=image, return_tensors="pt")
    t1 = time.perf_counter()
    model.get_image_features(**{k: inputs[k] for k in TOWER_KEYS if k in inputs})
    t2 = time.perf_counter()
    model(**inputs)
    t3 = time.perf_counter()
    return {
        "processor_ms": (t1 - t0) * 1e3,
        "tower_ms": (t2 - t1) * 1e3,
        "forward_ms": (t3 - t2) * 1e3,
        "cold_ms": (t1 - t0 + t3 - t2) * 1e3,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
    }


once()  # first-call costs (allocator, thread pool)
runs = [once() for _ in range(int(spec.get("runs", 3)))]
Path(sys.argv[2]).write_text(json.dumps({"runs": runs}))
