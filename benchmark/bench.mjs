#!/usr/bin/env node
// candela vs the engines a user would pick instead, side by side in one run.
//
//   npm run bench -- <workload> [options]
//   workloads: single offline serving multimodal prefix all | sanity profile report
//              shapes-single shapes-offline shapes-vision (real model shapes, random
//              weights: see prepare-real-shapes.py; not in `all`)
//
//   --runs N          timed runs per engine, interleaved (default 3; --quick: 1)
//   --quick           tiny sizes, for a smoke test of the whole pipeline
//   --models a,b      restrict to these models: smollm2, qwen05b (single, offline);
//                     qwen2.5-1.5b, qwen2.5-3b (shapes-*, default: those prepared)
//   --engines a,b     restrict to these engines: candela, llama.cpp, transformers
//                     (shapes-vision: candela, llama-server, transformers)
//   --cases a,b       keep only the cases whose id contains one of these (e.g. q8_0,bf16)
//   --threads N       CPU threads for every engine (default 2)
//   --device cuda     run candela, transformers and llama.cpp on the GPU (see RESULTS.md)
//   --verbose         echo the workers' output
//   --all-cases       also what the default leaves out to fit `all` in an hour on
//                     2 cores: offline on the 0.5B model (Q8_0, F16, F32 pairs) and
//                     prefix with node-llama-cpp's reuse off (about +1 hour)
//
// Every engine runs in its own child process (peak RSS = that process's VmHWM /
// ru_maxrss), on the same token ids, greedy, ignoring EOS, with the same thread
// count. Writes benchmark/results/<workload>.json and .png and regenerates
// benchmark/RESULTS.md.
import { spawn, spawnSync } from 'node:child_process'
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:net'
import { freemem, tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'

import {
  BENCH_DIR,
  CORPUS,
  LLAMA_BIN,
  RESULTS_DIR,
  ROOT,
  fmt,
  machineInfo,
  mmm,
  peakRssMiB,
  round,
  runWorker,
} from './lib/common.mjs'
import {
  QWEN,
  checkBuilt,
  ensureDefaultModelFile,
  ensureNodeDeps,
  ensureQwenModel,
  ensureVenv,
  venvPython,
} from './lib/bootstrap.mjs'
import { casesTable, ratiosTable, sanityTable } from './lib/render.mjs'
import { Rec, closedLoop, servingStats } from './lib/streams.mjs'

const WORKLOADS = ['single', 'offline', 'serving', 'multimodal', 'prefix']
const SHAPES_WORKLOADS = ['shapes-single', 'shapes-offline', 'shapes-vision']
const { values: opt, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    runs: { type: 'string' },
    quick: { type: 'boolean', default: false },
    models: { type: 'string' },
    engines: { type: 'string' },
    cases: { type: 'string' },
    threads: { type: 'string', default: '2' },
    device: { type: 'string', default: 'cpu' },
    verbose: { type: 'boolean', default: false },
    'all-cases': { type: 'boolean', default: false },
    help: { type: 'boolean', short: 'h', default: false },
  },
})
const workload = positionals[0]
if (opt.help || !workload || ![...WORKLOADS, ...SHAPES_WORKLOADS, 'all', 'sanity', 'profile', 'report'].includes(workload)) {
  const head = readFileSync(new URL(import.meta.url), 'utf8').split('\n').slice(1)
  console.log(head.slice(0, head.findIndex((l) => !l.startsWith('//'))).map((l) => l.replace(/^\/\/ ?/, '')).join('\n'))
  process.exit(opt.help ? 0 : 2)
}
const QUICK = opt.quick
const ALL_CASES = opt['all-cases'] || QUICK // quick runs smoke-test every path
const RUNS = Number(opt.runs ?? (QUICK ? 1 : 3))
const THREADS = Number(opt.threads)
const DEVICE = opt.device
const modelFilter = opt.models?.split(',')
const engineFilter = opt.engines?.split(',')
const caseFilter = opt.cases?.split(',')
const COMMAND = `npm run bench -- ${process.argv.slice(2).join(' ')}`

// ---------------------------------------------------------------------------
// engines and models

const ENGINE = {
  candela: { label: 'candela', cmd: () => process.execPath, args: [join(BENCH_DIR, 'workers', 'candela.mjs')] },
  'llama.cpp': { label: 'node-llama-cpp', cmd: () => process.execPath, args: [join(BENCH_DIR, 'workers', 'llamacpp.mjs')] },
  transformers: { label: 'transformers', cmd: () => venvPython(), args: [join(BENCH_DIR, 'workers', 'hf.py')] },
  // llama.cpp's own OpenAI-compatible server (shapes-vision: its multimodal runtime, mtmd)
  'llama-server': { label: 'llama.cpp llama-server' },
}
const threadEnv = {
  RAYON_NUM_THREADS: String(THREADS),
  OMP_NUM_THREADS: String(THREADS),
  MKL_NUM_THREADS: String(THREADS),
  TOKENIZERS_PARALLELISM: 'false',
  HF_HUB_OFFLINE: '1',
  TRANSFORMERS_OFFLINE: '1',
  TRANSFORMERS_VERBOSITY: 'error',
}

let SMOL = null // path of the SmolLM2 GGUF, set by prepare()
// Real-shape checkpoints (benchmark/prepare-real-shapes.py): outside the repo, they are big.
const SHAPES_DIR = process.env.CANDELA_BENCH_MODELS || join(BENCH_DIR, 'models')
const SHAPES = ['qwen2.5-1.5b', 'qwen2.5-3b']
const VL = join(ROOT, 'fixtures', 'qwen2-vl-tiny')
const modelLabel = {
  smollm2: 'SmolLM2-135M-Instruct',
  qwen05b: 'Qwen2-0.5B-shaped, random weights',
  vl: 'qwen2-vl-tiny fixture',
  'qwen2.5-1.5b': 'Qwen2.5-1.5B-shaped, random weights',
  'qwen2.5-3b': 'Qwen2.5-3B-shaped, random weights',
  'qwen2.5-vl-3b': 'Qwen2.5-VL-3B-shaped, random weights',
}

/**
 * The engine/weights pairs of one model. Each case: id, engine, model,
 * weights (path), format (what the engine reads), extra spec fields.
 */
function casesFor(model) {
  if (model === 'smollm2') {
    return [
      { id: 'candela/smollm2-q4_1', engine: 'candela', model, weights: SMOL, format: 'Q4_1 GGUF' },
      { id: 'llama.cpp/smollm2-q4_1', engine: 'llama.cpp', model, weights: SMOL, format: 'Q4_1 GGUF' },
      { id: 'transformers/smollm2-f32', engine: 'transformers', model, weights: SMOL, format: 'Q4_1 GGUF dequantized to F32 by transformers', dtype: 'f32' },
    ]
  }
  return [
    { id: 'candela/qwen05b-q8_0', engine: 'candela', model, weights: QWEN.q8_0, format: 'Q8_0 GGUF' },
    { id: 'llama.cpp/qwen05b-q8_0', engine: 'llama.cpp', model, weights: QWEN.q8_0, format: 'Q8_0 GGUF' },
    { id: 'candela/qwen05b-f16', engine: 'candela', model, weights: QWEN.f16, format: 'F16 GGUF' },
    { id: 'llama.cpp/qwen05b-f16', engine: 'llama.cpp', model, weights: QWEN.f16, format: 'F16 GGUF' },
    { id: 'candela/qwen05b-f32', engine: 'candela', model, weights: QWEN.dir, format: 'F32 safetensors', load: { dtype: 'f32' } },
    { id: 'transformers/qwen05b-f32', engine: 'transformers', model, weights: QWEN.dir, format: 'F32 safetensors', dtype: 'f32' },
  ]
}

