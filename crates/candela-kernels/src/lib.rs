//! candela's CUDA kernels: paged attention (KV writes, decode, prefill over
//! cached prefixes) and token sampling.
//!
//! [`plan`] is the host-side half, plain Rust on every build: it turns a
//! batch's layout into the flat arrays and launch shapes the kernels take.
//! [`cuda`] (feature `cuda`) holds the launchers; build.rs compiles
//! kernels/candela.cu with nvcc into the fatbin they load.

pub mod plan;

#[cfg(feature = "cuda")]
pub mod cuda;

pub use plan::{AttentionPlan, HeadLayout, PlanError, PlanSeq, SampleRow};
