//! How far a load has got: parameters read from the checkpoint (and
//! quantized, when asked) out of all the parameters its files hold,
//! reported to a callback as they grow.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::gguf_file;

use crate::error::{ModelError, Result};

/// Called with (parameters loaded, total parameters): never decreasing, and
/// last with loaded == total once the load has succeeded.
#[derive(Clone)]
pub struct OnProgress(pub Arc<dyn Fn(u64, u64) + Send + Sync>);

impl std::fmt::Debug for OnProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnProgress")
    }
}

/// Reports are made at most every this fraction of the total (and at the end).
const STEPS: u64 = 200;

/// One load's counter.
pub struct LoadProgress {
    total: u64,
    /// A lock so that reports go out in order.
    state: Mutex<State>,
}

struct State {
    loaded: u64,
    reported: u64,
    /// Dropped by [`LoadProgress::finish`]: a model that kept its weights
    /// source alive must not keep the listener (a JS callback) alive too.
    report: Option<OnProgress>,
}

impl std::fmt::Debug for LoadProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadProgress")
            .field("total", &self.total)
            .finish()
    }
}

impl LoadProgress {
    /// A counter at 0 of `total`, reported at once.
    pub fn start(total: u64, report: OnProgress) -> Arc<Self> {
        (report.0)(0, total);
        Arc::new(Self {
            total,
            state: Mutex::new(State {
                loaded: 0,
                reported: 0,
                report: Some(report),
            }),
        })
    }

    /// `n` more parameters were read (capped at the total: a tensor read
    /// twice must not take the count past it).
    pub fn advance(&self, n: u64) {
        let Ok(mut s) = self.state.lock() else { return };
        s.loaded = (s.loaded + n).min(self.total);
        if s.loaded - s.reported >= (self.total / STEPS).max(1) {
            s.reported = s.loaded;
            if let Some(r) = &s.report {
                (r.0)(s.loaded, self.total);
            }
        }
    }

    /// The load is complete: report the total (once), whatever was read,
    /// and let the listener go.
    pub fn finish(&self) {
        let Ok(mut s) = self.state.lock() else { return };
        if let Some(r) = s.report.take() {
            if s.reported != self.total {
                (r.0)(self.total, self.total);
            }
        }
        s.loaded = self.total;
        s.reported = self.total;
    }
}

/// Parameters (elements) in safetensors files, from their headers alone.
pub fn safetensors_parameters(files: &[PathBuf]) -> Result<u64> {
    let mut total = 0u64;
    for path in files {
        let bad = |message: String| ModelError::Weights {
            path: path.clone(),
            message,
        };
        let mut f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len)
            .map_err(|e| ModelError::io(path, e))?;
        let len = u64::from_le_bytes(len);
        // The format caps its header at 100 MB.
        if len > 100_000_000 {
            return Err(bad(format!("safetensors header of {len} bytes")));
        }
        let mut header = vec![0u8; len as usize];
        f.read_exact(&mut header)
            .map_err(|e| ModelError::io(path, e))?;
        let json: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| bad(format!("not a valid safetensors header: {e}")))?;
        for (name, info) in json.iter().filter(|(k, _)| *k != "__metadata__") {
            let shape = info
                .get("shape")
                .and_then(|s| s.as_array())
                .ok_or_else(|| bad(format!("{name}: no shape in the header")))?;
            total += shape
                .iter()
                .map(|d| d.as_u64().unwrap_or(0))
                .product::<u64>();
        }
    }
    Ok(total)
}

/// Parameters (elements) of a GGUF file's tensors.
pub fn gguf_parameters(content: &gguf_file::Content) -> u64 {
    content
        .tensor_infos
        .values()
        .map(|i| i.shape.elem_count() as u64)
        .sum()
}

/// The progress of loading `dir`'s safetensors, when someone listens.
pub fn for_folder(dir: &Path, on: Option<&OnProgress>) -> Result<Option<Arc<LoadProgress>>> {
    let Some(on) = on else { return Ok(None) };
    let files = crate::weights::safetensors_files(dir)?;
    Ok(Some(LoadProgress::start(
        safetensors_parameters(&files)?,
        on.clone(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_grow_in_steps_and_end_at_the_total() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let p = LoadProgress::start(
            1000,
            OnProgress(Arc::new(move |a, b| s.lock().unwrap().push((a, b)))),
        );
        for _ in 0..300 {
            p.advance(3);
        }
        // Read twice: capped at the total.
        p.advance(500);
        p.finish();
        p.finish();
        let seen = seen.lock().unwrap();
        assert_eq!(seen.first(), Some(&(0, 1000)));
        assert_eq!(seen.last(), Some(&(1000, 1000)));
        assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "{seen:?}");
        // Every 5 parameters (1000 / 200), not every call.
        assert!(seen.len() < 200 && seen.len() > 100, "{}", seen.len());
        assert_eq!(seen.iter().filter(|x| x.0 == 1000).count(), 1);
    }
}
