//! Preparing a prompt's media for the engine, for every family alike: each
//! item's identity (`mm_hash`: uuid or content + processor kwargs), the
//! processor cache, decoding and preprocessing through the family's
//! processor, the expansion of each placeholder token into the item's
//! replacement, and the prompt's positions where the family lays them out.
//!
//! Runs on a worker thread, never the JS thread: decoding and features take
//! milliseconds to seconds.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use candela_core::lru::WeightedLru;
use candela_core::request::{MmFeatures, MmInput, MmItem, MmPlaceholder, MropePositions};
use candela_core::Engine;
use candela_media::{mm_hash, MediaError, Modality};
use candle_core::DType;
use serde_json::Value;

use crate::mm_embeds;
use crate::processor::{
    DecodeOptions, FrameLoss, ItemLayout, MediaData, MmProcessor, PlacedItem, ProcessorCache,
    PromptItems,
};

/// Layouts remembered for uuid-only items whose tensors left the processor
/// cache while their embeddings stay in the encoder cache (a few MB).
const MAX_REMEMBERED_LAYOUTS: usize = 1 << 16;

/// One media item of a request, in prompt order.
#[derive(Debug, Clone)]
pub struct MediaInput {
    pub modality: Modality,
    /// None: a reference to a cached item by `uuid`.
    pub data: Option<MediaData>,
    /// The caller's cache key (vLLM's `multi_modal_uuids`).
    pub uuid: Option<String>,
    /// Per-item processor options (`Null`: none).
    pub kwargs: Value,
    /// Precomputed embeddings instead of data.
    pub embeds: Option<EmbedsInput>,
}

/// Precomputed embeddings of one item (vLLM's `image_embeds`, `audio_embeds`).
#[derive(Debug, Clone)]
pub struct EmbedsInput {
    pub source: EmbedsSource,
    /// The item's (t, h, w) grid; wins over one inside the blob.
    pub grid_thw: Option<[usize; 3]>,
    /// The grid as its own blob (vLLM's dict form); wins over one inside
    /// the embeddings blob.
    pub grid_blob: Option<Vec<u8>>,
}

#[derive(Debug, Clone)]
pub enum EmbedsSource {
    /// Row-major floats of `shape` (`[rows, hidden]`).
    Floats { data: Vec<f32>, shape: Vec<usize> },
    /// A `torch.save` archive, `.npy` file or safetensors blob (see
    /// [`crate::tensor_files`]) with the embeddings (and optionally the grid).
    Blob(Vec<u8>),
}

/// Why a request's media cannot be used. Each kind has its HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// Bad request shape (400).
    #[error("{0}")]
    Invalid(String),
    /// The item's data itself (its status: 400, 413, 422).
    #[error("{}", .0.message())]
    Media(MediaError),
    /// A uuid-only item that no cache holds: the caller must send its data.
    #[error("media uuid '{uuid}' was sent without data and is in no cache; send the {} itself", .modality.name())]
    UuidMiss { uuid: String, modality: Modality },
}

impl InputError {
    pub fn status(&self) -> u16 {
        match self {
            InputError::Media(e) => e.http_status(),
            InputError::Invalid(_) | InputError::UuidMiss { .. } => 400,
        }
    }
}

impl From<MediaError> for InputError {
    fn from(e: MediaError) -> Self {
        InputError::Media(e)
    }
}

fn invalid(msg: impl Into<String>) -> InputError {
    InputError::Invalid(msg.into())
}

/// A prompt ready for the engine.
#[derive(Debug, Clone)]
pub struct PreparedPrompt {
    /// Token ids with every placeholder expanded.
    pub ids: Vec<u32>,
    pub items: Vec<MmItem>,
    pub mrope: Option<MropePositions>,
    /// Video frames that `frame_recovery` replaced or left out, all items together.
    pub frames: FrameLoss,
}

/// One item after hashing and processing, before placement.
struct Resolved {
    modality: Modality,
    hash: String,
    layout: ItemLayout,
    input: MmInput,
}

/// A uuid-only item asked about by [`InputPreparer::uncached`].
#[derive(Debug, Clone)]
pub struct UuidRef {
    pub modality: Modality,
    pub uuid: String,
    pub kwargs: Value,
}

/// What preparation asks of the engine (an [`Engine`], or a stand-in in tests).
pub trait EngineCaches {
    /// Whether the prefix or encoder cache is on (uuids then identify items).
    fn caching(&self) -> bool;
    /// Rows of an item's output held by the encoder cache.
    fn encoder_rows(&self, hash: &str) -> Option<usize>;
    /// Width and dtype that precomputed embeddings are given.
    fn embedding_shape(&self) -> (usize, DType);
    /// Hold precomputed embeddings sent with a uuid where encoder outputs
    /// are held, so a later uuid-only reference finds them.
    fn keep_embeddings(&self, hash: &str, embeds: &candle_core::Tensor);
}

impl EngineCaches for Engine {
    fn caching(&self) -> bool {
        self.encoder_cache_enabled() || self.config().enable_prefix_caching
    }
    fn encoder_rows(&self, hash: &str) -> Option<usize> {
        self.encoder_cache_tokens(hash)
    }
    fn embedding_shape(&self) -> (usize, DType) {
        // The model's activations are in its KV dtype; splicing converts again if not.
        (self.model_spec().hidden_size, self.model_spec().kv_dtype)
    }
    fn keep_embeddings(&self, hash: &str, embeds: &candle_core::Tensor) {
        self.insert_encoder_output(hash, embeds.clone())
    }
}

