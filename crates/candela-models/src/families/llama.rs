//! Llama (1/2/3.x) and llama-shaped checkpoints such as SmolLM.
//!
//! `attention_bias` puts biases on q/k/v/o, `mlp_bias` on the MLP; rope may
//! carry Llama 3 or linear scaling. GGUF files (`general.architecture =
//! "llama"`) store Q/K permuted by llama.cpp's converter, so they run with
//! interleaved rope instead of being un-permuted.

use crate::config::HfConfig;
use crate::error::Result;
use crate::nn::decoder::{gguf_base_config, hf_base_config, DecoderConfig};
use crate::weights::GgufWeights;

use super::Family;

pub const HF_ARCHITECTURE: &str = "LlamaForCausalLM";
pub const GGUF_ARCHITECTURE: &str = "llama";

pub const FAMILY: Family = Family {
    name: "llama",
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
    c.mlp_bias = cfg.mlp_bias.unwrap_or(false);
    Ok(c)
}

pub fn config_from_gguf(g: &GgufWeights, max_model_len: Option<usize>) -> Result<DecoderConfig> {
    gguf_base_config(g, GGUF_ARCHITECTURE, HF_ARCHITECTURE, max_model_len)
}
