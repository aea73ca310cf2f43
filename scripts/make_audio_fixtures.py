#!/usr/bin/env python3
"""Build the real-speech audio fixtures in fixtures/audio/ and their reference features.

    apt-get install -y espeak-ng sox libsox-fmt-all lame   # Debian packages (as root)
    python3.11 -m venv /tmp/fxvenv
    /tmp/fxvenv/bin/pip install -r scripts/requirements-fixtures.txt
    /tmp/fxvenv/bin/python scripts/make_audio_fixtures.py

Audio (speech made with espeak-ng, converted with sox):

  speech_16k.wav          mono, 16 kHz, 16-bit PCM: the reference input
  speech_16k.flac/.ogg    the same audio through FLAC and Vorbis (q5), by sox
  speech_16k.mp3          64 kbit/s by lame, with the LAME/Info tag that makes
                          decoding gapless (encoder delay and padding trimmed)
  speech_16k_sox.mp3      the same through sox, whose MP3s carry no such tag: the
                          decoded audio starts 1105 samples late and runs long
  speech_44k_stereo.wav   44.1 kHz stereo 16-bit: left = speech, right = speech * 0.5

Reference (Hugging Face transformers' WhisperFeatureExtractor, its default torch path):

  speech_16k.features.safetensors (input: speech_16k.wav as int16 / 32768, which is
  how transformers' loaders and symphonia both read 16-bit PCM)
    mel80_longest        f32 [M, F] padding="longest" (the clip's own length; 80 mels
                                    only, to keep the file small: 128 differs in the
                                    filter bank alone, which max_length covers)
    mel{80,128}_max_head f32 [M, H] padding="max_length" (30 s), frames 0..H
    mel{80,128}_max_tail f32 [M]    ... every frame from H to 3000 equals this column
                                    (all-padding frames; checked here) -- stored this
                                    way to keep the file small
    mel{80,128}_attention_frames  i64 [1]  attention_mask.sum() for max_length
  whisper{80,128}_preprocessor_config.json   the extractor configs used

Re-running gives the same files for the same espeak-ng / sox versions (recorded in
speech.json with the sha256 of every file).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file
from transformers import WhisperFeatureExtractor

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "audio"

TEXT = "Candela listens: the quick brown fox jumps."
VOICE = "en-us"
SPEED_WPM = 170


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_wav_int16(path: Path) -> tuple[np.ndarray, int, int]:
    with wave.open(str(path)) as w:
        assert w.getsampwidth() == 2, "expected 16-bit PCM"
        ch, sr, n = w.getnchannels(), w.getframerate(), w.getnframes()
        data = np.frombuffer(w.readframes(n), dtype="<i2").reshape(n, ch)
    return data, sr, ch


def sox(*args: str) -> None:
    # -R: repeatable (fixed seeds, e.g. the ogg stream serial); -D: no dither, which
    # would otherwise add fresh random noise to every 16-bit output.
    run("sox", "-R", "-D", *args)


def make_audio(tmp: Path) -> None:
    raw = tmp / "espeak.wav"
    run("espeak-ng", "-v", VOICE, "-s", str(SPEED_WPM), "-w", str(raw), TEXT)
    # sox's default rate converter is a high-quality band-limited one.
    wav16 = OUT / "speech_16k.wav"
    sox(str(raw), "-r", "16000", "-c", "1", "-b", "16", str(wav16))
    sox(str(wav16), str(OUT / "speech_16k.flac"))
    run("lame", "--quiet", "-b", "64", str(wav16), str(OUT / "speech_16k.mp3"))
    sox(str(wav16), "-C", "64", str(OUT / "speech_16k_sox.mp3"))
    sox(str(wav16), "-C", "5", str(OUT / "speech_16k.ogg"))
    # Left = speech, right = speech at half level: a mono mix is 0.75 * speech.
    sox(str(wav16), "-r", "44100", "-b", "16", str(OUT / "speech_44k_stereo.wav"), "remix", "1", "1v0.5")


def reference_features() -> dict:
    pcm, sr, ch = read_wav_int16(OUT / "speech_16k.wav")
    assert (sr, ch) == (16000, 1)
    samples = (pcm[:, 0].astype(np.float32) / 32768.0)
    tensors: dict[str, np.ndarray] = {}
    info: dict = {"samples": int(samples.size)}
    for n_mels in (80, 128):
        fe = WhisperFeatureExtractor(feature_size=n_mels)
        (OUT / f"whisper{n_mels}_preprocessor_config.json").write_text(fe.to_json_string())
        longest = fe(samples, sampling_rate=16000, padding="longest", return_tensors="np").input_features[0]
        full = fe(samples, sampling_rate=16000, return_attention_mask=True, return_tensors="np")
        feats = full.input_features[0]
        attn = int(full.attention_mask.sum())
        # The numpy path is HF's other implementation: the two must agree too.
        np_longest = fe._np_extract_fbank_features(samples[None, :], "cpu")[0]
        assert feats.shape == (n_mels, 3000)
        head = attn + 4  # a few frames into the padding, where reflect/zero edges differ
        tail = feats[:, head:]
        assert np.all(tail == tail[:, :1]), "padding frames are not all equal"
        if n_mels == 80:
            tensors["mel80_longest"] = np.ascontiguousarray(longest, dtype=np.float32)
        tensors[f"mel{n_mels}_max_head"] = np.ascontiguousarray(feats[:, :head], dtype=np.float32)
        tensors[f"mel{n_mels}_max_tail"] = np.ascontiguousarray(tail[:, 0], dtype=np.float32)
        tensors[f"mel{n_mels}_attention_frames"] = np.array([attn], dtype=np.int64)
        info[f"mel{n_mels}"] = {
            "longest_frames": int(longest.shape[1]),
            "max_length_attention_frames": attn,
            "torch_vs_numpy_max_abs_diff": float(np.abs(np_longest - longest).max()),
        }
    path = OUT / "speech_16k.features.safetensors"
    save_file(tensors, str(path))
    path.chmod(0o644)
    return info


def main() -> None:
    torch.set_num_threads(1)
    for tool in ("espeak-ng", "sox", "lame"):
        assert shutil.which(tool), f"{tool} not found: apt-get install -y espeak-ng sox libsox-fmt-all lame"
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = OUT / ".tmp"
    tmp.mkdir(exist_ok=True)
    try:
        make_audio(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info = reference_features()
    files = sorted(p for p in OUT.iterdir() if p.is_file() and p.name != "speech.json")
    meta = {
        "text": TEXT,
        "espeak_ng": run("espeak-ng", "--version").strip(),
        "sox": run("sox", "--version").strip(),
        "lame": run("lame", "--version").splitlines()[0].strip(),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "reference": info,
        "sha256": {p.name: sha256(p) for p in files},
        "bytes": {p.name: p.stat().st_size for p in files},
    }
    (OUT / "speech.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))
    print("total bytes:", sum(meta["bytes"].values()))


if __name__ == "__main__":
    main()
