#!/usr/bin/env python3
"""GGUF + mmproj pairs of the multimodal fixtures, made by llama.cpp's own
converters (never by code of ours), for the GGUF loading tests.

    /tmp/fxvenv/bin/python scripts/make_gguf_fixtures.py [--llama-cpp DIR] [--out DIR] [--types f32,f16,q8_0]

DIR is a llama.cpp source tree (convert_hf_to_gguf.py, gguf-py, tools/mtmd);
default: $CANDELA_LLAMA_CPP, else llama-cpp-python 0.3.36's sdist from PyPI,
fetched once into ~/.cache/candela/llama-cpp-python (the package vendors
llama.cpp's sources). Needs torch, transformers, safetensors, numpy and
sentencepiece (scripts/requirements-fixtures.txt); gguf-py is imported from DIR.
LLaVA's mmproj converter needs transformers 4.x (it uses
`CLIPVisionModel.vision_model`, gone in 5.x): pass a python that has it as
--legacy-python (the fixtures were made with transformers 4.57.1 installed
into a venv that otherwise shares /tmp/fxvenv's packages).

Writes, per fixture and type T, `<fixture>-T.gguf` (the language model) and
`mmproj-<fixture>-T.gguf` into --out (default fixtures/gguf). A q8_0 type
quantizes the language model only; its mmproj is written as f16.

How each family is converted, as llama.cpp documents it:

* gemma3-vision-tiny: `convert_hf_to_gguf.py` and `convert_hf_to_gguf.py
  --mmproj`. The converter maps the tower's names from the released layout
  (`vision_tower.vision_model.*`, as google/gemma-3-4b-it ships them);
  transformers 5 saves the tower as `vision_tower.*`, which it cannot map, so
  the checkpoint is first re-saved under the released names (same tensors).
* llava-tiny (LLaVA-1.5): the language model with `convert_hf_to_gguf.py`;
  the mmproj with llama.cpp's LLaVA-1.5 route (docs/multimodal/llava.md,
  tools/mtmd/legacy-models): `llava_surgery_v2.py` splits the checkpoint into
  `llava.clip` (the tower) and `llava.projector`, and
  `convert_image_encoder_to_gguf.py --clip-model-is-vision --llava-projector`
  writes the mmproj from a CLIP vision folder holding `llava.clip`.
  `convert_hf_to_gguf.py --mmproj` does not take LLaVA-1.5:
  its `LlavaForConditionalGeneration` class converts Pixtral and Mistral 3
  only ("Unsupported model type: clip_vision_model"), and
  llava-hf/llava-1.5-7b-hf's own config has the same `vision_config`
  (`model_type: clip_vision_model`), so no fixture layout changes that.
* qwen2-vl-tiny, qwen2_5-vl-tiny (`qwen2vl_merger`, `qwen2.5vl_merger`) and
  qwen2-audio-tiny (`qwen2a`): `convert_hf_to_gguf.py` and
  `convert_hf_to_gguf.py --mmproj`. Qwen2-VL's vision converter takes only
  the released names (`visual.*`, `model.*`); for qwen2-vl-tiny, saved the
  newer way (`model.visual.*`, `model.language_model.*`), it writes an mmproj
  with no tensors, so that checkpoint is re-saved under the released names
  first (same tensors). Their language models are 16 wide, less than a
  Q8_0 block (32): the converter keeps such matrices in F16, so their q8_0
  files hold no quantized tensor.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SDIST = ("llama-cpp-python", "0.3.36")
FIXTURES = ["llava-tiny", "gemma3-vision-tiny", "qwen2-vl-tiny", "qwen2_5-vl-tiny", "qwen2-audio-tiny"]
# convert_image_encoder_to_gguf.py reaches into `CLIPVisionModel.vision_model`,
# which transformers 5 no longer has: it runs under a python with transformers 4.
LEGACY_PYTHON = sys.executable


def llama_cpp_sources(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if os.environ.get("CANDELA_LLAMA_CPP"):
        return Path(os.environ["CANDELA_LLAMA_CPP"])
    name, version = SDIST
    cache = Path(os.environ.get("CANDELA_CACHE_DIR", Path.home() / ".cache" / "candela"))
    dest = cache / "llama-cpp-python" / f"{name.replace('-', '_')}-{version}"
    tree = dest / "vendor" / "llama.cpp"
    if (tree / "convert_hf_to_gguf.py").is_file():
        return tree
    meta = json.load(urllib.request.urlopen(f"https://pypi.org/pypi/{name}/{version}/json"))
    sdist = next(u for u in meta["urls"] if u["packagetype"] == "sdist")
    dest.parent.mkdir(parents=True, exist_ok=True)
    archive = dest.parent / sdist["filename"]
    urllib.request.urlretrieve(sdist["url"], archive)
    import hashlib

    if hashlib.sha256(archive.read_bytes()).hexdigest() != sdist["digests"]["sha256"]:
        raise SystemExit(f"{archive}: sha256 differs from PyPI's")
    with tarfile.open(archive) as t:
        t.extractall(dest.parent, filter="data")
    archive.unlink()
    return tree


def run(cmd: list, cwd: Path | None = None, env: dict | None = None) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=cwd, env=env,
                   stdout=subprocess.DEVNULL)


def gemma3_released(k: str) -> str:
    """Gemma 3's tower under `vision_tower.vision_model.*`, as released."""
    if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
        return "vision_tower.vision_model." + k[len("vision_tower."):]
    return k


