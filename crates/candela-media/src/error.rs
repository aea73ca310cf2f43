//! The one error type of the media layer. Its kind decides the HTTP status the
//! server answers with; its message says what failed, in words a caller can act on.

/// What went wrong with a media item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MediaError {
    /// The input holds no samples at all (HTTP 400).
    #[error("{0}")]
    Empty(String),
    /// The bytes claim a known format but cannot be decoded (HTTP 422).
    #[error("{0}")]
    Corrupt(String),
    /// Not a format or codec this build decodes, or not media at all (HTTP 422).
    #[error("{0}")]
    Unsupported(String),
    /// A caller-given option or parameter is out of range (HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// Decoding would take more memory than one item may (HTTP 413).
    #[error("{0}")]
    TooLarge(String),
    /// The media memory budget stayed full while the item waited (HTTP 503).
    #[error("{0}")]
    Busy(String),
}

impl MediaError {
    /// The HTTP status the server should answer with for this error.
    pub fn http_status(&self) -> u16 {
        match self {
            MediaError::Empty(_) | MediaError::Invalid(_) => 400,
            MediaError::Corrupt(_) | MediaError::Unsupported(_) => 422,
            MediaError::TooLarge(_) => 413,
            MediaError::Busy(_) => 503,
        }
    }

    /// A short stable name for the kind (for logs and error codes).
    pub fn kind(&self) -> &'static str {
        match self {
            MediaError::Empty(_) => "empty",
            MediaError::Corrupt(_) => "corrupt",
            MediaError::Unsupported(_) => "unsupported",
            MediaError::Invalid(_) => "invalid",
            MediaError::TooLarge(_) => "too_large",
            MediaError::Busy(_) => "busy",
        }
    }

    /// The message alone, without the kind.
    pub fn message(&self) -> &str {
        match self {
            MediaError::Empty(m)
            | MediaError::Corrupt(m)
            | MediaError::Unsupported(m)
            | MediaError::Invalid(m)
            | MediaError::TooLarge(m)
            | MediaError::Busy(m) => m,
        }
    }
}

/// Run a third-party codec on untrusted bytes: a panic inside it becomes
/// `Corrupt("{what} failed on malformed input: …")` instead of unwinding
/// into the caller (and across napi).
pub fn guard_codec<T>(
    what: &str,
    f: impl FnOnce() -> Result<T, MediaError>,
) -> Result<T, MediaError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(MediaError::Corrupt(format!(
                "{what} failed on malformed input: {msg}"
            )))
        }
    }
}
