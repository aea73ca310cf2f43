//! The vision transformers the image families share: CLIP's
//! (`CLIPVisionModel`, as LLaVA uses it) and SigLIP's (`SiglipVisionModel`
//! without its pooling head, as Gemma 3 uses it). Both are a patch
//! convolution, learned position embeddings and pre-LN encoder layers; a
//! [`Flavour`] says what differs: CLIP has a class token, no patch bias and a
//! `pre_layrnorm`, and its features are the hidden states of a chosen layer
//! (later layers and the post norm are not run); SigLIP has a patch bias, no
//! class token and a final `post_layernorm`.

use std::marker::PhantomData;

use candle_core::{bail, Module, Result, Tensor};
use candle_nn::LayerNorm;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{ModelError, Result as MResult};
use crate::nn::activation::Activation;
use crate::nn::fused_attention::{attention, Keys};
use crate::weights::{Linear, Weights};

/// What a tower family changes in the shared transformer.
pub trait Flavour {
    /// transformers' defaults for the fields a config leaves out.
    fn defaults() -> VitDefaults;
    /// A learned class token before the patches (CLIP).
    const CLASS_TOKEN: bool;
    /// The patch convolution has a bias (SigLIP).
    const PATCH_BIAS: bool;
    /// A layer norm after the position embeddings, under this name (CLIP's
    /// `pre_layrnorm`).
    const PRE_NORM: Option<&'static str>;
    /// A layer norm after the last layer, under this name (SigLIP's
    /// `post_layernorm`).
    const POST_NORM: Option<&'static str>;
}

/// The defaults that differ between flavours.
pub struct VitDefaults {
    pub patch_size: usize,
    pub hidden_act: &'static str,
    pub layer_norm_eps: f64,
}

#[derive(Debug, Clone)]
pub struct Clip;

impl Flavour for Clip {
    fn defaults() -> VitDefaults {
        VitDefaults {
            patch_size: 32,
            hidden_act: "quick_gelu",
            layer_norm_eps: 1e-5,
        }
    }
    const CLASS_TOKEN: bool = true;
    const PATCH_BIAS: bool = false;
    const PRE_NORM: Option<&'static str> = Some("pre_layrnorm");
    const POST_NORM: Option<&'static str> = None;
}

#[derive(Debug, Clone)]
pub struct Siglip;

impl Flavour for Siglip {
    fn defaults() -> VitDefaults {
        VitDefaults {
            patch_size: 16,
            hidden_act: "gelu_pytorch_tanh",
            layer_norm_eps: 1e-6,
        }
    }
    const CLASS_TOKEN: bool = false;
    const PATCH_BIAS: bool = true;
    const PRE_NORM: Option<&'static str> = None;
    const POST_NORM: Option<&'static str> = Some("post_layernorm");
}

/// `CLIPVisionConfig` / `SiglipVisionConfig` (defaults as transformers has them).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, bound = "F: Flavour")]
pub struct VitConfig<F> {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    #[serde(skip)]
    flavour: PhantomData<F>,
}

pub type ClipVisionConfig = VitConfig<Clip>;
pub type SiglipVisionConfig = VitConfig<Siglip>;

impl<F: Flavour> Default for VitConfig<F> {
    fn default() -> Self {
        let d = F::defaults();
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: d.patch_size,
            hidden_act: d.hidden_act.into(),
            layer_norm_eps: d.layer_norm_eps,
            flavour: PhantomData,
        }
    }
}

