//! Media decoding and preprocessing for multimodal models.
//!
//! For now this crate holds the identity of a media item (`mm_hash`), which the
//! prefix, processor and encoder caches all key on. Decoders and per-model
//! processors arrive with the vision and audio work.

mod hash;

pub use hash::{mm_hash, MmHash, Modality};
