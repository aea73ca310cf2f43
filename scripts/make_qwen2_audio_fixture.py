#!/usr/bin/env python3
"""Build fixtures/qwen2-audio-tiny: a tiny random Qwen2AudioForConditionalGeneration
(real architecture, real Qwen tokenizer plus Qwen2-Audio's three audio tokens,
Qwen2-Audio's chat template) and reference outputs from transformers.

    /tmp/fxvenv/bin/python scripts/make_qwen2_audio_fixture.py

(same venv as scripts/make_fixtures.py; see scripts/requirements-fixtures.txt).

The audio is synthesized here (deterministic tones, glides and noise, 16 kHz
16-bit WAV) so the fixture needs no external tool; real speech end-to-end runs
live in the media fixtures.
"""

import json
import shutil
import sys
import wave
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

import tokenizers  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import (AutoTokenizer, Qwen2AudioConfig, Qwen2AudioForConditionalGeneration,  # noqa: E402
                          Qwen2AudioProcessor, WhisperFeatureExtractor)

OUT = mf.FIXTURES / "qwen2-audio-tiny"
SEED = 21
NEW_TOKENS = 8
AUDIO_TOKENS = ["<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]

# Qwen2-Audio (like the real checkpoints) does not tie lm_head to the embeddings,
# so the fixture carries both tables (~10 MB in bf16).

# Qwen2-Audio-Instruct's chat template: each audio part becomes
# "Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>\n", counted across the conversation.
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

MESSAGES = [
    {"role": "user", "content": [{"type": "audio", "audio_url": "clip1.wav"},
                                 {"type": "text", "text": "What is this sound?"}]},
    {"role": "assistant", "content": "A chirp."},
    {"role": "user", "content": [{"type": "audio", "audio_url": "clip2.wav"},
                                 {"type": "text", "text": "And this one?"}]},
]


def synth(seconds: float, seed: int, f0: float) -> np.ndarray:
    """Int16 samples at 16 kHz: a glide, a harmonic tone burst and noise."""
    sr = 16000
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    glide = np.sin(2 * np.pi * (f0 * t + 300 * t * t))
    burst = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in (1, 2, 3)) * (np.sin(np.pi * t / seconds) ** 2)
    x = 0.3 * glide + 0.3 * burst + 0.05 * rng.standard_normal(t.shape)
    return np.clip(np.round(x * 12000), -32768, 32767).astype(np.int16)


def write_wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(samples.tobytes())


