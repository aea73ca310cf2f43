//! Speech to text with Whisper: [`Transcriber::load`] a Whisper folder,
//! then [`Transcriber::transcribe`] mono samples (or
//! [`Transcriber::transcribe_bytes`] an audio file) from any number of
//! threads at once.
//!
//! Whisper is an encoder-decoder, not a decoder-only LM, so it does not go
//! through [`crate::load`] / the paged engine: `load()` of a Whisper folder
//! fails with a message pointing here. A transcriber owns one decoding
//! thread ([`runner`]) that batches every queued 30 s window.
//!
//! Audio longer than one window is split with
//! [`candela_media::audio::split_audio`] (30 s clips, cut at the quietest
//! point of the last second), every clip is transcribed (all clips of a
//! request decode in the same batch), and the texts are joined with spaces.
//! Each clip is one [`Segment`] with its start and end time.
//!
//! Prompt per window, as transformers / openai-whisper build it:
//! `[<|startofprev|> prompt…] <|startoftranscript|> <|lang|> <|task|>
//! <|notimestamps|>` (English-only models: no language or task token). With
//! no language given, a multilingual model detects it from the first
//! window's `<|startoftranscript|>` logits and uses it for every window.

mod runner;
mod tokens;

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::sync::Arc;

use candela_media::audio::{
    decode_to_mono, split_audio, Padding, SplitOptions, WhisperFeatureConfig,
    WhisperFeatureExtractor,
};
use candela_media::MediaError;
use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::error::{ModelError, Result as MResult};
use crate::families::whisper::{self, Whisper, WhisperConfig};
use crate::loader::{is_auto_dtype, parse_device, parse_dtype, LoadOptions};
use crate::tokenizer::{read_json, Tokenizer};
use crate::weights::Weights;

pub use runner::{ChunkOutput, RunnerStats};
pub use tokens::{language_name, Task, WhisperTokens, LANGUAGES};

/// Windows decoded together at most (more wait for the next free slot).
pub const DEFAULT_MAX_BATCH: usize = 16;

/// Why a transcription failed. `Media` and `Invalid` are the caller's
/// input (HTTP 400 / 422 by [`MediaError::http_status`]; `Invalid` is 400);
/// `Model` and `Closed` are not.
#[derive(Debug, thiserror::Error)]
pub enum TranscribeError {
    #[error("{0}")]
    Media(#[from] MediaError),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Model(String),
    #[error("the transcriber is closed")]
    Closed,
    /// The caller's cancel flag was set.
    #[error("the transcription was cancelled")]
    Cancelled,
}

/// Options of one transcription.
#[derive(Debug, Clone, Default)]
pub struct TranscribeOptions {
    /// ISO-639-1 code (`"en"`) or English name (`"english"`); None detects it
    /// (multilingual models).
    pub language: Option<String>,
    pub task: Task,
    /// Text that conditions the decoder (`<|startofprev|>`), e.g. spellings
    /// of names; given to every window.
    pub prompt: Option<String>,
    /// 0 (default) decodes greedily; above 0 samples at that temperature.
    pub temperature: f32,
    /// Seed for sampling (temperature > 0); None draws one.
    pub seed: Option<u64>,
    /// Most tokens per window (default: up to the decoder's last position).
    pub max_new_tokens: Option<usize>,
}

/// One transcribed window.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Segment {
    pub id: usize,
    /// Seconds from the start of the audio.
    pub start: f64,
    pub end: f64,
    pub text: String,
    /// The generated tokens, without the final `<|endoftext|>`.
    pub tokens: Vec<u32>,
    /// Mean log-probability of the generated tokens (with `<|endoftext|>`).
    pub avg_logprob: f64,
    pub temperature: f32,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Transcription {
    /// Every segment's text, trimmed, joined with single spaces.
    pub text: String,
    /// The language code used (given or detected); `"en"` for English-only models.
    pub language: Option<String>,
    /// Seconds of audio.
    pub duration: f64,
    pub segments: Vec<Segment>,
}

/// Whether `path` is a Whisper model folder (its config.json names
/// `WhisperForConditionalGeneration` or model_type `whisper`).
pub fn is_whisper_model(path: &Path) -> bool {
    let cfg = path.join("config.json");
    cfg.is_file()
        && read_json(&cfg, "config.json")
            .map(|v| whisper::matches(&v))
            .unwrap_or(false)
}

pub struct Transcriber {
    model: Arc<Whisper>,
    tokenizer: Arc<Tokenizer>,
    extractor: WhisperFeatureExtractor,
    tokens: Arc<WhisperTokens>,
    runner: runner::Runner,
    model_name: String,
}

impl std::fmt::Debug for Transcriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transcriber")
            .field("model_name", &self.model_name)
            .finish()
    }
}

