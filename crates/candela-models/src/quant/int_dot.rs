//! Integer dot products of block-quantized weight rows with 8-bit
//! activations ([`Q8Row`]): per 32-value group `sum_j w_j a_j` in exact
//! integer arithmetic, then scaled by the weight's and the activation
//! block's scales in f32 (plus the weight's offset times the block's
//! `d * sum(a)`). The activations are quantized per weight block
//! ([`act_group`]), so a K-quant's vector kernel sums a whole super-block's
//! sub-blocks, times their integer scales, before one conversion to f32 (as
//! ggml's Q8_K kernels do); the scalar one reads the same layout per block.
//!
//! This file holds the formats' layouts as scalar kernels, the reference
//! the vector ones (`int_dot_x86`: AVX2 `maddubs`, and VNNI `vpdpbusd` in
//! its AVX-VNNI and AVX512-VNNI encodings) are tested against; [`kernel`]
//! picks one for the CPU at run time.

use super::q8::{Q8Row, QK};
use super::{f16_at, scales_mins_k4, BlockType, IQ4_VALUES};

/// How many activation values share one 8-bit scale for weights of
/// `dtype`: its block (32, or a K-quant's or IQ4_XS's 256-value
/// super-block).
pub fn act_group(dtype: BlockType) -> usize {
    dtype.block_size()
}

/// A kernel: each weight row of `rows` (`row_bytes` each, whole blocks of
/// `dtype`) dotted with each of the activation rows `a` (as long), weight
/// row `r`'s into `out[r * a.len()..][..a.len()]`. The vector kernels unpack
/// each weight block once for all the activation rows, and pick the format's
/// code once per call rather than per row (a decode step's rows are short:
/// Qwen2.5-1.5B's are 6 K-quant super-blocks, and a call per row cost a
/// fifth of their time).
pub type RowsDot = unsafe fn(BlockType, &[u8], usize, &[Q8Row], &mut [f32]);

/// The instruction sets an integer kernel can use, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512Vnni,
    AvxVnni,
    Avx2,
    Scalar,
}

impl Isa {
    pub const ALL: [Isa; 4] = [Isa::Avx512Vnni, Isa::AvxVnni, Isa::Avx2, Isa::Scalar];

    /// Whether this CPU runs the kernel.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use crate::cpu;
            match self {
                Isa::Avx512Vnni => cpu::has_avx512_vnni(),
                Isa::AvxVnni => cpu::has_avx_vnni(),
                Isa::Avx2 => cpu::has_avx2(),
                Isa::Scalar => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Scalar
        }
    }

    /// The kernel for this instruction set; call it only where
    /// [`Isa::available`] is true.
    pub fn rows_dot(self) -> RowsDot {
        #[cfg(target_arch = "x86_64")]
        {
            use super::int_dot_x86 as x86;
            match self {
                Isa::Avx512Vnni => x86::avx512vnni::rows_dot,
                Isa::AvxVnni => x86::avxvnni::rows_dot,
                Isa::Avx2 => x86::avx2::rows_dot,
                Isa::Scalar => rows_dot_scalar,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            rows_dot_scalar
        }
    }
}

/// The best kernel this CPU runs (checked once).
pub fn kernel() -> RowsDot {
    use std::sync::OnceLock;
    static BEST: OnceLock<RowsDot> = OnceLock::new();
    *BEST.get_or_init(|| {
        Isa::ALL
            .into_iter()
            .find(|i| i.available())
            .map_or(rows_dot_scalar as RowsDot, Isa::rows_dot)
    })
}

/// Bit `j` of a Q5_0/Q5_1 block's high bits, as the quant's bit 4.
#[inline(always)]
pub(super) fn q5_high(qh: u32, j: usize) -> u8 {
    (((qh >> j) & 1) << 4) as u8
}

fn idot<W: Into<i32> + Copy>(w: impl Iterator<Item = W>, a: &[i8]) -> i32 {
    w.zip(a).map(|(w, &a)| w.into() * a as i32).sum()
}

