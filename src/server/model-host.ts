/**
 * One model the server hosts and its life: loading (downloading its files,
 * then loading them; the server already listens and answers 503 with
 * Retry-After), ready, failed, closed. Routes ask it for the engine and for
 * the served name a request's `model` field refers to. A server hosts one
 * or several (see ModelPool), each known by its uid.
 */

import type { Engine } from '../engine.js'
import type { DownloadProgress } from '../hub/index.js'
import type { Transcriber } from '../transcriber.js'
import type { LoadProgress } from '../types.js'
import { ApiError } from './errors.js'

export type HostState = 'loading' | 'ready' | 'failed' | 'closed'

/** Seconds a client is asked to wait before retrying a model that is still loading. */
const RETRY_AFTER_S = 2

export class ModelHost {
  #state: HostState = 'loading'
  #phase: 'downloading' | 'loading' = 'loading'
  #engine: Engine | undefined
  /** Set instead of the engine when the served model is a Whisper model. */
  #transcriber: Transcriber | undefined
  #names: string[] = []
  #failure = ''
  readonly #files = new Map<string, { downloaded: number; total: number }>()
  #weights: LoadProgress | undefined
  readonly createdAt = Math.floor(Date.now() / 1000)
  /** When a request last used the model (ms since epoch): the LRU order of eviction. */
  lastUsed = Date.now()
  /** Estimated bytes the model takes (weights + KV budget), once known. */
  estimateBytes: number | undefined
  /** Aborted when the model is terminated: stops its download. */
  readonly #terminated = new AbortController()

  constructor(
    /** The id the model is launched, described and terminated by. */
    readonly uid: string,
    /** The model argument as given (path, repo id or 'default'). */
    readonly model: string,
  ) {}

  /** A request chose this model. */
  touch(): void {
    this.lastUsed = Date.now()
  }

  /** No request running or waiting: it may be evicted. */
  get idle(): boolean {
    const s = this.#engine && !this.#engine.closed ? this.#engine.stats() : undefined
    return !s || s.running + s.waiting === 0
  }

  /** A hub download's progress (the pool feeds it). */
  onDownload(p: DownloadProgress): void {
    this.#phase = 'downloading'
    this.#files.set(p.file, { downloaded: p.downloaded, total: p.total })
  }

  /** Files are local; the weights are being read. */
  setLoadingWeights(): void {
    this.#phase = 'loading'
  }

  /** How far the weights' load (and quantization) has got (the pool feeds it). */
  onLoadProgress(p: LoadProgress): void {
    this.#weights = p
  }

  /** The control plane's view of the model (GET /v1/instances/:uid). */
  describe(): Record<string, unknown> {
    let downloaded = 0
    let total = 0
    for (const f of this.#files.values()) {
      downloaded += f.downloaded
      total += f.total
    }
    const info = this.#engine?.info
    return {
      uid: this.uid,
      model: this.model,
      status: this.#state === 'loading' ? this.#phase : this.#state,
      served_model_names: this.#names.length > 0 ? [...this.#names] : [this.uid],
      created: this.createdAt,
      last_used: Math.floor(this.lastUsed / 1000),
      ...(this.#files.size > 0 ? { download: { downloaded_bytes: downloaded, total_bytes: total, files: this.#files.size } } : {}),
      ...(this.#weights ? { load: { loaded_parameters: this.#weights.loadedParameters, total_parameters: this.#weights.totalParameters } } : {}),
      ...(this.estimateBytes !== undefined ? { estimated_bytes: this.estimateBytes } : {}),
      ...(this.#state === 'failed' ? { error: this.#failure } : {}),
      ...(info
        ? {
            path: info.path,
            architecture: info.architecture,
            device: info.device,
            max_model_len: info.maxModelLen,
            modalities: info.modalities,
            load_seconds: info.loadSeconds,
            anon_rss_bytes: info.anonRssBytes,
          }
        : {}),
      ...(this.#transcriber ? { path: this.#transcriber.info.path, task: 'transcription' } : {}),
    }
  }

  get state(): HostState {
    return this.#state
  }

  /** The engine once loaded (also while closing), else undefined. */
  get loaded(): Engine | undefined {
    return this.#engine
  }

  /** Names the model answers to; the first is the one responses report. */
  get names(): readonly string[] {
    return this.#names
  }

  setReady(engine: Engine, names: string[]): void {
    if (this.#state === 'closed') return
    this.#engine = engine
    this.#names = names
    this.#state = 'ready'
  }

  /** Serve a Whisper model: /v1/audio/transcriptions answers, text routes refuse. */
  setReadyTranscriber(transcriber: Transcriber, names: string[]): void {
    if (this.#state === 'closed') return
    this.#transcriber = transcriber
    this.#names = names
    this.#state = 'ready'
  }

  /** The Whisper model once loaded, else undefined. */
  get loadedTranscriber(): Transcriber | undefined {
    return this.#transcriber
  }

  /** The Whisper model, or the 503 / 400 that explains why there is none. */
  transcriber(): Transcriber {
    const err = this.unavailable()
    if (err) throw err
    if (!this.#transcriber) {
      throw new ApiError(400, `the model ${this.#names[0]} does not transcribe audio (serve a Whisper model for /v1/audio/*)`, {
        param: 'model',
        code: 'model_not_supported',
      })
    }
    return this.#transcriber
  }

  setFailed(err: unknown): void {
    if (this.#state === 'closed') return
    this.#state = 'failed'
    this.#failure = err instanceof Error ? err.message : String(err)
  }

  setClosed(): void {
    this.#state = 'closed'
    this.#terminated.abort(new Error(`model ${this.uid} was terminated`))
  }

  /** Aborted once the model is closed. */
  get closedSignal(): AbortSignal {
    return this.#terminated.signal
  }

  /** 503 unless the model is ready to take requests. */
  unavailable(): ApiError | undefined {
    switch (this.#state) {
      case 'ready':
        return undefined
      case 'loading':
        return new ApiError(503, `the model ${this.uid} is still loading; try again shortly`, {
          code: 'model_loading',
          retryAfter: RETRY_AFTER_S,
        })
      case 'failed':
        return new ApiError(503, `the model failed to load: ${this.#failure}`, { code: 'model_load_failed' })
      case 'closed':
        return new ApiError(503, 'the server is shutting down', { code: 'shutting_down' })
    }
  }

  /** The engine, or the 503 that explains why there is none. */
  engine(): Engine {
    const err = this.unavailable()
    if (err) throw err
    if (this.#transcriber) {
      throw new ApiError(400, `the model ${this.#names[0]} is a speech-recognition (Whisper) model; use POST /v1/audio/transcriptions`, {
        param: 'model',
        code: 'model_not_supported',
      })
    }
    return this.#engine!
  }

  /** The served name a request's `model` addresses (the first one when it names none); 404 otherwise. */
  resolveModel(requested: string | null | undefined): string {
    const unavailable = this.unavailable()
    if (unavailable) throw unavailable
    if (requested === null || requested === undefined || requested === '') return this.#names[0]!
    if (this.#names.includes(requested)) return requested
    if (requested === this.uid) return this.#names[0]!
    throw new ApiError(404, `The model \`${requested}\` does not exist. Served: ${this.#names.join(', ')}`, {
      param: 'model',
      code: 'model_not_found',
    })
  }
}
