#!/usr/bin/env node
// Teacher-forced top-1 agreement of the quantized engines with the f32
// reference: how often candela's and llama.cpp's argmax after each position
// of real text equals transformers' (f32, the same weights dequantized).
//
//   node benchmark/accuracy.mjs [--models smollm2,qwen05b,smollm2-iq4] [--windows 4] [--tokens 64] [--threads 2]
//
// smollm2-iq4 is SmolLM2's Q4_1 file requantized to IQ4_XS by llama.cpp's
// llama-quantize (from $CANDELA_BENCH_LLAMA_BIN, default /work/build-bench/bin;
// its 576-wide rows fall back to IQ4_NL), the reference being transformers
// on that file: a real model through candela's IQ4 reader.
//
// Per model, `windows` slices of the benchmark corpus, each a 32-token prompt
// followed by `tokens` forced tokens (the corpus continues; nothing is
// sampled). transformers runs each slice in one f32 forward; candela and
// node-llama-cpp are fed the forced tokens one decode step at a time (candela
// with 1-token KV blocks, so each position is a one-row step on top of the
// cached prefix: the decode kernels, not the prefill GEMM). Run after
// `npm run bench -- single` has prepared the models and the venv. Prints a
// table and writes benchmark/results/accuracy.json.
import { spawnSync } from 'node:child_process'
import { existsSync, mkdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { parseArgs } from 'node:util'

import { BENCH_DIR, CORPUS, LLAMA_BIN, MODELS_DIR, RESULTS_DIR, runWorker } from './lib/common.mjs'
import { QWEN, ensureDefaultModelFile, venvPython } from './lib/bootstrap.mjs'

const { values: opt } = parseArgs({
  options: {
    models: { type: 'string', default: 'smollm2,qwen05b' },
    windows: { type: 'string', default: '4' },
    tokens: { type: 'string', default: '64' },
    threads: { type: 'string', default: '2' },
  },
})
const WINDOWS = Number(opt.windows)
const TOKENS = Number(opt.tokens)
const THREADS = Number(opt.threads)
const PROMPT = 32

const worker = {
  candela: [process.execPath, join(BENCH_DIR, 'workers', 'candela.mjs')],
  'llama.cpp': [process.execPath, join(BENCH_DIR, 'workers', 'llamacpp.mjs')],
  transformers: [venvPython(), join(BENCH_DIR, 'workers', 'hf.py')],
}
const env = { RAYON_NUM_THREADS: String(THREADS), OMP_NUM_THREADS: String(THREADS), TOKENIZERS_PARALLELISM: 'false', HF_HUB_OFFLINE: '1', TRANSFORMERS_OFFLINE: '1', TRANSFORMERS_VERBOSITY: 'error' }
const run = (engine, spec, label) => {
  const [cmd, ...args] = worker[engine]
  return runWorker({ cmd, args, spec: { threads: THREADS, device: 'cpu', ...spec }, env, label })
}

const smol = await ensureDefaultModelFile()
const MODELS = {
  smollm2: {
    tokenizeWith: smol,
    reference: { engine: 'transformers', weights: smol, dtype: 'f32', format: 'Q4_1 GGUF dequantized to F32' },
    cases: [
      { id: 'candela/smollm2-q4_1', engine: 'candela', weights: smol },
      { id: 'llama.cpp/smollm2-q4_1', engine: 'llama.cpp', weights: smol },
    ],
  },
  qwen05b: {
    tokenizeWith: QWEN.q8_0,
    reference: { engine: 'transformers', weights: QWEN.dir, dtype: 'f32', format: 'F32 safetensors' },
    cases: [
      { id: 'candela/qwen05b-q8_0', engine: 'candela', weights: QWEN.q8_0 },
      { id: 'llama.cpp/qwen05b-q8_0', engine: 'llama.cpp', weights: QWEN.q8_0 },
      { id: 'candela/qwen05b-f16', engine: 'candela', weights: QWEN.f16 },
      { id: 'llama.cpp/qwen05b-f16', engine: 'llama.cpp', weights: QWEN.f16 },
    ],
  },
}

/** `src` requantized to `type` by llama.cpp's llama-quantize (made once, in benchmark/models). */
function requantized(src, name, type) {
  const out = join(MODELS_DIR, `${name}.${type.toLowerCase()}.gguf`)
  if (!existsSync(out)) {
    const bin = join(LLAMA_BIN, 'llama-quantize')
    mkdirSync(MODELS_DIR, { recursive: true })
    const r = spawnSync(bin, ['--allow-requantize', src, out, type], { encoding: 'utf8' })
    if (r.status !== 0) throw new Error(`${bin} ${type}: exit ${r.status}: ${`${r.stdout}${r.stderr}`.slice(-800)}`)
  }
  return out
}
if (opt.models.split(',').includes('smollm2-iq4')) {
  const iq4 = requantized(smol, 'smollm2', 'IQ4_XS')
  MODELS['smollm2-iq4'] = {
    tokenizeWith: smol,
    reference: { engine: 'transformers', weights: iq4, dtype: 'f32', format: 'IQ4_XS GGUF (llama-quantize from the Q4_1 file) dequantized to F32' },
    cases: [
      { id: 'candela/smollm2-iq4_xs', engine: 'candela', weights: iq4 },
      { id: 'llama.cpp/smollm2-iq4_xs', engine: 'llama.cpp', weights: iq4 },
    ],
  }
}

const out = { windows: WINDOWS, promptTokens: PROMPT, forcedTokens: TOKENS, threads: THREADS, models: {} }
for (const m of opt.models.split(',')) {
  const def = MODELS[m]
  let ids = (await run('candela', { task: 'tokenize', model: def.tokenizeWith, text: CORPUS }, `tokenize ${m}`)).ids
  while (ids.length < WINDOWS * 97 + PROMPT + TOKENS) ids = ids.concat(ids)
  const slices = Array.from({ length: WINDOWS }, (_, w) => ids.slice(w * 97, w * 97 + PROMPT + TOKENS))
  const argmax = async (c, load) => {
    const all = []
    for (const s of slices) {
      const spec = { task: 'greedy', model: c.weights, prompt: s.slice(0, PROMPT), forced: s.slice(PROMPT), maxTokens: 1, load }
      if (c.dtype) spec.dtype = c.dtype
      all.push(...(await run(c.engine, spec, c.id ?? `${m} reference`)).forcedArgmax)
    }
    return all
  }
  const ref = await argmax(def.reference, {})
  const rows = []
  for (const c of def.cases) {
    const got = await argmax(c, c.engine === 'candela' ? { blockSize: 1 } : {})
    const agree = got.filter((t, i) => t === ref[i]).length
    rows.push({ id: c.id, agree, positions: ref.length, rate: agree / ref.length })
    console.log(`${m}  ${c.id.padEnd(28)} ${agree}/${ref.length} = ${((100 * agree) / ref.length).toFixed(1)} % top-1 agreement with ${def.reference.format} (transformers)`)
  }
  out.models[m] = { reference: def.reference.format, rows }
}
mkdirSync(RESULTS_DIR, { recursive: true })
writeFileSync(join(RESULTS_DIR, 'accuracy.json'), `${JSON.stringify(out, null, 2)}\n`)
