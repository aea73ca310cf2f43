//! Prompt rows of block-quantized matrices in integer arithmetic
//! ([`super::Activations::Int16`]): activations quantized to 15 bits per 32
//! values (14 per 64 where the scale block is 64), weights unpacked to their
//! exact integer values, products summed by `vpdpwssd` (AVX512-VNNI: 32
//! multiply-adds per instruction, twice an f32 FMA's 16) or by `vpmaddwd` +
//! `vpaddd` (AVX2: [`Kernel`]). CPUs with a bf16 matrix engine (AMX; Zen 4's
//! AVX512-BF16) keep that engine for prompt rows.
//!
//! Why 16 bits and not 8 (what decode rows and llama.cpp's prompts use):
//! 8-bit prompt activations turn SmolLM2-135M's answer to "What is the
//! capital of France?" into French (the `quant` module comment); their error
//! comes from the few rows with large outliers (the first tokens' residual
//! stream). At 15 bits a value is within `max|block| / 32766` of its own
//! (at 14, `/ 16382`), finer than bf16's rounding.
//!
//! Layout: a [`Panel`] holds [`NR`] weight rows as i16, so that row `r`'s
//! value is `s * w - mn` (`mn` per row and 32 values, 16 for Q2_K's mins:
//! [`offset_block`]; `s` per row and scale block: 32 values, or on AVX2 64
//! for the 256-value formats, whose sub-block scales are then folded into
//! `w`, as Q2_K's, Q3_K's and Q6_K's 16-value ones always are;
//! [`Kernel::scale_block`]), interleaved by pairs of values: one 512-bit
//! load holds one pair of 16 rows, and `vpdpwssd` with an activation row's
//! pair broadcast adds both products to each row's i32 lane. A register tile is 32 weight rows x [`MR`] activation
//! rows; each scale block's exact i32 sums are scaled once into f32
//! accumulators.
//! Every output element takes the same operations in the same order whatever
//! the number of rows, so a prompt row gets the same bits in any product of
//! more than 8 rows (fewer take the f32 kernels: unpacking the panels would
//! cost more than the products); the scalar kernel is the reference the
//! vector one is tested to equal bit for bit.

use rayon::prelude::*;

use super::int_dot::{iq4_values, iq4xs_scale, q3k, q3k_scale, q5_high, q6};
use super::{f16_at, scales_mins_k4, BlockType};

/// Values per sub-block: a weight offset (and with [`BK`]-value scale
/// blocks, a weight scale) per row, an activation `d * sum(q)` per row
/// (Q2_K's offsets: per [`OB_Q2K`]).
const BK: usize = 32;
/// Values per Q2_K offset (its mins are per 16 values).
const OB_Q2K: usize = 16;
/// Values per scale block of the 256-value formats on AVX2 (see
/// [`Kernel::scale_block`]).
const BK_WIDE: usize = 64;
/// Weight rows per panel: two 512-bit vectors of i32 lanes.
pub const NR: usize = 32;
/// Activation rows per register tile (2 x MR i32 and 2 x MR f32
/// accumulators of the 32 vector registers).
const MR: usize = 6;
/// The same for AVX2's 16 registers: 2 x MR i32 accumulators, the f32 ones
/// (touched once per block) in memory; 6 rows ran 5-20 % faster than 4 on
/// Zen 2.
const MR_AVX2: usize = 6;
/// Largest activation quant for scale blocks of `sb` values: the folded
/// weights reach 4096 (Q6_K's 128 x 32; IQ4_XS's 127 x 32 = 4064), and `sb`
/// products of 4096 x QMAX stay under 2^31 (32 x 16383, 64 x 8191).
fn qmax(sb: usize) -> f32 {
    if sb == BK_WIDE {
        8191.0
    } else {
        16383.0
    }
}

/// Values per weight offset of `dtype` (and per activation `d * sum(q)`).
pub fn offset_block(dtype: BlockType) -> usize {
    if dtype == BlockType::Q2K {
        OB_Q2K
    } else {
        BK
    }
}

/// A vector kernel of the product (the scalar one is the tests' reference
/// only: the f32 panels beat it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// `vpdpwssd` on 512-bit vectors: a register tile of 32 weight rows.
    Avx512Vnni,
    /// `vpmaddwd` + `vpaddd` on 256-bit vectors, each half of the panel (16
    /// weight rows) a register tile of its own. Where `vpmaddwd` issues on
    /// two ports (Intel's AVX2 cores) that is up to twice an f32 FMA's
    /// products per cycle; on Zen 2 (one port) it is the same, and the i16
    /// panels still halve the bytes the f32 ones unpack and hold.
    Avx2,
}

impl Kernel {
    /// Every vector kernel this CPU runs (tests check each).
    pub fn runnable() -> &'static [Kernel] {
        #[cfg(target_arch = "x86_64")]
        {
            use std::sync::OnceLock;
            static KERNELS: OnceLock<Vec<Kernel>> = OnceLock::new();
            KERNELS.get_or_init(|| {
                let mut v = Vec::new();
                if crate::cpu::has_avx512_vnni() && is_x86_feature_detected!("avx512bw") {
                    v.push(Kernel::Avx512Vnni);
                }
                if crate::cpu::has_avx2() {
                    v.push(Kernel::Avx2);
                }
                v
            })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            &[]
        }
    }
}

impl Kernel {
    /// Values per activation scale for `dtype`'s products. Each scale block
    /// ends in a conversion to f32 and a multiply-add per output; on AVX2,
    /// where those compete with `vpmaddwd` for the same port, the 256-value
    /// formats fold their sub-block scales into the integers (one f32 scale
    /// per super-block) and scale per [`BK_WIDE`] values (on Zen 2, 2-4 %
    /// more products per second; benchmark/profile-notes.md). Their offsets
    /// stay per [`offset_block`].
    pub fn scale_block(self, dtype: BlockType) -> usize {
        if self == Kernel::Avx2 && dtype.block_size() == 256 {
            BK_WIDE
        } else {
            BK
        }
    }
}

/// The kernel prompt rows take on this CPU: AVX512-VNNI's, else AVX2's
/// where there is no AVX-512 (with AVX-512F and no VNNI, as on Skylake-SP,
/// the f32 panels' 512-bit FMAs match `vpmaddwd`'s 256-bit rate).
pub fn kernel() -> Option<Kernel> {
    #[cfg(target_arch = "x86_64")]
    {
        let runs = |k| Kernel::runnable().contains(&k);
        if runs(Kernel::Avx512Vnni) {
            return Some(Kernel::Avx512Vnni);
        }
        if runs(Kernel::Avx2) && !is_x86_feature_detected!("avx512f") {
            return Some(Kernel::Avx2);
        }
    }
    None
}

/// Whether `dtype`'s blocks have an offset (`mn` not all zero).
fn has_offset(dtype: BlockType) -> bool {
    matches!(
        dtype,
        BlockType::Q4_1 | BlockType::Q5_1 | BlockType::Q2K | BlockType::Q4K | BlockType::Q5K
    )
}

/// `m` activation rows of `k` values (`k` a multiple of the scale block).
pub struct Q16Rows {
    k: usize,
    /// Values per scale block ([`Kernel::scale_block`]).
    sb: usize,
    q: Vec<i16>,
    /// Per scale block: the scale (value ~ `d * q`).
    d: Vec<f32>,
    /// Values per offset ([`offset_block`]).
    ob: usize,
    /// Per `ob` values: `d * sum(q)`, for the weights' offsets.
    dsum: Vec<f32>,
}

