//! Whisper transcription for JS: `NativeTranscriber.load(options)` and
//! `transcribe(request)`. Loading, audio decoding, resampling, log-mel
//! features and waiting for the decoder all run on worker threads (never
//! the JS thread); the transcriber's own thread batches the windows of all
//! requests in flight.
//!
//! Errors: a refused input (bad options, empty or undecodable audio)
//! resolves as a typed `NativeInputError` (code `invalid` or `media`, with its
//! HTTP status), as the engine's `addRequest` does; a closed transcriber
//! rejects with `Closing`, a cancelled request with `Cancelled`, anything
//! else with `GenericFailure`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candela_media::audio::{decode_to_mono, mono_from_channels, resample};
use candela_media::MediaError;
use candela_models::input::InputError;
use candela_models::transcribe::{
    language_name, Task, TranscribeError, TranscribeOptions, Transcriber, Transcription,
};
use candela_models::LoadOptions;
use napi::bindgen_prelude::{Buffer, Float32Array};
use napi::Result;
use napi_derive::napi;

use crate::guard::{blocking, cancelled, closed, guard, internal, invalid};
use crate::media::NativeInputError;

/// Options of `NativeTranscriber.load`.
#[napi(object)]
pub struct NativeTranscriberLoadOptions {
    /// A Whisper model folder (config.json, model.safetensors, tokenizer.json, ...).
    pub model: String,
    /// "cpu" (default), "cuda" / "cuda:N" (CUDA builds) or "auto".
    pub device: Option<String>,
    /// "auto" (default), "f32", "f16" or "bf16".
    pub dtype: Option<String>,
    /// Most 30 s windows decoded together (default 16).
    pub max_batch: Option<u32>,
}

/// One transcription: `audio` (file bytes) or `samples` + `sampleRate`.
#[napi(object)]
pub struct NativeTranscribeRequest {
    /// An audio file: WAV, FLAC, MP3 or OGG/Vorbis.
    pub audio: Option<Buffer>,
    /// Container hint for `audio` ("wav", "mp3", a MIME type).
    pub format: Option<String>,
    /// Raw samples, one array per channel (averaged to mono).
    pub samples: Option<Vec<Float32Array>>,
    pub sample_rate: Option<f64>,
    /// ISO-639-1 code or English name; omitted: detected.
    pub language: Option<String>,
    /// Text that conditions the decoder (names, spellings, style).
    pub prompt: Option<String>,
    /// 0 (default): greedy.
    pub temperature: Option<f64>,
    #[napi(ts_type = "'transcribe' | 'translate'")]
    pub task: Option<String>,
    pub seed: Option<u32>,
    /// Most tokens per 30 s window.
    pub max_new_tokens: Option<u32>,
    /// A caller-chosen id that `cancel(id)` refers to.
    pub id: Option<u32>,
}

#[napi(object)]
pub struct NativeSegment {
    pub id: u32,
    pub start: f64,
    pub end: f64,
    pub text: String,
    pub tokens: Vec<u32>,
    pub avg_logprob: f64,
    pub temperature: f64,
}

#[napi(object)]
pub struct NativeTranscription {
    pub text: String,
    /// Language code ("en").
    pub language: Option<String>,
    /// Its English name ("english"), as OpenAI's verbose_json reports it.
    pub language_name: Option<String>,
    pub duration: f64,
    pub segments: Vec<NativeSegment>,
}

/// What `transcribe` resolves to: the transcription, or why its input was
/// refused.
#[napi(object)]
pub struct NativeTranscribed {
    pub transcription: Option<NativeTranscription>,
    pub error: Option<NativeInputError>,
}

impl NativeTranscribed {
    fn refused(e: NativeInputError) -> Self {
        Self {
            transcription: None,
            error: Some(e),
        }
    }
}

#[napi(object)]
pub struct NativeTranscriberInfo {
    pub name: String,
    pub architecture: String,
    pub multilingual: bool,
    /// Language codes the model knows (empty for English-only models).
    pub languages: Vec<String>,
    pub sampling_rate: u32,
    pub max_target_positions: u32,
    pub device: String,
}

#[napi(object)]
pub struct NativeTranscriberStats {
    pub encoder_runs: f64,
    pub steps: f64,
    /// Most windows decoded together in one step so far.
    pub max_batch: u32,
    pub chunks_finished: f64,
}

/// Whether `path` is a Whisper model folder (for `candela serve` to pick
/// the transcriber instead of the engine).
#[napi]
pub fn is_whisper_model(path: String) -> bool {
    guard("isWhisperModel", || {
        Ok(candela_models::transcribe::is_whisper_model(
            &PathBuf::from(&path),
        ))
    })
    .unwrap_or(false)
}

