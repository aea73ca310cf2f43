//! 16-bit (bf16 / f16) weight matrices on the CPU, kept 16-bit.
//!
//! A checkpoint's bf16 or f16 matrices stay in their 16-bit form (half the
//! memory of f32) and multiply f32 activations. A 16-bit value widens to f32
//! exactly, so the products are those of the f32 GEMM on the widened matrix
//! up to summation order; the activations are never rounded to 16 bits.
//!
//! Up to [`DOT_MAX_M`] input rows (decode, small batches) each weight row is
//! widened in registers and dotted with every input row, so the weights are
//! read once from memory. bf16 is the high half of an f32: in a 32-bit lane
//! holding a bf16 pair, the odd element is one AND away from an f32 and the
//! even one a shift, so the input rows are laid out once per call as the
//! matching even / odd lanes. f16 widens with `vcvtph2ps` (F16C, AVX-512F).
//! Larger products (prefill, encoders) take AVX-512 or AVX2 FMAs over
//! panels of widened weight rows ([`crate::panel_gemm`]), or in portable
//! code widen L2-sized tiles of weight rows to f32 for the f32 GEMM.
//!
//! The instruction set is picked at run time: AVX-512F (16 lanes), AVX2 +
//! FMA + F16C (8 lanes), or portable code.

use candle_core::{bail, DType, Device, Result, Tensor};
use half::vec::HalfFloatVecExt;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::quant::Activations;

/// Input rows up to which weight rows are dotted with each input row; above,
/// the panel engines (portable code: widened tiles and the f32 GEMM).
const DOT_MAX_M: usize = 4;
/// f32 elements of one widened weight tile (256 KiB, about L2).
const TILE_ELEMS: usize = 64 << 10;

/// The 16-bit float format of a [`HalfMatrix`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HalfDType {
    Bf16,
    F16,
}

impl HalfDType {
    pub fn of(dtype: DType) -> Option<Self> {
        match dtype {
            DType::BF16 => Some(Self::Bf16),
            DType::F16 => Some(Self::F16),
            _ => None,
        }
    }

    pub fn dtype(self) -> DType {
        match self {
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }

    #[inline(always)]
    fn widen(self, bits: u16) -> f32 {
        match self {
            Self::Bf16 => f32::from_bits((bits as u32) << 16),
            Self::F16 => f16::from_bits(bits).to_f32(),
        }
    }
}

/// The kernels' instruction sets, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    Avx512,
    Avx2,
    Scalar,
}

impl Isa {
    /// Every instruction set this CPU runs (tests force each).
    pub(crate) fn available() -> Vec<Isa> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::has_avx2() {
            if is_x86_feature_detected!("avx512f") {
                v.push(Isa::Avx512);
            }
            v.push(Isa::Avx2);
        }
        v.push(Isa::Scalar);
        v
    }

    fn best() -> Isa {
        use std::sync::OnceLock;
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| Isa::available()[0])
    }

    /// f32 lanes per vector: the chunk of a bf16 row is two vectors.
    fn lanes(self) -> usize {
        match self {
            Isa::Avx512 => 16,
            Isa::Avx2 => 8,
            Isa::Scalar => 1,
        }
    }
}

/// A `[n, k]` weight matrix of bf16 or f16 values, row-major.
pub struct HalfMatrix {
    dtype: HalfDType,
    n: usize,
    k: usize,
    data: Vec<u16>,
}

impl std::fmt::Debug for HalfMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HalfMatrix")
            .field("dtype", &self.dtype)
            .field("shape", &(self.n, self.k))
            .finish()
    }
}

impl HalfMatrix {
    /// A 2-D bf16 / f16 tensor's values (`None` for other dtypes).
    pub fn from_tensor(t: &Tensor) -> Result<Option<Self>> {
        let Some(dtype) = HalfDType::of(t.dtype()) else {
            return Ok(None);
        };
        let (n, k) = t.dims2()?;
        let flat = t.flatten_all()?;
        let data = match dtype {
            HalfDType::Bf16 => flat.to_vec1::<bf16>()?.reinterpret_into(),
            HalfDType::F16 => flat.to_vec1::<f16>()?.reinterpret_into(),
        };
        Ok(Some(Self { dtype, n, k, data }))
    }

