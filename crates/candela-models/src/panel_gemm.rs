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
//!
//! The bf16 engines are the arithmetic transformers runs a bf16 checkpoint
//! in, and what llama.cpp's AMX path and oneDNN do for prompts; they are
//! taken where [`bf16_engine`] names one (the caller asks for bf16 rows,
//! `Activations::Bf16`), the f32 one for f32 prompt rows.
//!
//! Each output row depends on its own input row only, not on how many rows
//! share the call (rows pad to whole blocks with zeros or go through a
//! kernel for fewer rows; `k` pads with zeros to the engine's depth), so a
//! sequence's numbers do not depend on its batch. Tasks own panels of 32
//! weight rows: the weights are read once per call, and a panel stays in
//! L2 while every input row passes it.

use half::bf16;

/// A prompt-row engine this CPU runs (see the module comment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Amx,
    Avx512Bf16,
    Avx512F32,
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
            }
            v
        })
    }

    /// Whether the engine rounds its operands to bf16.
    pub fn rounds_to_bf16(self) -> bool {
        self != Engine::Avx512F32
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

/// The f32 engine for f32 prompt rows, if this CPU has one.
pub fn f32_engine() -> Option<Engine> {
    Engine::available()
        .contains(&Engine::Avx512F32)
        .then_some(Engine::Avx512F32)
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

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::{round_to_bf16, WeightRows};
    use crate::cpu::SendPtr;

    /// f32 lanes per vector: weight rows per half panel.
    const LANES: usize = 16;
    /// Weight rows per panel (two vectors of output columns).
    const PANEL: usize = 2 * LANES;
    /// Input rows per register block: 2 x 12 accumulators and two weight
    /// vectors of the 32 zmm registers.
    const MR: usize = 12;

    /// A kernel for `R` input rows: `(panel, depth, x, out, n, nr)`.
    type Block<W, X> = unsafe fn(&[W], usize, *const X, *mut f32, usize, usize);

    /// Both engines share one shape: the panel holds, per depth step `j`,
    /// the 32 rows' words (an f32, or a pair of bf16 as one 32-bit word) so
    /// one load is 16 rows' worth; each input row's word is broadcast
    /// from the row as it is, and the FMA adds into that row's 16 output
    /// lanes. Results are stored as they are: lanes are output columns.
    ///
    /// `x` holds `m` rows of `depth` words; `fill(r, row)` writes weight row
    /// `r` as `depth` words (`row` is zeroed past the matrix).
    #[allow(clippy::too_many_arguments)]
    fn run_panels<W, X>(
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
        let out = SendPtr(dst.as_mut_ptr());
        (0..n.div_ceil(PANEL))
            .into_par_iter()
            .with_min_len(4)
            .for_each_init(
                || {
                    (
                        vec![W::default(); depth * PANEL],
                        vec![W::default(); depth * PANEL],
                        Vec::new(),
                    )
                },
                |(panel, rows, scratch), p| {
                    let r0 = p * PANEL;
                    let nr = PANEL.min(n - r0);
                    for (l, row) in rows.chunks_exact_mut(depth).enumerate() {
                        if l < nr {
                            fill(r0 + l, row, scratch);
                        } else {
                            row.fill(W::default());
                        }
                    }
                    // Depth step by depth step: the 32 rows' current lines
                    // stay in L1 while the panel is written in order.
                    for (j, col) in panel.chunks_exact_mut(PANEL).enumerate() {
                        for (l, v) in col.iter_mut().enumerate() {
                            *v = rows[l * depth + j];
                        }
                    }
                    for i0 in (0..m).step_by(MR) {
                        let rows = MR.min(m - i0);
                        // SAFETY: the caller checked the engine's CPU features;
                        // `panel` holds `depth` words of 32 rows, `x` rows
                        // i0..i0 + rows of `depth` words; the task writes only
                        // columns r0..r0 + nr of those rows of `dst` ([m, n]).
                        unsafe {
                            blocks[rows - 1](
                                panel,
                                depth,
                                x.as_ptr().add(i0 * depth),
                                out.get().add(i0 * n + r0),
                                n,
                                nr,
                            )
                        };
                    }
                },
            );
    }

    /// One instantiation per row count 1..=MR.
    macro_rules! blocks {
        ($f:ident) => {
            [
                $f::<1>, $f::<2>, $f::<3>, $f::<4>, $f::<5>, $f::<6>, $f::<7>, $f::<8>, $f::<9>,
                $f::<10>, $f::<11>, $f::<12>,
            ]
        };
    }

    /// Masks of the first `nr` lanes of the two output vectors.
    #[inline(always)]
    fn masks(nr: usize) -> (__mmask16, __mmask16) {
        let m = |from: usize| ((1u32 << nr.saturating_sub(from).min(LANES)) - 1) as __mmask16;
        (m(0), m(LANES))
    }

    pub fn matmul_f32(
        x: &[f32],
        m: usize,
        k: usize,
        n: usize,
        w: &impl WeightRows,
        dst: &mut [f32],
    ) {
        let fill = |r: usize, row: &mut [f32], _: &mut Vec<f32>| w.fill_row(r, row);
        run_panels(x, m, k, n, dst, fill, &blocks!(block_f32));
    }

    /// # Safety
    /// AVX-512F; `panel` has `k * PANEL` values, `x` `R` rows of `k`, `out`
    /// `R` rows (`n` apart) of at least `nr` values.
    #[target_feature(enable = "avx512f")]
    unsafe fn block_f32<const R: usize>(
        panel: &[f32],
        k: usize,
        x: *const f32,
        out: *mut f32,
        n: usize,
        nr: usize,
    ) {
        debug_assert!(panel.len() >= k * PANEL && R <= MR);
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let wp = panel.as_ptr();
        for j in 0..k {
            let w0 = _mm512_loadu_ps(wp.add(j * PANEL));
            let w1 = _mm512_loadu_ps(wp.add(j * PANEL + LANES));
            for (i, a) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*x.add(i * k + j));
                a[0] = _mm512_fmadd_ps(w0, xv, a[0]);
                a[1] = _mm512_fmadd_ps(w1, xv, a[1]);
            }
        }
        let (m0, m1) = masks(nr);
        for (i, a) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(out.add(i * n), m0, a[0]);
            _mm512_mask_storeu_ps(out.add(i * n + LANES), m1, a[1]);
        }
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
        run_panels(&xb, m, kp, n, dst, fill, &blocks!(block_bf16));
    }

    /// # Safety
    /// AVX512-F and AVX512-BF16; `panel` has `kp * PANEL` words, `x` `R`
    /// rows of `kp` words, `out` `R` rows (`n` apart) of at least `nr` values.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn block_bf16<const R: usize>(
        panel: &[u32],
        kp: usize,
        x: *const u32,
        out: *mut f32,
        n: usize,
        nr: usize,
    ) {
        debug_assert!(panel.len() >= kp * PANEL && R <= MR);
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let wp = panel.as_ptr();
        for j in 0..kp {
            let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(wp.add(j * PANEL).cast()));
            let w1: __m512bh =
                std::mem::transmute(_mm512_loadu_si512(wp.add(j * PANEL + LANES).cast()));
            for (i, a) in acc.iter_mut().enumerate() {
                let xv: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*x.add(i * kp + j) as i32));
                a[0] = _mm512_dpbf16_ps(a[0], w0, xv);
                a[1] = _mm512_dpbf16_ps(a[1], w1, xv);
            }
        }
        let (m0, m1) = masks(nr);
        for (i, a) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(out.add(i * n), m0, a[0]);
            _mm512_mask_storeu_ps(out.add(i * n + LANES), m1, a[1]);
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
        // Odd shapes: partial row blocks, panels, tile columns and depth.
        for &engine in engines() {
            for (m, k, n) in [
                (1, 32, 16),
                (37, 100, 45),
                (64, 896, 70),
                (5, 3420, 33),
                (13, 7, 3),
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
        let (m, k, n) = (41, 200, 50);
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
