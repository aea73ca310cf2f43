//! Qwen2-Audio from llama.cpp's pair of files: the language model as a plain
//! `qwen2` GGUF and the Whisper encoder + projector as an mmproj
//! (`clip.projector_type` `qwen2a`, tensors `a.*` and `mm.a.fc`).
//!
//! What the mmproj stores differently from the Hugging Face checkpoint: the
//! convolution biases as `[d, 1]`, the convolution kernels always in F16
//! (even in an F32 file), and no feature-extractor settings: the log-mel
//! front end takes the released checkpoint's (Whisper's 25 ms / 10 ms
//! frames at 16 kHz, 30 s windows) with the file's `num_mel_bins`.

use std::sync::Arc;

use super::processor::AudioProcessor;
use super::Qwen2AudioEncoder;
use crate::error::{ModelError, Result};
use crate::families::{qwen2, MmprojFamily};
use crate::mmproj::{BuiltPair, GgufPair, Tower};
use crate::multimodal::MultimodalLm;
use crate::nn::decoder::DecoderLm;
use crate::nn::whisper_encoder::{AudioEncoder, AudioEncoderConfig};
use crate::weights::GgufWeights;

use super::HF_ARCHITECTURE;

/// `clip.projector_type` of Qwen2-Audio's encoder.
pub const PROJECTOR: &str = "qwen2a";

fn bad(mm: &GgufWeights, message: String) -> ModelError {
    ModelError::Gguf {
        path: mm.path.clone(),
        message,
    }
}

/// The mmproj name of a Hugging Face audio tensor name (`audio_tower.*`,
/// `multi_modal_projector.linear.*`).
pub fn mmproj_tensor_name(hf: &str) -> Option<String> {
    let (module, suffix) = hf.rsplit_once('.')?;
    if let Some(layer) = module.strip_prefix("audio_tower.layers.") {
        let (i, part) = layer.split_once('.')?;
        let i: usize = i.parse().ok()?;
        let gg = match part {
            "self_attn_layer_norm" => "ln1",
            "final_layer_norm" => "ln2",
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.out_proj" => "attn_out",
            "fc1" => "ffn_up",
            "fc2" => "ffn_down",
            _ => return None,
        };
        return Some(format!("a.blk.{i}.{gg}.{suffix}"));
    }
    let gg = match module {
        "audio_tower.conv1" => "a.conv1d.1",
        "audio_tower.conv2" => "a.conv1d.2",
        "audio_tower.embed_positions" => "a.position_embd",
        "audio_tower.layer_norm" => "a.post_ln",
        "multi_modal_projector.linear" => "mm.a.fc",
        _ => return None,
    };
    Some(format!("{gg}.{suffix}"))
}

/// The encoder's configuration from an mmproj's `clip.audio.*` metadata.
pub fn encoder_config(mm: &GgufWeights) -> Result<AudioEncoderConfig> {
    let kind = mm
        .meta_str_opt("clip.audio.projector_type")
        .or_else(|| mm.meta_str_opt("clip.projector_type"))
        .unwrap_or_default();
    if kind != PROJECTOR {
        return Err(bad(
            mm,
            format!("projector type {kind:?} is not Qwen2-Audio's ({PROJECTOR})"),
        ));
    }
    let positions = mm
        .content
        .tensor_infos
        .get("a.position_embd.weight")
        .and_then(|i| i.shape.dims().first().copied())
        .ok_or_else(|| {
            ModelError::MissingTensor(format!("a.position_embd.weight (in {})", mm.path.display()))
        })?;
    Ok(AudioEncoderConfig {
        d_model: mm.meta_usize("clip.audio.embedding_length")?,
        num_layers: mm.meta_usize("clip.audio.block_count")?,
        num_heads: mm.meta_usize("clip.audio.attention.head_count")?,
        ffn_dim: mm.meta_usize("clip.audio.feed_forward_length")?,
        num_mel_bins: mm.meta_usize("clip.audio.num_mel_bins")?,
        max_source_positions: positions,
        scale_embedding: false,
        activation_function: "gelu".into(),
    })
}

/// The log-mel front end and placeholder of an mmproj (settings of the
/// released checkpoint's preprocessor_config.json, the file's mel bins).
pub fn processor(
    mm: &GgufWeights,
    cfg: &AudioEncoderConfig,
    placeholder_token: u32,
) -> Result<AudioProcessor> {
    let json = serde_json::json!({
        "feature_size": cfg.num_mel_bins, "sampling_rate": 16000, "hop_length": 160,
        "chunk_length": 30, "n_fft": 400, "padding_value": 0.0, "return_attention_mask": true,
    })
    .to_string();
    let extractor = candela_media::audio::WhisperFeatureExtractor::from_preprocessor_config(&json)
        .map_err(|e| bad(mm, e.to_string()))?;
    Ok(AudioProcessor {
        extractor,
        placeholder_token,
        pooled: true,
        max_source_positions: cfg.max_source_positions,
    })
}

/// How the family loads from a `qwen2` GGUF + `qwen2a` mmproj pair.
pub const MMPROJ: MmprojFamily = MmprojFamily {
    projector_types: &[PROJECTOR],
    text_architectures: &[qwen2::GGUF_ARCHITECTURE],
    load,
};

fn load(pair: GgufPair) -> Result<BuiltPair> {
    let text = pair.text_config()?;
    let out = pair.mmproj.usize(Tower::Audio, "projection_dim")?;
    pair.check_embedding_size(out, &text)?;
    let cfg = encoder_config(pair.mmproj.gguf())?;
    let processor = processor(pair.mmproj.gguf(), &cfg, pair.token_id("<|AUDIO|>")?)?;
    let lm = DecoderLm::load(text, pair.text_weights)?;
    let w = pair.mmproj.into_weights(Arc::new(|n: &str| {
        mmproj_tensor_name(n).into_iter().collect()
    }));
    let encoder = AudioEncoder::load(cfg.clone(), &w, "audio_tower", true)?;
    let projector = w.linear("multi_modal_projector.linear", cfg.d_model, out, true)?;
    Ok(BuiltPair {
        model: Box::new(MultimodalLm::new(
            lm,
            Box::new(Qwen2AudioEncoder { encoder, projector }),
            HF_ARCHITECTURE,
        )),
        processor: Arc::new(processor),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_audio_names_to_mmproj() {
        let m = |s: &str| mmproj_tensor_name(s);
        assert_eq!(
            m("audio_tower.layers.1.self_attn.k_proj.weight").as_deref(),
            Some("a.blk.1.attn_k.weight")
        );
        assert_eq!(
            m("audio_tower.conv2.bias").as_deref(),
            Some("a.conv1d.2.bias")
        );
        assert_eq!(
            m("multi_modal_projector.linear.weight").as_deref(),
            Some("mm.a.fc.weight")
        );
        assert_eq!(m("audio_tower.layers.x.fc1.weight"), None);
        assert_eq!(m("visual.merger.mlp.0.weight"), None);
    }
}
