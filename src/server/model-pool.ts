/**
 * The models a server hosts, each its own engine (own KV pool and limits),
 * by uid. A launch is checked at once (options, model argument, duplicate
 * uid, memory, the loaded-model cap) and then downloads and loads in the
 * background; requests are routed by their `model` field to a model's uid
 * or served names. With a cap on loaded models, the least recently used
 * idle one makes room (as llama-server's router does).
 */

import { existsSync } from 'node:fs'
import { resolve } from 'node:path'

import { defaultModelPath } from '../default-model.js'
import { Engine } from '../engine.js'
import { ValidationError } from '../errors.js'
import { HubError, UnsupportedRepoError, checkModel, findModel, isHubReference, progressLines } from '../hub/index.js'
import { isModelArgument, locateModel, modelNotFound, notAModel } from '../model-source.js'
import { Transcriber, isWhisperModel } from '../transcriber.js'
import type { EngineStats, LoadOptions, LoadProgress } from '../types.js'
import { validateLoadOptions } from '../validate.js'
import { ApiError } from './errors.js'
import type { Logger } from './log.js'
import { availableMemory, checkpointBytes, defaultKvBytes, doesNotFit, formatBytes } from './memory.js'
import { ModelHost } from './model-host.js'

/** What to launch. */
/**
 * Most media items per prompt of a served model unless its
 * `limitMmPerPrompt` says otherwise (the library has no default): each item
 * may cost its decoded size in memory.
 */
export const DEFAULT_LIMIT_MM_PER_PROMPT = { image: 10, video: 2, audio: 5 } as const

export interface LaunchSpec {
  /** A model folder, `.gguf` file, Hugging Face repo id, or 'default' (the default). */
  model?: string
  /** The id to address it by (default: the first served name, else `model` as given). */
  uid?: string
  /** Names clients put in `model` (default: the uid; for the default model, its own name). */
  servedModelName?: string[]
  /** Engine options (`model` is ignored here). */
  load?: Omit<LoadOptions, 'model'>
  /** Host this engine, already loaded; its owner closes it. */
  engine?: Engine
}

export interface PoolOptions {
  log: Logger
  /** Progress lines while models are fetched and loaded. */
  progress: (line: string) => void
  /** Most models hosted at once; a launch beyond it evicts the least recently used idle one. */
  maxLoadedModels?: number
  /** Bytes all models may take together (default: the memory available at each launch). */
  memoryBudgetBytes?: number
}

/** Load progress as log lines: one per tenth of the parameters. */
function loadProgressLines(uid: string, write: (line: string) => void): (p: LoadProgress) => void {
  let tenths = -1
  return (p) => {
    const t = p.totalParameters > 0 ? Math.floor((10 * p.loadedParameters) / p.totalParameters) : 10
    if (t <= tenths) return
    tenths = t
    write(`loading ${uid}: ${t * 10}% of ${(p.totalParameters / 1e9).toFixed(2)} B parameters`)
  }
}

const COUNTERS = [
  'promptTokens',
  'generationTokens',
  'preemptions',
  'requestsFinished',
  'steps',
  'prefixCacheQueries',
  'prefixCacheHits',
  'encoderRuns',
  'encoderCacheQueries',
  'encoderCacheHits',
  'processorCacheQueries',
  'processorCacheHits',
] as const satisfies ReadonlyArray<keyof EngineStats>

const badLaunch = (message: string, code: string, param: string | null = null): ApiError => new ApiError(400, message, { code, param })

/**
 * A model argument that cannot be loaded is refused at launch, not after a
 * download: a local path must look like a model; a repo must exist, be
 * readable and hold a checkpoint candela loads (its listing says so).
 */
