//! Whisper: speech recognition (an encoder-decoder with cross-attention),
//! run by its own batching loop ([`transcribe`]) rather than the paged
//! engine. Registered so that a Whisper folder given to the engine loader
//! gets a clear pointer to the transcriber.

mod model;
pub mod transcribe;

pub use model::*;

use super::{Built, Checkpoint, Family};
use crate::error::{ModelError, Result};

pub const FAMILY: Family = Family {
    name: "whisper",
    hf_architectures: &[ARCHITECTURE],
    gguf_architectures: &[],
    load_folder,
    gguf_config: None,
    mmproj: None,
};

fn load_folder(ck: &Checkpoint) -> Result<Built> {
    Err(ModelError::Config(format!(
        "{} is a Whisper speech-recognition model; load it with candela_models::transcribe::Transcriber::load (JS: Transcriber.load)",
        ck.dir.display()
    )))
}
