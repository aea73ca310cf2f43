//! Building blocks shared by the llama-family decoders (llama, qwen2,
//! qwen3, gemma3) and the decoder itself, parameterised by [`DecoderConfig`].
//!
//! The whole ragged batch runs as one `[num_tokens, hidden]` matrix; only
//! attention looks at sequence boundaries, through the paged KV cache.
//! Sliding-window layers ([`SlidingWindow`]) attend over the last `size`
//! keys of their sequence in every step (prefill, chunk, decode).

use std::sync::Arc;

use candela_core::model::{
    DeviceMemory, DeviceSampleRow, ForwardBatch, MmEmbedSpan, Model, ModelSpec,
};
use candle_core::{bail, DType, Device, Result, Tensor};

use crate::error::ModelError;

type MResult<T> = std::result::Result<T, ModelError>;
use crate::nn::activation::Activation;
use crate::paged_attention::{
    alloc_kv_pool, paged_attention, write_kv, AttentionMetadata, AttnParams,
};
use crate::rope::{RopeConfig, RopeRows, RotaryEmbedding};
use crate::weights::{DecodeRows, Embedding, Linear, MultiLinear, Weights, WeightsAt};

/// Everything that distinguishes one llama-family checkpoint from another.
#[derive(Debug, Clone)]
pub struct DecoderConfig {
    /// Reported as `ModelSpec::architecture`.
    pub architecture: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    /// `rope.max_positions` is the longest sequence accepted.
    pub rope: RopeConfig,
    /// Bias on q/k/v projections (qwen2; llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (llama with `attention_bias`).
    pub o_bias: bool,
    /// Bias on the MLP projections (llama with `mlp_bias`).
    pub mlp_bias: bool,
    /// Per-head RMSNorm of q and k before rope (qwen3).
    pub qk_norm: bool,
    /// Use the embedding matrix as the output projection.
    pub tie_word_embeddings: bool,
    /// M-RoPE (Qwen2-VL): rotary frequencies per (temporal, height, width)
    /// axis, summing to `head_dim / 2`; used when a batch carries 3-D positions.
    pub mrope_section: Option<[usize; 3]>,
    /// Every RMSNorm scales by `1 + weight` (Gemma) instead of `weight`.
    pub norm_unit_offset: bool,
    /// Token embeddings are multiplied by this, in the model dtype (Gemma:
    /// `sqrt(hidden_size)`). Media embeddings spliced in are not.
    pub embed_scale: Option<f64>,
    /// Gemma 2/3 layers: the attention output is normalised by
    /// `post_attention_layernorm` before the residual add, and the MLP sits
    /// between `pre_feedforward_layernorm` and `post_feedforward_layernorm`.
    /// Otherwise `post_attention_layernorm` is the MLP's input norm.
    pub sandwich_norms: bool,
    /// Activation of the MLP's gate: SiLU (llama, qwen), GELU-tanh (gemma).
    pub mlp_act: Activation,
    /// Attention score scale, `1 / sqrt(head_dim)` when None (Gemma:
    /// `query_pre_attn_scalar^-0.5`).
    pub attn_scale: Option<f32>,
    /// Tanh softcapping of attention scores (`attn_logit_softcapping`).
    pub attn_softcap: Option<f32>,
    /// Tanh softcapping of the output logits (`final_logit_softcapping`).
    pub final_softcap: Option<f32>,
    /// Sliding-window attention in some or all layers.
    pub sliding_window: Option<SlidingWindow>,
    /// The tokens of one media item's embedding span attend to each other
    /// both ways during prefill (Gemma 3's images, transformers'
    /// `token_type_ids` mask); otherwise attention is causal throughout.
    pub bidirectional_media: bool,
}

/// Which layers attend over a window of recent keys, and how.
#[derive(Debug, Clone)]
pub struct SlidingWindow {
    /// Keys a token sees: itself and the `size - 1` before it
    /// (transformers' `sliding_window`).
    pub size: usize,
    /// One entry per layer: true for a sliding-window layer.
    pub layers: Vec<bool>,
    /// The rotary embedding of the sliding layers when it differs from the
    /// other layers' (Gemma 3: theta 10,000 locally, 1,000,000 globally).
    pub rope: Option<RopeConfig>,
}

