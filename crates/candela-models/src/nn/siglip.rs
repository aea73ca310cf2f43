//! The SigLIP vision transformer (`SiglipVisionModel` without its pooling
//! head), as Gemma 3 uses it: patch convolution with bias, learned position
//! embeddings (no class token, no interpolation), pre-LN encoder layers with
//! a GELU-tanh MLP, and a final `post_layernorm`.

use candle_core::{bail, DType, Module, Result, Tensor};
use candle_nn::LayerNorm;
use serde::Deserialize;

use crate::error::{ModelError, Result as MResult};
use crate::nn::activation::Activation;
use crate::weights::{Linear, Weights};

/// `SiglipVisionConfig` (defaults as transformers has them).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SiglipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl Default for SiglipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 16,
            hidden_act: "gelu_pytorch_tanh".into(),
            layer_norm_eps: 1e-6,
        }
    }
}

impl SiglipVisionConfig {
    pub fn validate(&self) -> MResult<()> {
        let bad = |m: String| Err(ModelError::Config(format!("vision_config: {m}")));
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return bad(format!(
                "image_size {} is not a multiple of patch_size {}",
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

pub struct SiglipVision {
    cfg: SiglipVisionConfig,
    act: Activation,
    /// `[hidden, channels * patch^2]`: the convolution as one matmul.
    patch_embed: Tensor,
    patch_bias: Tensor,
    position_embedding: Tensor,
    layers: Vec<Layer>,
    post_norm: LayerNorm,
}

impl SiglipVision {
    /// The tower under `prefix` (`…embeddings`, `…encoder`, `…post_layernorm`).
    pub fn load(cfg: SiglipVisionConfig, w: &Weights, prefix: &str) -> MResult<Self> {
        cfg.validate()?;
        let (d, p, c) = (cfg.hidden_size, cfg.patch_size, cfg.num_channels);
        let eps = cfg.layer_norm_eps;
        let emb = format!("{prefix}.embeddings");
        let patch_embed = w
            .tensor(&format!("{emb}.patch_embedding.weight"), &[d, c, p, p])?
            .reshape((d, c * p * p))?;
        let positions = cfg.grid() * cfg.grid();
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = format!("{prefix}.encoder.layers.{i}");
            let lin = |name: &str, i, o| w.linear(&format!("{l}.{name}"), i, o, true);
            layers.push(Layer {
                ln1: w.layer_norm(&format!("{l}.layer_norm1"), d, eps)?,
                q: lin("self_attn.q_proj", d, d)?,
                k: lin("self_attn.k_proj", d, d)?,
                v: lin("self_attn.v_proj", d, d)?,
                out: lin("self_attn.out_proj", d, d)?,
                ln2: w.layer_norm(&format!("{l}.layer_norm2"), d, eps)?,
                fc1: lin("mlp.fc1", d, cfg.intermediate_size)?,
                fc2: lin("mlp.fc2", cfg.intermediate_size, d)?,
            });
        }
        Ok(Self {
            act: Activation::parse(&cfg.hidden_act)?,
            patch_embed,
            patch_bias: w.tensor(&format!("{emb}.patch_embedding.bias"), &[d])?,
            position_embedding: w
                .tensor(&format!("{emb}.position_embedding.weight"), &[positions, d])?,
            layers,
            post_norm: w.layer_norm(&format!("{prefix}.post_layernorm"), d, eps)?,
            cfg,
        })
    }

    pub fn config(&self) -> &SiglipVisionConfig {
        &self.cfg
    }

    /// One image `[channels, size, size]` (or `[1, ...]`) -> the
    /// post-normed last hidden state `[patches, hidden]`, patches row-major.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
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
            .to_dtype(self.patch_embed.dtype())?
            .reshape((c, g, p, g, p))?
            .permute((1, 3, 0, 2, 4))?
            .reshape((g * g, c * p * p))?;
        let x = patches
            .matmul(&self.patch_embed.t()?)?
            .broadcast_add(&self.patch_bias)?;
        let mut x = (x + &self.position_embedding)?;
        for l in &self.layers {
            x = (&x + self.attention(l, &l.ln1.forward(&x)?)?)?;
            let h = l
                .fc2
                .forward(&self.act.forward(&l.fc1.forward(&l.ln2.forward(&x)?)?)?)?;
            x = (x + h)?;
        }
        self.post_norm.forward(&x)
    }

    fn attention(&self, l: &Layer, x: &Tensor) -> Result<Tensor> {
        let (n, d) = x.dims2()?;
        let heads = self.cfg.num_attention_heads;
        let hd = d / heads;
        let split = |t: Tensor| t.reshape((n, heads, hd))?.transpose(0, 1)?.contiguous();
        let q = split(l.q.forward(x)?)?;
        let k = split(l.k.forward(x)?)?;
        let v = split(l.v.forward(x)?)?;
        let scores = (q.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?;
        // Softmax in f32, as transformers' eager attention does.
        let probs =
            crate::softmax::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?;
        let o = probs.matmul(&v)?.transpose(0, 1)?.reshape((n, d))?;
        l.out.forward(&o)
    }
}
