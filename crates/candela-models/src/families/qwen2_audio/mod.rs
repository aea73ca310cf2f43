//! Qwen2-Audio (`Qwen2AudioForConditionalGeneration`): a Whisper encoder
//! with a stride-2 average pool, a linear projector to the text width, and a
//! Qwen2 language model whose `<|AUDIO|>` placeholders (one per pooled
//! frame) take the projected audio embeddings.
//!
//! Checkpoints name the parts `audio_tower.*`, `multi_modal_projector.*`,
//! `language_model.model.*` / `language_model.lm_head.*` (as released), or
//! `model.audio_tower.*`, `model.language_model.*`, `lm_head.*` (as newer
//! transformers lays out the modules); both load. llama.cpp's pair of files
//! (a `qwen2` GGUF and a `qwen2a` mmproj) loads through [`gguf`].

pub mod gguf;
pub mod processor;

use std::sync::Arc;

use candela_core::request::MmFeatures;
use candle_core::{bail, Result, Tensor};
use serde::Deserialize;
use serde_json::Value;

pub use processor::AudioProcessor;

use super::{Built, Checkpoint, Family};
use crate::config::HfConfig;
use crate::error::{ModelError, Result as MResult};
use crate::multimodal::{MediaEncoder, MultimodalLm};
use crate::nn::decoder::DecoderLm;
use crate::nn::whisper_encoder::{AudioEncoder, AudioEncoderConfig};
use crate::weights::{Linear, Weights};

pub const HF_ARCHITECTURE: &str = "Qwen2AudioForConditionalGeneration";

pub const FAMILY: Family = Family {
    name: "qwen2_audio",
    hf_architectures: &[HF_ARCHITECTURE],
    gguf_architectures: &[],
    load_folder,
    gguf_config: None,
    mmproj: Some(gguf::MMPROJ),
};

/// Tensor names in [`MmFeatures`] for one audio item.
pub const FEATURES: &str = "input_features";
/// `[1]` u32: mel frames that carry audio (the rest is padding).
pub const FEATURE_FRAMES: &str = "feature_frames";

/// Qwen2Config defaults for fields a `text_config` may leave out.
fn qwen2_text_defaults() -> Value {
    serde_json::json!({
        "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
        "tie_word_embeddings": false,
    })
}

#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    audio_config: AudioEncoderConfig,
    #[serde(default)]
    text_config: Value,
    #[serde(alias = "audio_token_id")]
    audio_token_index: Option<u32>,
}

/// The parts of a Qwen2-Audio `config.json`.
#[derive(Debug, Clone)]
pub struct Qwen2AudioConfig {
    pub audio: AudioEncoderConfig,
    pub text: HfConfig,
    pub audio_token_id: u32,
}

impl Qwen2AudioConfig {
    pub fn from_json(raw: &Value) -> MResult<Self> {
        let r: RawConfig = serde_json::from_value(raw.clone())
            .map_err(|e| ModelError::Config(format!("Qwen2-Audio config: {e}")))?;
        let mut text = qwen2_text_defaults();
        if let (Some(dst), Some(src)) = (text.as_object_mut(), r.text_config.as_object()) {
            for (k, v) in src {
                dst.insert(k.clone(), v.clone());
            }
        }
        if let Some(t) = text.as_object_mut() {
            // Qwen2Config's default, unless the config sets rope its newer way.
            if !t.contains_key("rope_theta") && !t.contains_key("rope_parameters") {
                t.insert("rope_theta".into(), serde_json::json!(10000.0));
            }
        }
        let text = HfConfig::from_json_str(&text.to_string())?;
        Ok(Self {
            audio: r.audio_config,
            text,
            audio_token_id: r.audio_token_index.unwrap_or(151646),
        })
    }
}

fn load_folder(ck: &Checkpoint) -> MResult<Built> {
    let cfg = Qwen2AudioConfig::from_json(ck.config)?;
    let (pp, text) = ck.read_required("preprocessor_config.json")?;
    let extractor = candela_media::audio::WhisperFeatureExtractor::from_preprocessor_config(&text)
        .map_err(|e| ModelError::InvalidJson {
            what: "preprocessor_config.json",
            path: pp.clone(),
            message: e.to_string(),
        })?;
    if extractor.n_mels() != cfg.audio.num_mel_bins {
        return Err(ModelError::Config(format!(
            "preprocessor_config.json has {} mel bins but the audio encoder takes {}",
            extractor.n_mels(),
            cfg.audio.num_mel_bins
        )));
    }
    let processor = AudioProcessor {
        extractor,
        placeholder_token: cfg.audio_token_id,
        pooled: true,
        max_source_positions: cfg.audio.max_source_positions,
    };
    let model = load(&cfg, &ck.weights()?, ck.max_model_len)?;
    Ok(Built {
        model: Box::new(model),
        processor: Some(Arc::new(processor)),
        text: cfg.text.clone(),
    })
}

/// The language model, audio tower and projector of a checkpoint.
pub fn load(
    cfg: &Qwen2AudioConfig,
    w: &Weights,
    max_model_len: Option<usize>,
) -> MResult<MultimodalLm> {
    // Released checkpoints vs. the newer module layout.
    let (lm_w, tower, projector) = if w.contains("language_model.model.embed_tokens.weight") {
        (
            w.renamed(|n: &str| format!("language_model.{n}"))?,
            "audio_tower",
            "multi_modal_projector.linear",
        )
    } else {
        (
            w.renamed(|n: &str| match n.strip_prefix("model.") {
                Some(rest) => format!("model.language_model.{rest}"),
                None => n.to_string(),
            })?,
            "model.audio_tower",
            "model.multi_modal_projector.linear",
        )
    };
    let text = crate::families::qwen2::config_from_hf(&cfg.text, max_model_len)?;
    let hidden = text.hidden_size;
    let lm = DecoderLm::load(text, &lm_w)?;
    let encoder = AudioEncoder::load(cfg.audio.clone(), w, tower, true)?;
    let projector = w.linear(projector, cfg.audio.d_model, hidden, true)?;
    Ok(MultimodalLm::new(
        lm,
        Box::new(Qwen2AudioEncoder { encoder, projector }),
        HF_ARCHITECTURE,
    ))
}

/// Whisper encoder, stride-2 pool, linear projector.
struct Qwen2AudioEncoder {
    encoder: AudioEncoder,
    projector: Linear,
}

impl MediaEncoder for Qwen2AudioEncoder {
    fn encode(&self, features: &MmFeatures) -> Result<Tensor> {
        let (Some(x), Some(frames)) = (features.get(FEATURES), features.get(FEATURE_FRAMES)) else {
            bail!("Qwen2-Audio takes audio only (input_features + feature_frames)");
        };
        let frames = frames.flatten_all()?.to_vec1::<u32>()?;
        let &[frames] = frames.as_slice() else {
            bail!("feature_frames must hold one number")
        };
        self.projector
            .forward(&self.encoder.forward(x, frames as usize)?)
    }
}
