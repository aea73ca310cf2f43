//! The bf16 matrix engine: `y = x · wᵀ` with x rounded to bf16, w given as
//! bf16 rows, products summed in f32, on Intel AMX tiles (`tdpbf16ps`).
//!
//! Prompt and encoder rows of 16-bit and block-quantized matrices take it
//! where the CPU has AMX-BF16 (Sapphire Rapids and later): one instruction
//! multiplies a 16 x 32 bf16 tile by a 32 x 16 one, about ten times the f32
//! FMA rate of a core. This is the arithmetic transformers runs a bf16
//! checkpoint in, and what llama.cpp's AMX path and oneDNN do for prompts;
//! decode rows (memory-bound) keep their exact kernels ([`crate::quant`],
//! [`crate::half_matmul`]).
//!
//! Each output row depends on its own input row only, not on how many rows
//! share the call (rows pad to whole tiles with zeros, `k` pads to a whole
//! tile depth), so a sequence's numbers do not depend on its batch.
//!
//! The weights are the A operand: a source fills bf16 rows ([`WeightRows`])
//! and tiles load them as they are, row-major, so a panel costs only its
//! decoding. The input rows are the B operand, packed once per call into
//! AMX's pair-interleaved layout; `C = W Xᵀ` comes out transposed and is
//! written back per tile. Tasks own panels of 32 weight rows, so the
//! weights are read once per call and a panel (`k` x 64 bytes) stays in L2
//! while every input row passes it. AMX needs the kernel's permission
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), asked once.

use half::bf16;

/// Whether this CPU and kernel run AMX-BF16 tiles (checked once).
pub fn available() -> bool {
    use std::sync::OnceLock;
    static AMX: OnceLock<bool> = OnceLock::new();
    *AMX.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            amx::cpu_has_amx_bf16() && amx::request_permission()
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    })
}

/// Where the weight rows come from: `fill_row(r, out, scratch)` writes row `r`
/// as `k` bf16 values into `out`, with `scratch` for the source's own use.
pub trait WeightRows: Sync {
    fn fill_row(&self, r: usize, out: &mut [u16], scratch: &mut Vec<f32>);
}

/// `dst[i * n + r] = sum_j bf16(x[i * k + j]) * w_r[j]` for the `m` rows of
/// `x` and the `n` rows of `w`.
///
/// Call only where [`available`] is true.
pub fn matmul(x: &[f32], m: usize, k: usize, n: usize, w: &impl WeightRows, dst: &mut [f32]) {
    assert!(available(), "bf16_gemm::matmul without AMX");
    assert!(x.len() == m * k && dst.len() == m * n);
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    amx::matmul(x, m, k, n, w, dst);
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    let _ = w;
}

/// `src` rounded to bf16 (to nearest, ties to even) into `dst` (same length).
pub fn round_to_bf16(src: &[f32], dst: &mut [u16]) {
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

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx {
    use std::arch::asm;

    use rayon::prelude::*;

    use super::{round_to_bf16, WeightRows};

    /// Tile rows: weight rows per A tile, input rows per B tile.
    const TR: usize = 16;
    /// Tile depth in bf16 values (64 bytes per A tile row).
    const TK: usize = 32;
    /// Weight rows per task: two A tiles.
    const PANEL: usize = 2 * TR;
    /// Input rows per inner block: two B tiles.
    const MB: usize = 2 * TR;

    pub fn matmul(x: &[f32], m: usize, k: usize, n: usize, w: &impl WeightRows, dst: &mut [f32]) {
        if m == 0 || n == 0 {
            return;
        }
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
                || (vec![0u16; PANEL * sw], Vec::new()),
                |(panel, scratch), p| {
                    let r0 = p * PANEL;
                    let nr = PANEL.min(n - r0);
                    // Rows past the matrix and columns past k are zeros.
                    for (i, dst) in panel.chunks_exact_mut(sw).enumerate() {
                        if i < nr {
                            w.fill_row(r0 + i, &mut dst[..k], scratch);
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

    /// The output pointer shared by tasks writing disjoint columns.
    #[derive(Clone, Copy)]
    struct SendPtr(*mut f32);
    // SAFETY: tasks write disjoint parts of the buffer and the owner waits for all of them.
    unsafe impl Send for SendPtr {}
    unsafe impl Sync for SendPtr {}

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

    /// The product in f64 of the bf16-rounded operands.
    fn reference(x: &[f32], w: &[u16], m: usize, k: usize, n: usize) -> Vec<f64> {
        let xb = round(x);
        let f = |b: u16| bf16::from_bits(b).to_f64();
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for r in 0..n {
                y[i * n + r] = (0..k).map(|j| f(xb[i * k + j]) * f(w[r * k + j])).sum();
            }
        }
        y
    }

    struct Rows<'a>(&'a [u16], usize);
    impl WeightRows for Rows<'_> {
        fn fill_row(&self, r: usize, out: &mut [u16], _: &mut Vec<f32>) {
            out.copy_from_slice(&self.0[r * self.1..(r + 1) * self.1]);
        }
    }

    fn run(x: &[f32], w: &[u16], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut y = vec![f32::NAN; m * n];
        matmul(x, m, k, n, &Rows(w, k), &mut y);
        y
    }

    #[test]
    fn tiles_match_the_f64_product_of_bf16_operands() {
        if !available() {
            eprintln!("no AMX-BF16 on this CPU: the tile kernel is not exercised");
            return;
        }
        // Odd shapes: partial row blocks, panels, tile columns and depth.
        for (m, k, n) in [(1, 32, 16), (37, 100, 45), (64, 896, 70), (5, 3420, 33)] {
            let x = values(m * k, (m * k) as u64);
            let w = round(&values(n * k, (n * 7 + k) as u64));
            let y = run(&x, &w, m, k, n);
            let want = reference(&x, &w, m, k, n);
            for (i, (&g, &e)) in y.iter().zip(&want).enumerate() {
                // f32 accumulation of k products of magnitude <= 1.
                let tol = 1e-6 * k as f64;
                assert!((g as f64 - e).abs() <= tol, "{m}x{k}x{n} [{i}]: {g} vs {e}");
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_and_batched() {
        if !available() {
            eprintln!("no AMX-BF16 on this CPU: the tile kernel is not exercised");
            return;
        }
        let (m, k, n) = (41, 200, 50);
        let x = values(m * k, 3);
        let w = round(&values(n * k, 4));
        let all = run(&x, &w, m, k, n);
        for i in [0, 17, 40] {
            let one = run(&x[i * k..(i + 1) * k], &w, 1, k, n);
            assert_eq!(one, all[i * n..(i + 1) * n], "row {i}");
        }
    }
}
