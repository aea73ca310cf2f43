//! Model forward passes on candle for candela: llama-family decoders
//! (llama, qwen2, qwen3) over a paged KV cache, weight loading
//! (safetensors, GGUF), tokenizers and chat templates.
//!
//! Entry point: [`load`] a model folder or `.gguf` file into a
//! [`LoadedModel`]; its `model` implements [`candela_core::model::Model`].

pub mod audio_encoder;
pub mod chat_template;
pub mod config;
pub mod cpu;
pub mod error;
pub mod gpu;
pub mod layers;
pub mod llama;
pub mod loader;
pub mod mm_embeds;
pub mod paged_attention;
pub mod processor;
pub mod quant;
pub mod qwen2;
pub mod qwen2_audio;
pub mod qwen2_vl;
pub mod qwen3;
pub mod registry;
pub mod rope;
pub mod softmax;
pub mod tokenizer;
pub mod transcribe;
pub mod weights;
pub mod whisper;

pub use chat_template::{ChatRenderOptions, ChatTemplate};
pub use error::ModelError;
pub use layers::{DecoderConfig, DecoderLm};
pub use loader::{load, GenerationDefaults, LoadOptions, LoadedModel};
pub use tokenizer::Tokenizer;
pub use weights::{Embedding, Linear, QuantWeight, Weights};
