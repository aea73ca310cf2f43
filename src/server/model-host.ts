/**
 * The model behind the server and its life: loading (the server already
 * listens and answers 503), ready, failed, closed. Routes ask it for the
 * engine and for the served name a request's `model` field refers to.
 */

import type { Engine } from '../engine.js'
import type { Transcriber } from '../transcriber.js'
import { ApiError } from './errors.js'

export type HostState = 'loading' | 'ready' | 'failed' | 'closed'

export class ModelHost {
  #state: HostState = 'loading'
  #engine: Engine | undefined
  /** Set instead of the engine when the served model is a Whisper model. */
  #transcriber: Transcriber | undefined
  #names: string[] = []
  #failure = ''
  readonly createdAt = Math.floor(Date.now() / 1000)

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
  }

  /** 503 unless the model is ready to take requests. */
  unavailable(): ApiError | undefined {
    switch (this.#state) {
      case 'ready':
        return undefined
      case 'loading':
        return new ApiError(503, 'the model is still loading; try again shortly', { code: 'model_loading' })
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
    throw new ApiError(404, `The model \`${requested}\` does not exist. Served: ${this.#names.join(', ')}`, {
      param: 'model',
      code: 'model_not_found',
    })
  }
}