/// A model's media side: its processor, the processor cache and the
/// layouts of items seen.
pub struct InputPreparer {
    processor: Option<Arc<dyn MmProcessor>>,
    cache: Mutex<ProcessorCache>,
    layouts: Mutex<WeightedLru<ItemLayout>>,
    decode: DecodeOptions,
    /// Accept precomputed embeddings (`enableMmEmbeds`).
    enable_mm_embeds: bool,
}

impl InputPreparer {
    pub fn new(
        processor: Option<Arc<dyn MmProcessor>>,
        processor_cache_bytes: usize,
        decode: DecodeOptions,
        enable_mm_embeds: bool,
    ) -> Self {
        Self {
            processor,
            cache: Mutex::new(ProcessorCache::new(processor_cache_bytes)),
            layouts: Mutex::new(WeightedLru::new(MAX_REMEMBERED_LAYOUTS)),
            decode,
            enable_mm_embeds,
        }
    }

    /// The modalities the model takes (none for text-only models).
    pub fn modalities(&self) -> Vec<Modality> {
        self.processor
            .as_ref()
            .map(|p| p.modalities().to_vec())
            .unwrap_or_default()
    }

    /// Processor cache `(queries, hits, items, bytes)`.
    pub fn cache_stats(&self) -> (u64, u64, usize, usize) {
        self.cache
            .lock()
            .map(|c| {
                let ((q, h), (n, b)) = (c.counters(), c.usage());
                (q, h, n, b)
            })
            .unwrap_or_default()
    }

    /// uuids only mean something while some cache can use them.
    fn caching(&self, engine: &dyn EngineCaches) -> bool {
        self.cache.lock().map(|c| c.enabled()).unwrap_or(false) || engine.caching()
    }

    fn processor(&self, modality: Modality) -> Result<&Arc<dyn MmProcessor>, InputError> {
        self.processor
            .as_ref()
            .filter(|p| p.modalities().contains(&modality))
            .ok_or_else(|| {
                invalid(format!(
                    "this model does not accept {} input",
                    modality.name()
                ))
            })
    }

    fn remember(&self, hash: &str, layout: ItemLayout) {
        if let Ok(mut l) = self.layouts.lock() {
            l.insert(hash, layout, 1);
        }
    }

    /// An item known by its hash: from the processor cache, or (for an item
    /// sent without data) from the encoder cache with its remembered layout.
    /// An item with data never leans on the encoder cache alone, which may
    /// evict it before the engine runs it.
    fn lookup(
        &self,
        engine: &dyn EngineCaches,
        modality: Modality,
        hash: &str,
        has_data: bool,
    ) -> Option<(ItemLayout, MmInput)> {
        if let Some(p) = self.cache.lock().ok().and_then(|mut c| c.get(hash)) {
            return Some((p.layout, MmInput::Features(p.features)));
        }
        if has_data {
            return None;
        }
        self.encoded(engine, modality, hash)
            .map(|layout| (layout, MmInput::Cached))
    }

    /// The remembered layout of an item whose every run's output the
    /// encoder cache holds.
    fn encoded(
        &self,
        engine: &dyn EngineCaches,
        modality: Modality,
        hash: &str,
    ) -> Option<ItemLayout> {
        let layout = self
            .layouts
            .lock()
            .ok()
            .and_then(|l| l.peek(hash).copied())?;
        let runs = self
            .processor(modality)
            .ok()?
            .replacement(modality, &layout)
            .ok()?
            .embeds;
        runs.iter()
            .enumerate()
            .all(|(k, r)| engine.encoder_rows(&run_hash(hash, k, runs.len())) == Some(r.len()))
            .then_some(layout)
    }

    fn hash(
        &self,
        modality: Modality,
        uuid: Option<&str>,
        data: Option<&MediaData>,
        kwargs: &Value,
        prompt: &PromptItems,
    ) -> Result<String, InputError> {
        let p = self.processor(modality)?;
        let mut key = p.kwargs_key(modality, kwargs)?;
        let in_prompt = p.prompt_key(modality, prompt);
        if !in_prompt.is_empty() {
            key = format!("{key};{in_prompt}");
        }
        let bytes = match (uuid, data) {
            (None, Some(d)) => d.content_bytes(),
            _ => Vec::new(),
        };
        Ok(mm_hash(modality, uuid, &bytes, &key).to_string())
    }

    /// For each uuid-only item of a prompt holding `prompt`'s items,
    /// whether no cache holds it (so the caller must send its data). With
    /// every cache off, all are uncached.
    pub fn uncached(
        &self,
        engine: &dyn EngineCaches,
        items: &[UuidRef],
        prompt: &PromptItems,
    ) -> Result<Vec<bool>, InputError> {
        let caching = self.caching(engine);
        items
            .iter()
            .map(|i| {
                if !caching {
                    return Ok(true);
                }
                let hash = self.hash(i.modality, Some(&i.uuid), None, &i.kwargs, prompt)?;
                let held = self
                    .cache
                    .lock()
                    .map(|c| c.contains(&hash))
                    .unwrap_or(false)
                    || self.encoded(engine, i.modality, &hash).is_some();
                Ok(!held)
            })
            .collect()
    }

