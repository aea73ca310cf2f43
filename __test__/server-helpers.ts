// Shared by the server tests: a server on a free port with a captured log,
// a Prometheus text parser, and a raw SSE reader.
import OpenAI from 'openai'

import { createLogger, startServer } from '../dist/server/index.js'
import type { CandelaServer, ServerOptions } from '../dist/server/index.js'

export interface TestServer {
  server: CandelaServer
  /** `http://127.0.0.1:PORT` */
  base: string
  /** The official client, pointed at `${base}/v1`. */
  client: OpenAI
  /** Parsed JSON log lines, in order. */
  logs: Array<Record<string, unknown>>
}

/** Start a server on a free port; the model is loaded when this resolves (unless `wait: false`). */
export async function startTestServer(options: ServerOptions, wait = true): Promise<TestServer> {
  const logs: Array<Record<string, unknown>> = []
  const logger = createLogger({ json: true, stream: { write: (s: string) => logs.push(JSON.parse(s) as Record<string, unknown>) } })
  const server = await startServer({ port: 0, logger, ...options })
  if (wait) await server.ready
  const base = server.url
  const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: options.apiKey ?? 'unused', maxRetries: 0, timeout: 60_000 })
  return { server, base, client, logs }
}

/**
 * Request params with vLLM's extra sampling fields (ignore_eos, top_k, ...)
 * that the official client passes through but does not type.
 */
export function extra<T>(params: T & Record<string, unknown>): T {
  return params
}

export interface Sample {
  name: string
  labels: Record<string, string>
  value: number
}

const NAME = '[a-zA-Z_:][a-zA-Z0-9_:]*'
const LABEL = `[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\\\\n]|\\\\[\\\\"n])*"`
const SAMPLE_RE = new RegExp(`^(${NAME})(?:\\{((?:${LABEL})(?:,(?:${LABEL}))*,?)?\\})? (\\S+)(?: (-?\\d+))?$`)
// Values as Prometheus reads them (Go's ParseFloat: Inf / NaN in any case).
const VALUE_RE = /^(?:[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]?inf|nan)$/i

/**
 * Parse Prometheus text exposition format 0.0.4 strictly: every line is a
 * HELP / TYPE comment or a sample of a family whose TYPE came first; throws
 * on anything else.
 */
export function parsePrometheus(text: string): { samples: Sample[]; types: Map<string, string> } {
  const types = new Map<string, string>()
  const samples: Sample[] = []
  const lines = text.split('\n')
  if (lines.at(-1) !== '') throw new Error('the exposition must end with a newline')
  for (const [i, line] of lines.slice(0, -1).entries()) {
    if (line === '') continue
    if (line.startsWith('#')) {
      const m = /^# (HELP|TYPE) (\S+) ?(.*)$/.exec(line)
      if (!m) {
        if (line.startsWith('# HELP') || line.startsWith('# TYPE')) throw new Error(`line ${i + 1}: bad comment ${line}`)
        continue
      }
      if (m[1] === 'TYPE') {
        if (!['counter', 'gauge', 'histogram', 'summary', 'untyped'].includes(m[3]!)) throw new Error(`line ${i + 1}: bad type ${m[3]}`)
        if (types.has(m[2]!)) throw new Error(`line ${i + 1}: TYPE given twice for ${m[2]}`)
        types.set(m[2]!, m[3]!)
      }
      continue
    }
    const m = SAMPLE_RE.exec(line)
    if (!m || !VALUE_RE.test(m[3]!)) throw new Error(`line ${i + 1}: not a sample: ${line}`)
    const name = m[1]!
    const family = [...types.keys()].find((f) => name === f || /^_(bucket|sum|count|total|created)$/.test(name.slice(f.length)) && name.startsWith(f))
    if (family === undefined) throw new Error(`line ${i + 1}: sample ${name} has no TYPE line before it`)
    const labels: Record<string, string> = {}
    for (const lm of (m[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[lm[1]!] = lm[2]!
    const raw = m[3]!
    const value = /inf$/i.test(raw) ? (raw.startsWith('-') ? -Infinity : Infinity) : /nan/i.test(raw) ? NaN : Number(raw)
    samples.push({ name, labels, value })
  }
  return { samples, types }
}

/** The value of one sample (labels must match those given); undefined when absent. */
export function sample(text: string, name: string, labels: Record<string, string> = {}): number | undefined {
  const found = parsePrometheus(text).samples.find(
    (s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v),
  )
  return found?.value
}

export async function metricsText(base: string): Promise<string> {
  const res = await fetch(`${base}/metrics`)
  if (res.status !== 200) throw new Error(`/metrics answered ${res.status}`)
  return res.text()
}

/** POST a JSON (or raw string) body; returns status, headers and the parsed or raw body. */
export async function post(
  url: string,
  body: unknown,
  headers: Record<string, string> = {},
): Promise<{ status: number; headers: Headers; json: any; text: string }> {
  const res = await fetch(url, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body: typeof body === 'string' ? body : JSON.stringify(body),
  })
  const text = await res.text()
  let json: unknown
  try {
    json = JSON.parse(text)
  } catch {
    json = undefined
  }
  return { status: res.status, headers: res.headers, json, text }
}

/** The raw SSE body split into events: `data` payloads and `:` comments, in order. */
export function sseEvents(text: string): Array<{ data?: string; comment?: string }> {
  return text
    .split('\n\n')
    .filter((block) => block !== '')
    .map((block) => {
      if (block.startsWith(':')) return { comment: block.slice(1).trim() }
      if (!block.startsWith('data: ')) throw new Error(`not an SSE data block: ${JSON.stringify(block)}`)
      return { data: block.slice('data: '.length) }
    })
}

/** Poll `check` until it is true or `ms` pass. */
export async function until(check: () => Promise<boolean>, ms = 5000): Promise<boolean> {
  const end = Date.now() + ms
  while (Date.now() < end) {
    if (await check()) return true
    await new Promise((r) => setTimeout(r, 20))
  }
  return check()
}
