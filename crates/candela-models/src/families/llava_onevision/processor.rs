//! LLaVA-OneVision's image and video processing (transformers'
//! `LlavaOnevisionImageProcessor` PIL backend, `LlavaOnevisionVideoProcessor`
//! and `LlavaOnevisionProcessor`'s token counts).
//!
//! An image alone in its prompt: the best pinpoint resolution for its size, the image resized
//! into it keeping its aspect ratio (Pillow bicubic) and centred on black,
//! cut into tiles of the tower's square; before them the whole image resized
//! to that square; each rescaled and normalized. `<image>` expands to one
//! token per row the encoder packs (base image, unpadded map, newlines).
//! An image of a prompt with several ("multi-image" mode, the processor's
//! `batch_num_images`): only the image padded to a square with the mean
//! colour and resized to the tower's square; `<image>` expands to its
//! patches plus one newline. Videos do not count as images.
//! A video: every frame (or `num_frames` spread evenly) resized to the
//! square as the torch-based video processor does (uint8 antialiased
//! bicubic), rescaled and normalized; `<video>` expands to 2x2-pooled
//! patches per frame plus one.

use std::sync::Arc;

use candela_core::request::MmFeatures;
use candela_media::image::{decode_image, resize_rgb8, DecodedImage, ResampleKernel};
use candela_media::video::decode_video;
use candela_media::{MediaError, Modality};
use candle_core::{Device, Tensor};
use serde_json::Value;

use super::{Anyres, OnevisionConfig, IMAGE_GRID, PIXEL_VALUES, PIXEL_VALUES_VIDEOS};
use crate::families::llava::ClipImageConfig;
use crate::processor::{
    DecodeOptions, FrameLoss, ItemLayout, MediaData, MmProcessor, ProcessedItem, PromptItems,
};

#[derive(Debug, Clone)]
pub struct OnevisionProcessor {
    /// Resize to the tower's square, rescale, normalize (images).
    image: ClipImageConfig,
    /// The same for video frames (`video_preprocessor_config.json`).
    video: ClipImageConfig,
    kernel: ResampleKernel,
    anyres: Anyres,
    image_token: u32,
    video_token: u32,
}

/// A preprocessor config as CLIP's processor reads it: the tower's square,
/// no crop (LLaVA-OneVision's `do_pad` pads batches, not images).
fn square_config(json: &str, tile: usize) -> Result<ClipImageConfig, String> {
    let mut v: Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let o = v
        .as_object_mut()
        .ok_or("the preprocessor config is not a JSON object")?;
    o.insert("do_pad".into(), Value::Bool(false));
    if o.get("do_center_crop").is_none_or(Value::is_null) {
        o.insert("do_center_crop".into(), Value::Bool(false));
    }
    o.entry("size")
        .or_insert(serde_json::json!({"height": tile, "width": tile}));
    for (k, v) in [
        ("image_mean", [0.481_454_66, 0.457_827_5, 0.408_210_73]),
        ("image_std", [0.268_629_54, 0.261_302_6, 0.275_777_1]),
    ] {
        o.entry(k).or_insert(serde_json::json!(v));
    }
    ClipImageConfig::from_preprocessor_config(&v.to_string(), tile)
}

impl OnevisionProcessor {
    /// From `preprocessor_config.json` (and `video_preprocessor_config.json`
    /// when the folder has one), checked against the model.
    pub fn new(
        image_json: &str,
        video_json: Option<&str>,
        cfg: &OnevisionConfig,
    ) -> Result<Self, String> {
        let tile = cfg.anyres.tile;
        let image = square_config(image_json, tile)?;
        let video = match video_json {
            Some(j) => {
                square_config(j, tile).map_err(|e| format!("video preprocessor config: {e}"))?
            }
            None => image.clone(),
        };
        let pp: Value = serde_json::from_str(image_json).map_err(|e| e.to_string())?;
        if let Some(p) = pp.get("image_grid_pinpoints") {
            let p: Vec<[usize; 2]> =
                serde_json::from_value(p.clone()).map_err(|e| e.to_string())?;
            if p != cfg.anyres.pinpoints {
                return Err(format!(
                    "image_grid_pinpoints {p:?} differ from the model config's {:?}",
                    cfg.anyres.pinpoints
                ));
            }
        }
        let kernel = match image.resample {
            2 => ResampleKernel::PilBilinear,
            _ => ResampleKernel::Pil,
        };
        Ok(Self {
            image,
            video,
            kernel,
            anyres: cfg.anyres.clone(),
            image_token: cfg.image_token_id,
            video_token: cfg.video_token_id,
        })
    }

