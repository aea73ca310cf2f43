/**
 * {@link startServer}: listen first, then load the model. While it loads,
 * /health and /v1 answer 503, so orchestrators can tell "starting" from
 * "down", and a port that is taken fails at once rather than after a long
 * load. {@link createApp}: the same app without a listener, to mount in an
 * Express app of one's own.
 */

import { setMaxListeners } from 'node:events'
import { readFileSync } from 'node:fs'
import { createServer } from 'node:http'
import type { Server } from 'node:http'
import type { AddressInfo } from 'node:net'
import type { Duplex } from 'node:stream'

import type { Express } from 'express'

import type { Engine } from '../engine.js'
import { ValidationError } from '../errors.js'
import { isModelArgument, modelNotFound } from '../model-source.js'
import type { Transcriber } from '../transcriber.js'
import type { LoadOptions } from '../types.js'
import { validateLoadOptions } from '../validate.js'
import { buildApp } from './app.js'
import type { AppContext } from './context.js'
import { ApiError } from './errors.js'
import { createLogger, silentLogger } from './log.js'
import type { Logger } from './log.js'
import { ServerMetrics } from './metrics.js'
import type { ModelHost } from './model-host.js'
import { ModelPool } from './model-pool.js'
import type { LaunchSpec } from './model-pool.js'
import type { ToolCallParserName } from './tools.js'

/** Default body limit: 50 MiB, room for a few inline images. */
export const DEFAULT_MAX_BODY_BYTES = 50 * 1024 * 1024
/** Default SSE keep-alive: a comment after 15 s without a chunk. */
export const DEFAULT_KEEP_ALIVE_MS = 15_000
export { DEFAULT_LIMIT_MM_PER_PROMPT } from './model-pool.js'
/** Slow clients (slowloris): headers within 20 s, the body within 2 min. */
export const DEFAULT_HEADERS_TIMEOUT_MS = 20_000
export const DEFAULT_REQUEST_TIMEOUT_MS = 120_000
/** On close, requests in flight get this long to send their 503 before every connection is dropped. */
const CLOSE_GRACE_MS = 2_000

/** Options of {@link createApp}: the models and the API's settings. */
export interface AppOptions {
  /**
   * How to load the model (`model` defaults to the built-in default). Ignored
   * with `engine`. Left out with `models` given: only those are hosted.
   */
  load?: LoadOptions
  /** More models to host from the start, each its own engine, addressed by uid or served name. */
  models?: LaunchSpec[]
  /** Most models hosted at once; launching one more evicts the least recently used idle model. */
  maxLoadedModels?: number
  /** Bytes all hosted models may take (weights + KV budget); default: the memory available at each launch. */
  memoryBudgetBytes?: number
  /** Serve an engine that is already loaded; the caller keeps ownership and closes it. */
  engine?: Engine
  /** Names clients use in `model` (default: the model argument as given, else the model's name). */
  servedModelName?: string | string[]
  /** Require `Authorization: Bearer <apiKey>` on every /v1 route. */
  apiKey?: string
  /** Serve the web playground at `/` (default true; its API calls need `apiKey` too). */
  ui?: boolean
  /** Largest request body in bytes (default 50 MiB); larger ones get 413. */
  maxBodyBytes?: number
  /**
   * Bytes of decoded media (pixels, samples) all requests may hold at once;
   * one item may take half. Process-wide (it sets CANDELA_MEDIA_MEMORY_BUDGET),
   * read by the first media decode. Default: a quarter of RAM within 512 MiB..16 GiB.
   */
  mediaMemoryBudget?: number
  /** Send an SSE keep-alive comment after this many ms without a chunk (default 15000; 0 = never). */
  keepAliveMs?: number
  /** Where log lines go (default: stdout, JSON when it is not a TTY); `false` for none. */
  logger?: Logger | false
  /** One log line per request (default true). */
  logRequests?: boolean
  /** The format the model writes tool calls in (default: read off its chat template). */
  toolCallParser?: ToolCallParserName
  /** Progress lines while the model is fetched / loaded (default: the logger). */
  onLoadProgress?: (line: string) => void
}

