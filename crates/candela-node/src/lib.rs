//! napi glue: a loaded model + the engine behind one JS class.
//!
//! The glue is thin on purpose: it converts JS objects to the core's types
//! (tokenizing prompts and rendering chat templates on the way), hands each
//! request to `candela_core::Engine`, and lets JS pull the request's events
//! with `next()`, which returns everything queued since the last call.
//! No panic crosses the boundary: every entry point runs under `guard`.
// napi-derive registers exports only under cfg(not(test)), so in the lib-test
// build (which `cargo clippy --all-targets` checks although `test = false`)
// exports that no Rust code calls look dead.
#![cfg_attr(test, allow(dead_code))]

mod audio;
mod grammar;
mod guard;
mod media;
mod params;
mod transcribe;

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::path::PathBuf;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use candela_core::{
    Engine, EngineConfig, EngineError, EngineRequest, FinishReason, ModelSpec, RequestEvent,
    TokenDecoder, TokenLogprob,
};
use candela_models::input::InputPreparer;
use candela_models::processor::DecodeOptions;
use candela_models::{ChatRenderOptions, ChatTemplate, LoadOptions, Tokenizer};
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::Result;
use napi_derive::napi;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::Notify;

use candela_models::GenerationDefaults;
use guard::{blocking, closed, guard, internal, invalid};
use media::NativeInputError;
use params::to_sampling_params;
pub use params::NativeSamplingParams;

/// Options for `NativeEngine.load`.
#[napi(object)]
pub struct NativeLoadOptions {
    /// A model folder (config.json + safetensors + tokenizer.json) or a .gguf file.
    pub model: String,
    /// "cpu" (default), "cuda" / "cuda:N" (CUDA builds), or "auto": cuda when
    /// this build has CUDA and finds a GPU, else cpu.
    pub device: Option<String>,
    /// "auto" (default), "f32", "f16" or "bf16".
    pub dtype: Option<String>,
    /// A Jinja chat template that replaces the model's own.
    pub chat_template: Option<String>,
    /// Cap on prompt + output tokens (default: the model's own limit).
    pub max_model_len: Option<u32>,
    /// Quantize a safetensors checkpoint's language model at load:
    /// "q8_0", "q6_k", "q5_k", "q4_k" or "q4_0" (CPU only).
    pub quantization: Option<String>,
    /// With `quantization`: quantize the vision / audio towers too.
    pub quantization_towers: Option<bool>,
    /// llama.cpp's mmproj file (media towers + projector) for a GGUF model.
    pub mmproj: Option<String>,
    /// Tokens per KV block (default 16).
    pub block_size: Option<u32>,
    /// Bytes for the KV cache (default: the engine's choice).
    pub kv_cache_bytes: Option<f64>,
    /// Most sequences in one step (default 64).
    pub max_num_seqs: Option<u32>,
    /// CPU threads the engine computes on (default: the physical cores).
    pub threads: Option<u32>,
    /// Most tokens in one step (default 2048).
    pub max_num_batched_tokens: Option<u32>,
    /// Reuse KV blocks of shared prompt prefixes (default true).
    pub enable_prefix_caching: Option<bool>,
    /// Fraction of the GPU's memory for weights, activations and KV cache
    /// when kvCacheBytes is not given (CUDA only; default 0.9).
    pub gpu_memory_utilization: Option<f64>,
    /// Bytes of preprocessed media kept for reuse, in GiB (default 4; 0 = off).
    pub mm_processor_cache_gb: Option<f64>,
    /// Media embedding rows (tokens) kept by the encoder cache (default 16384; 0 = off).
    pub encoder_cache_tokens: Option<u32>,
    /// How media files are read (vLLM's media_io_kwargs).
    pub media_io_kwargs: Option<NativeMediaIoKwargs>,
    /// Accept precomputed image embeddings (default false).
    pub enable_mm_embeds: Option<bool>,
}

/// `mediaIoKwargs`: options of the image and video readers.
#[napi(object)]
pub struct NativeMediaIoKwargs {
    pub image: Option<NativeImageIoKwargs>,
    pub video: Option<NativeVideoIoKwargs>,
}

#[napi(object)]
pub struct NativeImageIoKwargs {
    /// [r, g, b], each 0..=255: what transparent pixels are composited over (default white).
    pub rgba_background_color: Option<Vec<f64>>,
}

#[napi(object)]
pub struct NativeVideoIoKwargs {
    /// Replace a frame that fails to decode by the next good one (default false).
    pub frame_recovery: Option<bool>,
}

