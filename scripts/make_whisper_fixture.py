#!/usr/bin/env python3
"""Build fixtures/whisper-tiny-random: a tiny random WhisperForConditionalGeneration
with the REAL multilingual Whisper tokenizer, and reference outputs from transformers.

    /tmp/fxvenv/bin/python scripts/make_whisper_fixture.py

(same venv as scripts/make_fixtures.py; see scripts/requirements-fixtures.txt).

The tokenizer comes from the PyPI sdist `openai-whisper` (pinned): its
whisper/assets/multilingual.tiktoken holds the 50257 byte-level BPE ranks, from
which the vocabulary and merges are derived the way transformers' converters do
(a merge for every split of a token whose two halves are tokens, ordered by
rank). The special tokens follow in Whisper's order (<|endoftext|>,
<|startoftranscript|>, 99 languages, <|translate|>, <|transcribe|>,
<|startoflm|>, <|startofprev|>, <|nocaptions|>, <|notimestamps|>, 1501
timestamps), so every id equals openai/whisper-tiny's.
generation_config.json follows whisper-tiny's (lang_to_id, task_to_id,
suppress_tokens from openai-whisper's non-speech symbols, begin_suppress_tokens).

The audio is fixtures/audio/speech_16k.wav (espeak-ng speech, made by
scripts/make_audio_fixtures.py).
"""

import json
import shutil
import subprocess
import sys
import tarfile
from base64 import b64decode
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

import tokenizers  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors  # noqa: E402
from tokenizers.models import BPE  # noqa: E402
from transformers import (WhisperConfig, WhisperFeatureExtractor,  # noqa: E402
                          WhisperForConditionalGeneration, WhisperTokenizer)
from transformers.models.whisper.tokenization_whisper import LANGUAGES  # noqa: E402

OUT = mf.FIXTURES / "whisper-tiny-random"
AUDIO = mf.FIXTURES / "audio" / "speech_16k.wav"
OPENAI_WHISPER_SDIST = ("openai-whisper", "20250625")
TIKTOKEN_MEMBER = "openai_whisper-20250625/whisper/assets/multilingual.tiktoken"
SEED = 1
NUM_LANGUAGES = 99  # whisper-tiny (v1): no <|yue|>
MAX_TARGET = 64     # small, so greedy runs into the length cap in the fixture
PROMPT_TEXT = "Candela listens."


def tiktoken_file() -> Path:
    name, version = OPENAI_WHISPER_SDIST
    dest = mf.CACHE / "pip"
    dest.mkdir(parents=True, exist_ok=True)
    sdist = dest / f"openai_whisper-{version}.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                        "--no-binary=:all:", "-d", str(dest), f"{name}=={version}"], check=True)
    return mf.extract_member(sdist, TIKTOKEN_MEMBER, mf.CACHE / "openai-whisper" / "multilingual.tiktoken")


def bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character table (byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def vocab_and_merges(path: Path):
    ranks = {}
    for line in path.read_text().splitlines():
        if line.strip():
            tok, rank = line.split()
            ranks[b64decode(tok)] = int(rank)
    table = bytes_to_unicode()
    s = lambda b: "".join(table[x] for x in b)  # noqa: E731
    vocab = {s(t): r for t, r in ranks.items()}
    merges = []
    for tok, rank in ranks.items():
        if len(tok) == 1:
            continue
        for i in range(1, len(tok)):
            a, b = tok[:i], tok[i:]
            if a in ranks and b in ranks:
                merges.append((rank, ranks[a], ranks[b], s(a), s(b)))
    merges.sort()
    return vocab, [(m[3], m[4]) for m in merges], len(ranks)


def special_tokens() -> list:
    langs = list(LANGUAGES.keys())[:NUM_LANGUAGES]
    return (["<|endoftext|>", "<|startoftranscript|>"] + [f"<|{l}|>" for l in langs]
            + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>",
               "<|notimestamps|>"])


