//! Paged attention, architecture-neutral: CPU kernels here, CUDA kernels in
//! candela-kernels (feature `cuda`) behind the same two ops.
//!
//! The KV pool of one layer is two preallocated tensors (K and V) of shape
//! `[num_blocks * block_size, num_kv_heads, head_dim]` in the model dtype;
//! slot `s` is row `s`. Two entry points, kept as plain functions so a CUDA
//! build can swap the kernels behind them:
//!
//! - [`write_kv`] copies the step's new K/V rows into their slots, in place.
//! - [`paged_attention`] lets each new query token (at causal position `p`
//!   in its sequence) attend over keys `0..=p` of its sequence, found
//!   through the sequence's block table, or over the last `window` of them
//!   for a sliding-window layer ([`AttnParams`]). A token inside a
//!   bidirectional span (one media item's tokens, for the families that ask)
//!   also sees the span's later keys. Decode, chunked prefill and prefill on
//!   a cached prefix are the same computation.
//!
//! On the CPU, decodes and short chunks run one (token, head) row at a time;
//! sequences with longer chunks go through [`prefill`]'s tiles.
//!
//! On CUDA, the batch layout is planned and uploaded once per forward (the
//! metadata caches it for every layer). Out-of-range slots are an error on
//! the CPU; the CUDA kernel skips them (checking would cost a device sync per
//! layer), which cannot happen with slots from the engine's block manager.

use std::sync::Arc;

use candela_core::block_pool::NULL_BLOCK;
use candela_core::model::ForwardBatch;
use candle_core::{
    backend::BackendStorage, bail, CpuStorage, CustomOp3, DType, InplaceOp3, Layout, Result, Shape,
    Tensor,
};
use half::vec::HalfBitsVecExt;
use half::{bf16, f16};
use rayon::prelude::*;

mod prefill;

/// One sequence's share of the attention call.
#[derive(Debug, Clone)]
pub struct AttentionSeq {
    pub query_start: usize,
    pub query_len: usize,
    /// Keys in the cache for this sequence once this step's K/V are written.
    pub context_len: usize,
    pub block_table: Vec<u32>,
}

/// Batch layout shared by every layer's attention in one forward.
#[derive(Debug, Clone)]
pub struct AttentionMetadata {
    pub seqs: Vec<AttentionSeq>,
    pub block_size: usize,
    pub num_tokens: usize,
    /// For each query token: index of its sequence in `seqs`.
    token_seq: Vec<u32>,
    /// For each query token: its causal position (it sees keys `0..=pos`).
    token_pos: Vec<u32>,
    /// For each query token: the end of the keys it sees, `pos + 1` or,
    /// inside a bidirectional span, the span's end.
    token_end: Vec<u32>,
    /// The CUDA kernels' plan, uploaded by the first layer that needs it.
    #[cfg(feature = "cuda")]
    device_plan: Arc<std::sync::Mutex<Option<Arc<candela_kernels::cuda::DeviceAttentionPlan>>>>,
}

impl AttentionMetadata {
    /// Check a batch's layout and derive per-token sequence and position.
    /// The causal position of the `j`-th new token of a sequence is
    /// `context_len - query_len + j`.
    pub fn new(seqs: Vec<AttentionSeq>, block_size: usize, num_tokens: usize) -> Result<Self> {
        if block_size == 0 {
            bail!("paged attention: block_size must be positive");
        }
        let mut token_seq = vec![0u32; num_tokens];
        let mut token_pos = vec![0u32; num_tokens];
        let mut next = 0usize;
        for (i, s) in seqs.iter().enumerate() {
            if s.query_start != next {
                bail!(
                    "paged attention: sequence {i} starts at token {} but the previous one ends at {next}",
                    s.query_start
                );
            }
            if s.query_len > s.context_len {
                bail!(
                    "paged attention: sequence {i} has {} new tokens but a context of {}",
                    s.query_len,
                    s.context_len
                );
            }
            let blocks_needed = s.context_len.div_ceil(block_size);
            if s.block_table.len() < blocks_needed {
                bail!(
                    "paged attention: sequence {i} needs {blocks_needed} blocks for {} tokens, its block table has {}",
                    s.context_len,
                    s.block_table.len()
                );
            }
            let end = s.query_start + s.query_len;
            if end > num_tokens {
                bail!("paged attention: sequence {i} ends at token {end}, batch has {num_tokens}");
            }
            let first_pos = s.context_len - s.query_len;
            for j in 0..s.query_len {
                token_seq[s.query_start + j] = i as u32;
                token_pos[s.query_start + j] = (first_pos + j) as u32;
            }
            next = end;
        }
        if next != num_tokens {
            bail!("paged attention: sequences cover {next} tokens, batch has {num_tokens}");
        }
        Ok(Self {
            seqs,
            block_size,
            num_tokens,
            token_seq,
            token_end: token_pos.iter().map(|p| p + 1).collect(),
            token_pos,
            #[cfg(feature = "cuda")]
            device_plan: Default::default(),
        })
    }

    /// The batch planned for the CUDA kernels and uploaded to `dev` (once).
    #[cfg(feature = "cuda")]
    fn device_plan(
        &self,
        dev: &candle_core::CudaDevice,
    ) -> Result<Arc<candela_kernels::cuda::DeviceAttentionPlan>> {
        use candela_kernels::plan::{AttentionPlan, PlanSeq};
        let mut cached = self.device_plan.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = cached.as_ref() {
            return Ok(p.clone());
        }
        let seqs: Vec<PlanSeq<'_>> = self
            .seqs
            .iter()
            .map(|s| PlanSeq {
                query_start: s.query_start,
                query_len: s.query_len,
                context_len: s.context_len,
                block_table: &s.block_table,
            })
            .collect();
        let plan = AttentionPlan::new(&seqs, self.block_size, self.num_tokens)
            .map_err(candle_core::Error::wrap)?;
        let p = Arc::new(candela_kernels::cuda::DeviceAttentionPlan::upload(
            plan, dev,
        )?);
        *cached = Some(p.clone());
        Ok(p)
    }