/** The GGUF files of a real-shape model both engines read (prepare-real-shapes.py), where present. */
const SHAPE_GGUFS = ['q4_k_m', 'iq4_xs', 'q5_k_m', 'q6_k', 'q4_0', 'q3_k_m', 'q2_k', 'q8_0', 'f16']

/**
 * The cases of a real-shape model: each GGUF both engines read, the BF16
 * safetensors as candela (bf16, and quantized at load) and transformers
 * (bf16, and f32 when memory allows) read them. Only files that exist.
 */
function shapeCases(model) {
  const f = (x) => join(SHAPES_DIR, x)
  const have = (x) => existsSync(f(x))
  const out = []
  for (const q of SHAPE_GGUFS) {
    const label = `${q.toUpperCase()} GGUF`
    if (!have(`${model}.${q}.gguf`)) continue
    for (const engine of ['candela', 'llama.cpp']) out.push({ id: `${engine}/${model}-${q}`, engine, model, weights: f(`${model}.${q}.gguf`), format: label })
  }
  if (have(`${model}/model.safetensors.index.json`)) {
    const dir = f(model)
    out.push(
      { id: `candela/${model}-bf16`, engine: 'candela', model, weights: dir, format: "BF16 safetensors, dtype 'auto' (kept bf16)" },
      { id: `candela/${model}-st-q4_k`, engine: 'candela', model, weights: dir, format: 'BF16 safetensors quantized to q4_k at load', load: { quantization: 'q4_k' } },
      { id: `transformers/${model}-bf16`, engine: 'transformers', model, weights: dir, format: 'BF16 safetensors', dtype: 'bf16' },
    )
    // f32 widening takes 4 bytes per parameter: only with room to spare (the machine is shared).
    const params = JSON.parse(readFileSync(f(`${model}.json`), 'utf8')).parameters
    if (freemem() > params * 4 * 1.5) out.push({ id: `transformers/${model}-f32`, engine: 'transformers', model, weights: dir, format: 'BF16 safetensors upcast to F32', dtype: 'f32' })
    else console.error(`[bench] transformers f32 ${model} left out: ${(freemem() / 2 ** 30).toFixed(1)} GiB free, it needs ~${((params * 4 * 1.5) / 2 ** 30).toFixed(1)}`)
  }
  return out
}

function shapePairs(cases) {
  const has = (id) => cases.some((c) => c.id === id)
  return cases
    .filter((c) => c.engine === 'candela')
    .flatMap((c) => {
      const m = c.model
      const peers = {
        ...Object.fromEntries(SHAPE_GGUFS.map((q) => [`candela/${m}-${q}`, [`llama.cpp/${m}-${q}`]])),
        [`candela/${m}-bf16`]: [`transformers/${m}-bf16`, `transformers/${m}-f32`],
        [`candela/${m}-st-q4_k`]: [`llama.cpp/${m}-q4_k_m`],
      }[c.id] ?? []
      return peers.filter(has).map((peer) => ({ candela: c.id, peer }))
    })
}

const preparedShapes = () => pickModels(SHAPES).filter((m) => existsSync(join(SHAPES_DIR, `${m}.json`)))

/** candela vs each peer on the same weight file (or the same values). */
function pairsFor(cases) {
  const has = (id) => cases.some((c) => c.id === id)
  const all = [
    ['candela/smollm2-q4_1', 'llama.cpp/smollm2-q4_1'],
    ['candela/smollm2-q4_1', 'transformers/smollm2-f32'],
    ['candela/qwen05b-q8_0', 'llama.cpp/qwen05b-q8_0'],
    ['candela/qwen05b-f16', 'llama.cpp/qwen05b-f16'],
    ['candela/qwen05b-f32', 'transformers/qwen05b-f32'],
  ]
  return all.filter(([a, b]) => has(a) && has(b)).map(([a, b]) => ({ candela: a, peer: b }))
}

const pickEngines = (cases) =>
  cases.filter((c) => (!engineFilter || engineFilter.includes(c.engine)) && (!caseFilter || caseFilter.some((s) => c.id.includes(s))))
const pickModels = (models) => models.filter((m) => !modelFilter || modelFilter.includes(m))

// ---------------------------------------------------------------------------
// prompts: token ids cut from CORPUS, tokenized once per model by candela

const tokenCache = new Map()
async function corpusIds(model) {
  if (tokenCache.has(model)) return tokenCache.get(model)
  // The real-shape models have the Qwen2 tokenizer: the tiny fixture tokenizes as they do.
  const weights = model === 'smollm2' ? SMOL : SHAPES.includes(model) ? join(ROOT, 'fixtures', 'qwen2-tiny') : QWEN.q8_0
  const r = await runWorker({ ...workerCmd('candela'), spec: { task: 'tokenize', model: weights, text: CORPUS }, env: threadEnv, label: `tokenize ${model}` })
  tokenCache.set(model, r.ids)
  return r.ids
}

/** n prompts of len tokens each, distinct starts (offsets step apart in the repeated corpus). */
function windows(ids, n, len, { start = 0, step = 37 } = {}) {
  const need = start + (n - 1) * step + len
  let long = ids
  while (long.length < need) long = long.concat(ids)
  return Array.from({ length: n }, (_, i) => long.slice(start + i * step, start + i * step + len))
}
/** A warm-up prompt that no timed prompt starts with (the corpus backwards). */
const warmupIds = (ids) => ids.slice(0, 24).reverse()

function workerCmd(engine) {
  return { cmd: ENGINE[engine].cmd(), args: ENGINE[engine].args }
}

async function runCase(c, spec) {
  const s = { model: c.weights, device: DEVICE, threads: c.threads ?? THREADS, ...(c.dtype ? { dtype: c.dtype } : {}), ...spec }
  s.load = { ...(c.load ?? {}), ...(spec.load ?? {}) }
  return runWorker({ ...workerCmd(c.engine), spec: s, env: threadEnv, label: c.id, verbose: opt.verbose })
}

// ---------------------------------------------------------------------------
// workloads: each returns { params, cases, pairs, metrics, notes, run(case, runIndex) }

const W = {}

