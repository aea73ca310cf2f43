//! x86 integer kernels. Each 32-value weight group is unpacked once into 32
//! unsigned bytes (signed quants as |w| with w's sign moved onto the
//! activations, or offset quants taken unsigned with the offset applied from
//! the activations' sums; IQ4 indices looked up in their table with one
//! `vpshufb`) and multiplied with the 32 activation bytes of
//! each of up to 4 activation rows: batched rows share the unpacking, and
//! the rows' accumulators are independent chains. The 32-value formats
//! scale each group's i32 sums in f32 (the scales of 8 groups read and
//! combined as vectors); the K-quants and IQ4_XS multiply each sub-block's
//! i16 pair sums by its integer scale into i32 over the whole super-block
//! and scale once. Everything but the entry point is inlined into it
//! (`inline(always)`), so the accumulators stay in registers. Three builds of
//! the same kernels differ only in the multiplies: AVX2 `vpmaddubsw` +
//! `vpmaddwd` (pairs saturate at i16, which no format here reaches: at most
//! 2 x 128 x 127), and VNNI `vpdpbusd` / `vpdpwssd` in their AVX-VNNI and
//! AVX512-VNNI (256-bit, VL) encodings.

use std::arch::x86_64::*;

/// u8 x i8 products of 32 bytes, summed in fours into 8 i32 lanes.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn dot_maddubs(w: __m256i, a: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1))
}

#[target_feature(enable = "avx2,avxvnni")]
#[inline]
unsafe fn dot_avxvnni(w: __m256i, a: __m256i) -> __m256i {
    _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w, a)
}

#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
#[inline]
unsafe fn dot_avx512vnni(w: __m256i, a: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, a)
}

/// `acc + sum of pairs of (p x s)` in i32 lanes: i16 products of 32 bytes
/// (`vpmaddubsw`), times a sub-block's integer scale per i16 lane.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn scaled_maddubs(acc: __m256i, p: __m256i, s: __m256i) -> __m256i {
    _mm256_add_epi32(acc, _mm256_madd_epi16(p, s))
}

#[target_feature(enable = "avx2,avxvnni")]
#[inline]
unsafe fn scaled_avxvnni(acc: __m256i, p: __m256i, s: __m256i) -> __m256i {
    _mm256_dpwssd_avx_epi32(acc, p, s)
}

#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
#[inline]
unsafe fn scaled_avx512vnni(acc: __m256i, p: __m256i, s: __m256i) -> __m256i {
    _mm256_dpwssd_epi32(acc, p, s)
}

/// The formats as const parameters: of the 32-value formats' one kernel
/// (`legacy`), and of the row loop around each format's kernel (`by`).
const Q8_0: u8 = 0;
const Q4_0: u8 = 1;
const Q4_1: u8 = 2;
const Q5_0: u8 = 3;
const Q5_1: u8 = 4;
const IQ4_NL: u8 = 5;
const Q2K: u8 = 6;
const Q3K: u8 = 7;
const Q4K: u8 = 8;
const Q5K: u8 = 9;
const Q6K: u8 = 10;
const IQ4_XS: u8 = 11;

