//! Gemma 3's language model (`Gemma3ForCausalLM`; the same LM sits inside
//! `Gemma3ForConditionalGeneration` as `text_config`): the llama block with
//! Gemma's RMSNorm (`1 + weight`), q/k norms, sandwich norms around attention
//! and MLP, a GELU-tanh MLP, embeddings scaled by `sqrt(hidden_size)`, and
//! sliding-window (local) layers interleaved with global ones, each kind
//! with its own rotary embedding. Optional tanh softcapping of the logits
//! (`final_logit_softcapping`, Gemma 2's; off in released Gemma 3 configs).
//! `attn_logit_softcapping` is ignored, as transformers' Gemma 3 ignores it
//! (it stores the value but never passes it to attention).
//!
//! `Gemma3ForConditionalGeneration` adds the image path ([`vision`],
//! [`processor`]): images' soft tokens attend to each other both ways
//! during prefill, and the logits are not softcapped (transformers'
//! conditional-generation head does not apply `final_logit_softcapping`).
//!
//! Both config generations are read: transformers 4.5x (`rope_theta`,
//! `rope_local_base_freq`, `rope_scaling`, `sliding_window_pattern`) and 5.x
//! (`layer_types`, `rope_parameters` per layer type).

pub mod gguf;
pub mod pan_and_scan;
pub mod processor;
pub mod vision;

use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use super::{Built, Checkpoint, Family};
use crate::config::{HfConfig, RopeScaling as HfRopeScaling};
use crate::error::{ModelError, Result};
use crate::multimodal::{language_model_weights, MultimodalLm};
use crate::nn::activation::Activation;
use crate::nn::decoder::{
    hf_base_config, hf_rope_scaling, DecoderConfig, DecoderLm, SlidingWindow,
};
use crate::rope::RopeConfig;

pub const HF_ARCHITECTURE: &str = "Gemma3ForCausalLM";
pub const HF_VISION_ARCHITECTURE: &str = "Gemma3ForConditionalGeneration";

pub const FAMILY: Family = Family {
    name: "gemma3",
    hf_architectures: &[HF_ARCHITECTURE],
    gguf_architectures: &[gguf::GGUF_ARCHITECTURE],
    load_folder,
    gguf_config: Some(gguf::config_from_gguf),
    mmproj: Some(gguf::MMPROJ),
};

pub const VISION_FAMILY: Family = Family {
    name: "gemma3-vision",
    hf_architectures: &[HF_VISION_ARCHITECTURE],
    gguf_architectures: &[],
    load_folder: load_vision_folder,
    gguf_config: None,
    mmproj: None,
};

/// `Gemma3TextConfig`'s defaults (gemma-3-4b) for the fields a
/// `text_config` may leave out.
fn text_defaults() -> Value {
    serde_json::json!({
        "model_type": "gemma3_text", "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216,
        "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": true,
        "query_pre_attn_scalar": 256, "sliding_window": 4096,
    })
}

/// The Gemma-specific fields of a text config.
#[derive(Debug, Deserialize)]
struct GemmaFields {
    query_pre_attn_scalar: f64,
    sliding_window: Option<usize>,
    layer_types: Option<Vec<String>>,
    /// 4.5x: every n-th layer is global (default 6).
    sliding_window_pattern: Option<usize>,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_local_base_freq: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<HfRopeScaling>,
    /// 5.x: `{"full_attention": {...}, "sliding_attention": {...}}`.
    #[serde(default)]
    rope_parameters: Option<Value>,
    hidden_activation: Option<String>,
    #[serde(default)]
    final_logit_softcapping: Option<f64>,
    #[serde(default)]
    use_bidirectional_attention: Option<bool>,
}

/// A Gemma 3 text config: the common fields and the decoder built from them.
#[derive(Debug, Clone)]
pub struct Gemma3TextConfig {
    pub text: HfConfig,
    pub decoder: DecoderConfig,
}

