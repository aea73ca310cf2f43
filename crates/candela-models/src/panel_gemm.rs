//! Prompt-row GEMMs over panels of weight rows: `y = x · wᵀ` for the many
//! input rows of a prompt chunk or an encoder, `w` any weight format that
//! fills f32 rows ([`WeightRows`]: block-quantized, 16-bit), products summed
//! in f32. Decode rows (memory-bound) keep their own kernels
//! ([`crate::quant`], [`crate::half_matmul`]).
//!
//! Engines ([`Engine`], picked at run time):
//!
//! - `Amx`: Intel AMX-BF16 tiles (`tdpbf16ps`, Sapphire Rapids and later),
//!   the inputs and weights rounded to bf16: one instruction multiplies a
//!   16 x 32 tile by a 32 x 16 one, about ten times a core's f32 FMA rate.
//! - `Avx512Bf16`: `vdpbf16ps`, 16 lanes of two bf16 products each. It
//!   pays only where it runs as fast as an f32 FMA (AMD Zen 4 / 5): on
//!   Intel (Cooper Lake, or Sapphire Rapids with AMX hidden, as in VMs) it
//!   issues once per two cycles against two FMAs per cycle, so there f32
//!   wins (measured on a 2-vCPU Xeon: 1.34 G `vdpbf16ps`/s against 5.5 G
//!   512-bit FMAs/s).
//! - `Avx512F32`: 512-bit f32 FMAs on the rows as they are (exact f32, up
//!   to summation order), where the CPU has AVX-512F.
//! - `Avx2F32`: the same in 256-bit FMAs, where the CPU has AVX2 and FMA
//!   but no AVX-512 (AMD Zen 2 / 3, Intel client cores).
//!
//! The bf16 engines are the arithmetic transformers runs a bf16 checkpoint
//! in, and what llama.cpp's AMX path and oneDNN do for prompts; they are
//! taken where [`bf16_engine`] names one (the caller asks for bf16 rows,
//! `Activations::Bf16`), the f32 one for f32 prompt rows.
//!
//! Each output row depends on its own input row only, not on how many rows
//! share the call (rows pad to whole blocks with zeros or go through a
//! kernel for fewer rows; `k` pads with zeros to the engine's depth), so a
//! sequence's numbers do not depend on its batch. Tasks own groups of
//! weight rows: the weights are decoded once per call (the FMA engines'
//! blocking: `driver`).

use half::bf16;

/// A prompt-row engine this CPU runs (see the module comment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Amx,
    Avx512Bf16,
    Avx512F32,
    Avx2F32,
}

impl Engine {
    /// Every engine this CPU and kernel run (tests force each).
    pub fn available() -> &'static [Engine] {
        use std::sync::OnceLock;
        static ENGINES: OnceLock<Vec<Engine>> = OnceLock::new();
        ENGINES.get_or_init(|| {
            #[allow(unused_mut)]
            let mut v = Vec::new();
            #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
            if amx::cpu_has_amx_bf16() && amx::request_permission() {
                v.push(Engine::Amx);
            }
            #[cfg(target_arch = "x86_64")]
            {
                if has_avx512_bf16() {
                    v.push(Engine::Avx512Bf16);
                }
                if is_x86_feature_detected!("avx512f") {
                    v.push(Engine::Avx512F32);
                }
                if crate::cpu::has_avx2() {
                    v.push(Engine::Avx2F32);
                }
            }
            v
        })
    }

    /// Whether the engine rounds its operands to bf16.
    pub fn rounds_to_bf16(self) -> bool {
        matches!(self, Engine::Amx | Engine::Avx512Bf16)
    }
}

/// The bf16 engine prompt rows take on this CPU, if it has one worth
/// taking: AMX, else `vdpbf16ps` on AMD (see the module comment).
pub fn bf16_engine() -> Option<Engine> {
    let has = |e| Engine::available().contains(&e);
    if has(Engine::Amx) {
        Some(Engine::Amx)
    } else if has(Engine::Avx512Bf16) && crate::cpu::is_amd() {
        Some(Engine::Avx512Bf16)
    } else {
        None
    }
}