/// The image and video reader options of `mediaIoKwargs`.
fn media_io_options(
    kw: Option<NativeMediaIoKwargs>,
) -> Result<(
    candela_media::image::ImageOptions,
    candela_media::video::VideoDecodeOptions,
)> {
    let mut image = candela_media::image::ImageOptions::default();
    let mut video = candela_media::video::VideoDecodeOptions::default();
    let Some(kw) = kw else {
        return Ok((image, video));
    };
    if let Some(c) = kw.image.and_then(|i| i.rgba_background_color) {
        let ok = c.len() == 3
            && c.iter()
                .all(|v| v.fract() == 0.0 && (0.0..=255.0).contains(v));
        if !ok {
            return Err(invalid(format!(
                "mediaIoKwargs.image.rgbaBackgroundColor must be [r, g, b] with integers 0..255, got {c:?}"
            )));
        }
        image.rgba_background_color = [c[0] as u8, c[1] as u8, c[2] as u8];
    }
    if let Some(r) = kw.video.and_then(|v| v.frame_recovery) {
        video.frame_recovery = r;
    }
    Ok((image, video))
}

/// Why this addon cannot run on `device` ("cuda" when omitted), or null when
/// it can: what `device: 'auto'` asks before choosing.
#[napi]
pub fn device_unavailable(device: Option<String>) -> Option<String> {
    let device = device.unwrap_or_else(|| "cuda".into());
    guard("deviceUnavailable", || {
        Ok(candela_models::loader::device_unavailable(&device))
    })
    .unwrap_or_else(|e| Some(e.reason.clone()))
}

/// One request as JS passes it: exactly one of `prompt`, `promptTokenIds`, `messages`.
#[napi(object)]
pub struct NativeRequest {
    pub prompt: Option<String>,
    pub prompt_token_ids: Option<Vec<u32>>,
    /// OpenAI-style chat messages, rendered with the model's chat template.
    #[napi(ts_type = "Array<Record<string, unknown>>")]
    pub messages: Option<serde_json::Value>,
    /// Tool definitions handed to the chat template.
    #[napi(ts_type = "Array<Record<string, unknown>>")]
    pub tools: Option<serde_json::Value>,
    /// Extra variables for the chat template (e.g. `{ enable_thinking: false }`).
    #[napi(ts_type = "Record<string, unknown>")]
    pub chat_template_kwargs: Option<serde_json::Value>,
    /// Append the assistant turn opener (default true).
    pub add_generation_prompt: Option<bool>,
    /// Add BOS etc. when tokenizing a plain `prompt` (default true).
    pub add_special_tokens: Option<bool>,
    pub params: Option<NativeSamplingParams>,
    /// maxTokens when neither the params nor the model's generation config
    /// set one (default: the rest of the context).
    pub default_max_tokens: Option<u32>,
}

#[napi(object)]
pub struct NativeTopLogprob {
    pub token_id: u32,
    pub token: String,
    pub logprob: f64,
}

#[napi(object)]
pub struct NativeTokenLogprob {
    pub token_id: u32,
    pub token: String,
    pub logprob: f64,
    pub top: Vec<NativeTopLogprob>,
}

#[napi(object)]
pub struct NativeUsage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub cached_tokens: u32,
}

/// One event of a request.
#[napi(object)]
pub struct NativeEvent {
    #[napi(ts_type = "'tokens' | 'finished' | 'error'")]
    pub kind: String,
    /// Sample index (< n).
    pub index: u32,
    /// New token ids (`tokens` events).
    pub token_ids: Vec<u32>,
    /// New text (`tokens` events; may be empty while text is pending).
    pub text: String,
    pub logprobs: Option<Vec<NativeTokenLogprob>>,
    #[napi(ts_type = "'stop' | 'length' | 'abort' | 'error'")]
    pub finish_reason: Option<String>,
    /// The stop string or stop token id that ended the sample.
    pub stop_reason: Option<String>,
    pub usage: Option<NativeUsage>,
    /// Error message (`error` events).
    pub message: Option<String>,
}

/// What `next()` returns: the events queued so far; `done` once the request is over.
#[napi(object)]
pub struct NativeBatch {
    pub events: Vec<NativeEvent>,
    pub done: bool,
    /// True when the request ended because it was aborted.
    pub aborted: bool,
}

#[napi(object)]
pub struct NativeStats {
    pub running: u32,
    pub waiting: u32,
    pub kv_blocks_total: u32,
    pub kv_blocks_used: u32,
    pub kv_blocks_free: u32,
    pub prefix_cache_queries: f64,
    pub prefix_cache_hits: f64,
    pub prompt_tokens: f64,
    pub generation_tokens: f64,
    pub preemptions: f64,
    pub requests_finished: f64,
    pub steps: f64,
    /// Media items run through the model's encoder.
    pub encoder_runs: f64,
    pub encoder_cache_queries: f64,
    pub encoder_cache_hits: f64,
    pub encoder_cache_tokens: f64,
    pub encoder_cache_items: f64,
    pub processor_cache_queries: f64,
    pub processor_cache_hits: f64,
    pub processor_cache_bytes: f64,
    pub processor_cache_items: f64,
}

