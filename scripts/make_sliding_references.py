#!/usr/bin/env python3
"""References for the KV manager's sliding-window block freeing: fixtures'
weights with every layer a sliding-window layer, greedy ids from
transformers far past the window.

    /tmp/fxvenv/bin/python scripts/make_sliding_references.py

  * gemma3-tiny (scripts/make_gemma3_fixture.py) with layer_types all
    "sliding_attention" (window 6, as the fixture's sliding layers);
  * qwen2-tiny (scripts/make_fixtures.py) with use_sliding_window, window 5,
    max_window_layers 0 (every layer slides, as Mistral-style models).

Writes <fixture>/reference_all_sliding.json: for each prompt of the
fixture's reference.json (and Gemma's chat), up to MAX_TOKENS greedy ids (EOS
not stopping; cut before a near-tie, at least MIN_TOKENS). With every layer
sliding, candela frees the KV blocks behind the window, so its engine runs
these in a pool smaller than one context (crates/candela-models/tests:
gemma3.rs, parity.rs).
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

from transformers import AutoModelForCausalLM  # noqa: E402

MAX_TOKENS = 40
MIN_TOKENS = 16
MIN_MARGIN = 1e-3


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
def write_reference(name: str, runs: list[list[int]], full_greedy: list[int], **overrides) -> None:
    d = mf.FIXTURES / name
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager",
                                                 **overrides).eval()
    layers = model.config.layer_types
    assert all(t == "sliding_attention" for t in layers), layers
    window = model.config.sliding_window
    assert window == overrides.get("sliding_window", window), window
    out = []
    for ids in runs:
        got, margin = confident_greedy(model, ids)
        assert len(got) >= MIN_TOKENS, f"a near-tie after {len(got)} tokens"
        assert len(ids) + len(got) > 3 * window, "the window must slide well past the prompt"
        gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=len(got), eos_token_id=None, pad_token_id=0,
                             num_beams=1)[0, len(ids):].tolist()
        assert gen == got, f"generate() {gen} != argmax loop {got}"
        out.append({"input_ids": ids, "greedy_ids": got, "greedy_min_top2_margin": margin})
        mf.log(f"{name} all sliding: {len(ids)} tokens + {len(got)}, margin {margin:.3g}, greedy {got}")
    # The fixture's own configuration gives other ids: the window matters.
    assert out[0]["greedy_ids"][:len(full_greedy)] != full_greedy, "sliding gives the fixture's ids"
    mf.write_json(d / "reference_all_sliding.json", {
        "fixture": name, "generated_by": "python scripts/make_sliding_references.py",
        "versions": mf.versions(), "overrides": overrides, "layer_types": layers, "sliding_window": window,
        "runs": out,
    })


def main() -> None:
    ref = json.loads((mf.FIXTURES / "gemma3-tiny" / "reference.json").read_text())
    runs = [p["input_ids"] for p in ref["prompts"]] + [ref["chat"]["input_ids"]]
    write_reference("gemma3-tiny", runs, ref["prompts"][0]["greedy_ids"], layer_types=["sliding_attention"] * 3)
    ref = json.loads((mf.FIXTURES / "qwen2-tiny" / "reference.json").read_text())
    runs = [p["input_ids"] for p in ref["prompts"]]
    write_reference("qwen2-tiny", runs, ref["prompts"][0]["greedy_ids"], use_sliding_window=True,
                    sliding_window=5, max_window_layers=0, layer_types=["sliding_attention"] * 2)


if __name__ == "__main__":
    main()