/// The scalar kernel over several activation rows.
///
/// # Safety
/// None needed; `unsafe` only to share the [`RowsDot`] type.
pub unsafe fn rows_dot_scalar(
    dtype: BlockType,
    rows: &[u8],
    row_bytes: usize,
    a: &[Q8Row],
    out: &mut [f32],
) {
    for (row, out) in rows
        .chunks_exact(row_bytes)
        .zip(out.chunks_exact_mut(a.len()))
    {
        for (o, a) in out.iter_mut().zip(a) {
            *o = row_dot_scalar(dtype, row, *a);
        }
    }
}

/// One weight row dotted with one activation row, in scalar code.
pub fn row_dot_scalar(dtype: BlockType, row: &[u8], a: Q8Row) -> f32 {
    let mut acc = 0f32;
    let mut offs = 0f32;
    let mut groups = a.qs.chunks_exact(QK).zip(a.d.iter().zip(a.dsum));
    match dtype {
        BlockType::Q8_0 => {
            for (blk, (qa, (&da, _))) in row.chunks_exact(34).zip(groups) {
                let s = idot(blk[2..34].iter().map(|&w| w as i8), qa);
                acc += f16_at(blk, 0) * da * s as f32;
            }
        }
        BlockType::Q4_0 | BlockType::Q4_1 => {
            let q4_1 = dtype == BlockType::Q4_1;
            let (bsz, qoff) = if q4_1 { (20, 4) } else { (18, 2) };
            for (blk, (qa, (&da, &dsum))) in row.chunks_exact(bsz).zip(groups) {
                let qs = &blk[qoff..qoff + 16];
                let w = qs.iter().map(|q| q & 0x0F).chain(qs.iter().map(|q| q >> 4));
                let d = f16_at(blk, 0);
                acc += d * da * idot(w, qa) as f32;
                // Q4_0 decodes as (q - 8) d, Q4_1 as q d + m.
                offs += if q4_1 { f16_at(blk, 2) } else { -8.0 * d } * dsum;
            }
        }
        BlockType::Q5_0 | BlockType::Q5_1 => {
            let q5_1 = dtype == BlockType::Q5_1;
            let (bsz, hoff) = if q5_1 { (24, 4) } else { (22, 2) };
            for (blk, (qa, (&da, &dsum))) in row.chunks_exact(bsz).zip(groups) {
                let qh =
                    u32::from_le_bytes([blk[hoff], blk[hoff + 1], blk[hoff + 2], blk[hoff + 3]]);
                let qs = &blk[hoff + 4..hoff + 20];
                let lo = qs
                    .iter()
                    .enumerate()
                    .map(|(j, q)| (q & 0x0F) | q5_high(qh, j));
                let hi = qs
                    .iter()
                    .enumerate()
                    .map(|(j, q)| (q >> 4) | q5_high(qh, j + 16));
                let d = f16_at(blk, 0);
                acc += d * da * idot(lo.chain(hi), qa) as f32;
                // Q5_0 decodes as (q - 16) d, Q5_1 as q d + m.
                offs += if q5_1 { f16_at(blk, 2) } else { -16.0 * d } * dsum;
            }
        }
        BlockType::Q4K | BlockType::Q5K => {
            let q5 = dtype == BlockType::Q5K;
            let (bsz, qoff) = if q5 { (176, 48) } else { (144, 16) };
            for blk in row.chunks_exact(bsz) {
                let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                let Ok(scales) = <&[u8; 12]>::try_from(&blk[4..16]) else {
                    continue;
                };
                let (scs, mns) = scales_mins_k4(scales);
                for j in 0..8 {
                    let Some((qa, (&da, &dsum))) = groups.next() else {
                        break;
                    };
                    let (sc, mn) = (scs[j] as f32, mns[j] as f32);
                    // Sub-block 2c is the low nibbles of qs[32c..32c+32], 2c+1
                    // the high ones; Q5_K's bit 4 is bit j of qh[l].
                    let q = &blk[qoff + 32 * (j / 2)..qoff + 32 * (j / 2) + 32];
                    let w = q.iter().enumerate().map(|(l, q)| {
                        let lo = if j % 2 == 0 { q & 0x0F } else { q >> 4 };
                        let hi = if q5 { ((blk[16 + l] >> j) & 1) << 4 } else { 0 };
                        lo | hi
                    });
                    acc += d * sc * da * idot(w, qa) as f32;
                    offs -= dmin * mn * dsum;
                }
            }
        }
        BlockType::Q2K => {
            for blk in row.chunks_exact(84) {
                let (d, dmin) = (f16_at(blk, 80), f16_at(blk, 82));
                for g in 0..8 {
                    let Some((qa, (&da, _))) = groups.next() else {
                        break;
                    };
                    // Group g: bits 2(g % 4).. of qs[32(g / 4)..][..32], two
                    // sub-blocks of 16 with 4-bit scale (low) and min (high).
                    let q = &blk[16 + 32 * (g / 4)..16 + 32 * (g / 4) + 32];
                    let (mut s, mut m) = (0i32, 0i32);
                    for h in 0..2 {
                        let sc = blk[2 * g + h];
                        let part = 16 * h..16 * h + 16;
                        let w = q[part.clone()].iter().map(|q| (q >> (2 * (g % 4))) & 3);
                        s += (sc & 0x0F) as i32 * idot(w, &qa[part.clone()]);
                        m += (sc >> 4) as i32 * qa[part].iter().map(|&a| a as i32).sum::<i32>();
                    }
                    acc += da * (d * s as f32 - dmin * m as f32);
                }
            }
        }
        BlockType::Q3K => {
            for blk in row.chunks_exact(110) {
                let d = f16_at(blk, 108);
                let Ok(scales) = <&[u8; 12]>::try_from(&blk[96..108]) else {
                    continue;
                };
                for g in 0..8 {
                    let Some((qa, (&da, _))) = groups.next() else {
                        break;
                    };
                    let w = |l: usize| q3k(blk, g, l);
                    let mut s = 0i32;
                    for h in 0..2 {
                        let part: i32 = (16 * h..16 * h + 16).map(|l| w(l) * qa[l] as i32).sum();
                        s += q3k_scale(scales, 2 * g + h) * part;
                    }
                    acc += d * da * s as f32;
                }
            }
        }
        BlockType::Iq4Nl => {
            for (blk, (qa, (&da, _))) in row.chunks_exact(18).zip(groups) {
                acc += f16_at(blk, 0) * da * idot(iq4_values(&blk[2..18]), qa) as f32;
            }
        }
        BlockType::Iq4Xs => {
            for blk in row.chunks_exact(136) {
                let d = f16_at(blk, 0);
                let mut s = 0i32;
                let mut da = 0f32;
                for j in 0..8 {
                    let Some((qa, (&d_a, _))) = groups.next() else {
                        break;
                    };
                    // The activations share one scale per super-block.
                    da = d_a;
                    let qs = &blk[8 + 16 * j..8 + 16 * j + 16];
                    s += iq4xs_scale(blk, j) * idot(iq4_values(qs), qa);
                }
                acc += d * da * s as f32;
            }
        }
        BlockType::Q6K => {
            for blk in row.chunks_exact(210) {
                let d = f16_at(blk, 208);
                for half in 0..2 {
                    let ql = &blk[64 * half..64 * half + 64];
                    let qh = &blk[128 + 32 * half..128 + 32 * half + 32];
                    let sc = &blk[192 + 8 * half..192 + 8 * half + 8];
                    for t in 0..4 {
                        let Some((qa, (&da, _))) = groups.next() else {
                            break;
                        };
                        let q = |l: usize| q6(ql, qh, t, l) as i32 - 32;
                        let s0: i32 = (0..16).map(|l| q(l) * qa[l] as i32).sum();
                        let s1: i32 = (16..32).map(|l| q(l) * qa[l] as i32).sum();
                        let s = (sc[2 * t] as i8) as i32 * s0 + (sc[2 * t + 1] as i8) as i32 * s1;
                        acc += d * da * s as f32;
                    }
                }
            }
        }
    }
    acc + offs
}

