//! The decoding thread. It takes every chunk queued so far, encodes each new
//! one once (encoder + cross-attention K/V), then decodes all active chunks
//! together, one token per chunk per step; chunks queued meanwhile join
//! between steps, finished ones leave.
//!
//! Per chunk, as transformers' `generate` does for Whisper: an optional
//! language-detection step (`<|startoftranscript|>` alone, argmax over the
//! language tokens), then the prompt (`<|startofprev|>` text, if any) and the
//! init tokens, then sampling with `suppress_tokens` always and
//! `begin_suppress_tokens` at the first generated token, until
//! `<|endoftext|>` or the decoder's last position.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use candela_core::sampler::{draw, greedy, suppress, SAMPLING_EPS};
use candle_core::Tensor;

use super::tokens::WhisperTokens;
use crate::families::whisper::{DecoderState, Whisper};

/// One 30 s window to decode.
pub(crate) struct Job {
    /// `[num_mel_bins, frames]` log-mel features of the padded window.
    pub features: Tensor,
    /// `<|startofprev|>` and the prompt's tokens, or empty.
    pub prefix: Vec<u32>,
    /// The language token; None asks for detection (multilingual models).
    pub language: Option<u32>,
    /// The task token (multilingual models).
    pub task: Option<u32>,
    pub temperature: f32,
    pub seed: u64,
    /// Most tokens to generate (the decoder's length caps it too).
    pub max_new_tokens: usize,
    /// Where the answer goes, tagged with `index`.
    pub index: usize,
    pub reply: Sender<(usize, Result<ChunkOutput, String>)>,
    /// Set by the caller to drop the window (before or between steps).
    pub cancelled: Arc<AtomicBool>,
}

/// The error text of a cancelled window.
pub(crate) const CANCELLED: &str = "the transcription was cancelled";

/// What one window decoded to.
#[derive(Debug, Clone)]
pub struct ChunkOutput {
    /// Generated tokens, `<|endoftext|>` included when the model ended.
    pub tokens: Vec<u32>,
    /// The language token used (given or detected).
    pub language: Option<u32>,
    /// Sum of the chosen tokens' log-probabilities (after suppression).
    pub sum_logprob: f64,
}

/// Counters of the decoding thread.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunnerStats {
    /// Windows encoded.
    pub encoder_runs: u64,
    /// Batched decoder steps.
    pub steps: u64,
    /// Most windows decoded together in one step so far.
    pub max_batch: usize,
    pub chunks_finished: u64,
}

struct Active {
    job: Job,
    state: DecoderState,
    pending: Vec<u32>,
    detecting: bool,
    generated: Vec<u32>,
    sum_logprob: f64,
    rng: SplitMix,
}

/// A small seeded generator for temperature sampling.
struct SplitMix(u64);

impl SplitMix {
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A seed from the OS's hashing randomness (no extra dependency).
pub(crate) fn random_seed() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(0x5eed);
    h.finish()
}

pub(crate) struct Runner {
    tx: Mutex<Option<Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    stats: Arc<Mutex<RunnerStats>>,
}

