//! Media items of a request, from what JS sends to what the engine takes:
//! hash (uuid or content), processor cache, decode + preprocess, and the
//! expansion of each item's placeholder token in the tokenized prompt.
//!
//! Runs on a worker thread (never the JS thread): decoding and log-mel
//! features take milliseconds to seconds.

use std::sync::{Arc, Mutex};

use candela_core::request::{MmInput, MmItem, MmPlaceholder, MropePositions};
use candela_core::Engine;
use candela_media::audio::{decode_to_mono, mono_from_channels, resample};
use candela_media::image::{decode_image, DecodedImage, ImageOptions};
use candela_media::video::VideoDecodeOptions;
use candela_media::{mm_hash, MediaError, Modality};
use candela_models::processor::{MmProcessor, ProcessedItem, ProcessorCache, VisionKwargs};
use candela_models::mm_embeds as embeds;
use candela_models::qwen2_vl::MediaSpan;
use napi::bindgen_prelude::{Buffer, Float32Array};
use napi_derive::napi;

use crate::guard::invalid;

/// One media item as JS sends it, in prompt order.
#[napi(object)]
pub struct NativeMediaItem {
    #[napi(ts_type = "'image' | 'video' | 'audio'")]
    pub modality: String,
    /// Encoded file bytes (WAV, MP3, FLAC, OGG; PNG, JPEG, ...; MP4, WebM).
    pub data: Option<Buffer>,
    /// A video as its frames, each an encoded image.
    pub frames: Option<Vec<Buffer>>,
    /// Image / video processor options: min_pixels, max_pixels, and for
    /// video total_pixels, fps, max_frames (vLLM's mm_processor_kwargs).
    #[napi(ts_type = "Record<string, unknown>")]
    pub kwargs: Option<serde_json::Value>,
    /// Raw audio samples, one array per channel (with `sampleRate`).
    pub samples: Option<Vec<Float32Array>>,
    pub sample_rate: Option<u32>,
    /// Container / codec hint ("wav", "mp3", a MIME type).
    pub format: Option<String>,
    /// The caller's cache key for the item (vLLM's multi_modal_uuids).
    pub uuid: Option<String>,
    /// Precomputed image embeddings (row-major, `embedsShape` = [tokens, hidden]).
    pub embeds: Option<Float32Array>,
    pub embeds_shape: Option<Vec<u32>>,
    /// Precomputed image embeddings as a safetensors blob: tensor
    /// `image_embeds` (F32 / F16 / BF16, (tokens, hidden)) and optionally
    /// `image_grid_thw` (ints, (3,) or (1, 3)).
    pub embeds_safetensors: Option<Buffer>,
    /// The (t, h, w) patch grid of precomputed embeddings; wins over a grid
    /// inside the safetensors blob.
    pub grid_thw: Option<Vec<u32>>,
}

/// Where an item's precomputed embeddings come from.
enum EmbedsSource {
    Floats(Vec<f32>, Vec<usize>),
    Safetensors(Vec<u8>),
}

struct EmbedsInput {
    source: EmbedsSource,
    grid_thw: Option<Vec<u32>>,
}

/// Owned copy of a [`NativeMediaItem`] that can move to a worker thread.
pub struct MediaInput {
    modality: Modality,
    modality_name: String,
    data: Option<Vec<u8>>,
    frames: Option<Vec<Vec<u8>>>,
    samples: Option<(Vec<Vec<f32>>, u32)>,
    format: Option<String>,
    uuid: Option<String>,
    kwargs: VisionKwargs,
    embeds: Option<EmbedsInput>,
}

/// The prefix JS uses to tell media failures (HTTP 400 / 422) from other errors.
pub fn media_error(e: &MediaError) -> napi::Error {
    invalid(format!("[media:{}] {}", e.http_status(), e.message()))
}

fn media_invalid(msg: impl Into<String>) -> napi::Error {
    invalid(format!("[media:400] {}", msg.into()))
}

