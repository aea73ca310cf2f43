//! Block-quantized (GGUF) matrices on CPU.
//!
//! The matrix stays in its GGUF block format (copied once, 8-aligned). How
//! a product sees its input rows is its [`Activations`]:
//!
//! - `Int8` (decode rows, `weights::Role::Body`): the activations are
//!   quantized to 8 bits per weight block once (`q8`) and dotted with the
//!   weight blocks in integer arithmetic (`int_dot`: AVX512-VNNI or
//!   AVX-VNNI `vpdpbusd`, AVX2 `vpmaddubsw`, or scalar, picked at run
//!   time), as ggml does, for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K to Q6_K,
//!   IQ4_NL and IQ4_XS ([`BlockType`]).
//! - `Bf16` (prompt and encoder rows): panels of weight rows are decoded to
//!   bf16 and multiplied on a bf16 engine ([`crate::panel_gemm`]: AMX, or
//!   AVX512-BF16 where it pays) where the CPU has one; elsewhere as `F32`.
//! - `Int16` (prompt and encoder rows without a bf16 engine): the
//!   activations are quantized to 15 bits per 32 values (on AVX2, 14 per 64
//!   for the 256-value formats) and multiplied with
//!   the weights' exact integer values (`i16_gemm`: AVX512-VNNI `vpdpwssd`,
//!   twice the products per instruction of an f32 FMA, or AVX2 `vpmaddwd`
//!   without AVX-512); elsewhere as `F32`.
//! - `F32` (the logits, and fallbacks): f32 dot products straight off the
//!   blocks for one or two rows, each weight row decoded once for up to
//!   eight, and above panels of decoded rows through AVX-512 or AVX2 FMAs
//!   ([`crate::panel_gemm`]) or, in portable code, L2-sized tiles through
//!   the f32 GEMM of the `gemm` crate (the one candle uses).
//!
//! - `Int8Top` (the logits of decode rows): `Int8` products for the whole
//!   vocabulary, then every row that may be the largest (its 8-bit value
//!   within the error bound of the best) recomputed as `F32` does it.
//!
//! The logits' top is never left to 8-bit activations alone: with them,
//! SmolLM2-135M Q4_1 answers "What is the capital of France?" with French
//! word salad ("L'Étoile, la Cité, la Nation, ..."; llama.cpp, which
//! quantizes them too, also answers in French on that file:
//! benchmark/profile-notes.md), where f32 logits keep "The capital of France
//! is Paris." (the `smollm2` test). 8-bit activations in the other matrices
//! of decode steps keep that answer; in the 37-token prompt step they do not
//! (French again, from the few rows with large outliers), so prompt rows
//! never take 8-bit activations; 16-bit ones (`Int16`) keep the answer.
//!
//! Inner loops are compiled for the baseline target and for AVX2+FMA+F16C
//! (picked at run time), so release builds without `-C target-cpu` still
//! use wide vectors. k-quant rows are decoded by candle's block decoders.

mod i16_gemm;
mod int_dot;
pub use int_dot::iq4xs_scale;
#[cfg(target_arch = "x86_64")]
mod int_dot_x86;
mod q8;

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, GgmlType,
};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{bail, DType, Device, Result, Tensor};
use half::f16;
use rayon::prelude::*;

/// The block formats a [`BlockMatrix`] holds: candle's GGUF block types,
/// and llama.cpp's IQ4 types, which candle does not know (4-bit indices
/// into a fixed table of 16 int8 values, see [`IQ4_VALUES`]).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockType {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    /// Blocks of 32: f16 `d`, 16 bytes of index pairs (value `d * table[i]`).
    Iq4Nl,
    /// Super-blocks of 256: f16 `d`, 6-bit sub-scales `ls` per 32 (u16 of
    /// high bits, 4 bytes of low ones), 128 bytes of index pairs (value
    /// `d * (ls - 32) * table[i]`).
    Iq4Xs,
}

/// llama.cpp's `kvalues_iq4nl`: the values an IQ4 index stands for.
pub const IQ4_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

impl BlockType {
    /// Every block type.
    pub const ALL: [Self; 12] = [
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q2K,
        Self::Q3K,
        Self::Q4K,
        Self::Q5K,
        Self::Q6K,
        Self::Iq4Nl,
        Self::Iq4Xs,
    ];

    /// candle's type of the same name, for the types it has.
    pub fn of_ggml(dtype: GgmlDType) -> Option<Self> {
        use GgmlDType as G;
        Some(match dtype {
            G::Q4_0 => Self::Q4_0,
            G::Q4_1 => Self::Q4_1,
            G::Q5_0 => Self::Q5_0,
            G::Q5_1 => Self::Q5_1,
            G::Q8_0 => Self::Q8_0,
            G::Q2K => Self::Q2K,
            G::Q3K => Self::Q3K,
            G::Q4K => Self::Q4K,
            G::Q5K => Self::Q5K,
            G::Q6K => Self::Q6K,
            _ => return None,
        })
    }

    /// Values per block.
    pub fn block_size(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 | Self::Iq4Nl => 32,
            _ => 256,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            Self::Q4_0 | Self::Iq4Nl => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q2K => 84,
            Self::Q3K => 110,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
            Self::Iq4Xs => 136,
        }
    }

    /// Bytes of `rows` rows of `k` values; `None` where a row is not whole
    /// blocks (or the size overflows).
    pub fn row_bytes(self, rows: usize, k: usize) -> Option<usize> {
        k.is_multiple_of(self.block_size()).then_some(())?;
        rows.checked_mul(k / self.block_size())?
            .checked_mul(self.type_size())
    }
}

/// Input rows up to which products with f32 activations take Q4_0 / Q4_1 /
/// Q8_0 / Q4_K / Q6_K dot products straight off the blocks.
const FUSED_MAX_M: usize = 2;
/// Up to this many input rows, each weight row is decoded once into an L1
/// buffer and dotted with every input row; beyond it, tiles + GEMM win.
/// Measured on 2 cores with each path forced (`npm run bench -- profile
/// --no-perf --batches 4,8,16`, threshold overridden for the A/B):
/// row decoding leads at 4 rows, ties at 8 and trails by 10-25 % at 16
/// (SmolLM2 Q4_1 and the 0.5B Q8_0 alike).
const ROW_DECODE_MAX_M: usize = 8;
/// f32 elements of one dequantized weight tile (256 KiB, about L2).
const TILE_ELEMS: usize = 64 << 10;

/// How a product sees its input rows (see the module comment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activations {
    /// Quantized to 8 bits per weight block for the integer kernels.
    Int8,
    /// Rounded to bf16 for the bf16 matrix engine (where the CPU has one).
    Bf16,
    /// Kept f32.
    F32,
    /// Prompt and encoder rows where the CPU has no bf16 engine: above 8
    /// rows, quantized to 15 bits per 32 values (14 per 64: see
    /// [`i16_gemm::Kernel::scale_block`]) for the integer prompt
    /// kernel ([`i16_gemm`]) where the CPU has it (AVX512-VNNI, or AVX2
    /// without AVX-512); elsewhere as `F32`.
    Int16,
    /// The logits of decode rows: `Int8` for every weight row, then the
    /// rows that may still be the largest recomputed as `F32` does for one
    /// row (see [`BlockMatrix::matmul_f32`]).
    Int8Top,
}

/// The integer prompt kernel [`Activations::Int16`] products take on this
/// CPU, if any (every block format unpacks to its panels).
pub fn int16_kernel() -> Option<i16_gemm::Kernel> {
    i16_gemm::kernel()
}

/// A `[n, k]` weight matrix in a GGUF block format.
pub struct BlockMatrix {
    dtype: BlockType,
    n: usize,
    k: usize,
    row_bytes: usize,
    /// Raw blocks, row after row; u64 storage keeps block structs aligned.
    data: Vec<u64>,
    /// Per row, the sum of its values' magnitudes (bounds an 8-bit
    /// product's error: [`Activations::Int8Top`]); made at load
    /// ([`BlockMatrix::prepare_logits`]) or on first use.
    row_l1: std::sync::OnceLock<Vec<f32>>,
}