    /// A `[n, k]` matrix whose little-endian values, row after row, `read`
    /// writes into place (a file read lands in the kernels' buffer).
    pub fn read(
        dtype: HalfDType,
        n: usize,
        k: usize,
        read: impl FnOnce(&mut [u8]) -> Result<()>,
    ) -> Result<Self> {
        // Written once by `read`.
        let mut data = crate::cpu::zeroed_weights::<u16>(n * k);
        // SAFETY: the u16 storage viewed as its bytes.
        read(unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr().cast::<u8>(), 2 * n * k) })?;
        if cfg!(target_endian = "big") {
            for v in &mut data {
                *v = u16::from_le(*v);
            }
        }
        Ok(Self { dtype, n, k, data })
    }

    /// Matrices of one format and input width as one, rows in order (e.g.
    /// q, k and v as one projection).
    pub fn stack(parts: &[&HalfMatrix]) -> Option<Self> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|p| p.dtype != first.dtype || p.k != first.k)
        {
            return None;
        }
        let mut data = crate::cpu::zeroed_weights::<u16>(parts.iter().map(|p| p.data.len()).sum());
        let mut at = 0;
        for p in parts {
            data[at..at + p.data.len()].copy_from_slice(&p.data);
            at += p.data.len();
        }
        Some(Self {
            dtype: first.dtype,
            n: parts.iter().map(|p| p.n).sum(),
            k: first.k,
            data,
        })
    }

    pub fn dtype(&self) -> HalfDType {
        self.dtype
    }

    /// `(n, k)`: output and input features.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    fn row(&self, r: usize) -> &[u16] {
        &self.data[r * self.k..(r + 1) * self.k]
    }

    /// Rows `ids` widened to an f32 tensor `[ids.len(), k]` (embedding lookup).
    pub fn embedding(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.n) {
            bail!("token id {bad} out of range (vocab size {})", self.n);
        }
        let isa = Isa::best();
        let mut out = vec![0f32; ids.len() * self.k];
        out.par_chunks_mut(self.k.max(1))
            .zip(ids.par_iter())
            .for_each(|(o, &id)| widen(isa, self.dtype, self.row(id as usize), o));
        Tensor::from_vec(out, (ids.len(), self.k), device)
    }

    /// `x` (`[m, k]` row-major f32) times the matrix transposed: `[m, n]`.
    pub fn matmul_f32(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        self.matmul_with(Isa::best(), x, m)
    }

    /// [`Self::matmul_f32`] with the given instruction set (which the CPU must run).
    pub(crate) fn matmul_with(&self, isa: Isa, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let (n, k) = (self.n, self.k);
        if x.len() != m * k {
            bail!(
                "16-bit matmul: input has {} elements, expected {m} x {k}",
                x.len()
            );
        }
        if m == 0 || n == 0 || k == 0 {
            return Ok(vec![0f32; m * n]);
        }
        if m > DOT_MAX_M {
            use crate::panel_gemm::Engine;
            let engine = match isa {
                Isa::Avx512 => Some(Engine::Avx512F32),
                Isa::Avx2 => Some(Engine::Avx2F32),
                Isa::Scalar => None,
            };
            if let Some(engine) = engine.filter(|e| Engine::available().contains(e)) {
                let mut out = vec![0f32; m * n];
                crate::panel_gemm::matmul(engine, x, m, k, n, self, &mut out);
                return Ok(out);
            }
        }
        // Computed as out^T `[n, m]`: each task owns whole rows of it.
        let mut out_t = vec![0f32; n * m];
        let threads = rayon::current_num_threads();
        if m <= DOT_MAX_M {
            let xp = self.lay_out(isa, x, m);
            let rows_per_task = (n / (threads * 8)).clamp(1, 64);
            out_t
                .par_chunks_mut(rows_per_task * m)
                .enumerate()
                .for_each(|(t, o)| {
                    let r0 = t * rows_per_task;
                    let w = &self.data[r0 * k..(r0 + o.len() / m) * k];
                    dot_rows(isa, self.dtype, w, k, &xp, m, o);
                });
        } else {
            let tile = (TILE_ELEMS / k)
                .clamp(8, 256)
                .min(n.div_ceil(threads).max(1));
            out_t.par_chunks_mut(tile * m).enumerate().for_each_init(
                || vec![0f32; tile * k],
                |buf, (t, o)| {
                    let (r0, nr) = (t * tile, o.len() / m);
                    let buf = &mut buf[..nr * k];
                    widen(isa, self.dtype, &self.data[r0 * k..(r0 + nr) * k], buf);
                    // SAFETY: buf is the tile `[nr, k]` (row stride k), x read
                    // as `[k, m]` (row stride 1, column stride k) and `o` the
                    // tile's `[nr, m]` rows of out^T; all stay in their buffers.
                    unsafe {
                        crate::cpu::gemm_f32(
                            (nr, m, k),
                            o.as_mut_ptr(),
                            m,
                            buf.as_ptr(),
                            k,
                            x.as_ptr(),
                            (1, k),
                        );
                    }
                },
            );
        }
        if m == 1 {
            return Ok(out_t);
        }
        let mut out = vec![0f32; m * n];
        for (r, row) in out_t.chunks_exact(m).enumerate() {
            for (i, v) in row.iter().enumerate() {
                out[i * n + r] = *v;
            }
        }
        Ok(out)
    }

    /// The input rows as the dot kernels read them: for bf16, each chunk of
    /// two vectors' worth of columns as its even then its odd columns (the
    /// tail as it is); f16 and portable code read `x` unchanged.
    fn lay_out(&self, isa: Isa, x: &[f32], m: usize) -> Vec<f32> {
        let lanes = isa.lanes();
        if self.dtype != HalfDType::Bf16 || lanes == 1 {
            return x.to_vec();
        }
        let k = self.k;
        let main = k / (2 * lanes) * (2 * lanes);
        let mut xp = x.to_vec();
        for (src, dst) in x.chunks_exact(k).zip(xp.chunks_exact_mut(k)).take(m) {
            for (s, d) in src[..main]
                .chunks_exact(2 * lanes)
                .zip(dst[..main].chunks_exact_mut(2 * lanes))
            {
                let (even, odd) = d.split_at_mut(lanes);
                for ((e, o), pair) in even.iter_mut().zip(odd).zip(s.chunks_exact(2)) {
                    *e = pair[0];
                    *o = pair[1];
                }
            }
        }
        xp
    }

    /// `x` `[tokens, k]` (f32, bf16 or f16) -> `[tokens, n]` in `x`'s dtype,
    /// on the bf16 matrix engine for [`Activations::Bf16`] where the CPU has
    /// one, else exactly (f32 products of the widened weights).
    pub fn forward(&self, x: &Tensor, acts: Activations) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        if k != self.k {
            bail!(
                "16-bit matmul: input has {k} features, matrix expects {}",
                self.k
            );
        }
        let in_dtype = x.dtype();
        let xv = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let y = match crate::panel_gemm::bf16_engine() {
            Some(engine) if acts == Activations::Bf16 => {
                let mut y = vec![0f32; m * self.n];
                crate::panel_gemm::matmul(engine, &xv, m, k, self.n, self, &mut y);
                y
            }
            _ => self.matmul_f32(&xv, m)?,
        };
        Tensor::from_vec(y, (m, self.n), x.device())?.to_dtype(in_dtype)
    }
}

