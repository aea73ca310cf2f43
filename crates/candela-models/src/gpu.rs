//! What the models tell the engine about a GPU: memory figures to size the
//! KV cache (`gpu_memory_utilization`) and token sampling on the device.
//! Without the `cuda` feature, or on the CPU, both answer None.

use candela_core::model::{DeviceMemory, DeviceSampleRow};
use candle_core::{DType, Device, Result, Tensor};

use crate::nn::decoder::DecoderConfig;

/// Rough peak activation bytes of a decoder step of `tokens` tokens and
/// `seqs` logits rows: the per-token intermediates that can be alive at once
/// (residual, norms, q/k/v and their rotated copies, attention output, the
/// MLP's gate/up/product), twice for temporaries, the logits in the model
/// dtype and f32, and 64 MiB for cuBLAS workspaces.
pub fn decoder_activation_bytes(
    cfg: &DecoderConfig,
    dtype: DType,
    tokens: usize,
    seqs: usize,
) -> usize {
    let e = dtype.size_in_bytes();
    let qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim;
    let per_token = e * (6 * cfg.hidden_size + 3 * qkv + 4 * cfg.intermediate_size);
    let logits = seqs.saturating_mul(cfg.vocab_size).saturating_mul(e + 4);
    2usize
        .saturating_mul(tokens.saturating_mul(per_token))
        .saturating_add(2 * logits)
        .saturating_add(64 << 20)
}

/// Free / total memory of `device` when it is a GPU, with `activation_bytes`.
pub fn device_memory(device: &Device, activation_bytes: usize) -> Option<DeviceMemory> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        // A failed query leaves the budget to the CPU rule rather than guessing.
        let (free_bytes, total_bytes) = candela_kernels::cuda::memory_info(dev).ok()?;
        return Some(DeviceMemory {
            free_bytes,
            total_bytes,
            activation_bytes,
        });
    }
    let _ = (device, activation_bytes);
    None
}

/// Sample `rows` of `logits` on its GPU; None when the logits are not on one.
pub fn sample_on_device(logits: &Tensor, rows: &[DeviceSampleRow]) -> Option<Result<Vec<u32>>> {
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        let rows: Vec<candela_kernels::SampleRow> = rows
            .iter()
            .map(|r| candela_kernels::SampleRow {
                row: r.row,
                temperature: r.temperature,
                top_k: r.top_k,
                top_p: r.top_p,
                min_p: r.min_p,
                uniform: r.uniform,
            })
            .collect();
        return Some(candela_kernels::cuda::sample(logits, &rows));
    }
    let _ = (logits, rows);
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_models_report_no_gpu() {
        assert_eq!(device_memory(&Device::Cpu, 1), None);
        let logits = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
        assert!(sample_on_device(&logits, &[]).is_none());
    }
}