    /// Base image and tiles, `[1 + rows * cols, 3, s, s]`, and the item's
    /// rows; with `tiled` false (a prompt of several images) the base image
    /// alone, padded to a square first, as a 0x0 grid.
    pub fn image(&self, img: &DecodedImage, tiled: bool) -> Result<ProcessedItem, MediaError> {
        if !tiled {
            return self.base_only(img);
        }
        let s = self.anyres.tile;
        let (h, w) = (img.height as usize, img.width as usize);
        let (rows, cols) = self.anyres.tiles(h, w);
        let (bh, bw) = (rows * s, cols * s);
        // get_patch_output_size: fit inside the pinpoint, aspect ratio kept.
        let (sw, sh) = (bw as f64 / w as f64, bh as f64 / h as f64);
        let (nh, nw) = if sw < sh {
            (((h as f64 * sw).ceil() as usize).min(bh), bw)
        } else {
            (bh, ((w as f64 * sh).ceil() as usize).min(bw))
        };
        let resized = resize_rgb8(&img.rgb, w, h, nw, nh, self.kernel);
        let (top, left) = ((bh - nh) / 2, (bw - nw) / 2);
        let mut padded = vec![0u8; bh * bw * 3];
        for y in 0..nh {
            let dst = ((top + y) * bw + left) * 3;
            padded[dst..dst + nw * 3].copy_from_slice(&resized[y * nw * 3..(y + 1) * nw * 3]);
        }
        let mut pixels = self.image.process(img);
        for r in 0..rows {
            for c in 0..cols {
                let mut tile = Vec::with_capacity(s * s * 3);
                for y in 0..s {
                    let src = ((r * s + y) * bw + c * s) * 3;
                    tile.extend_from_slice(&padded[src..src + s * 3]);
                }
                let tile = DecodedImage::from_rgb8(s as u32, s as u32, tile)?;
                pixels.extend(self.image.process(&tile));
            }
        }
        let n = 1 + rows * cols;
        let pixels = Tensor::from_vec(pixels, (n, 3, s, s), &Device::Cpu).map_err(tensor_err)?;
        let grid = Tensor::from_vec(
            vec![h as u32, w as u32, rows as u32, cols as u32],
            4,
            &Device::Cpu,
        )
        .map_err(tensor_err)?;
        let packing = self.anyres.packing(h, w, rows, cols);
        Ok(ProcessedItem {
            features: Arc::new(MmFeatures {
                tensors: vec![(PIXEL_VALUES.into(), pixels), (IMAGE_GRID.into(), grid)],
            }),
            layout: ItemLayout::rows(packing.rows(self.anyres.grid)),
        })
    }

    /// `pad_to_square` (centred on the mean colour) then the tower's square.
    fn base_only(&self, img: &DecodedImage) -> Result<ProcessedItem, MediaError> {
        let s = self.anyres.tile;
        let (h, w) = (img.height as usize, img.width as usize);
        let side = h.max(w);
        let fill = self.image.image_mean.map(|m| (m as f64 * 255.0) as u8);
        let mut square: Vec<u8> = std::iter::repeat_n(fill, side * side).flatten().collect();
        let (top, left) = ((side - h) / 2, (side - w) / 2);
        for y in 0..h {
            let dst = ((top + y) * side + left) * 3;
            square[dst..dst + w * 3].copy_from_slice(&img.rgb[y * w * 3..(y + 1) * w * 3]);
        }
        let square = DecodedImage::from_rgb8(side as u32, side as u32, square)?;
        let pixels = Tensor::from_vec(self.image.process(&square), (1, 3, s, s), &Device::Cpu)
            .map_err(tensor_err)?;
        let grid = Tensor::from_vec(vec![h as u32, w as u32, 0, 0], 4, &Device::Cpu)
            .map_err(tensor_err)?;
        let g = self.anyres.grid;
        Ok(ProcessedItem {
            features: Arc::new(MmFeatures {
                tensors: vec![(PIXEL_VALUES.into(), pixels), (IMAGE_GRID.into(), grid)],
            }),
            layout: ItemLayout::rows(g * g + 1),
        })
    }

    /// Frames (already sampled) -> `[frames, 3, s, s]` and the item's rows.
    pub fn video(
        &self,
        frames: &[DecodedImage],
        lost: FrameLoss,
    ) -> Result<ProcessedItem, MediaError> {
        if frames.is_empty() {
            return Err(MediaError::Empty("video has no frames".into()));
        }
        let s = self.anyres.tile;
        let mut pixels = Vec::with_capacity(frames.len() * 3 * s * s);
        for f in frames {
            // The video processor resizes with torch (uint8, antialiased bicubic).
            let (w, h) = (f.width as usize, f.height as usize);
            let rgb = resize_rgb8(&f.rgb, w, h, s, s, ResampleKernel::TorchUint8);
            pixels.extend(
                self.video
                    .process(&DecodedImage::from_rgb8(s as u32, s as u32, rgb)?),
            );
        }
        let pixels =
            Tensor::from_vec(pixels, (frames.len(), 3, s, s), &Device::Cpu).map_err(tensor_err)?;
        let mut layout = ItemLayout::rows(self.anyres.video_rows(frames.len()));
        layout.frames = lost;
        Ok(ProcessedItem {
            features: Arc::new(MmFeatures {
                tensors: vec![(PIXEL_VALUES_VIDEOS.into(), pixels)],
            }),
            layout,
        })
    }
}

