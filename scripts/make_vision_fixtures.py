#!/usr/bin/env python3
"""Build the image / video fixtures in fixtures/vision/ and their reference tensors.

    apt-get install -y ffmpeg                       # Debian (libx264, libvpx)
    python3.11 -m venv /tmp/fxvenv
    /tmp/fxvenv/bin/pip install -r scripts/requirements-fixtures.txt
    /tmp/fxvenv/bin/python scripts/make_vision_fixtures.py

Images are synthesised here (seeded numpy, written by Pillow) so the script needs
no downloads. Videos are encoded from synthetic frames by ffmpeg.

Reference (Hugging Face transformers, the versions in requirements-fixtures.txt):

  * images: `Qwen2VLImageProcessorPil` (the PIL-based "slow" processor) on the
    image as Pillow decodes it, with alpha composited over white the way vLLM's
    `rgba_to_rgb` does (`Image.paste(img, mask=alpha)`); RGBA, LA and palette
    images with transparency all take that path (vLLM itself composites RGBA
    only). `<case>.pixel_values` f32 [rows, cols], `<case>.grid_thw` i64 [3].
    `<file>.decoded` u8 [H, W, 3] is that composited RGB (small images only).
  * videos: `Qwen2VLVideoProcessor` (torchvision backend) on the uint8 frames of
    video_frames.safetensors, with `do_sample_frames=True` and video metadata
    (fps, total frames) where a case samples. `<case>.pixel_values`,
    `<case>.grid_thw`, `<case>.frame_indices` i64.
  * clips: each video file decoded by ffmpeg to rgb24, `<clip>.frames` u8
    [T, H, W, 3] in clip_frames.safetensors (decoders differ slightly in YUV
    -> RGB, so tests compare these with a tolerance).

reference.json lists every case with its inputs; re-running gives the same
files for the same library versions (the JPEG / WebP / video encoders are
ffmpeg's and Pillow's; their versions are recorded there).
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import warnings
from pathlib import Path

import numpy as np
import PIL
import torch
import transformers
from PIL import Image
from safetensors.numpy import save_file
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "vision"

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
# Qwen2-VL-2B-Instruct's preprocessor_config.json values.
IMAGE_CONFIG = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": MEAN,
    "image_std": STD,
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}
VIDEO_CONFIG = {
    "size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768},
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": MEAN,
    "image_std": STD,
    "min_frames": 4,
    "max_frames": 768,
    "video_processor_type": "Qwen2VLVideoProcessor",
}


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def smooth_noise(g: np.random.Generator, h: int, w: int, c: int, cell: int) -> np.ndarray:
    """Low-frequency noise in [0, 1] (bilinear upsampling of a coarse grid)."""
    gh, gw = h // cell + 2, w // cell + 2
    coarse = g.random((gh, gw, c))
    ys = np.linspace(0, gh - 1.001, h)
    xs = np.linspace(0, gw - 1.001, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    a = coarse[y0][:, x0]
    b = coarse[y0][:, x0 + 1]
    c_ = coarse[y0 + 1][:, x0]
    d = coarse[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c_ * (1 - fx) + d * fx) * fy


def photo_like(seed: int, h: int, w: int) -> np.ndarray:
    """Gradients, soft shapes and fine texture: resampling sees real structure."""
    g = rng(seed)
    img = smooth_noise(g, h, w, 3, max(8, min(h, w) // 6)) * 180 + 30
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(6):
        cy, cx, r = g.random() * h, g.random() * w, (0.05 + 0.2 * g.random()) * min(h, w)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
        img[mask] = img[mask] * 0.4 + g.random(3) * 255 * 0.6
    img += g.normal(0, 6, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def vllm_rgb(im: Image.Image, bg=(255, 255, 255)) -> Image.Image:
    """vLLM's rgba_to_rgb, applied to every image that carries alpha."""
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    if not has_alpha:
        return im.convert("RGB")
    rgba = im.convert("RGBA")
    out = Image.new("RGB", rgba.size, bg)
    out.paste(rgba, mask=rgba.split()[3])
    return out