impl Q16Rows {
    /// Quantize `x` (`[m, k]` row-major) in scale blocks of `sb` values
    /// with `kernel`'s instructions (the values are the same with any): per
    /// block `d = max|x| / qmax(sb)`, `q = round(x / d)`; `d * sum(q)` per
    /// `ob` values.
    pub fn quantize(kernel: Kernel, x: &[f32], k: usize, sb: usize, ob: usize) -> Self {
        assert!(sb == BK || sb == BK_WIDE);
        assert!(ob == BK || ob == OB_Q2K);
        assert!(k.is_multiple_of(sb) && x.len().is_multiple_of(k.max(1)));
        assert!(Kernel::runnable().contains(&kernel));
        let mut q = vec![0i16; x.len()];
        let (mut d, mut dsum) = (vec![0f32; x.len() / sb], vec![0f32; x.len() / ob]);
        // Rows in parallel, about 256 KiB of input per task.
        let per_task = ((64 << 10) / k).max(1) * k;
        q.par_chunks_mut(per_task)
            .zip(d.par_chunks_mut(per_task / sb))
            .zip(dsum.par_chunks_mut(per_task / ob))
            .zip(x.par_chunks(per_task))
            .for_each(|(((q, d), dsum), x)| {
                // SAFETY: the CPU runs `kernel` (asserted above).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    match kernel {
                        Kernel::Avx512Vnni if sb == BK && ob == BK => {
                            quantize_avx512(q, d, dsum, x)
                        }
                        _ => quantize_avx2(q, d, dsum, x, sb, ob),
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                quantize_blocks(q, d, dsum, x, sb, ob)
            });
        Self {
            k,
            sb,
            q,
            d,
            ob,
            dsum,
        }
    }

    pub fn rows(&self) -> usize {
        self.q.len() / self.k.max(1)
    }

    /// Row `i`'s quants, block scales and `d * sum(q)` (the tiles read
    /// rows `i..` from there).
    fn row_ptrs(&self, i: usize) -> (*const i16, *const f32, *const f32) {
        (
            self.q[i * self.k..].as_ptr(),
            self.d[i * (self.k / self.sb)..].as_ptr(),
            self.dsum[i * (self.k / self.ob)..].as_ptr(),
        )
    }

    /// The values the kernels multiply (tests compare with them).
    #[cfg(test)]
    pub fn dequantized(&self) -> Vec<f32> {
        self.q
            .chunks_exact(self.sb)
            .zip(&self.d)
            .flat_map(|(qb, &d)| qb.iter().map(move |&q| q as f32 * d))
            .collect()
    }
}

/// `x` block by block (`sb` values) into `q`, its scales `d` and, per
/// `ob` values, `d * sum(q)`.
#[inline(always)]
fn quantize_blocks(
    q: &mut [i16],
    d: &mut [f32],
    dsum: &mut [f32],
    x: &[f32],
    sb: usize,
    ob: usize,
) {
    let qmax = qmax(sb);
    let blocks = q.chunks_exact_mut(sb).zip(x.chunks_exact(sb));
    for ((qb, xb), (d, dsum)) in blocks.zip(d.iter_mut().zip(dsum.chunks_exact_mut(sb / ob))) {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let inv = if amax > 0.0 { qmax / amax } else { 0.0 };
        *d = amax / qmax;
        for ((qs, xs), dsum) in qb.chunks_exact_mut(ob).zip(xb.chunks_exact(ob)).zip(dsum) {
            let mut sum = 0i32;
            for (q, v) in qs.iter_mut().zip(xs) {
                // Within qmax up to rounding; the clamp keeps it there.
                *q = (v * inv).round_ties_even().clamp(-qmax, qmax) as i16;
                sum += *q as i32;
            }
            *dsum = *d * sum as f32;
        }
    }
}

/// [`quantize_blocks`] compiled for AVX2 (vectorized rounding).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_avx2(
    q: &mut [i16],
    d: &mut [f32],
    dsum: &mut [f32],
    x: &[f32],
    sb: usize,
    ob: usize,
) {
    quantize_blocks(q, d, dsum, x, sb, ob)
}

/// [`quantize_blocks`] for [`BK`]-value scale and offset blocks in AVX-512 (the same
/// values: products rounded to nearest even, as the default MXCSR mode
/// converts).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_avx512(q: &mut [i16], d: &mut [f32], dsum: &mut [f32], x: &[f32]) {
    use std::arch::x86_64::*;
    let blocks = q.chunks_exact_mut(BK).zip(x.chunks_exact(BK));
    for ((qb, xb), (d, dsum)) in blocks.zip(d.iter_mut().zip(dsum)) {
        let x0 = _mm512_loadu_ps(xb.as_ptr());
        let x1 = _mm512_loadu_ps(xb.as_ptr().add(16));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
        let qmax = qmax(BK);
        let inv = _mm512_set1_ps(if amax > 0.0 { qmax / amax } else { 0.0 });
        let lim = qmax as i32;
        let round = |v: __m512| {
            let r = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));
            _mm512_max_epi32(
                _mm512_min_epi32(r, _mm512_set1_epi32(lim)),
                _mm512_set1_epi32(-lim),
            )
        };
        let (q0, q1) = (round(x0), round(x1));
        _mm256_storeu_si256(qb.as_mut_ptr().cast(), _mm512_cvtepi32_epi16(q0));
        _mm256_storeu_si256(qb.as_mut_ptr().add(16).cast(), _mm512_cvtepi32_epi16(q1));
        *d = amax / qmax;
        *dsum = *d * _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)) as f32;
    }
}

/// [`NR`] weight rows unpacked (see the module comment); rows past the
/// matrix's end are zero.
pub struct Panel {
    k: usize,
    /// Values per scale block ([`Kernel::scale_block`]).
    sb: usize,
    /// `[k / 2][NR][2]`.
    w: Vec<i16>,
    /// `[k / sb][NR]` scales and `[k / ob][NR]` offsets.
    s: Vec<f32>,
    mn: Vec<f32>,
    /// Values per offset ([`offset_block`]).
    ob: usize,
    offset: bool,
    /// One block of each row, unpacked before interleaving (rows past the
    /// matrix stay zero).
    block: Vec<i16>,
}

thread_local! {
    static PANEL: std::cell::RefCell<Panel> = std::cell::RefCell::new(Panel::new(0));
}

/// Runs `f` with this thread's panel, sized for rows of `k` values. It is
/// kept between products: fresh pages for every task's panel cost more than
/// unpacking it (the kernel clears them on first touch).
pub fn with_panel<R>(k: usize, f: impl FnOnce(&mut Panel) -> R) -> R {
    PANEL.with_borrow_mut(|panel| {
        if panel.k != k {
            panel.resize(k);
        }
        f(panel)
    })
}

impl Panel {
    fn new(k: usize) -> Self {
        let mut panel = Self {
            k: 0,
            sb: BK,
            w: Vec::new(),
            s: Vec::new(),
            mn: Vec::new(),
            ob: BK,
            offset: false,
            block: Vec::new(),
        };
        panel.resize(k);
        panel
    }

