//! The Qwen2-VL / Qwen2.5-VL image processor, matching Hugging Face's PIL-based
//! `Qwen2VLImageProcessorPil` (the "slow" processor): `smart_resize` to a
//! multiple of `patch_size * merge_size` within [min_pixels, max_pixels], PIL
//! bicubic resize of the uint8 image, rescale by 1/255 and normalise in f32,
//! then patchify into `[grid_t * grid_h * grid_w, C * temporal_patch_size *
//! patch_size^2]` rows in HF's order (merge windows contiguous).

use serde::Deserialize;
use serde_json::Value;

use super::decode::DecodedImage;
use super::resize::{resize_rgb8, ResampleKernel};
use crate::MediaError;

/// Preprocessing constants of one checkpoint (from `preprocessor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen2VlProcessorConfig {
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    pub rescale_factor: f64,
    pub do_resize: bool,
    pub do_rescale: bool,
    pub do_normalize: bool,
    /// `size.shortest_edge` (a pixel count for this processor, despite the name).
    pub min_pixels: u64,
    /// `size.longest_edge`.
    pub max_pixels: u64,
}

/// Per-request pixel bounds (vLLM's `mm_processor_kwargs`); `None` keeps the
/// checkpoint's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImageOverrides {
    pub min_pixels: Option<u64>,
    pub max_pixels: Option<u64>,
}

/// Model-ready pixels: `pixel_values` is row-major `[rows, cols]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedVision {
    pub pixel_values: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
    /// (grid_t, grid_h, grid_w) in patches; rows = t * h * w.
    pub grid_thw: [usize; 3],
}

/// Placeholder tokens an item expands to: its patches after the merger.
pub fn num_placeholder_tokens(grid_thw: [usize; 3], merge_size: usize) -> usize {
    let m2 = (merge_size * merge_size).max(1);
    grid_thw[0] * grid_thw[1] * grid_thw[2] / m2
}

/// OpenAI CLIP mean / std, the class defaults.
const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

#[derive(Deserialize, Default)]
struct RawSize {
    shortest_edge: Option<u64>,
    longest_edge: Option<u64>,
    min_pixels: Option<u64>,
    max_pixels: Option<u64>,
}

#[derive(Deserialize, Default)]
pub(crate) struct RawConfig {
    min_pixels: Option<u64>,
    max_pixels: Option<u64>,
    size: Option<RawSize>,
    patch_size: Option<usize>,
    temporal_patch_size: Option<usize>,
    merge_size: Option<usize>,
    image_mean: Option<Value>,
    image_std: Option<Value>,
    rescale_factor: Option<f64>,
    do_resize: Option<bool>,
    do_rescale: Option<bool>,
    do_normalize: Option<bool>,
    resample: Option<u32>,
    // Video processor fields (ignored for images).
    pub(crate) fps: Option<f64>,
    pub(crate) min_frames: Option<usize>,
    pub(crate) max_frames: Option<usize>,
}

fn bad(what: impl std::fmt::Display) -> MediaError {
    MediaError::Invalid(format!("preprocessor_config.json: {what}"))
}

fn triple(v: Option<&Value>, name: &str, default: [f32; 3]) -> Result<[f32; 3], MediaError> {
    match v {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Number(n)) => {
            let x = n
                .as_f64()
                .ok_or_else(|| bad(format!("{name} is not a number")))? as f32;
            Ok([x; 3])
        }
        Some(Value::Array(a)) if a.len() == 3 => {
            let mut out = [0f32; 3];
            for (o, x) in out.iter_mut().zip(a) {
                *o = x
                    .as_f64()
                    .ok_or_else(|| bad(format!("{name} must hold numbers")))?
                    as f32;
            }
            Ok(out)
        }
        Some(_) => Err(bad(format!(
            "{name} must be a number or a list of 3 numbers"
        ))),
    }
}

impl RawConfig {
    pub(crate) fn parse(json: &str) -> Result<Self, MediaError> {
        serde_json::from_str(json).map_err(bad)
    }