W.single = async () => {
  const p = QUICK ? { promptTokens: 16, maxTokens: 8 } : { promptTokens: 128, maxTokens: 128 }
  const models = pickModels(['smollm2', 'qwen05b'])
  const cases = pickEngines(models.flatMap(casesFor))
  // node-llama-cpp is faster with ONE thread for one stream on this 2-core box
  // (its spinning ggml threads compete with Node's main thread): shown as an
  // extra case, so the comparison also holds against the peer's best setting.
  const smolLlama = cases.findIndex((c) => c.id === 'llama.cpp/smollm2-q4_1')
  if (smolLlama >= 0 && THREADS > 1 && DEVICE === 'cpu') {
    cases.splice(smolLlama + 1, 0, { ...cases[smolLlama], id: 'llama.cpp-1thread/smollm2-q4_1', threads: 1 })
  }
  const prompts = {}
  for (const m of models) {
    const ids = await corpusIds(m)
    prompts[m] = { prompt: windows(ids, 1, p.promptTokens, { start: 5 })[0], warmup: warmupIds(ids) }
  }
  return {
    params: p,
    cases,
    pairs: [
      ...pairsFor(cases),
      ...(cases.some((c) => c.id === 'llama.cpp-1thread/smollm2-q4_1') && cases.some((c) => c.id === 'candela/smollm2-q4_1')
        ? [{ candela: 'candela/smollm2-q4_1', peer: 'llama.cpp-1thread/smollm2-q4_1' }]
        : []),
    ],
    metrics: [
      { key: 'ttftMs', label: 'TTFT', unit: 'ms', better: 'lower' },
      { key: 'decodeTokS', label: 'decode', unit: 'tok/s', better: 'higher' },
      { key: 'peakRssMiB', label: 'peak RSS', unit: 'MiB', better: 'lower' },
    ],
    notes: [
      `One request alone: a ${p.promptTokens}-token prompt (token ids), ${p.maxTokens} generated tokens, greedy, EOS ignored; after a 4-token warm-up request with another prompt in the same process.`,
      'TTFT = request start to first token (prefill + first sample); decode = tokens after the first / time after the first.',
    ],
    run: (c) => runCase(c, { task: 'single', ...prompts[c.model], maxTokens: p.maxTokens }),
  }
}

W.offline = async () => {
  const p = QUICK ? { prompts: 4, promptTokens: 16, maxTokens: 8 } : { prompts: 64, promptTokens: 128, maxTokens: 128 }
  // Default: SmolLM2 only (all three engines); the 0.5B model with --all-cases
  // or --models qwen05b (see RESULTS.md: the time budget).
  const models = pickModels(ALL_CASES || modelFilter ? ['smollm2', 'qwen05b'] : ['smollm2'])
  const cases = pickEngines(models.flatMap(casesFor))
  const prompts = {}
  for (const m of models) {
    const ids = await corpusIds(m)
    prompts[m] = { prompts: windows(ids, p.prompts, p.promptTokens), warmup: warmupIds(ids) }
  }
  return {
    params: p,
    cases,
    pairs: pairsFor(cases),
    metrics: [
      { key: 'outTokS', label: 'output tokens/s', unit: 'tok/s', better: 'higher' },
      { key: 'totalTokS', label: 'prompt+output tokens/s', unit: 'tok/s', better: 'higher' },
      { key: 'peakRssMiB', label: 'peak RSS', unit: 'MiB', better: 'lower' },
    ],
    notes: [
      `${p.prompts} prompts of ${p.promptTokens} tokens submitted at once, ${p.maxTokens} tokens each, greedy, EOS ignored. Rate = tokens / wall time of the whole batch (prefill included).`,
      'candela: engine.generate(all prompts), max_num_seqs 64. node-llama-cpp: one context with 64 sequences, evaluations batched by node-llama-cpp (batchSize 2048 tokens, as candela\'s max_num_batched_tokens). transformers: one generate() call on the [64, 128] batch.',
    ],
    run: (c) => runCase(c, { task: 'offline', ...prompts[c.model], maxTokens: p.maxTokens, load: { maxNumSeqs: 64 } }),
  }
}

W.serving = async () => {
  const p = QUICK
    ? { concurrency: [1, 4], promptTokens: 16, maxTokens: 8, requestsPerLevel: (c) => Math.max(4, c) }
    : { concurrency: [1, 4, 16, 64], promptTokens: 128, maxTokens: 64, requestsPerLevel: (c) => Math.max(8, c) }
  const ids = await corpusIds('smollm2')
  let k = 0
  const levels = p.concurrency.map((c) => {
    const n = p.requestsPerLevel(c)
    const prompts = windows(ids, n, p.promptTokens, { start: k * 37 })
    k += n
    return { concurrency: c, prompts }
  })
  const warmup = warmupIds(ids)
  const cases = pickEngines([
    { id: 'candela-http/smollm2-q4_1', engine: 'candela', model: 'smollm2', weights: SMOL, format: 'Q4_1 GGUF', via: 'HTTP (candela serve + openai client)' },
    { id: 'candela-inproc/smollm2-q4_1', engine: 'candela', model: 'smollm2', weights: SMOL, format: 'Q4_1 GGUF', via: 'in-process (engine.generateStream)' },
    { id: 'llama.cpp/smollm2-q4_1', engine: 'llama.cpp', model: 'smollm2', weights: SMOL, format: 'Q4_1 GGUF', via: 'in-process (no server in node-llama-cpp)' },
  ])
  const metrics = p.concurrency.flatMap((c) => [
    { key: `c${c}.ttftP50Ms`, label: `c=${c} TTFT p50`, unit: 'ms', better: 'lower' },
    { key: `c${c}.ttftP99Ms`, label: `c=${c} TTFT p99`, unit: 'ms', better: 'lower' },
    { key: `c${c}.itlP50Ms`, label: `c=${c} ITL p50`, unit: 'ms', better: 'lower' },
    { key: `c${c}.itlP99Ms`, label: `c=${c} ITL p99`, unit: 'ms', better: 'lower' },
    { key: `c${c}.outTokS`, label: `c=${c} output tok/s`, unit: 'tok/s', better: 'higher' },
  ])
  metrics.push({ key: 'peakRssMiB', label: 'peak RSS', unit: 'MiB', better: 'lower' })
  const flatten = (r) => {
    const out = { ...r }
    for (const lv of r.levels) for (const [key, v] of Object.entries(lv)) out[`c${lv.concurrency}.${key}`] = v
    return out
  }
  const has = (id) => cases.some((c) => c.id === id)
  const pairs = [
    ['candela-http/smollm2-q4_1', 'llama.cpp/smollm2-q4_1'],
    ['candela-inproc/smollm2-q4_1', 'llama.cpp/smollm2-q4_1'],
    ['candela-http/smollm2-q4_1', 'candela-inproc/smollm2-q4_1'],
  ].filter(([a, b]) => has(a) && has(b)).map(([a, b]) => ({ candela: a, peer: b }))
  return {
    params: { ...p, requestsPerLevel: levels.map((l) => l.prompts.length) },
    cases,
    pairs,
    metrics,
    notes: [
      `Closed loop: at concurrency c, c clients each send their next request when the previous one finished; ${levels.map((l) => `${l.prompts.length} requests at c=${l.concurrency}`).join(', ')}; each a distinct ${p.promptTokens}-token prompt (token ids), ${p.maxTokens} tokens, greedy, ignore_eos.`,
      'candela-http: `candela serve` (max-num-seqs 64, prefix caching on as by default; no two prompts share a block) and the `openai` npm client streaming /v1/completions from the orchestrating process, on the same 2 cores.',
      'node-llama-cpp has no server: its numbers are in-process (one context with `sequences` = c, a cleared sequence per request). candela-inproc is candela the same way, so candela-inproc ÷ llama.cpp is the like-for-like engine comparison and candela-http ÷ candela-inproc the cost of HTTP + SSE + JSON.',
      'ITL = gaps between streamed chunks (a chunk of k tokens counts as k gaps of gap/k). Peak RSS of candela-http is the server process.',
    ],
    run: async (c) => {
      if (c.id.startsWith('candela-http')) return flatten(await servingHttp(c, levels, warmup, p.maxTokens))
      return flatten(await runCase(c, { task: 'serving', levels, warmup, maxTokens: p.maxTokens }))
    },
  }
}