/** Options of {@link startServer}: those of {@link createApp} and the listener's. */
export interface ServerOptions extends AppOptions {
  /** Interface to listen on (default `127.0.0.1`). */
  host?: string
  /** Port (default 8000; 0 picks a free one). */
  port?: number
  /** A client must send its request headers within this many ms (default 20000), else 408 and the connection closes. */
  headersTimeoutMs?: number
  /** ... and its whole request, body included, within this many ms (default 120000); responses are not limited. */
  requestTimeoutMs?: number
}

/** The OpenAI-compatible API as an Express app, with the models it serves. */
export interface CandelaApp {
  /** Mount it where you like: `yourApp.use('/llm', candela.app)` serves `/llm/v1/chat/completions`. */
  readonly app: Express
  /**
   * Resolves with the first model's engine (a Transcriber for a Whisper
   * model; undefined with no model) once every model launched with the
   * server is loaded; rejects when one fails.
   */
  readonly ready: Promise<Engine | Transcriber | undefined>
  /** The hosted models: launch, list, terminate. */
  readonly models: ModelPool
  /** The (first) engine, once loaded. */
  readonly engine: Engine | undefined
  /** The Whisper model, once loaded, when the served model is one (/v1/audio/transcriptions). */
  readonly transcriber: Transcriber | undefined
  /** The names the model is served under (empty until it is loaded). */
  readonly modelNames: readonly string[]
  /** End requests in flight with a 503 (or an error event on a stream) and close the engines this app loaded. */
  close(): Promise<void>
}

export interface CandelaServer extends CandelaApp {
  /** `http://host:port`; the OpenAI base URL is this plus `/v1`. */
  readonly url: string
  readonly host: string
  readonly port: number
  readonly httpServer: Server
  /** Stop listening, end requests in flight with a 503 (or an error event on a stream), drop the connections left and close the engines this server loaded. */
  close(): Promise<void>
}

function packageVersion(): string {
  try {
    const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version?: string }
    return pkg.version ?? 'unknown'
  } catch {
    return 'unknown'
  }
}

function listenError(err: NodeJS.ErrnoException, host: string, port: number): Error {
  const where = `${host}:${port}`
  switch (err.code) {
    case 'EADDRINUSE':
      return new Error(`cannot listen on ${where}: the port is already in use (pick another with --port)`)
    case 'EACCES':
      return new Error(`cannot listen on ${where}: permission denied (ports below 1024 need privileges)`)
    case 'EADDRNOTAVAIL':
    case 'ENOTFOUND':
      return new Error(`cannot listen on ${where}: no such address on this machine`)
    default:
      return new Error(`cannot listen on ${where}: ${err.message}`)
  }
}

/**
 * A request the HTTP parser refused (headers over Node's 16 KiB, a client
 * too slow, bytes that are not HTTP) gets a status in OpenAI's error shape;
 * the rest of what the client sends is read and dropped for a moment, so
 * closing does not reset the connection before the client reads the answer.
 */
function answerClientError(err: NodeJS.ErrnoException, socket: Duplex): void {
  if (!socket.writable) {
    socket.destroy()
    return
  }
  const [status, reason, message] =
    err.code === 'HPE_HEADER_OVERFLOW'
      ? [431, 'Request Header Fields Too Large', 'the request headers are larger than the server accepts (16 KiB)']
      : err.code === 'ERR_HTTP_REQUEST_TIMEOUT'
        ? [408, 'Request Timeout', 'the request was not received in time']
        : [400, 'Bad Request', 'the request is not valid HTTP']
  const body = JSON.stringify(new ApiError(status, message).toJSON())
  socket.end(
    `HTTP/1.1 ${status} ${reason}\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`,
  )
  socket.resume()
  setTimeout(() => socket.destroy(), 1000).unref()
}