impl std::fmt::Debug for BlockMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockMatrix")
            .field("dtype", &self.dtype)
            .field("shape", &(self.n, self.k))
            .finish()
    }
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Decode one row of legacy 32-element blocks into `out` (k floats).
#[inline(always)]
fn decode_legacy(dtype: BlockType, row: &[u8], out: &mut [f32]) {
    match dtype {
        BlockType::Q4_0 => {
            for (blk, o) in row.chunks_exact(18).zip(out.chunks_exact_mut(32)) {
                let d = f16_at(blk, 0);
                let qs = &blk[2..18];
                let (lo, hi) = o.split_at_mut(16);
                for j in 0..16 {
                    lo[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
                    hi[j] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        BlockType::Q4_1 => {
            for (blk, o) in row.chunks_exact(20).zip(out.chunks_exact_mut(32)) {
                let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
                let qs = &blk[4..20];
                let (lo, hi) = o.split_at_mut(16);
                for j in 0..16 {
                    lo[j] = (qs[j] & 0x0F) as f32 * d + m;
                    hi[j] = (qs[j] >> 4) as f32 * d + m;
                }
            }
        }
        BlockType::Q5_0 => {
            for (blk, o) in row.chunks_exact(22).zip(out.chunks_exact_mut(32)) {
                let d = f16_at(blk, 0);
                let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
                let qs = &blk[6..22];
                let (lo, hi) = o.split_at_mut(16);
                for j in 0..16 {
                    let h0 = (((qh >> j) << 4) & 0x10) as u8;
                    let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                    lo[j] = (((qs[j] & 0x0F) | h0) as i32 - 16) as f32 * d;
                    hi[j] = (((qs[j] >> 4) | h1) as i32 - 16) as f32 * d;
                }
            }
        }
        BlockType::Q5_1 => {
            for (blk, o) in row.chunks_exact(24).zip(out.chunks_exact_mut(32)) {
                let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
                let qh = u32::from_le_bytes([blk[4], blk[5], blk[6], blk[7]]);
                let qs = &blk[8..24];
                let (lo, hi) = o.split_at_mut(16);
                for j in 0..16 {
                    let h0 = (((qh >> j) << 4) & 0x10) as u8;
                    let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                    lo[j] = ((qs[j] & 0x0F) | h0) as f32 * d + m;
                    hi[j] = ((qs[j] >> 4) | h1) as f32 * d + m;
                }
            }
        }
        BlockType::Q8_0 => {
            for (blk, o) in row.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
                let d = f16_at(blk, 0);
                for (o, &q) in o.iter_mut().zip(&blk[2..34]) {
                    *o = (q as i8) as f32 * d;
                }
            }
        }
        _ => {}
    }
}

/// Walk a row of IQ4_NL or IQ4_XS blocks: `put(scale, 16 index bytes, 32
/// outputs)` for every 32 values, the scale being the block's `d`
/// (IQ4_XS: `d` times the sub-block's scale).
#[inline(always)]
fn iq4_blocks(
    dtype: BlockType,
    row: &[u8],
    out: &mut [f32],
    mut put: impl FnMut(f32, &[u8], &mut [f32]),
) {
    match dtype {
        BlockType::Iq4Nl => {
            for (blk, o) in row.chunks_exact(18).zip(out.chunks_exact_mut(32)) {
                put(f16_at(blk, 0), &blk[2..18], o);
            }
        }
        BlockType::Iq4Xs => {
            for (blk, o) in row.chunks_exact(136).zip(out.chunks_exact_mut(256)) {
                let d = f16_at(blk, 0);
                for (j, o) in o.chunks_exact_mut(32).enumerate() {
                    let dl = d * int_dot::iq4xs_scale(blk, j) as f32;
                    put(dl, &blk[8 + 16 * j..8 + 16 * j + 16], o);
                }
            }
        }
        _ => unreachable!("iq4_blocks: {dtype:?}"),
    }
}

/// Decode one row of IQ4_NL or IQ4_XS blocks into `out` (k floats): each
/// value is its scale times its table entry.
#[inline(always)]
fn decode_iq4(dtype: BlockType, row: &[u8], out: &mut [f32]) {
    iq4_blocks(dtype, row, out, |d, qs, o| {
        let (lo, hi) = o.split_at_mut(16);
        for j in 0..16 {
            lo[j] = IQ4_VALUES[(qs[j] & 0x0F) as usize] as f32 * d;
            hi[j] = IQ4_VALUES[(qs[j] >> 4) as usize] as f32 * d;
        }
    })
}

/// AVX2 [`decode_iq4`]: the table looked up 16 bytes at a time
/// (`vpshufb`); bit-identical (one product each).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `row` holds whole blocks of
/// `dtype` and `out` has room for them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_iq4_avx2(dtype: BlockType, row: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let table = _mm_loadu_si128(IQ4_VALUES.as_ptr() as *const __m128i);
    let mask = _mm_set1_epi8(0x0F);
    // 32 values of 16 index pairs, times d, into o[..32].
    let put = |d: f32, qs: &[u8], o: &mut [f32]| unsafe {
        let q = _mm_loadu_si128(qs[..16].as_ptr() as *const __m128i);
        let lo = _mm_shuffle_epi8(table, _mm_and_si128(q, mask));
        let hi = _mm_shuffle_epi8(table, _mm_and_si128(_mm_srli_epi16(q, 4), mask));
        let vd = _mm256_set1_ps(d);
        let op = o[..32].as_mut_ptr();
        for (i, v) in [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)]
            .into_iter()
            .enumerate()
        {
            let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
            _mm256_storeu_ps(op.add(8 * i), _mm256_mul_ps(f, vd));
        }
    };
    iq4_blocks(dtype, row, out, put)
}

/// Decode a row of k-quant blocks with candle's decoders.
///
/// # Safety
/// `row` must hold whole `B` blocks and be aligned for `B` (2 bytes).
unsafe fn decode_kquant<B: GgmlType>(row: &[u8], out: &mut [f32]) {
    let n = row.len() / std::mem::size_of::<B>();
    let blocks = std::slice::from_raw_parts(row.as_ptr() as *const B, n);
    B::to_float(blocks, out);
}

#[cfg(target_arch = "x86_64")]
use crate::cpu::has_avx2;
use crate::cpu::SendPtr;

/// AVX2 decode of Q4_0 / Q4_1 / Q8_0 rows: bytes widen straight to f32 lanes
/// (8 at a time) instead of element by element; bit-identical to
/// [`decode_legacy`] (same products and sums, one rounding each).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `row` holds whole blocks of
/// `dtype` and `out` has room for them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_legacy_avx2(dtype: BlockType, row: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::*;
    // Widen the low 8 bytes of `v` to 8 f32 lanes.
    #[inline(always)]
    unsafe fn u8x8(v: __m128i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
    }
    match dtype {
        BlockType::Q4_0 | BlockType::Q4_1 => {
            let (bsz, qoff) = if dtype == BlockType::Q4_0 {
                (18, 2)
            } else {
                (20, 4)
            };
            let mask = _mm_set1_epi8(0x0F);
            for (blk, o) in row.chunks_exact(bsz).zip(out.chunks_exact_mut(32)) {
                let d = f16_at(blk, 0);
                // Q4_0 decodes as (q - 8) * d, Q4_1 as q * d + m.
                let m = if dtype == BlockType::Q4_0 {
                    0.0
                } else {
                    f16_at(blk, 2)
                };
                let (vd, vm) = (_mm256_set1_ps(d), _mm256_set1_ps(m));
                let q = _mm_loadu_si128(blk[qoff..qoff + 16].as_ptr() as *const __m128i);
                let lo = _mm_and_si128(q, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
                let op = o.as_mut_ptr();
                let parts = [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)];
                for (i, p) in parts.into_iter().enumerate() {
                    let f = u8x8(p);
                    // Same operations, in the same order, as the scalar path.
                    let v = if dtype == BlockType::Q4_0 {
                        _mm256_mul_ps(_mm256_sub_ps(f, _mm256_set1_ps(8.0)), vd)
                    } else {
                        _mm256_add_ps(_mm256_mul_ps(f, vd), vm)
                    };
                    _mm256_storeu_ps(op.add(i * 8), v);
                }
            }
        }
        BlockType::Q8_0 => {
            for (blk, o) in row.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
                let vd = _mm256_set1_ps(f16_at(blk, 0));
                let op = o.as_mut_ptr();
                for i in 0..4 {
                    let q = _mm_loadl_epi64(blk[2 + i * 8..].as_ptr() as *const __m128i);
                    let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                    _mm256_storeu_ps(op.add(i * 8), _mm256_mul_ps(f, vd));
                }
            }
        }
        d => decode_legacy(d, row, out),
    }
}

