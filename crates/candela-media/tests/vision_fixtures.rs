//! Images and video against fixtures/vision (made by
//! scripts/make_vision_fixtures.py): decoded pixels against Pillow (+ vLLM's
//! alpha compositing), `pixel_values` / `grid_thw` against transformers'
//! Qwen2VLImageProcessorPil and Qwen2VLVideoProcessor, the resamplers against
//! Pillow and torch. Video files: tests/video_files.rs.

use std::path::PathBuf;

use candela_media::image::{
    decode_image, DecodedImage, ImageOptions, ImageOverrides, Qwen2VlProcessorConfig,
};
use candela_media::video::{Qwen2VlVideoConfig, VideoOverrides};
use safetensors::SafeTensors;
use serde_json::Value;

fn fixture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/vision")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

struct Tensors(Vec<u8>);

impl Tensors {
    fn load(name: &str) -> Self {
        Tensors(fixture(name))
    }
    fn raw(&self, name: &str) -> (Vec<usize>, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.0).unwrap();
        let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        (t.shape().to_vec(), t.data().to_vec())
    }
    fn f32s(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let (s, d) = self.raw(name);
        (
            s,
            d.chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
        )
    }
    fn i64s(&self, name: &str) -> Vec<i64> {
        let (_, d) = self.raw(name);
        d.chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
}

fn meta() -> Value {
    serde_json::from_slice(&fixture("reference.json")).unwrap()
}

