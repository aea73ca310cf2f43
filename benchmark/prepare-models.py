#!/usr/bin/env python3
"""Write the benchmark's random-weight model with Qwen2-0.5B shapes, three ways.

    benchmark/.venv/bin/python benchmark/prepare-models.py [--out benchmark/models] [--force]

Writes (only what is missing, unless --force):
  models/qwen2-0.5b-random/            HF folder: config.json, generation_config.json,
                                       model.safetensors (F32), tokenizer.json, tokenizer_config.json
  models/qwen2-0.5b-random.f16.gguf    GGUF v3, arch qwen2, 2-D weights F16, norms/biases F32
  models/qwen2-0.5b-random.q8_0.gguf   same, 2-D weights Q8_0 (gguf-py's reference quantizer)
  models/qwen2-0.5b-random.json        what was written: shapes, seed, sha256 of every file

Shapes are Qwen2-0.5B's (hidden 896, 24 layers, 14 heads / 2 KV heads, head_dim 64,
FFN 4864, vocab 151936, q/k/v bias, tied embeddings, rope_theta 1e6, eps 1e-6). The
tokenizer and chat template are the real Qwen2 ones from fixtures/qwen2-tiny.

Every weight is drawn from a seeded normal (per-tensor seed, so the order of work
does not matter) and ROUNDED TO F16, so the F16 GGUF and the F32 safetensors hold
exactly the same values (F32 = upcast of the F16 value). Q8_0 is quantized from
those values. Init as fixtures/ (linear std 1.5/sqrt(fan_in), embeddings std 0.5,
norm weights 1 + 0.2 N, biases 0.3 N): the logits are far from uniform, so greedy
tokens can be compared across engines.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_SRC = ROOT / "fixtures" / "qwen2-tiny"
NAME = "qwen2-0.5b-random"
SEED = 20240805

CFG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 896,
    "initializer_range": 0.02,
    "intermediate_size": 4864,
    "max_position_embeddings": 32768,
    "max_window_layers": 24,
    "num_attention_heads": 14,
    "num_hidden_layers": 24,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
GEN_CFG = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "pad_token_id": 151643}


def tensor_specs(c: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(HF name, shape, kind) in HF order; kind picks the init."""
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (v, h), "embed")]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,), "norm"),
            (p + "self_attn.q_proj.weight", (h, h), "linear"),
            (p + "self_attn.q_proj.bias", (h,), "bias"),
            (p + "self_attn.k_proj.weight", (kv, h), "linear"),
            (p + "self_attn.k_proj.bias", (kv,), "bias"),
            (p + "self_attn.v_proj.weight", (kv, h), "linear"),
            (p + "self_attn.v_proj.bias", (kv,), "bias"),
            (p + "self_attn.o_proj.weight", (h, h), "linear"),
            (p + "post_attention_layernorm.weight", (h,), "norm"),
            (p + "mlp.gate_proj.weight", (f, h), "linear"),
            (p + "mlp.up_proj.weight", (f, h), "linear"),
            (p + "mlp.down_proj.weight", (h, f), "linear"),
        ]
    out.append(("model.norm.weight", (h,), "norm"))
    return out


def make_tensor(name: str, shape: tuple[int, ...], kind: str) -> np.ndarray:
    rng = np.random.default_rng([SEED, zlib.crc32(name.encode())])
    x = rng.standard_normal(shape, dtype=np.float32)
    if kind == "embed":
        x *= 0.5
    elif kind == "linear":
        x *= 1.5 / np.sqrt(shape[1])
    elif kind == "norm":
        x = 1.0 + 0.2 * x
    elif kind == "bias":
        x *= 0.3
    return x.astype(np.float16).astype(np.float32)  # the values every file holds


GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf: str) -> str:
    """HF tensor name -> llama.cpp's (convert_hf_to_gguf.py Qwen2Model: no Q/K permutation)."""
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    parts = hf.split(".")  # model.layers.{i}.{mod}.{proj}.{weight|bias} or model.layers.{i}.{norm}.weight
    i, rest = parts[2], parts[3:]
    key = ".".join(rest[:-1])
    return f"blk.{i}.{GGUF_NAMES[key]}.{rest[-1]}"


