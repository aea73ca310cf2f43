//! Quantization at load (mistral.rs calls it in-situ quantization): a
//! safetensors checkpoint's language-model matrices become GGUF block
//! matrices ([`BlockMatrix`]) while the model loads, so they run on the same
//! kernels as a GGUF file's. Each matrix is quantized by row ranges in
//! parallel (candle's `QTensor::quantize` on each range), one matrix at a
//! time, so the load never holds more than one widened matrix at once.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};
use rayon::prelude::*;

use crate::error::{ModelError, Result};
use crate::quant::BlockMatrix;

/// The block formats a checkpoint can be quantized to, by vLLM-style name.
const NAMES: &[(&str, GgmlDType)] = &[
    ("q8_0", GgmlDType::Q8_0),
    ("q6_k", GgmlDType::Q6K),
    ("q5_k", GgmlDType::Q5K),
    ("q4_k", GgmlDType::Q4K),
    ("q4_0", GgmlDType::Q4_0),
];

/// Rows quantized per task: enough work to amortise a task, small enough
/// that a 4k-row matrix still spreads over every core.
const ROWS_PER_TASK: usize = 64;

/// A block format for quantization at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantization(GgmlDType);

impl Quantization {
    /// `q8_0`, `q6_k`, `q5_k`, `q4_k` or `q4_0` (any case).
    pub fn parse(name: &str) -> Result<Self> {
        let n = name.trim().to_ascii_lowercase();
        NAMES
            .iter()
            .find(|(k, _)| *k == n)
            .map(|&(_, d)| Self(d))
            .ok_or_else(|| {
                ModelError::UnsupportedQuantization(format!(
                    "{name:?}; use one of {}",
                    NAMES.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
                ))
            })
    }

    pub fn name(self) -> &'static str {
        NAMES
            .iter()
            .find(|(_, d)| *d == self.0)
            .map(|(k, _)| *k)
            .unwrap_or("?")
    }

    /// The type of the output head (the token embeddings when tied):
    /// q6_k unless q8_0 was asked for, as llama.cpp's quantizer does, since
    /// every logit goes through it.
    pub fn output_head(self) -> Self {
        if self.0 == GgmlDType::Q8_0 {
            self
        } else {
            Self(GgmlDType::Q6K)
        }
    }

    /// The block type a matrix with rows of `k` values gets. k-quants need
    /// rows of whole 256-value super-blocks; other rows fall back as
    /// llama.cpp's quantizer does (q4_k -> q5_0, q5_k -> q5_1, q6_k -> q8_0,
    /// 32-value blocks); `None` (keep the model dtype) when even those do
    /// not divide the row.
    pub fn block_type(self, k: usize) -> Option<GgmlDType> {
        let t = if k.is_multiple_of(self.0.block_size()) {
            self.0
        } else {
            match self.0 {
                GgmlDType::Q4K => GgmlDType::Q5_0,
                GgmlDType::Q5K => GgmlDType::Q5_1,
                _ => GgmlDType::Q8_0,
            }
        };
        k.is_multiple_of(t.block_size()).then_some(t)
    }

    /// `w` (`[n, k]`, any float dtype, CPU) as blocks; `None` when its rows
    /// cannot be blocked (see [`Self::block_type`]).
    pub fn quantize(self, w: &Tensor) -> Result<Option<BlockMatrix>> {
        let (n, k) = w.dims2()?;
        let Some(dtype) = self.block_type(k) else {
            return Ok(None);
        };
        let mut parts = (0..n)
            .step_by(ROWS_PER_TASK)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|r0| {
                // A copy of its own: `QTensor::quantize` reads the storage
                // from its start, whatever the view's offset.
                let rows = w
                    .narrow(0, r0, ROWS_PER_TASK.min(n - r0))?
                    .to_dtype(DType::F32)?
                    .force_contiguous()?;
                let q = QTensor::quantize(&rows, dtype)?;
                BlockMatrix::from_qtensor(&q)?.ok_or_else(|| {
                    candle_core::Error::Msg(format!("no block kernels for {dtype:?}"))
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        if parts.len() == 1 {
            return Ok(parts.pop());
        }
        let refs: Vec<&BlockMatrix> = parts.iter().collect();
        Ok(BlockMatrix::stack(&refs))
    }
}

impl std::fmt::Display for Quantization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::Activations;
    use candle_core::Device;

    #[test]
    fn names_round_trip_and_bad_names_are_rejected() {
        for (n, _) in NAMES {
            assert_eq!(Quantization::parse(n).unwrap().name(), *n);
        }
        assert_eq!(Quantization::parse(" Q4_K ").unwrap().name(), "q4_k");
        let err = Quantization::parse("q3_xs").unwrap_err().to_string();
        assert!(err.contains("q3_xs") && err.contains("q8_0, q6_k"), "{err}");
    }

    #[test]
    fn rows_that_are_not_whole_blocks_fall_back() {
        let q4k = Quantization::parse("q4_k").unwrap();
        assert_eq!(q4k.block_type(512), Some(GgmlDType::Q4K));
        assert_eq!(q4k.block_type(96), Some(GgmlDType::Q5_0));
        assert_eq!(
            Quantization::parse("q5_k").unwrap().block_type(96),
            Some(GgmlDType::Q5_1)
        );
        assert_eq!(
            Quantization::parse("q6_k").unwrap().block_type(96),
            Some(GgmlDType::Q8_0)
        );
        assert_eq!(q4k.block_type(100), None);
        assert_eq!(q4k.output_head().name(), "q6_k");
        let q8 = Quantization::parse("q8_0").unwrap();
        assert_eq!(q8.output_head(), q8);
        assert_eq!(Quantization::parse("q8_0").unwrap().block_type(100), None);
    }

    #[test]
    fn parallel_ranges_equal_one_quantization() -> Result<()> {
        let dev = Device::Cpu;
        // 150 rows: two full ranges and a partial one.
        let w = Tensor::randn(0f32, 1.0, (150, 256), &dev)?;
        for (q, dtype) in [
            ("q8_0", DType::F32),
            ("q4_k", DType::BF16),
            ("q6_k", DType::F32),
        ] {
            let q = Quantization::parse(q)?;
            let w = w.to_dtype(dtype)?;
            let ours = q.quantize(&w)?.expect("blocks");
            let whole =
                BlockMatrix::from_qtensor(&QTensor::quantize(&w.to_dtype(DType::F32)?, q.0)?)?
                    .expect("blocks");
            assert_eq!(ours.dims(), (150, 256));
            let x = Tensor::randn(0f32, 1.0, (3, 256), &dev)?;
            assert_eq!(
                ours.forward(&x, Activations::Int8)?.to_vec2::<f32>()?,
                whole.forward(&x, Activations::Int8)?.to_vec2::<f32>()?
            );
        }
        assert!(Quantization::parse("q8_0")?
            .quantize(&Tensor::zeros((4, 33), DType::F32, &dev)?)?
            .is_none());
        Ok(())
    }
}