    /// The batch's layout; with `bidirectional_media`, each media embedding
    /// span of the batch is a bidirectional span.
    pub fn from_batch(batch: &ForwardBatch, bidirectional_media: bool) -> Result<Self> {
        let seqs = batch
            .seqs
            .iter()
            .map(|s| AttentionSeq {
                query_start: s.query_start,
                query_len: s.query_len,
                context_len: s.context_len,
                block_table: s.block_table.clone(),
            })
            .collect();
        let mut meta = Self::new(seqs, batch.block_size, batch.num_tokens())?;
        if bidirectional_media {
            for span in &batch.mm_embeds {
                meta.add_bidirectional_span(span.start, span.embeds.dim(0)?)?;
            }
        }
        Ok(meta)
    }

    /// Let query tokens `start..start + len` (batch indices, one sequence)
    /// see each other both ways. The span must end inside the step's new
    /// tokens: its later keys are this step's (the scheduler never ends a
    /// chunk inside a media item for such models).
    pub fn add_bidirectional_span(&mut self, start: usize, len: usize) -> Result<()> {
        let end = start + len;
        if len == 0 {
            return Ok(());
        }
        if end > self.num_tokens || self.token_seq[start] != self.token_seq[end - 1] {
            bail!("paged attention: bidirectional span {start}..{end} is not inside one sequence's new tokens");
        }
        let last = self.token_pos[end - 1] + 1;
        for e in &mut self.token_end[start..end] {
            *e = (*e).max(last);
        }
        Ok(())
    }

    /// Whether any token sees keys past its own position.
    pub fn has_bidirectional_spans(&self) -> bool {
        self.token_end
            .iter()
            .zip(&self.token_pos)
            .any(|(e, p)| *e > p + 1)
    }

    /// Key positions `lo..hi` that query token `t` attends to: its causal
    /// prefix (extended to the end of its bidirectional span, if any), cut
    /// to the last `window` keys before it on a sliding-window layer (as
    /// transformers ANDs the window with the OR of causal and span masks).
    /// `hi` never decreases along a sequence's tokens.
    #[inline]
    pub(crate) fn key_range(&self, t: usize, window: Option<usize>) -> (usize, usize) {
        let own = self.token_pos[t] as usize + 1;
        let lo = window.map_or(0, |w| own.saturating_sub(w));
        (lo, self.token_end[t] as usize)
    }

    /// Largest block id a layer with this `window` reads, or an error if it
    /// would read a table entry freed behind the window ([`NULL_BLOCK`]).
    fn max_block_read(&self, window: Option<usize>) -> Result<Option<u32>> {
        let mut max = None;
        for (i, s) in self.seqs.iter().enumerate() {
            let first_pos = s.context_len - s.query_len;
            let lo = window.map_or(0, |w| (first_pos + 1).saturating_sub(w)) / self.block_size;
            let hi = s.context_len.div_ceil(self.block_size);
            for &b in &s.block_table[lo.min(hi)..hi] {
                if b == NULL_BLOCK {
                    bail!("paged attention: sequence {i} reads a freed block (window {window:?})");
                }
                max = max.max(Some(b));
            }
        }
        Ok(max)
    }
}

/// What distinguishes one layer's attention: the score scale, an optional
/// sliding window (a token at position `p` sees keys `p - window + 1 ..= p`,
/// as transformers' `sliding_window`), and optional tanh softcapping of the
/// scaled scores (`cap * tanh(s / cap)`, Gemma 2's `attn_logit_softcapping`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnParams {
    pub scale: f32,
    pub window: Option<usize>,
    pub softcap: Option<f32>,
}

impl AttnParams {
    /// Plain causal attention with this score scale.
    pub fn causal(scale: f32) -> Self {
        Self {
            scale,
            window: None,
            softcap: None,
        }
    }

    /// `cap * tanh(s / cap)` when softcapping, else `s`.
    #[inline(always)]
    fn cap(&self, s: f32) -> f32 {
        match self.softcap {
            Some(c) => c * (s / c).tanh(),
            None => s,
        }
    }

    /// Softcap the scores in place.
    fn cap_all(&self, scores: &mut [f32]) {
        if self.softcap.is_some() {
            scores.iter_mut().for_each(|s| *s = self.cap(*s));
        }
    }
}

/// Allocate one layer's K (or V) pool.
pub fn alloc_kv_pool(
    num_blocks: usize,
    block_size: usize,
    num_kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let shape = (num_blocks * block_size, num_kv_heads, head_dim);
    // On the CPU from the allocator's zeroed memory: a pool of gigabytes
    // then costs neither a pass writing zeros (seconds at load) nor
    // resident memory until its blocks are used.
    let n = num_blocks * block_size * num_kv_heads * head_dim;
    match dtype {
        _ if !device.is_cpu() => Tensor::zeros(shape, dtype, device),
        DType::F32 => Tensor::from_vec(vec![0f32; n], shape, device),
        DType::F16 => Tensor::from_vec(vec![0u16; n].reinterpret_into::<f16>(), shape, device),
        DType::BF16 => Tensor::from_vec(vec![0u16; n].reinterpret_into::<bf16>(), shape, device),
        _ => Tensor::zeros(shape, dtype, device),
    }
}

