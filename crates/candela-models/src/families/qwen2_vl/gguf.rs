//! Qwen2-VL / Qwen2.5-VL from llama.cpp's pair of files: the language model
//! as a `qwen2vl` GGUF (Qwen2 with `rope.dimension_sections`, the M-RoPE
//! split) and the vision tower + merger as an mmproj (`clip.projector_type`
//! `qwen2vl_merger` / `qwen2.5vl_merger`, tensors `v.*` and `mm.*`).
//!
//! What the mmproj stores differently from the Hugging Face checkpoint:
//! q / k / v split (HF: one `qkv`), the Conv3d patch embedding as one Conv2d
//! kernel per temporal slice (`v.patch_embd.weight`, `.weight.1`), the MLP
//! activation as flags (`clip.use_silu`; neither flag = QuickGELU), and
//! Qwen2.5-VL's full-attention blocks as a period (`n_wa_pattern`: block
//! `i` is full when `(i + 1) % n == 0`). It leaves out the window size,
//! `tokens_per_second`, the vision rope theta, the pixel bounds and the
//! video settings (llama.cpp hard-codes them), so those take the released
//! checkpoints' values; Qwen2-VL's `feed_forward_length` holds the merger's
//! output width, not the MLP's, so the MLP width comes from the tensors.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::config::{validate_vision, Variant, VisionConfig, QWEN2_5_VL, QWEN2_VL};
use super::processor::VisionProcessor;
use super::vision::VisionTower;
use super::VisionEncoder;
use crate::error::{ModelError, Result};
use crate::families::MmprojFamily;
use crate::mmproj::{BuiltPair, GgufPair, Tower};
use crate::multimodal::MultimodalLm;
use crate::nn::decoder::{gguf_base_config, DecoderConfig, DecoderLm};
use crate::weights::GgufWeights;

/// `general.architecture` of the language model's GGUF.
pub const GGUF_ARCHITECTURE: &str = "qwen2vl";
/// `clip.projector_type` of the two towers.
pub const PROJECTOR_QWEN2_VL: &str = "qwen2vl_merger";
pub const PROJECTOR_QWEN2_5_VL: &str = "qwen2.5vl_merger";

/// Values the mmproj does not carry: those of the released checkpoints
/// (Qwen2-VL-*-Instruct, Qwen2.5-VL-*-Instruct), which llama.cpp assumes too.
const WINDOW_SIZE: usize = 112;
const TOKENS_PER_SECOND: f64 = 2.0;
const VISION_ROPE_THETA: f64 = 10_000.0;
const MIN_PIXELS: u64 = 56 * 56;
const MAX_PIXELS: u64 = 28 * 28 * 16384;

fn bad(path: &std::path::Path, message: String) -> ModelError {
    ModelError::Gguf {
        path: path.to_path_buf(),
        message,
    }
}

/// The language model of a `qwen2vl` GGUF: Qwen2 (q/k/v biases) rotating by
/// (time, row, column) positions over `rope.dimension_sections`.
pub fn text_config(
    g: &GgufWeights,
    architecture: &str,
    max_model_len: Option<usize>,
) -> Result<DecoderConfig> {
    let mut c = gguf_base_config(g, GGUF_ARCHITECTURE, architecture, max_model_len)?;
    c.qkv_bias = true;
    c.o_bias = false;
    let key = format!("{GGUF_ARCHITECTURE}.rope.dimension_sections");
    let sections = g
        .meta_f32_array_opt(&key)?
        .ok_or_else(|| bad(&g.path, format!("missing metadata key {key}")))?;
    // [t, h, w, 0]: llama.cpp's fourth section is for other models.
    let as_usize = |x: f32| (x >= 0.0 && x.fract() == 0.0).then_some(x as usize);
    let parsed: Option<Vec<usize>> = sections.iter().map(|&x| as_usize(x)).collect();
    let section = match parsed.as_deref() {
        Some(&[t, h, w]) | Some(&[t, h, w, 0]) => [t, h, w],
        _ => {
            return Err(bad(
                &g.path,
                format!("{key} must be [t, h, w] or [t, h, w, 0], got {sections:?}"),
            ))
        }
    };
    let half = c.head_dim / 2;
    if section.iter().sum::<usize>() != half {
        return Err(bad(
            &g.path,
            format!("{key} {section:?} must sum to head_dim / 2 = {half}"),
        ));
    }
    c.mrope_section = Some(section);
    Ok(c)
}

