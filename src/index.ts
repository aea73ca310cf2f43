/**
 * candela: local LLM inference for Node. A Rust engine (candle tensors, paged
 * KV cache, continuous batching, prefix caching) behind a typed API.
 *
 * @example
 * ```ts
 * import { Engine } from '@candela-ai/candela'
 * const engine = await Engine.load({ model: 'default' })
 * const res = await engine.chat([{ role: 'user', content: 'Hi' }], { maxTokens: 32 })
 * console.log(res.text)
 * await engine.close() // or: `await using engine = await Engine.load(...)`
 * ```
 *
 * @module
 */

export { Engine, DEFAULT_GENERATE_MAX_TOKENS } from './engine.js'
export {
  AbortError,
  CandelaError,
  ClosedError,
  ContextLengthError,
  InternalError,
  LoadError,
  MediaError,
  ValidationError,
} from './errors.js'
export type { CandelaErrorOptions } from './errors.js'
export { splitAudio, type SplitAudioOptions } from './audio.js'
export { Transcriber, isWhisperModel, type TranscriptionAudio, type TranscribeOptions, type Transcription, type TranscriptionSegment, type TranscriberInfo, type TranscriberLoadOptions } from './transcriber.js'
export { DEFAULT_MODEL, defaultModelPath, ensureDefaultModel, modelCacheDir } from './default-model.js'
export type { FetchOptions } from './default-model.js'
export { HubError, UnsupportedRepoError, findModel, hubSettings, isHubReference, pullModel } from './hub/index.js'
export type { DownloadProgress, HubErrorCode, HubModel, HubOptions, HubSettings } from './hub/index.js'
export type {
  AudioContentPart,
  AudioInput,
  AudioSamples,
  ChatMessage,
  ContentPart,
  ChatParams,
  ChatRole,
  CompletionOutput,
  Device,
  DType,
  EngineStats,
  FinishReason,
  JsonSchema,
  LoadOptions,
  MmProcessorKwargs,
  ModelInfo,
  PromptInput,
  PromptMedia,
  LoadProgress,
  Quantization,
  ResponseFormat,
  SampleOutput,
  SamplingParams,
  StreamChunk,
  StructuredOutputs,
  TextContentPart,
  TokenLogprob,
  TopLogprob,
  Usage,
  VideoFrameLoss,
  VideoInput,
  VisionContentPart,
  ZodSchema,
} from './types.js'