/// AVX2 decode of K-quant rows (prompt rows decode every weight once per
/// panel; candle's scalar decoders cost Q4_K_M prompts a quarter of their
/// rate): bit-identical to candle's `to_float` (same products and
/// differences in the same order, one rounding each).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `row` holds whole blocks of
/// `dtype` and `out` has room for them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_kquant_avx2(dtype: BlockType, row: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::*;
    // Bytes `at..at + 8` of `b` as 8 i32 lanes.
    #[inline(always)]
    unsafe fn u8x8(b: &[u8], at: usize) -> __m256i {
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(b[at..at + 8].as_ptr() as *const __m128i))
    }
    match dtype {
        BlockType::Q4K | BlockType::Q5K => {
            let q5 = dtype == BlockType::Q5K;
            let (bsz, qoff) = if q5 { (176, 48) } else { (144, 16) };
            let (nib, one) = (_mm256_set1_epi32(0x0F), _mm256_set1_epi32(1));
            for (blk, o) in row.chunks_exact(bsz).zip(out.chunks_exact_mut(256)) {
                let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                let Ok(scales) = <&[u8; 12]>::try_from(&blk[4..16]) else {
                    continue;
                };
                let (sc, mn) = scales_mins_k4(scales);
                let op = o.as_mut_ptr();
                for j in 0..4 {
                    // 64 values: the low nibbles of qs[32j..32j + 32] are
                    // sub-block 2j, the high ones 2j + 1; Q5_K's bit 4 is
                    // bit 2j (2j + 1) of qh[l].
                    let (s1, m1) = (sc[2 * j] as f32, mn[2 * j] as f32);
                    let (s2, m2) = (sc[2 * j + 1] as f32, mn[2 * j + 1] as f32);
                    let (d1, m1) = (_mm256_set1_ps(d * s1), _mm256_set1_ps(dmin * m1));
                    let (d2, m2) = (_mm256_set1_ps(d * s2), _mm256_set1_ps(dmin * m2));
                    for c in 0..4 {
                        let q = u8x8(blk, qoff + 32 * j + 8 * c);
                        let (mut lo, mut hi) = (_mm256_and_si256(q, nib), _mm256_srli_epi32(q, 4));
                        if q5 {
                            let h = u8x8(blk, 16 + 8 * c);
                            let bit = |b: i32| {
                                let v = _mm256_srlv_epi32(h, _mm256_set1_epi32(b));
                                _mm256_slli_epi32(_mm256_and_si256(v, one), 4)
                            };
                            lo = _mm256_or_si256(lo, bit(2 * j as i32));
                            hi = _mm256_or_si256(hi, bit(2 * j as i32 + 1));
                        }
                        _mm256_storeu_ps(
                            op.add(64 * j + 8 * c),
                            _mm256_sub_ps(_mm256_mul_ps(d1, _mm256_cvtepi32_ps(lo)), m1),
                        );
                        _mm256_storeu_ps(
                            op.add(64 * j + 32 + 8 * c),
                            _mm256_sub_ps(_mm256_mul_ps(d2, _mm256_cvtepi32_ps(hi)), m2),
                        );
                    }
                }
            }
        }
        BlockType::Q2K | BlockType::Q3K => {
            // 8 groups of 32 values: bits 2(g % 4).. of qs[32(g / 4)..][..32]
            // (Q3_K: minus 4 where bit g of hmask[l] is clear), with a scale
            // per 16 values (Q2_K: and a min).
            let q3 = dtype == BlockType::Q3K;
            let (bsz, qoff) = if q3 { (110, 32) } else { (84, 16) };
            let (three, one) = (_mm256_set1_epi32(3), _mm256_set1_epi32(1));
            for (blk, o) in row.chunks_exact(bsz).zip(out.chunks_exact_mut(256)) {
                let d = f16_at(blk, if q3 { 108 } else { 80 });
                let dmin = if q3 { 0.0 } else { f16_at(blk, 82) };
                let q3_scales: Option<&[u8; 12]> =
                    q3.then(|| blk[96..108].try_into().expect("12 scale bytes"));
                let op = o.as_mut_ptr();
                for g in 0..8 {
                    let shift = _mm256_set1_epi32(2 * (g % 4) as i32);
                    for c in 0..4 {
                        let j = 2 * g + c / 2;
                        let raw = u8x8(blk, qoff + 32 * (g / 4) + 8 * c);
                        let q = _mm256_and_si256(_mm256_srlv_epi32(raw, shift), three);
                        let v = match q3_scales {
                            Some(scales) => {
                                let h = _mm256_srlv_epi32(
                                    u8x8(blk, 8 * c),
                                    _mm256_set1_epi32(g as i32),
                                );
                                // Minus 4 where the bit is clear.
                                let clear = _mm256_andnot_si256(h, one);
                                let q = _mm256_sub_epi32(q, _mm256_slli_epi32(clear, 2));
                                let dl = _mm256_set1_ps(d * int_dot::q3k_scale(scales, j) as f32);
                                _mm256_mul_ps(dl, _mm256_cvtepi32_ps(q))
                            }
                            None => {
                                let sc = blk[j];
                                let dl = _mm256_set1_ps(d * (sc & 0x0F) as f32);
                                let ml = _mm256_set1_ps(dmin * (sc >> 4) as f32);
                                _mm256_sub_ps(_mm256_mul_ps(dl, _mm256_cvtepi32_ps(q)), ml)
                            }
                        };
                        _mm256_storeu_ps(op.add(32 * g + 8 * c), v);
                    }
                }
            }
        }
        BlockType::Q6K => {
            let (nib, two, off) = (
                _mm256_set1_epi32(0x0F),
                _mm256_set1_epi32(3),
                _mm256_set1_epi32(32),
            );
            for (blk, o) in row.chunks_exact(210).zip(out.chunks_exact_mut(256)) {
                let d = f16_at(blk, 208);
                let op = o.as_mut_ptr();
                for half in 0..2 {
                    // ql 64 bytes, qh 32 and 8 scales per 128 values.
                    let (ql, qh, sc) = (64 * half, 128 + 32 * half, 192 + 8 * half);
                    for l in (0..32).step_by(8) {
                        let is = l / 16;
                        let (a, b, h) =
                            (u8x8(blk, ql + l), u8x8(blk, ql + l + 32), u8x8(blk, qh + l));
                        let q = |low: __m256i, shift: i32| {
                            let hb = _mm256_and_si256(
                                _mm256_srlv_epi32(h, _mm256_set1_epi32(shift)),
                                two,
                            );
                            let v = _mm256_or_si256(low, _mm256_slli_epi32(hb, 4));
                            _mm256_cvtepi32_ps(_mm256_sub_epi32(v, off))
                        };
                        let vals = [
                            q(_mm256_and_si256(a, nib), 0),
                            q(_mm256_and_si256(b, nib), 2),
                            q(_mm256_srli_epi32(a, 4), 4),
                            q(_mm256_srli_epi32(b, 4), 6),
                        ];
                        for (t, v) in vals.into_iter().enumerate() {
                            let scale = _mm256_set1_ps(d * (blk[sc + is + 2 * t] as i8) as f32);
                            _mm256_storeu_ps(
                                op.add(128 * half + 32 * t + l),
                                _mm256_mul_ps(scale, v),
                            );
                        }
                    }
                }
            }
        }
        _ => unreachable!("decode_kquant_avx2: {dtype:?}"),
    }
}

/// Sums of each 32-element block of `x` (for the offset terms of Q4_0/Q4_1).
fn block_sums(x: &[f32]) -> Vec<f32> {
    x.chunks(32).map(|c| c.iter().sum()).collect()
}

/// One row of Q4_0/Q4_1/Q8_0/Q4_K/Q6_K blocks dotted with `x`, without
/// materialising the row: `sum_b d_b * sum_j q_bj x_bj + offset_b * sum_j x_bj`.
#[inline(always)]
fn fused_row_dot(dtype: BlockType, row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut offs = 0f32;
    match dtype {
        BlockType::Q4_1 => {
            for ((blk, xb), xs) in row.chunks_exact(20).zip(x.chunks_exact(32)).zip(xsum) {
                let (Ok(qs), Ok(xb)) = (
                    <&[u8; 16]>::try_from(&blk[4..20]),
                    <&[f32; 32]>::try_from(xb),
                ) else {
                    continue;
                };
                let d = f16_at(blk, 0);
                for j in 0..16 {
                    acc[j] += (qs[j] & 0x0F) as f32 * (xb[j] * d)
                        + (qs[j] >> 4) as f32 * (xb[j + 16] * d);
                }
                offs += f16_at(blk, 2) * xs;
            }
        }
        BlockType::Q4_0 => {
            for ((blk, xb), xs) in row.chunks_exact(18).zip(x.chunks_exact(32)).zip(xsum) {
                let (Ok(qs), Ok(xb)) = (
                    <&[u8; 16]>::try_from(&blk[2..18]),
                    <&[f32; 32]>::try_from(xb),
                ) else {
                    continue;
                };
                let d = f16_at(blk, 0);
                for j in 0..16 {
                    acc[j] += (qs[j] & 0x0F) as f32 * (xb[j] * d)
                        + (qs[j] >> 4) as f32 * (xb[j + 16] * d);
                }
                offs -= 8.0 * d * xs;
            }
        }
        BlockType::Q8_0 => {
            for (blk, xb) in row.chunks_exact(34).zip(x.chunks_exact(32)) {
                let (Ok(qs), Ok(xb)) = (
                    <&[u8; 32]>::try_from(&blk[2..34]),
                    <&[f32; 32]>::try_from(xb),
                ) else {
                    continue;
                };
                let d = f16_at(blk, 0);
                for j in 0..16 {
                    acc[j] += (qs[j] as i8) as f32 * (xb[j] * d)
                        + (qs[j + 16] as i8) as f32 * (xb[j + 16] * d);
                }
            }
        }
        BlockType::Q4K => return fused_q4k(row, x, xsum),
        BlockType::Q6K => return fused_q6k(row, x),
        _ => {}
    }
    let mut s = 0f32;
    for a in acc {
        s += a;
    }
    s + offs
}