    fn resolve(
        &self,
        engine: &dyn EngineCaches,
        item: &MediaInput,
        caching: bool,
        prompt: &PromptItems,
    ) -> Result<Resolved, InputError> {
        let uuid = item.uuid.as_deref().filter(|_| caching);
        if let Some(e) = &item.embeds {
            return self.resolve_embeds(engine, item.modality, e, uuid);
        }
        let hash = self.hash(
            item.modality,
            uuid,
            item.data.as_ref(),
            &item.kwargs,
            prompt,
        )?;
        if let Some((layout, input)) =
            self.lookup(engine, item.modality, &hash, item.data.is_some())
        {
            return Ok(Resolved {
                modality: item.modality,
                hash,
                layout,
                input,
            });
        }
        let Some(data) = &item.data else {
            return Err(match (&item.uuid, caching) {
                (Some(u), true) => InputError::UuidMiss { uuid: u.clone(), modality: item.modality },
                (Some(u), false) => invalid(format!(
                    "media uuid '{u}' was sent without data, but caching is off (processor, encoder and prefix caches), so uuids are ignored; send the {} itself",
                    item.modality.name()
                )),
                (None, _) => invalid(format!("a {} item needs its data (or a uuid of a cached one)", item.modality.name())),
            });
        };
        let processed = self.processor(item.modality)?.process(
            item.modality,
            data,
            &item.kwargs,
            &self.decode,
            prompt,
        )?;
        if let Ok(mut c) = self.cache.lock() {
            c.insert(&hash, processed.clone());
        }
        self.remember(&hash, processed.layout);
        Ok(Resolved {
            modality: item.modality,
            hash,
            layout: processed.layout,
            input: MmInput::Features(processed.features),
        })
    }

    fn resolve_embeds(
        &self,
        engine: &dyn EngineCaches,
        modality: Modality,
        e: &EmbedsInput,
        uuid: Option<&str>,
    ) -> Result<Resolved, InputError> {
        if !self.enable_mm_embeds {
            return Err(invalid(format!(
                "{}_embeds parts are disabled: load the engine with enableMmEmbeds: true (candela serve --enable-mm-embeds) to accept precomputed embeddings",
                modality.name()
            )));
        }
        let processor = self.processor(modality)?;
        let (data, shape, inner_grid) = match &e.source {
            EmbedsSource::Floats { data, shape } => (data.clone(), shape.clone(), None),
            EmbedsSource::Blob(blob) => {
                let p = mm_embeds::parse_embeds(blob, modality)?;
                (p.data, p.shape, p.grid_thw)
            }
        };
        let blob_grid = e
            .grid_blob
            .as_deref()
            .map(mm_embeds::parse_grid)
            .transpose()?;
        let (hidden, dtype) = engine.embedding_shape();
        let what = mm_embeds::embeds_key(modality);
        let tensor = mm_embeds::embeddings_tensor(&what, data, &shape, hidden, dtype)?;
        let grid = e.grid_thw.or(blob_grid).or(inner_grid);
        let layout = processor.embeddings_layout(modality, tensor.dims()[0], grid)?;
        let hash = match uuid {
            // Keyed as a uuid-only reference to the item is, so that one
            // finds these embeddings (held by the encoder cache) later.
            Some(u) => self.hash(
                modality,
                Some(u),
                None,
                &Value::Null,
                &PromptItems::default(),
            )?,
            None => {
                let bytes = match &e.source {
                    EmbedsSource::Floats { data, .. } => {
                        data.iter().flat_map(|v| v.to_le_bytes()).collect()
                    }
                    EmbedsSource::Blob(blob) => blob.clone(),
                };
                let key = match grid {
                    Some([t, h, w]) => format!("embeds:{t}x{h}x{w}"),
                    None => format!("embeds:{}", layout.embeds),
                };
                mm_hash(modality, None, &bytes, &key).to_string()
            }
        };
        self.remember(&hash, layout);
        if uuid.is_some() {
            engine.keep_embeddings(&hash, &tensor);
        }
        Ok(Resolved {
            modality,
            hash,
            layout,
            input: MmInput::Embeddings(tensor),
        })
    }

    /// Turn `items` (in prompt order: the k-th placeholder token of a
    /// modality is its k-th item) into engine items, expand their
    /// placeholders in `ids`, and lay out positions where the family has
    /// its own.
    pub fn prepare(
        &self,
        engine: &dyn EngineCaches,
        ids: Vec<u32>,
        items: &[MediaInput],
    ) -> Result<PreparedPrompt, InputError> {
        if items.is_empty() {
            return Ok(PreparedPrompt {
                ids,
                items: Vec::new(),
                mrope: None,
                frames: FrameLoss::default(),
            });
        }
        let caching = self.caching(engine);
        let prompt = PromptItems::of(items.iter().map(|i| i.modality));
        let resolved = items
            .iter()
            .map(|i| self.resolve(engine, i, caching, &prompt))
            .collect::<Result<Vec<_>, _>>()?;
        self.expand(ids, resolved)
    }