def qwen2_vl_released(k: str) -> str:
    """Qwen2-VL's `visual.*` and `model.*`, as released."""
    for new, old in (("visual.", "model.visual."), ("model.", "model.language_model.")):
        if k.startswith(old):
            return new + k[len(old):]
    return k


# Fixtures saved with names llama.cpp's converter does not map.
RELEASED_NAMES = {"gemma3-vision-tiny": gemma3_released, "qwen2-vl-tiny": qwen2_vl_released}


def released_layout(src: Path, dst: Path, rename) -> Path:
    """A copy of a multimodal checkpoint with its tensors named by
    `rename`, as the released checkpoints name them (same tensors)."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f.resolve(), dst / f.name)
    tensors = load_file(src / "model.safetensors")
    renamed = {rename(k): v for k, v in tensors.items()}
    save_file(renamed, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def convert_text(tree: Path, env: dict, model: Path, outtype: str, out: Path) -> None:
    run([sys.executable, tree / "convert_hf_to_gguf.py", model, "--outtype", outtype,
         "--outfile", out], env=env)


def llava_mmproj(tree: Path, env: dict, model: Path, outtype: str, out: Path, tmp: Path) -> None:
    import torch

    work = tmp / "llava-split"
    if not work.exists():
        shutil.copytree(model, work, symlinks=False)
        legacy = tree / "tools" / "mtmd" / "legacy-models"
        run([sys.executable, legacy / "llava_surgery_v2.py", "-C", "-m", work], env=env)
        clip = tmp / "llava-clip"
        clip.mkdir()
        cfg = json.loads((model / "config.json").read_text())
        vision = dict(cfg["vision_config"], architectures=["CLIPVisionModel"])
        (clip / "config.json").write_text(json.dumps(vision, indent=2))
        torch.save(torch.load(work / "llava.clip"), clip / "pytorch_model.bin")
    legacy = tree / "tools" / "mtmd" / "legacy-models"
    dest = tmp / f"llava-mmproj-{outtype}"
    args = [LEGACY_PYTHON, legacy / "convert_image_encoder_to_gguf.py", "-m", tmp / "llava-clip",
            "--clip-model-is-vision", "--llava-projector", work / "llava.projector",
            "--projector-type", "mlp", "--output-dir", dest]
    pp = json.loads((model / "preprocessor_config.json").read_text())
    args += ["--image-mean", *map(str, pp["image_mean"]), "--image-std", *map(str, pp["image_std"])]
    if outtype == "f32":
        args.append("--use-f32")
    run(args, env=env)
    produced = next(dest.glob("mmproj-model-*.gguf"))
    shutil.move(produced, out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp")
    ap.add_argument("--out", default=str(ROOT / "fixtures" / "gguf"))
    ap.add_argument("--types", default="f32,f16,q8_0")
    ap.add_argument("--fixtures", default=",".join(FIXTURES))
    ap.add_argument("--legacy-python", default=sys.executable,
                    help="a python with transformers 4.x for convert_image_encoder_to_gguf.py")
    args = ap.parse_args()
    global LEGACY_PYTHON
    LEGACY_PYTHON = args.legacy_python
    tree = llama_cpp_sources(args.llama_cpp)
    env = dict(os.environ, PYTHONPATH=str(tree / "gguf-py"), NO_LOCAL_GGUF="")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for name in args.fixtures.split(","):
            model = ROOT / "fixtures" / name
            if name in RELEASED_NAMES:
                model = released_layout(model, tmp / name, RELEASED_NAMES[name])
            for ty in args.types.split(","):
                convert_text(tree, env, model, ty, out / f"{name}-{ty}.gguf")
                mm_ty = "f16" if ty.startswith("q") else ty
                mm_out = out / f"mmproj-{name}-{mm_ty}.gguf"
                if mm_out.exists() and mm_ty != ty:
                    continue
                if name == "llava-tiny":
                    llava_mmproj(tree, env, model, mm_ty, mm_out, tmp)
                else:
                    run([sys.executable, tree / "convert_hf_to_gguf.py", model, "--mmproj",
                         "--outtype", mm_ty, "--outfile", mm_out], env=env)
    for f in sorted(out.glob("*.gguf")):
        print(f"{f.stat().st_size:>10}  {f.relative_to(ROOT) if f.is_relative_to(ROOT) else f}")


if __name__ == "__main__":
    main()
