//! `config.json` of Qwen2-VL / Qwen2.5-VL in its two shapes: as released
//! (text fields at the top level, `rope_scaling: {type: mrope, mrope_section}`)
//! and as transformers 5 writes it (`text_config` with
//! `rope_parameters.mrope_section`).

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::HfConfig;
use crate::error::{ModelError, Result};

pub const QWEN2_VL: &str = "Qwen2VLForConditionalGeneration";
pub const QWEN2_5_VL: &str = "Qwen2_5_VLForConditionalGeneration";

/// Which vision tower a checkpoint has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// LayerNorm blocks, QuickGELU MLP, full attention per frame, LayerNorm merger.
    Qwen2Vl,
    /// RMSNorm blocks, SwiGLU MLP, window attention (full attention on
    /// `fullatt_block_indexes`), RMSNorm merger, time-scaled video positions.
    Qwen25Vl,
}

/// The vision tower's hyperparameters, with one naming for both variants.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub variant: Variant,
    pub depth: usize,
    /// Width of the tower (`embed_dim` in Qwen2-VL, `hidden_size` in 2.5).
    pub embed_dim: usize,
    pub num_heads: usize,
    /// MLP width (`embed_dim * mlp_ratio`, or `intermediate_size` in 2.5).
    pub mlp_dim: usize,
    pub hidden_act: String,
    /// Width after the merger: the language model's hidden size.
    pub out_dim: usize,
    pub in_channels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub spatial_merge_size: usize,
    pub rope_theta: f64,
    /// 2.5: window side in pixels.
    pub window_size: usize,
    /// 2.5: blocks with full attention (the others attend within windows).
    pub fullatt_block_indexes: Vec<usize>,
    /// 2.5: temporal M-RoPE positions per second of video.
    pub tokens_per_second: f64,
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads.max(1)
    }

    /// The Conv3d patch embedding's weight: `[embed, C, T, P, P]`.
    pub fn patch_embed_shape(&self) -> [usize; 5] {
        [
            self.embed_dim,
            self.in_channels,
            self.temporal_patch_size,
            self.patch_size,
            self.patch_size,
        ]
    }

    /// Columns of one flattened patch: `C * T * P * P`.
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}

#[derive(Deserialize)]
struct RawVision {
    depth: Option<usize>,
    embed_dim: Option<usize>,
    hidden_size: Option<usize>,
    out_hidden_size: Option<usize>,
    num_heads: Option<usize>,
    mlp_ratio: Option<f64>,
    intermediate_size: Option<usize>,
    hidden_act: Option<String>,
    in_channels: Option<usize>,
    /// Released Qwen2-VL configs say `in_chans`.
    in_chans: Option<usize>,
    patch_size: Option<usize>,
    temporal_patch_size: Option<usize>,
    spatial_merge_size: Option<usize>,
    window_size: Option<usize>,
    fullatt_block_indexes: Option<Vec<usize>>,
    tokens_per_second: Option<f64>,
    rope_parameters: Option<Value>,
    rope_theta: Option<f64>,
}

/// Everything the model needs from a Qwen2-VL / Qwen2.5-VL `config.json`.
#[derive(Debug, Clone)]
pub struct Qwen2VlConfig {
    pub architecture: &'static str,
    pub text: HfConfig,
    pub mrope_section: [usize; 3],
    pub vision: VisionConfig,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub vision_start_token_id: u32,
}

fn bad(m: impl Into<String>) -> ModelError {
    ModelError::Config(m.into())
}

fn get_u32(raw: &Value, keys: &[&str], default: u32) -> u32 {
    keys.iter()
        .find_map(|k| raw.get(k).and_then(Value::as_u64))
        .map(|v| v as u32)
        .unwrap_or(default)
}

/// Qwen2VLTextConfig defaults for fields a config may leave out.
fn text_defaults() -> Map<String, Value> {
    let v = serde_json::json!({
        "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 32768, "hidden_act": "silu",
    });
    v.as_object().cloned().unwrap_or_default()
}