    /// For rows of `k` values; every value used is written by
    /// [`Self::fill`].
    fn resize(&mut self, k: usize) {
        self.k = k;
        self.w.resize(k * NR, 0);
        self.s.resize(k / BK * NR, 0.0);
        self.mn.resize(k / OB_Q2K * NR, 0.0);
    }

    /// Unpack the rows of `dtype` blocks in `rows` (whole rows of
    /// `row_bytes`, at most [`NR`]) for `kernel`'s scale blocks, one block
    /// of every row at a time so that the panel is written in order.
    /// `kernel`'s instructions unpack (the values are the same with any).
    pub fn fill(&mut self, kernel: Kernel, dtype: BlockType, rows: &[u8], row_bytes: usize) {
        assert!(Kernel::runnable().contains(&kernel));
        let sb = kernel.scale_block(dtype);
        // SAFETY: the CPU runs `kernel` (asserted above).
        #[cfg(target_arch = "x86_64")]
        unsafe {
            match kernel {
                Kernel::Avx512Vnni => x86::fill(self, dtype, rows, row_bytes, sb),
                Kernel::Avx2 => x86::fill_avx2(self, dtype, rows, row_bytes, sb),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        self.fill_with(dtype, rows, row_bytes, sb, unpack_block, interleave)
    }

    /// [`Self::fill`] for scale blocks of `sb` values with an unpacker (as
    /// [`unpack_block`]) and an interleaving of `[NR][bs]` values into
    /// `[bs / 2][NR][2]`.
    #[inline(always)]
    fn fill_with(
        &mut self,
        dtype: BlockType,
        rows: &[u8],
        row_bytes: usize,
        sb: usize,
        unpack: impl Fn(BlockType, &[u8], &mut [i16], &mut [f32], &mut [f32], usize),
        interleave: impl Fn(&[i16], usize, &mut [i16]),
    ) {
        let (bs, ts) = (dtype.block_size(), dtype.type_size());
        let used = rows.len() / row_bytes;
        debug_assert!(used <= NR && used * row_bytes == rows.len());
        debug_assert!(bs.is_multiple_of(sb) && self.k.is_multiple_of(sb));
        self.sb = sb;
        self.ob = offset_block(dtype);
        self.offset = has_offset(dtype);
        self.block.resize(NR * bs, 0);
        self.block.fill(0);
        let (ssub, sub) = (bs / sb, bs / self.ob);
        let (mut s, mut mn) = ([0f32; 8], [0f32; 256 / OB_Q2K]);
        for t in 0..self.k / bs {
            for (r, row) in rows.chunks_exact(row_bytes).enumerate() {
                let w = &mut self.block[r * bs..(r + 1) * bs];
                unpack(dtype, &row[t * ts..(t + 1) * ts], w, &mut s, &mut mn, sb);
                for j in 0..ssub {
                    self.s[(t * ssub + j) * NR + r] = s[j];
                }
                for j in 0..sub {
                    self.mn[(t * sub + j) * NR + r] = mn[j];
                }
            }
            interleave(&self.block, bs, &mut self.w[t * bs * NR..(t + 1) * bs * NR]);
        }
        for b in 0..self.k / sb {
            self.s[b * NR + used..(b + 1) * NR].fill(0.0);
        }
        for b in 0..self.k / self.ob {
            self.mn[b * NR + used..(b + 1) * NR].fill(0.0);
        }
    }
}

/// `[NR][bs]` values (a block of each row) as `[bs / 2][NR][2]`: pair p of
/// every row side by side.
#[inline(always)]
fn interleave(block: &[i16], bs: usize, out: &mut [i16]) {
    for (r, row) in block.chunks_exact(bs).enumerate() {
        for (src, dst) in row.chunks_exact(2).zip(out.chunks_exact_mut(2 * NR)) {
            dst[2 * r] = src[0];
            dst[2 * r + 1] = src[1];
        }
    }
}

/// One block of `dtype` (its `block_size` values) as `s * w - mn`, `s`
/// per `sb` values and `mn` per [`offset_block`], `w` exact integers. With `sb` past
/// [`BK`] (the 256-value formats only), the sub-block scales are folded
/// into `w` and `s` is the super-block's `d`.
#[inline(always)]
fn unpack_block(
    dtype: BlockType,
    blk: &[u8],
    w: &mut [i16],
    s: &mut [f32],
    mn: &mut [f32],
    sb: usize,
) {
    debug_assert!(sb == BK || dtype.block_size() == 256);
    let fold = sb > BK;
    mn.fill(0.0);
    let nibbles = |qs: &[u8], out: &mut [i16], sub: i16| {
        for (j, q) in qs.iter().enumerate() {
            out[j] = (q & 0x0F) as i16 - sub;
            out[j + 16] = (q >> 4) as i16 - sub;
        }
    };
    match dtype {
        BlockType::Q8_0 => {
            for (w, &q) in w.iter_mut().zip(&blk[2..34]) {
                *w = q as i8 as i16;
            }
            s[0] = f16_at(blk, 0);
        }
        BlockType::Q4_0 | BlockType::Q4_1 => {
            let q4_1 = dtype == BlockType::Q4_1;
            let qoff = if q4_1 { 4 } else { 2 };
            nibbles(&blk[qoff..qoff + 16], w, if q4_1 { 0 } else { 8 });
            s[0] = f16_at(blk, 0);
            if q4_1 {
                mn[0] = -f16_at(blk, 2);
            }
        }
        BlockType::Q5_0 | BlockType::Q5_1 => {
            let q5_1 = dtype == BlockType::Q5_1;
            let hoff = if q5_1 { 4 } else { 2 };
            let qh = u32::from_le_bytes([blk[hoff], blk[hoff + 1], blk[hoff + 2], blk[hoff + 3]]);
            nibbles(&blk[hoff + 4..hoff + 20], w, if q5_1 { 0 } else { 16 });
            for (j, w) in w.iter_mut().enumerate() {
                *w += q5_high(qh, j) as i16;
            }
            s[0] = f16_at(blk, 0);
            if q5_1 {
                mn[0] = -f16_at(blk, 2);
            }
        }
        BlockType::Iq4Nl => {
            iq4(&blk[2..18], w);
            s[0] = f16_at(blk, 0);
        }
        BlockType::Iq4Xs => {
            let d = f16_at(blk, 0);
            for (j, wb) in w.chunks_exact_mut(BK).enumerate() {
                iq4(&blk[8 + 16 * j..24 + 16 * j], wb);
                let sc = iq4xs_scale(blk, j);
                if fold {
                    wb.iter_mut().for_each(|w| *w *= sc as i16);
                } else {
                    s[j] = d * sc as f32;
                }
            }
            if fold {
                s[..256 / sb].fill(d);
            }
        }
        BlockType::Q4K | BlockType::Q5K => {
            let q5 = dtype == BlockType::Q5K;
            let qoff = if q5 { 48 } else { 16 };
            let folded = q4k_scales(blk, s, mn, sb);
            for (j, wb) in w.chunks_exact_mut(BK).enumerate() {
                // Sub-block 2c: low nibbles of qs[32c..][..32], 2c+1 the high
                // ones; Q5_K's bit 4 is bit j of qh[l].
                let q = &blk[qoff + 32 * (j / 2)..qoff + 32 * (j / 2) + 32];
                for (l, (w, q)) in wb.iter_mut().zip(q).enumerate() {
                    let lo = if j % 2 == 0 { q & 0x0F } else { q >> 4 };
                    let hi = if q5 { ((blk[16 + l] >> j) & 1) << 4 } else { 0 };
                    *w = folded[j] * (lo | hi) as i16;
                }
            }
        }
        BlockType::Q3K => {
            let d = f16_at(blk, 108);
            let scales: &[u8; 12] = blk[96..108].try_into().expect("12 scale bytes");
            for (g, wb) in w.chunks_exact_mut(BK).enumerate() {
                // The 16-value scales folded in.
                for (l, w) in wb.iter_mut().enumerate() {
                    *w = (q3k_scale(scales, 2 * g + l / 16) * q3k(blk, g, l)) as i16;
                }
            }
            s[..256 / sb].fill(d);
        }
        BlockType::Q6K => {
            let d = f16_at(blk, 208);
            for (half, wh) in w.chunks_exact_mut(128).enumerate() {
                let ql = &blk[64 * half..64 * half + 64];
                let qh = &blk[128 + 32 * half..160 + 32 * half];
                let sc = &blk[192 + 8 * half..200 + 8 * half];
                for (t, wb) in wh.chunks_exact_mut(BK).enumerate() {
                    // The 16-value scales folded in.
                    for (l, w) in wb.iter_mut().enumerate() {
                        let sc = (sc[2 * t + l / 16] as i8) as i16;
                        *w = sc * (q6(ql, qh, t, l) as i16 - 32);
                    }
                }
            }
            s[..256 / sb].fill(d);
        }
        BlockType::Q2K => {
            // Group g: bits 2(g % 4).. of qs[32(g / 4)..][..32]; the 4-bit
            // scales (low nibbles) folded in, the mins (high) per 16.
            let (d, dmin) = (f16_at(blk, 80), f16_at(blk, 82));
            for (g, wb) in w.chunks_exact_mut(BK).enumerate() {
                let q = &blk[16 + 32 * (g / 4)..16 + 32 * (g / 4) + 32];
                for (l, (w, q)) in wb.iter_mut().zip(q).enumerate() {
                    let sc = (blk[2 * g + l / 16] & 0x0F) as i16;
                    *w = sc * ((q >> (2 * (g % 4))) & 3) as i16;
                }
            }
            for (j, mn) in mn[..16].iter_mut().enumerate() {
                *mn = dmin * (blk[j] >> 4) as f32;
            }
            s[..256 / sb].fill(d);
        }
    }
}

/// A Q4_K or Q5_K block's scales per `sb` values and offsets per [`BK`]
/// into `s` and `mn`; returns the integer factors its sub-blocks' quants
/// take (their scales where `sb` folds them, else 1).
#[inline(always)]
fn q4k_scales(blk: &[u8], s: &mut [f32], mn: &mut [f32], sb: usize) -> [i16; 8] {
    let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
    let scales: &[u8; 12] = blk[4..16].try_into().expect("12 scale bytes");
    let (scs, mns) = scales_mins_k4(scales);
    for j in 0..8 {
        mn[j] = dmin * mns[j] as f32;
    }
    if sb > BK {
        s[..256 / sb].fill(d);
        scs.map(i16::from)
    } else {
        for j in 0..8 {
            s[j] = d * scs[j] as f32;
        }
        [1; 8]
    }
}

/// The 32 table values of 16 bytes of IQ4 index pairs.
fn iq4(qs: &[u8], out: &mut [i16]) {
    for (w, v) in out.iter_mut().zip(iq4_values(qs)) {
        *w = v as i16;
    }
}

/// Activation rows `rows` of `acts` times the panel's rows, with a vector
/// kernel: `out[(i - rows.start) * ldo + c]` for row `i` and column
/// `c < cols`.
///
/// # Safety
/// `kernel` must be one of [`Kernel::runnable`], `out` must hold
/// `rows.len()` rows of stride `ldo` with `cols` (at most [`NR`]) writable
/// values each, and `panel` must have `acts`' `k`.
pub unsafe fn multiply(
    kernel: Kernel,
    panel: &Panel,
    acts: &Q16Rows,
    rows: std::ops::Range<usize>,
    out: *mut f32,
    ldo: usize,
    cols: usize,
) {
    debug_assert!(cols <= NR && rows.end <= acts.rows());
    assert!(panel.k == acts.k && panel.sb == acts.sb);
    #[cfg(target_arch = "x86_64")]
    {
        let step = match kernel {
            Kernel::Avx512Vnni => MR,
            Kernel::Avx2 => MR_AVX2,
        };
        let mut i = rows.start;
        while i < rows.end {
            let mr = step.min(rows.end - i);
            let o = out.add((i - rows.start) * ldo);
            match kernel {
                Kernel::Avx512Vnni => match mr {
                    6 => x86::tile::<6>(panel, acts, i, o, ldo, cols),
                    5 => x86::tile::<5>(panel, acts, i, o, ldo, cols),
                    4 => x86::tile::<4>(panel, acts, i, o, ldo, cols),
                    3 => x86::tile::<3>(panel, acts, i, o, ldo, cols),
                    2 => x86::tile::<2>(panel, acts, i, o, ldo, cols),
                    _ => x86::tile::<1>(panel, acts, i, o, ldo, cols),
                },
                // Both halves for these rows while their activations are in L1.
                Kernel::Avx2 => {
                    for h in 0..cols.div_ceil(16) {
                        match mr {
                            6 => x86::tile_avx2::<6>(panel, acts, i, o, ldo, cols, h),
                            5 => x86::tile_avx2::<5>(panel, acts, i, o, ldo, cols, h),
                            4 => x86::tile_avx2::<4>(panel, acts, i, o, ldo, cols, h),
                            3 => x86::tile_avx2::<3>(panel, acts, i, o, ldo, cols, h),
                            2 => x86::tile_avx2::<2>(panel, acts, i, o, ldo, cols, h),
                            _ => x86::tile_avx2::<1>(panel, acts, i, o, ldo, cols, h),
                        }
                    }
                }
            }
            i += mr;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (kernel, panel, acts, rows, out, ldo, cols);
        unreachable!("no vector kernel off x86 (`Kernel::runnable`)");
    }
}

/// The scalar reference of [`multiply`] for activation row `i`: the same
/// f32 operations in the same order.
#[cfg(test)]
pub fn multiply_scalar(panel: &Panel, acts: &Q16Rows, i: usize) -> [f32; NR] {
    let (k, sb, ob) = (acts.k, panel.sb, panel.ob);
    let (nb, nsub) = (k / sb, k / ob);
    assert_eq!((sb, ob), (acts.sb, acts.ob));
    let a = &acts.q[i * k..(i + 1) * k];
    let mut f = [0f32; NR];
    for b in 0..nb {
        let da = acts.d[i * nb + b];
        for (r, f) in f.iter_mut().enumerate() {
            let sum: i32 = (b * sb..(b + 1) * sb)
                .map(|j| panel.w[(j / 2 * NR + r) * 2 + j % 2] as i32 * a[j] as i32)
                .sum();
            *f = (sum as f32).mul_add(panel.s[b * NR + r] * da, *f);
            if panel.offset {
                for u in b * sb / ob..(b + 1) * sb / ob {
                    *f = (-panel.mn[u * NR + r]).mul_add(acts.dsum[i * nsub + u], *f);
                }
            }
        }
    }
    f
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{BlockType, Panel, Q16Rows, BK, NR};

    /// [`Panel::fill`] compiled for AVX-512, with [`interleave`].
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn fill(
        panel: &mut Panel,
        dtype: BlockType,
        rows: &[u8],
        row_bytes: usize,
        sb: usize,
    ) {
        panel.fill_with(
            dtype,
            rows,
            row_bytes,
            sb,
            |dtype, blk, w, s, mn, sb| unsafe { unpack_block(dtype, blk, w, s, mn, sb) },
            |b, bs, o| unsafe { interleave(b, bs, o) },
        )
    }

    /// [`Panel::fill`] compiled for AVX2, with [`unpack_block_avx2`] (the
    /// scalar interleaving, vectorized by the compiler).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fill_avx2(
        panel: &mut Panel,
        dtype: BlockType,
        rows: &[u8],
        row_bytes: usize,
        sb: usize,
    ) {
        panel.fill_with(
            dtype,
            rows,
            row_bytes,
            sb,
            |dtype, blk, w, s, mn, sb| unsafe { unpack_block_avx2(dtype, blk, w, s, mn, sb) },
            super::interleave,
        )
    }

    /// [`super::unpack_block`] with 256-bit vectors for the K-quants and
    /// Q8_0; the others take the scalar one.
    #[target_feature(enable = "avx2")]
    unsafe fn unpack_block_avx2(
        dtype: BlockType,
        blk: &[u8],
        w: &mut [i16],
        s: &mut [f32],
        mn: &mut [f32],
        sb: usize,
    ) {
        // `mask` of each i16 lane of `v` shifted down by `shift` bits.
        let bits = |v: __m256i, shift: usize, mask: i16| {
            _mm256_and_si256(
                _mm256_srl_epi16(v, _mm_cvtsi32_si128(shift as i32)),
                _mm256_set1_epi16(mask),
            )
        };
        // 16 bytes at `at` as i16 lanes.
        let load =
            |at: usize| _mm256_cvtepu8_epi16(_mm_loadu_si128(blk[at..at + 16].as_ptr().cast()));
        let store = |w: &mut [i16], v: __m256i| _mm256_storeu_si256(w[..16].as_mut_ptr().cast(), v);
        let low4 = _mm256_set1_epi16(0x0F);
        match dtype {
            BlockType::Q8_0 => {
                for g in 0..2 {
                    let q = _mm_loadu_si128(blk[2 + 16 * g..18 + 16 * g].as_ptr().cast());
                    store(&mut w[16 * g..], _mm256_cvtepi8_epi16(q));
                }
                s[0] = super::f16_at(blk, 0);
                mn[0] = 0.0;
            }
            BlockType::Q4K | BlockType::Q5K => {
                let q5 = dtype == BlockType::Q5K;
                let qoff = if q5 { 48 } else { 16 };
                let folded = super::q4k_scales(blk, s, mn, sb);
                // Sub-blocks 2c and 2c + 1: low and high nibbles of qs[32c..];
                // Q5_K's bit 4 is bit 2c (2c + 1) of qh[l].
                for c in 0..4 {
                    let (lo, hi) = (
                        _mm256_set1_epi16(folded[2 * c]),
                        _mm256_set1_epi16(folded[2 * c + 1]),
                    );
                    for g in 0..2 {
                        let v = load(qoff + 32 * c + 16 * g);
                        let (mut ql, mut qh) =
                            (_mm256_and_si256(v, low4), _mm256_srli_epi16::<4>(v));
                        if q5 {
                            let h = load(16 + 16 * g);
                            let high = |j: usize| _mm256_slli_epi16::<4>(bits(h, j, 1));
                            ql = _mm256_or_si256(ql, high(2 * c));
                            qh = _mm256_or_si256(qh, high(2 * c + 1));
                        }
                        let at = 64 * c + 16 * g;
                        store(&mut w[at..], _mm256_mullo_epi16(ql, lo));
                        store(&mut w[at + 32..], _mm256_mullo_epi16(qh, hi));
                    }
                }
            }
            BlockType::Q2K => {
                let (d, dmin) = (super::f16_at(blk, 80), super::f16_at(blk, 82));
                for g in 0..8 {
                    for h in 0..2 {
                        // Values 16h.. of group g, times their 4-bit scale.
                        let q = bits(load(16 + 32 * (g / 4) + 16 * h), 2 * (g % 4), 3);
                        let scale = _mm256_set1_epi16((blk[2 * g + h] & 0x0F) as i16);
                        store(&mut w[32 * g + 16 * h..], _mm256_mullo_epi16(scale, q));
                    }
                }
                for (j, mn) in mn[..16].iter_mut().enumerate() {
                    *mn = dmin * (blk[j] >> 4) as f32;
                }
                s[..256 / sb].fill(d);
            }
            BlockType::Q3K => {
                let d = super::f16_at(blk, 108);
                let scales: &[u8; 12] = blk[96..108].try_into().expect("12 scale bytes");
                let four = _mm256_set1_epi16(4);
                for g in 0..8 {
                    for h in 0..2 {
                        // Values 16h.. of group g: `int_dot::q3k`'s bits.
                        let lo = bits(load(32 + 32 * (g / 4) + 16 * h), 2 * (g % 4), 3);
                        let hb = bits(load(16 * h), g, 1);
                        let q =
                            _mm256_sub_epi16(_mm256_or_si256(lo, _mm256_slli_epi16::<2>(hb)), four);
                        let scale = _mm256_set1_epi16(super::q3k_scale(scales, 2 * g + h) as i16);
                        store(&mut w[32 * g + 16 * h..], _mm256_mullo_epi16(scale, q));
                    }
                }
                s[..256 / sb].fill(d);
                mn[..8].fill(0.0);
            }
            BlockType::Q6K => {
                let d = super::f16_at(blk, 208);
                for half in 0..2 {
                    let sc = &blk[192 + 8 * half..200 + 8 * half];
                    for t in 0..4 {
                        for g in 0..2 {
                            // Values 16g.. of group t: `int_dot::q6`'s bits.
                            let ql = load(64 * half + 32 * (t % 2) + 16 * g);
                            let lo = if t < 2 {
                                _mm256_and_si256(ql, low4)
                            } else {
                                _mm256_srli_epi16::<4>(ql)
                            };
                            let hi = bits(load(128 + 32 * half + 16 * g), 2 * t, 3);
                            let q = _mm256_sub_epi16(
                                _mm256_or_si256(lo, _mm256_slli_epi16::<4>(hi)),
                                _mm256_set1_epi16(32),
                            );
                            let scale = _mm256_set1_epi16(sc[2 * t + g] as i8 as i16);
                            store(
                                &mut w[128 * half + 32 * t + 16 * g..],
                                _mm256_mullo_epi16(scale, q),
                            );
                        }
                    }
                }
                s[..256 / sb].fill(d);
                mn[..8].fill(0.0);
            }
            _ => super::unpack_block(dtype, blk, w, s, mn, sb),
        }
    }

    /// [`super::unpack_block`] with 512-bit vectors for the types of
    /// llama.cpp's Q4_K_M and Q8_0 files (Q4_K, Q6_K, Q8_0) in [`BK`]-value
    /// scale blocks; the others take the scalar one.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn unpack_block(
        dtype: BlockType,
        blk: &[u8],
        w: &mut [i16],
        s: &mut [f32],
        mn: &mut [f32],
        sb: usize,
    ) {
        if sb != BK {
            return super::unpack_block(dtype, blk, w, s, mn, sb);
        }
        let load =
            |at: usize| _mm512_cvtepu8_epi16(_mm256_loadu_si256(blk[at..at + 32].as_ptr().cast()));
        let store = |w: &mut [i16], v: __m512i| _mm512_storeu_si512(w[..32].as_mut_ptr().cast(), v);
        let low4 = _mm512_set1_epi16(0x0F);
        match dtype {
            BlockType::Q8_0 => {
                let q = _mm256_loadu_si256(blk[2..34].as_ptr().cast());
                store(w, _mm512_cvtepi8_epi16(q));
                s[0] = super::f16_at(blk, 0);
                mn[0] = 0.0;
            }
            BlockType::Q4K => {
                super::q4k_scales(blk, s, mn, BK);
                // Sub-blocks 2c and 2c + 1: low and high nibbles of qs[32c..].
                for c in 0..4 {
                    let v = load(16 + 32 * c);
                    store(&mut w[64 * c..], _mm512_and_si512(v, low4));
                    store(&mut w[64 * c + 32..], _mm512_srli_epi16::<4>(v));
                }
            }
            BlockType::Q6K => {
                let d = super::f16_at(blk, 208);
                for half in 0..2 {
                    let ql = [load(64 * half), load(64 * half + 32)];
                    let qh = load(128 + 32 * half);
                    let sc = &blk[192 + 8 * half..200 + 8 * half];
                    for t in 0..4 {
                        let lo = if t < 2 {
                            _mm512_and_si512(ql[t % 2], low4)
                        } else {
                            _mm512_srli_epi16::<4>(ql[t % 2])
                        };
                        let hi = _mm512_and_si512(
                            _mm512_srl_epi16(qh, _mm_cvtsi32_si128(2 * t as i32)),
                            _mm512_set1_epi16(3),
                        );
                        let q = _mm512_sub_epi16(
                            _mm512_or_si512(lo, _mm512_slli_epi16::<4>(hi)),
                            _mm512_set1_epi16(32),
                        );
                        // Values 0..16 take scale 2t, 16..32 scale 2t + 1.
                        let scale = _mm512_inserti64x4::<1>(
                            _mm512_set1_epi16(sc[2 * t] as i8 as i16),
                            _mm256_set1_epi16(sc[2 * t + 1] as i8 as i16),
                        );
                        store(&mut w[128 * half + 32 * t..], _mm512_mullo_epi16(scale, q));
                    }
                }
                s[..8].fill(d);
                mn[..8].fill(0.0);
            }
            _ => super::unpack_block(dtype, blk, w, s, mn, sb),
        }
    }

    /// [`super::interleave`] as 16 x 16 transposes of i32 pairs: each
    /// 16-row half of the panel, 16 pairs (32 values) at a time.
    #[target_feature(enable = "avx512f")]
    unsafe fn interleave(block: &[i16], bs: usize, out: &mut [i16]) {
        assert!(block.len() >= NR * bs && out.len() >= NR * bs && bs.is_multiple_of(BK));
        for c in 0..bs / BK {
            for h in 0..2 {
                let src = |i: usize| block.as_ptr().add((16 * h + i) * bs + BK * c);
                let r: [__m512i; 16] = std::array::from_fn(|i| _mm512_loadu_si512(src(i).cast()));
                // Pairs of rows, then fours: lane L of x[4g + j] holds pair
                // 4L + j of rows 4g..4g + 4.
                let t: [__m512i; 16] = std::array::from_fn(|i| {
                    let (a, b) = (r[i & !1], r[i | 1]);
                    if i % 2 == 0 {
                        _mm512_unpacklo_epi32(a, b)
                    } else {
                        _mm512_unpackhi_epi32(a, b)
                    }
                });
                let x: [__m512i; 16] = std::array::from_fn(|i| {
                    // x[4g + j]: j = 0, 1 from t[4g], t[4g + 2]; j = 2, 3
                    // from t[4g + 1], t[4g + 3].
                    let (g, j) = (i / 4, i % 4);
                    let (a, b) = (t[4 * g + j / 2], t[4 * g + 2 + j / 2]);
                    if j % 2 == 0 {
                        _mm512_unpacklo_epi64(a, b)
                    } else {
                        _mm512_unpackhi_epi64(a, b)
                    }
                });
                for j in 0..4 {
                    // Lanes 0, 2 (0x88) or 1, 3 (0xdd) of rows 0..8, 8..16.
                    let lo_even = _mm512_shuffle_i32x4::<0x88>(x[j], x[4 + j]);
                    let lo_odd = _mm512_shuffle_i32x4::<0xdd>(x[j], x[4 + j]);
                    let hi_even = _mm512_shuffle_i32x4::<0x88>(x[8 + j], x[12 + j]);
                    let hi_odd = _mm512_shuffle_i32x4::<0xdd>(x[8 + j], x[12 + j]);
                    // Pair 4L + j for L = 0, 2, 1, 3.
                    let cols = [
                        (0, _mm512_shuffle_i32x4::<0x88>(lo_even, hi_even)),
                        (2, _mm512_shuffle_i32x4::<0xdd>(lo_even, hi_even)),
                        (1, _mm512_shuffle_i32x4::<0x88>(lo_odd, hi_odd)),
                        (3, _mm512_shuffle_i32x4::<0xdd>(lo_odd, hi_odd)),
                    ];
                    for (l, v) in cols {
                        let p = BK / 2 * c + 4 * l + j;
                        _mm512_storeu_si512(out.as_mut_ptr().add((p * NR + 16 * h) * 2).cast(), v);
                    }
                }
            }
        }
    }

    /// Activation rows `i0..i0 + M` times the panel into `out` (row `i0`'s
    /// output; stride `ldo`, `cols` columns).
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn tile<const M: usize>(
        panel: &Panel,
        acts: &Q16Rows,
        i0: usize,
        out: *mut f32,
        ldo: usize,
        cols: usize,
    ) {
        let (k, sb, ob) = (acts.k, panel.sb, panel.ob);
        let (nb, nsub) = (k / sb, k / ob);
        let (a, d, dsum) = acts.row_ptrs(i0);
        let w = panel.w.as_ptr();
        let mut f = [[_mm512_setzero_ps(); 2]; M];
        for b in 0..nb {
            let mut acc = [[_mm512_setzero_si512(); 2]; M];
            for p in b * sb / 2..(b + 1) * sb / 2 {
                let wp = w.add(p * NR * 2);
                let w0 = _mm512_loadu_si512(wp.cast());
                let w1 = _mm512_loadu_si512(wp.add(NR).cast());
                for (i, acc) in acc.iter_mut().enumerate() {
                    // The pair of values 2p, 2p+1 of row i, in every lane.
                    let pair = a.add(i * k + 2 * p).cast::<i32>().read_unaligned();
                    let av = _mm512_set1_epi32(pair);
                    acc[0] = _mm512_dpwssd_epi32(acc[0], av, w0);
                    acc[1] = _mm512_dpwssd_epi32(acc[1], av, w1);
                }
            }
            let s = [
                _mm512_loadu_ps(panel.s.as_ptr().add(b * NR)),
                _mm512_loadu_ps(panel.s.as_ptr().add(b * NR + 16)),
            ];
            for i in 0..M {
                let da = _mm512_set1_ps(*d.add(i * nb + b));
                for h in 0..2 {
                    let sum = _mm512_cvtepi32_ps(acc[i][h]);
                    f[i][h] = _mm512_fmadd_ps(sum, _mm512_mul_ps(s[h], da), f[i][h]);
                }
            }
            if panel.offset {
                for u in b * sb / ob..(b + 1) * sb / ob {
                    let mn = [
                        _mm512_loadu_ps(panel.mn.as_ptr().add(u * NR)),
                        _mm512_loadu_ps(panel.mn.as_ptr().add(u * NR + 16)),
                    ];
                    for i in 0..M {
                        let ds = _mm512_set1_ps(*dsum.add(i * nsub + u));
                        for h in 0..2 {
                            f[i][h] = _mm512_fnmadd_ps(mn[h], ds, f[i][h]);
                        }
                    }
                }
            }
        }
        let mask = |h: usize| -> __mmask16 {
            let n = cols.saturating_sub(16 * h).min(16);
            ((1u32 << n) - 1) as __mmask16
        };
        for (i, f) in f.iter().enumerate() {
            for (h, v) in f.iter().enumerate() {
                _mm512_mask_storeu_ps(out.add(i * ldo + 16 * h), mask(h), *v);
            }
        }
    }

    /// Activation rows `i0..i0 + M` times the panel's rows `16 h..16 h + 16`
    /// into `out` (row `i0`'s output, column 0; stride `ldo`, `cols` columns
    /// in all): [`tile`]'s operations in 256-bit vectors, `vpmaddwd` and
    /// `vpaddd` for `vpdpwssd` (the same exact i32 sums).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_avx2<const M: usize>(
        panel: &Panel,
        acts: &Q16Rows,
        i0: usize,
        out: *mut f32,
        ldo: usize,
        cols: usize,
        h: usize,
    ) {
        let (k, sb, ob) = (acts.k, panel.sb, panel.ob);
        let (nb, nsub) = (k / sb, k / ob);
        let (a, d, dsum) = acts.row_ptrs(i0);
        // Pair p of rows 16h.. starts at (p * NR + 16h) * 2.
        let w = panel.w.as_ptr().add(32 * h);
        let mut f = [[_mm256_setzero_ps(); 2]; M];
        for b in 0..nb {
            let mut acc = [[_mm256_setzero_si256(); 2]; M];
            for p in b * sb / 2..(b + 1) * sb / 2 {
                let wp = w.add(p * NR * 2);
                let w0 = _mm256_loadu_si256(wp.cast());
                let w1 = _mm256_loadu_si256(wp.add(16).cast());
                for (i, acc) in acc.iter_mut().enumerate() {
                    let pair = a.add(i * k + 2 * p).cast::<i32>().read_unaligned();
                    let av = _mm256_set1_epi32(pair);
                    acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(av, w0));
                    acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(av, w1));
                }
            }
            let at = b * NR + 16 * h;
            let s = [
                _mm256_loadu_ps(panel.s.as_ptr().add(at)),
                _mm256_loadu_ps(panel.s.as_ptr().add(at + 8)),
            ];
            for i in 0..M {
                let da = _mm256_set1_ps(*d.add(i * nb + b));
                for j in 0..2 {
                    let sum = _mm256_cvtepi32_ps(acc[i][j]);
                    f[i][j] = _mm256_fmadd_ps(sum, _mm256_mul_ps(s[j], da), f[i][j]);
                }
            }
            if panel.offset {
                for u in b * sb / ob..(b + 1) * sb / ob {
                    let at = u * NR + 16 * h;
                    let mn = [
                        _mm256_loadu_ps(panel.mn.as_ptr().add(at)),
                        _mm256_loadu_ps(panel.mn.as_ptr().add(at + 8)),
                    ];
                    for i in 0..M {
                        let ds = _mm256_set1_ps(*dsum.add(i * nsub + u));
                        for j in 0..2 {
                            f[i][j] = _mm256_fnmadd_ps(mn[j], ds, f[i][j]);
                        }
                    }
                }
            }
        }
        let n = cols.saturating_sub(16 * h).min(16);
        for (i, f) in f.iter().enumerate() {
            let o = out.add(i * ldo + 16 * h);
            if n == 16 {
                _mm256_storeu_ps(o, f[0]);
                _mm256_storeu_ps(o.add(8), f[1]);
            } else {
                let mut v = [0f32; 16];
                _mm256_storeu_ps(v.as_mut_ptr(), f[0]);
                _mm256_storeu_ps(v.as_mut_ptr().add(8), f[1]);
                std::ptr::copy_nonoverlapping(v.as_ptr(), o, n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random rows of whole `dtype` blocks with f16
    /// scales kept small and finite.
    fn random_rows(dtype: BlockType, n: usize, k: usize, seed: u64) -> Vec<u8> {
        let bytes = dtype.row_bytes(n, k).unwrap();
        let mut v: Vec<u8> = (0..bytes as u64)
            .map(|i| ((i + seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
            .collect();
        // Every f16 field (scales, mins) of a block set to a small value.
        let scale = half::f16::from_f32(0.01).to_le_bytes();
        let fields: &[usize] = match dtype {
            BlockType::Q4K | BlockType::Q5K => &[0, 2],
            BlockType::Q2K => &[80, 82],
            BlockType::Q3K => &[108],
            BlockType::Q6K => &[208],
            BlockType::Q4_1 | BlockType::Q5_1 => &[0, 2],
            _ => &[0],
        };
        for blk in v.chunks_exact_mut(dtype.type_size()) {
            for &f in fields {
                blk[f..f + 2].copy_from_slice(&scale);
            }
        }
        v
    }

    /// The scale blocks `dtype` unpacks to (one per kernel choice).
    fn scale_blocks(dtype: BlockType) -> Vec<usize> {
        if dtype.block_size() == 256 {
            vec![BK, BK_WIDE]
        } else {
            vec![BK]
        }
    }

    /// Unpacked rows are the row decoders' values: `s * w - mn` is what
    /// `BlockMatrix::dequantize_row` gives (to f32 rounding of the product).
    #[test]
    fn panels_hold_the_decoded_values() -> candle_core::Result<()> {
        let k = 512;
        for dtype in BlockType::ALL {
            let n = 3;
            let raw = random_rows(dtype, n, k, 7);
            let rb = dtype.row_bytes(1, k).unwrap();
            let bm = super::super::BlockMatrix::read(dtype, n, k, |dst| {
                dst.copy_from_slice(&raw);
                Ok(())
            })?;
            let ob = offset_block(dtype);
            let (mut w, mut s, mut mn) = (vec![0i16; k], vec![0f32; k / BK], vec![0f32; k / ob]);
            let mut want = vec![0f32; k];
            let (bs, ts) = (dtype.block_size(), dtype.type_size());
            for sb in scale_blocks(dtype) {
                for r in 0..n {
                    for (t, blk) in raw[r * rb..(r + 1) * rb].chunks_exact(ts).enumerate() {
                        let (b, u) = (t * bs / sb, t * bs / ob);
                        unpack_block(
                            dtype,
                            blk,
                            &mut w[t * bs..(t + 1) * bs],
                            &mut s[b..b + bs / sb],
                            &mut mn[u..u + bs / ob],
                            sb,
                        );
                    }
                    bm.dequantize_row(r, &mut want)?;
                    for j in 0..k {
                        let got = s[j / sb] * w[j] as f32 - mn[j / ob];
                        let tol = 1e-6 * (1.0 + want[j].abs());
                        assert!(
                            (got - want[j]).abs() <= tol,
                            "{dtype:?} scale block {sb} row {r} value {j}: {got} vs {}",
                            want[j]
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// [`Q16Rows::quantize`] with the scalar quantizer.
    fn scalar_rows(x: &[f32], k: usize, sb: usize, ob: usize) -> Q16Rows {
        let mut rows = Q16Rows {
            k,
            sb,
            q: vec![0; x.len()],
            d: vec![0.0; x.len() / sb],
            ob,
            dsum: vec![0.0; x.len() / ob],
        };
        quantize_blocks(&mut rows.q, &mut rows.d, &mut rows.dsum, x, sb, ob);
        rows
    }

    /// Activations within half a step of their values, and each vector
    /// quantizer's bits the scalar one's.
    #[test]
    fn activations_round_to_nearest() {
        let k = 256;
        let mut x: Vec<f32> = (0..3 * k)
            .map(|i| ((i * 7919 % 1013) as f32 / 500.0 - 1.0).powi(3))
            .collect();
        x[5] = 900.0; // an outlier block
        x[k..k + BK_WIDE].fill(0.0); // an all-zero block
        for (sb, ob) in [BK, BK_WIDE]
            .into_iter()
            .flat_map(|sb| [(sb, BK), (sb, OB_Q2K)])
        {
            let want = scalar_rows(&x, k, sb, ob);
            let xq = want.dequantized();
            for ((xb, qb), &d) in x.chunks_exact(sb).zip(xq.chunks_exact(sb)).zip(&want.d) {
                for (v, q) in xb.iter().zip(qb) {
                    assert!((v - q).abs() <= d * 0.5001, "{v} as {q} (step {d})");
                }
            }
            // `d * sum(q)` per ob values.
            for (j, qs) in want.q.chunks_exact(ob).enumerate() {
                let sum: i32 = qs.iter().map(|&q| q as i32).sum();
                assert_eq!(want.dsum[j], want.d[j * ob / sb] * sum as f32);
            }
            for &kernel in Kernel::runnable() {
                let acts = Q16Rows::quantize(kernel, &x, k, sb, ob);
                assert_eq!(
                    (&acts.q, &acts.d, &acts.dsum),
                    (&want.q, &want.d, &want.dsum),
                    "{kernel:?} scale block {sb}, offsets per {ob}"
                );
            }
        }
    }

    /// The product is the dequantized weights times the dequantized
    /// activations (scalar reference, each scale block), the vector kernels
    /// are its bits, and a row's output does not depend on which rows share
    /// its step.
    #[test]
    fn vector_kernel_is_the_scalar_reference() {
        let k = 768;
        for dtype in BlockType::ALL {
            let n = 29; // a partial panel
            let raw = random_rows(dtype, n, k, 3);
            let rb = dtype.row_bytes(1, k).unwrap();
            let m = 13;
            let x: Vec<f32> = (0..m * k)
                .map(|i| {
                    ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * if i % 97 == 0 { 60.0 } else { 1.0 }
                })
                .collect();
            let mut wrow = vec![0f32; k];
            let bm = super::super::BlockMatrix::read(dtype, n, k, |dst| {
                dst.copy_from_slice(&raw);
                Ok(())
            })
            .unwrap();
            for sb in scale_blocks(dtype) {
                let mut panel = Panel::new(k);
                panel.fill_with(dtype, &raw, rb, sb, unpack_block, interleave);
                let acts = scalar_rows(&x, k, sb, offset_block(dtype));
                let xq = acts.dequantized();
                for i in 0..m {
                    let got = multiply_scalar(&panel, &acts, i);
                    for (c, &g) in got.iter().enumerate().take(n) {
                        bm.dequantize_row(c, &mut wrow).unwrap();
                        let want: f64 = wrow
                            .iter()
                            .zip(&xq[i * k..])
                            .map(|(&w, &a)| w as f64 * a as f64)
                            .sum();
                        let mag: f64 = wrow
                            .iter()
                            .zip(&xq[i * k..])
                            .map(|(&w, &a)| (w as f64 * a as f64).abs())
                            .sum();
                        assert!(
                            (g as f64 - want).abs() <= 1e-5 * mag + 1e-6,
                            "{dtype:?} scale block {sb} row {i} col {c}: {g} vs {want}"
                        );
                    }
                    assert!(got[n..].iter().all(|&v| v == 0.0));
                }
                for &kernel in Kernel::runnable()
                    .iter()
                    .filter(|k| k.scale_block(dtype) == sb)
                {
                    // The vector unpacking and interleaving are the scalar ones' values.
                    let mut vector = Panel::new(k);
                    vector.fill(kernel, dtype, &raw, rb);
                    let nb = k / sb;
                    assert!(
                        vector.w == panel.w
                            && vector.s[..nb * NR] == panel.s[..nb * NR]
                            && vector.mn == panel.mn,
                        "{kernel:?} {dtype:?}: vector panel differs"
                    );
                    // All rows at once, then each alone: the scalar reference's bits.
                    let mut out = vec![f32::NAN; m * 40];
                    // SAFETY: runnable; out holds m rows of stride 40 >= n columns.
                    unsafe { multiply(kernel, &panel, &acts, 0..m, out.as_mut_ptr(), 40, n) };
                    for i in 0..m {
                        let want = multiply_scalar(&panel, &acts, i);
                        assert_eq!(
                            &out[i * 40..i * 40 + n],
                            &want[..n],
                            "{kernel:?} {dtype:?} row {i}"
                        );
                        assert!(
                            out[i * 40 + n..(i + 1) * 40].iter().all(|v| v.is_nan()),
                            "{kernel:?} wrote past cols"
                        );
                        let mut alone = vec![0f32; NR];
                        // SAFETY: as above, one row of NR columns.
                        unsafe {
                            multiply(kernel, &panel, &acts, i..i + 1, alone.as_mut_ptr(), NR, NR)
                        };
                        assert_eq!(
                            &alone[..n],
                            &want[..n],
                            "{kernel:?} {dtype:?} row {i} alone"
                        );
                    }
                }
            }
        }
    }

    /// The largest folded weights (Q6_K: scale -128 times quant -32) times
    /// the largest activation quants, over a whole scale block, stay exact
    /// in i32 with every kernel.
    #[test]
    fn extreme_products_do_not_overflow() {
        let k = 256;
        let mut blk = vec![0u8; 210]; // quants 0 - 32
        blk[192..208].fill(0x80); // scales -128
        blk[208..210].copy_from_slice(&half::f16::from_f32(0.25).to_le_bytes());
        let x = vec![-1.0f32; k];
        // Each value (-128 * -32 * 0.25 = 1024) times -1.
        let want = -1024.0 * k as f32;
        for &kernel in Kernel::runnable() {
            let sb = kernel.scale_block(BlockType::Q6K);
            let acts = Q16Rows::quantize(kernel, &x, k, sb, BK);
            let mut panel = Panel::new(k);
            panel.fill(kernel, BlockType::Q6K, &blk, 210);
            let mut out = [0f32; 1];
            // SAFETY: runnable; one output row of one column.
            unsafe { multiply(kernel, &panel, &acts, 0..1, out.as_mut_ptr(), 1, 1) };
            assert!(
                (out[0] - want).abs() <= 1e-5 * want.abs(),
                "{kernel:?}: {}",
                out[0]
            );
        }
    }
}
