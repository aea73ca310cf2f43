//! CPU features the hand-vectorised kernels pick at run time, so release
//! builds without `-C target-cpu` still use wide vectors.

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