    fn expand(&self, ids: Vec<u32>, resolved: Vec<Resolved>) -> Result<PreparedPrompt, InputError> {
        // The placeholder token of each modality present, with its queue of items.
        let mut queues: Vec<(Modality, u32, VecDeque<usize>)> = Vec::new();
        for (i, r) in resolved.iter().enumerate() {
            match queues.iter_mut().find(|q| q.0 == r.modality) {
                Some(q) => q.2.push_back(i),
                None => {
                    let p = self.processor(r.modality)?;
                    let token = p.placeholder_token(r.modality).ok_or_else(|| {
                        invalid(format!(
                            "this model does not accept {} input",
                            r.modality.name()
                        ))
                    })?;
                    queues.push((r.modality, token, VecDeque::from([i])));
                }
            }
        }
        let count = |m: Modality| resolved.iter().filter(|r| r.modality == m).count();
        let mut out =
            Vec::with_capacity(ids.len() + resolved.iter().map(|r| r.layout.embeds).sum::<usize>());
        // Each resolved item placed: its index and its first embedding's offset.
        let mut placed: Vec<(usize, usize)> = Vec::with_capacity(resolved.len());
        let mut mm_items: Vec<MmItem> = Vec::with_capacity(resolved.len());
        // Whether `out` ends in a replacement's trailing text token, which
        // may merge with the next token.
        let mut at_boundary = false;
        for t in ids {
            let Some(q) = queues.iter_mut().find(|q| q.1 == t) else {
                let merged = match (at_boundary, out.last_mut(), &self.processor) {
                    (true, Some(last), Some(p)) => p.merge_at_boundary(*last, t).map(|m| *last = m),
                    _ => None,
                };
                if merged.is_none() {
                    out.push(t);
                }
                at_boundary = false;
                continue;
            };
            let Some(i) = q.2.pop_front() else {
                let name = q.0.name();
                return Err(invalid(format!(
                    "the prompt has more {name} placeholders than {name} items ({} given)",
                    count(q.0)
                )));
            };
            let r = &resolved[i];
            let p = self.processor(r.modality)?;
            let rep = p.replacement(r.modality, &r.layout)?;
            let (Some(first), Some(last_run)) = (rep.embeds.first(), rep.embeds.last()) else {
                return Err(invalid(format!(
                    "internal: a {} item's replacement takes no embeddings",
                    r.modality.name()
                )));
            };
            let ordered = rep.embeds.windows(2).all(|w| w[0].end <= w[1].start);
            if rep.rows() != r.layout.embeds
                || !ordered
                || rep.embeds.iter().any(|run| run.is_empty())
                || last_run.end > rep.tokens.len()
            {
                return Err(invalid(format!(
                    "internal: a {} item's replacement takes {} embeddings in runs {:?}, its encoder gives {}",
                    r.modality.name(),
                    rep.rows(),
                    rep.embeds,
                    r.layout.embeds
                )));
            }
            let mut tokens = &rep.tokens[..];
            if first.start > 0 {
                if let Some(last) = out.last_mut() {
                    if let Some(m) = p.merge_at_boundary(*last, tokens[0]) {
                        *last = m;
                        tokens = &tokens[1..];
                    }
                }
            }
            // Where the replacement's token 0 sits in `out`.
            let base = out.len() - (rep.tokens.len() - tokens.len());
            out.extend_from_slice(tokens);
            at_boundary = last_run.end < rep.tokens.len();
            placed.push((i, base + first.start));
            let n = rep.embeds.len();
            let mut rows_before = 0;
            for (k, run) in rep.embeds.iter().enumerate() {
                mm_items.push(MmItem {
                    placeholder: MmPlaceholder {
                        hash: run_hash(&r.hash, k, n),
                        offset: base + run.start,
                        length: run.len(),
                    },
                    input: run_input(&r.input, k, n, rows_before, run.len())?,
                });
                rows_before += run.len();
            }
        }
        if let Some(q) = queues.iter().find(|q| !q.2.is_empty()) {
            let name = q.0.name();
            let n = count(q.0);
            return Err(invalid(format!(
                "{n} {name} item(s) were given but the prompt has only {} {name} placeholder(s)",
                n - q.2.len()
            )));
        }
        let mrope = match &self.processor {
            Some(p) => {
                let layout: Vec<PlacedItem> = placed
                    .iter()
                    .map(|&(i, offset)| PlacedItem {
                        modality: resolved[i].modality,
                        offset,
                        layout: resolved[i].layout,
                    })
                    .collect();
                p.positions(out.len(), &layout)?
            }
            None => None,
        };
        Ok(PreparedPrompt {
            ids: out,
            items: mm_items,
            mrope,
            frames: resolved
                .iter()
                .fold(FrameLoss::default(), |a, r| a + r.layout.frames),
        })
    }
}

/// The engine key of run `k` of an item of `runs` runs: a one-run item is
/// keyed by its own hash.
fn run_hash(hash: &str, k: usize, runs: usize) -> String {
    if runs == 1 {
        hash.to_string()
    } else {
        format!("{hash}#{k}")
    }
}