fn opt_u64(v: &Value) -> Option<u64> {
    v.as_u64()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn image_config() -> Qwen2VlProcessorConfig {
    let json = String::from_utf8(fixture("preprocessor_config.json")).unwrap();
    Qwen2VlProcessorConfig::from_preprocessor_config(&json).unwrap()
}

fn video_config() -> Qwen2VlVideoConfig {
    let json = String::from_utf8(fixture("video_preprocessor_config.json")).unwrap();
    Qwen2VlVideoConfig::from_preprocessor_config(&json).unwrap()
}

/// Lossless formats decode to exactly what Pillow (+ compositing) gives; lossy
/// ones come from other codec implementations, so they get a bound.
#[test]
fn decoded_pixels_match_pillow() {
    let refs = Tensors::load("reference.safetensors");
    for (file, exact) in [
        ("rgba_alpha.png", true),
        ("la.png", true),
        ("palette.gif", true),
        ("lossless.webp", true),
        ("rgb.bmp", true),
        ("rgb.tiff", true),
        ("small.jpg", false),
        ("lossy.webp", false),
    ] {
        let img = decode_image(&fixture(file), &ImageOptions::default()).unwrap();
        let (shape, want) = refs.raw(&format!("{file}.decoded"));
        assert_eq!(
            shape,
            vec![img.height as usize, img.width as usize, 3],
            "{file}"
        );
        let diffs: Vec<i32> = img
            .rgb
            .iter()
            .zip(&want)
            .map(|(&a, &b)| (a as i32 - b as i32).abs())
            .collect();
        let max = *diffs.iter().max().unwrap();
        let mean = diffs.iter().sum::<i32>() as f64 / diffs.len() as f64;
        eprintln!("{file}: max |diff| {max}, mean {mean:.4}");
        if exact {
            assert_eq!(max, 0, "{file}");
        } else {
            assert!(max <= 3 && mean < 0.5, "{file}: max {max} mean {mean}");
        }
    }
}

/// The processor on the image Pillow decoded (stored) must match HF to 1e-5;
/// lossless files are also run from their bytes through our decoder.
#[test]
fn image_pixel_values_match_transformers() {
    let refs = Tensors::load("reference.safetensors");
    let cfg = image_config();
    let m = meta();
    let mut worst = 0f32;
    for case in m["image_cases"].as_array().unwrap() {
        let name = case["case"].as_str().unwrap();
        let file = case["file"].as_str().unwrap();
        let ov = ImageOverrides {
            min_pixels: opt_u64(&case["min_pixels"]),
            max_pixels: opt_u64(&case["max_pixels"]),
        };
        let (shape, want) = refs.f32s(&format!("{name}.pixel_values"));
        let grid: Vec<usize> = refs
            .i64s(&format!("{name}.grid_thw"))
            .iter()
            .map(|&g| g as usize)
            .collect();
        // Pillow's decode where we have it, else ours (lossless or the photo).
        let st = SafeTensors::deserialize(&refs.0).unwrap();
        let pillow_pixels = st.tensor(&format!("{file}.decoded")).is_ok();
        let img = if pillow_pixels {
            let pillow = refs.raw(&format!("{file}.decoded")).1;
            let d = decode_image(&fixture(file), &ImageOptions::default()).unwrap();
            DecodedImage::from_rgb8(d.width, d.height, pillow).unwrap()
        } else {
            decode_image(&fixture(file), &ImageOptions::default()).unwrap()
        };
        let out = cfg.process_image(&img, &ov).unwrap();
        assert_eq!(out.grid_thw.to_vec(), grid, "{name}");
        assert_eq!(vec![out.rows, out.cols], shape, "{name}");
        let d = max_abs_diff(&out.pixel_values, &want);
        eprintln!("{name}: grid {grid:?}, max |diff| {d:e}");
        if !pillow_pixels && file.ends_with(".jpg") {
            // Our JPEG decoder (zune-jpeg) and libjpeg-turbo differ by up to a
            // few levels (see decoded_pixels_match_pillow); 3/255/std ~ 0.045.
            assert!(d <= 0.05, "{name}: max |diff| {d}");
            continue;
        }
        worst = worst.max(d);
        assert!(d <= 1e-5, "{name}: max |diff| {d}");
        assert_eq!(cfg.num_placeholder_tokens(out.grid_thw), out.rows / 4);
    }
    eprintln!("images: worst max |diff| {worst:e}");
}

/// The 1024x768 photo at the checkpoint's bounds: the grid HF gives, and the
/// same pixel_values summary (the full tensor is not stored).
#[test]
fn photo_default_grid_and_summary() {
    let m = meta();
    let want = &m["photo_default"];
    let img = decode_image(&fixture("photo_1024x768.jpg"), &ImageOptions::default()).unwrap();
    assert_eq!((img.width, img.height), (1024, 768));
    let out = image_config()
        .process_image(&img, &ImageOverrides::default())
        .unwrap();
    let grid: Vec<usize> = want["grid_thw"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(out.grid_thw.to_vec(), grid);
    let mean =
        out.pixel_values.iter().map(|&v| v as f64).sum::<f64>() / out.pixel_values.len() as f64;
    let want_mean = want["mean"].as_f64().unwrap();
    eprintln!("photo: grid {grid:?}, mean {mean} vs {want_mean}");
    // The JPEG decoders differ by a level here and there; the mean barely moves.
    assert!((mean - want_mean).abs() < 2e-3, "{mean} vs {want_mean}");
}

fn video_frames() -> Vec<DecodedImage> {
    let t = Tensors::load("video_frames.safetensors");
    let (shape, data) = t.raw("frames");
    let (n, h, w) = (shape[0], shape[1], shape[2]);
    (0..n)
        .map(|i| {
            DecodedImage::from_rgb8(
                w as u32,
                h as u32,
                data[i * h * w * 3..(i + 1) * h * w * 3].to_vec(),
            )
            .unwrap()
        })
        .collect()
}

#[test]
fn video_pixel_values_match_transformers() {
    let refs = Tensors::load("reference.safetensors");
    let cfg = video_config();
    let frames = video_frames();
    let m = meta();
    let mut worst = 0f32;
    for case in m["video_cases"].as_array().unwrap() {
        let name = case["case"].as_str().unwrap();
        let ov = VideoOverrides {
            min_pixels: opt_u64(&case["min_pixels"]),
            max_pixels: opt_u64(&case["max_pixels"]),
            total_pixels: opt_u64(&case["total_pixels"]),
            fps: case["fps"].as_f64(),
            max_frames: case["max_frames"].as_u64().map(|v| v as usize),
        };
        let out = cfg
            .process_video(&frames, case["source_fps"].as_f64(), &ov)
            .unwrap();
        let want_idx: Vec<usize> = refs
            .i64s(&format!("{name}.frame_indices"))
            .iter()
            .map(|&i| i as usize)
            .collect();
        assert_eq!(out.frame_indices, want_idx, "{name}");
        let grid: Vec<usize> = refs
            .i64s(&format!("{name}.grid_thw"))
            .iter()
            .map(|&g| g as usize)
            .collect();
        assert_eq!(out.vision.grid_thw.to_vec(), grid, "{name}");
        let (shape, want) = refs.f32s(&format!("{name}.pixel_values"));
        assert_eq!(vec![out.vision.rows, out.vision.cols], shape, "{name}");
        let d = max_abs_diff(&out.vision.pixel_values, &want);
        eprintln!("{name}: grid {grid:?}, frames {want_idx:?}, max |diff| {d:e}");
        worst = worst.max(d);
        assert!(d <= 1e-5, "{name}: max |diff| {d}");
        if let Some(src) = case["source_fps"].as_f64() {
            let sampled = want_idx.len() as f64 / frames.len() as f64 * src;
            assert!((out.sampled_fps - sampled).abs() < 1e-9);
            assert!((out.second_per_grid_t - 2.0 / sampled).abs() < 1e-9);
        }
    }
    eprintln!("videos: worst max |diff| {worst:e}");
}

fn fnv1a64(data: &[u8]) -> String {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for &b in data {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3);
    }
    format!("{h:016x}")
}

/// Both resamplers are bit-exact with their reference on noise, across up,
/// down, mixed and one-axis resizes (the two references differ by up to 14
/// levels on some of these, so each must be reproduced on its own).
#[test]
fn resamplers_are_bit_exact() {
    use candela_media::image::{resize_rgb8, ResampleKernel};
    let refs = Tensors::load("reference.safetensors");
    let (shape, src) = refs.raw("resize.source");
    let (h, w) = (shape[0], shape[1]);
    let m = meta();
    let cases = m["resize_cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for c in cases {
        let (ow, oh) = (
            c["width"].as_u64().unwrap() as usize,
            c["height"].as_u64().unwrap() as usize,
        );
        for (kernel, key) in [
            (ResampleKernel::Pil, "pil_fnv1a64"),
            (ResampleKernel::TorchUint8, "torch_fnv1a64"),
        ] {
            let out = resize_rgb8(&src, w, h, ow, oh, kernel);
            assert_eq!(out.len(), ow * oh * 3);
            assert_eq!(
                fnv1a64(&out),
                c[key].as_str().unwrap(),
                "{kernel:?} {w}x{h} -> {ow}x{oh}"
            );
        }
    }
}
