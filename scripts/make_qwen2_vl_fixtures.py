#!/usr/bin/env python3
"""Build fixtures/qwen2-vl-tiny and fixtures/qwen2_5-vl-tiny: tiny random
Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration checkpoints
(real architectures, the real Qwen tokenizer, the real Qwen2-VL chat template)
and reference outputs from transformers.

    /tmp/fxvenv/bin/python scripts/make_qwen2_vl_fixtures.py

(same venv as scripts/make_fixtures.py; see scripts/requirements-fixtures.txt).

The two folders also cover the four ways a checkpoint can be laid out:

  * qwen2-vl-tiny: a flat config.json as the released Qwen2-VL checkpoints have
    (text fields at the top, `rope_scaling: {type: mrope, mrope_section}`) with
    weights named the newer way (`model.visual.*`, `model.language_model.*`).
  * qwen2_5-vl-tiny: config.json as transformers 5 writes it (`text_config` with
    `rope_parameters.mrope_section`) with weights named as released
    (`visual.*`, `model.*`, `lm_head`).

Both tie lm_head to the embeddings (as Qwen2-VL-2B does): with hidden size 16 the
bf16 vocabulary table is ~4.9 MB, next to the 5.4 MB tokenizer.

Reference cases, each through Qwen2VLProcessor (slow PIL image processor, torch
video processor) and the model in float32 with eager attention:

  * one_image: one image then text;
  * two_images: text, image, text, image, text (interleaved);
  * video: four frames given as images (their rate, 2 fps, passed as metadata).

Recorded per case: rendered prompt, expanded input ids, M-RoPE position ids and
rope delta, logits at the last position, 8 greedy ids; per media item: pixel
values, grid_thw and the projected vision embeddings (what replaces its
placeholder tokens).
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,  # noqa: E402
                          Qwen2_5_VLProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                          Qwen2VLProcessor)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor  # noqa: E402
from transformers.video_utils import VideoMetadata  # noqa: E402

SEED = 29
NEW_TOKENS = 8
FRAME_FPS = 2.0

# The chat template of Qwen2-VL-*-Instruct (Qwen2.5-VL ships the same one).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
# Small pixel bounds keep the fixture tiny: 4..20 merged tokens per image.
MIN_PIXELS = 28 * 28 * 4
MAX_PIXELS = 28 * 28 * 20
# Qwen2.5-VL attends within windows of 112 px (4 merged tokens a side, the
# released window_size, which llama.cpp's mmproj does not store and assumes):
# larger bounds make every image and the video span several windows.
MIN_PIXELS_25 = 28 * 28 * 24
MAX_PIXELS_25 = 28 * 28 * 40


def preprocessor(min_pixels: int, max_pixels: int) -> dict:
    return {
        "min_pixels": min_pixels, "max_pixels": max_pixels, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": MEAN, "image_std": STD,
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
    }


def video_preprocessor(min_pixels: int, max_pixels: int) -> dict:
    return {
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}, "patch_size": 14,
        "temporal_patch_size": 2, "merge_size": 2, "image_mean": MEAN, "image_std": STD,
        "min_frames": 4, "max_frames": 768, "video_processor_type": "Qwen2VLVideoProcessor",
    }

TEXT = {
    "hidden_size": 16, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 1, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
    "vocab_size": 151936, "hidden_act": "silu", "use_sliding_window": False,
    "bos_token_id": 151643, "eos_token_id": 151645,
}
ROPE_THETA = 1000000.0
# head_dim 8: 4 rotary frequencies, split (temporal, height, width).
MROPE_SECTION = [1, 1, 2]

MEDIA = {
    "image_a": "image_a.png",
    "image_b": "image_b.png",
    "video": [f"frame_{i}.png" for i in range(4)],
}
CASES = {
    "one_image": {
        "media": ["image_a"],
        "messages": [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "Describe this image."}]}],
    },
    "two_images": {
        "media": ["image_a", "image_b"],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": "with"},
            {"type": "image"}, {"type": "text", "text": "Which one is brighter?"}]}],
    },
    "video": {
        "media": ["video"],
        "messages": [{"role": "user", "content": [
            {"type": "video"}, {"type": "text", "text": "What happens in this video?"}]}],
    },
}


def synth_image(w: int, h: int, seed: int) -> np.ndarray:
    """Gradients, a disc and noise: uint8 [h, w, 3]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 255 * x / max(w - 1, 1)
    g = 255 * y / max(h - 1, 1)
    b = 128 + 100 * np.sin((x + 2 * y) / 7.0)
    cx, cy = w * (0.3 + 0.4 * rng.random()), h * (0.3 + 0.4 * rng.random())
    disc = ((x - cx) ** 2 + (y - cy) ** 2) < (min(w, h) / 4) ** 2
    img = np.stack([r, g, b], -1)
    img[disc] = rng.integers(0, 256, 3)
    img += rng.normal(0, 12, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def synth_frames(w: int, h: int, n: int, seed: int) -> list[np.ndarray]:
    """A disc moving left to right over a fixed background."""
    rng = np.random.default_rng(seed)
    base = synth_image(w, h, seed)
    frames = []
    y, x = np.mgrid[0:h, 0:w]
    for i in range(n):
        f = base.copy()
        cx = (i + 0.5) * w / n
        f[((x - cx) ** 2 + (y - h / 2) ** 2) < (h / 5) ** 2] = [250, 240, 20]
        f = np.clip(f.astype(np.int16) + rng.integers(-6, 7, f.shape), 0, 255).astype(np.uint8)
        frames.append(f)
    return frames


@torch.no_grad()
def init_weights(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(SEED)
    norms = {n for n, m in model.named_modules() if "Norm" in type(m).__name__}
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        module = name.rsplit(".", 1)[0]
        if module in norms and name.endswith(".weight"):
            x = 1.0 + 0.2 * torch.randn(p.shape, generator=g)
        elif name.endswith(".bias"):
            x = 0.3 * torch.randn(p.shape, generator=g)
        elif name.endswith("embed_tokens.weight"):
            x = 0.5 * torch.randn(p.shape, generator=g)
        else:  # linear [out, in] or conv [out, in, t, h, w]
            fan_in = int(np.prod(p.shape[1:]))
            x = (1.5 / fan_in ** 0.5) * torch.randn(p.shape, generator=g)
        p.copy_(mf.bf16_round(x))


def build_tokenizer(out: Path) -> None:
    src = mf.qwen_tokenizer_files()
    mf.build_qwen_tokenizer(src, out, CHAT_TEMPLATE)
    mf.write_json(out / "chat_template.json", {"chat_template": CHAT_TEMPLATE})


def original_rope_index(ids, grids, kinds, intervals, image_id, video_id, merge):
    """Qwen's own (and vLLM's) M-RoPE layout: text after a media item continues
    at the item's largest position + 1. Used to check that the fixture cases do
    not depend on where transformers 5 differs (it continues at
    max(h, w) / merge, which is smaller for long videos)."""
    pos, cur, i, k = [], 0, 0, 0
    while i < len(ids):
        if ids[i] in (image_id, video_id):
            t, h, w = grids[k]
            h, w = h // merge, w // merge
            for ti in range(t):
                for hi in range(h):
                    for wi in range(w):
                        pos.append((cur + int(ti * intervals[k]), cur + hi, cur + wi))
            cur = max(max(p) for p in pos[-t * h * w:]) + 1
            i += t * h * w
            k += 1
        else:
            pos.append((cur, cur, cur))
            cur += 1
            i += 1
    return pos


def write_released_flat_config(out: Path, cfg: dict) -> None:
    """config.json as Qwen/Qwen2-VL-2B-Instruct has it: text fields at the top
    level, rope settings under rope_scaling with type mrope."""
    text = dict(cfg["text_config"])
    flat = {k: v for k, v in cfg.items() if k != "text_config"}
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "vocab_size",
              "hidden_act", "use_sliding_window", "sliding_window", "max_window_layers",
              "bos_token_id", "eos_token_id", "attention_dropout"):
        if k in text:
            flat[k] = text[k]
    rope = text["rope_parameters"]
    flat["rope_theta"] = rope["rope_theta"]
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    flat["model_type"] = "qwen2_vl"
    flat["vision_config"] = {k: v for k, v in cfg["vision_config"].items() if k != "rope_parameters"}
    mf.write_json(out / "config.json", flat)


def rename_to_newer_layout(out: Path) -> None:
    """visual.* -> model.visual.*, model.* -> model.language_model.* (as the
    transformers 4.5x releases saved these models)."""
    path = out / "model.safetensors"
    sd = load_file(str(path))
    renamed = {}
    for k, v in sd.items():
        if k.startswith("visual."):
            renamed["model." + k] = v
        elif k.startswith("model."):
            renamed["model.language_model." + k[len("model."):]] = v
        else:
            renamed[k] = v
    save_file(dict(sorted(renamed.items())), str(path), metadata={"format": "pt"})


def build(name: str, kind: str) -> None:
    out = mf.FIXTURES / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    build_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = {t: tok.convert_tokens_to_ids(t) for t in
           ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    assert ids == {"<|image_pad|>": 151655, "<|video_pad|>": 151656,
                   "<|vision_start|>": 151652, "<|vision_end|>": 151653}, ids

    text = dict(TEXT, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA,
                                       "mrope_section": MROPE_SECTION}, tie_word_embeddings=True)
    # Towers of 3 blocks: llama.cpp's converter maps merger.mlp.{0,2} through its
    # block-index table, so a tower of fewer than 3 blocks cannot be converted.
    if kind == "qwen2_vl":
        pre, video_pre = preprocessor(MIN_PIXELS, MAX_PIXELS), video_preprocessor(MIN_PIXELS, MAX_PIXELS)
        vision = {"depth": 3, "embed_dim": 32, "hidden_size": TEXT["hidden_size"], "num_heads": 2,
                  "mlp_ratio": 2, "hidden_act": "quick_gelu", "patch_size": 14, "spatial_merge_size": 2,
                  "temporal_patch_size": 2}
        cfg = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)
        cfg.architectures = ["Qwen2VLForConditionalGeneration"]
        model = Qwen2VLForConditionalGeneration(cfg).float()
    else:
        pre = preprocessor(MIN_PIXELS_25, MAX_PIXELS_25)
        video_pre = video_preprocessor(MIN_PIXELS_25, MAX_PIXELS_25)
        # Blocks 0 and 2 windowed, 1 full (llama.cpp: n_wa_pattern 2).
        vision = {"depth": 3, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                  "out_hidden_size": TEXT["hidden_size"], "hidden_act": "silu", "patch_size": 14,
                  "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                  "fullatt_block_indexes": [1], "tokens_per_second": 2}
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)
        cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
        model = Qwen2_5_VLForConditionalGeneration(cfg).float()
    torch.manual_seed(SEED)
    init_weights(model)
    model.to(torch.bfloat16).save_pretrained(out)
    if kind == "qwen2_vl":
        write_released_flat_config(out, json.loads((out / "config.json").read_text()))
        rename_to_newer_layout(out)
    mf.write_json(out / "generation_config.json", {"bos_token_id": 151643, "eos_token_id": [151645, 151643],
                                                   "pad_token_id": 151643,
                                                   "transformers_version": transformers.__version__})
    mf.write_json(out / "preprocessor_config.json", pre)
    mf.write_json(out / "video_preprocessor_config.json", video_pre)

    # Media: two images of different shapes and four frames of a short clip.
    images = {"image_a": synth_image(120, 90, 1), "image_b": synth_image(64, 100, 2)}
    frames = synth_frames(84, 56, 4, 3)
    for key, arr in images.items():
        Image.fromarray(arr).save(out / MEDIA[key])
    for f, arr in zip(MEDIA["video"], frames):
        Image.fromarray(arr).save(out / f)
    pil = {k: Image.open(out / MEDIA[k]).convert("RGB") for k in images}
    pil_frames = [np.asarray(Image.open(out / f).convert("RGB")) for f in MEDIA["video"]]

    image_processor = Qwen2VLImageProcessorPil(**{k: v for k, v in pre.items() if not k.endswith("_type")
                                                  and k != "processor_class"})
    video_processor = Qwen2VLVideoProcessor(**{k: v for k, v in video_pre.items()
                                               if not k.endswith("_type")})
    proc_cls = Qwen2VLProcessor if kind == "qwen2_vl" else Qwen2_5_VLProcessor
    processor = proc_cls(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                         chat_template=CHAT_TEMPLATE)

    ref = type(model).from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    merge = 2
    tensors, cases = {}, {}
    for case, spec in CASES.items():
        rendered = tok.apply_chat_template(spec["messages"], add_generation_prompt=True, tokenize=False)
        imgs = [pil[m] for m in spec["media"] if m != "video"]
        kwargs = {}
        if "video" in spec["media"]:
            kwargs = {"videos": [np.stack(pil_frames)],
                      "video_metadata": [VideoMetadata(total_num_frames=len(pil_frames), fps=FRAME_FPS)],
                      "do_sample_frames": False}
        inputs = processor(text=[rendered], images=imgs or None, return_tensors="pt", **kwargs)
        input_ids = inputs["input_ids"][0].tolist()
        rope_kwargs = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
                       if k in inputs}
        position_ids, deltas = ref.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                        **rope_kwargs)
        positions = position_ids[:, 0].tolist()

        grids, kinds, intervals = [], [], []
        if "image_grid_thw" in inputs:
            for g in inputs["image_grid_thw"].tolist():
                grids.append(g)
                kinds.append("image")
                intervals.append(1.0)
        if "video_grid_thw" in inputs:
            spg = inputs.get("second_per_grid_ts")
            for i, g in enumerate(inputs["video_grid_thw"].tolist()):
                grids.append(g)
                kinds.append("video")
                intervals.append(cfg.vision_config.tokens_per_second * float(spg[i]) if kind != "qwen2_vl"
                                 else 1.0)
        ours = original_rope_index(input_ids, grids, kinds, intervals, ids["<|image_pad|>"],
                                   ids["<|video_pad|>"], merge)
        assert [list(p) for p in zip(*ours)] == positions, f"{case}: M-RoPE layouts disagree"

        with torch.no_grad():
            logits = ref(**inputs).logits[0].float()
            feats = []
            if "pixel_values" in inputs:
                feats += list(ref.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                                           return_dict=True).pooler_output)
            if "pixel_values_videos" in inputs:
                feats += list(ref.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"],
                                                           return_dict=True).pooler_output)
            gen = ref.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                               pad_token_id=151643, num_beams=1)
        greedy = gen[0, len(input_ids):].tolist()
        assert len(greedy) == NEW_TOKENS, greedy
        top2 = torch.topk(logits[-1], 2).values
        assert float(top2[0] - top2[1]) > 1e-3, f"{case}: last position too close to a tie"

        tensors[f"{case}.last_logits"] = logits[-1].contiguous()
        # Pixel values split per item (rows = t * h * w of each grid).
        pv = [inputs[k] for k in ("pixel_values", "pixel_values_videos") if k in inputs]
        pv = torch.cat(pv, 0) if pv else None
        row = 0
        for i, (g, e) in enumerate(zip(grids, feats)):
            n = g[0] * g[1] * g[2]
            tensors[f"{case}.item{i}.pixel_values"] = pv[row:row + n].float().contiguous()
            tensors[f"{case}.item{i}.embeds"] = e.float().contiguous()
            row += n
        cases[case] = {
            "messages": spec["messages"],
            "media": [MEDIA[m] for m in spec["media"]],
            "kinds": kinds,
            "rendered": rendered,
            "input_ids": input_ids,
            "grid_thw": grids,
            "num_tokens": [g[0] * g[1] * g[2] // merge ** 2 for g in grids],
            "second_per_grid_ts": [float(x) for x in inputs["second_per_grid_ts"]]
            if "second_per_grid_ts" in inputs else None,
            "position_ids": positions,
            "rope_delta": int(deltas[0, 0]),
            "greedy_ids": greedy,
            "last_argmax": int(torch.argmax(logits[-1])),
        }
        mf.log(f"{name} {case}: {len(input_ids)} tokens, grids {grids}, delta {int(deltas[0, 0])}, greedy {greedy}")

    # The two-image case repeats image_a: store its pixel values once.
    for k in [k for k in tensors if k.startswith("two_images.item0.pixel_values")]:
        assert torch.equal(tensors[k], tensors["one_image.item0.pixel_values"])
        del tensors[k]
    save_file(tensors, str(out / "reference.safetensors"), metadata={"format": "pt"})
    mf.write_json(out / "reference.json", {
        "fixture": name,
        "generated_by": "python scripts/make_qwen2_vl_fixtures.py",
        "versions": mf.versions(),
        "seed": SEED,
        "weights_dtype": "bfloat16",
        "compute_dtype": "float32",
        "image_processor": "Qwen2VLImageProcessorPil",
        "video_processor": "Qwen2VLVideoProcessor",
        "frame_fps": FRAME_FPS,
        "token_ids": ids,
        "notes": "two_images.item0 pixel values = one_image.item0 (stored once)",
        "cases": cases,
    })


def main() -> None:
    build("qwen2-vl-tiny", "qwen2_vl")
    build("qwen2_5-vl-tiny", "qwen2_5_vl")


if __name__ == "__main__":
    main()
