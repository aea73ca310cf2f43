//! Media decoding and preprocessing for multimodal models.
//!
//! Plain Rust on purpose (no candle): `mm_hash`, the identity of a media item
//! that the prefix, processor and encoder caches key on, and audio decoding,
//! resampling, Whisper log-mel features and splitting. Callers turn the plain
//! `Vec<f32>` outputs into tensors.

pub mod audio;
mod error;
mod hash;

pub use error::MediaError;
pub use hash::{mm_hash, MmHash, Modality};
