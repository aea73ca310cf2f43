//! Gemma 3's image path (`Gemma3ForConditionalGeneration`): the SigLIP
//! tower's last hidden state, laid back on the patch grid, average-pooled to
//! `mm_tokens_per_image` rows, Gemma-RMSNorm'd (`mm_soft_emb_norm`, scaling
//! by `1 + weight`) and multiplied by `mm_input_projection_weight`
//! (`[vision hidden, text hidden]`, not a Linear's `[out, in]`).
//!
//! Weights load under the released names (`vision_tower.vision_model.*`,
//! `multi_modal_projector.*`) and as transformers 5 saves them (the tower
//! as `vision_tower.*`), with or without a leading `model.`.

use candela_core::request::MmFeatures;
use candle_core::{bail, DType, Result, Tensor};
use serde::Deserialize;
use serde_json::Value;

use crate::error::{ModelError, Result as MResult};
use crate::multimodal::MediaEncoder;
use crate::nn::decoder::RmsNorm;
use crate::nn::vit::{SiglipVision, SiglipVisionConfig};
use crate::weights::Weights;

// One image item's tensor, f32 `[3, size, size]`: LLaVA's processor makes it.
pub use crate::families::llava::PIXEL_VALUES;

#[derive(Debug, Deserialize)]
struct RawVisionFields {
    #[serde(default)]
    vision_config: SiglipVisionConfig,
    mm_tokens_per_image: Option<usize>,
    #[serde(alias = "image_token_id")]
    image_token_index: Option<u32>,
    #[serde(alias = "boi_token_id")]
    boi_token_index: Option<u32>,
    #[serde(alias = "eoi_token_id")]
    eoi_token_index: Option<u32>,
}

/// The vision half of a `Gemma3ForConditionalGeneration` `config.json`
/// (defaults: gemma-3-4b-it's).
#[derive(Debug, Clone)]
pub struct Gemma3VisionConfig {
    pub vision: SiglipVisionConfig,
    pub mm_tokens_per_image: usize,
    /// `<image_soft_token>`: the tokens that take the image's rows.
    pub image_token_id: u32,
    /// `<start_of_image>` / `<end_of_image>`.
    pub boi_token_id: u32,
    pub eoi_token_id: u32,
}

impl Gemma3VisionConfig {
    pub fn from_json(raw: &Value) -> MResult<Self> {
        let bad = |m: String| ModelError::Config(format!("Gemma 3 vision config: {m}"));
        let r: RawVisionFields =
            serde_json::from_value(raw.clone()).map_err(|e| bad(e.to_string()))?;
        r.vision_config.validate()?;
        Self {
            mm_tokens_per_image: r.mm_tokens_per_image.unwrap_or(256),
            image_token_id: r.image_token_index.unwrap_or(262144),
            boi_token_id: r.boi_token_index.unwrap_or(255999),
            eoi_token_id: r.eoi_token_index.unwrap_or(256000),
            vision: r.vision_config,
        }
        .checked()
    }

    /// The config with its pooling checked against the tower's grid.
    pub fn checked(self) -> MResult<Self> {
        let (grid, side) = (self.vision.grid(), self.tokens_per_side());
        if side * side != self.mm_tokens_per_image || side == 0 || !grid.is_multiple_of(side) {
            return Err(ModelError::Config(format!(
                "Gemma 3 vision config: mm_tokens_per_image {} does not pool a {grid}x{grid} \
                 patch grid (a square whose side divides {grid})",
                self.mm_tokens_per_image
            )));
        }
        Ok(self)
    }

    fn tokens_per_side(&self) -> usize {
        (self.mm_tokens_per_image as f64).sqrt().round() as usize
    }
}

/// Tower + projector: one image's pixels -> `[mm_tokens_per_image, text hidden]`.
pub struct Gemma3ImageEncoder {
    tower: SiglipVision,
    tokens_per_side: usize,
    norm: RmsNorm,
    /// `[vision hidden, text hidden]`.
    projection: Tensor,
}

impl Gemma3ImageEncoder {
    pub fn load(cfg: &Gemma3VisionConfig, w: &Weights, text_hidden: usize) -> MResult<Self> {
        let root = if w.contains("model.multi_modal_projector.mm_input_projection_weight") {
            "model."
        } else {
            ""
        };
        let tower = [
            format!("{root}vision_tower.vision_model"),
            format!("{root}vision_tower"),
        ]
        .into_iter()
        .find(|p| w.pp(p).contains("post_layernorm.weight"))
        .ok_or_else(|| {
            ModelError::MissingTensor(format!(
                "{root}vision_tower.vision_model.post_layernorm.weight"
            ))
        })?;
        let d = cfg.vision.hidden_size;
        let proj = w.pp(format!("{root}multi_modal_projector"));
        Ok(Self {
            tower: SiglipVision::load(cfg.vision.clone(), w, &tower, cfg.vision.num_hidden_layers)?,
            tokens_per_side: cfg.tokens_per_side(),
            norm: RmsNorm::load_unit_offset(
                &proj.pp("mm_soft_emb_norm"),
                d,
                cfg.vision.layer_norm_eps,
            )?,
            projection: proj.tensor("mm_input_projection_weight", &[d, text_hidden])?,
        })
    }
}

impl Gemma3ImageEncoder {
    /// From loaded parts (a GGUF mmproj's): `norm` scales by its weight as
    /// given, `projection` is `[vision hidden, text hidden]`.
    pub fn from_parts(
        cfg: &Gemma3VisionConfig,
        tower: SiglipVision,
        norm: RmsNorm,
        projection: Tensor,
    ) -> Self {
        Self {
            tower,
            tokens_per_side: cfg.tokens_per_side(),
            norm,
            projection,
        }
    }
}

impl MediaEncoder for Gemma3ImageEncoder {
    fn encode(&self, features: &MmFeatures) -> Result<Tensor> {
        let Some(pixels) = features.get(PIXEL_VALUES) else {
            bail!("Gemma 3 takes images ({PIXEL_VALUES})");
        };
        let x = self.tower.forward(pixels)?;
        let (g, side) = (self.tower.config().grid(), self.tokens_per_side);
        let k = g / side;
        let d = x.dim(1)?;
        // [g*g, d] row-major patches -> mean over each k x k block, rows
        // row-major over the pooled grid (AvgPool2d, then flatten).
        let pooled = x
            .reshape((side, k, side, k, d))?
            .to_dtype(DType::F32)?
            .sum(3)?
            .sum(1)?
            .affine(1.0 / (k * k) as f64, 0.0)?
            .reshape((side * side, d))?
            .to_dtype(x.dtype())?;
        self.norm.forward(&pooled)?.matmul(&self.projection)
    }
}
