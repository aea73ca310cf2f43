//! LLaVA-1.5 from llama.cpp's pair: a `llama` language-model GGUF and an
//! mmproj with `clip.projector_type = "mlp"`, as llama.cpp's LLaVA route
//! writes it (`convert_image_encoder_to_gguf.py --llava-projector`).
//!
//! What that mmproj holds, against the transformers checkpoint:
//! - the CLIP tower cut at the feature layer: `clip.vision.block_count` is
//!   the number of layers kept (the features are the last one's output) and
//!   `post_layernorm` is dropped; `clip.vision.feature_layer`, when present,
//!   names the hidden state to take instead;
//! - `mlp.fc1` / `mlp.fc2` stored as `ffn_down` / `ffn_up` (the old
//!   converter's swapped names; [`Mmproj::vit_names`] reads which from the
//!   shapes);
//! - the projector as `mm.0` / `mm.2` (`linear_1` / `linear_2`), its
//!   matrices and the patch embedding always F16, even with `--use-f32`;
//! - no preprocessor config: `image_size`, `image_mean` and `image_std` are
//!   metadata; the image is resized (shortest edge, bicubic) and center
//!   cropped as llava-hf's `CLIPImageProcessor` does (llama.cpp itself pads
//!   to a square instead);
//! - `clip.use_gelu` false means CLIP's quick-GELU; the projector's GELU is
//!   not recorded (LLaVA-1.5's is the exact, erf one);
//! - no image token id: `<image>` is looked up in the text GGUF's vocabulary.

use std::sync::Arc;

use serde_json::json;

use super::{
    ClipImageConfig, ClipVision, ClipVisionConfig, Encoder, ImageProcessor, HF_ARCHITECTURE,
};
use crate::error::Result;
use crate::families::MmprojFamily;
use crate::mmproj::{BuiltPair, GgufPair, Tower};
use crate::multimodal::MultimodalLm;
use crate::nn::activation::Activation;
use crate::nn::decoder::DecoderLm;

pub const MMPROJ: MmprojFamily = MmprojFamily {
    projector_types: &["mlp"],
    text_architectures: &["llama"],
    load,
};

fn load(pair: GgufPair) -> Result<BuiltPair> {
    let mm = &pair.mmproj;
    let v = Tower::Vision;
    let hidden = mm.usize(v, "embedding_length")?;
    let blocks = mm.usize(v, "block_count")?;
    let use_gelu = mm.gguf().meta_bool_opt("clip.use_gelu")?.unwrap_or(false);
    let mut vision = ClipVisionConfig::default();
    vision.hidden_size = hidden;
    vision.intermediate_size = mm.usize(v, "feed_forward_length")?;
    vision.num_hidden_layers = blocks;
    vision.num_attention_heads = mm.usize(v, "attention.head_count")?;
    vision.image_size = mm.usize(v, "image_size")?;
    vision.patch_size = mm.usize(v, "patch_size")?;
    vision.hidden_act = if use_gelu { "gelu" } else { "quick_gelu" }.into();
    if let Some(eps) = mm.f64_opt(v, "attention.layer_norm_epsilon")? {
        vision.layer_norm_eps = eps;
    }
    vision.validate()?;
    let feature_layers = match mm
        .gguf()
        .meta_f32_array_opt("clip.vision.feature_layer")?
        .as_deref()
    {
        None => blocks,
        Some([k]) if *k >= 0.0 && (*k as usize) <= blocks => *k as usize,
        Some(ks) => {
            return Err(mm.bad(format!(
                "clip.vision.feature_layer {ks:?}: one hidden state of the {blocks} layers is supported"
            )))
        }
    };
    let mm_out = mm.shape("mm.2.weight")?;
    let text = pair.text_config()?;
    pair.check_embedding_size(mm_out[0], &text)?;
    let image_size = vision.image_size;
    let preprocessor = json!({
        "size": {"shortest_edge": image_size},
        "crop_size": {"height": image_size, "width": image_size},
        "image_mean": mm.rgb(v, "image_mean")?,
        "image_std": mm.rgb(v, "image_std")?,
        "resample": 3,
    });
    let config = ClipImageConfig::from_preprocessor_config(&preprocessor.to_string(), image_size)
        .map_err(|m| mm.bad(m))?;
    let processor = ImageProcessor {
        config,
        image_size,
        image_token: pair.token_id("<image>")?,
        tokens_per_image: vision.grid() * vision.grid(),
    };
    let names = mm.vit_names("v", hidden);
    let lm = DecoderLm::load(text.clone(), pair.text_weights)?;
    let w = pair.mmproj.into_weights(names);
    let (vd, td) = (hidden, text.hidden_size);
    let encoder = Encoder {
        vision: ClipVision::load(vision, &w, "v", feature_layers)?,
        keep_class_token: false,
        linear_1: w.linear("mm.0", vd, td, true)?,
        act: Activation::parse("gelu")?,
        linear_2: w.linear("mm.2", td, td, true)?,
    };
    Ok(BuiltPair {
        model: Box::new(MultimodalLm::new(lm, Box::new(encoder), HF_ARCHITECTURE)),
        processor: Arc::new(processor),
    })
}