impl DecoderConfig {
    pub fn max_model_len(&self) -> usize {
        self.rope.max_positions
    }

    /// Whether layer `i` is a sliding-window layer.
    pub fn is_sliding(&self, i: usize) -> bool {
        self.sliding_window
            .as_ref()
            .is_some_and(|s| s.layers.get(i).copied().unwrap_or(false))
    }

    /// Attention parameters of layer `i`.
    pub fn attn_params(&self, i: usize) -> AttnParams {
        AttnParams {
            scale: self
                .attn_scale
                .unwrap_or(1.0 / (self.head_dim as f32).sqrt()),
            window: self
                .sliding_window
                .as_ref()
                .filter(|_| self.is_sliding(i))
                .map(|s| s.size),
            softcap: self.attn_softcap,
        }
    }

    /// An RMSNorm of this model's kind (eps, unit offset).
    fn norm(&self, w: &WeightsAt, dim: usize) -> MResult<RmsNorm> {
        if self.norm_unit_offset {
            RmsNorm::load_unit_offset(w, dim, self.rms_norm_eps)
        } else {
            RmsNorm::load(w, dim, self.rms_norm_eps)
        }
    }

    /// Checks the fields that must agree with each other.
    pub fn validate(&self) -> MResult<()> {
        if let Some(s) = &self.sliding_window {
            if s.size == 0 {
                return Err(ModelError::Config("sliding_window must be positive".into()));
            }
            if s.layers.len() != self.num_layers {
                return Err(ModelError::Config(format!(
                    "{} sliding-window layer flags for {} layers",
                    s.layers.len(),
                    self.num_layers
                )));
            }
        }
        for (what, v) in [
            ("attn_logit_softcapping", self.attn_softcap),
            ("final_logit_softcapping", self.final_softcap),
        ] {
            if v.is_some_and(|c| c.is_nan() || c <= 0.0) {
                return Err(ModelError::Config(format!("{what} must be positive")));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn load(w: &WeightsAt, dim: usize, eps: f64) -> MResult<Self> {
        Ok(Self {
            weight: w.tensor("weight", &[dim])?,
            eps: eps as f32,
        })
    }

    /// Gemma's RMSNorm, which scales by `1 + weight` (the 1 added in f32,
    /// as transformers does, then stored in the model dtype).
    pub fn load_unit_offset(w: &WeightsAt, dim: usize, eps: f64) -> MResult<Self> {
        let weight = w.tensor("weight", &[dim])?;
        let dtype = weight.dtype();
        Ok(Self {
            weight: (weight.to_dtype(DType::F32)? + 1.0)?.to_dtype(dtype)?,
            eps: eps as f32,
        })
    }

    /// Normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
    }
}

/// Gated MLP: `down(act(gate(x)) * up(x))` (SwiGLU with SiLU, GeGLU with GELU).
#[derive(Debug, Clone)]
pub struct Mlp {
    /// gate and up, stacked when possible.
    gate_up: MultiLinear,
    down: Linear,
    act: Activation,
}

impl Mlp {
    pub fn load(w: &WeightsAt, cfg: &DecoderConfig) -> MResult<Self> {
        let (h, i, b) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_up: w.stacked_linear(&[("gate_proj", i), ("up_proj", i)], h, b)?,
            down: w.linear("down_proj", i, h, b)?,
            act: cfg.mlp_act,
        })
    }

    pub fn forward(&self, x: &Tensor, rows: &DecodeRows) -> Result<Tensor> {
        let gu = self.gate_up.forward_rows(x, rows)?;
        let (g, u) = match gu.as_slice() {
            [g, u] => (g, u),
            _ => bail!("mlp: expected gate and up outputs"),
        };
        self.down.forward_rows(&(self.act.forward(g)? * u)?, rows)
    }
}

