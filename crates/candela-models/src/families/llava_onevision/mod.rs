//! LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): a SigLIP
//! tower (features of `vision_feature_layer`, no post norm, every patch
//! kept), a two-layer MLP projector and a Qwen2 language model.
//!
//! An image is "anyres": the base image (resized to the tower's square) plus
//! tiles of the tower's size cut from the image resized into the best of
//! `image_grid_pinpoints`. The tiles' features are laid back into one map,
//! unpadded to the image's aspect ratio, shrunk (bilinear) when larger than
//! `anyres_max_N` tiles allow, and given one `image_newline` row per map row;
//! the item's rows are the base image's features then that map. In a prompt
//! of several images each is only its base image plus one newline row. A video's
//! frames go through the tower alone, each 2x2-pooled (bilinear), with one
//! `image_newline` row after the last frame. Every row, newlines included,
//! takes the place of one `<image>` / `<video>` token, as in transformers.
//!
//! Weights load under the names llava-hf released (`language_model.model.*`,
//! `language_model.lm_head.*`, `vision_tower.vision_model.*`,
//! `multi_modal_projector.*`, `image_newline`) and as transformers 5 saves
//! them (`model.language_model.*`, `model.vision_tower.*`, `lm_head.*`, ...).

pub mod processor;

use std::sync::Arc;

use candela_core::request::MmFeatures;
use candle_core::{bail, DType, Result, Tensor};
use serde::Deserialize;
use serde_json::Value;

use super::{Built, Checkpoint, Family};
use crate::config::HfConfig;
use crate::error::{ModelError, Result as MResult};
use crate::multimodal::{language_model_weights, vision_tower_prefix, MediaEncoder, MultimodalLm};
use crate::nn::activation::Activation;
use crate::nn::decoder::DecoderLm;
use crate::nn::interpolate::bilinear;
use crate::nn::vit::{feature_layers, SiglipVision, SiglipVisionConfig};
use crate::weights::{Linear, Weights};
use processor::OnevisionProcessor;

pub const HF_ARCHITECTURE: &str = "LlavaOnevisionForConditionalGeneration";

pub const FAMILY: Family = Family {
    name: "llava_onevision",
    hf_architectures: &[HF_ARCHITECTURE],
    gguf_architectures: &[],
    load_folder,
    gguf_config: None,
    mmproj: None,
};

/// An image item: f32 `[1 + tiles, 3, size, size]`, the base image first.
pub const PIXEL_VALUES: &str = "pixel_values";
/// An image item: u32 `[orig height, orig width, tile rows, tile cols]`; a
/// 0x0 grid is an image of a multi-image prompt (base image and one newline).
pub const IMAGE_GRID: &str = "image_grid";
/// A video item: f32 `[frames, 3, size, size]`.
pub const PIXEL_VALUES_VIDEOS: &str = "pixel_values_videos";

/// transformers' `LlavaOnevisionConfig` default grid: 384 px tiles, up to 6x6.
fn default_pinpoints() -> Vec<[usize; 2]> {
    let s = [384, 768, 1152, 1536, 1920, 2304];
    s.iter()
        .flat_map(|&h| s.iter().map(move |&w| [h, w]))
        .collect()
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    #[serde(default)]
    text_config: Value,
    #[serde(default)]
    vision_config: Value,
    #[serde(alias = "image_token_id")]
    image_token_index: Option<u32>,
    #[serde(alias = "video_token_id")]
    video_token_index: Option<u32>,
    projector_hidden_act: Option<String>,
    vision_feature_layer: Option<Value>,
    vision_feature_select_strategy: Option<String>,
    vision_aspect_ratio: Option<String>,
    image_grid_pinpoints: Option<Vec<[usize; 2]>>,
    multimodal_projector_bias: Option<bool>,
}

