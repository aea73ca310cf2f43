/**
 * `candela launch | list | terminate`: the control plane of a running
 * `candela serve` (its /v1/instances routes), by uid. Model options are the
 * serve command's Model, Engine and Multimodal flags; the server parses
 * them as it parses its own.
 */

import type { Options, Values } from './usage.js'
import { UsageError } from './usage.js'
import type { Command } from './usage.js'
import { MODEL_FLAGS } from './serve.js'

const CONNECT_OPTIONS: Options = {
  url: { type: 'string' },
  'api-key': { type: 'string' },
}

const CONNECT_HELP = `  --url URL                  the server (default: $CANDELA_URL, else http://127.0.0.1:8000)
  --api-key KEY              its API key (default: $CANDELA_API_KEY)`

interface Instance {
  uid: string
  model: string
  status: string
  served_model_names?: string[]
  download?: { downloaded_bytes: number; total_bytes: number }
  error?: string
}

async function call(values: Values, method: string, path: string, body?: object): Promise<unknown> {
  const base = String(values.url ?? process.env.CANDELA_URL ?? 'http://127.0.0.1:8000').replace(/\/+$/, '')
  const key = (values['api-key'] as string | undefined) ?? process.env.CANDELA_API_KEY
  let res: Response
  try {
    res = await fetch(`${base}${path}`, {
      method,
      headers: { ...(body ? { 'content-type': 'application/json' } : {}), ...(key ? { authorization: `Bearer ${key}` } : {}) },
      ...(body ? { body: JSON.stringify(body) } : {}),
    })
  } catch (err) {
    throw new Error(`cannot reach the candela server at ${base}: ${(err as Error & { cause?: Error }).cause?.message ?? (err as Error).message}`, { cause: err })
  }
  const json = (await res.json().catch(() => ({}))) as { error?: { message?: string } }
  if (!res.ok) throw new Error(json.error?.message ?? `${method} ${path}: HTTP ${res.status}`)
  return json
}

function statusText(i: Instance): string {
  if (i.status === 'downloading' && i.download && i.download.total_bytes > 0) {
    return `downloading ${Math.floor((100 * i.download.downloaded_bytes) / i.download.total_bytes)}%`
  }
  return i.status
}

const launchOptions: Options = {
  ...CONNECT_OPTIONS,
  uid: { type: 'string' },
  'served-model-name': { type: 'string', multiple: true },
  quantization: { type: 'string' },
  wait: { type: 'boolean' },
  ...Object.fromEntries(MODEL_FLAGS.map((f) => [f.name, { type: f.arg ? ('string' as const) : ('boolean' as const), multiple: f.multiple === true }])),
}

export const launchCommand: Command = {
  summary: 'launch a model on a running server (by uid)',
  usage: `Usage: candela launch MODEL [--uid NAME] [--wait] [model options]

Asks a running 'candela serve' to host MODEL (a folder, .gguf file or
Hugging Face repo id, as the server sees it) beside its other models.
Prints the uid at once; the model downloads and loads in the background
(see 'candela list'). Requests reach it with "model": uid.

  --uid NAME                 the uid (default: MODEL as given)
  --served-model-name NAME   more names clients may use (repeatable)
  --quantization QUANT       for a GGUF repo: the file with this quant tag (e.g. Q4_K_M)
  --wait                     return once it is loaded (exit 1 if it fails)
${CONNECT_HELP}

Model options: the Model, Engine and Multimodal flags of 'candela serve'
(${MODEL_FLAGS.map((f) => `--${f.name}`).join(', ')}).`,
  options: launchOptions,
  async run(positionals, values) {
    if (positionals.length !== 1) throw new UsageError(positionals.length === 0 ? 'launch needs a MODEL' : `unexpected argument ${JSON.stringify(positionals[1])}`)
    const body: Record<string, unknown> = { model: positionals[0] }
    if (typeof values.uid === 'string') body.uid = values.uid
    if (Array.isArray(values['served-model-name'])) body.served_model_name = values['served-model-name']
    if (typeof values.quantization === 'string') body.quantization = values.quantization
    for (const f of MODEL_FLAGS) {
      const v = values[f.name]
      if (v === undefined || v === false) continue
      // Switches go as booleans of their positive name; `no-x` is x: false.
      if (v === true) {
        if (f.name.startsWith('no-')) body[f.name.slice(3).replace(/-/g, '_')] = false
        else body[f.name.replace(/-/g, '_')] = true
      } else {
        body[f.name.replace(/-/g, '_')] = v
      }
    }
    let inst = (await call(values, 'POST', '/v1/instances', body)) as Instance
    process.stdout.write(`${inst.uid}\n`)
    if (values.wait !== true) return 0
    while (inst.status === 'downloading' || inst.status === 'loading') {
      await new Promise((r) => setTimeout(r, 500))
      inst = (await call(values, 'GET', `/v1/instances/${encodeURIComponent(inst.uid)}`)) as Instance
    }
    if (inst.status !== 'ready') throw new Error(`${inst.uid} failed to load: ${inst.error ?? inst.status}`)
    return 0
  },
}

export const listCommand: Command = {
  summary: 'list the models a running server hosts',
  usage: `Usage: candela list [--json]

One line per hosted model: uid, status (downloading N%, loading, ready,
failed) and the model it was launched from.

  --json                     the server's answer as it is
${CONNECT_HELP}`,
  options: { ...CONNECT_OPTIONS, json: { type: 'boolean' } },
  async run(positionals, values) {
    if (positionals.length > 0) throw new UsageError(`unexpected argument ${JSON.stringify(positionals[0])}`)
    const list = (await call(values, 'GET', '/v1/instances')) as { data: Instance[] }
    if (values.json === true) {
      process.stdout.write(`${JSON.stringify(list.data, null, 2)}\n`)
      return 0
    }
    const rows = [['UID', 'STATUS', 'MODEL'], ...list.data.map((i) => [i.uid, statusText(i), i.model])]
    const w = [0, 1].map((c) => Math.max(...rows.map((r) => r[c]!.length)))
    for (const r of rows) process.stdout.write(`${r[0]!.padEnd(w[0]!)}  ${r[1]!.padEnd(w[1]!)}  ${r[2]}\n`)
    return 0
  },
}

export const terminateCommand: Command = {
  summary: 'stop hosting a model on a running server (by uid)',
  usage: `Usage: candela terminate UID

Closes the model's engine and frees its memory; requests naming it get 404.

${CONNECT_HELP}`,
  options: CONNECT_OPTIONS,
  async run(positionals, values) {
    if (positionals.length !== 1) throw new UsageError(positionals.length === 0 ? 'terminate needs a UID' : `unexpected argument ${JSON.stringify(positionals[1])}`)
    await call(values, 'DELETE', `/v1/instances/${encodeURIComponent(positionals[0]!)}`)
    process.stderr.write(`candela: terminated ${positionals[0]}\n`)
    return 0
  },
}