impl Qwen2VlConfig {
    pub fn from_json(raw: &Value) -> Result<Self> {
        let architecture = match raw.pointer("/architectures/0").and_then(Value::as_str) {
            Some(QWEN2_VL) => QWEN2_VL,
            Some(QWEN2_5_VL) => QWEN2_5_VL,
            other => {
                return Err(bad(format!(
                    "not a Qwen2-VL / Qwen2.5-VL config (architectures[0] = {other:?})"
                )))
            }
        };
        let variant = if architecture == QWEN2_VL {
            Variant::Qwen2Vl
        } else {
            Variant::Qwen25Vl
        };
        let root = raw
            .as_object()
            .ok_or_else(|| bad("config.json is not an object"))?;

        // Text: class defaults, then the released flat fields, then text_config.
        let mut text = text_defaults();
        for (k, v) in root {
            if !matches!(k.as_str(), "vision_config" | "text_config") {
                text.insert(k.clone(), v.clone());
            }
        }
        if let Some(tc) = root.get("text_config").and_then(Value::as_object) {
            for (k, v) in tc {
                text.insert(k.clone(), v.clone());
            }
        }
        // transformers 5 reads tying from the root, and a true in text_config
        // (pre-5 saves) also ties.
        let tie = [
            root.get("tie_word_embeddings"),
            root.get("text_config")
                .and_then(|t| t.get("tie_word_embeddings")),
        ]
        .iter()
        .any(|v| v.and_then(|v| v.as_bool()) == Some(true));
        text.insert("tie_word_embeddings".into(), Value::Bool(tie));
        // Head size is hidden / heads in these models whatever head_dim says.
        text.remove("head_dim");

        // Rope: mrope_section and theta from rope_parameters or rope_scaling;
        // "mrope" is plain rope over 3-D positions, so the text config keeps
        // a default rope block.
        let rope = text
            .get("rope_parameters")
            .filter(|v| v.is_object())
            .or_else(|| text.get("rope_scaling").filter(|v| v.is_object()))
            .cloned()
            .unwrap_or(Value::Null);
        let kind = rope
            .get("rope_type")
            .or_else(|| rope.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        if !matches!(kind, "default" | "mrope") {
            return Err(bad(format!(
                "unsupported rope type {kind:?} for {architecture} (supported: mrope)"
            )));
        }
        let section: Vec<usize> = match rope.get("mrope_section") {
            Some(v) => {
                serde_json::from_value(v.clone()).map_err(|e| bad(format!("mrope_section: {e}")))?
            }
            // transformers' fallback when a config has none.
            None => vec![16, 24, 24],
        };
        let &[s0, s1, s2] = section.as_slice() else {
            return Err(bad(format!(
                "mrope_section must have 3 entries, got {section:?}"
            )));
        };
        let theta = rope
            .get("rope_theta")
            .and_then(Value::as_f64)
            .or_else(|| text.get("rope_theta").and_then(Value::as_f64))
            .unwrap_or(1_000_000.0);
        text.remove("rope_scaling");
        text.insert("rope_theta".into(), serde_json::json!(theta));
        text.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "default", "rope_theta": theta}),
        );
        let text = HfConfig::from_json_str(&Value::Object(text).to_string())?;
        let half = text.head_dim() / 2;
        if s0 + s1 + s2 != half {
            return Err(bad(format!(
                "mrope_section {section:?} sums to {}, but head_dim / 2 is {half}",
                s0 + s1 + s2
            )));
        }

        let rv: RawVision =
            serde_json::from_value(root.get("vision_config").cloned().unwrap_or(Value::Null))
                .map_err(|e| bad(format!("vision_config: {e}")))?;
        let text_hidden = text.hidden_size;
        let vision_rope_theta = vision_theta(&rv);
        let vision = match variant {
            Variant::Qwen2Vl => {
                let embed = rv.embed_dim.unwrap_or(1280);
                VisionConfig {
                    variant,
                    depth: rv.depth.unwrap_or(32),
                    embed_dim: embed,
                    num_heads: rv.num_heads.unwrap_or(16),
                    mlp_dim: (embed as f64 * rv.mlp_ratio.unwrap_or(4.0)) as usize,
                    hidden_act: rv.hidden_act.unwrap_or_else(|| "quick_gelu".into()),
                    // Qwen2-VL's vision hidden_size is the merger's output width.
                    out_dim: rv.hidden_size.unwrap_or(text_hidden),
                    in_channels: rv.in_channels.or(rv.in_chans).unwrap_or(3),
                    patch_size: rv.patch_size.unwrap_or(14),
                    temporal_patch_size: rv.temporal_patch_size.unwrap_or(2),
                    spatial_merge_size: rv.spatial_merge_size.unwrap_or(2),
                    rope_theta: vision_rope_theta,
                    window_size: 0,
                    fullatt_block_indexes: Vec::new(),
                    tokens_per_second: 1.0,
                }
            }
            Variant::Qwen25Vl => VisionConfig {
                variant,
                depth: rv.depth.unwrap_or(32),
                embed_dim: rv.hidden_size.unwrap_or(3584),
                num_heads: rv.num_heads.unwrap_or(16),
                mlp_dim: rv.intermediate_size.unwrap_or(3420),
                hidden_act: rv.hidden_act.unwrap_or_else(|| "silu".into()),
                out_dim: rv.out_hidden_size.unwrap_or(3584),
                in_channels: rv.in_channels.or(rv.in_chans).unwrap_or(3),
                patch_size: rv.patch_size.unwrap_or(14),
                temporal_patch_size: rv.temporal_patch_size.unwrap_or(2),
                spatial_merge_size: rv.spatial_merge_size.unwrap_or(2),
                rope_theta: vision_rope_theta,
                window_size: rv.window_size.unwrap_or(112),
                fullatt_block_indexes: rv
                    .fullatt_block_indexes
                    .unwrap_or_else(|| vec![7, 15, 23, 31]),
                tokens_per_second: rv.tokens_per_second.unwrap_or(4.0),
            },
        };
        validate_vision(&vision, text_hidden)?;
        Ok(Self {
            architecture,
            text,
            mrope_section: [s0, s1, s2],
            vision,
            image_token_id: get_u32(raw, &["image_token_id", "image_token_index"], 151655),
            video_token_id: get_u32(raw, &["video_token_id", "video_token_index"], 151656),
            vision_start_token_id: get_u32(raw, &["vision_start_token_id"], 151652),
        })
    }
}