impl crate::panel_gemm::WeightRows for HalfMatrix {
    fn fill_row(&self, r: usize, out: &mut [f32]) {
        widen(Isa::best(), self.dtype, self.row(r), out);
    }
}

/// `src` widened to f32 into `dst` (same length).
fn widen(isa: Isa, dtype: HalfDType, src: &[u16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: `isa` is one the CPU runs (Isa::available).
        Isa::Avx512 => return unsafe { x86::widen_avx512(dtype, src, dst) },
        Isa::Avx2 => return unsafe { x86::widen_avx2(dtype, src, dst) },
        Isa::Scalar => {}
    }
    let _ = isa;
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = dtype.widen(s);
    }
}

/// Weight rows `w` (`[o.len() / m, k]`) dotted with the `m` laid-out input
/// rows `xp`: `o[r * m + i]` = row r . x_i.
fn dot_rows(isa: Isa, dtype: HalfDType, w: &[u16], k: usize, xp: &[f32], m: usize, o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar {
        // SAFETY: `isa` is one the CPU runs (Isa::available), and `xp` was
        // laid out for it.
        unsafe {
            match (isa, m) {
                (Isa::Avx512, 1) => x86::dot_rows_avx512::<1>(dtype, w, k, xp, o),
                (Isa::Avx512, 2) => x86::dot_rows_avx512::<2>(dtype, w, k, xp, o),
                (Isa::Avx512, 3) => x86::dot_rows_avx512::<3>(dtype, w, k, xp, o),
                (Isa::Avx512, _) => x86::dot_rows_avx512::<4>(dtype, w, k, xp, o),
                (_, 1) => x86::dot_rows_avx2::<1>(dtype, w, k, xp, o),
                (_, 2) => x86::dot_rows_avx2::<2>(dtype, w, k, xp, o),
                (_, 3) => x86::dot_rows_avx2::<3>(dtype, w, k, xp, o),
                _ => x86::dot_rows_avx2::<4>(dtype, w, k, xp, o),
            }
        }
        return;
    }
    let _ = isa;
    for (row, or) in w.chunks_exact(k).zip(o.chunks_exact_mut(m)) {
        for (x, v) in xp.chunks_exact(k).zip(or.iter_mut()) {
            // Eight partial sums, so the loop vectorises without reassociation.
            let mut acc = [0f32; 8];
            let (wc, xc) = (row.chunks_exact(8), x.chunks_exact(8));
            let (wt, xt) = (wc.remainder(), xc.remainder());
            for (wb, xb) in wc.zip(xc) {
                for ((a, &w), &x) in acc.iter_mut().zip(wb).zip(xb) {
                    *a = dtype.widen(w).mul_add(x, *a);
                }
            }
            let mut s: f32 = acc.iter().sum();
            for (&a, &b) in wt.iter().zip(xt) {
                s = dtype.widen(a).mul_add(b, s);
            }
            *v = s;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::HalfDType;
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX-512F; `dst` is as long as `src`.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn widen_avx512(dtype: HalfDType, src: &[u16], dst: &mut [f32]) {
        let main = src.len() / 16 * 16;
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        for c in (0..main).step_by(16) {
            let h = _mm256_loadu_si256(s.add(c) as *const __m256i);
            let f = match dtype {
                HalfDType::Bf16 => {
                    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                }
                HalfDType::F16 => _mm512_cvtph_ps(h),
            };
            _mm512_storeu_ps(d.add(c), f);
        }
        for (d, &s) in dst[main..].iter_mut().zip(&src[main..]) {
            *d = dtype.widen(s);
        }
    }

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `dst` is as long as `src`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn widen_avx2(dtype: HalfDType, src: &[u16], dst: &mut [f32]) {
        let main = src.len() / 8 * 8;
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        for c in (0..main).step_by(8) {
            let h = _mm_loadu_si128(s.add(c) as *const __m128i);
            let f = match dtype {
                HalfDType::Bf16 => {
                    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                }
                HalfDType::F16 => _mm256_cvtph_ps(h),
            };
            _mm256_storeu_ps(d.add(c), f);
        }
        for (d, &s) in dst[main..].iter_mut().zip(&src[main..]) {
            *d = dtype.widen(s);
        }
    }

    /// The tail columns past the vector chunks, in scalar code.
    #[inline(always)]
    fn tail<const M: usize>(
        dtype: HalfDType,
        row: &[u16],
        xp: &[f32],
        k: usize,
        from: usize,
        s: &mut [f32; M],
    ) {
        for (c, &wb) in row.iter().enumerate().take(k).skip(from) {
            let w = dtype.widen(wb);
            for (i, si) in s.iter_mut().enumerate() {
                *si = w.mul_add(xp[i * k + c], *si);
            }
        }
    }

    /// Rows of `w` dotted with `M` input rows, 16 lanes: per 32 columns a
    /// bf16 row gives its even and odd columns as two f32 vectors (shift,
    /// AND), an f16 row two `vcvtph2ps`; two accumulators per input row.
    ///
    /// # Safety
    /// The CPU must support AVX-512F; `xp` holds `M` rows of `k` laid out
    /// for 16 lanes, `w` whole rows of `k`, `o` `M` values per row.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn dot_rows_avx512<const M: usize>(
        dtype: HalfDType,
        w: &[u16],
        k: usize,
        xp: &[f32],
        o: &mut [f32],
    ) {
        let main = k / 32 * 32;
        let hi = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        for (row, or) in w.chunks_exact(k).zip(o.chunks_exact_mut(M)) {
            let mut a0 = [_mm512_setzero_ps(); M];
            let mut a1 = [_mm512_setzero_ps(); M];
            let rp = row.as_ptr();
            // SAFETY: the row's own bytes (u16 has no padding).
            let bytes = std::slice::from_raw_parts(rp as *const u8, 2 * k);
            for c in (0..main).step_by(32) {
                crate::cpu::prefetch_ahead(&bytes[2 * c..], 64);
                let (w0, w1) = match dtype {
                    HalfDType::Bf16 => {
                        let v = _mm512_loadu_si512(rp.add(c) as *const __m512i);
                        (
                            _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)),
                            _mm512_castsi512_ps(_mm512_and_si512(v, hi)),
                        )
                    }
                    HalfDType::F16 => (
                        _mm512_cvtph_ps(_mm256_loadu_si256(rp.add(c) as *const __m256i)),
                        _mm512_cvtph_ps(_mm256_loadu_si256(rp.add(c + 16) as *const __m256i)),
                    ),
                };
                for (i, (s0, s1)) in a0.iter_mut().zip(a1.iter_mut()).enumerate() {
                    let xr = xp.as_ptr().add(i * k + c);
                    *s0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xr), *s0);
                    *s1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xr.add(16)), *s1);
                }
            }
            let mut s = [0f32; M];
            for ((si, s0), s1) in s.iter_mut().zip(a0).zip(a1) {
                *si = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
            }
            tail(dtype, row, xp, k, main, &mut s);
            or.copy_from_slice(&s);
        }
    }

    /// [`dot_rows_avx512`] with 8 lanes (16 columns per step).
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `xp` holds `M` rows of `k`
    /// laid out for 8 lanes, `w` whole rows of `k`, `o` `M` values per row.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows_avx2<const M: usize>(
        dtype: HalfDType,
        w: &[u16],
        k: usize,
        xp: &[f32],
        o: &mut [f32],
    ) {
        let main = k / 16 * 16;
        let hi = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        for (row, or) in w.chunks_exact(k).zip(o.chunks_exact_mut(M)) {
            let mut a0 = [_mm256_setzero_ps(); M];
            let mut a1 = [_mm256_setzero_ps(); M];
            let rp = row.as_ptr();
            // SAFETY: the row's own bytes (u16 has no padding).
            let bytes = std::slice::from_raw_parts(rp as *const u8, 2 * k);
            for c in (0..main).step_by(16) {
                if c % 32 == 0 {
                    crate::cpu::prefetch_ahead(&bytes[2 * c..], 64);
                }
                let (w0, w1) = match dtype {
                    HalfDType::Bf16 => {
                        let v = _mm256_loadu_si256(rp.add(c) as *const __m256i);
                        (
                            _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)),
                            _mm256_castsi256_ps(_mm256_and_si256(v, hi)),
                        )
                    }
                    HalfDType::F16 => (
                        _mm256_cvtph_ps(_mm_loadu_si128(rp.add(c) as *const __m128i)),
                        _mm256_cvtph_ps(_mm_loadu_si128(rp.add(c + 8) as *const __m128i)),
                    ),
                };
                for (i, (s0, s1)) in a0.iter_mut().zip(a1.iter_mut()).enumerate() {
                    let xr = xp.as_ptr().add(i * k + c);
                    *s0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), *s0);
                    *s1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr.add(8)), *s1);
                }
            }
            let mut s = [0f32; M];
            for ((si, s0), s1) in s.iter_mut().zip(a0).zip(a1) {
                let v = _mm256_add_ps(s0, s1);
                let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
                let q = _mm_add_ss(q, _mm_movehdup_ps(q));
                *si = _mm_cvtss_f32(q);
            }
            tail(dtype, row, xp, k, main, &mut s);
            or.copy_from_slice(&s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};

    /// Deterministic values in [-1, 1) (xorshift), without a rand dependency.
    use crate::test_values as values;

    fn matrix(dtype: HalfDType, n: usize, k: usize, seed: u64) -> Result<HalfMatrix> {
        let w = Tensor::from_vec(values(n * k, seed), (n, k), &Device::Cpu)?;
        Ok(HalfMatrix::from_tensor(&w.to_dtype(dtype.dtype())?)?.expect("16-bit"))
    }

    /// Every path on every instruction set this CPU runs, against an f64
    /// product of the same (widened) weights, for shapes whose columns are
    /// not whole vector chunks and row counts that are not whole tasks.
    #[test]
    fn every_isa_matches_f64_reference() -> Result<()> {
        let isas = Isa::available();
        eprintln!("instruction sets tested: {isas:?}");
        for dtype in [HalfDType::Bf16, HalfDType::F16] {
            for (n, k) in [(1, 1), (37, 7), (75, 64), (130, 33), (67, 257), (300, 96)] {
                let w = matrix(dtype, n, k, (n * 31 + k) as u64)?;
                let wf: Vec<f32> = w.data.iter().map(|&b| dtype.widen(b)).collect();
                for m in [1usize, 2, 3, 4, 5, 9, 33] {
                    let x = values(m * k, (m * 7 + n) as u64);
                    let mut want = vec![0f64; m * n];
                    for i in 0..m {
                        for r in 0..n {
                            want[i * n + r] = (0..k)
                                .map(|c| wf[r * k + c] as f64 * x[i * k + c] as f64)
                                .sum();
                        }
                    }
                    for &isa in &isas {
                        let got = w.matmul_with(isa, &x, m)?;
                        for (j, (g, e)) in got.iter().zip(&want).enumerate() {
                            let (i, r) = (j / n, j % n);
                            // The worst-case f32 summation error: k roundings
                            // of at most the sum of |products|.
                            let abs: f64 = (0..k)
                                .map(|c| (wf[r * k + c] as f64 * x[i * k + c] as f64).abs())
                                .sum();
                            let tol = k as f64 * f32::EPSILON as f64 * abs + 1e-30;
                            assert!(
                                (*g as f64 - e).abs() <= tol,
                                "{dtype:?} {isa:?} [{n}, {k}] m={m} out {j}: {g} vs {e}"
                            );
                        }
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn embedding_rows_widen_exactly_and_stack_keeps_rows() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [HalfDType::Bf16, HalfDType::F16] {
            let a = matrix(dtype, 9, 40, 1)?;
            let b = matrix(dtype, 4, 40, 2)?;
            let ids = [8u32, 0, 3];
            let e = a.embedding(&ids, &dev)?.to_vec2::<f32>()?;
            for (row, &id) in e.iter().zip(&ids) {
                let want: Vec<f32> = a.row(id as usize).iter().map(|&v| dtype.widen(v)).collect();
                assert_eq!(row, &want);
            }
            assert!(a.embedding(&[9], &dev).is_err());
            let ab = HalfMatrix::stack(&[&a, &b]).expect("same format");
            assert_eq!(ab.dims(), (13, 40));
            let x = Tensor::new(values(40, 5), &dev)?.reshape((1, 40))?;
            // Each output depends on its weight row only, on either engine.
            for acts in [Activations::F32, Activations::Bf16] {
                let y = ab.forward(&x, acts)?.to_vec2::<f32>()?;
                assert_eq!(y[0][..9], a.forward(&x, acts)?.to_vec2::<f32>()?[0][..]);
                assert_eq!(y[0][9..], b.forward(&x, acts)?.to_vec2::<f32>()?[0][..]);
            }
        }
        let other = matrix(HalfDType::F16, 4, 40, 3)?;
        assert!(HalfMatrix::stack(&[&matrix(HalfDType::Bf16, 4, 40, 3)?, &other]).is_none());
        assert!(other
            .forward(&Tensor::zeros((1, 39), DType::F32, &dev)?, Activations::F32)
            .is_err());
        Ok(())
    }

    /// A GGUF F16 tensor's bytes, read into place, keep their bits.
    #[test]
    fn gguf_half_tensors_keep_their_bits() -> Result<()> {
        let w = Tensor::from_vec(values(6 * 32, 9), (6, 32), &Device::Cpu)?;
        let q = QTensor::quantize(&w, GgmlDType::F16)?;
        let bytes = q.data()?;
        let h = HalfMatrix::read(HalfDType::F16, 6, 32, |dst| {
            dst.copy_from_slice(&bytes);
            Ok(())
        })?;
        assert_eq!(h.dtype(), HalfDType::F16);
        let want: Vec<u16> = w
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|&v| f16::from_f32(v).to_bits())
            .collect();
        assert_eq!(h.data, want);
        Ok(())
    }
}
