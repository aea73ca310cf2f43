//! What the hand-written CPU kernels share: the features they pick at run
//! time (so release builds without `-C target-cpu` still use wide vectors)
//! and the f32 GEMM they call.

/// AVX2 + FMA + F16C (x86-64-v3 minus BMI/LZCNT/MOVBE, which no kernel here uses).
#[cfg(target_arch = "x86_64")]
pub fn has_avx2() -> bool {
    use std::sync::OnceLock;
    static AVX2: OnceLock<bool> = OnceLock::new();
    *AVX2.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

/// `len` zeros, for weights read once and then streamed by the kernels in
/// every step. On Linux their pages are asked to be huge (2 MiB): where
/// transparent huge pages are left to `madvise` (Debian's default) a fresh
/// buffer is otherwise mapped 4 KiB at a time, a TLB entry per 4 KiB of the
/// weights every decode step reads (1.5B decode 4 % faster with them on a
/// Zen 2 VM: benchmark/profile-notes.md).
pub(crate) fn zeroed_weights<T: Copy + Default>(len: usize) -> Vec<T> {
    // Zeroed by the allocator (for the integer types weights are held in):
    // fresh pages, untouched until written.
    let v = vec![T::default(); len];
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = v.as_ptr() as usize;
        let end = start + std::mem::size_of_val(v.as_slice());
        let (a, b) = (start.next_multiple_of(PAGE), end & !(PAGE - 1));
        if b > a {
            // SAFETY: whole pages inside the allocation; MADV_HUGEPAGE is a
            // hint that changes no contents (an error leaves 4 KiB pages).
            unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE) };
        }
    }
    v
}

/// How far ahead of the kernels' read position weights are prefetched.
/// Measured on a 2-vCPU Xeon (1.5B decode, 2 threads): 1 KiB left bf16 at
/// 6.8 tok/s, Q8_0 at 10.6; 3-6 KiB gave 7.4-7.6 and 11.6-12.0 (8 KiB less).
/// The hardware prefetchers stop at 4 KiB pages; these hints do not.
#[cfg(target_arch = "x86_64")]
const PREFETCH_DISTANCE: usize = 4096;

/// The weights stream from memory once: ask for the lines
/// [`PREFETCH_DISTANCE`] past the `len` bytes at `blk` (past a row's end:
/// the next rows', which the task reads next; a prefetch never faults).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_ahead(blk: &[u8], len: usize) {
    for off in (0..len).step_by(64) {
        // SAFETY: a prefetch is a hint; it reads nothing and never faults,
        // whatever the address.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                blk.as_ptr().wrapping_add(PREFETCH_DISTANCE + off) as *const i8,
            )
        };
    }
}

/// An output pointer shared by parallel tasks that write disjoint parts of
/// its buffer (the kernels' row and column ranges).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: tasks write disjoint parts of the buffer and the owner waits for all of them.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    /// The pointer (a method, so closures capture the `Sync` wrapper).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Whether the CPU is AMD's (some instructions' speed differs by vendor:
/// `crate::panel_gemm`).
pub fn is_amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let id = std::arch::x86_64::__cpuid(0);
        [id.ebx, id.edx, id.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .eq(*b"AuthenticAMD")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// AVX-VNNI (`vpdpbusd` in its VEX encoding) with AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
pub fn has_avx_vnni() -> bool {
    use std::sync::OnceLock;
    static VNNI: OnceLock<bool> = OnceLock::new();
    *VNNI.get_or_init(|| has_avx2() && is_x86_feature_detected!("avxvnni"))
}

/// AVX512-VNNI with its 256-bit (VL) forms, with AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
pub fn has_avx512_vnni() -> bool {
    use std::sync::OnceLock;
    static VNNI: OnceLock<bool> = OnceLock::new();
    *VNNI.get_or_init(|| {
        has_avx2() && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")
    })
}

/// `dst = lhs . rhs` in f32 with the `gemm` crate, on the calling thread:
/// `dst` is `[m, n]` and `lhs` `[m, k]`, both with unit column stride and the
/// given row strides; `rhs` is `[k, n]` with the given row and column strides.
///
/// # Safety
/// Each pointer with its extent and strides must stay inside its buffer, and
/// `dst` must not overlap the inputs.
pub unsafe fn gemm_f32(
    dims: (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    lhs: *const f32,
    lhs_rs: usize,
    rhs: *const f32,
    rhs_strides: (usize, usize),
) {
    gemm_f32_into(dims, dst, dst_rs, lhs, lhs_rs, rhs, rhs_strides, false)
}

/// `dst += lhs . rhs`, otherwise as [`gemm_f32`].
///
/// # Safety
/// As [`gemm_f32`].
pub unsafe fn gemm_f32_add(
    dims: (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    lhs: *const f32,
    lhs_rs: usize,
    rhs: *const f32,
    rhs_strides: (usize, usize),
) {
    gemm_f32_into(dims, dst, dst_rs, lhs, lhs_rs, rhs, rhs_strides, true)
}

#[allow(clippy::too_many_arguments)]
unsafe fn gemm_f32_into(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    lhs: *const f32,
    lhs_rs: usize,
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    accumulate: bool,
) {
    // gemm computes dst = alpha * dst + beta * lhs . rhs (dst read only
    // when asked).
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        1,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        if accumulate { 1.0 } else { 0.0 },
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}