/// The mmproj name of a Hugging Face vision tensor name (`visual.*`, with
/// `attn.q` / `attn.k` / `attn.v` for the split projections).
pub fn mmproj_tensor_name(hf: &str) -> Option<String> {
    let rest = hf.strip_prefix("visual.")?;
    let (module, suffix) = rest.rsplit_once('.')?;
    if let Some(block) = module.strip_prefix("blocks.") {
        let (i, part) = block.split_once('.')?;
        let i: usize = i.parse().ok()?;
        let gg = match part {
            "norm1" => "ln1",
            "norm2" => "ln2",
            "attn.q" => "attn_q",
            "attn.k" => "attn_k",
            "attn.v" => "attn_v",
            "attn.proj" => "attn_out",
            "mlp.fc1" | "mlp.up_proj" => "ffn_up",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.fc2" | "mlp.down_proj" => "ffn_down",
            _ => return None,
        };
        return Some(format!("v.blk.{i}.{gg}.{suffix}"));
    }
    let gg = match module {
        "merger.ln_q" => "v.post_ln",
        "merger.mlp.0" => "mm.0",
        "merger.mlp.2" => "mm.2",
        _ => return None,
    };
    Some(format!("{gg}.{suffix}"))
}

/// The tower's configuration from an mmproj's `clip.vision.*` metadata and
/// tensor shapes; `text_hidden` is the language model's width.
pub fn vision_config(mm: &GgufWeights, text_hidden: usize) -> Result<VisionConfig> {
    let kind = mm
        .meta_str_opt("clip.vision.projector_type")
        .or_else(|| mm.meta_str_opt("clip.projector_type"))
        .unwrap_or_default();
    let variant = match kind {
        PROJECTOR_QWEN2_VL => Variant::Qwen2Vl,
        PROJECTOR_QWEN2_5_VL => Variant::Qwen25Vl,
        other => {
            return Err(bad(
                &mm.path,
                format!(
                    "projector type {other:?} is not Qwen2-VL's ({PROJECTOR_QWEN2_VL}, {PROJECTOR_QWEN2_5_VL})"
                ),
            ))
        }
    };
    let embed_dim = mm.meta_usize("clip.vision.embedding_length")?;
    let depth = mm.meta_usize("clip.vision.block_count")?;
    let shape = |name: &str| -> Result<Vec<usize>> {
        mm.content
            .tensor_infos
            .get(name)
            .map(|i| i.shape.dims().to_vec())
            .ok_or_else(|| ModelError::MissingTensor(format!("{name} (in {})", mm.path.display())))
    };
    let mlp_dim = shape("v.blk.0.ffn_up.weight")?
        .first()
        .copied()
        .unwrap_or_default();
    // One Conv2d kernel [embed, C, P, P] per temporal slice.
    let conv = shape("v.patch_embd.weight")?;
    let temporal_patch_size = if mm.has_raw("v.patch_embd.weight.1") {
        2
    } else {
        1
    };
    let in_channels = conv.get(1).copied().unwrap_or_default();
    let patch_size = mm.meta_usize("clip.vision.patch_size")?;
    let spatial_merge_size = mm
        .meta_usize_opt("clip.vision.spatial_merge_size")?
        .unwrap_or(2);
    let act = if mm.meta_bool_opt("clip.use_silu")? == Some(true) {
        "silu"
    } else if mm.meta_bool_opt("clip.use_gelu")? == Some(true) {
        "gelu"
    } else {
        "quick_gelu"
    };
    let fullatt_block_indexes = match variant {
        Variant::Qwen2Vl => Vec::new(),
        Variant::Qwen25Vl => full_attention_blocks(mm, depth)?,
    };
    let vision = VisionConfig {
        variant,
        depth,
        embed_dim,
        num_heads: mm.meta_usize("clip.vision.attention.head_count")?,
        mlp_dim,
        hidden_act: act.into(),
        out_dim: mm.meta_usize("clip.vision.projection_dim")?,
        in_channels,
        patch_size,
        temporal_patch_size,
        spatial_merge_size,
        rope_theta: VISION_ROPE_THETA,
        window_size: mm
            .meta_usize_opt("clip.vision.window_size")?
            .unwrap_or(WINDOW_SIZE),
        fullatt_block_indexes,
        tokens_per_second: TOKENS_PER_SECOND,
    };
    validate_vision(&vision, text_hidden).map_err(|e| bad(&mm.path, e.to_string()))?;
    Ok(vision)
}

/// Qwen2.5-VL's full-attention blocks: `clip.vision.wa_layer_indexes` when
/// the file lists them, else every `n_wa_pattern`-th block.
fn full_attention_blocks(mm: &GgufWeights, depth: usize) -> Result<Vec<usize>> {
    if let Some(list) = mm.meta_f32_array_opt("clip.vision.wa_layer_indexes")? {
        return Ok(list.into_iter().map(|x| x as usize).collect());
    }
    let n = mm.meta_usize("clip.vision.n_wa_pattern")?;
    if n == 0 {
        return Err(bad(&mm.path, "clip.vision.n_wa_pattern is 0".into()));
    }
    Ok((0..depth).filter(|i| (i + 1) % n == 0).collect())
}