async function freePort() {
  return new Promise((res, rej) => {
    const s = createServer()
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address()
      s.close(() => res(port))
    })
    s.on('error', rej)
  })
}

/**
 * An OpenAI-compatible server in a child process (candela serve, llama-server),
 * ready once GET /health answers 200 (the tail of its output goes into the
 * error if it never is). Returns its base URL, pid, start-to-ready seconds and
 * `stop()`.
 */
async function startServer(cmd, args) {
  const port = await freePort()
  const t0 = performance.now()
  const child = spawn(cmd, [...args, '--port', String(port)], { cwd: ROOT, env: { ...process.env, ...threadEnv }, stdio: ['ignore', 'pipe', 'pipe'] })
  let log = ''
  const keep = (d) => {
    log = (log + d).slice(-4000)
    if (opt.verbose) process.stderr.write(d)
  }
  child.stdout.on('data', keep)
  child.stderr.on('data', keep)
  const exited = new Promise((r) => child.on('exit', r))
  const base = `http://127.0.0.1:${port}`
  const stop = async () => {
    child.kill('SIGTERM')
    await exited
  }
  try {
    for (let i = 0; ; i++) {
      if (child.exitCode !== null) throw new Error(`${cmd} exited: ${log}`)
      if (i > 6000) throw new Error(`${cmd} not ready after 600 s: ${log}`)
      try {
        const r = await fetch(`${base}/health`)
        if (r.status === 200) break
      } catch {}
      await new Promise((r) => setTimeout(r, 100))
    }
  } catch (err) {
    await stop()
    throw err
  }
  return { base, pid: child.pid, loadS: round((performance.now() - t0) / 1000, 2), stop }
}

/** candela serve in a child process, driven by the openai client from here. */
async function servingHttp(c, levels, warmup, maxTokens) {
  const { default: OpenAI } = await import('openai')
  const args = [join(ROOT, 'dist', 'cli.js'), 'serve', c.weights, '--max-num-seqs', '64', '--disable-log-requests', '--served-model-name', 'bench']
  if (DEVICE === 'cuda') args.push('--device', 'cuda')
  const server = await startServer(process.execPath, args)
  const { base } = server
  try {
    const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: 'unused', maxRetries: 0, timeout: 1_800_000 })
    const send = async (ids, n) => {
      const rec = new Rec()
      const stream = await client.completions.create({
        model: 'bench',
        prompt: ids,
        max_tokens: n,
        temperature: 0,
        stream: true,
        stream_options: { include_usage: true },
        ignore_eos: true,
      })
      let usage = 0
      for await (const chunk of stream) {
        if (chunk.choices?.[0]?.text) rec.add(1)
        if (chunk.usage) usage = chunk.usage.completion_tokens
      }
      // tokens whose text came in a later chunk (held back: partial UTF-8) count with that chunk
      if (usage > rec.tokens && rec.chunks.length) rec.chunks.at(-1).n += usage - rec.tokens
      return rec
    }
    await send(warmup, 4)
    const out = []
    for (const lv of levels) {
      const { recs, t0: a, t1: b } = await closedLoop(lv.prompts, lv.concurrency, (ids) => send(ids, maxTokens))
      out.push({ concurrency: lv.concurrency, ...servingStats(recs, a, b) })
    }
    return { engine: 'candela', via: 'http', model: c.weights.split('/').at(-1), loadS: server.loadS, levels: out, peakRssMiB: peakRssMiB(server.pid) }
  } finally {
    await server.stop()
  }
}

W.multimodal = async () => {
  const p = QUICK
    ? { maxTokens: 4, concurrent: 4, maxPixels: 28 * 28 * 1280 }
    : { maxTokens: 16, concurrent: 16, maxPixels: 28 * 28 * 1280 }
  const cases = pickEngines([
    { id: 'candela/qwen2-vl-tiny', engine: 'candela', model: 'vl', weights: VL, format: 'BF16 safetensors (fixture), auto dtype', load: { maxModelLen: 4096, maxNumSeqs: 64 } },
    { id: 'transformers/qwen2-vl-tiny', engine: 'transformers', model: 'vl', weights: VL, format: 'BF16 safetensors (fixture) upcast to F32', dtype: 'f32' },
  ])
  const spec = {
    task: 'multimodal',
    image: join(ROOT, 'fixtures', 'vision', 'photo_1024x768.jpg'),
    warmupImage: join(ROOT, 'fixtures', 'vision', 'wide.png'),
    text: 'Describe the picture.',
    ...p,
  }
  return {
    params: { ...p, image: 'fixtures/vision/photo_1024x768.jpg', model: 'fixtures/qwen2-vl-tiny' },
    cases,
    pairs: cases.length === 2 ? [{ candela: cases[0].id, peer: cases[1].id }] : [],
    metrics: [
      { key: 'coldTtftMs', label: 'cold TTFT', unit: 'ms', better: 'lower' },
      { key: 'mediaWarmTtftMs', label: 'media-warm TTFT', unit: 'ms', better: 'lower' },
      { key: 'warmTtftMs', label: 'warm TTFT', unit: 'ms', better: 'lower' },
      { key: 'concImagesPerS', label: `${p.concurrent} concurrent: images/s`, unit: 'img/s', better: 'higher' },
      { key: 'concTtftP50Ms', label: `${p.concurrent} concurrent: TTFT p50`, unit: 'ms', better: 'lower' },
      { key: 'peakRssMiB', label: 'peak RSS', unit: 'MiB', better: 'lower' },
    ],
    notes: [
      `The 1024x768 JPEG through the chat API (image bytes in, decode + resize + patches + vision tower + prefill), max_pixels ${p.maxPixels} (Qwen2-VL's default: 999 image tokens), ${p.maxTokens} tokens out. The model is the tiny random Qwen2-VL fixture, so the language model costs little and the numbers are dominated by image decoding and preprocessing.`,
      'cold: a new image (uuid) after a warm-up with another image; media-warm: the same image behind another system prompt (candela: processor and encoder caches hit, prefix cache misses); warm: the same request again (candela: every cache hits). transformers has no media caches: all three recompute.',
      `${p.concurrent} concurrent: ${p.concurrent} requests for the image with distinct uuids (caches miss) at once; transformers runs them as one batch of ${p.concurrent} (processor on ${p.concurrent} images, one generate()).`,
      'node-llama-cpp is not in this workload: it has no Qwen2-VL vision support for this checkpoint format (an mmproj GGUF would be needed).',
    ],
    run: (c) => runCase(c, spec),
  }
}