def build_tokenizer(out: Path) -> dict:
    vocab, merges, n = vocab_and_merges(tiktoken_file())
    assert n == 50257, n
    tok = Tokenizer(BPE(vocab, merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = special_tokens()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    # Timestamps are added tokens but not special (as in openai/whisper-tiny's tokenizer.json).
    tok.add_tokens([AddedToken(f"<|{i * 0.02:.2f}|>", normalized=False, special=False) for i in range(1501)])
    ids = {t: tok.token_to_id(t) for t in specials}
    assert ids["<|endoftext|>"] == 50257 and ids["<|notimestamps|>"] == 50363, ids
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftranscript|> <|notimestamps|> $A <|endoftext|>",
        pair="<|startoftranscript|> <|notimestamps|> $A $B:1 <|endoftext|>:1",
        special_tokens=[(t, ids[t]) for t in ("<|startoftranscript|>", "<|notimestamps|>", "<|endoftext|>")])
    tok.save(str(out / "tokenizer.json"))
    mf.write_json(out / "tokenizer.json", json.loads((out / "tokenizer.json").read_text()), compact=True)
    config = {
        "tokenizer_class": "WhisperTokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "model_max_length": 1024,
        "add_prefix_space": False, "errors": "replace", "clean_up_tokenization_spaces": True,
    }
    mf.write_json(out / "tokenizer_config.json", config)
    return ids


def non_speech_tokens(tok) -> list:
    """openai-whisper's `Tokenizer.non_speech_tokens`: symbols that are not speech."""
    enc = lambda t: tok.encode(t, add_special_tokens=False)  # noqa: E731
    symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
    symbols += "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
    misc = set("♩♪♫♬♭♮♯")
    result = {enc(" -")[0], enc(" '")[0]}
    for sym in symbols + sorted(misc):
        for ids in (enc(sym), enc(" " + sym)):
            if len(ids) == 1 or sym in misc:
                result.add(ids[0])
    return sorted(result)


def generation_config(ids: dict, tok) -> dict:
    langs = list(LANGUAGES.keys())[:NUM_LANGUAGES]
    suppress = non_speech_tokens(tok) + [ids[t] for t in ("<|translate|>", "<|transcribe|>", "<|startoftranscript|>",
                                                         "<|startofprev|>", "<|startoflm|>", "<|nocaptions|>")]
    return {
        "decoder_start_token_id": ids["<|startoftranscript|>"],
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "begin_suppress_tokens": [220, ids["<|endoftext|>"]],
        "suppress_tokens": sorted(set(suppress)),
        "forced_decoder_ids": [[1, None], [2, ids["<|transcribe|>"]]],
        "is_multilingual": True,
        "lang_to_id": {f"<|{l}|>": ids[f"<|{l}|>"] for l in langs},
        "task_to_id": {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        "no_timestamps_token_id": ids["<|notimestamps|>"],
        "prev_sot_token_id": ids["<|startofprev|>"],
        "max_initial_timestamp_index": 50,
        "max_length": 448,
        "return_timestamps": False,
        "transformers_version": transformers.__version__,
    }


@torch.no_grad()
def init_weights(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(SEED)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if name.endswith("layer_norm.weight"):
            x = 1.0 + 0.2 * torch.randn(p.shape, generator=g)
        elif name.endswith(".bias") or "embed_positions" in name:
            x = 0.3 * torch.randn(p.shape, generator=g)
        elif name.endswith("embed_tokens.weight"):
            x = 0.5 * torch.randn(p.shape, generator=g)
        else:  # linear [out, in] or conv [out, in, k]
            fan_in = int(np.prod(p.shape[1:]))
            x = (1.5 / fan_in ** 0.5) * torch.randn(p.shape, generator=g)
        p.copy_(mf.bf16_round(x))


def read_wav(path: Path) -> np.ndarray:
    import wave
    with wave.open(str(path), "rb") as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2 and w.getframerate() == 16000
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return x.astype(np.float32) / 32768.0


@torch.no_grad()
def greedy_path(model, feats, init: list, suppress: list, begin_suppress: list, max_len: int):
    """Plain argmax loop with full recompute and HF's suppressions; returns ids and the
    smallest top1-top2 gap along the path (how safe an exact comparison is)."""
    ids = list(init)
    out, gap = [], float("inf")
    enc = model.model.encoder(feats).last_hidden_state
    while len(ids) < max_len:
        logits = model(encoder_outputs=(enc,), decoder_input_ids=torch.tensor([ids])).logits[0, -1].clone()
        logits[suppress] = -float("inf")
        if not out:
            logits[begin_suppress] = -float("inf")
        top = torch.topk(logits, 2)
        gap = min(gap, float(top.values[0] - top.values[1]))
        t = int(top.indices[0])
        out.append(t)
        if t == model.generation_config.eos_token_id:
            break
        ids.append(t)
    return out, gap


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    ids = build_tokenizer(OUT)
    tok = WhisperTokenizer.from_pretrained(OUT)
    assert tok.convert_tokens_to_ids("<|transcribe|>") == 50359
    gen = generation_config(ids, tok)
    mf.write_json(OUT / "generation_config.json", gen)

    cfg = WhisperConfig(
        vocab_size=51865, num_mel_bins=80, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_source_positions=1500, max_target_positions=MAX_TARGET, activation_function="gelu",
        decoder_start_token_id=gen["decoder_start_token_id"], pad_token_id=gen["pad_token_id"],
        bos_token_id=gen["bos_token_id"], eos_token_id=gen["eos_token_id"], scale_embedding=False,
        tie_word_embeddings=True)
    cfg.architectures = ["WhisperForConditionalGeneration"]
    torch.manual_seed(SEED)
    model = WhisperForConditionalGeneration(cfg).float()
    init_weights(model)
    model.to(torch.bfloat16).save_pretrained(OUT)
    (OUT / "generation_config.json").unlink(missing_ok=True)  # save_pretrained wrote its own
    mf.write_json(OUT / "generation_config.json", gen)

    fe = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, hop_length=160, chunk_length=30,
                                 n_fft=400, padding_value=0.0, return_attention_mask=False)
    fe.save_pretrained(OUT)

    ref = WhisperForConditionalGeneration.from_pretrained(OUT, dtype=torch.float32).eval()
    names = sorted(ref.state_dict())
    audio = read_wav(AUDIO)
    feats = fe(audio, sampling_rate=16000, return_tensors="pt").input_features  # [1, 80, 3000]

    sot, eot = gen["decoder_start_token_id"], gen["eos_token_id"]
    en, transcribe, translate = ids["<|en|>"], ids["<|transcribe|>"], ids["<|translate|>"]
    nots = gen["no_timestamps_token_id"]
    forced = [sot, en, transcribe, nots]
    with torch.no_grad():
        enc = ref.model.encoder(feats).last_hidden_state[0]
        logits = ref(input_features=feats, decoder_input_ids=torch.tensor([forced])).logits[0]
    supp, begin = gen["suppress_tokens"], gen["begin_suppress_tokens"]

    cases = {}

    def run(name, init, **kw):
        # The reference path: argmax with full recompute and HF's suppressions,
        # up to <|endoftext|> or max_target_positions.
        manual, gap = greedy_path(ref, feats, init, supp, begin, MAX_TARGET)
        assert gap > 2e-3, (name, "greedy path too close to a tie", gap)
        with torch.no_grad():
            out = ref.generate(feats, do_sample=False, num_beams=1, return_dict_in_generate=True, **kw)
        seq = out.sequences[0].tolist()
        generated = seq[len(init):] if seq[:len(init)] == init else seq
        while len(generated) > 1 and generated[-1] == eot and generated[-2] == eot:
            generated.pop()  # padding
        cases[name] = {
            "init_tokens": init, "generate_kwargs": {k: v for k, v in kw.items() if k != "prompt_ids"},
            "greedy_ids": manual, "min_top2_gap": gap,
            "text": tok.decode(manual, skip_special_tokens=True),
            "hf_generate_agrees": generated == manual,
        }
        if generated != manual:
            cases[name]["hf_generate_ids"] = generated
        mf.log(f"{name}: {len(manual)} tokens, gap {gap:.4f}, generate agrees: {generated == manual}")

    run("en_transcribe", forced, language="en", task="transcribe")
    run("translate", [sot, en, translate, nots], language="en", task="translate")
    # Language detection: logits of <|startoftranscript|> restricted to the language tokens.
    lang_ids = list(gen["lang_to_id"].values())
    detected = lang_ids[int(torch.argmax(logits[0][lang_ids]))]
    run("detect", [sot, detected, transcribe, nots], task="transcribe")
    prompt_ids = tok.get_prompt_ids(PROMPT_TEXT, return_tensors="pt")
    prompt_list = prompt_ids.tolist()
    run("prompt", prompt_list + forced, language="en", task="transcribe", prompt_ids=prompt_ids)
    for n in ("en_transcribe", "translate", "detect"):
        assert cases[n]["hf_generate_agrees"], n
    # The reference is the full-recompute argmax path (as openai-whisper decodes).
    # generate() with prompt_ids agrees for this prompt; with some others
    # ("Candela listens") transformers 5.23 picked a first token that is not the
    # argmax of forward(prompt + init tokens), so it is recorded, not asserted.
    cases["prompt"]["prompt_text"] = PROMPT_TEXT
    cases["prompt"]["prompt_ids"] = prompt_list
    cases["detect"]["language"] = tok.convert_ids_to_tokens(detected)[2:-2]

    tensors = {
        "input_features": feats[0].contiguous(),
        "encoder_output": enc.contiguous(),                 # [1500, d_model]
        "forced_logits": logits.contiguous(),               # [4, vocab]: sot, <|en|>, <|transcribe|>, <|notimestamps|>
    }
    save_file(tensors, str(OUT / "reference.safetensors"), metadata={"format": "pt"})
    reference = {
        "fixture": "whisper-tiny-random",
        "generated_by": "python scripts/make_whisper_fixture.py",
        "versions": mf.versions(),
        "tokenizer_source": {"pypi": "%s==%s" % OPENAI_WHISPER_SDIST, "file": "whisper/assets/multilingual.tiktoken"},
        "seed": SEED,
        "weights_dtype": "bfloat16",
        "compute_dtype": "float32",
        "audio": "../audio/speech_16k.wav",
        "samples": int(audio.shape[0]),
        "weight_names_sample": [n for n in names if "layers" not in n],
        "special_ids": {k: v for k, v in ids.items() if k[2:-2] not in LANGUAGES},
        "forced_prompt": forced,
        "cases": cases,
    }
    mf.write_json(OUT / "reference.json", reference)
    total = sum(p.stat().st_size for p in OUT.iterdir())
    mf.log(f"whisper-tiny-random: {total / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
