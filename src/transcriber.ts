/**
 * Speech to text with Whisper models (`WhisperForConditionalGeneration`).
 *
 * @example
 * ```ts
 * import { Transcriber } from '@candela-ai/candela'
 * const whisper = await Transcriber.load({ model: './whisper-tiny.en' })
 * const { text, segments } = await whisper.transcribe(await readFile('talk.mp3'))
 * await whisper.close()
 * ```
 *
 * @module
 */

import { existsSync } from 'node:fs'
import { readFile } from 'node:fs/promises'
import { resolve } from 'node:path'

import { ClosedError, InternalError, LoadError, ValidationError, abortErrorFor, fromNative, inputError } from './errors.js'
import { bindingFor } from './native.js'
import type { NativeTranscriber, NativeTranscribeRequest, NativeTranscription } from '../native/index.cjs'
import type { AudioInput, Device, DType } from './types.js'

/** Options of {@link Transcriber.load}. */
export interface TranscriberLoadOptions {
  /** A Whisper model folder: config.json, model.safetensors, tokenizer.json, generation_config.json, preprocessor_config.json. */
  model: string
  /** `'cpu'` (default), `'cuda'`, or `'auto'` (CUDA when available). */
  device?: Device
  /** Weight / compute type (default `'auto'`: f32 on the CPU). */
  dtype?: DType
  /** Most 30 s windows decoded together in one batch (default 16). */
  maxBatch?: number
}

/**
 * Audio to transcribe: an audio file's bytes (WAV, FLAC, MP3, OGG/Vorbis;
 * any sample rate and channel count), a path to such a file, or raw samples
 * (one `Float32Array` for mono, or one per channel) with their rate.
 */
export type TranscriptionAudio = AudioInput | ArrayBuffer | string

/** Options of {@link Transcriber.transcribe}. */
export interface TranscribeOptions {
  /** The spoken language: ISO-639-1 code (`'en'`) or English name (`'english'`). Omitted: detected from the first 30 s. */
  language?: string
  /** Text that conditions the model (names, spellings, style), as OpenAI's `prompt`; given to every 30 s window. */
  prompt?: string
  /** 0 (default) decodes greedily; above 0 samples at that temperature. */
  temperature?: number
  /** `'transcribe'` (default) keeps the spoken language; `'translate'` writes English. */
  task?: 'transcribe' | 'translate'
  /** Seed for sampling (temperature > 0), a whole number in [0, 2^32). */
  seed?: number
  /** Most tokens per 30 s window (default: until the model stops, at most its decoder length). */
  maxNewTokens?: number
  /** Container hint for file bytes (`'wav'`, `'mp3'`, a MIME type); the content is sniffed either way. */
  format?: string
  /** Rejects with an AbortError when aborted; the request's remaining decoding is dropped. */
  signal?: AbortSignal
}

/** One transcribed window (at most 30 s) of the audio. */
export interface TranscriptionSegment {
  id: number
  /** Seconds from the start of the audio. */
  start: number
  end: number
  text: string
  /** Generated token ids (without the final end-of-text token). */
  tokens: number[]
  /** Mean log-probability of the generated tokens. */
  avgLogprob: number
  temperature: number
}

/** What {@link Transcriber.transcribe} resolves to. */
export interface Transcription {
  /** The whole text: every segment's text joined with spaces. */
  text: string
  /** Language code used (given or detected), e.g. `'en'`. */
  language: string | null
  /** Its English name (`'english'`), as OpenAI's verbose_json reports it. */
  languageName: string | null
  /** Seconds of audio. */
  duration: number
  /** One per 30 s window: long audio is split at quiet points and each window transcribed. */
  segments: TranscriptionSegment[]
}

/** Facts about a loaded Whisper model. */
export interface TranscriberInfo {
  name: string
  /** The model folder. */
  path: string
  architecture: string
  /** False for English-only models (`*.en`). */
  multilingual: boolean
  /** Language codes the model knows. */
  languages: string[]
  /** Rate the audio is resampled to (16000). */
  samplingRate: number
  /** Decoder positions: prompt + generated tokens per 30 s window (448 for OpenAI's models). */
  maxTargetPositions: number
  device: string
}

const OPTION_KEYS = ['language', 'prompt', 'temperature', 'task', 'seed', 'maxNewTokens', 'format', 'signal'] as const
const LOAD_KEYS = ['model', 'device', 'dtype', 'maxBatch'] as const

