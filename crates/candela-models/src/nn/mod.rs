//! Building blocks shared by the families: the decoder language model over
//! the paged KV cache, and the Whisper audio encoder (Whisper and
//! Qwen2-Audio).

pub mod decoder;
pub mod whisper_encoder;
