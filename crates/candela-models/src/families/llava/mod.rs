//! LLaVA-1.5 (`LlavaForConditionalGeneration`): a CLIP ViT whose features
//! from one layer (the second-to-last in LLaVA-1.5), class token dropped,
//! go through a two-layer MLP projector and replace the `<image>` tokens of
//! a Llama language model.
//!
//! Weights load under the names llava-hf released (`vision_tower.vision_model.*`,
//! `multi_modal_projector.*`, `language_model.model.*`,
//! `language_model.lm_head.*`), as transformers 5 saves them (the same, with
//! the tower as `vision_tower.*`) and as transformers 4.5x saved them
//! (`model.vision_tower.*`, `model.multi_modal_projector.*`,
//! `model.language_model.*`, `lm_head.*`).

pub mod gguf;
pub mod processor;

use std::sync::Arc;

use candela_core::request::MmFeatures;
use candle_core::{bail, Result, Tensor};
use serde::Deserialize;
use serde_json::Value;

use crate::nn::vit::feature_layers;
pub use crate::nn::vit::{ClipVision, ClipVisionConfig};
pub use processor::{ClipImageConfig, ImageProcessor};

use super::{Built, Checkpoint, Family};
use crate::config::HfConfig;
use crate::error::{ModelError, Result as MResult};
use crate::multimodal::{language_model_weights, vision_tower_prefix, MediaEncoder, MultimodalLm};
use crate::nn::activation::Activation;
use crate::nn::decoder::DecoderLm;
use crate::weights::{Linear, Weights};

pub const HF_ARCHITECTURE: &str = "LlavaForConditionalGeneration";

pub const FAMILY: Family = Family {
    name: "llava",
    hf_architectures: &[HF_ARCHITECTURE],
    gguf_architectures: &[],
    load_folder,
    gguf_config: None,
    mmproj: Some(gguf::MMPROJ),
};

/// The tensor of one image item in [`MmFeatures`]: f32 `[3, size, size]`.
pub const PIXEL_VALUES: &str = "pixel_values";

/// LlamaConfig defaults for the fields a `text_config` may leave out
/// (llava-hf's configs give only a few).
fn llama_defaults() -> Value {
    serde_json::json!({
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 2048, "hidden_act": "silu", "rope_theta": 10000.0,
        "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2,
    })
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    #[serde(default)]
    text_config: Value,
    #[serde(default)]
    vision_config: ClipVisionConfig,
    #[serde(alias = "image_token_id")]
    image_token_index: Option<u32>,
    projector_hidden_act: Option<String>,
    vision_feature_layer: Option<Value>,
    vision_feature_select_strategy: Option<String>,
    multimodal_projector_bias: Option<bool>,
}

/// The parts of a LLaVA `config.json`.
#[derive(Debug, Clone)]
pub struct LlavaConfig {
    pub text: HfConfig,
    pub vision: ClipVisionConfig,
    pub image_token_id: u32,
    pub projector_act: Activation,
    pub projector_bias: bool,
    /// Encoder layers to run: the features are their output.
    pub feature_layers: usize,
    /// "default" drops the class token, "full" keeps it.
    pub keep_class_token: bool,
}

impl LlavaConfig {
    pub fn from_json(raw: &Value) -> MResult<Self> {
        let bad = |m: String| ModelError::Config(format!("LLaVA config: {m}"));
        let r: RawConfig = serde_json::from_value(raw.clone()).map_err(|e| bad(e.to_string()))?;
        r.vision_config.validate()?;
        let mut text = llama_defaults();
        if let (Some(dst), Some(src)) = (text.as_object_mut(), r.text_config.as_object()) {
            for (k, v) in src {
                dst.insert(k.clone(), v.clone());
            }
        }
        // transformers 5 reads tying from the root config.
        if let Some(t) = raw.get("tie_word_embeddings") {
            text["tie_word_embeddings"] = t.clone();
        }
        let text = HfConfig::from_json_str(&text.to_string())?;
        let feature_layers = feature_layers(
            &r.vision_feature_layer.unwrap_or(Value::from(-2)),
            r.vision_config.num_hidden_layers,
        )
        .map_err(bad)?;
        let keep_class_token = match r
            .vision_feature_select_strategy
            .as_deref()
            .unwrap_or("default")
        {
            "default" => false,
            "full" => true,
            other => {
                return Err(bad(format!(
                    "vision_feature_select_strategy {other:?} (default, full)"
                )))
            }
        };
        Ok(Self {
            text,
            image_token_id: r.image_token_index.unwrap_or(32000),
            projector_act: Activation::parse(r.projector_hidden_act.as_deref().unwrap_or("gelu"))?,
            projector_bias: r.multimodal_projector_bias.unwrap_or(true),
            feature_layers,
            keep_class_token,
            vision: r.vision_config,
        })
    }

