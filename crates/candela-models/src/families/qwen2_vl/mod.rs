//! Qwen2-VL (`Qwen2VLForConditionalGeneration`) and Qwen2.5-VL
//! (`Qwen2_5_VLForConditionalGeneration`): a vision tower whose merged patch
//! embeddings replace the `<|image_pad|>` / `<|video_pad|>` placeholders of a
//! Qwen2 language model that rotates by 3-D (time, row, column) positions.
//!
//! Weights are named as released (`visual.*`, `model.*`, `lm_head.*`; also what
//! transformers 5 writes) or the newer way (`model.visual.*`,
//! `model.language_model.*`, `lm_head.*`); both load. llama.cpp's pair of
//! files (a `qwen2vl` GGUF and its mmproj) loads through [`gguf`].

pub mod config;
pub mod gguf;
pub mod positions;
pub mod processor;
pub mod vision;

use std::path::Path;
use std::sync::Arc;

use candela_core::request::MmFeatures;
use candle_core::{bail, Result, Tensor};

pub use config::{Qwen2VlConfig, Variant, VisionConfig, QWEN2_5_VL, QWEN2_VL};
pub use positions::{mrope_positions, MediaSpan};
pub use processor::{VisionKwargs, VisionProcessor};
pub use vision::VisionTower;

use super::{Built, Checkpoint, Family};
use crate::error::{ModelError, Result as MResult};
use crate::multimodal::{MediaEncoder, MultimodalLm};
use crate::nn::decoder::DecoderLm;
use crate::weights::Weights;

pub const FAMILY: Family = Family {
    name: "qwen2_vl",
    hf_architectures: &[QWEN2_VL, QWEN2_5_VL],
    gguf_architectures: &[gguf::GGUF_ARCHITECTURE],
    load_folder,
    // A `qwen2vl` GGUF alone is its language model (text prompts).
    gguf_config: Some(|g, max_len| gguf::text_config(g, QWEN2_VL, max_len)),
    mmproj: Some(gguf::MMPROJ),
};

/// Tensor names in [`MmFeatures`] of one image or video item.
pub const PIXEL_VALUES: &str = "pixel_values";
/// u32 `[3]`: (t, h, w) in patches of an image.
pub const IMAGE_GRID_THW: &str = "image_grid_thw";
/// u32 `[3]`: (t, h, w) in patches of a video.
pub const VIDEO_GRID_THW: &str = "video_grid_thw";
/// f32 `[1]`: seconds one temporal patch of a video spans.
pub const SECOND_PER_GRID_T: &str = "second_per_grid_t";

fn load_folder(ck: &Checkpoint) -> MResult<Built> {
    let cfg = Qwen2VlConfig::from_json(ck.config)?;
    let processor = vision_processor(ck, &cfg)?;
    let model = load(&cfg, &ck.weights()?, ck.max_model_len)?;
    Ok(Built {
        model: Box::new(model),
        processor: Some(Arc::new(processor)),
        text: cfg.text.clone(),
    })
}

/// The language model and vision tower of a Qwen2-VL / Qwen2.5-VL checkpoint.
pub fn load(
    cfg: &Qwen2VlConfig,
    w: &Weights,
    max_model_len: Option<usize>,
) -> MResult<MultimodalLm> {
    let mut text = crate::families::qwen2::config_from_hf(&cfg.text, max_model_len)?;
    text.mrope_section = Some(cfg.mrope_section);
    text.architecture = cfg.architecture.to_string();
    let (lm, vision) = if w.contains("model.language_model.embed_tokens.weight") {
        let lm_w = w.renamed(|n: &str| match n.strip_prefix("model.") {
            Some(rest) => format!("model.language_model.{rest}"),
            None => n.to_string(),
        })?;
        (
            DecoderLm::load(text, &lm_w)?,
            VisionTower::load(cfg.vision.clone(), w, "model.visual")?,
        )
    } else {
        (
            DecoderLm::load(text, w)?,
            VisionTower::load(cfg.vision.clone(), w, "visual")?,
        )
    };
    Ok(MultimodalLm::new(
        lm,
        Box::new(VisionEncoder(vision)),
        cfg.architecture,
    ))
}

struct VisionEncoder(VisionTower);

impl MediaEncoder for VisionEncoder {
    fn encode(&self, features: &MmFeatures) -> Result<Tensor> {
        let Some(pixels) = features.get(PIXEL_VALUES) else {
            bail!("Qwen2-VL takes images and videos ({PIXEL_VALUES} + grid_thw)");
        };
        self.0.forward(pixels, grid_of(features)?)
    }
}

/// The (t, h, w) grid of an item's features (image or video).
pub fn grid_of(features: &MmFeatures) -> Result<[usize; 3]> {
    let Some(g) = features
        .get(IMAGE_GRID_THW)
        .or_else(|| features.get(VIDEO_GRID_THW))
    else {
        bail!("an image or video item needs {IMAGE_GRID_THW} or {VIDEO_GRID_THW}");
    };
    let g = g
        .flatten_all()?
        .to_dtype(candle_core::DType::U32)?
        .to_vec1::<u32>()?;
    match g.as_slice() {
        &[t, h, w] => Ok([t as usize, h as usize, w as usize]),
        _ => bail!("grid_thw must hold 3 numbers, got {}", g.len()),
    }
}

/// The image / video processor of a checkpoint: preprocessor_config.json
/// (and video_preprocessor_config.json when present, as transformers reads
/// them), checked against the vision tower's patch geometry.
fn vision_processor(ck: &Checkpoint, v: &Qwen2VlConfig) -> MResult<VisionProcessor> {
    let (pp, image_text) = ck.read_required("preprocessor_config.json")?;
    let invalid = |path: &Path, e: candela_media::MediaError| ModelError::InvalidJson {
        what: "preprocessor config",
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let image = candela_media::image::Qwen2VlProcessorConfig::from_preprocessor_config(&image_text)
        .map_err(|e| invalid(&pp, e))?;
    let (vp, video_text) = ck
        .read_optional("video_preprocessor_config.json")?
        .unwrap_or((pp.clone(), image_text));
    let video = candela_media::video::Qwen2VlVideoConfig::from_preprocessor_config(&video_text)
        .map_err(|e| invalid(&vp, e))?;
    let vc = &v.vision;
    if vc.in_channels != 3 {
        return Err(ModelError::Config(format!(
            "the vision tower takes {} channels; images are RGB (3)",
            vc.in_channels
        )));
    }
    for (what, img, vid, tower) in [
        (
            "patch_size",
            image.patch_size,
            video.base.patch_size,
            vc.patch_size,
        ),
        (
            "merge_size",
            image.merge_size,
            video.base.merge_size,
            vc.spatial_merge_size,
        ),
        (
            "temporal_patch_size",
            image.temporal_patch_size,
            video.base.temporal_patch_size,
            vc.temporal_patch_size,
        ),
    ] {
        if img != tower || vid != tower {
            return Err(ModelError::Config(format!(
                "the preprocessor configs have {what} {img} (image) / {vid} (video) but the vision tower has {tower}"
            )));
        }
    }
    Ok(VisionProcessor {
        image,
        video,
        image_token: v.image_token_id,
        video_token: v.video_token_id,
        tokens_per_second: (vc.variant == Variant::Qwen25Vl).then_some(vc.tokens_per_second),
    })
}
