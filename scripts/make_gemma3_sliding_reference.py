#!/usr/bin/env python3
"""Reference for the KV manager's sliding-window block freeing: the
gemma3-tiny fixture's weights with every layer a sliding-window layer
(window 6), greedy ids from transformers far past the window.

    /tmp/fxvenv/bin/python scripts/make_gemma3_sliding_reference.py

Reads fixtures/gemma3-tiny (scripts/make_gemma3_fixture.py) and writes
fixtures/gemma3-tiny/reference_all_sliding.json: for each prompt of
reference.json and the chat, up to MAX_TOKENS greedy ids (EOS not stopping;
cut before a near-tie, at least MIN_TOKENS) of the
same weights loaded with layer_types all "sliding_attention". With every
layer sliding, candela frees the KV blocks behind the window, so its engine
can run these in a pool smaller than one context
(crates/candela-models/tests/gemma3.rs).
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

from transformers import Gemma3ForCausalLM  # noqa: E402

MAX_TOKENS = 40
MIN_TOKENS = 16
MIN_MARGIN = 1e-3
DIR = mf.FIXTURES / "gemma3-tiny"


@torch.no_grad()
def confident_greedy(model, ids: list[int]) -> tuple[list[int], float]:
    """Argmax loop (full recompute) of up to MAX_TOKENS ids, stopping before
    the first step whose top-2 logits are within MIN_MARGIN (a near-tie that
    float rounding could flip)."""
    seq, margin = list(ids), float("inf")
    for _ in range(MAX_TOKENS):
        logits = model(torch.tensor([seq])).logits[0, -1]
        top2 = torch.topk(logits, 2).values
        gap = float(top2[0] - top2[1])
        if gap < MIN_MARGIN:
            break
        margin = min(margin, gap)
        seq.append(int(torch.argmax(logits)))
    return seq[len(ids):], margin


@torch.no_grad()
def main() -> None:
    ref = json.loads((DIR / "reference.json").read_text())
    cfg = json.loads((DIR / "config.json").read_text())
    layers = ["sliding_attention"] * cfg["num_hidden_layers"]
    model = Gemma3ForCausalLM.from_pretrained(DIR, dtype=torch.float32, attn_implementation="eager",
                                              layer_types=layers).eval()
    assert model.config.layer_types == layers, model.config.layer_types
    window = model.config.sliding_window
    runs = [p["input_ids"] for p in ref["prompts"]] + [ref["chat"]["input_ids"]]
    out = []
    for ids in runs:
        got, margin = confident_greedy(model, ids)
        assert len(got) >= MIN_TOKENS, f"a near-tie after {len(got)} tokens"
        gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=len(got), eos_token_id=None, pad_token_id=0,
                             num_beams=1)[0, len(ids):].tolist()
        assert gen == got, f"generate() {gen} != argmax loop {got}"
        out.append({"input_ids": ids, "greedy_ids": got, "greedy_min_top2_margin": margin})
        mf.log(f"all-sliding: {len(ids)} tokens + {len(got)}, margin {margin:.3g}, greedy {got}")
    # The original (mixed) model differs: its global layer matters.
    mixed = ref["prompts"][0]["greedy_ids"]
    assert out[0]["greedy_ids"][:len(mixed)] != mixed, "all-sliding gives the mixed model's ids"
    mf.write_json(DIR / "reference_all_sliding.json", {
        "fixture": "gemma3-tiny", "generated_by": "python scripts/make_gemma3_sliding_reference.py",
        "versions": mf.versions(), "layer_types": layers, "sliding_window": window,
        "runs": out,
    })


if __name__ == "__main__":
    main()
