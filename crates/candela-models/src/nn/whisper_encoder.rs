//! The Whisper encoder (as Whisper and Qwen2-Audio use it): two GELU
//! convolutions over the log-mel frames (the second with stride 2), learned
//! positions, pre-norm transformer layers with full bidirectional attention,
//! and a final layer norm. Qwen2-Audio adds a stride-2 average pool before
//! that norm.
//!
//! One item at a time, as `[frames, d_model]` 2-D tensors: items have
//! different lengths and encoders run once per item (then the encoder cache).

use candle_core::{bail, Module, Result, Tensor, D};
use candle_nn::LayerNorm;
use serde::Deserialize;

use crate::error::Result as MResult;
use crate::nn::fused_attention::{attention, Keys};
use crate::weights::{Linear, Weights};

/// `audio_config` of Qwen2-Audio, or the encoder half of a Whisper config.
#[derive(Debug, Clone, Deserialize)]
pub struct AudioEncoderConfig {
    pub d_model: usize,
    #[serde(alias = "encoder_layers")]
    pub num_layers: usize,
    #[serde(alias = "encoder_attention_heads")]
    pub num_heads: usize,
    #[serde(alias = "encoder_ffn_dim")]
    pub ffn_dim: usize,
    #[serde(default = "default_mels")]
    pub num_mel_bins: usize,
    #[serde(default = "default_positions")]
    pub max_source_positions: usize,
    #[serde(default)]
    pub scale_embedding: bool,
    #[serde(default = "default_act")]
    pub activation_function: String,
}

fn default_mels() -> usize {
    128
}
fn default_positions() -> usize {
    1500
}
fn default_act() -> String {
    "gelu".into()
}

impl AudioEncoderConfig {
    /// Mel frames the encoder takes (30 s): two per position.
    pub fn num_frames(&self) -> usize {
        2 * self.max_source_positions
    }
}