/// The parts of a LLaVA-OneVision `config.json`.
#[derive(Debug, Clone)]
pub struct OnevisionConfig {
    pub text: HfConfig,
    pub vision: SiglipVisionConfig,
    pub image_token_id: u32,
    pub video_token_id: u32,
    pub projector_act: Activation,
    pub projector_bias: bool,
    /// Encoder layers to run: the features are their output.
    pub feature_layers: usize,
    pub anyres: Anyres,
}

/// How an image's tiles are chosen and packed.
#[derive(Debug, Clone, PartialEq)]
pub struct Anyres {
    /// The tower's square (pixels).
    pub tile: usize,
    /// Patches per tile side.
    pub grid: usize,
    /// Resolutions (height, width) an image may be tiled at.
    pub pinpoints: Vec<[usize; 2]>,
    /// `anyres_max_N`: a map of more than about N tiles' features is shrunk.
    pub max_num_patches: usize,
}

/// Parse `anyres_max_N` as transformers does (`int(s.strip("anyres_max_"))`).
fn max_num_patches(s: &str) -> std::result::Result<usize, String> {
    s.trim_matches(|c: char| "anyres_max_".contains(c))
        .parse::<usize>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("vision_aspect_ratio {s:?} (anyres_max_N)"))
}

impl OnevisionConfig {
    pub fn from_json(raw: &Value) -> MResult<Self> {
        let bad = |m: String| ModelError::Config(format!("LLaVA-OneVision config: {m}"));
        let r: RawConfig = serde_json::from_value(raw.clone()).map_err(|e| bad(e.to_string()))?;
        match r.vision_config.get("model_type").and_then(Value::as_str) {
            None | Some("siglip_vision_model") => {}
            Some(other) => {
                return Err(bad(format!("vision tower {other:?} (siglip_vision_model)")))
            }
        }
        let vision: SiglipVisionConfig =
            serde_json::from_value(r.vision_config).map_err(|e| bad(e.to_string()))?;
        vision.validate()?;
        let mut text = r.text_config;
        // transformers 5 reads tying from the root config.
        if let (Some(t), Some(o)) = (raw.get("tie_word_embeddings"), text.as_object_mut()) {
            o.insert("tie_word_embeddings".into(), t.clone());
        }
        let text = HfConfig::from_json_str(&text.to_string())?;
        let feature_layers = feature_layers(
            &r.vision_feature_layer.unwrap_or(Value::from(-1)),
            vision.num_hidden_layers,
        )
        .map_err(bad)?;
        match r
            .vision_feature_select_strategy
            .as_deref()
            .unwrap_or("full")
        {
            "full" => {}
            other => {
                // transformers drops the first patch then, and its anyres
                // packing fails; SigLIP has no class token to drop.
                return Err(bad(format!(
                    "vision_feature_select_strategy {other:?} (a SigLIP tower keeps every patch: full)"
                )));
            }
        }
        let pinpoints = r.image_grid_pinpoints.unwrap_or_else(default_pinpoints);
        let tile = vision.image_size;
        if pinpoints.is_empty()
            || pinpoints
                .iter()
                .any(|&[h, w]| h == 0 || w == 0 || h % tile != 0 || w % tile != 0)
        {
            return Err(bad(format!(
                "image_grid_pinpoints {pinpoints:?} must be non-empty multiples of the tower's {tile} px"
            )));
        }
        let anyres = Anyres {
            tile,
            grid: vision.grid(),
            pinpoints,
            max_num_patches: max_num_patches(
                r.vision_aspect_ratio.as_deref().unwrap_or("anyres_max_9"),
            )
            .map_err(bad)?,
        };
        Ok(Self {
            text,
            image_token_id: r.image_token_index.unwrap_or(151646),
            video_token_id: r.video_token_index.unwrap_or(151647),
            projector_act: Activation::parse(r.projector_hidden_act.as_deref().unwrap_or("gelu"))?,
            projector_bias: r.multimodal_projector_bias.unwrap_or(true),
            feature_layers,
            anyres,
            vision,
        })
    }
}