#[napi(object)]
pub struct NativeModelInfo {
    pub name: String,
    pub architecture: String,
    pub max_model_len: u32,
    pub vocab_size: u32,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub has_chat_template: bool,
    /// The chat template's source (the tool-call format is read off it).
    pub chat_template: Option<String>,
    pub device: String,
    /// CPU threads the engine computes on.
    pub threads: u32,
    /// Media the model takes besides text ("audio", "image", "video").
    pub modalities: Vec<String>,
    /// Tokens per KV block.
    pub block_size: u32,
    /// KV blocks in the pool.
    pub num_kv_blocks: u32,
    pub enable_prefix_caching: bool,
    /// Size of the paged KV pool (the default follows the model and the machine).
    pub kv_cache_bytes: f64,
    /// Tokens the KV pool holds.
    pub kv_cache_tokens: u32,
    /// The block format the language model was quantized to at load.
    pub quantization: Option<String>,
    /// Seconds the weights took to load (and quantize).
    pub load_seconds: f64,
    /// The process's resident memory not backed by a file (RssAnon) once the
    /// model was loaded and its KV cache reserved; None off Linux.
    pub anon_rss_bytes: Option<f64>,
}

/// How far a load has got, in parameters of the checkpoint.
#[napi(object)]
pub struct NativeLoadProgress {
    pub loaded_parameters: f64,
    pub total_parameters: f64,
}

/// Called from the loading thread with each progress report.
type ProgressCallback = ThreadsafeFunction<
    NativeLoadProgress,
    napi::Unknown<'static>,
    NativeLoadProgress,
    napi::Status,
    false,
>;

/// The per-request state `next()` reads from.
struct ReqState {
    rx: tokio::sync::Mutex<UnboundedReceiver<RequestEvent>>,
    n: usize,
    /// Samples finished so far (across `next()` calls).
    finished: AtomicUsize,
    aborted: AtomicBool,
    wake: Notify,
}

struct Inner {
    engine: Engine,
    tokenizer: Arc<Tokenizer>,
    chat_template: Option<ChatTemplate>,
    /// The model's generation_config defaults and EOS / BOS ids.
    generation: GenerationDefaults,
    spec: ModelSpec,
    model_name: String,
    /// The block format the language model was quantized to at load.
    quantization: Option<String>,
    /// Seconds the weights took to load (and quantize).
    load_seconds: f64,
    anon_rss_bytes: Option<f64>,
    device: String,
    requests: Mutex<HashMap<u64, Arc<ReqState>>>,
    closed: AtomicBool,
    input: InputPreparer,
    grammars: grammar::Grammars,
}

impl Inner {
    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(closed("the engine is closed"))
        } else {
            Ok(())
        }
    }

    /// Token ids the vocabulary has; an id past it is the caller's mistake.
    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let vocab = self.spec.vocab_size;
        match ids.iter().find(|&&t| t as usize >= vocab) {
            Some(bad) => Err(invalid(format!(
                "token id {bad} is out of range (vocabulary size {vocab})"
            ))),
            None => Ok(()),
        }
    }

    fn take_request(&self, id: u64) -> Option<Arc<ReqState>> {
        self.requests.lock().ok()?.remove(&id)
    }

    fn request(&self, id: u64) -> Option<Arc<ReqState>> {
        self.requests.lock().ok()?.get(&id).cloned()
    }

    fn token_text(&self, id: u32) -> String {
        Tokenizer::decode(&self.tokenizer, &[id], false).unwrap_or_default()
    }

    fn convert_logprobs(&self, lps: Vec<TokenLogprob>) -> Vec<NativeTokenLogprob> {
        lps.into_iter()
            .map(|lp| NativeTokenLogprob {
                token_id: lp.token_id,
                token: self.token_text(lp.token_id),
                logprob: lp.logprob as f64,
                top: lp
                    .top
                    .into_iter()
                    .map(|t| NativeTopLogprob {
                        token_id: t.token_id,
                        token: self.token_text(t.token_id),
                        logprob: t.logprob as f64,
                    })
                    .collect(),
            })
            .collect()
    }

    fn convert_event(&self, ev: RequestEvent) -> NativeEvent {
        let mut out = NativeEvent {
            kind: String::new(),
            index: 0,
            token_ids: Vec::new(),
            text: String::new(),
            logprobs: None,
            finish_reason: None,
            stop_reason: None,
            usage: None,
            message: None,
        };
        match ev {
            RequestEvent::Tokens {
                index,
                token_ids,
                text,
                logprobs,
            } => {
                out.kind = "tokens".into();
                out.index = index as u32;
                out.token_ids = token_ids;
                out.text = text;
                out.logprobs = logprobs.map(|l| self.convert_logprobs(l));
            }
            RequestEvent::Finished {
                index,
                reason,
                stop_reason,
                usage,
            } => {
                out.kind = "finished".into();
                out.index = index as u32;
                out.finish_reason = Some(
                    match reason {
                        FinishReason::Stop => "stop",
                        FinishReason::Length => "length",
                        FinishReason::Abort => "abort",
                        FinishReason::Error => "error",
                    }
                    .into(),
                );
                out.stop_reason = stop_reason;
                out.usage = Some(NativeUsage {
                    prompt_tokens: usage.prompt_tokens as u32,
                    completion_tokens: usage.completion_tokens as u32,
                    cached_tokens: usage.cached_tokens as u32,
                });
            }
            RequestEvent::Error { message } => {
                out.kind = "error".into();
                out.message = Some(message);
            }
        }
        out
    }

    fn render_chat(
        &self,
        messages: &serde_json::Value,
        add_generation_prompt: bool,
        tools: Option<serde_json::Value>,
        kwargs: Option<serde_json::Value>,
    ) -> Result<String> {
        let tpl = self.chat_template.as_ref().ok_or_else(|| {
            invalid(format!(
                "model {} has no chat template; pass one with the chatTemplate load option or use a plain prompt",
                self.model_name
            ))
        })?;
        let Some(messages) = messages.as_array() else {
            return Err(invalid(
                "messages must be an array of { role, content } objects",
            ));
        };
        if let Some((i, _)) = messages.iter().enumerate().find(|(_, m)| !m.is_object()) {
            return Err(invalid(format!(
                "messages[{i}] must be an object with role and content"
            )));
        }
        let extra = match kwargs {
            None | Some(serde_json::Value::Null) => serde_json::Map::new(),
            Some(serde_json::Value::Object(m)) => m,
            Some(_) => return Err(invalid("chatTemplateKwargs must be an object")),
        };
        let opts = ChatRenderOptions {
            add_generation_prompt,
            tools,
            documents: None,
            extra,
        };
        tpl.render(messages, &opts)
            .map_err(|e| invalid(e.to_string()))
    }

    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.tokenizer
            .encode(text, add_special_tokens)
            .map_err(|e| invalid(e.to_string()))
    }
}

