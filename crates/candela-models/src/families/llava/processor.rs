//! CLIP image preprocessing (transformers' `CLIPImageProcessor`, PIL
//! backend): shortest edge resized (Pillow bicubic or bilinear), center
//! crop, rescale, normalize; one `<image>` per feature row of the tower.
//! Gemma 3's processor is the same without the crop.

use std::sync::Arc;

use candela_core::request::MmFeatures;
use candela_media::image::{
    decode_image, decode_image_resized, resize_rgb8, DecodedImage, ImageOptions, ResampleKernel,
};
use candela_media::{MediaError, Modality};
use candle_core::{Device, Tensor};
use serde::Deserialize;
use serde_json::Value;

use crate::processor::{
    DecodeOptions, ItemLayout, MediaData, MmProcessor, ProcessedItem, PromptItems,
};

/// `{"shortest_edge": n}` or `{"height": h, "width": w}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Size {
    ShortestEdge { shortest_edge: usize },
    Exact { height: usize, width: usize },
}

fn default_true() -> bool {
    true
}

/// The fields of `preprocessor_config.json` CLIP's processor reads.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipImageConfig {
    #[serde(default = "default_true")]
    pub do_resize: bool,
    pub size: Size,
    #[serde(default = "default_true")]
    pub do_center_crop: bool,
    pub crop_size: Option<Size>,
    #[serde(default = "default_true")]
    pub do_rescale: bool,
    #[serde(default = "default_rescale")]
    pub rescale_factor: f64,
    #[serde(default = "default_true")]
    pub do_normalize: bool,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    /// PIL resampling filter: 3 (bicubic) or 2 (bilinear).
    #[serde(default = "default_resample")]
    pub resample: u32,
    /// LlavaImageProcessor's pad-to-square: not implemented.
    #[serde(default)]
    pub do_pad: bool,
}

fn default_rescale() -> f64 {
    1.0 / 255.0
}
fn default_resample() -> u32 {
    3
}

impl ClipImageConfig {
    /// Parse and check that every image comes out `image_size` square.
    pub fn from_preprocessor_config(json: &str, image_size: usize) -> Result<Self, String> {
        let c: Self = serde_json::from_str(json).map_err(|e| e.to_string())?;
        if !matches!(c.resample, 2 | 3) {
            return Err(format!(
                "resample {} is not supported (3, bicubic; 2, bilinear)",
                c.resample
            ));
        }
        if c.do_pad {
            return Err("do_pad (pad to square) is not supported".into());
        }
        if !c.do_resize {
            return Err("do_resize false is not supported".into());
        }
        let crop = match (c.do_center_crop, c.crop_size) {
            (true, Some(Size::Exact { height, width })) => Some((height, width)),
            (true, _) => return Err("do_center_crop needs crop_size {height, width}".into()),
            (false, _) => None,
        };
        let out = match (c.size, crop) {
            (Size::ShortestEdge { shortest_edge }, Some((h, w))) if shortest_edge >= h.max(w) => {
                (h, w)
            }
            (Size::Exact { height, width }, Some((h, w))) if height >= h && width >= w => (h, w),
            (Size::Exact { height, width }, None) => (height, width),
            (size, crop) => {
                return Err(format!(
                    "size {size:?} with crop {crop:?} does not give a {image_size}px square image"
                ))
            }
        };
        if out != (image_size, image_size) {
            return Err(format!(
                "images come out {}x{} but the vision tower takes {image_size}x{image_size}",
                out.1, out.0
            ));
        }
        Ok(c)
    }

    /// transformers' `get_resize_output_image_size(default_to_square=False)`.
    fn resized(&self, h: usize, w: usize) -> (usize, usize) {
        match self.size {
            Size::Exact { height, width } => (height, width),
            Size::ShortestEdge { shortest_edge: s } => {
                let (short, long) = if w <= h { (w, h) } else { (h, w) };
                let new_long = ((s * long) as f64 / short as f64) as usize;
                if w <= h {
                    (new_long, s)
                } else {
                    (s, new_long)
                }
            }
        }
    }

    fn kernel(&self) -> ResampleKernel {
        match self.resample {
            2 => ResampleKernel::PilBilinear,
            _ => ResampleKernel::Pil,
        }
    }

    /// Decode an image for [`Self::process`]: bicubic configs straight to
    /// the resize's size (idempotent: `process` then keeps it, and a huge
    /// image costs about that size), others at full size.
    pub fn decode(&self, bytes: &[u8], opts: &ImageOptions) -> Result<DecodedImage, MediaError> {
        if self.kernel() != ResampleKernel::Pil {
            return decode_image(bytes, opts);
        }
        let target = |w: u32, h: u32| {
            let (rh, rw) = self.resized(h as usize, w as usize);
            Ok((rw as u32, rh as u32))
        };
        decode_image_resized(bytes, opts, &target)
    }

    /// Decoded RGB8 -> CHW f32 `[3, size, size]`.
    pub fn process(&self, img: &DecodedImage) -> Vec<f32> {
        self.process_rgb(&img.rgb, img.width as usize, img.height as usize)
    }

