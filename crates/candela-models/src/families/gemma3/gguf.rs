//! Gemma 3 from llama.cpp's files: a `gemma3` language-model GGUF (text
//! only, or with an mmproj whose `clip.projector_type` is `gemma3`).
//!
//! What llama.cpp's converter writes differently from the transformers
//! checkpoint, and how it is read back here:
//! - every RMSNorm weight (`*norm.weight`, q/k norms and the projector's
//!   `mm.soft_emb_norm` included) is stored with Gemma's `+ 1` already
//!   added: the norms scale by the weight as stored;
//! - the layer kinds are not stored: as llama.cpp does, every sixth layer is
//!   global unless `gemma3.attention.sliding_window_pattern` says otherwise;
//!   the sliding layers' rope base is `rope.freq_base_swa` (10,000 when
//!   absent), unscaled;
//! - `query_pre_attn_scalar` is not stored: the attention scale is
//!   `1/sqrt(head_dim)`, except for 62-layer models (Gemma 3 27B), where
//!   llama.cpp uses `1/sqrt(hidden / heads)`;
//! - token embeddings are cut to the tokenizer's vocabulary (transformers
//!   pads them to 262208 rows);
//! - `final_logit_softcapping` is written from the text config, and applies
//!   to text-only loads (`Gemma3ForCausalLM`); with an mmproj it is ignored,
//!   as transformers' `Gemma3ForConditionalGeneration` ignores it;
//! - the mmproj: SigLIP as `v.*` (`mlp.fc1` = `ffn_up`), the projection as
//!   `mm.input_projection.weight` (always F16, same `[vision, text]` layout),
//!   tower embeddings always F32; `mm_tokens_per_image` is
//!   `(grid / clip.vision.projector.scale_factor)^2` (factor 4 when absent);
//!   the image tokens (`<start_of_image>`, `<end_of_image>`,
//!   `<image_soft_token>`) come from the text GGUF's vocabulary, and the
//!   image processor from `image_size`, `image_mean` and `image_std`.

use std::sync::Arc;

use serde_json::json;

use super::processor::Gemma3ImageProcessor;
use super::vision::{Gemma3ImageEncoder, Gemma3VisionConfig};
use super::{HF_ARCHITECTURE, HF_VISION_ARCHITECTURE};
use crate::error::{ModelError, Result};
use crate::families::MmprojFamily;
use crate::mmproj::{BuiltPair, GgufPair, Tower};
use crate::multimodal::MultimodalLm;
use crate::nn::activation::Activation;
use crate::nn::decoder::{gguf_base_config, DecoderConfig, DecoderLm, RmsNorm, SlidingWindow};
use crate::nn::vit::SiglipVisionConfig;
use crate::rope::{RopeConfig, RopeScaling};
use crate::weights::GgufWeights;

pub const GGUF_ARCHITECTURE: &str = "gemma3";

pub const MMPROJ: MmprojFamily = MmprojFamily {
    projector_types: &["gemma3"],
    text_architectures: &[GGUF_ARCHITECTURE],
    load,
};

/// The decoder config of a `gemma3` GGUF.
pub fn config_from_gguf(g: &GgufWeights, max_model_len: Option<usize>) -> Result<DecoderConfig> {
    let key = |k: &str| format!("{GGUF_ARCHITECTURE}.{k}");
    let mut d = gguf_base_config(g, GGUF_ARCHITECTURE, HF_ARCHITECTURE, max_model_len)?;
    d.qk_norm = true;
    d.norm_unit_offset = false;
    d.embed_scale = Some((d.hidden_size as f64).sqrt());
    d.sandwich_norms = true;
    d.mlp_act = Activation::GeluTanh;
    let per_head = if d.num_layers == 62 {
        d.hidden_size / d.num_heads
    } else {
        d.head_dim
    };
    d.attn_scale = Some((per_head as f32).powf(-0.5));
    d.final_softcap = g
        .meta_f64_opt(&key("final_logit_softcapping"))?
        .filter(|c| *c > 0.0)
        .map(|c| c as f32);
    d.sliding_window = match g.meta_usize_opt(&key("attention.sliding_window"))? {
        Some(size) if size > 0 => {
            let layers = sliding_layers(g, &key("attention.sliding_window_pattern"), d.num_layers)?;
            let theta = g
                .meta_f64_opt(&key("rope.freq_base_swa"))?
                .unwrap_or(10_000.0);
            Some(SlidingWindow {
                size,
                layers,
                rope: Some(RopeConfig {
                    theta: theta as f32,
                    scaling: RopeScaling::None,
                    ..d.rope.clone()
                }),
            })
        }
        _ => None,
    };
    d.validate()?;
    Ok(d)
}

