"""Reference decodes of K-quant and IQ4 blocks by llama.cpp's gguf-py (fixtures/kquants).

Random bytes are valid K-quant and IQ4 blocks once their f16 scales are finite, so the
blocks are seeded random bytes with small random f16 scales. gguf-py's
`gguf.quants.dequantize` (llama.cpp's Python reference decoder, independent of
candle's) writes the values they stand for. The Rust test
(`quant::int_dot::tests::k_quant_blocks_decode_as_llama_cpp`) decodes the same
bytes and dots them with the integer kernels; `gguf_types::tests` transcodes the
IQ4 ones to Q8_0. The IQ4 types come last, so the K-quants' bytes are those
of the first version of this script.

    /tmp/fxvenv/bin/python scripts/make_kquant_reference.py
"""

import json
from importlib.metadata import version
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants
from safetensors.numpy import save_file

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "kquants"
ROWS, COLS = 3, 768  # three super-blocks per row
# Byte offsets of each block's f16 scales (d, then dmin where there is one).
TYPES = {
    "q2_k": (T.Q2_K, 84, [80, 82]),
    "q3_k": (T.Q3_K, 110, [108]),
    "q4_k": (T.Q4_K, 144, [0, 2]),
    "q5_k": (T.Q5_K, 176, [0, 2]),
    "q6_k": (T.Q6_K, 210, [208]),
    "iq4_nl": (T.IQ4_NL, 18, [0]),
    "iq4_xs": (T.IQ4_XS, 136, [0]),
}


def main() -> None:
    rng = np.random.default_rng(20)
    tensors = {}
    for name, (qtype, size, scale_offsets) in TYPES.items():
        per_row = COLS // quants.GGML_QUANT_SIZES[qtype][0]
        blocks = rng.integers(0, 256, size=(ROWS * per_row, size), dtype=np.uint8)
        for off in scale_offsets:
            scale = rng.uniform(1e-3, 2e-2, size=blocks.shape[0]).astype(np.float16)
            blocks[:, off : off + 2] = scale.view(np.uint8).reshape(-1, 2)
        raw = blocks.reshape(ROWS, -1)
        values = quants.dequantize(raw, qtype).astype(np.float32)
        assert values.shape == (ROWS, COLS) and np.isfinite(values).all()
        tensors[f"{name}.blocks"] = np.ascontiguousarray(raw)
        tensors[f"{name}.values"] = values
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT / "reference.safetensors"))
    meta = {
        "generated_by": "scripts/make_kquant_reference.py",
        "gguf": version("gguf"),
        "numpy": np.__version__,
        "seed": 20,
        "rows": ROWS,
        "cols": COLS,
        "types": list(TYPES),
    }
    (OUT / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