/// The Conv3d patch embedding `[embed, C, T, P, P]` from the mmproj's one
/// Conv2d kernel per temporal slice (`v.patch_embd.weight`, `.weight.1`).
fn patch_embed(mm: &GgufWeights, cfg: &VisionConfig) -> Result<Tensor> {
    let slice = |name: &str| -> Result<Tensor> {
        Ok(mm
            .qtensor_raw(name)?
            .dequantize(&mm.device)?
            .to_dtype(DType::F32)?)
    };
    let conv = if cfg.temporal_patch_size == 2 {
        Tensor::stack(
            &[
                slice("v.patch_embd.weight")?,
                slice("v.patch_embd.weight.1")?,
            ],
            2,
        )?
    } else {
        slice("v.patch_embd.weight")?.unsqueeze(2)?
    };
    Ok(conv.to_dtype(mm.dtype)?)
}

/// The image / video processor of an mmproj: its patch geometry, mean and
/// std; pixel bounds and video sampling as the released checkpoints'
/// preprocessor_config.json has them (transformers' defaults, which differ
/// from llama.cpp's own limits of 8..4096 tokens per image).
pub fn processor(
    mm: &GgufWeights,
    cfg: &VisionConfig,
    token: impl Fn(&str) -> Result<u32>,
) -> Result<VisionProcessor> {
    let stat = |key: &str| -> Result<Vec<f32>> {
        match mm.meta_f32_array_opt(key)? {
            Some(v) if v.len() == 3 => Ok(v),
            _ => Err(bad(&mm.path, format!("{key} must hold 3 numbers"))),
        }
    };
    let json = serde_json::json!({
        "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS,
        "patch_size": cfg.patch_size, "temporal_patch_size": cfg.temporal_patch_size,
        "merge_size": cfg.spatial_merge_size,
        "image_mean": stat("clip.vision.image_mean")?, "image_std": stat("clip.vision.image_std")?,
    })
    .to_string();
    let invalid = |e: candela_media::MediaError| bad(&mm.path, e.to_string());
    Ok(VisionProcessor {
        image: candela_media::image::Qwen2VlProcessorConfig::from_preprocessor_config(&json)
            .map_err(invalid)?,
        video: candela_media::video::Qwen2VlVideoConfig::from_preprocessor_config(&json)
            .map_err(invalid)?,
        image_token: token("<|image_pad|>")?,
        video_token: token("<|video_pad|>")?,
        tokens_per_second: (cfg.variant == Variant::Qwen25Vl).then_some(cfg.tokens_per_second),
    })
}

/// The architecture name a projector type stands for.
pub fn architecture_of(cfg: &VisionConfig) -> &'static str {
    match cfg.variant {
        Variant::Qwen2Vl => QWEN2_VL,
        Variant::Qwen25Vl => QWEN2_5_VL,
    }
}

/// How the family loads from a `qwen2vl` GGUF + mmproj pair.
pub const MMPROJ: MmprojFamily = MmprojFamily {
    projector_types: &[PROJECTOR_QWEN2_VL, PROJECTOR_QWEN2_5_VL],
    text_architectures: &[GGUF_ARCHITECTURE],
    load,
};

fn load(pair: GgufPair) -> Result<BuiltPair> {
    let text = pair.text_config()?;
    let out = pair.mmproj.usize(Tower::Vision, "projection_dim")?;
    pair.check_embedding_size(out, &text)?;
    let vision = vision_config(pair.mmproj.gguf(), text.hidden_size)?;
    let architecture = architecture_of(&vision);
    let processor = processor(pair.mmproj.gguf(), &vision, |t| pair.token_id(t))?;
    let conv = patch_embed(pair.mmproj.gguf(), &vision)?;
    let lm = DecoderLm::load(
        DecoderConfig {
            architecture: architecture.to_string(),
            ..text
        },
        pair.text_weights,
    )?;
    let w = pair.mmproj.into_weights(Arc::new(|n: &str| {
        mmproj_tensor_name(n).into_iter().collect()
    }));
    let tower = VisionTower::load_with_patch_embed(vision, &w, "visual", conv)?;
    Ok(BuiltPair {
        model: Box::new(MultimodalLm::new(
            lm,
            Box::new(VisionEncoder(tower)),
            architecture,
        )),
        processor: Arc::new(processor),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_vision_names_to_mmproj() {
        let m = |s: &str| mmproj_tensor_name(s);
        assert_eq!(
            m("visual.blocks.2.attn.k.bias").as_deref(),
            Some("v.blk.2.attn_k.bias")
        );
        assert_eq!(
            m("visual.blocks.0.mlp.fc1.weight").as_deref(),
            Some("v.blk.0.ffn_up.weight")
        );
        assert_eq!(
            m("visual.blocks.0.mlp.gate_proj.weight").as_deref(),
            Some("v.blk.0.ffn_gate.weight")
        );
        assert_eq!(
            m("visual.merger.ln_q.weight").as_deref(),
            Some("v.post_ln.weight")
        );
        assert_eq!(m("visual.merger.mlp.2.bias").as_deref(), Some("mm.2.bias"));
        assert_eq!(m("visual.blocks.0.attn.qkv.weight"), None);
        assert_eq!(m("model.layers.0.mlp.up_proj.weight"), None);
    }
}