impl Runner {
    pub fn start(
        model: Arc<Whisper>,
        tokens: Arc<WhisperTokens>,
        max_batch: usize,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Mutex::new(RunnerStats::default()));
        let st = stats.clone();
        let thread = std::thread::Builder::new()
            .name("candela-whisper".into())
            .spawn(move || run(&model, &tokens, rx, max_batch.max(1), &st))?;
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            stats,
        })
    }

    /// Queue a window; fails once the runner is shut down.
    pub fn submit(&self, job: Job) -> Result<(), String> {
        let guard = self
            .tx
            .lock()
            .map_err(|_| "the transcriber is broken".to_string())?;
        match guard.as_ref() {
            Some(tx) => tx
                .send(job)
                .map_err(|_| "the transcriber's thread has stopped".to_string()),
            None => Err("the transcriber is closed".to_string()),
        }
    }

    pub fn stats(&self) -> RunnerStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Stop taking work; the thread finishes what it has, then exits.
    pub fn shutdown(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = handle {
            // Never join from the runner thread itself (a drop there).
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }

    pub fn is_closed(&self) -> bool {
        self.tx.lock().map(|t| t.is_none()).unwrap_or(true)
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run(
    model: &Whisper,
    tokens: &WhisperTokens,
    rx: Receiver<Job>,
    max_batch: usize,
    stats: &Mutex<RunnerStats>,
) {
    let mut active: Vec<Active> = Vec::new();
    let mut open = true;
    loop {
        let idle = active.is_empty();
        if idle {
            if !open {
                return;
            }
            match rx.recv() {
                Ok(job) => admit(model, tokens, job, &mut active, stats),
                Err(_) => return,
            }
        }
        // While windows are decoding, at most one new window is encoded per
        // step, so a long file arriving does not stall everyone else for a
        // whole batch of encoder runs.
        let mut budget = if idle { max_batch } else { 1 };
        while open && active.len() < max_batch && budget > 0 {
            budget -= 1;
            match rx.try_recv() {
                Ok(job) => admit(model, tokens, job, &mut active, stats),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => open = false,
            }
        }
        // Windows whose caller gave up leave now, freeing their slot.
        let mut i = 0;
        while i < active.len() {
            if active[i].job.cancelled.load(Ordering::Acquire) {
                let a = active.swap_remove(i);
                let _ = a.job.reply.send((a.job.index, Err(CANCELLED.to_string())));
            } else {
                i += 1;
            }
        }
        if active.is_empty() {
            continue;
        }
        if let Ok(mut s) = stats.lock() {
            s.steps += 1;
            s.max_batch = s.max_batch.max(active.len());
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| step(model, tokens, &mut active)));
        let failure = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("Whisper decoding failed: {e}")),
            Err(p) => Some(format!(
                "internal error in Whisper decoding (this is a bug in candela): {}",
                panic_text(p.as_ref())
            )),
        };
        if let Some(message) = failure {
            for a in active.drain(..) {
                let _ = a.job.reply.send((a.job.index, Err(message.clone())));
            }
            continue;
        }
        let mut i = 0;
        while i < active.len() {
            if active[i].pending.is_empty() {
                let a = active.swap_remove(i);
                let out = ChunkOutput {
                    tokens: a.generated,
                    language: a.job.language,
                    sum_logprob: a.sum_logprob,
                };
                let _ = a.job.reply.send((a.job.index, Ok(out)));
                if let Ok(mut s) = stats.lock() {
                    s.chunks_finished += 1;
                }
            } else {
                i += 1;
            }
        }
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// The tokens after `<|startoftranscript|>`: language, task, no-timestamps.
fn init_tail(tokens: &WhisperTokens, job: &Job) -> Vec<u32> {
    let mut out = Vec::with_capacity(3);
    if tokens.is_multilingual() {
        out.extend(job.language);
        out.extend(job.task);
    }
    out.extend(tokens.no_timestamps);
    out
}

fn full_prompt(tokens: &WhisperTokens, job: &Job) -> Vec<u32> {
    let mut p = job.prefix.clone();
    p.push(tokens.sot);
    p.extend(init_tail(tokens, job));
    p
}

fn admit(
    model: &Whisper,
    tokens: &WhisperTokens,
    job: Job,
    active: &mut Vec<Active>,
    stats: &Mutex<RunnerStats>,
) {
    if job.cancelled.load(Ordering::Acquire) {
        let _ = job.reply.send((job.index, Err(CANCELLED.to_string())));
        return;
    }
    let encoded = catch_unwind(AssertUnwindSafe(|| {
        model.encode(&job.features).and_then(|e| model.cross_kv(&e))
    }));
    let cross = match encoded {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            let _ = job
                .reply
                .send((job.index, Err(format!("Whisper encoder failed: {e}"))));
            return;
        }
        Err(p) => {
            let msg = format!(
                "internal error in the Whisper encoder (this is a bug in candela): {}",
                panic_text(p.as_ref())
            );
            let _ = job.reply.send((job.index, Err(msg)));
            return;
        }
    };
    if let Ok(mut s) = stats.lock() {
        s.encoder_runs += 1;
    }
    let detecting = tokens.is_multilingual() && job.language.is_none();
    // Detection reads the logits of <|startoftranscript|> at position 0,
    // without the prompt (as transformers' detect_language does).
    let pending = if detecting {
        vec![tokens.sot]
    } else {
        full_prompt(tokens, &job)
    };
    let rng = SplitMix(job.seed);
    active.push(Active {
        state: model.new_state(cross),
        pending,
        detecting,
        generated: Vec::new(),
        sum_logprob: 0.0,
        rng,
        job,
    });
}