/// What every layer's attention needs from the batch, computed once per forward.
pub struct StepContext {
    pub meta: Arc<AttentionMetadata>,
    pub slots: Tensor,
    pub rope_rows: RopeRows,
    /// The sliding layers' rows, when they have their own rotary embedding.
    pub local_rope_rows: Option<RopeRows>,
    /// The decode rows (the others are prompt rows: [`DecodeRows`]).
    pub decode_rows: DecodeRows,
}

#[derive(Debug, Clone)]
pub struct Attention {
    /// q, k and v, stacked when possible.
    qkv: MultiLinear,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    params: AttnParams,
}

impl Attention {
    /// The attention of layer `layer`.
    pub fn load(w: &WeightsAt, cfg: &DecoderConfig, layer: usize) -> MResult<Self> {
        let (h, nh, nkv, hd) = (
            cfg.hidden_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        );
        let (q_norm, k_norm) = if cfg.qk_norm {
            (
                Some(cfg.norm(&w.pp("q_norm"), hd)?),
                Some(cfg.norm(&w.pp("k_norm"), hd)?),
            )
        } else {
            (None, None)
        };
        let parts = [
            ("q_proj", nh * hd),
            ("k_proj", nkv * hd),
            ("v_proj", nkv * hd),
        ];
        Ok(Self {
            qkv: w.stacked_linear(&parts, h, cfg.qkv_bias)?,
            o_proj: w.linear("o_proj", nh * hd, h, cfg.o_bias)?,
            q_norm,
            k_norm,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            params: cfg.attn_params(layer),
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        (rope, rope_rows): (&RotaryEmbedding, &RopeRows),
        ctx: &StepContext,
        k_cache: &Tensor,
        v_cache: &Tensor,
    ) -> Result<Tensor> {
        let t = x.dim(0)?;
        let qkv = self.qkv.forward_rows(x, &ctx.decode_rows)?;
        let [q, k, v] = qkv.as_slice() else {
            bail!("attention: expected q, k and v outputs");
        };
        let q = q.reshape((t, self.num_heads, self.head_dim))?;
        let k = k.reshape((t, self.num_kv_heads, self.head_dim))?;
        let v = v.reshape((t, self.num_kv_heads, self.head_dim))?;
        let q = match &self.q_norm {
            Some(n) => n.forward(&q)?,
            None => q,
        };
        let k = match &self.k_norm {
            Some(n) => n.forward(&k)?,
            None => k,
        };
        let q = rope.apply(&q, rope_rows)?;
        let k = rope.apply(&k, rope_rows)?;
        write_kv(k_cache, v_cache, &k, &v, &ctx.slots)?;
        let o = paged_attention(&q, k_cache, v_cache, &ctx.meta, self.params)?;
        self.o_proj.forward_rows(
            &o.reshape((t, self.num_heads * self.head_dim))?,
            &ctx.decode_rows,
        )
    }
}

#[derive(Debug, Clone)]
pub struct DecoderLayer {
    input_norm: RmsNorm,
    attn: Attention,
    /// The MLP's input norm, or with sandwich norms the attention output's.
    post_attn_norm: RmsNorm,
    /// Sandwich norms: `pre_feedforward_layernorm`, `post_feedforward_layernorm`.
    ffn_norms: Option<(RmsNorm, RmsNorm)>,
    mlp: Mlp,
    /// Uses the sliding layers' rotary embedding.
    sliding: bool,
}

impl DecoderLayer {
    /// Layer `i`, from `w` at its prefix (`model.layers.{i}`).
    pub fn load(w: &WeightsAt, i: usize, cfg: &DecoderConfig) -> MResult<Self> {
        let h = cfg.hidden_size;
        let ffn_norms = if cfg.sandwich_norms {
            Some((
                cfg.norm(&w.pp("pre_feedforward_layernorm"), h)?,
                cfg.norm(&w.pp("post_feedforward_layernorm"), h)?,
            ))
        } else {
            None
        };
        Ok(Self {
            input_norm: cfg.norm(&w.pp("input_layernorm"), h)?,
            attn: Attention::load(&w.pp("self_attn"), cfg, i)?,
            post_attn_norm: cfg.norm(&w.pp("post_attention_layernorm"), h)?,
            ffn_norms,
            mlp: Mlp::load(&w.pp("mlp"), cfg)?,
            sliding: cfg.is_sliding(i),
        })
    }

    pub fn forward(
        &self,
        x: &Tensor,
        rope: (&RotaryEmbedding, &RopeRows),
        ctx: &StepContext,
        k_cache: &Tensor,
        v_cache: &Tensor,
    ) -> Result<Tensor> {
        let h = self
            .attn
            .forward(&self.input_norm.forward(x)?, rope, ctx, k_cache, v_cache)?;
        match &self.ffn_norms {
            None => {
                let x = (x + h)?;
                let h = self
                    .mlp
                    .forward(&self.post_attn_norm.forward(&x)?, &ctx.decode_rows)?;
                x + h
            }
            Some((pre, post)) => {
                let x = (x + self.post_attn_norm.forward(&h)?)?;
                let h = post.forward(&self.mlp.forward(&pre.forward(&x)?, &ctx.decode_rows)?)?;
                x + h
            }
        }
    }
}

/// One layer's KV pool.
#[derive(Debug, Clone)]
pub struct KvPool {
    pub k: Tensor,
    pub v: Tensor,
}

/// A llama-family causal LM over a paged KV cache.
pub struct DecoderLm {
    cfg: DecoderConfig,
    spec: ModelSpec,
    embed: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: RotaryEmbedding,
    /// The sliding layers' own rotary embedding, if any.
    local_rope: Option<RotaryEmbedding>,
    kv: Vec<KvPool>,
    /// `(num_blocks, block_size)` once the pool is allocated.
    pool_shape: Option<(usize, usize)>,
    device: Device,
    dtype: DType,
}

impl std::fmt::Debug for DecoderLm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecoderLm")
            .field("spec", &self.spec)
            .field("dtype", &self.dtype)
            .field("pool_shape", &self.pool_shape)
            .finish()
    }
}

