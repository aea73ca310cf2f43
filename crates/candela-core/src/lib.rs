//! candela-core: the engine loop, scheduler, paged KV cache bookkeeping,
//! prefix cache, sampling and detokenization. No model code: a model plugs in
//! through [`model::Model`].

pub mod block_manager;
pub mod block_pool;
pub mod detokenizer;
pub mod encoder_cache;
pub mod engine;
mod engine_core;
pub mod grammar;
pub mod lru;
pub mod model;
pub mod output;
pub mod params;
pub mod prefix_cache;
pub mod request;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod threads;

#[cfg(test)]
mod device_sampling_tests;
#[cfg(test)]
mod grammar_tests;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;

pub use engine::{Engine, EngineConfig, EngineError, EngineStats, RequestHandle};
pub use grammar::{Grammar, GrammarCompiler, GrammarSpec};
pub use model::{
    DeviceMemory, DeviceSampleRow, ForwardBatch, MmEmbedSpan, Model, ModelSpec, SeqSlice,
    TokenDecoder,
};
pub use output::{FinishReason, RequestEvent, TokenLogprob, TopLogprob, Usage};
pub use params::SamplingParams;
pub use request::{EngineRequest, MmFeatures, MmInput, MmItem, MmPlaceholder};
