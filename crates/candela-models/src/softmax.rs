//! Softmax with a vectorised `exp` on the CPU.
//!
//! candle's CPU softmax calls libm's scalar `expf` per score; for the
//! vision tower (one ~4,000 x 4,000 score matrix per head and layer for a
//! 1024x768 image) that was about half of a cold image request. Here the
//! exponentials run 8 lanes at a time in AVX2 (picked at run time), with a
//! relative error within 2 ulp of the exact value. Other devices and dtypes
//! go to candle's softmax unchanged.

use candle_core::{CpuStorage, DType, Result, Storage, Tensor, D};
use rayon::prelude::*;

/// `xs[i] = exp(xs[i] - shift)`, returning the sum of the new values (the
/// softmax numerator and denominator for `shift` = the row's maximum).
pub fn exp_shifted_sum(xs: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
        return unsafe { avx2::exp_shifted_sum(xs, shift) };
    }
    let mut sum = 0f32;
    for x in xs.iter_mut() {
        *x = (*x - shift).exp();
        sum += *x;
    }
    sum
}

/// Largest element of `xs` (`-inf` when empty).
pub fn max(xs: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx2() {
        // SAFETY: as above.
        return unsafe { avx2::max(xs) };
    }
    xs.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// Softmax of one row, in place.
pub fn softmax_in_place(row: &mut [f32]) {
    let m = max(row);
    let inv = 1.0 / exp_shifted_sum(row, m);
    row.iter_mut().for_each(|x| *x *= inv);
}

/// Softmax over the last dimension; f32 CPU tensors take the vectorised
/// path, rows in parallel.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || x.rank() == 0 {
        return candle_nn::ops::softmax_last_dim(x);
    }
    let x = x.contiguous()?;
    let dim = x.dim(D::Minus1)?;
    if dim == 0 || x.elem_count() == 0 {
        return Ok(x);
    }
    let mut out = {
        let (storage, layout) = x.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(v)) = &*storage else {
            candle_core::bail!("softmax: expected f32 CPU storage");
        };
        let start = layout.start_offset();
        v[start..start + x.elem_count()].to_vec()
    };
    out.par_chunks_mut(dim).for_each(softmax_in_place);
    Tensor::from_vec(out, x.shape(), x.device())
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// exp(x) for 8 lanes: x = n ln2 + r with |r| <= ln2/2, exp(r) by its
    /// Taylor series to r^7 (truncation < 6e-9 relative), times 2^n built
    /// in the exponent bits. Below -87 the result is 0 (as `-inf` scores
    /// must give); above 88 it saturates at exp(88). NaN stays NaN.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp8(x: __m256) -> __m256 {
        // ln2 in two parts: the high part has 9 significant bits, so n * hi
        // is exact for |n| <= 128 and r keeps its low bits.
        const LN2_HI: f32 = 355.0 / 512.0;
        const LN2_LO: f32 = -2.121_944_4e-4;
        let lo = _mm256_set1_ps(-87.0);
        // max/min with x second so a NaN lane passes through.
        let xc = _mm256_min_ps(_mm256_set1_ps(88.0), _mm256_max_ps(lo, x));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(xc, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), xc);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        // 1 + r + r^2/2! + ... + r^7/7!, Horner form.
        const INV_FACT: [f32; 8] = [
            1.0,
            1.0,
            1.0 / 2.0,
            1.0 / 6.0,
            1.0 / 24.0,
            1.0 / 120.0,
            1.0 / 720.0,
            1.0 / 5040.0,
        ];
        let mut p = _mm256_set1_ps(INV_FACT[7]);
        for c in INV_FACT[..7].iter().rev() {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
        }
        // 2^n for n in [-126, 127]: the biased exponent alone.
        let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        )));
        let e = _mm256_mul_ps(p, pow2);
        _mm256_andnot_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(x, lo), e)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_shifted_sum(xs: &mut [f32], shift: f32) -> f32 {
        let sh = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        let mut chunks = xs.chunks_exact_mut(8);
        for c in &mut chunks {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), sh));
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            acc = _mm256_add_ps(acc, e);
        }
        let tail = chunks.into_remainder();
        let mut sum = hsum(acc);
        if !tail.is_empty() {
            // The tail through the same exp, padded with -inf (exp = 0).
            let mut buf = [f32::NEG_INFINITY; 8];
            buf[..tail.len()].copy_from_slice(tail);
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(buf.as_ptr()), sh));
            _mm256_storeu_ps(buf.as_mut_ptr(), e);
            tail.copy_from_slice(&buf[..tail.len()]);
            sum += hsum(e);
        }
        sum
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn max(xs: &[f32]) -> f32 {
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        let chunks = xs.chunks_exact(8);
        let tail = chunks.remainder();
        for c in chunks {
            m = _mm256_max_ps(m, _mm256_loadu_ps(c.as_ptr()));
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), m);
        lanes
            .iter()
            .chain(tail)
            .copied()
            .fold(f32::NEG_INFINITY, f32::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between two positive floats.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp_over_the_softmax_range() {
        // Every 97th float bit pattern between -87 and 0 (about 11M values),
        // plus small positive arguments, against f64's exp rounded to f32.
        let mut xs: Vec<f32> = (0..0xC2AE_0000u32 - 0x8000_0000)
            .step_by(97)
            .map(|b| f32::from_bits(0x8000_0000 + b))
            .filter(|x| *x >= -87.0)
            .collect();
        xs.extend((0..2000).map(|i| i as f32 * 0.04));
        let mut got = xs.clone();
        exp_shifted_sum(&mut got, 0.0);
        let worst = xs
            .iter()
            .zip(&got)
            .map(|(x, g)| ulps(*g, (*x as f64).exp() as f32))
            .max()
            .unwrap();
        assert!(worst <= 2, "worst error {worst} ulp");
    }

    #[test]
    fn masked_scores_give_zero_and_nan_stays_nan() {
        let mut xs = vec![
            0.0,
            f32::NEG_INFINITY,
            -100.0,
            -87.5,
            1.0,
            f32::NAN,
            -1.0,
            2.0,
            -3.0,
            -0.5,
            f32::NEG_INFINITY,
        ];
        let sum = exp_shifted_sum(&mut xs, 0.0);
        assert_eq!(xs[1], 0.0);
        assert_eq!(xs[2], 0.0);
        assert_eq!(xs[10], 0.0);
        assert!(xs[5].is_nan() && sum.is_nan());
        assert_eq!(xs[0], 1.0);
    }

    #[test]
    fn softmax_matches_candle_on_odd_rows() {
        let dev = candle_core::Device::Cpu;
        for cols in [1usize, 7, 8, 9, 33, 1000] {
            let vals: Vec<f32> = (0..5 * cols)
                .map(|i| ((i * 7919) % 613) as f32 * 0.05 - 15.0)
                .collect();
            let t = Tensor::from_vec(vals, (5, cols), &dev).unwrap();
            let ours: Vec<f32> = softmax_last_dim(&t)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let theirs: Vec<f32> = candle_nn::ops::softmax_last_dim(&t)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (a, b) in ours.iter().zip(&theirs) {
                assert!(
                    (a - b).abs() <= 2e-7 + 1e-6 * b.abs(),
                    "{cols} cols: {a} vs {b}"
                );
            }
        }
        // A strided view (the transpose) is made contiguous first (candle's
        // own softmax refuses it).
        let t = Tensor::arange(0f32, 12.0, &dev)
            .unwrap()
            .reshape((3, 4))
            .unwrap()
            .t()
            .unwrap();
        let ours: Vec<Vec<f32>> = softmax_last_dim(&t).unwrap().to_vec2().unwrap();
        let theirs: Vec<Vec<f32>> = candle_nn::ops::softmax_last_dim(&t.contiguous().unwrap())
            .unwrap()
            .to_vec2()
            .unwrap();
        for (a, b) in ours.iter().flatten().zip(theirs.iter().flatten()) {
            assert!((a - b).abs() < 1e-6);
        }
    }
}
