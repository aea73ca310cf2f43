//! Gemma 3's image processor (transformers' `Gemma3ImageProcessor`, PIL
//! backend, and `Gemma3Processor`'s prompt expansion): each image resized to
//! the tower's square (Pillow bilinear, aspect ratio not kept), rescaled and
//! normalized; the template's `<start_of_image>` expands to
//! `"\n\n<start_of_image>" + mm_tokens_per_image x <image_soft_token> +
//! "<end_of_image>\n\n"`, only the soft tokens taking the image's rows.
//!
//! With pan-and-scan ([`PanAndScan`]) an image that gets crops is the image
//! and each crop, one such block each, introduced as `Gemma3Processor`
//! writes it: `"Here is the original image " + block + " and here are some
//! crops to help you see better " + blocks joined by " "`. Each block is a
//! run of its own (its own encoder item and bidirectional span).

use std::sync::Arc;

use candela_core::request::MmFeatures;
use candela_media::image::decode_image;
use candela_media::{MediaError, Modality};
use candle_core::{Device, Tensor};
use serde_json::Value;

use super::pan_and_scan::{crop_rgb8, PanAndScan};
use super::vision::{Gemma3VisionConfig, PIXEL_VALUES};
use crate::families::llava::{ClipImageConfig, ImageProcessor};
use crate::processor::{
    DecodeOptions, ItemLayout, MediaData, MmProcessor, ProcessedItem, PromptItems, Replacement,
};
use crate::Tokenizer;

/// The tokens that stand for a run of `n` newlines (`runs[n - 1]`), as the
/// checkpoint's tokenizer writes them: Gemma 3's vocabulary has one token per
/// run up to 31. transformers tokenizes the expanded prompt text, so the
/// wrapper's "\n\n" merges with a newline run next to it.
#[derive(Debug, Clone)]
struct NewlineRuns(Vec<u32>);

impl NewlineRuns {
    fn of(tokenizer: &Tokenizer) -> Self {
        let mut runs = Vec::new();
        loop {
            match tokenizer.encode(&"\n".repeat(runs.len() + 1), false) {
                Ok(ids) if ids.len() == 1 => runs.push(ids[0]),
                _ => return Self(runs),
            }
        }
    }

    /// How many newlines `token` stands for, if it is a run.
    fn len_of(&self, token: u32) -> Option<usize> {
        self.0.iter().position(|&t| t == token).map(|i| i + 1)
    }

    fn token(&self, n: usize) -> Option<u32> {
        n.checked_sub(1).and_then(|i| self.0.get(i)).copied()
    }
}

/// `Gemma3Processor`'s text around pan-and-scan blocks, tokenized (each
/// piece lies between special tokens, so it tokenizes on its own).
#[derive(Debug, Clone)]
struct CropText {
    /// "Here is the original image \n\n", before the first block's
    /// `<start_of_image>`.
    intro: Vec<u32>,
    /// "\n\n and here are some crops to help you see better \n\n".
    after_original: Vec<u32>,
    /// "\n\n \n\n" between two crops.
    between_crops: Vec<u32>,
}

/// LLaVA's fixed-square image processor (decode, resize, rescale,
/// normalize; one image = `mm_tokens_per_image` rows, `<start_of_image>` its
/// placeholder) with pan-and-scan and Gemma's prompt replacement around it.
#[derive(Debug, Clone)]
pub struct Gemma3ImageProcessor {
    image: ImageProcessor,
    eoi: u32,
    soft: u32,
    /// The wrapper's "\n\n" around each image, tokenized.
    blank_line: Vec<u32>,
    crop_text: CropText,
    newlines: NewlineRuns,
    /// The config's pan-and-scan settings; requests may change them.
    pan_and_scan: PanAndScan,
}