    /// HF's precedence: `size` (else the class default), then top-level
    /// `min_pixels` / `max_pixels` override it.
    pub(crate) fn into_config(
        self,
        default_min: u64,
        default_max: u64,
    ) -> Result<Qwen2VlProcessorConfig, MediaError> {
        let size = self.size.unwrap_or_default();
        let min_pixels = self
            .min_pixels
            .or(size.shortest_edge)
            .or(size.min_pixels)
            .unwrap_or(default_min);
        let max_pixels = self
            .max_pixels
            .or(size.longest_edge)
            .or(size.max_pixels)
            .unwrap_or(default_max);
        let cfg = Qwen2VlProcessorConfig {
            patch_size: self.patch_size.unwrap_or(14),
            temporal_patch_size: self.temporal_patch_size.unwrap_or(2),
            merge_size: self.merge_size.unwrap_or(2),
            image_mean: triple(self.image_mean.as_ref(), "image_mean", CLIP_MEAN)?,
            image_std: triple(self.image_std.as_ref(), "image_std", CLIP_STD)?,
            rescale_factor: self.rescale_factor.unwrap_or(1.0 / 255.0),
            do_resize: self.do_resize.unwrap_or(true),
            do_rescale: self.do_rescale.unwrap_or(true),
            do_normalize: self.do_normalize.unwrap_or(true),
            min_pixels,
            max_pixels,
        };
        // 3 is PIL's BICUBIC, the only filter these processors use.
        if let Some(r) = self.resample.filter(|&r| r != 3) {
            return Err(bad(format!(
                "resample {r} is not supported (only 3, bicubic)"
            )));
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

impl Default for Qwen2VlProcessorConfig {
    /// The class defaults of `Qwen2VLImageProcessor`.
    fn default() -> Self {
        RawConfig::default()
            .into_config(56 * 56, 28 * 28 * 1280)
            .expect("class defaults are valid")
    }
}

impl Qwen2VlProcessorConfig {
    /// Parse a checkpoint's `preprocessor_config.json` (missing keys take the
    /// class defaults).
    pub fn from_preprocessor_config(json: &str) -> Result<Self, MediaError> {
        RawConfig::parse(json)?.into_config(56 * 56, 28 * 28 * 1280)
    }

    fn validate(&self) -> Result<(), MediaError> {
        if self.patch_size == 0 || self.patch_size > 1024 {
            return Err(bad("patch_size must be in 1..=1024"));
        }
        if self.merge_size == 0 || self.merge_size > 64 {
            return Err(bad("merge_size must be in 1..=64"));
        }
        if self.temporal_patch_size == 0 || self.temporal_patch_size > 64 {
            return Err(bad("temporal_patch_size must be in 1..=64"));
        }
        if self.image_std.iter().any(|s| !s.is_finite() || *s == 0.0)
            || self.image_mean.iter().any(|m| !m.is_finite())
        {
            return Err(bad("image_mean / image_std must be finite, std non-zero"));
        }
        if !(self.rescale_factor.is_finite() && self.rescale_factor > 0.0) {
            return Err(bad("rescale_factor must be positive"));
        }
        Ok(())
    }

    /// `patch_size * merge_size`: resized sides are multiples of it.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// The pixel bounds in force for a request.
    pub fn bounds(&self, ov: &ImageOverrides) -> Result<(u64, u64), MediaError> {
        let min = ov.min_pixels.unwrap_or(self.min_pixels);
        let max = ov.max_pixels.unwrap_or(self.max_pixels);
        if min > max {
            return Err(MediaError::Invalid(format!(
                "min_pixels ({min}) must not exceed max_pixels ({max})"
            )));
        }
        Ok((min, max))
    }

    /// The (height, width) an image of this size is resized to, without pixels
    /// (what vLLM's `get_number_of_image_patches` needs).
    pub fn resized_size(
        &self,
        height: usize,
        width: usize,
        ov: &ImageOverrides,
    ) -> Result<(usize, usize), MediaError> {
        let (min, max) = self.bounds(ov)?;
        if !self.do_resize {
            return Ok((height, width));
        }
        smart_resize(height, width, self.factor(), min, max)
    }

    /// Placeholder tokens for an item with this grid.
    pub fn num_placeholder_tokens(&self, grid_thw: [usize; 3]) -> usize {
        num_placeholder_tokens(grid_thw, self.merge_size)
    }

    /// One image -> `pixel_values` `[grid_h * grid_w, 3 * temporal_patch_size *
    /// patch_size^2]` and `image_grid_thw` `(1, grid_h, grid_w)`; the image
    /// stands for every frame of its one temporal patch.
    pub fn process_image(
        &self,
        img: &DecodedImage,
        ov: &ImageOverrides,
    ) -> Result<ProcessedVision, MediaError> {
        let (h, w) = (img.height as usize, img.width as usize);
        let (rh, rw) = self.resized_size(h, w, ov)?;
        if (rh, rw) == (h, w) {
            return self.process_resized(img);
        }
        let resized = resize_rgb8(&img.rgb, w, h, rw, rh, ResampleKernel::Pil);
        self.patches_of(&resized, rh, rw)
    }

    /// An image already at its [`Self::resized_size`] (from
    /// [`super::decode_image_resized`] with that target) -> what
    /// [`Self::process_image`] gives for the original.
    pub fn process_resized(&self, img: &DecodedImage) -> Result<ProcessedVision, MediaError> {
        let (h, w) = (img.height as usize, img.width as usize);
        let f = self.factor();
        if self.do_resize && !(h.is_multiple_of(f) && w.is_multiple_of(f)) {
            return Err(MediaError::Invalid(format!(
                "a resized image must have sides that are multiples of {f}, got {w}x{h}"
            )));
        }
        self.patches_of(&img.rgb, h, w)
    }

    fn patches_of(
        &self,
        pixels: &[u8],
        rh: usize,
        rw: usize,
    ) -> Result<ProcessedVision, MediaError> {
        let plane = self.normalize_pil(pixels, rh, rw);
        let frames: Vec<&[f32]> = vec![&plane; self.temporal_patch_size];
        patchify(
            &frames,
            rh,
            rw,
            self.patch_size,
            self.merge_size,
            self.temporal_patch_size,
        )
    }

    /// HWC uint8 -> CHW f32 the way the numpy processor does it: rescale in f64
    /// then cast to f32, then `(x - mean) / std` in f32.
    fn normalize_pil(&self, rgb: &[u8], h: usize, w: usize) -> Vec<f32> {
        let n = h * w;
        let mut out = vec![0f32; 3 * n];
        for c in 0..3 {
            let (mean, std) = (self.image_mean[c], self.image_std[c]);
            let dst = &mut out[c * n..(c + 1) * n];
            for (d, px) in dst.iter_mut().zip(rgb.chunks_exact(3)) {
                let v = px[c];
                let mut x = if self.do_rescale {
                    (v as f64 * self.rescale_factor) as f32
                } else {
                    v as f32
                };
                if self.do_normalize {
                    x = (x - mean) / std;
                }
                *d = x;
            }
        }
        out
    }

    /// HWC uint8 -> CHW f32 the way the torch video processor does it: rescale
    /// fused into the normalisation, `(x - mean/rescale) / (std/rescale)` in f32.
    pub(crate) fn normalize_torch(&self, rgb: &[u8], h: usize, w: usize) -> Vec<f32> {
        if !(self.do_rescale && self.do_normalize) {
            return self.normalize_pil(rgb, h, w);
        }
        let inv = (1.0 / self.rescale_factor) as f32;
        let n = h * w;
        let mut out = vec![0f32; 3 * n];
        for c in 0..3 {
            let mean = self.image_mean[c] * inv;
            let std = self.image_std[c] * inv;
            let dst = &mut out[c * n..(c + 1) * n];
            for (d, px) in dst.iter_mut().zip(rgb.chunks_exact(3)) {
                *d = (px[c] as f32 - mean) / std;
            }
        }
        out
    }
}

/// Hugging Face's `smart_resize`, with Python's float semantics (round half to
/// even, true division): both sides become multiples of `factor`, the area
/// lands in [min_pixels, max_pixels] where it can, the aspect ratio is kept.
pub fn smart_resize(
    height: usize,
    width: usize,
    factor: usize,
    min_pixels: u64,
    max_pixels: u64,
) -> Result<(usize, usize), MediaError> {
    if height == 0 || width == 0 {
        return Err(MediaError::Empty(format!(
            "image has no pixels ({width}x{height})"
        )));
    }
    if factor == 0 {
        return Err(MediaError::Invalid("resize factor must be positive".into()));
    }
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    let ratio = h.max(w) / h.min(w);
    if ratio > 200.0 {
        return Err(MediaError::Invalid(format!(
            "absolute aspect ratio must be smaller than 200, got {ratio} ({width}x{height})"
        )));
    }
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    let area = (height as u64 * width as u64) as f64;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = (area / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / area).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    // Past 2^20 per side the patch count alone is absurd; also keeps the
    // casts below exact.
    const SIDE_CAP: f64 = (1u64 << 20) as f64;
    if !(h_bar >= f && w_bar >= f && h_bar <= SIDE_CAP && w_bar <= SIDE_CAP) {
        return Err(MediaError::Invalid(format!(
            "cannot resize {width}x{height} within min_pixels={min_pixels}, \
             max_pixels={max_pixels} (got {w_bar}x{h_bar})"
        )));
    }
    Ok((h_bar as usize, w_bar as usize))
}

/// Frames (CHW f32 planes of `h x w`, a multiple of `temporal_patch_size` of
/// them) -> HF's flattened patches: rows ordered (t, h-block, w-block, h-in-
/// block, w-in-block) so each merge window is `merge_size^2` consecutive rows;
/// columns ordered (channel, frame-in-patch, y, x).
pub(crate) fn patchify(
    frames: &[&[f32]],
    h: usize,
    w: usize,
    patch: usize,
    merge: usize,
    tps: usize,
) -> Result<ProcessedVision, MediaError> {
    let unit = patch * merge;
    if !h.is_multiple_of(unit) || !w.is_multiple_of(unit) {
        return Err(MediaError::Invalid(format!(
            "{w}x{h} is not a multiple of patch_size * merge_size = {unit} \
             (enable resizing or resize the input)"
        )));
    }
    if frames.is_empty() || !frames.len().is_multiple_of(tps) {
        return Err(MediaError::Invalid(format!(
            "{} frames is not a multiple of temporal_patch_size {tps}",
            frames.len()
        )));
    }
    let (gt, gh, gw) = (frames.len() / tps, h / patch, w / patch);
    let rows = gt * gh * gw;
    let cols = 3 * tps * patch * patch;
    let plane = h * w;
    let mut out = Vec::with_capacity(rows * cols);
    for t in 0..gt {
        for bh in 0..gh / merge {
            for bw in 0..gw / merge {
                for mh in 0..merge {
                    for mw in 0..merge {
                        let (y0, x0) = ((bh * merge + mh) * patch, (bw * merge + mw) * patch);
                        for c in 0..3 {
                            for frame in &frames[t * tps..(t + 1) * tps] {
                                let chan = &frame[c * plane..(c + 1) * plane];
                                for py in 0..patch {
                                    let s = (y0 + py) * w + x0;
                                    out.extend_from_slice(&chan[s..s + patch]);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(ProcessedVision {
        pixel_values: out,
        rows,
        cols,
        grid_thw: [gt, gh, gw],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_matches_python() {
        // Values computed with transformers' smart_resize.
        let f = 28;
        assert_eq!(
            smart_resize(768, 1024, f, 3136, 1003520).unwrap(),
            (756, 1036)
        );
        assert_eq!(smart_resize(10, 10, f, 3136, 1003520).unwrap(), (56, 56));
        // 70 / 28 = 2.5 rounds to even (2), not up.
        assert_eq!(smart_resize(70, 70, f, 0, u64::MAX).unwrap(), (56, 56));
        assert_eq!(smart_resize(126, 126, f, 0, u64::MAX).unwrap(), (112, 112));
        assert_eq!(
            smart_resize(4000, 3000, f, 3136, 1003520).unwrap(),
            (1148, 840)
        );
        assert!(matches!(
            smart_resize(10, 2001, f, 3136, 1003520),
            Err(MediaError::Invalid(_))
        ));
        assert!(matches!(
            smart_resize(0, 5, f, 1, 2),
            Err(MediaError::Empty(_))
        ));
    }

    #[test]
    fn config_precedence_and_validation() {
        let c = Qwen2VlProcessorConfig::from_preprocessor_config(
            r#"{"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14,
                "temporal_patch_size": 2, "merge_size": 2,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "image_processor_type": "Qwen2VLImageProcessor"}"#,
        )
        .unwrap();
        assert_eq!(
            (c.min_pixels, c.max_pixels, c.factor()),
            (3136, 12845056, 28)
        );
        let c = Qwen2VlProcessorConfig::from_preprocessor_config(
            r#"{"size": {"shortest_edge": 100, "longest_edge": 5000}, "max_pixels": 7000}"#,
        )
        .unwrap();
        assert_eq!((c.min_pixels, c.max_pixels), (100, 7000));
        let d = Qwen2VlProcessorConfig::default();
        assert_eq!((d.min_pixels, d.max_pixels), (3136, 1003520));
        for bad in [
            "nope",
            r#"{"patch_size": 0}"#,
            r#"{"image_std": [1, 0, 1]}"#,
            r#"{"image_mean": [1, 2]}"#,
            r#"{"resample": 2}"#,
        ] {
            assert!(
                matches!(
                    Qwen2VlProcessorConfig::from_preprocessor_config(bad),
                    Err(MediaError::Invalid(_))
                ),
                "{bad}"
            );
        }
        assert!(d
            .bounds(&ImageOverrides {
                min_pixels: Some(10),
                max_pixels: Some(5)
            })
            .is_err());
    }

    #[test]
    fn patchify_order() {
        // 1 channel-distinct frame of 4x4 with patch 2, merge 2: one merge
        // window of 4 patches; values encode (c, y, x).
        let (h, w) = (4, 4);
        let plane: Vec<f32> = (0..3 * h * w).map(|i| i as f32).collect();
        let p = patchify(&[&plane, &plane], h, w, 2, 2, 2).unwrap();
        assert_eq!(p.grid_thw, [1, 2, 2]);
        assert_eq!((p.rows, p.cols), (4, 24));
        // Row 1 = patch (0, 1): channel 0, frame 0, rows y=0,1 at x=2,3.
        assert_eq!(&p.pixel_values[24..28], &[2.0, 3.0, 6.0, 7.0]);
        // Same channel, second frame of the temporal patch repeats it.
        assert_eq!(&p.pixel_values[28..32], &[2.0, 3.0, 6.0, 7.0]);
        // Channel 1 follows.
        assert_eq!(p.pixel_values[32], 16.0 + 2.0);
        assert_eq!(num_placeholder_tokens(p.grid_thw, 2), 1);
    }
}