W['shapes-single'] = async () => {
  const p = QUICK ? { promptTokens: 32, maxTokens: 8 } : { promptTokens: 512, maxTokens: 64 }
  const models = preparedShapes()
  if (models.length === 0) throw new Error(`no real-shape checkpoint in ${SHAPES_DIR}: run benchmark/prepare-real-shapes.py first`)
  const cases = pickEngines(models.flatMap(shapeCases))
  const prompts = {}
  for (const m of models) {
    const ids = await corpusIds(m)
    prompts[m] = { prompt: windows(ids, 1, p.promptTokens, { start: 5 })[0], warmup: warmupIds(ids) }
  }
  return {
    params: p,
    cases,
    pairs: shapePairs(cases),
    metrics: [
      { key: 'ttftMs', label: 'TTFT', unit: 'ms', better: 'lower' },
      { key: 'prefillTokS', label: 'prompt tok/s', unit: 'tok/s', better: 'higher' },
      { key: 'decodeTokS', label: 'decode', unit: 'tok/s', better: 'higher' },
      { key: 'loadS', label: 'load', unit: 's', better: 'lower' },
      { key: 'anonRssAfterLoadMiB', label: 'file-free RSS after load (candela)', unit: 'MiB', better: 'lower' },
      { key: 'peakRssMiB', label: 'peak RSS', unit: 'MiB', better: 'lower' },
    ],
    notes: [
      `One request alone: a ${p.promptTokens}-token prompt (token ids), ${p.maxTokens} generated tokens, greedy, EOS ignored; after a 4-token warm-up request with another prompt in the same process. prompt tok/s = prompt tokens / TTFT.`,
      'Random weights with the real models\' shapes (benchmark/prepare-real-shapes.py): every GGUF was converted from the BF16 safetensors by llama.cpp\'s own convert_hf_to_gguf.py / llama-quantize, so all formats hold the same values.',
      'load = process start of the engine to model ready (candela: Engine.load; node-llama-cpp: getLlama + loadModel; transformers: from_pretrained).',
    ],
    run: (c) => runCase(c, { task: 'single', ...prompts[c.model], maxTokens: p.maxTokens }).then((r) => ({ ...r, prefillTokS: r.ttftMs ? round((p.promptTokens * 1000) / r.ttftMs, 1) : null })),
  }
}

W['shapes-offline'] = async () => {
  const p = QUICK ? { prompts: 4, promptTokens: 16, maxTokens: 8 } : { prompts: 32, promptTokens: 256, maxTokens: 128 }
  const models = preparedShapes()
  if (models.length === 0) throw new Error(`no real-shape checkpoint in ${SHAPES_DIR}: run benchmark/prepare-real-shapes.py first`)
  const cases = pickEngines(models.flatMap(shapeCases))
  const prompts = {}
  for (const m of models) {
    const ids = await corpusIds(m)
    prompts[m] = { prompts: windows(ids, p.prompts, p.promptTokens), warmup: warmupIds(ids) }
  }
  return {
    params: p,
    cases,
    pairs: shapePairs(cases),
    metrics: [
      { key: 'outTokS', label: 'output tokens/s', unit: 'tok/s', better: 'higher' },
      { key: 'totalTokS', label: 'prompt+output tokens/s', unit: 'tok/s', better: 'higher' },
      { key: 'loadS', label: 'load', unit: 's', better: 'lower' },
      { key: 'peakRssMiB', label: 'peak RSS', unit: 'MiB', better: 'lower' },
    ],
    notes: [
      `${p.prompts} prompts of ${p.promptTokens} tokens submitted at once, ${p.maxTokens} tokens each, greedy, EOS ignored. Rate = tokens / wall time of the whole batch (prefill included). Engines as in \`offline\` (candela max_num_seqs 64; node-llama-cpp one context of ${p.prompts} sequences, batchSize 2048; transformers one generate() call).`,
    ],
    run: (c) => runCase(c, { task: 'offline', ...prompts[c.model], maxTokens: p.maxTokens, load: { maxNumSeqs: 64 } }),
  }
}

/**
 * n distinct JPEGs of the same picture and size (brightness steps of 1 %), so
 * every request misses every media cache an engine has (candela's processor
 * and encoder caches, llama-server's prompt cache, which hashes the pixels).
 */
function imageVariants(src, n) {
  const dir = join(tmpdir(), 'candela-bench-images')
  mkdirSync(dir, { recursive: true })
  const code = [
    'import sys; from PIL import Image, ImageEnhance',
    'src, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3]); im = Image.open(src).convert("RGB")',
    'for i in range(n): ImageEnhance.Brightness(im).enhance(1 - 0.01 * i).save(f"{out}/v{i}.jpg", quality=92)',
  ].join('\n')
  const r = spawnSync(venvPython(), ['-c', code, src, dir, String(n)], { encoding: 'utf8' })
  if (r.status !== 0) throw new Error(`image variants: ${r.stderr}`)
  return Array.from({ length: n }, (_, i) => join(dir, `v${i}.jpg`))
}