impl MediaInput {
    pub fn from_js(item: NativeMediaItem) -> napi::Result<Self> {
        let modality = match item.modality.as_str() {
            "image" => Modality::Image,
            "video" => Modality::Video,
            "audio" => Modality::Audio,
            other => return Err(invalid(format!("unknown media modality {other:?} (image, video or audio)"))),
        };
        let samples = match (item.samples, item.sample_rate) {
            (Some(ch), Some(sr)) => Some((ch.iter().map(|c| c.to_vec()).collect(), sr)),
            (Some(_), None) => return Err(media_invalid("raw audio samples need a sampleRate")),
            _ => None,
        };
        if item.frames.is_some() && (modality != Modality::Video || item.data.is_some()) {
            return Err(media_invalid("frames are a video's, given instead of its file data"));
        }
        if item.frames.as_ref().is_some_and(|f| f.is_empty()) {
            return Err(media_invalid("a video given as frames needs at least one frame"));
        }
        let embeds = match (item.embeds, item.embeds_safetensors) {
            (Some(_), Some(_)) => return Err(media_invalid("give image embeddings as floats or as a safetensors blob, not both")),
            (Some(f), None) => {
                let shape = item.embeds_shape.unwrap_or_default().into_iter().map(|d| d as usize).collect();
                Some(EmbedsSource::Floats(f.to_vec(), shape))
            }
            (None, Some(b)) => Some(EmbedsSource::Safetensors(b.to_vec())),
            (None, None) => None,
        };
        if embeds.is_some() && (modality != Modality::Image || item.data.is_some() || item.frames.is_some()) {
            return Err(media_invalid("precomputed embeddings are an image item's, given instead of its data"));
        }
        let embeds = embeds.map(|source| EmbedsInput { source, grid_thw: item.grid_thw });
        let kwargs = match &item.kwargs {
            Some(k) => VisionKwargs::from_json(k).map_err(|e| media_error(&e))?,
            None => VisionKwargs::default(),
        };
        Ok(Self {
            modality,
            modality_name: item.modality,
            data: item.data.map(|b| b.to_vec()),
            frames: item.frames.map(|f| f.iter().map(|b| b.to_vec()).collect()),
            samples,
            format: item.format,
            uuid: item.uuid,
            kwargs,
            embeds,
        })
    }

    /// Processor options as they enter the item's hash.
    fn kwargs_key(&self) -> String {
        match self.modality {
            Modality::Image | Modality::Video => self.kwargs.canonical(self.modality),
            Modality::Audio => "{}".into(),
        }
    }