impl DecoderLm {
    /// Build the model from Hugging Face-named weights.
    pub fn load(cfg: DecoderConfig, w: &Weights) -> MResult<Self> {
        cfg.validate()?;
        let lm_w = w.for_language_model();
        let w = lm_w.as_ref().unwrap_or(w);
        let dtype = w.dtype();
        let device = w.device().clone();
        let head_w = w.for_output_head();
        let head_w = head_w.as_ref().unwrap_or(w);
        let tie = cfg.tie_word_embeddings || !w.contains("lm_head.weight");
        let embed = (if tie { head_w } else { w }).embedding(
            "model.embed_tokens.weight",
            cfg.vocab_size,
            cfg.hidden_size,
        )?;
        let layers_w = w.pp("model.layers");
        let layers = (0..cfg.num_layers)
            .map(|i| DecoderLayer::load(&layers_w.pp(i), i, &cfg))
            .collect::<MResult<Vec<_>>>()?;
        let norm = cfg.norm(&w.pp("model.norm"), cfg.hidden_size)?;
        let lm_head = if tie {
            embed.as_linear()
        } else {
            head_w.linear("lm_head", cfg.hidden_size, cfg.vocab_size, false)?
        }
        .for_logits();
        let rope = RotaryEmbedding::new(&cfg.rope, dtype, &device)?;
        let local_rope = match cfg.sliding_window.as_ref().and_then(|s| s.rope.as_ref()) {
            Some(r) => Some(RotaryEmbedding::new(r, dtype, &device)?),
            None => None,
        };
        let spec = ModelSpec {
            architecture: cfg.architecture.clone(),
            num_layers: cfg.num_layers,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            vocab_size: cfg.vocab_size,
            hidden_size: cfg.hidden_size,
            max_model_len: cfg.max_model_len(),
            kv_dtype: dtype,
        };
        Ok(Self {
            cfg,
            spec,
            embed,
            layers,
            norm,
            lm_head,
            rope,
            local_rope,
            kv: Vec::new(),
            pool_shape: None,
            device,
            dtype,
        })
    }

    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn check_batch(&self, batch: &ForwardBatch) -> Result<()> {
        let Some((_, block_size)) = self.pool_shape else {
            bail!("forward called before allocate_kv_cache");
        };
        if batch.block_size != block_size {
            bail!(
                "batch block_size {} differs from the allocated pool's {block_size}",
                batch.block_size
            );
        }
        let n = batch.num_tokens();
        if batch.positions.len() != n || batch.slot_mapping.len() != n {
            bail!(
                "batch has {n} input ids, {} positions and {} slots",
                batch.positions.len(),
                batch.slot_mapping.len()
            );
        }
        if let Some(&id) = batch
            .input_ids
            .iter()
            .find(|&&id| id as usize >= self.cfg.vocab_size)
        {
            bail!(
                "token id {id} out of range (vocab size {})",
                self.cfg.vocab_size
            );
        }
        let max_pos = self.rope.max_positions();
        if let Some(&p) = batch.positions.iter().find(|&&p| p as usize >= max_pos) {
            bail!("position {p} beyond the model's maximum length {max_pos}");
        }
        for (i, s) in batch.seqs.iter().enumerate() {
            if s.needs_logits && s.query_len == 0 {
                bail!("sequence {i} asks for logits but has no new tokens");
            }
            if s.context_len > max_pos {
                bail!(
                    "sequence {i} context {} beyond the model's maximum length {max_pos}",
                    s.context_len
                );
            }
        }
        Ok(())
    }
}

