#!/usr/bin/env python3
"""Build fixtures/gemma3-vision-tiny: a tiny random
Gemma3ForConditionalGeneration (SigLIP tower, Gemma 3 projector, the Gemma 3
LM of fixtures/gemma3-tiny's shape) and reference outputs from transformers.

    /tmp/fxvenv/bin/python scripts/make_gemma3_vision_fixture.py

Run scripts/make_gemma3_fixture.py first: this fixture's tokenizer files
(the real Gemma 3 tokenizer, 33 MB) are symlinks to fixtures/gemma3-tiny's,
so git holds them once.

The tower: SigLIP, 2 layers, hidden 64, 4 heads, 64 px images in 8 px patches
(an 8x8 grid), pooled 2x2 to mm_tokens_per_image 16. Images go through
Gemma3ImageProcessorPil (bilinear resize to 64x64, rescale, normalize 0.5/0.5,
no pan-and-scan). References in float32 with eager attention.

Recorded (reference.json, reference.safetensors): per case the rendered chat
template, the processor's expanded input ids, its pixel values, the
projector's output per image (`<case>.item<i>.embeds`), the logits at the
last position and 8 greedy ids.
"""

import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402
import make_gemma3_fixture as g3  # noqa: E402
import make_llava_fixture as llava  # noqa: E402

from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoTokenizer, Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor  # noqa: E402
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil  # noqa: E402

SEED = 14
NEW_TOKENS = 8
NAME = "gemma3-vision-tiny"
IMAGE_SIZE = 64
PATCH = 8
MM_TOKENS = 16
PREPROCESSOR = {
    "do_convert_rgb": True, "do_normalize": True, "do_pan_and_scan": None, "do_rescale": True, "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2,
    "rescale_factor": 0.00392156862745098, "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    "image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor",
    "image_seq_length": MM_TOKENS,
}
TEXT = {k: v for k, v in g3.TEXT.items()} | {"vocab_size": 262208}
VISION = {
    "model_type": "siglip_vision_model", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "image_size": IMAGE_SIZE, "patch_size": PATCH, "layer_norm_eps": 1e-6,
    "vision_use_head": False,
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


def main() -> None:
    out = mf.FIXTURES / NAME
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    text_fixture = mf.FIXTURES / g3.NAME
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (out / f).symlink_to(Path("..") / g3.NAME / f)
    tok = AutoTokenizer.from_pretrained(text_fixture)
    image_token = tok.convert_tokens_to_ids("<image_soft_token>")
    boi, eoi = tok.convert_tokens_to_ids(["<start_of_image>", "<end_of_image>"])

    cfg = Gemma3Config(text_config=TEXT, vision_config=VISION, mm_tokens_per_image=MM_TOKENS,
                       image_token_index=image_token, boi_token_index=boi, eoi_token_index=eoi)
    cfg.architectures = ["Gemma3ForConditionalGeneration"]
    model = Gemma3ForConditionalGeneration(cfg).float()
    llava.SEED = SEED
    llava.init_weights(model)
    with torch.no_grad():  # Gemma RMSNorms scale by 1 + weight: zero-centred weights.
        g = torch.Generator().manual_seed(SEED + 1)
        for name, p in model.named_parameters():
            if "language_model" in name and name.endswith("norm.weight") or "mm_soft_emb_norm" in name:
                p.copy_(mf.bf16_round(0.2 * torch.randn(p.shape, generator=g)))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(mf.bf16_round(g3.EMBED_STD * torch.randn(p.shape, generator=g)))
    model.to(torch.bfloat16).save_pretrained(out)
    mf.write_json(out / "generation_config.json", {"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0})
    mf.write_json(out / "preprocessor_config.json", PREPROCESSOR)
    mf.write_json(out / "processor_config.json", {"image_seq_length": MM_TOKENS, "processor_class": "Gemma3Processor"})
    Image.fromarray(llava.synth_image(120, 90, 1)).save(out / "image_a.png")
    rgba = np.concatenate([llava.synth_image(64, 100, 2), np.full((100, 64, 1), 255, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(out / "image_b_rgba.png")

    ip = Gemma3ImageProcessorPil(**{k: v for k, v in PREPROCESSOR.items()
                                    if k not in ("image_processor_type", "processor_class", "image_seq_length")})
    processor = Gemma3Processor(image_processor=ip, tokenizer=tok, chat_template=tok.chat_template,
                                image_seq_length=MM_TOKENS)
    ref = Gemma3ForConditionalGeneration.from_pretrained(out, dtype=torch.float32,
                                                         attn_implementation="eager").eval()
    for a, b in zip(ref.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a.float(), b.float()), "weights did not load back"

    tensors, cases = {}, {}
    for case, spec in CASES.items():
        rendered = tok.apply_chat_template(spec["messages"], add_generation_prompt=True, tokenize=False)
        images = [Image.open(out / m) for m in spec["media"]]
        inputs = processor(text=[rendered], images=images, return_tensors="pt", add_special_tokens=False)
        input_ids = inputs["input_ids"][0].tolist()
        assert input_ids.count(image_token) == len(images) * MM_TOKENS
        with torch.no_grad():
            logits = ref(**inputs).logits[0].float()
            feats = ref.model.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output
            gen = ref.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                               pad_token_id=0, num_beams=1)
            # The same prompt with causal attention over the image: the
            # bidirectional span must matter for these logits.
            causal = ref(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits[0, -1].float()
        bidi_effect = float((causal - logits[-1]).abs().max())
        assert bidi_effect > 1e-3, f"{case}: bidirectional image attention does not change the logits"
        greedy = gen[0, len(input_ids):].tolist()
        top2 = torch.topk(logits[-1], 2).values
        assert float(top2[0] - top2[1]) > 1e-3, f"{case}: last position too close to a tie"
        tensors[f"{case}.last_logits"] = logits[-1].contiguous()
        for i in range(len(images)):
            tensors[f"{case}.item{i}.pixel_values"] = inputs["pixel_values"][i].float().contiguous()
            tensors[f"{case}.item{i}.embeds"] = feats[i].float().contiguous()
        cases[case] = {"messages": spec["messages"], "media": spec["media"], "rendered": rendered,
                       "input_ids": input_ids, "greedy_ids": greedy,
                       "max_abs_logit_change_causal_image": bidi_effect}
        mf.log(f"{NAME} {case}: {len(input_ids)} tokens, greedy {greedy}, causal-vs-bidi {bidi_effect:.3g}")
    save_file(tensors, str(out / "reference.safetensors"), metadata={"format": "pt"})
    mf.write_json(out / "reference.json", {
        "fixture": NAME, "architecture": "Gemma3ForConditionalGeneration",
        "generated_by": "python scripts/make_gemma3_vision_fixture.py", "versions": mf.versions(),
        "seed": SEED, "weights_dtype": "bfloat16", "compute_dtype": "float32",
        "image_processor": "Gemma3ImageProcessorPil", "image_token_id": image_token, "boi_token_id": boi,
        "eoi_token_id": eoi, "mm_tokens_per_image": MM_TOKENS, "cases": cases,
    })


if __name__ == "__main__":
    main()