fn tensor_err(e: candle_core::Error) -> MediaError {
    MediaError::Invalid(format!("processed pixels: {e}"))
}

/// Whether the prompt's images are tiled: only an image alone in its prompt
/// is (transformers' `need_patching`).
fn tiled(prompt: &PromptItems) -> bool {
    prompt.count(Modality::Image) <= 1
}

/// A video's `num_frames` (transformers' `sample_frames`); None keeps all.
/// Images take no option (a request's `num_frames` leaves its images alone).
fn num_frames(kwargs: &Value) -> Result<Option<usize>, MediaError> {
    let bad = |m: String| MediaError::Invalid(format!("LLaVA-OneVision processor kwargs: {m}"));
    let Some(o) = kwargs.as_object() else {
        return match kwargs {
            Value::Null => Ok(None),
            other => Err(bad(format!("expected an object, got {other}"))),
        };
    };
    let mut n = None;
    for (k, v) in o.iter().filter(|(_, v)| !v.is_null()) {
        if k != "num_frames" {
            return Err(bad(format!(
                "{k:?} is not an option of this model (videos take num_frames)"
            )));
        }
        let frames = v
            .as_u64()
            .filter(|&n| n > 0)
            .ok_or_else(|| bad(format!("num_frames must be a positive integer, got {v}")))?;
        n = Some(frames as usize);
    }
    Ok(n)
}

/// `torch.arange(0, total, total / n).int()`: `n` frames spread evenly.
fn spread(total: usize, n: Option<usize>) -> Vec<usize> {
    match n {
        Some(n) if n < total => {
            let step = total as f64 / n as f64;
            (0..n).map(|i| (i as f64 * step) as usize).collect()
        }
        _ => (0..total).collect(),
    }
}

impl MmProcessor for OnevisionProcessor {
    fn modalities(&self) -> &[Modality] {
        &[Modality::Image, Modality::Video]
    }

    fn placeholder_token(&self, modality: Modality) -> Option<u32> {
        match modality {
            Modality::Image => Some(self.image_token),
            Modality::Video => Some(self.video_token),
            _ => None,
        }
    }

    fn kwargs_key(&self, modality: Modality, kwargs: &Value) -> Result<String, MediaError> {
        Ok(match (modality, num_frames(kwargs)?) {
            (Modality::Video, Some(n)) => format!("num_frames={n}"),
            _ => "{}".into(),
        })
    }

    fn prompt_key(&self, modality: Modality, prompt: &PromptItems) -> String {
        match (modality, tiled(prompt)) {
            (Modality::Image, false) => "multi_image".into(),
            _ => String::new(),
        }
    }

    fn process(
        &self,
        modality: Modality,
        data: &MediaData,
        kwargs: &Value,
        opts: &DecodeOptions,
        prompt: &PromptItems,
    ) -> Result<ProcessedItem, MediaError> {
        let n = num_frames(kwargs)?;
        match (modality, data) {
            (Modality::Image, MediaData::Encoded { bytes, .. }) => {
                self.image(&decode_image(bytes, &opts.image)?, tiled(prompt))
            }
            (Modality::Video, MediaData::Frames(frames)) => {
                let picked = spread(frames.len(), n)
                    .into_iter()
                    .map(|i| decode_image(&frames[i], &opts.image))
                    .collect::<Result<Vec<_>, _>>()?;
                self.video(&picked, FrameLoss::default())
            }
            (Modality::Video, MediaData::Encoded { bytes, .. }) => {
                let d = decode_video(bytes, &opts.video, |total, _| Ok(spread(total, n)))?;
                let lost = FrameLoss {
                    recovered: d.recovered,
                    dropped: d.dropped,
                };
                self.video(&d.frames, lost)
            }
            (m, _) => Err(MediaError::Invalid(format!(
                "this model takes images and videos, not a {} item of this form",
                m.name()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kwargs_and_frame_spread() {
        assert_eq!(num_frames(&Value::Null).unwrap(), None);
        let four = serde_json::json!({"num_frames": 4});
        assert_eq!(num_frames(&four).unwrap(), Some(4));
        for bad in [
            serde_json::json!({"num_frames": 0}),
            serde_json::json!({"max_pixels": 9}),
            serde_json::json!(3),
        ] {
            assert!(num_frames(&bad).is_err(), "{bad}");
        }
        // torch.arange(0, 10, 10 / 4).int() = [0, 2, 5, 7]
        assert_eq!(spread(10, Some(4)), vec![0, 2, 5, 7]);
        assert_eq!(spread(3, Some(8)), vec![0, 1, 2]);
        assert_eq!(spread(3, None), vec![0, 1, 2]);
    }
}