/// A loaded model with its engine thread.
#[napi]
pub struct NativeEngine {
    inner: Arc<Inner>,
}

fn num(v: Option<u32>, default: usize) -> usize {
    v.map(|x| x as usize).unwrap_or(default)
}

/// This process's RssAnon (resident pages not backed by a file), in bytes.
fn anon_rss_bytes() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024.0)
}

fn load_blocking(
    opts: NativeLoadOptions,
    on_progress: Option<ProgressCallback>,
) -> Result<NativeEngine> {
    let device = match opts.device.as_deref().unwrap_or("cpu") {
        "auto" if candela_models::loader::device_unavailable("cuda").is_none() => {
            "cuda".to_string()
        }
        "auto" => "cpu".to_string(),
        d => d.to_string(),
    };
    let path = PathBuf::from(&opts.model);
    if !path.exists() {
        return Err(invalid(format!(
            "model path does not exist: {}",
            opts.model
        )));
    }
    // Checked before the (slow) load.
    let (image_options, video_options) = media_io_options(opts.media_io_kwargs)?;
    let load_opts = LoadOptions {
        dtype: opts.dtype.clone(),
        device: device.clone(),
        chat_template: opts.chat_template.clone(),
        max_model_len: opts.max_model_len.map(|x| x as usize),
        quantization: opts.quantization.clone(),
        quantize_towers: opts.quantization_towers.unwrap_or(false),
        on_progress: on_progress.map(|f| {
            candela_models::load_progress::OnProgress(Arc::new(move |done, total| {
                f.call(
                    NativeLoadProgress {
                        loaded_parameters: done as f64,
                        total_parameters: total as f64,
                    },
                    ThreadsafeFunctionCallMode::NonBlocking,
                );
            }))
        }),
        mmproj: opts.mmproj.as_ref().map(PathBuf::from),
    };
    let started = std::time::Instant::now();
    let loaded = candela_models::load(&path, &load_opts).map_err(|e| invalid(e.to_string()))?;
    let load_seconds = started.elapsed().as_secs_f64();
    let config = EngineConfig {
        block_size: num(opts.block_size, 16),
        kv_cache_bytes: match opts.kv_cache_bytes {
            Some(b) if !(b.is_finite() && b > 0.0) => {
                return Err(invalid(format!(
                    "kvCacheBytes must be a positive number, got {b}"
                )))
            }
            Some(b) => Some(b as usize),
            None => None,
        },
        max_num_seqs: num(opts.max_num_seqs, 64),
        max_num_batched_tokens: num(opts.max_num_batched_tokens, 2048),
        enable_prefix_caching: opts.enable_prefix_caching.unwrap_or(true),
        gpu_memory_utilization: match opts.gpu_memory_utilization {
            Some(u) if !(u > 0.0 && u <= 1.0) => {
                return Err(invalid(format!(
                    "gpuMemoryUtilization must be in (0, 1], got {u}"
                )))
            }
            Some(u) => u as f32,
            None => 0.9,
        },
        max_model_len: None,
        eos_token_ids: loaded.generation.eos_token_ids.clone(),
        encoder_cache_tokens: num(opts.encoder_cache_tokens, 16384),
        threads: opts.threads.map(|t| t as usize),
    };
    let processor_cache_bytes = match opts.mm_processor_cache_gb {
        Some(g) if !(g.is_finite() && g >= 0.0) => {
            return Err(invalid(format!(
                "mmProcessorCacheGb must be a number >= 0, got {g}"
            )))
        }
        Some(g) => (g * (1u64 << 30) as f64) as usize,
        None => 4 << 30,
    };
    let input = InputPreparer::new(
        loaded.processor.clone(),
        processor_cache_bytes,
        DecodeOptions {
            image: image_options,
            video: video_options,
        },
        opts.enable_mm_embeds.unwrap_or(false),
    );
    let tokenizer = loaded.tokenizer.clone();
    let decoder: Arc<dyn TokenDecoder> = loaded.tokenizer.clone();
    let engine =
        Engine::start(loaded.model, decoder, config).map_err(|e| invalid(e.to_string()))?;
    let mut spec = engine.model_spec().clone();
    spec.max_model_len = engine.max_model_len();
    let grammars = grammar::Grammars::new(
        tokenizer.clone(),
        spec.vocab_size,
        loaded.generation.eos_token_ids.clone(),
    );
    Ok(NativeEngine {
        inner: Arc::new(Inner {
            engine,
            tokenizer,
            chat_template: loaded.chat_template,
            generation: loaded.generation,
            spec,
            model_name: loaded.model_name,
            quantization: loaded.quantization.map(|q| q.name().to_string()),
            load_seconds,
            anon_rss_bytes: anon_rss_bytes(),
            device,
            requests: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            input,
            grammars,
        }),
    })
}

