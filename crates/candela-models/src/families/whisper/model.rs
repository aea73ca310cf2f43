//! Whisper (`WhisperForConditionalGeneration`): the audio encoder of
//! [`crate::nn::whisper_encoder`] over a full padded 30 s window, and a text
//! decoder — token embeddings (tied to `proj_out`), learned positions,
//! pre-LN layers with causal self-attention, cross-attention over the
//! encoder output and a GELU FFN, then a final layer norm.
//!
//! The decoder runs a ragged batch: every sequence brings its new tokens,
//! the projections run over all of them at once, and attention runs per
//! sequence against its own cache ([`DecoderState`]): self-attention K/V grow
//! by the tokens fed, cross-attention K/V are computed once per audio item
//! ([`CrossKv`]). Transcription (prompt tokens, suppression, batching) lives
//! in [`super::transcribe`].

use std::sync::Arc;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::LayerNorm;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{ModelError, Result as MResult};
use crate::nn::fused_attention::{attention, Keys};
use crate::nn::whisper_encoder::{AudioEncoder, AudioEncoderConfig};
use crate::weights::{DecodeRows, Linear, Weights, WeightsAt};

pub const ARCHITECTURE: &str = "WhisperForConditionalGeneration";

const LN_EPS: f64 = 1e-5;

/// The fields of a Whisper `config.json` we use; defaults are transformers'
/// `WhisperConfig` defaults (whisper-tiny).
#[derive(Debug, Clone, Deserialize)]
pub struct WhisperConfig {
    #[serde(default = "d_model")]
    pub d_model: usize,
    #[serde(default = "layers")]
    pub encoder_layers: usize,
    #[serde(default = "layers")]
    pub decoder_layers: usize,
    #[serde(default = "heads")]
    pub encoder_attention_heads: usize,
    #[serde(default = "heads")]
    pub decoder_attention_heads: usize,
    #[serde(default = "ffn")]
    pub encoder_ffn_dim: usize,
    #[serde(default = "ffn")]
    pub decoder_ffn_dim: usize,
    #[serde(default = "mels")]
    pub num_mel_bins: usize,
    #[serde(default = "source_positions")]
    pub max_source_positions: usize,
    #[serde(default = "target_positions")]
    pub max_target_positions: usize,
    #[serde(default = "vocab")]
    pub vocab_size: usize,
    #[serde(default = "start_token")]
    pub decoder_start_token_id: u32,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    /// Read for completeness: transformers' Whisper computes `embed_scale`
    /// but never applies it, so neither do we.
    #[serde(default)]
    pub scale_embedding: bool,
    #[serde(default = "gelu")]
    pub activation_function: String,
}

fn d_model() -> usize {
    384
}
fn layers() -> usize {
    4
}
fn heads() -> usize {
    6
}
fn ffn() -> usize {
    1536
}
fn mels() -> usize {
    80
}
fn source_positions() -> usize {
    1500
}
fn target_positions() -> usize {
    448
}
fn vocab() -> usize {
    51865
}
fn start_token() -> u32 {
    50257
}
fn gelu() -> String {
    "gelu".into()
}

/// Whether a parsed `config.json` is a Whisper checkpoint.
pub fn matches(raw: &Value) -> bool {
    let arch = raw
        .get("architectures")
        .and_then(|a| a.as_array())
        .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(ARCHITECTURE)));
    arch || raw.get("model_type").and_then(|m| m.as_str()) == Some("whisper")
}

impl WhisperConfig {
    pub fn from_json(raw: &Value) -> MResult<Self> {
        let cfg: Self = serde_json::from_value(raw.clone())
            .map_err(|e| ModelError::Config(format!("Whisper config.json: {e}")))?;
        if cfg.activation_function != "gelu" {
            return Err(ModelError::Config(format!(
                "Whisper activation {:?} is not supported (gelu)",
                cfg.activation_function
            )));
        }
        if cfg.decoder_attention_heads == 0
            || !cfg.d_model.is_multiple_of(cfg.decoder_attention_heads)
        {
            return Err(ModelError::Config(format!(
                "Whisper d_model {} is not divisible by {} decoder heads",
                cfg.d_model, cfg.decoder_attention_heads
            )));
        }
        if cfg.max_target_positions < 4 || cfg.vocab_size == 0 {
            return Err(ModelError::Config(
                "Whisper max_target_positions / vocab_size are too small".into(),
            ));
        }
        Ok(cfg)
    }