/// transformers' `select_best_resolution`: the pinpoint (height, width) that
/// keeps the most of the image's resolution, then wastes the least.
pub fn best_resolution(h: usize, w: usize, pinpoints: &[[usize; 2]]) -> [usize; 2] {
    let mut best = pinpoints[0];
    let (mut max_eff, mut min_waste) = (0usize, usize::MAX);
    for &[ph, pw] in pinpoints {
        let scale = (pw as f64 / w as f64).min(ph as f64 / h as f64);
        let (dw, dh) = ((w as f64 * scale) as usize, (h as f64 * scale) as usize);
        let eff = (dw * dh).min(w * h);
        let waste = ph * pw - eff;
        if eff > max_eff || (eff == max_eff && waste < min_waste) {
            (max_eff, min_waste, best) = (eff, waste, [ph, pw]);
        }
    }
    best
}

/// Python's `a // b` for positive floats (floor of the exact quotient).
fn py_floordiv(a: f64, b: f64) -> f64 {
    let m = a % b;
    let div = (a - m) / b;
    let f = div.floor();
    if div - f > 0.5 {
        f + 1.0
    } else {
        f
    }
}

/// The tiled feature map of one image, as transformers packs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packing {
    /// The tiles' map, `tile rows * grid` x `tile cols * grid`.
    pub full: (usize, usize),
    /// Rows and columns kept by unpadding: (first row, rows, first col, cols).
    pub unpadded: (usize, usize, usize, usize),
    /// The map's size after the `anyres_max` shrink (= unpadded when none).
    pub out: (usize, usize),
}

impl Packing {
    /// Rows of the item: the base image, the map, one newline per map row.
    pub fn rows(&self, grid: usize) -> usize {
        grid * grid + self.out.0 * (self.out.1 + 1)
    }
}

impl Anyres {
    /// Tile rows and columns of an image of `h` x `w` pixels.
    pub fn tiles(&self, h: usize, w: usize) -> (usize, usize) {
        let [bh, bw] = best_resolution(h, w, &self.pinpoints);
        (bh / self.tile, bw / self.tile)
    }

    /// `unpad_image` then the `anyres_max` rule (`pack_image_features`).
    pub fn packing(&self, h: usize, w: usize, rows: usize, cols: usize) -> Packing {
        let (ch, cw) = (rows * self.grid, cols * self.grid);
        let (oh, ow) = (h as f64, w as f64);
        // int(round(x, 7)): aspect ratios that are exact stay exact.
        let round7 = |x: f64| ((x * 1e7).round() / 1e7) as usize;
        let unpadded = if ow / oh > cw as f64 / ch as f64 {
            let new_h = round7(oh * (cw as f64 / ow));
            let pad = ch.saturating_sub(new_h) / 2;
            (pad, ch - 2 * pad, 0, cw)
        } else {
            let new_w = round7(ow * (ch as f64 / oh));
            let pad = cw.saturating_sub(new_w) / 2;
            (0, ch, pad, cw - 2 * pad)
        };
        let (uh, uw) = (unpadded.1, unpadded.3);
        let ratio =
            ((uh * uw) as f64 / (self.max_num_patches * self.grid * self.grid) as f64).sqrt();
        let out = if ratio > 1.1 {
            (
                py_floordiv(uh as f64, ratio) as usize,
                py_floordiv(uw as f64, ratio) as usize,
            )
        } else {
            (uh, uw)
        };
        Packing {
            full: (ch, cw),
            unpadded,
            out,
        }
    }

    /// Rows (and `<video>` tokens) of a video of `frames` frames.
    pub fn video_rows(&self, frames: usize) -> usize {
        let p = self.grid.div_ceil(2);
        frames * p * p + 1
    }
}

fn load_folder(ck: &Checkpoint) -> MResult<Built> {
    let cfg = OnevisionConfig::from_json(ck.config)?;
    let (pp, text) = ck.read_required("preprocessor_config.json")?;
    let video = ck.read_optional("video_preprocessor_config.json")?;
    let video = video.as_ref().map(|(_, t)| t.as_str());
    let processor =
        OnevisionProcessor::new(&text, video, &cfg).map_err(|message| ModelError::InvalidJson {
            what: "preprocessor config",
            path: pp,
            message,
        })?;
    let model = load(&cfg, &ck.weights()?, ck.max_model_len)?;
    Ok(Built {
        model: Box::new(model),
        processor: Some(Arc::new(processor)),
        text: cfg.text.clone(),
    })
}