def tokenizer_meta() -> dict:
    """What llama.cpp needs for a qwen2 BPE vocab, as convert_hf_to_gguf.py writes it."""
    tok = json.loads((TOKENIZER_SRC / "tokenizer.json").read_text())
    tcfg = json.loads((TOKENIZER_SRC / "tokenizer_config.json").read_text())
    vocab: dict[str, int] = dict(tok["model"]["vocab"])
    added = {a["id"]: a for a in tok["added_tokens"]}
    for i, a in added.items():
        vocab[a["content"]] = i
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(CFG["vocab_size"]):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(5)  # UNUSED
        elif i in added:
            tokens.append(by_id[i])
            t = added[i]["content"]
            looks_special = t.startswith("<|") and t.endswith("|>")  # convert_hf_to_gguf.py's does_token_look_special
            types.append(3 if added[i]["special"] or looks_special else 4)  # CONTROL / USER_DEFINED
        else:
            tokens.append(by_id[i])
            types.append(1)  # NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    return {"tokens": tokens, "types": types, "merges": merges, "chat_template": tcfg["chat_template"]}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def write_hf(out: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(CFG, indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps(GEN_CFG, indent=2) + "\n")
    shutil.copy(TOKENIZER_SRC / "tokenizer.json", tmp / "tokenizer.json")
    shutil.copy(TOKENIZER_SRC / "tokenizer_config.json", tmp / "tokenizer_config.json")
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def write_gguf(out: Path, tensors: dict[str, np.ndarray], kind: str, tok: dict) -> None:
    import gguf
    from gguf.quants import quantize

    c = CFG
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), "qwen2")
    w.add_name(f"candela benchmark {NAME} ({kind})")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if kind == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_rope_freq_base(float(c["rope_theta"]))
    w.add_layer_norm_rms_eps(float(c["rms_norm_eps"]))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    w.add_bos_token_id(c["bos_token_id"])
    w.add_eos_token_id(c["eos_token_id"])
    w.add_pad_token_id(151643)
    w.add_add_bos_token(False)
    w.add_chat_template(tok["chat_template"])
    for hf, t in tensors.items():
        name = gguf_name(hf)
        if t.ndim == 1:
            w.add_tensor(name, t)  # norms, biases: F32, as convert_hf_to_gguf.py
        elif kind == "f16":
            w.add_tensor(name, t.astype(np.float16))
        else:
            q = quantize(t, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmark" / "models"))
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hf_dir = out / NAME
    files = {"safetensors": hf_dir, "gguf_f16": out / f"{NAME}.f16.gguf", "gguf_q8_0": out / f"{NAME}.q8_0.gguf"}
    manifest = out / f"{NAME}.json"
    missing = [k for k, p in files.items() if args.force or not (p / "model.safetensors" if k == "safetensors" else p).exists()]
    if not missing and manifest.exists():
        print(f"prepare-models: {NAME} already in {out}")
        return
    specs = tensor_specs(CFG)
    print(f"prepare-models: drawing {sum(int(np.prod(s)) for _, s, _ in specs) / 1e6:.1f} M parameters (seed {SEED})", flush=True)
    tensors = {n: make_tensor(n, s, k) for n, s, k in specs}
    tok = tokenizer_meta()
    if "safetensors" in missing:
        print(f"prepare-models: writing {hf_dir}/ (safetensors F32)", flush=True)
        write_hf(hf_dir, tensors)
    if "gguf_f16" in missing:
        print(f"prepare-models: writing {files['gguf_f16']}", flush=True)
        write_gguf(files["gguf_f16"], tensors, "f16", tok)
    if "gguf_q8_0" in missing:
        print(f"prepare-models: writing {files['gguf_q8_0']}", flush=True)
        write_gguf(files["gguf_q8_0"], tensors, "q8_0", tok)
    info = {
        "name": NAME,
        "seed": SEED,
        "config": CFG,
        "parameters": sum(int(np.prod(s)) for _, s, _ in specs),
        "init": "normal; linear std 1.5/sqrt(fan_in), embeddings std 0.5, norms 1+0.2N, biases 0.3N; rounded to f16",
        "tokenizer": "fixtures/qwen2-tiny (real Qwen2 BPE vocab, Qwen2.5 chat template)",
        "files": {
            "safetensors": {"path": str((hf_dir / "model.safetensors").relative_to(out)), "dtype": "F32 (f16-rounded values)",
                            "sha256": sha256(hf_dir / "model.safetensors")},
            "gguf_f16": {"path": files["gguf_f16"].name, "dtype": "F16 (1-D tensors F32)", "sha256": sha256(files["gguf_f16"])},
            "gguf_q8_0": {"path": files["gguf_q8_0"].name, "dtype": "Q8_0 (1-D tensors F32)", "sha256": sha256(files["gguf_q8_0"])},
        },
    }
    manifest.write_text(json.dumps(info, indent=2) + "\n")
    print(f"prepare-models: done ({manifest})")


if __name__ == "__main__":
    sys.exit(main())