function checkPort(port: number): number {
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new Error(`port must be an integer in 0-65535, got ${port}`)
  return port
}

/** An app built but not yet serving: its models are launched by {@link launch}. */
interface Prepared {
  app: Express
  models: ModelPool
  startup: LaunchSpec[]
  /** Aborted on close: every request in flight ends with a 503. */
  stopping: AbortController
}

/** Check the options (bad load options and a missing model fail here) and build the app. */
function prepare(options: AppOptions): Prepared {
  // The model of `load` (or `engine`) comes first; without it, `models` alone (none at all is allowed).
  const startup: LaunchSpec[] = []
  const servedModelName = typeof options.servedModelName === 'string' ? [options.servedModelName] : options.servedModelName
  const names = servedModelName !== undefined && servedModelName.length > 0 ? servedModelName : undefined
  if (options.engine) {
    const given = options.load?.model
    startup.push({ engine: options.engine, servedModelName: names ?? (given !== undefined && given !== 'default' ? [given] : undefined) })
  } else if (options.load !== undefined || options.models === undefined) {
    const { model, ...load } = options.load ?? {}
    startup.push({ model: model ?? 'default', load, servedModelName: names })
  }
  startup.push(...(options.models ?? []))
  for (const spec of startup) {
    if (spec.engine) continue
    validateLoadOptions({ ...spec.load, model: spec.model })
    if (!isModelArgument(spec.model)) throw modelNotFound(spec.model!)
  }
  if (options.mediaMemoryBudget !== undefined) {
    if (!Number.isSafeInteger(options.mediaMemoryBudget) || options.mediaMemoryBudget <= 0) {
      throw new ValidationError(`mediaMemoryBudget must be a positive number of bytes, got ${options.mediaMemoryBudget}`)
    }
    process.env.CANDELA_MEDIA_MEMORY_BUDGET = String(options.mediaMemoryBudget)
  }
  const log = options.logger === false ? silentLogger : (options.logger ?? createLogger())
  const models = new ModelPool({
    log,
    progress: options.onLoadProgress ?? ((l) => log.info(l)),
    maxLoadedModels: options.maxLoadedModels,
    memoryBudgetBytes: options.memoryBudgetBytes,
  })
  const metrics = new ServerMetrics(() => models.stats(), () => models.engines())
  const stopping = new AbortController()
  // Every request in flight listens for the shutdown.
  setMaxListeners(0, stopping.signal)
  const ctx: AppContext = {
    models,
    metrics,
    log,
    apiKey: options.apiKey,
    maxBodyBytes: options.maxBodyBytes ?? DEFAULT_MAX_BODY_BYTES,
    keepAliveMs: options.keepAliveMs ?? DEFAULT_KEEP_ALIVE_MS,
    logRequests: options.logRequests ?? true,
    toolCallParser: options.toolCallParser,
    version: packageVersion(),
    ui: options.ui ?? true,
    stopping: stopping.signal,
  }
  return { app: buildApp(ctx), models, startup, stopping }
}

type Launched = Array<{ host: ModelHost; ready: Promise<Engine | Transcriber> }>

/** Launch the startup models (they load in the background); on a refusal, close the pool and throw. */
async function launch(p: Prepared): Promise<Launched> {
  const launched: Launched = []
  try {
    for (const spec of p.startup) launched.push(await p.models.launch(spec, true))
  } catch (err) {
    await p.models.close()
    throw err instanceof ApiError ? new Error(err.message) : err
  }
  return launched
}

/** Settles once every model launched here has; resolves with the first one's engine. */
function allReady(launched: Launched): Promise<Engine | Transcriber | undefined> {
  const ready = Promise.all(launched.map((l) => l.ready)).then((engines) => engines[0])
  // A caller that never awaits `ready` still sees the failure on /health; no unhandled rejection.
  ready.catch(() => {})
  return ready
}