def write_images() -> dict[str, Path]:
    files: dict[str, Path] = {}

    # PNG with real alpha: a gradient (opaque -> transparent) and a hole.
    g = rng(1)
    h, w = 37, 45
    rgb = photo_like(11, h, w)
    alpha = np.tile(np.linspace(255, 0, w).astype(np.uint8), (h, 1))
    alpha[10:20, 5:15] = 0
    alpha[25:, 30:] = 255
    files["rgba_alpha.png"] = OUT / "rgba_alpha.png"
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(files["rgba_alpha.png"])

    # Grey + alpha PNG.
    grey = (smooth_noise(g, 20, 24, 1, 6)[..., 0] * 255).astype(np.uint8)
    la_alpha = np.tile(np.linspace(0, 255, 24).astype(np.uint8), (20, 1))
    files["la.png"] = OUT / "la.png"
    Image.fromarray(np.dstack([grey, la_alpha]), "LA").save(files["la.png"])

    # Palette GIF with a transparent index.
    pal_img = Image.fromarray(photo_like(12, 30, 40)).quantize(colors=16, method=Image.Quantize.MEDIANCUT)
    arr = np.array(pal_img)
    arr[5:12, 8:20] = 15
    pal_img = Image.fromarray(arr, "P")
    pal_img.putpalette(Image.fromarray(photo_like(12, 30, 40)).quantize(colors=16, method=Image.Quantize.MEDIANCUT).getpalette())
    files["palette.gif"] = OUT / "palette.gif"
    pal_img.save(files["palette.gif"], transparency=15)

    # Small JPEG (4:2:0, baseline) and the 1024x768 photo.
    files["small.jpg"] = OUT / "small.jpg"
    Image.fromarray(photo_like(13, 48, 64)).save(files["small.jpg"], quality=90)
    files["photo_1024x768.jpg"] = OUT / "photo_1024x768.jpg"
    Image.fromarray(photo_like(14, 768, 1024)).save(files["photo_1024x768.jpg"], quality=85)

    # WebP: lossless (exact) and lossy (VP8 intra).
    files["lossless.webp"] = OUT / "lossless.webp"
    Image.fromarray(photo_like(15, 34, 50)).save(files["lossless.webp"], lossless=True)
    files["lossy.webp"] = OUT / "lossy.webp"
    Image.fromarray(photo_like(16, 34, 50)).save(files["lossy.webp"], quality=80)

    # BMP (24-bit) and TIFF (8-bit RGB, LZW).
    files["rgb.bmp"] = OUT / "rgb.bmp"
    Image.fromarray(photo_like(17, 21, 33)).save(files["rgb.bmp"])
    files["rgb.tiff"] = OUT / "rgb.tiff"
    Image.fromarray(photo_like(18, 31, 29)).save(files["rgb.tiff"], compression="tiff_lzw")

    # Larger lossless inputs for the resize paths: a landscape downscale and a
    # tall one that makes Pillow go vertical-first.
    files["wide.png"] = OUT / "wide.png"
    Image.fromarray(photo_like(19, 200, 300)).save(files["wide.png"])
    files["tall.png"] = OUT / "tall.png"
    Image.fromarray(photo_like(20, 400, 60)).save(files["tall.png"])
    return files


IMAGE_CASES = [
    # (case, file, min_pixels, max_pixels); None = the config's.
    ("rgba_alpha", "rgba_alpha.png", None, None),
    ("rgba_alpha_min8", "rgba_alpha.png", 28 * 28 * 8, None),
    ("la", "la.png", None, None),
    ("palette", "palette.gif", None, None),
    ("small_jpg", "small.jpg", None, None),
    ("lossless_webp", "lossless.webp", None, None),
    ("lossy_webp", "lossy.webp", None, None),
    ("bmp", "rgb.bmp", None, None),
    ("tiff", "rgb.tiff", None, None),
    ("wide_max12", "wide.png", None, 28 * 28 * 12),
    ("wide_min_max", "wide.png", 28 * 28 * 8, 28 * 28 * 9),
    ("tall_max6", "tall.png", None, 28 * 28 * 6),
    ("photo_max20", "photo_1024x768.jpg", None, 28 * 28 * 20),
]
# Files whose composited RGB is stored (the photo is too big; its parity goes
# through photo_max20 and the grid of photo_default).
DECODED = ["rgba_alpha.png", "la.png", "palette.gif", "small.jpg", "lossless.webp", "lossy.webp",
           "rgb.bmp", "rgb.tiff"]


def image_reference(tensors: dict, meta: dict) -> None:
    proc = Qwen2VLImageProcessorPil(**{k: v for k, v in IMAGE_CONFIG.items() if not k.endswith("_type") and k != "processor_class"})
    cases = []
    for name, file, min_px, max_px in IMAGE_CASES:
        im = vllm_rgb(Image.open(OUT / file))
        size = {"shortest_edge": min_px or IMAGE_CONFIG["min_pixels"],
                "longest_edge": max_px or IMAGE_CONFIG["max_pixels"]}
        out = proc(images=[im], size=size, return_tensors="np")
        pv = out["pixel_values"].astype(np.float32)
        grid = out["image_grid_thw"][0].astype(np.int64)
        tensors[f"{name}.pixel_values"] = np.ascontiguousarray(pv)
        tensors[f"{name}.grid_thw"] = grid
        cases.append({"case": name, "file": file, "min_pixels": min_px, "max_pixels": max_px,
                      "grid_thw": grid.tolist(), "shape": list(pv.shape)})
    # The photo at the config's bounds: grid and summary only (the tensor is ~19 MB).
    im = vllm_rgb(Image.open(OUT / "photo_1024x768.jpg"))
    out = proc(images=[im], return_tensors="np")
    pv = out["pixel_values"]
    meta["photo_default"] = {
        "grid_thw": out["image_grid_thw"][0].tolist(),
        "shape": list(pv.shape),
        "mean": float(pv.astype(np.float64).mean()),
        "first_row_head": pv[0, :16].astype(float).tolist(),
    }
    for file in DECODED:
        tensors[f"{file}.decoded"] = np.ascontiguousarray(np.array(vllm_rgb(Image.open(OUT / file))))
    meta["image_cases"] = cases