impl NativeEngine {
    /// The engine's state for a call that needs it open.
    fn open(&self) -> Result<Arc<Inner>> {
        self.inner.check_open()?;
        Ok(self.inner.clone())
    }
}

fn id_from_js(id: i64) -> Result<u64> {
    u64::try_from(id).map_err(|_| invalid(format!("invalid request id {id}")))
}

#[napi]
impl NativeEngine {
    /// Load a model and start its engine thread. Loading runs on a worker
    /// thread; the promise rejects with the loader's message on failure.
    /// `on_progress` is told the parameters loaded so far, of the total.
    #[napi]
    pub async fn load(
        options: NativeLoadOptions,
        // Spelled out, not `ProgressCallback`: the generated .d.cts names the callback's type.
        on_progress: Option<
            ThreadsafeFunction<
                NativeLoadProgress,
                napi::Unknown<'static>,
                NativeLoadProgress,
                napi::Status,
                false,
            >,
        >,
    ) -> Result<NativeEngine> {
        blocking("load", move || load_blocking(options, on_progress)).await
    }

    /// Queue a request: its prompt rendered and tokenized and its media
    /// items (in prompt order: the k-th placeholder of a modality is its
    /// k-th item) decoded, preprocessed and placed on a worker thread, never
    /// the JS thread. Resolves to the request id, or to the typed reason the
    /// input was refused.
    #[napi]
    pub async fn add_request(
        &self,
        request: NativeRequest,
        media: Option<Vec<media::NativeMediaItem>>,
    ) -> Result<NativeSubmitted> {
        self.inner.check_open()?;
        let inputs = match media
            .unwrap_or_default()
            .into_iter()
            .map(media::media_input)
            .collect::<std::result::Result<Vec<_>, _>>()
        {
            Ok(i) => i,
            Err(e) => return Ok(NativeSubmitted::refused(e)),
        };
        let inner = self.inner.clone();
        blocking("addRequest", move || {
            inner.prepare_and_submit(request, inputs)
        })
        .await
    }

    /// For each uuid-only media item of a prompt whose items (all of them,
    /// in order) have the modalities `prompt`, whether no cache holds it
    /// (its data must then be sent).
    #[napi]
    pub fn uncached_uuids(
        &self,
        items: Vec<media::NativeUuidRef>,
        #[napi(ts_arg_type = "Array<'image' | 'video' | 'audio'>")] prompt: Vec<String>,
    ) -> Result<Vec<bool>> {
        guard("uncachedUuids", || {
            let refs = items
                .into_iter()
                .map(|i| i.into_ref())
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| invalid(e.message))?;
            let prompt = media::prompt_items(&prompt).map_err(|e| invalid(e.message))?;
            self.inner
                .input
                .uncached(&self.inner.engine, &refs, &prompt)
                .map_err(|e| invalid(e.to_string()))
        })
    }
}

/// What `addRequest` resolves to: the request id, or why it was refused.
#[napi(object)]
pub struct NativeSubmitted {
    pub request_id: Option<i64>,
    pub error: Option<media::NativeInputError>,
    /// Sampled video frames `frame_recovery` replaced by a later frame.
    pub video_frames_recovered: u32,
    /// Sampled video frames `frame_recovery` left out.
    pub video_frames_dropped: u32,
}