/// One batched decoder step over every active window. A window whose
/// `pending` is left empty is finished.
fn step(model: &Whisper, tokens: &WhisperTokens, active: &mut [Active]) -> candle_core::Result<()> {
    let feed: Vec<Vec<u32>> = active
        .iter_mut()
        .map(|a| std::mem::take(&mut a.pending))
        .collect();
    let logits = {
        let mut states: Vec<&mut DecoderState> = active.iter_mut().map(|a| &mut a.state).collect();
        let slices: Vec<&[u32]> = feed.iter().map(|f| f.as_slice()).collect();
        model.decode(&mut states, &slices, true)?
    };
    let rows = logits.to_vec2::<f32>()?;
    let max_len = model.config().max_target_positions;
    for (a, mut row) in active.iter_mut().zip(rows) {
        if a.detecting {
            let lang = tokens
                .languages
                .iter()
                .map(|&(_, id)| id)
                .filter(|&id| (id as usize) < row.len())
                .fold(None::<(u32, f32)>, |best, id| match best {
                    Some((_, b)) if row[id as usize] <= b => best,
                    _ => Some((id, row[id as usize])),
                })
                .map(|(id, _)| id);
            a.job.language = lang;
            a.detecting = false;
            if a.job.prefix.is_empty() {
                // The cache already holds <|startoftranscript|> at position 0.
                a.pending = init_tail(tokens, &a.job);
            } else {
                a.state = a.state.restart();
                a.pending = full_prompt(tokens, &a.job);
            }
            if a.pending.is_empty() {
                a.pending = vec![tokens.sot];
            }
            continue;
        }
        suppress(&mut row, &tokens.suppress);
        if a.generated.is_empty() {
            suppress(&mut row, &tokens.begin_suppress);
        }
        let token = if a.job.temperature < SAMPLING_EPS {
            greedy(&row)
        } else {
            let t = a.job.temperature;
            let scaled: Vec<f32> = row.iter().map(|&l| l / t).collect();
            draw(&scaled, a.rng.uniform()).unwrap_or_else(|| greedy(&row))
        };
        a.sum_logprob += logprob_of(&row, token);
        a.generated.push(token);
        let at_end = a.state.len() + 1 >= max_len || a.generated.len() >= a.job.max_new_tokens;
        if token != tokens.eot && !at_end {
            a.pending = vec![token];
        }
    }
    Ok(())
}

/// `log_softmax(row)[token]`, in f64.
fn logprob_of(row: &[f32], token: u32) -> f64 {
    let max = row
        .iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(f32::NEG_INFINITY, f32::max) as f64;
    if !max.is_finite() {
        return f64::NEG_INFINITY;
    }
    let sum: f64 = row
        .iter()
        .filter(|x| x.is_finite())
        .map(|&x| (x as f64 - max).exp())
        .sum();
    row.get(token as usize)
        .map_or(f64::NEG_INFINITY, |&x| x as f64 - max - sum.ln())
}