W['shapes-vision'] = async () => {
  const p = QUICK ? { maxTokens: 4, concurrent: 2 } : { maxTokens: 16, concurrent: 8 }
  const m = 'qwen2.5-vl-3b'
  const f = (x) => join(SHAPES_DIR, x)
  if (!existsSync(f(`${m}.json`))) throw new Error(`no ${m} in ${SHAPES_DIR}: run benchmark/prepare-real-shapes.py ${m} first`)
  const info = JSON.parse(readFileSync(f(`${m}.json`), 'utf8'))
  const gguf = f(`${m}.q4_k_m.gguf`)
  const mmproj = f(`${m}.mmproj-f16.gguf`)
  const dir = f(m)
  // One KV budget for both servers: 16,384 tokens of f16 K and V (llama-server -c 16384).
  const c = info.config
  const kvBytes = 16384 * c.num_hidden_layers * 2 * c.num_key_value_heads * (c.hidden_size / c.num_attention_heads) * 2
  const pair = 'GGUF Q4_K_M + mmproj F16 (llama.cpp\'s converter)'
  const cases = pickEngines([
    { id: `candela/${m}-q4_k_m`, engine: 'candela', model: m, weights: gguf, mmproj, format: pair, via: 'HTTP (candela serve)' },
    { id: `llama-server/${m}-q4_k_m`, engine: 'llama-server', model: m, weights: gguf, mmproj, format: pair, via: 'HTTP (llama-server)' },
    { id: `candela/${m}-bf16`, engine: 'candela', model: m, weights: dir, format: "BF16 safetensors, dtype 'auto' (kept bf16)", via: 'HTTP (candela serve)' },
    { id: `transformers/${m}-bf16`, engine: 'transformers', model: m, weights: dir, format: 'BF16 safetensors', dtype: 'bf16', via: 'in-process generate()' },
  ])
  const photo = join(ROOT, 'fixtures', 'vision', 'photo_1024x768.jpg')
  const [cold, ...conc] = imageVariants(photo, 1 + p.concurrent)
  const text = 'Describe the picture.'
  const has = (id) => cases.some((x) => x.id === id)
  return {
    params: { ...p, image: 'fixtures/vision/photo_1024x768.jpg', kvCacheBytes: kvBytes },
    cases,
    pairs: [
      [`candela/${m}-q4_k_m`, `llama-server/${m}-q4_k_m`],
      [`candela/${m}-bf16`, `transformers/${m}-bf16`],
    ].filter(([a, b]) => has(a) && has(b)).map(([a, b]) => ({ candela: a, peer: b })),
    metrics: [
      { key: 'coldTtftMs', label: 'cold TTFT', unit: 'ms', better: 'lower' },
      { key: 'towerMs', label: 'image encoding', unit: 'ms', better: 'lower' },
      { key: 'mediaWarmTtftMs', label: 'media-warm TTFT', unit: 'ms', better: 'lower' },
      { key: 'concImagesPerS', label: `${p.concurrent} concurrent: images/s`, unit: 'img/s', better: 'higher' },
      { key: 'concTtftP50Ms', label: `${p.concurrent} concurrent: TTFT p50`, unit: 'ms', better: 'lower' },
      { key: 'loadS', label: 'load', unit: 's', better: 'lower' },
      { key: 'peakRssMiB', label: 'peak RSS', unit: 'MiB', better: 'lower' },
    ],
    notes: [
      `The 1024x768 JPEG through the chat API, ${p.maxTokens} tokens out, greedy, EOS ignored; every engine's own default image size for Qwen2.5-VL (1036x756 here: 999 image tokens). After a warm-up request with another image (fixtures/vision/wide.png).`,
      `cold: an image no engine has seen (JPEG variants 1 % apart in brightness, so no cache of any engine hits); media-warm: the same image again behind a system prompt (candela: processor and encoder caches hit, the prefix cache misses; llama-server and transformers recompute everything). ${p.concurrent} concurrent: ${p.concurrent} more unseen images sent at once; images/s = ${p.concurrent} / wall time until the last one finished.`,
      'image encoding: candela, cold TTFT − media-warm TTFT (JPEG decode, resize, patches, vision tower and merger); llama.cpp, the tower + merger time its mtmd library logs for the cold image ("mtmd batch encoding done in", from `llama-mtmd-cli` on the same files and threads, since llama-server does not log it); transformers, not separable (left empty).',
      `Servers: candela serve --kv-cache-memory ${kvBytes} (16,384 f16 tokens' worth) --max-num-seqs ${p.concurrent}; llama-server -c 16384 -np ${p.concurrent} -t/-tb threads, cache_prompt as default. Both driven by the \`openai\` npm client from the orchestrating process (stream, image as a base64 data URL). transformers: in-process, cold and media-warm only (one request at a time; a batch of ${p.concurrent} images would take longer than this workload's budget).`,
    ],
    run: async (x) => {
      if (x.engine === 'transformers') {
        const spec = { task: 'multimodal', image: cold, warmupImage: join(ROOT, 'fixtures', 'vision', 'wide.png'), text, maxTokens: p.maxTokens, maxPixels: 12845056, coldOnly: true }
        return runCase(x, spec)
      }
      const r = await visionHttp(x, { cold, conc, text, maxTokens: p.maxTokens, kvBytes })
      return x.engine === 'llama-server' ? { ...r, towerMs: mtmdEncodeMs(x, cold, text) } : r
    },
  }
}

/** One server (candela serve or llama-server) through the shapes-vision requests. */
async function visionHttp(c, { cold, conc, text, maxTokens, kvBytes }) {
  const { default: OpenAI } = await import('openai')
  const server =
    c.engine === 'candela'
      ? await startServer(process.execPath, [
          join(ROOT, 'dist', 'cli.js'), 'serve', c.weights, ...(c.mmproj ? ['--mmproj', c.mmproj] : []),
          '--threads', String(THREADS), '--max-num-seqs', String(conc.length), '--kv-cache-memory', String(kvBytes),
          '--disable-log-requests', '--served-model-name', 'bench',
        ])
      : await startServer(join(LLAMA_BIN, 'llama-server'), [
          '-m', c.weights, '--mmproj', c.mmproj, '-t', String(THREADS), '-tb', String(THREADS),
          '-c', '16384', '-np', String(conc.length), '--no-webui', '--host', '127.0.0.1', '--alias', 'bench',
        ])
  try {
    const client = new OpenAI({ baseURL: `${server.base}/v1`, apiKey: 'unused', maxRetries: 0, timeout: 3_600_000 })
    const url = (file) => `data:image/${file.endsWith('.png') ? 'png' : 'jpeg'};base64,${readFileSync(file).toString('base64')}`
    let promptTokens = null
    const ask = async (file, system) => {
      const rec = new Rec()
      const stream = await client.chat.completions.create({
        model: 'bench',
        messages: [
          ...(system ? [{ role: 'system', content: system }] : []),
          { role: 'user', content: [{ type: 'image_url', image_url: { url: url(file) } }, { type: 'text', text }] },
        ],
        max_tokens: maxTokens,
        temperature: 0,
        stream: true,
        stream_options: { include_usage: true },
        ignore_eos: true,
      })
      for await (const chunk of stream) {
        if (chunk.choices?.[0]?.delta?.content) rec.add(1)
        if (chunk.usage) promptTokens = chunk.usage.prompt_tokens
      }
      if (rec.tokens === 0) throw new Error(`${c.id}: no token streamed`)
      return rec
    }
    await ask(join(ROOT, 'fixtures', 'vision', 'wide.png'))
    const coldRec = await ask(cold)
    const coldPromptTokens = promptTokens
    const warmRec = await ask(cold, 'Answer briefly.')
    const { recs, t0, t1 } = await closedLoop(conc, conc.length, (file) => ask(file))
    const st = servingStats(recs, t0, t1)
    const towerMs = c.engine === 'candela' ? coldRec.ttftMs - warmRec.ttftMs : null
    return {
      engine: c.engine,
      via: 'http',
      promptTokens: coldPromptTokens,
      coldTtftMs: round(coldRec.ttftMs, 1),
      towerMs: towerMs === null ? null : round(towerMs, 1),
      mediaWarmTtftMs: round(warmRec.ttftMs, 1),
      concurrent: conc.length,
      concWallS: st.wallS,
      concImagesPerS: round(conc.length / st.wallS, 4),
      concTtftP50Ms: st.ttftP50Ms,
      concTtftP99Ms: st.ttftP99Ms,
      loadS: server.loadS,
      peakRssMiB: peakRssMiB(server.pid),
    }
  } finally {
    await server.stop()
  }
}

