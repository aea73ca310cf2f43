//! Qwen2 / Qwen2.5: the llama block with biases on q/k/v (never on o) and
//! neox rope, also in GGUF files.

use crate::config::HfConfig;
use crate::error::{ModelError, Result};
use crate::nn::decoder::{gguf_base_config, hf_base_config, DecoderConfig};
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
    if cfg.use_sliding_window == Some(true) {
        return Err(ModelError::Config(
            "Qwen2 sliding-window attention (use_sliding_window: true) is not supported".into(),
        ));
    }
    let mut c = hf_base_config(cfg, HF_ARCHITECTURE, max_model_len)?;
    c.qkv_bias = true;
    Ok(c)
}

pub fn config_from_gguf(g: &GgufWeights, max_model_len: Option<usize>) -> Result<DecoderConfig> {
    let mut c = gguf_base_config(g, GGUF_ARCHITECTURE, HF_ARCHITECTURE, max_model_len)?;
    c.qkv_bias = true;
    c.o_bias = false;
    Ok(c)
}
