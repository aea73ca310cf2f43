//! Media decoding and preprocessing for multimodal models.
//!
//! Plain Rust on purpose (no candle): `mm_hash`, the identity of a media item
//! that the prefix, processor and encoder caches key on; audio decoding,
//! resampling, Whisper log-mel features and splitting; image decoding and the
//! Qwen2-VL image processor; video frame sampling, the Qwen2-VL video processor
//! and video file decoding. Callers turn the plain `Vec<f32>` outputs into
//! tensors.

pub mod audio;
pub mod budget;
mod error;
mod hash;
pub mod image;
pub mod video;

pub use budget::{MediaBudget, Reservation};
pub use error::MediaError;
pub use hash::{mm_hash, MmHash, Modality};