/**
 * llama.cpp's vision tower + merger time for one image: llama-server does not
 * log it, so its CLI (the same mtmd library, warmed up at load) encodes the
 * image once and logs the time.
 */
function mtmdEncodeMs(c, image, text) {
  const r = spawnSync(join(LLAMA_BIN, 'llama-mtmd-cli'), ['-m', c.weights, '--mmproj', c.mmproj, '--image', image, '-p', text, '-n', '1', '-t', String(THREADS), '-c', '4096'], { encoding: 'utf8', env: { ...process.env, ...threadEnv }, timeout: 1_800_000 })
  // mtmd logs one of these, depending on whether it batches the image's slices
  const ms = [...`${r.stdout}${r.stderr}`.matchAll(/(?:image slice encoded|mtmd batch encoding done) in (\d+) ms/g)].map((x) => Number(x[1]))
  if (r.status === 0 && ms.length > 0) return ms.reduce((a, b) => a + b, 0)
  // the server's own numbers still count: the column stays empty
  console.error(`[bench] llama-mtmd-cli: exit ${r.status}: ${`${r.stdout}${r.stderr}`.slice(-2000)}`)
  return null
}

W.prefix = async () => {
  const p = QUICK
    ? { requests: 4, systemTokens: 200, suffixTokens: 16, maxTokens: 4, concurrency: 2 }
    : { requests: 32, systemTokens: 2000, suffixTokens: 32, maxTokens: 32, concurrency: 4 }
  const ids = await corpusIds('smollm2')
  const system = windows(ids, 1, p.systemTokens)[0]
  const suffixes = windows(ids, p.requests, p.suffixTokens, { start: 301, step: 53 })
  const prompts = suffixes.map((s) => system.concat(s))
  const base = { task: 'prefix', prompts, warmup: warmupIds(ids), maxTokens: p.maxTokens, concurrency: p.concurrency }
  const cases = pickEngines([
    { id: 'candela/cache-on', engine: 'candela', model: 'smollm2', weights: SMOL, format: 'Q4_1 GGUF', load: { enablePrefixCaching: true } },
    { id: 'candela/cache-off', engine: 'candela', model: 'smollm2', weights: SMOL, format: 'Q4_1 GGUF', load: { enablePrefixCaching: false } },
    { id: 'llama.cpp/reuse-on', engine: 'llama.cpp', model: 'smollm2', weights: SMOL, format: 'Q4_1 GGUF', caching: true },
    // ~4 min per run of pure prefill: only with --all-cases (time budget)
    ...(ALL_CASES ? [{ id: 'llama.cpp/reuse-off', engine: 'llama.cpp', model: 'smollm2', weights: SMOL, format: 'Q4_1 GGUF', caching: false }] : []),
  ])
  const has = (id) => cases.some((c) => c.id === id)
  return {
    params: p,
    cases,
    pairs: [
      ['candela/cache-on', 'llama.cpp/reuse-on'],
      ['candela/cache-off', 'llama.cpp/reuse-off'],
      ['candela/cache-on', 'candela/cache-off'],
      ['llama.cpp/reuse-on', 'llama.cpp/reuse-off'],
    ].filter(([a, b]) => has(a) && has(b)).map(([a, b]) => ({ candela: a, peer: b })),
    metrics: [
      { key: 'wallS', label: 'wall time', unit: 's', better: 'lower' },
      { key: 'ttftP50Ms', label: 'TTFT p50', unit: 'ms', better: 'lower' },
      { key: 'ttftP99Ms', label: 'TTFT p99', unit: 'ms', better: 'lower' },
      { key: 'prefillTokens', label: 'prompt tokens computed', unit: 'tok', better: 'lower' },
      { key: 'peakRssMiB', label: 'peak RSS', unit: 'MiB', better: 'lower' },
    ],
    notes: [
      `${p.requests} requests = one ${p.systemTokens}-token system prompt + a distinct ${p.suffixTokens}-token question (token ids), ${p.maxTokens} tokens out, ${p.concurrency} clients in a closed loop.`,
      'candela: prefix caching on vs off (enablePrefixCaching), one engine shared by all requests: after the first request every prompt finds the system prompt\'s KV blocks.',
      `node-llama-cpp has no cross-request prefix cache; "reuse-on" is what its LlamaChat does between turns: each of the ${p.concurrency} context sequences keeps its previous KV and re-evaluates from the first differing token (so the system prompt is computed once per sequence, ${p.concurrency} times in all); "reuse-off" clears the sequence first.`,
      ALL_CASES
        ? 'The last pair rows (candela on ÷ off, llama.cpp on ÷ off) are each engine\'s own gain from reuse.'
        : 'candela on ÷ off is candela\'s own gain from its prefix cache; llama.cpp reuse-off (its 32 x 2,032-token prefills) is left out for time (`--all-cases` adds it).',
    ],
    run: (c) => runCase(c, { ...base, caching: c.caching, ...(c.load ? { load: c.load } : {}) }),
  }
}

// ---------------------------------------------------------------------------
// running a workload: interleaved runs, summary, ratios, table, JSON, chart

async function runWorkload(name) {
  const def = await W[name]()
  if (def.cases.length === 0) throw new Error(`${name}: no engine/model left after --models/--engines`)
  console.log(`\n== ${name}: ${def.cases.map((c) => c.id).join(', ')}; ${RUNS} run(s) each, interleaved`)
  const runs = Object.fromEntries(def.cases.map((c) => [c.id, []]))
  const machine = machineInfo({ python: pyVersions }) // at the start: commit and load average as the runs began
  const t0 = performance.now()
  for (let r = 0; r < RUNS; r++) {
    for (const c of def.cases) {
      const res = await def.run(c, r)
      runs[c.id].push(res)
      const brief = def.metrics.filter((m) => !m.key.includes('.') || m.key.startsWith(`c${def.params.concurrency?.at(-1)}.`)).slice(0, 4)
      console.log(`  run ${r + 1}/${RUNS} ${c.id.padEnd(30)} ${brief.map((m) => `${m.label} ${fmt(res[m.key])}`).join(' · ')} (process ${res.processWallS ?? '-'} s)`)
    }
  }
  const wallMin = (performance.now() - t0) / 60000
  machine.loadAvgAtEnd = readFileSync('/proc/loadavg', 'utf8').trim()
  const summary = {}
  for (const c of def.cases) {
    summary[c.id] = { loadS: mmm(runs[c.id].map((x) => x.loadS)) }
    for (const m of def.metrics) summary[c.id][m.key] = mmm(runs[c.id].map((x) => x[m.key]))
  }
  const ratios = def.pairs.map((pr) => {
    const out = { candela: pr.candela, peer: pr.peer, metrics: {} }
    for (const m of def.metrics) {
      const xs = runs[pr.candela].map((x, i) => {
        const y = runs[pr.peer][i]?.[m.key]
        return typeof x[m.key] === 'number' && typeof y === 'number' && y !== 0 ? x[m.key] / y : null
      })
      out.metrics[m.key] = mmm(xs)
    }
    return out
  })
  const result = {
    workload: name,
    command: COMMAND,
    quick: QUICK,
    runs: RUNS,
    threads: THREADS,
    device: DEVICE,
    wallMinutes: round(wallMin, 2),
    machine,
    params: def.params,
    cases: def.cases.map(({ id, engine, model, weights, format, via, threads }) => ({
      id,
      threads: threads ?? THREADS,
      engine: ENGINE[engine].label,
      model: modelLabel[model],
      weights: weights.replace(`${ROOT}/`, '').replace(process.env.HOME ?? '~', '~'),
      format,
      ...(via ? { via } : {}),
    })),
    metrics: def.metrics,
    summary,
    ratios,
    notes: def.notes,
    ...(name === 'single' && sanityResult ? { sanity: sanityResult } : {}),
    raw: runs,
  }
  printTables(result)
  mkdirSync(RESULTS_DIR, { recursive: true })
  const file = join(RESULTS_DIR, `${name}${QUICK ? '-quick' : ''}.json`)
  writeFileSync(file, `${JSON.stringify(result, null, 2)}\n`)
  console.log(`wrote ${file.replace(`${ROOT}/`, '')}`)
  chart(file)
  return result
}

