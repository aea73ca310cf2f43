#!/usr/bin/env node
// Where candela's time goes: decode step time against batch size, prefill
// rate, and (when `perf` works here) a CPU profile of the decode phase only,
// for the SmolLM2 Q4_1 GGUF and the Qwen2-0.5B-shaped Q8_0 / F32 models.
//
//   npm run bench -- profile [--quick] [--no-perf] [--batches 1,4,16,64] [--models smollm2,qwen05b-q8_0,qwen05b-f32]
//
// Writes benchmark/results/profile.json (a run narrowed by --batches, --models
// or --no-perf: profile-partial.json, so it never replaces the full one). The
// analysis that goes with it is in benchmark/profile-notes.md (embedded in
// RESULTS.md by report.mjs).
import { spawn, spawnSync } from 'node:child_process'
import { mkdirSync, rmSync, statSync, writeFileSync } from 'node:fs'
import { createInterface } from 'node:readline'
import { join } from 'node:path'
import { parseArgs } from 'node:util'

import { BENCH_DIR, CORPUS, RESULTS_DIR, ROOT, machineInfo, round, table } from './lib/common.mjs'

const { values: opt } = parseArgs({
  options: {
    child: { type: 'string' },
    quick: { type: 'boolean', default: false },
    'no-perf': { type: 'boolean', default: false },
    batches: { type: 'string' },
    models: { type: 'string' },
    threads: { type: 'string', default: '2' },
  },
})

// ---------------------------------------------------------------------------
// child: load, warm up, say READY, wait for "go", decode a batch, report, wait for "exit"
if (opt.child) {
  const spec = JSON.parse(opt.child)
  const { Engine } = await import('../dist/index.js')
  const engine = await Engine.load({ model: spec.model, ...(spec.load ?? {}) })
  const ids = await engine.tokenize(CORPUS, { addSpecialTokens: false })
  let long = ids
  while (long.length < spec.batch * 41 + spec.promptTokens) long = long.concat(ids)
  const prompts = Array.from({ length: spec.batch }, (_, i) => long.slice(i * 41, i * 41 + spec.promptTokens))
  const params = { maxTokens: spec.maxTokens, temperature: 0, ignoreEos: true }
  await engine.generate({ promptTokenIds: ids.slice(0, 16).reverse() }, { ...params, maxTokens: 4 })
  const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]()
  // prefill alone (1 output token), then the decode run on the same prompts (prefix cache off)
  const p0 = performance.now()
  await engine.generate(prompts.map((p) => ({ promptTokenIds: p })), { ...params, maxTokens: 1 })
  const prefillS = (performance.now() - p0) / 1000
  console.log('READY')
  await lines.next()
  const s0 = engine.stats()
  const t0 = performance.now()
  const firsts = []
  let ends = 0
  let tokens = 0
  await Promise.all(
    prompts.map(async (p) => {
      let first = true
      for await (const ch of engine.generateStream({ promptTokenIds: p }, params)) {
        if (first && ch.tokenIds.length) {
          firsts.push(performance.now())
          first = false
          if (firsts.length === spec.batch) console.log('DECODING') // the parent starts perf now
        }
        tokens += ch.tokenIds.length
      }
      ends = Math.max(ends, performance.now())
    }),
  )
  const s1 = engine.stats()
  const lastFirst = Math.max(...firsts)
  // decode phase: from the moment every sequence had its first token
  const decodeTokens = tokens - spec.batch
  const decodeS = (ends - lastFirst) / 1000
  const steps = s1.steps - s0.steps
  console.log(
    `RESULT ${JSON.stringify({
      batch: spec.batch,
      promptTokens: spec.promptTokens,
      prefillTokS: round((spec.batch * spec.promptTokens) / prefillS, 1),
      decodeTokS: round(decodeTokens / decodeS, 2),
      stepMs: round((decodeS * 1000) / (spec.maxTokens - 1), 2),
      engineSteps: steps,
      wallS: round((ends - t0) / 1000, 3),
    })}`,
  )
  await lines.next()
  await engine.close()
  process.exit(0)
}