/// The f32 engine for f32 prompt rows, if this CPU has one: the widest.
pub fn f32_engine() -> Option<Engine> {
    Engine::available()
        .iter()
        .copied()
        .find(|e| !e.rounds_to_bf16())
}

/// Where the weight rows come from: `fill_row(r, out)` writes row `r` as
/// `k` f32 values into `out`.
pub trait WeightRows: Sync {
    fn fill_row(&self, r: usize, out: &mut [f32]);
}

/// `dst[i * n + r] = sum_j x[i * k + j] * w_r[j]` for the `m` rows of `x`
/// and the `n` rows of `w`, the operands rounded to bf16 where the engine
/// says so. The engine must be one of [`Engine::available`].
pub fn matmul(
    engine: Engine,
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    w: &impl WeightRows,
    dst: &mut [f32],
) {
    assert!(
        Engine::available().contains(&engine),
        "{engine:?} not available"
    );
    assert!(x.len() == m * k && dst.len() == m * n);
    if m == 0 || n == 0 {
        return;
    }
    match engine {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        Engine::Amx => amx::matmul(x, m, k, n, w, dst),
        #[cfg(target_arch = "x86_64")]
        Engine::Avx512Bf16 => avx512::matmul_bf16(x, m, k, n, w, dst),
        #[cfg(target_arch = "x86_64")]
        Engine::Avx512F32 => avx512::matmul_f32(x, m, k, n, w, dst),
        #[cfg(target_arch = "x86_64")]
        Engine::Avx2F32 => avx2::matmul_f32(x, m, k, n, w, dst),
        #[allow(unreachable_patterns)]
        _ => unreachable!("no {engine:?} on this target"),
    }
}

/// `src` rounded to bf16 (to nearest, ties to even) into `dst` (same length).
fn round_to_bf16(src: &[f32], dst: &mut [u16]) {
    debug_assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16() {
        // SAFETY: the CPU has AVX512-BF16 (checked at run time).
        unsafe { round_avx512bf16(src, dst) };
        return;
    }
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = bf16::from_f32(v).to_bits();
    }
}

#[cfg(target_arch = "x86_64")]
fn has_avx512_bf16() -> bool {
    use std::sync::OnceLock;
    static BF16: OnceLock<bool> = OnceLock::new();
    *BF16.get_or_init(|| {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
    })
}

/// # Safety
/// The CPU must support AVX512-F and AVX512-BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn round_avx512bf16(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    let main = src.len() / 16 * 16;
    for (s, d) in src[..main].chunks_exact(16).zip(dst.chunks_exact_mut(16)) {
        // `vcvtneps2bf16` rounds to nearest even, as `bf16::from_f32`.
        let b: __m256bh = _mm512_cvtneps_pbh(_mm512_loadu_ps(s.as_ptr()));
        _mm256_storeu_si256(
            d.as_mut_ptr() as *mut __m256i,
            std::mem::transmute::<__m256bh, __m256i>(b),
        );
    }
    for (d, &v) in dst[main..].iter_mut().zip(&src[main..]) {
        *d = half::bf16::from_f32(v).to_bits();
    }
}

/// The driver of the FMA-shaped engines (`Avx512F32`, `Avx512Bf16`,
/// `Avx2F32`): the panel holds, per depth step `j`, `PANEL` weight rows'
/// words (an f32, or a pair of bf16 as one 32-bit word), so one load is a
/// vector of rows; each input row's word is broadcast from the row as it
/// is, and the FMA adds into that row's output lanes. Results are stored as
/// they are: lanes are output columns.
///
/// Blocking: a task takes a group of up to [`GROUP_ROWS`] weight rows (whole
/// panels), decodes them once, then walks the depth in slices of [`KC`]
/// words: per slice, every block of `MR` input rows meets every panel of the
/// group, the panels' slices (the group's `GROUP_ROWS x KC` words, 128 KiB)
/// staying in L2 and the row block's in L1, and the kernel adds the slice
/// into the outputs. The input rows are read once per group and slice, not
/// once per panel: a vision tower's 4,000 rows x 1,280 are 20 MB, more than
/// the L3, and streaming them per 16-row panel left the FMAs waiting.
/// A row's sums run over the slices in order whatever `m` is, so a row's
/// numbers do not depend on its batch.
#[cfg(target_arch = "x86_64")]
mod driver {
    use rayon::prelude::*;