/// The 8 scales and the 8 mins (6 bits each) of a Q4_K/Q5_K block, index
/// `j` for sub-block `j`, unpacked with word operations: scales 0..4 and
/// mins 0..4 are the low 6 bits of bytes 0..4 and 4..8; 4..8 take their low
/// 4 bits from the nibbles of bytes 8..12 and their high 2 from the top bits
/// of bytes 0..4 and 4..8.
#[inline(always)]
fn scales_mins_k4(q: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let w = |i: usize| u32::from_le_bytes([q[i], q[i + 1], q[i + 2], q[i + 3]]);
    let (w0, w1, w2) = (w(0), w(4), w(8));
    let (low6, low4, top2) = (0x3f3f_3f3f, 0x0f0f_0f0f, 0x0303_0303);
    let scales_hi = (w2 & low4) | (((w0 >> 6) & top2) << 4);
    let mins_hi = ((w2 >> 4) & low4) | (((w1 >> 6) & top2) << 4);
    let join = |lo: u32, hi: u32| (lo as u64 | (hi as u64) << 32).to_le_bytes();
    (join(w0 & low6, scales_hi), join(w1 & low6, mins_hi))
}

/// A row of Q4_K super-blocks (256 values: 8 sub-blocks of 32 with 6-bit
/// scales and mins) dotted with `x`.
#[inline(always)]
fn fused_q4k(row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    let mut acc = [0f32; 32];
    let mut offs = 0f32;
    for ((blk, xb), xs) in row
        .chunks_exact(144)
        .zip(x.chunks_exact(256))
        .zip(xsum.chunks_exact(8))
    {
        let (Ok(scales), Ok(qs)) = (
            <&[u8; 12]>::try_from(&blk[4..16]),
            <&[u8; 128]>::try_from(&blk[16..144]),
        ) else {
            continue;
        };
        let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
        let (sc, mn) = scales_mins_k4(scales);
        for c in 0..4 {
            let (sc1, m1) = (sc[2 * c] as f32, mn[2 * c] as f32);
            let (sc2, m2) = (sc[2 * c + 1] as f32, mn[2 * c + 1] as f32);
            let (d1, d2) = (d * sc1, d * sc2);
            let (Ok(q), Ok(x0), Ok(x1)) = (
                <&[u8; 32]>::try_from(&qs[32 * c..32 * c + 32]),
                <&[f32; 32]>::try_from(&xb[64 * c..64 * c + 32]),
                <&[f32; 32]>::try_from(&xb[64 * c + 32..64 * c + 64]),
            ) else {
                continue;
            };
            for l in 0..32 {
                acc[l] += (q[l] & 0x0F) as f32 * (x0[l] * d1) + (q[l] >> 4) as f32 * (x1[l] * d2);
            }
            offs -= dmin * (m1 * xs[2 * c] + m2 * xs[2 * c + 1]);
        }
    }
    let mut s = 0f32;
    for a in acc {
        s += a;
    }
    s + offs
}