/// A request's plan: its windows and decoding settings.
struct Plan {
    ranges: Vec<std::ops::Range<usize>>,
    features: Vec<Tensor>,
    prefix: Vec<u32>,
    language: Option<u32>,
    task: Option<u32>,
    temperature: f32,
    seed: u64,
    max_new_tokens: usize,
    samples: usize,
    cancelled: Arc<AtomicBool>,
}

impl Transcriber {
    /// Load a Whisper folder: config.json, model.safetensors, tokenizer.json,
    /// generation_config.json (language / task / suppression ids; optional
    /// for English-only models) and preprocessor_config.json (optional:
    /// Whisper's defaults with the model's mel bins).
    pub fn load(path: &Path, opts: &LoadOptions) -> MResult<Self> {
        Self::load_with(path, opts, DEFAULT_MAX_BATCH)
    }

    /// [`Self::load`] with a cap on windows decoded together.
    pub fn load_with(path: &Path, opts: &LoadOptions, max_batch: usize) -> MResult<Self> {
        if !path.exists() {
            return Err(ModelError::MissingPath(path.to_path_buf()));
        }
        let cfg_path = path.join("config.json");
        if !path.is_dir() || !cfg_path.is_file() {
            return Err(ModelError::MissingFile {
                dir: path.to_path_buf(),
                file: "config.json",
            });
        }
        let raw: Value = read_json(&cfg_path, "config.json")?;
        if !whisper::matches(&raw) {
            return Err(ModelError::Config(format!(
                "{} is not a Whisper model (config.json names no WhisperForConditionalGeneration)",
                path.display()
            )));
        }
        let cfg = WhisperConfig::from_json(&raw)?;
        let device = parse_device(&opts.device)?;
        let dtype = parse_dtype(opts.dtype.as_deref(), &device)?;
        let tokenizer = Tokenizer::from_dir(path)?;
        let gen_path = path.join("generation_config.json");
        let gen = if gen_path.is_file() {
            read_json(&gen_path, "generation_config.json")?
        } else {
            Value::Null
        };
        let tokens = WhisperTokens::new(&gen, &cfg, &tokenizer)?;
        let pp = path.join("preprocessor_config.json");
        let extractor = if pp.is_file() {
            let text = std::fs::read_to_string(&pp).map_err(|e| ModelError::Io {
                path: pp.clone(),
                source: e,
            })?;
            WhisperFeatureExtractor::from_preprocessor_config(&text)
        } else {
            WhisperFeatureExtractor::new(WhisperFeatureConfig {
                feature_size: cfg.num_mel_bins,
                ..Default::default()
            })
        }
        .map_err(|e| ModelError::InvalidJson {
            what: "preprocessor_config.json",
            path: pp.clone(),
            message: e.to_string(),
        })?;
        if extractor.n_mels() != cfg.num_mel_bins
            || extractor.max_frames() != 2 * cfg.max_source_positions
        {
            return Err(ModelError::Config(format!(
                "preprocessor_config.json gives {} mel bins x {} frames, the encoder takes {} x {}",
                extractor.n_mels(),
                extractor.max_frames(),
                cfg.num_mel_bins,
                2 * cfg.max_source_positions
            )));
        }
        let weights = Weights::from_safetensors_dir(path, dtype, &device)?
            .keeping_half(is_auto_dtype(opts.dtype.as_deref()))?;
        let model = Whisper::load(cfg, &weights)?;
        let name = path
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| path.display().to_string());
        Self::from_parts(
            model,
            Arc::new(tokenizer),
            extractor,
            tokens,
            name,
            max_batch,
        )
    }

    /// Assemble a transcriber and start its decoding thread.
    pub fn from_parts(
        model: Whisper,
        tokenizer: Arc<Tokenizer>,
        extractor: WhisperFeatureExtractor,
        tokens: WhisperTokens,
        model_name: String,
        max_batch: usize,
    ) -> MResult<Self> {
        let model = Arc::new(model);
        let tokens = Arc::new(tokens);
        let runner =
            runner::Runner::start(model.clone(), tokens.clone(), max_batch).map_err(|e| {
                ModelError::Config(format!("cannot start the Whisper decoding thread: {e}"))
            })?;
        Ok(Self {
            model,
            tokenizer,
            extractor,
            tokens,
            runner,
            model_name,
        })
    }

    pub fn model(&self) -> &Whisper {
        &self.model
    }
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }
    pub fn tokens(&self) -> &WhisperTokens {
        &self.tokens
    }
    pub fn model_name(&self) -> &str {
        &self.model_name
    }
    /// The rate [`Self::transcribe`] wants its samples at (16 kHz).
    pub fn sampling_rate(&self) -> u32 {
        self.extractor.sampling_rate()
    }
    pub fn stats(&self) -> RunnerStats {
        self.runner.stats()
    }

    /// Stop the decoding thread after the windows it holds; later calls fail
    /// with [`TranscribeError::Closed`].
    pub fn close(&self) {
        self.runner.shutdown();
    }

    /// Log-mel features of one window (at most 30 s of mono samples at
    /// [`Self::sampling_rate`]), padded: `[num_mel_bins, 3000]` on the CPU.
    pub fn features(&self, samples: &[f32]) -> candle_core::Result<Tensor> {
        let f = self.extractor.extract(samples, Padding::MaxLength);
        Tensor::from_vec(f.data, (f.n_mels, f.frames), &Device::Cpu)
    }

    /// Decode an audio file (WAV, FLAC, MP3, OGG/Vorbis; any rate and
    /// channel count) and transcribe it.
    pub fn transcribe_bytes(
        &self,
        bytes: &[u8],
        format_hint: Option<&str>,
        opts: &TranscribeOptions,
    ) -> Result<Transcription, TranscribeError> {
        let samples = decode_to_mono(bytes, format_hint, self.sampling_rate())?;
        self.transcribe(&samples, opts)
    }

    /// Transcribe mono samples at [`Self::sampling_rate`]. Blocks until done;
    /// concurrent calls are decoded in the same batches.
    pub fn transcribe(
        &self,
        samples: &[f32],
        opts: &TranscribeOptions,
    ) -> Result<Transcription, TranscribeError> {
        self.transcribe_many(&[(samples, opts)])
            .pop()
            .unwrap_or(Err(TranscribeError::Closed))
    }

    /// [`Self::transcribe`] that gives up, with [`TranscribeError::Cancelled`],
    /// once `cancelled` is set: queued windows are dropped, active ones leave
    /// the batch at the next step.
    pub fn transcribe_cancellable(
        &self,
        samples: &[f32],
        opts: &TranscribeOptions,
        cancelled: Arc<AtomicBool>,
    ) -> Result<Transcription, TranscribeError> {
        self.run_plans(vec![self.plan(samples, opts, cancelled)])
            .pop()
            .unwrap_or(Err(TranscribeError::Closed))
    }

    /// Several transcriptions queued together (one batch), in order.
    pub fn transcribe_many(
        &self,
        requests: &[(&[f32], &TranscribeOptions)],
    ) -> Vec<Result<Transcription, TranscribeError>> {
        let plans = requests
            .iter()
            .map(|(s, o)| self.plan(s, o, Arc::new(AtomicBool::new(false))))
            .collect();
        self.run_plans(plans)
    }

    fn run_plans(
        &self,
        plans: Vec<Result<Plan, TranscribeError>>,
    ) -> Vec<Result<Transcription, TranscribeError>> {
        // Queue every window whose language is settled; a request that
        // detects its language over several windows queues its first
        // window alone, then the rest with the language found.
        let mut waits = Vec::with_capacity(plans.len());
        for plan in &plans {
            let wait = match plan {
                Ok(p) => {
                    let (tx, rx) = mpsc::channel();
                    let defer =
                        p.language.is_none() && self.tokens.is_multilingual() && p.ranges.len() > 1;
                    let first = if defer { 1 } else { p.ranges.len() };
                    let sent = (0..first).try_for_each(|i| self.submit(p, i, p.language, &tx));
                    // Our sender stays only while more windows are to come, so a
                    // stopped decoding thread ends every wait below.
                    sent.map(|_| (defer.then_some(tx), rx))
                }
                Err(_) => Err(TranscribeError::Closed),
            };
            waits.push(wait);
        }
        let mut outputs: Vec<Result<Vec<Option<ChunkOutput>>, TranscribeError>> =
            Vec::with_capacity(plans.len());
        for (plan, wait) in plans.iter().zip(waits.iter_mut()) {
            let (Ok(p), Ok((tx, rx))) = (plan, wait) else {
                outputs.push(Err(TranscribeError::Closed));
                continue;
            };
            let mut got: Vec<Option<ChunkOutput>> = vec![None; p.ranges.len()];
            let mut result = Ok(());
            if let Some(tx) = tx.take() {
                result = receive(rx, &mut got, 1).and_then(|_| {
                    let lang = got[0].as_ref().and_then(|c| c.language);
                    (1..p.ranges.len()).try_for_each(|i| self.submit(p, i, lang, &tx))
                });
            }
            let remaining = got.iter().filter(|g| g.is_none()).count();
            outputs.push(
                result
                    .and_then(|_| receive(rx, &mut got, remaining))
                    .map(|_| got),
            );
        }
        plans
            .into_iter()
            .zip(outputs)
            .zip(waits)
            .map(|((plan, out), wait)| {
                let plan = plan?;
                wait?;
                let chunks = out?;
                self.assemble(&plan, chunks)
            })
            .collect()
    }

    fn submit(
        &self,
        p: &Plan,
        i: usize,
        language: Option<u32>,
        tx: &mpsc::Sender<(usize, Result<ChunkOutput, String>)>,
    ) -> Result<(), TranscribeError> {
        let job = runner::Job {
            features: p.features[i].clone(),
            prefix: p.prefix.clone(),
            language,
            task: p.task,
            temperature: p.temperature,
            // Distinct streams per window of one seeded request.
            seed: p
                .seed
                .wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            max_new_tokens: p.max_new_tokens,
            index: i,
            reply: tx.clone(),
            cancelled: p.cancelled.clone(),
        };
        self.runner.submit(job).map_err(|e| {
            if self.runner.is_closed() {
                TranscribeError::Closed
            } else {
                TranscribeError::Model(e)
            }
        })
    }

    /// Check the options, split the audio and compute every window's features.
    fn plan(
        &self,
        samples: &[f32],
        opts: &TranscribeOptions,
        cancelled: Arc<AtomicBool>,
    ) -> Result<Plan, TranscribeError> {
        if self.runner.is_closed() {
            return Err(TranscribeError::Closed);
        }
        if samples.is_empty() {
            return Err(MediaError::Empty("the audio has no samples".into()).into());
        }
        if samples.iter().any(|x| !x.is_finite()) {
            return Err(TranscribeError::Invalid(
                "the audio has samples that are not finite numbers".into(),
            ));
        }
        let t = &self.tokens;
        let language = match opts.language.as_deref().map(str::trim).filter(|l| !l.is_empty()) {
            None => None,
            Some(l) if !t.is_multilingual() => {
                if !matches!(l.to_ascii_lowercase().as_str(), "en" | "english") {
                    return Err(TranscribeError::Invalid(format!("this model is English-only; language {l:?} is not supported")));
                }
                None
            }
            Some(l) => Some(t.language_id(l).ok_or_else(|| {
                TranscribeError::Invalid(format!(
                    "unknown language {l:?}; use an ISO-639-1 code (such as \"en\") or a name (such as \"english\") that the model knows"
                ))
            })?),
        };
        let task = match opts.task {
            _ if !t.is_multilingual() => {
                if opts.task == Task::Translate {
                    return Err(TranscribeError::Invalid(
                        "this model is English-only; it cannot translate".into(),
                    ));
                }
                None
            }
            Task::Transcribe => t.transcribe,
            Task::Translate => Some(t.translate.ok_or_else(|| {
                TranscribeError::Invalid("this model has no <|translate|> token".into())
            })?),
        };
        if !opts.temperature.is_finite() || opts.temperature < 0.0 {
            return Err(TranscribeError::Invalid(format!(
                "temperature must be a number >= 0, got {}",
                opts.temperature
            )));
        }
        let max_len = self.model.config().max_target_positions;
        let prefix = match opts
            .prompt
            .as_deref()
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            None => Vec::new(),
            Some(text) => {
                let sop = t.start_of_prev.ok_or_else(|| {
                    TranscribeError::Invalid(
                        "this model has no <|startofprev|> token for a prompt".into(),
                    )
                })?;
                let ids = self
                    .tokenizer
                    .encode(&format!(" {text}"), false)
                    .map_err(|e| TranscribeError::Invalid(format!("prompt: {e}")))?;
                if ids.iter().any(|&id| id >= t.eot) {
                    return Err(TranscribeError::Invalid(
                        "the prompt must not contain special tokens such as <|endoftext|>".into(),
                    ));
                }
                // Keep the prompt's end, at most half the decoder (as openai-whisper).
                let keep = (max_len / 2).saturating_sub(1).min(ids.len());
                let mut p = vec![sop];
                p.extend_from_slice(&ids[ids.len() - keep..]);
                p
            }
        };
        if opts.max_new_tokens == Some(0) {
            return Err(TranscribeError::Invalid(
                "max_new_tokens must be at least 1".into(),
            ));
        }
        let sr = self.sampling_rate();
        let ranges = split_audio(samples, sr, SplitOptions::default())?;
        let features = ranges
            .iter()
            .map(|r| self.features(&samples[r.clone()]))
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(|e| TranscribeError::Model(e.to_string()))?;
        Ok(Plan {
            ranges,
            features,
            prefix,
            language,
            task,
            temperature: opts.temperature,
            seed: opts.seed.unwrap_or_else(runner::random_seed),
            max_new_tokens: opts.max_new_tokens.unwrap_or(usize::MAX),
            samples: samples.len(),
            cancelled,
        })
    }

    /// Text of generated tokens: special and timestamp tokens dropped, trimmed.
    pub fn decode_text(&self, tokens: &[u32]) -> Result<String, TranscribeError> {
        let t = &self.tokens;
        let limit = t.timestamp_begin().unwrap_or(u32::MAX).min(t.eot);
        let text_ids: Vec<u32> = tokens.iter().copied().filter(|&x| x < limit).collect();
        let text = self
            .tokenizer
            .decode(&text_ids, true)
            .map_err(|e| TranscribeError::Model(e.to_string()))?;
        Ok(text.trim().to_string())
    }

    fn assemble(
        &self,
        plan: &Plan,
        chunks: Vec<Option<ChunkOutput>>,
    ) -> Result<Transcription, TranscribeError> {
        let sr = self.sampling_rate() as f64;
        let mut segments = Vec::with_capacity(chunks.len());
        let mut language = None;
        for (i, (range, chunk)) in plan.ranges.iter().zip(chunks).enumerate() {
            let chunk =
                chunk.ok_or_else(|| TranscribeError::Model("a window got no result".into()))?;
            if i == 0 {
                language = chunk.language;
            }
            let text = self.decode_text(&chunk.tokens)?;
            let mut tokens = chunk.tokens.clone();
            if tokens.last() == Some(&self.tokens.eot) {
                tokens.pop();
            }
            segments.push(Segment {
                id: i,
                start: range.start as f64 / sr,
                end: range.end as f64 / sr,
                text,
                tokens,
                avg_logprob: chunk.sum_logprob / chunk.tokens.len().max(1) as f64,
                temperature: plan.temperature,
            });
        }
        let text = segments
            .iter()
            .map(|s| s.text.as_str())
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        let language = match language {
            Some(id) => self.tokens.language_code(id).map(str::to_string),
            None if !self.tokens.is_multilingual() => Some("en".to_string()),
            None => None,
        };
        Ok(Transcription {
            text,
            language,
            duration: plan.samples as f64 / sr,
            segments,
        })
    }
}

impl Drop for Transcriber {
    fn drop(&mut self) {
        self.runner.shutdown();
    }
}

/// Wait for `n` more windows of one request.
fn receive(
    rx: &mpsc::Receiver<(usize, Result<ChunkOutput, String>)>,
    got: &mut [Option<ChunkOutput>],
    n: usize,
) -> Result<(), TranscribeError> {
    for _ in 0..n {
        let (i, r) = rx
            .recv()
            .map_err(|_| TranscribeError::Model("the Whisper decoding thread stopped".into()))?;
        let out = r.map_err(|e| {
            if e == runner::CANCELLED {
                TranscribeError::Cancelled
            } else {
                TranscribeError::Model(e)
            }
        })?;
        if let Some(slot) = got.get_mut(i) {
            *slot = Some(out);
        }
    }
    Ok(())
}