/// The language model, tower, projector and newline row of a checkpoint.
pub fn load(
    cfg: &OnevisionConfig,
    w: &Weights,
    max_model_len: Option<usize>,
) -> MResult<MultimodalLm> {
    let text = crate::families::qwen2::config_from_hf(&cfg.text, max_model_len)?;
    let (lm_w, root) = language_model_weights(w)?;
    let lm = DecoderLm::load(text, &lm_w)?;
    let tower = vision_tower_prefix(w, root, "embeddings.patch_embedding.weight")?;
    let vision = SiglipVision::load(cfg.vision.clone(), w, &tower, cfg.feature_layers)?;
    let (vd, td) = (cfg.vision.hidden_size, cfg.text.hidden_size);
    let proj = format!("{root}multi_modal_projector");
    let encoder = Encoder {
        vision,
        linear_1: w.linear(&format!("{proj}.linear_1"), vd, td, cfg.projector_bias)?,
        act: cfg.projector_act,
        linear_2: w.linear(&format!("{proj}.linear_2"), td, td, cfg.projector_bias)?,
        newline: w.tensor(&format!("{root}image_newline"), &[td])?,
        anyres: cfg.anyres.clone(),
    };
    Ok(MultimodalLm::new(lm, Box::new(encoder), HF_ARCHITECTURE))
}

/// Tower + projector + packing: one item's pixels -> its rows.
struct Encoder {
    vision: SiglipVision,
    linear_1: Linear,
    act: Activation,
    linear_2: Linear,
    /// `[text hidden]`.
    newline: Tensor,
    anyres: Anyres,
}

impl Encoder {
    /// One tile `[3, s, s]` -> `[grid * grid, text hidden]`.
    fn tile(&self, pixels: &Tensor) -> Result<Tensor> {
        let x = self.vision.hidden_states(pixels)?;
        self.linear_2
            .forward(&self.act.forward(&self.linear_1.forward(&x)?)?)
    }

    /// `[channels, h, w]` map plus a newline column -> `[h * (w + 1), channels]`.
    fn with_newlines(&self, map: &Tensor) -> Result<Tensor> {
        let (d, h, _) = map.dims3()?;
        let nl = self
            .newline
            .to_dtype(map.dtype())?
            .reshape((d, 1, 1))?
            .broadcast_as((d, h, 1))?;
        Tensor::cat(&[map, &nl], 2)?.flatten_from(1)?.t()
    }

    fn image(&self, pixels: &Tensor, grid: &Tensor) -> Result<Tensor> {
        let g: Vec<u32> = grid.to_vec1()?;
        let &[h, w, rows, cols] = g.as_slice() else {
            bail!("{IMAGE_GRID} must be [height, width, rows, cols], got {g:?}");
        };
        let (h, w, rows, cols) = (h as usize, w as usize, rows as usize, cols as usize);
        let n = pixels.dim(0)?;
        if n != 1 + rows * cols {
            bail!("{n} tiles for a {rows}x{cols} grid plus the base image");
        }
        if n == 1 {
            let base = self.tile(&pixels.get(0)?)?;
            let nl = self.newline.to_dtype(base.dtype())?.unsqueeze(0)?;
            return Tensor::cat(&[&base, &nl], 0);
        }
        let tiles = (0..n)
            .map(|i| self.tile(&pixels.get(i)?))
            .collect::<Result<Vec<_>>>()?;
        let base = &tiles[0];
        let p = self.anyres.grid;
        let d = base.dim(1)?;
        let pk = self.anyres.packing(h, w, rows, cols);
        // [rows * cols, p * p, d] -> [d, rows * p, cols * p] (tile-major to one map).
        let map = Tensor::stack(&tiles[1..], 0)?
            .reshape((rows, cols, p, p, d))?
            .permute((4, 0, 2, 1, 3))?
            .reshape((d, rows * p, cols * p))?;
        let (top, uh, left, uw) = pk.unpadded;
        let map = map.narrow(1, top, uh)?.narrow(2, left, uw)?;
        let map = if pk.out != (uh, uw) {
            bilinear(&map, pk.out.0, pk.out.1)?.to_dtype(base.dtype())?
        } else {
            map
        };
        Tensor::cat(&[base, &self.with_newlines(&map)?], 0)
    }