/// The 32 table values of 16 bytes of IQ4 index pairs: low nibbles are
/// values 0..16, high ones 16..32.
pub(super) fn iq4_values(qs: &[u8]) -> impl Iterator<Item = i8> + '_ {
    let value = |i: u8| IQ4_VALUES[i as usize];
    qs.iter()
        .map(move |q| value(q & 0x0F))
        .chain(qs.iter().map(move |q| value(q >> 4)))
}

/// Sub-scale `j` (0..8) of an IQ4_XS super-block, in -32..32: 4 low bits
/// from nibble `j` of bytes 4..8, 2 high bits from bits 2j.. of the u16 at 2.
#[inline(always)]
pub fn iq4xs_scale(blk: &[u8], j: usize) -> i32 {
    let low = (blk[4 + j / 2] >> (4 * (j % 2))) & 0x0F;
    let high = (u16::from_le_bytes([blk[2], blk[3]]) >> (2 * j)) & 3;
    (low as i32 | (high as i32) << 4) - 32
}

/// Scale `j` (0..16) of a Q3_K block, in -32..32: 4 low bits from the
/// low (j < 8) or high nibbles of bytes 0..8, 2 high bits from bytes 8..12
/// (bits 2(j / 4).. of byte 8 + j % 4).
#[inline(always)]
pub(super) fn q3k_scale(scales: &[u8; 12], j: usize) -> i32 {
    let lo = if j < 8 {
        scales[j] & 0x0F
    } else {
        scales[j - 8] >> 4
    };
    let hi = (scales[8 + j % 4] >> (2 * (j / 4))) & 3;
    (lo | (hi << 4)) as i32 - 32
}

