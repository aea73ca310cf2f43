//! Micro-benchmark of the quantized matmul kernels: GFLOP/s of `[m, k] x [n, k]^T`
//! for the shapes of SmolLM2-135M and Qwen2.5-1.5B layers, per batch size m.
//!
//!   cargo run --release -p candela-models --example qmatmul [q4_0|q4_1|q5_0|q8_0|q2k|q3k|q4k|q5k|q6k] [f32|int8|bf16|int16] [m,m,...]
//!
//! `f32` keeps f32 activations (the logits' kernels), `int8` (default)
//! quantizes them for the integer kernels where the batch allows, `bf16`
//! rounds them for the bf16 matrix engine (prompt rows) where the CPU has one,
//! `int16` quantizes them to 15 bits for the integer prompt kernel where the
//! CPU has one (AVX512-VNNI, or AVX2 without AVX-512).

use candela_models::quant::{Activations, BlockMatrix};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let dtype = match std::env::args().nth(1).as_deref() {
        Some("q4_0") => GgmlDType::Q4_0,
        Some("q5_0") => GgmlDType::Q5_0,
        Some("q8_0") => GgmlDType::Q8_0,
        Some("q2k") => GgmlDType::Q2K,
        Some("q3k") => GgmlDType::Q3K,
        Some("q4k") => GgmlDType::Q4K,
        Some("q5k") => GgmlDType::Q5K,
        Some("q6k") => GgmlDType::Q6K,
        _ => GgmlDType::Q4_1,
    };
    let acts = match std::env::args().nth(2).as_deref() {
        Some("f32") => Activations::F32,
        Some("bf16") => Activations::Bf16,
        Some("int16") => Activations::Int16,
        _ => Activations::Int8,
    };
    let ms: Vec<usize> = std::env::args()
        .nth(3)
        .map(|s| s.split(',').filter_map(|m| m.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 4, 8, 16, 32, 64]);
    let dev = Device::Cpu;
    println!("{dtype:?} {acts:?}: m, shape, us/call, GFLOP/s");
    // SmolLM2-135M's MLP, Qwen2.5-1.5B's MLP, SmolLM2's tied LM head; shapes
    // that are not whole blocks of the type are skipped.
    let shapes = [
        (1536usize, 576usize),
        (576, 1536),
        (8960, 1536),
        (1536, 8960),
        (49152, 576),
    ];
    for (n, k) in shapes.into_iter().filter(|s| s.1 % dtype.block_size() == 0) {
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let bm = BlockMatrix::from_qtensor(&QTensor::quantize(&w, dtype)?)?.expect("supported");
        for &m in &ms {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i % 97) as f32 - 48.0) / 50.0)
                .collect();
            let iters = (200_000_000 / (m * n * k)).clamp(3, 2000);
            bm.matmul_f32(&x, m, acts)?;
            let t = Instant::now();
            for _ in 0..iters {
                std::hint::black_box(bm.matmul_f32(&x, m, acts)?);
            }
            let s = t.elapsed().as_secs_f64() / iters as f64;
            println!(
                "{m:>3} {n}x{k} {:>9.1} {:>6.1}",
                s * 1e6,
                2.0 * (m * n * k) as f64 / s / 1e9
            );
        }
    }
    Ok(())
}
