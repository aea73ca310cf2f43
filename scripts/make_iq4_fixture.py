"""fixtures/llama-iq4: a llama GGUF of IQ4_XS and IQ4_NL matrices, and transformers' outputs on it.

llama-tiny's architecture and tokenizer (SmolLM2's, from fixtures/llama-tiny.gguf) at
widths whose rows are whole IQ4_XS super-blocks: hidden 256, 4 heads of 64 with 2 KV
heads, ffn 512, 2 layers, the embedding tied to the LM head. Seeded random weights (the
scales of make_fixtures.init_weights) are quantized by the plain nearest-value IQ4
quantizer below (its quality is not the point; what the bytes mean is llama.cpp's).
Every matrix is IQ4_XS except attn_v and the token embedding (also the LM head), which
are IQ4_NL, as llama.cpp's IQ4_XS files mix them.

The reference is transformers reading the GGUF itself
(AutoModelForCausalLM.from_pretrained(gguf_file=...), which dequantizes with gguf-py,
llama.cpp's Python reference): the last-position logits of llama-tiny's two prompts, 8
greedy ids each and every greedy step's top 8 logits, so candela's IQ4 reader is checked
against a decoder that is not its own (crates/candela-models/tests/parity.rs, `iq4_gguf_matches_transformers`).

    /work/venv/bin/python scripts/make_iq4_fixture.py
(same venv as scripts/make_fixtures.py; see scripts/requirements-fixtures.txt).
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

import gguf  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

SEED = 23
OUT = mf.FIXTURES / "llama-iq4"
KVALUES = np.array(gguf.quants.IQ4_NL.kvalues, dtype=np.float32)


def nearest(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Indices of the table values nearest x / scale (x [..., 32], scale [..., 1])."""
    safe = np.where(scale == 0, 1, scale)
    return np.abs(x[..., None] / safe[..., None] - KVALUES).argmin(-1).astype(np.uint8)


def pack(idx: np.ndarray) -> np.ndarray:
    """Index pairs as llama.cpp packs them: value j in the low nibble of byte j, j + 16 in its high."""
    return idx[..., :16] | (idx[..., 16:] << 4)


def iq4_nl(w: np.ndarray) -> np.ndarray:
    """[rows, k] -> [rows, k / 32 * 18] bytes: f16 d (the largest |x| lands on -127), 16 index bytes."""
    b = w.reshape(-1, 32)
    big = np.take_along_axis(b, np.abs(b).argmax(-1)[:, None], -1)
    d = (big / KVALUES[0]).astype(np.float16)
    qs = pack(nearest(b, d.astype(np.float32)))
    return np.concatenate([d.view(np.uint8), qs], -1).reshape(w.shape[0], -1)


def iq4_xs(w: np.ndarray) -> np.ndarray:
    """[rows, k] -> [rows, k / 256 * 136] bytes: f16 d, 6-bit sub-scales ls (d * (ls - 32)
    per 32 values; low 4 bits in scales_l, high 2 in scales_h), 128 index bytes."""
    sb = w.reshape(-1, 8, 32)
    big = np.take_along_axis(sb, np.abs(sb).argmax(-1)[..., None], -1)[..., 0]
    want = big / KVALUES[0]  # the scale each 32 would like
    d = (np.abs(want).max(-1) / 31).astype(np.float16)
    d32 = d.astype(np.float32)[:, None]
    ls = np.clip(np.round(want / np.where(d32 == 0, 1, d32)), -32, 31).astype(np.int32) + 32
    dl = (d32 * (ls - 32))[..., None]
    qs = pack(nearest(sb, dl)).reshape(-1, 128)
    scales_h = np.zeros(len(ls), dtype=np.uint16)
    for i in range(8):
        scales_h |= ((ls[:, i] >> 4) & 3).astype(np.uint16) << (2 * i)
    low = (ls & 15).astype(np.uint8)
    scales_l = low[:, 0::2] | (low[:, 1::2] << 4)
    out = np.concatenate([d.view(np.uint8).reshape(-1, 2),
                          scales_h.view(np.uint8).reshape(-1, 2), scales_l, qs], -1)
    return out.reshape(w.shape[0], -1)


def encode(name: str, t: np.ndarray):
    if t.ndim != 2:
        return t, None
    qtype, quant = (T.IQ4_NL, iq4_nl) if name == "token_embd.weight" or ".attn_v." in name else (T.IQ4_XS, iq4_xs)
    raw = quant(t)
    # What the bytes stand for, by llama.cpp's decoder: close to the source values.
    back = gguf.quants.dequantize(raw, qtype)
    rel = np.sqrt(((back - t) ** 2).mean() / (t ** 2).mean())
    assert back.shape == t.shape and rel < 0.15, (name, rel)
    return raw, qtype


def main() -> None:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    spec = mf.FIXTURE_SPECS["llama-tiny"]
    cfg = dict(spec["config"], hidden_size=256, intermediate_size=512, head_dim=64)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    mf.init_weights(model, SEED, embed_std=spec["embed_std"], head_std=None)

    reader = gguf.GGUFReader(str(mf.FIXTURES / "llama-tiny.gguf"))
    src_meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "model.gguf"
    mf.write_llama_gguf(model, path, src_meta, encode=encode, file_type=gguf.LlamaFileType.MOSTLY_IQ4_XS,
                        name="candela llama-iq4")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}

    ref = AutoModelForCausalLM.from_pretrained(str(OUT), gguf_file=path.name, dtype=torch.float32).eval()
    prompts = json.loads((mf.FIXTURES / "llama-tiny" / "reference.json").read_text())["prompts"]
    tensors, out = {}, []
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ids = p["input_ids"]
            tensors[f"prompt{i}.last_logits"] = ref(torch.tensor([ids])).logits[0, -1].contiguous()
            greedy, margin = mf.manual_greedy(ref, ids, 8)
            # Each greedy step's top 8 (the step that chose greedy[j] is row j).
            steps = ref(torch.tensor([ids + greedy[:-1]])).logits[0, len(ids) - 1:]
            top = torch.topk(steps, 8, dim=-1)
            out.append({"text": p["text"], "input_ids": ids, "greedy_ids": greedy, "min_top2_margin": margin,
                        "steps_top_ids": top.indices.tolist(), "steps_top_logits": top.values.tolist()})
            mf.log(f"prompt {i}: greedy {greedy}, smallest top-2 margin {margin:.3g}")
    save_file(tensors, str(OUT / "reference.safetensors"))
    mf.write_json(OUT / "reference.json", {
        "fixture": "llama-iq4",
        "generated_by": "python scripts/make_iq4_fixture.py",
        "versions": mf.versions(),
        "seed": SEED,
        "config": {k: cfg[k] for k in ("hidden_size", "intermediate_size", "head_dim", "num_attention_heads",
                                        "num_key_value_heads", "num_hidden_layers", "vocab_size")},
        "tensor_types": types,
        "reference": "transformers AutoModelForCausalLM.from_pretrained(gguf_file=model.gguf), float32 "
                     "(dequantized by gguf-py)",
        "logits": {"file": "reference.safetensors", "what": "promptN.last_logits: logits at the last "
                   "position of prompts[N].input_ids"},
        "steps": "prompts[N].steps_top_ids / steps_top_logits[j]: the top 8 of the step that chose "
                 "greedy_ids[j] (input_ids + greedy_ids[:j])",
        "prompts": out,
    })


if __name__ == "__main__":
    main()