fn vision_theta(rv: &RawVision) -> f64 {
    rv.rope_parameters
        .as_ref()
        .and_then(|p| p.get("rope_theta"))
        .and_then(Value::as_f64)
        .or(rv.rope_theta)
        .unwrap_or(10_000.0)
}

pub(super) fn validate_vision(v: &VisionConfig, text_hidden: usize) -> Result<()> {
    if v.depth == 0 || v.embed_dim == 0 || v.num_heads == 0 || v.mlp_dim == 0 {
        return Err(bad(
            "vision_config: depth, width, heads and MLP width must be positive",
        ));
    }
    let hd = v.embed_dim / v.num_heads;
    // 2-D rotary: a quarter of the head per axis and per half.
    if !v.embed_dim.is_multiple_of(v.num_heads) || !hd.is_multiple_of(4) {
        return Err(bad(format!(
            "vision_config: width {} over {} heads must give a head size divisible by 4",
            v.embed_dim, v.num_heads
        )));
    }
    if v.patch_size == 0
        || v.temporal_patch_size == 0
        || v.spatial_merge_size == 0
        || v.in_channels == 0
    {
        return Err(bad(
            "vision_config: patch sizes, merge size and channels must be positive",
        ));
    }
    if v.out_dim != text_hidden {
        return Err(bad(format!(
            "vision tower outputs width {} but the language model's hidden size is {text_hidden}",
            v.out_dim
        )));
    }
    if v.variant == Variant::Qwen25Vl {
        let unit = v.spatial_merge_size * v.patch_size;
        if v.window_size < unit || !v.window_size.is_multiple_of(unit) {
            return Err(bad(format!(
                "vision_config: window_size {} must be a multiple of patch_size * spatial_merge_size = {unit}",
                v.window_size
            )));
        }
        if let Some(&i) = v.fullatt_block_indexes.iter().find(|&&i| i >= v.depth) {
            return Err(bad(format!(
                "vision_config: fullatt_block_indexes has {i}, beyond depth {}",
                v.depth
            )));
        }
        if !(v.tokens_per_second.is_finite() && v.tokens_per_second > 0.0) {
            return Err(bad("vision_config: tokens_per_second must be positive"));
        }
    }
    if !matches!(
        v.hidden_act.as_str(),
        "quick_gelu" | "gelu" | "silu" | "gelu_pytorch_tanh"
    ) {
        return Err(bad(format!(
            "vision_config: unsupported hidden_act {:?} (quick_gelu, gelu, gelu_pytorch_tanh, silu)",
            v.hidden_act
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn released_flat() -> Value {
        serde_json::json!({
            "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
            "hidden_size": 16, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "vocab_size": 1000, "rope_theta": 1000000.0,
            "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}, "tie_word_embeddings": true,
            "vision_config": {"depth": 2, "embed_dim": 32, "hidden_size": 16, "num_heads": 2, "mlp_ratio": 2},
            "image_token_id": 7, "video_token_id": 8
        })
    }

    #[test]
    fn released_flat_config() {
        let c = Qwen2VlConfig::from_json(&released_flat()).unwrap();
        assert_eq!(c.mrope_section, [1, 1, 2]);
        assert_eq!(c.text.hidden_size, 16);
        assert_eq!(c.text.rope_theta(), 1e6);
        assert!(c.text.rope_scaling().is_none());
        assert_eq!(c.text.tie_word_embeddings, Some(true));
        assert_eq!(
            (c.vision.embed_dim, c.vision.mlp_dim, c.vision.out_dim),
            (32, 64, 16)
        );
        assert_eq!(
            (c.image_token_id, c.video_token_id, c.vision_start_token_id),
            (7, 8, 151652)
        );
        assert_eq!(c.vision.hidden_act, "quick_gelu");
    }

    #[test]
    fn transformers5_nested_config() {
        let raw = serde_json::json!({
            "architectures": ["Qwen2_5_VLForConditionalGeneration"], "tie_word_embeddings": false,
            "text_config": {"hidden_size": 16, "intermediate_size": 48, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 1000,
                "tie_word_embeddings": true,
                "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0, "mrope_section": [2, 1, 1]}},
            "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                "out_hidden_size": 16, "window_size": 56, "fullatt_block_indexes": [1], "tokens_per_second": 2}
        });
        let c = Qwen2VlConfig::from_json(&raw).unwrap();
        assert_eq!(c.mrope_section, [2, 1, 1]);
        assert_eq!(c.text.rope_theta(), 5000.0);
        assert_eq!(
            c.text.tie_word_embeddings,
            Some(true),
            "a pre-5 text_config tie still ties"
        );
        assert_eq!(c.vision.variant, Variant::Qwen25Vl);
        assert_eq!(
            (c.vision.window_size, c.vision.tokens_per_second),
            (56, 2.0)
        );
    }

    #[test]
    fn bad_configs_are_clear() {
        let mut raw = released_flat();
        raw["rope_scaling"]["mrope_section"] = serde_json::json!([1, 1, 1]);
        assert!(Qwen2VlConfig::from_json(&raw)
            .unwrap_err()
            .to_string()
            .contains("head_dim / 2 is 4"));
        let mut raw = released_flat();
        raw["rope_scaling"] = serde_json::json!({"type": "yarn", "factor": 4.0});
        assert!(Qwen2VlConfig::from_json(&raw)
            .unwrap_err()
            .to_string()
            .contains("yarn"));
        let mut raw = released_flat();
        raw["vision_config"]["hidden_size"] = serde_json::json!(24);
        assert!(Qwen2VlConfig::from_json(&raw)
            .unwrap_err()
            .to_string()
            .contains("hidden size is 16"));
    }
}