impl Gemma3TextConfig {
    /// From a `Gemma3ForCausalLM` `config.json` or a
    /// `Gemma3ForConditionalGeneration`'s `text_config` (missing fields take
    /// transformers' defaults).
    pub fn from_json(raw: &Value, max_model_len: Option<usize>) -> Result<Self> {
        let bad = |m: String| ModelError::Config(format!("Gemma 3 config: {m}"));
        let mut json = text_defaults();
        if let (Some(dst), Some(src)) = (json.as_object_mut(), raw.as_object()) {
            for (k, v) in src {
                dst.insert(k.clone(), v.clone());
            }
            // Gemma names it `hidden_activation`; HfConfig's `hidden_act` means SiLU.
            dst.remove("hidden_act");
        }
        let g: GemmaFields =
            serde_json::from_value(json.clone()).map_err(|e| bad(e.to_string()))?;
        let text = HfConfig::from_json_str(&json.to_string())?;
        if g.use_bidirectional_attention == Some(true) {
            return Err(bad(
                "use_bidirectional_attention (EmbeddingGemma) is not supported".into(),
            ));
        }
        let mlp_act = Activation::parse(
            g.hidden_activation
                .as_deref()
                .unwrap_or("gelu_pytorch_tanh"),
        )?;
        if mlp_act != Activation::GeluTanh {
            return Err(bad(format!(
                "hidden_activation {:?} (Gemma 3 uses gelu_pytorch_tanh)",
                g.hidden_activation
            )));
        }
        let n = text.num_hidden_layers;
        let sliding_layers: Vec<bool> = match &g.layer_types {
            Some(t) => {
                if t.len() != n {
                    return Err(bad(format!("{} layer_types for {n} layers", t.len())));
                }
                t.iter()
                    .map(|k| match k.as_str() {
                        "sliding_attention" => Ok(true),
                        "full_attention" => Ok(false),
                        other => Err(bad(format!("unknown layer type {other:?}"))),
                    })
                    .collect::<Result<_>>()?
            }
            None => {
                let p = g.sliding_window_pattern.unwrap_or(6).max(1);
                (0..n).map(|i| (i + 1) % p != 0).collect()
            }
        };

        // Rope per layer type: 5.x nests it, 4.5x spreads it over three keys.
        let typed = |kind: &str| -> Result<Option<HfRopeScaling>> {
            g.rope_parameters
                .as_ref()
                .and_then(|p| p.get(kind))
                .map(|v| serde_json::from_value(v.clone()).map_err(|e| bad(format!("{kind}: {e}"))))
                .transpose()
        };
        let global = typed("full_attention")?;
        let local = typed("sliding_attention")?;
        let global_theta = global
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(g.rope_theta)
            .unwrap_or(1_000_000.0);
        let local_theta = local
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(g.rope_local_base_freq)
            .unwrap_or(10_000.0);
        let global_scaling = hf_rope_scaling(global.as_ref().or(g.rope_scaling.as_ref()))?;
        let local_scaling = hf_rope_scaling(local.as_ref())?;

        let mut d = hf_base_config(&text, HF_ARCHITECTURE, max_model_len)?;
        d.rope.theta = global_theta as f32;
        d.rope.scaling = global_scaling;
        let local_rope = RopeConfig {
            theta: local_theta as f32,
            scaling: local_scaling,
            ..d.rope.clone()
        };
        d.qk_norm = true;
        let bias = text.attention_bias.unwrap_or(false);
        d.qkv_bias = bias;
        d.o_bias = bias;
        d.tie_word_embeddings = text.tie_word_embeddings.unwrap_or(true);
        d.norm_unit_offset = true;
        d.embed_scale = Some((text.hidden_size as f64).sqrt());
        d.sandwich_norms = true;
        d.mlp_act = mlp_act;
        if g.query_pre_attn_scalar.is_nan() || g.query_pre_attn_scalar <= 0.0 {
            return Err(bad("query_pre_attn_scalar must be positive".into()));
        }
        d.attn_scale = Some(g.query_pre_attn_scalar.powf(-0.5) as f32);
        d.final_softcap = g.final_logit_softcapping.map(|c| c as f32);
        d.sliding_window = match g.sliding_window {
            Some(size) if sliding_layers.contains(&true) => Some(SlidingWindow {
                size,
                layers: sliding_layers,
                rope: Some(local_rope),
            }),
            // No window: every layer is global, with the global rope.
            _ => None,
        };
        d.validate()?;
        Ok(Self { text, decoder: d })
    }
}

/// The decoder config of a `Gemma3ForCausalLM` `config.json`.
pub fn config_from_json(raw: &Value, max_model_len: Option<usize>) -> Result<DecoderConfig> {
    Ok(Gemma3TextConfig::from_json(raw, max_model_len)?.decoder)
}

fn load_folder(ck: &Checkpoint) -> Result<Built> {
    let cfg = Gemma3TextConfig::from_json(ck.config, ck.max_model_len)?;
    let model = DecoderLm::load(cfg.decoder, &ck.weights()?)?;
    Ok(Built {
        model: Box::new(model),
        processor: None,
        text: cfg.text,
    })
}

