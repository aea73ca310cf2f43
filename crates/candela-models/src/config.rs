//! Serde views of Hugging Face `config.json` and `generation_config.json` for
//! the decoder architectures we run (llama, qwen2, qwen3).
//!
//! Unknown keys are ignored; keys that changed names across transformers
//! versions (`rope_scaling` vs `rope_parameters`, `torch_dtype` vs `dtype`)
//! are both accepted.

use std::path::Path;

use serde::Deserialize;

use crate::error::{ModelError, Result};

/// An id field that Hugging Face writes either as one integer or a list.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Self::One(x) => vec![*x],
            Self::Many(v) => v.clone(),
        }
    }
    pub fn first(&self) -> Option<u32> {
        match self {
            Self::One(x) => Some(*x),
            Self::Many(v) => v.first().copied(),
        }
    }
}

/// `rope_scaling` (or the newer `rope_parameters`). Llama 3 style scaling is
/// the one with real support; `linear` is also applied; `default` is none.
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
pub struct RopeScaling {
    /// Newer configs write `rope_type`, older ones `type`.
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
    /// Only in `rope_parameters` (transformers >= 5).
    #[serde(default)]
    pub rope_theta: Option<f64>,
}

/// The subset of a decoder LM's `config.json` that the forward pass needs.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// transformers >= 5 writes rope settings here instead.
    #[serde(default)]
    pub rope_parameters: Option<RopeScaling>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    #[serde(default)]
    pub mlp_bias: Option<bool>,
    pub vocab_size: usize,
    #[serde(default, alias = "dtype")]
    pub torch_dtype: Option<String>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub bos_token_id: Option<OneOrMany>,
    #[serde(default)]
    pub eos_token_id: Option<OneOrMany>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    /// Keys a sliding-window layer sees (Qwen2, Mistral).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Qwen2: layers from this index on slide (when `layer_types` is absent).
    #[serde(default)]
    pub max_window_layers: Option<usize>,
    /// transformers >= 4.53: `"full_attention"` / `"sliding_attention"` per layer.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
}

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}

impl HfConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| match e {
            ModelError::Config(message) => ModelError::InvalidJson {
                what: "config.json",
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let cfg: Self =
            serde_json::from_str(text).map_err(|e| ModelError::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The first entry of `architectures`, e.g. `LlamaForCausalLM`.
    pub fn architecture(&self) -> Option<&str> {
        self.architectures.first().map(|s| s.as_str())
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    pub fn rope_theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| self.rope_parameters.as_ref().and_then(|p| p.rope_theta))
            .unwrap_or(10_000.0)
    }

    /// The effective rope scaling block (`rope_scaling`, else
    /// `rope_parameters`), if it asks for anything but the default.
    pub fn rope_scaling(&self) -> Option<&RopeScaling> {
        let s = self
            .rope_scaling
            .as_ref()
            .or(self.rope_parameters.as_ref())?;
        match s.rope_type.as_deref() {
            None | Some("default") => None,
            Some(_) => Some(s),
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(m));
        if self.hidden_size == 0 || self.num_hidden_layers == 0 || self.vocab_size == 0 {
            return bad("hidden_size, num_hidden_layers and vocab_size must be positive".into());
        }
        if self.num_attention_heads == 0 {
            return bad("num_attention_heads must be positive".into());
        }
        let kv = self.num_kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return bad(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({kv})",
                self.num_attention_heads
            ));
        }
        let hd = self.head_dim();
        if hd == 0 || !hd.is_multiple_of(2) {
            return bad(format!("head_dim must be even and positive, got {hd}"));
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return bad(format!("unsupported hidden_act {act:?} (only silu)"));
            }
        }
        Ok(())
    }
}

/// `generation_config.json`: defaults for sampling and stopping.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct GenerationConfig {
    #[serde(default)]
    pub bos_token_id: Option<OneOrMany>,
    #[serde(default)]
    pub eos_token_id: Option<OneOrMany>,
    #[serde(default)]
    pub pad_token_id: Option<OneOrMany>,
    #[serde(default)]
    pub do_sample: Option<bool>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<i32>,
    #[serde(default)]
    pub min_p: Option<f32>,
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
    #[serde(default)]
    pub max_length: Option<usize>,
}

impl GenerationConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| ModelError::InvalidJson {
            what: "generation_config.json",
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_llama3_config() {
        let cfg = HfConfig::from_json_str(
            r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"rms_norm_eps":1e-5,
            "rope_theta":500000.0,"rope_scaling":{"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
            "original_max_position_embeddings":8192,"rope_type":"llama3"},"max_position_embeddings":131072,
            "tie_word_embeddings":true,"vocab_size":1000,"torch_dtype":"bfloat16","eos_token_id":[1,2],
            "head_dim":null}"#,
        )
        .unwrap();
        assert_eq!(cfg.architecture(), Some("LlamaForCausalLM"));
        assert_eq!(cfg.head_dim(), 16);
        assert_eq!(cfg.num_kv_heads(), 2);
        assert_eq!(cfg.rope_theta(), 500000.0);
        let s = cfg.rope_scaling().unwrap();
        assert_eq!(s.rope_type.as_deref(), Some("llama3"));
        assert_eq!(s.factor, Some(8.0));
        assert_eq!(cfg.eos_token_id, Some(OneOrMany::Many(vec![1, 2])));
    }

    #[test]
    fn accepts_type_key_and_rope_parameters() {
        let cfg = HfConfig::from_json_str(
            r#"{"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
            "vocab_size":10,"rope_scaling":{"type":"linear","factor":2.0}}"#,
        )
        .unwrap();
        assert_eq!(
            cfg.rope_scaling().unwrap().rope_type.as_deref(),
            Some("linear")
        );
        assert_eq!(cfg.rope_theta(), 10000.0);

        let cfg = HfConfig::from_json_str(
            r#"{"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
            "vocab_size":10,"rope_parameters":{"rope_type":"default","rope_theta":1000000.0},"dtype":"bfloat16"}"#,
        )
        .unwrap();
        assert!(cfg.rope_scaling().is_none());
        assert_eq!(cfg.rope_theta(), 1_000_000.0);
        assert_eq!(cfg.torch_dtype.as_deref(), Some("bfloat16"));
    }

    #[test]
    fn rejects_bad_head_counts() {
        let err = HfConfig::from_json_str(
            r#"{"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
            "num_key_value_heads":3,"vocab_size":10}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("multiple"), "{err}");
    }

    #[test]
    fn parses_generation_config() {
        let g: GenerationConfig = serde_json::from_str(
            r#"{"bos_token_id":1,"eos_token_id":[2,3],"temperature":0.6,"top_p":0.9,"do_sample":true}"#,
        )
        .unwrap();
        assert_eq!(g.eos_token_id.unwrap().to_vec(), vec![2, 3]);
        assert_eq!(g.bos_token_id.unwrap().first(), Some(1));
        assert_eq!(g.temperature, Some(0.6));
        assert_eq!(g.top_k, None);
    }
}