    /// The encoder half, as [`AudioEncoder`] takes it.
    pub fn encoder_config(&self) -> AudioEncoderConfig {
        AudioEncoderConfig {
            d_model: self.d_model,
            num_layers: self.encoder_layers,
            num_heads: self.encoder_attention_heads,
            ffn_dim: self.encoder_ffn_dim,
            num_mel_bins: self.num_mel_bins,
            max_source_positions: self.max_source_positions,
            // See `scale_embedding` above: the reference ignores it.
            scale_embedding: false,
            activation_function: self.activation_function.clone(),
        }
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
}

impl Attention {
    fn load(w: &WeightsAt, d: usize) -> MResult<Self> {
        Ok(Self {
            q: w.linear("q_proj", d, d, true)?,
            // Whisper's k_proj has no bias.
            k: w.linear("k_proj", d, d, false)?,
            v: w.linear("v_proj", d, d, true)?,
            o: w.linear("out_proj", d, d, true)?,
        })
    }
}

struct DecoderLayer {
    self_norm: LayerNorm,
    self_attn: Attention,
    cross_norm: LayerNorm,
    cross_attn: Attention,
    ffn_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

/// Cross-attention keys and values of one audio item, per decoder layer,
/// each `[heads, source_positions, head_dim]`.
pub struct CrossKv {
    layers: Vec<(Tensor, Tensor)>,
}

/// One sequence's decoder cache: its self-attention K/V so far (per layer,
/// `[heads, len, head_dim]`) and its audio's cross-attention K/V.
pub struct DecoderState {
    cross: Arc<CrossKv>,
    self_kv: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl DecoderState {
    /// Tokens fed so far (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The same audio with nothing fed yet.
    pub fn restart(&self) -> DecoderState {
        DecoderState {
            cross: self.cross.clone(),
            self_kv: vec![None; self.self_kv.len()],
            len: 0,
        }
    }
}

pub struct Whisper {
    cfg: WhisperConfig,
    encoder: AudioEncoder,
    embed: Tensor,
    positions: Tensor,
    layers: Vec<DecoderLayer>,
    norm: LayerNorm,
    proj_out: Linear,
    device: Device,
}

impl Whisper {
    /// Load `model.encoder.*`, `model.decoder.*` and `proj_out` (tied to
    /// `model.decoder.embed_tokens` when the checkpoint leaves it out).
    pub fn load(cfg: WhisperConfig, w: &Weights) -> MResult<Self> {
        let d = cfg.d_model;
        let encoder = AudioEncoder::load(cfg.encoder_config(), w, "model.encoder", false)?;
        let layers_w = w.pp("model.decoder.layers");
        let layers = (0..cfg.decoder_layers)
            .map(|i| {
                let l = layers_w.pp(i);
                Ok(DecoderLayer {
                    self_norm: l.layer_norm("self_attn_layer_norm", d, LN_EPS)?,
                    self_attn: Attention::load(&l.pp("self_attn"), d)?,
                    cross_norm: l.layer_norm("encoder_attn_layer_norm", d, LN_EPS)?,
                    cross_attn: Attention::load(&l.pp("encoder_attn"), d)?,
                    ffn_norm: l.layer_norm("final_layer_norm", d, LN_EPS)?,
                    fc1: l.linear("fc1", d, cfg.decoder_ffn_dim, true)?,
                    fc2: l.linear("fc2", cfg.decoder_ffn_dim, d, true)?,
                })
            })
            .collect::<MResult<Vec<_>>>()?;
        let embed = w.tensor("model.decoder.embed_tokens.weight", &[cfg.vocab_size, d])?;
        let proj_out = if w.contains("proj_out.weight") {
            w.linear("proj_out", d, cfg.vocab_size, false)?.for_logits()
        } else {
            Linear::Dense {
                weight: embed.clone(),
                bias: None,
            }
        };
        Ok(Self {
            positions: w.tensor(
                "model.decoder.embed_positions.weight",
                &[cfg.max_target_positions, d],
            )?,
            norm: w.layer_norm("model.decoder.layer_norm", d, LN_EPS)?,
            device: w.device().clone(),
            embed,
            proj_out,
            layers,
            encoder,
            cfg,
        })
    }

    pub fn config(&self) -> &WhisperConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Encoder output `[max_source_positions, d_model]` of one padded window
    /// of log-mel features (`[num_mel_bins, 2 * max_source_positions]`).
    pub fn encode(&self, features: &Tensor) -> Result<Tensor> {
        self.encoder
            .forward_unmasked(&features.to_device(&self.device)?)
    }

    /// Cross-attention K/V of an encoder output, for every decoder layer.
    pub fn cross_kv(&self, encoded: &Tensor) -> Result<Arc<CrossKv>> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let k = self.split_heads(&l.cross_attn.k.forward(encoded)?)?;
                let v = self.split_heads(&l.cross_attn.v.forward(encoded)?)?;
                Ok((k, v))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Arc::new(CrossKv { layers }))
    }

    /// A fresh decoder cache over one item's cross K/V.
    pub fn new_state(&self, cross: Arc<CrossKv>) -> DecoderState {
        DecoderState {
            cross,
            self_kv: vec![None; self.layers.len()],
            len: 0,
        }
    }