impl NativeSubmitted {
    fn refused(e: media::NativeInputError) -> Self {
        Self {
            request_id: None,
            error: Some(e),
            video_frames_recovered: 0,
            video_frames_dropped: 0,
        }
    }
}

impl Inner {
    /// Render + tokenize, prepare media, queue. Input mistakes come back as
    /// a refusal; only failures of ours are errors.
    fn prepare_and_submit(
        &self,
        request: NativeRequest,
        inputs: Vec<candela_models::input::MediaInput>,
    ) -> Result<NativeSubmitted> {
        let ids = match self.prompt_ids(&request) {
            Ok(ids) => ids,
            Err(e) => return Ok(NativeSubmitted::refused(e)),
        };
        let prepared = match self.input.prepare(&self.engine, ids, &inputs) {
            Ok(p) => p,
            Err(e) => return Ok(NativeSubmitted::refused(e.into())),
        };
        let (params, default_max) = (request.params, request.default_max_tokens);
        let frames = prepared.frames;
        let mut submitted = self.submit(
            prepared.ids,
            prepared.items,
            prepared.mrope,
            params,
            default_max,
        )?;
        submitted.video_frames_recovered = frames.recovered as u32;
        submitted.video_frames_dropped = frames.dropped as u32;
        Ok(submitted)
    }
}

impl Inner {
    /// The request's prompt as token ids (template rendered, tokenized).
    /// Text that cannot fit the context is refused before that work.
    fn prompt_ids(
        &self,
        request: &NativeRequest,
    ) -> std::result::Result<Vec<u32>, NativeInputError> {
        let given = [
            request.prompt.is_some(),
            request.prompt_token_ids.is_some(),
            request.messages.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if given != 1 {
            return Err(NativeInputError::invalid(
                "a request needs exactly one of prompt, promptTokenIds or messages",
            ));
        }
        let refused = |e: napi::Error| NativeInputError::invalid(e.reason.clone());
        if let Some(ids) = request.prompt_token_ids.clone() {
            self.check_ids(&ids).map_err(refused)?;
            return Ok(ids);
        }
        let bytes = match (&request.prompt, &request.messages) {
            (Some(p), _) => p.len(),
            (None, Some(m)) => message_text_bytes(m),
            (None, None) => 0,
        };
        let (least, max_len) = (self.tokenizer.min_tokens(bytes), self.spec.max_model_len);
        if least >= max_len {
            return Err(NativeInputError::context_length(format!(
                "the prompt's {bytes} bytes of text are at least {least} tokens, but the model's maximum length is {max_len} (prompt + output)"
            )));
        }
        if let Some(prompt) = &request.prompt {
            return self
                .encode(prompt, request.add_special_tokens.unwrap_or(true))
                .map_err(refused);
        }
        let messages = request.messages.as_ref().expect("checked above");
        let text = self
            .render_chat(
                messages,
                request.add_generation_prompt.unwrap_or(true),
                request.tools.clone(),
                request.chat_template_kwargs.clone(),
            )
            .map_err(refused)?;
        // The template writes BOS itself where the model wants one.
        self.encode(&text, false).map_err(refused)
    }

    /// Validate and queue a tokenized prompt with its media items.
    fn submit(
        &self,
        ids: Vec<u32>,
        mm_items: Vec<candela_core::request::MmItem>,
        mrope: Option<candela_core::request::MropePositions>,
        params: Option<NativeSamplingParams>,
        default_max_tokens: Option<u32>,
    ) -> Result<NativeSubmitted> {
        let refuse = |e: NativeInputError| Ok(NativeSubmitted::refused(e));
        if ids.is_empty() {
            return refuse(NativeInputError::invalid(
                "the prompt is empty (it has no tokens)",
            ));
        }
        let max_len = self.spec.max_model_len;
        if ids.len() >= max_len {
            return refuse(NativeInputError::context_length(format!(
                "the prompt has {} tokens, but the model's maximum length is {max_len} (prompt + output)",
                ids.len()
            )));
        }
        let p = params.unwrap_or_default();
        let fallback = default_max_tokens.map(|m| m as usize);
        let mut params =
            match to_sampling_params(&p, &self.generation, ids.len(), max_len, fallback) {
                Ok(p) => p,
                Err(e) => return refuse(e),
            };
        if let Some(s) = &p.structured_outputs {
            params.grammar = match self.grammars.compile(s) {
                Ok(g) => Some(g),
                Err(e) => return refuse(NativeInputError::invalid(e.reason)),
            };
        }
        let n = params.n;
        let handle = match self.engine.add_request(EngineRequest {
            prompt_token_ids: ids,
            params,
            mm_items,
            mrope,
        }) {
            Ok(h) => h,
            // The prompt alone fits (checked above): the completion asked too much.
            Err(e @ EngineError::ContextLength { .. }) => {
                let mut refusal = NativeInputError::context_length(e.to_string());
                refusal.param = Some("maxTokens".into());
                return refuse(refusal);
            }
            Err(e) if e.is_invalid_request() => {
                return refuse(NativeInputError::invalid(e.to_string()))
            }
            Err(EngineError::Shutdown) => return Err(closed("the engine is closed")),
            Err(e) => return Err(internal(e.to_string())),
        };
        let state = Arc::new(ReqState {
            rx: tokio::sync::Mutex::new(handle.events),
            n,
            finished: AtomicUsize::new(0),
            aborted: AtomicBool::new(false),
            wake: Notify::new(),
        });
        self.requests
            .lock()
            .map_err(|_| internal("request table poisoned"))?
            .insert(handle.id, state);
        Ok(NativeSubmitted {
            request_id: Some(handle.id as i64),
            error: None,
            video_frames_recovered: 0,
            video_frames_dropped: 0,
        })
    }
}

/// Bytes of text in chat messages' contents (strings and text parts).
fn message_text_bytes(messages: &serde_json::Value) -> usize {
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.len(),
        serde_json::Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text")?.as_str())
            .map(str::len)
            .sum(),
        _ => 0,
    };
    messages
        .as_array()
        .map(|m| m.iter().filter_map(|x| x.get("content")).map(text).sum())
        .unwrap_or(0)
}