/// A row of Q6_K super-blocks (256 values: 16 sub-blocks of 16 with i8
/// scales, 6-bit quants split in low nibbles and high 2-bit pairs) dotted
/// with `x`.
#[inline(always)]
fn fused_q6k(row: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    for (blk, xb) in row.chunks_exact(210).zip(x.chunks_exact(256)) {
        let d = f16_at(blk, 208);
        for half in 0..2 {
            let ql = &blk[64 * half..64 * half + 64];
            let qh = &blk[128 + 32 * half..128 + 32 * half + 32];
            let sc = &blk[192 + 8 * half..192 + 8 * half + 8];
            let xh = &xb[128 * half..128 * half + 128];
            for g in 0..2 {
                let s = |i: usize| d * (sc[g + i] as i8) as f32;
                let (s0, s2, s4, s6) = (s(0), s(2), s(4), s(6));
                let (Ok(qa), Ok(qb), Ok(h)) = (
                    <&[u8; 16]>::try_from(&ql[16 * g..16 * g + 16]),
                    <&[u8; 16]>::try_from(&ql[32 + 16 * g..32 + 16 * g + 16]),
                    <&[u8; 16]>::try_from(&qh[16 * g..16 * g + 16]),
                ) else {
                    continue;
                };
                let (Ok(x0), Ok(x1), Ok(x2), Ok(x3)) = (
                    <&[f32; 16]>::try_from(&xh[16 * g..16 * g + 16]),
                    <&[f32; 16]>::try_from(&xh[32 + 16 * g..32 + 16 * g + 16]),
                    <&[f32; 16]>::try_from(&xh[64 + 16 * g..64 + 16 * g + 16]),
                    <&[f32; 16]>::try_from(&xh[96 + 16 * g..96 + 16 * g + 16]),
                ) else {
                    continue;
                };
                for l in 0..16 {
                    let q1 = ((qa[l] & 0x0F) | ((h[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((qb[l] & 0x0F) | (((h[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((qa[l] >> 4) | (((h[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((qb[l] >> 4) | (((h[l] >> 6) & 3) << 4)) as i32 - 32;
                    acc[l] += q1 as f32 * (x0[l] * s0)
                        + q2 as f32 * (x1[l] * s2)
                        + q3 as f32 * (x2[l] * s4)
                        + q4 as f32 * (x3[l] * s6);
                }
            }
        }
    }
    let mut s = 0f32;
    for a in acc {
        s += a;
    }
    s
}

fn has_fused(dtype: BlockType) -> bool {
    matches!(
        dtype,
        BlockType::Q4_0 | BlockType::Q4_1 | BlockType::Q8_0 | BlockType::Q4K | BlockType::Q6K
    )
}

/// Weight rows `r0..r0 + nr` dotted with each of the `m` rows of `x` (for
/// fused types): writes `dst[i * n + r]`. A weight row stays in L1 while it
/// meets every input row.
#[inline(always)]
fn rows_dot_fused(
    mat: &BlockMatrix,
    r0: usize,
    nr: usize,
    x: &[f32],
    xsum: &[f32],
    m: usize,
    dst: SendPtr,
) {
    let bytes = mat.bytes();
    let (k, n) = (mat.k, mat.n);
    let nb = xsum.len() / m.max(1);
    for r in r0..r0 + nr {
        let row = &bytes[r * mat.row_bytes..(r + 1) * mat.row_bytes];
        for i in 0..m {
            let v = fused_row_dot(
                mat.dtype,
                row,
                &x[i * k..(i + 1) * k],
                &xsum[i * nb..(i + 1) * nb],
            );
            // SAFETY: i < m and r < n index the [m, n] output; each task owns its rows r.
            unsafe { *dst.get().add(i * n + r) = v };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_dot_fused_avx2(
    mat: &BlockMatrix,
    r0: usize,
    nr: usize,
    x: &[f32],
    xsum: &[f32],
    m: usize,
    dst: SendPtr,
) {
    if !matches!(
        mat.dtype,
        BlockType::Q4_0 | BlockType::Q4_1 | BlockType::Q8_0
    ) {
        return rows_dot_fused(mat, r0, nr, x, xsum, m, dst);
    }
    let bytes = mat.bytes();
    let (k, n) = (mat.k, mat.n);
    let nb = k / 32;
    for r in r0..r0 + nr {
        let row = &bytes[r * mat.row_bytes..(r + 1) * mat.row_bytes];
        for i in 0..m {
            let v = legacy_row_dot_avx2(
                mat.dtype,
                row,
                &x[i * k..(i + 1) * k],
                &xsum[i * nb..(i + 1) * nb],
            );
            // SAFETY: i < m and r < n index the [m, n] output; each task owns its rows r.
            *dst.get().add(i * n + r) = v;
        }
    }
}

/// One Q4_0 / Q4_1 / Q8_0 row dotted with `x` in AVX2: each block's quants
/// widen to f32 lanes in registers, are dotted with x, and the block sum is
/// scaled by d once (plus Q4_1's offset times the block's x sum).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn legacy_row_dot_avx2(dtype: BlockType, row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    #[inline(always)]
    unsafe fn widen_u8(v: __m128i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
    }
    use crate::cpu::prefetch_ahead;
    let mut acc = _mm256_setzero_ps();
    let mut offs = 0f32;
    match dtype {
        BlockType::Q4_0 | BlockType::Q4_1 => {
            let (bsz, qoff) = if dtype == BlockType::Q4_0 {
                (18, 2)
            } else {
                (20, 4)
            };
            let mask = _mm_set1_epi8(0x0F);
            for ((blk, xb), xs) in row.chunks_exact(bsz).zip(x.chunks_exact(32)).zip(xsum) {
                prefetch_ahead(blk, blk.len());
                let q = _mm_loadu_si128(blk[qoff..qoff + 16].as_ptr() as *const __m128i);
                let lo = _mm_and_si128(q, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
                let xp = xb.as_ptr();
                let mut b = _mm256_mul_ps(widen_u8(lo), _mm256_loadu_ps(xp));
                b = _mm256_fmadd_ps(
                    widen_u8(_mm_srli_si128(lo, 8)),
                    _mm256_loadu_ps(xp.add(8)),
                    b,
                );
                b = _mm256_fmadd_ps(widen_u8(hi), _mm256_loadu_ps(xp.add(16)), b);
                b = _mm256_fmadd_ps(
                    widen_u8(_mm_srli_si128(hi, 8)),
                    _mm256_loadu_ps(xp.add(24)),
                    b,
                );
                let d = f16_at(blk, 0);
                acc = _mm256_fmadd_ps(b, _mm256_set1_ps(d), acc);
                // Q4_0 decodes as (q - 8) d, Q4_1 as q d + m.
                offs += if dtype == BlockType::Q4_0 {
                    -8.0 * d * xs
                } else {
                    f16_at(blk, 2) * xs
                };
            }
        }
        BlockType::Q8_0 => {
            for (blk, xb) in row.chunks_exact(34).zip(x.chunks_exact(32)) {
                prefetch_ahead(blk, blk.len());
                let xp = xb.as_ptr();
                let mut b = _mm256_setzero_ps();
                for i in 0..4 {
                    let q = _mm_loadl_epi64(blk[2 + i * 8..].as_ptr() as *const __m128i);
                    let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                    b = _mm256_fmadd_ps(f, _mm256_loadu_ps(xp.add(i * 8)), b);
                }
                acc = _mm256_fmadd_ps(b, _mm256_set1_ps(f16_at(blk, 0)), acc);
            }
        }
        _ => {}
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    lanes.iter().sum::<f32>() + offs
}

fn rows_dot_fused_dispatch(
    mat: &BlockMatrix,
    r0: usize,
    nr: usize,
    x: &[f32],
    xsum: &[f32],
    m: usize,
    dst: SendPtr,
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2, FMA and F16C (checked at run time).
        unsafe { rows_dot_fused_avx2(mat, r0, nr, x, xsum, m, dst) };
        return;
    }
    rows_dot_fused(mat, r0, nr, x, xsum, m, dst)
}

/// Weight rows `r0..r0+nr`, decoded once into `buf` (L1/L2-sized) in groups
/// of [`ROW_GROUP`], each group dotted with all `m` rows of `x`. Grouping
/// reads every `x` row once per group and gives the FMA units independent
/// accumulator chains.
#[inline(always)]
fn rows_dot_decoded(
    mat: &BlockMatrix,
    r0: usize,
    nr: usize,
    x: &[f32],
    m: usize,
    buf: &mut [f32],
    dst: SendPtr,
) {
    let (k, n) = (mat.k, mat.n);
    let mut r = r0;
    while r < r0 + nr {
        let g = ROW_GROUP.min(r0 + nr - r);
        for j in 0..g {
            mat.decode_row_inline(r + j, &mut buf[j * k..(j + 1) * k]);
        }
        for (i, xi) in x.chunks_exact(k).take(m).enumerate() {
            let dots = if g == ROW_GROUP {
                dot_group(&buf[..ROW_GROUP * k], xi)
            } else {
                let mut d = [0f32; ROW_GROUP];
                for (j, dj) in d.iter_mut().enumerate().take(g) {
                    *dj = dot_group_one(&buf[j * k..(j + 1) * k], xi);
                }
                d
            };
            for (j, v) in dots.iter().enumerate().take(g) {
                // SAFETY: i < m and r + j < n index the [m, n] output; each task owns its rows.
                unsafe { *dst.get().add(i * n + r + j) = *v };
            }
        }
        r += g;
    }
}

const ROW_GROUP: usize = 4;
const LANES: usize = 16;

/// Dot products of `ROW_GROUP` consecutive rows of `w` (each `x.len()` long)
/// with `x`, lane-wise so it vectorises without reassociation.
#[inline(always)]
fn dot_group(w: &[f32], x: &[f32]) -> [f32; ROW_GROUP] {
    let k = x.len();
    let mut acc = [[0f32; LANES]; ROW_GROUP];
    let full = k / LANES * LANES;
    for c in (0..full).step_by(LANES) {
        let xv = &x[c..c + LANES];
        for (r, a) in acc.iter_mut().enumerate() {
            let wv = &w[r * k + c..r * k + c + LANES];
            for j in 0..LANES {
                a[j] = wv[j].mul_add(xv[j], a[j]);
            }
        }
    }
    let mut out = [0f32; ROW_GROUP];
    for (r, o) in out.iter_mut().enumerate() {
        let mut t = acc[r].iter().sum::<f32>();
        for c in full..k {
            t = w[r * k + c].mul_add(x[c], t);
        }
        *o = t;
    }
    out
}

#[inline(always)]
fn dot_group_one(w: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let full = x.len() / LANES * LANES;
    for c in (0..full).step_by(LANES) {
        for j in 0..LANES {
            acc[j] = w[c + j].mul_add(x[c + j], acc[j]);
        }
    }
    let mut t = acc.iter().sum::<f32>();
    for c in full..x.len() {
        t = w[c].mul_add(x[c], t);
    }
    t
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_dot_decoded_avx2(
    mat: &BlockMatrix,
    r0: usize,
    nr: usize,
    x: &[f32],
    m: usize,
    buf: &mut [f32],
    dst: SendPtr,
) {
    rows_dot_decoded(mat, r0, nr, x, m, buf, dst)
}

fn rows_dot_decoded_dispatch(
    mat: &BlockMatrix,
    r0: usize,
    nr: usize,
    x: &[f32],
    m: usize,
    buf: &mut [f32],
    dst: SendPtr,
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2, FMA and F16C (checked at run time).
        unsafe { rows_dot_decoded_avx2(mat, r0, nr, x, m, buf, dst) };
        return;
    }
    rows_dot_decoded(mat, r0, nr, x, m, buf, dst)
}

#[inline(always)]
fn decode_rows(mat: &BlockMatrix, r0: usize, out: &mut [f32]) {
    for (i, o) in out.chunks_exact_mut(mat.k).enumerate() {
        mat.decode_row_inline(r0 + i, o);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_rows_avx2(mat: &BlockMatrix, r0: usize, out: &mut [f32]) {
    decode_rows(mat, r0, out)
}

fn decode_rows_dispatch(mat: &BlockMatrix, r0: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2, FMA and F16C (checked at run time).
        unsafe { decode_rows_avx2(mat, r0, out) };
        return;
    }
    decode_rows(mat, r0, out)
}

impl BlockMatrix {
    /// Copy a 2-D GGUF tensor's blocks; `None` for types decoded elsewhere
    /// (floats, or types without a decoder here).
    pub fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        let Some(dtype) = BlockType::of_ggml(q.dtype()) else {
            return Ok(None);
        };
        let (n, k) = q.shape().dims2()?;
        let bytes = q.data()?;
        Self::read(dtype, n, k, |dst| {
            if bytes.len() != dst.len() {
                bail!(
                    "{dtype:?} matrix [{n}, {k}] has {} bytes, expected {}",
                    bytes.len(),
                    dst.len()
                );
            }
            dst.copy_from_slice(&bytes);
            Ok(())
        })
        .map(Some)
    }

    /// A `[n, k]` matrix of `dtype` blocks whose
    /// bytes, row after row, `read` writes into place (a file read lands
    /// in the kernels' buffer, with no copy in between).
    pub fn read(
        dtype: BlockType,
        n: usize,
        k: usize,
        read: impl FnOnce(&mut [u8]) -> Result<()>,
    ) -> Result<Self> {
        let Some(row_bytes) = dtype.row_bytes(1, k) else {
            bail!("{dtype:?} matrix with {k} columns is not made of whole blocks");
        };
        let len = row_bytes * n;
        // Written once by `read`.
        let mut data = crate::cpu::zeroed_weights::<u64>(len.div_ceil(8));
        // SAFETY: the u64 storage viewed as its first `len` bytes.
        read(unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr().cast::<u8>(), len) })?;
        Ok(Self {
            dtype,
            n,
            k,
            row_bytes,
            data,
            row_l1: Default::default(),
        })
    }

    pub fn dtype(&self) -> BlockType {
        self.dtype
    }

    /// Stack matrices with the same type and input width into one whose
    /// rows are theirs in order (e.g. q, k and v as one projection).
    pub fn stack(parts: &[&BlockMatrix]) -> Option<Self> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|p| p.dtype != first.dtype || p.k != first.k)
        {
            return None;
        }
        let n: usize = parts.iter().map(|p| p.n).sum();
        let total = n * first.row_bytes;
        let mut data = crate::cpu::zeroed_weights::<u64>(total.div_ceil(8));
        let mut off = 0usize;
        for p in parts {
            let b = p.bytes();
            // SAFETY: `data` holds `total` bytes and the parts' bytes sum to `total`.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    b.as_ptr(),
                    (data.as_mut_ptr() as *mut u8).add(off),
                    b.len(),
                );
            }
            off += b.len();
        }
        Some(Self {
            dtype: first.dtype,
            n,
            k: first.k,
            row_bytes: first.row_bytes,
            data,
            row_l1: Default::default(),
        })
    }

    /// `(n, k)`: output and input features.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the u64 buffer holds `n * row_bytes` initialised bytes.
        unsafe {
            std::slice::from_raw_parts(self.data.as_ptr() as *const u8, self.n * self.row_bytes)
        }
    }

    #[inline(always)]
    fn decode_row_inline(&self, r: usize, out: &mut [f32]) {
        let row = &self.bytes()[r * self.row_bytes..(r + 1) * self.row_bytes];
        let out = &mut out[..self.k];
        // SAFETY (k-quants): rows start at multiples of row_bytes, an even
        // number, in an 8-aligned buffer, and hold whole blocks.
        unsafe {
            match self.dtype {
                #[cfg(target_arch = "x86_64")]
                d @ (BlockType::Q2K
                | BlockType::Q3K
                | BlockType::Q4K
                | BlockType::Q5K
                | BlockType::Q6K)
                    if has_avx2() =>
                {
                    decode_kquant_avx2(d, row, out)
                }
                BlockType::Q2K => decode_kquant::<BlockQ2K>(row, out),
                BlockType::Q3K => decode_kquant::<BlockQ3K>(row, out),
                BlockType::Q4K => decode_kquant::<BlockQ4K>(row, out),
                BlockType::Q5K => decode_kquant::<BlockQ5K>(row, out),
                BlockType::Q6K => decode_kquant::<BlockQ6K>(row, out),
                #[cfg(target_arch = "x86_64")]
                d @ (BlockType::Iq4Nl | BlockType::Iq4Xs) if has_avx2() => {
                    decode_iq4_avx2(d, row, out)
                }
                d @ (BlockType::Iq4Nl | BlockType::Iq4Xs) => decode_iq4(d, row, out),
                #[cfg(target_arch = "x86_64")]
                d @ (BlockType::Q4_0 | BlockType::Q4_1 | BlockType::Q8_0) if has_avx2() => {
                    decode_legacy_avx2(d, row, out)
                }
                d => decode_legacy(d, row, out),
            }
        }
    }

    /// Dequantize row `r` into `out[..k]`.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) -> Result<()> {
        if r >= self.n || out.len() < self.k {
            bail!(
                "dequantize_row: row {r} of {} into a buffer of {}",
                self.n,
                out.len()
            );
        }
        self.decode_row_inline(r, out);
        Ok(())
    }

    /// Rows `ids` as an f32 tensor `[ids.len(), k]` (embedding lookup).
    pub fn embedding(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.n) {
            bail!("token id {bad} out of range (vocab size {})", self.n);
        }
        let mut out = vec![0f32; ids.len() * self.k];
        out.par_chunks_mut(self.k.max(1))
            .zip(ids.par_iter())
            .for_each(|(o, &id)| self.decode_row_inline(id as usize, o));
        Tensor::from_vec(out, (ids.len(), self.k), device)
    }

    /// `x` (`[m, k]` row-major f32) times the matrix transposed: `[m, n]`.
    pub fn matmul_f32(&self, x: &[f32], m: usize, acts: Activations) -> Result<Vec<f32>> {
        let (n, k) = (self.n, self.k);
        if x.len() != m * k {
            bail!(
                "quantized matmul: input has {} elements, expected {m} x {k}",
                x.len()
            );
        }
        let mut out = vec![0f32; m * n];
        if m == 0 || n == 0 || k == 0 {
            return Ok(out);
        }
        if acts == Activations::Int8Top {
            return self.int8_top(x, m);
        }
        // Up to 8 rows, unpacking the panels can cost more than the products
        // (f32 off the blocks: no unpacking): those take the F32 path.
        if acts == Activations::Int16 && m > ROW_DECODE_MAX_M {
            if let Some(kernel) = int16_kernel() {
                return Ok(self.int16_product(kernel, x, m));
            }
        }
        let panel_engine = match acts {
            Activations::Bf16 => crate::panel_gemm::bf16_engine(),
            // Prompt rows in f32: above the row-decoding range.
            Activations::F32 | Activations::Int16 if m > ROW_DECODE_MAX_M => {
                crate::panel_gemm::f32_engine()
            }
            _ => None,
        };
        if let Some(engine) = panel_engine {
            crate::panel_gemm::matmul(engine, x, m, k, n, self, &mut out);
            return Ok(out);
        }
        let threads = rayon::current_num_threads();
        let dst = SendPtr(out.as_mut_ptr());
        if acts == Activations::Int8 {
            return Ok(self.int8_product(x, m));
        }
        if m <= FUSED_MAX_M && has_fused(self.dtype) {
            // Decode (one or a few sequences): dot products straight off
            // the blocks; the weights are read once from memory.
            let rows_per_task = (n / (threads * 8)).clamp(1, 64);
            let xsum = block_sums(x);
            (0..n.div_ceil(rows_per_task))
                .into_par_iter()
                .for_each(|t| {
                    let r0 = t * rows_per_task;
                    rows_dot_fused_dispatch(self, r0, rows_per_task.min(n - r0), x, &xsum, m, dst);
                });
            return Ok(out);
        }
        if m <= ROW_DECODE_MAX_M {
            // A few sequences (batched decode): decoding each weight row once
            // per step and reusing it for all m inputs keeps the cost of
            // dequantisation independent of m, without GEMM packing overhead.
            let rows_per_task = (n / (threads * 8)).clamp(1, 64);
            (0..n.div_ceil(rows_per_task))
                .into_par_iter()
                .for_each_init(
                    || vec![0f32; ROW_GROUP * k],
                    |buf, t| {
                        let r0 = t * rows_per_task;
                        rows_dot_decoded_dispatch(
                            self,
                            r0,
                            rows_per_task.min(n - r0),
                            x,
                            m,
                            buf,
                            dst,
                        );
                    },
                );
            return Ok(out);
        }
        // Several rows: per task, decode a tile of weight rows into an
        // L2-sized buffer and multiply it with all of x (f32 GEMM), writing
        // the tile's output columns.
        let tile = (TILE_ELEMS / k)
            .clamp(8, 256)
            .min(n.div_ceil(threads).max(1));
        let tiles = n.div_ceil(tile);
        (0..tiles).into_par_iter().for_each_init(
            || vec![0f32; tile * k],
            |buf, t| {
                let r0 = t * tile;
                let nr = tile.min(n - r0);
                decode_rows_dispatch(self, r0, &mut buf[..nr * k]);
                // SAFETY: x is [m, k] row-major, buf holds nr decoded rows of
                // k (read as a [k, nr] matrix with column stride k), and dst
                // columns r0..r0+nr of the [m, n] output belong to this tile
                // alone; every pointer stays inside its buffer.
                unsafe {
                    crate::cpu::gemm_f32(
                        (m, nr, k),
                        dst.get().add(r0),
                        n,
                        x.as_ptr(),
                        k,
                        buf.as_ptr(),
                        (1, k),
                    );
                }
            },
        );
        Ok(out)
    }

    /// [`Activations::Int8`] for a type with an integer kernel (`x` is
    /// `[m, k]`, not empty): the activations are quantized once, each
    /// weight row is unpacked once for all m of them.
    fn int8_product(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let mut out = vec![0f32; m * n];
        let dst = SendPtr(out.as_mut_ptr());
        let q = q8::Q8Rows::quantize(x, k, int_dot::act_group(self.dtype));
        let rows: Vec<q8::Q8Row> = (0..m).map(|i| q.row(i)).collect();
        let kernel = int_dot::kernel();
        let bytes = self.bytes();
        let rows_per_task = (n / (rayon::current_num_threads() * 8)).clamp(1, 64);
        (0..n.div_ceil(rows_per_task))
            .into_par_iter()
            .for_each_init(
                || vec![0f32; rows_per_task * m],
                |dots, t| {
                    let r0 = t * rows_per_task;
                    let r1 = (r0 + rows_per_task).min(n);
                    let rb = self.row_bytes;
                    // SAFETY: `kernel` is the one this CPU runs; the rows
                    // hold whole blocks and each q8 row k values.
                    unsafe { kernel(self.dtype, &bytes[r0 * rb..r1 * rb], rb, &rows, dots) };
                    for (r, d) in (r0..r1).zip(dots.chunks_exact(m)) {
                        for (i, v) in d.iter().enumerate() {
                            // SAFETY: i < m and r < n index the [m, n]
                            // output; each task owns its rows r.
                            unsafe { *dst.get().add(i * n + r) = *v };
                        }
                    }
                },
            );
        out
    }

    /// [`Activations::Int16`] with `kernel`, for a format it supports (`x`
    /// is `[m, k]`, not empty): per task, a panel of weight rows is unpacked
    /// once and multiplied with a range of the activation rows.
    fn int16_product(&self, kernel: i16_gemm::Kernel, x: &[f32], m: usize) -> Vec<f32> {
        use i16_gemm::NR;
        let (n, k) = (self.n, self.k);
        let mut out = vec![0f32; m * n];
        let dst = SendPtr(out.as_mut_ptr());
        let (sb, ob) = (
            kernel.scale_block(self.dtype),
            i16_gemm::offset_block(self.dtype),
        );
        let acts = i16_gemm::Q16Rows::quantize(kernel, x, k, sb, ob);
        let panels = n.div_ceil(NR);
        // Few panels (a narrow matrix on many threads): split the rows too,
        // each part unpacking its panel again.
        let parts = (4 * rayon::current_num_threads())
            .div_ceil(panels)
            .clamp(1, m.div_ceil(64));
        let rows_per_part = m.div_ceil(parts);
        let bytes = self.bytes();
        (0..panels * parts).into_par_iter().for_each(|t| {
            let (p, part) = (t / parts, t % parts);
            let r0 = p * NR;
            let cols = NR.min(n - r0);
            let rows = part * rows_per_part..((part + 1) * rows_per_part).min(m);
            if rows.is_empty() {
                return;
            }
            let rb = self.row_bytes;
            i16_gemm::with_panel(k, |panel| {
                panel.fill(kernel, self.dtype, &bytes[r0 * rb..(r0 + cols) * rb], rb);
                // SAFETY: the CPU runs `kernel` (`i16_gemm::kernel`);
                // the task owns output columns r0..r0 + cols of rows `rows`
                // of the [m, n] output, and the panel has k.
                unsafe {
                    i16_gemm::multiply(
                        kernel,
                        panel,
                        &acts,
                        rows.clone(),
                        dst.get().add(rows.start * n + r0),
                        n,
                        cols,
                    )
                };
            });
        });
        out
    }

    /// [`Activations::Int8Top`]: an 8-bit product's error is at most
    /// `|w_r|_1 * max|x| / 254` (each activation is within half a step,
    /// `max|x| / 127` at most, of its 8-bit value), plus f32 rounding. Every
    /// row whose 8-bit value plus that bound reaches the best value minus its
    /// bound may be the largest: those are recomputed with the f32 kernel of
    /// a one-row product, so the argmax and the values near the top are the
    /// `F32` path's bit for bit (whatever the batch), and the rest are
    /// within the bound. The head then streams the weights at the integer
    /// kernels' rate instead of the f32 ones'.
    fn int8_top(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let (n, k) = (self.n, self.k);
        let mut out = self.int8_product(x, m);
        let l1 = self.row_l1();
        for (i, y) in out.chunks_exact_mut(n).enumerate() {
            let xi = &x[i * k..(i + 1) * k];
            let amax = xi.iter().fold(0f32, |a, v| a.max(v.abs()));
            // Half a step, and f32 rounding of k-term sums (with margin).
            let per_l1 = amax * (1.0 / 254.0 + 1e-4);
            let floor = y
                .iter()
                .zip(l1)
                .map(|(&v, &l)| v - l * per_l1)
                .fold(f32::NEG_INFINITY, f32::max);
            let top: Vec<usize> = (0..n).filter(|&r| y[r] + l1[r] * per_l1 >= floor).collect();
            let fused = has_fused(self.dtype);
            let xsum = block_sums(xi);
            let mut buf = if fused {
                Vec::new()
            } else {
                vec![0f32; ROW_GROUP * k]
            };
            let dst = SendPtr(y.as_mut_ptr());
            // One row at a time through the kernel `F32` takes for one input
            // row, so these values do not depend on the batch.
            for r in top {
                if fused {
                    rows_dot_fused_dispatch(self, r, 1, xi, &xsum, 1, dst);
                } else {
                    rows_dot_decoded_dispatch(self, r, 1, xi, 1, &mut buf, dst);
                }
            }
        }
        Ok(out)
    }

    /// Makes what [`Activations::Int8Top`] needs (the rows' magnitudes) now,
    /// at load, rather than in the first decode step.
    pub fn prepare_logits(&self) {
        self.row_l1();
    }

    /// [`Self::row_l1`]'s values, made once (in parallel over the rows).
    fn row_l1(&self) -> &[f32] {
        self.row_l1.get_or_init(|| {
            (0..self.n)
                .into_par_iter()
                .map_init(
                    || vec![0f32; self.k],
                    |buf, r| {
                        self.decode_row_inline(r, buf);
                        buf.iter().map(|v| v.abs()).sum()
                    },
                )
                .collect()
        })
    }

    /// `x` `[tokens, k]` (f32, bf16 or f16) -> `[tokens, n]` in `x`'s dtype.
    pub fn forward(&self, x: &Tensor, acts: Activations) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        if k != self.k {
            bail!(
                "quantized matmul: input has {k} features, matrix expects {}",
                self.k
            );
        }
        let in_dtype = x.dtype();
        let xv = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let y = self.matmul_f32(&xv, m, acts)?;
        Tensor::from_vec(y, (m, self.n), x.device())?.to_dtype(in_dtype)
    }
}

impl crate::panel_gemm::WeightRows for BlockMatrix {
    fn fill_row(&self, r: usize, out: &mut [f32]) {
        self.decode_row_inline(r, out);
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// `n` rows of `k` values of an IQ4 type (which candle cannot quantize
    /// to): pseudo-random bytes (every index and sub-scale is valid) under
    /// an f16 scale that keeps the values within about ±1.6.
    pub fn random_iq4(dtype: BlockType, n: usize, k: usize) -> Result<BlockMatrix> {
        let sub_scale = if dtype == BlockType::Iq4Xs { 32.0 } else { 1.0 };
        let d = f16::from_f32(0.0123 / sub_scale).to_le_bytes();
        BlockMatrix::read(dtype, n, k, |dst| {
            for (i, b) in dst.iter_mut().enumerate() {
                *b = ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8;
            }
            for blk in dst.chunks_exact_mut(dtype.type_size()) {
                blk[..2].copy_from_slice(&d);
            }
            Ok(())
        })
    }

    fn check(dtype: GgmlDType) -> Result<()> {
        let dev = Device::Cpu;
        let (n, k) = (75usize, 512usize); // n not a multiple of the row group
        let w = (Tensor::randn(0f32, 1.0, (n, k), &dev)? + 0.3)?;
        let q = QTensor::quantize(&w, dtype)?;
        let wd = q.dequantize(&dev)?;
        let bm = BlockMatrix::from_qtensor(&q)?.expect("supported type");
        check_matrix(&bm, &wd)
    }

    /// Every path of `bm`'s products against `wd`, its values, times the
    /// inputs as each path sees them.
    fn check_matrix(bm: &BlockMatrix, wd: &Tensor) -> Result<()> {
        let dev = Device::Cpu;
        let (dtype, (n, k)) = (bm.dtype(), bm.dims());
        for m in [1usize, 2, 3, 7, 8, 9, 16, 37] {
            let x = (Tensor::randn(0f32, 1.0, (m, k), &dev)? + 0.5)?;
            for acts in [
                Activations::F32,
                Activations::Int8,
                Activations::Bf16,
                Activations::Int16,
            ] {
                // The integer kernels see the activations as their 8-bit
                // (16-bit) blocks dequantized, the bf16 engine both operands
                // rounded to bf16; every other path sees them as they are.
                let int = acts == Activations::Int8;
                let int16 = (acts == Activations::Int16 && m > ROW_DECODE_MAX_M)
                    .then(int16_kernel)
                    .flatten();
                let bf16 = acts == Activations::Bf16 && crate::panel_gemm::bf16_engine().is_some();
                let round = |t: &Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
                let xv = x.flatten_all()?.to_vec1::<f32>()?;
                let (xs, ws) = if int {
                    let group = int_dot::act_group(bm.dtype());
                    let xq = q8::Q8Rows::quantize(&xv, k, group).dequantized();
                    (Tensor::from_vec(xq, (m, k), &dev)?, wd.clone())
                } else if let Some(kernel) = int16 {
                    let (sb, ob) = (kernel.scale_block(dtype), i16_gemm::offset_block(dtype));
                    let xq = i16_gemm::Q16Rows::quantize(kernel, &xv, k, sb, ob).dequantized();
                    (Tensor::from_vec(xq, (m, k), &dev)?, wd.clone())
                } else if bf16 {
                    (round(&x)?, round(wd)?)
                } else {
                    (x.clone(), wd.clone())
                };
                let want = xs.matmul(&ws.t()?)?;
                let got = bm.forward(&x, acts)?;
                let d = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(d < 1e-3, "{dtype:?} m={m} {acts:?}: max diff {d}");
            }
        }
        // Rows decode to exactly candle's dequantization.
        let ids = [5u32, 0, 71];
        let e = bm.embedding(&ids, &dev)?;
        let want = wd.index_select(&Tensor::new(&ids, &dev)?, 0)?;
        assert_eq!(e.to_vec2::<f32>()?, want.to_vec2::<f32>()?);
        assert!(bm.embedding(&[n as u32], &dev).is_err());
        Ok(())
    }

    /// IQ4 rows (decoded as llama.cpp does: int_dot's
    /// `k_quant_blocks_decode_as_llama_cpp`) through every path; the AVX2
    /// decoder is the scalar one's bits.
    #[test]
    fn iq4_types_match_dequantized_matmul() -> Result<()> {
        let (n, k) = (75usize, 512usize);
        for dtype in [BlockType::Iq4Nl, BlockType::Iq4Xs] {
            let bm = random_iq4(dtype, n, k)?;
            let mut wd = vec![0f32; n * k];
            for (r, out) in wd.chunks_exact_mut(k).enumerate() {
                bm.dequantize_row(r, out)?;
            }
            let mut scalar = vec![0f32; n * k];
            decode_iq4(dtype, bm.bytes(), &mut scalar);
            assert_eq!(scalar, wd, "{dtype:?}: decoders differ");
            check_matrix(&bm, &Tensor::from_vec(wd, (n, k), &Device::Cpu)?)?;
        }
        Ok(())
    }

    #[test]
    fn legacy_types_match_dequantized_matmul() -> Result<()> {
        for d in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
        ] {
            check(d)?;
        }
        Ok(())
    }

    #[test]
    fn k_quants_match_dequantized_matmul() -> Result<()> {
        for d in [
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            check(d)?;
        }
        Ok(())
    }

    /// `Int8Top`: the argmax and every value near it are the f32 path's
    /// bits for one row (alone or batched), the rest within the bound, and
    /// the 8-bit values are kept for most rows.
    #[test]
    fn logits_top_rows_are_exact() -> Result<()> {
        let dev = Device::Cpu;
        let (n, k, m) = (600usize, 512usize, 3usize);
        for dtype in [
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
            GgmlDType::Q5K,
        ] {
            // Head-like: small weights, rows 7 and 8 nearly tied at the top.
            let mut w = (Tensor::randn(0f32, 0.02, (n, k), &dev)?).to_vec2::<f32>()?;
            let mut x = Tensor::randn(0f32, 1.0, (m, k), &dev)?.to_vec2::<f32>()?;
            x[1][5] = 25.0; // an outlier: coarse 8-bit steps for row 1
            for j in 0..k {
                w[7][j] = 0.05 * x[0][j].signum();
                w[8][j] = w[7][j] * (1.0 - 1e-4 * (j % 3) as f32);
            }
            let w = Tensor::new(w, &dev)?;
            let bm = BlockMatrix::from_qtensor(&QTensor::quantize(&w, dtype)?)?.expect("supported");
            let xv: Vec<f32> = x.concat();
            let got = bm.matmul_f32(&xv, m, Activations::Int8Top)?;
            let l1 = bm.row_l1().to_vec();
            let mut int8_kept = 0;
            for i in 0..m {
                let xi = &xv[i * k..(i + 1) * k];
                let exact = bm.matmul_f32(xi, 1, Activations::F32)?;
                let row = &got[i * n..(i + 1) * n];
                assert_eq!(
                    row,
                    bm.matmul_f32(xi, 1, Activations::Int8Top)?.as_slice(),
                    "{dtype:?} row {i}: batched = alone"
                );
                let argmax = |v: &[f32]| (0..n).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap();
                let best = argmax(&exact);
                assert_eq!(argmax(row), best, "{dtype:?} row {i}");
                assert_eq!(
                    row[best].to_bits(),
                    exact[best].to_bits(),
                    "{dtype:?} row {i}"
                );
                let amax = xi.iter().fold(0f32, |a, v| a.max(v.abs()));
                for r in 0..n {
                    let bound = l1[r] * amax * (1.0 / 254.0 + 1e-4);
                    assert!(
                        (row[r] - exact[r]).abs() <= bound,
                        "{dtype:?} row {i} logit {r}"
                    );
                    int8_kept += (row[r] != exact[r]) as usize;
                }
            }
            assert!(
                int8_kept > m * n / 2,
                "{dtype:?}: only {int8_kept} 8-bit values kept"
            );
        }
        Ok(())
    }

    #[test]
    fn k4_scales_unpack_as_ggml_reads_them() {
        for seed in 0..64u32 {
            let q: [u8; 12] = std::array::from_fn(|i| {
                (seed * 97 + i as u32 * 61 + 13) as u8 ^ (seed as u8).rotate_left(i as u32)
            });
            let (sc, mn) = scales_mins_k4(&q);
            for j in 0..8 {
                // ggml's `get_scale_min_k4`, byte by byte.
                let (s, m) = if j < 4 {
                    (q[j] & 63, q[j + 4] & 63)
                } else {
                    (
                        (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
                        (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
                    )
                };
                assert_eq!(sc[j], s, "scale {j} of {q:?}");
                assert_eq!(mn[j], m, "min {j} of {q:?}");
            }
        }
    }

    /// Our row decoders (vector ones where the CPU has them) give candle's
    /// dequantized values bit for bit.
    #[test]
    fn rows_decode_as_candle_dequantizes() -> Result<()> {
        let dev = Device::Cpu;
        let (n, k) = (5usize, 768usize);
        let w = (Tensor::randn(0f32, 1.0, (n, k), &dev)? - 0.2)?;
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
        ] {
            let q = QTensor::quantize(&w, dtype)?;
            let want = q.dequantize(&dev)?.to_vec2::<f32>()?;
            let bm = BlockMatrix::from_qtensor(&q)?.expect("supported type");
            let mut row = vec![0f32; k];
            for (r, want) in want.iter().enumerate() {
                bm.dequantize_row(r, &mut row)?;
                assert_eq!(&row, want, "{dtype:?} row {r}");
            }
        }
        Ok(())
    }

    #[test]
    fn stacked_rows_match_parts() -> Result<()> {
        let dev = Device::Cpu;
        let a = BlockMatrix::from_qtensor(&QTensor::quantize(
            &Tensor::randn(0f32, 1.0, (8, 64), &dev)?,
            GgmlDType::Q4_1,
        )?)?
        .unwrap();
        let b = BlockMatrix::from_qtensor(&QTensor::quantize(
            &Tensor::randn(0f32, 1.0, (4, 64), &dev)?,
            GgmlDType::Q4_1,
        )?)?
        .unwrap();
        let c = BlockMatrix::from_qtensor(&QTensor::quantize(
            &Tensor::randn(0f32, 1.0, (4, 64), &dev)?,
            GgmlDType::Q8_0,
        )?)?
        .unwrap();
        assert!(BlockMatrix::stack(&[&a, &c]).is_none());
        let ab = BlockMatrix::stack(&[&a, &b]).unwrap();
        assert_eq!(ab.dims(), (12, 64));
        let x = Tensor::randn(0f32, 1.0, (1, 64), &dev)?;
        let y = ab.forward(&x, Activations::Int8)?.to_vec2::<f32>()?;
        let ya = a.forward(&x, Activations::Int8)?.to_vec2::<f32>()?;
        let yb = b.forward(&x, Activations::Int8)?.to_vec2::<f32>()?;
        assert_eq!(y[0][..8], ya[0][..]);
        assert_eq!(y[0][8..], yb[0][..]);
        Ok(())
    }

    #[test]
    fn half_inputs_round_trip() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (8, 64), &dev)?;
        let bm = BlockMatrix::from_qtensor(&QTensor::quantize(&w, GgmlDType::Q8_0)?)?.unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 64), &dev)?.to_dtype(DType::BF16)?;
        let y = bm.forward(&x, Activations::Int8)?;
        assert_eq!(y.dtype(), DType::BF16);
        assert_eq!(y.dims(), &[2, 8]);
        assert!(bm
            .forward(
                &Tensor::zeros((1, 63), DType::F32, &dev)?,
                Activations::Int8
            )
            .is_err());
        Ok(())
    }
}