struct EncoderLayer {
    attn_norm: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ffn_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

pub struct AudioEncoder {
    cfg: AudioEncoderConfig,
    conv1_w: Tensor,
    conv1_b: Tensor,
    conv2_w: Tensor,
    conv2_b: Tensor,
    positions: Tensor,
    layers: Vec<EncoderLayer>,
    final_norm: LayerNorm,
    /// Qwen2-Audio: average adjacent frames after the layers.
    pool: bool,
}

const LN_EPS: f64 = 1e-5;

impl AudioEncoder {
    /// Load from `{prefix}.conv1`, `{prefix}.layers.N`, `{prefix}.layer_norm`, ...
    pub fn load(cfg: AudioEncoderConfig, w: &Weights, prefix: &str, pool: bool) -> MResult<Self> {
        if cfg.activation_function != "gelu" {
            return Err(crate::error::ModelError::Config(format!(
                "audio encoder activation {:?} is not supported (gelu)",
                cfg.activation_function
            )));
        }
        if cfg.num_heads == 0 || !cfg.d_model.is_multiple_of(cfg.num_heads) {
            return Err(crate::error::ModelError::Config(format!(
                "audio encoder d_model {} is not divisible by {} heads",
                cfg.d_model, cfg.num_heads
            )));
        }
        let d = cfg.d_model;
        let p = w.pp(prefix);
        let layers_w = p.pp("layers");
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let l = layers_w.pp(i);
                Ok(EncoderLayer {
                    attn_norm: l.layer_norm("self_attn_layer_norm", d, LN_EPS)?,
                    q: l.linear("self_attn.q_proj", d, d, true)?,
                    k: l.linear("self_attn.k_proj", d, d, false)?,
                    v: l.linear("self_attn.v_proj", d, d, true)?,
                    o: l.linear("self_attn.out_proj", d, d, true)?,
                    ffn_norm: l.layer_norm("final_layer_norm", d, LN_EPS)?,
                    fc1: l.linear("fc1", d, cfg.ffn_dim, true)?,
                    fc2: l.linear("fc2", cfg.ffn_dim, d, true)?,
                })
            })
            .collect::<MResult<Vec<_>>>()?;
        Ok(Self {
            conv1_w: p.tensor("conv1.weight", &[d, cfg.num_mel_bins, 3])?,
            conv1_b: p.tensor("conv1.bias", &[d])?,
            conv2_w: p.tensor("conv2.weight", &[d, d, 3])?,
            conv2_b: p.tensor("conv2.bias", &[d])?,
            positions: p.tensor("embed_positions.weight", &[cfg.max_source_positions, d])?,
            final_norm: p.layer_norm("layer_norm", d, LN_EPS)?,
            layers,
            pool,
            cfg,
        })
    }

    pub fn config(&self) -> &AudioEncoderConfig {
        &self.cfg
    }

    /// Positions after the stride-2 convolution for `frames` mel frames
    /// (Whisper's `(frames - 1) // 2 + 1`).
    pub fn conv_output_len(frames: usize) -> usize {
        frames.saturating_sub(1) / 2 + 1
    }

    /// Output rows for `frames` valid mel frames: after the convolution, and
    /// with pooling, `(len - 2) // 2 + 1` (Qwen2-Audio's audio token count).
    pub fn output_len(&self, frames: usize) -> usize {
        let n = Self::conv_output_len(frames);
        if self.pool {
            n.saturating_sub(2) / 2 + 1
        } else {
            n
        }
    }

    /// Encode `features` (`[num_mel_bins, num_frames]`, padded like the HF
    /// feature extractor) whose first `valid_frames` frames carry audio.
    /// Positions past the audio are masked as keys (as the reference does),
    /// which makes them irrelevant to the rows kept, so they are not computed.
    /// Returns `[output_len(valid_frames), d_model]`.
    pub fn forward(&self, features: &Tensor, valid_frames: usize) -> Result<Tensor> {
        let (mels, frames) = features.dims2()?;
        if mels != self.cfg.num_mel_bins {
            bail!(
                "audio features have {mels} mel bins, the encoder wants {}",
                self.cfg.num_mel_bins
            );
        }
        if valid_frames == 0 || valid_frames > frames || frames > self.cfg.num_frames() {
            bail!(
                "audio features: {valid_frames} valid of {frames} frames (at most {})",
                self.cfg.num_frames()
            );
        }
        let keep = Self::conv_output_len(valid_frames);
        // conv2 row keep-1 reads conv1 rows up to 2*keep-1, which read frames
        // up to 2*keep: run the convolutions over just those frames (plus one).
        let take = (2 * keep + 2).min(frames);
        let mut h = self.layers_forward(features, take, keep)?;
        if self.pool {
            let n = self.output_len(valid_frames);
            let d = self.cfg.d_model;
            let pairs = h.narrow(0, 0, 2 * n)?.reshape((n, 2, d))?;
            h = (pairs.sum(1)? * 0.5)?;
        }
        self.final_norm.forward(&h)
    }

    /// Whisper's encoder: the full padded window (`[num_mel_bins,
    /// num_frames()]`) with every position attending to every other, padding
    /// included — the reference takes no mask, and its outputs depend on the
    /// padded positions. Returns `[max_source_positions, d_model]`.
    pub fn forward_unmasked(&self, features: &Tensor) -> Result<Tensor> {
        let (mels, frames) = features.dims2()?;
        if mels != self.cfg.num_mel_bins {
            bail!(
                "audio features have {mels} mel bins, the encoder wants {}",
                self.cfg.num_mel_bins
            );
        }
        if frames != self.cfg.num_frames() {
            bail!("audio features have {frames} frames, the encoder wants exactly {} (a padded 30 s window)", self.cfg.num_frames());
        }
        if self.pool {
            bail!("forward_unmasked is Whisper's encoder, which has no pooling");
        }
        let h = self.layers_forward(features, frames, self.cfg.max_source_positions)?;
        self.final_norm.forward(&h)
    }

    /// Convolutions over the first `take` frames, the first `keep` positions
    /// of their output plus learned positions, then the transformer layers.
    fn layers_forward(&self, features: &Tensor, take: usize, keep: usize) -> Result<Tensor> {
        let dtype = self.conv1_w.dtype();
        let x = features.narrow(1, 0, take)?.to_dtype(dtype)?.unsqueeze(0)?;
        let x = x
            .conv1d(&self.conv1_w, 1, 1, 1, 1)?
            .broadcast_add(&self.conv1_b.reshape((1, (), 1))?)?
            .gelu_erf()?;
        let x = x
            .conv1d(&self.conv2_w, 1, 2, 1, 1)?
            .broadcast_add(&self.conv2_b.reshape((1, (), 1))?)?
            .gelu_erf()?;
        let x = x.squeeze(0)?.t()?.narrow(0, 0, keep)?;
        let mut h = (x + self.positions.narrow(0, 0, keep)?)?;
        if self.cfg.scale_embedding {
            // Whisper's embed_scale multiplies the conv output only; no
            // released Whisper / Qwen2-Audio checkpoint sets it.
            bail!("scale_embedding = true is not supported");
        }
        for layer in &self.layers {
            h = self.layer_forward(layer, &h)?;
        }
        Ok(h)
    }

    fn layer_forward(&self, l: &EncoderLayer, x: &Tensor) -> Result<Tensor> {
        let (n, d) = x.dims2()?;
        let heads = self.cfg.num_heads;
        let hd = d / heads;
        let h = l.attn_norm.forward(x)?;
        let split = |t: Tensor| t.reshape((n, heads, hd))?.transpose(0, 1);
        let q = split(l.q.forward(&h)?)?;
        let k = split(l.k.forward(&h)?)?;
        let v = split(l.v.forward(&h)?)?;
        let a = attention(&q, &k, &v, (hd as f64).powf(-0.5), Keys::All)?;
        let x = (x + l.o.forward(&a)?)?;
        let h = l.ffn_norm.forward(&x)?;
        let h = l.fc2.forward(&l.fc1.forward(&h)?.gelu_erf()?)?;
        let out = (x + h)?;
        debug_assert_eq!(out.dim(D::Minus1)?, d);
        Ok(out)
    }
}