    /// Feature rows (and `<image>` tokens) per image.
    pub fn tokens_per_image(&self) -> usize {
        self.vision.grid() * self.vision.grid() + self.keep_class_token as usize
    }
}

fn load_folder(ck: &Checkpoint) -> MResult<Built> {
    let cfg = LlavaConfig::from_json(ck.config)?;
    let (pp, text) = ck.read_required("preprocessor_config.json")?;
    let config = ClipImageConfig::from_preprocessor_config(&text, cfg.vision.image_size).map_err(
        |message| ModelError::InvalidJson {
            what: "preprocessor config",
            path: pp,
            message,
        },
    )?;
    let processor = ImageProcessor {
        config,
        image_size: cfg.vision.image_size,
        image_token: cfg.image_token_id,
        tokens_per_image: cfg.tokens_per_image(),
    };
    let model = load(&cfg, &ck.weights()?, ck.max_model_len)?;
    Ok(Built {
        model: Box::new(model),
        processor: Some(Arc::new(processor)),
        text: cfg.text.clone(),
    })
}

/// The language model, tower and projector of a LLaVA checkpoint.
pub fn load(cfg: &LlavaConfig, w: &Weights, max_model_len: Option<usize>) -> MResult<MultimodalLm> {
    let text = crate::families::llama::config_from_hf(&cfg.text, max_model_len)?;
    let (lm_w, root) = language_model_weights(w)?;
    let lm = DecoderLm::load(text, &lm_w)?;
    let tower = vision_tower_prefix(w, root, "embeddings.class_embedding")?;
    let vision = ClipVision::load(cfg.vision.clone(), w, &tower, cfg.feature_layers)?;
    let (vd, td) = (cfg.vision.hidden_size, cfg.text.hidden_size);
    let proj = w.pp(format!("{root}multi_modal_projector"));
    let encoder = Encoder {
        vision,
        keep_class_token: cfg.keep_class_token,
        linear_1: proj.linear("linear_1", vd, td, cfg.projector_bias)?,
        act: cfg.projector_act,
        linear_2: proj.linear("linear_2", td, td, cfg.projector_bias)?,
    };
    Ok(MultimodalLm::new(lm, Box::new(encoder), HF_ARCHITECTURE))
}

/// Tower + projector: one image's pixels -> `[tokens_per_image, text hidden]`.
struct Encoder {
    vision: ClipVision,
    keep_class_token: bool,
    linear_1: Linear,
    act: Activation,
    linear_2: Linear,
}

impl MediaEncoder for Encoder {
    fn encode(&self, features: &MmFeatures) -> Result<Tensor> {
        let Some(pixels) = features.get(PIXEL_VALUES) else {
            bail!("LLaVA takes images ({PIXEL_VALUES})");
        };
        let x = self.vision.forward(pixels)?;
        let x = if self.keep_class_token {
            x
        } else {
            x.narrow(0, 1, x.dim(0)? - 1)?
        };
        self.linear_2
            .forward(&self.act.forward(&self.linear_1.forward(&x)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: Value) -> MResult<LlavaConfig> {
        let mut c = serde_json::json!({
            "architectures": [HF_ARCHITECTURE], "image_token_index": 32000,
            "text_config": {"model_type": "llama", "vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5},
            "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                              "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14},
            "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        });
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        LlavaConfig::from_json(&c)
    }

    #[test]
    fn llava_1_5_7b_config() {
        let c = config(serde_json::json!({})).unwrap();
        assert_eq!(
            (c.tokens_per_image(), c.feature_layers, c.image_token_id),
            (576, 23, 32000)
        );
        assert_eq!((c.text.hidden_size, c.text.vocab_size), (4096, 32064));
        assert_eq!(
            config(serde_json::json!({"vision_feature_select_strategy": "full"}))
                .unwrap()
                .tokens_per_image(),
            577
        );
        assert_eq!(
            config(serde_json::json!({"vision_feature_layer": 24}))
                .unwrap()
                .feature_layers,
            24
        );
        for bad in [
            serde_json::json!({"vision_feature_layer": -26}),
            serde_json::json!({"vision_feature_layer": [-2, -5]}),
            serde_json::json!({"vision_feature_select_strategy": "cls"}),
            serde_json::json!({"projector_hidden_act": "relu6"}),
        ] {
            assert!(config(bad.clone()).is_err(), "{bad}");
        }
    }
}