impl Model for DecoderLm {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn bidirectional_media(&self) -> bool {
        self.cfg.bidirectional_media
    }

    fn layer_windows(&self) -> Vec<Option<usize>> {
        (0..self.cfg.num_layers)
            .map(|i| self.cfg.attn_params(i).window)
            .collect()
    }

    fn allocate_kv_cache(&mut self, num_blocks: usize, block_size: usize) -> Result<()> {
        if block_size == 0 {
            bail!("block_size must be positive");
        }
        // Drop any previous pool before allocating the new one.
        self.kv.clear();
        self.pool_shape = None;
        let (nkv, hd) = (self.cfg.num_kv_heads, self.cfg.head_dim);
        for _ in 0..self.cfg.num_layers {
            self.kv.push(KvPool {
                k: alloc_kv_pool(num_blocks, block_size, nkv, hd, self.dtype, &self.device)?,
                v: alloc_kv_pool(num_blocks, block_size, nkv, hd, self.dtype, &self.device)?,
            });
        }
        self.pool_shape = Some((num_blocks, block_size));
        Ok(())
    }

    fn forward(&mut self, batch: &ForwardBatch) -> Result<Tensor> {
        // Run the whole step inside the rayon pool: the engine thread is not
        // a pool worker, and handing each of the ~200 parallel ops of a step
        // to the pool separately costs a wake-up and a context switch each.
        // `rayon::scope` called from outside the pool runs its body on a worker.
        rayon::scope(|_| self.run(batch, LogitRows::LastOfSeqs))
    }

    fn device_memory(
        &self,
        max_num_batched_tokens: usize,
        max_num_seqs: usize,
    ) -> Option<DeviceMemory> {
        let act = crate::gpu::decoder_activation_bytes(
            &self.cfg,
            self.dtype,
            max_num_batched_tokens,
            max_num_seqs,
        );
        crate::gpu::device_memory(&self.device, act)
    }

    fn sample_on_device(
        &mut self,
        logits: &Tensor,
        rows: &[DeviceSampleRow],
    ) -> Option<Result<Vec<u32>>> {
        crate::gpu::sample_on_device(logits, rows)
    }
}

/// Which hidden rows go through the LM head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LogitRows {
    /// The last new token of each sequence with `needs_logits` (the engine's contract).
    LastOfSeqs,
    /// Every new token of the batch (prompt logprobs, parity checks).
    All,
}

impl DecoderLm {
    /// Like [`Model::forward`], but returns f32 logits for every token of
    /// the batch, `[num_tokens, vocab_size]` in batch order.
    pub fn forward_all_logits(&mut self, batch: &ForwardBatch) -> Result<Tensor> {
        self.run(batch, LogitRows::All)
    }

