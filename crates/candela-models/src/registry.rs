//! Architecture name -> constructor. Folders are keyed by `config.json`
//! `architectures[0]`, GGUF files by `general.architecture`.

use candela_core::model::Model;

use crate::config::HfConfig;
use crate::error::{ModelError, Result};
use crate::layers::{DecoderConfig, DecoderLm};
use crate::weights::{GgufWeights, Weights};
use crate::{llama, qwen2, qwen3};

/// Maps a folder's `config.json` (or a GGUF file's metadata) to the shared
/// decoder's configuration; the max model length caps the served context.
pub type HfConfigFn = fn(&HfConfig, Option<usize>) -> Result<DecoderConfig>;
pub type GgufConfigFn = fn(&GgufWeights, Option<usize>) -> Result<DecoderConfig>;

/// One supported architecture.
#[derive(Debug)]
pub struct Architecture {
    /// `config.json` name, e.g. `LlamaForCausalLM`.
    pub hf_name: &'static str,
    /// GGUF `general.architecture`, e.g. `llama`.
    pub gguf_name: &'static str,
    pub config_from_hf: HfConfigFn,
    pub config_from_gguf: GgufConfigFn,
}

impl Architecture {
    /// Build from a model folder's config and safetensors.
    pub fn build_hf(&self, cfg: &HfConfig, weights: &Weights, max_model_len: Option<usize>) -> Result<Box<dyn Model>> {
        Ok(Box::new(DecoderLm::load((self.config_from_hf)(cfg, max_model_len)?, weights)?))
    }

    /// Build from a GGUF file's metadata and tensors.
    pub fn build_gguf(&self, gguf: &GgufWeights, weights: &Weights, max_model_len: Option<usize>) -> Result<Box<dyn Model>> {
        Ok(Box::new(DecoderLm::load((self.config_from_gguf)(gguf, max_model_len)?, weights)?))
    }
}

pub const ARCHITECTURES: &[Architecture] = &[
    Architecture {
        hf_name: llama::HF_ARCHITECTURE,
        gguf_name: llama::GGUF_ARCHITECTURE,
        config_from_hf: llama::config_from_hf,
        config_from_gguf: llama::config_from_gguf,
    },
    Architecture {
        hf_name: qwen2::HF_ARCHITECTURE,
        gguf_name: qwen2::GGUF_ARCHITECTURE,
        config_from_hf: qwen2::config_from_hf,
        config_from_gguf: qwen2::config_from_gguf,
    },
    Architecture {
        hf_name: qwen3::HF_ARCHITECTURE,
        gguf_name: qwen3::GGUF_ARCHITECTURE,
        config_from_hf: qwen3::config_from_hf,
        config_from_gguf: qwen3::config_from_gguf,
    },
];

/// Names accepted in `config.json` `architectures`.
pub fn supported_hf_architectures() -> Vec<&'static str> {
    ARCHITECTURES.iter().map(|a| a.hf_name).collect()
}

/// Names accepted as GGUF `general.architecture`.
pub fn supported_gguf_architectures() -> Vec<&'static str> {
    ARCHITECTURES.iter().map(|a| a.gguf_name).collect()
}

pub fn by_hf_name(name: &str) -> Result<&'static Architecture> {
    ARCHITECTURES
        .iter()
        .find(|a| a.hf_name == name)
        .ok_or_else(|| ModelError::UnsupportedArchitecture {
            name: name.to_string(),
            supported: supported_hf_architectures().join(", "),
        })
}

pub fn by_gguf_name(name: &str) -> Result<&'static Architecture> {
    ARCHITECTURES
        .iter()
        .find(|a| a.gguf_name == name)
        .ok_or_else(|| ModelError::UnsupportedArchitecture {
            name: name.to_string(),
            supported: format!(
                "{} (GGUF general.architecture)",
                supported_gguf_architectures().join(", ")
            ),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups() {
        assert_eq!(by_hf_name("Qwen3ForCausalLM").unwrap().gguf_name, "qwen3");
        assert_eq!(by_gguf_name("llama").unwrap().hf_name, "LlamaForCausalLM");
        let err = by_hf_name("MambaForCausalLM").unwrap_err().to_string();
        assert!(
            err.contains("MambaForCausalLM")
                && err.contains("LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"),
            "{err}"
        );
        assert!(by_gguf_name("gemma3")
            .unwrap_err()
            .to_string()
            .contains("llama, qwen2, qwen3"));
    }
}
