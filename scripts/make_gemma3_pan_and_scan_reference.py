#!/usr/bin/env python3
"""Pan-and-scan references for fixtures/gemma3-vision-tiny, from transformers'
Gemma3ImageProcessorPil + Gemma3Processor with `do_pan_and_scan`.

    /tmp/fxvenv/bin/python scripts/make_gemma3_pan_and_scan_reference.py

Run scripts/make_gemma3_vision_fixture.py first (it makes the model). This adds
image_wide.png (800x300: three 267 px crops at the processor's defaults) and
reference_pan_and_scan.{json,safetensors}: per case the request's processor
kwargs, the rendered template, the expanded input ids, every image's pixel
values (the image, then its crops), the logits at the last position and 8
greedy ids (float32, eager attention).

Cases: `wide` (defaults: 3 crops) and `mixed` (smaller crops, a higher ratio
to activate: the tall RGBA image gets 2 crops, the 4:3 one none).
"""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402
import make_gemma3_vision_fixture as g3v  # noqa: E402

from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoTokenizer, Gemma3ForConditionalGeneration, Gemma3Processor  # noqa: E402
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil  # noqa: E402

NEW_TOKENS = 8
CASES = {
    "wide": {
        "media": ["image_wide.png"],
        "kwargs": {"do_pan_and_scan": True},
        "messages": [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "Describe the panorama."}]}],
    },
    "mixed": {
        "media": ["image_b_rgba.png", "image_a.png"],
        "kwargs": {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 32, "pan_and_scan_max_num_crops": 3,
                   "pan_and_scan_min_ratio_to_activate": 1.4},
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": "with"},
            {"type": "image"}, {"type": "text", "text": "Which one is taller?"}]}],
    },
}


def smooth_image(w: int, h: int) -> np.ndarray:
    """Gradients, stripes and discs without noise (a small PNG): uint8 [h, w, 3]."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([255 * x / (w - 1), 255 * y / (h - 1), 128 + 100 * np.sin((x + 2 * y) / 23.0)], -1)
    for i, (cx, c) in enumerate([(0.15, (250, 40, 40)), (0.5, (40, 250, 40)), (0.85, (40, 40, 250))]):
        img[((x - cx * w) ** 2 + (y - h * (0.3 + 0.2 * i)) ** 2) < (h / 4) ** 2] = c
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def main() -> None:
    out = mf.FIXTURES / g3v.NAME
    Image.fromarray(smooth_image(800, 300)).save(out / "image_wide.png", optimize=True)
    tok = AutoTokenizer.from_pretrained(out)
    image_token = tok.convert_tokens_to_ids("<image_soft_token>")
    ip = Gemma3ImageProcessorPil(**{k: v for k, v in g3v.PREPROCESSOR.items()
                                    if k not in ("image_processor_type", "processor_class", "image_seq_length")})
    processor = Gemma3Processor(image_processor=ip, tokenizer=tok, chat_template=tok.chat_template,
                                image_seq_length=g3v.MM_TOKENS)
    ref = Gemma3ForConditionalGeneration.from_pretrained(out, dtype=torch.float32,
                                                         attn_implementation="eager").eval()
    tensors, cases = {}, {}
    for case, spec in CASES.items():
        rendered = tok.apply_chat_template(spec["messages"], add_generation_prompt=True, tokenize=False)
        images = [Image.open(out / m) for m in spec["media"]]
        inputs = processor(text=[rendered], images=images, return_tensors="pt", add_special_tokens=False,
                           **spec["kwargs"])
        inputs.pop("num_crops", None)
        image_kwargs = {**Gemma3Processor.images_kwargs, **spec["kwargs"]}  # the processor's defaults
        num_crops = [int(n) for n in ip(images=images, **image_kwargs)["num_crops"]]
        input_ids = inputs["input_ids"][0].tolist()
        blocks = len(inputs["pixel_values"])
        assert input_ids.count(image_token) == blocks * g3v.MM_TOKENS
        with torch.no_grad():
            logits = ref(**inputs).logits[0].float()
            gen = ref.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                               pad_token_id=0, num_beams=1)
        greedy = gen[0, len(input_ids):].tolist()
        top2 = torch.topk(logits[-1], 2).values
        assert float(top2[0] - top2[1]) > 1e-3, f"{case}: last position too close to a tie"
        tensors[f"{case}.last_logits"] = logits[-1].contiguous()
        first = 0
        for i, n in enumerate(num_crops):  # each image's blocks: the image, then its crops
            tensors[f"{case}.item{i}.pixel_values"] = inputs["pixel_values"][first:first + 1 + n].contiguous()
            first += 1 + n
        assert first == blocks
        cases[case] = {"messages": spec["messages"], "media": spec["media"], "kwargs": spec["kwargs"],
                       "rendered": rendered, "input_ids": input_ids, "greedy_ids": greedy, "crops": num_crops}
        mf.log(f"{g3v.NAME} pan-and-scan {case}: crops {num_crops}, {len(input_ids)} tokens, greedy {greedy}")
    save_file(tensors, str(out / "reference_pan_and_scan.safetensors"), metadata={"format": "pt"})
    mf.write_json(out / "reference_pan_and_scan.json", {
        "fixture": g3v.NAME, "generated_by": "python scripts/make_gemma3_pan_and_scan_reference.py",
        "versions": mf.versions(), "compute_dtype": "float32", "image_processor": "Gemma3ImageProcessorPil",
        "cases": cases,
    })


if __name__ == "__main__":
    main()