    /// A `w` x `h` RGB8 image -> CHW f32 `[3, size, size]`.
    pub fn process_rgb(&self, rgb: &[u8], w: usize, h: usize) -> Vec<f32> {
        let (rh, rw) = self.resized(h, w);
        let resized = resize_rgb8(rgb, w, h, rw, rh, self.kernel());
        let (ch, cw, top, left) = match (self.do_center_crop, self.crop_size) {
            // Checked at load: the crop fits inside the resized image.
            (true, Some(Size::Exact { height, width })) => {
                (height, width, (rh - height) / 2, (rw - width) / 2)
            }
            _ => (rh, rw, 0, 0),
        };
        let n = ch * cw;
        let mut out = vec![0f32; 3 * n];
        for c in 0..3 {
            let (mean, std) = (self.image_mean[c], self.image_std[c]);
            for y in 0..ch {
                let row = &resized[((top + y) * rw + left) * 3..((top + y) * rw + left + cw) * 3];
                for (x, px) in row.chunks_exact(3).enumerate() {
                    // numpy: rescale in f64, cast to f32, normalize in f32.
                    let mut v = if self.do_rescale {
                        (px[c] as f64 * self.rescale_factor) as f32
                    } else {
                        px[c] as f32
                    };
                    if self.do_normalize {
                        v = (v - mean) / std;
                    }
                    out[c * n + y * cw + x] = v;
                }
            }
        }
        out
    }
}

/// LLaVA's image processor: every image is one `size` square, and `<image>`
/// expands to one token per feature row.
#[derive(Debug, Clone)]
pub struct ImageProcessor {
    pub config: ClipImageConfig,
    pub image_size: usize,
    pub image_token: u32,
    /// Feature rows per image (patches, plus the class token under the
    /// "full" strategy).
    pub tokens_per_image: usize,
}

impl MmProcessor for ImageProcessor {
    fn modalities(&self) -> &[Modality] {
        &[Modality::Image]
    }

    fn placeholder_token(&self, modality: Modality) -> Option<u32> {
        (modality == Modality::Image).then_some(self.image_token)
    }

    fn kwargs_key(&self, _modality: Modality, kwargs: &Value) -> Result<String, MediaError> {
        match kwargs {
            Value::Null => Ok("{}".into()),
            Value::Object(o) if o.values().all(Value::is_null) => Ok("{}".into()),
            other => Err(MediaError::Invalid(format!(
                "LLaVA's image processor takes no processor kwargs, got {other}"
            ))),
        }
    }

    fn process(
        &self,
        modality: Modality,
        data: &MediaData,
        _kwargs: &Value,
        opts: &DecodeOptions,
        _prompt: &PromptItems,
    ) -> Result<ProcessedItem, MediaError> {
        let (Modality::Image, MediaData::Encoded { bytes, .. }) = (modality, data) else {
            return Err(MediaError::Invalid(format!(
                "this model takes images, not a {} item",
                modality.name()
            )));
        };
        let img = self.config.decode(bytes, &opts.image)?;
        let s = self.image_size;
        let pixels = Tensor::from_vec(self.config.process(&img), (3, s, s), &Device::Cpu)
            .map_err(|e| MediaError::Invalid(format!("processed pixels: {e}")))?;
        let features = MmFeatures {
            tensors: vec![(super::PIXEL_VALUES.to_string(), pixels)],
        };
        Ok(ProcessedItem {
            features: Arc::new(features),
            layout: ItemLayout::rows(self.tokens_per_image),
        })
    }

    fn embeddings_layout(
        &self,
        modality: Modality,
        rows: usize,
        _grid: Option<[usize; 3]>,
    ) -> Result<ItemLayout, MediaError> {
        if modality != Modality::Image {
            return Err(MediaError::Invalid(format!(
                "this model does not accept {} embeddings",
                modality.name()
            )));
        }
        if rows != self.tokens_per_image {
            return Err(MediaError::Invalid(format!(
                "image_embeds has {rows} rows but this model's images take {} tokens",
                self.tokens_per_image
            )));
        }
        Ok(ItemLayout::rows(rows))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = r#"{"crop_size": {"height": 336, "width": 336}, "size": {"shortest_edge": 336},
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "do_center_crop": true}"#;

    #[test]
    fn config_is_checked_against_the_tower() {
        let c = ClipImageConfig::from_preprocessor_config(CFG, 336).unwrap();
        assert_eq!(c.resized(480, 640), (336, 448));
        assert_eq!(c.resized(641, 480), (448, 336));
        assert!(ClipImageConfig::from_preprocessor_config(CFG, 224)
            .unwrap_err()
            .contains("224"));
        let pad = CFG.replace("\"resample\": 3", "\"do_pad\": true");
        assert!(ClipImageConfig::from_preprocessor_config(&pad, 336)
            .unwrap_err()
            .contains("do_pad"));
        let small = CFG.replace("\"shortest_edge\": 336", "\"shortest_edge\": 300");
        assert!(ClipImageConfig::from_preprocessor_config(&small, 336).is_err());
    }

    #[test]
    fn kwargs_and_embeddings_are_checked() {
        let p = ImageProcessor {
            config: ClipImageConfig::from_preprocessor_config(CFG, 336).unwrap(),
            image_size: 336,
            image_token: 32000,
            tokens_per_image: 576,
        };
        assert_eq!(p.kwargs_key(Modality::Image, &Value::Null).unwrap(), "{}");
        assert!(p
            .kwargs_key(Modality::Image, &serde_json::json!({"max_pixels": 3}))
            .is_err());
        assert_eq!(
            p.embeddings_layout(Modality::Image, 576, None)
                .unwrap()
                .embeds,
            576
        );
        assert!(p
            .embeddings_layout(Modality::Image, 575, None)
            .unwrap_err()
            .message()
            .contains("576"));
        let r = p
            .replacement(Modality::Image, &ItemLayout::rows(576))
            .unwrap();
        assert_eq!(
            (r.tokens.len(), r.embeds.len(), &r.embeds[0]),
            (576, 1, &(0..576))
        );
        assert!(p.placeholder_token(Modality::Video).is_none());
    }
}
