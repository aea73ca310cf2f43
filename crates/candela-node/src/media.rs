//! Media items as JS sends them, turned into candela-models' inputs
//! (preparation itself lives in `candela_models::input`), and input errors
//! turned into typed errors for JS.

use candela_media::Modality;
use candela_models::input::{EmbedsInput, EmbedsSource, InputError, MediaInput, UuidRef};
use candela_models::mm_embeds::grid_from;
use candela_models::processor::{MediaData, PromptItems};
use napi::bindgen_prelude::{Buffer, Float32Array};
use napi_derive::napi;

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
    /// Precomputed embeddings (row-major, `embedsShape` = [tokens, hidden]).
    pub embeds: Option<Float32Array>,
    pub embeds_shape: Option<Vec<u32>>,
    /// Precomputed embeddings as a `torch.save` archive, `.npy` file or
    /// safetensors blob (tensor `image_embeds` / `audio_embeds`, floats,
    /// (tokens, hidden), and optionally `image_grid_thw`, ints, (3,) or (1, 3)).
    pub embeds_blob: Option<Buffer>,
    /// The grid as its own blob of one tensor (vLLM's dict form).
    pub grid_blob: Option<Buffer>,
    /// The (t, h, w) patch grid of precomputed embeddings; wins over a grid
    /// in a blob.
    pub grid_thw: Option<Vec<u32>>,
}

/// A uuid-only item asked about by `uncachedUuids`.
#[napi(object)]
pub struct NativeUuidRef {
    #[napi(ts_type = "'image' | 'video' | 'audio'")]
    pub modality: String,
    pub uuid: String,
    #[napi(ts_type = "Record<string, unknown>")]
    pub kwargs: Option<serde_json::Value>,
}

/// Why a request was not queued: `code` says what kind of mistake it is,
/// `status` the HTTP status the server answers with.
#[napi(object)]
pub struct NativeInputError {
    #[napi(ts_type = "'invalid' | 'media' | 'uuid_miss' | 'context_length'")]
    pub code: String,
    pub status: u32,
    pub message: String,
    /// The uuid of a `uuid_miss`.
    pub uuid: Option<String>,
    /// The request field at fault, when it is not the prompt (`maxTokens`).
    pub param: Option<String>,
}

impl NativeInputError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            code: "invalid".into(),
            status: 400,
            message: message.into(),
            uuid: None,
            param: None,
        }
    }

    pub fn context_length(message: impl Into<String>) -> Self {
        Self {
            code: "context_length".into(),
            status: 400,
            message: message.into(),
            uuid: None,
            param: None,
        }
    }
}

impl From<InputError> for NativeInputError {
    fn from(e: InputError) -> Self {
        let status = e.status() as u32;
        let message = e.to_string();
        match e {
            InputError::Invalid(_) => Self {
                code: "invalid".into(),
                status,
                message,
                uuid: None,
                param: None,
            },
            InputError::Media(_) => Self {
                code: "media".into(),
                status,
                message,
                uuid: None,
                param: None,
            },
            InputError::UuidMiss { uuid, .. } => Self {
                code: "uuid_miss".into(),
                status,
                message,
                uuid: Some(uuid),
                param: None,
            },
        }
    }
}

pub fn modality(name: &str) -> Result<Modality, NativeInputError> {
    Modality::from_name(name).ok_or_else(|| {
        NativeInputError::invalid(format!(
            "unknown media modality {name:?} (image, video or audio)"
        ))
    })
}

/// The item counts of a prompt whose items have the modalities `names`.
pub fn prompt_items(names: &[String]) -> Result<PromptItems, NativeInputError> {
    Ok(PromptItems::of(
        names
            .iter()
            .map(|n| modality(n))
            .collect::<Result<Vec<_>, _>>()?,
    ))
}

impl NativeUuidRef {
    pub fn into_ref(self) -> Result<UuidRef, NativeInputError> {
        Ok(UuidRef {
            modality: modality(&self.modality)?,
            uuid: self.uuid,
            kwargs: self.kwargs.unwrap_or(serde_json::Value::Null),
        })
    }
}

/// Copy a JS item into an owned input that can move to a worker thread,
/// checking that its fields fit together.
pub fn media_input(item: NativeMediaItem) -> Result<MediaInput, NativeInputError> {
    let bad = NativeInputError::invalid;
    let modality = modality(&item.modality)?;
    let samples = match (item.samples, item.sample_rate) {
        (Some(ch), Some(rate)) => Some(MediaData::Samples {
            channels: ch.iter().map(|c| c.to_vec()).collect(),
            rate,
        }),
        (Some(_), None) => return Err(bad("raw audio samples need a sampleRate")),
        _ => None,
    };
    if item.frames.is_some() && (modality != Modality::Video || item.data.is_some()) {
        return Err(bad("frames are a video's, given instead of its file data"));
    }
    if item.frames.as_ref().is_some_and(|f| f.is_empty()) {
        return Err(bad("a video given as frames needs at least one frame"));
    }
    let source = match (item.embeds, item.embeds_blob) {
        (Some(_), Some(_)) => return Err(bad("give embeddings as floats or as a blob, not both")),
        (Some(f), None) => {
            let shape = item
                .embeds_shape
                .unwrap_or_default()
                .into_iter()
                .map(|d| d as usize)
                .collect();
            Some(EmbedsSource::Floats {
                data: f.to_vec(),
                shape,
            })
        }
        (None, Some(b)) => Some(EmbedsSource::Blob(b.to_vec())),
        (None, None) => None,
    };
    if source.is_some()
        && (modality == Modality::Video || item.data.is_some() || item.frames.is_some())
    {
        return Err(bad(
            "precomputed embeddings are an image or audio item's, given instead of its data",
        ));
    }
    if item.grid_blob.is_some() && source.is_none() {
        return Err(bad("a grid blob goes with embeddings"));
    }
    let grid_thw = match item.grid_thw {
        Some(g) => Some(
            grid_from(&g.iter().map(|&v| v as i64).collect::<Vec<_>>())
                .map_err(|e| NativeInputError::invalid(e.message()))?,
        ),
        None => None,
    };
    let data = match (item.data, item.frames, samples) {
        (Some(b), _, _) => Some(MediaData::Encoded {
            bytes: b.to_vec(),
            format: item.format,
        }),
        (None, Some(f), _) => Some(MediaData::Frames(f.iter().map(|b| b.to_vec()).collect())),
        (None, None, s) => s,
    };
    Ok(MediaInput {
        modality,
        data,
        uuid: item.uuid,
        kwargs: item.kwargs.unwrap_or(serde_json::Value::Null),
        embeds: source.map(|source| EmbedsInput {
            source,
            grid_thw,
            grid_blob: item.grid_blob.map(|b| b.to_vec()),
        }),
    })
}