impl Gemma3ImageProcessor {
    /// From `preprocessor_config.json`'s text, checked against the model.
    pub fn new(
        preprocessor_config: &str,
        cfg: &Gemma3VisionConfig,
        tokenizer: &Tokenizer,
    ) -> Result<Self, String> {
        let mut json: Value =
            serde_json::from_str(preprocessor_config).map_err(|e| e.to_string())?;
        let pan_and_scan = PanAndScan::default()
            .with(&json, false)
            .map_err(|e| e.message().to_string())?;
        // Gemma 3's processor has no crop; CLIP's defaults to one.
        if let Some(o) = json.as_object_mut() {
            o.entry("do_center_crop").or_insert(Value::Bool(false));
            o.entry("resample").or_insert(Value::from(2));
        }
        let image_size = cfg.vision.image_size;
        let config = ClipImageConfig::from_preprocessor_config(&json.to_string(), image_size)?;
        let encode = |text: &str| {
            tokenizer
                .encode(text, false)
                .map_err(|e| format!("tokenizing the image wrapper: {e}"))
        };
        Ok(Self {
            image: ImageProcessor {
                config,
                image_size,
                image_token: cfg.boi_token_id,
                tokens_per_image: cfg.mm_tokens_per_image,
            },
            eoi: cfg.eoi_token_id,
            soft: cfg.image_token_id,
            blank_line: encode("\n\n")?,
            crop_text: CropText {
                intro: encode("Here is the original image \n\n")?,
                after_original: encode("\n\n and here are some crops to help you see better \n\n")?,
                between_crops: encode("\n\n \n\n")?,
            },
            newlines: NewlineRuns::of(tokenizer),
            pan_and_scan,
        })
    }

    /// The image and its crops, each resized, rescaled and normalized:
    /// `[1 + crops, 3, size, size]` (one entry per run).
    fn process_with_crops(
        &self,
        bytes: &[u8],
        pas: &PanAndScan,
        opts: &DecodeOptions,
    ) -> Result<ProcessedItem, MediaError> {
        let img = decode_image(bytes, &opts.image)?;
        let (w, h) = (img.width as usize, img.height as usize);
        let crops = pas.crops(w, h)?;
        let mut pixels = self.image.config.process_rgb(&img.rgb, w, h);
        for c in &crops {
            let rgb = crop_rgb8(&img.rgb, w, *c);
            pixels.extend(self.image.config.process_rgb(&rgb, c.width, c.height));
        }
        let (n, s) = (1 + crops.len(), self.image.image_size);
        // An image without crops is one run: `[3, size, size]` as without pan-and-scan.
        let pixels = match n {
            1 => Tensor::from_vec(pixels, (3, s, s), &Device::Cpu),
            _ => Tensor::from_vec(pixels, (n, 3, s, s), &Device::Cpu),
        }
        .map_err(|e| MediaError::Invalid(format!("processed pixels: {e}")))?;
        Ok(ProcessedItem {
            features: Arc::new(MmFeatures {
                tensors: vec![(PIXEL_VALUES.to_string(), pixels)],
            }),
            layout: ItemLayout::rows(n * self.image.tokens_per_image),
        })
    }

    /// `<start_of_image>`, the soft tokens, `<end_of_image>`, appended to
    /// `tokens`; returns the soft tokens' run.
    fn push_block(&self, tokens: &mut Vec<u32>) -> std::ops::Range<usize> {
        tokens.push(self.image.image_token);
        let start = tokens.len();
        tokens.extend(std::iter::repeat_n(self.soft, self.image.tokens_per_image));
        tokens.push(self.eoi);
        start..start + self.image.tokens_per_image
    }
}

impl MmProcessor for Gemma3ImageProcessor {
    fn modalities(&self) -> &[Modality] {
        self.image.modalities()
    }

    fn placeholder_token(&self, modality: Modality) -> Option<u32> {
        self.image.placeholder_token(modality)
    }

    fn kwargs_key(&self, _modality: Modality, kwargs: &Value) -> Result<String, MediaError> {
        Ok(self.pan_and_scan.with(kwargs, true)?.canonical())
    }

    fn process(
        &self,
        modality: Modality,
        data: &MediaData,
        kwargs: &Value,
        opts: &DecodeOptions,
        prompt: &PromptItems,
    ) -> Result<ProcessedItem, MediaError> {
        let pas = self.pan_and_scan.with(kwargs, true)?;
        match (modality, data) {
            (Modality::Image, MediaData::Encoded { bytes, .. }) if pas.enabled => {
                self.process_with_crops(bytes, &pas, opts)
            }
            _ => self.image.process(modality, data, kwargs, opts, prompt),
        }
    }

    fn embeddings_layout(
        &self,
        modality: Modality,
        rows: usize,
        grid: Option<[usize; 3]>,
    ) -> Result<ItemLayout, MediaError> {
        self.image.embeddings_layout(modality, rows, grid)
    }