@torch.no_grad()
def init_weights(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(SEED)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name.endswith("norm.weight"):
            x = 1.0 + 0.2 * torch.randn(p.shape, generator=g)
        elif name.endswith(".bias") or "embed_positions" in name:
            x = 0.3 * torch.randn(p.shape, generator=g)
        elif name.endswith("embed_tokens.weight"):
            x = 0.5 * torch.randn(p.shape, generator=g)
        else:  # linear [out, in] or conv [out, in, k]
            fan_in = int(np.prod(p.shape[1:]))
            x = (1.5 / fan_in ** 0.5) * torch.randn(p.shape, generator=g)
        p.copy_(mf.bf16_round(x))


def build_tokenizer(out: Path) -> None:
    src = mf.qwen_tokenizer_files()
    tok = tokenizers.Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in AUDIO_TOKENS])
    tok.save(str(out / "tokenizer.json"))
    tok_json = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    mf.write_json(out / "tokenizer.json", tok_json, compact=True)
    config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = mf.added_tokens_decoder(tok_json)
    config["chat_template"] = CHAT_TEMPLATE
    config["audio_token"] = "<|AUDIO|>"
    config["audio_bos_token"] = "<|audio_bos|>"
    config["audio_eos_token"] = "<|audio_eos|>"
    mf.write_json(out / "tokenizer_config.json", config)


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    build_tokenizer(OUT)
    tok = AutoTokenizer.from_pretrained(OUT)
    audio_id = tok.convert_tokens_to_ids("<|AUDIO|>")

    text_config = {
        "model_type": "qwen2", "hidden_size": 16, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "max_position_embeddings": 32768, "vocab_size": 151936,
        "tie_word_embeddings": False, "hidden_act": "silu", "use_sliding_window": False,
        "bos_token_id": 151643, "eos_token_id": 151645,
    }
    # 3 encoder layers: llama.cpp's converter maps conv{1,2} through its
    # block-index table, so an encoder of fewer than 3 layers cannot be converted.
    audio_config = {
        "model_type": "qwen2_audio_encoder", "d_model": 32, "encoder_layers": 3,
        "encoder_attention_heads": 4, "encoder_ffn_dim": 64, "num_mel_bins": 80,
        "max_source_positions": 1500, "activation_function": "gelu", "scale_embedding": False,
    }
    cfg = Qwen2AudioConfig(audio_config=audio_config, text_config=text_config,
                           audio_token_index=audio_id, tie_word_embeddings=False)
    cfg.architectures = ["Qwen2AudioForConditionalGeneration"]
    torch.manual_seed(SEED)
    model = Qwen2AudioForConditionalGeneration(cfg).float()
    init_weights(model)
    model.to(torch.bfloat16).save_pretrained(OUT)
    mf.write_json(OUT / "generation_config.json", {"bos_token_id": 151643, "eos_token_id": [151645, 151643],
                                                   "pad_token_id": 151643,
                                                   "transformers_version": transformers.__version__})

    fe = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, hop_length=160, chunk_length=30,
                                 n_fft=400, padding_value=0.0, return_attention_mask=True)
    fe.save_pretrained(OUT)
    processor = Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tok, chat_template=CHAT_TEMPLATE)

    clips = [synth(1.6, 1, 220.0), synth(0.9, 2, 330.0)]
    for i, c in enumerate(clips, 1):
        write_wav(OUT / f"clip{i}.wav", c)
    audio = [c.astype(np.float32) / 32768.0 for c in clips]

    ref = Qwen2AudioForConditionalGeneration.from_pretrained(OUT, dtype=torch.float32).eval()
    names = sorted(ref.state_dict())
    rendered = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=rendered, audio=audio, sampling_rate=16000, return_tensors="pt", padding=True)
    ids = inputs["input_ids"][0].tolist()
    lengths = inputs["feature_attention_mask"].sum(-1).tolist()

    projected = []
    hook = ref.model.multi_modal_projector.register_forward_hook(lambda m, i, o: projected.append(o.detach()))
    with torch.no_grad():
        logits = ref(**inputs).logits[0].float()
    hook.remove()
    with torch.no_grad():
        out = ref.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                           pad_token_id=151643, num_beams=1)
    greedy = out[0, len(ids):].tolist()
    assert len(greedy) == NEW_TOKENS, greedy
    top2 = torch.topk(logits[-1], 2).values
    assert float(top2[0] - top2[1]) > 1e-3, "last position too close to a tie"

    tensors = {
        "input_features": inputs["input_features"].float().contiguous(),  # [2, 80, 3000]
        "last_logits": logits[-1].contiguous(),
        "audio_logits": logits[[i for i, t in enumerate(ids) if t == audio_id][-1]].contiguous(),
    }
    n_tokens = [(((l - 1) // 2 + 1) - 2) // 2 + 1 for l in lengths]
    for i, n in enumerate(n_tokens):
        # encoder + projector output of clip i: the rows that replace its <|AUDIO|> tokens
        tensors[f"audio_embeds.{i}"] = projected[0][i, :n].float().contiguous()
    save_file(tensors, str(OUT / "reference.safetensors"), metadata={"format": "pt"})
    reference = {
        "fixture": "qwen2-audio-tiny",
        "generated_by": "python scripts/make_qwen2_audio_fixture.py",
        "versions": mf.versions(),
        "seed": SEED,
        "weights_dtype": "bfloat16",
        "compute_dtype": "float32",
        "weight_names_sample": [n for n in names if "layers" not in n],
        "messages": MESSAGES,
        "clips": ["clip1.wav", "clip2.wav"],
        "rendered": rendered,
        "input_ids": ids,
        "audio_token_id": audio_id,
        "num_audio_tokens": [
            (((l - 1) // 2 + 1) - 2) // 2 + 1 for l in lengths],
        "feature_lengths": lengths,
        "greedy_ids": greedy,
        "logits": {
            "last_logits": "logits at the last prompt position",
            "audio_logits": "logits at the last <|AUDIO|> position",
            "last_argmax": int(torch.argmax(logits[-1])),
        },
    }
    mf.write_json(OUT / "reference.json", reference)
    mf.log(f"qwen2-audio-tiny: {len(ids)} prompt tokens, audio tokens {reference['num_audio_tokens']}, "
           f"greedy {greedy}")


if __name__ == "__main__":
    main()
