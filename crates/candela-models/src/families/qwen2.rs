//! Qwen2 / Qwen2.5: the llama block with biases on q/k/v (never on o) and
//! neox rope, also in GGUF files.

use crate::config::HfConfig;
use crate::error::{ModelError, Result};
use crate::nn::decoder::{gguf_base_config, hf_base_config, DecoderConfig, SlidingWindow};
use crate::weights::GgufWeights;

use super::Family;

pub const HF_ARCHITECTURE: &str = "Qwen2ForCausalLM";
pub const GGUF_ARCHITECTURE: &str = "qwen2";

pub const FAMILY: Family = Family {
    name: "qwen2",
    hf_architectures: &[HF_ARCHITECTURE],
    gguf_architectures: &[GGUF_ARCHITECTURE],
    load_folder: |ck| super::text_folder(ck, config_from_hf),
    gguf_config: Some(config_from_gguf),
    mmproj: None,
};

pub fn config_from_hf(cfg: &HfConfig, max_model_len: Option<usize>) -> Result<DecoderConfig> {
    let mut c = hf_base_config(cfg, HF_ARCHITECTURE, max_model_len)?;
    c.qkv_bias = true;
    c.sliding_window = sliding_window(cfg)?;
    Ok(c)
}

/// transformers' Qwen2 rule: only with `use_sliding_window`, the layers typed
/// `"sliding_attention"` (without `layer_types`: those from
/// `max_window_layers` on, 28 by default) see the last `sliding_window` keys.
fn sliding_window(cfg: &HfConfig) -> Result<Option<SlidingWindow>> {
    let size = match (cfg.use_sliding_window, cfg.sliding_window) {
        (Some(true), Some(size)) => size,
        _ => return Ok(None),
    };
    if size == 0 {
        return Err(ModelError::Config("sliding_window must be positive".into()));
    }
    let n = cfg.num_hidden_layers;
    let layers: Vec<bool> = match &cfg.layer_types {
        Some(types) if types.len() != n => {
            return Err(ModelError::Config(format!(
                "{} layer_types for {n} layers",
                types.len()
            )))
        }
        Some(types) => types.iter().map(|t| t == "sliding_attention").collect(),
        None => {
            let first = cfg.max_window_layers.unwrap_or(28);
            (0..n).map(|i| i >= first).collect()
        }
    };
    Ok(layers.contains(&true).then_some(SlidingWindow {
        size,
        layers,
        rope: None,
    }))
}

pub fn config_from_gguf(g: &GgufWeights, max_model_len: Option<usize>) -> Result<DecoderConfig> {
    let mut c = gguf_base_config(g, GGUF_ARCHITECTURE, HF_ARCHITECTURE, max_model_len)?;
    c.qkv_bias = true;
    c.o_bias = false;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: serde_json::Value) -> HfConfig {
        let mut j = serde_json::json!({
            "architectures": [HF_ARCHITECTURE], "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 1,
            "vocab_size": 64, "sliding_window": 8, "max_window_layers": 2
        });
        for (k, v) in extra.as_object().unwrap() {
            j[k] = v.clone();
        }
        HfConfig::from_json_str(&j.to_string()).unwrap()
    }

    fn windows(c: &DecoderConfig) -> Vec<Option<usize>> {
        (0..c.num_layers).map(|i| c.attn_params(i).window).collect()
    }

    #[test]
    fn sliding_layers_follow_transformers() {
        let off = config_from_hf(&cfg(serde_json::json!({})), None).unwrap();
        assert!(off.sliding_window.is_none());
        let on = |extra| config_from_hf(&cfg(extra), None).unwrap();
        let c = on(serde_json::json!({"use_sliding_window": true}));
        assert_eq!(windows(&c), [None, None, Some(8), Some(8)]);
        let c = on(serde_json::json!({"use_sliding_window": true, "max_window_layers": 0}));
        assert_eq!(windows(&c), [Some(8); 4]);
        // Every layer below max_window_layers: nothing slides.
        let c = on(serde_json::json!({"use_sliding_window": true, "max_window_layers": 4}));
        assert!(c.sliding_window.is_none());
        let types = [
            "sliding_attention",
            "full_attention",
            "sliding_attention",
            "full_attention",
        ];
        let c = on(serde_json::json!({"use_sliding_window": true, "layer_types": types}));
        assert_eq!(windows(&c), [Some(8), None, Some(8), None]);
        // layer_types without use_sliding_window: full attention (sliding_window is None).
        let c = on(serde_json::json!({"layer_types": types}));
        assert!(c.sliding_window.is_none());
        let bad =
            cfg(serde_json::json!({"use_sliding_window": true, "layer_types": ["full_attention"]}));
        assert!(config_from_hf(&bad, None).is_err());
    }
}