async function checkModelArgument(model: string): Promise<void> {
  if (model === 'default') return
  if (existsSync(resolve(model))) {
    const why = notAModel(model)
    if (why) throw badLaunch(why, 'invalid_model', 'model')
    return
  }
  if (!isHubReference(model)) return
  try {
    await checkModel(model)
  } catch (err) {
    if (err instanceof UnsupportedRepoError) throw badLaunch(err.message, 'unsupported_model', 'model')
    if (!(err instanceof HubError)) throw err
    if (err.code === 'network') throw new ApiError(502, err.message, { code: 'hub_unreachable', param: 'model' })
    throw badLaunch(err.message, err.code === 'not_found' ? 'model_not_found' : err.code === 'gated' ? 'gated_repo' : 'model_not_cached', 'model')
  }
}

export class ModelPool {
  readonly #hosts = new Map<string, ModelHost>()
  /** Uids launched with the server: /health waits for them. */
  readonly #startup = new Set<string>()
  /** Hosts whose engine the pool loaded (and so closes). */
  readonly #owned = new WeakSet<ModelHost>()
  /** Counters of terminated models, so the server's totals never go back. */
  readonly #retired: Partial<Record<(typeof COUNTERS)[number], number>> = {}
  #closed = false

  constructor(private readonly opts: PoolOptions) {}

  /** Hosted models, in launch order. */
  list(): ModelHost[] {
    return [...this.#hosts.values()]
  }

  /** The model with this uid; 404 otherwise. */
  get(uid: string): ModelHost {
    const host = this.#hosts.get(uid)
    if (!host) throw new ApiError(404, `no model with uid ${JSON.stringify(uid)} (launched: ${this.#uids()})`, { param: 'uid', code: 'model_not_found' })
    return host
  }

  #uids(): string {
    return this.#hosts.size > 0 ? [...this.#hosts.keys()].join(', ') : 'none'
  }