function printTables(r) {
  console.log(`\n${r.workload}: median (min–max) over ${r.runs} run(s)`)
  console.log(casesTable(r))
  if (r.ratios.length) {
    console.log(`\nratio candela ÷ peer, median (min–max) of the per-run ratios; ↑ higher is better, ↓ lower is better`)
    console.log(ratiosTable(r))
  }
}

function chart(file) {
  const r = spawnSync(venvPython(), [join(BENCH_DIR, 'chart.py'), file], { stdio: 'inherit' })
  if (r.status !== 0) console.error(`[bench] chart failed for ${file}`)
}

// ---------------------------------------------------------------------------
// sanity: the same greedy tokens from every engine on the same weights

let sanityResult = null
async function sanity() {
  const n = QUICK ? 8 : 16
  const out = {
    maxTokens: n,
    method:
      'Per model: the f32 reference (transformers, else the first case) generates n greedy tokens; every engine then (a) generates n greedy tokens itself ("free run": how many leading tokens equal the reference\'s) and (b) is teacher-forced along the reference tokens ("top-1 agreement": at how many of the n positions its argmax equals the reference token). A near-tie flips one position in (b) but the whole rest of the run in (a).',
    models: {},
  }
  for (const m of pickModels(['smollm2', 'qwen05b'])) {
    const ids = await corpusIds(m)
    const prompt = ids.slice(0, 32)
    const cases = pickEngines(casesFor(m))
    const refCase = cases.find((c) => c.engine === 'transformers') ?? cases[0]
    const ref = (await runCase(refCase, { task: 'greedy', prompt, maxTokens: n })).tokenIds
    const rows = []
    for (const c of cases) {
      const r = await runCase(c, { task: 'greedy', prompt, maxTokens: n, forced: ref })
      const lead = r.tokenIds.findIndex((t, i) => t !== ref[i])
      rows.push({
        id: c.id,
        format: c.format,
        freeRunMatchingPrefix: lead === -1 ? Math.min(r.tokenIds.length, ref.length) : lead,
        forcedTop1Agreement: r.forcedArgmax.filter((t, i) => t === ref[i]).length,
        tokenIds: r.tokenIds,
        forcedArgmax: r.forcedArgmax,
      })
    }
    // same weight file, two engines: how long do their own greedy runs agree?
    for (const pr of pairsFor(cases)) {
      const a = rows.find((r) => r.id === pr.candela)
      const b = rows.find((r) => r.id === pr.peer)
      const lead = a.tokenIds.findIndex((t, i) => t !== b.tokenIds[i])
      b.pairFreeRunMatchingPrefix = { with: a.id, tokens: lead === -1 ? n : lead }
    }
    out.models[m] = { prompt, reference: refCase.id, referenceTokens: ref, rows }
    console.log(`\nsanity (${modelLabel[m]}): same ${prompt.length}-token prompt, ${n} greedy tokens, reference ${refCase.id}`)
    console.log(sanityTable({ maxTokens: n, models: { [m]: out.models[m] } })[0])
  }
  sanityResult = out
  return out
}

// ---------------------------------------------------------------------------

let pyVersions = null
async function prepare(names) {
  checkBuilt()
  const needs = (w) => names.includes(w)
  if (names.some((w) => w !== 'multimodal' && w !== 'report')) ensureNodeDeps()
  ensureVenv()
  const py = spawnSync(venvPython(), ['-c', 'import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)'], { encoding: 'utf8' })
  const [python, torch, transformers] = py.stdout.trim().split(' ')
  pyVersions = { python, torch, transformers }
  SMOL = await ensureDefaultModelFile()
  const wantsQwen = (needs('single') || needs('sanity') || (needs('offline') && (ALL_CASES || modelFilter))) && pickModels(['qwen05b']).length > 0
  if (wantsQwen) ensureQwenModel()
}

async function main() {
  if (workload === 'report') {
    spawnSync(process.execPath, [join(BENCH_DIR, 'report.mjs')], { stdio: 'inherit' })
    return
  }
  if (workload === 'profile') {
    await prepare(['single'])
    const r = spawnSync(process.execPath, [join(BENCH_DIR, 'profile.mjs'), ...process.argv.slice(3)], { stdio: 'inherit', env: { ...process.env, ...threadEnv } })
    process.exit(r.status ?? 1)
  }
  const names = workload === 'all' ? WORKLOADS : workload === 'sanity' ? ['sanity'] : [workload]
  await prepare(names)
  const t0 = performance.now()
  if (names.includes('single') || names.includes('sanity')) {
    await sanity()
    mkdirSync(RESULTS_DIR, { recursive: true })
    writeFileSync(join(RESULTS_DIR, `sanity${QUICK ? '-quick' : ''}.json`), `${JSON.stringify({ command: COMMAND, machine: machineInfo({ python: pyVersions }), ...sanityResult }, null, 2)}\n`)
  }
  const failed = []
  for (const n of names.filter((x) => x !== 'sanity')) {
    try {
      await runWorkload(n)
    } catch (err) {
      // one broken workload does not lose the others' results
      console.error(`[bench] ${n} failed: ${err?.stack ?? err}`)
      failed.push(n)
    }
  }
  console.log(`\n[bench] ${workload} took ${((performance.now() - t0) / 60000).toFixed(1)} min`)
  spawnSync(process.execPath, [join(BENCH_DIR, 'report.mjs')], { stdio: 'inherit' })
  if (failed.length) {
    console.error(`[bench] failed: ${failed.join(', ')}`)
    process.exitCode = 1
  }
}

main().catch((err) => {
  console.error(err?.stack ?? err)
  process.exit(1)
})