macro_rules! kernels {
    ($name:ident, $feat:literal, $dot:ident, $scaled:ident) => {
        pub mod $name {
            use std::arch::x86_64::*;

            use super::super::int_dot::{iq4xs_scale, q3k_scale};
            use super::super::q8::{Q8Row, QK};
            use super::super::{scales_mins_k4, BlockType, IQ4_VALUES};
            use super::{IQ4_NL, IQ4_XS, Q2K, Q3K, Q4K, Q4_0, Q4_1, Q5K, Q5_0, Q5_1, Q6K, Q8_0};
            use crate::cpu::prefetch_ahead;

            #[inline(always)]
            unsafe fn dot(w: __m256i, a: __m256i) -> __m256i {
                super::$dot(w, a)
            }

            /// `acc + (u8 w x i8 a, summed in pairs) x s`, in i32 lanes.
            #[inline(always)]
            unsafe fn dot_scaled(acc: __m256i, w: __m256i, a: __m256i, s: __m256i) -> __m256i {
                super::$scaled(acc, _mm256_maddubs_epi16(w, a), s)
            }

            #[inline(always)]
            unsafe fn f16(b: &[u8], i: usize) -> f32 {
                let h = u16::from_le_bytes([b[i], b[i + 1]]);
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
            }

            #[inline(always)]
            unsafe fn load32(p: &[u8]) -> __m256i {
                _mm256_loadu_si256(p[..32].as_ptr() as *const __m256i)
            }

            /// 32 activation bytes at `p` (inside a row [`Acts`] points into).
            #[inline(always)]
            unsafe fn load_acts(p: *const i8) -> __m256i {
                _mm256_loadu_si256(p as *const __m256i)
            }

            /// `acc + f32(p) * s`.
            #[inline(always)]
            unsafe fn fma(acc: __m256, p: __m256i, s: __m256) -> __m256 {
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc)
            }

            #[inline(always)]
            unsafe fn hsum(v: __m256) -> f32 {
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
            }

            /// 16 packed bytes as 32 nibbles: low nibbles first, then high.
            #[inline(always)]
            unsafe fn nibbles(q: &[u8]) -> __m256i {
                let q = _mm_loadu_si128(q[..16].as_ptr() as *const __m128i);
                let both = _mm256_set_m128i(_mm_srli_epi16(q, 4), q);
                _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
            }

            /// 16 bytes of IQ4 index pairs as their 32 table values (i8).
            #[inline(always)]
            unsafe fn iq4_values(q: &[u8]) -> __m256i {
                let table = _mm256_broadcastsi128_si256(_mm_loadu_si128(
                    IQ4_VALUES.as_ptr() as *const __m128i
                ));
                _mm256_shuffle_epi8(table, nibbles(q))
            }

            /// Bit j of `qh` as 0x10 in byte j.
            #[inline(always)]
            unsafe fn high_bits(qh: u32) -> __m256i {
                // Byte j takes byte j / 8 of qh, then keeps only bit j % 8.
                let spread = _mm256_shuffle_epi8(
                    _mm256_set1_epi32(qh as i32),
                    _mm256_setr_epi64x(
                        0,
                        0x0101_0101_0101_0101,
                        0x0202_0202_0202_0202,
                        0x0303_0303_0303_0303,
                    ),
                );
                let bit = _mm256_set1_epi64x(i64::from_le_bytes([1, 2, 4, 8, 16, 32, 64, 128]));
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
                _mm256_and_si256(set, _mm256_set1_epi8(0x10))
            }

            /// A 32-value format's block size in bytes.
            const fn block_bytes<const T: u8>() -> usize {
                match T {
                    Q8_0 => 34,
                    Q4_0 | IQ4_NL => 18,
                    Q4_1 => 20,
                    Q5_0 => 22,
                    _ => 24,
                }
            }

            /// The activation rows as raw pointers (quants, scales, scaled
            /// sums), read once: the block loop then keeps them in
            /// registers instead of re-reading the slices and checking
            /// bounds per block.
            struct Acts<const M: usize> {
                qs: [*const i8; M],
                d: [*const f32; M],
                dsum: [*const f32; M],
                sum16: [*const i16; M],
            }

            impl<const M: usize> Acts<M> {
                /// [`Self::of`] for `nsb` super-blocks of a format that
                /// takes the activations' sums per 16 (checked here).
                fn of_sums16(a: &[Q8Row; M], nsb: usize) -> Self {
                    assert!(a.iter().all(|a| a.d.len() >= 8 * nsb
                        && a.sum16.len() >= 16 * nsb
                        && a.qs.len() >= 256 * nsb));
                    Self::of(a)
                }

                fn of(a: &[Q8Row; M]) -> Self {
                    Self {
                        qs: std::array::from_fn(|i| a[i].qs.as_ptr()),
                        d: std::array::from_fn(|i| a[i].d.as_ptr()),
                        dsum: std::array::from_fn(|i| a[i].dsum.as_ptr()),
                        sum16: std::array::from_fn(|i| a[i].sum16.as_ptr()),
                    }
                }
            }

            /// Block `b` of a 32-value-format row (`blk` its first byte)
            /// with block `b` of each activation row: `acc[i] += dot *
            /// scale[i]` (the weight's and the activation block's scales).
            ///
            /// # Safety
            /// `blk` points at a whole block; each activation row has block `b`.
            #[inline(always)]
            unsafe fn legacy_dot<const T: u8, const M: usize>(
                blk: *const u8,
                a: &Acts<M>,
                b: usize,
                acc: &mut [__m256; M],
                scale: &[__m256; M],
            ) {
                let blk = std::slice::from_raw_parts(blk, block_bytes::<T>());
                let w = match T {
                    Q8_0 => load32(&blk[2..]),
                    IQ4_NL => iq4_values(&blk[2..]),
                    Q4_0 => nibbles(&blk[2..]),
                    Q4_1 => nibbles(&blk[4..]),
                    _ => {
                        let h = if T == Q5_0 { 2 } else { 4 };
                        let qh = u32::from_le_bytes([blk[h], blk[h + 1], blk[h + 2], blk[h + 3]]);
                        _mm256_or_si256(nibbles(&blk[h + 4..]), high_bits(qh))
                    }
                };
                // Signed quants: |w| times the activations with w's sign.
                let signed = T == Q8_0 || T == IQ4_NL;
                let wu = if signed { _mm256_abs_epi8(w) } else { w };
                for i in 0..M {
                    let x = load_acts(a.qs[i].add(QK * b));
                    let x = if signed { _mm256_sign_epi8(x, w) } else { x };
                    acc[i] = fma(acc[i], dot(wu, x), scale[i]);
                }
            }

            /// The f16 in the low (or, with `HIGH`, high) half of each of 8
            /// i32 lanes, as 8 f32.
            #[inline(always)]
            unsafe fn halves8<const HIGH: bool>(raw: __m256i) -> __m256 {
                let h = if HIGH {
                    _mm256_srli_epi32(raw, 16)
                } else {
                    _mm256_and_si256(raw, _mm256_set1_epi32(0xFFFF))
                };
                // Per 128-bit lane [h0..h3, h0..h3] as u16; then the low
                // quadwords of both lanes side by side.
                let packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0b00_00_10_00);
                _mm256_cvtph_ps(_mm256_castsi256_si128(packed))
            }

            /// Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 rows: blocks in groups of 8,
            /// whose scales (and offsets) are converted and combined with
            /// the activation blocks' scales as vectors, each block's then
            /// broadcast (per block this saves the scalar f16 conversion and
            /// multiply that otherwise bound the kernel); two accumulators
            /// per activation row. Tail blocks take the scalar-scale path.
            #[inline(always)]
            unsafe fn legacy<const T: u8, const M: usize>(row: &[u8], a: &[Q8Row; M]) -> [f32; M] {
                let bsz = block_bytes::<T>();
                let nb = row.len() / bsz;
                assert!(a
                    .iter()
                    .all(|a| a.d.len() >= nb && a.dsum.len() >= nb && a.qs.len() >= nb * QK));
                let acts = Acts::of(a);
                let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); M], [_mm256_setzero_ps(); M]);
                let mut offs_v = [_mm256_setzero_ps(); M];
                let mut offs = [0f32; M];
                let rp = row.as_ptr();
                let mut b = 0;
                while b + 8 <= nb {
                    prefetch_ahead(&row[bsz * b..], 8 * bsz);
                    // The first 4 bytes of each block: d, and Q4_1 / Q5_1's m.
                    // Eight loads, not `vpgatherdd`: on Zen 2 the gather
                    // made Q4_0 decode 18 % slower (15.5 vs 19.0 tok/s).
                    let head = |j: usize| (rp.add(bsz * (b + j)) as *const i32).read_unaligned();
                    let raw = _mm256_setr_epi32(
                        head(0),
                        head(1),
                        head(2),
                        head(3),
                        head(4),
                        head(5),
                        head(6),
                        head(7),
                    );
                    let dw = halves8::<false>(raw);
                    // Each block's scale is broadcast from memory (a load)
                    // rather than permuted out of a register (a shuffle).
                    let mut scales = [[0f32; 8]; M];
                    for (i, s) in scales.iter_mut().enumerate() {
                        let v = _mm256_mul_ps(dw, _mm256_loadu_ps(acts.d[i].add(b)));
                        _mm256_storeu_ps(s.as_mut_ptr(), v);
                    }
                    if T != Q8_0 && T != IQ4_NL {
                        let off = match T {
                            Q4_0 => _mm256_mul_ps(dw, _mm256_set1_ps(-8.0)),
                            Q5_0 => _mm256_mul_ps(dw, _mm256_set1_ps(-16.0)),
                            _ => halves8::<true>(raw),
                        };
                        for i in 0..M {
                            offs_v[i] = _mm256_fmadd_ps(
                                off,
                                _mm256_loadu_ps(acts.dsum[i].add(b)),
                                offs_v[i],
                            );
                        }
                    }
                    // Even blocks into acc0, odd into acc1, named statically
                    // so both stay in registers.
                    let lane_scales = |j: usize| -> [__m256; M] {
                        std::array::from_fn(|i| _mm256_set1_ps(scales[i][j]))
                    };
                    for j in (0..8).step_by(2) {
                        let (even, odd) = (lane_scales(j), lane_scales(j + 1));
                        legacy_dot::<T, M>(rp.add(bsz * (b + j)), &acts, b + j, &mut acc0, &even);
                        legacy_dot::<T, M>(
                            rp.add(bsz * (b + j + 1)),
                            &acts,
                            b + j + 1,
                            &mut acc1,
                            &odd,
                        );
                    }
                    b += 8;
                }
                while b < nb {
                    let blk = std::slice::from_raw_parts(rp.add(bsz * b), bsz);
                    let d = f16(blk, 0);
                    // Q4_0 decodes as (q - 8) d, Q5_0 as (q - 16) d, Q4_1 and
                    // Q5_1 as q d + m.
                    let off = match T {
                        Q8_0 | IQ4_NL => 0.0,
                        Q4_0 => -8.0 * d,
                        Q5_0 => -16.0 * d,
                        _ => f16(blk, 2),
                    };
                    let s: [__m256; M] =
                        std::array::from_fn(|i| _mm256_set1_ps(d * *acts.d[i].add(b)));
                    legacy_dot::<T, M>(blk.as_ptr(), &acts, b, &mut acc0, &s);
                    for i in 0..M {
                        offs[i] += off * *acts.dsum[i].add(b);
                    }
                    b += 1;
                }
                let mut out = [0f32; M];
                for i in 0..M {
                    out[i] = hsum(_mm256_add_ps(acc0[i], acc1[i])) + hsum(offs_v[i]) + offs[i];
                }
                out
            }

            /// Q4_K (and with `Q5`, Q5_K) rows: per 64 values, the low and
            /// high nibbles of 32 bytes are two sub-blocks with their own
            /// 6-bit scale and min (Q5_K adds bit 4 from `qh`). The
            /// activations share one scale per super-block (`act_group`), so
            /// the sub-blocks' products times their scales add up in i32 and
            /// convert once; the mins meet the blocks' `d * sum(a)` in f32.
            #[inline(always)]
            unsafe fn q4k_q5k<const Q5: bool, const M: usize>(
                row: &[u8],
                a: &[Q8Row; M],
            ) -> [f32; M] {
                let (bsz, qoff) = if Q5 { (176, 48) } else { (144, 16) };
                let nsb = row.len() / bsz;
                assert!(a.iter().all(|a| a.d.len() >= 8 * nsb
                    && a.dsum.len() >= 8 * nsb
                    && a.qs.len() >= 256 * nsb));
                let ap = Acts::of(a);
                let (mask, bit4) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x10));
                let mut acc = [_mm256_setzero_ps(); M];
                let mut offs = [_mm256_setzero_ps(); M];
                for (sb, blk) in row.chunks_exact(bsz).enumerate() {
                    prefetch_ahead(blk, blk.len());
                    let (d, dmin) = (f16(blk, 0), f16(blk, 2));
                    let Ok(scales) = <&[u8; 12]>::try_from(&blk[4..16]) else {
                        continue;
                    };
                    let (sc, mn) = scales_mins_k4(scales);
                    let mins = _mm256_mul_ps(
                        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(
                            i64::from_le_bytes(mn),
                        ))),
                        _mm256_set1_ps(dmin),
                    );
                    // Scale j in both bytes of i16 lane j (and j + 8): a
                    // byte shuffle broadcasts it.
                    let sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(
                        i64::from_le_bytes(sc),
                    )));
                    let scale = |j: i16| {
                        _mm256_shuffle_epi8(sc16, _mm256_set1_epi16(((2 * j + 1) << 8) | (2 * j)))
                    };
                    // Q5_K: bits 2c and 2c+1 of qh[l] are bit 4 of chunk c's
                    // low and high nibble quants; shifted down 2 per chunk.
                    let mut qh = if Q5 {
                        load32(&blk[16..])
                    } else {
                        _mm256_setzero_si256()
                    };
                    // Two i32 chains per row (low and high nibbles).
                    let (mut s0, mut s1) =
                        ([_mm256_setzero_si256(); M], [_mm256_setzero_si256(); M]);
                    for c in 0..4 {
                        let q = load32(&blk[qoff + 32 * c..]);
                        let mut lo = _mm256_and_si256(q, mask);
                        let mut hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), mask);
                        if Q5 {
                            lo = _mm256_or_si256(
                                lo,
                                _mm256_and_si256(_mm256_slli_epi16(qh, 4), bit4),
                            );
                            hi = _mm256_or_si256(
                                hi,
                                _mm256_and_si256(_mm256_slli_epi16(qh, 3), bit4),
                            );
                            qh = _mm256_srli_epi16(qh, 2);
                        }
                        let (c0, c1) = (scale(2 * c as i16), scale(2 * c as i16 + 1));
                        for i in 0..M {
                            let x = ap.qs[i].add(256 * sb + 64 * c);
                            s0[i] = dot_scaled(s0[i], lo, load_acts(x), c0);
                            s1[i] = dot_scaled(s1[i], hi, load_acts(x.add(QK)), c1);
                        }
                    }
                    add_super_block(&mut acc, &s0, &s1, d, &ap, sb);
                    for i in 0..M {
                        let dsum = _mm256_loadu_ps(ap.dsum[i].add(8 * sb));
                        offs[i] = _mm256_fmadd_ps(mins, dsum, offs[i]);
                    }
                }
                let mut out = [0f32; M];
                for i in 0..M {
                    out[i] = hsum(_mm256_sub_ps(acc[i], offs[i]));
                }
                out
            }

            /// `acc[i] += f32(s0[i] + s1[i]) * d * a_i`: a super-block's i32
            /// sums (two chains) scaled by the weight's `d` and activation
            /// row i's scale for super-block `sb`.
            #[inline(always)]
            unsafe fn add_super_block<const M: usize>(
                acc: &mut [__m256; M],
                s0: &[__m256i; M],
                s1: &[__m256i; M],
                d: f32,
                ap: &Acts<M>,
                sb: usize,
            ) {
                for i in 0..M {
                    let s = _mm256_add_epi32(s0[i], s1[i]);
                    acc[i] = fma(acc[i], s, _mm256_set1_ps(d * *ap.d[i].add(8 * sb)));
                }
            }

            /// The 2-bit fields of 32 bytes, lowest first: field j of byte
            /// l is quant l of group j.
            #[inline(always)]
            unsafe fn crumbs(q: __m256i) -> [__m256i; 4] {
                let m3 = _mm256_set1_epi8(3);
                [
                    _mm256_and_si256(q, m3),
                    _mm256_and_si256(_mm256_srli_epi16(q, 2), m3),
                    _mm256_and_si256(_mm256_srli_epi16(q, 4), m3),
                    _mm256_and_si256(_mm256_srli_epi16(q, 6), m3),
                ]
            }

            /// The i16 lanes of one 32-value group `g` (0..8) of a
            /// super-block with 16-value scales: lanes 0..8 take scale 2g,
            /// 8..16 scale 2g + 1, picked by byte shuffles from `sc16` (the
            /// group's half of the 16 scales as i16, in both 128-bit lanes).
            #[inline(always)]
            unsafe fn group_scales(sc16: __m256i, g: usize) -> __m256i {
                let (l, h) = (4 * (g % 4) as i16, 4 * (g % 4) as i16 + 2);
                _mm256_shuffle_epi8(
                    sc16,
                    _mm256_set_m128i(
                        _mm_set1_epi16(((h + 1) << 8) | h),
                        _mm_set1_epi16(((l + 1) << 8) | l),
                    ),
                )
            }

            /// Scales 8 half..8 half + 8 of `sc` (16 i8) as i16 in both
            /// 128-bit lanes, for [`group_scales`].
            #[inline(always)]
            unsafe fn half_scales(sc: __m128i, half: usize) -> __m256i {
                let sc = if half == 0 {
                    sc
                } else {
                    _mm_unpackhi_epi64(sc, sc)
                };
                _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(sc))
            }

            /// Unsigned quants `w` of 32-value group `ag` (of the row) times
            /// each activation row's group, their i16 pairs times the scales
            /// `s`, into the even (`s0`) or odd (`s1`) groups' i32 chains.
            #[inline(always)]
            unsafe fn group_dot<const M: usize>(
                s0: &mut [__m256i; M],
                s1: &mut [__m256i; M],
                odd: bool,
                w: __m256i,
                s: __m256i,
                ap: &Acts<M>,
                ag: usize,
            ) {
                for i in 0..M {
                    let x = load_acts(ap.qs[i].add(QK * ag));
                    if odd {
                        s1[i] = dot_scaled(s1[i], w, x, s);
                    } else {
                        s0[i] = dot_scaled(s0[i], w, x, s);
                    }
                }
            }

            /// `sum_j s_j * sum16_j` over a super-block's 16 sub-blocks, for
            /// activation row `i` (8 i32 lanes).
            #[inline(always)]
            unsafe fn sub_block_sums<const M: usize>(
                s16: __m256i,
                ap: &Acts<M>,
                i: usize,
                sb: usize,
            ) -> __m256i {
                let sums = _mm256_loadu_si256(ap.sum16[i].add(16 * sb) as *const __m256i);
                _mm256_madd_epi16(s16, sums)
            }

            /// Q2_K rows: per 32 values, 2-bit quants in 0..4 with a 4-bit
            /// scale and min per 16. The activations share one scale per
            /// super-block (`act_group`): products times scales add up in
            /// i32 and the mins meet the activations' sums per 16 in i32,
            /// each converted once per super-block.
            #[inline(always)]
            unsafe fn q2k<const M: usize>(row: &[u8], a: &[Q8Row; M]) -> [f32; M] {
                let nsb = row.len() / 84;
                let ap = Acts::of_sums16(a, nsb);
                let m4 = _mm_set1_epi8(0x0F);
                let (mut acc, mut offs) = ([_mm256_setzero_ps(); M], [_mm256_setzero_ps(); M]);
                for (sb, blk) in row.chunks_exact(84).enumerate() {
                    prefetch_ahead(blk, blk.len());
                    let (d, dmin) = (f16(blk, 80), f16(blk, 82));
                    let packed = _mm_loadu_si128(blk[..16].as_ptr() as *const __m128i);
                    let sc = _mm_and_si128(packed, m4);
                    let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(packed, 4), m4));
                    let (mut s0, mut s1) =
                        ([_mm256_setzero_si256(); M], [_mm256_setzero_si256(); M]);
                    for half in 0..2 {
                        let sc16 = half_scales(sc, half);
                        let ws = crumbs(load32(&blk[16 + 32 * half..]));
                        for (j, w) in ws.into_iter().enumerate() {
                            let g = 4 * half + j;
                            let s = group_scales(sc16, g);
                            group_dot(&mut s0, &mut s1, j % 2 == 1, w, s, &ap, 8 * sb + g);
                        }
                    }
                    add_super_block(&mut acc, &s0, &s1, d, &ap, sb);
                    for i in 0..M {
                        let m = _mm256_cvtepi32_ps(sub_block_sums(mins, &ap, i, sb));
                        let dm = _mm256_set1_ps(dmin * *ap.d[i].add(8 * sb));
                        offs[i] = _mm256_fmadd_ps(m, dm, offs[i]);
                    }
                }
                let mut out = [0f32; M];
                for i in 0..M {
                    out[i] = hsum(_mm256_sub_ps(acc[i], offs[i]));
                }
                out
            }

            /// Q3_K rows: Q2_K's 2-bit fields plus bit 2 from `hmask` make
            /// `q + 4` in 0..8, multiplied unsigned; each 16 values' signed
            /// 6-bit scale applies to its i16 lanes, and the `- 4` comes off
            /// once per super-block as `4 * sum_j sc_j * sum16_j` (as
            /// Q6_K's `- 32`). Products times scales add up in i32 over the
            /// super-block (the activations share one scale there).
            #[inline(always)]
            unsafe fn q3k<const M: usize>(row: &[u8], a: &[Q8Row; M]) -> [f32; M] {
                let nsb = row.len() / 110;
                let ap = Acts::of_sums16(a, nsb);
                let four = _mm256_set1_epi8(4);
                let mut acc = [_mm256_setzero_ps(); M];
                for (sb, blk) in row.chunks_exact(110).enumerate() {
                    prefetch_ahead(blk, blk.len());
                    let d = f16(blk, 108);
                    let Ok(scales) = <&[u8; 12]>::try_from(&blk[96..108]) else {
                        continue;
                    };
                    let sc_bytes: [i8; 16] = std::array::from_fn(|j| q3k_scale(scales, j) as i8);
                    let sc = _mm_loadu_si128(sc_bytes.as_ptr() as *const __m128i);
                    let sc_all = _mm256_cvtepi8_epi16(sc);
                    let (mut s0, mut s1) =
                        ([_mm256_setzero_si256(); M], [_mm256_setzero_si256(); M]);
                    for i in 0..M {
                        let off = _mm256_slli_epi32(sub_block_sums(sc_all, &ap, i, sb), 2);
                        s0[i] = _mm256_sub_epi32(s0[i], off);
                    }
                    let hm = load32(blk);
                    for half in 0..2 {
                        let sc16 = half_scales(sc, half);
                        let lows = crumbs(load32(&blk[32 + 32 * half..]));
                        for (j, lo) in lows.into_iter().enumerate() {
                            let g = 4 * half + j;
                            let bit = _mm256_set1_epi8(1 << g);
                            let set = _mm256_cmpeq_epi8(_mm256_and_si256(hm, bit), bit);
                            let w = _mm256_or_si256(lo, _mm256_and_si256(set, four));
                            let s = group_scales(sc16, g);
                            group_dot(&mut s0, &mut s1, j % 2 == 1, w, s, &ap, 8 * sb + g);
                        }
                    }
                    add_super_block(&mut acc, &s0, &s1, d, &ap, sb);
                }
                acc.map(|a| hsum(a))
            }

            /// Q6_K rows: per 32 values, 4 low bits and 2 high bits make
            /// `q` in 0..64, multiplied unsigned; each 16 values' signed
            /// 8-bit scale applies to its i16 lanes, and the `- 32` of every
            /// quant comes off once per super-block as `32 * sum_j sc_j *
            /// sum16_j` (the activations' sums per 16). The activations share
            /// one scale per super-block (`act_group`): products times
            /// scales add up in i32, converted once.
            #[inline(always)]
            unsafe fn q6k<const M: usize>(row: &[u8], a: &[Q8Row; M]) -> [f32; M] {
                let (m4, m3) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(3));
                let nsb = row.len() / 210;
                let ap = Acts::of_sums16(a, nsb);
                let mut acc = [_mm256_setzero_ps(); M];
                for (sb, blk) in row.chunks_exact(210).enumerate() {
                    prefetch_ahead(blk, blk.len());
                    let d = f16(blk, 208);
                    // The 16 scales as i16, for the offset and (per half, in
                    // both 128-bit lanes) for the products.
                    let sc = _mm_loadu_si128(blk[192..208].as_ptr() as *const __m128i);
                    let sc_all = _mm256_cvtepi8_epi16(sc);
                    let (mut s0, mut s1) =
                        ([_mm256_setzero_si256(); M], [_mm256_setzero_si256(); M]);
                    for i in 0..M {
                        let off = _mm256_slli_epi32(sub_block_sums(sc_all, &ap, i, sb), 5);
                        s0[i] = _mm256_sub_epi32(s0[i], off);
                    }
                    for half in 0..2 {
                        let ql0 = load32(&blk[64 * half..]);
                        let ql1 = load32(&blk[64 * half + 32..]);
                        let qh = load32(&blk[128 + 32 * half..]);
                        let sc16 = half_scales(sc, half);
                        let lows = [
                            _mm256_and_si256(ql0, m4),
                            _mm256_and_si256(ql1, m4),
                            _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                            _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                        ];
                        let highs = [
                            qh,
                            _mm256_srli_epi16(qh, 2),
                            _mm256_srli_epi16(qh, 4),
                            _mm256_srli_epi16(qh, 6),
                        ];
                        for t in 0..4 {
                            let g = 4 * half + t;
                            let high = _mm256_slli_epi16(_mm256_and_si256(highs[t], m3), 4);
                            let q = _mm256_or_si256(lows[t], high);
                            let s = group_scales(sc16, g);
                            group_dot(&mut s0, &mut s1, t % 2 == 1, q, s, &ap, 8 * sb + g);
                        }
                    }
                    add_super_block(&mut acc, &s0, &s1, d, &ap, sb);
                }
                acc.map(|a| hsum(a))
            }

            /// IQ4_XS rows: per 32 values, 16 bytes of indices into the
            /// IQ4 table (signed: |w| with w's sign moved onto the
            /// activations) and a 6-bit sub-scale; as for the K-quants, the
            /// activations share one scale per super-block, so the
            /// sub-blocks' products times their scales add up in i32 and
            /// convert once.
            #[inline(always)]
            unsafe fn iq4xs<const M: usize>(row: &[u8], a: &[Q8Row; M]) -> [f32; M] {
                let nsb = row.len() / 136;
                assert!(a
                    .iter()
                    .all(|a| a.d.len() >= 8 * nsb && a.qs.len() >= 256 * nsb));
                let ap = Acts::of(a);
                let mut acc = [_mm256_setzero_ps(); M];
                for (sb, blk) in row.chunks_exact(136).enumerate() {
                    prefetch_ahead(blk, blk.len());
                    let d = f16(blk, 0);
                    // Two i32 chains per row (even and odd sub-blocks).
                    let (mut s0, mut s1) =
                        ([_mm256_setzero_si256(); M], [_mm256_setzero_si256(); M]);
                    for j in 0..8 {
                        let w = iq4_values(&blk[8 + 16 * j..]);
                        let wu = _mm256_abs_epi8(w);
                        let s = _mm256_set1_epi16(iq4xs_scale(blk, j) as i16);
                        for i in 0..M {
                            let x = _mm256_sign_epi8(load_acts(ap.qs[i].add(256 * sb + QK * j)), w);
                            if j % 2 == 0 {
                                s0[i] = dot_scaled(s0[i], wu, x, s);
                            } else {
                                s1[i] = dot_scaled(s1[i], wu, x, s);
                            }
                        }
                    }
                    add_super_block(&mut acc, &s0, &s1, d, &ap, sb);
                }
                acc.map(|a| hsum(a))
            }

            /// Format `T`'s kernel: one weight row with `M` activation rows.
            #[inline(always)]
            unsafe fn by<const T: u8, const M: usize>(row: &[u8], a: &[Q8Row; M]) -> [f32; M] {
                match T {
                    Q2K => q2k::<M>(row, a),
                    Q3K => q3k::<M>(row, a),
                    Q4K => q4k_q5k::<false, M>(row, a),
                    Q5K => q4k_q5k::<true, M>(row, a),
                    Q6K => q6k::<M>(row, a),
                    IQ4_XS => iq4xs::<M>(row, a),
                    _ => legacy::<T, M>(row, a),
                }
            }

            /// Format `T`'s weight rows, each with all the activation rows
            /// (four per pass over the row): the row loop inlined around the
            /// kernel.
            #[inline(always)]
            unsafe fn rows_of<const T: u8>(
                rows: &[u8],
                row_bytes: usize,
                a: &[Q8Row],
                out: &mut [f32],
            ) {
                let m = a.len();
                for (row, out) in rows.chunks_exact(row_bytes).zip(out.chunks_exact_mut(m)) {
                    let mut i = 0;
                    while i < m {
                        let rest = &a[i..];
                        let o = &mut out[i..];
                        i += match rest {
                            [a0, a1, a2, a3, ..] => {
                                o[..4].copy_from_slice(&by::<T, 4>(row, &[*a0, *a1, *a2, *a3]));
                                4
                            }
                            [a0, a1, ..] => {
                                o[..2].copy_from_slice(&by::<T, 2>(row, &[*a0, *a1]));
                                2
                            }
                            [a0, ..] => {
                                o[0] = by::<T, 1>(row, &[*a0])[0];
                                1
                            }
                            [] => unreachable!(),
                        };
                    }
                }
            }

            /// Weight rows of `dtype` (`row_bytes` each) dotted with each
            /// row of `a` ([`super::super::int_dot::RowsDot`]).
            ///
            /// # Safety
            /// The CPU must have the instruction sets this module is built for.
            #[target_feature(enable = $feat)]
            pub unsafe fn rows_dot(
                dtype: BlockType,
                rows: &[u8],
                row_bytes: usize,
                a: &[Q8Row],
                out: &mut [f32],
            ) {
                assert!(out.len() >= rows.len() / row_bytes * a.len());
                match dtype {
                    BlockType::Q8_0 => rows_of::<Q8_0>(rows, row_bytes, a, out),
                    BlockType::Q4_0 => rows_of::<Q4_0>(rows, row_bytes, a, out),
                    BlockType::Q4_1 => rows_of::<Q4_1>(rows, row_bytes, a, out),
                    BlockType::Q5_0 => rows_of::<Q5_0>(rows, row_bytes, a, out),
                    BlockType::Q5_1 => rows_of::<Q5_1>(rows, row_bytes, a, out),
                    BlockType::Q2K => rows_of::<Q2K>(rows, row_bytes, a, out),
                    BlockType::Q3K => rows_of::<Q3K>(rows, row_bytes, a, out),
                    BlockType::Q4K => rows_of::<Q4K>(rows, row_bytes, a, out),
                    BlockType::Q5K => rows_of::<Q5K>(rows, row_bytes, a, out),
                    BlockType::Q6K => rows_of::<Q6K>(rows, row_bytes, a, out),
                    BlockType::Iq4Nl => rows_of::<IQ4_NL>(rows, row_bytes, a, out),
                    BlockType::Iq4Xs => rows_of::<IQ4_XS>(rows, row_bytes, a, out),
                }
            }
        }
    };
}

kernels!(avx2, "avx2,fma,f16c", dot_maddubs, scaled_maddubs);
kernels!(
    avxvnni,
    "avx2,fma,f16c,avxvnni",
    dot_avxvnni,
    scaled_avxvnni
);
kernels!(
    avx512vnni,
    "avx2,fma,f16c,avx512vnni,avx512vl",
    dot_avx512vnni,
    scaled_avx512vnni
);