fn load_vision_folder(ck: &Checkpoint) -> Result<Built> {
    let text_json = ck.config.get("text_config").cloned().unwrap_or(Value::Null);
    let mut cfg = Gemma3TextConfig::from_json(&text_json, ck.max_model_len)?;
    // transformers' Gemma3ForConditionalGeneration never softcaps its logits.
    cfg.decoder.final_softcap = None;
    cfg.decoder.bidirectional_media = true;
    cfg.decoder.architecture = HF_VISION_ARCHITECTURE.into();
    let vision_cfg = vision::Gemma3VisionConfig::from_json(ck.config)?;
    let (pp, text) = ck.read_required("preprocessor_config.json")?;
    let processor = processor::Gemma3ImageProcessor::new(&text, &vision_cfg, ck.tokenizer)
        .map_err(|message| ModelError::InvalidJson {
            what: "preprocessor config",
            path: pp,
            message,
        })?;
    let w = ck.weights()?;
    let (lm_w, _) = language_model_weights(&w)?;
    let lm = DecoderLm::load(cfg.decoder, &lm_w)?;
    let encoder = vision::Gemma3ImageEncoder::load(&vision_cfg, &w, cfg.text.hidden_size)?;
    Ok(Built {
        model: Box::new(MultimodalLm::new(
            lm,
            Box::new(encoder),
            HF_VISION_ARCHITECTURE,
        )),
        processor: Some(Arc::new(processor)),
        text: cfg.text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rope::RopeScaling;

    /// google/gemma-3-4b-it's `text_config` (transformers 4.50 format).
    fn gemma_3_4b_text() -> Value {
        serde_json::json!({
            "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
            "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024
        })
    }

    #[test]
    fn released_4b_text_config() {
        let c = Gemma3TextConfig::from_json(&gemma_3_4b_text(), Some(4096)).unwrap();
        let d = &c.decoder;
        assert_eq!((d.num_heads, d.num_kv_heads, d.head_dim), (8, 4, 256));
        assert_eq!(d.rope.theta, 1_000_000.0);
        assert_eq!(d.rope.scaling, RopeScaling::Linear { factor: 8.0 });
        let s = d.sliding_window.as_ref().unwrap();
        assert_eq!(s.size, 1024);
        let r = s.rope.as_ref().unwrap();
        assert_eq!((r.theta, &r.scaling), (10_000.0, &RopeScaling::None));
        // Every sixth layer is global.
        let globals: Vec<usize> = (0..34).filter(|&i| !s.layers[i]).collect();
        assert_eq!(globals, [5, 11, 17, 23, 29]);
        assert_eq!(d.attn_scale, Some(1.0 / 16.0));
        assert_eq!(d.embed_scale, Some(2560f64.sqrt()));
        assert!(d.norm_unit_offset && d.sandwich_norms && d.qk_norm && d.tie_word_embeddings);
        assert_eq!((d.attn_softcap, d.final_softcap), (None, None));
        assert_eq!(d.max_model_len(), 4096);
        assert_eq!(c.text.vocab_size, 262208);
    }

    #[test]
    fn transformers_5_rope_parameters() {
        let mut j = gemma_3_4b_text();
        j.as_object_mut().unwrap().remove("rope_scaling");
        j["layer_types"] = serde_json::json!(vec!["full_attention"; 34]);
        j["layer_types"][0] = "sliding_attention".into();
        j["rope_parameters"] = serde_json::json!({
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 5000.0},
        });
        let d = config_from_json(&j, Some(64)).unwrap();
        assert_eq!(
            (d.rope.theta, &d.rope.scaling),
            (500_000.0, &RopeScaling::Linear { factor: 4.0 })
        );
        let s = d.sliding_window.unwrap();
        assert_eq!(s.rope.unwrap().theta, 5000.0);
        assert_eq!(s.layers.iter().filter(|&&x| x).count(), 1);
    }

    #[test]
    fn bad_configs_are_errors() {
        for (k, v) in [
            ("use_bidirectional_attention", serde_json::json!(true)),
            ("hidden_activation", serde_json::json!("silu")),
            ("layer_types", serde_json::json!(["sliding_attention"])),
            ("query_pre_attn_scalar", serde_json::json!(0)),
            ("sliding_window", serde_json::json!(0)),
        ] {
            let mut j = gemma_3_4b_text();
            j[k] = v;
            assert!(config_from_json(&j, Some(64)).is_err(), "{k} accepted");
        }
    }
}
