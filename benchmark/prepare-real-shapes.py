#!/usr/bin/env python3
"""Random-weight checkpoints with REAL model shapes, for the `shapes-*` workloads.

    python benchmark/prepare-real-shapes.py MODEL [--out DIR] [--llama-cpp SRC] [--quantize BIN]
    MODEL: qwen2.5-1.5b | qwen2.5-3b | qwen2.5-vl-3b | qwen2.5-vl-7b

Writes under DIR (default $CANDELA_BENCH_MODELS or benchmark/models), only what is missing:
  <name>/                      HF folder: config.json, generation_config.json, tokenizer files,
                               model-0000N-of-0000M.safetensors (BF16) + model.safetensors.index.json
  <name>.f16.gguf              (1.5B only; the others' F16 is a temporary input of llama-quantize)
  <name>.q8_0.gguf             llama.cpp's converter, --outtype q8_0
  <name>.q4_k_m.gguf           llama.cpp's llama-quantize Q4_K_M from the F16 GGUF
  <name>.iq4_xs.gguf           (1.5B only) llama-quantize IQ4_XS from the F16 GGUF
  <name>.{q5_k_m,q6_k,q4_0,q3_k_m,q2_k}.gguf  (1.5B only) llama-quantize's other popular mixes, from the F16 GGUF
  <name>.mmproj-f16.gguf       (VL only) the vision tower + merger, llama.cpp's converter --mmproj
  <name>.json                  what was written, with the seed and the tools' versions
qwen2.5-vl-7b writes the folder only (the 8 GiB check of `--quantization q4_k`: README).

Shapes are the real models' (config.json values of Qwen/Qwen2.5-1.5B-Instruct,
Qwen/Qwen2.5-3B-Instruct, Qwen/Qwen2.5-VL-3B-Instruct, Qwen/Qwen2.5-VL-7B-Instruct:
vision tower 32 blocks x 1280; the 7B's output head is untied).
Tensor names are the hub checkpoints' (`model.layers.*`, `visual.*`). The tokenizer
and chat template are the real Qwen2 ones from fixtures/. Every GGUF is converted
by llama.cpp's own tools from the BF16 safetensors, so all formats hold the same values.

Init, per tensor, from a seeded normal (seed from the tensor's name, so the LM of
qwen2.5-vl-3b holds the same values as qwen2.5-3b): linear std 1.5/sqrt(fan_in),
embeddings std 0.5, norm weights 1 + 0.2 N, biases 0.3 N (as prepare-models.py and
fixtures/): logits are far from uniform, so greedy decoding is not degenerate.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
LLAMA_CPP = Path("/work/vendor/llama_cpp_python-0.3.36/vendor/llama.cpp")
SEED = 20261204
SHARD_BYTES = 2 << 30

QWEN_TEXT = {
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu",
    "initializer_range": 0.02, "max_position_embeddings": 32768, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936, "tie_word_embeddings": True,
}
LM = {
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, max_window_layers=21),
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, max_window_layers=70),
}
LM["qwen2.5-vl-3b"] = LM["qwen2.5-3b"]
LM["qwen2.5-vl-7b"] = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                           num_key_value_heads=4, max_window_layers=28, vocab_size=152064, tie_word_embeddings=False)
VISION = {  # Qwen/Qwen2.5-VL-3B-Instruct's vision_config
    "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
    "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
    "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
}


def config(name: str) -> dict:
    lm = {**QWEN_TEXT, **LM[name]}
    if not name.startswith("qwen2.5-vl"):
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "torch_dtype": "bfloat16", **lm}
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "torch_dtype": "bfloat16",
        **lm, "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "vision_token_id": 151654,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vision_config": {**VISION, "out_hidden_size": lm["hidden_size"]},
    }


def tensor_specs(c: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init kind) in checkpoint order."""
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (v, h), "embed")]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,), "norm"),
            (p + "self_attn.q_proj.weight", (h, h), "linear"), (p + "self_attn.q_proj.bias", (h,), "bias"),
            (p + "self_attn.k_proj.weight", (kv, h), "linear"), (p + "self_attn.k_proj.bias", (kv,), "bias"),
            (p + "self_attn.v_proj.weight", (kv, h), "linear"), (p + "self_attn.v_proj.bias", (kv,), "bias"),
            (p + "self_attn.o_proj.weight", (h, h), "linear"),
            (p + "post_attention_layernorm.weight", (h,), "norm"),
            (p + "mlp.gate_proj.weight", (f, h), "linear"), (p + "mlp.up_proj.weight", (f, h), "linear"),
            (p + "mlp.down_proj.weight", (h, f), "linear"),
        ]
    out.append(("model.norm.weight", (h,), "norm"))
    if not c["tie_word_embeddings"]:
        out.append(("lm_head.weight", (v, h), "linear"))
    vc = c.get("vision_config")
    if vc:
        d, vf, m = vc["hidden_size"], vc["intermediate_size"], vc["spatial_merge_size"] ** 2 * vc["hidden_size"]
        ps, tp = vc["patch_size"], vc["temporal_patch_size"]
        out.append(("visual.patch_embed.proj.weight", (d, 3, tp, ps, ps), "linear"))
        for i in range(vc["depth"]):
            p = f"visual.blocks.{i}."
            out += [
                (p + "norm1.weight", (d,), "norm"), (p + "norm2.weight", (d,), "norm"),
                (p + "attn.qkv.weight", (3 * d, d), "linear"), (p + "attn.qkv.bias", (3 * d,), "bias"),
                (p + "attn.proj.weight", (d, d), "linear"), (p + "attn.proj.bias", (d,), "bias"),
                (p + "mlp.gate_proj.weight", (vf, d), "linear"), (p + "mlp.gate_proj.bias", (vf,), "bias"),
                (p + "mlp.up_proj.weight", (vf, d), "linear"), (p + "mlp.up_proj.bias", (vf,), "bias"),
                (p + "mlp.down_proj.weight", (d, vf), "linear"), (p + "mlp.down_proj.bias", (d,), "bias"),
            ]
        out += [
            ("visual.merger.ln_q.weight", (d,), "norm"),
            ("visual.merger.mlp.0.weight", (m, m), "linear"), ("visual.merger.mlp.0.bias", (m,), "bias"),
            ("visual.merger.mlp.2.weight", (vc["out_hidden_size"], m), "linear"),
            ("visual.merger.mlp.2.bias", (vc["out_hidden_size"],), "bias"),
        ]
    return out


