//! The activations vision towers and projectors are configured with, by
//! their transformers names.

use candle_core::{Result, Tensor};

use crate::error::{ModelError, Result as MResult};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    QuickGelu,
    GeluErf,
    GeluTanh,
    Silu,
}

impl Activation {
    pub fn parse(name: &str) -> MResult<Self> {
        match name {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::GeluErf),
            "gelu_pytorch_tanh" | "gelu_new" => Ok(Self::GeluTanh),
            "silu" | "swish" => Ok(Self::Silu),
            other => Err(ModelError::Config(format!(
                "unsupported activation {other:?} (quick_gelu, gelu, gelu_pytorch_tanh, gelu_new, silu)"
            ))),
        }
    }

    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Self::GeluErf => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            Self::Silu => x.silu(),
        }
    }
}