/// Which layers slide: a per-layer array, or a period `n` (layer `i`
/// slides unless `i % n == n - 1`), 6 when absent (llama.cpp's default).
fn sliding_layers(g: &GgufWeights, key: &str, n: usize) -> Result<Vec<bool>> {
    if let Some(flags) = g.meta_f32_array_opt(key).ok().flatten() {
        if flags.len() != n {
            return Err(ModelError::Gguf {
                path: g.path.clone(),
                message: format!("{key} has {} entries for {n} layers", flags.len()),
            });
        }
        return Ok(flags.iter().map(|f| *f != 0.0).collect());
    }
    let period = g.meta_usize_opt(key)?.unwrap_or(6).max(1);
    Ok((0..n).map(|i| i % period < period - 1).collect())
}

fn load(pair: GgufPair) -> Result<BuiltPair> {
    let mm = &pair.mmproj;
    let v = Tower::Vision;
    let mut vision = SiglipVisionConfig::default();
    vision.hidden_size = mm.usize(v, "embedding_length")?;
    vision.intermediate_size = mm.usize(v, "feed_forward_length")?;
    vision.num_hidden_layers = mm.usize(v, "block_count")?;
    vision.num_attention_heads = mm.usize(v, "attention.head_count")?;
    vision.image_size = mm.usize(v, "image_size")?;
    vision.patch_size = mm.usize(v, "patch_size")?;
    if let Some(eps) = mm.f64_opt(v, "attention.layer_norm_epsilon")? {
        vision.layer_norm_eps = eps;
    }
    vision.validate()?;
    let scale = mm
        .usize_opt(v, "projector.scale_factor")?
        .unwrap_or(4)
        .max(1);
    let side = vision.grid() / scale;
    let cfg = Gemma3VisionConfig {
        mm_tokens_per_image: side * side,
        image_token_id: pair.token_id("<image_soft_token>")?,
        boi_token_id: pair.token_id("<start_of_image>")?,
        eoi_token_id: pair.token_id("<end_of_image>")?,
        vision,
    }
    .checked()?;
    let mut text = pair.text_config()?;
    text.final_softcap = None;
    text.bidirectional_media = true;
    text.architecture = HF_VISION_ARCHITECTURE.into();
    let proj = mm.shape("mm.input_projection.weight")?;
    pair.check_embedding_size(proj[1], &text)?;
    let preprocessor = json!({
        "size": {"height": cfg.vision.image_size, "width": cfg.vision.image_size},
        "image_mean": mm.rgb(v, "image_mean")?,
        "image_std": mm.rgb(v, "image_std")?,
    });
    let processor = Gemma3ImageProcessor::new(&preprocessor.to_string(), &cfg, pair.tokenizer)
        .map_err(|m| mm.bad(m))?;
    let d = cfg.vision.hidden_size;
    let names = mm.vit_names("v", d);
    let lm = DecoderLm::load(text.clone(), pair.text_weights)?;
    let w = pair.mmproj.into_weights(names);
    let tower = crate::nn::vit::SiglipVision::load(
        cfg.vision.clone(),
        &w,
        "v",
        cfg.vision.num_hidden_layers,
    )?;
    let norm = RmsNorm::load(&w.pp("mm.soft_emb_norm"), d, cfg.vision.layer_norm_eps)?;
    let projection = w.tensor("mm.input_projection.weight", &[d, text.hidden_size])?;
    let encoder = Gemma3ImageEncoder::from_parts(&cfg, tower, norm, projection);
    Ok(BuiltPair {
        model: Box::new(MultimodalLm::new(
            lm,
            Box::new(encoder),
            HF_VISION_ARCHITECTURE,
        )),
        processor: Arc::new(processor),
    })
}
