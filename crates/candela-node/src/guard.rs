//! Keeps panics on our side of the napi boundary: every entry point runs its
//! body through [`guard`], which turns a panic into an ordinary JS error.

use std::panic::{catch_unwind, AssertUnwindSafe};

use napi::bindgen_prelude::spawn_blocking;
use napi::{Error, Result, Status};

/// The message of a panic payload (`&str` or `String`; anything else is opaque).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

/// Run `f`, turning a panic into `Err` with the panic's message.
pub fn guard<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => Err(internal(format!(
            "internal error in {what} (this is a bug in candela): {}",
            panic_message(payload.as_ref())
        ))),
    }
}

/// An error for bad input: JS sees `Error` with exactly this message.
pub fn invalid(msg: impl Into<String>) -> Error {
    Error::new(Status::InvalidArg, msg.into())
}

/// An error that is not the caller's fault.
pub fn internal(msg: impl Into<String>) -> Error {
    Error::new(Status::GenericFailure, msg.into())
}

/// An error for a call on an engine or transcriber that is closed (JS sees
/// `code: 'Closing'`).
pub fn closed(msg: impl Into<String>) -> Error {
    Error::new(Status::Closing, msg.into())
}

/// An error for work dropped because its caller cancelled it (JS sees
/// `code: 'Cancelled'`).
pub fn cancelled(msg: impl Into<String>) -> Error {
    Error::new(Status::Cancelled, msg.into())
}

/// Run `f` on a worker thread, never the JS thread, with panics turned into
/// errors.
pub async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    match spawn_blocking(move || guard(what, f)).await {
        Ok(r) => r,
        Err(e) if e.is_panic() => Err(internal(format!(
            "internal error in {what} (this is a bug in candela): {}",
            panic_message(e.into_panic().as_ref())
        ))),
        Err(e) => Err(internal(format!("{what} was cancelled: {e}"))),
    }
}