    use super::WeightRows;
    use crate::cpu::SendPtr;

    /// Depth per slice, in words.
    pub const KC: usize = 256;
    /// Weight rows per task at most (fewer where that leaves threads idle).
    pub const GROUP_ROWS: usize = 128;

    /// A kernel for `R` input rows: `(panel slice, depth of the slice, x,
    /// x's row stride, out, out's row stride, output columns, add)`; with
    /// `add` the slice's products are added to `out`, else they replace it.
    pub type Block<W, X> =
        unsafe fn(*const W, usize, *const X, usize, *mut f32, usize, usize, bool);

    /// [`run_panels`] for the f32 engines: f32 rows against the weight rows
    /// as [`WeightRows`] fills them.
    pub fn run_f32<const PANEL: usize, const MR: usize>(
        x: &[f32],
        m: usize,
        k: usize,
        n: usize,
        w: &impl WeightRows,
        dst: &mut [f32],
        blocks: &[Block<f32, f32>; MR],
    ) {
        let fill = |r: usize, row: &mut [f32], _: &mut Vec<f32>| w.fill_row(r, row);
        run_panels::<_, _, PANEL, MR>(x, m, k, n, dst, fill, blocks);
    }

    /// `dst[i * n + r] = x_i . w_r` for `m` rows of `depth` words in `x`;
    /// `fill(r, row, scratch)` writes weight row `r` as `depth` words.
    /// `blocks[R - 1]` is the kernel for `R` input rows.
    #[allow(clippy::too_many_arguments)]
    pub fn run_panels<W, X, const PANEL: usize, const MR: usize>(
        x: &[X],
        m: usize,
        depth: usize,
        n: usize,
        dst: &mut [f32],
        fill: impl Fn(usize, &mut [W], &mut Vec<f32>) + Sync,
        blocks: &[Block<W, X>; MR],
    ) where
        W: Copy + Default + Send,
        X: Sync,
    {
        if depth == 0 {
            dst.fill(0.0);
            return;
        }
        let out = SendPtr(dst.as_mut_ptr());
        let threads = rayon::current_num_threads();
        let group = n
            .div_ceil(2 * threads)
            .div_ceil(PANEL)
            .clamp(1, GROUP_ROWS / PANEL)
            * PANEL;
        (0..n.div_ceil(group)).into_par_iter().for_each_init(
            || (Vec::new(), Vec::new(), Vec::new()),
            |(panels, rows, scratch): &mut (Vec<W>, Vec<W>, Vec<f32>), g| {
                let r0 = g * group;
                let nr = group.min(n - r0);
                let np = nr.div_ceil(PANEL);
                panels.resize(np * depth * PANEL, W::default());
                rows.resize(depth * PANEL, W::default());
                for (p, panel) in panels.chunks_exact_mut(depth * PANEL).enumerate() {
                    for (l, row) in rows.chunks_exact_mut(depth).enumerate() {
                        if p * PANEL + l < nr {
                            fill(r0 + p * PANEL + l, row, scratch);
                        } else {
                            row.fill(W::default());
                        }
                    }
                    // Depth step by depth step: the panel's rows' current
                    // lines stay in L1 while the panel is written in order.
                    for (j, col) in panel.chunks_exact_mut(PANEL).enumerate() {
                        for (l, v) in col.iter_mut().enumerate() {
                            *v = rows[l * depth + j];
                        }
                    }
                }
                for c0 in (0..depth).step_by(KC) {
                    let kc = KC.min(depth - c0);
                    for i0 in (0..m).step_by(MR) {
                        let block = blocks[MR.min(m - i0) - 1];
                        for p in 0..np {
                            // SAFETY: the caller checked the engine's CPU
                            // features; panel `p` holds `depth` words of
                            // `PANEL` rows (slice `c0..c0 + kc`), `x` rows
                            // i0.. of `depth` words; the task writes only
                            // columns r0 + p * PANEL.. (at most `nr` in all)
                            // of those rows of `dst` ([m, n]).
                            unsafe {
                                block(
                                    panels.as_ptr().add((p * depth + c0) * PANEL),
                                    kc,
                                    x.as_ptr().add(i0 * depth + c0),
                                    depth,
                                    out.get().add(i0 * n + r0 + p * PANEL),
                                    n,
                                    PANEL.min(nr - p * PANEL),
                                    c0 > 0,
                                )
                            };
                        }
                    }
                }
            },
        );
    }
}