/// Run `k` (of `runs`, `len` rows after `rows_before`) of an item's input:
/// entry `k` of each feature tensor, or those rows of its embeddings.
fn run_input(
    input: &MmInput,
    k: usize,
    runs: usize,
    rows_before: usize,
    len: usize,
) -> Result<MmInput, InputError> {
    let split = |e: candle_core::Error| invalid(format!("internal: splitting an item's runs: {e}"));
    Ok(match input {
        _ if runs == 1 => input.clone(),
        MmInput::Cached => MmInput::Cached,
        MmInput::Embeddings(t) => {
            MmInput::Embeddings(t.narrow(0, rows_before, len).map_err(split)?)
        }
        MmInput::Features(f) => {
            let tensors = f
                .tensors
                .iter()
                .map(|(name, t)| {
                    if t.dims().first() != Some(&runs) {
                        return Err(invalid(format!(
                            "internal: feature {name} of shape {:?} has no entry per run ({runs})",
                            t.dims()
                        )));
                    }
                    Ok((name.clone(), t.get(k).map_err(split)?))
                })
                .collect::<Result<_, _>>()?;
            MmInput::Features(Arc::new(MmFeatures { tensors }))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processor::{ProcessedItem, Replacement};
    use candle_core::{Device, Tensor};

    /// A family whose images are `n` bytes giving `n` embeddings, wrapped in
    /// begin (100) / end (101) text tokens, as Gemma 3 wraps its images.
    #[derive(Debug)]
    struct Wrapping;

    impl MmProcessor for Wrapping {
        fn modalities(&self) -> &[Modality] {
            &[Modality::Image]
        }
        fn placeholder_token(&self, m: Modality) -> Option<u32> {
            (m == Modality::Image).then_some(9)
        }
        fn kwargs_key(&self, _: Modality, kwargs: &Value) -> Result<String, MediaError> {
            match kwargs {
                Value::Null => Ok("{}".into()),
                _ => Err(MediaError::Invalid("no kwargs".into())),
            }
        }
        fn process(
            &self,
            _: Modality,
            data: &MediaData,
            _: &Value,
            _: &DecodeOptions,
            _: &PromptItems,
        ) -> Result<ProcessedItem, MediaError> {
            let MediaData::Encoded { bytes, .. } = data else {
                return Err(MediaError::Invalid("bytes".into()));
            };
            if bytes.is_empty() {
                return Err(MediaError::Empty("empty".into()));
            }
            let t = Tensor::zeros((bytes.len(), 4), candle_core::DType::F32, &Device::Cpu)
                .map_err(|e| MediaError::Invalid(e.to_string()))?;
            Ok(ProcessedItem {
                features: Arc::new(MmFeatures {
                    tensors: vec![("x".into(), t)],
                }),
                layout: ItemLayout::rows(bytes.len()),
            })
        }
        fn embeddings_layout(
            &self,
            _: Modality,
            rows: usize,
            _: Option<[usize; 3]>,
        ) -> Result<ItemLayout, MediaError> {
            Ok(ItemLayout::rows(rows))
        }
        fn replacement(&self, _: Modality, layout: &ItemLayout) -> Result<Replacement, MediaError> {
            let mut tokens = vec![100];
            tokens.extend(std::iter::repeat_n(9, layout.embeds));
            tokens.push(101);
            Ok(Replacement {
                tokens,
                embeds: std::iter::once(1..1 + layout.embeds).collect(),
            })
        }
        /// 50 / 51 merge into the wrappers after / before them, and two
        /// wrappers meeting merge too (as Gemma 3's newline runs do).
        fn merge_at_boundary(&self, left: u32, right: u32) -> Option<u32> {
            match (left, right) {
                (50, 100) => Some(150),
                (101, 51) => Some(151),
                (101, 100) => Some(111),
                _ => None,
            }
        }
    }

    /// A family whose image of `n` bytes is `n` blocks of one row each, as
    /// Gemma 3's pan-and-scan crops are: `100, 9, 101` per block, joined by 7.
    #[derive(Debug)]
    struct Blocks;

    impl MmProcessor for Blocks {
        fn modalities(&self) -> &[Modality] {
            &[Modality::Image]
        }
        fn placeholder_token(&self, m: Modality) -> Option<u32> {
            (m == Modality::Image).then_some(9)
        }
        fn kwargs_key(&self, m: Modality, kwargs: &Value) -> Result<String, MediaError> {
            Wrapping.kwargs_key(m, kwargs)
        }
        fn process(
            &self,
            _: Modality,
            data: &MediaData,
            _: &Value,
            _: &DecodeOptions,
            _: &PromptItems,
        ) -> Result<ProcessedItem, MediaError> {
            let MediaData::Encoded { bytes, .. } = data else {
                return Err(MediaError::Invalid("bytes".into()));
            };
            let rows: Vec<f32> = bytes.iter().map(|&b| b as f32).collect();
            let t = Tensor::from_vec(rows, (bytes.len(), 1), &Device::Cpu)
                .map_err(|e| MediaError::Invalid(e.to_string()))?;
            Ok(ProcessedItem {
                features: Arc::new(MmFeatures {
                    tensors: vec![("x".into(), t)],
                }),
                layout: ItemLayout::rows(bytes.len()),
            })
        }
        fn replacement(&self, _: Modality, layout: &ItemLayout) -> Result<Replacement, MediaError> {
            let mut tokens = Vec::new();
            let mut embeds = Vec::new();
            for k in 0..layout.embeds {
                if k > 0 {
                    tokens.push(7);
                }
                tokens.extend([100, 9, 101]);
                embeds.push(tokens.len() - 2..tokens.len() - 1);
            }
            Ok(Replacement { tokens, embeds })
        }
    }

    #[test]
    fn an_item_of_several_runs_is_one_engine_item_per_run() {
        let e = engine(true);
        let prep = InputPreparer::new(Some(Arc::new(Blocks)), 0, DecodeOptions::default(), false);
        let p = prep
            .prepare(&e, vec![1, 9, 2], &[image(&[4, 5, 6], Some("pano"))])
            .unwrap();
        assert_eq!(
            p.ids,
            vec![1, 100, 9, 101, 7, 100, 9, 101, 7, 100, 9, 101, 2]
        );
        let spans: Vec<(usize, usize)> = p
            .items
            .iter()
            .map(|m| (m.placeholder.offset, m.placeholder.length))
            .collect();
        assert_eq!(spans, vec![(2, 1), (6, 1), (10, 1)]);
        let hash = &p.items[0].placeholder.hash;
        assert!(hash.ends_with("#0"));
        assert_eq!(p.items[2].placeholder.hash, hash.replace("#0", "#2"));
        // Run k gets entry k of each feature tensor.
        let firsts: Vec<f32> = p
            .items
            .iter()
            .map(|m| match &m.input {
                MmInput::Features(f) => f.get("x").unwrap().to_vec1::<f32>().unwrap()[0],
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(firsts, vec![4.0, 5.0, 6.0]);
        // By uuid alone: a hit only while the encoder cache holds every run.
        let q = UuidRef {
            modality: Modality::Image,
            uuid: "pano".into(),
            kwargs: Value::Null,
        };
        for (k, m) in p.items.iter().enumerate().take(2) {
            e.encoder.borrow_mut().insert(m.placeholder.hash.clone(), 1);
            assert_eq!(
                prep.uncached(&e, std::slice::from_ref(&q), &PromptItems::default())
                    .unwrap(),
                vec![true],
                "{k}"
            );
        }
        e.encoder
            .borrow_mut()
            .insert(p.items[2].placeholder.hash.clone(), 1);
        assert_eq!(
            prep.uncached(&e, &[q], &PromptItems::default()).unwrap(),
            vec![false]
        );
        let again = prep.prepare(&e, vec![9], &[by_uuid("pano")]).unwrap();
        assert_eq!(again.items.len(), 3);
        assert!(again
            .items
            .iter()
            .all(|m| matches!(m.input, MmInput::Cached)));
    }

    /// A family that processes an image according to its prompt: as many
    /// rows as the prompt has images.
    #[derive(Debug)]
    struct ByPrompt;

    impl MmProcessor for ByPrompt {
        fn modalities(&self) -> &[Modality] {
            &[Modality::Image]
        }
        fn placeholder_token(&self, m: Modality) -> Option<u32> {
            (m == Modality::Image).then_some(9)
        }
        fn kwargs_key(&self, m: Modality, kwargs: &Value) -> Result<String, MediaError> {
            Wrapping.kwargs_key(m, kwargs)
        }
        fn prompt_key(&self, m: Modality, prompt: &PromptItems) -> String {
            format!("images={}", prompt.count(m))
        }
        fn process(
            &self,
            m: Modality,
            _: &MediaData,
            _: &Value,
            _: &DecodeOptions,
            prompt: &PromptItems,
        ) -> Result<ProcessedItem, MediaError> {
            let n = prompt.count(m);
            let t = Tensor::zeros((n, 4), candle_core::DType::F32, &Device::Cpu)
                .map_err(|e| MediaError::Invalid(e.to_string()))?;
            Ok(ProcessedItem {
                features: Arc::new(MmFeatures {
                    tensors: vec![("x".into(), t)],
                }),
                layout: ItemLayout::rows(n),
            })
        }
    }

    #[test]
    fn an_item_is_keyed_and_cached_by_its_prompt_where_the_family_says_so() {
        let e = engine(true);
        let prep = InputPreparer::new(
            Some(Arc::new(ByPrompt)),
            1 << 20,
            DecodeOptions::default(),
            false,
        );
        let lengths = |p: &PreparedPrompt| -> Vec<usize> {
            p.items.iter().map(|m| m.placeholder.length).collect()
        };
        let alone = prep
            .prepare(&e, vec![9], &[image(&[1], Some("u"))])
            .unwrap();
        let pair = [image(&[1], Some("u")), image(&[2], None)];
        let both = prep.prepare(&e, vec![9, 9], &pair).unwrap();
        assert_eq!((lengths(&alone), lengths(&both)), (vec![1], vec![2, 2]));
        assert_ne!(
            alone.items[0].placeholder.hash,
            both.items[0].placeholder.hash
        );
        assert_eq!(prep.cache_stats().1, 0, "no hit across prompts");
        let q = [UuidRef {
            modality: Modality::Image,
            uuid: "u".into(),
            kwargs: Value::Null,
        }];
        let images = |n| PromptItems::of(std::iter::repeat_n(Modality::Image, n));
        assert_eq!(prep.uncached(&e, &q, &images(2)).unwrap(), vec![false]);
        assert_eq!(prep.uncached(&e, &q, &images(3)).unwrap(), vec![true]);
        assert_eq!(images(2).count(Modality::Video), 0);
    }

    /// The caches of an engine, without one.
    struct Caches {
        on: bool,
        encoder: std::cell::RefCell<std::collections::HashMap<String, usize>>,
    }

    impl EngineCaches for Caches {
        fn caching(&self) -> bool {
            self.on
        }
        fn encoder_rows(&self, hash: &str) -> Option<usize> {
            self.encoder.borrow().get(hash).copied()
        }
        fn embedding_shape(&self) -> (usize, DType) {
            (4, DType::F32)
        }
        fn keep_embeddings(&self, hash: &str, embeds: &Tensor) {
            self.encoder
                .borrow_mut()
                .insert(hash.to_string(), embeds.dims()[0]);
        }
    }

    fn engine(on: bool) -> Caches {
        Caches {
            on,
            encoder: Default::default(),
        }
    }

    fn image(bytes: &[u8], uuid: Option<&str>) -> MediaInput {
        MediaInput {
            modality: Modality::Image,
            data: Some(MediaData::Encoded {
                bytes: bytes.to_vec(),
                format: None,
            }),
            uuid: uuid.map(str::to_string),
            kwargs: Value::Null,
            embeds: None,
        }
    }

    fn by_uuid(uuid: &str) -> MediaInput {
        MediaInput {
            data: None,
            ..image(&[], Some(uuid))
        }
    }

    #[test]
    fn replacements_keep_wrappers_as_text() {
        let e = engine(true);
        let prep = InputPreparer::new(
            Some(Arc::new(Wrapping)),
            1 << 20,
            DecodeOptions::default(),
            false,
        );
        let p = prep
            .prepare(
                &e,
                vec![1, 9, 2, 9, 3],
                &[image(&[0; 3], None), image(&[1; 2], None)],
            )
            .unwrap();
        assert_eq!(p.ids, vec![1, 100, 9, 9, 9, 101, 2, 100, 9, 9, 101, 3]);
        let spans: Vec<(usize, usize)> = p
            .items
            .iter()
            .map(|m| (m.placeholder.offset, m.placeholder.length))
            .collect();
        assert_eq!(spans, vec![(2, 3), (8, 2)]);
        assert!(p.mrope.is_none());
        // Same bytes, same hash; different bytes, different hash.
        let again = prep.prepare(&e, vec![9], &[image(&[0; 3], None)]).unwrap();
        assert_eq!(again.items[0].placeholder.hash, p.items[0].placeholder.hash);
        assert_ne!(p.items[0].placeholder.hash, p.items[1].placeholder.hash);
        assert_eq!(prep.cache_stats().0, 3);
        assert_eq!(prep.cache_stats().1, 1);
    }

    #[test]
    fn wrappers_merge_with_the_tokens_beside_them() {
        let prep = InputPreparer::new(
            Some(Arc::new(Wrapping)),
            1 << 20,
            DecodeOptions::default(),
            false,
        );
        let p = prep
            .prepare(
                &engine(false),
                vec![50, 9, 9, 51, 50],
                &[image(&[0; 3], None), image(&[1; 2], None)],
            )
            .unwrap();
        assert_eq!(p.ids, vec![150, 9, 9, 9, 111, 9, 9, 151, 50]);
        let spans: Vec<(usize, usize)> = p
            .items
            .iter()
            .map(|m| (m.placeholder.offset, m.placeholder.length))
            .collect();
        assert_eq!(spans, vec![(1, 3), (5, 2)]);
    }

    #[test]
    fn counts_must_match_and_modalities_must_be_taken() {
        let e = engine(true);
        let prep = InputPreparer::new(
            Some(Arc::new(Wrapping)),
            1 << 20,
            DecodeOptions::default(),
            false,
        );
        let err = prep
            .prepare(&e, vec![9, 9], &[image(&[0; 1], None)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("more image placeholders than image items (1 given)"),
            "{err}"
        );
        let err = prep
            .prepare(&e, vec![1], &[image(&[0; 1], None)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                "1 image item(s) were given but the prompt has only 0 image placeholder(s)"
            ),
            "{err}"
        );
        let audio = MediaInput {
            modality: Modality::Audio,
            ..image(&[0; 1], None)
        };
        let err = prep.prepare(&e, vec![9], &[audio]).unwrap_err();
        assert!(
            matches!(err, InputError::Invalid(_))
                && err.to_string().contains("does not accept audio"),
            "{err}"
        );
        let err = prep.prepare(&e, vec![9], &[image(&[], None)]).unwrap_err();
        assert!(
            matches!(err, InputError::Media(MediaError::Empty(_))),
            "{err}"
        );
        let text_only = InputPreparer::new(None, 0, DecodeOptions::default(), false);
        assert!(text_only
            .prepare(&e, vec![9], &[image(&[1], None)])
            .unwrap_err()
            .to_string()
            .contains("does not accept image"));
        assert_eq!(text_only.prepare(&e, vec![9], &[]).unwrap().ids, vec![9]);
    }

    #[test]
    fn uuids_hit_the_caches_and_misses_are_typed() {
        let e = engine(true);
        let prep = InputPreparer::new(
            Some(Arc::new(Wrapping)),
            1 << 20,
            DecodeOptions::default(),
            false,
        );
        let q = |u: &str| UuidRef {
            modality: Modality::Image,
            uuid: u.into(),
            kwargs: Value::Null,
        };
        assert_eq!(
            prep.uncached(&e, &[q("cat")], &PromptItems::default())
                .unwrap(),
            vec![true]
        );
        let err = prep.prepare(&e, vec![9], &[by_uuid("cat")]).unwrap_err();
        assert!(
            matches!(&err, InputError::UuidMiss { uuid, .. } if uuid == "cat"),
            "{err}"
        );
        // Sent once with data under the uuid: later the uuid alone suffices,
        // and its hash ignores the bytes.
        let first = prep
            .prepare(&e, vec![9], &[image(&[5; 2], Some("cat"))])
            .unwrap();
        assert_eq!(
            prep.uncached(&e, &[q("cat"), q("dog")], &PromptItems::default())
                .unwrap(),
            vec![false, true]
        );
        let second = prep.prepare(&e, vec![9], &[by_uuid("cat")]).unwrap();
        assert_eq!(second.ids, first.ids);
        assert_eq!(second.items[0].placeholder, first.items[0].placeholder);
        // With every cache off, uuids mean nothing: a uuid-only item is refused.
        let off = engine(false);
        let cold = InputPreparer::new(Some(Arc::new(Wrapping)), 0, DecodeOptions::default(), false);
        assert_eq!(
            cold.uncached(&off, &[q("cat")], &PromptItems::default())
                .unwrap(),
            vec![true]
        );
        let err = cold
            .prepare(&off, vec![9], &[by_uuid("cat")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("caching is off"), "{err}");
        // Processor cache off, encoder cache holding the item: the uuid
        // resolves to the cached embeddings with the layout seen before.
        let enc = engine(true);
        let lean = InputPreparer::new(Some(Arc::new(Wrapping)), 0, DecodeOptions::default(), false);
        let sent = lean
            .prepare(&enc, vec![9], &[image(&[5; 2], Some("owl"))])
            .unwrap();
        assert_eq!(
            lean.uncached(&enc, &[q("owl")], &PromptItems::default())
                .unwrap(),
            vec![true]
        );
        enc.encoder
            .borrow_mut()
            .insert(sent.items[0].placeholder.hash.clone(), 2);
        assert_eq!(
            lean.uncached(&enc, &[q("owl")], &PromptItems::default())
                .unwrap(),
            vec![false]
        );
        let hit = lean.prepare(&enc, vec![9], &[by_uuid("owl")]).unwrap();
        assert!(matches!(hit.items[0].input, MmInput::Cached));
        assert_eq!(hit.ids, sent.ids);
        // Kwargs are checked by the family.
        let bad = MediaInput {
            kwargs: serde_json::json!({"x": 1}),
            ..image(&[1], None)
        };
        assert!(prep
            .prepare(&e, vec![9], &[bad])
            .unwrap_err()
            .to_string()
            .contains("no kwargs"));
    }

    fn embeds(floats: &[f32], uuid: Option<&str>) -> MediaInput {
        MediaInput {
            data: None,
            embeds: Some(EmbedsInput {
                source: EmbedsSource::Floats {
                    data: floats.to_vec(),
                    shape: vec![floats.len() / 4, 4],
                },
                grid_thw: None,
                grid_blob: None,
            }),
            ..image(&[], uuid.map(str::to_string).as_deref())
        }
    }

    #[test]
    fn embeddings_sent_with_a_uuid_are_found_by_it_later() {
        let e = engine(true);
        let prep = InputPreparer::new(Some(Arc::new(Wrapping)), 0, DecodeOptions::default(), true);
        let q = |u: &str| UuidRef {
            modality: Modality::Image,
            uuid: u.into(),
            kwargs: Value::Null,
        };
        // Without a uuid they are keyed by content, and nothing keeps them.
        prep.prepare(&e, vec![9], &[embeds(&[1.0; 8], None)])
            .unwrap();
        assert!(e.encoder.borrow().is_empty());
        assert_eq!(
            prep.uncached(&e, &[q("emb")], &PromptItems::default())
                .unwrap(),
            vec![true]
        );
        let sent = prep
            .prepare(&e, vec![9], &[embeds(&[1.0; 12], Some("emb"))])
            .unwrap();
        assert!(matches!(sent.items[0].input, MmInput::Embeddings(_)));
        assert_eq!(
            prep.uncached(&e, &[q("emb")], &PromptItems::default())
                .unwrap(),
            vec![false]
        );
        let again = prep.prepare(&e, vec![9], &[by_uuid("emb")]).unwrap();
        assert!(matches!(again.items[0].input, MmInput::Cached));
        assert_eq!(again.ids, sent.ids);
        assert_eq!(again.items[0].placeholder, sent.items[0].placeholder);
        // Turned off, embeddings are refused, uuid or not.
        let off = InputPreparer::new(Some(Arc::new(Wrapping)), 0, DecodeOptions::default(), false);
        let err = off
            .prepare(&e, vec![9], &[embeds(&[1.0; 4], Some("x"))])
            .unwrap_err()
            .to_string();
        assert!(err.contains("image_embeds parts are disabled"), "{err}");
    }
}