def video_frames() -> np.ndarray:
    """9 frames of 38x50: a textured background with a square moving right."""
    base = photo_like(30, 38, 50).astype(np.int16)
    frames = []
    for t in range(9):
        f = base.copy()
        f[8:24, 4 + 4 * t:20 + 4 * t] = [230, 40 + 20 * t, 60]
        frames.append(np.clip(f, 0, 255).astype(np.uint8))
    return np.stack(frames)


VIDEO_CASES = [
    # (case, source fps or None (no sampling), kwargs)
    ("v_fps2", 6.0, {"fps": 2, "size": {"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 16}}),
    ("v_fps2_src3", 3.0, {"fps": 2, "max_frames": 7, "size": {"shortest_edge": 28 * 28 * 2, "longest_edge": 28 * 28 * 6}}),
    ("v_all", None, {"size": {"shortest_edge": 28 * 28 * 2, "longest_edge": 28 * 28 * 4}}),
    # max_video_tokens=4 -> total_pixels 2822 -> 1411 per frame: the cap binds.
    ("v_total", 6.0, {"fps": 3, "cap_pixels_per_frame": True, "max_video_tokens": 4,
                      "size": {"shortest_edge": 28 * 28, "longest_edge": 28 * 28 * 64}}),
]


def video_reference(tensors: dict, meta: dict) -> None:
    frames = video_frames()
    save_file({"frames": frames}, str(OUT / "video_frames.safetensors"))
    cases = []
    for name, fps, kw in VIDEO_CASES:
        kw = dict(kw)
        kw.setdefault("cap_pixels_per_frame", False)
        init = {"max_video_tokens": kw.pop("max_video_tokens")} if "max_video_tokens" in kw else {}
        # max_video_tokens is read from the instance, not the call.
        proc = Qwen2VLVideoProcessor(image_mean=MEAN, image_std=STD, **init)
        call = dict(kw)
        video = frames
        indices = list(range(len(frames)))
        if fps is not None:
            call["do_sample_frames"] = True
            call["video_metadata"] = [{"fps": fps, "total_num_frames": len(frames)}]
            # The same sampler the processor runs, for the indices.
            from transformers.video_utils import VideoMetadata
            md = VideoMetadata(total_num_frames=len(frames), fps=fps)
            indices = proc.sample_frames(md, fps=kw.get("fps"), max_frames=kw.get("max_frames")).tolist()
        else:
            call["do_sample_frames"] = False
        out = proc(videos=[video], return_tensors="pt", **call)
        pv = out["pixel_values_videos"].numpy().astype(np.float32)
        grid = out["video_grid_thw"][0].numpy().astype(np.int64)
        tensors[f"{name}.pixel_values"] = np.ascontiguousarray(pv)
        tensors[f"{name}.grid_thw"] = grid
        tensors[f"{name}.frame_indices"] = np.array(indices, dtype=np.int64)
        total_pixels = int(init["max_video_tokens"] * 28 * 28 * 0.9) if kw.get("cap_pixels_per_frame") else None
        cases.append({"case": name, "source_fps": fps, "fps": kw.get("fps"), "max_frames": kw.get("max_frames"),
                      "min_pixels": kw["size"]["shortest_edge"], "max_pixels": kw["size"]["longest_edge"],
                      "total_pixels": total_pixels, "grid_thw": grid.tolist(), "shape": list(pv.shape),
                      "frame_indices": indices})
    meta["video_cases"] = cases


# Resizer parity on noise (the harshest case for rounding): (out_w, out_h) from
# a 97x83 input, up, down, mixed, one axis only, to one pixel, and shapes that
# make Pillow run its vertical pass first.
RESIZE_SIZES = [(28, 28), (56, 28), (97, 83), (194, 166), (50, 83), (97, 40), (13, 7), (1, 1),
                (1, 83), (97, 1), (300, 250), (60, 20), (20, 60), (33, 80), (90, 20), (96, 41),
                (150, 30), (7, 200), (98, 84), (48, 41), (112, 56), (84, 112), (5, 82), (96, 3)]


def fnv1a64(data: bytes) -> str:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def resize_reference(tensors: dict, meta: dict) -> None:
    import torchvision.transforms.v2.functional as tvF

    src = rng(50).integers(0, 256, (83, 97, 3), dtype=np.uint8)
    tensors["resize.source"] = src
    cases = []
    t = torch.from_numpy(src).permute(2, 0, 1)[None]
    for w, h in RESIZE_SIZES:
        pil = np.array(Image.fromarray(src).resize((w, h), Image.BICUBIC))
        tv = tvF.resize(t, [h, w], interpolation=tvF.InterpolationMode.BICUBIC, antialias=True)
        tv = tv[0].permute(1, 2, 0).contiguous().numpy()
        cases.append({"width": w, "height": h, "pil_fnv1a64": fnv1a64(pil.tobytes()),
                      "torch_fnv1a64": fnv1a64(tv.tobytes()),
                      "pil_vs_torch_max_diff": int(np.abs(pil.astype(int) - tv.astype(int)).max())})
    meta["resize_cases"] = cases


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


CLIPS = {
    # name: ffmpeg output args
    "clip_h264.mp4": ["-c:v", "libx264", "-profile:v", "baseline", "-pix_fmt", "yuv420p", "-crf", "18",
                      "-preset", "medium", "-x264-params", "keyint=4"],
    "clip_h264_high.mp4": ["-c:v", "libx264", "-profile:v", "high", "-pix_fmt", "yuv420p", "-crf", "18",
                           "-preset", "medium", "-bf", "2"],
    "clip_vp9.webm": ["-c:v", "libvpx-vp9", "-pix_fmt", "yuv420p", "-crf", "20", "-b:v", "0", "-g", "4"],
    "clip_vp8_key.webm": ["-c:v", "libvpx", "-pix_fmt", "yuv420p", "-crf", "8", "-b:v", "1M", "-g", "1"],
    "clip_vp8.webm": ["-c:v", "libvpx", "-pix_fmt", "yuv420p", "-crf", "8", "-b:v", "1M", "-g", "30"],
}


def clip_frames() -> np.ndarray:
    """10 frames of 48x64, smooth content moving diagonally (5 fps)."""
    base = photo_like(40, 96, 128)
    frames = []
    for t in range(10):
        f = base[3 * t:3 * t + 48, 4 * t:4 * t + 64].astype(np.int16)
        f[30:40, 5 + 5 * t:15 + 5 * t] = [40, 200, 90]
        frames.append(np.clip(f, 0, 255).astype(np.uint8))
    return np.stack(frames)


def write_clips(meta: dict) -> None:
    frames = clip_frames()
    raw = OUT / "_clip_src.rgb"
    raw.write_bytes(frames.tobytes())
    decoded = {}
    for name, args in CLIPS.items():
        path = OUT / name
        run("ffmpeg", "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "64x48",
            "-r", "5", "-i", str(raw), *args, "-an", "-fflags", "+bitexact", "-map_metadata", "-1", str(path))
        out = subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(path), "-f", "rawvideo",
                              "-pix_fmt", "rgb24", "-"], check=True, capture_output=True).stdout
        decoded[f"{name}.frames"] = np.frombuffer(out, np.uint8).reshape(-1, 48, 64, 3).copy()
    raw.unlink()
    # The VP8 inter-frame clip is only decoded to be refused.
    counts = {n: int(decoded[f"{n}.frames"].shape[0]) for n in CLIPS}
    del decoded["clip_vp8.webm.frames"]
    save_file(decoded, str(OUT / "clip_frames.safetensors"))
    meta["clips"] = {n: {"frames": counts[n], "fps": 5} for n in CLIPS}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    warnings.simplefilter("ignore")
    (OUT / "preprocessor_config.json").write_text(json.dumps(IMAGE_CONFIG, indent=2) + "\n")
    (OUT / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_CONFIG, indent=2) + "\n")
    write_images()
    tensors: dict = {}
    meta: dict = {}
    image_reference(tensors, meta)
    video_reference(tensors, meta)
    resize_reference(tensors, meta)
    save_file(tensors, str(OUT / "reference.safetensors"))
    write_clips(meta)
    ffmpeg_version = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout.split("\n")[0]
    meta["versions"] = {"transformers": transformers.__version__, "torch": torch.__version__,
                        "pillow": PIL.__version__, "numpy": np.__version__, "ffmpeg": ffmpeg_version}
    meta["sha256"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                      for p in sorted(OUT.iterdir()) if p.name != "reference.json"}
    (OUT / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"wrote {len(list(OUT.iterdir()))} files, {total / 1e6:.2f} MB, to {OUT}")


if __name__ == "__main__":
    main()