    fn run(&mut self, batch: &ForwardBatch, which: LogitRows) -> Result<Tensor> {
        self.check_batch(batch)?;
        let n = batch.num_tokens();
        let rows: Vec<u32> = match which {
            LogitRows::All => (0..n as u32).collect(),
            LogitRows::LastOfSeqs => batch
                .seqs
                .iter()
                .filter(|s| s.needs_logits)
                .map(|s| (s.query_start + s.query_len - 1) as u32)
                .collect(),
        };
        if n == 0 {
            return Tensor::zeros((rows.len(), self.cfg.vocab_size), DType::F32, &self.device);
        }
        let meta = Arc::new(AttentionMetadata::from_batch(
            batch,
            self.cfg.bidirectional_media,
        )?);
        let dev = &self.device;
        let positions = Tensor::from_slice(&batch.positions, n, dev)?;
        // 3-D positions only matter to an M-RoPE model; text-only batches
        // keep the 1-D table lookup.
        let rope_rows = match (&batch.mrope_positions, self.cfg.mrope_section) {
            (Some(p), Some(section)) => {
                if p.len() != n {
                    bail!("batch has {n} input ids but {} M-RoPE positions", p.len());
                }
                self.rope.mrope_rows(p, section, dev)?
            }
            _ => self.rope.rows(&positions)?,
        };
        let local_rope_rows = match &self.local_rope {
            Some(r) => Some(r.rows(&positions)?),
            None => None,
        };
        let ctx = StepContext {
            meta,
            slots: Tensor::from_slice(&batch.slot_mapping, n, dev)?,
            rope_rows,
            local_rope_rows,
            decode_rows: DecodeRows::of_step(batch.seqs.iter().map(|s| s.query_len)),
        };
        // Which of the logits' rows decode one token: the head multiplies
        // them as decode rows (`Role::Logits`).
        let head_rows = match which {
            LogitRows::All => ctx.decode_rows.clone(),
            LogitRows::LastOfSeqs => DecodeRows::of_flags(
                batch
                    .seqs
                    .iter()
                    .filter(|s| s.needs_logits)
                    .map(|s| s.query_len == 1),
            ),
        };
        let mut x = self.embed.forward(&batch.input_ids, dev)?;
        if let Some(s) = self.cfg.embed_scale {
            x = (x * s)?;
        }
        let mut x = splice_embeds(x, &batch.mm_embeds)?;
        for (layer, pool) in self.layers.iter().zip(&self.kv) {
            let rope = match (&self.local_rope, &ctx.local_rope_rows) {
                (Some(r), Some(rows)) if layer.sliding => (r, rows),
                _ => (&self.rope, &ctx.rope_rows),
            };
            x = layer.forward(&x, rope, &ctx, &pool.k, &pool.v)?;
        }
        if rows.is_empty() {
            return Tensor::zeros((0, self.cfg.vocab_size), DType::F32, dev);
        }
        let x = if which == LogitRows::All {
            x
        } else {
            let nrows = rows.len();
            x.index_select(&Tensor::from_vec(rows, nrows, dev)?, 0)?
        };
        let x = self.norm.forward(&x)?;
        let logits = self
            .lm_head
            .forward_rows(&x, &head_rows)?
            .to_dtype(DType::F32)?;
        match self.cfg.final_softcap {
            Some(c) => (logits / c as f64)?.tanh()? * c as f64,
            None => Ok(logits),
        }
    }
}

/// Replace the token embeddings of media placeholders by the media's
/// embeddings (`spans` sorted by start, non-overlapping).
pub fn splice_embeds(x: Tensor, spans: &[MmEmbedSpan]) -> Result<Tensor> {
    if spans.is_empty() {
        return Ok(x);
    }
    let n = x.dim(0)?;
    let mut parts = Vec::with_capacity(2 * spans.len() + 1);
    let mut at = 0;
    for s in spans {
        let len = s.embeds.dim(0)?;
        if s.start < at || s.start + len > n {
            bail!(
                "media embeddings for tokens {}..{} do not fit a batch of {n} tokens",
                s.start,
                s.start + len
            );
        }
        if s.start > at {
            parts.push(x.narrow(0, at, s.start - at)?);
        }
        parts.push(s.embeds.to_dtype(x.dtype())?.to_device(x.device())?);
        at = s.start + len;
    }
    if at < n {
        parts.push(x.narrow(0, at, n - at)?);
    }
    Tensor::cat(&parts, 0)
}