/// A loaded Whisper model with its decoding thread.
#[napi]
pub struct NativeTranscriber {
    inner: Arc<Transcriber>,
    device: String,
    /// Cancel flags of the requests in flight that have an id.
    cancels: Arc<Mutex<HashMap<u32, Arc<AtomicBool>>>>,
}

/// Why a transcription failed: its input, refused (a value JS turns into a
/// typed error), or an error JS sees thrown.
enum Failure {
    Refused(NativeInputError),
    Thrown(napi::Error),
}

impl From<MediaError> for Failure {
    fn from(e: MediaError) -> Self {
        Failure::Refused(InputError::Media(e).into())
    }
}

impl From<TranscribeError> for Failure {
    fn from(e: TranscribeError) -> Self {
        match e {
            TranscribeError::Media(m) => m.into(),
            TranscribeError::Invalid(m) => Failure::Refused(NativeInputError::invalid(m)),
            TranscribeError::Closed => Failure::Thrown(closed("the transcriber is closed")),
            TranscribeError::Cancelled => {
                Failure::Thrown(cancelled("the transcription was cancelled"))
            }
            TranscribeError::Model(m) => Failure::Thrown(internal(m)),
        }
    }
}

/// The audio of a request, owned so it can move to a worker thread.
enum Audio {
    File(Vec<u8>, Option<String>),
    Samples(Vec<Vec<f32>>, u32),
}

fn options(
    r: &NativeTranscribeRequest,
) -> std::result::Result<TranscribeOptions, NativeInputError> {
    let task = match r.task.as_deref() {
        None => Task::Transcribe,
        Some(t) => Task::parse(t).ok_or_else(|| {
            NativeInputError::invalid(format!(
                "task must be 'transcribe' or 'translate', got {t:?}"
            ))
        })?,
    };
    let temperature = r.temperature.unwrap_or(0.0);
    if !temperature.is_finite() || temperature < 0.0 {
        return Err(NativeInputError::invalid(format!(
            "temperature must be a number >= 0, got {temperature}"
        )));
    }
    if r.max_new_tokens == Some(0) {
        return Err(NativeInputError::invalid("maxNewTokens must be at least 1"));
    }
    Ok(TranscribeOptions {
        language: r.language.clone(),
        task,
        prompt: r.prompt.clone(),
        temperature: temperature as f32,
        seed: r.seed.map(u64::from),
        max_new_tokens: r.max_new_tokens.map(|m| m as usize),
    })
}

fn audio(r: NativeTranscribeRequest) -> std::result::Result<Audio, NativeInputError> {
    match (r.audio, r.samples) {
        (Some(_), Some(_)) => Err(NativeInputError::invalid(
            "give either audio (file bytes) or samples, not both",
        )),
        (None, None) => Err(NativeInputError::invalid(
            "a transcription needs audio (file bytes) or samples with a sampleRate",
        )),
        (Some(bytes), None) => Ok(Audio::File(bytes.to_vec(), r.format)),
        (None, Some(channels)) => {
            let sr = r
                .sample_rate
                .ok_or_else(|| NativeInputError::invalid("samples need a sampleRate"))?;
            if !sr.is_finite() || sr.fract() != 0.0 || !(1.0..=u32::MAX as f64).contains(&sr) {
                return Err(NativeInputError::invalid(format!(
                    "sampleRate must be a positive whole number of Hz, got {sr}"
                )));
            }
            Ok(Audio::Samples(
                channels.iter().map(|c| c.to_vec()).collect(),
                sr as u32,
            ))
        }
    }
}

/// Decode (or take) the audio as mono at the model's rate and transcribe it.
fn run(
    inner: &Transcriber,
    audio: Audio,
    opts: &TranscribeOptions,
    cancel: Arc<AtomicBool>,
) -> std::result::Result<Transcription, Failure> {
    let rate = inner.sampling_rate();
    let mono = match audio {
        Audio::File(bytes, format) => decode_to_mono(&bytes, format.as_deref(), rate)?,
        Audio::Samples(channels, sr) => resample(&mono_from_channels(&channels)?, sr, rate)?,
    };
    if mono.is_empty() {
        return Err(MediaError::Empty("the audio has no samples".into()).into());
    }
    Ok(inner.transcribe_cancellable(&mono, opts, cancel)?)
}

fn convert(t: Transcription) -> NativeTranscription {
    NativeTranscription {
        language_name: t
            .language
            .as_deref()
            .and_then(language_name)
            .map(str::to_string),
        language: t.language,
        text: t.text,
        duration: t.duration,
        segments: t
            .segments
            .into_iter()
            .map(|s| NativeSegment {
                id: s.id as u32,
                start: s.start,
                end: s.end,
                text: s.text,
                tokens: s.tokens,
                avg_logprob: s.avg_logprob,
                temperature: s.temperature as f64,
            })
            .collect(),
    }
}

