//! Qwen3 (dense): explicit `head_dim`, per-head RMSNorm of q and k before
//! rope, no q/k/v bias unless `attention_bias`; neox rope, also in GGUF.

use crate::config::HfConfig;
use crate::error::Result;
use crate::nn::decoder::{gguf_base_config, hf_base_config, DecoderConfig};
use crate::weights::GgufWeights;

use super::Family;

pub const HF_ARCHITECTURE: &str = "Qwen3ForCausalLM";
pub const GGUF_ARCHITECTURE: &str = "qwen3";

pub const FAMILY: Family = Family {
    name: "qwen3",
    hf_architectures: &[HF_ARCHITECTURE],
    gguf_architectures: &[GGUF_ARCHITECTURE],
    load_folder: |ck| super::text_folder(ck, config_from_hf),
    gguf_config: Some(config_from_gguf),
    mmproj: None,
};

pub fn config_from_hf(cfg: &HfConfig, max_model_len: Option<usize>) -> Result<DecoderConfig> {
    let mut c = hf_base_config(cfg, HF_ARCHITECTURE, max_model_len)?;
    let bias = cfg.attention_bias.unwrap_or(false);
    c.qkv_bias = bias;
    c.o_bias = bias;
    c.qk_norm = true;
    Ok(c)
}

pub fn config_from_gguf(g: &GgufWeights, max_model_len: Option<usize>) -> Result<DecoderConfig> {
    let mut c = gguf_base_config(g, GGUF_ARCHITECTURE, HF_ARCHITECTURE, max_model_len)?;
    c.qk_norm = true;
    Ok(c)
}
