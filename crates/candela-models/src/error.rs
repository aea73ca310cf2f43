//! The crate's error type. Every failure that can come from user input (a
//! path, a config file, a checkpoint, a template) is a variant here with a
//! message that says what went wrong and where.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model path does not exist: {0}")]
    MissingPath(PathBuf),

    #[error("missing {file} in model folder {dir}")]
    MissingFile { dir: PathBuf, file: &'static str },

    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid {what} ({path}): {message}")]
    InvalidJson {
        what: &'static str,
        path: PathBuf,
        message: String,
    },

    #[error("unsupported architecture {name:?}; supported: {supported}")]
    UnsupportedArchitecture { name: String, supported: String },

    #[error("invalid model config: {0}")]
    Config(String),

    #[error("cannot load weights from {path}: {message}")]
    Weights { path: PathBuf, message: String },

    #[error("missing tensor {0:?} in checkpoint")]
    MissingTensor(String),

    #[error("invalid GGUF file {path}: {message}")]
    Gguf { path: PathBuf, message: String },

    /// A language-model GGUF and an mmproj file that do not belong together.
    #[error("{} and mmproj {} do not match: {message}", model.display(), mmproj.display())]
    MmprojMismatch {
        model: PathBuf,
        mmproj: PathBuf,
        message: String,
    },

    #[error("tokenizer error: {0}")]
    Tokenizer(String),

    #[error("chat template error: {0}")]
    ChatTemplate(String),

    /// A media item cannot be used as given (bad data, wrong count).
    #[error("{0}")]
    Media(String),

    /// Raised by a template through `raise_exception(msg)`; carries msg as is.
    #[error("chat template raised an exception: {0}")]
    TemplateException(String),

    #[error(
        "unsupported dtype {0:?}; use one of auto, f32, float32, bf16, bfloat16, f16, float16"
    )]
    UnsupportedDType(String),

    #[error("unsupported quantization {0}")]
    UnsupportedQuantization(String),

    #[error("unsupported device {0:?}: this build has no CUDA support (use \"cpu\")")]
    NoCuda(String),

    #[error("unsupported device {0:?}; supported: cpu, cuda, cuda:N")]
    UnsupportedDevice(String),

    /// A CUDA build found no usable GPU (no driver, no device, bad ordinal).
    #[error("no CUDA GPU was found for device {device:?} ({message})")]
    NoGpu { device: String, message: String },

    #[error("{}", candle_message(.0))]
    Candle(#[from] candle_core::Error),
}

/// A candle error's message without the backtrace candle attaches when
/// RUST_BACKTRACE is set: users get one clear line, not a stack dump.
pub(crate) fn candle_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        other => other.to_string(),
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}