/// One instantiation per row count 1..=MR (6 or 12).
#[cfg(target_arch = "x86_64")]
macro_rules! blocks {
    ($f:ident, 6) => {
        [$f::<1>, $f::<2>, $f::<3>, $f::<4>, $f::<5>, $f::<6>]
    };
    ($f:ident, 12) => {
        [
            $f::<1>, $f::<2>, $f::<3>, $f::<4>, $f::<5>, $f::<6>, $f::<7>, $f::<8>, $f::<9>,
            $f::<10>, $f::<11>, $f::<12>,
        ]
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::driver::{run_f32, run_panels};
    use super::{round_to_bf16, WeightRows};

    /// f32 lanes per vector: weight rows per half panel.
    const LANES: usize = 16;
    /// Weight rows per panel (two vectors of output columns).
    const PANEL: usize = 2 * LANES;
    /// Input rows per register block: 2 x 12 accumulators and two weight
    /// vectors of the 32 zmm registers.
    const MR: usize = 12;

    /// Masks of the first `nr` lanes of the two output vectors.
    #[inline(always)]
    fn masks(nr: usize) -> (__mmask16, __mmask16) {
        let m = |from: usize| ((1u32 << nr.saturating_sub(from).min(LANES)) - 1) as __mmask16;
        (m(0), m(LANES))
    }

    /// The accumulators a kernel starts from: the outputs (`add`) or zeros.
    #[inline(always)]
    unsafe fn start<const R: usize>(
        out: *const f32,
        ldo: usize,
        nr: usize,
        add: bool,
    ) -> [[__m512; 2]; R] {
        let (m0, m1) = masks(nr);
        std::array::from_fn(|i| {
            if add {
                [
                    _mm512_maskz_loadu_ps(m0, out.add(i * ldo)),
                    _mm512_maskz_loadu_ps(m1, out.add(i * ldo + LANES)),
                ]
            } else {
                [_mm512_setzero_ps(); 2]
            }
        })
    }

    #[inline(always)]
    unsafe fn store<const R: usize>(acc: &[[__m512; 2]; R], out: *mut f32, ldo: usize, nr: usize) {
        let (m0, m1) = masks(nr);
        for (i, a) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(out.add(i * ldo), m0, a[0]);
            _mm512_mask_storeu_ps(out.add(i * ldo + LANES), m1, a[1]);
        }
    }

    pub fn matmul_f32(
        x: &[f32],
        m: usize,
        k: usize,
        n: usize,
        w: &impl WeightRows,
        dst: &mut [f32],
    ) {
        run_f32::<PANEL, MR>(x, m, k, n, w, dst, &blocks!(block_f32, 12));
    }

    /// # Safety
    /// AVX-512F; `panel` has `kc * PANEL` values, `x` `R` rows (`ldx`
    /// apart) of `kc`, `out` `R` rows (`ldo` apart) of at least `nr` values.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block_f32<const R: usize>(
        panel: *const f32,
        kc: usize,
        x: *const f32,
        ldx: usize,
        out: *mut f32,
        ldo: usize,
        nr: usize,
        add: bool,
    ) {
        let mut acc = start::<R>(out, ldo, nr, add);
        for j in 0..kc {
            let w0 = _mm512_loadu_ps(panel.add(j * PANEL));
            let w1 = _mm512_loadu_ps(panel.add(j * PANEL + LANES));
            for (i, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*x.add(i * ldx + j));
                a[0] = _mm512_fmadd_ps(w0, xv, a[0]);
                a[1] = _mm512_fmadd_ps(w1, xv, a[1]);
            }
        }
        store(&acc, out, ldo, nr);
    }

    /// bf16 pairs `(2j, 2j + 1)` as one 32-bit word (x86 is little-endian:
    /// the even value is the low half); an odd `k` pads with a zero column.
    fn pairs(src: &[f32], dst: &mut [u32]) {
        debug_assert!(src.len().div_ceil(2) == dst.len());
        // SAFETY: the words' memory viewed as twice as many u16, which need
        // no more alignment.
        let halves = unsafe {
            std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<u16>(), 2 * dst.len())
        };
        round_to_bf16(src, &mut halves[..src.len()]);
        halves[src.len()..].fill(0);
    }

    pub fn matmul_bf16(
        x: &[f32],
        m: usize,
        k: usize,
        n: usize,
        w: &impl WeightRows,
        dst: &mut [f32],
    ) {
        let kp = k.div_ceil(2);
        let mut xb = vec![0u32; m * kp];
        xb.par_chunks_mut(kp)
            .zip(x.par_chunks(k))
            .for_each(|(d, s)| pairs(s, d));
        let fill = |r: usize, row: &mut [u32], scratch: &mut Vec<f32>| {
            scratch.resize(k, 0.0);
            w.fill_row(r, scratch);
            pairs(scratch, row);
        };
        run_panels::<_, _, PANEL, MR>(&xb, m, kp, n, dst, fill, &blocks!(block_bf16, 12));
    }

    /// # Safety
    /// AVX512-F and AVX512-BF16; `panel` has `kc * PANEL` words, `x` `R`
    /// rows (`ldx` apart) of `kc` words, `out` `R` rows (`ldo` apart) of at
    /// least `nr` values.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block_bf16<const R: usize>(
        panel: *const u32,
        kc: usize,
        x: *const u32,
        ldx: usize,
        out: *mut f32,
        ldo: usize,
        nr: usize,
        add: bool,
    ) {
        let mut acc = start::<R>(out, ldo, nr, add);
        for j in 0..kc {
            let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(panel.add(j * PANEL).cast()));
            let w1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(panel.add(j * PANEL + LANES).cast()));
            for (i, a) in acc.iter_mut().enumerate() {
                let xv: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*x.add(i * ldx + j) as i32));
                a[0] = _mm512_dpbf16_ps(a[0], w0, xv);
                a[1] = _mm512_dpbf16_ps(a[1], w1, xv);
            }
        }
        store(&acc, out, ldo, nr);
    }
}