#[napi]
impl NativeEngine {
    /// Wait for the request's next events and return all that are queued.
    /// `done` is true once every sample finished, the request failed, or it
    /// was aborted; later calls return `{ events: [], done: true }`.
    #[napi]
    pub async fn next(&self, request_id: i64) -> Result<NativeBatch> {
        let id = id_from_js(request_id)?;
        let inner = self.inner.clone();
        let Some(state) = inner.request(id) else {
            // Gone from the map: finished earlier, or swept up by close() between
            // two next() calls; the latter must read as aborted, not as done.
            let aborted = inner.closed.load(Ordering::Acquire);
            return Ok(NativeBatch {
                events: Vec::new(),
                done: true,
                aborted,
            });
        };
        let mut rx = state.rx.lock().await;
        let aborted = || state.aborted.load(Ordering::Acquire);
        let mut raw = Vec::new();
        if !aborted() {
            let mut woken = pin!(state.wake.notified());
            let first = poll_fn(|cx| {
                if let Poll::Ready(ev) = rx.poll_recv(cx) {
                    return Poll::Ready(ev);
                }
                if woken.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
                Poll::Pending
            })
            .await;
            if let Some(ev) = first {
                raw.push(ev);
                while let Ok(ev) = rx.try_recv() {
                    raw.push(ev);
                }
            }
        }
        let was_aborted = aborted();
        let channel_closed = raw.is_empty();
        drop(rx);
        guard("next", || {
            let mut finished = 0usize;
            let mut failed = false;
            let events: Vec<NativeEvent> = raw
                .into_iter()
                .map(|ev| {
                    match &ev {
                        RequestEvent::Finished { .. } => finished += 1,
                        RequestEvent::Error { .. } => failed = true,
                        RequestEvent::Tokens { .. } => {}
                    }
                    inner.convert_event(ev)
                })
                .collect();
            let total = state.finished.fetch_add(finished, Ordering::AcqRel) + finished;
            let done = was_aborted || channel_closed || failed || total >= state.n;
            if done {
                inner.take_request(id);
            }
            Ok(NativeBatch {
                events: if was_aborted { Vec::new() } else { events },
                done,
                aborted: was_aborted,
            })
        })
    }

    /// Abort a request: the engine frees its KV blocks, and a pending or later
    /// `next()` returns `{ done: true, aborted: true }`. Unknown ids are ignored.
    #[napi]
    pub fn abort(&self, request_id: i64) -> Result<()> {
        guard("abort", || {
            let id = id_from_js(request_id)?;
            if let Some(state) = self.inner.take_request(id) {
                state.aborted.store(true, Ordering::Release);
                state.wake.notify_one();
                self.inner.engine.abort(id);
            }
            Ok(())
        })
    }

    /// Engine counters (running / waiting requests, KV blocks, prefix cache, tokens).
    #[napi]
    pub fn stats(&self) -> Result<NativeStats> {
        guard("stats", || {
            let s = self.inner.engine.stats();
            let pc = self.inner.input.cache_stats();
            Ok(NativeStats {
                running: s.running as u32,
                waiting: s.waiting as u32,
                kv_blocks_total: s.kv_blocks_total as u32,
                kv_blocks_used: s.kv_blocks_used as u32,
                kv_blocks_free: s.kv_blocks_free as u32,
                prefix_cache_queries: s.prefix_cache_queries as f64,
                prefix_cache_hits: s.prefix_cache_hits as f64,
                prompt_tokens: s.prompt_tokens as f64,
                generation_tokens: s.generation_tokens as f64,
                preemptions: s.preemptions as f64,
                requests_finished: s.requests_finished as f64,
                steps: s.steps as f64,
                encoder_runs: s.encoder_runs as f64,
                encoder_cache_queries: s.encoder_cache_queries as f64,
                encoder_cache_hits: s.encoder_cache_hits as f64,
                encoder_cache_tokens: s.encoder_cache_tokens as f64,
                encoder_cache_items: s.encoder_cache_items as f64,
                processor_cache_queries: pc.0 as f64,
                processor_cache_hits: pc.1 as f64,
                processor_cache_bytes: pc.3 as f64,
                processor_cache_items: pc.2 as f64,
            })
        })
    }