impl<F> VitConfig<F> {
    pub fn validate(&self) -> MResult<()> {
        let bad = |m: String| Err(ModelError::Config(format!("vision_config: {m}")));
        // A size that is not a multiple leaves its last pixels unused, as the
        // strided patch convolution does (SigLIP-so400m: 384 px, 14 px patches).
        if self.patch_size == 0 || self.image_size < self.patch_size {
            return bad(format!(
                "image_size {} is smaller than patch_size {}",
                self.image_size, self.patch_size
            ));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return bad(format!(
                "hidden_size {} is not a multiple of {} heads",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.num_channels != 3 {
            return bad(format!(
                "the tower takes {} channels; images are RGB (3)",
                self.num_channels
            ));
        }
        Activation::parse(&self.hidden_act).map(|_| ())
    }

    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }
}

/// The encoder layers to run for `vision_feature_layer` (an index into
/// `hidden_states` = [embeddings, after layer 1, ..., after layer L], negative
/// from the end): its features are their output.
pub fn feature_layers(
    vision_feature_layer: &Value,
    num_hidden_layers: usize,
) -> std::result::Result<usize, String> {
    let layers = num_hidden_layers as i64;
    match vision_feature_layer {
        Value::Number(n) => {
            let k = n
                .as_i64()
                .ok_or_else(|| format!("vision_feature_layer {n} is not an integer"))?;
            let idx = if k < 0 { layers + 1 + k } else { k };
            if !(0..=layers).contains(&idx) {
                return Err(format!(
                    "vision_feature_layer {k} is outside a {layers}-layer tower"
                ));
            }
            Ok(idx as usize)
        }
        other => Err(format!(
            "vision_feature_layer {other} (a list of layers) is not supported"
        )),
    }
}

struct Layer {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

pub struct VisionTransformer<F> {
    cfg: VitConfig<F>,
    act: Activation,
    /// `[hidden, channels * patch^2]`: the convolution as one matmul.
    patch_embed: Tensor,
    patch_bias: Option<Tensor>,
    class_embedding: Option<Tensor>,
    position_embedding: Tensor,
    pre_norm: Option<LayerNorm>,
    layers: Vec<Layer>,
    post_norm: Option<LayerNorm>,
}

pub type ClipVision = VisionTransformer<Clip>;
pub type SiglipVision = VisionTransformer<Siglip>;

impl<F: Flavour> VisionTransformer<F> {
    /// The tower under `prefix` (`…embeddings`, `…encoder`, its norms), with
    /// only the first `num_layers` encoder layers (those the features need).
    pub fn load(cfg: VitConfig<F>, w: &Weights, prefix: &str, num_layers: usize) -> MResult<Self> {
        cfg.validate()?;
        let (d, p, c) = (cfg.hidden_size, cfg.patch_size, cfg.num_channels);
        let eps = cfg.layer_norm_eps;
        let (w, emb) = (w.pp(prefix), w.pp(prefix).pp("embeddings"));
        let patch_embed = emb
            .tensor("patch_embedding.weight", &[d, c, p, p])?
            .reshape((d, c * p * p))?;
        let positions = cfg.grid() * cfg.grid() + F::CLASS_TOKEN as usize;
        let mut layers = Vec::with_capacity(num_layers);
        let layers_w = w.pp("encoder.layers");
        for i in 0..num_layers {
            let l = layers_w.pp(i);
            let lin = |name: &str, i, o| l.linear(name, i, o, true);
            layers.push(Layer {
                ln1: l.layer_norm("layer_norm1", d, eps)?,
                q: lin("self_attn.q_proj", d, d)?,
                k: lin("self_attn.k_proj", d, d)?,
                v: lin("self_attn.v_proj", d, d)?,
                out: lin("self_attn.out_proj", d, d)?,
                ln2: l.layer_norm("layer_norm2", d, eps)?,
                fc1: lin("mlp.fc1", d, cfg.intermediate_size)?,
                fc2: lin("mlp.fc2", cfg.intermediate_size, d)?,
            });
        }
        let norm = |name: Option<&str>| name.map(|n| w.layer_norm(n, d, eps)).transpose();
        Ok(Self {
            act: Activation::parse(&cfg.hidden_act)?,
            patch_embed,
            patch_bias: F::PATCH_BIAS
                .then(|| emb.tensor("patch_embedding.bias", &[d]))
                .transpose()?,
            class_embedding: F::CLASS_TOKEN
                .then(|| emb.tensor("class_embedding", &[d]))
                .transpose()?,
            position_embedding: emb.tensor("position_embedding.weight", &[positions, d])?,
            pre_norm: norm(F::PRE_NORM)?,
            layers,
            post_norm: norm(F::POST_NORM)?,
            cfg,
        })
    }

    pub fn config(&self) -> &VitConfig<F> {
        &self.cfg
    }

    /// One image `[channels, size, size]` (or `[1, ...]`) -> the loaded
    /// layers' output `[class token + patches, hidden]` (patches row-major),
    /// post-normed where the flavour has that norm (transformers'
    /// `last_hidden_state` when every layer is loaded).
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let x = self.hidden_states(pixels)?;
        match &self.post_norm {
            Some(n) => n.forward(&x),
            None => Ok(x),
        }
    }

    /// The loaded layers' output without the post norm: transformers'
    /// `hidden_states[num_layers]`, the features LLaVA-style models select
    /// by `vision_feature_layer`.
    pub fn hidden_states(&self, pixels: &Tensor) -> Result<Tensor> {
        let (s, p, c) = (
            self.cfg.image_size,
            self.cfg.patch_size,
            self.cfg.num_channels,
        );
        let pixels = if pixels.rank() == 4 {
            pixels.squeeze(0)?
        } else {
            pixels.clone()
        };
        if pixels.dims() != [c, s, s] {
            bail!(
                "pixel_values must be [{c}, {s}, {s}] for this vision tower, got {:?}",
                pixels.dims()
            );
        }
        let g = s / p;
        let patches = pixels
            .narrow(1, 0, g * p)?
            .narrow(2, 0, g * p)?
            .to_dtype(self.patch_embed.dtype())?
            .reshape((c, g, p, g, p))?
            .permute((1, 3, 0, 2, 4))?
            .reshape((g * g, c * p * p))?;
        let mut x = patches.matmul(&self.patch_embed.t()?)?;
        if let Some(b) = &self.patch_bias {
            x = x.broadcast_add(b)?;
        }
        if let Some(cls) = &self.class_embedding {
            x = Tensor::cat(&[cls.unsqueeze(0)?, x], 0)?;
        }
        x = (x + &self.position_embedding)?;
        if let Some(n) = &self.pre_norm {
            x = n.forward(&x)?;
        }
        for l in &self.layers {
            x = (&x + self.attention(l, &l.ln1.forward(&x)?)?)?;
            let h = l
                .fc2
                .forward(&self.act.forward(&l.fc1.forward(&l.ln2.forward(&x)?)?)?)?;
            x = (x + h)?;
        }
        Ok(x)
    }

    fn attention(&self, l: &Layer, x: &Tensor) -> Result<Tensor> {
        let (n, d) = x.dims2()?;
        let heads = self.cfg.num_attention_heads;
        let hd = d / heads;
        // [heads, n, hd] views of the projections (no copy on the CPU).
        let split = |t: Tensor| t.reshape((n, heads, hd))?.transpose(0, 1);
        let q = split(l.q.forward(x)?)?;
        let k = split(l.k.forward(x)?)?;
        let v = split(l.v.forward(x)?)?;
        let o = attention(&q, &k, &v, (hd as f64).powf(-0.5), Keys::All)?;
        l.out.forward(&o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_checks() {
        let ok = ClipVisionConfig {
            image_size: 336,
            patch_size: 14,
            ..Default::default()
        };
        ok.validate().unwrap();
        assert_eq!(ok.grid(), 24);
        let so400m = SiglipVisionConfig {
            image_size: 384,
            patch_size: 14,
            ..Default::default()
        };
        so400m.validate().unwrap();
        assert_eq!(so400m.grid(), 27);
        let bad = ClipVisionConfig {
            image_size: 10,
            patch_size: 14,
            ..Default::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("smaller than patch_size"));
        let act = ClipVisionConfig {
            hidden_act: "relu6".into(),
            ..Default::default()
        };
        assert!(act.validate().unwrap_err().to_string().contains("relu6"));
    }
}