def make_tensor(name: str, shape: tuple[int, ...], kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED * 2**32 + zlib.crc32(name.encode()))
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    if kind == "embed":
        x *= 0.5
    elif kind == "linear":
        fan_in = 1
        for s in shape[1:]:
            fan_in *= s
        x *= 1.5 / fan_in**0.5
    elif kind == "norm":
        x = 1.0 + 0.2 * x
    elif kind == "bias":
        x *= 0.3
    return x.to(torch.bfloat16)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def write_folder(name: str, out: Path) -> None:
    """The BF16 safetensors folder, written shard by shard (never the whole model in memory)."""
    c = config(name)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    vl = "vision_config" in c
    fx = ROOT / "fixtures" / ("qwen2_5-vl-tiny" if vl else "qwen2-tiny")
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] + (["chat_template.json"] if vl else []):
        shutil.copy(fx / f, tmp / f)
    if vl:  # the real checkpoint's processor settings
        pp = json.loads((fx / "preprocessor_config.json").read_text())
        pp.update(min_pixels=3136, max_pixels=12845056)
        (tmp / "preprocessor_config.json").write_text(json.dumps(pp, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(c, indent=2) + "\n")
    specs = tensor_specs(c)
    shards: list[list[tuple[str, tuple[int, ...], str]]] = [[]]
    size = 0
    for s in specs:
        n = 2
        for d in s[1]:
            n *= d
        if size + n > SHARD_BYTES and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += n
    weight_map, total = {}, 0
    for i, group in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: make_tensor(n, shape, kind) for n, shape, kind in group}
        total += sum(t.numel() * 2 for t in tensors.values())
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in tensors})
        print(f"prepare-real-shapes: {name} {fname} ({len(tensors)} tensors)", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def run(cmd: list[str]) -> None:
    print("prepare-real-shapes: $ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=sorted(LM))
    ap.add_argument("--out", default=os.environ.get("CANDELA_BENCH_MODELS", str(ROOT / "benchmark" / "models")))
    ap.add_argument("--llama-cpp", default=str(LLAMA_CPP), help="llama.cpp sources (convert_hf_to_gguf.py)")
    ap.add_argument("--quantize", default="/work/build-bench/bin/llama-quantize", help="llama.cpp's llama-quantize binary")
    ap.add_argument("--keep-f16", action="store_true", help="keep the F16 GGUF (kept anyway for qwen2.5-1.5b)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.model
    folder = out / name
    if not (folder / "model.safetensors.index.json").exists():
        write_folder(name, folder)
    if name == "qwen2.5-vl-7b":
        return
    convert = [sys.executable, str(Path(args.llama_cpp) / "convert_hf_to_gguf.py"), str(folder)]
    f16 = out / f"{name}.f16.gguf"
    q8 = out / f"{name}.q8_0.gguf"
    q4 = out / f"{name}.q4_k_m.gguf"
    can_quantize = Path(args.quantize).is_file()
    if not can_quantize:
        print(f"prepare-real-shapes: no {args.quantize}: Q4_K_M left out (build llama.cpp's llama-quantize, run again)")
    keep_f16 = args.keep_f16 or name == "qwen2.5-1.5b" or not can_quantize
    if not q8.exists():
        run(convert + ["--outtype", "q8_0", "--outfile", str(q8)])
    if not q4.exists() or (keep_f16 and not f16.exists()):
        if not f16.exists():
            run(convert + ["--outtype", "f16", "--outfile", str(f16)])
        if not q4.exists() and can_quantize:
            run([args.quantize, str(f16), str(q4), "Q4_K_M"])
        if not keep_f16:
            f16.unlink()
    # The other popular mixes, from the F16 file where it is kept: IQ4_XS
    # (IQ4_NL where a row is not whole 256-value blocks), Q5_K_M and Q6_K
    # (more bits), Q4_0 (the legacy format of QAT releases), Q3_K_M and Q2_K
    # (to fit a larger model).
    low = {q: out / f"{name}.{q}.gguf" for q in ("iq4_xs", "q5_k_m", "q6_k", "q4_0", "q3_k_m", "q2_k")}
    for q, path in low.items():
        if not path.exists() and f16.exists() and can_quantize:
            run([args.quantize, str(f16), str(path), q.upper()])
    files = {"safetensors": folder.name + "/", "q8_0": q8.name, **({"q4_k_m": q4.name} if q4.exists() else {}),
             **{q: p.name for q, p in low.items() if p.exists()}}
    if keep_f16:
        files["f16"] = f16.name
    if name == "qwen2.5-vl-3b":
        mm = out / f"{name}.mmproj-f16.gguf"
        if not mm.exists():
            run(convert + ["--mmproj", "--outtype", "f16", "--outfile", str(mm)])
        files["mmproj_f16"] = mm.name
    c = config(name)
    info = {
        "name": name, "seed": SEED, "config": c,
        "parameters": sum(int(torch.Size(s).numel()) for _, s, _ in tensor_specs(c)),
        "init": "normal; linear std 1.5/sqrt(fan_in), embeddings std 0.5, norms 1+0.2N, biases 0.3N; stored BF16",
        "converter": f"{args.llama_cpp}/convert_hf_to_gguf.py (llama-cpp-python 0.3.36 sdist), quantizer {args.quantize}",
        "files": {k: {"path": v, "bytes": sum(p.stat().st_size for p in ([out / v] if not v.endswith("/") else (out / v).iterdir()))}
                  for k, v in files.items()},
    }
    (out / f"{name}.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"prepare-real-shapes: done ({out / (name + '.json')})")


if __name__ == "__main__":
    sys.exit(main())