    fn replacement(
        &self,
        modality: Modality,
        layout: &ItemLayout,
    ) -> Result<Replacement, MediaError> {
        if modality != Modality::Image {
            return Err(MediaError::Invalid(format!(
                "this model does not accept {} input",
                modality.name()
            )));
        }
        let per_image = self.image.tokens_per_image;
        if layout.embeds == 0 || !layout.embeds.is_multiple_of(per_image) {
            return Err(MediaError::Invalid(format!(
                "a Gemma 3 image takes a multiple of {per_image} rows, got {}",
                layout.embeds
            )));
        }
        let crops = layout.embeds / per_image - 1;
        let t = &self.crop_text;
        let mut tokens = if crops == 0 {
            self.blank_line.clone()
        } else {
            t.intro.clone()
        };
        let mut embeds = vec![self.push_block(&mut tokens)];
        for k in 0..crops {
            tokens.extend(if k == 0 {
                &t.after_original
            } else {
                &t.between_crops
            });
            embeds.push(self.push_block(&mut tokens));
        }
        tokens.extend(&self.blank_line);
        Ok(Replacement { tokens, embeds })
    }

    fn merge_at_boundary(&self, left: u32, right: u32) -> Option<u32> {
        let n = self.newlines.len_of(left)? + self.newlines.len_of(right)?;
        self.newlines.token(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newline_runs_merge_as_the_tokenizer_writes_them() {
        let cfg = Gemma3VisionConfig::from_json(&serde_json::json!({
            "vision_config": {"image_size": 896, "patch_size": 14}, "mm_tokens_per_image": 256
        }))
        .unwrap();
        let pp = r#"{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2,
            "size": {"height": 896, "width": 896}, "do_pan_and_scan": null}"#;
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gemma3-tiny");
        let tok = Tokenizer::from_file(&dir.join("tokenizer.json"), None).unwrap();
        let p = Gemma3ImageProcessor::new(pp, &cfg, &tok).unwrap();
        assert_eq!(p.merge_at_boundary(107, 108), Some(109));
        assert_eq!(p.merge_at_boundary(108, 108), Some(110));
        assert_eq!(p.merge_at_boundary(137, 107), None);
        assert_eq!(p.merge_at_boundary(108, 2364), None);
        let r = p
            .replacement(Modality::Image, &ItemLayout::rows(256))
            .unwrap();
        assert_eq!(
            (r.tokens.len(), r.embeds.len(), &r.embeds[0]),
            (260, 1, &(2..258))
        );
        assert_eq!(r.tokens[..3], [108, 255999, 262144]);
        // The image and two crops: three blocks, each its own run.
        let r = p
            .replacement(Modality::Image, &ItemLayout::rows(3 * 256))
            .unwrap();
        let starts: Vec<usize> = r.embeds.iter().map(|e| e.start).collect();
        assert_eq!(starts, [8, 279, 540]);
        assert_eq!(r.tokens[..2], [8291, 563]);
        assert!(p
            .replacement(Modality::Image, &ItemLayout::rows(300))
            .is_err());
        assert_eq!(p.kwargs_key(Modality::Image, &Value::Null).unwrap(), "{}");
        assert!(p
            .kwargs_key(Modality::Image, &serde_json::json!({"max_pixels": 9}))
            .is_err());
        let pan = pp.replace("\"do_pan_and_scan\": null", "\"do_pan_and_scan\": true");
        let p = Gemma3ImageProcessor::new(&pan, &cfg, &tok).unwrap();
        // The config's default; a request turns it off.
        assert_eq!(
            p.kwargs_key(Modality::Image, &Value::Null).unwrap(),
            "{\"pan_and_scan\":[256,4,1.2]}"
        );
        assert_eq!(
            p.kwargs_key(
                Modality::Image,
                &serde_json::json!({"do_pan_and_scan": false})
            )
            .unwrap(),
            "{}"
        );
        let bad = pp.replace("\"do_pan_and_scan\": null", "\"do_pan_and_scan\": 3");
        assert!(Gemma3ImageProcessor::new(&bad, &cfg, &tok).is_err());
        let small = pp.replace("896, \"width\": 896", "448, \"width\": 448");
        assert!(Gemma3ImageProcessor::new(&small, &cfg, &tok).is_err());
    }
}