/**
 * The OpenAI-compatible API as an Express app, to mount in an app of your
 * own (under a prefix of its own: the app answers every path below it).
 * Resolves once the models are launched; they load in the background
 * (`ready`).
 *
 * @example
 * ```ts
 * const candela = await createApp({ load: { model: 'default' } })
 * const app = express()
 * app.use('/llm', candela.app) // OpenAI base URL: http://host:port/llm/v1
 * app.listen(3000)
 * ```
 */
export async function createApp(options: AppOptions = {}): Promise<CandelaApp> {
  const p = prepare(options)
  const launched = await launch(p)
  const first = launched[0]
  let closing: Promise<void> | undefined
  return {
    app: p.app,
    ready: allReady(launched),
    models: p.models,
    get engine() {
      return first?.host.loaded
    },
    get transcriber() {
      return first?.host.loadedTranscriber
    },
    get modelNames() {
      return first?.host.names ?? []
    },
    close() {
      closing ??= (async () => {
        p.stopping.abort()
        await p.models.close()
        await Promise.allSettled(launched.map((l) => l.ready))
      })()
      return closing
    },
  }
}

/**
 * Start the OpenAI-compatible server. Resolves once it listens; the models
 * load in the background (`ready`). `load` (or the default model) and
 * `models` are hosted from the start; more can be launched at run time
 * (`server.models.launch`, POST /v1/instances).
 *
 * @example
 * ```ts
 * const server = await startServer({ load: { model: 'default' }, port: 8000 })
 * await server.ready
 * // POST http://127.0.0.1:8000/v1/chat/completions
 * await server.close()
 * ```
 */
export async function startServer(options: ServerOptions = {}): Promise<CandelaServer> {
  const p = prepare(options)
  const { app, models, stopping } = p
  const hostName = options.host ?? '127.0.0.1'
  const port = checkPort(options.port ?? 8000)
  const requestTimeout = options.requestTimeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS
  const headersTimeout = Math.min(options.headersTimeoutMs ?? DEFAULT_HEADERS_TIMEOUT_MS, requestTimeout)
  const httpServer = createServer(
    // Node checks the timeouts every connectionsCheckingInterval ms (30 s by default).
    { headersTimeout, requestTimeout, connectionsCheckingInterval: Math.min(1000, headersTimeout) },
    app,
  )
  httpServer.on('clientError', answerClientError)
  await new Promise<void>((resolve, reject) => {
    httpServer.once('error', (err) => reject(listenError(err, hostName, port)))
    httpServer.listen(port, hostName, () => resolve())
  })
  const bound = (httpServer.address() as AddressInfo).port
  const urlHost = hostName.includes(':') ? `[${hostName}]` : hostName

  let launched: Launched
  try {
    launched = await launch(p)
  } catch (err) {
    await new Promise<void>((resolve) => httpServer.close(() => resolve()))
    throw err
  }
  const first = launched[0]
  const ready = allReady(launched)

  let closing: Promise<void> | undefined
  return {
    url: `http://${urlHost}:${bound}`,
    host: hostName,
    port: bound,
    httpServer,
    app,
    ready,
    models,
    get engine() {
      return first?.host.loaded
    },
    get transcriber() {
      return first?.host.loadedTranscriber
    },
    get modelNames() {
      return first?.host.names ?? []
    },
    close() {
      closing ??= (async () => {
        const pending = models.close()
        await new Promise<void>((resolve) => {
          httpServer.close(() => resolve())
          // Requests in flight abort now (freeing their KV blocks) and answer
          // 503 or, on an open stream, an error event; whatever is still open
          // after the grace (a client that sends nothing) is dropped.
          stopping.abort()
          httpServer.closeIdleConnections()
          setTimeout(() => httpServer.closeAllConnections(), CLOSE_GRACE_MS).unref()
        })
        await pending
        await Promise.allSettled(launched.map((l) => l.ready))
      })()
      return closing
    },
  }
}
