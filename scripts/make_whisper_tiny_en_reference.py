#!/usr/bin/env python3
"""Write fixtures/whisper-tiny-en-reference.json: what transformers (float32)
computes for the REAL tiny.en on fixtures/audio/speech_16k.wav, for
crates/candela-models/tests/whisper_tiny_en.rs.

    /tmp/fxvenv/bin/python scripts/make_whisper_tiny_en_reference.py \
        "$(python3 scripts/fetch_whisper_tiny_en.py)"

(same venv as scripts/make_fixtures.py; see scripts/requirements-fixtures.txt).

It records the greedy tokens of `generate`, then the decoder's logits with
those tokens forced (prompt + tokens + <|endoftext|>): for every predicted
position, the ids of the TOP logits and their values. The weights are too
large to commit and the full logits too (51864 per position); the top ids
are where a wrong computation shows, and where greedy decoding chooses.

Some greedy choices are near-ties: after " round" the chosen "-" leads
" facts" by 0.018, so arithmetic that rounds differently (bf16 prompt rows on
AMX) may pick the other, and the test compares logits with a tolerance
rather than demanding the same tokens there.
"""

import json
import re
import sys
import wave
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

TOP = 8
ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    model_dir = sys.argv[1]
    with wave.open(str(ROOT / "fixtures/audio/speech_16k.wav")) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    samples = pcm.astype(np.float32) / 32768.0
    features = WhisperFeatureExtractor.from_pretrained(model_dir)(
        samples, sampling_rate=16000, return_tensors="pt"
    ).input_features
    model = WhisperForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    gen = model.generation_config
    prompt = [gen.decoder_start_token_id, gen.no_timestamps_token_id]
    with torch.no_grad():
        out = model.generate(features, max_new_tokens=64)[0].tolist()
        # transformers 5 returns the generated tokens only; 4.x the prompt too.
        if out[: len(prompt)] == prompt:
            out = out[len(prompt):]
        tokens = [t for t in out if t != gen.eos_token_id]
        forced = prompt + tokens + [gen.eos_token_id]
        logits = model(
            input_features=features, decoder_input_ids=torch.tensor([forced])
        ).logits[0]
    steps = []
    for pos in range(len(prompt) - 1, len(forced) - 1):
        top = torch.topk(logits[pos], TOP)
        steps.append({
            "next": forced[pos + 1],
            "ids": top.indices.tolist(),
            "logits": [round(v, 5) for v in top.values.tolist()],
        })
    ref = {
        "transformers": transformers.__version__,
        "audio": "fixtures/audio/speech_16k.wav",
        "prompt": prompt,
        "tokens": tokens,
        "forced": forced,
        "steps": steps,
    }
    path = ROOT / "fixtures/whisper-tiny-en-reference.json"
    text = json.dumps(ref, indent=1)
    # Lists of numbers on one line each.
    text = re.sub(r"\[[-0-9.,\s]+\]", lambda m: json.dumps(json.loads(m.group(0))), text)
    path.write_text(text + "\n")
    print(f"wrote {path}: {len(tokens)} tokens")


if __name__ == "__main__":
    main()