  /**
   * Launch a model: checked now (a 4xx for bad options, an unknown model, a
   * taken uid, too little memory), loaded in the background. `ready`
   * settles when it is loaded or has failed.
   */
  async launch(spec: LaunchSpec, startup = false): Promise<{ host: ModelHost; ready: Promise<Engine | Transcriber> }> {
    const model = spec.model ?? 'default'
    const load = {
      ...spec.load,
      limitMmPerPrompt: { ...DEFAULT_LIMIT_MM_PER_PROMPT, ...spec.load?.limitMmPerPrompt },
      model,
    } as LoadOptions
    if (!spec.engine) {
      try {
        validateLoadOptions(load)
      } catch (err) {
        if (err instanceof ValidationError) throw badLaunch(err.message, 'invalid_option')
        throw err
      }
      if (!isModelArgument(model)) throw badLaunch(modelNotFound(model).message, 'model_not_found', 'model')
      await checkModelArgument(model)
    }
    const weights = spec.engine ? undefined : await this.#knownWeightBytes(model)
    // From here on nothing awaits: two launches of one uid cannot both pass the check.
    if (this.#closed) throw new ApiError(503, 'the server is shutting down', { code: 'shutting_down' })
    const uid = spec.uid ?? spec.servedModelName?.[0] ?? (model === 'default' && spec.engine ? spec.engine.info.name : model)
    // eslint-disable-next-line no-control-regex -- a uid with control characters is refused
    if (uid.trim() === '' || uid.length > 256 || /[\u0000-\u001f]/.test(uid)) throw badLaunch(`uid must be 1-256 printable characters, got ${JSON.stringify(uid)}`, 'invalid_uid', 'uid')
    const taken = this.#find(uid) ?? spec.servedModelName?.map((n) => this.#find(n)).find((h) => h !== undefined)
    if (taken) throw badLaunch(`a model is already launched as ${JSON.stringify(uid)} (uid ${taken.uid}); terminate it first or pick another uid`, 'model_exists', 'uid')
    const kv = this.#kvBytes(load)
    // In system memory only: on a GPU the engine sizes its KV cache from the device's free memory and refuses itself.
    const inRam = (load.device ?? 'cpu') === 'cpu'
    if (weights !== undefined && inRam) this.#checkFit(uid, weights, kv.bytes, kv.available)
    this.#makeRoom(uid)

    const host = new ModelHost(uid, model)
    if (weights !== undefined) host.estimateBytes = weights + kv.bytes
    this.#hosts.set(uid, host)
    if (startup) this.#startup.add(uid)
    const names = (fallback: string): string[] => spec.servedModelName ?? [spec.uid ?? (model === 'default' ? fallback : model)]
    const ready = (spec.engine ? Promise.resolve(spec.engine) : this.#load(host, load, weights === undefined && inRam))
      .then((engine) => {
        if (host.state === 'closed') {
          // Terminated while it loaded.
          if (!spec.engine) void engine.close()
          return engine
        }
        if (!spec.engine) this.#owned.add(host)
        if (engine instanceof Transcriber) host.setReadyTranscriber(engine, names(engine.info.name))
        else host.setReady(engine, names(engine.info.name))
        const kv = engine instanceof Transcriber ? '' : ` (KV cache ${formatBytes(engine.info.kvCacheBytes)}, ${engine.info.kvCacheTokens} tokens)`
        this.opts.log.info(`model ${uid} ready${kv}`, { model })
        return engine
      })
      .catch((err: unknown) => {
        if (host.state === 'closed') throw err
        host.setFailed(err)
        this.opts.log.error(`model ${uid} failed to load`, { model, error: err instanceof Error ? err.message : String(err) })
        throw err
      })
    ready.catch(() => {})
    return { host, ready }
  }

  async #load(host: ModelHost, load: LoadOptions, checkFitAfterDownload: boolean): Promise<Engine | Transcriber> {
    const lines = progressLines(this.opts.progress)
    const source = await locateModel(load.model, {
      log: this.opts.progress,
      signal: host.closedSignal,
      onDownloadProgress: (p) => {
        host.onDownload(p)
        load.onDownloadProgress?.(p)
        lines(p)
      },
    })
    if (checkFitAfterDownload && host.state === 'loading') {
      const weights = checkpointBytes(source.path)
      const kv = this.#kvBytes(load, host)
      host.estimateBytes = weights + kv.bytes
      const why = doesNotFit(`model ${host.uid}`, { weights, kv: kv.bytes, available: kv.available })
      if (why) throw new Error(why)
    }
    host.setLoadingWeights()
    if (host.state !== 'loading') throw new Error('terminated while loading')
    if (isWhisperModel(source.path)) return Transcriber.load({ model: source.path, device: load.device, dtype: load.dtype })
    // A hub model is complete in the cache now: Engine.load finds it there without a request.
    const weightLines = loadProgressLines(host.uid, this.opts.progress)
    return Engine.load({
      ...load,
      model: source.repo ? load.model : source.path,
      onLoadProgress: (p) => {
        host.onLoadProgress(p)
        load.onLoadProgress?.(p)
        weightLines(p)
      },
    })
  }

  /** Weight bytes of a model whose files are here (a path, the fetched default, a complete cached repo); no request. */
  async #knownWeightBytes(model: string): Promise<number | undefined> {
    try {
      if (model === 'default') return checkpointBytes(defaultModelPath())
      if (existsSync(resolve(model))) return checkpointBytes(resolve(model))
      return checkpointBytes((await findModel(model, { settings: { offline: true } })).path)
    } catch {
      return undefined
    }
  }