    /// Bytes that identify the content (for hashing when there is no uuid).
    fn content_bytes(&self) -> Vec<u8> {
        if let Some(d) = &self.data {
            return d.clone();
        }
        let mut out = Vec::new();
        if let Some(frames) = &self.frames {
            // Length-prefixed so that frame boundaries count.
            for f in frames {
                out.extend_from_slice(&(f.len() as u64).to_le_bytes());
                out.extend_from_slice(f);
            }
        }
        if let Some((channels, sr)) = &self.samples {
            out.extend_from_slice(&sr.to_le_bytes());
            for c in channels {
                out.extend_from_slice(&(c.len() as u64).to_le_bytes());
                for v in c {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        out
    }

    fn has_data(&self) -> bool {
        self.data.is_some() || self.samples.is_some() || self.frames.is_some()
    }
}

/// The model's media side: its processor plus the processor cache.
pub struct MediaContext {
    pub processor: Option<Arc<MmProcessor>>,
    pub cache: Mutex<ProcessorCache>,
    /// How image files become RGB (alpha background, size limit).
    pub image_options: ImageOptions,
    /// How video files are decoded (frame recovery, limits).
    pub video_options: VideoDecodeOptions,
    /// Grid (and time step) of vision items seen, by hash: M-RoPE positions
    /// of an item sent later by uuid only, whose tensors may have left the
    /// processor cache while its embeddings stay in the encoder cache.
    pub grids: Mutex<std::collections::HashMap<String, MediaSpan>>,
    /// Accept precomputed image embeddings (`enableMmEmbeds`).
    pub enable_mm_embeds: bool,
}

/// Entries of [`MediaContext::grids`] before it starts over (a few MB).
const MAX_REMEMBERED_GRIDS: usize = 1 << 16;

fn decode_img(bytes: &[u8], opts: &ImageOptions) -> napi::Result<DecodedImage> {
    decode_image(bytes, opts).map_err(|e| media_error(&e))
}

impl MediaContext {
    fn process(&self, item: &MediaInput) -> napi::Result<ProcessedItem> {
        let processor = self.processor.as_ref();
        match item.modality {
            Modality::Audio => {
                let audio = processor.and_then(|p| p.audio.as_ref()).ok_or_else(|| {
                    media_invalid("this model does not accept audio input")
                })?;
                let rate = audio.sampling_rate();
                let mono = if let Some(bytes) = &item.data {
                    decode_to_mono(bytes, item.format.as_deref(), rate).map_err(|e| media_error(&e))?
                } else if let Some((channels, sr)) = &item.samples {
                    let m = mono_from_channels(channels).map_err(|e| media_error(&e))?;
                    resample(&m, *sr, rate).map_err(|e| media_error(&e))?
                } else {
                    return Err(media_invalid("an audio item needs data or samples"));
                };
                if mono.is_empty() {
                    return Err(media_error(&MediaError::Empty("the audio has no samples".into())));
                }
                audio.process(&mono).map_err(|e| media_invalid(e.to_string()))
            }
            Modality::Image | Modality::Video => {
                let vision = processor.and_then(|p| p.vision.as_ref()).ok_or_else(|| {
                    media_invalid(format!("this model does not accept {} input", item.modality_name))
                })?;
                let kw = &item.kwargs;
                let out = match (item.modality, &item.data, &item.frames) {
                    (Modality::Image, Some(bytes), _) => {
                        vision.process_image(&decode_img(bytes, &self.image_options)?, kw)
                    }
                    (Modality::Video, None, Some(frames)) => {
                        let frames =
                            frames.iter().map(|f| decode_img(f, &self.image_options)).collect::<napi::Result<Vec<_>>>()?;
                        vision.process_frames(&frames, kw)
                    }
                    (Modality::Video, Some(bytes), None) => vision.process_video_file(bytes, &self.video_options, kw),
                    _ => return Err(media_invalid(format!("a {} item needs its data", item.modality_name))),
                };
                out.map_err(|e| media_error(&e))
            }
        }
    }

    fn placeholder_token(&self, modality: Modality) -> Option<u32> {
        let p = self.processor.as_ref()?;
        match modality {
            Modality::Audio => p.audio.as_ref().map(|a| a.placeholder_token),
            Modality::Image => p.vision.as_ref().map(|v| v.image_token),
            Modality::Video => p.vision.as_ref().map(|v| v.video_token),
        }
    }

    /// M-RoPE positions of the expanded prompt `ids` (models with a vision
    /// processor; None for the others and for prompts without media).
    fn mrope(
        &self,
        ids: &[u32],
        items: &[MmItem],
        modalities: &[Modality],
        known: &std::collections::HashMap<String, MediaSpan>,
    ) -> napi::Result<Option<MropePositions>> {
        let Some(vision) = self.processor.as_ref().and_then(|p| p.vision.as_ref()) else { return Ok(None) };
        let mut spans = Vec::new();
        for (item, m) in items.iter().zip(modalities) {
            if !matches!(m, Modality::Image | Modality::Video) {
                continue;
            }
            let p = &item.placeholder;
            let span = match &item.input {
                MmInput::Features(f) => {
                    let s = vision.span_of(p.offset, f).map_err(|e| media_invalid(e.to_string()))?;
                    if let Ok(mut g) = self.grids.lock() {
                        if g.len() >= MAX_REMEMBERED_GRIDS {
                            g.clear();
                        }
                        g.insert(p.hash.clone(), s);
                    }
                    s
                }
                _ => {
                    let known = known.get(&p.hash).copied().or_else(|| self.grids.lock().ok().and_then(|g| g.get(&p.hash).copied()));
                    let s = known.ok_or_else(|| {
                        media_invalid(format!("the layout of cached media item {} is unknown; send its data again", p.hash))
                    })?;
                    MediaSpan { offset: p.offset, ..s }
                }
            };
            if span.len(vision.merge_size()) != p.length {
                return Err(media_invalid(format!(
                    "media item {} has {} placeholder tokens but its grid gives {}",
                    p.hash,
                    p.length,
                    span.len(vision.merge_size())
                )));
            }
            spans.push(span);
        }
        // Items arrive grouped by modality, not necessarily in prompt order.
        spans.sort_by_key(|s| s.offset);
        vision.mrope_positions(ids.len(), &spans).map(Some).map_err(|e| media_invalid(e.to_string()))
    }

    /// Turn `items` (in prompt order) into engine media items, expand their
    /// placeholders in `ids`, and lay out M-RoPE positions where the model
    /// has them.
    pub fn prepare(
        &self,
        engine: &Engine,
        ids: Vec<u32>,
        items: Vec<MediaInput>,
    ) -> napi::Result<(Vec<u32>, Vec<MmItem>, Option<MropePositions>)> {
        if items.is_empty() {
            return Ok((ids, Vec::new(), None));
        }
        let caching = self.cache.lock().map(|c| c.enabled()).unwrap_or(false)
            || engine.encoder_cache_enabled()
            || engine.config().enable_prefix_caching;
        // Per item: hash, placeholder count, engine input.
        let mut prepared: Vec<(Modality, String, usize, MmInput)> = Vec::with_capacity(items.len());
        // Grids of precomputed embeddings, by hash (for M-RoPE positions).
        let mut embed_spans = std::collections::HashMap::new();
        for item in &items {
            // uuids only mean something while some cache can use them.
            let uuid = item.uuid.as_deref().filter(|_| caching);
            if let Some(e) = &item.embeds {
                let (hash, count, input, span) = self.prepare_embeds(engine, e, uuid)?;
                embed_spans.insert(hash.clone(), span);
                prepared.push((item.modality, hash, count, input));
                continue;
            }
            let bytes = if uuid.is_some() { Vec::new() } else { item.content_bytes() };
            let hash = mm_hash(item.modality, uuid, &bytes, &item.kwargs_key()).to_string();
            let cached = self.cache.lock().ok().and_then(|mut c| c.get(&hash));
            let (count, input) = match cached {
                Some(p) => (p.num_tokens, MmInput::Features(p.features)),
                None if item.has_data() => {
                    let p = self.process(item)?;
                    if let Ok(mut c) = self.cache.lock() {
                        c.insert(&hash, p.clone());
                    }
                    (p.num_tokens, MmInput::Features(p.features))
                }
                // Both uuid misses say "was sent without data": the TS side
                // (src/media isUuidMiss) then fetches the URL and retries.
                None => match (item.uuid.as_deref(), uuid.and_then(|_| engine.encoder_cache_tokens(&hash))) {
                    (Some(_), Some(n)) => (n, MmInput::Cached),
                    (Some(u), None) if caching => {
                        return Err(media_invalid(format!(
                            "media uuid '{u}' was sent without data and is in no cache; send the {} itself",
                            item.modality_name
                        )))
                    }
                    (Some(u), None) => {
                        return Err(media_invalid(format!(
                            "media uuid '{u}' was sent without data, but caching is off (processor, encoder and prefix caches), so uuids are ignored; send the {} itself",
                            item.modality_name
                        )))
                    }
                    (None, _) => return Err(media_invalid(format!("a {} item needs its data", item.modality_name))),
                },
            };
            prepared.push((item.modality, hash, count, input));
        }
        // One pass over the prompt: the k-th placeholder token of a modality
        // becomes the k-th item of that modality, repeated to its length.
        let mut tokens: Vec<(Modality, u32)> = Vec::new();
        for (m, ..) in &prepared {
            if !tokens.iter().any(|(t, _)| t == m) {
                let name = modality_name(*m);
                let token = self
                    .placeholder_token(*m)
                    .ok_or_else(|| media_invalid(format!("this model does not accept {name} input")))?;
                tokens.push((*m, token));
            }
        }
        let mut queues: Vec<std::collections::VecDeque<usize>> = tokens
            .iter()
            .map(|(m, _)| (0..prepared.len()).filter(|&i| prepared[i].0 == *m).collect())
            .collect();
        let mut out = Vec::with_capacity(ids.len() + prepared.iter().map(|p| p.2).sum::<usize>());
        let mut placed: Vec<Option<MmItem>> = (0..prepared.len()).map(|_| None).collect();
        for t in ids {
            let Some(q) = tokens.iter().position(|&(_, tok)| tok == t) else {
                out.push(t);
                continue;
            };
            let Some(i) = queues[q].pop_front() else {
                let name = modality_name(tokens[q].0);
                return Err(media_invalid(format!(
                    "the prompt has more {name} placeholders than {name} items ({} given)",
                    prepared.iter().filter(|p| p.0 == tokens[q].0).count()
                )));
            };
            let (_, hash, count, input) = &prepared[i];
            placed[i] = Some(MmItem {
                placeholder: MmPlaceholder { hash: hash.clone(), offset: out.len(), length: *count },
                input: input.clone(),
            });
            out.extend(std::iter::repeat_n(t, *count));
        }
        if let Some(q) = queues.iter().position(|q| !q.is_empty()) {
            let name = modality_name(tokens[q].0);
            return Err(media_invalid(format!(
                "{} {name} item(s) were given but the prompt has only {} {name} placeholder(s)",
                prepared.iter().filter(|p| p.0 == tokens[q].0).count(),
                prepared.iter().filter(|p| p.0 == tokens[q].0).count() - queues[q].len()
            )));
        }
        let modalities: Vec<Modality> =
            placed.iter().zip(&prepared).filter(|(p, _)| p.is_some()).map(|(_, q)| q.0).collect();
        let placed: Vec<MmItem> = placed.into_iter().flatten().collect();
        let mrope = self.mrope(&out, &placed, &modalities, &embed_spans)?;
        Ok((out, placed, mrope))
    }
}

impl MediaContext {
    /// Check precomputed image embeddings against their grid and the model
    /// and turn them into an engine input: (hash, placeholder tokens, input, span).
    fn prepare_embeds(
        &self,
        engine: &Engine,
        e: &EmbedsInput,
        uuid: Option<&str>,
    ) -> napi::Result<(String, usize, MmInput, MediaSpan)> {
        if !self.enable_mm_embeds {
            return Err(media_invalid(
                "image_embeds parts are disabled: load the engine with enableMmEmbeds: true (candela serve --enable-mm-embeds) to accept precomputed embeddings",
            ));
        }
        let vision = self
            .processor
            .as_ref()
            .and_then(|p| p.vision.as_ref())
            .ok_or_else(|| media_invalid("this model does not accept image embeddings"))?;
        let bad = |err: MediaError| media_error(&err);
        let (data, shape, inner_grid, bytes) = match &e.source {
            EmbedsSource::Floats(data, shape) => {
                let bytes: Vec<u8> = if uuid.is_some() { Vec::new() } else { data.iter().flat_map(|v| v.to_le_bytes()).collect() };
                (data.clone(), shape.clone(), None, bytes)
            }
            EmbedsSource::Safetensors(blob) => {
                let p = embeds::parse_safetensors(blob).map_err(bad)?;
                (p.data, p.shape, p.grid_thw, if uuid.is_some() { Vec::new() } else { blob.clone() })
            }
        };
        let grid = match &e.grid_thw {
            Some(g) => embeds::grid_from(&g.iter().map(|&v| v as i64).collect::<Vec<_>>()).map_err(bad)?,
            None => inner_grid.ok_or_else(|| {
                media_invalid("image_embeds needs image_grid_thw [t, h, w] (beside it in the part, or as a tensor in the safetensors blob)")
            })?,
        };
        let spec = engine.model_spec();
        // The model's activations are in its KV dtype; splicing converts again if not.
        let tensor = embeds::embeddings_tensor(data, &shape, grid, vision.merge_size(), spec.hidden_size, spec.kv_dtype)
            .map_err(bad)?;
        let count = tensor.dims()[0];
        let key = format!("embeds:{}x{}x{}", grid[0], grid[1], grid[2]);
        let hash = mm_hash(Modality::Image, uuid, &bytes, &key).to_string();
        let span = MediaSpan { offset: 0, grid_thw: grid, time_interval: 1.0 };
        Ok((hash, count, MmInput::Embeddings(tensor), span))
    }
}

fn modality_name(m: Modality) -> &'static str {
    match m {
        Modality::Image => "image",
        Modality::Video => "video",
        Modality::Audio => "audio",
    }
}