/// `Avx2F32`: the same products as `Avx512F32` in 256-bit FMAs, for CPUs
/// with AVX2 and no AVX-512 (AMD Zen 2 / 3, Intel client cores).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::driver::run_f32;
    use super::WeightRows;

    /// f32 lanes per vector: weight rows per half panel.
    const LANES: usize = 8;
    /// Weight rows per panel (two vectors of output columns).
    const PANEL: usize = 2 * LANES;
    /// Input rows per register block: 2 x 6 accumulators, two weight
    /// vectors and a broadcast of the 16 ymm registers.
    const MR: usize = 6;

    /// Lane masks of the first `nr` output columns in the two vectors.
    #[inline(always)]
    unsafe fn masks(nr: usize) -> [__m256i; 2] {
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        [0, LANES].map(|from| {
            let left = nr.saturating_sub(from).min(LANES) as i32;
            _mm256_cmpgt_epi32(_mm256_set1_epi32(left), lane)
        })
    }

    pub fn matmul_f32(
        x: &[f32],
        m: usize,
        k: usize,
        n: usize,
        w: &impl WeightRows,
        dst: &mut [f32],
    ) {
        run_f32::<PANEL, MR>(x, m, k, n, w, dst, &blocks!(block_f32, 6));
    }

    /// # Safety
    /// AVX2 and FMA; `panel` has `kc * PANEL` values, `x` `R` rows (`ldx`
    /// apart) of `kc`, `out` `R` rows (`ldo` apart) of at least `nr` values.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block_f32<const R: usize>(
        panel: *const f32,
        kc: usize,
        x: *const f32,
        ldx: usize,
        out: *mut f32,
        ldo: usize,
        nr: usize,
        add: bool,
    ) {
        let mask = masks(nr);
        let mut acc: [[__m256; 2]; R] = std::array::from_fn(|i| {
            std::array::from_fn(|h| {
                if add {
                    _mm256_maskload_ps(out.add(i * ldo + h * LANES), mask[h])
                } else {
                    _mm256_setzero_ps()
                }
            })
        });
        for j in 0..kc {
            let w0 = _mm256_loadu_ps(panel.add(j * PANEL));
            let w1 = _mm256_loadu_ps(panel.add(j * PANEL + LANES));
            for (i, a) in acc.iter_mut().enumerate() {
                let xv = _mm256_broadcast_ss(&*x.add(i * ldx + j));
                a[0] = _mm256_fmadd_ps(w0, xv, a[0]);
                a[1] = _mm256_fmadd_ps(w1, xv, a[1]);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            for (h, &v) in a.iter().enumerate() {
                _mm256_maskstore_ps(out.add(i * ldo + h * LANES), mask[h], v);
            }
        }
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx {
    use std::arch::asm;

    use rayon::prelude::*;

    use super::{round_to_bf16, WeightRows};
    use crate::cpu::SendPtr;

    /// Tile rows: weight rows per A tile, input rows per B tile.
    const TR: usize = 16;
    /// Tile depth in bf16 values (64 bytes per A tile row).
    const TK: usize = 32;
    /// Weight rows per task: two A tiles.
    const PANEL: usize = 2 * TR;
    /// Input rows per inner block: two B tiles.
    const MB: usize = 2 * TR;

    /// The weights are the A operand, loaded as they are (row-major), so a
    /// panel costs only its decoding; the input rows are the B operand,
    /// packed once per call into AMX's pair-interleaved layout; `C = W Xᵀ`
    /// comes out transposed and is written back per tile. AMX needs the
    /// kernel's permission (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), asked once.
    pub fn matmul(x: &[f32], m: usize, k: usize, n: usize, w: &impl WeightRows, dst: &mut [f32]) {
        let kp = k.div_ceil(TK) * TK;
        let xb = pack_inputs(x, m, k, kp);
        // Weight rows a cache line away from a multiple of 4 KiB apart, so the
        // 16 rows of a tile do not share L1 sets.
        let sw = kp + if (kp * 2).is_multiple_of(4096) { TK } else { 0 };
        let out = SendPtr(dst.as_mut_ptr());
        // A few panels per job, so the per-job buffers are set up rarely.
        (0..n.div_ceil(PANEL))
            .into_par_iter()
            .with_min_len(4)
            .for_each_init(
                || (vec![0u16; PANEL * sw], vec![0f32; k]),
                |(panel, scratch), p| {
                    let r0 = p * PANEL;
                    let nr = PANEL.min(n - r0);
                    // Rows past the matrix and columns past k are zeros.
                    for (i, dst) in panel.chunks_exact_mut(sw).enumerate() {
                        if i < nr {
                            w.fill_row(r0 + i, scratch);
                            round_to_bf16(scratch, &mut dst[..k]);
                            dst[k..].fill(0);
                        } else {
                            dst.fill(0);
                        }
                    }
                    // SAFETY: AMX is available (asserted by the caller); `xb` holds the
                    // packed input blocks of depth `kp`, `panel` 32 rows of `kp` at a
                    // stride of `sw`; this task writes only columns r0..r0 + nr of
                    // rows < m of `dst`.
                    unsafe { run_panel(&xb, kp, panel, sw, m, n, r0, nr, out) };
                },
            );
    }

    /// The input rows in bf16 as AMX B tiles: per block of [`MB`] rows (zeros
    /// past `m`) and depth step of [`TK`], two tiles of 16 rows of 16 (even,
    /// odd) pairs: `tile[t][r][c] = (x[16t + c][2r], x[16t + c][2r + 1])`.
    fn pack_inputs(x: &[f32], m: usize, k: usize, kp: usize) -> Vec<u16> {
        let step = 2 * TR * TK;
        let mut xb = vec![0u16; m.div_ceil(MB) * kp / TK * step];
        xb.par_chunks_mut(kp / TK * step).enumerate().for_each_init(
            || vec![0u16; kp],
            |row, (b, blk)| {
                for i in 0..MB.min(m - b * MB) {
                    round_to_bf16(&x[(b * MB + i) * k..][..k], &mut row[..k]);
                    let (t, c) = (i / TR, i % TR);
                    // Pairs of one row are 32-bit words of one tile column.
                    for (j, pair) in row.chunks_exact(2).enumerate() {
                        let (kb, r) = (j / TR, j % TR);
                        let at = kb * step + t * TR * TK + r * TK + 2 * c;
                        blk[at..at + 2].copy_from_slice(pair);
                    }
                }
            },
        );
        xb
    }

    /// CPUID.(EAX=7, ECX=0):EDX bits 22 (AMX-BF16) and 24 (AMX-TILE).
    pub fn cpu_has_amx_bf16() -> bool {
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        if __cpuid(0).eax < 7 {
            return false;
        }
        let edx = __cpuid_count(7, 0).edx;
        edx & (1 << 22) != 0 && edx & (1 << 24) != 0
    }

    /// Asks Linux for the tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM,
    /// XFEATURE_XTILEDATA)`); without it the first tile load faults.
    pub fn request_permission() -> bool {
        const SYS_ARCH_PRCTL: usize = 158;
        const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
        const XFEATURE_XTILEDATA: usize = 18;
        let ret: isize;
        // SAFETY: a plain syscall; it only changes this process's permitted
        // XSAVE features and clobbers rcx / r11 as every syscall does.
        unsafe {
            asm!(
                "syscall",
                inlateout("rax") SYS_ARCH_PRCTL as isize => ret,
                in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret == 0
    }

    /// Palette 1, tiles 0-7 each 16 rows of 64 bytes: 0-3 accumulators
    /// (2 x 2 blocks of 16 x 16 f32), 4-5 weight rows, 6-7 input pairs.
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    fn config() -> TileConfig {
        let mut c = [0u8; 64];
        c[0] = 1;
        for t in 0..8 {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            c[48 + t] = TR as u8;
        }
        TileConfig(c)
    }

    /// One task: one panel of 32 weight rows against every block of [`MB`]
    /// input rows; results for rows < `m` and columns `r0..r0 + nr` into
    /// `dst` (`[m, n]`).
    ///
    /// # Safety
    /// AMX-BF16 with permission; `xb` holds `m.div_ceil(MB)` packed input
    /// blocks of depth `kp`, `panel` [`PANEL`] rows of `kp` bf16 at a stride
    /// of `sw`; `dst` has `m * n` values, of which this task owns its columns.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run_panel(
        xb: &[u16],
        kp: usize,
        panel: &[u16],
        sw: usize,
        m: usize,
        n: usize,
        r0: usize,
        nr: usize,
        dst: SendPtr,
    ) {
        let step = 2 * TR * TK;
        debug_assert!(xb.len() >= m.div_ceil(MB) * kp / TK * step && panel.len() >= PANEL * sw);
        let cfg = config();
        asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack));
        // C as [32 weight rows][32 input rows] f32: tile (i, j) at row 16i,
        // column 16j.
        let mut c = [0f32; PANEL * MB];
        let (w0, w1) = (panel.as_ptr(), panel.as_ptr().add(TR * sw));
        for b in 0..m.div_ceil(MB) {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack)
            );
            let blk = xb.as_ptr().add(b * kp / TK * step);
            for kb in 0..kp / TK {
                let x0 = blk.add(kb * step);
                asm!(
                    "tileloadd tmm4, [{w0} + {sw}*1]",
                    "tileloadd tmm5, [{w1} + {sw}*1]",
                    "tileloadd tmm6, [{x0} + {sx}*1]",
                    "tileloadd tmm7, [{x1} + {sx}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    w0 = in(reg) w0.add(kb * TK),
                    w1 = in(reg) w1.add(kb * TK),
                    x0 = in(reg) x0,
                    x1 = in(reg) x0.add(TR * TK),
                    sw = in(reg) sw * 2,
                    sx = in(reg) TK * 2,
                    options(nostack, readonly),
                );
            }
            let cp = c.as_mut_ptr();
            asm!(
                "tilestored [{c0} + {sc}*1], tmm0",
                "tilestored [{c1} + {sc}*1], tmm1",
                "tilestored [{c2} + {sc}*1], tmm2",
                "tilestored [{c3} + {sc}*1], tmm3",
                c0 = in(reg) cp,
                c1 = in(reg) cp.add(TR),
                c2 = in(reg) cp.add(TR * MB),
                c3 = in(reg) cp.add(TR * MB + TR),
                sc = in(reg) MB * 4,
                options(nostack),
            );
            for i in 0..MB.min(m - b * MB) {
                let out = dst.0.add((b * MB + i) * n + r0);
                for r in 0..nr {
                    *out.add(r) = c[r * MB + i];
                }
            }
        }
        asm!("tilerelease", options(nostack));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_values as values;

    fn round(v: &[f32]) -> Vec<u16> {
        v.iter().map(|&x| bf16::from_f32(x).to_bits()).collect()
    }

    /// The product in f64 of `w` (bf16 values) and `x`, rounded to bf16
    /// where the engine rounds its operands.
    fn reference(engine: Engine, x: &[f32], w: &[u16], m: usize, k: usize, n: usize) -> Vec<f64> {
        let f = |b: u16| bf16::from_bits(b).to_f64();
        let xs: Vec<f64> = if engine.rounds_to_bf16() {
            round(x).into_iter().map(f).collect()
        } else {
            x.iter().map(|&v| v as f64).collect()
        };
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for r in 0..n {
                y[i * n + r] = (0..k).map(|j| xs[i * k + j] * f(w[r * k + j])).sum();
            }
        }
        y
    }

    struct Rows<'a>(&'a [u16], usize);
    impl WeightRows for Rows<'_> {
        fn fill_row(&self, r: usize, out: &mut [f32]) {
            for (o, &b) in out.iter_mut().zip(&self.0[r * self.1..(r + 1) * self.1]) {
                *o = bf16::from_bits(b).to_f32();
            }
        }
    }

    fn run(engine: Engine, x: &[f32], w: &[u16], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut y = vec![f32::NAN; m * n];
        matmul(engine, x, m, k, n, &Rows(w, k), &mut y);
        y
    }

    fn engines() -> &'static [Engine] {
        if Engine::available().is_empty() {
            eprintln!("no prompt-row engine on this CPU: nothing to exercise");
        }
        Engine::available()
    }

    #[test]
    fn every_engine_matches_the_f64_product_of_its_operands() {
        // Odd shapes: partial row blocks, panels, tile columns and depth;
        // several depth slices and row groups.
        for &engine in engines() {
            for (m, k, n) in [
                (1, 32, 16),
                (37, 100, 45),
                (64, 896, 70),
                (5, 3420, 33),
                (13, 7, 3),
                (23, 700, 300),
                (9, 0, 5),
            ] {
                let x = values(m * k, (m * k) as u64);
                let w = round(&values(n * k, (n * 7 + k) as u64));
                let y = run(engine, &x, &w, m, k, n);
                let want = reference(engine, &x, &w, m, k, n);
                for (i, (&g, &e)) in y.iter().zip(&want).enumerate() {
                    // f32 accumulation of k products of magnitude <= 1.
                    let tol = 1e-6 * k as f64;
                    assert!(
                        (g as f64 - e).abs() <= tol,
                        "{engine:?} {m}x{k}x{n} [{i}]: {g} vs {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_and_batched() {
        // Several depth slices and row groups.
        let (m, k, n) = (41, 600, 300);
        let x = values(m * k, 3);
        let w = round(&values(n * k, 4));
        for &engine in engines() {
            let all = run(engine, &x, &w, m, k, n);
            for i in [0, 17, 40] {
                let one = run(engine, &x[i * k..(i + 1) * k], &w, 1, k, n);
                assert_eq!(one, all[i * n..(i + 1) * n], "{engine:?} row {i}");
            }
        }
    }
}
