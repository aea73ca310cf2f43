//! Building blocks shared by the families: the decoder language model over
//! the paged KV cache, the Whisper audio encoder (Whisper and Qwen2-Audio),
//! the CLIP / SigLIP vision transformer (LLaVA, Gemma 3, LLaVA-OneVision),
//! bilinear resizing of feature maps, the towers' activations, and the
//! attention the encoders share.

pub mod activation;
pub mod decoder;
pub mod fused_attention;
pub mod interpolate;
pub mod vit;
pub mod whisper_encoder;