/// Resolve the served length: the user's request, capped by what the
/// checkpoint supports.
pub fn resolve_max_len(requested: Option<usize>, model_max: usize) -> MResult<usize> {
    match requested {
        None => Ok(model_max),
        Some(0) => Err(ModelError::Config("max_model_len must be positive".into())),
        Some(m) if m > model_max => Err(ModelError::Config(format!(
            "max_model_len {m} is larger than the model's maximum of {model_max} positions"
        ))),
        Some(m) => Ok(m),
    }
}

/// A Hugging Face `rope_scaling` (or `rope_parameters`) block as candela's
/// [`RopeScaling`](crate::rope::RopeScaling): none, linear or llama3.
pub fn hf_rope_scaling(
    s: Option<&crate::config::RopeScaling>,
) -> MResult<crate::rope::RopeScaling> {
    use crate::rope::RopeScaling;
    let scaling = match s.filter(|s| !matches!(s.rope_type.as_deref(), None | Some("default"))) {
        None => RopeScaling::None,
        Some(s) => {
            let kind = s.rope_type.as_deref().unwrap_or("default");
            let factor = s.factor.map(|f| f as f32);
            match kind {
                "linear" => RopeScaling::Linear {
                    factor: factor.ok_or_else(|| {
                        ModelError::Config("linear rope_scaling needs factor".into())
                    })?,
                },
                "llama3" => RopeScaling::Llama3 {
                    factor: factor.ok_or_else(|| {
                        ModelError::Config("llama3 rope_scaling needs factor".into())
                    })?,
                    low_freq_factor: s.low_freq_factor.unwrap_or(1.0) as f32,
                    high_freq_factor: s.high_freq_factor.unwrap_or(4.0) as f32,
                    original_max_position_embeddings: s
                        .original_max_position_embeddings
                        .unwrap_or(8192),
                },
                other => {
                    return Err(ModelError::Config(format!(
                    "unsupported rope_scaling type {other:?} (supported: default, linear, llama3)"
                )))
                }
            }
        }
    };
    if let RopeScaling::Llama3 {
        low_freq_factor,
        high_freq_factor,
        ..
    } = &scaling
    {
        if high_freq_factor <= low_freq_factor {
            return Err(ModelError::Config(
                "llama3 rope_scaling needs high_freq_factor > low_freq_factor".into(),
            ));
        }
    }
    Ok(scaling)
}

/// The llama-family hyperparameters of a Hugging Face config; the
/// architecture files adjust biases, norms and rope from here.
pub fn hf_base_config(
    cfg: &crate::config::HfConfig,
    architecture: &str,
    max_model_len: Option<usize>,
) -> MResult<DecoderConfig> {
    use crate::rope::RopeStyle;
    let scaling = hf_rope_scaling(cfg.rope_scaling())?;
    let max_len = resolve_max_len(max_model_len, cfg.max_position_embeddings)?;
    Ok(DecoderConfig {
        architecture: architecture.to_string(),
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        num_layers: cfg.num_hidden_layers,
        num_heads: cfg.num_attention_heads,
        num_kv_heads: cfg.num_kv_heads(),
        head_dim: cfg.head_dim(),
        vocab_size: cfg.vocab_size,
        rms_norm_eps: cfg.rms_norm_eps,
        rope: RopeConfig {
            theta: cfg.rope_theta() as f32,
            head_dim: cfg.head_dim(),
            max_positions: max_len,
            scaling,
            style: RopeStyle::Neox,
        },
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        qk_norm: false,
        tie_word_embeddings: cfg.tie_word_embeddings.unwrap_or(false),
        mrope_section: None,
        norm_unit_offset: false,
        embed_scale: None,
        sandwich_norms: false,
        mlp_act: Activation::Silu,
        attn_scale: None,
        attn_softcap: None,
        final_softcap: None,
        sliding_window: None,
        bidirectional_media: false,
    })
}