  /** The KV budget of a launch and the memory it may use (a budget less the other models' estimates, else what is free). */
  #kvBytes(load: LoadOptions, self?: ModelHost): { bytes: number; available: number } {
    let available = availableMemory()
    if (this.opts.memoryBudgetBytes !== undefined) {
      const others = this.list().filter((h) => h !== self).reduce((acc, h) => acc + (h.estimateBytes ?? 0), 0)
      available = Math.max(0, this.opts.memoryBudgetBytes - others)
    }
    return { bytes: load.kvCacheBytes ?? defaultKvBytes(available), available }
  }

  #checkFit(uid: string, weights: number, kv: number, available: number): void {
    const why = doesNotFit(`model ${uid}`, { weights, kv, available })
    if (why) throw badLaunch(why, 'insufficient_memory')
  }

  /** Under a cap on hosted models: evict the least recently used idle one, or refuse. */
  #makeRoom(uid: string): void {
    const max = this.opts.maxLoadedModels
    if (max === undefined || this.#hosts.size < max) return
    const victim = this.list()
      .filter((h) => h.state !== 'loading' && h.idle)
      .sort((a, b) => a.lastUsed - b.lastUsed)[0]
    if (!victim) {
      throw new ApiError(503, `cannot launch ${uid}: ${this.#hosts.size} models are hosted (--max-loaded-models ${max}) and none is idle`, {
        code: 'too_many_models',
        retryAfter: 5,
      })
    }
    this.opts.log.info(`evicting model ${victim.uid} (least recently used) to launch ${uid}`)
    void this.terminate(victim.uid)
  }

  #find(name: string): ModelHost | undefined {
    return this.#hosts.get(name) ?? this.list().find((h) => h.names.includes(name))
  }

  /** The model a request's `model` field addresses (the first hosted one when it names none); 404 otherwise. */
  select(requested: string | null | undefined): ModelHost {
    const host = requested === null || requested === undefined || requested === '' ? this.list()[0] : this.#find(requested)
    if (!host) {
      if (this.#closed) throw new ApiError(503, 'the server is shutting down', { code: 'shutting_down' })
      const served = this.list().flatMap((h) => (h.names.length > 0 ? h.names : [h.uid]))
      const message =
        requested === null || requested === undefined || requested === ''
          ? 'no model is hosted; launch one with POST /v1/instances'
          : `The model \`${requested}\` does not exist. Served: ${served.length > 0 ? served.join(', ') : 'none'}`
      throw new ApiError(404, message, { param: 'model', code: 'model_not_found' })
    }
    host.touch()
    return host
  }

  /** 503 while a model launched with the server is not ready. */
  unavailable(): ApiError | undefined {
    if (this.#closed) return new ApiError(503, 'the server is shutting down', { code: 'shutting_down' })
    for (const uid of this.#startup) {
      const err = this.#hosts.get(uid)?.unavailable()
      if (err) return err
    }
    return undefined
  }

  /** Stop hosting a model and close its engine (a loading one is closed once loaded). */
  async terminate(uid: string): Promise<void> {
    const host = this.get(uid)
    this.#hosts.delete(uid)
    this.#startup.delete(uid)
    const engine = host.loaded
    if (engine && !engine.closed) {
      const s = engine.stats()
      for (const k of COUNTERS) this.#retired[k] = (this.#retired[k] ?? 0) + s[k]
    }
    host.setClosed()
    if (this.#owned.has(host)) await (engine ?? host.loadedTranscriber)?.close()
  }

  /** Each loaded engine with the name responses report for it (vLLM's `model_name` label). */
  engines(): Array<{ name: string; engine: Engine }> {
    return this.list().flatMap((h) => {
      const e = h.loaded
      return e !== undefined && !e.closed ? [{ name: h.names[0] ?? h.uid, engine: e }] : []
    })
  }

  /** The engines' counters summed (terminated models' included), or undefined with no engine. */
  stats(): EngineStats | undefined {
    const live = this.list()
      .map((h) => h.loaded)
      .filter((e): e is Engine => e !== undefined && !e.closed)
      .map((e) => e.stats())
    if (live.length === 0 && Object.keys(this.#retired).length === 0) return undefined
    const sum: Record<string, number> = {}
    for (const s of live) for (const [k, v] of Object.entries(s)) sum[k] = (sum[k] ?? 0) + v
    for (const [k, v] of Object.entries(this.#retired)) sum[k] = (sum[k] ?? 0) + v
    return sum as unknown as EngineStats
  }

  /** Close every model the pool loaded. */
  async close(): Promise<void> {
    this.#closed = true
    await Promise.all(this.list().map((h) => this.terminate(h.uid).catch(() => {})))
  }
}