/// Quant `l` (0..32) of group `g` (0..8) of a Q3_K block, in -4..4: 2 low
/// bits as in Q2_K, bit 2 is bit g of hmask[l] (clear means minus 4).
#[inline(always)]
pub(super) fn q3k(blk: &[u8], g: usize, l: usize) -> i32 {
    let lo = ((blk[32 + 32 * (g / 4) + l] >> (2 * (g % 4))) & 3) as i32;
    lo - if (blk[l] >> g) & 1 == 0 { 4 } else { 0 }
}

/// Quant `l` (0..32) of group `t` (0..4) of one Q6_K half: 4 low bits from
/// `ql` (low nibbles of bytes 0..32 for t = 0, of 32..64 for t = 1, high
/// nibbles for t = 2, 3) and 2 high bits from `qh` (bits 2t..2t+2), in 0..64.
#[inline(always)]
pub(super) fn q6(ql: &[u8], qh: &[u8], t: usize, l: usize) -> u8 {
    let lo = ql[l + 32 * (t % 2)];
    let lo = if t < 2 { lo & 0x0F } else { lo >> 4 };
    lo | (((qh[l] >> (2 * t)) & 3) << 4)
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Result, Tensor};

    use super::super::q8::Q8Rows;
    use super::super::BlockMatrix;
    use super::*;

    /// candle's type of the same name, where it has one.
    fn ggml(dtype: BlockType) -> Option<GgmlDType> {
        use GgmlDType as G;
        [
            G::Q4_0,
            G::Q4_1,
            G::Q5_0,
            G::Q5_1,
            G::Q8_0,
            G::Q2K,
            G::Q3K,
            G::Q4K,
            G::Q5K,
            G::Q6K,
        ]
        .into_iter()
        .find(|&g| BlockType::of_ggml(g) == Some(dtype))
    }

    /// Three weight rows of `k` values as `dtype` blocks and their values,
    /// and `m` activation rows with an all-zero block and one large
    /// outlier. candle quantizes (and dequantizes) its types, mean shifted
    /// so offsets matter; IQ4 rows are `random_iq4`'s, their values decoded
    /// here (checked against llama.cpp's in `k_quant_blocks_decode_as_llama_cpp`).
    fn case(dtype: BlockType, k: usize, m: usize) -> Result<(Vec<u8>, Vec<f32>, Vec<f32>)> {
        let dev = Device::Cpu;
        let (bytes, wd) = match ggml(dtype) {
            Some(g) => {
                let w = (Tensor::randn(0f32, 1.0, (3, k), &dev)? + 0.3)?;
                let q = QTensor::quantize(&w, g)?;
                let wd = q.dequantize(&dev)?.flatten_all()?.to_vec1::<f32>()?;
                (q.data()?.to_vec(), wd)
            }
            None => {
                let bm = super::super::tests::random_iq4(dtype, 3, k)?;
                let mut wd = vec![0f32; 3 * k];
                for (r, out) in wd.chunks_exact_mut(k).enumerate() {
                    bm.dequantize_row(r, out)?;
                }
                (bm.bytes().to_vec(), wd)
            }
        };
        let mut x = (Tensor::randn(0f32, 1.0, (m, k), &dev)? - 0.4)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        x[..QK].fill(0.0);
        x[k - 3] = 40.0;
        Ok((bytes, wd, x))
    }

    /// Lengths per format: its block size and up, including (for the
    /// 32-value formats) lengths that are not multiples of 256.
    fn lengths(dtype: BlockType) -> &'static [usize] {
        if dtype.block_size() == 256 {
            &[256, 768, 2560]
        } else {
            &[32, 96, 416, 544, 2048]
        }
    }

    /// The scalar kernel computes the dot product of the dequantized weights
    /// (candle's dequantization) with the dequantized activations, up to f32
    /// rounding: it reads each format's layout right.
    #[test]
    fn scalar_kernel_is_the_dequantized_dot_product() -> Result<()> {
        for dtype in BlockType::ALL {
            for &k in lengths(dtype) {
                let (bytes, wd, x) = case(dtype, k, 1)?;
                let acts = Q8Rows::quantize(&x, k, act_group(dtype));
                let xd = acts.dequantized();
                let row_bytes = bytes.len() / 3;
                for r in 0..3 {
                    let w = &wd[r * k..(r + 1) * k];
                    let want: f64 = w.iter().zip(&xd).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let mag: f64 = w
                        .iter()
                        .zip(&xd)
                        .map(|(&a, &b)| (a as f64 * b as f64).abs())
                        .sum();
                    let got = row_dot_scalar(
                        dtype,
                        &bytes[r * row_bytes..(r + 1) * row_bytes],
                        acts.row(0),
                    );
                    let err = (got as f64 - want).abs();
                    // The floor: an all-zero block still sums its offset
                    // terms (d * sum(a) against -16 d) in f32.
                    assert!(
                        err <= 1e-5 * mag.max(1.0),
                        "{dtype:?} k={k} row {r}: {got} vs {want} (magnitude {mag})"
                    );
                }
            }
        }
        Ok(())
    }

    /// Every vector kernel this CPU runs matches the scalar one for every
    /// format, odd lengths and 1 to 7 activation rows at once (same integer
    /// sums; only the f32 accumulation order differs).
    #[test]
    fn vector_kernels_match_scalar() -> Result<()> {
        let ran: Vec<Isa> = Isa::ALL
            .into_iter()
            .filter(|i| *i != Isa::Scalar && i.available())
            .collect();
        eprintln!("integer kernels checked on this CPU: {ran:?}");
        for dtype in BlockType::ALL {
            for &k in lengths(dtype) {
                for m in [1usize, 2, 3, 4, 7] {
                    let (mut bytes, wd, x) = case(dtype, k, m)?;
                    let acts = Q8Rows::quantize(&x, k, act_group(dtype));
                    let xd = acts.dequantized();
                    let rows: Vec<Q8Row> = (0..m).map(|i| acts.row(i)).collect();
                    if dtype == BlockType::Q8_0 {
                        bytes[2] = 0x80; // -128: ggml never writes it, other quantizers may
                    }
                    let row_bytes = bytes.len() / 3;
                    for isa in &ran {
                        // All three weight rows in one call.
                        let mut all = vec![f32::NAN; 3 * m];
                        // SAFETY: `ran` holds the instruction sets this CPU has.
                        unsafe { isa.rows_dot()(dtype, &bytes, row_bytes, &rows, &mut all) };
                        for (r, got) in all.chunks_exact(m).enumerate() {
                            let row = &bytes[r * row_bytes..(r + 1) * row_bytes];
                            for (i, g) in got.iter().enumerate() {
                                let want = row_dot_scalar(dtype, row, rows[i]);
                                let mag: f32 = wd[r * k..(r + 1) * k]
                                    .iter()
                                    .zip(&xd[i * k..(i + 1) * k])
                                    .map(|(a, b)| (a * b).abs())
                                    .sum();
                                assert!(
                                    (g - want).abs() <= 1e-5 * mag,
                                    "{isa:?} {dtype:?} k={k} m={m} row {r} act {i}: {g} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Seeded random K-quant and IQ4 blocks decoded by llama.cpp's gguf-py
    /// (fixtures/kquants, scripts/make_kquant_reference.py): rows decode to
    /// its values, and every kernel this CPU runs dots them with 8-bit
    /// activations as the f64 dot product of those values does.
    #[test]
    fn k_quant_blocks_decode_as_llama_cpp() -> Result<()> {
        let dev = Device::Cpu;
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fixtures/kquants/reference.safetensors"
        );
        let r = candle_core::safetensors::load(path, &dev)?;
        let isas: Vec<Isa> = Isa::ALL.into_iter().filter(|i| i.available()).collect();
        for (name, dtype) in [
            ("q2_k", BlockType::Q2K),
            ("q3_k", BlockType::Q3K),
            ("q4_k", BlockType::Q4K),
            ("q5_k", BlockType::Q5K),
            ("q6_k", BlockType::Q6K),
            ("iq4_nl", BlockType::Iq4Nl),
            ("iq4_xs", BlockType::Iq4Xs),
        ] {
            let blocks = r[&format!("{name}.blocks")].to_vec2::<u8>()?;
            let want = r[&format!("{name}.values")].to_vec2::<f32>()?;
            let (n, k) = (want.len(), want[0].len());
            let bytes = blocks.concat();
            let bm = BlockMatrix::read(dtype, n, k, |dst| {
                dst.copy_from_slice(&bytes);
                Ok(())
            })?;
            let mut x: Vec<f32> = (0..2 * k)
                .map(|i| ((i * 7919 % 257) as f32 - 128.0) / 50.0)
                .collect();
            x[k + 5] = 30.0;
            let acts = Q8Rows::quantize(&x, k, act_group(dtype));
            let xd = acts.dequantized();
            let rows = [acts.row(0), acts.row(1)];
            let mut got = vec![0f32; k];
            for (i, w) in want.iter().enumerate() {
                bm.dequantize_row(i, &mut got)?;
                for (j, (g, w)) in got.iter().zip(w).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-6 * w.abs(),
                        "{name} row {i} value {j}: {g} vs llama.cpp's {w}"
                    );
                }
                let row = &blocks[i];
                for isa in &isas {
                    let mut dots = [f32::NAN; 2];
                    // SAFETY: `isas` holds the instruction sets this CPU has.
                    unsafe { isa.rows_dot()(dtype, row, row.len(), &rows, &mut dots) };
                    for (a, d) in dots.iter().enumerate() {
                        let xa = &xd[a * k..(a + 1) * k];
                        let exact: f64 = w.iter().zip(xa).map(|(&w, &x)| w as f64 * x as f64).sum();
                        let mag: f64 = w
                            .iter()
                            .zip(xa)
                            .map(|(&w, &x)| (w as f64 * x as f64).abs())
                            .sum();
                        assert!(
                            (*d as f64 - exact).abs() <= 1e-5 * mag,
                            "{isa:?} {name} row {i} act {a}: {d} vs {exact}"
                        );
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn the_best_kernel_is_picked() {
        let best = Isa::ALL.into_iter().find(|i| i.available()).unwrap();
        assert!(std::ptr::fn_addr_eq(kernel(), best.rows_dot()));
    }
}
