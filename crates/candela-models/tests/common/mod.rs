//! Shared by the multimodal parity tests.

use candela_models::input::EngineCaches;
use candle_core::DType;

/// No engine and no caches: every item is processed from its data, as on a
/// first request.
pub struct NoCaches;

impl EngineCaches for NoCaches {
    fn caching(&self) -> bool {
        false
    }
    fn encoder_rows(&self, _: &str) -> Option<usize> {
        None
    }
    fn embedding_shape(&self) -> (usize, DType) {
        (0, DType::F32)
    }
}
