//! Qwen2-VL (`Qwen2VLForConditionalGeneration`) and Qwen2.5-VL
//! (`Qwen2_5_VLForConditionalGeneration`): a vision tower whose merged patch
//! embeddings replace the `<|image_pad|>` / `<|video_pad|>` placeholders of a
//! Qwen2 language model that rotates by 3-D (time, row, column) positions.
//!
//! Weights are named as released (`visual.*`, `model.*`, `lm_head.*`; also what
//! transformers 5 writes) or the newer way (`model.visual.*`,
//! `model.language_model.*`, `lm_head.*`); both load.

pub mod config;
pub mod positions;
pub mod vision;

use candela_core::model::{DeviceMemory, DeviceSampleRow, ForwardBatch, Model, ModelSpec};
use candela_core::request::MmFeatures;
use candle_core::{bail, Result, Tensor};
use serde_json::Value;

pub use config::{Qwen2VlConfig, Variant, VisionConfig, QWEN2_5_VL, QWEN2_VL};
pub use positions::{mrope_positions, MediaSpan};
pub use vision::VisionTower;

use crate::error::Result as MResult;
use crate::layers::DecoderLm;
use crate::weights::Weights;

/// Tensor names in [`MmFeatures`] of one image or video item.
pub const PIXEL_VALUES: &str = "pixel_values";
/// u32 `[3]`: (t, h, w) in patches of an image.
pub const IMAGE_GRID_THW: &str = "image_grid_thw";
/// u32 `[3]`: (t, h, w) in patches of a video.
pub const VIDEO_GRID_THW: &str = "video_grid_thw";
/// f32 `[1]`: seconds one temporal patch of a video spans.
pub const SECOND_PER_GRID_T: &str = "second_per_grid_t";

pub struct Qwen2Vl {
    lm: DecoderLm,
    vision: VisionTower,
    spec: ModelSpec,
}

impl Qwen2Vl {
    pub fn load(cfg: &Qwen2VlConfig, w: &Weights, max_model_len: Option<usize>) -> MResult<Self> {
        let mut text = crate::qwen2::config_from_hf(&cfg.text, max_model_len)?;
        text.mrope_section = Some(cfg.mrope_section);
        text.architecture = cfg.architecture.to_string();
        let (lm, vision) = if w.contains("model.language_model.embed_tokens.weight") {
            let lm_w = w.renamed(|n: &str| match n.strip_prefix("model.") {
                Some(rest) => format!("model.language_model.{rest}"),
                None => n.to_string(),
            })?;
            (DecoderLm::load(text, &lm_w)?, VisionTower::load(cfg.vision.clone(), w, "model.visual")?)
        } else {
            (DecoderLm::load(text, w)?, VisionTower::load(cfg.vision.clone(), w, "visual")?)
        };
        let spec = lm.spec().clone();
        Ok(Self { lm, vision, spec })
    }

    pub fn vision(&self) -> &VisionTower {
        &self.vision
    }

    /// Every-position logits (parity checks).
    pub fn forward_all_logits(&mut self, batch: &ForwardBatch) -> Result<Tensor> {
        self.lm.forward_all_logits(batch)
    }
}

/// The (t, h, w) grid of an item's features (image or video).
pub fn grid_of(features: &MmFeatures) -> Result<[usize; 3]> {
    let Some(g) = features.get(IMAGE_GRID_THW).or_else(|| features.get(VIDEO_GRID_THW)) else {
        bail!("an image or video item needs {IMAGE_GRID_THW} or {VIDEO_GRID_THW}");
    };
    let g = g.flatten_all()?.to_dtype(candle_core::DType::U32)?.to_vec1::<u32>()?;
    match g.as_slice() {
        &[t, h, w] => Ok([t as usize, h as usize, w as usize]),
        _ => bail!("grid_thw must hold 3 numbers, got {}", g.len()),
    }
}

impl Model for Qwen2Vl {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn allocate_kv_cache(&mut self, num_blocks: usize, block_size: usize) -> Result<()> {
        self.lm.allocate_kv_cache(num_blocks, block_size)
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<Tensor> {
        self.lm.forward(batch)
    }

    fn encode(&mut self, features: &MmFeatures) -> Result<Tensor> {
        let Some(pixels) = features.get(PIXEL_VALUES) else {
            bail!("{} takes images and videos ({PIXEL_VALUES} + grid_thw)", self.spec.architecture);
        };
        let grid = grid_of(features)?;
        let dtype = self.lm.dtype();
        rayon::scope(|_| self.vision.forward(pixels, grid)?.to_dtype(dtype))
    }

    fn device_memory(&self, max_num_batched_tokens: usize, max_num_seqs: usize) -> Option<DeviceMemory> {
        self.lm.device_memory(max_num_batched_tokens, max_num_seqs)
    }

    fn sample_on_device(&mut self, logits: &Tensor, rows: &[DeviceSampleRow]) -> Option<Result<Vec<u32>>> {
        self.lm.sample_on_device(logits, rows)
    }
}

/// Whether `raw` (a parsed `config.json`) is a Qwen2-VL or Qwen2.5-VL checkpoint.
pub fn matches(raw: &Value) -> bool {
    matches!(raw.pointer("/architectures/0").and_then(Value::as_str), Some(QWEN2_VL | QWEN2_5_VL))
}
