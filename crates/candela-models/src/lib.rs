//! Model forward passes on candle for candela: model families (text
//! decoders, multimodal models, Whisper) over a paged KV cache, their media
//! processors and the preparation of prompts with media, weight loading
//! (safetensors, GGUF), tokenizers and chat templates.
//!
//! Entry point: [`load`] a model folder or `.gguf` file into a
//! [`LoadedModel`]; its `model` implements [`candela_core::model::Model`],
//! its `processor` (multimodal models) feeds [`input::InputPreparer`].

pub mod chat_template;
pub mod config;
pub mod cpu;
pub mod error;
pub mod families;
pub mod gguf_types;
pub mod gpu;
pub mod half_matmul;
pub mod input;
pub mod load_progress;
pub mod loader;
pub mod mm_embeds;
pub mod mmproj;
pub mod multimodal;
pub mod nn;
pub mod paged_attention;
pub mod panel_gemm;
pub mod processor;
pub mod quant;
pub mod quantize;
pub mod rope;
pub mod safetensors_read;
pub mod softmax;
pub mod tensor_files;
pub mod tokenizer;
pub mod weights;

// Families by their short paths.
pub use families::whisper::transcribe;
pub use families::{gemma3, llama, qwen2, qwen2_audio, qwen2_vl, qwen3, whisper};

pub use chat_template::{ChatRenderOptions, ChatTemplate};
pub use error::ModelError;
pub use loader::{load, GenerationDefaults, LoadOptions, LoadedModel};
pub use nn::decoder::{DecoderConfig, DecoderLm};
pub use tokenizer::Tokenizer;
pub use weights::{Embedding, Linear, QuantWeight, Weights};

/// Seeded values in [-1, 1) for the kernels' tests (xorshift).
#[cfg(test)]
pub(crate) fn test_values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}