// ---------------------------------------------------------------------------
// parent
const QUICK = opt.quick
const batches = (opt.batches ?? (QUICK ? '1,8' : '1,4,16,64')).split(',').map(Number)
const { ensureDefaultModelFile, QWEN } = await import('./lib/bootstrap.mjs')
const SMOL = await ensureDefaultModelFile()
const MODELS = {
  smollm2: { label: 'SmolLM2-135M-Instruct Q4_1 GGUF', model: SMOL, weightBytes: 0 },
  'qwen05b-q8_0': { label: 'Qwen2-0.5B-shaped Q8_0 GGUF', model: QWEN.q8_0 },
  'qwen05b-f32': { label: 'Qwen2-0.5B-shaped F32 safetensors', model: QWEN.dir, load: { dtype: 'f32' } },
}
const modelKeys = (opt.models ?? (QUICK ? 'smollm2' : 'smollm2,qwen05b-q8_0,qwen05b-f32')).split(',')
const perfOk = !opt['no-perf'] && spawnSync('perf', ['--version'], { stdio: 'ignore' }).status === 0
const env = { ...process.env, RAYON_NUM_THREADS: opt.threads }

/** Memory bandwidth one thread sees (copying 256 MiB), the bound for streaming weights. */
function memBandwidthGBs() {
  const a = new Float64Array(32 * 2 ** 20)
  const b = new Float64Array(32 * 2 ** 20)
  a.fill(1)
  let best = Infinity
  for (let i = 0; i < 5; i++) {
    const t = performance.now()
    b.set(a)
    best = Math.min(best, performance.now() - t)
  }
  return round((2 * a.byteLength) / (best / 1000) / 1e9, 1) // read + write
}

function weightBytes(path) {
  return statSync(path.endsWith('.gguf') ? path : join(path, 'model.safetensors')).size
}

const CATEGORIES = [
  ['matmul: quantized dot / dequantize', /q4_?[01]|q8_?[01]|quant|vec_dot|dot_q|block_q|_q8|_q4/i],
  ['matmul: f32/f16 GEMM', /gemm|matmul|sgemm|hgemm|nano_?gemm|dot_f|f16_?dot|microkernel|kernel_\d|x86_64::f32/i],
  ['attention', /attn|attention|paged|flash|softmax/i],
  ['norm / rope / activation', /rms|norm|rope|rotary|silu|gelu|swiglu|sigmoid|exp/i],
  ['tensor copies / elementwise', /copy|strided|binary_map|unary_map|memcpy|memmove|memset|index_select|contiguous|cat|transpose|broadcast|affine|to_dtype|convert/i],
  ['allocation / page faults', /malloc|free|alloc|realloc|mmap|munmap|page|clear_page|do_anonymous|mem_cgroup|madvise|brk/i],
  ['thread pool: sync / spin / idle', /rayon|crossbeam|sched_yield|futex|spin|park|steal|wake|condvar|parking_lot|pthread|sched|idle|poll|epoll/i],
  ['sampling / logits', /sampl|argmax|logit|top_k|topk|penal/i],
  ['scheduler / KV bookkeeping', /schedul|block_table|kv_cache|prefix|hash|BTreeMap|HashMap/i],
]

function categorize(dso, sym) {
  if (/^(node|libnode)/.test(dso) && !/candela/.test(dso)) return 'Node.js / V8 (JS side)'
  for (const [name, re] of CATEGORIES) if (re.test(sym)) return name
  if (dso === '[kernel.kallsyms]') return 'kernel (other)'
  return 'other'
}

async function runOne(key, batch) {
  const m = MODELS[key]
  const spec = { model: m.model, load: { maxNumSeqs: Math.max(64, batch), enablePrefixCaching: false, threads: Number(opt.threads), ...(m.load ?? {}) }, batch, promptTokens: 32, maxTokens: QUICK ? 16 : batch >= 16 ? 32 : 64 }
  const child = spawn(process.execPath, [join(BENCH_DIR, 'profile.mjs'), '--child', JSON.stringify(spec)], { cwd: ROOT, env, stdio: ['pipe', 'pipe', 'inherit'] })
  const out = createInterface({ input: child.stdout })[Symbol.asyncIterator]()
  const next = async () => (await out.next()).value
  let line = await next()
  while (line !== undefined && line !== 'READY') line = await next()
  if (line === undefined) throw new Error(`${key} b=${batch}: child died`)
  let perf = null
  const perfFile = join(RESULTS_DIR, `profile-perf-${key}-b${batch}.data`)
  child.stdin.write('go\n')
  line = await next()
  while (line !== undefined && !line.startsWith('RESULT ')) {
    if (line === 'DECODING' && perfOk) {
      // decode phase only: every sequence has its first token (prefill done)
      perf = spawn('perf', ['record', '-e', 'cpu-clock', '-F', '997', '-p', String(child.pid), '-o', perfFile], { stdio: ['ignore', 'ignore', 'pipe'] })
    }
    line = await next()
  }
  const result = JSON.parse(line.slice(7))
  let profile = null
  if (perf) {
    perf.kill('SIGINT')
    await new Promise((r) => perf.on('exit', r))
    profile = summarizePerf(perfFile)
    rmSync(perfFile, { force: true })
    rmSync(`${perfFile}.old`, { force: true })
  }
  child.stdin.write('exit\n')
  await new Promise((r) => child.on('exit', r))
  return { model: key, ...result, profile }
}