    fn video(&self, pixels: &Tensor) -> Result<Tensor> {
        let p = self.anyres.grid;
        let q = p.div_ceil(2);
        let mut rows = Vec::with_capacity(pixels.dim(0)? + 1);
        for i in 0..pixels.dim(0)? {
            let f = self.tile(&pixels.get(i)?)?;
            let d = f.dim(1)?;
            let map = f.t()?.reshape((d, p, p))?;
            rows.push(
                bilinear(&map, q, q)?
                    .to_dtype(f.dtype())?
                    .flatten_from(1)?
                    .t()?,
            );
        }
        let dtype = rows.first().map_or(DType::F32, Tensor::dtype);
        rows.push(self.newline.to_dtype(dtype)?.unsqueeze(0)?);
        Tensor::cat(&rows, 0)
    }
}

impl MediaEncoder for Encoder {
    fn encode(&self, features: &MmFeatures) -> Result<Tensor> {
        match (
            features.get(PIXEL_VALUES),
            features.get(IMAGE_GRID),
            features.get(PIXEL_VALUES_VIDEOS),
        ) {
            (Some(pixels), Some(grid), _) => self.image(pixels, grid),
            (_, _, Some(frames)) => self.video(frames),
            _ => bail!("LLaVA-OneVision takes images ({PIXEL_VALUES}, {IMAGE_GRID}) and videos ({PIXEL_VALUES_VIDEOS})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llava-hf/llava-onevision-qwen2-0.5b-ov-hf's shape.
    fn released() -> Anyres {
        Anyres {
            tile: 384,
            grid: 27,
            pinpoints: default_pinpoints(),
            max_num_patches: 9,
        }
    }

    #[test]
    fn token_counts_match_transformers() {
        // LlavaOnevisionProcessor._get_number_of_features (+ base 729) for
        // these sizes, computed with transformers 5.
        let a = released();
        for ((h, w), want) in [
            ((899, 1024), 6551),
            ((480, 640), 2929),
            ((384, 384), 1485),
            ((100, 2000), 2196),
        ] {
            let (r, c) = a.tiles(h, w);
            assert_eq!(a.packing(h, w, r, c).rows(27), want, "{h}x{w}");
        }
        assert_eq!(a.video_rows(8), 8 * 14 * 14 + 1);
        assert_eq!(max_num_patches("anyres_max_9"), Ok(9));
        assert!(max_num_patches("anyres").is_err());
    }

    #[test]
    fn config_checks() {
        let base = serde_json::json!({
            "architectures": [HF_ARCHITECTURE],
            "text_config": {"model_type": "qwen2", "vocab_size": 152000, "hidden_size": 896,
                "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                "num_key_value_heads": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6},
            "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "image_size": 384,
                "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 26, "patch_size": 14},
            "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
        });
        let c = OnevisionConfig::from_json(&base).unwrap();
        assert_eq!(
            (c.feature_layers, c.anyres.grid, c.anyres.pinpoints.len()),
            (26, 27, 36)
        );
        for (k, v) in [
            (
                "vision_feature_select_strategy",
                serde_json::json!("default"),
            ),
            ("vision_aspect_ratio", serde_json::json!("pad")),
            ("image_grid_pinpoints", serde_json::json!([[384, 500]])),
        ] {
            let mut bad = base.clone();
            bad[k] = v;
            assert!(OnevisionConfig::from_json(&bad).is_err(), "{k}");
        }
    }
}