#[napi]
impl NativeTranscriber {
    /// Load a Whisper folder and start its decoding thread (on a worker thread).
    #[napi]
    pub async fn load(options: NativeTranscriberLoadOptions) -> Result<NativeTranscriber> {
        blocking("Transcriber.load", move || {
            let device = match options.device.as_deref().unwrap_or("cpu") {
                "auto" if candela_models::loader::device_unavailable("cuda").is_none() => {
                    "cuda".to_string()
                }
                "auto" => "cpu".to_string(),
                d => d.to_string(),
            };
            let path = PathBuf::from(&options.model);
            if !path.exists() {
                return Err(invalid(format!(
                    "model path does not exist: {}",
                    options.model
                )));
            }
            let opts = LoadOptions {
                dtype: options.dtype.clone(),
                device: device.clone(),
                ..Default::default()
            };
            let max_batch = options
                .max_batch
                .map(|m| m as usize)
                .unwrap_or(candela_models::transcribe::DEFAULT_MAX_BATCH);
            if max_batch == 0 {
                return Err(invalid("maxBatch must be at least 1"));
            }
            let t = Transcriber::load_with(&path, &opts, max_batch)
                .map_err(|e| invalid(e.to_string()))?;
            Ok(NativeTranscriber {
                inner: Arc::new(t),
                device,
                cancels: Arc::default(),
            })
        })
        .await
    }

    /// Transcribe one audio input. Resolves when every 30 s window is done,
    /// or at once with the typed refusal of its input.
    #[napi]
    pub async fn transcribe(&self, request: NativeTranscribeRequest) -> Result<NativeTranscribed> {
        let id = request.id;
        let checked = guard("transcribe", || {
            Ok(options(&request).and_then(|o| Ok((o, audio(request)?))))
        })?;
        let (opts, audio) = match checked {
            Ok(c) => c,
            Err(e) => return Ok(NativeTranscribed::refused(e)),
        };
        let inner = self.inner.clone();
        let flag = Arc::new(AtomicBool::new(false));
        if let (Some(id), Ok(mut map)) = (id, self.cancels.lock()) {
            map.insert(id, flag.clone());
        }
        let cancels = self.cancels.clone();
        let result = blocking("transcribe", move || {
            match run(&inner, audio, &opts, flag) {
                Ok(t) => Ok(NativeTranscribed {
                    transcription: Some(convert(t)),
                    error: None,
                }),
                Err(Failure::Refused(e)) => Ok(NativeTranscribed::refused(e)),
                Err(Failure::Thrown(e)) => Err(e),
            }
        })
        .await;
        if let (Some(id), Ok(mut map)) = (id, cancels.lock()) {
            map.remove(&id);
        }
        result
    }

    /// Give up the request with this id: its queued windows are dropped and
    /// active ones leave the batch at the next step; its promise rejects.
    /// Unknown ids are ignored.
    #[napi]
    pub fn cancel(&self, id: u32) -> Result<()> {
        guard("cancel", || {
            if let Some(flag) = self.cancels.lock().ok().and_then(|m| m.get(&id).cloned()) {
                flag.store(true, Ordering::Release);
            }
            Ok(())
        })
    }

    #[napi]
    pub fn info(&self) -> Result<NativeTranscriberInfo> {
        guard("info", || {
            let t = &self.inner;
            Ok(NativeTranscriberInfo {
                name: t.model_name().to_string(),
                architecture: candela_models::whisper::ARCHITECTURE.to_string(),
                multilingual: t.tokens().is_multilingual(),
                languages: t
                    .tokens()
                    .languages
                    .iter()
                    .map(|(c, _)| c.clone())
                    .collect(),
                sampling_rate: t.sampling_rate(),
                max_target_positions: t.model().config().max_target_positions as u32,
                device: self.device.clone(),
            })
        })
    }

    #[napi]
    pub fn stats(&self) -> Result<NativeTranscriberStats> {
        guard("stats", || {
            let s = self.inner.stats();
            Ok(NativeTranscriberStats {
                encoder_runs: s.encoder_runs as f64,
                steps: s.steps as f64,
                max_batch: s.max_batch as u32,
                chunks_finished: s.chunks_finished as f64,
            })
        })
    }

    /// Stop the decoding thread once the windows it holds are done; later
    /// calls reject. Idempotent.
    #[napi]
    pub async fn close(&self) -> Result<()> {
        let inner = self.inner.clone();
        blocking("close", move || {
            inner.close();
            Ok(())
        })
        .await
    }
}