function summarizePerf(file) {
  const r = spawnSync('perf', ['report', '-i', file, '--stdio', '--no-children', '--sort', 'dso,sym', '--percent-limit', '0.05'], { encoding: 'utf8', maxBuffer: 64 << 20 })
  if (r.status !== 0) return { error: r.stderr.slice(-500) }
  const rows = []
  for (const l of r.stdout.split('\n')) {
    const m = /^\s+([\d.]+)%\s+(\S+)\s+\[[.k]\]\s+(.*)$/.exec(l)
    if (m) rows.push({ pct: Number(m[1]), dso: m[2], sym: m[3].trim() })
  }
  const cats = {}
  for (const x of rows) {
    const c = categorize(x.dso, x.sym)
    cats[c] = round((cats[c] ?? 0) + x.pct, 1)
  }
  const threads = spawnSync('perf', ['report', '-i', file, '--stdio', '--no-children', '--sort', 'comm'], { encoding: 'utf8' })
  const byThread = []
  for (const l of (threads.stdout ?? '').split('\n')) {
    const m = /^\s+([\d.]+)%\s+(.+)$/.exec(l)
    if (m) byThread.push({ pct: Number(m[1]), thread: m[2].trim() })
  }
  return {
    categories: Object.fromEntries(Object.entries(cats).sort((a, b) => b[1] - a[1])),
    top: rows.slice(0, 15).map((x) => ({ pct: x.pct, dso: x.dso, sym: x.sym.length > 110 ? `${x.sym.slice(0, 107)}...` : x.sym })),
    threads: byThread.slice(0, 6),
  }
}

mkdirSync(RESULTS_DIR, { recursive: true })
const bw = memBandwidthGBs()
console.log(`memory bandwidth (one thread, copy): ~${bw} GB/s; perf: ${perfOk ? 'yes' : 'no'}`)
const runs = []
for (const key of modelKeys) {
  const wb = weightBytes(MODELS[key].model)
  for (const b of batches) {
    const r = await runOne(key, b)
    r.weightMiB = round(wb / 2 ** 20, 0)
    // at batch 1 every step streams all weights once: the bandwidth they imply
    r.weightStreamGBs = round(wb / (r.stepMs / 1000) / 1e9, 1)
    runs.push(r)
    const top = r.profile?.categories ? Object.entries(r.profile.categories).slice(0, 4).map(([k, v]) => `${k} ${v}%`).join(', ') : ''
    console.log(`${key} batch ${b}: prefill ${r.prefillTokS} tok/s, decode ${r.decodeTokS} tok/s, step ${r.stepMs} ms${top ? ` | ${top}` : ''}`)
  }
}
console.log(
  `\n${table(
    ['model', 'batch', 'prefill tok/s', 'decode tok/s', 'step ms', 'weights MiB', 'weights/step GB/s'],
    runs.map((r) => [r.model, r.batch, r.prefillTokS, r.decodeTokS, r.stepMs, r.weightMiB, r.weightStreamGBs]),
  )}`,
)
// Only the default run replaces profile.json (RESULTS.md reads it); a run
// narrowed by --batches / --models / --no-perf is written beside it.
const partial = opt.batches || opt.models || opt['no-perf']
const file = join(RESULTS_DIR, `profile${QUICK ? '-quick' : partial ? '-partial' : ''}.json`)
writeFileSync(file, `${JSON.stringify({ command: `npm run bench -- profile ${process.argv.slice(2).join(' ')}`.trim(), machine: machineInfo(), memBandwidthGBs: bw, perf: perfOk, threads: Number(opt.threads), runs }, null, 2)}\n`)
console.log(`wrote ${file.replace(`${ROOT}/`, '')}`)