/// Element types the kernels read and write; arithmetic is f32.
trait KvElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
    /// `q . k` in f32. `F`: the caller runs with AVX2+FMA+F16C enabled.
    fn dot<const F: bool>(q: &[f32], k: &[Self]) -> f32;
}
impl KvElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn dot<const F: bool>(q: &[f32], k: &[Self]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if F {
            // SAFETY: F is only set on paths compiled for and checked to run with AVX2+FMA.
            return unsafe { simd::dot(q, k, |p| std::arch::x86_64::_mm256_loadu_ps(p)) };
        }
        dot_kv::<Self, F>(q, k)
    }
}
impl KvElem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    #[inline(always)]
    fn dot<const F: bool>(q: &[f32], k: &[Self]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if F {
            // SAFETY: as for f32; bf16 widens exactly by a 16-bit shift.
            return unsafe { simd::dot(q, k, |p| simd::load_bf16(p)) };
        }
        dot_kv::<Self, F>(q, k)
    }
}
impl KvElem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    #[inline(always)]
    fn dot<const F: bool>(q: &[f32], k: &[Self]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if F {
            // SAFETY: as for f32; F also implies F16C.
            return unsafe { simd::dot(q, k, |p| simd::load_f16(p)) };
        }
        dot_kv::<Self, F>(q, k)
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    /// 8 bf16 values at `p` widened to f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn load_bf16(p: *const half::bf16) -> __m256 {
        let raw = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16))
    }

    /// 8 f16 values at `p` widened to f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn load_f16(p: *const half::f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    /// `q . k` with 2 x 8 FMA lanes; `load` widens 8 elements of `k`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot<T: super::KvElem>(
        q: &[f32],
        k: &[T],
        load: impl Fn(*const T) -> __m256,
    ) -> f32 {
        let n = q.len().min(k.len());
        let (qp, kp) = (q.as_ptr(), k.as_ptr());
        let mut a0 = _mm256_setzero_ps();
        let mut a1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i)), load(kp.add(i)), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i + 8)), load(kp.add(i + 8)), a1);
            i += 16;
        }
        if i + 8 <= n {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i)), load(kp.add(i)), a0);
            i += 8;
        }
        let a = _mm256_add_ps(a0, a1);
        let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        let mut r = _mm_cvtss_f32(s);
        while i < n {
            r += q[i] * k[i].to_f32();
            i += 1;
        }
        r
    }
}

fn contiguous<'a, T>(data: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("paged attention: {what} must be contiguous"),
    }
}

// ---------------------------------------------------------------- write_kv

struct WriteKv;

impl WriteKv {
    fn write<T: Copy>(
        cache: &mut [T],
        cache_l: &Layout,
        src: &[T],
        src_l: &Layout,
        slots: &[u32],
    ) -> Result<()> {
        let (c0, c1) = match cache_l.contiguous_offsets() {
            Some(o) => o,
            None => bail!("write_kv: cache must be contiguous"),
        };
        let cache = &mut cache[c0..c1];
        let src = contiguous(src, src_l, "new keys/values")?;
        let (num_slots, ch, cd) = cache_l.shape().dims3()?;
        let (n, sh, sd) = src_l.shape().dims3()?;
        if (ch, cd) != (sh, sd) {
            bail!("write_kv: cache rows are [{ch}, {cd}], new rows are [{sh}, {sd}]");
        }
        if slots.len() != n {
            bail!("write_kv: {n} new rows but {} slots", slots.len());
        }
        let row = ch * cd;
        for (i, &slot) in slots.iter().enumerate() {
            let slot = slot as usize;
            if slot >= num_slots {
                bail!("write_kv: slot {slot} out of range (pool has {num_slots} slots)");
            }
            cache[slot * row..(slot + 1) * row].copy_from_slice(&src[i * row..(i + 1) * row]);
        }
        Ok(())
    }
}

impl InplaceOp3 for WriteKv {
    fn name(&self) -> &'static str {
        "candela-write-kv"
    }

    fn cpu_fwd(
        &self,
        cache: &mut CpuStorage,
        cache_l: &Layout,
        src: &CpuStorage,
        src_l: &Layout,
        slots: &CpuStorage,
        slots_l: &Layout,
    ) -> Result<()> {
        let slots = match slots {
            CpuStorage::U32(s) => contiguous(s, slots_l, "slot mapping")?,
            _ => bail!("write_kv: slot mapping must be u32"),
        };
        match (cache, src) {
            (CpuStorage::F32(c), CpuStorage::F32(s)) => Self::write(c, cache_l, s, src_l, slots),
            (CpuStorage::BF16(c), CpuStorage::BF16(s)) => Self::write(c, cache_l, s, src_l, slots),
            (CpuStorage::F16(c), CpuStorage::F16(s)) => Self::write(c, cache_l, s, src_l, slots),
            (c, s) => bail!(
                "write_kv: cache dtype {:?} and new rows dtype {:?} must match (f32, bf16 or f16)",
                c.dtype(),
                s.dtype()
            ),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        cache: &mut candle_core::CudaStorage,
        cache_l: &Layout,
        src: &candle_core::CudaStorage,
        src_l: &Layout,
        slots: &candle_core::CudaStorage,
        slots_l: &Layout,
    ) -> Result<()> {
        if slots.dtype() != DType::U32 {
            bail!("write_kv: slot mapping must be u32");
        }
        candela_kernels::cuda::write_rows(cache, cache_l, src, src_l, slots, slots_l)
    }
}

/// Write `k`, `v` (`[tokens, num_kv_heads, head_dim]`) into rows
/// `slot_mapping` (`[tokens]`, u32) of the pools, in place.
pub fn write_kv(
    k_cache: &Tensor,
    v_cache: &Tensor,
    k: &Tensor,
    v: &Tensor,
    slot_mapping: &Tensor,
) -> Result<()> {
    let k = k.contiguous()?;
    let v = v.contiguous()?;
    k_cache.inplace_op3(&k, slot_mapping, &WriteKv)?;
    v_cache.inplace_op3(&v, slot_mapping, &WriteKv)?;
    Ok(())
}

// --------------------------------------------------------- paged attention

struct PagedAttention {
    meta: Arc<AttentionMetadata>,
    params: AttnParams,
}