    /// `[n, d]` -> `[heads, n, head_dim]`.
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (n, d) = x.dims2()?;
        let heads = self.cfg.decoder_attention_heads;
        x.reshape((n, heads, d / heads))?
            .transpose(0, 1)?
            .contiguous()
    }

    /// Feed `tokens[i]` to `states[i]` (one ragged batch) and return f32
    /// logits: `[states.len(), vocab]` for each sequence's last new token
    /// with `last_only`, else `[sum of new tokens, vocab]`, in order.
    pub fn decode(
        &self,
        states: &mut [&mut DecoderState],
        tokens: &[&[u32]],
        last_only: bool,
    ) -> Result<Tensor> {
        if states.len() != tokens.len() || states.is_empty() {
            candle_core::bail!(
                "decode: {} states for {} token lists",
                states.len(),
                tokens.len()
            );
        }
        let max = self.cfg.max_target_positions;
        let mut ids = Vec::new();
        let mut pos = Vec::new();
        let mut spans = Vec::with_capacity(states.len());
        for (s, t) in states.iter().zip(tokens) {
            if t.is_empty() || s.len + t.len() > max {
                candle_core::bail!(
                    "decode: {} tokens after {} exceed the {max} decoder positions (or none given)",
                    t.len(),
                    s.len
                );
            }
            if let Some(bad) = t.iter().find(|&&x| x as usize >= self.cfg.vocab_size) {
                candle_core::bail!(
                    "decode: token id {bad} is outside the vocabulary ({})",
                    self.cfg.vocab_size
                );
            }
            spans.push((ids.len(), t.len()));
            ids.extend_from_slice(t);
            pos.extend((s.len..s.len + t.len()).map(|p| p as u32));
        }
        let n = ids.len();
        let ids_t = Tensor::from_vec(ids, n, &self.device)?;
        let pos_t = Tensor::from_vec(pos, n, &self.device)?;
        let mut x =
            (self.embed.index_select(&ids_t, 0)? + self.positions.index_select(&pos_t, 0)?)?;
        let heads = self.cfg.decoder_attention_heads;
        let hd = self.cfg.d_model / heads;
        let scale = (hd as f64).powf(-0.5);
        let rows = DecodeRows::of_step(spans.iter().map(|&(_, len)| len));
        for (li, layer) in self.layers.iter().enumerate() {
            // Causal self-attention, each sequence against its own cache.
            let h = layer.self_norm.forward(&x)?;
            let q = layer.self_attn.q.forward_rows(&h, &rows)?;
            let k = layer.self_attn.k.forward_rows(&h, &rows)?;
            let v = layer.self_attn.v.forward_rows(&h, &rows)?;
            let mut outs = Vec::with_capacity(spans.len());
            for (si, &(off, len)) in spans.iter().enumerate() {
                let qs = self.split_heads(&q.narrow(0, off, len)?)?;
                let mut ks = self.split_heads(&k.narrow(0, off, len)?)?;
                let mut vs = self.split_heads(&v.narrow(0, off, len)?)?;
                if let Some((pk, pv)) = &states[si].self_kv[li] {
                    ks = Tensor::cat(&[pk, &ks], 1)?;
                    vs = Tensor::cat(&[pv, &vs], 1)?;
                }
                outs.push(attention(&qs, &ks, &vs, scale, Keys::Causal)?);
                states[si].self_kv[li] = Some((ks, vs));
            }
            x = (x + layer
                .self_attn
                .o
                .forward_rows(&Tensor::cat(&outs, 0)?, &rows)?)?;

            // Cross-attention over the item's encoder output (no mask).
            let h = layer.cross_norm.forward(&x)?;
            let q = layer.cross_attn.q.forward_rows(&h, &rows)?;
            let mut outs = Vec::with_capacity(spans.len());
            for (si, &(off, len)) in spans.iter().enumerate() {
                let qs = self.split_heads(&q.narrow(0, off, len)?)?;
                let (ck, cv) = &states[si].cross.layers[li];
                outs.push(attention(&qs, ck, cv, scale, Keys::All)?);
            }
            x = (x + layer
                .cross_attn
                .o
                .forward_rows(&Tensor::cat(&outs, 0)?, &rows)?)?;

            let h = layer.ffn_norm.forward(&x)?;
            let up = layer.fc1.forward_rows(&h, &rows)?.gelu_erf()?;
            x = (x + layer.fc2.forward_rows(&up, &rows)?)?;
        }
        for (s, &(_, len)) in states.iter_mut().zip(&spans) {
            s.len += len;
        }
        if last_only {
            let rows: Vec<u32> = spans
                .iter()
                .map(|&(off, len)| (off + len - 1) as u32)
                .collect();
            let r = rows.len();
            x = x.index_select(&Tensor::from_vec(rows, r, &self.device)?, 0)?;
        }
        self.proj_out
            .forward(&self.norm.forward(&x)?)?
            .to_dtype(DType::F32)
    }
}
