#!/usr/bin/env python3
"""Hugging Face transformers side of the workloads, in its own process.

    benchmark/.venv/bin/python benchmark/workers/hf.py SPEC.json OUT.json

model.generate(), greedy (do_sample=False), batched with left padding where the
prompts differ in length. "ignore EOS": the generation config's eos_token_id is
cleared (so nothing stops early) and min_new_tokens = max_new_tokens. Token
arrival times come from a StoppingCriteria, which generate() calls once per
step for the whole batch (a streamer only works at batch size 1).
A .gguf model is loaded with transformers' GGUF loader (gguf_file=...), which
DEQUANTIZES it to float32: the same weight values, computed in f32.
"""

from __future__ import annotations

import io
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

spec = json.loads(Path(sys.argv[1]).read_text())
out_file = Path(sys.argv[2])
threads = int(spec.get("threads", 2))
torch.set_num_threads(threads)
device = spec.get("device", "cpu")
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
dtype = DTYPES[spec.get("dtype", "f32")]


def now() -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


class Clock(StoppingCriteria):
    """Records when each step's tokens exist; never stops generation."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(now())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def load_lm(path: str):
    p = Path(path)
    if p.suffix == ".gguf":
        m = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype)
    else:
        m = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype)
    return m.to(device).eval()


def no_eos(model) -> None:
    gc = model.generation_config
    gc.eos_token_id = None
    if gc.pad_token_id is None:
        gc.pad_token_id = 0


def batch(prompts: list[list[int]], pad: int):
    """Left-padded input_ids and attention_mask."""
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), n), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):] = torch.tensor(p)
        mask[i, n - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def generate(model, prompts, max_new, **extra):
    ids, mask = batch(prompts, model.generation_config.pad_token_id)
    clock = Clock()
    start = now()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                         do_sample=False, stopping_criteria=StoppingCriteriaList([clock]), **extra)
    end = now()
    return out[:, ids.shape[1]:], start, clock.times, end


def r(x, d=3):
    return None if x is None else round(float(x), d)


def task_greedy(model):
    toks, *_ = generate(model, [spec["prompt"]], spec["maxTokens"])
    forced = spec.get("forced") or []
    argmax = []
    if forced:  # teacher forcing: one forward over prompt + forced, argmax at each position
        ids = torch.tensor([spec["prompt"] + forced[:-1]], device=device)
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[0]
        argmax = logits[len(spec["prompt"]) - 1:].argmax(-1).tolist()
    return {"tokenIds": toks[0].tolist(), "forcedArgmax": argmax}


def task_single(model):
    if spec.get("warmup"):
        generate(model, [spec["warmup"]], 4)
    toks, start, times, end = generate(model, [spec["prompt"]], spec["maxTokens"])
    n = toks.shape[1]
    return {
        "promptTokens": len(spec["prompt"]),
        "outputTokens": int(n),
        "ttftMs": r((times[0] - start) * 1000, 2),
        "decodeTokS": r((n - 1) / (times[-1] - times[0]), 2) if n > 1 else None,
        "e2eS": r(end - start),
    }


def task_offline(model):
    if spec.get("warmup"):
        generate(model, [spec["warmup"]], 4)
    prompts = spec["prompts"]
    toks, start, times, end = generate(model, prompts, spec["maxTokens"])
    wall = end - start
    out = int(toks.numel())
    inp = sum(len(p) for p in prompts)
    return {"prompts": len(prompts), "promptTokens": inp, "outputTokens": out, "wallS": r(wall),
            "outTokS": r(out / wall, 2), "totalTokS": r((inp + out) / wall, 2)}


def task_multimodal(_):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = spec["model"]
    t0 = time.perf_counter()
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device).eval()
    load_s = time.perf_counter() - t0
    no_eos(model)
    image_bytes = Path(spec["image"]).read_bytes()
    warm_bytes = Path(spec["warmupImage"]).read_bytes()
    max_new = spec["maxTokens"]

    def messages(system=None):
        m = [{"role": "system", "content": system}] if system else []
        return m + [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": spec["text"]}]}]

    prompt_tokens = []

    @torch.inference_mode()
    def run(img_bytes: bytes, n: int = 1, system=None):
        """Decode + preprocess + generate, like one request (n: batch of n copies)."""
        clock = Clock()
        start = now()
        imgs = [Image.open(io.BytesIO(img_bytes)).convert("RGB") for _ in range(n)]
        text = processor.apply_chat_template(messages(system), add_generation_prompt=True)
        inputs = processor(text=[text] * n, images=imgs, padding=True, return_tensors="pt",
                           max_pixels=spec["maxPixels"]).to(device)
        prompt_tokens.append(int(inputs["input_ids"].shape[1]))
        model.generate(**inputs, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                       stopping_criteria=StoppingCriteriaList([clock]))
        end = now()
        return start, clock.times, end

    processor.tokenizer.padding_side = "left"
    run(warm_bytes)  # first-call costs
    s, t, _ = run(image_bytes)
    out = {"loadS": r(load_s, 2), "coldTtftMs": r((t[0] - s) * 1000, 2)}
    s, t, _ = run(image_bytes, system="Answer briefly.")
    out["mediaWarmTtftMs"] = r((t[0] - s) * 1000, 2)
    out["promptTokens"] = prompt_tokens[1]
    if spec.get("coldOnly"):  # the real-shape model: each request takes minutes
        return out
    s, t, _ = run(image_bytes)
    out["warmTtftMs"] = r((t[0] - s) * 1000, 2)
    n = spec["concurrent"]
    s, t, e = run(image_bytes, n=n)
    return {
        **out, "concurrent": n, "concWallS": r(e - s), "concImagesPerS": r(n / (e - s)),
        "concTtftP50Ms": r((t[0] - s) * 1000, 2), "concTtftP99Ms": r((t[0] - s) * 1000, 2),
        "note": "no media caches in transformers: cold/media-warm/warm all recompute; the concurrent requests run as one batch",
    }


def main():
    t0 = time.perf_counter()
    task = spec["task"]
    model = None
    if task != "multimodal":
        model = load_lm(spec["model"])
        no_eos(model)
    load_s = time.perf_counter() - t0  # the multimodal task loads its own model and times it
    result = {"single": task_single, "offline": task_offline, "greedy": task_greedy, "multimodal": task_multimodal}[task](model)
    import transformers

    out_file.write_text(json.dumps({
        "engine": "transformers", "task": task, "model": Path(spec["model"]).name, "device": device,
        "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "loadS": r(load_s, 2), **result,
        "peakRssMiB": r(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }))


if __name__ == "__main__":
    main()