    /// Facts about the loaded model.
    #[napi]
    pub fn info(&self) -> NativeModelInfo {
        let i = &self.inner;
        let blocks = i.engine.num_kv_blocks();
        let block_size = i.engine.config().block_size;
        NativeModelInfo {
            name: i.model_name.clone(),
            architecture: i.spec.architecture.clone(),
            max_model_len: i.spec.max_model_len as u32,
            vocab_size: i.spec.vocab_size as u32,
            eos_token_ids: i.generation.eos_token_ids.clone(),
            bos_token_id: i.generation.bos_token_id,
            has_chat_template: i.chat_template.is_some(),
            chat_template: i.chat_template.as_ref().map(|t| t.source().to_string()),
            device: i.device.clone(),
            threads: i.engine.threads() as u32,
            modalities: i
                .input
                .modalities()
                .into_iter()
                .map(|m| m.name().to_string())
                .collect(),
            block_size: block_size as u32,
            num_kv_blocks: blocks as u32,
            enable_prefix_caching: i.engine.config().enable_prefix_caching,
            kv_cache_bytes: (blocks * i.spec.kv_block_bytes(block_size)) as f64,
            kv_cache_tokens: (blocks * block_size).min(u32::MAX as usize) as u32,
            quantization: i.quantization.clone(),
            load_seconds: i.load_seconds,
            anon_rss_bytes: i.anon_rss_bytes,
        }
    }

    /// Text -> token ids with the model's tokenizer, on a worker thread.
    #[napi]
    pub async fn tokenize(
        &self,
        text: String,
        add_special_tokens: Option<bool>,
    ) -> Result<Vec<u32>> {
        let inner = self.open()?;
        blocking("tokenize", move || {
            inner.encode(&text, add_special_tokens.unwrap_or(true))
        })
        .await
    }

    /// Token ids -> text, on a worker thread.
    #[napi]
    pub async fn detokenize(
        &self,
        token_ids: Vec<u32>,
        skip_special_tokens: Option<bool>,
    ) -> Result<String> {
        let inner = self.open()?;
        blocking("detokenize", move || {
            inner.check_ids(&token_ids)?;
            Tokenizer::decode(
                &inner.tokenizer,
                &token_ids,
                skip_special_tokens.unwrap_or(true),
            )
            .map_err(|e| invalid(e.to_string()))
        })
        .await
    }

    /// The text of each token on its own, special tokens included, on a
    /// worker thread.
    #[napi]
    pub async fn token_texts(&self, token_ids: Vec<u32>) -> Result<Vec<String>> {
        let inner = self.open()?;
        blocking("tokenTexts", move || {
            inner.check_ids(&token_ids)?;
            Ok(token_ids.iter().map(|&id| inner.token_text(id)).collect())
        })
        .await
    }

    /// Render chat messages with the model's chat template, on a worker thread.
    #[napi]
    pub async fn apply_chat_template(
        &self,
        #[napi(ts_arg_type = "Array<Record<string, unknown>>")] messages: serde_json::Value,
        add_generation_prompt: Option<bool>,
        #[napi(ts_arg_type = "Array<Record<string, unknown>>")] tools: Option<serde_json::Value>,
        #[napi(ts_arg_type = "Record<string, unknown>")] chat_template_kwargs: Option<
            serde_json::Value,
        >,
    ) -> Result<String> {
        let inner = self.open()?;
        blocking("applyChatTemplate", move || {
            inner.render_chat(
                &messages,
                add_generation_prompt.unwrap_or(true),
                tools,
                chat_template_kwargs,
            )
        })
        .await
    }

    /// Stop the engine thread. Pending `next()` calls finish with `done`;
    /// later calls to addRequest fail with "the engine is closed".
    #[napi]
    pub async fn close(&self) -> Result<()> {
        let inner = self.inner.clone();
        if inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let pending: Vec<Arc<ReqState>> = match inner.requests.lock() {
            Ok(mut map) => map.drain().map(|(_, v)| v).collect(),
            Err(_) => Vec::new(),
        };
        for st in pending {
            st.aborted.store(true, Ordering::Release);
            st.wake.notify_one();
        }
        blocking("close", move || {
            inner.engine.shutdown();
            Ok(())
        })
        .await
    }
}