const fail = (msg: string): never => {
  throw new ValidationError(msg)
}
const isObject = (x: unknown): x is Record<string, unknown> => typeof x === 'object' && x !== null && !Array.isArray(x)

function checkKeys(o: Record<string, unknown>, keys: readonly string[], what: string): void {
  for (const k of Object.keys(o)) if (!keys.includes(k)) fail(`unknown ${what} ${JSON.stringify(k)}`)
}

/** Whether `path` is a Whisper model folder (a {@link Transcriber} loads it; `Engine.load` does not). */
export function isWhisperModel(path: string): boolean {
  return bindingFor('cpu').binding.isWhisperModel(resolve(path))
}

/**
 * A loaded Whisper model. Concurrent {@link Transcriber.transcribe} calls
 * are decoded together in batches on one native thread; decoding the audio
 * file, resampling and features run on worker threads, never on the JS thread.
 */
export class Transcriber {
  readonly #native: NativeTranscriber
  readonly #info: TranscriberInfo
  #closed = false
  #nextId = 1

  private constructor(native: NativeTranscriber, path: string) {
    this.#native = native
    const i = native.info()
    this.#info = {
      name: i.name,
      path,
      architecture: i.architecture,
      multilingual: i.multilingual,
      languages: i.languages,
      samplingRate: i.samplingRate,
      maxTargetPositions: i.maxTargetPositions,
      device: i.device,
    }
  }

  /**
   * Load a Whisper model folder.
   * @throws {ValidationError} for bad options
   * @throws {LoadError} naming the problem when the folder cannot be loaded
   */
  static async load(options: TranscriberLoadOptions): Promise<Transcriber> {
    if (!isObject(options)) fail('Transcriber.load options must be an object like { model: "./whisper-tiny" }')
    checkKeys(options as unknown as Record<string, unknown>, LOAD_KEYS, 'Transcriber.load option')
    const { model, device = 'cpu', dtype, maxBatch } = options
    if (typeof model !== 'string' || model.trim() === '') fail('model must be the path of a Whisper model folder')
    if (!['cpu', 'cuda', 'auto'].includes(device)) fail(`device must be 'cpu', 'cuda' or 'auto', got ${JSON.stringify(device)}`)
    if (dtype !== undefined && !['auto', 'f32', 'f16', 'bf16'].includes(dtype)) {
      fail(`dtype must be 'auto', 'f32', 'f16' or 'bf16', got ${JSON.stringify(dtype)}`)
    }
    if (maxBatch !== undefined && !(Number.isInteger(maxBatch) && maxBatch >= 1 && maxBatch <= 1024)) {
      fail(`maxBatch must be a whole number from 1 to 1024, got ${String(maxBatch)}`)
    }
    const path = resolve(model)
    if (!existsSync(path)) throw new LoadError(`model path not found: ${model}`, { code: 'model_not_found' })
    const { binding, device: dev } = bindingFor(device)
    try {
      return new Transcriber(await binding.NativeTranscriber.load({ model: path, device: dev, dtype, maxBatch }), path)
    } catch (err) {
      throw fromNative(err, { invalid: (message, cause) => new LoadError(message, { code: 'load_failed', cause }) })
    }
  }

  /** Facts about the loaded model. */
  get info(): TranscriberInfo {
    return { ...this.#info, languages: [...this.#info.languages] }
  }

  /** Whether {@link Transcriber.close} was called. */
  get closed(): boolean {
    return this.#closed
  }

  /**
   * Transcribe speech. Audio longer than 30 s is split at quiet points into
   * windows of at most 30 s, each transcribed (together, in one batch) and
   * the texts joined.
   *
   * @throws {ValidationError} for bad options (unknown language, negative temperature, ...)
   * @throws {MediaError} for audio that is empty (`status` 400) or cannot be decoded (`status` 422)
   * @throws {AbortError} when `signal` aborts
   */
  async transcribe(audio: TranscriptionAudio, options: TranscribeOptions = {}): Promise<Transcription> {
    if (this.#closed) throw new ClosedError('the transcriber is closed')
    if (!isObject(options)) fail('transcribe options must be an object')
    checkKeys(options as Record<string, unknown>, OPTION_KEYS, 'transcribe option')
    const { language, prompt, temperature, task, seed, maxNewTokens, format, signal } = options
    for (const [k, v] of [['language', language], ['prompt', prompt], ['format', format]] as const) {
      if (v !== undefined && typeof v !== 'string') fail(`${k} must be a string, got ${typeof v}`)
    }
    if (temperature !== undefined && !(typeof temperature === 'number' && Number.isFinite(temperature) && temperature >= 0)) {
      fail(`temperature must be a number >= 0, got ${String(temperature)}`)
    }
    if (task !== undefined && task !== 'transcribe' && task !== 'translate') {
      fail(`task must be 'transcribe' or 'translate', got ${JSON.stringify(task)}`)
    }
    if (seed !== undefined && !(Number.isInteger(seed) && seed >= 0 && seed <= 0xffffffff)) {
      fail(`seed must be a whole number in [0, 2^32), got ${String(seed)}`)
    }
    if (maxNewTokens !== undefined && !(Number.isInteger(maxNewTokens) && maxNewTokens >= 1)) {
      fail(`maxNewTokens must be a whole number >= 1, got ${String(maxNewTokens)}`)
    }
    if (signal !== undefined && !(signal instanceof AbortSignal)) fail('signal must be an AbortSignal')
    if (signal?.aborted) throw abortErrorFor(signal)
    const id = this.#nextId
    this.#nextId = (this.#nextId % 0xfffffffe) + 1
    const request: NativeTranscribeRequest = { language, prompt, temperature, task, seed, maxNewTokens, format, id }
    Object.assign(request, await audioFields(audio))
    if (signal?.aborted) throw abortErrorFor(signal)
    const work = this.#native.transcribe(request).then(
      (r) => {
        if (r.error) throw inputError(r.error)
        if (!r.transcription) throw new InternalError('the transcriber resolved with neither a transcription nor an error')
        return toTranscription(r.transcription)
      },
      (err: unknown) => {
        throw fromNative(err)
      },
    )
    if (!signal) return work
    return new Promise<Transcription>((resolvePromise, reject) => {
      // Abort: the native side drops the request's windows; we reject at once.
      const onAbort = (): void => {
        this.#native.cancel(id)
        reject(abortErrorFor(signal))
      }
      signal.addEventListener('abort', onAbort, { once: true })
      work.then(resolvePromise, reject).finally(() => signal.removeEventListener('abort', onAbort))
    })
  }

  /** Decoder counters: windows encoded, batched steps, the largest batch so far. */
  stats(): { encoderRuns: number; steps: number; maxBatch: number; chunksFinished: number } {
    return { ...this.#native.stats() }
  }

  /** Finish the windows in flight and stop the decoding thread; later calls reject. */
  async close(): Promise<void> {
    if (this.#closed) return
    this.#closed = true
    await this.#native.close()
  }

  /** {@link Transcriber.close}, for `await using whisper = await Transcriber.load(...)`. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close()
  }
}

async function audioFields(audio: TranscriptionAudio): Promise<Partial<NativeTranscribeRequest>> {
  if (typeof audio === 'string') {
    let bytes: Buffer
    try {
      bytes = await readFile(audio)
    } catch (err) {
      throw new ValidationError(`cannot read audio file ${audio}: ${err instanceof Error ? err.message : String(err)}`)
    }
    return { audio: bytes }
  }
  if (audio instanceof Uint8Array) return { audio: Buffer.from(audio.buffer, audio.byteOffset, audio.byteLength) }
  if (audio instanceof ArrayBuffer) return { audio: Buffer.from(audio) }
  if (isObject(audio) && 'samples' in audio) {
    const { samples, sampleRate } = audio as { samples: unknown; sampleRate: unknown }
    const channels = samples instanceof Float32Array ? [samples] : samples
    if (!Array.isArray(channels) || channels.length === 0 || !channels.every((c) => c instanceof Float32Array)) {
      fail('samples must be a Float32Array or a non-empty array of Float32Array (one per channel)')
    }
    if (typeof sampleRate !== 'number' || !Number.isInteger(sampleRate) || sampleRate < 1) {
      fail(`sampleRate must be a positive whole number of Hz, got ${String(sampleRate)}`)
    }
    return { samples: channels as Float32Array[], sampleRate: sampleRate as number }
  }
  return fail('audio must be file bytes (Buffer / Uint8Array / ArrayBuffer), a file path, or { samples, sampleRate }')
}

function toTranscription(t: NativeTranscription): Transcription {
  return {
    text: t.text,
    language: t.language ?? null,
    languageName: t.languageName ?? null,
    duration: t.duration,
    segments: t.segments.map((s) => ({
      id: s.id,
      start: s.start,
      end: s.end,
      text: s.text,
      tokens: s.tokens,
      avgLogprob: s.avgLogprob,
      temperature: s.temperature,
    })),
  }
}