/// The llama-family hyperparameters of a GGUF file (`{arch}.*` metadata).
pub fn gguf_base_config(
    g: &crate::weights::GgufWeights,
    arch: &str,
    architecture: &str,
    max_model_len: Option<usize>,
) -> MResult<DecoderConfig> {
    use crate::rope::{RopeScaling, RopeStyle};
    let key = |k: &str| format!("{arch}.{k}");
    let hidden = g.meta_usize(&key("embedding_length"))?;
    let heads = g.meta_usize(&key("attention.head_count"))?;
    let kv_heads = g
        .meta_usize_opt(&key("attention.head_count_kv"))?
        .unwrap_or(heads);
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(ModelError::Config(format!(
            "GGUF head counts {heads}/{kv_heads} are not valid for grouped-query attention"
        )));
    }
    let head_dim = match g.meta_usize_opt(&key("attention.key_length"))? {
        Some(d) => d,
        None => hidden / heads,
    };
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(ModelError::Config(format!(
            "GGUF head_dim {head_dim} must be even and positive"
        )));
    }
    if let Some(rd) = g.meta_usize_opt(&key("rope.dimension_count"))? {
        if rd != head_dim {
            return Err(ModelError::Config(format!(
                "partial rotary embeddings (rope.dimension_count {rd} < head_dim {head_dim}) are not supported"
            )));
        }
    }
    let vocab = match g.meta_usize_opt(&key("vocab_size"))? {
        Some(v) => v,
        None => g
            .shape_of("model.embed_tokens.weight")
            .and_then(|s| s.first().copied())
            .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?,
    };
    let ctx = g.meta_usize_opt(&key("context_length"))?.unwrap_or(2048);
    let scaling = if g.has_raw("rope_freqs.weight") {
        let f = g
            .qtensor_raw("rope_freqs.weight")?
            .dequantize(&candle_core::Device::Cpu)?;
        RopeScaling::FreqFactors(f.flatten_all()?.to_vec1::<f32>()?)
    } else {
        match g.meta_str_opt(&key("rope.scaling.type")) {
            None | Some("none") => RopeScaling::None,
            Some("linear") => match g.meta_f64_opt(&key("rope.scaling.factor"))? {
                Some(f) if f > 0.0 => RopeScaling::Linear { factor: f as f32 },
                _ => RopeScaling::None,
            },
            Some(other) => {
                return Err(ModelError::Config(format!(
                    "unsupported GGUF rope scaling {other:?} (supported: none, linear, rope_freqs)"
                )))
            }
        }
    };
    let style = if arch == "llama" {
        RopeStyle::Interleaved
    } else {
        RopeStyle::Neox
    };
    Ok(DecoderConfig {
        architecture: architecture.to_string(),
        hidden_size: hidden,
        intermediate_size: g.meta_usize(&key("feed_forward_length"))?,
        num_layers: g.meta_usize(&key("block_count"))?,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        vocab_size: vocab,
        rms_norm_eps: g
            .meta_f64_opt(&key("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5),
        rope: RopeConfig {
            theta: g.meta_f64_opt(&key("rope.freq_base"))?.unwrap_or(10_000.0) as f32,
            head_dim,
            max_positions: resolve_max_len(max_model_len, ctx)?,
            scaling,
            style,
        },
        qkv_bias: g.has_raw("blk.0.attn_q.bias"),
        o_bias: g.has_raw("blk.0.attn_output.bias"),
        mlp_bias: g.has_raw("blk.0.ffn_up.bias"),
        qk_norm: false,
        tie_word_embeddings: !g.has_raw("output.weight"),
        mrope_section: None,
        norm_unit_offset: false,
        embed_scale: None,
        sandwich_norms: false,
        mlp_act: Activation::Silu,
        attn_scale: None,
        attn_softcap: None,
        final_softcap: None,
        sliding_window: None,
        bidirectional_media: false,
    })
}