/// One query token's heads `h..h + heads` of the attention, which share one
/// kv head (GQA): the inputs of the inner loop. Each key and value row is
/// read once for all of them.
struct AttnRow<'a, T> {
    /// `heads` query rows of `head_dim`, one after another.
    q: &'a [T],
    heads: usize,
    kc: &'a [T],
    vc: &'a [T],
    block_table: &'a [u32],
    /// Keys `first..n_ctx` are attended to.
    first: usize,
    n_ctx: usize,
    block_size: usize,
    /// Elements per cache slot (num_kv_heads * head_dim).
    slot_stride: usize,
    /// Offset of this kv head inside a slot.
    head_off: usize,
    params: AttnParams,
}

/// Most query heads one decode task takes together (their scores' maxima
/// and sums live on the stack).
const MAX_GROUP: usize = 16;

/// How many query heads of a kv head's `group` one decode task takes: the
/// most that divides `group` (so a task's heads share their kv head) and
/// still leaves a task per thread among the `rows` (token, head) pairs.
fn decode_group(group: usize, rows: usize, threads: usize) -> usize {
    (1..=group.min(MAX_GROUP))
        .rev()
        .find(|&g| group.is_multiple_of(g) && rows / g >= threads)
        .unwrap_or(1)
}

/// `a * b + c`, fused when the caller is compiled with FMA (`F`).
#[inline(always)]
fn madd<const F: bool>(a: f32, b: f32, c: f32) -> f32 {
    if F {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// f32 dot product of an f32 row and a stored row, 2 x 8 independent lanes.
#[inline(always)]
fn dot_kv<T: KvElem, const F: bool>(q: &[f32], k: &[T]) -> f32 {
    let mut a0 = [0f32; 8];
    let mut a1 = [0f32; 8];
    let (qc, kc) = (q.chunks_exact(16), k.chunks_exact(16));
    let (qr, kr) = (qc.remainder(), kc.remainder());
    for (x, y) in qc.zip(kc) {
        for i in 0..8 {
            a0[i] = madd::<F>(x[i], y[i].to_f32(), a0[i]);
            a1[i] = madd::<F>(x[i + 8], y[i + 8].to_f32(), a1[i]);
        }
    }
    for i in 0..8 {
        a0[i] += a1[i];
    }
    let mut s = ((a0[0] + a0[4]) + (a0[1] + a0[5])) + ((a0[2] + a0[6]) + (a0[3] + a0[7]));
    for (x, y) in qr.iter().zip(kr) {
        s += x * y.to_f32();
    }
    s
}

impl<T: KvElem> AttnRow<'_, T> {
    /// Index from `first` and cache offset of positions `first..n_ctx`,
    /// block by block.
    #[inline(always)]
    fn for_each_key(&self, mut f: impl FnMut(usize, usize)) {
        let bs = self.block_size;
        let mut p = self.first;
        while p < self.n_ctx {
            let base = self.block_table[p / bs] as usize * bs;
            let end = self.n_ctx.min((p / bs + 1) * bs);
            for q in p..end {
                f(
                    q - self.first,
                    (base + q % bs) * self.slot_stride + self.head_off,
                );
            }
            p = end;
        }
    }

    /// Softmax-weighted sums of values into `out` (`heads` rows); `qf`,
    /// `acc` (`heads * head_dim`) and `scores` are scratch. Each head's
    /// arithmetic is the same whatever `heads` is.
    #[inline(always)]
    fn run<const F: bool>(
        &self,
        out: &mut [T],
        qf: &mut [f32],
        acc: &mut [f32],
        scores: &mut Vec<f32>,
    ) {
        let d = out.len() / self.heads;
        let n = self.n_ctx - self.first;
        for (f, x) in qf.iter_mut().zip(self.q) {
            *f = x.to_f32() * self.params.scale;
        }
        scores.clear();
        scores.resize(self.heads * n, 0.0);
        let mut max = [f32::NEG_INFINITY; MAX_GROUP];
        self.for_each_key(|p, off| {
            let k = &self.kc[off..off + d];
            for (g, m) in max.iter_mut().enumerate().take(self.heads) {
                let s = self.params.cap(T::dot::<F>(&qf[g * d..(g + 1) * d], k));
                *m = m.max(s);
                scores[g * n + p] = s;
            }
        });
        let mut sum = [0f32; MAX_GROUP];
        for (g, (row, sm)) in scores.chunks_exact_mut(n.max(1)).zip(&mut sum).enumerate() {
            *sm = crate::softmax::exp_shifted_sum(row, max[g]);
        }
        acc.iter_mut().for_each(|a| *a = 0.0);
        self.for_each_key(|p, off| {
            let v = &self.vc[off..off + d];
            for (g, ag) in acc.chunks_exact_mut(d).enumerate() {
                let w = scores[g * n + p];
                for (a, x) in ag.iter_mut().zip(v) {
                    *a = madd::<F>(w, x.to_f32(), *a);
                }
            }
        });
        for ((og, ag), sm) in out.chunks_exact_mut(d).zip(acc.chunks_exact(d)).zip(sum) {
            let inv = 1.0 / sm;
            for (o, a) in og.iter_mut().zip(ag) {
                *o = T::from_f32(a * inv);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_avx2<T: KvElem>(
    row: &AttnRow<'_, T>,
    out: &mut [T],
    qf: &mut [f32],
    acc: &mut [f32],
    scores: &mut Vec<f32>,
) {
    row.run::<true>(out, qf, acc, scores)
}

fn attend<T: KvElem>(
    row: &AttnRow<'_, T>,
    out: &mut [T],
    qf: &mut [f32],
    acc: &mut [f32],
    scores: &mut Vec<f32>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu::has_avx2() {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked at run time).
            unsafe { attend_avx2(row, out, qf, acc, scores) };
            return;
        }
    }
    row.run::<false>(out, qf, acc, scores)
}

impl PagedAttention {
    /// Shapes of query and caches checked against each other and the batch:
    /// `(tokens, heads, head_dim, kv_heads)`.
    fn check_dims(
        &self,
        q_l: &Layout,
        kc_l: &Layout,
        vc_l: &Layout,
    ) -> Result<(usize, usize, usize, usize)> {
        let (n_tok, n_heads, d) = q_l.shape().dims3()?;
        let (num_slots, n_kv, dk) = kc_l.shape().dims3()?;
        if vc_l.shape().dims3()? != (num_slots, n_kv, dk) {
            bail!("paged attention: key and value caches differ in shape");
        }
        if dk != d {
            bail!("paged attention: query head_dim {d} vs cache head_dim {dk}");
        }
        if n_kv == 0 || n_heads % n_kv != 0 {
            bail!("paged attention: {n_heads} query heads are not a multiple of {n_kv} kv heads");
        }
        let meta = &*self.meta;
        if meta.num_tokens != n_tok {
            bail!(
                "paged attention: query has {n_tok} tokens, metadata {}",
                meta.num_tokens
            );
        }
        let bs = meta.block_size;
        if let Some(max_block) = meta.max_block_read(self.params.window)? {
            if (max_block as usize + 1) * bs > num_slots {
                bail!(
                    "paged attention: block {max_block} out of range (pool has {} blocks of {bs})",
                    num_slots / bs
                );
            }
        }
        Ok((n_tok, n_heads, d, n_kv))
    }

    fn run<T: KvElem>(
        &self,
        q: &[T],
        q_l: &Layout,
        kc: &[T],
        kc_l: &Layout,
        vc: &[T],
        vc_l: &Layout,
    ) -> Result<(CpuStorage, Shape)>
    where
        Vec<T>: IntoCpuStorage,
    {
        let q = contiguous(q, q_l, "query")?;
        let kc = contiguous(kc, kc_l, "key cache")?;
        let vc = contiguous(vc, vc_l, "value cache")?;
        let (n_tok, n_heads, d, n_kv) = self.check_dims(q_l, kc_l, vc_l)?;
        let meta = &*self.meta;
        let bs = meta.block_size;
        let group = n_heads / n_kv;
        let row = n_kv * d;
        let params = self.params;

        let mut out = vec![T::from_f32(0.0); n_tok * n_heads * d];
        if d > 0 {
            // Decodes and short chunks by groups of query heads that share a
            // kv head; longer prefills in tiles.
            let heads = decode_group(group, n_tok * n_heads, rayon::current_num_threads());
            out.par_chunks_mut(heads * d).enumerate().for_each_init(
                || {
                    (
                        vec![0f32; heads * d],
                        vec![0f32; heads * d],
                        Vec::<f32>::new(),
                    )
                },
                |(qf, acc, scores), (idx, o)| {
                    let t = idx * heads / n_heads;
                    let h = idx * heads % n_heads;
                    let seq = &meta.seqs[meta.token_seq[t] as usize];
                    if seq.query_len >= prefill::MIN_QUERY_LEN {
                        return;
                    }
                    let (first, n_ctx) = meta.key_range(t, params.window);
                    let attn_row = AttnRow {
                        q: &q[idx * heads * d..(idx + 1) * heads * d],
                        heads,
                        kc,
                        vc,
                        block_table: &seq.block_table,
                        first,
                        n_ctx,
                        block_size: bs,
                        slot_stride: row,
                        head_off: (h / group) * d,
                        params,
                    };
                    attend(&attn_row, o, qf, acc, scores);
                },
            );
            let heads = prefill::Heads {
                n_heads,
                head_dim: d,
                group,
                slot_stride: row,
                params,
            };
            prefill::attend_tiled(q, kc, vc, meta, &heads, &mut out);
        }
        Ok((out.into_cpu_storage(), Shape::from((n_tok, n_heads, d))))
    }
}

trait IntoCpuStorage {
    fn into_cpu_storage(self) -> CpuStorage;
}
impl IntoCpuStorage for Vec<f32> {
    fn into_cpu_storage(self) -> CpuStorage {
        CpuStorage::F32(self)
    }
}
impl IntoCpuStorage for Vec<bf16> {
    fn into_cpu_storage(self) -> CpuStorage {
        CpuStorage::BF16(self)
    }
}
impl IntoCpuStorage for Vec<f16> {
    fn into_cpu_storage(self) -> CpuStorage {
        CpuStorage::F16(self)
    }
}

impl CustomOp3 for PagedAttention {
    fn name(&self) -> &'static str {
        "candela-paged-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_l: &Layout,
        k: &CpuStorage,
        k_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match (q, k, v) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                self.run(q, q_l, k, k_l, v, v_l)
            }
            (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                self.run(q, q_l, k, k_l, v, v_l)
            }
            (CpuStorage::F16(q), CpuStorage::F16(k), CpuStorage::F16(v)) => {
                self.run(q, q_l, k, k_l, v, v_l)
            }
            (q, k, v) => bail!(
                "paged attention: query/key/value dtypes {:?}/{:?}/{:?} must match (f32, bf16 or f16)",
                q.dtype(),
                k.dtype(),
                v.dtype()
            ),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        q_l: &Layout,
        k: &candle_core::CudaStorage,
        k_l: &Layout,
        v: &candle_core::CudaStorage,
        v_l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        if self.params != AttnParams::causal(self.params.scale) {
            bail!(
                "paged attention: sliding windows and softcapping are not in the CUDA kernel yet ({:?})",
                self.params
            );
        }
        if self.meta.has_bidirectional_spans() {
            bail!("paged attention: bidirectional media spans are not in the CUDA kernel yet");
        }
        let (n_tok, n_heads, d, n_kv) = self.check_dims(q_l, k_l, v_l)?;
        let heads = candela_kernels::plan::HeadLayout::new(n_heads, n_kv, d)
            .map_err(candle_core::Error::wrap)?;
        let plan = self.meta.device_plan(&q.device)?;
        let out = candela_kernels::cuda::paged_attention(
            q,
            q_l,
            k,
            k_l,
            v,
            v_l,
            &plan,
            &heads,
            self.params.scale,
        )?;
        Ok((out, Shape::from((n_tok, n_heads, d))))
    }
}

/// Attention of `q` (`[tokens, num_heads, head_dim]`) over the paged caches,
/// returning `[tokens, num_heads, head_dim]` in `q`'s dtype. Softmax and
/// accumulation run in f32. Query head `h` reads kv head
/// `h / (num_heads / num_kv_heads)`.
pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    meta: &Arc<AttentionMetadata>,
    params: AttnParams,
) -> Result<Tensor> {
    let q = q.contiguous()?;
    q.apply_op3_no_bwd(
        k_cache,
        v_cache,
        &PagedAttention {
            meta: meta.clone(),
            params,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// xorshift64*: deterministic test data without a rand dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn uniform(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
        fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.uniform()).collect()
        }
        fn shuffle<T>(&mut self, v: &mut [T]) {
            for i in (1..v.len()).rev() {
                let j = (self.next() % (i as u64 + 1)) as usize;
                v.swap(i, j);
            }
        }
    }

    /// Dense causal attention of one sequence: q `[n, H, D]` at positions
    /// `ctx - n ..ctx`, keys/values `[ctx, KVH, D]`; a token at `pos` sees
    /// keys `pos - window + 1 ..= pos`.
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        n: usize,
        ctx: usize,
        h: usize,
        kvh: usize,
        d: usize,
        params: AttnParams,
        span: std::ops::Range<usize>,
    ) -> Vec<f32> {
        let mut out = vec![0f32; n * h * d];
        for t in 0..n {
            let own = ctx - n + t;
            let first = params.window.map_or(0, |w| (own + 1).saturating_sub(w));
            // Inside the bidirectional span (new-token indices): up to its end.
            let pos = if span.contains(&t) {
                ctx - n + span.end - 1
            } else {
                own
            };
            for head in 0..h {
                let kh = head / (h / kvh);
                let qrow = &q[(t * h + head) * d..][..d];
                let scores: Vec<f64> = (first..=pos)
                    .map(|p| {
                        let krow = &k[(p * kvh + kh) * d..][..d];
                        let s = qrow
                            .iter()
                            .zip(krow)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * params.scale as f64;
                        match params.softcap {
                            Some(c) => c as f64 * (s / c as f64).tanh(),
                            None => s,
                        }
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for j in 0..d {
                    let mut acc = 0f64;
                    for p in first..=pos {
                        acc += e[p - first] * v[(p * kvh + kh) * d + j] as f64;
                    }
                    out[(t * h + head) * d + j] = (acc / z) as f32;
                }
            }
        }
        out
    }

    struct Case {
        ctx: usize,
        cached: usize,
    }

    fn check(dtype: DType, tol: f32) -> Result<()> {
        check_with(dtype, tol, None, None, false)
    }

    fn check_with(
        dtype: DType,
        tol: f32,
        window: Option<usize>,
        softcap: Option<f32>,
        spans: bool,
    ) -> Result<()> {
        let dev = Device::Cpu;
        // head_dim 44 = 2 x 16 + 8 + 4: every branch of the SIMD dot product.
        let (h, kvh, d, bs) = (6usize, 2usize, 44usize, 4usize);
        let params = AttnParams {
            scale: 1.0 / (d as f32).sqrt(),
            window,
            softcap,
        };
        let mut rng = Rng(0x1234_5678_9abc_def1 ^ dtype.size_in_bytes() as u64);
        // Sequences: a decode (long cached prefix), a full prefill, a chunk on a
        // cached prefix, a prefill shorter than one block.
        let cases = [
            Case {
                ctx: 13,
                cached: 12,
            },
            Case { ctx: 9, cached: 0 },
            Case {
                ctx: 21,
                cached: 10,
            },
            Case { ctx: 3, cached: 0 },
            // Tiled prefills over several tiles, the last one partial: on a
            // cached prefix and from scratch.
            Case {
                ctx: 70,
                cached: 20,
            },
            Case { ctx: 45, cached: 0 },
        ];
        let total_blocks: usize = cases.iter().map(|c| c.ctx.div_ceil(bs)).sum();
        let num_blocks = total_blocks + 5;
        let mut block_ids: Vec<u32> = (0..num_blocks as u32).collect();
        rng.shuffle(&mut block_ids);
        let k_cache = alloc_kv_pool(num_blocks, bs, kvh, d, dtype, &dev)?;
        let v_cache = alloc_kv_pool(num_blocks, bs, kvh, d, dtype, &dev)?;

        let mut next_block = 0;
        let mut seqs = Vec::new();
        let mut all_q = Vec::new();
        let mut expected = Vec::new();
        let mut new_k = Vec::new();
        let mut new_v = Vec::new();
        let mut new_slots = Vec::new();
        let mut query_start = 0;
        let mut spans_at = Vec::new();
        for c in &cases {
            let nb = c.ctx.div_ceil(bs);
            let table: Vec<u32> = block_ids[next_block..next_block + nb].to_vec();
            next_block += nb;
            // Round through the storage dtype so the reference sees the same values.
            let round = |x: Vec<f32>| -> Vec<f32> {
                Tensor::from_vec(x.clone(), x.len(), &dev)
                    .and_then(|t| t.to_dtype(dtype))
                    .and_then(|t| t.to_dtype(DType::F32))
                    .and_then(|t| t.to_vec1())
                    .unwrap()
            };
            let k = round(rng.vec(c.ctx * kvh * d));
            let v = round(rng.vec(c.ctx * kvh * d));
            let n = c.ctx - c.cached;
            let q = round(rng.vec(n * h * d));
            let slot = |p: usize| table[p / bs] * bs as u32 + (p % bs) as u32;
            // The cached prefix was written by an earlier step.
            if c.cached > 0 {
                let slots: Vec<u32> = (0..c.cached).map(slot).collect();
                let kt = Tensor::from_slice(&k[..c.cached * kvh * d], (c.cached, kvh, d), &dev)?
                    .to_dtype(dtype)?;
                let vt = Tensor::from_slice(&v[..c.cached * kvh * d], (c.cached, kvh, d), &dev)?
                    .to_dtype(dtype)?;
                let st = Tensor::from_slice(&slots, c.cached, &dev)?;
                write_kv(&k_cache, &v_cache, &kt, &vt, &st)?;
            }
            new_k.extend_from_slice(&k[c.cached * kvh * d..]);
            new_v.extend_from_slice(&v[c.cached * kvh * d..]);
            new_slots.extend((c.cached..c.ctx).map(slot));
            // A bidirectional span over part of the new tokens.
            let span = if spans {
                n / 4..(3 * n / 4).max(n / 4 + 2).min(n)
            } else {
                0..0
            };
            spans_at.push((query_start + span.start, span.len()));
            expected.extend(naive(&q, &k, &v, n, c.ctx, h, kvh, d, params, span));
            all_q.extend(q);
            // As the engine does, free the blocks behind the window: their
            // entries become NULL_BLOCK, which no token may read.
            let mut table = table;
            if let Some(w) = window {
                let dead = (c.cached + 1).saturating_sub(w) / bs;
                table[..dead].fill(NULL_BLOCK);
            }
            seqs.push(AttentionSeq {
                query_start,
                query_len: n,
                context_len: c.ctx,
                block_table: table,
            });
            query_start += n;
        }
        let n_tok = query_start;
        let kt = Tensor::from_vec(new_k, (n_tok, kvh, d), &dev)?.to_dtype(dtype)?;
        let vt = Tensor::from_vec(new_v, (n_tok, kvh, d), &dev)?.to_dtype(dtype)?;
        let st = Tensor::from_vec(new_slots, n_tok, &dev)?;
        write_kv(&k_cache, &v_cache, &kt, &vt, &st)?;
        let mut meta = AttentionMetadata::new(seqs, bs, n_tok)?;
        for (start, len) in spans_at {
            meta.add_bidirectional_span(start, len)?;
        }
        assert_eq!(meta.has_bidirectional_spans(), spans);
        let meta = Arc::new(meta);
        let q = Tensor::from_vec(all_q, (n_tok, h, d), &dev)?.to_dtype(dtype)?;
        let out = paged_attention(&q, &k_cache, &v_cache, &meta, params)?;
        assert_eq!(out.dims(), &[n_tok, h, d]);
        assert_eq!(out.dtype(), dtype);
        let got = out.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let max = got
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max <= tol, "{dtype:?}: max abs diff {max} > {tol}");
        Ok(())
    }

    #[test]
    fn matches_dense_causal_attention_f32() -> Result<()> {
        check(DType::F32, 1e-5)
    }

    #[test]
    fn matches_dense_causal_attention_bf16() -> Result<()> {
        check(DType::BF16, 2e-2)
    }

    #[test]
    fn matches_dense_causal_attention_f16() -> Result<()> {
        check(DType::F16, 3e-3)
    }

    #[test]
    fn decode_groups_divide_the_kv_group_and_leave_a_task_per_thread() {
        // Qwen2.5-1.5B (12 heads over 2 kv heads), one decode row, 2 threads.
        assert_eq!(decode_group(6, 12, 2), 6);
        assert_eq!(decode_group(6, 12, 4), 3);
        assert_eq!(decode_group(6, 12, 12), 1);
        assert_eq!(decode_group(6, 12, 64), 1);
        assert_eq!(decode_group(7, 28, 2), 7);
        assert_eq!(decode_group(1, 32, 2), 1);
        assert_eq!(decode_group(32, 64, 1), 16);
    }

    /// A decode row's output has the same bits whether its query heads run
    /// one per task (many threads) or as one group (one thread).
    #[test]
    fn grouped_decode_heads_keep_their_bits() -> Result<()> {
        let dev = Device::Cpu;
        let (h, kvh, d, bs, ctx) = (8usize, 2usize, 64usize, 16usize, 37usize);
        let params = AttnParams {
            scale: 1.0 / (d as f32).sqrt(),
            window: None,
            softcap: None,
        };
        let mut rng = Rng(0x5eed);
        let nb = ctx.div_ceil(bs);
        let k_cache = alloc_kv_pool(nb, bs, kvh, d, DType::F32, &dev)?;
        let v_cache = alloc_kv_pool(nb, bs, kvh, d, DType::F32, &dev)?;
        let kv = |rng: &mut Rng| Tensor::from_vec(rng.vec(ctx * kvh * d), (ctx, kvh, d), &dev);
        let slots = Tensor::from_vec((0..ctx as u32).collect::<Vec<_>>(), ctx, &dev)?;
        write_kv(&k_cache, &v_cache, &kv(&mut rng)?, &kv(&mut rng)?, &slots)?;
        let seq = AttentionSeq {
            query_start: 0,
            query_len: 1,
            context_len: ctx,
            block_table: (0..nb as u32).collect(),
        };
        let meta = Arc::new(AttentionMetadata::new(vec![seq], bs, 1)?);
        let q = Tensor::from_vec(rng.vec(h * d), (1, h, d), &dev)?;
        let run = |threads: usize| -> Result<Vec<f32>> {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            pool.install(|| paged_attention(&q, &k_cache, &v_cache, &meta, params))?
                .flatten_all()?
                .to_vec1::<f32>()
        };
        assert_eq!(decode_group(h / kvh, h, 1), 4);
        assert_eq!(decode_group(h / kvh, h, 8), 1);
        let (grouped, alone) = (run(1)?, run(8)?);
        assert!(grouped
            .iter()
            .zip(&alone)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        Ok(())
    }

    /// Windows shorter than a block, spanning blocks, and longer than some
    /// contexts; on the per-row and the tiled kernels (a 70-token prefill
    /// with a window of 5 cuts every tile's keys); with softcapping.
    #[test]
    fn sliding_window_and_softcap_match_dense_attention() -> Result<()> {
        for w in [1, 3, 5, 17, 64] {
            check_with(DType::F32, 1e-5, Some(w), None, false)?;
        }
        check_with(DType::F32, 1e-5, None, Some(0.5), false)?;
        check_with(DType::F32, 1e-5, Some(6), Some(0.5), false)?;
        check_with(DType::BF16, 2e-2, Some(7), None, false)
    }

    /// Bidirectional spans inside decodes, short chunks (per-row kernel)
    /// and tiled prefills, alone and with a sliding window, which still cuts
    /// the keys before a token (transformers: window AND (causal OR span)).
    #[test]
    fn bidirectional_spans_match_dense_attention() -> Result<()> {
        check_with(DType::F32, 1e-5, None, None, true)?;
        for w in [3, 17] {
            check_with(DType::F32, 1e-5, Some(w), None, true)?;
        }
        check_with(DType::BF16, 2e-2, Some(5), Some(0.5), true)?;
        // A span must stay inside one sequence's new tokens.
        let seq = |start, len, ctx| AttentionSeq {
            query_start: start,
            query_len: len,
            context_len: ctx,
            block_table: vec![0, 1],
        };
        let mut m = AttentionMetadata::new(vec![seq(0, 3, 3), seq(3, 3, 3)], 4, 6)?;
        assert!(m.add_bidirectional_span(2, 2).is_err());
        assert!(m.add_bidirectional_span(4, 3).is_err());
        m.add_bidirectional_span(3, 3)?;
        assert_eq!(m.key_range(3, None), (0, 3));
        assert_eq!(m.key_range(1, None), (0, 2));
        Ok(())
    }

    /// A token whose window reaches a freed block fails instead of reading
    /// whatever the pool holds there; behind the window it is never read.
    #[test]
    fn a_freed_block_inside_the_window_is_an_error() -> Result<()> {
        let dev = Device::Cpu;
        let (kc, vc) = (
            alloc_kv_pool(4, 4, 1, 4, DType::F32, &dev)?,
            alloc_kv_pool(4, 4, 1, 4, DType::F32, &dev)?,
        );
        // A decode at position 9 (context 10) over blocks [freed, 1, 2].
        let meta = Arc::new(AttentionMetadata::new(
            vec![AttentionSeq {
                query_start: 0,
                query_len: 1,
                context_len: 10,
                block_table: vec![NULL_BLOCK, 1, 2],
            }],
            4,
            1,
        )?);
        let q = Tensor::ones((1, 1, 4), DType::F32, &dev)?;
        let with = |window| AttnParams {
            window,
            ..AttnParams::causal(0.5)
        };
        // Keys 4..=9 and 6..=9 skip block 0; 5 keys (5..=9) too; 7 reach it.
        for w in [4, 5, 6] {
            paged_attention(&q, &kc, &vc, &meta, with(Some(w)))?;
        }
        for w in [Some(7), Some(100), None] {
            let err = paged_attention(&q, &kc, &vc, &meta, with(w)).unwrap_err();
            assert!(err.to_string().contains("freed block"), "{err}");
        }
        Ok(())
    }

    #[test]
    fn write_kv_is_in_place_and_checks_slots() -> Result<()> {
        let dev = Device::Cpu;
        let cache = alloc_kv_pool(2, 4, 1, 2, DType::F32, &dev)?;
        let alias = cache.clone();
        let k = Tensor::new(&[[[1f32, 2.]], [[3., 4.]]], &dev)?;
        let slots = Tensor::new(&[5u32, 0], &dev)?;
        write_kv(&cache, &cache.clone(), &k, &k, &slots)?;
        let rows = alias.to_vec3::<f32>()?;
        assert_eq!(rows[5][0], vec![1., 2.]);
        assert_eq!(rows[0][0], vec![3., 4.]);
        assert_eq!(rows[1][0], vec![0., 0.]);
        let bad = Tensor::new(&[8u32, 0], &dev)?;
        let err = write_kv(&cache, &alias, &k, &k, &bad).unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
        Ok(())
    }

    #[test]
    fn metadata_rejects_bad_layouts() {
        let seq = |qs, ql, ctx, bt: Vec<u32>| AttentionSeq {
            query_start: qs,
            query_len: ql,
            context_len: ctx,
            block_table: bt,
        };
        assert!(AttentionMetadata::new(vec![seq(0, 3, 3, vec![0])], 4, 3).is_ok());
        // Block table too short.
        assert!(AttentionMetadata::new(vec![seq(0, 3, 5, vec![0])], 4, 3).is_err());
        // More new tokens than context.
        assert!(AttentionMetadata::new(vec![seq(0, 3, 2, vec![0])], 4, 3).is_err());
        // Gap between sequences.
        assert!(
            AttentionMetadata::new(vec![seq(0, 1, 1, vec![0]), seq(2, 1, 1, vec![1])], 4, 3)
                .is_err()
        );
        // Tokens not covered.
        assert!(AttentionMetadata::new(vec![seq(0, 2, 2, vec![0])], 4, 3).is_err());
    }

    #[test]
    fn out_of_range_block_is_an_error() -> Result<()> {
        let dev = Device::Cpu;
        let kc = alloc_kv_pool(2, 4, 1, 2, DType::F32, &dev)?;
        let vc = kc.zeros_like()?;
        let meta = Arc::new(AttentionMetadata::new(
            vec![AttentionSeq {
                query_start: 0,
                query_len: 1,
                context_len: 1,
                block_table: vec![7],
            }],
            4,
            1,
        )?);
        let q = Tensor::zeros((1, 1, 2), DType::F32, &dev)?;
        let err = paged_attention(&q, &kc, &vc, &meta, AttnParams::causal(1.0)).unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
        Ok(())
    }
}
